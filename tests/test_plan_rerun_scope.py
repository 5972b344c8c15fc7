"""Reruns narrowed by ``spec.rerunScope``, and repairs: scenarios with history, and a rollout simulated round by round.

Each ``tests/scenarios/rerun/<case>/`` holds ``repo/`` (a desired-state repo
whose job carries a ``rerunScope``), ``inventory.json`` (the clients, as
``reconciler plan --inventory`` reads them), ``history.json`` (each client's
latest attempt, as a relay records it; attempts are of the job's current
revision) and ``expected.json`` (every row, and the actions). Every relay
of the topology is planned at :data:`NOW` by the engine, and by the
readable rules, which must agree.

To add a case, write its files, run this test with
``UPDATE_RERUN_SCENARIOS=1`` to write ``expected.json``, and review that file
row by row before committing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.commands.plan import parse_inventory
from reconciler.plan import (
    ActionKind,
    Attempt,
    Client,
    ClientState,
    Installed,
    Outcome,
    Plan,
    index_relay,
    plan_client,
    plan_relay,
)
from reconciler.plan.rules import plan_client_by_rules, plan_relay_by_rules
from reconciler.repo_tree import load_repo
from reconciler.specs import Specs, parse_repo
from reconciler.times import parse_time

CASES_DIR = Path(__file__).resolve().parent / "scenarios" / "rerun"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _history(specs: Specs, data: Mapping[str, Any]) -> dict[tuple[str, str], Attempt]:
    """The attempts of ``history.json``, at the current plan revision of their job."""
    revisions: dict[str, str] = {}
    for relay in specs.topology.relays:
        revisions.update(index_relay(specs, relay.name).revisions)
    history: dict[tuple[str, str], Attempt] = {}
    for raw in data["attempts"]:
        finished = raw.get("finishedAt")
        history[(raw["job"], raw["client"])] = Attempt(
            operation_id=raw["operationId"], job=raw["job"], client=raw["client"], revision=revisions[raw["job"]],
            rerun=raw["rerun"], attempt=raw["attempt"], action=ActionKind(raw["action"]), version=raw["version"],
            outcome=Outcome(raw["outcome"]), dispatched_at=parse_time(raw["dispatchedAt"]),
            finished_at=parse_time(finished) if finished else None, message=raw.get("message", ""))
    return history


def _plan_case(case: Path) -> list[Plan]:
    loaded = load_repo(case / "repo")
    assert loaded.specs is not None, [str(e) for e in loaded.errors]
    specs = loaded.specs
    relays = sorted(r.name for r in specs.topology.relays)
    clients = parse_inventory(json.loads((case / "inventory.json").read_text(encoding="utf-8")), relays)
    history = _history(specs, json.loads((case / "history.json").read_text(encoding="utf-8")))
    plans = []
    for relay in relays:
        index = index_relay(specs, relay)
        mine = [c for c in clients if c.relay == relay]
        plan = plan_relay(index, mine, history, NOW)
        assert plan == plan_relay_by_rules(index, mine, history, NOW)
        for client in mine:  # and each check-in
            assert plan_client(index, client, history, plan.usage, NOW) == plan_client_by_rules(
                index, client, history, plan.usage, NOW)
        plans.append(plan)
    return plans


def _rendered(plans: Sequence[Plan]) -> dict[str, Any]:
    rows = [{"job": r.job, "relay": r.relay, "client": r.client, "state": r.state.value,
             "reason": r.reason.value if r.reason is not None else None,
             "action": r.action.value if r.action is not None else None, "attempts": r.attempts,
             "message": r.message, "operationId": r.operation_id}
            for plan in plans for r in plan.rows]
    actions = [{"client": a.client, "job": a.job, "kind": a.kind.value, "version": a.version, "rerun": a.rerun,
                "attempt": a.attempt, "operationId": a.operation_id}
               for plan in plans for a in plan.actions]
    return {"rows": rows, "actions": actions}


def test_there_is_a_case_for_each_kind_of_scope() -> None:
    assert {"scope-by-client", "scope-by-nested-relay", "repair-succeeded-clients",
            "second-raise-other-scope"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_scenario(case: str) -> None:
    directory = CASES_DIR / case
    got = _rendered(_plan_case(directory))
    expected_file = directory / "expected.json"
    if os.environ.get("UPDATE_RERUN_SCENARIOS"):
        expected_file.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    assert got == json.loads(expected_file.read_text(encoding="utf-8"))


def _states(case: str) -> dict[str, tuple[str, str]]:
    """client -> (state, message) of the case's rows."""
    return {r.client: (r.state.value, r.message) for plan in _plan_case(CASES_DIR / case) for r in plan.rows}


