"""Spec loading and validation: YAML text in, frozen dataclasses or errors out.

The core is :func:`parse_repo`, a pure function of the repo's spec files (a
mapping of repo-relative path to bytes) and an artifact checker supplied by
the caller. Which files are specs, and where artifact paths lead, is decided
from the repo's listing by :mod:`reconciler.repo_layout`; the readers in
:mod:`reconciler.repo_tree` feed both from a directory or from a commit, so
a spec means the same thing on disk, in CI and at an accepted commit.

Two decisions shape it:

* Every error carries ``path:line:column`` of the YAML node it is about. We
  build plain values from the YAML parser's events ourselves while recording
  the position of every JSON pointer, then run the JSON Schema on the plain
  values and map the schema's error paths back to positions. Building from
  events, without recursion, also bounds what a hostile file can cost: nesting
  depth, the number of values and alias expansion (in values and in text) are
  counted as they happen, so any file of at most 1 MiB is judged in well
  under a second and a few hundred MB. Patterns in the schemas are matched
  with ECMA-262 anchors (a name with a trailing newline is not a name), and
  every integer and date has bounds, so what validates also fits the
  relay's arithmetic and SQLite.
* One bad file never hides another's errors: each file is checked on its own,
  cross-file checks run over the files that parsed, and all errors come back
  sorted by path and line.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from reconciler import names
from reconciler.detection_rules import rule_problems
from reconciler.redaction import redact_pattern_problem
from reconciler.resources import schemas_dir
from reconciler.versions import VersionKey, version_key

API_VERSION = "reconciler/v1"
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 50_000  # nodes that aliases may add by expansion
MAX_ALIAS_TEXT = MAX_FILE_BYTES  # characters of scalar text that aliases may add by expansion
# Values (scalars, keys, mappings, sequences) in one file, aliases expanded. A
# real spec holds hundreds; a clients job naming 50,000 PCs holds 50,000. The
# bound keeps any file of at most MAX_FILE_BYTES well inside a second and a
# few hundred MB to check, however it is written.
MAX_DOCUMENT_NODES = 100_000
MAX_ERRORS_PER_FILE = 100  # then one line saying there are more
# Characters of all JSON pointers recorded for positions (each value's path
# from the root): a few MB for any real spec, but deep nesting under long
# keys makes every pointer long.
MAX_POINTER_TEXT = 16 * MAX_FILE_BYTES
MAX_DEPTH = 64  # nesting of mappings and sequences
# Entries of a job's spec.rerunScope lists. A scope names a few relays or the
# clients an admin looked at; a fleet-wide rerun needs no scope, and a longer
# list of clients is a sign the scope should name their relays instead.
MAX_RERUN_SCOPE_RELAYS = 1_000
MAX_RERUN_SCOPE_CLIENTS = 10_000
RESERVED_RELAY_NAMES = frozenset({"hq"})
DEFAULT_TIMEOUT_SECONDS = 600
DEFAULT_RETRY_LIMIT = 3
DEFAULT_BACKOFF_SECONDS = 60

TOPOLOGY_FILES = ("topology.yaml", "topology.yml")
PACKAGES_DIR = "packages/"
JOBS_DIR = "jobs/"
SPEC_SUFFIXES = (".yaml", ".yml")

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------- values


class Kind(StrEnum):
    TOPOLOGY = "Topology"
    PACKAGE = "Package"
    JOB = "Job"


class InstallerType(StrEnum):
    FILES = "files"
    COMMAND = "command"
    MSI = "msi"
    EXE = "exe"
    DEB = "deb"
    RPM = "rpm"


NATIVE_INSTALLER_TYPES = (InstallerType.MSI, InstallerType.EXE, InstallerType.DEB, InstallerType.RPM)
"""Installer types whose artifact is one file handed to the operating system's installer (docs/INSTALLERS.md)."""
NATIVE_ARTIFACT_SUFFIXES = {InstallerType.MSI: ".msi", InstallerType.EXE: ".exe", InstallerType.DEB: ".deb",
                            InstallerType.RPM: ".rpm"}
MSI_DEFAULT_SUCCESS_CODES = (0,)
MSI_DEFAULT_REBOOT_CODES = (3010, 1641)
DEB_PACKAGE_NAME = re.compile(names.DEB_PACKAGE_NAME)
# Which installer fields each type takes besides type, timeoutSeconds and redact.
INSTALLER_FIELDS: Mapping[str, tuple[InstallerType, ...]] = {
    "install": (InstallerType.FILES, InstallerType.COMMAND, InstallerType.EXE),
    "uninstall": (InstallerType.FILES, InstallerType.COMMAND, InstallerType.EXE),
    "detect": (InstallerType.FILES, InstallerType.COMMAND, InstallerType.EXE),
    "successExitCodes": (InstallerType.COMMAND, InstallerType.EXE, InstallerType.MSI),
    "rebootExitCodes": (InstallerType.COMMAND, InstallerType.EXE, InstallerType.MSI),
    "productCode": (InstallerType.MSI,),
    "properties": (InstallerType.MSI,),
    "packageName": (InstallerType.DEB, InstallerType.RPM),
}


class JobType(StrEnum):
    INSTALL = "install"
    UNINSTALL = "uninstall"


class DestinationType(StrEnum):
    ALL_LOWER_CLIENTS = "allLowerClients"
    CLIENTS = "clients"


@dataclass(frozen=True, order=True)
class SpecError:
    """One problem in one file, at ``path:line:column`` (1-based)."""

    path: str
    line: int
    column: int
    message: str
    pointer: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: error: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "column": self.column,
                "pointer": self.pointer, "message": self.message}


@dataclass(frozen=True)
class Relay:
    name: str
    parent: str
    labels: tuple[tuple[str, str], ...] = ()


NOTIFICATION_EVENTS = ("jobCompleted", "jobFailed", "jobHalted", "relayLost", "commitRejected")
"""The event kinds HQ notifies (``spec.notifications[].events`` of the Topology)."""


@dataclass(frozen=True)
class Notification:
    """A webhook HQ posts events to (``spec.notifications`` of the Topology).

    ``secret_file`` names a file in HQ's ``--notification-secrets-dir``: the
    HMAC key never lives in git. Empty ``jobs``/``relays`` mean every job or
    relay; ``events`` defaults to every kind.
    """

    name: str
    url: str
    secret_file: str
    events: tuple[str, ...] = NOTIFICATION_EVENTS
    jobs: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()

    def wants(self, kind: str, job: str | None = None, relay: str | None = None) -> bool:
        """Whether an event of ``kind`` about ``job``/``relay`` passes this notification's filters."""
        if kind not in self.events:
            return False
        if job is not None and self.jobs and job not in self.jobs:
            return False
        return relay is None or not self.relays or relay in self.relays


@dataclass(frozen=True)
class Topology:
    headquarters: str
    relays: tuple[Relay, ...]
    notifications: tuple[Notification, ...] = ()


@dataclass(frozen=True)
class Artifact:
    """Exactly one of ``path`` (repo-relative) and ``url`` is set."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Detection:
    """``spec.detect``: how a client finds the installed version (:mod:`reconciler.detection_rules`).

    Exactly one of ``command``, ``file`` and ``registry_key`` is set.
    """

    command: tuple[str, ...] = ()
    file: str | None = None
    registry_key: str | None = None
    registry_value: str | None = None
    version_pattern: str | None = None
    timeout_seconds: int | None = None


@dataclass(frozen=True)
class Installer:
    type: InstallerType
    install: tuple[str, ...] = ()
    uninstall: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    # regular expressions whose matches the agent masks in installer output (checked by
    # reconciler.redaction.redact_pattern_problem)
    redact: tuple[str, ...] = ()
    # exit codes as declared (command/exe: success defaults to (0,); msi: added to 0 and 3010/1641)
    success_exit_codes: tuple[int, ...] = ()
    reboot_exit_codes: tuple[int, ...] = ()
    product_code: str | None = None  # msi
    properties: tuple[tuple[str, str], ...] = ()  # msi PUBLIC_PROPERTY=value, in spec order
    package_name: str | None = None  # deb, rpm
    # the package's spec.detect: it travels with the installer (protocol.installer_of)
    detection: Detection | None = None

    def exit_codes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The exit codes that mean success, and success with a reboot required, for this installer."""
        if self.type is InstallerType.MSI:
            return ((*MSI_DEFAULT_SUCCESS_CODES, *self.success_exit_codes),
                    (*MSI_DEFAULT_REBOOT_CODES, *self.reboot_exit_codes))
        return self.success_exit_codes or (0,), self.reboot_exit_codes


@dataclass(frozen=True)
class Requirements:
    os: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()
    min_free_disk_mb: int | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Dependency:
    name: str
    min_version: str | None = None


