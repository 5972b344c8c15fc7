"""``reconciler hq``: accept valid ``main`` commits, aggregate the relays, publish ``status/hq``.

One pass: fetch (``main`` and ``status/hq`` with their history, every relay's
``status/<relay>`` by its newest commit only: ``GitStore.fetch_tips``); if the
branch moved since the last evaluation, validate the
new commit at that commit (never a checkout) and accept it if it is valid,
else keep the last accepted commit and publish the errors; read every
relay's ``status/<relay>`` ref that changed; aggregate (:mod:`reconciler.report`,
pure); publish ``status/hq`` when its content changed.

All state lives in git: the accepted commit, when it was accepted and the
last evaluated ``main`` commit with its validity are read back from
``status/hq`` when HQ starts, and everything else is recomputed, so a killed
HQ simply converges again. A pass is woken by the change watcher (watchdog on
a local origin, the webhook), the poll interval, or a due retry.

An evaluation is recorded only once it finished. When loading the specs of
a new ``main`` commit raises (a git read failure, a bug, running out of
memory) nothing moves: the accepted commit, the last evaluated commit, its
validity and its validation errors stay as they were, and ``accepted.yaml``
gains an ``evaluationError`` naming the commit that could not be evaluated,
so no reader ever sees that commit reported as valid. The evaluation is
retried with exponential backoff on HQ's clock (:data:`RETRY_FIRST_SECONDS`
doubling up to :data:`RETRY_MAX_SECONDS`), at once if ``main`` moves again.

With ``--listen``, relays post heartbeats to HQ (:mod:`reconciler.hq_liveness`)
and every pass judges each relay alive, lost or unknown on HQ's clock. A
pass whose inputs (commits, relay refs, those judgements) are all as before
renders nothing, so heartbeats alone never make a commit; a relay's
transition re-renders ``status/hq`` from the relay status already read. The
service wakes at least every poll interval, and at the moment a relay's
timeout runs out, so a dead relay shows as lost within about
``--relay-timeout`` seconds.

Pushes are bounded: a change of the report alone (job reports,
``summary.md``, ``relays.yaml``, ``moves.yaml``) is held until
``--publish-interval`` after HQ's last push (the service wakes then), while
a newly accepted or rejected commit and its manifest are pushed at once,
with whatever was held. The web view shows each rendered report at once;
notifications go out when ``status/hq`` says them.

``--listen`` also serves the read-only web view (:mod:`reconciler.web`):
HQ keeps the report of the last pass that rendered (``Hq.snapshot``) and
reads a job's client rows from the relay refs that report came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from reconciler import report, web
from reconciler.errors import (
    Cause,
    Problem,
    ReconcilerError,
    next_wakeup,
    problem,
    problem_of,
    retry_delay,
)
from reconciler.fileio import write_atomic
from reconciler.gitstore import (
    STATUS_PREFIX,
    ChangeWatcher,
    GitError,
    GitStore,
    history_of,
    origin_password,
    url_credentials_warning,
)
from reconciler.hq_liveness import LIVENESS_FILE, Contacts, RelaysApi
from reconciler.hq_manifest import ManifestSigner, signer_from_files
from reconciler.hq_notify import Notifier
from reconciler.liveness import Liveness, RelayLiveness
from reconciler.logs import configure_logging
from reconciler.metrics import (
    METRICS_PATH,
    HqMetrics,
    gauge,
    metrics_app_response,
    row_gauge,
)
from reconciler.redaction import redact_url
from reconciler.repo_tree import load_commit
from reconciler.report import (
    HQ_STATUS_REF,
    Accepted,
    EvaluationError,
    RelayStatus,
    ReportError,
    StatusRow,
)
from reconciler.serving import (
    AnyServer,
    ListenError,
    StartResponse,
    WSGIApp,
    json_response,
    make_server,
)
from reconciler.signatures import SignatureGate
from reconciler.specs import LoadResult, Notification, SpecError, Specs
from reconciler.times import utc_now
from reconciler.tls import (
    PLAIN_HTTP_WARNING,
    TLSConfigError,
    server_context,
    server_tls_of,
)
from reconciler.webhook import HOOK_PATH, HookGuard, hook_handler, read_secret_file

log = logging.getLogger("reconciler.hq")

ERROR_MESSAGE_LIMIT = 300
"""Characters of an evaluation error kept for the log and ``accepted.yaml``."""


# ------------------------------------------------------------------ the HQ


def _now() -> datetime:
    return utc_now().replace(microsecond=0)


@dataclass(frozen=True)
class FailedEvaluation:
    """A commit of the branch whose evaluation raised, and when to try it again."""

    commit: str
    message: str
    attempts: int
    retry_at: datetime
    cause: Cause = Cause.INTERNAL


@dataclass
class PassResult:
    """What one pass did; ``line`` is the log line, None when it did nothing.

    ``error`` is set when this pass tried to evaluate the branch and could
    not; ``exception`` is what raised when it was not git (a bug), so the
    service can log its traceback while ``--once`` stays at one line.
    """

    main_commit: str | None
    accepted_commit: str | None
    published: str | None
    relays_read: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    exception: Exception | None = field(default=None, repr=False)

    @property
    def line(self) -> str | None:
        if not self.notes and self.published is None:
            return None
        parts = list(self.notes)
        if self.published is not None:
            parts.append(f"published {HQ_STATUS_REF} {self.published[:12]}")
        return f"pass: {'; '.join(parts)} ({self.seconds:.2f}s)"


class Hq:
    """HQ's reconcile state between passes (a cache: the truth is in git)."""

    def __init__(self, store: GitStore, branch: str = "main", *, clock: Callable[[], datetime] = _now,
                 contacts: Contacts | None = None, signatures: SignatureGate | None = None,
                 signer: ManifestSigner | None = None, publish_interval: float = 0.0) -> None:
        self.store = store
        # report-only changes of status/hq wait until this long after the last publish (0: never wait)
        self.publish_interval = publish_interval
        self._published_at: datetime | None = None  # when this process last pushed status/hq
        # a report-only change waiting for its turn: files, commit message, the report, its notifications
        self._held: tuple[dict[str, bytes], str, report.HqReport, tuple[Notification, ...]] | None = None
        self.signer = signer  # signs the manifest of the accepted commit (None: HQ publishes none)
        self.branch = branch
        self.clock = clock
        self.contacts = contacts  # relay heartbeats (None: HQ does not listen, liveness is not reported)
        self.signatures = signatures  # None: any commit may be accepted, signed or not
        self.notifier: Notifier | None = None  # posts spec.notifications events (None: HQ notifies nobody)
        self._restored = False
        self._evaluated = False  # this process finished an evaluation of main_commit
        self.main_commit: str | None = None
        self.main_valid: bool | None = None
        self.validation_errors: tuple[SpecError, ...] = ()
        self.accepted_commit: str | None = None
        self.accepted_at: datetime | None = None
        self.failed: FailedEvaluation | None = None
        self._specs: tuple[str, Specs | None] | None = None  # (commit, specs)
        self._relays: dict[str, tuple[str, RelayStatus]] = {}  # name -> (ref sha, status)
        self._published: dict[str, bytes] | None = None
        self._inputs: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self.metrics: HqMetrics | None = None  # times passes when set
        self.snapshot: web.Snapshot | None = None  # the report of the last pass that rendered, and its relay refs
        self._job_rows: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[tuple[str, StatusRow], ...]] = {}
        self._rows_lock = threading.Lock()

    # -- state from git ------------------------------------------------------

    def _restore(self) -> None:
        """Read the accepted and the last evaluated commit back from status/hq (after the first fetch).

        The last evaluated commit only stands in until this process has
        evaluated main itself, so that a first evaluation that fails still
        reports what was last known rather than nothing.
        """
        self._restored = True
        sha = self.store.ref_sha(HQ_STATUS_REF)
        if sha is None:
            return
        try:
            files = self.store.read_files(sha)
            accepted = report.parse_accepted(files[report.ACCEPTED_FILE])
            validated, errors = (report.parse_validation(files[report.VALIDATION_FILE])
                                 if report.VALIDATION_FILE in files else (None, ()))
        except (GitError, ReportError, KeyError, ValueError) as e:
            log.warning("cannot read back %s (%s); starting afresh", HQ_STATUS_REF, e)
            return
        self.accepted_commit = accepted.accepted_commit
        self.accepted_at = accepted.accepted_at
        self.main_commit = accepted.main_commit
        self.main_valid = accepted.main_valid
        self.validation_errors = errors if validated == accepted.main_commit else ()
        self._published = files
        if self.signer is not None:
            self.signer.restore(files.get(report.MANIFEST_FILE))
        log.info("resumed from %s %s: accepted commit %s", HQ_STATUS_REF, sha[:12], report.short(self.accepted_commit))

    def _accepted_specs(self) -> Specs | None:
        """Specs at the accepted commit (None without one, or when it no longer validates).

        A failure to read them raises: aggregating without them would publish
        a report with no jobs for a commit that has jobs.
        """
        commit = self.accepted_commit
        if commit is None:
            return None
        if self._specs is None or self._specs[0] != commit:
            result = load_commit(self.store, commit)
            if not result.valid:
                log.error("the accepted commit %s no longer validates (%d errors); reporting no jobs",
                          commit[:12], len(result.errors))
            self._specs = (commit, result.specs if result.valid else None)
        return self._specs[1]

    # -- a pass --------------------------------------------------------------

    def run_pass(self) -> PassResult:
        """Fetch, evaluate the branch if it moved, aggregate the relays, publish status/hq if changed.

        An evaluation that raises does not raise here: it is recorded in
        ``failed``, published as ``evaluationError`` and returned as
        ``PassResult.error``. Failures outside the evaluation (fetch, reading
        the accepted commit or the relay refs, publishing) raise, and the pass
        publishes nothing.
        """
        with self._lock:
            if self.metrics is None:
                return self._run_pass()
            with self.metrics.pass_seconds.time():
                return self._run_pass()

    def seconds_until_retry(self) -> float | None:
        """Seconds until a failed evaluation is due again (0 if due now); None when none failed."""
        with self._lock:
            failed = self.failed
            if failed is None:
                return None
            return max(0.0, (failed.retry_at - self.clock()).total_seconds())

    def _run_pass(self) -> PassResult:
        started = time.monotonic()
        self.store.fetch_tips((self.branch, HQ_STATUS_REF))
        if not self._restored:
            self._restore()
        notes: list[str] = []
        error: str | None = None
        exception: Exception | None = None
        main = self.store.ref_sha(self.branch)
        if self._evaluated and main == self.main_commit:
            self.failed = None  # the branch is back on the commit evaluated last
        elif self._due(main):
            try:
                notes.append(self._evaluate(main))
                self.failed = None
            except Exception as e:  # noqa: BLE001 - whatever stopped it, the commit stays unevaluated
                assert main is not None  # a missing branch needs no reading
                failed = self._record_failure(main, e)
                exception = None if isinstance(e, GitError) else e
                error = f"cannot evaluate {self.branch} {main[:12]}: {failed.message}"
                notes.append(f"{error} (attempt {failed.attempts}, next in {retry_delay(failed.attempts):g}s; "
                             f"{HQ_STATUS_REF} keeps {report.short(self.main_commit)} as the last evaluated commit)")
        specs_now = self._accepted_specs()
        manifest = self._manifest(specs_now)
        relays, changed = self._read_relays(specs_now)
        if changed:
            notes.append(f"read {changed} relay report{'s' if changed != 1 else ''}")
        liveness = self._judge_relays(specs_now, notes)
        evaluation_error = (None if self.failed is None
                            else EvaluationError(self.failed.commit, self.failed.message, self.failed.cause.value))
        # Same inputs as the last pass that rendered: the output cannot differ.
        inputs = (self.main_commit, self.main_valid, self.accepted_commit, self.accepted_at, evaluation_error,
                  tuple(sorted((name, sha) for name, (sha, _) in self._relays.items())),
                  None if liveness is None else tuple(sorted(liveness.items())), manifest)
        published = None
        if inputs != self._inputs or self._published is None:
            accepted = Accepted(self.accepted_commit, self.accepted_at, self.main_commit, self.main_valid,
                                evaluation_error)
            hq_report = report.aggregate(specs_now, accepted, self.branch, self.validation_errors, relays, liveness)
            refs = tuple((r.relay, self._relays[r.relay][0])
                         for _, r in report.relay_tree(hq_report.relays) if r.relay in self._relays)
            self.snapshot = web.Snapshot(hq_report, _relay_counts(hq_report, relays), refs)
            files = report.render_hq_status(hq_report)
            if manifest is not None:
                files[report.MANIFEST_FILE] = manifest
            notifications = () if specs_now is None else specs_now.topology.notifications
            self._held = None
            if files != self._published:
                self._held = (files, self._message(hq_report), hq_report, notifications)
            elif self.notifier is not None:  # transitions are known once status/hq says them; never raises or waits
                self.notifier.observe(hq_report, notifications)
            self._inputs = inputs
        if self._held is not None:
            files, message, held_report, notifications = self._held
            wait = self._publish_wait(files)
            if wait > 0:
                notes.append(f"report changes held {wait:.0f}s more (--publish-interval {self.publish_interval:g}s)")
            else:
                published = self.store.publish(HQ_STATUS_REF, files, message)
                self._published = files
                self._held = None
                if published is not None:
                    self._published_at = self.clock()
                if self.notifier is not None:  # status/hq says them now
                    self.notifier.observe(held_report, notifications)
        return PassResult(main, self.accepted_commit, published, changed, time.monotonic() - started, notes, error,
                          exception)

    def _publish_wait(self, files: Mapping[str, bytes]) -> float:
        """Seconds a change to ``files`` waits before it is pushed; 0 to push it now.

        What relays act on goes at once: a newly accepted or rejected commit
        (``accepted.yaml``, ``validation.yaml``) and its signed manifest. A
        change of the report alone (job reports, ``summary.md``,
        ``relays.yaml``, ``moves.yaml``) waits until ``publish_interval``
        after the last push, so HQ pushes at most once per interval however
        often relays publish; it goes out whole with the next push.
        """
        last, published = self._published_at, self._published
        if self.publish_interval <= 0 or last is None or published is None:
            return 0.0
        if any(files.get(name) != published.get(name) for name in _ACT_ON_AT_ONCE):
            return 0.0
        return max(0.0, (last + timedelta(seconds=self.publish_interval) - self.clock()).total_seconds())

    def seconds_until_publish(self) -> float | None:
        """Seconds until a held report change is due (the service wakes then); None when none is held."""
        with self._lock:
            held = self._held
            return None if held is None else self._publish_wait(held[0])

    @property
    def last_report(self) -> report.HqReport | None:
        """The last report aggregated (what status/hq shows); None before the first pass that rendered."""
        return None if self.snapshot is None else self.snapshot.report

    def job_rows(self, job: str) -> tuple[tuple[str, StatusRow], ...] | None:
        """Every client row of ``job`` as (relay, row), relays in tree order, for the web view's job page.

        Read from each relay's ``relays/<relay>/jobs/<job>.yaml`` at the relay
        ref the view's report was aggregated from (files over :data:`report.MAX_STATUS_FILE` are
        skipped), and kept per set of ref shas for the last
        :data:`JOB_ROWS_CACHED` jobs, so polling a page reads git only after
        a relay published. None when git cannot be read.
        """
        snapshot = self.snapshot  # never waits for a pass: the refs of the report the view shows
        refs = snapshot.relay_refs if snapshot is not None else ()
        key = (job, refs)
        with self._rows_lock:
            cached = self._job_rows.get(key)
            if cached is not None:
                return cached
            paths = [f"{report.relay_prefix(name)}jobs/{job}.yaml" for name, _ in refs]
            try:
                contents = self.store.read_paths([(sha, p) for (_, sha), p in zip(refs, paths)],
                                                 max_size=report.MAX_STATUS_FILE)
            except GitError as e:
                log.warning("cannot read the rows of job %s: %s", job, e)
                return None
            rows: list[tuple[str, StatusRow]] = []
            for (name, _), path, data in zip(refs, paths, contents):
                if data is None or len(data) > report.MAX_STATUS_FILE:
                    continue
                try:
                    _, status = report.parse_relay_job(data, f"{STATUS_PREFIX}{name}:{path}")
                except ReportError as e:
                    log.warning("%s", e)
                    continue
                rows.extend((name, row) for row in status.rows)
            self._job_rows = {k: v for k, v in self._job_rows.items() if k[0] != job}
            while len(self._job_rows) >= JOB_ROWS_CACHED:
                del self._job_rows[next(iter(self._job_rows))]
            self._job_rows[key] = result = tuple(rows)
            return result

    def _manifest(self, specs_now: Specs | None) -> bytes | None:
        """The signed manifest of the accepted commit (None without a signing key or an accepted commit)."""
        if self.signer is None or specs_now is None or self.accepted_commit is None:
            return None
        return self.signer.envelope_for(self.store, self.accepted_commit, specs_now, self.clock())

    def _judge_relays(self, specs_now: Specs | None, notes: list[str]) -> dict[str, RelayLiveness] | None:
        """Each relay's liveness now (None without heartbeats); a note for each relay that changed."""
        if self.contacts is None:
            return None
        names = None if specs_now is None else [r.name for r in specs_now.topology.relays]
        liveness, transitions = self.contacts.evaluate(names)
        notes.extend(transitions)
        return liveness

    def seconds_until_liveness_change(self) -> float | None:
        """Seconds until a relay's timeout runs out (the service wakes then); None when none can."""
        return None if self.contacts is None else self.contacts.seconds_until_change()

    def _due(self, main: str | None) -> bool:
        """Whether to evaluate ``main`` now: always, unless its last attempt failed and the retry is not due."""
        failed = self.failed
        return failed is None or failed.commit != main or self.clock() >= failed.retry_at

    def _record_failure(self, main: str, e: Exception) -> FailedEvaluation:
        """Remember that evaluating ``main`` raised, with a one-line reason and the time of the next attempt."""
        failure = problem_of(e)
        text = " ".join(self.store.redact(failure.message).split())
        if len(text) > ERROR_MESSAGE_LIMIT:
            text = text[: ERROR_MESSAGE_LIMIT - 1] + "…"
        previous = self.failed
        attempts = previous.attempts + 1 if previous is not None and previous.commit == main else 1
        self.failed = FailedEvaluation(main, text, attempts, self.clock() + timedelta(seconds=retry_delay(attempts)),
                                       failure.cause)
        return self.failed

    def _evaluate(self, main: str | None) -> str:
        """Evaluate ``main`` and only then record the outcome: if loading raises, no state has moved."""
        if main is None:
            self._evaluated = True
            self.main_commit, self.main_valid, self.validation_errors = None, None, ()
            return f"branch {self.branch} not found on the origin"
        result = load_commit(self.store, main)
        if self.signatures is not None and main != self.accepted_commit:  # an accepted commit is not re-judged
            unsigned = self.signatures.errors(self.store, main, self.accepted_commit)
            if unsigned:
                result = LoadResult(None, tuple(sorted((*result.errors, *unsigned))), result.warnings)
        self._evaluated = True
        self.main_commit = main
        self.main_valid = result.valid
        self.validation_errors = result.errors
        if result.valid:
            if main != self.accepted_commit:
                self.accepted_commit = main
                self.accepted_at = self.clock()
                self._specs = (main, result.specs)
                return f"accepted {self.branch} {main[:12]}"
            self._specs = (main, result.specs)
            return f"{self.branch} {main[:12]} valid (already accepted)"
        kept = report.short(self.accepted_commit)
        return (f"rejected {self.branch} {main[:12]}: {len(result.errors)} error"
                f"{'s' if len(result.errors) != 1 else ''}, accepted commit stays {kept}")

    def _read_relays(self, specs_now: Specs | None) -> tuple[dict[str, RelayStatus], int]:
        """Current status of every relay of the accepted topology; reads only refs that moved."""
        if specs_now is None:
            return {}, 0
        names = {r.name for r in specs_now.topology.relays}
        refs = {name: sha for name, sha in self.store.list_status_refs().items() if name in names}
        for gone in set(self._relays) - set(refs):
            del self._relays[gone]
        stale = sorted(name for name, sha in refs.items()
                       if name not in self._relays or self._relays[name][0] != sha)
        if stale:
            paths = [f"{report.relay_prefix(name)}relay.yaml" for name in stale]
            try:
                contents = self.store.read_paths([(refs[n], p) for n, p in zip(stale, paths)],
                                                max_size=report.MAX_STATUS_FILE)
            except GitError as e:
                log.warning("relay status refs unreadable: %s", e)
                contents = [None] * len(stale)
            for name, path, data in zip(stale, paths, contents):
                self._relays[name] = (refs[name], self._parse_relay(name, path, data))
        return {name: status for name, (_, status) in self._relays.items()}, len(stale)

    def _parse_relay(self, name: str, path: str, data: bytes | None) -> RelayStatus:
        try:
            if data is None:
                raise ReportError(f"{STATUS_PREFIX}{name} has no {path}")
            return report.parse_relay_status({path: data})
        except ReportError as e:
            log.warning("status of relay %s unreadable: %s", name, e)
            return RelayStatus(name, None, 0, None, (f"status unreadable: {e}",), {})

    def _message(self, hq_report: report.HqReport) -> str:
        accepted = hq_report.accepted
        states: dict[str, int] = {}
        for job in hq_report.jobs:
            states[job.state.value] = states.get(job.state.value, 0) + 1
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no jobs"
        lost = [r.relay for r in report.lost_relays(hq_report.relays)]
        if lost:
            jobs += f"; {report.plural(len(lost), 'relay')} LOST ({', '.join(lost[:5])}{', …' if len(lost) > 5 else ''})"
        validity = {True: "valid", False: "INVALID", None: "absent"}[accepted.main_valid]
        failed = accepted.evaluation_error
        unevaluated = "" if failed is None else f", {report.short(failed.commit)} NOT EVALUATED"
        return (f"HQ status: accepted {report.short(accepted.accepted_commit)}, "
                f"{self.branch} {report.short(accepted.main_commit)} {validity}{unevaluated}; {jobs}\n")

    def health(self) -> Mapping[str, Any]:
        failed = self.failed
        out: dict[str, Any] = {
            "acceptedCommit": self.accepted_commit, "mainCommit": self.main_commit, "mainValid": self.main_valid,
            "evaluationError": None if failed is None else {"commit": failed.commit, "message": failed.message}}
        if self.contacts is not None:
            out["relays"] = self.contacts.counts()
        return out


