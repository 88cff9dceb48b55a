"""Datasets for the trainer: batches of numpy arrays from iterators whose position can be saved.

A dataset is named by ``config.data.name`` and built by ``make_dataset(config.data)``.
It knows its ``task`` (which batch keys it yields), its vocabulary size, and
makes one iterator per split. Every iterator has ``get_state()`` / ``set_state()``
returning / taking a JSON-able dict: the trainer stores it in each checkpoint,
which is what makes a resumed run see exactly the batches an uninterrupted one
would.

Batch keys by task (``[B, ...]`` arrays, B the global batch):

* ``lm``: ``inputs [B,T]`` and ``targets [B,T]`` int32, optional ``weights [B,T]``.
* ``seq2seq``: ``inputs [B,S]``, ``decoder_inputs [B,T]``, ``targets [B,T]``, ``weights [B,T]``.
* ``classify``: ``inputs [B,...]`` and ``labels [B]``.

The synthetic batches are a pure function of ``(seed, split, batch index)``, so
the global batch is the same however many processes read it; each process then
keeps only its rows.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from tfm.data.synthetic import CopyTask, SyntheticLM
from tfm.data.text import CharLM

DATASETS: dict[str, type] = {"copy": CopyTask, "shakespeare_char": CharLM, "synthetic_lm": SyntheticLM}


class DataError(ValueError):
    """A dataset that cannot be built: a missing file, a bad option; names the path or key."""


def data_dir(option: str = "") -> str:
    """Where local data lives: the option, else ``$TFM_DATA_DIR``, else ``./data``."""
    return option or os.environ.get("TFM_DATA_DIR", "data")


def make_dataset(data_config):
    """``config.data`` (a mapping with ``name``, ``batch_size`` and the dataset's options) -> dataset."""
    options = dict(data_config)
    name = options.pop("name", None)
    batch_size = options.pop("batch_size", None)
    if name not in DATASETS:
        raise DataError(f"data.name={name!r}: not a dataset; choose from {sorted(DATASETS)}")
    cls = DATASETS[name]
    unknown = set(options) - set(cls.OPTIONS)
    if unknown:
        key = sorted(unknown)[0]
        raise DataError(f"data.{key}={options[key]!r}: dataset {name!r} has options {sorted(cls.OPTIONS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"data.batch_size={batch_size!r}: must be a positive int")
    merged = {**cls.OPTIONS, **options}
    return cls(batch_size=batch_size, **merged)


class IndexedIterator:
    """Batch ``i`` is ``batch_fn(i)``; the state is the next index."""

    def __init__(self, batch_fn: Callable[[int], dict], start: int = 0):
        self._fn = batch_fn
        self.index = start

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._fn(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        if set(state) != {"index"} or not isinstance(state["index"], int) or state["index"] < 0:
            raise DataError(f"data iterator state must be {{'index': int >= 0}}, got {state!r}")
        self.index = state["index"]


__all__ = ["DATASETS", "CharLM", "CopyTask", "SyntheticLM", "DataError", "IndexedIterator", "data_dir", "make_dataset"]
