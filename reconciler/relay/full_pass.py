"""A relay's full pass: plan every client from one database snapshot and render the status files.

:class:`FullPass` reads the clients, their history and row states in one
snapshot, plans them all (:func:`reconciler.plan.plan_relay`) with the
generation the relay serves, records when each row's state changed, and
renders the status files when what they show changed. Between passes it
keeps what makes the next one cheap: each job's rendered rows, the per-client
detail as last refreshed, the fingerprint of what was rendered.

It touches only SQLite and the generation, never git or the network, so it
runs the same in the relay's process (tests, benchmarks) and in a process of
its own (:mod:`reconciler.relay.pass_process`). What it found goes back as a
:class:`PassResult`, which :class:`~reconciler.relay.loop.RelayLoop` applies.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from reconciler import plan, report
from reconciler.errors import Cause, Problem, ReconcilerError, problem, problem_of
from reconciler.gitstore import FileContent
from reconciler.plan.vocabulary import waits_offline
from reconciler.relay import native_heap
from reconciler.relay.state import Generation, RelayState, unplannable_errors
from reconciler.relay.store import ClientRecord, RowState, Store

log = logging.getLogger("reconciler.relay")

PLANNING = "planning"  # the loop's step the pass is: its errors read "planning failed: ..."
WRITE_CHUNK = 2000  # row states per write transaction in a full pass
SOFTWARE_RENDER_FACTOR = 10.0  # software.json is rendered again no sooner than 10x its last render took
DISK_GRANULARITY_MB = 1024

# Rows that wait for time itself: a result due (its timeout), a retry's backoff.
_TICKING_REASONS = frozenset({plan.Reason.IN_PROGRESS, plan.Reason.RETRY_BACKOFF, plan.Reason.DOWNLOAD_RETRY})


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


@dataclass(frozen=True)
class PassResult:
    """What one full pass found, for the loop to apply."""

    files: Mapping[str, FileContent]  # the status files (bytes here; blob ids from a pass process)
    planning: Problem | None  # why planning failed (the files say so too)
    last_event: int  # the newest client event the pass's snapshot saw
    client_count: int  # clients counted (not moved away, not retired)
    clients_online: int
    row_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (job, state) -> rows
    errors: tuple[str, ...] = ()  # what the status files list as errors
    # Seconds after the pass until time alone changes a row (inf: never); whether rows wait for a result
    # or a retry; seconds until per-client detail may be refreshed (None: at every pass).
    timer_in: float = float("inf")
    ticking: bool = False
    detail_in: float | None = None
    unplannable: Mapping[str, str] = field(default_factory=dict)  # of the generation the pass planned with


class Passes(Protocol):
    """What runs a relay's full passes: :class:`FullPass` here, or in a process of its own."""

    def run(self, earlier: Sequence[Problem] = (), later: Sequence[Problem] = ()) -> PassResult: ...

    def forget_render(self) -> None: ...


