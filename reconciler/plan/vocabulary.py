"""The plan's vocabulary: states, actions, rows, attempts, and how a job's rows roll up.

Values only (StrEnums, frozen dataclasses, NamedTuples), shared by the
readable rules (:mod:`reconciler.plan.rules`), the fast engine
(:mod:`reconciler.plan.engine`) and everything that reads a plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple, NewType

from reconciler.specs import Package
from reconciler.times import format_time

ClientId = NewType("ClientId", str)
OperationId = NewType("OperationId", str)

# An action with no result within the installer timeout plus this margin
# counts as a failed attempt ("no result from client within N s").
RESULT_MARGIN_SECONDS = 60

# Retry delays double per attempt; cap them so a large retry.limit cannot
# overflow a datetime (about three years).
MAX_BACKOFF_SECONDS = 10**8

# A client that could not download an action's artifact did not attempt it:
# the same attempt goes out again after this delay, doubling each time, and no
# attempt is used up; after MAX_DEFERRALS such returns in a row (about 17 hours
# of trying) the attempt counts as failed, so a relay that cannot serve an
# artifact ends in Failed rather than retrying for ever.
DOWNLOAD_RETRY_SECONDS = 60
MAX_DOWNLOAD_RETRY_SECONDS = 3600
MAX_DEFERRALS = 20


class ClientState(StrEnum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CONFLICT = "Conflict"
    SUSPENDED = "Suspended"


class JobState(StrEnum):
    """A job's state on a relay, a destination or overall; declared in precedence order (DESIGN section 4)."""

    INVALID = "Invalid"
    SUSPENDED = "Suspended"
    NO_TARGETS = "NoTargets"
    HALTED = "Halted"
    IN_PROGRESS = "InProgress"
    SCHEDULED = "Scheduled"  # every row still to run waits for the job's future notBefore
    CLIENTS_OFFLINE = "ClientsOffline"  # every row still to run waits for a client that is offline
    FAILED = "Failed"
    COMPLETED = "Completed"

    def worse_than(self, other: JobState) -> bool:
        """Whether this state takes precedence over ``other`` when both would apply."""
        return _JOB_STATE_RANK[self] < _JOB_STATE_RANK[other]


_JOB_STATE_RANK = {state: rank for rank, state in enumerate(JobState)}


class Reason(StrEnum):
    """Why a row is in its state, for machines: filter and count on it, never parse the message."""

    DONE = "done"  # Succeeded: the desired state holds
    OTHER_VERSION = "otherVersion"  # Succeeded: an uninstall of one version, another is present
    SUSPENDED = "suspended"
    PACKAGE_UNDEFINED = "packageUndefined"
    REQUIREMENTS = "requirements"  # Skipped: a requirement of the package is not met
    NEWER_PRESENT = "newerPresent"  # Skipped: a newer version is installed, no allowDowngrade
    WINDOW_CLOSED = "windowClosed"  # Skipped: past notAfter, nothing new starts
    CONFLICT = "conflict"
    DEPENDENCY_MISSING = "dependencyMissing"  # Skipped: no job provides a dependency
    SCHEDULED = "scheduled"  # Pending until notBefore
    QUEUED = "queued"  # Pending: its action goes out at the client's next check-in
    IN_PROGRESS = "inProgress"  # handed to the client, no result yet
    RETRY_BACKOFF = "retryBackoff"  # Pending: a failed attempt is retried later
    DOWNLOAD_RETRY = "downloadRetry"  # Pending: the client could not download the artifact; no attempt used
    ROLLOUT_SLOT = "rolloutSlot"  # Pending: maxConcurrent clients are in progress
    HALTED = "halted"  # Pending: maxFailures exceeded on this relay
    WAITING_DEPENDENCY = "waitingForDependency"
    DEPENDENCY_CYCLE = "dependencyCycle"
    WAITING_REMOVAL = "waitingForRemoval"  # an uninstall of the installed version goes first
    ARTIFACT = "waitingForArtifact"  # the relay has not staged the package's artifact
    FAILED = "failed"  # out of attempts
    NOT_REGISTERED = "notRegistered"  # HQ's: a client a job names that no relay knows
    CLIENT_OFFLINE = "clientOffline"  # Pending: the client has not checked in lately (last contact in the message)
    SECURITY_ERROR = "securityError"  # Failed: the client refused an action its signed manifest does not cover
    REBOOT_REQUIRED = "rebootRequired"  # Succeeded: the installer asked for a reboot; the client has not rebooted