@dataclass(frozen=True)
class Package:
    """One version of one piece of software. ``name`` is the software name."""

    spec_name: str  # metadata.name
    name: str
    version: str
    artifact: Artifact
    installer: Installer
    requirements: Requirements = Requirements()
    depends_on: tuple[Dependency, ...] = ()
    source: str = ""
    revision: str = ""  # sha256 of the canonical spec: changes whenever the spec does
    reboot: str | None = None  # spec.reboot: never or ifRequired (None: not set, which means never)


@dataclass(frozen=True)
class RerunScope:
    """``spec.rerunScope``: what the job's current ``spec.rerun`` number re-runs.

    Without a scope, raising ``rerun`` resets every Failed row of the job.
    With one, it resets only the Failed rows of clients planned on one of
    ``relays`` or on a relay nested below one (a relay means its subtree, as
    in ``allLowerClients``), and of the clients in ``clients``; every other
    row keeps its series, so a later raise that covers it still resets it.
    ``repair`` (only with ``clients``, only for install jobs) also reinstalls
    the job's package on the listed clients where it is installed already,
    once per rerun number.
    """

    relays: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    repair: bool = False


@dataclass(frozen=True)
class Job:
    name: str  # metadata.name
    job_type: JobType
    package_name: str
    package_version: str | None
    destination_type: DestinationType
    destinations: tuple[str, ...]
    not_before: datetime | None = None
    not_after: datetime | None = None
    retry_limit: int = DEFAULT_RETRY_LIMIT
    backoff_seconds: int = DEFAULT_BACKOFF_SECONDS
    rerun: int = 0
    suspend: bool = False
    allow_downgrade: bool = False
    max_concurrent: int | None = None
    max_failures: int | str | None = None  # a count, or a percentage string such as "10%"
    source: str = ""
    # sha256 of the canonical spec without rerun, rerunScope and suspend:
    # re-running or pausing a job is not a new revision, any other edit is.
    revision: str = ""
    rerun_scope: RerunScope | None = None  # None: the current rerun covers every Failed row
    reboot: str | None = None  # spec.reboot, overriding the package's (None: the package's)


