"""Scaled dot-product attention, the one computation every attention kind is checked against.

Shape legend (used throughout tfm):

    B  batch                 T  query length           S  key/value length
    D  model width           N  query heads            K  key/value heads
    G  = N // K (query heads per key/value head)       H  head width
    F  feed-forward width    E  experts                V  vocabulary
    L  layers

Attention tensors are ``[B, T, N, H]`` (the layout ``jax.nn.dot_product_attention``
takes). Masks are boolean, ``True`` = may attend, broadcastable to ``[B, N, T, S]``.
Query head n reads key/value head ``n // G`` (the grouping of GQA; K = 1 is MQA,
K = N is MHA).

Conventions the attention kinds share (``tfm.layers.attention_kinds``): key padding
is ``kv_valid [B, S]`` bool, ``True`` = real key; ``scale=None`` means ``1/sqrt(H)``;
scores and softmax are float32 (float64 for float64 inputs); the output has
``query.dtype``. The helpers below check and build those pieces once.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax import Array

from tfm.layers import cpu_attention, tuning
from tfm.layers.masks import dense_mask

log = logging.getLogger(__name__)

IMPLEMENTATIONS = (None, "xla", "jax", "cudnn")


def check_shapes(query: Array, key: Array, value: Array) -> tuple[int, int]:
    """``(N, K)`` of query ``[B, T, N, H]`` and key/value ``[B, S, K, H]``; ``ValueError`` naming the shapes otherwise."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"attention wants query [B,T,N,H] and key/value [B,S,K,H]; got ranks "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape [B,S,K,H]")
    (b, _, n, h), (bk, _, k, hk) = query.shape, key.shape
    if b != bk or h != hk:
        raise ValueError(f"query {query.shape} and key {key.shape} disagree on batch B or head width H")
    if n % k:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={k} (GQA)")
    return n, k


