"""Model families: parameter counts of the paper presets, causality, padding invariance,
KV-cache decoding, bf16, sharding annotations."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm import sharding as sh
from tfm.models import (
    GPT,
    PRESETS,
    T5,
    BertForMaskedLM,
    BertModel,
    Transformer,
    ViT,
    bert_tiny,
    get_preset,
    gpt_tiny,
    llama_tiny,
    t5_tiny,
    transformer_tiny,
    vit_tiny,
)

# --- parameter counts ------------------------------------------------------------------

EXACT = {
    "bert_base": 109_482_240,  # BERT-base-uncased backbone: embeddings + encoder + pooler
    "gpt2_small": 124_439_808,  # GPT-2 small, tied head
    "t5_small": 60_506_624,  # t5-small
    "vit_b16": 86_567_656,  # ViT-B/16, 224 px, 1000 classes
}
PAPER = {"transformer_base": 65e6, "transformer_big": 213e6}  # Vaswani et al. Table 3

# Tiny shapes: compile time dominates, so XLA compiles with few optimizations (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_parameter_counts(name):
    assert get_preset(name).num_params() == EXACT[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts_within_5_percent(name):
    n = get_preset(name).num_params()
    assert abs(n - PAPER[name]) / PAPER[name] <= 0.05, n


def test_transformer_counts_by_hand():
    # Shared 37000 x 512 embedding; encoder layer = 4 (D^2 + D) + (2 D F + F + D) + 2 x 2D;
    # decoder layer adds cross-attention and a third norm. No final norm in post-LN.
    d, f, v = 512, 2048, 37000
    attn, ffn, ln = 4 * (d * d + d), 2 * d * f + f + d, 2 * d
    expected = v * d + 6 * (attn + ffn + 2 * ln) + 6 * (2 * attn + ffn + 3 * ln)
    assert get_preset("transformer_base").num_params() == expected == 63_082_496


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_eval_shape_and_is_annotated(name):
    variables = get_preset(name).init_shapes()
    known = set(sh.logical_axis_names())
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"unannotated parameter of shape {leaf.shape}"
        assert len(leaf.names) == leaf.value.ndim
        assert set(n for n in leaf.names if n is not None) <= known, leaf.names


def test_summary_cli_prints_table_and_total():
    out = subprocess.run(
        [sys.executable, "-m", "tfm.summary", "gpt2_small"], capture_output=True, text=True, check=True
    ).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "total_params: 124439808"
    assert any(line.startswith("decoder/layers") for line in lines)
    bad = subprocess.run([sys.executable, "-m", "tfm.summary", "no_such_model"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown preset" in bad.stderr


def test_summary_of_a_recipe_is_the_model_tfm_train_builds(capsys):
    """``--config RECIPE`` with overrides in every form; the vocabulary comes from the recipe's data (copy: 16)."""
    from tfm import summary
    from tfm.models import Transformer, count_params, transformer_tiny

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = os.path.join(root, "configs", "copy.py:tiny")
    assert summary.main(["--config", recipe, "--config.model.num_encoder_layers", "1"]) == 0
    total = int(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    from tfm import config as config_lib

    c = config_lib.load_config(recipe)
    fields = {k: v for k, v in c.model.items() if k != "preset"} | {"num_encoder_layers": 1, "vocab_size": 16}
    cfg = transformer_tiny.replace(**fields)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(KEY, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)))
    assert total == count_params(shapes["params"])
    assert summary.main(["--config", recipe, "--config.model.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


# --- helpers ---------------------------------------------------------------------------

KEY = jax.random.key(0)


def tokens(shape, vocab=64, seed=0, low=1):
    return jax.random.randint(jax.random.key(seed), shape, low, vocab)


def init(model, *args):
    return jax.jit(model.init)(KEY, *args)


def japply(model, method=None, mutable=False):
    """``model.apply`` compiled once: eager op-by-op dispatch is slow for tiny models."""
    return jax.jit(functools.partial(model.apply, method=method, mutable=mutable))


# --- causality -------------------------------------------------------------------------


def _assert_prefix_unchanged(logits_a, logits_b, t):
    np.testing.assert_allclose(logits_a[:, : t + 1], logits_b[:, : t + 1], atol=1e-5, rtol=0)
    assert not np.allclose(logits_a[:, t + 1 :], logits_b[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("cfg", [gpt_tiny, llama_tiny, gpt_tiny.replace(position="alibi")], ids=["gpt", "llama", "alibi"])
def test_gpt_is_causal(cfg):
    model = GPT(cfg)
    x = tokens((2, 10))
    v = init(model, x)
    t = 4
    y = x.at[:, t + 1 :].set(tokens((2, 10 - t - 1), seed=1))
    apply = japply(model)
    _assert_prefix_unchanged(apply(v, x), apply(v, y), t)


@pytest.mark.parametrize("family", ["transformer", "t5"])
def test_encoder_decoder_decoder_is_causal(family):
    model = Transformer(transformer_tiny) if family == "transformer" else T5(t5_tiny)
    src, tgt = tokens((2, 7)), tokens((2, 9), seed=2)
    v = init(model, src, tgt)
    t = 3
    tgt2 = tgt.at[:, t + 1 :].set(tokens((2, 9 - t - 1), seed=3))
    apply = japply(model)
    _assert_prefix_unchanged(apply(v, src, tgt), apply(v, src, tgt2), t)


# --- padding invariance ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["transformer", "t5", "bert"])
def test_encoder_padding_invariance(family):
    """Appending padding (token 0) changes no output at the real positions."""
    src = tokens((2, 6))
    padded = jnp.concatenate([src, jnp.zeros((2, 5), src.dtype)], axis=1)
    if family == "bert":
        model = BertModel(bert_tiny)
        v = init(model, src)
        apply = japply(model)
        a, b = apply(v, src)[0], apply(v, padded)[0]
    else:
        model = Transformer(transformer_tiny) if family == "transformer" else T5(t5_tiny)
        v = init(model, src, src)
        enc, apply = japply(model, "encode"), japply(model)
        a, b = enc(v, src), enc(v, padded)
        # The decoder's logits do not depend on the source padding either.
        tgt = tokens((2, 4), seed=5)
        np.testing.assert_allclose(apply(v, src, tgt), apply(v, padded, tgt), atol=1e-5, rtol=0)
    np.testing.assert_allclose(a, b[:, :6], atol=1e-5, rtol=0)


# --- KV-cache decoding -----------------------------------------------------------------


def _decode_stepwise(params, cache, step_fn, length, chunk=1):
    """``step_fn(params, cache, start, chunk)`` from 0 to ``length``; ``start`` is traced, so it compiles once."""
    assert length % chunk == 0
    step_fn = jax.jit(step_fn, static_argnums=3)
    outs = []
    for start in range(0, length, chunk):
        logits, mut = step_fn(params, cache, jnp.int32(start), chunk)
        cache = mut["cache"]
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "cfg",
    [gpt_tiny, llama_tiny, gpt_tiny.replace(position="alibi"), gpt_tiny.replace(position="sinusoidal", scan_layers=False)],
    ids=["gpt", "llama-rope-gqa", "alibi", "sinusoidal-loop"],
)
@pytest.mark.parametrize("chunk", [1, 3])
def test_gpt_kv_cache_equals_full_forward(cfg, chunk):
    t = 9
    x = tokens((2, t))
    full_model, dec_model = GPT(cfg), GPT(cfg.replace(decode=True))
    params = init(full_model, x)["params"]
    full = japply(full_model)({"params": params}, x)
    cache = init(dec_model, jnp.ones((2, 12), jnp.int32))["cache"]  # cache longer than needed

    def step(p, c, a, n):
        return dec_model.apply({"params": p, "cache": c}, jax.lax.dynamic_slice_in_dim(x, a, n, 1), mutable=["cache"])

    got = _decode_stepwise(params, cache, step, t, chunk)
    np.testing.assert_allclose(got, full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["transformer", pytest.param("t5", marks=pytest.mark.slow)])
def test_encoder_decoder_kv_cache_equals_full_forward(family):
    cls, cfg = (Transformer, transformer_tiny) if family == "transformer" else (T5, t5_tiny)
    src, tgt = tokens((2, 7)), tokens((2, 8), seed=4)
    full_model, dec_model = cls(cfg), cls(cfg.replace(decode=True))
    params = init(full_model, src, tgt)["params"]
    full = japply(full_model)({"params": params}, src, tgt)
    cache = init(dec_model, src, jnp.ones((2, 8), jnp.int32))["cache"]
    encoded = japply(full_model, "encode")({"params": params}, src)

    def step(p, c, a, n):
        return dec_model.apply({"params": p, "cache": c}, jax.lax.dynamic_slice_in_dim(tgt, a, n, 1), encoded, src,
                               method="decode", mutable=["cache"])  # fmt: skip

    got = _decode_stepwise(params, cache, step, 8)
    np.testing.assert_allclose(got, full, atol=2e-5, rtol=0)


# --- dtypes, heads, shapes -------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer_tiny", "bert_tiny", "gpt_tiny", "llama_tiny", "t5_tiny", "vit_tiny"])
def test_bf16_forward_and_grad_finite(name):
    preset = get_preset(name)
    model = preset.model(dtype=jnp.bfloat16)
    args = preset.example_inputs(model.config)
    params = init(model, *args)["params"]

    @jax.jit
    def loss(p):
        out = model.apply({"params": p}, *args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(nn.unbox(grads)))
    # Parameters stay float32 (mixed precision: bf16 compute, f32 weights).
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(params)))


def test_vit_patch_embedding_equals_strided_conv():
    """Our reshape + einsum patchifier is the paper's stride-P convolution."""
    model = ViT(vit_tiny)
    images = jax.random.normal(KEY, (2, 28, 28, 1))
    params = nn.unbox(init(model, images)["params"])
    kernel, bias = params["patch_embed"]["kernel"], params["patch_embed"]["bias"]
    conv = jax.lax.conv_general_dilated(images, kernel, (7, 7), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = conv.reshape(2, 16, 32) + bias
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]))({"params": params}, images)
    ours = state["intermediates"]["patch_embed"]["__call__"][0]
    np.testing.assert_allclose(ours, conv, atol=1e-5, rtol=0)
    assert model.apply({"params": params}, images).shape == (2, 10)


