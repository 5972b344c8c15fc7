"""Full passes in a process of their own (reconciler.relay.pass_process): the same status as in process,
on a real SQLite file and a real child process; what reaches the child and what comes back; a child that
dies or whose parent dies."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from e2e_helpers import wait_for
from test_relay_server import _specs

from reconciler.gitstore import Blob, FileContent, GitStore
from reconciler.plan import Installed
from reconciler.relay.full_pass import FullPass, PassResult
from reconciler.relay.pass_process import PassFailed, PassProcess, PassSettings
from reconciler.relay.state import (
    Generation,
    RelayState,
    StagedArtifact,
    make_generation,
)
from reconciler.relay.store import Store
from reconciler.times import utc_now

RELAY = "relay-a"
ARTIFACTS = {("app", "1.0"): StagedArtifact("ab" * 32, 10240, "tar")}


def generation(commit: str = "c" * 40, **kwargs: object) -> Generation:
    return make_generation(commit, _specs(**kwargs), RELAY, artifacts=ARTIFACTS)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path)
    try:
        yield opened
    finally:
        opened.close()


def settings(workdir: Path) -> PassSettings:
    """The child's settings; the relay's git mirror in ``workdir``, as the relay makes it, for its blobs."""
    GitStore(str(workdir / "no-origin"), workdir).ref_sha("main")
    return PassSettings(name=RELAY, workdir=workdir, synchronous=None, poll_seconds=30.0, offline_after=None,
                        retire_after=timedelta(days=30), inventory_interval=0.0)


@pytest.fixture
def passes(tmp_path: Path, store: Store) -> Iterator[PassProcess]:
    state = RelayState(RELAY, store, poll_seconds=30.0)
    state.generation = generation()
    process = PassProcess(settings(tmp_path), state, store, timeout=120.0)
    try:
        yield process
    finally:
        process.close()


def report(store: Store, client: str, installed: tuple[str, ...] = (), at: datetime | None = None) -> None:
    at = at or utc_now()
    with store.write() as db:
        if store.client(client, db) is None:
            store.register(db, client, at)
        store.record_report(db, client, {"os": "linux", "hostname": client, "freeDiskMB": 50_000}, {},
                            [Installed(name, "1.0") for name in installed], at)


def in_process(store: Store, served: Generation) -> PassResult:
    state = RelayState(RELAY, store, poll_seconds=30.0)
    state.generation = served
    return FullPass(RELAY, store, state, clock=utc_now, monotonic=time.monotonic).run()


def whole(files: Mapping[str, FileContent], workdir: Path) -> dict[str, bytes]:
    """The files' bytes: those the child wrote to the mirror in ``workdir`` (a Blob each) read back with git."""
    out = {}
    for name, content in files.items():
        if isinstance(content, Blob):
            content = subprocess.run(["git", f"--git-dir={workdir / 'repo.git'}", "cat-file", "blob", content.sha],
                                     check=True, capture_output=True).stdout
        out[name] = content
    return out


def job_rows(files: Mapping[str, FileContent], workdir: Path, job: str = "install-app") -> dict[str, str]:
    doc = yaml.safe_load(whole(files, workdir)[f"relays/{RELAY}/jobs/{job}.yaml"])
    return {row["client"]: row["state"] for row in doc["rows"]}


def inventory_ids(files: Mapping[str, FileContent], workdir: Path) -> list[str]:
    return [c["id"] for c in json.loads(whole(files, workdir)[f"relays/{RELAY}/inventory.json"])["clients"]]


def test_a_pass_in_its_own_process_finds_what_one_in_process_finds(passes: PassProcess, store: Store) -> None:
    report(store, "pc-1")
    report(store, "pc-2", installed=("app",))
    child = passes.run()
    assert passes.pid is not None and passes.pid != os.getpid()
    local = in_process(store, passes.state.generation)
    assert child.files.keys() == local.files.keys()
    work = passes.settings.workdir
    assert job_rows(child.files, work) == job_rows(local.files, work) == {"pc-1": "Pending", "pc-2": "Succeeded"}
    assert inventory_ids(child.files, work) == inventory_ids(local.files, work) == ["pc-1", "pc-2"]
    assert (child.client_count, child.clients_online, child.row_counts, child.errors) == (
        local.client_count, local.clients_online, local.row_counts, local.errors)
    assert {key: n for key, n in child.row_counts.items() if n} == {("install-app", "Pending"): 1,
                                                                   ("install-app", "Succeeded"): 1}
    assert child.planning is None and child.last_event == store.last_event()


