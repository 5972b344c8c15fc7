"""The plan rules of DESIGN section 4, as plain code: the oracle the fast engine is checked against.

Every client is planned on its own, one job after another, with nothing
shared or cached; a relay's clients are planned one after another in id
order. ``tests/test_plan_properties.py`` checks that
:func:`reconciler.plan.plan_relay` and :func:`reconciler.plan.plan_client`
give exactly what :func:`plan_relay_by_rules` and :func:`plan_client_by_rules`
give, on generated fleets with history. A rule change starts here.

The rules, per client and job, in this order:

1. **Reach.** ``allLowerClients`` jobs reach every client of a relay that is
   a destination or lies below one (:mod:`reconciler.reach`); ``clients`` jobs
   reach the named clients on whatever relay they are.
2. **Suspend** -> ``Suspended`` ("job is suspended").
3. **Schedule.** Before ``notBefore`` -> ``Pending`` "scheduled for <time>".
   After ``notAfter`` nothing new starts: a row whose desired state holds is
   ``Succeeded``, one in progress stays ``InProgress``, one out of retries
   stays ``Failed``, every other row is ``Skipped`` "schedule window closed
   at <time>". Such a job takes no part in conflicts and provides no
   dependency.
4. **Requirements** of the package (install jobs only: removing software
   needs no capability) -> ``Skipped`` with every unmet reason, e.g.
   "requires os windows, client has linux". A fact the client did not report
   is not met.
5. **Conflicts** among the jobs left active for one software name: two jobs
   conflict when they want different outcomes (install of different
   versions; install vs uninstall of any version or of that version). Each
   such row is ``Conflict`` naming every job it conflicts with ("conflicts
   with job X (wants vpn-client 5.2)"), and nothing is done there. Jobs that
   want the same outcome do not conflict; the change is made once (see
   *dedupe* below). An uninstall of the installed version and an install of
   another version do not conflict either: the removal goes first and the
   install starts from nothing right after it (or waits, "waiting for job X
   to remove ...", while the removal cannot start).
6. **Versions** (``versions.compare_versions``). Install: absent -> install,
   older -> upgrade, same -> ``Succeeded``, newer -> ``Skipped`` "newer
   version X present" unless ``allowDowngrade`` (-> downgrade). Uninstall:
   present -> uninstall of the installed version, absent -> ``Succeeded``;
   an uninstall naming a version leaves another version alone
   (``Succeeded``).
7. **dependsOn** (install rows with something to do): a dependency
   installed at ``minVersion`` or newer, and not being removed by an
   uninstall job, is met. Otherwise, when an install job reaching the client
   would provide a satisfying version (and is not Skipped, Conflict,
   Suspended or past its window for this client) the row waits, ``Pending``
   "waiting for dependency X", until the client reports the dependency
   installed; the dependent never goes out in the same plan as its
   dependency, so a dependent is never run when its dependency failed (the
   agent refuses such an action too). Without such a provider the row is
   ``Skipped`` "dependency X not provided". Rows that only wait for each
   other (a dependency cycle) say so: "waiting for dependency X (dependency
   cycle)".
8. **History** (latest attempt per job and client, only of the job's current
   *plan revision*; older revisions are ignored, so a newer spec pre-empts
   pending retries of the old one). Dispatched and within ``timeout +
   RESULT_MARGIN_SECONDS`` -> ``InProgress``, and the same action (same
   operation id) is emitted again: the agent answers repeats from its
   journal, so a client killed mid-install gets it back. Past that deadline
   the attempt counts as failed, "no result from client within N s",
   finished at the deadline. Failed with attempts left -> ``Pending`` "retry
   k/limit at <time>" until ``finished + backoff * 2**(attempt-1)``, then
   attempt k. Out of attempts -> ``Failed`` with the attempt's message, unless
   ``spec.rerun`` was raised since and the job's ``rerunScope`` (if any)
   covers the client: then attempt 1 again. A scope covers the clients it
   names and every client of the relays it names or of relays nested below
   them (:func:`rerun_covers`); a row it does not cover keeps its series, so
   a later raise that covers it still resets it. Not attempted (the
   client could not download the artifact, nothing ran) -> ``Pending``
   "attempt k/limit again at <time>" until ``finished +
   DOWNLOAD_RETRY_SECONDS * 2**deferrals`` (at most an hour), then attempt k
   again under a new operation id: a relay or network blip uses up no
   attempt. The ``MAX_DEFERRALS``-th such return in a row counts as a failed
   attempt. Succeeded but the
   client no longer reports the desired state -> drift, planned again as
   attempt 1 of a fresh operation. A ``retry.limit`` of 0 means one attempt.
   **Repair**: a client listed in a ``rerunScope`` with ``repair: true``
   whose install row would be ``Succeeded`` (the version is installed, the
   window open) has a gap instead, an install of the same version
   (:func:`repairs`), until an attempt at the current rerun number succeeds:
   such a success (under any spec revision) -> ``Succeeded``; no attempt at
   this rerun yet -> attempt 1 "rerun N: repair"; one under way, retrying
   or out of attempts -> as any row. So each raise reinstalls once, and a
   failed reinstall shows as ``Failed`` like any other.
9. **Rollout** per job on the relay, for rows about to start: with
   ``maxFailures`` exceeded (``failed > count``, or ``failed > N%`` of the
   job's non-Skipped rows) -> ``Pending`` "rollout halted: ..." (the job is
   ``Halted`` until a rerun brings the Failed rows back); with
   ``maxConcurrent`` clients in progress -> ``Pending`` "waiting for a rollout
   slot". Only online clients hold slots.
10. **Artifacts.** An install, upgrade or downgrade whose package the relay
    has not staged waits, ``Pending`` "waiting for artifact of X: why": a
    client is never handed an action it cannot download.
11. **Offline clients.** A client that has not checked in within the
    relay's online window holds no rollout slot, and its ``Pending`` rows
    (except those waiting for the schedule or held by a halted job) say
    ``clientOffline``: "client offline, last contact <time>; <why it would
    wait anyway>". A job whose rows still to run all wait for offline
    clients is ``ClientsOffline``, not ``InProgress``.

Dedupe: when two jobs would make the same change on one client (same action,
software and version), one action goes out, under the first job with the
change already in progress, else the first by name; the other rows show the
same state and operation id with the message "same change as job X".

Actions of one client run in this order: uninstalls, then installs by job
name (a dependent and its dependency never go out together; an install that
waits for a removal goes right after it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from reconciler.plan.identity import operation_id
from reconciler.plan.index import RelayIndex
from reconciler.plan.vocabulary import (
    DOWNLOAD_RETRY_SECONDS,
    MAX_BACKOFF_SECONDS,
    MAX_DEFERRALS,
    MAX_DOWNLOAD_RETRY_SECONDS,
    REBOOT_MESSAGE,
    RESULT_MARGIN_SECONDS,
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
    count_states,
    failures_exceeded,
    halt_message,
    job_state,
    offline_message,
    parked,
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

# ------------------------------------------------------------------ words


def requirement_reasons(req: Requirements, client: Client) -> list[str]:
    """Every unmet requirement, in the order os, arch, free disk, labels."""
    reasons: list[str] = []
    os_, arch, disk = client.os, client.arch, client.free_disk_mb
    if req.os and os_ not in req.os:
        has = f"client has {os_}" if os_ is not None else "client did not report os"
        reasons.append(f"requires os {' or '.join(req.os)}, {has}")
    if req.arch and arch not in req.arch:
        has = f"client has {arch}" if arch is not None else "client did not report arch"
        reasons.append(f"requires arch {' or '.join(req.arch)}, {has}")
    minimum = req.min_free_disk_mb
    if minimum is not None and (disk is None or disk < minimum):
        has = f"client has {disk} MB" if disk is not None else "client did not report freeDiskMB"
        reasons.append(f"requires {minimum} MB free disk, {has}")
    if req.labels:
        labels = dict(client.labels)
        for key, value in req.labels:
            actual = labels.get(key)
            if actual != value:
                has = f"client has {key}={actual}" if actual is not None else f"client has no label {key}"
                reasons.append(f"requires label {key}={value}, {has}")
    return reasons


def conflicting(a_install: bool, a_version: str | None, b_install: bool, b_version: str | None) -> bool:
    """Whether two jobs for one software want different outcomes (rule 5)."""
    if a_install and b_install:
        return not same_version(a_version or "", b_version or "")
    if a_install or b_install:
        install_version, removed = (a_version, b_version) if a_install else (b_version, a_version)
        return removed is None or same_version(install_version or "", removed)
    return False


def wants(install: bool, software: str, version: str | None) -> str:
    """What a job wants, as a conflict names it."""
    if install:
        return f"{software} {version}"
    return f"{software} {version} removed" if version is not None else f"{software} removed"


def rollout_block(halted: str | None, in_progress: int, max_concurrent: int | None) -> tuple[Reason, str] | None:
    """Why a start is held back on this relay, or None: a halted job first, then a full maxConcurrent."""
    if halted is not None:
        return Reason.HALTED, halted
    if max_concurrent is not None and in_progress >= max_concurrent:
        return Reason.ROLLOUT_SLOT, f"waiting for a rollout slot (maxConcurrent {max_concurrent})"
    return None


def artifact_missing(staged: frozenset[tuple[str, str]] | None, unavailable: Mapping[tuple[str, str], str],
                     package: Package | None, software: str, kind: ActionKind | None,
                     version: str | None) -> str | None:
    """Why the artifact an install needs cannot be served by this relay, or None (rule 10)."""
    if kind is ActionKind.UNINSTALL or staged is None:
        return None
    if package is None:
        return f"package {software} {version} has no spec at the accepted commit"
    key = (package.name, package.version)
    if key in staged:
        return None
    return f"waiting for artifact of {key[0]} {key[1]}: {unavailable.get(key, 'not staged yet')}"


def rerun_covers(index: RelayIndex, job: Job, client_id: str) -> bool:
    """Whether raising the job's ``rerun`` resets this client's Failed row (rule 8).

    Without a ``rerunScope`` every row; with one, the clients it names and the
    clients of the relays it names, or of relays nested below them.
    """
    scope = job.rerun_scope
    if scope is None:
        return True
    return client_id in scope.clients or any(relay in scope.relays for relay in index.chain)


def repairs(job: Job, client_id: str) -> bool:
    """Whether the job's current rerun reinstalls its package on this client where it is installed (rule 8)."""
    scope = job.rerun_scope
    return scope is not None and scope.repair and client_id in scope.clients


