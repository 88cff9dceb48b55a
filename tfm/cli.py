"""What the ``python -m tfm.*`` commands share: one-line errors, argument checks, quiet libraries.

Exit statuses of every command: 0 done; 1 the work failed or was only partly
done (the message says what was kept); 2 bad input (arguments, config, workdir,
data), refused before anything was written; 130 interrupted before any work began.
Results go to stdout, everything else (progress, logs, errors) to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: ...``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, low, name, high=None, open_low=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite")
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'>' if open_low else '>='} {low} ({name})")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be <= {high} ({name})")
        return value

    return parse


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    return _number(int, low, what)


def float_at_least(
    low: float, what: str = "", high: float | None = None, open_low: bool = False
) -> Callable[[str], float]:
    return _number(float, low, what, high, open_low)


def quiet_libraries() -> None:
    """Keep orbax / absl / tfds chatter below warnings (their notices are not the user's problem)."""
    for name in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Library output (tfds preparing a dataset, sentencepiece) must not mix into a command's results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def fail(prog: str, message: object, status: int = 2) -> int:
    """Print ``prog: message`` as one line on stderr and return ``status``."""
    text = " ".join(str(message).split()) if "\n" in str(message) else str(message)
    print(f"{prog}: {text}", file=sys.stderr)
    return status




def split_overrides(rest: list[str], error) -> list[str]:
    """``["--config.a.b=1", "--config.c", "2", "--config.flag"]`` -> ``["a.b=1", "c=2", "flag"]``.

    A key with no ``=`` takes the next argument as its value unless that is another
    option (``--...``); a key left without a value is a boolean switch (``apply_overrides``
    refuses it for keys that are not boolean).
    """
    out, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            error(f"unrecognised argument {item!r} (overrides look like --config.train.steps=100)")
        body = item[len("--config.") :]
        if "=" not in body and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            body, i = f"{body}={rest[i + 1]}", i + 1
        out.append(body)
        i += 1
    return out


__all__ = ["Parser", "fail", "float_at_least", "int_at_least", "quiet_libraries", "split_overrides", "stdout_to_stderr"]
