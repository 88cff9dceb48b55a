"""The original encoder–decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

    src tokens -> Embed * sqrt(D) + PE -> dropout -> N x EncoderBlock           -> encoded
    tgt tokens -> Embed * sqrt(D) + PE -> dropout -> N x DecoderBlock(encoded) -> logits

Post-LN blocks, ReLU FFN, sinusoidal positions, residual dropout and one
embedding matrix shared by source, target and the pre-softmax projection
(§3.4) in the paper presets.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.masks import and_masks, causal_mask, key_padding_mask, segment_mask
from tfm.layers.position import SINUSOID_LAYOUTS, LearnedPositionEmbedding, sinusoidal_positions
from tfm.models.common import ModelConfig
from tfm.models.encoder_decoder import EncoderDecoder

POSITIONS = ("sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    """The encoder–decoder's own fields; ``block`` holds the layers' (both stacks share it).

    Every ``block`` field is also addressed by its name (``ModelConfig``):
    ``transformer_tiny.replace(d_model=64, norm_position="pre")``. ``attention`` is the
    kind of both stacks' self-attention; cross-attention is always full (or flash).
    """

    vocab_size: int
    target_vocab_size: int | None = None  # None: same as vocab_size
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    position: str = "sinusoidal"
    max_len: int = 512  # learned positions only; sinusoidal positions have no limit
    share_embeddings: bool = True  # one table for source and target
    tie_output: bool = True  # pre-softmax projection = target embedding^T
    pad_id: int = 0
    scale_embeddings: bool = True  # token embeddings * sqrt(D) (§3.4)
    sinusoid_layout: str = "interleaved"  # the paper's; "halves": all sines, then all cosines (Marian)
    mask_target_padding: bool = True  # False: the decoder's self-attention sees pad tokens (Marian starts with pad)
    logits_bias: bool = False  # a learned bias [V] added to the logits (Marian's final_logits_bias)
    bos_id: int | None = None  # the target's start and end tokens, for generation and export; None: unknown
    eos_id: int | None = None
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(d_model=512, num_heads=8, d_ff=2048, norm_epsilon=1e-6, dropout_rate=0.1)

    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "use_rope")

    def check(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.sinusoid_layout not in SINUSOID_LAYOUTS:
            raise ValueError(f"sinusoid_layout must be one of {SINUSOID_LAYOUTS}, got {self.sinusoid_layout!r}")
        if self.share_embeddings and self.target_vocab_size not in (None, self.vocab_size):
            raise ValueError(
                f"share_embeddings needs one vocabulary, got vocab_size={self.vocab_size}, "
                f"target_vocab_size={self.target_vocab_size}"
            )

    @property
    def tgt_vocab(self) -> int:
        return self.target_vocab_size or self.vocab_size


# Paper Table 3. Shared source/target BPE vocabulary of ~37000 tokens (§5.1).
transformer_base = TransformerConfig(vocab_size=37000)
transformer_big = transformer_base.replace(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
transformer_tiny = transformer_base.replace(
    vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0
)
# Switch-style encoder-decoder: every other FFN (encoder and decoder) is a top-1 MoE of 4 experts.
transformer_moe_tiny = transformer_tiny.replace(num_experts=4, experts_per_token=1, moe_every=2, moe_renormalize=False)


class Transformer(EncoderDecoder):
    """Encoder–decoder. ``__call__(src [B,S], tgt_in [B,T]) -> logits [B,T,V]`` (float32).

    ``tgt_in`` is the shifted-right target (BOS first). Token ``pad_id`` is
    padding. Optional ``*_segment_ids`` / ``*_positions`` support packed rows.
    The stacks and ``__call__`` are ``EncoderDecoder``'s.
    For decoding build it with ``decode=True``: ``init`` at the maximal target
    length creates the cache; then ``decode`` one step (or chunk) at a time.
    """

    config: TransformerConfig

    def setup(self) -> None:
        self.setup_stacks()
        cfg, b = self.config, self.config.block
        embed = lambda n, name: Embed(n, b.d_model, scale_by_sqrt_dim=cfg.scale_embeddings, dtype=b.dtype,  # noqa: E731
                                      param_dtype=b.param_dtype, name=name)  # fmt: skip
        if cfg.share_embeddings:
            self.src_embed = self.tgt_embed = embed(cfg.vocab_size, "embed")
        else:
            self.src_embed = embed(cfg.vocab_size, "src_embed")
            self.tgt_embed = embed(cfg.tgt_vocab, "tgt_embed")
        if cfg.position == "learned":
            self.src_pos = LearnedPositionEmbedding(cfg.max_len, b.d_model, param_dtype=b.param_dtype, name="src_pos")
            self.tgt_pos = LearnedPositionEmbedding(cfg.max_len, b.d_model, param_dtype=b.param_dtype, name="tgt_pos")
        self.logits_proj = OutputHead(cfg.tgt_vocab, cfg.tie_output, dtype=b.dtype, param_dtype=b.param_dtype)
        if cfg.logits_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.VOCAB,))
            self.final_logits_bias = self.param("logits_bias", init, (cfg.tgt_vocab,), b.param_dtype)

    def _embed(self, tokens, positions, embed, pos_table, deterministic):
        x = embed(tokens)
        if self.config.position == "sinusoidal":
            pe = sinusoidal_positions(positions, self.config.block.d_model, layout=self.config.sinusoid_layout)
            x = x + pe.astype(x.dtype)
        else:
            x = x + pos_table(positions).astype(x.dtype)
        return self.dropout(x, deterministic=deterministic)

    def _check_no_segments(self) -> None:
        if self.config.block.attention != "full":
            raise ValueError(f"attention={self.config.block.attention!r} cannot keep packed segments apart; use attention='full'")

    def encode(
        self,
        src: Array,
        *,
        src_segment_ids: Array | None = None,
        src_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``src [B, S]`` -> ``encoded [B, S, D]``."""
        if src.ndim != 2:
            raise ValueError(f"src must be [B, S] token ids, got shape {src.shape}")
        positions = jnp.arange(src.shape[1]) if src_positions is None else src_positions
        x = self._embed(src, positions, self.src_embed, getattr(self, "src_pos", None), deterministic)
        mask = key_padding_mask(src != self.config.pad_id)
        if src_segment_ids is not None:
            self._check_no_segments()
            mask = and_masks(mask, segment_mask(src_segment_ids))
        return self.encoder(x, mask=mask, deterministic=deterministic)

    def decode(
        self,
        tgt_in: Array,
        encoded: Array,
        src: Array,
        *,
        tgt_segment_ids: Array | None = None,
        src_segment_ids: Array | None = None,
        tgt_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``tgt_in [B, T]``, ``encoded [B, S, D]``, ``src [B, S]`` (for its padding) -> logits ``[B, T, V]``."""
        cfg = self.config
        if tgt_in.ndim != 2:
            raise ValueError(f"tgt_in must be [B, T] token ids, got shape {tgt_in.shape}")
        t = tgt_in.shape[1]
        positions, _ = self.decode_positions(t)
        positions = positions if tgt_positions is None else tgt_positions
        y = self._embed(tgt_in, positions, self.tgt_embed, getattr(self, "tgt_pos", None), deterministic)
        cross_mask = key_padding_mask(src != cfg.pad_id)
        if cfg.block.decode:
            self_mask = None  # the KV cache masks positions beyond the current one
        else:
            causal = causal_mask(t) if cfg.block.attention == "full" else None  # efficient kinds take causal=True
            self_mask = and_masks(causal, key_padding_mask(tgt_in != cfg.pad_id) if cfg.mask_target_padding else None)
        if tgt_segment_ids is not None:
            self._check_no_segments()
            self_mask = and_masks(self_mask, segment_mask(tgt_segment_ids))
            cross_mask = and_masks(cross_mask, segment_mask(tgt_segment_ids, src_segment_ids))
        y = self.decoder(y, encoded=encoded, mask=self_mask, cross_mask=cross_mask, deterministic=deterministic)
        logits = self.logits_proj(y, self.tgt_embed)
        return logits + self.final_logits_bias.astype(jnp.float32) if cfg.logits_bias else logits
