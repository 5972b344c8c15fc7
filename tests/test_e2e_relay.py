"""End to end: a real bare origin, ``reconciler hq``, ``reconciler relay`` processes and agents on 127.0.0.1.

Each test commits specs with git, lets HQ accept them (``hq --once``), runs
relays as subprocesses on ephemeral ports and agents either in-process
(:class:`reconciler.agent.agent.Agent`) or as ``reconciler agent``
subprocesses, and checks the status files the relays publish to the origin.
Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_helpers import (
    FileServer,
    Origin,
    RelayProcess,
    assert_json_error,
    env,
    malformed_requests,
    reconciler,
    send_raw,
    signing_keys,
    wait_for,
)

from reconciler.agent.agent import Agent
from reconciler.webhook import sign

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="installer scripts are sh; kill -9 uses process groups"),
]

# ------------------------------------------------------------------ spec builders


def topology(*relays: tuple[str, str]) -> str:
    lines = "\n".join(f"    - {{name: {name}, parent: {parent}}}" for name, parent in relays)
    return f"""\
apiVersion: reconciler/v1
kind: Topology
metadata: {{name: test}}
spec:
  headquarters: hq-x
  relays:
{lines}
"""


def package(name: str, version: str, artifact: str, installer: str = "{type: files}", extra: str = "") -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: {name}-{version}}}
spec:
  name: {name}
  version: "{version}"
  artifact: {artifact}
  installer: {installer}
{extra}"""


def command_installer(timeout: int = 60) -> str:
    return ('{type: command, install: [sh, install.sh], uninstall: [sh, -c, "true"], '
            f"timeoutSeconds: {timeout}}}")


def job(name: str, pkg: str, version: str | None, destinations: str, *, job_type: str = "install",
        extra: str = "") -> str:
    ver = f', version: "{version}"' if version else ""
    return f"""\
apiVersion: reconciler/v1
kind: Job
metadata: {{name: {name}}}
spec:
  jobType: {job_type}
  package: {{name: {pkg}{ver}}}
  destinationType: allLowerClients
  destinations: [{destinations}]
{extra}"""


# ------------------------------------------------------------------ fixtures


class Cluster:
    """An origin, an HQ workdir, and the relays a test starts (all stopped at teardown)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.hq = base / "hq"
        self.relays: list[RelayProcess] = []

    def accept(self, files: dict[str, Any], message: str = "specs") -> str:
        commit = self.origin.commit(files, message)
        accepted = self.origin.accept(self.hq)
        assert accepted == commit, f"HQ did not accept {commit}: {self.origin.read('status/hq', 'validation.yaml')!r}"
        return commit

    def relay(self, name: str, **kwargs: Any) -> RelayProcess:
        relay = RelayProcess(name, self.origin.url, self.base / name, **kwargs)
        self.relays.append(relay)
        return relay.start()

    def at_commit(self, relay: RelayProcess, commit: str, timeout: float = 30) -> None:
        """Wait until the relay serves ``commit`` and has published status for it."""
        wait_for(lambda: relay.health()["acceptedCommit"] == commit, timeout, what=f"{relay.name} at {commit[:12]}")
        wait_for(lambda: (self.origin.relay_file(relay.name, "relay.yaml") or {}).get("observedCommit") == commit,
                 timeout, what=f"{relay.name} status for {commit[:12]}")

    def agent(self, client: str, relay: RelayProcess, **kwargs: Any) -> Agent:
        kwargs.setdefault("enroll_secret", relay.enroll_secret)
        kwargs.setdefault("trust_keys", self.origin.trust_keys())
        return Agent(client, relay.url, self.base / "clients" / client, **kwargs, insecure_http=True)

    def rows(self, relay: str, job_name: str) -> dict[str, dict[str, Any]]:
        return self.origin.job_rows(relay, job_name)

    def wait_rows(self, relay: str, job_name: str, expected: dict[str, str], timeout: float = 30) -> dict[str, Any]:
        """Wait until the job's rows on ``relay`` have exactly these clients in these states."""
        def check() -> dict[str, Any] | None:
            rows = self.rows(relay, job_name)
            return rows if {c: r["state"] for c, r in rows.items()} == expected else None
        try:
            return wait_for(check, timeout, what=f"{job_name} on {relay} to be {expected}")
        except AssertionError:
            raise AssertionError(f"{job_name} on {relay}: wanted {expected}, have {self.rows(relay, job_name)}")

    def stop(self) -> None:
        for relay in self.relays:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.proc.kill()
                relay.proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


