"""The relay's SQLite store: migrations, registration, results, history, row states, durability."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.plan import ActionKind, Attempt, Installed, Outcome
from reconciler.relay.store import (
    DB_NAME,
    MIGRATIONS,
    RowState,
    Store,
    StoreError,
    hash_token,
    token_matches,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def attempt(op: str, job: str = "install-app", client: str = "pc-1", n: int = 1,
            at: datetime = T0) -> Attempt:
    return Attempt(operation_id=op, job=job, client=client, revision="rev1", rerun=0, attempt=n,
                   action=ActionKind.INSTALL, version="1.0", outcome=Outcome.DISPATCHED, dispatched_at=at)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def test_new_database_is_wal_at_latest_schema(store: Store) -> None:
    assert store.schema_version() == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    s = Store(tmp_path)
    with s.write() as db:
        s.register(db, "pc-1", T0)
    s.close()
    s = Store(tmp_path)
    assert s.schema_version() == len(MIGRATIONS)
    assert s.client("pc-1") is not None
    s.close()


def test_database_from_a_newer_program_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this program"):
        Store(tmp_path)


def test_full_synchronous_mode_can_be_chosen(tmp_path: Path) -> None:
    s = Store(tmp_path, synchronous="FULL")
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    s.close()
    with pytest.raises(StoreError):
        Store(tmp_path, synchronous="OFF")


def test_migration_from_version_1_keeps_clients_confirmed(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    MIGRATIONS[0](db)
    db.execute("INSERT INTO clients (id, token_hash, first_seen, last_seen) VALUES ('pc-1', 'h', 0, 0)")
    db.close()
    s = Store(tmp_path)
    assert s.schema_version() == len(MIGRATIONS) and s.credentials("pc-1") == ("h", True, True)
    s.close()


def test_a_move_counts_only_while_the_client_has_not_checked_in_here_since(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        store.register(db, "pc-2", T0)
        assert store.record_arrival(db, "pc-2", "relay-x", T0)
        assert not store.record_arrival(db, "pc-2", "relay-x", T0 + timedelta(minutes=1))  # no news
    # HQ: pc-1 went to relay-b a minute after its last check-in here; a stale word about pc-2 changes nothing
    assert store.record_departures([("pc-1", "relay-b", T0 + timedelta(minutes=1)),
                                    ("pc-2", "relay-b", T0 - timedelta(minutes=1)),
                                    ("pc-9", "relay-b", T0 + timedelta(minutes=1))]) == 1
    assert store.record_departures([("pc-1", "relay-b", T0 + timedelta(minutes=1))]) == 0  # the same again
    pc1, pc2 = store.clients()
    assert pc1.moved_away() and (pc1.moved_to, pc1.moved_at) == ("relay-b", T0 + timedelta(minutes=1))
    assert not pc2.moved_away() and (pc2.came_from, pc2.came_at) == ("relay-x", T0)
    # pc-1 comes back here: it counts here again
    with store.write() as db:
        store.record_report(db, "pc-1", {}, {}, (), T0 + timedelta(minutes=5))
    assert not store.client("pc-1").moved_away()  # type: ignore[union-attr]


def test_unconfirmed_registration_can_be_reissued_until_confirmed(store: Store) -> None:
    with store.write() as db:
        first = store.register(db, "pc-1", T0)
        assert first and store.credentials("pc-1") == (hash_token(first), False, True)
        second = store.reissue(db, "pc-1")
        assert second and second != first
        assert not store.confirm(db, "pc-1", hash_token(first))
        assert store.confirm(db, "pc-1", hash_token(second))
        assert store.reissue(db, "pc-1") is None
    assert store.credentials("pc-1") == (hash_token(second), True, True)


def test_register_once_and_token_is_stored_hashed(store: Store) -> None:
    with store.write() as db:
        token = store.register(db, "pc-1", T0)
        again = store.register(db, "pc-1", T0)
    assert token and again is None
    stored = store.token_hash("pc-1")
    assert stored == hash_token(token) and token not in stored
    assert token_matches(token, stored) and not token_matches(token + "x", stored)
    assert store.token_hash("pc-2") is None


def test_report_is_recorded_and_change_detected(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        assert store.record_report(db, "pc-1", {"os": "linux"}, {"dept": "sales"},
                                   [Installed("app", "1.0")], T0)
        assert not store.record_report(db, "pc-1", {"os": "linux"}, {"dept": "sales"},
                                       [Installed("app", "1.0")], T0 + timedelta(seconds=1))
        # A fact (free disk) moving is stored but is not a change worth a status pass.
        assert not store.record_report(db, "pc-1", {"os": "linux", "freeDiskMB": 5}, {"dept": "sales"},
                                       [Installed("app", "1.0")], T0 + timedelta(seconds=5))
        assert store.record_report(db, "pc-1", {"os": "linux", "freeDiskMB": 5}, {"dept": "eng"},
                                   [Installed("app", "1.0")], T0 + timedelta(seconds=5))
        assert store.record_report(db, "pc-1", {"os": "linux", "freeDiskMB": 5}, {"dept": "sales"},
                                   [Installed("app", "1.0")], T0 + timedelta(seconds=5))
    record = store.client("pc-1")
    assert record is not None
    assert record.facts == {"os": "linux", "freeDiskMB": 5} and record.labels == {"dept": "sales"}
    assert record.inventory == (Installed("app", "1.0"),)
    assert record.first_seen == T0 and record.last_seen == T0 + timedelta(seconds=5)
    assert [c.id for c in store.clients()] == ["pc-1"]


def test_dispatch_becomes_latest_attempt_and_repeats_are_ignored(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        assert store.record_dispatch(db, attempt("op-1"))
        assert not store.record_dispatch(db, attempt("op-1"))
        assert store.record_dispatch(db, attempt("op-2", n=2, at=T0 + timedelta(minutes=1)))
        assert store.record_dispatch(db, attempt("op-3", job="other"))
    history = store.history_of("pc-1")
    assert set(history) == {("install-app", "pc-1"), ("other", "pc-1")}
    assert history[("install-app", "pc-1")].operation_id == "op-2"
    assert history[("install-app", "pc-1")].attempt == 2
    assert store.history() == history
    assert [a.operation_id for a in store.operations_of("pc-1")] == ["op-1", "op-3", "op-2"]


def test_results_update_only_own_dispatched_operations(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        store.register(db, "pc-2", T0)
        store.record_dispatch(db, attempt("op-1"))
        store.record_dispatch(db, attempt("op-2", client="pc-2"))
    later = T0 + timedelta(minutes=2)
    with store.write() as db:
        done = store.record_results(db, "pc-1", [
            {"operationId": "op-1", "status": "failed", "exitCode": 3, "message": "boom"},
            {"operationId": "op-2", "status": "succeeded", "exitCode": 0, "message": ""},  # not pc-1's
            {"operationId": "op-unknown", "status": "succeeded", "exitCode": 0, "message": ""},
        ], later)
    assert [(d.operation_id, d.outcome) for d in done] == [("op-1", Outcome.FAILED)]
    with store.write() as db:  # a repeat is a no-op
        assert store.record_results(db, "pc-1", [
            {"operationId": "op-1", "status": "succeeded", "exitCode": 0, "message": "x"}], later) == []
    op1 = store.operation("op-1")
    assert op1 is not None and op1.outcome is Outcome.FAILED and op1.message == "boom"
    assert op1.finished_at == later
    op2 = store.operation("op-2")
    assert op2 is not None and op2.outcome is Outcome.DISPATCHED


def test_row_states_are_read_per_job_sharing_one_object_per_state_and_time(store: Store) -> None:
    with store.write() as db:
        store.set_row_states(db, [(f"job-{j}", f"pc-{c}", "Succeeded", T0) for j in "ab" for c in range(3)]
                             + [("job-a", "pc-9", "Failed", T0 + timedelta(seconds=5))])
    states = store.row_states()
    assert {job: sorted(of_job) for job, of_job in states.items()} == {
        "job-a": ["pc-0", "pc-1", "pc-2", "pc-9"], "job-b": ["pc-0", "pc-1", "pc-2"]}
    assert states["job-a"]["pc-9"] == RowState("Failed", T0 + timedelta(seconds=5))
    same = {id(s) for of_job in states.values() for c, s in of_job.items() if c != "pc-9"}
    assert len(same) == 1 and states["job-b"]["pc-0"] == RowState("Succeeded", T0)
    client_a = next(c for c in states["job-a"] if c == "pc-1")
    client_b = next(c for c in states["job-b"] if c == "pc-1")
    assert client_a is client_b  # one string per client across jobs


def test_row_states_upsert_and_delete(store: Store) -> None:
    with store.write() as db:
        store.set_row_states(db, [("job-a", "pc-1", "Pending", T0), ("job-b", "pc-1", "Succeeded", T0)])
        store.set_row_states(db, [("job-a", "pc-1", "InProgress", T0 + timedelta(seconds=1))])
    states = store.row_states_of("pc-1")
    assert states["job-a"].state == "InProgress" and states["job-a"].since == T0 + timedelta(seconds=1)
    with store.write() as db:
        store.delete_row_states(db, [("job-b", "pc-1")])
    assert {job: set(of_job) for job, of_job in store.row_states().items()} == {"job-a": {"pc-1"}}


def test_failed_transaction_rolls_back(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.write() as db:
            store.register(db, "pc-1", T0)
            raise RuntimeError("boom")
    assert store.client("pc-1") is None


def test_connections_are_per_thread(store: Store) -> None:
    seen: list[int] = []

    def worker() -> None:
        seen.append(id(store.db))
        with store.write() as db:
            store.register(db, f"pc-{threading.get_ident() % 1000}", T0)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 4 and id(store.db) not in seen


def test_committed_writes_survive_kill_9(tmp_path: Path) -> None:
    """A child commits, reports, then is killed -9 before any orderly close: nothing is lost."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from datetime import datetime, timezone
        from pathlib import Path
        from reconciler.plan import ActionKind, Attempt, Outcome
        from reconciler.relay.store import Store
        s = Store(Path({str(tmp_path)!r}))
        now = datetime.now(timezone.utc)
        for i in range(50):
            with s.write() as db:
                s.register(db, f"pc-{{i}}", now)
                s.record_dispatch(db, Attempt(f"op-{{i}}", "job", f"pc-{{i}}", "r", 0, 1, ActionKind.INSTALL,
                                              "1", Outcome.DISPATCHED, now))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "committed" and proc.returncode == -9
    s = Store(tmp_path)
    assert len(s.clients()) == 50 and len(s.history()) == 50
    s.close()


