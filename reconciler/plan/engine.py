"""The fast plan engine: the rules of :mod:`reconciler.plan.rules`, computed for a whole relay at once.

Performance (``benchmarks/plan_bench.py``: 10^6 pairs in about 1.5 s on two
cores, converged or brand new; one client in well under a millisecond).
Jobs are indexed per relay once (:class:`RelayIndex`). The per-job
decisions are cached per distinct (schedule phase, os, arch, disk bucket,
relevant labels, installed version), so requirements are evaluated once per
fact set. Within a pass, clients of the same shape (job set, facts,
installed versions of the software concerned) share their decisions and
what follows from them alone (:class:`_Shape`): settled rows come from
templates (a Succeeded row looks up only the attempts of its last
operation), and rollout targets and state counts are added up per shape,
not per row. Clients of a
shape with no history for their gaps, while the rollout slots they could
take are as free, get the first one's rows and actions again with their
own id and operation ids (:class:`_Replay`). Rows and
actions are NamedTuples made straight from their field values, and
operation ids are hashed only for actions. The memo tables live in a
:class:`PlanMemo` the caller owns, never in the frozen index.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from datetime import datetime
from operator import attrgetter, lt
from typing import Any

from reconciler.plan.index import RelayIndex
from reconciler.plan.rules import (
    CLOSED,
    FRESH,
    OutOfAttempts,
    Ready,
    Repaired,
    RetryLater,
    Running,
    Step,
    WindowClosed,
    artifact_missing,
    conflicting,
    history_step,
    reboot_fields,
    repair_start,
    repeat_action,
    requirement_reasons,
    retry_fields,
    rollout_block,
    succeeded_attempts,
    wants,
)
from reconciler.plan.vocabulary import (
    REBOOT_MESSAGE,
    Action,
    ActionKind,
    Attempt,
    Client,
    ClientPlan,
    ClientState,
    History,
    JobRollup,
    Outcome,
    Plan,
    Reason,
    RolloutUsage,
    Row,
    _rollup,
    failures_exceeded,
    halt_message,
    offline_message,
    waits_for_reboot,
    waits_offline,
)
from reconciler.specs import (
    DEFAULT_TIMEOUT_SECONDS,
    Job,
    JobType,
    Package,
    Requirements,
)
from reconciler.times import aware, format_precise
from reconciler.versions import at_least, compare_versions, same_version


class PlanMemo:
    """The engine's memo tables for one index, owned by the caller (a relay keeps one per index).

    They only ever hold results of pure functions of the index and a
    client's facts, so sharing one across check-ins and passes changes no
    result, only the time it takes. Without one, each call starts afresh.
    """

    def __init__(self, index: RelayIndex) -> None:
        self.index = index
        self.context = _Context(index)

    def context_for(self, index: RelayIndex) -> _Context:
        if index is not self.index:
            raise ValueError("this PlanMemo belongs to another RelayIndex")
        return self.context


# Rows and actions are made with ``tuple.__new__``, skipping the Python-level
# ``__new__`` that NamedTuple generates (keyword handling and defaults): a
# relay pass makes 10^6 rows. The result is the value the constructor makes.
# Rows being filled in are lists, indexed by these positions.
_tnew = tuple.__new__
_SUCCEEDED = Outcome.SUCCEEDED
_OFFLINE = Reason.CLIENT_OFFLINE
_NOBODY: frozenset[str] = frozenset()
_R_CLIENT, _R_STATE, _R_ACTION, _R_ATTEMPTS, _R_MESSAGE, _R_OPERATION, _R_REASON = map(
    Row._fields.index, ("client", "state", "action", "attempts", "message", "operation_id", "reason"))


# ------------------------------------------------------------------ index


class _CompiledJob:
    """A job with everything a pass needs precomputed (internal)."""

    __slots__ = (
        "job", "name", "slot", "install", "software", "version", "package", "revision",
        "requirements", "depends_on", "order", "limit", "backoff", "rerun", "suspend",
        "not_before", "not_after", "allow_downgrade", "max_concurrent", "max_failures",
        "has_failure_limit", "hasher", "missing", "covers_relay", "covered_clients", "repaired", "repair_first",
    )

    def __init__(self, job: Job, slot: int, package: Package | None, revision: str,
                 chain: tuple[str, ...] = ()) -> None:
        self.job = job
        self.name = job.name
        self.slot = slot
        self.install = job.job_type is JobType.INSTALL
        self.software = job.package_name
        self.version = job.package_version
        self.package = package
        self.revision = revision
        self.requirements: Requirements | None = package.requirements if (self.install and package) else None
        self.depends_on = package.depends_on if (self.install and package) else ()
        self.limit = max(1, job.retry_limit)
        self.backoff = job.backoff_seconds
        self.rerun = job.rerun
        self.suspend = job.suspend
        self.not_before = aware(job.not_before) if job.not_before is not None else None
        self.not_after = aware(job.not_after) if job.not_after is not None else None
        self.allow_downgrade = job.allow_downgrade
        self.max_concurrent = job.max_concurrent
        self.max_failures = job.max_failures
        self.has_failure_limit = job.max_failures is not None
        # processing order: uninstalls first (an install may wait for a removal), then by name
        self.order: tuple[int, str] = (1 if self.install else 0, job.name)
        # hash state after the operation id's leading fields (see operation_id)
        self.hasher = hashlib.blake2b(f"{job.name}\x1f{revision}\x1f{job.rerun}\x1f".encode(), digest_size=12)
        # An install job whose package is not in the specs (only in unvalidated specs).
        self.missing = self.install and package is None
        # The rerun's scope (rules.rerun_covers, rules.repairs): whether it covers every
        # client of this relay, else the clients it names; and the clients it repairs.
        scope = job.rerun_scope
        self.covers_relay = scope is None or any(relay in scope.relays for relay in chain)
        self.covered_clients = frozenset(scope.clients) if scope is not None else _NOBODY
        self.repaired = self.covered_clients if scope is not None and scope.repair else _NOBODY
        self.repair_first = repair_start(job) if self.repaired else FRESH  # the first step of a repair

    def order_key(self, depth: int) -> tuple[int, int, str]:
        """Where this job's action runs among a client's: uninstalls, dependencies first, by name."""
        return (self.order[0], depth, self.name)


class _JobSet:
    """The jobs reaching one kind of client, in processing order, and what links them."""

    __slots__ = ("jobs", "pairs", "shared", "dependents", "tracked", "names")

    def __init__(self, jobs: tuple[_CompiledJob, ...]) -> None:
        self.jobs = jobs
        self.pairs = tuple((cj.slot, cj.software) for cj in jobs)
        seen: set[str] = set()
        shared: set[str] = set()
        for cj in jobs:
            (shared if cj.software in seen else seen).add(cj.software)
        self.shared = frozenset(shared)  # software names wanted by more than one job: conflicts possible
        self.dependents = tuple(i for i, cj in enumerate(jobs) if cj.depends_on)
        # positions of jobs with rollout limits (their targets are counted)
        self.tracked = tuple(i for i, cj in enumerate(jobs)
                             if cj.has_failure_limit or cj.max_concurrent is not None)
        # software whose installed version the cross-job rules read
        self.names = tuple(sorted({cj.software for cj in jobs} | {d.name for cj in jobs for d in cj.depends_on}))


class _Context:
    """Per-index derived tables, and memo tables filled as clients are planned (see :class:`PlanMemo`)."""

    def __init__(self, index: RelayIndex) -> None:
        compiled = {job.name: _CompiledJob(job, slot, index.packages.get((job.package_name, job.package_version))
                                           if job.package_version else None, index.revisions[job.name], index.chain)
                    for slot, job in enumerate(index.jobs)}
        self.relay = index.relay
        self.packages = index.packages
        self.staged = index.staged
        self.unavailable = index.unavailable
        self.compiled = compiled
        self.by_slot = sorted(compiled.values(), key=attrgetter("slot"))
        self.relay_set = _JobSet(tuple(sorted(
            (compiled[j.name] for j in index.relay_jobs if j.name in compiled), key=attrgetter("order"))))
        self.relay_names = frozenset(cj.name for cj in self.relay_set.jobs)
        self.client_jobs = index.client_jobs
        self.job_sets: dict[tuple[str, ...], _JobSet] = {}
        label_keys: set[str] = set()
        thresholds: set[int] = set()
        for cj in compiled.values():
            if cj.requirements is not None:
                label_keys.update(k for k, _ in cj.requirements.labels)
                if cj.requirements.min_free_disk_mb is not None:
                    thresholds.add(cj.requirements.min_free_disk_mb)
        self.label_keys = tuple(sorted(label_keys))
        self.thresholds = sorted(thresholds)
        # client id -> slots of the jobs whose rerun repairs it: such a client's decisions
        # differ from those of a client with the same facts, so they are part of its facts
        repairs: dict[str, list[int]] = {}
        for cj in self.by_slot:
            for cid in cj.repaired:
                repairs.setdefault(cid, []).append(cj.slot)
        self.repairs = {cid: tuple(slots) for cid, slots in repairs.items()}
        # (schedule phases, fact key) -> per job slot: installed version -> decision
        self.levels: dict[Any, list[dict[str | None, _Decision]]] = {}
        # (job set, decisions, installed versions) -> the decisions after the cross-job rules
        self.cross: dict[tuple[Any, ...], tuple[tuple[_Decision, ...], list[_Decision]]] = {}

    def jobs_for(self, client_id: str) -> _JobSet:
        named = self.client_jobs.get(client_id)
        if not named:
            return self.relay_set
        key = tuple(j.name for j in named)
        jobset = self.job_sets.get(key)
        if jobset is None:
            chosen = {cj.name: cj for cj in self.relay_set.jobs}
            chosen.update((j.name, self.compiled[j.name]) for j in named if j.name in self.compiled)
            jobset = _JobSet(tuple(sorted(chosen.values(), key=attrgetter("order"))))
            self.job_sets[key] = jobset
        return jobset

    def facts(self, client: Client) -> tuple[Any, ...]:
        """The client's facts as far as any requirement here can tell them apart.

        Free disk counts by bucket between the thresholds in use; below the
        highest one the exact figure is kept too, because a Skipped row's
        message quotes it.
        """
        disk = client.free_disk_mb
        bucket = -1 if disk is None else bisect_right(self.thresholds, disk)
        exact = disk if bucket < len(self.thresholds) else None
        view: tuple[str | None, ...] = ()
        if self.label_keys:
            view = tuple(map(dict(client.labels).get, self.label_keys))
        if self.repairs:
            return (client.os, client.arch, bucket, exact, view, self.repairs.get(client.id, ()))
        return (client.os, client.arch, bucket, exact, view)

    def level(self, phases: tuple[int, ...], facts: tuple[Any, ...]) -> list[dict[str | None, _Decision]]:
        key = (phases, facts)
        level = self.levels.get(key)
        if level is None:
            if len(self.levels) > 20_000:
                self.levels.clear()  # bounded memory with a very varied fleet
                self.cross.clear()
            level = [{} for _ in self.by_slot]
            self.levels[key] = level
        return level


def _context(index: RelayIndex, memo: PlanMemo | None) -> _Context:
    return memo.context_for(index) if memo is not None else _Context(index)


# ------------------------------------------------------------ requirements


# -------------------------------------------------------- static decisions


_STATES = tuple(ClientState)
_STATE_INDEX = {state: i for i, state in enumerate(_STATES)}
_NSTATES = len(_STATES)
_BEFORE, _OPEN, _AFTER = 0, 1, 2
_NO_ROW = Row("", "", "", ClientState.PENDING, None, "", None, None, 0, "")


class _Decision:
    """One job on one client before history and rollout (internal; shared, never mutated once built).

    ``final`` rows are decided: ``template`` is their Row (client left
    blank). Otherwise there is a gap to close with ``kind`` on
    ``version`` (``previous`` for an upgrade or downgrade), subject to
    history, dependencies and rollout.
    """

    __slots__ = ("cj", "slot", "name", "revision", "final", "state", "count", "target", "template",
                 "kind", "version", "previous", "installed", "waits", "closed", "active", "eligible",
                 "package", "timeout", "repair")

    def __init__(self, cj: _CompiledJob, installed: str | None) -> None:
        self.cj = cj
        self.slot = cj.slot
        self.name = cj.name
        self.revision = cj.revision
        self.final = True
        self.state = ClientState.PENDING
        self.count = 0  # index into the pass's flat state counters
        self.target = -1  # job slot whose rollout counts this row as a target, or -1
        self.template = _NO_ROW
        self.kind: ActionKind | None = None
        self.version: str | None = None
        self.previous: str | None = None
        self.installed = installed
        # (message while waiting, positions of the rows that must start first)
        # (message, rows that provide it, whether it must be installed before this row starts)
        self.waits: tuple[tuple[str, tuple[int, ...], bool], ...] = ()
        self.closed = False  # past notAfter: nothing new starts
        self.active = False  # takes part in conflicts
        self.eligible = False  # may provide a dependency
        self.package: Package | None = None
        self.timeout = DEFAULT_TIMEOUT_SECONDS
        self.repair = False  # the gap is a repair: the version is installed, the rerun reinstalls it

    def copy(self) -> _Decision:
        clone = _Decision(self.cj, self.installed)
        for name in _Decision.__slots__:
            setattr(clone, name, getattr(self, name))
        return clone

    def settle(self, relay: str, state: ClientState, reason: Reason, message: str) -> _Decision:
        self.final = True
        self.state = state
        self.count = self.slot * _NSTATES + _STATE_INDEX[state]
        tracked = self.cj.has_failure_limit or self.cj.max_concurrent is not None
        self.target = self.slot if tracked and state is not ClientState.SKIPPED else -1
        self.template = Row(job=self.name, relay=relay, client="", state=state, action=None,
                            name=self.cj.software, version=self.cj.version, installed_version=self.installed,
                            attempts=0, message=message, operation_id=None, reason=reason)
        return self

    def gap(self, ctx: _Context, kind: ActionKind, version: str, previous: str | None) -> _Decision:
        cj = self.cj
        self.final = False
        self.kind = kind
        self.version = version
        self.previous = previous
        if kind is ActionKind.UNINSTALL:
            self.package = ctx.packages.get((cj.software, version)) or cj.package
        else:
            self.package = cj.package
        if self.package is not None:
            self.timeout = self.package.installer.timeout_seconds
        self.template = Row(job=self.name, relay=ctx.relay, client="", state=ClientState.PENDING, action=None,
                            name=cj.software, version=cj.version, installed_version=self.installed,
                            attempts=0, message="", operation_id=None)
        return self


def _phase(cj: _CompiledJob, now: datetime) -> int:
    if cj.not_before is not None and now < cj.not_before:
        return _BEFORE
    if cj.not_after is not None and now >= cj.not_after:
        return _AFTER
    return _OPEN


def _decide_one(ctx: _Context, cj: _CompiledJob, phase: int, client: Client, installed: str | None) -> _Decision:
    """Rules 2-4 and 6 for one job: what needs no other job and no history.

    Cached per (schedule phase, facts, installed version): the result only
    depends on the facts :meth:`_Context.facts` keeps.
    """
    relay = ctx.relay
    d = _Decision(cj, installed)
    if cj.suspend:
        return d.settle(relay, ClientState.SUSPENDED, Reason.SUSPENDED, "job is suspended")
    if cj.missing:
        return d.settle(relay, ClientState.SKIPPED, Reason.PACKAGE_UNDEFINED,
                        f"package {cj.software} {cj.version} is not defined")
    reasons = requirement_reasons(cj.requirements, client) if cj.requirements is not None else []
    if phase == _BEFORE:
        assert cj.not_before is not None
        d.eligible = cj.install and not reasons
        return d.settle(relay, ClientState.PENDING, Reason.SCHEDULED, f"scheduled for {format_precise(cj.not_before)}")
    if reasons:
        return d.settle(relay, ClientState.SKIPPED, Reason.REQUIREMENTS, "; ".join(reasons))
    d.closed = phase == _AFTER
    d.active = not d.closed
    if cj.install:
        assert cj.version is not None
        d.eligible = d.active
        if installed is None:
            return d.gap(ctx, ActionKind.INSTALL, cj.version, None)
        order = compare_versions(installed, cj.version)
        if order < 0:
            return d.gap(ctx, ActionKind.UPGRADE, cj.version, installed)
        if order == 0:
            if cj.repaired and not d.closed and client.id in cj.repaired:
                d.repair = True
                return d.gap(ctx, ActionKind.INSTALL, cj.version, None)
            return d.settle(relay, ClientState.SUCCEEDED, Reason.DONE, "")
        if cj.allow_downgrade:
            return d.gap(ctx, ActionKind.DOWNGRADE, cj.version, installed)
        d.eligible = False
        return d.settle(relay, ClientState.SKIPPED, Reason.NEWER_PRESENT, f"newer version {installed} present")
    if installed is None:
        return d.settle(relay, ClientState.SUCCEEDED, Reason.DONE, "")
    if cj.version is None or same_version(installed, cj.version):
        return d.gap(ctx, ActionKind.UNINSTALL, installed, None)
    return d.settle(relay, ClientState.SUCCEEDED, Reason.OTHER_VERSION,
                    f"{cj.software} {installed} present; this job removes {cj.version} only")


def _decisions(ctx: _Context, jobset: _JobSet, level: list[dict[str | None, _Decision]],
               phases: Sequence[int], client: Client, inst: Mapping[str, str]) -> list[_Decision]:
    """Rules 2-7 for every job reaching the client, in processing order."""
    get = inst.get
    found = [level[slot].get(get(software)) for slot, software in jobset.pairs]
    if None in found:
        for i, cj in enumerate(jobset.jobs):
            if found[i] is None:
                installed = get(cj.software)
                found[i] = level[cj.slot][installed] = _decide_one(ctx, cj, phases[cj.slot], client, installed)
    decisions: list[_Decision] = found  # type: ignore[assignment]
    if not jobset.shared and (not jobset.dependents or all(decisions[i].final for i in jobset.dependents)):
        return decisions
    # Rules 5 and 7 look across jobs; their outcome depends on the decisions and on the
    # installed versions of the software involved only, so it is cached with them.
    key = (id(jobset), *map(id, decisions), *map(get, jobset.names))
    cached = ctx.cross.get(key)
    if cached is not None:
        return cached[1]
    originals = tuple(decisions)  # kept with the entry, so the ids in its key stay theirs
    if jobset.shared:
        _resolve_conflicts(ctx, jobset, decisions)
    if jobset.dependents and not all(decisions[i].final for i in jobset.dependents):
        _resolve_dependencies(ctx, decisions, inst)
    if len(ctx.cross) > 100_000:
        ctx.cross.clear()
    ctx.cross[key] = (originals, decisions)
    return decisions


def _resolve_conflicts(ctx: _Context, jobset: _JobSet, decisions: list[_Decision]) -> None:
    """Rule 5: jobs wanting different outcomes for one software name (and removal before install)."""
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(decisions):
        if d.active and d.cj.software in jobset.shared:
            groups.setdefault(d.cj.software, []).append(i)
    for positions in groups.values():
        if len(positions) < 2:
            continue
        changed: dict[int, str] = {}
        for i in positions:
            a = decisions[i].cj
            others = sorted((b for b in (decisions[k].cj for k in positions if k != i)
                             if conflicting(a.install, a.version, b.install, b.version)), key=attrgetter("name"))
            if others:
                changed[i] = "conflicts with " + ", ".join(
                    f"job {o.name} (wants {wants(o.install, o.software, o.version)})" for o in others)
        for i, message in changed.items():
            d = _Decision(decisions[i].cj, decisions[i].installed)
            decisions[i] = d.settle(ctx.relay, ClientState.CONFLICT, Reason.CONFLICT, message)
        # Remove, then install: when an uninstall job removes the installed version, another
        # job's install of a different version starts from nothing, right after the removal.
        removers = [k for k in positions if not decisions[k].final and not decisions[k].cj.install]
        if not removers:
            continue
        remover = decisions[removers[0]]
        for i in positions:
            d = decisions[i]
            if not d.cj.install or d.installed is None or d.closed:
                continue
            if d.final and d.state is not ClientState.SKIPPED:
                continue  # a Conflict
            assert d.cj.version is not None
            fresh = _Decision(d.cj, d.installed)
            fresh.active = fresh.eligible = True
            fresh.gap(ctx, ActionKind.INSTALL, d.cj.version, None)
            fresh.waits = ((f"waiting for job {remover.name} to remove {remover.cj.software} {remover.version}",
                            (removers[0],), False),)
            decisions[i] = fresh


def _resolve_dependencies(ctx: _Context, decisions: list[_Decision], inst: Mapping[str, str]) -> None:
    """Rule 7 for the install rows with a gap: met, waiting for a providing row, or not provided.

    A provider that turns out not to be provided itself stops providing, so
    this runs to a fixpoint. Which provider starts first is decided later
    (:func:`_finish`), since that depends on history and rollout.
    """
    removing = {d.cj.software for d in decisions if d.active and not d.final and not d.cj.install}
    eligible = [d.eligible for d in decisions]
    candidates = [i for i, d in enumerate(decisions) if not d.final and not d.closed and d.cj.depends_on]
    waits_of: dict[int, tuple[tuple[str, tuple[int, ...], bool], ...]] = {}
    settled: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i in candidates:
            if i in settled:
                continue
            d = decisions[i]
            waits: list[tuple[str, tuple[int, ...], bool]] = []
            missing: str | None = None
            for dep in d.cj.depends_on:
                have = inst.get(dep.name)
                if have is not None and dep.name not in removing and (
                        dep.min_version is None or at_least(have, dep.min_version)):
                    continue
                providers = tuple(
                    k for k, other in enumerate(decisions)
                    if k != i and eligible[k] and other.cj.software == dep.name
                    and (dep.min_version is None or at_least(other.cj.version or "", dep.min_version)))
                if not providers:
                    missing = f"dependency {dep.name} not provided"
                    break
                waits.append((f"waiting for dependency {dep.name}", providers, True))
            if missing is not None:
                eligible[i] = False
                settled.add(i)
                decisions[i] = _Decision(d.cj, d.installed).settle(ctx.relay, ClientState.SKIPPED,
                                                                   Reason.DEPENDENCY_MISSING, missing)
                waits_of.pop(i, None)
                changed = True
            else:
                waits_of[i] = tuple(waits)
    for i, found in waits_of.items():
        if found:
            waiting = decisions[i].copy()
            waiting.waits = decisions[i].waits + found
            decisions[i] = waiting


# ------------------------------------------------------------ history step


def _history_step(ctx: _Context, d: _Decision, a: Attempt | None, now: datetime, cid: str) -> Step:
    """Rule 8 for a row with a gap (:func:`reconciler.plan.rules.history_step`)."""
    cj = d.cj
    if a is None:  # most rows: no need to ask
        return cj.repair_first if d.repair else CLOSED if d.closed else FRESH
    return history_step(cj.job, cj.revision, cj.package, ctx.packages, d.installed, d.closed, a, now,
                        covered=cj.covers_relay or cid in cj.covered_clients, repair=d.repair)


# ------------------------------------------------------------ finishing


class _Gate:
    """Rollout state of one pass per job slot: clients in progress, and why starts are halted."""

    __slots__ = ("in_progress", "halted", "take", "online_in_progress")

    def __init__(self, size: int, take: bool) -> None:
        self.in_progress = [0] * size
        self.halted: list[str | None] = [None] * size
        self.take = take  # count this pass's new starts against maxConcurrent (plan_relay)
        self.online_in_progress = [0] * size  # rows InProgress of online clients, for Plan.usage


def _finish(ctx: _Context, client: Client, decisions: Sequence[_Decision], steps: Sequence[Any],
            gate: _Gate, dispatch: bool, history: History, shared: bool = True,
            ) -> tuple[list[tuple[int, Row]], list[Action]]:
    """Rows and actions of one client with a gap somewhere: rules 7-9, artifacts, dedupe, action order.

    ``shared`` says whether two of the client's jobs may want one software
    (only then can two rows make the same change).
    """
    cid = client.id
    start_state = ClientState.IN_PROGRESS if dispatch else ClientState.PENDING
    start_reason = Reason.IN_PROGRESS if dispatch else Reason.QUEUED
    rows: list[tuple[int, list[Any]]] = []  # (job slot, the row's fields), made Rows on return
    new: list[tuple[int, list[Any], int, str]] = []  # (position, fields, attempt, previous op)
    repeated: list[tuple[int, list[Any], Action]] = []  # in-progress actions handed out again
    ready: list[tuple[int, list[Any], Ready]] = []  # rows that would start once others do
    starting = [False] * len(decisions)  # the row's change goes out in this plan
    halted = gate.halted
    in_progress = gate.in_progress

    def held_back(d: _Decision, fields: list[Any], kind: ActionKind | None, version: str | None) -> bool:
        """Rollout or a missing artifact keeps the row from starting (its reason set); else False."""
        why = artifact_missing(ctx.staged, ctx.unavailable, d.cj.package, d.cj.software, kind, version)
        if why is not None:
            fields[_R_STATE] = ClientState.PENDING
            fields[_R_REASON] = Reason.ARTIFACT
            fields[_R_MESSAGE] = why
            return True
        blocked = rollout_block(halted[d.slot], in_progress[d.slot], d.cj.max_concurrent)
        if blocked is not None:
            fields[_R_REASON], fields[_R_MESSAGE] = blocked
            return True
        return False

    for i, d in enumerate(decisions):
        cj = d.cj
        fields = list(d.template)
        fields[_R_CLIENT] = cid
        rows.append((d.slot, fields))
        if d.final:
            if d.state is ClientState.SUCCEEDED:
                recorded = history.get((d.name, cid)) if history else None
                if recorded is not None and recorded.outcome is _SUCCEEDED:
                    fields[_R_ATTEMPTS] = recorded.attempt
                    if recorded.reboot_pending and fields[_R_REASON] is Reason.DONE:
                        fields[_R_REASON], fields[_R_MESSAGE] = Reason.REBOOT_REQUIRED, REBOOT_MESSAGE
                else:
                    fields[_R_ATTEMPTS] = 0
            continue
        step = steps[i]
        if type(step) is Ready:
            fields[_R_ATTEMPTS] = step.attempts_so_far
            if d.waits:
                ready.append((i, fields, step))
                continue
            # Nothing to wait for: only rollout or the artifact can hold it back.
            if held_back(d, fields, d.kind, d.version):
                continue
            starting[i] = True
            fields[_R_STATE] = start_state
            fields[_R_REASON] = start_reason
            fields[_R_ACTION] = d.kind
            fields[_R_MESSAGE] = step.message
            new.append((i, fields, step.attempt, step.previous_operation))
        elif type(step) is Running:
            a = step.attempt
            fields[_R_STATE] = ClientState.IN_PROGRESS
            fields[_R_REASON] = Reason.IN_PROGRESS
            fields[_R_ACTION] = a.action
            fields[_R_ATTEMPTS] = a.attempt
            fields[_R_OPERATION] = a.operation_id
            fields[_R_MESSAGE] = f"attempt {a.attempt}/{cj.limit} dispatched at {format_precise(a.dispatched_at)}"
            why = artifact_missing(ctx.staged, ctx.unavailable, d.cj.package, d.cj.software, a.action, a.version)
            if why is not None:  # the client may ask for it again: it cannot be served until staged
                fields[_R_STATE], fields[_R_REASON], fields[_R_MESSAGE] = ClientState.PENDING, Reason.ARTIFACT, why
                continue
            repeated.append((i, fields, repeat_action(cj.job, cj.revision, cj.package, ctx.packages, d.installed, a,
                                                          cid)))
        elif type(step) is WindowClosed:
            assert cj.not_after is not None
            fields[_R_STATE] = ClientState.SKIPPED
            fields[_R_REASON] = Reason.WINDOW_CLOSED
            fields[_R_MESSAGE] = f"schedule window closed at {format_precise(cj.not_after)}"
        elif type(step) is OutOfAttempts:
            fields[_R_STATE] = ClientState.FAILED
            fields[_R_REASON] = step.reason
            fields[_R_ATTEMPTS] = step.attempt.attempt
            fields[_R_MESSAGE] = step.message
            fields[_R_OPERATION] = step.attempt.operation_id
        elif type(step) is Repaired:  # shown as any Succeeded row
            fields[_R_STATE] = ClientState.SUCCEEDED
            fields[_R_REASON] = Reason.DONE
            fields[_R_ATTEMPTS] = step.attempt.attempt
            if waits_for_reboot(step.attempt):
                fields[_R_REASON], fields[_R_MESSAGE] = Reason.REBOOT_REQUIRED, REBOOT_MESSAGE
        else:
            assert type(step) is RetryLater
            fields[_R_REASON], fields[_R_ATTEMPTS], fields[_R_MESSAGE] = retry_fields(step, cj.limit)
            fields[_R_OPERATION] = step.attempt.operation_id

    depth = [0] * len(decisions)  # 1 + the depth of the rows it waits for: removals go first
    deep = False
    while ready:
        # A row starts once every row it waits for starts in this plan (then rollout decides);
        # rows freed by a start are retried until nothing moves.
        held: list[tuple[int, list[Any], Ready]] = []
        moved = False
        for entry in ready:
            i, fields, step = entry
            d = decisions[i]
            cj = d.cj
            below = 0
            if d.waits:
                free = True
                for _, providers, after_install in d.waits:
                    # A dependency must be installed first: a dependent never goes out in the
                    # same plan, so it is never run when its dependency fails (the agent
                    # checks the same). A removal only has to go first: both go out together.
                    started = [] if after_install else [depth[k] for k in providers if starting[k]]
                    if not started:
                        free = False
                        break
                    below = max(below, 1 + max(started))
                if not free:
                    held.append(entry)
                    continue
            moved = True
            if held_back(d, fields, d.kind, d.version):
                continue
            starting[i] = True
            depth[i] = below
            deep = True
            fields[_R_STATE] = start_state
            fields[_R_REASON] = start_reason
            fields[_R_ACTION] = d.kind
            fields[_R_MESSAGE] = step.message
            new.append((i, fields, step.attempt, step.previous_operation))
        if not moved:
            _explain_waits(decisions, held, starting)
            break
        ready = held

    if new or repeated:
        actions = _emit(decisions, new, repeated, cid, gate.take and client.online, in_progress, shared, deep, depth)
    else:
        actions = []
    if client.online:
        for slot, fields in rows:
            if fields[_R_STATE] is ClientState.IN_PROGRESS:
                gate.online_in_progress[slot] += 1
    else:  # nothing it waits for moves before the client checks in again (rules.py, rule 11)
        for _, row_fields in rows:
            if waits_offline(row_fields[_R_STATE], row_fields[_R_REASON]):
                row_fields[_R_REASON] = Reason.CLIENT_OFFLINE
                row_fields[_R_MESSAGE] = offline_message(client.last_seen, row_fields[_R_MESSAGE])
    return [(slot, _tnew(Row, fields)) for slot, fields in rows], actions


def _emit(decisions: Sequence[_Decision], new: list[tuple[int, list[Any], int, str]],
          repeated: list[tuple[int, list[Any], Action]], cid: str, take: bool, in_progress: list[int],
          shared: bool, deep: bool, depth: list[int]) -> list[Action]:
    """The client's actions: new ones (deduplicated) and those handed out again, in execution order."""
    ordered: list[tuple[tuple[int, int, str], Action]] = []
    # Dedupe (only possible when jobs share a software name): one action per change; an
    # in-progress one owns it, else the first job by name.
    owners: dict[tuple[Any, ...], tuple[str, list[Any]]] | None = {} if shared else None
    for i, fields, action in repeated:
        ordered.append((decisions[i].cj.order_key(0), action))
        if owners is not None:
            owners.setdefault((action.kind, action.name, action.version), (action.job, fields))
    if owners is not None and len(new) > 1:
        new.sort(key=lambda n: decisions[n[0]].name)
    for i, fields, number, previous in new:
        d = decisions[i]
        cj = d.cj
        if owners is not None:
            key = (d.kind, cj.software, d.version)
            owner = owners.get(key)
            if owner is not None:
                fields[_R_STATE] = owner[1][_R_STATE]
                fields[_R_OPERATION] = owner[1][_R_OPERATION]
                fields[_R_REASON] = owner[1][_R_REASON]  # queued or in progress through the owner's action
                fields[_R_MESSAGE] = f"same change as job {owner[0]}"
                continue
            owners[key] = (cj.name, fields)
        digest = cj.hasher.copy()
        digest.update(f"{cid}\x1f{cj.software}\x1f{d.version or ''}\x1f{number}\x1f{previous}".encode())
        op = "op-" + digest.hexdigest()
        fields[_R_OPERATION] = op
        action = _tnew(Action, (op, cj.name, cid, d.kind, d.package, cj.software, d.version, d.previous,
                                cj.revision, cj.rerun, number, d.timeout))
        ordered.append(((cj.order[0], depth[i], cj.name), action))
        if take:
            in_progress[cj.slot] += 1
    if len(ordered) > 1 and (deep or repeated or owners is not None):
        # (otherwise the actions are in processing order already: uninstalls, then by name)
        ordered.sort(key=lambda pair: pair[0])
    return [action for _, action in ordered]