def receipts(root: Path) -> set[str]:
    directory = root / "receipts"
    return {p.stem for p in directory.glob("*.json")} if directory.is_dir() else set()


def marker_lines(root: Path) -> int:
    marker = root / "marker"
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def relay_operations(relay: RelayProcess, client: str, job_name: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(relay.workdir / "relay.sqlite3")
    try:
        return db.execute("SELECT operation_id, outcome FROM operations WHERE client = ? AND job = ? "
                          "ORDER BY dispatched_at", (client, job_name)).fetchall()
    finally:
        db.close()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def crash_agent(proc: subprocess.Popen[str]) -> None:
    """kill -9 an agent together with the installer it is running (its own session), like a machine crash."""
    installers = children_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    for child in installers:
        try:
            os.killpg(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def agent_process(client: str, relay_url: str, root: Path, *args: str) -> subprocess.Popen[str]:
    """A continuously running ``reconciler agent`` in its own session."""
    log = open(root.parent / f"{client}.log", "a", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "agent", "--id", client, "--relay", relay_url, "--insecure-http",
                             "--root", str(root), "--poll-interval", "0.3",
                             "--trust-key", str(signing_keys(root.parent.parent / "keys")[1]), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env(), start_new_session=True)
    log.close()
    return proc


# ------------------------------------------------------------------ tests


def test_all_lower_clients_reach_nested_sites_but_not_siblings(cluster: Cluster) -> None:
    """A job for the regional relay reaches its own clients and the nested site's, not a sibling site's;
    the far origin serves the URL artifact once (the nested site pulls it from its parent relay)."""
    payload = b"#!/bin/sh\necho tool\n"
    files = FileServer({"/downloads/tool.sh": payload})
    try:
        commit = cluster.accept({
            "topology.yaml": topology(("region", "hq-x"), ("site-a", "region"), ("other", "hq-x")),
            "packages/tool-1.0.yaml": package(
                "tool", "1.0", f'{{url: "{files.url}/downloads/tool.sh", sha256: "{hashlib.sha256(payload).hexdigest()}"}}'),
            "jobs/install-tool.yaml": job("install-tool", "tool", "1.0", "region"),
        })
        region = cluster.relay("region")
        cluster.at_commit(region, commit)
        site = cluster.relay("site-a", parent_url=region.url)
        other = cluster.relay("other")
        cluster.at_commit(site, commit)
        cluster.at_commit(other, commit)

        for client, relay in (("c-region", region), ("c-site", site), ("c-other", other)):
            assert cluster.agent(client, relay).run_once() == 0

        cluster.wait_rows("region", "install-tool", {"c-region": "Succeeded"})
        cluster.wait_rows("site-a", "install-tool", {"c-site": "Succeeded"})
        assert cluster.origin.relay_file("other", "jobs/install-tool.yaml") is None
        assert receipts(cluster.base / "clients" / "c-site") == {"tool"}
        assert receipts(cluster.base / "clients" / "c-other") == set()
        installed = cluster.base / "clients" / "c-site" / "packages" / "tool" / "1.0" / "tool.sh"
        assert installed.read_bytes() == payload
        assert files.hits == {"/downloads/tool.sh": 1}, "the nested relay went to the origin itself"

        # HQ's aggregate sees both relays of the subtree.
        def aggregated() -> dict[str, Any] | None:
            reconciler("hq", "--origin", cluster.origin.url, "--workdir", str(cluster.hq),
                       *cluster.origin.hq_trust_args(), "--once")
            import yaml
            doc = yaml.safe_load(cluster.origin.read("status/hq", "jobs/install-tool.yaml") or b"{}")
            return doc if doc.get("counts", {}).get("Succeeded") == 2 and doc.get("state") == "Completed" else None
        wait_for(aggregated, 30, interval=0.2, what="HQ's aggregate of install-tool")
    finally:
        files.close()
    for relay in cluster.relays:
        assert relay.stop() == 0, relay.output()


def test_requirements_conflict_uninstall_and_drift(cluster: Cluster) -> None:
    specs = {
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/app/app.txt": "app 1.0\n",
        "artifacts/big/big.txt": "big\n",
        "artifacts/tool/tool.txt": "tool\n",
        "artifacts/legacy/legacy.txt": "legacy\n",
        "packages/app-1.0.yaml": package("app", "1.0", "{path: artifacts/app}"),
        "packages/big-1.0.yaml": package("big", "1.0", "{path: artifacts/big}",
                                         extra="  requirements: {minFreeDiskMB: 50000}\n"),
        "packages/tool-2.0.yaml": package("tool", "2.0", "{path: artifacts/tool}"),
        "packages/tool-3.0.yaml": package("tool", "3.0", "{path: artifacts/tool}"),
        "packages/legacy-1.0.yaml": package("legacy", "1.0", "{path: artifacts/legacy}"),
        "jobs/install-app.yaml": job("install-app", "app", "1.0", "relay-a"),
        "jobs/install-big.yaml": job("install-big", "big", "1.0", "relay-a"),
        "jobs/install-tool-2.yaml": job("install-tool-2", "tool", "2.0", "relay-a"),
        "jobs/install-tool-3.yaml": job("install-tool-3", "tool", "3.0", "relay-a"),
        "jobs/install-legacy.yaml": job("install-legacy", "legacy", "1.0", "relay-a"),
    }
    commit = cluster.accept(specs)
    # This relay renders its status in the helper process it uses for large fleets.
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    small, big = cluster.base / "clients" / "pc-small", cluster.base / "clients" / "pc-big"

    def run_agents() -> None:
        for client, root, disk in (("pc-small", small, "100"), ("pc-big", big, "100000")):
            reconciler("agent", "--id", client, "--relay", relay.url, "--insecure-http", "--root", str(root),
                       "--trust-key", str(cluster.origin.trust_key), "--fact", f"freeDiskMB={disk}", "--enroll-secret-file", str(relay.enroll_secret_file), "--once")

    run_agents()
    both = {"pc-small": "Succeeded", "pc-big": "Succeeded"}
    cluster.wait_rows("relay-a", "install-app", both)
    cluster.wait_rows("relay-a", "install-legacy", both)
    rows = cluster.wait_rows("relay-a", "install-big", {"pc-small": "Skipped", "pc-big": "Succeeded"})
    assert "50000" in rows["pc-small"]["message"] and "100" in rows["pc-small"]["message"]
    conflict = {"pc-small": "Conflict", "pc-big": "Conflict"}
    assert "install-tool-3" in cluster.wait_rows("relay-a", "install-tool-2", conflict)["pc-big"]["message"]
    assert "install-tool-2" in cluster.wait_rows("relay-a", "install-tool-3", conflict)["pc-big"]["message"]
    assert receipts(small) == {"app", "legacy"} and receipts(big) == {"app", "big", "legacy"}

    # Drift: the app is removed behind the agent's back. Uninstall: the legacy job becomes an uninstall job.
    app_ops = relay_operations(relay, "pc-big", "install-app")
    (big / "receipts" / "app.json").unlink()
    import shutil
    shutil.rmtree(big / "packages" / "app")
    commit = cluster.accept({
        "jobs/install-legacy.yaml": None,
        "jobs/uninstall-legacy.yaml": job("uninstall-legacy", "legacy", None, "relay-a", job_type="uninstall"),
    })
    cluster.at_commit(relay, commit)
    run_agents()
    cluster.wait_rows("relay-a", "uninstall-legacy", both)
    cluster.wait_rows("relay-a", "install-app", both)
    assert receipts(small) == {"app"} and receipts(big) == {"app", "big"}
    assert (big / "packages" / "app" / "1.0" / "app.txt").read_text() == "app 1.0\n"
    new_ops = relay_operations(relay, "pc-big", "install-app")
    assert len(new_ops) == len(app_ops) + 1 and new_ops[-1][1] == "succeeded", "drift was not re-installed"
    assert cluster.origin.relay_file("relay-a", "jobs/install-legacy.yaml") is None
    assert relay.stop() == 0


FAILING_INSTALL = """\
#!/bin/sh
echo "run" >> "$RECONCILER_ROOT/marker"
if [ -f "$RECONCILER_ROOT/break-me" ]; then
  echo "cannot install: this machine is broken" >&2
  exit 3
fi
echo "installed"
"""

FIXED_INSTALL = """\
#!/bin/sh
echo "run" >> "$RECONCILER_ROOT/marker"
echo "installed (works around broken machines)"
"""


def test_failed_install_retries_then_fix_and_rerun_runs_only_failed_clients(cluster: Cluster) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/flaky/install.sh": FAILING_INSTALL,
        "packages/flaky-1.0.yaml": package("flaky", "1.0", "{path: artifacts/flaky}", command_installer()),
        "jobs/install-flaky.yaml": job("install-flaky", "flaky", "1.0", "relay-a",
                                       extra="  retry: {limit: 2, backoffSeconds: 0}\n"),
    })
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    roots = {c: cluster.base / "clients" / c for c in ("pc-1", "pc-2", "pc-3")}
    roots["pc-3"].mkdir(parents=True)
    (roots["pc-3"] / "break-me").write_text("yes\n")
    agents = {c: cluster.agent(c, relay) for c in roots}

    def run_all() -> None:
        for agent in agents.values():
            assert agent.run_once() == 0

    run_all()
    rows = cluster.wait_rows("relay-a", "install-flaky", {"pc-1": "Succeeded", "pc-2": "Succeeded", "pc-3": "Failed"})
    assert rows["pc-3"]["attempts"] == 2
    assert "cannot install: this machine is broken" in rows["pc-3"]["message"]
    assert [marker_lines(r) for r in roots.values()] == [1, 1, 2]
    relay_yaml = cluster.origin.relay_file("relay-a", "relay.yaml")
    assert relay_yaml["jobs"]["install-flaky"]["state"] == "Failed"

    # Failed stays failed: more check-ins run nothing.
    run_all()
    assert [marker_lines(r) for r in roots.values()] == [1, 1, 2]

    # One commit fixes the script inside the artifact (no package YAML changes) and raises rerun.
    commit = cluster.accept({
        "artifacts/flaky/install.sh": FIXED_INSTALL,
        "jobs/install-flaky.yaml": job("install-flaky", "flaky", "1.0", "relay-a",
                                       extra="  retry: {limit: 2, backoffSeconds: 0}\n  rerun: 1\n"),
    })
    cluster.at_commit(relay, commit)
    run_all()
    rows = cluster.wait_rows("relay-a", "install-flaky",
                             {"pc-1": "Succeeded", "pc-2": "Succeeded", "pc-3": "Succeeded"})
    assert [marker_lines(r) for r in roots.values()] == [1, 1, 3], "succeeded clients ran again"
    # Settled rows still say how many attempts their last operation took.
    assert [rows[c]["attempts"] for c in ("pc-1", "pc-2", "pc-3")] == [1, 1, 1]
    installed = roots["pc-3"] / "packages" / "flaky" / "1.0" / "install.sh"
    assert "works around" in installed.read_text()
    assert relay.stop() == 0


