"""CLIP checkpoints in and out of tfm: logits and features against transformers (NCHW pixels vs NHWC images),
the legacy ``eos_token_id=2`` pooling, export, unscanned import, a fresh tfm CLIP's round trip, the full-size
count, unsupported options."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm.hub import ARCHITECTURES, HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import count_params  # noqa: E402
from tfm.models.clip import CLIP, clip_tiny, clip_vit_b32  # noqa: E402

ARCH = "CLIPModel"
V, EOT, SIZE, CHANNELS = 64, 5, 28, 3
# The towers differ in width, heads and depth, so a map that mixes them up cannot fit.
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=EOT - 1, eos_token_id=EOT, layer_norm_eps=1e-6)  # fmt: skip
VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, image_size=SIZE,
              patch_size=7, num_channels=CHANNELS, layer_norm_eps=1e-6)  # fmt: skip
SCALE = 20.0  # exp(logit_scale), below tfm's cap of 100


def _random_clip(directory, seed=0, **text):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config={**TEXT, **text}, vision_config=VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # every parameter redrawn (no zero bias hides a bad map); norm scales around 1
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
        model.logit_scale.fill_(np.log(SCALE))
    return save_hf(model, directory), model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _random_clip(tmp_path_factory.mktemp("clip"))


def _images(b=3, size=SIZE, channels=CHANNELS, seed=0):
    return np.random.default_rng(seed).standard_normal((b, size, size, channels)).astype(np.float32)


def nchw(images):
    return images.transpose(0, 3, 1, 2)


def _tokens(b=4, t=11, eot=EOT, seed=0):
    """Rows holding EOT at different places, some twice (the first counts), ids above it after it."""
    rng = np.random.default_rng(seed + 100)
    tokens = rng.integers(0, V, (b, t)).astype(np.int32)
    tokens[tokens == eot] = (eot + 1) % V
    for row, where in enumerate((3, 7, t - 1, 5)[:b]):
        tokens[row, where] = eot
    tokens[0, 8] = eot
    return tokens


def _hf(model, images, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long), pixel_values=torch.as_tensor(nchw(images)))
    return out.logits_per_image.numpy(), out.image_embeds.numpy(), out.text_embeds.numpy()


def _ours(model, params, images, tokens):
    image, text, scale = model.apply({"params": params}, jnp.asarray(images), jnp.asarray(tokens))
    return np.asarray(scale * image @ text.T), np.asarray(image), np.asarray(text)


def _assert_close(ours, theirs, tol):
    for a, b, what in zip(ours, theirs, ("logits_per_image", "image_embeds", "text_embeds")):
        assert a.shape == b.shape, what
        assert maxerr(a, b) <= tol, (what, maxerr(a, b))


def test_import_logits_and_features_match_transformers(clip_dir):
    directory, ref = clip_dir
    model, params = from_pretrained(directory)
    cfg = model.config
    assert isinstance(model, CLIP) and (cfg.eot_id, cfg.block.activation) == (EOT, "quick_gelu")
    assert cfg.block.norm_epsilon == 1e-6
    assert (cfg.vision_d_model, cfg.vision_num_heads, cfg.vision_layers, cfg.embed_dim) == (48, 6, 3, 24)
    images, tokens = _images(), _tokens()
    ours, theirs = _ours(model, params, images, tokens), _hf(ref, images, tokens)
    assert theirs[0].shape == (3, 4)
    assert np.std(theirs[0]) > 1.0  # the pairs' logits differ: a wrong map would show
    _assert_close(ours, theirs, 1e-4)
    # The pooling position matters: the same texts pooled at their last token give other features.
    last = tokens.copy()
    last[last == EOT] = EOT + 1
    last[:, -1] = EOT
    assert maxerr(_ours(model, params, images, last)[2], theirs[2]) > 1e-2


def test_legacy_eos_token_id_pools_at_the_largest_id(clip_dir, tmp_path):
    """Configs with eos_token_id=2 make transformers pool at argmax(ids): tfm reads eot_id = vocab_size - 1."""
    directory, _ = clip_dir
    legacy = config_writer(directory, tmp_path)("legacy")
    hf = json.loads((legacy / "config.json").read_text())
    hf["text_config"]["eos_token_id"] = 2
    (legacy / "config.json").write_text(json.dumps(hf))
    shutil.copy(os.path.join(directory, "model.safetensors"), legacy)
    ref = transformers.CLIPModel.from_pretrained(str(legacy)).eval()
    model, params = from_pretrained(legacy)
    assert model.config.eot_id == V - 1
    images, tokens = _images(seed=5), _tokens(eot=V - 1, seed=5)
    _assert_close(_ours(model, params, images, tokens), _hf(ref, images, tokens), 1e-4)


def test_unscanned_import_is_the_same_model(clip_dir):
    directory, ref = clip_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_2" in params["image_tower"]["encoder"] and "layers" not in params["text_tower"]["encoder"]
    images, tokens = _images(seed=1), _tokens(seed=1)
    _assert_close(_ours(model, params, images, tokens), _hf(ref, images, tokens), 1e-4)


def test_export_loads_in_transformers_with_the_same_outputs(clip_dir, tmp_path):
    directory, ref = clip_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == ARCH
    back = transformers.CLIPModel.from_pretrained(str(tmp_path / "out")).eval()
    images, tokens = _images(seed=2), _tokens(seed=2)
    _assert_close(_hf(back, images, tokens), _hf(ref, images, tokens), 1e-6)
    _, again = from_pretrained(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_fresh_tfm_clip_exports_and_round_trips(tmp_path):
    """A model tfm built itself (clip_tiny: 1 channel, EOT id 1, one width for both towers) leaves tfm and
    comes back bit for bit."""
    module = CLIP(clip_tiny)
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(1.0 if path[-1].key == "scale" else 0.0, 0.2, x.shape).astype(np.float32),
        abstract_params(module))  # fmt: skip
    params["logit_scale"] = np.float32(np.log(10.0))
    assert save_pretrained(module, params, tmp_path / "fresh") == ARCH
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "fresh")).eval()
    images = _images(b=2, size=clip_tiny.image_size, channels=1, seed=4)
    tokens = np.random.default_rng(6).integers(2, clip_tiny.vocab_size, (3, 9)).astype(np.int32)
    tokens[[0, 1, 2], [4, 8, 2]] = clip_tiny.eot_id
    theirs = _hf(hf, images, tokens)
    assert np.std(theirs[0]) > 0.5
    _assert_close(_ours(module, params, images, tokens), theirs, 1e-4)
    _, again = from_pretrained(tmp_path / "fresh")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_size_clip_vit_b32_config_counts_as_the_preset_and_transformers():
    """openai/clip-vit-base-patch32's config (with its legacy eos_token_id=2)."""
    text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
                eos_token_id=2, pad_token_id=1, projection_dim=512)  # fmt: skip
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                  patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)  # fmt: skip
    hf = dict(architectures=[ARCH], model_type="clip", projection_dim=512, logit_scale_init_value=2.6592,
              text_config=text, vision_config=vision)  # fmt: skip
    cls, cfg = ARCHITECTURES[ARCH].to_tfm(hf, ARCH)
    assert cfg == clip_vit_b32.replace(logit_scale_init=2.6592)
    assert count_params(abstract_params(cls(cfg))) == 151_277_313
    with torch.device("meta"):  # transformers' own count, nothing allocated
        ref = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                             projection_dim=512))  # fmt: skip
    assert sum(p.numel() for p in ref.parameters()) == 151_277_313


