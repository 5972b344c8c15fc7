"""An action with ``dependsOn`` runs only on a client whose confirmed inventory meets it.

Real agents against the fake relay of ``test_agent_loop.py``, with command
installers that append their name to ``order.log`` in the agent root, so a
run that must not happen is visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_agent_loop import FakeRelay, files_action, make_tar, relay, results_of  # noqa: F401

from reconciler.agent.agent import Agent

# Appends the package name to order.log, then exits with the code given as argv[1].
INSTALL = """\
import os, sys
with open(os.path.join(os.environ["RECONCILER_ROOT"], "order.log"), "a") as log:
    log.write(os.environ["RECONCILER_PACKAGE_NAME"] + " " + os.environ["RECONCILER_PACKAGE_VERSION"] + "\\n")
print("installed", os.environ["RECONCILER_PACKAGE_NAME"])
raise SystemExit(int(sys.argv[1]))
"""


def command_action(relay: FakeRelay, op: str, name: str, version: str = "2.0", exit_code: int = 0,
                   depends_on: Any = None, detect: list[str] | None = None) -> dict[str, Any]:
    content, sha = make_tar({"install.py": INSTALL})
    relay.artifacts[sha] = content
    action = files_action(op, sha, len(content), name=name, version=version)
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py", str(exit_code)],
                           "uninstall": [], "detect": detect or [], "timeoutSeconds": 60}
    if depends_on is not None:
        action["dependsOn"] = depends_on
    return action


def order(root: Path) -> list[str]:
    path = root / "order.log"
    return path.read_text().splitlines() if path.exists() else []


def run_reply(relay: FakeRelay, root: Path, *actions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One check-in whose reply carries ``actions``, and the next, which reports their results."""
    relay.replies.append(list(actions))
    agent = Agent("pc-dep", relay.url, root, {}, {}, insecure_http=True)
    agent.step()
    agent.step()
    return results_of(relay.checkins[-1]["body"])


RUNTIME_2 = [{"name": "runtime", "minVersion": "2.0"}]


def test_a_failed_dependency_stops_its_dependent_in_the_same_reply(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    results = run_reply(relay, root, command_action(relay, "op-rt", "runtime", exit_code=1),
                        command_action(relay, "op-addon", "addon", depends_on=RUNTIME_2))
    assert results["op-rt"]["status"] == "failed" and results["op-rt"]["exitCode"] == 1
    addon = results["op-addon"]
    assert (addon["status"], addon["exitCode"], addon["message"]) == (
        "failed", None, "not run: dependency runtime (>= 2.0) is not installed")
    assert order(root) == ["runtime 2.0"]  # the addon's installer never ran
    assert not (root / "packages" / "addon").exists()
    assert relay.checkins[-1]["body"]["inventory"] == []


def test_a_dependency_installed_first_in_the_same_reply_lets_its_dependent_run(relay: FakeRelay,
                                                                               tmp_path: Path) -> None:
    root = tmp_path / "root"
    results = run_reply(relay, root, command_action(relay, "op-rt", "runtime"),
                        command_action(relay, "op-addon", "addon", depends_on=RUNTIME_2))
    assert {op: r["status"] for op, r in results.items()} == {"op-rt": "succeeded", "op-addon": "succeeded"}
    assert order(root) == ["runtime 2.0", "addon 2.0"]
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "addon", "version": "2.0"},
                                                       {"name": "runtime", "version": "2.0"}]


def test_an_older_dependency_does_not_do(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_reply(relay, root, command_action(relay, "op-rt", "runtime", version="1.10"))
    results = run_reply(relay, root, command_action(relay, "op-addon", "addon",
                                                    depends_on=[{"name": "runtime", "minVersion": "1.9"}]),
                        command_action(relay, "op-addon2", "addon2", depends_on=RUNTIME_2))
    assert results["op-addon"]["status"] == "succeeded"  # 1.10 is newer than 1.9
    assert results["op-addon2"]["message"] == "not run: dependency runtime (>= 2.0) is not installed (1.10 is)"
    assert order(root) == ["runtime 1.10", "addon 2.0"]


def test_a_dependency_that_detect_does_not_confirm_does_not_do(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    absent = ["${PYTHON}", "-c", "raise SystemExit(1)"]  # its receipt is there, the software is not
    run_reply(relay, root, command_action(relay, "op-rt", "runtime", detect=absent))
    assert (root / "receipts" / "runtime.json").exists()
    results = run_reply(relay, root, command_action(relay, "op-addon", "addon", depends_on=[{"name": "runtime"}]))
    assert results["op-addon"]["message"] == "not run: dependency runtime is not installed"
    assert order(root) == ["runtime 2.0"]


@pytest.mark.parametrize("depends_on, message", [
    ({"name": "runtime"}, "invalid dependsOn: must be a list"),
    ([{"name": f"dep{i}"} for i in range(65)], "invalid dependsOn: at most 64 dependencies, got 65"),
    (["runtime"], "invalid dependsOn[0]: must be an object"),
    ([{"minVersion": "1.0"}], "invalid dependsOn[0].name: None is not a software name"),
    ([{"name": "Runtime"}], "invalid dependsOn[0].name: 'Runtime' is not a software name"),
    ([{"name": "runtime\n"}], "invalid dependsOn[0].name: 'runtime\\n' is not a software name"),
    ([{"name": "runtime", "minVersion": "2.0\n"}], "invalid dependsOn[0].minVersion: '2.0\\n' is not a version"),
    ([{"name": "runtime", "minVersion": 2}], "invalid dependsOn[0].minVersion: 2 is not a version"),
    ([{"name": "runtime", "maxVersion": "3"}], "invalid dependsOn[0]: unknown key 'maxVersion'"),
])
def test_a_malformed_depends_on_fails_the_action(depends_on: Any, message: str, relay: FakeRelay,
                                                 tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_reply(relay, root, command_action(relay, "op-rt", "runtime"))
    results = run_reply(relay, root, command_action(relay, "op-addon", "addon", depends_on=depends_on))
    assert (results["op-addon"]["status"], results["op-addon"]["message"]) == ("failed", message)
    assert order(root) == ["runtime 2.0"]


def test_sixty_four_met_dependencies_and_a_null_min_version_are_accepted(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_reply(relay, root, command_action(relay, "op-rt", "runtime"))
    results = run_reply(relay, root, command_action(relay, "op-addon", "addon",
                                                    depends_on=[{"name": "runtime", "minVersion": None}] * 64))
    assert results["op-addon"]["status"] == "succeeded"
