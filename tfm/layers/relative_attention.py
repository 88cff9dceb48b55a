"""Transformer-XL attention over ``[memory; current]`` with relative positions (Dai et al. 2019, §3.3).

For query ``i`` of the current segment (absolute position ``M + i`` after ``M`` memory
positions) and key ``j`` of ``[memory; current]``, the score is the paper's

    A_ij = q_i·k_j + q_i·W_R R_{i-j} + u·k_j + v·W_R R_{i-j}
         = (q_i + u)·k_j + (q_i + v)·r_{i-j},        r_d = W_R R_d,

scaled by ``1/sqrt(H)`` and masked to ``i - j >= 0`` (nothing later than the query). ``R_d`` is
the sinusoid of the distance ``d`` (sines then cosines, as the paper's code), ``u`` and ``v``
are learned per head, shared by every position. The keys never carry an absolute position, so
the same parameters read a memory of any length: the last ``M`` hidden states of the previous
segment, whose gradient the caller stops.

The distance term is computed once per distance ``d = 0 .. S-1`` (``[B, N, T, S]``) and gathered
into place (``d = M + i - j``), the same numbers as the paper's "relative shift".

Shapes (legend of ``tfm.layers.dot_product``): ``x [B, T, D]``, ``memory [B, M, D]``, heads
``[B, T, N, H]``. Parameters: ``query``, ``key``, ``value`` ``/kernel [D, N, H]``, ``relative/kernel
[D, N, H]`` (W_R), ``out/kernel [N, H, D]``, ``u_bias`` and ``v_bias`` ``[N, H]``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.linear import Einsum, Initializer, as_dtype
from tfm.layers.position import sinusoidal_positions


def relative_scores(q: Array, k: Array, r: Array, u: Array, v: Array, memory_length: int) -> Array:
    """``[B, N, T, S]`` unscaled scores ``(q_i + u)·k_j + (q_i + v)·r_{M+i-j}`` (distances < 0 read ``r_0``;
    the caller masks them). ``q [B, T, N, H]``, ``k [B, S, N, H]``, ``r [S, N, H]`` (``r[d]`` for distance d)."""
    t, s = q.shape[1], k.shape[1]
    content = jnp.einsum("btnh,bsnh->bnts", q + u, k)
    by_distance = jnp.einsum("btnh,dnh->bntd", q + v, r)  # [B, N, T, S]: column d is distance d
    distance = memory_length + jnp.arange(t)[:, None] - jnp.arange(s)[None, :]  # [T, S]
    index = jnp.broadcast_to(jnp.clip(distance, 0, s - 1), by_distance.shape)
    return content + jnp.take_along_axis(by_distance, index, axis=-1)


class RelativeMultiHeadAttention(nn.Module):
    """``x [B, T, D]`` attending over ``[memory; x]`` -> ``[B, T, D]``, causal, with relative positions."""

    num_heads: int
    head_dim: int
    d_model: int  # D, the width of x and of the memory
    dropout_rate: float = 0.0
    kernel_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        n, h, d = self.num_heads, self.head_dim, self.d_model

        def proj():
            return Einsum((d, n, h), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), kernel_init=self.kernel_init, dtype=self.dtype,
                          param_dtype=self.param_dtype)  # fmt: skip

        self.query, self.key, self.value, self.relative = proj(), proj(), proj(), proj()
        self.out = Einsum((n, h, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), in_axis=(0, 1), out_axis=-1,
                          kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)  # fmt: skip
        bias_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.HEADS, sh.HEAD_DIM))
        self.u_bias = self.param("u_bias", bias_init, (n, h), self.param_dtype)
        self.v_bias = self.param("v_bias", bias_init, (n, h), self.param_dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, x: Array, memory: Array | None = None, *, mask: Array | None = None,
                 deterministic: bool = True) -> Array:  # fmt: skip
        """``mask``: optional boolean ``[B, 1, 1, S]`` over ``[memory; x]`` (``False`` = an empty memory slot)."""
        t, d, h = x.shape[1], x.shape[2], self.head_dim
        context = x if memory is None else jnp.concatenate([memory.astype(x.dtype), x], axis=1)
        s, m = context.shape[1], context.shape[1] - t
        q = self.query("btd,dnh->btnh", x)
        k = self.key("bsd,dnh->bsnh", context)
        v_heads = self.value("bsd,dnh->bsnh", context)
        # R_d for the distances 0..S-1, sines then cosines (the paper's code), projected by W_R.
        rel = sinusoidal_positions(jnp.arange(s), d, layout="halves").astype(self.dtype)
        r = self.relative("sd,dnh->snh", rel)
        u, v = self.u_bias.astype(self.dtype), self.v_bias.astype(self.dtype)

        scores = relative_scores(q, k, r, u, v, m).astype(jnp.float32) / math.sqrt(h)
        allowed = (m + jnp.arange(t)[:, None]) >= jnp.arange(s)[None, :]  # key j is not after query i
        allowed = allowed[None, None] if mask is None else allowed[None, None] & mask
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        weights = self.dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bnts,bsnh->btnh", weights, v_heads)
        return self.out("btnh,nhd->btd", out)

    def content_attention(self, x: Array, context: Array, mask: Array) -> Array:
        """``softmax(q·k / sqrt(H))·v`` of ``x [B, T, D]`` over ``context [B, S, D]`` (keys where ``mask [B, S]``),
        per head ``[B, T, N, H]``: this layer's projections with their gradient stopped, no positions.

        What the Compressive Transformer's attention-reconstruction loss compares
        (``tfm.layers.compression``): it trains the compression, never the attention.
        """
        frozen = [jax.lax.stop_gradient(as_dtype(p.kernel, self.dtype)) for p in (self.query, self.key, self.value)]
        q = jnp.einsum("btd,dnh->btnh", x.astype(self.dtype), frozen[0])
        k = jnp.einsum("bsd,dnh->bsnh", context.astype(self.dtype), frozen[1])
        v = jnp.einsum("bsd,dnh->bsnh", context.astype(self.dtype), frozen[2])
        scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1).astype(self.dtype), v)


__all__ = ["RelativeMultiHeadAttention", "relative_scores"]
