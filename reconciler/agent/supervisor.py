"""Installer commands run under a small supervisor process, so their exit status outlives the agent.

Only a process's parent can learn how it ended. If the agent itself were the
installer's parent, a ``kill -9`` of the agent mid-install would lose the
exit status for good, and the restarted agent could only run the installer a
second time. So the agent starts this module with its own interpreter
(``sys.executable``), in a session of its own, and the supervisor starts the
installer, waits for it, enforces its timeout, and writes how it ended to
disk. The agent waits for that file, not for the installer. On POSIX the
installer stays in its supervisor's process group: killing that group (a
timeout, or whoever kills the agent's process tree) kills the supervisor, the
installer and whatever it forked together, as a crash would. At the timeout
the supervisor therefore records the result first and then kills its own
group. On Windows the installer gets a process group of its own and a
timeout kills its process tree, as before. Nothing here forks without exec.

Each command of an operation is a *step* (``install-<version>``,
``uninstall-<version>``) with numbered *attempts* under the operation's
directory next to its journal entry (``journal/<key>/<step>/<n>/``). An
attempt directory holds:

``request.json``
    argv, working directory and timeout, written by the agent before it
    starts the supervisor (the environment is passed by inheritance, so no
    secrets from it land on disk).
``lock``
    held (``flock``; ``msvcrt.locking`` on Windows) by the supervisor for its
    whole life. The operating system drops it when the supervisor ends, by
    any means, so "locked" means "the supervisor runs" with no pid to reuse.
``claim``
    created with ``O_EXCL`` by whoever gets there first: the supervisor,
    before it starts the installer, or a restarted agent giving up an attempt
    whose supervisor never got going (``abandoned``). A supervisor that finds
    the claim taken exits without running anything, so an attempt runs its
    installer at most once, whatever the timing.
``installer.json``
    "started installer pid X" (:class:`ProcessRecord`), written right after
    the installer starts, so a dead supervisor's orphan can still be waited
    for or killed at its timeout.
``orphaned.json``
    written by an agent that found the installer running after its
    supervisor died, before it waits for it: however many agents are killed
    while waiting, the installer is known to have run.
``output``, ``result.json``
    the installer's combined output, and how it ended (exit code, timeout,
    output tail, or why it could not start), written atomically last.
``supervisor.log``
    the supervisor's own output, quoted if it ends without a result.

A step with a result is never run again: its result is the answer, however
often the operation is resumed. A step whose latest attempt has no result is
settled first (wait for a live supervisor, which kills the installer at its
timeout; wait for or kill an orphaned installer whose supervisor is gone, as
``processes.settle_orphan`` does). When the supervisor died alone after
starting the installer (its own ``kill -9``) and the installer ran on, the
exit status is lost: the attempt is recorded as failed with "exit status
unknown" and the output the installer wrote, and is not run again for the
operation; whether to try again is the relay's retry policy, under a new
operation. A new attempt starts when the installer never started, or was
gone together with its supervisor when the agent looked (a crash, a
reboot, or a service manager that stopped the agent's whole process tree:
interrupted installers run again, as after any crash; the systemd unit in
``contrib/`` stops only the agent, so an upgrade lets installers finish).
One window stays open: a supervisor killed between starting the installer
and recording it leaves an installer nobody knows of, and the step may run
again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler.agent.errors import InstallError
from reconciler.agent.processes import (
    KILL_GRACE_SECONDS,
    ORPHAN_POLL_SECONDS,
    CommandResult,
    ProcessRecord,
    is_running,
    kill_orphan,
    kill_tree,
    output_tail,
    process_start_time,
    session_options,
    settle_orphan,
)
from reconciler.fileio import fsync_dir, quarantine, write_json_atomic
from reconciler.times import format_time, parse_time, utc_now

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

log = logging.getLogger("reconciler.agent")

REQUEST = "request.json"
LOCK = "lock"
CLAIM = "claim"
INSTALLER = "installer.json"
OUTPUT = "output"
RESULT = "result.json"
ORPHANED = "orphaned.json"  # an agent saw the installer running without its supervisor
SUPERVISOR_LOG = "supervisor.log"
ABANDONED = "abandoned\n"
FALLBACK_TIMEOUT_SECONDS = 600.0  # only for an attempt whose request cannot be read
LOG_TAIL_CHARS = 500

# The supervisor is this module, started as ``python -c <bootstrap> <root> <attempt dir>``:
# the directory holding this very ``reconciler`` package is *appended* to sys.path,
# so it is found even when the agent runs from a source checkout, yet never
# shadows the standard library (as it would first on the path, were it
# site-packages). Its working directory is the attempt directory, which holds no
# Python modules.
_IMPORT_ROOT = Path(__file__).resolve().parents[2]
_BOOTSTRAP = ("import sys; sys.path.append(sys.argv.pop(1)); "
              "from reconciler.agent.supervisor import main; sys.exit(main(sys.argv[1:]))")
_BINARY = getattr(os, "O_BINARY", 0)


# ---------------------------------------------------------------- the lock and the claim


def _lock(fd: int, wait: bool) -> bool:
    """Take the exclusive lock on ``fd``; ``False`` if another process holds it (and ``wait`` is off)."""
    try:
        if sys.platform == "win32":
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError on POSIX; on Windows also after LK_LOCK's 10 s of retries
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def supervisor_alive(attempt: Path) -> bool:
    """Whether the attempt's supervisor runs: it holds the lock until it ends, however it ends."""
    try:
        fd = os.open(attempt / LOCK, os.O_RDWR | _BINARY)
    except FileNotFoundError:
        return False  # not started yet (or never will be): the claim decides who runs it
    try:
        if not _lock(fd, wait=False):
            return True
        _unlock(fd)
        return False
    finally:
        os.close(fd)


