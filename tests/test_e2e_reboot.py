"""End to end: an installer that succeeds and asks for a reboot, through a real origin, HQ, relay and agent.

A bare origin with signed commits, ``reconciler hq --once`` signing the
manifest, a ``reconciler relay`` subprocess on 127.0.0.1 and an in-process
:class:`~reconciler.agent.agent.Agent` verifying every action with HQ's key.
The far edge is a stand-in: the installers are sh scripts, and an installer
"asks for a reboot" by leaving a flag file that the test's agent turns into
``Outcome.reboot_required`` (what msiexec's exit code 3010 becomes); the
reboot command is a Python script that records its argv and whether an
installer was still running. The boot id is the agent's ``bootId`` fact
override, as ``--fact bootId=...`` gives it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import reconciler, wait_for
from test_e2e_relay import Cluster, command_installer, job, package, topology

from reconciler.agent.agent import Agent
from reconciler.agent.installers import Outcome

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="installer scripts are sh"),
]

# Writes a marker while it runs; "asks for a reboot" with a flag file the agent below reads.
INSTALL = """\
#!/bin/sh
touch "$RECONCILER_ROOT/installing"
echo "installing $RECONCILER_PACKAGE_NAME"
touch "$RECONCILER_ROOT/installed-$RECONCILER_PACKAGE_NAME"
touch "$RECONCILER_ROOT/reboot-required-$RECONCILER_PACKAGE_NAME"
rm "$RECONCILER_ROOT/installing"
"""

# The reboot command's stand-in: records its argv, and what the client looked like when it ran.
RECORD_REBOOT = """\
import json, os, sys
out, root = sys.argv[1], sys.argv[2]
with open(out, "a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": sys.argv[3:], "installing": os.path.exists(os.path.join(root, "installing")),
                        "installed": sorted(n for n in os.listdir(root) if n.startswith("installed-"))}) + "\\n")