# ------------------------------------------------------------------ decisions (rules 2-7)


@dataclass(frozen=True)
class Wait:
    """A row that starts only after others: a removal (same plan) or a dependency (once installed)."""

    message: str
    providers: tuple[int, ...]  # positions of the rows that provide what it waits for
    until_installed: bool  # a dependency: never in the same plan as its provider


@dataclass(frozen=True)
class Decision:
    """One job on one client before history and rollout."""

    job: Job
    package: Package | None  # the job's package
    installed: str | None  # installed version of the job's software
    state: ClientState | None = None  # settled here (None: a gap to close)
    reason: Reason | None = None
    message: str = ""
    kind: ActionKind | None = None  # the gap: what closes it
    version: str | None = None  # the version acted on
    previous: str | None = None  # an upgrade's or downgrade's installed version
    action_package: Package | None = None  # the package an action carries
    closed: bool = False  # past notAfter: nothing new starts
    active: bool = False  # takes part in conflicts
    eligible: bool = False  # may provide a dependency
    waits: tuple[Wait, ...] = ()
    repair: bool = False  # the gap is a repair: the version is installed, the rerun reinstalls it

    @property
    def settled(self) -> bool:
        return self.state is not None

    @property
    def install(self) -> bool:
        return self.job.job_type is JobType.INSTALL

    def settle(self, state: ClientState, reason: Reason, message: str) -> Decision:
        return replace(self, state=state, reason=reason, message=message, kind=None, version=None, previous=None,
                       action_package=None, waits=())