def _claim(attempt: Path, text: str) -> bool:
    """Create the attempt's claim; ``False`` if someone else already did (or the attempt is gone)."""
    try:
        fd = os.open(attempt / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o644)
    except (FileExistsError, FileNotFoundError):
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(attempt)
    return True


def _claimed(attempt: Path) -> bool:
    return (attempt / CLAIM).exists()


# ---------------------------------------------------------------- files of an attempt


def _load_json(path: Path) -> Any:
    """A state file's JSON, ``None`` if absent; an unreadable one is quarantined and counts as absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        quarantine(path, str(exc))
        return None


def _check_result(data: Any) -> dict[str, Any]:
    """A stored result as written by :func:`supervise`; ``ValueError`` for anything else."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    if isinstance(data.get("error"), str):
        return data
    code, timed_out, output = data.get("exitCode"), data.get("timedOut"), data.get("output")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        raise ValueError(f"invalid exitCode {code!r}")
    if not isinstance(timed_out, bool) or not isinstance(output, str):
        raise ValueError("missing timedOut or output")
    return data


def _load_result(attempt: Path) -> dict[str, Any] | None:
    path = attempt / RESULT
    data = _load_json(path)
    if data is None:
        return None
    try:
        return _check_result(data)
    except ValueError as exc:
        quarantine(path, str(exc))
        return None


def _to_result(data: Mapping[str, Any]) -> CommandResult:
    if isinstance(data.get("error"), str):
        return CommandResult(None, "", False, data["error"])
    return CommandResult(data["exitCode"], data["output"], data["timedOut"])


def _installer_record(attempt: Path) -> ProcessRecord | None:
    path = attempt / INSTALLER
    data = _load_json(path)
    if data is None:
        return None
    try:
        return ProcessRecord.from_dict(data)
    except ValueError as exc:
        quarantine(path, str(exc))
        return None


def _request_timeout(attempt: Path) -> float:
    data = _load_json(attempt / REQUEST)
    timeout = data.get("timeoutSeconds") if isinstance(data, dict) else None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return float(timeout)
    return FALLBACK_TIMEOUT_SECONDS