_ACT_ON_AT_ONCE = (report.ACCEPTED_FILE, report.VALIDATION_FILE, report.MANIFEST_FILE)
"""Files of status/hq whose change is pushed at once, whatever ``--publish-interval`` says: relays act on them."""

JOB_ROWS_CACHED = 4
"""Jobs whose client rows HQ keeps for the web view (a job of 100,000 clients is that many rows)."""


def _relay_counts(hq_report: report.HqReport, relays: Mapping[str, RelayStatus]) -> dict[str, dict[str, int]]:
    """Each relay's own rows by state, over the jobs of the report."""
    jobs = {j.job for j in hq_report.jobs}
    out: dict[str, dict[str, int]] = {}
    for name, status in relays.items():
        total = report.zero_counts()
        for job, digest in status.jobs.items():
            if job in jobs:
                report.add_counts(total, digest.counts)
        out[name] = total
    return out


# ------------------------------------------------------------------- shell


HEALTH_PATH = "/healthz"


def hq_metrics(hq: Hq) -> HqMetrics:
    """HQ's metrics; its gauges read the last aggregated report (what status/hq shows) when scraped."""
    metrics = HqMetrics()

    def snapshot() -> Iterator[Metric]:
        last = hq.last_report
        jobs = last.jobs if last is not None else ()
        yield row_gauge(sorted(((job.job, state), n) for job in jobs for state, n in job.counts.items()))
        yield gauge("reconciler_reboots_pending", "Succeeded rows whose client waits for a reboot an installer "
                    "asked for (reason rebootRequired), by job", ("job",),
                    [((job.job,), job.reboot_required) for job in jobs])
        relays = last.relays if last is not None else ()
        yield gauge("reconciler_relay_up", "1 while HQ receives the relay's heartbeats (alive), 0 once it is lost; "
                    "absent while unknown (HQ listens without heartbeats of it yet)", ("relay",),
                    [((r.relay,), 1 if r.liveness.state is Liveness.ALIVE else 0) for r in relays
                     if r.liveness is not None and r.liveness.state is not Liveness.UNKNOWN])

    metrics.add_snapshot(snapshot)
    hq.metrics = metrics
    hq.store.metrics = metrics
    return metrics


