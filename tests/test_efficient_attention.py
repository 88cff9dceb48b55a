"""Efficient attention: each kernel equals the dense computation with the matching mask.

local / block-sparse / flash are compared with ``dot_product_attention`` under
``masks.local_mask`` / ``masks.block_sparse_mask`` / the causal & padding mask;
linear attention with its quadratic form. Gradients are compared with the
dense path's and, in float64, with central finite differences. Shapes are tiny
and T is chosen not to be a multiple of the block so padding is exercised.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm.layers import attention_kinds as kinds
from tfm.layers import flash_attention as fa
from tfm.layers import linear_attention as la
from tfm.layers import sparse_attention as sa
from tfm.layers.dot_product import dot_product_attention
from tfm.layers.masks import block_sparse_mask, causal_mask, local_mask

from _helpers import maxerr, randn

TOL = 1e-5
T = 13  # not a multiple of any block size used below

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")

# Everything runs under jit: one compile per configuration is much cheaper
# than compiling each primitive of the eager path.
dense = jax.jit(lambda q, k, v, mask: dot_product_attention(q, k, v, mask=mask))
linear_reference = jax.jit(la.linear_attention_reference)


def jitted(fn, *static_args, **static):
    """``fn`` with its static arguments bound, jitted over the arrays (kv_valid included)."""
    return jax.jit(functools.partial(fn, *static_args, **static))


def _qkv(n=4, k=2, t=T, b=2, h=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return randn(rng, b, t, n, h, dtype=dtype), randn(rng, b, t, k, h, dtype=dtype), randn(rng, b, t, k, h, dtype=dtype)


def _kv_valid(b=2, t=T, lengths=(T, 8)):
    """Right padding: row i has ``lengths[i]`` real keys."""
    return jnp.asarray(np.arange(t)[None, :] < np.asarray(lengths)[:b, None])


def _assert_matches_dense(out, ref, mask):
    """Equal on every query row that sees a key; finite everywhere.

    A row that sees no key (a padded query whose whole window is padding) is
    only required to be finite: the dense path spreads uniform weights over
    all S keys, a blocked one over the keys its block looks at.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert np.isfinite(np.asarray(out)).all()
    seen = np.broadcast_to(np.asarray(mask).any(-1), (out.shape[0], out.shape[2], out.shape[1]))  # [B, N, T]
    rows = seen.transpose(0, 2, 1)  # [B, T, N]
    assert rows.any()
    assert maxerr(np.asarray(out)[rows], np.asarray(ref)[rows]) < TOL


# --- local ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_local_attention_equals_dense_local_mask(causal, heads, padded):
    q, k, v = _qkv(*heads)
    kv_valid = _kv_valid() if padded else None
    for window in (1, 3, 5, 20):  # 20 > T: the whole (causal) sequence
        mask = local_mask(T, window, causal=causal)
        if padded:
            mask = mask & kv_valid[:, None, None, :]
        ref = dense(q, k, v, mask)
        out = jitted(sa.local_attention, window=window, causal=causal)(q, k, v, kv_valid=kv_valid)
        _assert_matches_dense(out, ref, mask)


def test_local_attention_jits_and_keeps_dtype():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    f = jax.jit(sa.local_attention, static_argnames=("window", "causal"))
    out = f(q, k, v, window=4, causal=True)
    ref = dot_product_attention(q, k, v, mask=local_mask(T, 4))
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert maxerr(out, ref) < 2e-2  # bfloat16 outputs: about two significant digits


def test_local_attention_padded_rows_are_finite():
    q, k, v = _qkv()
    kv_valid = _kv_valid(lengths=(T, 2))  # queries 2+window.. of row 1 see no real key
    out = jitted(sa.local_attention, window=3, causal=True)(q, k, v, kv_valid=kv_valid)
    assert np.isfinite(np.asarray(out)).all()


# --- block-sparse ---------------------------------------------------------------------------------------


def test_block_sparse_mask_global_stride_literal():
    m = np.asarray(block_sparse_mask(6, 2, num_local_blocks=0, global_stride=4))[0, 0]
    # Blocks {0,1} {2,3} {4,5}; positions 0 and 4 are global.
    expect = np.zeros((6, 6), bool)
    for blk in range(3):
        expect[2 * blk : 2 * blk + 2, 2 * blk : 2 * blk + 2] = True
    expect[[0, 4], :] = True
    expect[:, [0, 4]] = True
    np.testing.assert_array_equal(m, expect)
    # The default (no stride) is unchanged.
    np.testing.assert_array_equal(
        np.asarray(block_sparse_mask(6, 2, num_local_blocks=0, global_stride=0)),
        np.asarray(block_sparse_mask(6, 2, num_local_blocks=0)),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "block_size, num_local_blocks, global_tokens, global_stride",
    [(3, 1, 2, 0), (3, 0, 0, 5), (4, 1, 1, 4), (2, 2, 0, 0), (20, 1, 0, 0)],
)
def test_block_sparse_attention_equals_dense_mask(causal, block_size, num_local_blocks, global_tokens, global_stride):
    q, k, v = _qkv(4, 2)
    kv_valid = _kv_valid(lengths=(T, 10))
    kw = {"num_local_blocks": num_local_blocks, "global_tokens": global_tokens, "global_stride": global_stride}
    kw["causal"] = causal
    for valid in (None, kv_valid):
        mask = block_sparse_mask(T, block_size, **kw)
        if valid is not None:
            mask = mask & valid[:, None, None, :]
        ref = dense(q, k, v, mask)
        out = jitted(sa.block_sparse_attention, block_size=block_size, **kw)(q, k, v, kv_valid=valid)
        _assert_matches_dense(out, ref, mask)


