"""What a routed MoE layer costs against a dense FFN of the same expert size.

    python benchmarks/moe.py [--tokens 8x512] [--d_model 512] [--d_ff 2048] [--experts 8] [--top_k 2]

Times forward + backward (``jax.grad`` of a scalar of the output, jitted) of

- the dense FFN ``D -> F -> D``,
- top-k-of-E MoE with capacity dispatch (capacity factor 1.0 and 1.25),
- top-k-of-E MoE, dropless (sort + ``jax.lax.ragged_dot``),

and prints a Markdown table: XLA's FLOP count of the compiled program
(``cost_analysis``), the analytic FLOPs of the expert matmuls, the median time
and both relative to dense. The promise of MoE: E experts' parameters for about
k times the dense compute, not E times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfm.layers.feedforward import MLP
from tfm.layers.moe import MoE


def measure(module, x, repeats):
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])

    def loss(p, x):
        y, _ = module.apply({"params": p}, x, mutable=["aux_loss", "moe_stats"])
        return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    return flops, statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8x512", help="BxT")
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--d_ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    b, t = map(int, args.tokens.split("x"))
    d, f, e, k = args.d_model, args.d_ff, args.experts, args.top_k
    x = jax.random.normal(jax.random.key(1), (b, t, d))
    n = b * t
    # Expert matmuls, forward + backward (x3): 2 matmuls of 2*D*F FLOPs per token and chosen expert.
    dense_matmul = 3 * 2 * 2 * n * d * f
    rows = [
        ("dense FFN", MLP(f, activation="relu", use_bias=False), dense_matmul),
        (f"top-{k}-of-{e}, capacity 1.0", MoE(e, f, top_k=k, capacity_factor=1.0), k * dense_matmul),
        (f"top-{k}-of-{e}, capacity 1.25", MoE(e, f, top_k=k, capacity_factor=1.25), 1.25 * k * dense_matmul),
        (f"top-{k}-of-{e}, dropless", MoE(e, f, top_k=k, dispatch="dropless"), k * dense_matmul),
    ]
    dev = jax.devices()[0]
    print(f"{b}x{t} tokens, D {d}, F {f}; forward + backward; {dev.platform} ({dev.device_kind}), {platform.machine()}\n")
    print("| layer | params | expert-matmul GFLOP | XLA GFLOP | vs dense | time ms | vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_flops = base_time = None
    for name, module, analytic in rows:
        n_params = sum(v.size for v in jax.tree.leaves(nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))))
        flops, secs = measure(module, x, args.repeats)
        base_flops, base_time = base_flops or flops, base_time or secs
        print(f"| {name} | {n_params / 1e6:.1f} M | {analytic / 1e9:.1f} | {flops / 1e9:.1f} | {flops / base_flops:.2f}x | "
              f"{secs * 1e3:.1f} | {secs / base_time:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
