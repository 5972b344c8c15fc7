"""The plan engine's rules (DESIGN section 4), one table per rule.

Specs come from small inline YAML through the real loader
(``specs.parse_repo``), so every case is a repo an admin could write. Each
test compares whole values where it can: a rule that breaks fails here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml

from reconciler.plan import (
    RESULT_MARGIN_SECONDS,
    Action,
    ActionKind,
    Attempt,
    Client,
    ClientState,
    Installed,
    JobState,
    Outcome,
    Plan,
    Reason,
    RolloutUsage,
    Row,
    index_relay,
    operation_id,
    plan_client,
    plan_relay,
    plan_revision,
    rollup,
)
from reconciler.plan.vocabulary import DOWNLOAD_RETRY_SECONDS, MAX_DEFERRALS
from reconciler.specs import Specs, parse_repo

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)

TOPOLOGY = {
    "apiVersion": "reconciler/v1", "kind": "Topology", "metadata": {"name": "t"},
    "spec": {"headquarters": "hq", "relays": [
        {"name": "region", "parent": "hq"},
        {"name": "site", "parent": "region"},
        {"name": "floor", "parent": "site"},
        {"name": "other", "parent": "hq"},
    ]},
}


def pkg(name: str, version: str, **spec: Any) -> dict[str, Any]:
    body = {"name": name, "version": version, "artifact": {"path": f"artifacts/{name}"},
            "installer": {"type": "files"}, **spec}
    return {"apiVersion": "reconciler/v1", "kind": "Package",
            "metadata": {"name": f"{name}-{version}"}, "spec": body}


def job(name: str, software: str, version: str | None = None, *, uninstall: bool = False,
        to: Sequence[str] = ("region",), clients: bool = False, **spec: Any) -> dict[str, Any]:
    package = {"name": software} if version is None else {"name": software, "version": version}
    body = {"jobType": "uninstall" if uninstall else "install", "package": package,
            "destinationType": "clients" if clients else "allLowerClients",
            "destinations": list(to), **spec}
    return {"apiVersion": "reconciler/v1", "kind": "Job", "metadata": {"name": name}, "spec": body}


def build(*docs: dict[str, Any]) -> Specs:
    files = {"topology.yaml": yaml.safe_dump(TOPOLOGY).encode()}
    for doc in docs:
        folder = "packages" if doc["kind"] == "Package" else "jobs"
        files[f"{folder}/{doc['metadata']['name']}.yaml"] = yaml.safe_dump(doc).encode()
    result = parse_repo(files, lambda path: None)
    assert result.valid, result.errors
    assert result.specs is not None
    return result.specs


def client(cid: str, relay: str = "site", *, os: str | None = "windows", arch: str | None = "x86_64",
           disk: int | None = 10_000, labels: Mapping[str, str] | None = None,
           installed: Mapping[str, str] | None = None, online: bool = True) -> Client:
    return Client(id=cid, relay=relay, os=os, arch=arch, free_disk_mb=disk,
                  labels=tuple(sorted((labels or {}).items())),
                  installed=tuple(Installed(n, v) for n, v in sorted((installed or {}).items())),
                  online=online)


def run(specs: Specs, clients: Sequence[Client], history: Mapping[tuple[str, str], Attempt] | None = None,
        relay: str = "site", now: datetime = NOW) -> Plan:
    return plan_relay(index_relay(specs, relay), clients, history or {}, now)


def states(plan: Plan) -> dict[tuple[str, str], tuple[str, str | None, str]]:
    """(job, client) -> (state, action, message)."""
    return {(r.job, r.client): (r.state.value, r.action.value if r.action else None, r.message)
            for r in plan.rows}


def attempt(specs: Specs, job_name: str, cid: str, *, relay: str = "site", n: int = 1,
            outcome: Outcome = Outcome.FAILED, at: datetime = NOW - timedelta(hours=1),
            finished: datetime | None = None, message: str = "exit code 1", rerun: int = 0,
            action: ActionKind = ActionKind.INSTALL, version: str | None = "1.0",
            revision: str | None = None, op: str | None = None) -> Attempt:
    index = index_relay(specs, relay)
    if finished is None and outcome is not Outcome.DISPATCHED:
        finished = at + timedelta(minutes=1)
    return Attempt(operation_id=op or f"op-{job_name}-{cid}-{n}", job=job_name, client=cid,
                   revision=revision if revision is not None else index.revisions[job_name],
                   rerun=rerun, attempt=n, action=action, version=version, outcome=outcome,
                   dispatched_at=at, finished_at=finished, message=message)


APP = pkg("app", "1.0")
APP_JOB = job("install-app", "app", "1.0")


# ------------------------------------------------------------------- reach


@pytest.mark.parametrize(("destinations", "relay", "reached"), [
    (["region"], "region", True),
    (["region"], "site", True),     # one level below
    (["region"], "floor", True),    # two levels below: any depth
    (["region"], "other", False),
    (["site"], "region", False),    # never upwards
    (["site"], "floor", True),
    (["floor"], "site", False),
    (["other", "floor"], "floor", True),
])
def test_all_lower_clients_reach_relays_below_a_destination(destinations: list[str], relay: str,
                                                             reached: bool) -> None:
    specs = build(APP, job("install-app", "app", "1.0", to=destinations))
    plan = run(specs, [client("pc-1", relay)], relay=relay)
    assert [(r.job, r.client) for r in plan.rows] == ([("install-app", "pc-1")] if reached else [])
    assert [a.client for a in plan.actions] == (["pc-1"] if reached else [])
    assert [j.job for j in plan.jobs] == (["install-app"] if reached else [])


def test_clients_job_reaches_named_clients_on_any_relay() -> None:
    specs = build(APP, job("install-app", "app", "1.0", to=["pc-1", "pc-9"], clients=True))
    on_other = run(specs, [client("pc-1", "other"), client("pc-2", "other")], relay="other")
    assert [(r.job, r.client) for r in on_other.rows] == [("install-app", "pc-1")]
    on_floor = run(specs, [client("pc-9", "floor")], relay="floor")
    assert [(r.job, r.client) for r in on_floor.rows] == [("install-app", "pc-9")]
    # a relay where none of the named clients is: the job does not reach it
    assert run(specs, [client("pc-3", "site")]).jobs == ()


def test_index_lists_reaching_jobs() -> None:
    specs = build(APP, job("a-near", "app", "1.0", to=["site"]), job("b-far", "app", "1.0", to=["other"]),
                  job("c-named", "app", "1.0", to=["pc-1"], clients=True))
    index = index_relay(specs, "floor")
    assert [j.name for j in index.relay_jobs] == ["a-near"]
    assert {c: [j.name for j in jobs] for c, jobs in index.client_jobs.items()} == {"pc-1": ["c-named"]}
    assert index.packages[("app", "1.0")].spec_name == "app-1.0"
    assert set(index.revisions) == {"a-near", "c-named"}


# ---------------------------------------------------------- suspend, schedule


def test_suspended_job_starts_nothing() -> None:
    specs = build(APP, job("install-app", "app", "1.0", suspend=True))
    plan = run(specs, [client("pc-1"), client("pc-2", installed={"app": "1.0"})])
    assert states(plan) == {("install-app", "pc-1"): ("Suspended", None, "job is suspended"),
                            ("install-app", "pc-2"): ("Suspended", None, "job is suspended")}
    assert plan.actions == ()
    assert plan.jobs[0].state is JobState.SUSPENDED


@pytest.mark.parametrize(("schedule", "installed", "expected"), [
    ({"notBefore": "2026-07-01T09:00:00+09:00"}, None,
     ("Pending", None, "scheduled for 2026-07-01T00:00:00Z")),
    ({"notBefore": "2026-05-01T00:00:00Z", "notAfter": "2026-07-01T00:00:00Z"}, None,
     ("Pending", "install", "")),
    ({"notAfter": "2026-06-01T00:00:00Z"}, None,
     ("Skipped", None, "schedule window closed at 2026-06-01T00:00:00Z")),
    ({"notAfter": "2026-06-01T00:00:00Z"}, "1.0", ("Succeeded", None, "")),
    ({"notAfter": "2026-06-01T00:00:00Z"}, "0.9",
     ("Skipped", None, "schedule window closed at 2026-06-01T00:00:00Z")),
    ({"notBefore": "2026-06-01T12:00:00Z"}, None, ("Pending", "install", "")),  # exactly at notBefore
])
def test_schedule_window(schedule: dict[str, str], installed: str | None,
                         expected: tuple[str, str | None, str]) -> None:
    specs = build(APP, job("install-app", "app", "1.0", schedule=schedule))
    plan = run(specs, [client("pc-1", installed={"app": installed} if installed else None)])
    assert states(plan) == {("install-app", "pc-1"): expected}
    assert len(plan.actions) == (1 if expected[1] else 0)


def test_after_the_window_rows_in_progress_and_failed_stay() -> None:
    specs = build(APP, job("install-app", "app", "1.0", schedule={"notAfter": "2026-06-01T00:00:00Z"}))
    history = {
        ("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", outcome=Outcome.DISPATCHED,
                                         at=NOW - timedelta(seconds=10), op="op-running"),
        ("install-app", "pc-2"): attempt(specs, "install-app", "pc-2", n=3, message="boom"),
        ("install-app", "pc-3"): attempt(specs, "install-app", "pc-3", n=1),  # would retry: not any more
    }
    plan = run(specs, [client("pc-1"), client("pc-2"), client("pc-3")], history)
    got = states(plan)
    assert got[("install-app", "pc-1")][:2] == ("InProgress", "install")
    assert got[("install-app", "pc-2")] == ("Failed", None, "boom")
    assert got[("install-app", "pc-3")] == ("Skipped", None, "schedule window closed at 2026-06-01T00:00:00Z")
    assert [a.operation_id for a in plan.actions] == ["op-running"]


def test_a_job_waiting_for_its_future_schedule_is_scheduled() -> None:
    specs = build(APP, job("install-app", "app", "1.0", schedule={"notBefore": "2027-01-01T00:00:00Z"}))
    plan = run(specs, [client("pc-1"), client("pc-2", installed={"app": "1.0"})])
    assert plan.jobs[0].state is JobState.SCHEDULED
    assert {(r.state, r.reason) for r in plan.rows} == {(ClientState.PENDING, Reason.SCHEDULED)}
    # once the time has come, the same clients make the job InProgress
    assert run(specs, [client("pc-1")], now=datetime(2027, 1, 1, tzinfo=timezone.utc)).jobs[0].state \
        is JobState.IN_PROGRESS


def test_pending_rows_for_another_reason_keep_a_job_in_progress() -> None:
    rows = [Row("j", "site", "pc-1", ClientState.PENDING, None, "app", "1.0", None, 0, "scheduled", None,
                Reason.SCHEDULED),
            Row("j", "site", "pc-2", ClientState.PENDING, None, "app", "1.0", None, 0, "retry", None,
                Reason.RETRY_BACKOFF)]
    assert rollup("j", rows[:1]).state is JobState.SCHEDULED
    assert rollup("j", rows).state is JobState.IN_PROGRESS
    failed = Row("j", "site", "pc-3", ClientState.FAILED, None, "app", "1.0", None, 3, "boom", None, Reason.FAILED)
    assert rollup("j", [rows[0], failed]).state is JobState.SCHEDULED  # still to run, so not finished


def test_an_offline_clients_waiting_rows_say_so_with_its_last_contact_and_park_the_job() -> None:
    from reconciler.plan.rules import plan_relay_by_rules
    seen = NOW - timedelta(hours=5)
    specs = build(APP, APP_JOB, pkg("tool", "2.0"),
                  job("install-tool", "tool", "2.0", schedule={"notBefore": "2027-01-01T00:00:00Z"}),
                  pkg("zip", "1.0"), job("install-limited", "zip", "1.0", rollout={"maxConcurrent": 1}))
    away = replace(client("pc-2", installed={}), online=False, last_seen=seen)
    history = {("install-app", "pc-3"): attempt(specs, "install-app", "pc-3", outcome=Outcome.DISPATCHED,
                                                at=NOW - timedelta(seconds=30))}
    clients = [client("pc-1", installed={"app": "1.0", "zip": "1.0"}), away,
               replace(client("pc-3"), online=False, last_seen=seen)]
    for plan in (run(specs, clients, history),
                 plan_relay_by_rules(index_relay(specs, "site"), clients, history, NOW)):
        rows = {(r.job, r.client): r for r in plan.rows}
        queued = rows[("install-app", "pc-2")]
        assert (queued.state, queued.reason) == (ClientState.PENDING, Reason.CLIENT_OFFLINE)
        assert queued.message == "client offline, last contact 2026-06-01T07:00:00Z"
        assert queued.action is ActionKind.INSTALL  # what it gets when it is back
        # waiting for the schedule says so whether the client is up or not
        assert rows[("install-tool", "pc-2")].reason is Reason.SCHEDULED
        # an operation handed out before the client went away is still InProgress (its timeout bounds it)
        assert rows[("install-app", "pc-3")].state is ClientState.IN_PROGRESS
        jobs = {j.job: j.state for j in plan.jobs}
        assert jobs["install-app"] is JobState.IN_PROGRESS  # pc-3's operation still runs
        assert jobs["install-limited"] is JobState.CLIENTS_OFFLINE  # no slot taken by an offline client
        assert jobs["install-tool"] is JobState.SCHEDULED
        assert plan.usage["install-limited"].in_progress == 0


def test_offline_rows_park_a_job_only_when_nothing_else_waits() -> None:
    def row(cid: str, reason: Reason, state: ClientState = ClientState.PENDING) -> Row:
        return Row("j", "site", cid, state, None, "app", "1.0", None, 0, "", None, reason)
    offline = row("pc-1", Reason.CLIENT_OFFLINE)
    assert rollup("j", [offline]).state is JobState.CLIENTS_OFFLINE
    assert rollup("j", [offline, row("pc-2", Reason.QUEUED)]).state is JobState.IN_PROGRESS
    assert rollup("j", [offline, row("pc-2", Reason.SCHEDULED)]).state is JobState.SCHEDULED
    assert rollup("j", [offline, row("pc-2", Reason.IN_PROGRESS, ClientState.IN_PROGRESS)]).state \
        is JobState.IN_PROGRESS
    assert rollup("j", [offline, row("pc-2", Reason.FAILED, ClientState.FAILED)]).state is JobState.CLIENTS_OFFLINE
    assert rollup("j", [row("pc-2", Reason.DONE, ClientState.SUCCEEDED)]).state is JobState.COMPLETED


# ------------------------------------------------------------- requirements


@pytest.mark.parametrize(("requirements", "facts", "message"), [
    ({"os": ["windows"]}, {"os": "linux"}, "requires os windows, client has linux"),
    ({"os": ["windows", "darwin"]}, {"os": "linux"}, "requires os windows or darwin, client has linux"),
    ({"os": ["windows"]}, {"os": None}, "requires os windows, client did not report os"),
    ({"arch": ["x86_64", "arm64"]}, {"arch": "x86"}, "requires arch x86_64 or arm64, client has x86"),
    ({"arch": ["arm64"]}, {"arch": None}, "requires arch arm64, client did not report arch"),
    ({"minFreeDiskMB": 1024}, {"disk": 800}, "requires 1024 MB free disk, client has 800 MB"),
    ({"minFreeDiskMB": 1024}, {"disk": None}, "requires 1024 MB free disk, client did not report freeDiskMB"),
    ({"labels": {"dept": "sales"}}, {"labels": {"dept": "eng"}},
     "requires label dept=sales, client has dept=eng"),
    ({"labels": {"dept": "sales"}}, {"labels": {}}, "requires label dept=sales, client has no label dept"),
    ({"os": ["windows"], "minFreeDiskMB": 50, "labels": {"dept": "sales"}},
     {"os": "linux", "disk": 10, "labels": {"dept": "eng"}},
     "requires os windows, client has linux; requires 50 MB free disk, client has 10 MB; "
     "requires label dept=sales, client has dept=eng"),
    ({"os": ["windows"], "arch": ["x86_64"], "minFreeDiskMB": 1024, "labels": {"dept": "sales"}},
     {"os": "windows", "arch": "x86_64", "disk": 1024, "labels": {"dept": "sales", "x": "y"}}, None),
])
def test_requirements(requirements: dict[str, Any], facts: dict[str, Any], message: str | None) -> None:
    specs = build(pkg("app", "1.0", requirements=requirements), APP_JOB)
    plan = run(specs, [client("pc-1", **facts)])
    expected = ("Skipped", None, message) if message else ("Pending", "install", "")
    assert states(plan) == {("install-app", "pc-1"): expected}


def test_requirement_messages_quote_each_clients_own_disk() -> None:
    specs = build(pkg("app", "1.0", requirements={"minFreeDiskMB": 1024}), APP_JOB)
    plan = run(specs, [client("pc-1", disk=500), client("pc-2", disk=800), client("pc-3", disk=5000)])
    assert [r.message for r in plan.rows] == ["requires 1024 MB free disk, client has 500 MB",
                                              "requires 1024 MB free disk, client has 800 MB", ""]


def test_cached_decisions_tell_clients_apart_by_every_fact() -> None:
    """Clients differing in one fact each, planned in one pass and one by one on the same index."""
    specs = build(pkg("app", "1.0", requirements={"os": ["windows"], "arch": ["x86_64"], "minFreeDiskMB": 100,
                                                  "labels": {"dept": "sales"}}), APP_JOB)
    base = {"os": "windows", "arch": "x86_64", "disk": 500, "labels": {"dept": "sales", "host": "a"}}
    variants = {
        "pc-1": {},
        "pc-2": {"labels": {"dept": "eng", "host": "b"}},
        "pc-3": {"os": "linux"},
        "pc-4": {"arch": "arm64"},
        "pc-5": {"disk": 50},
        "pc-6": {"labels": {"host": "c"}},
        "pc-7": {"labels": {"dept": "sales", "host": "d"}},
    }
    clients = [client(cid, **{**base, **change}) for cid, change in variants.items()]
    expected = {
        "pc-1": "", "pc-2": "requires label dept=sales, client has dept=eng",
        "pc-3": "requires os windows, client has linux", "pc-4": "requires arch x86_64, client has arm64",
        "pc-5": "requires 100 MB free disk, client has 50 MB", "pc-6": "requires label dept=sales, client has no label dept",
        "pc-7": ""}
    index = index_relay(specs, "site")
    for _ in range(2):  # a second pass reuses the index's caches
        assert {r.client: r.message for r in plan_relay(index, clients, {}, NOW).rows} == expected
        assert {c.id: plan_client(index, c, {}, {}, NOW).rows[0].message for c in reversed(clients)} == expected


def test_requirements_do_not_gate_an_uninstall() -> None:
    specs = build(pkg("app", "1.0", requirements={"os": ["windows"]}),
                  job("remove-app", "app", uninstall=True))
    plan = run(specs, [client("pc-1", os="linux", installed={"app": "1.0"})])
    assert states(plan) == {("remove-app", "pc-1"): ("Pending", "uninstall", "")}


# ---------------------------------------------------------------- conflicts


VPN = (pkg("vpn-client", "5.1"), pkg("vpn-client", "5.2"), pkg("vpn-client", "5.0"))


@pytest.mark.parametrize(("first", "second", "first_message", "second_message"), [
    (job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", "5.2"),
     "conflicts with job vpn-b (wants vpn-client 5.2)", "conflicts with job vpn-a (wants vpn-client 5.1)"),
    (job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", uninstall=True),
     "conflicts with job vpn-b (wants vpn-client removed)", "conflicts with job vpn-a (wants vpn-client 5.1)"),
    (job("vpn-a", "vpn-client", uninstall=True), job("vpn-b", "vpn-client", "5.2"),
     "conflicts with job vpn-b (wants vpn-client 5.2)", "conflicts with job vpn-a (wants vpn-client removed)"),
    (job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", "5.1", uninstall=True),
     "conflicts with job vpn-b (wants vpn-client 5.1 removed)",
     "conflicts with job vpn-a (wants vpn-client 5.1)"),
])
@pytest.mark.parametrize("installed", [None, "5.0", "5.1"])
def test_conflicts_mark_both_rows_and_do_nothing(first: dict[str, Any], second: dict[str, Any],
                                                  first_message: str, second_message: str,
                                                  installed: str | None) -> None:
    specs = build(*VPN, first, second)
    plan = run(specs, [client("pc-1", installed={"vpn-client": installed} if installed else None)])
    assert states(plan) == {("vpn-a", "pc-1"): ("Conflict", None, first_message),
                            ("vpn-b", "pc-1"): ("Conflict", None, second_message)}
    assert plan.actions == ()
    assert [j.state for j in plan.jobs] == [JobState.FAILED, JobState.FAILED]


def test_conflict_names_every_other_job() -> None:
    specs = build(*VPN, job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", "5.2"),
                  job("vpn-c", "vpn-client", "5.0", uninstall=True))
    got = states(run(specs, [client("pc-1")]))
    assert got == {
        ("vpn-a", "pc-1"): ("Conflict", None, "conflicts with job vpn-b (wants vpn-client 5.2)"),
        ("vpn-b", "pc-1"): ("Conflict", None, "conflicts with job vpn-a (wants vpn-client 5.1)"),
        # removing 5.0 is compatible with installing 5.1 or 5.2: nothing installed, nothing to remove
        ("vpn-c", "pc-1"): ("Succeeded", None, ""),
    }


@pytest.mark.parametrize("installed", ["5.0", "5.2"])
def test_uninstall_of_another_version_does_not_conflict_it_goes_first(installed: str) -> None:
    # removing the installed version, then installing the wanted one, in one go
    specs = build(*VPN, job("vpn-a", "vpn-client", "5.1"),
                  job("vpn-old", "vpn-client", installed, uninstall=True))
    plan = run(specs, [client("pc-1", installed={"vpn-client": installed})])
    assert states(plan) == {("vpn-a", "pc-1"): ("Pending", "install", ""),
                            ("vpn-old", "pc-1"): ("Pending", "uninstall", "")}
    assert [(a.job, a.kind.value, a.version, a.previous_version) for a in plan.actions] == [
        ("vpn-old", "uninstall", installed, None), ("vpn-a", "install", "5.1", None)]


def test_install_waits_while_the_removal_before_it_cannot_start() -> None:
    specs = build(*VPN, job("vpn-a", "vpn-client", "5.1"),
                  job("vpn-old", "vpn-client", "5.2", uninstall=True, rollout={"maxConcurrent": 1}))
    plan = run(specs, [client("pc-1", installed={"vpn-client": "5.2"}),
                       client("pc-2", installed={"vpn-client": "5.2"})])
    assert states(plan)[("vpn-a", "pc-2")] == ("Pending", None, "waiting for job vpn-old to remove vpn-client 5.2")
    assert [(a.client, a.job) for a in plan.actions] == [("pc-1", "vpn-old"), ("pc-1", "vpn-a")]


@pytest.mark.parametrize("blocked", [{"suspend": True}, {"schedule": {"notBefore": "2027-01-01T00:00:00Z"}},
                                     {"schedule": {"notAfter": "2026-01-01T00:00:00Z"}}])
def test_inactive_jobs_do_not_conflict(blocked: dict[str, Any]) -> None:
    specs = build(*VPN, job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", "5.2", **blocked))
    got = states(run(specs, [client("pc-1")]))
    assert got[("vpn-a", "pc-1")] == ("Pending", "install", "")
    assert got[("vpn-b", "pc-1")][0] in ("Suspended", "Pending", "Skipped")
    assert got[("vpn-b", "pc-1")][1] is None


def test_skipped_job_does_not_conflict() -> None:
    specs = build(pkg("vpn-client", "5.1"), pkg("vpn-client", "5.2", requirements={"os": ["darwin"]}),
                  job("vpn-a", "vpn-client", "5.1"), job("vpn-b", "vpn-client", "5.2"))
    got = states(run(specs, [client("pc-1")]))
    assert got == {("vpn-a", "pc-1"): ("Pending", "install", ""),
                   ("vpn-b", "pc-1"): ("Skipped", None, "requires os darwin, client has windows")}


def test_two_jobs_wanting_the_same_change_make_one_action() -> None:
    specs = build(APP, job("a-app", "app", "1.0"), job("b-app", "app", "1.0"))
    plan = run(specs, [client("pc-1")])
    [action] = plan.actions
    assert action.job == "a-app"
    a_row, b_row = plan.rows
    assert (a_row.state, a_row.action, a_row.message) == (ClientState.PENDING, ActionKind.INSTALL, "")
    assert b_row == a_row._replace(job="b-app", message="same change as job a-app")
    # once the first is in progress it keeps the change, whatever the names
    history = {("a-app", "pc-1"): attempt(specs, "a-app", "pc-1", outcome=Outcome.DISPATCHED,
                                          at=NOW - timedelta(seconds=5), op=action.operation_id)}
    again = run(specs, [client("pc-1")], history)
    assert [a.operation_id for a in again.actions] == [action.operation_id]
    assert [(r.state.value, r.operation_id, r.message) for r in again.rows][1] == \
        ("InProgress", action.operation_id, "same change as job a-app")


# ------------------------------------------------------------------ versions


@pytest.mark.parametrize(("installed", "wanted", "downgrade", "expected", "previous"), [
    (None, "23.01", False, ("Pending", "install", ""), None),
    ("22.00", "23.01", False, ("Pending", "upgrade", ""), "22.00"),
    ("1.9", "1.10", False, ("Pending", "upgrade", ""), "1.9"),
    ("23.01", "23.01", False, ("Succeeded", None, ""), None),
    ("23.1", "23.01", False, ("Succeeded", None, ""), None),  # the same version by the ordering rule
    ("2.0.0", "2.0", False, ("Succeeded", None, ""), None),
    ("24.00", "23.01", False, ("Skipped", None, "newer version 24.00 present"), None),
    ("2.0.1", "2.0", False, ("Skipped", None, "newer version 2.0.1 present"), None),
    ("24.00", "23.01", True, ("Pending", "downgrade", ""), "24.00"),
])
def test_install_version_rules(installed: str | None, wanted: str, downgrade: bool,
                               expected: tuple[str, str | None, str], previous: str | None) -> None:
    specs = build(pkg("7zip", wanted), job("install-7zip", "7zip", wanted, allowDowngrade=downgrade))
    plan = run(specs, [client("pc-1", installed={"7zip": installed} if installed else None)])
    assert states(plan) == {("install-7zip", "pc-1"): expected}
    if expected[1] is None:
        assert plan.actions == ()
    else:
        [action] = plan.actions
        index = index_relay(specs, "site")
        assert action == Action(
            operation_id=plan.rows[0].operation_id or "", job="install-7zip", client="pc-1",
            kind=ActionKind(expected[1]), package=index.packages[("7zip", wanted)], name="7zip",
            version=wanted, previous_version=previous, revision=index.revisions["install-7zip"], rerun=0,
            attempt=1, timeout_seconds=600)


@pytest.mark.parametrize(("job_version", "installed", "expected", "version"), [
    (None, "1.2", ("Pending", "uninstall", ""), "1.2"),
    (None, None, ("Succeeded", None, ""), None),
    ("1.2", "1.2", ("Pending", "uninstall", ""), "1.2"),
    ("1.2", "1.3", ("Succeeded", None, "legacy-toolbar 1.3 present; this job removes 1.2 only"), None),
])
def test_uninstall_rules(job_version: str | None, installed: str | None,
                         expected: tuple[str, str | None, str], version: str | None) -> None:
    specs = build(pkg("legacy-toolbar", "1.2"), job("remove", "legacy-toolbar", job_version, uninstall=True))
    plan = run(specs, [client("pc-1", installed={"legacy-toolbar": installed} if installed else None)])
    assert states(plan) == {("remove", "pc-1"): expected}
    assert [(a.kind, a.name, a.version, a.previous_version) for a in plan.actions] == \
        ([(ActionKind.UNINSTALL, "legacy-toolbar", version, None)] if version else [])
    if version:
        assert plan.actions[0].package is not None and plan.actions[0].package.version == "1.2"


# -------------------------------------------------------------- dependencies


ADDIN = pkg("office-addin", "2.4", dependsOn=[{"name": "vcredist", "minVersion": "14.30"}])
ADDIN_JOB = job("install-addin", "office-addin", "2.4")
VCREDIST = pkg("vcredist", "14.38")
VCREDIST_JOB = job("install-vcredist", "vcredist", "14.38")


@pytest.mark.parametrize(("installed", "expected"), [
    ({"vcredist": "14.38"}, ("Pending", "install", "")),
    ({"vcredist": "14.30"}, ("Pending", "install", "")),
    ({"vcredist": "14.20"}, ("Skipped", None, "dependency vcredist not provided")),
    ({}, ("Skipped", None, "dependency vcredist not provided")),
])
def test_dependency_without_a_providing_job(installed: dict[str, str],
                                            expected: tuple[str, str | None, str]) -> None:
    specs = build(ADDIN, VCREDIST, ADDIN_JOB)
    assert states(run(specs, [client("pc-1", installed=installed)]))[("install-addin", "pc-1")] == expected


def test_clients_alike_but_for_a_dependency_are_told_apart() -> None:
    specs = build(pkg("report", "1.0", dependsOn=[{"name": "dotnet", "minVersion": "8"}]),
                  job("install-report", "report", "1.0"))
    index = index_relay(specs, "site")
    clients = [client("pc-1", installed={"dotnet": "8.0"}), client("pc-2"), client("pc-3", installed={"dotnet": "6"}),
               client("pc-4", installed={"dotnet": "9"})]
    for _ in range(2):
        assert {r.client: r.state.value for r in plan_relay(index, clients, {}, NOW).rows} == {
            "pc-1": "Pending", "pc-2": "Skipped", "pc-3": "Skipped", "pc-4": "Pending"}


def test_dependent_waits_until_its_dependency_is_installed() -> None:
    # Never in one reply: a dependent must not run when its dependency fails.
    specs = build(ADDIN, VCREDIST, ADDIN_JOB, VCREDIST_JOB)
    plan = run(specs, [client("pc-1", installed={"vcredist": "14.20"})])
    assert [(a.job, a.kind.value) for a in plan.actions] == [("install-vcredist", "upgrade")]
    assert states(plan)[("install-addin", "pc-1")] == ("Pending", None, "waiting for dependency vcredist")
    plan = run(specs, [client("pc-1", installed={"vcredist": "14.38"})])
    assert [(a.job, a.kind.value) for a in plan.actions] == [("install-addin", "install")]


def test_dependent_of_a_failed_dependency_keeps_waiting() -> None:
    specs = build(ADDIN, VCREDIST, ADDIN_JOB, VCREDIST_JOB)
    failed = attempt(specs, "install-vcredist", "pc-1", n=3, version="14.38", at=NOW - timedelta(hours=1))
    plan = run(specs, [client("pc-1")], {("install-vcredist", "pc-1"): failed})
    assert states(plan)[("install-vcredist", "pc-1")][0] == "Failed"
    assert states(plan)[("install-addin", "pc-1")] == ("Pending", None, "waiting for dependency vcredist")
    assert plan.actions == ()


@pytest.mark.parametrize("provider_state", ["in progress", "scheduled", "retry wait", "slot"])
def test_dependent_waits_while_the_provider_is_not_starting(provider_state: str) -> None:
    extra: dict[str, Any] = {}
    if provider_state == "scheduled":
        extra = {"schedule": {"notBefore": "2027-01-01T00:00:00Z"}}
    if provider_state == "slot":  # pc-1 takes the only slot
        extra = {"rollout": {"maxConcurrent": 1}}
    specs = build(ADDIN, VCREDIST, ADDIN_JOB, job("install-vcredist", "vcredist", "14.38", **extra))
    history: dict[tuple[str, str], Attempt] = {}
    if provider_state == "in progress":
        history[("install-vcredist", "pc-2")] = attempt(specs, "install-vcredist", "pc-2",
                                                        outcome=Outcome.DISPATCHED, at=NOW - timedelta(seconds=5))
    if provider_state == "retry wait":
        history[("install-vcredist", "pc-2")] = attempt(specs, "install-vcredist", "pc-2", n=1,
                                                        at=NOW - timedelta(seconds=30))
    plan = run(specs, [client("pc-1"), client("pc-2")], history)
    assert states(plan)[("install-addin", "pc-2")] == ("Pending", None, "waiting for dependency vcredist")
    assert not any(a.client == "pc-2" and a.job == "install-addin" for a in plan.actions)


@pytest.mark.parametrize("provider", [
    job("install-vcredist", "vcredist", "14.20"),  # too old for minVersion 14.30
    job("install-vcredist", "vcredist", "14.38", suspend=True),
    job("install-vcredist", "vcredist", "14.38", schedule={"notAfter": "2026-01-01T00:00:00Z"}),
])
def test_a_provider_that_cannot_deliver_does_not_count(provider: dict[str, Any]) -> None:
    specs = build(ADDIN, VCREDIST, pkg("vcredist", "14.20"), ADDIN_JOB, provider)
    got = states(run(specs, [client("pc-1")]))
    assert got[("install-addin", "pc-1")] == ("Skipped", None, "dependency vcredist not provided")


def test_provider_skipped_by_requirements_does_not_count() -> None:
    specs = build(ADDIN, pkg("vcredist", "14.38", requirements={"os": ["windows"]}), ADDIN_JOB, VCREDIST_JOB)
    got = states(run(specs, [client("pc-1", os="linux")]))
    assert got == {("install-addin", "pc-1"): ("Skipped", None, "dependency vcredist not provided"),
                   ("install-vcredist", "pc-1"): ("Skipped", None, "requires os windows, client has linux")}


def test_dependency_cycle_waits_and_says_so() -> None:
    specs = build(pkg("a", "1", dependsOn=[{"name": "b"}]), pkg("b", "1", dependsOn=[{"name": "a"}]),
                  job("install-a", "a", "1"), job("install-b", "b", "1"))
    assert states(run(specs, [client("pc-1")])) == {
        ("install-a", "pc-1"): ("Pending", None, "waiting for dependency b (dependency cycle)"),
        ("install-b", "pc-1"): ("Pending", None, "waiting for dependency a (dependency cycle)")}
    # with one side installed there is no cycle left to wait on
    plan = run(specs, [client("pc-1", installed={"a": "1"})])
    assert [a.job for a in plan.actions] == ["install-b"]


def test_a_dependency_chain_goes_out_one_link_at_a_time() -> None:
    specs = build(pkg("a", "1", dependsOn=[{"name": "b"}]), pkg("b", "1", dependsOn=[{"name": "c"}]),
                  pkg("c", "1"), job("install-a", "a", "1"), job("install-b", "b", "1"), job("install-c", "c", "1"))
    installed: dict[str, str] = {}
    order = []
    for _ in range(4):
        actions = run(specs, [client("pc-1", installed=installed)]).actions
        order.append([a.job for a in actions])
        installed.update({a.name: a.version or "" for a in actions})
    assert order == [["install-c"], ["install-b"], ["install-a"], []]


def test_a_provider_skipped_on_this_client_does_not_order_the_others() -> None:
    # c-1.0 (needs d) is Skipped here; d's own need of c is met by the c-2.0 job in the same plan
    specs = build(pkg("c", "1.0", requirements={"os": ["linux"]}, dependsOn=[{"name": "d"}]),
                  pkg("c", "2.0"), pkg("d", "1.5", dependsOn=[{"name": "c", "minVersion": "1.5"}]),
                  job("install-c1", "c", "1.0"), job("install-c2", "c", "2.0", to=["pc-1"], clients=True),
                  job("install-d", "d", "1.5"))
    plan = run(specs, [client("pc-1")])
    assert [a.job for a in plan.actions] == ["install-c2"]
    assert states(plan)[("install-d", "pc-1")] == ("Pending", None, "waiting for dependency c")
    plan = run(specs, [client("pc-1", installed={"c": "2.0"})])
    assert [a.job for a in plan.actions] == ["install-d"]


def test_dependency_being_removed_is_not_met() -> None:
    specs = build(ADDIN, VCREDIST, ADDIN_JOB, job("remove-vcredist", "vcredist", uninstall=True))
    got = states(run(specs, [client("pc-1", installed={"vcredist": "14.38"})]))
    assert got[("install-addin", "pc-1")] == ("Skipped", None, "dependency vcredist not provided")


# ------------------------------------------------------------------- history


def test_dispatched_attempt_is_in_progress_and_handed_out_again() -> None:
    specs = build(APP, APP_JOB)
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", outcome=Outcome.DISPATCHED,
                                                at=NOW - timedelta(seconds=30), op="op-abc", version="1.0")}
    plan = run(specs, [client("pc-1")], history)
    index = index_relay(specs, "site")
    assert plan.rows == (Row(job="install-app", relay="site", client="pc-1", state=ClientState.IN_PROGRESS,
                             action=ActionKind.INSTALL, name="app", version="1.0", installed_version=None,
                             attempts=1, message="attempt 1/3 dispatched at 2026-06-01T11:59:30Z",
                             operation_id="op-abc", reason=Reason.IN_PROGRESS),)
    assert plan.actions == (Action(operation_id="op-abc", job="install-app", client="pc-1",
                                   kind=ActionKind.INSTALL, package=index.packages[("app", "1.0")], name="app",
                                   version="1.0", previous_version=None, revision=index.revisions["install-app"],
                                   rerun=0, attempt=1, timeout_seconds=600),)


@pytest.mark.parametrize(("elapsed", "expected"), [
    (600 + RESULT_MARGIN_SECONDS - 1, ("InProgress", "install")),
    (600 + RESULT_MARGIN_SECONDS, ("Pending", None)),  # failed at the deadline, retry waits 60 s
    (600 + RESULT_MARGIN_SECONDS + 60, ("Pending", "install")),  # attempt 2
])
def test_no_result_within_the_timeout_counts_as_a_failed_attempt(elapsed: int,
                                                                 expected: tuple[str, str | None]) -> None:
    specs = build(APP, APP_JOB)
    at = NOW - timedelta(seconds=elapsed)
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", outcome=Outcome.DISPATCHED, at=at)}
    plan = run(specs, [client("pc-1")], history)
    row = plan.rows[0]
    assert (row.state.value, row.action.value if row.action else None) == expected
    if expected == ("Pending", None):
        retry_at = at + timedelta(seconds=660 + 60)
        assert row.message == (f"retry 2/3 at {retry_at.strftime('%Y-%m-%dT%H:%M:%SZ')}; "
                               "last attempt: no result from client within 660 s")
    if expected == ("Pending", "install"):
        assert plan.actions[0].attempt == 2


def test_timeout_uses_the_packages_installer_timeout() -> None:
    specs = build(pkg("app", "1.0", installer={"type": "command", "install": ["x"], "uninstall": ["y"],
                                               "timeoutSeconds": 100}), job("install-app", "app", "1.0",
                                                                            retry={"limit": 1}))
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", outcome=Outcome.DISPATCHED,
                                                at=NOW - timedelta(seconds=160))}
    assert states(run(specs, [client("pc-1")], history)) == {
        ("install-app", "pc-1"): ("Failed", None, "no result from client within 160 s")}


@pytest.mark.parametrize(("n", "since_failure", "expected"), [
    (1, 59, ("Pending", None, "retry 2/3 at {t60}; last attempt: exit code 1")),
    (1, 60, ("Pending", "install", "retry 2/3")),
    (2, 119, ("Pending", None, "retry 3/3 at {t120}; last attempt: exit code 1")),
    (2, 120, ("Pending", "install", "retry 3/3")),
    (3, 10_000, ("Failed", None, "exit code 1")),
])
def test_retry_backoff_doubles_then_fails(n: int, since_failure: int,
                                          expected: tuple[str, str | None, str]) -> None:
    specs = build(APP, APP_JOB)
    finished = NOW - timedelta(seconds=since_failure)
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", n=n, at=finished,
                                                finished=finished)}
    plan = run(specs, [client("pc-1")], history)
    fmt = {"t60": (finished + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "t120": (finished + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    state, action, message = expected
    assert states(plan) == {("install-app", "pc-1"): (state, action, message.format(**fmt))}
    assert plan.rows[0].attempts == n
    if action:
        assert plan.actions[0].attempt == n + 1
        assert plan.rows[0].operation_id == plan.actions[0].operation_id != f"op-install-app-pc-1-{n}"
    else:
        assert plan.rows[0].operation_id == f"op-install-app-pc-1-{n}"


def test_retry_limit_zero_means_one_attempt() -> None:
    specs = build(APP, job("install-app", "app", "1.0", retry={"limit": 0}))
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", n=1, message="bad")}
    assert states(run(specs, [client("pc-1")], history)) == {("install-app", "pc-1"): ("Failed", None, "bad")}


@pytest.mark.parametrize(("recorded", "installed", "expected"), [
    # Failed at the limit under rerun 0: reset, attempt 1 again
    ({"n": 3, "outcome": Outcome.FAILED}, None, ("Pending", "install", "rerun 1: attempt 1/3")),
    # succeeded: untouched
    ({"n": 2, "outcome": Outcome.SUCCEEDED}, "1.0", ("Succeeded", None, "")),
    # in progress: untouched, the same operation
    ({"n": 3, "outcome": Outcome.DISPATCHED, "at": NOW - timedelta(seconds=5)}, None,
     ("InProgress", "install", "attempt 3/3 dispatched at 2026-06-01T11:59:55Z")),
    # still retrying: not a Failed row, keeps its schedule
    ({"n": 1, "outcome": Outcome.FAILED, "at": NOW - timedelta(seconds=10), "message": ""}, None,
     ("Pending", None, "retry 2/3 at 2026-06-01T12:00:50Z")),
    # already re-run under rerun 1 and failed again: Failed until the next raise
    ({"n": 3, "outcome": Outcome.FAILED, "rerun": 1}, None, ("Failed", None, "exit code 1")),
])
def test_rerun_resets_only_failed_rows(recorded: dict[str, Any], installed: str | None,
                                       expected: tuple[str, str | None, str]) -> None:
    specs = build(APP, job("install-app", "app", "1.0", rerun=1))
    fields = {"at": NOW - timedelta(hours=1), **recorded}
    if fields["outcome"] is Outcome.FAILED and "at" in recorded:
        fields["finished"] = fields["at"]
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", **fields)}
    plan = run(specs, [client("pc-1", installed={"app": installed} if installed else None)], history)
    assert states(plan) == {("install-app", "pc-1"): expected}
    if expected[0] == "Pending" and expected[1]:
        assert (plan.actions[0].attempt, plan.actions[0].rerun) == (1, 1)


def test_a_refused_action_fails_at_once_and_only_a_rerun_sends_it_again() -> None:
    """The client refused it as not covered by HQ's signed manifest: nothing ran, retrying cannot help."""
    specs = build(APP, APP_JOB)
    refused = attempt(specs, "install-app", "pc-1", n=1, outcome=Outcome.REFUSED, at=NOW - timedelta(days=2),
                      message="security: the manifest is not signed by a trusted key")
    plan = run(specs, [client("pc-1")], {("install-app", "pc-1"): refused})
    [row] = plan.rows
    assert (row.state.value, row.reason, plan.actions) == ("Failed", Reason.SECURITY_ERROR, ())
    assert row.message == "refused by the client: security: the manifest is not signed by a trusted key"
    rerun = build(APP, job("install-app", "app", "1.0", rerun=1))
    again = run(rerun, [client("pc-1")], {("install-app", "pc-1"): refused})
    assert states(again) == {("install-app", "pc-1"): ("Pending", "install", "rerun 1: attempt 1/3")}


