"""``spec.installer.redact``: loaded, checked at validate time with file/line/field, and the schemas agree."""

from __future__ import annotations

import json

import pytest

from reconciler import redaction
from reconciler.repo_tree import DirectoryTree, spec_files, tree_artifact_check
from reconciler.resources import example_repo_dir, schemas_dir
from reconciler.specs import LoadResult, find_package, parse_repo

EXAMPLE = example_repo_dir()
PACKAGE = "packages/vpn-client-5.1.0.yaml"
ANCHOR = "    timeoutSeconds: 120\n"


def _load(redact_yaml: str) -> LoadResult:
    files = spec_files(DirectoryTree(EXAMPLE))
    text = files[PACKAGE].decode()
    assert ANCHOR in text
    files = {**files, PACKAGE: text.replace(ANCHOR, ANCHOR + redact_yaml).encode()}
    return parse_repo(files, tree_artifact_check(DirectoryTree(EXAMPLE)))


def _line_of(redact_yaml: str, needle: str) -> int:
    text = spec_files(DirectoryTree(EXAMPLE))[PACKAGE].decode()
    before = text[: text.index(ANCHOR) + len(ANCHOR)]
    return before.count("\n") + redact_yaml[: redact_yaml.index(needle)].count("\n") + 1


def test_patterns_are_loaded_in_order() -> None:
    result = _load('    redact: ["VPN-[0-9A-F]{8}", "(?i)pin=\\\\d++"]\n')
    assert result.errors == () and result.specs is not None
    package = find_package(result.specs, "vpn-client", "5.1.0")
    assert package is not None and package.installer.redact == ("VPN-[0-9A-F]{8}", "(?i)pin=\\d++")


def test_without_patterns_the_tuple_is_empty() -> None:
    result = _load("")
    assert result.specs is not None
    package = find_package(result.specs, "vpn-client", "5.1.0")
    assert package is not None and package.installer.redact == ()


@pytest.mark.parametrize(("pattern", "why"), [
    ("'[unclosed'", "regular expression"),
    ("'(a+)+$'", "possessive"),
    ("'x*'", "empty string"),
])
def test_bad_patterns_are_errors_at_their_line_and_field(pattern: str, why: str) -> None:
    redact_yaml = f"    redact:\n      - 'fine-[0-9]+'\n      - {pattern}\n"
    result = _load(redact_yaml)
    assert not result.valid
    [error] = result.errors
    assert (error.path, error.pointer) == (PACKAGE, "/spec/installer/redact/1")
    assert error.line == _line_of(redact_yaml, pattern) and error.column == 9
    assert why in error.message


@pytest.mark.parametrize("redact_yaml", [
    "    redact: [" + ", ".join(f"'p{i}'" for i in range(redaction.MAX_REDACT_PATTERNS + 1)) + "]\n",
    "    redact: ['" + "a" * (redaction.MAX_REDACT_PATTERN_LENGTH + 1) + "']\n",
    "    redact: ['']\n",
    "    redact: 'not-a-list'\n",
    "    redact: [42]\n",
])
def test_the_schema_bounds_count_length_and_type(redact_yaml: str) -> None:
    result = _load(redact_yaml)
    assert not result.valid
    assert [e.path for e in result.errors] == [PACKAGE]
    assert result.errors[0].pointer.startswith("/spec/installer/redact")


def test_schemas_and_loader_share_the_limits() -> None:
    package = json.loads((schemas_dir() / "package.schema.json").read_text())
    in_spec = package["properties"]["spec"]["properties"]["installer"]["properties"]["redact"]
    reply = json.loads((schemas_dir() / "checkin-reply.schema.json").read_text())
    on_wire = reply["$defs"]["installer"]["properties"]["redact"]
    for node in (in_spec, on_wire):
        assert node["maxItems"] == redaction.MAX_REDACT_PATTERNS
        assert node["items"] == {"type": "string", "minLength": 1,
                                 "maxLength": redaction.MAX_REDACT_PATTERN_LENGTH}
    # at the limits exactly, the loader accepts what the schema accepts
    at_limit = [f"p{i}-" + "a" * (redaction.MAX_REDACT_PATTERN_LENGTH - 4) for i in range(10)]
    at_limit += [f"q{i}" for i in range(redaction.MAX_REDACT_PATTERNS - 10)]
    result = _load("    redact: [" + ", ".join(f"'{p}'" for p in at_limit) + "]\n")
    assert result.errors == ()
