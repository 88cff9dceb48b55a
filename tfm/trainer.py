"""The trainer: wiring from a run config to a sharded, resumable training run.

Everything ``python -m tfm.train`` does goes through here, so notebooks and
tests run the same code::

    trainer = Trainer(config, workdir)      # validates; builds mesh, model, optimizer, data
    summary = trainer.train()               # resumes from the workdir's latest checkpoint

The flow (see ARCHITECTURE.md): config → preset and task (``tfm.tasks``) → model →
abstract state and shardings (``tfm.placement``) → the pure step
(``tfm.step``), jitted with explicit in/out shardings and the state donated →
the loop (``tfm.loop``) → orbax checkpoints (``tfm.checkpoint``) and workdir files
(``tfm.workdir``). This module only connects them.

Failure handling: a non-finite step, a stop signal and a failed evaluation are
the loop's (``tfm.loop``); a checkpoint that cannot be restored is
``tfm.checkpoint``'s; one trainer per workdir (``tfm.workdir.Lock``): a second
one is refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tfm import config as config_lib
from tfm import data as data_lib
from tfm import diagnosis, fused_optim, placement, storage, warm_start
from tfm import loop as loop_lib
from tfm import metrics as metrics_lib
from tfm import sharding as sh
from tfm import tasks as tasks_lib
from tfm import teacher as teacher_lib
from tfm import workdir as workdir_lib
from tfm.checkpoint import Checkpointer
from tfm.loop import CarriedEval, Loop, Profiler, StepCache, StopSignals, TrainingError
from tfm.models import PRESETS
from tfm.optim import make_optimizer, make_schedule
from tfm.step import TrainState, make_eval_step, make_train_step
from tfm.step import init_fn as make_init_fn

if TYPE_CHECKING:
    from ml_collections import ConfigDict

    from tfm.data.base import Dataset
    from tfm.models import Preset
    from tfm.models.common import ModelConfig
    from tfm.tasks import Task

log = logging.getLogger("tfm")


# Model fields whose value is the data's when a recipe leaves them out: (model field, dataset attribute).
FROM_DATA = (("vocab_size", "vocab_size"), ("num_classes", "num_classes"), ("num_labels", "num_classes"))


def fill_from_data(config: ConfigDict, preset: Preset, dataset: Dataset) -> ConfigDict:
    """``config`` with ``model.vocab_size`` (``num_classes``, ``num_labels``) set to the data's where
    the recipe leaves it out, so a recipe states each once; the returned copy is what the workdir records."""
    fill = {field: getattr(dataset, attr) for field, attr in FROM_DATA
            if field not in config.model and field in preset.config.field_names() and hasattr(dataset, attr)}  # fmt: skip
    if not fill:
        return config
    config = config_lib.ConfigDict(config.to_dict())
    with config.model.ignore_type():
        config.model.update({k: int(v) for k, v in fill.items()})
    return config


def check_data_fits_model(config: ConfigDict, task: Task, dataset: Dataset, mc: ModelConfig, example: dict) -> None:
    """``ConfigError`` where the data cannot feed the model: task, classes, vocabulary, positions, eval split."""
    name, preset = config.data.name, config.model.preset
    if dataset.task != task.name:
        raise config_lib.ConfigError(
            f"data.name={name!r} yields {dataset.task} batches but model.preset={preset!r} is a "
            f"{type(mc).__name__.removesuffix('Config')} ({task.name}) model"
        )
    key = "num_classes" if hasattr(mc, "num_classes") else "num_labels"
    if task.target_key == "labels" and getattr(dataset, "num_classes", 0) > getattr(mc, key, 0):
        raise config_lib.ConfigError(
            f"model.{key}={getattr(mc, key, 0)} is smaller than the {dataset.num_classes} classes of data.name={name!r}"
        )
    vocab = getattr(mc, "tgt_vocab", None) or getattr(mc, "vocab_size", None)
    if vocab is not None and getattr(dataset, "vocab_size", 0) > vocab:
        raise config_lib.ConfigError(
            f"model.vocab_size={vocab} is smaller than the {dataset.vocab_size} ids of data.name={name!r}"
        )
    if hasattr(mc, "eot_id") and getattr(dataset, "eot_id", mc.eot_id) != mc.eot_id:
        raise config_lib.ConfigError(f"model.eot_id={mc.eot_id}: data.name={name!r} ends each caption with id "
                                     f"{dataset.eot_id}, where the text tower reads its feature")  # fmt: skip
    # Learned position tables have max_len rows: a longer row would fail inside the first step.
    if getattr(mc, "position", "") == "learned" and hasattr(mc, "max_len"):
        length = max(v.shape[1] for k, v in example.items() if k in ("inputs", "decoder_inputs"))
        if length > mc.max_len:
            key = next((k for k in ("block_size", "max_len", "seq_len") if k in dataset.OPTIONS), "length")
            raise config_lib.ConfigError(
                f"data.{key}={config.data.get(key, length)}: rows of {length} tokens exceed "
                f"model.max_len={mc.max_len} (the learned position table)"
            )
    if not task.splittable and config.train.grad_accum_steps > 1:
        raise config_lib.ConfigError(f"train.grad_accum_steps={config.train.grad_accum_steps}: the {task.name} task "
                                     f"{task.whole_batch_reason} and cannot split a batch")  # fmt: skip
    if config.train.eval_steps == -1 and not hasattr(dataset, "num_batches"):
        raise config_lib.ConfigError(
            f"train.eval_steps=-1: data.name={name!r} has no finite validation split; give a number of batches"
        )


class Trainer:
    """Build once from a validated config; ``train()`` runs (or resumes) the loop.

    ``devices`` (default: all) lets tests train on a subset of the fake CPU devices.
    ``workdir=None`` builds everything but writes nothing (for tests and notebooks
    that drive ``init_state`` / ``train_step`` themselves).
    """

    def __init__(self, config, workdir: str | None = None, *, devices=None, allow_model_change: bool = False):
        devices = jax.devices() if devices is None else list(devices)
        self.config = config
        self.workdir = storage.resolve(workdir, "--workdir") if workdir else None
        self.preset, self.model_config, sizes, self.rules = config_lib.validate(config, len(devices), jax.process_count())
        if self.workdir:  # before any data is prepared: a workdir that cannot be used is refused at once
            workdir_lib.check_writable(self.workdir)
            if jax.process_index() == 0:
                workdir_lib.Lock(self.workdir).check()
        if self.preset.task is None:
            trainable = sorted(n for n, p in PRESETS.items() if p.task)
            raise config_lib.ConfigError(
                f"model.preset={config.model.preset!r}: {self.preset.model_cls.__name__} has no training task; "
                f"trainable presets: {trainable}"
            )
        self.task = tasks_lib.get_task(self.preset.task)
        if config.train.init_from:
            warm_start.check(config.train.init_from)
            config = warm_start.with_checkpoint_tokenizer(config)
        try:
            self.dataset = data_lib.make_dataset(config.data.to_dict())
        except data_lib.DataError as e:
            raise config_lib.ConfigError(str(e)) from e
        self.config = config = fill_from_data(config, self.preset, self.dataset)
        self.preset, self.model_config = config_lib.model_config(config)
        example = {k: np.asarray(v) for k, v in self.dataset.batch("train", 0, batch_size=1).items()}
        check_data_fits_model(config, self.task, self.dataset, self.model_config, example)
        self.artifacts = getattr(self.dataset, "artifacts", dict)()
        self._replace_previous_run = bool(self.workdir) and self._check_workdir(allow_model_change)

        self.model = self.preset.model_cls(self.model_config)
        self.mesh = sh.make_mesh(sizes, devices)
        o, t = config.optim, config.train
        self.schedule = make_schedule(o, self.model_config.block.d_model, t.steps)
        opt = {"name": o.name, "b1": o.b1, "b2": o.b2, "eps": o.eps, "weight_decay": o.weight_decay,
               "clip_norm": o.clip_norm if o.clip_norm > 0 else None}  # fmt: skip
        self.tx = make_optimizer(self.schedule, **opt)
        self.fused_optimizer = fused_optim.for_optimizer(self.schedule, devices=self.mesh.size, **opt)
        self.place = placement.BatchPlacer(self.mesh, self.rules, config.data.batch_size)
        self.batch_sharding, replicated = self.place.sharding, NamedSharding(self.mesh, P())
        self._init = make_init_fn(self.model, self.task, self.tx, example, rows=config.data.batch_size,
                                  ema=o.ema_decay > 0)  # fmt: skip
        self.abstract_state, self.state_sharding = placement.abstract_state(self._init, self.mesh, self.rules)
        self.distill, teacher = None, ()
        if config.get("distill", {}).get("teacher"):  # the teacher's parameters are the step's third argument
            self.distill, params = teacher_lib.load_teacher(
                config, self.task, self.model, self.abstract_state.params, example, self.mesh, self.artifacts)
            teacher = (params,)
        step = make_train_step(
            self.model, self.task, self.tx, self.schedule, grad_accum_steps=t.grad_accum_steps,
            label_smoothing=t.label_smoothing, z_loss=t.z_loss, aux_loss_weight=t.aux_loss_weight,
            batch_sharding=self.batch_sharding, distill=self.distill, ema_decay=o.ema_decay,
            fused=self.fused_optimizer,
        )  # fmt: skip
        self._train_step = jax.jit(
            step,
            in_shardings=(self.state_sharding, self.batch_sharding, *(jax.tree.map(lambda x: x.sharding, teacher))),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=0,
        )
        self.compiled_steps = StepCache(self._train_step, self._context, teacher)
        eval_step, params_sharding = make_eval_step(self.model, self.task), self.state_sharding.params
        if self.task.recurrent:  # the memory goes from each validation batch to the next
            carry = self.state_sharding.carry
            init_carry = jax.jit(lambda: nn.unbox(self.task.init_carry(self.model_config, config.data.batch_size)),
                                 out_shardings=carry)  # fmt: skip
            self._eval_step = CarriedEval(jax.jit(eval_step, in_shardings=(params_sharding, self.batch_sharding, carry),
                                                  out_shardings=(replicated, carry)), init_carry)  # fmt: skip
        else:
            self._eval_step = jax.jit(eval_step, in_shardings=(params_sharding, self.batch_sharding),
                                      out_shardings=replicated)  # fmt: skip

    def _check_workdir(self, allow_model_change: bool) -> bool:
        """True when the workdir holds another run that this one may replace (``--allow_model_change``)."""
        saved = workdir_lib.read_config(self.workdir)
        why = workdir_lib.conflict(self.workdir, saved, json.loads(config_lib.to_json(self.config)), self.artifacts)
        if why and not allow_model_change:
            raise config_lib.ConfigError(
                f"workdir {self.workdir} holds a run with {why}; its checkpoints would not mean the same; "
                f"use another --workdir or pass --allow_model_change to start this run there"
            )
        return bool(why)

    def _context(self):
        return placement.mesh_context(self.mesh, self.rules)

    @property
    def local_rows(self) -> slice:
        """The rows of each global batch this process reads (all of them on one process)."""
        return self.place.rows()

    def init_state(self, seed: int | None = None) -> TrainState:
        """The initial state, created directly in its shardings."""
        return placement.init_state(self._init, self.state_sharding, self.mesh, self.rules,
                                    self.config.seed if seed is None else seed)  # fmt: skip

    def initial_state(self) -> TrainState:
        """Step 0: the fresh initial state, with ``train.init_from``'s parameters where it names a run."""
        state = self.init_state()
        source = self.config.train.init_from
        if not source:
            return state
        if warm_start.parse(source)[0] == "hf":
            origin, saved = warm_start.read_hf_params(source, self.model_config, state.params)
        else:
            step, saved = warm_start.read_params(source)
            origin = f"step {step}"
        params, _ = warm_start.merge(state.params, saved, source)
        log.info("parameters from %s (%s); a fresh optimizer", source, origin)
        return state.replace(params=params)

    def compile_step(self, state: TrainState, batch: dict) -> jax.stages.Compiled:
        """The train step compiled for the shapes of ``batch`` (placed), cached: what ``train_step`` and the loop run."""
        return self.compiled_steps(state, batch)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One update on a numpy global batch -> ``(state, metrics)`` (device scalars)."""
        batch = self.place(batch)
        return self.compile_step(state, batch)(state, batch)

    def evaluate(self, params: Any, steps: int | None = None, split: str = "validation") -> dict:
        """Mean loss (no label smoothing), accuracy and perplexity over ``steps`` batches of ``split``."""
        steps = self.config.train.eval_steps if steps is None else steps
        return loop_lib.evaluate(self._eval_step, params, self.dataset, self.place, steps=steps, split=split,
                                 token_level=self.task.token_level, context=self._context)  # fmt: skip

    def flops_and_units(self, batch: dict) -> tuple[float, float]:
        """Model FLOPs and tokens (or examples) of one step on batches of these shapes."""
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        params = self.abstract_state.params
        return self.task.flops_per_step(self.model_config, params, shapes), self.task.units(shapes)

    def train(self) -> dict:
        """Train to ``train.steps`` (resuming from the workdir) and return the summary.

        Holds the workdir's lock while it runs; a second trainer there gets ``ConfigError``.
        """
        if not self.workdir:
            raise ValueError("Trainer.train() needs a workdir")
        lock = workdir_lib.Lock(self.workdir)
        try:
            storage.makedirs(self.workdir)
            if jax.process_index() == 0:
                lock.acquire()
        except OSError as e:
            raise config_lib.ConfigError(f"--workdir {self.workdir}: cannot be written ({e.strerror or e})") from e
        try:
            return self._train()
        finally:
            lock.release()

    def _train(self) -> dict:
        t = self.config.train
        workdir_lib.prepare_run(self.workdir, config_lib.to_json(self.config), self.artifacts, self._replace_previous_run)
        ckpt = Checkpointer(storage.join(self.workdir, "checkpoints"), keep=t.keep_checkpoints,
                            best_metric=t.best_metric, best_mode=t.best_mode, async_save=t.async_checkpoint)  # fmt: skip
        writer = metrics_lib.MetricWriter(self.workdir, tensorboard=t.tensorboard, wandb_project=t.wandb_project,
                                          run_config=self.config.to_dict())  # fmt: skip
        data_it = self.dataset.iterator("train", rows=self.local_rows)  # only this process's rows are read
        restored = ckpt.restore(self.abstract_state)
        if restored is None:
            start, state = 0, self.initial_state()
        else:
            start, state, data_state = restored
            data_it.set_state(data_state)
            log.info("resumed from step %d", start)
        progress = metrics_lib.Progress(t.steps, start, t.progress, unit=self.task.unit)
        if jax.process_index() == 0:
            progress.message(diagnosis.banner(self))
        if restored is not None:
            progress.message(f"resumed from {ckpt.directory}/{start}")
        t_begin = time.perf_counter()
        summary: dict = {"start_step": start, "preempted": False}
        # The profiler writes local files; a cloud workdir gets a copy when the run ends.
        remote = storage.is_remote(self.workdir)
        profile_dir = tempfile.mkdtemp(prefix="tfm-profile-") if remote else storage.join(self.workdir, "profile")
        try:
            with StopSignals() as stop:
                loop = Loop(t, steps=self.compiled_steps, place=self.place, evaluate=self.evaluate,
                            flops_and_units=self.flops_and_units, unit=self.task.unit, ckpt=ckpt, writer=writer,
                            progress=progress, n_devices=self.mesh.devices.size, stop=stop,
                            profiler=Profiler(loop_lib.profile_window(t.profile_steps), profile_dir))  # fmt: skip
                summary.update(loop.run(state, start, data_it))
        finally:
            progress.close()
            ckpt.close()
            writer.close()
            if remote and os.listdir(profile_dir):
                storage.upload_tree(profile_dir, storage.join(self.workdir, "profile"))
        summary["wall_time_s"] = time.perf_counter() - t_begin
        summary["checkpoint"] = storage.join(ckpt.directory, str(summary["step"]))
        return summary


def format_summary(summary: dict) -> str:
    """The one line ``tfm.train`` prints when it ends."""
    parts = [f"done: step {summary['step']}", f"wall {metrics_lib._fmt_time(summary.get('wall_time_s', 0.0))}"]
    if summary.get("preempted"):
        parts[0] = f"preempted: step {summary['step']}"
    for key, label in (("train_loss", "train loss"), ("eval/loss", "eval loss"), ("eval/accuracy", "eval accuracy")):
        if summary.get(key) is not None:
            parts.append(f"{label} {summary[key]:.4f}")
    parts.append(f"checkpoint {summary['checkpoint']}")
    return " | ".join(parts)


__all__ = ["Trainer", "TrainState", "TrainingError", "check_data_fits_model", "format_summary"]
