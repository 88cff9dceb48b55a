"""The fast paths of the training step compute what the plain forms compute.

``tfm.layers.tuning`` picks each by backend; here every one is forced on and off
and the two results (values and gradients) are compared. Also: the exact GELU,
the GPT-2 initialisation and the non-finite step guard.
"""

import contextlib
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import maxerr, random_params, randn

from tfm import config as config_lib
from tfm.layers import tuning
from tfm.layers import conv, dot_product
from tfm.layers.attention import MultiHeadAttention
from tfm.layers.blocks import BlockConfig, EncoderBlock, Stack
from tfm.layers.feedforward import ACTIVATIONS
from tfm.layers.linear import _matmul_plan, einsum_matmul
from tfm.layers.masks import and_masks, causal_mask, key_padding_mask, segment_mask
from tfm.layers.norms import LayerNorm, RMSNorm
from tfm.models.detr import DETR, detr_tiny
from tfm.models.gpt import GPT, GPTConfig
from tfm.models.vit import ViT, vit_tiny
from tfm.optim import decay_mask
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5


@contextlib.contextmanager
def forced(**settings):
    saved = {k: getattr(tuning, k) for k in settings}
    for k, v in settings.items():
        setattr(tuning, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(tuning, k, v)


def value_and_grads(f, *args):
    """f's value and its gradients with respect to every argument (eager: the settings are read at trace time)."""
    return f(*args), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)


def assert_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        assert maxerr(x, y) <= tol, maxerr(x, y)


@pytest.mark.parametrize(
    "equation, x_shape, k_shape",
    [
        ("BTD,DNH->BTNH", (2, 5, 8), (8, 2, 3)),  # query projection
        ("BTNH,NHD->BTD", (2, 5, 2, 3), (2, 3, 8)),  # attention output
        ("BTD,VD->BTV", (2, 5, 8), (11, 8)),  # tied embedding, transposed kernel
        ("BTPQC,PQCD->BTD", (2, 3, 2, 2, 3), (2, 2, 3, 8)),  # ViT patches
        ("BD,DC->BC", (4, 8), (8, 5)),
    ],
)
def test_matmul_fold_equals_einsum(equation, x_shape, k_shape):
    rng = np.random.default_rng(0)
    x, k = randn(rng, *x_shape), randn(rng, *k_shape)
    assert _matmul_plan(equation, x.ndim, k.ndim) is not None
    with forced(FOLD_TO_MATMUL=True):
        folded = value_and_grads(lambda a, b: einsum_matmul(equation, a, b), x, k)
    plain = value_and_grads(lambda a, b: jnp.einsum(equation, a, b), x, k)
    assert_close(folded, plain)


@pytest.mark.parametrize("equation", ["BTKGH,BSKH->BKGTS", "EGCD,EDF->EGCF", "BTD,DT->BT"])
def test_einsums_that_are_not_one_matmul_keep_the_einsum(equation):
    lhs = equation.split("->")[0].split(",")
    assert _matmul_plan(equation, len(lhs[0]), len(lhs[1])) is None


@pytest.mark.parametrize("num_kv_heads, use_bias", [(None, False), (None, True), (2, True), (1, False)])
def test_fused_qkv_equals_separate_projections(num_kv_heads, use_bias):
    rng = np.random.default_rng(1)
    x = randn(rng, 2, 6, 16)
    mha = MultiHeadAttention(num_heads=4, head_dim=5, num_kv_heads=num_kv_heads, use_bias=use_bias)
    mask = causal_mask(6)
    params = random_params(mha, x, mask=mask)
    assert set(params) == {"query", "key", "value", "out"}  # the parameters stay separate
    run = lambda p, a: mha.apply({"params": p}, a, mask=mask)  # noqa: E731
    with forced(FUSED_QKV=True):
        fused = value_and_grads(run, params, x)
    with forced(FUSED_QKV=False):
        separate = value_and_grads(run, params, x)
    assert_close(fused, separate)


