"""Multi30k (Task 1) translation through a tfds builder, with a shared sentencepiece vocabulary.

The builder prepares ``train`` / ``validation`` / ``test`` (``test_2016_flickr``)
from the raw one-sentence-per-line files in ``<data_dir>/<path>`` (``train.en``,
``train.de``, ``val.*``, ``test_2016_flickr.*``). A sentencepiece model (BPE or
unigram) is trained once on the training split's source and target sentences
together — one vocabulary shared by both sides, as the paper's shared BPE — and
cached under the tfds directory; the trainer copies it into the workdir and
``tfm.inference.load`` uses that copy.

Ids: 0 pad, 1 BOS, 2 EOS, 3 unknown. Source rows end with EOS; the decoder
reads ``BOS y`` and predicts ``y EOS``. Rows are padded to ``max_len`` (longer
sentences are cut).

With ``pack=True`` training rows hold several pairs each: each epoch's shuffled
order is packed greedily (a pair starts a new row when its source or target no
longer fits), and the batch carries ``segment_ids`` / ``decoder_segment_ids``
(1, 2, … per pair, 0 for padding) and per-pair ``positions`` /
``decoder_positions``, from which the model's masks keep the pairs apart.

With ``bucket=True`` (and no packing) training batches hold pairs of similar
length, padded only to the smallest bucket width (multiples of 16 up to
``max_len``) that fits their longest: each epoch's shuffled order is cut into
chunks of 32 batches, each chunk sorted by length and cut into batches, and
the epoch's batches shuffled again. The trainer compiles one step per width.

Every training batch ``i`` is a pure function of ``(seed, i)``; a process of a
multi-process run builds only its rows of it (``local_batch``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import grain
import numpy as np
import tensorflow_datasets as tfds

from tfm.data.base import (
    DataError,
    RowReadingDataset,
    load_sentencepiece,
    local_data,
    shift_right,
    tokenizer_cache,
    train_sentencepiece,
)
from tfm.data.base import data_dir as data_dir_
from tfm.data.builders import prepare

PAD, BOS, EOS, UNK = 0, 1, 2, 3
FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}


class Multi30kText(tfds.core.GeneratorBasedBuilder):
    """Multi30k Task 1 En-De from the raw text files in ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put {train,val,test_2016_flickr}.{en,de} in the manual directory."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Multi30k Task 1 (Elliott et al. 2016), English-German image descriptions.",
            features=tfds.features.FeaturesDict({"en": tfds.features.Text(), "de": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(dl_manager.manual_dir, stem) for split, stem in FILES.items()}

    def _generate_examples(self, folder, stem):
        sides = {}
        for lang in ("en", "de"):
            path = os.path.join(folder, f"{stem}.{lang}")
            with open(path, encoding="utf-8") as f:
                sides[lang] = f.read().split("\n")
            if sides[lang] and sides[lang][-1] == "":
                sides[lang].pop()
        if len(sides["en"]) != len(sides["de"]):
            raise DataError(f"{folder}: {stem}.en has {len(sides['en'])} lines but {stem}.de has {len(sides['de'])}")
        for i, (en, de) in enumerate(zip(sides["en"], sides["de"])):
            yield i, {"en": en, "de": de}


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class Translation(RowReadingDataset):
    """Multi30k English-German translation (``multi30k``, task ``seq2seq``), one sentencepiece vocabulary for both.

    Rows are padded to ``max_len``; training rows may be packed (``pack``) or bucketed by length (``bucket``).
    """

    task = "seq2seq"
    SPLITS = ("train", "validation", "test")
    OPTIONS = dict(data_dir="", path="multi30k", tfds_dir="", source_lang="en", target_lang="de", vocab_size=8000,
                   model_type="bpe", tokenizer_path="", max_len=64, pack=False, bucket=False, seed=0)  # fmt: skip

    def __init__(self, *, batch_size, data_dir, path, tfds_dir, source_lang, target_lang, vocab_size, model_type,
                 tokenizer_path, max_len, pack, bucket, seed):  # fmt: skip
        if {source_lang, target_lang} != {"en", "de"}:
            raise DataError(f"data.source_lang={source_lang!r}, data.target_lang={target_lang!r}: Multi30k has en and de")
        if pack and bucket:
            raise DataError("data.pack and data.bucket: choose one (packed rows have no padding to bucket)")
        if model_type not in ("bpe", "unigram"):
            raise DataError(f"data.model_type={model_type!r}: choose 'bpe' or 'unigram'")
        if not isinstance(max_len, int) or max_len < 2:
            raise DataError(f"data.max_len={max_len!r}: must be >= 2 (a target row holds at least BOS/EOS and a token)")
        if not isinstance(vocab_size, int) or vocab_size < 5:
            raise DataError(f"data.vocab_size={vocab_size!r}: must be >= 5 (4 special ids and at least one piece)")
        folder = local_data(data_dir_(data_dir), path)
        files = [f"{stem}.{lang}" for stem in FILES.values() for lang in ("en", "de")]
        builder = prepare(Multi30kText, folder, tfds_dir, files)
        sources = builder.as_data_source()
        self.pairs = {
            split: [(_text(ex[source_lang]), _text(ex[target_lang])) for ex in sources[split]] for split in self.SPLITS
        }
        if tokenizer_path:
            self.tokenizer_path = tokenizer_path
        else:
            self.tokenizer_path = self._train_tokenizer(builder.data_dir, vocab_size, model_type)
        self.sp = load_sentencepiece(self.tokenizer_path)
        self.vocab_size = self.sp.get_piece_size()
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.tokens = {split: [(self.encode(s), self._ids(t)) for s, t in pairs] for split, pairs in self.pairs.items()}
        self._order = grain.MapDataset.range(len(self.tokens["train"])).shuffle(seed=seed).repeat()
        self.pack, self.bucket = pack, bucket
        self.bucket_widths = sorted({*range(16, max_len, 16), max_len})
        self._epoch_rows: list[list[list[int]]] = []  # packed rows of each epoch, computed on demand
        self._epoch_buckets: list[list[tuple[list[int], int]]] = []  # (pair ids, width) of each bucketed batch

    def _train_tokenizer(self, cache_dir, vocab_size, model_type) -> str:
        sentences = [s for pair in self.pairs["train"] for s in pair]
        digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]
        cache_dir = tokenizer_cache(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        prefix = os.path.join(cache_dir, f"spm_{model_type}_{vocab_size}_{digest}")
        if not os.path.isfile(prefix + ".model"):
            tmp = f"{prefix}.{os.getpid()}.tmp"
            train_sentencepiece(
                sentence_iterator=iter(sentences), model_prefix=tmp, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, num_threads=2,
                minloglevel=2,
            )  # fmt: skip
            os.replace(tmp + ".model", prefix + ".model")  # complete or absent, never half-written
            os.replace(tmp + ".vocab", prefix + ".vocab")
        return prefix + ".model"

    def artifacts(self) -> dict[str, bytes]:
        """Files a trained model needs beside its checkpoint: the tokenizer."""
        return {"tokenizer.model": self.sp.serialized_model_proto()}

    def _ids(self, text: str) -> np.ndarray:
        return np.array(self.sp.encode(text), np.int32)

    def encode(self, text: str) -> np.ndarray:
        """A source sentence -> ids ending with EOS."""
        return np.append(self._ids(text), EOS).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids up to the first EOS -> detokenized text."""
        out = []
        for i in ids:
            if int(i) == EOS:
                break
            if int(i) not in (PAD, BOS):
                out.append(int(i))
        return self.sp.decode(out)

    def references(self, split: str) -> list[str]:
        return [t for _, t in self.pairs[split]]

    def sources(self, split: str) -> list[str]:
        return [s for s, _ in self.pairs[split]]

    def num_batches(self, split: str, batch_size: int | None = None) -> int:
        return -(-len(self.tokens[split]) // (batch_size or self.batch_size))

    def _pad(self, rows, weights, width: int | None = None) -> dict[str, np.ndarray]:
        """One pair per row, padded to ``width`` (default ``max_len``); longer sentences are cut."""
        b, n = len(rows), width or self.max_len
        src = np.full((b, n), PAD, np.int32)
        dec_in = np.full((b, n), PAD, np.int32)
        tgt = np.full((b, n), PAD, np.int32)
        w = np.zeros((b, n), np.float32)
        for i, (s, t) in enumerate(rows):
            s = s[:n]
            y = t[: n - 1]
            src[i, : len(s)] = s
            d, y_eos = shift_right(y, BOS, EOS)
            dec_in[i, : len(d)] = d
            tgt[i, : len(y_eos)] = y_eos
            w[i, : len(y) + 1] = weights[i]
        return {"inputs": src, "decoder_inputs": dec_in, "targets": tgt, "weights": w}

    def _rows_of_epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epoch_rows) <= epoch:
            e, n, data = len(self._epoch_rows), self.max_len, self.tokens["train"]
            rows, cur, used_s, used_t = [], [], 0, 0
            for j in range(len(data)):
                k = int(self._order[e * len(data) + j])
                ls, lt = min(len(data[k][0]), n), min(len(data[k][1]), n - 1) + 1
                if cur and (used_s + ls > n or used_t + lt > n):
                    rows.append(cur)
                    cur, used_s, used_t = [], 0, 0
                cur.append(k)
                used_s, used_t = used_s + ls, used_t + lt
            rows.append(cur)
            self._epoch_rows.append(rows)
        return self._epoch_rows[epoch]

    def _pair_length(self, k: int) -> int:
        """Positions pair ``k`` needs: its source, or its target plus EOS, whichever is longer."""
        s, t = self.tokens["train"][k]
        return max(min(len(s), self.max_len), min(len(t), self.max_len - 1) + 1)

    def _bucketed_epoch(self, epoch: int) -> list[tuple[list[int], int]]:
        while len(self._epoch_buckets) <= epoch:
            e, b, n = len(self._epoch_buckets), self.batch_size, len(self.tokens["train"])
            order = [int(self._order[e * n + j]) for j in range(n - n % b)]  # whole batches only
            batches = []
            for c in range(0, len(order), 32 * b):
                chunk = sorted(order[c : c + 32 * b], key=self._pair_length)
                batches += [chunk[i : i + b] for i in range(0, len(chunk), b)]
            np.random.default_rng([self.seed, 11, e]).shuffle(batches)
            widths = [min(w for w in self.bucket_widths if w >= max(map(self._pair_length, ids))) for ids in batches]
            self._epoch_buckets.append(list(zip(batches, widths)))
        return self._epoch_buckets[epoch]

    def _packed_batch(self, index: int, keep: range) -> dict[str, np.ndarray]:
        b, n, data = self.batch_size, self.max_len, self.tokens["train"]
        # Row r of the packed stream: walk the epochs' row counts (each epoch packs differently).
        rows, r, epoch = [], index * b, 0
        while len(rows) < b:
            epoch_rows = self._rows_of_epoch(epoch)
            if r < len(epoch_rows):
                take = epoch_rows[r : r + b - len(rows)]
                rows += take
                r += len(take)
            if r >= len(epoch_rows):
                r -= len(epoch_rows)
                epoch += 1
        rows = [rows[i] for i in keep]
        b = len(rows)
        out = {k: np.zeros((b, n), np.int32) for k in ("inputs", "decoder_inputs", "targets", "segment_ids",
                                                          "decoder_segment_ids", "positions", "decoder_positions")}  # fmt: skip
        out["weights"] = np.zeros((b, n), np.float32)
        for i, row in enumerate(rows):
            ps = pt = 0
            for seg, k in enumerate(row, start=1):
                s, t = data[k]
                s, y = s[:n], t[: n - 1]
                out["inputs"][i, ps : ps + len(s)] = s
                out["segment_ids"][i, ps : ps + len(s)] = seg
                out["positions"][i, ps : ps + len(s)] = np.arange(len(s))
                d, y_eos = shift_right(y, BOS, EOS)
                m = len(d)
                out["decoder_inputs"][i, pt : pt + m] = d
                out["targets"][i, pt : pt + m] = y_eos
                out["decoder_segment_ids"][i, pt : pt + m] = seg
                out["decoder_positions"][i, pt : pt + m] = np.arange(m)
                out["weights"][i, pt : pt + m] = 1.0
                ps, pt = ps + len(s), pt + m
        return out

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        if split not in self.tokens:
            raise DataError(f"split {split!r}: Multi30k has {list(self.SPLITS)}")
        data = self.tokens[split]
        if split == "train" and b == self.batch_size:
            if self.pack:
                return self._packed_batch(index, rows)
            if self.bucket:
                per_epoch = len(data) // b
                ids, width = self._bucketed_epoch(index // per_epoch)[index % per_epoch]
                return self._pad([data[ids[r]] for r in rows], np.ones(len(rows)), width)
            return self._pad([data[int(self._order[index * b + r])] for r in rows], np.ones(len(rows)))
        idx = [index * b + j for j in rows]  # in order, once; padding rows weigh nothing
        return self._pad([data[i % len(data)] for i in idx], np.array([i < len(data) for i in idx], np.float32))
