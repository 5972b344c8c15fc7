"""Every install command in the project's documents installs this project.

The name ``reconciler`` on PyPI belongs to an unrelated project, so the
distribution is published as ``reconciler-gitops`` (the import package and
the console command stay ``reconciler``). A document that says ``pip install
reconciler`` would install someone else's code in an admin's CI.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest

import reconciler.cli

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DISTRIBUTION = "reconciler-gitops"
VERSION = PYPROJECT["project"]["version"]

# Folders that hold documents, workflows, hooks and unit files; tests/ is left
# out because this file quotes bad commands on purpose.
SKIP_DIRS = {".git", "tests", "__pycache__", ".venv", "venv", "build", "dist", ".mypy_cache", ".ruff_cache",
             ".pytest_cache", ".hypothesis"}
TEXT_SUFFIXES = {".md", ".yml", ".yaml", ".service", ".txt", ".toml", ".sh", ".cfg", ".ini", ".py", ".json", ""}

INSTALL = re.compile(r"(?<![\w-])(?:uv\s+pip|pipx|pip3?)\s+install\b(?P<rest>.*)")
# A command ends at a shell separator, a closing backtick (inline code) or a comment.
END = re.compile(r"`|&&|\|\||;|\s\|\s|\s#")
OPTIONS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "--python", "-t", "--target", "--prefix", "--root"}
OURS = re.compile(rf"^{re.escape(DISTRIBUTION)}(\[[\w,-]+\])?(?P<spec>(?:(?:==|>=|<=|~=|!=|<|>)[\w.*]+,?)*)$")
PINNED_GIT = re.compile(r"^git\+(https|ssh)://[^@\s]+(\.git)?@[\w.\-/]+(#.*)?$")
PATH = re.compile(r"^(\.|\.\.|\./\S*|\.\./\S*|/\S+)(\[[\w,-]+\])?$|^\.\[[\w,-]+\]$")


def documents() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and rel.parts[0] not in SKIP_DIRS:
            out.append(path)
    return out


def install_commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line number, command text, targets) of every install command found."""
    found = []
    for path in documents():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in INSTALL.finditer(line):
                rest = END.split(match.group("rest"))[0]
                text_of = (line[match.start():match.start("rest")] + rest).strip()
                found.append((str(path.relative_to(ROOT)), number, text_of, targets(rest)))
    return found


def targets(rest: str) -> list[str]:
    """What an install command's arguments ask to install (``-e X`` counts X)."""
    words = shlex.split(rest)
    out: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in OPTIONS_WITH_VALUE:
            skip_next = True
        elif word in ("-e", "--editable"):
            continue
        elif not word.startswith("-"):
            out.append(word)
    return out


def verdict(target: str) -> str | None:
    """None when ``target`` is this project, else why not."""
    if PATH.match(target) or PINNED_GIT.match(target):
        return None
    ours = OURS.match(target)
    if ours is None:
        return f"{target!r} is not {DISTRIBUTION}, a path or a git URL pinned with @<tag>"
    pins = re.findall(r"==([\w.*]+)", ours.group("spec"))
    if any(pin != VERSION for pin in pins):
        return f"{target!r} pins a version other than the current {VERSION}"
    return None


def test_pyproject_names_the_distribution_that_is_ours() -> None:
    assert PYPROJECT["project"]["name"] == DISTRIBUTION
    assert PYPROJECT["project"]["scripts"] == {"reconciler": "reconciler.cli:main"}
    assert PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["reconciler"]


def test_the_installed_distribution_provides_the_reconciler_command() -> None:
    dist = importlib.metadata.distribution(DISTRIBUTION)  # PackageNotFoundError: reinstall with pip install -e .
    assert dist.version == VERSION
    scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    assert set(scripts) == {"reconciler"}
    assert scripts["reconciler"].value == "reconciler.cli:main"
    assert scripts["reconciler"].load() is reconciler.cli.main
    assert DISTRIBUTION in importlib.metadata.packages_distributions()["reconciler"]


def test_every_install_command_in_the_documents_installs_this_project() -> None:
    commands = install_commands()
    where = {(path, text) for path, _, text, _ in commands}
    # The search finds the commands it must judge, so an empty scan cannot pass.
    assert ("example-repo/.github/workflows/validate.yml", f'pip install "{DISTRIBUTION}=={VERSION}"') in where
    assert ("README.md", "pip install -q .") in where
    assert ("README.md", "pip install -q -e '.[test]'") in where
    assert (".ci/run", "pip install -q -e '.[test]'") in where
    bad = [f"{path}:{number}: {text}: {why}" for path, number, text, names in commands
           for why in ([verdict(t) for t in names] or ["installs nothing"]) if why]
    assert bad == []


@pytest.mark.parametrize("command, ok", [
    ("pip install reconciler", False),
    ("pip install -U reconciler", False),
    ("pipx install reconciler", False),
    ("uv pip install reconciler==0.1.0", False),
    ("pip install reconciler-gitopsx", False),
    ("pip install git+https://example.org/acme/reconciler.git", False),  # unpinned: whatever main is today
    (f"pip install {DISTRIBUTION}==0.0.9", False),
    (f"pip install {DISTRIBUTION} requests", False),
    (f"pip install -q {DISTRIBUTION}", True),
    (f'pip install "{DISTRIBUTION}=={VERSION}"', True),
    (f"pipx install '{DISTRIBUTION}[test]>=0.1'", True),
    ("pip install -q -e '.[test]'", True),
    ("pip install .", True),
    ("pip install --index-url https://mirror.example/simple ./dist/x.whl", True),
    ('pip install "git+https://example.org/acme/reconciler.git@v0.1.0"', True),
])
def test_the_judge_of_an_install_command(command: str, ok: bool) -> None:
    match = INSTALL.search(command)
    assert match is not None
    names = targets(END.split(match.group("rest"))[0])
    assert bool(names) and all(verdict(t) is None for t in names) == ok, names