def test_bert_mlm_head_is_tied_to_token_embedding():
    model = BertForMaskedLM(bert_tiny)
    x = tokens((2, 6))
    params = nn.unbox(init(model, x)["params"])
    logits, state = jax.jit(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]))({"params": params}, x)
    h = state["intermediates"]["mlm_norm"]["__call__"][0]
    expected = h @ params["bert"]["token_embed"]["embedding"].T + params["mlm_bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def test_transformer_embedding_scaled_and_shared():
    model = Transformer(transformer_tiny)
    src, tgt = tokens((1, 5)), tokens((1, 5), seed=1)
    params = nn.unbox(init(model, src, tgt)["params"])
    assert "embed" in params and "src_embed" not in params  # one table for src, tgt and output
    table = params["embed"]["embedding"]
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]))({"params": params}, src, tgt)
    emb = state["intermediates"]["embed"]["__call__"][0]  # the source embedding call
    np.testing.assert_allclose(emb, table[src] * np.sqrt(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gpt_tiny.replace(num_heads=5),
        lambda: gpt_tiny.replace(position="spiral"),
        lambda: transformer_tiny.replace(target_vocab_size=99),
        lambda: vit_tiny.replace(patch_size=5),
        lambda: llama_tiny.replace(num_kv_heads=3),
        lambda: bert_tiny.replace(dropout_rate=1.5),
    ],
)
def test_bad_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_inputs_raise():
    model = GPT(gpt_tiny)
    v = init(model, tokens((1, 4)))
    with pytest.raises(ValueError, match="exceeds max_len"):
        model.apply(v, tokens((1, 40)))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.apply(v, tokens((4,)))
    with pytest.raises(ValueError, match="images must be"):
        ViT(vit_tiny).init(KEY, jnp.zeros((1, 32, 32, 1)))


def test_dropout_is_active_only_in_training():
    cfg = gpt_tiny.replace(dropout_rate=0.3)
    model, x = GPT(cfg), tokens((2, 8))
    v = init(model, x)
    apply = japply(model)
    eval_a, eval_b = apply(v, x), apply(v, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = jax.jit(functools.partial(model.apply, deterministic=False))(v, x, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, eval_a, atol=1e-3)


# --- sharding --------------------------------------------------------------------------


def test_sharded_init_and_forward_match_single_device():
    """Parameters born sharded on a (fsdp=2, tensor=4) mesh give the single-device logits."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.fail("conftest should provide 8 fake CPU devices")
    mesh = jax.make_mesh((1, 2, 4, 1), sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    model, x = GPT(gpt_tiny), tokens((4, 8))
    ref = japply(model)(init(model, x), x)

    rules = sh.DEFAULT_RULES
    abstract = jax.eval_shape(lambda: model.init(KEY, x))
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(lambda: model.init(KEY, x), out_shardings=shardings)()
        wi = variables["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"].value
        # [L, D, F] = [2, 32, 64] with D over fsdp (2) and F over tensor (4).
        assert wi.sharding.shard_shape(wi.shape) == (2, 16, 16)
        out = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
