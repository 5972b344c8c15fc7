"""``reconciler demo`` end to end: real HQ, relays and agents on loopback.

Asserts on the demo's final JSON report (not its text), on the clients'
install logs (nothing that succeeded ran twice) and that no child process
outlives the demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _rows(report: dict[str, Any], job: str) -> dict[str, dict[str, Any]]:
    for entry in report["jobs"]:
        if entry["name"] == job:
            return {row["client"]: row for row in entry["clients"]}
    raise AssertionError(f"job {job} missing from report")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "demo", "--format", "json", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), workdir


def test_demo_converges_as_the_specs_imply(demo: tuple[dict[str, Any], Path]) -> None:
    output, _ = demo
    assert output["converged"] is True, output["problems"]
    assert output["problems"] == []
    report = output["report"]
    assert report["valid"] is True
    assert report["acceptedCommit"] == report["mainCommit"]
    states = {job["name"]: job["state"] for job in report["jobs"]}
    assert states == {
        "install-7zip": "Completed",
        "install-office-addin": "Completed",
        "install-putty": "Completed",
        "install-teams-meeting": "Scheduled",  # for the next fiscal year
        "install-vcredist": "Completed",
        "install-vpn-client": "Completed",
        "uninstall-legacy-toolbar": "Completed",
    }


def test_all_lower_clients_reach_the_nested_site_only(demo: tuple[dict[str, Any], Path]) -> None:
    report = demo[0]["report"]
    sevenzip = _rows(report, "install-7zip")
    assert sorted(sevenzip) == sorted(
        [f"pc-kanto-00{i}" for i in (1, 2, 3)] + [f"pc-yokohama-00{i}" for i in (1, 2, 3)])
    assert all(row["state"] == "Succeeded" and row["installedVersion"] == "23.01" for row in sevenzip.values())
    assert sorted({row["relay"] for row in sevenzip.values()}) == ["relay-kanto", "relay-yokohama"]


def test_requirements_dependencies_and_schedule(demo: tuple[dict[str, Any], Path]) -> None:
    report = demo[0]["report"]
    vcredist = _rows(report, "install-vcredist")
    assert vcredist["pc-kanto-001"]["state"] == "Succeeded"  # the Windows sales PC
    assert vcredist["pc-kanto-002"]["state"] == "Skipped"
    assert "windows" in vcredist["pc-kanto-002"]["message"]
    addin = _rows(report, "install-office-addin")
    assert sorted(addin) == ["pc-kanto-001", "pc-osaka-001"]
    assert {row["state"] for row in addin.values()} == {"Succeeded"}
    teams = _rows(report, "install-teams-meeting")
    assert len(teams) == 12
    assert next(job for job in report["jobs"] if job["name"] == "install-teams-meeting")["scheduledFor"] == \
        "2027-04-01T00:00:00Z"
    assert all(row["state"] == "Pending" and row["message"].startswith("scheduled for") for row in teams.values())


def test_failed_clients_rerun_after_the_gitops_fix(demo: tuple[dict[str, Any], Path]) -> None:
    output, workdir = demo
    first = output["steps"][0]
    assert first["step"] == "first settle"
    assert first["failedClients"] == ["pc-fukuoka-003", "pc-osaka-003"]  # the arm64 clients
    assert output["steps"][1]["message"].startswith("fix install script of vpn-client")
    vpn = _rows(output["report"], "install-vpn-client")
    assert {client: row["state"] for client, row in vpn.items()} == {
        f"pc-{site}-00{i}": "Succeeded" for site in ("osaka", "fukuoka") for i in (1, 2, 3)}
    # Clients that had succeeded were not run again; the fixed ones ran once more.
    for client in vpn:
        log = (workdir / "clients" / client / "install.log").read_text().splitlines()
        assert log.count("vpn-client 5.1.0") == 1, (client, log)


def test_no_process_outlives_the_demo(demo: tuple[dict[str, Any], Path]) -> None:
    _, workdir = demo
    assert _processes_mentioning(str(workdir)) == []
    assert os.path.isdir(workdir / "origin.git")
