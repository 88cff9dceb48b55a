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

The Compressive Transformer (Rae et al. 2019) is the same model with ``cmem_len > 0``: the
states a segment pushes out of a layer's memory are not dropped but compressed ``compression_rate``
times (``tfm.layers.compression``) into a second memory of ``cmem_len`` slots, so a layer attends
over ``[compressed; memory; h]``. The memory array then holds ``C + M`` slots per layer, the
``C = cmem_len`` compressed ones first, and the compression is trained by the attention-
reconstruction loss, sown into ``aux_loss``. Relative positions count slots, compressed or not.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, _mlp, _Residual
from tfm.layers.compression import Compress, group_mask, reconstruction_loss
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.relative_attention import RelativeMultiHeadAttention
from tfm.models.common import ModelConfig


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig(ModelConfig):
    """Transformer-XL's own fields; ``block`` holds the layers' (widths, heads, norm, FFN or MoE)."""

    vocab_size: int = 256
    num_layers: int = 4
    mem_len: int = 64  # hidden states per layer carried to the next segment
    cmem_len: int = 0  # compressed memories per layer (Compressive Transformer); 0 = plain Transformer-XL
    compression_rate: int = 4  # evicted states per compressed memory
    tie_embeddings: bool = True
    init_std: float = 0.02
    block: BlockConfig = BlockConfig(d_model=128, num_heads=4, d_ff=512, activation="gelu", norm_position="pre",
                                     dropout_rate=0.1, attention_dropout_rate=0.0, kernel_init_std=0.02)  # fmt: skip

    def check(self) -> None:
        if self.mem_len < 0 or self.cmem_len < 0:
            raise ValueError(f"mem_len and cmem_len must be >= 0, got {self.mem_len} and {self.cmem_len}")
        if self.compression_rate < 1:
            raise ValueError(f"compression_rate must be >= 1, got {self.compression_rate}")
        if self.block.attention != "full":
            raise ValueError(f"attention={self.block.attention!r}: Transformer-XL attends with relative positions over "
                             f"its memory (attention='full')")  # fmt: skip
        if self.block.decode:
            raise ValueError("Transformer-XL decodes with its memory, not a KV cache (decode=False)")

    @property
    def memory_len(self) -> int:
        """Memory slots per layer: ``cmem_len`` compressed, then ``mem_len`` recent states."""
        return self.cmem_len + self.mem_len


