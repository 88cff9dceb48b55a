"""Hugging Face checkpoint files: ``config.json`` plus ``*.safetensors`` (one file or a sharded index).

Read and written with the ``safetensors`` library in NumPy; torch is never needed.
A repo id that is not a local directory is downloaded with ``huggingface_hub``
when that optional package is installed (``pip install 'tfm-jax[hub]'``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from tfm.hub.convert import HubError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What a download fetches: the config, the weights and the tokenizer files, never the torch/TF/flax copies.
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "vocab*", "merges*"]


def resolve(path_or_repo_id: str, revision: str | None = None) -> str:
    """A local directory holding the checkpoint: ``path_or_repo_id`` itself, or its download."""
    path = os.path.expanduser(str(path_or_repo_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HubError(f"{path_or_repo_id}: not a directory (give the checkpoint's directory, with config.json)")
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"{path_or_repo_id!r} is not a local directory, and huggingface_hub is not installed to "
                       f"download it (pip install 'tfm-jax[hub]')") from None  # fmt: skip
    try:
        return huggingface_hub.snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=PATTERNS)
    except Exception as e:  # offline, unknown repo, gated model: one line that says which
        raise HubError(f"{path_or_repo_id!r}: not a local directory, and downloading it failed: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None  # fmt: skip


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise HubError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    with open(path) as f:
        return json.load(f)


def weight_files(directory: str) -> list[str]:
    """The safetensors files of the checkpoint, from the sharded index when there is one."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise HubError(f"{directory}: {INDEX} names shards that are missing: {missing[:3]}")
        return [os.path.join(directory, n) for n in names]
    if os.path.isfile(os.path.join(directory, SINGLE)):
        return [os.path.join(directory, SINGLE)]
    others = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".h5", ".msgpack"))]
    hint = f" (it has {others[0]}: re-save it with safe_serialization=True)" if others else ""
    raise HubError(f"{directory}: no {SINGLE} or {INDEX}{hint}")


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint by its Hugging Face name, as NumPy arrays (bfloat16 via ml_dtypes)."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(directory):
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def write(directory: str, config: dict[str, Any], tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 << 30) -> None:
    """Write ``config.json`` and the tensors (sharded with an index above ``max_shard_bytes``).

    Each file is written to a temporary name in ``directory`` and renamed into place,
    so an interrupted export leaves no half-written file under a final name.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make a scalar [1])
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic(directory, name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}  # fmt: skip
        _atomic(directory, INDEX, lambda tmp: _dump(index, tmp))
    _atomic(directory, "config.json", lambda tmp: _dump(config, tmp))


def _dump(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _atomic(directory: str, name: str, write_to) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to(tmp)
        os.replace(tmp, os.path.join(directory, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
