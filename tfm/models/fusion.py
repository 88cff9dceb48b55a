"""A multimodal fusion Transformer: text, image and audio encoders, then cross-modal layers.

    text   [B, T]       -> embed + learned positions -> L_t x EncoderBlock (padding masked) -> + m_text
    images [B, H, W, C] -> P x P patches -> linear + learned positions -> L_i x EncoderBlock -> + m_image
    audio  [B, F, M]    -> Whisper's conv stem (stride 2) + sinusoids -> L_a x EncoderBlock -> + m_audio
    [FUSE; text; image; audio tokens] -> L_f x EncoderBlock over the concatenation -> FUSE's state
      -> linear -> logits [B, num_classes]

Each modality keeps its own encoder (the field's single-stream fusion, as in VisualBERT or
the "merged attention" of Dou et al. 2022, after per-modality encoders): the fusion layers
are plain self-attention over every token of every given modality, and a learned modality
embedding ``m_*`` tells them apart. The first token ``FUSE`` (learned) is read out for the head.

Any subset of the modalities may be given: an omitted one (``None``) adds no tokens. Within a
batch, ``*_present [B]`` (bool) marks the rows that have a modality; the fusion layers then
mask that modality's tokens out of every query's keys, so a row without it gets the output it
would get if the modality had been omitted. Text padding (``pad_id``) is masked the same way.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.embed import Embed
from tfm.layers.feedforward import gelu
from tfm.layers.linear import Einsum
from tfm.layers.masks import key_padding_mask
from tfm.layers.position import LearnedPositionEmbedding
from tfm.models.common import ModelConfig
from tfm.models.vit import patchify
from tfm.models.whisper import conv1d, sinusoids

MODALITIES = ("text", "images", "audio")


@dataclasses.dataclass(frozen=True)
class FusionConfig(ModelConfig):
    """The three encoders' and the fusion's fields; ``block`` is shared by every layer."""

    vocab_size: int = 64
    max_text_len: int = 16
    pad_id: int = 0
    image_size: int = 28
    patch_size: int = 7
    num_channels: int = 1
    num_mel_bins: int = 80
    max_audio_frames: int = 256  # log-mel frames; the stem halves them
    text_layers: int = 1
    image_layers: int = 2
    audio_layers: int = 1
    fusion_layers: int = 2
    num_classes: int = 2
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(d_model=64, num_heads=4, d_ff=256, activation="gelu", norm_position="pre",
                                     dropout_rate=0.0)  # fmt: skip

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if min(self.text_layers, self.image_layers, self.audio_layers, self.fusion_layers) < 1:
            raise ValueError("text_layers, image_layers, audio_layers and fusion_layers must each be >= 1")
        if self.block.d_model % 2:
            raise ValueError(f"the audio encoder's sinusoids need an even d_model, got {self.block.d_model}")


def _present(flag: Array | None, b: int, n: int) -> Array:
    """``[B, n]`` validity of a modality's ``n`` tokens from its ``[B]`` presence flags (all present: None)."""
    if flag is None:
        return jnp.ones((b, n), bool)
    if flag.shape != (b,):
        raise ValueError(f"presence flags must be [B] = [{b}], got shape {flag.shape}")
    return jnp.broadcast_to(flag.astype(bool)[:, None], (b, n))


