"""Where files live: local folders and cloud URIs (``gs://``, ``s3://``, ``az://``), through ``etils.epath``.

Every path the trainer, the readers and the data builders are given goes
through ``resolve`` once: a URI is kept exactly as typed (never turned into a
local relative folder such as ``./gs:/bucket``), a local path becomes absolute.
Paths stay plain strings, so they print and serialise as typed; the helpers
here do the file work through epath, whose backends reach GCS (``gcsfs`` or
TensorFlow's gfile), S3 and Azure wherever their credentials exist. orbax and
TensorStore take the same URIs for checkpoints.

What object stores cannot do, and what tfm does instead:

* no rename: ``write_atomic`` writes the object directly; an object store
  publishes an object whole or not at all, which is what the rename is for;
* no append: ``AppendFile`` keeps what it has written and rewrites the whole
  object on each flush (metrics files are small);
* no ``flock``: a workdir on remote storage has no exclusive lock
  (``tfm.workdir.Lock`` says so once, in a warning);
* no folders: a "folder" exists once it holds an object.
"""

from __future__ import annotations

import os
import shutil

from etils import epath

# The URI schemes epath has a backend for ("hf" is read-only and not offered for workdirs).
SCHEMES = ("gs", "s3", "az")


class StorageError(ValueError):
    """A path that tfm cannot read or write (an unknown URI scheme); the message names it."""


def scheme(path: str) -> str:
    """``"gs"`` for ``gs://b/x``; ``""`` for a local path (``file://`` counts as local)."""
    head, sep, _ = os.fspath(path).partition("://")
    return head.lower() if sep and "/" not in head else ""


def is_remote(path: str) -> bool:
    return scheme(path) not in ("", "file")


def resolve(path: str, what: str = "path") -> str:
    """``path`` as tfm keeps it: a supported URI unchanged, a local path absolute; ``StorageError`` otherwise."""
    path = os.fspath(path)
    kind = scheme(path)
    if kind == "file":
        path, kind = path[len("file://"):], ""
    if kind and kind not in SCHEMES:
        raise StorageError(f"{what} {path}: the {kind}:// scheme is not supported; use a local path or "
                           + ", ".join(f"{s}://" for s in SCHEMES))  # fmt: skip
    if kind:
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
    return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def parent(path: str) -> str:
    return str(epath.Path(path).parent) if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
    p = epath.Path(path)
    return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
    """The names in folder ``path`` ([] if it does not exist)."""
    p = epath.Path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: str) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_atomic(path: str, content: bytes | str) -> None:
    """``path`` holds all of ``content`` or keeps what it held.

    Locally: a temporary file, then a rename. On an object store the object is
    written directly: it is published whole when the upload completes, or not at all.
    """
    data = content.encode("utf-8") if isinstance(content, str) else content
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def move(src: str, dest: str) -> None:
    """Rename ``src`` (a file or folder) to ``dest`` (copy, then delete, on an object store)."""
    if is_remote(src) or is_remote(dest):
        epath.Path(src).rename(dest)
    else:
        shutil.move(src, dest)


def upload_tree(local: str, dest: str) -> None:
    """Copy the files under local folder ``local`` to ``dest`` (same relative names), overwriting."""
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            target = epath.Path(join(dest, *rel.split(os.sep)))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(open(os.path.join(root, name), "rb").read())


def cache_folder(path: str) -> str:
    """The local folder that mirrors URI ``path`` (``~/.cache/tfm/remote/gs/bucket/...``; ``$TFM_CACHE`` moves it)."""
    root = os.environ.get("TFM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tfm")
    return os.path.join(root, "remote", scheme(path), *os.fspath(path).split("://", 1)[1].strip("/").split("/"))


def local_copy(path: str) -> str:
    """A local path with the contents of ``path`` (a file or a folder): ``path`` itself, or a mirror of the URI.

    Tools that read only local files (tfds' manual folders, sentencepiece) read
    cloud data through this. A file already mirrored with the same size is not fetched again.
    """
    if not is_remote(path):
        return path
    src, dest = epath.Path(path), cache_folder(path)
    if not src.is_dir():
        _fetch(src, dest)
        return dest
    for f in src.rglob("*"):
        if not f.is_dir():
            _fetch(f, os.path.join(dest, *f.relative_to(src).parts))
    return dest


def _fetch(src: epath.Path, dest: str) -> None:
    if os.path.isfile(dest) and os.path.getsize(dest) == src.stat().length:
        return
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    write_atomic(dest, src.read_bytes())


class AppendFile:
    """A text file that grows by lines: appended locally; rewritten whole on an object store (no append there)."""

    def __init__(self, path: str):
        self.path = path
        self.remote = is_remote(path)
        if self.remote:
            self._lines = [read_text(path)] if exists(path) else []
            self._file = None
        else:
            self._file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if self.remote:
            self._lines.append(text)
        else:
            self._file.write(text)

    def flush(self) -> None:
        if self.remote:
            epath.Path(self.path).write_text("".join(self._lines), encoding="utf-8")
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


__all__ = ["AppendFile", "SCHEMES", "StorageError", "exists", "is_remote", "isdir", "isfile", "join", "listdir",
           "cache_folder", "local_copy", "makedirs", "move", "parent", "read_bytes", "read_text", "resolve", "scheme", "upload_tree",
           "write_atomic"]  # fmt: skip
