"""``reconciler status`` prints what it decided on: one snapshot of the refs, even when status/hq lags.

Real temp git repos: HQ runs a pass, then relays publish newer rows that HQ
has not aggregated yet. The exit code, the job table, its counts and the
client rows must all describe the relay refs ``status`` read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_hq import Origin, hq_pass, publish_relay
from test_status_cmd import FAIL, OK, PEND, RUN, publish_all, settled_rows, status

from reconciler import report
from reconciler.plan import ClientState


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def busy_rows(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
    """The settled fleet, except that relay-yokohama is still installing 7zip."""
    rows = settled_rows(relay)
    if relay == "relay-yokohama":
        rows = {**rows, "install-7zip": [("pc-yoko-001", RUN, "installing"), ("pc-yoko-002", PEND, "")]}
    return rows


def done_rows(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
    """relay-yokohama has finished: both of its 7zip clients succeeded."""
    rows = settled_rows(relay)
    if relay == "relay-yokohama":
        rows = {**rows, "install-7zip": [("pc-yoko-001", OK, "installed"), ("pc-yoko-002", OK, "installed")]}
    return rows


def tally(clients: list[dict[str, Any]]) -> dict[str, int]:
    return report.count_states(c["state"] for c in clients)


def assert_counts_match_rows(doc: dict[str, Any]) -> None:
    for job in doc["jobs"]:
        assert job["counts"] == tally(job["clients"]), f"{job['name']}: counts {job['counts']} but rows " \
                                                       f"{[(c['client'], c['state']) for c in job['clients']]}"


def hq_status_of(origin: Origin, job: str) -> dict[str, Any]:
    return origin.yaml("status/hq", f"jobs/{job}.yaml")


def test_wait_prints_the_relay_refs_it_settled_on_not_hqs_older_aggregate(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, busy_rows)
    hq.run_pass()
    assert hq_status_of(origin, "install-7zip")["state"] == "InProgress"
    publish_all(origin, tmp_path, done_rows, relays=("relay-yokohama",))  # HQ has not aggregated this yet
    # A ref of a relay no longer in the topology: the roll-up ignores it, so its rows are not shown either.
    publish_relay(origin, tmp_path / "relays", "relay-gone", origin.head,
                  {"install-7zip": [("pc-gone-001", FAIL, "exit 1")]})
    assert hq_status_of(origin, "install-7zip")["state"] == "InProgress"  # status/hq lags the relay refs

    proc = status(origin, tmp_path, "--wait", "--timeout", "30", "--format", "json")
    assert proc.returncode == 1, proc.stderr  # settled, with kanto's failed client
    doc = json.loads(proc.stdout)
    jobs = {job["name"]: job for job in doc["jobs"]}
    seven = jobs["install-7zip"]
    assert (seven["state"], seven["counts"]["Succeeded"], seven["counts"]["Failed"],
            seven["counts"]["InProgress"], seven["counts"]["Pending"]) == ("Failed", 3, 1, 0, 0)
    assert_counts_match_rows(doc)
    # Settled means no client still working: any job shown InProgress has only rows waiting for a schedule.
    for job in doc["jobs"]:
        active = [c for c in job["clients"] if c["state"] in ("Pending", "InProgress")]
        assert all(c["message"].startswith(report.SCHEDULED_PREFIX) for c in active), job["name"]
        if job["state"] == "InProgress":
            assert active, f"{job['name']} is InProgress next to a settled exit with no client in progress"

    text = status(origin, tmp_path, "--wait", "--timeout", "30")
    assert text.returncode == 1, text.stderr
    row = next(line.split() for line in text.stdout.splitlines() if line.startswith("install-7zip "))
    header = next(line.split() for line in text.stdout.splitlines() if line.startswith("JOB"))
    cells = dict(zip(header[2:], row[-len(header) + 2:]))
    assert cells == {"CLIENTS": "4", "OK": "3", "RUN": "0", "PEND": "0", "FAIL": "1", "SKIP": "0", "CONF": "0",
                     "STATE": "Failed"}

    markdown = status(origin, tmp_path, "--wait", "--timeout", "30", "--format", "markdown")
    assert markdown.returncode == 1, markdown.stderr
    line = next(line for line in markdown.stdout.splitlines() if line.startswith("| install-7zip "))
    assert line.rstrip(" |").endswith("Failed")


def test_wait_timing_out_prints_the_snapshot_it_waited_on(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, done_rows)
    hq.run_pass()
    assert hq_status_of(origin, "install-7zip")["state"] == "Failed"
    publish_all(origin, tmp_path, busy_rows, relays=("relay-yokohama",))  # a rerun HQ has not aggregated yet

    proc = status(origin, tmp_path, "--wait", "--timeout", "1", "--job", "install-7zip")
    assert proc.returncode == 4
    assert "job install-7zip: 2 clients Pending or InProgress on relay-yokohama" in proc.stderr
    lines = proc.stdout.splitlines()
    row = next(line.split() for line in lines if line.startswith("install-7zip "))
    assert row[-1] == "InProgress" and row[-6:-1] == ["1", "1", "1", "0", "0"]  # RUN PEND FAIL SKIP CONF
    clients = lines[lines.index("Clients (4):") + 2:]
    assert sorted(line.split()[2] for line in clients) == ["Failed", "InProgress", "Pending", "Succeeded"]


def test_json_counts_and_rows_come_from_the_same_refs_without_wait(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, busy_rows)
    hq.run_pass()
    publish_all(origin, tmp_path, done_rows, relays=("relay-yokohama",))
    proc = status(origin, tmp_path, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert_counts_match_rows(doc)
    seven = next(j for j in doc["jobs"] if j["name"] == "install-7zip")
    assert seven["state"] == "Failed"
    assert {(c["client"], c["state"]) for c in seven["clients"] if c["relay"] == "relay-yokohama"} == {
        ("pc-yoko-001", "Succeeded"), ("pc-yoko-002", "Succeeded")}


def test_status_shows_a_commit_hq_could_not_evaluate(origin: Origin, tmp_path: Path) -> None:
    """status/hq's evaluationError reaches every format, and ``--wait`` does not settle on it."""
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path)
    good = origin.head
    new = origin.commit("a commit HQ cannot read", lambda w: (w / "README.md").write_text("x\n"))
    accepted = report.Accepted(good, None, good, True, report.EvaluationError(new, "git cat-file failed: disk"))
    files = report.render_hq_status(report.aggregate(None, accepted, "main", (), {}))
    assert hq.store.publish("status/hq", files, "HQ could not evaluate") is not None

    proc = status(origin, tmp_path, "--wait", "--timeout", "1")
    assert proc.returncode == 4
    assert f"HQ could not evaluate main {new[:12]} and retries it: git cat-file failed: disk" in proc.stderr
    assert "has not evaluated" not in proc.stderr
    assert f"HQ COULD NOT EVALUATE main {new[:12]} (it retries): git cat-file failed: disk" in proc.stdout
    doc = json.loads(status(origin, tmp_path, "--format", "json").stdout)
    assert (doc["mainCommit"], doc["valid"], doc["evaluationError"]) == (
        good, True, {"commit": new, "message": "git cat-file failed: disk"})
    markdown = status(origin, tmp_path, "--format", "markdown").stdout
    assert f"main `{new[:12]}` could not be evaluated" in markdown
    summary = subprocess.run(["git", "show", "status/hq:summary.md"], cwd=origin.bare, capture_output=True,
                             text=True, check=True).stdout
    assert f"main `{new[:12]}` could not be evaluated" in summary
