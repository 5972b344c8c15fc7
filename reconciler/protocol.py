"""The relay ⇄ agent wire protocol: message shapes, vocabularies, limits, and the check of a check-in.

One definition for both ends and for ``reconciler plan --inventory``:

* **Shapes.** Every message is a TypedDict here: :class:`CheckinRequest`
  (:class:`Facts`, labels, :class:`InventoryEntry`, :class:`Result`) and
  :class:`CheckinReply` (:class:`Action` with its :class:`PackageRef`,
  :class:`Artifact`, :class:`Installer` and :class:`Dependency`). The agent
  builds and reads them, the relay produces them, and mypy checks both.
* **Vocabularies and limits.** :data:`FACT_KEYS`, :data:`RESULT_STATUSES`,
  :data:`ACTION_KINDS`, the ``MAX_*`` sizes: an agent refuses at start-up
  what its relay would refuse at every check-in (a 300-character host
  name, a label value over 256 characters) instead of failing every
  check-in with a 400.
* **The check.** :func:`check_checkin` is the relay's one gate for a
  check-in body: the fields of the TypedDicts and their types, the
  vocabularies, names and versions (:mod:`reconciler.names`), sizes, and
  what no schema says (one inventory entry per package name). Each problem
  names its field (``inventory[3].version: expected a string, got an
  integer``). ``reconciler plan --inventory`` checks each client's facts,
  labels and installed packages with the same functions
  (:func:`check_facts`, :func:`check_labels`, :func:`check_inventory`).
  :func:`decode_json` is the byte-level rule: UTF-8, no duplicate keys, no
  ``NaN``, no lone surrogates.
* **The OS's software inventory.** :class:`SoftwareEntry` lists
  (``software``, bounded by ``MAX_SOFTWARE*``) travel with their
  :func:`software_digest` (``softwareDigest``), and only when the digest
  differs from the one the relay last replied with; :func:`check_software`
  checks a list, and the check-in's check holds the list to its digest.

The JSON Schemas ``schemas/checkin-request.schema.json`` and
``schemas/checkin-reply.schema.json`` publish the same shapes for other
implementations and editors. They are a mirror, not a second gate:
``tests/test_protocol.py`` holds them to these TypedDicts and constants and
to the verdicts of :func:`check_checkin`. A check-in is the relay's hot path,
and this check costs a fraction of a generic schema validator's.

Pure: values in, values or problems out. ``docs/PROTOCOL.md`` describes the
messages.

This module does not use ``from __future__ import annotations``: TypedDict
reads ``NotRequired`` from evaluated annotations (``__required_keys__``),
which the checks use as their list of fields.
"""

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, TypeGuard

from reconciler import names, specs

# ------------------------------------------------------------------ vocabularies and limits

FACT_KEYS = ("os", "arch", "freeDiskMB", "hostname", "bootId")
OS_VALUES = ("linux", "windows", "darwin")
ARCH_VALUES = ("x86_64", "arm64", "x86")
RESULT_STATUSES = ("succeeded", "failed", "notAttempted", "refused")
"""What a :class:`Result` may report; every check of a result's status reads this. ``refused``: the agent
did not run the action because it does not match HQ's signed manifest (nothing ran; never retried)."""
ACTION_KINDS = ("install", "upgrade", "downgrade", "uninstall")
INSTALLER_TYPES = ("files", "command", "msi", "exe", "deb", "rpm")
INVENTORY_SOURCES = ("reconciler", "detected")
"""How an agent knows an inventory entry: its own receipt (confirmed), or the package's detection rule found it."""
ARTIFACT_FORMATS = ("tar", "file")

# Credentials (docs/PROTOCOL.md, "Enrolment and credentials").
ENROLLMENT_HEADER = "X-Reconciler-Enrollment"  # the relay's enrolment secret, sent to register
RELAY_SECRET_HEADER = "X-Reconciler-Relay-Secret"  # a child relay's secret, sent to fetch artifacts from its parent
# The ``reason`` of a 401/403 error body: what the caller (an agent) has to do next.
REASON_ENROLLMENT_REQUIRED = "enrollmentRequired"  # present the enrolment secret (unknown id, or its token revoked)
REASON_ENROLLMENT_REFUSED = "enrollmentRefused"  # the enrolment secret presented is wrong
REASON_TOKEN_REQUIRED = "tokenRequired"  # a registered client: send its token
REASON_TOKEN_REFUSED = "tokenRefused"  # the token is not this client's
REASON_PENDING_APPROVAL = "pendingApproval"  # registered, waits for `reconciler clients approve`
REFUSAL_REASONS = (REASON_ENROLLMENT_REQUIRED, REASON_ENROLLMENT_REFUSED, REASON_TOKEN_REQUIRED,
                   REASON_TOKEN_REFUSED, REASON_PENDING_APPROVAL)

