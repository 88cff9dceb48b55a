"""Cloud paths: URIs are kept as typed and reach epath and orbax unchanged; a run trains, resumes and
is read back from ``gs://`` (a local GCS emulator, when ``gcsfs`` and ``gcp-storage-emulator`` are
installed: both are test dependencies)."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tfm import config as config_lib
from tfm import inference, storage
from tfm.checkpoint import Checkpointer
from tfm.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def test_a_uri_is_kept_as_typed_and_a_local_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("gs://bucket/run1/") == "gs://bucket/run1"
    assert storage.resolve("s3://b/x") == "s3://b/x"
    assert storage.resolve("run1") == os.path.join(str(tmp_path), "run1")
    assert storage.resolve("file:///tmp/x") == "/tmp/x"
    assert storage.join("gs://bucket/run1", "checkpoints", "3") == "gs://bucket/run1/checkpoints/3"
    assert storage.parent("gs://bucket/run1/checkpoints") == "gs://bucket/run1"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/gs://x") and not storage.is_remote("file:///x")


def test_an_unknown_scheme_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match=r"^--workdir ftp://host/run: the ftp:// scheme is not supported"):
        storage.resolve("ftp://host/run", "--workdir")
    c = config_lib.load_config(os.path.join(ROOT, "configs", "copy.py:tiny"))
    with pytest.raises(storage.StorageError, match="ftp://"):
        Trainer(c, "ftp://host/run", devices=jax.devices()[:1])
    assert os.listdir(tmp_path) == []  # nothing like ./ftp:/host/run was made


def test_the_train_cli_refuses_an_unknown_scheme_with_exit_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "tfm.train", "--config", os.path.join(ROOT, "configs", "copy.py:tiny"),
                        "--workdir", "memory://run"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "memory:// scheme is not supported" in p.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []


def test_checkpoint_uris_reach_orbax_unchanged(monkeypatch):
    import orbax.checkpoint as ocp

    seen = []

    class Manager:
        def __init__(self, directory, **kwargs):
            seen.append(directory)

    monkeypatch.setattr(ocp, "CheckpointManager", Manager)
    ck = Checkpointer("gs://bucket/run1/checkpoints")
    assert ck.directory == "gs://bucket/run1/checkpoints" and seen == ["gs://bucket/run1/checkpoints"]


def test_a_local_append_file_appends(tmp_path):
    path = str(tmp_path / "m.jsonl")
    for line in ("a\n", "b\n"):
        f = storage.AppendFile(path)
        f.write(line)
        f.close()
    assert open(path).read() == "a\nb\n"


# --- a real object store: the GCS emulator --------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
    """A bucket ``gs://tfm-test`` in an in-memory GCS emulator, reached by gcsfs (epath) and TensorStore (orbax)."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), str(port), "tfm-test"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_CLOUD_PROJECT="tfm-test")
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield "gs://tfm-test"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_the_emulated_bucket_has_object_store_semantics(gcs):
    path = f"{gcs}/semantics/m.jsonl"
    for line in ("a\n", "b\n"):  # a reopened AppendFile keeps what the object held
        f = storage.AppendFile(path)
        f.write(line)
        f.close()
    assert storage.read_text(path) == "a\nb\n"
    storage.write_atomic(f"{gcs}/semantics/x.json", "{}")
    assert storage.listdir(f"{gcs}/semantics") == ["m.jsonl", "x.json"]


def _trainer(workdir, steps, data_dir):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "shakespeare_char.py:tiny"))
    c = config_lib.apply_overrides(c, [f"data.data_dir={data_dir}", f"train.steps={steps}", "train.checkpoint_every=3",
                                       "train.eval_every=0", "train.eval_steps=0", "train.progress=none",
                                       "mesh.data=1"])  # fmt: skip
    return Trainer(c, workdir, devices=jax.devices()[:1])


@pytest.mark.skipif(not os.path.isdir(DATA), reason="needs the shared data folder")
def test_a_run_trains_resumes_and_is_read_back_from_gcs(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any stray local copy of the URI would appear here
    monkeypatch.setenv("TFM_CACHE", str(tmp_path / "cache"))
    data = f"{gcs}/data"
    storage.write_atomic(f"{data}/tinyshakespeare/input.txt", open(os.path.join(DATA, "tinyshakespeare", "input.txt"), "rb").read())
    run = f"{gcs}/runs/char"

    first = _trainer(run, 4, data).train()
    assert first["step"] == 4 and first["checkpoint"] == f"{run}/checkpoints/4"
    second = _trainer(run, 6, data).train()
    assert second["start_step"] == 4 and second["step"] == 6
    assert {"config.json", "vocab.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= set(storage.listdir(run))
    assert [s for s in storage.listdir(f"{run}/checkpoints") if s.isdigit()] == ["3", "4", "6"]  # keep_checkpoints=3
    # The text was read from the bucket, through the local mirror of the data folder.
    assert os.path.isfile(tmp_path / "cache" / "remote" / "gs" / "tfm-test" / "data" / "tinyshakespeare" / "input.txt")
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and min(steps) <= 4  # both runs' lines, in order
    assert any(n.startswith("events.") for n in storage.listdir(f"{run}/tensorboard"))

    # The resumed cloud run equals an uninterrupted local one, leaf for leaf.
    local = _trainer(str(tmp_path / "local"), 6, os.path.join(DATA)).train()
    assert local["step"] == 6
    loaded = inference.load(run)
    assert loaded.step == 6 and loaded.workdir == run
    reference = inference.load(str(tmp_path / "local"))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [n for n in os.listdir(tmp_path) if n not in ("local", "cache")] == []  # no ./gs:/... folder
