"""Post-training int8 quantization (tfm.quantize, with qwix): what is quantized, how exactly, and what it costs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from tfm import quantize as q  # noqa: E402
from tfm.models import PRESETS  # noqa: E402

FAMILIES = ["gpt_tiny", "llama_tiny", "transformer_tiny", "t5_tiny", "bert_tiny_mlm", "vit_tiny", "gpt_moe_tiny"]


def _model_and_params(name, **changes):
    preset = PRESETS[name]
    model = preset.model(**changes)
    inputs = preset.example_inputs(model.config)
    params = nn.unbox(model.init(jax.random.key(0), *inputs)["params"])
    # Redrawn N(0, 0.1^2): no zero-initialised head (ViT's) or tiny init hides what quantization changes.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return model, params, inputs


def _quantized_leaves(qparams):
    """{path: QArray} of the kernels qwix quantized."""
    import qwix

    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, qwix.QArray))[0]
    return {jax.tree_util.keystr(p): x for p, x in flat if isinstance(x, qwix.QArray)}


@pytest.mark.parametrize("mode", q.MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_runs_quantized_close_to_its_float_output(name, mode):
    model, params, inputs = _model_and_params(name)
    qmodel, qparams = q.quantize(model, params, mode, *inputs)
    quantized = _quantized_leaves(qparams)
    assert quantized, "nothing was quantized"
    assert not any("embed" in path for path in quantized), "embeddings stay in floating point"
    assert any("query" in path for path in quantized) and any("out" in path for path in quantized)
    ref = np.asarray(model.apply({"params": params}, *inputs))
    out = np.asarray(qmodel.apply({"params": qparams}, *inputs))
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0.0 < err < 0.05, f"{name} {mode}: relative error {err:.4f}"


def test_a_quantized_kernel_is_int8_with_one_absmax_scale_per_output_channel():
    """Against NumPy: scale = max |w| over the contracted axis / 127.5 (qwix's symmetric int8 bound),
    value = round(w / scale) clipped to [-128, 127]."""
    model, params, inputs = _model_and_params("llama_tiny")
    _, qparams = q.quantize(model, params, "int8", *inputs)
    head = qparams["lm_head"]["kernel"].array  # [D, V]: D contracted, one scale per vocabulary entry
    w = np.asarray(params["lm_head"]["kernel"])
    assert head.qvalue.dtype == jnp.int8 and head.qvalue.shape == w.shape
    scale = np.abs(w).max(axis=0, keepdims=True) / 127.5
    np.testing.assert_allclose(np.asarray(head.scale, np.float32).reshape(scale.shape), scale, rtol=1e-6)
    got, ratio = np.asarray(head.qvalue).astype(np.int32), w / scale
    inner = np.abs(ratio) < 127.4  # at +-absmax, w / scale = +-127.5 is a rounding tie that float error may break
    np.testing.assert_array_equal(got[inner], np.round(ratio[inner]).astype(np.int32))
    assert np.all(np.abs(got[~inner]) >= 127) and inner.mean() > 0.9


def test_weight_only_and_dynamic_activations_differ_and_weights_take_a_quarter_of_the_bytes():
    model, params, inputs = _model_and_params("gpt_tiny", d_model=64, d_ff=256)
    w_model, w_params = q.quantize(model, params, "int8", *inputs)
    d_model, d_params = q.quantize(model, params, "int8_dynamic", *inputs)
    w_out = np.asarray(w_model.apply({"params": w_params}, *inputs))
    d_out = np.asarray(d_model.apply({"params": d_params}, *inputs))
    assert np.abs(w_out - d_out).max() > 1e-4, "int8_dynamic must quantize the activations too"
    kernels = sum(x.qvalue.size for x in _quantized_leaves(w_params).values())
    total, after = q.param_bytes(params), q.param_bytes(w_params)
    # The quantized kernels shrink from 4 bytes to 1 (plus a float scale per channel); the rest stays.
    assert after < total - 2.9 * kernels, (total, after, kernels)


def test_quantized_encoder_decoder_decodes_with_its_cache_as_its_forward_pass_predicts():
    from tfm import decode

    model, params, inputs = _model_and_params("transformer_tiny")
    qmodel, qparams = q.quantize(model, params, "int8_dynamic", *inputs)
    src = inputs[0]
    out = np.asarray(decode.generate_seq2seq(qmodel, qparams, src, max_len=6, bos_id=1, eos_id=2, pad_id=0))
    tgt_in = np.concatenate([np.ones((src.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    logits = np.asarray(qmodel.apply({"params": qparams}, src, jnp.asarray(tgt_in)))
    first = logits[:, 0].copy()
    first[:, 0] = -np.inf  # the decoder never emits pad
    np.testing.assert_array_equal(first.argmax(-1), out[:, 0])


def test_an_unknown_mode_and_a_missing_qwix_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"quantize='int4': choose from \('int8', 'int8_dynamic'\)"):
        q.rules("int4")
    import builtins

    real = builtins.__import__

    def no_qwix(name, *args, **kwargs):
        if name == "qwix":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_qwix)
    with pytest.raises(ValueError, match=r"quantization needs the qwix package: pip install 'tfm-jax\[quantize\]'"):
        q.import_qwix()


def test_a_quantized_decoder_generates_with_its_cache_what_its_forward_pass_predicts():
    from tfm import decode

    model, params, inputs = _model_and_params("llama_tiny")
    qmodel, qparams = q.quantize(model, params, "int8_dynamic", *inputs)
    prompt = jnp.asarray([[5, 9, 4, 12]], jnp.int32)
    out = np.asarray(decode.generate(qmodel, qparams, prompt, max_new_tokens=6, temperature=0.0))
    logits = np.asarray(qmodel.apply({"params": qparams}, jnp.asarray(out[:, :-1])))
    np.testing.assert_array_equal(logits[0, 3:].argmax(-1), out[0, 4:])  # each new token is the forward pass's argmax
