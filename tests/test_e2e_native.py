"""End to end: deb and exe packages from a signed commit, through HQ and a relay, to an agent.

A real bare origin, ``reconciler hq --once``, a ``reconciler relay`` process on
127.0.0.1 and an in-process agent that verifies HQ's signed manifest (so the
native installer fields are checked against the package documents). The deb
is built in the test and installed with the real dpkg into a sandbox root
(``--dpkg-root``); the exe is a stand-in script served from a local HTTP
server, whose declared reboot exit code comes back as ``rebootRequired``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import FileServer
from test_e2e_relay import Cluster, job, package, topology

from reconciler.agent import native

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="the exe stand-in is a shell script"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed (Debian's dpkg package)"),
]

DEB_NAME = "reconciler-e2e-hello"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


def _deb(where: Path) -> bytes:
    tree = where / "deb-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {DEB_NAME}\nVersion: 2.0\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: one file under /opt\n")
    (tree / "opt" / DEB_NAME).mkdir(parents=True)
    (tree / "opt" / DEB_NAME / "hello.txt").write_text("hello 2.0\n")
    out = where / "hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def test_deb_and_exe_packages_reach_a_verifying_agent(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "exe-ran"
    setup = f"#!/bin/sh\necho \"$@\" >> {marker}\necho 'setup done, reboot needed'\nexit 194\n".encode()
    files = FileServer({"/downloads/ScannerSetup-5.4.exe": setup})
    try:
        commit = cluster.accept({
            "topology.yaml": topology(("site", "hq-x")),
            "artifacts/hello_2.0_all.deb": _deb(tmp_path),
            "packages/hello-2.0.yaml": package(
                "hello", "2.0", "{path: artifacts/hello_2.0_all.deb}", f"{{type: deb, packageName: {DEB_NAME}}}"),
            "packages/scanner-5.4.yaml": package(
                "scanner", "5.4",
                f'{{url: "{files.url}/downloads/ScannerSetup-5.4.exe", sha256: "{hashlib.sha256(setup).hexdigest()}"}}',
                "{type: exe, install: [/S, /norestart], uninstall: [sh, -c, 'true'], rebootExitCodes: [194]}"),
            "jobs/install-hello.yaml": job("install-hello", "hello", "2.0", "site"),
            "jobs/install-scanner.yaml": job("install-scanner", "scanner", "5.4", "site"),
        })
        relay = cluster.relay("site")
        cluster.at_commit(relay, commit)
        sandbox = tmp_path / "dpkg-sandbox"
        agent = cluster.agent("pc-1", relay, dpkg_root=sandbox)
        assert agent.run_once() == 0

        cluster.wait_rows("site", "install-hello", {"pc-1": "Succeeded"})
        rows = cluster.wait_rows("site", "install-scanner", {"pc-1": "Succeeded"})
        assert rows["pc-1"]["installedVersion"] == "5.4"
        assert native.dpkg_installed_version(DEB_NAME, sandbox) == "2.0"
        assert (sandbox / "opt" / DEB_NAME / "hello.txt").read_text() == "hello 2.0\n"
        assert marker.read_text() == "/S /norestart\n"
        results = [r for r in agent.journal.entries() if r.result is not None]
        scanner = [r.result for r in results if r.result and r.result.get("exitCode") == 194]
        assert scanner and scanner[0]["rebootRequired"] is True and scanner[0]["status"] == "succeeded"
        real = subprocess.run(["dpkg-query", "-W", DEB_NAME], capture_output=True, text=True, check=False)
        assert real.returncode != 0 and not Path("/opt", DEB_NAME).exists()

        # the uninstall job removes the deb from the sandbox, by the packageName in the receipt
        commit = cluster.accept({"jobs/install-hello.yaml": None,
                                 "jobs/remove-hello.yaml": job("remove-hello", "hello", None, "site",
                                                               job_type="uninstall")})
        cluster.at_commit(relay, commit)
        assert agent.run_once() == 0
        cluster.wait_rows("site", "remove-hello", {"pc-1": "Succeeded"})
        assert native.dpkg_installed_version(DEB_NAME, sandbox) is None
        assert not (sandbox / "opt" / DEB_NAME / "hello.txt").exists()
    finally:
        files.close()
    for relay_process in cluster.relays:
        assert relay_process.stop() == 0, relay_process.output()
