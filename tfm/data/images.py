"""Fashion-MNIST for image classification, through a tfds builder and grain.

Splits: ``validation`` is 5,000 images held out of the official 60,000
training images (the last 5,000 in the prepared files, whose order tfds fixes
by a deterministic shuffle of the keys), ``train`` the other 55,000, ``test``
the official 10,000. Training batches come from
``grain.MapDataset.source(...).shuffle(seed).repeat()``, cut into batches of
B: random access, so training batch ``i`` is a pure function of ``(seed, i)``
and the checkpointed iterator position is just ``i``; every epoch is
reshuffled. A split's records are decoded once, in order, at its first access, and stay in
memory (``RecordCache``, 47 MB for the training split; each process of a multi-process run
holds them all and cuts the rows of its part of each batch, ``local_batch``): read one by one in
a shuffled order, decoding cost ~0.25 ms a record, which made the recipe's first epoch ~14 s
longer; a pass in order takes ~2.5 s for the training split.
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
    """The decoded ``image`` and ``label`` of records ``start .. stop-1`` of a tfds source, read at the first access.

    The records are read in order, ``chunk`` at a time (the source's ``__getitems__`` where it has one): an
    array_record file decompresses a chunk of records at a time, so a pass in order costs ~40 us a Fashion-MNIST
    record where reading records one by one in a shuffled order costs ~250 us. Every later access reads memory.
    """

    def __init__(self, source, start: int = 0, stop: int | None = None, chunk: int = 4096):
        self.source, self.start, self.chunk = source, start, chunk
        self.stop = len(source) if stop is None else stop
        self.images: np.ndarray | None = None  # [N, H, W, C] uint8
        self.labels: np.ndarray | None = None  # [N]

    def _load(self) -> None:
        read = getattr(self.source, "__getitems__", None)
        images, labels = [], []
        for a in range(self.start, self.stop, self.chunk):
            ids = list(range(a, min(a + self.chunk, self.stop)))
            for record in read(ids) if read is not None else (self.source[i] for i in ids):
                images.append(np.asarray(record["image"]))
                labels.append(record["label"])
        self.images, self.labels = np.stack(images), np.asarray(labels, np.int64)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``ids [n]`` (indices into the records ``start .. stop-1``) -> ``(images [n, H, W, C], labels [n])``."""
        if self.images is None:
            self._load()
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
        self._cache = {
            "train": RecordCache(sources["train"], 0, n - VALIDATION_SIZE),
            "validation": RecordCache(sources["train"], n - VALIDATION_SIZE, n),
            "test": RecordCache(sources["test"]),
        }

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
