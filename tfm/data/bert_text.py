"""Text for encoder-only models (BERT): masked-LM pretraining and sentence classification.

Both read characters through one vocabulary with BERT's special ids first:
``[PAD]=0``, ``[CLS]=1``, ``[MASK]=2``, ``[UNK]=3``, then the corpus characters in
sorted order (saved with the run as ``vocab.json``, the characters only, so a
fine-tuning run reads its pretraining run's vocabulary through ``tokenizer_path``
and the embedding rows mean the same).

* ``MaskedCharLM`` (``shakespeare_mlm``, task ``mlm``): windows of ``block_size``
  positions, ``[CLS]`` then characters of the corpus (90 % train / 10 % validation,
  as ``CharLM``). Each character position is chosen with probability ``mask_rate``
  (15 %); of the chosen, 80 % become ``[MASK]``, 10 % a random character and 10 %
  stay (Devlin et al. 2019, §3.1). ``targets`` are the original ids, ``weights``
  1 at the chosen positions only.
* ``LanguageID`` (``multi30k_langid``, task ``text_classify``): is a Multi30k
  sentence English (label 0) or German (1)? ``[CLS]`` + its characters, cut or
  padded to ``max_len``; characters outside the vocabulary are ``[UNK]``. Every
  sentence of both sides is one example.

Batch ``i`` of a split is a pure function of ``(seed, split, i)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

from tfm.data.base import DataError, Dataset, local_data
from tfm.data.base import data_dir as data_dir_
from tfm.data.builders import prepare
from tfm.data.text import SPLIT_IDS, load_char_vocab, read_corpus

PAD, CLS, MASK, UNK = 0, 1, 2, 3
SPECIALS = ("[PAD]", "[CLS]", "[MASK]", "[UNK]")


class CharVocab:
    """Characters after the four special ids."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}
        self.size = len(SPECIALS) + len(self.chars)

    @classmethod
    def of(cls, text: str, tokenizer_path: str = "") -> CharVocab:
        return cls(load_char_vocab(tokenizer_path) if tokenizer_path else sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.stoi.get(c, UNK) for c in text], np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        n = len(SPECIALS)
        return "".join(self.chars[int(i) - n] if int(i) >= n else ("" if int(i) == PAD else SPECIALS[int(i)]) for i in ids)

    def artifacts(self) -> dict[str, bytes]:
        return {"vocab.json": json.dumps(self.chars, ensure_ascii=False).encode("utf-8")}


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, rate: float, vocab_size: int, maskable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 rule on ``ids [B, T]`` -> ``(inputs, weights)``; ``maskable [B, T]`` bool."""
    chosen = (rng.random(ids.shape) < rate) & maskable
    # At least one chosen position per row, so every row has a loss.
    empty = ~chosen.any(axis=1)
    if empty.any():
        scores = np.where(maskable, rng.random(ids.shape), -1.0)
        chosen[empty, np.argmax(scores[empty], axis=1)] = True
    action = rng.random(ids.shape)
    random_ids = rng.integers(len(SPECIALS), vocab_size, ids.shape).astype(np.int32)
    inputs = np.where(chosen & (action < 0.8), MASK, ids)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs.astype(np.int32), chosen.astype(np.float32)


class MaskedCharLM(Dataset):
    """Masked-character pretraining on a text corpus (``shakespeare_mlm``, task ``mlm``).

    Windows of ``[CLS]`` and ``block_size - 1`` characters, masked by BERT's 80/10/10 rule at rate ``mask_rate``.
    """

    task = "mlm"
    OPTIONS = dict(data_dir="", path="tinyshakespeare/input.txt", tfds_dir="", block_size=64, train_fraction=0.9,
                   mask_rate=0.15, tokenizer_path="", seed=0)  # fmt: skip

    def __init__(self, *, batch_size, data_dir, path, tfds_dir, block_size, train_fraction, mask_rate, tokenizer_path,
                 seed):  # fmt: skip
        if not isinstance(block_size, int) or block_size < 2:
            raise DataError(f"data.block_size={block_size!r}: must be >= 2 ([CLS] and a character)")
        if not 0.0 < mask_rate < 1.0:
            raise DataError(f"data.mask_rate={mask_rate}: must be in (0, 1)")
        if not 0.0 < train_fraction < 1.0:
            raise DataError(f"data.train_fraction={train_fraction}: must be in (0, 1)")
        text = read_corpus(local_data(data_dir_(data_dir), path), tfds_dir)
        self.vocab = CharVocab.of(text, tokenizer_path)
        self.vocab_size, self.pad_id = self.vocab.size, PAD
        ids = self.vocab.encode(text)
        cut = int(len(ids) * train_fraction)
        self.splits = {"train": ids[:cut], "validation": ids[cut:]}
        if min(len(x) for x in self.splits.values()) <= block_size:
            raise DataError(f"data.block_size={block_size}: a split of {path!r} is shorter than one window")
        self.batch_size, self.block_size, self.mask_rate, self.seed = batch_size, block_size, mask_rate, seed

    def artifacts(self) -> dict[str, bytes]:
        return self.vocab.artifacts()

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b, t = batch_size or self.batch_size, self.block_size
        data = self.splits[split]
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        starts = rng.integers(0, len(data) - t, size=b)
        ids = np.concatenate([np.full((b, 1), CLS, np.int32), data[starts[:, None] + np.arange(t - 1)[None, :]]], 1)
        maskable = np.ones(ids.shape, bool)
        maskable[:, 0] = False
        inputs, weights = mask_tokens(ids, rng, self.mask_rate, self.vocab_size, maskable)
        return {"inputs": inputs, "targets": ids, "weights": weights}


class LanguageID(Dataset):
    """Which language a Multi30k sentence is in (``multi30k_langid``, task ``text_classify``): English 0, German 1.

    Rows are ``[CLS]`` and the sentence's characters, cut or padded to ``max_len``.
    """

    task = "text_classify"
    SPLITS = ("train", "validation", "test")
    OPTIONS = dict(data_dir="", path="multi30k", tfds_dir="", max_len=64, tokenizer_path="", seed=0)
    FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
    num_classes = 2  # en, de

    def __init__(self, *, batch_size, data_dir, path, tfds_dir, max_len, tokenizer_path, seed):
        from tfm.data.translation import Multi30kText

        if not isinstance(max_len, int) or max_len < 2:
            raise DataError(f"data.max_len={max_len!r}: must be >= 2 ([CLS] and a character)")
        files = [f"{stem}.{lang}" for stem in self.FILES.values() for lang in ("en", "de")]
        sources = prepare(Multi30kText, local_data(data_dir_(data_dir), path), tfds_dir, files).as_data_source()
        texts = {s: [(_text(ex[lang]), label) for ex in sources[s] for label, lang in enumerate(("en", "de"))]
                 for s in self.SPLITS}  # fmt: skip
        self.vocab = CharVocab.of("".join(t for t, _ in texts["train"]), tokenizer_path)
        self.vocab_size, self.pad_id = self.vocab.size, PAD
        self.rows, self.labels = {}, {}
        for split, pairs in texts.items():
            rows = np.full((len(pairs), max_len), PAD, np.int32)
            rows[:, 0] = CLS
            for i, (text, _) in enumerate(pairs):
                ids = self.vocab.encode(text)[: max_len - 1]
                rows[i, 1 : 1 + len(ids)] = ids
            self.rows[split], self.labels[split] = rows, np.array([y for _, y in pairs], np.int32)
        self.batch_size, self.seed = batch_size, seed

    def artifacts(self) -> dict[str, bytes]:
        return self.vocab.artifacts()

    def num_batches(self, split: str) -> int:
        return -(-len(self.labels[split]) // self.batch_size)

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        n = len(self.labels[split])
        if split == "train":  # a fresh permutation each epoch
            epoch, offset = divmod(index * b, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            idx = np.concatenate([order, np.random.default_rng([self.seed, epoch + 1]).permutation(n)])[offset : offset + b]
            weights = np.ones(b, np.float32)
        else:  # in order; the last batch padded with weight-0 rows
            idx = np.arange(index * b, (index + 1) * b) % n
            weights = (np.arange(index * b, (index + 1) * b) < n).astype(np.float32)
        return {"inputs": self.rows[split][idx], "labels": self.labels[split][idx], "weights": weights}


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


__all__ = ["CharVocab", "LanguageID", "MaskedCharLM", "mask_tokens"]
