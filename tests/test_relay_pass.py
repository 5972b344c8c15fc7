"""The relay's full pass in process: per-client detail at its own cadence, timers, changed-only rendering.

A real origin (``reconciler hq --once`` accepts it), a real SQLite store, git
mirror and artifact cache; the loop's monotonic and wall clocks are injected,
so cadences are driven step by step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from e2e_helpers import Origin

from reconciler.gitstore import Blob, GitStore
from reconciler.plan import Installed
from reconciler.relay.artifacts import ArtifactCache
from reconciler.relay.loop import PUBLISHING, RelayLoop
from reconciler.relay.pass_process import PassProcess, PassSettings
from reconciler.relay.state import RelayState
from reconciler.relay.store import Store
from reconciler.times import format_time

RELAY = "relay-a"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)

TOPOLOGY = f"""\
apiVersion: reconciler/v1
kind: Topology
metadata: {{name: t}}
spec:
  headquarters: hq
  relays:
    - {{name: {RELAY}, parent: hq}}
"""


def package(name: str) -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: {name}-1.0}}
spec:
  name: {name}
  version: "1.0"
  artifact: {{path: artifacts/{name}}}
  installer: {{type: files}}
"""


def job(name: str, pkg: str, extra: str = "") -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Job
metadata: {{name: {name}}}
spec:
  jobType: install
  package: {{name: {pkg}, version: "1.0"}}
  destinationType: allLowerClients
  destinations: [{RELAY}]
{extra}"""


def specs(*names: str, extra: str = "") -> dict[str, str | bytes | None]:
    files: dict[str, str | bytes | None] = {"topology.yaml": TOPOLOGY}
    for name in names:
        files[f"packages/{name}.yaml"] = package(name)
        files[f"artifacts/{name}/file.txt"] = f"{name}\n"
        files[f"jobs/install-{name}.yaml"] = job(f"install-{name}", name, extra)
    return files


@dataclass
class Relay:
    origin: Origin
    hq: Path
    store: Store
    loop: RelayLoop
    clock: list[datetime]
    ticks: list[float]

    def report(self, client: str, installed: tuple[str, ...], free_disk_mb: int = 50_000) -> None:
        with self.store.write() as db:
            if self.store.client(client, db) is None:
                self.store.register(db, client, self.clock[0])
            self.store.record_report(db, client, {"os": "linux", "hostname": client, "freeDiskMB": free_disk_mb},
                                     {}, [Installed(name, "1.0") for name in installed], self.clock[0])

    def run(self) -> dict[str, bytes]:
        """A pass and a publish; the files the pass produced."""
        self.loop.sync()
        self.loop.last_files = self.loop.full_pass()
        self.loop.publish(force=True)
        return self.loop.last_files

    def later(self, seconds: float) -> None:
        self.clock[0] += timedelta(seconds=seconds)
        self.ticks[0] += seconds


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    origin = Origin(tmp_path)
    origin.commit(specs("app"))
    hq = tmp_path / "hq"
    origin.accept(hq)
    workdir = tmp_path / "relay"
    workdir.mkdir()
    store = Store(workdir)
    clock, ticks = [T0], [1000.0]
    state = RelayState(RELAY, store, poll_seconds=30.0)
    git = GitStore(origin.url, workdir)
    loop = RelayLoop(RELAY, git, store, ArtifactCache(workdir, git), state, publish_interval=0.0,
                     inventory_interval=900.0, clock=lambda: clock[0], monotonic=lambda: ticks[0])
    try:
        yield Relay(origin, hq, store, loop, clock, ticks)
    finally:
        store.close()


def inventory(files: dict[str, bytes]) -> dict[str, dict[str, object]]:
    doc = json.loads(files[f"relays/{RELAY}/inventory.json"])
    return {c["id"]: c for c in doc["clients"]}


def relay_doc(files: dict[str, bytes]) -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load(files[f"relays/{RELAY}/relay.yaml"])
    return loaded


def rows(files: dict[str, bytes], job_name: str) -> dict[str, dict[str, object]]:
    doc = yaml.safe_load(files[f"relays/{RELAY}/jobs/{job_name}.yaml"])
    return {r["client"]: r for r in doc["rows"]}


def test_per_client_detail_waits_for_its_interval_while_rows_do_not(relay: Relay) -> None:
    relay.report("pc-1", ("app",))
    relay.report("pc-2", ("app",))
    first = relay.run()
    assert inventory(first)["pc-1"]["facts"]["freeDiskMB"] == 48 * 1024  # type: ignore[index]
    assert relay_doc(first)["clientsOnline"] == 2

    # A minute later: pc-1's disk filled up (a fact), pc-2 lost the package (its row changes), pc-1 stays.
    relay.later(60)
    relay.report("pc-1", ("app",), free_disk_mb=5_000)
    relay.report("pc-2", ())
    second = relay.run()
    assert rows(second, "install-app")["pc-2"]["state"] == "Pending"  # the row at once
    assert second[f"relays/{RELAY}/inventory.json"] == first[f"relays/{RELAY}/inventory.json"]  # detail held
    assert inventory(second)["pc-2"]["installed"] != []  # still as last refreshed

    # Ten minutes on, pc-2 went quiet: offline now, but nothing a row shows changed for pc-1.
    relay.later(600)
    relay.report("pc-1", ("app",), free_disk_mb=5_000)
    third = relay.run()
    assert relay_doc(third)["clientsOnline"] == 2  # the counts are part of the held detail
    assert rows(third, "install-app")["pc-2"]["reason"] == "clientOffline"  # its waiting row says it at once

    # Past the interval: the detail is refreshed.
    relay.later(300)
    relay.report("pc-1", ("app",), free_disk_mb=5_000)
    fourth = relay.run()
    assert inventory(fourth)["pc-1"]["facts"]["freeDiskMB"] == 4 * 1024  # type: ignore[index]
    assert inventory(fourth)["pc-2"]["installed"] == []
    assert inventory(fourth)["pc-2"]["online"] is False
    assert relay_doc(fourth)["clientsOnline"] == 1 and relay_doc(fourth)["clientsOffline"] == 1
    assert relay.loop.detail_due_in() == pytest.approx(900.0)


def test_a_new_client_refreshes_the_detail_at_once(relay: Relay) -> None:
    relay.report("pc-1", ("app",))
    relay.run()
    relay.later(30)
    relay.report("pc-2", ("app",))
    files = relay.run()
    assert set(inventory(files)) == {"pc-1", "pc-2"}
    assert relay_doc(files)["clients"] == 2 and relay_doc(files)["clientsOnline"] == 2


def test_an_idle_relay_has_no_timer_but_retirement_and_waiting_rows_set_one(relay: Relay) -> None:
    relay.report("pc-1", ("app",))
    relay.run()
    assert not relay.loop.ticking
    # settled rows: only the retirement of the quietest client is ahead (30 days by default)
    assert relay.loop.timer_at == pytest.approx(relay.ticks[0] + 30 * 86400 + 1, abs=1)

    relay.report("pc-2", ())  # a client that still needs the package: a waiting row (queued)
    relay.run()
    window = relay.loop.state.online_window().total_seconds()
    assert relay.loop.timer_at == pytest.approx(relay.ticks[0] + window + 1, abs=1)  # when pc-2 would go offline


def test_a_scheduled_job_sets_the_timer_to_its_start(relay: Relay) -> None:
    start = T0 + timedelta(hours=2)
    relay.origin.commit({**specs("app"), **{
        "packages/later.yaml": package("later"), "artifacts/later/file.txt": "later\n",
        "jobs/install-later.yaml": job("install-later", "later",
                                       f"  schedule: {{notBefore: \"{format_time(start)}\"}}\n")}})
    relay.origin.accept(relay.hq)
    relay.report("pc-1", ("app", "later"))  # nothing waits: only the schedule's start is ahead
    relay.run()
    assert relay.loop.timer_at == pytest.approx(relay.ticks[0] + 2 * 3600 + 1, abs=1)


def test_a_new_commit_renders_only_the_new_jobs_rows(relay: Relay) -> None:
    for n in range(3):
        relay.report(f"pc-{n}", ("app",))
    first = relay.run()
    cached = dict(relay.loop.passes._job_cache)
    relay.origin.commit(specs("app", "tool"))
    relay.origin.accept(relay.hq)
    second = relay.run()
    assert relay.loop.passes._job_cache["install-app"].part is cached["install-app"].part  # reused, not rendered again
    assert set(rows(second, "install-tool")) == {"pc-0", "pc-1", "pc-2"}
    # the unchanged job's file is the same object, so git is not handed it again; relay.yaml names the commit
    path = f"relays/{RELAY}/jobs/install-app.yaml"
    assert second[path] is first[path]
    assert relay.loop.git._blobs[path][0] is first[path]
    assert yaml.safe_load(second[f"relays/{RELAY}/relay.yaml"])["observedCommit"] == relay.loop.state.generation.commit
    tip = relay.origin.ref(f"status/{RELAY}")
    assert tip is not None and relay.origin.read(f"status/{RELAY}", path) == first[path]


def test_an_unchanged_file_is_not_written_to_git_again(relay: Relay) -> None:
    relay.report("pc-1", ("app",))
    relay.run()
    blobs = dict(relay.loop.git._blobs)
    relay.later(60)
    relay.report("pc-2", ())
    relay.run()
    after = relay.loop.git._blobs
    inventory_path = f"relays/{RELAY}/inventory.json"
    assert after[inventory_path][1] != blobs[inventory_path][1]  # a new client: new inventory
    software = f"relays/{RELAY}/software.json"
    assert after[software][0] is blobs[software][0] and after[software][1] == blobs[software][1]
    tip = relay.origin.ref(f"status/{RELAY}")
    assert tip is not None
    # what the origin holds is what was rendered, byte for byte
    assert relay.origin.read(f"status/{RELAY}", inventory_path) == after[inventory_path][0]


def test_row_lines_are_what_each_row_renders_to_alone() -> None:
    """The job file's rows, rendered with shared templates, equal rendering each row on its own (hostile text too)."""
    import random

    from reconciler.plan import ClientState
    from reconciler.report import StatusRow, _row_json, _row_lines, _yaml_flow

    chooser = random.Random(17)
    texts = ["", "attempt 1/3", "client-placeholder", '"client": "x"', "\u2028 line\u0085 sep", "日本語 ✓",
             "\u202e reversed", "back\\slash", "tab\tnew\nline"]
    stamps = [None, T0, T0 + timedelta(seconds=1)]
    rows = [StatusRow(client=f"pc-{chooser.randrange(50):03d}" if n % 7 else "client-placeholder",
                      state=chooser.choice(list(ClientState)), installed_version=chooser.choice([None, "1.0", "2"]),
                      attempts=chooser.randrange(4), message=chooser.choice(texts),
                      updated_at=chooser.choice(stamps), reason=chooser.choice([None, "queued", "done"]))
            for n in range(400)]
    expected = "".join(f"- {_yaml_flow(_row_json(row))}\n" for row in rows).encode("utf-8")
    assert _row_lines(rows) == expected
    assert yaml.safe_load(b"rows:\n" + _row_lines(rows))["rows"][5]["client"] == rows[5].client


