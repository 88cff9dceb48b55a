"""The Compressive Transformer: the strided-convolution compression and the attention-reconstruction
loss against NumPy, the memory's layout, identity compression equal to a plain XL memory of the
same size, gradients kept apart (the loss trains only the compression, the LM loss never does),
and training with exact resume."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from tfm.layers.compression import Compress, group_mask, reconstruction_loss
from tfm.models.transformer_xl import TransformerXL, compressive_transformer_tiny, transformer_xl_tiny

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


def test_compression_is_a_strided_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4))
    layer = Compress(rate=3, d_model=5)
    params = random_params(layer, x, scale=0.5)
    w, b = np.asarray(params["conv"]["kernel"]), np.asarray(params["conv"]["bias"])
    out = np.asarray(layer.apply({"params": params}, x))
    xs = np.asarray(x)
    want = np.stack([[sum(xs[i, g * 3 + k] @ w[k] for k in range(3)) + b for g in range(2)] for i in range(2)])
    assert out.shape == (2, 2, 5)
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="5 evicted memories do not split into groups of compression_rate=3"):
        layer.apply({"params": params}, x[:, :5])


def test_a_compressed_slot_is_real_only_when_all_its_states_are():
    mask = jnp.array([[False, False, False, True, True, True], [True, True, True, True, True, True]])
    np.testing.assert_array_equal(np.asarray(group_mask(mask, 3)), [[False, True], [True, True]])
    np.testing.assert_array_equal(np.asarray(group_mask(mask, 2)), [[False, False, True], [True, True, True]])


def _np_attend(wq, wk, wv, x, context, mask):
    q, k, v = np.einsum("btd,dnh->btnh", x, wq), np.einsum("bsd,dnh->bsnh", context, wk), np.einsum("bsd,dnh->bsnh", context, wv)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None, :], s, -np.inf)
    with np.errstate(invalid="ignore"):  # a row with no keys is NaN here; the loss must leave it out
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_the_reconstruction_loss_is_the_papers_mean_squared_attention_difference():
    rng = np.random.default_rng(0)
    wq, wk, wv = (rng.normal(size=(4, 2, 3)).astype(np.float32) for _ in range(3))
    h, old = rng.normal(size=(3, 5, 4)).astype(np.float32), rng.normal(size=(3, 4, 4)).astype(np.float32)
    comp = rng.normal(size=(3, 2, 4)).astype(np.float32)
    old_mask = np.array([[True] * 4, [False, True, True, True], [False] * 4])
    comp_mask = group_mask(jnp.asarray(old_mask), 2)

    def attend(x, context, mask):
        return jnp.asarray(_np_attend(wq, wk, wv, np.asarray(x), np.asarray(context), np.asarray(mask)))

    loss = float(reconstruction_loss(attend, h, old, old_mask, comp, comp_mask, 2))
    # Row 0 compares all 4 states with both slots; row 1 only the real group (states 2, 3 with slot 1); row 2 nothing.
    d0 = _np_attend(wq, wk, wv, h[:1], old[:1], old_mask[:1]) - _np_attend(wq, wk, wv, h[:1], comp[:1], np.ones((1, 2), bool))
    keep1 = np.array([[False, False, True, True]])
    d1 = _np_attend(wq, wk, wv, h[1:2], old[1:2], keep1) - _np_attend(wq, wk, wv, h[1:2], comp[1:2], np.array([[False, True]]))
    assert loss == pytest.approx((np.mean(d0**2) + np.mean(d1**2)) / 2, rel=1e-5)


def _model(cfg, t=4):
    model = TransformerXL(cfg)
    model.apply = jax.jit(model.apply, static_argnames=("mutable",))  # type: ignore[method-assign]
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
    params = {"params": random_params(model, tokens[:, :t], scale=0.3)}
    return model, params, tokens


def test_the_memory_holds_compressed_slots_then_the_recent_states():
    """Segment of 8, 4 recent slots, 4 compressed at rate 2: the first call evicts 4 empty slots and the
    first 4 states; layer 0's compressed slots are f_c(LN(embedding)) of tokens 0..3."""
    model, params, tokens = _model(compressive_transformer_tiny, t=8)
    _, memory, mask = model.apply(params, tokens[:, :8])
    assert memory.shape == (2, 2, 8, 32)
    np.testing.assert_array_equal(np.asarray(mask), [[False, False, True, True, True, True, True, True]] * 2)
    p = params["params"]
    emb = np.asarray(p["embed"]["embedding"])[np.asarray(tokens[:, :8])]
    np.testing.assert_allclose(np.asarray(memory[0, :, 4:]), emb[:, 4:], atol=1e-6)
    ln = p["layer_0"]["attention_norm"]
    x = emb[:, :4]
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * ln["scale"] + ln["bias"]
    conv = p["layer_0"]["compress"]["conv"]
    want = np.einsum("bgkd,kde->bge", normed.reshape(2, 2, 2, 32), np.asarray(conv["kernel"])) + np.asarray(conv["bias"])
    np.testing.assert_allclose(np.asarray(memory[0, :, 2:4]), want, atol=1e-4)
    with pytest.raises(ValueError, match="segment length 5 must be a multiple of compression_rate=2"):
        model.apply(params, tokens[:, :5])


