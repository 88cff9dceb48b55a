"""float32 matmul speed of XLA (``jax.jit(jnp.dot)``), OpenBLAS (numpy) and PyTorch, on 1 core and on all.

    python benchmarks/matmul.py [--shapes 768x128x384,768x512x128,128x768x512] [--calls 200]

The shapes are the shakespeare_char step's (``[B*T, D] x [D, 3D]`` and its gradients). Each
count of cores runs in a fresh process pinned to the first N cores (``os.sched_setaffinity``
before any library starts its threads); each figure is the best of 3 loops of ``--calls``
calls, so one call's dispatch is included. ``xla_chain`` runs 10 products in one jitted
call, each waiting for the one before, as in a train step: no dispatch between them. Prints GFLOP/s per library and the speed-up from
one core to all of them (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


LIBS = ("xla", "xla_chain", "openblas", "pytorch")


def _measure(shapes: list[tuple[int, int, int]], calls: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))

    def best(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls)
        return min(times)

    dot = jax.jit(jnp.dot)
    chained = 10

    @jax.jit
    def chain(a, b):  # products that each wait for the one before (a scalar of it), as in a layer stack
        c = jnp.dot(a, b)
        for _ in range(chained - 1):
            c = jnp.dot(a * (1.0 + 1e-30 * c[0, 0]), b)
        return c

    out = {}
    for m, k, n in shapes:
        rng = np.random.default_rng(0)
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * k * n
        out[f"{m}x{k}x{n}"] = {
            "xla": flops / best(lambda: dot(ja, jb).block_until_ready()) / 1e9,
            "xla_chain": chained * flops / best(lambda: chain(ja, jb).block_until_ready()) / 1e9,
            "openblas": flops / best(lambda: a @ b) / 1e9,
            "pytorch": flops / best(lambda: ta @ tb) / 1e9,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="768x128x384,768x512x128,128x768x512")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--cores", type=int, default=0, help=argparse.SUPPRESS)  # the child process's pinning
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
        print(json.dumps(_measure(shapes, args.calls)))
        return
    cores = len(os.sched_getaffinity(0))
    runs = {}
    for n in sorted({1, cores}):
        cmd = [sys.executable, __file__, "--shapes", args.shapes, "--calls", str(args.calls), "--cores", str(n)]
        runs[n] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"GFLOP/s, float32, best of 3 x {args.calls} calls; 1 core and {cores}")
    print("| shape | " + " | ".join(f"{lib} 1 / {cores}" for lib in LIBS) + " |")
    print("|---|" + "---:|" * len(LIBS))
    for shape in runs[1]:
        cells = [f"{runs[1][shape][lib]:.0f} / {runs[cores][shape][lib]:.0f} ({runs[cores][shape][lib] / runs[1][shape][lib]:.2f}x)"
                 for lib in LIBS]  # fmt: skip
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
