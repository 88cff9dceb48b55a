"""Decoding: KV-cache loops against full forward passes, beam search against exhaustive search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm.decode import beam_search, generate, generate_seq2seq, length_penalty, sample_logits
from tfm.models import GPT, Transformer, gpt_tiny, llama_tiny, transformer_tiny

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")


def init(model, *args):
    return jax.jit(model.init)(jax.random.key(1), *args)["params"]


def greedy_full_gpt(model, params, prompt, n):
    seq = prompt
    apply = jax.jit(model.apply)
    for _ in range(n):
        nxt = jnp.argmax(apply({"params": params}, seq)[:, -1], -1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    return seq


@pytest.mark.parametrize("cfg", [gpt_tiny, llama_tiny], ids=["gpt-learned", "llama-rope-gqa"])
def test_gpt_greedy_with_cache_equals_repeated_full_forward(cfg):
    model = GPT(cfg)
    prompt = jax.random.randint(jax.random.key(2), (3, 5), 0, cfg.vocab_size)
    params = init(model, prompt)
    out = generate(model, params, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(out, greedy_full_gpt(model, params, prompt, 8))


def seq2seq_setup(vocab=64):
    cfg = transformer_tiny.replace(vocab_size=vocab)
    model = Transformer(cfg)
    src = jax.random.randint(jax.random.key(3), (3, 7), 3, vocab).at[0, 5:].set(0)  # row 0 padded
    params = init(model, src, src)
    return model, params, src


def greedy_full_seq2seq(model, params, src, n, bos=1):
    tgt = jnp.full((src.shape[0], 1), bos, jnp.int32)
    apply = jax.jit(model.apply)
    for _ in range(n):
        nxt = jnp.argmax(apply({"params": params}, src, tgt)[:, -1], -1).astype(jnp.int32)
        tgt = jnp.concatenate([tgt, nxt[:, None]], axis=1)
    return tgt[:, 1:]


def test_seq2seq_greedy_with_cache_equals_repeated_full_forward_and_stops_at_eos():
    model, params, src = seq2seq_setup()
    ref = greedy_full_seq2seq(model, params, src, 6)
    out = generate_seq2seq(model, params, src, max_len=6, bos_id=1, eos_id=None)
    np.testing.assert_array_equal(out, ref)
    # Make row 0's third token the EOS: row 0 ends there, padded after; the others run on.
    eos = int(ref[0, 2])
    out = generate_seq2seq(model, params, src, max_len=6, bos_id=1, eos_id=eos)
    first = int(np.argmax(np.asarray(ref[0]) == eos))
    np.testing.assert_array_equal(out[0, : first + 1], ref[0, : first + 1])
    assert np.all(np.asarray(out[0, first + 1 :]) == 0)


def test_beam_of_one_without_length_penalty_is_greedy():
    model, params, src = seq2seq_setup()
    ref = greedy_full_seq2seq(model, params, src, 6)
    eos = int(ref[1, 3])
    greedy = generate_seq2seq(model, params, src, max_len=6, bos_id=1, eos_id=eos)
    beam, _ = beam_search(model, params, src, beam_size=1, alpha=0.0, max_len=6, bos_id=1, eos_id=eos)
    np.testing.assert_array_equal(beam, greedy)


def test_top_k_one_is_greedy_and_sampling_is_reproducible():
    model, params, src = seq2seq_setup()
    greedy = generate_seq2seq(model, params, src, max_len=6, bos_id=1, eos_id=None)
    key = jax.random.key(7)
    top1 = generate_seq2seq(model, params, src, key, max_len=6, bos_id=1, eos_id=None, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    a = generate_seq2seq(model, params, src, key, max_len=6, bos_id=1, eos_id=None, temperature=1.5)
    b = generate_seq2seq(model, params, src, key, max_len=6, bos_id=1, eos_id=None, temperature=1.5)
    c = generate_seq2seq(model, params, src, jax.random.key(8), max_len=6, bos_id=1, eos_id=None, temperature=1.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    gpt = GPT(gpt_tiny)
    prompt = jnp.ones((2, 3), jnp.int32)
    gp = init(gpt, prompt)
    s1 = generate(gpt, gp, prompt, key, max_new_tokens=10, temperature=1.0, top_p=0.9)
    s2 = generate(gpt, gp, prompt, key, max_new_tokens=10, temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(s1, s2)


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = lambda **kw: np.array([int(sample_logits(logits, k, 1.0, **kw)[0]) for k in keys[:400]])  # noqa: E731
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 needs the second; 0.8 >= 0.7 stops there
    assert set(draw(top_p=0.5)) == {0}
    assert set(draw()) == {0, 1, 2, 3}
    assert int(sample_logits(logits, None, 0.0)[0]) == 0


def test_beam_search_is_exact_when_the_beam_holds_every_hypothesis():
    """Vocabulary 4, length 3: with 18 beams nothing is pruned, so beam search must find the best
    EOS-terminated sequence of an exhaustive search, with the same length-penalised score."""
    model, params, src = seq2seq_setup(vocab=4)
    eos, bos, max_len, alpha = 2, 1, 3, 0.6
    tokens, scores = beam_search(model, params, src, beam_size=18, alpha=alpha, max_len=max_len, bos_id=bos, eos_id=eos)
    apply = jax.jit(model.apply)
    for row in range(src.shape[0]):
        best, best_seq = -np.inf, None
        for n in range(1, max_len + 1):
            for body in itertools.product([0, 1, 3], repeat=n - 1):  # any non-EOS tokens, then EOS
                y = list(body) + [eos]
                tgt = jnp.array([[bos] + y[:-1]], jnp.int32)
                logp = jax.nn.log_softmax(apply({"params": params}, src[row : row + 1], tgt)[0])
                score = float(sum(logp[t, y[t]] for t in range(n)) / length_penalty(n, alpha))
                if score > best:
                    best, best_seq = score, y + [0] * (max_len - n)
        np.testing.assert_allclose(float(scores[row]), best, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(tokens[row]), best_seq)