def test_global_positions_match_mask():
    glob = sa.global_positions(T, global_tokens=2, global_stride=5)
    np.testing.assert_array_equal(glob, [0, 1, 5, 10])
    m = np.asarray(block_sparse_mask(T, 3, num_local_blocks=0, global_tokens=2, global_stride=5))[0, 0]
    np.testing.assert_array_equal(np.flatnonzero(m.all(-1)), glob)


# --- linear ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_attention_equals_quadratic_reference(causal, padded):
    q, k, v = _qkv(4, 2)
    kv_valid = _kv_valid() if padded else None
    mask = causal_mask(T) if causal else None
    if padded:
        mask = kv_valid[:, None, None, :] if mask is None else mask & kv_valid[:, None, None, :]
    ref = linear_reference(q, k, v, mask)
    for chunk_size in (1, 5, 64):  # 5 does not divide T; 64 > T
        out = jitted(la.linear_attention, causal=causal, chunk_size=chunk_size)(q, k, v, kv_valid=kv_valid)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert maxerr(out, ref) < TOL


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_ignores_padded_keys(causal):
    q, k, v = _qkv(4, 2)
    kv_valid = _kv_valid(lengths=(T, 8))
    f = jitted(la.linear_attention, causal=causal, chunk_size=4)
    out = f(q, k, v, kv_valid=kv_valid)
    pad = ~np.asarray(kv_valid)[:, :, None, None]
    k2 = jnp.where(pad, 100.0, k)
    v2 = jnp.where(pad, -7.0, v)
    assert maxerr(out, f(q, k2, v2, kv_valid=kv_valid)) < TOL
    # ... and the padding does matter when it is not declared.
    assert maxerr(out, f(q, k2, v2, kv_valid=None)) > 1e-2


def test_linear_attention_recurrent_equals_causal():
    q, k, v = _qkv(4, 2)
    full = jitted(la.linear_attention, causal=True, chunk_size=4)(q, k, v)
    b, _, kh, h = k.shape
    step = jax.jit(la.linear_attention_step)

    state = la.linear_attention_init_state(b, kh, h)
    assert state[0].shape == (b, kh, h, h) and state[1].shape == (b, kh, h)
    outs = []
    for t in range(T):
        out, state = step(state, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        outs.append(out)
    assert maxerr(jnp.concatenate(outs, axis=1), full) < TOL

    state = la.linear_attention_init_state(b, kh, h)
    first, state = step(state, q[:, :5], k[:, :5], v[:, :5])
    second, _ = step(state, q[:, 5:], k[:, 5:], v[:, 5:])
    assert maxerr(jnp.concatenate([first, second], axis=1), full) < TOL


# --- flash ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_falls_back_with_one_notice(causal, caplog):
    if jax.default_backend() != "cpu":
        pytest.skip("the fallback is what runs on CPU; other backends run their kernel")
    q, k, v = _qkv(4, 2)
    kv_valid = _kv_valid()
    mask = kv_valid[:, None, None, :]
    if causal:
        mask = mask & causal_mask(T)
    with caplog.at_level(logging.INFO, logger=fa.__name__):
        out = fa.flash_attention(q, k, v, causal=causal, kv_valid=kv_valid)
    notices = [r for r in caplog.records if r.name == fa.__name__]
    assert len(notices) == 1
    assert "flash attention" in notices[0].getMessage() and "XLA path" in notices[0].getMessage()
    assert "cpu" in notices[0].getMessage()
    assert maxerr(out, dot_product_attention(q, k, v, mask=mask)) < TOL


def test_attention_dispatcher_covers_every_kind():
    q, k, v = _qkv(4, 2)
    kv_valid = _kv_valid()
    kw = {"causal": True, "window": 4, "block_size": 4, "global_tokens": 1}
    masks = {
        "full": causal_mask(T),
        "local": local_mask(T, 4),
        "block_sparse": block_sparse_mask(T, 4, global_tokens=1, causal=True),
        "flash": causal_mask(T),
    }
    for kind in kinds.ATTENTION_KINDS:
        out = jitted(kinds.attention, kind, **kw)(q, k, v, kv_valid=kv_valid)
        if kind == "linear":
            ref = linear_reference(q, k, v, causal_mask(T) & kv_valid[:, None, None, :])
            assert maxerr(out, ref) < TOL
        else:
            mask = masks[kind] & kv_valid[:, None, None, :]
            _assert_matches_dense(out, dense(q, k, v, mask), mask)


# --- gradients ------------------------------------------------------------------------------------------


def _dense_reference(kind, causal):
    """(fast function, dense reference) of (q, k, v) for one kind."""
    if kind == "linear":
        mask = causal_mask(T) if causal else None
        return (
            lambda q, k, v: la.linear_attention(q, k, v, causal=causal, chunk_size=5),
            lambda q, k, v: la.linear_attention_reference(q, k, v, mask),
        )
    kw = {"window": 3, "block_size": 3, "global_tokens": 1, "global_stride": 6}
    mask = {
        "full": causal_mask(T) if causal else None,
        "flash": causal_mask(T) if causal else None,
        "local": local_mask(T, 3, causal=causal),
        "block_sparse": block_sparse_mask(T, 3, global_tokens=1, global_stride=6, causal=causal),
    }[kind]
    return (
        lambda q, k, v: kinds.attention(kind, q, k, v, causal=causal, **kw),
        lambda q, k, v: dot_product_attention(q, k, v, mask=mask),
    )


@pytest.mark.parametrize("kind", kinds.ATTENTION_KINDS)
def test_gradients_equal_dense_reference(kind):
    q, k, v = _qkv(4, 2, b=1)
    r = randn(np.random.default_rng(1), *q.shape)

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * r), argnums=(0, 1, 2)))(q, k, v)

    for causal in (True, False):
        fast, ref = _dense_reference(kind, causal)
        for a, b in zip(grads(fast), grads(ref)):
            assert maxerr(a, b) < TOL


