"""Keep the host heap that a CPU train step allocates, instead of mapping it afresh every step.

XLA's CPU runtime allocates each execution's temporary buffer (the activations
and gradients of a step: 48 MiB for the shakespeare_char GPT, 1.3 GiB for a
d 512 × 8-layer model at 8 × 256 tokens) with ``malloc`` and frees it when the
step ends. glibc serves a block that large with a fresh ``mmap`` and returns it
with ``munmap``, so every step first-touches all of it again: 12,800 page
faults per step for the shakespeare GPT, a third of its step time on a 2-core
virtual machine (``benchmarks/vs_pytorch.py``).

``reserve(nbytes)`` makes glibc keep that memory: it switches off ``mmap`` for
allocations (``M_MMAP_MAX = 0``), so large blocks come from the heap, and sets
``M_TOP_PAD`` to ``nbytes``, so the heap keeps that much free memory at its top
when it shrinks. A freed step buffer then stays mapped and the next step reuses
its pages (the step's page faults fall from 12,800 to about 60). The process
keeps up to ``nbytes`` more resident memory than it is using, and memory freed
in the middle of the heap is reused rather than returned to the system: the
trade every caching allocator (tcmalloc, jemalloc) makes. ``restore()`` puts
glibc's defaults back. It applies on the CPU backend with glibc (elsewhere
device memory holds the step and it does nothing); ``RESERVE`` forces it on or
off.

A thread with an arena of its own is served from that arena's heaps, which
hold at most 64 MiB each; glibc maps a larger block on its own whatever
``M_MMAP_MAX`` says. With JAX's asynchronous CPU dispatch the step runs (and
allocates) on a worker thread, so for the d 512 × 8-layer model above (a
1.3 GiB buffer) 327,000 faults per step remained. ``dispatch_inline()``, called
before the CPU backend starts (``python -m tfm.train`` and the benchmarks do),
runs CPU computations on the calling thread instead
(``jax_cpu_enable_async_dispatch = False``): the buffer then comes from the
main heap, which keeps it, and the faults fall to ~200 per step (1.81–1.91 s →
1.59–1.65 s a step on a 2-core machine; the shakespeare step is unchanged,
31–32 ms either way). A computation whose inputs are still arriving does not run
inline: the CPU client copies a large numpy array that it cannot alias (one not
64-byte aligned, over ~100 KiB) on another thread, and a step called before its
batch has arrived is queued and later runs on a worker thread. Its outputs then
arrive late as well, so every later step, which takes the state it returns,
queues the same way. Where dispatch is inline, ``tfm.placement.BatchPlacer``
waits for each batch's copy, and ``settle(tree)`` waits for other arrays (the
training loop's starting state). Fashion-MNIST's 400 KiB image
batches went this way after a few steps: 101–108 ms a step, against 77–86 ms with the wait.
Making every thread share the main arena
(``M_ARENA_MAX = 1``) also removes the faults but slows small steps (25 → 30 ms
for the shakespeare GPT). ``TFM_HOST_HEAP=0`` in the environment switches all
of this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import jax

log = logging.getLogger(__name__)

RESERVE: bool | None = None if os.environ.get("TFM_HOST_HEAP", "1") != "0" else False  # None: on for CPU

_M_TOP_PAD, _M_MMAP_MAX = -2, -4  # glibc's mallopt parameter numbers
_DEFAULT_MMAP_MAX, _DEFAULT_TOP_PAD = 65536, 128 * 1024
_MAX_PAD = 2**31 - 1  # mallopt takes an int
_MARGIN = 64 * 2**20  # room for what is allocated next to the step buffer (batches, metrics)
_reserved = 0


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def dispatch_inline() -> bool:
    """Run JAX's CPU computations on the calling thread; True if set. Call it before the CPU backend starts.

    Only the CPU backend's dispatch changes (accelerators keep theirs), and only
    where glibc's heap is managed here; once the backend has started it has no effect.
    """
    if RESERVE is False or _libc() is None:
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def runs_inline() -> bool:
    """True where CPU computations run on the calling thread (``dispatch_inline`` took effect)."""
    return jax.default_backend() == "cpu" and not jax.config.read("jax_cpu_enable_async_dispatch")


def settle(tree):
    """``tree`` once its arrays have arrived, where dispatch is inline (a no-op elsewhere).

    A step called with inputs that are still arriving would be queued for a
    worker thread, and every step after it too (module docstring).
    """
    if runs_inline():
        jax.block_until_ready(tree)
    return tree


def reserve(nbytes: int) -> int:
    """Keep at least ``nbytes`` (+ a margin) of freed heap mapped; returns the pad now in force (0: not applied)."""
    global _reserved
    on = jax.default_backend() == "cpu" if RESERVE is None else RESERVE
    if not on or nbytes <= 0:
        return _reserved
    pad = min(int(nbytes) + _MARGIN, _MAX_PAD)
    if pad <= _reserved:
        return _reserved
    libc = _libc()
    if libc is None or libc.mallopt(_M_TOP_PAD, pad) != 1:  # not glibc: leave the allocator alone
        log.debug("host_memory.reserve: mallopt unavailable; heap left as is")
        return _reserved
    libc.mallopt(_M_MMAP_MAX, 0)
    _reserved = pad
    log.info("host heap: keeping %.0f MiB of freed memory mapped between steps", pad / 2**20)
    return _reserved


def restore() -> None:
    """Back to glibc's defaults: large blocks mapped on their own, a 128 KiB top pad."""
    global _reserved
    libc = _libc()
    if libc is not None and _reserved:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD)
    _reserved = 0


def reserve_for(compiled: jax.stages.Compiled) -> int:
    """``reserve`` the temporary buffer of a compiled XLA executable (``jit(f).lower(...).compile()``)."""
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # some backends have no memory analysis
        return _reserved
    return reserve(temp)
