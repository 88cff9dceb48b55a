"""dot_product_attention and MultiHeadAttention: literal cases, a NumPy reference, GQA/MQA, KV cache.

The torch comparisons live in separate test functions that call ``torch_or_skip()`` (an
``importorskip``), so the NumPy-reference tests run without torch.

Inputs come from NumPy's RNG and parameters are filled from it after
``jax.eval_shape(module.init, ...)``: jax.random's threefry is slow to compile
on a small CPU box, and random (non-zero) biases make the weight-copy tests stricter.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm.layers.attention import MultiHeadAttention
from tfm.layers.dot_product import dot_product_attention
from tfm.layers.masks import causal_mask
from tfm.layers.position import apply_rope

from _helpers import assert_same_tree, maxerr, param_shapes, randn, random_params, torch_or_skip

TOL = 1e-5

dpa = jax.jit(
    dot_product_attention, static_argnames=("dropout_rate", "return_weights", "implementation", "scale")
)


pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")








def _random_mask(rng, shape):
    """Random boolean mask [.., T, S] with at least one key per query row."""
    m = rng.random(shape) < 0.5
    t, s = shape[-2], shape[-1]
    m |= np.arange(s)[None, :] == (np.arange(t)[:, None] * 3) % s
    assert m.any(-1).all()
    return m


def _ref_attention(q, k, v, mask=None, bias=None, scale=None):
    """softmax(Q K^T * scale + bias) V from the equations, float64; head n reads kv head n // G."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    scores = np.empty((b, n, t, s))
    for i in range(n):
        scores[:, i] = np.einsum("bth,bsh->bts", q[:, :, i], k[:, :, i // g]) * scale
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, np.float64), scores.shape)
    if mask is not None:
        scores = np.where(np.broadcast_to(np.asarray(mask), scores.shape), scores, -1e9)
    scores = scores - scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w = w / w.sum(-1, keepdims=True)
    out = np.empty((b, t, n, h))
    for i in range(n):
        out[:, :, i] = np.einsum("bts,bsh->bth", w[:, i], v[:, :, i // g])
    return out, w


def _qkv(seed, b=2, t=5, s=6, n=4, k=2, h=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return (
        randn(rng, b, t, n, h, dtype=dtype),
        randn(rng, b, s, k, h, dtype=dtype),
        randn(rng, b, s, k, h, dtype=dtype),
        rng,
    )


# --- dot_product_attention: literal ---------------------------------------------------------------


def test_well_separated_inputs_give_identity_weights():
    # One-hot rows scaled by 10, H=4: diagonal scores 100/sqrt(4)=50, off-diagonal 0.
    x = jnp.broadcast_to((10.0 * jnp.eye(4, dtype=jnp.float32))[None, :, None, :], (2, 4, 3, 4))
    out, w = dpa(x, x, x, return_weights=True)
    assert w.shape == (2, 3, 4, 4)
    assert w.dtype == jnp.float32
    eye = np.broadcast_to(np.eye(4), (2, 3, 4, 4))
    assert maxerr(w, eye) < 1e-6
    assert maxerr(out, x) < 1e-5


def test_fully_masked_rows_are_uniform_and_finite():
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, 2, 3, 2, 4), randn(rng, 2, 4, 2, 4), randn(rng, 2, 4, 2, 4)
    mask = jnp.zeros((2, 1, 3, 4), bool)
    out, w = dpa(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(w), np.full((2, 2, 3, 4), 0.25, np.float32))
    assert np.isfinite(np.asarray(out)).all()
    # Uniform weights average the values.
    expected = np.broadcast_to(np.asarray(v).mean(axis=1, keepdims=True), out.shape)
    assert maxerr(out, expected) <= TOL
    # The fused-path request agrees on fully masked rows.
    assert maxerr(dpa(q, k, v, mask=mask, implementation="jax"), expected) <= TOL


def test_partially_masked_literal():
    # Two keys: the first masked out, so every query copies value 1 exactly.
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, 1, 2, 1, 4), randn(rng, 1, 2, 1, 4), randn(rng, 1, 2, 1, 4)
    mask = jnp.array([False, True])[None, None, None, :]
    out, w = dpa(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(w)[0, 0], np.array([[0.0, 1.0], [0.0, 1.0]], np.float32))
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], np.asarray(v)[0, [1, 1], 0])


