"""HQ's heartbeat endpoint on a real server on 127.0.0.1, the relay's sender against it, and HQ passes on real git.

The endpoint is HQ's own WSGI app (:func:`reconciler.hq.make_app`) served by
:class:`reconciler.serving.Server`; the sender is the relay's
:class:`reconciler.relay.heartbeat.HeartbeatSender`; the passes run
:class:`reconciler.hq.Hq` on a bare origin in a temp dir with an injected
clock, so a timeout of minutes passes in no time.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from test_hq import Origin, git
from test_status_cmd import publish_all, settled_rows, status

from reconciler import report
from reconciler.errors import Cause, problem
from reconciler.gitstore import GitStore
from reconciler.hq import LIVENESS_MARGIN_SECONDS, Hq, Turn, make_app, next_wait
from reconciler.hq_liveness import Contacts, RelaysApi
from reconciler.liveness import (
    MAX_HEARTBEAT_BODY,
    ClientCounts,
    heartbeat_json,
    make_heartbeat,
)
from reconciler.plan import ClientState
from reconciler.relay.heartbeat import DELIVERED, HeartbeatSender
from reconciler.relay.state import Generation, RelayState
from reconciler.serving import Server
from reconciler.webhook import sign

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
C1 = "1" * 40
SECRET = b"heartbeat-secret"
TOPOLOGY = ("relay-a", "relay-b")


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Hq_:
    """A real server with HQ's app: the relay endpoints over ``contacts``, counting wake-ups."""

    def __init__(self, secret: bytes | None, topology: tuple[str, ...] | None = TOPOLOGY) -> None:
        self.clock = Clock()
        self.contacts = Contacts(None, 300, self.clock(), self.clock)
        if topology is not None:
            self.contacts.evaluate(topology)
        self.woken = 0
        self.server = Server(make_app(self._wake, None, lambda: {}, RelaysApi(self.contacts, secret, self._wake)),
                             "127.0.0.1:0").start()
        self.url = self.server.url

    def _wake(self) -> None:
        self.woken += 1

    def post(self, relay: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(f"{self.url}/v1/relays/{relay}/heartbeat", data=body, headers=headers or {}, timeout=10)

    def relays(self) -> dict[str, dict[str, Any]]:
        response = requests.get(f"{self.url}/v1/relays", timeout=10)
        assert response.status_code == 200
        return {r["relay"]: r for r in response.json()["relays"]}


@pytest.fixture
def signed() -> Iterator[Hq_]:
    hq = Hq_(SECRET)
    yield hq
    hq.server.close()


@pytest.fixture
def open_hq() -> Iterator[Hq_]:
    hq = Hq_(None)
    yield hq
    hq.server.close()


def body(relay: str = "relay-a", **changes: Any) -> bytes:
    doc = heartbeat_json(make_heartbeat(relay, C1, ClientCounts(5, 4, 1), ["an error"], T0))
    doc.update(changes)
    return json.dumps(doc).encode()


def assert_error(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert all(word in error for word in words), error
    assert "Traceback" not in response.text


# ------------------------------------------------------------------ the endpoint


def test_a_signed_heartbeat_is_recorded_and_served(signed: Hq_) -> None:
    data = body()
    response = signed.post("relay-a", data, {"X-Hub-Signature-256": sign(SECRET, data)})
    assert response.status_code == 200 and response.json()["ok"] is True
    assert signed.woken == 1  # unknown -> alive: HQ publishes at once
    view = signed.relays()
    assert view["relay-a"]["liveness"] == "alive" and view["relay-a"]["lastContact"] == "2026-11-23T10:00:00Z"
    assert view["relay-a"]["clients"] == {"total": 5, "online": 4, "offline": 1}
    assert view["relay-a"]["errors"] == {"count": 1, "first": ["an error"]}
    assert view["relay-a"]["observedCommit"] == C1
    assert view["relay-b"]["liveness"] == "unknown" and view["relay-b"]["lastContact"] is None
    signed.contacts.evaluate(TOPOLOGY)  # HQ's pass publishes it alive: further heartbeats wake nobody
    response = signed.post("relay-a", data, {"X-Hub-Signature-256": sign(SECRET, data)})
    assert response.status_code == 200 and signed.woken == 1


@pytest.mark.parametrize(("label", "headers"), [
    ("unsigned", {}),
    ("wrong secret", {"X-Hub-Signature-256": sign(b"other", body())}),
    ("signature of another body", {"X-Hub-Signature-256": sign(SECRET, body() + b" ")}),
    ("not a signature", {"X-Hub-Signature-256": "sha1=abc"}),
])
def test_an_unsigned_or_badly_signed_heartbeat_is_refused(signed: Hq_, label: str, headers: dict[str, str]) -> None:
    assert_error(signed.post("relay-a", body(), headers), 401, "X-Hub-Signature-256")
    assert signed.relays()["relay-a"]["lastContact"] is None, label


def test_without_a_secret_an_unsigned_heartbeat_is_accepted(open_hq: Hq_) -> None:
    assert open_hq.post("relay-b", body("relay-b")).status_code == 200
    assert open_hq.relays()["relay-b"]["liveness"] == "alive"


@pytest.mark.parametrize(("label", "relay", "data", "status", "words"), [
    ("body over the limit", "relay-a", b"{" + b" " * MAX_HEARTBEAT_BODY + b"}", 413, ("larger than",)),
    ("not JSON", "relay-a", b"{", 400, ("heartbeat",)),
    ("empty", "relay-a", b"", 400, ()),
    ("a field of the wrong type", "relay-a", body(clients={"total": 1, "online": "1", "offline": 0}), 400,
     ("clients.online",)),
    ("a field missing", "relay-a", json.dumps({"relay": "relay-a"}).encode(), 400, ("observedCommit",)),
    ("another relay's name", "relay-a", body("relay-b"), 400, ("relay", "relay-b")),
    ("a relay outside the topology", "relay-z", body("relay-z"), 404, ("relay-z", "topology")),
    ("a name no relay can have", "Relay..Z", body(), 404, ("topology",)),
])
def test_a_bad_heartbeat_gets_a_json_4xx(signed: Hq_, label: str, relay: str, data: bytes, status: int,
                                         words: tuple[str, ...]) -> None:
    assert_error(signed.post(relay, data, {"X-Hub-Signature-256": sign(SECRET, data)}), status, *words)
    assert all(r["lastContact"] is None for r in signed.relays().values()), label


def test_a_huge_body_is_refused_before_its_signature_is_checked(signed: Hq_) -> None:
    assert_error(signed.post("relay-a", b"x" * (MAX_HEARTBEAT_BODY + 1)), 413, "larger than")
    assert_error(signed.post("relay-a", b"x" * 3_000_000), 413)  # refused from its Content-Length, unread by the app


def test_methods_and_the_time_before_an_accepted_commit() -> None:
    hq = Hq_(None, topology=None)
    try:
        assert_error(hq.post("relay-a", body()), 503, "accepted")
        assert_error(requests.get(f"{hq.url}/v1/relays/relay-a/heartbeat", timeout=10), 405, "POST")
        assert_error(requests.post(f"{hq.url}/v1/relays", data=b"{}", timeout=10), 405, "GET")
        assert requests.get(f"{hq.url}/v1/relays", timeout=10).json()["relays"] == []
    finally:
        hq.server.close()


# ------------------------------------------------------------------ the relay's sender


def _state(name: str = "relay-a") -> RelayState:
    state = RelayState(name, store=None)  # type: ignore[arg-type]  # the sender reads no database
    state.generation = Generation(commit=C1)
    state.client_count, state.clients_online = 12, 9
    state.errors = ("staging artifact of app 1.0 failed",)
    return state


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_sender_posts_signed_heartbeats_hq_accepts(signed: Hq_) -> None:
    sender = HeartbeatSender(signed.url, _state(), interval=60, secret=SECRET, clock=lambda: T0)
    assert sender.send() == DELIVERED
    view = signed.relays()["relay-a"]
    assert view["clients"] == {"total": 12, "online": 9, "offline": 3}
    assert view["errors"]["first"] == ["staging artifact of app 1.0 failed"] and view["sentAt"] == "2026-11-23T10:00:00Z"


def test_the_sender_logs_a_failure_once_per_change(signed: Hq_, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.relay")
    nobody = HeartbeatSender(f"http://127.0.0.1:{closed_port()}", _state(), interval=60, secret=SECRET)
    assert [nobody.send() for _ in range(3)] == ["unreachable"] * 3
    nobody.url = nobody.url.replace(nobody.url.split("/v1/")[0], signed.url)  # HQ comes up, wrong secret
    nobody.secret = b"not the secret"
    assert [nobody.send() for _ in range(3)] == ["HTTP 401"] * 3
    nobody.secret = SECRET  # the secret fixed
    assert [nobody.send() for _ in range(3)] == [DELIVERED] * 3
    lines = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "failed (unreachable" in lines[0] and "failed (HTTP 401: bad X-Hub-Signature-256" in lines[1]
    assert "reach HQ again" in lines[2]


def test_the_sender_thread_sends_until_stopped(open_hq: Hq_) -> None:
    seen = threading.Event()
    sender = HeartbeatSender(open_hq.url, _state("relay-b"), interval=0.05)
    original = sender.send

    def send() -> str:
        outcome = original()
        if open_hq.relays()["relay-b"]["lastContact"] is not None:
            seen.set()
        return outcome

    sender.send = send  # type: ignore[method-assign]
    sender.start()
    try:
        assert seen.wait(10)
    finally:
        sender.stop()
    assert not sender._thread.is_alive()


def test_a_slow_hq_never_holds_the_sender_longer_than_its_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections, never answers
    try:
        sender = HeartbeatSender(f"http://127.0.0.1:{listener.getsockname()[1]}", _state(), interval=1.0)
        assert sender.timeout == 0.5
        assert sender.send() == "timeout"
    finally:
        listener.close()


# ------------------------------------------------------------------ HQ passes on real git


def _hq(origin: Origin, workdir: Path, clock: Clock) -> Hq:
    contacts = Contacts(workdir / "liveness.json", 300, clock(), clock)
    return Hq(GitStore(str(origin.bare), workdir), clock=clock, contacts=contacts)


def _relays(origin: Origin) -> dict[str, dict[str, Any]]:
    return {r["relay"]: r for r in origin.yaml("status/hq", "relays.yaml")["relays"]}


def _beat(hq: Hq, relay: str) -> None:
    assert hq.contacts is not None
    hq.contacts.record(make_heartbeat(relay, None, ClientCounts(0, 0, 0), [], hq.clock()))


def test_hq_publishes_only_liveness_transitions(tmp_path: Path) -> None:
    origin = Origin(tmp_path)
    clock = Clock()
    hq = _hq(origin, tmp_path / "hq", clock)
    hq.run_pass()
    relays = [r.name for r in hq._accepted_specs().topology.relays]  # type: ignore[union-attr]
    assert {r["liveness"] for r in _relays(origin).values()} == {"unknown"}
    for name in relays:
        _beat(hq, name)
    result = hq.run_pass()
    assert result.published is not None and all(f"relay {n} is alive" in result.line for n in relays)  # type: ignore[operator]
    assert {r["liveness"] for r in _relays(origin).values()} == {"alive"}
    commits = origin.count("status/hq")
    for _ in range(8):  # a healthy idle fleet: heartbeats every minute, passes in between
        clock.advance(60)
        for name in relays:
            _beat(hq, name)
        assert hq.run_pass().published is None
    assert origin.count("status/hq") == commits
    assert hq.seconds_until_liveness_change() == 300.0
    clock.advance(60)
    for name in relays[1:]:  # the first relay falls silent
        _beat(hq, name)
    hq.run_pass()
    clock.advance(239)  # 299 s after its last heartbeat: not yet
    assert hq.run_pass().published is None
    clock.advance(2)
    for name in relays[1:]:
        _beat(hq, name)
    result = hq.run_pass()
    assert result.published is not None and f"relay {relays[0]} is LOST" in (result.line or "")
    lost = _relays(origin)[relays[0]]
    assert (lost["liveness"], lost["lastContact"]) == ("lost", "2026-11-23T10:08:00Z")
    assert lost["livenessSince"] == "2026-11-23T10:13:00Z"
    summary = origin.files("status/hq")["summary.md"].decode()
    assert f"> **Relay {relays[0]} is LOST since 2026-11-23T10:13:00Z" in summary
    assert f"1 relay LOST ({relays[0]})" in git(origin.bare, "log", "-1", "--format=%B", "status/hq")
    assert hq.health()["relays"] == {"alive": len(relays) - 1, "lost": 1, "unknown": 0}

    # a restarted HQ reads the contacts back: no commit, nobody newly lost
    assert hq.contacts is not None
    hq.contacts.save()
    clock.advance(30)
    again = _hq(origin, tmp_path / "hq", clock)
    assert again.run_pass().published is None
    _beat(again, relays[0])
    result = again.run_pass()
    assert result.published is not None and _relays(origin)[relays[0]]["liveness"] == "alive"
    assert "lastContact" not in _relays(origin)[relays[0]]


def test_hq_without_a_listener_reports_no_liveness(tmp_path: Path) -> None:
    origin = Origin(tmp_path)
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    hq.run_pass()
    assert all("liveness" not in r for r in _relays(origin).values())
    assert "relays" not in hq.health() and hq.seconds_until_liveness_change() is None
    text = origin.files("status/hq")["summary.md"].decode()
    assert "LOST" not in text and report.RELAYS_FILE in origin.files("status/hq")


def test_the_service_wakes_when_a_relay_timeout_runs_out_unless_passes_fail(tmp_path: Path) -> None:
    clock = Clock()
    contacts = Contacts(None, 300, clock(), clock)
    hq = Hq(GitStore(str(tmp_path / "nowhere.git"), tmp_path / "hq"), clock=clock, contacts=contacts)
    contacts.evaluate(TOPOLOGY)
    clock.advance(250)
    assert next_wait(hq, Turn(None, None, None, 0), 30) == 30  # the next poll comes first
    clock.advance(30)
    assert next_wait(hq, Turn(None, None, None, 0), 30) == 20 + LIVENESS_MARGIN_SECONDS
    failing = Turn("pass failed", problem(Cause.UNREACHABLE, "origin down"), None, 5)
    assert next_wait(hq, failing, 30) == 30  # the backoff of failed passes rules, never a busy retry
    clock.advance(60)  # past the deadline, not yet judged (the passes fail): still no busy loop
    assert next_wait(hq, failing, 30) == 30
    assert next_wait(Hq(GitStore(str(tmp_path / "nowhere.git"), tmp_path / "hq2")), Turn(None, None, None, 0), 30) == 30


def test_status_names_a_lost_relay_and_waits_for_it_by_name(tmp_path: Path) -> None:
    origin = Origin(tmp_path)
    clock = Clock()
    hq = _hq(origin, tmp_path / "hq", clock)
    hq.run_pass()

    def busy(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
        rows = settled_rows(relay)
        if relay == "relay-yokohama":  # still installing when it died
            rows = {**rows, "install-7zip": [("pc-yoko-001", ClientState.IN_PROGRESS, "installing")]}
        return rows

    publish_all(origin, tmp_path, busy)
    for name in ("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"):
        _beat(hq, name)
    hq.run_pass()
    clock.advance(200)
    for name in ("relay-kanto", "relay-osaka", "relay-fukuoka"):
        _beat(hq, name)
    hq.run_pass()
    clock.advance(101)
    assert "relay relay-yokohama is LOST" in (hq.run_pass().line or "")

    text = status(origin, tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1] == ("RELAY relay-yokohama LOST since 2026-11-23T10:05:00Z (last contact 2026-11-23T10:00:00Z): "
                        "no heartbeat reaches HQ; jobs reaching it keep its last reported state: install-7zip, "
                        "install-putty, install-teams-meeting, install-vcredist, uninstall-legacy-toolbar")
    doc = json.loads(status(origin, tmp_path, "--format", "json").stdout)
    relays = {r["relay"]: r for r in doc["relays"]}
    assert relays["relay-yokohama"]["liveness"] == "lost"
    assert relays["relay-yokohama"]["lastContact"] == "2026-11-23T10:00:00Z"
    assert (relays["relay-kanto"]["liveness"], relays["relay-kanto"]["lastContact"]) == ("alive", None)
    assert relays["relay-kanto"]["clients"] == {"total": 2, "online": 2, "offline": 0, "movedAway": 0, "retired": 0}
    # the lost relay's InProgress row keeps the wait from settling, and the timeout names the relay as lost
    waited = status(origin, tmp_path, "--wait", "--timeout", "1")
    assert waited.returncode == 4, waited.stderr
    assert ("job install-7zip: 1 client Pending or InProgress on relay-yokohama (pc-yoko-001); relay relay-yokohama "
            "is LOST since") in waited.stderr
    markdown = status(origin, tmp_path, "--format", "markdown").stdout
    assert "> **Relay relay-yokohama is LOST since 2026-11-23T10:05:00Z" in markdown
