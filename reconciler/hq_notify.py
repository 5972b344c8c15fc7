"""HQ's notifications: signed JSON events POSTed to the webhooks of ``spec.notifications`` in topology.yaml.

After a pass that rendered ``status/hq`` HQ hands the report to
:meth:`Notifier.observe`, which compares it with what it observed last:

* a job entering Completed, Failed or Halted: ``jobCompleted``, ``jobFailed``,
  ``jobHalted``;
* a relay HQ judges lost (from alive, or first seen lost): ``relayLost``;
  a relay whose liveness is unknown (no heartbeats yet, HQ just restarted)
  keeps what was observed before, so a restart never re-announces it;
* ``main`` evaluated invalid at a commit not rejected just before:
  ``commitRejected``.

A subject that goes back and forth (Failed, rerun, Failed again) is announced
again on each entry. Subjects absent from a report (a job removed from git)
keep their last observation, and so does a job while some relay it reaches
has not reported the accepted commit yet (a new commit does not turn
Completed into Completed again).

**At most once per transition.** ``observe`` records the new observations
and queues one event per matching notification in ``notifications.json`` in
HQ's workdir (one atomic write) before anything is sent, so a restarted HQ
never detects the same transition twice. Each worker thread (one per
notification: a dead receiver delays only its own events) POSTs queued
events with exponential backoff (:data:`RETRY_FIRST_SECONDS` doubling up to
:data:`RETRY_MAX_SECONDS`) and drops one from the file once a 2xx answer came
back; an event still failing after :data:`GIVE_UP_AFTER` is dropped with an
error in the log. A crash between a receiver's 2xx and that write sends that
event once more after the restart, with the same ``id``: receivers dedup on it.

The first pass of an HQ without ``notifications.json`` only records what it
sees (the baseline): what was already Failed when notifications were turned
on is not announced.

Each POST carries ``X-Reconciler-Timestamp: <unix seconds>`` and
``X-Reconciler-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``
(:func:`reconciler.webhook.sign`), keyed with the file ``secretFile`` names in
``--notification-secrets-dir``; the file is read at each attempt, so a rotated
key is used at once and a missing one counts as a failed attempt.

Nothing here raises into HQ's pass and nothing in the pass waits on a
receiver: ``observe`` only writes a small file and wakes the workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import report
from reconciler.fileio import write_atomic
from reconciler.liveness import Liveness
from reconciler.plan.vocabulary import JobState
from reconciler.specs import Notification
from reconciler.times import format_precise, format_time
from reconciler.times import parse_time as parse_time_text
from reconciler.webhook import TIMESTAMP_HEADER, read_secret_file, sign

log = logging.getLogger("reconciler.hq.notify")

STATE_FILE = "notifications.json"
SIGNATURE_HEADER = "X-Reconciler-Signature"
EVENT_HEADER = "X-Reconciler-Event"
DELIVERY_HEADER = "X-Reconciler-Delivery"
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
GIVE_UP_AFTER = timedelta(hours=24)
POST_TIMEOUT_SECONDS = 10.0
MAX_QUEUED = 10_000
"""Events kept per notification; beyond that the oldest are dropped (logged): a dead receiver cannot fill the disk."""
ERRORS_IN_EVENT = 5

JOB_EVENTS = {JobState.COMPLETED.value: "jobCompleted", JobState.FAILED.value: "jobFailed",
              JobState.HALTED.value: "jobHalted"}
LOST = Liveness.LOST.value
REJECTED_KEY = "main"


@dataclass
class Pending:
    """One event waiting for its receiver's 2xx."""

    id: str
    notification: str
    url: str
    secret_file: str
    kind: str
    body: str  # the JSON text, fixed when queued: every attempt sends the same bytes
    created: str
    attempts: int = 0
    next_at: str = ""
    last_error: str = ""


def _retry_delay(attempts: int) -> float:
    return float(min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** max(0, attempts - 1)))


