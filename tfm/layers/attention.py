"""Scaled dot-product attention and multi-head attention (MHA / GQA / MQA, KV cache).

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
"""

from __future__ import annotations

import dataclasses
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers import tuning
from tfm.layers.linear import Einsum, Initializer, fused_projection
from tfm.layers.masks import and_masks, block_sparse_mask_at, local_mask_at
from tfm.layers.position import apply_rope

log = logging.getLogger(__name__)

IMPLEMENTATIONS = (None, "xla", "jax", "cudnn")
ATTENTION_KINDS = ("full", "local", "block_sparse", "linear", "flash")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """Which self-attention a model's blocks use (see ``tfm.layers.efficient_attention``).

    ``full``: softmax over every visible key (dense masks). ``local``: a sliding
    window of ``attention_window`` keys, computed block-wise. ``block_sparse``:
    blocks of ``attention_window`` positions, each seeing its neighbour blocks,
    plus global positions (the first ``attention_global_tokens`` and every
    ``attention_global_stride``-th) that see and are seen by all. ``linear``:
    Katharopoulos et al.'s elu+1 kernel, O(T), a recurrent state when decoding.
    ``flash``: the fused kernel of the backend (cuDNN on GPU, Pallas on TPU),
    the XLA path elsewhere. Cross-attention is always ``full``.

    The efficient kinds take a causal flag and key padding, not arbitrary dense
    masks: packed rows (segment ids), relative-position biases (T5, ALiBi) and
    attention-weight dropout need ``full``.
    """

    attention: str = "full"
    attention_window: int = 128
    attention_global_tokens: int = 0
    attention_global_stride: int = 0

    def check_attention(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention_window < 1:
            raise ValueError(f"attention_window must be >= 1, got {self.attention_window}")
        if self.attention_global_tokens < 0 or self.attention_global_stride < 0:
            raise ValueError("attention_global_tokens and attention_global_stride must be >= 0")

    def attention_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AttentionOptions)}


def pattern_mask(kind: str, q_pos: Array, k_pos: Array, *, causal: bool, window: int, global_tokens: int = 0,
                 global_stride: int = 0) -> Array | None:  # fmt: skip
    """The dense ``[T, S]`` mask of a sparse pattern at absolute positions (None for full/linear/flash).

    ``masks.local_mask_at`` / ``masks.block_sparse_mask_at`` (one neighbour block each
    side): what a query decoding at ``cache_index`` may see.
    """
    if kind == "local":
        return local_mask_at(q_pos, k_pos, window, causal=causal)
    if kind == "block_sparse":
        return block_sparse_mask_at(q_pos, k_pos, window, global_tokens=global_tokens, global_stride=global_stride,
                                    causal=causal)  # fmt: skip
    return None