MAX_HOSTNAME = 255
MAX_FREE_DISK_MB = 2**53 - 1  # the largest integer every JSON reader holds exactly
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_BODY = 1024 * 1024
MAX_POLL_SECONDS = 86400  # a day: a relay never tells its clients to stay away longer
MAX_INVENTORY = 2000
MAX_RESULTS = 1000
MAX_MESSAGE = 64 * 1024
MIN_EXIT_CODE = -(2**31)  # a Windows NTSTATUS read as signed
MAX_EXIT_CODE = 2**32 - 1  # ... or as unsigned
MAX_TIME_TEXT = 40
# The OS's software inventory (README, "Software inventory"): what dpkg, rpm, the Windows registry or
# pkgutil list, bounded so that the largest list fits in a check-in with room to spare.
SOFTWARE_SOURCES = ("dpkg", "rpm", "registry", "pkgutil")
MAX_SOFTWARE = 5000  # entries in one client's list; the agent cuts what is beyond and says how many
MAX_SOFTWARE_NAME = 200  # characters of a software name
MAX_SOFTWARE_VERSION = 100  # characters of a version ("" when the OS does not say)
MAX_SOFTWARE_BYTES = 640 * 1024  # the list as JSON, within MAX_BODY with the rest of a check-in
MAX_SOFTWARE_OMITTED = 2**31 - 1
MAX_BOOT_ID = 64
BOOT_ID = names.BOOT_ID
"""A boot id: what tells one boot of a client from the next (Linux's boot_id, Windows' boot counter, macOS's
boot time)."""
REBOOT_POLICIES = ("never", "ifRequired")
"""An action's ``reboot``: whether the agent may restart the client when an installer asks for it."""

_SHOWN_KEY = 64  # characters of an unknown key kept in a problem's field name


# ------------------------------------------------------------------ shapes: check-in request


class Facts(TypedDict, total=False):
    """What the client is, measured at each check-in; every fact is optional."""

    os: str  # one of OS_VALUES
    arch: str  # one of ARCH_VALUES
    freeDiskMB: int
    hostname: str
    bootId: str  # changes at every boot (BOOT_ID); a pending reboot clears when it does


class InventoryEntry(TypedDict):
    """One installed package, as the client's receipts confirm it or its detection rule finds it."""

    name: str
    version: str
    source: NotRequired[str]  # one of INVENTORY_SOURCES; absent means "reconciler"


class SoftwareEntry(TypedDict):
    """One piece of software the operating system lists as installed (not only what reconciler installed)."""

    name: str
    version: str  # "" when the OS does not record one
    source: str  # one of SOFTWARE_SOURCES


class Result(TypedDict):
    """The outcome of one finished operation, re-sent until a check-in reply arrives."""

    operationId: str
    status: str  # one of RESULT_STATUSES
    exitCode: NotRequired[int | None]
    message: NotRequired[str | None]
    finishedAt: NotRequired[str | None]
    rebootRequired: NotRequired[bool]  # succeeded, and the installer asked for a reboot (an exit code such as 3010)
    bootId: NotRequired[str]  # the client's boot id when the operation finished (the reboot clears once it changes)


class CheckinRequest(TypedDict):
    """The body of ``POST /v1/clients/<id>/checkin``."""

    facts: Facts
    labels: NotRequired[dict[str, str]]
    inventory: list[InventoryEntry]
    results: NotRequired[list[Result]]
    lastRelay: NotRequired[str]  # the relay that last answered this client (it moved when that is another)
    trustSerial: NotRequired[int]  # the newest manifest serial the agent has verified (the relay sends newer ones)
    # The OS's software inventory: its digest at every check-in to a relay that reads it, the list itself
    # only when the digest differs from the one the relay last acknowledged (the reply's softwareDigest).
    softwareDigest: NotRequired[str]
    software: NotRequired[list[SoftwareEntry]]
    softwareOmitted: NotRequired[int]  # entries the agent cut from the list (beyond MAX_SOFTWARE or the bytes)


# ------------------------------------------------------------------ shapes: check-in reply


class PackageRef(TypedDict):
    """The package an action works on; ``version`` is None for an uninstall of any version."""

    name: str
    version: str | None