# --- dot_product_attention: NumPy reference ----------------------------------------------------------


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_matches_numpy_reference(n, k):
    q, kk, v, rng = _qkv(10 + k, n=n, k=k)
    b, t, s = 2, 5, 6
    mask = jnp.asarray(_random_mask(rng, (b, n, t, s)))
    bias = randn(rng, 1, n, t, s)
    out, w = dpa(q, kk, v, mask=mask, bias=bias, return_weights=True)
    ref_out, ref_w = _ref_attention(q, kk, v, mask, bias)
    assert out.shape == (b, t, n, 8) and w.shape == (b, n, t, s)
    assert maxerr(out, ref_out) <= TOL
    assert maxerr(w, ref_w) <= TOL
    # Masked positions get exactly zero weight.
    assert not np.asarray(w)[~np.broadcast_to(np.asarray(mask), w.shape)].any()
    # No mask, no bias.
    assert maxerr(dpa(q, kk, v), _ref_attention(q, kk, v)[0]) <= TOL
    # A [B, 1, T, S] mask broadcast over heads.
    m1 = jnp.asarray(_random_mask(rng, (b, 1, t, s)))
    assert maxerr(dpa(q, kk, v, mask=m1), _ref_attention(q, kk, v, m1)[0]) <= TOL


def test_scale_argument_is_respected():
    q, k, v, _ = _qkv(3, n=2, k=2, h=4)
    for scale in (1.0, 0.1):
        out = dpa(q, k, v, scale=scale)
        assert maxerr(out, _ref_attention(q, k, v, scale=scale)[0]) <= TOL
    # scale=1/sqrt(H) is the default; scale=1.0 differs from it.
    assert maxerr(dpa(q, k, v, scale=0.5), dpa(q, k, v)) <= 1e-6
    assert maxerr(dpa(q, k, v, scale=1.0), dpa(q, k, v)) > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v, rng = _qkv(4, n=6, k=2)
    mask = jnp.asarray(_random_mask(rng, (2, 1, 5, 6)))
    g = 3
    gqa = dpa(q, k, v, mask=mask)
    mha = dpa(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), mask=mask)
    assert maxerr(gqa, mha) <= TOL
    # And MQA (K=1) equals MHA with the single head repeated N times.
    mqa = dpa(q, k[:, :, :1], v[:, :, :1])
    assert maxerr(mqa, dpa(q, jnp.repeat(k[:, :, :1], 6, axis=2), jnp.repeat(v[:, :, :1], 6, axis=2))) <= TOL


def test_head_grouping_is_n_div_g_not_n_mod_k():
    # Query heads 0,1 read kv head 0 and heads 2,3 read kv head 1 (not 0,2 / 1,3).
    q, k, v, _ = _qkv(5, n=4, k=2)
    out = np.asarray(dpa(q, k, v))
    for i in range(4):
        single = dpa(q[:, :, i : i + 1], k[:, :, i // 2 : i // 2 + 1], v[:, :, i // 2 : i // 2 + 1])
        assert maxerr(out[:, :, i : i + 1], single) <= TOL


# --- implementations, errors, dtypes, dropout ----------------------------------------------------------


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2)])
def test_jax_implementation_equals_default(n, k):
    q, kk, v, rng = _qkv(6, n=n, k=k)
    mask = jnp.asarray(_random_mask(rng, (2, 1, 5, 6)))
    bias = randn(rng, 1, n, 5, 6)
    ref = dpa(q, kk, v, mask=mask, bias=bias)
    assert maxerr(dpa(q, kk, v, mask=mask, bias=bias, implementation="jax"), ref) <= TOL
    assert maxerr(dpa(q, kk, v, mask=mask, bias=bias, implementation="xla"), ref) <= TOL
    # A rank-2 [T, S] causal mask through the fused path.
    cm = causal_mask(5, kv_length=6)[0, 0]
    assert maxerr(dpa(q, kk, v, mask=cm, implementation="jax"), dpa(q, kk, v, mask=cm)) <= TOL


def test_cudnn_on_cpu_falls_back_to_xla(caplog):
    q, k, v, rng = _qkv(7)
    mask = jnp.asarray(_random_mask(rng, (2, 1, 5, 6)))
    ref = dpa(q, k, v, mask=mask)
    with caplog.at_level(logging.INFO, logger="tfm.layers.dot_product"):
        eager = dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if jax.default_backend() == "cpu":
        assert "unavailable" in caplog.text
    assert maxerr(eager, ref) <= TOL
    # Also under jit (the fused kernel's refusal must be caught while tracing).
    assert maxerr(dpa(q, k, v, mask=mask, implementation="cudnn"), ref) <= TOL