class FullPass:
    """One relay's full pass and what it keeps between passes."""

    def __init__(self, name: str, store: Store, state: RelayState, *, inventory_interval: float = 0.0,
                 clock: Callable[[], datetime], monotonic: Callable[[], float]) -> None:
        self.name = name
        self.store = store
        self.state = state  # its generation is planned with; isolating an unplannable job serves a new one
        # Per-client detail (inventory.json, software.json, the client counts) is refreshed at most this often
        # (0: at every pass); job rows, digests and errors are not held back.
        self.inventory_interval = inventory_interval
        self.clock = clock
        self.monotonic = monotonic
        self.row_state_changes = 0
        self._files: dict[str, bytes] | None = None  # the files the last pass rendered
        self._fingerprint: int | None = None
        self._software: tuple[dict[str, str], bytes] | None = None  # the digests software.json was rendered from
        self._software_due = float("-inf")  # monotonic time before which software.json is not rendered again
        self._detail: _Detail | None = None  # the per-client part of the status files, as last refreshed
        self._detail_due = float("-inf")  # monotonic time from which it may be refreshed again
        self._job_cache: report.JobCache = {}  # per job: its rows as last rendered (a pass renders changed jobs only)

    def forget_render(self) -> None:
        """Render the files again at the next pass even if nothing they show changed."""
        self._fingerprint = None

    def run(self, earlier: Sequence[Problem] = (), later: Sequence[Problem] = ()) -> PassResult:
        """Plan every client, record row states; the status files listing ``earlier`` problems (the loop's steps
        before planning), the pass's own and ``later`` ones (the steps after it), in that order."""
        started = time.perf_counter()
        # A pass at 10,000 clients allocates millions of short-lived, acyclic objects; the collections
        # they would trigger scan the whole heap while holding the GIL (100+ ms stalls of every
        # check-in) and find nothing to free. Refcounting frees them when the pass ends.
        collecting = gc.isenabled()
        gc.disable()
        try:
            result = self._run(earlier, later)
        finally:
            if collecting:
                gc.enable()
            native_heap.release_free_memory()  # what the pass freed, back to the system (native_heap)
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:
            log.info("full pass over %d clients took %.1fs", result.client_count, elapsed)
        return result

    def _run(self, earlier: Sequence[Problem], later: Sequence[Problem]) -> PassResult:
        now = self.clock()
        generation = self.state.generation
        with self.store.snapshot() as db:
            last_event = self.store.last_event(db)  # what this pass sees needs no pass of its own
            records = self.store.clients(db)
            history = self.store.history(db)
            stored_states = self.store.row_states(db)
            digests = self.store.software_digests(db)
        records, moved_away, retired = self._counted(records, now)
        window = self.state.online_window()
        online = {r.id: now - r.last_seen <= window for r in records}
        the_plan: plan.Plan | None = None
        updated_at = report.RowTimes()
        row_counts: dict[tuple[str, str], int] = {}
        planning: Problem | None = None
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
                row_counts = {(j.job, state): n for j in planned.jobs for state, n in j.counts.items()}
                del clients  # the pass's peak memory is what is alive at once: let go of what is done
                updated_at = self._record_row_states(the_plan.rows, stored_states, now)
        except Exception as e:  # noqa: BLE001 - always publish what we know, plus the error
            found = problem_of(e)
            planning = replace(found, message=f"{PLANNING} failed: {found.message}")
            log.error("%s", planning.message, exc_info=None if isinstance(e, ReconcilerError) else e)
            the_plan = None
        del stored_states
        problems = [*earlier, *(() if planning is None else (planning,)), *later,
                    *(problem(Cause.INVALID_SPECS, text) for text in unplannable_errors(generation))]
        errors = [p.message for p in problems]
        moved_in = tuple(report.Move(r.id, r.came_from, r.came_at) for r in records
                         if r.came_from is not None and r.came_at is not None and r.came_from != self.name
                         and now - r.came_at <= self.state.retire_after)
        detail = self._refresh_detail(records, online, digests)
        timer_in, ticking = self._timers(the_plan, records, online, now, window, generation)
        result = PassResult(
            files={}, planning=planning, last_event=last_event, client_count=len(records),
            clients_online=sum(online.values()), row_counts=row_counts, errors=tuple(errors), timer_in=timer_in,
            ticking=ticking, detail_in=self.detail_due_in(), unplannable=dict(generation.unplannable))
        # Rendering is O(fleet) and the costliest part of a pass: skip it when nothing it shows changed.
        fingerprint = hash((
            generation.commit, the_plan.rows if the_plan is not None else None,
            tuple((j.job, j.state, tuple(sorted(j.counts.items()))) for j in the_plan.jobs)
            if the_plan is not None else None, tuple(errors), moved_in, moved_away, retired, detail.key))
        if fingerprint == self._fingerprint and not self.row_state_changes and self._files is not None:
            return replace(result, files=self._files)
        named_jobs = {job.name for jobs in generation.index.client_jobs.values() for job in jobs} \
            if generation.index is not None else set()
        files = report.render_relay_status(self.name, generation.commit, the_plan, updated_at, (), errors,
                                           unplannable=generation.unplannable, problems=problems,
                                           named_jobs=named_jobs, moved_in=moved_in, moved_away=moved_away,
                                           retired=retired, job_cache=self._job_cache, detail=detail.detail)
        files[f"{report.relay_prefix(self.name)}{report.SOFTWARE_FILE}"] = detail.software
        self._fingerprint = fingerprint
        self._files = files
        return replace(result, files=files)

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
        inventory = [report.InventoryEntry(id=r.id, facts=published_facts(r.facts), labels=r.labels,
                                           installed=r.inventory, online=online[r.id],
                                           last_contact=None if online[r.id] else r.last_seen) for r in records]
        software = self._software_file({r.id for r in records}, digests)
        # hashed client by client: a tuple of 50,000 tuples of tuples would be a peak of its own
        key = hash((tuple(hash((e.id, tuple(sorted(e.facts.items())), tuple(sorted(e.labels.items())), e.installed,
                                e.online, e.last_contact)) for e in inventory), software))
        if held is not None and held.key == key:
            return held
        self._detail = _Detail(key, report.relay_detail(self.name, inventory), software)
        return self._detail

    def _timers(self, the_plan: plan.Plan | None, records: list[ClientRecord], online: Mapping[str, bool],
                now: datetime, window: timedelta, generation: Generation) -> tuple[float, bool]:
        """When time alone changes what the next pass would find, in seconds from now (inf: never), and
        whether rows wait for a timer the plan does not date.

        A job's ``notBefore``/``notAfter``; a client going offline whose rows
        would then say so, or that frees a rollout slot by it; a client
        reaching ``--retire-after``. Rows waiting for a result or a retry
        (``inProgress``, ``retryBackoff``, ``downloadRetry``) tick: the
        process passes again after its pass interval. Nothing else changes
        without a commit or a check-in.
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
        if not moments:
            return float("inf"), ticking
        # a second late: the pass then finds the change made, never just before it
        return max(0.0, (min(moments) - now).total_seconds()) + 1.0, ticking

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
