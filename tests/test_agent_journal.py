"""The journal: an operation runs once, an interrupted one runs again, a damaged file is survivable.

The agent runs real installer commands; the artifact is put in its cache up
front, so no relay is needed (the relay URL points at a closed port).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from reconciler.agent.agent import Agent
from reconciler.agent.journal import FINISHED, STARTED, Journal
from reconciler.times import format_time

NO_RELAY = "http://127.0.0.1:9"

# Appends a line to a marker outside the package dir: one line per real run.
INSTALL = """\
import os
with open(os.path.join(os.environ["RECONCILER_ROOT"], "runs.log"), "a") as f:
    f.write("ran\\n")
print("installed")
"""


def _artifact(tmp_path: Path) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = INSTALL.encode()
        info = tarfile.TarInfo("install.py")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    content = buffer.getvalue()
    return content, hashlib.sha256(content).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "agent"


@pytest.fixture
def action(root: Path, tmp_path: Path) -> dict[str, Any]:
    content, sha = _artifact(tmp_path)
    (root / "cache").mkdir(parents=True)
    (root / "cache" / sha).write_bytes(content)
    return {
        "operationId": "op-0001",
        "job": "install-app",
        "action": "install",
        "package": {"name": "app", "version": "1.0"},
        "previousVersion": None,
        "artifact": {"sha256": sha, "size": len(content), "format": "tar"},
        "installer": {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                      "detect": [], "timeoutSeconds": 60},
    }


def agent_at(root: Path) -> Agent:
    """A fresh agent process on the same root, as after a restart."""
    return Agent("pc-001", NO_RELAY, root, {}, {}, insecure_http=True)


def runs(root: Path) -> int:
    log = root / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_finished_operation_is_answered_from_the_journal(root: Path, action: dict[str, Any]) -> None:
    agent = agent_at(root)
    first = agent.run_action(action)
    assert first is not None and first["status"] == "succeeded" and first["message"] == "installed"
    assert runs(root) == 1
    assert agent.run_action(action) == first
    assert agent_at(root).run_action(action) == first  # also after a restart
    assert runs(root) == 1


def test_repeated_operation_requeues_its_result(root: Path, action: dict[str, Any]) -> None:
    agent = agent_at(root)
    result = agent.run_action(action)
    agent.journal.acknowledge(["op-0001"])
    assert agent.journal.pending_results() == []
    agent.run_action(action)  # the relay lost our report and asks again
    assert agent_at(root).journal.pending_results() == [result]
    assert runs(root) == 1


def test_started_but_unfinished_operation_runs_again(root: Path, action: dict[str, Any]) -> None:
    # a kill -9 after the journal said "started" and before the result was written
    Journal(root / "journal").start("op-0001", action)
    agent = agent_at(root)
    assert agent.journal.get("op-0001").state == STARTED  # type: ignore[union-attr]
    result = agent.run_action(action)
    assert result is not None and result["status"] == "succeeded"
    assert runs(root) == 1
    assert agent_at(root).journal.get("op-0001").state == FINISHED  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape", "finished-without-result"])
def test_damaged_journal_file_is_quarantined_and_operation_runs(damage: str, root: Path,
                                                                action: dict[str, Any]) -> None:
    journal = Journal(root / "journal")
    journal.start("op-0001", action)
    path = journal.path_for("op-0001")
    text = path.read_text()
    path.write_text({
        "garbage": "\x00\xff not json at all",
        "truncated": text[: len(text) // 2],
        "wrong-shape": "[1, 2, 3]",
        "finished-without-result": json.dumps({**json.loads(text), "state": "finished"}),
    }[damage])
    agent = agent_at(root)
    assert agent.journal.get("op-0001") is None
    assert path.with_name(path.name + ".corrupt").exists()
    result = agent.run_action(action)
    assert result is not None and result["status"] == "succeeded"
    assert runs(root) == 1
    assert json.loads(path.read_text())["state"] == "finished"


def test_leftover_temp_file_from_interrupted_write_is_ignored(root: Path, action: dict[str, Any]) -> None:
    journal_dir = root / "journal"
    journal_dir.mkdir(parents=True)
    (journal_dir / ".abc.json.tmp-123-deadbeef").write_text('{"operationId": "op-0001", "sta')
    agent = agent_at(root)
    assert agent.journal.entries() == []
    assert list(journal_dir.iterdir()) == []
    agent.run_action(action)
    assert runs(root) == 1


def test_failed_operation_is_recorded_and_not_retried_by_the_agent(root: Path, action: dict[str, Any]) -> None:
    broken = {**action, "operationId": "op-0002", "installer": {**action["installer"], "install": ["${PYTHON}",
                                                                                                   "-c", "raise SystemExit(4)"]}}
    agent = agent_at(root)
    result = agent.run_action(broken)
    assert result is not None and result["status"] == "failed" and result["exitCode"] == 4
    assert result["message"].startswith("exit code 4: ")
    assert agent.run_action(broken) == result  # retrying is the relay's call, with a new operation


def test_action_without_operation_id_is_skipped(root: Path, action: dict[str, Any]) -> None:
    assert agent_at(root).run_action({k: v for k, v in action.items() if k != "operationId"}) is None
    assert runs(root) == 0


def test_invalid_action_fails_with_a_message(root: Path, action: dict[str, Any]) -> None:
    result = agent_at(root).run_action({**action, "action": "reboot"})
    assert result is not None and result["status"] == "failed"
    assert result["message"] == "unknown action 'reboot'" and result["exitCode"] is None


def test_pending_results_ordered_and_acknowledged(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    for op, at in (("b", "2026-01-01T00:00:02Z"), ("a", "2026-01-01T00:00:01Z")):
        journal.start(op, {"operationId": op})
        journal.finish(op, {"operationId": op, "status": "succeeded", "exitCode": 0, "message": "",
                            "finishedAt": at})
    assert [r["operationId"] for r in journal.pending_results()] == ["a", "b"]
    assert [r["operationId"] for r in journal.pending_results(limit=1)] == ["a"]
    journal.acknowledge(["a"])
    assert [r["operationId"] for r in Journal(tmp_path / "j").pending_results()] == ["b"]


def test_old_acknowledged_entries_are_pruned(tmp_path: Path) -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    journal = Journal(tmp_path / "j", now=lambda: start)
    for op in ("old-acked", "old-pending"):
        journal.start(op, {"operationId": op})
        journal.finish(op, {"operationId": op, "status": "succeeded", "exitCode": 0, "message": "",
                            "finishedAt": format_time(start)})
    journal.acknowledge(["old-acked"])
    later = Journal(tmp_path / "j", now=lambda: start + timedelta(days=31))
    assert later.get("old-acked") is None
    assert later.get("old-pending") is not None  # never acknowledged: still owed to the relay
