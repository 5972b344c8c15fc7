"""Installing and removing packages on the client, and the receipts that record them.

Layout under the agent root (see :class:`Layout`)::

    token                         per-client token from registration (0600)
    receipts/<name>.json          one per installed package name: the inventory
    packages/<name>/<version>/    the unpacked artifact
    cache/<sha256>                verified downloads (``<sha256>.part`` while in flight)
    journal/                      operations (see ``journal.py``), and per operation
    journal/<key>/                its supervised commands (see ``supervisor.py``)
    detect-process.json           the ``detect`` command running right now, if any
    detections/<name>.json        the detection rule (spec.detect) of a package last asked about
    content/<name>.json           per-file digests of an installed ``files`` package (drift)

Two installer types (DESIGN section 6):

``files``
    the unpacked artifact *is* the installation.
``command``
    the artifact is unpacked the same way, then the ``install`` argv runs in that
    directory; the directory stays, because ``uninstall`` runs there too.

and four native ones, whose artifact is a single file copied into the package
directory and handed to the operating system's installer (``native.py``;
docs/INSTALLERS.md has the exact commands and exit codes):

``msi``
    ``msiexec /i`` the file, ``msiexec /x`` the product code; present while the
    product code's Uninstall registry key exists.
``exe``
    the file itself runs with the spec's ``install`` arguments; ``uninstall``
    and ``detect`` are argvs as for ``command``.
``deb`` / ``rpm``
    ``dpkg -i`` / ``rpm -U`` the file, ``dpkg -r`` / ``rpm -e`` the package
    name; present while the package manager reports the receipt's version.
    A new version replaces the old one in place (no uninstall first).

``command`` and ``exe`` declare which exit codes mean success
(``successExitCodes``, default ``[0]``) and success with a reboot required
(``rebootExitCodes``); ``msi`` adds its own to 0 and 3010/1641.

Archives come from the network, so they are checked member by member *before*
anything is extracted: absolute paths, ``..``, links whose target leaves the
package directory, members written through a symlink, and device or special
files all refuse the whole archive, and nothing is installed. Extraction goes
to a staging directory that replaces ``packages/<name>/<version>`` with one
rename, so a killed agent leaves either the old tree or the new one (stale
staging directories are swept before the next install of that name).

Commands run without a shell, with a timeout that kills the whole process
group, and the tail of their combined output, its secrets masked
(:func:`shown_output`), becomes the status message.
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

A command runs in its own session, so it survives a ``kill -9`` of the agent.
The ``install`` and ``uninstall`` commands of an operation therefore run under
a supervisor process that records their exit status in the operation's
directory (``supervisor.py``): each runs at most once per operation, and an
operation resumed after a crash takes the recorded result instead of running
the command again. Once the install command has run, resuming skips the
unpacking, so whatever the command did in the package directory stays. A
``detect`` command is only a question, asked again at each detection (the
agent's ``--detect-interval``, detection.py), so it runs directly; it is recorded in ``detect-process.json`` while it runs, and a
restarted agent waits for (or kills) one left running before detecting again
(``processes.settle_orphan``).

A receipt is written only after a successful install, atomically; its presence
is what "installed" means. A receipt whose installer has a ``detect`` argv is
confirmed by running it (exit 0 = present), and a ``files`` package whose
directory vanished, or whose content changed (``content.py``: the receipt
records a digest of the tree), counts as absent, so drift is reported and
healed. A package's detection rule (``spec.detect``, ``detection.py``) can
also find a version installed by other means; a receipt adopting such an
installation is marked ``"origin": "detected"``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from reconciler import names
from reconciler.agent import content, native
from reconciler.agent.errors import InstallError
from reconciler.agent.journal import operation_key
from reconciler.agent.processes import (
    DEFAULT_OUTPUT_TAIL,
    CommandResult,
    ProcessHook,
    ProcessRecord,
    kill_tree,
    output_tail,
    process_start_time,
    session_options,
    settle_orphan,
)
from reconciler.agent.supervisor import run_supervised, start_supervised, stored_result
from reconciler.detection_rules import rule_problems
from reconciler.fileio import quarantine, write_json_atomic
from reconciler.redaction import (
    MAX_REDACT_PATTERNS,
    compile_redact_patterns,
    redact_output,
    redact_pattern_problem,
)
from reconciler.times import format_time, utc_now

log = logging.getLogger("reconciler.agent")

DEFAULT_TIMEOUT_SECONDS = 600.0
DETECT_TIMEOUT_SECONDS = 60.0

# Names and versions become directory names: one path segment, no leading dot
# (dot-entries are the agent's own staging directories). A shape of its own, wider
# than ``names.NAME`` and ``names.VERSION``: it guards paths, and keeps every
# receipt written under it readable.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")

NATIVE_TYPES = ("msi", "exe", "deb", "rpm")  # a single-file artifact handed to the OS's installer
INSTALLER_TYPES = ("files", "command", *NATIVE_TYPES)
COMMAND_TYPES = ("command", *NATIVE_TYPES)  # types whose install runs a command
MAX_EXIT_CODES = 32
MAX_EXIT_CODE = 4294967295  # a Windows exit code is a 32-bit DWORD; a POSIX one is 0-255
MAX_MSI_PROPERTIES = 64
MAX_MSI_PROPERTY_VALUE = 1024


class UnsafeArchiveError(InstallError):
    """An archive member would land outside the package directory (or is a device)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"refused archive member {member!r}: {reason}")
        self.member = member


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the agent root; the only place paths are built."""

    root: Path
    # Characters of a command's output kept in its status message (the agent's --output-tail).
    output_tail: int = DEFAULT_OUTPUT_TAIL
    # Who this client is, given to installer commands as RECONCILER_CLIENT_ID,
    # RECONCILER_OS and RECONCILER_ARCH (so a script can branch on the platform,
    # and --fact overrides reach it in simulations).
    client_env: tuple[tuple[str, str], ...] = ()
    # Seconds between full re-hashes of a ``files`` package's content; check-ins in between compare
    # stat signatures and re-hash only what changed (content.py; the agent's --rehash-interval).
    rehash_seconds: float = content.DEFAULT_REHASH_SECONDS
    # Sandbox roots for dpkg and rpm (the agent's --dpkg-root, --rpm-root); None: the system's own.
    dpkg_root: Path | None = None
    rpm_root: Path | None = None
    # Reads HKLM for msi presence (native.RegistryReader); None: the real registry (Windows only).
    registry: native.RegistryReader | None = field(default=None, compare=False)

    @property
    def token(self) -> Path:
        return self.root / "token"

    @property
    def relay_name(self) -> Path:
        """The name of the relay that last answered (sent back as ``lastRelay``: a move shows)."""
        return self.root / "relay"

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

    @property
    def detections(self) -> Path:
        return self.root / "detections"

    @property
    def contents(self) -> Path:
        return self.root / "content"

    def detection(self, name: str) -> Path:
        """The remembered detection rule of a package name (detection.py)."""
        return self.detections / f"{check_segment(name, 'package name')}.json"

    def content_index(self, name: str) -> Path:
        """The per-file digests of an installed ``files`` package (content.py)."""
        return self.contents / f"{check_segment(name, 'package name')}.json"

    @property
    def reads_registry(self) -> bool:
        """Whether an msi's presence can be asked of a Windows registry here (elsewhere its receipt says it)."""
        return self.registry is not None or sys.platform == "win32"

    def verified_mark(self, name: str) -> Path:
        """When a deb or rpm package's files were last verified unchanged (``dpkg --verify``, ``rpm -V``)."""
        return self.contents / f"{check_segment(name, 'package name')}.verified.json"

    def receipt(self, name: str) -> Path:
        return self.receipts / f"{check_segment(name, 'package name')}.json"

    def package_dir(self, name: str, version: str) -> Path:
        return (self.packages / check_segment(name, "package name")
                / check_segment(version, "package version"))

    def cached_artifact(self, sha256: str) -> Path:
        return self.cache / check_sha256(sha256)

    @property
    def installer_logs(self) -> Path:
        """Logs the native installers write (``msiexec /l*v``), one per package version and command."""
        return self.root / "logs"

    def installer_log(self, name: str, version: str, command: str) -> Path:
        return self.installer_logs / (f"{check_segment(name, 'package name')}-"
                                      f"{check_segment(version, 'package version')}-{command}.log")

    def operation_runs(self, operation_id: str) -> Path:
        """The directory of an operation's supervised commands, beside its journal entry."""
        return self.journal / operation_key(operation_id)

    def create(self) -> None:
        for directory in (self.root, self.receipts, self.packages, self.cache, self.journal):
            directory.mkdir(parents=True, exist_ok=True)


