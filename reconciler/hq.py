"""``reconciler hq``: accept valid ``main`` commits, aggregate the relays, publish ``status/hq``.

One pass: fetch; if the branch moved since the last evaluation, validate the
new commit at that commit (never a checkout) and accept it if it is valid,
else keep the last accepted commit and publish the errors; read every
relay's ``status/<relay>`` ref that changed; aggregate (:mod:`reconciler.report`,
pure); publish ``status/hq`` when its content changed.

All state lives in git: the accepted commit and when it was accepted are
read back from ``status/hq`` when HQ starts, and everything else is
recomputed, so a killed HQ simply converges again. A pass is woken by the
change watcher (watchdog on a local origin, the webhook) or the poll interval.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reconciler import report, specs
from reconciler.gitstore import STATUS_PREFIX, ChangeWatcher, GitError, GitStore, redact_url
from reconciler.logs import configure_logging
from reconciler.report import Accepted, RelayStatus, ReportError
from reconciler.specs import LoadResult, SpecError, Specs
from reconciler.webhook import ListenError, Server, make_app, read_secret_file

log = logging.getLogger("reconciler.hq")

HQ_REF = STATUS_PREFIX + report.HQ_REF
SPEC_PREFIXES = (*specs.TOPOLOGY_FILES, specs.PACKAGES_DIR, specs.JOBS_DIR)
MAX_SYMLINK_HOPS = 40


# ------------------------------------------------------------ specs at a commit


def git_artifact_check(store: GitStore, commit: str) -> specs.ArtifactCheck:
    """Artifact checker answering from the tree of ``commit``, following symbolic links like a checkout would."""

    def check(relpath: str) -> str | None:
        resolved: list[str] = []
        queue = [p for p in relpath.split("/") if p not in ("", ".")]
        hops = 0
        while queue:
            part = queue.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return "leaves the repo through a symbolic link"
                resolved.pop()
                continue
            candidate = "/".join([*resolved, part])
            kind = store.path_kind(commit, candidate)
            if kind is None:
                return "is a broken symbolic link" if hops else "does not exist"
            if kind == "symlink":
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return "is a symbolic link loop"
                target = store.symlink_target(commit, candidate) or ""
                if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
                    return "leaves the repo through a symbolic link"
                queue = [p for p in target.split("/") if p] + queue
                continue
            if kind == "submodule":
                return "is a git submodule, not a file or directory"
            if kind == "file" and queue:
                return "does not exist"  # a file used as a directory
            resolved.append(part)
        return None

    return check


def load_specs(store: GitStore, commit: str) -> LoadResult:
    """Load and validate the specs at ``commit`` of the store's mirror."""
    files = store.read_files(commit, prefixes=SPEC_PREFIXES, max_size=specs.MAX_FILE_BYTES)
    return specs.parse_repo(files, git_artifact_check(store, commit))


# ------------------------------------------------------------------ the HQ


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass
class PassResult:
    """What one pass did; ``line`` is the log line, None when it did nothing."""

    main_commit: str | None
    accepted_commit: str | None
    published: str | None
    relays_read: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> str | None:
        if not self.notes and self.published is None:
            return None
        parts = list(self.notes)
        if self.published is not None:
            parts.append(f"published {HQ_REF} {self.published[:12]}")
        return f"pass: {'; '.join(parts)} ({self.seconds:.2f}s)"