def make_app(trigger: Callable[[], None], hooks: HookGuard | bytes | None,
             health: Callable[[], Mapping[str, Any]] | None = None, relays: RelaysApi | None = None,
             metrics: HqMetrics | None = None, view: web.WebView | None = None) -> WSGIApp:
    """HQ's whole HTTP API: ``GET /healthz`` (``health()`` merged in), ``POST /v1/hooks/git`` and, with
    ``relays``, ``POST /v1/relays/<relay>/heartbeat`` and ``GET /v1/relays`` (:mod:`reconciler.hq_liveness`)
    and, with ``view``, the HTML web view at ``/`` and ``/ui/`` (:mod:`reconciler.web`).

    ``hooks`` checks the git hook; a secret stands for ``HookGuard(secret)``
    and None for a guard that refuses every hook.

    Every response but the web view's is JSON; errors are ``{"error": "..."}`` with a 4xx
    status, and a bug gives a JSON 500, never a traceback.
    """

    guard = hooks if isinstance(hooks, HookGuard) else HookGuard(hooks)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if path == HEALTH_PATH:
                if method not in ("GET", "HEAD"):
                    return json_response(start_response, 405, {"error": "use GET"})
                return json_response(start_response, 200, {"ok": True, **(health() if health else {})})
            if path == METRICS_PATH and metrics is not None:
                return metrics_app_response(metrics, method, start_response)
            if path == HOOK_PATH:
                return hook_handler(environ, start_response, guard, trigger)
            answer = relays.route(path, environ, start_response) if relays is not None else None
            if answer is not None:
                return answer
            page = view.route(path, environ, start_response) if view is not None else None
            if page is not None:
                return page
            return json_response(start_response, 404, {"error": f"no such endpoint: {path[:200]}"})
        except Exception:  # noqa: BLE001 - a bug must give a JSON 500, not a traceback to the caller
            log.exception("error serving %s %s", method, path[:200])
            return json_response(start_response, 500, {"error": "internal error"})

    return app



