"""tfm.host_memory: a freed step-sized block is reused without faulting its pages in again."""

import ctypes
import os
import resource

import jax
import pytest

from tfm import config as config_lib
from tfm import host_memory
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 48 * 2**20  # the shakespeare_char step's temporary buffer


def write_a_block():
    """malloc, write and free a BLOCK, as XLA's CPU runtime does with a step's temporary buffer."""
    libc = host_memory._libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(BLOCK)
    ctypes.memset(p, 1, BLOCK)
    libc.free(p)


def faults_of_two_blocks() -> int:
    """Minor page faults of the second of two blocks written one after the other."""
    write_a_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    write_a_block()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture
def glibc_defaults():
    if host_memory._libc() is None:
        pytest.skip("not glibc: tfm.host_memory leaves the allocator alone")
    host_memory.restore()
    yield
    host_memory.restore()


def test_reserving_the_heap_stops_the_step_buffer_refaulting(glibc_defaults):
    pages = BLOCK // os.sysconf("SC_PAGE_SIZE")
    mapped_each_time = faults_of_two_blocks()
    if mapped_each_time < pages // 2:
        pytest.skip(f"this kernel maps {BLOCK >> 20} MiB with {mapped_each_time} faults (huge pages): nothing to save")
    assert host_memory.reserve(BLOCK) >= BLOCK
    faults_of_two_blocks()  # the first block after the reservation grows the heap
    assert faults_of_two_blocks() < pages // 20, "a freed block was unmapped and had to be faulted in again"


def test_reserve_only_grows_and_can_be_switched_off(glibc_defaults, monkeypatch):
    first = host_memory.reserve(BLOCK)
    assert host_memory.reserve(BLOCK // 2) == first  # a smaller step keeps the larger pad
    assert host_memory.reserve(2 * BLOCK) > first
    host_memory.restore()
    monkeypatch.setattr(host_memory, "RESERVE", False)
    assert host_memory.reserve(BLOCK) == 0


def test_the_trainer_reserves_its_compiled_step(glibc_defaults):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "shakespeare_char.py:tiny"))
    c = config_lib.apply_overrides(c, ["mesh.data=1", "train.progress=none", "train.tensorboard=false"])
    c.data = config_lib.ml_collections.ConfigDict(dict(name="synthetic_lm", batch_size=8, vocab_size=65, seq_len=32))
    trainer = Trainer(c, devices=jax.devices()[:1])
    state, batch = trainer.init_state(), trainer.place(next(trainer.dataset.iterator("train")))
    step = trainer.compile_step(state, batch)
    assert trainer.compile_step(state, batch) is step  # compiled once per batch shape
    temp = step.memory_analysis().temp_size_in_bytes
    expected = jax.default_backend() == "cpu"
    assert (host_memory._reserved >= temp) == expected


_BIG_STEP = """
import resource, sys
import jax, jax.numpy as jnp
from tfm import host_memory
if sys.argv[1] == "inline":
    assert host_memory.dispatch_inline()
def f(x):
    ys = [jnp.sin(x * i) for i in range(1, 9)]  # eight 16 MiB temporaries alive at once: 128 MiB
    return sum(jnp.sum(y @ ys[0]) for y in ys)
x = jnp.ones((2048, 2048), jnp.float32)
compiled = jax.jit(f).lower(x).compile()
host_memory.reserve_for(compiled)
for _ in range(2):
    jax.block_until_ready(compiled(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(compiled(x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_inline_dispatch_keeps_a_buffer_over_64_mib_mapped(glibc_defaults):
    """Above a thread arena's 64 MiB the buffer is mapped afresh every call unless the call runs on the main thread."""
    import subprocess
    import sys

    if jax.default_backend() != "cpu":
        pytest.skip("CPU dispatch only")

    def faults(mode):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        out = subprocess.run([sys.executable, "-c", _BIG_STEP, mode], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    pages = 128 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    asynchronous = faults("async")
    if asynchronous < pages // 2:
        pytest.skip(f"this machine maps the buffer with {asynchronous} faults (huge pages): nothing to save")
    assert faults("inline") < pages // 20


_LOOP_READINESS = """
import json, os, sys, tempfile
import jax
import numpy as np
from tfm import config as config_lib, host_memory
import tfm.loop as loop_lib
assert host_memory.dispatch_inline()
from tfm.trainer import Trainer

ready = []
step_fn = loop_lib.Loop._step_fn
def recording(self, state, batch, step):
    fn, cost = step_fn(self, state, batch, step)
    def call(state, batch):
        out = fn(state, batch)
        ready.append(all(x.is_ready() for x in jax.tree.leaves(out)))  # ran on this thread, before returning
        return out
    return call, cost
loop_lib.Loop._step_fn = recording

# Each placed batch arrives late: it waits for a 64 MiB copy that the CPU client makes on another thread (the
# source is 4 bytes past a 64-byte boundary, so it cannot be aliased), as a large unaligned batch of its own does.
slow = np.empty(64 * 2**20 + 128, np.uint8)[4:4 + 64 * 2**20]
after = jax.jit(lambda v, _: v + 0, keep_unused=True)
make = jax.make_array_from_process_local_data
jax.make_array_from_process_local_data = lambda *a, **k: after(make(*a, **k), jax.device_put(slow))
c = config_lib.load_config(os.path.join(sys.argv[1], "configs", "shakespeare_char.py:tiny"))
c = config_lib.apply_overrides(c, ["mesh.data=1", "train.progress=none", "train.tensorboard=false", "model.max_len=32",
                                   "model.d_model=16", "model.num_heads=2", "model.num_layers=1", "model.d_ff=32",
                                   "train.steps=8", "train.eval_every=0", "train.checkpoint_every=100"])
c.data = config_lib.ml_collections.ConfigDict(dict(name="synthetic_lm", batch_size=8, vocab_size=65, seq_len=32))
Trainer(c, tempfile.mkdtemp(), devices=jax.devices()[:1]).train()
print(json.dumps(ready))
"""


def test_the_loop_keeps_cpu_steps_on_the_calling_thread():
    """A step called before its batch has arrived is queued for a worker thread, and so is every step after it (its
    state arrives late): the placed batch is waited for, so each step runs inline and returns its results."""
    import json
    import subprocess
    import sys

    if jax.default_backend() != "cpu" or host_memory._libc() is None:
        pytest.skip("CPU dispatch with glibc only")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", _LOOP_READINESS, ROOT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    ready = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(ready) == 8 and all(ready), ready
