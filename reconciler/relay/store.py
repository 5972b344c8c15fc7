"""The relay's durable state: SQLite in WAL mode in the relay's workdir.

What lives here is what the relay cannot recompute from git: the clients it
has registered (token hashes, last reported facts, labels and inventory), every
operation it dispatched with its outcome, the latest attempt per (job, client)
(the plan engine's ``History``), and when each row's state last changed (the
``updatedAt`` of the status files, which must not move while nothing happens).

Decisions behind it:

* **Acknowledged means committed.** The server writes a check-in (the results
  it acknowledges, the operations it hands out) in one transaction and commits
  it before the reply is sent. WAL with ``synchronous=NORMAL`` makes a commit
  durable against the process being killed (``kill -9``, a crash): the WAL is
  written before ``COMMIT`` returns and only its fsync is deferred. A power
  loss can roll back the last few commits; run with ``synchronous=FULL``
  (environment ``RECONCILER_SQLITE_SYNCHRONOUS=FULL``) where that matters
  more than check-in latency.
* **One connection per thread, one writer at a time.** SQLite connections are
  not shared between threads; readers never block in WAL mode. Writers are
  serialised by a process-wide lock before ``BEGIN IMMEDIATE``, so concurrent
  check-ins queue on a cheap Python lock instead of SQLite's sleeping busy
  handler.
* **Who may be a client is decided here, by rows.** A client's token is
  stored as its SHA-256 only; an empty hash means "no valid token" (the
  operator revoked it with ``reconciler clients rekey``: the client's next
  check-in with the enrolment secret gets a new one). ``approved`` is 0 while
  a registration waits for ``reconciler clients approve``. The lifecycle
  commands run in other processes while the relay serves: they write through
  :meth:`Store.write` (``BEGIN IMMEDIATE``, so they queue behind the relay's
  writers on SQLite's own lock), and the relay reads credentials from the
  database at every request, never from a cache, so a change counts at the
  next check-in. Each change is a row of ``client_events`` (who, when, what).
* **A check-in that changes nothing writes nothing.** What moves at nearly
  every check-in (``last_seen``, and the facts in :data:`FAST_FACTS`, free
  disk space) is kept in memory, in an overlay (client id -> when seen, its
  facts), and written to ``clients`` in batches by :meth:`Store.flush_seen`
  (the relay calls it every :attr:`Store.flush_interval` seconds, at most
  :data:`SEEN_FLUSH_SECONDS`, and when it stops). Everything else a check-in
  brings (results, dispatches, registrations, labels, inventory, the other
  facts, reboots, software lists, arrivals) is written in the check-in's own
  transaction before the reply, as ever. Readers in the relay's process see
  the overlay: :meth:`Store.clients` and :meth:`Store.client` (the full
  pass, retirement, the online counts) are exact. What reads ``last_seen``
  in SQL may be one flush interval stale: another process's ``reconciler
  clients list``, and the online test of :meth:`Store.usage` (rollout slots
  held by online clients), which the server keeps exact by writing at once
  the check-in of a client whose stored ``last_seen`` is older than the
  online window less two flush intervals (a client coming back). A relay
  killed between flushes loses at most the last flush interval of
  ``last_seen`` times and free-disk figures, nothing else.
* **Versioned migrations.** ``schema_version`` holds the number of migrations
  applied; :data:`MIGRATIONS` is append-only. A database written by a newer
  program is refused rather than guessed at.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from reconciler import protocol
from reconciler.plan import ActionKind, Attempt, Installed, Outcome, RolloutUsage

DB_NAME = "relay.sqlite3"
MESSAGE_LIMIT = 4000  # characters of an operation's message kept
# Facts that move at nearly every check-in: kept in the overlay, never a reason to write a check-in.
FAST_FACTS = frozenset({"freeDiskMB"})
SEEN_FLUSH_SECONDS = 10.0  # the longest the overlay of last-seen times waits for SQLite
SEEN_FLUSH_CHUNK = 2000  # rows per flush transaction: bounds how long one holds the write lock


class StoreError(Exception):
    """The relay database cannot be used (newer schema, unreadable file)."""


# ------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One registered client as last reported."""

    id: str
    token_hash: str
    facts: Mapping[str, Any]
    labels: Mapping[str, str]
    inventory: tuple[Installed, ...]
    first_seen: datetime
    last_seen: datetime
    came_from: str | None = None  # the relay it said it moved here from (its lastRelay), when it did
    came_at: datetime | None = None
    moved_to: str | None = None  # the relay HQ says it moved to; it counts there unless seen here since
    moved_at: datetime | None = None
    approved: bool = True  # False while it waits for `reconciler clients approve`
    confirmed: bool = True  # False until it has used its token (and after a rekey)

    @property
    def has_token(self) -> bool:
        """Whether a token is valid for it (a rekey revokes it until the next enrolled check-in)."""
        return bool(self.token_hash)

    def moved_away(self) -> bool:
        """Whether it moved to another relay and has not checked in here since."""
        return self.moved_at is not None and self.last_seen < self.moved_at


class StoredReport(NamedTuple):
    """A client's row as stored (JSON text as written), to tell whether a check-in changes it."""

    facts: str
    labels: str
    inventory: str
    last_seen: datetime  # as in SQLite: may be older than the overlay's
    came_from: str | None


class CheckinView(NamedTuple):
    """What a check-in reads of its client before deciding whether it writes: one indexed query."""

    credentials: Credentials
    report: StoredReport
    software_digest: str | None  # of the software list held, if any


class Credentials(NamedTuple):
    """What authenticating a client needs: its token hash ('' when revoked), and its registration's state."""

    token_hash: str
    confirmed: bool  # its token was used at least once: nobody may take the registration over
    approved: bool  # False while it waits for `reconciler clients approve`