class Artifact(TypedDict):
    """What to download from ``GET /v1/artifacts/<sha256>`` and how to unpack it."""

    sha256: str
    size: int
    format: str  # one of ARTIFACT_FORMATS
    fileName: NotRequired[str]  # only with format "file"


class RegistryRule(TypedDict):
    """A Windows registry value whose data is the installed version."""

    key: str
    value: str


class Detection(TypedDict, total=False):
    """A package's ``spec.detect``: exactly one of command, file, registry (:mod:`reconciler.detection_rules`)."""

    command: list[str]
    file: str
    registry: RegistryRule
    versionPattern: str
    timeoutSeconds: int


class Installer(TypedDict):
    """How to install, remove and detect the package (argv lists, no shell)."""

    type: str  # one of INSTALLER_TYPES
    install: list[str]
    uninstall: list[str]
    detect: list[str]
    timeoutSeconds: int
    redact: NotRequired[list[str]]  # spec.installer.redact, when the spec has patterns
    successExitCodes: NotRequired[list[int]]  # spec.installer.successExitCodes, when the spec has them
    rebootExitCodes: NotRequired[list[int]]  # spec.installer.rebootExitCodes, when the spec has them
    productCode: NotRequired[str]  # msi
    properties: NotRequired[dict[str, str]]  # msi, when the spec has some
    packageName: NotRequired[str]  # deb, rpm
    detection: NotRequired[Detection]  # the package's spec.detect, when it has one


class Dependency(TypedDict):
    """A package that must be installed (at ``minVersion`` or newer) before the action runs."""

    name: str
    minVersion: NotRequired[str]


class ActionDocuments(TypedDict):
    """The repo paths of the signed documents an action comes from (their text is in the reply's ``documents``)."""

    job: str
    package: NotRequired[str]  # absent for an uninstall of a version the specs no longer define


class Action(TypedDict):
    """One operation for the agent to run, in reply order."""

    operationId: str
    job: str
    action: str  # one of ACTION_KINDS
    package: PackageRef
    previousVersion: str | None
    artifact: Artifact | None  # None for an uninstall
    installer: Installer | None
    dependsOn: NotRequired[list[Dependency]]
    reboot: NotRequired[str]  # one of REBOOT_POLICIES; absent means never
    documents: NotRequired[ActionDocuments]  # with a signed manifest: where the action comes from


class CheckinReply(TypedDict):
    """The relay's ``200`` reply to a check-in."""

    pollSeconds: float
    actions: list[Action]
    token: NotRequired[str]  # only when the check-in registered the client
    relay: NotRequired[str]  # the answering relay's name: the agent sends it back as lastRelay
    manifest: NotRequired[dict[str, Any]]  # HQ's signed manifest envelope (reconciler.signing), with actions
    documents: NotRequired[dict[str, str]]  # repo path -> the exact text of each document the actions name
    # The digest of the software list the relay holds for this client (None: none). Present when the relay
    # reads software inventories; the agent sends its list again whenever this differs from its own digest.
    softwareDigest: NotRequired[str | None]


def installer_of(spec: specs.Installer) -> Installer:
    """A package's installer as an action carries it: what the relay sends and what a verifying agent expects."""
    installer: Installer = {"type": spec.type.value, "install": list(spec.install), "uninstall": list(spec.uninstall),
                            "detect": list(spec.detect), "timeoutSeconds": spec.timeout_seconds}
    if spec.redact:
        installer["redact"] = list(spec.redact)
    if spec.success_exit_codes:
        installer["successExitCodes"] = list(spec.success_exit_codes)
    if spec.reboot_exit_codes:
        installer["rebootExitCodes"] = list(spec.reboot_exit_codes)
    if spec.product_code is not None:
        installer["productCode"] = spec.product_code
    if spec.properties:
        installer["properties"] = dict(spec.properties)
    if spec.package_name is not None:
        installer["packageName"] = spec.package_name
    if spec.detection is not None:
        installer["detection"] = detection_of(spec.detection)
    return installer


def detection_of(rule: specs.Detection) -> Detection:
    """A package's ``spec.detect`` as the wire (and the agent's memory of it) carries it."""
    out: Detection = {}
    if rule.command:
        out["command"] = list(rule.command)
    elif rule.file is not None:
        out["file"] = rule.file
    elif rule.registry_key is not None:
        out["registry"] = {"key": rule.registry_key, "value": rule.registry_value or ""}
    if rule.version_pattern is not None:
        out["versionPattern"] = rule.version_pattern
    if rule.timeout_seconds is not None:
        out["timeoutSeconds"] = rule.timeout_seconds
    return out