def test_a_scoped_rerun_committed_to_the_origin_re_runs_only_the_chosen_clients(cluster: Cluster) -> None:
    """``reconciler rerun --client`` in a clone, pushed: only that Failed client runs again; then
    ``--repair`` reinstalls a Succeeded client for real, and a plain rerun takes the one left."""
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/flaky/install.sh": FAILING_INSTALL,
        "packages/flaky-1.0.yaml": package("flaky", "1.0", "{path: artifacts/flaky}", command_installer()),
        "jobs/install-flaky.yaml": job("install-flaky", "flaky", "1.0", "relay-a",
                                       extra="  retry: {limit: 1, backoffSeconds: 0}\n"),
    })
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    roots = {c: cluster.base / "clients" / c for c in ("pc-1", "pc-2", "pc-3")}
    for broken in ("pc-2", "pc-3"):
        roots[broken].mkdir(parents=True)
        (roots[broken] / "break-me").write_text("yes\n")
    agents = {c: cluster.agent(c, relay) for c in roots}

    def run_all() -> None:
        for agent in agents.values():
            assert agent.run_once() == 0

    def rerun(*options: str) -> str:
        """The admin's pull request: ``reconciler rerun`` in a clone, committed, accepted by HQ."""
        reconciler("rerun", "install-flaky", *options, str(cluster.origin.work))
        return cluster.accept({}, f"rerun install-flaky {' '.join(options)}")

    run_all()
    cluster.wait_rows("relay-a", "install-flaky", {"pc-1": "Succeeded", "pc-2": "Failed", "pc-3": "Failed"})
    assert [marker_lines(r) for r in roots.values()] == [1, 1, 1]

    # Both broken machines are mended on site, but the rerun is scoped to pc-3. (A fix to the
    # package would be a new plan revision, which re-runs every Failed row whatever the scope.)
    for mended in ("pc-2", "pc-3"):
        (roots[mended] / "break-me").unlink()
    cluster.at_commit(relay, rerun("--client", "pc-3"))
    run_all()
    rows = cluster.wait_rows("relay-a", "install-flaky", {"pc-1": "Succeeded", "pc-2": "Failed", "pc-3": "Succeeded"})
    assert [marker_lines(r) for r in roots.values()] == [1, 1, 2], "only pc-3 ran again"
    assert "this machine is broken" in rows["pc-2"]["message"]

    # Repair: pc-1 has the package; it is installed again (its install command runs), once.
    receipt_before = (roots["pc-1"] / "receipts" / "flaky.json").read_text()
    cluster.at_commit(relay, rerun("--client", "pc-1", "--repair"))
    run_all()
    run_all()
    cluster.wait_rows("relay-a", "install-flaky", {"pc-1": "Succeeded", "pc-2": "Failed", "pc-3": "Succeeded"})
    assert [marker_lines(r) for r in roots.values()] == [2, 1, 2]
    receipt_after = (roots["pc-1"] / "receipts" / "flaky.json").read_text()
    operations = [op for op, _ in relay_operations(relay, "pc-1", "install-flaky")]
    assert len(operations) == 2 and operations[0] in receipt_before and operations[1] in receipt_after

    # A plain rerun removes the scope: the one Failed client left runs, no Succeeded one does.
    cluster.at_commit(relay, rerun())
    run_all()
    cluster.wait_rows("relay-a", "install-flaky", {"pc-1": "Succeeded", "pc-2": "Succeeded", "pc-3": "Succeeded"})
    assert [marker_lines(r) for r in roots.values()] == [2, 2, 2]
    assert relay.stop() == 0


