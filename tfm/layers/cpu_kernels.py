"""tfm's native CPU kernels: one shared library, built from source on first use, registered with XLA's FFI.

The sources are ``kernels/*.cc`` (with the headers ``kernels/*.h``): the fused attention
(``attention_cpu.cc``, used by ``tfm.layers.cpu_attention``), the one-pass norms and GELU
(``rowwise_cpu.cc``, used by ``tfm.layers.cpu_rowwise``) and the fused AdamW update
(``adamw_cpu.cc``, used by ``tfm.fused_optim``). They are compiled together, once per source,
compiler, jaxlib and CPU, with the system's C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``) into ``$TFM_KERNEL_CACHE`` (default ``~/.cache/tfm/kernels``). Each load marks its
library as used, and a build removes the cache's libraries left unused for ``UNUSED_DAYS``.
Without a compiler, or if the build or the load fails, ``available()`` is False (one logged
notice) and callers keep their XLA paths.

A program traced with a kernel holds a custom call of this process's: to serialise one with
``jax.export``, trace it with the ``tuning`` settings that pick the kernels turned off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
# FFI target name -> the handler's symbol in the library.
TARGETS = {
    "tfm_attention_cpu_forward": "TfmAttentionForward",
    "tfm_attention_cpu_backward": "TfmAttentionBackward",
    "tfm_attention_cpu_packed_forward": "TfmAttentionPackedForward",
    "tfm_attention_cpu_packed_backward": "TfmAttentionPackedBackward",
    "tfm_adamw_cpu": "TfmAdamW",
    "tfm_norm_cpu_forward": "TfmNormForward",
    "tfm_norm_cpu_backward": "TfmNormBackward",
    "tfm_gelu_cpu_forward": "TfmGeluForward",
    "tfm_gelu_cpu_backward": "TfmGeluBackward",
}
UNUSED_DAYS = 30  # a build removes the cache's other libraries left unused this long
_PREFIXES = ("tfm_kernels-", "attention_cpu-")  # the libraries this module writes, and those of earlier versions
_registered: set[str] = set()  # the FFI targets this process has registered


def cache_dir() -> Path:
    root = os.environ.get("TFM_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfm" / "kernels"


def sources() -> list[Path]:
    return sorted(KERNELS.glob("*.cc"))


def _cpu_id() -> str:
    """What the build's ``-march=native`` depends on: the CPU's model and feature flags where Linux shows them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _texts() -> list[str]:
    """The sources and the headers they include (``kernels/*.h``), as text."""
    return [f.read_text() for f in sources()] + [h.read_text() for h in sorted(KERNELS.glob("*.h"))]


def _compile(compiler: str, out: Path) -> str | None:
    """Builds the shared library at ``out`` (written whole or not at all); the compiler's error text if it fails."""
    # -fno-math-errno: sqrt without errno, so loops over it vectorise (the AdamW update).
    base = ["-O3", "-std=c++17", "-fno-math-errno", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
            *map(str, sources())]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    error = ""
    for native in (["-march=native"], ["-mcpu=native"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *native, *base, "-o", tmp], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(tmp, out)
                return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        error = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return error


def _prune(keep: Path) -> None:
    """Removes the cache's other kernel libraries not loaded for ``UNUSED_DAYS`` (older sources, jaxlibs, compilers).

    A library is marked when loaded, so one that another environment still uses stays; removing one that a
    running process has loaded does not disturb that process.
    """
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in keep.parent.glob("*.so"):
        try:
            if old != keep and old.name.startswith(_PREFIXES) and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


@functools.cache
def available() -> bool:
    """Builds (if not cached), loads and registers the kernels; False, with one logged notice, where it cannot."""
    compiler = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    if compiler is None:
        log.info("tfm's CPU kernels: no C++ compiler found ($CXX, c++, g++, clang++); using XLA's paths")
        return False
    import jaxlib

    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (*_texts(), compiler, jaxlib.__version__, platform.machine(), _cpu_id()))
    ).hexdigest()[:16]
    library = cache_dir() / f"tfm_kernels-{key}.so"
    if not library.exists():
        try:
            error = _compile(compiler, library)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            log.warning("tfm's CPU kernels: building %s failed (%s); using XLA's paths",
                        ", ".join(f.name for f in sources()), error)  # fmt: skip
            return False
        _prune(library)
    try:
        lib = ctypes.cdll.LoadLibrary(str(library))
        handlers = {name: getattr(lib, symbol) for name, symbol in TARGETS.items()}
    except (OSError, AttributeError) as e:  # a library this machine cannot load: removed, so a new build replaces it
        log.warning("tfm's CPU kernels: loading %s failed (%s); using XLA's paths", library, e)
        library.unlink(missing_ok=True)
        return False
    try:
        os.utime(library)  # marks it as in use for _prune
    except OSError:
        pass
    for name, handler in handlers.items():
        if name not in _registered:  # XLA refuses a second handler for a name (a rebuilt library, in one process)
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
            _registered.add(name)
    return True


__all__ = ["TARGETS", "UNUSED_DAYS", "available", "cache_dir", "sources"]
