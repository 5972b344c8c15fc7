"""Spec loading and validation: YAML text in, frozen dataclasses or errors out.

The core is :func:`parse_repo`, a pure function of the repo's spec files (a
mapping of repo-relative path to bytes) and an artifact checker supplied by
the caller; :func:`load_repo` is the thin shell that reads a directory. HQ and
the relays call ``parse_repo`` with files read from a git commit, so a spec
means the same thing on disk, in CI and at an accepted commit.

Two decisions shape it:

* Every error carries ``path:line:column`` of the YAML node it is about. We
  compose the YAML ourselves into plain values while recording the position of
  every JSON pointer, then run the JSON Schema on the plain values and map the
  schema's error paths back to positions.
* One bad file never hides another's errors: each file is checked on its own,
  cross-file checks run over the files that parsed, and all errors come back
  sorted by path and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from reconciler.resources import schemas_dir

API_VERSION = "reconciler/v1"
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 50_000
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
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


@dataclass(frozen=True)
class Topology:
    headquarters: str
    relays: tuple[Relay, ...]


@dataclass(frozen=True)
class Artifact:
    """Exactly one of ``path`` (repo-relative) and ``url`` is set."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Installer:
    type: InstallerType
    install: tuple[str, ...] = ()
    uninstall: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS


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
    # sha256 of the canonical spec without rerun and suspend: raising rerun or
    # pausing a job is not a new revision, any other edit is.
    revision: str = ""


