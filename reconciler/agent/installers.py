"""Installing and removing packages on the client, and the receipts that record them.

Layout under the agent root (see :class:`Layout`)::

    token                         per-client token from registration (0600)
    receipts/<name>.json          one per installed package name: the inventory
    packages/<name>/<version>/    the unpacked artifact
    cache/<sha256>                verified downloads (``<sha256>.part`` while in flight)
    journal/                      operations (see ``journal.py``)
    detect-process.json           the ``detect`` command running right now, if any

Two installer types (DESIGN section 6):

``files``
    the unpacked artifact *is* the installation.
``command``
    the artifact is unpacked the same way, then the ``install`` argv runs in that
    directory; the directory stays, because ``uninstall`` runs there too.

Archives come from the network, so they are checked member by member *before*
anything is extracted: absolute paths, ``..``, links whose target leaves the
package directory, members written through a symlink, and device or special
files all refuse the whole archive, and nothing is installed. Extraction goes
to a staging directory that replaces ``packages/<name>/<version>`` with one
rename, so a killed agent leaves either the old tree or the new one (stale
staging directories are swept before the next install of that name).

Commands run without a shell, with a timeout that kills the whole process
group, and the tail of their combined output becomes the status message.
Before running, these placeholders are substituted inside every argv element,
which keeps a package spec portable between Windows and Linux clients:

``${PYTHON}``
    the interpreter running the agent (``sys.executable``),
``${ROOT}``
    the agent root,
``${PACKAGE_DIR}``
    ``packages/<name>/<version>`` of the package concerned.

The same values are in the environment as ``RECONCILER_ROOT`` and
``RECONCILER_PACKAGE_DIR`` (plus ``RECONCILER_PACKAGE_NAME``,
``RECONCILER_PACKAGE_VERSION``, and the client's ``RECONCILER_CLIENT_ID``,
``RECONCILER_OS`` and ``RECONCILER_ARCH`` as reported, overrides included).

Because a command runs in its own session, it survives a ``kill -9`` of the
agent. So every command is recorded while it runs (pid, start time, timeout:
:class:`ProcessRecord`, in the operation's journal entry or, for ``detect``,
in ``detect-process.json``), and :func:`settle_orphan` lets a restarted agent
wait for such an orphan, up to the command's timeout, then kill its group,
before it runs anything again. The start time (Linux: ``/proc/<pid>/stat``
field 22, with the boot id) is what keeps a recycled pid from being waited
for or killed. Elsewhere only the pid is recorded: on other POSIX systems a
process counts as the orphan if it has that pid and still leads its own
session (as the orphan did), which a recycled pid rarely does; on Windows an
orphan cannot be recognised at all, so it is not waited for (a known gap).

A receipt is written only after a successful install, atomically; its presence
is what "installed" means. A receipt whose installer has a ``detect`` argv is
confirmed by running it (exit 0 = present), and a ``files`` package whose
directory vanished counts as absent, so drift is reported and healed.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from reconciler.agent.journal import format_time, parse_time, quarantine, utc_now, write_json_atomic

log = logging.getLogger("reconciler.agent")

OUTPUT_TAIL_CHARS = 2000
DEFAULT_TIMEOUT_SECONDS = 600.0
DETECT_TIMEOUT_SECONDS = 60.0
ORPHAN_POLL_SECONDS = 0.05  # how often a restarted agent looks whether an orphaned command ended
KILL_GRACE_SECONDS = 10.0  # how long a SIGKILLed orphan may take to go

# Names and versions become directory names: one path segment, no leading dot
# (dot-entries are the agent's own staging directories).
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class InstallError(Exception):
    """An action failed on this client; ``message`` is what the relay shows.

    ``exit_code`` is the installer's exit code when a command ran, else ``None``.
    """

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UnsafeArchiveError(InstallError):
    """An archive member would land outside the package directory (or is a device)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"refused archive member {member!r}: {reason}")
        self.member = member


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the agent root; the only place paths are built."""

    root: Path
    # Who this client is, given to installer commands as RECONCILER_CLIENT_ID,
    # RECONCILER_OS and RECONCILER_ARCH (so a script can branch on the platform,
    # and --fact overrides reach it in simulations).
    client_env: tuple[tuple[str, str], ...] = ()

    @property
    def token(self) -> Path:
        return self.root / "token"

    @property
    def receipts(self) -> Path:
        return self.root / "receipts"

    @property
    def packages(self) -> Path:
        return self.root / "packages"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def detect_process(self) -> Path:
        return self.root / "detect-process.json"

    def receipt(self, name: str) -> Path:
        return self.receipts / f"{check_segment(name, 'package name')}.json"

    def package_dir(self, name: str, version: str) -> Path:
        return (self.packages / check_segment(name, "package name")
                / check_segment(version, "package version"))

    def cached_artifact(self, sha256: str) -> Path:
        return self.cache / check_sha256(sha256)

    def create(self) -> None:
        for directory in (self.root, self.receipts, self.packages, self.cache, self.journal):
            directory.mkdir(parents=True, exist_ok=True)


def check_segment(value: Any, what: str) -> str:
    """Refuse a name or version that is not one safe path segment."""
    if not isinstance(value, str) or not _SEGMENT.match(value):
        raise InstallError(f"invalid {what} {value!r}")
    return value


def check_sha256(value: Any) -> str:
    """Refuse anything but 64 lowercase hex digits (it becomes a file name)."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise InstallError(f"invalid sha256 {value!r}")
    return value


