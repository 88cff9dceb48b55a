"""Knowledge distillation: the loss against its formula, no gradient into the teacher, the trainer's
teacher (a workdir, refused when it cannot teach), and the recipe through the command line."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_cli import DATA, cli, metrics, run

from tfm import config as config_lib
from tfm import distill, tasks
from tfm.models import PRESETS
from tfm.step import init_fn, make_train_step
from tfm.trainer import Trainer


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (1.0, 1.0), (0.3, 4.0)])
def test_the_loss_is_the_papers_formula(alpha, temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 5, 11)) * 3
    targets = rng.integers(0, 11, (3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    batch = {"inputs": targets, "targets": jnp.asarray(targets), "weights": jnp.asarray(weights)}
    d = distill.Distillation(teacher=None, alpha=alpha, temperature=temperature)
    sums = distill.loss_sums(d, tasks.get_task("lm"), jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), batch)
    # NumPy, from the definitions: KL(p || q) = sum p (log p - log q), p the teacher's softened softmax.
    log_p, log_q = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    soft = temperature**2 * (kl * weights).sum()
    hard = -(np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0] * weights).sum()
    np.testing.assert_allclose(float(sums["distill_sum"]), soft, rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss_sum"]), hard, rtol=1e-5)
    np.testing.assert_allclose(float(sums["objective_sum"]), alpha * soft + (1 - alpha) * hard, rtol=1e-5)
    assert soft > 0


def _setup(alpha, temperature=2.0):
    preset = PRESETS["gpt_tiny"]
    model, task = preset.model_cls(preset.config), tasks.get_task("lm")
    tokens = jax.random.randint(jax.random.key(1), (4, 9), 3, preset.config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    schedule = optax.constant_schedule(1e-2)
    tx = optax.adam(schedule)
    state = nn.unbox(init_fn(model, task, tx, batch)(jax.random.key(0)))
    teacher = nn.unbox(init_fn(model, task, tx, batch)(jax.random.key(7))).params  # another draw: a different teacher
    d = distill.Distillation(model, alpha=alpha, temperature=temperature)
    return model, task, tx, schedule, state, teacher, batch, d


@pytest.mark.usefixtures("cheap_xla_compiles")
def test_no_gradient_reaches_the_teacher_and_alpha_zero_is_plain_training():
    model, task, tx, schedule, state, teacher, batch, d = _setup(alpha=0.5)
    step = make_train_step(model, task, tx, schedule, distill=d)
    # The soft loss and the updated student are both flat in the teacher's parameters.
    for of in (lambda out: out[1]["distill_loss"], lambda out: sum(jnp.sum(x) for x in jax.tree.leaves(out[0].params))):
        grads = jax.jit(jax.grad(lambda tp: of(step(state, batch, tp))))(teacher)  # noqa: B023
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) == 0.0
    new, m = jax.jit(step)(state, batch, teacher)
    assert float(m["distill_loss"]) > 0 and int(new.step) == 1
    # alpha = 0: the same update as training without a teacher.
    _, _, _, _, _, _, _, d0 = _setup(alpha=0.0)
    a, _ = jax.jit(make_train_step(model, task, tx, schedule, distill=d0))(state, batch, teacher)
    b, _ = jax.jit(make_train_step(model, task, tx, schedule))(state, batch)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.usefixtures("cheap_xla_compiles")
def test_a_student_that_equals_its_teacher_gets_no_soft_gradient():
    """alpha = 1, teacher = the student's own parameters: KL is 0 at its minimum, so the gradient is 0."""
    model, task, tx, schedule, state, _, batch, d = _setup(alpha=1.0, temperature=3.0)
    _, m = jax.jit(make_train_step(model, task, tx, schedule, distill=d))(state, batch, state.params)
    assert abs(float(m["distill_loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-5


# The trainer's teacher ---------------------------------------------------------


def _copy_config(steps=2, **changes):
    c = config_lib.load_config("copy:tiny")
    overrides = [f"train.steps={steps}", "train.eval_steps=0", "train.progress=none", "train.tensorboard=false",
                 "mesh.data=1", *(f"{k}={v}" for k, v in changes.items())]  # fmt: skip
    return config_lib.apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    Trainer(_copy_config(**{"model.d_model": 48}), workdir, devices=jax.devices()[:1]).train()
    return workdir


def test_the_trainer_distils_from_a_workdir(teacher_dir, tmp_path):
    config = _copy_config(steps=3, **{"distill.teacher": teacher_dir, "train.log_every": 1})
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    assert trainer.distill is not None and trainer.distill.teacher.config.block.d_model == 48
    trainer.train()
    rows = [r for r in metrics(tmp_path) if "train/distill_loss" in r]
    assert len(rows) == 3 and all(r["train/distill_loss"] > 0 for r in rows)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["distill"]["teacher"] == teacher_dir


@pytest.mark.parametrize("change,message", [
    ({"distill.alpha": 1.5}, r"distill.alpha=1.5: must be a finite float32 number in \[0.0, 1.0\]"),
    ({"distill.temperature": 0.0}, r"distill.temperature=0.0: must be a finite float32 number > 0.0"),
    ({"distill.teacher": "/nonexistent/teacher"}, r"distill.teacher='/nonexistent/teacher': .*no"),
])  # fmt: skip
def test_a_teacher_that_cannot_teach_is_refused_with_its_key(change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        Trainer(_copy_config(**change), devices=jax.devices()[:1])


def test_a_teacher_with_another_vocabulary_is_refused(teacher_dir):
    config = _copy_config(**{"distill.teacher": teacher_dir, "data.vocab_size": 20})
    with pytest.raises(config_lib.ConfigError, match=r"distill.teacher=.*logits are \[1, \d+, 16\] where the student's "
                                                     r"are \[1, \d+, 20\]"):  # fmt: skip
        Trainer(config, devices=jax.devices()[:1])


@pytest.mark.slow
def test_the_recipe_distils_through_the_cli(tmp_path):
    if not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run(cli("distill_shakespeare.py:tiny_teacher", teacher, f"--config.data.data_dir={DATA}"))
    p = run(cli("distill_shakespeare.py:tiny", student, f"--config.data.data_dir={DATA}",
                f"--config.distill.teacher={teacher}"))  # fmt: skip
    rows = [r for r in metrics(student) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3, rows
    assert all(r["train/distill_loss"] > 0 for r in rows) and "done: step" in p.stdout
    assert "distilling from" in p.stderr