def check_segment(value: Any, what: str) -> str:
    """Refuse a name or version that is not one safe path segment."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise InstallError(f"invalid {what} {value!r}")
    return value


def check_sha256(value: Any) -> str:
    """Refuse anything but 64 lowercase hex digits (it becomes a file name)."""
    if not isinstance(value, str) or not names.is_sha256(value):
        raise InstallError(f"invalid sha256 {value!r}")
    return value


def _redact(value: Any) -> tuple[str, ...]:
    """``installer.redact``: absent, or a list of patterns that pass :func:`redact_pattern_problem`.

    The relay sends only patterns ``validate`` accepted, but the agent does not
    take its word: a pattern that cannot run safely fails the action before
    anything runs, rather than letting output through unmasked.
    """
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_REDACT_PATTERNS:
        raise InstallError(f"installer.redact must be a list of at most {MAX_REDACT_PATTERNS} patterns")
    for index, pattern in enumerate(value):
        if not isinstance(pattern, str):
            raise InstallError(f"installer.redact[{index}] must be a string")
        problem = redact_pattern_problem(pattern)
        if problem is not None:
            raise InstallError(f"installer.redact[{index}] {problem}")
    return tuple(value)


def _detection(value: Any) -> Mapping[str, Any] | None:
    """``installer.detection``: absent, or a rule :func:`rule_problems` accepts (else the action fails)."""
    if value is None:
        return None
    problems = rule_problems(value)
    if problems:
        where, message = problems[0]
        raise InstallError(f"installer.detection{'.' + where.replace('/', '.') if where else ''}: {message}")
    return dict(value)


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return compile_redact_patterns(patterns)


def shown_output(output: str, installer: InstallerSpec, tail: int) -> str:
    """What of a command's output may leave the client: secrets masked, then its last ``tail`` characters."""
    text = redact_output(output, installer.redact_patterns).strip()
    if len(text) <= tail:
        return text
    return "…" + text[len(text) - tail + 1:] if tail > 1 else ""


