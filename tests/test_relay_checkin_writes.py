"""A check-in that changes nothing writes nothing: the relay's overlay of last-seen times (a real SQLite file,
the relay app on a real HTTP server on 127.0.0.1, ``reconciler clients list`` as a subprocess)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_helpers import ENROLL_SECRET, checkin_body
from test_e2e_relay import Cluster, cluster, topology  # noqa: F401 - the cluster fixture
from test_relay_server import _specs

from reconciler import protocol
from reconciler.plan import Installed
from reconciler.relay.server import RelayApp, Trust
from reconciler.relay.service import relay_server
from reconciler.relay.state import RelayState, StagedArtifact, make_generation
from reconciler.relay.store import Store
from reconciler.serving import Server

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
INSTALLED = [{"name": "app", "version": "1.0"}]


@dataclass
class Relay:
    url: str
    store: Store
    state: RelayState
    clock: list[datetime]
    writes: list[str]  # one entry per write transaction started


@pytest.fixture
def relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Relay]:
    store = Store(tmp_path / "relay")
    state = RelayState("relay-a", store, poll_seconds=7)  # online window 51 s
    state.generation = make_generation("c" * 40, _specs(), "relay-a",
                                       artifacts={("app", "1.0"): StagedArtifact("ab" * 32, 10240, "tar")})
    cache = tmp_path / "relay" / "cache" / "sha256"
    cache.mkdir(parents=True)
    clock = [T0]
    writes: list[str] = []
    real_write = store.write

    def counted_write() -> AbstractContextManager[sqlite3.Connection]:
        writes.append("write")
        return real_write()

    monkeypatch.setattr(store, "write", counted_write)
    app = RelayApp(state, cache, trust=Trust(enroll_secret=ENROLL_SECRET), now=lambda: clock[0])
    server: Server = relay_server(app, "127.0.0.1:0").start()  # type: ignore[assignment]
    yield Relay(server.url, store, state, clock, writes)
    server.stop()
    store.close()


def checkin(relay: Relay, client: str, token: str | None, *, labels: dict[str, str] | None = None,
            **kwargs: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {protocol.ENROLLMENT_HEADER: ENROLL_SECRET}
    body = checkin_body(**kwargs)
    if labels is not None:
        body["labels"] = labels
    response = requests.post(f"{relay.url}/v1/clients/{client}/checkin", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def converged(relay: Relay, client: str = "pc-1") -> str:
    """Register ``client``, run its install and report it done: its rows are Succeeded. Returns its token."""
    first = checkin(relay, client, None)
    [action] = first["actions"]
    checkin(relay, client, first["token"], inventory=INSTALLED,
            results=[{"operationId": action["operationId"], "status": "succeeded", "exitCode": 0}])
    assert relay.store.row_states_of(client)["install-app"].state == "Succeeded"
    return str(first["token"])


def stored_row(relay: Relay, client: str = "pc-1") -> tuple[str, str, str, float]:
    """The client's row as another connection (another process) reads it from the file."""
    with sqlite3.connect(relay.store.path) as db:
        row = db.execute("SELECT facts, labels, inventory, last_seen FROM clients WHERE id = ?", (client,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def test_an_unchanged_checkin_starts_no_write_transaction(relay: Relay) -> None:
    token = converged(relay)
    relay.writes.clear()
    relay.clock[0] = T0 + timedelta(seconds=7)
    # Free disk moved, nothing else: a fast-moving fact.
    reply = checkin(relay, "pc-1", token, inventory=INSTALLED, freeDiskMB=99_000)
    assert reply["actions"] == []
    assert relay.writes == []
    changes = relay.store.db.total_changes
    relay.clock[0] = T0 + timedelta(seconds=14)
    checkin(relay, "pc-1", token, inventory=INSTALLED, freeDiskMB=98_000)
    assert relay.writes == [] and relay.store.db.total_changes == changes
    # SQLite still holds the check-in that last wrote; the relay's readers see the newest.
    assert stored_row(relay)[3] == (T0).timestamp()
    record = relay.store.client("pc-1")
    assert record is not None and record.last_seen == T0 + timedelta(seconds=14)
    assert record.facts["freeDiskMB"] == 98_000


@pytest.mark.parametrize("change", ["labels", "inventory", "hostname", "bootId", "lastRelay", "results"])
def test_a_checkin_that_changes_the_client_is_written_at_once(relay: Relay, change: str) -> None:
    token = converged(relay)
    checkin(relay, "pc-1", token, inventory=INSTALLED)
    relay.writes.clear()
    relay.clock[0] = T0 + timedelta(seconds=7)
    kwargs: dict[str, Any] = {"inventory": INSTALLED}
    if change == "labels":
        kwargs["labels"] = {"dept": "sales"}
    elif change == "inventory":
        kwargs["inventory"] = [*INSTALLED, {"name": "other", "version": "2.0", "source": "detected"}]
    elif change == "hostname":
        kwargs["hostname"] = "renamed"
    elif change == "bootId":
        kwargs["bootId"] = "b" * 32
    elif change == "results":
        kwargs["results"] = [{"operationId": "op-unknown-to-this-relay", "status": "succeeded", "exitCode": 0}]
    if change == "lastRelay":
        headers = {"Authorization": f"Bearer {token}"}
        body = {**checkin_body(**kwargs), "lastRelay": "relay-b"}
        response = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", json=body, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
    else:
        checkin(relay, "pc-1", token, **kwargs)
    assert relay.writes == ["write"]
    facts, labels, inventory, last_seen = stored_row(relay)
    assert last_seen == (T0 + timedelta(seconds=7)).timestamp()  # written with it, not left to the flush
    if change == "labels":
        assert json.loads(labels) == {"dept": "sales"}
    elif change == "inventory":
        assert [e["name"] for e in json.loads(inventory)] == ["app", "other"]
    elif change == "hostname":
        assert json.loads(facts)["hostname"] == "renamed"
    elif change == "lastRelay":
        record = relay.store.client("pc-1")
        assert record is not None and record.came_from == "relay-b"


def test_a_client_coming_back_is_written_at_once(relay: Relay) -> None:
    """Rollout limits count online clients by last_seen in SQLite: a client back after the online window
    (less two flush intervals) must be there at once, not at the next flush."""
    token = converged(relay)
    relay.writes.clear()
    relay.clock[0] = T0 + timedelta(seconds=10)
    checkin(relay, "pc-1", token, inventory=INSTALLED)
    assert relay.writes == []
    relay.clock[0] = T0 + timedelta(seconds=10 + 51 - 2 * relay.store.flush_interval + 1)
    checkin(relay, "pc-1", token, inventory=INSTALLED)
    assert relay.writes == ["write"]
    assert stored_row(relay)[3] == relay.clock[0].timestamp()


def test_the_overlay_is_what_the_full_pass_reads_and_clients_list_sees_after_a_flush(relay: Relay) -> None:
    token = converged(relay)
    relay.clock[0] = T0 + timedelta(minutes=5)  # back after the online window: written at once
    checkin(relay, "pc-1", token, inventory=INSTALLED)
    relay.clock[0] = T0 + timedelta(minutes=5, seconds=20)
    checkin(relay, "pc-1", token, inventory=INSTALLED, freeDiskMB=12_345)
    seen = T0 + timedelta(minutes=5, seconds=20)
    # The full pass reads the clients in a snapshot: the overlay's check-in is there.
    with relay.store.snapshot() as db:
        [record] = relay.store.clients(db)
    assert record.last_seen == seen and record.facts["freeDiskMB"] == 12_345
    assert relay.store.unflushed() == 1

    def listed() -> str:
        out = subprocess.run([sys.executable, "-m", "reconciler", "clients", "list", "--format", "json",
                              "--workdir", str(relay.store.path.parent)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert out.returncode == 0, out.stderr
        [row] = json.loads(out.stdout)["clients"]
        return str(row["lastSeen"])

    before = listed()  # another process reads SQLite: one flush interval stale
    assert before.startswith("2026-03-01T12:05:00")
    relay.writes.clear()
    assert relay.store.flush_seen() == 1
    assert relay.writes == ["write"] and relay.store.unflushed() == 0
    assert listed().startswith("2026-03-01T12:05:20")
    facts, _, _, last_seen = stored_row(relay)
    assert last_seen == seen.timestamp() and json.loads(facts)["freeDiskMB"] == 12_345
    assert relay.store.flush_seen() == 0  # nothing waits: no transaction
    assert relay.writes == ["write"]


def test_a_relay_killed_without_flushing_loses_only_last_seen(relay: Relay) -> None:
    token = converged(relay)
    relay.clock[0] = T0 + timedelta(seconds=7)
    checkin(relay, "pc-1", token, inventory=INSTALLED, labels={"dept": "eng"})  # written
    relay.clock[0] = T0 + timedelta(seconds=14)
    checkin(relay, "pc-1", token, inventory=INSTALLED, labels={"dept": "eng"}, freeDiskMB=1)  # overlay only
    # Killed: the process's memory is gone; what another opening of the file finds is what survived.
    survivor = Store(relay.store.path.parent)
    try:
        record = survivor.client("pc-1")
        assert record is not None
        assert record.last_seen == T0 + timedelta(seconds=7)  # the overlay's 14 s is lost
        assert record.facts["freeDiskMB"] == 100_000
        assert dict(record.labels) == {"dept": "eng"} and record.inventory == (Installed("app", "1.0"),)
        [operation] = survivor.operations_of("pc-1")
        assert operation.outcome.value == "succeeded"
        assert survivor.row_states_of("pc-1")["install-app"].state == "Succeeded"
    finally:
        survivor.close()


def test_a_flush_never_moves_last_seen_back(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        with store.write() as db:
            store.register(db, "pc-1", T0)
        store.note_seen("pc-1", {"freeDiskMB": 1}, T0 + timedelta(seconds=5))
        with store.write() as db:  # a check-in that wrote the row later (labels changed)
            store.record_report(db, "pc-1", {"freeDiskMB": 2}, {"a": "b"}, (), T0 + timedelta(seconds=9))
        store.note_seen("pc-1", {"freeDiskMB": 3}, T0 + timedelta(seconds=8))  # a late, older one
        store.flush_seen()
        record = Store(tmp_path).client("pc-1")
        assert record is not None and record.last_seen == T0 + timedelta(seconds=9)
        assert record.facts == {"freeDiskMB": 2}
    finally:
        store.close()



def test_a_relay_process_writes_what_waits_in_memory_when_it_stops(cluster: Cluster) -> None:
    """``reconciler relay`` on SIGTERM: the overlay's check-ins reach the database before it exits."""
    commit = cluster.accept({"topology.yaml": topology(("relay-a", "hq-x"))})
    relay = cluster.relay("relay-a", poll_seconds=60)  # online window 210 s: nothing counts as coming back
    cluster.at_commit(relay, commit)

    def post(token: str | None, disk: int) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {protocol.ENROLLMENT_HEADER: ENROLL_SECRET}
        response = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", json=checkin_body(freeDiskMB=disk),
                                 headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    token = post(None, 1000)["token"]  # registered: written
    post(token, 2000)  # the token's first use confirms the registration: written
    post(token, 3000)  # nothing but free disk changed: kept in memory
    assert relay.stop() == 0
    with sqlite3.connect(relay.workdir / "relay.sqlite3") as db:
        facts = json.loads(db.execute("SELECT facts FROM clients WHERE id = 'pc-1'").fetchone()[0])
    assert facts["freeDiskMB"] == 3000


class _WatchedLock:
    """A lock that tells when someone had to wait for it (the store's write lock, in the test below)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waited = threading.Event()

    def __enter__(self) -> _WatchedLock:
        if not self.lock.acquire(blocking=False):
            self.waited.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_a_checkin_waiting_to_write_holds_up_no_checkin_that_writes_nothing(relay: Relay,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    token = converged(relay)
    lock = _WatchedLock()
    monkeypatch.setattr(relay.store, "write_lock", lock)
    relay.clock[0] = T0 + timedelta(seconds=7)
    with ThreadPoolExecutor(1) as pool:
        with relay.store.write():  # another writer holds the database: a pass's chunk of row states, a flush
            registering = pool.submit(checkin, relay, "pc-2", None)
            assert lock.waited.wait(10), "the registration never waited for the write lock"
            # Changes nothing: served while the registration waits (check-ins are read one at a time, and a
            # check-in lets that turn go before it waits to write).
            reply = checkin(relay, "pc-1", token, inventory=INSTALLED)
            assert reply["actions"] == [] and not registering.done()
        assert registering.result(timeout=10)["token"]
    record = relay.store.client("pc-1")
    assert record is not None and record.last_seen == T0 + timedelta(seconds=7)
