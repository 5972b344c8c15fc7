"""``reconciler relay``: follow HQ's accepted commit, serve clients, publish ``status/<relay>``.

The relay acts only on the commit HQ accepted (``accepted.yaml`` on
``status/hq``), never on raw ``main``. For each newly accepted commit it loads
the specs at that commit, stages the artifacts of every package that reaches
its subtree (:mod:`reconciler.relay.artifacts`), and swaps in a new
:class:`~reconciler.relay.server.Generation` (index and artifacts together)
for the check-in path to plan with.

A *full pass* plans every client (:func:`reconciler.plan.plan_relay`) from a
database snapshot, refreshes the rollout counters the check-in path uses,
records when each row's state changed, and publishes the status files when
their content changed, at most every ``--publish-interval``. Passes run when
something changed (a check-in with results or a new inventory, a new accepted
commit), and at least every poll period of the clients (for timeouts,
retries coming due, clients going offline). A pass that fails still
publishes what it knows plus the error.

Wake-ups: the :class:`~reconciler.gitstore.ChangeWatcher` (a local origin's
refs change: immediately; ``POST /v1/hooks/git``; or every
``--poll-interval``) schedules a fetch; check-ins mark the state dirty. All
state is in SQLite and git, so a relay killed at any moment converges when
restarted. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import names, plan, report
from reconciler.gitstore import (
    STATUS_PREFIX,
    ChangeWatcher,
    GitError,
    GitStore,
)
from reconciler.logs import configure_logging
from reconciler.reach import reach_of
from reconciler.redaction import redact_url
from reconciler.relay.artifacts import (
    ArtifactCache,
    packages_to_stage,
    with_artifact_revisions,
)
from reconciler.relay.server import (
    RelayApp,
    ServerHandle,
    load_webhook_secret,
    poll_seconds_from_env,
)
from reconciler.relay.state import (
    Generation,
    RelayState,
    make_generation,
    unplannable_errors,
)
from reconciler.relay.store import Store, StoreError
from reconciler.repo_tree import load_commit
from reconciler.specs import Specs
from reconciler.times import utc_now

log = logging.getLogger("reconciler.relay")

HQ_REF = STATUS_PREFIX + report.HQ_REF
MIN_ONLINE_SECONDS = 90.0
RESTAGE_SECONDS = 5.0  # retry artifacts the parent relay is still staging this often
RESTAGE_MAX_SECONDS = 300.0  # failed downloads are retried with doubling delays up to this
LISTEN_FILE = "listen.url"
HOUSEKEEPING_SECONDS = 3600.0
OPERATION_RETENTION = timedelta(days=30)  # finished operations kept (the agent's journal keeps 30 days too)
CACHE_RETENTION_SECONDS = 7 * 24 * 3600.0  # unused artifacts kept this long after their last use
WRITE_CHUNK = 2000  # row states per write transaction in a full pass


DISK_GRANULARITY_MB = 1024


def published_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Facts as inventory.json shows them: free disk rounded down to whole GiB.

    Free disk space moves a little at nearly every check-in; published as
    reported, it would make every pass a new status commit for a fleet where
    nothing happened. Planning (``minFreeDiskMB``) uses the exact figure.
    """
    out = dict(facts)
    disk = out.get("freeDiskMB")
    if isinstance(disk, int) and not isinstance(disk, bool):
        out["freeDiskMB"] = disk // DISK_GRANULARITY_MB * DISK_GRANULARITY_MB
    return out


class StartupError(Exception):
    """The relay cannot start (exit 2): unknown name, workdir in use, bad --listen."""


@dataclass(frozen=True)
class Accepted:
    """HQ's accepted commit and the specs at it, or why there are none."""

    commit: str | None
    specs: Specs | None
    error: str | None