@dataclass(frozen=True)
class Specs:
    topology: Topology
    packages: tuple[Package, ...]
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class LoadResult:
    specs: Specs | None
    errors: tuple[SpecError, ...] = field(default=())
    # YAML files that are not read (a mistyped folder, an upper-case suffix):
    # reported, never fatal. Each is a SpecError at line 1 of that file.
    warnings: tuple[SpecError, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.specs is not None and not self.errors


ArtifactCheck = Callable[[str], str | None]
"""Given a normalised repo-relative path, return a problem (``"does not exist"``) or None."""


@runtime_checkable
class ArtifactKinds(Protocol):
    """An :data:`ArtifactCheck` that can also tell a directory from a file (``repo_layout.artifact_checker``).

    A check without it (a test's ``lambda path: None``) is taken to accept a file."""

    def is_directory(self, relpath: str) -> bool: ...


# ------------------------------------------------------------- YAML → values


class _SyntaxFailure(Exception):
    """The YAML library refused the text; ``block_depth`` block collections were open at that point."""

    def __init__(self, error: yaml.MarkedYAMLError, block_depth: int) -> None:
        super().__init__(error)
        self.error = error
        self.block_depth = block_depth


class _FileErrors(Exception):
    def __init__(self, errors: list[SpecError]) -> None:
        super().__init__(errors)
        self.errors = errors


@dataclass
class _Document:
    path: str
    value: Any
    positions: dict[str, tuple[int, int]]  # JSON pointer -> (line, column) of the value node
    key_positions: dict[str, tuple[int, int]]  # JSON pointer -> (line, column) of the mapping key
    raw_scalars: dict[str, str] = field(default_factory=dict)  # JSON pointer -> YAML text of a non-string scalar

    def at(self, pointer: str) -> tuple[int, int]:
        """Position of ``pointer``, or of its nearest existing parent."""
        current = pointer
        while True:
            if current in self.positions:
                return self.positions[current]
            if not current:
                return (1, 1)
            current = current.rsplit("/", 1)[0]

    def error(self, pointer: str, message: str, *, at_key: bool = False) -> SpecError:
        line, column = (self.key_positions.get(pointer) if at_key else None) or self.at(pointer)
        return SpecError(self.path, line, column, message, pointer)


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _mark(node: Any) -> tuple[int, int]:
    """1-based (line, column) where a YAML node or event starts."""
    return node.start_mark.line + 1, node.start_mark.column + 1


_HUGE = 10**1000
_CORE = "tag:yaml.org,2002:"
# Explicit tags that only say what the value already is; any other (!!binary,
# !!set, !!timestamp, !!python/..., a local !tag) is refused rather than read
# as something it is not.
_SCALAR_TAGS = frozenset(_CORE + t for t in ("str", "int", "float", "bool", "null"))
_MAP_TAGS = frozenset({"!", _CORE + "map"})
_SEQ_TAGS = frozenset({"!", _CORE + "seq"})


def _unsupported_tag(tag: str) -> str:
    shown = "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag
    return f"YAML tag {_clip(shown)} is not supported here; write a plain value"

# Booleans as YAML 1.2's core schema (and JSON Schema tools reading YAML) has them: true and false in
# any of their three spellings. YAML 1.1's yes/no/on/off, which the YAML library resolves as booleans,
# stay the strings they are written as: a boolean field refuses them (with a hint), a string field,
# such as a label value, keeps them.
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
# Words YAML 1.1 (and so many an admin) reads as booleans: named in the hint of a boolean field given one.
YAML11_BOOL_WORDS = frozenset({"yes", "no", "on", "off", "y", "n"})


def _scalar(tag: str, value: str) -> Any:
    """Plain Python value of a resolved scalar; timestamps stay strings (their text).

    An integer of thousands of digits is cut down to ``_HUGE``: every field
    has a far lower maximum, the error shows the text as written, and nothing
    has to print the number (Python refuses to turn one of over 4,300 digits
    into text).
    """
    if tag == "tag:yaml.org,2002:int":
        text = value.replace("_", "")
        try:
            if text.lower().startswith(("0x", "-0x", "+0x")):
                number = int(text, 16)
            elif text.lower().startswith(("0o", "-0o", "+0o")):
                number = int(text, 8)
            else:
                number = int(text, 10)
        except ValueError:
            return value
        return number if abs(number) < _HUGE else (_HUGE if number > 0 else -_HUGE)
    if tag == "tag:yaml.org,2002:float":
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return value
    if tag == "tag:yaml.org,2002:bool":
        return _BOOL.get(value, value)
    if tag == "tag:yaml.org,2002:null":
        return None
    return value


@dataclass
class _Anchor:
    value: Any
    raw: str | None  # the text of an anchored scalar (usable as a mapping key)
    mark: tuple[int, int]  # where the anchored node starts
    # The anchored node's positions are log[log_start:log_end], their pointers
    # relative to the node after cutting ``cut`` characters: a range, never a
    # copy, so nested anchors cost nothing until an alias expands them.
    log_start: int
    log_end: int
    cut: int
    size: int  # nodes the anchored node expands to
    text: int  # characters of scalar text in it (keys included)
    depth: int  # levels of mappings and sequences in it (0 for a scalar)


class _Frame:
    """A mapping or sequence being built from the event stream."""

    __slots__ = ("container", "pointer", "keep", "mark", "key", "skip", "seen", "anchor", "log_start", "nodes_start",
                 "text_start", "flow", "below")

    def __init__(self, container: Any, pointer: str, keep: bool, mark: tuple[int, int]) -> None:
        self.container = container
        self.pointer = pointer
        self.keep = keep  # False inside a duplicate key's value or a non-scalar key: built, then dropped
        self.mark = mark
        self.key: str | None = None  # mapping: the key whose value comes next (None: a key comes next)
        self.skip = False  # mapping: drop the value of the current key
        self.seen: dict[str, int] = {}  # mapping: key -> line of its first definition
        self.anchor: str | None = None
        self.log_start = 0
        self.nodes_start = 0
        self.text_start = 0
        self.flow = False  # a flow collection ([...] or {...})
        self.below = 0  # levels of collections inside it, aliases expanded


_NON_SCALAR_KEY = "\x00"


def _build(path: str, loader: Any) -> _Document:
    """:func:`_build_events`, telling how deep in block collections a syntax error struck."""
    stack: list[_Frame] = []
    try:
        return _build_events(path, loader, stack)
    except yaml.MarkedYAMLError as e:
        raise _SyntaxFailure(e, sum(1 for frame in stack if not frame.flow)) from None


def _build_events(path: str, loader: Any, stack: list[_Frame]) -> _Document:
    """Build plain values from the YAML event stream, recording every node's position.

    We consume parser events instead of composed nodes so that nothing here
    recurses (a deeply nested file cannot overflow the stack), aliases are
    counted as they are expanded (a "billion laughs" file stops after
    MAX_NODES expanded nodes, and one large anchored scalar aliased many
    times after MAX_ALIAS_TEXT expanded characters: what a spec costs later,
    in hashing and schema checks, grows with its expanded text), and
    duplicate keys are reported where they are written.
    """
    positions: dict[str, tuple[int, int]] = {}
    key_positions: dict[str, tuple[int, int]] = {}
    raw_scalars: dict[str, str] = {}
    errors: list[SpecError] = []
    log: list[tuple[str, tuple[int, int], bool]] = []  # every position, in order, for anchors to copy
    anchors: dict[str, _Anchor] = {}
    nodes = 0
    expanded = 0
    text_size = 0  # characters of scalar text in the document, aliases expanded
    expanded_text = 0
    pointer_text = 0  # characters of every position's pointer: deep nesting under long keys adds up
    root: list[Any] = []

    too_big = f"the file holds more than {MAX_DOCUMENT_NODES} YAML values; split it"

    def fail(mark: tuple[int, int], message: str) -> _FileErrors:
        return _FileErrors([SpecError(path, *mark, message)])

    def record(pointer: str, mark: tuple[int, int], is_key: bool, keep: bool) -> None:
        nonlocal pointer_text
        pointer_text += len(pointer)
        if pointer_text > MAX_POINTER_TEXT:
            raise fail(mark, "the file nests too many values under long keys to be checked; split it")
        log.append((pointer, mark, is_key))
        if keep:
            (key_positions if is_key else positions).setdefault(pointer, mark)

    def nested(depth: int) -> None:
        """A finished value ``depth`` levels deep goes into the innermost open collection."""
        if stack and depth > stack[-1].below:
            stack[-1].below = depth

    def place(value: Any, raw: str | None, mark: tuple[int, int]) -> None:
        """Hand a finished node to its parent."""
        if not stack:
            root.append(value)
            return
        parent = stack[-1]
        if isinstance(parent.container, list):
            parent.container.append(value)
            return
        if parent.key is None:  # this node is a key
            if raw is None:
                if parent.keep:
                    errors.append(SpecError(path, *mark, "mapping keys must be plain strings", parent.pointer))
                parent.key, parent.skip = _NON_SCALAR_KEY, True
                return
            child = f"{parent.pointer}/{_escape(raw)}"
            if raw in parent.seen:
                if parent.keep:
                    errors.append(SpecError(
                        path, *mark, f"duplicate key {raw!r} (first defined on line {parent.seen[raw]})", child))
                parent.key, parent.skip = raw, True
                return
            parent.seen[raw] = mark[0]
            record(child, mark, True, parent.keep)
            parent.key, parent.skip = raw, False
            return
        if not parent.skip:
            parent.container[parent.key] = value
        parent.key = None

    def slot() -> tuple[str, bool, bool]:
        """(pointer, keep, is_key) of the node that starts now."""
        if not stack:
            return "", True, False
        parent = stack[-1]
        if isinstance(parent.container, list):
            return f"{parent.pointer}/{len(parent.container)}", parent.keep, False
        if parent.key is None:
            return parent.pointer, False, True
        return f"{parent.pointer}/{_escape(parent.key)}", parent.keep and not parent.skip, False

    loader.get_event()  # StreamStartEvent
    if loader.check_event(yaml.StreamEndEvent):
        raise fail((1, 1), "file holds no YAML document")
    loader.get_event()  # DocumentStartEvent
    while True:
        event = loader.get_event()
        cls = type(event)
        if cls is yaml.DocumentEndEvent:
            break
        mark = _mark(event)
        if cls is yaml.ScalarEvent:
            pointer, keep, is_key = slot()
            nodes += 1
            if nodes > MAX_DOCUMENT_NODES:
                raise fail(mark, too_big)
            text_size += len(event.value)
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
            elif tag not in _SCALAR_TAGS:
                raise fail(mark, _unsupported_tag(tag))
            value = _scalar(tag, event.value)
            if not is_key:
                record(pointer, mark, False, keep)
                if keep and not isinstance(value, str):
                    raw_scalars[pointer] = event.value
            if event.anchor is not None:
                anchors[event.anchor] = _Anchor(value, event.value, mark, 0, 0, 0, 1, len(event.value), 0)
            place(value, event.value, mark)
        elif cls is yaml.MappingStartEvent or cls is yaml.SequenceStartEvent:
            if len(stack) >= MAX_DEPTH:
                raise fail(mark, _too_deep())
            if event.tag is not None and event.tag not in (
                    _MAP_TAGS if cls is yaml.MappingStartEvent else _SEQ_TAGS):
                raise fail(mark, _unsupported_tag(event.tag))
            pointer, keep, is_key = slot()
            nodes += 1
            if nodes > MAX_DOCUMENT_NODES:
                raise fail(mark, too_big)
            frame = _Frame({} if cls is yaml.MappingStartEvent else [], pointer, keep, mark)
            frame.flow = bool(event.flow_style)
            if event.anchor is not None:
                frame.anchor, frame.log_start, frame.nodes_start = event.anchor, len(log), nodes - 1
                frame.text_start = text_size
            if not is_key:
                record(pointer, mark, False, keep)
            stack.append(frame)
        elif cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
            frame = stack.pop()
            if frame.anchor is not None:
                anchors[frame.anchor] = _Anchor(frame.container, None, frame.mark, frame.log_start, len(log),
                                                len(frame.pointer), nodes - frame.nodes_start,
                                                text_size - frame.text_start, frame.below + 1)
            nested(frame.below + 1)
            place(frame.container, None, frame.mark)
        elif cls is yaml.AliasEvent:
            anchor = anchors.get(event.anchor)
            if anchor is None:
                raise fail(mark, f"YAML syntax error: found undefined alias {event.anchor!r}")
            expanded += anchor.size
            if expanded > MAX_NODES:
                raise fail(mark, f"aliases expand to more than {MAX_NODES} nodes (alias expansion bomb?)")
            expanded_text += anchor.text
            if expanded_text > MAX_ALIAS_TEXT:
                raise fail(mark, f"aliases expand to more than {MAX_ALIAS_TEXT // 1024} KiB of text "
                                 "(alias expansion bomb?)")
            if len(stack) + anchor.depth > MAX_DEPTH:
                raise fail(mark, _too_deep())  # an alias of a deep collection nests it here
            nodes += anchor.size
            if nodes > MAX_DOCUMENT_NODES:
                raise fail(mark, too_big)
            text_size += anchor.text
            pointer, keep, is_key = slot()
            if not is_key:
                if anchor.raw is not None:
                    record(pointer, anchor.mark, False, keep)
                else:
                    cut = anchor.cut
                    for index in range(anchor.log_start, anchor.log_end):
                        rel, entry_mark, entry_is_key = log[index]
                        record(pointer + rel[cut:], entry_mark, entry_is_key, keep)
            nested(anchor.depth)
            place(anchor.value, anchor.raw, mark)
        else:  # pragma: no cover - the parser emits nothing else inside a document
            raise fail(mark, f"unexpected YAML event {cls.__name__}")
    if not loader.check_event(yaml.StreamEndEvent):
        extra = loader.get_event()
        raise fail(_mark(extra), "file holds more than one YAML document; put one spec per file")
    if errors:
        if len(errors) > MAX_ERRORS_PER_FILE:
            errors = [*sorted(errors)[:MAX_ERRORS_PER_FILE], SpecError(path, 1, 1, _more_errors())]
        raise _FileErrors(errors)
    return _Document(path, root[0] if root else None, positions, key_positions, raw_scalars)


def _more_errors() -> str:
    return f"more than {MAX_ERRORS_PER_FILE} errors in this file; only the first are listed"


def _too_deep() -> str:
    return f"YAML nesting is deeper than {MAX_DEPTH} levels"


def _flow_too_deep(text: str, end: int, limit: int) -> int | None:
    """Index where flow collections (``[``, ``{``) first nest deeper than ``limit`` before ``end``, or None.

    Only consulted when the YAML library has already refused the file, to
    tell "too deep" from other syntax errors whatever the library's own
    limits and wording. A lexical scan that counts a bracket only where a flow
    collection can start: anywhere inside one, and in block context where a
    value starts (at the start of a line, after ``key:``, ``-`` or ``?``, and
    after a tag or an anchor). It skips quoted scalars, comments, the rest of
    a plain scalar and its continuation lines, and block scalars (``|``,
    ``>``): every line indented more than the node they belong to.
    """
    depth = 0
    index = 0
    stop = min(end, len(text))
    value_start = True  # block context: a node may start here
    flow_prev = ""  # flow context: the last indicator, or "x" after a scalar character
    key_col = 0  # block context: the column of this line's key (or scalar)
    entry_col: int | None = None  # the column of this line's last "- " or "? " indicator
    key_seen = False  # a "key:" on this line: its value belongs to the key's node
    skip_above: int | None = None  # lines indented more than this belong to the scalar before them

    def owner() -> int:
        """The column of the node a value on this line belongs to: its key's, else its entry's."""
        return key_col if key_seen or entry_col is None else entry_col

    line_start = 0
    while index < stop:
        char = text[index]
        if char == "\n":
            if not depth and not value_start and skip_above is None:
                skip_above = owner()  # a plain scalar may go on in the lines below
            index += 1
            nxt = index
            while nxt < len(text) and text[nxt] == " ":
                nxt += 1
            if skip_above is not None:
                if nxt >= len(text) or text[nxt] in "\r\n" or nxt - index > skip_above:
                    newline = text.find("\n", nxt)
                    index = len(text) if newline < 0 else newline
                    continue
                skip_above = None
            line_start = index
            index = nxt
            if not depth:
                value_start, key_seen, entry_col, key_col = True, False, None, nxt - line_start
            continue
        if char in " \t\r":
            index += 1
            continue
        if char == "#" and (index == 0 or text[index - 1] in " \t\n"):
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        after = text[index + 1] if index + 1 < len(text) else "\n"
        if depth:
            if char in "[{":
                depth += 1
                if depth > limit:
                    return index
                flow_prev = char
            elif char in "]}":
                depth -= 1
                flow_prev = "x"
                value_start = False
            elif char in "'\"" and flow_prev in "[{,:?":
                index = _quote_end(text, index, char)
                flow_prev = "x"
                continue
            else:
                flow_prev = char if char in ",:?" else "x"
            index += 1
            continue
        if not value_start:
            if char == ":" and after in " \t\r\n":
                value_start, key_seen = True, True
            index += 1
            continue
        if char in "[{":
            depth = 1
            if depth > limit:
                return index
            flow_prev = char
        elif char in "'\"":
            index = _quote_end(text, index, char)
            value_start = False
            continue
        elif char in "|>":
            skip_above = owner()  # a block scalar: the lines below indented more than its node are its text
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        elif char in "!&":  # a tag or an anchor: the value is still to come
            while index < stop and text[index] not in " \t\r\n":
                index += 1
            continue
        elif char in "-?" and after in " \t\r\n":
            if not key_seen:
                entry_col = index - line_start  # a sequence entry or explicit key: its node is here
        elif char == ":" and after in " \t\r\n":
            key_seen = True
        else:
            value_start = False
            if not key_seen:
                key_col = index - line_start  # a key (or a scalar) starts here
        index += 1
    return None


def _quote_end(text: str, start: int, quote: str) -> int:
    """Index just past the quoted scalar opened at ``start`` (the end of text if unterminated)."""
    index = start + 1
    while True:
        found = text.find(quote, index)
        if found < 0:
            return len(text)
        if quote == '"':
            backslashes = 0
            while text[found - 1 - backslashes] == "\\":
                backslashes += 1
            if backslashes % 2:
                index = found + 1
                continue
            return found + 1
        if text.startswith("''", found):
            index = found + 2
            continue
        return found + 1


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character ``index`` in ``text``."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _codepoint(character: int | str) -> str:
    return f"U+{character if isinstance(character, int) else ord(character[:1] or chr(0)):04X}"


def _compose(path: str, data: bytes) -> _Document:
    if len(data) > MAX_FILE_BYTES:
        raise _FileErrors([SpecError(path, 1, 1, f"file is larger than {MAX_FILE_BYTES // 1024} KiB ({MAX_FILE_BYTES} bytes)")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        valid = data[start:e.start].decode("utf-8")  # everything before the bad byte decoded fine
        line, column = _position(valid, len(valid))
        raise _FileErrors([SpecError(path, line, column, f"file is not valid UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8")]) from None
    loader = _Loader(text)
    try:
        return _build(path, loader)
    except _SyntaxFailure as failure:
        error = failure.error
        mark = error.problem_mark or error.context_mark
        deep = _flow_too_deep(text, mark.index + 1 if mark else len(text), MAX_DEPTH - failure.block_depth)
        if deep is not None:
            # The YAML library may stop deep flow nesting with its own limit
            # before our event-driven check sees the levels: say it our way.
            raise _FileErrors([SpecError(path, *_position(text, deep), _too_deep())]) from None
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"YAML syntax error: {error.problem or error.context or 'invalid YAML'}"
        if error.problem and error.context and error.context_mark and mark and (error.context_mark.line, error.context_mark.column) != (mark.line, mark.column):
            message += f" ({error.context} started at line {error.context_mark.line + 1}, column {error.context_mark.column + 1})"
        raise _FileErrors([SpecError(path, line, column, message)]) from None
    except yaml.reader.ReaderError as e:
        line, column = _position(text, min(e.position, len(text)))
        raise _FileErrors([SpecError(path, line, column, f"YAML syntax error: {e.reason} (character {_codepoint(e.character)})")]) from None
    except yaml.YAMLError as e:
        raise _FileErrors([SpecError(path, 1, 1, f"YAML error: {e}")]) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- schemas


@lru_cache(maxsize=None)
def schema_for(kind: Kind) -> dict[str, Any]:
    with open(schemas_dir() / f"{kind.value.lower()}.schema.json", encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


@lru_cache(maxsize=None)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """A schema ``pattern`` with ECMA-262 anchors: ``$`` is the end of the text only.

    In Python ``$`` also matches before a final newline, so ``"install-app\\n"``
    would pass ``^[a-z0-9]...$``; JSON Schema patterns are ECMA-262, where it
    does not. Every unescaped ``$`` outside a character class becomes ``\\Z``.
    """
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append(r"\Z")
            continue
        out.append(char)
    return re.compile("".join(out))


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterable[ValidationError]:
    if isinstance(instance, str) and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _unique_items(validator: Any, unique: bool, instance: Any, schema: Any) -> Iterable[ValidationError]:
    """``uniqueItems`` in linear time: jsonschema compares every pair when items cannot be sorted."""
    if not unique or not isinstance(instance, list):
        return
    seen: set[str] = set()
    for item in instance:
        key = _canonical_json(item)
        if key in seen:
            yield ValidationError(f"{instance!r:.80} has non-unique elements")
            return
        seen.add(key)


def _canonical_json(value: Any) -> str:
    """JSON Schema equality as a string: 1 and 1.0 are one number, true is not 1, keys are unordered."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) or abs(value) < 2**53 else str(value)
    if isinstance(value, list):
        return "[" + ",".join(_canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_canonical_json(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


_SchemaValidator: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern, "uniqueItems": _unique_items})


@lru_cache(maxsize=None)
def _validator(kind: Kind) -> jsonschema.protocols.Validator:
    validator: jsonschema.protocols.Validator = _SchemaValidator(schema_for(kind))
    return validator


def _pointer(parts: Iterable[Any]) -> str:
    return "".join(f"/{_escape(str(p))}" for p in parts)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What the schemas' patterns mean, in words; a pattern not listed here is shown as is.
_PATTERN_MEANINGS = {
    names.schema_pattern(names.NAME): "is not a valid name: use lower-case letters, digits, '.' and '-', "
                                      "starting and ending with a letter or digit, at most 63 characters "
                                      "(no '..', and not ending in '.lock')",
    names.schema_pattern(names.VERSION): "is not a valid version: use letters, digits and '._+~-', "
                                         "starting with a letter or digit, at most 64 characters",
    names.schema_pattern(names.SHA256): "is not a SHA-256 digest: 64 lower-case hexadecimal digits",
    names.schema_pattern(names.LABEL_KEY): "is not a valid label key: letters, digits and '._/-', "
                                           "starting with a letter or digit, at most 63 characters",
    names.schema_pattern(names.TIME): "is not an RFC 3339 date-time with an offset, such as "
                                      "\"2027-04-01T09:00:00+09:00\" (years 1970 to 9999)",
    "^(100|[1-9]?[0-9])%$": "is not a percentage from \"0%\" to \"100%\"",
    "^https?://": "is not an http:// or https:// URL",
    names.schema_pattern(names.MSI_PRODUCT_CODE):
        "is not a product code: a GUID in braces with upper-case hexadecimal digits, such as "
        "\"{12345678-9ABC-DEF0-1234-56789ABCDEF0}\"",
    names.schema_pattern(names.MSI_PROPERTY): "is not a public property name: upper-case letters, digits, '_' and '.', starting "
                          "with a letter",
    names.schema_pattern(names.PACKAGE_NAME): "is not a package name: letters, digits and '._+-', at most 128 "
                                            "characters",
    names.schema_pattern(names.MSI_PROPERTY_VALUE): "holds a double quote or a control character, which msiexec's command line "
                                "cannot carry",
}


def _schema_message(error: ValidationError, pointer: str, raw: str | None = None) -> str:
    field_name = pointer.rsplit("/", 1)[-1] or "document"
    where = pointer or "/"
    kind = error.validator
    if kind == "type":
        expected = error.validator_value
        got = _clip(raw) if raw else _describe(error.instance)  # an empty raw text is a null
        message = f"{where}: expected {expected}, got {got}"
        if expected == "string" and isinstance(error.instance, (int, float)) and not isinstance(error.instance, bool):
            message += f" (YAML reads it as a number; quote it: \"{_clip(raw or str(error.instance))}\")"
        if expected == "boolean" and isinstance(error.instance, str) and error.instance.lower() in YAML11_BOOL_WORDS:
            message += "; write true or false: YAML 1.1 words like yes/on are not booleans here"
        return message
    if kind == "pattern":
        pattern = str(error.validator_value)
        meaning = _PATTERN_MEANINGS.get(pattern, f"does not match {pattern}")
        return f"{where}: {_describe(error.instance)} {meaning}"
    if kind == "enum":
        choices: Any = error.validator_value
        allowed = ", ".join(str(v) for v in choices)
        return f"{where}: {_describe(error.instance)} is not one of: {allowed}"
    if kind == "const":
        return f"{where}: must be {_describe(error.validator_value)}, got {_describe(error.instance)}"
    if kind == "minimum":
        return f"{where}: {field_name} must be at least {error.validator_value}, got {_clip(raw or str(error.instance))}"
    if kind == "maximum":
        return f"{where}: {field_name} must be at most {error.validator_value}, got {_clip(raw or str(error.instance))}"
    if kind == "minItems":
        return f"{where}: must list at least {error.validator_value} item(s)"
    if kind == "maxItems":
        count = len(error.instance) if isinstance(error.instance, list) else "more"
        return f"{where}: must list at most {error.validator_value} items, got {count}"
    if kind == "uniqueItems":
        return f"{where}: items must be unique"
    if kind == "minLength":
        return f"{where}: must not be empty"
    return f"{where}: {error.message}"


def _duplicate_at(items: list[Any]) -> int | None:
    """Position of the first item of a list that repeats an earlier one."""
    seen: set[str] = set()
    for index, item in enumerate(items):
        key = _canonical_json(item)
        if key in seen:
            return index
        seen.add(key)
    return None


def _artifact_message(instance: Any) -> str:
    if isinstance(instance, dict):
        if "path" in instance and "url" in instance:
            return "artifact must have either path or url, not both"
        if "url" in instance and "sha256" not in instance:
            return "artifact url requires sha256 (the agent verifies every download)"
        if "path" not in instance and "url" not in instance:
            return "artifact needs path (in this repo) or url (with sha256)"
    return "artifact is not valid"


def _schema_errors(doc: _Document, kind: Kind) -> list[SpecError]:
    found: list[SpecError] = []
    for error in _validator(kind).iter_errors(doc.value):
        if len(found) > MAX_ERRORS_PER_FILE and len(set(found)) > MAX_ERRORS_PER_FILE:
            break
        pointer = _pointer(error.absolute_path)
        if error.validator in ("oneOf", "anyOf"):
            if pointer.endswith("/artifact"):
                found.append(doc.error(pointer, f"{pointer}: {_artifact_message(error.instance)}"))
                continue
            if pointer == "/spec/detect":
                kinds = [k for k in ("command", "file", "registry") if isinstance(error.instance, dict)
                         and k in error.instance]
                found.append(doc.error(pointer, f"{pointer}: must have exactly one of command, file, registry "
                                                f"(timeoutSeconds only with command), has "
                                                f"{', '.join(kinds) if kinds else 'none'}"))
                continue
            if pointer == "/spec/rerunScope":
                found.append(doc.error(pointer, f"{pointer}: name relays, clients or both: a scope without "
                                                f"either would re-run nothing"))
                continue
            if pointer.endswith("/maxFailures"):
                found.append(doc.error(pointer, f"{pointer}: must be a count (0 or more) or a percentage "
                                                f"from \"0%\" to \"100%\", got {_describe(error.instance)}"))
                continue
            if error.context:
                # The alternatives of the instance's own type say what is wrong with it;
                # "expected integer" from a string-only branch would mislead.
                relevant = [e for e in error.context if e.validator != "type"] or list(error.context)
                deepest = best_match(relevant)
                sub_pointer = _pointer(deepest.absolute_path)
                found.append(doc.error(sub_pointer, _schema_message(deepest, sub_pointer, doc.raw_scalars.get(sub_pointer))))
                continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            schema: Any = error.schema
            allowed = set(schema.get("properties", {}))
            for key in sorted(set(error.instance) - allowed):
                child = f"{pointer}/{_escape(key)}"
                hint = ", ".join(sorted(allowed))
                found.append(doc.error(child, f"{child}: unknown field {key!r} (allowed: {hint})", at_key=True))
            continue
        if error.validator == "required" and pointer == "/spec/rerunScope":  # the "repair needs clients" rule
            found.append(doc.error("/spec/rerunScope/repair", "/spec/rerunScope/repair: list the clients to "
                                   "reinstall in rerunScope.clients; repair never applies to a whole relay"))
            continue
        if error.validator == "required" and isinstance(error.instance, dict):
            required: Any = error.validator_value
            for key in required:
                if key not in error.instance:
                    found.append(doc.error(pointer, f"{pointer or '/'}: missing required field {key!r}", at_key=True))
            continue
        message = _schema_message(error, pointer, doc.raw_scalars.get(pointer))
        if error.validator == "uniqueItems":  # a list can be long: say which item repeats, and where
            items = error.instance if isinstance(error.instance, list) else []
            index = _duplicate_at(items)
            if index is not None:
                line = doc.at(f"{pointer}/{index}")[0]
                message += f" ({_describe(items[index])} is listed twice, again on line {line})"
        if pointer.startswith("/spec/destinations/") and kind is Kind.JOB:
            spec = doc.value.get("spec")
            clients = isinstance(spec, dict) and spec.get("destinationType") == DestinationType.CLIENTS.value
            message = message.replace("is not a valid name", "is not a valid client id" if clients else "is not a valid relay name")
        elif pointer.startswith("/spec/rerunScope/") and kind is Kind.JOB:
            relays = pointer.startswith("/spec/rerunScope/relays/")
            message = message.replace("is not a valid name", "is not a valid relay name" if relays else "is not a valid client id")
        # An empty value ("spec:" and nothing after it) is best shown at its key.
        found.append(doc.error(pointer, message, at_key=doc.raw_scalars.get(pointer) == ""))
    listed = sorted(set(found))
    if len(listed) > MAX_ERRORS_PER_FILE:
        note = SpecError(doc.path, 1, 1, _more_errors())
        listed = sorted({note, *[e for e in listed if e != note][:MAX_ERRORS_PER_FILE]})
    return listed


# ----------------------------------------------------------- per-file checks


def _canonical_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _labels(value: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((value or {}).items()))


EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(9999, 12, 31, tzinfo=timezone.utc)


def _parse_time(doc: _Document, pointer: str, text: str | None, errors: list[SpecError]) -> datetime | None:
    """A schedule time in UTC, between EARLIEST_TIME and LATEST_TIME (later arithmetic never overflows)."""
    if text is None:
        return None
    outside = (f"{pointer}: {text!r} is outside {EARLIEST_TIME:%Y-%m-%d} to {LATEST_TIME:%Y-%m-%d} (UTC)")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        errors.append(doc.error(pointer, f"{pointer}: {text!r} is not a valid RFC 3339 date-time"))
        return None
    try:
        moment = moment.astimezone(timezone.utc)
    except OverflowError:
        errors.append(doc.error(pointer, outside))
        return None
    if not EARLIEST_TIME <= moment <= LATEST_TIME:
        errors.append(doc.error(pointer, outside))
        return None
    return moment


def _int(value: Any) -> Any:
    """A schema-checked integer as int: JSON Schema also calls ``3.0`` an integer."""
    return int(value) if isinstance(value, float) else value


def _check_artifact_path(doc: _Document, raw: str, check: ArtifactCheck, errors: list[SpecError]) -> str | None:
    pointer = "/spec/artifact/path"
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        errors.append(doc.error(pointer, f"{pointer}: artifact path {raw!r} must be relative to the repo, not absolute"))
        return None
    normal = posixpath.normpath(raw.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        errors.append(doc.error(pointer, f"{pointer}: artifact path {raw!r} leaves the repo"))
        return None
    if normal == ".":
        errors.append(doc.error(pointer, f"{pointer}: artifact path {raw!r} is the whole repo"))
        return None
    problem = check(normal)
    if problem:
        errors.append(doc.error(pointer, f"{pointer}: artifact path {raw!r} {problem}"))
        return None
    return normal


def _build_topology(doc: _Document) -> tuple[Topology, list[SpecError]]:
    spec = doc.value["spec"]
    errors: list[SpecError] = []
    hq = spec["headquarters"]
    relays = tuple(
        Relay(name=r["name"], parent=r["parent"], labels=_labels(r.get("labels")))
        for r in spec["relays"]
    )
    seen: dict[str, int] = {}
    for index, relay in enumerate(relays):
        pointer = f"/spec/relays/{index}/name"
        if relay.name in RESERVED_RELAY_NAMES:
            errors.append(doc.error(pointer, f"{pointer}: relay name {relay.name!r} is reserved (it names HQ's status ref)"))
        if relay.name == hq:
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} has the headquarters' name"))
        if relay.name in seen:
            errors.append(doc.error(pointer, f"{pointer}: duplicate relay name {relay.name!r} (first at /spec/relays/{seen[relay.name]})"))
        else:
            seen[relay.name] = index
    parents = {r.name: r.parent for r in relays}
    for index, relay in enumerate(relays):
        pointer = f"/spec/relays/{index}/parent"
        if relay.parent == relay.name:
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} is its own parent"))
        elif relay.parent != hq and relay.parent not in parents:
            errors.append(doc.error(pointer, f"{pointer}: unknown parent {relay.parent!r} of relay {relay.name!r} (not the headquarters nor a relay)"))
    # Every relay must reach HQ by following parents; otherwise it sits on a
    # cycle or hangs below one. Self-parents and unknown parents are reported
    # above. One walk up from each relay, stopping at a relay already judged:
    # linear in the number of relays, whatever the shape.
    judged: dict[str, tuple[str, str] | None] = {}  # name -> None (fine), ("cycle", name) or ("below", entry)
    for relay in relays:
        path: list[str] = []
        on_path: dict[str, int] = {}
        current = relay.name
        verdict: tuple[str, str] | None = None
        while True:
            if current == hq or current not in parents:
                break
            if current in judged:
                known = judged[current]
                verdict = None if known is None else ("below", current if known[0] == "cycle" else known[1])
                break
            if current in on_path:
                members = path[on_path[current]:]
                for member in members:
                    judged[member] = ("cycle", str(len(members)))
                verdict = ("below", current)
                break
            on_path[current] = len(path)
            path.append(current)
            current = parents[current]
        for name in path:
            judged.setdefault(name, verdict)
    for index, relay in enumerate(relays):
        if relay.name == hq or relay.parent == relay.name or (relay.parent != hq and relay.parent not in parents):
            continue  # reported above; a relay with HQ's name would also look like a cycle through HQ
        verdict = judged.get(relay.name)
        if verdict is None:
            continue
        pointer = f"/spec/relays/{index}/parent"
        if verdict[0] == "cycle":
            loop = _cycle_text(relay.name, parents, int(verdict[1]))
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} is on a parent cycle ({loop}); the relays must form one tree under {hq!r}"))
        else:
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} does not reach the headquarters {hq!r}: its ancestor {verdict[1]!r} is on a parent cycle"))
    notifications = _notifications(doc, hq, set(parents), errors)
    return Topology(headquarters=hq, relays=relays, notifications=notifications), errors


def _notifications(doc: _Document, hq: str, relays: set[str], errors: list[SpecError]) -> tuple[Notification, ...]:
    """``spec.notifications``, with what the schema cannot say: unique names, known relays, no URL credentials."""
    built: list[Notification] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(doc.value["spec"].get("notifications", ())):
        notification = Notification(name=raw["name"], url=raw["url"], secret_file=raw["secretFile"],
                                    events=tuple(raw.get("events", NOTIFICATION_EVENTS)),
                                    jobs=tuple(raw.get("jobs", ())), relays=tuple(raw.get("relays", ())))
        pointer = f"/spec/notifications/{index}"
        if notification.name in seen:
            errors.append(doc.error(f"{pointer}/name", f"{pointer}/name: duplicate notification name "
                                    f"{notification.name!r} (first at /spec/notifications/{seen[notification.name]})"))
        else:
            seen[notification.name] = index
        authority = notification.url.split("://", 1)[-1].split("/", 1)[0]
        if "@" in authority:
            errors.append(doc.error(f"{pointer}/url", f"{pointer}/url: the URL carries credentials; put no secret "
                                    "in git (HQ signs each event with the key in secretFile)"))
        for at, relay in enumerate(notification.relays):
            if relay not in relays:
                hint = " (HQ is not a relay)" if relay == hq else ""
                errors.append(doc.error(f"{pointer}/relays/{at}", f"{pointer}/relays/{at}: {relay!r} is not a "
                                        f"relay in the topology{hint}"))
        built.append(notification)
    return tuple(built)


def _cycle_text(start: str, parents: Mapping[str, str], length: int, shown: int = 8) -> str:
    """``a -> b -> a`` for the cycle of ``length`` relays through ``start``; a long one shows its first relays."""
    members = [start]
    while len(members) < min(length, shown):
        members.append(parents[members[-1]])
    if length <= shown:
        return " -> ".join([*members, start])
    return " -> ".join([*members, f"... ({length} relays)", start])


def _check_installer_type(doc: _Document, installer: Installer, raw: Mapping[str, Any],
                          raw_artifact: Mapping[str, Any], path: str | None, check: ArtifactCheck,
                          errors: list[SpecError]) -> None:
    """What the schema leaves to code: which fields each installer type takes, exit codes that
    contradict each other, Debian package names, and that a native installer's artifact is one file."""
    kind = installer.type
    for key, types in INSTALLER_FIELDS.items():
        if key in raw and kind not in types:
            pointer = f"/spec/installer/{key}"
            allowed = ", ".join(t.value for t in types)
            errors.append(doc.error(pointer, f"{pointer}: {key} is for installer type {allowed}, not {kind.value}",
                                    at_key=True))
    success, reboot = installer.exit_codes()
    for index, code in enumerate(installer.reboot_exit_codes):
        if code in success:
            pointer = f"/spec/installer/rebootExitCodes/{index}"
            where = "successExitCodes" if code in installer.success_exit_codes else "the default success codes"
            errors.append(doc.error(pointer, f"{pointer}: exit code {code} is also in {where}; a code is either "
                                             "success or success with a reboot required"))
    if kind is InstallerType.MSI:
        for index, code in enumerate(installer.success_exit_codes):
            if code in MSI_DEFAULT_REBOOT_CODES:
                pointer = f"/spec/installer/successExitCodes/{index}"
                errors.append(doc.error(pointer, f"{pointer}: exit code {code} already means success with a reboot "
                                                 "required for msi"))
    if kind is InstallerType.DEB and installer.package_name is not None \
            and not DEB_PACKAGE_NAME.fullmatch(installer.package_name):
        pointer = "/spec/installer/packageName"
        errors.append(doc.error(pointer, f"{pointer}: {installer.package_name!r} is not a Debian package name: "
                                         "lower-case letters, digits and '+-.', at least two characters, "
                                         "starting with a letter or digit"))
    suffix = NATIVE_ARTIFACT_SUFFIXES.get(kind)
    if suffix is None:
        return
    an = "a" if kind is InstallerType.DEB else "an"  # an msi, an exe, an rpm, a deb
    if path is not None:
        pointer = "/spec/artifact/path"
        if isinstance(check, ArtifactKinds) and check.is_directory(path):
            errors.append(doc.error(pointer, f"{pointer}: {an} {kind.value} installer's artifact must be one "
                                             f"{suffix} file; {path!r} is a directory"))
        elif not path.lower().endswith(suffix):
            errors.append(doc.error(pointer, f"{pointer}: {an} {kind.value} installer's artifact must be a "
                                             f"{suffix} file; {path!r} is not named *{suffix}"))
    url = raw_artifact.get("url")
    if isinstance(url, str):
        name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if not name.lower().endswith(suffix) or name.lower() == suffix:
            pointer = "/spec/artifact/url"
            errors.append(doc.error(pointer, f"{pointer}: {an} {kind.value} installer's artifact must be a "
                                             f"{suffix} file; the URL's file name is {name!r}"))


def _build_package(doc: _Document, check: ArtifactCheck) -> tuple[Package | None, list[SpecError]]:
    spec = doc.value["spec"]
    errors: list[SpecError] = []
    raw_artifact = spec["artifact"]
    path = raw_artifact.get("path")
    if path is not None:
        path = _check_artifact_path(doc, path, check, errors)
    artifact = Artifact(path=path, url=raw_artifact.get("url"), sha256=raw_artifact.get("sha256"))
    raw_installer = spec["installer"]
    installer = Installer(
        type=InstallerType(raw_installer["type"]),
        install=tuple(raw_installer.get("install", ())),
        uninstall=tuple(raw_installer.get("uninstall", ())),
        detect=tuple(raw_installer.get("detect", ())),
        timeout_seconds=_int(raw_installer.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)),
        redact=tuple(raw_installer.get("redact", ())),
        success_exit_codes=tuple(_int(c) for c in raw_installer.get("successExitCodes", ())),
        reboot_exit_codes=tuple(_int(c) for c in raw_installer.get("rebootExitCodes", ())),
        product_code=raw_installer.get("productCode"),
        properties=tuple(raw_installer.get("properties", {}).items()),
        package_name=raw_installer.get("packageName"),
        detection=_detection(doc, spec.get("detect"), errors),
    )
    _check_installer_type(doc, installer, raw_installer, raw_artifact, path, check, errors)
    if installer.type is InstallerType.RPM and spec["version"].count("-") != 1:
        errors.append(doc.error("/spec/version", f"/spec/version: an rpm package's version is its VERSION-RELEASE, "
                                                 f"such as \"1.0-1\" (one '-'), got {spec['version']!r}"))
    for index, pattern in enumerate(installer.redact):
        problem = redact_pattern_problem(pattern)
        if problem is not None:
            pointer = f"/spec/installer/redact/{index}"
            errors.append(doc.error(pointer, f"{pointer}: pattern {pattern[:60]!r} {problem}"))
    raw_req = spec.get("requirements", {})
    requirements = Requirements(
        os=tuple(raw_req.get("os", ())),
        arch=tuple(raw_req.get("arch", ())),
        min_free_disk_mb=_int(raw_req.get("minFreeDiskMB")),
        labels=_labels(raw_req.get("labels")),
    )
    depends = tuple(Dependency(d["name"], d.get("minVersion")) for d in spec.get("dependsOn", ()))
    for index, dep in enumerate(depends):
        if dep.name == spec["name"]:
            pointer = f"/spec/dependsOn/{index}/name"
            errors.append(doc.error(pointer, f"{pointer}: package {dep.name!r} depends on itself"))
    if errors:
        return None, errors
    package = Package(
        spec_name=doc.value["metadata"]["name"], name=spec["name"], version=spec["version"],
        artifact=artifact, installer=installer, requirements=requirements, depends_on=depends,
        source=doc.path, revision=_canonical_hash(spec), reboot=spec.get("reboot"),
    )
    return package, errors


def _detection(doc: _Document, raw: Any, errors: list[SpecError]) -> Detection | None:
    """``spec.detect`` (its shape already passed the schema), or None; placeholders and pattern checked here."""
    if raw is None:
        return None
    problems = rule_problems(raw)
    for where, message in problems:
        pointer = f"/spec/detect/{where}" if where else "/spec/detect"
        errors.append(doc.error(pointer, f"{pointer}: {message}"))
    if problems:
        return None
    registry = raw.get("registry") or {}
    return Detection(command=tuple(raw.get("command", ())), file=raw.get("file"), registry_key=registry.get("key"),
                     registry_value=registry.get("value"), version_pattern=raw.get("versionPattern"),
                     timeout_seconds=_int(raw.get("timeoutSeconds")))


def _build_job(doc: _Document) -> tuple[Job | None, list[SpecError]]:
    spec = doc.value["spec"]
    errors: list[SpecError] = []
    schedule = spec.get("schedule", {})
    not_before = _parse_time(doc, "/spec/schedule/notBefore", schedule.get("notBefore"), errors)
    not_after = _parse_time(doc, "/spec/schedule/notAfter", schedule.get("notAfter"), errors)
    if not_before and not_after and not_after <= not_before:
        errors.append(doc.error("/spec/schedule/notAfter", "/spec/schedule/notAfter: must be later than notBefore"))
    retry = spec.get("retry", {})
    rollout = spec.get("rollout", {})
    scope = _rerun_scope(doc, errors)
    if errors:
        return None, errors
    revision_basis = {k: v for k, v in spec.items() if k not in NOT_REVISION_FIELDS}
    job = Job(
        name=doc.value["metadata"]["name"],
        job_type=JobType(spec["jobType"]),
        package_name=spec["package"]["name"],
        package_version=spec["package"].get("version"),
        destination_type=DestinationType(spec["destinationType"]),
        destinations=tuple(spec["destinations"]),
        not_before=not_before,
        not_after=not_after,
        retry_limit=_int(retry.get("limit", DEFAULT_RETRY_LIMIT)),
        backoff_seconds=_int(retry.get("backoffSeconds", DEFAULT_BACKOFF_SECONDS)),
        rerun=_int(spec.get("rerun", 0)),
        suspend=spec.get("suspend", False),
        allow_downgrade=spec.get("allowDowngrade", False),
        max_concurrent=_int(rollout.get("maxConcurrent")),
        max_failures=_int(rollout.get("maxFailures")),
        source=doc.path,
        revision=_canonical_hash({"name": doc.value["metadata"]["name"], "spec": revision_basis}),
        rerun_scope=scope,
        reboot=spec.get("reboot"),
    )
    return job, errors


def reboot_policy(job: Job, package: Package | None) -> str:
    """The reboot policy of a job's actions: the job's ``spec.reboot``, else its package's, else ``never``."""
    if job.reboot is not None:
        return job.reboot
    if package is not None and package.reboot is not None:
        return package.reboot
    return "never"


# Job fields whose edits are no new revision of the job: they say whether and
# which rows run again, not what the job wants (a new revision would reset
# every client's history).
NOT_REVISION_FIELDS = ("rerun", "rerunScope", "suspend")


def _rerun_scope(doc: _Document, errors: list[SpecError]) -> RerunScope | None:
    """``spec.rerunScope`` (the schema checked its shape), with the checks that need the rest of the job."""
    spec = doc.value["spec"]
    raw = spec.get("rerunScope")
    if raw is None:
        return None
    scope = RerunScope(relays=tuple(raw.get("relays", ())), clients=tuple(raw.get("clients", ())),
                       repair=raw.get("repair", False))
    if scope.repair and spec["jobType"] == JobType.UNINSTALL.value:
        errors.append(doc.error("/spec/rerunScope/repair", "/spec/rerunScope/repair: an uninstall job has nothing "
                                                           "to reinstall; repair is for install jobs"))
    if spec["destinationType"] == DestinationType.CLIENTS.value:
        named = set(spec["destinations"])
        for index, client in enumerate(scope.clients):
            if client not in named:
                where = f"/spec/rerunScope/clients/{index}"
                errors.append(doc.error(where, f"{where}: {client!r} is not one of this job's destinations, "
                                               f"so the rerun would do nothing there"))
    return scope


def _scope_relay_errors(doc: _Document, job: Job, topology: Topology) -> list[SpecError]:
    """Relays of a job's rerunScope that are not relays, or that hold no client the job reaches."""
    if job.rerun_scope is None or not job.rerun_scope.relays:
        return []
    parents = {r.name: r.parent for r in topology.relays}
    # A scope relay covers its subtree and an allLowerClients job reaches its destinations'
    # subtrees: they meet when the scope relay is below (or is) a destination, or above one.
    # A clients job may find its clients on any relay. Each walk up stops at a relay
    # already judged, so this is linear in the relays whatever the tree's shape.
    destinations = set(job.destinations)
    above: set[str] = set()  # the destinations and every relay above one
    for destination in destinations:
        relay = destination
        while relay in parents and relay not in above:
            above.add(relay)
            relay = parents[relay]
    below: dict[str, bool] = {}  # relay -> whether it is a destination or lies below one

    def is_below(relay: str) -> bool:
        walked: list[str] = []
        found = False
        while relay in parents and relay not in below and relay not in walked:
            if relay in destinations:
                found = True
                break
            walked.append(relay)
            relay = parents[relay]
        else:
            found = below.get(relay, False)
        for name in walked:
            below[name] = found
        return found

    errors: list[SpecError] = []
    for index, relay in enumerate(job.rerun_scope.relays):
        where = f"/spec/rerunScope/relays/{index}"
        if relay not in parents:
            hint = " (HQ has no clients of its own; name relays)" if relay == topology.headquarters else ""
            errors.append(doc.error(where, f"{where}: {relay!r} is not a relay in the topology{hint}"))
        elif (job.destination_type is DestinationType.ALL_LOWER_CLIENTS and relay not in above
              and not is_below(relay)):
            errors.append(doc.error(where, f"{where}: relay {relay!r} is outside this job's destinations "
                                           f"({', '.join(job.destinations)} and the relays below them), "
                                           f"so the rerun would do nothing there"))
    return errors


def _expected_kind(path: str) -> Kind:
    if path in TOPOLOGY_FILES:
        return Kind.TOPOLOGY
    if path.startswith(PACKAGES_DIR):
        return Kind.PACKAGE
    return Kind.JOB


def is_spec_path(path: str) -> bool:
    """Whether a repo-relative path is a spec file (everything else is ignored)."""
    if path in TOPOLOGY_FILES:
        return True
    return path.startswith((PACKAGES_DIR, JOBS_DIR)) and path.endswith(SPEC_SUFFIXES)


def _package_identity(doc: _Document | None) -> tuple[str, str] | None:
    """(name, version) of a package file, even one that failed validation, if it says."""
    spec = doc.value.get("spec") if doc is not None and isinstance(doc.value, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("version"), str):
        return spec["name"], spec["version"]
    return None


def _parse_file(path: str, data: bytes) -> tuple[_Document | None, list[SpecError]]:
    """The composed document (if the YAML is readable) and the file's own errors."""
    try:
        doc = _compose(path, data)
    except _FileErrors as e:
        return None, e.errors
    if not isinstance(doc.value, dict):
        return None, [SpecError(path, 1, 1, "a spec must be a YAML mapping with apiVersion, kind, metadata and spec")]
    expected = _expected_kind(path)
    api = doc.value.get("apiVersion")
    if api != API_VERSION:
        where = "/apiVersion" if "apiVersion" in doc.value else ""
        got = f"unknown apiVersion {_describe(api)}" if api is not None else "missing apiVersion"
        return None, [doc.error(where, f"{got}; expected {API_VERSION!r}")]
    kind = doc.value.get("kind")
    if not isinstance(kind, str) or kind not in {k.value for k in Kind}:
        where = "/kind" if "kind" in doc.value else ""
        got = f"unknown kind {_describe(kind)}" if kind is not None else "missing kind"
        return None, [doc.error(where, f"{got}; expected one of Topology, Package, Job")]
    if kind != expected.value:
        home = {"Topology": "topology.yaml", "Package": "packages/", "Job": "jobs/"}[kind]
        return None, [doc.error("/kind", f"kind {kind} does not belong in {path}; {kind} specs live in {home}")]
    return doc, _schema_errors(doc, expected)


# ----------------------------------------------------------- whole repo


def parse_repo(files: Mapping[str, bytes], check_artifact: ArtifactCheck) -> LoadResult:
    """Validate every spec file and build the specs; pure given its inputs.

    ``files`` maps repo-relative posix paths of spec files to their bytes
    (callers pass at most ``MAX_FILE_BYTES + 1`` bytes of a large file).
    ``check_artifact`` answers for in-repo artifact paths.
    """
    errors: list[SpecError] = []
    docs: dict[str, _Document] = {}
    topologies: list[tuple[_Document, Topology]] = []
    packages: list[tuple[_Document, Package]] = []
    jobs: list[tuple[_Document, Job]] = []

    # (name, version) of every package file that says so, valid or not: a job
    # naming a package whose file has an error gets that file's error, not a
    # second "no such package" one.
    declared: set[tuple[str, str]] = set()

    for path in sorted(files):
        if not is_spec_path(path):
            continue
        doc, file_errors = _parse_file(path, files[path])
        errors.extend(file_errors)
        if _expected_kind(path) is Kind.PACKAGE:
            identity = _package_identity(doc)
            if identity is not None:
                declared.add(identity)
        if doc is None or file_errors:
            continue
        docs[path] = doc
        kind = _expected_kind(path)
        if kind is Kind.TOPOLOGY:
            built_topology, topo_errors = _build_topology(doc)
            errors.extend(topo_errors)
            topologies.append((doc, built_topology))
        elif kind is Kind.PACKAGE:
            package, pkg_errors = _build_package(doc, check_artifact)
            errors.extend(pkg_errors)
            if package is not None:
                packages.append((doc, package))
        else:
            job, job_errors = _build_job(doc)
            errors.extend(job_errors)
            if job is not None:
                jobs.append((doc, job))

    topology: Topology | None = None
    if not topologies:
        if not any(_expected_kind(p) is Kind.TOPOLOGY for p in files if is_spec_path(p)):
            errors.append(SpecError("topology.yaml", 1, 1, "missing topology.yaml: the repo needs exactly one Topology"))
    else:
        topology = topologies[0][1]
        for doc, _ in topologies[1:]:
            errors.append(doc.error("/kind", f"more than one Topology (the first is {topologies[0][0].path})"))

    errors.extend(_unique_names(packages, "package"))
    errors.extend(_unique_names(jobs, "job"))
    # One package per version as versions compare (1.0 and 1.0.0 are the same
    # version to the plan): two such files would leave it to chance which runs.
    first_version: dict[tuple[str, VersionKey], tuple[str, str]] = {}
    for doc, package in packages:
        key = (package.name, version_key(package.version))
        if key not in first_version:
            first_version[key] = (doc.path, package.version)
            continue
        path, version = first_version[key]
        same = "" if version == package.version else f" (as {version}: versions compare equal)"
        errors.append(doc.error("/spec/version", f"/spec/version: package {package.name} {package.version} "
                                                 f"is already defined in {path}{same}"))

    declared_names = {name for name, _ in declared}
    for doc, job in jobs:
        if job.package_name not in declared_names:
            errors.append(doc.error("/spec/package/name", f"/spec/package/name: no package named {job.package_name!r}"))
        elif job.package_version is not None and (job.package_name, job.package_version) not in declared:
            known = sorted({v for n, v in declared if n == job.package_name}, key=version_key)
            errors.append(doc.error(
                "/spec/package/version",
                f"/spec/package/version: no package {job.package_name} {job.package_version} "
                f"(known versions: {', '.join(known)})"))
        if topology is not None and job.destination_type is DestinationType.ALL_LOWER_CLIENTS:
            relay_names = {r.name for r in topology.relays}
            for index, destination in enumerate(job.destinations):
                if destination not in relay_names:
                    where = f"/spec/destinations/{index}"
                    hint = " (HQ has no clients of its own; name relays)" if destination == topology.headquarters else ""
                    errors.append(doc.error(where, f"{where}: {destination!r} is not a relay in the topology{hint}"))
        if topology is not None:
            errors.extend(_scope_relay_errors(doc, job, topology))
    if topology is not None:
        job_names = {job.name for _, job in jobs}
        for index, notification in enumerate(topology.notifications):
            for at, name in enumerate(notification.jobs):
                if name not in job_names:
                    where = f"/spec/notifications/{index}/jobs/{at}"
                    errors.append(topologies[0][0].error(where, f"{where}: no job named {name!r}"))

    if errors or topology is None:
        return LoadResult(None, _capped(errors))
    specs = Specs(
        topology=topology,
        packages=tuple(sorted((p for _, p in packages), key=lambda p: (p.name, p.spec_name))),
        jobs=tuple(sorted((j for _, j in jobs), key=lambda j: j.name)),
    )
    return LoadResult(specs, ())


def _capped(errors: Iterable[SpecError]) -> tuple[SpecError, ...]:
    """Every file's errors, at most MAX_ERRORS_PER_FILE of them each plus a line saying there are more."""
    by_path: dict[str, list[SpecError]] = {}
    for error in sorted(set(errors)):
        by_path.setdefault(error.path, []).append(error)
    kept: list[SpecError] = []
    for path, found in by_path.items():
        if len(found) > MAX_ERRORS_PER_FILE:
            note = SpecError(path, 1, 1, _more_errors())
            found = sorted({note, *[e for e in found if e != note][:MAX_ERRORS_PER_FILE]})
        kept += found
    return tuple(sorted(kept))


def _unique_names(items: list[tuple[_Document, Any]], what: str) -> list[SpecError]:
    errors: list[SpecError] = []
    first: dict[str, str] = {}
    for doc, item in items:
        name = item.spec_name if what == "package" else item.name
        if name in first:
            errors.append(doc.error("/metadata/name", f"/metadata/name: duplicate {what} name {name!r} (first in {first[name]})"))
        else:
            first[name] = doc.path
    return errors


# ---------------------------------------------------------------- lookups


def find_package(specs: Specs, name: str, version: str) -> Package | None:
    for package in specs.packages:
        if package.name == name and package.version == version:
            return package
    return None


def parse_document(path: str, data: bytes) -> Package | Job:
    """One package or job file on its own, checked as ``validate`` checks it (an agent reading a signed
    document). ``ValueError`` with the first problem otherwise; an artifact path is taken as it is."""
    doc, errors = _parse_file(path, data)
    if doc is None or errors:
        raise ValueError(str(errors[0]) if errors else f"{path}: unreadable")
    kind = _expected_kind(path)
    built: Package | Job | None
    if kind is Kind.PACKAGE:
        built, errors = _build_package(doc, lambda _path: None)
    elif kind is Kind.JOB:
        built, errors = _build_job(doc)
    else:
        raise ValueError(f"{path}: not a package or job document")
    if built is None or errors:
        raise ValueError(str(errors[0]) if errors else f"{path}: unreadable")
    return built
