"""One definition of each name and id pattern, matched against whole strings.

The JSON Schemas carry the patterns of :mod:`reconciler.names` (with ECMA-262
anchors), and every helper refuses what a ``$``-anchored ``re.match`` would
let through: a trailing newline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import names
from reconciler.resources import schemas_dir

KNOWN = {names.schema_pattern(p) for p in (names.NAME, names.VERSION, names.SHA256, names.LABEL_KEY, names.TIME,
                                           names.COMMIT, names.UTC_TIME, names.OPERATION_ID, names.TOKEN,
                                           names.REASON, names.HTTP_URL,
                                           names.FILE_NAME, names.MSI_PRODUCT_CODE, names.MSI_PROPERTY,
                                           names.MSI_PROPERTY_VALUE, names.PACKAGE_NAME, names.SOFTWARE_TEXT, names.BOOT_ID)}


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


def test_every_anchored_schema_pattern_is_defined_in_names() -> None:
    seen = set()
    for path in sorted(Path(schemas_dir()).glob("*.schema.json")):
        for pattern in _patterns(json.loads(path.read_text(encoding="utf-8"))):
            if pattern.startswith("^") and pattern.endswith("$") and "%" not in pattern:
                assert pattern in KNOWN, f"{path.name}: {pattern} is not one of reconciler.names' patterns"
                seen.add(pattern)
    assert names.schema_pattern(names.NAME) in seen and names.schema_pattern(names.TIME) in seen


CHECKS: list[tuple[Callable[[Any], bool], str]] = [
    (names.is_name, "install-app"),
    (names.is_client_id, "pc-01"),
    (names.is_version, "23.01"),
    (names.is_sha256, "a" * 64),
    (names.is_operation_id, "op-0123456789abcdef01234567"),
    (names.is_token, "A" * 32),
    (names.is_label_key, "dept"),
    (names.is_commit, "b" * 40),
    (names.is_boot_id, "0b5c2a9e-1d7f-4c33-9a41-6f0e0c1b2d3e"),
]


@pytest.mark.parametrize(("check", "good"), CHECKS, ids=[c.__name__ for c, _ in CHECKS])
def test_whole_string_only(check: Callable[[Any], bool], good: str) -> None:
    assert check(good)
    for bad in (good + "\n", "\n" + good, good + "\r\n", good + "\x00", f" {good}", None, 7, good.encode()):
        assert not check(bad), repr(bad)


def test_names_are_valid_in_git_refs_and_file_names() -> None:
    # relay names become branches status/<relay>: git refuses '..' and a '.lock' ending
    for bad in ("a..b", "relay-kanto.lock", "a.", ".a", "a-", "a" * 64):
        assert not names.is_name(bad), bad
    for good in ("a", "a.b", "a.lock.b", "lock", "relay-kanto", "x" * 63):
        assert names.is_name(good), good


def test_every_reason_kind_and_cause_the_code_writes_fits_the_schema_pattern() -> None:
    from reconciler import errors
    from reconciler.plan.vocabulary import Reason

    reason = re.compile(names.REASON)
    written = [*Reason, *errors.Kind, *errors.Cause]
    assert len(written) > 20
    for value in written:
        assert reason.fullmatch(value.value), value
    for bad in ("", "Retry", "retry backoff", "retry-backoff", "r" * 65, "retry\n"):
        assert not reason.fullmatch(bad), bad