"""


class RebootingAgent(Agent):
    """An agent whose installers can say "succeeded, reboot required" (the flag file INSTALL leaves)."""

    def _execute(self, action: Mapping[str, Any]) -> Outcome:
        outcome = super()._execute(action)
        package = action.get("package")
        flag = self.layout.root / f"reboot-required-{package['name'] if isinstance(package, dict) else ''}"
        if flag.exists():
            flag.unlink()
            return dataclasses.replace(outcome, reboot_required=True)
        return outcome


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


def _hq_pass(cluster: Cluster) -> None:
    reconciler("hq", "--origin", cluster.origin.url, "--workdir", str(cluster.hq), *cluster.origin.hq_trust_args(),
               "--once", timeout=120)


def _hq_job(cluster: Cluster, name: str) -> dict[str, Any]:
    return yaml.safe_load(cluster.origin.read("status/hq", f"jobs/{name}.yaml") or b"{}") or {}


def _status_json(cluster: Cluster) -> dict[str, Any]:
    proc = reconciler("status", "--origin", cluster.origin.url, "--format", "json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return {j["name"]: j for j in json.loads(proc.stdout)["jobs"]}


def _reboots(relay_workdir: Path, client: str) -> list[tuple[str, str | None, float | None]]:
    db = sqlite3.connect(relay_workdir / "relay.sqlite3")
    try:
        return db.execute("SELECT job, reboot_boot_id, reboot_cleared_at FROM operations WHERE client = ? AND "
                          "reboot_required = 1 ORDER BY job", (client,)).fetchall()
    finally:
        db.close()


def test_reboot_required_counts_until_the_client_reports_a_new_boot_id(cluster: Cluster) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/tool/install.sh": INSTALL,
        "artifacts/other/install.sh": INSTALL,
        "packages/tool-1.0.yaml": package("tool", "1.0", "{path: artifacts/tool}", command_installer(),
                                          extra="  reboot: ifRequired\n"),
        "packages/other-1.0.yaml": package("other", "1.0", "{path: artifacts/other}", command_installer()),
        "jobs/install-tool.yaml": job("install-tool", "tool", "1.0", "relay-a"),
        "jobs/install-other.yaml": job("install-other", "other", "1.0", "relay-a"),
    })
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    root = cluster.base / "clients" / "pc-1"
    record = cluster.base / "reboots.jsonl"
    script = cluster.base / "record-reboot.py"
    script.write_text(RECORD_REBOOT, encoding="utf-8")
    reboot_command = [sys.executable, str(script), str(record), str(root), "{packages}"]

    def agent(boot: str) -> Agent:
        return RebootingAgent("pc-1", relay.url, root, fact_overrides={"bootId": boot},
                              enroll_secret=relay.enroll_secret, trust_keys=cluster.origin.trust_keys(),
                              insecure_http=True, reboot_command=reboot_command)

    # Boot 1: both installers succeed and ask for a reboot; only tool's package allows the agent to reboot.
    assert agent("boot-1").run_once() == 0
    rows = {name: cluster.wait_rows("relay-a", name, {"pc-1": "Succeeded"})["pc-1"]
            for name in ("install-tool", "install-other")}
    assert {name: (r["reason"], r["message"]) for name, r in rows.items()} == {
        "install-tool": ("rebootRequired", "reboot required"), "install-other": ("rebootRequired", "reboot required")}
    # The reboot command ran once, after both installers had finished, for the package that allows it.
    [ran] = [json.loads(line) for line in record.read_text().splitlines()]
    assert ran == {"argv": ["tool"], "installing": False, "installed": ["installed-other", "installed-tool"]}
    assert _reboots(relay.workdir, "pc-1") == [("install-other", "boot-1", None), ("install-tool", "boot-1", None)]

    def relay_counts() -> dict[str, int]:
        relay_yaml = cluster.origin.relay_file("relay-a", "relay.yaml") or {}
        return {name: digest.get("rebootRequired", 0) for name, digest in relay_yaml.get("jobs", {}).items()}

    wait_for(lambda: relay_counts() == {"install-tool": 1, "install-other": 1}, 30, what="relay.yaml counts")
    assert cluster.origin.relay_file("relay-a", "jobs/install-tool.yaml")["rebootRequired"] == 1
    _hq_pass(cluster)
    assert _hq_job(cluster, "install-tool")["rebootRequired"] == 1
    assert _hq_job(cluster, "install-tool")["counts"]["Succeeded"] == 1
    assert _hq_job(cluster, "install-tool")["relays"][0]["rebootRequired"] == 1
    summary = (cluster.origin.read("status/hq", "summary.md") or b"").decode()
    assert summary.count("| 1 (1 waiting for a reboot) |") == 2, summary
    assert {name: j["rebootRequired"] for name, j in _status_json(cluster).items()} == {
        "install-tool": 1, "install-other": 1}
    text = reconciler("status", "--origin", cluster.origin.url, check=False).stdout
    assert "Succeeded, waiting for a reboot:\n  install-other  1 client\n  install-tool  1 client" in text, text

    # The same boot again: still waiting, and the reboot command does not run again.
    assert agent("boot-1").run_once() == 0
    assert _reboots(relay.workdir, "pc-1") == [("install-other", "boot-1", None), ("install-tool", "boot-1", None)]
    assert cluster.rows("relay-a", "install-tool")["pc-1"]["reason"] == "rebootRequired"
    assert len(record.read_text().splitlines()) == 1

    # Still in boot 1, the job moves to tool 2.0, whose installer asks again: the upgrade's own result
    # decides the row (waiting again), and the reboot command, which ran in this boot already, does not run.
    commit = cluster.accept({
        "artifacts/tool2/install.sh": INSTALL,
        "packages/tool-2.0.yaml": package("tool", "2.0", "{path: artifacts/tool2}", command_installer(),
                                          extra="  reboot: ifRequired\n"),
        "jobs/install-tool.yaml": job("install-tool", "tool", "2.0", "relay-a"),
    })
    cluster.at_commit(relay, commit)
    assert agent("boot-1").run_once() == 0
    upgraded = cluster.wait_rows("relay-a", "install-tool", {"pc-1": "Succeeded"})["pc-1"]
    wait_for(lambda: (r := cluster.rows("relay-a", "install-tool")["pc-1"])["installedVersion"] == "2.0" and r,
             30, what="tool 2.0 installed")
    assert cluster.rows("relay-a", "install-tool")["pc-1"]["reason"] == "rebootRequired", upgraded
    assert len(_reboots(relay.workdir, "pc-1")) == 3
    assert len(record.read_text().splitlines()) == 1, "the reboot command ran twice in one boot"

    # A new boot: the waits clear (and when is recorded), the rows are plain Succeeded, the counts go to 0.
    assert agent("boot-2").run_once() == 0
    assert [(job_, boot) for job_, boot, cleared in _reboots(relay.workdir, "pc-1") if cleared is not None] == [
        ("install-other", "boot-1"), ("install-tool", "boot-1"), ("install-tool", "boot-1")]

    def cleared() -> bool:
        rows = [cluster.rows("relay-a", name).get("pc-1", {}) for name in ("install-tool", "install-other")]
        return all((r.get("state"), r.get("reason"), r.get("message")) == ("Succeeded", "done", "") for r in rows)

    wait_for(cleared, 30, what="rows cleared after the reboot")
    wait_for(lambda: relay_counts() == {"install-tool": 0, "install-other": 0}, 30, what="relay.yaml counts at 0")
    assert "rebootRequired" not in cluster.origin.relay_file("relay-a", "jobs/install-tool.yaml")
    _hq_pass(cluster)
    assert "rebootRequired" not in _hq_job(cluster, "install-tool")
    summary = (cluster.origin.read("status/hq", "summary.md") or b"").decode()
    assert "waiting for a reboot" not in summary
    assert {name: j["rebootRequired"] for name, j in _status_json(cluster).items()} == {
        "install-tool": 0, "install-other": 0}
    assert len(record.read_text().splitlines()) == 1
    assert relay.stop() == 0, relay.output()
