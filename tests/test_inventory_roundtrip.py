"""The inventory round trip: what relays publish is what ``reconciler plan --inventory`` reads.

Real temp git repos: HQ accepts the example repo, each relay publishes its
``inventory.json`` on ``status/<relay>`` exactly as a relay renders it, and
``reconciler status --inventory`` merges them. Planning with the merged file,
or with the relays' files given one ``--inventory`` each, must give the same
plan as the inventory they were made from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_hq import ROOT, Origin, env, hq_pass, run_cli

from reconciler import report
from reconciler.gitstore import GitStore
from reconciler.plan import Installed
from reconciler.report import InventoryEntry

SOURCE = ROOT / "examples" / "inventory.json"


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    origin = Origin(tmp_path)
    hq_pass(origin, tmp_path / "hq")
    return origin


def entry(raw: dict[str, Any]) -> InventoryEntry:
    return InventoryEntry(id=raw["id"], facts=raw.get("facts", {}), labels=raw.get("labels", {}),
                          online=raw.get("online", True),
                          installed=tuple(Installed(i["name"], i["version"]) for i in raw.get("installed", [])))


def by_relay(clients: list[dict[str, Any]]) -> dict[str, list[InventoryEntry]]:
    out: dict[str, list[InventoryEntry]] = {}
    for raw in clients:
        out.setdefault(raw["relay"], []).append(entry(raw))
    return out


def publish(origin: Origin, tmp_path: Path, relay: str, files: dict[str, bytes]) -> None:
    GitStore(str(origin.bare), tmp_path / "relays" / relay).publish(f"status/{relay}", files, f"status of {relay}")


def publish_inventories(origin: Origin, tmp_path: Path, fleet: dict[str, list[InventoryEntry]]) -> dict[str, bytes]:
    """Each relay's status files as a relay renders them; returns each relay's inventory.json."""
    published = {}
    for relay, entries in fleet.items():
        files = report.render_relay_status(relay, origin.head, None, {}, entries, [])
        publish(origin, tmp_path, relay, files)
        published[relay] = files[f"relays/{relay}/inventory.json"]
    return published


def plan_json(*inventories: Path) -> dict[str, Any]:
    args = [arg for path in inventories for arg in ("--inventory", str(path))]
    done = run_cli("plan", str(ROOT / "example-repo"), *args, "--format", "json", "--now", "2026-06-01T00:00:00Z")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def status(origin: Origin, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("status", "--origin", str(origin.bare), *args, extra_env={"XDG_CACHE_HOME": str(tmp_path / "c")})


def test_status_inventory_plans_like_the_inventory_it_came_from(origin: Origin, tmp_path: Path) -> None:
    clients = json.loads(SOURCE.read_text())["clients"]
    published = publish_inventories(origin, tmp_path, by_relay(clients))
    assert len(published) >= 3

    done = status(origin, tmp_path, "--inventory", str(tmp_path / "fleet.json"))
    assert (done.returncode, done.stderr) == (0, "")
    assert "install-7zip" in done.stdout  # the report still prints
    fleet = json.loads((tmp_path / "fleet.json").read_text())
    assert sorted(c["id"] for c in fleet["clients"]) == sorted(c["id"] for c in clients)
    assert {c["id"]: c["relay"] for c in fleet["clients"]} == {c["id"]: c["relay"] for c in clients}

    expected = plan_json(SOURCE)
    assert any(row["action"] for row in expected["rows"])
    assert plan_json(tmp_path / "fleet.json") == expected
    # the relays' own files, one --inventory each, merged by plan
    paths = []
    for relay, data in published.items():
        path = tmp_path / f"{relay}.json"
        path.write_bytes(data)
        paths.append(path)
    assert plan_json(*paths) == expected


def test_status_inventory_to_standard_output_replaces_the_report(origin: Origin, tmp_path: Path) -> None:
    clients = json.loads(SOURCE.read_text())["clients"]
    publish_inventories(origin, tmp_path, by_relay(clients))
    done = status(origin, tmp_path, "--inventory", "-")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["clients"]) == len(clients)


def test_a_moved_client_is_kept_once_and_a_bad_relay_inventory_is_said(origin: Origin, tmp_path: Path) -> None:
    kanto = [entry({"id": "pc-01", "online": False}), entry({"id": "pc-02"})]
    yokohama = [entry({"id": "pc-01", "facts": {"os": "linux"}})]  # pc-01 moved here and is online
    publish_inventories(origin, tmp_path, {"relay-kanto": kanto, "relay-yokohama": yokohama})
    publish(origin, tmp_path, "relay-osaka", {"relays/relay-osaka/inventory.json": b'{"clients": 7}',
                                              **{k: v for k, v in report.render_relay_status(
                                                  "relay-osaka", origin.head, None, {}, [], []).items()
                                                 if k.endswith("relay.yaml")}})
    publish(origin, tmp_path, "relay-gone", report.render_relay_status("relay-gone", origin.head, None, {},
                                                                       [entry({"id": "pc-09"})], []))

    done = status(origin, tmp_path, "--inventory", str(tmp_path / "fleet.json"))
    assert done.returncode == 2
    notes = done.stderr.splitlines()
    assert "reconciler status: client pc-01 is in the inventories of relay-kanto and relay-yokohama; " \
           "kept relay-yokohama's (online)" in notes
    assert any(n.startswith("reconciler status: inventory of relay-osaka unreadable") and "clients" in n
               for n in notes), notes
    assert "reconciler status: status/relay-gone: not a relay of the accepted topology; " \
           "its clients are left out" in notes
    fleet = json.loads((tmp_path / "fleet.json").read_text())
    assert [(c["id"], c["relay"]) for c in fleet["clients"]] == [("pc-02", "relay-kanto"),
                                                                 ("pc-01", "relay-yokohama")]
    assert plan_json(tmp_path / "fleet.json")["rows"]


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_plan_refuses_a_client_in_two_files_naming_both(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", {"relay": "relay-kanto", "clients": [{"id": "pc-01"}]})
    b = write(tmp_path / "b.json", {"clients": [{"id": "pc-02", "relay": "relay-osaka"},
                                                {"id": "pc-01", "relay": "relay-osaka"}]})
    done = run_cli("plan", str(ROOT / "example-repo"), "--inventory", str(a), "--inventory", str(b))
    assert done.returncode == 2
    assert done.stderr == (f"{b}: clients[1].id: client 'pc-01' (relay relay-osaka) is also in {a} at clients[0] "
                           "(relay relay-kanto); a client belongs to one relay\n")


@pytest.mark.parametrize(("doc", "problem"), [
    ({"relay": "relay-kanto", "clients": [{"id": "pc-01", "relay": "relay-osaka"}]},
     "clients[0].relay: 'relay-osaka' is not the file's relay 'relay-kanto'"),
    ({"relay": "relay-nowhere", "clients": []}, "relay: unknown relay 'relay-nowhere'"),
    ({"relay": 3, "clients": []}, "relay: expected a string, got an integer"),
    ({"clients": [{"id": "pc-01"}]}, "clients[0].relay: missing required field"),
    ({"relays": "x", "clients": []}, "relays: unknown field"),
])
def test_plan_names_what_is_wrong_with_a_relay_inventory(tmp_path: Path, doc: Any, problem: str) -> None:
    path = write(tmp_path / "inv.json", doc)
    done = run_cli("plan", str(ROOT / "example-repo"), "--inventory", str(path))
    assert done.returncode == 2
    assert f"{path}: {problem}" in done.stderr, done.stderr


def test_an_inventory_given_twice_is_one_problem(tmp_path: Path) -> None:
    done = run_cli("plan", str(ROOT / "example-repo"), "--inventory", str(SOURCE), "--inventory", str(SOURCE))
    assert done.returncode == 2
    assert done.stderr == f"{SOURCE}: given twice (also as {SOURCE}); each inventory is read once\n"


def test_an_endless_inventory_stops_at_the_size_limit_and_a_pipe_still_works(tmp_path: Path) -> None:
    endless = run_cli("plan", str(ROOT / "example-repo"), "--inventory", "/dev/zero")
    assert (endless.returncode, endless.stdout) == (2, "")
    assert endless.stderr == "/dev/zero: more than 64 MiB; an inventory is at most what the relays publish\n"
    piped = subprocess.run(["bash", "-c", f'"$0" -m reconciler plan "{ROOT / "example-repo"}" --format json '
                            f'--inventory <(cat "{SOURCE}")', sys.executable], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env())
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["rows"]