def test_a_download_the_client_could_not_make_uses_no_attempt() -> None:
    """A client that could not fetch the artifact did not attempt the install: same attempt, later."""
    specs = build(APP, APP_JOB)
    failed_at = NOW - timedelta(seconds=20)
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", n=2, outcome=Outcome.NOT_ATTEMPTED,
                                                at=failed_at, finished=failed_at, message="relay unreachable",
                                                op="op-blip")}
    waiting = run(specs, [client("pc-1")], history)
    row = waiting.rows[0]
    assert (row.state.value, row.reason, row.attempts) == ("Pending", Reason.DOWNLOAD_RETRY, 1)
    assert row.message == "attempt 2/3 again at 2026-06-01T12:00:40Z; not attempted: relay unreachable"
    assert waiting.actions == ()
    later = run(specs, [client("pc-1")], history, now=failed_at + timedelta(seconds=DOWNLOAD_RETRY_SECONDS))
    assert [(a.attempt, a.operation_id != "op-blip") for a in later.actions] == [(2, True)]
    assert (later.rows[0].reason, later.rows[0].attempts) == (Reason.QUEUED, 1)
    # at the limit: still not Failed, since the last attempt never ran
    history[("install-app", "pc-1")] = attempt(specs, "install-app", "pc-1", n=3, outcome=Outcome.NOT_ATTEMPTED,
                                               at=failed_at, finished=failed_at, op="op-blip-3")
    assert run(specs, [client("pc-1")], history).rows[0].state.value == "Pending"
    # the retries double: the fifth in a row waits 16 minutes
    fifth = replace(history[("install-app", "pc-1")], deferrals=4)
    assert run(specs, [client("pc-1")], {("install-app", "pc-1"): fifth}).rows[0].message.startswith(
        "attempt 3/3 again at 2026-06-01T12:15:40Z")
    # and after MAX_DEFERRALS returns in a row the attempt counts: here the last one, so Failed
    last = replace(history[("install-app", "pc-1")], deferrals=MAX_DEFERRALS - 1, message="HTTP 404")
    row = run(specs, [client("pc-1")], {("install-app", "pc-1"): last}).rows[0]
    assert (row.state.value, row.reason, row.attempts) == ("Failed", Reason.FAILED, 3)
    assert row.message == f"artifact not downloaded in {MAX_DEFERRALS} tries: HTTP 404"


