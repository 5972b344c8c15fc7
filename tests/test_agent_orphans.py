"""An installer command outliving its supervisor is never run a second time beside itself.

Installer commands run under a supervisor, in a session apart from the
agent's, and the supervisor records their exit status
(``test_agent_supervisor.py``). When the agent *and* the supervisor are
killed, the installer is an orphan whose exit status nobody can learn: the restarted agent waits for it up to its timeout, then kills its
group, and only then runs the operation again. The end-to-end tests run the
real ``reconciler agent --once`` against the fake relay of
``test_agent_loop.py`` and wait on conditions with deadlines, never for a
fixed time. The guard tests check that a pid the system has handed to some
other process since is neither waited for nor killed (also for records left
by agents from before the supervisor, in the journal entry itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import (  # noqa: F401
    PROJECT_ROOT,
    FakeRelay,
    files_action,
    make_tar,
    relay,
    results_of,
)

from reconciler.agent.agent import Agent
from reconciler.agent.installers import (
    InstallerSpec,
    Layout,
    ProcessRecord,
    Receipt,
    inventory,
    process_start_time,
    write_receipt,
)
from reconciler.agent.journal import STARTED, Journal
from reconciler.times import format_time, utc_now

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="SIGKILL, flock and sessions are POSIX")
LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="start times come from /proc")

# Start, announce the pid, block until released, finish with the exit code in
# argv[1] (0 without one). A concurrent run is detected with flock rather than
# an O_EXCL file: a SIGKILLed run would leave such a file behind and make the
# next run look concurrent; a flock goes away with its holder.
ORPHAN_INSTALL = """\
import fcntl, os, sys, time
root = os.environ["RECONCILER_ROOT"]
def note(what):
    with open(os.path.join(root, "marker.log"), "a") as marker:
        marker.write(f"{what} {os.getpid()}\\n")
