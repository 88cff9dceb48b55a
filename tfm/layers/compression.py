"""The Compressive Transformer's memory compression (Rae et al. 2019, §3).

Transformer-XL drops a layer's oldest memories when a new segment pushes them out. The
Compressive Transformer keeps them, ``rate`` times shorter: the ``E`` evicted states ``[B, E, D]``
become ``E / rate`` compressed memories through a learned compression function ``f_c``, here
the paper's best, a 1-D convolution with kernel and stride ``rate``:

    f_c(old)_g = sum_{k < rate} old_{g * rate + k} · W_k + b,      W [rate, D, D].

(The survey's alternative, a ``d -> d/4 -> d`` projection, narrows each state but keeps every
one of them, so it does not shorten the memory; the strided convolution does.)

``f_c`` is trained by the paper's attention-reconstruction loss alone (§3.2): the layer's
attention, its parameters frozen and without positions, should read the same from the
compressed memories as from the states they replace,

    L_attn = || attn(h, old) - attn(h, f_c(old)) ||²   (mean over the valid queries and heads),

with the gradient stopped into ``h``, ``old`` and the attention, so the language-model loss never
shapes the compression and the compression never shapes the model. The compressed memories a
segment makes are used by the next one, as memory, with their gradient stopped too.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.linear import Einsum, Initializer


def group_mask(mask: Array, rate: int) -> Array:
    """``[B, E] -> [B, E / rate]``: a compressed slot is real when every state it replaces is."""
    b, e = mask.shape
    return mask.reshape(b, e // rate, rate).all(axis=-1)


class Compress(nn.Module):
    """``f_c``: ``old [B, E, D] -> [B, E / rate, D]``, a convolution with kernel and stride ``rate``.

    Parameters: ``kernel [rate, D, D]``, ``bias [D]``.
    """

    rate: int
    d_model: int
    kernel_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, old: Array) -> Array:
        b, e, d = old.shape
        if e % self.rate:
            raise ValueError(f"{e} evicted memories do not split into groups of compression_rate={self.rate}")
        conv = Einsum((self.rate, d, self.d_model), (None, sh.EMBED, sh.MLP), in_axis=(0, 1), out_axis=-1, use_bias=True,
                      kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")  # fmt: skip
        return conv("bgkd,kde->bge", old.reshape(b, e // self.rate, self.rate, d))


def reconstruction_loss(attend: Callable[[Array, Array, Array], Array], h: Array, old: Array, old_mask: Array,
                        compressed: Array, compressed_mask: Array, rate: int) -> Array:  # fmt: skip
    """``L_attn`` of one layer: ``attend(h, context, mask) -> [B, T, N, H]`` is the layer's frozen attention.

    ``h [B, T, D]`` are the queries, ``old [B, E, D]`` the evicted states and ``compressed [B, E / rate, D]``
    their ``f_c``. Only the states of fully real groups are compared (``compressed_mask``), and rows
    with none count for nothing.
    """
    h, old = jax.lax.stop_gradient(h), jax.lax.stop_gradient(old)
    keep = jnp.repeat(compressed_mask, rate, axis=1) & old_mask
    target = jax.lax.stop_gradient(attend(h, old, keep))
    diff = (attend(h, compressed, compressed_mask) - target).astype(jnp.float32)
    rows = compressed_mask.any(axis=1)  # [B]
    per_row = jnp.where(rows, jnp.mean(jnp.square(diff), axis=(1, 2, 3)), 0.0)  # (a row with no keys reads nothing)
    return jnp.sum(per_row) / jnp.maximum(jnp.sum(rows), 1)


__all__ = ["Compress", "group_mask", "reconstruction_loss"]
