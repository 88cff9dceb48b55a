"""Transformer-XL: the relative attention against a NumPy reference of the paper's equation, memory
equal to attending over the concatenated sequence, no gradient into the memory, segment-by-segment
and token-by-token generation equal to one forward pass."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import random_params

from tfm.layers.relative_attention import RelativeMultiHeadAttention
from tfm.models.transformer_xl import TransformerXL, transformer_xl_tiny

D, N, H = 16, 2, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


def _sinusoid_halves(d, width):
    inv = 1.0 / 10_000 ** (np.arange(0, width, 2) / width)
    angle = d * inv
    return np.concatenate([np.sin(angle), np.cos(angle)])


def _reference(p, x, memory):
    """Dai et al. 2019, §3.3, term by term, one (batch, head, i, j) at a time."""
    context = np.concatenate([memory, x], 1)
    b, t, _ = x.shape
    s, m = context.shape[1], memory.shape[1]
    wq, wk, wv, wr = (p[k]["kernel"] for k in ("query", "key", "value", "relative"))
    u, v, wo = p["u_bias"], p["v_bias"], p["out"]["kernel"]
    out = np.zeros((b, t, D))
    for bi in range(b):
        heads = np.zeros((t, N, H))
        for n in range(N):
            for i in range(t):
                q = x[bi, i] @ wq[:, n]
                scores = np.full(s, -np.inf)
                for j in range(m + i + 1):  # keys up to the query's absolute position m + i
                    k = context[bi, j] @ wk[:, n]
                    r = _sinusoid_halves(m + i - j, D) @ wr[:, n]  # W_{k,R} R_{i-j}
                    scores[j] = q @ k + q @ r + u[n] @ k + v[n] @ r  # (a) + (b) + (c) + (d)
                w = np.exp((scores - scores.max()) / np.sqrt(H))
                w /= w.sum()
                heads[i, n] = w @ (context[bi] @ wv[:, n])
        out[bi] = np.einsum("tnh,nhd->td", heads, wo)
    return out


def _layer():
    layer = RelativeMultiHeadAttention(N, H, D)
    x = jax.random.normal(jax.random.key(0), (2, 5, D))
    memory = jax.random.normal(jax.random.key(1), (2, 3, D))
    params = {"params": random_params(layer, x, memory, scale=0.3)}
    return layer, params, x, memory


def test_relative_attention_is_the_papers_equation():
    layer, params, x, memory = _layer()
    got = layer.apply(params, x, memory)
    p = jax.tree.map(np.asarray, params["params"])
    want = _reference(p, np.asarray(x, np.float64), np.asarray(memory, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_attending_over_memory_equals_attending_over_the_concatenated_sequence():
    layer, params, x, memory = _layer()
    with_memory = layer.apply(params, x, memory)
    whole = layer.apply(params, jnp.concatenate([memory, x], 1))  # no memory: the causal layer over all 8
    np.testing.assert_allclose(np.asarray(with_memory), np.asarray(whole[:, 3:]), atol=1e-5)


def test_empty_memory_slots_are_not_attended():
    layer, params, x, memory = _layer()
    garbage = jnp.concatenate([100 * jnp.ones((2, 2, D)), memory], 1)
    mask = jnp.concatenate([jnp.zeros((2, 2), bool), jnp.ones((2, 3 + 5), bool)], 1)[:, None, None, :]
    np.testing.assert_allclose(np.asarray(layer.apply(params, x, garbage, mask=mask)),
                               np.asarray(layer.apply(params, x, memory)), atol=1e-5)  # fmt: skip


def _model(mem_len=32):
    model = TransformerXL(transformer_xl_tiny.replace(mem_len=mem_len))
    model.apply = jax.jit(model.apply)  # type: ignore[method-assign]
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
    params = {"params": random_params(model, tokens[:, :4], scale=0.3)}
    return model, params, tokens


def test_segments_with_memory_equal_one_forward_pass():
    """With a memory as long as the history, three segments of 4 see what one pass over 12 sees."""
    model, params, tokens = _model()
    full, _, _ = model.apply(params, tokens)
    memory = mask = None
    outs = []
    for start in range(0, 12, 4):
        logits, memory, mask = model.apply(params, tokens[:, start : start + 4], memory, mask)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
    assert memory.shape == (2, 2, 12, 32) and bool(mask.all())


def test_generation_token_by_token_with_memory_equals_the_forward_pass():
    """One token a call over a fixed-size memory that starts empty (masked): one compile, the full pass's logits."""
    model, params, tokens = _model(mem_len=12)
    full, _, _ = model.apply(params, tokens)
    memory, mask = jnp.zeros((2, 2, 12, 32)), jnp.zeros((2, 12), bool)
    for i in range(12):
        logits, memory, mask = model.apply(params, tokens[:, i : i + 1], memory, mask)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, i]), atol=1e-5)
    assert bool(mask.all())


def test_a_short_memory_keeps_the_last_mem_len_positions():
    model, params, tokens = _model(mem_len=4)
    _, memory, mask = model.apply(params, tokens[:, :6])
    _, memory2, _ = model.apply(params, tokens[:, 6:9], memory, mask)
    assert memory.shape == (2, 2, 4, 32) and memory2.shape == (2, 2, 4, 32)
    # Layer 0's memory is the embedding of the last 4 tokens.
    embed = params["params"]["embed"]["embedding"]
    np.testing.assert_allclose(np.asarray(memory2[0]), np.asarray(embed[tokens[:, 5:9]]), atol=1e-6)