def _argv(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise InstallError(f"installer {what} must be a list of strings")
    return tuple(value)


def _exit_codes(value: Any, what: str) -> tuple[int, ...]:
    """``successExitCodes``/``rebootExitCodes``: absent, or a short list of distinct codes in the exit-code range."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_EXIT_CODES:
        raise InstallError(f"installer {what} must be a list of at most {MAX_EXIT_CODES} exit codes")
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= MAX_EXIT_CODE:
            raise InstallError(f"installer {what}: {code!r} is not an exit code (0 to {MAX_EXIT_CODE})")
    if len(set(value)) != len(value):
        raise InstallError(f"installer {what} lists a code twice")
    return tuple(value)


def _properties(value: Any) -> tuple[tuple[str, str], ...]:
    """An msi's ``properties``: PUBLIC_PROPERTY names to values msiexec can take on its command line."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_MSI_PROPERTIES:
        raise InstallError(f"installer properties must be an object of at most {MAX_MSI_PROPERTIES} entries")
    out = []
    for key, text in value.items():
        if not isinstance(key, str) or not native.MSI_PROPERTY.fullmatch(key) or len(key) > 128:
            raise InstallError(f"installer properties: {key!r} is not a public property name")
        if (not isinstance(text, str) or len(text) > MAX_MSI_PROPERTY_VALUE or '"' in text
                or any(ord(c) < 32 for c in text)):
            raise InstallError(f"installer properties: the value of {key} must be text without quotes or "
                               "control characters")
        out.append((key, text))
    return tuple(out)


def _native_name(value: Any, kind: str) -> str | None:
    if value is None:
        return None
    pattern = native.DEB_PACKAGE_NAME if kind == "deb" else native.RPM_PACKAGE_NAME
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InstallError(f"invalid packageName {value!r}")
    return value


@dataclass(frozen=True)
class InstallerSpec:
    """The ``installer`` object of an action (and of a receipt)."""

    type: str
    install: tuple[str, ...] = ()
    uninstall: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    redact: tuple[str, ...] = ()  # patterns masked in the command's output (spec.installer.redact)
    success_exit_codes: tuple[int, ...] = ()  # as declared; see exit_policy() for what applies
    reboot_exit_codes: tuple[int, ...] = ()
    product_code: str | None = None  # msi
    properties: tuple[tuple[str, str], ...] = ()  # msi, in spec order
    package_name: str | None = None  # deb, rpm
    # the package's spec.detect as the wire carries it (checked by detection_rules.rule_problems)
    detection: Mapping[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def from_dict(cls, data: Any) -> InstallerSpec:
        if not isinstance(data, dict):
            raise InstallError("installer must be an object")
        kind = data.get("type")
        if kind not in INSTALLER_TYPES:
            raise InstallError(f"unknown installer type {kind!r}")
        timeout = data.get("timeoutSeconds")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT_SECONDS
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InstallError(f"invalid timeoutSeconds {timeout!r}")
        product_code = data.get("productCode")
        if product_code is not None and (not isinstance(product_code, str)
                                         or not native.PRODUCT_CODE.fullmatch(product_code)):
            raise InstallError(f"invalid productCode {product_code!r}")
        spec = cls(kind, _argv(data.get("install"), "install"), _argv(data.get("uninstall"), "uninstall"),
                   _argv(data.get("detect"), "detect"), float(timeout), _redact(data.get("redact")),
                   _exit_codes(data.get("successExitCodes"), "successExitCodes"),
                   _exit_codes(data.get("rebootExitCodes"), "rebootExitCodes"),
                   product_code, _properties(data.get("properties")), _native_name(data.get("packageName"), kind),
                   _detection(data.get("detection")))
        if spec.type == "command" and not spec.install:
            raise InstallError("command installer has no install argv")
        if spec.type == "msi" and spec.product_code is None:
            raise InstallError("msi installer has no productCode")
        if spec.type in ("deb", "rpm") and spec.package_name is None:
            raise InstallError(f"{spec.type} installer has no packageName")
        both = set(spec.exit_policy().success) & set(spec.exit_policy().reboot)
        if both:
            raise InstallError(f"installer exit code {min(both)} is both success and reboot required")
        return spec

    def to_dict(self) -> dict[str, Any]:
        timeout: float | int = int(self.timeout_seconds) if self.timeout_seconds.is_integer() \
            else self.timeout_seconds
        data: dict[str, Any] = {"type": self.type, "install": list(self.install),
                                "uninstall": list(self.uninstall), "detect": list(self.detect),
                                "timeoutSeconds": timeout}
        if self.redact:
            data["redact"] = list(self.redact)
        if self.success_exit_codes:
            data["successExitCodes"] = list(self.success_exit_codes)
        if self.reboot_exit_codes:
            data["rebootExitCodes"] = list(self.reboot_exit_codes)
        if self.product_code is not None:
            data["productCode"] = self.product_code
        if self.properties:
            data["properties"] = dict(self.properties)
        if self.package_name is not None:
            data["packageName"] = self.package_name
        if self.detection is not None:
            data["detection"] = json.loads(json.dumps(self.detection))
        return data

    def exit_policy(self, uninstalling: bool = False) -> ExitPolicy:
        """What the exit codes of this installer's commands mean."""
        if self.type == "msi":
            return _posix_view(ExitPolicy((*native.MSI_SUCCESS_CODES, *self.success_exit_codes),
                                          (*native.MSI_REBOOT_CODES, *self.reboot_exit_codes),
                                          native.MSI_EXIT_MEANINGS,
                                          (native.MSI_NOT_INSTALLED,) if uninstalling else ()))
        if self.type == "exe":
            return _posix_view(ExitPolicy(self.success_exit_codes or (0,), self.reboot_exit_codes))
        if self.type == "command":
            return ExitPolicy(self.success_exit_codes or (0,), self.reboot_exit_codes)
        return ExitPolicy((0,), ())

    @property
    def redact_patterns(self) -> tuple[re.Pattern[str], ...]:
        """:attr:`redact` compiled (they were checked when the spec was read)."""
        return _compiled(self.redact)


def _posix_view(policy: ExitPolicy, platform: str = sys.platform) -> ExitPolicy:
    """A Windows installer's exit codes as a POSIX system sees them: only their low 8 bits.

    Windows reports a process's whole 32-bit exit code; POSIX keeps 8 bits of
    it, so an ``msiexec`` or ``.exe`` run elsewhere (a compatibility layer, a
    stand-in) that exits 3010 is seen as 194. Off Windows, each declared code
    above 255 also matches its low 8 bits, unless those already mean
    something else in the policy. On Windows the policy is as declared.
    """
    if platform == "win32":
        return policy
    taken = {*policy.success, *policy.reboot, *policy.absent}
    meanings = dict(policy.meanings)

    def low(codes: tuple[int, ...]) -> tuple[int, ...]:
        extra = []
        for code in codes:
            seen = code & 0xFF
            if code > 0xFF and seen not in taken:
                taken.add(seen)
                extra.append(seen)
                meanings[seen] = (f"{native.exit_meaning(code, policy.meanings)} as a POSIX exit status "
                                  f"(its low 8 bits)")
        return (*codes, *extra)

    success, reboot, absent = low(policy.success), low(policy.reboot), low(policy.absent)
    for code, meaning in policy.meanings.items():  # a failure's message still says what the code likely was
        if code > 0xFF:
            meanings.setdefault(code & 0xFF, f"{meaning}, if it was exit code {code}")
    return ExitPolicy(success, reboot, meanings, absent)


@dataclass(frozen=True)
class ExitPolicy:
    """Exit codes that mean success, success with a reboot required, and "was not installed" (an uninstall's
    success); any other code fails, its message naming the code and, from ``meanings``, what it means."""

    success: tuple[int, ...] = (0,)
    reboot: tuple[int, ...] = ()
    meanings: Mapping[int, str] = field(default_factory=dict)
    absent: tuple[int, ...] = ()


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
    # "reconciler": this agent installed it; "detected": found installed by the package's detection
    # rule before an install, and adopted without running anything (detection.py)
    origin: str = "reconciler"
    # a ``files`` package: the digest of its whole directory (content.py; the per-file index is beside it)
    content: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "installer": self.installer.to_dict(),
               "operationId": self.operation_id, "installedAt": self.installed_at,
               "artifact": dict(self.artifact)}
        if self.origin != "reconciler":
            out["origin"] = self.origin
        if self.content is not None:
            out["content"] = dict(self.content)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Receipt:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        name = check_segment(data.get("name"), "package name")
        version = check_segment(data.get("version"), "package version")
        artifact = data.get("artifact") or {}
        origin = data.get("origin", "reconciler")
        if origin not in ("reconciler", "detected"):
            raise ValueError(f"unknown origin {origin!r:.40}")
        digest = data.get("content")
        return cls(name, version, InstallerSpec.from_dict(data.get("installer")),
                   str(data.get("operationId", "")), str(data.get("installedAt", "")),
                   artifact if isinstance(artifact, dict) else {}, origin,
                   digest if isinstance(digest, dict) else None)


@dataclass(frozen=True)
class Outcome:
    """A successful action: the exit code of the command (0 for ``files``), a message, and whether the
    installer asked for a reboot (an exit code it declares as "success, reboot required")."""

    exit_code: int
    message: str
    reboot_required: bool = False


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


def is_present(layout: Layout, receipt: Receipt, found: str | None = None) -> bool:
    """Confirm a receipt against the machine: files still there and unchanged, ``detect`` still exits 0.

    A receipt adopted from detection (``origin: detected``) has no package
    directory of ours: the package's detection rule confirms it (detection.py).
    ``found`` is what the package database reported for an msi, deb or rpm
    package just now, when the caller asked already: it is not asked again.
    """
    package_dir = layout.package_dir(receipt.name, receipt.version)
    if receipt.origin == "reconciler" and receipt.installer.type == "files":
        if not package_dir.is_dir():
            return False
        if receipt.content is not None:
            changes = content.check(package_dir, layout.content_index(receipt.name),
                                    receipt.content.get("digest"), layout.rehash_seconds)
            if changes is not None:
                log.warning("drift: %s %s changed on disk (%s); it is reported as not installed, so it is "
                            "installed again", receipt.name, receipt.version, changes)
                return False
    if receipt.installer.type in ("msi", "deb", "rpm"):
        if receipt.installer.type == "msi" and not layout.reads_registry:
            return True  # no Windows registry to ask (a compatibility layer, a stand-in): the receipt says it
        if found is None:
            found = native_version(layout, receipt.installer)
        if receipt.installer.type == "msi":
            return found is not None
        # another version installed by hand is drift too
        return found == receipt.version and not _native_drift(layout, receipt)
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


def _native_drift(layout: Layout, receipt: Receipt, now: float | None = None) -> bool:
    """Whether a file of an installed deb or rpm package was edited or removed by hand (configuration aside).

    ``dpkg --verify`` and ``rpm -V`` read every file of the package, so they
    run once every ``rehash_seconds`` per package (the agent's
    ``--rehash-interval``, as for the full re-hash of ``files`` packages), not
    at every detection; a version change or a removal is seen at every
    detection (every ``--detect-interval``) by the version query. Only a clean verification is recorded: a
    drifted package stays drifted until it is installed again.
    """
    now = time.time() if now is None else now
    mark = layout.verified_mark(receipt.name)
    try:
        last = json.loads(mark.read_text(encoding="utf-8"))
        verified_at = float(last["verifiedAt"]) if last.get("version") == receipt.version else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        verified_at = None
    if verified_at is not None and 0 <= now - verified_at < layout.rehash_seconds:
        return False
    altered = native.package_changes(receipt.installer.type, receipt.installer.package_name or "",
                                     layout.dpkg_root if receipt.installer.type == "deb" else layout.rpm_root)
    if altered is None:
        return False  # the package manager could not be asked: nothing is known to have changed
    if altered:
        log.warning("drift: %s %s has %d changed file%s (%s); it is reported as not installed, so it is "
                    "installed again", receipt.name, receipt.version, len(altered),
                    "" if len(altered) == 1 else "s", ", ".join(altered[:5]))
        mark.unlink(missing_ok=True)
        return True
    mark.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(mark, {"version": receipt.version, "verifiedAt": now})
    return False


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


def substitute(argv: Sequence[str], root: Path, package_dir: Path) -> list[str]:
    """Replace ``${PYTHON}``, ``${ROOT}`` and ``${PACKAGE_DIR}`` in every argument."""
    values = {"${PYTHON}": sys.executable, "${ROOT}": str(root), "${PACKAGE_DIR}": str(package_dir)}
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def command_env(layout: Layout, name: str, version: str) -> dict[str, str]:
    """The environment of a package's commands: the agent's, plus who and where (module docstring)."""
    env = dict(os.environ)
    env.update(dict(layout.client_env))
    env.update({"RECONCILER_ROOT": str(layout.root), "RECONCILER_PACKAGE_DIR": str(layout.package_dir(name, version)),
                "RECONCILER_PACKAGE_NAME": name, "RECONCILER_PACKAGE_VERSION": version})
    return env


def run_command(argv: Sequence[str], cwd: Path, layout: Layout, name: str, version: str,
                timeout: float, track: ProcessHook | None = None) -> CommandResult:
    """Run a command directly, without a shell, in ``cwd``, killed after ``timeout`` seconds.

    For ``detect``, whose exit status is only wanted while the agent waits;
    ``install`` and ``uninstall`` run under a supervisor (:func:`_run_step`).
    Output goes to a temporary file rather than a pipe: a helper left running in
    the background could otherwise hold the pipe open and hang the agent.
    ``track`` is told about the process before the agent waits on it and again
    once it has ended; if recording fails, the command is killed, since an
    unrecorded command is one a restarted agent would not wait for.
    """
    args = substitute(argv, layout.root, layout.package_dir(name, version))
    env = command_env(layout, name, version)
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, **session_options())
        except OSError as exc:
            raise InstallError(f"cannot run {args[0]!r}: {exc.strerror or exc}") from exc
        if track is not None:
            try:  # the child is not reaped before wait(), so its start time is still readable
                track(ProcessRecord(proc.pid, process_start_time(proc.pid), format_time(utc_now()), timeout))
            except BaseException:
                kill_tree(proc)
                proc.wait()
                raise
        try:
            code: int | None = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait()
            code, timed_out = None, True
        if track is not None:
            track(None)
        return CommandResult(code, output_tail(out), timed_out)


