"""Zero-shot classification and image–text retrieval for a contrastive (CLIP) run.

* **Zero-shot accuracy** (Radford et al. 2021, §3.1.2): each class is the mean of the normalised
  text features of its name in every zero-shot template (``dataset.class_prompts()``, prompt
  ensembling), normalised again; an image belongs to the class whose feature is nearest.
* **Retrieval recall@1** over the whole split, both ways: an image's nearest caption among all
  the split's captions is a hit when it reads the same as the image's own caption (captions
  made from templates repeat), and a caption's nearest image is a hit when that image's caption
  reads the same.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from tfm import placement


def _features(run: Any, split: str, batches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image features, caption features, caption ids and labels of the split's real rows."""
    image_fn = jax.jit(lambda p, x: run.model.apply({"params": p}, x, method="encode_image"))
    text_fn = jax.jit(lambda p, t: run.model.apply({"params": p}, t, method="encode_text"))
    ds = run.dataset
    n = ds.num_batches(split) if not batches else min(batches, ds.num_batches(split))
    images, texts, tokens, labels = [], [], [], []
    with placement.mesh_context(run.mesh, run.rules):
        for i in range(n):
            batch = ds.batch(split, i)
            real = batch["weights"] > 0
            images.append(np.asarray(image_fn(run.params, batch["inputs"]))[real])
            texts.append(np.asarray(text_fn(run.params, batch["tokens"]))[real])
            tokens.append(batch["tokens"][real])
            labels.append(batch["labels"][real])
    return tuple(np.concatenate(x) for x in (images, texts, tokens, labels))


def class_features(run: Any, prompts: np.ndarray) -> np.ndarray:
    """``[classes, E]``: the prompt-ensembled text feature of each class from ``prompts [K, P, T]``."""
    k, p, t = prompts.shape
    with placement.mesh_context(run.mesh, run.rules):
        feats = np.asarray(jax.jit(lambda pr, x: run.model.apply({"params": pr}, x, method="encode_text"))(
            run.params, prompts.reshape(k * p, t))).reshape(k, p, -1).mean(axis=1)  # fmt: skip
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def _recall_at_1(queries: np.ndarray, keys: np.ndarray, same: np.ndarray, chunk: int = 1024) -> float:
    """Fraction of queries whose nearest key ``j`` has ``same[query_caption_id] == same[j]``."""
    hits = 0
    for start in range(0, len(queries), chunk):
        nearest = np.argmax(queries[start : start + chunk] @ keys.T, axis=1)
        hits += int(np.sum(same[nearest] == same[start : start + chunk]))
    return hits / len(queries)


def evaluate(run: Any, split: str, batches: int = 0) -> dict:
    """``zero_shot_accuracy``, ``image_to_text_recall@1``, ``text_to_image_recall@1`` and the counts."""
    images, texts, tokens, labels = _features(run, split, batches)
    prompts = run.dataset.class_prompts()
    classes = class_features(run, prompts)
    accuracy = float(np.mean(np.argmax(images @ classes.T, axis=1) == labels))
    caption_id = np.unique(tokens, axis=0, return_inverse=True)[1].reshape(-1)  # equal captions, equal ids
    return {
        "zero_shot_accuracy": accuracy,
        "zero_shot_templates": int(prompts.shape[1]),
        "image_to_text_recall@1": _recall_at_1(images, texts, caption_id),
        "text_to_image_recall@1": _recall_at_1(texts, images, caption_id),
        "examples": int(len(labels)),
    }


__all__ = ["class_features", "evaluate"]
