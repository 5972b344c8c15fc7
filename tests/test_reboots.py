"""Reboots: "succeeded, reboot required" rows, their counts, the boot id that clears them, and the reboot policy.

Real parts throughout: specs through the real loader, both planners (the
engine and the rules it is checked against), a real SQLite relay store in a
temp dir, the real status renderers and parsers, and the agent's verifier
with throw-away signing keys. The end-to-end case is ``test_e2e_reboot.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from test_plan_rules import build, job, pkg
from test_signing import DOCUMENTS, JOB, PACKAGE, RELAY_URL, action, manifest, reply

from reconciler import protocol, report, specs, web
from reconciler.agent.agent import AgentConfigError, reboot_command_of
from reconciler.agent.reboot import (
    RebootGate,
    default_reboot_command,
    read_boot_id,
    reboot_argv,
)
from reconciler.agent.verify import Verifier
from reconciler.hq import Hq, hq_metrics
from reconciler.plan import (
    REBOOT_MESSAGE,
    ActionKind,
    Attempt,
    Client,
    ClientState,
    Installed,
    Outcome,
    Reason,
    index_relay,
    plan_client,
    plan_relay,
)
from reconciler.plan.rules import plan_client_by_rules, plan_relay_by_rules
from reconciler.relay.store import Store
from reconciler.signing import sign

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


# ------------------------------------------------------------------ protocol


def test_boot_id_is_a_fact_and_a_result_field() -> None:
    body = protocol.check_checkin({"facts": {"bootId": "0b5c2a9e-1d7f-4c33-9a41-6f0e0c1b2d3e"}, "inventory": [],
                                   "results": [{"operationId": "op-1", "status": "succeeded",
                                                "rebootRequired": True, "bootId": "2026-11-30T08:00:00Z"}]})
    assert body["facts"] == {"bootId": "0b5c2a9e-1d7f-4c33-9a41-6f0e0c1b2d3e"}
    assert body.get("results", [])[0]["bootId"] == "2026-11-30T08:00:00Z"
    _, problems = protocol.checkin_problems({"facts": {"bootId": "x" * 65}, "inventory": [],
                                             "results": [{"operationId": "op-1", "status": "succeeded",
                                                          "bootId": "../etc"}]})
    assert [p.where for p in problems] == ["facts.bootId", "results[0].bootId"]
    assert protocol.fact_problem("bootId", 7) == "fact bootId: expected a string, got an integer"


# ------------------------------------------------------------------ both planners

SPECS = build(pkg("tool", "1.0", reboot="ifRequired"), pkg("tool", "2.0"), job("install-tool", "tool", "1.0"))


def _history(*, reboot: bool, outcome: Outcome = Outcome.SUCCEEDED, version: str = "1.0",
             revision: str | None = None) -> dict[tuple[str, str], Attempt]:
    index = index_relay(SPECS, "site")
    attempt = Attempt(operation_id="op-1", job="install-tool", client="pc-1",
                      revision=revision or index.revisions["install-tool"], rerun=0, attempt=1,
                      action=ActionKind.INSTALL, version=version, outcome=outcome,
                      dispatched_at=NOW - timedelta(minutes=5), finished_at=NOW - timedelta(minutes=4),
                      reboot_pending=reboot)
    return {("install-tool", "pc-1"): attempt}


def _all_planners(specs: specs.Specs, client: Client, history: Any) -> list[Any]:
    """The row of install-tool on pc-1 from the engine and the rules, for a full pass and a check-in."""
    index = index_relay(specs, "site")
    rows = [plan_relay(index, [client], history, NOW).rows, plan_relay_by_rules(index, [client], history, NOW).rows,
            plan_client(index, client, history, {}, NOW).rows,
            plan_client_by_rules(index, client, history, {}, NOW).rows]
    return [next(r for r in found if r.job == "install-tool") for found in rows]


INSTALLED = Client("pc-1", "site", installed=(Installed("tool", "1.0"),))


def test_a_reboot_pending_success_is_succeeded_reboot_required_in_both_planners() -> None:
    rows = _all_planners(SPECS, INSTALLED, _history(reboot=True))
    assert {(r.state, r.reason, r.message, r.attempts) for r in rows} == {
        (ClientState.SUCCEEDED, Reason.REBOOT_REQUIRED, REBOOT_MESSAGE, 1)}
    cleared = _all_planners(SPECS, INSTALLED, _history(reboot=False))
    assert {(r.state, r.reason, r.message) for r in cleared} == {(ClientState.SUCCEEDED, Reason.DONE, "")}


def test_many_clients_one_waiting_only_that_one_says_so() -> None:
    """The engine shares rows between clients of one shape: a reboot of one never shows on another."""
    index = index_relay(SPECS, "site")
    clients = [replace(INSTALLED, id=f"pc-{n}") for n in range(1, 6)]
    history = _history(reboot=True)
    for plan in (plan_relay(index, clients, history, NOW), plan_relay_by_rules(index, clients, history, NOW)):
        assert {r.client: r.reason for r in plan.rows} == {
            "pc-1": Reason.REBOOT_REQUIRED, **{f"pc-{n}": Reason.DONE for n in range(2, 6)}}


def test_the_reboot_is_superseded_by_drift_a_new_version_or_a_failure() -> None:
    # The package was removed meanwhile: the row is an install again, not a reboot.
    rows = _all_planners(SPECS, replace(INSTALLED, installed=()), _history(reboot=True))
    assert {(r.state, r.reason) for r in rows} <= {(ClientState.PENDING, Reason.QUEUED),
                                                  (ClientState.IN_PROGRESS, Reason.IN_PROGRESS)}
    # The job moved on to 2.0: the upgrade starts, whatever 1.0's installer asked for.
    upgraded = build(pkg("tool", "1.0", reboot="ifRequired"), pkg("tool", "2.0"), job("install-tool", "tool", "2.0"))
    rows = _all_planners(upgraded, INSTALLED, _history(reboot=True, revision="older"))
    assert {r.action for r in rows} == {ActionKind.UPGRADE}
    # A flag on anything but a success never shows (the relay records it only for successes anyway).
    rows = _all_planners(SPECS, INSTALLED, _history(reboot=True, outcome=Outcome.FAILED))
    assert {r.reason for r in rows} == {Reason.DONE}


# ------------------------------------------------------------------ relay store


def _dispatched(store: Store, operation: str = "op-1", client: str = "pc-1") -> None:
    with store.write() as db:
        store.register(db, client, NOW)
        store.record_dispatch(db, Attempt(operation_id=operation, job="install-tool", client=client, revision="r",
                                          rerun=0, attempt=1, action=ActionKind.INSTALL, version="1.0",
                                          outcome=Outcome.DISPATCHED, dispatched_at=NOW))


def _succeeded(reboot: bool = True, boot: str | None = "boot-a") -> dict[str, Any]:
    result: dict[str, Any] = {"operationId": "op-1", "status": "succeeded", "exitCode": 3010, "message": ""}
    if reboot:
        result["rebootRequired"] = True
    if boot is not None:
        result["bootId"] = boot
    return result


def test_store_waits_from_the_results_boot_id_until_another_is_reported(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _dispatched(store)
    later = NOW + timedelta(minutes=1)
    with store.write() as db:
        store.record_results(db, "pc-1", [_succeeded()], NOW, "boot-a")
        assert store.clear_reboots(db, "pc-1", "boot-a", NOW) == 0
    assert store.history_of("pc-1")[("install-tool", "pc-1")].reboot_pending is True
    with store.write() as db:
        assert store.clear_reboots(db, "pc-1", "boot-a", later) == 0  # the same boot: still waiting
        assert store.clear_reboots(db, "pc-1", None, later) == 0  # no boot id reported: still waiting
    assert store.history()[("install-tool", "pc-1")].reboot_pending is True
    with store.write() as db:
        assert store.clear_reboots(db, "pc-1", "boot-b", later) == 1
    assert store.history_of("pc-1")[("install-tool", "pc-1")].reboot_pending is False
    [record] = store.reboots_of("pc-1")
    assert (record.operation_id, record.boot_id, record.cleared_at) == ("op-1", "boot-a", later)


def test_store_a_result_from_before_the_reboot_clears_at_once(tmp_path: Path) -> None:
    """The agent rebooted before the result reached the relay: the result's boot id is not the check-in's."""
    store = Store(tmp_path)
    _dispatched(store)
    with store.write() as db:
        store.record_results(db, "pc-1", [_succeeded(boot="boot-a")], NOW, "boot-b")
        assert store.clear_reboots(db, "pc-1", "boot-b", NOW) == 1
    assert store.history_of("pc-1")[("install-tool", "pc-1")].reboot_pending is False


def test_store_without_a_boot_id_in_the_result_waits_from_the_checkins(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _dispatched(store)
    with store.write() as db:
        store.record_results(db, "pc-1", [_succeeded(boot=None)], NOW, None)  # an agent that reports none
        assert store.clear_reboots(db, "pc-1", "boot-a", NOW) == 0  # the first one heard is where it waits
        assert store.clear_reboots(db, "pc-1", "boot-b", NOW) == 1
    _dispatched(store, "op-2", "pc-2")
    with store.write() as db:
        store.record_results(db, "pc-2", [{**_succeeded(reboot=False), "operationId": "op-2"}], NOW, "boot-a")
    assert store.history_of("pc-2")[("install-tool", "pc-2")].reboot_pending is False
    assert store.reboots_of("pc-2") == []


# ------------------------------------------------------------------ counts


def _status_files(reboots: int) -> tuple[report.RelayStatus, dict[str, bytes]]:
    index = index_relay(SPECS, "site")
    clients = [replace(INSTALLED, id=f"pc-{n}") for n in range(1, 5)]
    history = {(job_, f"pc-{n}"): replace(attempt, client=f"pc-{n}", operation_id=f"op-{n}",
                                          reboot_pending=n <= reboots)
               for n in range(1, 5) for (job_, _), attempt in _history(reboot=True).items()}
    plan = plan_relay(index, clients, history, NOW)
    files = report.render_relay_status("site", "c" * 40, plan, {}, [], [])
    return report.parse_relay_status(files), files


def test_relay_status_counts_clients_waiting_for_a_reboot() -> None:
    status, files = _status_files(3)
    assert status.jobs["install-tool"].reboot_required == 3
    assert status.jobs["install-tool"].counts[ClientState.SUCCEEDED.value] == 4
    _, job_file = report.parse_relay_job(files["relays/site/jobs/install-tool.yaml"])
    assert job_file.reboot_required == 3
    assert sum(r.reason == Reason.REBOOT_REQUIRED.value for r in job_file.rows) == 3
    cleared, cleared_files = _status_files(0)
    assert cleared.jobs["install-tool"].reboot_required == 0
    assert b"rebootRequired" not in cleared_files["relays/site/relay.yaml"]  # absent when none: stable bytes


def test_hq_aggregates_the_count_into_the_job_report_and_summary() -> None:
    status, _ = _status_files(2)
    accepted = report.Accepted("c" * 40, NOW, "c" * 40, True)
    hq = report.aggregate(SPECS, accepted, "main", (), {"site": status})
    [job_report] = [j for j in hq.jobs if j.job == "install-tool"]
    assert job_report.reboot_required == 2
    assert {d.relay: d.reboot_required for d in job_report.relays} == {"region": 2}
    files = report.render_hq_status(hq)
    parsed = report.parse_job_report(files["jobs/install-tool.yaml"])
    assert (parsed.reboot_required, [d.reboot_required for d in parsed.relays]) == (2, [2])
    summary = report.render_summary(hq)
    assert "| 4 (2 waiting for a reboot) |" in summary


# ------------------------------------------------------------------ the signed reboot policy


def _with_reboot(documents: dict[str, str], where: str | None) -> dict[str, str]:
    out = dict(documents)
    if where == "package":
        out["packages/tool-1.0.yaml"] = PACKAGE + "  reboot: ifRequired\n"
    elif where == "job":
        out["jobs/install-tool.yaml"] = JOB + "  reboot: ifRequired\n"
    return out


@pytest.mark.parametrize("signed", [None, "package", "job"])
def test_the_verifier_refuses_a_reboot_the_signed_documents_do_not_allow(tmp_path: Path, signed: str | None) -> None:
    key = Ed25519PrivateKey.generate()
    documents = _with_reboot(DOCUMENTS, signed)
    envelope = sign(manifest(1, documents=documents), [key])
    verifier = Verifier([key.public_key()], tmp_path, "pc-1")
    asked = {**action(), "reboot": "ifRequired"}

    def refusals(act: dict[str, Any]) -> dict[int, str]:
        sent = reply(envelope, act)
        sent["documents"] = dict(documents)
        return verifier.refusals(sent, RELAY_URL)

    assert refusals(action()) == {}  # never (absent) asks for less than any policy allows
    if signed is None:
        assert refusals(asked) == {0: "the action says reboot ifRequired; job install-tool and its package say never"}
    else:
        assert refusals(asked) == {}
    assert "is not one of never, ifRequired" in refusals({**action(), "reboot": "always"})[0]


def test_a_jobs_reboot_overrides_its_packages() -> None:
    both = build(pkg("tool", "1.0", reboot="ifRequired"), job("a", "tool", "1.0", reboot="never"),
                 job("b", "tool", "1.0"), job("c", "tool", "1.0", reboot="ifRequired"))
    package = both.packages[0]
    assert {j.name: specs.reboot_policy(j, package) for j in both.jobs} == {
        "a": "never", "b": "ifRequired", "c": "ifRequired"}
    plain = replace(package, reboot=None)
    assert {j.name: specs.reboot_policy(j, plain) for j in both.jobs} == {"a": "never", "b": "never",
                                                                          "c": "ifRequired"}


def test_a_reboot_value_outside_the_vocabulary_is_a_spec_error() -> None:
    with pytest.raises(AssertionError, match="reboot"):
        build(pkg("tool", "1.0", reboot="always"))


# ------------------------------------------------------------------ agent side


def test_reboot_command_options() -> None:
    def of(**given: Any) -> list[str]:
        return reboot_command_of(argparse.Namespace(**{"no_reboot": False, "reboot_command": None, **given}))

    assert of() == default_reboot_command()
    assert of(reboot_command="") == []
    assert of(no_reboot=True, reboot_command="/sbin/reboot") == []
    assert of(reboot_command="shutdown -r +5 'reconciler: {packages}'") == ["shutdown", "-r", "+5",
                                                                            "reconciler: {packages}"]
    with pytest.raises(AgentConfigError, match="--reboot-command"):
        of(reboot_command="shutdown 'unclosed")
    assert reboot_argv(default_reboot_command("windows"), ["a", "b"])[-1] == "reconciler: reboot required by a, b"
    assert default_reboot_command("linux")[:3] == ["shutdown", "-r", "+1"]
    many = reboot_argv(default_reboot_command("windows"), [f"package-{n:03}" for n in range(100)])
    assert len(many[-1]) < 512 and many[-1].endswith("…")


def test_reboot_gate_runs_once_per_boot(tmp_path: Path) -> None:
    gate = RebootGate(tmp_path)
    assert not gate.ran_in("boot-a")
    gate.record("boot-a", ["tool"], NOW)
    assert gate.ran_in("boot-a") and not gate.ran_in("boot-b")
    assert RebootGate(tmp_path).ran_in("boot-a")  # kept across agent restarts
    fresh = RebootGate(tmp_path / "other")
    assert not fresh.ran_in(None)
    fresh.record(None, ["tool"], NOW)
    assert fresh.ran_in(None)


def test_boot_id_of_this_machine_is_a_valid_fact() -> None:
    boot = read_boot_id()
    if boot is None:
        pytest.skip("this machine has no readable boot id")
    assert protocol.fact_problem("bootId", boot) is None
    assert read_boot_id() == boot  # stable within one boot
    assert read_boot_id("plan9") is None


def test_the_web_job_page_links_the_waiting_clients_and_filters_on_the_reason() -> None:
    status, files = _status_files(2)
    hq = report.aggregate(SPECS, report.Accepted("c" * 40, NOW, "c" * 40, True), "main", (), {"site": status})
    _, job_file = report.parse_relay_job(files["relays/site/jobs/install-tool.yaml"])
    rows = [("site", row) for row in job_file.rows]
    snapshot = web.Snapshot(report=hq)
    page = web.render_job(snapshot, "install-tool", rows, web.RowFilter(reason="rebootRequired"))
    assert page is not None
    assert '<a href="/ui/jobs/install-tool?reason=rebootRequired">2 waiting for a reboot</a>' in page
    assert "2 matching clients" in page
    assert '<option value="rebootRequired" selected>' in page
    plain = web.render_job(web.Snapshot(report=report.aggregate(SPECS, report.Accepted("c" * 40, NOW, "c" * 40, True),
                                                                "main", (), {"site": _status_files(0)[0]})),
                           "install-tool", rows, web.RowFilter())
    assert plain is not None and 'id="reboots"' not in plain


def test_hq_metrics_count_the_clients_waiting_per_job() -> None:
    status, _ = _status_files(3)
    hq = report.aggregate(SPECS, report.Accepted("c" * 40, NOW, "c" * 40, True), "main", (), {"site": status})
    metrics = hq_metrics(cast(Hq, SimpleNamespace(last_report=hq, store=SimpleNamespace())))
    samples = {s.labels["job"]: s.value for family in text_string_to_metric_families(metrics.render().decode())
               for s in family.samples if s.name == "reconciler_reboots_pending"}
    assert samples == {"install-tool": 3}


@pytest.mark.parametrize(("job_reboot", "package_reboot", "refused"), [
    ("", "", True), ("  reboot: ifRequired\n", "", False), ("", "  reboot: ifRequired\n", False),
    ("  reboot: never\n", "  reboot: ifRequired\n", True)])
def test_an_uninstall_may_reboot_only_as_its_signed_job_or_package_says(
        tmp_path: Path, job_reboot: str, package_reboot: str, refused: bool) -> None:
    uninstall = JOB.replace("install-tool", "remove-tool").replace("jobType: install", "jobType: uninstall")
    documents = {"jobs/remove-tool.yaml": uninstall + job_reboot, "packages/tool-1.0.yaml": PACKAGE + package_reboot}
    key = Ed25519PrivateKey.generate()
    envelope = sign(manifest(1, documents=documents), [key])
    act = {"operationId": "op-1", "job": "remove-tool", "action": "uninstall",
           "package": {"name": "tool", "version": "1.0"}, "previousVersion": None, "artifact": None,
           "installer": None, "reboot": "ifRequired",
           "documents": {"job": "jobs/remove-tool.yaml", "package": "packages/tool-1.0.yaml"}}
    sent = {**reply(envelope, act), "documents": documents}
    found = Verifier([key.public_key()], tmp_path, "pc-1").refusals(sent, RELAY_URL)
    assert (found != {}) == refused, found
    if refused:
        assert "the action says reboot ifRequired; job remove-tool and its package say never" in found[0]