@dataclass(frozen=True)
class Specs:
    topology: Topology
    packages: tuple[Package, ...]
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class LoadResult:
    specs: Specs | None
    errors: tuple[SpecError, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.specs is not None and not self.errors


ArtifactCheck = Callable[[str], str | None]
"""Given a normalised repo-relative path, return a problem (``"does not exist"``) or None."""


# ------------------------------------------------------------ topology helpers


def relay_parents(topology: Topology) -> dict[str, str]:
    return {relay.name: relay.parent for relay in topology.relays}


def ancestors(topology: Topology, relay: str) -> tuple[str, ...]:
    """The relay itself, then its parent relays up to (not including) HQ."""
    parents = relay_parents(topology)
    chain: list[str] = []
    current: str | None = relay
    while current is not None and current in parents and current not in chain:
        chain.append(current)
        current = parents.get(current)
    return tuple(chain)


def subtree(topology: Topology, relay: str) -> frozenset[str]:
    """The relay and every relay nested below it, at any depth."""
    return frozenset(r.name for r in topology.relays if relay in ancestors(topology, r.name))


# ------------------------------------------------------------- YAML → values


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


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


_BOOL = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _scalar(node: yaml.ScalarNode) -> Any:
    """Plain Python value of a scalar; timestamps stay strings (their text)."""
    tag = node.tag
    value = node.value
    if tag == "tag:yaml.org,2002:int":
        text = value.replace("_", "")
        try:
            if text.lower().startswith(("0x", "-0x", "+0x")):
                return int(text, 16)
            if text.lower().startswith(("0o", "-0o", "+0o")):
                return int(text, 8)
            return int(text, 10)
        except ValueError:
            return value
    if tag == "tag:yaml.org,2002:float":
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return value
    if tag == "tag:yaml.org,2002:bool":
        return _BOOL.get(value.lower(), value)
    if tag == "tag:yaml.org,2002:null":
        return None
    return value


def _to_value(path: str, root: yaml.Node) -> _Document:
    positions: dict[str, tuple[int, int]] = {}
    key_positions: dict[str, tuple[int, int]] = {}
    errors: list[SpecError] = []
    budget = [MAX_NODES]

    def walk(node: yaml.Node, pointer: str) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _FileErrors([SpecError(
                path, *_mark(root),
                f"document expands to more than {MAX_NODES} nodes (alias expansion bomb?)")])
        positions.setdefault(pointer, _mark(node))
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            first_seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    errors.append(SpecError(path, *_mark(key_node), "mapping keys must be plain strings", pointer))
                    continue
                key = str(key_node.value)
                child = f"{pointer}/{_escape(key)}"
                if key in first_seen:
                    errors.append(SpecError(
                        path, *_mark(key_node),
                        f"duplicate key {key!r} (first defined on line {first_seen[key]})", child))
                    continue
                first_seen[key] = _mark(key_node)[0]
                key_positions[child] = _mark(key_node)
                result[key] = walk(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, f"{pointer}/{index}") for index, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return _scalar(node)

    value = walk(root, "")
    if errors:
        raise _FileErrors(errors)
    return _Document(path, value, positions, key_positions)


def _compose(path: str, data: bytes) -> _Document:
    if len(data) > MAX_FILE_BYTES:
        raise _FileErrors([SpecError(path, 1, 1, f"file is larger than {MAX_FILE_BYTES // 1024} KiB")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _FileErrors([SpecError(path, line, column, f"file is not valid UTF-8 (byte 0x{data[e.start]:02x})")]) from None
    loader = _Loader(text)
    try:
        root = loader.get_node() if loader.check_node() else None
        if root is None:
            raise _FileErrors([SpecError(path, 1, 1, "file holds no YAML document")])
        if loader.check_node():
            extra = loader.get_node()
            line, column = _mark(extra) if extra is not None else (1, 1)
            raise _FileErrors([SpecError(path, line, column, "file holds more than one YAML document; put one spec per file")])
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = e.problem or e.context or "invalid YAML"
        raise _FileErrors([SpecError(path, line, column, f"YAML syntax error: {problem}")]) from None
    except yaml.YAMLError as e:
        raise _FileErrors([SpecError(path, 1, 1, f"YAML error: {e}")]) from None
    finally:
        loader.dispose()
    return _to_value(path, root)


# ---------------------------------------------------------------- schemas


@lru_cache(maxsize=None)
def schema_for(kind: Kind) -> dict[str, Any]:
    with open(schemas_dir() / f"{kind.value.lower()}.schema.json", encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


@lru_cache(maxsize=None)
def _validator(kind: Kind) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(schema_for(kind))


def _pointer(parts: Iterable[Any]) -> str:
    return "".join(f"/{_escape(str(p))}" for p in parts)


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_message(error: ValidationError, pointer: str) -> str:
    field_name = pointer.rsplit("/", 1)[-1] or "document"
    where = pointer or "/"
    kind = error.validator
    if kind == "type":
        expected = error.validator_value
        message = f"{where}: expected {expected}, got {_describe(error.instance)}"
        if expected == "string" and isinstance(error.instance, (int, float)):
            message += " (quote it in YAML, e.g. \"23.01\")"
        return message
    if kind == "pattern":
        return f"{where}: {_describe(error.instance)} does not match {error.validator_value}"
    if kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{where}: {_describe(error.instance)} is not one of: {allowed}"
    if kind == "const":
        return f"{where}: must be {_describe(error.validator_value)}, got {_describe(error.instance)}"
    if kind == "minimum":
        return f"{where}: {field_name} must be at least {error.validator_value}, got {error.instance}"
    if kind == "maximum":
        return f"{where}: {field_name} must be at most {error.validator_value}, got {error.instance}"
    if kind == "minItems":
        return f"{where}: must list at least {error.validator_value} item(s)"
    if kind == "uniqueItems":
        return f"{where}: items must be unique"
    if kind == "minLength":
        return f"{where}: must not be empty"
    return f"{where}: {error.message}"


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
        pointer = _pointer(error.absolute_path)
        if error.validator in ("oneOf", "anyOf"):
            if pointer.endswith("/artifact"):
                found.append(doc.error(pointer, f"{pointer}: {_artifact_message(error.instance)}"))
                continue
            if error.context:
                deepest = best_match(error.context)
                sub_pointer = _pointer(deepest.absolute_path)
                found.append(doc.error(sub_pointer, _schema_message(deepest, sub_pointer)))
                continue
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = set(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - allowed):
                child = f"{pointer}/{_escape(key)}"
                hint = ", ".join(sorted(allowed))
                found.append(doc.error(child, f"{child}: unknown field {key!r} (allowed: {hint})", at_key=True))
            continue
        if error.validator == "required" and isinstance(error.instance, dict):
            for key in error.validator_value:
                if key not in error.instance:
                    found.append(doc.error(pointer, f"{pointer or '/'}: missing required field {key!r}"))
            continue
        found.append(doc.error(pointer, _schema_message(error, pointer)))
    return sorted(set(found))


# ----------------------------------------------------------- per-file checks


def _canonical_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _labels(value: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((value or {}).items()))


def _parse_time(doc: _Document, pointer: str, text: str | None, errors: list[SpecError]) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        errors.append(doc.error(pointer, f"{pointer}: {text!r} is not a valid RFC 3339 date-time"))
        return None


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
    # cycle or hangs below one. Self-parents and unknown parents are reported above.
    for index, relay in enumerate(relays):
        if relay.parent == relay.name or (relay.parent != hq and relay.parent not in parents):
            continue
        chain = [relay.name]
        current = relay.parent
        while current != hq and current in parents and current not in chain:
            chain.append(current)
            current = parents[current]
        if current not in chain:
            continue
        pointer = f"/spec/relays/{index}/parent"
        if current == relay.name:
            loop = " -> ".join([*chain, relay.name])
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} is on a parent cycle ({loop}); the relays must form one tree under {hq!r}"))
        else:
            errors.append(doc.error(pointer, f"{pointer}: relay {relay.name!r} does not reach the headquarters {hq!r}: its ancestor {current!r} is on a parent cycle"))
    return Topology(headquarters=hq, relays=relays), errors


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
        timeout_seconds=raw_installer.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS),
    )
    raw_req = spec.get("requirements", {})
    requirements = Requirements(
        os=tuple(raw_req.get("os", ())),
        arch=tuple(raw_req.get("arch", ())),
        min_free_disk_mb=raw_req.get("minFreeDiskMB"),
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
        source=doc.path, revision=_canonical_hash(spec),
    )
    return package, errors


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
    if errors:
        return None, errors
    revision_basis = {k: v for k, v in spec.items() if k not in ("rerun", "suspend")}
    job = Job(
        name=doc.value["metadata"]["name"],
        job_type=JobType(spec["jobType"]),
        package_name=spec["package"]["name"],
        package_version=spec["package"].get("version"),
        destination_type=DestinationType(spec["destinationType"]),
        destinations=tuple(spec["destinations"]),
        not_before=not_before,
        not_after=not_after,
        retry_limit=retry.get("limit", DEFAULT_RETRY_LIMIT),
        backoff_seconds=retry.get("backoffSeconds", DEFAULT_BACKOFF_SECONDS),
        rerun=spec.get("rerun", 0),
        suspend=spec.get("suspend", False),
        allow_downgrade=spec.get("allowDowngrade", False),
        max_concurrent=rollout.get("maxConcurrent"),
        max_failures=rollout.get("maxFailures"),
        source=doc.path,
        revision=_canonical_hash({"name": doc.value["metadata"]["name"], "spec": revision_basis}),
    )
    return job, errors


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


def _parse_file(path: str, data: bytes) -> tuple[_Document | None, list[SpecError]]:
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
    if kind not in {k.value for k in Kind}:
        where = "/kind" if "kind" in doc.value else ""
        got = f"unknown kind {_describe(kind)}" if kind is not None else "missing kind"
        return None, [doc.error(where, f"{got}; expected one of Topology, Package, Job")]
    if kind != expected.value:
        home = {"Topology": "topology.yaml", "Package": "packages/", "Job": "jobs/"}[kind]
        return None, [doc.error("/kind", f"kind {kind} does not belong in {path}; {kind} specs live in {home}")]
    errors = _schema_errors(doc, expected)
    return (doc if not errors else None), errors


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

    for path in sorted(files):
        if not is_spec_path(path):
            continue
        doc, file_errors = _parse_file(path, files[path])
        errors.extend(file_errors)
        if doc is None:
            continue
        docs[path] = doc
        kind = _expected_kind(path)
        if kind is Kind.TOPOLOGY:
            topology, topo_errors = _build_topology(doc)
            errors.extend(topo_errors)
            topologies.append((doc, topology))
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
    first_version: dict[tuple[str, str], str] = {}
    for doc, package in packages:
        key = (package.name, package.version)
        if key in first_version:
            errors.append(doc.error("/spec/version", f"/spec/version: package {package.name} {package.version} is already defined in {first_version[key]}"))
        else:
            first_version[key] = doc.path

    names = {p.name for _, p in packages}
    for doc, job in jobs:
        pointer = "/spec/package"
        if job.package_version is not None and (job.package_name, job.package_version) not in first_version:
            known = sorted(p.version for _, p in packages if p.name == job.package_name)
            hint = f" (known versions: {', '.join(known)})" if known else ""
            errors.append(doc.error(f"{pointer}/version", f"{pointer}: no package {job.package_name} {job.package_version}{hint}"))
        elif job.package_name not in names:
            errors.append(doc.error(f"{pointer}/name", f"{pointer}/name: no package named {job.package_name!r}"))
        if topology is not None and job.destination_type is DestinationType.ALL_LOWER_CLIENTS:
            relay_names = {r.name for r in topology.relays}
            for index, destination in enumerate(job.destinations):
                if destination not in relay_names:
                    where = f"/spec/destinations/{index}"
                    hint = " (HQ has no clients of its own; name relays)" if destination == topology.headquarters else ""
                    errors.append(doc.error(where, f"{where}: {destination!r} is not a relay in the topology{hint}"))

    if errors or topology is None:
        return LoadResult(None, tuple(sorted(set(errors))))
    specs = Specs(
        topology=topology,
        packages=tuple(sorted((p for _, p in packages), key=lambda p: (p.name, p.spec_name))),
        jobs=tuple(sorted((j for _, j in jobs), key=lambda j: j.name)),
    )
    return LoadResult(specs, ())


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


# ------------------------------------------------------------------- shell


def _read_limited(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


def read_spec_files(root: Path) -> dict[str, bytes]:
    """Read the spec files of a repo directory (at most 1 MiB + 1 byte each)."""
    files: dict[str, bytes] = {}
    for name in TOPOLOGY_FILES:
        candidate = root / name
        if candidate.is_file():
            files[name] = _read_limited(candidate)
    for top in (PACKAGES_DIR, JOBS_DIR):
        base = root / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.endswith(SPEC_SUFFIXES):
                    full = Path(dirpath) / filename
                    rel = full.relative_to(root).as_posix()
                    files[rel] = _read_limited(full)
    return files


def directory_artifact_check(root: Path) -> ArtifactCheck:
    """Artifact checker for a working-tree repo: exists, and no symlink leads outside."""
    real_root = root.resolve()

    def check(relpath: str) -> str | None:
        candidate = root / relpath
        if not candidate.exists() and not candidate.is_symlink():
            return "does not exist"
        resolved = candidate.resolve()
        if resolved != real_root and real_root not in resolved.parents:
            return "leaves the repo through a symbolic link"
        if not resolved.exists():
            return "is a broken symbolic link"
        return None

    return check


def load_repo(root: Path) -> LoadResult:
    """Load and validate the repo at ``root`` (raises FileNotFoundError if it is not a directory)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return parse_repo(read_spec_files(root), directory_artifact_check(root))


# ---------------------------------------------------------------- lookups


def find_package(specs: Specs, name: str, version: str) -> Package | None:
    for package in specs.packages:
        if package.name == name and package.version == version:
            return package
    return None
