"""Token embedding (optionally scaled by sqrt(D)) and the output head, tied to it or not."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.linear import Initializer, as_dtype, default_kernel_init, einsum_matmul


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


class OutputHead(nn.Module):
    """The pre-softmax projection of every language model: ``[B, T, D] -> logits [B, T, V]`` (float32).

    ``tied``: the token embedding's transpose (``embed.attend``, §3.4; Press & Wolf 2017),
    with no parameter of its own; the caller passes that ``Embed``. Untied: its own
    ``kernel [D, V]`` (``kernel_init``; None: Glorot uniform). ``input_scale``
    multiplies the input first (T5 rescales by D^-0.5 before its tied projection).
    """

    vocab_size: int
    tied: bool = True
    input_scale: float | None = None
    kernel_init: Initializer | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, embed: Embed | None = None) -> Array:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.tied:
            if embed is None:
                raise ValueError("a tied OutputHead projects with the token Embed it shares: pass it as `embed`")
            return embed.attend(x)
        init = nn.with_logical_partitioning(self.kernel_init or default_kernel_init(0, -1), (sh.EMBED, sh.VOCAB))
        kernel = self.param("kernel", init, (x.shape[-1], self.vocab_size), self.param_dtype)
        logits = einsum_matmul("BTD,DV->BTV", x.astype(self.dtype), as_dtype(kernel, self.dtype))
        return logits.astype(jnp.float32)
