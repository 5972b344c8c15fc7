"""Status files are read through their schemas: the compiled checks agree with jsonschema, errors name the field.

``reconciler.schema_check`` compiles each status schema into one predicate
(fast enough for a 50,000-row relay job file) and asks jsonschema only why a
refused value is wrong. Here both are run on every status file a fleet
renders and on random mutations of them: the verdicts must be the same.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import report, schema_check
from reconciler.plan import ClientState, JobState
from reconciler.report import Accepted
from reconciler.resources import schemas_dir
from reconciler.specs import SpecError

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
C1 = "1" * 40
STATUS_SCHEMAS = sorted(p.name.removesuffix(".schema.json") for p in schemas_dir().glob("status-*.schema.json"))


def _rows(count: int) -> list[report.StatusRow]:
    states = [ClientState.SUCCEEDED, ClientState.FAILED, ClientState.PENDING, ClientState.CONFLICT]
    return [report.StatusRow(f"pc-{i:04d}", states[i % 4], "1.0" if i % 4 == 0 else None, i % 3,
                             f"message {i}" if i % 4 else "", T0 + timedelta(seconds=i)) for i in range(count)]


def _documents() -> list[tuple[str, Any]]:
    """(schema, document) for one of every status file, as the writers render them."""
    rows = _rows(12)
    counts = report.count_states(r.state for r in rows)
    job = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED, counts, rows)
    relay = (
        "relay: relay-kanto\nobservedCommit: null\nclients: 3\nupdatedAt: \"2026-11-23T10:00:00Z\"\n"
        "errors: [\"artifact app 1.0 could not be staged\"]\njobs:\n  install-7zip:\n    state: Failed\n"
        f"    counts: {json.dumps(counts)}\n    failures:\n"
        + "".join(f"    - {json.dumps(report._row_json(r))}\n" for r in rows if r.state is ClientState.FAILED)
    ).encode()
    accepted = report.render_accepted(Accepted(C1, T0, C1, True, report.EvaluationError("2" * 40, "boom")), "main")
    validation = report.render_validation(C1, [SpecError("jobs/a.yaml", 3, 5, "bad")])
    return [
        ("status-relay-job", yaml.safe_load(job)),
        ("status-relay", yaml.safe_load(relay)),
        ("status-accepted", yaml.safe_load(accepted)),
        ("status-accepted", yaml.safe_load(report.render_accepted(Accepted(None, None, None, None), "main"))),
        ("status-validation", yaml.safe_load(validation)),
        ("status-validation", yaml.safe_load(report.render_validation(None, []))),
        ("status-inventory", {"relay": "relay-kanto", "clients": [
            {"id": "pc-1", "facts": {"os": "linux", "freeDiskMB": 10}, "labels": {"dept": "x"},
             "installed": [{"name": "app", "version": "1.0"}], "online": True}]}),
        ("status-inventory", {"relay": "relay-kanto", "clients": [
            {"id": "pc-1", "facts": {}, "labels": {}, "installed": [], "online": True,
             "software": [{"name": "7-Zip 23.01 (x64)", "version": "23.01", "source": "registry"},
                          {"name": "bash", "version": "", "source": "dpkg"}]}]}),
        ("status-software", json.loads(report.render_relay_software("relay-kanto", {
            "pc-1": ([("bash", "5.2", "dpkg"), ("Firefox", "120", "registry")], 0),
            "pc-2": ([("bash", "5.2", "dpkg")], 3), "pc-3": ([("bash", "5.1", "dpkg")], 0)}))),
    ]


def _agree(name: str, value: Any, pointer: str = "") -> bool:
    compiled = schema_check.compiled(name, pointer)(value)
    assert compiled == schema_check.validator(name, pointer).is_valid(value), (name, pointer, value)
    return compiled


@pytest.mark.parametrize("name", STATUS_SCHEMAS)
def test_every_status_schema_compiles(name: str) -> None:
    assert callable(schema_check.compiled(name))
    assert schema_check.compiled(name) is schema_check.compiled(name)  # built once per process
    assert schema_check.validator(name) is schema_check.validator(name)


def test_the_rendered_files_pass_both() -> None:
    for name, doc in _documents():
        assert _agree(name, doc), schema_check.problem(name, doc)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-3, max_value=2**70), st.just(2.0),
                     st.just(0.5), st.sampled_from(["", "Failed", "Sleeping", "pc-1", "pc-1\n", "PC 1", C1, "2" * 39,
                                                    "2026-11-23T10:00:00Z", "2026-11-23T10:00:00+09:00"]),
                     st.text(max_size=5))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["client", "state", "attempts", "Failed", "relay", "commit", "message", "x"]), inner, max_size=3)),
    max_leaves=5)


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            found += _paths(value, (*at, index))
    return found


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_compiled_checks_and_jsonschema_agree_on_mutated_files(data: st.DataObject) -> None:
    name, original = data.draw(st.sampled_from(_documents()))
    doc = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(_VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["x", "Failed", "client", "relay"]))] = data.draw(_VALUES)
    _agree(name, doc)
    if name == "status-relay-job":
        for row in doc.get("rows", [])[:3] if isinstance(doc.get("rows"), list) else ():
            _agree(name, row, "/$defs/row")


def test_the_compiled_check_refuses_keywords_it_does_not_implement() -> None:
    schema: dict[str, Any]
    for schema in ({"type": "string", "format": "date-time"}, {"oneOf": [{"type": "string"}]},
                   {"patternProperties": {"^x": {}}}, {"$ref": "https://example.com/s.json"}):
        with pytest.raises(ValueError, match="not supported"):
            schema_check._Compiler(schema).compile(schema)


def test_problems_name_the_field() -> None:
    row = report._row_json(_rows(1)[0])
    assert schema_check.problem("status-relay-job", {**row, "attempts": -1}, "/$defs/row", "rows[3]") == \
        "rows[3].attempts: -1 is less than the minimum of 0"
    assert schema_check.problem("status-relay-job", row, "/$defs/row", "rows[3]") is None


# ------------------------------------------------------------------ the parsers


def _relay_yaml(**changes: Any) -> dict[str, bytes]:
    doc = yaml.safe_load(report.render_relay_status("relay-a", C1, None, {}, [], [])["relays/relay-a/relay.yaml"])
    doc["jobs"] = {"install-app": {"state": "Failed", "counts": report.count_states([ClientState.FAILED]),
                                   "failures": [report._row_json(_rows(2)[1])]}}
    for dotted, value in changes.items():
        parent = doc
        *steps, last = dotted.split(".")
        for step in steps:
            parent = parent[int(step)] if isinstance(parent, list) else parent[step]
        parent[last] = value
    return {"relays/relay-a/relay.yaml": report.dump_yaml(doc)}


@pytest.mark.parametrize(("changes", "error"), [
    ({"jobs.install-app.counts.Failed": -1},
     "relays/relay-a/relay.yaml: jobs.install-app.counts.Failed: -1 is less than the minimum of 0"),
    ({"jobs.install-app.state": "Sleeping"},
     "relays/relay-a/relay.yaml: jobs.install-app.state: 'Sleeping' is not one of"),
    ({"jobs.install-app.failures.0.client": "PC 1"},
     "relays/relay-a/relay.yaml: jobs.install-app.failures[0].client: 'PC 1' does not match"),
    ({"clients": "3"}, "relays/relay-a/relay.yaml: clients: '3' is not of type 'integer'"),
    ({"observedCommit": "abc"}, "relays/relay-a/relay.yaml: observedCommit: 'abc' does not match"),
    ({"updatedAt": "2026-13-45T10:00:00Z"}, "relays/relay-a/relay.yaml: expected an RFC 3339 time"),
])
def test_a_relay_yaml_that_fails_its_schema_names_the_file_and_field(changes: dict[str, Any], error: str) -> None:
    assert report.parse_relay_status(_relay_yaml()).jobs["install-app"].counts["Failed"] == 1
    with pytest.raises(report.ReportError) as caught:
        report.parse_relay_status(_relay_yaml(**changes))
    assert str(caught.value).startswith(error)


def test_a_relay_job_row_that_fails_its_schema_names_the_row() -> None:
    rows = _rows(5)
    data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                   report.count_states(r.state for r in rows), rows)
    bad = data.replace(b'"attempts": 2, "client": "pc-0002"', b'"attempts": -2, "client": "pc-0002"')
    with pytest.raises(report.ReportError) as caught:
        report.parse_relay_job(bad, "relays/relay-kanto/jobs/install-7zip.yaml")
    assert str(caught.value) == ("relays/relay-kanto/jobs/install-7zip.yaml: rows[2].attempts: "
                                 "-2 is less than the minimum of 0")
    head_bad = data.replace(b"state: Failed", b"state: Sleeping")
    with pytest.raises(report.ReportError, match="install-7zip.yaml: state: 'Sleeping' is not one of"):
        report.parse_relay_job(head_bad, "relays/relay-kanto/jobs/install-7zip.yaml")


def test_a_relay_job_file_reads_the_same_in_any_yaml_layout() -> None:
    rows = _rows(40)
    data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                   report.count_states(r.state for r in rows), rows)
    fast = report.parse_relay_job(data)
    assert fast[1].rows == tuple(rows)
    doc = yaml.safe_load(data)
    for other in (yaml.safe_dump(doc, sort_keys=False).encode(), json.dumps(doc).encode(),
                  data.replace(b"\nrows:\n", b"\n# rows below\nrows:\n"), data + b"# end\n"):
        assert report.parse_relay_job(other) == fast
    empty = report.render_relay_job("install-7zip", "relay-kanto", JobState.NO_TARGETS, report.zero_counts(), [])
    assert report.parse_relay_job(empty)[1].rows == ()
    with pytest.raises(report.ReportError, match="rows: None is not of type 'array'"):
        report.parse_relay_job(empty.replace(b"rows: []", b"rows:"))
    with pytest.raises(report.ReportError, match="'rows' is a required property"):
        report.parse_relay_job(empty.replace(b"rows: []\n", b""))


def test_a_relay_job_file_of_an_earlier_version_naming_its_commit_reads_the_same() -> None:
    rows = _rows(4)
    data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                   report.count_states(r.state for r in rows), rows)
    assert b"observedCommit" not in data
    for commit in (C1, None):
        earlier = data.replace(b"job: install-7zip\n", b"job: install-7zip\nobservedCommit: "
                               + (json.dumps(commit).encode() if commit else b"null") + b"\n")
        assert earlier != data and report.parse_relay_job(earlier) == report.parse_relay_job(data)
    with pytest.raises(report.ReportError, match="observedCommit"):
        report.parse_relay_job(data.replace(b"job: install-7zip\n", b"job: install-7zip\nobservedCommit: abc\n"))


def test_a_relay_job_row_that_is_not_json_is_read_as_yaml() -> None:
    rows = _rows(3)
    data = report.render_relay_job("install-7zip", "relay-kanto", JobState.FAILED,
                                   report.count_states(r.state for r in rows), rows)
    yaml_row = b"- {client: pc-0009, state: Failed, installedVersion: null, attempts: 1, message: x, updatedAt: null}\n"
    status = report.parse_relay_job(data + yaml_row)[1]
    assert [r.client for r in status.rows] == ["pc-0000", "pc-0001", "pc-0002", "pc-0009"]


def test_accepted_yaml_takes_the_schema_defaults_for_fields_older_writers_left_out() -> None:
    schema = schema_check.schema("status-accepted")
    defaults = {key: sub["default"] for key, sub in schema["properties"].items() if "default" in sub}
    assert defaults == {"acceptedCommit": None, "acceptedAt": None, "branch": "main", "mainCommit": None,
                        "mainValid": None}
    assert report.parse_accepted(b"{}\n") == Accepted(None, None, None, None)
    assert report.parse_branch(b"acceptedCommit: null\n") == "main"
    with pytest.raises(report.ReportError, match="accepted.yaml: mainValid: 'yes' is not of type"):
        report.parse_accepted(b"mainValid: 'yes'\n")
    with pytest.raises(report.ReportError, match="accepted.yaml: evaluationError: 'commit' is a required property"):
        report.parse_accepted(b"evaluationError: {message: x}\n")


def test_hq_files_round_trip_through_their_schemas() -> None:
    from test_report import example_specs, relay_files, statuses

    specs = example_specs()
    fleet = statuses(relay_files("relay-kanto", C1, {"install-7zip": [("pc-1", ClientState.FAILED, "exit 2")]}))
    hq = report.aggregate(specs, Accepted(C1, T0, C1, True), "main", [SpecError("jobs/x.yaml", 1, 1, "bad")], fleet)
    files = report.render_hq_status(hq)
    assert report.parse_hq_status(files) == hq
    broken = dict(files)
    broken[report.RELAYS_FILE] = files[report.RELAYS_FILE].replace(b'"reported": true', b'"reported": 1', 1)
    with pytest.raises(report.ReportError, match=r"relays.yaml: relays\[\d+\].reported: 1 is not of type 'boolean'"):
        report.parse_hq_status(broken)
