"""The native CPU attention kernel computes what the XLA path computes: values and gradients.

``tfm.layers.cpu_attention`` is built from source on first use; these tests build it
(a C++ compiler is part of the test machine) and compare it with
``dot_product._xla_attention`` over masks, GQA, odd sizes and cross-attention, then
check the dispatch in ``dot_product_attention`` and a GPT and a ViT with the kernel on
and off. The build and its fallback are tested in test_cpu_kernels.py.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import maxerr, random_params, randn

from tfm.layers import cpu_attention, dot_product, tuning
from tfm.layers.blocks import BlockConfig
from tfm.layers.masks import and_masks, causal_mask, key_padding_mask
from tfm.models.gpt import GPT, GPTConfig
from tfm.models.vit import ViT, vit_tiny

TOL = 2e-5

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler to build the kernel")


@contextlib.contextmanager
def kernel(on: bool):
    saved = tuning.CPU_ATTENTION
    tuning.CPU_ATTENTION = on
    try:
        yield
    finally:
        tuning.CPU_ATTENTION = saved


def fwd_grads(f, q, k, v):
    g = randn(np.random.default_rng(99), *f(q, k, v).shape)
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2))(q, k, v)


def reference(mask, scale):
    return lambda q, k, v: dot_product._xla_attention(q, k, v, mask, None, scale, 0.0, None)[0]


def assert_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert maxerr(x, y) <= tol, maxerr(x, y)


# (B, T, S, N, K, H, mask, causal): heads of 16, 24, 32, 64 and 80; rows and keys not multiples of 8 or 16.
CASES = [
    (2, 64, 64, 4, 4, 32, "causal", True),
    (2, 64, 64, 4, 4, 32, "causal", False),
    (2, 37, 37, 4, 2, 24, "causal_padding", True),
    (3, 19, 29, 6, 3, 16, "padding", False),
    (2, 17, 17, 4, 4, 16, None, False),
    (2, 20, 33, 4, 1, 80, "dense", False),
    (1, 130, 130, 2, 2, 64, "causal", True),
    (2, 1, 40, 4, 2, 32, "padding", False),  # one query row (a decoding step; the G heads' rows as one block)
    (3, 2, 2, 4, 1, 16, "causal", True),  # two rows, MQA: four heads' rows in one block
    (13, 5, 5, 3, 3, 16, "padding", False),  # 39 tasks: taken by threads in runs of several, the last run short
]


def make_mask(kind, rng, b, t, s, n):
    if kind is None:
        return None
    if kind == "causal":
        return causal_mask(t, s)
    # At least the first key stays visible, so every row sees one (fully masked rows: the test below).
    valid = jnp.asarray(rng.random((b, s)) > 0.3).at[:, 0].set(True)
    if kind == "padding":
        return key_padding_mask(valid)
    if kind == "causal_padding":
        return and_masks(causal_mask(t, s), key_padding_mask(valid))
    return jnp.asarray(rng.random((b, n, t, s)) > 0.5).at[..., 0].set(True)  # dense [B, N, T, S]


@pytest.mark.parametrize("b, t, s, n, kv, h, mask_kind, causal", CASES)
def test_kernel_equals_the_xla_path(b, t, s, n, kv, h, mask_kind, causal):
    rng = np.random.default_rng(t * 7 + h)
    q, k, v = randn(rng, b, t, n, h), randn(rng, b, s, kv, h), randn(rng, b, s, kv, h)
    mask, scale = make_mask(mask_kind, rng, b, t, s, n), 1.0 / np.sqrt(h)
    ours = fwd_grads(lambda q, k, v: cpu_attention.cpu_attention(q, k, v, mask=mask, scale=scale, causal=causal),
                     q, k, v)  # fmt: skip
    assert_close(ours, fwd_grads(reference(mask, scale), q, k, v))


@pytest.mark.parametrize("b, t, s, n, kv, h, mask_kind, causal", [c for c in CASES if c[1] == c[2]])
def test_packed_kernel_equals_the_split_one(b, t, s, n, kv, h, mask_kind, causal):
    """Self-attention over the unsplit [B, T, (N + 2K) H] projection: the same output, bit for bit, and
    one gradient tensor holding the split kernel's dQ, dK and dV side by side (and close to the XLA path)."""
    rng = np.random.default_rng(t * 5 + h)
    qkv, mask, scale = randn(rng, b, t, (n + 2 * kv) * h), make_mask(mask_kind, rng, b, t, t, n), 1.0 / np.sqrt(h)

    def split(x):
        q, k, v = jnp.split(x, [n * h, (n + kv) * h], axis=-1)
        return q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)

    def packed(x):
        return cpu_attention.cpu_attention_packed(x, heads=n, kv_heads=kv, mask=mask, scale=scale, causal=causal)

    g = randn(rng, b, t, n, h)
    out, vjp = jax.vjp(packed, qkv)
    split_out, split_vjp = jax.vjp(lambda x: cpu_attention.cpu_attention(*split(x), mask=mask, scale=scale,
                                                                         causal=causal), qkv)  # fmt: skip
    ref_out, ref_vjp = jax.vjp(lambda x: reference(mask, scale)(*split(x)), qkv)
    np.testing.assert_array_equal(out, split_out)
    np.testing.assert_array_equal(vjp(g)[0], split_vjp(g)[0])
    assert_close((out, vjp(g)), (ref_out, ref_vjp(g)))


def test_packed_kernel_refuses_a_width_that_is_not_heads_times_head_dim():
    with pytest.raises(ValueError, match="width 50"):
        cpu_attention.cpu_attention_packed(jnp.zeros((1, 4, 50)), heads=4, kv_heads=2, mask=None, scale=1.0,
                                           causal=False)  # fmt: skip