def _log_tail(attempt: Path) -> str:
    try:
        with open(attempt / SUPERVISOR_LOG, "rb") as handle:
            return output_tail(handle, LOG_TAIL_CHARS)
    except OSError:
        return ""


def _attempts(step: Path) -> list[Path]:
    """The step's attempt directories, oldest first."""
    if not step.is_dir():
        return []
    numbered = [(int(p.name), p) for p in step.iterdir() if p.is_dir() and p.name.isdigit()]
    return [p for _, p in sorted(numbered)]


# ---------------------------------------------------------------- the agent's side


def _remaining(record: ProcessRecord) -> float:
    """Seconds left of the installer's timeout, measured from its recorded start (wall clock)."""
    started = parse_time(record.started_at)
    elapsed = (utc_now() - started).total_seconds() if started is not None else 0.0
    return min(max(record.timeout_seconds - elapsed, 0.0), record.timeout_seconds)


def _await_child(attempt: Path, child: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for the supervisor this agent started; past the timeout, kill the installer for it."""
    try:
        child.wait(timeout=timeout + KILL_GRACE_SECONDS)
        return
    except subprocess.TimeoutExpired:
        pass
    # The supervisor kills the installer at its timeout; it has not, so the agent does.
    record = _installer_record(attempt)
    if record is not None and is_running(record):
        kill_orphan(record)
    try:
        child.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        raise InstallError(f"the installer supervisor (pid {child.pid}) has not ended although the installer's "
                           f"{timeout:g} s timeout has passed; not running the installer again beside it") from None


def _await_orphan(attempt: Path) -> None:
    """Wait for a supervisor a previous agent started, up to its installer's timeout and a grace period."""
    record = _installer_record(attempt)
    remaining = _remaining(record) if record is not None else _request_timeout(attempt)
    log.warning("an interrupted installer command is still running; waiting up to %.0f s for its "
                "supervisor to report how it ended", remaining)
    deadline = time.monotonic() + remaining + KILL_GRACE_SECONDS
    killed = False
    while supervisor_alive(attempt):
        if time.monotonic() >= deadline:
            record = _installer_record(attempt)
            if killed or record is None:
                raise InstallError("the supervisor of an interrupted installer command has not reported after "
                                   "its timeout; not running the installer again beside it")
            if is_running(record):
                kill_orphan(record)
            killed = True
            deadline = time.monotonic() + KILL_GRACE_SECONDS
        time.sleep(ORPHAN_POLL_SECONDS)


def _settle(attempt: Path, child: subprocess.Popen[bytes] | None = None,
            timeout: float | None = None) -> dict[str, Any] | None:
    """Wait until nothing of an attempt runs; its stored result, or ``None`` if it has none.

    ``None`` means nothing of the attempt runs and it has no result: the
    installer never started (the attempt was given up before any supervisor
    claimed it, or its supervisor died before starting it), or it was gone
    together with its supervisor (a crash, or the agent's service stopped
    with its whole process tree): interrupted, it may run again. When the
    supervisor died alone and the installer ran on, the orphan is waited for
    (or killed at its timeout) and the attempt gets a result of its own
    (:func:`_record_lost`): it ran, so it is never run again for this
    operation.
    """
    while True:
        # a result counts once its supervisor has ended: after a timeout, it kills the installer after writing it
        if child is not None:
            _await_child(attempt, child, timeout if timeout is not None else _request_timeout(attempt))
        elif supervisor_alive(attempt):
            _await_orphan(attempt)
        data = _load_result(attempt)
        if data is not None:
            return data
        record = _installer_record(attempt)
        if record is not None:
            outlived = (attempt / ORPHANED).exists()
            if not outlived and is_running(record):
                # Seen running without its supervisor: say so on disk before waiting, so an
                # agent killed while it waits leaves the next one knowing it ran on alone.
                write_json_atomic(attempt / ORPHANED, {"pid": record.pid, "seenAt": format_time(utc_now())})
                outlived = True
            log.warning("the supervisor of installer pid %d ended without recording its exit status; %s",
                        record.pid, settle_orphan(record))
            if outlived:
                return _record_lost(attempt)  # it ran on alone: never again for this operation
            return None  # gone with its supervisor (a crash, the service stopped): interrupted, so it runs again
        if _claimed(attempt) or _claim(attempt, ABANDONED):
            return None  # given up (now or before), or its supervisor died before starting the installer
        child = None  # a supervisor claimed it between our look and our claim: it runs it, wait for it


def _record_lost(attempt: Path) -> dict[str, Any]:
    """Record that an attempt's installer ran but how it ended is unknown (its supervisor was killed)."""
    tail = ""
    try:
        with open(attempt / OUTPUT, "rb") as out:
            tail = output_tail(out)
    except OSError:
        pass
    message = ("exit status unknown: the installer ran, but its supervisor was killed before it could record "
               "how it ended; it is not run again for this operation")
    data = {"error": f"{message}: {tail}" if tail else message}
    write_json_atomic(attempt / RESULT, data)
    return data


def stored_result(step: Path) -> CommandResult | None:
    """The step's result if a previous attempt has one, after waiting for any still running.

    ``None``: the step's installer never started; it may run now, and
    nothing of it is left running. :class:`InstallError` if what runs cannot
    be stopped.
    """
    attempts = _attempts(step)
    if not attempts:
        return None
    data = _settle(attempts[-1])
    return None if data is None else _to_result(data)


def run_supervised(step: Path, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                   timeout: float) -> CommandResult:
    """The step's result: the stored one, or from running ``argv`` once under a supervisor.

    ``env`` is the installer's environment; the supervisor gets it too and
    passes it on. A command that cannot start is a result too (``error``). A
    supervisor that ends without a result raises :class:`InstallError` (after
    making sure its installer no longer runs).
    """
    stored = stored_result(step)
    if stored is not None:
        return stored
    return start_supervised(step, argv, cwd, env, timeout)


def start_supervised(step: Path, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                     timeout: float) -> CommandResult:
    """Run ``argv`` under a new supervisor and wait for its result (:func:`stored_result` came first)."""
    step.mkdir(parents=True, exist_ok=True)
    previous = _attempts(step)
    attempt = step / str(int(previous[-1].name) + 1 if previous else 1)
    attempt.mkdir()
    write_json_atomic(attempt / REQUEST, {"argv": list(argv), "cwd": str(cwd), "timeoutSeconds": timeout})
    with open(attempt / SUPERVISOR_LOG, "wb") as supervisor_log:
        try:
            child = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(_IMPORT_ROOT), str(attempt)],
                                     cwd=attempt, env=dict(env), stdin=subprocess.DEVNULL,
                                     stdout=supervisor_log, stderr=subprocess.STDOUT, **session_options())
        except OSError as exc:
            raise InstallError(f"cannot start the installer supervisor: {exc.strerror or exc}") from exc
    data = _settle(attempt, child, timeout)
    if data is None:
        detail = _log_tail(attempt)
        raise InstallError(f"the installer supervisor ended (exit code {child.returncode}) without recording "
                           f"how the installer ended" + (f": {detail}" if detail else ""))
    return _to_result(data)


