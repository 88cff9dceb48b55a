"""Vision Transformer (Dosovitskiy et al. 2021): an image is a sequence of 16x16 words.

    image [B, H, W, C] -> P x P patches -> linear -> prepend [class] -> + learned positions
      -> dropout -> L x pre-LN EncoderBlock -> LN -> class token (or mean) -> linear -> logits

``stem_channels`` turns it into the paper's *hybrid* ViT (section 3.1: the patches are
taken from a CNN feature map instead of raw pixels), with the small convolutional stem
of Xiao et al. 2021 ("Early convolutions help transformers see better"): each entry is a
3x3 stride-2 convolution + GELU, and the P x P patches are cut from its output.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.conv import conv_general_dilated
from tfm.layers.linear import Einsum
from tfm.layers.position import LearnedPositionEmbedding
from tfm.models.common import ModelConfig

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
    """ViT's own fields; ``block`` holds the layers' (pre-LN, GELU, LayerNorm eps 1e-6).

    Every ``block`` field is also addressed by its name (``ModelConfig``):
    ``vit_tiny.replace(num_experts=4, moe_every=2)`` (a V-MoE).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_layers: int = 12
    num_classes: int = 1000
    pool: str = "cls"
    stem_channels: tuple[int, ...] = ()  # () -> patches of raw pixels; (c1, c2, ...) -> hybrid conv stem
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(
        d_model=768, num_heads=12, d_ff=3072, activation="gelu", norm_epsilon=1e-6, norm_position="pre",
        dropout_rate=0.0, attention_dropout_rate=0.0,
    )  # fmt: skip

    DERIVED: ClassVar[tuple[str, ...]] = ("causal", "decode")  # a bidirectional encoder over patches

    def check(self) -> None:
        if self.feature_size % self.patch_size:
            where = f"the stem's {self.feature_size}x{self.feature_size} feature map" if self.stem_channels else f"image_size={self.image_size}"
            raise ValueError(f"{where} is not divisible by patch_size={self.patch_size}")
        if any(int(c) < 1 for c in self.stem_channels):
            raise ValueError(f"stem_channels must be positive, got {self.stem_channels}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")

    @property
    def feature_size(self) -> int:
        """Side of what the patches are cut from: the image, or the stem's output (SAME padding)."""
        size = self.image_size
        for _ in self.stem_channels:
            size = -(-size // 2)
        return size

    @property
    def num_patches(self) -> int:
        return (self.feature_size // self.patch_size) ** 2


vit_b16 = ViTConfig()
vit_tiny = vit_b16.replace(image_size=28, patch_size=7, num_channels=1, d_model=32, num_heads=4, num_layers=2, d_ff=64, num_classes=10)


def patchify(images: Array, patch_size: int) -> Array:
    """``[B, H, W, C] -> [B, (H/P)(W/P), P, P, C]``: row-major patches, the same order as a stride-P conv."""
    b, h, w, c = images.shape
    p = patch_size
    return images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p, p, c)


class ViT(nn.Module):
    """``images [B, H, W, C]`` (float) -> ``logits [B, num_classes]`` (float32)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array, *, deterministic: bool = True) -> Array:
        cfg, blk = self.config, self.config.block
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {images.shape}")
        for i, channels in enumerate(cfg.stem_channels):
            conv = nn.Conv(
                int(channels), (3, 3), strides=(2, 2), padding="SAME", dtype=blk.dtype, param_dtype=blk.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), name=f"stem_{i}",
                conv_general_dilated=conv_general_dilated,
            )  # fmt: skip
            images = nn.gelu(conv(images))
        p, c = cfg.patch_size, images.shape[-1]
        b, patches = images.shape[0], patchify(images, p)
        embed = Einsum(
            (p, p, c, blk.d_model), (None, None, None, sh.EMBED), in_axis=(0, 1, 2), out_axis=3,
            use_bias=True, dtype=blk.dtype, param_dtype=blk.param_dtype, name="patch_embed",
        )  # fmt: skip
        x = embed("BTPQC,PQCD->BTD", patches)
        cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, sh.EMBED)), (1, 1, blk.d_model), blk.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, blk.d_model)), x], axis=1)
        pos = LearnedPositionEmbedding(cfg.num_patches + 1, blk.d_model, param_dtype=blk.param_dtype, name="pos_embed")
        x = x + pos(jnp.arange(cfg.num_patches + 1)).astype(x.dtype)
        x = nn.Dropout(blk.dropout_rate)(x, deterministic=deterministic)
        x = Stack(EncoderBlock, blk, cfg.num_layers, cfg.scan_layers, cfg.remat_policy, name="encoder")(
            x, deterministic=deterministic
        )
        x = x[:, 0] if cfg.pool == "cls" else jnp.mean(x[:, 1:], axis=1)
        head = Einsum((blk.d_model, cfg.num_classes), (sh.EMBED, sh.CLASSES), use_bias=True, kernel_init=nn.initializers.zeros_init(), dtype=blk.dtype, param_dtype=blk.param_dtype, name="head")
        return head("BD,DC->BC", x).astype(jnp.float32)