def _step(layout: Layout, operation_id: str, command: str, version: str) -> Path:
    """Where one command of an operation keeps its attempts (``install-2.0``, ``uninstall-1.0``)."""
    return layout.operation_runs(operation_id) / f"{command}-{check_segment(version, 'package version')}"


def _run_step(layout: Layout, step: Path, argv: Sequence[str], cwd: Path, name: str, version: str,
              timeout: float, *, checked: bool = False) -> CommandResult:
    """Run an operation's command under a supervisor, or take the result it already has.

    ``checked``: the caller already asked :func:`stored_result` and got nothing.
    """
    args = substitute(argv, layout.root, layout.package_dir(name, version))
    env = command_env(layout, name, version)
    if checked:
        return start_supervised(step, args, cwd, env, timeout)
    return run_supervised(step, args, cwd, env, timeout)


def _checked(result: CommandResult, timeout: float, installer: InstallerSpec, tail: int,
             policy: ExitPolicy | None = None) -> Outcome:
    """Turn a finished command into an outcome, or the failure message the relay shows.

    ``policy`` says which exit codes succeed (default: 0 only). The output in it is
    masked and cut by :func:`shown_output` before anything else sees it.
    """
    result = CommandResult(result.exit_code, shown_output(result.output, installer, tail), result.timed_out,
                           result.error)
    if result.error is not None:
        raise InstallError(result.error)
    if result.timed_out:
        suffix = f": {result.output}" if result.output else ""
        raise InstallError(f"timed out after {timeout:g} s{suffix}")
    assert result.exit_code is not None
    policy = policy or ExitPolicy()
    code = result.exit_code
    if code in policy.reboot:
        return Outcome(code, result.output, reboot_required=True)
    if code not in policy.success and code not in policy.absent:
        raise InstallError(f"{native.exit_meaning(code, policy.meanings)}: {result.output or '(no output)'}", code)
    return Outcome(code, result.output)