def settle_runs(runs: Path) -> None:
    """At start-up: wait for (or stop) every command an interrupted operation left running.

    Results land in their attempt directories, where the operation finds
    them when the relay sends it again.
    """
    if not runs.is_dir():
        return
    for step in sorted(p for p in runs.iterdir() if p.is_dir()):
        attempts = _attempts(step)
        if attempts:
            _settle(attempts[-1])


def ran_commands(runs: Path) -> bool:
    """Whether any command of the operation started (so the operation is being resumed)."""
    if not runs.is_dir():
        return False
    return any((attempt / INSTALLER).exists() or (attempt / RESULT).exists()
               for step in runs.iterdir() if step.is_dir() for attempt in _attempts(step))


def discard_runs(runs: Path) -> None:
    """Forget a finished operation's commands; kept while a supervisor of it still runs."""
    if not runs.is_dir():
        return
    for step in runs.iterdir():
        if step.is_dir() and any(supervisor_alive(attempt) for attempt in _attempts(step)):
            log.warning("%s: a supervisor still runs; its files are kept", runs.name)
            return
    shutil.rmtree(runs, ignore_errors=True)


# ---------------------------------------------------------------- the supervisor's side


def _read_request(attempt: Path) -> tuple[list[str], str, float]:
    data = json.loads((attempt / REQUEST).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not an object")
    argv, cwd, timeout = data.get("argv"), data.get("cwd"), data.get("timeoutSeconds")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    if not isinstance(cwd, str):
        raise ValueError("cwd must be a string")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"invalid timeoutSeconds {timeout!r}")
    return argv, cwd, float(timeout)


