"""BERT trains: the 80/10/10 masking rule, MLM pretraining through the CLI, fine-tuning from a workdir."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tfm import config as config_lib
from tfm.data.bert_text import CLS, MASK, SPECIALS, mask_tokens
from tfm.models import get_preset
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
QUIET = ["train.progress=none", "train.tensorboard=false"]

pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="needs the shared data folder")


def test_bert_presets_count_like_the_published_heads():
    # The backbone is exactly bert-base-uncased (109,482,240); the MLM head adds the transform
    # (768 x 768 + 768), its LayerNorm (2 x 768) and the output bias (30,522): HF's BertForPreTraining
    # (110,106,428) without its next-sentence head (768 x 2 + 2). The classifier adds 768 x 2 + 2.
    assert get_preset("bert_base_mlm").num_params() == 109_482_240 + 768 * 768 + 768 + 2 * 768 + 30_522
    assert get_preset("bert_base_mlm").num_params() == 110_106_428 - (768 * 2 + 2)
    assert get_preset("bert_base_classifier").num_params() == 109_482_240 + 768 * 2 + 2 == 109_483_778


def test_masking_follows_the_80_10_10_rule():
    rng = np.random.default_rng(0)
    vocab = 69
    ids = rng.integers(len(SPECIALS), vocab, (512, 128)).astype(np.int32)
    ids[:, 0] = CLS
    maskable = np.ones(ids.shape, bool)
    maskable[:, 0] = False
    inputs, weights = mask_tokens(ids, np.random.default_rng(1), 0.15, vocab, maskable)
    chosen = weights.astype(bool)
    assert not chosen[:, 0].any() and (inputs[:, 0] == CLS).all()  # [CLS] is never chosen
    assert (inputs[~chosen] == ids[~chosen]).all()  # unchosen positions are untouched
    assert abs(chosen.mean() - 0.15) < 0.005
    masked = (inputs[chosen] == MASK).mean()
    same = (inputs[chosen] == ids[chosen]).mean()
    other = 1.0 - masked - same
    assert abs(masked - 0.8) < 0.01, masked
    # "Unchanged" also catches the random draws that hit the original id (1 in 65).
    assert abs(same - (0.1 + 0.1 / 65)) < 0.01 and abs(other - (0.1 - 0.1 / 65)) < 0.01, (same, other)
    assert (inputs[chosen] != CLS).all() and (inputs >= 0).all() and (inputs < vocab).all()


def _cli(config: str, workdir: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [f"--config.data.data_dir={DATA}", *(f"--config.{o}" for o in QUIET + list(overrides))]
    return subprocess.run(
        [sys.executable, "-m", "tfm.train", "--config", os.path.join(ROOT, config), "--workdir", workdir, *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""},
    )  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bert_mlm"))
    out = _cli("configs/bert_mlm.py:tiny", workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir, out


def test_bert_mlm_tiny_trains_through_the_cli_and_its_loss_falls(pretrained):
    workdir, out = pretrained
    assert out.stdout.startswith("done: step 60"), out.stdout
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(69) = 4.23 towards the character statistics
    assert losses[0] < np.log(69) + 0.1
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and evals[-1]["eval/loss"] < losses[0]
    assert json.load(open(os.path.join(workdir, "vocab.json")))[:3] == ["\n", " ", "!"]


def _langid_config(pretrained_dir, *overrides):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "bert_langid.py:tiny"))
    return config_lib.apply_overrides(c, QUIET + [
        f"data.data_dir={DATA}", f"train.init_from={pretrained_dir}",
        f"data.tokenizer_path={os.path.join(pretrained_dir, 'vocab.json')}", *overrides,
    ])  # fmt: skip


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_fine_tuning_starts_from_exactly_the_pretrained_parameters(pretrained, tmp_path):
    from tfm import warm_start

    source, _ = pretrained
    step, saved = warm_start.read_params(source)
    assert step == 60
    trainer = Trainer(_langid_config(source), str(tmp_path / "langid"), devices=jax.devices()[:1])
    fresh, start = trainer.init_state(), trainer.initial_state()
    flat = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(start.params)[0]}
    fresh_flat = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(fresh.params)[0]}
    taken = [k for k in flat if k in saved]
    assert taken and all(k.startswith("bert/") for k in taken)
    assert len(taken) == len([k for k in saved if k.startswith("bert/")])  # the whole backbone
    for k in taken:
        np.testing.assert_array_equal(flat[k], saved[k], err_msg=k)
    new = [k for k in flat if k not in saved]
    assert new and all(k.startswith("classifier/") for k in new)
    for k in new:  # the head keeps its fresh initialisation
        np.testing.assert_array_equal(flat[k], fresh_flat[k])
    # A fresh optimizer: step 0 and zero moments.
    assert int(start.step) == 0
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(start.opt_state))
    # And training from there runs.
    summary = trainer.train()
    assert summary["step"] == 20 and np.isfinite(summary["eval/loss"])


def test_init_from_refuses_other_shapes_and_missing_runs(pretrained, tmp_path):
    source, _ = pretrained
    trainer = Trainer(_langid_config(source, "model.d_ff=32"), devices=jax.devices()[:1])
    with pytest.raises(config_lib.ConfigError, match=r"parameter shapes differ \(bert/encoder/.*saved \(2, 32, 64\)"):
        trainer.initial_state()
    with pytest.raises(config_lib.ConfigError, match="not a tfm workdir with checkpoints"):
        Trainer(_langid_config(str(tmp_path / "nothing")), devices=jax.devices()[:1])
