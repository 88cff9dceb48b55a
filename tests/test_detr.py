"""DETR: boxes and GIoU against their formulas, the Hungarian matching against brute force, the set loss
against NumPy, AP@0.5 against hand-counted cases, the model's positions and query symmetry, the dataset."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfm import detection, tasks
from tfm.data import DataError, make_dataset
from tfm.models import PRESETS
from tfm.models.detr import DETR, detr_tiny, sine_positions_2d
from tfm.step import init_fn, make_train_step

# Tiny shapes: compile time dominates, so compile with few XLA optimizations.
pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


def _boxes(rng, n):
    """Random corner boxes in [0, 1] with positive sides."""
    lo = rng.uniform(0, 0.7, (n, 2))
    return np.concatenate([lo, lo + rng.uniform(0.02, 0.3, (n, 2))], axis=1)


def _giou_formula(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_iou_and_giou_equal_their_formulas_pair_by_pair():
    rng = np.random.default_rng(0)
    a, b = _boxes(rng, 7), _boxes(rng, 5)
    iou, _ = detection.pairwise_iou(jnp.asarray(a), jnp.asarray(b))
    giou = detection.generalized_iou(jnp.asarray(a), jnp.asarray(b))
    for i, j in itertools.product(range(7), range(5)):
        want_iou, want_giou = _giou_formula(a[i], b[j])
        assert abs(float(iou[i, j]) - want_iou) < 1e-6 and abs(float(giou[i, j]) - want_giou) < 1e-6
    same = detection.generalized_iou(jnp.asarray(a[:1]), jnp.asarray(a[:1]))
    assert abs(float(same[0, 0]) - 1.0) < 1e-6
    far = detection.generalized_iou(jnp.array([[0.0, 0.0, 0.1, 0.1]]), jnp.array([[0.9, 0.9, 1.0, 1.0]]))
    assert -1.0 < float(far[0, 0]) < -0.9  # disjoint and far apart: close to -1
    cxcywh = detection.xyxy_to_cxcywh(jnp.asarray(a))
    assert np.allclose(detection.cxcywh_to_xyxy(cxcywh), a, atol=1e-6)


@pytest.mark.parametrize("queries,targets", [(3, 3), (5, 2), (6, 4)])
def test_hungarian_matching_equals_brute_force(queries, targets):
    rng = np.random.default_rng(queries * 10 + targets)
    cost = rng.standard_normal((4, queries, targets)).astype(np.float32)
    mask = np.ones((4, targets), bool)
    mask[1, -1] = False  # an image with one box fewer
    mask[2] = False  # an image without boxes
    mask[2, 0] = True
    got = np.asarray(jax.jit(detection.hungarian_match)(jnp.asarray(cost), jnp.asarray(mask)))
    assert np.array_equal(got, detection.assign(cost, mask))
    for b in range(4):
        real = np.flatnonzero(mask[b])
        best = min(sum(cost[b, q, m] for q, m in zip(perm, real))
                   for perm in itertools.permutations(range(queries), len(real)))  # fmt: skip
        assert np.all(got[b][~mask[b]] == -1) and len(set(got[b][real])) == len(real)
        assert abs(sum(cost[b, got[b, m], m] for m in real) - best) < 1e-5


def test_too_few_queries_are_refused():
    with pytest.raises(ValueError, match="2 queries cannot match up to 3 target boxes"):
        detection.hungarian_match(jnp.zeros((1, 2, 3)), jnp.ones((1, 3), bool))


def _loss_numpy(logits, pred, labels, boxes, mask, no_object=0.1):
    """DETR's set loss by brute force: the matching of least cost, then the three terms, per target box."""
    w = detection.MatchWeights()
    total, n_boxes = 0.0, mask.sum()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    logp = np.log(probs)
    corners = lambda x: np.concatenate([x[:2] - x[2:] / 2, x[:2] + x[2:] / 2])  # noqa: E731
    for b in range(len(logits)):
        real = np.flatnonzero(mask[b])
        q = logits.shape[1]

        def cost(qi, m):
            return (-w.label * probs[b, qi, labels[b, m]] + w.l1 * np.abs(pred[b, qi] - boxes[b, m]).sum()
                    - w.giou * _giou_formula(corners(pred[b, qi]), corners(boxes[b, m]))[1])  # fmt: skip

        perm = min(itertools.permutations(range(q), len(real)), key=lambda p: sum(cost(qi, m) for qi, m in zip(p, real)))
        target = np.full(q, logits.shape[2] - 1)
        for qi, m in zip(perm, real):
            target[qi] = labels[b, m]
            total += w.l1 * np.abs(pred[b, qi] - boxes[b, m]).sum()
            total += w.giou * (1 - _giou_formula(corners(pred[b, qi]), corners(boxes[b, m]))[1])
        weight = np.where(target == logits.shape[2] - 1, no_object, 1.0)
        total += w.label * np.sum(-logp[b, np.arange(q), target] * weight)
    return total / n_boxes


