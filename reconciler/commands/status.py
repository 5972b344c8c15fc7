"""``reconciler status``: the HQ report from the status refs, and ``--wait`` until settled.

Reads only git, one snapshot per poll: one fetch, then every ref is read at
the sha that fetch gave it. ``status/hq`` supplies what only HQ decides (the
accepted commit, the last evaluated ``main`` commit, its validation errors, a
commit HQ could not evaluate, whether each relay is alive or lost); each
``status/<relay>`` supplies its counts and client rows.

The job and relay roll-ups printed are not ``status/hq``'s: they are
recomputed from the relay refs of the same snapshot with
:func:`reconciler.report.aggregate`, the pure function HQ itself uses. HQ's
own roll-ups can lag the relay refs by a pass, and ``--wait`` decides from the
relay refs (so it never waits for an extra HQ pass); printing HQ's files next
to that decision could show InProgress beside exit 0, or counts contradicting
the client rows below them. So the exit code, the table, its counts and its
rows all come from one set of ref shas. (Only when the specs at the accepted
commit cannot be read here are HQ's published roll-ups shown as they are; the
read problem then keeps ``--wait`` from settling.)

The origin is mirrored into a cache directory keyed by the (redacted) origin
URL, so repeated calls fetch only what changed: branches outside ``status/``
with their history (``--commit`` walks ``main``), each ``status/*`` branch by
its newest commit only (``GitStore.fetch_tips``), never a relay's history. ``--wait`` is woken by the
change watcher (at once for a local origin) with a short poll as fallback.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from reconciler import protocol, report
from reconciler.fileio import write_atomic
from reconciler.gitstore import (
    STATUS_PREFIX,
    ChangeWatcher,
    GitError,
    GitStore,
    local_commit,
    local_origin_path,
    origin_password,
    url_credentials_warning,
)
from reconciler.plan import ClientState, JobState
from reconciler.progress import LiveLine, progress_line
from reconciler.reach import Reach, reach_of
from reconciler.redaction import redact_url
from reconciler.repo_tree import load_commit
from reconciler.report import (
    HQ_STATUS_REF,
    HqReport,
    JobReport,
    RelayJobStatus,
    RelayStatus,
    ReportError,
    StatusRow,
)
from reconciler.specs import Specs

WAIT_POLL_SECONDS = 1.0


class StatusError(Exception):
    """The status cannot be shown (no origin, git failure); exit 2."""


# ------------------------------------------------------------------ origin


def default_origin(cwd: Path | None = None) -> str:
    """The URL of the remote the git repository in ``cwd`` fetches from, as ``git fetch`` picks it.

    That is the current branch's upstream remote (``branch.<name>.remote``),
    else ``origin``; a relative local path is made absolute (git reads it
    from the top of the work tree). Works from any folder of the clone.
    """
    where = str(cwd or Path.cwd())

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)

    try:
        top = git("rev-parse", "--show-toplevel")
        branch = git("symbolic-ref", "--quiet", "--short", "HEAD").stdout.strip()
        upstream = git("config", "--get", f"branch.{branch}.remote").stdout.strip() if branch else ""
        remote = upstream if upstream and upstream != "." else "origin"
        got = git("remote", "get-url", remote)
    except OSError:
        got = top = subprocess.CompletedProcess([], 1)
    if top.returncode != 0 or got.returncode != 0:
        raise StatusError("no --origin given and the current directory is not in a git clone "
                          "with an upstream remote or a remote named origin")
    url, top_dir = got.stdout.strip(), top.stdout.strip()
    if not url:
        raise StatusError(f"the current repository's {remote} remote has no URL; pass --origin")
    local = local_origin_path(url)
    if local is not None and not url.startswith("file://") and not Path(url).expanduser().is_absolute():
        return str((Path(top_dir) / url).resolve())
    return url


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reconciler" / "status"


@contextmanager
def mirror_dir(origin: str) -> Iterator[Path]:
    """A workdir for the origin's mirror: the shared cache when free, else a throw-away one.

    GitStore assumes one process per workdir, so the cache is locked; a second
    ``status`` running at the same time mirrors into a temporary directory.
    """
    key = hashlib.sha256(redact_url(origin).encode("utf-8")).hexdigest()[:16]
    path = cache_root() / key
    handle = None
    try:
        import fcntl

        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / ".lock", "w")  # noqa: SIM115 - held for the whole run
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        if handle is not None:
            handle.close()
            handle = None
    if handle is not None:
        try:
            yield path
        finally:
            handle.close()
        return
    tmp = Path(tempfile.mkdtemp(prefix="reconciler-status-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- snapshot


@dataclass
class Snapshot:
    """Everything ``status`` shows and decides on, as of one fetch.

    ``view`` is the report printed and judged by ``--wait``: ``hq``'s
    accepted commit, validation and evaluation error, with roll-ups
    recomputed from ``relays`` (see the module docstring). ``rows`` holds the
    full client rows only of the (relay, job) pairs asked for with
    :meth:`Reader.load_rows`, read at ``relay_shas``: the text and markdown
    reports need none, ``--wait`` only those of jobs with Pending or
    InProgress clients.
    """

    main_commit: str | None  # origin's current tip of HQ's branch
    hq: HqReport | None  # status/hq as HQ published it
    specs: Specs | None  # at the accepted commit
    reach: Reach | None  # of specs
    relays: dict[str, RelayStatus]  # relay.yaml of every status/<relay> ref
    relay_shas: dict[str, str]
    view: HqReport | None
    rows: dict[str, dict[str, RelayJobStatus]] = field(default_factory=dict)  # job -> relay -> rows (at relay_shas)
    problems: list[str] = field(default_factory=list)


class Reader:
    """Reads snapshots from a store, re-reading only refs that moved."""

    def __init__(self, store: GitStore, workers: int = 8) -> None:
        self.store = store
        self.workers = workers
        self._relays: dict[str, tuple[str, RelayStatus]] = {}
        self._rows: dict[tuple[str, str], RelayJobStatus | str | None] = {}  # (sha, job) ->
        self._hq: tuple[str, HqReport] | None = None
        self._specs: tuple[str, Specs | None] | None = None

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items)), thread_name_prefix="status-read") as pool:
            return list(pool.map(fn, items))

    def read(self) -> Snapshot:
        store = self.store
        store.fetch_tips()
        problems: list[str] = []
        refs = store.list_status_refs()
        hq: HqReport | None = None
        hq_sha = refs.get(report.HQ_REF)
        if hq_sha is not None:
            if self._hq is None or self._hq[0] != hq_sha:
                files = store.read_files(hq_sha)
                try:
                    parsed = report.parse_hq_status(files)
                except ReportError as e:
                    problems.append(f"{HQ_STATUS_REF} unreadable: {e}")
                    parsed = None
                if parsed is not None:
                    self._hq = (hq_sha, parsed)
            if self._hq is not None and self._hq[0] == hq_sha:
                hq = self._hq[1]
        branch = hq.branch if hq else "main"
        main = store.ref_sha(branch)
        specs_now: Specs | None = None
        accepted = hq.accepted.accepted_commit if hq else None
        if accepted:
            if self._specs is None or self._specs[0] != accepted:
                try:
                    result = load_commit(store, accepted)
                    self._specs = (accepted, result.specs)
                except GitError as e:
                    problems.append(f"cannot read the accepted commit {accepted[:12]}: {e}")
                    self._specs = None
            if self._specs is not None:
                specs_now = self._specs[1]
        relay_refs = {name: sha for name, sha in refs.items() if name != report.HQ_REF}
        for gone in set(self._relays) - set(relay_refs):
            del self._relays[gone]
        stale = sorted(n for n, sha in relay_refs.items() if n not in self._relays or self._relays[n][0] != sha)
        for name, status in zip(stale, self._map(lambda n: self._read_relay(n, relay_refs[n]), stale)):
            self._relays[name] = (relay_refs[name], status)
        current = set(relay_refs.values())
        self._rows = {key: value for key, value in self._rows.items() if key[0] in current}
        relays = {name: status for name, (_, status) in self._relays.items()}
        return Snapshot(main, hq, specs_now, None if specs_now is None else reach_of(specs_now), relays, relay_refs, current_view(hq, specs_now, relays),
                        problems=problems)

    def _read_relay(self, name: str, sha: str) -> RelayStatus:
        path = f"{report.relay_prefix(name)}relay.yaml"
        try:
            data = self.store.read_file(sha, path, report.MAX_STATUS_FILE)
            if data is None:
                raise ReportError(f"{STATUS_PREFIX}{name} has no {path}")
            return report.parse_relay_status({path: data})
        except (GitError, ReportError) as e:
            return RelayStatus(name, None, 0, None, (f"status unreadable: {e}",), {})

    def load_rows(self, snap: Snapshot, wanted: Iterable[tuple[str, str]]) -> None:
        """Read the full rows of the (relay, job) pairs ``wanted`` into ``snap.rows``."""
        pairs = sorted({(relay, job) for relay, job in wanted if relay in snap.relay_shas})
        todo = [(relay, job) for relay, job in pairs if (snap.relay_shas[relay], job) not in self._rows]

        def read(pair: tuple[str, str]) -> RelayJobStatus | str | None:
            relay, job = pair
            path = f"{report.relay_prefix(relay)}jobs/{job}.yaml"
            try:
                data = self.store.read_file(snap.relay_shas[relay], path, report.MAX_STATUS_FILE)
                if data is None:
                    return None
                return report.parse_relay_job(data, f"{STATUS_PREFIX}{relay}:{path}")[1]
            except (GitError, ReportError) as e:
                return f"rows of {relay} unreadable: {e}"  # said, never silently left out

        for pair, entry in zip(todo, self._map(read, todo)):
            self._rows[(snap.relay_shas[pair[0]], pair[1])] = entry
        for relay, job in pairs:
            entry = self._rows.get((snap.relay_shas[relay], job))
            if isinstance(entry, str):
                snap.problems.append(entry)
            elif entry is not None:
                snap.rows.setdefault(job, {})[relay] = entry


def current_view(hq: HqReport | None, specs_now: Specs | None,
                 relays: dict[str, RelayStatus]) -> HqReport | None:
    """The report to print and decide on: HQ's decisions (relay liveness too), roll-ups from the relay refs read with them."""
    if hq is None or specs_now is None:
        return hq
    return report.aggregate(specs_now, hq.accepted, hq.branch, hq.validation_errors, relays,
                            report.relay_liveness(hq.relays))


