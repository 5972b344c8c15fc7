"""End to end through ``reconciler agent`` processes: a real .deb's whole life, and an msi that needs a reboot.

A real bare origin, ``reconciler hq --once`` (signed commits, signed
manifests), a ``reconciler relay`` process, and ``reconciler agent --once``
runs that verify every action:

* a ``.deb`` built in the test goes through install, upgrade, drift (a file
  of the package edited by hand: ``dpkg --verify`` sees it, the package is
  reinstalled) and removal, with the real ``dpkg`` in a sandbox root
  (``--dpkg-root``); the same sandbox's database is the agent's software
  inventory, so ``reconciler status --software`` finds the package;
* an ``msi`` whose stand-in ``msiexec`` (on PATH, recording its argv) exits
  3010 — on POSIX an exit status keeps 8 bits, so the agent sees 194 and
  reads it as 3010's low bits — leaves the row ``Succeeded`` with reason
  ``rebootRequired`` until the agent reports another boot id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import reconciler, wait_for
from test_e2e_relay import Cluster, job, package, relay_operations, topology

from reconciler.agent import native

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="the msiexec stand-in is a shell script"),
]

DEB = "acme-lifecycle"
PRODUCT_CODE = "{0E5B2C8A-4F1D-4C3B-9A7E-2D6F8B1C3E5A}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


def build_deb(where: Path, version: str) -> bytes:
    tree = where / f"deb-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {DEB}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: two files under /opt\n")
    (tree / "opt" / DEB).mkdir(parents=True)
    (tree / "opt" / DEB / "motd.txt").write_text(f"acme {version}\n")
    (tree / "opt" / DEB / "README").write_text("read me\n")
    out = where / f"{DEB}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def run_agent(cluster: Cluster, relay_url: str, secret: Path, client: str, *args: str,
              path: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = {"PATH": f"{path}{os.pathsep}{os.environ.get('PATH', '')}"} if path else None
    return reconciler("agent", "--id", client, "--relay", relay_url, "--insecure-http",
                      "--root", str(cluster.base / "clients" / client), "--trust-key", str(cluster.origin.trust_key),
                      "--enroll-secret-file", str(secret), "--once", *args, timeout=120, extra_env=extra)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
                    reason="dpkg and dpkg-deb are not installed (Debian's dpkg package)")
def test_a_real_deb_is_installed_upgraded_healed_after_drift_and_removed(cluster: Cluster, tmp_path: Path) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("site", "hq-x")),
        f"artifacts/{DEB}_1.0_all.deb": build_deb(tmp_path, "1.0"),
        "packages/acme-1.0.yaml": package("acme", "1.0", f"{{path: artifacts/{DEB}_1.0_all.deb}}",
                                          f"{{type: deb, packageName: {DEB}}}"),
        "jobs/install-acme.yaml": job("install-acme", "acme", "1.0", "site"),
    })
    relay = cluster.relay("site")
    cluster.at_commit(relay, commit)
    assert relay.enroll_secret_file is not None
    sandbox = tmp_path / "dpkg-root"
    motd = sandbox / "opt" / DEB / "motd.txt"

    def agent() -> None:
        # dpkg --verify at every run (by default once a day per package)
        run_agent(cluster, relay.url, relay.enroll_secret_file, "pc-1", "--dpkg-root", str(sandbox),
                  "--rehash-interval", "0.001")

    # install
    agent()
    agent()  # reports the result
    rows = cluster.wait_rows("site", "install-acme", {"pc-1": "Succeeded"})
    assert rows["pc-1"]["installedVersion"] == "1.0"
    assert native.dpkg_installed_version(DEB, sandbox) == "1.0" and motd.read_text() == "acme 1.0\n"

    # upgrade: dpkg -i replaces 1.0 in place
    commit = cluster.accept({
        f"artifacts/{DEB}_1.1_all.deb": build_deb(tmp_path, "1.1"),
        "packages/acme-1.1.yaml": package("acme", "1.1", f"{{path: artifacts/{DEB}_1.1_all.deb}}",
                                          f"{{type: deb, packageName: {DEB}}}"),
        "jobs/install-acme.yaml": job("install-acme", "acme", "1.1", "site"),
    })
    cluster.at_commit(relay, commit)
    agent()
    agent()
    wait_for(lambda: cluster.rows("site", "install-acme").get("pc-1", {}).get("installedVersion") == "1.1", 30,
             what="acme 1.1 installed")
    assert cluster.rows("site", "install-acme")["pc-1"]["state"] == "Succeeded"
    assert native.dpkg_installed_version(DEB, sandbox) == "1.1" and motd.read_text() == "acme 1.1\n"
    before = relay_operations(relay, "pc-1", "install-acme")

    # drift: a file of the package edited by hand, same size; dpkg --verify sees it, the package is reinstalled
    motd.write_text("acme 6.6\n")
    assert native.package_changes("deb", DEB, sandbox) == [f"/opt/{DEB}/motd.txt"]
    agent()  # the check-in leaves acme out (drift), the reply reinstalls it
    agent()
    wait_for(lambda: len(relay_operations(relay, "pc-1", "install-acme")) == len(before) + 1
             and relay_operations(relay, "pc-1", "install-acme")[-1][1] == "succeeded", 30, what="drift healed")
    assert motd.read_text() == "acme 1.1\n"
    assert native.package_changes("deb", DEB, sandbox) == []
    cluster.wait_rows("site", "install-acme", {"pc-1": "Succeeded"})

    # the sandbox's dpkg database is also the agent's software inventory: status --software finds it
    def found() -> dict[str, object] | None:
        proc = reconciler("status", "--origin", cluster.origin.url, "--software", DEB, "--format", "json",
                          check=False)
        doc = json.loads(proc.stdout) if proc.returncode == 0 else None
        return doc if doc and doc.get("matches") else None

    matches = wait_for(found, 30, what="status --software")["matches"]
    assert [(m["name"], m["version"], m["source"], m["client"]) for m in matches] == [(DEB, "1.1", "dpkg", "pc-1")]

    # removal
    commit = cluster.accept({"jobs/install-acme.yaml": None,
                             "jobs/remove-acme.yaml": job("remove-acme", "acme", None, "site", job_type="uninstall")})
    cluster.at_commit(relay, commit)
    agent()
    agent()
    cluster.wait_rows("site", "remove-acme", {"pc-1": "Succeeded"})
    assert native.dpkg_installed_version(DEB, sandbox) is None and not motd.exists()
    # nothing of it ever reached the machine's own dpkg database or /opt
    real = subprocess.run(["dpkg-query", "-W", DEB], capture_output=True, text=True, check=False)
    assert real.returncode != 0 and not Path("/opt", DEB).exists()
    assert relay.stop() == 0, relay.output()


MSIEXEC = """#!/bin/sh
echo "$@" >> "{record}"
exit 3010
"""


def test_an_msi_exiting_3010_waits_for_a_reboot_until_the_boot_id_changes(cluster: Cluster, tmp_path: Path) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("site", "hq-x")),
        "artifacts/Timesheet-3.2.0.msi": b"not really an msi: msiexec is a stand-in\n",
        "packages/timesheet-3.2.0.yaml": package(
            "timesheet", "3.2.0", "{path: artifacts/Timesheet-3.2.0.msi}",
            f'{{type: msi, productCode: "{PRODUCT_CODE}", properties: {{ALLUSERS: "1"}}}}'),
        "jobs/install-timesheet.yaml": job("install-timesheet", "timesheet", "3.2.0", "site"),
    })
    relay = cluster.relay("site")
    cluster.at_commit(relay, commit)
    assert relay.enroll_secret_file is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "msiexec-argv"
    stand_in = bin_dir / "msiexec"
    stand_in.write_text(MSIEXEC.format(record=record))
    stand_in.chmod(0o755)
    assert subprocess.run([str(stand_in)], check=False).returncode == 3010 & 0xFF  # what POSIX keeps of 3010
    record.unlink()

    def agent(boot: str) -> None:
        run_agent(cluster, relay.url, relay.enroll_secret_file, "pc-win", "--fact", f"bootId={boot}",
                  "--no-reboot", path=bin_dir)

    agent("boot-1")
    agent("boot-1")
    row = cluster.wait_rows("site", "install-timesheet", {"pc-win": "Succeeded"})["pc-win"]
    assert (row["reason"], row["message"]) == ("rebootRequired", "reboot required")
    [argv] = record.read_text().splitlines()
    assert argv.startswith("/i ") and argv.endswith("Timesheet-3.2.0.msi /qn /norestart /l*v "
                                                    + str(cluster.base / "clients" / "pc-win" / "logs"
                                                          / "timesheet-3.2.0-install.log") + " ALLUSERS=1")

    def reboot_count() -> int:
        return int((cluster.origin.relay_file("site", "relay.yaml") or {}).get("jobs", {})
                   .get("install-timesheet", {}).get("rebootRequired", 0))

    wait_for(lambda: reboot_count() == 1, 30, what="one client waiting for a reboot")
    agent("boot-1")  # the same boot: still waiting, and msiexec does not run again
    assert cluster.rows("site", "install-timesheet")["pc-win"]["reason"] == "rebootRequired"
    assert len(record.read_text().splitlines()) == 1
    agent("boot-2")  # rebooted
    wait_for(lambda: cluster.rows("site", "install-timesheet")["pc-win"]["reason"] == "done", 30,
             what="the wait cleared by the new boot id")
    wait_for(lambda: reboot_count() == 0, 30, what="no client waiting for a reboot")
    assert len(record.read_text().splitlines()) == 1
    assert relay.stop() == 0, relay.output()