ADDON_INSTALL = """\
#!/bin/sh
echo "addon" >> "$RECONCILER_ROOT/addon-ran"
"""


def test_a_dependent_is_never_installed_when_its_dependency_fails(cluster: Cluster) -> None:
    """One commit adds runtime and addon (dependsOn runtime); runtime's installer fails on pc-2."""
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/runtime/install.sh": FAILING_INSTALL,
        "artifacts/addon/install.sh": ADDON_INSTALL,
        "packages/runtime-2.0.yaml": package("runtime", "2.0", "{path: artifacts/runtime}", command_installer()),
        "packages/addon-1.0.yaml": package("addon", "1.0", "{path: artifacts/addon}", command_installer(),
                                           extra="  dependsOn: [{name: runtime, minVersion: \"2.0\"}]\n"),
        "jobs/install-runtime.yaml": job("install-runtime", "runtime", "2.0", "relay-a",
                                         extra="  retry: {limit: 2, backoffSeconds: 0}\n"),
        "jobs/install-addon.yaml": job("install-addon", "addon", "1.0", "relay-a"),
    })
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    roots = {c: cluster.base / "clients" / c for c in ("pc-1", "pc-2")}
    roots["pc-2"].mkdir(parents=True)
    (roots["pc-2"] / "break-me").write_text("yes\n")

    def settled() -> bool:
        # a round of check-ins (every retry, and a chance to hand out the addon), then the published rows
        for client in roots:
            assert cluster.agent(client, relay).run_once() == 0
        states = {job: {c: r["state"] for c, r in cluster.rows("relay-a", job).items()}
                  for job in ("install-runtime", "install-addon")}
        return states == {"install-runtime": {"pc-1": "Succeeded", "pc-2": "Failed"},
                          "install-addon": {"pc-1": "Succeeded", "pc-2": "Pending"}}

    wait_for(settled, 60, what="runtime Failed on pc-2 and the addon settled")
    rows = cluster.wait_rows("relay-a", "install-addon", {"pc-1": "Succeeded", "pc-2": "Pending"})
    assert rows["pc-2"]["message"] == "waiting for dependency runtime"
    assert not (roots["pc-2"] / "addon-ran").exists(), "the addon installer ran although runtime failed"
    assert receipts(roots["pc-2"]) == set()
    assert receipts(roots["pc-1"]) == {"runtime", "addon"}
    assert relay_operations(relay, "pc-2", "install-addon") == []
    assert relay.stop() == 0


