"""The OS's software inventory end to end: real agents, a real relay over HTTP, a real origin and HQ.

The client machines are temp dirs whose "OS" is a real dpkg database in a
sandbox (``tests/package_sandbox.py``): software is installed there with
``dpkg``, outside reconciler, and must show in the relay's database, its
published ``software.json``, ``reconciler status --software`` and the
inventory ``status --inventory`` writes for ``plan --inventory``. The agent
is driven one step at a time with an injected clock, and every check-in
body it sent is counted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_helpers import ENROLL_SECRET, checkin_body, reconciler, wait_for
from package_sandbox import DpkgSandbox, have, system_dpkg_fingerprint
from test_e2e_relay import Cluster, topology
from test_relay_server import ENROLL, Relay, _start

from reconciler import protocol
from reconciler.agent.agent import Agent
from reconciler.agent.software import Collector

pytestmark = [
    pytest.mark.skipif(os.name != "posix" or not have("dpkg", "dpkg-deb", "dpkg-query"),
                       reason="needs dpkg, dpkg-deb and dpkg-query"),
]


class _Recording(requests.Session):
    """A session that keeps every check-in body it sent (as sent on the wire) and the reply."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    def post(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().post(url, *args, **kwargs)
        self.bodies.append(json.loads(json.dumps(kwargs.get("json"))))
        self.replies.append(response.json() if response.status_code == 200 else {})
        return response

    def sent_lists(self) -> int:
        return sum(1 for body in self.bodies if "software" in body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r, server = _start(tmp_path)
    yield r
    server.stop()
    r.store.close()


def held(relay: Relay, client: str) -> list[list[str]] | None:
    db = sqlite3.connect(relay.store.path)
    try:
        row = db.execute("SELECT software FROM client_software WHERE client = ?", (client,)).fetchone()
    finally:
        db.close()
    return None if row is None else json.loads(row[0])


def test_the_list_is_sent_only_when_it_changed_or_the_relay_lost_it(relay: Relay, tmp_path: Path) -> None:
    before = system_dpkg_fingerprint()
    box = DpkgSandbox(tmp_path / "pc-1")
    box.install("sandbox-editor", "1.2.3-1")
    session, clock = _Recording(), Clock()
    agent = Agent("pc-1", relay.url, tmp_path / "agent", session=session, enroll_secret=ENROLL_SECRET,
                  insecure_http=True, software=Collector(platform="linux", dpkg_admindir=box.admindir),
                  software_interval=3600.0, monotonic=clock)

    # 1: the relay is not known to read software lists yet: nothing of it is sent; the reply says it holds none.
    assert agent.step().reached
    assert "softwareDigest" not in session.bodies[0] and session.replies[0]["softwareDigest"] is None
    # 2: the list, with its digest; the relay stores it and replies with that digest.
    assert agent.step().reached
    first = session.bodies[1]
    assert [e["name"] for e in first["software"]] == ["sandbox-editor"]
    assert session.replies[1]["softwareDigest"] == first["softwareDigest"]
    assert held(relay, "pc-1") == [["sandbox-editor", "1.2.3-1", "dpkg"]]
    changes = len(relay.changes)
    # 3, 4: the digest only; installing something does not show before the interval has passed.
    assert agent.step().reached
    box.install("sandbox-viewer", "0.1")
    assert agent.step().reached
    assert [("software" in b, b["softwareDigest"]) for b in session.bodies[2:4]] == [(False, first["softwareDigest"])] * 2
    # 5: an hour later the list is collected again, and sent because it changed.
    clock.now += 3600
    assert agent.step().reached
    assert [e["name"] for e in session.bodies[4]["software"]] == ["sandbox-editor", "sandbox-viewer"]
    assert held(relay, "pc-1") == [["sandbox-editor", "1.2.3-1", "dpkg"], ["sandbox-viewer", "0.1", "dpkg"]]
    assert len(relay.changes) == changes, "a new software list alone woke a planning pass"
    # 6, 7: the relay lost it (a database restored from a backup): its reply says so, the next check-in re-sends.
    db = sqlite3.connect(relay.store.path)
    with db:
        db.execute("DELETE FROM client_software")
    db.close()
    assert agent.step().reached
    assert "software" not in session.bodies[5] and session.replies[5]["softwareDigest"] is None
    assert agent.step().reached
    assert session.replies[6]["softwareDigest"] == session.bodies[6]["softwareDigest"]
    assert agent.step().reached

    assert len(session.bodies) == 8
    assert session.sent_lists() == 3, [sorted(b) for b in session.bodies]
    assert system_dpkg_fingerprint() == before


def test_run_once_delivers_the_list_and_off_sends_nothing(relay: Relay, tmp_path: Path) -> None:
    box = DpkgSandbox(tmp_path / "box")
    box.install("sandbox-editor", "1.2.3-1")
    session = _Recording()
    agent = Agent("pc-2", relay.url, tmp_path / "pc-2", session=session, enroll_secret=ENROLL_SECRET,
                  insecure_http=True, software=Collector(platform="linux", dpkg_admindir=box.admindir))
    assert agent.run_once() == 0
    assert (len(session.bodies), session.sent_lists()) == (2, 1)
    assert held(relay, "pc-2") == [["sandbox-editor", "1.2.3-1", "dpkg"]]

    quiet = _Recording()
    off = Agent("pc-3", relay.url, tmp_path / "pc-3", session=quiet, enroll_secret=ENROLL_SECRET, insecure_http=True)
    assert off.run_once() == 0
    assert not any(key.startswith("software") for body in quiet.bodies for key in body)
    assert held(relay, "pc-3") is None


@pytest.mark.parametrize(("change", "problem"), [
    ({"softwareDigest": "0" * 64}, "softwareDigest: is not the SHA-256 of the software list sent"),
    ({"software": [{"name": "x", "version": "1", "source": "dpkg"}] * 2 + [{"name": "\x07", "version": "",
                                                                              "source": "dpkg"}]},
     "software[2].name: holds a control character"),
    ({"software": "all of it"}, "software: expected an array, got a string"),
])
def test_the_relay_refuses_a_bad_list_with_a_400_naming_the_field(relay: Relay, change: dict[str, Any],
                                                                   problem: str) -> None:
    entries = [{"name": "bash", "version": "5.2", "source": "dpkg"}]
    body = {**checkin_body(), "software": entries, "softwareDigest": protocol.software_digest(entries), **change}
    response = requests.post(f"{relay.url}/v1/clients/pc-9/checkin", json=body, headers=ENROLL, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"].startswith(problem)
    assert held(relay, "pc-9") is None


# ------------------------------------------------------------------ origin, HQ, relay, status, plan


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.mark.slow
def test_software_installed_outside_the_tool_is_published_and_found_by_status(cluster: Cluster) -> None:
    before = system_dpkg_fingerprint()
    commit = cluster.accept({"topology.yaml": topology(("site", "hq-x"))})
    site = cluster.relay("site", publish_interval=0.2)
    cluster.at_commit(site, commit)
    for client, version in (("pc-1", "1.2.3-1"), ("pc-2", "1.3.0-1"), ("pc-3", "1.3.0-1")):
        box = DpkgSandbox(cluster.base / "os" / client)
        box.install("sandbox-editor", version)  # with dpkg, not with reconciler
        if client == "pc-1":
            box.install("other-tool", "7")
        agent = cluster.agent(client, site, software=Collector(platform="linux", dpkg_admindir=box.admindir))
        assert agent.run_once() == 0
        assert agent.inventory() == []  # reconciler installed nothing: its own inventory stays empty

    def published() -> dict[str, Any] | None:
        doc = cluster.origin.relay_file("site", "software.json")
        return doc if doc is not None and len(doc["clients"]) == 3 else None
    doc = wait_for(published, 60, interval=0.2, what="software.json with three clients")
    assert doc["clients"] == ["pc-1", "pc-2", "pc-3"] and doc["omitted"] == {}
    editor = next(s for s in doc["software"] if s["name"] == "sandbox-editor")
    assert editor == {"name": "sandbox-editor", "source": "dpkg",
                      "versions": {"1.2.3-1": {"clients": [0]}, "1.3.0-1": {"allBut": [0]}}}

    cache = {"XDG_CACHE_HOME": str(cluster.base / "cache")}

    def status(*args: str) -> Any:
        return reconciler("status", "--origin", cluster.origin.url, *args, check=False, extra_env=cache)

    text = status("--software", "EDITOR")
    assert text.returncode == 0, text.stderr
    lines = [line.split() for line in text.stdout.splitlines()]
    assert lines[:4] == [["SOFTWARE", "VERSION", "SOURCE", "CLIENT", "RELAY"],
                         ["sandbox-editor", "1.2.3-1", "dpkg", "pc-1", "site"],
                         ["sandbox-editor", "1.3.0-1", "dpkg", "pc-2", "site"],
                         ["sandbox-editor", "1.3.0-1", "dpkg", "pc-3", "site"]]
    assert "3 clients of 3 with a software inventory have software matching 'EDITOR'" in text.stdout

    summary = status("--software", "sandbox-*", "--summary", "--format", "json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["versions"] == [
        {"name": "sandbox-editor", "version": "1.2.3-1", "source": "dpkg", "clients": 1},
        {"name": "sandbox-editor", "version": "1.3.0-1", "source": "dpkg", "clients": 2}]
    found = json.loads(status("--software", "other-tool", "--format", "json").stdout)
    assert found["matches"] == [{"name": "other-tool", "version": "7", "source": "dpkg", "client": "pc-1",
                                 "relay": "site"}]
    missing = status("--software", "not-installed-anywhere")
    assert missing.returncode == 1 and "0 clients of 3" in missing.stdout
    assert status("--software", "x", "--wait").returncode == 2

    inventory = cluster.base / "fleet.json"
    assert status("--inventory", str(inventory)).returncode == 0
    clients = {c["id"]: c for c in json.loads(inventory.read_text())["clients"]}
    assert clients["pc-1"]["software"] == [{"name": "other-tool", "version": "7", "source": "dpkg"},
                                           {"name": "sandbox-editor", "version": "1.2.3-1", "source": "dpkg"}]
    planned = reconciler("plan", str(cluster.origin.work), "--inventory", str(inventory), check=False)
    assert planned.returncode == 0, planned.stderr
    clients["pc-2"]["software"][0]["source"] = "apt"
    inventory.write_text(json.dumps({"clients": list(clients.values())}))
    refused = reconciler("plan", str(cluster.origin.work), "--inventory", str(inventory), check=False)
    assert refused.returncode == 2
    assert "clients[1].software[0].source: must be one of dpkg, rpm, registry, pkgutil, got 'apt'" in refused.stderr
    assert system_dpkg_fingerprint() == before
    for relay in cluster.relays:
        assert relay.stop() == 0, relay.output()


def _agent_process(relay: Relay, tmp_path: Path, client: str, *args: str) -> Any:
    secret = tmp_path / "enroll.secret"
    secret.write_text(ENROLL_SECRET + "\n")
    secret.chmod(0o600)
    return reconciler("agent", "--id", client, "--relay", relay.url, "--insecure-http", "--root",
                      str(tmp_path / client), "--enroll-secret-file", str(secret), "--insecure-unsigned-actions",
                      "--once", *args, check=False)


def test_the_agent_command_reports_this_machines_dpkg_list_unless_turned_off(relay: Relay, tmp_path: Path) -> None:
    """``reconciler agent`` with its defaults reads the machine's own dpkg database (read only)."""
    before = system_dpkg_fingerprint()
    if before is None:
        pytest.skip("this machine has no dpkg database")
    proc = _agent_process(relay, tmp_path, "pc-real")
    assert proc.returncode == 0, proc.stderr
    listed = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}\t${Package}\n"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    installed = sorted({line.split("\t")[1] for line in listed if line.startswith("installed\t")})
    stored = held(relay, "pc-real")
    assert stored is not None and sorted({name for name, _, _ in stored}) == installed[:protocol.MAX_SOFTWARE]
    assert {source for _, _, source in stored} == {"dpkg"}
    assert system_dpkg_fingerprint() == before

    proc = _agent_process(relay, tmp_path, "pc-off", "--software-inventory", "off")
    assert proc.returncode == 0, proc.stderr
    assert held(relay, "pc-off") is None
    bad = _agent_process(relay, tmp_path, "pc-bad", "--software-interval", "0")
    assert bad.returncode == 2 and "--software-interval: expected 1 to 10080 minutes" in bad.stderr


def test_the_relay_store_keeps_one_list_per_client_apart_from_planning(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from reconciler.relay.store import Store

    store = Store(tmp_path / "relay")
    now = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)
    entries: list[protocol.SoftwareEntry] = [{"name": "bash", "version": "5.2", "source": "dpkg"}]
    try:
        with store.write() as db:
            store.register(db, "pc-1", now)
            assert store.record_software(db, "pc-1", protocol.software_digest(entries), 0, entries, now)
            assert not store.record_software(db, "pc-1", protocol.software_digest(entries), 0, entries, now)
            more = [*entries, {"name": "curl", "version": "8.0", "source": "dpkg"}]
            assert store.record_software(db, "pc-1", protocol.software_digest(more, 4), 4, more, now)  # type: ignore[arg-type]
        assert store.software_digests() == {"pc-1": protocol.software_digest(more, 4)}  # type: ignore[arg-type]
        assert store.software_lists(["pc-1", "pc-2"]) == {
            "pc-1": ((("bash", "5.2", "dpkg"), ("curl", "8.0", "dpkg")), 4)}
        assert store.client("pc-1") is not None and store.client("pc-1").inventory == ()  # type: ignore[union-attr]
        assert store.forget("pc-1", "test", now)
        assert store.software_digests() == {}
    finally:
        store.close()
