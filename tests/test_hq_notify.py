"""HQ's notifications end to end: real HQ passes over a real git origin, a real HTTP receiver on 127.0.0.1.

Time is HQ's injected clock; delivery is driven with ``Notifier.deliver_due``
(what the worker threads call) or, for the threads themselves, polled with a
deadline. Nothing sleeps and hopes.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_hq import FAIL, OK, RUN, Origin, break_job, publish_relay, run_cli

from reconciler.gitstore import GitStore
from reconciler.hq import Hq
from reconciler.hq_liveness import Contacts
from reconciler.hq_notify import STATE_FILE, Notifier
from reconciler.liveness import ClientCounts, Heartbeat
from reconciler.repo_tree import load_repo
from reconciler.specs import SpecError
from reconciler.webhook import sign

SECRET = b"notify-key-7c1e"
T0 = datetime(2027, 3, 1, 9, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Receiver:
    """An HTTP server recording each POST; answers with the queued statuses, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.hold = threading.Event()
        self.hold.set()  # clear() to make the receiver hang until set() again
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.hold.wait(30)
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verified(headers: dict[str, str], body: bytes, secret: bytes = SECRET) -> bool:
    """The receiver's check, as the README shows it: HMAC-SHA256 over ``<timestamp>.<body>``."""
    timestamp = headers["x-reconciler-timestamp"]
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, "sha256").hexdigest()
    return hmac.compare_digest(expected, headers["x-reconciler-signature"]) and \
        headers["x-reconciler-signature"] == sign(secret, body, int(timestamp))


def with_notification(url: str, *, name: str = "ops", extra: str = "") -> Any:
    def edit(work: Path) -> None:
        path = work / "topology.yaml"
        path.write_text(path.read_text() + f"  notifications:\n    - name: {name}\n      url: {url}\n"
                        f"      secretFile: {name}.key\n{extra}")
    return edit


class Setup:
    def __init__(self, tmp_path: Path, origin: Origin) -> None:
        self.origin = origin
        self.clock = Clock()
        self.secrets = tmp_path / "secrets"
        self.secrets.mkdir(exist_ok=True)
        (self.secrets / "ops.key").write_bytes(SECRET + b"\n")
        self.workdir = tmp_path / "hq"
        self.relays = tmp_path / "relays"

    def hq(self) -> Hq:
        """A fresh HQ process over the same workdir (a restart)."""
        hq = Hq(GitStore(str(self.origin.bare), self.workdir), clock=self.clock)
        hq.notifier = Notifier(self.workdir, self.secrets, self.clock, timeout=10)
        return hq

    def putty(self, state: Any) -> None:
        publish_relay(self.origin, self.relays, "relay-yokohama", self.origin.head,
                      {"install-putty": [("pc-yoko-001", state, "exit 3" if state is FAIL else "")]})


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


@pytest.fixture
def setup(tmp_path: Path, origin: Origin) -> Setup:
    return Setup(tmp_path, origin)


def deliver(hq: Hq) -> int:
    assert hq.notifier is not None
    return hq.notifier.deliver_due()


# ------------------------------------------------------------- jobs