REBOOT_MESSAGE = "reboot required"
"""The message of a Succeeded row whose client waits for a reboot (reason ``rebootRequired``)."""


# Pending reasons an offline client's row keeps: they say why it waits whether the client is up or not.
_OFFLINE_KEEPS = frozenset({Reason.SCHEDULED, Reason.HALTED})
# Pending reasons that leave a job waiting for time or for people, not running: see rollup().
PARKED_REASONS = frozenset({Reason.SCHEDULED, Reason.CLIENT_OFFLINE})


class ActionKind(StrEnum):
    INSTALL = "install"
    UPGRADE = "upgrade"
    DOWNGRADE = "downgrade"
    UNINSTALL = "uninstall"


class Outcome(StrEnum):
    DISPATCHED = "dispatched"  # handed to the client, no result yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_ATTEMPTED = "notAttempted"  # the client could not fetch the artifact; nothing ran
    REFUSED = "refused"  # the client refused it: it does not match HQ's signed manifest; nothing ran


@dataclass(frozen=True, slots=True)
class Installed:
    name: str
    version: str
    # how the client knows (protocol.INVENTORY_SOURCES): its own receipt, or the package's detection rule
    source: str = "reconciler"


@dataclass(frozen=True, slots=True)
class Client:
    """What the relay knows of one client, as last reported."""

    id: str
    relay: str
    os: str | None = None
    arch: str | None = None
    free_disk_mb: int | None = None
    labels: tuple[tuple[str, str], ...] = ()  # sorted
    installed: tuple[Installed, ...] = ()  # sorted by name, one per name
    online: bool = True  # offline clients hold no rollout slot
    last_seen: datetime | None = None  # its last check-in: an offline client's rows say it


@dataclass(frozen=True, slots=True)
class Attempt:
    """The latest operation the relay dispatched for one (job, client)."""

    operation_id: str
    job: str
    client: str
    revision: str  # plan revision (job + package) the attempt belongs to
    rerun: int  # the job's spec.rerun when dispatched
    attempt: int  # 1-based number within (revision, rerun)
    action: ActionKind
    version: str | None  # package version acted on
    outcome: Outcome
    dispatched_at: datetime
    finished_at: datetime | None = None
    message: str = ""
    deferrals: int = 0  # times in a row this attempt came back not attempted before this operation
    # succeeded, its installer asked for a reboot, and the client has not reported another boot id since
    reboot_pending: bool = False


def waits_for_reboot(attempt: Attempt | None) -> bool:
    """Whether a Succeeded row made by ``attempt`` shows that its client waits for a reboot."""
    return attempt is not None and attempt.reboot_pending and attempt.outcome is Outcome.SUCCEEDED


History = Mapping[tuple[str, str], Attempt]
"""Latest attempt per (job name, client id)."""


class Action(NamedTuple):
    operation_id: str
    job: str
    client: str
    kind: ActionKind
    package: Package | None  # the package spec to install; for uninstall, the job's package if known
    name: str  # software name
    version: str | None  # version to install, or the installed version to remove
    previous_version: str | None  # for upgrade/downgrade: the installed version to remove first
    revision: str
    rerun: int
    attempt: int
    timeout_seconds: int


