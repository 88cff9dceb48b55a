"""Multi-head attention (MHA / GQA / MQA) with a KV cache, over any registered attention kind.

Shapes follow the legend of ``tfm.layers.dot_product``: attention tensors are
``[B, T, N, H]``, masks boolean (``True`` = may attend) broadcastable to
``[B, N, T, S]``, and query head n reads key/value head ``n // G``.

``MultiHeadAttention.__call__`` reads: project → positions (RoPE) → cache →
kind → output. What a kind supports comes from ``tfm.layers.attention_kinds``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

from tfm import sharding as sh
from tfm.layers import cpu_attention, tuning
from tfm.layers.attention_kinds import KINDS, AttentionKind, attention, get_kind
from tfm.layers.dot_product import dot_product_attention, score_scale, uses_cpu_kernel
from tfm.layers.linear import Einsum, Initializer, fused_projection
from tfm.layers.masks import and_masks
from tfm.layers.position import apply_rope


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

    ``kind`` (a registered ``tfm.layers.attention_kinds.AttentionKind``): for a
    kind without dense masks, ``causal`` says whether future keys are hidden and
    ``mask`` may only be key padding (broadcastable to ``[B, 1, 1, S]``). When
    decoding, a kind with a ``decode_mask`` (local, block_sparse) keeps the KV
    cache and masks it with its pattern; a ``recurrent`` kind (linear: ``kv_state
    [B, K, H, H]``, ``normalizer [B, K, H]``) keeps a state instead of a cache
    that grows with the length.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    out_features: int | None = None
    use_bias: bool = False
    key_bias: bool = True  # with use_bias: the key projection's too (a key bias only shifts each row's scores)
    dropout_rate: float = 0.0
    use_rope: bool = False
    rope_base: float = 10_000.0
    scale: float | None = None
    decode: bool = False
    implementation: str | None = None
    kind: str = "full"  # a name in attention_kinds.KINDS
    causal: bool = False  # for kinds without dense masks: hide future keys
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

        projections = (_projection(self, "query", d, n, sh.HEADS),
                       _projection(self, "key", d, k, sh.KV_HEADS, self.key_bias),
                       _projection(self, "value", d, k, sh.KV_HEADS))  # fmt: skip
        spec = get_kind(self.kind)
        fused = self_attention and tuning.fused_qkv()
        if fused and _packed_kernel_applies(self, spec, mask, bias, deterministic):
            return self._out(_packed_attention(self, inputs_q, projections, mask, n, k, h), n, h, d)
        if fused:
            query, key, value = fused_projection(inputs_q, projections, self.dtype)
        else:
            query = projections[0]("BTD,DNH->BTNH", inputs_q)
            key = projections[1]("BSD,DKH->BSKH", inputs_kv)
            value = projections[2]("BSD,DKH->BSKH", inputs_kv)
        query = nn.with_logical_constraint(query, (sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
        key = nn.with_logical_constraint(key, (sh.BATCH, sh.KV_LENGTH, sh.KV_HEADS, sh.HEAD_DIM))
        value = nn.with_logical_constraint(value, (sh.BATCH, sh.KV_LENGTH, sh.KV_HEADS, sh.HEAD_DIM))

        t = inputs_q.shape[1]
        if not self_attention and not spec.cross:
            cross = [k.name for k in KINDS.values() if k.cross]
            raise ValueError(f"attention kind {spec.name!r} is for self-attention; cross-attention uses one of {cross}")
        if not spec.dense_masks and (bias is not None or self.sow_weights or self.dropout_rate > 0.0):
            dense = [k.name for k in KINDS.values() if k.dense_masks]
            raise ValueError(f"attention kind {spec.name!r} takes no bias, weight dropout or returned weights; "
                             f"use one of {dense}")  # fmt: skip

        decoding = self.decode and self_attention
        if decoding and spec.recurrent is not None:
            return self._out(self._recurrent_decode(spec, query, key, value, positions), n, h, d)
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
            # Query t sits at absolute position offset + t and sees cache slots <= it (and its kind's pattern).
            q_abs, k_abs = offset + jnp.arange(t), jnp.arange(s_max)
            visible = k_abs[None, :] <= q_abs[:, None]
            pattern = spec.decode_mask(q_abs, k_abs, **self._kind_options()) if spec.decode_mask else None
            mask = and_masks(mask, visible[None, None], None if pattern is None else pattern[None, None])
        elif not spec.dense_masks:
            result = attention(
                spec.name, query, key, value, causal=self.causal, kv_valid=_key_padding(mask, spec.name, key),
                scale=self.scale if spec.scaled else None, **self._kind_options(),
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
            causal=self.causal and self_attention and not decoding,  # decoding masks a cache instead
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

    def _kind_options(self) -> dict:
        """The options every kind may take, from this module's fields (each kind keeps those it knows)."""
        return {"window": self.window, "block_size": self.window, "global_tokens": self.global_tokens,
                "global_stride": self.global_stride}  # fmt: skip

    def _recurrent_decode(self, spec: AttentionKind, query: Array, key: Array, value: Array,
                          positions: Array | None) -> Array:  # fmt: skip
        """The kind as an RNN: the state of all earlier positions replaces the KV cache."""
        b, t, k, h = key.shape
        rec = spec.recurrent
        is_initialized = self.has_variable("cache", rec.names[0])
        init = rec.init(b, k, h)
        state = [self.variable("cache", name, lambda x=x: x) for name, x in zip(rec.names, init)]
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if self.use_rope:
            pos = positions if positions is not None else (cache_index.value if is_initialized else 0) + jnp.arange(t)
            query, key = apply_rope(query, pos, self.rope_base), apply_rope(key, pos, self.rope_base)
        if not is_initialized:  # the init call: shapes only, the state stays empty
            return attention(spec.name, query, key, value, causal=True)
        out, new_state = rec.step(tuple(v.value for v in state), query, key, value)
        for var, x in zip(state, new_state):
            var.value = x
        cache_index.value = cache_index.value + query.shape[1]
        return out