def _explain_waits(decisions: Sequence[_Decision], held: list[tuple[int, list[Any], Ready]],
                   starting: Sequence[bool]) -> None:
    """Messages of rows left waiting: the first unmet wait, marked when it can never end (a cycle)."""
    waiting = {i for i, _, _ in held}
    # A row waits on something real when a row it waits for was decided otherwise (in
    # progress, scheduled, no rollout slot...) or itself waits on something real; the rest
    # only wait on each other.
    real: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i in waiting - real:
            unmet = [p for _, p, after in decisions[i].waits if after or not any(starting[k] for k in p)]
            if any(k not in waiting or k in real for providers in unmet for k in providers):
                real.add(i)
                changed = True
    for i, fields, _ in held:
        message, after = next((m, after) for m, providers, after in decisions[i].waits
                              if after or not any(starting[k] for k in providers))
        if i not in real:
            fields[_R_REASON] = Reason.DEPENDENCY_CYCLE
            fields[_R_MESSAGE] = f"{message} (dependency cycle)"
        else:
            fields[_R_REASON] = Reason.WAITING_DEPENDENCY if after else Reason.WAITING_REMOVAL
            fields[_R_MESSAGE] = message


# ------------------------------------------------------------ public API


class _Replay:
    """One client's rows and new actions, to make again for other clients of the same shape.

    Only for clients without history (every new action is attempt 1 with no
    previous operation), so only the client id and the operation ids differ.
    Made from the first such client's result; prepared for replay when a
    second one comes. The rows' states are counted per use, at the end of
    the pass (:meth:`count`).
    """

    __slots__ = ("ctx", "made", "rows", "actions", "slots", "states", "uses")

    def __init__(self, ctx: _Context, rows: list[tuple[int, Row]], actions: list[Action]) -> None:
        self.ctx = ctx
        self.made: tuple[list[tuple[int, Row]], list[Action]] | None = (rows, actions)
        # (append to the job's rows, Row) of the rows that show no new operation
        self.rows: list[tuple[Any, Row]] = []
        # (Action, hash state after the leading fields, the bytes after the client id,
        #  (append to the job's rows, Row) of each row that shows the action's operation id)
        self.actions: list[tuple[Action, Any, bytes, list[tuple[Any, Row]]]] = []
        self.slots: list[int] = []  # job slot of each action: an online client's start takes a slot
        self.states: list[int] = []  # flat state counter of each row
        self.uses = 0

    def _prepare(self, made: tuple[list[tuple[int, Row]], list[Action]], append: Sequence[Any]) -> None:
        rows, actions = made
        # each row either shows one of the new operations (it starts, or makes the same change
        # as a row that does), or none
        showing: dict[str | None, list[tuple[Any, Row]]] = {a.operation_id: [] for a in actions}
        for slot, row in rows:
            showing.get(row.operation_id, self.rows).append((append[slot], row))
        self.states = [slot * _NSTATES + _STATE_INDEX[row.state] for slot, row in rows]
        for a in actions:
            cj = self.ctx.compiled[a.job]
            assert a.attempt == 1
            self.actions.append((a, cj.hasher, f"\x1f{a.name}\x1f{a.version or ''}\x1f1\x1f".encode(),
                                 showing[a.operation_id]))
            self.slots.append(cj.slot)
        self.made = None

    def play(self, cid: str, online: bool, append: Sequence[Any], out: list[Action],
             in_progress: list[int], history: History) -> None:
        """The rows and actions for client ``cid``; ``append`` is the same in every call of a pass."""
        if self.made is not None:
            self._prepare(self.made, append)
        self.uses += 1
        add = out.append
        client = cid.encode()
        # Every client contributes one row per job, so the order rows are made in is free.
        for (_, job, _, kind, package, name, version, previous, revision, rerun, attempt, timeout), hasher, tail, \
                showing in self.actions:
            digest = hasher.copy()
            digest.update(client)
            digest.update(tail)
            op = "op-" + digest.hexdigest()
            add(_tnew(Action, (op, job, cid, kind, package, name, version, previous, revision, rerun, attempt,
                               timeout)))
            for append_row, (r_job, relay, _, state, action, r_name, r_version, installed, attempts, message, _,
                             reason) in showing:
                append_row(_tnew(Row, (r_job, relay, cid, state, action, r_name, r_version, installed, attempts,
                                       message, op, reason)))
        if online:
            for slot in self.slots:
                in_progress[slot] += 1
        for append_row, (job, relay, _, state, action, name, version, installed, attempts, message, op, reason) \
                in self.rows:
            if state is ClientState.SUCCEEDED:
                if history:
                    attempts = succeeded_attempts(history, job, cid)
                if reason is Reason.REBOOT_REQUIRED or (history and reason is Reason.DONE):
                    reason, message = reboot_fields(history, job, cid, reason, message)
            append_row(_tnew(Row, (job, relay, cid, state, action, name, version, installed, attempts, message, op,
                                   reason)))

    def count(self, counts: list[int]) -> None:
        """Add the rows made by :meth:`play` to the pass's state counters."""
        uses = self.uses
        if uses:
            for k in self.states:
                counts[k] += uses


