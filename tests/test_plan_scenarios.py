"""Scenario fixtures: a directory per case, run through ``reconciler plan --format json``.

Each ``tests/scenarios/plan/<case>/`` holds ``repo/`` (a desired-state repo),
``inventory.json`` (the clients) and ``expected.json`` (the rows the command
prints). Every case is planned at :data:`NOW`. The command's own ``main`` runs
in-process, so this is the code path ``reconciler plan`` takes.

To add a case, write its repo and inventory, run this test with
``UPDATE_PLAN_SCENARIOS=1`` to write ``expected.json``, and review that file
row by row before committing it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from reconciler.commands import plan as plan_command

CASES_DIR = Path(__file__).resolve().parent / "scenarios" / "plan"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())
NOW = "2026-06-01T12:00:00Z"


def run_plan(case: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    args = argparse.Namespace(repo=str(case / "repo"), inventory=[str(case / "inventory.json")],
                              format="json", now=NOW)
    code = plan_command.main(args)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    result: dict[str, object] = json.loads(out)
    return result


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES)
def test_scenario(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    directory = CASES_DIR / case
    got = run_plan(directory, capsys)
    expected_file = directory / "expected.json"
    if os.environ.get("UPDATE_PLAN_SCENARIOS"):
        expected_file.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert got == expected


@pytest.mark.parametrize("case", CASES)
def test_scenario_rows_are_sorted_and_complete(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_plan(CASES_DIR / case, capsys)["rows"]
    assert isinstance(rows, list)
    keys = [(r["job"], r["relay"], r["client"]) for r in rows]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for r in rows:
        assert set(r) == {"job", "relay", "client", "state", "action", "package", "message"}
        assert r["action"] in (None, "install", "upgrade", "downgrade", "uninstall")
        assert (r["action"] is not None) <= (r["state"] == "Pending")
