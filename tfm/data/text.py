"""Language modelling on a text corpus (nanoGPT's ``shakespeare_char``), by character or subword.

The file is prepared by a tfds builder (``TextCorpus``, array_record, one example
holding the whole text; the prepared copy is named after the file's content hash)
and read back with ``as_data_source()``. ``tokenizer="char"``: the vocabulary is
the sorted set of characters in the whole file (65 for tiny Shakespeare).
``tokenizer="bpe"`` / ``"unigram"``: a sentencepiece model of ``vocab_size``
pieces trained on the training split's lines. ``tokenizer="hf"``: a pretrained
checkpoint's own tokenizer (``tokenizer_path``: its directory or ``tokenizer.json``),
for fine-tuning an imported model (``tfm.hub``). Each is saved with the run
(``vocab.json``, a JSON list of the characters in id order,
``tokenizer.model`` or ``tokenizer.json``) and read back from there through ``tokenizer_path``, so a
trained run decodes with its own vocabulary whatever the corpus holds now. The first ``train_fraction`` (90 %)
of the text is the training split, the rest validation, as in nanoGPT's
``prepare.py``. A batch is ``batch_size`` windows of ``block_size + 1`` tokens at
random offsets drawn from ``(seed, split, batch index)``.

``contiguous=True`` (for models with a memory, task ``lm_memory``): the split is cut into
``batch_size`` streams of equal length, and row ``r`` of batch ``i`` is segment ``i mod n`` of
stream ``r``, so each row continues the row before it; ``reset [B]`` is True where a stream
starts over (the memory must be dropped). Batches ``0 .. n-1`` of the validation split are
its whole text, once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds

from tfm import storage
from tfm.data.base import DataError, Dataset, load_sentencepiece, local_data, tokenizer_cache, train_sentencepiece
from tfm.data.base import data_dir as data_dir_

SPLIT_IDS = {"train": 0, "validation": 1}


class TextCorpusConfig(tfds.core.BuilderConfig):
    """A ``TextCorpus`` config: ``filename``, the text file's name in the manual directory."""

    def __init__(self, *, filename: str, **kwargs):
        super().__init__(**kwargs)
        self.filename = filename


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """One UTF-8 text file from ``manual_dir`` as a single example ``{"text": ...}`` in split ``full``."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the text file in the manual directory."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"full": self._generate_examples(os.path.join(dl_manager.manual_dir, self.builder_config.filename))}

    def _generate_examples(self, path):
        with open(path, encoding="utf-8") as f:
            yield 0, {"text": f.read()}


def read_corpus(path: str, tfds_dir: str = "") -> str:
    """The text of ``path``, through its prepared tfds copy (prepared on first use)."""
    if not os.path.isfile(path):
        raise DataError(f"data.path: no text file at {path!r}; expected a UTF-8 text file such as tiny Shakespeare's input.txt")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path: {path!r} is not UTF-8 text ({e})") from e
    digest = hashlib.sha256(raw).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0]).lower()
    config = TextCorpusConfig(name=f"{stem}_{digest}", filename=os.path.basename(path))
    builder = TextCorpus(config=config, data_dir=tfds_dir or None, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.path.dirname(path)))
    text = builder.as_data_source()["full"][0]["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def load_char_vocab(path: str) -> list[str]:
    """A character vocabulary saved as ``vocab.json`` (a JSON list of single characters, in id order)."""
    if not storage.isfile(path):
        raise DataError(f"data.tokenizer_path={path!r}: no character vocabulary (vocab.json) there")
    try:
        chars = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data.tokenizer_path={path!r} is not a character vocabulary ({type(e).__name__}: {e})") from e
    if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise DataError(f"data.tokenizer_path={path!r}: expected a JSON list of distinct single characters")
    return chars


class CharLM(Dataset):
    """Language modelling on a text corpus (``shakespeare_char``, task ``lm``), by character or subword.

    A batch is windows of ``block_size + 1`` tokens; ``tokenizer`` is ``"char"`` or a sentencepiece model
    type (``"bpe"``, ``"unigram"``).
    """

    task = "lm"
    OPTIONS = dict(data_dir="", path="tinyshakespeare/input.txt", tfds_dir="", block_size=64, train_fraction=0.9,
                   tokenizer="char", vocab_size=512, tokenizer_path="", seed=0, contiguous=False)  # fmt: skip

    def __init__(self, *, batch_size: int, data_dir: str, path: str, tfds_dir: str, block_size: int,
                 train_fraction: float, tokenizer: str, vocab_size: int, tokenizer_path: str, seed: int,
                 contiguous: bool = False):  # fmt: skip
        full = local_data(data_dir_(data_dir), path)
        if not 0.0 < train_fraction < 1.0:
            raise DataError(f"data.train_fraction={train_fraction}: must be in (0, 1)")
        if tokenizer not in ("char", "bpe", "unigram", "hf"):
            raise DataError(f"data.tokenizer={tokenizer!r}: choose 'char', 'bpe', 'unigram' or 'hf'")
        if tokenizer == "hf" and not tokenizer_path:
            raise DataError("data.tokenizer='hf' reads a checkpoint's tokenizer: set data.tokenizer_path to its "
                            "directory or tokenizer.json")  # fmt: skip
        if not isinstance(block_size, int) or block_size < 1:
            raise DataError(f"data.block_size={block_size!r}: must be >= 1")
        text = read_corpus(full, tfds_dir)
        cut = int(len(text) * train_fraction)
        self.sp = self.hf = None
        if tokenizer == "hf":
            from tfm.hub.tokenizer import load_tokenizer

            try:
                self.hf = load_tokenizer(tokenizer_path)
            except ValueError as e:
                raise DataError(f"data.tokenizer_path={tokenizer_path!r}: {e}") from None
            self.vocab_size = self.hf.vocab_size
            train_ids = self.hf.encode(text[:cut])
            ids = np.concatenate([train_ids, self.hf.encode(text[cut:])])
            n = len(train_ids)
        elif tokenizer == "char":
            self.chars = load_char_vocab(tokenizer_path) if tokenizer_path else sorted(set(text))
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            missing = sorted(set(text) - set(self.stoi))
            if missing:
                raise DataError(f"data.path={full!r} has characters that the vocabulary {tokenizer_path!r} lacks: "
                                f"{''.join(missing[:20])!r}")  # fmt: skip
            self.vocab_size = len(self.chars)
            ids = np.array([self.stoi[c] for c in text], dtype=np.int32)
            n = cut
        else:
            self.sp = self._subword(text[:cut], tfds_dir, tokenizer, vocab_size, tokenizer_path)
            self.vocab_size = self.sp.get_piece_size()
            train_ids = np.array(self.sp.encode(text[:cut]), np.int32)
            ids = np.concatenate([train_ids, np.array(self.sp.encode(text[cut:]), np.int32)])
            n = len(train_ids)
        self.splits = {"train": ids[:n], "validation": ids[n:]}
        for split, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise DataError(
                    f"data.block_size={block_size}: the {split} split of {full!r} has only {len(arr)} characters"
                )
        self.batch_size, self.block_size, self.seed, self.path = batch_size, block_size, seed, full
        self.contiguous = bool(contiguous)
        if self.contiguous:
            self.task = "lm_memory"
            self.num_batches = self.segments  # an evaluation over the whole split (train.eval_steps=-1)
            for split in self.splits:
                if self.segments(split) < 1:
                    raise DataError(f"data.contiguous: the {split} split cut into data.batch_size={batch_size} "
                                    f"streams leaves less than one segment of data.block_size={block_size} per stream")

    def segments(self, split: str, batch_size: int | None = None) -> int:
        """With ``contiguous``: the segments of ``block_size`` in each of the split's streams."""
        return (len(self.splits[split]) // (batch_size or self.batch_size) - 1) // self.block_size

    def artifacts(self) -> dict[str, bytes]:
        """The tokenizer, saved beside the checkpoints: the sentencepiece model, tokenizer.json or the character list."""
        if self.hf is not None:
            return {self.hf.filename: self.hf.serialized()}
        if self.sp is not None:
            return {"tokenizer.model": self.sp.serialized_model_proto()}
        return {"vocab.json": json.dumps(self.chars, ensure_ascii=False).encode("utf-8")}

    @staticmethod
    def _subword(train_text: str, tfds_dir: str, model_type: str, vocab_size: int, tokenizer_path: str):
        if tokenizer_path:
            return load_sentencepiece(tokenizer_path)
        cache = tokenizer_cache(storage.join(tfds_dir or os.path.expanduser("~/tensorflow_datasets"), "tfm_tokenizers"))
        os.makedirs(cache, exist_ok=True)
        digest = hashlib.sha256(train_text.encode()).hexdigest()[:12]
        prefix = os.path.join(cache, f"{model_type}_{vocab_size}_{digest}")
        if not os.path.isfile(prefix + ".model"):
            tmp = f"{prefix}.{os.getpid()}.tmp"
            lines = [line for line in train_text.split("\n") if line.strip()]
            train_sentencepiece(
                sentence_iterator=iter(lines), model_prefix=tmp, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
                remove_extra_whitespaces=False, normalization_rule_name="identity", user_defined_symbols=["\n"],
            )  # fmt: skip
            os.replace(tmp + ".model", prefix + ".model")
            os.replace(tmp + ".vocab", prefix + ".vocab")
        return load_sentencepiece(prefix + ".model")

    def encode(self, text: str) -> np.ndarray:
        if self.hf is not None:
            return self.hf.encode(text)
        if self.sp is not None:
            return np.array(self.sp.encode(text), np.int32)
        return np.array([self.stoi[c] for c in text], np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids)
        if self.sp is not None:
            return self.sp.decode([int(i) for i in ids])
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, index: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
        b = batch_size or self.batch_size
        data = self.splits[split]
        if self.contiguous:
            k = index % self.segments(split, b)
            starts = np.arange(b) * (len(data) // b) + k * self.block_size
            windows = data[starts[:, None] + np.arange(self.block_size + 1)[None, :]]
            return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "reset": np.full((b,), k == 0)}
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        starts = rng.integers(0, len(data) - self.block_size - 1, size=b)
        windows = data[starts[:, None] + np.arange(self.block_size + 1)[None, :]]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