def dependencies_of(package: specs.Package) -> list[Dependency]:
    """A package's ``dependsOn`` as an action carries it."""
    out: list[Dependency] = []
    for d in package.depends_on:
        dependency: Dependency = {"name": d.name}
        if d.min_version:
            dependency["minVersion"] = d.min_version
        out.append(dependency)
    return out


# ------------------------------------------------------------------ problems


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with a message: the field (``inventory[3].version``; empty for the whole) and why."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``problem`` is the first thing wrong with it."""

    def __init__(self, problem: FieldProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def type_name(value: object) -> str:
    """How a problem names a JSON value's type: ``an integer``, ``a string``, ``null``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(where: str, key: str) -> str:
    shown = key if len(key) <= _SHOWN_KEY else key[: _SHOWN_KEY - 1] + "…"
    return f"{where}.{shown}" if where else shown


def _unknown_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str, what: str,
                  problems: list[FieldProblem]) -> None:
    for key in raw:
        if key not in allowed:
            problems.append(FieldProblem(_field(where, key), f"unknown {what} (allowed: {', '.join(allowed)})"))


def _fields(shape: Any) -> tuple[str, ...]:
    """A TypedDict's keys in declaration order."""
    return tuple(shape.__annotations__)


# ------------------------------------------------------------------ facts and labels


def _fact_value_problem(key: str, value: object) -> str | None:
    if key in ("os", "arch"):
        allowed = OS_VALUES if key == "os" else ARCH_VALUES
        if not isinstance(value, str):
            return f"expected a string, got {type_name(value)}"
        if value not in allowed:
            return f"must be one of {', '.join(allowed)}, got {value!r:.80}"
    elif key == "hostname":
        if not isinstance(value, str):
            return f"expected a string, got {type_name(value)}"
        if len(value) > MAX_HOSTNAME:
            return f"must be a string of at most {MAX_HOSTNAME} characters, got {len(value)}"
    elif key == "bootId":
        if not isinstance(value, str):
            return f"expected a string, got {type_name(value)}"
        if not is_boot_id(value):
            return (f"must be 1-{MAX_BOOT_ID} letters, digits and '._:+-', starting with a letter or digit, "
                    f"got {value[:80]!r}")
    elif key == "freeDiskMB":
        if not _is_int(value):
            return f"expected an integer, got {type_name(value)}"
        if value < 0:
            return f"must be at least 0, got {value}"
        if value > MAX_FREE_DISK_MB:
            return f"must be an integer from 0 to {MAX_FREE_DISK_MB}, got {value}"
    return None


def fact_problem(key: str, value: object) -> str | None:
    """Why a fact cannot be sent, or None (``key`` is one of FACT_KEYS): ``fact os must be one of ...``."""
    problem = _fact_value_problem(key, value)
    if problem is None:
        return None
    return f"fact {key} {problem}" if problem.startswith("must") else f"fact {key}: {problem}"


def label_problem(key: str, value: str) -> str | None:
    """Why a label cannot be sent, or None."""
    if not key or len(key) > MAX_LABEL_KEY:
        return f"label keys must be 1 to {MAX_LABEL_KEY} characters, got {len(key)}"
    if len(value) > MAX_LABEL_VALUE:
        return f"label {key[:MAX_LABEL_KEY]!r} must be at most {MAX_LABEL_VALUE} characters, got {len(value)}"
    return None


def check_facts(raw: object, where: str, problems: list[FieldProblem]) -> Facts:
    """The facts of a check-in (or of a ``plan --inventory`` client); problems are appended to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(FieldProblem(where, f"expected an object, got {type_name(raw)}"))
        return {}
    _unknown_keys(raw, FACT_KEYS, where, "fact", problems)
    facts: Facts = {}
    for key in FACT_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        problem = _fact_value_problem(key, value)
        if problem is not None:
            problems.append(FieldProblem(_field(where, key), problem))
        elif key == "os":
            facts["os"] = value
        elif key == "arch":
            facts["arch"] = value
        elif key == "freeDiskMB":
            facts["freeDiskMB"] = value
        elif key == "bootId":
            facts["bootId"] = value
        else:
            facts["hostname"] = value
    return facts


def check_labels(raw: object, where: str, problems: list[FieldProblem]) -> dict[str, str]:
    """Labels: at most MAX_LABELS strings, keys and values within their lengths."""
    if not isinstance(raw, dict):
        problems.append(FieldProblem(where, f"expected an object, got {type_name(raw)}"))
        return {}
    if len(raw) > MAX_LABELS:
        problems.append(FieldProblem(where, f"at most {MAX_LABELS} labels, got {len(raw)}"))
        return {}
    labels: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            problems.append(FieldProblem(_field(where, key), f"expected a string, got {type_name(value)}"))
            continue
        problem = label_problem(key, value)
        if problem is not None:
            problems.append(FieldProblem(where, problem))
            continue
        labels[key] = value
    return labels


# ------------------------------------------------------------------ inventory and results

_INVENTORY_FIELDS = _fields(InventoryEntry)
_RESULT_FIELDS = _fields(Result)


def _string(raw: Mapping[str, Any], key: str, where: str, problems: list[FieldProblem], *,
            required: bool) -> str | None:
    """``raw[key]`` if it is a string; a problem if it is anything else, or missing when required."""
    if key not in raw:
        if required:
            problems.append(FieldProblem(_field(where, key), "missing required field"))
        return None
    value = raw[key]
    if not isinstance(value, str):
        problems.append(FieldProblem(_field(where, key), f"expected a string, got {type_name(value)}"))
        return None
    return value


def check_inventory(raw: object, where: str, problems: list[FieldProblem]) -> list[InventoryEntry]:
    """What a client has installed: at most MAX_INVENTORY entries, one per package name."""
    if not isinstance(raw, list):
        problems.append(FieldProblem(where, f"expected an array, got {type_name(raw)}"))
        return []
    if len(raw) > MAX_INVENTORY:
        problems.append(FieldProblem(where, f"at most {MAX_INVENTORY} entries, got {len(raw)}"))
        return []
    entries: list[InventoryEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            problems.append(FieldProblem(at, f"expected an object, got {type_name(item)}"))
            continue
        _unknown_keys(item, _INVENTORY_FIELDS, at, "field", problems)
        name = _string(item, "name", at, problems, required=True)
        version = _string(item, "version", at, problems, required=True)
        if name is not None and not names.is_name(name):
            problems.append(FieldProblem(f"{at}.name", f"{name[:80]!r} is not a package name "
                                    "(1-63 lowercase letters, digits, '.' and '-')"))
            name = None
        if version is not None and not names.is_version(version):
            problems.append(FieldProblem(f"{at}.version", f"{version[:80]!r} is not a version "
                                    "(1-64 letters, digits and '._+~-', starting with a letter or digit)"))
            version = None
        if name is not None and name in seen:
            problems.append(FieldProblem(f"{at}.name", f"{name!r} is listed twice (a client has one version "
                                    "per software)"))
            continue
        source = _string(item, "source", at, problems, required=False)
        if source is not None and source not in INVENTORY_SOURCES:
            problems.append(FieldProblem(f"{at}.source", f"must be one of {', '.join(INVENTORY_SOURCES)}, "
                                    f"got {source!r:.80}"))
            source = None
        if name is not None:
            seen.add(name)
            if version is not None:
                entry: InventoryEntry = {"name": name, "version": version}
                if source is not None:
                    entry["source"] = source
                entries.append(entry)
    return entries


def check_result(raw: object, where: str, problems: list[FieldProblem]) -> Result | None:
    """One result: None (and problems) unless it is well formed; ``message`` None reads as ``""``."""
    if not isinstance(raw, dict):
        problems.append(FieldProblem(where, f"expected an object, got {type_name(raw)}"))
        return None
    before = len(problems)
    _unknown_keys(raw, _RESULT_FIELDS, where, "field", problems)
    operation = _string(raw, "operationId", where, problems, required=True)
    if operation is not None and not names.is_operation_id(operation):
        problems.append(FieldProblem(f"{where}.operationId", "must be an operation id (1-128 letters, digits and "
                                "'._:-', starting with a letter or digit)"))
    status = raw.get("status")
    if "status" not in raw:
        problems.append(FieldProblem(f"{where}.status", "missing required field"))
    elif status not in RESULT_STATUSES:
        problems.append(FieldProblem(f"{where}.status",
                                f"must be one of {', '.join(RESULT_STATUSES)}, got {status!r:.80}"))
    code = raw.get("exitCode")
    if code is not None and not (_is_int(code) and MIN_EXIT_CODE <= code <= MAX_EXIT_CODE):
        problems.append(FieldProblem(f"{where}.exitCode",
                                f"must be an integer from {MIN_EXIT_CODE} to {MAX_EXIT_CODE} or null"))
    message = raw.get("message")
    if message is not None and not (isinstance(message, str) and len(message) <= MAX_MESSAGE):
        problems.append(FieldProblem(f"{where}.message", f"must be a string of at most {MAX_MESSAGE} characters "
                                "or null"))
    finished = raw.get("finishedAt")
    if finished is not None and not (isinstance(finished, str) and len(finished) <= MAX_TIME_TEXT
                                     and _is_time(finished)):
        problems.append(FieldProblem(f"{where}.finishedAt", "must be an RFC 3339 time (2026-11-23T10:00:00Z) "
                                "or null"))
    reboot = raw.get("rebootRequired", False)
    if not isinstance(reboot, bool):
        problems.append(FieldProblem(f"{where}.rebootRequired", f"expected a boolean, got {type_name(reboot)}"))
    elif reboot and status != "succeeded":
        problems.append(FieldProblem(f"{where}.rebootRequired", "may be true only for a succeeded result"))
    boot = raw.get("bootId")
    if "bootId" in raw and not (isinstance(boot, str) and is_boot_id(boot)):
        problems.append(FieldProblem(f"{where}.bootId", f"must be a boot id (1-{MAX_BOOT_ID} letters, digits and "
                                "'._:+-', starting with a letter or digit)"))
    if len(problems) > before or operation is None or not isinstance(status, str):
        return None
    result: Result = {"operationId": operation, "status": status, "exitCode": code, "message": message or "",
                      "finishedAt": finished}
    if reboot:
        result["rebootRequired"] = True
    if isinstance(boot, str):
        result["bootId"] = boot
    return result


_TIME = re.compile(names.TIME)


def is_boot_id(text: str) -> bool:
    """Whether ``text`` is a boot id (:data:`BOOT_ID`)."""
    return names.is_boot_id(text)


def _is_time(text: str) -> bool:
    return _TIME.fullmatch(text) is not None


def check_results(raw: object, where: str, problems: list[FieldProblem]) -> list[Result]:
    """The results of a check-in: at most MAX_RESULTS."""
    if not isinstance(raw, list):
        problems.append(FieldProblem(where, f"expected an array, got {type_name(raw)}"))
        return []
    if len(raw) > MAX_RESULTS:
        problems.append(FieldProblem(where, f"at most {MAX_RESULTS} per check-in, got {len(raw)}"))
        return []
    results: list[Result] = []
    for index, item in enumerate(raw):
        result = check_result(item, f"{where}[{index}]", problems)
        if result is not None:
            results.append(result)
    return results


# ------------------------------------------------------------------ software inventory

_SOFTWARE_FIELDS = _fields(SoftwareEntry)
_SOFTWARE_TEXT = re.compile(names.SOFTWARE_TEXT)
_DIGEST = re.compile("[0-9a-f]{64}")


def software_digest(entries: list[SoftwareEntry], omitted: int = 0) -> str:
    """The SHA-256 (hex) of a software list as sent: its entries in order and how many were cut."""
    canonical = json.dumps({"omitted": omitted, "software": [[e["name"], e["version"], e["source"]] for e in entries]},
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def is_digest(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a software digest: 64 lowercase hex digits."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def software_text_problem(value: str, key: str) -> str | None:
    """Why a software entry's ``name`` or ``version`` (``key``) cannot be taken, or None."""
    empty = key == "version"
    limit = MAX_SOFTWARE_VERSION if empty else MAX_SOFTWARE_NAME
    if len(value) > limit or (not value and not empty):
        return f"must be a string of {0 if empty else 1} to {limit} characters, got {len(value)}"
    if _SOFTWARE_TEXT.fullmatch(value) is None:
        return "holds a control character (the agent removes them)"
    return None


def _software_text(raw: Mapping[str, Any], key: str, at: str, problems: list[FieldProblem]) -> str | None:
    value = _string(raw, key, at, problems, required=True)
    if value is None:
        return None
    problem = software_text_problem(value, key)
    if problem is not None:
        problems.append(FieldProblem(f"{at}.{key}", problem))
        return None
    return value


def check_software(raw: object, where: str, problems: list[FieldProblem]) -> list[SoftwareEntry]:
    """The OS's software list of a check-in (or of a ``plan --inventory`` client): at most MAX_SOFTWARE entries.

    One name may be listed more than once (two versions side by side, or
    from two sources); each entry is a name, a version ("" when the OS does
    not record one) and a source, without control characters.
    """
    if not isinstance(raw, list):
        problems.append(FieldProblem(where, f"expected an array, got {type_name(raw)}"))
        return []
    if len(raw) > MAX_SOFTWARE:
        problems.append(FieldProblem(where, f"at most {MAX_SOFTWARE} entries, got {len(raw)}"))
        return []
    entries: list[SoftwareEntry] = []
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            problems.append(FieldProblem(at, f"expected an object, got {type_name(item)}"))
            continue
        before = len(problems)
        _unknown_keys(item, _SOFTWARE_FIELDS, at, "field", problems)
        name = _software_text(item, "name", at, problems)
        version = _software_text(item, "version", at, problems)
        source = item.get("source")
        if "source" not in item:
            problems.append(FieldProblem(f"{at}.source", "missing required field"))
        elif source not in SOFTWARE_SOURCES:
            problems.append(FieldProblem(f"{at}.source", f"must be one of {', '.join(SOFTWARE_SOURCES)}, "
                                                         f"got {source!r:.80}"))
        if len(problems) == before and name is not None and version is not None and isinstance(source, str):
            entries.append({"name": name, "version": version, "source": source})
    return entries


def _check_software_fields(doc: Mapping[str, Any], body: CheckinRequest, problems: list[FieldProblem]) -> None:
    """``softwareDigest``, ``software`` and ``softwareOmitted`` of a check-in: the list must match its digest."""
    digest = doc.get("softwareDigest")
    if "softwareDigest" in doc and not is_digest(digest):
        problems.append(FieldProblem("softwareDigest", "must be 64 lowercase hexadecimal digits (a SHA-256)"))
        return
    omitted = doc.get("softwareOmitted", 0)
    if not _is_int(omitted):
        problems.append(FieldProblem("softwareOmitted", f"expected an integer, got {type_name(omitted)}"))
        return
    if not 0 <= omitted <= MAX_SOFTWARE_OMITTED:
        problems.append(FieldProblem("softwareOmitted", f"must be an integer from 0 to {MAX_SOFTWARE_OMITTED}"))
        return
    if "software" not in doc:
        if "softwareOmitted" in doc:
            problems.append(FieldProblem("softwareOmitted", "is sent only with software"))
        elif is_digest(digest):
            body["softwareDigest"] = digest
        return
    if not is_digest(digest):
        problems.append(FieldProblem("softwareDigest", "missing: software is sent with its digest"))
        return
    before = len(problems)
    software = check_software(doc["software"], "software", problems)
    if len(problems) > before:
        return
    if software_digest(software, omitted) != digest:
        problems.append(FieldProblem("softwareDigest", "is not the SHA-256 of the software list sent "
                                                       "(protocol.software_digest)"))
        return
    body["softwareDigest"] = digest
    body["software"] = software
    if omitted:
        body["softwareOmitted"] = omitted


# ------------------------------------------------------------------ check-in

_CHECKIN_FIELDS = _fields(CheckinRequest)
_CHECKIN_REQUIRED = tuple(key for key in _CHECKIN_FIELDS if key in CheckinRequest.__required_keys__)


def checkin_problems(doc: object) -> tuple[CheckinRequest, list[FieldProblem]]:
    """Every problem of a decoded check-in body, and the body with its optional fields filled in.

    The body is only meaningful when there are no problems: then ``labels``
    and ``results`` are present, every result's ``message`` is a string, and
    the inventory is in the order sent.
    """
    problems: list[FieldProblem] = []
    if not isinstance(doc, dict):
        problems.append(FieldProblem("", "check-in body must be a JSON object"))
        return {"facts": {}, "labels": {}, "inventory": [], "results": []}, problems
    _unknown_keys(doc, _CHECKIN_FIELDS, "", "field", problems)
    for key in _CHECKIN_REQUIRED:
        if key not in doc:
            problems.append(FieldProblem(key, "missing required field"))
    body: CheckinRequest = {
        "facts": check_facts(doc["facts"], "facts", problems) if "facts" in doc else {},
        "labels": check_labels(doc["labels"], "labels", problems) if "labels" in doc else {},
        "inventory": check_inventory(doc["inventory"], "inventory", problems) if "inventory" in doc else [],
        "results": check_results(doc["results"], "results", problems) if "results" in doc else [],
    }
    if "trustSerial" in doc:
        serial = doc["trustSerial"]
        if _is_int(serial) and 0 <= serial < 2**63:
            body["trustSerial"] = serial
        else:
            problems.append(FieldProblem("trustSerial", f"must be an integer from 0 to {2**63 - 1}"))
    if "lastRelay" in doc:
        if names.is_name(doc["lastRelay"]):
            body["lastRelay"] = doc["lastRelay"]
        else:
            problems.append(FieldProblem("lastRelay", "must be a relay name (lowercase letters, digits, '.', '-')"))
    _check_software_fields(doc, body, problems)
    return body, problems


def check_checkin(doc: object) -> CheckinRequest:
    """A decoded check-in body, checked (:func:`checkin_problems`); :class:`ProtocolError` names the first problem."""
    body, problems = checkin_problems(doc)
    if problems:
        raise ProtocolError(problems[0])
    return body


def check_reply(doc: object) -> CheckinReply:
    """A decoded check-in reply, as the agent reads it; :class:`ProtocolError` if its envelope is wrong.

    The envelope is checked here: an object with ``actions`` (a list of
    objects), ``pollSeconds`` (a positive number) and, after registration,
    ``token``. Fields a newer relay may add are ignored. Each action's own
    fields are checked when the agent runs it, so a malformed action fails
    that one operation (reported to the relay with the reason) instead of
    the whole reply.
    """
    if not isinstance(doc, dict):
        raise ProtocolError(FieldProblem("", f"reply must be a JSON object, got {type_name(doc)}"))
    actions = doc.get("actions")
    if not isinstance(actions, list):
        raise ProtocolError(FieldProblem("actions", f"expected an array, got {type_name(actions)}"))
    for index, action in enumerate(actions):
        if not isinstance(action, dict):
            raise ProtocolError(FieldProblem(f"actions[{index}]", f"expected an object, got {type_name(action)}"))
    poll = doc.get("pollSeconds")
    if not (isinstance(poll, (int, float)) and not isinstance(poll, bool) and 0 < poll <= MAX_POLL_SECONDS):
        raise ProtocolError(FieldProblem("pollSeconds", f"must be a positive number of at most {MAX_POLL_SECONDS}, "
                                                        f"got {poll!r:.40}"))
    reply: CheckinReply = {"pollSeconds": poll, "actions": actions}
    if "token" in doc:
        token = doc["token"]
        if not names.is_token(token):
            raise ProtocolError(FieldProblem("token", "must be 16-128 letters, digits, '_' and '-'"))
        reply["token"] = token
    if "relay" in doc:
        relay = doc["relay"]
        if not names.is_name(relay):
            raise ProtocolError(FieldProblem("relay", "must be a relay name"))
        reply["relay"] = relay
    if "manifest" in doc:  # checked by the agent's verifier, which refuses every action without a good one
        if not isinstance(doc["manifest"], dict):
            raise ProtocolError(FieldProblem("manifest", f"expected an object, got {type_name(doc['manifest'])}"))
        reply["manifest"] = doc["manifest"]
    if "documents" in doc:
        documents = doc["documents"]
        if not (isinstance(documents, dict) and all(isinstance(v, str) for v in documents.values())):
            raise ProtocolError(FieldProblem("documents", "expected an object of paths to document text"))
        reply["documents"] = documents
    if "softwareDigest" in doc:
        held = doc["softwareDigest"]
        if held is not None and not is_digest(held):
            raise ProtocolError(FieldProblem("softwareDigest", "must be 64 lowercase hexadecimal digits or null"))
        reply["softwareDigest"] = held
    return reply


# ------------------------------------------------------------------ bytes


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:_SHOWN_KEY]!r}")
        result[key] = value
    return result