def test_rerun_is_not_a_new_revision() -> None:
    before = build(APP, APP_JOB)
    after = build(APP, job("install-app", "app", "1.0", rerun=5, suspend=False))
    assert index_relay(before, "site").revisions == index_relay(after, "site").revisions


def test_drift_is_planned_again_with_a_fresh_operation() -> None:
    specs = build(APP, APP_JOB)
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", n=1, outcome=Outcome.SUCCEEDED,
                                                op="op-first")}
    healthy = run(specs, [client("pc-1", installed={"app": "1.0"})], history)
    assert states(healthy) == {("install-app", "pc-1"): ("Succeeded", None, "")}
    assert healthy.rows[0].attempts == 1  # the attempts of the operation that made it Succeeded
    for installed, message in ((None, "drift: client reports app missing"),
                               ({"app": "0.9"}, "drift: client reports app 0.9")):
        drifted = run(specs, [client("pc-1", installed=installed)], history)
        assert states(drifted) == {("install-app", "pc-1"): ("Pending", "install" if not installed else "upgrade",
                                                             message)}
        [action] = drifted.actions
        assert action.attempt == 1
        assert action.operation_id not in ("op-first", run(specs, [client("pc-1")]).actions[0].operation_id)


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.DISPATCHED])
def test_a_changed_spec_pre_empts_the_old_revisions_attempts(outcome: Outcome) -> None:
    old = build(APP, APP_JOB)
    new = build(APP, job("install-app", "app", "1.0", retry={"limit": 5}))
    assert index_relay(old, "site").revisions != index_relay(new, "site").revisions
    recorded = attempt(old, "install-app", "pc-1", n=3, outcome=outcome, at=NOW - timedelta(seconds=5))
    history = {("install-app", "pc-1"): recorded}
    assert states(run(old, [client("pc-1")], history))[("install-app", "pc-1")][0] in ("Failed", "InProgress")
    plan = run(new, [client("pc-1")], history)
    assert states(plan) == {("install-app", "pc-1"): ("Pending", "install", "")}
    assert (plan.actions[0].attempt, plan.rows[0].attempts) == (1, 0)
    assert plan.actions[0].operation_id != recorded.operation_id


