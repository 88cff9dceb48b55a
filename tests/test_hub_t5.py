"""T5 checkpoints (v1.0 and v1.1) in and out of tfm: logits with padding, export, generation, counts, errors."""


import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm import decode  # noqa: E402
from tfm.hub import ARCHITECTURES, HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import count_params, t5_small  # noqa: E402

VOCAB, PAD, EOS = 80, 0, 1
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=PAD,
            eos_token_id=EOS, decoder_start_token_id=PAD)  # fmt: skip
VERSIONS = {"v1_0": dict(feed_forward_proj="relu"),
            "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def _randomise(model):
    """Every parameter random (layer norms start at ones); norm scales near one keep the activations O(1)."""
    for name, p in model.named_parameters():
        norm = "layer_norm" in name
        torch.nn.init.normal_(p, mean=1.0 if norm else 0.0, std=0.5 if norm else 0.2)


def _random_t5(seed: int, **config):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **config))
    with torch.no_grad():
        _randomise(model)
        if not model.config.scale_decoder_outputs:  # v1.1: a head of its own (as real checkpoints have)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"]) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def t5_dir(request, tmp_path_factory):
    model = _random_t5(0, **VERSIONS[request.param])
    return save_hf(model, tmp_path_factory.mktemp(f"t5_{request.param}")), model


