"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): O(T) time and memory.

softmax(q·k) is replaced by phi(q)·phi(k) with phi(x) = elu(x) + 1, so attention
becomes running sums: a chunked scan in training, and when decoding a
recurrent state (``kv_state [B, K, H, J]``, ``normalizer [B, K, H]``) that
replaces the KV cache. ``linear_attention_reference`` is the quadratic form
the tests compare against.

Shapes use the legend of ``tfm.layers.dot_product``, plus ``U`` chunks of
``W`` positions and ``J`` value features (the second H of an ``H x H`` state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from tfm.layers.dot_product import check_kv_valid, check_self_attention, check_shapes, compute_dtype


def _feature_map(x: Array) -> Array:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, eq. 7): positive, so the normalizer is."""
    return jax.nn.elu(x) + 1.0


def _linear_features(query: Array, key: Array, value: Array, kv_valid: Array | None):
    """phi(q) as ``[B, T, K, G, H]``, phi(k) zeroed at padded keys, v — all in the compute dtype."""
    b, t, n, h = query.shape
    k = key.shape[2]
    dtype = compute_dtype(query.dtype)
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
        check_self_attention("causal linear_attention", query, key, value, kv_valid)
    else:
        check_shapes(query, key, value)
        check_kv_valid(kv_valid, key)
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
    check_shapes(query, key, value)
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    phi_q, phi_k, v = _linear_features(query, key, value, None)
    a = jnp.einsum("BTKGH,BSKH->BKGTS", phi_q, phi_k).reshape(b, n, t, s)
    if mask is not None:
        a = a * mask
    a = a.reshape(b, k, n // k, t, s)
    out = jnp.einsum("BKGTS,BSKJ->BTKGJ", a, v) / (jnp.einsum("BKGTS->BTKG", a)[..., None] + eps)
    return out.reshape(b, t, n, h).astype(query.dtype)


def linear_attention_init_state(
    batch: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype = jnp.float32
) -> tuple[Array, Array]:
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
    check_self_attention("linear_attention_step", query, key, value, None)
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




__all__ = ["linear_attention", "linear_attention_init_state", "linear_attention_reference", "linear_attention_step"]
