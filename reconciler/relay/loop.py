"""The relay's reconcile loop: follow HQ's accepted commit, plan every client, publish ``status/<relay>``.

The relay acts only on the commit HQ accepted (``accepted.yaml`` on
``status/hq``), never on raw ``main``. For each newly accepted commit it loads
the specs at that commit, stages the artifacts of every package that reaches
its subtree (:mod:`reconciler.relay.artifacts`), and swaps in a new
:class:`~reconciler.relay.state.Generation` (index and artifacts together)
for the check-in path to plan with.

A *full pass* plans every client (:func:`reconciler.plan.plan_relay`) from a
database snapshot, refreshes the rollout counters the check-in path uses,
records when each row's state changed, and publishes the status files when
their content changed, at most every ``--publish-interval``. Job rows and
digests are rendered again only for jobs whose rows changed; per-client
detail (inventory.json, software.json, client counts) at most every
``--inventory-interval``. A pass that fails still publishes what it knows
plus the error.

:class:`RelayLoop` holds these steps and the state between them; when to run
them (wake-ups, timers, signals) is the process's business,
:mod:`reconciler.relay.service`.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from reconciler import plan, report
from reconciler.errors import (
    Cause,
    Problem,
    ReconcilerError,
    problem,
    problem_of,
    retry_delay,
)
from reconciler.gitstore import STATUS_PREFIX, GitError, GitStore
from reconciler.metrics import RelayMetrics
from reconciler.plan.vocabulary import waits_offline
from reconciler.reach import reach_of
from reconciler.relay import native_heap
from reconciler.relay.artifacts import (
    ArtifactCache,
    packages_to_stage,
    with_artifact_revisions,
)
from reconciler.relay.state import (
    Generation,
    RelayState,
    TrustBundle,
    make_generation,
    unplannable_errors,
)
from reconciler.relay.store import ClientRecord, RowState, Store
from reconciler.repo_tree import CommitTree, load_commit, spec_files
from reconciler.report import HQ_STATUS_REF
from reconciler.signing import ManifestError, parse_manifest
from reconciler.specs import Specs
from reconciler.times import utc_now

log = logging.getLogger("reconciler.relay")

# The steps of the loop, in the order the status files list what went wrong in them.
FOLLOW, ARTIFACTS, PUBLISHING, PLANNING, STATUS_PASS = "following HQ", "staging", "publishing", "planning", "status pass"
HOUSEKEEPING = "housekeeping"
STEPS = (FOLLOW, ARTIFACTS, PUBLISHING, PLANNING, STATUS_PASS, HOUSEKEEPING)

RESTAGE_SECONDS = 5.0  # retry artifacts the parent relay is still staging this often
OPERATION_RETENTION = timedelta(days=30)  # finished operations kept (the agent's journal keeps 30 days too)
CACHE_RETENTION_SECONDS = 7 * 24 * 3600.0  # unused artifacts kept this long after their last use
WRITE_CHUNK = 2000  # row states per write transaction in a full pass
SOFTWARE_RENDER_FACTOR = 10.0  # software.json is rendered again no sooner than 10x its last render took


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


@dataclass(frozen=True)
class _Detail:
    """The per-client part of the status files as last refreshed, and the key of what it shows."""

    key: int
    detail: report.RelayDetail
    software: bytes


# Rows that wait for time itself: a result due (its timeout), a retry's backoff.
_TICKING_REASONS = frozenset({plan.Reason.IN_PROGRESS, plan.Reason.RETRY_BACKOFF, plan.Reason.DOWNLOAD_RETRY})


@dataclass(frozen=True)
class Accepted:
    """HQ's accepted commit and the specs at it, or why there are none."""

    commit: str | None
    specs: Specs | None
    error: Problem | None
    manifest: tuple[Mapping[str, Any], int] | None = None  # HQ's signed envelope of ``commit`` and its serial