SLOW_INSTALL = """\
#!/bin/sh
echo "start" >> "$RECONCILER_ROOT/started"
sleep 2
echo "done" >> "$RECONCILER_ROOT/marker"
"""


def test_kill_9_of_relay_and_agent_mid_install_converges_without_running_twice(cluster: Cluster) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/slow/install.sh": SLOW_INSTALL,
        "packages/slow-1.0.yaml": package("slow", "1.0", "{path: artifacts/slow}", command_installer(timeout=30)),
        "jobs/install-slow.yaml": job("install-slow", "slow", "1.0", "relay-a"),
    })
    relay = cluster.relay("relay-a", poll_seconds=0.3)
    cluster.at_commit(relay, commit)
    port = relay.url.rsplit(":", 1)[1]
    roots = {c: cluster.base / "clients" / c for c in ("pc-1", "pc-2")}
    for root in roots.values():
        root.mkdir(parents=True)
    enrolled = ("--enroll-secret-file", str(relay.enroll_secret_file))
    agents = {c: agent_process(c, relay.url, root, *enrolled) for c, root in roots.items()}
    try:
        # Both installs are running: kill -9 the relay, and pc-1's agent with its installer.
        wait_for(lambda: all((r / "started").exists() for r in roots.values()), 30, what="installs to start")
        relay.kill9()
        crash_agent(agents["pc-1"])
        dispatched = {c: relay_operations(relay, c, "install-slow") for c in roots}
        assert all(len(ops) == 1 and ops[0][1] == "dispatched" for ops in dispatched.values()), dispatched

        # pc-2 finishes while the relay is down and reports once it is back; pc-1 restarts.
        wait_for(lambda: marker_lines(roots["pc-2"]) == 1, 30, what="pc-2's install to finish")
        restarted = RelayProcess("relay-a", cluster.origin.url, relay.workdir, poll_seconds=0.3,
                                 listen=f"127.0.0.1:{port}")
        cluster.relays.append(restarted)
        restarted.start()
        agents["pc-1"] = agent_process("pc-1", restarted.url, roots["pc-1"], *enrolled)
        cluster.wait_rows("relay-a", "install-slow", {"pc-1": "Succeeded", "pc-2": "Succeeded"}, timeout=60)
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    # Each operation completed exactly once; the relay handed out the same operation again, never a new one.
    assert marker_lines(roots["pc-1"]) == 1 and marker_lines(roots["pc-2"]) == 1
    assert len((roots["pc-1"] / "started").read_text().splitlines()) == 2  # interrupted, then run to completion
    assert len((roots["pc-2"] / "started").read_text().splitlines()) == 1
    for client in roots:
        ops = relay_operations(restarted, client, "install-slow")
        assert ops == [(dispatched[client][0][0], "succeeded")], ops
    assert restarted.stop() == 0