def test_return_weights_forces_xla_path():
    q, k, v, rng = _qkv(8)
    mask = jnp.asarray(_random_mask(rng, (2, 1, 5, 6)))
    out_j, w_j = dpa(q, k, v, mask=mask, return_weights=True, implementation="jax")
    out_c, w_c = dpa(q, k, v, mask=mask, return_weights=True, implementation="cudnn")
    out_x, w_x = dpa(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(w_j), np.asarray(w_x))
    np.testing.assert_array_equal(np.asarray(w_c), np.asarray(w_x))
    np.testing.assert_array_equal(np.asarray(out_j), np.asarray(out_x))
    assert w_j.shape == (2, 4, 5, 6)


def test_bad_shapes_and_arguments_raise():
    q, k, v, _ = _qkv(9, n=4, k=2)
    with pytest.raises(ValueError):  # N=4 not a multiple of K=3
        dot_product_attention(jnp.zeros((2, 5, 4, 8)), jnp.zeros((2, 6, 3, 8)), jnp.zeros((2, 6, 3, 8)))
    with pytest.raises(ValueError):  # rank 3 query
        dot_product_attention(q[:, :, 0], k, v)
    with pytest.raises(ValueError):  # rank 3 key/value
        dot_product_attention(q, k[:, :, 0], v[:, :, 0])
    with pytest.raises(ValueError):  # key/value shape mismatch
        dot_product_attention(q, k, v[:, :5])
    with pytest.raises(ValueError):  # head width mismatch
        dot_product_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError):  # batch mismatch
        dot_product_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError):  # dropout without rng
        dot_product_attention(q, k, v, dropout_rate=0.1)
    with pytest.raises(ValueError):
        dot_product_attention(q, k, v, implementation="flash")


def test_dropout_on_weights():
    q, k, v, _ = _qkv(11, n=2, k=2)
    rate = 0.5
    key = jax.random.key(0, impl="rbg")  # rbg: cheap to compile on CPU
    out, w = dpa(q, k, v, dropout_rate=rate, dropout_rng=key, return_weights=True)
    _, w0 = dpa(q, k, v, return_weights=True)
    w, w0 = np.asarray(w), np.asarray(w0)
    dropped = w == 0
    assert 0.2 < dropped.mean() < 0.8
    np.testing.assert_allclose(w[~dropped], w0[~dropped] / (1 - rate), rtol=1e-6)
    # The output uses exactly the dropped weights.
    expected = np.einsum("bnts,bsnh->btnh", w, np.asarray(v, np.float64))
    assert maxerr(out, expected) <= TOL
    # Same key, same result; a different key, a different result.
    out2 = dpa(q, k, v, dropout_rate=rate, dropout_rng=key)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    out3 = dpa(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(1, impl="rbg"))
    assert maxerr(out, out3) > 1e-3


def test_bf16_inputs():
    q, k, v, rng = _qkv(12, dtype=jnp.bfloat16)
    mask = jnp.asarray(_random_mask(rng, (2, 1, 5, 6)))
    out, w = dpa(q, k, v, mask=mask, return_weights=True)
    assert out.dtype == jnp.bfloat16
    assert w.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
    # Close to the float32 reference at bf16 precision.
    ref = _ref_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), mask)[0]
    assert maxerr(out, ref) < 5e-2
    out_j = dpa(q, k, v, mask=mask, implementation="jax")
    assert out_j.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out_j, np.float32)).all()


# --- dot_product_attention vs torch ------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_matches_torch_sdpa(n, k):
    torch = torch_or_skip()
    F = torch.nn.functional
    q, kk, v, rng = _qkv(20 + k, n=n, k=k)
    mask = _random_mask(rng, (2, n, 5, 6))
    bias = np.asarray(randn(rng, 2, n, 5, 6))
    tq, tk, tv = (torch.from_numpy(np.asarray(a).transpose(0, 2, 1, 3).copy()) for a in (q, kk, v))
    # Boolean mask, True = attend; GQA via enable_gqa.
    ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(mask), enable_gqa=k != n)
    ours = dpa(q, kk, v, mask=jnp.asarray(mask))
    assert maxerr(ours, ref.numpy().transpose(0, 2, 1, 3)) <= TOL
    # Additive float mask = bias + masking; GQA by repeat_interleave of the kv heads.
    add = torch.from_numpy(np.where(mask, bias, -np.inf).astype(np.float32))
    g = n // k
    ref2 = F.scaled_dot_product_attention(
        tq, tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1), attn_mask=add, scale=0.3
    )
    ours2 = dpa(q, kk, v, mask=jnp.asarray(mask), bias=jnp.asarray(bias), scale=0.3)
    assert maxerr(ours2, ref2.numpy().transpose(0, 2, 1, 3)) <= TOL
    # Causal.
    ref3 = F.scaled_dot_product_attention(tq[:, :, :5], tk[:, :, :5], tv[:, :, :5], is_causal=True, enable_gqa=k != n)
    ours3 = dpa(q, kk[:, :5], v[:, :5], mask=causal_mask(5))
    assert maxerr(ours3, ref3.numpy().transpose(0, 2, 1, 3)) <= TOL


