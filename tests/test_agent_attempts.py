"""Supervised commands driven through their attempt directories, with real processes and files.

A ``kill -9`` of the agent or of a supervisor can leave an attempt in states
that last too briefly to hit from outside (an attempt written but no
supervisor started yet; a supervisor dead after its claim, before it started
the installer; an installer orphaned by its supervisor). These tests write
those states as the dying process would have left them and check that the
step then runs its command exactly once, never beside a still running copy.
The end-to-end kill tests are in ``test_agent_supervisor.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import PROJECT_ROOT
from test_agent_orphans import wait_for

from reconciler.agent.processes import ProcessRecord, process_start_time
from reconciler.agent.supervisor import run_supervised
from reconciler.times import format_time, utc_now

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="sessions are POSIX")


def appender(log: Path, exit_code: int = 0) -> list[str]:
    """A command that appends a line to ``log`` per run and exits with ``exit_code``."""
    code = f"open({str(log)!r}, 'a').write('ran\\n'); print('ran'); raise SystemExit({exit_code})"
    return [sys.executable, "-c", code]


def run(step: Path, argv: list[str]) -> Any:
    return run_supervised(step, argv, step.parent, dict(os.environ), 30)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_step_with_a_result_is_answered_from_it(tmp_path: Path) -> None:
    step, log = tmp_path / "op" / "install-1.0", tmp_path / "runs.log"
    first = run(step, appender(log, 4))
    assert (first.exit_code, first.output, first.timed_out) == (4, "ran", False)
    assert run(step, appender(log, 4)) == first
    assert lines(log) == 1


def write_attempt(step: Path, argv: list[str], claim: str | None) -> Path:
    attempt = step / "1"
    attempt.mkdir(parents=True)
    (attempt / "request.json").write_text(json.dumps({"argv": argv, "cwd": str(step.parent), "timeoutSeconds": 30}))
    if claim is not None:
        (attempt / "claim").write_text(claim)
    return attempt


def test_a_supervisor_that_died_before_starting_the_installer_leaves_it_to_run_once(tmp_path: Path) -> None:
    step, log = tmp_path / "op" / "install-1.0", tmp_path / "runs.log"
    write_attempt(step, appender(log), "supervisor 4242\n")  # claimed; no lock holder, no installer record
    assert run(step, appender(log)).exit_code == 0
    assert lines(log) == 1 and sorted(p.name for p in step.iterdir()) == ["1", "2"]


def test_a_late_supervisor_runs_nothing_in_an_abandoned_attempt(tmp_path: Path) -> None:
    step, log = tmp_path / "op" / "install-1.0", tmp_path / "runs.log"
    attempt = write_attempt(step, appender(log), None)  # as left by an agent killed before the supervisor started
    assert run(step, appender(log)).exit_code == 0
    assert (attempt / "claim").read_text() == "abandoned\n" and lines(log) == 1
    late = subprocess.run([sys.executable, "-m", "reconciler.agent.supervisor", str(attempt)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert late.returncode == 0, late.stderr
    assert lines(log) == 1 and not (attempt / "result.json").exists()


class LogSeen(logging.Handler):
    """Sets ``event`` once a log line containing ``text`` is emitted (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@POSIX_ONLY
def test_an_orphan_of_a_dead_supervisor_is_waited_for_and_the_step_not_run_again(tmp_path: Path) -> None:
    step, log = tmp_path / "op" / "install-1.0", tmp_path / "runs.log"
    release = tmp_path / "release"
    wait = f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
    orphan = subprocess.Popen([sys.executable, "-c", wait], start_new_session=True)
    seen = LogSeen("still running; waiting")
    logging.getLogger("reconciler.agent").addHandler(seen)
    try:
        attempt = write_attempt(step, appender(log), "supervisor 4242\n")  # its supervisor is gone
        record = ProcessRecord(orphan.pid, process_start_time(orphan.pid), format_time(utc_now()), 60)
        (attempt / "installer.json").write_text(json.dumps(record.to_dict()))
        outcome: list[Any] = []
        runner = threading.Thread(target=lambda: outcome.append(run(step, appender(log))))
        runner.start()
        wait_for(lambda: seen.event.is_set() or not runner.is_alive(), "the step to wait for the orphan")
        assert runner.is_alive() and lines(log) == 0  # nothing runs beside the orphan
        release.touch()
        runner.join(timeout=60)
        assert orphan.wait(timeout=30) == 0
        # its exit status is lost with its supervisor: the step reports that, and never runs again
        assert outcome and outcome[0].exit_code is None and lines(log) == 0
        assert (outcome[0].error or "").startswith("exit status unknown: the installer ran")
        assert run(step, appender(log)) == outcome[0] and lines(log) == 0
    finally:
        logging.getLogger("reconciler.agent").removeHandler(seen)
        release.touch()
        orphan.wait(timeout=30)


@POSIX_ONLY
def test_an_agent_killed_while_waiting_for_an_orphan_leaves_its_sighting_behind(tmp_path: Path) -> None:
    step, log = tmp_path / "op" / "install-1.0", tmp_path / "runs.log"
    release = tmp_path / "release"
    wait = f"import os, time\nwhile not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
    orphan = subprocess.Popen([sys.executable, "-c", wait], start_new_session=True)
    seen = LogSeen("still running; waiting")
    logging.getLogger("reconciler.agent").addHandler(seen)
    try:
        attempt = write_attempt(step, appender(log), "supervisor 4242\n")  # its supervisor is gone
        record = ProcessRecord(orphan.pid, process_start_time(orphan.pid), format_time(utc_now()), 60)
        (attempt / "installer.json").write_text(json.dumps(record.to_dict()))
        runner = threading.Thread(target=lambda: run(step, appender(log)), daemon=True)
        runner.start()
        wait_for(lambda: seen.event.is_set() or not runner.is_alive(), "the step to wait for the orphan")
        # before it waits, the agent notes on disk that the installer ran on alone
        assert json.loads((attempt / "orphaned.json").read_text())["pid"] == orphan.pid
    finally:
        logging.getLogger("reconciler.agent").removeHandler(seen)
        release.touch()
        orphan.wait(timeout=30)
    runner.join(timeout=60)
    # Had that agent been killed there, the next finds the installer gone and no
    # result: the note still says it ran, so it is reported, never run again.
    (attempt / "result.json").unlink()
    again = run(step, appender(log))
    assert again.exit_code is None and (again.error or "").startswith("exit status unknown") and lines(log) == 0


def test_a_command_that_cannot_start_is_recorded_and_not_retried(tmp_path: Path) -> None:
    step = tmp_path / "op" / "install-1.0"
    first = run(step, ["/nonexistent/installer"])
    assert first.exit_code is None and (first.error or "").startswith("cannot run '/nonexistent/installer': ")
    assert run(step, ["/nonexistent/installer"]) == first
    assert sorted(p.name for p in step.iterdir()) == ["1"]
