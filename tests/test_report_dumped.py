"""report.load_dumped: dump_yaml's layout read line by line gives exactly what YAML gives, or nothing.

HQ reads one relay.yaml per relay per pass through it; a file in any other
layout (a hand edit, another writer, a hostile one) must go to the YAML
reader untouched, so every case here is compared with the YAML reader's answer.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml
from test_report import OK, T0, relay_files

from reconciler import report
from reconciler.plan import ClientState

FAIL = ClientState.FAILED

# strings YAML could read as something else, characters the writer escapes, JSON escapes
def reference(data: bytes) -> Any:
    """What load_yaml's YAML reader (PyYAML's C safe loader where built) makes of ``data``."""
    return yaml.load(data, Loader=report._Loader)


TRICKY = ["", "on", "Yes", "NULL", "~", "1e3", "0x1f", "0123", "1_000", "12:30", "2026-11-30", ".inf", "-",
          "a: b", "#x", "&a", "*a", "!tag", "|", ">", "'q'", '"q"', "a\\b", "tab\there", "line\nbreak",
          "\u2028", "\u202e", "\x85", "\x7f", "é", "😀", "[1]", "{a}", "%x", "@x", "`x", "x ", " x", "ﬁ"]


def random_doc(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(rng.randrange(1, 6)):
        key = rng.choice(TRICKY + ["name", "counts", "relay", f"k{rng.randrange(100)}"])
        doc[key] = random_value(rng, depth)
    return doc


def random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(TRICKY)
    if kind == 1:
        return rng.choice([0, 1, -7, 10**20, 2**63])
    if kind == 2:
        return rng.choice([0.5, -2.25, 1e16, 1e-7, 3.0])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return "".join(rng.choice("abc -:#\"'\\\t\n\u2028é😀{}[],") for _ in range(rng.randrange(8)))
    if kind == 5:
        return f"plain-word.{rng.randrange(1000)}/x_y"
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return random_doc(rng, depth + 1) if rng.randrange(3) else {}


def test_status_files_as_the_writers_write_them_are_read_without_yaml() -> None:
    files = relay_files("relay-kanto", "a" * 40, {
        "install-7zip": [("pc-1", OK, ""), ("pc-2", FAIL, "exit 1603: \"quoted\" \u2028 and\ttab"),
                         ("pc-3", FAIL, "yes")],
        "install-putty": [("pc-1", OK, "")]}, updated=T0)
    for path, data in files.items():
        if not path.endswith(".yaml"):
            continue
        fast = report.load_dumped(data)
        assert fast is not None, path
        assert fast == reference(data), path
    relay = report.parse_relay_status({"relays/relay-kanto/relay.yaml": files["relays/relay-kanto/relay.yaml"]})
    assert relay.jobs["install-7zip"].counts["Failed"] == 2


def test_whatever_dump_yaml_writes_reads_back_equal_to_yaml() -> None:
    rng = random.Random(17)
    read_fast = 0
    for _ in range(3000):
        doc = random_doc(rng)
        data = report.dump_yaml(doc)
        expected = reference(data)
        fast = report.load_dumped(data)
        if fast is not None:
            read_fast += 1
            assert fast == expected, data
        assert report.load_yaml(data, "doc") == expected
    assert read_fast > 1500  # most documents take the fast way (exponents and escaped surrogates do not)


@pytest.mark.parametrize("text", [
    b"a: 1e3\n",                    # a string to YAML 1.1, a number to JSON
    b"a: {\"x\": 1E5}\n",
    b"a: yes\n", b"On: 1\n", b"a: NULL\n",
    b"a: 0123\n",                   # octal to YAML 1.1
    b"a: 1 # a comment\n",
    b"a:\n    b: 1\n",              # indented by four
    b"a:\n  - 1\n",                 # items indented under their key
    b"a: &x 1\nb: *x\n",
    b"a: 1\na: 2\n",
    b"a:\n",
    b"- 1\n",
    b"a: [1,\n  2]\n",
    b"a:\tb\n",
    b"a: b\r\n",
    b"a: \"\\ud83d\\ude00\"\n",    # JSON pairs the escaped surrogates, YAML does not
    b"\xef\xbb\xbfa: 1\n",          # a byte order mark
    b"---\na: 1\n",
    b"a: b",                        # no final newline
    b"a: 1\n\nb: 2\n",
    b"a: [NaN]\n", b"a: -Infinity\n",   # JSON's constants, which YAML reads as strings
])
def test_any_other_layout_is_left_to_yaml(text: bytes) -> None:
    assert report.load_dumped(text) is None
    try:
        expected = reference(text)
    except yaml.YAMLError:
        with pytest.raises(report.ReportError):
            report.load_yaml(text, "doc")
        return
    if isinstance(expected, dict):
        assert report.load_yaml(text, "doc") == expected
    else:
        with pytest.raises(report.ReportError):
            report.load_yaml(text, "doc")


@pytest.mark.parametrize("text", [b"a: NaN\n", b"a: Infinity\n", b"a: \"x\"   \n", b"a: -0\n", b"a: [1, 2.5]\n"])
def test_words_and_json_both_read_alike_are_read_fast(text: bytes) -> None:
    fast = report.load_dumped(text)
    assert fast is not None and fast == reference(text)


def test_a_huge_number_or_deep_nesting_is_a_report_error_not_a_crash() -> None:
    for text in (b"a: " + b"9" * 5000 + b"\n", b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n"):
        with pytest.raises(report.ReportError):
            report.load_yaml(text, "doc")