def supervise(attempt: Path) -> int:
    """Run one attempt's installer and record how it ended; the supervisor process's whole job.

    The lock is taken before the claim and held until the process ends, so
    a claimed attempt whose lock is free has a dead supervisor.
    """
    if os.name != "nt" and os.getpgrp() != os.getpid():
        os.setsid()  # lead a group of our own (the agent starts us so; by hand we might not)
    try:
        lock_fd = os.open(attempt / LOCK, os.O_RDWR | os.O_CREAT | _BINARY, 0o644)
    except FileNotFoundError:
        return 0  # the attempt was discarded before this process got going
    if not _lock(lock_fd, wait=True):  # released by the operating system when this process ends
        return 1  # (Windows gives up after 10 s) unclaimed, so the agent gives the attempt up
    if not _claim(attempt, f"supervisor {os.getpid()}\n"):
        return 0  # the agent gave this attempt up before we got here; it runs elsewhere or not at all
    try:
        argv, cwd, timeout = _read_request(attempt)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        write_json_atomic(attempt / RESULT, {"error": f"installer supervisor: unreadable request ({exc})"})
        return 0
    # POSIX: the installer joins our process group (module docstring); Windows: a group of its own
    options = session_options() if os.name == "nt" else {}
    session = None if os.name == "nt" else os.getsid(0)
    with open(attempt / OUTPUT, "w+b") as out:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, **options)
        except OSError as exc:
            write_json_atomic(attempt / RESULT, {"error": f"cannot run {argv[0]!r}: {exc.strerror or exc}"})
            return 0
        try:  # the child is not reaped before wait(), so its start time is still readable
            record = ProcessRecord(proc.pid, process_start_time(proc.pid), format_time(utc_now()), timeout,
                                   session)
            write_json_atomic(attempt / INSTALLER, record.to_dict())
        except BaseException:
            _kill_installer(proc)  # an unrecorded installer is one a restarted agent could run a second time
            raise
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            write_json_atomic(attempt / RESULT, {"exitCode": None, "timedOut": True, "output": output_tail(out)})
            _kill_installer(proc)  # on POSIX this process goes too: the result is already written
            return 0
        write_json_atomic(attempt / RESULT, {"exitCode": code, "timedOut": False, "output": output_tail(out)})
    return 0


def _kill_installer(proc: subprocess.Popen[bytes]) -> None:
    """Kill the installer and everything it forked: on POSIX our whole process group, this process included."""
    if os.name == "nt":
        kill_tree(proc)
        proc.wait()
    else:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: Sequence[str]) -> int:
    """The supervisor process: ``main([attempt_dir])``, started by the agent (:func:`start_supervised`)."""
    if len(argv) != 1:
        print("usage: python -m reconciler.agent.supervisor ATTEMPT_DIR", file=sys.stderr)
        return 2
    return supervise(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