# ---------------------------------------------------------------- native installers


def native_version(layout: Layout, installer: InstallerSpec) -> str | None:
    """The version the operating system reports for an msi, deb or rpm installer's product, or None.

    An msi product counts as present while its Uninstall key exists (its
    ``DisplayVersion`` is Windows Installer's ProductVersion, which need not be
    spelled like the spec's version); a deb or rpm package at the version its
    package manager reports.
    """
    if installer.type == "msi" and installer.product_code is not None:
        return native.msi_installed_version(installer.product_code, layout.registry)
    if installer.type == "deb" and installer.package_name is not None:
        return native.dpkg_installed_version(installer.package_name, layout.dpkg_root)
    if installer.type == "rpm" and installer.package_name is not None:
        return native.rpm_installed_version(installer.package_name, layout.rpm_root)
    return None


def _tool(name: str, layout: Layout) -> str:
    try:
        return native.find_tool(name)
    except native.NativeToolMissing as exc:
        raise InstallError(f"cannot install: {exc}") from None


def _query(argv: Sequence[str], what: str) -> str:
    """Run a read-only query of a package file; its output, or InstallError naming ``what`` failed."""
    try:
        result = native.run_query(argv)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"cannot read {what}: {exc}") from None
    if result.exit_code != 0:
        raise InstallError(f"cannot read {what}: exit code {result.exit_code}: {result.output.strip()[:300]}")
    return result.output


