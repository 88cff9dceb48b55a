"""Detection as set prediction (DETR, Carion et al. 2020): boxes, the matching, the set loss, AP.

Boxes are ``(cx, cy, w, h)`` in ``[0, 1]`` of the image (the model's sigmoid output) and are
turned into corners ``(x0, y0, x1, y1)`` for the overlaps. The model predicts ``Q`` boxes
with ``C + 1`` class logits each (the last is "no object"); an image has up to ``M`` target
boxes (``box_mask`` marks the real ones).

1. **Matching** (section 3.1, eq. 1): per image, the one-to-one assignment of target boxes to
   queries of least total cost

       cost(q, m) = -w_class p_q(c_m) + w_L1 |b_q - b_m|_1 - w_giou GIoU(b_q, b_m)

   found by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on the host,
   through ``jax.pure_callback``; the matching carries no gradient.
2. **Set loss** (eq. 2): the cross-entropy of every query against its matched class or "no
   object" (weighted ``no_object_weight``, 0.1 in DETR), plus ``w_L1 |b - b̂|_1 + w_giou
   (1 - GIoU)`` over the matched pairs. All three terms are sums divided by the number of target
   boxes, so batches and devices add up (DETR divides the class term by its summed class weights
   instead; with few boxes per image the two differ by the small no-object weight).
3. **AP@0.5** (``average_precision``): per class, detections sorted by score are true positives
   when they overlap a not yet claimed target of that class with IoU >= 0.5; the precision is
   made monotone and averaged at 101 recall points (COCO's interpolation), then over classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


class MatchWeights(NamedTuple):
    """The weights of the matching cost and of the loss's box terms (DETR's: 1, 5, 2)."""

    label: float = 1.0
    l1: float = 5.0
    giou: float = 2.0


def cxcywh_to_xyxy(boxes: Array) -> Array:
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _area(b: Array) -> Array:
    return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def pairwise_iou(a: Array, b: Array) -> tuple[Array, Array]:
    """Corner boxes ``a [..., P, 4]``, ``b [..., M, 4]`` -> ``(IoU, union)``, each ``[..., P, M]``."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
    union = _area(a) + _area(b) - inter
    return inter / jnp.maximum(union, 1e-9), union


def generalized_iou(a: Array, b: Array) -> Array:
    """GIoU (Rezatofighi et al. 2019) of corner boxes, pairwise: ``IoU - (|E| - |A ∪ B|) / |E|`` with E the
    smallest box enclosing both; ``[..., P, 4]``, ``[..., M, 4]`` -> ``[..., P, M]`` in ``[-1, 1]``."""
    iou, union = pairwise_iou(a, b)
    a, b = a[..., :, None, :], b[..., None, :, :]
    lo, hi = jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])
    enclosing = jnp.maximum(jnp.prod(jnp.clip(hi - lo, 0), axis=-1), 1e-9)
    return iou - (enclosing - union) / enclosing


def match_cost(class_logits: Array, pred_boxes: Array, labels: Array, boxes: Array,
               weights: MatchWeights = MatchWeights()) -> Array:  # fmt: skip
    """The matching cost ``[B, Q, M]`` of every query against every target box (eq. 1's L_match)."""
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    p_label = jnp.take_along_axis(probs, jnp.broadcast_to(labels[:, None, :], probs.shape[:2] + labels.shape[1:]), -1)
    l1 = jnp.sum(jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]), axis=-1)
    giou = generalized_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(boxes))
    return -weights.label * p_label + weights.l1 * l1 - weights.giou * giou


