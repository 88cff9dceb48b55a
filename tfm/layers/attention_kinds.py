"""The attention kinds, registered once each with what they support.

Imports run one way: ``masks`` → ``dot_product`` → the kinds (``sparse_attention``,
``linear_attention``, ``flash_attention``) → this registry → ``attention``
(``MultiHeadAttention``) → ``blocks``. ``MultiHeadAttention`` asks the registry
what a kind can do; it never names a kind.

Each ``AttentionKind`` says:

* ``fn(query, key, value, *, causal, kv_valid, scale, **options)``: the computation,
  with the options it takes (``options``) and those it cannot run without (``required``);
* ``dense_masks``: it takes arbitrary dense masks (packed rows), additive biases
  (T5, ALiBi), attention-weight dropout and returned weights; the other kinds take a
  causal flag and key padding only;
* ``cross``: it may serve cross-attention;
* ``scaled``: it has a softmax scale;
* decoding: ``decode_mask(q_pos, k_pos, **options)``, the ``[T, S]`` pattern a cached
  query may see (None: everything up to its position), or ``recurrent``, a state that
  replaces the KV cache.

To add a kind: write its function (in its own module if it is more than a few
lines), then one ``register(AttentionKind(...))`` below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax import Array

from tfm.layers.dot_product import check_kv_valid, check_shapes, dot_product_attention
from tfm.layers.flash_attention import flash_attention
from tfm.layers.linear_attention import linear_attention, linear_attention_init_state, linear_attention_step
from tfm.layers.masks import block_sparse_mask_at, dense_mask, local_mask_at
from tfm.layers.sparse_attention import block_sparse_attention, local_attention


@dataclasses.dataclass(frozen=True)
class Recurrent:
    """A decode state that replaces the KV cache: ``init(B, K, H) -> state``, ``step(state, q, k, v) -> (out, state)``."""

    names: tuple[str, ...]  # the cache variables that hold the state's arrays
    init: Callable
    step: Callable


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """One registered attention kind: its function ``fn`` and what it supports (see the module docstring).

    ``options`` / ``required``: the keyword options ``fn`` takes / cannot run without. ``dense_masks``, ``cross``,
    ``scaled``: it takes dense masks and biases, may serve cross-attention, has a softmax scale. ``decode_mask`` /
    ``recurrent``: how a cached query attends (a ``[T, S]`` pattern, or a state that replaces the KV cache).
    """

    name: str
    fn: Callable
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    dense_masks: bool = False
    cross: bool = False
    scaled: bool = True
    decode_mask: Callable | None = None
    recurrent: Recurrent | None = None


KINDS: dict[str, AttentionKind] = {}


def register(kind: AttentionKind) -> AttentionKind:
    if kind.name in KINDS:
        raise ValueError(f"attention kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AttentionKind:
    if name not in KINDS:
        raise ValueError(f"unknown attention kind {name!r}; registered: {tuple(KINDS)}")
    return KINDS[name]


def _full(query, key, value, *, causal, kv_valid=None, scale=None):
    check_shapes(query, key, value)
    check_kv_valid(kv_valid, key)
    t, s = query.shape[1], key.shape[1]
    return dot_product_attention(query, key, value, mask=dense_mask(t, s, causal, kv_valid), scale=scale)


def _local_at(q_pos, k_pos, *, window, **_):
    return local_mask_at(q_pos, k_pos, window, causal=True)


def _block_sparse_at(q_pos, k_pos, *, block_size, global_tokens=0, global_stride=0, **_):
    return block_sparse_mask_at(q_pos, k_pos, block_size, global_tokens=global_tokens, global_stride=global_stride,
                                causal=True)  # fmt: skip


register(AttentionKind("full", _full, dense_masks=True, cross=True))
register(AttentionKind("local", local_attention, options=("window",), required=("window",), decode_mask=_local_at))
register(AttentionKind(
    "block_sparse", block_sparse_attention, options=("block_size", "num_local_blocks", "global_tokens", "global_stride"),
    required=("block_size",), decode_mask=_block_sparse_at,
))  # fmt: skip
register(AttentionKind(
    "linear", linear_attention, options=("chunk_size", "eps"), scaled=False,
    recurrent=Recurrent(("kv_state", "normalizer"), linear_attention_init_state, linear_attention_step),
))  # fmt: skip
register(AttentionKind("flash", flash_attention, cross=True))

ATTENTION_KINDS = tuple(KINDS)


def attention(kind: str, query: Array, key: Array, value: Array, *, causal: bool, kv_valid: Array | None = None,
              scale: float | None = None, **options: Any) -> Array:  # fmt: skip
    """Attention of a registered kind, with one signature; options a kind does not take are ignored.

    * ``"full"``: ``dot_product_attention`` with the dense causal & padding mask.
    * ``"local"``: ``local_attention`` (needs ``window``).
    * ``"block_sparse"``: ``block_sparse_attention`` (needs ``block_size``;
      ``num_local_blocks``, ``global_tokens``, ``global_stride``).
    * ``"linear"``: ``linear_attention`` (``chunk_size``, ``eps``; no ``scale``).
    * ``"flash"``: ``flash_attention``.

    Shapes as in each function: query ``[B, T, N, H]``, key/value ``[B, S, K, H]``,
    ``kv_valid [B, S]``; returns ``[B, T, N, H]``.
    """
    spec = get_kind(kind)
    for name in spec.required:
        if options.get(name) is None:
            raise ValueError(f"attention kind {kind!r} needs {name}=")
    if not spec.scaled and scale is not None:
        raise ValueError(f"attention kind {kind!r} has no softmax scale (its feature map replaces it); got {scale=}")
    taken = {k: v for k, v in options.items() if k in spec.options and v is not None}
    extra = {"scale": scale} if spec.scaled else {}
    return spec.fn(query, key, value, causal=causal, kv_valid=kv_valid, **extra, **taken)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionOptions:
    """Which self-attention a model's blocks use.

    ``full``: softmax over every visible key (dense masks). ``local``: a sliding
    window of ``attention_window`` keys, computed block-wise. ``block_sparse``:
    blocks of ``attention_window`` positions, each seeing its neighbour blocks,
    plus global positions (the first ``attention_global_tokens`` and every
    ``attention_global_stride``-th) that see and are seen by all. ``linear``:
    Katharopoulos et al.'s elu+1 kernel, O(T), a recurrent state when decoding.
    ``flash``: the fused kernel of the backend (cuDNN on GPU, Pallas on TPU),
    the XLA path elsewhere. Cross-attention uses a kind with ``cross`` (full, flash).

    Kinds without ``dense_masks`` take a causal flag and key padding, not arbitrary
    dense masks: packed rows (segment ids), relative-position biases (T5, ALiBi) and
    attention-weight dropout need ``full``.

    ``sow_attention_weights``: every attention layer also stores its softmax weights
    ``[B, N, T, S]`` (float32) in the ``intermediates`` collection, under
    ``.../<self_attention|cross_attention>/attention_weights`` (a scanned stack adds a
    leading layer axis). Read them with ``model.apply(..., mutable=["intermediates"])``.
    Only the kinds with dense masks have weights to return.
    """

    attention: str = "full"
    attention_window: int = 128
    attention_global_tokens: int = 0
    attention_global_stride: int = 0
    sow_attention_weights: bool = False

    def check_attention(self) -> None:
        if self.attention not in KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention_window < 1:
            raise ValueError(f"attention_window must be >= 1, got {self.attention_window}")
        if self.attention_global_tokens < 0 or self.attention_global_stride < 0:
            raise ValueError("attention_global_tokens and attention_global_stride must be >= 0")
        if self.sow_attention_weights and not KINDS[self.attention].dense_masks:
            dense = [k.name for k in KINDS.values() if k.dense_masks]
            raise ValueError(f"sow_attention_weights: attention={self.attention!r} computes no weight matrix; "
                             f"use one of {dense}")  # fmt: skip


__all__ = ["ATTENTION_KINDS", "AttentionKind", "AttentionOptions", "KINDS", "Recurrent", "attention", "get_kind",
           "register"]  # fmt: skip
