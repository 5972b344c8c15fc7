"""End to end: relays' heartbeats to a real HQ, a killed relay published as lost, and its recovery.

A bare origin, ``reconciler hq --listen`` and two ``reconciler relay --hq-url``
processes on 127.0.0.1, with short intervals (heartbeats every 0.5 s, a relay
lost after 3 s of silence, HQ polling every second). Every wait is on a
condition with a deadline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import HqProcess, Origin, RelayProcess, git, reconciler, wait_for
from test_e2e_relay import job, package, topology

from reconciler.times import parse_time

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="kill -9 of a relay process"),
]

RELAY_TIMEOUT = 3.0
HEARTBEAT = 0.5
SPECS = {
    "topology.yaml": topology(("relay-east", "hq-x"), ("relay-west", "hq-x")),
    "packages/tool-1.0.yaml": package("tool", "1.0", "{path: artifacts/tool}"),
    "artifacts/tool/tool.txt": "tool\n",
    "jobs/install-tool.yaml": job("install-tool", "tool", "1.0", "relay-east, relay-west"),
}


class Fleet:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.commit = self.origin.commit(SPECS)
        self.hq = HqProcess(self.origin.url, base / "hq", "--poll-interval", "1", "--publish-interval", "1",
                            "--relay-timeout", str(RELAY_TIMEOUT), *self.origin.hq_trust_args()).start()
        wait_for(lambda: self.accepted() == self.commit, 60, what="HQ to accept the specs")
        self.relays = {name: RelayProcess(name, self.origin.url, base / name, extra_args=[
            "--hq-url", self.hq.url, "--heartbeat-interval", str(HEARTBEAT)]) for name in ("relay-east", "relay-west")}
        for relay in self.relays.values():
            relay.start()

    def accepted(self) -> str | None:
        data = self.origin.read("status/hq", "accepted.yaml")
        return None if data is None else yaml.safe_load(data)["acceptedCommit"]

    def published(self) -> dict[str, dict[str, Any]]:
        """relays.yaml on status/hq, by relay name."""
        data = self.origin.read("status/hq", "relays.yaml")
        return {} if data is None else {r["relay"]: r for r in yaml.safe_load(data)["relays"]}

    def commits(self, ref: str) -> int:
        return int(git(self.origin.path, "rev-list", "--count", ref))

    def status(self, *args: str, timeout: float = 120) -> Any:
        return reconciler("status", "--origin", self.origin.url, *args, check=False, timeout=timeout,
                          extra_env={"XDG_CACHE_HOME": str(self.base / "cache")})

    def stop(self) -> None:
        for relay in self.relays.values():
            if relay.proc is not None and relay.proc.poll() is None:
                relay.proc.kill()
                relay.proc.wait(timeout=10)
        self.hq.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.stop()


def _state(fleet: Fleet, relay: str, liveness: str, current: bool | None = None) -> dict[str, Any] | None:
    entry = fleet.published().get(relay)
    if entry is None or entry.get("liveness") != liveness:
        return None
    if current is not None and entry["current"] is not current:
        return None
    return entry


def test_a_killed_relay_is_published_lost_and_alive_again_after_a_restart(fleet: Fleet) -> None:
    for name in fleet.relays:
        wait_for(lambda name=name: _state(fleet, name, "alive", current=True), 60, what=f"{name} alive and current")
    hq_alive = fleet.hq.relays()
    assert hq_alive["relay-east"]["observedCommit"] == fleet.commit
    assert hq_alive["relay-east"]["clients"] == {"total": 0, "online": 0, "offline": 0}

    # A healthy idle fleet: several heartbeats of each relay reach HQ, and nobody commits.
    commits = {ref: fleet.commits(ref) for ref in ("status/hq", "status/relay-east", "status/relay-west")}
    contacts = {name: parse_time(r["lastContact"]) for name, r in fleet.hq.relays().items()}

    def heard_again() -> bool:
        now = fleet.hq.relays()
        return all(parse_time(now[n]["lastContact"]) >= contacts[n] + timedelta(seconds=3) for n in contacts)

    wait_for(heard_again, 30, what="3 s more of heartbeats from both relays")
    assert {ref: fleet.commits(ref) for ref in commits} == commits

    # kill -9: HQ publishes the relay lost within about --relay-timeout.
    killed_at = time.monotonic()
    fleet.relays["relay-west"].kill9()
    lost = wait_for(lambda: _state(fleet, "relay-west", "lost"), 30, what="relay-west published lost")
    assert time.monotonic() - killed_at < RELAY_TIMEOUT + 10
    assert lost["lastContact"] is not None and lost["livenessSince"] is not None
    assert _state(fleet, "relay-east", "alive") is not None
    summary = fleet.origin.read("status/hq", "summary.md")
    assert summary is not None and b"> **Relay relay-west is LOST since" in summary
    assert fleet.hq.relays()["relay-west"]["liveness"] == "lost"

    text = fleet.status()
    assert text.returncode == 0, text.stderr
    head = text.stdout.splitlines()[:4]
    assert any(line.startswith("RELAY relay-west LOST since") and "install-tool" in line for line in head), head
    doc = json.loads(fleet.status("--format", "json").stdout)
    by_name = {r["relay"]: r for r in doc["relays"]}
    assert (by_name["relay-west"]["liveness"], by_name["relay-east"]["liveness"]) == ("lost", "alive")
    assert by_name["relay-west"]["lastContact"] == lost["lastContact"]

    # A commit the lost relay never saw: --wait times out (exit 4) naming the relay as lost.
    newer = fleet.origin.commit({"README.md": "a change\n"}, "change while relay-west is down")
    wait_for(lambda: fleet.accepted() == newer, 30, what="HQ to accept the new commit")
    wait_for(lambda: _state(fleet, "relay-east", "alive", current=True), 30, what="relay-east at the new commit")
    waited = fleet.status("--wait", "--timeout", "3")
    assert waited.returncode == 4, (waited.returncode, waited.stderr)
    assert "relay relay-west is LOST since" in waited.stderr and "has not published status" in waited.stderr

    # Restarted, it calls HQ again and is published alive; the wait then settles.
    fleet.relays["relay-west"].start()
    wait_for(lambda: _state(fleet, "relay-west", "alive", current=True), 60, what="relay-west alive again")
    assert "lastContact" not in fleet.published()["relay-west"]
    settled = fleet.status("--wait", "--timeout", "60")
    assert settled.returncode == 0, settled.stderr
    assert "LOST" not in settled.stdout
    assert fleet.hq.stop() == 0
    saved = json.loads((fleet.base / "hq" / "liveness.json").read_text())
    assert {name: r["liveness"] for name, r in saved["relays"].items()} == {"relay-east": "alive",
                                                                           "relay-west": "alive"}
