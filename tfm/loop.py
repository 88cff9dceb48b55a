"""The training loop: steps, logging, evaluation and checkpoint cadence, stop signals.

``Loop(...).run(state, start, data_it)`` drives compiled steps until
``train.steps``; it owns no model code. What it guarantees:

* The metrics of step ``s`` are fetched while step ``s + 1`` runs, so the host
  never waits on the device except to log, evaluate or save.
* A non-finite loss, gradient norm or updated parameter raises ``TrainingError``
  naming the step and the metric (the step itself changed nothing; see ``tfm.step``).
* SIGTERM (preemption) or SIGINT: the step in flight finishes, a checkpoint is
  written at that step and ``run`` returns with ``preempted=True``; a second
  Ctrl-C stops at once, without the final save. With several processes
  (``jax.distributed``) a signal to any one of them reaches all: JAX's preemption
  service agrees on one step (``reached_preemption_sync_point``), every process
  saves that step and returns, so no host waits forever in a collective.
* An evaluation that fails: the state of that step is saved first, then the
  error is raised as ``TrainingError``.
* Compiling, evaluating and saving do not count as step time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np

from tfm import host_memory
from tfm import metrics as metrics_lib

if TYPE_CHECKING:
    from tfm.data.base import Dataset, IndexedIterator
    from tfm.step import TrainState


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step and metric."""


def shape_key(batch: dict) -> tuple:
    """What a compiled step depends on in a batch: each array's name, shape and dtype."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


class _Bound:
    """A compiled step with its trailing arguments bound: called as ``fn(state, batch)``."""

    def __init__(self, compiled, extra: tuple):
        self.compiled, self.extra = compiled, extra

    def __call__(self, state, batch):
        return self.compiled(state, batch, *self.extra)

    def __getattr__(self, name):  # memory_analysis(), as_text(), ...
        return getattr(self.compiled, name)


class StepCache:
    """A jitted step compiled once per batch shape (one per length bucket; usually just one).

    On the CPU backend it also keeps each compiled step's temporary buffer mapped
    between steps (``tfm.host_memory``).
    """

    def __init__(self, jitted, context: Callable, extra: tuple = ()):
        self.jitted, self.context, self.extra = jitted, context, extra  # extra: arguments after (state, batch)
        self.compiled: dict = {}

    def __contains__(self, batch: dict) -> bool:
        return shape_key(batch) in self.compiled

    def __call__(self, state: Any, batch: dict) -> jax.stages.Compiled:
        key = shape_key(batch)
        if key not in self.compiled:
            with self.context():
                fn = self.jitted.lower(state, batch, *self.extra).compile()
            host_memory.reserve_for(fn)
            self.compiled[key] = _Bound(fn, self.extra) if self.extra else fn
        return self.compiled[key]


def profile_window(text: str) -> tuple[int, int] | None:
    """``train.profile_steps="a:b"`` -> ``(a, b)``: trace the steps a..b-1 (``None`` for ""); ``ValueError`` else."""
    if not text:
        return None
    a, sep, b = str(text).partition(":")
    try:
        start, stop = int(a), int(b)
    except ValueError:
        start, stop = -1, -1
    if not sep or not 0 <= start < stop:
        raise ValueError(f"train.profile_steps={text!r}: expected 'a:b' with 0 <= a < b (trace steps a to b-1)")
    return start, stop


class Profiler:
    """A ``jax.profiler`` trace of the steps ``window = (a, b)``, ``a <= step < b``, written to ``directory``."""

    def __init__(self, window: tuple[int, int] | None, directory: str):
        self.window, self.directory, self.active = window, directory, False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0] and not self.active:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, metrics: Any) -> None:
        """``step``: the number of steps done; stops the trace once the window's last step has finished."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(metrics)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _preemption_service() -> bool:
    """True when this is one of several ``jax.distributed`` processes with JAX's preemption service."""
    from jax._src import distributed

    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


