"""Train-step speed of decoder-only models, and compile time against depth (scan vs unrolled).

    python benchmarks/train_step.py speed   [--sizes tiny,small,1b] [--dtype float32|bfloat16] [--attention flash]
                                            [--remat none|full|dots_saveable]
    python benchmarks/train_step.py compile [--depths 4,12,48]
    python benchmarks/train_step.py remat   [--policies none,full,dots_saveable] [--size remat]

``speed``: compile time, median step time, tokens/s and (where the device's peak
FLOP/s is known, or given with --peak_flops) MFU of one full training step —
forward, backward, AdamW — through the same ``Trainer`` the CLI uses.
``compile``: time to compile that step for a d_model=256 decoder at each depth,
with the layers scanned (``nn.scan``) and unrolled.
``remat``: for each rematerialisation policy, the memory XLA plans for the
compiled step (``memory_analysis``: temporaries, i.e. the activations kept for
the backward pass and the scratch space) and the median step time.

Prints a Markdown table; figures in README come from running this.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax

from tfm import config as config_lib
from tfm import metrics as metrics_lib
from tfm.trainer import Trainer

# name: (d_model, heads, layers, d_ff, vocab, seq_len, batch)
SIZES = {
    "tiny": (128, 4, 4, 512, 256, 128, 16),
    "small": (768, 12, 12, 3072, 32000, 512, 8),  # GPT-2 small shape, 32k vocab
    "1b": (2048, 16, 18, 8192, 32000, 1024, 8),  # ~1.0 B parameters
    "remat": (512, 8, 8, 2048, 8192, 512, 8),  # a small decoder with long-ish rows: activations dominate
}


def decoder_config(d, heads, layers, d_ff, vocab, seq, batch, *, dtype="float32", scan=True, remat="none",
                   attention="full"):  # fmt: skip
    c = config_lib.default_config()
    c.model.preset = "gpt_tiny"
    with c.model.ignore_type():
        c.model.update(dict(vocab_size=vocab, max_len=seq, d_model=d, num_heads=heads, num_layers=layers, d_ff=d_ff,
                            dtype=dtype, scan_layers=scan, remat_policy=remat, attention=attention))  # fmt: skip
    c.data.name = "synthetic_lm"
    with c.data.ignore_type():
        c.data.update(dict(vocab_size=vocab, seq_len=seq))
    c.data.batch_size = batch
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.mesh.data = -1
    return c


def compiled_step_time(trainer, steps):
    """Compile the trainer's step, warm it up, time ``steps`` more -> (step, state, compile s, median s)."""
    state = trainer.init_state()
    it = trainer.dataset.iterator("train")
    batch = trainer.place(next(it))
    t0 = time.perf_counter()
    step = trainer.compile_step(state, batch)
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        batch = trainer.place(next(it))
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return step, state, compile_s, statistics.median(times)


def bench_speed(name, dims, *, dtype, steps, peak, batch=None, seq=None, attention="full", remat="none"):
    d, h, L, f, v, s, b = dims
    s, b = seq or s, batch or b
    trainer = Trainer(decoder_config(d, h, L, f, v, s, b, dtype=dtype, attention=attention, remat=remat))
    n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    _, state, compile_s, t = compiled_step_time(trainer, steps)
    flops = trainer.task.flops_per_step(trainer.model_config, state.params, {"inputs": (b, s)})
    n_dev = len(jax.devices())
    peak = peak or metrics_lib.peak_flops()
    mfu = f"{flops / t / (peak * n_dev):.1%}" if peak else "n/a"
    return (f"| {name} | {n_params / 1e6:,.1f} M | {b}x{s} | {dtype} | {compile_s:.1f} | {t * 1000:,.1f} | "
            f"{b * s / t:,.0f} | {flops / t / 1e12:.3f} | {mfu} |")  # fmt: skip


def bench_remat(policy, dims, *, steps):
    d, h, L, f, v, s, b = dims
    step, _, _, t = compiled_step_time(Trainer(decoder_config(d, h, L, f, v, s, b, remat=policy)), steps)
    mem = step.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20
    args = getattr(mem, "argument_size_in_bytes", float("nan")) / 2**20
    return f"| {policy} | {temp:,.0f} | {args:,.0f} | {t * 1000:,.0f} |"


def bench_compile(depth, scan):
    trainer = Trainer(decoder_config(256, 4, depth, 1024, 1024, 128, 8, scan=scan))
    state = trainer.init_state()
    batch = trainer.place(next(trainer.dataset.iterator("train")))
    t0 = time.perf_counter()
    trainer.compile_step(state, batch)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["speed", "compile", "remat"])
    p.add_argument("--policies", default="none,full,dots_saveable")
    p.add_argument("--size", default="remat", help="the model of the remat table (a --sizes name)")
    p.add_argument("--sizes", default="tiny,small,1b")
    p.add_argument("--depths", default="4,12,48")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="override the per-size batch")
    p.add_argument("--seq", type=int, default=None, help="override the per-size sequence length")
    p.add_argument("--peak_flops", type=float, default=0.0, help="per-device peak FLOP/s for MFU")
    p.add_argument("--attention", default="full", help="speed: the attention kind (flash: cuDNN's kernel on a GPU)")
    p.add_argument("--remat", default="none", help="speed: the rematerialisation policy")
    args = p.parse_args()
    dev = jax.devices()[0]
    print(
        f"device: {len(jax.devices())} x {dev.device_kind} ({dev.platform}); host {platform.processor() or platform.machine()}"
    )
    if args.what == "speed":
        print("| model | params | batch x seq | compute | compile s | step ms | tokens/s | model TFLOP/s | MFU |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.sizes.split(","):
            print(bench_speed(name, SIZES[name], dtype=args.dtype, steps=args.steps, peak=args.peak_flops,
                              batch=args.batch, seq=args.seq, attention=args.attention, remat=args.remat),
                  flush=True)  # fmt: skip
    elif args.what == "remat":
        d, h, L, f, v, seq, b = SIZES[args.size]
        print(f"decoder d {d}, {L} layers, d_ff {f}, vocab {v}, batch {b} x {seq}, float32, AdamW\n")
        print("| remat policy | temporaries MiB | arguments MiB (params, optimizer state, batch) | step ms |")
        print("|---|---|---|---|")
        for policy in args.policies.split(","):
            print(bench_remat(policy, SIZES[args.size], steps=args.steps), flush=True)
    else:
        print("| layers | compile s, scanned | compile s, unrolled |")
        print("|---|---|---|")
        for depth in (int(x) for x in args.depths.split(",")):
            print(f"| {depth} | {bench_compile(depth, True):.1f} | {bench_compile(depth, False):.1f} |", flush=True)


if __name__ == "__main__":
    main()