def _phase(job: Job, now: datetime) -> str:
    if job.not_before is not None and now < aware(job.not_before):
        return "before"
    if job.not_after is not None and now >= aware(job.not_after):
        return "after"
    return "open"


def decide(index: RelayIndex, job: Job, client: Client, installed: str | None, now: datetime) -> Decision:
    """Rules 2-4 and 6 for one job on one client: what needs no other job and no history."""
    install = job.job_type is JobType.INSTALL
    package = index.packages.get((job.package_name, job.package_version)) if job.package_version else None
    d = Decision(job=job, package=package, installed=installed)
    if job.suspend:
        return d.settle(ClientState.SUSPENDED, Reason.SUSPENDED, "job is suspended")
    if install and package is None:
        return d.settle(ClientState.SKIPPED, Reason.PACKAGE_UNDEFINED,
                        f"package {job.package_name} {job.package_version} is not defined")
    reasons = requirement_reasons(package.requirements, client) if install and package is not None else []
    phase = _phase(job, now)
    if phase == "before":
        assert job.not_before is not None
        scheduled = d.settle(ClientState.PENDING, Reason.SCHEDULED, f"scheduled for {format_precise(job.not_before)}")
        return replace(scheduled, eligible=install and not reasons)
    if reasons:
        return d.settle(ClientState.SKIPPED, Reason.REQUIREMENTS, "; ".join(reasons))
    closed = phase == "after"
    d = replace(d, closed=closed, active=not closed)
    if install:
        assert job.package_version is not None
        d = replace(d, eligible=not closed)
        if installed is None:
            return _gap(index, d, ActionKind.INSTALL, job.package_version, None)
        order = compare_versions(installed, job.package_version)
        if order < 0:
            return _gap(index, d, ActionKind.UPGRADE, job.package_version, installed)
        if order == 0:
            if not closed and repairs(job, client.id):
                return replace(_gap(index, d, ActionKind.INSTALL, job.package_version, None), repair=True)
            return d.settle(ClientState.SUCCEEDED, Reason.DONE, "")
        if job.allow_downgrade:
            return _gap(index, d, ActionKind.DOWNGRADE, job.package_version, installed)
        return replace(d.settle(ClientState.SKIPPED, Reason.NEWER_PRESENT, f"newer version {installed} present"),
                       eligible=False)
    if installed is None:
        return d.settle(ClientState.SUCCEEDED, Reason.DONE, "")
    if job.package_version is None or same_version(installed, job.package_version):
        return _gap(index, d, ActionKind.UNINSTALL, installed, None)
    return d.settle(ClientState.SUCCEEDED, Reason.OTHER_VERSION,
                    f"{job.package_name} {installed} present; this job removes {job.package_version} only")


def _gap(index: RelayIndex, d: Decision, kind: ActionKind, version: str, previous: str | None) -> Decision:
    carried = d.package
    if kind is ActionKind.UNINSTALL:
        carried = index.packages.get((d.job.package_name, version)) or d.package
    return replace(d, state=None, reason=None, message="", kind=kind, version=version, previous=previous,
                   action_package=carried)