def _xla_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng):
    """The textbook path: softmax(Q K^T * scale + bias, masked) V, softmax in float32."""
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    g = n // k
    q = query.reshape(b, t, k, g, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, n, t, s) * jnp.float32(scale)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        # The most negative finite value, not -inf: a fully masked row then
        # softmaxes to uniform weights instead of NaN (masked_fill(-1e9) style).
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    probs = weights.astype(value.dtype).reshape(b, k, g, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
    return out, weights


def _rows_keys(x: Array | None, rows: slice, keys: int) -> Array | None:
    """``x`` broadcastable to ``[B, N, T, S]``, cut to query ``rows`` and the first ``keys`` keys (broadcast axes kept)."""
    if x is None:
        return None
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    return x[:, :, rows if x.shape[2] > 1 else slice(None), slice(keys) if x.shape[3] > 1 else slice(None)]


def _causal_blocked_attention(query, key, value, mask, bias, scale, blocks):
    """The XLA path by query blocks, each against the keys up to its last row only.

    With a causal mask every key after a block's last query is hidden, so the
    blocks above the diagonal are never computed. Rows that see at least one key
    get the same result as the full computation; a row that sees none (only
    padding) averages the values of its block's keys instead of all keys.
    """
    rows = query.shape[1] // blocks
    outs = []
    for i in range(blocks):
        r, keys = slice(i * rows, (i + 1) * rows), (i + 1) * rows
        out, _ = _xla_attention(query[:, r], key[:, :keys], value[:, :keys], _rows_keys(mask, r, keys),
                                _rows_keys(bias, r, keys), scale, 0.0, None)  # fmt: skip
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> Array | tuple[Array, Array]:
    """softmax(Q K^T / sqrt(H) + bias) V — "Attention Is All You Need" eq. (1), with GQA.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]`` with K dividing N.
      mask: boolean, ``True`` = may attend, broadcastable to ``[B, N, T, S]``.
      bias: additive, broadcastable to ``[B, N, T, S]`` (T5 relative bias, ALiBi).
      dropout_rate, dropout_rng: dropout on the attention weights (applied
        only when the rate is positive; then a key is required).
      return_weights: also return the ``[B, N, T, S]`` float32 weights.
      implementation: ``None``/``"xla"`` for the einsum path here (on CPU,
        the fused native kernel where it applies: ``tuning.CPU_ATTENTION``); ``"jax"``
        for ``jax.nn.dot_product_attention`` (JAX picks); ``"cudnn"`` for the
        cuDNN flash kernel. The fused paths fall back to ``"xla"`` (logged) when
        the request needs weights or dropout, or the backend refuses.
      scale: score scale, default ``1/sqrt(H)`` (T5 uses 1.0).
      causal: the caller promises that ``mask`` hides every key after its
        query (``s > t``; self-attention, S == T). The XLA path may then skip
        the blocks above the diagonal (``tuning.causal_blocks``; CPU only).
        The mask is still applied, so a mask richer than causal stays exact.

    Returns:
      ``[B, T, N, H]`` in ``query.dtype`` (and the weights if asked). Scores and
      softmax are float32 whatever the input dtype; masked scores get the most
      negative finite float32, so a fully masked row yields uniform weights.
    """
    check_shapes(query, key, value)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    scale = score_scale(query.shape[-1], scale)

    if implementation in ("jax", "cudnn"):
        reason = "return_weights" if return_weights else "dropout" if dropout_rate > 0.0 else None
        if reason is None:
            try:
                return jax.nn.dot_product_attention(
                    query,
                    key,
                    value,
                    bias=None if bias is None else bias.astype(query.dtype),
                    mask=None if mask is None else jnp.broadcast_to(mask, _mask_shape(query, key, mask)),
                    scale=scale,
                    implementation=None if implementation == "jax" else implementation,
                )
            except Exception as e:  # backend or shape unsupported by the fused kernel
                reason = f"{type(e).__name__}: {e}"
        log.info("dot_product_attention: %s path unavailable (%s); using the XLA path", implementation, reason)

    if (implementation in (None, "xla") and bias is None and dropout_rate == 0.0 and not return_weights
            and uses_cpu_kernel(query, key, value, mask)):
        causal = causal and mask is not None and key.shape[1] == query.shape[1]
        return cpu_attention.cpu_attention(query, key, value, mask=mask, scale=scale, causal=causal)
    blocks = tuning.causal_blocks(query.shape[1]) if causal and mask is not None and key.shape[1] == query.shape[1] else 1
    if blocks > 1 and dropout_rate == 0.0 and not return_weights:
        return _causal_blocked_attention(query, key, value, mask, bias, scale, blocks).astype(query.dtype)
    out, weights = _xla_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng)
    out = out.astype(query.dtype)
    return (out, weights) if return_weights else out


def score_scale(head_dim: int, scale: float | None) -> float:
    """The scores' scale: ``scale``, or ``1/sqrt(H)`` (the paper's) when None."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def uses_cpu_kernel(query: Array, key: Array, value: Array, mask: Array | None) -> bool:
    """Whether the XLA path's attention, without bias, dropout or returned weights, runs the native CPU kernel."""
    return tuning.cpu_attention() and cpu_attention.supports(query, key, value, mask) and cpu_attention.available()


def _mask_shape(query: Array, key: Array, mask: Array) -> tuple[int, ...]:
    b, t, n, _ = query.shape
    s = key.shape[1]
    m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return (m[0] if m[0] != 1 else b, n, t, s)



def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for half/single precision inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def check_kv_valid(kv_valid: Array | None, key: Array) -> None:
    if kv_valid is None:
        return
    b, s = key.shape[:2]
    if kv_valid.shape != (b, s):
        raise ValueError(f"kv_valid must be [B, S] = {(b, s)} to match key {key.shape}, got {kv_valid.shape}")


def check_self_attention(name: str, query: Array, key: Array, value: Array, kv_valid: Array | None) -> None:
    check_shapes(query, key, value)
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"{name} is self-attention and needs S == T; got query {query.shape} [B,T,N,H] "
            f"and key {key.shape} [B,S,K,H]"
        )
    check_kv_valid(kv_valid, key)


def default_scale(query: Array, scale: float | None) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale





__all__ = ["IMPLEMENTATIONS", "check_kv_valid", "check_self_attention", "check_shapes", "compute_dtype", "default_scale",
           "dense_mask", "dot_product_attention"]  # fmt: skip
