"""tensorflow-datasets builders that prepare offline from local files, in ``array_record`` format.

Prepared once into the tfds directory and then read with ``as_data_source()``
(random access, no TensorFlow). Each prepared copy is named after the SHA-256 of
its source files (``src_<digest>``), so editing, truncating or replacing a
file, or pointing ``data_dir`` elsewhere, prepares a new copy instead of
silently reading a stale one, and runs can share one tfds directory. Where the tfds catalog has the same data
(``fashion_mnist``), a user with internet can use the catalog name instead;
these builders exist so that tests, CI and air-gapped machines need nothing
but the original files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from tfm.data.base import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]  # fmt: skip


def read_idx(path: str) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped or not) -> uint8 array; ``DataError`` naming what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"missing file {path!r}: expected an idx file (MNIST format, .gz)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path!r} is not a readable gzip idx file ({e})") from e
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path!r} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path!r} has {len(data)} bytes; its header {dims} needs {expected}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from the four original idx ``.gz`` files in ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the four Fashion-MNIST idx .gz files in the manual directory."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017), 28x28 grey images in 10 classes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(dl_manager.manual_dir, split) for split in IDX_FILES}

    def _generate_examples(self, folder, split):
        images_file, labels_file = IDX_FILES[split]
        images = read_idx(os.path.join(folder, images_file))
        labels = read_idx(os.path.join(folder, labels_file))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match 28x28 x N")
        for i in range(len(images)):
            yield i, {"image": images[i][..., None], "label": int(labels[i])}


def check_sources(folder: str, files: Sequence[str]) -> None:
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{folder!r} lacks {missing}; expected the files {sorted(files)} there")


def sources_digest(folder: str, files: Sequence[str]) -> str:
    """SHA-256 over the names and contents of ``files`` in ``folder`` (first 16 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def prepare(
    builder_cls: type[tfds.core.DatasetBuilder], source_dir: str, tfds_dir: str = "", files: Sequence[str] = ()
) -> tfds.core.DatasetBuilder:
    """Prepare (once per content of ``files``) into ``tfds_dir`` (default: tfds's own, ``$TFDS_DATA_DIR``
    or ~/tensorflow_datasets) and return the builder; later calls with the same files reuse the copy."""
    check_sources(source_dir, files)
    config = tfds.core.BuilderConfig(name=f"src_{sources_digest(source_dir, files)}")
    builder = builder_cls(config=config, data_dir=tfds_dir or None, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source_dir))
    return builder