def test_blobs_gone_from_the_mirror_before_the_publish_are_written_again_by_the_next_pass(relay: Relay) -> None:
    loop = relay.loop
    workdir = loop.git.workdir
    loop.passes = PassProcess(PassSettings(
        name=RELAY, workdir=workdir, synchronous=None, poll_seconds=30.0, offline_after=None,
        retire_after=timedelta(days=30), inventory_interval=900.0), loop.state, relay.store, timeout=120.0)
    try:
        relay.report("pc-1", ("app",))
        loop.sync()
        loop.last_files = loop.full_pass()
        blobs = [content for content in loop.last_files.values() if isinstance(content, Blob)]
        assert len(blobs) == len(loop.last_files)  # the child wrote every file; none is held here
        for blob in blobs:  # as a gc drops objects nothing referenced yet (few objects: written loose)
            (workdir / "repo.git" / "objects" / blob.sha[:2] / blob.sha[2:]).unlink()
        assert loop.publish(force=True) is None
        assert "is not in the mirror" in loop.problems[PUBLISHING][0].message
        assert relay.origin.ref(f"status/{RELAY}") is None
        loop.last_files = loop.full_pass()  # told to write every blob again
        assert loop.publish(force=True) is not None
        assert PUBLISHING not in loop.problems
        assert yaml.safe_load(relay.origin.read(f"status/{RELAY}", f"relays/{RELAY}/jobs/install-app.yaml"))[
            "rows"][0]["client"] == "pc-1"
    finally:
        assert isinstance(loop.passes, PassProcess)
        loop.passes.close()