def _inventory(client: Client) -> dict[str, str]:
    return {item.name: item.version for item in client.installed}


def plan_client(index: RelayIndex, client: Client, history: History,
                usage: Mapping[str, RolloutUsage], now: datetime, memo: PlanMemo | None = None) -> ClientPlan:
    """Plan one client at check-in; ``usage`` holds the relay's per-job rollout counters.

    ``history`` needs only this client's entries (it may hold others). Rows
    that get a new action are ``InProgress``: the caller hands the actions out
    in this reply and records them as dispatched. ``usage[job]`` is what the
    relay counts on its rows (as :func:`plan_relay` does): ``in_progress``
    online clients InProgress, ``failed`` rows Failed, ``targets`` rows not
    Skipped; a job missing from it counts as all zero. A new start needs
    ``in_progress < maxConcurrent`` and ``maxFailures`` not exceeded; the
    caller adds the starts to ``in_progress``.
    """
    now = aware(now)
    ctx = _context(index, memo)
    jobset = ctx.jobs_for(client.id)
    if not jobset.jobs:
        return ClientPlan(client.id, (), ())
    phases = tuple(_phase(cj, now) for cj in ctx.by_slot)
    inst = _inventory(client)
    decisions = _decisions(ctx, jobset, ctx.level(phases, ctx.facts(client)), phases, client, inst)
    steps = [None if d.final else _history_step(ctx, d, history.get((d.name, client.id)), now, client.id)
             for d in decisions]
    gate = _Gate(len(ctx.by_slot), take=False)
    for cj in jobset.jobs:
        u = usage.get(cj.name)
        if u is None:
            continue
        gate.in_progress[cj.slot] = u.in_progress
        if cj.has_failure_limit and failures_exceeded(u.failed, u.targets, cj.max_failures):
            gate.halted[cj.slot] = halt_message(u.failed, u.targets, cj.max_failures)
    rows, actions = _finish(ctx, client, decisions, steps, gate, dispatch=True, history=history,
                            shared=bool(jobset.shared))
    return ClientPlan(client.id, tuple(sorted((r for _, r in rows), key=attrgetter("job"))), tuple(actions))


