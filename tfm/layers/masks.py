"""Attention masks.

Convention (used everywhere in tfm): a mask is boolean, ``True`` means *may
attend*, and it is broadcastable to ``[B, N, T, S]`` (batch, heads, query
positions, key positions). Every helper here returns ``[B|1, 1, T, S]`` so the
results combine with ``&`` / ``|`` and broadcast over heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
from jax import Array

if TYPE_CHECKING:
    import numpy as np


def causal_mask(length: int, kv_length: int | None = None) -> Array:
    """The decoder's "subsequent" mask: position t may attend to positions <= t.

    Returns ``[1, 1, T, S]`` (lower triangle including the diagonal). With
    ``kv_length > length`` the queries are taken as the *last* ``length``
    positions (e.g. a chunk appended to a cache), so query t sits at
    absolute position ``kv_length - length + t``.
    """
    kv_length = length if kv_length is None else kv_length
    if length < 0 or kv_length < length:
        raise ValueError(f"causal_mask needs 0 <= length <= kv_length, got {length=}, {kv_length=}")
    q = jnp.arange(length)[:, None] + (kv_length - length)
    k = jnp.arange(kv_length)[None, :]
    return (k <= q)[None, None]


def padding_mask(q_valid: Array, kv_valid: Array | None = None) -> Array:
    """Mask from per-position validity: ``[B, T]`` (and ``[B, S]``) bools -> ``[B, 1, T, S]``.

    A pair (t, s) may attend iff both positions are real tokens. Rows of
    padded queries are fully masked (their outputs are ignored by the loss).
    """
    kv_valid = q_valid if kv_valid is None else kv_valid
    if q_valid.ndim != 2 or kv_valid.ndim != 2:
        raise ValueError(f"padding_mask wants [B, T] and [B, S], got {q_valid.shape} and {kv_valid.shape}")
    return (q_valid[:, None, :, None] & kv_valid[:, None, None, :]).astype(bool)


def padding_mask_from_tokens(q_tokens: Array, kv_tokens: Array | None = None, pad_id: int = 0) -> Array:
    """``padding_mask`` where padding is the token id ``pad_id``: ``[B, T]`` ints -> ``[B, 1, T, S]``."""
    kv_tokens = q_tokens if kv_tokens is None else kv_tokens
    return padding_mask(q_tokens != pad_id, kv_tokens != pad_id)


def key_padding_mask(kv_valid: Array) -> Array:
    """``[B, S]`` validity -> ``[B, 1, 1, S]``: every query may attend to the real keys only.

    Masking keys (not queries) keeps rows of padded queries well defined;
    their outputs are ignored by the loss.
    """
    return kv_valid[:, None, None, :].astype(bool)


def segment_mask(q_segments: Array, kv_segments: Array | None = None) -> Array:
    """Packed sequences: query and key may attend iff they carry the same segment id.

    ``[B, T]`` (and ``[B, S]``) ints -> ``[B, 1, T, S]``. Segment id 0 is
    padding by convention and attends to nothing.
    """
    kv_segments = q_segments if kv_segments is None else kv_segments
    same = q_segments[:, None, :, None] == kv_segments[:, None, None, :]
    real = (q_segments != 0)[:, None, :, None] & (kv_segments != 0)[:, None, None, :]
    return same & real


def local_mask(length: int, window: int, *, causal: bool = True, kv_length: int | None = None) -> Array:
    """Sliding window: query t may attend to keys s with ``t - window < s <= t``.

    With ``causal=False`` the window is symmetric: ``|t - s| < window``.
    Returns ``[1, 1, T, S]``. Queries sit at the last ``length`` of
    ``kv_length`` positions, as in ``causal_mask``.
    """
    if window < 1:
        raise ValueError(f"local_mask window must be >= 1, got {window}")
    kv_length = length if kv_length is None else kv_length
    q = jnp.arange(length) + (kv_length - length)
    return local_mask_at(q, jnp.arange(kv_length), window, causal=causal)[None, None]


def local_mask_at(q_pos: Array, k_pos: Array, window: int, *, causal: bool = True) -> Array:
    """``local_mask`` for queries and keys at the given absolute positions: ``[T, S]``."""
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist < window) & (dist >= 0) if causal else (abs(dist) < window)


def is_global(pos: np.ndarray | Array, global_tokens: int = 0, global_stride: int = 0) -> np.ndarray | Array:
    """Which positions are global in ``block_sparse_mask`` (numpy or jax arrays alike)."""
    g = pos < global_tokens
    return g | (pos % global_stride == 0) if global_stride > 0 else g


def block_sparse_mask(
    length: int,
    block_size: int,
    *,
    num_local_blocks: int = 1,
    global_tokens: int = 0,
    causal: bool = False,
    global_stride: int = 0,
) -> Array:
    """Block-local plus global pattern (Longformer / BigBird style), as a dense mask.

    Positions are grouped into blocks of ``block_size``; a query may attend to
    keys within ``num_local_blocks`` blocks of its own (on both sides, or only
    backwards when ``causal``). Global positions attend to everything and are
    attended to by everything: the first ``global_tokens`` positions and, when
    ``global_stride > 0``, every position ``p`` with ``p % global_stride == 0``.
    ``causal`` then ANDs the whole pattern with ``s <= t``. Returns ``[1, 1, T, T]``.
    """
    if block_size < 1 or num_local_blocks < 0 or global_tokens < 0 or global_stride < 0:
        raise ValueError(
            f"bad block_sparse_mask arguments: {block_size=}, {num_local_blocks=}, {global_tokens=}, {global_stride=}"
        )
    pos = jnp.arange(length)
    return block_sparse_mask_at(pos, pos, block_size, num_local_blocks=num_local_blocks, global_tokens=global_tokens,
                                global_stride=global_stride, causal=causal)[None, None]  # fmt: skip


def block_sparse_mask_at(q_pos: Array, k_pos: Array, block_size: int, *, num_local_blocks: int = 1,
                         global_tokens: int = 0, global_stride: int = 0, causal: bool = False) -> Array:  # fmt: skip
    """``block_sparse_mask`` for queries and keys at the given absolute positions: ``[T, S]``."""
    q, k = q_pos[:, None], k_pos[None, :]
    m = jnp.abs(q // block_size - k // block_size) <= num_local_blocks
    m = m | is_global(q, global_tokens, global_stride) | is_global(k, global_tokens, global_stride)
    return m & (k <= q) if causal else m


def and_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the masks that are not None (None if all are None)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_and(out, m)
    return out


def or_masks(*masks: Array | None) -> Array | None:
    """Logical OR of the masks that are not None (None if all are None)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else jnp.logical_or(out, m)
    return out


def dense_mask(t: int, s: int, causal: bool, kv_valid: Array | None) -> Array | None:
    """The dense equivalent of ``causal`` + key padding: ``[B|1, 1, T, S]`` or None."""
    return and_masks(
        causal_mask(t, s) if causal else None,
        None if kv_valid is None else kv_valid[:, None, None, :],
    )
