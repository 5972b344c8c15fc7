"""What is installed, whoever installed it: a package's detection rule (``spec.detect``) run on the client.

:func:`installed_version` is the one place that answers "which version of
this package is on this machine?" from an installer spec and its rule; the
pre-flight before an install, the check-in inventory and the dependency
check all ask it. (Installer types that query a package database, such as
MSI product codes or dpkg, belong here too: dispatch on ``installer.type``
before the rule.)

The rule forms are described in :mod:`reconciler.detection_rules`. Running
one is bounded: a command gets at most :data:`DETECT_TIMEOUT_SECONDS` (or
the rule's shorter ``timeoutSeconds``) and is killed with its process group
after that; only the first :data:`MAX_OUTPUT_READ` bytes of its standard
output are read, and one printing more than :data:`MAX_OUTPUT_SPOOL` is
killed; a file is read only if it is a regular file, at most
:data:`MAX_FILE_READ` bytes. A rule that fails in any way (cannot start,
times out, crashes) means "not found", and is logged; it never stops a
check-in.

The agent remembers the rule of each package name it was sent an install
for (``detections/<name>.json``: the package version and installer the rule
came with, from a verified action), and :func:`inventory` reports what those
rules find, receipt or not; an entry found by a rule rather than confirmed
from the agent's own receipt carries ``source: detected`` (no ``source``
means ``reconciler``, as before).

Asking is what costs (a process per ``detect`` command, a dpkg or rpm query,
one ``lstat`` per file of a ``files`` package), so the agent asks on a
schedule, not at every check-in: with a :class:`DetectionCache`,
:func:`inventory` reuses a package's last answer while it is younger than the
agent's ``--detect-interval`` and its receipt and remembered rule are the
ones it was asked with. A new receipt or rule (an install, an adoption, an
uninstall) asks again at once, as does any action the agent ran for that
package (it drops the entry, :meth:`DetectionCache.forget`). The pre-flight
before an install, the check after it and the dependency check never use the
cache: they call :func:`installed_version` and :func:`installed_now`
directly. Nothing of the cache is kept on disk: a restarted agent asks again.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from reconciler import names, protocol
from reconciler.agent.errors import InstallError
from reconciler.agent.installers import (
    DETECT_TIMEOUT_SECONDS,
    InstallerSpec,
    Layout,
    Receipt,
    _track_detect,
    command_env,
    is_present,
    native_version,
    read_receipt,
    read_receipts,
    settle_detect,
)
from reconciler.agent.processes import (
    ProcessRecord,
    kill_tree,
    process_start_time,
    session_options,
)
from reconciler.detection_rules import (
    ENVIRONMENT_PLACEHOLDERS,
    MAX_FILE_READ,
    MAX_OUTPUT_READ,
    MAX_REGISTRY_DATA,
)
from reconciler.fileio import quarantine, write_json_atomic
from reconciler.times import format_time, utc_now

log = logging.getLogger("reconciler.agent")

MAX_OUTPUT_SPOOL = 16 * 1024 * 1024  # bytes a detect command may print before it is killed
_POLL_SECONDS = 0.02  # how often a running detect command's output size is looked at

# (key with its hive, value name) -> the value's data as text, or None when the key or value is absent.
RegistryReader = Callable[[str, str], str | None]

_PLACEHOLDER = re.compile(r"\$\{([A-Z_0-9]+)\}")


@dataclass(frozen=True)
class Detected:
    """A package found installed: its version, and how it was found (for logs and messages)."""

    version: str
    how: str


class _Unresolved(Exception):
    """A placeholder the client cannot fill (an environment variable that is not set): the rule cannot match."""


def windows_registry_reader(key: str, value: str) -> str | None:  # pragma: no cover - Windows only
    """Read a value with ``winreg`` (imported here: it exists only on Windows)."""
    winreg: Any = importlib.import_module("winreg")

    hive_name, _, path = key.replace("/", "\\").partition("\\")
    hive = {"HKLM": winreg.HKEY_LOCAL_MACHINE, "HKEY_LOCAL_MACHINE": winreg.HKEY_LOCAL_MACHINE,
            "HKCU": winreg.HKEY_CURRENT_USER, "HKEY_CURRENT_USER": winreg.HKEY_CURRENT_USER}[hive_name]
    for view in (winreg.KEY_WOW64_64KEY, winreg.KEY_WOW64_32KEY):
        try:
            with winreg.OpenKey(hive, path, 0, winreg.KEY_READ | view) as handle:
                data, _kind = winreg.QueryValueEx(handle, value)
        except OSError:
            continue
        return str(data)
    return None


def default_registry_reader() -> RegistryReader | None:
    """The registry of this machine: ``winreg`` on Windows, none elsewhere (a registry rule never matches)."""
    return windows_registry_reader if os.name == "nt" else None


# ---------------------------------------------------------------- running one rule


def _expand(text: str, values: Mapping[str, str], env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        variable = ENVIRONMENT_PLACEHOLDERS.get(name)
        if variable is None:
            raise _Unresolved(f"unknown placeholder ${{{name}}}")
        found = env.get(variable) or env.get(variable.upper())  # Windows upper-cases os.environ's names
        if not found:
            raise _Unresolved(f"${{{name}}}: environment variable {variable} is not set")
        return found

    return _PLACEHOLDER.sub(one, text)


def _version_in(text: str, pattern: str | None) -> str | None:
    """The version a rule reads from ``text``: the pattern's group, or the first non-empty line."""
    if pattern is not None:
        match = re.search(pattern, text)
        candidate = match.group(1) if match is not None and match.group(1) is not None else ""
    else:
        candidate = next((line for line in text.splitlines() if line.strip()), "")
    candidate = candidate.strip()
    return candidate if names.is_version(candidate) else None


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte order mark: Windows tools write it
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8", errors="replace")


