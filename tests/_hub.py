"""Helpers for the checkpoint import/export tests: tiny random ``transformers`` models, built offline."""

from __future__ import annotations

import numpy as np
import pytest


def transformers_or_skip():
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


def save_hf(model, directory, **kwargs) -> str:
    """``model.save_pretrained(directory)`` (safetensors), quietly; returns the directory as a string."""
    import transformers

    transformers.logging.set_verbosity_error()
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)


def torch_logits(model, *args, **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(*[torch.as_tensor(np.asarray(a)) for a in args],
                    **{k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()})  # fmt: skip
    return out.logits.numpy()


def maxerr(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def config_writer(directory, tmp_path):
    """``write(name, **changes) -> dir``: a new directory holding ``directory``'s config.json with ``changes``."""
    import json
    import os

    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)

    def write(name, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**hf, **changes}))
        return d

    return write
