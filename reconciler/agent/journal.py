"""The agent's operation journal, and the atomic-write primitive all agent state uses.

The relay may send the same action more than once (a lost reply, a retry, a
restarted relay), so every action carries an ``operationId`` and the agent
journals what it did with it. One JSON file per operation under
``<root>/journal/``, named by :func:`operation_key`:

``started``
    written *before* anything of the operation happens. An operation found in
    this state was interrupted (the agent was killed mid-way); when the relay
    sends it again it is resumed: the steps before and after its commands
    converge (the package directory is replaced, the receipt rewritten), and
    each installer command runs at most once per operation, because it runs
    under a supervisor that records its exit status in the operation's
    directory, ``journal/<key>/`` (see ``supervisor.py``). A command whose
    result is there is answered from it; skipping the operation instead would
    leave the client half-installed with nobody knowing.

    Entries written by agents from before the supervisor may hold
    ``process``: the pid, start time and timeout of the command that agent
    was waiting on when it was killed. The restarted agent waits for such an
    orphan (up to its timeout, then kills its group) before anything runs
    again; its exit status is lost, so that operation runs again in full.
``finished``
    holds the result. A finished operation is never run again: a repeat is
    answered from the journal. ``acknowledged`` turns true once a check-in that
    carried the result got a reply; until then the result is re-sent at every
    check-in (the relay treats repeats as no-ops).

Every file is written atomically (temp file, fsync, ``os.replace``, fsync of
the directory), so a ``kill -9`` leaves either the old or the new content. A
file that is unreadable anyway (disk corruption, a hand edit) is moved aside to
``*.corrupt`` and the operation counts as unknown, i.e. it runs again when
sent: that is the same outcome as a crash before it finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from reconciler.fileio import quarantine, write_json_atomic
from reconciler.times import format_time, parse_time, utc_now

log = logging.getLogger("reconciler.agent")

STARTED: Literal["started"] = "started"
FINISHED: Literal["finished"] = "finished"

# Acknowledged entries older than this are dropped; the relay never re-sends an
# operation that long after it got the result.
RETENTION = timedelta(days=30)


def operation_key(operation_id: str) -> str:
    """The name of an operation's files: a hash, since ids come from the network."""
    return hashlib.sha256(operation_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One journalled operation, as stored (``result`` only once finished)."""

    operation_id: str
    state: Literal["started", "finished"]
    started_at: str
    action: Mapping[str, Any]
    result: Mapping[str, Any] | None = None
    acknowledged: bool = False
    # the installer command an agent from before the supervisor was waiting on (module docstring);
    # its fields are ``processes.ProcessRecord``'s, which the journal stores without interpreting
    process: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "operationId": self.operation_id,
            "state": self.state,
            "startedAt": self.started_at,
            "action": dict(self.action),
            "result": dict(self.result) if self.result is not None else None,
            "acknowledged": self.acknowledged,
        }
        if self.process is not None:  # absent otherwise: files read the same as before the field existed
            out["process"] = dict(self.process)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Entry:
        """Parse a stored entry; ``ValueError`` for any shape we did not write."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        op = data.get("operationId")
        state = data.get("state")
        started_at = data.get("startedAt")
        action = data.get("action")
        result = data.get("result")
        if not isinstance(op, str) or not op:
            raise ValueError("missing operationId")
        if state not in (STARTED, FINISHED):
            raise ValueError(f"unknown state {state!r}")
        if not isinstance(started_at, str) or not isinstance(action, dict):
            raise ValueError("missing startedAt or action")
        if state == FINISHED:
            if not isinstance(result, dict) or result.get("operationId") != op:
                raise ValueError("finished without a result")
        process = data.get("process")
        if process is not None and not isinstance(process, dict):
            raise ValueError("process is not an object")
        return cls(op, state, started_at, action, result if state == FINISHED else None,
                   bool(data.get("acknowledged", False)), process if state == STARTED else None)


class Journal:
    """Operations by id, kept in memory and mirrored to one file each under ``directory``.

    Loaded once at start: a client sees tens of operations, and reading them at
    every check-in would cost more than it protects against (the agent is the
    only writer).
    """

    def __init__(self, directory: Path, now: Any = utc_now) -> None:
        self.directory = directory
        self._now = now
        self._entries: dict[str, Entry] = {}
        # Owner-only: entries hold results (installer output, masked but still the client's business)
        # and the operations' directories hold the installers' raw output while they run.
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.name != "nt":
            os.chmod(self.directory, 0o700)  # also a journal an older agent made with the umask's mode
        self._load()

    def path_for(self, operation_id: str) -> Path:
        """The file of an operation (its commands' directory is the same name without ``.json``)."""
        return self.directory / f"{operation_key(operation_id)}.json"

    def _load(self) -> None:
        horizon = self._now() - RETENTION
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") and ".tmp-" in path.name:
                path.unlink(missing_ok=True)  # an atomic write cut short by a crash
                continue
            if path.suffix != ".json" or not path.is_file():
                continue
            try:
                entry = Entry.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                quarantine(path, str(exc))
                continue
            if path != self.path_for(entry.operation_id):
                quarantine(path, "file name does not match its operationId")
                continue
            finished = parse_time(str((entry.result or {}).get("finishedAt", "")))
            if entry.acknowledged and finished is not None and finished < horizon:
                path.unlink(missing_ok=True)
                continue
            self._entries[entry.operation_id] = entry

    def _store(self, entry: Entry) -> None:
        write_json_atomic(self.path_for(entry.operation_id), entry.to_dict(), mode=0o600)
        self._entries[entry.operation_id] = entry

    def get(self, operation_id: str) -> Entry | None:
        """The journalled state of an operation, or ``None`` if never seen (or unreadable)."""
        return self._entries.get(operation_id)

    def start(self, operation_id: str, action: Mapping[str, Any]) -> None:
        """Record that the operation is about to run; durable before any side effect."""
        self._store(Entry(operation_id, STARTED, format_time(self._now()), dict(action)))

    def record_process(self, operation_id: str, process: Mapping[str, Any] | None) -> None:
        """Note the installer command running for a started operation (``None``: it no longer runs).

        The agent now only clears records left by agents from before the
        supervisor (module docstring), once their orphan is settled.
        """
        entry = self._entries.get(operation_id)
        if entry is None or entry.state != STARTED:
            return
        if process is None and entry.process is None:
            return
        self._store(replace(entry, process=dict(process) if process is not None else None))

    def interrupted(self) -> list[Entry]:
        """Started operations that recorded a running installer: a previous agent died waiting on it."""
        return [e for e in self._entries.values() if e.state == STARTED and e.process is not None]

    def unfinished(self) -> list[Entry]:
        """Started operations: a previous agent was killed before it finished them."""
        return [e for e in self._entries.values() if e.state == STARTED]

    def finish(self, operation_id: str, result: Mapping[str, Any]) -> None:
        """Record the outcome; from now on the operation is answered from here."""
        previous = self._entries.get(operation_id)
        started_at = previous.started_at if previous else format_time(self._now())
        action = previous.action if previous else {}
        self._store(Entry(operation_id, FINISHED, started_at, action, dict(result), False))

    def requeue(self, operation_id: str) -> None:
        """Send a finished result again: the relay asked for the operation once more."""
        entry = self._entries.get(operation_id)
        if entry is not None and entry.state == FINISHED and entry.acknowledged:
            self._store(replace(entry, acknowledged=False))

    def pending_results(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Finished results the relay has not acknowledged, oldest first."""
        pending = [dict(e.result) for e in self._entries.values()
                   if e.state == FINISHED and not e.acknowledged and e.result is not None]
        pending.sort(key=lambda r: (str(r.get("finishedAt", "")), str(r["operationId"])))
        return pending if limit is None else pending[:limit]

    def acknowledge(self, operation_ids: Iterable[str]) -> None:
        """The relay replied to a check-in carrying these results: stop re-sending them."""
        for op in operation_ids:
            entry = self._entries.get(op)
            if entry is not None and entry.state == FINISHED and not entry.acknowledged:
                self._store(replace(entry, acknowledged=True))

    def entries(self) -> list[Entry]:
        """All known operations (for inspection and tests)."""
        return list(self._entries.values())
