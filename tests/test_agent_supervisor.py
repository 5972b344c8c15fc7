"""An installer interrupted by a ``kill -9`` of the agent runs exactly once, and its real result is reported.

The installer runs under a supervisor process that outlives the agent and
records the exit status (``reconciler/agent/supervisor.py``). These tests run
the real ``reconciler agent --once`` against the fake relay of
``test_agent_loop.py``, SIGKILL it at controlled points (each reached by
polling for a file or a request, with a deadline), restart it, and count the
installer's runs in a file it appends to. The stand-in installer also holds a
``flock`` while it runs, so a second copy running beside it would be caught.

Kill points: while the artifact downloads (before any supervisor exists);
after the supervisor started but before it claimed the attempt; while the
installer runs; after the installer ended and its result was written. The
supervisor's own death is in ``test_agent_orphans.py``, and the states a kill
leaves behind for too short a time to hit from outside are built directly in
``test_agent_attempts.py``.
"""

from __future__ import annotations

import os
import threading
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
from test_agent_orphans import ORPHAN_INSTALL, AgentRun, marker, root, running, wait_for  # noqa: F401

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="SIGKILL, flock and sessions are POSIX")

INSTALL = ORPHAN_INSTALL  # announces its pid, blocks until released, exits with argv[1]

# Loaded by every Python process of the test through PYTHONPATH; holds the first
# supervisor at interpreter start, before it has touched its attempt directory.
HOLD_FIRST_SUPERVISOR = """\
import os, sys, time
hold = os.environ.get("TEST_SUPERVISOR_HOLD")
if hold and any("reconciler.agent.supervisor" in arg for arg in getattr(sys, "orig_argv", ())):
    try:
        os.close(os.open(os.path.join(hold, "taken"), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass
    else:
        with open(os.path.join(hold, ".held"), "w") as held:
            held.write(str(os.getpid()))
        os.replace(os.path.join(hold, ".held"), os.path.join(hold, "held"))
        while not os.path.exists(os.path.join(hold, "go")):
            time.sleep(0.01)
"""


def install_action(relay: FakeRelay, exit_code: int = 0, timeout: float = 60) -> dict[str, Any]:
    content, sha = make_tar({"install.py": INSTALL})
    relay.artifacts[sha] = content
    action = files_action("op-sup", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py", str(exit_code)],
                           "uninstall": [], "detect": [], "timeoutSeconds": timeout}
    relay.replies.extend([[action], [action]])  # the relay re-sends an operation it has no result for
    return action


def attempts(root: Path) -> list[Path]:
    """The install step's attempt directories (see the supervisor module)."""
    return sorted((root / "journal").glob("*/install-1.0/*"))


def kill_agent_while_installing(relay: FakeRelay, root: Path) -> int:
    """Run the agent until the installer has started, SIGKILL the agent alone; the installer's pid."""
    first = AgentRun(relay.url, root)
    try:
        pid = int(wait_for(lambda: (root / "installer.pid").exists() and (root / "installer.pid").read_text(),
                           "the installer to start"))
    finally:
        first.proc.kill()  # the agent process only: its supervisor and installer run on
        first.proc.wait()
    assert marker(root) == [("start", pid)] and running(pid)
    return pid


def expected_result(exit_code: int) -> dict[str, Any]:
    if exit_code == 0:
        return {"status": "succeeded", "exitCode": 0, "message": "installed"}
    return {"status": "failed", "exitCode": exit_code, "message": f"exit code {exit_code}: installed"}


def reported(relay: FakeRelay) -> dict[str, Any]:
    result = results_of(relay.checkins[-1]["body"])["op-sup"]
    return {key: result[key] for key in ("status", "exitCode", "message")}


@POSIX_ONLY
@pytest.mark.parametrize("exit_code", [0, 3])
def test_agent_killed_while_the_installer_runs(exit_code: int, relay: FakeRelay, root: Path) -> None:
    install_action(relay, exit_code)
    pid = kill_agent_while_installing(relay, root)
    second = AgentRun(relay.url, root)
    wait_for(lambda: second.waiting.is_set() or len(marker(root)) > 1 or second.proc.poll() is not None,
             "the restarted agent to wait for the running installer")
    assert marker(root) == [("start", pid)] and second.waiting.is_set(), "".join(second.lines)
    (root / "release").touch()
    second.finish()
    assert marker(root) == [("start", pid), ("done", pid)]  # it ran once: no second run after it
    assert reported(relay) == expected_result(exit_code)
    assert (root / "receipts" / "tool.json").exists() == (exit_code == 0)
    assert all(p.is_file() for p in (root / "journal").iterdir())  # the finished operation's runs are gone