def decode_json(body: bytes, what: str = "request body") -> Any:
    """The JSON value of a message body: UTF-8, no duplicate keys, no NaN, and only valid Unicode text.

    :class:`ProtocolError` otherwise. JSON's ``\\ud800`` escapes decode to
    lone surrogates, which cannot be stored, logged or published as UTF-8,
    so they are refused here, naming where the first one is.
    """
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError(FieldProblem("", f"{what} is not UTF-8")) from None
    except RecursionError:
        raise ProtocolError(FieldProblem("", f"{what} is nested too deeply")) from None
    except ValueError as e:
        if "digits" in str(e):  # Python's limit on converting huge integers: no field holds one
            raise ProtocolError(FieldProblem("", f"{what} holds a number with thousands of digits")) from None
        raise ProtocolError(FieldProblem("", f"{what} is not valid JSON: {str(e)[:200]}")) from None
    where = _invalid_text(value)
    if where is not None:
        raise ProtocolError(FieldProblem(where, "text is not valid Unicode (a lone surrogate such as \\ud800); "
                                    "send UTF-8 text"))
    return value


def _invalid_text(value: Any) -> str | None:
    """Where the first string (key or value) holding a lone surrogate is, or None."""
    pending: list[tuple[str, Any]] = [("body", value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _is_unicode(key):
                    return f"{where}: a key"
                pending.append((f"{where}.{key}" if where != "body" else key, child))
        elif isinstance(item, list):
            pending.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
