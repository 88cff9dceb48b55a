"""The pieces every family's checkpoint map shares.

A family module (``gpt2.py``, ``llama.py``, ...) defines an ``Architecture``:
the Hugging Face ``architectures`` names it reads, how a Hugging Face
``config.json`` becomes a tfm config (refusing every option tfm does not
implement, by name), and how the tensors map to tfm parameters and back.

The maps speak of tfm parameters in their *unscanned* layout, one path per
layer (``decoder/layers_3/mlp/wo/kernel``). ``fit`` turns that into the tree the
model wants, stacking the layers on the leading axis of a scanned stack
(``decoder/layers/...``, ``[L, ...]``, and ``layers/block_j`` groups with
``moe_every > 1``); ``unscan`` is its inverse. Both check every path and shape,
so a map that forgets or invents a parameter fails loudly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Flat = dict[str, np.ndarray]


class HubError(ValueError):
    """A checkpoint or config that tfm cannot read or write exactly; the message names the option."""


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


_SCANNED = re.compile(r"^(.*)/layers/(block_(\d+)/)?(.*)$")


def fit(flat: Flat, abstract: Any, source: str) -> dict[str, np.ndarray]:
    """The unscanned ``flat`` parameters in the layout of ``abstract`` (the model's parameter tree).

    Raises ``HubError`` listing missing or unused tensors and shape mismatches.
    """
    out, missing, bad, unused = relayout(flat, abstract)
    if missing or bad or unused:
        raise HubError(f"{source}: the parameters do not fit the model: "
                       + "; ".join(s for s in (_list("missing", missing), _list("shape", bad), _list("unused", unused)) if s))  # fmt: skip
    return unflatten(out)


def relayout(flat: Flat, abstract: Any) -> tuple[Flat, list[str], list[str], list[str]]:
    """``(found, missing, shape mismatches, unused)``: the unscanned ``flat`` parameters that ``abstract``
    has, by ``abstract``'s paths (layers stacked where its stacks are scanned), and what does not fit."""
    want = flatten(abstract)
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    missing, bad = [], []
    for path, leaf in want.items():
        shape = tuple(leaf.shape)
        m = _SCANNED.match(path)
        if path in flat:
            parts, keys = [flat[path]], [path]
            value = flat[path]
        elif m:
            prefix, _, j, rest = m.groups()
            steps, k, j = shape[0], _group_size(want, m.group(1)), int(j or 0)
            keys = [f"{prefix}/layers_{s * k + j}/{rest}" for s in range(steps)]
            parts = [flat.get(key) for key in keys]
            if any(p is None for p in parts):
                missing.append(path)
                continue
            value = np.stack(parts)
        else:
            missing.append(path)
            continue
        if tuple(value.shape) != shape:
            bad.append(f"{path}: checkpoint {tuple(value.shape)}, model {shape}")
            continue
        used.update(keys)
        out[path] = value.astype(leaf.dtype) if hasattr(leaf, "dtype") else value
    return out, missing, bad, sorted(set(flat) - used)


def unscan(params: Any) -> Flat:
    """``params`` (scanned or not) with one path per layer: the inverse of ``fit``."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    out: Flat = {}
    for path, value in flat.items():
        m = _SCANNED.match(path)
        if not m:
            out[path] = value
            continue
        prefix, _, j, rest = m.groups()
        k, j = _group_size(flat, prefix), int(j or 0)
        for s in range(value.shape[0]):
            out[f"{prefix}/layers_{s * k + j}/{rest}"] = value[s]
    return out


def _group_size(flat: dict[str, Any], prefix: str) -> int:
    """Blocks per scan step of the stack at ``prefix`` (``moe_every``; 1 without groups)."""
    groups = {m.group(3) for p in flat if (m := _SCANNED.match(p)) and m.group(1) == prefix and m.group(3)}
    return len(groups) or 1


def _list(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
    return f"{what}: {', '.join(items[:4])}{more}"


# ---- tensor layouts ------------------------------------------------------------------------------
# torch nn.Linear stores weight [out, in]; GPT-2's Conv1D stores [in, out]; tfm's Einsum kernels are
# [in, out] with heads split out: query/key/value [D, N, H], out [N, H, D].


def heads_in(w_in_out: np.ndarray, num_heads: int) -> np.ndarray:
    """``[D, N*H] -> [D, N, H]`` (a query/key/value kernel)."""
    d, nh = w_in_out.shape
    return w_in_out.reshape(d, num_heads, nh // num_heads)


def heads_out(w_in_out: np.ndarray, num_heads: int) -> np.ndarray:
    """``[N*H, D] -> [N, H, D]`` (an attention output kernel)."""
    nh, d = w_in_out.shape
    return w_in_out.reshape(num_heads, nh // num_heads, d)


# torch layers with one nn.Linear per projection (BART's naming, which Marian, CLIP and Whisper share):
# ``self_attn.{q,k,v,out}_proj``, a LayerNorm per sub-layer and the FFN's two linears.
PROJECTIONS = (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out"))


def layer_to_tfm(get, h: str, o: str, n: int, names: tuple, key_bias: bool = True) -> Flat:
    """One such layer under prefix ``h`` -> tfm's under ``o``. ``names``: (torch sub-layer, tfm sub-layer)
    pairs, told apart by the tfm name: ``*attention`` (q/k/v/out projections; the key's bias only with
    ``key_bias``), ``*norm`` (weight = scale) or a linear layer (weight = kernel^T)."""
    out: Flat = {}
    for hf_name, tfm_name in names:
        if tfm_name.endswith("attention"):
            for hp, tp in PROJECTIONS:
                w = get(h + f"{hf_name}.{hp}.weight").T
                out[o + f"{tfm_name}/{tp}/kernel"] = heads_out(w, n) if tp == "out" else heads_in(w, n)
                if tp != "key" or key_bias:
                    b = get(h + f"{hf_name}.{hp}.bias")
                    out[o + f"{tfm_name}/{tp}/bias"] = b if tp == "out" else b.reshape(n, -1)
        else:
            norm = tfm_name.endswith("norm")
            w = get(h + f"{hf_name}.weight")
            out[o + tfm_name + ("/scale" if norm else "/kernel")] = w if norm else w.T
            out[o + f"{tfm_name}/bias"] = get(h + f"{hf_name}.bias")
    return out


def layer_from_tfm(p: Flat, h: str, o: str, d: int, names: tuple, key_bias: bool = True) -> Flat:
    """The inverse of ``layer_to_tfm``: tfm's layer under ``o`` -> torch tensors under ``h``."""
    out: Flat = {}
    for hf_name, tfm_name in names:
        if tfm_name.endswith("attention"):
            for hp, tp in PROJECTIONS:
                w = p[o + f"{tfm_name}/{tp}/kernel"]
                out[h + f"{hf_name}.{hp}.weight"] = (w.reshape(-1, d) if tp == "out" else w.reshape(d, -1)).T
                if tp != "key" or key_bias:
                    out[h + f"{hf_name}.{hp}.bias"] = p[o + f"{tfm_name}/{tp}/bias"].reshape(-1)
        else:
            norm = tfm_name.endswith("norm")
            w = p[o + tfm_name + ("/scale" if norm else "/kernel")]
            out[h + f"{hf_name}.weight"] = w if norm else w.T
            out[h + f"{hf_name}.bias"] = p[o + f"{tfm_name}/bias"]
    return out


def take(tensors: Flat, name: str, source: str) -> np.ndarray:
    if name not in tensors:
        raise HubError(f"{source}: the checkpoint has no tensor {name!r}")
    return tensors.pop(name)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One Hugging Face model family as tfm reads and writes it.

    * ``names``: the ``architectures`` entries of ``config.json`` it reads.
    * ``to_tfm(hf_config, arch) -> (module, config)``: the tfm model; raises ``HubError`` naming any option tfm lacks.
    * ``to_params(tensors, config, arch) -> Flat``: Hugging Face tensors -> unscanned tfm parameters.
    * ``from_params(flat, config, arch) -> tensors``: the inverse.
    * ``to_hf(config, arch) -> dict``: the ``config.json`` ``transformers`` loads.
    * ``claims(module, config) -> arch | None``: the architecture name tfm exports a model as, if this family has it.
    """

    names: tuple[str, ...]
    to_tfm: Callable[[dict, str], tuple[Any, Any]]
    to_params: Callable[[Flat, Any, str], Flat]
    from_params: Callable[[Flat, Any, str], Flat]
    to_hf: Callable[[Any, str], dict]
    claims: Callable[[Any, Any], str | None]


def refuse(hf: dict, source: str, **allowed: Any) -> None:
    """``HubError`` for the first option of ``hf`` whose value is not one ``allowed`` (a value or a tuple)."""
    for key, ok in allowed.items():
        value = hf.get(key)
        values = ok if isinstance(ok, tuple) else (ok,)
        if key in hf and value not in values:
            raise HubError(f"{source}: {key}={value!r} is not implemented in tfm (supported: {values})")


__all__ = ["PROJECTIONS", "Architecture", "Flat", "HubError", "fit", "flatten", "heads_in", "heads_out",
           "layer_from_tfm", "layer_to_tfm", "refuse", "relayout", "take", "unflatten", "unscan"]  # fmt: skip