def test_a_job_failing_sends_one_signed_event_per_transition(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      jobs: [install-putty]\n"))
    hq = setup.hq()
    hq.run_pass()  # the baseline: install-putty InProgress, nothing sent
    assert deliver(hq) == 0 and receiver.requests == []
    assert (setup.workdir / STATE_FILE).exists()

    setup.putty(FAIL)
    hq.run_pass()
    assert deliver(hq) == 1
    hq.run_pass()  # nothing moved: nothing more
    setup.clock.advance(3600)
    assert deliver(hq) == 0
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert verified(headers, body)
    assert not verified(headers, body, b"another key")
    event = json.loads(body)
    assert event["kind"] == "jobFailed" and headers["x-reconciler-event"] == "jobFailed"
    # InProgress only because relay-yokohama had not reported the commit: not an observation
    assert event["job"] == "install-putty" and event["state"] == "Failed" and event["previousState"] is None
    assert event["counts"]["Failed"] == 1 and event["failures"] == 1
    assert event["notification"] == "ops" and event["acceptedCommit"] == setup.origin.head
    assert event["id"] == headers["x-reconciler-delivery"] and len(event["id"]) == 32
    assert event["time"] == "2027-03-01T09:00:00Z"
    assert int(headers["x-reconciler-timestamp"]) == int(T0.timestamp())

    # back and forth: rerun (InProgress), Failed again, then Completed: each announced once, each its own id
    setup.putty(RUN)
    hq.run_pass()
    setup.putty(FAIL)
    hq.run_pass()
    setup.putty(OK)
    hq.run_pass()
    assert deliver(hq) == 2
    kinds = [(e["kind"], e["previousState"]) for e in receiver.events()]
    assert kinds == [("jobFailed", None), ("jobFailed", "InProgress"), ("jobCompleted", "Failed")]
    assert len({e["id"] for e in receiver.events()}) == 3
    assert all(verified(h, b) for h, b in receiver.requests)

    # a new accepted commit: InProgress until relay-yokohama reports it, then Completed again: nothing to say
    setup.origin.commit("an unrelated change")
    hq.run_pass()
    assert hq.accepted_commit == setup.origin.head
    setup.putty(OK)
    hq.run_pass()
    assert deliver(hq) == 0 and len(receiver.requests) == 3


def test_a_receiver_answering_500_gets_the_event_again_with_backoff_and_once(setup: Setup,
                                                                          receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      events: [jobFailed]\n"))
    hq = setup.hq()
    hq.run_pass()
    setup.putty(FAIL)
    receiver.statuses = [500, 503]
    hq.run_pass()
    assert hq.notifier is not None
    assert deliver(hq) == 0  # 500
    assert deliver(hq) == 0  # not due yet: nothing sent
    assert len(receiver.requests) == 1
    assert hq.notifier.seconds_until_due() == pytest.approx(1.0)
    setup.clock.advance(1)
    assert deliver(hq) == 0  # 503; the next wait doubles
    assert hq.notifier.seconds_until_due() == pytest.approx(2.0)
    setup.clock.advance(1)
    assert deliver(hq) == 0 and len(receiver.requests) == 2
    setup.clock.advance(1)
    assert deliver(hq) == 1
    setup.clock.advance(600)
    assert deliver(hq) == 0
    assert len(receiver.requests) == 3
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1  # the same event each time, same id: the receiver can dedup
    assert all(verified(h, b) for h, b in receiver.requests)
    assert hq.notifier.pending() == []


def test_a_restarted_hq_does_not_resend_and_delivers_what_was_queued(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      jobs: [install-putty]\n"))
    hq = setup.hq()
    hq.run_pass()
    setup.putty(FAIL)
    hq.run_pass()
    assert deliver(hq) == 1

    restarted = setup.hq()
    restarted.run_pass()
    assert deliver(restarted) == 0
    assert len(receiver.requests) == 1

    # queued, then HQ stops before delivering: the next HQ delivers it, once
    setup.putty(OK)
    restarted.run_pass()
    again = setup.hq()
    again.run_pass()
    assert deliver(again) == 1
    assert [e["kind"] for e in receiver.events()] == ["jobFailed", "jobCompleted"]


def test_a_crash_between_send_and_record_resends_that_event_once_with_the_same_id(setup: Setup,
                                                                                receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      jobs: [install-putty]\n"))
    hq = setup.hq()
    hq.run_pass()
    setup.putty(FAIL)
    hq.run_pass()
    before_send = (setup.workdir / STATE_FILE).read_bytes()
    assert deliver(hq) == 1
    (setup.workdir / STATE_FILE).write_bytes(before_send)  # as if HQ died before recording the delivery
    restarted = setup.hq()
    restarted.run_pass()
    assert deliver(restarted) == 1
    assert deliver(setup.hq()) == 0
    first, second = receiver.events()
    assert first == second  # the same event, the same id: the receiver dedups


def test_an_unreadable_state_file_starts_a_new_baseline(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url))
    setup.workdir.mkdir()
    (setup.workdir / STATE_FILE).write_text('{"queue": [{"nonsense": 1}]}')
    hq = setup.hq()
    hq.run_pass()
    assert deliver(hq) == 0 and receiver.requests == []
    setup.putty(FAIL)
    hq.run_pass()
    assert deliver(hq) == 1


def test_without_a_state_file_the_first_pass_is_a_baseline(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url))
    setup.putty(FAIL)  # already Failed when notifications are turned on
    hq = setup.hq()
    hq.run_pass()
    assert deliver(hq) == 0 and receiver.requests == []


# ------------------------------------------------------------- commits and relays


def test_a_rejected_commit_sends_one_commit_rejected(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      events: [commitRejected]\n"))
    good = setup.origin.head
    hq = setup.hq()
    hq.run_pass()
    bad = setup.origin.commit("break a job", break_job)
    hq.run_pass()
    hq.run_pass()
    setup.hq().run_pass()  # a restart reads the rejection back from status/hq: not announced again
    assert deliver(hq) == 1
    [event] = receiver.events()
    assert event["kind"] == "commitRejected" and event["commit"] == bad and event["acceptedCommit"] == good
    assert event["counts"]["errors"] == len(event["errors"]) >= 1
    assert any("jobs/" in e for e in event["errors"])
    assert verified(*receiver.requests[0])


def test_a_lost_relay_sends_relay_lost_once_and_again_after_it_came_back(setup: Setup, receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(
        receiver.url, extra="      events: [relayLost]\n      relays: [relay-osaka]\n"))
    hq = setup.hq()
    contacts = Contacts(None, 300, setup.clock(), setup.clock)
    hq.contacts = contacts

    def beat() -> None:
        contacts.record(Heartbeat("relay-osaka", None, ClientCounts(2, 2, 0), 0, (), setup.clock()))

    beat()
    hq.run_pass()
    setup.clock.advance(301)  # every relay is lost now; only relay-osaka is wanted
    hq.run_pass()
    hq.run_pass()
    beat()
    hq.run_pass()
    setup.clock.advance(301)
    hq.run_pass()
    assert deliver(hq) == 2
    events = receiver.events()
    assert [(e["kind"], e["relay"]) for e in events] == [("relayLost", "relay-osaka")] * 2
    assert events[0]["previousState"] == "alive" and events[0]["lastContact"] == "2027-03-01T09:00:00Z"
    assert events[0]["id"] != events[1]["id"]


# ------------------------------------------------------------- never blocking


def test_a_hanging_receiver_delays_only_its_own_events(setup: Setup, receiver: Receiver) -> None:
    other = Receiver()
    try:
        (setup.secrets / "chat.key").write_bytes(b"chat-key\n")
        setup.origin.commit("notify both", with_notification(receiver.url, extra=(
            f"    - name: chat\n      url: {other.url}\n      secretFile: chat.key\n      events: [jobFailed]\n")))
        hq = Hq(GitStore(str(setup.origin.bare), setup.workdir))  # real time: the worker threads wait on it
        notifier = hq.notifier = Notifier(setup.workdir, setup.secrets, hq.clock, timeout=30)
        notifier.start()
        hq.run_pass()
        receiver.hold.clear()  # "ops" hangs
        setup.putty(FAIL)
        started = time.monotonic()
        hq.run_pass()
        assert time.monotonic() - started < 10  # the pass never waits on a receiver
        deadline = time.monotonic() + 30
        while not other.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["kind"] for e in other.events()] == ["jobFailed"]
        assert verified(*other.requests[0], secret=b"chat-key")
        assert receiver.requests == [] and [p.notification for p in notifier.pending()] == ["ops"]
        receiver.hold.set()
        deadline = time.monotonic() + 30
        while notifier.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notifier.pending() == [] and [e["kind"] for e in receiver.events()] == ["jobFailed"]
        notifier.stop()
    finally:
        other.close()


def test_a_notifier_that_cannot_write_its_file_never_breaks_the_pass(setup: Setup, receiver: Receiver,
                                                                      tmp_path: Path) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    hq = Hq(GitStore(str(setup.origin.bare), setup.workdir), clock=setup.clock)
    hq.notifier = Notifier(blocker / "hq", setup.secrets, setup.clock)  # its state file cannot be written
    result = hq.run_pass()
    assert result.published is not None and result.error is None
    setup.putty(FAIL)
    assert hq.run_pass().published is not None
    assert setup.origin.yaml("status/hq", "jobs/install-putty.yaml")["state"] == "Failed"
    assert hq.notifier.deliver_due() == 0 and receiver.requests == []


def test_hq_once_with_the_flag_notifies_and_a_missing_directory_is_refused(setup: Setup,
                                                                              receiver: Receiver) -> None:
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      events: [jobFailed]\n"))
    args = ("hq", "--origin", str(setup.origin.bare), "--workdir", str(setup.workdir), "--once",
            "--notification-secrets-dir")
    first = run_cli(*args, str(setup.secrets))
    assert first.returncode == 0, first.stderr
    setup.putty(FAIL)
    second = run_cli(*args, str(setup.secrets))
    assert second.returncode == 0, second.stderr
    assert "notification ops: delivered jobFailed" in second.stderr
    third = run_cli(*args, str(setup.secrets))
    assert third.returncode == 0, third.stderr
    assert [e["kind"] for e in receiver.events()] == ["jobFailed"] and verified(*receiver.requests[0])
    missing = run_cli(*args, str(setup.secrets / "nope"))
    assert missing.returncode == 2 and "--notification-secrets-dir" in missing.stderr


# ------------------------------------------------------------- the spec


def _errors(origin: Origin, text: str) -> list[SpecError]:
    path = origin.work / "topology.yaml"
    path.write_text(path.read_text() + text)
    return list(load_repo(origin.work).errors)


@pytest.mark.parametrize(("text", "line", "pointer", "words"), [
    ("  notifications:\n    - name: ops\n      url: ftp://x.example/hook\n      secretFile: ops.key\n",
     25, "/spec/notifications/0/url", "does not match"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: ../etc/key\n",
     26, "/spec/notifications/0/secretFile", "does not match"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: k\n"
     "      secret: hunter2\n", 27, "/spec/notifications/0/secret", "unknown field 'secret'"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: k\n"
     "      events: [jobDone]\n", 27, "/spec/notifications/0/events/0", "jobDone"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: k\n"
     "    - name: ops\n      url: https://y.example/hook\n      secretFile: k\n",
     27, "/spec/notifications/1/name", "duplicate notification name 'ops'"),
    ("  notifications:\n    - name: ops\n      url: https://user:pw@x.example/hook\n      secretFile: k\n",
     25, "/spec/notifications/0/url", "credentials"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: k\n"
     "      relays: [relay-kanto, relay-nara]\n", 27, "/spec/notifications/0/relays/1", "'relay-nara' is not a relay"),
    ("  notifications:\n    - name: ops\n      url: https://x.example/hook\n      secretFile: k\n"
     "      jobs: [install-7zip, install-nothing]\n", 27, "/spec/notifications/0/jobs/1",
     "no job named 'install-nothing'"),
])
def test_invalid_notifications_are_errors_at_file_line_and_field(origin: Origin, text: str, line: int,
                                                                  pointer: str, words: str) -> None:
    errors = _errors(origin, text)
    assert [(e.path, e.line, e.pointer) for e in errors] == [("topology.yaml", line, pointer)], errors
    assert words in errors[0].message and pointer in str(errors[0])


def test_a_valid_notification_loads_with_its_filters(origin: Origin) -> None:
    result = load_repo(origin.work)
    assert result.specs is not None and result.specs.topology.notifications == ()
    with_notification("https://hooks.example/r", extra="      events: [jobFailed]\n      jobs: [install-7zip]\n")(
        origin.work)
    result = load_repo(origin.work)
    assert result.errors == () and result.specs is not None
    [n] = result.specs.topology.notifications
    assert (n.name, n.url, n.secret_file, n.events, n.jobs, n.relays) == (
        "ops", "https://hooks.example/r", "ops.key", ("jobFailed",), ("install-7zip",), ())
    assert n.wants("jobFailed", job="install-7zip") and not n.wants("jobFailed", job="install-putty")
    assert not n.wants("jobCompleted", job="install-7zip")
