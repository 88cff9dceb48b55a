"""Llama, Mistral and Mixtral checkpoints in and out of tfm: logits, export, generation, errors, counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import maxerr, save_hf, torch_logits, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm import decode  # noqa: E402
from tfm.hub import ARCHITECTURES, HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.hub.llama import claims  # noqa: E402
from tfm.models import GPT, count_params, gpt2_small, gpt_moe_tiny, llama_tiny, mixtral_8x7b  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)  # fmt: skip
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500.0)),
    # Biases, a tied head and a head width other than d_model / num_heads.
    "llama_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=12)),
    # A sliding window shorter than the test sequences, so it changes the logits.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=5)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}  # fmt: skip
CLASSES = {"llama": "LlamaForCausalLM", "llama_bias": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "mixtral": "MixtralForCausalLM"}  # fmt: skip


def _randomise(model, seed):
    """Every parameter random (norm scales around 1), so a transposed or misplaced tensor shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.2)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_dir(request, tmp_path_factory):
    cfg_cls, model_cls, extra = MODELS[request.param]
    model = _randomise(model_cls(cfg_cls(**COMMON, **extra)), seed=sorted(MODELS).index(request.param))
    return request.param, save_hf(model, tmp_path_factory.mktemp(request.param)), model


def _tokens(b=2, t=12, vocab=V, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


def test_import_logits_match_transformers_with_padding(hf_dir):
    name, directory, ref = hf_dir
    model, params = from_pretrained(directory)
    tok = _tokens()
    mask = np.ones_like(tok)
    mask[1, 8:] = 0  # right padding: causal positions before the pad are what both models define
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tok)))
    theirs = torch_logits(ref, tok, attention_mask=mask)
    assert ours.shape == theirs.shape == (2, 12, V)
    assert np.abs(theirs).max() > 1.0  # well-scaled logits: a wrong map cannot hide in the tolerance
    assert maxerr(ours[0], theirs[0]) <= 1e-4
    assert maxerr(ours[1, :8], theirs[1, :8]) <= 1e-4


def test_unscanned_import_is_the_same_model(hf_dir):
    name, directory, ref = hf_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_1" in params["decoder"]
    tok = _tokens(seed=1)
    assert maxerr(model.apply({"params": params}, jnp.asarray(tok)), torch_logits(ref, tok)) <= 1e-4


