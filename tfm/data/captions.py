"""Fashion-MNIST images paired with captions: for CLIP (task ``contrastive``), and as caption
matching for the fusion model (``FashionMnistMatching``, task ``multimodal``).

Each image's caption is a template filled with its class name ("a photo of a sneaker"). Training
draws the template per row from ``TRAIN_TEMPLATES`` with ``(seed, batch index)``, so a batch is
still a pure function of its index; evaluation splits cycle through them in order. The
``ZERO_SHOT_TEMPLATES`` never appear in training: zero-shot classification embeds each class
name with them and assigns an image to the nearest class (``tfm.zero_shot``). They recombine
words that training has seen, so every word has a trained embedding.

Captions are word-level: ``0`` pads, ``1`` is EOT (where the text tower reads its feature), the
words of every template and class name follow in a fixed order. Batches hold the image keys of
``fashion_mnist`` (``inputs``, ``labels``, ``weights``) and ``tokens [B, max_len]``.
"""

from __future__ import annotations

import numpy as np

from tfm.data.base import DataError
from tfm.data.images import FashionMnist

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TRAIN_TEMPLATES = (
    "a photo of a {}", "a picture of the {}", "an image of a {}", "a low resolution photo of the {}",
    "a black and white picture of a {}", "a {} on a plain background", "a close up photo of a {}",
    "the {} in a picture", "a small image of the {}", "a centered photo of a {}",
)  # fmt: skip
ZERO_SHOT_TEMPLATES = (
    "a picture of a {}", "the photo of the {}", "a close up picture of the {}", "a black and white image of the {}",
    "a small photo of a {}",
)  # fmt: skip
PAD, EOT = 0, 1


def _vocabulary() -> dict[str, int]:
    words: dict[str, int] = {}
    for text in (*TRAIN_TEMPLATES, *ZERO_SHOT_TEMPLATES, *CLASS_NAMES):
        for word in text.replace("{}", " ").split():
            words.setdefault(word, len(words) + 2)
    return words


class FashionMnistCaptions(FashionMnist):
    """Fashion-MNIST with a caption per image (``fashion_mnist_captions``, task ``contrastive``)."""

    task = "contrastive"
    OPTIONS = dict(FashionMnist.OPTIONS, max_len=16)

    def __init__(self, *, max_len, **options):
        super().__init__(**options)
        self.vocab = _vocabulary()
        self.words = {i: w for w, i in self.vocab.items()}
        self.vocab_size, self.max_len, self.eot_id = len(self.vocab) + 2, max_len, EOT
        longest = max(len(self.encode(t.format(c))) for t in (*TRAIN_TEMPLATES, *ZERO_SHOT_TEMPLATES) for c in CLASS_NAMES)
        if longest > max_len:
            raise DataError(f"data.max_len={max_len}: the longest caption takes {longest} tokens with its EOT")

    def encode(self, text: str) -> np.ndarray:
        """Words -> ids, with EOT at the end (an unknown word is a ``DataError`` naming it)."""
        unknown = [w for w in text.split() if w not in self.vocab]
        if unknown:
            raise DataError(f"caption word {unknown[0]!r} is not in the vocabulary of {len(self.vocab)} words")
        return np.array([self.vocab[w] for w in text.split()] + [EOT], np.int32)

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) > EOT)

    def captions(self, texts) -> np.ndarray:
        """``[N, max_len]`` ids of ``texts``, EOT-terminated and padded."""
        out = np.full((len(texts), self.max_len), PAD, np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = ids
        return out

    def class_prompts(self) -> np.ndarray:
        """``[classes, templates, max_len]``: every class name in every zero-shot template."""
        return np.stack([self.captions([t.format(c) for t in ZERO_SHOT_TEMPLATES]) for c in CLASS_NAMES])

    def templates(self, split: str, index: int, b: int, rows: range) -> np.ndarray:
        """The template of each row: drawn from ``(seed, index)`` in training, cycled in evaluation."""
        if split == "train" and b == self.batch_size:
            template = np.random.default_rng([self.seed, 13, index]).integers(len(TRAIN_TEMPLATES), size=b)[list(rows)]
        else:
            template = np.array([(index * b + r) % len(TRAIN_TEMPLATES) for r in rows])
        return template

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        batch = super().read(split, index, b, rows)
        template = self.templates(split, index, b, rows)
        texts = [TRAIN_TEMPLATES[t].format(CLASS_NAMES[c]) for t, c in zip(template, batch["labels"])]
        return {**batch, "tokens": self.captions(texts)}


class FashionMnistMatching(FashionMnistCaptions):
    """Does the caption describe the image? (``fashion_mnist_matching``, task ``multimodal``).

    Half the rows keep their image's caption (label 1), the others get the caption of another
    class in the same template (label 0): only the image and the text together decide. Training
    draws which rows and which class from ``(seed, batch index)``; evaluation alternates rows and
    cycles the classes. Batches: ``images [B, 28, 28, 1]``, ``text [B, max_len]``, ``labels [B]``
    (1: match), ``classes [B]`` (the image's class) and ``weights [B]``.
    """

    task = "multimodal"
    num_classes = 2

    def read(self, split: str, index: int, b: int, rows: range) -> dict[str, np.ndarray]:
        batch = FashionMnist.read(self, split, index, b, rows)
        classes, template = batch["labels"], self.templates(split, index, b, rows)
        if split == "train" and b == self.batch_size:
            rng = np.random.default_rng([self.seed, 17, index])
            match, shift = rng.random(b)[list(rows)] < 0.5, rng.integers(1, len(CLASS_NAMES), b)[list(rows)]
        else:
            j = np.array([index * b + r for r in rows])
            match, shift = j % 2 == 0, 1 + (j // 2) % (len(CLASS_NAMES) - 1)
        named = np.where(match, classes, (classes + shift) % len(CLASS_NAMES))
        texts = [TRAIN_TEMPLATES[t].format(CLASS_NAMES[c]) for t, c in zip(template, named)]
        return {"images": batch["inputs"], "text": self.captions(texts), "labels": match.astype(np.int32),
                "classes": classes, "weights": batch["weights"]}  # fmt: skip
