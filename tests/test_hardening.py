"""Nothing lost, nothing silently wrong: readers beside a live run, what may change on resume,
non-finite updates, saved vocabularies, and one clear line for each kind of bad input."""

import io
import json
import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tfm import config as config_lib
from tfm import evaluate, generate, inference, train, translate
from tfm.checkpoint import Checkpointer
from tfm.trainer import Trainer, TrainingError
from tfm.workdir import Lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["train.progress=none", "train.tensorboard=false"]
EN = ["A man rides a red bike.", "Two dogs play in the snow.", "A woman reads a book.", "Children run outside."]
DE = ["Ein Mann fährt ein rotes Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch.", "Kinder rennen draußen."]
CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def recipe(name, *overrides):
    c = config_lib.load_config(os.path.join(ROOT, "configs", name))
    return config_lib.apply_overrides(c, ["mesh.data=1", *QUIET, *overrides])


def one_device(config, workdir=None, **kw):
    return Trainer(config, workdir, devices=jax.devices()[:1], **kw)


def snapshot(folder):
    """Every file and folder under ``folder`` with its size and modification time."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, os.path.isdir(path))
    return out


def call(main, argv, capsys, stdin=None, monkeypatch=None):
    capsys.readouterr()  # only what this call prints
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    """A trained (2 steps) encoder-decoder workdir."""
    workdir = str(tmp_path_factory.mktemp("copy") / "run")
    one_device(recipe("copy.py:tiny", "train.steps=2", "train.eval_steps=0"), workdir).train()
    return workdir


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A trained (2 steps) character LM on a small corpus, and the corpus's folder."""
    data = tmp_path_factory.mktemp("corpus")
    (data / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    workdir = str(tmp_path_factory.mktemp("char") / "run")
    cfg = recipe("shakespeare_char.py:tiny", f"data.data_dir={data}", "data.path=corpus.txt",
                 f"data.tfds_dir={data / 'tfds'}", "train.steps=2", "train.eval_steps=0")  # fmt: skip
    one_device(cfg, workdir).train()
    return workdir, data


# 1. Readers beside a live run ----------------------------------------------------------------


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_readers_never_disturb_a_live_run(tmp_path, capsys):
    """evaluate and inference.load in a loop while the run saves a checkpoint every step."""
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    cmd = [sys.executable, "-m", "tfm.train", "--config", os.path.join(ROOT, "configs", "copy.py:tiny"),
           "--workdir", str(workdir), "--config.train.progress=lines", "--config.train.tensorboard=false",
           "--config.train.checkpoint_every=1", "--config.train.steps=60", "--config.train.eval_steps=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    reads, deadline = 0, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            if not os.path.isdir(workdir / "checkpoints") or not any(d.isdigit() for d in os.listdir(workdir / "checkpoints")):
                time.sleep(0.05)
                continue
            if reads % 2 == 0:
                code, out, err = call(evaluate.main, ["--workdir", str(workdir), "--batches", "1"], capsys)
                assert code == 0, err
            else:
                assert inference.load(str(workdir)).step >= 1
            reads += 1
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert reads >= 3, f"only {reads} reads overlapped the run; the test proves nothing"
    assert "done: step 60" in out
    ck = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    assert ck.latest_step() == 60
    ck.close()
    # ... and the run resumes from its final checkpoint.
    s = one_device(recipe("copy.py:tiny", "train.steps=62", "train.eval_steps=0", "train.checkpoint_every=1"),
                   str(workdir)).train()  # fmt: skip
    assert s["start_step"] == 60 and s["step"] == 62


@pytest.mark.parametrize("error", [NotADirectoryError, FileNotFoundError])
def test_a_step_deleted_while_a_reader_lists_the_steps_is_looked_up_again(tmp_path, monkeypatch, error):
    """The live run's keep policy deletes a step between orbax's exists() and is_dir() (or open): a reader
    lists again; the trainer itself still raises, since nobody else deletes its steps."""
    from orbax.checkpoint._src.metadata import checkpoint as step_metadata

    directory = str(tmp_path / "checkpoints")
    state = {"w": np.arange(4, dtype=np.float32)}
    writer = Checkpointer(directory, async_save=False)
    writer.save(1, state, {"index": 1})
    writer.close()

    real, failures = step_metadata._sanitize_metadata_path, []

    def vanishing(path):
        if len(failures) < 2:  # the first two listings meet a step being deleted
            failures.append(str(path))
            raise error(f"Path is not a directory: {path}")
        return real(path)

    monkeypatch.setattr(step_metadata, "_sanitize_metadata_path", vanishing)
    reader = Checkpointer(directory, read_only=True)
    assert len(failures) == 2, "the fault was never met: the test proves nothing"
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
    step, restored, data = reader.restore(abstract)
    assert step == 1 and data == {"index": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])
    reader.close()
    failures.clear()
    with pytest.raises(error):
        Checkpointer(directory)


def test_a_reader_creates_nothing_in_a_run_without_checkpoints(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_lib.to_json(recipe("copy.py:tiny")))
    before = snapshot(workdir)
    code, _, err = call(evaluate.main, ["--workdir", str(workdir)], capsys)
    assert code == 2 and err.strip() == f"evaluate: {workdir} has no checkpoint yet"
    assert snapshot(workdir) == before and not (workdir / "checkpoints").exists()


# 2 and 5. What a checkpoint means: its tokenizer, saved with the run ----------------------------


@pytest.mark.slow  # in CI's second command (-m slow): it keeps the default suite near ten minutes
def test_a_different_tokenizer_on_resume_is_refused(tiny_multi30k_dir, tmp_path):
    src, tfds = tiny_multi30k_dir
    base = ["data.name=multi30k", f"data.data_dir={src}", f"data.tfds_dir={tfds}", "data.path=multi30k",
            "data.max_len=16", "model.vocab_size=64", "train.steps=1", "train.eval_steps=0"]  # fmt: skip
    cfg = recipe("multi30k_en_de.py:tiny", *base, "data.vocab_size=60", "data.bucket=false", "data.pack=false")
    workdir = str(tmp_path / "run")
    one_device(cfg, workdir).train()
    before = snapshot(workdir)
    other = recipe("multi30k_en_de.py:tiny", *base, "data.vocab_size=50", "data.bucket=false", "data.pack=false")
    with pytest.raises(config_lib.ConfigError, match=r"another tokenizer.model \(data.vocab_size: 60 there, 50 now\)"):
        one_device(other, workdir)
    assert snapshot(workdir) == before
    # With the flag the old run (checkpoints, config, tokenizer) is moved aside whole, not deleted.
    one_device(other, workdir, allow_model_change=True).train()
    aside = [d for d in os.listdir(workdir) if d.startswith("replaced-")]
    assert len(aside) == 1
    assert sorted(os.listdir(os.path.join(workdir, aside[0]))) == ["checkpoints", "config.json", "tokenizer.model"]


def test_the_character_vocabulary_is_saved_and_used(char_run, tmp_path, capsys):
    workdir, data = char_run
    saved = json.loads(open(os.path.join(workdir, "vocab.json"), encoding="utf-8").read())
    assert saved == sorted(set(CORPUS))
    run = inference.load(workdir)
    # The corpus loses its rarest characters: the run still decodes with its own vocabulary.
    (data / "corpus.txt").write_text(CORPUS.replace(":", "").replace("'", ""), encoding="utf-8")
    try:
        again = inference.load(workdir)
        assert again.dataset.chars == saved
        np.testing.assert_array_equal(again.dataset.encode("question"), run.dataset.encode("question"))
        code, out, err = call(generate.main, ["--workdir", workdir, "--prompt", "To be", "--max_new_tokens", "5",
                                              "--temperature", "0"], capsys)  # fmt: skip
        assert code == 0, err
        assert out.startswith("To be") and len(out.rstrip("\n")) == len("To be") + 5
        # Resuming training with a vocabulary the data now implies is refused, like a model change.
        cfg = config_lib.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
        with pytest.raises(config_lib.ConfigError, match="another vocab.json"):
            one_device(cfg, workdir)
    finally:
        (data / "corpus.txt").write_text(CORPUS, encoding="utf-8")


@pytest.fixture
def tiny_multi30k_dir(tmp_path):
    folder = tmp_path / "src" / "multi30k"
    folder.mkdir(parents=True)
    for stem, n in (("train", 40), ("val", 4), ("test_2016_flickr", 5)):
        (folder / f"{stem}.en").write_text("\n".join(EN[i % 4] for i in range(n)) + "\n", encoding="utf-8")
        (folder / f"{stem}.de").write_text("\n".join(DE[i % 4] for i in range(n)) + "\n", encoding="utf-8")
    return tmp_path / "src", tmp_path / "tfds"


# 4 and 9. Nothing non-finite is saved; a failed evaluation costs nothing ---------------------------


def test_non_finite_parameters_never_reach_a_checkpoint(tmp_path):
    """Finite loss and gradients, but decoupled decay lr * wd overflows float32: the update is refused."""
    workdir = str(tmp_path / "run")
    cfg = recipe("copy.py:tiny", "optim.learning_rate=1e30", "optim.weight_decay=1e30", "optim.schedule=constant",
                 "optim.warmup_steps=0", "train.steps=3", "train.checkpoint_every=1", "train.eval_steps=0")  # fmt: skip
    with pytest.raises(TrainingError, match=r"step 1: the updated parameters are not finite"):
        one_device(cfg, workdir).train()
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not Checkpointer(
        os.path.join(workdir, "checkpoints"), read_only=True
    ).all_steps()


def test_a_failed_evaluation_saves_the_state_first(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = recipe("copy.py:tiny", "train.steps=6", "train.eval_every=3", "train.checkpoint_every=100")
    trainer = one_device(cfg, workdir)
    clean = trainer.dataset.batch

    def broken(split, index, batch_size=None):
        if split == "validation":
            raise OSError("the validation files went away")
        return clean(split, index, batch_size)

    trainer.dataset.batch = broken
    with pytest.raises(TrainingError, match=r"step 3: evaluation failed \(OSError: the validation files went away\)"):
        trainer.train()
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert ck.all_steps() == [3]
    ck.close()


# 6, 7, 8, 10. The inference commands ---------------------------------------------------------------


def test_evaluate_prints_the_result_even_where_it_cannot_write(copy_run, capsys):
    target = os.path.join(copy_run, "eval_validation.json")
    os.makedirs(target)  # the result file's place is taken: writing it fails like a read-only workdir
    try:
        before = snapshot(copy_run)
        code, out, err = call(evaluate.main, ["--workdir", copy_run, "--batches", "1"], capsys)
        assert code == 1
        assert json.loads(out)["step"] == 2 and "exact_match" in json.loads(out)
        assert err.strip().startswith(f"evaluate: could not write {target}") and len(err.strip().splitlines()) == 1
        assert snapshot(copy_run) == before  # and no temporary file is left behind
    finally:
        os.rmdir(target)


def test_translate_keeps_lines_aligned(copy_run, capsys, monkeypatch):
    lines = b"5 9 4 12\n\n3 3 \xff 7\n3 3 15 7 8\n"
    code, out, err = call(translate.main, ["--workdir", copy_run, "--max_len", "8", "--batch_size", "2"], capsys,
                          stdin=lines, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 2
    assert err.strip() == "translate: input line 3 is not UTF-8; its output line is left empty"
    got = out.split("\n")
    assert len(got) == 5 and got[1] == "" and got[2] == "" and got[4] == ""  # 4 lines, blank and bad ones empty


# The bad-input table ------------------------------------------------------------------------------


def _recipe_file(tmp_path, body):
    path = tmp_path / f"recipe_{abs(hash(body))}.py"
    path.write_text(body)
    return str(path)


def bad_train_cases(tmp_path, data):
    copy = os.path.join(ROOT, "configs", "copy.py:tiny")
    char = [f"--config.data.data_dir={data}", "--config.data.path=corpus.txt", f"--config.data.tfds_dir={data / 'tfds'}"]
    shakespeare = os.path.join(ROOT, "configs", "shakespeare_char.py:tiny")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "corrupt.model").write_bytes(b"\x00 not a sentencepiece model")
    m30k = ["--config.data.data_dir=" + str(tmp_path / "nowhere")]
    return [
        ("syntax error", _recipe_file(tmp_path, "def get_config(arg):\n    return (\n"), [], "line 2"),
        ("import error", _recipe_file(tmp_path, "import no_such_module_here\n"), [], "ModuleNotFoundError"),
        ("type error", _recipe_file(tmp_path, "def get_config(arg):\n    return 1 + 'a'\n"), [], "line 2: TypeError"),
        ("lr inf", copy, ["--config.optim.learning_rate=1e999"], "optim.learning_rate=inf"),
        ("lr negative", copy, ["--config.optim.learning_rate=-1"], "optim.learning_rate=-1.0"),
        ("b2 >= 1", copy, ["--config.optim.b2=1.0"], "optim.b2=1.0"),
        ("eval_steps -1 on endless data", copy, ["--config.train.eval_steps=-1"], "train.eval_steps=-1"),
        ("block_size > max_len", shakespeare, [*char, "--config.data.block_size=64"], "data.block_size=64"),
        ("max_len 0", os.path.join(ROOT, "configs", "multi30k_en_de.py:tiny"), [*m30k, "--config.data.max_len=0"],
         "data.max_len=0"),
        ("corrupt tokenizer", shakespeare, [*char, "--config.data.tokenizer=bpe",
                                            f"--config.data.tokenizer_path={tmp_path / 'corrupt.model'}"],
         "is not a sentencepiece model"),
        ("vocab too large", shakespeare, [*char, "--config.data.tokenizer=bpe", "--config.data.vocab_size=200000"],
         "data.vocab_size=200000"),
    ]  # fmt: skip


def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, char_run, capsys, caplog):
    _, data = char_run
    workdir = tmp_path / "run"
    for name, config, extra, expected in bad_train_cases(tmp_path, data):
        with caplog.at_level(logging.WARNING):
            code, out, err = call(train.main, ["--config", config, "--workdir", str(workdir), *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, code, err)
        assert not [r for r in caplog.records if r.name.startswith("tfm")], (name, caplog.text)
        assert not workdir.exists(), name
        caplog.clear()


def test_workdir_problems_are_one_line(tmp_path, copy_run, capsys):
    copy = os.path.join(ROOT, "configs", "copy.py:tiny")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (str(tmp_path / "a_file"), "is a file, not a directory"),
        (str(tmp_path / "a_file" / "run"), "cannot be created"),
    ]
    for workdir, expected in cases:
        code, _, err = call(train.main, ["--config", copy, "--workdir", workdir], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    # A second trainer on a workdir in use is refused, naming the one that holds it.
    lock = Lock(copy_run)
    lock.acquire()
    try:
        before = snapshot(copy_run)
        code, _, err = call(train.main, ["--config", copy, "--workdir", copy_run, "--config.train.steps=4"], capsys)
        assert code == 2 and f"in use by another trainer (pid {os.getpid()} on" in err, err
        assert snapshot(copy_run) == before
    finally:
        lock.release()


def test_bad_inference_input_is_one_line_and_changes_nothing(copy_run, char_run, tmp_path, capsys, monkeypatch):
    char_dir, _ = char_run
    (tmp_path / "a_file").write_text("x")
    cases = [
        (evaluate.main, ["--batches", "-1"], "--batches: '-1': must be >= 0"),
        (evaluate.main, ["--beam_size", "-1"], "--beam_size: '-1': must be >= 0"),
        (evaluate.main, ["--out", str(tmp_path / "a_file" / "r.json")], "--out"),
        (evaluate.main, ["--split", "nope"], "--split nope"),
        (evaluate.main, ["--tta", "flip"], "flip test-time augmentation needs an image classification run"),
        (translate.main, ["--batch_size", "-2"], "--batch_size: '-2': must be >= 1"),
        (translate.main, ["--batch_size", "0"], "--batch_size: '0': must be >= 1"),
        (translate.main, ["--beam_size", "-1"], "--beam_size: '-1'"),
        (translate.main, ["--max_len", "0"], "--max_len: '0'"),
        (generate.main, ["--prompt", "1 2", "--temperature", "-1"], "--temperature: '-1'"),
        (generate.main, ["--prompt", "1 2", "--top_p", "1.5"], "--top_p: '1.5': must be <= 1.0"),
        (generate.main, ["--prompt", "1 2", "--top_k", "-1"], "--top_k: '-1'"),
        (generate.main, ["--prompt", "1 2", "--num_samples", "0"], "--num_samples: '0'"),
        (generate.main, ["--prompt", "1 2", "--max_new_tokens", "-1"], "--max_new_tokens: '-1'"),
        (generate.main, ["--prompt", "1 2"], "generate needs a decoder-only LM"),
    ]
    before = snapshot(copy_run)
    for main, args, expected in cases:
        code, out, err = call(main, ["--workdir", copy_run, *args], capsys, stdin=b"1 2\n", monkeypatch=monkeypatch)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    assert snapshot(copy_run) == before
    # A language model: top_k past the vocabulary, a character it never saw, a damaged vocabulary.
    for args, expected in [(["--prompt", "To", "--top_k", "1000"], "--top_k 1000: the vocabulary has only"),
                           (["--prompt", "To be\u00e9"], "is not in the run's vocabulary")]:  # fmt: skip
        code, out, err = call(generate.main, ["--workdir", char_dir, *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (args, err)


def test_a_prompt_longer_than_the_context_is_cut_and_says_so(char_run, capsys):
    prompt = ("To be, or not to be, that is the question" * 2)[:40]
    code, out, err = call(generate.main, ["--workdir", char_run[0], "--prompt", prompt, "--max_new_tokens", "3",
                                          "--temperature", "0"], capsys)  # fmt: skip
    assert code == 0, err
    assert err.strip() == "generate: the prompt has 40 tokens but the model sees at most 32; continuing from its last 16"
    assert out.rstrip("\n").startswith(prompt) and len(out.rstrip("\n")) == 43


def test_damaged_files_in_a_workdir_are_one_line(char_run, tmp_path, capsys):
    import shutil

    workdir = str(tmp_path / "run")
    shutil.copytree(char_run[0], workdir)
    with open(os.path.join(workdir, "vocab.json"), "w") as f:
        f.write("[not json")
    code, _, err = call(generate.main, ["--workdir", workdir, "--prompt", "To"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a character vocabulary" in err, err
    shutil.copy(os.path.join(char_run[0], "vocab.json"), os.path.join(workdir, "vocab.json"))
    # Every checkpoint damaged: one line naming them, nothing moved.
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        for root, _, files in os.walk(os.path.join(workdir, "checkpoints", step, "state")):
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(0)
    before = snapshot(workdir)
    code, _, err = call(generate.main, ["--workdir", workdir, "--prompt", "To"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "none of the checkpoints [2]" in err, err
    assert snapshot(workdir) == before


def test_gnmt_length_penalty_literal_values():
    """((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14), pinned by hand-computed values."""
    from tfm.decode import length_penalty

    assert float(length_penalty(1, 0.6)) == pytest.approx(1.0)
    assert float(length_penalty(7, 0.6)) == pytest.approx(2.0**0.6)
    assert float(length_penalty(13, 1.0)) == pytest.approx(3.0)
    assert float(length_penalty(4, 0.0)) == pytest.approx(1.0)
