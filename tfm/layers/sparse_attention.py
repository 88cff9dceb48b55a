"""Sparse attention patterns that never build the full ``[T, S]`` score matrix.

* ``local_attention``: a sliding window (Longformer §3.1, Mistral-style SWA),
  computed block by block: O(T·w) memory.
* ``block_sparse_attention``: block-local plus global tokens (Longformer §3,
  BigBird §2): O(T·(block·local + #global)) memory.

Each equals ``dot_product_attention`` with the matching dense mask of
``tfm.layers.masks`` (``local_mask``, ``block_sparse_mask``); the tests check it.

Shapes use the legend of ``tfm.layers.dot_product`` (B, T, S, N, K, G = N // K,
H), plus, for the blocked computations:

    U  number of blocks the sequence is cut into
    W  positions inside one query block
    C  keys one query block sees (its own block and its neighbours)
    P  global positions

Masked scores get the most negative finite value, so a query that sees no key
(possible only with padding) still gives a finite output (uniform weights over
the keys its block looks at; the dense path spreads them over all S keys instead).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm.layers.dot_product import check_self_attention, compute_dtype, default_scale
from tfm.layers.masks import is_global


def _blocks_with_neighbours(x: Array, block: int, before: int, after: int) -> Array:
    """``[B, T, ...] -> [B, U, C, ...]`` with ``C = (before + 1 + after) * W``.

    Row u holds blocks ``u - before .. u + after`` of x, side by side. T is
    padded up to ``U * W`` and blocks outside the sequence are zeros (False
    for a boolean x), so the caller masks them by position.
    """
    b, t = x.shape[:2]
    u = -(-t // block)
    pad = [(0, 0), (before * block, u * block - t + after * block)] + [(0, 0)] * (x.ndim - 2)
    xb = jnp.pad(x, pad).reshape(b, u + before + after, block, *x.shape[2:])
    return jnp.concatenate([xb[:, j : j + u] for j in range(before + 1 + after)], axis=2)


def _block_positions(t: int, block: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute positions ``[U, W]`` of the queries and ``[U, C]`` of the keys of each block.

    Key positions outside ``[0, T)`` mark the padding added by
    ``_blocks_with_neighbours``. Static (numpy): they depend only on shapes.
    """
    u = -(-t // block)
    q_pos = np.arange(u)[:, None] * block + np.arange(block)[None, :]
    c = np.arange((before + 1 + after) * block)
    k_pos = (np.arange(u)[:, None] - before + c[None, :] // block) * block + c[None, :] % block
    return q_pos, k_pos


def _blocked_attention(
    query: Array,
    k_ctx: Array,
    v_ctx: Array,
    ctx_mask: Array,
    scale: float,
    k_glob: Array | None = None,
    v_glob: Array | None = None,
    glob_mask: Array | None = None,
) -> Array:
    """softmax over a block's context keys (and optionally shared global keys), per block.

    Args:
      query: ``[B, U, W, K, G, H]``.
      k_ctx, v_ctx: ``[B, U, C, K, H]``, the keys each query block sees.
      ctx_mask: bool, broadcastable to ``[B, U, W, C]``.
      k_glob, v_glob: ``[B, P, K, H]`` keys seen by every block, or None.
      glob_mask: bool, broadcastable to ``[B, U, W, P]``.

    Returns ``[B, U, W, K, G, H]`` in ``v_ctx.dtype``. The two key sets share
    one softmax, exactly as if they were concatenated along the key axis.
    """
    dtype = compute_dtype(query.dtype)
    b, u, w = query.shape[:3]
    c = k_ctx.shape[2]
    scores = jnp.einsum("BUWKGH,BUCKH->BKGUWC", query, k_ctx, preferred_element_type=dtype)
    mask = jnp.broadcast_to(ctx_mask, (b, u, w, c))
    if k_glob is not None:
        p = k_glob.shape[1]
        scores_glob = jnp.einsum("BUWKGH,BPKH->BKGUWP", query, k_glob, preferred_element_type=dtype)
        scores = jnp.concatenate([scores, scores_glob], axis=-1)
        mask = jnp.concatenate([mask, jnp.broadcast_to(glob_mask, (b, u, w, p))], axis=-1)
    scores = scores * jnp.asarray(scale, dtype)
    # The most negative finite value, not -inf: a fully masked row gives
    # uniform weights instead of NaN (the convention of dot_product_attention).
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v_ctx.dtype)
    out = jnp.einsum("BKGUWC,BUCKH->BUWKGH", weights[..., :c], v_ctx)
    if k_glob is not None:
        out = out + jnp.einsum("BKGUWP,BPKH->BUWKGH", weights[..., c:], v_glob)
    return out


def _query_blocks(query: Array, block: int, num_kv_heads: int) -> Array:
    """``[B, T, N, H] -> [B, U, W, K, G, H]``, padding T up to ``U * W``."""
    b, t, n, h = query.shape
    u = -(-t // block)
    query = jnp.pad(query, [(0, 0), (0, u * block - t), (0, 0), (0, 0)])
    return query.reshape(b, u, block, num_kv_heads, n // num_kv_heads, h)






def local_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    window: int,
    causal: bool = True,
    kv_valid: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Sliding-window self-attention, block by block (Longformer §3.1).

    Query t sees keys s with ``t - window < s <= t`` (``causal``) or
    ``|t - s| < window`` (bidirectional) — exactly ``masks.local_mask(T,
    window, causal=causal)``, ANDed with ``kv_valid``.

    The sequence is cut into blocks of ``W = min(window, T)`` positions (T
    padded up with masked keys). A window of w positions reaches at most
    ``ceil((w - 1) / W)`` blocks back (and forward when bidirectional): with
    ``W = w`` that is the previous block, so each query block scores
    ``[W, 2W]`` keys (``[W, 3W]`` bidirectional) with the exact band mask
    inside. Memory is O(T·w); no ``[T, T]`` array is built.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, T, K, H]`` (self-attention: S == T).
      window: w >= 1 (w = 1 attends to itself only).
      causal: one-sided (decoder) or symmetric window.
      kv_valid: ``[B, T]`` bool, True = real key, or None.
      scale: score scale, default ``1/sqrt(H)``.

    Returns:
      ``[B, T, N, H]`` in ``query.dtype``. Jit-able with ``window`` and
      ``causal`` static; differentiable.
    """
    if window < 1:
        raise ValueError(f"local_attention window must be >= 1, got {window}")
    check_self_attention("local_attention", query, key, value, kv_valid)
    b, t, n, h = query.shape
    k = key.shape[2]
    w = min(window, t)
    u = -(-t // w)
    before = min(-(-(window - 1) // w), u - 1)
    after = 0 if causal else before

    q_pos, k_pos = _block_positions(t, w, before, after)
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [U, W, C]
    band = ((dist >= 0) & (dist < window)) if causal else (np.abs(dist) < window)
    mask = jnp.asarray(band & (k_pos >= 0)[:, None, :] & (k_pos < t)[:, None, :])[None]
    if kv_valid is not None:
        mask = mask & _blocks_with_neighbours(kv_valid.astype(bool), w, before, after)[:, :, None, :]

    out = _blocked_attention(
        _query_blocks(query, w, k),
        _blocks_with_neighbours(key, w, before, after),
        _blocks_with_neighbours(value, w, before, after),
        mask,
        default_scale(query, scale),
    )
    return out.reshape(b, u * w, n, h)[:, :t].astype(query.dtype)






def global_positions(length: int, global_tokens: int = 0, global_stride: int = 0) -> np.ndarray:
    """Indices of the global positions of ``masks.block_sparse_mask``, as a static numpy array.

    ``p < global_tokens`` or (``global_stride > 0`` and ``p % global_stride == 0``).
    """
    return np.flatnonzero(is_global(np.arange(length), global_tokens, global_stride))


def block_sparse_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    block_size: int,
    num_local_blocks: int = 1,
    global_tokens: int = 0,
    global_stride: int = 0,
    causal: bool = False,
    kv_valid: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Block-local plus global self-attention (Longformer §3, BigBird §2, ITC variant).

    Exactly ``masks.block_sparse_mask(T, block_size, num_local_blocks=...,
    global_tokens=..., global_stride=..., causal=...)`` ANDed with
    ``kv_valid``: query t sees keys whose block is within ``num_local_blocks``
    of its own, every global key, and — if t is global — every key; causal
    keeps only ``s <= t`` of all that.

    Computed in three parts, so memory is O(T·(block·local + P)) + O(P·T)
    for P global positions (a static set, computed from T at trace time):

    1. local: each query block scores its ``2·num_local_blocks + 1``
       neighbouring key blocks (``num_local_blocks + 1`` when causal);
    2. global keys: the P global keys, gathered, scored by every query and
       masked where they already lie in the query's local blocks, so no key
       is counted twice; 1 and 2 share one softmax;
    3. global queries: the P global rows are recomputed against all T keys
       and scattered over the output of 1–2.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, T, K, H]`` (self-attention).
      block_size: positions per block.
      num_local_blocks: neighbouring blocks seen on each side (>= 0).
      global_tokens: the first ``global_tokens`` positions are global.
      global_stride: if > 0, every position ``p % global_stride == 0`` is global too.
      causal: AND the pattern with ``s <= t``.
      kv_valid: ``[B, T]`` bool, True = real key, or None.
      scale: score scale, default ``1/sqrt(H)``.

    Returns:
      ``[B, T, N, H]`` in ``query.dtype``.
    """
    if block_size < 1 or num_local_blocks < 0 or global_tokens < 0 or global_stride < 0:
        raise ValueError(
            f"block_sparse_attention needs block_size >= 1 and non-negative num_local_blocks, "
            f"global_tokens, global_stride; got {block_size=}, {num_local_blocks=}, {global_tokens=}, {global_stride=}"
        )
    check_self_attention("block_sparse_attention", query, key, value, kv_valid)
    b, t, n, h = query.shape
    k = key.shape[2]
    scale = default_scale(query, scale)
    # Blocks wider than T hold the whole sequence: one block of T positions is the same.
    w = min(block_size, t)
    u = -(-t // w)
    reach = min(num_local_blocks, u - 1)
    before, after = reach, (0 if causal else reach)
    valid = None if kv_valid is None else kv_valid.astype(bool)

    # 1. local: every key of the neighbouring blocks is in the pattern; only
    #    positions past the ends and (causal) the future are masked.
    q_pos, k_pos = _block_positions(t, w, before, after)
    local = (k_pos >= 0)[:, None, :] & (k_pos < t)[:, None, :]
    if causal:
        local = local & (k_pos[:, None, :] <= q_pos[:, :, None])
    local = jnp.asarray(local)[None]
    if valid is not None:
        local = local & _blocks_with_neighbours(valid, w, before, after)[:, :, None, :]

    # 2. global keys outside the query's local blocks.
    glob = global_positions(t, global_tokens, global_stride)
    k_glob = v_glob = glob_mask = None
    if glob.size:
        outside = np.abs(q_pos[:, :, None] // w - glob[None, None, :] // w) > reach  # [U, W, P]
        if causal:
            outside &= glob[None, None, :] <= q_pos[:, :, None]
        glob_mask = jnp.asarray(outside)[None]
        if valid is not None:
            glob_mask = glob_mask & valid[:, glob][:, None, None, :]
        k_glob, v_glob = key[:, glob], value[:, glob]

    out = _blocked_attention(
        _query_blocks(query, w, k),
        _blocks_with_neighbours(key, w, before, after),
        _blocks_with_neighbours(value, w, before, after),
        local,
        scale,
        k_glob,
        v_glob,
        glob_mask,
    )
    out = out.reshape(b, u * w, n, h)[:, :t]

    # 3. global queries see every key (causal: every earlier key): one block of P rows.
    if glob.size:
        p = glob.size
        rows = np.ones((p, t), bool)
        if causal:
            rows &= np.arange(t)[None, :] <= glob[:, None]
        rows = jnp.asarray(rows)[None, None]  # [1, U=1, P, T]
        if valid is not None:
            rows = rows & valid[:, None, None, :]
        out_glob = _blocked_attention(
            query[:, glob].reshape(b, 1, p, k, n // k, h), key[:, None], value[:, None], rows, scale
        )
        out = out.at[:, glob].set(out_glob.reshape(b, p, n, h))
    return out.astype(query.dtype)



__all__ = ["block_sparse_attention", "global_positions", "local_attention"]