def test_the_set_loss_equals_a_numpy_computation():
    rng = np.random.default_rng(3)
    b, q, m, c = 3, 5, 3, 4
    logits = rng.standard_normal((b, q, c + 1)).astype(np.float32)
    pred = np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)), rng.uniform(0.05, 0.4, (b, q, 2))], -1).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, m, 2)), rng.uniform(0.05, 0.4, (b, m, 2))], -1).astype(np.float32)
    labels = rng.integers(0, c, (b, m)).astype(np.int32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
    sums = detection.set_loss(*(jnp.asarray(x) for x in (logits, pred, labels, boxes, mask)))
    assert float(sums["weight_sum"]) == 6.0
    got = float(sums["loss_sum"] / sums["weight_sum"])
    assert abs(got - _loss_numpy(logits, pred, labels, boxes, mask)) < 1e-4
    # A padding image (weight 0) changes nothing.
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    pad = lambda x: jnp.concatenate([jnp.asarray(x), jnp.asarray(x[:1])])  # noqa: E731
    padded = detection.set_loss(*(pad(x) for x in (logits, pred, labels, boxes, mask)), weights)
    assert abs(float(padded["loss_sum"]) - float(sums["loss_sum"])) < 1e-4 and float(padded["weight_sum"]) == 6.0


def test_average_precision_on_hand_counted_cases():
    gt = [(np.array([0, 0]), np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]))]
    perfect = [(np.array([0.9, 0.8]), np.array([0, 0]), gt[0][1].copy())]
    assert detection.average_precision(perfect, gt, num_classes=1)["ap"] == 1.0
    # TP 0.9, a false positive 0.8 (a duplicate of the first box), TP 0.7: precision 1 up to recall 0.5,
    # then 2/3 up to recall 1; 101-point interpolation: (51 x 1 + 50 x 2/3) / 101.
    dets = [(np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]),
             np.array([[0, 0, 0.5, 0.5], [0.01, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]))]  # fmt: skip
    assert abs(detection.average_precision(dets, gt, num_classes=1)["ap"] - (51 + 50 * 2 / 3) / 101) < 1e-12
    # The wrong class, or IoU below 0.5, is a miss; a class without targets is left out of the mean.
    wrong = [(np.array([0.9, 0.9]), np.array([1, 0]), np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 0.7, 0.7]]))]
    result = detection.average_precision(wrong, gt, num_classes=2)
    assert result["ap"] == 0.0 and np.isnan(result["per_class"][1])


