"""The synthetic copy task of the Annotated Transformer: learn to output the input sequence.

Ids: 0 pad, 1 BOS, 2 EOS, symbols ``3 .. vocab_size-1``. A source of random
symbols (length uniform in ``[min_len, max_len]``) is copied — or reversed with
``reverse=True`` — into the target; the decoder reads ``BOS y`` and predicts
``y EOS``. Needs no files.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from tfm.data.base import DataError, Dataset, shift_right

PAD, BOS, EOS = 0, 1, 2
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


class CopyTask(Dataset):
    """The copy task (``copy``, task ``seq2seq``): the target is the source, copied or (``reverse``) reversed.

    Sources are ``min_len`` to ``max_len`` random symbols; needs no files.
    """

    task = "seq2seq"
    SPLITS = tuple(SPLIT_IDS)
    OPTIONS = dict(vocab_size=16, min_len=4, max_len=12, reverse=False, seed=0)

    def __init__(self, *, batch_size: int, vocab_size: int, min_len: int, max_len: int, reverse: bool, seed: int):
        if vocab_size < 4:
            raise DataError(f"data.vocab_size={vocab_size}: the copy task needs >= 4 (pad, bos, eos, a symbol)")
        if not 1 <= min_len <= max_len:
            raise DataError(f"data.min_len={min_len}, data.max_len={max_len}: need 1 <= min_len <= max_len")
        self.batch_size, self.vocab_size = batch_size, vocab_size
        self.min_len, self.max_len, self.reverse, self.seed = min_len, max_len, reverse, seed
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

    def encode(self, text: str) -> np.ndarray:
        """``"5 3 9"`` -> ids; symbols must lie in ``[3, vocab_size)``."""
        try:
            ids = np.array([int(t) for t in text.split()], np.int32)
        except ValueError as e:
            raise DataError(f"copy task input must be whitespace-separated integers, got {text!r}") from e
        if ids.size and (ids.min() < 3 or ids.max() >= self.vocab_size):
            raise DataError(f"copy task symbols must be in [3, {self.vocab_size}), got {text!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids up to (not including) the first EOS, as ``"5 3 9"``."""
        out = []
        for i in ids:
            if int(i) in (EOS, PAD):
                break
            out.append(str(int(i)))
        return " ".join(out)

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        lengths = rng.integers(self.min_len, self.max_len + 1, size=b)
        symbols = rng.integers(3, self.vocab_size, size=(b, self.max_len))
        valid = np.arange(self.max_len)[None, :] < lengths[:, None]
        src = np.where(valid, symbols, PAD).astype(np.int32)
        tgt = src.copy()
        if self.reverse:
            for i, n in enumerate(lengths):
                tgt[i, :n] = src[i, :n][::-1]
        # decoder input: BOS y ; target: y EOS ; both padded to max_len + 1
        dec_in = np.full((b, self.max_len + 1), PAD, np.int32)
        targets = np.full((b, self.max_len + 1), PAD, np.int32)
        for i, n in enumerate(lengths):
            dec_in[i, : n + 1], targets[i, : n + 1] = shift_right(tgt[i, :n], BOS, EOS)
        weights = (np.arange(self.max_len + 1)[None, :] <= lengths[:, None]).astype(np.float32)
        return {"inputs": src, "decoder_inputs": dec_in, "targets": targets, "weights": weights}


class SyntheticLM(Dataset):
    """Uniformly random tokens for language-model benchmarks and smoke runs (nothing to learn)."""

    task = "lm"
    SPLITS = tuple(SPLIT_IDS)
    OPTIONS = dict(vocab_size=256, seq_len=128, seed=0)

    def __init__(self, *, batch_size: int, vocab_size: int, seq_len: int, seed: int):
        if vocab_size < 2 or seq_len < 1:
            raise DataError(f"data.vocab_size={vocab_size}, data.seq_len={seq_len}: need >= 2 and >= 1")
        self.batch_size, self.vocab_size, self.seq_len, self.seed = batch_size, vocab_size, seq_len, seed

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        tokens = rng.integers(0, self.vocab_size, size=(b, self.seq_len + 1), dtype=np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