def test_export_loads_in_transformers_with_the_same_logits(hf_dir, tmp_path):
    name, directory, ref = hf_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == CLASSES[name]
    back = getattr(transformers, CLASSES[name]).from_pretrained(str(tmp_path / "out")).eval()
    tok = _tokens(seed=2)
    assert maxerr(torch_logits(back, tok), torch_logits(ref, tok)) <= 1e-6
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    with open(os.path.join(directory, "config.json")) as f:
        original = json.load(f)
    for key in ("sliding_window", "num_local_experts", "num_experts_per_tok", "tie_word_embeddings", "attention_bias",
                "mlp_bias", "num_key_value_heads"):  # fmt: skip
        assert written.get(key) == original.get(key), key
    assert written["head_dim"] == (original["head_dim"] or original["hidden_size"] // original["num_attention_heads"])
    assert written["rope_parameters"]["rope_theta"] == original["rope_parameters"]["rope_theta"]


def test_mixtral_fused_expert_layout_reads_the_same(hf_dir, tmp_path):
    """Newer transformers hold the experts fused (``mlp.experts.gate_up_proj``); tfm reads that layout too."""
    name, directory, ref = hf_dir
    if name != "mixtral":
        pytest.skip("Mixtral only")
    from safetensors.numpy import load_file, save_file

    t = load_file(os.path.join(directory, "model.safetensors"))
    fused = {k: v for k, v in t.items() if ".block_sparse_moe." not in k}
    for i in range(COMMON["num_hidden_layers"]):
        m = f"model.layers.{i}.block_sparse_moe."
        w = lambda n: np.stack([t[m + f"experts.{j}.{n}.weight"] for j in range(4)])  # noqa: E731
        fused[f"model.layers.{i}.mlp.gate.weight"] = t[m + "gate.weight"]
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([w("w1"), w("w3")], axis=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w("w2")
    d = tmp_path / "fused"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    save_file(fused, str(d / "model.safetensors"))
    model, params = from_pretrained(d)
    tok = _tokens(seed=3)
    assert maxerr(model.apply({"params": params}, jnp.asarray(tok)), torch_logits(ref, tok)) <= 1e-4


def test_greedy_generation_equals_transformers(hf_dir):
    name, directory, ref = hf_dir
    if name not in ("llama", "mistral"):  # Llama, and Mistral's sliding window over the KV cache
        pytest.skip("Llama and Mistral")
    model, params = from_pretrained(directory)
    prompt = _tokens(b=2, t=5, seed=5)
    ours = decode.generate(model, params, jnp.asarray(prompt), max_new_tokens=20)
    with torch.no_grad():
        ids = torch.as_tensor(prompt, dtype=torch.long)
        theirs = ref.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@pytest.mark.parametrize("cfg", [
    llama_tiny,
    llama_tiny.replace(attention="local", attention_window=4),
], ids=["llama", "mistral"])  # fmt: skip
def test_a_fresh_tfm_model_exports_and_round_trips(cfg, tmp_path):
    """A model tfm initialised itself (not imported) leaves tfm and comes back bit for bit."""
    import flax.linen as nn

    module = GPT(cfg)
    params = nn.unbox(jax.jit(lambda k: module.init(k, jnp.ones((1, 8), jnp.int32)))(jax.random.key(3))["params"])
    arch = save_pretrained(module, params, tmp_path / "fresh")
    assert arch == claims(module, cfg)
    hf = getattr(transformers, arch).from_pretrained(str(tmp_path / "fresh")).eval()
    tok = _tokens(vocab=cfg.vocab_size, t=10, seed=4)
    assert maxerr(module.apply({"params": params}, jnp.asarray(tok)), torch_logits(hf, tok)) <= 1e-4
    _, again = from_pretrained(tmp_path / "fresh")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_claims_llama_style_models_only():
    gpt = lambda cfg: GPT(cfg)  # noqa: E731
    assert claims(gpt(llama_tiny), llama_tiny) == "LlamaForCausalLM"
    assert claims(gpt(mixtral_8x7b), mixtral_8x7b) == "MixtralForCausalLM"
    local = llama_tiny.replace(attention="local", attention_window=8)
    assert claims(gpt(local), local) == "MistralForCausalLM"
    for cfg in (gpt2_small, gpt_moe_tiny, llama_tiny.replace(position="learned"), llama_tiny.replace(norm="layernorm"),
                llama_tiny.replace(activation="geglu"), llama_tiny.replace(attention_scale=1.0),
                llama_tiny.replace(num_experts=4, moe_every=2),
                llama_tiny.replace(num_experts=4, moe_renormalize=False),
                local.replace(attention_bias=True)):  # fmt: skip
        assert claims(gpt(cfg), cfg) is None, cfg


MISTRAL_7B = dict(architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                  hidden_act="silu")  # fmt: skip
MIXTRAL_8X7B = {**MISTRAL_7B, "architectures": ["MixtralForCausalLM"], "rope_theta": 1e6, "sliding_window": None,
                "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02}  # fmt: skip


@pytest.mark.parametrize("hf, expected", [(MISTRAL_7B, 7_241_732_096), (MIXTRAL_8X7B, 46_702_792_704)],
                         ids=["mistral_7b", "mixtral_8x7b"])  # fmt: skip
def test_full_size_configs_count_as_published(hf, expected):
    arch = hf["architectures"][0]
    cls, cfg = ARCHITECTURES[arch].to_tfm(hf, arch)
    assert count_params(abstract_params(cls(cfg))) == expected
    if arch == "MixtralForCausalLM":
        assert count_params(abstract_params(GPT(mixtral_8x7b))) == expected
        assert cfg.block.rope_base == mixtral_8x7b.block.rope_base and cfg.block.moe_dispatch == "dropless"
    else:
        assert cfg.block.attention == "local" and cfg.block.attention_window == 4096


def test_unsupported_options_are_named(hf_dir, tmp_path):
    name, directory, _ = hf_dir
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)

    def write(case, **changes):
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**hf, **changes}))
        return d

    with pytest.raises(HubError, match="rope_type='linear' is not implemented"):
        config_from_pretrained(write("linear", rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(HubError, match="rope_type='llama3' is not implemented"):
        config_from_pretrained(write("llama3", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8}))
    with pytest.raises(HubError, match="hidden_act='gelu' is not implemented"):
        config_from_pretrained(write("gelu", hidden_act="gelu"))
    if name == "mixtral":
        with pytest.raises(HubError, match="router_jitter_noise=0.1 is not implemented"):
            config_from_pretrained(write("jitter", router_jitter_noise=0.1))
    # The older spelling of the base, and pretraining_tp (a matmul split with the same result), are read.
    _, cfg, _ = config_from_pretrained(write("theta", rope_parameters=None, rope_theta=1234.0, pretraining_tp=2))
    assert cfg.block.rope_base == 1234.0