def _argv(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise InstallError(f"installer {what} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class InstallerSpec:
    """The ``installer`` object of an action (and of a receipt)."""

    type: str
    install: tuple[str, ...] = ()
    uninstall: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @classmethod
    def from_dict(cls, data: Any) -> InstallerSpec:
        if not isinstance(data, dict):
            raise InstallError("installer must be an object")
        kind = data.get("type")
        if kind not in ("files", "command"):
            raise InstallError(f"unknown installer type {kind!r}")
        timeout = data.get("timeoutSeconds")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT_SECONDS
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InstallError(f"invalid timeoutSeconds {timeout!r}")
        spec = cls(kind, _argv(data.get("install"), "install"), _argv(data.get("uninstall"), "uninstall"),
                   _argv(data.get("detect"), "detect"), float(timeout))
        if spec.type == "command" and not spec.install:
            raise InstallError("command installer has no install argv")
        return spec

    def to_dict(self) -> dict[str, Any]:
        timeout: float | int = int(self.timeout_seconds) if self.timeout_seconds.is_integer() \
            else self.timeout_seconds
        return {"type": self.type, "install": list(self.install), "uninstall": list(self.uninstall),
                "detect": list(self.detect), "timeoutSeconds": timeout}


@dataclass(frozen=True)
class ArtifactRef:
    """The ``artifact`` object of an action: what to download and how to unpack it."""

    sha256: str
    format: str = "tar"
    size: int | None = None
    file_name: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> ArtifactRef:
        if not isinstance(data, dict):
            raise InstallError("artifact must be an object")
        sha = check_sha256(data.get("sha256"))
        fmt = data.get("format", "tar")
        if fmt not in ("tar", "file"):
            raise InstallError(f"unknown artifact format {fmt!r}")
        size = data.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InstallError(f"invalid artifact size {size!r}")
        file_name = data.get("fileName")
        if fmt == "file":
            file_name = check_file_name(file_name)
        return cls(sha, fmt, size, file_name if isinstance(file_name, str) else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "format": self.format}
        if self.file_name is not None:
            out["fileName"] = self.file_name
        return out


def check_file_name(value: Any) -> str:
    """A ``file`` artifact's name: one segment, no separators, not ``.``/``..``."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value
            or "\\" in value or "\0" in value or (len(value) > 1 and value[1] == ":")):
        raise InstallError(f"invalid fileName {value!r}")
    return value


@dataclass(frozen=True)
class Receipt:
    """Proof of one installed package; the agent's inventory is the set of receipts."""

    name: str
    version: str
    installer: InstallerSpec
    operation_id: str
    installed_at: str
    artifact: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "installer": self.installer.to_dict(),
                "operationId": self.operation_id, "installedAt": self.installed_at,
                "artifact": dict(self.artifact)}

    @classmethod
    def from_dict(cls, data: Any) -> Receipt:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        name = check_segment(data.get("name"), "package name")
        version = check_segment(data.get("version"), "package version")
        artifact = data.get("artifact") or {}
        return cls(name, version, InstallerSpec.from_dict(data.get("installer")),
                   str(data.get("operationId", "")), str(data.get("installedAt", "")),
                   artifact if isinstance(artifact, dict) else {})


@dataclass(frozen=True)
class Outcome:
    """A successful action: the exit code of the command (0 for ``files``) and a message."""

    exit_code: int
    message: str


# ---------------------------------------------------------------- receipts


def read_receipt(layout: Layout, name: str) -> Receipt | None:
    """The receipt of a package name, or ``None``; an unreadable one is quarantined."""
    path = layout.receipt(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        receipt = Receipt.from_dict(json.loads(text))
    except (ValueError, InstallError) as exc:
        quarantine(path, str(exc))
        return None
    if receipt.name != name:
        quarantine(path, f"receipt names {receipt.name!r}")
        return None
    return receipt


def read_receipts(layout: Layout) -> list[Receipt]:
    """Every readable receipt, sorted by name."""
    if not layout.receipts.is_dir():
        return []
    receipts = []
    for path in sorted(layout.receipts.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            receipt = read_receipt(layout, path.stem)
        except InstallError:
            continue  # not a name we would have written
        if receipt is not None:
            receipts.append(receipt)
    return receipts


def write_receipt(layout: Layout, receipt: Receipt) -> None:
    write_json_atomic(layout.receipt(receipt.name), receipt.to_dict())


def is_present(layout: Layout, receipt: Receipt) -> bool:
    """Confirm a receipt against the machine: files still there, ``detect`` still exits 0."""
    package_dir = layout.package_dir(receipt.name, receipt.version)
    if receipt.installer.type == "files" and not package_dir.is_dir():
        return False
    if not receipt.installer.detect:
        return True
    cwd = package_dir if package_dir.is_dir() else layout.root
    try:
        result = run_command(receipt.installer.detect, cwd, layout, receipt.name, receipt.version,
                             min(receipt.installer.timeout_seconds, DETECT_TIMEOUT_SECONDS),
                             lambda record: _track_detect(layout, record))
    except InstallError as exc:
        log.info("detect for %s %s failed: %s", receipt.name, receipt.version, exc.message)
        return False
    return result.exit_code == 0 and not result.timed_out


def _track_detect(layout: Layout, record: ProcessRecord | None) -> None:
    """Record the running ``detect`` command: it belongs to no operation, so it gets its own file."""
    if record is None:
        layout.detect_process.unlink(missing_ok=True)
    else:
        write_json_atomic(layout.detect_process, record.to_dict())


def settle_detect(layout: Layout) -> None:
    """Before detecting again, wait out (or kill) a ``detect`` a killed agent left running.

    A process that survives SIGKILL is beyond the agent: it is logged, and its
    record kept so the next check-in tries again.
    """
    path = layout.detect_process
    try:
        record = ProcessRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        quarantine(path, str(exc))
        return
    try:
        log.info("interrupted detect command: %s", settle_orphan(record))
    except InstallError as exc:
        log.error("%s", exc.message)
        return
    path.unlink(missing_ok=True)


def inventory(layout: Layout) -> list[dict[str, str]]:
    """What is installed, confirmed: the ``inventory`` of a check-in."""
    settle_detect(layout)
    return [{"name": r.name, "version": r.version} for r in read_receipts(layout) if is_present(layout, r)]


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: its exit code (``None`` if killed on timeout) and output tail."""

    exit_code: int | None
    output: str
    timed_out: bool


def substitute(argv: Sequence[str], root: Path, package_dir: Path) -> list[str]:
    """Replace ``${PYTHON}``, ``${ROOT}`` and ``${PACKAGE_DIR}`` in every argument."""
    values = {"${PYTHON}": sys.executable, "${ROOT}": str(root), "${PACKAGE_DIR}": str(package_dir)}
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def _tail(handle: BinaryIO, limit: int = OUTPUT_TAIL_CHARS) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 4 * limit))
    text = handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


@dataclass(frozen=True)
class ProcessRecord:
    """A running installer command, as recorded while the agent waits on it.

    ``start_time`` identifies the process beyond its pid, which the system
    hands out again once the process is gone: ``<boot id>:<start ticks>`` on
    Linux, ``None`` where there is no cheap way to read it (module docstring).
    ``started_at`` and ``timeout_seconds`` let a restarted agent give an orphan
    what is left of its timeout, not a new one.
    """

    pid: int
    start_time: str | None
    started_at: str
    timeout_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "startTime": self.start_time, "startedAt": self.started_at,
                "timeoutSeconds": self.timeout_seconds}

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
        return cls(pid, start_time, started_at, float(timeout))


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
        # commands start a new session, so the orphan leads its own session; a recycled pid rarely does
        return os.getsid(record.pid) == record.pid
    except OSError:
        return False


def settle_orphan(record: ProcessRecord) -> str:
    """Make sure a recorded command no longer runs, so it never runs beside its own re-run.

    Waits for it while what is left of its timeout runs (measured from the
    recorded start), then kills its process group: it started a new session,
    so it leads that group and the group holds whatever it forked. A process
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
            return _kill_orphan(record)
        time.sleep(min(ORPHAN_POLL_SECONDS, left))
    return f"pid {record.pid} ended by itself"


def _kill_orphan(record: ProcessRecord) -> str:
    """SIGKILL the orphan's group (it leads it: new session) and see it go."""
    if os.name != "nt":
        try:
            os.killpg(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # ended between the check and the kill
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while is_running(record):
        if time.monotonic() >= deadline:
            raise InstallError(f"an interrupted installer command (pid {record.pid}) survived SIGKILL; "
                               f"not running another beside it")
        time.sleep(ORPHAN_POLL_SECONDS)
    return f"pid {record.pid} killed after its {record.timeout_seconds:g} s timeout"


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill the command and everything it started; an installer often forks helpers."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        proc.kill()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_command(argv: Sequence[str], cwd: Path, layout: Layout, name: str, version: str,
                timeout: float, track: ProcessHook | None = None) -> CommandResult:
    """Run an installer command without a shell, in ``cwd``, killed after ``timeout`` seconds.

    Output goes to a temporary file rather than a pipe: a helper left running in
    the background could otherwise hold the pipe open and hang the agent.
    ``track`` is told about the process before the agent waits on it and again
    once it has ended; if recording fails, the command is killed, since an
    unrecorded command is one a restarted agent could run a second time.
    """
    package_dir = layout.package_dir(name, version)
    args = substitute(argv, layout.root, package_dir)
    env = dict(os.environ)
    env.update(dict(layout.client_env))
    env.update({"RECONCILER_ROOT": str(layout.root), "RECONCILER_PACKAGE_DIR": str(package_dir),
                "RECONCILER_PACKAGE_NAME": name, "RECONCILER_PACKAGE_VERSION": version})
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, **kwargs)
        except OSError as exc:
            raise InstallError(f"cannot run {args[0]!r}: {exc.strerror or exc}") from exc
        if track is not None:
            try:  # the child is not reaped before wait(), so its start time is still readable
                track(ProcessRecord(proc.pid, process_start_time(proc.pid), format_time(utc_now()), timeout))
            except BaseException:
                _kill_tree(proc)
                proc.wait()
                raise
        try:
            code: int | None = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            proc.wait()
            code, timed_out = None, True
        if track is not None:
            track(None)
        return CommandResult(code, _tail(out), timed_out)


def _checked(result: CommandResult, timeout: float) -> Outcome:
    """Turn a finished command into an outcome, or the failure message the relay shows."""
    if result.timed_out:
        suffix = f": {result.output}" if result.output else ""
        raise InstallError(f"timed out after {timeout:g} s{suffix}")
    assert result.exit_code is not None
    if result.exit_code != 0:
        raise InstallError(f"exit code {result.exit_code}: {result.output or '(no output)'}",
                           result.exit_code)
    return Outcome(0, result.output)


# ---------------------------------------------------------------- archives


def _parts(name: str) -> list[str]:
    """Path segments of a member name, with ``\\`` as a separator too (it is one on Windows)."""
    return [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name))


def _escapes(parts: list[str]) -> bool:
    """Whether a relative path, resolved lexically, climbs out of its starting directory."""
    depth = 0
    for part in parts:
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return True
    return False


def check_archive(members: Sequence[tarfile.TarInfo]) -> None:
    """Refuse the whole archive if any member could write outside the package directory.

    Checked lexically, before extraction, so a bad archive leaves no trace.
    Symlinks may point anywhere *inside* the tree, but no member may be written
    through one: that is the classic two-step escape, and legitimate packages do
    not need it.
    """
    symlinks: set[tuple[str, ...]] = set()
    for member in members:
        name = member.name
        if _is_absolute(name):
            raise UnsafeArchiveError(name, "absolute path")
        parts = _parts(name)
        if not parts and not member.isdir():
            raise UnsafeArchiveError(name, "empty member name")
        if ".." in parts:
            raise UnsafeArchiveError(name, "path contains '..'")
        for i in range(1, len(parts)):
            if tuple(parts[:i]) in symlinks:
                raise UnsafeArchiveError(name, f"written through symlink {'/'.join(parts[:i])!r}")
        if member.issym():
            target = member.linkname
            if _is_absolute(target):
                raise UnsafeArchiveError(name, f"symlink to absolute path {target!r}")
            if _escapes(parts[:-1] + _parts(target)):
                raise UnsafeArchiveError(name, f"symlink target {target!r} escapes the package directory")
            symlinks.add(tuple(parts))
        elif member.islnk():
            target = member.linkname
            target_parts = _parts(target)
            if _is_absolute(target) or _escapes(target_parts):
                raise UnsafeArchiveError(name, f"hardlink target {target!r} escapes the package directory")
            resolved = _parts(posixpath.normpath(target.replace("\\", "/")))
            for i in range(1, len(resolved) + 1):
                if tuple(resolved[:i]) in symlinks:
                    raise UnsafeArchiveError(name, f"hardlink through symlink {'/'.join(resolved[:i])!r}")
        elif member.isdev() or not (member.isreg() or member.isdir()):
            raise UnsafeArchiveError(name, "device or special file")


def unpack(artifact: Path, ref: ArtifactRef, dest: Path) -> int:
    """Unpack a verified artifact into the empty directory ``dest``; returns the member count."""
    dest.mkdir(parents=True)
    if ref.format == "file":
        assert ref.file_name is not None
        target = dest / ref.file_name
        shutil.copyfile(artifact, target)
        if os.name != "nt":
            os.chmod(target, 0o755)  # a single-file artifact is usually the installer itself
        return 1
    try:
        with tarfile.open(artifact, "r:*") as archive:
            members = archive.getmembers()
            check_archive(members)
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, members=members, filter="data")  # second line of defence
            else:  # pragma: no cover - Python < 3.11.4
                archive.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise InstallError(f"artifact is not a valid tar archive: {exc}") from exc
    return len(members)