class Row(NamedTuple):
    """The state of one job on one client.

    ``attempts`` counts the attempts of the current series (the job's plan
    revision and rerun) for a row with work under way or failed: in
    progress, waiting to retry, ``Failed``, or about to start (then the
    attempts before this one). A settled row (``Succeeded``, ``Skipped``,
    ``Conflict``, ``Suspended``, waiting for its schedule) shows 0: it is
    built without looking at history, which keeps a relay pass over 10^6
    rows fast. ``operation_id`` is set for a row with an action (the
    operation handed out or in progress) and for ``Failed`` rows and rows
    waiting to retry (the operation whose failure they show).

    Rows and actions are NamedTuples, not frozen dataclasses: a relay pass
    makes 10^6 rows, and a tuple is built (and freed) in half the time of a
    dataclass instance with its ``__dict__``. They are values all the same:
    compare them with ``==``, change a copy with ``_replace``.
    """

    job: str
    relay: str
    client: str
    state: ClientState
    action: ActionKind | None  # what is (or would be) done now; None when nothing
    name: str  # software name
    version: str | None  # desired version (None: uninstall of any version)
    installed_version: str | None
    attempts: int
    message: str
    operation_id: str | None = None
    reason: Reason | None = None  # set on every row a plan makes


@dataclass(frozen=True)
class JobRollup:
    job: str
    state: JobState
    counts: Mapping[str, int]  # ClientState value -> number of rows, every state present


@dataclass(frozen=True)
class ClientPlan:
    client: str
    rows: tuple[Row, ...]  # sorted by job
    actions: tuple[Action, ...]  # in execution order


@dataclass(frozen=True)
class Plan:
    relay: str
    rows: tuple[Row, ...]  # sorted by (job, client)
    actions: tuple[Action, ...]  # by client id, each client's in execution order
    jobs: tuple[JobRollup, ...]  # sorted by job; every job that reaches the relay
    # per job: what rollout limits count on these rows (online clients in progress, Failed, not Skipped)
    usage: Mapping[str, RolloutUsage] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutUsage:
    """Per job on one relay: clients in progress (online only) and failed, for rollout limits."""

    in_progress: int = 0
    failed: int = 0  # rows in state Failed
    targets: int = 0  # rows that are not Skipped, for percentage maxFailures


def offline_message(last_seen: datetime | None, message: str) -> str:
    """An offline client's Pending row: ``client offline, last contact 2026-11-30T08:00:00Z; attempt 1/3``."""
    contact = format_time(last_seen) if last_seen is not None else "unknown"
    return f"client offline, last contact {contact}" + (f"; {message}" if message else "")


def waits_offline(state: ClientState, reason: Reason | None) -> bool:
    """Whether an offline client's row with this state and reason waits for the client to come back.

    Every Pending row does (nothing moves before the client checks in again)
    except those waiting for the schedule or held by a Halted job: they say
    why they wait whether the client is up or not. An InProgress row stays
    InProgress: its installer may still report, and its timeout bounds it.
    """
    return state is ClientState.PENDING and reason not in _OFFLINE_KEEPS


def parse_max_failures(value: int | str | None) -> tuple[int | None, int | None]:
    """(count, percent): ``3`` -> (3, None); ``"10%"`` -> (None, 10); None -> (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return None, int(value.strip().rstrip("%"))
    return int(value), None


def failures_exceeded(failed: int, targets: int, max_failures: int | str | None) -> bool:
    """Whether ``failed`` rows exceed ``maxFailures`` (a count, or a share of ``targets``)."""
    count, percent = parse_max_failures(max_failures)
    if count is not None:
        return failed > count
    if percent is not None:
        return failed * 100 > percent * targets
    return False


def halt_message(failed: int, targets: int, max_failures: int | str | None) -> str:
    count, percent = parse_max_failures(max_failures)
    if percent is not None:
        return f"rollout halted: {failed} of {targets} failed, more than maxFailures {percent}%"
    return f"rollout halted: {failed} failed, more than maxFailures {count}"


def count_states(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per state, every ClientState value present."""
    counts = dict.fromkeys((s.value for s in ClientState), 0)
    for row in rows:
        counts[row.state] += 1
    return counts


