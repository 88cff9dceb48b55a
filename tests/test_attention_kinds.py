"""The efficient attention kinds inside the models: encoder, decoder, GQA, decoding, config errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import maxerr
from tfm.decode import generate
from tfm.models import GPT, Transformer, gpt_tiny, llama_tiny, transformer_tiny

pytestmark = pytest.mark.usefixtures("cheap_xla_compiles")

KINDS = {
    "local": dict(attention="local", attention_window=3),
    "block_sparse": dict(attention="block_sparse", attention_window=3, attention_global_tokens=1, attention_global_stride=5),
    "linear": dict(attention="linear"),
    "flash": dict(attention="flash"),
}


def _decode_logits(model, params, tokens, prefill=4):
    """Logits of ``tokens`` computed through the decoding path: a prefill chunk, then one token at a time."""
    dec = type(model)(model.config.replace(decode=True))
    _, variables = dec.apply({"params": params}, tokens, mutable=["cache"])
    cache, outs = variables["cache"], []
    pieces = [tokens[:, :prefill]] + [tokens[:, i : i + 1] for i in range(prefill, tokens.shape[1])]
    for piece in pieces:
        logits, variables = dec.apply({"params": params, "cache": cache}, piece, mutable=["cache"])
        cache = variables["cache"]
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


SLOW = pytest.mark.slow  # the same property on a second model; the default suite keeps one of each


@pytest.mark.parametrize(
    "base,kind",
    [(llama_tiny, k) for k in ("flash", "linear", "local")]
    + [(gpt_tiny, k) for k in ("block_sparse", "linear")]
    + [pytest.param(llama_tiny, "block_sparse", marks=SLOW)]
    + [pytest.param(gpt_tiny, k, marks=SLOW) for k in ("flash", "local")],
    ids=lambda v: v if isinstance(v, str) else ("llama-rope-gqa" if v.position == "rope" else "gpt"),
)
def test_decoder_only_decoding_equals_the_full_forward_pass(base, kind):
    cfg = base.replace(**KINDS[kind])
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    full = jax.jit(model.apply)({"params": params}, tokens)
    assert maxerr(_decode_logits(model, params, tokens), full) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "local"])
def test_the_sampling_loop_decodes_with_the_recurrent_state_and_the_windowed_cache(kind):
    cfg = llama_tiny.replace(**KINDS[kind])
    model = GPT(cfg)
    prompt = jax.random.randint(jax.random.key(2), (2, 4), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), prompt)["params"]
    out = generate(model, params, prompt, max_new_tokens=6)
    # Greedy through the loop equals greedy by repeated full forward passes.
    seq, apply = prompt, jax.jit(model.apply)
    for _ in range(6):
        nxt = jnp.argmax(apply({"params": params}, seq)[:, -1], -1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("base", [gpt_tiny, llama_tiny], ids=["gpt", "llama-rope-gqa"])
def test_sparse_kinds_whose_pattern_covers_everything_equal_full_attention(base):
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, base.vocab_size)
    full_model = GPT(base)
    params = full_model.init(jax.random.key(1), tokens)["params"]
    ref = full_model.apply({"params": params}, tokens)
    for kwargs in (dict(attention="local", attention_window=10), dict(attention="block_sparse", attention_window=2, attention_global_stride=1), dict(attention="flash")):
        out = GPT(base.replace(**kwargs)).apply({"params": params}, tokens)
        assert maxerr(out, ref) < 1e-5, kwargs


def _seq2seq(kind_kwargs, vocab=64):
    cfg = transformer_tiny.replace(vocab_size=vocab, num_kv_heads=2, **kind_kwargs)  # GQA too
    model = Transformer(cfg)
    src = jax.random.randint(jax.random.key(3), (2, 9), 3, vocab).at[0, 6:].set(0)  # row 0 padded
    tgt = jax.random.randint(jax.random.key(4), (2, 7), 3, vocab)
    params = jax.jit(model.init)(jax.random.key(1), src, tgt)["params"]
    return model, params, src, tgt


@pytest.mark.parametrize("kind", ["linear", "local", pytest.param("block_sparse", marks=SLOW), pytest.param("flash", marks=SLOW)])
def test_encoder_decoder_with_padding_decodes_like_its_forward_pass(kind):
    model, params, src, tgt = _seq2seq(KINDS[kind])
    full = jax.jit(model.apply)({"params": params}, src, tgt)
    assert bool(jnp.all(jnp.isfinite(full)))
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    dec = Transformer(model.config.replace(decode=True))
    call = lambda t, cache=None: dec.apply(  # noqa: E731
        {"params": params, **({"cache": cache} if cache is not None else {})}, t, encoded, src,
        method=Transformer.decode, mutable=["cache"],
    )  # fmt: skip
    _, v = call(tgt)
    cache, outs = v["cache"], []
    for piece in [tgt[:, :3]] + [tgt[:, i : i + 1] for i in range(3, tgt.shape[1])]:
        logits, v = call(piece, cache)
        cache = v["cache"]
        outs.append(logits)
    assert maxerr(jnp.concatenate(outs, axis=1), full) < 1e-5


def test_encoder_with_a_window_covering_the_source_equals_full_attention_with_padding():
    model, params, src, tgt = _seq2seq({})
    ref = model.apply({"params": params}, src, tgt)
    for kwargs in (dict(attention="local", attention_window=16), dict(attention="block_sparse", attention_window=16)):
        other = Transformer(model.config.replace(**kwargs))
        assert maxerr(other.apply({"params": params}, src, tgt), ref) < 1e-5, kwargs


def test_the_efficient_kinds_refuse_what_they_cannot_do():
    tokens = jnp.ones((1, 6), jnp.int32)
    model = GPT(gpt_tiny.replace(attention="local", attention_window=2))
    params = GPT(gpt_tiny).init(jax.random.key(0), tokens)["params"]
    with pytest.raises(ValueError, match="packed segments"):
        model.apply({"params": params}, tokens, segment_ids=jnp.ones((1, 6), jnp.int32))
    with pytest.raises(ValueError, match="attention_dropout_rate"):
        gpt_tiny.replace(attention="linear", attention_dropout_rate=0.1)
    with pytest.raises(ValueError, match="attention must be one of"):
        gpt_tiny.replace(attention="sparse")
    with pytest.raises(ValueError, match="bias"):  # ALiBi is an additive bias: full attention only
        GPT(gpt_tiny.replace(attention="local", position="alibi")).init(jax.random.key(0), tokens)


@pytest.mark.parametrize("kind", ["linear", pytest.param("local", marks=SLOW), pytest.param("block_sparse", marks=SLOW), pytest.param("flash", marks=SLOW)])
def test_each_kind_trains_through_the_trainer(kind):
    from tfm import config as config_lib
    from tfm.trainer import Trainer

    for kwargs in [KINDS[kind]]:
        c = config_lib.default_config()
        c.model.preset = "llama_tiny"
        with c.model.ignore_type():
            c.model.update(kwargs)
        c.data.name = "synthetic_lm"
        with c.data.ignore_type():
            c.data.update(dict(vocab_size=64, seq_len=16))
        c.data.batch_size = 8  # one row per fake device
        c.train.progress = "none"
        c.train.tensorboard = False
        trainer = Trainer(c)
        state = trainer.init_state()
        state, m = trainer.train_step(state, next(trainer.dataset.iterator("train")))
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