def _inputs(seed=0, b=3, s=11, t=9):
    """Source with right padding (pad 0) and decoder inputs that start from the pad id, as T5's do."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, VOCAB, (b, s)).astype(np.int32)
    src[1, 7:] = PAD
    src[2, 4:] = PAD
    tgt = rng.integers(2, VOCAB, (b, t)).astype(np.int32)
    tgt[:, 0] = PAD
    return src, tgt


def _hf_logits(model, src, tgt):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(src, dtype=torch.long), attention_mask=torch.as_tensor(src != PAD),
                    decoder_input_ids=torch.as_tensor(tgt, dtype=torch.long))  # fmt: skip
    return out.logits.numpy()


def _ours(model, params, src, tgt):
    return np.asarray(model.apply({"params": params}, jnp.asarray(src), jnp.asarray(tgt)))


def test_import_logits_match_transformers_with_source_padding(t5_dir):
    directory, ref = t5_dir
    model, params = from_pretrained(directory)
    assert model.config.tie_embeddings == ref.config.scale_decoder_outputs
    src, tgt = _inputs()
    ours, theirs = _ours(model, params, src, tgt), _hf_logits(ref, src, tgt)
    assert ours.shape == theirs.shape == (3, 9, VOCAB)
    assert maxerr(ours, theirs) <= 1e-4
    # The padding matters: unmasked, the padded rows would differ.
    assert maxerr(_hf_logits(ref, src, tgt)[1:], _hf_logits(ref, np.where(src == PAD, 5, src), tgt)[1:]) > 1e-3


def test_unscanned_import_is_the_same_model(t5_dir):
    directory, ref = t5_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_2" in params["decoder"] and "layers_2" not in params["encoder"]
    src, tgt = _inputs(seed=1)
    assert maxerr(_ours(model, params, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-4


def test_export_loads_in_transformers_with_the_same_logits(t5_dir, tmp_path):
    directory, ref = t5_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == "T5ForConditionalGeneration"
    back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    assert back.config.scale_decoder_outputs == ref.config.scale_decoder_outputs
    src, tgt = _inputs(seed=2)
    assert maxerr(_hf_logits(back, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-6
    _, again = from_pretrained(tmp_path / "out")
    for a, b in zip(*(sorted(_flat(p).items()) for p in (params, again))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_a_fresh_tfm_t5_exports_and_round_trips(tmp_path):
    """A T5 tfm initialised itself (its decoder masks pads, its start token is not one) leaves tfm and comes back."""
    import flax.linen as nn
    import jax

    from tfm.models import T5, t5_tiny

    module = T5(t5_tiny.replace(activation="geglu_tanh", vocab_size=VOCAB))
    src, tgt = _inputs(seed=5)
    tgt[:, 0] = 1  # tfm's data starts the decoder from BOS = 1
    params = nn.unbox(jax.jit(module.init)(jax.random.key(3), jnp.asarray(src), jnp.asarray(tgt))["params"])
    assert save_pretrained(module, params, tmp_path / "fresh") == "T5ForConditionalGeneration"
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "fresh")).eval()
    assert maxerr(_ours(module, params, src, tgt), _hf_logits(hf, src, tgt)) <= 1e-4
    _, again = from_pretrained(tmp_path / "fresh")
    for a, b in zip(*(sorted(_flat(p).items()) for p in (params, again))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def _flat(params):
    from tfm.hub.convert import flatten

    return flatten(params)


# transformers sizes its generation cache by num_layers, not num_decoder_layers (3 here): it generates without one.
def _hf_generate(ref, src, eos_id):
    # eos_id None: an id the model never produces (min_new_tokens would suppress the config's EOS instead).
    eos_id = VOCAB if eos_id is None else eos_id
    with torch.no_grad():
        out = ref.generate(torch.as_tensor(src, dtype=torch.long), attention_mask=torch.as_tensor(src != PAD),
                           eos_token_id=eos_id, do_sample=False, num_beams=1, max_new_tokens=20,
                           pad_token_id=PAD, use_cache=False)  # fmt: skip
    out = out.numpy()
    assert (out[:, 0] == PAD).all()  # transformers returns the decoder start token (the pad id) first
    return out[:, 1:]


def test_greedy_generation_equals_transformers(t5_dir):
    """20 tokens without EOS, then with an EOS that ends row 0 early: each row stops at its first EOS and is
    padded after it (transformers stops once every row has ended; tfm pads to max_len)."""
    directory, ref = t5_dir
    model, params = from_pretrained(directory)
    src, _ = _inputs(seed=3)
    ours = decode.generate_seq2seq(model, params, jnp.asarray(src), max_len=20, bos_id=PAD, eos_id=None, pad_id=PAD)
    theirs = _hf_generate(ref, src, None)
    assert theirs.shape == (3, 20)
    np.testing.assert_array_equal(np.asarray(ours), theirs)

    eos = int(theirs[0, 4])  # a token row 0 produces: it ends there at the latest
    ours = np.asarray(decode.generate_seq2seq(model, params, jnp.asarray(src), max_len=20, bos_id=PAD, eos_id=eos,
                                              pad_id=PAD))  # fmt: skip
    theirs = _hf_generate(ref, src, eos)
    n = theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :n], theirs)
    assert (ours[:, n:] == PAD).all() and (ours[0, 5:] == PAD).all() and eos in ours[0, :5]


def _count_hf_meta(config: dict, untied_head: bool) -> int:
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
        if untied_head:  # transformers v5 ties the head unless the checkpoint has one; v1.1 checkpoints do
            model.lm_head.weight = torch.nn.Parameter(torch.empty(config["vocab_size"], config["d_model"]))
    return model.num_parameters()


T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                feed_forward_proj="relu", architectures=["T5ForConditionalGeneration"], pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
T5_V1_1_SMALL = dict(T5_SMALL, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip


def test_full_size_t5_small_config_counts_as_the_preset():
    cls, cfg = ARCHITECTURES["T5ForConditionalGeneration"].to_tfm(T5_SMALL, "T5ForConditionalGeneration")
    assert cfg.replace(mask_decoder_padding=True, attention_dropout_rate=0.0, activation_dropout_rate=0.0) == t5_small
    n = count_params(abstract_params(cls(cfg)))
    assert n == count_params(abstract_params(cls(t5_small))) == 60_506_624 == _count_hf_meta(T5_SMALL, False)


def test_full_size_t5_v1_1_small_config_counts_as_transformers():
    cls, cfg = ARCHITECTURES["T5ForConditionalGeneration"].to_tfm(T5_V1_1_SMALL, "T5ForConditionalGeneration")
    assert (cfg.block.activation, cfg.tie_embeddings, cfg.num_decoder_layers) == ("geglu_tanh", False, 8)
    assert count_params(abstract_params(cls(cfg))) == _count_hf_meta(T5_V1_1_SMALL, True) == 76_961_152


def test_a_v1_1_checkpoint_without_a_head_ties_it_as_transformers_does(tmp_path):
    """transformers v5 builds v1.1 with the head tied to the embedding (and no rescale) and saves no lm_head."""
    torch.manual_seed(1)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **VERSIONS["v1_1"]))
    with torch.no_grad():
        _randomise(ref)
    ref.eval()
    assert ref.lm_head.weight is ref.shared.weight and not ref.config.scale_decoder_outputs
    model, params = from_pretrained(save_hf(ref, tmp_path / "tied"))
    src, tgt = _inputs(seed=4)
    assert maxerr(_ours(model, params, src, tgt), _hf_logits(ref, src, tgt)) <= 1e-4


def test_unsupported_options_are_named(t5_dir, tmp_path):
    directory, _ = t5_dir
    write = config_writer(directory, tmp_path)

    with pytest.raises(HubError, match="feed_forward_proj='gated-relu6' is not implemented"):
        config_from_pretrained(write("act", feed_forward_proj="gated-relu6", dense_act_fn="relu6"))
    with pytest.raises(HubError, match="is_gated_act=.* contradicts feed_forward_proj"):
        config_from_pretrained(write("gated", feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=True))
    with pytest.raises(HubError, match="scale_decoder_outputs=True with tie_word_embeddings=False"):
        config_from_pretrained(write("scale", tie_word_embeddings=False, scale_decoder_outputs=True))
    with pytest.raises(HubError, match="pad_token_id=None"):
        config_from_pretrained(write("pad", pad_token_id=None))