def test_a_changed_package_is_a_new_plan_revision() -> None:
    specs = build(APP, APP_JOB)
    changed = replace(specs, packages=tuple(replace(p, revision="other") for p in specs.packages))
    job_spec = specs.jobs[0]
    assert index_relay(specs, "site").revisions["install-app"] == plan_revision(job_spec, specs.packages[0])
    assert index_relay(changed, "site").revisions["install-app"] != index_relay(specs, "site").revisions["install-app"]


# ------------------------------------------------------------------- rollout


def fleet(count: int, **kw: Any) -> list[Client]:
    return [client(f"pc-{k}", **kw) for k in range(1, count + 1)]


def test_max_concurrent_allocates_slots_in_client_order() -> None:
    specs = build(APP, job("install-app", "app", "1.0", rollout={"maxConcurrent": 2}))
    plan = run(specs, list(reversed(fleet(4))))
    assert [(r.client, r.action.value if r.action else None, r.message) for r in plan.rows] == [
        ("pc-1", "install", ""), ("pc-2", "install", ""),
        ("pc-3", None, "waiting for a rollout slot (maxConcurrent 2)"),
        ("pc-4", None, "waiting for a rollout slot (maxConcurrent 2)")]


@pytest.mark.parametrize(("online", "started"), [(True, ["pc-2"]), (False, ["pc-2", "pc-3"])])
def test_only_online_clients_hold_slots(online: bool, started: list[str]) -> None:
    specs = build(APP, job("install-app", "app", "1.0", rollout={"maxConcurrent": 2}))
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", outcome=Outcome.DISPATCHED,
                                                at=NOW - timedelta(seconds=5), op="op-running")}
    clients = [client("pc-1", online=online), *fleet(4)[1:]]
    plan = run(specs, clients, history)
    assert [a.client for a in plan.actions if a.operation_id != "op-running"] == started


