"""Checkpoints with orbax: the train state and the data iterator position, saved together.

Each step directory holds two items: ``state`` (parameters, optimizer state,
step and RNG key, as sharded arrays) and ``data`` (the iterator's JSON state).
Saves are asynchronous; orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints
untouched. Kept: the latest ``keep`` and, if a metric is named, the best one.

Restoring walks the steps from the newest: a checkpoint that fails to restore
(truncated, corrupt) is reported and the previous one is tried; once an older
one restores, the damaged newer ones are moved aside into ``<directory>/../corrupt/``
(kept for inspection, never deleted). If none restores, nothing is moved and
the error says so. ``directory`` may be a cloud URI (``gs://...``): orbax and
TensorStore write it directly (``tfm.storage``).
Restoring onto a different mesh works: the target shardings come from the
caller's abstract state.

Readers (``read_only=True``: evaluation, generation, export) never write, move
or delete anything, so they can watch a live run: orbax's clean-up of
unfinished temporary directories, which would delete the save a trainer has
in flight, runs only in the trainer's own manager. A step that a live trainer
deletes (``keep``) while a reader restores it is retried from the then newest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tfm import storage

log = logging.getLogger("tfm")


class CheckpointError(RuntimeError):
    """No checkpoint in the directory can be restored; the message names the steps and the first error."""


def _brief(e: Exception, limit: int = 160) -> str:
    """``Type: first line of the message`` (orbax errors can run to pages)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
    """The train state and the data iterator's state of each saved step, in ``directory`` (orbax).

    Keeps the latest ``keep`` steps and, with ``best_metric``, the best one (``best_mode`` ``"min"`` or ``"max"``).
    ``read_only=True``: a reader that never writes, moves or deletes anything, safe beside a live trainer.
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        best_metric: str = "",
        best_mode: str = "min",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = storage.resolve(directory, "checkpoint directory")
        self.read_only = read_only
        if read_only and not storage.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints: {self.directory} does not exist")
        policies = [pp.LatestN(n=keep)]
        if best_metric:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",  # sorted ascending by default; the kept tail is the best
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # Only the writer may clean up: a reader's clean-up would delete the writer's save in flight.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:
            absl_log.setLevel(logging.ERROR)  # orbax announces "directory is read only" as a warning
        try:
            self.manager = self._retry_while_live(
                lambda: ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
            )
        finally:
            absl_log.setLevel(level)

    def _retry_while_live(self, fn, attempts: int = 5):
        """``fn()``; a reader retries when a live trainer deletes a step while it is being listed.

        orbax reads each step's metadata when it lists the steps: a step deleted between its
        ``exists()`` and ``is_dir()`` raises ``NotADirectoryError``, one deleted before ``open``
        ``FileNotFoundError``.
        """
        for attempt in range(attempts):
            try:
                return fn()
            except (FileNotFoundError, NotADirectoryError):
                if not self.read_only or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, metrics: dict | None = None) -> bool:
        """Start saving ``state`` at ``step`` (asynchronous); False if this step is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(
        self, abstract_state: Any, step: int | None = None, *, params_only: bool = False, part: str = "params"
    ) -> tuple[int, Any, dict] | None:
        """Restore the newest good checkpoint (or ``step``) -> ``(step, state, data_state)``, or None if none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the
        target shardings (``sharding=``), so a checkpoint saved on one mesh lands
        on another. Raises ``CheckpointError`` when checkpoints exist but none restores.

        ``params_only=True``: ``abstract_state`` is the parameters alone and only
        they are read (no optimizer state); their dtypes may differ from the saved
        ones (a float32 run restored in bfloat16). Returns ``(step, params, data_state)``.
        ``part="ema_params"``: their moving average instead (a run with ``optim.ema_decay``).
        """
        for _ in range(5):  # a live trainer may delete the step a reader picked; then look again
            steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
            failed: list[tuple[int, Exception]] = []
            vanished = False
            for s in steps:
                try:
                    restored = self._restore_step(s, abstract_state, params_only, part)
                except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                    if self.read_only and not storage.isdir(storage.join(self.directory, str(s))):
                        if step is not None:
                            raise CheckpointError(f"checkpoint {self.directory}/{s} was deleted while being read") from e
                        vanished = True  # deleted under us by the run's keep policy, not damaged
                        break
                    if step is not None:
                        raise CheckpointError(f"checkpoint {self.directory}/{s} cannot be restored: {_brief(e)}") from e
                    failed.append((s, e))
                    continue
                if failed:
                    for bad, err in failed:
                        log.warning("checkpoint at step %d cannot be restored (%s); using step %d", bad, _brief(err), s)
                # An older checkpoint restored, so the newer ones are damaged, not the target:
                # move them aside, or the run would later refuse to save over their step numbers.
                if not self.read_only:
                    for bad, _ in failed:
                        self._move_aside(bad)
                return s, restored["state"], restored["data"]
            if vanished:
                self._retry_while_live(self.manager.reload)
                continue
            if failed:
                first, err = failed[0]
                raise CheckpointError(
                    f"none of the checkpoints {[f for f, _ in failed]} in {self.directory} can be restored "
                    f"(nothing was moved or deleted); step {first}: {_brief(err)}"
                ) from err
            return None
        raise CheckpointError(f"{self.directory}: checkpoints kept disappearing while being read")

    def _restore_step(self, s: int, abstract_state, params_only: bool = False, part: str = "params"):
        if params_only:
            item = {part: abstract_state}
            state = ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
            )
        else:
            state = ocp.args.StandardRestore(abstract_state)
        restored = self.manager.restore(s, args=ocp.args.Composite(state=state, data=ocp.args.JsonRestore()))
        if params_only:
            return {"state": restored["state"][part], "data": restored["data"]}
        return restored

    def _move_aside(self, step: int) -> None:
        src = storage.join(self.directory, str(step))
        if jax.process_index() == 0 and storage.isdir(src):
            dest_root = storage.join(storage.parent(self.directory), "corrupt")
            storage.makedirs(dest_root)
            dest = storage.join(dest_root, f"{step}-{int(time.time())}")
            storage.move(src, dest)
            log.warning("moved the damaged checkpoint to %s", dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tfm_move_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