def counted_relays(snap: Snapshot, job: str) -> frozenset[str] | None:
    """Relays whose rows the roll-up of ``job`` counts (None: unknown without specs, show every relay)."""
    if snap.reach is None:
        return None
    return snap.reach.relays_of(job)


def rows_for_report(snap: Snapshot, only_job: str | None) -> list[tuple[str, str]]:
    """(relay, job) pairs whose rows the JSON report or ``--job`` show: the relays the job's counts come from."""
    jobs = {j.job for j in (snap.view.jobs if snap.view else ()) if only_job is None or j.job == only_job}
    pairs = []
    for job in sorted(jobs):
        counted = counted_relays(snap, job)
        pairs += [(relay, job) for relay, status in snap.relays.items()
                  if job in status.jobs and (counted is None or relay in counted)]
    return pairs


def rows_for_wait(snap: Snapshot, only_job: str | None) -> list[tuple[str, str]]:
    """(relay, job) pairs ``--wait`` must look into: those with Pending or InProgress clients."""
    active = (ClientState.PENDING.value, ClientState.IN_PROGRESS.value)
    return [(relay, job) for relay, status in snap.relays.items() for job, digest in status.jobs.items()
            if (only_job is None or job == only_job) and any(digest.counts.get(s, 0) for s in active)]


