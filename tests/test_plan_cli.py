"""``reconciler plan`` as an admin runs it: a subprocess on the example repo and sample inventory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.commands.plan import InventoryError, parse_inventory

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-23T00:00:00Z"


def reconciler(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False, env=env)


@pytest.fixture(scope="module")
def example_rows() -> list[dict[str, Any]]:
    done = reconciler("plan", "example-repo", "--inventory", "examples/inventory.json", "--format", "json",
                      "--now", NOW)
    assert (done.returncode, done.stderr) == (0, "")
    rows: list[dict[str, Any]] = json.loads(done.stdout)["rows"]
    return rows


def find(rows: list[dict[str, Any]], job: str, client: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["job"] == job and r["client"] == client), None)


def test_example_plan_is_sorted_and_covers_every_relay(example_rows: list[dict[str, Any]]) -> None:
    keys = [(r["job"], r["relay"], r["client"]) for r in example_rows]
    assert keys == sorted(keys)
    assert {r["relay"] for r in example_rows} == {"relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka"}


def test_example_plan_rows(example_rows: list[dict[str, Any]]) -> None:
    assert find(example_rows, "install-7zip", "pc-kanto-002") == {
        "job": "install-7zip", "relay": "relay-kanto", "client": "pc-kanto-002", "state": "Skipped",
        "action": None, "package": {"name": "7zip", "version": "23.01"},
        "message": "newer version 24.00 present"}
    assert find(example_rows, "uninstall-legacy-toolbar", "pc-kanto-001") == {
        "job": "uninstall-legacy-toolbar", "relay": "relay-kanto", "client": "pc-kanto-001",
        "state": "Pending", "action": "uninstall", "package": {"name": "legacy-toolbar", "version": "1.2"},
        "message": ""}
    # relay-yokohama is nested under relay-kanto: install-7zip reaches it
    assert find(example_rows, "install-7zip", "pc-yokohama-001")["action"] == "install"  # type: ignore[index]
    assert find(example_rows, "install-putty", "pc-yokohama-002")["action"] == "upgrade"  # type: ignore[index]
    assert find(example_rows, "install-putty", "pc-yokohama-003")["message"] == \
        "requires arch x86_64 or arm64, client has x86"  # type: ignore[index]
    assert find(example_rows, "install-teams-meeting", "pc-osaka-002")["message"] == \
        "scheduled for 2027-04-01T00:00:00Z"  # type: ignore[index]
    assert find(example_rows, "install-vpn-client", "pc-osaka-002")["message"] == \
        "requires 1024 MB free disk, client has 800 MB"  # type: ignore[index]


def test_clients_job_reaches_only_the_named_clients(example_rows: list[dict[str, Any]]) -> None:
    assert sorted(r["client"] for r in example_rows if r["job"] == "install-office-addin") == \
        ["pc-kanto-001", "pc-osaka-001"]
    # allLowerClients of relay-yokohama only: no row elsewhere
    assert {r["relay"] for r in example_rows if r["job"] == "install-putty"} == {"relay-yokohama"}


def test_text_format_prints_a_table_per_relay() -> None:
    done = reconciler("plan", "example-repo", "--inventory", "examples/inventory.json", "--now", NOW)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "relay relay-kanto: 3 clients, 4 actions" in lines
    header = next(line for line in lines if line.strip().startswith("JOB"))
    assert header.split() == ["JOB", "CLIENT", "STATE", "ACTION", "PACKAGE", "MESSAGE"]
    assert any(line.split()[:6] == ["install-7zip", "pc-kanto-002", "Skipped", "-", "7zip", "23.01"]
               for line in lines if line.startswith("  install-7zip"))
    assert lines[-1] == "20 actions on 10 clients"  # office-addin waits for vcredist on two clients


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ('{"clients": [{"id": "pc-1", "relay": "relay-kanto", "installed": [{"name": "7zip", "version": 23.01}]}]}',
     "clients[0].installed[0].version: expected a string, got a number"),
    ('{"clients": [{"id": "pc-1", "relay": "relay-nowhere"}]}',
     "clients[0].relay: unknown relay 'relay-nowhere' (relays in the topology: relay-fukuoka, relay-kanto, "
     "relay-osaka, relay-yokohama)"),
    ("[" * 100_000 + "]" * 100_000, "inventory is nested too deeply"),
    ('{"clients": [{"id": "pc-1", "relay": "relay-kanto", "facts": {"freeDiskMB": ' + "9" * 5000 + "}}]}",
     "inventory holds a number with thousands of digits"),
    ('{"clients": [], "clients": []}', "inventory is not valid JSON: duplicate key 'clients'"),
    ('{"clients": [{"id": "pc-\\ud800", "relay": "relay-kanto"}]}',
     "clients[0].id: text is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"),
])
def test_malformed_inventory_exits_2_naming_the_field(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "inventory.json").write_text(content, encoding="utf-8")
    done = reconciler("plan", str(ROOT / "example-repo"), "--inventory", "inventory.json", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"inventory.json: {message}\n"


def test_missing_inventory_file_exits_2(tmp_path: Path) -> None:
    done = reconciler("plan", str(ROOT / "example-repo"), "--inventory", str(tmp_path / "none.json"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{tmp_path / 'none.json'}: cannot read: ")


def test_bad_now_exits_2() -> None:
    done = reconciler("plan", "example-repo", "--inventory", "examples/inventory.json", "--now", "tomorrow")
    assert done.returncode == 2
    assert "--now: 'tomorrow' is not an RFC 3339 time" in done.stderr


def test_invalid_repo_exits_1_with_the_validate_messages(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "example-repo", repo)
    job = repo / "jobs" / "install-7zip.yaml"
    job.write_text(job.read_text(encoding="utf-8").replace("relay-kanto", "relay-nowhere"), encoding="utf-8")
    done = reconciler("plan", str(repo), "--inventory", str(ROOT / "examples" / "inventory.json"))
    validate = reconciler("validate", str(repo))
    assert (done.returncode, validate.returncode) == (1, 1)
    assert done.stdout == ""
    assert done.stderr == validate.stdout
    assert "jobs/install-7zip.yaml:" in done.stderr and "'relay-nowhere' is not a relay" in done.stderr


RELAYS = ["relay-a", "relay-b"]


@pytest.mark.parametrize(("document", "problem"), [
    ([], "expected an object {\"clients\": [...]}, got an array"),
    ({}, "clients: missing required field"),
    ({"clients": {}}, "clients: expected an array, got an object"),
    ({"clients": ["pc-1"]}, "clients[0]: expected an object, got a string"),
    ({"clients": [{"relay": "relay-a"}]}, "clients[0].id: missing required field"),
    ({"clients": [{"id": 7, "relay": "relay-a"}]}, "clients[0].id: expected a string, got an integer"),
    ({"clients": [{"id": "PC 1", "relay": "relay-a"}]},
     "clients[0].id: 'PC 1' is not a valid client id (1-63 lowercase letters, digits, '.' and '-')"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a"}, {"id": "pc-1", "relay": "relay-b"}]},
     "clients[1].id: duplicate client id 'pc-1' (first at clients[0])"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "facts": {"freeDiskMB": "lots"}}]},
     "clients[0].facts.freeDiskMB: expected an integer, got a string"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "facts": {"freeDiskMB": True}}]},
     "clients[0].facts.freeDiskMB: expected an integer, got a boolean"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "facts": {"freeDiskMB": -1}}]},
     "clients[0].facts.freeDiskMB: must be at least 0, got -1"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "facts": {"os": 1}}]},
     "clients[0].facts.os: expected a string, got an integer"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "facts": {"ram": 4}}]},
     "clients[0].facts.ram: unknown fact (allowed: os, arch, freeDiskMB, hostname, bootId)"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "labels": {"dept": 3}}]},
     "clients[0].labels.dept: expected a string, got an integer"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "installed": {}}]},
     "clients[0].installed: expected an array, got an object"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "installed": [{"name": "x"}]}]},
     "clients[0].installed[0].version: missing required field"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a",
                   "installed": [{"name": "x", "version": "1"}, {"name": "x", "version": "2"}]}]},
     "clients[0].installed[1].name: 'x' is listed twice (a client has one version per software)"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "instaled": []}]},
     "clients[0].instaled: unknown field (allowed: id, relay, facts, labels, installed, online, lastContact, software)"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "online": "yes"}]},
     "clients[0].online: expected a boolean, got a string"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "online": False, "lastContact": "yesterday"}]},
     "clients[0].lastContact: expected an RFC 3339 time such as 2026-11-30T08:00:00Z"),
    ({"clients": [{"id": "pc-1", "relay": "relay-a", "online": False, "lastContact": 1700000000}]},
     "clients[0].lastContact: expected an RFC 3339 time such as 2026-11-30T08:00:00Z"),
])
def test_inventory_problems_name_the_field(document: Any, problem: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(document, RELAYS, "inv.json")
    assert f"inv.json: {problem}" in caught.value.problems


def test_inventory_parses_into_clients() -> None:
    clients = parse_inventory({"clients": [{
        "id": "pc-1", "relay": "relay-b", "facts": {"os": "linux", "arch": "arm64", "freeDiskMB": 10},
        "labels": {"b": "2", "a": "1"}, "installed": [{"name": "z", "version": "1"}, {"name": "a", "version": "2"}],
        "online": False, "lastContact": "2026-11-30T08:00:00Z"}]}, RELAYS)
    [c] = clients
    assert (c.id, c.relay, c.os, c.arch, c.free_disk_mb, c.labels, c.online) == \
        ("pc-1", "relay-b", "linux", "arm64", 10, (("a", "1"), ("b", "2")), False)
    assert c.last_seen is not None and c.last_seen.isoformat() == "2026-11-30T08:00:00+00:00"
    assert [(i.name, i.version) for i in c.installed] == [("a", "2"), ("z", "1")]
