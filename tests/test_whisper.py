"""Whisper: the log-mel front end against the formula, the preset's size, cached decoding, the data, the metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm import asr, decode
from tfm.data import make_dataset
from tfm.data.speech import DIGITS
from tfm.layers import audio
from tfm.models import PRESETS
from tfm.models.whisper import WHISPER_TINY_SINUSOIDS, Whisper, sinusoids, whisper_micro


def _reference_log_mel(x: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's formula in float64 NumPy, loops where they are clearest."""
    n_fft, hop, sr = 400, 160, 16000
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = [padded[i * hop : i * hop + n_fft] * window for i in range(1 + (len(padded) - n_fft) // hop)]
    power = np.abs(np.fft.rfft(np.array(frames), axis=1)) ** 2
    power = power[:-1]

    def mel(f):  # Slaney: linear to 1 kHz, then logarithmic
        return 3 * f / 200 if f < 1000 else 15 + 27 * np.log(f / 1000) / np.log(6.4)

    def hz(m):
        return 200 * m / 3 if m < 15 else 1000 * np.exp(np.log(6.4) * (m - 15) / 27)

    edges = [hz(m) for m in np.linspace(mel(0.0), mel(sr / 2), n_mels + 2)]
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    bank = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            tri = max(0.0, min((f - lo) / (c - lo), (hi - f) / (hi - c)))
            bank[k, m] = tri * 2 / (hi - lo)
    log_spec = np.log10(np.maximum(power @ bank, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def test_log_mel_equals_the_formula():
    x = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    x[:2000] *= 0.0  # a silent start exercises the clamp
    ours = np.asarray(audio.log_mel_spectrogram(x))
    assert ours.shape == (50, 80)
    np.testing.assert_allclose(ours, _reference_log_mel(x), atol=2e-4)
    batched = np.asarray(audio.log_mel_spectrogram(np.stack([x, x[::-1].copy()])))
    np.testing.assert_allclose(batched[0], ours, atol=1e-6)  # the clamp is per clip
    np.testing.assert_allclose(batched[1], _reference_log_mel(x[::-1].copy()), atol=2e-4)


def test_log_mel_equals_transformers_feature_extractor():
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor()
    np.testing.assert_allclose(audio.mel_filters(), fe.mel_filters, atol=1e-6)
    x = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    ref = fe._np_extract_fbank_features(x[None], "cpu")[0].T
    np.testing.assert_allclose(np.asarray(audio.log_mel_spectrogram(x)), ref, atol=1e-5)


def test_log_mel_refuses_bad_audio():
    with pytest.raises(ValueError, match="too short"):
        audio.log_mel_spectrogram(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        audio.log_mel_spectrogram(np.zeros((1, 2, 800), np.float32))


def test_whisper_tiny_has_the_published_parameter_count():
    # openai/whisper-tiny: 37,760,640 as Hugging Face counts, with the fixed encoder sinusoids as a weight.
    assert PRESETS["whisper_tiny"].num_params() + WHISPER_TINY_SINUSOIDS == 37_760_640
    shapes = PRESETS["whisper_tiny"].init_shapes()["params"]
    assert "bias" not in shapes["encoder"]["layers"]["self_attention"]["key"]  # Whisper's keys have no bias


def test_sinusoids_follow_whisper_spacing():
    s = sinusoids(10, 8)
    inv = np.exp(-np.log(10_000) / 3 * np.arange(4))  # channels / 2 - 1 = 3 steps from 1 to 1/10000
    np.testing.assert_allclose(s[7, :4], np.sin(7 * inv), rtol=1e-6)
    np.testing.assert_allclose(s[7, 4:], np.cos(7 * inv), rtol=1e-6)


def _micro():
    model = Whisper(whisper_micro)
    feats = jax.random.normal(jax.random.key(1), (2, 32, 80))
    tgt = jax.random.randint(jax.random.key(2), (2, 7), 3, 32)
    params = model.init(jax.random.key(0), feats, tgt)["params"]
    return model, params, feats


def test_cached_decoding_equals_full_forward_passes():
    model, params, feats = _micro()
    out = decode.generate_seq2seq(model, params, feats, max_len=8, bos_id=1, eos_id=None, pad_id=0)
    # Greedy by hand: a full forward pass (no cache) for every new token. The decoder is causal, so a
    # prefix padded to a fixed length gives the prefix's logits at its last real position (one compile).
    forward = jax.jit(lambda tokens: model.apply({"params": params}, feats, tokens))
    prefix = jnp.zeros((2, 9), jnp.int32).at[:, 0].set(1)
    for i in range(8):
        prefix = prefix.at[:, i + 1].set(jnp.argmax(forward(prefix)[:, i], -1).astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(prefix[:, 1:]))
    beam, _ = decode.beam_search(model, params, feats, beam_size=1, alpha=0.0, max_len=8, bos_id=1, eos_id=2)
    greedy = decode.generate_seq2seq(model, params, feats, max_len=8, bos_id=1, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))


def test_whisper_refuses_features_it_cannot_read():
    model, params, _ = _micro()
    with pytest.raises(ValueError, match="80"):
        model.apply({"params": params}, jnp.zeros((1, 32, 40)), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="even"):
        model.apply({"params": params}, jnp.zeros((1, 31, 80)), jnp.ones((1, 4), jnp.int32))


def test_speech_digits_is_deterministic_and_decodes():
    options = dict(name="speech_digits", batch_size=4, train_size=8, eval_size=5, max_digits=2, clip_seconds=1.6)
    a, b = make_dataset(options), make_dataset(options)
    for split, i in (("train", 3), ("validation", 1)):
        x, y = a.batch(split, i), b.batch(split, i)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    batch = a.batch("validation", 1)  # rows 4..7 of 5: one real row, three zero-weight ones
    assert batch["inputs"].shape == (4, 160, 80) and batch["targets"].shape == (4, 12)
    assert batch["weights"][1:].sum() == 0
    text = a.transcripts("validation")[4]
    assert a.decode(batch["targets"][0]) == text and set(text.split()) <= set(DIGITS)
    assert a.decode(batch["decoder_inputs"][0][1:]) == text
    # Clips do not depend on how many a split holds.
    bigger = make_dataset({**options, "eval_size": 9})
    np.testing.assert_array_equal(bigger.pool("validation")["inputs"][:5], a.pool("validation")["inputs"])


def test_error_rates():
    assert asr.edit_distance("kitten", "sitting") == 3
    assert asr.edit_distance("", "abc") == 3 and asr.edit_distance("abc", "") == 3
    assert asr.error_rate(["one two"], ["one too"], "char") == pytest.approx(1 / 7)
    assert asr.error_rate(["one two", "six"], ["one too", "six"], "word") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="references"):
        asr.error_rate(["a"], [], "char")