def test_kernel_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    q, k, v = randn(rng, 3, 2, 9, 4, 16), randn(rng, 3, 2, 9, 2, 16), randn(rng, 3, 2, 9, 2, 16)
    mask = causal_mask(9)
    f = jax.jit(jax.vmap(lambda q, k, v: cpu_attention.cpu_attention(q, k, v, mask=mask, scale=0.25, causal=True)))
    g = jax.vmap(reference(mask, 0.25))
    assert_close(f(q, k, v), g(q, k, v))


def test_fully_masked_rows():
    """No key visible: the row averages all values (as the XLA path), and no gradient reaches its scores."""
    rng = np.random.default_rng(2)
    b, t, n, h = 2, 12, 2, 16
    q, k, v = randn(rng, b, t, n, h), randn(rng, b, t, n, h), randn(rng, b, t, n, h)
    mask = jnp.ones((b, 1, t, t), bool).at[0, :, 3].set(False).at[1, :, 7:].set(False)
    ours = fwd_grads(lambda q, k, v: cpu_attention.cpu_attention(q, k, v, mask=mask, scale=0.25, causal=False),
                     q, k, v)  # fmt: skip
    ref = fwd_grads(reference(mask, 0.25), q, k, v)
    assert_close(ours, ref)
    np.testing.assert_allclose(ours[0][0, 3], jnp.mean(v[0], axis=0), atol=1e-6)
    # Causal: a row with no key up to it averages the keys of its query block; rows that see a key are exact.
    pad = jnp.ones((b, t), bool).at[:, :2].set(False)  # left padding: rows 0 and 1 see nothing
    mask = and_masks(causal_mask(t), key_padding_mask(pad))
    f = lambda q, k, v: cpu_attention.cpu_attention(q, k, v, mask=mask, scale=0.25, causal=True)  # noqa: E731
    assert maxerr(f(q, k, v)[:, 2:], reference(mask, 0.25)(q, k, v)[:, 2:]) <= TOL
    assert bool(jnp.all(jnp.isfinite(f(q, k, v))))


def test_dot_product_attention_dispatch(monkeypatch):
    """Float32 without bias, dropout or weights takes the kernel (when on); anything else the XLA path, unchanged."""
    calls = []
    original = cpu_attention.cpu_attention
    monkeypatch.setattr(cpu_attention, "cpu_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    rng = np.random.default_rng(3)
    q = randn(rng, 2, 8, 4, 16)
    mask = causal_mask(8)
    attend = dot_product.dot_product_attention
    with kernel(True):
        on = attend(q, q, q, mask=mask, causal=True)
        assert len(calls) == 1
        attend(q, q, q, mask=mask, bias=randn(rng, 1, 4, 8, 8))
        attend(q, q, q, mask=mask, dropout_rate=0.1, dropout_rng=jax.random.key(0))
        attend(q, q, q, mask=mask, return_weights=True)
        attend(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), mask=mask)
        assert len(calls) == 1
    with kernel(False):
        off = attend(q, q, q, mask=mask, causal=True)
    assert len(calls) == 1
    assert maxerr(on, off) <= TOL
    # The default: on for the CPU backend with one device (the tests run on 8 virtual devices).
    assert tuning.cpu_attention() == (jax.default_backend() == "cpu" and jax.device_count() == 1)


def _gpt():
    cfg = GPTConfig(vocab_size=13, max_len=24, num_layers=2, block=BlockConfig(d_model=32, num_heads=4, d_ff=64))
    return GPT(cfg), jnp.asarray(np.random.default_rng(4).integers(0, 13, (2, 24)))


def _vit():
    model = ViT(vit_tiny.replace(num_classes=5, image_size=16, patch_size=4))
    return model, randn(np.random.default_rng(5), 2, 16, 16, 1)


@pytest.mark.parametrize("make", [_gpt, _vit], ids=["gpt", "vit"])
def test_models_with_the_kernel_equal_the_xla_path(make):
    """A causal GPT and a ViT: loss and parameter gradients agree with the kernel on and off."""
    model, inputs = make()
    params = random_params(model, inputs)
    results = []
    for on in (True, False):
        with kernel(on):
            # A new function each time: the path is picked when it is traced.
            loss = jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, inputs)))))
            results.append(loss(params))
            jaxpr = str(jax.make_jaxpr(loss)(params))
            # Self-attention reads the fused projection unsplit (the packed kernel); nothing else runs it.
            assert ("tfm_attention_cpu_packed_forward" in jaxpr) == on
            assert "tfm_attention_cpu_forward" not in jaxpr
    assert_close(*results)


def test_rope_attention_keeps_the_split_kernel():
    """RoPE rotates the query and key between the projection and the kernel: the split tensors go in."""
    from tfm.layers.attention import MultiHeadAttention

    x = randn(np.random.default_rng(6), 2, 12, 32)
    mask = causal_mask(12)
    for rope in (False, True):
        layer = MultiHeadAttention(num_heads=4, head_dim=8, use_rope=rope, causal=True)
        params = layer.init(jax.random.PRNGKey(0), x, mask=mask)
        results = []
        for on in (True, False):
            with kernel(on):
                f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x, mask=mask))), (0, 1)))
                results.append(f(params, x))
                jaxpr = str(jax.make_jaxpr(f)(params, x))
                assert ("tfm_attention_cpu_packed_forward" in jaxpr) == (on and not rope)
                assert ("tfm_attention_cpu_forward" in jaxpr) == (on and rope)
        assert_close(*results)