def plan_relay(index: RelayIndex, clients: Sequence[Client], history: History, now: datetime,
               memo: PlanMemo | None = None) -> Plan:
    """Plan every client of the relay (rows name ``index.relay``, whatever ``Client.relay`` says).

    Level-triggered: the failed and in-progress counts that rollout limits
    use come from this pass's own rows; new starts take slots in client id
    order (an offline client's start takes none: it holds no slot until it
    checks in). ``Plan.usage`` is what a check-in's rollout limits count on
    these rows (see :func:`plan_client`). A pass allocates about 10^6
    short-lived, acyclic objects; callers at that scale pause the cyclic
    garbage collector around it (the relay does).
    """
    return _plan_relay(index, clients, history, aware(now), _context(index, memo))


class _Shape:
    """The clients of one shape in a pass (job set, facts, versions of the software concerned).

    They share their decisions, and what follows from the decisions alone:
    the rows with a gap, their steps and rollout targets when no attempt is
    recorded, and the rollout limits a new start would meet.
    """

    __slots__ = ("decisions", "settled", "counted", "gaps", "fresh_steps", "fresh_counted", "caps", "capped",
                 "replay", "rows", "plain")

    def __init__(self, decisions: list[_Decision]) -> None:
        self.decisions = decisions
        counted: list[int] = []  # job slots that count a final row as a rollout target
        gaps: list[tuple[int, _Decision]] = []
        # without history every gap row starts afresh (or, past its window, is skipped)
        self.fresh_steps: list[Any] = [None] * len(decisions)
        starts: list[int] = []  # job slots of the gap rows that count as rollout targets then
        caps: list[int] = []  # job slots of the gap rows with maxConcurrent
        capped: list[int] = []  # and those limits
        for i, d in enumerate(decisions):
            if d.final:
                if d.target >= 0:
                    counted.append(d.target)
                continue
            gaps.append((i, d))
            if d.closed:
                self.fresh_steps[i] = CLOSED
            else:
                self.fresh_steps[i] = d.cj.repair_first if d.repair else FRESH
                starts.append(d.slot)
            if d.cj.max_concurrent is not None:
                caps.append(d.slot)
                capped.append(d.cj.max_concurrent)
        self.settled = not gaps
        self.counted = tuple(counted)
        self.gaps = tuple(gaps)
        # job slots that count a client of this shape as a rollout target when it has no history
        self.fresh_counted = self.counted + tuple(starts)
        self.caps = tuple(caps)
        self.capped = tuple(capped)
        self.replay = id(decisions)  # shapes with the same decisions share replays
        # settled rows: (template, where it goes), made in pass 2
        self.rows: list[tuple[Row, Any, bool]] | None = None
        # clients of this shape with no history for any gap row (all of them when settled): their
        # rollout targets, and a settled shape's state counts, are added up once at the end
        self.plain = 0


