"""One attention layer's core, forward and backward: tfm's XLA path against PyTorch's CPU kernel, side by side.

    python benchmarks/attention_vs_pytorch.py [--shapes shakespeare,wide,multi30k,fashion] [--rounds 3] [--calls N]
        [--out results/attention_vs_pytorch.json]

tfm's side is ``tfm.layers.dot_product.dot_product_attention`` as its self-attention
calls it (a dense mask; ``causal=True`` for the decoder shapes), jitted with its
gradient, twice: as it runs by default on one CPU device, through the fused native
kernel (``tfm.layers.cpu_attention``), and through the XLA path
(``tuning.CPU_ATTENTION = False``: einsums and softmax, by query blocks when causal).
PyTorch's side is ``F.scaled_dot_product_attention`` (its fused CPU flash kernel) and
``backward``. All get the same ``[B, T, N, H]`` float32 query, key, value and
output gradient; the script checks that outputs and input gradients agree
(``max_abs_diff``, the largest over both tfm paths), so they compute the same thing.
The three alternate for ``--rounds`` rounds of ``--calls`` calls (after a warm-up);
medians are printed and written to ``--out``.

It also times the batched product of the scores (``Q K^T`` per batch row and
head, ``[B*N, T, H] x [B*N, H, T]``) alone: ``jnp.einsum`` in XLA against
``torch.bmm``, in GFLOP/s. The shapes are those of ``benchmarks/vs_pytorch.py``
(shakespeare, wide) and of the Multi30k ``:cpu`` encoder and the Fashion-MNIST
ViT (not causal). It compares CPU kernels: where JAX runs on an accelerator it stops with a
one-line message (``JAX_PLATFORMS=cpu`` runs it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tfm import host_memory  # noqa: E402
from tfm.layers import cpu_attention, tuning  # noqa: E402
from tfm.layers.dot_product import dot_product_attention  # noqa: E402
from vs_pytorch import machine_line  # noqa: E402

# (B, T, N, H, causal)
SHAPES = {
    "shakespeare": (12, 64, 4, 32, True),
    "wide": (8, 256, 8, 64, True),
    "multi30k": (64, 48, 4, 32, False),
    "fashion": (128, 17, 4, 16, False),
}


def _rounds(fns: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call of each ``fns[name]()``, the names alternating round by round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def _both_paths(fn, *args) -> dict:
    """``fn`` compiled for ``args`` through the CPU kernel (``"tfm"``) and through XLA's path (``"tfm_xla"``)."""
    paths = {}
    for name, kernel in (("tfm", True), ("tfm_xla", False)):
        tuning.CPU_ATTENTION = kernel  # read when fn is traced: a new function each time, so no trace is reused
        paths[name] = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
        if ("tfm_attention_cpu_forward" in paths[name].as_text()) != kernel:
            raise SystemExit(f"attention_vs_pytorch: the {name} side did not take the path it was set to")
    tuning.CPU_ATTENTION = None
    return paths


# Few query rows against many keys, forward only: decoding steps over a cache (B, T, S, N, K, H).
DECODE_SHAPES = {
    "decode": (4, 1, 1024, 8, 8, 64),
    "decode_gqa": (1, 1, 2048, 16, 4, 128),
    "chunk": (8, 16, 512, 8, 8, 64),
}


