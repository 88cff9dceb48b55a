"""Test-wide setup: eight fake CPU devices for sharding tests, float32 matmuls.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Exact float32 matmuls on every backend, so equivalence tests mean what they say.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def cheap_xla_compiles():
    """Compile with few XLA optimizations while a test runs (tiny shapes: compile time dominates).

    Set and restored per test, so files that do not ask for it compile as usual.
    """
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _slow_entries():
    """The entries of tests/slow_tests.txt: a file, a test or a parametrized case per line."""
    with open(os.path.join(os.path.dirname(__file__), "slow_tests.txt")) as f:
        return [entry for entry in (line.split("#")[0].strip() for line in f) if entry]


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test listed in tests/slow_tests.txt, by file, test name or exact case."""
    entries = _slow_entries()
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        if any(nodeid == e or nodeid.startswith(e + "::") or nodeid.startswith(e + "[") for e in entries):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop jit caches and garbage after each test file.

    A worker runs hundreds of files; without this, their compiled executables accumulate to
    several GiB per worker over the suite.
    """
    yield
    jax.clear_caches()
    gc.collect()
