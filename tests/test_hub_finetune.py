"""Fine-tuning an imported checkpoint: ``train.init_from=hf:DIR`` with the checkpoint's own tokenizer."""

import json
import os

import jax
import numpy as np
import pytest
from _hub import save_hf, transformers_or_skip

transformers = transformers_or_skip()
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from tfm import config as config_lib  # noqa: E402
from tfm.trainer import Trainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
QUIET = ["train.progress=none", "train.tensorboard=false"]
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="needs the shared data folder")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GPT-2 with a byte-level BPE tokenizer.json trained on the first 200k characters."""
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    with open(os.path.join(DATA, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read(200_000)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text.split("\n"), trainer)
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
    )).eval()  # fmt: skip
    save_hf(model, directory)
    tok.save(str(directory / "tokenizer.json"))
    return str(directory), model, tok


def _config(directory, *overrides):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "finetune_gpt2_shakespeare.py:tiny"))
    return config_lib.apply_overrides(c, QUIET + [f"data.data_dir={DATA}", f"train.init_from=hf:{directory}", *overrides])


def test_step_zero_loss_equals_the_transformers_models_loss(checkpoint, tmp_path):
    directory, ref, tok = checkpoint
    trainer = Trainer(_config(directory), str(tmp_path / "run"), devices=jax.devices()[:1])
    assert trainer.dataset.vocab_size == tok.get_vocab_size() == trainer.model_config.vocab_size
    batch = trainer.dataset.batch("train", 0)
    # The checkpoint's tokenizer made the data: the batch decodes to Shakespeare's text.
    assert tok.decode(batch["inputs"][0].tolist()) == trainer.dataset.decode(batch["inputs"][0])
    state = trainer.initial_state()
    _, metrics = trainer.train_step(state, batch)
    with torch.no_grad():
        logits = ref(torch.as_tensor(batch["inputs"], dtype=torch.long)).logits
        theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   torch.as_tensor(batch["targets"], dtype=torch.long).reshape(-1))  # fmt: skip
    assert abs(float(metrics["loss"]) - float(theirs)) <= 1e-4
    # And the run trains from there, saving the tokenizer beside its checkpoints.
    summary = trainer.train()
    assert summary["step"] == 10 and np.isfinite(summary["eval/loss"])
    with open(tmp_path / "run" / "tokenizer.json") as f:
        assert json.load(f)["model"]["type"] == "BPE"


def test_a_checkpoint_of_another_model_is_refused_by_field(checkpoint):
    directory, _, _ = checkpoint
    trainer = Trainer(_config(directory, "model.activation=gelu"), devices=jax.devices()[:1])
    with pytest.raises(config_lib.ConfigError, match=r"differs from the recipe's; set model.activation='gelu_tanh'"):
        trainer.initial_state()
    trainer = Trainer(_config(directory, "model.d_ff=64"), devices=jax.devices()[:1])
    with pytest.raises(config_lib.ConfigError, match=r"parameter shapes differ \(decoder/layers/mlp/wi/bias: checkpoint \(2, 128\), model \(2, 64\)"):
        trainer.initial_state()
    with pytest.raises(config_lib.ConfigError, match="no config.json there"):
        Trainer(_config(os.path.dirname(directory)), devices=jax.devices()[:1])


def test_imported_params_are_the_checkpoints(checkpoint):
    directory, ref, _ = checkpoint
    trainer = Trainer(_config(directory), devices=jax.devices()[:1])
    params = trainer.initial_state().params
    wte = ref.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), wte)
    q = np.asarray(params["decoder"]["layers"]["self_attention"]["query"]["kernel"])  # [L, D, N, H], scanned
    c_attn = ref.transformer.h[1].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(q[1].reshape(32, 32), c_attn[:, :32])


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_export_of_a_fine_tuned_run_loads_in_transformers(checkpoint, tmp_path):
    from tfm import export, inference

    directory, _, tok = checkpoint
    workdir = str(tmp_path / "run")
    Trainer(_config(directory, "train.steps=2"), workdir, devices=jax.devices()[:1]).train()
    out = str(tmp_path / "exported")
    assert export.main(["--workdir", workdir, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    run = inference.load(workdir)
    tokens = run.dataset.batch("validation", 0)["inputs"]
    ours = np.asarray(run.model.apply({"params": run.params}, tokens))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    # The exported tokenizer is the run's: tokenizers reads it and encodes as the run does.
    again = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert again.encode("ROMEO: peace").ids == tok.encode("ROMEO: peace").ids
    # A second export to the same place is refused, and leaves the first intact.
    assert export.main(["--workdir", workdir, "--out", out]) == 2
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_model_without_a_hf_layout_exports_as_orbax_params(tmp_path):
    import orbax.checkpoint as ocp

    from tfm import export, inference

    c = config_lib.load_config(os.path.join(ROOT, "configs", "shakespeare_char.py:tiny"))
    c = config_lib.apply_overrides(c, QUIET + [f"data.data_dir={DATA}", "train.steps=2"])
    workdir = str(tmp_path / "char")
    Trainer(c, workdir, devices=jax.devices()[:1]).train()
    out = str(tmp_path / "exported")
    assert export.main(["--workdir", workdir, "--out", out]) == 0  # no biases: not GPT-2's layout
    assert sorted(os.listdir(out)) == ["params", "tfm_config.json", "vocab.json"]
    run = inference.load(workdir)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(out, "params"))
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert not os.path.exists(tmp_path / "x")
