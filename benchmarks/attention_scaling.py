"""How attention's time and memory grow with sequence length: O(T^2) full vs O(T) local/linear.

    python benchmarks/attention_scaling.py [--lengths 1024,2048,4096,8192,16384]
        [--kinds full,local,linear] [--window 256] [--heads 4] [--head_dim 64]
        [--batch 1] [--repeats 5] [--dtype float32|bfloat16]
        [--plot results/attention_scaling.png] [--gpu_flash]

For each kind (any of ``full, local, block_sparse, linear, flash``) and each
length T, the causal forward pass ``attention(kind, q, k, v, causal=True)`` on
``[B, T, N, H]`` inputs is jitted and compiled once, then timed over
``--repeats`` runs (median, ``block_until_ready``; compilation excluded).
Memory comes from XLA's ``compiled.memory_analysis()``: *temp* is the scratch
the computation allocates (where a ``[T, T]`` score matrix shows up), *total*
adds the argument and output buffers. ``local`` uses ``--window``;
``block_sparse`` uses ``--window`` as its block size with one neighbouring
block and ``--global_tokens`` global tokens.

A kind whose score matrix would obviously not fit (``full`` — and ``flash``
where it falls back to the XLA path — needs about ``B*N*T*T*4*3`` bytes) is
reported as ``skipped (needs X GiB)`` instead of being run.

Prints a Markdown table, and with ``--plot`` saves a log-log figure of time and
temp memory against T with T and T^2 guide lines (needs matplotlib; skipped
with a message otherwise). ``--gpu_flash`` adds, on a GPU, a comparison at
T=8192 of ``flash`` (cuDNN, bfloat16) against ``full`` (XLA, bfloat16).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfm.layers.attention_kinds import ATTENTION_KINDS, attention

GiB = 1024**3
MiB = 1024**2


def available_bytes() -> int | None:
    """Memory the default device can still give: GPU/TPU allocator limit, else the host's MemAvailable."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def quadratic_bytes(kind: str, batch: int, heads: int, length: int) -> int:
    """Rough need of the paths that materialize ``[B, N, T, T]`` float32 scores (scores, weights, one more)."""
    quadratic = kind == "full" or (kind == "flash" and jax.default_backend() not in ("gpu", "cuda", "tpu"))
    return batch * heads * length * length * 4 * 3 if quadratic else 0


def make_inputs(batch, length, heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, length, heads, head_dim)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3))


def measure(kind, q, k, v, *, repeats, **kw):
    """(median seconds, temp bytes, total bytes) of the compiled causal forward pass."""
    fn = jax.jit(lambda q, k, v: attention(kind, q, k, v, causal=True, **kw))
    compiled = fn.lower(q, k, v).compile()
    temp = total = None
    analysis = compiled.memory_analysis()
    if analysis is not None:
        temp = analysis.temp_size_in_bytes
        total = temp + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    compiled(q, k, v).block_until_ready()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(q, k, v).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp, total


def _mib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / MiB:.1f}"


def kind_options(kind, args):
    if kind == "local":
        return {"window": args.window}
    if kind == "block_sparse":
        return {"block_size": args.window, "global_tokens": args.global_tokens}
    return {}


def run_scaling(args):
    dtype = jnp.dtype(args.dtype)
    free = available_bytes()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), B={args.batch} N={args.heads} "
          f"H={args.head_dim} dtype={args.dtype} window={args.window}, causal; median of {args.repeats} runs")  # fmt: skip
    print("memory: temp = XLA scratch buffers; total = temp + arguments + output (compiled.memory_analysis())\n")
    print("| kind | T | time ms | temp memory MiB | total memory MiB |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for kind in args.kinds:
        for length in args.lengths:
            need = quadratic_bytes(kind, args.batch, args.heads, length)
            if free is not None and need > free:
                print(f"| {kind} | {length} | skipped (needs {need / GiB:.1f} GiB) | | |", flush=True)
                continue
            q, k, v = make_inputs(args.batch, length, args.heads, args.head_dim, dtype)
            seconds, temp, total = measure(kind, q, k, v, repeats=args.repeats, **kind_options(kind, args))
            results.setdefault(kind, []).append((length, seconds, temp))
            print(f"| {kind} | {length} | {seconds * 1e3:.2f} | {_mib(temp)} | {_mib(total)} |", flush=True)
            del q, k, v
    return results


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, rows in results.items():
        lengths = np.array([r[0] for r in rows], float)
        ax_time.loglog(lengths, [r[1] * 1e3 for r in rows], "o-", label=kind)
        mems = [(r[0], r[2] / MiB) for r in rows if r[2]]
        if mems:
            ax_mem.loglog(*zip(*mems), "o-", label=kind)
    all_lengths = sorted({r[0] for rows in results.values() for r in rows})
    if len(all_lengths) > 1:
        t = np.array(all_lengths, float)
        for ax in (ax_time, ax_mem):
            lo, hi = ax.get_ylim()
            ref = np.sqrt(lo * hi)  # anchor the guides mid-plot at the smallest T
            ax.loglog(t, ref * t / t[0], "k:", lw=1, label="∝ T")
            ax.loglog(t, ref * (t / t[0]) ** 2, "k--", lw=1, label="∝ T²")
    ax_time.set(xlabel="sequence length T", ylabel="forward time (ms)", title="time")
    ax_mem.set(xlabel="sequence length T", ylabel="temp memory (MiB)", title="XLA temp memory")
    for ax in (ax_time, ax_mem):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def run_gpu_flash(args, length=8192):
    if not any(d.platform == "gpu" for d in jax.devices()):
        print("\n--gpu_flash: no GPU is present; skipping the cuDNN flash vs XLA comparison")
        return
    # cuDNN's flash kernel takes fp16/bf16 only; both paths get the same bf16 inputs.
    q, k, v = make_inputs(args.batch, length, args.heads, args.head_dim, jnp.bfloat16)
    # Causal attention: QK^T and PV, 2 flops per multiply-add, half the matrix.
    flops = 2 * 2 * args.batch * args.heads * length * length * args.head_dim / 2
    print(f"\nflash (cuDNN) vs full (XLA) at T={length}, bfloat16, causal:\n")
    print("| kind | time ms | TFLOP/s | tokens/s |")
    print("|---|---:|---:|---:|")
    for kind in ("full", "flash"):
        seconds, _, _ = measure(kind, q, k, v, repeats=args.repeats)
        print(f"| {kind} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.1f} | {args.batch * length / seconds:,.0f} |")


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int_list, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["full", "local", "linear"])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--global_tokens", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--plot", default=None, help="save a log-log plot here, e.g. results/attention_scaling.png")
    p.add_argument("--gpu_flash", action="store_true", help="compare cuDNN flash with XLA at T=8192 on a GPU")
    args = p.parse_args(argv)
    unknown = [k for k in args.kinds if k not in ATTENTION_KINDS]
    if unknown:
        p.error(f"unknown --kinds {unknown}; choose from {ATTENTION_KINDS}")

    # Show the one-line notice flash_attention logs when it falls back to the XLA path.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("tfm.layers.flash_attention").setLevel(logging.INFO)

    results = run_scaling(args)
    if args.plot:
        plot(results, args.plot)
    if args.gpu_flash:
        run_gpu_flash(args)


if __name__ == "__main__":
    main()
