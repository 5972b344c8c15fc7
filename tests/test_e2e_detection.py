"""End to end: software installed by hand is seen through the package's ``spec.detect``.

A real bare origin, ``reconciler hq`` signing what it accepts, a
``reconciler relay`` subprocess on 127.0.0.1, and real agents given HQ's key
(the detection rule reaches them inside the signed package document and is
verified before it runs). Three clients get one install job for app 1.0:

* ``pc-newer`` has 9.9 "installed by hand" (the file the rule reads says 9.9):
  nothing of 1.0 is installed and its row is Skipped, newerPresent;
* ``pc-clean`` has nothing: 1.0 is installed, Succeeded;
* ``pc-same`` has exactly 1.0 by hand: Succeeded, the installer never ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import wait_for
from test_e2e_relay import Cluster, job, package, topology

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="the installer script is sh"),
]

INSTALL = """\
#!/bin/sh
set -e
echo "$RECONCILER_PACKAGE_VERSION" >> "$RECONCILER_ROOT/installer-ran"
mkdir -p "$RECONCILER_ROOT/apps/app"
echo "version=$RECONCILER_PACKAGE_VERSION" > "$RECONCILER_ROOT/apps/app/VERSION"
"""
DETECT = """\
  detect:
    file: "${ROOT}/apps/app/VERSION"
    versionPattern: "version=(\\\\S+)"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


def by_hand(root: Path, version: str) -> None:
    (root / "apps" / "app").mkdir(parents=True)
    (root / "apps" / "app" / "VERSION").write_text(f"version={version}\n")


def test_software_installed_by_hand_is_seen_by_the_plan(cluster: Cluster) -> None:
    commit = cluster.accept({
        "topology.yaml": topology(("relay-a", "hq-x")),
        "artifacts/app/install.sh": INSTALL,
        "packages/app-1.0.yaml": package("app", "1.0", "{path: artifacts/app}",
                                         '{type: command, install: [sh, install.sh], uninstall: [sh, -c, "true"]}',
                                         extra=DETECT),
        "jobs/install-app.yaml": job("install-app", "app", "1.0", "relay-a"),
    })
    relay = cluster.relay("relay-a")
    cluster.at_commit(relay, commit)
    roots = {c: cluster.base / "clients" / c for c in ("pc-newer", "pc-clean", "pc-same")}
    by_hand(roots["pc-newer"], "9.9")
    by_hand(roots["pc-same"], "1.0")
    for client in roots:
        assert cluster.agent(client, relay).run_once() == 0

    rows = cluster.wait_rows("relay-a", "install-app",
                             {"pc-newer": "Skipped", "pc-clean": "Succeeded", "pc-same": "Succeeded"})
    newer = rows["pc-newer"]
    assert (newer["reason"], newer["message"]) == ("newerPresent", "newer version 9.9 present"), newer
    assert rows["pc-clean"]["reason"] == rows["pc-same"]["reason"] == "done"

    # nothing of 1.0 on pc-newer, the installer ran only on pc-clean
    assert not (roots["pc-newer"] / "installer-ran").exists()
    assert not (roots["pc-newer"] / "packages" / "app").exists()
    assert not (roots["pc-newer"] / "receipts" / "app.json").exists()
    assert (roots["pc-newer"] / "apps" / "app" / "VERSION").read_text() == "version=9.9\n"
    assert (roots["pc-clean"] / "installer-ran").read_text() == "1.0\n"
    assert not (roots["pc-same"] / "installer-ran").exists()
    assert '"origin": "detected"' in (roots["pc-same"] / "receipts" / "app.json").read_text()

    # the relay's published inventory holds what detection found
    def published() -> dict[str, list[dict[str, str]]] | None:
        doc = cluster.origin.relay_file("relay-a", "inventory.json") or {}
        clients = {c["id"]: c["installed"] for c in doc.get("clients", [])}
        return clients if len(clients) == 3 and all(clients.values()) else None

    clients = wait_for(published, 30, what="relay-a inventory.json with three clients")
    assert clients["pc-newer"] == [{"name": "app", "version": "9.9", "source": "detected"}]
    assert clients["pc-same"] == [{"name": "app", "version": "1.0", "source": "detected"}]
    assert clients["pc-clean"] == [{"name": "app", "version": "1.0"}]  # its own receipt
