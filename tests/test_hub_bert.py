"""BERT checkpoints in and out of tfm: the backbone and its three heads against transformers, with padding;
export, unscanned import, a fresh tfm model's round trip, full-size counts, unsupported options."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm.hub import ARCHITECTURES, HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import PRESETS, bert_base, bert_base_qa, count_params  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, type_vocab_size=2, num_labels=3)  # fmt: skip
ARCHS = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering")
B, T, REAL = 2, 12, 8  # the second row is padding (token 0, the pad id) from position REAL on


def randomised(model, seed):
    """Every parameter redrawn: HF initialises LayerNorms and biases to ones and zeros, which would hide a bad map.
    The LayerNorm scales are drawn around 1 (around 0 the positions' outputs all but coincide)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, mean=1.0 if "LayerNorm.weight" in name else 0.0, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, arch in enumerate(ARCHS):
        cfg = TINY if arch != "BertForQuestionAnswering" else {**TINY, "num_labels": 2}
        torch.manual_seed(i)
        model = randomised(getattr(transformers, arch)(transformers.BertConfig(**cfg)), seed=i)
        out[arch] = save_hf(model, tmp_path_factory.mktemp(arch)), model
    return out


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], (B, T)).astype(np.int32)
    tokens[1, REAL:] = 0
    types = rng.integers(0, 2, (B, T)).astype(np.int32)
    return tokens, types


def torch_outputs(model, tokens, types) -> tuple[np.ndarray, ...]:
    """What each architecture predicts: (hidden states, pooled) / MLM logits / class logits / (start, end)."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    token_type_ids=torch.as_tensor(types, dtype=torch.long),
                    attention_mask=torch.as_tensor(tokens != 0, dtype=torch.long))  # fmt: skip
    if isinstance(model, transformers.BertModel):
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()
    if isinstance(model, transformers.BertForQuestionAnswering):
        return out.start_logits.numpy(), out.end_logits.numpy()
    return (out.logits.numpy(),)


def tfm_outputs(model, params, tokens, types) -> tuple[np.ndarray, ...]:
    out = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(types))
    return tuple(np.asarray(o) for o in (out if isinstance(out, tuple) else (out,)))


def assert_same(ours, theirs, arch, tol):
    """Every output at the real positions: all of row 0, row 1 before its padding (pooled and class logits: per row)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape, (arch, a.shape, b.shape)
        per_position = a.ndim >= 2 and a.shape[1] == T
        spread = np.std(b, axis=1).mean() if per_position else np.std(b)
        assert spread > 0.1, arch  # outputs that differ across positions and rows: a wrong map would show
        assert maxerr(a[0], b[0]) <= tol, arch
        assert maxerr(a[1, :REAL] if per_position else a[1], b[1, :REAL] if per_position else b[1]) <= tol, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_import_matches_transformers_with_padding(checkpoints, arch):
    directory, ref = checkpoints[arch]
    model, params = from_pretrained(directory)
    assert type(model).__name__ == arch
    tokens, types = _inputs()
    assert_same(tfm_outputs(model, params, tokens, types), torch_outputs(ref, tokens, types), arch, 1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unscanned_import_is_the_same_model(checkpoints, arch):
    directory, ref = checkpoints[arch]
    model, params = from_pretrained(directory, scan_layers=False)
    encoder = params["encoder"] if arch == "BertModel" else params["bert"]["encoder"]
    assert "layers_1" in encoder and "layers" not in encoder
    tokens, types = _inputs(seed=1)
    assert_same(tfm_outputs(model, params, tokens, types), torch_outputs(ref, tokens, types), arch, 1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers_with_the_same_outputs(checkpoints, arch, tmp_path):
    directory, ref = checkpoints[arch]
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == arch
    back = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).eval()
    tokens, types = _inputs(seed=2)
    assert_same(torch_outputs(back, tokens, types), torch_outputs(ref, tokens, types), arch, 1e-6)


@pytest.mark.parametrize("preset", ["bert_tiny", "bert_tiny_mlm", "bert_tiny_classifier", "bert_tiny_qa"])
def test_a_fresh_tfm_bert_exports_and_round_trips(preset, tmp_path):
    """A model tfm built itself leaves tfm and comes back; the MLM's pooler (unused by its logits) stays behind."""
    module = PRESETS[preset].model()
    tokens, types = _inputs(seed=3)
    rng = np.random.default_rng(4)  # drawn for the model's shapes: no zero bias hides a bad map; norm scales around 1
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(1.0 if path[-1].key == "scale" else 0.0, 0.2, x.shape).astype(np.float32),
        abstract_params(module))
    arch = save_pretrained(module, params, tmp_path / "fresh")
    hf = getattr(transformers, arch).from_pretrained(str(tmp_path / "fresh")).eval()
    assert_same(tfm_outputs(module, params, tokens, types), torch_outputs(hf, tokens, types), arch, 1e-4)
    model, again = from_pretrained(tmp_path / "fresh")
    assert type(model) is type(module)
    expect = {k: v for k, v in params.get("bert", params).items() if k != "pooler" or model.config.pooler}
    got = again.get("bert", again)
    assert sorted(got) == sorted(expect)
    for a, b in zip(jax.tree.leaves(expect), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BASE_UNCASED = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute",
                    model_type="bert")  # fmt: skip


COUNTS = [("BertModel", bert_base, 109_482_240), ("BertForQuestionAnswering", bert_base_qa, 108_893_186)]


@pytest.mark.parametrize("arch, preset, expected", COUNTS)
def test_full_size_bert_config_counts_as_the_preset_and_transformers(arch, preset, expected):
    cls, cfg = ARCHITECTURES[arch].to_tfm({**BASE_UNCASED, "architectures": [arch]}, arch)
    assert cfg == preset
    assert count_params(abstract_params(cls(cfg))) == expected
    with torch.device("meta"):  # transformers' own count, nothing allocated
        ref = getattr(transformers, arch)(transformers.BertConfig(**BASE_UNCASED))
    assert sum(p.numel() for p in ref.parameters()) == expected


def test_unsupported_options_are_named(checkpoints, tmp_path):
    directory, _ = checkpoints["BertForMaskedLM"]
    write = config_writer(directory, tmp_path)

    cases = [(dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key' is not"),
             (dict(is_decoder=True), "is_decoder=True is not implemented"),
             (dict(add_cross_attention=True), "add_cross_attention=True is not implemented"),
             (dict(hidden_act="gelu_fast"), "hidden_act='gelu_fast' is not implemented"),
             (dict(tie_word_embeddings=False), "tie_word_embeddings=False is not implemented"),
             (dict(classifier_dropout=0.3), "classifier_dropout=0.3 is not implemented"),
             (dict(architectures=["BertForQuestionAnswering"], num_labels=3), "num_labels=3 is not")]  # fmt: skip
    for i, (changes, message) in enumerate(cases):
        with pytest.raises(HubError, match=message):
            config_from_pretrained(write(f"case{i}", **changes))
    config_from_pretrained(write("absolute", position_embedding_type="absolute"))  # the supported value passes


def test_a_checkpoint_missing_a_tensor_or_with_an_extra_one_is_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, _ = checkpoints["BertForSequenceClassification"]
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    short = {k: v for k, v in tensors.items() if k != "bert.pooler.dense.weight"}
    extra = {**tensors, "bert.encoder.layer.0.attention.self.rotary": np.zeros(3, np.float32)}
    for name, changed in [("short", short), ("extra", extra)]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
        save_file(changed, str(d / "model.safetensors"))
        with pytest.raises(HubError, match="pooler.dense.weight" if name == "short" else "attention.self.rotary"):
            from_pretrained(d)