@POSIX_ONLY
@pytest.mark.parametrize("exit_code", [0, 3])
def test_agent_killed_after_the_installer_ended_and_its_result_was_written(
        exit_code: int, relay: FakeRelay, root: Path) -> None:
    install_action(relay, exit_code)
    pid = kill_agent_while_installing(relay, root)
    (root / "release").touch()
    wait_for(lambda: attempts(root) and (attempts(root)[-1] / "result.json").exists(),
             "the supervisor to record how the installer ended")
    supervisor = int((attempts(root)[-1] / "claim").read_text().split()[1])
    wait_for(lambda: not running(pid) and not running(supervisor), "the installer and its supervisor to end")
    second = AgentRun(relay.url, root)
    log = second.finish()
    assert "still running" not in log
    assert marker(root) == [("start", pid), ("done", pid)]
    assert reported(relay) == expected_result(exit_code)


@POSIX_ONLY
def test_agent_killed_while_downloading_runs_the_installer_once(relay: FakeRelay, root: Path) -> None:
    install_action(relay)
    relay.hold_downloads = held = threading.Event()
    try:
        first = AgentRun(relay.url, root)
        wait_for(lambda: relay.artifact_requests, "the agent to start downloading")
        first.proc.kill()
        first.proc.wait()
    finally:
        relay.hold_downloads = None
        held.set()
    assert marker(root) == [] and attempts(root) == []
    (root / "release").touch()
    AgentRun(relay.url, root).finish()
    assert [what for what, _ in marker(root)] == ["start", "done"]
    assert reported(relay) == expected_result(0)


@POSIX_ONLY
def test_agent_killed_before_its_supervisor_claimed_the_attempt(relay: FakeRelay, root: Path,
                                                                tmp_path: Path) -> None:
    install_action(relay)
    site, hold = tmp_path / "site", tmp_path / "hold"
    site.mkdir()
    hold.mkdir()
    (site / "sitecustomize.py").write_text(HOLD_FIRST_SUPERVISOR)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{PROJECT_ROOT}", "TEST_SUPERVISOR_HOLD": str(hold)}
    first = AgentRun(relay.url, root, env)
    try:
        late = int(wait_for(lambda: (hold / "held").exists() and (hold / "held").read_text(),
                            "the first supervisor to start"))
    finally:
        first.proc.kill()
        first.proc.wait()
    second = AgentRun(relay.url, root, env)
    pid = int(wait_for(lambda: (root / "installer.pid").exists() and (root / "installer.pid").read_text(),
                       "the installer to start"))
    # the restarted agent gave the first attempt up and runs a second one
    first_attempt, second_attempt = attempts(root)
    assert (first_attempt / "claim").read_text() == "abandoned\n"
    assert (second_attempt / "claim").read_text().startswith("supervisor ")
    (hold / "go").touch()  # the first supervisor now finds its attempt claimed, and runs nothing
    wait_for(lambda: not running(late), "the first supervisor to give up")
    assert not (first_attempt / "installer.json").exists() and not (first_attempt / "result.json").exists()
    (root / "release").touch()
    second.finish()
    assert marker(root) == [("start", pid), ("done", pid)]
    assert reported(relay) == expected_result(0)


@POSIX_ONLY
def test_timeout_still_kills_the_installer_of_a_killed_agent(relay: FakeRelay, root: Path) -> None:
    install_action(relay, timeout=3)
    pid = kill_agent_while_installing(relay, root)
    second = AgentRun(relay.url, root)
    wait_for(lambda: not running(pid), "the supervisor to kill the installer at its timeout")
    (root / "release").touch()  # too late for the killed installer; a second run would now finish
    log = second.finish()
    assert marker(root) == [("start", pid)], log
    assert reported(relay) == {"status": "failed", "exitCode": None, "message": "timed out after 3 s"}
