"""What a relay's HTTP handlers and its loop share: the generation served, and how to swap it.

A :class:`Generation` is one accepted commit's plan index together with the
artifacts staged for it; the loop replaces it as a whole (one reference
assignment), so a check-in never plans with one commit's index and hands out
another's artifacts. Everything else the two share lives in SQLite
(:mod:`reconciler.relay.store`), the relay's single run-time truth: rollout
limits, for one, are counted on the row states there, inside each check-in's
own transaction, never in counters kept beside them.

A job whose planning fails is the relay's problem, not its clients': the
failing jobs are found by planning each alone, left out of the index until
the next commit, and reported (:func:`isolate_unplannable`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from reconciler.plan import PlanMemo, RelayIndex, index_relay
from reconciler.reach import Reach
from reconciler.relay.store import Store
from reconciler.specs import Specs

log = logging.getLogger("reconciler.relay")

DEFAULT_POLL_SECONDS = 30.0
# A client is offline once it missed three check-ins and this margin more (network jitter, a slow reply).
OFFLINE_MARGIN_SECONDS = 30.0
# A client not heard from this long is retired: no longer counted or planned (one check-in brings it back).
DEFAULT_RETIRE_AFTER = timedelta(days=30)


@dataclass(frozen=True)
class StagedArtifact:
    """An artifact in the relay's cache, as an action describes it."""

    sha256: str
    size: int
    format: str  # "tar" or "file"
    file_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size, "format": self.format}
        if self.file_name is not None:
            out["fileName"] = self.file_name
        return out


@dataclass(frozen=True)
class TrustBundle:
    """HQ's signed manifest of the generation's commit and the exact documents it covers, passed to agents.

    The relay does not check the signature (it holds no key; the agent
    does); it only makes sure the manifest is the one of the commit it serves.
    """

    envelope: Mapping[str, Any]
    serial: int
    documents: Mapping[str, str]  # repo path -> the document's text (UTF-8, as committed)
    job_sources: Mapping[str, str]  # job name -> its document's path


@dataclass(frozen=True)
class Generation:
    """What the relay serves from: one accepted commit's index and staged artifacts."""

    commit: str | None = None
    index: RelayIndex | None = None  # knows which packages are staged: rows of the others wait
    artifacts: Mapping[tuple[str, str], StagedArtifact] = field(default_factory=dict)
    # (name, version) -> why it is not in the cache (rows wait with this message)
    unavailable: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # job -> why it cannot be planned on this relay; such jobs are left out of ``index``
    unplannable: Mapping[str, str] = field(default_factory=dict)
    trust: TrustBundle | None = None  # HQ's signed manifest of ``commit`` (None: HQ signs none)


def make_generation(commit: str, specs: Specs, relay: str, *, reach: Reach | None = None,
                    artifacts: Mapping[tuple[str, str], StagedArtifact] | None = None,
                    unavailable: Mapping[tuple[str, str], str] | None = None) -> Generation:
    """A generation whose index holds back actions for packages not among ``artifacts``."""
    staged = dict(artifacts or {})
    why = dict(unavailable or {})
    index = index_relay(specs, relay, reach, staged=frozenset(staged), unavailable=why)
    return Generation(commit=commit, index=index, artifacts=staged, unavailable=why)


def _reindex(index: RelayIndex, specs: Specs) -> RelayIndex:
    return index_relay(specs, index.relay, staged=index.staged, unavailable=index.unavailable)


def isolate_unplannable(generation: Generation, attempt: Callable[[RelayIndex], object]) -> Generation | None:
    """``generation`` without the jobs that make ``attempt`` fail, or None when no job fails on its own.

    Planning is pure and bounded by the schemas, so a failure here is a bug
    or a value nobody foresaw. It must cost one job, not the relay: each job
    reaching the relay is planned alone with the same inputs, and those that
    fail are dropped from the index (and reported) until the next commit.
    """
    index = generation.index
    if index is None:
        return None
    bad: dict[str, str] = {}
    for job in index.specs.jobs:
        if job.name not in index.revisions:
            continue  # does not reach this relay
        alone = _reindex(index, replace(index.specs, jobs=(job,)))
        try:
            attempt(alone)
        except Exception as e:  # noqa: BLE001 - any failure of this job's planning isolates it
            bad[job.name] = _cut(f"{type(e).__name__}: {e}", 300)
    return without_jobs(generation, bad) if bad else None


