"""Booleans as JSON Schema tools reading YAML see them: only true and false.

YAML 1.1 (PyYAML's default) reads ``yes``, ``no``, ``on`` and ``off`` as
booleans; YAML 1.2's core schema, which editors and ``check-jsonschema``
use, reads them as strings. Specs are read the 1.2 way, so the tool and
the schemas agree: a boolean field given one of those words is an error
naming file, line and field with a hint, and a string field keeps the word.
"""

from __future__ import annotations

import pytest

from reconciler.repo_tree import DirectoryTree, spec_files, tree_artifact_check
from reconciler.resources import example_repo_dir
from reconciler.specs import LoadResult, Specs, parse_repo

EXAMPLE = example_repo_dir()
JOB = "jobs/install-vpn-client.yaml"
TOPOLOGY = "topology.yaml"
HINT = "write true or false: YAML 1.1 words like yes/on are not booleans here"


def _parse(path: str, old: str, new: str) -> LoadResult:
    files = spec_files(DirectoryTree(EXAMPLE))
    text = files[path].decode()
    assert old in text
    return parse_repo({**files, path: text.replace(old, new, 1).encode()}, tree_artifact_check(DirectoryTree(EXAMPLE)))


def _line_of(path: str, old: str, new: str, needle: str) -> int:
    text = spec_files(DirectoryTree(EXAMPLE))[path].decode().replace(old, new, 1)
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(("field", "word"), [
    ("suspend", "yes"), ("allowDowngrade", "on"), ("suspend", "No"), ("allowDowngrade", "OFF"),
    ("suspend", "y"), ("suspend", "n"),
])
def test_a_yaml_1_1_word_in_a_boolean_field_is_an_error_with_a_hint(field: str, word: str) -> None:
    new = f"  rerun: 0\n  {field}: {word}\n"
    result = _parse(JOB, "  rerun: 0\n", new)
    assert not result.valid
    (error,) = result.errors
    assert error.path == JOB
    assert error.line == _line_of(JOB, "  rerun: 0\n", new, f"{field}: {word}")
    assert error.pointer == f"/spec/{field}"
    assert error.message == f"/spec/{field}: expected boolean, got {word!r}; {HINT}"


def test_a_quoted_yes_is_a_string_and_a_schema_error() -> None:
    result = _parse(JOB, "  rerun: 0\n", '  rerun: 0\n  suspend: "yes"\n')
    (error,) = result.errors
    assert error.pointer == "/spec/suspend"
    assert error.message.startswith("/spec/suspend: expected boolean, got 'yes'")


@pytest.mark.parametrize("word", ["true", "True", "TRUE"])
def test_true_is_a_boolean(word: str) -> None:
    result = _parse(JOB, "  rerun: 0\n", f"  rerun: 0\n  suspend: {word}\n  allowDowngrade: false\n")
    assert result.errors == ()
    assert isinstance(result.specs, Specs)
    (job,) = [j for j in result.specs.jobs if j.name == "install-vpn-client"]
    assert job.suspend is True
    assert job.allow_downgrade is False


@pytest.mark.parametrize("word", ["yes", "on", "no", "off"])
def test_a_label_value_yes_stays_the_string(word: str) -> None:
    result = _parse(TOPOLOGY, "labels: {region: east, site: tokyo}", f"labels: {{region: east, site: tokyo, vip: {word}}}")
    assert result.errors == ()
    assert isinstance(result.specs, Specs)
    (kanto,) = [r for r in result.specs.topology.relays if r.name == "relay-kanto"]
    assert dict(kanto.labels)["vip"] == word