def _run(argv: list[str], cwd: Path, env: Mapping[str, str], timeout: float,
         track: Callable[[ProcessRecord | None], None] | None) -> tuple[int | None, bytes, str]:
    """Run a detect command; (exit code or None, the first MAX_OUTPUT_READ bytes of stdout, why it was stopped)."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.DEVNULL, **session_options())
        except OSError as exc:
            return None, b"", f"cannot run {argv[0]!r}: {exc.strerror or exc}"
        if track is not None:
            try:
                track(ProcessRecord(proc.pid, process_start_time(proc.pid), format_time(utc_now()), timeout))
            except BaseException:
                kill_tree(proc)
                proc.wait()
                raise
        deadline = time.monotonic() + timeout
        why = ""
        code: int | None = None
        try:
            while True:
                try:
                    code = proc.wait(timeout=_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if os.fstat(out.fileno()).st_size > MAX_OUTPUT_SPOOL:
                    why = f"printed more than {MAX_OUTPUT_SPOOL // (1024 * 1024)} MiB"
                elif time.monotonic() >= deadline:
                    why = f"timed out after {timeout:g} s"
                if why:
                    kill_tree(proc)
                    proc.wait()
                    code = None
                    break
        finally:
            if track is not None:
                track(None)
        out.seek(0)
        return code, out.read(MAX_OUTPUT_READ), why


def run_rule(rule: Mapping[str, Any], package_version: str, *, values: Mapping[str, str], env: Mapping[str, str],
             cwd: Path, timeout: float = DETECT_TIMEOUT_SECONDS, registry: RegistryReader | None = None,
             track: Callable[[ProcessRecord | None], None] | None = None) -> Detected | None:
    """Run one detection rule (already checked): the version found, or None when the software is not there.

    ``values`` fill ``${PYTHON}``, ``${ROOT}`` and ``${PACKAGE_DIR}``; ``env``
    is the command's environment and fills the other placeholders.
    ``registry`` reads registry values; without one a registry rule does not
    match. Present without a readable version is ``package_version``.
    """
    pattern = rule.get("versionPattern")
    try:
        if "command" in rule:
            argv = [_expand(arg, values, env) for arg in rule["command"]]
            limit = min(timeout, float(rule.get("timeoutSeconds") or timeout))
            code, output, why = _run(argv, cwd, env, limit, track)
            if why:
                log.warning("detect command %s: %s", argv[0], why)
                return None
            if code != 0:
                return None
            found = _version_in(_decode(output), pattern)
            how = f"command {argv[0]} exited 0"
        elif "file" in rule:
            path = Path(_expand(rule["file"], values, env))
            try:
                st = path.stat()
            except OSError:
                return None
            found = None
            if pattern is not None and stat.S_ISREG(st.st_mode):
                try:
                    with open(path, "rb") as handle:
                        found = _version_in(_decode(handle.read(MAX_FILE_READ)), pattern)
                except OSError as exc:
                    log.info("detect: cannot read %s: %s", path, exc.strerror or exc)
            how = f"file {path} exists"
        else:
            if registry is None:
                return None
            key = _expand(rule["registry"]["key"], values, env)
            try:
                data = registry(key, rule["registry"]["value"])
            except Exception as exc:  # noqa: BLE001 - a reader is the far edge: any failure means not found
                log.info("detect: registry %s: %s", key, exc)
                return None
            if data is None:
                return None
            found = _version_in(data[:MAX_REGISTRY_DATA], pattern)
            how = f"registry {key}\\{rule['registry']['value']} is set"
    except _Unresolved as exc:
        log.info("detect: %s", exc)
        return None
    if found is None:
        return Detected(package_version, f"{how}, no version read: taken as {package_version}")
    return Detected(found, f"{how}, version {found}")


def installed_version(layout: Layout, name: str, version: str, installer: InstallerSpec, *,
                      registry: RegistryReader | None = None) -> Detected | None:
    """The version of ``name`` installed on this machine per its package's detection rule; None if not found.

    ``version`` and ``installer`` are those of the package document the rule
    comes from. Without a rule there is nothing to ask (None): the receipts
    alone say what is installed.
    """
    rule = installer.detection
    if rule is None:
        return _native(layout, version, installer)
    package_dir = layout.package_dir(name, version)
    env = command_env(layout, name, version)
    values = {"PYTHON": sys.executable, "ROOT": str(layout.root), "PACKAGE_DIR": str(package_dir)}
    cwd = package_dir if package_dir.is_dir() else layout.root
    return run_rule(rule, version, values=values, env=env, cwd=cwd,
                    timeout=min(installer.timeout_seconds, DETECT_TIMEOUT_SECONDS),
                    registry=registry if registry is not None else default_registry_reader(),
                    track=lambda record: _track_detect(layout, record))


def has_detection(layout: Layout, installer: InstallerSpec) -> bool:
    """Whether the agent can tell, receipt or not, that this package is installed: a rule, or a native type
    whose database it can read (an msi's needs the Windows registry; elsewhere its receipt alone says it)."""
    if installer.detection is not None:
        return True
    if installer.type == "msi":
        return layout.reads_registry
    return installer.type in NATIVE_DETECTED


NATIVE_DETECTED = ("msi", "deb", "rpm")
"""Installer types whose own package database answers without a rule: dpkg, rpm, the msi product code."""


def _native(layout: Layout, version: str, installer: InstallerSpec) -> Detected | None:
    """What the package database says of an msi, deb or rpm package (its own detection, without a rule).

    A deb or rpm is at the version dpkg or rpm reports. An msi product code
    names one product version (a new version ships a new code), so its
    Uninstall key means this package's version is installed, whatever
    ``DisplayVersion`` spells.
    """
    if installer.type not in NATIVE_DETECTED:
        return None
    found = native_version(layout, installer)
    if found is None:
        return None
    if installer.type == "msi":
        return Detected(version, f"product code {installer.product_code} registered")
    tool = "dpkg" if installer.type == "deb" else "rpm"
    return Detected(found, f"{tool} reports {installer.package_name} {found}")


# ---------------------------------------------------------------- remembered rules


@dataclass(frozen=True)
class Remembered:
    """The detection rule of a package name, with the package version and installer it came with."""

    name: str
    version: str
    installer: InstallerSpec


def remember(layout: Layout, name: str, version: str, installer: InstallerSpec) -> None:
    """Keep the rule of a verified install action for the check-ins to come (a package without one: forget)."""
    if not has_detection(layout, installer):
        forget(layout, name)
        return
    layout.detections.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.detection(name), {"name": name, "version": version, "installer": installer.to_dict()})