def _check_shapes(query: Array, key: Array, value: Array) -> tuple[int, int]:
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
      implementation: ``None``/``"xla"`` for the einsum path here; ``"jax"``
        for ``jax.nn.dot_product_attention`` (JAX picks); ``"cudnn"`` for the
        cuDNN flash kernel. The fused paths fall back to ``"xla"`` (logged) when
        the request needs weights or dropout, or the backend refuses.
      scale: score scale, default ``1/sqrt(H)`` (T5 uses 1.0).

    Returns:
      ``[B, T, N, H]`` in ``query.dtype`` (and the weights if asked). Scores and
      softmax are float32 whatever the input dtype; masked scores get the most
      negative finite float32, so a fully masked row yields uniform weights.
    """
    _check_shapes(query, key, value)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

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

    out, weights = _xla_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng)
    out = out.astype(query.dtype)
    return (out, weights) if return_weights else out


def _mask_shape(query: Array, key: Array, mask: Array) -> tuple[int, ...]:
    b, t, n, _ = query.shape
    s = key.shape[1]
    m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return (m[0] if m[0] != 1 else b, n, t, s)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (paper §3.2.2) with grouped key/value heads and a KV cache.

    Self-attention when ``inputs_kv`` is None, cross-attention otherwise.
    ``num_kv_heads`` None means MHA (K = N); 1 is MQA; anything dividing
    ``num_heads`` is GQA.

    Decoding (``decode=True``): the first ``init`` call, made with inputs of the
    maximal length, creates a ``cache`` collection (``cached_key``,
    ``cached_value`` ``[B, S_max, K, H]`` and ``cache_index``). Each later call
    with T new positions writes their keys/values at ``cache_index``, attends
    over the cache with positions ``<= cache_index + t`` and advances the index
    by T, so single tokens and prefill chunks both work. Writing past ``S_max``
    is the caller's responsibility to avoid (the index is traced, so it cannot
    be checked here; ``dynamic_update_slice`` would clamp onto the last slots).

    Parameters: ``query/kernel [D, N, H]``, ``key/kernel`` and ``value/kernel
    [D, K, H]``, ``out/kernel [N, H, D]`` (+ biases if ``use_bias``).

    ``kind`` other than ``"full"`` (see ``AttentionOptions``): ``causal`` says
    whether future keys are hidden and ``mask`` may only be key padding
    (broadcastable to ``[B, 1, 1, S]``). When decoding, ``local`` and
    ``block_sparse`` keep the KV cache and mask it with their pattern;
    ``linear`` keeps a recurrent state (``kv_state [B, K, H, H]``,
    ``normalizer [B, K, H]``) instead of a cache that grows with the length.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    out_features: int | None = None
    use_bias: bool = False
    dropout_rate: float = 0.0
    use_rope: bool = False
    rope_base: float = 10_000.0
    scale: float | None = None
    decode: bool = False
    implementation: str | None = None
    kind: str = "full"  # one of ATTENTION_KINDS (self-attention)
    causal: bool = False  # for the efficient kinds: mask future keys (they take no dense mask)
    window: int = 128
    global_tokens: int = 0
    global_stride: int = 0
    sow_weights: bool = False
    kernel_init: Initializer | None = None
    out_kernel_init: Initializer | None = None  # None: kernel_init
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        positions: Array | None = None,
        kv_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``inputs_q [B, T, D]``, ``inputs_kv [B, S, D]`` -> ``[B, T, D_out]``.

        ``positions``/``kv_positions`` (``[B, T]`` or ``[T]``) feed RoPE; they
        default to ``0..T-1`` (or the cache offset when decoding).
        """
        n = self.num_heads
        k = self.num_kv_heads or n
        if n % k:
            raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={k}")
        if inputs_q.ndim != 3:
            raise ValueError(f"MultiHeadAttention wants inputs [B, T, D], got {inputs_q.shape}")
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        d = inputs_q.shape[-1]
        h = self.head_dim

        def proj(name, heads, heads_axis):
            return Einsum(
                (d, heads, h), (sh.EMBED, heads_axis, sh.HEAD_DIM), in_axis=0, out_axis=(1, 2),
                use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
            )  # fmt: skip

        projections = proj("query", n, sh.HEADS), proj("key", k, sh.KV_HEADS), proj("value", k, sh.KV_HEADS)
        if self_attention and tuning.fused_qkv():
            query, key, value = fused_projection(inputs_q, projections, self.dtype)
        else:
            query = projections[0]("BTD,DNH->BTNH", inputs_q)
            key = projections[1]("BSD,DKH->BSKH", inputs_kv)
            value = projections[2]("BSD,DKH->BSKH", inputs_kv)
        query = nn.with_logical_constraint(query, (sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
        key = nn.with_logical_constraint(key, (sh.BATCH, sh.KV_LENGTH, sh.KV_HEADS, sh.HEAD_DIM))
        value = nn.with_logical_constraint(value, (sh.BATCH, sh.KV_LENGTH, sh.KV_HEADS, sh.HEAD_DIM))

        t = inputs_q.shape[1]
        kind = self.kind
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if kind != "full" and not self_attention and kind != "flash":
            raise ValueError(f"attention kind {kind!r} is for self-attention; cross-attention uses 'full' or 'flash'")
        if kind != "full" and (bias is not None or self.sow_weights or self.dropout_rate > 0.0):
            raise ValueError(f"attention kind {kind!r} takes no bias, weight dropout or returned weights; use 'full'")
        from tfm.layers import efficient_attention as efficient  # it builds on this module

        decoding = self.decode and self_attention
        if decoding and kind == "linear":
            return self._out(self._linear_decode(query, key, value, positions), n, h, d)
        if decoding:
            is_initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            offset = cache_index.value if is_initialized else 0
        else:
            offset = 0
        if self.use_rope:
            q_pos = positions if positions is not None else offset + jnp.arange(t)
            kv_pos = q_pos if self_attention else kv_positions
            kv_pos = kv_pos if kv_pos is not None else jnp.arange(inputs_kv.shape[1])
            query = apply_rope(query, q_pos, self.rope_base)
            key = apply_rope(key, kv_pos, self.rope_base)

        if decoding and is_initialized:
            s_max = cached_key.value.shape[1]
            if cached_key.value.shape[0] != key.shape[0]:
                raise ValueError(f"batch {key.shape[0]} does not match the cache's {cached_key.value.shape[0]}")
            key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), (0, offset, 0, 0))
            value = jax.lax.dynamic_update_slice(
                cached_value.value, value.astype(cached_value.value.dtype), (0, offset, 0, 0)
            )
            cached_key.value, cached_value.value = key, value
            cache_index.value = offset + t
            # Query t sits at absolute position offset + t and sees cache slots <= it.
            q_abs, k_abs = offset + jnp.arange(t), jnp.arange(s_max)
            visible = k_abs[None, :] <= q_abs[:, None]
            pattern = pattern_mask(kind, q_abs, k_abs, causal=True, window=self.window,
                                   global_tokens=self.global_tokens, global_stride=self.global_stride)  # fmt: skip
            mask = and_masks(mask, visible[None, None], None if pattern is None else pattern[None, None])
        elif kind != "full":
            result = efficient.attention(
                kind, query, key, value, causal=self.causal, kv_valid=_key_padding(mask, kind, key),
                scale=None if kind == "linear" else self.scale, window=self.window, block_size=self.window,
                global_tokens=self.global_tokens, global_stride=self.global_stride,
            )  # fmt: skip
            return self._out(result, n, h, d)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        result = dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            bias=bias,
            dropout_rate=self.dropout_rate if dropout_rng is not None else 0.0,
            dropout_rng=dropout_rng,
            return_weights=self.sow_weights,
            implementation=self.implementation,
            scale=self.scale,
        )
        if self.sow_weights:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        return self._out(result, n, h, d)

    def _out(self, result: Array, n: int, h: int, d: int) -> Array:
        out = Einsum(
            (n, h, self.out_features or d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), in_axis=(0, 1), out_axis=2,
            use_bias=self.use_bias, kernel_init=self.out_kernel_init or self.kernel_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name="out",
        )("BTNH,NHD->BTD", result)  # fmt: skip
        return nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, sh.EMBED))

    def _linear_decode(self, query: Array, key: Array, value: Array, positions: Array | None) -> Array:
        """Linear attention as an RNN: the state of all earlier positions replaces the KV cache."""
        from tfm.layers import efficient_attention as efficient

        b, t, k, h = key.shape
        is_initialized = self.has_variable("cache", "kv_state")
        init = efficient.linear_attention_init_state(b, k, h)
        kv_state = self.variable("cache", "kv_state", lambda: init[0])
        normalizer = self.variable("cache", "normalizer", lambda: init[1])
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if self.use_rope:
            pos = positions if positions is not None else (cache_index.value if is_initialized else 0) + jnp.arange(t)
            query, key = apply_rope(query, pos, self.rope_base), apply_rope(key, pos, self.rope_base)
        if not is_initialized:  # the init call: shapes only, the state stays empty
            return efficient.linear_attention(query, key, value, causal=True)
        out, (kv_state.value, normalizer.value) = efficient.linear_attention_step(
            (kv_state.value, normalizer.value), query, key, value
        )
        cache_index.value = cache_index.value + query.shape[1]
        return out


def _key_padding(mask: Array | None, kind: str, key: Array) -> Array | None:
    """``mask`` broadcastable to ``[B, 1, 1, S]`` -> ``kv_valid [B, S]``; anything richer is refused."""
    if mask is None:
        return None
    b, s = key.shape[0], key.shape[1]
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1:
        raise ValueError(
            f"attention kind {kind!r} takes a causal flag and key padding (a mask [B, 1, 1, S]), not a mask of "
            f"shape {tuple(mask.shape)}; packed rows and other dense masks need attention='full'"
        )
    return jnp.broadcast_to(m[:, 0, 0, :], (b, s))