def test_an_offline_clients_new_start_takes_no_slot() -> None:
    specs = build(APP, job("install-app", "app", "1.0", rollout={"maxConcurrent": 1}))
    plan = run(specs, [client("pc-1", online=False), client("pc-2"), client("pc-3")])
    assert [(r.client, r.action is not None) for r in plan.rows] == [("pc-1", True), ("pc-2", True),
                                                                     ("pc-3", False)]


def failed_history(specs: Specs, clients: Sequence[str]) -> dict[tuple[str, str], Attempt]:
    return {("install-app", c): attempt(specs, "install-app", c, n=3) for c in clients}


@pytest.mark.parametrize(("max_failures", "failed", "fresh", "skipped", "halted", "message"), [
    (1, 1, 3, 0, False, ""),
    (1, 2, 2, 0, True, "rollout halted: 2 failed, more than maxFailures 1"),
    (0, 1, 3, 0, True, "rollout halted: 1 failed, more than maxFailures 0"),
    ("50%", 2, 2, 0, False, ""),  # 2 of 4 is not more than half
    ("50%", 3, 1, 0, True, "rollout halted: 3 of 4 failed, more than maxFailures 50%"),
    ("50%", 2, 1, 2, True, "rollout halted: 2 of 3 failed, more than maxFailures 50%"),  # Skipped rows don't count
])
def test_max_failures_halts_new_starts(max_failures: int | str, failed: int, fresh: int, skipped: int,
                                       halted: bool, message: str) -> None:
    specs = build(pkg("app", "1.0", requirements={"os": ["windows"]}),
                  job("install-app", "app", "1.0", rollout={"maxFailures": max_failures}))
    failing = [f"pc-f{k}" for k in range(failed)]
    clients = ([client(c) for c in failing] + [client(f"pc-n{k}") for k in range(fresh)]
               + [client(f"pc-s{k}", os="linux") for k in range(skipped)])
    plan = run(specs, clients, failed_history(specs, failing))
    waiting = [r for r in plan.rows if r.client.startswith("pc-n")]
    assert len(waiting) == fresh
    assert all((r.action is None) == halted for r in waiting)
    assert all(r.message == message for r in waiting)
    assert plan.jobs[0].state is (JobState.HALTED if halted else JobState.IN_PROGRESS)
    assert plan.jobs[0].counts["Failed"] == failed


