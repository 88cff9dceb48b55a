"""Positional information: sinusoidal, learned, RoPE, T5 relative bias, ALiBi.

Absolute encodings (sinusoidal, learned) are added to the embeddings; RoPE
rotates queries and keys inside attention; T5 relative bias and ALiBi are
additive attention biases broadcastable to ``[B, N, T, S]``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm import sharding as sh

SINUSOID_LAYOUTS = ("interleaved", "halves")


def sinusoidal_positions(
    positions: int | Array, d_model: int, max_timescale: float = 10_000.0, layout: str = "interleaved"
) -> Array:
    """The paper's fixed encoding (§3.5), interleaved exactly as written there.

    PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    ``layout="halves"`` puts the same values as all sines first, then all cosines
    (``[sin(pos w_0) .. sin(pos w_{D/2-1}), cos(pos w_0) ..]``: tensor2tensor, fairseq, Marian).
    ``positions`` is a length (a Python or NumPy integer -> positions
    0..length-1) or an integer array of any shape ``[...]``; returns float32
    ``[..., d_model]``.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
    if layout not in SINUSOID_LAYOUTS:
        raise ValueError(f"sinusoid layout must be one of {SINUSOID_LAYOUTS}, got {layout!r}")
    pos = jnp.arange(positions) if isinstance(positions, (int, np.integer)) else jnp.asarray(positions)
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)  # 2i
    angle = pos[..., None].astype(jnp.float32) / jnp.power(max_timescale, two_i / d_model)
    if layout == "halves":
        return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    # Stack (sin, cos) on a new last axis and flatten: sin at even, cos at odd indices.
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*pos.shape, d_model)


class LearnedPositionEmbedding(nn.Module):
    """A learned table ``[max_length, D]`` (BERT, GPT-2, ViT) looked up by position."""

    max_length: int
    features: int
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        """``positions`` int ``[...]`` -> ``[..., D]``."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, (sh.POSITIONS, sh.EMBED)),
            (self.max_length, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0)


# --- RoPE -----------------------------------------------------------------------------


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> Array:
    """theta_i = base^(-2i/H) for i in [0, H/2) (RoFormer eq. 15)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: Array, positions: Array, base: float = 10_000.0) -> Array:
    """Rotary position embedding (Su et al. 2021), "rotate-half" layout (GPT-NeoX, Llama).

    ``x`` is ``[B, T, N, H]``; ``positions`` ``[B, T]`` or ``[T]``. Channel i is
    paired with channel i + H/2 and the pair is rotated by ``position * theta_i``,
    so q·k depends on the positions only through their difference. Computed in
    float32 and cast back to ``x.dtype``.
    """
    head_dim = x.shape[-1]
    freqs = rope_frequencies(head_dim, base)
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None]
    angle = pos[:, :, None, None] * freqs  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --- T5 relative position bias ---------------------------------------------------------


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Array:
    """Bucket ``key_pos - query_pos`` as in T5 (Raffel et al. 2020, Mesh TensorFlow).

    Half the buckets hold exact small distances, the other half grow
    logarithmically up to ``max_distance``; anything farther shares the last
    bucket. Bidirectional buckets split into [0, n/2) for keys at or before the
    query and [n/2, n) for keys after it; causal buckets see only the past.
    """
    rp = jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rp > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rp)
    else:
        n = jnp.maximum(-rp, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Guard log(0) for the small branch; the value there is unused.
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """T5's learned scalar bias per (bucket, head), shared by all layers of a stack."""

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        """Positions ``[T]``/``[S]`` (-> ``[1, N, T, S]``) or ``[B, T]``/``[B, S]`` (-> ``[B, N, T, S]``)."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, (sh.RELPOS_BUCKETS, sh.HEADS)),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        q, k = jnp.asarray(q_positions), jnp.asarray(k_positions)
        if q.ndim == 1:
            q, k = q[None], k[None]
        rel = k[:, None, :] - q[:, :, None]  # [B, T, S]
        buckets = relative_position_bucket(
            rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = jnp.take(table, buckets, axis=0)  # [B, T, S, N]
        return jnp.transpose(bias, (0, 3, 1, 2))


# --- ALiBi -----------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> Array:
    """Head slopes of ALiBi (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the paper's recipe: the
    slopes of the nearest smaller power of two m, then every other slope of 2m.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"alibi needs num_heads >= 1, got {num_heads}")
    m = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(m)
    if m < num_heads:
        slopes += power_of_two(2 * m)[0::2][: num_heads - m]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions: Array, k_positions: Array) -> Array:
    """Linear distance penalty ``-slope_n * |t - s|``: ``[T]``/``[S]`` -> ``[1, N, T, S]``.

    On the causal region (s <= t) this is the paper's ``slope * (s - t)``;
    the symmetric form also serves bidirectional encoders.
    """
    q, k = jnp.asarray(q_positions), jnp.asarray(k_positions)
    if q.ndim == 1:
        q, k = q[None], k[None]
    dist = jnp.abs(q[:, :, None] - k[:, None, :]).astype(jnp.float32)  # [B, T, S]
    return -alibi_slopes(num_heads)[None, :, None, None] * dist[:, None]


__all__ = [
    "LearnedPositionEmbedding",
    "RelativePositionBias",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "relative_position_bucket",
    "rope_frequencies",
    "sinusoidal_positions",
]