def observations(hq_report: report.HqReport) -> dict[str, dict[str, str]]:
    """What a report says of each subject: job -> state, relay -> liveness (when known), main -> rejected commit."""
    # A job waiting for relays to report the accepted commit says nothing new: every accepted commit puts
    # jobs back InProgress until the relays catch up, and that alone must not re-announce a Completed job.
    jobs = {job.job: job.state.value for job in hq_report.jobs if not job.waiting_count}
    relays = {r.relay: r.liveness.state.value for r in hq_report.relays
              if r.liveness is not None and r.liveness.state is not Liveness.UNKNOWN}
    accepted = hq_report.accepted
    rejected = accepted.main_commit if accepted.main_valid is False and accepted.main_commit else ""
    return {"jobs": jobs, "relays": relays, "commits": {REJECTED_KEY: rejected}}


def _transitions(before: Mapping[str, Mapping[str, str]], now: Mapping[str, Mapping[str, str]]
                 ) -> list[tuple[str, str, str | None, str]]:
    """``(kind, subject, previous, new)`` for every subject that entered a notified state."""
    found: list[tuple[str, str, str | None, str]] = []
    for name, state in sorted(now["jobs"].items()):
        previous = before.get("jobs", {}).get(name)
        if state != previous and state in JOB_EVENTS:
            found.append((JOB_EVENTS[state], name, previous, state))
    for name, state in sorted(now["relays"].items()):
        previous = before.get("relays", {}).get(name)
        if state != previous and state == LOST:
            found.append(("relayLost", name, previous, state))
    commit = now["commits"][REJECTED_KEY]
    previous = before.get("commits", {}).get(REJECTED_KEY)
    if commit and commit != previous:
        found.append(("commitRejected", commit, previous or None, "rejected"))
    return found


def event_body(kind: str, subject: str, previous: str | None, hq_report: report.HqReport, notification: str,
               event_id: str, at: datetime) -> dict[str, Any]:
    """The JSON event for one transition (see README, Notifications)."""
    accepted = hq_report.accepted
    body: dict[str, Any] = {"id": event_id, "kind": kind, "time": format_time(at), "notification": notification,
                            "branch": hq_report.branch, "acceptedCommit": accepted.accepted_commit}
    if kind in JOB_EVENTS.values():
        job = next(j for j in hq_report.jobs if j.job == subject)
        body.update(job=subject, state=job.state.value, previousState=previous, package=job.package,
                    version=job.version, counts=dict(job.counts), failures=job.failure_count)
    elif kind == "relayLost":
        relay = next(r for r in hq_report.relays if r.relay == subject)
        live = relay.liveness
        body.update(relay=subject, previousState=previous,
                    lastContact=format_time(live.last_contact) if live and live.last_contact else None,
                    lostSince=format_time(live.since) if live and live.since else None, clients=relay.clients)
    else:
        body.update(commit=subject, counts={"errors": len(hq_report.validation_errors)},
                    errors=[str(e) for e in hq_report.validation_errors[:ERRORS_IN_EVENT]])
    return body