@dataclass(frozen=True)
class Turn:
    """One pass as the service reports it: the log line, what failed, and the passes in a row that raised."""

    line: str | None
    problem: Problem | None
    exception: BaseException | None  # a bug: its traceback is logged (once per retry delay)
    failures: int
    seconds: float = 0.0


def take_turn(hq: Hq, failures: int) -> Turn:
    """Run one pass and turn its result or its error into a :class:`Turn`: the loop's one place for that.

    An evaluation that failed is in the result (status/hq already says so);
    a pass that raised as a whole (a fetch or publish failure, a bug) counts
    towards the backoff of the next wake-up.
    """
    try:
        result = hq.run_pass()
    except Exception as e:  # noqa: BLE001 - whatever stopped the pass, the service goes on
        failure = problem_of(e)
        failure = replace(failure, message=" ".join(hq.store.redact(failure.message).split()))
        bug = None if isinstance(e, ReconcilerError) else e
        return Turn(f"pass failed: {failure.message}", failure, bug, failures + 1)
    if result.error is not None:
        failed = hq.failed
        cause = failed.cause if failed is not None else Cause.INTERNAL
        return Turn(result.line or f"pass failed: {result.error}", problem(cause, result.error), result.exception, 0)
    return Turn(result.line, None, None, 0, result.seconds)


