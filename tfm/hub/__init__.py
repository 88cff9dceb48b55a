"""Hugging Face checkpoints in and out of tfm: ``from_pretrained`` and ``save_pretrained``.

    model, params = from_pretrained("path/to/gpt2")        # or a hub repo id, with huggingface_hub
    logits = model.apply({"params": params}, tokens)
    save_pretrained(model, params, "out/")                  # transformers' from_pretrained reads it

Each family's map lives in its own module (``gpt2.py``, ...) as an ``Architecture``;
``ARCHITECTURES`` lists them by the ``architectures`` name of ``config.json``.
A config option tfm does not implement is a ``HubError`` that names it, never a
silently different model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from tfm.hub import bert, clip, files, gpt2, llama, marian, t5, vit, whisper
from tfm.hub.convert import Architecture, HubError, fit, unscan

_FAMILIES = (gpt2, llama, bert, t5, vit, marian, clip, whisper)
ARCHITECTURES: dict[str, Architecture] = {name: m.ARCHITECTURE for m in _FAMILIES for name in m.ARCHITECTURE.names}


def architecture_of(hf_config: dict, source: str) -> str:
    names = hf_config.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        raise HubError(f"{source}: architecture {names or hf_config.get('model_type')!r} is not supported by tfm; "
                       f"supported: {sorted(ARCHITECTURES)}")  # fmt: skip
    return known[0]


def config_from_pretrained(path_or_repo_id: str, revision: str | None = None) -> tuple[Any, Any, str]:
    """``(module class, tfm config, architecture name)`` of a checkpoint, reading only its config.json."""
    directory = files.resolve(path_or_repo_id, revision)
    hf = files.read_config(directory)
    arch = architecture_of(hf, directory)
    cls, cfg = ARCHITECTURES[arch].to_tfm(hf, arch)
    return cls, cfg, arch


def _example_inputs(module) -> tuple:
    from tfm.models import PRESETS

    for preset in PRESETS.values():
        if preset.model_cls is type(module):
            return preset.example_inputs(module.config)
    raise HubError(f"{type(module).__name__}: no tfm preset builds this module")


def abstract_params(module) -> Any:
    """The module's parameter tree as ``ShapeDtypeStruct`` (nothing allocated)."""
    import flax.linen as nn

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *_example_inputs(module)))
    return nn.unbox(shapes["params"])


def from_pretrained(path_or_repo_id: str, *, dtype: jnp.dtype | None = None, mesh: jax.sharding.Mesh | None = None,
                    revision: str | None = None, **overrides: Any) -> tuple[Any, Any]:  # fmt: skip
    """``(model, params)`` from a Hugging Face checkpoint directory (or a hub repo id).

    ``dtype``: the parameters' dtype (default float32). ``mesh``: place the parameters on it, sharded by
    their logical axes (default: the first device). ``overrides``: tfm config fields to change that do not
    alter the parameters, e.g. ``scan_layers=False``, ``dropout_rate=0.0``, ``attention="flash"``.
    """
    from tfm import placement
    from tfm import sharding as sh

    directory = files.resolve(path_or_repo_id, revision)
    hf = files.read_config(directory)
    arch = architecture_of(hf, directory)
    family = ARCHITECTURES[arch]
    cls, cfg = family.to_tfm(hf, arch)
    if dtype is not None:
        overrides.setdefault("param_dtype", dtype)
        overrides.setdefault("dtype", dtype)
    cfg = cfg.replace(**overrides) if overrides else cfg
    module = cls(cfg)
    flat = family.to_params(files.read_tensors(directory), cfg, arch)
    tree = fit(flat, abstract_params(module), f"{directory} ({arch})")
    if mesh is None:
        device = jax.local_devices()[0]
        return module, jax.tree.map(lambda a: jax.device_put(a, device), tree)
    rules = sh.make_rules()
    init = lambda key: module.init(key, *_example_inputs(module))["params"]  # noqa: E731
    _, shardings = placement.abstract_state(init, mesh, rules)
    return module, jax.tree.map(lambda a, s: jax.device_put(a, s), tree, shardings)


def save_pretrained(module, params: Any, directory: str, *, architecture: str | None = None,
                    dtype: Any = None, max_shard_bytes: int = 5 << 30) -> str:  # fmt: skip
    """Write ``params`` of ``module`` as a Hugging Face checkpoint in ``directory``; returns the architecture.

    ``architecture``: the ``architectures`` name to write (default: the one the family claims for this
    config). ``dtype``: cast floating tensors (e.g. ``np.float16``); default: the parameters' own dtype.
    """
    cfg = module.config
    if architecture is None:
        claimed = [a for m in _FAMILIES if (a := m.ARCHITECTURE.claims(module, cfg))]
        if not claimed:
            raise HubError(f"{type(module).__name__} with this config has no Hugging Face architecture in tfm; "
                           f"export it as an orbax checkpoint (python -m tfm.export)")  # fmt: skip
        architecture = claimed[0]
    if architecture not in ARCHITECTURES:
        raise HubError(f"architecture {architecture!r} is not supported by tfm; supported: {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[architecture]
    flat = unscan(jax.device_get(params))
    tensors = family.from_params(flat, cfg, architecture)
    if dtype is not None:
        tensors = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in tensors.items()}
    hf = family.to_hf(cfg, architecture)
    hf.setdefault("dtype", str(next(iter(tensors.values())).dtype))
    files.write(os.fspath(directory), hf, tensors, max_shard_bytes=max_shard_bytes)
    return architecture


__all__ = ["ARCHITECTURES", "HubError", "abstract_params", "config_from_pretrained", "from_pretrained",
           "save_pretrained"]  # fmt: skip