def without_jobs(generation: Generation, unplannable: Mapping[str, str]) -> Generation:
    """``generation`` with these jobs left out of its index and listed as unplannable."""
    index = generation.index
    if index is None or not unplannable:
        return generation
    kept = tuple(j for j in index.specs.jobs if j.name not in unplannable)
    return replace(generation, index=_reindex(index, replace(index.specs, jobs=kept)),
                   unplannable={**generation.unplannable, **unplannable})


def unplannable_errors(generation: Generation) -> list[str]:
    return [f"job {job} cannot be planned on this relay and is left out until the next commit: {why}"
            for job, why in sorted(generation.unplannable.items())]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RelayState:
    """In-memory state shared by the server threads and the loop: the generation served, its plan memo."""

    def __init__(self, name: str, store: Store, poll_seconds: float = DEFAULT_POLL_SECONDS,
                 on_change: Callable[[], None] | None = None,
                 on_git_hook: Callable[[], None] | None = None, offline_after: float | None = None,
                 retire_after: timedelta = DEFAULT_RETIRE_AFTER) -> None:
        self.name = name
        self.store = store
        self.poll_seconds = poll_seconds
        self.offline_after = offline_after
        self.retire_after = retire_after
        self.generation = Generation()
        self._generation_lock = threading.Lock()
        self._memo: PlanMemo | None = None
        self.on_change = on_change or (lambda: None)
        self.on_git_hook = on_git_hook or (lambda: None)
        self.client_count = 0
        self.clients_online = 0  # of client_count, those within the online window at the last full pass
        self.errors: tuple[str, ...] = ()
        self.row_counts: dict[tuple[str, str], int] = {}  # (job, state) -> rows, at the last full pass

    def online_window(self) -> timedelta:
        """How long after its last check-in a client still counts as online.

        ``--offline-after`` when given, else three check-in periods plus
        :data:`OFFLINE_MARGIN_SECONDS`. An offline client holds no rollout
        slot and its waiting rows say ``clientOffline``.
        """
        if self.offline_after is not None:
            return timedelta(seconds=self.offline_after)
        return timedelta(seconds=3 * self.poll_seconds + OFFLINE_MARGIN_SECONDS)

    def online_since(self, now: datetime) -> datetime:
        return now - self.online_window()

    def memo_for(self, index: RelayIndex) -> PlanMemo:
        """The plan memo of ``index``: check-ins and passes of one generation share it."""
        memo = self._memo
        if memo is None or memo.index is not index:
            memo = self._memo = PlanMemo(index)
        return memo

    def isolate(self, generation: Generation, attempt: Callable[[RelayIndex], object]) -> Generation | None:
        """Drop the jobs that make ``attempt`` fail from ``generation`` and serve the result (None: no culprit)."""
        isolated = isolate_unplannable(generation, attempt)
        if isolated is None:
            return None
        return self.leave_out(generation, isolated.unplannable, isolated)

    def leave_out(self, generation: Generation, unplannable: Mapping[str, str],
                  isolated: Generation | None = None) -> Generation:
        """``generation`` without the ``unplannable`` jobs (``isolated`` when the caller has it), served from
        now on if ``generation`` still is; logged once per job."""
        for job, why in sorted(unplannable.items()):
            if job not in generation.unplannable:
                log.error("job %s cannot be planned on relay %s; it is left out until the next commit: %s",
                          job, self.name, why)
        if isolated is None:
            isolated = without_jobs(generation, {job: why for job, why in unplannable.items()
                                                 if job not in generation.unplannable})
        with self._generation_lock:
            if self.generation is generation:
                self.generation = isolated
        return isolated

    def serve(self, generation: Generation) -> None:
        """Serve ``generation`` from now on; for the same commit, jobs found unplannable stay left out."""
        with self._generation_lock:
            current = self.generation
            if generation.commit == current.commit and current.unplannable and not generation.unplannable:
                generation = without_jobs(generation, current.unplannable)
            self.generation = generation