# ----------------------------------------------------------------- settled



# ``status --wait`` exit codes (README, "Command reference").
EXIT_SETTLED = 0  # settled, and no row Failed or Conflict, no job Halted
EXIT_FAILURES = 1  # settled with Failed or Conflict rows, or a Halted job
EXIT_ERROR = 2  # no origin, a git failure, an unknown job or commit, an unreadable inventory
EXIT_REJECTED = 3  # HQ evaluated the awaited commit and rejected it as invalid
EXIT_TIMEOUT = 4  # still not settled after --timeout
EXIT_NO_MATCH = 1  # --software: no client has matching software

Covers = Callable[[str, str], bool]  # covers(commit, other): other is commit or in its history


def _same(commit: str, other: str) -> bool:
    return commit == other


def waiting_reasons(snap: Snapshot, only_job: str | None = None, target: str | None = None,
                    covers: Covers = _same) -> list[str]:
    """Why the system has not settled; empty when it has (DESIGN section 7, ``status --wait``).

    ``target`` is the commit waited for (default: the origin's current
    ``main``): HQ must have evaluated it or a commit after it. ``covers``
    tells whether a commit includes another.
    """
    reasons = list(snap.problems)
    hq = snap.view
    if hq is None:
        return reasons + [f"HQ has not published {HQ_STATUS_REF} yet"]
    failed = hq.accepted.evaluation_error
    if failed is not None:
        reasons.append(f"HQ could not evaluate {hq.branch} {report.short(failed.commit)} and retries it: "
                       f"{_one_line(failed.message, 200)}")
    awaited = target if target is not None else snap.main_commit
    evaluated = hq.accepted.main_commit
    if (awaited is not None and (evaluated is None or not covers(evaluated, awaited))
            and (failed is None or not covers(failed.commit, awaited))):
        reasons.append(f"HQ has not evaluated {hq.branch} {report.short(awaited)} yet "
                       f"({HQ_STATUS_REF} is for {report.short(evaluated)})")
    accepted = hq.accepted.accepted_commit
    if accepted is None or snap.specs is None or snap.reach is None:
        return reasons
    reach = snap.reach
    jobs = [j for j in snap.specs.jobs if only_job is None or j.name == only_job]
    lost = {r.relay: report.liveness_label(r) for r in report.lost_relays(hq.relays)}
    behind: dict[str, str] = {}
    for job in jobs:
        for relay in sorted(reach.relays_of(job.name)):
            status = snap.relays.get(relay)
            if relay in lost and (status is None or status.observed_commit != accepted):
                behind[relay] = (f"relay {relay} is {lost[relay]} and has not published status for the accepted "
                                 f"commit {report.short(accepted)}")
            elif status is None:
                behind[relay] = f"relay {relay} has not published status yet"
            elif status.observed_commit is None and status.errors:
                behind[relay] = f"relay {relay}: {_one_line(status.errors[0], 200)}"
            elif status.observed_commit != accepted:
                behind[relay] = (f"relay {relay} has not published status for the accepted commit "
                                 f"{report.short(accepted)} (it reports {report.short(status.observed_commit)})")
    reasons += [behind[r] for r in sorted(behind)]
    active_states = (ClientState.PENDING.value, ClientState.IN_PROGRESS.value)
    for job in jobs:
        reached = reach.relays_of(job.name)
        for relay in sorted(reached - set(behind)):
            digest = snap.relays[relay].jobs.get(job.name)
            if digest is None or not any(digest.counts.get(s, 0) for s in active_states):
                continue
            if digest.state in (JobState.SCHEDULED, JobState.CLIENTS_OFFLINE):
                continue  # all it has still to run waits for the schedule or for offline clients
            entry = snap.rows.get(job.name, {}).get(relay)  # read at the tree whose relay.yaml is current
            if entry is None:
                reasons.append(f"job {job.name}: rows of {relay} unreadable")
                continue
            active = [r for r in entry.rows if report.is_waiting_row(r.state, r.message, r.reason)]
            if active:
                names = ", ".join(r.client for r in active[:5]) + (", …" if len(active) > 5 else "")
                held = f"; relay {relay} is {lost[relay]}" if relay in lost else ""
                reasons.append(f"job {job.name}: {report.plural(len(active), 'client')} Pending or InProgress "
                               f"on {relay} ({names}){held}")
    return reasons