def _projection(layer: MultiHeadAttention, name: str, d: int, heads: int, heads_axis: str, bias: bool = True) -> Einsum:
    """One of ``layer``'s input projections, ``[D, heads, H]`` (created inside its ``__call__``)."""
    return Einsum(
        (d, heads, layer.head_dim), (sh.EMBED, heads_axis, sh.HEAD_DIM), in_axis=0, out_axis=(1, 2),
        use_bias=layer.use_bias and bias, kernel_init=layer.kernel_init, dtype=layer.dtype,
        param_dtype=layer.param_dtype, name=name,
    )  # fmt: skip


def _packed_kernel_applies(layer: MultiHeadAttention, spec: AttentionKind, mask: Array | None,
                           bias: Array | None, deterministic: bool) -> bool:  # fmt: skip
    """Whether ``layer``'s self-attention runs the native CPU kernel on the unsplit Q/K/V projection: where the
    split tensors would reach it (``dot_product_attention``'s rule) with nothing between (RoPE, a cache)."""
    if layer.use_rope or layer.decode or not spec.dense_masks or bias is not None or layer.sow_weights:
        return False
    if layer.implementation not in (None, "xla") or (layer.dropout_rate > 0.0 and not deterministic):
        return False
    probe = jax.ShapeDtypeStruct((1, 1, 1, 1), layer.dtype)  # the kernel's rule reads dtypes only
    return uses_cpu_kernel(probe, probe, probe, mask)


def _packed_attention(layer: MultiHeadAttention, x: Array, projections: tuple[Einsum, ...], mask: Array | None,
                      heads: int, kv_heads: int, head_dim: int) -> Array:  # fmt: skip
    """Self-attention by the native kernel over the fused Q/K/V projection, unsplit: ``[B, T, heads, H]``.
    The kernel reads query, key and value in place and returns one gradient; the three are never split
    out, nor their gradients joined."""
    qkv = fused_projection(x, projections, layer.dtype, split=False)
    return cpu_attention.cpu_attention_packed(qkv, heads=heads, kv_heads=kv_heads, mask=mask,
                                              scale=score_scale(head_dim, layer.scale),
                                              causal=layer.causal and mask is not None)  # fmt: skip


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