class RelayLoop:
    """One relay's reconcile loop; ``sync`` and ``full_pass`` are usable on their own in tests."""

    def __init__(self, name: str, git: GitStore, store: Store, cache: ArtifactCache, state: RelayState, *,
                 publish_interval: float = 10.0, inventory_interval: float = 0.0,
                 clock: Callable[[], datetime] = utc_now, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.git = git
        self.store = store
        self.cache = cache
        self.state = state
        self.publish_interval = publish_interval
        # Per-client detail (inventory.json, software.json, the client counts) is refreshed at most this often
        # (0: at every pass); job rows, digests and errors are not held back.
        self.inventory_interval = inventory_interval
        self.clock = clock
        self.monotonic = monotonic
        # What went wrong, by where: the status files show these, in this order.
        self.problems: dict[str, tuple[Problem, ...]] = {}
        self.retry_at: float | None = None  # monotonic time to retry staging for the same commit
        self._stage_failures = 0  # stagings in a row with downloads worth retrying
        self.last_files: dict[str, bytes] | None = None
        self.published_files: dict[str, bytes] | None = None
        self.metrics: RelayMetrics | None = None  # times full passes and publishing when set
        self.last_publish = float("-inf")
        self._specs: Specs | None = None
        self._fingerprint: int | None = None
        self.row_state_changes = 0
        self._moves_tip: str | None = None  # the status/hq commit whose moves.yaml was last read
        self._software: tuple[dict[str, str], bytes] | None = None  # the digests software.json was rendered from
        self._software_due = float("-inf")  # monotonic time before which software.json is not rendered again
        self._detail: _Detail | None = None  # the per-client part of the status files, as last refreshed
        self._detail_due = float("-inf")  # monotonic time from which it may be refreshed again
        self._job_cache: report.JobCache = {}  # per job: its rows as last rendered (a pass renders changed jobs only)
        # When time alone next changes a row (monotonic; inf: never), and whether rows wait for a timer the
        # plan does not date (results due, retries): the process's business to pass again then.
        self.timer_at = float("inf")
        self.ticking = False
        self._last_event = -1  # the newest client event seen (clients_changed)
        # The branch HQ accepts commits of (accepted.yaml names it): fetched with status/hq, and no
        # other branch: the fetch's cost does not grow with the status branches other relays publish.
        self.branch = "main"

    # -- what went wrong ------------------------------------------------------

    def settle(self, where: str, outcome: BaseException | Problem | Sequence[Problem] | None) -> None:
        """Record how the step ``where`` ended: the one place errors become status errors.

        ``None`` clears what the step reported before; an exception is
        classified (:func:`reconciler.errors.problem_of`) and logged, with its
        traceback when it is a bug.
        """
        if outcome is None:
            self.problems.pop(where, None)
            return
        if isinstance(outcome, BaseException):
            found = problem_of(outcome)
            found = replace(found, message=f"{where} failed: {self.git.redact(found.message)}")
            log.error("%s", found.message, exc_info=None if isinstance(outcome, ReconcilerError) else outcome)
            self.problems[where] = (found,)
        elif isinstance(outcome, Problem):
            self.problems[where] = (outcome,)
        else:
            self.problems[where] = tuple(outcome)

    def status_problems(self) -> list[Problem]:
        """Everything the status files should say went wrong, in a stable order."""
        return [p for where in STEPS for p in self.problems.get(where, ())] + [
            p for where, found in self.problems.items() if where not in STEPS for p in found]

    # -- following HQ --------------------------------------------------------

    def read_accepted(self, fetch: bool = True) -> Accepted:
        """Fetch, then HQ's accepted commit and the specs at it (from the local mirror if the fetch failed)."""
        fetch_error: Problem | None = None
        if fetch:
            try:
                self.git.fetch((HQ_STATUS_REF, self.branch))
            except GitError as e:
                fetch_error = problem(e.cause, f"fetch failed (using the last fetched state): {e}")
                log.warning("%s", fetch_error.message)
        try:
            accepted = self._read_accepted(fetch and fetch_error is None)
        except GitError as e:
            accepted = Accepted(None, None, problem(e.cause, f"cannot read {HQ_STATUS_REF}: {e}"))
        if fetch_error is not None:
            error = fetch_error if accepted.error is None else replace(
                fetch_error, message=f"{fetch_error.message}; {accepted.error.message}")
            accepted = replace(accepted, error=error)
        return accepted

    def _read_accepted(self, fetch: bool) -> Accepted:
        hq_tip = self.git.ref_sha(HQ_STATUS_REF)
        if hq_tip is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, f"no accepted commit yet: {HQ_STATUS_REF} does not exist (is HQ running?)"))
        data = self.git.read_file(hq_tip, report.ACCEPTED_FILE, report.MAX_STATUS_FILE)
        if data is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, f"no accepted commit yet: {HQ_STATUS_REF} has no {report.ACCEPTED_FILE}"))
        try:
            commit = report.parse_accepted(data).accepted_commit
        except report.ReportError as e:
            return Accepted(None, None, problem(
                Cause.INTERNAL, f"cannot read {HQ_STATUS_REF}:{report.ACCEPTED_FILE}: {e}"))
        if commit is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, "no accepted commit yet: HQ has not accepted any commit of main"))
        branch = report.parse_branch(data)
        if branch != self.branch:
            log.info("HQ accepts commits of branch %r: following it", branch)
            self.branch = branch
            if fetch and self.git.resolve_commit(commit) is None:
                self.git.fetch((branch,))
        manifest = self._read_manifest(hq_tip, commit)
        if commit == self.state.generation.commit and self._specs is not None:
            return Accepted(commit, self._specs, None, manifest)
        loaded = load_commit(self.git, commit)  # the same reading and checks as HQ's
        if not loaded.valid or loaded.specs is None:
            first = loaded.errors[0] if loaded.errors else "no specs"
            return Accepted(commit, None, problem(
                Cause.INVALID_SPECS, f"the specs at accepted commit {commit[:12]} do not load here "
                                     f"({len(loaded.errors)} errors, first: {first})"))
        return Accepted(commit, loaded.specs, None, manifest)

    def _read_manifest(self, hq_tip: str, commit: str) -> tuple[Mapping[str, Any], int] | None:
        """HQ's signed manifest envelope on ``status/hq`` if it is the one of ``commit`` (not checked: no key here)."""
        data = self.git.read_file(hq_tip, report.MANIFEST_FILE, report.MAX_STATUS_FILE)
        if data is None:
            return None
        try:
            envelope = json.loads(data)
            manifest = parse_manifest(envelope["payload"])
        except (ValueError, KeyError, TypeError, ManifestError) as e:
            log.warning("%s:%s unreadable (%s); agents that verify refuse every action", HQ_STATUS_REF,
                        report.MANIFEST_FILE, e)
            return None
        if manifest.commit != commit:
            log.warning("%s:%s is for commit %s, not the accepted %s; agents that verify refuse every action",
                        HQ_STATUS_REF, report.MANIFEST_FILE, manifest.commit[:12], commit[:12])
            return None
        return envelope, manifest.serial

    def _trust(self, commit: str, specs: Specs, manifest: tuple[Mapping[str, Any], int] | None) -> TrustBundle | None:
        """What agents get with their actions: the manifest and the documents of ``commit`` (read once per commit)."""
        if manifest is None:
            return None
        current = self.state.generation.trust
        if current is not None and self.state.generation.commit == commit:
            if current.serial == manifest[1]:
                return current
            return replace(current, envelope=manifest[0], serial=manifest[1])
        documents = {path: data.decode("utf-8") for path, data in spec_files(CommitTree(self.git, commit)).items()}
        return TrustBundle(manifest[0], manifest[1], documents, {job.name: job.source for job in specs.jobs})

    def known_relay(self, specs: Specs) -> bool:
        return any(relay.name == self.name for relay in specs.topology.relays)

    def sync(self, fetch: bool = True) -> bool:
        """Follow HQ: a new accepted commit (or artifacts now staged) installs a new generation.

        Returns True when the generation changed.
        """
        accepted = self.read_accepted(fetch)
        current = self.state.generation
        errors = [accepted.error] if accepted.error else []
        changed = self.follow_moves() > 0
        if accepted.specs is not None and accepted.commit is not None:
            if not self.known_relay(accepted.specs):
                errors.append(problem(Cause.UNKNOWN_RELAY, f"relay {self.name!r} is not in the topology at accepted "
                                                           f"commit {accepted.commit[:12]}: serving no actions"))
                if current.commit != accepted.commit or current.index is not None:
                    self.state.serve(Generation(commit=accepted.commit))
                    changed = True
                self._specs = accepted.specs
            elif accepted.commit != current.commit or current.index is None or self.retry_due():
                generation = self._build(accepted.commit, accepted.specs)
                generation = replace(generation, trust=self._trust(accepted.commit, accepted.specs, accepted.manifest))
                self._specs = accepted.specs
                if (generation.commit != current.commit or current.index is None
                        or generation.artifacts != current.artifacts or generation.unavailable != current.unavailable
                        or generation.trust != current.trust):
                    self.state.serve(generation)
                    changed = True
            else:
                trust = self._trust(accepted.commit, accepted.specs, accepted.manifest)
                if trust != current.trust:  # the same commit, signed anew (a key rotation), or HQ stopped signing
                    self.state.serve(replace(current, trust=trust))
        self.settle(FOLLOW, errors or None)
        return changed

    def _build(self, commit: str, specs: Specs) -> Generation:
        reach = reach_of(specs)
        packages = packages_to_stage(specs, self.name, reach)
        result = self.cache.stage_all(commit, packages)
        unavailable = {**result.errors, **result.pending}
        self.settle(ARTIFACTS, [
            problem(Cause.UNREACHABLE if key in result.transient else Cause.ARTIFACT_MISMATCH,
                    f"artifact of {key[0]} {key[1]}: {message}")
            for key, message in sorted(result.errors.items())] or None)
        if commit != self.state.generation.commit:
            self._stage_failures = 0
        if result.pending:
            self.retry_at = self.monotonic() + RESTAGE_SECONDS
        elif result.transient:
            self._stage_failures += 1
            self.retry_at = self.monotonic() + retry_delay(self._stage_failures)
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
            native_heap.release_free_memory()  # what the pass freed, back to the system (native_heap)
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.full_pass_seconds.observe(elapsed)
        if elapsed > 1.0:
            log.info("full pass over %d clients took %.1fs", self.state.client_count, elapsed)
        return files

    def _full_pass(self) -> dict[str, bytes]:
        self.problems.pop(STATUS_PASS, None)
        now = self.clock()
        generation = self.state.generation
        problems = self.status_problems()
        with self.store.snapshot() as db:
            self._last_event = self.store.last_event(db)  # what this pass sees needs no pass of its own
            records = self.store.clients(db)
            history = self.store.history(db)
            stored_states = self.store.row_states(db)
            digests = self.store.software_digests(db)
        records, moved_away, retired = self._counted(records, now)
        window = self.state.online_window()
        online = {r.id: now - r.last_seen <= window for r in records}
        self.state.client_count = len(records)
        self.state.clients_online = sum(online.values())
        the_plan: plan.Plan | None = None
        updated_at = report.RowTimes()
        self.row_state_changes = 0
        try:
            if generation.index is not None:
                clients = [
                    plan.Client(id=r.id, relay=self.name, os=r.facts.get("os"), arch=r.facts.get("arch"),
                                free_disk_mb=r.facts.get("freeDiskMB"), labels=tuple(sorted(r.labels.items())),
                                installed=r.inventory, online=online[r.id], last_seen=r.last_seen)
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
                self.state.row_counts = {(j.job, state): n for j in planned.jobs for state, n in j.counts.items()}
                del clients  # the pass's peak memory is what is alive at once: let go of what is done
                updated_at = self._record_row_states(the_plan.rows, stored_states, now)
            self.settle(PLANNING, None)
        except Exception as e:  # noqa: BLE001 - always publish what we know, plus the error
            self.settle(PLANNING, e)
            the_plan = None
        del stored_states
        problems = [*self.status_problems(),
                    *(problem(Cause.INVALID_SPECS, text) for text in unplannable_errors(generation))]
        errors = [p.message for p in problems]
        moved_in = tuple(report.Move(r.id, r.came_from, r.came_at) for r in records
                         if r.came_from is not None and r.came_at is not None and r.came_from != self.name
                         and now - r.came_at <= self.state.retire_after)
        detail = self._refresh_detail(records, online, digests)
        self._set_timers(the_plan, records, online, now, window, generation)
        self.state.errors = tuple(errors)
        # Rendering is O(fleet) and the costliest part of a pass: skip it when nothing it shows changed.
        fingerprint = hash((
            generation.commit, the_plan.rows if the_plan is not None else None,
            tuple((j.job, j.state, tuple(sorted(j.counts.items()))) for j in the_plan.jobs)
            if the_plan is not None else None, tuple(errors), moved_in, moved_away, retired, detail.key))
        if fingerprint == self._fingerprint and not self.row_state_changes and self.last_files is not None:
            return self.last_files
        named_jobs = {job.name for jobs in generation.index.client_jobs.values() for job in jobs} \
            if generation.index is not None else set()
        files = report.render_relay_status(self.name, generation.commit, the_plan, updated_at, (), errors,
                                           unplannable=generation.unplannable, problems=problems,
                                           named_jobs=named_jobs, moved_in=moved_in, moved_away=moved_away,
                                           retired=retired, job_cache=self._job_cache, detail=detail.detail)
        files[f"{report.relay_prefix(self.name)}{report.SOFTWARE_FILE}"] = detail.software
        self._fingerprint = fingerprint
        return files

    def _refresh_detail(self, records: list[ClientRecord], online: Mapping[str, bool],
                        digests: dict[str, str]) -> _Detail:
        """The per-client part of the status files, refreshed when ``--inventory-interval`` allows.

        Facts, free disk, online state and installed software change at some
        client nearly every minute in a large fleet; refreshed at every pass,
        they would make nearly every pass a status commit. So they are
        refreshed at most every ``inventory_interval`` seconds, and at once
        when the number of clients changed (a registration, a retirement):
        between refreshes the last refresh is published unchanged. Job rows
        show what a person acts on (an offline client's waiting rows say it)
        at every pass regardless.
        """
        held = self._detail
        if held is not None and held.detail.clients == len(records) and self.monotonic() < self._detail_due:
            return held
        self._detail_due = self.monotonic() + self.inventory_interval
        inventory = [report.InventoryEntry(id=r.id, facts=published_facts(r.facts), labels=dict(r.labels),
                                           installed=r.inventory, online=online[r.id],
                                           last_contact=None if online[r.id] else r.last_seen) for r in records]
        software = self._software_file({r.id for r in records}, digests)
        key = hash((tuple((e.id, tuple(sorted(e.facts.items())), tuple(sorted(e.labels.items())), e.installed,
                           e.online, e.last_contact) for e in inventory), software))
        if held is not None and held.key == key:
            return held
        self._detail = _Detail(key, report.relay_detail(self.name, inventory), software)
        return self._detail

    def _set_timers(self, the_plan: plan.Plan | None, records: list[ClientRecord], online: Mapping[str, bool],
                    now: datetime, window: timedelta, generation: Generation) -> None:
        """When time alone changes what the next pass would find: :attr:`timer_at` and :attr:`ticking`.

        A job's ``notBefore``/``notAfter``; a client going offline whose rows
        would then say so, or that frees a rollout slot by it; a client
        reaching ``--retire-after``. Rows waiting for a result or a retry
        (``inProgress``, ``retryBackoff``, ``downloadRetry``) set
        :attr:`ticking`: the process passes again after its pass interval.
        Nothing else changes without a commit or a check-in.
        """
        ticking = False
        waiting: set[str] = set()
        if the_plan is not None:
            for row in the_plan.rows:
                if row.state is plan.ClientState.IN_PROGRESS or waits_offline(row.state, row.reason):
                    waiting.add(row.client)
                if row.reason in _TICKING_REASONS:
                    ticking = True
        moments: list[datetime] = []
        if generation.index is not None:
            moments.extend(t for job in generation.index.jobs for t in (job.not_before, job.not_after)
                           if t is not None and t > now)
        moments.extend(r.last_seen + window for r in records if online[r.id] and r.id in waiting)
        if records:
            moments.append(min(r.last_seen for r in records) + self.state.retire_after)
        self.ticking = ticking
        if moments:
            # a second late: the pass then finds the change made, never just before it
            seconds = max(0.0, (min(moments) - now).total_seconds()) + 1.0
            self.timer_at = self.monotonic() + seconds
        else:
            self.timer_at = float("inf")

    def clients_changed(self) -> bool:
        """Whether a client event (``reconciler clients approve``/``rekey``/``forget``, a registration) was
        recorded since the last pass or call: one indexed read, asked once per check-in interval."""
        seen, self._last_event = self._last_event, self.store.last_event()
        return self._last_event != seen

    def detail_due_in(self) -> float | None:
        """Seconds until per-client detail may be refreshed; None when it is refreshed at every pass."""
        if self.inventory_interval <= 0:
            return None
        return max(0.0, self._detail_due - self.monotonic())

    def _software_file(self, counted: set[str], digests: dict[str, str]) -> bytes:
        """``software.json`` of the clients this relay counts: rendered again only when a list changed.

        The digests are read at every pass (one small row per client); the
        lists themselves only when a digest changed, or a client came or went.
        A render that took T seconds is not repeated within 10 T (a fleet of
        50,000 varied lists takes seconds): software lists never hold up
        check-ins for more than a tenth of the relay's time.
        """
        wanted = {client: digest for client, digest in digests.items() if client in counted}
        if self._software is not None and (self._software[0] == wanted or self.monotonic() < self._software_due):
            return self._software[1]
        started = time.perf_counter()
        lists = self.store.software_lists(wanted)
        data = report.render_relay_software(self.name, lists)
        self._software = (wanted, data)
        self._software_due = self.monotonic() + SOFTWARE_RENDER_FACTOR * (time.perf_counter() - started)
        return data

    def _counted(self, records: list[ClientRecord], now: datetime,
                 ) -> tuple[list[ClientRecord], tuple[report.Move, ...], tuple[tuple[str, datetime], ...]]:
        """The clients this relay counts and plans; those that moved to another relay; those retired.

        A client HQ says moved elsewhere (and not seen here since) counts
        there; one not heard from for ``retire_after`` is retired. Neither
        has rows or an inventory entry here; a check-in here brings either
        back.
        """
        retire_before = now - self.state.retire_after
        counted: list[ClientRecord] = []
        moved: list[report.Move] = []
        retired: list[tuple[str, datetime]] = []
        for r in records:
            if r.moved_away():
                assert r.moved_to is not None and r.moved_at is not None
                moved.append(report.Move(r.id, r.moved_to, r.moved_at))
            elif r.last_seen < retire_before:
                retired.append((r.id, r.last_seen))
            else:
                counted.append(r)
        return counted, tuple(moved), tuple(retired)

    def follow_moves(self) -> int:
        """Read ``moves.yaml`` on status/hq when it changed; record the clients that left this relay.

        Returns how many clients it marked as moved away (then a pass is due).
        A file HQ wrote that cannot be read is logged and skipped: moves only
        correct counts, they never block the relay.
        """
        try:
            tip = self.git.ref_sha(HQ_STATUS_REF)
            if tip is None or tip == self._moves_tip:
                return 0
            data = self.git.read_file(tip, report.MOVES_FILE, report.MAX_STATUS_FILE)
            moves = report.parse_moves(data) if data is not None else {}
        except GitError as e:  # transient: tried again at the next sync
            log.warning("cannot read %s:%s (client moves not followed yet): %s", HQ_STATUS_REF, report.MOVES_FILE, e)
            return 0
        except report.ReportError as e:  # the same commit reads the same: say it once
            log.warning("cannot read %s:%s (client moves not followed): %s", HQ_STATUS_REF, report.MOVES_FILE, e)
            self._moves_tip = tip
            return 0
        self._moves_tip = tip
        mine = moves.get(self.name, ())
        changed = self.store.record_departures((m.client, m.relay, m.at) for m in mine) if mine else 0
        if changed:
            log.info("%d clients moved to other relays (per HQ); they are counted there now", changed)
        return changed

    def error_files(self, error: BaseException) -> dict[str, bytes]:
        """Status files when a pass failed outright: at least the commit and the error get published."""
        self.settle(STATUS_PASS, error)
        problems = self.status_problems()
        self._fingerprint = None
        return report.render_relay_status(self.name, self.state.generation.commit, None, {}, [],
                                          [p.message for p in problems], problems=problems)

    def _record_row_states(self, rows: tuple[plan.Row, ...], stored: dict[str, dict[str, RowState]],
                           now: datetime) -> report.RowTimes:
        """Write the rows whose state moved (compare-and-set against ``stored``, read with the plan's
        snapshot) and drop rows no longer planned; return when each row last changed state."""
        times = report.RowTimes()
        changes = []
        job: str | None = None
        of_job: dict[str, RowState] = {}
        job_times: dict[str, datetime] = {}
        for row in rows:  # sorted by (job, client): one lookup of the job's dicts per job
            if row.job != job:
                job = row.job
                of_job = stored.get(job, {})
                job_times = times.by_job.setdefault(job, {})
            previous = of_job.get(row.client)
            state = row.state.value
            if previous is not None and previous.state == state:
                job_times[row.client] = previous.since
            else:
                job_times[row.client] = now
                changes.append((job, row.client, state, now, None if previous is None else previous.state))
        stale = [(job, client) for job, of_job in stored.items()
                 for client in of_job.keys() - times.by_job.get(job, {}).keys()]
        # Small transactions: check-ins wait for the write lock between chunks, never for a whole fleet.
        for start in range(0, len(changes), WRITE_CHUNK):
            with self.store.write() as db:
                self.store.replace_row_states(db, changes[start:start + WRITE_CHUNK])
        for start in range(0, len(stale), WRITE_CHUNK):
            with self.store.write() as db:
                self.store.delete_row_states(db, stale[start:start + WRITE_CHUNK])
        self.row_state_changes = len(changes) + len(stale)
        return times

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
        started = time.perf_counter()
        try:
            sha = self.git.publish(STATUS_PREFIX + self.name, files, message)
            if self.metrics is not None:
                self.metrics.publish_seconds.observe(time.perf_counter() - started)
        except (GitError, ValueError) as e:
            cause = e.cause if isinstance(e, GitError) else Cause.INTERNAL
            self.settle(PUBLISHING, problem(cause, f"publishing status failed (will retry): {e}"))
            log.error("%s", self.problems[PUBLISHING][0].message)
            return None
        self.settle(PUBLISHING, None)
        self.published_files = files
        if sha:
            log.info("published status/%s %s", self.name, sha[:12])
        return sha