class RelayLoop:
    """One relay's reconcile loop; ``sync`` and ``full_pass`` are usable on their own in tests."""

    def __init__(self, name: str, git: GitStore, store: Store, cache: ArtifactCache, state: RelayState, *,
                 publish_interval: float = 10.0, clock: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.git = git
        self.store = store
        self.cache = cache
        self.state = state
        self.publish_interval = publish_interval
        self.clock = clock
        self.monotonic = monotonic
        self.sync_errors: tuple[str, ...] = ()
        self.artifact_errors: tuple[str, ...] = ()
        self.publish_error: str | None = None
        self.retry_at: float | None = None  # monotonic time to retry staging for the same commit
        self._retry_delay = RESTAGE_SECONDS
        self.last_files: dict[str, bytes] | None = None
        self.published_files: dict[str, bytes] | None = None
        self.last_publish = float("-inf")
        self._specs: Specs | None = None
        self._fingerprint: int | None = None
        self.row_state_changes = 0

    # -- following HQ --------------------------------------------------------

    def read_accepted(self, fetch: bool = True) -> Accepted:
        """Fetch, then HQ's accepted commit and the specs at it (from the local mirror if the fetch failed)."""
        fetch_error: str | None = None
        if fetch:
            try:
                self.git.fetch()
            except GitError as e:
                fetch_error = f"fetch failed (using the last fetched state): {e}"
                log.warning("%s", fetch_error)
        try:
            accepted = self._read_accepted()
        except GitError as e:
            accepted = Accepted(None, None, f"cannot read {HQ_REF}: {e}")
        if fetch_error is not None:
            error = fetch_error if accepted.error is None else f"{fetch_error}; {accepted.error}"
            accepted = replace(accepted, error=error)
        return accepted

    def _read_accepted(self) -> Accepted:
        hq_tip = self.git.ref_sha(HQ_REF)
        if hq_tip is None:
            return Accepted(None, None, f"no accepted commit yet: {HQ_REF} does not exist (is HQ running?)")
        data = self.git.read_file(hq_tip, report.ACCEPTED_FILE)
        if data is None:
            return Accepted(None, None, f"no accepted commit yet: {HQ_REF} has no {report.ACCEPTED_FILE}")
        try:
            commit = report.parse_accepted(data).accepted_commit
        except report.ReportError as e:
            return Accepted(None, None, f"cannot read {HQ_REF}:{report.ACCEPTED_FILE}: {e}")
        if commit is None:
            return Accepted(None, None, "no accepted commit yet: HQ has not accepted any commit of main")
        if commit == self.state.generation.commit and self._specs is not None:
            return Accepted(commit, self._specs, None)
        loaded = load_commit(self.git, commit)  # the same reading and checks as HQ's
        if not loaded.valid or loaded.specs is None:
            first = loaded.errors[0] if loaded.errors else "no specs"
            return Accepted(commit, None, f"the specs at accepted commit {commit[:12]} do not load here "
                                          f"({len(loaded.errors)} errors, first: {first})")
        return Accepted(commit, loaded.specs, None)

    def known_relay(self, specs: Specs) -> bool:
        return any(relay.name == self.name for relay in specs.topology.relays)

    def sync(self, fetch: bool = True) -> bool:
        """Follow HQ: a new accepted commit (or artifacts now staged) installs a new generation.

        Returns True when the generation changed.
        """
        accepted = self.read_accepted(fetch)
        current = self.state.generation
        errors = [accepted.error] if accepted.error else []
        changed = False
        if accepted.specs is not None and accepted.commit is not None:
            if not self.known_relay(accepted.specs):
                errors.append(f"relay {self.name!r} is not in the topology at accepted commit "
                              f"{accepted.commit[:12]}: serving no actions")
                if current.commit != accepted.commit or current.index is not None:
                    self.state.serve(Generation(commit=accepted.commit))
                    changed = True
                self._specs = accepted.specs
            elif accepted.commit != current.commit or current.index is None or self.retry_due():
                generation = self._build(accepted.commit, accepted.specs)
                self._specs = accepted.specs
                if (generation.commit != current.commit or current.index is None
                        or generation.artifacts != current.artifacts or generation.unavailable != current.unavailable):
                    self.state.serve(generation)
                    changed = True
        self.sync_errors = tuple(errors)
        return changed

    def _build(self, commit: str, specs: Specs) -> Generation:
        reach = reach_of(specs)
        packages = packages_to_stage(specs, self.name, reach)
        result = self.cache.stage_all(commit, packages)
        unavailable = {**result.errors, **result.pending}
        self.artifact_errors = tuple(
            f"artifact of {name} {version}: {message}" for (name, version), message in sorted(result.errors.items()))
        if commit != self.state.generation.commit:
            self._retry_delay = RESTAGE_SECONDS
        if result.pending:
            self.retry_at = self.monotonic() + RESTAGE_SECONDS
        elif result.transient:
            self.retry_at = self.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RESTAGE_MAX_SECONDS)
        else:
            self.retry_at = None  # staged, or refused: only a new commit can change that
        if commit != self.state.generation.commit:
            log.info("relay %s now at accepted commit %s (%d packages staged%s)", self.name, commit[:12],
                     len(result.staged), f", {len(unavailable)} unavailable" if unavailable else "")
        return make_generation(commit, with_artifact_revisions(specs, result.staged), self.name, reach=reach,
                               artifacts=result.staged, unavailable=unavailable)

    def retry_due(self) -> bool:
        return self.retry_at is not None and self.monotonic() >= self.retry_at

    # -- the full pass -------------------------------------------------------

    def full_pass(self) -> dict[str, bytes]:
        """Plan every client, refresh rollout counters and row states; return the status files."""
        started = time.perf_counter()
        # A pass at 10,000 clients allocates millions of short-lived, acyclic objects; the collections
        # they would trigger scan the whole heap while holding the GIL (100+ ms stalls of every
        # check-in) and find nothing to free. Refcounting frees them when the pass ends.
        collecting = gc.isenabled()
        gc.disable()
        try:
            files = self._full_pass()
        finally:
            if collecting:
                gc.enable()
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            log.info("full pass over %d clients took %.1fs", self.state.client_count, elapsed)
        return files

    def _full_pass(self) -> dict[str, bytes]:
        now = self.clock()
        generation = self.state.generation
        errors = [*self.sync_errors, *self.artifact_errors]
        if self.publish_error:
            errors.append(self.publish_error)
        with self.store.snapshot() as db:
            records = self.store.clients(db)
            history = self.store.history(db)
            stored_states = self.store.row_states(db)
        window = self.state.online_window()
        online = {r.id: now - r.last_seen <= window for r in records}
        self.state.client_count = len(records)
        the_plan: plan.Plan | None = None
        updated_at: dict[tuple[str, str], datetime] = {}
        self.row_state_changes = 0
        try:
            if generation.index is not None:
                clients = [
                    plan.Client(id=r.id, relay=self.name, os=r.facts.get("os"), arch=r.facts.get("arch"),
                                free_disk_mb=r.facts.get("freeDiskMB"), labels=tuple(sorted(r.labels.items())),
                                installed=r.inventory, online=online[r.id])
                    for r in records]
                index = generation.index
                try:
                    planned = plan.plan_relay(index, clients, history, now, self.state.memo_for(index))
                except Exception:
                    isolated = self.state.isolate(
                        generation, lambda alone: plan.plan_relay(alone, clients, history, now))
                    if isolated is None or isolated.index is None:
                        raise
                    planned = plan.plan_relay(isolated.index, clients, history, now,
                                              self.state.memo_for(isolated.index))
                    generation = isolated
                the_plan = planned
                updated_at = self._record_row_states(the_plan.rows, stored_states, now)
        except Exception as e:  # noqa: BLE001 - always publish what we know, plus the error
            log.exception("full pass failed")
            errors.append(f"planning failed: {type(e).__name__}: {e}")
            the_plan = None
        errors.extend(unplannable_errors(generation))
        inventory = [report.InventoryEntry(id=r.id, facts=published_facts(r.facts), labels=dict(r.labels),
                                           installed=r.inventory, online=online[r.id]) for r in records]
        self.state.errors = tuple(errors)
        # Rendering is O(fleet) and the costliest part of a pass: skip it when nothing it shows changed.
        fingerprint = hash((
            generation.commit, the_plan.rows if the_plan is not None else None,
            tuple((j.job, j.state, tuple(sorted(j.counts.items()))) for j in the_plan.jobs)
            if the_plan is not None else None, tuple(errors),
            tuple((e.id, tuple(sorted(e.facts.items())), tuple(sorted(e.labels.items())), e.installed, e.online)
                  for e in inventory)))
        if fingerprint == self._fingerprint and not self.row_state_changes and self.last_files is not None:
            return self.last_files
        files = report.render_relay_status(self.name, generation.commit, the_plan, updated_at, inventory, errors,
                                           unplannable=generation.unplannable)
        self._fingerprint = fingerprint
        return files

    def error_files(self, error: BaseException) -> dict[str, bytes]:
        """Status files when a pass failed outright: at least the commit and the error get published."""
        errors = [*self.sync_errors, *self.artifact_errors, f"status pass failed: {type(error).__name__}: {error}"]
        self._fingerprint = None
        return report.render_relay_status(self.name, self.state.generation.commit, None, {}, [], errors)

    def _record_row_states(self, rows: tuple[plan.Row, ...], stored: dict[tuple[str, str], Any],
                           now: datetime) -> dict[tuple[str, str], datetime]:
        updated_at: dict[tuple[str, str], datetime] = {}
        changes = []
        for row in rows:
            key = (row.job, row.client)
            previous = stored.get(key)
            if previous is not None and previous.state == row.state.value:
                updated_at[key] = previous.since
            else:
                updated_at[key] = now
                changes.append((row.job, row.client, row.state.value, now,
                                None if previous is None else previous.state))
        stale = [key for key in stored if key not in updated_at]
        # Small transactions: check-ins wait for the write lock between chunks, never for a whole fleet.
        for start in range(0, len(changes), WRITE_CHUNK):
            with self.store.write() as db:
                self.store.replace_row_states(db, changes[start:start + WRITE_CHUNK])
        for start in range(0, len(stale), WRITE_CHUNK):
            with self.store.write() as db:
                self.store.delete_row_states(db, stale[start:start + WRITE_CHUNK])
        self.row_state_changes = len(changes) + len(stale)
        return updated_at

    def housekeeping(self) -> None:
        """Prune old finished operations and artifacts no current package uses."""
        removed = self.store.prune_operations(self.clock() - OPERATION_RETENTION)
        keep = {a.sha256 for a in self.state.generation.artifacts.values()}
        dropped = self.cache.prune(keep, CACHE_RETENTION_SECONDS)
        if removed or dropped:
            log.info("housekeeping: pruned %d old operations and %d unused artifacts", removed, dropped)

    # -- publishing ----------------------------------------------------------

    def publish_due_in(self) -> float | None:
        """Seconds until the pending status may be published; None when nothing is pending."""
        if self.last_files is None or self.last_files == self.published_files:
            return None
        return max(0.0, self.last_publish + self.publish_interval - self.monotonic())

    def publish(self, force: bool = False) -> str | None:
        """Publish the last rendered files if they changed and the interval allows; the new commit or None."""
        due = self.publish_due_in()
        if due is None or (due > 0 and not force):
            return None
        files = self.last_files
        assert files is not None
        self.last_publish = self.monotonic()
        commit = self.state.generation.commit
        message = (f"status/{self.name}: accepted {commit[:12]}" if commit else f"status/{self.name}: no accepted commit")
        try:
            sha = self.git.publish(STATUS_PREFIX + self.name, files, message)
        except (GitError, ValueError) as e:
            self.publish_error = f"publishing status failed (will retry): {e}"
            log.error("%s", self.publish_error)
            return None
        if self.publish_error:
            self.publish_error = None
        self.published_files = files
        if sha:
            log.info("published status/%s %s", self.name, sha[:12])
        return sha