@pytest.mark.parametrize(
    "x_shape, k_shape, strides, padding",
    [
        ((2, 28, 28, 1), (3, 3, 1, 8), (2, 2), "SAME"),  # the stems: 28 -> 14 -> 7 -> 4 px
        ((2, 7, 7, 6), (3, 3, 6, 5), (2, 2), "SAME"),
        ((2, 9, 8, 3), (3, 2, 3, 4), (1, 1), "VALID"),
        ((2, 8, 8, 3), (3, 3, 3, 4), (1, 2), ((1, 2), (0, 1))),
        ((2, 10, 3), (3, 3, 4), (2,), "SAME"),  # 1-D
    ],
)
def test_convolution_as_a_patch_matmul_equals_the_convolution(x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(6)
    x, k = randn(rng, *x_shape), randn(rng, *k_shape)
    names = conv._channels_last(len(x_shape) - 2)
    run = lambda a, b: conv.conv_general_dilated(a, b, strides, padding, dimension_numbers=names)  # noqa: E731
    lax_conv = lambda a, b: jax.lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=names)  # noqa: E731
    plain = value_and_grads(lax_conv, x, k)
    with forced(CONV_AS_MATMUL=True):
        jaxpr = str(jax.make_jaxpr(run)(x, k))
        patches = value_and_grads(run, x, k)
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    assert_close(patches, plain, tol=2e-4)  # sums of up to 3*3*6 products in another order
    with forced(CONV_AS_MATMUL=False):  # a new function: traces are cached per function
        again = lambda a, b: conv.conv_general_dilated(a, b, strides, padding, dimension_numbers=names)  # noqa: E731
        assert "conv_general_dilated" in str(jax.make_jaxpr(again)(x, k))


def test_convolutions_a_patch_matmul_does_not_cover_stay_convolutions():
    rng = np.random.default_rng(7)
    x, k = randn(rng, 2, 8, 8, 4), randn(rng, 3, 3, 2, 4)
    nhwc = ("NHWC", "HWIO", "NHWC")
    with forced(CONV_AS_MATMUL=True):
        for kwargs in (dict(feature_group_count=2), dict(rhs_dilation=(2, 2), feature_group_count=2)):
            got = conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=nhwc, **kwargs)
            assert_close(got, jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=nhwc, **kwargs))
        nchw = ("NCHW", "OIHW", "NCHW")
        xc, kc = randn(rng, 2, 4, 8, 8), randn(rng, 5, 4, 3, 3)
        run = lambda a, b: conv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=nchw)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(run)(xc, kc))
        assert "conv_general_dilated" in jaxpr


@pytest.mark.parametrize("family", ["vit", "detr"])
def test_convolution_stems_give_the_same_model_with_patch_matmuls(family):
    rng = np.random.default_rng(8)
    if family == "vit":
        model, x = ViT(vit_tiny.replace(stem_channels=(4, 8), patch_size=1, num_layers=1)), randn(rng, 2, 28, 28, 1)
    else:
        model, x = DETR(detr_tiny), randn(rng, 2, 32, 32, 3)
    params = random_params(model, x)

    def run():  # a new function each time, traced (and jitted) under the setting in force
        outputs = lambda p, a: jax.tree.leaves(model.apply({"params": p}, a))  # noqa: E731
        return jax.jit(lambda p, a: jnp.concatenate([y.ravel() for y in outputs(p, a)]))

    with forced(CONV_AS_MATMUL=True):
        patches = value_and_grads(run(), params, x)
    with forced(CONV_AS_MATMUL=False):
        plain = value_and_grads(run(), params, x)
    assert_close(patches, plain, tol=1e-4)


