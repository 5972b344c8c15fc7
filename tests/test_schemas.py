"""The JSON Schemas on their own, as an editor or another CI tool uses them.

Nothing here imports the loader: the schemas are read as JSON, the example
files with plain ``yaml.safe_load``, and checked with the ``jsonschema``
library alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
EXAMPLE = ROOT / "example-repo"
KINDS = ("topology", "package", "job")


def _schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"{kind}.schema.json").read_text(encoding="utf-8"))
    return schema


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema(kind), format_checker=jsonschema.FormatChecker())


def _example_files() -> list[tuple[str, Path]]:
    files = [("topology", EXAMPLE / "topology.yaml")]
    files += [("package", p) for p in sorted((EXAMPLE / "packages").glob("*.yaml"))]
    files += [("job", p) for p in sorted((EXAMPLE / "jobs").glob("*.yaml"))]
    return files


_CONDITIONS = ("if", "then", "else", "not")


def _subschemas(node: Any, where: str = "#", *, conditions: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside a schema, with a JSON-pointer-ish location.

    ``conditions=False`` skips if/then/else/not: their ``properties`` constrain
    fields declared elsewhere rather than declare new ones.
    """
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties"):
                for name, sub in value.items():
                    yield from _subschemas(sub, f"{where}/{key}/{name}", conditions=conditions)
            elif key in _CONDITIONS and not conditions:
                continue
            elif key in ("items", "additionalProperties", "propertyNames", "contains", *_CONDITIONS):
                yield from _subschemas(value, f"{where}/{key}", conditions=conditions)
            elif key in ("oneOf", "anyOf", "allOf", "prefixItems"):
                for index, sub in enumerate(value):
                    yield from _subschemas(sub, f"{where}/{key}/{index}", conditions=conditions)


def test_there_is_a_schema_for_every_spec_kind() -> None:
    present = {p.name for p in SCHEMAS.glob("*.schema.json")}
    assert {f"{k}.schema.json" for k in KINDS} <= present


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    schema = _schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema.validators.validator_for(schema) is jsonschema.Draft202012Validator


@pytest.mark.parametrize("kind", KINDS)
def test_schema_has_a_stable_id_title_and_description(kind: str) -> None:
    schema = _schema(kind)
    assert schema["$id"] == f"urn:reconciler:schema:v1:{kind}"
    assert schema["title"] and schema["description"]
    assert schema["properties"]["kind"]["const"] == kind.capitalize()
    assert schema["properties"]["apiVersion"]["const"] == "reconciler/v1"


@pytest.mark.parametrize("kind", KINDS)
def test_every_property_has_a_description(kind: str) -> None:
    missing = [
        f"{where}/properties/{name}"
        for where, node in _subschemas(_schema(kind), conditions=False)
        for name, sub in node.get("properties", {}).items()
        if not (isinstance(sub, dict) and isinstance(sub.get("description"), str) and sub["description"].strip())
        # a branch of oneOf/anyOf may say a field declared above must be present (true) or absent (false)
        and not (isinstance(sub, bool) and ("/oneOf/" in where or "/anyOf/" in where))
    ]
    assert not missing


@pytest.mark.parametrize("kind", KINDS)
def test_every_object_forbids_unknown_fields(kind: str) -> None:
    open_objects = []
    for where, node in _subschemas(_schema(kind)):
        # an object whose properties are all true/false only constrains one declared elsewhere
        # (a conditional's "package needs name and version"), as strict validators want it written
        restates = all(isinstance(sub, bool) for sub in node.get("properties", {}).values())
        if node.get("type") == "object" and "properties" in node and not restates:
            if node.get("additionalProperties") is not False:
                open_objects.append(where)
    assert not open_objects
    # and there are objects to check: the envelope, metadata, spec at least
    assert sum(1 for _, n in _subschemas(_schema(kind)) if n.get("type") == "object" and "properties" in n) >= 3


