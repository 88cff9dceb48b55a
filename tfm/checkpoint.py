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
the error says so.
Restoring onto a different mesh works: the target shardings come from the
caller's abstract state.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("tfm")


class Checkpointer:
    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        best_metric: str = "",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(directory)
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
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None) -> bool:
        """Start saving ``state`` at ``step`` (asynchronous); False if this step is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """Restore the newest good checkpoint (or ``step``) -> ``(step, state, data_state)``, or None if none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the
        target shardings (``sharding=``), so a checkpoint saved on one mesh lands
        on another.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, Exception]] = []
        for s in steps:
            try:
                restored = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
                if step is not None:
                    raise
                log.warning("checkpoint at step %d cannot be restored (%s: %s); trying the previous one",
                            s, type(e).__name__, e)  # fmt: skip
                failed.append((s, e))
                continue
            # An older checkpoint restored, so the newer ones are damaged, not the target:
            # move them aside, or the run would later refuse to save over their step numbers.
            for bad, _ in failed:
                self._move_aside(bad)
            return s, restored["state"], restored["data"]
        if failed:
            first, err = failed[0]
            raise RuntimeError(
                f"none of the checkpoints {[f for f, _ in failed]} in {self.directory} can be restored; "
                f"nothing was moved or deleted. The newest failed with {type(err).__name__}: {err}"
            ) from err
        return None

    def _move_aside(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.isdir(src):
            dest_root = os.path.join(os.path.dirname(self.directory), "corrupt")
            os.makedirs(dest_root, exist_ok=True)
            dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
            shutil.move(src, dest)
            log.warning("moved the damaged checkpoint to %s", dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tfm_move_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