def test_changes_and_a_new_generation_reach_the_child_and_its_files_come_back_as_blobs(
        passes: PassProcess, store: Store) -> None:
    work = passes.settings.workdir
    report(store, "pc-1")
    first = passes.run()
    assert all(isinstance(content, Blob) for content in first.files.values())  # the relay holds no status bytes
    report(store, "pc-2")
    second = passes.run()
    assert job_rows(second.files, work) == {"pc-1": "Pending", "pc-2": "Pending"}
    assert second.files.keys() == first.files.keys()
    software = f"relays/{RELAY}/software.json"
    assert second.files[software] == first.files[software]  # unchanged: the same blob, not written again
    assert second.files[f"relays/{RELAY}/inventory.json"] != first.files[f"relays/{RELAY}/inventory.json"]
    # what the child wrote to the mirror is, byte for byte, what a pass in this process renders
    local = in_process(store, passes.state.generation).files
    assert whole(second.files, work) == {**local, f"relays/{RELAY}/relay.yaml": whole(second.files, work)[
        f"relays/{RELAY}/relay.yaml"]}
    passes.state.generation = generation("d" * 40, max_concurrent=1)
    third = passes.run()
    relay_doc = yaml.safe_load(whole(third.files, work)[f"relays/{RELAY}/relay.yaml"])
    assert relay_doc["observedCommit"] == "d" * 40
    assert sorted(job_rows(third.files, work).values()) == ["Pending", "Pending"]


def test_last_seen_times_held_in_memory_count_in_the_childs_pass(passes: PassProcess, store: Store) -> None:
    now = utc_now()
    report(store, "pc-1", at=now - timedelta(hours=1))  # SQLite says: offline for an hour
    assert passes.run().clients_online == 0
    store.note_seen("pc-1", {"os": "linux", "hostname": "pc-1", "freeDiskMB": 49_000}, now)  # a quiet check-in
    assert passes.run().clients_online == 1
    assert store.unflushed() == 0


def test_a_job_the_child_cannot_plan_is_left_out_of_what_the_relay_serves(passes: PassProcess, store: Store) -> None:
    specs = _specs()
    good = specs.jobs[0]
    west_of_utc = timezone(-timedelta(hours=23, minutes=59))  # past what the loader allows: planning fails
    bad = replace(good, name="install-app-later", revision="r2",
                  not_before=datetime(9999, 12, 31, 23, 59, 59, tzinfo=west_of_utc))
    served = make_generation("e" * 40, replace(specs, jobs=(good, bad)), RELAY, artifacts=ARTIFACTS)
    passes.state.generation = served
    report(store, "pc-1")
    result = passes.run()
    assert set(result.unplannable) == {"install-app-later"}
    now_served = passes.state.generation
    assert now_served is not served and set(now_served.unplannable) == {"install-app-later"}
    assert now_served.index is not None and "install-app-later" not in now_served.index.revisions
    assert any("install-app-later cannot be planned" in error for error in result.errors)
    assert job_rows(result.files, passes.settings.workdir) == {"pc-1": "Pending"}
    assert passes.run().unplannable == result.unplannable  # the next pass plans the served generation


def test_a_killed_child_is_replaced_at_the_next_pass(passes: PassProcess, store: Store) -> None:
    report(store, "pc-1")
    passes.run()
    first = passes.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: passes.pid is None, 10, what="the killed child to be gone")
    result = passes.run()  # a new child: the generation and every file are sent again
    assert passes.pid not in (None, first)
    assert job_rows(result.files, passes.settings.workdir) == {"pc-1": "Pending"}


def test_what_a_killed_child_was_writing_beside_the_mirror_is_removed(passes: PassProcess, store: Store) -> None:
    report(store, "pc-1")
    passes.run()
    child = passes.pid
    assert child is not None
    work = passes.settings.workdir
    # the scratch directory the child names for itself while it streams blobs to git, as a kill leaves it
    scratch = work / f".repo.git.{child}.abc123_x.tmp"
    scratch.mkdir()
    (scratch / "blobs").write_bytes(b"x" * 100_000)
    mine = work / f".repo.git.{os.getpid()}.abc123_y.tmp"  # a live process's: kept
    mine.mkdir()
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: passes.pid is None, 10, what="the killed child to be gone")
    assert job_rows(passes.run().files, work) == {"pc-1": "Pending"}  # a new child
    assert not scratch.exists() and mine.exists()