LIVENESS_MARGIN_SECONDS = 1.0
"""How long after a relay's timeout runs out the service wakes to call it lost (the rule is 'older than')."""


def next_wait(hq: Hq, turn: Turn, poll_interval: float) -> float:
    """How long the service sleeps without a change: the poll interval, or sooner for a due retry or a relay's timeout.

    While passes fail (the origin is unreachable, say) their backoff rules:
    a failed pass judged no relay, and could not publish one lost anyway.
    """
    if turn.failures:
        wait = next_wakeup(poll_interval, turn.problem, turn.failures)
    else:
        lost_in = hq.seconds_until_liveness_change()
        wait = poll_interval if lost_in is None else min(poll_interval, lost_in + LIVENESS_MARGIN_SECONDS)
    retry_in = hq.seconds_until_retry()
    wait = wait if retry_in is None else min(wait, retry_in)
    publish_in = None if turn.failures else hq.seconds_until_publish()
    return wait if publish_in is None else min(wait, publish_in + PUBLISH_MARGIN_SECONDS)


PUBLISH_MARGIN_SECONDS = 0.5
"""How long after a held report change is due the service wakes to push it (HQ's clock counts whole seconds)."""


LISTEN_FILE = "listen.url"
"""Written to HQ's workdir with the URL it serves on (useful with port 0), removed when it stops."""