def resolve_conflicts(decisions: list[Decision]) -> list[Decision]:
    """Rule 5 over one client's decisions (in processing order): conflicts, and removal before install."""
    out = list(decisions)
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(out):
        if d.active:
            groups.setdefault(d.job.package_name, []).append(i)
    for positions in groups.values():
        if len(positions) < 2:
            continue
        marked: dict[int, str] = {}
        for i in positions:
            a = out[i]
            others = sorted((out[k].job for k in positions if k != i and conflicting(
                a.install, a.job.package_version, out[k].install, out[k].job.package_version)),
                key=lambda job: job.name)
            if others:
                marked[i] = "conflicts with " + ", ".join(
                    f"job {o.name} (wants {wants(o.job_type is JobType.INSTALL, o.package_name, o.package_version)})"
                    for o in others)
        for i, message in marked.items():
            plain = Decision(job=out[i].job, package=out[i].package, installed=out[i].installed)
            out[i] = plain.settle(ClientState.CONFLICT, Reason.CONFLICT, message)
        removers = [k for k in positions if not out[k].settled and not out[k].install]
        if not removers:
            continue
        remover = out[removers[0]]
        for i in positions:
            d = out[i]
            if not d.install or d.installed is None or d.closed:
                continue
            if d.settled and d.state is not ClientState.SKIPPED:
                continue  # in conflict, or its version is installed already
            assert d.job.package_version is not None
            # the install starts from nothing once the removal has gone first
            fresh = Decision(job=d.job, package=d.package, installed=d.installed, kind=ActionKind.INSTALL,
                             version=d.job.package_version, action_package=d.package, active=True, eligible=True)
            message = f"waiting for job {remover.job.name} to remove {remover.job.package_name} {remover.version}"
            out[i] = replace(fresh, waits=(Wait(message, (removers[0],), until_installed=False),))
    return out


def resolve_dependencies(decisions: list[Decision], installed: Mapping[str, str]) -> list[Decision]:
    """Rule 7 for the install rows with a gap: met, waiting for a providing row, or not provided.

    A provider that turns out not to be provided itself stops providing, so
    this runs until nothing changes.
    """
    out = list(decisions)
    removing = {d.job.package_name for d in out if d.active and not d.settled and not d.install}
    eligible = [d.eligible for d in out]
    candidates = [i for i, d in enumerate(out) if not d.settled and not d.closed and d.package is not None
                  and d.install and d.package.depends_on]
    waits_of: dict[int, tuple[Wait, ...]] = {}
    skipped: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i in candidates:
            if i in skipped:
                continue
            d = out[i]
            assert d.package is not None
            waits: list[Wait] = []
            missing: str | None = None
            for dep in d.package.depends_on:
                have = installed.get(dep.name)
                if have is not None and dep.name not in removing and (
                        dep.min_version is None or at_least(have, dep.min_version)):
                    continue
                providers = tuple(
                    k for k, other in enumerate(out)
                    if k != i and eligible[k] and other.job.package_name == dep.name
                    and (dep.min_version is None or at_least(other.job.package_version or "", dep.min_version)))
                if not providers:
                    missing = f"dependency {dep.name} not provided"
                    break
                waits.append(Wait(f"waiting for dependency {dep.name}", providers, until_installed=True))
            if missing is not None:
                eligible[i] = False
                skipped.add(i)
                plain = Decision(job=d.job, package=d.package, installed=d.installed)
                out[i] = plain.settle(ClientState.SKIPPED, Reason.DEPENDENCY_MISSING, missing)
                waits_of.pop(i, None)
                changed = True
            else:
                waits_of[i] = tuple(waits)
    for i, found in waits_of.items():
        if found:
            out[i] = replace(out[i], waits=out[i].waits + found)
    return out


# ------------------------------------------------------------------ history (rule 8)


@dataclass(frozen=True)
class Ready:
    """Nothing under way: this attempt may start now."""

    attempt: int
    previous_operation: str  # the operation it follows ("" when none)
    attempts_so_far: int
    message: str


@dataclass(frozen=True)
class Running:
    attempt: Attempt


@dataclass(frozen=True)
class OutOfAttempts:
    attempt: Attempt
    message: str
    reason: Reason = Reason.FAILED  # SECURITY_ERROR: refused by the client, never retried


@dataclass(frozen=True)
class RetryLater:
    """Start the next attempt at ``at``; ``counted`` is False when the last one was not attempted."""

    attempt: Attempt
    at: datetime
    message: str
    counted: bool = True


@dataclass(frozen=True)
class WindowClosed:
    pass


@dataclass(frozen=True)
class Repaired:
    """A repair's attempt at the current rerun number succeeded: the row is ``Succeeded``."""

    attempt: Attempt


Step = Ready | Running | OutOfAttempts | RetryLater | WindowClosed | Repaired


FRESH = Ready(1, "", 0, "")
CLOSED = WindowClosed()


def _timeout(packages: Mapping[tuple[str, str], Package], job: Job, attempt: Attempt, own: Package | None) -> int:
    package = packages.get((job.package_name, attempt.version or "")) or own
    return package.installer.timeout_seconds if package is not None else DEFAULT_TIMEOUT_SECONDS


def repair_start(job: Job, previous_operation: str = "", attempts_so_far: int = 0) -> Ready:
    """Attempt 1 of a repair under the job's current rerun number."""
    limit = max(1, job.retry_limit)
    return Ready(1, previous_operation, attempts_so_far, f"rerun {job.rerun}: repair, attempt 1/{limit}")


