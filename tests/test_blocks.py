"""EncoderBlock / DecoderBlock against torch.nn.Transformer*Layer, Stack (scan vs loop, remat, KV cache).

Parameters are drawn with NumPy after ``jax.eval_shape(module.init, ...)`` (no
threefry compile on a small CPU box; random biases and norm parameters make
the weight-copy tests stricter). torch is only needed by the ``*_torch`` tests.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm.layers.blocks import REMAT_POLICIES, BlockConfig, DecoderBlock, EncoderBlock, Stack
from tfm.layers.masks import causal_mask

from _helpers import assert_same_tree, maxerr, param_shapes, randn, random_params, torch_or_skip

TOL = 1e-5
B, T, S, D, N, F = 2, 5, 6, 16, 4, 32


pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")














def _cfg(**kw):
    base = dict(d_model=D, num_heads=N, d_ff=F, dropout_rate=0.0, norm_epsilon=1e-5)
    base.update(kw)
    return BlockConfig(**base)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = randn(rng, B, T, D)
    mem = randn(rng, B, S, D)
    key_pad = np.zeros((B, T), bool)
    key_pad[1, 3:] = True  # torch: True = ignore
    mem_pad = np.zeros((B, S), bool)
    mem_pad[0, 4:] = True
    return x, mem, key_pad, mem_pad


def _kv_mask(pad):
    """torch key padding (True = ignore) -> tfm mask [B, 1, 1, S] (True = attend)."""
    return jnp.asarray(~pad)[:, None, None, :]


# --- torch weight copying ------------------------------------------------------------------------


def _randomize_torch(torch, module, seed):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            val = rng.standard_normal(tuple(p.shape)) * 0.3
            if name.startswith("norm") and name.endswith("weight"):
                val = val + 1.0
            p.copy_(torch.from_numpy(val.astype(np.float32)))


def _t(p):
    return p.detach().numpy()


def _mha_params(mha, n):
    d = mha.embed_dim
    h = d // n
    w, b = _t(mha.in_proj_weight), _t(mha.in_proj_bias)
    p = {}
    for i, name in enumerate(("query", "key", "value")):
        rows = slice(i * d, (i + 1) * d)  # torch packs W_q, W_k, W_v as rows of in_proj_weight [3D, D]
        p[name] = {"kernel": jnp.asarray(w[rows].T.reshape(d, n, h)), "bias": jnp.asarray(b[rows].reshape(n, h))}
    p["out"] = {
        "kernel": jnp.asarray(_t(mha.out_proj.weight).T.reshape(n, h, d)),
        "bias": jnp.asarray(_t(mha.out_proj.bias)),
    }
    return p


def _norm_params(norm):
    return {"scale": jnp.asarray(_t(norm.weight)), "bias": jnp.asarray(_t(norm.bias))}


def _mlp_params(layer):
    return {
        "wi": {"kernel": jnp.asarray(_t(layer.linear1.weight).T), "bias": jnp.asarray(_t(layer.linear1.bias))},
        "wo": {"kernel": jnp.asarray(_t(layer.linear2.weight).T), "bias": jnp.asarray(_t(layer.linear2.bias))},
    }


# --- EncoderBlock / DecoderBlock vs torch ----------------------------------------------------------


@pytest.mark.parametrize(
    "norm_position,activation", [("post", "relu"), ("pre", "relu"), ("post", "gelu")], ids=["post", "pre", "gelu"]
)
def test_encoder_block_matches_torch(norm_position, activation):
    torch = torch_or_skip()
    x, _, key_pad, _ = _inputs(1)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        D, N, dim_feedforward=F, dropout=0.0, activation=activation, batch_first=True,
        norm_first=norm_position == "pre", layer_norm_eps=1e-5,
    )  # fmt: skip
    _randomize_torch(torch, layer, seed=2)
    # Grad stays enabled so torch does not take its fused inference fast path.
    ref = layer(torch.from_numpy(np.array(x)), src_key_padding_mask=torch.from_numpy(key_pad))
    ref_causal = layer(
        torch.from_numpy(np.array(x)),
        src_mask=torch.from_numpy(~np.tril(np.ones((T, T), bool))),
        src_key_padding_mask=torch.from_numpy(key_pad),
    )

    block = EncoderBlock(_cfg(norm_position=norm_position, activation=activation))
    params = {
        "self_attention": _mha_params(layer.self_attn, N),
        "attention_norm": _norm_params(layer.norm1),
        "mlp": _mlp_params(layer),
        "mlp_norm": _norm_params(layer.norm2),
    }
    assert_same_tree(params, param_shapes(block, x)["params"])
    run = jax.jit(lambda p, x, m: block.apply({"params": p}, x, m, None, None, True))
    assert maxerr(run(params, x, _kv_mask(key_pad)), _t(ref)) <= TOL
    assert maxerr(run(params, x, _kv_mask(key_pad) & causal_mask(T)), _t(ref_causal)) <= TOL


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_decoder_block_matches_torch(norm_position):
    torch = torch_or_skip()
    x, mem, _, mem_pad = _inputs(3)
    torch.manual_seed(1)
    layer = torch.nn.TransformerDecoderLayer(
        D, N, dim_feedforward=F, dropout=0.0, activation="relu", batch_first=True,
        norm_first=norm_position == "pre", layer_norm_eps=1e-5,
    )  # fmt: skip
    _randomize_torch(torch, layer, seed=4)
    ref = layer(
        torch.from_numpy(np.array(x)),
        torch.from_numpy(np.array(mem)),
        tgt_mask=torch.from_numpy(~np.tril(np.ones((T, T), bool))),  # True = not allowed
        memory_key_padding_mask=torch.from_numpy(mem_pad),
    )

    block = DecoderBlock(_cfg(norm_position=norm_position))
    params = {
        "self_attention": _mha_params(layer.self_attn, N),
        "self_attention_norm": _norm_params(layer.norm1),
        "cross_attention": _mha_params(layer.multihead_attn, N),
        "cross_attention_norm": _norm_params(layer.norm2),
        "mlp": _mlp_params(layer),
        "mlp_norm": _norm_params(layer.norm3),
    }
    assert_same_tree(params, param_shapes(block, x, mem)["params"])
    out = jax.jit(lambda p, x, m, sm, cm: block.apply({"params": p}, x, m, sm, cm, None, None, True))(
        params, x, mem, causal_mask(T), _kv_mask(mem_pad)
    )
    assert out.shape == (B, T, D)
    assert maxerr(out, _t(ref)) <= TOL


# --- Stack: scan equals loop -------------------------------------------------------------------------


def _stack_loop_to_scan(loop_params, num_layers):
    layers = [loop_params[f"layers_{i}"] for i in range(num_layers)]
    scanned = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    if "final_norm" in loop_params:
        scanned["final_norm"] = loop_params["final_norm"]
    return scanned


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_encoder_stack_scan_equals_loop(norm_position):
    x, _, key_pad, _ = _inputs(5)
    cfg = _cfg(norm_position=norm_position)
    kw = dict(mask=_kv_mask(key_pad) & causal_mask(T))
    loop = Stack(EncoderBlock, cfg, 3, scan=False)
    scan = Stack(EncoderBlock, cfg, 3, scan=True)
    p_loop = random_params(loop, x, seed=6, **kw)
    assert set(p_loop) == {"layers_0", "layers_1", "layers_2"} | ({"final_norm"} if norm_position == "pre" else set())
    p_scan = _stack_loop_to_scan(p_loop, 3)
    assert_same_tree(p_scan, param_shapes(scan, x, **kw)["params"])
    out_loop = jax.jit(lambda p, x, kw: loop.apply({"params": p}, x, **kw))(p_loop, x, kw)
    out_scan = jax.jit(lambda p, x, kw: scan.apply({"params": p}, x, **kw))(p_scan, x, kw)
    assert maxerr(out_loop, out_scan) <= TOL


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_decoder_stack_scan_equals_loop(norm_position):
    x, mem, _, mem_pad = _inputs(7)
    cfg = _cfg(norm_position=norm_position)
    kw = dict(encoded=mem, mask=causal_mask(T), cross_mask=_kv_mask(mem_pad))
    loop = Stack(DecoderBlock, cfg, 2, scan=False)
    scan = Stack(DecoderBlock, cfg, 2, scan=True)
    p_loop = random_params(loop, x, seed=8, **kw)
    p_scan = _stack_loop_to_scan(p_loop, 2)
    assert_same_tree(p_scan, param_shapes(scan, x, **kw)["params"])
    out_loop = jax.jit(lambda p, x, kw: loop.apply({"params": p}, x, **kw))(p_loop, x, kw)
    out_scan = jax.jit(lambda p, x, kw: scan.apply({"params": p}, x, **kw))(p_scan, x, kw)
    assert out_scan.shape == (B, T, D)
    assert maxerr(out_loop, out_scan) <= TOL


# --- remat ------------------------------------------------------------------------------------------------


def test_remat_leaves_gradients_unchanged():
    """Grads of a sum-of-squares loss: remat "full" / "dots_saveable" equal no remat, looped and scanned."""
    rng = np.random.default_rng(9)
    x = randn(rng, B, 4, 8)
    cfg = BlockConfig(d_model=8, num_heads=2, d_ff=16, dropout_rate=0.0, norm_position="pre")
    kw = dict(mask=causal_mask(4))
    params = {False: random_params(Stack(EncoderBlock, cfg, 2, scan=False), x, seed=10, **kw)}
    params[True] = _stack_loop_to_scan(params[False], 2)

    def grads(scan, policy):
        stack = Stack(EncoderBlock, cfg, 2, scan=scan, remat_policy=policy)
        assert_same_tree(params[scan], param_shapes(stack, x, **kw)["params"])
        loss = lambda p, x: jnp.sum(jnp.square(stack.apply({"params": p}, x, **kw)))  # noqa: E731
        return jax.jit(jax.grad(loss))(params[scan], x)

    def check(got, ref, what):
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert maxerr(a, b) <= 1e-6, what

    # Reference: the looped stack without remat. Scanning does not change the gradients
    # either, so the scanned stacks are compared with the same gradients stacked.
    ref = {False: grads(False, "none")}
    ref[True] = _stack_loop_to_scan(ref[False], 2)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref[False])) > 1e-3
    for scan in (False, True):
        for policy in ("full", "dots_saveable"):
            check(grads(scan, policy), ref[scan], (scan, policy))


def test_unknown_remat_policy_and_bad_layers_raise():
    x = jnp.zeros((1, 3, 8))
    cfg = BlockConfig(d_model=8, num_heads=2, d_ff=16)
    assert "full" in REMAT_POLICIES and "none" in REMAT_POLICIES
    with pytest.raises(ValueError):
        param_shapes(Stack(EncoderBlock, cfg, 2, remat_policy="sometimes"), x)
    with pytest.raises(ValueError):
        param_shapes(Stack(EncoderBlock, cfg, 0), x)
    with pytest.raises(ValueError, match=r"EncoderBlock takes the inputs \('mask', 'bias', 'positions'\), not \['encoded'\]"):
        param_shapes(Stack(EncoderBlock, cfg, 2), x, encoded=x)


# --- config validation, dtype, dropout -------------------------------------------------------------------


def test_bad_block_config_raises():
    with pytest.raises(ValueError):
        BlockConfig(d_model=10, num_heads=4, d_ff=8)
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=2, d_ff=8, norm_position="middle")
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=2, d_ff=8, activation="tanhh")
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=4, d_ff=8, num_kv_heads=3)
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=2, d_ff=8, norm="batchnorm")
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=2, d_ff=8, dropout_rate=1.0)
    with pytest.raises(ValueError):
        BlockConfig(d_model=8, num_heads=2, d_ff=8, attention_impl="flash")
    # head_dim given explicitly lifts the divisibility requirement.
    cfg = BlockConfig(d_model=10, num_heads=4, d_ff=8, head_dim=3)
    assert cfg.head_width == 3 and cfg.kv_heads == 4


def test_bf16_block_forward_and_grad_finite():
    rng = np.random.default_rng(11)
    x = randn(rng, B, 4, 8).astype(jnp.bfloat16)
    cfg = BlockConfig(d_model=8, num_heads=2, d_ff=16, dropout_rate=0.0, dtype=jnp.bfloat16)
    block = EncoderBlock(cfg)
    args = (causal_mask(4), None, None)
    params = random_params(block, x, *args, seed=12)

    @jax.jit
    def fwd_grad(p, x):
        def loss(p):
            y = block.apply({"params": p}, x, *args)
            return jnp.sum(jnp.square(y.astype(jnp.float32))), y

        return jax.value_and_grad(loss, has_aux=True)(p)

    (loss, y), g = fwd_grad(params, x)
    assert y.dtype == jnp.bfloat16
    assert np.isfinite(float(loss))
    assert np.isfinite(np.asarray(y, np.float32)).all()
    for leaf in jax.tree.leaves(g):
        assert leaf.dtype == jnp.float32  # param_dtype stays float32
        assert np.isfinite(np.asarray(leaf)).all()


def test_dropout_active_only_when_not_deterministic_in_scanned_stack():
    rng = np.random.default_rng(13)
    x = randn(rng, B, 4, 8)
    cfg = BlockConfig(
        d_model=8, num_heads=2, d_ff=16, dropout_rate=0.3, attention_dropout_rate=0.2, activation_dropout_rate=0.2
    )
    stack = Stack(EncoderBlock, cfg, 2, scan=True)
    kw = dict(mask=causal_mask(4))
    params = random_params(stack, x, seed=14, **kw)
    run = jax.jit(
        lambda p, x, key, det: stack.apply({"params": p}, x, **kw, deterministic=det, rngs={"dropout": key}),
        static_argnums=(3,),
    )
    k0, k1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    det_a = run(params, x, k0, True)
    det_b = run(params, x, k1, True)
    np.testing.assert_array_equal(np.asarray(det_a), np.asarray(det_b))
    # The default is deterministic (jit vs eager: rounding only).
    default = jax.jit(lambda p, x: stack.apply({"params": p}, x, **kw, rngs={"dropout": k0}))(params, x)
    assert maxerr(det_a, default) <= 1e-6
    drop_a = run(params, x, k0, False)
    assert maxerr(drop_a, det_a) > 1e-3
    np.testing.assert_array_equal(np.asarray(drop_a), np.asarray(run(params, x, k0, False)))
    assert maxerr(run(params, x, k1, False), drop_a) > 1e-3
    # Remat recomputes the forward pass with the same dropout masks: same output, and
    # `deterministic` still reaches the blocks as a static flag.
    remat = Stack(EncoderBlock, cfg, 2, scan=True, remat_policy="full")
    run_remat = jax.jit(
        lambda p, x, key: remat.apply({"params": p}, x, **kw, deterministic=False, rngs={"dropout": key})
    )
    assert maxerr(run_remat(params, x, k0), drop_a) <= 1e-6


def test_encoder_block_dropout_single_block():
    rng = np.random.default_rng(15)
    x = randn(rng, B, 4, 8)
    block = EncoderBlock(BlockConfig(d_model=8, num_heads=2, d_ff=16, dropout_rate=0.5))
    params = random_params(block, x, seed=16)
    run = jax.jit(
        lambda p, x, key, det: block.apply({"params": p}, x, None, None, None, det, rngs={"dropout": key}),
        static_argnums=(3,),
    )
    key = jax.random.key(0, impl="rbg")
    det = run(params, x, key, True)
    np.testing.assert_array_equal(np.asarray(det), np.asarray(run(params, x, jax.random.key(1, impl="rbg"), True)))
    drop = run(params, x, key, False)
    assert maxerr(drop, det) > 1e-3


# --- KV cache through a Stack --------------------------------------------------------------------------------


@pytest.mark.parametrize("scan,use_rope", [(True, False), (False, True)], ids=["scan", "loop-rope"])
def test_stack_kv_cache_token_by_token_equals_full_forward(scan, use_rope):
    rng = np.random.default_rng(17)
    t, d = 5, 8
    x = randn(rng, B, t, d)
    cfg = BlockConfig(d_model=d, num_heads=2, d_ff=16, dropout_rate=0.0, norm_position="pre", use_rope=use_rope)
    full_stack = Stack(EncoderBlock, cfg, 2, scan=scan)
    dec_stack = Stack(EncoderBlock, dataclasses.replace(cfg, decode=True), 2, scan=scan)
    kw = dict(mask=causal_mask(t))
    params = random_params(full_stack, x, seed=18, **kw)
    full = jax.jit(lambda p, x: full_stack.apply({"params": p}, x, **kw))(params, x)

    cache_shapes = param_shapes(dec_stack, x, **kw)["cache"]
    if scan:
        assert cache_shapes["layers"]["self_attention"]["cached_key"].shape == (2, B, t, 2, 4)
    else:
        assert cache_shapes["layers_1"]["self_attention"]["cached_key"].shape == (B, t, 2, 4)
    # As module.init does: one call over the full length with the cache collection mutable.
    _, v = jax.jit(lambda p, x: dec_stack.apply({"params": p}, x, **kw, mutable=["cache"]))(params, x)
    cache = v["cache"]
    step = jax.jit(lambda p, c, xt: dec_stack.apply({"params": p, "cache": c}, xt, mutable=["cache"]))
    outs = []
    for i in range(t):
        o, v = step(params, cache, x[:, i : i + 1])
        outs.append(o)
        cache = v["cache"]
    assert maxerr(jnp.concatenate(outs, axis=1), full) <= TOL


def test_scanned_layers_draw_independent_dropout_masks():
    """Each scanned layer gets its own dropout key (split_rngs), so the masks differ across layers."""
    cfg = BlockConfig(d_model=D, num_heads=N, d_ff=F, dropout_rate=0.5)
    stack = Stack(EncoderBlock, cfg, 2, scan=True)
    x = randn(np.random.default_rng(0), B, T, D)
    params = random_params(stack, x)
    apply = jax.jit(
        lambda p, x, key: stack.apply(
            {"params": p}, x, deterministic=False, rngs={"dropout": key},
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout), mutable=["intermediates"],
        )
    )  # fmt: skip
    _, state = apply(params, x, jax.random.key(1, impl="rbg"))
    dropped = [np.asarray(v[0]) == 0 for v in jax.tree.leaves(state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))]
    assert dropped, "no dropout outputs captured"
    for d in dropped:  # stacked [L, B, T, D] per dropout site
        assert d.shape[0] == 2
        assert 0.3 < d[0].mean() < 0.7  # about half dropped
        assert (d[0] != d[1]).any()
