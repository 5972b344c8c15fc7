"""HQ's --publish-interval: report-only changes of status/hq wait their turn, acceptance never does.

Real git (a bare origin, relay refs published with GitStore); HQ's clock is
injected and passes are driven one at a time, so nothing sleeps.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_hq import OK, Origin, break_job, fix_job, publish_relay, run_cli
from test_hq_notify import FAIL, Receiver, Setup, deliver, receiver, with_notification  # noqa: F401 - receiver: the fixture

from reconciler.gitstore import GitStore
from reconciler.hq import PUBLISH_MARGIN_SECONDS, Hq, Turn, next_wait


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def reported(origin: Origin) -> set[str]:
    return {r["relay"] for r in origin.yaml("status/hq", "relays.yaml")["relays"] if r["reported"]}


def test_report_changes_wait_for_the_interval_and_a_new_commit_goes_at_once(origin: Origin, tmp_path: Path) -> None:
    clock = Clock()
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"), clock=clock, publish_interval=60)
    first = hq.run_pass()
    assert first.published is not None and origin.ref("status/hq") == first.published  # the first push: at once
    relays = tmp_path / "relays"

    publish_relay(origin, relays, "relay-osaka", origin.head, {"install-teams-meeting": [("pc-1", OK, "")]})
    clock.advance(10)
    held = hq.run_pass()
    assert held.published is None and held.relays_read == 1
    assert held.line is not None and "held 50s more" in held.line
    assert origin.ref("status/hq") == first.published and reported(origin) == set()
    assert hq.seconds_until_publish() == 50

    publish_relay(origin, relays, "relay-kanto", origin.head, {"install-7zip": [("pc-2", OK, "")]})
    clock.advance(20)
    assert hq.run_pass().published is None and hq.seconds_until_publish() == 30

    # a new main commit is accepted and pushed at once, with the report held so far
    origin.commit("readme", lambda work: (work / "README.md").write_text("changed\n"))
    clock.advance(5)
    accepted = hq.run_pass()
    assert accepted.published is not None and origin.ref("status/hq") == accepted.published
    assert origin.yaml("status/hq", "accepted.yaml")["acceptedCommit"] == origin.head
    assert reported(origin) == {"relay-osaka", "relay-kanto"}
    assert hq.seconds_until_publish() is None

    # the next report change waits a full interval after that push, then goes
    publish_relay(origin, relays, "relay-yokohama", origin.head, {"install-7zip": [("pc-3", OK, "")]})
    clock.advance(1)
    assert hq.run_pass().published is None and hq.seconds_until_publish() == 59
    clock.advance(58)
    assert hq.run_pass().published is None  # a pass with no new input: the held change is still not due
    clock.advance(1)
    due = hq.run_pass()
    assert due.published is not None and "relay-yokohama" in reported(origin)
    assert hq.seconds_until_publish() is None

    # nothing changed: no push, nothing held, no log line
    clock.advance(600)
    idle = hq.run_pass()
    assert idle.published is None and idle.line is None and hq.seconds_until_publish() is None
    assert origin.ref("status/hq") == due.published


def test_a_rejected_commit_is_published_at_once(origin: Origin, tmp_path: Path) -> None:
    clock = Clock()
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"), clock=clock, publish_interval=3600)
    accepted = origin.head
    assert hq.run_pass().published is not None
    origin.commit("broken", break_job)
    clock.advance(1)
    rejected = hq.run_pass()
    assert rejected.published is not None
    shown = origin.yaml("status/hq", "accepted.yaml")
    assert shown["mainValid"] is False and shown["acceptedCommit"] == accepted
    assert origin.yaml("status/hq", "validation.yaml")["errors"]
    origin.commit("fixed", fix_job)
    clock.advance(1)
    assert hq.run_pass().published is not None
    assert origin.yaml("status/hq", "accepted.yaml")["acceptedCommit"] == origin.head


def test_the_service_wakes_when_a_held_change_is_due(origin: Origin, tmp_path: Path) -> None:
    clock = Clock()
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"), clock=clock, publish_interval=60)
    hq.run_pass()
    ok = Turn(None, None, None, 0)
    assert next_wait(hq, ok, 30) == 30  # nothing held: the poll interval
    publish_relay(origin, tmp_path / "relays", "relay-osaka", origin.head, {"install-teams-meeting": [("pc-1", OK, "")]})
    clock.advance(45)
    hq.run_pass()
    assert next_wait(hq, ok, 30) == pytest.approx(15 + PUBLISH_MARGIN_SECONDS)


def test_without_an_interval_every_change_is_pushed(origin: Origin, tmp_path: Path) -> None:
    clock = Clock()
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"), clock=clock)  # publish_interval 0: the library default
    hq.run_pass()
    publish_relay(origin, tmp_path / "relays", "relay-osaka", origin.head, {"install-teams-meeting": [("pc-1", OK, "")]})
    assert hq.run_pass().published is not None and reported(origin) == {"relay-osaka"}


def test_the_flag_refuses_what_is_not_a_positive_number_of_seconds(tmp_path: Path) -> None:
    for bad in ("0", "-5", "soon", "inf"):
        proc = run_cli("hq", "--origin", str(tmp_path / "none.git"), "--workdir", str(tmp_path / "hq"), "--once",
                       "--publish-interval", bad)
        assert proc.returncode == 2 and "--publish-interval" in proc.stderr and "Traceback" not in proc.stderr


def test_a_held_report_notifies_when_it_is_pushed(tmp_path: Path, receiver: Receiver) -> None:
    """A transition is announced once status/hq says it: a job failing while the report is held waits with it."""
    setup = Setup(tmp_path, Origin(tmp_path))
    setup.origin.commit("notify ops", with_notification(receiver.url, extra="      jobs: [install-putty]\n"))
    hq = setup.hq()
    hq.publish_interval = 60
    hq.run_pass()  # the baseline, pushed at once
    setup.putty(FAIL)
    setup.clock.advance(10)
    held = hq.run_pass()
    assert held.published is None and deliver(hq) == 0 and receiver.requests == []
    setup.clock.advance(50)
    assert hq.run_pass().published is not None
    assert deliver(hq) == 1 and [e["kind"] for e in receiver.events()] == ["jobFailed"]
