"""CLIP: the published parameter count, the towers' pooling and normalisation, the logit scale,
and the symmetric contrastive loss against NumPy, on one device and over a batch sharded on 8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from tfm import tasks
from tfm.models import PRESETS
from tfm.models.clip import CLIP, clip_tiny

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


def test_clip_vit_b32_has_the_published_parameter_count():
    assert PRESETS["clip_vit_b32"].num_params() == 151_277_313  # openai/clip-vit-base-patch32


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(b, 28, 28, 1)).astype(np.float32)
    tokens = rng.integers(2, 64, size=(b, 10)).astype(np.int32)
    tokens[np.arange(b), rng.integers(3, 10, size=b)] = clip_tiny.eot_id
    return {"inputs": jnp.asarray(images), "tokens": jnp.asarray(tokens)}


def _model():
    model = CLIP(clip_tiny)
    batch = _batch()
    return model, {"params": random_params(model, batch["inputs"], batch["tokens"])}, batch


def test_features_are_unit_vectors_and_the_scale_starts_at_1_over_0_07():
    model, params, batch = _model()
    image, text, scale = model.apply(params, batch["inputs"], batch["tokens"])
    assert image.shape == text.shape == (8, 32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text), axis=-1), 1.0, rtol=1e-5)
    init = CLIP(clip_tiny).init(jax.random.key(0), batch["inputs"], batch["tokens"])
    _, _, start = CLIP(clip_tiny).apply(init, batch["inputs"], batch["tokens"])
    assert float(start) == pytest.approx(1 / 0.07, rel=1e-5)
    big = jax.tree.map(lambda x: x, params)
    big["params"]["logit_scale"] = jnp.asarray(10.0)
    assert float(model.apply(big, batch["inputs"], batch["tokens"])[2]) == 100.0  # clipped


def test_the_text_feature_is_read_at_the_first_eot_and_ignores_what_follows():
    model, params, batch = _model()
    tokens = np.asarray(batch["tokens"]).copy()
    eot = np.argmax(tokens == clip_tiny.eot_id, axis=1)
    changed = tokens.copy()
    for row, at in enumerate(eot):
        changed[row, at + 1 :] = 5  # after the EOT: causal attention never lets it back
    a = model.apply(params, jnp.asarray(tokens), method="encode_text")
    b = model.apply(params, jnp.asarray(changed), method="encode_text")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    changed[0, 0] = 7 if tokens[0, 0] != 7 else 8  # before it: the feature moves
    c = model.apply(params, jnp.asarray(changed), method="encode_text")
    assert np.abs(np.asarray(c[0]) - np.asarray(a[0])).max() > 1e-4


def _numpy_loss(image, text, scale):
    logits = scale * image @ text.T

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return (ce(logits) + ce(logits.T)) / 2, logits


def test_the_contrastive_loss_is_the_symmetric_cross_entropy():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(6, 4)).astype(np.float64)
    text = rng.normal(size=(6, 4)).astype(np.float64)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    task = tasks.get_task("contrastive")
    logits = task.logits((jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(20.0)))
    sums = task.loss_sums(logits, {"inputs": jnp.zeros((6, 1))})
    want, want_logits = _numpy_loss(image, text, 20.0)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5)
    assert float(sums["loss_sum"] / sums["weight_sum"]) == pytest.approx(want, rel=1e-5)
    hits = (np.argmax(want_logits, 1) == np.arange(6)).sum() + (np.argmax(want_logits, 0) == np.arange(6)).sum()
    assert float(sums["correct"]) == hits / 2 and float(sums["weight_sum"]) == 6


def test_the_loss_over_a_batch_sharded_on_8_devices_equals_the_single_device_loss():
    """Every device's images are contrasted with every device's texts: the gathered [B, B] logits."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    from jax.sharding import NamedSharding, PartitionSpec

    model, params, batch = _model()
    batch = _batch(16, seed=2)
    task = tasks.get_task("contrastive")

    def loss(params, batch):
        args, _ = task.model_args(batch)
        sums = task.loss_sums(task.logits(model.apply(params, *args)), batch)
        return sums["loss_sum"] / sums["weight_sum"], task.logits(model.apply(params, *args))

    single, single_logits = jax.jit(loss)(params, batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded_batch = jax.device_put(batch, rows)
    assert len(sharded_batch["inputs"].sharding.device_set) == 8
    sharded, sharded_logits = jax.jit(loss)(params, sharded_batch)
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(single_logits), atol=1e-5)
    assert float(sharded) == pytest.approx(float(single), rel=1e-6)
    # ... and it is not the mean of per-device losses over 2 examples each (what a per-shard loss would give).
    per_shard = np.mean([_numpy_loss(*(np.asarray(x) for x in model.apply(params, batch["inputs"][i : i + 2],
                                                                           batch["tokens"][i : i + 2])))[0]
                         for i in range(0, 16, 2)])  # fmt: skip
    assert abs(per_shard - float(single)) > 1e-3