def main(args: argparse.Namespace) -> int:
    configure_logging()
    os.umask(0o077)  # the mirror, liveness file and anything else HQ writes: owner-only
    try:
        password = origin_password(getattr(args, "origin_password_file", None))
    except (OSError, ValueError) as e:
        print(f"reconciler hq: cannot read the origin password: {e}", file=sys.stderr)
        return 2
    warning = url_credentials_warning(args.origin, password is not None)
    if warning:
        log.warning("%s", warning)
    try:
        secret = read_secret_file(args.webhook_secret_file) if args.webhook_secret_file else None
        heartbeat_secret = read_secret_file(args.heartbeat_secret_file) if args.heartbeat_secret_file else None
        ui_token = read_secret_file(args.ui_token_file) if getattr(args, "ui_token_file", None) else None
    except (OSError, ValueError) as e:
        print(f"reconciler hq: cannot read a secret: {e}", file=sys.stderr)
        return 2
    tls_context = None
    tls_given = [getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_client_ca")]
    if not getattr(args, "listen", None) and ui_token is not None:
        print("reconciler hq: --ui-token-file needs --listen (HQ serves no web view without it)", file=sys.stderr)
        return 2
    if not getattr(args, "listen", None) and any(tls_given):
        print("reconciler hq: --tls-cert, --tls-key and --tls-client-ca need --listen (HQ serves nothing without it)",
              file=sys.stderr)
        return 2
    if getattr(args, "listen", None):
        try:
            server_tls = server_tls_of(args.tls_cert, args.tls_key, args.tls_client_ca)
            if server_tls is None and not args.insecure_http:
                raise TLSConfigError("give --tls-cert and --tls-key to serve HTTPS on --listen, or --insecure-http "
                                     "to serve plain HTTP")
            tls_context = server_context(server_tls) if server_tls is not None else None
        except TLSConfigError as e:
            print(f"reconciler hq: {e}", file=sys.stderr)
            return 2
    policy = getattr(args, "signature_policy", None)
    signatures = None
    if getattr(args, "allowed_signers", None):
        try:
            signatures = SignatureGate.checked(args.allowed_signers, policy)
        except ValueError as e:
            print(f"reconciler hq: --allowed-signers: {e}", file=sys.stderr)
            return 2
        log.info("main commits must be signed by a key of %s (signature policy %s)", signatures.allowed_signers,
                 signatures.policy)
    elif policy is not None:
        print("reconciler hq: --signature-policy needs --allowed-signers", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    signer: ManifestSigner | None = None
    if getattr(args, "signing_key", None):
        try:
            signer = signer_from_files(args.signing_key, workdir, next_keys=args.next_key or (),
                                       revoked=args.revoke_key or ())
        except ValueError as e:
            print(f"reconciler hq: {e}", file=sys.stderr)
            return 2
    elif getattr(args, "next_key", None) or getattr(args, "revoke_key", None):
        print("reconciler hq: --next-key and --revoke-key need --signing-key", file=sys.stderr)
        return 2
    store = GitStore(args.origin, workdir, password=password,
                     history=history_of(args.status_history_days, args.status_history_commits))
    hq = Hq(store, args.branch, signatures=signatures, signer=signer,
            publish_interval=getattr(args, "publish_interval", 0.0))
    secrets_dir = getattr(args, "notification_secrets_dir", None)
    if secrets_dir:
        if not Path(secrets_dir).is_dir():
            print(f"reconciler hq: --notification-secrets-dir {secrets_dir} is not a directory", file=sys.stderr)
            return 2
        workdir.mkdir(parents=True, exist_ok=True)
        hq.notifier = Notifier(workdir, Path(secrets_dir), hq.clock)
    else:
        log.info("no --notification-secrets-dir: HQ sends no notifications (spec.notifications of the topology)")
    if signer is None:
        log.warning("no --signing-key: HQ signs no manifest, and agents that verify (--trust-key) refuse every "
                    "action")
    origin = redact_url(args.origin)

    if args.once:
        turn = take_turn(hq, 0)
        if hq.notifier is not None:  # one delivery attempt each; what fails waits for the next run
            hq.notifier.deliver_due()
        if turn.problem is not None:  # one line; the traceback of a bug at debug level
            if turn.exception is not None:
                log.debug("pass failed", exc_info=turn.exception)
            log.error("pass failed: %s", turn.problem.message)
            return 1
        log.info("%s", turn.line or f"pass: nothing changed ({turn.seconds:.2f}s)")
        return 0

    stop = threading.Event()
    watcher = ChangeWatcher(args.origin, args.poll_interval)

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        watcher.trigger()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: AnyServer | None = None
    try:
        if args.listen:
            timeout = args.relay_timeout
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                hq.contacts = Contacts(workdir / LIVENESS_FILE, timeout, hq.clock(), hq.clock)
                relays = RelaysApi(hq.contacts, heartbeat_secret, watcher.trigger)
                hooks = HookGuard(secret, insecure=args.insecure_unsigned_webhook)
                if hooks.mode == "refused":
                    log.warning("no webhook secret: POST /v1/hooks/git is refused (give --webhook-secret-file, "
                                "or --insecure-unsigned-webhook); changes are picked up every --poll-interval")
                view = web.WebView(lambda: hq.snapshot, hq.job_rows, ui_token)
                server = make_server(make_app(watcher.trigger, hooks, hq.health, relays, hq_metrics(hq), view),
                                     args.listen,
                                     tls=tls_context, name="hq-http").start()
                if tls_context is None:
                    log.warning("%s", PLAIN_HTTP_WARNING)
                write_atomic(workdir / LISTEN_FILE, (server.url + "\n").encode("utf-8"))
            except (ListenError, OSError) as e:
                print(f"reconciler hq: cannot listen on {args.listen}: {e}", file=sys.stderr)
                return 2
            log.info("listening on %s (webhook %s, relay heartbeats %s, relays lost after %gs without one, "
                     "web view at %s/ %s)", server.url, hooks.mode, "signed" if heartbeat_secret else "unsigned",
                     timeout, server.url, "behind its read token" if ui_token else "open to every client")
        watcher.start()
        if hq.notifier is not None:
            hq.notifier.start()
        log.info("HQ following %s branch %s", origin, args.branch)
        turn = Turn(None, None, None, 0)
        while not stop.is_set():
            turn = take_turn(hq, turn.failures)
            if turn.problem is not None:
                log.error("%s", turn.line, exc_info=turn.exception)
            elif turn.line:
                log.info("%s", turn.line)
            if stop.is_set():
                break
            watcher.wait(next_wait(hq, turn, args.poll_interval))
    finally:
        if server is not None:
            server.close()
            (workdir / LISTEN_FILE).unlink(missing_ok=True)
        if hq.contacts is not None:
            hq.contacts.save()
        if hq.notifier is not None:
            hq.notifier.stop()
        watcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("HQ stopped")
    return 0
