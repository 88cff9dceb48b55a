"""Start a run from trained parameters (fine-tuning): ``train.init_from=[workdir:]DIR`` or ``hf:DIR``.

``hf:DIR`` (a Hugging Face checkpoint directory, or a hub repo id with
``huggingface_hub``) reads the checkpoint through ``tfm.hub``; its model must
compute the same function as the recipe's (``check_same_model`` names each
field that differs, e.g. the activation), and its tensors take the place of the
recipe's parameters by path and shape, as below.

``workdir:DIR`` (or a bare ``DIR``): the other run's newest checkpoint is read without its model: the parameter
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

from tfm import storage
from tfm.checkpoint import Checkpointer
from tfm.config import ConfigError

log = logging.getLogger("tfm")


# Fields that change what a model computes; the others (dropout, dtypes, scan, remat, the attention
# kernel, initialisation) may differ between a checkpoint and the recipe that fine-tunes it.
FUNCTION_FIELDS = (
    "activation", "norm", "norm_epsilon", "norm_position", "position", "rope_base", "tie_embeddings",
    "attention_scale", "num_heads", "num_kv_heads", "head_dim", "attention_bias", "mlp_bias", "num_experts",
    "experts_per_token", "moe_every", "type_vocab_size", "relative_attention_num_buckets",
    "relative_attention_max_distance", "pooling", "patch_size",
)  # fmt: skip


def parse(source: str) -> tuple[str, str]:
    """``("hf" | "workdir", path)`` of a ``train.init_from`` value."""
    kind, sep, rest = source.partition(":")
    if sep and kind in ("hf", "workdir"):
        return kind, rest
    return "workdir", source


def check(source: str) -> None:
    """Refuse at start-up a ``train.init_from`` that names nothing usable."""
    kind, path = parse(source)
    if kind == "workdir" and not storage.isdir(storage.join(storage.resolve(path, "train.init_from"), "checkpoints")):
        raise ConfigError(f"train.init_from={source!r}: not a tfm workdir with checkpoints")
    if kind == "hf" and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"train.init_from={source!r}: no config.json there (not a Hugging Face checkpoint)")


def with_checkpoint_tokenizer(config):
    """``data.tokenizer='hf'`` without a ``data.tokenizer_path`` reads the ``hf:`` checkpoint's own tokenizer."""
    kind, path = parse(config.train.init_from)
    if kind != "hf" or config.data.get("tokenizer") != "hf" or config.data.get("tokenizer_path"):
        return config
    from tfm import hub

    try:
        directory = hub.files.resolve(path)
    except hub.HubError as e:
        raise ConfigError(f"train.init_from={config.train.init_from!r}: {e}") from None
    config = config.copy_and_resolve_references()
    config.data.tokenizer_path = directory
    return config


def check_same_model(theirs, ours, source: str) -> None:
    """``ConfigError`` naming each function-defining field where the checkpoint's config differs from the recipe's."""
    if type(theirs) is not type(ours):
        raise ConfigError(f"train.init_from={source!r}: the checkpoint is a {type(theirs).__name__}, "
                          f"the recipe's model a {type(ours).__name__}")  # fmt: skip
    names = [n for n in FUNCTION_FIELDS if n in theirs.field_names() and n in ours.field_names()]
    diff = [f"model.{n}={theirs.get(n)!r}" for n in names if theirs.get(n) != ours.get(n)]
    if diff:
        raise ConfigError(f"train.init_from={source!r}: the checkpoint's model differs from the recipe's; "
                          f"set {', '.join(diff)}")  # fmt: skip


def read_hf_params(source: str, model_config, fresh: Any) -> tuple[str, dict[str, np.ndarray]]:
    """``(architecture, {path: array})``: a Hugging Face checkpoint's tensors in the layout of ``fresh``."""
    from tfm import hub
    from tfm.hub import convert, files

    _, path = parse(source)
    try:
        directory = files.resolve(path)
        hf = files.read_config(directory)
        arch = hub.architecture_of(hf, directory)
        family = hub.ARCHITECTURES[arch]
        _, theirs = family.to_tfm(hf, arch)
        check_same_model(theirs, model_config, source)
        flat = family.to_params(files.read_tensors(directory), theirs, arch)
    except hub.HubError as e:
        raise ConfigError(f"train.init_from={source!r}: {e}") from None
    found, _, bad, unused = convert.relayout(flat, fresh)
    if bad:
        raise ConfigError(f"train.init_from={source!r}: parameter shapes differ ({'; '.join(bad[:3])})")
    for key in unused:  # logged by ``merge`` as not used (a pretraining head the recipe lacks)
        found.setdefault(key, flat[key])
    return arch, found


def _paths(tree) -> dict[str, object]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_params(source: str) -> tuple[int, dict[str, np.ndarray]]:
    """``(step, {path: array})``: the parameters of the newest checkpoint of the run in ``source``
    (their moving average where the run keeps one, as evaluation uses)."""
    workdir = storage.resolve(parse(source)[1], "train.init_from")
    directory = storage.join(workdir, "checkpoints")
    if not storage.isdir(directory):
        raise ConfigError(f"train.init_from={workdir!r}: not a tfm workdir with checkpoints")
    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"train.init_from={workdir!r}: has no checkpoint yet")
        # The saved tree, from the checkpoint's own metadata: no model or config of that run is needed.
        meta = ocp.PyTreeCheckpointer().metadata(storage.join(directory, str(step), "state")).item_metadata
        tree = getattr(meta, "tree", meta)
        if not isinstance(tree, dict) or "params" not in tree:
            raise ConfigError(f"train.init_from={workdir!r}: checkpoint {step} holds no parameters")
        part = "ema_params" if isinstance(tree.get("ema_params"), dict) else "params"  # the average, where kept
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree[part])
        restored = ckpt.restore(abstract, step=step, params_only=True, part=part)
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


__all__ = ["check", "check_same_model", "merge", "parse", "read_hf_params", "read_params", "with_checkpoint_tokenizer"]