def history_step(job: Job, revision: str, own: Package | None, packages: Mapping[tuple[str, str], Package],
                 installed: str | None, closed: bool, attempt: Attempt | None, now: datetime, *,
                 covered: bool = True, repair: bool = False) -> Step:
    """What the latest attempt of ``job`` (at plan ``revision``) means for a row with a gap.

    ``covered``: the job's current rerun covers the client (:func:`rerun_covers`);
    ``repair``: the gap is a repair (:func:`repairs`), never past the window.
    """
    limit = max(1, job.retry_limit)
    if repair:
        if attempt is None:
            return repair_start(job)
        if attempt.outcome is Outcome.SUCCEEDED and attempt.rerun >= job.rerun:
            return Repaired(attempt)  # once per rerun number, whatever spec revision it ran under
        if attempt.revision != revision:
            return repair_start(job, attempt.operation_id)
        if attempt.outcome is Outcome.SUCCEEDED:
            return repair_start(job, attempt.operation_id, attempt.attempt)
        # one under way, retrying or out of attempts: as any row
    if attempt is None:
        return CLOSED if closed else FRESH
    if attempt.revision != revision:
        # An attempt of an older spec: ignored (a newer spec pre-empts its retries).
        return CLOSED if closed else Ready(1, attempt.operation_id, 0, "")
    if attempt.outcome is Outcome.DISPATCHED:
        waited = _timeout(packages, job, attempt, own) + RESULT_MARGIN_SECONDS
        deadline = aware(attempt.dispatched_at) + timedelta(seconds=waited)
        if now < deadline:
            return Running(attempt)
        failed_at = deadline
        message = f"no result from client within {waited} s"
    elif attempt.outcome is Outcome.NOT_ATTEMPTED and attempt.deferrals + 1 < MAX_DEFERRALS:
        if closed:
            return CLOSED
        delay = min(DOWNLOAD_RETRY_SECONDS * 2 ** attempt.deferrals, MAX_DOWNLOAD_RETRY_SECONDS)
        retry_at = aware(attempt.finished_at or attempt.dispatched_at) + timedelta(seconds=delay)
        if now < retry_at:
            return RetryLater(attempt, retry_at, attempt.message, counted=False)
        return Ready(attempt.attempt, attempt.operation_id, attempt.attempt - 1,
                     f"attempt {attempt.attempt}/{limit} again")
    elif attempt.outcome is Outcome.NOT_ATTEMPTED:  # too many in a row: the attempt counts as failed
        failed_at = aware(attempt.finished_at or attempt.dispatched_at)
        message = f"artifact not downloaded in {MAX_DEFERRALS} tries: {attempt.message}"
    elif attempt.outcome is Outcome.REFUSED:
        # Nothing ran, and running it again would be refused again: no retry, only a rerun (or a new
        # revision, above) sends it once more.
        if attempt.rerun < job.rerun and covered and not closed:
            return Ready(1, attempt.operation_id, attempt.attempt, f"rerun {job.rerun}: attempt 1/{limit}")
        return OutOfAttempts(attempt, f"refused by the client: {attempt.message}", Reason.SECURITY_ERROR)
    elif attempt.outcome is Outcome.SUCCEEDED:
        if closed:
            return CLOSED
        have = f"{job.package_name} {installed}" if installed is not None else f"{job.package_name} missing"
        return Ready(1, attempt.operation_id, attempt.attempt, f"drift: client reports {have}")
    else:
        failed_at = aware(attempt.finished_at or attempt.dispatched_at)
        message = attempt.message
    if attempt.attempt >= limit:
        if attempt.rerun < job.rerun and covered:
            if closed:
                return CLOSED
            return Ready(1, attempt.operation_id, attempt.attempt, f"rerun {job.rerun}: attempt 1/{limit}")
        return OutOfAttempts(attempt, message or f"attempt {attempt.attempt}/{limit} failed")
    if closed:
        return CLOSED
    delay = min(job.backoff_seconds * 2 ** min(attempt.attempt - 1, 60), MAX_BACKOFF_SECONDS)
    retry_at = failed_at + timedelta(seconds=delay)
    if now < retry_at:
        return RetryLater(attempt, retry_at, message)
    return Ready(attempt.attempt + 1, attempt.operation_id, attempt.attempt, f"retry {attempt.attempt + 1}/{limit}")


def retry_fields(step: RetryLater, limit: int) -> tuple[Reason, int, str]:
    """Reason, attempts used and message of a row waiting to start its next attempt."""
    a = step.attempt
    if not step.counted:
        text = f"attempt {a.attempt}/{limit} again at {format_precise(step.at)}"
        return Reason.DOWNLOAD_RETRY, a.attempt - 1, f"{text}; not attempted: {step.message or 'download failed'}"
    text = f"retry {a.attempt + 1}/{limit} at {format_precise(step.at)}"
    return Reason.RETRY_BACKOFF, a.attempt, f"{text}; last attempt: {step.message}" if step.message else text


# ------------------------------------------------------------------ one client


@dataclass
class Gate:
    """Rollout on one relay per job: clients in progress, and why new starts are halted."""

    in_progress: dict[str, int] = field(default_factory=dict)
    halted: dict[str, str] = field(default_factory=dict)
    take: bool = False  # new starts of online clients take a slot (a relay pass previews them)


@dataclass
class _Row:
    """A row being decided (made a :class:`Row` at the end)."""

    decision: Decision
    state: ClientState
    reason: Reason | None
    message: str
    attempts: int = 0
    action: ActionKind | None = None
    operation: str | None = None


def client_jobs(index: RelayIndex, client_id: str) -> list[Job]:
    """The jobs reaching a client, in processing order: uninstalls first, then by name."""
    jobs = {job.name: job for job in index.relay_jobs}
    for job in index.client_jobs.get(client_id, ()):
        if job.name in index.revisions:
            jobs[job.name] = job
    return sorted(jobs.values(), key=lambda j: (0 if j.job_type is JobType.UNINSTALL else 1, j.name))


