"""Transformer-XL (Dai et al. 2019): a decoder-only language model with segment-level recurrence.

    tokens -> Embed -> dropout -> L x [XL attention over (memory_l; h) + FFN] -> LN -> logits

Each layer ``l`` keeps the hidden states that entered it for the last ``mem_len`` positions
(the previous segments) as its memory, with the gradient stopped (§3.2); the next segment
attends over ``[memory_l; h]`` with relative positions (``tfm.layers.relative_attention``).
A model called segment after segment, handing each call's ``new_memory`` to the next,
sees ``mem_len`` positions further back than its segment length, per layer: the context
grows with depth, ``L x mem_len`` positions in all.

The residual blocks are tfm's (``BlockConfig``: norm, FFN or MoE, dropout); pre-LN by default,
where the paper's code is post-LN (``norm_position="post"`` gives that). Memory is a
``[L, B, M, D]`` array and ``memory_mask [B, M]`` marks the slots that hold a real state (the first
segments of a stream have fewer than ``mem_len`` positions behind them).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, _mlp, _Residual
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.relative_attention import RelativeMultiHeadAttention
from tfm.models.common import ModelConfig


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig(ModelConfig):
    """Transformer-XL's own fields; ``block`` holds the layers' (widths, heads, norm, FFN or MoE)."""

    vocab_size: int = 256
    num_layers: int = 4
    mem_len: int = 64  # hidden states per layer carried to the next segment
    tie_embeddings: bool = True
    init_std: float = 0.02
    block: BlockConfig = BlockConfig(d_model=128, num_heads=4, d_ff=512, activation="gelu", norm_position="pre",
                                     dropout_rate=0.1, attention_dropout_rate=0.0, kernel_init_std=0.02)  # fmt: skip

    def check(self) -> None:
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.block.attention != "full":
            raise ValueError(f"attention={self.block.attention!r}: Transformer-XL attends with relative positions over "
                             f"its memory (attention='full')")  # fmt: skip
        if self.block.decode:
            raise ValueError("Transformer-XL decodes with its memory, not a KV cache (decode=False)")


class XLBlock(_Residual):
    """XL self-attention over ``[memory; x]`` + FFN. ``[B, T, D] -> [B, T, D]``."""

    @nn.compact
    def __call__(self, x: Array, memory: Array | None, mask: Array | None, deterministic: bool = True) -> Array:
        cfg = self.config
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        norm = cfg.make_norm("attention_norm")
        attn = RelativeMultiHeadAttention(cfg.num_heads, cfg.head_width, cfg.attention_dropout_rate,
                                          kernel_init=cfg.kernel_init(), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                          name="self_attention")  # fmt: skip
        # Pre-LN normalises the memory with the same norm as the current states (both enter the sub-layer).
        mem = norm(memory) if memory is not None and cfg.norm_position == "pre" else memory
        x = self.wrap(x, lambda y: attn(y, mem, mask=mask, deterministic=deterministic), norm, deterministic)
        mlp = _mlp(cfg)
        return self.wrap(x, lambda y: mlp(y, deterministic=deterministic), cfg.make_norm("mlp_norm"), deterministic)


def next_memory(memory: Array | None, memory_mask: Array | None, h: Array, mem_len: int) -> tuple[Array, Array]:
    """The last ``mem_len`` positions of ``[memory; h]`` and their mask, gradient stopped (§3.2)."""
    b, t, _ = h.shape
    valid = jnp.ones((b, t), bool)
    if memory is not None:
        h = jnp.concatenate([memory.astype(h.dtype), h], axis=1)
        valid = jnp.concatenate([jnp.ones(memory.shape[:2], bool) if memory_mask is None else memory_mask, valid], 1)
    start = max(h.shape[1] - mem_len, 0)
    return jax.lax.stop_gradient(h[:, start:]), valid[:, start:]


class TransformerXL(nn.Module):
    """``tokens [B, T]`` (+ ``memory [L, B, M, D]``, ``memory_mask [B, M]``) -> ``(logits [B, T, V], new_memory,
    new_mask)``.

    ``memory=None``: the first segment (nothing behind it). The returned memory holds the last
    ``min(mem_len, M + T)`` positions; pass it (and its mask) with the next segment.
    """

    config: TransformerXLConfig

    @nn.compact
    def __call__(self, tokens: Array, memory: Array | None = None, memory_mask: Array | None = None, *,
                 deterministic: bool = True) -> tuple[Array, Array, Array]:  # fmt: skip
        cfg, b = self.config, self.config.block
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] ids, got shape {tokens.shape}")
        if memory is not None and (memory.ndim != 4 or memory.shape[0] != cfg.num_layers):
            raise ValueError(f"memory must be [num_layers={cfg.num_layers}, B, M, D], got shape {memory.shape}")
        init = nn.initializers.normal(stddev=cfg.init_std)
        embed = Embed(cfg.vocab_size, b.d_model, embedding_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="embed")
        x = nn.Dropout(b.dropout_rate)(embed(tokens), deterministic=deterministic)
        mask = None
        if memory is not None and memory_mask is not None:  # [B, 1, 1, M + T]: empty memory slots are no keys
            mask = jnp.concatenate([memory_mask, jnp.ones(tokens.shape, bool)], axis=1)[:, None, None, :]
        new_memory, new_mask = [], None
        for layer in range(cfg.num_layers):
            mem = None if memory is None else memory[layer]
            kept, new_mask = next_memory(mem, memory_mask, x, cfg.mem_len)
            new_memory.append(kept)
            x = XLBlock(b, name=f"layer_{layer}")(x, mem, mask, deterministic)
        if b.norm_position == "pre":
            x = b.make_norm("final_norm")(x)
        head = OutputHead(cfg.vocab_size, cfg.tie_embeddings, kernel_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="lm_head")
        return head(x, embed), jnp.stack(new_memory), new_mask


transformer_xl_tiny = TransformerXLConfig(vocab_size=64, num_layers=2, mem_len=8).replace(
    d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)  # fmt: skip

__all__ = ["TransformerXL", "TransformerXLConfig", "XLBlock", "next_memory", "transformer_xl_tiny"]
