"""Start a run from another run's parameters: ``train.init_from=WORKDIR`` (fine-tuning).

The other run's newest checkpoint is read without its model: the parameter
tree comes from the checkpoint's own metadata, and only the parameters are
restored (no optimizer state). Each parameter of the new model whose path
exists there takes the saved value, which must have the same shape; the rest
keep their fresh initialisation (a new classifier head), and saved parameters
the new model lacks (a pretraining head) are left out. Both lists are logged.
The optimizer starts fresh, at step 0.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tfm.checkpoint import Checkpointer
from tfm.config import ConfigError

log = logging.getLogger("tfm")


def _paths(tree) -> dict[str, object]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_params(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
    """``(step, {path: array})``: the parameters of the newest checkpoint of the run in ``workdir``."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"train.init_from={workdir!r}: not a tfm workdir with checkpoints")
    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"train.init_from={workdir!r}: has no checkpoint yet")
        # The saved tree, from the checkpoint's own metadata: no model or config of that run is needed.
        meta = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, str(step), "state")).item_metadata
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict) or "params" not in tree:
            raise ConfigError(f"train.init_from={workdir!r}: checkpoint {step} holds no parameters")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree["params"])
        restored = ckpt.restore(abstract, step=step, params_only=True)
    finally:
        ckpt.close()
    return step, {k: np.asarray(v) for k, v in _paths(restored[1]).items()}


def merge(fresh: Any, saved: dict[str, np.ndarray], source: str) -> tuple[Any, dict[str, list[str]]]:
    """``fresh`` with every leaf whose path is in ``saved`` replaced by the saved value (same shape and dtype)."""
    fresh_paths = _paths(fresh)
    mismatched = [f"{p}: saved {saved[p].shape}, model {tuple(x.shape)}" for p, x in fresh_paths.items()
                  if p in saved and saved[p].shape != tuple(x.shape)]  # fmt: skip
    if mismatched:
        raise ConfigError(f"train.init_from={source!r}: parameter shapes differ ({'; '.join(mismatched[:3])})")
    taken = [p for p in fresh_paths if p in saved]
    if not taken:
        raise ConfigError(f"train.init_from={source!r}: no parameter path of this model is in that run")
    fresh_only = sorted(set(fresh_paths) - set(saved))
    saved_only = sorted(set(saved) - set(fresh_paths))
    log.info("init_from %s: %d parameters taken; newly initialised: %s; not used: %s", source, len(taken),
             fresh_only or "none", saved_only or "none")  # fmt: skip
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    out = []
    for path, leaf in leaves:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out.append(jax.device_put(saved[key].astype(leaf.dtype), leaf.sharding) if key in saved else leaf)
    return jax.tree_util.tree_unflatten(treedef, out), {"taken": taken, "initialised": fresh_only, "unused": saved_only}


__all__ = ["merge", "read_params"]