def decisions_for(index: RelayIndex, client: Client, now: datetime) -> list[Decision]:
    """Rules 1-7 for every job reaching the client, in processing order."""
    installed = {item.name: item.version for item in client.installed}
    decisions = [decide(index, job, client, installed.get(job.package_name), now)
                 for job in client_jobs(index, client.id)]
    return resolve_dependencies(resolve_conflicts(decisions), installed)


def finish_client(index: RelayIndex, client: Client, decisions: Sequence[Decision], steps: Sequence[Step | None],
                  gate: Gate, history: History, *, dispatch: bool) -> tuple[list[Row], list[Action]]:
    """Rows and actions of one client: rules 8-10, waits, dedupe and the order of its actions."""
    cid = client.id
    start_state = ClientState.IN_PROGRESS if dispatch else ClientState.PENDING
    start_reason = Reason.IN_PROGRESS if dispatch else Reason.QUEUED
    rows: list[_Row] = []
    new: list[tuple[int, Ready]] = []  # rows that start now, with their step
    repeated: list[tuple[int, Action]] = []  # in-progress actions handed out again
    waiting: list[tuple[int, Ready]] = []
    starting = [False] * len(decisions)
    depth = [0] * len(decisions)  # removals go before the installs that wait for them

    def start_if_free(i: int, step: Ready) -> bool:
        """Start row ``i`` unless its artifact or rollout holds it back (then its reason says which)."""
        d, row = decisions[i], rows[i]
        assert d.kind is not None
        missing = artifact_missing(index.staged, index.unavailable, d.package, d.job.package_name, d.kind, d.version)
        if missing is not None:
            row.state, row.reason, row.message = ClientState.PENDING, Reason.ARTIFACT, missing
            return False
        blocked = rollout_block(gate.halted.get(d.job.name), gate.in_progress.get(d.job.name, 0),
                                d.job.max_concurrent)
        if blocked is not None:
            row.reason, row.message = blocked
            return False
        starting[i] = True
        row.state, row.reason, row.action, row.message = start_state, start_reason, d.kind, step.message
        new.append((i, step))
        return True

    for i, (d, step) in enumerate(zip(decisions, steps)):
        if d.settled:
            assert d.state is not None
            attempts = succeeded_attempts(history, d.job.name, cid) if d.state is ClientState.SUCCEEDED else 0
            reason, message = d.reason, d.message
            if d.state is ClientState.SUCCEEDED:
                reason, message = reboot_fields(history, d.job.name, cid, reason, message)
            rows.append(_Row(d, d.state, reason, message, attempts))
            continue
        row = _Row(d, ClientState.PENDING, None, "")
        rows.append(row)
        limit = max(1, d.job.retry_limit)
        if isinstance(step, Ready):
            row.attempts = step.attempts_so_far
            if d.waits:
                waiting.append((i, step))
            else:
                start_if_free(i, step)
        elif isinstance(step, Running):
            a = step.attempt
            row.state, row.reason, row.action = ClientState.IN_PROGRESS, Reason.IN_PROGRESS, a.action
            row.attempts, row.operation = a.attempt, a.operation_id
            row.message = f"attempt {a.attempt}/{limit} dispatched at {format_precise(a.dispatched_at)}"
            missing = artifact_missing(index.staged, index.unavailable, d.package, d.job.package_name, a.action,
                                       a.version)
            if missing is not None:  # the client may ask for it again: it cannot be served until staged
                row.state, row.reason, row.message = ClientState.PENDING, Reason.ARTIFACT, missing
            else:
                repeated.append((i, repeat_action(d.job, index.revisions[d.job.name], d.package, index.packages,
                                                  d.installed, a, cid)))
        elif isinstance(step, WindowClosed):
            assert d.job.not_after is not None
            row.state, row.reason = ClientState.SKIPPED, Reason.WINDOW_CLOSED
            row.message = f"schedule window closed at {format_precise(d.job.not_after)}"
        elif isinstance(step, OutOfAttempts):
            row.state, row.reason, row.message = ClientState.FAILED, step.reason, step.message
            row.attempts, row.operation = step.attempt.attempt, step.attempt.operation_id
        elif isinstance(step, Repaired):  # shown as any Succeeded row
            row.state, row.reason, row.attempts = ClientState.SUCCEEDED, Reason.DONE, step.attempt.attempt
            if waits_for_reboot(step.attempt):
                row.reason, row.message = Reason.REBOOT_REQUIRED, REBOOT_MESSAGE
        else:
            assert isinstance(step, RetryLater)
            row.reason, row.attempts, row.message = retry_fields(step, limit)
            row.operation = step.attempt.operation_id

    # Waiting rows: a removal frees the install that waits for it when it starts in this
    # plan; a dependency only once the client reports it installed (never here).
    while waiting:
        still: list[tuple[int, Ready]] = []
        moved = False
        for i, step in waiting:
            below = 0
            free = True
            for wait in decisions[i].waits:
                started = [] if wait.until_installed else [depth[k] for k in wait.providers if starting[k]]
                if not started:
                    free = False
                    break
                below = max(below, 1 + max(started))
            if not free:
                still.append((i, step))
                continue
            moved = True
            if start_if_free(i, step):
                depth[i] = below
        if not moved:
            _explain_waits(decisions, rows, [i for i, _ in still], starting)
            break
        waiting = still

    actions = _actions(index, decisions, rows, new, repeated, cid, gate, client.online, depth)
    if not client.online:  # nothing it waits for moves before the client checks in again
        for row in rows:
            if waits_offline(row.state, row.reason):
                row.reason, row.message = Reason.CLIENT_OFFLINE, offline_message(client.last_seen, row.message)
    return [_make_row(index.relay, cid, row) for row in rows], actions


