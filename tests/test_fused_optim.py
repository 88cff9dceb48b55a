"""The fused AdamW update computes what optax's chain and the train step's guard compute.

``tfm.fused_optim`` runs clipping, Adam/AdamW, ``apply_updates`` and the non-finite guard
as one native pass (``kernels/adamw_cpu.cc``). Compared here with
``tfm.optim.make_optimizer``'s optax chain over several steps (clipping on and off, Adam and
AdamW, schedules and constant rates, odd leaf sizes), on refused steps (the state must not
change at all), inside a train step, and as the Trainer's choice.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfm import fused_optim, tasks
from tfm.layers import cpu_kernels, tuning
from tfm.layers.blocks import BlockConfig
from tfm.models.gpt import GPT, GPTConfig
from tfm.optim import decay_mask, make_optimizer
from tfm.step import init_fn, make_train_step

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build the kernels")


def tree(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s, dtype=np.float32))
    return {"dense": {"kernel": f(37, 5), "bias": f(5)}, "embed": {"embedding": f(65, 16)}, "norm": {"scale": f(16)},
            "big": {"kernel": f(300, 250)}}  # fmt: skip


def optax_path(tx, grads, params, state):
    """The train step's update and guard, as written with optax."""
    norm = optax.tree.norm(grads)
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(norm) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), (new_params, new_state), (params, state))


def fused_path(fused, grads, params, state, ok=True):
    norm = optax.tree.norm(grads)
    new_params, new_state, _ = fused.update(grads, norm, params, state, jnp.isfinite(norm) & ok)
    return new_params, new_state


