"""Whisper (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision").

    features [B, F, M] (log-mel, ``tfm.layers.audio``) -> conv(3) -> GELU -> conv(3, stride 2) -> GELU
      -> + sinusoids -> N x pre-LN EncoderBlock -> LN                          -> encoded [B, F/2, D]
    tokens [B, T] -> embed + learned positions -> N x pre-LN DecoderBlock(encoded) -> LN
      -> embedding^T                                                           -> logits [B, T, V]

The encoder is the Transformer's over audio frames instead of tokens: a two-layer
convolutional stem (the second halves the frame rate, 100 -> 50 per second) and fixed
sinusoidal positions. The decoder is GPT-2-like with cross-attention: learned positions,
pre-LN, exact GELU, and the output projection tied to the token embedding. Attention
projections have biases, except the keys' (a key bias adds the same score to every key of
a query, so it never changes the weights). Audio frames are never padding: Whisper attends
over the whole (silence-padded) clip, so there is no source mask.

Decoding is the encoder–decoders' (``tfm.decode.generate_seq2seq`` / ``beam_search``): they call
``encode(features)`` once and ``decode(tokens, encoded, features)`` per step with the KV cache.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.feedforward import gelu
from tfm.layers.linear import Einsum
from tfm.layers.masks import causal_mask
from tfm.layers.position import LearnedPositionEmbedding
from tfm.models.common import ModelConfig
from tfm.models.encoder_decoder import EncoderDecoder


@dataclasses.dataclass(frozen=True)
class WhisperConfig(ModelConfig):
    """Whisper's own fields; ``block`` holds both stacks' layers. Token ids default to the multilingual tokenizer's."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # encoder frames after the stride-2 stem: 30 s of audio
    max_target_positions: int = 448
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    pad_id: int = 50257
    bos_id: int = 50258  # <|startoftranscript|>, the decoder's first input
    eos_id: int = 50257  # <|endoftext|>
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(d_model=384, num_heads=6, d_ff=1536, activation="gelu", norm_position="pre",
                                     key_bias=False, dropout_rate=0.0)  # fmt: skip

    def check(self) -> None:
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a token of the vocabulary of {self.vocab_size}")
        if self.block.norm_position != "pre":
            raise ValueError("Whisper's stacks are pre-LN; set norm_position='pre'")
        if self.block.d_model % 2:
            raise ValueError(f"sinusoidal encoder positions need an even d_model, got {self.block.d_model}")


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Whisper's encoder positions ``[length, channels]``: all sines, then all cosines, with the
    timescales spaced geometrically from 1 to ``max_timescale`` *inclusive* (``channels / 2 - 1`` steps,
    one fewer than the 2017 paper's ``channels / 2``)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    angle = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def conv1d(conv: Einsum, x: Array, stride: int) -> Array:
    """Kernel-3 convolution over frames with one frame of zero padding each side: ``[B, F, C] -> [B, F/stride, D]``."""
    f = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    out = -(-f // stride)
    windows = jnp.stack([padded[:, k : k + stride * (out - 1) + 1 : stride] for k in range(3)], axis=2)
    return conv("BFKC,KCD->BFD", windows)


class Whisper(EncoderDecoder):
    """``__call__(features [B, F, M], tgt_in [B, T]) -> logits [B, T, V]`` (float32).

    ``features`` are log-mel frames (``tfm.layers.audio.log_mel_spectrogram``), ``F`` even and at
    most ``2 * max_source_positions``. ``tgt_in`` starts with ``bos_id``. Build with ``decode=True``
    for the KV cache (``tfm.decode``).
    """

    config: WhisperConfig

    PACKING = False

    def setup(self) -> None:
        self.setup_stacks()
        cfg, b = self.config, self.config.block

        def conv(channels, name):
            return Einsum((3, channels, b.d_model), (None, None, sh.EMBED), in_axis=(0, 1), out_axis=2, use_bias=True,
                          dtype=b.dtype, param_dtype=b.param_dtype, name=name)  # fmt: skip

        self.conv1, self.conv2 = conv(cfg.num_mel_bins, "conv1"), conv(b.d_model, "conv2")
        self.tgt_embed = Embed(cfg.vocab_size, b.d_model, embedding_init=nn.initializers.normal(0.02), dtype=b.dtype,
                               param_dtype=b.param_dtype, name="embed")  # fmt: skip
        self.tgt_pos = LearnedPositionEmbedding(cfg.max_target_positions, b.d_model, param_dtype=b.param_dtype,
                                                name="tgt_pos")  # fmt: skip
        self.logits_proj = OutputHead(cfg.vocab_size, tied=True, dtype=b.dtype, param_dtype=b.param_dtype)

    def encode(self, src: Array, *, deterministic: bool = True) -> Array:
        """``features [B, F, M]`` -> ``encoded [B, F/2, D]``."""
        cfg = self.config
        if src.ndim != 3 or src.shape[2] != cfg.num_mel_bins:
            raise ValueError(f"features must be [B, frames, {cfg.num_mel_bins}] log-mel frames, got shape {src.shape}")
        if src.shape[1] % 2 or src.shape[1] > 2 * cfg.max_source_positions:
            raise ValueError(f"features have {src.shape[1]} frames; Whisper takes an even number, "
                             f"at most {2 * cfg.max_source_positions}")  # fmt: skip
        x = gelu(conv1d(self.conv1, src.astype(cfg.block.dtype), 1))
        x = gelu(conv1d(self.conv2, x, 2))
        x = x + jnp.asarray(sinusoids(x.shape[1], cfg.block.d_model)).astype(x.dtype)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        return self.encoder(self.dropout(x, deterministic=deterministic), deterministic=deterministic)

    def decode(self, tgt_in: Array, encoded: Array, src: Array | None = None, *, deterministic: bool = True) -> Array:
        """``tgt_in [B, T]``, ``encoded [B, S, D]`` -> logits ``[B, T, V]`` (``src`` is not needed: no source padding)."""
        cfg = self.config
        if tgt_in.ndim != 2:
            raise ValueError(f"tgt_in must be [B, T] token ids, got shape {tgt_in.shape}")
        t = tgt_in.shape[1]
        positions, _ = self.decode_positions(t)
        if not cfg.block.decode and t > cfg.max_target_positions:
            raise ValueError(f"{t} target tokens exceed max_target_positions={cfg.max_target_positions}")
        y = self.tgt_embed(tgt_in) + self.tgt_pos(positions).astype(cfg.block.dtype)
        y = self.dropout(y, deterministic=deterministic)
        mask = None if cfg.block.decode else causal_mask(t)  # the KV cache hides later positions itself
        y = self.decoder(y, encoded=encoded, mask=mask, deterministic=deterministic)
        return self.logits_proj(y, self.tgt_embed)


# openai/whisper-tiny: 37,760,640 parameters as Hugging Face counts them, 576,000 of which are the
# fixed sinusoids of the encoder's 1500 positions (a frozen weight there); tfm computes those, so its
# count is 37,184,640.
whisper_tiny = WhisperConfig()
WHISPER_TINY_SINUSOIDS = 1500 * 384
# A small one for tests and CPU recipes: character vocabularies with pad 0, start 1, end 2.
whisper_micro = WhisperConfig(vocab_size=32, num_mel_bins=80, max_source_positions=256, max_target_positions=64,
                              num_encoder_layers=2, num_decoder_layers=2, pad_id=0, bos_id=1,
                              eos_id=2).replace(d_model=32, num_heads=4, d_ff=64)  # fmt: skip

__all__ = ["WHISPER_TINY_SINUSOIDS", "Whisper", "WhisperConfig", "conv1d", "sinusoids", "whisper_micro", "whisper_tiny"]
