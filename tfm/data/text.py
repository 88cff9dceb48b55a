"""Character-level language modelling on a text file (nanoGPT's ``shakespeare_char``).

The vocabulary is the sorted set of characters in the whole file (65 for tiny
Shakespeare); the first 90 % is the training split, the rest validation, as in
nanoGPT's ``prepare.py``. A batch is ``batch_size`` windows of ``block_size + 1``
characters at random offsets drawn from ``(seed, split, batch index)``.
"""

from __future__ import annotations

import os

import numpy as np

from tfm.data.base import DataError, Dataset
from tfm.data.base import data_dir as data_dir_

SPLIT_IDS = {"train": 0, "validation": 1}


class CharLM(Dataset):
    task = "lm"
    OPTIONS = dict(data_dir="", path="tinyshakespeare/input.txt", block_size=64, train_fraction=0.9, seed=0)

    def __init__(self, *, batch_size: int, data_dir: str, path: str, block_size: int, train_fraction: float, seed: int):

        full = os.path.join(data_dir_(data_dir), path)
        if not os.path.isfile(full):
            raise DataError(
                f"data.path: no text file at {full!r} (data.data_dir={data_dir!r} or $TFM_DATA_DIR, "
                f"data.path={path!r}); expected a UTF-8 text file such as tiny Shakespeare's input.txt"
            )
        try:
            with open(full, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"data.path: {full!r} is not UTF-8 text ({e})") from e
        if not 0.0 < train_fraction < 1.0:
            raise DataError(f"data.train_fraction={train_fraction}: must be in (0, 1)")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        ids = np.array([self.stoi[c] for c in text], dtype=np.int32)
        n = int(len(ids) * train_fraction)
        self.splits = {"train": ids[:n], "validation": ids[n:]}
        for split, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise DataError(
                    f"data.block_size={block_size}: the {split} split of {full!r} has only {len(arr)} characters"
                )
        self.batch_size, self.block_size, self.seed, self.path = batch_size, block_size, seed, full

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.stoi[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        data = self.splits[split]
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        starts = rng.integers(0, len(data) - self.block_size - 1, size=b)
        windows = data[starts[:, None] + np.arange(self.block_size + 1)[None, :]]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
