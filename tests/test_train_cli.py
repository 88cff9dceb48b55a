"""``python -m tfm.train`` as a user runs it, in subprocesses: recipes, SIGKILL + exact resume,
SIGTERM, and two processes training together with ``jax.distributed``."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tfm import config as config_lib
from tfm.checkpoint import Checkpointer
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
QUIET = ["--config.train.progress=lines", "--config.train.tensorboard=false"]


def env(devices=1):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(recipe, workdir, *overrides):
    return [sys.executable, "-m", "tfm.train", "--config", os.path.join(ROOT, "configs", recipe),
            "--workdir", str(workdir), *QUIET, *overrides]  # fmt: skip


def run(cmd, devices=1, timeout=300):
    p = subprocess.run(cmd, env=env(devices), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def final_params(workdir, recipe="copy.py:tiny"):
    c = config_lib.load_config(os.path.join(ROOT, "configs", recipe))
    c = config_lib.apply_overrides(c, ["mesh.data=1"])
    t = Trainer(c, devices=jax.devices()[:1])
    ck = Checkpointer(os.path.join(workdir, "checkpoints"))
    step, state, data_state = ck.restore(t.abstract_state)
    ck.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(state)], data_state


RECIPES = [
    ("copy.py:tiny", []),
    ("shakespeare_char.py:tiny", [f"--config.data.data_dir={DATA}"]),
    pytest.param("fashion_mnist_vit.py:tiny", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
    pytest.param("multi30k_en_de.py:tiny", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
    pytest.param("shakespeare_xl.py:tiny", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
    pytest.param("shakespeare_xl.py:tiny_compressive", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
    pytest.param("clip_fashion_mnist.py:tiny", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
    pytest.param("speech_digits.py:tiny", [], marks=pytest.mark.slow),
    pytest.param("detr_shapes.py:tiny", [], marks=pytest.mark.slow),
    pytest.param("fusion_fashion_mnist.py:tiny", [f"--config.data.data_dir={DATA}"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("recipe,extra", RECIPES, ids=[(r.values if hasattr(r, "values") else r)[0] for r in RECIPES])
def test_recipe_tiny_variant_trains_through_the_cli(tmp_path, recipe, extra):
    if extra and not os.path.isdir(DATA):
        pytest.skip(f"no shared data folder at {DATA}")
    if recipe.startswith(("fashion", "multi30k", "clip", "fusion")):
        extra = [*extra, f"--config.data.tfds_dir={tmp_path / 'tfds'}"]  # prepared here, not in ~/tensorflow_datasets
    p = run(cli(recipe, tmp_path, *extra))
    rows = [r for r in metrics(tmp_path) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3, rows
    assert "done: step" in p.stdout and "checkpoint" in p.stdout
    steps = Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps()
    assert steps and steps[-1] == rows[-1]["step"]
    assert "step " in p.stderr and ("tok/s" in p.stderr or "ex/s" in p.stderr) and "eta" in p.stderr  # per interval
    if recipe.startswith("copy"):
        # The tiny copy model decodes every validation sequence exactly (greedy, KV cache).
        out = tmp_path / "results" / "copy_tiny.json"
        p = run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--out", str(out)])
        record = json.loads(out.read_text())
        assert record["metrics"]["exact_match"] == 1.0 and record["metrics"]["examples"] == 256
        assert record["checkpoint_step"] == steps[-1] and record == json.loads((tmp_path / "eval_validation.json").read_text())
        p = subprocess.run([sys.executable, "-m", "tfm.translate", "--workdir", str(tmp_path), "--max_len", "8"],
                           input="5 9 4 12\n3 3 15 7 8\n", env=env(), capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.splitlines() == ["5 9 4 12", "3 3 15 7 8"]  # lengths seen in training (4-6)
        if importlib.util.find_spec("qwix"):  # the same run with int8 weights and activations
            out_q = tmp_path / "results" / "copy_tiny_int8.json"
            run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--quantize", "int8_dynamic",
                 "--out", str(out_q)])  # fmt: skip
            quantized = json.loads(out_q.read_text())
            assert quantized["quantized"] == "int8_dynamic" and quantized["metrics"]["exact_match"] >= 0.95
            assert abs(quantized["metrics"]["loss"] - record["metrics"]["loss"]) < 0.05 + 0.1 * record["metrics"]["loss"]
            p = subprocess.run([sys.executable, "-m", "tfm.translate", "--workdir", str(tmp_path), "--max_len", "8",
                                "--quantize", "int8"], input="5 9 4 12\n", env=env(), capture_output=True, text=True,
                               cwd=ROOT, timeout=300)  # fmt: skip
            assert p.returncode == 0 and p.stdout.splitlines() == ["5 9 4 12"], p.stderr[-2000:]
    elif recipe.startswith("fashion"):
        p = run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "0"])
        record = json.loads((tmp_path / "eval_test.json").read_text())
        assert record["metrics"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
        assert record["batches"] == 0 and "perplexity" not in record["metrics"]
        out = tmp_path / "results" / "fashion_flip.json"  # each image's prediction averaged with its mirror's
        run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "0",
             "--tta", "flip", "--out", str(out)])  # fmt: skip
        flipped = json.loads(out.read_text())
        assert flipped["test_time_augmentation"].startswith("mean of the image's") and flipped["metrics"]["accuracy"] > 0.5
        assert flipped["metrics"]["loss"] != record["metrics"]["loss"]
    elif recipe.startswith("clip"):
        run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "2"])
        record = json.loads((tmp_path / "eval_test.json").read_text())["metrics"]
        assert record["examples"] == 64 and record["zero_shot_templates"] == 5
        assert 0.0 <= record["text_to_image_recall@1"] <= 1.0 and record["zero_shot_accuracy"] > 0.2  # chance: 0.1
    elif recipe.startswith("speech"):  # decoded with the KV cache and scored against the transcripts
        run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "0"])
        record = json.loads((tmp_path / "eval_test.json").read_text())["metrics"]
        assert record["examples"] == 16 and record["decoding"] == "greedy"
        assert 0.0 <= record["cer"] <= 1.5 and 0.0 <= record["sentence_accuracy"] <= 1.0
    elif recipe.startswith("fusion"):  # image + caption -> match: chance is 0.5
        run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "4"])
        record = json.loads((tmp_path / "eval_test.json").read_text())["metrics"]
        assert record["accuracy"] > 0.55 and "perplexity" not in record
    elif recipe.startswith("detr"):  # every query a detection, scored by AP@0.5 over the 16 test images
        run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "0"])
        record = json.loads((tmp_path / "eval_test.json").read_text())["metrics"]
        assert record["images"] == 16 and len(record["ap50_per_class"]) == 6 and 0.0 <= record["ap50"] <= 1.0
    elif recipe.startswith("multi30k"):
        assert (tmp_path / "tokenizer.model").is_file()  # saved beside the checkpoints
        p = run([sys.executable, "-m", "tfm.evaluate", "--workdir", str(tmp_path), "--split", "test", "--batches", "1",
                 "--beam_size", "2"])  # fmt: skip
        record = json.loads((tmp_path / "eval_test.json").read_text())
        assert record["metrics"]["examples"] == 32 and 0.0 <= record["metrics"]["bleu"] <= 100.0
        assert record["metrics"]["bleu_signature"].startswith("nrefs:1|case:mixed")
        # translate the same 32 test sources: sacreBLEU of its output is evaluate's BLEU. The prepared
        # tfds copy is removed first, so loading rebuilds it: its progress output must stay off stdout.
        import shutil

        import sacrebleu

        shutil.rmtree(tmp_path / "tfds" / "multi30k_text")
        sources = (open(os.path.join(DATA, "multi30k", "test_2016_flickr.en"), encoding="utf-8").read().splitlines())[:32]
        refs = (open(os.path.join(DATA, "multi30k", "test_2016_flickr.de"), encoding="utf-8").read().splitlines())[:32]
        p = subprocess.run([sys.executable, "-m", "tfm.translate", "--workdir", str(tmp_path), "--beam_size", "2"],
                           input="\n".join(sources + [""]) + "\n", env=env(),
                           capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        hyps = p.stdout.split("\n")
        assert len(hyps) == 34 and hyps[32] == "" and hyps[33] == ""  # a line per input line, the blank one empty
        hyps = hyps[:32]
        assert sacrebleu.corpus_bleu(hyps, [refs]).score == pytest.approx(record["metrics"]["bleu"], abs=1e-9)
    else:
        p = run([sys.executable, "-m", "tfm.generate", "--workdir", str(tmp_path), "--prompt", "ROMEO:",
                 "--max_new_tokens", "80", "--seed", "3"])  # fmt: skip
        text = p.stdout.rstrip("\n")
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80


def _kill_when_logged(cmd, workdir, step, sig):
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = metrics(workdir)
        if rows and rows[-1]["step"] >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


@pytest.mark.parametrize("kill_at", [5, pytest.param(11, marks=pytest.mark.slow)])
def test_sigkill_and_restart_ends_bitwise_identical(tmp_path, kill_at):
    """Checkpoints every step (async), so the kill lands during or between saves."""
    args = ["--config.train.steps=16", "--config.train.checkpoint_every=1", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_steps=0"]  # fmt: skip
    straight = tmp_path / "straight"
    run(cli("copy.py:tiny", straight, *args))
    killed = tmp_path / "killed"
    rc, _, _ = _kill_when_logged(cli("copy.py:tiny", killed, *args), killed, kill_at, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    last_logged = metrics(killed)[-1]["step"]
    assert last_logged < 16, "the run finished before it was killed; the test proves nothing"
    p = run(cli("copy.py:tiny", killed, *args))
    assert "resumed from" in p.stderr
    s1, a, d1 = final_params(straight)
    s2, b, d2 = final_params(killed)
    assert s1 == s2 == 16 and d1 == d2 == {"index": 16}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])  # fmt: skip
def test_a_stop_signal_saves_at_the_current_step_and_exits_zero(tmp_path, sig):
    args = ["--config.train.steps=100000", "--config.train.checkpoint_every=100000", "--config.train.log_every=1",
            "--config.train.eval_steps=0"]  # fmt: skip
    rc, out, err = _kill_when_logged(cli("copy.py:tiny", tmp_path, *args), tmp_path, 3, sig)
    assert rc == 0, err[-2000:]
    assert f"{sig.name}: saved a checkpoint at step" in err and "preempted: step" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = int(out.split("preempted: step ")[1].split()[0])
    assert Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [step]
    # ... and the next run resumes from it.
    p = run(cli("copy.py:tiny", tmp_path, *args[1:], f"--config.train.steps={step + 2}"))
    assert f"resumed from {tmp_path}/checkpoints/{step}" in p.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(workdir, *overrides, signal_when_logged=None):
    """Two CPU processes with 2 devices each form one 4-device mesh (gloo collectives). With
    ``signal_when_logged=(step, sig)``, only process 1 gets ``sig`` once ``step`` is logged."""
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = cli("copy.py:tiny", workdir, "--config.distributed.enabled=true",
                  f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
                  f"--config.distributed.process_id={pid}", "--config.mesh.data=2", "--config.mesh.fsdp=2", *overrides)  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))  # fmt: skip
    if signal_when_logged:
        step, sig = signal_when_logged
        deadline = time.time() + 240
        while time.time() < deadline and procs[1].poll() is None:
            rows = metrics(workdir)
            if rows and rows[-1]["step"] >= step:
                procs[1].send_signal(sig)
                break
            time.sleep(0.01)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_two_processes_train_together_and_resume(tmp_path):
    args = ["--config.train.checkpoint_every=3", "--config.train.eval_steps=1"]
    outs = _launch_two(tmp_path, "--config.train.steps=6", *args)
    assert "done: step 6" in outs[0][0]
    assert Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [3, 6]
    outs = _launch_two(tmp_path, "--config.train.steps=9", *args)
    assert "resumed from" in outs[0][1] and "done: step 9" in outs[0][0]
    step, leaves, data_state = final_params(tmp_path)
    assert step == 9 and data_state == {"index": 9}
    assert all(np.isfinite(x).all() for x in leaves)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """A preemption notice to one host: both hosts save the same agreed step and exit 0, and the
    resumed run ends bitwise equal to an uninterrupted one."""
    args = ["--config.train.checkpoint_every=100000", "--config.train.log_every=1", "--config.train.eval_steps=0"]
    stopped = tmp_path / "stopped"
    outs = _launch_two(stopped, "--config.train.steps=100000", *args, signal_when_logged=(3, signal.SIGTERM))
    said = [out.split("preempted: step ")[1].split()[0] if "preempted: step " in out else out for out, _ in outs]
    assert said[0] == said[1] and said[0].isdigit(), said
    step = int(said[0])
    assert f"SIGTERM: saved a checkpoint at step {step} (agreed by all 2 processes)" in outs[0][1]
    assert f"Reached preemption sync point, step={step}" in outs[1][1]  # process 1 logs only JAX's line
    assert Checkpointer(os.path.join(stopped, "checkpoints")).all_steps() == [step]
    end = step + 3
    outs = _launch_two(stopped, f"--config.train.steps={end}", *args)
    assert f"resumed from {stopped}/checkpoints/{step}" in outs[0][1] and f"done: step {end}" in outs[0][0]
    straight = tmp_path / "straight"
    _launch_two(straight, f"--config.train.steps={end}", *args)
    s1, a, d1 = final_params(straight)
    s2, b, d2 = final_params(stopped)
    assert s1 == s2 == end and d1 == d2 == {"index": end}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