class Hq:
    """HQ's reconcile state between passes (a cache: the truth is in git)."""

    def __init__(self, store: GitStore, branch: str = "main", *, clock: Callable[[], datetime] = _now) -> None:
        self.store = store
        self.branch = branch
        self.clock = clock
        self._restored = False
        self._evaluated = False
        self.main_commit: str | None = None
        self.main_valid: bool | None = None
        self.validation_errors: tuple[SpecError, ...] = ()
        self.accepted_commit: str | None = None
        self.accepted_at: datetime | None = None
        self._specs: tuple[str, Specs | None] | None = None  # (commit, specs)
        self._relays: dict[str, tuple[str, RelayStatus]] = {}  # name -> (ref sha, status)
        self._published: dict[str, bytes] | None = None
        self._inputs: tuple[Any, ...] | None = None
        self._lock = threading.Lock()

    # -- state from git ------------------------------------------------------

    def _restore(self) -> None:
        """Read the accepted commit back from status/hq (after the first fetch)."""
        self._restored = True
        sha = self.store.ref_sha(HQ_REF)
        if sha is None:
            return
        try:
            files = self.store.read_files(sha)
            accepted = report.parse_accepted(files[report.ACCEPTED_FILE])
        except (GitError, ReportError, KeyError) as e:
            log.warning("cannot read back %s (%s); starting afresh", HQ_REF, e)
            return
        self.accepted_commit = accepted.accepted_commit
        self.accepted_at = accepted.accepted_at
        self._published = files
        log.info("resumed from %s %s: accepted commit %s", HQ_REF, sha[:12], report.short(self.accepted_commit))

    def _accepted_specs(self) -> Specs | None:
        commit = self.accepted_commit
        if commit is None:
            return None
        if self._specs is None or self._specs[0] != commit:
            try:
                result = load_specs(self.store, commit)
            except GitError as e:
                log.error("cannot read the accepted commit %s: %s", commit[:12], e)
                return None
            if not result.valid:
                log.error("the accepted commit %s no longer validates (%d errors); reporting no jobs",
                          commit[:12], len(result.errors))
            self._specs = (commit, result.specs if result.valid else None)
        return self._specs[1]

    # -- a pass --------------------------------------------------------------

    def run_pass(self) -> PassResult:
        """Fetch, evaluate the branch if it moved, aggregate the relays, publish status/hq if changed."""
        with self._lock:
            return self._run_pass()

    def _run_pass(self) -> PassResult:
        started = time.monotonic()
        self.store.fetch()
        if not self._restored:
            self._restore()
        notes: list[str] = []
        main = self.store.ref_sha(self.branch)
        if not self._evaluated or main != self.main_commit:
            notes.append(self._evaluate(main))
        specs_now = self._accepted_specs()
        relays, changed = self._read_relays(specs_now)
        if changed:
            notes.append(f"read {changed} relay report{'s' if changed != 1 else ''}")
        # Same inputs as the last pass that rendered: the output cannot differ.
        inputs = (main, self.main_valid, self.accepted_commit, self.accepted_at,
                  tuple(sorted((name, sha) for name, (sha, _) in self._relays.items())))
        published = None
        if inputs != self._inputs or self._published is None:
            accepted = Accepted(self.accepted_commit, self.accepted_at, self.main_commit, self.main_valid)
            hq_report = report.aggregate(specs_now, accepted, self.branch, self.validation_errors, relays)
            files = report.render_hq_status(hq_report)
            if files != self._published:
                published = self.store.publish(HQ_REF, files, self._message(hq_report))
                self._published = files
            self._inputs = inputs
        return PassResult(main, self.accepted_commit, published, changed, time.monotonic() - started, notes)

    def _evaluate(self, main: str | None) -> str:
        self._evaluated = True
        self.main_commit = main
        if main is None:
            self.main_valid = None
            self.validation_errors = ()
            return f"branch {self.branch} not found on the origin"
        result = load_specs(self.store, main)
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
                contents = self.store.read_paths([(refs[n], p) for n, p in zip(stale, paths)])
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
        validity = {True: "valid", False: "INVALID", None: "absent"}[accepted.main_valid]
        return (f"HQ status: accepted {report.short(accepted.accepted_commit)}, "
                f"{self.branch} {report.short(accepted.main_commit)} {validity}; {jobs}\n")

    def health(self) -> Mapping[str, Any]:
        return {"acceptedCommit": self.accepted_commit, "mainCommit": self.main_commit,
                "mainValid": self.main_valid}


# ------------------------------------------------------------------- shell


def main(args: argparse.Namespace) -> int:
    configure_logging()
    secret: bytes | None = None
    if args.webhook_secret_file:
        try:
            secret = read_secret_file(args.webhook_secret_file)
        except (OSError, ValueError) as e:
            print(f"reconciler hq: cannot read the webhook secret: {e}", file=sys.stderr)
            return 2
    store = GitStore(args.origin, Path(args.workdir))
    hq = Hq(store, args.branch)
    origin = redact_url(args.origin)

    if args.once:
        try:
            result = hq.run_pass()
        except GitError as e:
            log.error("pass failed: %s", e)
            return 1
        log.info("%s", result.line or f"pass: nothing changed ({result.seconds:.2f}s)")
        return 0

    stop = threading.Event()
    watcher = ChangeWatcher(args.origin, args.poll_interval)

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        watcher.trigger()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: Server | None = None
    try:
        if args.listen:
            try:
                server = Server(make_app(watcher.trigger, secret, hq.health), args.listen, name="hq-http").start()
            except (ListenError, OSError) as e:
                print(f"reconciler hq: cannot listen on {args.listen}: {e}", file=sys.stderr)
                return 2
            log.info("listening on %s (webhook %s)", server.url, "signed" if secret else "unsigned")
        watcher.start()
        log.info("HQ following %s branch %s", origin, args.branch)
        while not stop.is_set():
            try:
                result = hq.run_pass()
                if result.line:
                    log.info("%s", result.line)
            except GitError as e:
                log.error("pass failed: %s", e)
            except Exception:  # noqa: BLE001 - a bug in one pass must not end the service
                log.exception("pass failed")
            if stop.is_set():
                break
            watcher.wait()
    finally:
        if server is not None:
            server.close()
        watcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("HQ stopped")
    return 0