@pytest.mark.parametrize("norm", [LayerNorm(), LayerNorm(use_bias=False), RMSNorm(), LayerNorm(dtype=jnp.bfloat16)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_hand_written_norm_backward_equals_autodiff(norm, offset):
    """Values and gradients (input, scale, bias) equal XLA's derivative, also for inputs far from zero mean."""
    rng = np.random.default_rng(6)
    x = randn(rng, 3, 5, 16) * 3.0 + offset
    params = random_params(norm, x)
    run = lambda p, a: norm.apply({"params": p}, a).astype(jnp.float32)  # noqa: E731
    with forced(HAND_VJP=True):
        assert tuning.hand_vjp()
        written = value_and_grads(run, params, x)
    with forced(HAND_VJP=False):
        derived = value_and_grads(run, params, x)
    assert len(jax.tree.leaves(written)) == 2 + len(jax.tree.leaves(params))
    tol = 1e-2 if norm.dtype == jnp.bfloat16 else TOL
    assert_close(written, derived, tol=tol)


def test_hand_written_norm_backward_in_a_gpt():
    """A pre-LN GPT's loss gradients with every LayerNorm on the hand-written backward equal XLA's."""
    cfg = GPTConfig(vocab_size=11, max_len=8, num_layers=2, block=BlockConfig(d_model=16, num_heads=4, d_ff=32))
    model, tokens = GPT(cfg), jnp.asarray(np.random.default_rng(7).integers(0, 11, (2, 8)))
    params = random_params(model, tokens)
    results = []
    for on in (True, False):
        with forced(HAND_VJP=on):  # jit traces here, reading the setting
            results.append(jax.jit(lambda p: value_and_grads(lambda q: model.apply({"params": q}, tokens), p))(params))
    assert_close(*results)


def test_unrolled_layer_scan_equals_the_loop():
    rng = np.random.default_rng(2)
    x = randn(rng, 2, 6, 16)
    cfg = BlockConfig(d_model=16, num_heads=4, d_ff=32, norm_position="pre", dropout_rate=0.0)
    mask = causal_mask(6)
    rolled, unrolled = Stack(EncoderBlock, cfg, 3, unroll=1), Stack(EncoderBlock, cfg, 3, unroll=3)
    params = random_params(rolled, x, mask=mask)
    results = [value_and_grads(lambda p, a: s.apply({"params": p}, a, mask=mask), params, x) for s in (rolled, unrolled)]
    assert_close(*results)


@pytest.mark.parametrize("heads, kv_heads, rows", [(4, 4, 4), (4, 2, 3), (4, 1, 8)])
def test_causal_blocked_attention_equals_the_full_computation(heads, kv_heads, rows):
    """Causal & padding & packed-segment masks and a bias: values and gradients equal the unblocked path."""
    rng = np.random.default_rng(3)
    b, t, h = 2, 16, 8
    q, k, v = randn(rng, b, t, heads, h), randn(rng, b, t, kv_heads, h), randn(rng, b, t, kv_heads, h)
    bias = randn(rng, 1, heads, t, t)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], 1, axis=0))
    mask = and_masks(causal_mask(t), segment_mask(seg), key_padding_mask(seg != 0))
    attend = lambda q, k, v, bias: dot_product.dot_product_attention(q, k, v, mask=mask, bias=bias, causal=True)  # noqa: E731
    with forced(CAUSAL_BLOCK_ROWS=rows):
        assert tuning.causal_blocks(t) > 1
        blocked = value_and_grads(attend, q, k, v, bias)
    with forced(CAUSAL_BLOCK_ROWS=0):
        assert tuning.causal_blocks(t) == 1
        full = value_and_grads(attend, q, k, v, bias)
    assert_close(blocked, full)


def test_causal_blocks_serve_causal_self_attention_only(monkeypatch):
    """A causal GPT block takes the blocked path and gives the unblocked result; cross-attention and decoding never do."""
    calls = []
    original = dot_product._causal_blocked_attention
    monkeypatch.setattr(dot_product, "_causal_blocked_attention", lambda *a: calls.append(1) or original(*a))
    cfg = GPTConfig(vocab_size=11, max_len=16, num_layers=2, block=BlockConfig(d_model=16, num_heads=4, d_ff=32))
    model, tokens = GPT(cfg), jnp.asarray(np.random.default_rng(4).integers(0, 11, (2, 16)))
    params = random_params(model, tokens)
    run = lambda p: model.apply({"params": p}, tokens)  # noqa: E731
    with forced(CAUSAL_BLOCK_ROWS=4):
        blocked = value_and_grads(run, params)
    assert calls, "the causal GPT did not take the blocked path"
    calls.clear()
    with forced(CAUSAL_BLOCK_ROWS=0):
        full = value_and_grads(run, params)
    assert not calls
    assert_close(blocked, full)
    # Not causal, or no mask to keep within the diagonal blocks: the unblocked path.
    q = randn(np.random.default_rng(5), 1, 8, 2, 4)
    with forced(CAUSAL_BLOCK_ROWS=2):
        dot_product.dot_product_attention(q, q, q, mask=causal_mask(8))
        dot_product.dot_product_attention(q, q, q, causal=True)
        dot_product.dot_product_attention(q[:, :4], q, q, mask=causal_mask(4, 8), causal=True)  # S != T
    assert not calls


