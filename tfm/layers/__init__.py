"""Pure ``flax.linen`` building blocks of the Transformer family (no training code)."""

from tfm.layers.attention import MultiHeadAttention
from tfm.layers.attention_kinds import ATTENTION_KINDS, AttentionKind, AttentionOptions, register
from tfm.layers.blocks import REMAT_POLICIES, BlockConfig, DecoderBlock, EncoderBlock, Stack
from tfm.layers.dot_product import dot_product_attention
from tfm.layers.embed import Embed, OutputHead
from tfm.layers.feedforward import MLP
from tfm.layers.masks import (
    and_masks,
    block_sparse_mask,
    causal_mask,
    local_mask,
    or_masks,
    padding_mask,
    padding_mask_from_tokens,
    segment_mask,
)
from tfm.layers.norms import LayerNorm, RMSNorm, make_norm
from tfm.layers.position import (
    LearnedPositionEmbedding,
    RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_position_bucket,
    sinusoidal_positions,
)

__all__ = [
    "ATTENTION_KINDS",
    "AttentionKind",
    "AttentionOptions",
    "BlockConfig",
    "DecoderBlock",
    "Embed",
    "EncoderBlock",
    "LayerNorm",
    "LearnedPositionEmbedding",
    "MLP",
    "MultiHeadAttention",
    "OutputHead",
    "REMAT_POLICIES",
    "RMSNorm",
    "RelativePositionBias",
    "Stack",
    "alibi_bias",
    "alibi_slopes",
    "and_masks",
    "apply_rope",
    "block_sparse_mask",
    "causal_mask",
    "dot_product_attention",
    "local_mask",
    "make_norm",
    "or_masks",
    "padding_mask",
    "padding_mask_from_tokens",
    "register",
    "relative_position_bucket",
    "segment_mask",
    "sinusoidal_positions",
]
