"""Nested configs: every family takes every attention kind and MoE where that makes sense,
and refuses with a clear error where it does not; one flat name space for the config and its block."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm import config as config_lib
from tfm.layers.attention_kinds import KINDS
from tfm.layers.blocks import BlockConfig
from tfm.models import PRESETS

# One tiny preset per family and what a batch of it looks like; T = 8 positions everywhere
# (ViT: 28x28 images in 7x7 patches are 16 + 1 positions).
FAMILIES = {
    "gpt": "gpt_tiny",
    "transformer": "transformer_tiny",
    "bert_mlm": "bert_tiny_mlm",
    "bert_classifier": "bert_tiny_classifier",
    "vit": "vit_tiny",
    "t5": "t5_tiny",
}
# Tiny shapes: compile time dominates, so XLA compiles with few optimizations (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")
KIND_OPTIONS = {
    "local": dict(attention="local", attention_window=2),
    "block_sparse": dict(attention="block_sparse", attention_window=2, attention_global_tokens=1),
    "linear": dict(attention="linear"),
    "flash": dict(attention="flash"),
}


def _inputs(preset):
    cfg = preset.config
    if preset.task == "classify":
        return (jax.random.normal(jax.random.key(1), (2, cfg.image_size, cfg.image_size, cfg.num_channels)),)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 3, 60)
    tokens = tokens.at[1, 6:].set(0)  # padding in the second row (the models' pad id is 0)
    return (tokens, tokens) if preset.task == "seq2seq" else (tokens,)


def _forward(preset, **changes):
    """Init, then every parameter redrawn from N(0, 0.3^2): no zero-initialised head (ViT's) hides the
    output, and attention is peaked enough that the kinds differ visibly."""
    model = preset.model(**changes)
    inputs = _inputs(preset)
    variables = model.init(jax.random.key(0), *inputs)
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    redrawn = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    variables = {**variables, "params": jax.tree.unflatten(tree, redrawn)}
    out, state = model.apply(variables, *inputs, mutable=["aux_loss"])
    return variables, out, state


@functools.cache
def _full_attention_output(preset_name: str) -> np.ndarray:
    """The reference every kind is compared with: full attention, no dropout (computed once per family)."""
    return np.asarray(_forward(PRESETS[preset_name], attention_dropout_rate=0.0)[1])


@pytest.mark.parametrize("kind", sorted(KIND_OPTIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_runs_every_attention_kind_or_says_why_not(family, kind):
    preset = PRESETS[FAMILIES[family]]
    changes = dict(KIND_OPTIONS[kind], attention_dropout_rate=0.0)
    if family == "t5":  # its relative position bias is additive: only kinds with dense masks take one
        with pytest.raises(ValueError, match=f"attention='{kind}' takes no additive bias.*relative position bias"):
            preset.config.replace(**changes)
        return
    _, out, _ = _forward(preset, **changes)
    full = _full_attention_output(FAMILIES[family])
    assert out.shape == full.shape and np.all(np.isfinite(np.asarray(out)))
    if kind == "flash":  # the same attention, another kernel
        np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=2e-5, rtol=2e-5)
    else:  # a window of 2 (or the linear kernel) really changes what each position sees
        out, full = np.asarray(out), np.asarray(full)
        assert np.max(np.abs(out - full)) > 1e-3 * np.max(np.abs(full))


@pytest.mark.parametrize("family", ["bert_mlm", "vit", "transformer"])
def test_a_window_over_the_whole_sequence_is_full_attention(family):
    """Bidirectional local attention with a window >= T sees every key: it equals full attention
    (with padding, for BERT and the encoder–decoder)."""
    preset = PRESETS[FAMILIES[family]]
    t = 17 if family == "vit" else 8
    _, local, _ = _forward(preset, attention="local", attention_window=t, attention_dropout_rate=0.0)
    np.testing.assert_allclose(np.asarray(local), _full_attention_output(FAMILIES[family]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_takes_a_mixture_of_experts(family):
    preset = PRESETS[FAMILIES[family]]
    variables, out, state = _forward(preset, num_experts=4, experts_per_token=2, moe_every=2)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
    assert any("'moe'" in p for p in paths), "no MoE layer in the parameters"
    assert jax.tree.leaves(state["aux_loss"]), "the MoE layers sowed no load-balancing loss"
    assert np.all(np.isfinite(np.asarray(out)))


def test_gpt_refuses_alibi_with_a_kind_that_takes_no_bias():
    with pytest.raises(ValueError, match="position='alibi' is an additive bias; attention='local' takes none"):
        PRESETS["gpt_tiny"].config.replace(position="alibi", attention="local")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_config_and_its_block_share_one_name_space(name):
    cfg = PRESETS[name].config
    own, block = set(cfg.own_fields()), {f.name for f in dataclasses.fields(BlockConfig)}
    assert not own & block, f"{type(cfg).__name__} redeclares block fields {sorted(own & block)}"
    assert set(cfg.field_names()) == own | (block - set(cfg.DERIVED))
    changed = cfg.replace(d_model=48, num_heads=4, num_kv_heads=None, dropout_rate=0.0)
    assert changed.block.d_model == 48 and changed.get("d_model") == 48
    assert changed.block.dropout_rate == 0.0 and cfg.block.d_model != 48, "replace must copy, not mutate"
    for derived in cfg.DERIVED:
        with pytest.raises(ValueError, match=f"sets {derived} itself"):
            cfg.replace(**{derived: getattr(cfg.block, derived)})
    with pytest.raises(ValueError, match="has no field 'd_modle'"):
        cfg.replace(d_modle=3)


def test_command_line_names_reach_the_block_and_derived_fields_are_refused():
    c = config_lib.load_config("configs/shakespeare_char.py:tiny")
    c = config_lib.apply_overrides(c, ["model.attention=local", "model.attention_window=8", "model.num_experts=4",
                                       "model.num_layers=4", "model.dtype=bfloat16"])  # fmt: skip
    _, mcfg = config_lib.model_config(c)
    assert (mcfg.num_layers, mcfg.block.attention, mcfg.block.attention_window) == (4, "local", 8)
    assert mcfg.block.num_experts == 4 and mcfg.block.dtype == jnp.bfloat16
    bad = config_lib.apply_overrides(config_lib.load_config("configs/shakespeare_char.py:tiny"), ["model.causal=false"])
    with pytest.raises(config_lib.ConfigError, match="model.causal=False: GPTConfig sets causal itself"):
        config_lib.model_config(bad)
    bad = config_lib.apply_overrides(config_lib.load_config("configs/copy.py:tiny"), ["model.attention=sparse"])
    with pytest.raises(config_lib.ConfigError, match="attention must be one of"):
        config_lib.model_config(bad)


def test_every_kind_is_covered_here():
    assert set(KIND_OPTIONS) | {"full"} == set(KINDS), "a new attention kind needs a row in KIND_OPTIONS"


def _sown_weights(tree, path=()):
    """Every ``attention_weights`` the layers sowed: {path: [L, B, N, T, S]} (scanned stacks)."""
    found = {}
    for key, value in tree.items():
        if key == "attention_weights":
            found["/".join(path)] = np.asarray(value[0])
        elif isinstance(value, dict):
            found.update(_sown_weights(value, path + (key,)))
    return found


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exposes_its_attention_weights(family):
    """``sow_attention_weights``: each attention layer's softmax weights land in ``intermediates``,
    one distribution per query over the keys it may see; the output does not change."""
    preset = PRESETS[FAMILIES[family]]
    variables, plain, _ = _forward(preset)
    model = preset.model(sow_attention_weights=True)
    inputs = _inputs(preset)
    out, state = model.apply(variables, *inputs, mutable=["intermediates", "aux_loss"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    weights = _sown_weights(state["intermediates"])
    cfg = preset.config
    expected = {"t5": 3, "transformer": 3}.get(family, 1)  # encoder self, decoder self and cross
    assert len(weights) == expected, sorted(weights)
    for path, w in weights.items():
        assert w.shape[:3] == (2, 2, cfg.block.num_heads), (path, w.shape)  # [L, B, N]: 2 layers in every tiny preset
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        visible = w > 0.0  # softmax weights are > 0 exactly where the masks let a query see a key
        uniform = visible / visible.sum(-1, keepdims=True)
        assert np.abs(w - uniform).max() > 1e-3, f"{path}: uniform weights, not the model's attention"
        if path.startswith("decoder") and path.endswith("self_attention"):  # GPT's stack, and the decoders'
            assert np.all(w[..., np.triu(np.ones(w.shape[-2:], bool), k=1)] == 0.0), f"{path} looks ahead"
        if family not in ("gpt", "vit"):  # the others mask the padded keys (row 1, positions 6 and 7)
            assert np.all(w[:, 1, ..., 6:] == 0.0), f"{path} attends to padding"


def test_only_kinds_with_a_weight_matrix_can_expose_it():
    with pytest.raises(ValueError, match="sow_attention_weights: attention='local' computes no weight matrix"):
        PRESETS["gpt_tiny"].config.replace(attention="local", sow_attention_weights=True)


def test_the_language_models_share_one_output_head():
    """``OutputHead``: tied, it owns no parameter and projects with the token embedding; untied, its
    ``kernel [D, V]`` is the family's head (``lm_head`` / ``logits_proj``), under the same path as before."""
    from tfm.layers.embed import Embed, OutputHead

    for name, head, tied in [("gpt_tiny", "lm_head", True), ("llama_tiny", "lm_head", False),
                             ("t5_tiny", "lm_head", True), ("transformer_tiny", "logits_proj", True)]:  # fmt: skip
        preset = PRESETS[name]
        for tie in (tied, not tied):
            field = {"gpt_tiny": "tie_embeddings", "llama_tiny": "tie_embeddings", "t5_tiny": "tie_embeddings",
                     "transformer_tiny": "tie_output"}[name]  # fmt: skip
            params = flax.linen.unbox(preset.init_shapes(**{field: tie})["params"])
            if tie:
                assert head not in params, f"{name}: a tied head has no parameter of its own"
            else:
                cfg = preset.config
                assert params[head]["kernel"].shape == (cfg.block.d_model, cfg.vocab_size), name
    class Toy(flax.linen.Module):  # the head inside a module that owns the token embedding, as in a model
        @flax.linen.compact
        def __call__(self, x):
            return OutputHead(5, name="head")(x, Embed(5, 3, name="embed"))

    x = jax.random.normal(jax.random.key(0), (1, 2, 3))
    variables = Toy().init(jax.random.key(1), x)
    assert list(variables["params"]) == ["embed"]
    table = np.asarray(flax.linen.unbox(variables)["params"]["embed"]["embedding"])
    np.testing.assert_allclose(Toy().apply(variables, x), np.einsum("btd,vd->btv", x, table), rtol=1e-6)
    with pytest.raises(ValueError, match="a tied OutputHead projects with the token Embed"):
        OutputHead(5).init(jax.random.key(0), x)
