"""Marian checkpoints in and out of tfm: logits, export, greedy and beam generation, errors, counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm import decode  # noqa: E402
from tfm.hub import HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import count_params, transformer_tiny  # noqa: E402

PAD, EOS, V = 63, 0, 64
TINY = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS,
            activation_function="swish", scale_embedding=True)  # fmt: skip


def _random_marian(directory, seed=0, **changes):
    """A tiny MarianMTModel with every parameter and the logits bias random (not the fixed sinusoid table)."""
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(transformers.MarianConfig(**{**TINY, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.normal_(0.0, 0.2)
        model.final_logits_bias.normal_(0.0, 0.2)
        model.final_logits_bias[0, PAD] += 1.5  # pad would often win: the generation tests must suppress it
    return save_hf(model, directory), model


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    return _random_marian(tmp_path_factory.mktemp("marian"))


def _inputs(b=3, s=9, t=7, seed=0):
    """Source rows with right padding (pad = vocab - 1); decoder inputs that start with pad, as Marian's do."""
    rng = np.random.default_rng(seed)
    src = rng.integers(1, PAD, (b, s)).astype(np.int32)
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    tgt = rng.integers(0, PAD, (b, t)).astype(np.int32)
    tgt[:, 0] = PAD
    return src, tgt


def _hf_logits(model, src, tgt):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(src, dtype=torch.long), attention_mask=torch.as_tensor(src != PAD),
                    decoder_input_ids=torch.as_tensor(tgt, dtype=torch.long))  # fmt: skip
    return out.logits.numpy()


def _ours(model, params, src, tgt):
    return np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))


def test_import_logits_match_transformers_with_padding(marian_dir):
    directory, ref = marian_dir
    model, params = from_pretrained(directory)
    cfg = model.config
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (PAD, PAD, EOS)
    assert (cfg.sinusoid_layout, cfg.block.activation, cfg.mask_target_padding) == ("halves", "silu", False)
    src, tgt = _inputs()
    ours, theirs = _ours(model, params, src, tgt), _hf_logits(ref, src, tgt)
    assert ours.shape == theirs.shape == (3, 7, V)
    assert maxerr(ours, theirs) <= 1e-4
    # The padding mask matters: without it transformers' logits differ.
    with torch.no_grad():
        unmasked = ref(input_ids=torch.as_tensor(src, dtype=torch.long),
                       decoder_input_ids=torch.as_tensor(tgt, dtype=torch.long))  # fmt: skip
    assert maxerr(ours[1:], unmasked.logits.numpy()[1:]) > 1e-3


