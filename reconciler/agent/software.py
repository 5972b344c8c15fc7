"""The operating system's software inventory: what dpkg, rpm, the Windows registry or pkgutil list as installed.

The agent's ``inventory`` holds only what reconciler installed (its
receipts). This module reads what is really on the machine, for admins who
need to see it (README, "Software inventory"):

* **Debian/Ubuntu**: ``dpkg-query -W`` (packages whose status is ``install
  ok installed``), source ``dpkg``.
* **RHEL family**: ``rpm -qa``, source ``rpm``; the version is
  ``[epoch:]version-release``.
* **Windows**: the Uninstall keys of the registry (HKLM in its 64- and
  32-bit views, and HKCU): ``DisplayName`` and ``DisplayVersion``; entries
  without a DisplayName or with ``SystemComponent`` = 1 (parts of other
  products, hidden from "Apps & features" too) are skipped. Source
  ``registry``. ``winreg`` is imported only on Windows, by the default
  reader; :func:`registry_entries` takes any reader.
* **macOS**: ``pkgutil --pkgs``, then ``pkgutil --pkg-info`` per package,
  source ``pkgutil``.

The collector is chosen by platform and by which tool exists (on Linux,
dpkg when its database exists, else rpm). Every command runs with a timeout
and its output is read up to :data:`MAX_OUTPUT` bytes; whatever it prints
beyond is not read. The list is then bounded (:func:`bound`): control
characters and undecodable bytes are removed, names and versions cut to
``protocol.MAX_SOFTWARE_NAME``/``MAX_SOFTWARE_VERSION`` characters,
duplicates dropped, entries sorted, and at most ``protocol.MAX_SOFTWARE``
entries kept whose JSON fits ``protocol.MAX_SOFTWARE_BYTES``; how many were
cut is ``omitted``, which the check-in reports (``softwareOmitted``).

Where a test or an odd installation keeps its database elsewhere, the
collectors take it as a parameter (``dpkg_admindir``, ``rpm_root``) and a
command prefix (``prefix``, e.g. ``["chroot", DIR]``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import protocol

SOURCES = protocol.SOFTWARE_SOURCES
COMMAND_TIMEOUT = 120.0  # seconds one collection may take, all its commands together
MAX_OUTPUT = 32 * 1024 * 1024  # bytes of a command's output read
DEFAULT_INTERVAL_MINUTES = 60.0
DPKG_ADMINDIR = Path("/var/lib/dpkg")

_UNWANTED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Collected:
    """One collection: the bounded entries, how many were cut, and what went wrong (None: nothing)."""

    entries: tuple[protocol.SoftwareEntry, ...]
    omitted: int = 0
    error: str | None = None

    @property
    def digest(self) -> str:
        return protocol.software_digest(list(self.entries), self.omitted)


class CollectError(Exception):
    """A collector could not run (tool missing, timed out, failed)."""


# ------------------------------------------------------------------ bounds


def clean(text: str, limit: int) -> str:
    """``text`` without control characters or undecodable bytes, whitespace runs made one space, cut to ``limit``."""
    text = _SPACES.sub(" ", _UNWANTED.sub(" ", text)).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def bound(raw: Iterable[tuple[str, str, str]]) -> tuple[tuple[protocol.SoftwareEntry, ...], int]:
    """Cleaned, deduplicated, sorted entries within the protocol's limits, and how many were cut.

    Entries without a name after cleaning are dropped silently (they name
    nothing); entries beyond ``MAX_SOFTWARE``, or past ``MAX_SOFTWARE_BYTES``
    of JSON, are cut from the end of the sorted list and counted.
    """
    seen: set[tuple[str, str, str]] = set()
    for name, version, source in raw:
        entry = (clean(name, protocol.MAX_SOFTWARE_NAME), clean(version, protocol.MAX_SOFTWARE_VERSION), source)
        if entry[0] and source in SOURCES:
            seen.add(entry)
    ordered = sorted(seen, key=lambda e: (e[0].lower(), e[0], e[1], e[2]))
    kept: list[protocol.SoftwareEntry] = []
    size = 2
    for name, version, source in ordered[: protocol.MAX_SOFTWARE]:
        item: protocol.SoftwareEntry = {"name": name, "version": version, "source": source}
        size += len(json.dumps(item)) + 2  # as the check-in's JSON carries it (ASCII, ", " between items)
        if size > protocol.MAX_SOFTWARE_BYTES:
            break
        kept.append(item)
    return tuple(kept), len(ordered) - len(kept)


# ------------------------------------------------------------------ running tools


def run_tool(argv: Sequence[str], deadline: float, max_output: int = MAX_OUTPUT) -> str:
    """The standard output of ``argv`` (decoded leniently), read up to ``max_output`` bytes before ``deadline``.

    :class:`CollectError` if it cannot start, runs past the deadline (it is
    killed) or exits non-zero. Output beyond ``max_output`` is not read: the
    command is stopped and what was read is used.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise CollectError(f"{argv[0]}: no time left")
    try:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C.UTF-8"})
    except OSError as e:
        raise CollectError(f"{argv[0]}: cannot run: {e.strerror or e}") from None
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        process.kill()

    timer = threading.Timer(remaining, kill)
    timer.daemon = True
    timer.start()
    chunks: list[bytes] = []
    size = 0
    cut = False
    errors = b""
    try:
        assert process.stdout is not None and process.stderr is not None
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk[: max_output - size])
            size += len(chunk)
            if size >= max_output:
                cut = True
                process.kill()
                break
        errors = process.stderr.read(4096) if not cut else b""
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
    if timed_out.is_set():
        raise CollectError(f"{argv[0]}: timed out")
    if code != 0 and not cut:
        said = clean(errors.decode("utf-8", errors="replace"), 200)
        raise CollectError(f"{argv[0]}: exit code {code}" + (f": {said}" if said else ""))
    text = b"".join(chunks).decode("utf-8", errors="replace")
    if cut:  # the last line may be incomplete
        text = text.rpartition("\n")[0]
    return text