class Fusion(nn.Module):
    """``__call__(text=None, images=None, audio=None, *, text_present=None, ...) -> logits [B, num_classes]``."""

    config: FusionConfig

    def _stack(self, layers: int, name: str) -> Stack:
        cfg = self.config
        blk = dataclasses.replace(cfg.block, causal=False, decode=False)
        return Stack(EncoderBlock, blk, layers, cfg.scan_layers, cfg.remat_policy, name=name)

    def _dense(self, shape: tuple[int, ...], axes: tuple, name: str, **kw) -> Einsum:
        b = self.config.block
        return Einsum(shape, axes, use_bias=True, dtype=b.dtype, param_dtype=b.param_dtype, name=name, **kw)

    def encode_text(self, text: Array, deterministic: bool) -> tuple[Array, Array]:
        cfg, b = self.config, self.config.block
        if text.ndim != 2 or text.shape[1] > cfg.max_text_len:
            raise ValueError(f"text must be [B, T] ids with T <= max_text_len={cfg.max_text_len}, got {text.shape}")
        x = Embed(cfg.vocab_size, b.d_model, embedding_init=nn.initializers.normal(0.02), dtype=b.dtype,
                  param_dtype=b.param_dtype, name="text_embed")(text)  # fmt: skip
        x = x + LearnedPositionEmbedding(cfg.max_text_len, b.d_model, param_dtype=b.param_dtype,
                                         name="text_pos")(jnp.arange(text.shape[1])).astype(x.dtype)  # fmt: skip
        valid = text != cfg.pad_id
        mask = key_padding_mask(valid)
        return self._stack(cfg.text_layers, "text_encoder")(x, mask=mask, deterministic=deterministic), valid

    def encode_images(self, images: Array, deterministic: bool) -> Array:
        cfg, b = self.config, self.config.block
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {images.shape}")
        p, n = cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2
        embed = self._dense((p, p, cfg.num_channels, b.d_model), (None, None, None, sh.EMBED), "patch_embed",
                            in_axis=(0, 1, 2), out_axis=3)  # fmt: skip
        x = embed("BTPQC,PQCD->BTD", patchify(images, p))
        x = x + LearnedPositionEmbedding(n, b.d_model, param_dtype=b.param_dtype, name="image_pos")(
            jnp.arange(n)).astype(x.dtype)  # fmt: skip
        return self._stack(cfg.image_layers, "image_encoder")(x, deterministic=deterministic)

    def encode_audio(self, audio: Array, deterministic: bool) -> Array:
        cfg, b = self.config, self.config.block
        if audio.ndim != 3 or audio.shape[2] != cfg.num_mel_bins or audio.shape[1] > cfg.max_audio_frames:
            raise ValueError(f"audio must be [B, F <= {cfg.max_audio_frames}, {cfg.num_mel_bins}] log-mel frames, "
                             f"got {audio.shape}")  # fmt: skip
        conv = lambda c, name: self._dense((3, c, b.d_model), (None, None, sh.EMBED), name, in_axis=(0, 1), out_axis=2)  # noqa: E731
        x = gelu(conv1d(conv(cfg.num_mel_bins, "audio_conv1"), audio.astype(b.dtype), 1))
        x = gelu(conv1d(conv(b.d_model, "audio_conv2"), x, 2))
        x = x + jnp.asarray(sinusoids(x.shape[1], b.d_model)).astype(x.dtype)
        return self._stack(cfg.audio_layers, "audio_encoder")(x, deterministic=deterministic)

    @nn.compact
    def __call__(self, text: Array | None = None, images: Array | None = None, audio: Array | None = None, *,
                 text_present: Array | None = None, images_present: Array | None = None,
                 audio_present: Array | None = None, deterministic: bool = True) -> Array:  # fmt: skip
        cfg, b = self.config, self.config.block
        given = {"text": text, "images": images, "audio": audio}
        flags = {"text": text_present, "images": images_present, "audio": audio_present}
        if all(v is None for v in given.values()):
            raise ValueError(f"give at least one of {list(MODALITIES)}")
        for name in MODALITIES:
            if given[name] is None and flags[name] is not None:
                raise ValueError(f"{name}_present is given without {name}")
        batch = {v.shape[0] for v in given.values() if v is not None}
        if len(batch) != 1:
            raise ValueError(f"the modalities have different batch sizes: {sorted(batch)}")
        n = batch.pop()
        modality = self.param("modality", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, sh.EMBED)),
                              (len(MODALITIES), b.d_model), b.param_dtype)  # fmt: skip
        fuse = self.param("fuse", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, sh.EMBED)),
                          (1, 1, b.d_model), b.param_dtype)  # fmt: skip
        tokens, valid = [jnp.broadcast_to(fuse.astype(b.dtype), (n, 1, b.d_model))], [jnp.ones((n, 1), bool)]
        for i, name in enumerate(MODALITIES):
            x = given[name]
            if x is None:
                continue
            if name == "text":
                x, real = self.encode_text(x, deterministic)
            else:
                x = self.encode_images(x, deterministic) if name == "images" else self.encode_audio(x, deterministic)
                real = jnp.ones(x.shape[:2], bool)
            tokens.append(x + modality[i].astype(x.dtype))
            valid.append(real & _present(flags[name], n, x.shape[1]))
        x = jnp.concatenate(tokens, axis=1)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        x = nn.Dropout(b.dropout_rate)(x, deterministic=deterministic)
        mask = key_padding_mask(jnp.concatenate(valid, axis=1))
        x = self._stack(cfg.fusion_layers, "fusion")(x, mask=mask, deterministic=deterministic)
        head = self._dense((b.d_model, cfg.num_classes), (sh.EMBED, None), "head")
        return head("BD,DC->BC", x[:, 0]).astype(jnp.float32)


fusion_tiny = FusionConfig(image_layers=1, fusion_layers=1).replace(d_model=32, num_heads=4, d_ff=64)

__all__ = ["MODALITIES", "Fusion", "FusionConfig", "fusion_tiny"]