def test_sine_positions_equal_detrs_formula():
    torch = pytest.importorskip("torch")
    h, w, d = 3, 5, 16
    # DETR's PositionEmbeddingSine(num_pos_feats=d/2, normalize=True) on an all-valid mask, as written there.
    not_mask = torch.ones(1, h, w)
    y_embed, x_embed = not_mask.cumsum(1, dtype=torch.float32), not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * np.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(d // 2, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / (d // 2))
    pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    want = torch.cat((pos_y, pos_x), dim=3)[0].reshape(h * w, d).numpy()
    assert np.max(np.abs(sine_positions_2d(h, w, d) - want)) < 1e-5


def test_detr_shapes_gradients_and_query_symmetry():
    model = DETR(detr_tiny)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = nn.unbox(model.init(jax.random.key(0), images)["params"])
    logits, boxes = model.apply({"params": params}, images)
    assert logits.shape == (2, 6, 7) and boxes.shape == (2, 6, 4) and logits.dtype == jnp.float32
    assert float(boxes.min()) > 0 and float(boxes.max()) < 1
    # The decoder has no positions of its own: permuting the object queries permutes the predictions.
    perm = np.array([3, 0, 5, 1, 2, 4])
    swapped = {**params, "queries": params["queries"][perm]}
    logits2, boxes2 = model.apply({"params": swapped}, images)
    assert np.allclose(logits2, logits[:, perm], atol=1e-5) and np.allclose(boxes2, boxes[:, perm], atol=1e-5)
    batch = {"labels": jnp.array([[0, 2], [1, 0]]), "boxes": jnp.full((2, 2, 4), 0.3), "box_mask": jnp.array([[1.0, 1], [1, 0]])}
    grads = jax.grad(lambda p: tasks.get_task("detect").loss_sums(model.apply({"params": p}, images), batch)["loss_sum"])(params)
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert all(n > 0 for n in norms.values()), [k for k, n in norms.items() if n == 0]
    with pytest.raises(ValueError, match=r"images must be \[B, 32, 32, 3\]"):
        model.apply({"params": params}, jnp.zeros((1, 28, 28, 3)))


def test_the_pure_step_memorises_one_batch():
    preset = PRESETS["detr_tiny"]
    model, task = DETR(preset.config), tasks.get_task("detect")
    ds = make_dataset({"name": "shapes_detection", "batch_size": 4, "image_size": 32, "max_objects": 2})
    batch = {k: jnp.asarray(v) for k, v in ds.batch("train", 0).items()}
    tx = optax.adam(3e-3)
    state = nn.unbox(init_fn(model, task, tx, batch)(jax.random.key(0)))
    step = jax.jit(make_train_step(model, task, tx, optax.constant_schedule(3e-3)))
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_the_shapes_dataset_is_deterministic_and_padded():
    ds = make_dataset({"name": "shapes_detection", "batch_size": 4, "eval_size": 6})
    a, b = ds.batch("train", 3), ds.batch("train", 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    small = make_dataset({"name": "shapes_detection", "batch_size": 2, "eval_size": 6})
    assert np.array_equal(small.batch("train", 7)["inputs"], a["inputs"][2:])  # image j = k B + i, whatever B
    assert not np.array_equal(ds.batch("validation", 0)["inputs"], ds.batch("test", 0)["inputs"])
    last = ds.batch("test", 1)
    assert last["weights"].tolist() == [1, 1, 0, 0] and ds.num_batches("test") == 2
    real = a["box_mask"] > 0
    assert real[:, 0].all() and (a["labels"][real] < ds.num_classes).all()
    cx, cy, w, h = np.moveaxis(a["boxes"][real], -1, 0)
    assert (w > 0).all() and (h > 0).all() and (cx - w / 2 >= 0).all() and (cy + h / 2 <= 1 + 1e-6).all()
    assert -1.0 <= a["inputs"].min() and a["inputs"].max() <= 1.0
    with pytest.raises(DataError, match="data.min_objects=3, data.max_objects=2"):
        make_dataset({"name": "shapes_detection", "batch_size": 4, "min_objects": 3, "max_objects": 2})


def test_the_set_loss_of_a_batch_sharded_on_8_devices_equals_the_single_device_loss():
    """The matching runs on the host for the whole global batch; sharding the batch changes nothing."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    from jax.sharding import NamedSharding, PartitionSpec

    model, task = DETR(detr_tiny), tasks.get_task("detect")
    ds = make_dataset({"name": "shapes_detection", "batch_size": 16, "image_size": 32, "max_objects": 2})
    batch = {k: jnp.asarray(v) for k, v in ds.batch("train", 1).items()}
    params = nn.unbox(model.init(jax.random.key(1), batch["inputs"])["params"])

    def loss(params, batch):
        sums = task.loss_sums(model.apply({"params": params}, batch["inputs"]), batch)
        return sums["loss_sum"] / sums["weight_sum"]

    single, single_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert len(sharded_batch["inputs"].sharding.device_set) == 8
    sharded, sharded_grads = jax.jit(jax.value_and_grad(loss))(params, sharded_batch)
    assert float(sharded) == pytest.approx(float(single), rel=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(single_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