def test_raising_rerun_lifts_the_halt() -> None:
    halted = build(APP, job("install-app", "app", "1.0", rollout={"maxFailures": 0}))
    history = failed_history(halted, ["pc-1"])
    assert run(halted, fleet(3), history).jobs[0].state is JobState.HALTED
    rerun = build(APP, job("install-app", "app", "1.0", rollout={"maxFailures": 0}, rerun=1))
    plan = run(rerun, fleet(3), history)
    assert plan.jobs[0].state is JobState.IN_PROGRESS
    assert [a.client for a in plan.actions] == ["pc-1", "pc-2", "pc-3"]


def test_plan_client_uses_the_relays_counters() -> None:
    specs = build(APP, job("install-app", "app", "1.0", rollout={"maxConcurrent": 2, "maxFailures": "10%"}))
    index = index_relay(specs, "site")
    free = plan_client(index, client("pc-1"), {}, {"install-app": RolloutUsage(1, 0, 10)}, NOW)
    assert [(r.state, r.action) for r in free.rows] == [(ClientState.IN_PROGRESS, ActionKind.INSTALL)]
    assert len(free.actions) == 1
    full = plan_client(index, client("pc-1"), {}, {"install-app": RolloutUsage(2, 0, 10)}, NOW)
    assert [(r.state, r.message) for r in full.rows] == [
        (ClientState.PENDING, "waiting for a rollout slot (maxConcurrent 2)")]
    halted = plan_client(index, client("pc-1"), {}, {"install-app": RolloutUsage(0, 2, 10)}, NOW)
    assert [(r.state, r.message) for r in halted.rows] == [
        (ClientState.PENDING, "rollout halted: 2 of 10 failed, more than maxFailures 10%")]
    assert full.actions == halted.actions == ()