def _trimmed(queue: list[Pending]) -> list[Pending]:
    """``queue`` with at most :data:`MAX_QUEUED` events per notification: the oldest beyond that are dropped (logged)."""
    counts: dict[str, int] = {}
    for p in queue:
        counts[p.notification] = counts.get(p.notification, 0) + 1
    kept: list[Pending] = []
    for p in queue:
        if counts[p.notification] > MAX_QUEUED:
            counts[p.notification] -= 1
            log.error("notification %s: queue full, dropped %s %s", p.notification, p.kind, p.id)
            continue
        kept.append(p)
    return kept


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST and return the HTTP status (an HTTP error status too); network failures raise OSError."""
    request = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only (schema)
            response.read(65536)
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class Notifier:
    """Transitions to events, events to a file, the file to receivers (one worker thread per notification)."""

    def __init__(self, workdir: Path, secrets_dir: Path, clock: Callable[[], datetime], *,
                 timeout: float = POST_TIMEOUT_SECONDS) -> None:
        self.path = workdir / STATE_FILE
        self.secrets_dir = secrets_dir
        self.clock = clock
        self.timeout = timeout
        self._cond = threading.Condition()
        self._stop = False
        self._workers: dict[str, threading.Thread] = {}
        self._running = False
        self._observed: dict[str, dict[str, str]] | None = None
        self._sequence = 0
        self._queue: list[Pending] = []
        self._in_flight: set[str] = set()
        self._load()

    # -- the state file --------------------------------------------------------

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_bytes())
            self._observed = {k: dict(v) for k, v in raw.get("observed", {}).items()}
            self._sequence = int(raw.get("sequence", 0))
            self._queue = [Pending(**p) for p in raw.get("queue", [])]
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.error("cannot read %s (%s): starting from a new baseline, queued events are lost", self.path, e)
            self._observed, self._sequence, self._queue = None, 0, []

    def _save(self, sequence: int | None = None, observed: dict[str, dict[str, str]] | None = None,
              queue: list[Pending] | None = None) -> None:
        """Write the state (the current one, or the one given, which the caller applies only once written)."""
        data = {"version": 1, "sequence": self._sequence if sequence is None else sequence,
                "observed": (self._observed if observed is None else observed) or {},
                "queue": [asdict(p) for p in (self._queue if queue is None else queue)]}
        write_atomic(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"), 0o600)

    def _save_after_delivery(self) -> None:
        try:
            self._save()
        except OSError as e:  # the receiver has the event; a restart may send it once more
            log.error("notifications: cannot write %s: %s", self.path, e)

    # -- a pass ---------------------------------------------------------------

    def observe(self, hq_report: report.HqReport, notifications: Iterable[Notification]) -> int:
        """Queue an event for each transition the report shows, for each notification that wants it.

        Returns how many events were queued. Never raises: a failure is logged
        and the pass goes on (the transitions are then looked for again next time).
        """
        try:
            return self._observe(hq_report, tuple(notifications))
        except Exception:  # noqa: BLE001 - notifications must never break HQ's pass
            log.exception("notifications: cannot record this pass's transitions")
            return 0

    def _observe(self, hq_report: report.HqReport, notifications: tuple[Notification, ...]) -> int:
        now = observations(hq_report)
        with self._cond:
            before = self._observed
            merged = {key: {**(before or {}).get(key, {}), **now[key]} for key in now}
            if before is None:  # the baseline: nothing is announced
                self._save(observed=merged)
                self._observed = merged
                return 0
            found = _transitions(before, now)
            if not found and merged == before:
                return 0
            at = self.clock()
            sequence = self._sequence
            queue = list(self._queue)
            added: list[Pending] = []
            for kind, subject, previous, _new in found:
                sequence += 1
                for n in notifications:
                    job = subject if kind in JOB_EVENTS.values() else None
                    relay = subject if kind == "relayLost" else None
                    if not n.wants(kind, job=job, relay=relay):
                        continue
                    event_id = hashlib.sha256(f"{n.name}\n{kind}\n{subject}\n{sequence}\n{format_time(at)}"
                                              .encode("utf-8")).hexdigest()[:32]
                    body = event_body(kind, subject, previous, hq_report, n.name, event_id, at)
                    added.append(Pending(event_id, n.name, n.url, n.secret_file, kind,
                                         json.dumps(body, sort_keys=True, separators=(",", ":")),
                                         format_time(at), next_at=format_time(at)))
            queue = _trimmed(queue + added)
            # recorded before anything is sent; if this write fails nothing changed and the next pass tries again
            self._save(sequence, merged, queue)
            self._sequence, self._observed, self._queue = sequence, merged, queue
            for p in added:
                log.info("notification %s: queued %s (%s)", p.notification, p.kind, p.id)
            if added:
                self._spawn_workers()
                self._cond.notify_all()
            return len(added)

    # -- delivery -------------------------------------------------------------

    def pending(self, notification: str | None = None) -> list[Pending]:
        with self._cond:
            return [p for p in self._queue if notification is None or p.notification == notification]

    def _due(self, notification: str | None) -> list[Pending]:
        now = self.clock()
        return [p for p in self._queue if (notification is None or p.notification == notification)
                and p.id not in self._in_flight and (parse_time_text(p.next_at) or now) <= now]

    def deliver_due(self, notification: str | None = None) -> int:
        """Try every due event once (of one notification, or all), oldest first; returns how many were delivered.

        The workers call this; tests call it directly with an injected clock.
        """
        with self._cond:
            due = self._due(notification)
            self._in_flight.update(p.id for p in due)
        delivered = 0
        failed: set[str] = set()
        try:
            for pending in due:
                if pending.notification in failed:
                    continue  # a receiver's events stay in order: the rest wait for the one that failed
                if self._attempt(pending):
                    delivered += 1
                    continue
                failed.add(pending.notification)
                with self._cond:
                    for later in due:
                        if later.notification == pending.notification and later is not pending:
                            later.next_at = pending.next_at
                    self._save_after_delivery()
        finally:
            with self._cond:
                self._in_flight.difference_update(p.id for p in due)
        return delivered

    def _attempt(self, pending: Pending) -> bool:
        body = pending.body.encode("utf-8")
        now = self.clock()
        timestamp = int(now.timestamp())
        try:
            secret = read_secret_file(self.secrets_dir / pending.secret_file)
            headers = {"Content-Type": "application/json", "User-Agent": "reconciler-hq",
                       TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, body, timestamp),
                       EVENT_HEADER: pending.kind, DELIVERY_HEADER: pending.id}
            status = _post(pending.url, body, headers, self.timeout)
            error = "" if 200 <= status < 300 else f"HTTP {status}"
        except (OSError, ValueError) as e:
            error = " ".join(str(e).split())[:200] or type(e).__name__
        with self._cond:
            if pending not in self._queue:
                return not error
            if not error:
                self._queue.remove(pending)
                self._save_after_delivery()
                log.info("notification %s: delivered %s %s", pending.notification, pending.kind, pending.id)
                return True
            pending.attempts += 1
            pending.last_error = error
            created = parse_time_text(pending.created) or now
            if now - created >= GIVE_UP_AFTER:
                self._queue.remove(pending)
                log.error("notification %s: gave up on %s %s after %d attempts: %s", pending.notification,
                          pending.kind, pending.id, pending.attempts, error)
            else:
                delay = _retry_delay(pending.attempts)
                pending.next_at = format_precise(now + timedelta(seconds=delay))
                log.warning("notification %s: %s %s failed (%s), attempt %d, next in %gs", pending.notification,
                            pending.kind, pending.id, error, pending.attempts, delay)
            self._save_after_delivery()
        return False

    def seconds_until_due(self, notification: str | None = None) -> float | None:
        with self._cond:
            return self._seconds_until_due(notification)

    def _seconds_until_due(self, notification: str | None) -> float | None:
        now = self.clock()
        times = [parse_time_text(p.next_at) or now for p in self._queue
                 if notification is None or p.notification == notification]
        return None if not times else max(0.0, (min(times) - now).total_seconds())

    # -- the worker threads ------------------------------------------------------

    def start(self) -> None:
        """Start delivering in the background: one daemon thread per notification with queued events."""
        with self._cond:
            self._running = True
            self._stop = False
            self._spawn_workers()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._running = False
            self._cond.notify_all()
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(timeout)

    def _spawn_workers(self) -> None:
        if not self._running:
            return
        for name in {p.notification for p in self._queue}:
            worker = self._workers.get(name)
            if worker is None or not worker.is_alive():
                worker = threading.Thread(target=self._work, args=(name,), name=f"notify-{name}", daemon=True)
                self._workers[name] = worker
                worker.start()

    def _work(self, name: str) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                wait = self._seconds_until_due(name)
                if wait is None:
                    del self._workers[name]  # observe() starts a new one when an event comes
                    return
                if wait > 0:
                    self._cond.wait(min(wait, 60.0))
                    continue
            try:
                self.deliver_due(name)
            except Exception:  # noqa: BLE001 - a bug must not end delivery for good
                log.exception("notification %s: delivery failed", name)
                with self._cond:
                    self._cond.wait(RETRY_MAX_SECONDS)
