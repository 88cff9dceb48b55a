"""tfm's native CPU kernels build once into the cache, and fall back to XLA's paths where they cannot.

``tfm.layers.cpu_kernels`` compiles ``kernels/*.cc`` with the system's C++ compiler; these
tests build into a temporary cache: without a compiler, with a failing one, with a cached
library that cannot be loaded, and the pruning of libraries left unused.
"""

import logging
import os
import shutil
import time

import pytest

from tfm.layers import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build the kernels")


def test_no_compiler_falls_back_with_one_notice(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TFM_KERNEL_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="tfm.layers.cpu_kernels"):
        assert cpu_kernels.available.__wrapped__() is False
    assert "using XLA's paths" in caplog.text
    assert not list((tmp_path / "cache").glob("*")), "a failed build left files in the cache"
    monkeypatch.setenv("CXX", shutil.which("false"))  # a compiler that fails
    assert cpu_kernels.available.__wrapped__() is False
    assert not list((tmp_path / "cache").glob("*"))
    # A cached library that cannot be loaded (here: not a library at all) falls back too.
    monkeypatch.setenv("CXX", shutil.which("true"))  # "builds" an empty file
    assert cpu_kernels.available.__wrapped__() is False
    assert "loading" in caplog.text
    assert not list((tmp_path / "cache").glob("*")), "the library that failed to load stayed in the cache"


def test_a_build_prunes_libraries_left_unused(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TFM_KERNEL_CACHE", str(cache))
    day = 86400
    stale, recent, other = cache / "tfm_kernels-stale.so", cache / "attention_cpu-recent.so", cache / "notes.txt"
    for f, age in ((stale, cpu_kernels.UNUSED_DAYS + 1), (recent, cpu_kernels.UNUSED_DAYS - 1), (other, 400)):
        f.write_bytes(b"x")
        os.utime(f, (time.time() - age * day,) * 2)
    assert cpu_kernels.available.__wrapped__() is True  # builds a new library into the empty-of-it cache
    built = list(cache.glob("tfm_kernels-*.so"))
    assert len(built) == 1 and time.time() - built[0].stat().st_mtime < 60
    assert not stale.exists(), "a library unused for longer than UNUSED_DAYS stayed"
    assert recent.exists() and other.exists(), "pruning removed a library in use or a file that is not a library"
    # Loading a cached library marks it as used; loading does not prune.
    os.utime(built[0], (time.time() - 2 * cpu_kernels.UNUSED_DAYS * day,) * 2)
    os.utime(recent, (time.time() - 2 * cpu_kernels.UNUSED_DAYS * day,) * 2)
    assert cpu_kernels.available.__wrapped__() is True
    assert time.time() - built[0].stat().st_mtime < 60 and recent.exists()
