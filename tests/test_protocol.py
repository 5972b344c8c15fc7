"""One definition of the check-in protocol: TypedDicts, constants, the check and the JSON Schemas agree.

``reconciler/protocol.py`` holds the shapes (TypedDicts), vocabularies and
limits, and the check the relay (and ``plan --inventory``) runs;
``schemas/checkin-request.schema.json`` and ``schemas/checkin-reply.schema.json``
publish them. Here the schemas are held to the module: the same fields,
required fields, nullability, enums, bounds and patterns, and the same
verdict on every body tried. Then the real agent checks in with a real relay
on 127.0.0.1, and every body sent and reply received follows the schemas.
"""

from __future__ import annotations

import io
import json
import tarfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from e2e_helpers import ENROLL_SECRET, checkin_body, malformed_requests
from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay_server import Relay, _start

from reconciler import names, protocol
from reconciler.agent.agent import Agent
from reconciler.plan import ActionKind, Outcome
from reconciler.relay.server import action_json
from reconciler.relay.state import StagedArtifact, make_generation
from reconciler.resources import schemas_dir
from reconciler.specs import parse_repo


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((schemas_dir() / f"{name}.schema.json").read_text(encoding="utf-8"))
    return loaded


REQUEST = _schema("checkin-request")
REPLY = _schema("checkin-reply")
REQUEST_VALIDATOR = jsonschema.Draft202012Validator(REQUEST)
REPLY_VALIDATOR = jsonschema.Draft202012Validator(REPLY)