def rejected(snap: Snapshot, target: str | None, covers: Covers) -> bool:
    """Whether HQ evaluated ``target`` (or a commit after it) as invalid, and the accepted commit lacks it."""
    hq = snap.view
    if hq is None or target is None:
        return False
    accepted = hq.accepted
    return (accepted.main_valid is False and accepted.main_commit is not None
            and covers(accepted.main_commit, target)
            and (accepted.accepted_commit is None or not covers(accepted.accepted_commit, target)))


def failed_jobs(snap: Snapshot, only_job: str | None = None) -> list[str]:
    """Jobs with Failed or Conflict rows, or Halted: a settled system with these is not all good."""
    if snap.view is None:
        return []
    bad = []
    for job in snap.view.jobs:
        if only_job is not None and job.job != only_job:
            continue
        if (job.state is JobState.HALTED or job.counts.get(ClientState.FAILED.value, 0)
                or job.counts.get(ClientState.CONFLICT.value, 0)):
            bad.append(f"{job.job} ({report.state_label(job)}, {job.failure_count} failed)")
        if job.not_registered_count:
            bad.append(f"{job.job} names clients no relay knows: {report.not_registered_label(job)}")
    return bad


# ------------------------------------------------------------------ output


def _client_rows(snap: Snapshot, job: JobReport) -> list[tuple[str, StatusRow]]:
    """The rows behind ``job``'s counts: only relays its roll-up counts (``--wait`` may have read others)."""
    counted = counted_relays(snap, job.job)
    out: list[tuple[str, StatusRow]] = []
    for relay, status in sorted(snap.rows.get(job.job, {}).items()):
        if counted is None or relay in counted:
            out.extend((relay, row) for row in status.rows)
    out.sort(key=lambda item: (item[1].client, item[0]))
    return out


def render_json(snap: Snapshot, only_job: str | None) -> str:
    hq = snap.view
    jobs = [j for j in (hq.jobs if hq else ()) if only_job is None or j.job == only_job]
    failed = hq.accepted.evaluation_error if hq else None
    doc = {
        "acceptedCommit": hq.accepted.accepted_commit if hq else None,
        "mainCommit": hq.accepted.main_commit if hq else None,
        "valid": hq.accepted.main_valid if hq else None,
        "evaluationError": None if failed is None else {"commit": failed.commit, "message": failed.message},
        "validationErrors": [
            {"path": e.path, "line": e.line, "column": e.column, "message": e.message}
            for e in (hq.validation_errors if hq else ())
        ],
        "jobs": [
            {
                "name": job.job,
                "state": job.state.value,
                "scheduledFor": report.format_time(job.scheduled_for),
                "counts": dict(job.counts),
                "rebootRequired": job.reboot_required,
                "pending": dict(job.pending),
                "skipped": [{"message": m, "count": n} for m, n in job.skipped],
                "notRegistered": list(job.not_registered),
                "relays": [{"relay": d.relay, "state": d.state.value, "counts": dict(d.counts),
                            "rebootRequired": d.reboot_required} for d in job.relays],
                "clients": [
                    {"client": row.client, "relay": relay, "state": row.state.value, "reason": row.reason,
                     "installedVersion": row.installed_version, "attempts": row.attempts, "message": row.message}
                    for relay, row in _client_rows(snap, job)
                ],
            }
            for job in jobs
        ],
        "relays": [_relay_json(r) for r in (hq.relays if hq else ())],
    }
    return report.escape_json_text(json.dumps(doc, indent=2, sort_keys=False, ensure_ascii=False))


def _relay_json(r: report.RelayReport) -> dict[str, Any]:
    live = r.liveness
    return {
        "relay": r.relay, "parent": r.parent, "observedCommit": r.observed_commit, "current": r.current,
        "clients": {"total": r.clients, "online": r.clients_online, "offline": r.clients_offline,
                    "movedAway": r.moved_away, "retired": r.retired},
        "liveness": None if live is None else live.state.value,
        "livenessSince": None if live is None else report.format_time(live.since),
        "lastContact": None if live is None else report.format_time(live.last_contact),
        "errors": list(r.errors), "failed": r.failed,
    }


_SHORT = {ClientState.SUCCEEDED: "OK", ClientState.IN_PROGRESS: "RUN", ClientState.PENDING: "PEND",
          ClientState.FAILED: "FAIL", ClientState.SKIPPED: "SKIP", ClientState.CONFLICT: "CONF",
          ClientState.SUSPENDED: "SUSP"}


def _short_states(jobs: Sequence[JobReport]) -> list[tuple[str, ClientState]]:
    """The state columns of the tables: the usual six, and Suspended when a row is."""
    return [(_SHORT[state], state) for state in report.summary_columns(jobs)]