def _with(directory, tmp_path, name, **towers):
    """``directory``'s config with ``towers`` = {"text_config": {...}, ...} merged into its sub-configs."""
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    for key, changes in towers.items():
        hf[key] = {**hf[key], **changes} if isinstance(changes, dict) else changes
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    return d


def test_unsupported_options_are_named(clip_dir, tmp_path):
    directory, _ = clip_dir
    cases = [(dict(vision_config=dict(hidden_act="gelu")),
              "vision_config.hidden_act='gelu' differs from text_config.hidden_act='quick_gelu'"),
             (dict(vision_config=dict(layer_norm_eps=1e-5)), "vision_config.layer_norm_eps=1e-05 differs"),
             (dict(text_config=dict(hidden_act="tanh"), vision_config=dict(hidden_act="tanh")),
              "hidden_act='tanh' is not implemented"),
             (dict(vision_config=dict(image_size=[28, 35])), r"vision_config.image_size=\[28, 35\] is not implemented"),
             (dict(text_config=dict(eos_token_id=None)), "text_config.eos_token_id=None is not implemented"),
             (dict(text_config=dict(eos_token_id=V)), f"text_config.eos_token_id={V} is not implemented")]  # fmt: skip
    for i, (changes, message) in enumerate(cases):
        with pytest.raises(HubError, match=message):
            config_from_pretrained(_with(directory, tmp_path, f"case{i}", **changes))
    # A logit scale above tfm's cap is refused, with the override that reproduces it.
    from safetensors.numpy import load_file, save_file

    d = _with(directory, tmp_path, "scale")
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    save_file({**tensors, "logit_scale": np.array(np.log(150.0), np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(HubError, match="exp\\(logit_scale\\)=150 exceeds max_logit_scale=100"):
        from_pretrained(d)
    model, _ = from_pretrained(d, max_logit_scale=200.0)
    assert model.config.max_logit_scale == 200.0
    # eot_id=2 would read as transformers' legacy argmax pooling: no Hugging Face architecture for it.
    module = CLIP(clip_tiny.replace(eot_id=2))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(module))
    with pytest.raises(HubError, match="no Hugging Face architecture"):
        save_pretrained(module, params, tmp_path / "legacy")
    with pytest.raises(HubError, match="eot_id=2 is read by transformers as its legacy argmax pooling"):
        save_pretrained(module, params, tmp_path / "legacy2", architecture=ARCH)