def test_prune_keeps_latest_attempts_and_recent_operations(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        store.record_dispatch(db, attempt("op-old", n=1, at=T0))
        store.record_dispatch(db, attempt("op-latest", n=2, at=T0 + timedelta(minutes=1)))
        store.record_dispatch(db, attempt("op-open", job="other", at=T0))
        store.record_dispatch(db, attempt("op-lost", job="third", at=T0 - timedelta(days=2)))  # never answered
        store.record_dispatch(db, attempt("op-third", job="third", n=2, at=T0))
        store.record_results(db, "pc-1", [{"operationId": "op-old", "status": "failed", "message": "x"},
                                          {"operationId": "op-latest", "status": "succeeded", "message": ""}],
                             T0 + timedelta(minutes=2))
    assert store.prune_operations(T0 - timedelta(days=3)) == 0
    assert store.prune_operations(T0 + timedelta(days=1)) == 2  # op-old and the superseded op-lost
    assert [a.operation_id for a in store.operations_of("pc-1")] == ["op-open", "op-third", "op-latest"]


def test_an_inventory_entry_keeps_its_source(store: Store) -> None:
    with store.write() as db:
        store.register(db, "pc-1", T0)
        store.record_report(db, "pc-1", {}, {}, [Installed("app", "1.0")], T0)
        # the same version, now found by the package's detection rule instead of the agent's receipt
        assert store.record_report(db, "pc-1", {}, {}, [Installed("app", "1.0", "detected")], T0)
    record = store.client("pc-1")
    assert record is not None and record.inventory == (Installed("app", "1.0", "detected"),)
    stored = store.db.execute("SELECT inventory FROM clients WHERE id = 'pc-1'").fetchone()[0]
    assert json.loads(stored) == [{"name": "app", "version": "1.0", "source": "detected"}]


def test_a_read_of_many_clients_shares_their_labels_and_fact_strings(store: Store) -> None:
    now = datetime.now(timezone.utc)
    with store.write() as db:
        for n, dept in ((1, "eng"), (2, "eng"), (3, "sales")):
            store.register(db, f"pc-{n}", now)
            store.record_report(db, f"pc-{n}", {"os": "linux", "hostname": f"pc-{n}", "freeDiskMB": n},
                                {"dept": dept}, [], now)
    one, two, three = store.clients()
    assert one.labels is two.labels and one.labels == {"dept": "eng"}  # one decoded dict per stored text
    assert three.labels == {"dept": "sales"}
    assert one.facts["os"] is two.facts["os"] is three.facts["os"]
    assert [r.facts for r in (one, two, three)] == [
        {"os": "linux", "hostname": f"pc-{n}", "freeDiskMB": n} for n in (1, 2, 3)]
    assert one.facts is not two.facts  # each client's facts its own
