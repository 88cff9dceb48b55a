"""CLIP (Radford et al. 2021): an image tower and a text tower trained to agree.

    image [B, H, W, C] -> P x P patches -> linear -> prepend [class] -> + positions -> LN
      -> L x pre-LN EncoderBlock -> LN of the class token -> W_image -> L2-normalise -> I [B, E]
    text [B, T] -> embed + positions -> L x pre-LN causal EncoderBlock -> LN
      -> the state at the first EOT token -> W_text -> L2-normalise -> T [B, E]
    logits = exp(t) · I Tᵀ [B, B],   t learned, exp(t) from 1/0.07, clipped at 100

The contrastive loss (``tfm.tasks.Contrastive``) is the symmetric cross-entropy of those
logits: image ``i`` should pick text ``i`` among the batch's texts, and text ``i`` image ``i``.
The two towers share ``block`` (norm, activation: quick GELU, dropout, dtypes); the image
tower has its own width, heads and FFN width (``vision_*``) and is never causal.
``encode_image`` and ``encode_text`` give the normalised features alone (zero-shot
classification: the nearest class prompt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.embed import Embed
from tfm.layers.linear import Einsum
from tfm.layers.masks import causal_mask
from tfm.layers.position import LearnedPositionEmbedding
from tfm.models.common import ModelConfig
from tfm.models.vit import patchify


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
    """CLIP's own fields; ``block`` holds the text tower's layers (the image tower's differ in ``vision_*``)."""

    embed_dim: int = 512  # E, the joint feature space
    vocab_size: int = 49408
    max_len: int = 77
    text_layers: int = 12
    eot_id: int = 49407  # the text's feature is its state at the first EOT token
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    vision_layers: int = 12
    vision_d_model: int = 768
    vision_num_heads: int = 12
    vision_d_ff: int = 3072
    logit_scale_init: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(d_model=512, num_heads=8, d_ff=2048, activation="quick_gelu", norm_position="pre",
                                     dropout_rate=0.0)  # fmt: skip

    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "decode")  # the text tower is causal, the image tower is not

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"eot_id={self.eot_id} is not a token of the vocabulary of {self.vocab_size}")
        if self.block.attention != "full":
            raise ValueError(f"attention={self.block.attention!r}: CLIP's towers use attention='full'")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def text_block(self) -> BlockConfig:
        return dataclasses.replace(self.block, causal=True)

    @property
    def vision_block(self) -> BlockConfig:
        return dataclasses.replace(self.block, d_model=self.vision_d_model, num_heads=self.vision_num_heads,
                                   d_ff=self.vision_d_ff, head_dim=None, num_kv_heads=None, causal=False)  # fmt: skip