def _plan_relay(index: RelayIndex, clients: Sequence[Client], history: History, now: datetime,
                ctx: _Context) -> Plan:
    size = len(ctx.by_slot)
    phases = tuple(_phase(cj, now) for cj in ctx.by_slot)
    hget = history.get if history else None
    levels: dict[tuple[Any, ...], list[dict[str | None, _Decision]]] = {}
    shapes: dict[tuple[Any, ...], _Shape] = {}

    # Pass 1: decisions, history steps of rows with a gap, and the counters rollout needs.
    in_progress = [0] * size
    failed = [0] * size
    targets = [0] * size
    # (client, its shape, its steps: None when every row is settled, whether no gap row has history)
    prepared: list[tuple[Client, _Shape, list[Any] | None, bool]] = []
    named_jobs = ctx.client_jobs
    relay_set = ctx.relay_set
    for client in sorted(clients, key=attrgetter("id")):
        cid = client.id
        jobset = ctx.jobs_for(cid) if cid in named_jobs else relay_set
        if not jobset.jobs:
            continue
        facts = ctx.facts(client)
        inst = {item.name: item.version for item in client.installed}
        # Clients alike (job set, facts, versions of the software concerned) share decisions.
        key = (id(jobset), facts, *map(inst.get, jobset.names))
        shape = shapes.get(key)
        if shape is None:
            level = levels.get(facts)
            if level is None:
                level = levels[facts] = ctx.level(phases, facts)
            shape = shapes[key] = _Shape(_decisions(ctx, jobset, level, phases, client, inst))
        if shape.settled:
            shape.plain += 1
            prepared.append((client, shape, None, True))
            continue
        if hget is None or all(hget((d.name, cid)) is None for _, d in shape.gaps):
            shape.plain += 1
            prepared.append((client, shape, shape.fresh_steps, True))
            continue
        for s in shape.counted:
            targets[s] += 1
        own = shape.fresh_steps.copy()
        for i, d in shape.gaps:
            recorded = hget((d.name, cid))
            if recorded is None:
                step = own[i]
            else:
                step = own[i] = _history_step(ctx, d, recorded, now, cid)
            kind = type(step)
            if kind is not WindowClosed:
                targets[d.slot] += 1
                if kind is OutOfAttempts:
                    failed[d.slot] += 1
                elif kind is Running and client.online:
                    in_progress[d.slot] += 1
        prepared.append((client, shape, own, False))
    for shape in shapes.values():
        if shape.plain:
            for s in shape.fresh_counted:
                targets[s] += shape.plain

    gate = _Gate(size, take=True)
    gate.in_progress = in_progress
    for cj in ctx.by_slot:
        s = cj.slot
        if cj.has_failure_limit and failures_exceeded(failed[s], targets[s], cj.max_failures):
            gate.halted[s] = halt_message(failed[s], targets[s], cj.max_failures)

    # Pass 2: rows and actions, clients in id order. Rows decided without
    # history are copied from their decision's template.
    per_job: list[list[Row]] = [[] for _ in range(size)]
    append = [rows.append for rows in per_job]
    counts = [0] * (size * _NSTATES)
    offline = [0] * size  # Pending rows of offline clients per job slot
    actions: list[Action] = []
    # Clients of one shape without history get the same rows and actions but for their id
    # (and operation ids), as long as the rollout slots they could take are as free: the first
    # one's result is replayed for the others.
    replays: dict[Any, _Replay] = {}
    free = in_progress.__getitem__
    for client, shape, steps, fresh in prepared:
        cid = client.id
        if steps is None:
            settled = shape.rows
            if settled is None:
                settled = shape.rows = [
                    (d.template, append[d.slot], d.state is ClientState.SUCCEEDED and hget is not None)
                    for d in shape.decisions]
            for (job, relay, _, state, action, name, version, installed, attempts, message, op, reason), add, \
                    look in settled:
                if look:  # a Succeeded row shows the attempts of the operation that made it so
                    recorded = hget((job, cid))  # type: ignore[misc]
                    if recorded is not None and recorded.outcome is _SUCCEEDED:
                        attempts = recorded.attempt
                        if recorded.reboot_pending and reason is Reason.DONE:
                            reason, message = Reason.REBOOT_REQUIRED, REBOOT_MESSAGE
                add(_tnew(Row, (job, relay, cid, state, action, name, version, installed, attempts, message, op,
                                reason)))
            continue
        decisions = shape.decisions
        replay_key: Any = None
        if fresh and client.online:  # an offline client's rows say so: never replayed to or from others
            replay_key = (shape.replay, *map(lt, map(free, shape.caps), shape.capped)) if shape.caps else shape.replay
            replay = replays.get(replay_key)
            if replay is not None:
                replay.play(cid, client.online, append, actions, in_progress, history)
                continue
        rows, new_actions = _finish(ctx, client, decisions, steps, gate, dispatch=False, history=history,
                                    shared=bool(ctx.jobs_for(cid).shared))
        for slot, row in rows:
            append[slot](row)
            counts[slot * _NSTATES + _STATE_INDEX[row.state]] += 1
            if row.reason is _OFFLINE:
                offline[slot] += 1
        actions.extend(new_actions)
        if replay_key is not None:
            replays[replay_key] = _Replay(ctx, rows, new_actions)

    for replay in replays.values():
        replay.count(counts)
    for shape in shapes.values():
        if shape.settled:
            for d in shape.decisions:
                counts[d.count] += shape.plain

    all_rows: list[Row] = []
    rollups: list[JobRollup] = []
    usage: dict[str, RolloutUsage] = {}
    for cj in sorted(ctx.by_slot, key=attrgetter("name")):
        job_rows = per_job[cj.slot]
        if not job_rows and cj.name not in ctx.relay_names:
            continue  # a clients job naming none of this relay's clients does not reach it
        all_rows.extend(job_rows)
        base = cj.slot * _NSTATES
        by_state = {state.value: counts[base + k] for k, state in enumerate(_STATES)}
        # Before notBefore every row still to run waits for the schedule (rules.py says it per row);
        # ClientsOffline when every Pending row waits for an offline client.
        scheduled = phases[cj.slot] == _BEFORE
        rollups.append(_rollup(cj.name, by_state, suspended=cj.suspend, max_failures=cj.max_failures,
                               scheduled=scheduled,
                               offline=not scheduled and offline[cj.slot] == by_state[ClientState.PENDING.value]))
        usage[cj.name] = RolloutUsage(in_progress=gate.online_in_progress[cj.slot],
                                      failed=by_state[ClientState.FAILED.value],
                                      targets=len(job_rows) - by_state[ClientState.SKIPPED.value])
    return Plan(relay=index.relay, rows=tuple(all_rows), actions=tuple(actions), jobs=tuple(rollups),
                usage=usage)