def check_package_file(layout: Layout, installer: InstallerSpec, file: Path, version: str) -> None:
    """Before anything is installed: the .deb or .rpm is the spec's ``packageName`` at the spec's ``version``.

    For rpm the spec's version is ``VERSION-RELEASE`` (``1.0-1``).
    """
    if installer.type == "deb":
        fields = native.parse_deb_fields(_query(native.deb_fields_argv(_tool("dpkg-deb", layout), file),
                                                f"the .deb {file.name}"))
        name, found = fields.get("Package"), fields.get("Version")
    elif installer.type == "rpm":
        words = _query(native.rpm_file_argv(_tool("rpm", layout), file), f"the .rpm {file.name}").split()
        name, found = (words[0], words[1]) if len(words) >= 2 else (None, None)
    else:
        return
    if name != installer.package_name:
        raise InstallError(f"{file.name} is package {name!r}, the spec's packageName is {installer.package_name!r}")
    if found != version:
        raise InstallError(f"{file.name} is {name} version {found!r}, the spec's version is {version!r}")


def native_install_argv(layout: Layout, installer: InstallerSpec, file: Path, name: str, version: str) -> list[str]:
    """The install command of a native installer for the artifact ``file`` (module docstring of ``native``)."""
    if installer.type == "msi":
        log_file = layout.installer_log(name, version, "install")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        return native.msi_install_argv(_tool("msiexec", layout), file, log_file, installer.properties)
    if installer.type == "exe":
        return [str(file), *installer.install]
    if installer.type == "deb":
        if layout.dpkg_root is not None:
            native.prepare_dpkg_root(layout.dpkg_root)
        return native.dpkg_install_argv(_tool("dpkg", layout), layout.dpkg_root, file)
    if installer.type == "rpm":
        return native.rpm_install_argv(_tool("rpm", layout), layout.rpm_root, file)
    return list(installer.install)


