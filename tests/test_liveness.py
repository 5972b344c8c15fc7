"""Relay liveness: the rule (pure, an injected clock), HQ's contacts on disk, and the status files that show it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_report import (
    C1,
    _fleet,
    assert_valid_status_files,
    example_specs,
)

from reconciler import report, schema_check
from reconciler.hq_liveness import Contacts
from reconciler.liveness import (
    HEARTBEAT_ERROR_CHARS,
    HEARTBEAT_ERRORS,
    ClientCounts,
    HeartbeatError,
    Liveness,
    RelayLiveness,
    deadline,
    heartbeat_json,
    judge,
    make_heartbeat,
    parse_heartbeat,
)
from reconciler.report import Accepted, InventoryEntry
from reconciler.resources import schemas_dir

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
TIMEOUT = timedelta(seconds=300)
ALIVE, LOST, UNKNOWN = Liveness.ALIVE, Liveness.LOST, Liveness.UNKNOWN


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize(("label", "previous", "contact", "now", "listening", "expected"), [
    ("never heard, HQ just started", None, None, 10, 0, RelayLiveness(UNKNOWN, None)),
    ("never heard, exactly the timeout", None, None, 300, 0, RelayLiveness(UNKNOWN, None)),
    ("never heard, past the timeout", None, None, 301, 0, RelayLiveness(LOST, at(300), None)),
    ("a heartbeat", RelayLiveness(UNKNOWN, None), 5, 10, 0, RelayLiveness(ALIVE, at(5))),
    ("alive within the timeout", RelayLiveness(ALIVE, at(5)), 100, 400, 0, RelayLiveness(ALIVE, at(5))),
    ("alive at exactly the timeout", RelayLiveness(ALIVE, at(5)), 100, 400, 0, RelayLiveness(ALIVE, at(5))),
    ("silent past the timeout", RelayLiveness(ALIVE, at(5)), 100, 401, 0, RelayLiveness(LOST, at(400), at(100))),
    ("lost stays lost, fixed", RelayLiveness(LOST, at(400), at(100)), 100, 9000, 0,
     RelayLiveness(LOST, at(400), at(100))),
    ("lost, then a heartbeat", RelayLiveness(LOST, at(400), at(100)), 500, 501, 0, RelayLiveness(ALIVE, at(500))),
    # HQ restarted at 1000 after a 900 s outage: nobody could reach it, so nobody is lost yet
    ("restart: alive keeps its grace", RelayLiveness(ALIVE, at(5)), 100, 1200, 1000, RelayLiveness(ALIVE, at(5))),
    ("restart: grace runs out", RelayLiveness(ALIVE, at(5)), 100, 1301, 1000,
     RelayLiveness(LOST, at(1300), at(100))),
    ("restart: lost stays lost", RelayLiveness(LOST, at(400), at(100)), 100, 1001, 1000,
     RelayLiveness(LOST, at(400), at(100))),
    ("restart: unknown stays unknown", RelayLiveness(UNKNOWN, None), None, 1200, 1000, RelayLiveness(UNKNOWN, None)),
    ("a clock that went back counts as contact", RelayLiveness(LOST, at(400), at(100)), 600, 550, 0,
     RelayLiveness(ALIVE, at(600))),
])
def test_judge(label: str, previous: RelayLiveness | None, contact: float | None, now: float, listening: float,
               expected: RelayLiveness) -> None:
    got = judge(previous, None if contact is None else at(contact), at(now), TIMEOUT, at(listening))
    assert got == expected, label
    if previous is not None and got == previous:
        assert got is previous  # nothing changed: the very value, so callers compare cheaply


def test_deadline_is_when_judge_would_turn_lost() -> None:
    assert deadline(RelayLiveness(ALIVE, at(5)), at(100), TIMEOUT, at(0)) == at(400)
    assert deadline(RelayLiveness(ALIVE, at(5)), at(100), TIMEOUT, at(1000)) == at(1300)
    assert deadline(None, None, TIMEOUT, at(0)) == at(300)
    assert deadline(RelayLiveness(LOST, at(400), at(100)), at(100), TIMEOUT, at(0)) is None
    for now in (399, 400):
        assert judge(RelayLiveness(ALIVE, at(5)), at(100), at(now), TIMEOUT, at(0)).state is ALIVE
    assert judge(RelayLiveness(ALIVE, at(5)), at(100), at(400.5), TIMEOUT, at(0)).state is LOST


# ------------------------------------------------------------------ the heartbeat


def _beat(relay: str = "relay-a", **changes: Any) -> dict[str, Any]:
    doc = heartbeat_json(make_heartbeat(relay, C1, ClientCounts(10, 8, 2), ["staging failed"], T0))
    doc.update(changes)
    return doc


def test_a_heartbeat_reads_back_as_sent_and_follows_its_schema() -> None:
    errors = [f"error {i}: " + "x" * 1000 + "\nsecond line" for i in range(12)]
    sent = make_heartbeat("relay-a", None, ClientCounts(3, 1, 2), errors, T0)
    assert (sent.error_count, len(sent.errors)) == (12, HEARTBEAT_ERRORS)
    assert all(len(e) <= HEARTBEAT_ERROR_CHARS and "\n" not in e for e in sent.errors)
    doc = heartbeat_json(sent)
    schema = json.loads((schemas_dir() / "relay-heartbeat.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert jsonschema.Draft202012Validator(schema).is_valid(doc)
    assert parse_heartbeat(json.dumps(doc).encode()) == sent
    assert len(json.dumps(doc)) < 4096  # bounded, whatever the relay's errors


@pytest.mark.parametrize(("body", "field"), [
    (b"{", "heartbeat"),
    (b"[]", ""),
    (json.dumps(_beat(clients={"total": 1, "online": -1, "offline": 2})).encode(), "clients.online"),
    (json.dumps(_beat(clients={"total": 1, "online": 1})).encode(), "clients"),
    (json.dumps(_beat(observedCommit="abc")).encode(), "observedCommit"),
    (json.dumps(_beat(sentAt="yesterday")).encode(), "sentAt"),
    (json.dumps(_beat(sentAt="2026-13-45T10:00:00Z")).encode(), "sentAt"),
    (json.dumps(_beat(relay="Relay A")).encode(), "relay"),
    (json.dumps(_beat(extra=1)).encode(), "extra"),
    (json.dumps(_beat(errors={"count": 0, "first": ["x"]})).encode(), "errors.count"),
    (json.dumps(_beat(errors={"count": 9, "first": ["x"] * 9})).encode(), "errors.first"),
    (b'{"relay": "a", "relay": "b"}', "relay"),
])
def test_a_malformed_heartbeat_is_refused_naming_the_field(body: bytes, field: str) -> None:
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(body)
    assert field in str(info.value)


def test_the_heartbeat_schema_compiles_and_agrees_with_jsonschema() -> None:
    good = _beat()
    bad = _beat(clients={"total": "1", "online": 0, "offline": 0})
    for doc, valid in ((good, True), (bad, False)):
        assert schema_check.compiled("relay-heartbeat")(doc) is valid
        assert schema_check.validator("relay-heartbeat").is_valid(doc) is valid


# ------------------------------------------------------------------ HQ's contacts


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


RELAYS = ("relay-a", "relay-b")


def _contacts(path: Path | None, clock: Clock, timeout: float = 300) -> Contacts:
    return Contacts(path, timeout, clock(), clock)


def _states(published: dict[str, RelayLiveness]) -> dict[str, Liveness]:
    return {name: live.state for name, live in published.items()}


def test_contacts_go_unknown_alive_lost_alive(tmp_path: Path) -> None:
    clock = Clock()
    contacts = _contacts(tmp_path / "liveness.json", clock)
    assert contacts.known("relay-a") is None  # before HQ accepted a commit
    published, notes = contacts.evaluate(RELAYS)
    assert _states(published) == {"relay-a": UNKNOWN, "relay-b": UNKNOWN} and notes == []
    assert contacts.known("relay-a") is True and contacts.known("relay-z") is False
    clock.advance(10)
    assert contacts.record(make_heartbeat("relay-a", C1, ClientCounts(2, 2, 0), [], clock())) is True
    published, notes = contacts.evaluate(RELAYS)
    assert published["relay-a"] == RelayLiveness(ALIVE, at(10)) and published["relay-b"].state is UNKNOWN
    assert notes == ["relay relay-a is alive (heartbeat at 2026-11-23T10:00:10Z)"]
    # heartbeats of a live relay change nothing published
    for _ in range(10):
        clock.advance(60)
        assert contacts.record(make_heartbeat("relay-a", C1, ClientCounts(2, 2, 0), [], clock())) is False
        published, notes = contacts.evaluate(RELAYS)
        assert published["relay-a"] == RelayLiveness(ALIVE, at(10)) and notes == [] or "relay-b" in notes[0]
    assert published["relay-b"] == RelayLiveness(LOST, at(300))  # never heard within the timeout
    assert contacts.seconds_until_change() == 300.0  # relay-a's next deadline
    clock.advance(301)
    published, notes = contacts.evaluate(RELAYS)
    assert published["relay-a"] == RelayLiveness(LOST, at(910), at(610))
    assert notes == ["relay relay-a is LOST: no heartbeat since 2026-11-23T10:10:10Z"]
    assert contacts.seconds_until_change() is None
    assert contacts.counts() == {"alive": 0, "lost": 2, "unknown": 0}
    clock.advance(5)
    assert contacts.record(make_heartbeat("relay-a", C1, ClientCounts(2, 1, 1), [], clock())) is True
    published, _ = contacts.evaluate(RELAYS)
    assert published["relay-a"] == RelayLiveness(ALIVE, clock())
    view = {r["relay"]: r for r in contacts.view()["relays"]}
    assert view["relay-a"]["lastContact"] == "2026-11-23T10:15:16Z"
    assert view["relay-a"]["clients"] == {"total": 2, "online": 1, "offline": 1}
    assert view["relay-b"]["liveness"] == "lost" and view["relay-b"]["clients"] is None


def test_a_restarted_hq_remembers_contacts_and_calls_nobody_lost_at_once(tmp_path: Path) -> None:
    path = tmp_path / "liveness.json"
    clock = Clock()
    first = _contacts(path, clock)
    first.evaluate(RELAYS)
    first.record(make_heartbeat("relay-a", C1, ClientCounts(2, 2, 0), [], clock()))
    clock.advance(400)  # relay-b never called: lost; relay-a silent since 0: lost
    before, _ = first.evaluate(RELAYS)
    first.record(make_heartbeat("relay-a", C1, ClientCounts(2, 2, 0), [], clock()))
    before, _ = first.evaluate(RELAYS)
    assert _states(before) == {"relay-a": ALIVE, "relay-b": LOST}
    first.save()

    clock.advance(3600)  # HQ was down for an hour
    second = _contacts(path, clock)
    after, notes = second.evaluate(RELAYS)
    assert after == before and notes == []  # nothing forgotten, relay-a not lost at once
    view = {r["relay"]: r for r in second.view()["relays"]}
    assert view["relay-a"]["lastContact"] == "2026-11-23T10:06:40Z"
    clock.advance(301)  # the grace counts from when HQ started listening again
    after, notes = second.evaluate(RELAYS)
    assert after["relay-a"] == RelayLiveness(LOST, at(400 + 3600 + 300), at(400))
    assert after["relay-b"] == before["relay-b"]


def test_contacts_are_saved_on_transitions_and_at_most_once_a_minute_otherwise(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[dict[str, Any]] = []
    monkeypatch.setattr("reconciler.hq_liveness.write_json_atomic", lambda path, doc: writes.append(doc))
    clock = Clock()
    contacts = _contacts(tmp_path / "liveness.json", clock)
    contacts.evaluate(RELAYS)
    assert len(writes) == 1  # the first judgement
    for _ in range(31):  # a heartbeat and an HQ pass every 2 s for just over a minute
        clock.advance(2)
        contacts.record(make_heartbeat("relay-a", C1, ClientCounts(2, 2, 0), [], clock()))
        contacts.evaluate(RELAYS)
    # relay-a turning alive is a transition (saved at once); then one save after a minute
    assert len(writes) == 3
    idle = len(writes)
    for _ in range(60):  # no heartbeat for two minutes
        clock.advance(2)
        contacts.evaluate(("relay-a",))  # relay-b left the topology: dropped (one write, within a minute)
    assert len(writes) == idle + 1
    assert set(writes[-1]["relays"]) == {"relay-a"}


def test_an_unreadable_contacts_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "liveness.json"
    path.write_text('{"version": 1, "relays": {"relay-a": {"liveness": "dead"}}}')
    contacts = _contacts(path, Clock())
    assert contacts.evaluate(RELAYS)[0]["relay-a"].state is UNKNOWN
    assert (tmp_path / "liveness.json.corrupt").is_file()


def test_a_hq_without_a_listener_judges_nothing() -> None:
    contacts = _contacts(None, Clock())
    assert contacts.evaluate(None) == ({}, [])
    contacts.save()  # no file, no error


# ------------------------------------------------------------------ status files


def _hq(liveness: dict[str, RelayLiveness] | None) -> report.HqReport:
    return report.aggregate(example_specs(), Accepted(C1, T0, C1, True), "main", (), _fleet(), liveness)


def test_relays_yaml_carries_liveness_and_reads_back() -> None:
    lost = RelayLiveness(LOST, at(900), at(600))
    hq = _hq({"relay-kanto": RelayLiveness(ALIVE, at(5)), "relay-osaka": lost,
              "relay-yokohama": RelayLiveness(UNKNOWN, None), "relay-fukuoka": RelayLiveness(ALIVE, at(7))})
    files = report.render_hq_status(hq)
    assert_valid_status_files(files)
    doc = {r["relay"]: r for r in yaml.safe_load(files["relays.yaml"])["relays"]}
    assert doc["relay-osaka"]["liveness"] == "lost" and doc["relay-osaka"]["lastContact"] == "2026-11-23T10:10:00Z"
    assert doc["relay-osaka"]["livenessSince"] == "2026-11-23T10:15:00Z"
    assert "lastContact" not in doc["relay-kanto"]  # a live relay's last contact moves: never committed
    assert (doc["relay-kanto"]["clientsOnline"], doc["relay-kanto"]["clientsOffline"]) == (2, 0)
    back = report.parse_hq_status(files)
    assert back.relays == hq.relays
    assert report.relay_liveness(back.relays) == {r.relay: r.liveness for r in hq.relays}


def test_relays_yaml_without_liveness_is_as_before() -> None:
    files = report.render_hq_status(_hq(None))
    for entry in yaml.safe_load(files["relays.yaml"])["relays"]:
        assert not {"liveness", "livenessSince", "lastContact"} & set(entry)
    assert "LOST" not in files["summary.md"].decode()
    assert report.relay_liveness(report.parse_hq_status(files).relays) is None
    old = yaml.safe_load(files["relays.yaml"])
    for entry in old["relays"]:  # a relays.yaml of an older HQ still reads
        entry.pop("clientsOnline", None)
        entry.pop("clientsOffline", None)
    assert all(r.clients_online is None for r in report.parse_relays(report.dump_yaml(old)))


def test_summary_names_a_lost_relay_at_the_top_and_in_the_relay_table() -> None:
    hq = _hq({"relay-kanto": RelayLiveness(ALIVE, at(5)), "relay-osaka": RelayLiveness(LOST, at(900), at(600)),
              "relay-yokohama": RelayLiveness(UNKNOWN, None), "relay-fukuoka": RelayLiveness(ALIVE, at(7))})
    text = report.render_summary(hq)
    top = text[: text.index("## Jobs")]
    assert ("> **Relay relay-osaka is LOST since 2026-11-23T10:15:00Z (last contact 2026-11-23T10:10:00Z)**"
            in top)
    assert "install-teams-meeting" in top and "install-office-addin" in top and "install-7zip" not in top
    section = text[text.index("## Relays"):].splitlines()
    table = {row[0].strip("\u00a0└ "): row for row in
             ([c.strip(" ") for c in line.strip("|").split("|")] for line in section if line.startswith("| "))}
    assert table["relay-osaka"][1] == "LOST since 2026-11-23T10:15:00Z (last contact 2026-11-23T10:10:00Z)"
    assert (table["relay-kanto"][1], table["relay-kanto"][2]) == ("alive", "2/0/2")
    assert table["relay-yokohama"][1] == "-"
    # the job keeps its state: liveness changes no roll-up
    assert [j.state for j in hq.jobs] == [j.state for j in _hq(None).jobs]


def test_relay_yaml_counts_clients_online_and_offline() -> None:
    inventory = [InventoryEntry(f"pc-{i}", {}, {}, (), i % 3 == 0) for i in range(7)]
    files = report.render_relay_status("relay-kanto", C1, None, {}, inventory, [])
    doc = yaml.safe_load(files["relays/relay-kanto/relay.yaml"])
    assert (doc["clients"], doc["clientsOnline"], doc["clientsOffline"]) == (7, 3, 4)
    assert_valid_status_files(files)
    status = report.parse_relay_status(files)
    assert (status.clients_online, status.clients_offline) == (3, 4)
    del doc["clientsOnline"], doc["clientsOffline"]  # an older relay's file
    old = report.parse_relay_status({"relays/relay-kanto/relay.yaml": report.dump_yaml(doc)})
    assert (old.clients, old.clients_online, old.clients_offline) == (7, None, None)


def test_no_accepted_topology_forgets_no_contact(tmp_path: Path) -> None:
    clock = Clock()
    contacts = _contacts(tmp_path / "liveness.json", clock)
    contacts.evaluate(RELAYS)
    contacts.record(make_heartbeat("relay-a", C1, ClientCounts(1, 1, 0), [], clock()))
    contacts.evaluate(RELAYS)
    assert contacts.evaluate(None) == ({}, [])  # the accepted commit no longer loads, say
    assert contacts.known("relay-a") is None
    assert contacts.evaluate(RELAYS)[0]["relay-a"] == RelayLiveness(ALIVE, T0)