@pytest.mark.parametrize(("kind", "path"), _example_files(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_example_file_validates_against_its_schema(kind: str, path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = sorted(_validator(kind).iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    modeline = path.read_text(encoding="utf-8").splitlines()[0]
    assert modeline.startswith("# yaml-language-server: $schema=")
    assert modeline.endswith(f"schemas/{kind}.schema.json")
    # the repo's own copy of the schemas, as `reconciler init` lays a repo out: it resolves offline
    assert (path.parent / modeline.split("$schema=", 1)[1]).resolve() == (EXAMPLE / "schemas" / f"{kind}.schema.json")


def test_the_example_repo_vendors_exactly_the_shipped_spec_schemas() -> None:
    vendored = sorted(p.name for p in (EXAMPLE / "schemas").iterdir())
    assert vendored == sorted(f"{kind}.schema.json" for kind in KINDS)
    for name in vendored:  # byte for byte: `reconciler schemas export example-repo/schemas` refreshes them
        assert (EXAMPLE / "schemas" / name).read_bytes() == (SCHEMAS / name).read_bytes(), name


def test_example_repo_has_every_kind() -> None:
    kinds = [kind for kind, _ in _example_files()]
    assert kinds.count("topology") == 1
    assert kinds.count("package") >= 5
    assert kinds.count("job") >= 5


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "jobType": "install",
        "package": {"name": "app", "version": "1.0"},
        "destinationType": "allLowerClients",
        "destinations": ["relay-kanto"],
    }
    base.update(spec)
    return {"apiVersion": "reconciler/v1", "kind": "Job", "metadata": {"name": "install-app"}, "spec": base}


def _package(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "app", "version": "1.0",
        "artifact": {"path": "artifacts/app-1.0"},
        "installer": {"type": "files"},
    }
    base.update(spec)
    return {"apiVersion": "reconciler/v1", "kind": "Package", "metadata": {"name": "app-1.0"}, "spec": base}


SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

INVALID: list[tuple[str, str, dict[str, Any]]] = [
    ("job", "unknown field", {**_job(), "extra": 1}),
    ("job", "install without version", _job(package={"name": "app"})),
    ("job", "bad jobType", _job(jobType="reinstall")),
    ("job", "negative retry limit", _job(retry={"limit": -1})),
    ("job", "negative rerun", _job(rerun=-1)),
    ("job", "percentage over 100", _job(rollout={"maxFailures": "150%"})),
    ("job", "zero maxConcurrent", _job(rollout={"maxConcurrent": 0})),
    ("job", "date without offset", _job(schedule={"notBefore": "2027-04-01T09:00:00"})),
    ("job", "upper-case name", {**_job(), "metadata": {"name": "Install-App"}}),
    ("job", "wrong kind", {**_job(), "kind": "Package"}),
    ("job", "version as a number", _job(package={"name": "app", "version": 1.1})),
    ("job", "empty rerun scope", _job(rerunScope={})),
    ("job", "repair without clients", _job(rerunScope={"relays": ["relay-kanto"], "repair": True})),
    ("job", "duplicate scope client", _job(rerunScope={"clients": ["pc-1", "pc-1"]})),
    ("job", "empty scope relays", _job(rerunScope={"relays": []})),
    ("job", "too many scope clients", _job(rerunScope={"clients": [f"pc-{i}" for i in range(10_001)]})),
    ("job", "unknown scope field", _job(rerunScope={"clients": ["pc-1"], "relay": ["relay-kanto"]})),
    ("job", "scope client id not a name", _job(rerunScope={"clients": ["PC 1"]})),
    ("package", "url without sha256", _package(artifact={"url": "https://example.com/a.zip"})),
    ("package", "path and url", _package(artifact={"path": "a", "url": "https://example.com/a", "sha256": SHA})),
    ("package", "upper-case sha256", _package(artifact={"url": "https://example.com/a", "sha256": SHA.upper()})),
    ("package", "command without uninstall", _package(installer={"type": "command", "install": ["x"]})),
    ("package", "unknown os", _package(requirements={"os": ["macos"]})),
    ("package", "missing installer", {**_package(), "spec": {"name": "app", "version": "1.0", "artifact": {"path": "a"}}}),
    ("topology", "relay without parent", {
        "apiVersion": "reconciler/v1", "kind": "Topology", "metadata": {"name": "t"},
        "spec": {"headquarters": "hq-tokyo", "relays": [{"name": "relay-kanto"}]}}),
    ("topology", "unknown relay field", {
        "apiVersion": "reconciler/v1", "kind": "Topology", "metadata": {"name": "t"},
        "spec": {"headquarters": "hq-tokyo", "relays": [{"name": "r", "parent": "hq-tokyo", "site": "x"}]}}),
]


@pytest.mark.parametrize(("kind", "why", "document"), INVALID, ids=[f"{k}: {w}" for k, w, _ in INVALID])
def test_the_schema_alone_rejects_invalid_documents(kind: str, why: str, document: dict[str, Any]) -> None:
    assert not _validator(kind).is_valid(document), why


def test_the_valid_twins_of_the_invalid_documents_pass() -> None:
    # so the rejections above are about the one thing each changes
    assert _validator("job").is_valid(_job())
    assert _validator("job").is_valid(_job(jobType="uninstall", package={"name": "app"}))
    assert _validator("job").is_valid(_job(rollout={"maxFailures": "100%", "maxConcurrent": 1}))
    assert _validator("job").is_valid(_job(rollout={"maxFailures": 0}))
    assert _validator("job").is_valid(_job(schedule={"notBefore": "2027-04-01T09:00:00+09:00"}))
    assert _validator("job").is_valid(_job(rerunScope={"relays": ["relay-kanto"]}))
    assert _validator("job").is_valid(_job(rerunScope={"relays": ["relay-kanto"], "repair": False}))
    assert _validator("job").is_valid(_job(rerunScope={"clients": ["pc-1"], "repair": True}))
    assert _validator("job").is_valid(_job(rerunScope={"clients": [f"pc-{i}" for i in range(10_000)]}))
    assert _validator("package").is_valid(_package())
    assert _validator("package").is_valid(_package(artifact={"url": "https://example.com/a.zip", "sha256": SHA}))
    assert _validator("package").is_valid(_package(installer={"type": "command", "install": ["x"], "uninstall": ["y"]}))
