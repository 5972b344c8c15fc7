"""Where the shipped data lives: the JSON Schemas, the example repo and the pre-commit hook.

A wheel carries them inside the package (``reconciler/schemas``); a source
checkout or an editable install keeps them at the project root. Both are
looked up here so no other module cares which.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the shipped {name!r} directory next to {_PACKAGE_DIR}")


def schemas_dir() -> Path:
    """The directory holding every ``*.schema.json`` file."""
    return _find("schemas")


def example_repo_dir() -> Path:
    """The realistic desired-state repo used by ``reconciler demo``."""
    return _find("example-repo")


def pre_commit_hooks_file() -> Path:
    """This project's pre-commit hook definitions (``.pre-commit-hooks.yaml`` at the project root)."""
    for candidate in (_PACKAGE_DIR / "pre-commit-hooks.yaml", _PACKAGE_DIR.parent / ".pre-commit-hooks.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"cannot find the shipped pre-commit hooks next to {_PACKAGE_DIR}")
