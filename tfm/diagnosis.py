"""What a run will cost before it runs: the start-up banner and the compiled step's memory (``--dry_run``)."""

from __future__ import annotations

import collections

import jax
import numpy as np

from tfm.models.common import active_params


def banner(trainer) -> str:  # a tfm.trainer.Trainer (not imported: the trainer imports this module)
    """One line at start-up: devices, mesh, parameters (total and active), units and FLOPs per step."""
    devices = trainer.mesh.devices.flat
    kinds = collections.Counter(getattr(d, "device_kind", "") or d.platform for d in devices)
    mesh = " x ".join(f"{a} {n}" for a, n in trainer.mesh.shape.items())
    params = trainer.abstract_state.params
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    active = active_params(params, trainer.model_config)
    batch = {k: np.asarray(v) for k, v in trainer.dataset.batch("train", 0).items()}
    flops, units = trainer.flops_and_units(batch)  # the global batch, whatever its micro-batching
    line = (f"{trainer.mesh.devices.size} device(s) ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
            f"{jax.process_count()} process(es); mesh {mesh}; {type(trainer.model).__name__} "
            f"({trainer.config.model.preset}) with {total:,} parameters")  # fmt: skip
    if active != total:
        line += f" ({active:,} active per token)"
    return line + f"; {units:,.0f} {trainer.task.unit} and {flops / 1e9:,.2f} GFLOP per step"


def memory_report(trainer) -> dict[str, int]:
    """Per-device bytes of the compiled train step (XLA's ``memory_analysis``), compiled from shapes
    only: nothing is allocated, no data beyond one example batch is read, nothing is written."""
    batch = {k: np.asarray(v) for k, v in trainer.dataset.batch("train", 0).items()}
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding) for k, v in batch.items()}
    with trainer._context():
        compiled = trainer._train_step.lower(trainer.abstract_state, abstract_batch).compile()
    m = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")  # fmt: skip
    report = {n.removesuffix("_size_in_bytes"): int(getattr(m, n, 0) or 0) for n in names}
    # Donated state: outputs alias the arguments, so they are counted once.
    report["peak"] = report["argument"] + report["output"] - report["alias"] + report["temp"]
    # The training state's share of it: each array's shard on one device (parameters + optimizer state).
    report["state"] = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                          for x in jax.tree.leaves(trainer.abstract_state))  # fmt: skip
    return report


__all__ = ["banner", "memory_report"]