def assign(cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Host side: ``cost [B, Q, M]``, ``mask [B, M]`` -> the query matched to each target, ``[B, M]`` (-1: none)."""
    from scipy.optimize import linear_sum_assignment

    cost, mask = np.asarray(cost, np.float64), np.asarray(mask, bool)
    # A non-finite cost (a diverged step, which the train step then refuses) must not stop the matching.
    cost = np.nan_to_num(cost, nan=1e9, posinf=1e9, neginf=-1e9)
    out = np.full(mask.shape, -1, np.int32)
    for b in range(cost.shape[0]):
        real = np.flatnonzero(mask[b])
        if real.size:
            queries, targets = linear_sum_assignment(cost[b][:, real])
            out[b, real[targets]] = queries
    return out


def hungarian_match(cost: Array, mask: Array) -> Array:
    """``assign`` inside ``jit``: ``[B, M]`` int32, the query matched to each real target (-1 for padding)."""
    if cost.shape[1] < cost.shape[2]:
        raise ValueError(f"{cost.shape[1]} queries cannot match up to {cost.shape[2]} target boxes; "
                         f"use at least as many queries as boxes per image")  # fmt: skip
    spec = jax.ShapeDtypeStruct(mask.shape, jnp.int32)
    return jax.pure_callback(assign, spec, jax.lax.stop_gradient(cost), mask, vmap_method="sequential")


def set_loss(class_logits: Array, pred_boxes: Array, labels: Array, boxes: Array, box_mask: Array,
             image_weights: Array | None = None, *, no_object_weight: float = 0.1,
             weights: MatchWeights = MatchWeights()) -> dict[str, Array]:  # fmt: skip
    """DETR's Hungarian loss as sums: ``loss_sum``, ``weight_sum`` (target boxes), ``correct`` (matched
    queries whose argmax is the target's class), and the three terms ``label_sum``, ``l1_sum``, ``giou_sum``.

    ``class_logits [B, Q, C+1]``, ``pred_boxes [B, Q, 4]``, ``labels [B, M]``, ``boxes [B, M, 4]``,
    ``box_mask [B, M]`` (1 for a real box), ``image_weights [B]`` (0 for an evaluation split's padding).
    """
    b, q, classes = class_logits.shape
    mask = box_mask.astype(jnp.float32)
    if image_weights is not None:
        mask = mask * image_weights.astype(jnp.float32)[:, None]
    matched = hungarian_match(match_cost(class_logits, pred_boxes, labels, boxes, weights), mask > 0)  # [B, M]
    real = matched >= 0
    query = jnp.where(real, matched, 0)
    # Each query's target class: its matched box's label, or "no object" (the last class).
    hit = real[:, :, None] & (query[:, :, None] == jnp.arange(q)[None, None, :])  # [B, M, Q]
    is_matched = jnp.any(hit, axis=1)
    target_class = jnp.where(is_matched, jnp.sum(hit * labels[:, :, None], axis=1), classes - 1)
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, target_class[..., None], -1)[..., 0]
    query_weight = jnp.where(is_matched, 1.0, no_object_weight)
    if image_weights is not None:
        query_weight = query_weight * image_weights.astype(jnp.float32)[:, None]
    take = lambda x: jnp.take_along_axis(x, query[:, :, None], axis=1)  # noqa: E731  [B, M, 4] of the matched
    pred = take(pred_boxes.astype(jnp.float32))
    l1 = jnp.sum(jnp.abs(pred - boxes), axis=-1)
    giou = jnp.diagonal(generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(boxes)), axis1=-2, axis2=-1)
    label_sum = jnp.sum(ce * query_weight)
    l1_sum, giou_sum = jnp.sum(l1 * mask), jnp.sum((1.0 - giou) * mask)
    predicted = jnp.take_along_axis(jnp.argmax(class_logits, -1), query, axis=1)
    correct = jnp.sum((predicted == labels) * mask)
    loss_sum = weights.label * label_sum + weights.l1 * l1_sum + weights.giou * giou_sum
    return {"loss_sum": loss_sum, "weight_sum": jnp.sum(mask), "correct": correct,
            "label_sum": label_sum, "l1_sum": l1_sum, "giou_sum": giou_sum}  # fmt: skip


def predictions(class_logits: Array, pred_boxes: Array) -> tuple[Array, Array, Array]:
    """``(scores [B, Q], labels [B, Q], boxes [B, Q, 4] corners)``: each query's most likely real class
    and its probability (DETR's post-processing; "no object" only lowers the score)."""
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
    return jnp.max(probs, -1), jnp.argmax(probs, -1), cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))


def _iou_np(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def average_precision(detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      targets: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
                      iou_threshold: float = 0.5) -> dict[str, float | list]:  # fmt: skip
    """AP at one IoU threshold, per class and its mean (over classes that have targets).

    ``detections[i] = (scores [Q], labels [Q], boxes [Q, 4])`` and ``targets[i] = (labels [M], boxes [M, 4])``
    for image ``i``, corner boxes. A detection is a true positive when its best-overlapping target of its
    class not yet claimed by a higher-scored detection has IoU >= the threshold (VOC/COCO greedy rule).
    """
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} images of detections for {len(targets)} images of targets")
    per_class = []
    for c in range(num_classes):
        scored, n_targets = [], 0
        for i, ((scores, labels, boxes), (t_labels, t_boxes)) in enumerate(zip(detections, targets)):
            n_targets += int(np.sum(np.asarray(t_labels) == c))
            for s, b in zip(np.asarray(scores)[np.asarray(labels) == c], np.asarray(boxes)[np.asarray(labels) == c]):
                scored.append((float(s), i, np.asarray(b, np.float64)))
        if n_targets == 0:
            per_class.append(float("nan"))
            continue
        scored.sort(key=lambda x: -x[0])
        claimed = {i: np.zeros(int(np.sum(np.asarray(t[0]) == c)), bool) for i, t in enumerate(targets)}
        tp = np.zeros(len(scored))
        for k, (_, i, box) in enumerate(scored):
            t_boxes = np.asarray(targets[i][1], np.float64)[np.asarray(targets[i][0]) == c]
            if len(t_boxes):
                ious = np.where(claimed[i], -1.0, _iou_np(box, t_boxes))
                j = int(np.argmax(ious))
                if ious[j] >= iou_threshold:
                    claimed[i][j], tp[k] = True, 1.0
        hits = np.cumsum(tp)
        recall = hits / n_targets
        precision = hits / np.arange(1, len(scored) + 1) if len(scored) else np.zeros(0)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(scored) else precision  # monotone
        points = np.linspace(0.0, 1.0, 101)
        at = np.searchsorted(recall, points, side="left")
        per_class.append(float(np.mean([precision[k] if k < len(precision) else 0.0 for k in at])))
    known = [a for a in per_class if not np.isnan(a)]
    return {"ap": float(np.mean(known)) if known else float("nan"), "per_class": per_class}


def detector(run: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``images [B, H, W, C]`` (as the dataset serves them) -> a trained run's ``predictions``, as NumPy."""
    from tfm import placement

    fn = jax.jit(lambda p, x: predictions(*run.model.apply({"params": p}, x)))

    def detect(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with placement.mesh_context(run.mesh, run.rules):
            return tuple(np.asarray(a) for a in fn(run.params, images))

    return detect


def evaluate(run: Any, split: str, batches: int = 0, iou_threshold: float = 0.5) -> dict:
    """``ap50`` (mean over classes), ``ap50_per_class`` and ``images`` over the split's real images
    (``batches`` of them; 0: all), every query of every image a detection."""
    ds = run.dataset
    n = ds.num_batches(split) if not batches else min(batches, ds.num_batches(split))
    detections, targets, detect = [], [], detector(run)
    for i in range(n):
        batch = ds.batch(split, i)
        scores, labels, boxes = detect(batch["inputs"])
        for r in np.flatnonzero(batch["weights"] > 0):
            real = batch["box_mask"][r] > 0
            detections.append((scores[r], labels[r], boxes[r]))
            targets.append((batch["labels"][r][real], np.asarray(cxcywh_to_xyxy(batch["boxes"][r][real]))))
    ap = average_precision(detections, targets, ds.num_classes, iou_threshold)
    key = f"ap{int(round(iou_threshold * 100))}"
    return {key: ap["ap"], f"{key}_per_class": ap["per_class"], "images": len(targets)}


__all__ = ["MatchWeights", "assign", "average_precision", "cxcywh_to_xyxy", "detector", "evaluate", "generalized_iou", "hungarian_match",
           "match_cost", "pairwise_iou", "predictions", "set_loss", "xyxy_to_cxcywh"]  # fmt: skip
