"""Fused attention on the CPU: a native kernel through XLA's FFI, built from source on first use.

XLA has no fused attention on the CPU: its path (``dot_product._xla_attention``) writes
the ``[B, N, T, S]`` scores, transposes the heads for the batched products and runs the
softmax passes as separate loops. ``kernels/attention_cpu.cc`` does what PyTorch's CPU
kernel does: per batch row and key/value head, blocks of query rows go through scores,
float32 softmax and output in cache, and the backward recomputes the probabilities from
the kept row maxima and sums. Same masks and the same masked-score convention as the
XLA path; float32 only.

The kernel is built, cached and registered with tfm's other CPU kernels
(``tfm.layers.cpu_kernels``); where that fails, ``available()`` is False and callers keep
the XLA path. ``tuning.CPU_ATTENTION`` picks it (default: the CPU backend with one device).
A program traced with it holds a custom call of this process's: to serialise one with
``jax.export``, trace it with ``tuning.CPU_ATTENTION = False``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from tfm.layers.cpu_kernels import available

_FORWARD, _BACKWARD = "tfm_attention_cpu_forward", "tfm_attention_cpu_backward"
_PACKED_FORWARD, _PACKED_BACKWARD = "tfm_attention_cpu_packed_forward", "tfm_attention_cpu_packed_backward"


def supports(query: Array, key: Array, value: Array, mask: Array | None) -> bool:
    """The inputs the kernel takes: float32 query/key/value and a boolean mask (or none)."""
    dtypes = {query.dtype, key.dtype, value.dtype}
    return dtypes == {jnp.dtype(jnp.float32)} and (mask is None or mask.dtype == jnp.bool_)


def _mask_operand(mask: Array | None, query: Array, key: Array) -> Array:
    """``mask`` as ``[Bm, Nm, T, S]`` (Bm in {1, B}, Nm in {1, N}); a ``[1, 1, 1, 1]`` placeholder if None."""
    if mask is None:
        return jnp.ones((1, 1, 1, 1), bool)
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return jnp.broadcast_to(m, (m.shape[0], m.shape[1], query.shape[1], key.shape[1]))


def _forward_call(q, k, v, mask, scale, causal, has_mask):
    b, t, n, _ = q.shape
    stats = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
    call = jax.ffi.ffi_call(_FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
                            vmap_method="sequential")  # fmt: skip
    return call(q, k, v, mask, scale=np.float32(scale), causal=causal, has_mask=has_mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, causal, has_mask):
    return _forward_call(q, k, v, mask, scale, causal, has_mask)[0]


def _attention_fwd(q, k, v, mask, scale, causal, has_mask):
    out, row_max, row_inv = _forward_call(q, k, v, mask, scale, causal, has_mask)
    return out, (q, k, v, mask, out, row_max, row_inv)


def _attention_bwd(scale, causal, has_mask, residuals, d_out):
    q, k, v, mask, out, row_max, row_inv = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, mask, out, d_out.astype(jnp.float32), row_max, row_inv, scale=np.float32(scale),
                      causal=causal, has_mask=has_mask)  # fmt: skip
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(query: Array, key: Array, value: Array, *, mask: Array | None, scale: float, causal: bool) -> Array:
    """softmax(Q K^T * scale, masked) V by the native kernel: query ``[B, T, N, H]``, key/value ``[B, S, K, H]``.

    ``mask``: boolean, broadcastable to ``[B, N, T, S]``, True = may attend; masked scores get the most
    negative finite float32, so a fully masked row averages the values (of all keys; with ``causal``, of
    the keys up to its query block's last row, as the XLA path's query blocks do). ``causal`` promises
    that the mask hides every later key (S == T): the kernel skips them. ``RuntimeError`` where the kernel
    cannot be built (``available()`` says so beforehand).
    """
    if not available():
        raise RuntimeError("cpu_attention: the native attention kernel could not be built (see the log)")
    if causal and key.shape[1] != query.shape[1]:
        raise ValueError(f"causal cpu_attention needs S == T; got query {query.shape} and key {key.shape}")
    return _attention(query, key, value, _mask_operand(mask, query, key), float(scale), bool(causal), mask is not None)


def _packed_forward_call(qkv, mask, scale, causal, has_mask, heads, kv_heads):
    b, t, _ = qkv.shape
    stats = jax.ShapeDtypeStruct((b, heads, t), jnp.float32)
    out = jax.ShapeDtypeStruct((b, t, heads, qkv.shape[2] // (heads + 2 * kv_heads)), jnp.float32)
    call = jax.ffi.ffi_call(_PACKED_FORWARD, (out, stats, stats), vmap_method="sequential")
    return call(qkv, mask, scale=np.float32(scale), causal=causal, has_mask=has_mask, heads=np.int64(heads),
                kv_heads=np.int64(kv_heads))  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _packed_attention(qkv, mask, scale, causal, has_mask, heads, kv_heads):
    return _packed_forward_call(qkv, mask, scale, causal, has_mask, heads, kv_heads)[0]


def _packed_fwd(qkv, mask, scale, causal, has_mask, heads, kv_heads):
    out, row_max, row_inv = _packed_forward_call(qkv, mask, scale, causal, has_mask, heads, kv_heads)
    return out, (qkv, mask, out, row_max, row_inv)


def _packed_bwd(scale, causal, has_mask, heads, kv_heads, residuals, d_out):
    qkv, mask, out, row_max, row_inv = residuals
    call = jax.ffi.ffi_call(_PACKED_BACKWARD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32), vmap_method="sequential")
    d_qkv = call(qkv, mask, out, d_out.astype(jnp.float32), row_max, row_inv, scale=np.float32(scale), causal=causal,
                 has_mask=has_mask, heads=np.int64(heads), kv_heads=np.int64(kv_heads))  # fmt: skip
    return d_qkv, None


_packed_attention.defvjp(_packed_fwd, _packed_bwd)


def cpu_attention_packed(qkv: Array, *, heads: int, kv_heads: int, mask: Array | None, scale: float,
                         causal: bool) -> Array:  # fmt: skip
    """``cpu_attention`` of self-attention over the fused projection's output, unsplit.

    ``qkv [B, T, (heads + 2 kv_heads) H]``: each position's row holds its query heads, then its key heads,
    then its value heads (``linear.fused_projection(..., split=False)``). Returns ``[B, T, heads, H]``,
    what ``cpu_attention`` returns for the split query, key and value; its gradient is one tensor of
    ``qkv``'s layout, so neither the split nor the join of the three gradients is materialised.
    """
    if not available():
        raise RuntimeError("cpu_attention: the native attention kernel could not be built (see the log)")
    b, t, width = qkv.shape
    if width % (heads + 2 * kv_heads) or heads % kv_heads:
        raise ValueError(f"cpu_attention_packed: width {width} is not (heads + 2 kv_heads) H for heads={heads}, "
                         f"kv_heads={kv_heads}")  # fmt: skip
    h = width // (heads + 2 * kv_heads)
    like = jax.ShapeDtypeStruct((b, t, heads, h), qkv.dtype)
    operand = _mask_operand(mask, like, like)
    return _packed_attention(qkv, operand, float(scale), bool(causal), mask is not None, int(heads), int(kv_heads))


__all__ = ["available", "cpu_attention", "cpu_attention_packed", "supports"]
