"""The native CPU norms and GELU compute what the XLA paths and PyTorch compute: values and gradients.

``tfm.layers.cpu_rowwise`` is built with tfm's other CPU kernels on first use (a C++ compiler
is part of the test machine). The kernels are compared with ``norms.layer_norm`` /
``norms.rms_norm`` / ``feedforward._gelu`` and with ``torch.nn.functional``, over widths that
are and are not multiples of the vector width, then a GPT and a T5 with the kernels on and off.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import maxerr, randn, random_params

from tfm.layers import cpu_rowwise, feedforward, norms, tuning
from tfm.layers.blocks import BlockConfig
from tfm.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not cpu_rowwise.available(), reason="no C++ compiler to build the kernels")

TOL = 1e-5
# (3, 407, 24): 1,221 rows, 39 tasks of the norms, which threads take in runs of several (the last run short).
SHAPES = [(2, 12, 128), (7, 33), (3, 5, 100), (1, 16), (4, 1), (0, 24), (3, 407, 24)]


@contextlib.contextmanager
def kernels(on: bool):
    saved = tuning.CPU_ROWWISE
    tuning.CPU_ROWWISE = on
    try:
        yield
    finally:
        tuning.CPU_ROWWISE = saved


def value_and_grads(f, *args):
    rng = np.random.default_rng(7)
    y, vjp = jax.vjp(f, *args)
    return y, vjp(randn(rng, *y.shape))


def assert_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        if not y.size:
            continue
        scale = max(1.0, float(np.max(np.abs(np.asarray(y)))))
        assert maxerr(x, y) <= tol * scale, (maxerr(x, y), scale)


def residual_flags(f, *args) -> list[bool]:
    """``has_residual`` of each norm backward kernel that ``f``'s trace calls."""
    flags = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.params.get("target_name") == "tfm_norm_cpu_backward":
                flags.append(dict(eqn.params["attributes"])["has_residual"])
            for value in eqn.params.values():
                if hasattr(value, "jaxpr"):
                    walk(value.jaxpr)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return flags


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    return randn(rng, *shape, scale=3.0) + 1.0, randn(rng, d), randn(rng, d)


@pytest.mark.parametrize("shape", SHAPES)
def test_norms_equal_the_xla_path(shape):
    x, scale, bias = _inputs(shape)
    for ours, ref, args in [
        (lambda x, s, b: cpu_rowwise.layer_norm(x, s, b, 1e-5), lambda x, s, b: norms.layer_norm(x, s, b, 1e-5),
         (x, scale, bias)),
        (lambda x, s: cpu_rowwise.layer_norm(x, s, None, 1e-5), lambda x, s: norms.layer_norm(x, s, None, 1e-5),
         (x, scale)),
        (lambda x, s: cpu_rowwise.rms_norm(x, s, 1e-6), lambda x, s: norms.rms_norm(x, s, 1e-6), (x, scale)),
    ]:  # fmt: skip
        assert_close(value_and_grads(ours, *args), value_and_grads(ref, *args))


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_equals_the_xla_path(shape):
    x = _inputs(shape)[0]
    assert_close(value_and_grads(cpu_rowwise.gelu, x), value_and_grads(feedforward._gelu, x))
    # Far tails: erf saturates to exactly +-1, so GELU is x and 0 there, and its gradient 1 and ~0 (x phi(x)).
    tails = jnp.asarray([-30.0, -9.0, 9.0, 30.0])
    y, vjp = jax.vjp(cpu_rowwise.gelu, tails)
    (dx,) = vjp(jnp.ones_like(tails))
    np.testing.assert_array_equal(np.asarray(y), [0.0, 0.0, 9.0, 30.0])
    np.testing.assert_allclose(np.asarray(dx), [0, 0, 1, 1], atol=1e-12)


def test_gelu_passes_nans_and_infinities_as_the_xla_path():
    """The kernel clamps with vmaxps/vminps where it has them: a NaN stays NaN, +-inf and huge inputs go as
    XLA's path takes them (x, -0 or NaN where x * Phi(x) or its derivative is inf * 0)."""
    x = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 1e30, -1e30, 0.0, -0.0, 3.0], jnp.float32)
    y, vjp = jax.vjp(cpu_rowwise.gelu, x)
    y_ref, vjp_ref = jax.vjp(feedforward._gelu, x)
    g = jnp.ones_like(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]), rtol=1e-6, equal_nan=True)
    assert np.isnan(np.asarray(y)[0]) and np.isnan(np.asarray(vjp(g)[0])[0])


def test_norms_and_gelu_equal_pytorch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, scale, bias = _inputs((6, 20, 72), seed=3)
    g = randn(np.random.default_rng(4), *x.shape)
    tx, ts, tb = (torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in (x, scale, bias))
    for ours, theirs in [
        (lambda x, s, b: cpu_rowwise.layer_norm(x, s, b, 1e-5), lambda: F.layer_norm(tx, (72,), ts, tb, 1e-5)),
        (lambda x, s, b: cpu_rowwise.gelu(x), lambda: F.gelu(tx)),
        (lambda x, s, b: cpu_rowwise.rms_norm(x, s, 1e-6), lambda: tx * torch.rsqrt(tx.pow(2).mean(-1, True) + 1e-6) * ts),
    ]:  # fmt: skip
        y, vjp = jax.vjp(ours, x, scale, bias)
        grads = vjp(g)
        for t in (tx, ts, tb):
            t.grad = None
        ty = theirs()
        ty.backward(torch.tensor(np.asarray(g), dtype=torch.float64))
        assert_close(y, jnp.asarray(ty.detach().numpy(), jnp.float32))
        for ours_grad, t in zip(grads, (tx, ts, tb)):
            expected = np.zeros(t.shape) if t.grad is None else t.grad.numpy()
            assert_close(ours_grad, jnp.asarray(expected, jnp.float32))