# ------------------------------------------------------------------ dpkg

DPKG_FORMAT = "${db:Status-Status}\\t${Package}\\t${Version}\\n"


def dpkg_command(admindir: Path | None = None, prefix: Sequence[str] = ()) -> list[str]:
    """``dpkg-query`` listing every package with its status, name and version (``admindir``: another database)."""
    argv = [*prefix, "dpkg-query"]
    if admindir is not None:
        argv.append(f"--admindir={admindir}")
    return [*argv, "-W", f"-f={DPKG_FORMAT}"]


def parse_dpkg(text: str) -> list[tuple[str, str, str]]:
    """Entries of :data:`DPKG_FORMAT` output: only packages whose status is ``installed``.

    ``${db:Status-Status}`` is the third word of the ``Status`` field
    (``install ok installed``); config-files, half-installed and unpacked
    packages are not installed.
    """
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == "installed":
            out.append((parts[1], parts[2], "dpkg"))
    return out


# ------------------------------------------------------------------ rpm

RPM_FORMAT = "%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n"


def rpm_command(root: Path | None = None, prefix: Sequence[str] = ()) -> list[str]:
    """``rpm -qa`` with name and ``[epoch:]version-release`` per line (``root``: the database of another root)."""
    argv = [*prefix, "rpm", "-qa"]
    if root is not None:  # the database inside the root, as the agent's --rpm-root installs keep it
        argv += ["--root", str(root), "--dbpath", "/var/lib/rpm"]
    return [*argv, "--qf", RPM_FORMAT]


