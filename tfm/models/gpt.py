"""Decoder-only language model (GPT-2, Radford et al. 2019), with modern options.

    tokens -> Embed + positions -> dropout -> L x pre-LN EncoderBlock (causal) -> LN -> logits

The GPT-2 preset: learned positions, GELU (tanh), LayerNorm, biases, output
head tied to the token embedding; weights drawn from N(0, 0.02), the residual
branches' output projections from N(0, 0.02 / sqrt(2 L)) (GPT-2 §2.3). The same class covers Llama-style models
(``position="rope"``, ``norm="rmsnorm"``, ``activation="swiglu"``,
``num_kv_heads`` for GQA, no biases) and ALiBi.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
from jax import Array

from tfm.layers.attention_kinds import get_kind
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.masks import and_masks, causal_mask, segment_mask
from tfm.layers.position import LearnedPositionEmbedding, alibi_bias, sinusoidal_positions
from tfm.models.common import DecodePositions, ModelConfig

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfig):
    """GPT's own fields; ``block`` holds the layers' (widths, heads, norm, attention kind, MoE).

    Every ``block`` field is also addressed by its name (``ModelConfig``):
    ``gpt_tiny.replace(d_model=64, attention="local")``.
    """

    vocab_size: int = 50257
    max_len: int = 1024  # learned positions; the KV cache is sized by the decode call
    num_layers: int = 12
    position: str = "learned"
    tie_embeddings: bool = True
    init_std: float = 0.02
    # GPT-2 §2.3: the residual branches' output projections start at init_std / sqrt(2 * num_layers)
    # (two residual additions per layer), so the residual stream's variance does not grow with depth.
    scale_residual_init: bool = True
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(
        d_model=768, num_heads=12, d_ff=3072, activation="gelu_tanh", norm_epsilon=1e-5, norm_position="pre",
        dropout_rate=0.1, attention_dropout_rate=0.1,
    )  # fmt: skip

    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "use_rope", "kernel_init_std", "out_init_std")

    def check(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.position == "alibi" and not get_kind(self.block.attention).dense_masks:
            raise ValueError(f"position='alibi' is an additive bias; attention={self.block.attention!r} takes none "
                             f"(use attention='full')")  # fmt: skip

    def layer_config(self) -> BlockConfig:
        """The block with what GPT derives: causal, RoPE from ``position``, GPT-2 initialisation."""
        out_std = self.init_std / math.sqrt(2 * self.num_layers) if self.scale_residual_init else None
        return dataclasses.replace(self.block, causal=True, use_rope=self.position == "rope",
                                   kernel_init_std=self.init_std, out_init_std=out_std)  # fmt: skip


_no_dropout = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
gpt2_small = GPTConfig()
gpt_tiny = gpt2_small.replace(vocab_size=64, max_len=32, d_model=32, num_heads=4, num_layers=2, d_ff=64, **_no_dropout)
# A Llama-flavoured tiny decoder: RoPE, RMSNorm, SwiGLU, GQA, no biases, untied head.
llama_tiny = gpt_tiny.replace(
    num_kv_heads=2, activation="swiglu", norm="rmsnorm", norm_epsilon=1e-6, position="rope", attention_bias=False,
    mlp_bias=False, tie_embeddings=False,
)  # fmt: skip

# A tiny Mixture-of-Experts decoder: layer 2 of 2 routes each token to 2 of 4 expert FFNs.
gpt_moe_tiny = gpt_tiny.replace(num_experts=4, experts_per_token=2, moe_every=2)
# Mixtral 8x7B (Jiang et al. 2024): Llama/Mistral layers whose every FFN is a top-2-of-8
# SwiGLU MoE; 46.7 B parameters (12.9 B active per token). For eval_shape and sharding plans.
mixtral_8x7b = gpt2_small.replace(
    vocab_size=32000, max_len=32768, d_model=4096, num_heads=32, num_kv_heads=8, num_layers=32, d_ff=14336,
    activation="swiglu", norm="rmsnorm", norm_epsilon=1e-5, position="rope", rope_base=1e6, attention_bias=False,
    mlp_bias=False, tie_embeddings=False, num_experts=8, experts_per_token=2, moe_every=1, moe_dispatch="dropless",
    **_no_dropout,
)  # fmt: skip


class GPT(nn.Module):
    """``tokens [B, T] -> logits [B, T, V]`` (float32), causal.

    ``segment_ids`` (packed rows) keep sequences apart; ``positions`` default
    to 0..T-1 (per-segment positions for packed rows are the caller's).
    With ``decode=True``: ``init`` at the maximal length creates the cache, then
    each call appends T tokens.
    """

    config: GPTConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        b = cfg.layer_config()
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] ids, got shape {tokens.shape}")
        t = tokens.shape[1]
        if cfg.position == "learned" and not b.decode and t > cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}")
        init = nn.initializers.normal(stddev=cfg.init_std)
        embed = Embed(cfg.vocab_size, b.d_model, embedding_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="embed")
        q_pos, kv_pos = DecodePositions(b.decode, name="decode_positions")(t)
        if positions is not None:
            q_pos = kv_pos = positions
        x = embed(tokens)
        if cfg.position == "learned":
            x = x + LearnedPositionEmbedding(cfg.max_len, b.d_model, init, param_dtype=b.param_dtype, name="pos_embed")(q_pos).astype(x.dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(q_pos, b.d_model).astype(x.dtype)
        x = nn.Dropout(b.dropout_rate)(x, deterministic=deterministic)

        bias = alibi_bias(b.num_heads, q_pos, kv_pos) if cfg.position == "alibi" else None
        if b.decode or b.attention != "full":
            mask = None  # the KV cache lets position t see cache slots <= t; efficient kinds take causal=True
        else:
            mask = causal_mask(t)
        if segment_ids is not None:
            if b.attention != "full":
                raise ValueError(f"attention={b.attention!r} cannot keep packed segments apart; use attention='full'")
            mask = and_masks(mask, segment_mask(segment_ids))
        rope_positions = q_pos if cfg.position == "rope" else None
        x = Stack(EncoderBlock, b, cfg.num_layers, cfg.scan_layers, cfg.remat_policy, name="decoder")(
            x, mask=mask, bias=bias, positions=rope_positions, deterministic=deterministic
        )
        head = OutputHead(cfg.vocab_size, cfg.tie_embeddings, kernel_init=init, dtype=b.dtype, param_dtype=b.param_dtype, name="lm_head")
        return head(x, embed)


__all__ = ["GPT", "GPTConfig", "gpt2_small", "gpt_moe_tiny", "gpt_tiny", "llama_tiny", "mixtral_8x7b"]