def test_a_contrastive_batch_is_not_split_into_micro_batches():
    from tfm.step import make_train_step

    with pytest.raises(ValueError, match="contrasts each example with the rest of its batch"):
        make_train_step(CLIP(clip_tiny), tasks.get_task("contrastive"), None, None, grad_accum_steps=2)


def test_padding_rows_are_neither_queries_nor_candidates():
    rng = np.random.default_rng(3)
    image, text = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    task = tasks.get_task("contrastive")
    logits = task.logits((jnp.asarray(image), jnp.asarray(text), jnp.asarray(10.0)))
    weights = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    sums = task.loss_sums(logits, {"inputs": jnp.zeros((6, 1)), "weights": weights})
    real = task.loss_sums(logits[:4, :4], {"inputs": jnp.zeros((4, 1))})
    assert float(sums["loss_sum"]) == pytest.approx(float(real["loss_sum"]), rel=1e-5)
    assert float(sums["weight_sum"]) == 4 and float(sums["correct"]) == float(real["correct"])
    assert float(task.total_weight({"inputs": jnp.zeros((6, 1)), "weights": weights})) == 4


def test_captions_name_the_class_and_zero_shot_templates_are_held_out():
    from tfm.data import captions

    vocab = captions._vocabulary()
    trained = {w for t in captions.TRAIN_TEMPLATES for w in t.replace("{}", " ").split()}
    trained |= {w for c in captions.CLASS_NAMES for w in c.split()}
    assert not set(captions.ZERO_SHOT_TEMPLATES) & set(captions.TRAIN_TEMPLATES)
    assert all(w in trained for t in captions.ZERO_SHOT_TEMPLATES for w in t.replace("{}", " ").split())
    assert min(vocab.values()) == 2 and len(set(vocab.values())) == len(vocab)  # 0 pads, 1 is EOT


def test_the_caption_dataset_pairs_each_image_with_its_class(tmp_path):
    import os

    from test_train_cli import DATA

    from tfm.data import make_dataset

    if not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    from tfm.data.captions import CLASS_NAMES, TRAIN_TEMPLATES

    ds = make_dataset({"name": "fashion_mnist_captions", "batch_size": 16, "data_dir": DATA, "tfds_dir": str(tmp_path)})
    for split in ("train", "test"):
        batch = ds.batch(split, 3)
        assert batch["tokens"].shape == (16, 16) and batch["inputs"].shape == (16, 28, 28, 1)
        for ids, label in zip(batch["tokens"], batch["labels"]):
            text = ds.decode(ids)
            assert any(text == t.format(CLASS_NAMES[label]) for t in TRAIN_TEMPLATES), text
            assert (ids == 1).sum() == 1  # one EOT
    again = ds.batch("train", 3)["tokens"]
    np.testing.assert_array_equal(ds.batch("train", 3)["tokens"], again)  # a pure function of the index
    assert len(np.unique(again, axis=0)) > 1
    prompts = ds.class_prompts()
    assert prompts.shape == (10, 5, 16) and ds.decode(prompts[7, 0]) == "a picture of a sneaker"


def test_the_trainer_refuses_a_text_tower_that_reads_another_eot(tmp_path):
    import os

    from test_train_cli import DATA, ROOT

    from tfm import config as config_lib
    from tfm.trainer import Trainer

    if not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    c = config_lib.load_config(os.path.join(ROOT, "configs", "clip_fashion_mnist.py:tiny"))
    c = config_lib.apply_overrides(c, [f"data.data_dir={DATA}", f"data.tfds_dir={tmp_path}", "model.eot_id=2", "mesh.data=1"])
    with pytest.raises(config_lib.ConfigError, match="model.eot_id=2: data.name='fashion_mnist_captions' ends each caption with id 1"):
        Trainer(c, devices=jax.devices()[:1])