# --- MultiHeadAttention helpers -------------------------------------------------------------------------








def _torch_mha(torch, d, n, seed):
    torch.manual_seed(seed)
    tm = torch.nn.MultiheadAttention(embed_dim=d, num_heads=n, bias=True, batch_first=True)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in tm.parameters():  # torch zero-inits the biases; make them count
            p.copy_(torch.from_numpy((rng.standard_normal(tuple(p.shape)) * 0.3).astype(np.float32)))
    return tm


def _params_from_torch_mha(tm, n):
    d = tm.embed_dim
    h = d // n
    w = tm.in_proj_weight.detach().numpy()
    b = tm.in_proj_bias.detach().numpy()
    p = {}
    for i, name in enumerate(("query", "key", "value")):
        p[name] = {
            "kernel": jnp.asarray(w[i * d : (i + 1) * d].T.reshape(d, n, h)),
            "bias": jnp.asarray(b[i * d : (i + 1) * d].reshape(n, h)),
        }
    p["out"] = {
        "kernel": jnp.asarray(tm.out_proj.weight.detach().numpy().T.reshape(n, h, d)),
        "bias": jnp.asarray(tm.out_proj.bias.detach().numpy()),
    }
    return p


# --- MultiHeadAttention vs torch --------------------------------------------------------------------------


def test_mha_self_attention_matches_torch():
    torch = torch_or_skip()
    b, t, d, n = 2, 5, 16, 4
    tm = _torch_mha(torch, d, n, seed=0)
    module = MultiHeadAttention(num_heads=n, head_dim=d // n, use_bias=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    params = _params_from_torch_mha(tm, n)
    assert_same_tree(params, param_shapes(module, jnp.asarray(x))["params"])

    key_pad = np.array([[False] * 5, [False, False, False, True, True]])  # torch: True = ignore
    attn_mask = ~np.tril(np.ones((t, t), bool))  # torch bool attn_mask: True = not allowed
    tx = torch.from_numpy(x)
    # Grad stays enabled so torch takes its reference (non-fast) path.
    ref_pad = tm(tx, tx, tx, key_padding_mask=torch.from_numpy(key_pad), need_weights=False)[0].detach().numpy()
    ref_both = tm(
        tx, tx, tx,
        key_padding_mask=torch.from_numpy(key_pad), attn_mask=torch.from_numpy(attn_mask), need_weights=False,
    )[0].detach().numpy()  # fmt: skip
    ref_none = tm(tx, tx, tx, need_weights=False)[0].detach().numpy()

    apply = jax.jit(lambda p, x, m: module.apply({"params": p}, x, mask=m))
    kv_mask = jnp.asarray(~key_pad)[:, None, None, :]
    assert maxerr(apply(params, x, kv_mask), ref_pad) <= TOL
    assert maxerr(apply(params, x, kv_mask & causal_mask(t)), ref_both) <= TOL
    assert maxerr(module.apply({"params": params}, jnp.asarray(x)), ref_none) <= TOL


def test_mha_cross_attention_matches_torch():
    torch = torch_or_skip()
    b, t, s, d, n = 2, 3, 6, 16, 2
    tm = _torch_mha(torch, d, n, seed=3)
    module = MultiHeadAttention(num_heads=n, head_dim=d // n, use_bias=True)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    mem = rng.standard_normal((b, s, d)).astype(np.float32)
    key_pad = np.zeros((b, s), bool)
    key_pad[1, 4:] = True
    tmem = torch.from_numpy(mem)
    ref = tm(torch.from_numpy(x), tmem, tmem, key_padding_mask=torch.from_numpy(key_pad), need_weights=False)[0]
    params = _params_from_torch_mha(tm, n)
    assert_same_tree(params, param_shapes(module, jnp.asarray(x), jnp.asarray(mem))["params"])
    out = jax.jit(lambda p, x, m, mask: module.apply({"params": p}, x, m, mask=mask))(
        params, x, mem, jnp.asarray(~key_pad)[:, None, None, :]
    )
    assert out.shape == (b, t, d)
    assert maxerr(out, ref.detach().numpy()) <= TOL


# --- MultiHeadAttention: GQA / MQA, RoPE, weights, dropout -------------------------------------------------


def test_mha_param_shapes_mha_gqa_mqa():
    x = jnp.zeros((2, 3, 16))
    for kv, k in [(None, 4), (4, 4), (2, 2), (1, 1)]:
        p = param_shapes(MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=kv, use_bias=True), x)["params"]
        assert p["query"]["kernel"].shape == (16, 4, 8)
        assert p["query"]["bias"].shape == (4, 8)
        assert p["key"]["kernel"].shape == (16, k, 8)
        assert p["value"]["kernel"].shape == (16, k, 8)
        assert p["key"]["bias"].shape == (k, 8)
        assert p["out"]["kernel"].shape == (4, 8, 16)
        assert p["out"]["bias"].shape == (16,)
    # No biases by default; out_features changes the output width.
    p = param_shapes(MultiHeadAttention(num_heads=2, head_dim=4, out_features=6), x)["params"]
    assert set(p["query"]) == {"kernel"} and p["out"]["kernel"].shape == (2, 4, 6)
    with pytest.raises(ValueError):
        param_shapes(MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=3), x)


