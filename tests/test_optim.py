"""Schedules (the paper's formula), optimizer masks and clipping, the smoothed token loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfm.models import GPT, gpt_tiny
from tfm.optim import (
    PAPER_ADAM,
    cross_entropy,
    decay_mask,
    make_optimizer,
    noam_schedule,
    token_cross_entropy,
    warmup_schedule,
)


def test_noam_schedule_matches_paper_formula():
    d, w = 512, 4000
    sched = noam_schedule(d, w)
    for step in [1, 2, 10, 100, 1000, 3999, 4000, 4001, 10_000, 100_000]:
        expected = d**-0.5 * min(step**-0.5, step * w**-1.5)
        # optax count c is paper step c + 1.
        assert float(sched(step - 1)) == pytest.approx(expected, rel=1e-6), step


def test_noam_schedule_peaks_at_warmup():
    d, w = 512, 4000
    sched = noam_schedule(d, w, scale=2.0)
    lrs = np.asarray([sched(c) for c in range(0, 2 * w, 7)] + [sched(w - 1)])
    assert float(sched(w - 1)) == pytest.approx(2.0 * (d * w) ** -0.5, rel=1e-6)
    assert lrs.max() == pytest.approx(float(sched(w - 1)), rel=1e-6)
    assert float(sched(w - 2)) < float(sched(w - 1)) > float(sched(w))
    with pytest.raises(ValueError):
        noam_schedule(512, 0)


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant"])
def test_warmup_schedules(decay):
    sched = warmup_schedule(1e-3, 10, 110, decay, end_fraction=0.1)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4, rel=1e-6)
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-6)
    end = float(sched(110))
    expected = {"cosine": 1e-4, "linear": 1e-4, "rsqrt": 1e-3 * np.sqrt(10 / 110), "constant": 1e-3}[decay]
    assert end == pytest.approx(expected, rel=1e-5)
    if decay == "cosine":
        assert float(sched(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # halfway
    with pytest.raises(ValueError):
        warmup_schedule(1e-3, 10, 110, "exp")


def test_decay_mask_excludes_norms_and_biases_even_when_scanned():
    params = jax.eval_shape(lambda: GPT(gpt_tiny).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
    mask = decay_mask(nn.unbox(params))
    layers = mask["decoder"]["layers"]
    assert layers["mlp"]["wi"]["kernel"] is True and layers["mlp"]["wi"]["bias"] is False
    assert layers["attention_norm"]["scale"] is False and mask["decoder"]["final_norm"]["bias"] is False
    assert mask["embed"]["embedding"] is True


def test_adamw_decays_only_masked_params_and_clips():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    opt = make_optimizer(0.1, weight_decay=0.5, clip_norm=None)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))
    # Clipping happens before Adam: with a large first gradient (clipped) and a small
    # second one (not clipped), the second update equals that of chain(clip, adam)
    # and differs from unclipped Adam's.
    grads = [jax.tree.map(lambda p: jnp.full_like(p, 1e3), params), jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)]

    def run(opt):
        state, out = opt.init(params), None
        for g in grads:
            out, state = opt.update(g, state, params)
        return out

    ours = run(make_optimizer(0.1, name="adam", clip_norm=1.0))
    ref = run(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1, **PAPER_ADAM)))
    unclipped = run(optax.adam(0.1, **PAPER_ADAM))
    np.testing.assert_allclose(ours["dense"]["kernel"], ref["dense"]["kernel"], rtol=1e-6)
    assert not np.allclose(ours["dense"]["kernel"], unclipped["dense"]["kernel"], rtol=1e-3)
    with pytest.raises(ValueError):
        make_optimizer(0.1, name="adam", weight_decay=0.1)
    assert PAPER_ADAM == {"b1": 0.9, "b2": 0.98, "eps": 1e-9}


def test_cross_entropy_matches_torch_with_label_smoothing_and_padding():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    weights = np.ones((2, 5), np.float32)
    weights[1, 3:] = 0  # padding
    loss_sum, w = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), label_smoothing=0.1)
    t_targets = torch.tensor(np.where(weights > 0, targets, -100))
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)(
        torch.tensor(logits).reshape(-1, 11), t_targets.reshape(-1)
    )
    assert float(w) == 8.0
    assert abs(float(loss_sum / w) - float(ref)) <= 1e-5


def test_cross_entropy_z_loss_and_errors():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    targets = jnp.array([0])
    base, _ = cross_entropy(logits, targets)
    with_z, _ = cross_entropy(logits, targets, z_loss=1e-2)
    lse = float(jax.nn.logsumexp(logits))
    assert float(base) == pytest.approx(lse - 2.0, rel=1e-6)
    assert float(with_z - base) == pytest.approx(1e-2 * lse**2, rel=1e-5)
    with pytest.raises(ValueError):
        cross_entropy(logits, jnp.array([[0]]))
    with pytest.raises(ValueError):
        cross_entropy(logits, targets, label_smoothing=1.0)


@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 0.0), (0.1, 1e-3)])
def test_cross_entropy_and_its_gradient_equal_the_one_hot_form(smoothing, z):
    """The loss never builds one-hot labels; value and gradient are those of the materialised form."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 7, 50)).astype(np.float32) * 4)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)))
    weights = jnp.asarray((rng.random((3, 7)) > 0.2).astype(np.float32))

    def one_hot_form(z_):
        labels = optax.smooth_labels(jax.nn.one_hot(targets, 50), smoothing)
        loss = optax.softmax_cross_entropy(z_, labels) + z * jnp.square(jax.nn.logsumexp(z_, axis=-1))
        return jnp.sum(loss * weights)

    ours = lambda z_: cross_entropy(z_, targets, weights, label_smoothing=smoothing, z_loss=z)[0]  # noqa: E731
    np.testing.assert_allclose(float(ours(logits)), float(one_hot_form(logits)), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(one_hot_form)(logits), rtol=1e-5, atol=1e-7)


def test_token_hits_are_argmax_hits_without_an_argmax():
    """``hit`` (target logit == the softmax's max) equals argmax == target; -inf logits keep the loss finite."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 9, 30)).astype(np.float32)
    targets = rng.integers(0, 30, (4, 9))
    targets[0, :5] = np.argmax(logits[0, :5], -1)  # some certain hits
    logits[1, :, 7] = -np.inf  # a masked vocabulary entry
    targets[1] = np.where(targets[1] == 7, 8, targets[1])
    loss, hit = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.0)
    np.testing.assert_array_equal(np.asarray(hit), np.argmax(logits, -1) == targets)
    assert np.asarray(hit).sum() >= 5
    assert np.all(np.isfinite(np.asarray(loss)))
    expected = -np.take_along_axis(np.asarray(jax.nn.log_softmax(jnp.asarray(logits))), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6, atol=1e-6)
    tie = jnp.asarray([[1.0, 3.0, 3.0]])
    assert bool(token_cross_entropy(tie, jnp.asarray([2]))[1][0])  # a tie for the maximum counts as a hit