def rollup(job: str, rows: Sequence[Row], *, suspended: bool = False,
           max_failures: int | str | None = None) -> JobRollup:
    """A job's state on a relay from its rows (DESIGN section 4), and the counts by state.

    In order: ``Suspended`` (the job is suspended, or every row is),
    ``NoTargets`` (no rows), ``Halted`` (Failed rows exceed ``max_failures``,
    the job's ``rollout.maxFailures``, counted against its non-Skipped rows),
    ``InProgress`` (any row InProgress, or Pending for another reason than
    the job's future schedule or an offline client), ``Scheduled`` (rows
    Pending only until the job's ``notBefore``, or for offline clients),
    ``ClientsOffline`` (rows Pending only for offline clients), ``Failed``
    (any Failed or Conflict), else ``Completed``. (``Invalid`` is HQ's, for
    a commit that did not validate.)
    """
    scheduled, offline = parked({row.reason for row in rows if row.state is ClientState.PENDING})
    return _rollup(job, count_states(rows), suspended=suspended, max_failures=max_failures, scheduled=scheduled,
                   offline=offline)


def parked(reasons: Iterable[Reason | str | None]) -> tuple[bool, bool]:
    """(scheduled, offline) for :func:`job_state`, from the reasons of a job's Pending rows.

    Pending rows that all wait for the schedule or for offline clients park
    the job: ``Scheduled`` when any waits for the schedule (it moves on its
    own then), else ``ClientsOffline``.
    """
    seen = set(reasons)
    if not seen <= PARKED_REASONS:
        return False, False
    return Reason.SCHEDULED in seen, Reason.CLIENT_OFFLINE in seen and Reason.SCHEDULED not in seen


def _rollup(job: str, counts: dict[str, int], *, suspended: bool, max_failures: int | str | None,
            scheduled: bool = False, offline: bool = False) -> JobRollup:
    total = sum(counts.values())
    halted = max_failures is not None and failures_exceeded(
        counts[ClientState.FAILED], total - counts[ClientState.SKIPPED], max_failures)
    return JobRollup(job=job, state=job_state(counts, suspended=suspended, halted=halted, scheduled=scheduled,
                                              offline=offline),
                     counts=counts)


def job_state(counts: Mapping[str, int], *, suspended: bool = False, halted: bool = False,
              waiting: bool = False, invalid: bool = False, scheduled: bool = False,
              offline: bool = False) -> JobState:
    """Roll client counts up to a job state (DESIGN section 4): the worst state that applies.

    ``Invalid`` (the job cannot be planned, or HQ's commit did not validate),
    ``Suspended`` (the job is, or every row is), ``NoTargets`` (no rows and
    nothing ``waiting`` for a relay that has not reported yet), ``Halted``,
    ``InProgress`` (any InProgress row, any Pending row unless ``scheduled``
    or ``offline``, or ``waiting``), ``Scheduled`` (Pending rows that all
    wait for the job's future ``notBefore``, or some for offline clients:
    ``scheduled`` says so), ``ClientsOffline`` (Pending rows that all wait
    for offline clients: ``offline`` says so; see :func:`parked`),
    ``Failed`` (any Failed or Conflict row), else ``Completed``. A job that reaches no client yet but
    still waits for a relay is InProgress, not NoTargets: the missing relay
    may well have clients.
    """
    total = sum(counts.values())
    pending = bool(counts.get(ClientState.PENDING.value, 0))
    applies = {
        JobState.INVALID: invalid,
        JobState.SUSPENDED: suspended or bool(total and counts.get(ClientState.SUSPENDED.value, 0) == total),
        JobState.NO_TARGETS: total == 0 and not waiting,
        JobState.HALTED: halted,
        JobState.IN_PROGRESS: waiting or (pending and not (scheduled or offline))
                              or bool(counts.get(ClientState.IN_PROGRESS.value, 0)),
        JobState.SCHEDULED: pending and scheduled,
        JobState.CLIENTS_OFFLINE: pending and offline and not scheduled,
        JobState.FAILED: bool(counts.get(ClientState.FAILED.value, 0) or counts.get(ClientState.CONFLICT.value, 0)),
    }
    state = JobState.COMPLETED
    for candidate, applied in applies.items():
        if applied and candidate.worse_than(state):
            state = candidate
    return state