def test_a_child_killed_during_a_pass_fails_that_pass_with_a_status_error(passes: PassProcess, store: Store) -> None:
    report(store, "pc-1")
    passes.run()
    child = passes.pid
    assert child is not None
    report(store, "pc-2")  # a new row for the next pass to record
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # ... which waits for this write lock: the pass cannot end
    outcome: list[BaseException | PassResult] = []

    def run() -> None:
        try:
            outcome.append(passes.run())
        except Exception as e:  # noqa: BLE001 - the outcome is what the test looks at
            outcome.append(e)

    read_before = _bytes_read(child)
    runner = threading.Thread(target=run)
    runner.start()
    try:
        wait_for(lambda: _bytes_read(child) != read_before, 20, what="the child to read its request")
        os.kill(child, signal.SIGKILL)
        runner.join(30)
    finally:
        blocker.rollback()
        blocker.close()
    assert len(outcome) == 1 and isinstance(outcome[0], PassFailed), outcome
    assert "ended unexpectedly (killed by SIGKILL)" in outcome[0].message
    # a new child: every file written again
    assert job_rows(passes.run().files, passes.settings.workdir) == {"pc-1": "Pending", "pc-2": "Pending"}


def test_a_child_that_does_not_answer_in_time_is_stopped(tmp_path: Path, store: Store) -> None:
    state = RelayState(RELAY, store, poll_seconds=30.0)
    state.generation = generation()
    report(store, "pc-1")
    passes = PassProcess(settings(tmp_path), state, store, timeout=120.0)
    try:
        passes.run()
        child = passes.pid
        assert child is not None
        passes.timeout = 1.0
        os.kill(child, signal.SIGSTOP)  # alive, never answering
        with pytest.raises(PassFailed, match="did not answer within 1s"):
            passes.run()
        assert passes.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        passes.timeout = 120.0
        assert job_rows(passes.run().files, tmp_path) == {"pc-1": "Pending"}
    finally:
        passes.close()


def test_close_ends_the_child(passes: PassProcess, store: Store) -> None:
    report(store, "pc-1")
    passes.run()
    child = passes.pid
    assert child is not None
    passes.close()
    assert passes.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_the_child_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    # A parent of its own (not this test process), killed with SIGKILL: nothing runs its clean-up.
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_relay_pass_process import generation, report, settings
from reconciler.relay.pass_process import PassProcess
from reconciler.relay.state import RelayState
from reconciler.relay.store import Store
store = Store(Path({str(tmp_path)!r}))
state = RelayState("relay-a", store, poll_seconds=30.0)
state.generation = generation()
report(store, "pc-1")
passes = PassProcess(settings(Path({str(tmp_path)!r})), state, store)
passes.run()
print(passes.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            return _zombie(child)
        wait_for(gone, 20, what=f"pass process {child} to end after its parent was killed")
    finally:
        if parent.poll() is None:
            parent.kill()


def _bytes_read(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/io has no rchar")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_every_generation_of_the_example_repo_reaches_the_child_unchanged() -> None:
    # What the child plans with is a pickled copy: every spec feature the example repo uses must survive it.
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from reconciler.repo_tree import load_repo
    from reconciler.resources import example_repo_dir

    specs = load_repo(example_repo_dir()).specs
    assert specs is not None
    staged = {(p.name, p.version): StagedArtifact("ab" * 32, 1, "tar") for p in specs.packages}
    for relay in specs.topology.relays:
        served = make_generation("f" * 40, specs, relay.name, artifacts=staged)
        copy = pickle.loads(ForkingPickler.dumps(replace(served, trust=None)))
        assert copy == served, relay.name
        assert copy.index is not None and served.index is not None
        assert copy.index.revisions == served.index.revisions and copy.index.revisions


def test_a_generation_that_cannot_be_sent_is_planned_in_the_relays_process(
        passes: PassProcess, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    report(store, "pc-1")
    lock = threading.Lock()  # cannot be pickled: stands for any value a future spec field might hold
    passes.state.generation = replace(generation(), unavailable={("other", "9.9"): lock})  # type: ignore[dict-item]
    with caplog.at_level("ERROR", logger="reconciler.relay"):
        first = passes.run()
        again = passes.run()
    assert job_rows(first.files, passes.settings.workdir) == job_rows(again.files, passes.settings.workdir) == {"pc-1": "Pending"}
    told = [r.getMessage() for r in caplog.records if "cannot be handed to the pass process" in r.getMessage()]
    assert len(told) == 1  # once, not at every pass
    passes.state.generation = generation("d" * 40)  # one that can be sent goes to the child again
    third = passes.run()
    relay_doc = yaml.safe_load(whole(third.files, passes.settings.workdir)[f"relays/{RELAY}/relay.yaml"])
    assert relay_doc["observedCommit"] == "d" * 40
    assert passes.pid is not None