class ImageTower(nn.Module):
    """``images [B, H, W, C]`` -> the class token's final state ``[B, D_vision]``."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, images: Array, deterministic: bool = True) -> Array:
        cfg, blk = self.config, self.config.vision_block
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {images.shape}")
        b, p, c = images.shape[0], cfg.patch_size, cfg.num_channels
        patches = patchify(images, p)
        embed = Einsum((p, p, c, blk.d_model), (None, None, None, sh.EMBED), in_axis=(0, 1, 2), out_axis=3,
                       dtype=blk.dtype, param_dtype=blk.param_dtype, name="patch_embed")  # fmt: skip
        x = embed("BTPQC,PQCD->BTD", patches)
        init = nn.with_logical_partitioning(nn.initializers.normal(blk.d_model**-0.5), (sh.EMBED,))
        cls = self.param("cls", init, (blk.d_model,), blk.param_dtype).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, blk.d_model)), x], axis=1)
        pos = LearnedPositionEmbedding(cfg.num_patches + 1, blk.d_model, param_dtype=blk.param_dtype, name="pos_embed")
        x = x + pos(jnp.arange(cfg.num_patches + 1)).astype(x.dtype)
        x = blk.make_norm("pre_norm")(x)
        x = Stack(EncoderBlock, blk, cfg.vision_layers, cfg.scan_layers, cfg.remat_policy, name="encoder")(
            x, deterministic=deterministic)  # fmt: skip
        return x[:, 0]  # the Stack's final LN is CLIP's post-LN of the class token (per position, so the same)


class TextTower(nn.Module):
    """``tokens [B, T]`` -> the final state at each row's first EOT token ``[B, D]`` (the last position if none)."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, tokens: Array, deterministic: bool = True) -> Array:
        cfg, blk = self.config, self.config.text_block
        if tokens.ndim != 2 or tokens.shape[1] > cfg.max_len:
            raise ValueError(f"tokens must be [B, T <= max_len={cfg.max_len}] ids, got shape {tokens.shape}")
        t = tokens.shape[1]
        embed = Embed(cfg.vocab_size, blk.d_model, embedding_init=nn.initializers.normal(0.02), dtype=blk.dtype,
                      param_dtype=blk.param_dtype, name="embed")  # fmt: skip
        pos = LearnedPositionEmbedding(cfg.max_len, blk.d_model, nn.initializers.normal(0.01), param_dtype=blk.param_dtype,
                                       name="pos_embed")  # fmt: skip
        x = embed(tokens) + pos(jnp.arange(t)).astype(blk.dtype)
        x = Stack(EncoderBlock, blk, cfg.text_layers, cfg.scan_layers, cfg.remat_policy, name="encoder")(
            x, mask=causal_mask(t), deterministic=deterministic)  # fmt: skip (ends with the final LN)
        is_eot = tokens == cfg.eot_id
        where = jnp.where(is_eot.any(axis=1), jnp.argmax(is_eot, axis=1), t - 1)
        return jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]


def normalize(x: Array) -> Array:
    """``x / ||x||`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class CLIP(nn.Module):
    """``(images [B, H, W, C], tokens [B', T])`` -> ``(image_features [B, E], text_features [B', E], scale)``:
    features L2-normalised (float32), ``scale = min(exp(t), max_logit_scale)`` multiplies their dot products."""

    config: CLIPConfig

    def setup(self) -> None:
        cfg = self.config
        self.image_tower, self.text_tower = ImageTower(cfg), TextTower(cfg)

        def projection(width):
            return Einsum((width, cfg.embed_dim), (sh.EMBED, None), dtype=cfg.block.dtype,
                          param_dtype=cfg.block.param_dtype)  # fmt: skip

        self.image_projection = projection(cfg.vision_d_model)
        self.text_projection = projection(cfg.block.d_model)
        init = nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init), ())
        self.logit_scale = self.param("logit_scale", init, (), jnp.float32)

    def encode_image(self, images: Array, *, deterministic: bool = True) -> Array:
        return normalize(self.image_projection("BD,DE->BE", self.image_tower(images, deterministic)))

    def encode_text(self, tokens: Array, *, deterministic: bool = True) -> Array:
        return normalize(self.text_projection("BD,DE->BE", self.text_tower(tokens, deterministic)))

    def scale(self) -> Array:
        return jnp.minimum(jnp.exp(self.logit_scale), self.config.max_logit_scale)

    def __call__(self, images: Array, tokens: Array, *, deterministic: bool = True) -> tuple[Array, Array, Array]:
        return (self.encode_image(images, deterministic=deterministic),
                self.encode_text(tokens, deterministic=deterministic), self.scale())  # fmt: skip


clip_vit_b32 = CLIPConfig()  # openai/clip-vit-base-patch32: 151,277,313 parameters
clip_tiny = CLIPConfig(embed_dim=32, vocab_size=64, max_len=16, text_layers=2, eot_id=1, image_size=28, patch_size=7,
                       num_channels=1, vision_layers=2, vision_d_model=32, vision_num_heads=4,
                       vision_d_ff=64).replace(d_model=32, num_heads=4, d_ff=64)  # fmt: skip

__all__ = ["CLIP", "CLIPConfig", "ImageTower", "TextTower", "clip_tiny", "clip_vit_b32", "normalize"]
