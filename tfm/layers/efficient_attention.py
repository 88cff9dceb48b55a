"""Attention that does not build the full ``[T, S]`` score matrix.

Four families, each written so that it can be checked against the dense
``dot_product_attention`` with the matching mask from ``tfm.layers.masks``:

* ``local_attention`` — a sliding window (Longformer §3.1, "Mistral"-style
  SWA), computed block by block: O(T·w) memory.
* ``block_sparse_attention`` — block-local plus global tokens (Longformer §3,
  BigBird §2): O(T·(block·local + #global)) memory.
* ``linear_attention`` — kernelized attention with phi(x) = elu(x) + 1
  (Katharopoulos et al. 2020, "Transformers are RNNs"): O(T) memory, and a
  recurrent form for decoding.
* ``flash_attention`` — the fused kernels of the accelerators (cuDNN on GPU,
  Pallas on TPU), with the XLA path as the fallback elsewhere.

``attention(kind, ...)`` picks one by name (``ATTENTION_KINDS``).

Shapes use the legend of ``tfm.layers.attention`` (B, T, S, N, K, G = N // K,
H), plus, for the blocked computations:

    U  number of blocks (or chunks) the sequence is cut into
    W  positions inside one query block (or chunk)
    C  keys one query block sees (its own block and its neighbours)
    P  global positions
    J  value features (the second H of an ``H x H`` state)

Conventions shared with ``dot_product_attention``: query ``[B, T, N, H]``,
key/value ``[B, S, K, H]``, query head n reads key/value head ``n // G``;
``scale=None`` means ``1/sqrt(H)``; key padding is ``kv_valid [B, S]`` bool,
``True`` = real key; scores and softmax are computed in float32 (float64 if
the inputs are float64) and the output has ``query.dtype``. Masked scores get
the most negative finite value, so a query that sees no key (possible only with
padding) still gives a finite output (uniform weights over the keys its block
looks at; the dense path spreads them over all S keys instead).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm.layers.attention import _check_shapes, dot_product_attention
from tfm.layers.masks import and_masks, causal_mask, is_global

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("full", "local", "block_sparse", "linear", "flash")


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 for half/single precision inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_kv_valid(kv_valid: Array | None, key: Array) -> None:
    if kv_valid is None:
        return
    b, s = key.shape[:2]
    if kv_valid.shape != (b, s):
        raise ValueError(f"kv_valid must be [B, S] = {(b, s)} to match key {key.shape}, got {kv_valid.shape}")


def _check_self_attention(name: str, query: Array, key: Array, value: Array, kv_valid: Array | None) -> None:
    _check_shapes(query, key, value)
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"{name} is self-attention and needs S == T; got query {query.shape} [B,T,N,H] "
            f"and key {key.shape} [B,S,K,H]"
        )
    _check_kv_valid(kv_valid, key)


def _scale(query: Array, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def _dense_mask(t: int, s: int, causal: bool, kv_valid: Array | None) -> Array | None:
    """The dense equivalent of ``causal`` + key padding: ``[B|1, 1, T, S]`` or None."""
    return and_masks(
        causal_mask(t, s) if causal else None,
        None if kv_valid is None else kv_valid[:, None, None, :],
    )


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
    dtype = _compute_dtype(query.dtype)
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


# ---------------------------------------------------------------------------
# Sliding-window (local) attention
# ---------------------------------------------------------------------------


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
    _check_self_attention("local_attention", query, key, value, kv_valid)
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
        _scale(query, scale),
    )
    return out.reshape(b, u * w, n, h)[:, :t].astype(query.dtype)


# ---------------------------------------------------------------------------
# Block-sparse (local + global) attention
# ---------------------------------------------------------------------------


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
    _check_self_attention("block_sparse_attention", query, key, value, kv_valid)
    b, t, n, h = query.shape
    k = key.shape[2]
    scale = _scale(query, scale)
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


# ---------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------


def _feature_map(x: Array) -> Array:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, eq. 7): positive, so the normalizer is."""
    return jax.nn.elu(x) + 1.0