def test_plan_client_agrees_with_plan_relay() -> None:
    specs = build(ADDIN, VCREDIST, APP, pkg("toolbar", "1"), ADDIN_JOB, VCREDIST_JOB, APP_JOB,
                  job("remove-toolbar", "toolbar", uninstall=True))
    c = client("pc-1", installed={"toolbar": "1", "app": "0.9"})
    history = {("install-app", "pc-1"): attempt(specs, "install-app", "pc-1", n=1,
                                                at=NOW - timedelta(hours=2))}
    relay_plan = run(specs, [c], history)
    client_plan = plan_client(index_relay(specs, "site"), c, history, {}, NOW)
    assert client_plan.actions == relay_plan.actions
    assert client_plan.rows == tuple(
        r._replace(state=ClientState.IN_PROGRESS, reason=Reason.IN_PROGRESS) if r.action is not None else r
        for r in relay_plan.rows)


# --------------------------------------------------------------- action order


def test_actions_of_a_client_run_uninstalls_then_installs_by_name() -> None:
    specs = build(ADDIN, VCREDIST, APP, pkg("zz", "1"), pkg("toolbar", "2"), pkg("old", "1"), ADDIN_JOB, VCREDIST_JOB, APP_JOB,
                  job("a-install-zz", "zz", "1"), job("z-remove-toolbar", "toolbar", uninstall=True),
                  job("m-remove-old", "old", uninstall=True))
    plan = run(specs, [client("pc-1", installed={"toolbar": "2", "old": "1"})])
    assert [a.job for a in plan.actions] == ["m-remove-old", "z-remove-toolbar", "a-install-zz",
                                            "install-app", "install-vcredist"]