def test_mha_gqa_equals_mha_with_repeated_kv_kernels():
    rng = np.random.default_rng(5)
    x = randn(rng, 2, 5, 16)
    gqa = MultiHeadAttention(num_heads=4, head_dim=4, num_kv_heads=2, use_bias=True)
    mha = MultiHeadAttention(num_heads=4, head_dim=4, use_bias=True)
    same = MultiHeadAttention(num_heads=4, head_dim=4, num_kv_heads=4, use_bias=True)
    p = random_params(gqa, x, seed=6)
    rep = dict(p)
    for name in ("key", "value"):
        rep[name] = {"kernel": jnp.repeat(p[name]["kernel"], 2, axis=1), "bias": jnp.repeat(p[name]["bias"], 2, axis=0)}
    mask = causal_mask(5)
    out_gqa = gqa.apply({"params": p}, x, mask=mask)
    out_mha = mha.apply({"params": rep}, x, mask=mask)
    assert maxerr(out_gqa, out_mha) <= TOL
    np.testing.assert_array_equal(np.asarray(same.apply({"params": rep}, x, mask=mask)), np.asarray(out_mha))


def test_mha_rope_depends_only_on_relative_positions():
    rng = np.random.default_rng(7)
    x = randn(rng, 2, 5, 16)
    mem = randn(rng, 2, 4, 16)
    module = MultiHeadAttention(num_heads=2, head_dim=8, use_rope=True)
    p = random_params(module, x, seed=8)
    run = jax.jit(lambda p, x, pos: module.apply({"params": p}, x, mask=causal_mask(5), positions=pos))
    base = run(p, x, jnp.arange(5))
    assert maxerr(module.apply({"params": p}, x, mask=causal_mask(5)), base) <= TOL  # default positions 0..T-1
    assert maxerr(run(p, x, jnp.arange(5) + 7), base) <= 1e-4
    assert maxerr(run(p, x, jnp.stack([jnp.arange(5) + 3, jnp.arange(5) + 11])), base) <= 1e-4
    # RoPE actually matters: without it the outputs differ.
    plain = MultiHeadAttention(num_heads=2, head_dim=8).apply({"params": p}, x, mask=causal_mask(5))
    assert maxerr(plain, base) > 1e-3
    # Cross-attention with explicit query and key positions.
    cross = jax.jit(lambda p, qp, kp: module.apply({"params": p}, x, mem, positions=qp, kv_positions=kp))
    c0 = cross(p, jnp.arange(5), jnp.arange(4))
    assert maxerr(cross(p, jnp.arange(5) + 5, jnp.arange(4) + 5), c0) <= 1e-4
    assert maxerr(cross(p, jnp.arange(5) + 5, jnp.arange(4)), c0) > 1e-3


