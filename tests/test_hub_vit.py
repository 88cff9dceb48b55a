"""ViT checkpoints in and out of tfm: logits against transformers (NCHW pixels vs NHWC images), export,
unscanned import, a fresh tfm ViT's round trip, the full-size count, unsupported options."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, torch_logits, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm.hub import ARCHITECTURES, HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import ViT, count_params, vit_b16, vit_tiny  # noqa: E402

ARCH = "ViTForImageClassification"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, num_channels=3, num_labels=5, layer_norm_eps=1e-6)  # fmt: skip


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY))
    with torch.no_grad():  # every parameter redrawn (no zero bias or head hides a bad map); norm scales around 1
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, mean=1.0 if "layernorm" in name and name.endswith("weight") else 0.0, std=0.2)
    return save_hf(model.eval(), tmp_path_factory.mktemp("vit")), model.eval()


def _images(b=3, size=32, channels=3, seed=0):
    return np.random.default_rng(seed).standard_normal((b, size, size, channels)).astype(np.float32)


def nchw(images):
    return images.transpose(0, 3, 1, 2)


def test_import_logits_match_transformers(vit_dir):
    directory, ref = vit_dir
    model, params = from_pretrained(directory)
    assert isinstance(model, ViT) and model.config.block.norm_epsilon == 1e-6
    images = _images()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(images)))
    theirs = torch_logits(ref, nchw(images))
    assert ours.shape == theirs.shape == (3, 5)
    assert np.std(theirs, axis=0).mean() > 0.1  # the images' logits differ: a wrong map would show
    assert maxerr(ours, theirs) <= 1e-4


def test_unscanned_import_is_the_same_model(vit_dir):
    directory, ref = vit_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_1" in params["encoder"] and "layers" not in params["encoder"]
    images = _images(seed=1)
    assert maxerr(model.apply({"params": params}, jnp.asarray(images)), torch_logits(ref, nchw(images))) <= 1e-4


def test_export_loads_in_transformers_with_the_same_logits(vit_dir, tmp_path):
    directory, ref = vit_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == ARCH
    back = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    images = nchw(_images(seed=2))
    assert maxerr(torch_logits(back, images), torch_logits(ref, images)) <= 1e-6


def test_a_fresh_tfm_vit_exports_and_round_trips(tmp_path):
    """A model tfm built itself (the vit_tiny preset: 1 channel, 7x7 patches) leaves tfm and comes back bit for bit."""
    module = ViT(vit_tiny)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(1.0 if path[-1].key == "scale" else 0.0, 0.2, x.shape).astype(np.float32),
        abstract_params(module))  # fmt: skip
    save_pretrained(module, params, tmp_path / "fresh")
    hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "fresh")).eval()
    images = _images(size=28, channels=1, seed=4)
    theirs = torch_logits(hf, nchw(images))
    assert np.std(theirs, axis=0).mean() > 0.1
    assert maxerr(module.apply({"params": params}, jnp.asarray(images)), theirs) <= 1e-4
    _, again = from_pretrained(tmp_path / "fresh")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_size_vit_b16_config_counts_as_the_preset_and_transformers():
    hf = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
              image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-12, qkv_bias=True, encoder_stride=16,
              id2label={str(i): f"LABEL_{i}" for i in range(1000)}, architectures=[ARCH], model_type="vit")  # fmt: skip
    cls, cfg = ARCHITECTURES[ARCH].to_tfm(hf, ARCH)
    assert cfg == vit_b16.replace(norm_epsilon=1e-12)
    assert count_params(abstract_params(cls(cfg))) == 86_567_656
    with torch.device("meta"):  # transformers' own count, nothing allocated
        ref = transformers.ViTForImageClassification(transformers.ViTConfig(**hf))
    assert sum(p.numel() for p in ref.parameters()) == 86_567_656


def test_unsupported_options_are_named(vit_dir, tmp_path):
    directory, _ = vit_dir
    write = config_writer(directory, tmp_path)

    cases = [(dict(qkv_bias=False), "qkv_bias=False is not implemented"),
             (dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu' is not implemented"),
             (dict(image_size=[32, 48]), r"image_size=\[32, 48\] is not implemented"),
             (dict(id2label={}, num_labels=0), "num_labels=0")]  # fmt: skip
    for i, (changes, message) in enumerate(cases):
        with pytest.raises(HubError, match=message):
            config_from_pretrained(write(f"case{i}", **changes))
    _, cfg, _ = config_from_pretrained(write("pair", image_size=[32, 32], encoder_stride=4))  # square pairs and
    assert cfg.image_size == 32  # the masked-image-modelling stride are fine
