"""Small pieces the model families share."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DecodePositions(nn.Module):
    """Positions of the tokens in this call, continuing across calls when decoding.

    Without ``decode`` it returns ``(arange(T), arange(T))``. With ``decode``,
    the ``init`` call (made at the maximal length, like the KV cache) stores
    the key positions ``0..S_max-1`` and a counter in the ``cache`` collection;
    each later call returns the T query positions ``counter .. counter+T-1``
    and all S_max key positions, then advances the counter.
    """

    decode: bool = False

    @nn.compact
    def __call__(self, length: int) -> tuple[Array, Array]:
        if not self.decode:
            pos = jnp.arange(length)
            return pos, pos
        initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        kv = self.variable("cache", "kv_positions", lambda: jnp.arange(length, dtype=jnp.int32))
        if not initialized:
            pos = jnp.arange(length)
            return pos, pos
        start = index.value
        index.value = start + length
        return start + jnp.arange(length), kv.value


def count_params(tree) -> int:
    """Number of scalars in a (possibly boxed / ShapeDtypeStruct) pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(tree)))
