"""Flash attention: the fused kernels of the accelerators, with the XLA path as the fallback.

cuDNN's flash kernel on GPU, the Pallas kernel on TPU (FlashAttention, Dao et
al. 2022); anywhere else, or when a kernel refuses a call at trace time,
``dot_product_attention`` with the equivalent dense mask and one logged notice.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax import Array

from tfm.layers.dot_product import check_kv_valid, check_shapes, default_scale, dense_mask, dot_product_attention

log = logging.getLogger(__name__)


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
    check_shapes(query, key, value)
    check_kv_valid(kv_valid, key)
    t, s = query.shape[1], key.shape[1]
    if causal and s != t:
        raise ValueError(
            f"causal flash_attention needs S == T (the kernels align the causal mask top-left); "
            f"got query {query.shape} [B,T,N,H] and key {key.shape} [B,S,K,H]"
        )
    scale = default_scale(query, scale)
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
    return dot_product_attention(query, key, value, mask=dense_mask(t, s, causal, kv_valid), scale=scale)




__all__ = ["flash_attention"]