def _evil_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("ok.txt", "../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    return buffer.getvalue()


def test_refused_artifacts_and_malformed_requests(cluster: Cluster) -> None:
    evil = _evil_tar()
    files = FileServer({"/tampered.msi": b"tampered bytes", "/evil.tar": evil})
    try:
        commit = cluster.accept({
            "topology.yaml": topology(("relay-a", "hq-x")),
            "artifacts/good/good.txt": "good\n",
            "packages/good-1.0.yaml": package("good", "1.0", "{path: artifacts/good}"),
            "packages/tampered-1.0.yaml": package(
                "tampered", "1.0",
                f'{{url: "{files.url}/tampered.msi", sha256: "{hashlib.sha256(b"original bytes").hexdigest()}"}}'),
            "packages/slip-1.0.yaml": package(
                "slip", "1.0", f'{{url: "{files.url}/evil.tar", sha256: "{hashlib.sha256(evil).hexdigest()}"}}'),
            "jobs/install-good.yaml": job("install-good", "good", "1.0", "relay-a"),
            "jobs/install-tampered.yaml": job("install-tampered", "tampered", "1.0", "relay-a"),
            "jobs/install-slip.yaml": job("install-slip", "slip", "1.0", "relay-a"),
        })
        relay = cluster.relay("relay-a")
        cluster.at_commit(relay, commit)
        root = cluster.base / "clients" / "pc-1"
        agent = cluster.agent("pc-1", relay)
        assert agent.run_once() == 0
        cluster.wait_rows("relay-a", "install-good", {"pc-1": "Succeeded"})
        tampered = cluster.wait_rows("relay-a", "install-tampered", {"pc-1": "Pending"})["pc-1"]
        slip = cluster.wait_rows("relay-a", "install-slip", {"pc-1": "Pending"})["pc-1"]
        assert "sha256 mismatch" in tampered["message"]
        assert (tampered["reason"], slip["reason"]) == ("waitingForArtifact", "waitingForArtifact")
        assert cluster.wait_rows("relay-a", "install-good", {"pc-1": "Succeeded"})["pc-1"]["reason"] == "done"
        assert "outside the package directory" in slip["message"]
        errors = " ".join(cluster.origin.relay_file("relay-a", "relay.yaml")["errors"])
        assert "sha256 mismatch" in errors and "refused" in errors and "outside the package directory" in errors
        assert receipts(root) == {"good"}
        assert not (cluster.base / "escaped.txt").exists() and not (root.parent / "escaped.txt").exists()

        # Malformed requests: each a 4xx with a JSON error; the relay keeps serving throughout.
        cases = malformed_requests("pc-new")
        assert len(cases) >= 30
        session = requests.Session()
        for label, method, path, headers, body, expected in cases:
            assert_json_error(send_raw(relay.url, method, path, headers, body, session), expected, label)
            if label.startswith("GET on"):
                assert relay.health()["ok"] is True
        assert relay.proc is not None and relay.proc.poll() is None
        step = agent.step()
        assert step.reached and step.status_code == 200
        fresh = cluster.agent("pc-new", relay)
        assert fresh.run_once() == 0 and receipts(cluster.base / "clients" / "pc-new") == {"good"}
        assert "Traceback" not in relay.output()
    finally:
        files.close()
    assert relay.stop() == 0


def test_relay_before_hq_accepts_then_follows_and_refuses_unknown_names(cluster: Cluster) -> None:
    specs = {
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/app/app.txt": "app\n",
        "packages/app-1.0.yaml": package("app", "1.0", "{path: artifacts/app}"),
        "jobs/install-app.yaml": job("install-app", "app", "1.0", "relay-a"),
    }
    commit = cluster.origin.commit(specs)
    relay = cluster.relay("relay-a")
    # No accepted commit yet: the relay serves (no actions) and publishes the reason.
    wait_for(lambda: "no accepted commit" in " ".join(
        (cluster.origin.relay_file("relay-a", "relay.yaml") or {}).get("errors", [])), 30, what="error published")
    waiting = cluster.origin.relay_file("relay-a", "relay.yaml")
    assert [(p["kind"], p["reason"]) for p in waiting["problems"]] == [("waiting", "missingRef")]
    assert waiting["problems"][0]["message"] == waiting["errors"][0]
    agent = cluster.agent("pc-1", relay)
    assert agent.step().actions == 0

    # HQ accepts: the relay notices (it watches the local origin) without waiting for its poll interval.
    assert cluster.origin.accept(cluster.hq) == commit
    cluster.at_commit(relay, commit, timeout=20)
    settled = cluster.origin.relay_file("relay-a", "relay.yaml") or {}
    assert (settled["errors"], settled["problems"]) == ([], [])
    assert agent.run_once() == 0
    cluster.wait_rows("relay-a", "install-app", {"pc-1": "Succeeded"})

    # A second relay on the same workdir, and a relay the topology does not know, refuse to start.
    same = reconciler("relay", "--name", "relay-a", "--origin", cluster.origin.url, "--workdir",
                      str(relay.workdir), "--listen", "127.0.0.1:0", "--insecure-http", check=False)
    assert same.returncode == 2 and "another relay" in same.stderr
    unknown = reconciler("relay", "--name", "relay-zz", "--origin", cluster.origin.url, "--workdir",
                         str(cluster.base / "zz"), "--listen", "127.0.0.1:0", "--open-enrollment", "--insecure-http",
                         check=False)
    assert unknown.returncode == 2 and "relay-zz" in unknown.stderr and "not in the topology" in unknown.stderr
    assert relay.stop() == 0
    assert not (relay.workdir / "listen.url").exists()


def test_relay_git_hook_needs_a_secret_flag_or_the_insecure_opt_out(cluster: Cluster) -> None:
    """``reconciler relay``: hooks refused by default, signed with --webhook-secret-file (or the environment
    variable), open only with --insecure-unsigned-webhook; a replay of a signed hook is 409."""
    cluster.accept({"topology.yaml": topology(("site-a", "hq-x"), ("site-b", "hq-x"), ("site-c", "hq-x"))})
    secret_file = cluster.base / "hook-secret"
    secret_file.write_text("relay-hook-secret\n")
    body = b'{"ref": "refs/heads/status/hq", "after": "0123"}'
    signed = {"X-Hub-Signature-256": sign(b"relay-hook-secret", body)}

    default = cluster.relay("site-a")
    assert requests.post(f"{default.url}/v1/hooks/git", data=body, headers=signed, timeout=10).status_code == 401
    assert default.health()["ok"] is True
    assert "no webhook secret" in default.output()

    flagged = cluster.relay("site-b", extra_args=["--webhook-secret-file", str(secret_file)])
    assert requests.post(f"{flagged.url}/v1/hooks/git", data=body, timeout=10).status_code == 401
    assert requests.post(f"{flagged.url}/v1/hooks/git", data=body, headers=signed, timeout=10).status_code == 202
    assert requests.post(f"{flagged.url}/v1/hooks/git", data=body, headers=signed, timeout=10).status_code == 409

    from_env = cluster.relay("site-c", extra_env={"RECONCILER_WEBHOOK_SECRET_FILE": str(secret_file)})
    assert requests.post(f"{from_env.url}/v1/hooks/git", data=body, headers=signed, timeout=10).status_code == 202
    from_env.stop()
    opened = cluster.relay("site-c", extra_args=["--insecure-unsigned-webhook"])
    assert requests.post(f"{opened.url}/v1/hooks/git", data=body, timeout=10).status_code == 202


def test_approval_rekey_and_forget_on_a_running_relay(cluster: Cluster) -> None:
    """The lifecycle commands change what a running relay process serves and publishes, at once."""
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/app/app.txt": "app\n",
        "packages/app-1.0.yaml": package("app", "1.0", "{path: artifacts/app}"),
        "jobs/install-app.yaml": job("install-app", "app", "1.0", "relay-a"),
    })
    relay = cluster.relay("relay-a", extra_args=["--require-approval"])
    cluster.at_commit(relay, commit)

    def clients(*args: str) -> str:
        return reconciler("clients", *args, "--workdir", str(relay.workdir)).stdout

    agent = cluster.agent("pc-1", relay)
    waiting = agent.step()
    assert waiting.status_code == 403 and "clients approve pc-1" in (waiting.error or "")
    assert json.loads(clients("list", "--format", "json"))["clients"][0]["state"] == "pending approval"
    assert agent.run_once() == 1 and receipts(cluster.base / "clients" / "pc-1") == set()
    assert "pc-1" not in cluster.rows("relay-a", "install-app"), "a pending client was planned"

    clients("approve", "pc-1")
    assert agent.run_once() == 0 and receipts(cluster.base / "clients" / "pc-1") == {"app"}
    cluster.wait_rows("relay-a", "install-app", {"pc-1": "Succeeded"})

    token = agent.token
    clients("rekey", "pc-1")
    assert agent.run_once() == 0 and agent.token not in (None, token)  # re-enrolled with its secret
    cluster.wait_rows("relay-a", "install-app", {"pc-1": "Succeeded"})  # its history kept

    clients("forget", "pc-1")
    wait_for(lambda: cluster.rows("relay-a", "install-app") == {}, 30,
             what="the forgotten client gone from the relay's status (at its next pass)")
    assert "Traceback" not in relay.output()
    assert relay.stop() == 0
