"""``reconciler status`` against a real origin, with relay status refs written by the tests."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from test_hq import ROOT, Origin, env, git, hq_pass, publish_relay, run_cli

from reconciler.plan import ClientState

OK, RUN, PEND, FAIL, SKIP = (ClientState.SUCCEEDED, ClientState.IN_PROGRESS, ClientState.PENDING,
                             ClientState.FAILED, ClientState.SKIPPED)
RELAYS = ("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka")


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def settled_rows(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
    rows = {
        "relay-kanto": {"install-7zip": [("pc-kanto-001", OK, "installed"), ("pc-kanto-002", FAIL, "exit 3: disk full")],
                        "install-office-addin": [("pc-kanto-001", OK, "installed")]},
        "relay-yokohama": {"install-7zip": [("pc-yoko-001", OK, ""), ("pc-yoko-002", SKIP, "requires os windows")],
                           "install-putty": [("pc-yoko-001", PEND, "scheduled for 2030-01-01T00:00:00Z")]},
        "relay-osaka": {"install-teams-meeting": [("pc-osaka-001", OK, "")],
                        "install-office-addin": [("pc-osaka-001", OK, "installed")]},
        "relay-fukuoka": {},
    }
    return rows[relay]


def publish_all(origin: Origin, tmp_path: Path, rows_of=settled_rows, commit: str | None = None,
                relays: tuple[str, ...] = RELAYS) -> None:
    for relay in relays:
        publish_relay(origin, tmp_path / "relays", relay, commit or origin.head, rows_of(relay))


def status(origin: Origin, tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if cwd is None:
        return run_cli("status", "--origin", str(origin.bare), *args,
                       extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    return subprocess.run([sys.executable, "-m", "reconciler", "status", *args], cwd=cwd,
                          env=env(XDG_CACHE_HOME=str(tmp_path / "cache")), capture_output=True, text=True, timeout=120)


@pytest.fixture
def fleet(origin: Origin, tmp_path: Path) -> Origin:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path)
    hq.run_pass()
    return origin


def test_json_report(fleet: Origin, tmp_path: Path) -> None:
    proc = status(fleet, tmp_path, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc) == ["acceptedCommit", "mainCommit", "valid", "evaluationError", "validationErrors", "jobs",
                         "relays"]
    assert (doc["acceptedCommit"], doc["mainCommit"], doc["valid"], doc["evaluationError"],
            doc["validationErrors"]) == (fleet.head, fleet.head, True, None, [])
    jobs = {j["name"]: j for j in doc["jobs"]}
    seven = jobs["install-7zip"]
    assert list(seven) == ["name", "state", "scheduledFor", "counts", "rebootRequired", "pending", "skipped",
                           "notRegistered", "relays", "clients"]
    assert seven["rebootRequired"] == 0
    assert seven["notRegistered"] == []
    assert seven["scheduledFor"] is None
    assert seven["skipped"] == [{"message": "requires os windows", "count": 1}]
    assert seven["state"] == "Failed"
    assert seven["counts"]["Succeeded"] == 2 and seven["counts"]["Skipped"] == 1 and seven["counts"]["Failed"] == 1
    assert seven["relays"] == [{"relay": "relay-kanto", "state": "Failed", "counts": seven["counts"],
                                "rebootRequired": 0}]
    assert seven["clients"] == [
        {"client": "pc-kanto-001", "relay": "relay-kanto", "state": "Succeeded", "reason": None, "installedVersion": "1.0",
         "attempts": 1, "message": "installed"},
        {"client": "pc-kanto-002", "relay": "relay-kanto", "state": "Failed", "reason": None, "installedVersion": None,
         "attempts": 1, "message": "exit 3: disk full"},
        {"client": "pc-yoko-001", "relay": "relay-yokohama", "state": "Succeeded", "reason": None, "installedVersion": "1.0",
         "attempts": 1, "message": ""},
        {"client": "pc-yoko-002", "relay": "relay-yokohama", "state": "Skipped", "reason": None, "installedVersion": None,
         "attempts": 0, "message": "requires os windows"},
    ]
    assert jobs["install-vcredist"]["state"] == "NoTargets" and jobs["install-vcredist"]["clients"] == []

    only = json.loads(status(fleet, tmp_path, "--format", "json", "--job", "install-putty").stdout)
    assert [j["name"] for j in only["jobs"]] == ["install-putty"]


def test_text_and_markdown(fleet: Origin, tmp_path: Path) -> None:
    text = status(fleet, tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"Accepted commit {fleet.head[:12]}")
    header = next(line for line in lines if line.startswith("JOB"))
    assert header.split() == ["JOB", "PACKAGE", "CLIENTS", "OK", "RUN", "PEND", "FAIL", "SKIP", "CONF", "STATE"]
    assert any(line.startswith("install-7zip") and line.split()[-1] == "Failed" for line in lines)
    assert "exit 3: disk full" in text.stdout

    markdown = status(fleet, tmp_path, "--format", "markdown")
    summary = subprocess.run(["git", "show", "status/hq:summary.md"], cwd=fleet.bare, capture_output=True,
                             text=True, check=True).stdout
    assert markdown.stdout == summary

    one = status(fleet, tmp_path, "--job", "install-7zip")
    assert one.returncode == 0
    assert "Clients (4):" in one.stdout and "pc-yoko-002" in one.stdout and "install-putty" not in one.stdout

    unknown = status(fleet, tmp_path, "--job", "install-nothing")
    assert unknown.returncode == 2
    assert "no job 'install-nothing'" in unknown.stderr and "install-7zip" in unknown.stderr


def test_default_origin_is_the_current_repository_remote(fleet: Origin, tmp_path: Path) -> None:
    proc = status(fleet, tmp_path, "--format", "json", cwd=fleet.work)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["acceptedCommit"] == fleet.head
    elsewhere = tmp_path / "not-a-repo"
    elsewhere.mkdir()
    proc = status(fleet, tmp_path, cwd=elsewhere)
    assert proc.returncode == 2 and "--origin" in proc.stderr


def test_default_origin_from_any_folder_of_an_admins_clone(fleet: Origin, tmp_path: Path) -> None:
    """Without --origin, status reads the remote ``git fetch`` would: the branch's upstream, else origin."""
    def accepted(cwd: Path) -> str:
        proc = status(fleet, tmp_path, "--format", "json", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        return str(json.loads(proc.stdout)["acceptedCommit"])

    clones = tmp_path / "clones"
    clones.mkdir()
    git(clones, "clone", "-q", str(fleet.bare), "admin")
    admin = clones / "admin"
    nested = admin / "artifacts" / "7zip-23.01" / "bin"
    assert nested.is_dir()
    assert accepted(admin / "jobs") == fleet.head
    assert accepted(nested) == fleet.head
    # A remote not named origin that the branch tracks (git clone -o hq).
    git(clones, "clone", "-q", "-o", "hq", str(fleet.bare), "named")
    assert accepted(clones / "named" / "jobs") == fleet.head
    # origin is someone's fork, empty; main tracks the company's remote, which wins as git fetch's does.
    git(tmp_path, "init", "-q", "--bare", "fork.git")
    git(clones, "clone", "-q", "-o", "company", str(fleet.bare), "forked")
    git(clones / "forked", "remote", "add", "origin", str(tmp_path / "fork.git"))
    assert accepted(clones / "forked" / "packages") == fleet.head
    # Detached (no branch, so no upstream): origin; here that is the fork, which has no status yet.
    git(clones / "forked", "checkout", "-q", "--detach")
    proc = status(fleet, tmp_path, cwd=clones / "forked" / "jobs")
    assert proc.returncode == 0 and "No status/hq on the origin yet" in proc.stdout, proc.stdout + proc.stderr
    # A relative local URL is read from the top of the work tree, as git reads it, not from the folder.
    git(admin, "remote", "set-url", "origin", "../../origin.git")
    assert accepted(nested) == fleet.head
    # No upstream and no origin: exit 2, asking for --origin.
    git(admin, "remote", "rename", "origin", "mirror")
    git(admin, "config", "--unset", "branch.main.remote")
    proc = status(fleet, tmp_path, cwd=admin / "jobs")
    assert proc.returncode == 2 and "--origin" in proc.stderr, proc.stderr


def test_the_readmes_git_commands_for_status_work_in_an_admins_clone(fleet: Origin, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Reading status"):readme.index("### Clients move and retire")]
    commands = [c for c in re.findall(r"`(git [^`]+)`", section) if " -C " not in c]
    assert {c.split()[1] for c in commands} >= {"fetch", "log", "show"}, commands
    git(tmp_path, "clone", "-q", str(fleet.bare), "admin")
    jobs = tmp_path / "admin" / "jobs"
    # In a clone the status refs are remote branches: the short name is not a ref there.
    bare_name = subprocess.run(["git", "log", "--oneline", "status/hq"], cwd=jobs, capture_output=True, text=True)
    assert bare_name.returncode != 0
    # Give HQ a newer report after the clone was made, so only a fetch brings it.
    cloned = git(jobs, "rev-parse", "origin/status/hq").strip()
    publish_all(fleet, tmp_path, rows_of=lambda relay: {})
    hq_pass(fleet, tmp_path / "hq-again")
    assert git(fleet.bare, "rev-parse", "status/hq").strip() != cloned
    outputs = {}
    for command in commands:
        proc = subprocess.run(shlex.split(command), cwd=jobs, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        outputs[command] = proc.stdout
    summary = next(out for command, out in outputs.items() if command.startswith("git show"))
    assert summary == git(fleet.bare, "show", "status/hq:summary.md")
    history = next(out for command, out in outputs.items() if command.startswith("git log"))
    assert git(fleet.bare, "rev-parse", "status/hq").strip() in history


def test_wait_exits_1_when_settled_with_failures(fleet: Origin, tmp_path: Path) -> None:
    # Failed and Skipped rows are settled; the Pending row waits for a future schedule.
    proc = status(fleet, tmp_path, "--wait", "--timeout", "30", "--format", "json")
    assert proc.returncode == 1, proc.stderr  # settled: a timeout would exit 4
    assert json.loads(proc.stdout)["acceptedCommit"] == fleet.head
    assert proc.stderr == "reconciler status: settled with failures: install-7zip (Failed, 1 failed)\n"
    # the job asked about decides alone
    assert status(fleet, tmp_path, "--wait", "--timeout", "30", "--job", "install-putty").returncode == 0


def all_good(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
    rows = settled_rows(relay)
    if relay == "relay-kanto":
        rows = {**rows, "install-7zip": [("pc-kanto-001", OK, "installed"), ("pc-kanto-002", OK, "installed")]}
    return rows


def test_wait_exits_0_when_settled_and_all_good(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, all_good)
    hq.run_pass()
    proc = status(origin, tmp_path, "--wait", "--timeout", "30", "--commit", origin.head)
    assert (proc.returncode, proc.stderr) == (0, "")
    # an older commit that the accepted one contains is rolled out too; an abbreviation will do
    older = origin.head
    origin.commit("docs", lambda w: (w / "README.md").write_text("more\n"))
    hq.run_pass()
    publish_all(origin, tmp_path, all_good)
    assert status(origin, tmp_path, "--wait", "--timeout", "30", "--commit", older[:10]).returncode == 0
    unknown = status(origin, tmp_path, "--wait", "--timeout", "30", "--commit", "0" * 40)
    assert (unknown.returncode, unknown.stderr) == (2, f"reconciler status: commit {'0' * 40!r} is not on the origin\n")
    assert status(origin, tmp_path, "--commit", origin.head).returncode == 2  # --commit needs --wait


def test_wait_for_head_means_the_callers_checkout_and_it_must_be_pushed(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, all_good)
    hq.run_pass()
    pushed = origin.head
    (origin.work / "README.md").write_text("not pushed\n")
    subprocess.run(["git", "commit", "-q", "-am", "local only"], cwd=origin.work, check=True, env=env())
    local = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin.work, capture_output=True, text=True,
                           check=True).stdout.strip()
    proc = status(origin, tmp_path, "--origin", str(origin.bare), "--wait", "--timeout", "5", "--commit", "HEAD",
                  cwd=origin.work)
    assert proc.returncode == 2
    assert proc.stderr == (f"reconciler status: 'HEAD' is {local[:12]} here but {pushed[:12]} on the origin; "
                           "push it, or give the sha\n")
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=origin.work, check=True, env=env())
    hq.run_pass()
    publish_all(origin, tmp_path, all_good, commit=local)
    proc = status(origin, tmp_path, "--origin", str(origin.bare), "--wait", "--timeout", "30", "--commit", "HEAD~0",
                  cwd=origin.work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_wait_exits_3_when_the_awaited_commit_is_rejected(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, all_good)
    hq.run_pass()
    good = origin.head

    def break_spec(work: Path) -> None:
        path = work / "jobs" / "install-7zip.yaml"
        path.write_text(path.read_text().replace('version: "23.01"', 'version: "99.0"'))

    bad = origin.commit("a job naming a package that does not exist", break_spec)
    hq.run_pass()
    proc = status(origin, tmp_path, "--wait", "--timeout", "30")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"reconciler status: {bad[:12]} was rejected: main {bad[:12]} does not validate "
                        f"(1 error); the accepted commit {good[:12]} stays in force")
    assert lines[1].startswith("  jobs/install-7zip.yaml:") and "99.0" in lines[1]
    assert "INVALID" in proc.stdout  # the report says it too
    # the commit before it is in force and settled: waiting for it succeeds
    assert status(origin, tmp_path, "--wait", "--timeout", "30", "--commit", good).returncode == 0


def test_wait_times_out_saying_what_it_waits_for(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")

    def busy(relay: str) -> dict[str, list[tuple[str, ClientState, str]]]:
        rows = settled_rows(relay)
        if relay == "relay-yokohama":
            rows = {**rows, "install-7zip": [("pc-yoko-001", RUN, "installing"), ("pc-yoko-002", PEND, "")]}
        return rows

    publish_all(origin, tmp_path, busy, relays=("relay-kanto", "relay-yokohama", "relay-osaka"))
    hq.run_pass()
    proc = status(origin, tmp_path, "--wait", "--timeout", "1")
    assert proc.returncode == 4
    assert "timed out after 1s; still waiting for:" in proc.stderr
    assert "relay relay-fukuoka has not published status yet" in proc.stderr
    assert "job install-7zip: 2 clients Pending or InProgress on relay-yokohama (pc-yoko-001, pc-yoko-002)" in proc.stderr
    assert "install-putty" not in proc.stderr.split("still waiting for:")[1]  # its only row waits for a schedule
    assert proc.stdout.startswith("Accepted commit")  # the report is still printed

    # A relay still on an older accepted commit is waited for too.
    old = origin.head
    origin.commit("change", lambda w: (w / "README.md").write_text("changed\n"))
    hq.run_pass()
    publish_all(origin, tmp_path, busy, commit=old, relays=("relay-fukuoka",))
    proc = status(origin, tmp_path, "--wait", "--timeout", "1")
    assert proc.returncode == 4
    assert f"relay relay-fukuoka has not published status for the accepted commit {origin.head[:12]} " \
           f"(it reports {old[:12]})" in proc.stderr


def test_wait_notices_hq_has_not_evaluated_main(fleet: Origin, tmp_path: Path) -> None:
    head = fleet.commit("change", lambda w: (w / "README.md").write_text("changed\n"))
    proc = status(fleet, tmp_path, "--wait", "--timeout", "1")
    assert proc.returncode == 4
    assert f"HQ has not evaluated main {head[:12]} yet" in proc.stderr
    assert status(fleet, tmp_path, "--wait", "--timeout", "1", "--job", "install-7zip").returncode == 4


def test_wait_without_hq(origin: Origin, tmp_path: Path) -> None:
    proc = status(origin, tmp_path, "--wait", "--timeout", "1")
    assert proc.returncode == 4 and "HQ has not published status/hq yet" in proc.stderr
    assert "HQ has not run a pass" in status(origin, tmp_path).stdout


def test_wait_returns_as_soon_as_the_system_settles(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, relays=("relay-kanto", "relay-yokohama", "relay-osaka"))
    hq.run_pass()
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "status", "--origin", str(origin.bare), "--wait",
                             "--timeout", "60", "--format", "json"], cwd=ROOT,
                            env=env(XDG_CACHE_HOME=str(tmp_path / "cache-wait")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)  # still waiting for relay-fukuoka
        publish_all(origin, tmp_path, relays=("relay-fukuoka",))
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 1, err  # settled (with kanto's failure) once fukuoka published, before 60 s
        assert json.loads(out)["acceptedCommit"] == origin.head
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_concurrent_status_commands_share_nothing_unsafely(fleet: Origin, tmp_path: Path) -> None:
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "reconciler", "status", "--origin", str(fleet.bare),
                               "--format", "json"], cwd=ROOT, env=env(**cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["acceptedCommit"] == fleet.head
    assert os.listdir(tmp_path / "cache" / "reconciler" / "status")


# ------------------------------------------------------------ --wait progress


def yokohama_installing(relay: str) -> dict[str, list[tuple[ClientState, ...]]]:
    rows = settled_rows(relay)
    if relay == "relay-yokohama":
        rows = {**rows, "install-7zip": [("pc-yoko-001", RUN, "installing"), ("pc-yoko-002", SKIP, "requires os windows")]}
    return rows


def read_until(fd: int, seen: bytearray, wanted: bytes, seconds: float = 60.0) -> None:
    """Read ``fd`` into ``seen`` until ``wanted`` is in it (or the writer closed it), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} within {seconds:g} s; got {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # a pseudo-terminal whose other end closed: EIO
            chunk = b""
        if not chunk:
            return
        seen += chunk


def start_wait(origin: Origin, tmp_path: Path, stderr: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "reconciler", "status", "--origin", str(origin.bare), "--wait",
                             "--timeout", "60", "--format", "json"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            env=env(XDG_CACHE_HOME=str(tmp_path / "cache-wait")), stdout=subprocess.PIPE,
                            stderr=stderr)


def busy_fleet(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_all(origin, tmp_path, yokohama_installing)
    hq.run_pass()


OTHERS = b" | install-office-addin 2/2 | install-putty 0/1 | install-teams-meeting 1/1 | install-vcredist 0/0 | " \
    b"install-vpn-client 0/0 | uninstall-legacy-toolbar 0/0"
# kanto's pc-kanto-002 Failed, yokohama's pc-yoko-001 InProgress; then pc-yoko-001 Succeeded: settled
BEFORE = b"install-7zip 1/4 (1 failed)" + OTHERS + \
    b" \xe2\x80\x94 waiting: job install-7zip: 1 client Pending or InProgress on relay-yokohama (pc-yoko-001)"
AFTER = b"install-7zip 2/4 (1 failed)" + OTHERS


def test_wait_on_a_terminal_redraws_one_progress_line(origin: Origin, tmp_path: Path) -> None:
    busy_fleet(origin, tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 400, 0, 0))  # wide: no line is cut
    proc = start_wait(origin, tmp_path, slave)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, seen, BEFORE)
        publish_all(origin, tmp_path, relays=("relay-yokohama",))
        out, _ = proc.communicate(timeout=60)
        read_until(master, seen, b"\x00")  # the rest, up to the end of the output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    assert proc.returncode == 1, bytes(seen)  # settled, with kanto's failure
    assert json.loads(out)["acceptedCommit"] == origin.head
    text = bytes(seen).replace(b"\r\n", b"\n")  # the terminal's own newline translation
    # each state is drawn over the last from column 0, erasing its rest: one line, redrawn once per change
    assert text.split(b"\r\x1b[K") == [b"", BEFORE, AFTER + b"\n" + text.split(b"\n", 1)[1]], text
    assert text.split(b"\n", 1)[1].startswith(b"reconciler status: settled with failures: install-7zip"), text


def test_wait_on_a_narrow_terminal_cuts_the_line_instead_of_wrapping(origin: Origin, tmp_path: Path) -> None:
    busy_fleet(origin, tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    proc = start_wait(origin, tmp_path, slave)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, seen, BEFORE[:39])
        publish_all(origin, tmp_path, relays=("relay-yokohama",))
        out, _ = proc.communicate(timeout=60)
        read_until(master, seen, b"\x00")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    assert proc.returncode == 1, bytes(seen)
    # 40 columns: 39 characters, so the cursor stays on the line \r returns to
    draws = bytes(seen).split(b"\r\n")[0].split(b"\r\x1b[K")
    assert draws == [b"", BEFORE[:39], AFTER[:39]], bytes(seen)


def test_wait_into_a_pipe_prints_one_plain_line_per_change(origin: Origin, tmp_path: Path) -> None:
    busy_fleet(origin, tmp_path)
    proc = start_wait(origin, tmp_path, subprocess.PIPE)
    assert proc.stderr is not None
    seen = bytearray()
    try:
        read_until(proc.stderr.fileno(), seen, BEFORE)
        publish_all(origin, tmp_path, relays=("relay-yokohama",))
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    seen += rest
    assert proc.returncode == 1, bytes(seen)
    assert json.loads(out)["acceptedCommit"] == origin.head
    assert b"\r" not in seen and b"\x1b" not in seen, bytes(seen)
    lines = bytes(seen).split(b"\n")
    # one line per change, then the verdict
    assert lines[:2] == [BEFORE, AFTER], lines
    assert lines[2].startswith(b"reconciler status: settled with failures: install-7zip") and lines[3:] == [b""], lines


def test_wait_into_a_pipe_repeats_no_line_while_nothing_changes(origin: Origin, tmp_path: Path) -> None:
    busy_fleet(origin, tmp_path)
    proc = status(origin, tmp_path, "--wait", "--timeout", "3")  # about three polls, a second apart
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == BEFORE.decode(), lines
    assert lines[1].startswith("reconciler status: timed out after 3s; still waiting for:"), lines
