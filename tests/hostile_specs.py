"""Spec files of at most 1 MiB written to cost as much as possible to check.

Shared by ``tests/test_specs_hostile.py`` (each must be judged without a
traceback and within 256 MB) and ``benchmarks/hostile_bench.py`` (how long
each takes). Every text is at most ``MAX_FILE_BYTES``: the loader refuses
anything larger before parsing it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reconciler.specs import MAX_FILE_BYTES

_JOB = "apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: x\nspec:\n"
_PACKAGE = "apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: x}\nspec:\n"
_TOPOLOGY = "apiVersion: reconciler/v1\nkind: Topology\nmetadata: {name: t}\nspec:\n  headquarters: hq-x\n  relays:\n"
_LIMIT = MAX_FILE_BYTES - 64


def _fill(prefix: str, unit: str, suffix: str = "", limit: int = _LIMIT) -> str:
    return prefix + unit * ((limit - len(prefix) - len(suffix)) // len(unit)) + suffix


def _numbered(prefix: str, unit: str, suffix: str) -> str:
    """``unit`` (holding ``{}``) repeated with 0, 1, 2, ... as long as the file allows."""
    parts = [prefix]
    size = len(prefix) + len(suffix)
    index = 0
    while True:
        piece = unit.format(index)
        if size + len(piece) > _LIMIT:
            break
        parts.append(piece)
        size += len(piece)
        index += 1
    return "".join(parts) + suffix


def _relays(parent_of: Callable[[int, int], str], prefix: str) -> str:
    """A topology with as many relays as fit; ``parent_of(i, count)`` names relay i's parent."""
    line = len(f"    - {{name: {prefix}000000, parent: {prefix}000000}}\n")
    count = (_LIMIT - len(_TOPOLOGY)) // line
    return _TOPOLOGY + "".join(f"    - {{name: {prefix}{i}, parent: {parent_of(i, count)}}}\n" for i in range(count))


def _alias_levels(levels: int, width: int) -> str:
    lines = ["  a: &a [" + ", ".join(["lol"] * width) + "]"]
    for index in range(1, levels):
        prev, name = chr(ord("a") + index - 1), chr(ord("a") + index)
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]")
    return _JOB + "\n".join(lines) + "\n"