# ------------------------------------------------------------------ the process


def _lock_workdir(workdir: Path) -> Any:
    """Hold an exclusive lock on ``<workdir>/relay.lock``: two relays must never share a database."""
    handle = open(workdir / "relay.lock", "a+")  # noqa: SIM115 - held for the process's life
    try:
        import fcntl
    except ImportError:  # Windows: the SQLite file itself is locked while open
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StartupError(f"another relay is running with workdir {workdir}") from None
    return handle


def _write_listen_file(workdir: Path, url: str) -> None:
    target = workdir / LISTEN_FILE
    temp = workdir / f".{LISTEN_FILE}.{os.getpid()}.tmp"
    temp.write_text(url + "\n", encoding="utf-8")
    os.replace(temp, target)


class _Wakeup:
    """What the loop should do next: fetch (git changed or poll), pass (state dirty)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.fetch = True
        self.dirty = True

    def request_fetch(self) -> None:
        self.fetch = True
        self.event.set()

    def mark_dirty(self) -> None:
        self.dirty = True
        self.event.set()


def main(args: argparse.Namespace) -> int:
    configure_logging()
    name: str = args.name
    if not names.is_name(name):
        print(f"reconciler relay: invalid relay name {name!r}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = _lock_workdir(workdir)
    except (OSError, StartupError) as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, name, workdir)
    finally:
        lock.close()


def _run(args: argparse.Namespace, name: str, workdir: Path) -> int:
    try:
        store = Store(workdir)
    except StoreError as e:
        print(f"reconciler relay: {e}", file=sys.stderr)
        return 2
    wake = _Wakeup()
    stop = threading.Event()
    poll_seconds = poll_seconds_from_env()
    state = RelayState(name, store, poll_seconds=poll_seconds, on_change=wake.mark_dirty)
    git = GitStore(args.origin, workdir)
    cache = ArtifactCache(workdir, git, parent_url=args.parent_url)
    loop = RelayLoop(name, git, store, cache, state, publish_interval=args.publish_interval)
    watcher = ChangeWatcher(args.origin, args.poll_interval)
    state.on_git_hook = watcher.trigger

    # Start-up check: a relay name the accepted topology does not know is an operator error.
    accepted = loop.read_accepted()
    if accepted.specs is not None and not loop.known_relay(accepted.specs):
        relays = ", ".join(sorted(r.name for r in accepted.specs.topology.relays)) or "none"
        print(f"reconciler relay: relay {name!r} is not in the topology at accepted commit "
              f"{(accepted.commit or '')[:12]} (relays: {relays})", file=sys.stderr)
        store.close()
        return 2
    if accepted.error:
        log.warning("%s", accepted.error)

    try:
        secret = load_webhook_secret()
    except (OSError, ValueError) as e:
        print(f"reconciler relay: cannot read the webhook secret: {e}", file=sys.stderr)
        store.close()
        return 2
    app = RelayApp(state, cache.dir, webhook_secret=secret)
    try:
        server = ServerHandle(app, args.listen).start()
    except (ValueError, OSError) as e:
        print(f"reconciler relay: cannot listen on {args.listen}: {e}", file=sys.stderr)
        store.close()
        return 2
    _write_listen_file(workdir, server.url)
    log.info("relay %s listening on %s (origin %s, poll %ss for clients)", name, server.url,
             redact_url(args.origin), f"{poll_seconds:g}")

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        wake.event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def watch() -> None:
        while not stop.is_set():
            watcher.wait()  # a change, a webhook, or the poll interval: fetch either way
            if not stop.is_set():
                wake.request_fetch()

    watcher.start()
    watch_thread = threading.Thread(target=watch, name="relay-watch", daemon=True)
    watch_thread.start()
    pass_interval = max(args.publish_interval, min(poll_seconds, 60.0))
    next_pass = 0.0
    last_pass = float("-inf")
    next_restage: float = float("inf")
    next_housekeeping = time.monotonic() + 60.0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                try:
                    loop.housekeeping()
                except Exception:  # noqa: BLE001
                    log.exception("housekeeping failed")
            fetch, wake.fetch = wake.fetch, False
            if fetch or loop.retry_due():
                try:
                    if loop.sync(fetch=fetch):
                        wake.dirty = True
                except Exception:  # noqa: BLE001 - a bug in one round must not end the service
                    log.exception("following HQ failed")
            next_restage = loop.retry_at if loop.retry_at is not None else float("inf")
            throttle = last_pass + args.publish_interval
            if (wake.dirty and now >= throttle) or now >= next_pass:
                wake.dirty = False
                try:
                    loop.last_files = loop.full_pass()
                except Exception as e:  # noqa: BLE001 - publish the error rather than nothing
                    log.exception("full pass failed")
                    try:
                        loop.last_files = loop.error_files(e)
                    except Exception:  # noqa: BLE001
                        log.exception("rendering the error status failed")
                last_pass = time.monotonic()
                next_pass = last_pass + pass_interval
            try:
                loop.publish()
            except Exception:  # noqa: BLE001
                log.exception("publishing failed")
            deadlines = [next_pass, next_restage, next_housekeeping]
            if wake.dirty:
                deadlines.append(last_pass + args.publish_interval)
            due = loop.publish_due_in()
            if due is not None:
                deadlines.append(time.monotonic() + due)
            timeout = max(0.01, min(deadlines) - time.monotonic())
            wake.event.wait(timeout)
            wake.event.clear()
    finally:
        log.info("relay %s stopping", name)
        watcher.stop()
        server.stop()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        (workdir / LISTEN_FILE).unlink(missing_ok=True)
    return 0