lock = open(os.path.join(root, "install.lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    note("CONCURRENT")
    raise SystemExit(3)
note("start")
with open(os.path.join(root, ".installer.pid"), "w") as pid_file:
    pid_file.write(str(os.getpid()))
os.replace(os.path.join(root, ".installer.pid"), os.path.join(root, "installer.pid"))
while not os.path.exists(os.path.join(root, "release")):
    time.sleep(0.01)
note("done")
print("installed")
raise SystemExit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may never reap it, as in some containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rfind(")") + 2] not in "ZX"


def marker(root: Path) -> list[tuple[str, int]]:
    path = root / "marker.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(what, int(pid)) for what, pid in (line.split() for line in lines)]


class AgentRun:
    """``reconciler agent --once`` as a subprocess, its log read as it comes (a full pipe would block it)."""

    started: list[AgentRun] = []  # stopped by the ``root`` fixture if a test fails half-way

    def __init__(self, relay_url: str, root: Path, env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "reconciler", "agent", "--id", "pc-orphan", "--relay", relay_url, "--insecure-http", "--insecure-unsigned-actions",
                "--root", str(root), "--once"]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
        self.proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.waiting = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        AgentRun.started.append(self)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "still running; waiting" in line:
                self.waiting.set()

    def finish(self) -> str:
        assert self.proc.wait(timeout=60) == 0, "".join(self.lines)
        self._reader.join(timeout=10)
        return "".join(self.lines)


@pytest.fixture
def root(tmp_path: Path) -> Any:
    """The agent root; afterwards no agent is left running, and any installer is released to end."""
    path = tmp_path / "root"
    yield path
    for run in AgentRun.started:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    AgentRun.started.clear()
    if path.is_dir():
        (path / "release").touch()


def await_restart(second: AgentRun, root: Path) -> None:
    """Until the restarted agent waits for the orphan, or (the bug) runs the installer beside it."""
    wait_for(lambda: second.waiting.is_set() or len(marker(root)) > 1 or second.proc.poll() is not None,
             "the restarted agent to wait for the orphan")
    assert [what for what, _ in marker(root)] == ["start"], "the installer ran beside its orphan"
    assert second.waiting.is_set(), "".join(second.lines)


def orphan_action(relay: FakeRelay, timeout: float) -> dict[str, Any]:
    content, sha = make_tar({"install.py": ORPHAN_INSTALL})
    relay.artifacts[sha] = content
    action = files_action("op-orphan", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": [], "timeoutSeconds": timeout}
    relay.replies.extend([[action], [action]])  # the relay re-sends an operation it has no result for
    return action


def kill_agent_mid_install(relay: FakeRelay, root: Path) -> int:
    """Run the agent until the installer has started, SIGKILL the agent and its supervisor; the installer's pid."""
    first = AgentRun(relay.url, root)
    try:
        pid = int(wait_for(lambda: (root / "installer.pid").exists() and (root / "installer.pid").read_text(),
                           "the installer to start"))
    finally:
        first.proc.kill()  # the agent process only, not its supervisor or installer
        first.proc.wait()
    (attempt,) = (root / "journal").glob("*/install-1.0/*")
    process = json.loads(wait_for(lambda: (attempt / "installer.json").exists()
                                  and (attempt / "installer.json").read_text(), "the installer record"))
    assert process["pid"] == pid and process["startTime"] == process_start_time(pid)
    supervisor = int((attempt / "claim").read_text().split()[1])
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not running(supervisor), "the supervisor to die")
    assert marker(root) == [("start", pid)]
    assert running(pid), "the installer should outlive the agent and its supervisor"
    assert not (attempt / "result.json").exists()
    return pid


@POSIX_ONLY
def test_orphan_that_ends_within_its_timeout_is_waited_for_and_not_run_again(relay: FakeRelay, root: Path) -> None:
    orphan_action(relay, timeout=60)
    orphan = kill_agent_mid_install(relay, root)
    checkins = len(relay.checkins)
    second = AgentRun(relay.url, root)
    await_restart(second, root)
    assert running(orphan) and len(relay.checkins) == checkins  # nothing else happens meanwhile
    (root / "release").touch()
    log = second.finish()
    # the orphan's exit status died with its supervisor: the operation is not run a second time,
    # it reports that the status is unknown, with what the installer printed
    assert marker(root) == [("start", orphan), ("done", orphan)]
    assert "ended by itself" in log
    result = results_of(relay.checkins[-1]["body"])["op-orphan"]
    assert result["status"] == "failed" and result["message"].startswith("exit status unknown: the installer ran")
    assert result["message"].endswith("installed")


@POSIX_ONLY
def test_orphan_past_its_timeout_is_killed_and_not_run_again(relay: FakeRelay, root: Path) -> None:
    orphan_action(relay, timeout=3)
    orphan = kill_agent_mid_install(relay, root)
    second = AgentRun(relay.url, root)
    await_restart(second, root)
    wait_for(lambda: not running(orphan), "the orphan to be killed")
    assert ("done", orphan) not in marker(root)
    (root / "release").touch()  # a run started now would finish: none may
    log = second.finish()
    assert marker(root) == [("start", orphan)]
    assert "killed after its 3 s timeout" in log
    result = results_of(relay.checkins[-1]["body"])["op-orphan"]
    assert result["status"] == "failed" and result["message"].startswith("exit status unknown")


# ---------------------------------------------------------------- identity guard, in process


JOURNAL_ACTION = {"operationId": "op-guard", "job": "remove-app", "action": "uninstall",
                  "package": {"name": "app", "version": None}, "previousVersion": None, "artifact": None,
                  "installer": None}


@pytest.fixture
def bystander() -> Any:
    """A process of our own leading its own session, as an orphaned installer would."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    wait_for(lambda: process_start_time(proc.pid), "the bystander's /proc entry")
    yield proc
    proc.kill()
    proc.wait()


def expired_record(pid: int, start_time: str | None) -> dict[str, Any]:
    """A record whose timeout ran out long ago: if it matches a process, that process is killed at once."""
    started = format_time(utc_now() - timedelta(hours=1))
    return ProcessRecord(pid, start_time, started, 1.0).to_dict()


def settle_through(where: str, root: Path, record: dict[str, Any]) -> None:
    """Let the agent find ``record`` at start-up, before re-running its operation, or before ``detect``."""
    if where == "start-up":
        journal = Journal(root / "journal")
        journal.start("op-guard", JOURNAL_ACTION)
        journal.record_process("op-guard", record)
        agent = Agent("pc-001", "http://127.0.0.1:9", root, {}, {}, insecure_http=True)
        entry = agent.journal.get("op-guard")
        assert entry is not None and entry.state == STARTED and entry.process is None  # still to run
    elif where == "re-run":
        agent = Agent("pc-001", "http://127.0.0.1:9", root, {}, {}, insecure_http=True)
        agent.journal.start("op-guard", JOURNAL_ACTION)
        agent.journal.record_process("op-guard", record)
        result = agent.run_action(JOURNAL_ACTION)
        assert result is not None and result["status"] == "succeeded"
    else:
        layout = Layout(root)
        layout.create()
        spec = InstallerSpec.from_dict({"type": "command", "install": ["${PYTHON}", "-c", "pass"],
                                        "detect": ["${PYTHON}", "-c", "pass"]})
        write_receipt(layout, Receipt("app", "1.0", spec, "op-0", format_time(utc_now())))
        layout.detect_process.write_text(json.dumps(record))
        assert inventory(layout) == [{"name": "app", "version": "1.0"}]
        assert not layout.detect_process.exists()


@LINUX_ONLY
@pytest.mark.parametrize("where", ["start-up", "re-run", "detect"])
def test_recycled_pid_is_not_killed(where: str, bystander: subprocess.Popen[bytes], tmp_path: Path) -> None:
    # the pid is live, but the start time is not the recorded one: someone else's process now
    settle_through(where, tmp_path / "root", expired_record(bystander.pid, "some-other-boot:12345"))
    assert bystander.poll() is None


@LINUX_ONLY
@pytest.mark.parametrize("where", ["start-up", "re-run", "detect"])
def test_matching_orphan_past_its_timeout_is_killed(where: str, bystander: subprocess.Popen[bytes],
                                                    tmp_path: Path) -> None:
    settle_through(where, tmp_path / "root", expired_record(bystander.pid, process_start_time(bystander.pid)))
    assert bystander.wait(timeout=10) == -9


def test_entries_without_a_process_keep_their_format(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.start("op", {"operationId": "op"})
    path = journal.path_for("op")
    assert "process" not in path.read_text()  # as written before the field existed
    record = ProcessRecord(4242, "boot:1", "2026-01-01T00:00:00Z", 600.0).to_dict()
    journal.record_process("op", record)
    assert Journal(tmp_path / "j").get("op").process == record  # type: ignore[union-attr]
    assert ProcessRecord.from_dict(record) == ProcessRecord(4242, "boot:1", "2026-01-01T00:00:00Z", 600.0)
    journal.finish("op", {"operationId": "op", "status": "succeeded", "exitCode": 0, "message": "",
                          "finishedAt": "2026-01-01T00:00:01Z"})
    assert "process" not in path.read_text()
    assert Journal(tmp_path / "j").interrupted() == []