def forget(layout: Layout, name: str) -> None:
    layout.detection(name).unlink(missing_ok=True)


def remembered(layout: Layout) -> dict[str, Remembered]:
    """Every readable remembered rule by package name (an unreadable file is quarantined)."""
    if not layout.detections.is_dir():
        return {}
    out: dict[str, Remembered] = {}
    for path in sorted(layout.detections.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("name") != path.stem:
                raise ValueError("does not name its package")
            version = doc.get("version")
            if not isinstance(version, str) or not names.is_version(version):
                raise ValueError(f"invalid version {version!r:.40}")
            installer = InstallerSpec.from_dict(doc.get("installer"))
        except (OSError, ValueError, InstallError) as exc:
            quarantine(path, str(exc))
            continue
        out[path.stem] = Remembered(path.stem, version, installer)
    return out


# ---------------------------------------------------------------- inventory


def _rule_of(layout: Layout, receipt: Receipt | None, rule: Remembered | None) -> tuple[str, InstallerSpec] | None:
    """The rule to ask for a name: the last one an action brought, else the one its receipt was installed with."""
    if rule is not None:
        return rule.version, rule.installer
    if receipt is not None and has_detection(layout, receipt.installer):
        return receipt.version, receipt.installer
    return None


def installed(layout: Layout, name: str, receipt: Receipt | None, rule: Remembered | None, *,
              registry: RegistryReader | None = None) -> protocol.InventoryEntry | None:
    """What the check-in reports for one package name, or None for "not installed".

    Without a detection rule: the receipt, confirmed (files present and
    unchanged, ``installer.detect`` exits 0). With one: what the rule finds.
    The receipt's version found by the rule still needs the receipt confirmed
    (drift in a ``files`` package is drift, whatever the rule says); another
    version found is reported as ``detected``: it was installed by other
    means since.
    """
    asked = _rule_of(layout, receipt, rule)
    if asked is None:
        if receipt is not None and is_present(layout, receipt):
            return {"name": name, "version": receipt.version}  # no source: its own receipt ("reconciler")
        return None
    version, installer = asked
    found = installed_version(layout, name, version, installer, registry=registry)
    if found is None:
        return None
    if receipt is not None and found.version == receipt.version:
        # the package database answered (no rule): the receipt's confirmation need not ask it again
        if not is_present(layout, receipt, found.version if installer.detection is None else None):
            return None
        if receipt.origin == "reconciler":
            return {"name": name, "version": found.version}
    return {"name": name, "version": found.version, "source": "detected"}


DEFAULT_DETECT_SECONDS: Final = 600.0
"""The agent's ``--detect-interval`` by default: a package is asked again at most every ten minutes."""
MAX_DETECT_SECONDS: Final = 7 * 86400.0
"""The longest ``--detect-interval`` accepted (a week): drift must still be found."""


@dataclass(frozen=True)
class _Answer:
    asked: str  # the receipt and rule the answer was asked with (:func:`_asked_with`)
    at: float  # the cache's clock when it was asked
    entry: protocol.InventoryEntry | None  # None: not installed


class DetectionCache:
    """The last answer per package name, reused while younger than ``interval`` seconds (0: never reused).

    ``clock`` is a monotonic clock (tests inject one). An answer is only
    reused for the same receipt and remembered rule it was asked with, so
    anything that rewrites either (an install, an adoption, a repair, an
    uninstall) asks again at the next check-in; :meth:`forget` drops a name
    outright (the agent calls it after every action it ran for that package).
    """

    def __init__(self, interval: float = DEFAULT_DETECT_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = float(interval)
        self.clock = clock
        self._answers: dict[str, _Answer] = {}
        self.asked = 0  # packages actually asked since the cache was made (for logs and benchmarks)

    def fresh(self, name: str, asked: str, now: float) -> _Answer | None:
        answer = self._answers.get(name)
        if answer is None or answer.asked != asked or not 0 <= now - answer.at < self.interval:
            return None
        return answer

    def store(self, name: str, asked: str, now: float, entry: protocol.InventoryEntry | None) -> None:
        self._answers[name] = _Answer(asked, now, entry)
        self.asked += 1

    def forget(self, name: str | None = None) -> None:
        """Ask ``name`` again at the next check-in (every name when None)."""
        if name is None:
            self._answers.clear()
        else:
            self._answers.pop(name, None)

    def keep_only(self, names_: set[str]) -> None:
        for name in [n for n in self._answers if n not in names_]:
            del self._answers[name]


def _asked_with(receipt: Receipt | None, rule: Remembered | None) -> str:
    """What an answer depends on besides the machine: the receipt and remembered rule, as one string."""
    return json.dumps([None if receipt is None else receipt.to_dict(),
                       None if rule is None else [rule.version, rule.installer.to_dict()]], sort_keys=True)


def inventory(layout: Layout, *, registry: RegistryReader | None = None,
              cache: DetectionCache | None = None) -> list[protocol.InventoryEntry]:
    """The ``inventory`` of a check-in: every receipt and every remembered rule, each asked (:func:`installed`).

    With a ``cache``, a package's answer younger than its interval is reused
    instead of asking again (the receipts and rules themselves are read every
    time: that is a file read each, no process).
    """
    settle_detect(layout)
    receipts = {r.name: r for r in read_receipts(layout)}
    rules = remembered(layout)
    out: list[protocol.InventoryEntry] = []
    wanted = set(receipts) | set(rules)
    if cache is not None:
        cache.keep_only(wanted)
    for name in sorted(wanted):
        receipt, rule = receipts.get(name), rules.get(name)
        asked = now = None
        if cache is not None:
            asked, now = _asked_with(receipt, rule), cache.clock()
            answer = cache.fresh(name, asked, now)
            if answer is not None:
                if answer.entry is not None:
                    out.append(answer.entry.copy())
                continue
        try:
            entry = installed(layout, name, receipt, rule, registry=registry)
        except (OSError, InstallError) as exc:  # one package's trouble must not cost the whole check-in
            log.error("detecting %s failed: %s", name, getattr(exc, "message", None) or exc)
            if cache is not None:
                cache.forget(name)  # asked again at the next check-in
            continue
        if cache is not None and asked is not None and now is not None:
            cache.store(name, asked, now, entry)
        if entry is not None:
            out.append(entry)
    return out


def installed_now(layout: Layout, name: str) -> protocol.InventoryEntry | None:
    """One package name as the next check-in would report it (the dependency check asks this)."""
    return installed(layout, name, read_receipt(layout, name), remembered(layout).get(name))