def hostile_files() -> dict[str, tuple[str, str]]:
    """Case name -> (repo-relative path, text)."""
    half = _LIMIT // 2 - 64
    return {
        "alias-node-bomb": ("jobs/x.yaml", _alias_levels(20, 10)),
        # A valid package: its installer argv repeats a 700 KB string 49,000 times (34 GB expanded).
        "alias-text-bomb": ("packages/x.yaml", _PACKAGE + "  name: app\n  version: '1'\n"
                            "  artifact: {url: &a 'https://example.invalid/" + "x" * 700_000 + "', "
                            "sha256: '" + "0" * 64 + "'}\n  installer:\n    type: command\n"
                            "    uninstall: [u]\n    install: [" + ",".join(["*a"] * 49_000) + "]\n"),
        "alias-wide-anchor": ("jobs/x.yaml", _JOB + "  a: &a [" + ",".join(["1"] * 1000) + "]\n  b: ["
                              + ",".join(["*a"] * 40_000) + "]\n"),
        "deep-flow": ("jobs/x.yaml", _JOB + "  x: " + "[" * half + "]" * half + "\n"),
        "deep-flow-mapping": ("jobs/x.yaml", _JOB + "  x: " + "{a: " * (half // 4) + "}" * (half // 4) + "\n"),
        "deep-block": ("jobs/x.yaml", _JOB + "".join("  " * i + f"a{i}:\n" for i in range(1, 600))),
        "wide-flow-list": ("jobs/x.yaml", _fill(_JOB + "  destinations: [", "a,", "a]\n")),
        "wide-block-list": ("jobs/x.yaml", _fill(_JOB + "  destinations:\n", "  - a\n")),
        "many-keys": ("jobs/x.yaml", _numbered(_JOB, "  k{}: 1\n", "")),
        "many-duplicate-keys": ("jobs/x.yaml", _fill(_JOB + "  x: {", "a: 1, ", "}\n")),
        "many-invalid-names": ("jobs/x.yaml", _fill(_JOB + "  destinations: [", "NOT_A_NAME,", "a]\n")),
        "many-client-ids": ("jobs/x.yaml", _numbered(
            _JOB + "  jobType: install\n  package: {name: app, version: '1'}\n  destinationType: clients\n"
            "  destinations: [", "pc-{:06d},", "pc-x]\n")),
        # a rerun scope naming twice the clients it may, and one naming as many as a file holds
        "many-scope-clients": ("jobs/x.yaml", _JOB + "  jobType: install\n  package: {name: app, version: '1'}\n"
                               "  destinationType: allLowerClients\n  destinations: [r]\n  rerunScope:\n"
                               "    repair: true\n    clients: [" + ",".join(f"pc-{i}" for i in range(20_000))
                               + "]\n"),
        "full-file-of-scope-clients": ("jobs/x.yaml", _fill(
            _JOB + "  jobType: install\n  package: {name: app, version: '1'}\n  destinationType: clients\n"
            "  destinations: [pc-1]\n  rerunScope:\n    clients: [", "pc-1,", "pc-1]\n")),
        "long-scalar": ("jobs/x.yaml", _JOB + "  x: " + "a" * (_LIMIT - len(_JOB) - 8) + "\n"),
        "huge-integer": ("jobs/x.yaml", _JOB + "  rerun: " + "9" * (_LIMIT - len(_JOB) - 12) + "\n"),
        "long-version": ("packages/x.yaml", _PACKAGE + "  version: \"" + "1." * (half // 2) + "1\"\n"),
        "many-anchors": ("jobs/x.yaml", _numbered(_JOB + "  x: [", "&a{0} 1, *a{0}, ", "1]\n")),
        "control-characters": ("jobs/x.yaml", _JOB + "  x: \"" + "\\u0000" * (half // 6) + "\"\n"),
        # anchors nested 60 deep around a long list: each anchor used to copy every position under it
        "nested-anchors": ("jobs/x.yaml", _JOB + "  x: " + "".join(f"&a{i} {{{'k' * 20}: " for i in range(60))
                           + "[" + ",".join(["1"] * 50_000) + "]" + "}" * 60 + "\n"),
        # each anchor wraps the previous alias in 60 mappings: nesting built through aliases
        "alias-chain-nesting": ("jobs/x.yaml", _JOB + "".join(
            f"  a{k}: &a{k} " + "{q: " * 60 + (f"*a{k - 1}" if k else "1") + "}" * 60 + "\n" for k in range(30))),
        "long-hex-integer": ("jobs/x.yaml", _JOB + "  rerun: 0x" + "f" * 3600 + "\n"),
        # uniqueItems over items that cannot be sorted: jsonschema compared every pair
        "unsortable-unique-list": ("jobs/x.yaml", _numbered(_JOB + "  destinations:\n", "  - pc-{:05d}\n",
                                                           "  - 12345\n  - null\n")),
        # a relay tree that is one long chain, and one long cycle: judged in linear time
        "long-relay-chain": ("topology.yaml", _relays(lambda i, n: f"r{i - 1}" if i else "hq-x", "r")),
        "long-relay-cycle": ("topology.yaml", _relays(lambda i, n: f"relay-number-{(i - 1) % n}", "relay-number-")),
    }


def write_case(root: Path, name: str) -> Path:
    """A repo under ``root`` holding the hostile file ``name`` (and nothing else)."""
    path, text = hostile_files()[name]
    repo = root / name
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    assert len(data) <= MAX_FILE_BYTES, (name, len(data))
    target.write_bytes(data)
    return repo