def test_unscanned_import_is_the_same_model(marian_dir):
    directory, ref = marian_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_1" in params["encoder"] and "layers_1" in params["decoder"]
    src, tgt = _inputs(seed=1)
    assert maxerr(_ours(model, params, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-4


def test_export_loads_in_transformers_with_the_same_logits(marian_dir, tmp_path):
    directory, ref = marian_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == "MarianMTModel"
    back = transformers.MarianMTModel.from_pretrained(str(tmp_path / "out")).eval()
    src, tgt = _inputs(seed=2)
    assert maxerr(_hf_logits(back, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-6
    _, again = from_pretrained(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("changes", [dict(tie_word_embeddings=False),
                                     dict(share_encoder_decoder_embeddings=False, decoder_vocab_size=80),
                                     dict(share_encoder_decoder_embeddings=False, decoder_vocab_size=80,
                                          tie_word_embeddings=False)],
                         ids=["untied-head", "two-vocabularies", "two-vocabularies-untied"])  # fmt: skip
def test_separate_tables_import_and_export(changes, tmp_path):
    directory, ref = _random_marian(tmp_path / "hf", seed=1, **changes)
    model, params = from_pretrained(directory)
    assert not model.config.share_embeddings and model.config.tie_output == changes.get("tie_word_embeddings", True)
    src, tgt = _inputs(seed=3)
    assert maxerr(_ours(model, params, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-4
    save_pretrained(model, params, tmp_path / "out")
    back = transformers.MarianMTModel.from_pretrained(str(tmp_path / "out")).eval()
    assert maxerr(_hf_logits(back, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-6


def test_a_fresh_tfm_transformer_exports_as_marian(tmp_path):
    """A tfm Transformer with Marian's options, initialised by tfm, leaves as a MarianMTModel with its logits."""
    from tfm.models import Transformer

    cfg = transformer_tiny.replace(vocab_size=V, pad_id=PAD, bos_id=PAD, eos_id=EOS, sinusoid_layout="halves",
                                   mask_target_padding=False, logits_bias=True, norm_epsilon=1e-5,
                                   activation="gelu")  # fmt: skip
    module = Transformer(cfg)
    src, tgt = _inputs(seed=4)
    import flax.linen as nn

    params = nn.unbox(jax.jit(module.init)(jax.random.key(3), jnp.asarray(src), jnp.asarray(tgt))["params"])
    params["logits_bias"] = jax.random.normal(jax.random.key(4), (V,))
    assert save_pretrained(module, params, tmp_path / "fresh") == "MarianMTModel"
    hf = transformers.MarianMTModel.from_pretrained(str(tmp_path / "fresh")).eval()
    assert maxerr(_ours(module, params, src, tgt), _hf_logits(hf, src, tgt)) <= 1e-4
    # The paper's preset (interleaved sinusoids, masked target pads) is not Marian: it is refused.
    plain = Transformer(transformer_tiny)
    with pytest.raises(HubError, match="no Hugging Face architecture"):
        save_pretrained(plain, params, tmp_path / "plain")


def _generation_config(**kw):
    """Marian's generation: start with pad, never emit pad, EOS forced at the last position."""
    return transformers.GenerationConfig(max_new_tokens=20, do_sample=False, decoder_start_token_id=PAD,
                                         pad_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS,
                                         bad_words_ids=[[PAD]], **kw)  # fmt: skip


def _hf_generate(ref, src, **kw):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.as_tensor(src, dtype=torch.long), attention_mask=torch.as_tensor(src != PAD),
                           generation_config=_generation_config(**kw)).numpy()  # fmt: skip
    assert (out[:, 0] == PAD).all()
    out = out[:, 1:]  # tfm returns the tokens after the start token, padded to max_len
    return np.pad(out, ((0, 0), (0, 20 - out.shape[1])), constant_values=PAD)


def _sources(seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, PAD, (6, 8)).astype(np.int32)
    src[1, 5:], src[4, 2:] = PAD, PAD
    return src


def test_greedy_generation_equals_transformers(marian_dir):
    directory, ref = marian_dir
    model, params = from_pretrained(directory)
    src = _sources(5)
    kw = dict(max_len=20, bos_id=PAD, eos_id=EOS, pad_id=PAD)
    ours = decode.generate_seq2seq(model, params, jnp.asarray(src), suppress_ids=(PAD,), force_eos=True, **kw)
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours, _hf_generate(ref, src, num_beams=1))
    ended = (ours == EOS).argmax(axis=1)
    assert (ours == EOS).any(axis=1).all() and (ended == 19).any()  # every row ends, some only by the forced EOS
    # Unconstrained, the model would emit pad along these outputs: the comparison exercises the suppression.
    logits = _ours(model, params, src, np.concatenate([np.full((6, 1), PAD, np.int32), ours[:, :-1]], axis=1))
    assert (logits.argmax(-1) == PAD).any()


def test_beam_search_equals_transformers(marian_dir):
    """4 beams, length penalties off on both sides (tfm alpha=0: GNMT's ((5+|Y|)/6)**0 = 1; transformers
    length_penalty=0: |Y|**0 = 1) and transformers' default early_stopping=False: a row stops once its 4
    finished hypotheses all beat the best live one, which, with unnormalised log-probabilities, is exact.
    tfm takes transformers' rules: pad suppressed after the log-softmax, a forced EOS scoring 0 at the last
    position, and only EOS among the 4 best of the 8 candidates finishing (``finish_top_k_only``)."""
    directory, ref = marian_dir
    model, params = from_pretrained(directory)
    src = _sources(6)
    tokens, scores = decode.beam_search(model, params, jnp.asarray(src), beam_size=4, alpha=0.0, max_len=20, bos_id=PAD,
                                        eos_id=EOS, pad_id=PAD, suppress_ids=(PAD,), force_eos=True,
                                        finish_top_k_only=True)  # fmt: skip
    theirs = _hf_generate(ref, src, num_beams=4, length_penalty=0.0, early_stopping=False)
    np.testing.assert_array_equal(np.asarray(tokens), theirs)
    assert np.isfinite(np.asarray(scores)).all()


def test_full_size_marian_counts_as_transformers():
    """Helsinki-NLP/opus-mt-en-de's config. transformers counts the shared table once and its two fixed
    sinusoid tables (frozen parameters) but not final_logits_bias (a buffer); tfm learns the bias, computes
    the sinusoids."""
    hf = dict(architectures=["MarianMTModel"], model_type="marian", vocab_size=58101, decoder_vocab_size=58101,
              d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
              encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
              scale_embedding=True, pad_token_id=58100, decoder_start_token_id=58100, eos_token_id=0,
              bos_token_id=0, forced_eos_token_id=0, share_encoder_decoder_embeddings=True, normalize_before=False,
              normalize_embedding=False, add_final_layer_norm=False, add_bias_logits=False,
              static_position_embeddings=True, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    config = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        ref = transformers.MarianMTModel(transformers.MarianConfig(**config))
    theirs = sum(p.numel() for p in ref.parameters())
    positions = sum(p.numel() for n, p in ref.named_parameters() if "embed_positions" in n)
    assert theirs == 74_410_496 and positions == 2 * 512 * 512
    from tfm.hub import ARCHITECTURES

    cls, cfg = ARCHITECTURES["MarianMTModel"].to_tfm(hf, "MarianMTModel")
    ours = count_params(abstract_params(cls(cfg)))
    assert ours == theirs - positions + ref.final_logits_bias.numel() == 73_944_309


def test_unsupported_options_are_named(marian_dir, tmp_path):
    directory, _ = marian_dir
    write = config_writer(directory, tmp_path)

    with pytest.raises(HubError, match="normalize_before=True is not implemented"):
        config_from_pretrained(write("pre", normalize_before=True))
    with pytest.raises(HubError, match="encoder_ffn_dim=64 differs from decoder_ffn_dim=128"):
        config_from_pretrained(write("ffn", decoder_ffn_dim=128))
    with pytest.raises(HubError, match="activation_function='tanh' is not implemented"):
        config_from_pretrained(write("act", activation_function="tanh"))
    with pytest.raises(HubError, match="decoder_layerdrop=0.1 is not implemented"):
        config_from_pretrained(write("drop", decoder_layerdrop=0.1))
    with pytest.raises(HubError, match="decoder_vocab_size=80 with share_encoder_decoder_embeddings=True"):
        config_from_pretrained(write("vocab", decoder_vocab_size=80))
    # A checkpoint without a layer's cross-attention: the missing tensor is named.
    from safetensors.numpy import load_file, save_file

    d = write("short")
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if "layers.1.encoder_attn.k_proj" not in k}
    save_file(kept, str(d / "model.safetensors"))
    with pytest.raises(HubError, match="decoder.layers.1.encoder_attn.k_proj"):
        from_pretrained(d)