def test_a_client_scope_re_runs_that_client_only() -> None:
    assert _states("scope-by-client") == {
        "pc-kanto-1": ("Failed", "exit code 1603: disk full"),
        "pc-kanto-2": ("Pending", "rerun 1: attempt 1/1"),
        "pc-yokohama-1": ("Failed", "exit code 1603: disk full"),
    }


def test_a_relay_scope_re_runs_the_failed_clients_of_its_subtree() -> None:
    states = _states("scope-by-nested-relay")
    assert states["pc-yokohama-1"] == ("Pending", "rerun 3: attempt 1/2")
    assert states["pc-kawasaki-1"] == ("Pending", "rerun 3: attempt 1/2")  # two levels below the scope's relay
    assert states["pc-yokohama-2"] == ("Pending", "retry 2/2")  # a series under way goes on
    assert states["pc-kanto-1"] == ("Failed", "exit code 1603: disk full")  # the relay above the scope's
    assert states["pc-osaka-1"] == ("Failed", "exit code 1603: disk full")


def test_repair_reinstalls_the_named_succeeded_clients_once_per_rerun() -> None:
    states = _states("repair-succeeded-clients")
    assert states == {
        "pc-kanto-1": ("Succeeded", ""),
        "pc-kanto-2": ("Pending", "rerun 2: repair, attempt 1/3"),
        "pc-kanto-3": ("Pending", "rerun 2: repair, attempt 1/3"),
        "pc-kanto-4": ("Succeeded", ""),
        "pc-kanto-5": ("Pending", "rerun 2: attempt 1/3"),
    }
    plans = _plan_case(CASES_DIR / "repair-succeeded-clients")
    actions = {a.client: a for plan in plans for a in plan.actions}
    assert sorted(actions) == ["pc-kanto-2", "pc-kanto-3", "pc-kanto-5"]
    # a reinstall of the installed version, under an operation id the agent has never journalled
    assert (actions["pc-kanto-2"].kind, actions["pc-kanto-2"].version, actions["pc-kanto-2"].previous_version,
            actions["pc-kanto-2"].rerun) == (ActionKind.INSTALL, "1.0", None, 2)
    assert actions["pc-kanto-2"].operation_id != "op-pc-kanto-2-r0-a1"


def test_a_second_raise_with_another_scope_leaves_the_first_scopes_client_failed() -> None:
    assert _states("second-raise-other-scope") == {
        "pc-kanto-1": ("Failed", "exit code 1603: disk full again"),
        "pc-kanto-2": ("Pending", "rerun 2: attempt 1/1"),
        "pc-kanto-3": ("Failed", "exit code 1603: disk full"),
    }


# ------------------------------------------------------------ round by round


TOPOLOGY = {"apiVersion": "reconciler/v1", "kind": "Topology", "metadata": {"name": "t"},
            "spec": {"headquarters": "hq", "relays": [{"name": "kanto", "parent": "hq"},
                                                      {"name": "yokohama", "parent": "kanto"}]}}
PACKAGE = {"apiVersion": "reconciler/v1", "kind": "Package", "metadata": {"name": "app-1.0"},
           "spec": {"name": "app", "version": "1.0", "artifact": {"path": "artifacts/app"},
                    "installer": {"type": "files"}}}


def _specs(rerun: int, scope: Mapping[str, Any] | None, **extra: Any) -> Specs:
    spec: dict[str, Any] = {"jobType": "install", "package": {"name": "app", "version": "1.0"},
                            "destinationType": "allLowerClients", "destinations": ["kanto"],
                            "retry": {"limit": 1}, "rerun": rerun, **extra}
    if scope is not None:
        spec["rerunScope"] = dict(scope)
    job = {"apiVersion": "reconciler/v1", "kind": "Job", "metadata": {"name": "install-app"}, "spec": spec}
    files = {"topology.yaml": yaml.safe_dump(TOPOLOGY).encode(), "packages/app.yaml": yaml.safe_dump(PACKAGE).encode(),
             "jobs/install-app.yaml": yaml.safe_dump(job).encode()}
    result = parse_repo(files, lambda path: None)
    assert result.specs is not None, result.errors
    return result.specs


