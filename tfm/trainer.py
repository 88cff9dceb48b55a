"""The training loop: sharded state, one jitted step, checkpoints, evaluation, metrics.

Everything ``python -m tfm.train`` does is here so notebooks and tests run the
same code::

    trainer = Trainer(config, workdir)      # validates; builds mesh, model, optimizer, data
    summary = trainer.train()               # resumes from the workdir's latest checkpoint

The flow (see DESIGN.md): config → frozen model config → ``jax.eval_shape`` of
the initial state → shardings from the logical axis names → ``jax.jit(init,
out_shardings=...)`` so parameters and optimizer state are born sharded → one
``train_step(state, batch) -> (state, metrics)``, jitted once with explicit
in/out shardings and the state donated → orbax checkpoints.

Failure handling:

* SIGTERM (preemption) or SIGINT (Ctrl-C): the step in flight finishes, a
  checkpoint is written at that step, ``train()`` returns with
  ``preempted=True`` (the CLI exits 0).
* A non-finite loss, gradient norm or updated parameter: the step leaves the
  state unchanged (so nothing NaN can be saved) and the loop raises
  ``TrainingError`` naming the step and the metric; checkpoints already on disk
  are untouched.
* An evaluation that fails: the state of that step is saved first, then the
  error is raised as ``TrainingError``.
* A checkpoint that cannot be restored: see ``tfm.checkpoint``.
* One trainer per workdir: a second one is refused (``tfm.workdir.Lock``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tfm import config as config_lib
from tfm import data as data_lib
from tfm import host_memory
from tfm import metrics as metrics_lib
from tfm import sharding as sh
from tfm import workdir as workdir_lib
from tfm.checkpoint import Checkpointer
from tfm.models import GPT, T5, Transformer, ViT
from tfm.optim import cross_entropy, make_optimizer, noam_schedule, warmup_schedule

log = logging.getLogger("tfm")

FAMILIES = {GPT: "gpt", Transformer: "transformer", T5: "t5", ViT: "vit"}
TASKS = {"gpt": "lm", "transformer": "seq2seq", "t5": "seq2seq", "vit": "classify"}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step and metric."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step s uses fold_in(rng, s)


# Pieces that depend on the model family --------------------------------------


def model_args(family: str, batch: dict) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model's ``__call__`` for this batch."""
    if family == "gpt":
        kwargs = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
        return (batch["inputs"],), kwargs
    if family == "transformer":
        names = {"segment_ids": "src_segment_ids", "decoder_segment_ids": "tgt_segment_ids",
                 "positions": "src_positions", "decoder_positions": "tgt_positions"}  # fmt: skip
        return (batch["inputs"], batch["decoder_inputs"]), {v: batch[k] for k, v in names.items() if k in batch}
    if family == "t5":
        return (batch["inputs"], batch["decoder_inputs"]), {}
    if family == "vit":
        return (batch["inputs"],), {}
    raise ValueError(f"no training task for model family {family!r}")


def loss_sums(task: str, logits, batch, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
    """Sums over the batch (so micro-batches and devices add up): loss, weight (tokens/examples), correct."""
    if task == "classify":
        targets = batch["labels"]
        weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    else:
        targets = batch["targets"]
        weights = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    loss_sum, weight_sum = cross_entropy(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights.astype(jnp.float32))
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct}


def total_weight(task: str, batch) -> jax.Array:
    key = "labels" if task == "classify" else "targets"
    if "weights" in batch:
        return jnp.sum(batch["weights"].astype(jnp.float32))
    return jnp.asarray(batch[key].size, jnp.float32)


def make_schedule(optim_cfg, d_model: int, total_steps: int) -> optax.Schedule:
    o = optim_cfg
    if o.schedule == "noam":
        return noam_schedule(d_model, o.warmup_steps, o.noam_scale)
    # A run shorter than its warmup (a quick check of a recipe) simply ends during the warmup.
    return warmup_schedule(o.learning_rate, o.warmup_steps, max(total_steps, o.warmup_steps), o.schedule, o.end_fraction)