def test_the_backend_choices():
    with forced(UNROLL_LAYERS=8):
        assert tuning.scan_unroll(4) == 4 and tuning.scan_unroll(8) == 8 and tuning.scan_unroll(48) == 1
    with forced(UNROLL_LAYERS=0):
        assert tuning.scan_unroll(4) == 1
    with forced(FOLD_TO_MATMUL=False, FUSED_QKV=False):
        assert not tuning.fold_to_matmul() and not tuning.fused_qkv()
    on_cpu = jax.default_backend() == "cpu"
    assert tuning.fold_to_matmul() == on_cpu and tuning.fused_qkv() == on_cpu and tuning.conv_as_matmul() == on_cpu
    assert tuning.hand_vjp() == on_cpu
    with forced(CAUSAL_BLOCK_ROWS=64):
        # At least 64 rows a block, at most 8 blocks, and blocks that divide T.
        assert [tuning.causal_blocks(t) for t in (64, 127, 128, 200, 256, 2048, 8192)] == [1, 1, 2, 2, 4, 8, 8]
    with forced(CAUSAL_BLOCK_ROWS=0):
        assert tuning.causal_blocks(2048) == 1
    assert (tuning.causal_blocks(2048) > 1) == on_cpu


@pytest.mark.parametrize("hand_vjp", [True, False])
def test_exact_gelu_matches_jax_nn_gelu(hand_vjp):
    """Values and gradients, with the derivative written out and with XLA's."""
    x = jnp.linspace(-8.0, 8.0, 4001)
    ours, ref = ACTIVATIONS["gelu"], lambda v: jax.nn.gelu(v, approximate=False)
    grad = lambda f: jax.vmap(jax.grad(f))(x)  # noqa: E731
    with forced(HAND_VJP=hand_vjp):
        assert maxerr(ours(x), ref(x)) <= 1e-6
        assert maxerr(grad(ours), grad(ref)) <= 1e-6
        assert ("custom_vjp" in str(jax.make_jaxpr(lambda v: ours(v))(x))) == hand_vjp  # a fresh trace


def test_gpt_init_has_gpt2_statistics():
    layers, d = 4, 256
    cfg = GPTConfig().replace(vocab_size=512, max_len=128, d_model=d, num_heads=4, num_layers=layers, d_ff=4 * d,
                              scan_layers=False)  # fmt: skip
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(params)
    residual = 0.02 / math.sqrt(2 * layers)

    def check_std(a, std):
        a = np.asarray(a)
        assert abs(a.mean()) < 3 * std / math.sqrt(a.size)
        assert abs(a.std() / std - 1) < 0.03, (a.std(), std)

    check_std(params["embed"]["embedding"], 0.02)
    check_std(params["pos_embed"]["embedding"], 0.02)
    for i in range(layers):
        block = params["decoder"][f"layers_{i}"]
        attn, mlp = block["self_attention"], block["mlp"]
        for name in ("query", "key", "value"):
            check_std(attn[name]["kernel"], 0.02)
        check_std(mlp["wi"]["kernel"], 0.02)
        check_std(attn["out"]["kernel"], residual)  # written into the residual stream: scaled down
        check_std(mlp["wo"]["kernel"], residual)
        for leaf in jax.tree.leaves({k: v["bias"] for k, v in {**attn, **mlp}.items()}):
            assert not np.any(np.asarray(leaf))
        assert np.all(np.asarray(block["attention_norm"]["scale"]) == 1)
    # Weight decay reaches the matrices and embeddings only.
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    for path, decayed in flat:
        name = path[-1].key
        assert decayed == (name in ("kernel", "embedding")), (path, decayed)
    unscaled = GPT(cfg.replace(scale_residual_init=False))
    p = nn.unbox(unscaled.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    check_std(p["decoder"]["layers_0"]["mlp"]["wo"]["kernel"], 0.02)


def test_a_non_finite_step_leaves_the_whole_state_unchanged():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "copy.py:tiny"))
    c = config_lib.apply_overrides(c, ["mesh.data=1", "train.progress=none", "train.tensorboard=false"])
    trainer = Trainer(c, devices=jax.devices()[:1])
    it = trainer.dataset.iterator("train")
    state, _ = trainer.train_step(trainer.init_state(), next(it))  # Adam moments are non-zero from here on
    before = jax.tree.map(np.array, state)
    batch = next(it)
    batch["weights"] = batch["weights"] * np.float32("nan")
    after, metrics = trainer.train_step(state, batch)
    assert not bool(metrics["loss_finite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.array, after))):
        np.testing.assert_array_equal(a, b)
    # A finite step from there moves on.
    state, metrics = trainer.train_step(after, next(it))
    assert bool(metrics["loss_finite"]) and int(state.step) == 2
