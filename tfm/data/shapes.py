"""Coloured shapes on noise, for detection (``shapes_detection``, task ``detect``); needs no files.

Each image holds ``min_objects`` to ``max_objects`` filled rectangles and ellipses in one of three
colours (red, green, blue: class = 3 x shape + colour, so 6 classes) on a noisy grey background.
Sides are 15-45 % of the image; a new shape may overlap earlier ones by at most ``max_overlap``
IoU, so every box stays visible. The colours are jittered and the background and each shape get
pixel noise, so neither the colour nor the edge of a shape is a constant.

Image ``j`` of a split is a pure function of ``(seed, split, j)``: the training stream draws image
``i`` of batch ``k`` as ``j = k · B + i`` (endless, never repeated), ``validation`` and ``test``
are ``eval_size`` images each (other draws), read in order and padded with zero-weight rows.

Batches: ``inputs [B, S, S, 3]`` float32 in about ``[-1, 1]``, ``boxes [B, M, 4]`` as ``(cx, cy, w, h)``
in ``[0, 1]``, ``labels [B, M]`` int32, ``box_mask [B, M]`` (1 for a real box) and ``weights [B]``.
"""

from __future__ import annotations

import numpy as np

from tfm.data.base import DataError, RowReadingDataset

SHAPES = ("rectangle", "ellipse")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95)}
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def _iou(a, b) -> float:
    lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    area = lambda x: float(np.prod(x[2:] - x[:2]))  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def draw_image(rng: np.random.Generator, size: int, min_objects: int, max_objects: int,
               max_overlap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``(image [S, S, 3] float32 in [0, 1], labels [n], corner boxes [n, 4] in pixels)``."""
    image = np.clip(0.5 + rng.uniform(-0.15, 0.15) + 0.08 * rng.standard_normal((size, size, 3)), 0, 1)
    n = int(rng.integers(min_objects, max_objects + 1))
    labels, boxes = [], []
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    while len(labels) < n:
        for _ in range(50):  # a place that does not cover an earlier shape too much
            w, h = rng.uniform(0.15, 0.45, 2) * size
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if all(_iou(box, b) <= max_overlap for b in boxes):
                break
        else:
            break  # crowded: keep the shapes drawn so far (at least one, since the first always fits)
        shape, colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
        if SHAPES[shape] == "rectangle":
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        else:
            inside = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
        rgb = np.clip(np.array(list(COLOURS.values())[colour]) + rng.uniform(-0.1, 0.1, 3), 0, 1)
        image[inside] = np.clip(rgb + 0.05 * rng.standard_normal((int(inside.sum()), 3)), 0, 1)
        labels.append(shape * len(COLOURS) + colour)
        boxes.append(box)
    return image.astype(np.float32), np.array(labels, np.int32), np.array(boxes, np.float32).reshape(-1, 4)


class ShapesDetection(RowReadingDataset):
    """Synthetic detection: rectangles and ellipses in three colours (``shapes_detection``, task ``detect``)."""

    task = "detect"
    SPLITS = tuple(SPLIT_IDS)
    OPTIONS = dict(image_size=64, min_objects=1, max_objects=4, max_overlap=0.1, eval_size=500, seed=0)

    def __init__(self, *, batch_size, image_size, min_objects, max_objects, max_overlap, eval_size, seed):
        if not 1 <= min_objects <= max_objects:
            raise DataError(f"data.min_objects={min_objects}, data.max_objects={max_objects}: need 1 <= min <= max")
        if image_size < 16 or eval_size < 1:
            raise DataError(f"data.image_size={image_size}, data.eval_size={eval_size}: need >= 16 px and >= 1 image")
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.min_objects, self.max_objects, self.max_overlap = min_objects, max_objects, max_overlap
        self.eval_size, self.num_classes, self.class_names = eval_size, len(CLASS_NAMES), CLASS_NAMES

    def example(self, split: str, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ``j`` of ``split``: ``(image [S, S, 3] in [0, 1], labels [n], corner boxes [n, 4] in [0, 1])``."""
        if split not in SPLIT_IDS:
            raise DataError(f"split {split!r}: shapes_detection has {list(SPLIT_IDS)}")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], j])
        image, labels, boxes = draw_image(rng, self.image_size, self.min_objects, self.max_objects, self.max_overlap)
        return image, labels, boxes / self.image_size

    def num_batches(self, split: str, batch_size: int | None = None) -> int:
        return -(-self.eval_size // (batch_size or self.batch_size))

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        m, s = self.max_objects, self.image_size
        out = {"inputs": np.zeros((len(rows), s, s, 3), np.float32), "boxes": np.zeros((len(rows), m, 4), np.float32),
               "labels": np.zeros((len(rows), m), np.int32), "box_mask": np.zeros((len(rows), m), np.float32),
               "weights": np.zeros((len(rows),), np.float32)}  # fmt: skip
        for r, row in enumerate(rows):
            j = index * b + row
            if split != "train" and j >= self.eval_size:
                j = 0  # padding: a real image, weighted 0
            else:
                out["weights"][r] = 1.0
            image, labels, boxes = self.example(split, j)
            x0, y0, x1, y1 = boxes.T
            out["inputs"][r] = 2.0 * image - 1.0
            out["boxes"][r, : len(labels)] = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
            out["labels"][r, : len(labels)], out["box_mask"][r, : len(labels)] = labels, 1.0
        return out


__all__ = ["CLASS_NAMES", "COLOURS", "SHAPES", "ShapesDetection", "draw_image"]
