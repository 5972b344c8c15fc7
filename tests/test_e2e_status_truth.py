"""End to end: status that tells the truth, with a real origin, HQ, relays and agents on 127.0.0.1.

A stopped agent becomes offline and settles ``status --wait``; a client a job
names that never registered blocks Completed; ``status --wait`` exits with
each documented code in a scenario that produces it. Every wait is on a
condition with a deadline; HQ runs ``--once`` after each change it must see.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import Origin, RelayProcess, reconciler, wait_for

from reconciler.agent.agent import Agent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="real relays and agents on POSIX"),
]

TOPOLOGY = """\
apiVersion: reconciler/v1
kind: Topology
metadata: {name: test}
spec:
  headquarters: hq-x
  relays:
    - {name: relay-a, parent: hq-x}
"""

PACKAGE = """\
apiVersion: reconciler/v1
kind: Package
metadata: {name: tool-1.0}
spec:
  name: tool
  version: "1.0"
  artifact: {path: artifacts/tool}
  installer: {type: files}
"""


def job(name: str, destination_type: str, destinations: str, extra: str = "") -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Job
metadata: {{name: {name}}}
spec:
  jobType: install
  package: {{name: tool, version: "1.0"}}
  destinationType: {destination_type}
  destinations: [{destinations}]
{extra}"""


