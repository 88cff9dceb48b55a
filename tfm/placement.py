"""Where arrays live on the mesh: the sharded train state and the placed batches.

* ``abstract_state(init, mesh, rules)``: ``jax.eval_shape`` of the initial state,
  with each array's sharding derived from its logical axis names (DESIGN.md,
  "Sharding"); nothing is allocated.
* ``init_state(init, shardings, ...)``: the state created directly in those
  shardings (``jax.jit(init, out_shardings=...)``), never whole on one device.
* ``BatchPlacer``: numpy batches to global ``jax.Array``s sharded over the batch
  axes; on several processes each contributes only the rows of its devices. Where
  CPU computations run on the calling thread it returns a batch once it has
  arrived, so that no step is queued for a worker thread (``tfm.host_memory``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tfm import host_memory
from tfm import sharding as sh


def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, object]]) -> contextlib.ExitStack:
    """The mesh and the logical-axis rules, both active: what tracing a sharded model needs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def abstract_state(init: Callable, mesh: Mesh, rules: Sequence[tuple[str, object]]) -> tuple[Any, Any]:
    """``(abstract, shardings)``: the state ``init(key)`` returns as ``ShapeDtypeStruct``s carrying
    their shardings, and the shardings alone (a pytree like the state)."""
    with mesh_context(mesh, rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    # Unboxed outside the mesh context: inside it, unboxing applies sharding constraints.
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def init_state(init: Callable, shardings: Any, mesh: Mesh, rules: Sequence[tuple[str, object]], seed: int) -> Any:
    """The initial state for ``seed``, each array born in its sharding."""
    with mesh_context(mesh, rules):
        return jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(jax.random.key(seed))


class BatchPlacer:
    """Numpy batches of ``global_rows`` rows -> global arrays sharded over the mesh's batch axes."""

    def __init__(self, mesh: Mesh, rules, global_rows: int):
        self.sharding = NamedSharding(mesh, P(sh.batch_axes(rules)))
        self.global_rows = global_rows
        self.wait = host_memory.runs_inline()  # a step whose batch is still being copied would not run inline

    def rows(self, global_batch: int | None = None) -> slice:
        """The rows of the global batch whose shards live on this process's devices."""
        n = self.global_rows if global_batch is None else global_batch
        idx = self.sharding.addressable_devices_indices_map((n,))
        starts = [s[0].start or 0 for s in idx.values()]
        stops = [n if s[0].stop is None else s[0].stop for s in idx.values()]
        return slice(min(starts), max(stops))

    def __call__(self, batch: dict, local: bool = False) -> dict:
        """``local=False``: ``batch`` is the global batch (every process holds all of it).
        ``local=True``: it holds only this process's rows (``rows()``), as an iterator made with ``rows=`` yields."""
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if local:
                shape = (self.global_rows, *v.shape[1:])
                out[k] = jax.make_array_from_process_local_data(self.sharding, v, shape)
            else:
                out[k] = jax.make_array_from_process_local_data(self.sharding, v[self.rows(v.shape[0])], v.shape)
        return jax.block_until_ready(out) if self.wait else out


__all__ = ["BatchPlacer", "abstract_state", "init_state", "mesh_context"]
