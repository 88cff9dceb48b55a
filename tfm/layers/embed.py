"""Token embedding, optionally scaled by sqrt(D) and shared with the output projection."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.linear import Initializer, einsum_matmul


class Embed(nn.Module):
    """``tokens [B, T] -> [B, T, D]``; ``attend(x [B, T, D]) -> logits [B, T, V]`` with the same table.

    ``scale_by_sqrt_dim`` multiplies the looked-up vectors by sqrt(D), as the
    paper does "in the embedding layers" (§3.4); the default init is then
    N(0, 1/D) so the scaled embeddings start at unit variance (tensor2tensor).
    ``attend`` is the tied pre-softmax projection (§3.4, Press & Wolf 2017).
    """

    num_embeddings: int
    features: int
    scale_by_sqrt_dim: bool = False
    embedding_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        init = self.embedding_init
        if init is None:
            init = nn.initializers.normal(stddev=self.features**-0.5 if self.scale_by_sqrt_dim else 1.0)
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(init, (sh.VOCAB, sh.EMBED)),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens: Array) -> Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"Embed wants integer token ids, got dtype {tokens.dtype}")
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        if self.scale_by_sqrt_dim:
            x = x * jnp.asarray(math.sqrt(self.features), self.dtype)
        return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))

    def attend(self, x: Array) -> Array:
        """Logits against every token: ``[B, T, D] -> [B, T, V]`` (float32 accumulation)."""
        return einsum_matmul(
            "BTD,VD->BTV", x.astype(self.dtype), self.embedding.astype(self.dtype), preferred_element_type=jnp.float32
        )