def bench_forward(name: str, rounds: int, calls: int, torch) -> dict:
    """Forward only, a padding mask over the keys: the kernel, the XLA path and PyTorch's SDPA."""
    b, t, s, n, k, h = DECODE_SHAPES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    kv = [rng.standard_normal((b, s, k, h)).astype(np.float32) for _ in range(2)]
    valid = np.arange(s)[None, :] < (s - np.arange(b)[:, None] * 7)  # some padding at the end of each row
    jq, jk, jv, jm = jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.asarray(valid)[:, None, None, :]

    paths = _both_paths(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m), jq, jk, jv, jm)
    g = n // k
    tq = torch.from_numpy(q).transpose(1, 2).contiguous()
    tk, tv = (torch.from_numpy(x).transpose(1, 2).repeat_interleave(g, dim=1).contiguous() for x in kv)
    tm = torch.from_numpy(valid)[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
        with torch.no_grad():
            return sdpa(tq, tk, tv, attn_mask=tm)

    fns = {name: (lambda fn=fn: fn(jq, jk, jv, jm).block_until_ready()) for name, fn in paths.items()}
    med = _rounds({**fns, "pytorch": torch_fwd}, rounds, calls)
    out_t = torch_fwd().transpose(1, 2).numpy()
    diff = max(float(np.abs(np.asarray(fn(jq, jk, jv, jm)) - out_t).max()) for fn in paths.values())
    return {
        "shape": name, "batch": b, "seq": t, "keys": s, "heads": n, "kv_heads": k, "head_dim": h, "calls": calls,
        "rounds": rounds, "tfm_ms": med["tfm"] * 1e3, "tfm_xla_path_ms": med["tfm_xla"] * 1e3,
        "pytorch_ms": med["pytorch"] * 1e3, "max_abs_diff": diff,
    }  # fmt: skip


def bench(name: str, rounds: int, calls: int, torch) -> dict:
    b, t, n, h, causal = SHAPES[name]
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(4))
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] if causal else jnp.ones((1, 1, t, t), bool)

    def loss(q, k, v, g):
        return jnp.sum(dot_product_attention(q, k, v, mask=mask, causal=causal) * g)

    jq, jk, jv, jg = (jnp.asarray(x) for x in (q, k, v, g))
    paths = _both_paths(jax.value_and_grad(loss, argnums=(0, 1, 2)), jq, jk, jv, jg)

    def heads(x):  # [B, T, N, H] -> PyTorch's [B, N, T, H]
        return torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_()

    tq, tk, tv = heads(q), heads(k), heads(v)
    tg = torch.from_numpy(g).transpose(1, 2).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd_bwd():
        for x in (tq, tk, tv):
            x.grad = None
        out = sdpa(tq, tk, tv, is_causal=causal)
        out.backward(tg)
        return out

    def call(fn):
        return lambda: jax.block_until_ready(fn(jq, jk, jv, jg))

    med = _rounds({**{name: call(fn) for name, fn in paths.items()}, "pytorch": torch_fwd_bwd}, rounds, calls)
    # the same computation: the loss (the output against g) and the input gradients agree
    out_t = torch_fwd_bwd().detach().transpose(1, 2).numpy()
    grads_t = [x.grad.transpose(1, 2).numpy() for x in (tq, tk, tv)]
    loss_t = float(np.sum(out_t.astype(np.float64) * g))
    diff = 0.0
    for fn in paths.values():
        loss_j, grads_j = fn(jq, jk, jv, jg)
        diffs = [abs(float(loss_j) - loss_t) / max(1.0, abs(loss_t))]
        diffs += [float(np.abs(np.asarray(a) - c).max()) for a, c in zip(grads_j, grads_t)]
        diff = max(diff, *diffs)

    # the score product alone: [B*N, T, H] x [B*N, H, T]
    a = rng.standard_normal((b * n, t, h)).astype(np.float32)
    c = rng.standard_normal((b * n, h, t)).astype(np.float32)
    bmm = jax.jit(lambda x, y: jnp.einsum("bth,bhs->bts", x, y))
    ja, jc, ta, tc = jnp.asarray(a), jnp.asarray(c), torch.from_numpy(a), torch.from_numpy(c)
    prod = _rounds({"xla": lambda: bmm(ja, jc).block_until_ready(), "pytorch": lambda: torch.bmm(ta, tc)},
                   rounds, calls)  # fmt: skip
    flops = 2 * b * n * t * t * h
    return {
        "shape": name, "batch": b, "seq": t, "heads": n, "head_dim": h, "causal": causal, "calls": calls,
        "rounds": rounds,
        "tfm_ms": med["tfm"] * 1e3, "tfm_xla_path_ms": med["tfm_xla"] * 1e3, "pytorch_ms": med["pytorch"] * 1e3,
        "speed_ratio_tfm_over_pytorch": med["pytorch"] / med["tfm"],
        "speed_ratio_tfm_xla_path_over_pytorch": med["pytorch"] / med["tfm_xla"],
        "max_abs_diff": diff,
        "scores_bmm_gflops": {"xla": flops / prod["xla"] / 1e9, "pytorch": flops / prod["pytorch"] / 1e9},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=None, help="calls per round (default: 20 for wide, 200 otherwise)")
    p.add_argument("--out", default="results/attention_vs_pytorch.json", help="JSON of the results ('' writes nothing)")
    args = p.parse_args()
    import torch

    names = args.shapes.split(",")
    for name in names:
        if name not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    host_memory.dispatch_inline()  # as python -m tfm.train does
    if jax.default_backend() != "cpu":  # PyTorch's side runs on the CPU: a ratio across devices says nothing
        raise SystemExit(f"attention_vs_pytorch compares CPU kernels, but JAX runs on {jax.default_backend()}; "
                         "run it with JAX_PLATFORMS=cpu")  # fmt: skip
    machine = machine_line(torch)
    print(f"machine: {machine}")
    if not cpu_attention.available():
        raise SystemExit("attention_vs_pytorch: the CPU attention kernel could not be built (no C++ compiler?)")
    print("| shape | B x T, N x H | causal | PyTorch ms | tfm ms (kernel) | tfm / PyTorch speed | tfm ms (XLA path) | "
          "XLA path / PyTorch | max abs diff | Q K^T bmm GFLOP/s (XLA, PyTorch) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    results = []
    for name in names:
        r = bench(name, args.rounds, args.calls or (20 if name == "wide" else 200), torch)
        results.append(r)
        bmm = r["scores_bmm_gflops"]
        print(f"| {name} | {r['batch']} x {r['seq']}, {r['heads']} x {r['head_dim']} | {r['causal']} | "
              f"{r['pytorch_ms']:.2f} | {r['tfm_ms']:.2f} | {r['speed_ratio_tfm_over_pytorch']:.2f}x | "
              f"{r['tfm_xla_path_ms']:.2f} | {r['speed_ratio_tfm_xla_path_over_pytorch']:.2f}x | "
              f"{r['max_abs_diff']:.1e} | {bmm['xla']:.0f}, {bmm['pytorch']:.0f} |",
              flush=True)  # fmt: skip
    print("\nforward only, few query rows against many keys (a padding mask):")
    print("| shape | B x T x S, N / K x H | PyTorch ms | tfm ms (kernel) | tfm ms (XLA path) | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    forward = []
    for name in DECODE_SHAPES:
        r = bench_forward(name, args.rounds, args.calls or 200, torch)
        forward.append(r)
        print(f"| {name} | {r['batch']} x {r['seq']} x {r['keys']}, {r['heads']} / {r['kv_heads']} x {r['head_dim']} | "
              f"{r['pytorch_ms']:.3f} | {r['tfm_ms']:.3f} | {r['tfm_xla_path_ms']:.3f} | {r['max_abs_diff']:.1e} |",
              flush=True)  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "host": platform.machine(), "results": results, "forward_only": forward}, f,
                      indent=2)  # fmt: skip
            f.write("\n")


if __name__ == "__main__":
    main()
