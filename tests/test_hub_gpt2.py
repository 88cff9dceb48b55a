"""GPT-2 checkpoints in and out of tfm: logits, export, generation, errors, sharded files, counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hub import config_writer, maxerr, save_hf, torch_logits, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")

from tfm import decode  # noqa: E402
from tfm.hub import HubError, abstract_params, config_from_pretrained, from_pretrained, save_pretrained  # noqa: E402
from tfm.models import count_params, gpt2_small  # noqa: E402

TINY = dict(vocab_size=96, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=95, eos_token_id=95)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    return save_hf(model, tmp_path_factory.mktemp("gpt2")), model


def _tokens(b=2, t=12, vocab=96, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


def test_import_logits_match_transformers_with_padding(gpt2_dir):
    directory, ref = gpt2_dir
    model, params = from_pretrained(directory)
    tok = _tokens()
    mask = np.ones_like(tok)
    mask[1, 8:] = 0  # right padding: causal positions before the pad are what both models define
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tok)))
    theirs = torch_logits(ref, tok, attention_mask=mask)
    assert ours.shape == theirs.shape == (2, 12, 96)
    assert maxerr(ours[0], theirs[0]) <= 1e-4
    assert maxerr(ours[1, :8], theirs[1, :8]) <= 1e-4


def test_unscanned_import_is_the_same_model(gpt2_dir):
    directory, ref = gpt2_dir
    model, params = from_pretrained(directory, scan_layers=False)
    assert "layers_1" in params["decoder"]
    tok = _tokens(seed=1)
    assert maxerr(model.apply({"params": params}, jnp.asarray(tok)), torch_logits(ref, tok)) <= 1e-4


def test_export_loads_in_transformers_with_the_same_logits(gpt2_dir, tmp_path):
    directory, ref = gpt2_dir
    model, params = from_pretrained(directory)
    assert save_pretrained(model, params, tmp_path / "out") == "GPT2LMHeadModel"
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    tok = _tokens(seed=2)
    assert maxerr(torch_logits(back, tok), torch_logits(ref, tok)) <= 1e-6


def test_a_fresh_tfm_gpt_exports_and_round_trips(tmp_path):
    """A model tfm initialised itself (not imported) leaves tfm and comes back bit for bit."""
    cfg = gpt2_small.replace(vocab_size=50, max_len=16, d_model=16, num_heads=2, num_layers=2, d_ff=32)
    from tfm.models import GPT

    module = GPT(cfg)
    params = jax.jit(lambda k: module.init(k, jnp.ones((1, 8), jnp.int32)))(jax.random.key(3))["params"]
    import flax.linen as nn

    params = nn.unbox(params)
    save_pretrained(module, params, tmp_path / "fresh")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "fresh")).eval()
    tok = _tokens(vocab=50, t=10, seed=4)
    assert maxerr(module.apply({"params": params}, jnp.asarray(tok)), torch_logits(hf, tok)) <= 1e-4
    _, again = from_pretrained(tmp_path / "fresh")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_generation_equals_transformers(gpt2_dir):
    directory, ref = gpt2_dir
    model, params = from_pretrained(directory)
    prompt = _tokens(b=2, t=5, seed=5)
    ours = decode.generate(model, params, jnp.asarray(prompt), max_new_tokens=20)
    with torch.no_grad():
        theirs = ref.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=20, do_sample=False,
                              min_new_tokens=20, pad_token_id=95, attention_mask=torch.ones(prompt.shape, dtype=torch.long))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_sharded_checkpoints_read_and_write(gpt2_dir, tmp_path):
    directory, ref = gpt2_dir
    sharded = save_hf(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    model, params = from_pretrained(sharded)
    tok = _tokens(seed=6)
    assert maxerr(model.apply({"params": params}, jnp.asarray(tok)), torch_logits(ref, tok)) <= 1e-4
    save_pretrained(model, params, tmp_path / "ours", max_shard_bytes=20_000)
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert maxerr(torch_logits(back, tok), torch_logits(ref, tok)) <= 1e-6
    assert not [n for n in os.listdir(tmp_path / "ours") if n.endswith(".tmp")]


def test_mesh_placement_shards_the_parameters(gpt2_dir):
    from tfm import sharding as sh

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    directory, ref = gpt2_dir
    mesh = sh.make_mesh({"data": 1, "fsdp": 1, "tensor": 2}, jax.devices()[:2])
    model, params = from_pretrained(directory, mesh=mesh)
    kernel = params["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert kernel.sharding.mesh.shape["tensor"] == 2 and len(kernel.sharding.device_set) == 2
    tok = _tokens(seed=7)
    assert maxerr(jax.jit(model.apply)({"params": params}, jnp.asarray(tok)), torch_logits(ref, tok)) <= 1e-4


def test_bfloat16_import_casts_parameters(gpt2_dir):
    directory, _ = gpt2_dir
    model, params = from_pretrained(directory, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.config.block.dtype == jnp.bfloat16


def test_full_size_gpt2_config_counts_as_the_preset():
    hf = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, architectures=["GPT2LMHeadModel"])
    from tfm.hub import ARCHITECTURES

    cls, cfg = ARCHITECTURES["GPT2LMHeadModel"].to_tfm(hf, "GPT2LMHeadModel")
    assert cfg == gpt2_small
    assert count_params(abstract_params(cls(cfg))) == 124_439_808


def test_unsupported_options_and_files_are_named(gpt2_dir, tmp_path):
    directory, _ = gpt2_dir
    write = config_writer(directory, tmp_path)

    with pytest.raises(HubError, match="scale_attn_by_inverse_layer_idx=True is not implemented"):
        config_from_pretrained(write("inv", scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(HubError, match="architecture .*'FooForCausalLM'.* is not supported"):
        config_from_pretrained(write("foo", architectures=["FooForCausalLM"]))
    with pytest.raises(HubError, match="no model.safetensors"):
        from_pretrained(write("nofiles"))
    with pytest.raises(HubError, match="huggingface_hub|not a local directory"):
        from_pretrained(str(tmp_path / "does-not-exist"))
    # A checkpoint with a layer fewer than its config says: the missing tensor is named.
    from safetensors.numpy import load_file, save_file

    d = write("short")
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".h.1.mlp." not in k}, str(d / "model.safetensors"))
    with pytest.raises(HubError, match="h.1.mlp"):
        from_pretrained(d)


def test_generate_cli_continues_a_prompt_with_the_checkpoints_tokenizer(gpt2_dir, tmp_path, capsys):
    """``python -m tfm.generate --hf DIR``: greedy output equals transformers' greedy continuation, as text."""
    tokenizers = pytest.importorskip("tokenizers")
    from tfm import generate

    directory, ref = gpt2_dir
    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab | {"<unk>": 27}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    d = tmp_path / "with_tokenizer"
    d.mkdir()
    for name in os.listdir(directory):
        (d / name).write_bytes(open(os.path.join(directory, name), "rb").read())
    tok.save(str(d / "tokenizer.json"))
    assert generate.main(["--hf", str(d), "--prompt", "to be", "--max_new_tokens", "12", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.strip()
    prompt = tok.encode("to be").ids
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=95,
                              eos_token_id=95, attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))  # fmt: skip
    assert printed == tok.decode(theirs[0].tolist(), skip_special_tokens=True)
    assert printed.startswith("to be")
    assert generate.main(["--hf", str(tmp_path / "missing"), "--prompt", "x"]) == 2
