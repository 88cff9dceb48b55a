"""Datasets for the trainer: batches of numpy arrays from iterators whose position can be saved.

A dataset is named by ``config.data.name`` and built by ``make_dataset(config.data)``.
It knows its ``task`` (which batch keys it yields), its vocabulary size, and
makes one iterator per split. Every iterator has ``get_state()`` / ``set_state()``
returning / taking a JSON-able dict: the trainer stores it in each checkpoint,
which is what makes a resumed run see exactly the batches an uninterrupted one
would.

File-backed datasets go through tensorflow-datasets builders that prepare
offline from the original files in ``array_record`` format (``builders.py``,
``text.py``, ``translation.py``) and are read with ``as_data_source()`` and
grain's random-access ``MapDataset`` (deterministic, per-epoch reshuffling).
Batch ``i`` of a split is a pure function of ``(seed, i)``, so the saved
position is ``{"index": i}`` and the global batch is the same for any number
of processes; each process keeps only its rows.

Batch keys by task (``[B, ...]`` arrays, B the global batch):

* ``lm``: ``inputs [B,T]`` and ``targets [B,T]`` int32, optional ``weights [B,T]``.
* ``lm_memory``: as ``lm``, each row continuing the previous batch's row, and ``reset [B]`` bool
  (True where a row starts its stream over).
* ``seq2seq``: ``inputs [B,S]``, ``decoder_inputs [B,T]``, ``targets [B,T]``, ``weights [B,T]``;
  packed rows add ``segment_ids``, ``decoder_segment_ids``, ``positions``, ``decoder_positions``.
* ``classify``: ``inputs [B,...]``, ``labels [B]`` and ``weights [B]``.
* ``mlm``: ``inputs [B,T]`` (with ``[MASK]`` ids), ``targets [B,T]`` (the original ids), ``weights [B,T]``
  (1 at the masked positions).
* ``text_classify``: ``inputs [B,T]`` token ids, ``labels [B]`` and ``weights [B]``.
* ``speech``: ``inputs [B,F,M]`` float32 log-mel frames, ``decoder_inputs [B,T]``, ``targets [B,T]``,
  ``weights [B,T]`` (as ``seq2seq``, unpacked).
* ``contrastive``: ``inputs [B,H,W,C]`` images, ``tokens [B,T]`` their captions (EOT-terminated),
  ``labels [B]`` and ``weights [B]``.
* ``detect``: ``inputs [B,H,W,C]`` images, ``boxes [B,M,4]`` (cx, cy, w, h in [0, 1]), ``labels [B,M]``,
  ``box_mask [B,M]`` (1 for a real box) and ``weights [B]``.
* ``multimodal``: any of ``text [B,T]``, ``images [B,H,W,C]``, ``audio [B,F,M]`` (and ``*_present [B]``
  flags for rows without one), ``labels [B]`` and ``weights [B]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tfm.data.base import DataError, Dataset, IndexedIterator, data_dir
from tfm.data.bert_text import LanguageID, MaskedCharLM
from tfm.data.captions import FashionMnistCaptions, FashionMnistMatching
from tfm.data.images import FashionMnist
from tfm.data.shapes import ShapesDetection
from tfm.data.speech import SpeechDigits
from tfm.data.synthetic import CopyTask, SyntheticLM
from tfm.data.text import CharLM
from tfm.data.translation import Translation

DATASETS: dict[str, type] = {
    "copy": CopyTask,
    "fashion_mnist": FashionMnist,
    "fashion_mnist_captions": FashionMnistCaptions,
    "multi30k": Translation,
    "multi30k_langid": LanguageID,
    "shakespeare_mlm": MaskedCharLM,
    "shakespeare_char": CharLM,
    "speech_digits": SpeechDigits,
    "shapes_detection": ShapesDetection,
    "fashion_mnist_matching": FashionMnistMatching,
    "synthetic_lm": SyntheticLM,
}


def make_dataset(data_config: Mapping[str, Any]) -> Dataset:
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


__all__ = [
    "DATASETS", "CharLM", "CopyTask", "DataError", "FashionMnist", "Dataset", "IndexedIterator", "SyntheticLM", "Translation", "data_dir", "make_dataset",
]  # fmt: skip
