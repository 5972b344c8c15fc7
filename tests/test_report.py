"""Status files and HQ aggregation (pure: plain values in, bytes out, no git)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import report
from reconciler.plan import (
    ClientState,
    Installed,
    JobRollup,
    JobState,
    Plan,
    Reason,
    Row,
)
from reconciler.repo_tree import load_repo
from reconciler.report import Accepted, InventoryEntry
from reconciler.resources import example_repo_dir, schemas_dir
from reconciler.specs import SpecError, Specs

C1 = "1" * 40
C2 = "2" * 40
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((schemas_dir() / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_valid_status_files(files: dict[str, bytes]) -> int:
    """Validate every status file against its schema; return how many were checked."""
    checked = 0
    for path, data in sorted(files.items()):
        name = report.schema_name(path)
        if name is None:
            assert path == report.SUMMARY_FILE, f"{path} has no schema"
            continue
        errors = sorted(_validator(name).iter_errors(report.load_status_file(path, data)), key=str)
        assert not errors, f"{path} does not match {name}: {errors[0].message} at {list(errors[0].absolute_path)}"
        checked += 1
    return checked


@lru_cache(maxsize=None)
def example_specs() -> Specs:
    result = load_repo(example_repo_dir())
    assert result.specs is not None, result.errors
    return result.specs


def relay_files(relay: str, commit: str | None, rows: dict[str, list[tuple[str, ClientState, str]]],
                *, halted: set[str] = frozenset(), updated: datetime = T0) -> dict[str, bytes]:
    """status/<relay> files for ``{job: [(client, state, message)]}``."""
    plan_rows = []
    rollups = []
    updated_at = {}
    clients = set()
    for job, entries in rows.items():
        for client, state, message in entries:
            plan_rows.append(Row(job, relay, client, state, None, "pkg", "1.0",
                                 "1.0" if state is ClientState.SUCCEEDED else None,
                                 1 if state in (ClientState.SUCCEEDED, ClientState.FAILED) else 0, message))
            updated_at[(job, client)] = updated
            clients.add(client)
        counts = report.count_states(s for _, s, _ in entries)
        state = JobState.HALTED if job in halted else report.job_state(counts)
        rollups.append(JobRollup(job, state, counts))
    plan = Plan(relay, tuple(sorted(plan_rows, key=lambda r: (r.job, r.client))), (), tuple(sorted(rollups, key=lambda r: r.job)))
    inventory = [InventoryEntry(c, {"os": "linux", "arch": "x86_64", "freeDiskMB": 1000}, {}, (), True) for c in sorted(clients)]
    return report.render_relay_status(relay, commit, plan, updated_at, inventory, [], named_jobs=NAMED_JOBS)


# The example repo's jobs that name their clients: relays list which of those clients they have.
NAMED_JOBS = ("install-office-addin",)


def statuses(*file_sets: dict[str, bytes]) -> dict[str, report.RelayStatus]:
    out = {}
    for files in file_sets:
        status = report.parse_relay_status(files)
        out[status.relay] = status
    return out


OK, RUN, PEND, FAIL = ClientState.SUCCEEDED, ClientState.IN_PROGRESS, ClientState.PENDING, ClientState.FAILED


# --------------------------------------------------------------- relay files


def _sample_plan() -> tuple[Plan, dict[tuple[str, str], datetime], list[InventoryEntry]]:
    rows = (
        Row("install-7zip", "relay-kanto", "pc-2", FAIL, None, "7zip", "23.01", None, 3, "exit 1: disk | full"),
        Row("install-7zip", "relay-kanto", "pc-1", OK, None, "7zip", "23.01", "23.01", 1, "installed"),
        Row("install-putty", "relay-kanto", "pc-1", PEND, None, "putty", "0.81", None, 0, "scheduled for 2030-01-01T00:00:00Z"),
    )
    jobs = (
        JobRollup("install-7zip", JobState.FAILED, report.count_states([FAIL, OK])),
        JobRollup("install-putty", JobState.IN_PROGRESS, report.count_states([PEND])),
    )
    updated = {("install-7zip", "pc-1"): T0, ("install-7zip", "pc-2"): T0 + timedelta(minutes=5),
               ("install-putty", "pc-1"): T0 - timedelta(days=1)}
    inventory = [
        InventoryEntry("pc-2", {"os": "windows", "freeDiskMB": 10}, {"dept": "sales"}, (), False),
        InventoryEntry("pc-1", {"os": "linux", "arch": "x86_64"}, {}, (Installed("7zip", "23.01"), Installed("a", "1")), True),
    ]
    return Plan("relay-kanto", rows, (), jobs), updated, inventory


def test_relay_status_files_and_fields() -> None:
    plan, updated, inventory = _sample_plan()
    files = report.render_relay_status("relay-kanto", C1, plan, updated, inventory, ["artifact x: sha256 mismatch"])
    assert sorted(files) == [
        "relays/relay-kanto/inventory.json",
        "relays/relay-kanto/jobs/install-7zip.yaml",
        "relays/relay-kanto/jobs/install-putty.yaml",
        "relays/relay-kanto/relay.yaml",
    ]
    relay = report.load_status_file("relays/relay-kanto/relay.yaml", files["relays/relay-kanto/relay.yaml"])
    assert relay["relay"] == "relay-kanto"
    assert relay["observedCommit"] == C1
    assert relay["clients"] == 2
    assert relay["updatedAt"] == "2026-11-23T10:05:00Z"  # the newest row, not the wall clock
    assert relay["errors"] == ["artifact x: sha256 mismatch"]
    job = report.load_status_file("x.yaml", files["relays/relay-kanto/jobs/install-7zip.yaml"])
    assert job["state"] == "Failed"
    assert job["counts"] == {"Pending": 0, "InProgress": 0, "Succeeded": 1, "Failed": 1, "Skipped": 0,
                             "Conflict": 0, "Suspended": 0}
    assert [r["client"] for r in job["rows"]] == ["pc-1", "pc-2"]
    assert job["rows"][1] == {"client": "pc-2", "state": "Failed", "installedVersion": None, "attempts": 3,
                              "message": "exit 1: disk | full", "updatedAt": "2026-11-23T10:05:00Z"}
    inventory_doc = json.loads(files["relays/relay-kanto/inventory.json"])
    assert [c["id"] for c in inventory_doc["clients"]] == ["pc-1", "pc-2"]
    assert inventory_doc["clients"][0]["installed"] == [{"name": "7zip", "version": "23.01"}, {"name": "a", "version": "1"}]
    assert assert_valid_status_files(files) == 4


def test_row_times_held_per_job_render_what_a_flat_mapping_renders() -> None:
    plan, updated, inventory = _sample_plan()
    by_job: dict[str, dict[str, datetime]] = {}
    for (job, client), at in updated.items():
        by_job.setdefault(job, {})[client] = at
    times = report.RowTimes(by_job)
    assert dict(times) == dict(updated) and len(times) == len(updated)
    assert report.render_relay_status("relay-kanto", C1, plan, times, inventory, []) == \
        report.render_relay_status("relay-kanto", C1, plan, updated, inventory, [])
    moved = next(iter(updated))
    times.by_job[moved[0]][moved[1]] += timedelta(minutes=1)  # one row's time moved: its file shows it
    assert report.render_relay_status("relay-kanto", C1, plan, times, inventory, []) != \
        report.render_relay_status("relay-kanto", C1, plan, updated, inventory, [])


def test_relay_status_is_byte_identical_for_the_same_state_in_any_order() -> None:
    plan, updated, inventory = _sample_plan()
    first = report.render_relay_status("relay-kanto", C1, plan, updated, inventory, [])
    shuffled = Plan(plan.relay, tuple(reversed(plan.rows)), (), tuple(reversed(plan.jobs)))
    again = report.render_relay_status("relay-kanto", C1, shuffled, dict(reversed(list(updated.items()))),
                                       list(reversed(inventory)), [])
    assert again == first
    # Keys are sorted: each mapping's keys appear in order.
    text = first["relays/relay-kanto/relay.yaml"].decode()
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top == sorted(top)


TRICKY_TEXT = [
    "", "installed", "pc-1", "23.01", "1e3", "yes", "No", "NULL", "null", "~", "y", "on", "0x1f", "-a", "a-",
    "exit 1: disk | full", "a #b", "a#b", "'quoted'", '"double"', "x\ny", "x\n\n  y\n", " lead", "trail ",
    "tab\there", "é ü 日本", "emoji 🙂", "\u0085nel", "line\u2028sep", "\x07bell", "\ufeffbom", "[list]", "{map}",
    "*alias", "&anchor", "!tag", "%pct", "@at", "`tick`", "? q", ": c", "- d", "2026-11-23T10:00:00Z",
    "2026-11-23", ".inf", "=", "<<", "a" * 300, "scheduled for 2030-01-01T00:00:00Z",
]


def _relay_job_doc(rows: list[report.StatusRow]) -> dict[str, Any]:
    return {"job": "install-7zip", "relay": "relay-kanto", "state": "Failed",
            "counts": report.count_states(r.state for r in rows),
            "rows": [report._row_json(r) for r in rows]}


def test_relay_job_file_is_one_yaml_document_with_a_json_line_per_row() -> None:
    rows = [report.StatusRow(f"pc-{i:03d}", list(ClientState)[i % 7], text or None, i % 4, text,
                             None if i % 5 == 0 else T0 + timedelta(seconds=i))
            for i, text in enumerate(TRICKY_TEXT)]
    for subset in (rows, rows[:1], []):
        data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                       report.count_states(r.state for r in subset), subset)
        assert yaml.safe_load(data.decode("utf-8")) == _relay_job_doc(subset)
        lines = data.decode("utf-8").splitlines()
        row_lines = [line for line in lines if line.startswith("- ")]
        assert [json.loads(line[2:]) for line in row_lines] == [report._row_json(r) for r in subset]
        assert len(row_lines) == len(subset)  # one line per row, whatever the text holds


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=12)),
                          st.integers(min_value=0, max_value=10**6)), max_size=5))
def test_relay_job_file_round_trips_any_text(cases: list[tuple[str, str | None, int]]) -> None:
    rows = []
    for i, (message, version, attempts) in enumerate(cases):
        rows.append(report.StatusRow(f"pc-{i}", ClientState.FAILED, version, attempts, message, T0))
    data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                   report.count_states(r.state for r in rows), rows)
    assert yaml.safe_load(data.decode("utf-8")) == _relay_job_doc(rows)
    back = report.parse_relay_job(data)[1]
    assert [(r.message, r.installed_version, r.attempts) for r in back.rows] == [
        (m, v, a) for m, v, a in cases]


def test_relay_status_without_plan_or_rows() -> None:
    files = report.render_relay_status("relay-osaka", None, None, {}, [], ["HQ has not accepted a commit"])
    assert sorted(files) == ["relays/relay-osaka/inventory.json", "relays/relay-osaka/relay.yaml"]
    status = report.parse_relay_status(files)
    assert status.observed_commit is None and status.updated_at is None and status.jobs == {}
    assert status.errors == ("HQ has not accepted a commit",)
    assert_valid_status_files(files)


def test_relay_digest_round_trip_and_bounded_failures() -> None:
    rows = {"install-7zip": [(f"pc-{i:04d}", FAIL, f"failure {i}") for i in range(300)]
            + [("pc-ok", OK, "")]}
    files = relay_files("relay-osaka", C1, rows)
    status = report.parse_relay_status(files)
    digest = status.jobs["install-7zip"]
    assert digest.state is JobState.FAILED
    assert digest.counts["Failed"] == 300 and digest.counts["Succeeded"] == 1
    assert [r.client for r in digest.rows] == [f"pc-{i:04d}" for i in range(report.FAILURE_LIMIT)]
    relay, full = report.parse_relay_job(files["relays/relay-osaka/jobs/install-7zip.yaml"])
    assert (relay, len(full.rows)) == ("relay-osaka", 301)
    assert b"observedCommit" not in files["relays/relay-osaka/jobs/install-7zip.yaml"]  # relay.yaml's says it
    assert_valid_status_files(files)


@pytest.mark.parametrize("bad", [
    {},
    {"relays/a/relay.yaml": b"relay: b\n"},
    {"relays/a/relay.yaml": b"- not a mapping\n"},
    {"relays/a/relay.yaml": b"relay: a\njobs: {j: {state: Sleeping, counts: {}}}\n"},
    {"relays/a/relay.yaml": b"relay: a\njobs: {j: {state: Failed, counts: {Failed: -1}}}\n"},
    {"relays/a/relay.yaml": b"\xff\xfe"},
])
def test_parse_relay_status_rejects_malformed_files(bad: dict[str, bytes]) -> None:
    with pytest.raises(report.ReportError):
        report.parse_relay_status(bad)


def test_accepted_round_trip_and_tolerance() -> None:
    accepted = Accepted(C1, T0, C2, False)
    data = report.render_accepted(accepted, "main")
    assert report.parse_accepted(data) == accepted
    assert report.parse_accepted(b"acceptedCommit: null\n") == Accepted(None, None, None, None)
    assert_valid_status_files({report.ACCEPTED_FILE: data})


# ------------------------------------------------------------------- rollup


@pytest.mark.parametrize("counts, flags, expected", [
    ({}, {}, JobState.NO_TARGETS),
    ({}, {"waiting": True}, JobState.IN_PROGRESS),
    ({"Succeeded": 3}, {}, JobState.COMPLETED),
    ({"Succeeded": 3, "Skipped": 2}, {}, JobState.COMPLETED),
    ({"Skipped": 2}, {}, JobState.COMPLETED),
    ({"Succeeded": 3, "Failed": 1}, {}, JobState.FAILED),
    ({"Conflict": 1}, {}, JobState.FAILED),
    ({"Failed": 1, "Pending": 1}, {}, JobState.IN_PROGRESS),
    ({"Failed": 1}, {"waiting": True}, JobState.IN_PROGRESS),
    ({"InProgress": 1}, {"halted": True}, JobState.HALTED),
    ({}, {"halted": True}, JobState.NO_TARGETS),
    ({"Failed": 1}, {"suspended": True}, JobState.SUSPENDED),
    ({"Failed": 1}, {"invalid": True, "suspended": True}, JobState.INVALID),
    ({"Pending": 2, "Succeeded": 1}, {"scheduled": True}, JobState.SCHEDULED),
    ({"Pending": 2, "Failed": 1}, {"scheduled": True}, JobState.SCHEDULED),
    ({"Pending": 2, "InProgress": 1}, {"scheduled": True}, JobState.IN_PROGRESS),
    ({"Pending": 2}, {"scheduled": True, "waiting": True}, JobState.IN_PROGRESS),
    ({"Succeeded": 2}, {"scheduled": True}, JobState.COMPLETED),
    ({"Pending": 2}, {"scheduled": True, "halted": True}, JobState.HALTED),
    ({"Pending": 2, "Succeeded": 1}, {"offline": True}, JobState.CLIENTS_OFFLINE),
    ({"Pending": 2, "Failed": 1}, {"offline": True}, JobState.CLIENTS_OFFLINE),
    ({"Pending": 2, "InProgress": 1}, {"offline": True}, JobState.IN_PROGRESS),
    ({"Pending": 2}, {"offline": True, "waiting": True}, JobState.IN_PROGRESS),
    ({"Succeeded": 2}, {"offline": True}, JobState.COMPLETED),
])
def test_job_state(counts: dict[str, int], flags: dict[str, bool], expected: JobState) -> None:
    assert report.job_state({**report.zero_counts(), **counts}, **flags) is expected


# --------------------------------------------------------------- aggregation


def _fleet(commit: str = C1) -> dict[str, report.RelayStatus]:
    return statuses(
        relay_files("relay-kanto", commit, {
            "install-7zip": [("pc-k1", OK, ""), ("pc-k2", FAIL, "exit 2")],
            "install-teams-meeting": [("pc-k1", OK, ""), ("pc-k2", OK, "")],
        }),
        relay_files("relay-yokohama", commit, {
            "install-7zip": [("pc-y1", OK, ""), ("pc-y2", RUN, "installing")],
            "install-putty": [("pc-y1", OK, ""), ("pc-y2", OK, "")],
            "install-teams-meeting": [("pc-y1", OK, "")],
        }),
        relay_files("relay-osaka", commit, {
            "install-teams-meeting": [("pc-o1", FAIL, "no space")],
            "install-office-addin": [("pc-osaka-001", OK, "")],
        }),
        relay_files("relay-fukuoka", commit, {"install-teams-meeting": [("pc-f1", OK, "")]}),
    )


def _job(hq: report.HqReport, name: str) -> report.JobReport:
    return next(j for j in hq.jobs if j.job == name)


def test_aggregate_covers_nested_subtree_per_destination() -> None:
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), _fleet())
    seven = _job(hq, "install-7zip")  # destination relay-kanto, relay-yokohama nested under it
    assert [d.relay for d in seven.relays] == ["relay-kanto"]
    kanto = seven.relays[0]
    assert kanto.relays == ("relay-kanto", "relay-yokohama")
    assert (kanto.counts["Succeeded"], kanto.counts["Failed"], kanto.counts["InProgress"]) == (2, 1, 1)
    assert kanto.state is JobState.IN_PROGRESS and seven.state is JobState.IN_PROGRESS
    assert [(f.relay, f.client, f.message) for f in seven.failures] == [("relay-kanto", "pc-k2", "exit 2")]
    assert seven.failure_count == 1 and seven.waiting_count == 0

    teams = _job(hq, "install-teams-meeting")  # relay-kanto, relay-osaka, relay-fukuoka
    by_relay = {d.relay: d for d in teams.relays}
    assert by_relay["relay-kanto"].counts["Succeeded"] == 3  # kanto 2 + yokohama 1
    assert by_relay["relay-kanto"].state is JobState.COMPLETED
    assert by_relay["relay-osaka"].state is JobState.FAILED
    assert by_relay["relay-fukuoka"].state is JobState.COMPLETED
    assert teams.clients == 5 and teams.state is JobState.FAILED

    putty = _job(hq, "install-putty")  # relay-yokohama only
    assert putty.state is JobState.COMPLETED and putty.counts["Succeeded"] == 2

    addin = _job(hq, "install-office-addin")  # named clients: a row per relay holding one
    assert [d.relay for d in addin.relays] == ["relay-osaka"]
    # it also names pc-kanto-001, which no relay of this fleet knows: a Pending row of HQ's
    assert addin.state is JobState.IN_PROGRESS
    assert (addin.not_registered, addin.not_registered_count) == (("pc-kanto-001",), 1)
    assert (addin.counts["Pending"], addin.counts["Succeeded"], dict(addin.pending)) == (1, 1, {"notRegistered": 1})

    vcredist = _job(hq, "install-vcredist")  # reaches relays that report no rows for it
    assert vcredist.state is JobState.NO_TARGETS and vcredist.clients == 0


def test_overlapping_destinations_are_counted_once() -> None:
    specs = example_specs()
    from dataclasses import replace
    job = replace(next(j for j in specs.jobs if j.name == "install-7zip"), destinations=("relay-kanto", "relay-yokohama"))
    specs = replace(specs, jobs=tuple(job if j.name == job.name else j for j in specs.jobs))
    hq = report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), _fleet())
    seven = _job(hq, "install-7zip")
    assert seven.clients == 4  # not 6: relay-yokohama is in both subtrees
    assert {d.relay: sum(d.counts.values()) for d in seven.relays} == {"relay-kanto": 4, "relay-yokohama": 2}


def test_relays_behind_the_accepted_commit_keep_jobs_in_progress() -> None:
    fleet = _fleet()
    fleet["relay-yokohama"] = report.parse_relay_status(
        relay_files("relay-yokohama", C2, {"install-putty": [("pc-y1", OK, "")]}))
    del fleet["relay-fukuoka"]
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    putty = _job(hq, "install-putty")
    assert putty.state is JobState.IN_PROGRESS
    assert putty.waiting_for == ("relay-yokohama",) and putty.counts["Succeeded"] == 1  # stale counts still shown
    teams = _job(hq, "install-teams-meeting")
    assert teams.waiting_for == ("relay-fukuoka", "relay-yokohama")
    assert {d.relay: d.waiting_for for d in teams.relays}["relay-fukuoka"] == ("relay-fukuoka",)
    behind = {r.relay: r for r in hq.relays if not r.current}
    assert sorted(behind) == ["relay-fukuoka", "relay-yokohama"]
    assert behind["relay-fukuoka"].reported is False


def test_halted_and_suspended_roll_up() -> None:
    from dataclasses import replace
    fleet = _fleet()
    fleet["relay-yokohama"] = report.parse_relay_status(relay_files(
        "relay-yokohama", C1, {"install-7zip": [("pc-y1", FAIL, "x"), ("pc-y2", PEND, "")]}, halted={"install-7zip"}))
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    assert _job(hq, "install-7zip").state is JobState.HALTED
    specs = example_specs()
    suspended = tuple(replace(j, suspend=True) if j.name == "install-putty" else j for j in specs.jobs)
    hq = report.aggregate(replace(specs, jobs=suspended), Accepted(C1, T0, C1, True), "main", (), fleet)
    assert _job(hq, "install-putty").state is JobState.SUSPENDED


def test_a_job_whose_relays_wait_only_for_offline_clients_is_clients_offline() -> None:
    specs = example_specs()
    last = "client offline, last contact 2026-11-30T08:00:00Z"

    def offline_files(relay: str, clients: list[str]) -> dict[str, bytes]:
        plan_rows = tuple(Row("install-teams-meeting", relay, c, PEND, None, "teams-meeting", "24.1", None, 0,
                              last, None, Reason.CLIENT_OFFLINE) for c in clients)
        rollups = (JobRollup("install-teams-meeting", JobState.CLIENTS_OFFLINE,
                             report.count_states([PEND] * len(clients))),)
        return report.render_relay_status(relay, C1, Plan(relay, plan_rows, (), rollups), {}, [], [])

    fleet = _fleet()
    for relay in ("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"):
        fleet[relay] = report.parse_relay_status(offline_files(relay, [f"pc-{relay}-1"]))
    job = _job(report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), fleet), "install-teams-meeting")
    assert job.state is JobState.CLIENTS_OFFLINE
    assert dict(job.pending) == {"clientOffline": 4}
    assert report.state_label(job) == "ClientsOffline (4 clients waited for)"
    files = report.render_hq_status(report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), fleet))
    assert_valid_status_files(files)
    # one relay with a row that runs: the job is under way
    fleet["relay-osaka"] = report.parse_relay_status(relay_files(
        "relay-osaka", C1, {"install-teams-meeting": [("pc-o1", PEND, "retry")]}))
    job = _job(report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), fleet), "install-teams-meeting")
    assert job.state is JobState.IN_PROGRESS


def test_hq_passes_each_move_to_the_relay_the_client_left_and_nothing_else() -> None:
    from datetime import timedelta
    fleet = _fleet()
    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)

    def with_moves(relay: str, moves: list[report.Move]) -> report.RelayStatus:
        files = report.render_relay_status(relay, C1, None, {}, [], [], moved_in=moves)
        assert_valid_status_files(files)
        return report.parse_relay_status(files)

    fleet["relay-osaka"] = with_moves("relay-osaka", [report.Move("pc-1", "relay-kanto", t1),
                                                      report.Move("pc-2", "relay-nowhere", t1),  # not a relay
                                                      report.Move("pc-3", "relay-osaka", t1)])  # itself
    fleet["relay-fukuoka"] = with_moves("relay-fukuoka", [report.Move("pc-1", "relay-kanto", t2)])  # moved on
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    assert hq.moves == {"relay-kanto": (report.Move("pc-1", "relay-fukuoka", t2),)}
    files = report.render_hq_status(hq)
    assert_valid_status_files(files)
    assert report.parse_hq_status(files).moves == hq.moves
    # a fleet without moves writes no moves.yaml
    assert report.MOVES_FILE not in report.render_hq_status(
        report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), _fleet()))


def test_moved_and_retired_clients_are_listed_in_relay_yaml_only_when_there_are_any() -> None:
    files = report.render_relay_status("relay-kanto", C1, None, {}, [], [],
                                       moved_away=[report.Move("pc-1", "relay-osaka", T0)],
                                       retired=[("pc-2", T0), ("pc-3", T0)])
    assert_valid_status_files(files)
    status = report.parse_relay_status(files)
    assert (status.moved_away, status.retired, status.clients) == (1, 2, 0)
    plain = report.render_relay_status("relay-kanto", C1, None, {}, [], [])
    assert b"movedAway" not in plain["relays/relay-kanto/relay.yaml"]
    assert b"retired" not in plain["relays/relay-kanto/relay.yaml"]


def test_a_job_every_relay_holds_for_its_schedule_is_scheduled_with_its_date() -> None:
    from dataclasses import replace
    specs = example_specs()
    teams = next(j for j in specs.jobs if j.name == "install-teams-meeting")
    assert teams.not_before is not None  # the example schedules it for the next fiscal year

    def scheduled_files(relay: str, clients: list[str]) -> dict[str, bytes]:
        plan_rows = tuple(Row("install-teams-meeting", relay, c, PEND, None, "teams-meeting", "24.1", None, 0,
                              "scheduled", None, Reason.SCHEDULED) for c in clients)
        rollups = (JobRollup("install-teams-meeting", JobState.SCHEDULED, report.count_states([PEND] * len(clients))),)
        return report.render_relay_status(relay, C1, Plan(relay, plan_rows, (), rollups), {}, [], [])

    fleet = _fleet()
    for relay in ("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"):
        fleet[relay] = report.parse_relay_status(scheduled_files(relay, [f"pc-{relay}-1", f"pc-{relay}-2"]))
    hq = report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), fleet)
    job = _job(hq, "install-teams-meeting")
    assert job.state is JobState.SCHEDULED and job.scheduled_for == teams.not_before
    assert {d.state for d in job.relays} == {JobState.SCHEDULED}
    files = report.render_hq_status(hq)
    assert_valid_status_files(files)
    parsed = report.parse_job_report(files["jobs/install-teams-meeting.yaml"])
    assert (parsed.state, parsed.scheduled_for) == (JobState.SCHEDULED, teams.not_before)
    summary = files["summary.md"].decode()
    line = next(line for line in summary.splitlines() if line.startswith("| install-teams-meeting"))
    assert line.rstrip(" |").endswith("Scheduled (from 2027-04-01T00:00:00Z)"), line
    # one relay with a row pending for another reason: the job is under way, no date shown
    fleet["relay-osaka"] = report.parse_relay_status(relay_files(
        "relay-osaka", C1, {"install-teams-meeting": [("pc-o1", PEND, "retry")]}))
    job = _job(report.aggregate(specs, Accepted(C1, T0, C1, True), "main", (), fleet), "install-teams-meeting")
    assert (job.state, job.scheduled_for) == (JobState.IN_PROGRESS, None)
    # and a suspended job's rows get a column of their own in summary.md
    suspended = tuple(replace(j, suspend=True) if j.name == "install-putty" else j for j in specs.jobs)
    fleet["relay-yokohama"] = report.parse_relay_status(relay_files(
        "relay-yokohama", C1, {"install-putty": [("pc-y1", ClientState.SUSPENDED, "job is suspended")]}))
    summary = report.render_hq_status(report.aggregate(replace(specs, jobs=suspended), Accepted(C1, T0, C1, True),
                                                       "main", (), fleet))["summary.md"].decode()
    header = next(line for line in summary.splitlines() if line.startswith("| Job "))
    assert "| Suspended |" in header
    putty = next(line for line in summary.splitlines() if line.startswith("| install-putty"))
    assert [c.strip() for c in putty.split("|")][-3:-1] == ["1", "Suspended"]


def test_a_job_a_relay_cannot_plan_is_invalid_in_the_roll_up() -> None:
    fleet = _fleet()
    plan_rows = (Row("install-putty", "relay-yokohama", "pc-y1", OK, None, "putty", "0.81", "0.81", 1, ""),)
    jobs = (JobRollup("install-7zip", JobState.INVALID, report.zero_counts()),
            JobRollup("install-putty", JobState.COMPLETED, report.count_states([OK])))
    files = report.render_relay_status(
        "relay-yokohama", C1, Plan("relay-yokohama", plan_rows, (), jobs), {}, [],
        ["job install-7zip cannot be planned on this relay and is left out until the next commit: OverflowError"])
    fleet["relay-yokohama"] = report.parse_relay_status(files)
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    seven = _job(hq, "install-7zip")
    assert seven.state is JobState.INVALID
    assert {d.relay: d.state for d in seven.relays}["relay-kanto"] is JobState.INVALID  # yokohama is below kanto
    assert _job(hq, "install-putty").state is not JobState.INVALID
    assert "cannot be planned" in {r.relay: r for r in hq.relays}["relay-yokohama"].errors[0]


def test_no_accepted_commit_means_no_jobs() -> None:
    errors = (SpecError("jobs/a.yaml", 3, 5, "bad"),)
    hq = report.aggregate(None, Accepted(None, None, C2, False), "main", errors, {})
    assert hq.jobs == () and hq.relays == ()
    files = report.render_hq_status(hq)
    assert sorted(files) == ["accepted.yaml", "relays.yaml", "summary.md", "validation.yaml"]
    assert "No commit has been accepted yet." in files["summary.md"].decode()
    assert_valid_status_files(files)


# --------------------------------------------------------------- HQ files


def _big_hq(failures_per_relay: int = 300) -> report.HqReport:
    fleet = {}
    for relay in ("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"):
        rows = [(f"pc-{relay[6:]}-{i:04d}", FAIL, f"exit {i % 7}: failed | see log\nsecond line")
                for i in range(failures_per_relay)]
        fleet[relay] = report.parse_relay_status(relay_files(relay, C1, {"install-teams-meeting": rows}))
    errors = tuple(SpecError(f"jobs/bad-{i:03d}.yaml", i + 1, 3, f"problem {i}") for i in range(120))
    return report.aggregate(example_specs(), Accepted(C1, T0, C2, False), "main", errors, fleet)


def test_hq_files_validate_and_round_trip() -> None:
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), _fleet())
    files = report.render_hq_status(hq)
    assert sorted(files) == sorted(["accepted.yaml", "validation.yaml", "relays.yaml", "summary.md",
                                    *(f"jobs/{j.name}.yaml" for j in example_specs().jobs)])
    assert assert_valid_status_files(files) == len(files) - 1
    back = report.parse_hq_status(files)
    assert back == hq
    assert report.render_hq_status(back) == files


def test_hq_job_file_is_bounded() -> None:
    hq = _big_hq()
    teams = _job(hq, "install-teams-meeting")
    assert teams.failure_count == 1200
    assert len(teams.failures) == report.FAILURE_LIMIT
    assert [f.relay for f in teams.failures] == ["relay-fukuoka"] * report.FAILURE_LIMIT  # sorted by (relay, client)
    files = report.render_hq_status(hq)
    assert_valid_status_files(files)
    assert len(files["jobs/install-teams-meeting.yaml"]) < 20_000


def test_summary_sections_and_bounds() -> None:
    text = report.render_summary(_big_hq())
    lines = text.splitlines()
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## Jobs (7)", "## Why clients wait or were skipped", "## Failures (1200)",
                        "## Validation errors (120)", "## Relays (4)", "## Accepted commit"]
    # the fleet has neither client that install-office-addin names
    assert "- install-office-addin names clients no relay knows: pc-kanto-001, pc-osaka-001" in lines
    assert "main `222222222222` is invalid and is not applied" in text
    table = lines[lines.index("## Jobs (7)") + 2]
    assert [c.strip() for c in table.strip("|").split("|")] == [
        "Job", "Package", "Destinations", "Clients", "Succeeded", "InProgress", "Pending", "Failed", "Skipped",
        "Conflict", "State"]
    failure_rows = [line for line in lines[lines.index("## Failures (1200)"):lines.index("## Validation errors (120)")]
                    if line.startswith("| pc-") or line.startswith("| install-")]
    assert len(failure_rows) == report.FAILURE_LIMIT
    assert "… and 1150 more" in text
    assert r"failed \| see log second line" in text  # a pipe cannot break the table, a newline cannot either
    assert "- `jobs/bad-000.yaml:1:3` problem 0" in text
    assert "- … and 70 more (see `validation.yaml`)" in text
    assert text.rstrip().endswith(f"`{C1}` on `main`, accepted 2026-11-23T10:00:00Z.")
    # Every table row of a table has the same width, so it reads in a terminal too.
    jobs_table = [line for line in lines[lines.index("## Jobs (7)") + 2:] if line.startswith("|")][:9]
    assert len({len(line) for line in jobs_table}) == 1


def test_summary_size_does_not_grow_with_the_fleet() -> None:
    small = len(report.render_summary(_big_hq(60)))
    large = len(report.render_summary(_big_hq(1000)))
    assert large - small < 200  # only the counts' digits differ


def test_summary_for_one_job() -> None:
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), _fleet())
    text = report.render_summary(hq, "install-7zip")
    assert "## Jobs (1)" in text and "install-putty" not in text and "pc-k2" in text


def test_aggregation_is_deterministic_regardless_of_input_order() -> None:
    fleet = _fleet()
    items = list(fleet.items())
    random.Random(4).shuffle(items)
    a = report.render_hq_status(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet))
    b = report.render_hq_status(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), dict(items)))
    assert a == b


def test_every_status_schema_has_an_id_and_descriptions() -> None:
    names = sorted(p.name for p in Path(schemas_dir()).glob("status-*.schema.json"))
    assert names == sorted(f"{n}.schema.json" for _, n in report.STATUS_SCHEMAS)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                for key, sub in node["properties"].items():
                    assert "description" in sub or "$ref" in sub, f"{where}/{key} lacks a description"
                    walk(sub, f"{where}/{key}")
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    walk(node[key], f"{where}/{key}")
            for key, sub in node.get("$defs", {}).items():
                walk(sub, f"{where}/$defs/{key}")

    for name in names:
        schema = json.loads((Path(schemas_dir()) / name).read_text(encoding="utf-8"))
        stem = name.removesuffix(".schema.json")
        assert schema["$id"] == f"urn:reconciler:schema:v1:{stem}"
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["description"] and schema["additionalProperties"] is False
        walk(schema, stem)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.text(max_size=30))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _VALUES, max_size=6))
def test_status_yaml_reads_back_as_written(doc: dict[str, Any]) -> None:
    data = report.dump_yaml(doc)
    assert yaml.safe_load(data.decode("utf-8")) == (doc or None)
    assert report.dump_yaml(dict(reversed(list(doc.items())))) == data  # key order does not matter


_RELAY_HEAD = 'relay: r\nobservedCommit: null\nclients: 0\nupdatedAt: null\nerrors: []\n'
_JOB_HEAD = ('counts: {Conflict: 0, Failed: 0, InProgress: 0, Pending: 0, Skipped: 0, Succeeded: 1}\n'
             'job: j\nobservedCommit: null\nrelay: r\nstate: Succeeded\nrows:\n')
_ROW = {"attempts": 1, "client": "pc-1", "installedVersion": "1.0", "message": "", "state": "Succeeded",
        "updatedAt": None}


@pytest.mark.parametrize(("label", "reader", "text"), [
    ("integer job key", report.parse_relay_status, _RELAY_HEAD + "jobs:\n  1: {}\n  j: {}\n"),
    ("null job key", report.parse_relay_status, _RELAY_HEAD + "jobs:\n  null: {}\n  j: {}\n"),
    ("5,000-digit client count", report.parse_relay_status,
     _RELAY_HEAD.replace("clients: 0", "clients: " + "9" * 5000) + "jobs: {}\n"),
    ("deep nesting", report.parse_relay_status, _RELAY_HEAD + "jobs: " + "[" * 5000 + "]" * 5000 + "\n"),
    ("deeply nested row", report.parse_relay_job, _JOB_HEAD + "- " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("5,000-digit attempts", report.parse_relay_job,
     _JOB_HEAD + "- " + json.dumps(_ROW).replace('"attempts": 1', '"attempts": ' + "7" * 5000) + "\n"),
    ("unknown row key type", report.parse_relay_job, _JOB_HEAD + "- {1: 2}\n"),
    ("accepted.yaml of a list", report.parse_accepted, "- 1\n"),
])
def test_a_hostile_status_file_is_unreadable_never_a_crash(label: str, reader: Any, text: str) -> None:
    """What a compromised relay pushes to its own ref is input: a ReportError naming the file, nothing else."""
    data = text.encode()
    with pytest.raises(report.ReportError) as info:
        reader({"relays/r/relay.yaml": data} if reader is report.parse_relay_status else data)
    assert str(info.value), label


def test_a_status_file_larger_than_the_limit_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "MAX_STATUS_FILE", 1000)
    big = (_RELAY_HEAD + "jobs: {}\n" + "#" * 2000 + "\n").encode()
    with pytest.raises(report.ReportError, match="more than a status file may hold"):
        report.parse_relay_status({"relays/r/relay.yaml": big})


def test_a_client_message_cannot_become_a_link_or_image_in_the_summary() -> None:
    cell = report._md("[re-enter your password](https://evil.example/login) ![](https://evil.example/p.png) \\x")
    assert cell == ("\\[re-enter your password\\](https&#58;//evil.example/login) !\\[\\](https&#58;//evil.example/p.png) "
                    "\\\\x")


def test_pending_reasons_and_skip_messages_are_counted_per_job_across_relays() -> None:
    def files(relay: str, rows: list[tuple[str, ClientState, str, Reason]]) -> dict[str, bytes]:
        plan_rows = tuple(Row("install-7zip", relay, client, state, None, "7zip", "23.01", None, 0, message, None,
                              reason) for client, state, message, reason in rows)
        counts = report.count_states(r.state for r in plan_rows)
        rollups = (JobRollup("install-7zip", report.job_state(counts), counts),)
        return report.render_relay_status(relay, C1, Plan(relay, plan_rows, (), rollups), {}, [], [])

    windows = "requires os windows"
    kanto = files("relay-kanto", [
        ("pc-k1", PEND, "waiting for a rollout slot", Reason.ROLLOUT_SLOT),
        ("pc-k2", PEND, "waiting for a rollout slot", Reason.ROLLOUT_SLOT),
        ("pc-k3", PEND, "retry at 2026-06-01T12:05:00Z", Reason.RETRY_BACKOFF),
        ("pc-k4", ClientState.SKIPPED, windows, Reason.REQUIREMENTS),
        ("pc-k5", ClientState.SKIPPED, "needs 4000 MB free disk", Reason.REQUIREMENTS),
    ])
    assert_valid_status_files(kanto)
    digest = report.parse_relay_status(kanto).jobs["install-7zip"]
    assert dict(digest.pending) == {"retryBackoff": 1, "rolloutSlot": 2}
    assert digest.skipped == (("needs 4000 MB free disk", 1), (windows, 1))
    yokohama = files("relay-yokohama", [(f"pc-y{i}", ClientState.SKIPPED, windows, Reason.REQUIREMENTS)
                                        for i in range(5)] + [("pc-y9", PEND, "queued", Reason.QUEUED)])
    fleet = statuses(kanto, yokohama)
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    seven = _job(hq, "install-7zip")
    assert dict(seven.pending) == {"queued": 1, "retryBackoff": 1, "rolloutSlot": 2}
    assert seven.skipped == ((windows, 6), ("needs 4000 MB free disk", 1))
    assert report.pending_label(seven) == "2 rolloutSlot, 1 queued, 1 retryBackoff"
    assert report.skipped_label(seven) == f"6 skipped: {windows}; 1 skipped: needs 4000 MB free disk"
    hq_files = report.render_hq_status(hq)
    assert_valid_status_files(hq_files)
    parsed = report.parse_job_report(hq_files["jobs/install-7zip.yaml"])
    assert (dict(parsed.pending), parsed.skipped) == (dict(seven.pending), seven.skipped)
    summary = hq_files["summary.md"].decode()
    assert "## Why clients wait or were skipped" in summary
    line = next(line for line in summary.splitlines() if line.startswith("| install-7zip") and "skipped" in line)
    assert "2 rolloutSlot, 1 queued, 1 retryBackoff" in line and f"6 skipped: {windows}" in line


def test_skip_messages_are_bounded_in_number_and_length() -> None:
    rows = tuple(Row("install-7zip", "relay-kanto", f"pc-{i}", ClientState.SKIPPED, None, "7zip", "23.01", None, 0,
                     f"reason {i % 9} " + "x" * 500, None, Reason.REQUIREMENTS) for i in range(90))
    counts = report.count_states(r.state for r in rows)
    files = report.render_relay_status("relay-kanto", C1, Plan("relay-kanto", rows, (), (
        JobRollup("install-7zip", JobState.COMPLETED, counts),)), {}, [], [])
    assert_valid_status_files(files)
    skipped = report.parse_relay_status(files).jobs["install-7zip"].skipped
    assert len(skipped) == report.SKIP_LIMIT and all(n == 10 for _, n in skipped)
    assert all(len(message) <= report.SKIP_MESSAGE_LIMIT for message, _ in skipped)


def test_summary_lists_relays_in_tree_order_with_their_failures() -> None:
    fleet = _fleet()
    del fleet["relay-fukuoka"]  # never reported
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    assert [(depth, r.relay) for depth, r in report.relay_tree(hq.relays)] == [
        (0, "relay-fukuoka"), (0, "relay-kanto"), (1, "relay-yokohama"), (0, "relay-osaka")]
    assert {r.relay: r.failed for r in hq.relays} == {
        "relay-fukuoka": 0, "relay-kanto": 1, "relay-yokohama": 0, "relay-osaka": 1}
    files = report.render_hq_status(hq)
    assert_valid_status_files(files)
    assert {r.relay: r.failed for r in report.parse_relays(files["relays.yaml"])} == {r.relay: r.failed
                                                                                       for r in hq.relays}
    text = files["summary.md"].decode()
    section = text[text.index("## Relays (4)"):text.index("## Accepted commit")].splitlines()
    assert "1 of 4 relays have not reported the accepted commit." in section
    table = [[c.strip(" ") for c in line.strip("|").split("|")] for line in section if line.startswith("| ")][1:]
    assert [(row[0], row[1], row[2], row[3], row[5]) for row in table] == [
        ("relay-fukuoka", "-", "-/-/0", "no status yet", "0"),
        ("relay-kanto", "-", "2/0/2", "accepted commit", "1"),
        ("\u00a0\u00a0└ relay-yokohama", "-", "2/0/2", "accepted commit", "0"),
        ("relay-osaka", "-", "2/0/2", "accepted commit", "1"),
    ]
    assert "- relay-kanto: pc-k2 (install-7zip): exit 2" in section
    assert "- relay-osaka: pc-o1 (install-teams-meeting): no space" in section


def test_a_named_client_is_not_registered_only_when_every_relay_has_reported() -> None:
    fleet = _fleet()
    fleet["relay-kanto"] = report.parse_relay_status(relay_files("relay-kanto", C1, {
        "install-7zip": [("pc-k1", OK, ""), ("pc-k2", FAIL, "exit 2")],
        "install-office-addin": [("pc-kanto-001", OK, "")]}))
    hq = report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet)
    assert _job(hq, "install-office-addin").state is JobState.COMPLETED  # both named clients have a row
    # a relay behind the accepted commit may hold a named client: nobody is called unknown yet
    fleet["relay-kanto"] = report.parse_relay_status(relay_files("relay-kanto", C2, {}))
    addin = _job(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet),
                 "install-office-addin")
    assert (addin.state, addin.not_registered_count) == (JobState.IN_PROGRESS, 0)
    # an older relay that does not list its named clients but has rows for the job: unknown, not missing
    old = relay_files("relay-kanto", C1, {"install-office-addin": [("pc-kanto-001", OK, "")]})
    doc = yaml.safe_load(old["relays/relay-kanto/relay.yaml"])
    del doc["jobs"]["install-office-addin"]["named"]
    old["relays/relay-kanto/relay.yaml"] = yaml.safe_dump(doc).encode()
    fleet["relay-kanto"] = report.parse_relay_status(old)
    fleet["relay-osaka"] = report.parse_relay_status(relay_files("relay-osaka", C1, {}))
    addin = _job(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet),
                 "install-office-addin")
    assert addin.not_registered_count == 0


def _relay_yaml(relay: str = "relay-kanto") -> dict[str, Any]:
    files = relay_files(relay, C1, {"install-7zip": [("pc-k1", OK, ""), ("pc-k2", PEND, "")]})
    return yaml.safe_load(files[f"relays/{relay}/relay.yaml"])


def test_a_relay_file_with_numbers_too_large_to_add_is_that_relays_error() -> None:
    doc = _relay_yaml()
    huge = int("9" * 4300)
    doc["jobs"]["install-7zip"]["counts"] = {**doc["jobs"]["install-7zip"]["counts"], "Pending": huge,
                                             "Succeeded": huge}
    with pytest.raises(report.ReportError, match=r"jobs\.install-7zip\.counts\.(Pending|Succeeded)"):
        report.parse_relay_status({"relays/relay-kanto/relay.yaml": yaml.safe_dump(doc).encode()})


def test_a_relay_file_built_of_aliases_is_refused_before_anything_walks_it() -> None:
    levels = ["errors:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    data = ("relay: relay-kanto\nobservedCommit: null\nclients: 0\nupdatedAt: null\njobs: {}\n"
            + "\n".join(levels) + "\n").encode()
    assert len(data) < 1000  # 10^10 strings if expanded
    with pytest.raises(report.ReportError, match="anchors and aliases"):
        report.parse_relay_status({"relays/relay-kanto/relay.yaml": data})


def test_reason_counts_are_bounded_in_a_relay_file_and_in_hqs_sum() -> None:
    doc = _relay_yaml()
    doc["jobs"]["install-7zip"]["pending"] = {f"reason{chr(97 + i // 26)}{chr(97 + i % 26)}": 1 for i in range(65)}
    with pytest.raises(report.ReportError, match="pending"):
        report.parse_relay_status({"relays/relay-kanto/relay.yaml": yaml.safe_dump(doc).encode()})
    # 50 distinct reasons on each of two relays: HQ keeps 63 and sums the rest as "other"
    fleet = {}
    for n, relay in enumerate(("relay-kanto", "relay-yokohama")):
        doc = _relay_yaml(relay)
        doc["jobs"]["install-7zip"]["pending"] = {f"r{'ab'[n]}x{chr(97 + i // 26)}{chr(97 + i % 26)}": i + 1
                                                  for i in range(50)}
        fleet[relay] = report.parse_relay_status({f"relays/{relay}/relay.yaml": yaml.safe_dump(doc).encode()})
    seven = _job(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), fleet), "install-7zip")
    assert len(seven.pending) == report.MAX_REASONS and sum(seven.pending.values()) == 2 * sum(range(1, 51))
    assert "other" in seven.pending


def test_inventory_a_relay_publishes_is_held_to_what_a_check_in_may_carry() -> None:
    files = report.render_relay_status("relay-kanto", C1, None, {}, [
        InventoryEntry("pc-1", {"os": "linux", "freeDiskMB": -5}, {}, (), True)], [])
    with pytest.raises(report.ReportError, match=r"clients\[0\]\.facts\.freeDiskMB: must be at least 0"):
        report.parse_relay_inventory(files["relays/relay-kanto/inventory.json"], "relays/relay-kanto/inventory.json")


def test_text_from_relays_never_acts_on_a_terminal_or_becomes_a_link() -> None:
    evil = "boom \x1b[2J\x1b]0;pwned\x07 see https://evil.example/login or www.evil.example \u202egnp.exe"
    fleet = statuses(relay_files("relay-kanto", C1, {"install-7zip": [("pc-k1", FAIL, evil)]}))
    summary = report.render_summary(report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (),
                                                     fleet))
    assert not any(ch in summary for ch in "\x1b\x07\u202e")
    assert "https://" not in summary and "www.evil" not in summary
    assert "\\\\x1b\\[2J" in summary and "https&#58;//evil.example/login" in summary
    assert report.printable(evil).startswith("boom \\x1b[2J\\x1b]0;pwned\\x07 see https://")


def test_inventory_json_has_one_client_per_line_in_id_order_and_reads_back() -> None:
    entries = [InventoryEntry(id=cid, facts={"os": "linux"}, labels={}, installed=(), online=True)
               for cid in ("pc-2", "pc-1", "pc-3")]
    data = report.relay_detail("relay-a", entries).inventory
    lines = data.decode("utf-8").split("\n")
    assert lines[0] == '{"clients": [' and lines[-1] == "" and lines[-2].startswith("]")
    assert [json.loads(line.rstrip(","))["id"] for line in lines[1:-2]] == ["pc-1", "pc-2", "pc-3"]
    assert json.loads(data)["relay"] == "relay-a"
    empty = report.relay_detail("relay-a", []).inventory
    assert json.loads(empty) == {"clients": [], "relay": "relay-a"} and empty.count(b"\n") == 1
