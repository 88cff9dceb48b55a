"""Fashion-MNIST for image classification, through a tfds builder and grain.

Splits: ``validation`` is 5,000 images held out of the official 60,000
training images (the last 5,000 in the prepared files, whose order tfds fixes
by a deterministic shuffle of the keys), ``train`` the other 55,000, ``test``
the official 10,000. Training batches come from
``grain.MapDataset.source(...).shuffle(seed).repeat()``, cut into batches of
B: random access, so training batch ``i`` is a pure function of ``(seed, i)``
and the checkpointed iterator position is just ``i``; every epoch is
reshuffled. A process of a multi-process run reads only the records of its
rows of each batch (``local_batch``). Decoded records stay in memory after their first read
(``RecordCache``, 47 MB for the training split): decoding costs ~0.2 ms a record, which made
the recipe's step 116-119 ms instead of 101-106 ms; every later epoch reads memory instead.
Evaluation splits are read once in order; the last batch is padded with
zero-weight rows so every example counts exactly once.

``source="local"`` prepares from the idx files in ``<data_dir>/<path>``;
``source="catalog"`` uses tfds's ``fashion_mnist`` (downloads where there is internet).
"""

from __future__ import annotations

import grain
import numpy as np

from tfm.data.base import DataError, RowReadingDataset, local_data
from tfm.data.base import data_dir as data_dir_
from tfm.data.builders import IDX_FILES, FashionMnistIdx, prepare

# Per-pixel statistics of the Fashion-MNIST training images (over [0, 1] values).
MEAN, STD = 0.2860, 0.3530
VALIDATION_SIZE = 5000


class RecordCache:
    """The decoded ``image`` and ``label`` of a grain source's records, kept after their first read."""

    def __init__(self, source: grain.MapDataset):
        self.source = source
        self.images: np.ndarray | None = None  # [N, H, W, C] uint8, allocated on the first read
        self.labels = np.zeros(len(source), np.int64)
        self.have = np.zeros(len(source), bool)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``ids [n]`` (indices into the source) -> ``(images [n, H, W, C], labels [n])``."""
        for i in np.unique(ids[~self.have[ids]]):
            record = self.source[int(i)]
            if self.images is None:
                self.images = np.zeros((len(self.source), *np.shape(record["image"])), np.asarray(record["image"]).dtype)
            self.images[i], self.labels[i], self.have[i] = record["image"], record["label"], True
        return self.images[ids], self.labels[ids]


class FashionMnist(RowReadingDataset):
    """Fashion-MNIST image classification (``fashion_mnist``, task ``classify``): 28x28 images, 10 classes.

    Images normalised by the training statistics; training batches get random left-right flips (``flip``)
    and random crops of the zero-padded image (``crop_padding`` > 0).
    """

    task = "classify"
    SPLITS = ("train", "validation", "test")
    OPTIONS = dict(data_dir="", path="fashion_mnist", tfds_dir="", source="local", flip=True, crop_padding=0, seed=0)

    def __init__(self, *, batch_size, data_dir, path, tfds_dir, source, flip, crop_padding, seed):
        import tensorflow_datasets as tfds

        if source == "local":
            folder = local_data(data_dir_(data_dir), path)
            files = [f for pair in IDX_FILES.values() for f in pair]
            builder = prepare(FashionMnistIdx, folder, tfds_dir, files)
        elif source == "catalog":
            builder = tfds.builder("fashion_mnist", data_dir=tfds_dir or None, file_format="array_record")
            builder.download_and_prepare()
        else:
            raise DataError(f"data.source={source!r}: choose 'local' or 'catalog'")
        sources = builder.as_data_source()
        train = grain.MapDataset.source(sources["train"])
        n = len(train)
        self.sources = {
            "train": train[: n - VALIDATION_SIZE],
            "validation": train[n - VALIDATION_SIZE :],
            "test": grain.MapDataset.source(sources["test"]),
        }
        self.num_classes = 10
        if crop_padding < 0:
            raise DataError(f"data.crop_padding={crop_padding}: must be >= 0")
        self.batch_size, self.flip, self.crop_padding, self.seed = batch_size, flip, crop_padding, seed
        # Training example j of the endless stream is record _train_order[j] of the training split
        # (the order of sources["train"].shuffle(seed).repeat()); batch i is examples i*B .. i*B+B-1.
        self._train_order = grain.MapDataset.range(len(self.sources["train"])).shuffle(seed=seed).repeat()
        self._cache = {split: RecordCache(src) for split, src in self.sources.items()}

    def num_batches(self, split: str, batch_size: int | None = None) -> int:
        b = batch_size or self.batch_size
        return -(-len(self.sources[split]) // b)

    def _prepare(self, images, labels, weights):
        x = (images.astype(np.float32) / 255.0 - MEAN) / STD
        return {"inputs": x, "labels": labels.astype(np.int32), "weights": weights.astype(np.float32)}

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        if split == "train" and b == self.batch_size:
            images, labels = self._cache[split].get(np.array([self._train_order[index * b + r] for r in rows]))
            # Augmentation drawn for the whole batch from (seed, index): reproducible, and the
            # same for a row whichever process reads it.
            rng = np.random.default_rng([self.seed, 7, index])
            if self.flip:  # left-right flips
                flip = (rng.random(b) < 0.5)[list(rows)]
                images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            if self.crop_padding:  # random crops of the zero-padded image: shifts of up to +-p pixels
                p, (h, w) = self.crop_padding, images.shape[1:3]
                offsets = rng.integers(0, 2 * p + 1, size=(b, 2))[list(rows)]
                padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
                images = np.stack([padded[i, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])
            return self._prepare(images, labels, np.ones(len(labels)))
        if split not in self.sources:
            raise DataError(f"split {split!r}: Fashion-MNIST has {list(self.SPLITS)}")
        src = self.sources[split]
        # One pass in order; wraps around past the end with zero weights.
        idx = [index * b + j for j in rows]
        weights = np.array([i < len(src) for i in idx], np.float32)
        images, labels = self._cache[split].get(np.array(idx) % len(src))
        return self._prepare(images, labels, weights)