def _linear_features(query: Array, key: Array, value: Array, kv_valid: Array | None):
    """phi(q) as ``[B, T, K, G, H]``, phi(k) zeroed at padded keys, v — all in the compute dtype."""
    b, t, n, h = query.shape
    k = key.shape[2]
    dtype = _compute_dtype(query.dtype)
    phi_q = _feature_map(query.astype(dtype)).reshape(b, t, k, n // k, h)
    phi_k = _feature_map(key.astype(dtype))
    if kv_valid is not None:
        phi_k = phi_k * kv_valid.astype(dtype)[:, :, None, None]
    return phi_q, phi_k, value.astype(dtype)


def _linear_chunk(state, phi_q: Array, phi_k: Array, value: Array, eps: float):
    """Causal linear attention over one chunk, given the state of all earlier positions.

    Eq. (8)-(9) of Katharopoulos et al.: with ``S_i = sum_{j<=i} phi(k_j) v_j^T``
    and ``z_i = sum_{j<=i} phi(k_j)``, ``out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)``.
    Inside the chunk the sums are the masked quadratic form; the state carries
    everything before it.

    Args:
      state: ``(kv [B, K, H, J], normalizer [B, K, H])`` of the earlier positions.
      phi_q: ``[B, W, K, G, H]``; phi_k, value: ``[B, W, K, H]``.

    Returns ``(out [B, W, K, G, J], new_state)``.
    """
    kv, normalizer = state
    w = phi_q.shape[1]
    causal = jnp.tril(jnp.ones((w, w), phi_q.dtype))
    a = jnp.einsum("BWKGH,BCKH->BKGWC", phi_q, phi_k) * causal
    num = jnp.einsum("BKGWC,BCKJ->BWKGJ", a, value) + jnp.einsum("BWKGH,BKHJ->BWKGJ", phi_q, kv)
    den = jnp.einsum("BKGWC->BWKG", a) + jnp.einsum("BWKGH,BKH->BWKG", phi_q, normalizer)
    out = num / (den[..., None] + eps)
    kv = kv + jnp.einsum("BCKH,BCKJ->BKHJ", phi_k, value)
    normalizer = normalizer + jnp.einsum("BCKH->BKH", phi_k)
    return out, (kv, normalizer)


def linear_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    causal: bool = False,
    kv_valid: Array | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> Array:
    """Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), phi = elu + 1.

    ``out_t = phi(q_t)^T (sum_s phi(k_s) v_s^T) / (phi(q_t)^T sum_s phi(k_s) + eps)``
    (eq. 6 with the feature map of eq. 7), the sums over visible keys s. There
    is no softmax scale: the feature map takes its place.

    Non-causal: the ``[H, J]`` summary ``sum_s phi(k_s) v_s^T`` is built once
    (eq. 5's reassociation), O(T·H²). Causal: ``lax.scan`` over chunks of
    ``chunk_size`` positions — the masked quadratic form inside a chunk, the
    running sums (eq. 8-9) across chunks — so memory is O(T·chunk + H²).

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` (causal needs S == T).
      causal: key s visible to query t iff ``s <= t``.
      kv_valid: ``[B, S]`` bool; padded keys contribute nothing.
      chunk_size: positions per scan step (causal only); need not divide T.
      eps: added to the normalizer.

    Returns:
      ``[B, T, N, H]`` in ``query.dtype`` (computed in float32 or wider).
    """
    if causal:
        _check_self_attention("causal linear_attention", query, key, value, kv_valid)
    else:
        _check_shapes(query, key, value)
        _check_kv_valid(kv_valid, key)
    if chunk_size < 1:
        raise ValueError(f"linear_attention chunk_size must be >= 1, got {chunk_size}")
    b, t, n, h = query.shape
    k = key.shape[2]
    phi_q, phi_k, v = _linear_features(query, key, value, kv_valid)

    if not causal:
        kv = jnp.einsum("BSKH,BSKJ->BKHJ", phi_k, v)
        normalizer = jnp.einsum("BSKH->BKH", phi_k)
        num = jnp.einsum("BTKGH,BKHJ->BTKGJ", phi_q, kv)
        den = jnp.einsum("BTKGH,BKH->BTKG", phi_q, normalizer)
        out = num / (den[..., None] + eps)
        return out.reshape(b, t, n, h).astype(query.dtype)

    w = min(chunk_size, t)
    u = -(-t // w)

    def chunks(x):  # [B, T, ...] -> [U, B, W, ...], zero-padded (padded keys add nothing)
        x = jnp.pad(x, [(0, 0), (0, u * w - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, u, w, *x.shape[2:]), 1, 0)

    def step(state, xs):
        out, state = _linear_chunk(state, *xs, eps)
        return state, out

    state = linear_attention_init_state(b, k, h, phi_q.dtype)
    _, out = jax.lax.scan(step, state, (chunks(phi_q), chunks(phi_k), chunks(v)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, u * w, n, h)[:, :t]
    return out.astype(query.dtype)


def linear_attention_reference(
    query: Array, key: Array, value: Array, mask: Array | None = None, eps: float = 1e-6
) -> Array:
    """The quadratic form of linear attention: ``A = phi(q) phi(k)^T * mask``, ``out = A v / (A 1 + eps)``.

    ``mask`` is boolean, broadcastable to ``[B, N, T, S]``. O(T·S) memory; the
    reference the fast paths are tested against.
    """
    _check_shapes(query, key, value)
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    phi_q, phi_k, v = _linear_features(query, key, value, None)
    a = jnp.einsum("BTKGH,BSKH->BKGTS", phi_q, phi_k).reshape(b, n, t, s)
    if mask is not None:
        a = a * mask
    a = a.reshape(b, k, n // k, t, s)
    out = jnp.einsum("BKGTS,BSKJ->BTKGJ", a, v) / (jnp.einsum("BKGTS->BTKG", a)[..., None] + eps)
    return out.reshape(b, t, n, h).astype(query.dtype)


def linear_attention_init_state(batch: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> tuple[Array, Array]:
    """The empty prefix: ``(kv_state [B, K, H, H], normalizer [B, K, H])`` of zeros."""
    return (
        jnp.zeros((batch, num_kv_heads, head_dim, head_dim), dtype),
        jnp.zeros((batch, num_kv_heads, head_dim), dtype),
    )


def linear_attention_step(
    state: tuple[Array, Array], query: Array, key: Array, value: Array, eps: float = 1e-6
) -> tuple[Array, tuple[Array, Array]]:
    """Linear attention as an RNN (Katharopoulos et al. §3.4): process T new positions causally.

    ``state`` summarises all earlier positions (start from
    ``linear_attention_init_state``); T may be 1 (token-by-token decoding) or
    a prefill chunk. Feeding a sequence through in any split equals
    ``linear_attention(..., causal=True)``.

    Args:
      state: ``(kv_state [B, K, H, H], normalizer [B, K, H])``.
      query: ``[B, T, N, H]``; key, value: ``[B, T, K, H]``.

    Returns:
      ``(out [B, T, N, H] in query.dtype, new_state in the state's dtype)``.
    """
    _check_self_attention("linear_attention_step", query, key, value, None)
    b, t, n, h = query.shape
    k = key.shape[2]
    kv, normalizer = state
    if kv.shape != (b, k, h, h) or normalizer.shape != (b, k, h):
        raise ValueError(
            f"linear_attention_step state must be ([B,K,H,H], [B,K,H]) = ({(b, k, h, h)}, {(b, k, h)}) "
            f"for key {key.shape}; got ({kv.shape}, {normalizer.shape})"
        )
    phi_q, phi_k, v = _linear_features(query, key, value, None)
    dtype = phi_q.dtype
    out, (new_kv, new_norm) = _linear_chunk((kv.astype(dtype), normalizer.astype(dtype)), phi_q, phi_k, v, eps)
    return out.reshape(b, t, n, h).astype(query.dtype), (new_kv.astype(kv.dtype), new_norm.astype(normalizer.dtype))


# ---------------------------------------------------------------------------
# Fused kernels
# ---------------------------------------------------------------------------


def _cudnn_attention(query, key, value, *, causal, kv_valid, scale):
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (fp16/bf16 only).

    ``kv_valid`` need not be a prefix, so padding goes in as a ``[B, 1, T, S]``
    mask (cuDNN turns it into a bias) rather than as sequence lengths; that
    bias is O(T·S), so the kernel is O(T) in memory only without padding.
    """
    mask = None
    if kv_valid is not None:
        b, t, s = query.shape[0], query.shape[1], key.shape[1]
        mask = jnp.broadcast_to(kv_valid.astype(bool)[:, None, None, :], (b, 1, t, s))
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )


def _pallas_tpu_attention(query, key, value, *, causal, kv_valid, scale):
    """The Pallas TPU flash kernel: layout ``[B, N, T, H]``, kv heads repeated for GQA, padding as segment ids."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    g = query.shape[2] // key.shape[2]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, jnp.repeat(key, g, axis=2), jnp.repeat(value, g, axis=2)))
    segment_ids = None
    if kv_valid is not None:
        # Queries are segment 1; real keys 1, padded keys 0: a query sees only real keys.
        segment_ids = pallas_flash.SegmentIds(q=jnp.ones(query.shape[:2], jnp.int32), kv=kv_valid.astype(jnp.int32))
    out = pallas_flash.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=scale)
    return jnp.swapaxes(out, 1, 2)


# Errors a fused kernel raises for a shape, dtype or device it does not support.
_KERNEL_REFUSALS = (NotImplementedError, RuntimeError, ValueError, ImportError)


def flash_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    causal: bool = False,
    kv_valid: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Fused attention (FlashAttention, Dao et al. 2022) where the backend has a kernel.

    * GPU: cuDNN's flash kernel via ``jax.nn.dot_product_attention(...,
      implementation="cudnn")`` (fp16/bf16; float32 falls back).
    * TPU: the Pallas flash kernel (``jax.experimental.pallas.ops.tpu``).
    * Anywhere else, or when the kernel refuses this shape/dtype at trace
      time: ``dot_product_attention`` with the equivalent dense causal &
      padding mask, and one ``logging`` notice naming the reason.

    Input-validation errors (bad shapes here) are raised, never swallowed.
    Only refusals at trace time can fall back; a kernel that fails later,
    while XLA compiles the jitted program, raises there.

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, K, H]``.
      causal: key s visible to query t iff ``s <= t`` (needs S == T).
      kv_valid: ``[B, S]`` bool, True = real key, or None.
      scale: score scale, default ``1/sqrt(H)``.

    Returns:
      ``[B, T, N, H]`` in ``query.dtype``.
    """
    _check_shapes(query, key, value)
    _check_kv_valid(kv_valid, key)
    t, s = query.shape[1], key.shape[1]
    if causal and s != t:
        raise ValueError(
            f"causal flash_attention needs S == T (the kernels align the causal mask top-left); "
            f"got query {query.shape} [B,T,N,H] and key {key.shape} [B,S,K,H]"
        )
    scale = _scale(query, scale)
    backend = jax.default_backend()
    kernels = {"gpu": ("cudnn", _cudnn_attention), "cuda": ("cudnn", _cudnn_attention),
               "tpu": ("pallas", _pallas_tpu_attention)}  # fmt: skip
    if backend in kernels:
        name, kernel = kernels[backend]
        try:
            return kernel(query, key, value, causal=causal, kv_valid=kv_valid, scale=scale).astype(query.dtype)
        except _KERNEL_REFUSALS as e:
            reason = f"{name} refused this call ({type(e).__name__}: {e})"
    else:
        reason = f"no fused kernel on {backend}"
    log.info("flash attention: %s; using the XLA path", reason)
    return dot_product_attention(query, key, value, mask=_dense_mask(t, s, causal, kv_valid), scale=scale)


# ---------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------


def attention(
    kind: str,
    query: Array,
    key: Array,
    value: Array,
    *,
    causal: bool,
    kv_valid: Array | None = None,
    scale: float | None = None,
    window: int | None = None,
    block_size: int | None = None,
    num_local_blocks: int = 1,
    global_tokens: int = 0,
    global_stride: int = 0,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> Array:
    """Attention of one of ``ATTENTION_KINDS``, with one signature.

    * ``"full"``: ``dot_product_attention`` with the dense causal & padding mask.
    * ``"local"``: ``local_attention`` (needs ``window``).
    * ``"block_sparse"``: ``block_sparse_attention`` (needs ``block_size``;
      ``num_local_blocks``, ``global_tokens``, ``global_stride``).
    * ``"linear"``: ``linear_attention`` (``chunk_size``, ``eps``; no ``scale``).
    * ``"flash"``: ``flash_attention``.

    Shapes as in each function: query ``[B, T, N, H]``, key/value
    ``[B, S, K, H]``, ``kv_valid [B, S]``; returns ``[B, T, N, H]``.
    """
    if kind == "full":
        _check_shapes(query, key, value)
        _check_kv_valid(kv_valid, key)
        t, s = query.shape[1], key.shape[1]
        return dot_product_attention(query, key, value, mask=_dense_mask(t, s, causal, kv_valid), scale=scale)
    if kind == "local":
        if window is None:
            raise ValueError('attention kind "local" needs window=')
        return local_attention(query, key, value, window=window, causal=causal, kv_valid=kv_valid, scale=scale)
    if kind == "block_sparse":
        if block_size is None:
            raise ValueError('attention kind "block_sparse" needs block_size=')
        return block_sparse_attention(
            query, key, value, block_size=block_size, num_local_blocks=num_local_blocks,
            global_tokens=global_tokens, global_stride=global_stride, causal=causal, kv_valid=kv_valid, scale=scale,
        )  # fmt: skip
    if kind == "linear":
        if scale is not None:
            raise ValueError(
                f'attention kind "linear" has no softmax scale (its feature map replaces it); got {scale=}'
            )
        return linear_attention(query, key, value, causal=causal, kv_valid=kv_valid, chunk_size=chunk_size, eps=eps)
    if kind == "flash":
        return flash_attention(query, key, value, causal=causal, kv_valid=kv_valid, scale=scale)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