def assert_trees_close(a, b, rtol=2e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "name, lr, clip, grad_scale",
    [
        ("adamw", optax.cosine_decay_schedule(1e-2, 10), 1.0, 1.0),  # the norm is ~200: clipped
        ("adamw", optax.linear_schedule(1e-3, 1e-2, 5), 1e4, 1.0),  # not clipped
        ("adamw", 3e-3, None, 1e-3),  # constant rate, no clipping
        ("adam", optax.cosine_decay_schedule(1e-2, 10), 1.0, 1e-2),
    ],
)
def test_fused_update_equals_optax(name, lr, clip, grad_scale):
    params = tree()
    kw = {"b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.1 if name == "adamw" else 0.0, "clip_norm": clip}
    tx = make_optimizer(lr, name=name, **kw)
    fused = fused_optim.FusedAdamW(lr, kw["b1"], kw["b2"], kw["eps"], kw["weight_decay"], clip,
                                   decay_mask if name == "adamw" else None)  # fmt: skip
    state = tx.init(params)
    assert fused.supports(params, state)
    a, b = (params, state), (params, state)
    step_a = jax.jit(lambda g, p, s: optax_path(tx, g, p, s))
    step_b = jax.jit(lambda g, p, s: fused_path(fused, g, p, s))
    for i in range(4):
        grads = jax.tree.map(lambda x: x * grad_scale, tree(seed=i + 1))
        a, b = step_a(grads, *a), step_b(grads, *b)
        assert_trees_close(a, b)
    counts = lambda s: [x for x in jax.tree.leaves(s) if x.dtype == jnp.int32]
    assert [int(x) for x in counts(b[1])] == [int(x) for x in counts(a[1])] and int(counts(b[1])[0]) == 4
    assert "tfm_adamw_cpu" in str(jax.make_jaxpr(lambda g, p, s: fused_path(fused, g, p, s))(grads, *b))


def test_a_refused_step_changes_nothing():
    params = tree()
    lr = optax.cosine_decay_schedule(1e-2, 10)
    tx = make_optimizer(lr, name="adamw", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    fused = fused_optim.FusedAdamW(lr, 0.9, 0.99, 1e-8, 0.1, 1.0, decay_mask)
    state = fused_path(fused, tree(seed=1), params, tx.init(params))  # one accepted step: counts at 1, moments set
    same = lambda x, y: all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    # Non-finite gradients (the caller's `ok` is False): nothing changes, the moments included.
    grads = jax.tree.map(lambda x: x.at[0].set(jnp.nan), tree(seed=2))
    norm = optax.tree.norm(grads)
    p, s, params_ok = jax.jit(fused.update)(grads, norm, *state, jnp.isfinite(norm))
    assert same((p, s), state)
    # Finite gradients, but a rate that overflows the parameters: refused by the kernel itself.
    huge = fused_optim.FusedAdamW(jnp.inf, 0.9, 0.99, 1e-8, 0.1, 1.0, decay_mask)
    inf_state = (state[0], make_optimizer(jnp.inf, name="adamw", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                                          clip_norm=1.0).init(params))  # fmt: skip
    p, s, params_ok = huge.update(tree(seed=3), optax.tree.norm(tree(seed=3)), *inf_state, jnp.bool_(True))
    assert not bool(params_ok) and same((p, s), inf_state)
    # And an accepted one reports params_ok.
    _, _, params_ok = fused.update(tree(seed=3), optax.tree.norm(tree(seed=3)), *state, jnp.bool_(True))
    assert bool(params_ok)


def test_supports_only_what_it_computes():
    params = tree()
    fused = fused_optim.FusedAdamW(optax.constant_schedule(1e-3), 0.9, 0.99, 1e-8, 0.1, 1.0, decay_mask)
    sched = make_optimizer(optax.constant_schedule(1e-3), name="adamw", weight_decay=0.1)
    assert fused.supports(params, sched.init(params))
    assert not fused.supports(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), sched.init(params))
    assert not fused.supports(params, optax.sgd(1e-3, momentum=0.9).init(params))  # no Adam state
    assert not fused.supports(params, optax.adamw(1e-3).init(params))  # a constant rate, no schedule count
    with_ema = optax.chain(optax.ema(0.9), optax.adamw(optax.constant_schedule(1e-3)))
    assert not fused.supports(params, with_ema.init(params))  # state it would not carry over


@pytest.mark.parametrize("accum, ema", [(1, 0.0), (2, 0.9)])
def test_train_step_with_the_fused_update_equals_the_optax_one(accum, ema):
    cfg = GPTConfig(vocab_size=40, max_len=16, num_layers=2, block=BlockConfig(d_model=32, num_heads=4, d_ff=64))
    model, task = GPT(cfg), tasks.get_task("lm")
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 2, 10)
    tx = make_optimizer(schedule, name="adamw", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    fused = fused_optim.FusedAdamW(schedule, 0.9, 0.99, 1e-8, 0.1, 1.0, decay_mask)
    r = np.random.default_rng(0)
    batches = [{"inputs": r.integers(0, 40, (4, 16)), "targets": r.integers(0, 40, (4, 16))} for _ in range(4)]
    init = init_fn(model, task, tx, batches[0], rows=4, ema=ema > 0)
    results = []
    for f in (None, fused):
        step = jax.jit(make_train_step(model, task, tx, schedule, fused=f, grad_accum_steps=accum, ema_decay=ema))
        state = nn.unbox(init(jax.random.key(0)))
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        results.append((state, losses))
        assert ("tfm_adamw_cpu" in step.lower(state, batches[0]).as_text()) == (f is not None)
    (a, la), (b, lb) = results
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert int(a.step) == int(b.step) == 4
    assert_trees_close((a.params, a.opt_state, a.ema_params), (b.params, b.opt_state, b.ema_params),
                       rtol=1e-4, atol=1e-6)  # fmt: skip
    # A non-finite batch (a NaN in the parameters' path) is refused by the fused step as by the other.
    emb = b.params["embed"]["embedding"]
    bad = b.replace(params={**b.params, "embed": {**b.params["embed"], "embedding": emb.at[:].set(jnp.nan)}})
    step = jax.jit(make_train_step(model, task, tx, schedule, fused=fused, grad_accum_steps=accum, ema_decay=ema))
    after, m = step(bad, batches[0])
    assert not bool(m["loss_finite"]) and int(after.step) == 4
    for x, y in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((bad.params, bad.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_trainer_picks_it_on_one_cpu_device(monkeypatch, tmp_path):
    from tfm import config as config_lib
    from tfm.trainer import Trainer

    cfg = config_lib.apply_overrides(config_lib.load_config("configs/copy.py:tiny"),
                                     ["train.progress=none", "train.tensorboard=false"])  # fmt: skip
    monkeypatch.setattr(tuning, "FUSED_OPTIMIZER", True)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    assert trainer.fused_optimizer is not None
    if len(jax.devices()) > 1:
        assert Trainer(cfg, devices=jax.devices()[:2]).fused_optimizer is None  # a mesh of several devices
    monkeypatch.setattr(tuning, "FUSED_OPTIMIZER", False)
    assert Trainer(cfg, devices=jax.devices()[:1]).fused_optimizer is None
