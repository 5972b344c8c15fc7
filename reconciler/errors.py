"""What went wrong, typed by what happens next.

Every failure a long-running loop (HQ, a relay, an agent) meets is one of
three outcomes, each with a machine-readable :class:`Cause`:

* **stalled**: only a human commit can fix it (invalid specs, a relay the
  topology does not name, an artifact whose bytes do not match its spec).
  Not retried: the loop waits for the input to change.
* **waiting**: something outside must change first (credentials, a ref that
  does not exist yet, a full disk, a bug in this software). Retried after a
  delay that doubles from 5 s up to 5 min.
* **transient**: the network, a timeout, a lost race. Retried soon, with the
  same doubling delay.

Exceptions are mapped at the boundary where they arise (:mod:`gitstore` turns
git's stderr into a cause), and each loop turns a pass's (result, error) into
its status errors and its next wake-up in one place, through
:func:`problem_of` and :func:`retry_delay`.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

FIRST_RETRY_SECONDS: Final = 5.0
MAX_RETRY_SECONDS: Final = 300.0
MAX_MESSAGE: Final = 500


class Kind(StrEnum):
    STALLED = "stalled"
    WAITING = "waiting"
    TRANSIENT = "transient"


class Cause(StrEnum):
    """Why, for machines: status files carry it next to the message."""

    INVALID_SPECS = "invalidSpecs"  # the commit does not validate
    UNKNOWN_RELAY = "unknownRelay"  # the accepted topology does not name this relay
    ARTIFACT_MISMATCH = "artifactMismatch"  # an artifact's bytes differ from its spec's sha256
    AUTHENTICATION = "authentication"  # the origin refused the credentials
    MISSING_REF = "missingRef"  # a branch, ref or commit is not (yet) on the origin
    DISK_FULL = "diskFull"
    INTERNAL = "internal"  # a bug: its traceback is logged
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # the origin or a parent relay cannot be reached
    PUSH_REJECTED = "pushRejected"  # someone else pushed first, every time we tried
    GIT = "git"  # any other git failure


KIND_OF: Final[Mapping[Cause, Kind]] = MappingProxyType({
    Cause.INVALID_SPECS: Kind.STALLED,
    Cause.UNKNOWN_RELAY: Kind.STALLED,
    Cause.ARTIFACT_MISMATCH: Kind.STALLED,
    Cause.AUTHENTICATION: Kind.WAITING,
    Cause.MISSING_REF: Kind.WAITING,
    Cause.DISK_FULL: Kind.WAITING,
    Cause.INTERNAL: Kind.WAITING,
    Cause.TIMEOUT: Kind.TRANSIENT,
    Cause.UNREACHABLE: Kind.TRANSIENT,
    Cause.PUSH_REJECTED: Kind.TRANSIENT,
    Cause.GIT: Kind.TRANSIENT,
})


class ReconcilerError(Exception):
    """A failure with a known cause; ``message`` is safe to publish (no credentials)."""

    def __init__(self, message: str, cause: Cause) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause

    @property
    def kind(self) -> Kind:
        return KIND_OF[self.cause]


@dataclass(frozen=True)
class Problem:
    """One failure as a loop reports it: what happens next, why, and a one-line message."""

    kind: Kind
    cause: Cause
    message: str

    @property
    def retried(self) -> bool:
        return self.kind is not Kind.STALLED

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "reason": self.cause.value, "message": self.message}


def problem(cause: Cause, message: str) -> Problem:
    """A :class:`Problem` of ``cause`` with ``message`` on one line, cut to a readable length."""
    text = " ".join(message.split())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return Problem(KIND_OF[cause], cause, text)


def problem_of(error: BaseException) -> Problem:
    """The outcome of an exception: its own cause if it has one; a full disk, a timeout, or a bug."""
    if isinstance(error, ReconcilerError):
        return problem(error.cause, error.message)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return problem(Cause.DISK_FULL, f"no space left on device: {error.filename or ''}".rstrip(": "))
    if isinstance(error, TimeoutError):
        return problem(Cause.TIMEOUT, f"timed out: {error}".rstrip(": "))
    return problem(Cause.INTERNAL, f"internal error: {type(error).__name__}: {error}".rstrip(": "))


def retry_delay(failures: int) -> float:
    """Seconds before retrying after ``failures`` failures in a row: 5 s, doubling, at most 5 min."""
    if failures <= 0:
        return 0.0
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2.0 ** min(failures - 1, 16))


def next_wakeup(poll_seconds: float, failure: Problem | None, failures: int) -> float:
    """How long a loop sleeps without a change: the poll interval, or sooner to retry a failure.

    A stalled failure waits for a change (the poll interval or a webhook);
    waiting and transient ones are retried after :func:`retry_delay`.
    """
    if failure is None or not failure.retried:
        return poll_seconds
    return min(poll_seconds, retry_delay(failures))


# ------------------------------------------------------------------ git


# Checked in this order, on git's text with every quoted name (a URL, a path, a ref) blanked
# out first, so a repository or branch called "timeout" cannot pass for a timeout.
_GIT_CAUSES: Final = (
    (Cause.MISSING_REF, ("couldn't find remote ref", "unknown revision", "not a valid object name",
                         "not in the mirror", "does not exist at", "bad revision", "invalid commit")),
    (Cause.AUTHENTICATION, ("authentication failed", "could not read username", "could not read password",
                            "permission denied", "access denied", "http basic", "the requested url returned "
                            "error: 401", "the requested url returned error: 403", "invalid credentials")),
    (Cause.TIMEOUT, ("timed out",)),
    (Cause.UNREACHABLE, ("could not resolve host", "connection refused", "unable to access",
                         "does not appear to be a git repository", "no route to host", "network is unreachable",
                         "could not connect", "failed to connect", "connection reset", "no such file or directory",
                         "the remote end hung up", "unable to look up")),
)
_QUOTED: Final = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def git_cause(detail: str) -> Cause:
    """The cause git's (C-locale) error text names; :attr:`Cause.GIT` when none matches."""
    text = _QUOTED.sub("''", detail).lower()
    if "no space left on device" in text:
        return Cause.DISK_FULL
    for cause, needles in _GIT_CAUSES:
        if any(needle in text for needle in needles):
            return cause
    return Cause.GIT
