"""T5-style encoder–decoder (Raffel et al. 2020).

Differences from the original Transformer: pre-LN with RMSNorm (T5's
scale-only LayerNorm), no biases anywhere, no absolute positions — instead a
learned scalar bias per (relative-position bucket, head), computed once per
stack and shared by all its layers (bidirectional buckets in the encoder,
causal ones in the decoder) — unscaled attention logits (the 1/sqrt(H) is
folded into the initialisation) and one embedding shared by encoder, decoder
and the output layer, whose input is scaled by D^-0.5 when tied.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm.layers.attention_kinds import KINDS, get_kind
from tfm.layers.blocks import BlockConfig
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.masks import and_masks, causal_mask, key_padding_mask
from tfm.layers.position import RelativePositionBias
from tfm.models.common import ModelConfig
from tfm.models.encoder_decoder import EncoderDecoder


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    """T5's own fields; ``block`` holds the layers' (pre-RMSNorm, no biases, unscaled logits).

    Every ``block`` field is also addressed by its name (``ModelConfig``):
    ``t5_tiny.replace(activation="geglu", num_experts=4)`` (a Switch-style T5).

    ``mask_decoder_padding=False``: the decoder's self-attention is causal only, as in
    Hugging Face T5, whose decoder starts from the pad id (a key padding mask would hide
    that start token). Right-padded targets give the same logits either way.
    """

    vocab_size: int = 32128
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_buckets: int = 32
    max_distance: int = 128
    tie_embeddings: bool = True
    pad_id: int = 0
    mask_decoder_padding: bool = True
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(
        d_model=512, num_heads=8, head_dim=64, d_ff=2048, activation="relu",  # T5 v1.1 uses "geglu"
        norm="rmsnorm", norm_epsilon=1e-6, norm_position="pre", attention_bias=False, mlp_bias=False,
        dropout_rate=0.1, attention_scale=1.0,
    )  # fmt: skip

    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "use_rope")

    def check(self) -> None:
        if not get_kind(self.block.attention).dense_masks:
            dense = [k.name for k in KINDS.values() if k.dense_masks]
            raise ValueError(f"attention={self.block.attention!r} takes no additive bias, and T5's relative "
                             f"position bias is one; use one of {dense}")  # fmt: skip


t5_small = T5Config()
t5_tiny = t5_small.replace(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                           num_decoder_layers=2, num_buckets=8, max_distance=16, dropout_rate=0.0)  # fmt: skip


class T5(EncoderDecoder):
    """``__call__(src [B, S], tgt_in [B, T]) -> logits [B, T, V]`` (float32); ``encode`` / ``decode`` as in ``Transformer``.

    Unpacked batches only: the relative position buckets of packed segments are not implemented.
    """

    config: T5Config

    PACKING: ClassVar[bool] = False

    def setup(self) -> None:
        self.setup_stacks()
        cfg, b = self.config, self.config.block
        self.embed = Embed(cfg.vocab_size, b.d_model, embedding_init=nn.initializers.normal(stddev=1.0), dtype=b.dtype, param_dtype=b.param_dtype)
        rel = lambda bidirectional: RelativePositionBias(b.num_heads, cfg.num_buckets, cfg.max_distance, bidirectional, param_dtype=b.param_dtype)  # noqa: E731
        self.encoder_relative_bias = rel(True)
        self.decoder_relative_bias = rel(False)
        # Mesh TF T5 rescales the decoder output by D^-0.5 before the tied projection (not before an untied one).
        scale = b.d_model**-0.5 if cfg.tie_embeddings else None
        self.lm_head = OutputHead(cfg.vocab_size, cfg.tie_embeddings, scale, dtype=b.dtype, param_dtype=b.param_dtype)

    def encode(self, src: Array, *, deterministic: bool = True) -> Array:
        """``src [B, S]`` -> ``encoded [B, S, D]``."""
        if src.ndim != 2:
            raise ValueError(f"src must be [B, S] token ids, got shape {src.shape}")
        s = src.shape[1]
        x = self.dropout(self.embed(src), deterministic=deterministic)
        pos = jnp.arange(s)
        bias = self.encoder_relative_bias(pos, pos).astype(x.dtype)
        x = self.encoder(x, mask=key_padding_mask(src != self.config.pad_id), bias=bias, deterministic=deterministic)
        return self.dropout(x, deterministic=deterministic)

    def decode(self, tgt_in: Array, encoded: Array, src: Array, *, deterministic: bool = True) -> Array:
        """``tgt_in [B, T]``, ``encoded [B, S, D]``, ``src [B, S]`` -> logits ``[B, T, V]``."""
        cfg = self.config
        if tgt_in.ndim != 2:
            raise ValueError(f"tgt_in must be [B, T] token ids, got shape {tgt_in.shape}")
        t = tgt_in.shape[1]
        q_pos, kv_pos = self.decode_positions(t)
        y = self.dropout(self.embed(tgt_in), deterministic=deterministic)
        bias = self.decoder_relative_bias(q_pos, kv_pos).astype(y.dtype)
        tgt_pad = key_padding_mask(tgt_in != cfg.pad_id) if cfg.mask_decoder_padding else None
        self_mask = None if cfg.block.decode else and_masks(causal_mask(t), tgt_pad)
        cross_mask = key_padding_mask(src != cfg.pad_id)
        y = self.decoder(y, encoded=encoded, mask=self_mask, cross_mask=cross_mask, bias=bias, deterministic=deterministic)
        y = self.dropout(y, deterministic=deterministic)
        return self.lm_head(y, self.embed)