def native_uninstall_argv(layout: Layout, installer: InstallerSpec, name: str, version: str) -> list[str] | None:
    """The uninstall command of a receipt's installer; None when there is nothing to run."""
    if installer.type == "msi" and installer.product_code is not None:
        log_file = layout.installer_log(name, version, "uninstall")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        return native.msi_uninstall_argv(_tool("msiexec", layout), installer.product_code, log_file)
    if installer.type in ("deb", "rpm") and installer.package_name is not None:
        if native_version(layout, installer) is None:
            return None  # removed behind the agent's back: nothing to run, the receipt goes
        if installer.type == "deb":
            return native.dpkg_uninstall_argv(_tool("dpkg", layout), layout.dpkg_root, installer.package_name)
        return native.rpm_uninstall_argv(_tool("rpm", layout), layout.rpm_root, installer.package_name)
    return list(installer.uninstall) or None


def _in_place(old: InstallerSpec, new: InstallerSpec) -> bool:
    """Whether the package manager replaces the old version itself (same deb or rpm package name)."""
    return old.type == new.type and old.type in ("deb", "rpm") and old.package_name == new.package_name


def _with_exit_note(outcome: Outcome, default: str, policy: ExitPolicy) -> str:
    message = outcome.message or default
    if outcome.reboot_required:
        return f"{message} ({native.exit_meaning(outcome.exit_code, policy.meanings)}: reboot required)"
    return message


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


def install(layout: Layout, name: str, version: str, installer: InstallerSpec,
            artifact: Path | Callable[[], Path], ref: ArtifactRef, operation_id: str,
            now: datetime | None = None) -> Outcome:
    """Install ``name`` ``version`` from a verified artifact; the receipt is written last.

    Whatever version of ``name`` is installed now (per its receipt) is removed
    first, so install, upgrade and downgrade are one operation: the receipt is
    the truth about what is there, ``previousVersion`` only what the relay
    believed. The new artifact is unpacked and checked *before* the old version
    goes, so a refused archive changes nothing. ``artifact`` may be a function
    that fetches it: an operation resumed after its install command ran
    needs no artifact, since it only records the command's result.

    A deb or rpm replacing a version of the same package is not removed first:
    ``dpkg -i`` and ``rpm -U`` replace it in place. Their file is checked to be
    the spec's package name and version before anything changes.
    """
    target = layout.package_dir(name, version)
    name_dir = target.parent
    step = _step(layout, operation_id, "install", version)
    # the install command already ran for this operation (the agent was killed after): its result
    done = stored_result(step) if installer.type in COMMAND_TYPES else None
    message = f"installed {name} {version}"
    replaced: Receipt | None = None  # the version a deb/rpm replaces in place
    if done is None:
        if installer.type in NATIVE_TYPES and (ref.format != "file" or ref.file_name is None):
            article = "a" if installer.type == "deb" else "an"
            raise InstallError(f"{article} {installer.type} installer needs a single-file artifact, "
                               f"got format {ref.format!r}")
        source = artifact if isinstance(artifact, Path) else artifact()
        name_dir.mkdir(parents=True, exist_ok=True)
        _sweep(name_dir)
        staging = name_dir / f".staging-{_safe_suffix(operation_id)}"
        try:
            count = unpack(source, ref, staging)
            if ref.file_name is not None:
                check_package_file(layout, installer, staging / ref.file_name, version)
            current = read_receipt(layout, name)
            if current is not None and current.version != version:
                if _in_place(current.installer, installer):
                    replaced = current
                else:
                    uninstall(layout, name, None, operation_id)
            _place(staging, target, operation_id)
        except BaseException:
            _remove_tree(staging)
            raise
        message = f"{message} ({count} {'entry' if count == 1 else 'entries'})"
    else:
        current = read_receipt(layout, name)
        if current is not None and current.version != version and _in_place(current.installer, installer):
            replaced = current
    reboot = False
    exit_code = 0
    if installer.type in COMMAND_TYPES:
        policy = installer.exit_policy()
        try:
            if done is None:
                file = target / ref.file_name if ref.file_name is not None else target
                argv = native_install_argv(layout, installer, file, name, version)
                done = _run_step(layout, step, argv, target, name, version, installer.timeout_seconds, checked=True)
            outcome = _checked(done, installer.timeout_seconds, installer, layout.output_tail, policy)
            message = _with_exit_note(outcome, message, policy)
            reboot, exit_code = outcome.reboot_required, outcome.exit_code
            if installer.type in ("deb", "rpm"):
                found = native_version(layout, installer)
                if found != version:
                    tool = "dpkg" if installer.type == "deb" else "rpm"
                    raise InstallError(f"after installing, {tool} reports {installer.package_name} "
                                       f"{found or 'not installed'}, not {version}")
        except BaseException:
            if replaced is not None and is_present(layout, replaced):
                _remove_tree(target)  # the old version is still what the package manager has: keep its receipt
            else:
                _not_installed(layout, name, target)
            raise
    digest = content.record(target, layout.content_index(name)) if installer.type == "files" else None
    if digest is None:
        layout.content_index(name).unlink(missing_ok=True)
    write_receipt(layout, Receipt(name, version, installer, operation_id,
                                  format_time(now or utc_now()), ref.to_dict(), content=digest))
    if replaced is not None:
        _remove_tree(layout.package_dir(name, replaced.version))
    return Outcome(exit_code, message, reboot)


