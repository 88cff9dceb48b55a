"""The moving average of the parameters (``optim.ema_decay``): its arithmetic, the step, and a run's evaluation,
resume, inference, export and warm start."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfm import config as config_lib
from tfm import inference, tasks, warm_start
from tfm.checkpoint import Checkpointer
from tfm.models import PRESETS
from tfm.optim import ema_decay_at, update_ema
from tfm.step import init_fn, make_train_step
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_config(*overrides):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "copy.py:tiny"))
    base = ["train.progress=none", "train.tensorboard=false", "optim.warmup_steps=1", "mesh.data=1"]
    return config_lib.apply_overrides(c, base + list(overrides))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_decay_warms_up_then_holds_and_the_update_is_the_average():
    for step, want in [(0, 0.1), (1, 2 / 11), (10, 11 / 20), (8989, 8990 / 8999), (8990, 0.999), (10**6, 0.999)]:
        assert float(ema_decay_at(step, 0.999)) == pytest.approx(want, rel=1e-6), step
    ema, params = {"w": np.full((2, 3), 1.0, np.float32)}, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    d = 0.999
    out = update_ema(ema, params, 10**6, d)
    np.testing.assert_allclose(out["w"], d * ema["w"] + (1 - d) * params["w"], rtol=1e-6)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="EMA decay must be in"):
            update_ema(ema, params, 0, bad)


@pytest.mark.usefixtures("cheap_xla_compiles")
def test_the_step_keeps_the_average_of_its_new_parameters_and_a_nan_step_changes_nothing():
    decay, preset = 0.9, PRESETS["gpt_tiny"]
    task, model = tasks.get_task(preset.task), preset.model_cls(preset.config)
    tokens = np.random.default_rng(0).integers(3, preset.config.vocab_size, (4, 9)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "weights": jnp.ones((4, 8))}
    schedule = optax.constant_schedule(3e-3)
    tx = optax.adam(schedule)
    state = nn.unbox(jax.jit(init_fn(model, task, tx, batch, ema=True))(jax.random.key(0)))
    for a, b in zip(leaves(state.params), leaves(state.ema_params)):  # it starts as the parameters
        np.testing.assert_array_equal(a, b)
    step = jax.jit(make_train_step(model, task, tx, schedule, ema_decay=decay))
    expect = leaves(state.params)
    for s in range(5):
        state, _ = step(state, batch)
        d = min(decay, (1 + s) / (10 + s))
        expect = [e + np.float32(1 - d) * (p - e) for e, p in zip(expect, leaves(state.params))]
        for e, got in zip(expect, leaves(state.ema_params)):
            np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(state.params), leaves(state.ema_params)))
    assert state.eval_params is state.ema_params

    before = leaves(state)
    after, m = step(state, {**batch, "weights": jnp.full((4, 8), jnp.nan)})
    assert not bool(m["loss_finite"])
    for a, b in zip(before, leaves(after)):  # the average too
        np.testing.assert_array_equal(a, b)

    plain = nn.unbox(jax.jit(init_fn(model, task, tx, batch))(jax.random.key(0)))
    assert plain.ema_params is None and plain.eval_params is plain.params
    with pytest.raises(ValueError, match="ema_decay=0.9 but the state has no ema_params"):
        step(plain, batch)


def test_a_run_evaluates_resumes_and_is_read_back_with_its_average(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")  # a schedule that ignores train.steps
    common = ["optim.ema_decay=0.9", "optim.schedule=constant", "train.checkpoint_every=3", "train.eval_every=6",
              "train.eval_steps=2"]
    summary = Trainer(copy_config(*common, "train.steps=6"), straight, devices=jax.devices()[:1]).train()
    Trainer(copy_config(*common, "train.steps=3"), resumed, devices=jax.devices()[:1]).train()
    again = Trainer(copy_config(*common, "train.steps=6"), resumed, devices=jax.devices()[:1]).train()
    assert again["start_step"] == 3

    def restored(workdir):
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
        try:
            return ckpt.restore(Trainer(copy_config(*common), devices=jax.devices()[:1]).abstract_state, step=6)[1]
        finally:
            ckpt.close()

    state = restored(straight)
    for a, b in zip(leaves(state), leaves(restored(resumed))):  # the average resumes exactly too
        np.testing.assert_array_equal(a, b)

    # Inference, the export and evaluation read the average; --no_ema the last parameters.
    run, last = inference.load(straight), inference.load(straight, ema=False)
    assert run.ema and not last.ema
    for a, b in zip(leaves(state.ema_params), leaves(run.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(state.params), leaves(last.params)):
        np.testing.assert_array_equal(a, b)
    assert run.evaluate(2)["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)  # what the run reported
    assert run.evaluate(2)["eval/loss"] != pytest.approx(last.evaluate(2)["eval/loss"], rel=1e-6)
    assert inference.result_record(run, {})["parameters"].startswith("moving average")
    _, saved = warm_start.read_params(straight)
    np.testing.assert_array_equal(sorted(np.concatenate([v.ravel() for v in saved.values()])),
                                  sorted(np.concatenate([x.ravel() for x in leaves(state.ema_params)])))

    # The average cannot be switched on or off inside a run: its checkpoints would not restore.
    with pytest.raises(config_lib.ConfigError, match=r"optim.ema_decay=0.9 \(this run: 0.0\)"):
        Trainer(copy_config("train.steps=8"), straight, devices=jax.devices()[:1])
    with pytest.raises(config_lib.ConfigError, match=r"optim.ema_decay"):
        Trainer(copy_config("optim.ema_decay=1.0"), devices=jax.devices()[:1])
