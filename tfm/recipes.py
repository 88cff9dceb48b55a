"""The recipes that ship with tfm: ``configs/`` in a checkout, ``tfm.configs`` in an installed package."""

from __future__ import annotations

import os


def folder() -> str | None:
    """Where the shipped recipes are (None if neither place holds them)."""
    try:
        import importlib.resources

        found = str(importlib.resources.files("tfm.configs"))
        if os.path.isdir(found):
            return found
    except ModuleNotFoundError:  # an editable checkout: the recipes sit beside the package
        pass
    found = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return found if os.path.isdir(found) else None


def names() -> list[str]:
    """The shipped recipes by name (``copy``, ``shakespeare_char``, ...)."""
    where = folder()
    return sorted(n[:-3] for n in os.listdir(where) if n.endswith(".py") and not n.startswith("_")) if where else []


def path(name: str) -> str:
    """The file of the shipped recipe ``name``."""
    return os.path.join(folder(), name + ".py")


__all__ = ["folder", "names", "path"]