# -------------------------------------------------------------------- rollup


def row(state: ClientState, n: int = 0) -> Row:
    return Row(job="j", relay="r", client=f"pc-{n}", state=state, action=None, name="app", version="1",
               installed_version=None, attempts=0, message="")


S = ClientState


@pytest.mark.parametrize(("states_", "kwargs", "expected"), [
    ([], {}, JobState.NO_TARGETS),
    ([], {"suspended": True}, JobState.SUSPENDED),
    ([S.SUSPENDED, S.SUSPENDED], {}, JobState.SUSPENDED),
    ([S.SUCCEEDED, S.PENDING], {"suspended": True}, JobState.SUSPENDED),
    ([S.SUCCEEDED, S.PENDING], {}, JobState.IN_PROGRESS),
    ([S.SUCCEEDED, S.IN_PROGRESS, S.FAILED], {}, JobState.IN_PROGRESS),
    ([S.SUCCEEDED, S.FAILED], {}, JobState.FAILED),
    ([S.SUCCEEDED, S.CONFLICT], {}, JobState.FAILED),
    ([S.SUCCEEDED, S.SKIPPED, S.SUSPENDED], {}, JobState.COMPLETED),
    ([S.SKIPPED], {}, JobState.COMPLETED),
    ([S.FAILED, S.PENDING], {"max_failures": 0}, JobState.HALTED),
    ([S.FAILED, S.PENDING], {"max_failures": 1}, JobState.IN_PROGRESS),
    ([S.FAILED, S.PENDING, S.SKIPPED, S.SKIPPED], {"max_failures": "49%"}, JobState.HALTED),
    ([S.FAILED, S.PENDING, S.SKIPPED, S.SKIPPED], {"max_failures": "50%"}, JobState.IN_PROGRESS),
    ([S.FAILED, S.SUCCEEDED], {"max_failures": 0}, JobState.HALTED),
])
def test_rollup_state(states_: list[ClientState], kwargs: dict[str, Any], expected: JobState) -> None:
    result = rollup("j", [row(s, k) for k, s in enumerate(states_)], **kwargs)
    assert result.state is expected
    assert result.counts == {s.value: states_.count(s) for s in ClientState}


def test_plan_rollups_match_rollup_of_the_rows() -> None:
    specs = build(*VPN, APP, job("vpn-a", "vpn-client", "5.1", rollout={"maxFailures": 0}),
                  job("vpn-b", "vpn-client", "5.2"), APP_JOB)
    clients = [client("pc-1"), client("pc-2", installed={"app": "1.0"})]
    plan = run(specs, clients, failed_history(specs, ["pc-2"]))
    expected = []
    for spec_job in specs.jobs:
        rows = [r for r in plan.rows if r.job == spec_job.name]
        expected.append(rollup(spec_job.name, rows, suspended=spec_job.suspend,
                               max_failures=spec_job.max_failures))
    assert plan.jobs == tuple(expected)
    assert set(plan.jobs[0].counts) == {s.value for s in ClientState}


# -------------------------------------------------------------- operation ids


def test_operation_ids_are_deterministic_and_documented() -> None:
    specs = build(APP, APP_JOB)
    index = index_relay(specs, "site")
    first = run(specs, [client("pc-1")])
    assert first == run(specs, [client("pc-1")])
    assert first.actions[0].operation_id == operation_id(
        "install-app", index.revisions["install-app"], 0, "pc-1", "app", "1.0", 1)
    assert first.actions[0].operation_id.startswith("op-") and len(first.actions[0].operation_id) == 27


def test_clients_alike_get_their_own_operation_ids_and_are_counted() -> None:
    # Clients of one shape without history are planned once and replayed for the others
    # (with rollout slots for three of them): the replay gives each its own ids and rows.
    specs = build(APP, pkg("tool", "2.0"), APP_JOB,
                  job("install-tool", "tool", "2.0", rollout={"maxConcurrent": 3}))
    index = index_relay(specs, "site")
    clients = [client(f"pc-{n}") for n in range(6)]
    plan = run(specs, clients)
    assert [(a.job, a.client) for a in plan.actions] == [
        (name, f"pc-{n}") for n in range(6) for name in ("install-app", "install-tool")
        if name == "install-app" or n < 3]
    for a in plan.actions:
        assert a.operation_id == operation_id(a.job, index.revisions[a.job], 0, a.client, a.name, a.version, 1)
    ops = {(a.job, a.client): a.operation_id for a in plan.actions}
    assert {(r.job, r.client): r.operation_id for r in plan.rows} == {
        (name, f"pc-{n}"): ops.get((name, f"pc-{n}")) for name in ("install-app", "install-tool") for n in range(6)}
    assert [(r.state.value, r.message) for r in plan.rows if r.job == "install-tool"][2:4] == [
        ("Pending", ""), ("Pending", "waiting for a rollout slot (maxConcurrent 3)")]
    assert [(j.job, j.counts["Pending"]) for j in plan.jobs] == [("install-app", 6), ("install-tool", 6)]
    assert plan == run(specs, list(reversed(clients)))


@pytest.mark.parametrize("change", [
    {"job": "other"}, {"revision": "r2"}, {"rerun": 1}, {"client": "pc-2"}, {"name": "app2"},
    {"version": "2.0"}, {"attempt": 2}, {"previous": "op-x"},
])
def test_operation_ids_differ_when_any_input_differs(change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"job": "j", "revision": "r1", "rerun": 0, "client": "pc-1", "name": "app",
                            "version": "1.0", "attempt": 1, "previous": ""}
    assert operation_id(**base) != operation_id(**{**base, **change})


def test_plans_are_equal_values() -> None:
    specs = build(ADDIN, VCREDIST, ADDIN_JOB, VCREDIST_JOB)
    clients = [client("pc-2"), client("pc-1", installed={"vcredist": "14.38"})]
    assert run(specs, clients) == run(specs, list(reversed(clients)))
    assert hash(run(specs, clients).rows) == hash(run(specs, clients).rows)