def _aux_loss(mutated) -> jax.Array:
    leaves = jax.tree.leaves(mutated.get("aux_loss", {}))
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def _moe_stats(mutated) -> dict:
    """Router statistics sown by MoE layers, averaged over layers: ``load [E]`` and ``drop_fraction``."""
    found: dict[str, list] = {"load": [], "drop_fraction": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(mutated.get("moe_stats", {}))[0]:
        names = [getattr(k, "key", None) for k in path]
        for name in found:
            if name in names:
                found[name].append(leaf.reshape(-1, leaf.shape[-1]) if name == "load" else leaf.reshape(-1))
    if not found["load"]:
        return {}
    return {
        "moe_load": jnp.concatenate(found["load"]).mean(0),
        "moe_drop_fraction": jnp.concatenate(found["drop_fraction"]).mean(),
    }


def _shape_key(batch: dict) -> tuple:
    """What a compiled step depends on in a batch: each array's name, shape and dtype."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _split_micro(batch: dict, n: int) -> dict:
    """``[n*b, ...] -> [n, b, ...]`` with micro-batch ``a`` = rows ``a, a+n, a+2n, ...``.

    Strided, not contiguous, so each micro-batch takes rows from every device's
    shard and the split moves no data between devices.
    """

    def split(x):
        b = x.shape[0] // n
        return jnp.swapaxes(x.reshape((b, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


class Trainer:
    """Build once from a validated config; ``train()`` runs (or resumes) the loop.

    ``devices`` (default: all) lets tests train on a subset of the fake CPU devices.
    ``workdir=None`` builds everything but writes nothing (for tests and notebooks
    that drive ``init_state`` / ``train_step`` themselves).
    """

    def __init__(self, config, workdir: str | None = None, *, devices=None, allow_model_change: bool = False):
        devices = jax.devices() if devices is None else list(devices)
        self.config = config
        self.workdir = os.path.abspath(workdir) if workdir else None
        self.preset, self.model_config, sizes, self.rules = config_lib.validate(
            config, len(devices), jax.process_count()
        )
        if self.workdir:  # before any data is prepared: a workdir that cannot be used is refused at once
            workdir_lib.check_writable(self.workdir)
            if jax.process_index() == 0:
                workdir_lib.Lock(self.workdir).check()
        self.family = FAMILIES.get(self.preset.model_cls)
        if self.family is None:
            raise config_lib.ConfigError(
                f"model.preset={config.model.preset!r}: {self.preset.model_cls.__name__} has no training task; "
                f"trainable families: {sorted(TASKS)}"
            )
        self.task = TASKS[self.family]
        try:
            self.dataset = data_lib.make_dataset(config.data.to_dict())
        except data_lib.DataError as e:
            raise config_lib.ConfigError(str(e)) from e
        self._example = {k: np.asarray(v) for k, v in self.dataset.batch("train", 0, batch_size=1).items()}
        self._check_data_fits_model()
        self.artifacts = getattr(self.dataset, "artifacts", dict)()
        self._replace_previous_run = False
        if self.workdir:
            self._check_workdir(allow_model_change)

        self.model = self.preset.model_cls(self.model_config)
        self.mesh = sh.make_mesh(sizes, devices)
        self.schedule = make_schedule(config.optim, self.model_config.d_model, config.train.steps)
        o = config.optim
        self.tx = make_optimizer(
            self.schedule, name=o.name, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
            clip_norm=o.clip_norm if o.clip_norm > 0 else None,
        )  # fmt: skip
        self.batch_sharding = NamedSharding(self.mesh, P(sh.batch_axes(self.rules)))
        self.replicated = NamedSharding(self.mesh, P())
        with self._context():
            self.abstract_state = jax.eval_shape(self._init_boxed, jax.random.key(0))
            specs = nn.get_partition_spec(self.abstract_state)
            self.state_sharding = nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)
        # Unboxed outside the mesh context: inside it, unboxing applies sharding constraints.
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.unbox(self.abstract_state),
            self.state_sharding,
        )
        self._train_step = jax.jit(
            self._step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=0,
        )
        self._compiled_steps: dict = {}  # batch shapes -> the compiled train step
        self._eval_step = jax.jit(
            self._eval, in_shardings=(self.state_sharding.params, self.batch_sharding), out_shardings=self.replicated
        )
        self._stop_signal = None

    # Validation against data and workdir -----------------------------------

    def _check_data_fits_model(self):
        ds, mc = self.dataset, self.model_config
        if ds.task != self.task:
            raise config_lib.ConfigError(
                f"data.name={self.config.data.name!r} yields {ds.task} batches but model.preset="
                f"{self.config.model.preset!r} is a {self.family} ({self.task}) model"
            )
        if self.task == "classify" and getattr(ds, "num_classes", 0) > mc.num_classes:
            raise config_lib.ConfigError(
                f"model.num_classes={mc.num_classes} is smaller than the {ds.num_classes} classes of "
                f"data.name={self.config.data.name!r}"
            )
        vocab = getattr(mc, "tgt_vocab", None) or getattr(mc, "vocab_size", None)
        if vocab is not None and getattr(ds, "vocab_size", 0) > vocab:
            raise config_lib.ConfigError(
                f"model.vocab_size={vocab} is smaller than the {ds.vocab_size} ids of data.name={self.config.data.name!r}"
            )
        # Learned position tables have max_len rows: a longer row would fail inside the first step.
        if getattr(mc, "position", "") == "learned" and hasattr(mc, "max_len"):
            length = max(v.shape[1] for k, v in self._example.items() if k in ("inputs", "decoder_inputs"))
            if length > mc.max_len:
                key = next((k for k in ("block_size", "max_len", "seq_len") if k in ds.OPTIONS), "length")
                raise config_lib.ConfigError(
                    f"data.{key}={self.config.data.get(key, length)}: rows of {length} tokens exceed "
                    f"model.max_len={mc.max_len} (the learned position table)"
                )
        if self.config.train.eval_steps == -1 and not hasattr(ds, "num_batches"):
            raise config_lib.ConfigError(
                f"train.eval_steps=-1: data.name={self.config.data.name!r} has no finite validation split; "
                f"give a number of batches"
            )

    def _check_workdir(self, allow_model_change: bool):
        saved = workdir_lib.read_config(self.workdir)
        new = json.loads(config_lib.to_json(self.config))
        why = workdir_lib.conflict(self.workdir, saved, new, self.artifacts)
        self._replace_previous_run = bool(why)
        if why and not allow_model_change:
            raise config_lib.ConfigError(
                f"workdir {self.workdir} holds a run with {why}; its checkpoints would not mean the same; "
                f"use another --workdir or pass --allow_model_change to start this run there"
            )

    # The pure functions ----------------------------------------------------

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def _init_boxed(self, key) -> TrainState:
        params_key, dropout_key = jax.random.split(key)
        args, kwargs = model_args(self.family, {k: jnp.asarray(v) for k, v in self._example.items()})
        params = self.model.init({"params": params_key}, *args, **kwargs)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(dropout_key),
        )

    def init_state(self, seed: int | None = None) -> TrainState:
        """The initial state, created directly in its shardings."""
        seed = self.config.seed if seed is None else seed
        with self._context():
            init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)), out_shardings=self.state_sharding)
            return init(jax.random.key(seed))

    def _forward(self, params, batch, *, train: bool, rng=None):
        args, kwargs = model_args(self.family, batch)
        rngs = {"dropout": rng} if train else {}
        logits, mutated = self.model.apply(
            {"params": params}, *args, **kwargs, deterministic=not train, rngs=rngs, mutable=["aux_loss", "moe_stats"]
        )
        return logits, _aux_loss(mutated), _moe_stats(mutated)

    def _step(self, state: TrainState, batch: dict):
        t = self.config.train
        n_micro = t.grad_accum_steps
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        weight = total_weight(self.task, batch)

        def objective(params, mb, key):
            logits, aux, stats = self._forward(params, mb, train=True, rng=key)
            sums = loss_sums(self.task, logits, mb, label_smoothing=t.label_smoothing, z_loss=t.z_loss)
            # Normalised by the whole batch's weight so micro-batches add up to the full-batch mean.
            return sums["loss_sum"] / weight + t.aux_loss_weight * aux / n_micro, (sums, aux, stats)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if n_micro == 1:
            (_, (sums, aux, stats)), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _split_micro(batch, n_micro)

            def body(carry, xs):
                mb, i = xs
                mb = jax.lax.with_sharding_constraint(mb, self.batch_sharding)
                (_, (s, a, st)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, s, a, st)), None

            experts = getattr(self.model_config, "num_experts", 0)
            stats0 = {"moe_load": jnp.zeros(experts), "moe_drop_fraction": 0.0} if experts else {}
            zeros = jax.tree.map(
                jnp.zeros_like, (state.params, {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}, 0.0, stats0)
            )
            (grads, sums, aux, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
            aux = aux / n_micro
            stats = jax.tree.map(lambda x: x / n_micro, stats)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = sums["loss_sum"] / sums["weight_sum"]
        loss_ok, grads_ok = jnp.isfinite(loss) & jnp.isfinite(aux), jnp.isfinite(grad_norm)
        # Finite gradients can still give non-finite parameters (an overflowing learning rate or decay).
        params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        ok = loss_ok & grads_ok & params_ok
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        # A non-finite step changes nothing, so no NaN can reach a checkpoint.
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / sums["weight_sum"],
            "aux_loss": aux,
            "grad_norm": grad_norm,
            "lr": self.schedule(state.step),
            "weight": sums["weight_sum"],
            "loss_finite": loss_ok,
            "grads_finite": grads_ok,
            "params_finite": params_ok,
            **stats,  # MoE router statistics, if the model has MoE layers
        }
        return new, metrics

    def _eval(self, params, batch: dict):
        logits, _, _ = self._forward(params, batch, train=False)
        return loss_sums(self.task, logits, batch)

    # Data placement ----------------------------------------------------------

    def _rows(self, global_batch: int) -> slice:
        """The rows of the global batch whose shards live on this process's devices."""
        idx = self.batch_sharding.addressable_devices_indices_map((global_batch,))
        starts = [s[0].start or 0 for s in idx.values()]
        stops = [global_batch if s[0].stop is None else s[0].stop for s in idx.values()]
        return slice(min(starts), max(stops))

    def place(self, batch: dict, local: bool = False) -> dict:
        """Numpy batch -> global ``jax.Array``s; this process contributes only its rows.

        ``local=False``: ``batch`` is the global batch (every process holds all of it).
        ``local=True``: ``batch`` holds only this process's rows (``self.local_rows``),
        as a dataset iterator made with ``rows=`` yields them.
        """
        out = {}
        global_rows = self.config.data.batch_size
        for k, v in batch.items():
            v = np.asarray(v)
            if local:
                out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v, (global_rows, *v.shape[1:]))
            else:
                out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v[self._rows(v.shape[0])], v.shape)
        return out

    @property
    def _unit_key(self) -> str:
        return "labels" if self.task == "classify" else "targets"

    @property
    def local_rows(self) -> slice:
        """The rows of each global batch this process reads (all of them on one process)."""
        return self._rows(self.config.data.batch_size)

    def compile_step(self, state: TrainState, batch: dict):
        """The train step compiled for the shapes of ``batch`` (placed), cached: what ``train_step`` and the loop run.

        On the CPU backend it also keeps the step's temporary buffer mapped
        between steps (``tfm.host_memory``).
        """
        key = _shape_key(batch)
        if key not in self._compiled_steps:
            with self._context():
                fn = self._train_step.lower(state, batch).compile()
            host_memory.reserve_for(fn)
            self._compiled_steps[key] = fn
        return self._compiled_steps[key]

    def train_step(self, state: TrainState, batch: dict):
        """One update on a numpy global batch -> ``(state, metrics)`` (device scalars)."""
        batch = self.place(batch)
        return self.compile_step(state, batch)(state, batch)

    def evaluate(self, params, steps: int | None = None, split: str = "validation") -> dict:
        """Mean loss (no label smoothing), accuracy and perplexity over ``steps`` batches of ``split``."""
        steps = self.config.train.eval_steps if steps is None else steps
        if steps < 0:  # the whole split, once
            if not hasattr(self.dataset, "num_batches"):
                raise ValueError(f"data.name={self.config.data.name!r} has no finite {split} split; give a step count")
            steps = self.dataset.num_batches(split)
        it = self.dataset.iterator(split, rows=self.local_rows)
        totals = {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}
        with self._context():
            for _ in range(steps):
                sums = jax.device_get(self._eval_step(params, self.place(next(it), local=True)))
                totals = {k: totals[k] + float(sums[k]) for k in totals}
        if not totals["weight_sum"]:
            return {}
        loss = totals["loss_sum"] / totals["weight_sum"]
        out = {"eval/loss": loss, "eval/accuracy": totals["correct"] / totals["weight_sum"]}
        if self.task != "classify":
            out["eval/perplexity"] = float(np.exp(min(loss, 50.0)))
        return out

    # The loop ------------------------------------------------------------------

    def _on_stop_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
        self._stop_signal = signum

    def train(self) -> dict:
        """Train to ``train.steps`` (resuming from the workdir) and return the summary.

        Holds the workdir's lock while it runs; a second trainer there gets ``ConfigError``.
        """
        if not self.workdir:
            raise ValueError("Trainer.train() needs a workdir")
        lock = workdir_lib.Lock(self.workdir)
        try:
            os.makedirs(self.workdir, exist_ok=True)
            if jax.process_index() == 0:
                lock.acquire()
        except OSError as e:
            raise config_lib.ConfigError(f"--workdir {self.workdir}: cannot be written ({e.strerror or e})") from e
        try:
            return self._train()
        finally:
            lock.release()

    def _train(self) -> dict:
        cfg, t = self.config, self.config.train
        ckpt_dir = os.path.join(self.workdir, "checkpoints")
        if jax.process_index() == 0:
            if self._replace_previous_run:
                # --allow_model_change: the other run's checkpoints and tokenizer are kept, out of the way.
                aside = workdir_lib.move_previous_run_aside(self.workdir)
                log.warning("the workdir held another run; its checkpoints are now in %s", aside)
            # Files the model needs beside its checkpoints (a tokenizer), each written whole or not at all.
            workdir_lib.write_run_files(self.workdir, config_lib.to_json(cfg), self.artifacts)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tfm_workdir_ready")
        ckpt = Checkpointer(
            ckpt_dir, keep=t.keep_checkpoints, best_metric=t.best_metric,
            best_mode=t.best_mode, async_save=t.async_checkpoint,
        )  # fmt: skip
        writer = metrics_lib.MetricWriter(self.workdir, tensorboard=t.tensorboard)
        data_it = self.dataset.iterator("train", rows=self.local_rows)  # only this process's rows are read
        restored = ckpt.restore(self.abstract_state)
        if restored is None:
            state = self.init_state()
            start = 0
        else:
            start, state, data_state = restored
            data_it.set_state(data_state)
            log.info("resumed from step %d", start)
        unit = "ex" if self.task == "classify" else "tok"
        progress = metrics_lib.Progress(t.steps, start, t.progress, unit=unit)
        if restored is not None:
            progress.message(f"resumed from {ckpt.directory}/{start}")
        self._stop_signal = None
        in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        stop_signals = (signal.SIGTERM, signal.SIGINT) if in_main_thread else ()
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in stop_signals}
        t_begin = time.perf_counter()
        summary: dict[str, Any] = {"start_step": start, "preempted": False}
        try:
            summary.update(self._loop(state, start, data_it, ckpt, writer, progress))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
            ckpt.close()
            writer.close()
        summary["wall_time_s"] = time.perf_counter() - t_begin
        summary["checkpoint"] = os.path.join(ckpt.directory, str(summary["step"]))
        return summary

    def _loop(self, state, start, data_it, ckpt, writer, progress) -> dict:
        t = self.config.train
        if start >= t.steps:
            progress.message(f"already at step {start} of {t.steps}; nothing to do")
            return {"step": start}
        peak = t.peak_flops or metrics_lib.peak_flops()
        n_devices = self.mesh.devices.size
        params_shape = nn.unbox(self.abstract_state.params)
        compiled: dict = {}  # batch shapes -> (step function, model FLOPs per step, positions per step)
        compile_total = 0.0

        def step_for(state, batch):
            """The train step compiled for this batch's shapes (one per length bucket; usually just one)."""
            nonlocal compile_total
            key = _shape_key(batch)
            if key not in compiled:
                shapes = {k: v.shape for k, v in batch.items()}
                t0 = time.perf_counter()
                fn = self.compile_step(state, batch)
                compile_s = time.perf_counter() - t0
                interval["t0"] += compile_s  # compiling is not step time
                compile_total += compile_s
                writer.write(step, {"compile_time_s": compile_s})
                progress.message(f"compiled the train step for batch {tuple(shapes[self._unit_key])} in {compile_s:.1f} s")
                flops = metrics_lib.model_flops_per_step(self.family, self.model_config, params_shape, shapes)
                compiled[key] = (fn, flops, float(np.prod(shapes[self._unit_key])))
            return compiled[key]

        step, pending, last = start, None, {}
        interval = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "s0": start, "units": 0.0, "flops": 0.0}
        last_eval: dict = {}

        def flush():
            """Fetch the metrics of the step in ``pending`` (blocks until it ran); check them; log."""
            nonlocal pending, last
            if pending is None:
                return
            s, m = pending
            pending = None
            m = jax.device_get(m)
            if not m["loss_finite"]:
                raise TrainingError(f"step {s}: train/loss is {float(m['loss'])} (aux_loss {float(m['aux_loss'])}); "
                                    f"stopped, the last checkpoint on disk is kept")  # fmt: skip
            if not m["grads_finite"]:
                raise TrainingError(f"step {s}: the gradient norm is {float(m['grad_norm'])}; stopped, "
                                    f"the last checkpoint on disk is kept")  # fmt: skip
            if not m["params_finite"]:
                raise TrainingError(f"step {s}: the updated parameters are not finite (learning rate {float(m['lr']):g}); "
                                    f"stopped, the step was not applied and the last checkpoint on disk is kept")  # fmt: skip
            interval["loss"] += float(m["loss"])
            interval["n"] += 1
            scalars = {"train/lr": float(m["lr"]), "train/grad_norm": float(m["grad_norm"])}
            log_now = s % t.log_every == 0 or s == t.steps
            if log_now:
                elapsed = time.perf_counter() - interval["t0"]
                steps_done = s - interval["s0"]
                scalars["train/loss"] = interval["loss"] / max(interval["n"], 1)
                scalars["train/accuracy"] = float(m["accuracy"])
                if float(m["aux_loss"]):
                    scalars["train/aux_loss"] = float(m["aux_loss"])
                if "moe_load" in m:  # expert load histogram (share of assignments), drop rate
                    load = np.asarray(m["moe_load"])
                    scalars["moe/drop_fraction"] = float(m["moe_drop_fraction"])
                    scalars["moe/load_max_over_mean"] = float(load.max() * len(load))
                    scalars.update({f"moe/load/expert_{i}": float(x) for i, x in enumerate(load)})
                if steps_done > 0 and elapsed > 0:
                    sps = steps_done / elapsed
                    scalars["train/step_time_ms"] = 1000.0 / sps
                    scalars[f"train/{'ex' if self.task == 'classify' else 'tok'}_per_sec"] = interval["units"] / elapsed
                    if peak:
                        scalars["train/mfu"] = interval["flops"] / elapsed / (peak * n_devices)
                mem = metrics_lib.device_peak_bytes()
                scalars["memory/host_peak_rss_mb"] = metrics_lib.host_peak_rss_bytes() / 2**20
                if mem is not None:
                    scalars["memory/device_peak_mb"] = mem / 2**20
                writer.write(s, scalars)
                interval.update(loss=0.0, n=0, t0=time.perf_counter(), s0=s, units=0.0, flops=0.0)
            else:
                scalars["train/loss"] = float(m["loss"])
            last = scalars
            progress.update(s, scalars, log_now)

        while step < t.steps:
            batch = self.place(next(data_it), local=True)
            step_fn, flops, units = step_for(state, batch)
            state, metrics = step_fn(state, batch)
            interval["units"] += units
            interval["flops"] += flops
            flush()  # the previous step's metrics; this step runs meanwhile
            step += 1
            pending = (step, metrics)
            stop = self._stop_signal is not None
            do_eval = (t.eval_every and step % t.eval_every == 0) or step == t.steps
            if do_eval or stop or step % t.checkpoint_every == 0 or step == t.steps:
                flush()
            paused = time.perf_counter()  # evaluation and saving do not count as step time
            if do_eval and t.eval_steps != 0:
                try:
                    last_eval = self.evaluate(state.params)
                except Exception as e:
                    # The trained state outlives a failed evaluation: save it, then report.
                    ckpt.save(step, state, data_it.get_state())
                    ckpt.wait()
                    raise TrainingError(f"step {step}: evaluation failed ({type(e).__name__}: {e}); "
                                        f"the state of step {step} is saved in {ckpt.directory}") from e  # fmt: skip
                writer.write(step, last_eval)
                progress.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if step % t.checkpoint_every == 0 or step == t.steps or stop:
                best = {t.best_metric: last_eval[t.best_metric]} if t.best_metric in last_eval and do_eval else None
                ckpt.save(step, state, data_it.get_state(), metrics=best)
            interval["t0"] += time.perf_counter() - paused
            if stop:
                ckpt.wait()
                progress.message(f"{signal.Signals(self._stop_signal).name}: saved a checkpoint at step {step}; exiting")
                return {"step": step, "preempted": True, **{f"final/{k}": v for k, v in last.items()}}
        flush()
        ckpt.wait()
        out = {"step": step, "train_loss": last.get("train/loss"), "compile_time_s": compile_total}
        out.update(last_eval)
        return out


def format_summary(summary: dict) -> str:
    wall = summary.get("wall_time_s", 0.0)
    parts = [f"done: step {summary['step']}", f"wall {metrics_lib._fmt_time(wall)}"]
    if summary.get("preempted"):
        parts[0] = f"preempted: step {summary['step']}"
    if summary.get("train_loss") is not None:
        parts.append(f"train loss {summary['train_loss']:.4f}")
    if summary.get("eval/loss") is not None:
        parts.append(f"eval loss {summary['eval/loss']:.4f}")
    if summary.get("eval/accuracy") is not None:
        parts.append(f"eval accuracy {summary['eval/accuracy']:.4f}")
    parts.append(f"checkpoint {summary['checkpoint']}")
    return " | ".join(parts)


__all__ = ["Trainer", "TrainState", "TrainingError", "format_summary", "loss_sums", "model_args"]
