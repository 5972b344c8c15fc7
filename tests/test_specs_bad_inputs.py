"""The bad-input corpus: every way a desired-state repo can be rejected.

Each directory under ``tests/bad/`` is a tiny repo holding one mistake (or,
for ``three-bad-files``, several) and an ``expected.txt`` with the exact
error lines ``path:line:column: error: <stable part of the message>``. Path,
line and column must match exactly, in order; the message must contain the
stable part. Lines starting with ``#`` explain the case.

Two cases need files git cannot be trusted with, so the test makes them in
the copy it loads: a file over 1 MiB, and a symlink leading out of the repo.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import specs as specs_module
from reconciler.repo_tree import DirectoryTree, load_repo, spec_files
from reconciler.specs import MAX_FILE_BYTES, SpecError, parse_repo

BAD = Path(__file__).parent / "bad"
CASES = sorted(p.name for p in BAD.iterdir() if p.is_dir())
EXPECTED_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+):(?P<column>\d+): error: (?P<message>.+)$")


def _pad_past_limit(repo: Path) -> None:
    target = repo / "packages" / "app-1.0.yaml"
    text = target.read_text(encoding="utf-8")
    padding = "# " + "x" * 78 + "\n"
    count = (MAX_FILE_BYTES - len(text)) // len(padding) + 1
    target.write_text(text + padding * count, encoding="utf-8")
    assert target.stat().st_size > MAX_FILE_BYTES


def _symlink_outside(repo: Path) -> None:
    outside = repo.parent / "outside"
    outside.mkdir()
    (outside / "payload.txt").write_text("not part of the repo\n", encoding="utf-8")
    (repo / "artifacts" / "escape").symlink_to(Path("..") / ".." / "outside", target_is_directory=True)
    assert (repo / "artifacts" / "escape" / "payload.txt").exists()


SETUP: dict[str, Callable[[Path], None]] = {
    "file-too-large": _pad_past_limit,
    "artifact-symlink-outside": _symlink_outside,
}


def _expected(case: str) -> list[tuple[str, int, int, str]]:
    rows = []
    for raw in (BAD / case / "expected.txt").read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        match = EXPECTED_LINE.match(raw)
        assert match, f"{case}/expected.txt: malformed line {raw!r}"
        rows.append((match["path"], int(match["line"]), int(match["column"]), match["message"]))
    return rows


def _materialise(case: str, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(BAD / case, repo, ignore=shutil.ignore_patterns("expected.txt"))
    if case in SETUP:
        SETUP[case](repo)
    return repo


def test_the_corpus_is_large_and_every_case_expects_an_error() -> None:
    assert len(CASES) >= 45
    for case in CASES:
        assert _expected(case), f"{case}: expected.txt names no error"
    assert set(SETUP) <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_rejected_at_the_right_place(case: str, tmp_path: Path) -> None:
    repo = _materialise(case, tmp_path)
    result = load_repo(repo)

    assert not result.valid
    assert result.specs is None
    actual = list(result.errors)
    expected = _expected(case)
    shown = "\n".join(str(e) for e in actual)
    assert len(actual) == len(expected), f"{case}: got\n{shown}"
    for error, (path, line, column, message) in zip(actual, expected):
        assert (error.path, error.line, error.column) == (path, line, column), f"{case}: got\n{shown}"
        assert message in error.message, f"{case}: got\n{shown}"
        assert str(error).startswith(f"{path}:{line}:{column}: error: ")
    assert actual == sorted(actual, key=lambda e: (e.path, e.line, e.column))


def test_schema_errors_carry_the_json_pointer_of_the_field(tmp_path: Path) -> None:
    result = load_repo(_materialise("schema-negative-backoff", tmp_path))
    assert [e.pointer for e in result.errors] == ["/spec/retry/backoffSeconds"]
    assert result.errors[0].to_json() == {
        "path": "jobs/install-app.yaml", "line": 11, "column": 21,
        "pointer": "/spec/retry/backoffSeconds",
        "message": result.errors[0].message,
    }


def test_a_broken_file_among_good_ones_is_the_only_error(tmp_path: Path) -> None:
    # The job in three-bad-files/jobs/install-app-2.yaml names the package whose
    # artifact path is wrong: it must not get a second "no package" error.
    result = load_repo(_materialise("three-bad-files", tmp_path))
    assert {e.path for e in result.errors} == {"jobs/install-app.yaml", "packages/app-1.0.yaml", "topology.yaml"}


def test_an_alias_bomb_is_stopped() -> None:
    levels = ["  a: &a [" + ", ".join(["lol"] * 10) + "]"]
    for index in range(1, 20):  # 10**20 nodes if expanded
        prev, name = chr(ord("a") + index - 1), chr(ord("a") + index)
        levels.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = "apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: bomb\nx:\n" + "\n".join(levels) + "\n"
    result = parse_repo({"jobs/bomb.yaml": text.encode()}, lambda path: None)
    bomb = [e for e in result.errors if e.path == "jobs/bomb.yaml"]
    assert len(bomb) == 1 and "alias expansion bomb" in bomb[0].message


# The pure-Python parser and libyaml (whose own nesting limit may strike
# first, in its own words) must give the same error at the same place.
LOADERS = [yaml.SafeLoader, *([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.__name__)
@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_nesting_as_deep_as_a_file_allows_is_our_error_whatever_the_parser(
        loader: Any, opener: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs_module, "_Loader", loader)
    depth = (MAX_FILE_BYTES - 100) // (2 * len(opener))
    closer = "]" if opener == "[" else "}"
    text = "apiVersion: reconciler/v1\nkind: Job\nspec: " + opener * depth + closer * depth + "\n"
    result = parse_repo({"jobs/deep.yaml": text.encode()}, lambda path: None)
    deep = [e for e in result.errors if e.path == "jobs/deep.yaml"]
    # The root mapping is level 1, so the 64th bracket opens level 65.
    column = len("spec: ") + 63 * len(opener) + 1
    assert [(e.line, e.column, e.message) for e in deep] == [(3, column, "YAML nesting is deeper than 64 levels")]


@pytest.mark.parametrize("loader", LOADERS, ids=lambda loader: loader.__name__)
def test_deep_flow_inside_block_nesting_counts_both(loader: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs_module, "_Loader", loader)
    text = "apiVersion: reconciler/v1\nkind: Job\nspec:\n  a:\n    b: " + "[" * 2000 + "]" * 2000 + "\n"
    result = parse_repo({"jobs/deep.yaml": text.encode()}, lambda path: None)
    deep = [e for e in result.errors if e.path == "jobs/deep.yaml"]
    # spec, a and b's mappings are three levels: the 62nd bracket opens level 65.
    assert [(e.line, e.column, e.message) for e in deep] == [
        (5, len("    b: ") + 62, "YAML nesting is deeper than 64 levels")]


@pytest.mark.parametrize("text", [
    'a: "[[[[" \nb: [1]\nc: @',  # brackets in quotes, then a syntax error: not a depth error
    "a: x[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nb: @",
    "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nb: @",
    "a: |\n  ASCII art " + "[" * 70 + "\n  more [[[[\n\n  and more\nb: {c: d\n",  # in a block scalar
    "a: >-\n    " + "{" * 70 + "\nb: [1, 2\n",
    "- x [ " + "[ " * 70 + "\n- {a: b\n",  # in a plain scalar, with spaces between
    "a: ['[[[[[[[[', \"" + "[" * 70 + "\", c\nb: @",  # in quoted scalars inside a flow sequence
    "m:\n  n:\n    note: see\n      " + "[" * 65 + "\nspec: : oops\n",  # a plain scalar's next line
    "x: text\n  " + "[" * 70 + "\ny: @\n",
    "x: &a b\n  " + "[" * 70 + "\ny: @\n",
    "- a\n  " + "[" * 70 + "\n- @\n",
    "? a\n  " + "[" * 70 + "\n: @\n",
    "x: !!str |\n  " + "[" * 70 + "\ny: @\n",  # block scalars after a tag or an anchor
    "x: &a >-\n  " + "[" * 70 + "\ny: @\n",
    "- d: |\n    " + "[" * 70 + "\n  e: @\n",
    "x: [?'" + "[" * 70 + "']\ny: @\n",  # a quote after an explicit key in flow
])
def test_brackets_in_scalars_and_comments_are_not_nesting(text: str) -> None:
    result = parse_repo({"jobs/x.yaml": text.encode()}, lambda path: None)
    messages = [e.message for e in result.errors if e.path == "jobs/x.yaml"]
    assert len(messages) == 1 and messages[0].startswith("YAML syntax error"), messages


@pytest.mark.parametrize("text", [
    "x: &a " + "[" * 1100 + "]" * 1100 + "\n",  # after an anchor
    "x: !!seq " + "[" * 1100 + "]" * 1100 + "\n",  # after a tag
    "x:\n  - d: |\n      text\n    e: " + "[" * 1100 + "]" * 1100 + "\n",  # after a block scalar
    "x: &a " + "[" * 70 + "@\n",  # deep, then a stray character
])
def test_real_deep_nesting_is_our_error_after_tags_anchors_and_block_scalars(text: str) -> None:
    result = parse_repo({"jobs/x.yaml": ("spec:\n" + text).encode()}, lambda path: None)
    messages = [e.message for e in result.errors if e.path == "jobs/x.yaml"]
    assert messages == ["YAML nesting is deeper than 64 levels"], messages


def test_load_repo_and_parse_repo_agree_on_the_corpus(tmp_path: Path) -> None:
    # parse_repo is the pure core HQ runs on files read from git; load_repo is
    # its directory shell. Same input, same errors.
    for case in ("yaml-duplicate-key", "three-bad-files", "topology-cycle", "job-unknown-package-version"):
        repo = _materialise(case, tmp_path / case)
        seen: list[str] = []

        def check(relpath: str, repo: Path = repo, seen: list[str] = seen) -> str | None:
            seen.append(relpath)
            return None if (repo / relpath).exists() else "does not exist"

        assert parse_repo(spec_files(DirectoryTree(repo)), check).errors == load_repo(repo).errors
        assert all(not p.startswith("/") for p in seen)


def test_every_error_names_a_file_in_the_repo_or_the_missing_topology(tmp_path: Path) -> None:
    for case in CASES:
        repo = _materialise(case, tmp_path / case)
        for error in load_repo(repo).errors:
            assert isinstance(error, SpecError)
            assert error.line >= 1 and error.column >= 1
            assert (repo / error.path).is_file() or error.path == "topology.yaml", f"{case}: {error}"


def test_mismatched_collection_tags_are_refused() -> None:
    text = ("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: x}\nspec:\n"
            "  destinations: !!map [relay-kanto]\n")
    result = parse_repo({"jobs/x.yaml": text.encode()}, lambda path: None)
    assert [(e.line, e.message) for e in result.errors if e.path == "jobs/x.yaml"] == [
        (5, "YAML tag !!map is not supported here; write a plain value")]


def test_unique_lists_of_any_items_are_checked_in_linear_time() -> None:
    # jsonschema compares every pair of items it cannot sort: 6,000 lists would take minutes
    items = ",".join(f"[{i}]" for i in range(6000))
    text = ("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: x}\nspec:\n  jobType: install\n"
            "  package: {name: app, version: '1'}\n  destinationType: clients\n"
            f"  destinations: [{items}, [0]]\n")
    result = parse_repo({"jobs/x.yaml": text.encode()}, lambda path: None)
    messages = [e.message for e in result.errors if e.path == "jobs/x.yaml"]
    assert "/spec/destinations: items must be unique ([0] is listed twice, again on line 8)" in messages


def test_a_long_parent_chain_and_a_long_cycle_are_judged_once_each() -> None:
    relays = "".join(f"    - {{name: r{i}, parent: {'r' + str(i - 1) if i else 'hq-x'}}}\n" for i in range(3000))
    cycle = "".join(f"    - {{name: c{i}, parent: c{(i - 1) % 500}}}\n" for i in range(500))
    text = f"apiVersion: reconciler/v1\nkind: Topology\nmetadata: {{name: t}}\nspec:\n  headquarters: hq-x\n  relays:\n{relays}{cycle}"
    result = parse_repo({"topology.yaml": text.encode()}, lambda path: None)
    errors = [e for e in result.errors if e.path == "topology.yaml"]
    assert len(errors) == 101 and errors[0].message.startswith("more than 100 errors in this file")
    assert all(len(e.message) < 400 for e in errors)
    assert "is on a parent cycle (c" in errors[1].message and "(500 relays)" in errors[1].message