def _explain_waits(decisions: Sequence[Decision], rows: list[_Row], held: list[int], starting: Sequence[bool]) -> None:
    """Rows left waiting say for what; rows that only wait for each other say it is a cycle."""
    held_set = set(held)

    def unmet(i: int) -> list[Wait]:
        return [w for w in decisions[i].waits if w.until_installed or not any(starting[k] for k in w.providers)]

    # A row waits on something real when a row it waits for is not waiting itself
    # (in progress, scheduled, no rollout slot...) or waits on something real.
    real: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i in held_set - real:
            if any(k not in held_set or k in real for w in unmet(i) for k in w.providers):
                real.add(i)
                changed = True
    for i in held:
        first = unmet(i)[0]
        row = rows[i]
        if i in real:
            row.reason = Reason.WAITING_DEPENDENCY if first.until_installed else Reason.WAITING_REMOVAL
            row.message = first.message
        else:
            row.reason, row.message = Reason.DEPENDENCY_CYCLE, f"{first.message} (dependency cycle)"


def _actions(index: RelayIndex, decisions: Sequence[Decision], rows: list[_Row], new: list[tuple[int, Ready]],
             repeated: list[tuple[int, Action]], cid: str, gate: Gate, online: bool,
             depth: Sequence[int]) -> list[Action]:
    """Dedupe the new starts, take their rollout slots, and order the client's actions."""
    ordered: list[tuple[tuple[int, int, str], Action]] = []
    owners: dict[tuple[ActionKind | None, str, str | None], int] = {}  # a change -> the row that makes it
    for i, action in repeated:
        ordered.append(((_kind_order(decisions[i]), 0, decisions[i].job.name), action))
        owners.setdefault((action.kind, action.name, action.version), i)
    for i, step in sorted(new, key=lambda pair: decisions[pair[0]].job.name):
        d, row = decisions[i], rows[i]
        key = (d.kind, d.job.package_name, d.version)
        if key in owners:
            owner = rows[owners[key]]
            row.state, row.operation, row.reason = owner.state, owner.operation, owner.reason
            row.message = f"same change as job {owner.decision.job.name}"
            continue
        owners[key] = i
        assert d.kind is not None
        op = operation_id(d.job.name, index.revisions[d.job.name], d.job.rerun, cid, d.job.package_name, d.version,
                          step.attempt, step.previous_operation)
        row.operation = op
        timeout = d.action_package.installer.timeout_seconds if d.action_package is not None \
            else DEFAULT_TIMEOUT_SECONDS
        ordered.append(((_kind_order(d), depth[i], d.job.name), Action(
            operation_id=op, job=d.job.name, client=cid, kind=d.kind, package=d.action_package,
            name=d.job.package_name, version=d.version, previous_version=d.previous,
            revision=index.revisions[d.job.name], rerun=d.job.rerun, attempt=step.attempt,
            timeout_seconds=timeout)))
        if gate.take and online:
            gate.in_progress[d.job.name] = gate.in_progress.get(d.job.name, 0) + 1
    ordered.sort(key=lambda pair: pair[0])
    return [action for _, action in ordered]


def _kind_order(d: Decision) -> int:
    """Uninstall jobs' actions go first."""
    return 1 if d.install else 0


def repeat_action(job: Job, revision: str, own: Package | None, packages: Mapping[tuple[str, str], Package],
                  installed: str | None, a: Attempt, cid: str) -> Action:
    """The action of an attempt still in progress, as it was handed out."""
    if a.action is ActionKind.UNINSTALL:
        package = packages.get((job.package_name, a.version or "")) or own
        previous = None
    else:
        package = own
        previous = installed if a.action is not ActionKind.INSTALL else None
    timeout = package.installer.timeout_seconds if package is not None else DEFAULT_TIMEOUT_SECONDS
    return Action(operation_id=a.operation_id, job=job.name, client=cid, kind=a.action, package=package,
                  name=job.package_name, version=a.version, previous_version=previous, revision=revision,
                  rerun=a.rerun, attempt=a.attempt, timeout_seconds=timeout)


def succeeded_attempts(history: History, job: str, cid: str) -> int:
    """How many attempts the operation that made a Succeeded row's state took (0 when none is recorded)."""
    if not history:
        return 0
    a = history.get((job, cid))
    return a.attempt if a is not None and a.outcome is Outcome.SUCCEEDED else 0


def reboot_fields(history: History, job: str, cid: str, reason: Reason | None,
                  message: str) -> tuple[Reason | None, str]:
    """A Succeeded row's reason and message: ``rebootRequired`` while the operation that made it so waits for
    the client to reboot (a ``done`` row only: the desired state holds, and it took an installer that asked).

    A row that says ``rebootRequired`` already (one made for another client and replayed) is judged anew.
    """
    if reason is not Reason.DONE and reason is not Reason.REBOOT_REQUIRED:
        return reason, message
    if history and waits_for_reboot(history.get((job, cid))):
        return Reason.REBOOT_REQUIRED, REBOOT_MESSAGE
    return Reason.DONE, ""


