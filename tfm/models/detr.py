"""DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers"): detection as set prediction.

    images [B, H, W, C] -> 3x3 stride-2 convs (+ GELU) -> 1x1 projection -> tokens [B, h w, D]
      -> + 2-D sine positions -> N x EncoderBlock                            -> encoded [B, h w, D]
    object queries [Q, D] (learned) -> N x DecoderBlock(encoded), no causal mask -> LN
      -> class head [B, Q, C + 1] ("no object" last) and box head (3-layer MLP, sigmoid) [B, Q, 4]

Each of the ``Q`` queries predicts one box ``(cx, cy, w, h)`` in ``[0, 1]`` of the image, or
"no object"; the queries attend to each other (so they can agree who predicts what) and to
the image. Training matches predictions to targets one to one (the Hungarian matching) and
scores the matched pairs: ``tfm.detection``, the ``detect`` task.

Differences from the paper, for a model that trains on a CPU: a small convolutional stem in
place of the ResNet backbone; the positions (encoder) and the object queries (decoder) are
added once to the stacks' inputs, where DETR adds them to queries and keys in every layer;
the box and class heads read the last decoder layer only (no auxiliary decoding losses).
The stacks are tfm's blocks, pre- or post-LN (the paper's are post-LN).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm import sharding as sh
from tfm.layers.blocks import BlockConfig, DecoderBlock, EncoderBlock, Stack
from tfm.layers.conv import conv_general_dilated
from tfm.layers.linear import Einsum
from tfm.layers.norms import make_norm
from tfm.models.common import ModelConfig


@dataclasses.dataclass(frozen=True)
class DETRConfig(ModelConfig):
    """DETR's own fields; ``block`` holds both stacks' layers (the decoder's are never causal)."""

    image_size: int = 64
    num_channels: int = 3
    stem_channels: tuple[int, ...] = (32, 64, 128)  # each a 3x3 stride-2 convolution: 64 px -> an 8 x 8 grid
    num_queries: int = 10
    num_classes: int = 6  # real classes; the head has one more ("no object")
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    scan_layers: bool = True
    remat_policy: str = "none"
    block: BlockConfig = BlockConfig(d_model=128, num_heads=4, d_ff=512, activation="relu", norm_position="pre",
                                     dropout_rate=0.1)  # fmt: skip

    def check(self) -> None:
        if not self.stem_channels or any(int(c) < 1 for c in self.stem_channels):
            raise ValueError(f"stem_channels must be one or more positive widths, got {self.stem_channels}")
        if self.num_queries < 1 or self.num_classes < 1:
            raise ValueError(f"num_queries={self.num_queries}, num_classes={self.num_classes}: each must be >= 1")
        if self.block.d_model % 4:
            raise ValueError(f"2-D sine positions need d_model divisible by 4, got {self.block.d_model}")

    @property
    def grid_size(self) -> int:
        """Side of the stem's feature map (SAME padding halves it per convolution, rounding up)."""
        side = self.image_size
        for _ in self.stem_channels:
            side = -(-side // 2)
        return side


def sine_positions_2d(height: int, width: int, channels: int, temperature: float = 10_000.0) -> np.ndarray:
    """DETR's ``PositionEmbeddingSine(normalize=True)`` for a full ``height x width`` grid: ``[h w, channels]``.

    Half the channels encode the row, half the column, each ``(y + 1) / h · 2π`` at the timescales
    ``temperature^(2 floor(i / 2) / (channels / 2))``, sine at even and cosine at odd channels; rows first.
    """
    half, eps, scale = channels // 2, 1e-6, 2 * math.pi
    y = (np.arange(1, height + 1, dtype=np.float64) / (height + eps) * scale)[:, None]
    x = (np.arange(1, width + 1, dtype=np.float64) / (width + eps) * scale)[:, None]
    dim_t = temperature ** (2 * (np.arange(half) // 2) / half)

    def encode(pos):
        angle = pos / dim_t
        return np.stack([np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])], axis=2).reshape(len(pos), half)

    ey, ex = encode(y), encode(x)
    grid = np.concatenate([np.repeat(ey[:, None], width, 1), np.repeat(ex[None, :], height, 0)], axis=-1)
    return grid.reshape(height * width, channels).astype(np.float32)


class DETR(nn.Module):
    """``images [B, H, W, C]`` -> ``(class_logits [B, Q, C + 1], boxes [B, Q, 4])`` (float32, boxes cx, cy, w, h)."""

    config: DETRConfig

    @nn.compact
    def __call__(self, images: Array, *, deterministic: bool = True) -> tuple[Array, Array]:
        cfg, blk = self.config, self.config.block
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}], got {images.shape}")
        x = images.astype(blk.dtype)
        for i, channels in enumerate(cfg.stem_channels):
            conv = nn.Conv(
                int(channels), (3, 3), strides=(2, 2), padding="SAME", dtype=blk.dtype, param_dtype=blk.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)), name=f"stem_{i}",
                conv_general_dilated=conv_general_dilated,
            )  # fmt: skip
            x = nn.gelu(conv(x), approximate=False)
        b, h, w, c = x.shape
        d = blk.d_model
        dense = lambda shape, axes, name, bias=True: Einsum(  # noqa: E731
            shape, axes, use_bias=bias, dtype=blk.dtype, param_dtype=blk.param_dtype, name=name)
        x = dense((c, d), (None, sh.EMBED), "input_proj")("BHWC,CD->BHWD", x).reshape(b, h * w, d)
        x = x + jnp.asarray(sine_positions_2d(h, w, d)).astype(x.dtype)
        x = nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.EMBED))
        x = nn.Dropout(blk.dropout_rate)(x, deterministic=deterministic)
        encoded = Stack(EncoderBlock, dataclasses.replace(blk, causal=False, decode=False), cfg.num_encoder_layers,
                        cfg.scan_layers, cfg.remat_policy, name="encoder")(x, deterministic=deterministic)  # fmt: skip
        queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, sh.EMBED)),
                             (cfg.num_queries, d), blk.param_dtype)  # fmt: skip
        y = jnp.broadcast_to(queries.astype(blk.dtype)[None], (b, cfg.num_queries, d))
        y = Stack(DecoderBlock, dataclasses.replace(blk, causal=False, decode=False), cfg.num_decoder_layers,
                  cfg.scan_layers, cfg.remat_policy, name="decoder")(y, encoded=encoded, deterministic=deterministic)  # fmt: skip
        if blk.norm_position == "post":  # DETR's decoder ends with a LayerNorm even when post-LN
            y = make_norm(blk.norm, blk.norm_epsilon, dtype=blk.dtype, param_dtype=blk.param_dtype,
                          name="decoder_norm")(y)  # fmt: skip
        logits = dense((d, cfg.num_classes + 1), (sh.EMBED, None), "class_head")("BQD,DC->BQC", y)
        z = y
        for i in range(2):
            z = jax.nn.relu(dense((d, d), (sh.EMBED, None), f"box_mlp_{i}")("BQD,DE->BQE", z))
        boxes = jax.nn.sigmoid(dense((d, 4), (None, None), "box_head")("BQD,DK->BQK", z).astype(jnp.float32))
        return logits.astype(jnp.float32), boxes


# Small models for the CPU recipe and the tests (no ResNet backbone, so no published count applies).
detr_small = DETRConfig()
detr_tiny = DETRConfig(image_size=32, stem_channels=(8, 16), num_queries=6, num_classes=6, num_encoder_layers=1,
                       num_decoder_layers=1).replace(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)  # fmt: skip

__all__ = ["DETR", "DETRConfig", "detr_small", "detr_tiny", "sine_positions_2d"]