def _remove_tree(path: Path) -> None:
    """Remove a directory tree, including read-only files (Windows refuses those by default)."""
    def on_error(func: Any, target: str, _exc: Any) -> None:
        os.chmod(target, 0o700)
        func(target)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=on_error)


def _safe_suffix(operation_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", operation_id)[:64] or "op"


def _sweep(name_dir: Path) -> None:
    """Drop staging and replaced trees an interrupted install left behind."""
    if not name_dir.is_dir():
        return
    for child in name_dir.iterdir():
        if child.name.startswith((".staging-", ".old-")):
            _remove_tree(child)


def _place(staging: Path, target: Path, operation_id: str) -> None:
    """Make ``staging`` the package directory; a directory cannot be replaced in one rename."""
    if target.exists():
        old = target.with_name(f".old-{_safe_suffix(operation_id)}")
        _remove_tree(old)
        os.replace(target, old)
        os.replace(staging, target)
        _remove_tree(old)
    else:
        os.replace(staging, target)


# ---------------------------------------------------------------- install / uninstall


def install(layout: Layout, name: str, version: str, installer: InstallerSpec, artifact: Path,
            ref: ArtifactRef, operation_id: str, now: datetime | None = None,
            track: ProcessHook | None = None) -> Outcome:
    """Install ``name`` ``version`` from a verified artifact; the receipt is written last.

    Whatever version of ``name`` is installed now (per its receipt) is removed
    first, so install, upgrade and downgrade are one operation: the receipt is
    the truth about what is there, ``previousVersion`` only what the relay
    believed. The new artifact is unpacked and checked *before* the old version
    goes, so a refused archive changes nothing. ``track`` records each command
    while it runs (see :func:`run_command`).
    """
    target = layout.package_dir(name, version)
    name_dir = target.parent
    name_dir.mkdir(parents=True, exist_ok=True)
    _sweep(name_dir)
    staging = name_dir / f".staging-{_safe_suffix(operation_id)}"
    try:
        count = unpack(artifact, ref, staging)
        current = read_receipt(layout, name)
        if current is not None and current.version != version:
            uninstall(layout, name, None, operation_id, track)
        _place(staging, target, operation_id)
    except BaseException:
        _remove_tree(staging)
        raise
    message = f"installed {name} {version} ({count} {'entry' if count == 1 else 'entries'})"
    if installer.type == "command":
        try:
            result = _checked(run_command(installer.install, target, layout, name, version,
                                          installer.timeout_seconds, track), installer.timeout_seconds)
        except BaseException:
            # not installed: no receipt, no directory (a stale receipt of this version goes too)
            layout.receipt(name).unlink(missing_ok=True)
            _remove_tree(target)
            raise
        message = result.message or message
    write_receipt(layout, Receipt(name, version, installer, operation_id,
                                  format_time(now or utc_now()), ref.to_dict()))
    return Outcome(0, message)


def uninstall(layout: Layout, name: str, version: str | None, operation_id: str,
              track: ProcessHook | None = None) -> Outcome:
    """Remove an installed package as its receipt says; no receipt means nothing to do.

    With ``version`` given, only that version is removed: an uninstall meant for
    22.00 must not take away the 23.01 someone installed since.
    """
    receipt = read_receipt(layout, name)
    if receipt is None:
        return Outcome(0, "not installed")
    if version is not None and receipt.version != version:
        return Outcome(0, f"not installed ({receipt.version} present)")
    package_dir = layout.package_dir(name, receipt.version)
    output = ""
    if receipt.installer.type == "command" and receipt.installer.uninstall:
        cwd = package_dir if package_dir.is_dir() else layout.root
        timeout = receipt.installer.timeout_seconds
        try:
            output = _checked(run_command(receipt.installer.uninstall, cwd, layout, name, receipt.version,
                                          timeout, track), timeout).message
        except InstallError as exc:
            raise InstallError(f"uninstalling {name} {receipt.version}: {exc.message}", exc.exit_code) from exc
    # receipt first: a crash now leaves an orphaned directory, never a receipt without files
    layout.receipt(name).unlink(missing_ok=True)
    _remove_tree(package_dir)
    try:
        package_dir.parent.rmdir()
    except OSError:
        pass  # other versions or leftovers remain
    return Outcome(0, output or f"uninstalled {name} {receipt.version}")