def test_no_gradient_flows_into_the_memory():
    model, params, tokens = _model()

    def memory_sum(p):
        _, memory, _ = model.apply(p, tokens[:, :4])
        return jnp.sum(memory)

    grads = jax.grad(memory_sum)(params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))

    def loss_of_second_segment(p, through_memory):
        _, memory, mask = model.apply(p if through_memory else jax.lax.stop_gradient(p), tokens[:, :4])
        logits, _, _ = model.apply(p, tokens[:, 4:8], memory, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

    a = jax.grad(loss_of_second_segment)(params, True)
    b = jax.grad(loss_of_second_segment)(params, False)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # the same gradient, up to float32 rounding
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)


def test_the_config_refuses_what_xl_cannot_run():
    with pytest.raises(ValueError, match="attention='local': Transformer-XL attends with relative positions"):
        transformer_xl_tiny.replace(attention="local")
    with pytest.raises(ValueError, match="mem_len must be >= 0"):
        transformer_xl_tiny.replace(mem_len=-1)
    with pytest.raises(ValueError, match=r"memory must be \[num_layers=2, B, M, D\]"):
        model, params, tokens = _model()
        model.apply(params, tokens, jnp.zeros((3, 2, 4, 32)))


# Training with the memory carried from batch to batch ---------------------------------------


def _xl_config(steps, **changes):
    from test_train_cli import DATA

    from tfm import config as config_lib

    if not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    c = config_lib.load_config(os.path.join(ROOT, "configs", "shakespeare_xl.py:tiny"))
    overrides = [f"data.data_dir={DATA}", f"train.steps={steps}", "train.eval_steps=0", "train.progress=none",
                 "train.tensorboard=false", "mesh.data=1", *(f"{k}={v}" for k, v in changes.items())]  # fmt: skip
    return config_lib.apply_overrides(c, overrides)


def test_contiguous_batches_continue_each_row_and_reset_at_the_start():
    from tfm.data import make_dataset

    c = _xl_config(1)
    data = make_dataset(c.data.to_dict())
    n = data.segments("validation")
    first, second, wrapped = (data.batch("validation", i) for i in (0, 1, n))
    np.testing.assert_array_equal(second["inputs"][:, 0], first["targets"][:, -1])  # row r goes on where it stopped
    assert first["reset"].all() and not second["reset"].any() and wrapped["reset"].all()
    np.testing.assert_array_equal(wrapped["inputs"], first["inputs"])
    # The rows of batches 0..n-1 tile the validation text: each stream once, in order.
    assert data.num_batches("validation") == n and n * c.data.block_size <= len(data.splits["validation"]) // 8


def test_xl_trains_with_its_memory_and_resumes_exactly(tmp_path):
    from tfm.checkpoint import Checkpointer
    from tfm.trainer import Trainer

    devices = jax.devices()[:1]
    straight = Trainer(_xl_config(6, **{"train.checkpoint_every": 3}), str(tmp_path / "a"), devices=devices)
    assert straight.task.name == "lm_memory"
    straight.train()
    Trainer(_xl_config(3), str(tmp_path / "b"), devices=devices).train()
    resumed = Trainer(_xl_config(6), str(tmp_path / "b"), devices=devices)
    assert resumed.train()["start_step"] == 3

    def final(trainer, workdir):
        ck = Checkpointer(os.path.join(workdir, "checkpoints"))
        step, state, _ = ck.restore(trainer.abstract_state)
        ck.close()
        return step, state

    (sa, a), (sb, b) = final(straight, tmp_path / "a"), final(resumed, tmp_path / "b")
    assert sa == sb == 6
    memory = np.asarray(a.carry["memory"])
    assert memory.shape == (2, 8, 32, 32) and np.abs(memory).max() > 0 and bool(np.asarray(a.carry["memory_mask"]).all())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # parameters, optimizer and the memory itself
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Evaluation reads the validation text segment after segment with the memory too.
    metrics = straight.evaluate(a.params, steps=3)
    assert np.isfinite(metrics["eval/loss"])


def test_xl_refuses_gradient_accumulation():
    from tfm import config as config_lib
    from tfm.trainer import Trainer

    with pytest.raises(config_lib.ConfigError, match="train.grad_accum_steps=2: the lm_memory task carries a memory"):
        Trainer(_xl_config(2, **{"train.grad_accum_steps": 2}), devices=jax.devices()[:1])


def test_the_same_model_without_memory_trains_and_checkpoints(tmp_path):
    """``mem_len=0`` (the comparison run): nothing to carry, so the state holds no memory at all."""
    from tfm.trainer import Trainer

    trainer = Trainer(_xl_config(2, **{"model.mem_len": 0}), str(tmp_path), devices=jax.devices()[:1])
    assert trainer.abstract_state.carry is None
    summary = trainer.train()
    assert summary["step"] == 2 and os.path.isdir(tmp_path / "checkpoints" / "2")


def test_greedy_generation_with_memory_continues_as_the_forward_pass_predicts():
    from tfm.decode import generate_with_memory

    model, params, tokens = _model(mem_len=16)
    out = generate_with_memory(model, params["params"], tokens[:, :4], max_new_tokens=6)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(tokens[:, :4]))
    full, _, _ = model.apply(params, out)  # each drawn token is the argmax of the whole prefix's pass
    np.testing.assert_array_equal(np.asarray(out[:, 4:]), np.asarray(jnp.argmax(full[:, 3:-1], -1)))