class Fleet:
    """Clients on two relays, each doing what its script says with every action it gets."""

    def __init__(self, fails: set[str]) -> None:
        self.clients = {cid: Client(id=cid, relay=relay) for cid, relay in
                        [("pc-k1", "kanto"), ("pc-k2", "kanto"), ("pc-y1", "yokohama"), ("pc-y2", "yokohama")]}
        self.fails = fails  # clients whose install fails
        self.history: dict[tuple[str, str], Attempt] = {}
        self.now = NOW
        self.runs: list[tuple[str, int]] = []  # (client, rerun) of every action run

    def converge(self, specs: Specs) -> dict[str, str]:
        """Check every client in (a relay hands out its actions, the agent runs them) until nothing moves."""
        for _ in range(10):
            self.now += timedelta(hours=1)
            moved = False
            for cid, client in sorted(self.clients.items()):
                index = index_relay(specs, client.relay)
                planned = plan_client(index, client, self.history, {}, self.now)
                assert planned == plan_client_by_rules(index, client, self.history, {}, self.now)
                for action in planned.actions:
                    moved = True
                    self.runs.append((cid, action.rerun))
                    ok = cid not in self.fails
                    self.history[(action.job, cid)] = Attempt(
                        operation_id=action.operation_id, job=action.job, client=cid, revision=action.revision,
                        rerun=action.rerun, attempt=action.attempt, action=action.kind, version=action.version,
                        outcome=Outcome.SUCCEEDED if ok else Outcome.FAILED, dispatched_at=self.now,
                        finished_at=self.now, message="installed" if ok else "exit code 1")
                    if ok:
                        self.clients[cid] = replace(client, installed=(Installed("app", "1.0"),))
            if not moved:
                break
        rows = {}
        for relay in ("kanto", "yokohama"):
            index = index_relay(specs, relay)
            mine = [c for c in self.clients.values() if c.relay == relay]
            plan = plan_relay(index, mine, self.history, self.now)
            assert plan == plan_relay_by_rules(index, mine, self.history, self.now)
            rows.update({r.client: r.state.value for r in plan.rows})
        return rows

    def ran(self) -> list[tuple[str, int]]:
        runs, self.runs = self.runs, []
        return runs


def test_raises_with_different_scopes_re_run_only_what_each_covers() -> None:
    fleet = Fleet(fails={"pc-k1", "pc-k2", "pc-y1", "pc-y2"})
    assert fleet.converge(_specs(0, None)) == dict.fromkeys(["pc-k1", "pc-k2", "pc-y1", "pc-y2"], "Failed")
    assert sorted(fleet.ran()) == [("pc-k1", 0), ("pc-k2", 0), ("pc-y1", 0), ("pc-y2", 0)]

    fleet.fails = {"pc-k1", "pc-k2", "pc-y2"}  # pc-y1's disk was cleaned
    rows = fleet.converge(_specs(1, {"clients": ["pc-y1"]}))
    assert fleet.ran() == [("pc-y1", 1)]
    assert rows == {"pc-k1": "Failed", "pc-k2": "Failed", "pc-y1": "Succeeded", "pc-y2": "Failed"}

    fleet.fails = {"pc-k2"}  # everything fixed but pc-k2
    rows = fleet.converge(_specs(2, {"relays": ["yokohama"]}))
    assert fleet.ran() == [("pc-y2", 2)]  # pc-y1 succeeded already; kanto's clients are outside the scope
    assert rows == {"pc-k1": "Failed", "pc-k2": "Failed", "pc-y1": "Succeeded", "pc-y2": "Succeeded"}

    # The same scope, edited to name kanto (the parent: its whole subtree) without a raise,
    # covers the Failed rows left from earlier raises: they run once under rerun 2.
    rows = fleet.converge(_specs(2, {"relays": ["kanto"]}))
    assert sorted(fleet.ran()) == [("pc-k1", 2), ("pc-k2", 2)]
    assert rows == {"pc-k1": "Succeeded", "pc-k2": "Failed", "pc-y1": "Succeeded", "pc-y2": "Succeeded"}
    assert fleet.converge(_specs(2, {"relays": ["kanto"]})) == rows and fleet.ran() == []

    # A repair reinstalls the named Succeeded client once, and re-runs the Failed one.
    fleet.fails = set()
    rows = fleet.converge(_specs(3, {"clients": ["pc-y1", "pc-k2"], "repair": True}))
    assert sorted(fleet.ran()) == [("pc-k2", 3), ("pc-y1", 3)]
    assert rows == dict.fromkeys(["pc-k1", "pc-k2", "pc-y1", "pc-y2"], "Succeeded")
    assert fleet.converge(_specs(3, {"clients": ["pc-y1", "pc-k2"], "repair": True})) == rows
    assert fleet.ran() == []  # once per rerun number

    # A plain raise re-runs no Succeeded row; a failed repair is Failed like any row.
    fleet.converge(_specs(4, None))
    assert fleet.ran() == []
    fleet.fails = {"pc-y2"}
    rows = fleet.converge(_specs(5, {"clients": ["pc-y2"], "repair": True}))
    assert fleet.ran() == [("pc-y2", 5)]
    assert rows["pc-y2"] == "Failed"
    assert [s for s in rows.values() if s == "Failed"] == ["Failed"]


