"""What every dataset shares: the error type, where local data lives, the resumable iterator."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tfm import storage

if TYPE_CHECKING:
    import sentencepiece as spm


class DataError(ValueError):
    """A dataset that cannot be built: a missing file, a bad option; names the path or key."""


def shift_right(y: np.ndarray, bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher forcing for one target sentence: ``(BOS y, y EOS)``, the decoder's input and
    its target, each ``len(y) + 1`` ids. Every seq2seq dataset builds its rows with this."""
    y = np.asarray(y, np.int32)
    return np.concatenate([[bos], y]).astype(np.int32), np.concatenate([y, [eos]]).astype(np.int32)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    """The sentencepiece model at ``path``; ``DataError`` naming the file if it is missing or not a model."""
    import sentencepiece as spm

    if not storage.isfile(path):
        raise DataError(f"data.tokenizer_path={path!r}: no sentencepiece model there")
    try:
        return spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path!r} is not a sentencepiece model ({_first_line(e)})") from e


def train_sentencepiece(*, model_prefix: str, vocab_size: int, **options: Any) -> None:
    """``SentencePieceTrainer.train``; ``DataError`` naming ``data.vocab_size`` when it cannot be met."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(model_prefix=model_prefix, vocab_size=vocab_size, **options)
    except (OSError, RuntimeError) as e:
        for suffix in (".model", ".vocab"):
            if os.path.exists(model_prefix + suffix):
                os.remove(model_prefix + suffix)
        raise DataError(f"data.vocab_size={vocab_size}: sentencepiece cannot train this vocabulary ({_first_line(e)})") from e


def data_dir(option: str = "") -> str:
    """Where the raw data lives: the option, else ``$TFM_DATA_DIR``, else ``./data`` (a URI is kept as it is)."""
    return storage.resolve(option or os.environ.get("TFM_DATA_DIR", "data"), "data.data_dir")


def local_data(folder: str, path: str) -> str:
    """``folder/path`` as a local file or folder: a cloud URI is mirrored into the local cache first."""
    return storage.local_copy(storage.join(folder, path))


def tokenizer_cache(folder: str) -> str:
    """Where trained tokenizers are cached: ``folder``, or a local cache when ``folder`` is a URI
    (sentencepiece writes only local files)."""
    if storage.is_remote(folder):
        return os.path.join(storage.cache_folder(folder), "tfm_tokenizers")
    return folder


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


class Dataset:
    """A dataset whose batch ``i`` of a split is ``batch(split, i)``, a pure function of its options.

    Subclasses set ``task``, ``OPTIONS`` (option -> default), ``SPLITS`` and implement ``batch``.
    """

    task: str
    SPLITS: tuple[str, ...] = ("train", "validation")

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def local_batch(self, split: str, index: int, rows: slice) -> dict[str, np.ndarray]:
        """Rows ``rows`` of global batch ``index``: what one process of a multi-process run reads.

        Equal to ``batch(split, index)[rows]`` by definition; datasets that read
        from storage override it to touch only those rows' records.
        """
        return {k: v[rows] for k, v in self.batch(split, index).items()}

    def iterator(self, split: str = "train", rows: slice | None = None) -> IndexedIterator:
        """Batches 0, 1, 2, ... of ``split``: global ones, or with ``rows`` only those rows of each."""
        if split not in self.SPLITS:
            raise DataError(f"split {split!r}: {type(self).__name__} has {list(self.SPLITS)}")
        if rows is None:
            return IndexedIterator(lambda i: self.batch(split, i))
        return IndexedIterator(lambda i: self.local_batch(split, i, rows))


class RowReadingDataset(Dataset):
    """A dataset that can build any subset of a batch's rows without the others.

    Subclasses implement ``read(split, index, batch_size, rows)`` (``rows`` a
    ``range`` of row numbers of global batch ``index``); ``batch`` and
    ``local_batch`` are both that call.
    """

    batch_size: int

    def read(self, split: str, index: int, batch_size: int, rows: range) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        return self.read(split, index, b, range(b))

    def local_batch(self, split: str, index: int, rows: slice) -> dict[str, np.ndarray]:
        return self.read(split, index, self.batch_size, range(self.batch_size)[rows])
