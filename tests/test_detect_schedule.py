"""Detection on a schedule: a check-in reuses each package's last detection for ``--detect-interval`` seconds.

A real agent against the fake relay of ``test_agent_loop`` (a real HTTP
server on 127.0.0.1), with an injected monotonic clock: no test sleeps. The
packages' ``detect`` commands append a line to a file each time they run, so
the tests count real processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import FakeRelay, files_action, make_tar, relay  # noqa: F401

from reconciler.agent.agent import Agent, AgentConfigError
from reconciler.agent.detection import DEFAULT_DETECT_SECONDS, DetectionCache, inventory

COUNT = "import os; open(os.path.join(os.environ['RECONCILER_ROOT'], 'detect.log'), 'a').write('x\\n')"
# present while ${ROOT}/present exists; counts its runs either way
CHECK = COUNT + "; raise SystemExit(0 if os.path.exists(os.path.join(os.environ['RECONCILER_ROOT'], 'present')) else 1)"
INSTALL = "import os; open(os.path.join(os.environ['RECONCILER_ROOT'], 'present'), 'w').write('1.0\\n')"
# a repair that breaks the package and fails: the agent changed the machine, so it must ask again
BREAK = "import os; os.remove(os.path.join(os.environ['RECONCILER_ROOT'], 'present')); raise SystemExit(3)"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def command_action(relay: FakeRelay, op: str, kind: str, script: str = INSTALL) -> dict[str, Any]:
    """A ``command`` package whose presence is asked by a counting ``detect`` argv (``kind="argv"``) or by a
    counting ``spec.detect`` command rule (``kind="rule"``)."""
    content, sha = make_tar({"install.py": script})
    relay.artifacts[sha] = content
    action = files_action(op, sha, len(content), name="app")
    installer: dict[str, Any] = {"type": "command", "install": ["${PYTHON}", "install.py"],
                                 "uninstall": ["${PYTHON}", "-c", "pass"], "detect": [], "timeoutSeconds": 60}
    if kind == "argv":
        installer["detect"] = ["${PYTHON}", "-c", CHECK]
    else:
        installer["detection"] = {"command": ["${PYTHON}", "-c", CHECK]}
    action["installer"] = installer
    return action


def runs(root: Path) -> int:
    log = root / "detect.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def inventory_sent(relay: FakeRelay) -> list[dict[str, str]]:
    return list(relay.checkins[-1]["body"]["inventory"])


APP = [{"name": "app", "version": "1.0"}]


@pytest.mark.parametrize("kind", ["argv", "rule"])
def test_check_ins_within_the_interval_reuse_the_last_detection(relay: FakeRelay, tmp_path: Path,
                                                                 kind: str) -> None:
    root, clock = tmp_path / "root", Clock()
    relay.replies.append([command_action(relay, "op-1", kind)])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock)
    agent.step()  # installs; a rule is asked before and right after the install, as always
    after_install = runs(root)
    assert after_install == (2 if kind == "rule" else 0)  # a rule: the pre-flight and the check after
    agent.step()  # the first check-in after the action asks, whatever the interval
    assert runs(root) == after_install + 1 and inventory_sent(relay) == APP
    for _ in range(5):
        clock.now += DEFAULT_DETECT_SECONDS / 6
        agent.step()
        assert inventory_sent(relay) == APP
    assert runs(root) == after_install + 1, "asked again within the interval"
    clock.now += DEFAULT_DETECT_SECONDS / 6  # the interval is over
    agent.step()
    assert runs(root) == after_install + 2 and inventory_sent(relay) == APP
    agent.step()
    assert runs(root) == after_install + 2


def test_an_action_for_the_package_asks_again_at_the_next_check_in(relay: FakeRelay, tmp_path: Path) -> None:
    root, clock = tmp_path / "root", Clock()
    install = command_action(relay, "op-1", "argv")
    install["installer"]["uninstall"] = ["${PYTHON}", "-c", BREAK]
    relay.replies.append([install])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock)
    agent.step()
    agent.step()
    agent.step()
    assert runs(root) == 1 and inventory_sent(relay) == APP
    # within the interval, an uninstall whose command removes the software and then fails: the receipt
    # and the rule stay as they were, but the agent ran something for the package, so it asks again
    relay.replies.append([{"operationId": "op-2", "job": "remove-app", "action": "uninstall",
                           "package": {"name": "app", "version": None}, "previousVersion": None,
                           "artifact": None, "installer": None}])
    agent.step()
    assert (root / "receipts" / "app.json").exists()
    agent.step()
    body = relay.checkins[-1]["body"]
    assert [r["status"] for r in body["results"]] == ["failed"]
    assert runs(root) == 2 and body["inventory"] == [], "the cached answer outlived an action that changed it"
    # the reinstall the plan sends puts it back; the check-in after it sees that at once
    relay.replies.append([command_action(relay, "op-3", "argv")])
    agent.step()
    agent.step()
    assert runs(root) == 3 and inventory_sent(relay) == APP
    assert clock.now == 1000.0  # all of it within one interval


def test_detect_interval_zero_asks_at_every_check_in(relay: FakeRelay, tmp_path: Path) -> None:
    root, clock = tmp_path / "root", Clock()
    relay.replies.append([command_action(relay, "op-1", "argv")])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock, detect_seconds=0)
    agent.step()
    for n in range(1, 5):
        agent.step()
        assert runs(root) == n and inventory_sent(relay) == APP
    (root / "present").unlink()  # removed by hand: the very next check-in says so
    agent.step()
    assert runs(root) == 5 and inventory_sent(relay) == []


def test_a_change_by_hand_is_seen_at_the_first_check_in_after_the_interval(relay: FakeRelay,
                                                                           tmp_path: Path) -> None:
    root, clock = tmp_path / "root", Clock()
    relay.replies.append([command_action(relay, "op-1", "argv")])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock, detect_seconds=120)
    agent.step()
    agent.step()
    (root / "present").unlink()
    clock.now += 119
    agent.step()
    assert inventory_sent(relay) == APP  # the last detection stands ...
    clock.now += 1
    agent.step()
    assert inventory_sent(relay) == []  # ... for one interval at most


def test_a_drifted_files_package_is_found_after_the_interval_only(relay: FakeRelay, tmp_path: Path) -> None:
    """The stat-signature check of a ``files`` package is detection too: it follows --detect-interval."""
    root, clock = tmp_path / "root", Clock()
    data, sha = make_tar({"notes.txt": "original\n"})
    relay.artifacts[sha] = data
    relay.replies.append([files_action("op-1", sha, len(data))])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock, detect_seconds=300)
    agent.step()
    agent.step()
    notes = [{"name": "notes", "version": "1.0"}]
    assert inventory_sent(relay) == notes
    index = root / "content" / "notes.json"
    before = index.stat().st_mtime_ns
    (root / "packages" / "notes" / "1.0" / "notes.txt").write_text("Original\n")  # same size, new content
    clock.now += 299
    agent.step()
    assert inventory_sent(relay) == notes
    clock.now += 1
    agent.step()
    assert inventory_sent(relay) == []
    assert index.stat().st_mtime_ns == before  # a drifted tree's index is never rewritten


def test_a_restarted_agent_asks_again(relay: FakeRelay, tmp_path: Path) -> None:
    root, clock = tmp_path / "root", Clock()
    relay.replies.append([command_action(relay, "op-1", "argv")])
    agent = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock)
    agent.step()
    agent.step()
    agent.step()
    assert runs(root) == 1
    again = Agent("pc-1", relay.url, root, insecure_http=True, monotonic=clock)  # nothing of the cache on disk
    again.step()
    assert runs(root) == 2 and inventory_sent(relay) == APP


def test_a_rewritten_receipt_is_asked_again(tmp_path: Path) -> None:
    """The cache answers only for the receipt and rule it was asked with (here: the same process, no agent)."""
    from reconciler.agent.detection import remember
    from reconciler.agent.installers import InstallerSpec, Layout

    layout = Layout(tmp_path / "root")
    layout.create()
    clock = Clock()
    cache = DetectionCache(600, clock)
    rule = {"file": "${ROOT}/VERSION", "versionPattern": r"v=(\S+)"}
    remember(layout, "app", "1.0", InstallerSpec("files", detection=rule))
    (layout.root / "VERSION").write_text("v=1.0\n")
    assert inventory(layout, cache=cache) == [{"name": "app", "version": "1.0", "source": "detected"}]
    (layout.root / "VERSION").write_text("v=2.0\n")
    assert inventory(layout, cache=cache) == [{"name": "app", "version": "1.0", "source": "detected"}]
    assert cache.asked == 1
    remember(layout, "app", "2.0", InstallerSpec("files", detection=rule))  # a new rule: asked at once
    assert inventory(layout, cache=cache) == [{"name": "app", "version": "2.0", "source": "detected"}]
    assert cache.asked == 2


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 7 * 86400.0 + 1, True, "600"])
def test_a_bad_detect_interval_is_refused(tmp_path: Path, value: Any) -> None:
    with pytest.raises(AgentConfigError, match="--detect-interval"):
        Agent("pc-1", "http://127.0.0.1:1", tmp_path, insecure_http=True, detect_seconds=value)


@pytest.mark.parametrize("text", ["-5", "nan", "inf", "1e300", "ten"])
def test_the_command_line_refuses_a_bad_detect_interval(tmp_path: Path, text: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "reconciler", "agent", "--id", "pc-1", "--relay",
                           "http://127.0.0.1:1", "--insecure-http", "--root", str(tmp_path / "root"),
                           "--insecure-unsigned-actions", "--once", "--detect-interval", text],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--detect-interval" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "root").exists()


def test_the_command_line_takes_zero_and_a_fraction() -> None:
    from reconciler.cli import build_parser

    for text, value in (("0", 0.0), ("0.5", 0.5), ("604800", 604800.0)):
        args = build_parser().parse_args(["agent", "--id", "pc-1", "--relay", "http://x", "--root", "r",
                                          "--detect-interval", text])
        assert args.detect_interval == value