@pytest.mark.parametrize("kind", ["local", "linear", "block_sparse"])
def test_gradients_equal_finite_differences(kind):
    """jax.grad against central differences in float64, on a few coordinates of q, k and v."""
    with jax.enable_x64(True):
        q, k, v = _qkv(2, 1, t=7, b=1, h=4, dtype=jnp.float64)
        r = randn(np.random.default_rng(1), *q.shape, dtype=jnp.float64)
        fast = {
            "local": lambda q, k, v: sa.local_attention(q, k, v, window=3, causal=True),
            "linear": lambda q, k, v: la.linear_attention(q, k, v, causal=True, chunk_size=3),
            "block_sparse": lambda q, k, v: sa.block_sparse_attention(q, k, v, block_size=2, global_stride=4),
        }[kind]

        @jax.jit
        def loss(q, k, v):
            return jnp.sum(fast(q, k, v) * r)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert all(g.dtype == jnp.float64 for g in grads)
        args, step = [q, k, v], 1e-6
        for i, coords in enumerate([[(0, 6, 1, 2), (0, 2, 0, 0)], [(0, 4, 0, 3), (0, 0, 0, 1)], [(0, 5, 0, 0)]]):
            for c in coords:
                plus = [a.at[c].add(step) if j == i else a for j, a in enumerate(args)]
                minus = [a.at[c].add(-step) if j == i else a for j, a in enumerate(args)]
                fd = (loss(*plus) - loss(*minus)) / (2 * step)
                assert abs(float(fd) - float(grads[i][c])) < 1e-7, (kind, i, c, float(fd), float(grads[i][c]))
                assert float(grads[i][c]) != 0.0


# --- memory ---------------------------------------------------------------------------------------------


def _temp_bytes(f, *args):
    analysis = jax.jit(f).lower(*args).compile().memory_analysis()
    if analysis is None or not hasattr(analysis, "temp_size_in_bytes"):
        pytest.skip("compiled.memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def test_local_attention_memory_is_linear_in_length():
    t, w = 4096, 64
    q = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
    local = _temp_bytes(lambda q, k, v: sa.local_attention(q, k, v, window=w), q, q, q)
    # The measure sees a [T, T] array when there is one ...
    full = _temp_bytes(lambda q, k, v: kinds.attention("full", q, k, v, causal=True), q, q, q)
    assert full >= t * t * 4
    # ... and the blocked path has none: its scores are [T, 2w].
    assert local < t * t * 4 / 8, (local, full)


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(4, 2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sa.local_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"S == T"):
        sa.local_attention(q, k[:, :5], v[:, :5], window=2)
    with pytest.raises(ValueError, match=r"S == T"):
        sa.block_sparse_attention(q, k[:, :5], v[:, :5], block_size=2)
    with pytest.raises(ValueError, match=r"kv_valid must be \[B, S\]"):
        sa.local_attention(q, k, v, window=2, kv_valid=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        la.linear_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="unknown attention kind 'sparse'"):
        kinds.attention("sparse", q, k, v, causal=True)
    with pytest.raises(ValueError, match="needs window"):
        kinds.attention("local", q, k, v, causal=True)
    with pytest.raises(ValueError, match="no softmax scale"):
        kinds.attention("linear", q, k, v, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="causal flash_attention needs S == T"):
        fa.flash_attention(q, k[:, :5], v[:, :5], causal=True)
    with pytest.raises(ValueError, match=r"state must be"):
        la.linear_attention_step(la.linear_attention_init_state(2, 2, 4), q, k, v)
