"""Installer processes: how they start, how they are told apart, how they are stopped.

Every installer command runs in a session (POSIX) or process group (Windows)
apart from the agent's: its own (``detect``), or its supervisor's
(``install``, ``uninstall``; see ``supervisor.py``). So a timeout can kill it
together with whatever it forked, and a signal aimed at the agent does not
reach it. The price is that such a command outlives the agent. So a running
command is described by a :class:`ProcessRecord` (pid, start time, timeout)
kept on disk, and :func:`settle_orphan` lets a later agent wait for a command
it finds recorded, up to what is left of its timeout, then kill its group.

The start time (Linux: ``/proc/<pid>/stat`` field 22, with the boot id) is
what keeps a recycled pid from being waited for or killed. Elsewhere only the
pid is recorded: on other POSIX systems a process counts as the recorded one
if it has that pid and is still in the recorded session (its own, or its
supervisor's), which a recycled pid rarely is; on Windows a process cannot be
recognised at all, so it is not waited for (a known gap).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from reconciler.agent.errors import InstallError
from reconciler.times import parse_time, utc_now

log = logging.getLogger("reconciler.agent")

# Characters of a command's output kept from its end when it ends: the most an agent's --output-tail
# may ask for. The secret masking runs over all of it, and the status message keeps --output-tail.
OUTPUT_TAIL_CHARS = 8000
DEFAULT_OUTPUT_TAIL = 2000
ORPHAN_POLL_SECONDS = 0.05  # how often a restarted agent looks whether an orphaned command ended
KILL_GRACE_SECONDS = 10.0  # how long a SIGKILLed orphan may take to go


def session_options() -> dict[str, Any]:
    """``Popen`` options that put a command in its own session (POSIX) or process group (Windows)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: its exit code (``None`` if killed on timeout) and output tail.

    ``error`` says why it could not even start (then there is no exit code).
    """

    exit_code: int | None
    output: str
    timed_out: bool
    error: str | None = None


def output_tail(handle: BinaryIO, limit: int = OUTPUT_TAIL_CHARS) -> str:
    """The last ``limit`` characters of a command's output, decoded leniently (never lone surrogates)."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 4 * limit))
    text = handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


@dataclass(frozen=True)
class ProcessRecord:
    """A running installer command, as recorded while something waits on it.

    ``start_time`` identifies the process beyond its pid, which the system
    hands out again once the process is gone: ``<boot id>:<start ticks>`` on
    Linux, ``None`` where there is no cheap way to read it (module docstring).
    ``started_at`` and ``timeout_seconds`` let a restarted agent give an orphan
    what is left of its timeout, not a new one. ``session`` is the session the
    command runs in when it does not lead one itself (an installer runs in its
    supervisor's); ``None`` means its own.
    """

    pid: int
    start_time: str | None
    started_at: str
    timeout_seconds: float
    session: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "startTime": self.start_time, "startedAt": self.started_at,
                               "timeoutSeconds": self.timeout_seconds}
        if self.session is not None:
            out["session"] = self.session
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ProcessRecord:
        """Parse a stored record; ``ValueError`` for any shape we did not write."""
        if not isinstance(data, dict):
            raise ValueError("process record is not an object")
        pid, start_time = data.get("pid"), data.get("startTime")
        started_at, timeout = data.get("startedAt"), data.get("timeoutSeconds")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"invalid pid {pid!r}")
        if start_time is not None and not isinstance(start_time, str):
            raise ValueError(f"invalid startTime {start_time!r}")
        if not isinstance(started_at, str):
            raise ValueError(f"invalid startedAt {started_at!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"invalid timeoutSeconds {timeout!r}")
        session = data.get("session")
        if session is not None and (isinstance(session, bool) or not isinstance(session, int) or session <= 0):
            raise ValueError(f"invalid session {session!r}")
        return cls(pid, start_time, started_at, float(timeout), session)


# Called with the record once a command has started, and with None once it has ended.
ProcessHook = Callable[[ProcessRecord | None], None]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, "<boot id>:<start ticks>")`` from Linux ``/proc``; ``None`` if unreadable or gone.

    The boot id makes the identity unique across reboots too: start ticks
    count from boot, and early boot runs much the same way every time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
    # field 2 (comm) is in parentheses and may hold spaces or ")"; field 3 follows the last ")"
    fields = stat[stat.rfind(")") + 1:].split()
    if len(fields) < 20:
        return None
    return fields[0], f"{boot_id}:{fields[19]}"  # fields 3 (state) and 22 (starttime)


def process_start_time(pid: int) -> str | None:
    """The identity of process ``pid`` that survives pid reuse; ``None`` off Linux (or if gone)."""
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def is_running(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs; a recycled pid or a zombie does not count.

    A zombie is an orphan that has ended: its parent is now init (or whatever
    adopted it), which may reap it late or, in some containers, never.
    """
    if record.start_time is not None:
        stat = _proc_stat(record.pid)
        return stat is not None and stat[0] not in ("Z", "X", "x") and stat[1] == record.start_time
    if os.name == "nt":
        return False  # a Windows pid cannot be matched to the recorded process (module docstring)
    try:
        # the command's session is its own or its supervisor's; a recycled pid is rarely in it
        return os.getsid(record.pid) == (record.session if record.session is not None else record.pid)
    except OSError:
        return False


def settle_orphan(record: ProcessRecord) -> str:
    """Make sure a recorded command no longer runs, so it never runs beside its own re-run.

    Waits for it while what is left of its timeout runs (measured from the
    recorded start), then kills its process group, which holds whatever it
    forked (and its supervisor, if that still runs). A process
    whose identity does not match the record is someone else's and is left
    alone. Returns what happened, for the log; :class:`InstallError` if the
    process survives SIGKILL (then running the operation again is refused).
    """
    if not is_running(record):
        if record.start_time is None and os.name == "nt":
            return f"pid {record.pid} cannot be checked on Windows; assumed gone"
        return f"pid {record.pid} is no longer running"
    started = parse_time(record.started_at)
    # wall-clock time on both sides (not an agent's injected clock): this is about a real process
    elapsed = (utc_now() - started).total_seconds() if started is not None else 0.0
    remaining = min(max(record.timeout_seconds - elapsed, 0.0), record.timeout_seconds)
    log.warning("an interrupted installer command (pid %d) is still running; waiting up to %.0f s for it "
                "before killing it", record.pid, remaining)
    deadline = time.monotonic() + remaining
    while is_running(record):
        left = deadline - time.monotonic()
        if left <= 0:
            return kill_orphan(record)
        time.sleep(min(ORPHAN_POLL_SECONDS, left))
    return f"pid {record.pid} ended by itself"


def kill_orphan(record: ProcessRecord) -> str:
    """SIGKILL the orphan's process group (its own, or its supervisor's) and see it go."""
    if os.name != "nt":
        try:
            os.killpg(os.getpgid(record.pid), signal.SIGKILL)
        except ProcessLookupError:
            pass  # ended between the check and the kill
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while is_running(record):
        if time.monotonic() >= deadline:
            raise InstallError(f"an interrupted installer command (pid {record.pid}) survived SIGKILL; "
                               f"not running another beside it")
        time.sleep(ORPHAN_POLL_SECONDS)
    return f"pid {record.pid} killed after its {record.timeout_seconds:g} s timeout"


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill a command we started and everything it started; an installer often forks helpers."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        proc.kill()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