@dataclass(frozen=True)
class ClientEvent:
    """One change to a registration: who made it (an OS user, or the relay itself) and when."""

    at: datetime
    client: str
    action: str  # registered, newToken, approved, forgotten, rekeyed
    actor: str
    detail: str


@dataclass(frozen=True, slots=True)
class RowState:
    state: str
    since: datetime


@dataclass(frozen=True)
class FinishedOperation:
    """An operation whose result was recorded by this check-in (not a repeat)."""

    operation_id: str
    job: str
    attempt: int
    outcome: Outcome


@dataclass(frozen=True)
class RebootRecord:
    """A succeeded operation whose installer asked for a reboot: since which boot, and when that ended."""

    operation_id: str
    job: str
    finished_at: datetime | None
    boot_id: str | None  # the client's boot id when it finished (None: not known yet)
    cleared_at: datetime | None  # when a check-in first reported another boot id (None: still waiting)


# ------------------------------------------------------------------ helpers


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def slow_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """``facts`` without :data:`FAST_FACTS`: what must be written at once when it changes."""
    return {k: v for k, v in facts.items() if k not in FAST_FACTS}


@functools.lru_cache(maxsize=8192)
def _inventory(raw: str) -> tuple[Installed, ...]:
    """A stored inventory (immutable: clients reporting the same list share one, a full pass parses it once)."""
    return tuple(Installed(e["name"], e["version"], e.get("source", "reconciler")) for e in json.loads(raw))


def inventory_json(installed: Iterable[Installed]) -> str:
    return _dumps([{"name": i.name, "version": i.version, **({"source": i.source} if i.source != "reconciler" else {})}
                   for i in sorted(installed, key=lambda i: i.name)])


# ------------------------------------------------------------------ schema