def _not_installed(layout: Layout, name: str, target: Path) -> None:
    """After a failed install command: no receipt, no directory (a stale receipt of this version goes too)."""
    layout.receipt(name).unlink(missing_ok=True)
    layout.verified_mark(name).unlink(missing_ok=True)
    _remove_tree(target)


def uninstall(layout: Layout, name: str, version: str | None, operation_id: str) -> Outcome:
    """Remove an installed package as its receipt says; no receipt means nothing to do.

    With ``version`` given, only that version is removed: an uninstall meant for
    22.00 must not take away the 23.01 someone installed since. A msi, deb or rpm
    is removed by its product code or package name from the receipt; without a
    receipt the agent removes nothing, even if the package manager has a package
    of that name: it did not install it.
    """
    receipt = read_receipt(layout, name)
    if receipt is None:
        return Outcome(0, "not installed")
    if version is not None and receipt.version != version:
        return Outcome(0, f"not installed ({receipt.version} present)")
    package_dir = layout.package_dir(name, receipt.version)
    output = ""
    outcome = Outcome(0, "")
    installer = receipt.installer
    if installer.type in COMMAND_TYPES:
        policy = installer.exit_policy(uninstalling=True)
        cwd = package_dir if package_dir.is_dir() else layout.root
        timeout = installer.timeout_seconds
        step = _step(layout, operation_id, "uninstall", receipt.version)
        try:
            result = stored_result(step)
            if result is None:
                argv = native_uninstall_argv(layout, installer, name, receipt.version)
                if argv is not None:
                    result = _run_step(layout, step, argv, cwd, name, receipt.version, timeout, checked=True)
                elif installer.type in ("deb", "rpm"):
                    output = f"{installer.package_name} was not installed; receipt removed"
            if result is not None:
                outcome = _checked(result, timeout, installer, layout.output_tail, policy)
                output = outcome.message
                if outcome.exit_code in policy.absent:
                    output = f"{native.exit_meaning(outcome.exit_code, policy.meanings)}; receipt removed"
                elif outcome.reboot_required:
                    output = _with_exit_note(outcome, f"uninstalled {name} {receipt.version}", policy)
            if installer.type in ("deb", "rpm") and native_version(layout, installer) is not None:
                tool = "dpkg" if installer.type == "deb" else "rpm"
                raise InstallError(f"{tool} still reports {installer.package_name} "
                                   f"{native_version(layout, installer)} installed")
        except InstallError as exc:
            raise InstallError(f"uninstalling {name} {receipt.version}: {exc.message}", exc.exit_code) from exc
    # receipt first: a crash now leaves an orphaned directory, never a receipt without files
    layout.receipt(name).unlink(missing_ok=True)
    layout.verified_mark(name).unlink(missing_ok=True)
    layout.content_index(name).unlink(missing_ok=True)
    _remove_tree(package_dir)
    try:
        package_dir.parent.rmdir()
    except OSError:
        pass  # other versions or leftovers remain
    return Outcome(outcome.exit_code, output or f"uninstalled {name} {receipt.version}", outcome.reboot_required)
