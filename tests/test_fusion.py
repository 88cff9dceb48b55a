"""The multimodal fusion model: shapes, any subset of modalities, absent modalities masked exactly as
omitted ones, text padding, gradient flow, refusals; the caption-matching dataset."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm import tasks
from tfm.data import make_dataset
from tfm.data.captions import CLASS_NAMES
from tfm.models import PRESETS
from tfm.models.fusion import Fusion, fusion_tiny

DATA = os.environ.get("TFM_TEST_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))

# Tiny shapes: compile time dominates, so compile with few XLA optimizations.
pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


@pytest.fixture(scope="module")
def model_and_inputs():
    model = Fusion(fusion_tiny)
    rng = np.random.default_rng(0)
    text = rng.integers(2, 64, (3, 10)).astype(np.int32)
    text[:, 7:] = 0  # padding
    images = rng.standard_normal((3, 28, 28, 1)).astype(np.float32)
    audio = rng.standard_normal((3, 64, 80)).astype(np.float32)
    inputs = {"text": jnp.asarray(text), "images": jnp.asarray(images), "audio": jnp.asarray(audio)}
    params = nn.unbox(model.init(jax.random.key(0), **inputs)["params"])
    return model, params, inputs


def test_every_subset_of_modalities_gives_logits(model_and_inputs):
    model, params, inputs = model_and_inputs
    outs = {}
    for keys in (("text",), ("images",), ("audio",), ("text", "images"), ("images", "audio"), ("text", "images", "audio")):
        out = model.apply({"params": params}, **{k: inputs[k] for k in keys})
        assert out.shape == (3, 2) and out.dtype == jnp.float32 and np.isfinite(out).all()
        outs[keys] = np.asarray(out)
    assert not np.allclose(outs[("text",)], outs[("text", "images")], atol=1e-4)  # the image changes the answer


@pytest.mark.parametrize("absent", ["text", "images", "audio"])
def test_an_absent_modality_is_masked_exactly_as_if_omitted(model_and_inputs, absent):
    model, params, inputs = model_and_inputs
    present = jnp.array([True, False, True])
    masked = model.apply({"params": params}, **inputs, **{f"{absent}_present": present})
    omitted = model.apply({"params": params}, **{k: v for k, v in inputs.items() if k != absent})
    full = model.apply({"params": params}, **inputs)
    assert np.allclose(masked[1], omitted[1], atol=1e-5)  # the row without it
    assert np.allclose(np.asarray(masked)[[0, 2]], np.asarray(full)[[0, 2]], atol=1e-5)  # the rows with it
    assert not np.allclose(masked[1], full[1], atol=1e-4)


def test_text_padding_changes_nothing(model_and_inputs):
    model, params, inputs = model_and_inputs
    longer = jnp.pad(inputs["text"], ((0, 0), (0, 4)))  # four more pad tokens
    a = model.apply({"params": params}, text=inputs["text"], images=inputs["images"])
    b = model.apply({"params": params}, text=longer, images=inputs["images"])
    assert np.allclose(a, b, atol=1e-5)


def test_gradients_reach_every_parameter(model_and_inputs):
    model, params, inputs = model_and_inputs
    task = tasks.get_task("multimodal")
    batch = {**inputs, "labels": jnp.array([0, 1, 1])}

    def loss(p):
        args, kwargs = task.model_args(batch)
        return task.loss_sums(model.apply({"params": p}, *args, **kwargs), batch)["loss_sum"]

    grads = jax.grad(loss)(params)
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert all(n > 0 for n in norms.values()), [k for k, n in norms.items() if n == 0]
    flops = task.flops_per_step(fusion_tiny, params, {k: v.shape for k, v in batch.items()})
    assert flops > 0


def test_bad_inputs_are_refused_by_name(model_and_inputs):
    model, params, inputs = model_and_inputs
    with pytest.raises(ValueError, match="give at least one of"):
        model.apply({"params": params})
    with pytest.raises(ValueError, match="audio_present is given without audio"):
        model.apply({"params": params}, text=inputs["text"], audio_present=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="different batch sizes"):
        model.apply({"params": params}, text=inputs["text"], images=inputs["images"][:2])
    with pytest.raises(ValueError, match=r"images must be \[B, 28, 28, 1\]"):
        model.apply({"params": params}, images=jnp.zeros((1, 32, 32, 1)))
    assert PRESETS["fusion_tiny"].task == "multimodal"


def test_the_matching_dataset_pairs_half_the_captions_with_another_class(tmp_path):
    if not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    ds = make_dataset({"name": "fashion_mnist_matching", "batch_size": 64, "data_dir": DATA, "tfds_dir": str(tmp_path)})
    for split in ("train", "test"):
        batch = ds.batch(split, 0)
        assert set(batch) == {"images", "text", "labels", "classes", "weights"} and batch["images"].shape == (64, 28, 28, 1)
        named = [next(i for i, c in enumerate(CLASS_NAMES) if ds.decode(t).endswith(c) or f" {c} " in ds.decode(t) + " ")
                 for t in batch["text"]]  # fmt: skip
        match = np.array(named) == batch["classes"]
        assert np.array_equal(match, batch["labels"] == 1)
        assert 0.3 < batch["labels"].mean() < 0.7
    again = ds.batch("train", 0)
    assert np.array_equal(again["text"], ds.batch("train", 0)["text"])
