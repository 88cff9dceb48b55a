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

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.attention_kinds import AttentionOptions
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.embed import Embed
from tfm.layers.linear import Einsum
from tfm.layers.masks import and_masks, causal_mask, segment_mask
from tfm.layers.moe import MoEOptions
from tfm.layers.position import LearnedPositionEmbedding, alibi_bias, sinusoidal_positions
from tfm.models.common import DecodePositions

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class GPTConfig(MoEOptions, AttentionOptions):
    """The fields below, the MoE options (``MoEOptions``; ``num_experts=0``: dense) and the
    self-attention kind (``AttentionOptions``; ``attention="full"``: dense masks)."""

    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    num_heads: int = 12
    num_kv_heads: int | None = None
    num_layers: int = 12
    d_ff: int = 3072
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    norm_epsilon: float = 1e-5
    position: str = "learned"
    rope_base: float = 10_000.0
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    init_std: float = 0.02
    # GPT-2 §2.3: the residual branches' output projections start at init_std / sqrt(2 * num_layers)
    # (two residual additions per layer), so the residual stream's variance does not grow with depth.
    scale_residual_init: bool = True
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None
    decode: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        self.block_config()

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            d_ff=self.d_ff,
            activation=self.activation,
            norm=self.norm,
            norm_epsilon=self.norm_epsilon,
            norm_position="pre",
            attention_bias=self.use_bias,
            mlp_bias=self.use_bias,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            use_rope=self.position == "rope",
            rope_base=self.rope_base,
            attention_impl=self.attention_impl,
            kernel_init_std=self.init_std,
            out_init_std=self.init_std / math.sqrt(2 * self.num_layers) if self.scale_residual_init else None,
            decode=self.decode,
            causal=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **self.moe_options(),
            **self.attention_options(),
        )


gpt2_small = GPTConfig()
gpt_tiny = GPTConfig(vocab_size=64, max_len=32, d_model=32, num_heads=4, num_layers=2, d_ff=64, dropout_rate=0.0, attention_dropout_rate=0.0)
# A Llama-flavoured tiny decoder: RoPE, RMSNorm, SwiGLU, GQA, no biases, untied head.
llama_tiny = GPTConfig(
    vocab_size=64, max_len=32, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=64,
    activation="swiglu", norm="rmsnorm", norm_epsilon=1e-6, position="rope", use_bias=False,
    tie_embeddings=False, dropout_rate=0.0, attention_dropout_rate=0.0,
)  # fmt: skip

# A tiny Mixture-of-Experts decoder: layer 2 of 2 routes each token to 2 of 4 expert FFNs.
gpt_moe_tiny = dataclasses.replace(gpt_tiny, num_experts=4, experts_per_token=2, moe_every=2)
# Mixtral 8x7B (Jiang et al. 2024): Llama/Mistral layers whose every FFN is a top-2-of-8
# SwiGLU MoE; 46.7 B parameters (12.9 B active per token). For eval_shape and sharding plans.
mixtral_8x7b = GPTConfig(
    vocab_size=32000, max_len=32768, d_model=4096, num_heads=32, num_kv_heads=8, num_layers=32, d_ff=14336,
    activation="swiglu", norm="rmsnorm", norm_epsilon=1e-5, position="rope", rope_base=1e6, use_bias=False,
    tie_embeddings=False, dropout_rate=0.0, attention_dropout_rate=0.0,
    num_experts=8, experts_per_token=2, moe_every=1, moe_dispatch="dropless",
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
    def __call__(self, tokens: Array, *, segment_ids=None, positions=None, deterministic: bool = True) -> Array:
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] ids, got shape {tokens.shape}")
        t = tokens.shape[1]
        if cfg.position in ("learned",) and not cfg.decode and t > cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}")
        init = nn.initializers.normal(stddev=cfg.init_std)
        embed = Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed")
        q_pos, kv_pos = DecodePositions(cfg.decode, name="decode_positions")(t)
        if positions is not None:
            q_pos = kv_pos = positions
        x = embed(tokens)
        if cfg.position == "learned":
            x = x + LearnedPositionEmbedding(cfg.max_len, cfg.d_model, init, param_dtype=cfg.param_dtype, name="pos_embed")(q_pos).astype(x.dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(q_pos, cfg.d_model).astype(x.dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

        bias = alibi_bias(cfg.num_heads, q_pos, kv_pos) if cfg.position == "alibi" else None
        if cfg.decode or cfg.attention != "full":
            mask = None  # the KV cache lets position t see cache slots <= t; efficient kinds take causal=True
        else:
            mask = causal_mask(t)
        if segment_ids is not None:
            if cfg.attention != "full":
                raise ValueError(f"attention={cfg.attention!r} cannot keep packed segments apart; use attention='full'")
            mask = and_masks(mask, segment_mask(segment_ids))
        rope_positions = q_pos if cfg.position == "rope" else None
        x = Stack(EncoderBlock, cfg.block_config(), cfg.num_layers, cfg.scan_layers, cfg.remat_policy, name="decoder")(
            x, mask, bias, rope_positions, deterministic=deterministic
        )
        if cfg.tie_embeddings:
            return embed.attend(x)
        head = Einsum((cfg.d_model, cfg.vocab_size), (sh.EMBED, sh.VOCAB), kernel_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="lm_head")
        return head("BTD,DV->BTV", x).astype(jnp.float32)


__all__ = ["GPT", "GPTConfig", "gpt2_small", "gpt_moe_tiny", "gpt_tiny", "llama_tiny", "mixtral_8x7b"]