def _columns(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _one_line(text: str, limit: int = 100) -> str:
    text = report.printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _lost_lines(hq: HqReport, limit: int = 10) -> list[str]:
    """One line per relay HQ calls lost, with the jobs that keep the state it last reported."""
    lost = report.lost_relays(hq.relays)
    out = []
    for r in lost[:limit]:
        jobs = report.jobs_reaching(hq, r.relay)
        shown = ", ".join(jobs[:limit]) + (f" +{len(jobs) - limit} more" if len(jobs) > limit else "")
        held = f"; jobs reaching it keep its last reported state: {shown}" if jobs else ""
        out.append(f"RELAY {r.relay} {report.liveness_label(r)}: no heartbeat reaches HQ{held}")
    if len(lost) > limit:
        out.append(f"… and {len(lost) - limit} more relays LOST")
    return out


def render_text(snap: Snapshot, only_job: str | None) -> str:
    hq = snap.view
    if hq is None:
        return f"No {HQ_STATUS_REF} on the origin yet: HQ has not run a pass."
    accepted = hq.accepted
    failed = accepted.evaluation_error
    validity = {True: "valid", False: f"INVALID ({report.plural(len(hq.validation_errors), 'error')}, not applied)",
                None: "not found" if failed is None else "not evaluated yet"}[accepted.main_valid]
    when = report.format_time(accepted.accepted_at) or "?"
    out = [f"Accepted commit {report.short(accepted.accepted_commit)} (accepted {when}); "
           f"{hq.branch} {report.short(accepted.main_commit)} {validity}"]
    if failed is not None:
        out.append(f"HQ COULD NOT EVALUATE {hq.branch} {report.short(failed.commit)} (it retries): "
                   f"{_one_line(failed.message, 200)}")
    if snap.main_commit is not None and snap.main_commit not in (accepted.main_commit,
                                                                 failed.commit if failed else None):
        out.append(f"(origin's {hq.branch} is now {report.short(snap.main_commit)}; HQ has not evaluated it yet)")
    out += _lost_lines(hq)
    out.append("")
    jobs = [j for j in hq.jobs if only_job is None or j.job == only_job]
    short_states = _short_states(jobs)
    if jobs:
        header = ["JOB", "PACKAGE", "CLIENTS", *(s for s, _ in short_states), "STATE"]
        rows = [header]
        for job in jobs:
            rows.append([job.job, report.package_label(job), str(job.clients),
                         *(str(job.counts.get(s.value, 0)) for _, s in short_states), report.state_label(job)])
        out += _columns(rows, [False, False, True, *([True] * len(short_states)), False])
        why = [(job.job, report.pending_label(job), report.skipped_label(job)) for job in jobs]
        if any(pending for _, pending, _ in why):
            out += ["", "Pending, by reason:"]
            out += [f"  {name}  {pending}" for name, pending, _ in why if pending]
        rebooting = [job for job in jobs if job.reboot_required]
        if rebooting:
            out += ["", "Succeeded, waiting for a reboot:"]
            out += [f"  {job.job}  {report.plural(job.reboot_required, 'client')}" for job in rebooting]
        if any(skipped for _, _, skipped in why):
            out += ["", "Skipped:"]
            out += [f"  {name}  {_one_line(skipped, 200)}" for name, _, skipped in why if skipped]
        unknown = [job for job in jobs if job.not_registered_count]
        if unknown:
            out += ["", "Named clients no relay knows (not registered):"]
            out += [f"  {job.job}  {report.not_registered_label(job)}" for job in unknown]
    else:
        out.append("No jobs." if accepted.accepted_commit else "No commit has been accepted yet.")
    if only_job is not None and jobs:
        job = jobs[0]
        out += ["", f"Destinations of {job.job} ({job.destination_type}: {', '.join(job.destinations)}):"]
        rows = [["RELAY", "SUBTREE", "CLIENTS", *(s for s, _ in short_states), "STATE"]]
        for d in job.relays:
            rows.append([d.relay, _one_line(", ".join(d.relays), 40), str(sum(d.counts.values())),
                         *(str(d.counts.get(s.value, 0)) for _, s in short_states), d.state.value])
        out += ["  " + line for line in _columns(rows, [False, False, True, *([True] * len(short_states)), False])]
        clients = _client_rows(snap, job)
        out += ["", f"Clients ({len(clients)}):"]
        if clients:
            rows = [["CLIENT", "RELAY", "STATE", "REASON", "INSTALLED", "ATTEMPTS", "MESSAGE"]]
            for relay, row in clients:
                rows.append([row.client, relay, row.state.value, row.reason or "-", row.installed_version or "-",
                             str(row.attempts), _one_line(row.message)])
            out += ["  " + line for line in _columns(rows, [False, False, False, False, False, True, False])]
    failures = [f for j in jobs for f in j.failures]
    total = sum(j.failure_count for j in jobs)
    if total and only_job is None:
        out += ["", f"Failures ({total}):"]
        for f in failures[: report.FAILURE_LIMIT]:
            out.append(f"  {f.job}  {f.relay}/{f.client}  {f.state.value}  "
                       f"{report.plural(f.attempts, 'attempt')}  {_one_line(f.message)}")
        if total > len(failures[: report.FAILURE_LIMIT]):
            out.append(f"  … and {total - len(failures[: report.FAILURE_LIMIT])} more")
    if hq.validation_errors:
        out += ["", f"Validation errors in {hq.branch} {report.short(accepted.main_commit)}:"]
        for e in hq.validation_errors[: report.LIST_LIMIT]:
            out.append(f"  {report.printable(e.path)}:{e.line}:{e.column}: {_one_line(e.message, 200)}")
        if len(hq.validation_errors) > report.LIST_LIMIT:
            out.append(f"  … and {len(hq.validation_errors) - report.LIST_LIMIT} more")
    behind = [r for r in hq.relays if not r.current]
    if behind:
        names = ", ".join(r.relay for r in behind[:10]) + (", …" if len(behind) > 10 else "")
        out += ["", f"Relays without status for the accepted commit ({len(behind)}): {names}"]
    troubled = [r for r in hq.relays if r.errors]
    if troubled or snap.problems:
        out += ["", "Errors:"]
        out += [f"  {r.relay}: {_one_line(r.errors[0], 200)}" for r in troubled[: report.LIST_LIMIT]]
        out += [f"  {_one_line(p, 200)}" for p in snap.problems[: report.LIST_LIMIT]]
    return "\n".join(out)


def render(snap: Snapshot, fmt: str, only_job: str | None) -> str:
    if fmt == "json":
        return render_json(snap, only_job)
    if fmt == "markdown":
        if snap.view is None:
            return f"No `{HQ_STATUS_REF}` on the origin yet: HQ has not run a pass.\n"
        return report.render_summary(snap.view, only_job)  # summary.md as HQ writes it for these refs
    return render_text(snap, only_job) + "\n"


# -------------------------------------------------------------------- main


def _emit(text: str, stream: TextIO) -> None:
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def main(args: argparse.Namespace) -> int:
    try:
        origin = args.origin or default_origin()
        password = origin_password(getattr(args, "origin_password_file", None))
    except (StatusError, OSError, ValueError) as e:
        print(f"reconciler status: {e}", file=sys.stderr)
        return 2
    warning = url_credentials_warning(origin, password is not None)
    if warning:
        print(f"reconciler status: warning: {warning}", file=sys.stderr)
    with mirror_dir(origin) as workdir:
        store = GitStore(origin, workdir, password=password)
        reader = Reader(store)
        try:
            return _run(args, origin, reader)
        except GitError as e:
            print(f"reconciler status: {e}", file=sys.stderr)
            return 2


def fleet_inventory(reader: Reader, snap: Snapshot) -> tuple[str, list[str], bool]:
    """Every relay's ``inventory.json`` of the snapshot, merged as ``reconciler plan --inventory`` reads it.

    Returns the document, notes for the operator, and whether every relay's
    inventory was read. A relay the accepted topology does not name is left
    out (``plan`` would refuse its clients); a client found under two relays
    (it moved) is kept once: the online entry, else the first relay's by
    name, and said in a note.
    """
    known = {r.name for r in snap.specs.topology.relays} if snap.specs is not None else None
    notes: list[str] = []
    wanted: list[str] = []
    for name in sorted(snap.relay_shas):
        if known is not None and name not in known:
            notes.append(f"{STATUS_PREFIX}{name}: not a relay of the accepted topology; its clients are left out")
        else:
            wanted.append(name)
    paths = [f"{report.relay_prefix(name)}inventory.json" for name in wanted]
    contents = reader.store.read_paths([(snap.relay_shas[name], path) for name, path in zip(wanted, paths)],
                                       report.MAX_STATUS_FILE)
    software, software_notes = read_software(reader, snap, wanted, note_missing=False)
    notes += software_notes
    complete = True
    chosen: dict[str, tuple[str, report.InventoryEntry]] = {}
    for name, path, data in zip(wanted, paths, contents):
        try:
            if data is None:
                raise ReportError(f"{STATUS_PREFIX}{name} has no {path}")
            _, entries = report.parse_relay_inventory(data, path)
        except ReportError as e:
            notes.append(f"inventory of {name} unreadable, its clients are left out: {e}")
            complete = False
            continue
        lists = software[name].lists() if name in software else {}
        entries = tuple(replace(e, software=lists[e.id]) if e.id in lists else e for e in entries)
        for entry in entries:
            seen = chosen.get(entry.id)
            if seen is None:
                chosen[entry.id] = (name, entry)
                continue
            keep = (name, entry) if entry.online and not seen[1].online else seen
            notes.append(f"client {entry.id} is in the inventories of {seen[0]} and {name}; "
                         f"kept {keep[0]}'s ({'online' if keep[1].online else 'first by relay name'})")
            chosen[entry.id] = keep
    return report.render_fleet_inventory(list(chosen.values())), notes, complete


# ------------------------------------------------------------------ software inventory


def read_software(reader: Reader, snap: Snapshot, relays: Sequence[str] | None = None, *,
                  note_missing: bool = True) -> tuple[dict[str, report.RelaySoftware], list[str]]:
    """Each relay's ``software.json`` of the snapshot (``relays``: only these), and notes on those unreadable.

    A relay without the file (one that predates software inventories) is
    left out, with a note when ``note_missing``.
    """
    names = sorted(snap.relay_shas) if relays is None else list(relays)
    paths = [f"{report.relay_prefix(name)}{report.SOFTWARE_FILE}" for name in names]
    contents = reader.store.read_paths([(snap.relay_shas[name], path) for name, path in zip(names, paths)],
                                       report.MAX_STATUS_FILE)
    found: dict[str, report.RelaySoftware] = {}
    notes: list[str] = []
    for name, path, data in zip(names, paths, contents):
        if data is None:
            if note_missing:
                notes.append(f"{STATUS_PREFIX}{name} publishes no {report.SOFTWARE_FILE} (a relay older than software "
                             "inventories); its clients' software is not shown")
            continue
        try:
            found[name] = report.parse_relay_software(data, path)
        except ReportError as e:
            notes.append(f"software inventory of {name} unreadable, its clients are left out: {e}")
    return found, notes


_GLOB = frozenset("*?[")


def software_matcher(pattern: str) -> Callable[[str], bool]:
    """Case-insensitive: a glob (``*``, ``?``, ``[...]``) matches the whole name, other text any part of it."""
    folded = pattern.casefold()
    if _GLOB & set(pattern):
        return lambda name: fnmatch.fnmatchcase(name.casefold(), folded)
    return lambda name: folded in name.casefold()


@dataclass(frozen=True)
class SoftwareHit:
    name: str
    version: str
    source: str
    client: str
    relay: str


def find_software(found: dict[str, report.RelaySoftware], pattern: str) -> tuple[list[SoftwareHit], int, dict[str, int]]:
    """Every (software, client) whose name matches ``pattern``, how many clients were searched, and the cut ones.

    The clients whose list their agent cut (client -> entries left out)
    are returned too: what is not in a cut list may still be installed.
    """
    match = software_matcher(pattern)
    hits: list[SoftwareHit] = []
    searched = 0
    cut: dict[str, int] = {}
    for relay, software in sorted(found.items()):
        searched += len(software.clients)
        cut.update(software.omitted)
        for holder in software.holders:
            if match(holder.name):
                hits.extend(SoftwareHit(holder.name, holder.version, holder.source, client, relay)
                            for client in holder.clients)
    hits.sort(key=lambda h: (h.name.casefold(), h.name, h.version, h.source, h.client, h.relay))
    return hits, searched, cut


def software_summary(hits: Sequence[SoftwareHit]) -> list[tuple[str, str, str, int]]:
    """(name, version, source, clients) per version found."""
    counts: dict[tuple[str, str, str], set[str]] = {}
    for h in hits:
        counts.setdefault((h.name, h.version, h.source), set()).add(h.client)
    return [(name, version, source, len(clients)) for (name, version, source), clients in
            sorted(counts.items(), key=lambda kv: (kv[0][0].casefold(), kv[0][0], kv[0][1], kv[0][2]))]


def render_software(hits: Sequence[SoftwareHit], searched: int, cut: dict[str, int], pattern: str, fmt: str,
                    summary: bool) -> str:
    """``--software``: one line per (software, client), or with ``summary`` per version, in text or JSON."""
    clients = len({h.client for h in hits})
    if fmt == "json":
        doc: dict[str, Any] = {"pattern": pattern, "clientsSearched": searched, "clientsFound": clients,
                               "truncatedLists": dict(sorted(cut.items()))}
        if summary:
            doc["versions"] = [{"name": n, "version": v, "source": s, "clients": c}
                               for n, v, s, c in software_summary(hits)]
        else:
            doc["matches"] = [{"name": h.name, "version": h.version, "source": h.source, "client": h.client,
                               "relay": h.relay} for h in hits]
        return report.escape_json_text(json.dumps(doc, indent=2, ensure_ascii=False))  # bidi controls inert
    if summary:
        table: list[Sequence[str]] = [("SOFTWARE", "VERSION", "SOURCE", "CLIENTS")]
        table += [(report.printable(n), report.printable(v) or "-", s, str(c)) for n, v, s, c in software_summary(hits)]
        right: Sequence[bool] = (False, False, False, True)
    else:
        table = [("SOFTWARE", "VERSION", "SOURCE", "CLIENT", "RELAY")]
        table += [(report.printable(h.name), report.printable(h.version) or "-", h.source, h.client, h.relay)
                  for h in hits]
        right = (False,) * 5
    out = _columns(table, right) if len(table) > 1 else []
    out.append(f"{report.plural(clients, 'client')} of {searched} with a software inventory "
               f"{'have' if clients != 1 else 'has'} software matching {pattern!r}")
    if cut:
        out.append(f"the lists of {report.plural(len(cut), 'client')} were cut by their agents (more than "
                   f"{protocol.MAX_SOFTWARE} entries or {protocol.MAX_SOFTWARE_BYTES // 1024} KiB); "
                   f"software missing there may still be installed: {', '.join(sorted(cut)[:10])}"
                   + (" …" if len(cut) > 10 else ""))
    return "\n".join(out)


def show_software(reader: Reader, snap: Snapshot, pattern: str, fmt: str, summary: bool) -> int:
    """``--software PATTERN``: print the clients that have matching software; 0 if any, 1 if none."""
    known = {r.name for r in snap.specs.topology.relays} if snap.specs is not None else None
    relays = [name for name in sorted(snap.relay_shas) if known is None or name in known]
    found, notes = read_software(reader, snap, relays)
    for note in notes:
        print(f"reconciler status: {note}", file=sys.stderr)
    hits, searched, cut = find_software(found, pattern)
    _emit(render_software(hits, searched, cut, pattern, fmt, summary), sys.stdout)
    return EXIT_SETTLED if hits else EXIT_NO_MATCH


def write_inventory(reader: Reader, snap: Snapshot, target: str) -> bool:
    """``--inventory``: write the fleet's inventory to ``target`` (``-``: standard output); False if incomplete."""
    text, notes, complete = fleet_inventory(reader, snap)
    for note in notes:
        print(f"reconciler status: {note}", file=sys.stderr)
    if target == "-":
        _emit(text, sys.stdout)
    else:
        write_atomic(Path(target), text.encode("utf-8"))
    return complete


def _read(reader: Reader, args: argparse.Namespace) -> Snapshot:
    snap = reader.read()
    wanted = rows_for_report(snap, args.job) if args.format == "json" or args.job else []
    if args.wait:
        wanted += rows_for_wait(snap, args.job)
    reader.load_rows(snap, wanted)
    return snap


def _run(args: argparse.Namespace, origin: str, reader: Reader) -> int:
    pattern = getattr(args, "software", None)
    if pattern is not None:
        if args.wait or args.inventory is not None or args.job or args.format == "markdown":
            print("reconciler status: --software is a search of its own: not with --wait, --inventory, --job "
                  "or --format markdown", file=sys.stderr)
            return EXIT_ERROR
        if not pattern.strip() or len(pattern) > protocol.MAX_SOFTWARE_NAME:
            print(f"reconciler status: --software: give 1 to {protocol.MAX_SOFTWARE_NAME} characters",
                  file=sys.stderr)
            return EXIT_ERROR
        return show_software(reader, reader.read(), pattern, args.format, bool(getattr(args, "summary", False)))
    if getattr(args, "summary", False):
        print("reconciler status: --summary goes with --software", file=sys.stderr)
        return EXIT_ERROR
    snap = _read(reader, args)
    if args.job and snap.view is not None and not any(j.job == args.job for j in snap.view.jobs):
        known = ", ".join(j.job for j in snap.view.jobs) or "none"
        print(f"reconciler status: no job {args.job!r} in the accepted commit "
              f"{report.short(snap.view.accepted.accepted_commit)} (jobs: {known})", file=sys.stderr)
        return EXIT_ERROR
    if args.commit is not None and not args.wait:
        print("reconciler status: --commit needs --wait", file=sys.stderr)
        return EXIT_ERROR
    if not args.wait:
        return _show(args, reader, snap, EXIT_SETTLED)
    target = snap.main_commit
    if args.commit is not None:
        # HEAD, HEAD~1 or a branch mean the caller's own checkout when there is one; the commit
        # must then be on the origin (HQ cannot evaluate what was never pushed).
        local = local_commit(Path.cwd(), args.commit)
        on_origin = reader.store.resolve_commit(local) if local else None
        remote = reader.store.resolve_commit(args.commit)
        target = on_origin or (None if local else remote)
        if target is None:
            if local and remote:
                why = (f"{args.commit!r} is {local[:12]} here but {remote[:12]} on the origin; "
                       f"push it, or give the sha")
            elif local:
                why = f"{args.commit!r} is {local[:12]} here, which is not on the origin: push it first"
            else:
                why = f"commit {args.commit!r} is not on the origin"
            print(f"reconciler status: {why}", file=sys.stderr)
            return EXIT_ERROR
    covers = reader.store.contains
    deadline = time.monotonic() + args.timeout
    watcher = ChangeWatcher(origin, WAIT_POLL_SECONDS)
    watcher.start()
    live = LiveLine(sys.stderr)
    try:
        while True:
            if rejected(snap, target, covers):
                assert snap.view is not None and target is not None
                live.finish()
                code = _show(args, reader, snap, EXIT_REJECTED)
                accepted = snap.view.accepted
                print(f"reconciler status: {report.short(target)} was rejected: {snap.view.branch} "
                      f"{report.short(accepted.main_commit)} does not validate "
                      f"({report.plural(len(snap.view.validation_errors), 'error')}); the accepted commit "
                      f"{report.short(accepted.accepted_commit)} stays in force", file=sys.stderr)
                for e in snap.view.validation_errors[: report.LIST_LIMIT]:
                    print(f"  {report.printable(e.path)}:{e.line}:{e.column}: {_one_line(e.message, 300)}",
                          file=sys.stderr)
                return code
            reasons = waiting_reasons(snap, args.job, target, covers)
            if reasons or live.last:  # a commit settled at the first look needs no progress
                live.show(wait_line(snap, args.job, reasons))
            if not reasons:
                live.finish()
                failures = failed_jobs(snap, args.job)
                code = _show(args, reader, snap, EXIT_FAILURES if failures else EXIT_SETTLED)
                if failures:
                    print(f"reconciler status: settled with failures: {'; '.join(failures)}", file=sys.stderr)
                return code
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            watcher.wait(min(WAIT_POLL_SECONDS, remaining))
            snap = _read(reader, args)
    finally:
        watcher.stop()
        live.finish()
    _show(args, reader, snap, EXIT_TIMEOUT)
    print(f"reconciler status: timed out after {args.timeout:g}s; still waiting for:", file=sys.stderr)
    for reason in reasons[: report.LIST_LIMIT]:
        print(f"  - {reason}", file=sys.stderr)
    if len(reasons) > report.LIST_LIMIT:
        print(f"  - … and {len(reasons) - report.LIST_LIMIT} more", file=sys.stderr)
    return EXIT_TIMEOUT


def wait_line(snap: Snapshot, only_job: str | None, reasons: Sequence[str]) -> str:
    """``--wait``'s live line: each job's counts (as the demo shows them), then the first thing waited for."""
    shown = [j for j in (snap.view.jobs if snap.view else ()) if only_job is None or j.job == only_job]
    jobs = [{"name": j.job, "state": j.state.value, "counts": dict(j.counts)} for j in shown]
    parts = [progress_line(jobs)] if any(sum(j.counts.values()) for j in shown) else []
    if reasons:
        parts.append(f"waiting: {_one_line(reasons[0], 200)}"
                     + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    return " — ".join(parts) or "settled"


def _show(args: argparse.Namespace, reader: Reader, snap: Snapshot, code: int) -> int:
    """Print the report (unless ``--inventory -`` prints the inventory instead) and write the inventory."""
    if args.inventory is not None:
        try:
            if not write_inventory(reader, snap, args.inventory):
                code = code or EXIT_ERROR
        except OSError as e:
            print(f"reconciler status: cannot write {args.inventory}: {e.strerror or e}", file=sys.stderr)
            return EXIT_ERROR
    if args.inventory != "-":
        _emit(render(snap, args.format, args.job), sys.stdout)
    return code