class StopSignals:
    """While entered, SIGTERM and SIGINT (main thread only) set ``received`` instead of killing the run.

    With several processes, SIGTERM is left to JAX's preemption service (it
    installs its own handler and tells every process); Ctrl-C is passed on to it
    as a SIGTERM. ``should_stop(step)``, called by every process after every
    step, then turns True on all of them at the same agreed step.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self.shared = False

    def _on_signal(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the final save
        self.received = signum
        if self.shared:
            signal.raise_signal(signal.SIGTERM)  # to the preemption service's handler

    def should_stop(self, step: int) -> bool:
        """Whether to save at ``step`` and stop: a local signal, or the step all processes agreed on."""
        if not self.shared:
            return self.received is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or signal.SIGTERM
            return True
        return False

    def __enter__(self):
        self.received = None
        self.shared = _preemption_service()
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            signals = (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT)
            self._previous = {s: signal.signal(s, self._on_signal) for s in signals}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def check_finite(step: int, m: dict) -> None:
    """Raise ``TrainingError`` if the fetched metrics of ``step`` say it was refused as non-finite."""
    if not m["loss_finite"]:
        raise TrainingError(f"step {step}: train/loss is {float(m['loss'])} (aux_loss {float(m['aux_loss'])}); "
                            f"stopped, the last checkpoint on disk is kept")  # fmt: skip
    if not m["grads_finite"]:
        raise TrainingError(f"step {step}: the gradient norm is {float(m['grad_norm'])}; stopped, "
                            f"the last checkpoint on disk is kept")  # fmt: skip
    if not m["params_finite"]:
        raise TrainingError(f"step {step}: the updated parameters are not finite (learning rate {float(m['lr']):g}); "
                            f"stopped, the step was not applied and the last checkpoint on disk is kept")  # fmt: skip


class CarriedEval:
    """``eval_step(params, batch)`` for a recurrent task (``Task.recurrent``): each batch's carry goes into the next.

    ``jitted(params, batch, carry) -> (sums, carry)``; the first call starts from ``init_carry()``.
    An evaluation reads its split from batch 0, whose ``reset`` rows drop what an earlier one left.
    """

    def __init__(self, jitted: Callable, init_carry: Callable):
        self.jitted, self.init_carry, self.carry = jitted, init_carry, None

    def __call__(self, params, batch):
        if self.carry is None:
            self.carry = self.init_carry()
        sums, self.carry = self.jitted(params, batch, self.carry)
        return sums


def evaluate(eval_step: Callable, params: Any, dataset: Dataset, place: Callable, *, steps: int,
             split: str = "validation", token_level: bool = True, context: Callable | None = None) -> dict:  # fmt: skip
    """Mean loss, accuracy (and perplexity for token-level tasks) over ``steps`` batches of ``split``.

    ``steps < 0``: the whole split, once (the dataset must be finite). ``eval_step(params, batch)``
    returns the sums of ``Task.loss_sums``; each process reads only its rows (``place.rows()``).
    """
    if steps < 0:
        if not hasattr(dataset, "num_batches"):
            raise ValueError(f"{type(dataset).__name__} has no finite {split} split; give a number of batches")
        steps = dataset.num_batches(split)
    it = dataset.iterator(split, rows=place.rows())
    totals = {"loss_sum": 0.0, "weight_sum": 0.0, "correct": 0.0}
    with context() if context else contextlib.nullcontext():
        for _ in range(steps):
            sums = jax.device_get(eval_step(params, place(next(it), local=True)))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
    if not totals["weight_sum"]:
        return {}
    loss = totals["loss_sum"] / totals["weight_sum"]
    out = {"eval/loss": loss, "eval/accuracy": totals["correct"] / totals["weight_sum"]}
    if token_level:
        out["eval/perplexity"] = float(np.exp(min(loss, 50.0)))
    return out


def _moe_scalars(m: dict) -> dict:
    """The expert load histogram (share of assignments) and the drop rate."""
    if "moe_load" not in m:
        return {}
    load = np.asarray(m["moe_load"])
    out = {"moe/drop_fraction": float(m["moe_drop_fraction"]), "moe/load_max_over_mean": float(load.max() * len(load))}
    out.update({f"moe/load/expert_{i}": float(x) for i, x in enumerate(load)})
    return out


class Loop:
    """One training run's cadence. ``flops_and_units(batch) -> (model FLOPs, units)`` per step."""

    def __init__(self, train_cfg, *, steps: StepCache, place: Callable, evaluate: Callable, flops_and_units: Callable,
                 unit: str, ckpt, writer, progress, n_devices: int, stop: StopSignals,
                 profiler: Profiler | None = None):  # fmt: skip
        self.t, self.steps, self.place, self.evaluate = train_cfg, steps, place, evaluate
        self.flops_and_units, self.unit = flops_and_units, unit
        self.ckpt, self.writer, self.progress, self.stop = ckpt, writer, progress, stop
        self.peak = (train_cfg.peak_flops or metrics_lib.peak_flops() or 0.0) * n_devices
        self.pending: tuple[int, Any] | None = None  # (step, device metrics) not fetched yet
        self.last: dict = {}
        self.compile_total = 0.0
        self.costs: dict = {}  # batch shapes -> (FLOPs, units) per step
        self.profiler = profiler or Profiler(None, "")

    def _reset_interval(self, step: int) -> None:
        self.interval = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "s0": step, "units": 0.0, "flops": 0.0}

    def _step_fn(self, state, batch: dict, step: int):
        if batch not in self.steps:
            t0 = time.perf_counter()
            self.steps(state, batch)
            compile_s = time.perf_counter() - t0
            self.interval["t0"] += compile_s  # compiling is not step time
            self.compile_total += compile_s
            self.writer.write(step, {"compile_time_s": compile_s})
            shape = next(v.shape for k, v in batch.items() if k in ("targets", "labels"))
            self.progress.message(f"compiled the train step for batch {tuple(shape)} in {compile_s:.1f} s")
        key = shape_key(batch)
        if key not in self.costs:  # also for a step compiled before the loop (``Trainer.train_step``)
            self.costs[key] = self.flops_and_units(batch)
        return self.steps(state, batch), self.costs[key]

    def _flush(self) -> None:
        """Fetch the metrics of the step in ``pending`` (blocks until it ran); check them; log."""
        if self.pending is None:
            return
        s, m = self.pending
        self.pending = None
        m = jax.device_get(m)
        check_finite(s, m)
        iv, t = self.interval, self.t
        iv["loss"] += float(m["loss"])
        iv["n"] += 1
        scalars = {"train/lr": float(m["lr"]), "train/grad_norm": float(m["grad_norm"])}
        log_now = s % t.log_every == 0 or s == t.steps
        if log_now:
            elapsed = time.perf_counter() - iv["t0"]
            scalars["train/loss"] = iv["loss"] / max(iv["n"], 1)
            scalars["train/accuracy"] = float(m["accuracy"])
            if float(m["aux_loss"]):
                scalars["train/aux_loss"] = float(m["aux_loss"])
            if "distill_loss" in m:  # the soft term against the teacher (tfm.distill)
                scalars["train/distill_loss"] = float(m["distill_loss"])
            scalars.update(_moe_scalars(m))
            if s - iv["s0"] > 0 and elapsed > 0:
                scalars["train/step_time_ms"] = 1000.0 * elapsed / (s - iv["s0"])
                scalars[f"train/{self.unit}_per_sec"] = iv["units"] / elapsed
                if self.peak:
                    scalars["train/mfu"] = iv["flops"] / elapsed / self.peak
            scalars["memory/host_peak_rss_mb"] = metrics_lib.host_peak_rss_bytes() / 2**20
            mem = metrics_lib.device_peak_bytes()
            if mem is not None:
                scalars["memory/device_peak_mb"] = mem / 2**20
            self.writer.write(s, scalars)
            self._reset_interval(s)
        else:
            scalars["train/loss"] = float(m["loss"])
        self.last = scalars
        self.progress.update(s, scalars, log_now)

    def _evaluate(self, step: int, state, data_it) -> dict:
        try:
            result = self.evaluate(state.eval_params)  # the moving average, where the run keeps one
        except Exception as e:
            # The trained state outlives a failed evaluation: save it, then report.
            self.ckpt.save(step, state, data_it.get_state())
            self.ckpt.wait()
            raise TrainingError(f"step {step}: evaluation failed ({type(e).__name__}: {e}); "
                                f"the state of step {step} is saved in {self.ckpt.directory}") from e  # fmt: skip
        self.writer.write(step, result)
        self.progress.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def run(self, state: TrainState, start: int, data_it: IndexedIterator) -> dict:
        """Train from step ``start`` to ``train.steps``; the summary of the run."""
        t = self.t
        if start >= t.steps:
            self.progress.message(f"already at step {start} of {t.steps}; nothing to do")
            return {"step": start}
        step, last_eval = start, {}
        self._reset_interval(start)
        state = host_memory.settle(state)  # a restored state may still be arriving (batches arrive placed)
        while step < t.steps:
            batch = self.place(next(data_it), local=True)
            step_fn, (flops, units) = self._step_fn(state, batch, step)
            self.profiler.before(step)
            state, metrics = step_fn(state, batch)
            self.profiler.after(step + 1, metrics)
            self.interval["units"] += units
            self.interval["flops"] += flops
            self._flush()  # the previous step's metrics; this step runs meanwhile
            step += 1
            self.pending = (step, metrics)
            stop = self.stop.should_stop(step)
            do_eval = bool(t.eval_every and step % t.eval_every == 0) or step == t.steps
            save = step % t.checkpoint_every == 0 or step == t.steps or stop
            if do_eval or save:
                self._flush()
            paused = time.perf_counter()  # evaluation and saving do not count as step time
            if do_eval and t.eval_steps != 0:
                last_eval = self._evaluate(step, state, data_it)
            if save:
                best = {t.best_metric: last_eval[t.best_metric]} if do_eval and t.best_metric in last_eval else None
                self.ckpt.save(step, state, data_it.get_state(), metrics=best)
            self.interval["t0"] += time.perf_counter() - paused
            if stop:
                self.profiler.stop()
                self.ckpt.wait()
                name = signal.Signals(self.stop.received).name
                where = f" (agreed by all {jax.process_count()} processes)" if self.stop.shared else ""
                self.progress.message(f"{name}: saved a checkpoint at step {step}{where}; exiting")
                return {"step": step, "preempted": True, **{f"final/{k}": v for k, v in self.last.items()}}
        self.profiler.stop()
        self._flush()
        self.ckpt.wait()
        return {"step": step, "train_loss": self.last.get("train/loss"), "compile_time_s": self.compile_total,
                **last_eval}  # fmt: skip


__all__ = ["Loop", "Profiler", "StepCache", "StopSignals", "TrainingError", "check_finite", "evaluate", "profile_window",
           "shape_key"]