def test_a_failed_rerun_row_is_counted_by_the_rollups() -> None:
    plans = _plan_case(CASES_DIR / "scope-by-client")
    kanto = next(p for p in plans if p.relay == "relay-kanto")
    (rollup,) = kanto.jobs
    assert rollup.counts[ClientState.FAILED.value] == 1 and rollup.counts[ClientState.PENDING.value] == 1


@pytest.mark.parametrize(("extra", "state", "message"), [
    ({}, "Pending", "rerun 1: repair, attempt 1/1"),
    ({"schedule": {"notAfter": "2026-05-01T00:00:00Z"}}, "Succeeded", ""),  # nothing new after the window
    ({"suspend": True}, "Suspended", "job is suspended"),
])
def test_a_repair_starts_only_where_a_new_start_may(extra: dict[str, Any], state: str, message: str) -> None:
    specs = _specs(1, {"clients": ["pc-k1"], "repair": True}, **extra)
    client = Client(id="pc-k1", relay="kanto", installed=(Installed("app", "1.0"),))
    plan = plan_relay(index_relay(specs, "kanto"), [client], {}, NOW)
    assert [(r.state.value, r.message) for r in plan.rows] == [(state, message)]
    assert len(plan.actions) == (1 if state == "Pending" else 0)
    assert plan == plan_relay_by_rules(index_relay(specs, "kanto"), [client], {}, NOW)


def test_a_scoped_rerun_waits_while_the_failures_left_outside_it_halt_the_job() -> None:
    clients = [Client(id=cid, relay="kanto") for cid in ("pc-k1", "pc-k2")]
    history: dict[tuple[str, str], Attempt] = {}
    for client in clients:
        plan = plan_relay(index_relay(_specs(0, None, rollout={"maxFailures": 0}), "kanto"), [client], {}, NOW)
        (action,) = plan.actions
        history[("install-app", client.id)] = Attempt(
            operation_id=action.operation_id, job="install-app", client=client.id, revision=action.revision,
            rerun=0, attempt=1, action=action.kind, version="1.0", outcome=Outcome.FAILED,
            dispatched_at=NOW - timedelta(hours=2), finished_at=NOW - timedelta(hours=2), message="exit code 1")

    def rows(scope: Mapping[str, Any] | None) -> dict[str, tuple[str, str | None]]:
        index = index_relay(_specs(1, scope, rollout={"maxFailures": 0}), "kanto")
        plan = plan_relay(index, clients, history, NOW)
        assert plan == plan_relay_by_rules(index, clients, history, NOW)
        return {r.client: (r.state.value, r.reason.value if r.reason else None) for r in plan.rows}

    # pc-k2's failure, outside the scope, still exceeds maxFailures 0: pc-k1 waits
    assert rows({"clients": ["pc-k1"]}) == {"pc-k1": ("Pending", "halted"), "pc-k2": ("Failed", "failed")}
    # scoped to the relay (or not scoped), both rows reset and the halt is lifted
    assert rows({"relays": ["kanto"]}) == rows(None) == {"pc-k1": ("Pending", "queued"),
                                                         "pc-k2": ("Pending", "queued")}