def _resolve(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its ``$ref`` (or the non-null branch of its ``anyOf``) points at."""
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _resolve(root, target)
    if "anyOf" in node:
        [branch] = [b for b in node["anyOf"] if b != {"type": "null"}]
        return _resolve(root, branch)
    return node


def _nullable(root: dict[str, Any], node: dict[str, Any]) -> bool:
    if "anyOf" in node:
        return {"type": "null"} in node["anyOf"]
    kind = _resolve(root, node).get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


# ------------------------------------------------------------------ the schemas themselves


@pytest.mark.parametrize("name", ["checkin-request", "checkin-reply"])
def test_schema_is_valid_draft_2020_12_with_an_id_and_descriptions(name: str) -> None:
    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == f"urn:reconciler:schema:v1:{name}" and schema["title"] and schema["description"]

    def walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            yield where, node
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for child, sub in value.items():
                        yield from walk(sub, f"{where}/{key}/{child}")
                elif isinstance(value, (dict, list)):
                    yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                yield from walk(item, f"{where}/{index}")

    for where, node in walk(schema, "#"):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} allows unknown fields"
            for child, sub in node["properties"].items():
                assert sub.get("description"), f"{where}/properties/{child} has no description"


def test_the_schemas_ship_in_the_wheel() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert '"schemas" = "reconciler/schemas"' in pyproject  # force-include: every schemas/*.json ships


# ------------------------------------------------------------------ TypedDicts and schemas

SHAPES: list[tuple[Any, dict[str, Any], str]] = [
    (protocol.CheckinRequest, REQUEST, "#"),
    (protocol.Facts, REQUEST, "#/$defs/facts"),
    (protocol.InventoryEntry, REQUEST, "#/$defs/inventoryEntry"),
    (protocol.Result, REQUEST, "#/$defs/result"),
    (protocol.SoftwareEntry, REQUEST, "#/$defs/softwareEntry"),
    (protocol.CheckinReply, REPLY, "#"),
    (protocol.Action, REPLY, "#/$defs/action"),
    (protocol.PackageRef, REPLY, "#/$defs/action/properties/package"),
    (protocol.Artifact, REPLY, "#/$defs/artifact"),
    (protocol.Installer, REPLY, "#/$defs/installer"),
    (protocol.Detection, REPLY, "#/$defs/installer/properties/detection"),
    (protocol.RegistryRule, REPLY, "#/$defs/installer/properties/detection/properties/registry"),
    (protocol.Dependency, REPLY, "#/$defs/dependency"),
    (protocol.ActionDocuments, REPLY, "#/$defs/action/properties/documents"),
]


def _at(root: dict[str, Any], pointer: str) -> dict[str, Any]:
    node: Any = root
    for part in pointer.lstrip("#/").split("/") if pointer != "#" else ():
        node = node[part]
    return _resolve(root, node)


@pytest.mark.parametrize(("shape", "root", "pointer"), SHAPES, ids=[s.__name__ for s, _, _ in SHAPES])
def test_typeddict_and_schema_have_the_same_fields(shape: Any, root: dict[str, Any], pointer: str) -> None:
    node = _at(root, pointer)
    assert set(shape.__annotations__) == set(node["properties"]), shape.__name__
    assert set(shape.__required_keys__) == set(node.get("required", ())), shape.__name__
    hints = typing.get_type_hints(shape)
    for key, hint in hints.items():
        optional = type(None) in typing.get_args(hint) or (
            isinstance(hint, types.UnionType) and type(None) in hint.__args__)
        assert optional == _nullable(root, node["properties"][key]), f"{shape.__name__}.{key}: null allowed?"


# ------------------------------------------------------------------ constants and schemas


def test_vocabularies_and_limits_are_the_schemas() -> None:
    facts = REQUEST["$defs"]["facts"]["properties"]
    assert list(facts) == list(protocol.FACT_KEYS)
    assert facts["os"]["enum"] == list(protocol.OS_VALUES)
    assert facts["arch"]["enum"] == list(protocol.ARCH_VALUES)
    assert facts["hostname"]["maxLength"] == protocol.MAX_HOSTNAME
    assert (facts["freeDiskMB"]["minimum"], facts["freeDiskMB"]["maximum"]) == (0, protocol.MAX_FREE_DISK_MB)
    labels = REQUEST["$defs"]["labels"]
    assert labels["maxProperties"] == protocol.MAX_LABELS
    assert labels["propertyNames"] == {"minLength": 1, "maxLength": protocol.MAX_LABEL_KEY}
    assert labels["additionalProperties"]["maxLength"] == protocol.MAX_LABEL_VALUE
    assert REQUEST["properties"]["inventory"]["maxItems"] == protocol.MAX_INVENTORY
    assert REQUEST["properties"]["results"]["maxItems"] == protocol.MAX_RESULTS
    result = REQUEST["$defs"]["result"]["properties"]
    assert result["message"]["maxLength"] == protocol.MAX_MESSAGE
    assert (result["exitCode"]["minimum"], result["exitCode"]["maximum"]) == (protocol.MIN_EXIT_CODE,
                                                                              protocol.MAX_EXIT_CODE)
    assert result["finishedAt"]["maxLength"] == protocol.MAX_TIME_TEXT
    action = REPLY["$defs"]["action"]["properties"]
    assert action["action"]["enum"] == list(protocol.ACTION_KINDS) == [kind.value for kind in ActionKind]
    assert REPLY["$defs"]["installer"]["properties"]["type"]["enum"] == list(protocol.INSTALLER_TYPES)
    assert REPLY["$defs"]["artifact"]["properties"]["format"]["enum"] == list(protocol.ARTIFACT_FORMATS)


def test_result_statuses_are_one_constant() -> None:
    status = REQUEST["$defs"]["result"]["properties"]["status"]
    assert status["enum"] == list(protocol.RESULT_STATUSES), (
        "schemas/checkin-request.schema.json: $defs.result.properties.status.enum must list "
        f"protocol.RESULT_STATUSES {list(protocol.RESULT_STATUSES)}")
    for value in protocol.RESULT_STATUSES:  # the relay records every status the protocol allows
        assert Outcome(value).value == value
    for value in protocol.RESULT_STATUSES:
        body = checkin_body(results=[{"operationId": "op-1", "status": value}])
        assert protocol.checkin_problems(body)[1] == [] and REQUEST_VALIDATOR.is_valid(body)
    refused = checkin_body(results=[{"operationId": "op-1", "status": "done"}])
    [problem] = protocol.checkin_problems(refused)[1]
    assert str(problem) == f"results[0].status: must be one of {', '.join(protocol.RESULT_STATUSES)}, got 'done'"


def test_patterns_are_the_names_patterns() -> None:
    assert REQUEST["$defs"]["inventoryEntry"]["properties"]["name"]["pattern"] == names.schema_pattern(names.NAME)
    assert REQUEST["$defs"]["inventoryEntry"]["properties"]["version"]["pattern"] == \
        names.schema_pattern(names.VERSION)
    result = REQUEST["$defs"]["result"]["properties"]
    assert result["operationId"]["pattern"] == names.schema_pattern(names.OPERATION_ID)
    assert result["finishedAt"]["pattern"] == names.schema_pattern(names.TIME)
    assert REPLY["properties"]["token"]["pattern"] == names.schema_pattern(names.TOKEN)
    assert REPLY["$defs"]["artifact"]["properties"]["sha256"]["pattern"] == names.schema_pattern(names.SHA256)


# ------------------------------------------------------------------ the check and the schema: same verdicts

# What the check refuses beyond the schema, on purpose: a package listed twice (no JSON Schema keyword
# compares one field across items), and 1.0 where an integer is expected (JSON Schema's integer type
# takes it; the relay does not guess what a number with a fraction point meant).
BEYOND_THE_SCHEMA = ("is listed twice", "expected an integer, got a number", "is not the SHA-256 of the software list",
                     "must be an integer from -2147483648 to 4294967295 or null")


def _verdicts_agree(body: Any) -> None:
    _, problems = protocol.checkin_problems(body)
    schema_ok = REQUEST_VALIDATOR.is_valid(body)
    if schema_ok and problems:
        assert all(any(reason in p.message for reason in BEYOND_THE_SCHEMA) for p in problems), \
            f"check refuses what the schema allows: {problems} for {body!r:.300}"
    else:
        assert schema_ok == (not problems), f"check says {problems}, schema says {schema_ok} for {body!r:.300}"


GOOD_BODIES: list[Any] = [
    checkin_body(),
    {"facts": {}, "inventory": []},
    checkin_body(inventory=[{"name": "7zip", "version": "23.01"}, {"name": "vcredist", "version": "14.38.33130"}],
                 results=[{"operationId": "op-1", "status": "succeeded", "exitCode": 0, "message": "ok",
                           "finishedAt": "2026-11-23T10:00:00Z"},
                          {"operationId": "op-2", "status": "failed", "exitCode": None, "message": None,
                           "finishedAt": None},
                          {"operationId": "op-3", "status": "failed"}]),
    {**checkin_body(), "labels": {"dept": "sales", "Floor/3": "x" * 256}},
    checkin_body(freeDiskMB=protocol.MAX_FREE_DISK_MB, hostname="h" * 255, os="darwin", arch="arm64"),
]


def _with_software(entries: list[dict[str, Any]], omitted: int = 0, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {**checkin_body(), "software": entries,
                            "softwareDigest": protocol.software_digest(entries, omitted)}  # type: ignore[arg-type]
    if omitted:
        body["softwareOmitted"] = omitted
    return {**body, **extra}


GOOD_BODIES += [
    {**checkin_body(), "softwareDigest": "0" * 64},
    _with_software([]),
    _with_software([{"name": "Mozilla Firefox (x64 en-US)", "version": "120.0.1", "source": "registry"},
                    {"name": "bash", "version": "5.2.15-2+b2", "source": "dpkg"},
                    {"name": "bash", "version": "5.2.15-2+b2", "source": "rpm"},
                    {"name": "com.apple.pkg.Xcode", "version": "", "source": "pkgutil"},
                    {"name": "n" * protocol.MAX_SOFTWARE_NAME, "version": "v" * protocol.MAX_SOFTWARE_VERSION,
                     "source": "dpkg"}], omitted=3),
]


@pytest.mark.parametrize("body", GOOD_BODIES)
def test_good_bodies_pass_both(body: Any) -> None:
    assert protocol.checkin_problems(body)[1] == []
    assert REQUEST_VALIDATOR.is_valid(body)


def test_every_malformed_check_in_body_is_refused_by_both() -> None:
    checked = 0
    for label, method, path, headers, raw, expected in malformed_requests("pc-1"):
        if method != "POST" or not path.endswith("/checkin") or expected != 400 or "%" in path:
            continue
        try:
            body = protocol.decode_json(raw)
        except protocol.ProtocolError:
            continue  # refused before the shape is looked at
        if not names.is_client_id(path.split("/")[3]):
            continue
        _, problems = protocol.checkin_problems(body)
        assert problems, label
        if not any(reason in p.message for p in problems for reason in BEYOND_THE_SCHEMA):
            assert not REQUEST_VALIDATOR.is_valid(body), label
        checked += 1
    assert checked >= 25


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.just(1.0), st.just(-1),
    st.sampled_from(["", "linux", "beos", "x86_64", "7zip", "../etc", "23.01", "1 0", "op-1", "succeeded", "done",
                     "2026-11-23T10:00:00Z", "yesterday", "h" * 256, "x" * 257, "App"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["name", "version", "os", "freeDiskMB", "operationId", "status", "exitCode", "extra", ""]), inner,
        max_size=3)), max_leaves=6)
_PATHS = [("facts",), ("facts", "os"), ("facts", "arch"), ("facts", "hostname"), ("facts", "freeDiskMB"),
          ("facts", "cpu"), ("labels",), ("labels", "dept"), ("labels", ""), ("inventory",), ("inventory", 0),
          ("inventory", 0, "name"), ("inventory", 0, "version"), ("inventory", 0, "extra"), ("inventory", 1),
          ("results",), ("results", 0), ("results", 0, "operationId"), ("results", 0, "status"),
          ("results", 0, "exitCode"), ("results", 0, "message"), ("results", 0, "finishedAt"),
          ("results", 0, "stdout"), ("extra",)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PATHS), st.one_of(st.just(...), _VALUES)), min_size=1, max_size=3))
def test_check_and_schema_agree_on_mutated_bodies(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    body: Any = checkin_body(inventory=[{"name": "app", "version": "1.0"}],
                             results=[{"operationId": "op-1", "status": "succeeded", "exitCode": 0,
                                       "message": "", "finishedAt": "2026-11-23T10:00:00Z"}])
    body["labels"] = {"dept": "sales"}
    for path, value in changes:
        parent = body
        for step in path[:-1]:
            if isinstance(parent, dict) and step in parent:
                parent = parent[step]
            elif isinstance(parent, list) and isinstance(step, int) and step < len(parent):
                parent = parent[step]
            else:
                parent = None
                break
        last = path[-1]
        if isinstance(parent, dict):
            if value is ...:
                parent.pop(last, None)
            else:
                parent[last] = value
        elif isinstance(parent, list) and isinstance(last, int):
            if value is ...:
                del parent[last:last + 1]
            else:
                parent[last:last + 1] = [value]
    _verdicts_agree(body)


def test_limits_are_enforced_at_their_values() -> None:
    at_limit = checkin_body(inventory=[{"name": f"p{i}", "version": "1"} for i in range(protocol.MAX_INVENTORY)])
    over = checkin_body(inventory=[{"name": f"p{i}", "version": "1"} for i in range(protocol.MAX_INVENTORY + 1)])
    labels = {**checkin_body(), "labels": {f"l{i}": "x" for i in range(protocol.MAX_LABELS + 1)}}
    for body in (at_limit, over, labels):
        _verdicts_agree(body)
    assert protocol.checkin_problems(at_limit)[1] == []
    assert [str(p) for p in protocol.checkin_problems(over)[1]] == [
        f"inventory: at most {protocol.MAX_INVENTORY} entries, got {protocol.MAX_INVENTORY + 1}"]


SOFTWARE_MUTATIONS: list[tuple[str, Any, str]] = [
    ("software", "x", "software: expected an array, got a string"),
    ("software", [{"name": "a", "version": "1"}], "software[0].source: missing required field"),
    ("software", [{"name": "a", "version": "1", "source": "apt"}],
     "software[0].source: must be one of dpkg, rpm, registry, pkgutil, got 'apt'"),
    ("software", [{"name": "", "version": "1", "source": "dpkg"}],
     "software[0].name: must be a string of 1 to 200 characters, got 0"),
    ("software", [{"name": "a", "version": 3, "source": "dpkg"}], "software[0].version: expected a string, got an "
                                                                    "integer"),
    ("software", [{"name": "a\x1b[2J", "version": "1", "source": "dpkg"}],
     "software[0].name: holds a control character (the agent removes them)"),
    ("software", [{"name": "a", "version": "1" * 101, "source": "dpkg"}],
     "software[0].version: must be a string of 0 to 100 characters, got 101"),
    ("software", [{"name": "a", "version": "1", "source": "dpkg", "arch": "amd64"}],
     "software[0].arch: unknown field (allowed: name, version, source)"),
    ("softwareDigest", "F" * 64, "softwareDigest: must be 64 lowercase hexadecimal digits (a SHA-256)"),
    ("softwareDigest", "0" * 64, "softwareDigest: is not the SHA-256 of the software list sent "
                                 "(protocol.software_digest)"),
    ("softwareDigest", ..., "softwareDigest: missing: software is sent with its digest"),
    ("softwareOmitted", -1, "softwareOmitted: must be an integer from 0 to 2147483647"),
    ("softwareOmitted", "3", "softwareOmitted: expected an integer, got a string"),
]


@pytest.mark.parametrize(("key", "value", "problem"), SOFTWARE_MUTATIONS, ids=[m[2][:40] for m in SOFTWARE_MUTATIONS])
def test_software_problems_name_the_field_and_the_schema_agrees(key: str, value: Any, problem: str) -> None:
    body = _with_software([{"name": "bash", "version": "5.2", "source": "dpkg"}])
    if value is ...:
        del body[key]
    else:
        body[key] = value
    problems = [str(p) for p in protocol.checkin_problems(body)[1]]
    assert problems[:1] == [problem]
    _verdicts_agree(body)


def test_software_limits_are_the_schemas_and_enforced_at_their_values() -> None:
    entry = REQUEST["$defs"]["softwareEntry"]["properties"]
    assert REQUEST["properties"]["software"]["maxItems"] == protocol.MAX_SOFTWARE
    assert (entry["name"]["maxLength"], entry["version"]["maxLength"]) == (protocol.MAX_SOFTWARE_NAME,
                                                                          protocol.MAX_SOFTWARE_VERSION)
    assert tuple(entry["source"]["enum"]) == protocol.SOFTWARE_SOURCES
    assert REQUEST["properties"]["softwareOmitted"]["maximum"] == protocol.MAX_SOFTWARE_OMITTED
    many = [{"name": f"p{i}", "version": "1", "source": "dpkg"} for i in range(protocol.MAX_SOFTWARE + 1)]
    assert protocol.checkin_problems(_with_software(many[:-1]))[1] == []
    assert [str(p) for p in protocol.checkin_problems(_with_software(many))[1]] == [
        f"software: at most {protocol.MAX_SOFTWARE} entries, got {protocol.MAX_SOFTWARE + 1}"]
    # the largest list an agent sends fits a check-in body with room for everything else
    assert protocol.MAX_SOFTWARE_BYTES + 300 * 1024 < protocol.MAX_BODY


def test_a_checked_body_carries_the_software_list_and_its_digest() -> None:
    entries = [{"name": "bash", "version": "5.2", "source": "dpkg"}]
    body = protocol.check_checkin(_with_software(entries, omitted=7))
    assert (body["software"], body["softwareOmitted"]) == (entries, 7)
    assert body["softwareDigest"] == protocol.software_digest(entries, 7) != protocol.software_digest(entries, 0)
    assert "software" not in protocol.check_checkin({**checkin_body(), "softwareDigest": "a" * 64})


@pytest.mark.parametrize(("held", "ok"), [(None, True), ("a" * 64, True), ("A" * 64, False), (3, False)])
def test_the_agent_reads_the_relays_software_digest(held: Any, ok: bool) -> None:
    doc = {"pollSeconds": 30, "actions": [], "softwareDigest": held}
    if ok:
        assert protocol.check_reply(doc)["softwareDigest"] == held
        assert REPLY_VALIDATOR.is_valid(doc)
    else:
        with pytest.raises(protocol.ProtocolError, match="softwareDigest"):
            protocol.check_reply(doc)
        assert not REPLY_VALIDATOR.is_valid(doc)


def test_problems_name_the_field() -> None:
    body = {"facts": {"os": "beos", "freeDiskMB": True}, "inventory": [{"name": "app"}, "x"], "extra": 1}
    assert [str(p) for p in protocol.checkin_problems(body)[1]] == [
        "extra: unknown field (allowed: facts, labels, inventory, results, lastRelay, trustSerial, softwareDigest, "
            "software, softwareOmitted)",
        "facts.os: must be one of linux, windows, darwin, got 'beos'",
        "facts.freeDiskMB: expected an integer, got a boolean",
        "inventory[0].version: missing required field",
        "inventory[1]: expected an object, got a string",
    ]
    with pytest.raises(protocol.ProtocolError, match="^extra: unknown field"):
        protocol.check_checkin(body)


def test_decode_json_refuses_what_json_loads_lets_through() -> None:
    for raw, message in [(b'{"a": 1, "a": 2}', "duplicate key 'a'"), (b'{"a": NaN}', "NaN is not valid JSON"),
                         (b'{"a": "\\ud800"}', "a: text is not valid Unicode"), (b"\xff", "is not UTF-8")]:
        with pytest.raises(protocol.ProtocolError, match=message):
            protocol.decode_json(raw)


# ------------------------------------------------------------------ the real agent and the real relay


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _serve(relay: Relay) -> None:
    """Two jobs reaching relay-a: install app, then addon (which depends on app), both staged for real."""
    import hashlib

    result = parse_repo({
        "topology.yaml": b"apiVersion: reconciler/v1\nkind: Topology\nmetadata: {name: t}\n"
                         b"spec: {headquarters: hq-x, relays: [{name: relay-a, parent: hq-x}]}\n",
        "packages/app.yaml": b"apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: app-1.0}\n"
                             b"spec: {name: app, version: '1.0', artifact: {path: a}, installer: {type: files}}\n",
        "packages/addon.yaml": b"apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: addon-2.0}\n"
                               b"spec: {name: addon, version: '2.0', artifact: {path: a}, installer: {type: files},\n"
                               b"       dependsOn: [{name: app, minVersion: '1.0'}]}\n",
        "jobs/app.yaml": b"apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: install-app}\n"
                         b"spec: {jobType: install, package: {name: app, version: '1.0'},\n"
                         b"       destinationType: allLowerClients, destinations: [relay-a]}\n",
        "jobs/addon.yaml": b"apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: install-addon}\n"
                           b"spec: {jobType: install, package: {name: addon, version: '2.0'},\n"
                           b"       destinationType: allLowerClients, destinations: [relay-a]}\n",
    }, lambda path: None)
    assert result.specs is not None, result.errors
    staged = {}
    for name, version in (("app", "1.0"), ("addon", "2.0")):
        content = _tar({f"{name}.txt": f"{name} {version}\n".encode()})
        sha = hashlib.sha256(content).hexdigest()
        (relay.cache / sha).write_bytes(content)
        staged[(name, version)] = StagedArtifact(sha, len(content), "tar")
    relay.state.generation = make_generation("c" * 40, result.specs, "relay-a", artifacts=staged)


class _Recording(requests.Session):
    """A session that keeps every check-in body it sent and every reply it got."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[Any, requests.Response]] = []

    def post(self, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        response = super().post(url, *args, **kwargs)
        self.exchanges.append((json.loads(json.dumps(kwargs.get("json"))), response))
        return response


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r, server = _start(tmp_path)
    yield r
    server.stop()
    r.store.close()


def test_what_the_agent_sends_and_the_relay_replies_follows_the_schemas(relay: Relay, tmp_path: Path) -> None:
    _serve(relay)
    session = _Recording()
    agent = Agent("pc-1", relay.url, tmp_path / "agent", {"dept": "sales"}, [("hostname", "pc-1")], session,
                  enroll_secret=ENROLL_SECRET, insecure_http=True)
    for _ in range(3):
        assert agent.step().reached
    assert agent.inventory() == [{"name": "addon", "version": "2.0"}, {"name": "app", "version": "1.0"}]
    assert len(session.exchanges) == 3
    kinds: set[str] = set()
    for body, response in session.exchanges:
        assert response.status_code == 200, response.text
        errors = [e.message for e in REQUEST_VALIDATOR.iter_errors(body)]
        assert not errors, errors
        assert protocol.check_checkin(body) is not None
        reply = response.json()
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in REPLY_VALIDATOR.iter_errors(reply)]
        assert not errors, errors
        assert protocol.check_reply(reply) == reply
        kinds.update(a["job"] for a in reply["actions"])
        kinds.update("dependsOn" for a in reply["actions"] if "dependsOn" in a)
        kinds.update("token" for _ in [reply] if "token" in reply)
        kinds.update(r["status"] for r in body.get("results", []))
    assert kinds == {"install-app", "install-addon", "dependsOn", "token", "succeeded"}


def test_an_uninstall_action_follows_the_reply_schema() -> None:
    from reconciler.plan import Action

    for package_version in (None, "1.0"):
        action = Action("op-9", "remove-app", "pc-1", ActionKind.UNINSTALL, None, "app", package_version, None,
                        "r1", 0, 1, 600)
        reply = {"pollSeconds": 30, "actions": [action_json(action, None)]}
        assert REPLY_VALIDATOR.is_valid(reply), list(REPLY_VALIDATOR.iter_errors(reply))
    with_artifact = {"pollSeconds": 1.5, "actions": [{**action_json(action, None),
                                                      "artifact": {"sha256": "a" * 64, "size": 1, "format": "tar"}}]}
    assert not REPLY_VALIDATOR.is_valid(with_artifact)  # an uninstall downloads nothing


@pytest.mark.parametrize(("reply", "problem"), [
    ([], "reply must be a JSON object, got an array"),
    ({"pollSeconds": 30}, "actions: expected an array, got null"),
    ({"pollSeconds": 30, "actions": ["x"]}, "actions[0]: expected an object, got a string"),
    ({"actions": []}, "pollSeconds: must be a positive number of at most 86400, got None"),
    ({"pollSeconds": 0, "actions": []}, "pollSeconds: must be a positive number of at most 86400, got 0"),
    ({"pollSeconds": True, "actions": []}, "pollSeconds: must be a positive number of at most 86400, got True"),
    ({"pollSeconds": 1e10, "actions": []},
     "pollSeconds: must be a positive number of at most 86400, got 10000000000.0"),
    ({"pollSeconds": 30, "actions": [], "token": "short"}, "token: must be 16-128 letters"),
])
def test_the_agent_refuses_a_malformed_reply_envelope(reply: Any, problem: str) -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.check_reply(reply)
    assert str(caught.value).startswith(problem)
    if isinstance(reply, dict) and reply.get("actions") == [] and "pollSeconds" in reply:
        assert not REPLY_VALIDATOR.is_valid(reply)


def test_a_reply_from_a_newer_relay_keeps_working() -> None:
    action: dict[str, Any] = {"operationId": "op-1", "signature": "x"}
    reply = {"pollSeconds": 30, "actions": [action], "manifest": {}}
    assert protocol.check_reply(reply)["actions"] == [action]


# ------------------------------------------------------------------ installer.redact


def test_installer_redact_travels_to_the_agent_and_follows_the_schema() -> None:
    from reconciler.plan import Action
    from reconciler.specs import Artifact, Installer, InstallerType, Package

    for redact in ((), ("LIC-[0-9]{4}", "(?i)pin=\\d++")):
        package = Package("app-1.0", "app", "1.0", Artifact(path="artifacts/app"),
                          Installer(InstallerType.COMMAND, ("run",), ("undo",), (), 60, redact))
        action = Action("op-1", "install-app", "pc-1", ActionKind.INSTALL, package, "app", "1.0", None, "r1", 0, 1, 60)
        artifact = StagedArtifact("a" * 64, 10, "tar", None)
        wire = action_json(action, artifact)
        reply = {"pollSeconds": 30, "actions": [wire]}
        assert REPLY_VALIDATOR.is_valid(reply), list(REPLY_VALIDATOR.iter_errors(reply))
        assert wire["installer"] is not None and wire["installer"].get("redact", []) == list(redact)
        assert ("redact" in wire["installer"]) == bool(redact)  # absent when the spec has none
    too_many = {"pollSeconds": 30, "actions": [{**wire, "installer": {**wire["installer"], "redact": ["x"] * 17}}]}
    assert not REPLY_VALIDATOR.is_valid(too_many)


def test_protocol_md_documents_installer_redact_with_the_schema_limits() -> None:
    from reconciler.redaction import MAX_REDACT_PATTERN_LENGTH, MAX_REDACT_PATTERNS

    text = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    section = text[text.index("`installer.redact`"):]
    section = section[: section.index("\n- ")]
    assert f"up to {MAX_REDACT_PATTERNS} regular expressions" in " ".join(section.split())
    assert f"1 to {MAX_REDACT_PATTERN_LENGTH} characters" in " ".join(section.split())
    node = REPLY["$defs"]["installer"]["properties"]["redact"]
    assert (node["maxItems"], node["items"]["maxLength"]) == (MAX_REDACT_PATTERNS, MAX_REDACT_PATTERN_LENGTH)


# ------------------------------------------------------------------ inventory sources and detection rules


def test_inventory_sources_are_the_schemas() -> None:
    source = REQUEST["$defs"]["inventoryEntry"]["properties"]["source"]
    assert source["enum"] == list(protocol.INVENTORY_SOURCES)


def test_inventory_source_is_kept_and_checked() -> None:
    problems: list[protocol.FieldProblem] = []
    entries = protocol.check_inventory([{"name": "app", "version": "9.9", "source": "detected"},
                                        {"name": "lib", "version": "1.0"}], "inventory", problems)
    assert problems == []
    assert entries == [{"name": "app", "version": "9.9", "source": "detected"}, {"name": "lib", "version": "1.0"}]
    entries = protocol.check_inventory([{"name": "app", "version": "9.9", "source": "guessed"},
                                        {"name": "lib", "version": "1.0", "source": 7}], "inventory", problems)
    assert [str(p) for p in problems] == [
        "inventory[0].source: must be one of reconciler, detected, got 'guessed'",
        "inventory[1].source: expected a string, got an integer"]
    assert entries == [{"name": "app", "version": "9.9"}, {"name": "lib", "version": "1.0"}]


def test_detection_travels_in_the_installer_as_the_spec_has_it() -> None:
    from reconciler import specs
    rule = specs.Detection(file="${PROGRAMFILES}/App/version.txt", version_pattern=r"version=(\S+)")
    installer = specs.Installer(type=specs.InstallerType.FILES, detection=rule)
    wire = protocol.installer_of(installer)
    assert wire["detection"] == {"file": "${PROGRAMFILES}/App/version.txt", "versionPattern": r"version=(\S+)"}
    registry = specs.Detection(registry_key="HKLM\\SOFTWARE\\App", registry_value="DisplayVersion")
    assert protocol.detection_of(registry) == {"registry": {"key": "HKLM\\SOFTWARE\\App", "value": "DisplayVersion"}}
    command = specs.Detection(command=("app", "--version"), timeout_seconds=5)
    assert protocol.detection_of(command) == {"command": ["app", "--version"], "timeoutSeconds": 5}
    assert "detection" not in protocol.installer_of(specs.Installer(type=specs.InstallerType.FILES))