def _v1(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE clients (
            id          TEXT PRIMARY KEY,
            token_hash  TEXT NOT NULL,
            facts       TEXT NOT NULL DEFAULT '{}',
            labels      TEXT NOT NULL DEFAULT '{}',
            inventory   TEXT NOT NULL DEFAULT '[]',
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL
        ) WITHOUT ROWID""")
    db.execute("""
        CREATE TABLE operations (
            operation_id  TEXT PRIMARY KEY,
            job           TEXT NOT NULL,
            client        TEXT NOT NULL,
            revision      TEXT NOT NULL,
            rerun         INTEGER NOT NULL,
            attempt       INTEGER NOT NULL,
            action        TEXT NOT NULL,
            version       TEXT,
            outcome       TEXT NOT NULL,
            dispatched_at REAL NOT NULL,
            finished_at   REAL,
            exit_code     INTEGER,
            message       TEXT NOT NULL DEFAULT ''
        )""")
    db.execute("CREATE INDEX operations_by_client ON operations (client, job)")
    # The plan engine's History: the latest operation per (job, client).
    db.execute("""
        CREATE TABLE latest_attempts (
            client        TEXT NOT NULL,
            job           TEXT NOT NULL,
            operation_id  TEXT NOT NULL,
            PRIMARY KEY (client, job)
        ) WITHOUT ROWID""")
    # When each status row entered its current state (updatedAt).
    db.execute("""
        CREATE TABLE row_states (
            client  TEXT NOT NULL,
            job     TEXT NOT NULL,
            state   TEXT NOT NULL,
            since   REAL NOT NULL,
            PRIMARY KEY (client, job)
        ) WITHOUT ROWID""")


def _v2(db: sqlite3.Connection) -> None:
    # A registration is confirmed by the first check-in that presents its token.
    # Until then a token-less check-in is answered with a fresh token: the reply
    # carrying the first one may never have arrived (a relay killed between its
    # commit and its reply), and the client must not be locked out for that.
    # Clients registered before this migration have used their tokens.
    db.execute("ALTER TABLE clients ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1")


def _v3(db: sqlite3.Connection) -> None:
    # Rows per (job, state), kept by triggers in the same transaction as every
    # row state change: rollout limits read them at each check-in, and they
    # cannot disagree with the rows they count.
    db.execute("""
        CREATE TABLE job_state_counts (
            job    TEXT NOT NULL,
            state  TEXT NOT NULL,
            n      INTEGER NOT NULL,
            PRIMARY KEY (job, state)
        ) WITHOUT ROWID""")
    db.execute("INSERT INTO job_state_counts (job, state, n) SELECT job, state, COUNT(*) FROM row_states "
               "GROUP BY job, state")
    db.execute("""
        CREATE TRIGGER row_states_insert AFTER INSERT ON row_states BEGIN
            INSERT INTO job_state_counts (job, state, n) VALUES (NEW.job, NEW.state, 1)
                ON CONFLICT (job, state) DO UPDATE SET n = n + 1;
        END""")
    db.execute("""
        CREATE TRIGGER row_states_delete AFTER DELETE ON row_states BEGIN
            UPDATE job_state_counts SET n = n - 1 WHERE job = OLD.job AND state = OLD.state;
        END""")
    db.execute("""
        CREATE TRIGGER row_states_update AFTER UPDATE OF state ON row_states
        WHEN OLD.state IS NOT NEW.state BEGIN
            UPDATE job_state_counts SET n = n - 1 WHERE job = OLD.job AND state = OLD.state;
            INSERT INTO job_state_counts (job, state, n) VALUES (NEW.job, NEW.state, 1)
                ON CONFLICT (job, state) DO UPDATE SET n = n + 1;
        END""")
    # In-progress rows of a job, to count the online ones at a check-in.
    db.execute("CREATE INDEX row_states_by_job_state ON row_states (job, state)")


def _v4(db: sqlite3.Connection) -> None:
    # How many times in a row this attempt number was handed out and came back not attempted
    # (the client could not download the artifact): bounds those free retries.
    db.execute("ALTER TABLE operations ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0")


def _v5(db: sqlite3.Connection) -> None:
    # Clients move between relays: where one came from (it said so at a check-in), and where HQ
    # says it went (it counts there, and no longer here, unless it checks in here again).
    db.execute("ALTER TABLE clients ADD COLUMN came_from TEXT")
    db.execute("ALTER TABLE clients ADD COLUMN came_at REAL")
    db.execute("ALTER TABLE clients ADD COLUMN moved_to TEXT")
    db.execute("ALTER TABLE clients ADD COLUMN moved_at REAL")


def _v6(db: sqlite3.Connection) -> None:
    # Enrolment: a registration may wait for an operator's approval (clients registered before
    # this migration were admitted under the old rules and stay approved); artifacts are served
    # to a client's token, looked up by its hash; every change to a registration is recorded.
    db.execute("ALTER TABLE clients ADD COLUMN approved INTEGER NOT NULL DEFAULT 1")
    db.execute("CREATE INDEX clients_by_token ON clients (token_hash)")
    db.execute("""
        CREATE TABLE client_events (
            seq     INTEGER PRIMARY KEY,
            at      REAL NOT NULL,
            client  TEXT NOT NULL,
            action  TEXT NOT NULL,
            actor   TEXT NOT NULL,
            detail  TEXT NOT NULL DEFAULT ''
        )""")
    db.execute("CREATE INDEX client_events_by_client ON client_events (client, seq)")


def _v7(db: sqlite3.Connection) -> None:
    # The OS's software inventory a client reported (README, "Software inventory"): apart from the clients
    # row, so the check-ins that do not carry it (nearly all) never rewrite it, and planning never reads it.
    db.execute("""
        CREATE TABLE client_software (
            client    TEXT PRIMARY KEY,
            digest    TEXT NOT NULL,
            omitted   INTEGER NOT NULL DEFAULT 0,
            software  TEXT NOT NULL,
            updated   REAL NOT NULL
        ) WITHOUT ROWID""")


def _v8(db: sqlite3.Connection) -> None:
    # Reboots: a succeeded operation whose installer asked for one waits for the client to reboot. The
    # boot id is the client's when the operation finished; the wait ends (and when is recorded) at the
    # first check-in that reports another boot id.
    db.execute("ALTER TABLE operations ADD COLUMN reboot_required INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE operations ADD COLUMN reboot_boot_id TEXT")
    db.execute("ALTER TABLE operations ADD COLUMN reboot_cleared_at REAL")
    # The operations still waiting, per client: a check-in looks them up by this index.
    db.execute("CREATE INDEX operations_waiting_for_reboot ON operations (client) "
               "WHERE reboot_required = 1 AND reboot_cleared_at IS NULL")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
"""Append-only: migration ``n`` (1-based) brings the schema from version n-1 to n."""

_ATTEMPT_COLUMNS = ("o.operation_id, o.job, o.client, o.revision, o.rerun, o.attempt, o.action, o.version, "
                    "o.outcome, o.dispatched_at, o.finished_at, o.message, o.deferrals, "
                    "o.reboot_required = 1 AND o.reboot_cleared_at IS NULL")


def _attempt(row: Sequence[Any]) -> Attempt:
    return Attempt(
        operation_id=row[0], job=row[1], client=row[2], revision=row[3], rerun=row[4], attempt=row[5],
        action=ActionKind(row[6]), version=row[7], outcome=Outcome(row[8]),
        dispatched_at=_dt(row[9]),  # type: ignore[arg-type]
        finished_at=_dt(row[10]), message=row[11], deferrals=row[12], reboot_pending=bool(row[13]),
    )


_CLIENT_COLUMNS = ("id, token_hash, facts, labels, inventory, first_seen, last_seen, came_from, came_at, moved_to, "
                   "moved_at, approved, confirmed")


class _Shared:
    """What a read of many clients decodes once: labels per distinct stored text, one string per distinct fact
    name and text value.

    A fleet's clients mostly share their labels and most fact values ("linux",
    "x86_64"); decoded one client at a time, 50,000 of them took 42 MB
    (tracemalloc), most of it copies of the same few strings and dicts. The
    records are read-only, so they may share them.
    """

    def __init__(self) -> None:
        self._labels: dict[str, Mapping[str, str]] = {}
        self._strings: dict[str, str] = {}

    def labels(self, raw: str) -> Mapping[str, str]:
        held = self._labels.get(raw)
        if held is None:
            held = self._labels[raw] = json.loads(raw)
        return held

    def facts(self, raw: str) -> dict[str, Any]:
        strings = self._strings
        return {strings.setdefault(key, key): strings.setdefault(value, value) if type(value) is str else value
                for key, value in json.loads(raw).items()}


def _client(r: Sequence[Any], seen: tuple[float, str] | None = None, shared: _Shared | None = None) -> ClientRecord:
    facts, last_seen = r[2], r[6]
    if seen is not None and seen[0] > last_seen:  # the overlay's newer check-in
        last_seen, facts = seen
    return ClientRecord(r[0], r[1], json.loads(facts) if shared is None else shared.facts(facts),
                        json.loads(r[3]) if shared is None else shared.labels(r[3]), _inventory(r[4]),
                        _dt(r[5]), _dt(last_seen), r[7], _dt(r[8]), r[9], _dt(r[10]),  # type: ignore[arg-type]
                        bool(r[11]), bool(r[12]))


# ------------------------------------------------------------------ the store


class Store:
    """The relay database. Thread-safe: each thread gets its own connection."""

    def __init__(self, workdir: Path, *, synchronous: str | None = None) -> None:
        self.path = Path(workdir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = (synchronous or os.environ.get("RECONCILER_SQLITE_SYNCHRONOUS") or "NORMAL").upper()
        if mode not in ("NORMAL", "FULL", "EXTRA"):
            raise StoreError(f"unsupported synchronous mode {mode!r} (NORMAL, FULL or EXTRA)")
        self._synchronous = mode
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.write_lock = threading.Lock()
        # The overlay of last-seen times (see the module's docstring): client id -> (last_seen, facts JSON).
        # ``_flushing`` holds a batch being written, so readers see it until it is committed.
        self.flush_interval = SEEN_FLUSH_SECONDS
        self._seen: dict[str, tuple[float, str]] = {}
        self._flushing: dict[str, tuple[float, str]] = {}
        self._seen_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._migrate()

    # -- connections ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open relay database {self.path}: {e}") from None
        with self._connections_lock:
            self._connections.append(db)
        return db

    @property
    def db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._local.db = db
        return db

    def close(self) -> None:
        """Close every thread's connection (call once the server and loop have stopped)."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on normal exit (before the caller replies), rolled back on error."""
        db = self.db
        with self.write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def snapshot(self, at_pin: Callable[[], None] | None = None) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one consistent state.

        ``at_pin`` runs under the write lock at the instant the snapshot is
        taken, so it can mark exactly which writes the snapshot includes.
        """
        db = self.db
        with self.write_lock:
            db.execute("BEGIN")
            try:
                db.execute("SELECT 1 FROM schema_version").fetchall()  # pins the snapshot now
                if at_pin is not None:
                    at_pin()
            except BaseException:
                db.execute("COMMIT")
                raise
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def _migrate(self) -> None:
        with self.write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this program knows "
                    f"({len(MIGRATIONS)}); upgrade the relay or use a new workdir")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[number - 1](db)
                db.execute("UPDATE schema_version SET version = ?", (number,))

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT version FROM schema_version").fetchone()[0])

    # -- clients -------------------------------------------------------------

    def token_hash(self, client_id: str) -> str | None:
        row = self.db.execute("SELECT token_hash FROM clients WHERE id = ?", (client_id,)).fetchone()
        return None if row is None else str(row[0])

    def credentials(self, client_id: str) -> Credentials | None:
        """How to authenticate a registered client; None if unknown."""
        row = self.db.execute("SELECT token_hash, confirmed, approved FROM clients WHERE id = ?",
                              (client_id,)).fetchone()
        return None if row is None else Credentials(str(row[0]), bool(row[1]), bool(row[2]))

    def client_of_token(self, token: str) -> tuple[str, bool] | None:
        """(client id, approved) of the client holding ``token``; None if no client does.

        Looked up by the token's SHA-256 (an index): tokens are 256 random
        bits, so how long the lookup takes tells a guesser nothing.
        """
        row = self.db.execute("SELECT id, approved, token_hash FROM clients WHERE token_hash = ? LIMIT 1",
                              (hash_token(token),)).fetchone()
        if row is None or not token_matches(token, str(row[2])):
            return None
        return str(row[0]), bool(row[1])

    def register(self, db: sqlite3.Connection, client_id: str, now: datetime, *, approved: bool = True,
                 actor: str = "relay") -> str | None:
        """Create a client and return its new token; None if it exists already (inside :meth:`write`)."""
        token = new_token()
        cursor = db.execute(
            "INSERT INTO clients (id, token_hash, first_seen, last_seen, confirmed, approved) "
            "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (id) DO NOTHING",
            (client_id, hash_token(token), _ts(now), _ts(now), int(approved)))
        if cursor.rowcount != 1:
            return None
        self.record_event(db, client_id, "registered", actor, "" if approved else "waits for approval", now)
        return token

    def reissue(self, db: sqlite3.Connection, client_id: str, now: datetime | None = None, *,
                actor: str = "relay") -> str | None:
        """A new token for a registration never confirmed (or rekeyed); None once it is confirmed.

        Only for a caller that presented the enrolment secret (or a relay
        with open enrolment): the server decides that.
        """
        token = new_token()
        cursor = db.execute("UPDATE clients SET token_hash = ? WHERE id = ? AND confirmed = 0",
                            (hash_token(token), client_id))
        if cursor.rowcount != 1:
            return None
        if now is not None:
            self.record_event(db, client_id, "newToken", actor, "", now)
        return token

    def confirm(self, db: sqlite3.Connection, client_id: str, token_hash: str) -> bool:
        """Mark the registration confirmed (its token was used); False if the token changed meanwhile."""
        cursor = db.execute("UPDATE clients SET confirmed = 1 WHERE id = ? AND token_hash = ?",
                            (client_id, token_hash))
        return cursor.rowcount == 1

    # -- registrations: the operator's lifecycle commands -------------------

    @staticmethod
    def record_event(db: sqlite3.Connection, client_id: str, action: str, actor: str, detail: str,
                     now: datetime) -> None:
        db.execute("INSERT INTO client_events (at, client, action, actor, detail) VALUES (?, ?, ?, ?, ?)",
                   (_ts(now), client_id, action, actor, detail))

    def last_event(self, db: sqlite3.Connection | None = None) -> int:
        """The sequence number of the newest client event (0: none): it moves when an operator changed a client."""
        row = (db or self.db).execute("SELECT max(seq) FROM client_events").fetchone()
        return int(row[0] or 0)

    def approve(self, client_id: str, actor: str, now: datetime) -> bool | None:
        """Admit a registration waiting for approval: True; False if it was approved already; None if unknown."""
        with self.write() as db:
            row = db.execute("SELECT approved FROM clients WHERE id = ?", (client_id,)).fetchone()
            if row is None:
                return None
            if row[0]:
                return False
            db.execute("UPDATE clients SET approved = 1 WHERE id = ?", (client_id,))
            self.record_event(db, client_id, "approved", actor, "", now)
            return True

    def rekey(self, client_id: str, actor: str, now: datetime) -> bool:
        """Revoke a client's token, keeping its history; its next enrolled check-in gets a new one. False if unknown."""
        with self.write() as db:
            cursor = db.execute("UPDATE clients SET token_hash = '', confirmed = 0 WHERE id = ?", (client_id,))
            if cursor.rowcount != 1:
                return False
            self.record_event(db, client_id, "rekeyed", actor, "token revoked; history kept", now)
            return True

    def forget(self, client_id: str, actor: str, now: datetime) -> bool:
        """Delete a registration with its history (operations, attempts, row states); False if unknown.

        A re-imaged PC enrols again as a new client: a fresh start, rather
        than rows Failed or Succeeded on a machine that no longer exists.
        The events of the id are kept.
        """
        with self.write() as db:
            if db.execute("DELETE FROM clients WHERE id = ?", (client_id,)).rowcount != 1:
                return False
            operations = db.execute("DELETE FROM operations WHERE client = ?", (client_id,)).rowcount
            db.execute("DELETE FROM latest_attempts WHERE client = ?", (client_id,))
            rows = db.execute("DELETE FROM row_states WHERE client = ?", (client_id,)).rowcount
            db.execute("DELETE FROM client_software WHERE client = ?", (client_id,))
            self.record_event(db, client_id, "forgotten", actor,
                              f"registration deleted with {operations} operations and {rows} status rows", now)
            return True

    def events(self, client_id: str | None = None, db: sqlite3.Connection | None = None) -> list[ClientEvent]:
        """Changes to registrations, oldest first (one client's, or every client's)."""
        sql = "SELECT at, client, action, actor, detail FROM client_events"
        args: tuple[str, ...] = ()
        if client_id is not None:
            sql += " WHERE client = ?"
            args = (client_id,)
        rows = (db or self.db).execute(sql + " ORDER BY seq", args)
        return [ClientEvent(_dt(r[0]), r[1], r[2], r[3], r[4]) for r in rows]  # type: ignore[arg-type]

    def record_report(self, db: sqlite3.Connection, client_id: str, facts: Mapping[str, Any],
                      labels: Mapping[str, str], inventory: Iterable[Installed], now: datetime) -> bool:
        """Store what a client reported; True if its labels or inventory changed.

        Facts are stored too but do not count as a change: free disk space
        moves at nearly every check-in, and whatever a fact changes in the
        plan shows up in the client's rows (which the caller compares).
        """
        facts_json, labels_json, inventory_text = _dumps(facts), _dumps(labels), inventory_json(inventory)
        before = db.execute("SELECT labels, inventory FROM clients WHERE id = ?", (client_id,)).fetchone()
        db.execute("UPDATE clients SET facts = ?, labels = ?, inventory = ?, last_seen = ? WHERE id = ?",
                   (facts_json, labels_json, inventory_text, _ts(now), client_id))
        with self._seen_lock:  # written: an older overlay entry would only be skipped by the flush
            held = self._seen.get(client_id)
            if held is not None and held[0] <= _ts(now):
                del self._seen[client_id]
        return before is not None and (before[0] != labels_json or before[1] != inventory_text)

    # -- software inventory --------------------------------------------------

    def record_software(self, db: sqlite3.Connection, client_id: str, digest: str, omitted: int,
                        software: Sequence[protocol.SoftwareEntry], now: datetime) -> bool:
        """Store a client's software list (checked, with its digest); True if it differs from the one held.

        Not a change for planning: the caller does not wake a pass for it
        (the software list never changes a plan); the next pass publishes it.
        """
        cursor = db.execute(
            "INSERT INTO client_software (client, digest, omitted, software, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (client) DO UPDATE SET digest = excluded.digest, omitted = excluded.omitted, "
            "software = excluded.software, updated = excluded.updated WHERE client_software.digest != excluded.digest",
            (client_id, digest, omitted,
             _dumps([[e["name"], e["version"], e["source"]] for e in software]), _ts(now)))
        return cursor.rowcount == 1

    def software_digest(self, client_id: str, db: sqlite3.Connection | None = None) -> str | None:
        """The digest of the software list held for a client, or None."""
        row = (db or self.db).execute("SELECT digest FROM client_software WHERE client = ?", (client_id,)).fetchone()
        return None if row is None else str(row[0])

    def software_digests(self, db: sqlite3.Connection | None = None) -> dict[str, str]:
        """Client -> digest of every software list held (cheap: no list is read)."""
        return dict((db or self.db).execute("SELECT client, digest FROM client_software"))

    def software_lists(self, client_ids: Iterable[str], db: sqlite3.Connection | None = None,
                       ) -> dict[str, tuple[tuple[tuple[str, str, str], ...], int]]:
        """Client -> (its (name, version, source) entries, how many its agent cut) for ``client_ids``."""
        wanted = set(client_ids)
        out: dict[str, tuple[tuple[tuple[str, str, str], ...], int]] = {}
        for client, omitted, text in (db or self.db).execute("SELECT client, omitted, software FROM client_software"):
            if client in wanted:
                out[client] = (tuple((str(e[0]), str(e[1]), str(e[2])) for e in json.loads(text)), int(omitted))
        return out

    def clients(self, db: sqlite3.Connection | None = None, *, pending: bool = False) -> list[ClientRecord]:
        """The registered clients by id; with ``pending``, also those waiting for approval (never planned).

        ``last_seen`` and the facts are the overlay's where it holds newer
        ones (exact in the relay's process; another process reads SQLite,
        at most one flush interval stale).
        """
        where = "" if pending else " WHERE approved = 1"
        rows = (db or self.db).execute(f"SELECT {_CLIENT_COLUMNS} FROM clients{where} ORDER BY id")
        overlay = self._overlay()
        shared = _Shared()
        return [_client(r, overlay.get(r[0]) if overlay else None, shared) for r in rows]

    def client(self, client_id: str, db: sqlite3.Connection | None = None) -> ClientRecord | None:
        r = (db or self.db).execute(f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE id = ?", (client_id,)).fetchone()
        return None if r is None else _client(r, self.seen_of(client_id))

    # -- the overlay of last-seen times ---------------------------------------

    def _overlay(self) -> dict[str, tuple[float, str]]:
        with self._seen_lock:
            if not self._flushing:
                return dict(self._seen) if self._seen else {}
            merged = dict(self._flushing)
            merged.update(self._seen)  # newer than the batch being written
            return merged

    def seen_of(self, client_id: str) -> tuple[float, str] | None:
        """The overlay's (last_seen timestamp, facts JSON) of one client, or None."""
        with self._seen_lock:
            return self._seen.get(client_id) or self._flushing.get(client_id)

    def note_seen(self, client_id: str, facts: Mapping[str, Any], now: datetime) -> None:
        """Remember a check-in that changed nothing else: written by the next :meth:`flush_seen`."""
        entry = (_ts(now), _dumps(facts))
        with self._seen_lock:
            held = self._seen.get(client_id)
            if held is None or held[0] <= entry[0]:
                self._seen[client_id] = entry

    def unflushed(self) -> int:
        """How many clients' last-seen times wait for :meth:`flush_seen`."""
        with self._seen_lock:
            return len(self._seen) + len(self._flushing)

    def flush_seen(self) -> int:
        """Write the overlay to ``clients`` (transactions of :data:`SEEN_FLUSH_CHUNK` rows); how many clients.

        A row is only moved forward: a check-in that wrote the client since
        (a newer ``last_seen``) keeps what it wrote.
        """
        with self._flush_lock:
            with self._seen_lock:
                if not self._seen:
                    return 0
                self._flushing, self._seen = self._seen, {}
                batch = [(facts, seen, client, seen) for client, (seen, facts) in self._flushing.items()]
            try:
                for start in range(0, len(batch), SEEN_FLUSH_CHUNK):
                    with self.write() as db:
                        db.executemany("UPDATE clients SET facts = ?, last_seen = ? WHERE id = ? AND last_seen < ?",
                                       batch[start:start + SEEN_FLUSH_CHUNK])
            except BaseException:
                with self._seen_lock:  # not written: keep it for the next flush (newer entries win)
                    for client, entry in self._flushing.items():
                        if client not in self._seen:
                            self._seen[client] = entry
                    self._flushing = {}
                raise
            with self._seen_lock:
                self._flushing = {}
            return len(batch)

    def checkin_view(self, client_id: str) -> CheckinView | None:
        """A client's credentials, stored report and software digest in one query; None if unknown."""
        row = self.db.execute(
            "SELECT c.token_hash, c.confirmed, c.approved, c.facts, c.labels, c.inventory, c.last_seen, c.came_from, "
            "s.digest FROM clients c LEFT JOIN client_software s ON s.client = c.id WHERE c.id = ?",
            (client_id,)).fetchone()
        if row is None:
            return None
        return CheckinView(Credentials(str(row[0]), bool(row[1]), bool(row[2])),
                           StoredReport(row[3], row[4], row[5], _dt(row[6]), row[7]),  # type: ignore[arg-type]
                           None if row[8] is None else str(row[8]))

    def report_of(self, client_id: str, db: sqlite3.Connection | None = None) -> StoredReport | None:
        """The client's stored facts, labels, inventory (JSON text), SQLite's ``last_seen``, its ``came_from``."""
        row = (db or self.db).execute("SELECT facts, labels, inventory, last_seen, came_from FROM clients "
                                      "WHERE id = ?", (client_id,)).fetchone()
        return None if row is None else StoredReport(row[0], row[1], row[2], _dt(row[3]),  # type: ignore[arg-type]
                                                     row[4])

    @staticmethod
    def report_changes(stored: StoredReport, facts: Mapping[str, Any], labels: Mapping[str, str],
                       inventory: Iterable[Installed]) -> bool:
        """Whether a report differs from the stored one in anything but :data:`FAST_FACTS`."""
        if stored.labels != _dumps(labels) or stored.inventory != inventory_json(inventory):
            return True
        try:
            before = json.loads(stored.facts)
        except ValueError:
            return True
        return not isinstance(before, dict) or slow_facts(before) != slow_facts(facts)

    def reboot_would_clear(self, db: sqlite3.Connection, client_id: str, boot_id: str | None) -> bool:
        """Whether :meth:`clear_reboots` with ``boot_id`` would change anything (a read: one indexed query)."""
        if boot_id is None:
            return False
        return db.execute("SELECT 1 FROM operations WHERE client = ? AND reboot_required = 1 "
                          "AND reboot_cleared_at IS NULL AND (reboot_boot_id IS NULL OR reboot_boot_id != ?) "
                          "LIMIT 1", (client_id, boot_id)).fetchone() is not None

    def record_arrival(self, db: sqlite3.Connection, client_id: str, came_from: str, now: datetime) -> bool:
        """Note that the client says it last spoke to relay ``came_from``; True when that is news."""
        cursor = db.execute("UPDATE clients SET came_from = ?, came_at = ? WHERE id = ? "
                            "AND came_from IS NOT ?", (came_from, _ts(now), client_id, came_from))
        return cursor.rowcount == 1

    def record_departures(self, moves: Iterable[tuple[str, str, datetime]]) -> int:
        """HQ's word that these (client, relay, when) moved to another relay; how many rows it changed.

        A move older than the client's last check-in here is stale (it came
        back since) and changes nothing; the newest move wins.
        """
        changed = 0
        self.flush_seen()  # compared with last_seen in SQL: the overlay's check-ins count
        with self.write() as db:
            for client_id, relay, when in moves:
                changed += db.execute(
                    "UPDATE clients SET moved_to = ?, moved_at = ? WHERE id = ? AND last_seen < ? "
                    "AND (moved_at IS NULL OR moved_at < ?)",
                    (relay, _ts(when), client_id, _ts(when), _ts(when))).rowcount
        return changed

    def client_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM clients WHERE approved = 1").fetchone()[0])

    # -- operations ----------------------------------------------------------

    def record_results(self, db: sqlite3.Connection, client_id: str,
                       results: Iterable[Mapping[str, Any]], now: datetime,
                       boot_id: str | None = None) -> list[FinishedOperation]:
        """Record the outcomes of this client's dispatched operations.

        A result for an operation that already has one, that belongs to another
        client or that the relay never dispatched is ignored: the agent re-sends
        results until a reply reaches it, so repeats are normal. A succeeded
        result with ``rebootRequired`` waits for the client to reboot from the
        result's ``bootId`` (else ``boot_id``, the one this check-in reports).
        """
        finished: list[FinishedOperation] = []
        for result in results:
            outcome = Outcome(result["status"])  # succeeded, failed or notAttempted (validated at the door)
            message = str(result.get("message") or "")[:MESSAGE_LIMIT]
            reboot = outcome is Outcome.SUCCEEDED and result.get("rebootRequired") is True
            row = db.execute(
                "UPDATE operations SET outcome = ?, finished_at = ?, exit_code = ?, message = ?, "
                "reboot_required = ?, reboot_boot_id = ? "
                "WHERE operation_id = ? AND client = ? AND outcome = ? RETURNING job, attempt",
                (outcome.value, _ts(now), result.get("exitCode"), message, int(reboot),
                 (result.get("bootId") or boot_id) if reboot else None, result["operationId"], client_id,
                 Outcome.DISPATCHED.value)).fetchone()
            if row is not None:
                finished.append(FinishedOperation(result["operationId"], row[0], row[1], outcome))
        return finished

    def clear_reboots(self, db: sqlite3.Connection, client_id: str, boot_id: str | None, now: datetime) -> int:
        """The client reports boot id ``boot_id``: every operation of it waiting for a reboot from another
        boot id is done waiting (at ``now``); how many. One whose boot id is not known waits from this one."""
        if boot_id is None:
            return 0
        db.execute("UPDATE operations SET reboot_boot_id = ? WHERE client = ? AND reboot_required = 1 "
                   "AND reboot_cleared_at IS NULL AND reboot_boot_id IS NULL", (boot_id, client_id))
        return db.execute("UPDATE operations SET reboot_cleared_at = ? WHERE client = ? AND reboot_required = 1 "
                          "AND reboot_cleared_at IS NULL AND reboot_boot_id != ?",
                          (_ts(now), client_id, boot_id)).rowcount

    def reboots_of(self, client_id: str, db: sqlite3.Connection | None = None) -> list[RebootRecord]:
        """Every operation of one client whose installer asked for a reboot, oldest first."""
        rows = (db or self.db).execute(
            "SELECT operation_id, job, finished_at, reboot_boot_id, reboot_cleared_at FROM operations "
            "WHERE client = ? AND reboot_required = 1 ORDER BY finished_at, operation_id", (client_id,))
        return [RebootRecord(r[0], r[1], _dt(r[2]), r[3], _dt(r[4])) for r in rows]

    def record_dispatch(self, db: sqlite3.Connection, attempt: Attempt) -> bool:
        """Record a newly dispatched operation as the latest attempt of its (job, client).

        False (and nothing written) if the operation is already known: the
        action is being handed out again, not started anew.
        """
        # The same attempt again after the client could not download its artifact: one more deferral.
        cursor = db.execute(
            "INSERT INTO operations (operation_id, job, client, revision, rerun, attempt, action, version, "
            "outcome, dispatched_at, finished_at, exit_code, message, deferrals) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, '', COALESCE(("
            "  SELECT o.deferrals + 1 FROM latest_attempts l JOIN operations o ON o.operation_id = l.operation_id"
            "  WHERE l.client = ? AND l.job = ? AND o.outcome = ? AND o.attempt = ? AND o.revision = ?"
            "), 0)) ON CONFLICT (operation_id) DO NOTHING",
            (attempt.operation_id, attempt.job, attempt.client, attempt.revision, attempt.rerun, attempt.attempt,
             attempt.action.value, attempt.version, attempt.outcome.value, _ts(attempt.dispatched_at),
             attempt.client, attempt.job, Outcome.NOT_ATTEMPTED.value, attempt.attempt, attempt.revision))
        if cursor.rowcount != 1:
            return False
        db.execute(
            "INSERT INTO latest_attempts (client, job, operation_id) VALUES (?, ?, ?) "
            "ON CONFLICT (client, job) DO UPDATE SET operation_id = excluded.operation_id",
            (attempt.client, attempt.job, attempt.operation_id))
        return True

    def history_of(self, client_id: str, db: sqlite3.Connection | None = None) -> dict[tuple[str, str], Attempt]:
        """Latest attempt per job of one client (an index range scan, not a table scan)."""
        rows = (db or self.db).execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM latest_attempts l JOIN operations o "
            "ON o.operation_id = l.operation_id WHERE l.client = ?", (client_id,))
        return {(r[1], r[2]): _attempt(r) for r in rows}

    def history(self, db: sqlite3.Connection | None = None) -> dict[tuple[str, str], Attempt]:
        """Latest attempt per (job, client) of every client."""
        rows = (db or self.db).execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM latest_attempts l JOIN operations o "
            "ON o.operation_id = l.operation_id")
        return {(r[1], r[2]): _attempt(r) for r in rows}

    def operation(self, operation_id: str) -> Attempt | None:
        row = self.db.execute(f"SELECT {_ATTEMPT_COLUMNS} FROM operations o WHERE o.operation_id = ?",
                              (operation_id,)).fetchone()
        return None if row is None else _attempt(row)

    def operations_of(self, client_id: str) -> list[Attempt]:
        """Every operation of one client, oldest first (diagnostics and tests)."""
        rows = self.db.execute(f"SELECT {_ATTEMPT_COLUMNS} FROM operations o WHERE o.client = ? "
                               "ORDER BY o.dispatched_at, o.operation_id", (client_id,))
        return [_attempt(r) for r in rows]

    def prune_operations(self, older_than: datetime) -> int:
        """Forget operations older than ``older_than`` that are no longer anyone's latest attempt.

        The latest attempt per (job, client) is always kept (it is the plan's
        history); a result arriving later for a pruned operation is ignored
        like any unknown one.
        """
        with self.write() as db:
            cursor = db.execute(
                "DELETE FROM operations WHERE COALESCE(finished_at, dispatched_at) < ? "
                "AND operation_id NOT IN (SELECT operation_id FROM latest_attempts)", (_ts(older_than),))
            return cursor.rowcount

    # -- row states ----------------------------------------------------------

    def row_states_of(self, client_id: str, db: sqlite3.Connection | None = None) -> dict[str, RowState]:
        rows = (db or self.db).execute("SELECT job, state, since FROM row_states WHERE client = ?", (client_id,))
        return {r[0]: RowState(r[1], _dt(r[2])) for r in rows}  # type: ignore[arg-type]

    def row_states(self, db: sqlite3.Connection | None = None) -> dict[str, dict[str, RowState]]:
        """Every row's state, job -> client -> state.

        A full pass at 50,000 clients and six jobs reads 300,000 of them; a
        pass writes thousands of rows at one moment, so (state, since) pairs
        repeat: one :class:`RowState` per pair, one string per client, job
        and state, one dict per job. 12 MB there (tracemalloc), where a dict
        of fresh objects keyed by (job, client) took 77 MB.
        """
        rows = (db or self.db).execute("SELECT job, client, state, since FROM row_states")
        shared: dict[tuple[str, float], RowState] = {}
        names: dict[str, str] = {}
        out: dict[str, dict[str, RowState]] = {}
        for job, client, state, since in rows:
            held = shared.get((state, since))
            if held is None:
                state = names.setdefault(state, state)
                held = shared[(state, since)] = RowState(state, datetime.fromtimestamp(since, tz=timezone.utc))
            of_job = out.get(job)
            if of_job is None:
                of_job = out[job] = {}
            of_job[names.setdefault(client, client)] = held
        return out

    def set_row_states(self, db: sqlite3.Connection, changes: Iterable[tuple[str, str, str, datetime]]) -> None:
        """Upsert (job, client, state, since) rows; callers pass only rows whose state changed."""
        db.executemany(
            "INSERT INTO row_states (client, job, state, since) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (client, job) DO UPDATE SET state = excluded.state, since = excluded.since",
            [(client, job, state, _ts(since)) for job, client, state, since in changes])

    def replace_row_states(self, db: sqlite3.Connection,
                           changes: Iterable[tuple[str, str, str, datetime, str | None]]) -> None:
        """Compare-and-set (job, client, state, since, expected): write only where the stored state is
        still ``expected`` (None: no row yet), so a full pass planned from an older snapshot never
        overwrites what a check-in recorded meanwhile."""
        new_rows, moved = [], []
        for job, client, state, since, expected in changes:
            if expected is None:
                new_rows.append((client, job, state, _ts(since)))
            else:
                moved.append((state, _ts(since), client, job, expected))
        db.executemany("INSERT INTO row_states (client, job, state, since) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (client, job) DO NOTHING", new_rows)
        db.executemany("UPDATE row_states SET state = ?, since = ? WHERE client = ? AND job = ? AND state = ?",
                       moved)

    def usage(self, db: sqlite3.Connection, jobs: Sequence[str], other_than: str, online_since: datetime,
              own: Mapping[str, RowState] | None = None) -> dict[str, RolloutUsage]:
        """What rollout limits count for ``jobs`` on the rows of every client but ``other_than``.

        In progress: rows InProgress of clients heard from since
        ``online_since`` (an offline client holds no slot); failed: rows
        Failed; targets: rows not Skipped. The planned client's own rows are
        left out: its plan replaces them, and only the others' rows can hold
        its starts back. ``own`` is that client's row states when the caller
        has read them already (:meth:`row_states_of`, in the same transaction).
        Online is judged by ``last_seen`` in SQLite, without the overlay: a
        client seen within the window is there as long as flushes keep to
        :attr:`flush_interval` (the server writes at once a check-in whose
        stored ``last_seen`` is older than the window less two flush
        intervals), so a late flush can hide a client that just came back for
        at most its lateness beyond one interval.
        """
        if not jobs:
            return {}
        marks = ",".join("?" * len(jobs))
        counts: dict[str, dict[str, int]] = {job: {} for job in jobs}
        for job, state, n in db.execute(
                f"SELECT job, state, n FROM job_state_counts WHERE job IN ({marks})", list(jobs)):
            counts[job][state] = n
        if own is None:
            own = self.row_states_of(other_than, db)
        for job, row in own.items():
            if job in counts:
                counts[job][row.state] = counts[job].get(row.state, 0) - 1
        # Which of the others' InProgress rows belong to online clients: asked only where there are any.
        running = [job for job, by_state in counts.items() if by_state.get("InProgress", 0) > 0]
        busy: dict[str, int] = {}
        if running:
            busy = dict(db.execute(
                f"SELECT r.job, COUNT(*) FROM row_states r JOIN clients c ON c.id = r.client "
                f"WHERE r.job IN ({','.join('?' * len(running))}) AND r.state = 'InProgress' AND r.client != ? "
                f"AND c.last_seen >= ? GROUP BY r.job", [*running, other_than, _ts(online_since)]).fetchall())
        return {job: RolloutUsage(in_progress=busy.get(job, 0), failed=by_state.get("Failed", 0),
                                  targets=sum(by_state.values()) - by_state.get("Skipped", 0))
                for job, by_state in counts.items()}

    def delete_row_states(self, db: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> None:
        """Forget rows of jobs that no longer reach the relay (or clients it no longer plans)."""
        db.executemany("DELETE FROM row_states WHERE client = ? AND job = ?",
                       [(client, job) for job, client in keys])