def parse_rpm(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        name, tab, version = line.partition("\t")
        if tab and name:
            out.append((name, version, "rpm"))
    return out


# ------------------------------------------------------------------ Windows registry

UNINSTALL_KEY = r"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall"

RegistryReader = Callable[[], Iterable[Mapping[str, Any]]]
"""Yields the values of every subkey of the Uninstall keys (value name -> data)."""


def registry_entries(values: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """Entries of Uninstall subkeys: DisplayName and DisplayVersion; hidden system components are skipped."""
    out: list[tuple[str, str, str]] = []
    for item in values:
        name = item.get("DisplayName")
        if not isinstance(name, str) or not name.strip():
            continue
        if item.get("SystemComponent") in (1, "1"):
            continue
        version = item.get("DisplayVersion")
        out.append((name, version if isinstance(version, str) else "", "registry"))
    return out


def windows_registry() -> Iterable[Mapping[str, Any]]:  # pragma: no cover - runs on Windows only
    """The values of each Uninstall subkey: HKLM (64- and 32-bit views) and HKCU."""
    winreg: Any = importlib.import_module("winreg")  # Windows only: imported where it exists

    views = ((winreg.HKEY_LOCAL_MACHINE, winreg.KEY_WOW64_64KEY), (winreg.HKEY_LOCAL_MACHINE, winreg.KEY_WOW64_32KEY),
             (winreg.HKEY_CURRENT_USER, 0))
    for hive, view in views:
        try:
            key = winreg.OpenKey(hive, UNINSTALL_KEY, 0, winreg.KEY_READ | view)
        except OSError:
            continue
        with key:
            index = 0
            while index < 100_000:
                try:
                    sub = winreg.EnumKey(key, index)
                except OSError:
                    break
                index += 1
                values: dict[str, Any] = {}
                try:
                    with winreg.OpenKey(key, sub, 0, winreg.KEY_READ | view) as handle:
                        for value in ("DisplayName", "DisplayVersion", "SystemComponent"):
                            try:
                                values[value] = winreg.QueryValueEx(handle, value)[0]
                            except OSError:
                                pass
                except OSError:
                    continue
                yield values


# ------------------------------------------------------------------ macOS pkgutil


def parse_pkgs(text: str) -> list[str]:
    """Package ids of ``pkgutil --pkgs`` output."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_pkg_info(text: str) -> tuple[str, str] | None:
    """(package id, version) of ``pkgutil --pkg-info ID`` output, or None without a package-id line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    package = fields.get("package-id")
    return None if not package else (package, fields.get("version", ""))


def collect_pkgutil(deadline: float, prefix: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    ids = parse_pkgs(run_tool([*prefix, "pkgutil", "--pkgs"], deadline))
    out: list[tuple[str, str, str]] = []
    for package in ids[: protocol.MAX_SOFTWARE]:
        try:
            info = parse_pkg_info(run_tool([*prefix, "pkgutil", "--pkg-info", package], deadline, 64 * 1024))
        except CollectError:
            if time.monotonic() >= deadline:
                raise
            continue  # forgotten between the two calls
        if info is not None:
            out.append((info[0], info[1], "pkgutil"))
    return out


# ------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class Collector:
    """Where to look: the defaults read this machine; tests and odd installs point elsewhere."""

    platform: str = sys.platform
    dpkg_admindir: Path | None = None  # None: dpkg's own (/var/lib/dpkg)
    rpm_root: Path | None = None  # None: rpm's own database (rpm --root)
    prefix: tuple[str, ...] = ()  # a command prefix for every tool, e.g. ("chroot", "/mnt/image")
    registry: RegistryReader | None = None  # None: the real registry (on Windows)
    timeout: float = COMMAND_TIMEOUT
    which: Callable[[str], str | None] = shutil.which

    def kind(self) -> str | None:
        """The collector this machine gets: ``dpkg``, ``rpm``, ``registry``, ``pkgutil`` or None."""
        if self.platform.startswith("win") or self.registry is not None:
            return "registry"
        if self.platform == "darwin":
            return "pkgutil" if self.prefix or self.which("pkgutil") else None
        admindir = self.dpkg_admindir or DPKG_ADMINDIR
        if (self.prefix or self.which("dpkg-query")) and (self.prefix or (admindir / "status").is_file()):
            return "dpkg"
        if self.prefix or self.which("rpm"):
            return "rpm"
        return None

    def collect(self) -> Collected:
        """The bounded list; an empty one with ``error`` set when no collector applies or it failed."""
        kind = self.kind()
        deadline = time.monotonic() + self.timeout
        try:
            if kind == "dpkg":
                raw = parse_dpkg(run_tool(dpkg_command(self.dpkg_admindir, self.prefix), deadline))
            elif kind == "rpm":
                raw = parse_rpm(run_tool(rpm_command(self.rpm_root, self.prefix), deadline))
            elif kind == "registry":
                reader = self.registry or windows_registry
                raw = registry_entries(_bounded_iter(reader(), protocol.MAX_SOFTWARE * 4))
            elif kind == "pkgutil":
                raw = collect_pkgutil(deadline, self.prefix)
            else:
                return Collected((), 0, f"no software inventory on {self.platform}: found none of dpkg-query, "
                                        "rpm, pkgutil")
        except CollectError as e:
            return Collected((), 0, str(e))
        except OSError as e:  # the registry, or a pipe
            return Collected((), 0, f"{kind}: {e.strerror or e}")
        entries, omitted = bound(raw)
        return Collected(entries, omitted)


def _bounded_iter(items: Iterable[Mapping[str, Any]], limit: int) -> Iterable[Mapping[str, Any]]:
    for index, item in enumerate(items):
        if index >= limit:
            return
        yield item