class XLBlock(_Residual):
    """XL self-attention over ``[memory; x]`` + FFN. ``[B, T, D] -> [B, T, D]``.

    With ``compressed_len = C > 0`` the first ``C`` memory slots are compressed memories, which
    enter the attention as they are (they were made from states the attention norm had already
    seen), and ``evicted [B, E, D]``, the states leaving this layer's memory, come back compressed:
    the call returns ``(y, compressed [B, E / rate, D])`` and sows the reconstruction loss.
    """

    compressed_len: int = 0
    compression_rate: int = 4

    @nn.compact
    def __call__(self, x: Array, memory: Array | None, mask: Array | None, deterministic: bool = True,
                 evicted: Array | None = None, evicted_mask: Array | None = None):  # fmt: skip
        cfg, c = self.config, self.compressed_len
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        norm = cfg.make_norm("attention_norm")
        attn = RelativeMultiHeadAttention(cfg.num_heads, cfg.head_width, cfg.d_model, cfg.attention_dropout_rate,
                                          kernel_init=cfg.kernel_init(), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                          name="self_attention")  # fmt: skip
        # Pre-LN normalises the memory with the same norm as the current states (both enter the sub-layer).
        pre, mem = cfg.norm_position == "pre", memory
        if memory is not None and pre:
            mem = norm(memory) if c == 0 else jnp.concatenate([memory[:, :c].astype(x.dtype), norm(memory[:, c:])], 1)
        h = x
        x = self.wrap(x, lambda y: attn(y, mem, mask=mask, deterministic=deterministic), norm, deterministic)
        mlp = _mlp(cfg)
        x = self.wrap(x, lambda y: mlp(y, deterministic=deterministic), cfg.make_norm("mlp_norm"), deterministic)
        if evicted is None:
            return x
        old = jax.lax.stop_gradient(norm(evicted) if pre else evicted)
        compressed = Compress(self.compression_rate, cfg.d_model, kernel_init=cfg.kernel_init(), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="compress")(old)  # fmt: skip
        if self.is_mutable_collection("aux_loss"):
            queries = norm(h) if pre else h
            loss = reconstruction_loss(attn.content_attention, queries, old, evicted_mask, compressed,
                                       group_mask(evicted_mask, self.compression_rate), self.compression_rate)  # fmt: skip
            self.sow("aux_loss", "attention_reconstruction", loss)
        return x, jax.lax.stop_gradient(compressed)


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
    """``tokens [B, T]`` (+ ``memory [L, B, C + M, D]``, ``memory_mask [B, C + M]``) -> ``(logits [B, T, V],
    new_memory, new_mask)``.

    ``memory=None``: the first segment (nothing behind it). The returned memory holds the last
    ``min(mem_len, M + T)`` positions (behind ``cmem_len`` compressed slots, if any); pass it (and
    its mask) with the next segment.
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
        if cfg.cmem_len:
            if tokens.shape[1] % cfg.compression_rate:
                raise ValueError(f"segment length {tokens.shape[1]} must be a multiple of compression_rate="
                                 f"{cfg.compression_rate}: each segment pushes that many states out of memory")  # fmt: skip
            if memory is None:  # an empty memory, so the first segment's evictions are compressed (and masked) too
                memory = jnp.zeros((cfg.num_layers, tokens.shape[0], cfg.memory_len, b.d_model), b.dtype)
                memory_mask = jnp.zeros((tokens.shape[0], cfg.memory_len), bool)
            elif memory.shape[2] != cfg.memory_len:
                raise ValueError(f"memory holds {memory.shape[2]} slots per layer; cmem_len + mem_len = {cfg.memory_len}")
            memory_mask = jnp.ones(memory.shape[1:3], bool) if memory_mask is None else memory_mask
        init = nn.initializers.normal(stddev=cfg.init_std)
        embed = Embed(cfg.vocab_size, b.d_model, embedding_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="embed")
        x = nn.Dropout(b.dropout_rate)(embed(tokens), deterministic=deterministic)
        mask = None
        if memory is not None and memory_mask is not None:  # [B, 1, 1, M + T]: empty memory slots are no keys
            mask = jnp.concatenate([memory_mask, jnp.ones(tokens.shape, bool)], axis=1)[:, None, None, :]
        new_memory, new_mask = [], None
        for layer in range(cfg.num_layers):
            mem = None if memory is None else memory[layer]
            block = XLBlock(b, cfg.cmem_len, cfg.compression_rate, name=f"layer_{layer}")
            if not cfg.cmem_len:
                kept, new_mask = next_memory(mem, memory_mask, x, cfg.mem_len)
                new_memory.append(kept)
                x = block(x, mem, mask, deterministic)
                continue
            c, t = cfg.cmem_len, tokens.shape[1]
            raw, raw_mask = mem[:, c:], memory_mask[:, c:]
            kept, kept_mask = next_memory(raw, raw_mask, x, cfg.mem_len)
            # The T oldest of [memory; x] leave the memory: compressed, they join the compressed slots.
            evicted = jnp.concatenate([raw.astype(x.dtype), x], axis=1)[:, :t]
            evicted_mask = jnp.concatenate([raw_mask, jnp.ones(tokens.shape, bool)], axis=1)[:, :t]
            x, compressed = block(x, mem, mask, deterministic, evicted, evicted_mask)
            comp = jnp.concatenate([mem[:, :c], compressed.astype(mem.dtype)], axis=1)[:, -c:]
            comp_mask = jnp.concatenate([memory_mask[:, :c], group_mask(evicted_mask, cfg.compression_rate)], 1)[:, -c:]
            new_memory.append(jnp.concatenate([comp, kept.astype(mem.dtype)], axis=1))
            new_mask = jnp.concatenate([comp_mask, kept_mask], axis=1)
        if b.norm_position == "pre":
            x = b.make_norm("final_norm")(x)
        head = OutputHead(cfg.vocab_size, cfg.tie_embeddings, kernel_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="lm_head")
        return head(x, embed), jnp.stack(new_memory), new_mask


transformer_xl_tiny = TransformerXLConfig(vocab_size=64, num_layers=2, mem_len=8).replace(
    d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)  # fmt: skip
compressive_transformer_tiny = transformer_xl_tiny.replace(mem_len=4, cmem_len=4, compression_rate=2)

__all__ = ["TransformerXL", "TransformerXLConfig", "XLBlock", "compressive_transformer_tiny", "next_memory",
           "transformer_xl_tiny"]