def test_identity_compression_at_rate_1_is_a_plain_xl_memory_of_the_same_size():
    """f_c = identity: the compressed slots hold LN(state), which is what XL's attention makes of the state."""
    cfg = compressive_transformer_tiny.replace(mem_len=4, cmem_len=4, compression_rate=1)
    model, params, tokens = _model(cfg)
    p = jax.tree.map(lambda a: a, params["params"])
    for layer in ("layer_0", "layer_1"):
        p[layer]["compress"]["conv"]["kernel"] = jnp.eye(32)[None]
        p[layer]["compress"]["conv"]["bias"] = jnp.zeros(32)
    xl = TransformerXL(transformer_xl_tiny.replace(mem_len=8))
    p_xl = {k: ({n: v for n, v in layer.items() if n != "compress"} if k.startswith("layer_") else layer) for k, layer in p.items()}
    full, _, _ = xl.apply({"params": p_xl}, tokens)  # mem 8 >= every distance in a segment of 4 after two more
    memory = mask = None
    for start in range(0, 12, 4):
        logits, memory, mask = model.apply({"params": p}, tokens[:, start : start + 4], memory, mask)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, start : start + 4]), atol=1e-5)
    assert bool(mask.all())


def test_the_reconstruction_loss_trains_only_the_compression_and_the_lm_loss_never_does():
    model, params, tokens = _model(compressive_transformer_tiny.replace(compression_rate=2), t=8)
    _, memory, mask = model.apply(params, tokens[:, :8])

    def losses(p):
        (logits, _, _), aux = model.apply({"params": p}, tokens[:, 8:12], memory, mask, mutable=("aux_loss",))
        recon = sum(jax.tree.leaves(aux["aux_loss"]))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), recon

    g_lm = jax.grad(lambda p: losses(p)[0])(params["params"])
    g_rec = jax.grad(lambda p: losses(p)[1])(params["params"])
    assert float(losses(params["params"])[1]) > 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(g_rec):
        name = jax.tree_util.keystr(path)
        if "compress" in name:
            assert np.abs(np.asarray(leaf)).max() > 0, name
        else:
            np.testing.assert_array_equal(np.asarray(leaf), 0, err_msg=name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g_lm):
        if "compress" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(np.asarray(leaf), 0)


def test_the_compressive_transformer_trains_and_resumes_exactly(tmp_path):
    from test_transformer_xl import ROOT, _xl_config

    from tfm.checkpoint import Checkpointer
    from tfm.config import load_config
    from tfm.trainer import Trainer

    changes = {f"model.{k}": v for k, v in load_config(os.path.join(ROOT, "configs", "shakespeare_xl.py:tiny_compressive")).model.items()}
    devices = jax.devices()[:1]
    straight = Trainer(_xl_config(4, **changes, **{"train.checkpoint_every": 2}), str(tmp_path / "a"), devices=devices)
    summary = straight.train()
    Trainer(_xl_config(2, **changes), str(tmp_path / "b"), devices=devices).train()
    resumed = Trainer(_xl_config(4, **changes), str(tmp_path / "b"), devices=devices)
    assert resumed.train()["start_step"] == 2 and summary["step"] == 4
    states = []
    for workdir in (tmp_path / "a", tmp_path / "b"):
        ck = Checkpointer(os.path.join(workdir, "checkpoints"))
        states.append(ck.restore(straight.abstract_state)[1])
        ck.close()
    a, b = states
    assert a.carry["memory"].shape == (2, 8, 32, 32) and bool(np.asarray(a.carry["memory_mask"]).all())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.isfinite(straight.evaluate(a.params, steps=2)["eval/loss"])


def test_generation_reads_in_training_segments_and_matches_the_forward_pass():
    """Greedy: every drawn token is the argmax the model gives when the whole output is read in segments of 8."""
    from tfm.decode import generate_with_memory

    model, params, tokens = _model(compressive_transformer_tiny, t=8)
    out = generate_with_memory(model, params["params"], tokens[:, :5], max_new_tokens=14, segment_len=8)
    assert out.shape == (2, 19)
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(tokens[:, :5]))
    seq = jnp.concatenate([out, jnp.zeros((2, 5), jnp.int32)], axis=1)  # pad to whole segments
    memory = mask = None
    logits = []
    for start in range(0, 24, 8):
        seg_logits, memory, mask = model.apply(params, seq[:, start : start + 8], memory, mask)
        logits.append(seg_logits)
    predicted = jnp.argmax(jnp.concatenate(logits, axis=1), axis=-1)
    np.testing.assert_array_equal(np.asarray(out[:, 5:]), np.asarray(predicted[:, 4:18]))
    with pytest.raises(ValueError, match="segment_len=5: the compressed memory takes states in groups of compression_rate=2"):
        generate_with_memory(model, params["params"], tokens[:, :5], max_new_tokens=2, segment_len=5)
