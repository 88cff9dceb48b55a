"""A run's workdir: its files, who may write them, and what may change between runs in it.

::

    W/config.json          the resolved run config (written whole, by the trainer)
    W/lock                 held by the one trainer of W (names its pid and host)
    W/tokenizer.model      what the dataset needs to read and write text: a sentencepiece
    W/vocab.json           model, or the character vocabulary (written whole)
    W/checkpoints/         orbax steps (tfm.checkpoint)
    W/metrics.jsonl, W/tensorboard/
    W/eval_<split>.json    written by tfm.evaluate
    W/corrupt/             damaged checkpoints, moved aside
    W/replaced-<time>/     a previous run of another model or tokenizer (--allow_model_change)

Only the trainer holding the lock writes checkpoints; readers (evaluate,
generate, translate) never write, move or delete anything but their own result
file. Nothing here is ever deleted: what no longer belongs is moved aside.

``W`` may be a cloud URI (``gs://bucket/run``; ``tfm.storage``). There the lock
is advisory only: object stores have no ``flock``, so keeping one trainer per
workdir is then the user's job (a warning says so).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time

from tfm import storage
from tfm.config import ConfigError

log = logging.getLogger("tfm")

CONFIG = "config.json"
LOCK = "lock"
# Files that give the checkpoints their meaning, written by the dataset (``Dataset.artifacts()``).
ARTIFACTS = ("tokenizer.model", "vocab.json", "tokenizer.json")


write_atomic = storage.write_atomic


def unwritable(path: str) -> str:
    """Why ``path`` (a file or folder to create) cannot be written, or '' if it can.

    A URI is not probed: its credentials are checked by the first write.
    """
    if storage.is_remote(path):
        return ""
    full = os.path.abspath(path)
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != full and not os.path.isdir(existing):
        return f"cannot be created, {existing} is a file"
    parent = existing if os.path.isdir(existing) else os.path.dirname(existing)
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return ""


def check_writable(workdir: str) -> None:
    """``ConfigError`` if ``workdir`` is a file, or neither it nor its nearest existing parent is writable."""
    if storage.isfile(workdir):
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    if why := unwritable(workdir):
        raise ConfigError(f"--workdir {workdir}: {why}")


def read_config(workdir: str) -> dict | None:
    """The saved run config, or None if ``workdir`` holds no run; ``ConfigError`` if it is unreadable."""
    path = storage.join(workdir, CONFIG)
    if not storage.isfile(path):
        return None
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a run config (a JSON object)")
    return saved


class Lock:
    """An exclusive ``flock`` on ``W/lock`` for one trainer; the kernel drops it when the process dies."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = storage.join(workdir, LOCK)
        self.remote = storage.is_remote(workdir)
        self._file = None

    def _holder(self, f) -> str:
        f.seek(0)
        return f.read().strip() or "an unknown process"

    def _refuse(self, holder: str):
        return ConfigError(
            f"--workdir {self.workdir} is in use by another trainer ({holder}); wait for it to end or use another --workdir"
        )

    def check(self) -> None:
        """Refuse now if another trainer holds the lock (writes nothing)."""
        if self.remote or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(self._holder(f)) from None
            fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self) -> None:
        if self.remote:
            log.warning("%s is on remote storage, which has no file locks: make sure no other trainer uses it",
                        self.workdir)  # fmt: skip
            return
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(f)
            f.close()
            raise self._refuse(holder) from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _first_difference(old: dict, new: dict, section: str) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return ""
    k = keys[0]
    return f"{section}.{k}: {old.get(k)!r} there, {new.get(k)!r} now"


def conflict(workdir: str, saved: dict | None, new: dict, artifacts: dict[str, bytes]) -> str:
    """Why the checkpoints in ``workdir`` would mean something else under the new config ('' if they would not).

    A different model section, a moving average of the parameters on one side only, or a tokenizer /
    vocabulary that differs from the one saved with the run (another ``data.vocab_size``, other data files).
    """
    if saved is None:
        return ""
    if saved.get("model") != new.get("model"):
        return f"a different model ({_first_difference(saved.get('model', {}), new['model'], 'model')})"
    ema = [cfg.get("optim", {}).get("ema_decay", 0.0) for cfg in (saved, new)]
    if (ema[0] > 0) != (ema[1] > 0):  # the saved state has (or lacks) TrainState.ema_params
        return f"optim.ema_decay={ema[0]} (this run: {ema[1]}): a moving average of the parameters on one side only"
    for name, content in artifacts.items():
        path = storage.join(workdir, name)
        if storage.isfile(path):
            if storage.read_bytes(path) != content:
                why = _first_difference(saved.get("data", {}), new.get("data", {}), "data")
                return f"another {name} ({why or 'the data files changed'})"
    return ""


def move_previous_run_aside(workdir: str) -> str | None:
    """Move the checkpoints, config, tokenizer and W&B run id of the run in ``workdir`` into ``replaced-<time>/``."""
    names = [n for n in ("checkpoints", CONFIG, *ARTIFACTS, "wandb_run_id") if storage.exists(storage.join(workdir, n))]
    if not names:
        return None
    stamp = int(time.time())
    while storage.exists(aside := storage.join(workdir, f"replaced-{stamp}")):
        stamp += 1
    storage.makedirs(aside)
    for name in names:
        storage.move(storage.join(workdir, name), storage.join(aside, name))
    return aside


def write_run_files(workdir: str, config_json: str, artifacts: dict[str, bytes]) -> None:
    """The resolved config and the dataset's artifacts, each complete or not at all."""
    write_atomic(storage.join(workdir, CONFIG), config_json)
    for name, content in artifacts.items():
        write_atomic(storage.join(workdir, name), content)


def prepare_run(workdir: str, config_json: str, artifacts: dict[str, bytes], replace_previous: bool) -> None:
    """Before the first step: put a replaced run aside (``--allow_model_change``), write the run files.

    Only process 0 writes; all processes wait until the files are there.
    """
    import jax

    if jax.process_index() == 0:
        if replace_previous:
            # The other run's checkpoints and tokenizer are kept, out of the way.
            aside = move_previous_run_aside(workdir)
            log.warning("the workdir held another run; its checkpoints are now in %s", aside)
        write_run_files(workdir, config_json, artifacts)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tfm_workdir_ready")


__all__ = ["ARTIFACTS", "Lock", "check_writable", "conflict", "move_previous_run_aside", "prepare_run", "read_config",
           "unwritable", "write_atomic", "write_run_files"]  # fmt: skip