def test_mha_sow_weights():
    rng = np.random.default_rng(9)
    x = randn(rng, 2, 4, 8)
    module = MultiHeadAttention(num_heads=2, head_dim=4, sow_weights=True)
    p = random_params(module, x)
    out, state = module.apply({"params": p}, x, mask=causal_mask(4), mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    assert w.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    assert not np.asarray(w)[..., ~np.tril(np.ones((4, 4), bool))].any()
    plain = MultiHeadAttention(num_heads=2, head_dim=4).apply({"params": p}, x, mask=causal_mask(4))
    assert maxerr(out, plain) <= TOL


def test_mha_attention_dropout():
    rng = np.random.default_rng(10)
    x = randn(rng, 2, 4, 8)
    module = MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
    p = random_params(module, x)
    det = module.apply({"params": p}, x)
    det2 = module.apply({"params": p}, x, deterministic=True, rngs={"dropout": jax.random.key(0, impl="rbg")})
    np.testing.assert_array_equal(np.asarray(det), np.asarray(det2))
    drop = module.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(0, impl="rbg")})
    assert maxerr(drop, det) > 1e-3


# --- KV cache ------------------------------------------------------------------------------------------------


def _decode_compare(module_kwargs, prefill=0, seed=0, t=6, d=16, real_init=False):
    rng = np.random.default_rng(seed)
    x = randn(rng, 2, t, d)
    full_mod = MultiHeadAttention(**module_kwargs)
    dec_mod = MultiHeadAttention(**module_kwargs, decode=True)
    p = random_params(full_mod, x, seed=seed + 1)
    full = jax.jit(lambda p, x: full_mod.apply({"params": p}, x, mask=causal_mask(t)))(p, x)

    shapes = param_shapes(dec_mod, x, mask=causal_mask(t))
    h = module_kwargs["head_dim"]
    k = module_kwargs.get("num_kv_heads") or module_kwargs["num_heads"]
    assert shapes["cache"]["cached_key"].shape == (2, t, k, h)
    assert shapes["cache"]["cached_value"].shape == (2, t, k, h)
    if real_init:
        variables = dec_mod.init(jax.random.key(0), x, mask=causal_mask(t))
        cache = variables["cache"]
        assert_same_tree(nn.unbox(variables["params"]), p)
    else:
        # What init does, minus drawing parameters: run once with the cache mutable.
        make_cache = jax.jit(lambda p, x: dec_mod.apply({"params": p}, x, mask=causal_mask(t), mutable=["cache"]))
        _, variables = make_cache(p, x)
        cache = variables["cache"]
    assert int(cache["cache_index"]) == 0
    assert not np.asarray(cache["cached_key"]).any()

    step = jax.jit(lambda p, c, xt: dec_mod.apply({"params": p, "cache": c}, xt, mutable=["cache"]))
    outs = []
    if prefill:
        o, v = step(p, cache, x[:, :prefill])
        outs.append(o)
        cache = v["cache"]
        assert int(cache["cache_index"]) == prefill
    for i in range(prefill, t):
        o, v = step(p, cache, x[:, i : i + 1])
        outs.append(o)
        cache = v["cache"]
    assert int(cache["cache_index"]) == t
    with pytest.raises(ValueError):  # a batch that does not match the cache
        dec_mod.apply({"params": p, "cache": cache}, x[:1, :1], mutable=["cache"])
    got = jnp.concatenate(outs, axis=1)
    assert got.shape == full.shape
    assert maxerr(got, full) <= TOL
    return p, cache, x


def test_kv_cache_token_by_token_equals_full_forward():
    p, cache, x = _decode_compare(dict(num_heads=4, head_dim=4, use_bias=True), real_init=True)
    # The cache holds exactly the projected keys/values of every position.
    keys = jnp.einsum("BTD,DKH->BTKH", x, p["key"]["kernel"]) + p["key"]["bias"]
    assert maxerr(cache["cached_key"], keys) <= TOL


def test_kv_cache_prefill_then_tokens():
    _decode_compare(dict(num_heads=4, head_dim=4, use_bias=True), prefill=3, seed=1)


def test_kv_cache_with_rope():
    p, cache, x = _decode_compare(dict(num_heads=2, head_dim=8, use_rope=True), prefill=2, seed=2)
    # Keys are cached after rotation by their absolute position.
    keys = apply_rope(jnp.einsum("BTD,DKH->BTKH", x, p["key"]["kernel"]), jnp.arange(6))
    assert maxerr(cache["cached_key"], keys) <= TOL


def test_kv_cache_with_gqa():
    _decode_compare(dict(num_heads=4, head_dim=4, num_kv_heads=2, use_rope=True), seed=3)
