"""Every entry of tests/slow_tests.txt names a test that exists, so a rename cannot silently
bring a long test back into the default suite or drop it from CI's slow command."""

import os
import re

import conftest

HERE = os.path.dirname(__file__)


def test_every_slow_entry_names_an_existing_file_and_test():
    entries = conftest._slow_entries()
    assert entries
    for entry in entries:
        path, _, rest = entry.partition("::")
        assert os.path.isfile(os.path.join(HERE, path)), f"{entry}: no such test file"
        if rest:
            name = rest.split("[")[0]
            with open(os.path.join(HERE, path)) as f:
                source = f.read()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{entry}: no such test"


class _Item:
    def __init__(self, nodeid):
        self.nodeid, self.marks = nodeid, []

    def add_marker(self, mark):
        self.marks.append(mark.name)


def test_the_hook_marks_listed_files_tests_and_cases_and_nothing_else():
    listed_case, listed_file = "tests/" + next(e for e in conftest._slow_entries() if "[" in e), "tests/test_fusion.py::test_x"
    name_only = listed_case.split("[")[0]
    items = [_Item(n) for n in (listed_case, listed_file, name_only, "tests/test_fusion_other.py::test_x")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.marks for i in items] == [["slow"], ["slow"], [], []]