class Fleet:
    """One origin, an HQ workdir, relay-a (offline after 1.5 s without a check-in) and in-process agents."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.hq = base / "hq"
        self.relay: RelayProcess | None = None

    def commit(self, files: dict[str, Any]) -> str:
        commit = self.origin.commit(files)
        self.hq_once()
        return commit

    def hq_once(self) -> None:
        reconciler("hq", "--origin", self.origin.url, "--workdir", str(self.hq), *self.origin.hq_trust_args(),
                   "--once", timeout=120, check=False)

    def start_relay(self) -> RelayProcess:
        self.relay = RelayProcess("relay-a", self.origin.url, self.base / "relay-a",
                                  extra_args=["--offline-after", "1.5"]).start()
        return self.relay

    def agent(self, client: str) -> Agent:
        assert self.relay is not None
        return Agent(client, self.relay.url, self.base / "clients" / client, enroll_secret=self.relay.enroll_secret,
                     insecure_http=True, trust_keys=self.origin.trust_keys())

    def relay_job(self, name: str) -> dict[str, Any]:
        return self.origin.relay_file("relay-a", f"jobs/{name}.yaml") or {}

    def hq_job(self, name: str) -> dict[str, Any]:
        data = self.origin.read("status/hq", f"jobs/{name}.yaml")
        return yaml.safe_load(data) if data else {}

    def status(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        proc = reconciler("status", "--origin", self.origin.url, *args, timeout=timeout, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def stop(self) -> None:
        if self.relay is not None and self.relay.proc is not None and self.relay.proc.poll() is None:
            self.relay.proc.kill()
            self.relay.proc.wait(timeout=10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.stop()


BASE = {"topology.yaml": TOPOLOGY, "packages/tool-1.0.yaml": PACKAGE, "artifacts/tool/tool.txt": "tool\n"}


def test_a_stopped_agent_goes_offline_settles_wait_and_catches_up_when_it_returns(fleet: Fleet) -> None:
    fleet.commit(BASE)
    relay = fleet.start_relay()
    pc1, pc2 = fleet.agent("pc-1"), fleet.agent("pc-2")
    assert pc2.run_once() == 0  # registers, then its machine is switched off
    commit = fleet.commit({"jobs/install-tool.yaml": job("install-tool", "allLowerClients", "relay-a")})
    wait_for(lambda: relay.health()["acceptedCommit"] == commit, 30, what="relay at the job's commit")

    # pc-1 keeps checking in and converges; pc-2 is not heard from again.
    def offline_row() -> dict[str, Any] | None:
        assert pc1.run_once() == 0
        rows = {r["client"]: r for r in fleet.relay_job("install-tool").get("rows", [])}
        pc2_row = rows.get("pc-2", {})
        done = rows.get("pc-1", {}).get("state") == "Succeeded"
        return pc2_row if done and pc2_row.get("reason") == "clientOffline" else None

    row = wait_for(offline_row, 30, what="pc-2 offline, pc-1 done")
    assert row["state"] == "Pending"
    assert row["message"].startswith("client offline, last contact 20"), row["message"]
    assert fleet.relay_job("install-tool")["state"] == "ClientsOffline"
    inventory = {c["id"]: c for c in fleet.origin.relay_file("relay-a", "inventory.json")["clients"]}
    assert inventory["pc-2"]["online"] is False and inventory["pc-2"]["lastContact"].startswith("20")
    assert "lastContact" not in inventory["pc-1"]

    fleet.hq_once()
    hq_job = fleet.hq_job("install-tool")
    assert hq_job["state"] == "ClientsOffline", hq_job
    assert hq_job["pending"] == {"clientOffline": 1}
    # The offline client settles the gate: nothing failed, so exit 0, and the text says who is waited for.
    code, out, err = fleet.status("--wait", "--timeout", "30")
    assert code == 0, (out, err)
    assert "ClientsOffline" in out and "clientOffline" in out
    code, out, _ = fleet.status("--job", "install-tool", "--format", "json")
    rows = {r["client"]: r for r in json.loads(out)["jobs"][0]["clients"]}
    assert rows["pc-2"]["reason"] == "clientOffline"

    # The machine is switched on again: it gets its action and the job completes.
    def completed() -> bool:
        assert pc2.run_once() == 0
        rows = {r["client"]: r["state"] for r in fleet.relay_job("install-tool").get("rows", [])}
        return rows == {"pc-1": "Succeeded", "pc-2": "Succeeded"}

    wait_for(completed, 30, what="pc-2 back and done")
    wait_for(lambda: fleet.relay_job("install-tool").get("state") == "Completed", 30, what="relay job Completed")
    fleet.hq_once()
    assert fleet.hq_job("install-tool")["state"] == "Completed"


def test_a_named_client_that_never_registered_blocks_completed_and_fails_the_gate(fleet: Fleet) -> None:
    fleet.commit(BASE)
    relay = fleet.start_relay()
    pc1 = fleet.agent("pc-1")
    commit = fleet.commit({"jobs/install-tool.yaml": job("install-tool", "clients", "pc-1, pc-ghost")})
    wait_for(lambda: relay.health()["acceptedCommit"] == commit, 30, what="relay at the job's commit")

    def done() -> bool:
        assert pc1.run_once() == 0
        rows = {r["client"]: r["state"] for r in fleet.relay_job("install-tool").get("rows", [])}
        return rows == {"pc-1": "Succeeded"}

    wait_for(done, 30, what="pc-1 done")
    fleet.hq_once()
    hq_job = fleet.hq_job("install-tool")
    assert hq_job["state"] == "InProgress", hq_job
    assert hq_job["notRegistered"] == ["pc-ghost"]
    assert hq_job["counts"]["Pending"] == 1 and hq_job["counts"]["Succeeded"] == 1
    code, out, err = fleet.status("--wait", "--timeout", "30")
    assert code == 1, (out, err)
    assert "pc-ghost" in err


def test_status_wait_exit_codes_for_good_failed_rejected_timeout_and_error(fleet: Fleet) -> None:
    # 4: a job reaches relay-a, which is not running yet: it never reports.
    commit = fleet.commit({**BASE, "jobs/install-tool.yaml": job("install-tool", "allLowerClients", "relay-a")})
    code, _, err = fleet.status("--wait", "--timeout", "1")
    assert code == 4, err
    assert "relay-a" in err

    # 0: the relay runs and its only client converges.
    relay = fleet.start_relay()
    pc1 = fleet.agent("pc-1")

    def done() -> bool:
        assert pc1.run_once() == 0
        rows = {r["client"]: r["state"] for r in fleet.relay_job("install-tool").get("rows", [])}
        return rows == {"pc-1": "Succeeded"}

    wait_for(lambda: relay.health()["acceptedCommit"] == commit, 30, what="relay at the commit")
    wait_for(done, 30, what="pc-1 done")
    fleet.hq_once()
    code, out, err = fleet.status("--wait", "--timeout", "30", "--commit", commit)
    assert code == 0, (out, err)

    # 1: a package whose installer fails on every attempt.
    failing = PACKAGE.replace("tool-1.0", "broken-1.0").replace("name: tool", "name: broken").replace(
        "installer: {type: files}",
        "installer: {type: command, install: [sh, -c, 'exit 3'], uninstall: [sh, -c, 'true']}")
    commit = fleet.commit({
        "packages/broken-1.0.yaml": failing,
        "jobs/install-broken.yaml": job("install-broken", "allLowerClients", "relay-a",
                                        "  retry: {limit: 0}\n").replace("name: tool", "name: broken"),
    })
    wait_for(lambda: relay.health()["acceptedCommit"] == commit, 30, what="relay at the failing commit")

    def failed() -> bool:
        assert pc1.run_once() == 0
        rows = {r["client"]: r["state"] for r in fleet.relay_job("install-broken").get("rows", [])}
        return rows == {"pc-1": "Failed"}

    wait_for(failed, 30, what="pc-1 failed")
    fleet.hq_once()
    code, out, err = fleet.status("--wait", "--timeout", "30", "--commit", commit)
    assert code == 1, (out, err)
    assert "install-broken" in err

    # 3: a commit that does not validate is rejected; the wait names its errors.
    bad = fleet.commit({"jobs/install-bad.yaml": job("install-bad", "allLowerClients", "relay-nowhere")})
    code, _, err = fleet.status("--wait", "--timeout", "30", "--commit", bad)
    assert code == 3, err
    assert "relay-nowhere" in err

    # 2: a job that does not exist is an error, not a wait.
    code, _, err = fleet.status("--wait", "--timeout", "5", "--job", "no-such-job")
    assert code == 2, err


TWO_RELAYS = TOPOLOGY + "    - {name: relay-b, parent: hq-x}\n"


def test_a_client_that_moves_to_another_relay_is_counted_once_under_the_new_one(fleet: Fleet) -> None:
    fleet.commit({**BASE, "topology.yaml": TWO_RELAYS,
                  "jobs/install-tool.yaml": job("install-tool", "allLowerClients", "relay-a, relay-b")})
    relay_a = RelayProcess("relay-a", fleet.origin.url, fleet.base / "relay-a", poll_interval=0.5).start()
    relay_b = RelayProcess("relay-b", fleet.origin.url, fleet.base / "relay-b", poll_interval=0.5).start()
    fleet.relay = relay_a
    try:
        root = fleet.base / "clients" / "pc-1"
        at_a = Agent("pc-1", relay_a.url, root, enroll_secret=relay_a.enroll_secret, insecure_http=True,
                     trust_keys=fleet.origin.trust_keys())

        def done_at(relay: str, agent: Agent) -> bool:
            assert agent.run_once() == 0
            rows = fleet.origin.relay_file(relay, "jobs/install-tool.yaml") or {}
            return {r["client"]: r["state"] for r in rows.get("rows", [])} == {"pc-1": "Succeeded"}

        wait_for(lambda: done_at("relay-a", at_a), 30, what="pc-1 done at relay-a")
        assert (root / "relay").read_text().strip() == "relay-a"

        # The PC is moved to another site: same agent root, another relay.
        at_b = Agent("pc-1", relay_b.url, root, enroll_secret=relay_b.enroll_secret, insecure_http=True,
                     trust_keys=fleet.origin.trust_keys())
        wait_for(lambda: done_at("relay-b", at_b), 30, what="pc-1 at relay-b")
        relay_b_yaml = fleet.origin.relay_file("relay-b", "relay.yaml")
        assert [(m["client"], m["from"]) for m in relay_b_yaml["movedIn"]] == [("pc-1", "relay-a")]
        assert (root / "relay").read_text().strip() == "relay-b"

        fleet.hq_once()  # HQ learns of the move and tells relay-a (moves.yaml)
        moves = yaml.safe_load(fleet.origin.read("status/hq", "moves.yaml") or b"{}")
        assert [(m["client"], m["to"]) for m in moves["moves"]["relay-a"]] == [("pc-1", "relay-b")]

        def relay_a_let_go() -> dict[str, Any] | None:
            doc = fleet.origin.relay_file("relay-a", "relay.yaml") or {}
            return doc if doc.get("movedAway", {}).get("count") == 1 else None

        doc = wait_for(relay_a_let_go, 30, what="relay-a marks pc-1 moved")
        assert doc["clients"] == 0
        assert doc["movedAway"]["clients"] == [{"client": "pc-1", "to": "relay-b", "at": relay_b_yaml["movedIn"][0]["at"]}]
        assert fleet.origin.job_rows("relay-a", "install-tool") == {}
        fleet.hq_once()
        hq_job = fleet.hq_job("install-tool")
        assert hq_job["counts"]["Succeeded"] == 1 and sum(hq_job["counts"].values()) == 1, hq_job
        assert hq_job["state"] == "Completed"
        relays = {r["relay"]: r for r in yaml.safe_load(fleet.origin.read("status/hq", "relays.yaml"))["relays"]}
        assert (relays["relay-a"]["clients"], relays["relay-a"]["movedAway"]) == (0, 1)
        assert "movedAway" not in relays["relay-b"]
        assert "0/0/0, 1 moved away" in (fleet.origin.read("status/hq", "summary.md") or b"").decode()
    finally:
        relay_b.stop()


def test_a_client_not_heard_from_for_the_retention_period_is_retired_until_it_returns(fleet: Fleet) -> None:
    fleet.commit({**BASE, "jobs/install-tool.yaml": job("install-tool", "allLowerClients", "relay-a")})
    relay = RelayProcess("relay-a", fleet.origin.url, fleet.base / "relay-a",
                         extra_args=["--retire-after", "0.00005"]).start()  # 4.32 s
    fleet.relay = relay
    pc1 = fleet.agent("pc-1")
    assert pc1.run_once() == 0

    def retired() -> dict[str, Any] | None:
        doc = fleet.origin.relay_file("relay-a", "relay.yaml") or {}
        return doc if doc.get("retired", {}).get("count") == 1 else None

    doc = wait_for(retired, 30, what="pc-1 retired")
    assert doc["clients"] == 0 and doc["retired"]["clients"][0]["client"] == "pc-1"
    assert fleet.origin.job_rows("relay-a", "install-tool") == {}
    inventory = fleet.origin.relay_file("relay-a", "inventory.json")
    assert inventory["clients"] == []
    fleet.hq_once()
    assert fleet.hq_job("install-tool")["state"] == "NoTargets"
    relays = yaml.safe_load(fleet.origin.read("status/hq", "relays.yaml"))["relays"]
    assert [(r["relay"], r["clients"], r["retired"]) for r in relays] == [("relay-a", 0, 1)]

    # One check-in brings it back, with its history.
    assert pc1.run_once() == 0
    wait_for(lambda: (fleet.origin.relay_file("relay-a", "relay.yaml") or {}).get("clients") == 1, 30,
             what="pc-1 back")