def _make_row(relay: str, cid: str, row: _Row) -> Row:
    d = row.decision
    return Row(job=d.job.name, relay=relay, client=cid, state=row.state, action=row.action, name=d.job.package_name,
               version=d.job.package_version, installed_version=d.installed, attempts=row.attempts,
               message=row.message, operation_id=row.operation, reason=row.reason)


def _steps(index: RelayIndex, decisions: Sequence[Decision], client: Client, history: History,
           now: datetime) -> list[Step | None]:
    return [None if d.settled else history_step(d.job, index.revisions[d.job.name], d.package, index.packages,
                                                d.installed, d.closed, history.get((d.job.name, client.id)), now,
                                                covered=rerun_covers(index, d.job, client.id), repair=d.repair)
            for d in decisions]


# ------------------------------------------------------------------ a check-in, a relay


def plan_client_by_rules(index: RelayIndex, client: Client, history: History, usage: Mapping[str, RolloutUsage],
                         now: datetime) -> ClientPlan:
    """What :func:`reconciler.plan.plan_client` must give: one client at check-in."""
    now = aware(now)
    decisions = decisions_for(index, client, now)
    gate = Gate()
    for d in decisions:
        u = usage.get(d.job.name)
        if u is None:
            continue
        gate.in_progress[d.job.name] = u.in_progress
        if d.job.max_failures is not None and failures_exceeded(u.failed, u.targets, d.job.max_failures):
            gate.halted[d.job.name] = halt_message(u.failed, u.targets, d.job.max_failures)
    rows, actions = finish_client(index, client, decisions, _steps(index, decisions, client, history, now), gate,
                                  history, dispatch=True)
    return ClientPlan(client.id, tuple(sorted(rows, key=lambda r: r.job)), tuple(actions))


def plan_relay_by_rules(index: RelayIndex, clients: Sequence[Client], history: History, now: datetime) -> Plan:
    """What :func:`reconciler.plan.plan_relay` must give: every client, one after another in id order.

    First every row's history tells which clients are in progress (online
    ones hold a slot) and which failed, and so which jobs are halted; then
    clients start in id order while slots are free.
    """
    now = aware(now)
    ordered = sorted(clients, key=lambda c: c.id)
    planned = [(c, decisions_for(index, c, now)) for c in ordered]
    steps = [_steps(index, decisions, c, history, now) for c, decisions in planned]
    gate = Gate(take=True)
    failed: dict[str, int] = {}
    targets: dict[str, int] = {}
    for (client, decisions), client_steps in zip(planned, steps):
        for d, step in zip(decisions, client_steps):
            name = d.job.name
            if d.settled:
                targets[name] = targets.get(name, 0) + (d.state is not ClientState.SKIPPED)
            elif not isinstance(step, WindowClosed):
                targets[name] = targets.get(name, 0) + 1
                if isinstance(step, OutOfAttempts):
                    failed[name] = failed.get(name, 0) + 1
                elif isinstance(step, Running) and client.online:
                    gate.in_progress[name] = gate.in_progress.get(name, 0) + 1
    jobs = {job.name: job for job in index.specs.jobs if job.name in index.revisions}
    for name, job in jobs.items():
        if job.max_failures is not None and failures_exceeded(failed.get(name, 0), targets.get(name, 0),
                                                               job.max_failures):
            gate.halted[name] = halt_message(failed.get(name, 0), targets.get(name, 0), job.max_failures)

    rows: list[Row] = []
    actions: list[Action] = []
    for (client, decisions), client_steps in zip(planned, steps):
        client_rows, client_actions = finish_client(index, client, decisions, client_steps, gate, history,
                                                    dispatch=False)
        rows += client_rows
        actions += client_actions

    relay_job_names = {job.name for job in index.relay_jobs}
    all_rows: list[Row] = []
    rollups: list[JobRollup] = []
    usage: dict[str, RolloutUsage] = {}
    for name in sorted(jobs):
        job_rows = [r for r in rows if r.job == name]
        if not job_rows and name not in relay_job_names:
            continue  # a clients job naming none of this relay's clients does not reach it
        all_rows += job_rows
        counts = count_states(job_rows)
        total = len(job_rows)
        halted = jobs[name].max_failures is not None and failures_exceeded(
            counts[ClientState.FAILED.value], total - counts[ClientState.SKIPPED.value], jobs[name].max_failures)
        # Scheduled: every row still to run waits for the job's notBefore; ClientsOffline: for offline clients.
        scheduled, offline = parked(r.reason for r in job_rows if r.state is ClientState.PENDING)
        rollups.append(JobRollup(name, job_state(counts, suspended=jobs[name].suspend, halted=halted,
                                                 scheduled=scheduled, offline=offline), counts))
        online = {c.id for c in clients if c.online}
        usage[name] = RolloutUsage(
            in_progress=sum(1 for r in job_rows if r.state is ClientState.IN_PROGRESS and r.client in online),
            failed=counts[ClientState.FAILED.value], targets=total - counts[ClientState.SKIPPED.value])
    return Plan(relay=index.relay, rows=tuple(all_rows), actions=tuple(actions), jobs=tuple(rollups), usage=usage)