def test_results_do_not_depend_on_the_call():
    """The column sums run per fixed block of rows, then over the blocks in order: the same bits every call."""
    x, scale, bias = _inputs((300, 64), seed=5)
    f = jax.jit(lambda *a: value_and_grads(lambda x, s, b: cpu_rowwise.layer_norm(x, s, b, 1e-5), *a))
    first = f(x, scale, bias)
    for _ in range(3):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(f(x, scale, bias))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_refused_by_name():
    x, scale, bias = _inputs((4, 8))
    with pytest.raises(ValueError, match="float32 inputs only; got bfloat16"):
        cpu_rowwise.layer_norm(x.astype(jnp.bfloat16), scale, bias, 1e-5)
    with pytest.raises(ValueError, match=r"a parameter of shape \(7,\) for inputs \(4, 8\); expected \(8,\)"):
        cpu_rowwise.rms_norm(x, scale[:7], 1e-6)


@pytest.mark.parametrize("shape", [(2, 12, 128), (7, 33), (0, 24)])
def test_keep_input_adds_the_input_gradient_in_the_backward(shape):
    """(x, norm(x)) with the sum's gradient added by the kernel: XLA adding the two, to float32 rounding
    (the kernel may round the last multiply and the add once, as a fused multiply-add)."""
    x, scale, bias = _inputs(shape)
    rng = np.random.default_rng(3)
    w_input, w_norm = randn(rng, *shape), randn(rng, *shape)
    for norm in (lambda x, s, **k: cpu_rowwise.layer_norm(x, s, bias, 1e-5, **k),
                 lambda x, s, **k: cpu_rowwise.rms_norm(x, s, 1e-6, **k)):  # fmt: skip

        def kept(x, s, norm=norm):
            x_out, y = norm(x, s, keep_input=True)
            return jnp.sum(w_input * jnp.tanh(x_out) + w_norm * y)

        def separate(x, s, norm=norm):
            return jnp.sum(w_input * jnp.tanh(x) + w_norm * norm(x, s))

        kept_result, separate_result = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, scale) for f in (kept, separate))
        assert_close(kept_result, separate_result, tol=1e-6)
        assert residual_flags(jax.grad(kept), x, scale) == [True]
        assert residual_flags(jax.grad(separate), x, scale) == [False]


def test_the_norm_modules_hand_their_input_back():
    """``keep_input``: (x, norm(x)), kernel or not; the kernel's backward then adds x's gradient; bfloat16 as given."""
    x = randn(np.random.default_rng(9), 2, 6, 32)
    for norm_kind in ("layernorm", "rmsnorm"):
        module = norms.make_norm(norm_kind, 1e-5)
        params = module.init(jax.random.key(0), x)
        for on in (True, False):
            with kernels(on):
                x_out, y = module.apply(params, x, keep_input=True)
                np.testing.assert_array_equal(x_out, x)
                assert_close(y, module.apply(params, x))
                grad = jax.grad(lambda x: jnp.sum(jnp.sin(sum(module.apply(params, x, keep_input=True)))))
                assert residual_flags(grad, x) == ([True] if on else [])
                x16 = x.astype(jnp.bfloat16)
                x_out, _ = module.apply(params, x16, keep_input=True)
                assert x_out is x16  # a bfloat16 stream is never widened


def test_the_modules_pick_the_kernels_only_when_on():
    x = randn(np.random.default_rng(8), 2, 5, 16)
    for module in (norms.LayerNorm(), norms.RMSNorm()):
        params = module.init(jax.random.key(0), x)
        results = []
        for on in (True, False):
            with kernels(on):
                f = jax.jit(jax.value_and_grad(lambda p, x, m=module: jnp.sum(jnp.sin(m.apply(p, x))), (0, 1)))
                results.append(f(params, x))
                assert ("tfm_norm_cpu_forward" in str(jax.make_jaxpr(f)(params, x))) == on
        assert_close(*results)
    with kernels(True):  # GELU: float32 takes the kernel, bfloat16 keeps XLA's path
        assert "tfm_gelu_cpu_forward" in str(jax.make_jaxpr(feedforward.gelu)(x))
        assert "tfm_gelu_cpu_forward" not in str(jax.make_jaxpr(feedforward.gelu)(x.astype(jnp.bfloat16)))
    # The default: on for the CPU backend with one device (the tests run on 8 virtual devices).
    assert tuning.cpu_rowwise() == (jax.default_backend() == "cpu" and jax.device_count() == 1)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_gpt_with_the_kernels_equals_the_xla_path(position):
    block = BlockConfig(d_model=32, num_heads=4, d_ff=64, activation="gelu", norm_position=position)
    cfg = GPTConfig(vocab_size=13, max_len=24, num_layers=2, block=block)
    model, tokens = GPT(cfg), jnp.asarray(np.random.default_rng(4).integers(0, 13, (2, 24)))
    params = random_params(model, tokens)
    results = []
    for on in (True, False):
        with kernels(on):
            loss = jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, tokens)))))
            results.append(loss(params))
            jaxpr = str(jax.make_jaxpr(loss)(params))
            assert ("tfm_norm_cpu_backward" in jaxpr) == on and ("tfm_gelu_cpu_backward" in jaxpr) == on
            # Pre-LN: the block's two norms (traced once for the scanned layers) add their residual sum's
            # gradient; the final norm has none. Post-LN: a norm follows the sum and has nothing to add.
            expected = ([False, True, True] if position == "pre" else [False, False]) if on else []
            assert sorted(residual_flags(loss, params)) == expected
    assert_close(*results, tol=2e-5)
