"""HQ on real git: a bare origin in a temp dir, commits made here with git, relay refs via GitStore."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_report import assert_valid_status_files, relay_files

from reconciler import report
from reconciler.gitstore import ChangeWatcher, GitStore
from reconciler.hq import Hq, hq_metrics, make_app
from reconciler.plan import ClientState
from reconciler.redaction import split_credentials
from reconciler.resources import example_repo_dir
from reconciler.serving import Server
from reconciler.webhook import HookGuard, sign

ROOT = Path(__file__).resolve().parent.parent
OK, RUN, PEND, FAIL = ClientState.SUCCEEDED, ClientState.IN_PROGRESS, ClientState.PENDING, ClientState.FAILED
SECRET_TOKEN = "s3cr3t-t0ken-9f8e7d"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


class Origin:
    """A bare origin and a work tree that pushes to its main."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "origin.git"
        self.work = root / "work"
        git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(self.bare))
        shutil.copytree(example_repo_dir(), self.work)
        git(self.work, "init", "--quiet", "--initial-branch=main")
        git(self.work, "remote", "add", "origin", str(self.bare))
        self.head = self.commit("example repo")

    def commit(self, message: str, edit: Callable[[Path], None] | None = None) -> str:
        if edit is not None:
            edit(self.work)
        git(self.work, "add", "--all")
        git(self.work, "commit", "--quiet", "--allow-empty", "-m", message)
        git(self.work, "push", "--quiet", "origin", "HEAD:main")
        self.head = git(self.work, "rev-parse", "HEAD").strip()
        return self.head

    def ref(self, name: str) -> str | None:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/heads/{name}"], cwd=self.bare,
                              capture_output=True, text=True)
        return proc.stdout.strip() or None

    def files(self, ref: str) -> dict[str, bytes]:
        names = git(self.bare, "ls-tree", "-r", "--name-only", ref).split()
        return {n: subprocess.run(["git", "show", f"{ref}:{n}"], cwd=self.bare, check=True,
                                  capture_output=True).stdout for n in names}

    def yaml(self, ref: str, path: str) -> dict:
        return yaml.safe_load(git(self.bare, "show", f"{ref}:{path}"))

    def count(self, ref: str) -> int:
        return int(git(self.bare, "rev-list", "--count", ref).strip())


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.update(extra)
    return out


def run_cli(*args: str, extra_env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=ROOT, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)


def hq_pass(origin: Origin, workdir: Path) -> Hq:
    hq = Hq(GitStore(str(origin.bare), workdir))
    hq.run_pass()
    return hq


def publish_relay(origin: Origin, workdir: Path, relay: str, commit: str | None,
                  rows: dict[str, list[tuple[str, ClientState, str]]]) -> str | None:
    store = GitStore(str(origin.bare), workdir / relay)
    return store.publish(f"status/{relay}", relay_files(relay, commit, rows), f"status of {relay}")


def break_job(work: Path) -> None:
    path = work / "jobs" / "install-7zip.yaml"
    path.write_text(path.read_text().replace('version: "23.01"', 'version: "99.0"'))
    (work / "jobs" / "broken.yaml").write_text("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: broken\n")


def fix_job(work: Path) -> None:
    path = work / "jobs" / "install-7zip.yaml"
    path.write_text(path.read_text().replace('version: "99.0"', 'version: "23.01"'))
    (work / "jobs" / "broken.yaml").unlink()


# ------------------------------------------------------------- accept/reject


def test_accepts_a_valid_commit(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    assert hq.accepted_commit == origin.head
    accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
    assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (origin.head, origin.head, True)
    assert accepted.accepted_at is not None
    assert origin.yaml("status/hq", "validation.yaml") == {"mainCommit": origin.head, "valid": True, "errors": []}
    files = origin.files("status/hq")
    assert {f"jobs/{p.stem}.yaml" for p in (origin.work / "jobs").glob("*.yaml")} <= set(files)
    assert_valid_status_files(files)
    assert origin.ref("main") == origin.head  # HQ never writes main


def test_rejects_a_broken_commit_keeps_the_accepted_one_and_accepts_the_fix(origin: Origin, tmp_path: Path) -> None:
    good = origin.head
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    hq.run_pass()
    accepted_at = report.parse_accepted(origin.files("status/hq")["accepted.yaml"]).accepted_at

    bad = origin.commit("break a job", break_job)
    result = hq.run_pass()
    assert result.line is not None and "rejected main" in result.line
    files = origin.files("status/hq")
    accepted = report.parse_accepted(files["accepted.yaml"])
    assert accepted == report.Accepted(good, accepted_at, bad, False)
    validation = origin.yaml("status/hq", "validation.yaml")
    assert validation["mainCommit"] == bad and validation["valid"] is False
    by_path = {e["path"]: e for e in validation["errors"]}
    assert set(by_path) == {"jobs/broken.yaml", "jobs/install-7zip.yaml"}
    assert "no package 7zip 99.0" in by_path["jobs/install-7zip.yaml"]["message"]
    assert by_path["jobs/install-7zip.yaml"]["line"] == 10 and by_path["jobs/install-7zip.yaml"]["column"] > 1
    summary = files["summary.md"].decode()
    assert "is invalid and is not applied" in summary and "`jobs/install-7zip.yaml:10:" in summary
    assert yaml.safe_load(files["jobs/install-7zip.yaml"])["package"]["version"] == "23.01"  # old specs in force
    assert_valid_status_files(files)

    fixed = origin.commit("fix the job", fix_job)
    hq.run_pass()
    accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
    assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (fixed, fixed, True)
    assert origin.yaml("status/hq", "validation.yaml")["errors"] == []


def test_artifact_symlinks_are_followed_inside_the_repo_and_refused_outside(origin: Origin, tmp_path: Path) -> None:
    def inside(work: Path) -> None:
        (work / "artifacts" / "putty-current").symlink_to("putty-0.81")
        pkg = work / "packages" / "putty-0.81.yaml"
        pkg.write_text(pkg.read_text().replace("artifacts/putty-0.81", "artifacts/putty-current"))

    def outside(work: Path) -> None:
        link = work / "artifacts" / "putty-current"
        link.unlink()
        link.symlink_to("../../../../etc")

    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    good = origin.commit("artifact through an in-repo link", inside)
    hq.run_pass()
    assert hq.accepted_commit == good
    origin.commit("artifact through a link leaving the repo", outside)
    hq.run_pass()
    assert hq.accepted_commit == good
    errors = origin.yaml("status/hq", "validation.yaml")["errors"]
    assert [(e["path"], "leaves the repo through a symbolic link" in e["message"]) for e in errors] == [
        ("packages/putty-0.81.yaml", True)]


# ---------------------------------------------------------------- aggregate


def test_aggregates_relay_refs_including_a_nested_subtree(origin: Origin, tmp_path: Path) -> None:
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    hq.run_pass()
    accepted = origin.head
    relays = tmp_path / "relays"
    publish_relay(origin, relays, "relay-kanto", accepted, {
        "install-7zip": [("pc-kanto-001", OK, ""), ("pc-kanto-002", FAIL, "exit 3: no space left")],
        "install-teams-meeting": [("pc-kanto-001", OK, "")],
    })
    publish_relay(origin, relays, "relay-yokohama", accepted, {
        "install-7zip": [("pc-yoko-001", OK, ""), ("pc-yoko-002", RUN, "installing")],
        "install-putty": [("pc-yoko-001", OK, "")],
    })
    publish_relay(origin, relays, "relay-osaka", accepted, {"install-teams-meeting": [("pc-osaka-001", OK, "")]})
    result = hq.run_pass()
    assert result.relays_read == 3 and result.published is not None

    seven = origin.yaml("status/hq", "jobs/install-7zip.yaml")
    assert seven["relays"][0]["relay"] == "relay-kanto"
    assert seven["relays"][0]["subtree"] == ["relay-kanto", "relay-yokohama"]
    counts = seven["relays"][0]["counts"]
    assert (counts["Succeeded"], counts["Failed"], counts["InProgress"]) == (2, 1, 1)
    assert seven["state"] == "InProgress" and seven["clients"] == 4
    assert seven["failures"] == [{"relay": "relay-kanto", "client": "pc-kanto-002", "state": "Failed",
                                  "installedVersion": None, "attempts": 1, "message": "exit 3: no space left"}]
    teams = origin.yaml("status/hq", "jobs/install-teams-meeting.yaml")
    assert teams["waitingFor"] == ["relay-fukuoka"] and teams["state"] == "InProgress"
    overview = {r["relay"]: r for r in origin.yaml("status/hq", "relays.yaml")["relays"]}
    assert overview["relay-kanto"]["current"] is True and overview["relay-fukuoka"]["reported"] is False
    summary = origin.files("status/hq")["summary.md"].decode()
    assert "| install-7zip" in summary and "exit 3: no space left" in summary

    everything: dict[str, bytes] = dict(origin.files("status/hq"))
    for relay in ("relay-kanto", "relay-yokohama", "relay-osaka"):
        everything.update(origin.files(f"status/{relay}"))
    assert assert_valid_status_files(everything) == len(everything) - 1

    # Only the moved ref is read again.
    publish_relay(origin, relays, "relay-yokohama", accepted, {
        "install-7zip": [("pc-yoko-001", OK, ""), ("pc-yoko-002", OK, "")],
        "install-putty": [("pc-yoko-001", OK, "")],
    })
    result = hq.run_pass()
    assert result.relays_read == 1
    assert origin.yaml("status/hq", "jobs/install-7zip.yaml")["state"] == "Failed"


def test_unreadable_relay_status_is_reported_not_fatal(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    GitStore(str(origin.bare), tmp_path / "bad").publish(
        "status/relay-osaka", {"relays/relay-osaka/relay.yaml": b"relay: [unclosed\n"}, "garbage")
    hq.run_pass()
    overview = {r["relay"]: r for r in origin.yaml("status/hq", "relays.yaml")["relays"]}
    assert overview["relay-osaka"]["errors"][0].startswith("status unreadable:")
    assert_valid_status_files(origin.files("status/hq"))


def test_a_pass_with_nothing_new_makes_no_commit(origin: Origin, tmp_path: Path) -> None:
    hq = hq_pass(origin, tmp_path / "hq")
    publish_relay(origin, tmp_path / "relays", "relay-osaka", origin.head, {"install-teams-meeting": [("pc-1", OK, "")]})
    hq.run_pass()
    sha, commits = origin.ref("status/hq"), origin.count("status/hq")

    assert hq.run_pass().published is None
    assert Hq(GitStore(str(origin.bare), tmp_path / "hq")).run_pass().published is None  # restarted, same workdir
    proc = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "fresh"), "--once")
    assert proc.returncode == 0, proc.stderr
    # Republishing identical relay status is no change either.
    assert publish_relay(origin, tmp_path / "relays", "relay-osaka", origin.head,
                         {"install-teams-meeting": [("pc-1", OK, "")]}) is None
    hq.run_pass()
    assert (origin.ref("status/hq"), origin.count("status/hq")) == (sha, commits)


def test_restarted_hq_resumes_from_git(origin: Origin, tmp_path: Path) -> None:
    good = origin.head
    hq_pass(origin, tmp_path / "hq-1")
    accepted_at = report.parse_accepted(origin.files("status/hq")["accepted.yaml"]).accepted_at
    origin.commit("break a job", break_job)
    # A brand-new HQ (empty workdir) sees an invalid main: the accepted commit comes back from status/hq.
    hq = hq_pass(origin, tmp_path / "hq-2")
    assert hq.accepted_commit == good
    accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
    assert (accepted.accepted_commit, accepted.accepted_at, accepted.main_valid) == (good, accepted_at, False)


def test_two_hq_processes_racing_cannot_corrupt_status(origin: Origin, tmp_path: Path) -> None:
    publish_relay(origin, tmp_path / "relays", "relay-kanto", origin.head, {"install-7zip": [("pc-1", OK, "")]})
    for round_ in range(3):
        if round_:
            origin.commit(f"change {round_}", lambda w, r=round_: (w / "README.md").write_text(f"round {r}\n"))
        procs = [
            subprocess.Popen([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin.bare),
                              "--workdir", str(tmp_path / f"hq-{i}"), "--once"],
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        accepted = report.parse_accepted(origin.files("status/hq")["accepted.yaml"])
        assert accepted.accepted_commit == origin.head
        assert_valid_status_files(origin.files("status/hq"))
    git(origin.bare, "fsck", "--strict", "--no-dangling")
    parents = [line.split()[1:] for line in git(origin.bare, "rev-list", "--parents", "status/hq").splitlines()]
    assert all(len(p) <= 1 for p in parents)  # one linear history: nothing was forced or merged


# -------------------------------------------------------------- credentials


def _credential_env(origin: Origin, url: str) -> dict[str, str]:
    """Make git fetch ``url`` (with credentials) from the local bare origin."""
    # git sees the URL without its user-info (the credentials travel as an Authorization header entry)
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{origin.bare}.insteadOf",
            "GIT_CONFIG_VALUE_0": split_credentials(url)[0]}


def test_credentials_in_the_origin_url_never_reach_output(origin: Origin, tmp_path: Path) -> None:
    url = f"https://reconciler:{SECRET_TOKEN}@git.example.invalid/acme/specs.git"
    proc = run_cli("hq", "--origin", url, "--workdir", str(tmp_path / "hq"), "--once",
                   extra_env=_credential_env(origin, url))
    assert proc.returncode == 0, proc.stderr
    assert "accepted main" in proc.stderr
    files = origin.files("status/hq")
    messages = git(origin.bare, "log", "--format=%B", "status/hq")
    leaked = [name for name, data in files.items() if SECRET_TOKEN.encode() in data]
    assert leaked == [] and SECRET_TOKEN not in messages + proc.stdout + proc.stderr
    assert not any(SECRET_TOKEN.encode() in p.read_bytes() for p in (tmp_path / "hq").rglob("config"))

    proc = run_cli("status", "--origin", url, "--format", "json",
                   extra_env={**_credential_env(origin, url), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert SECRET_TOKEN not in proc.stdout + proc.stderr

    # A failing origin: the error names it, redacted.
    dead = f"https://reconciler:{SECRET_TOKEN}@127.0.0.1:9/acme/specs.git"
    proc = run_cli("hq", "--origin", dead, "--workdir", str(tmp_path / "hq-dead"), "--once")
    assert proc.returncode == 1
    assert "https://***@127.0.0.1:9/acme/specs.git" in proc.stderr
    assert SECRET_TOKEN not in proc.stdout + proc.stderr
    proc = run_cli("status", "--origin", dead, extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 2 and SECRET_TOKEN not in proc.stdout + proc.stderr


# ------------------------------------------------------------------ webhook


def test_webhook_checks_the_signature_and_wakes_the_watcher() -> None:
    watcher = ChangeWatcher("https://git.example.invalid/acme/specs.git", poll_interval=3600)
    watcher.start()
    server = Server(make_app(watcher.trigger, b"hook-secret", lambda: {"acceptedCommit": None}), "127.0.0.1:0").start()
    try:
        hook = server.url + "/v1/hooks/git"
        body = b'{"ref": "refs/heads/main"}'
        for headers in ({}, {"X-Hub-Signature-256": "sha256=" + "0" * 64},
                        {"X-Hub-Signature-256": sign(b"other-secret", body)},
                        {"X-Hub-Signature-256": sign(b"hook-secret", body + b" ")}):
            response = requests.post(hook, data=body, headers=headers, timeout=10)
            assert response.status_code == 401
            assert "X-Hub-Signature-256" in response.json()["error"]
        assert watcher.wait(timeout=0.05) is False  # nothing woke it
        response = requests.post(hook, data=body, headers={"X-Hub-Signature-256": sign(b"hook-secret", body)}, timeout=10)
        assert response.status_code == 202 and response.json()["ok"] is True
        assert watcher.wait(timeout=5) is True
        health = requests.get(server.url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json() == {"ok": True, "acceptedCommit": None}
        assert requests.get(hook, timeout=10).status_code == 405
        missing = requests.get(server.url + "/nope", timeout=10)
        assert missing.status_code == 404 and "error" in missing.json()
    finally:
        server.close()
        watcher.stop()


def test_metrics_show_the_aggregated_rows_and_time_passes(origin: Origin, tmp_path: Path) -> None:
    """HQ's ``GET /metrics`` (README, "Metrics"): rows by job and state are the counts status/hq publishes."""
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"))
    metrics = hq_metrics(hq)
    server = Server(make_app(lambda: None, None, hq.health, metrics=metrics), "127.0.0.1:0").start()
    try:
        def scrape() -> dict[tuple[str, str], float]:
            response = requests.get(server.url + "/metrics", timeout=10)
            assert response.status_code == 200
            return {(s.labels["job"], s.labels["state"]): s.value for f in text_string_to_metric_families(response.text)
                    for s in f.samples if s.name == "reconciler_rows"}

        assert scrape() == {}  # no pass yet
        hq.run_pass()
        publish_relay(origin, tmp_path / "relays", "relay-kanto", origin.head, {
            "install-7zip": [("pc-kanto-001", OK, ""), ("pc-kanto-002", FAIL, "exit 3")]})
        hq.run_pass()
        rows = scrape()
        published = origin.yaml("status/hq", "jobs/install-7zip.yaml")["counts"]
        assert {state: rows[("install-7zip", state)] for state in published} == published
        assert (rows[("install-7zip", "Succeeded")], rows[("install-7zip", "Failed")]) == (1, 1)
        assert metrics.registry.get_sample_value("reconciler_hq_pass_seconds_count") == 2
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.close()
    bare = Server(make_app(lambda: None, None), "127.0.0.1:0").start()
    try:
        assert requests.get(bare.url + "/metrics", timeout=10).status_code == 404
    finally:
        bare.close()


def test_webhook_is_refused_without_a_secret_unless_explicitly_insecure() -> None:
    woke = threading.Event()
    server = Server(make_app(woke.set, None, lambda: {"acceptedCommit": None}), "127.0.0.1:0").start()
    try:
        response = requests.post(server.url + "/v1/hooks/git", data=b"{}", timeout=10)
        assert response.status_code == 401 and "--insecure-unsigned-webhook" in response.json()["error"]
        assert not woke.is_set()
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.close()
    server = Server(make_app(woke.set, HookGuard(None, insecure=True)), "127.0.0.1:0").start()
    try:
        assert requests.post(server.url + "/v1/hooks/git", data=b"{}", timeout=10).status_code == 202
        assert woke.is_set()
    finally:
        server.close()


class _Lines:
    """Lines of a stream, read on a thread, waited for with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.seen)}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


def _wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        threading.Event().wait(0.05)


@pytest.fixture
def service() -> Iterator[Callable[..., tuple[subprocess.Popen[str], _Lines]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], _Lines]:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "hq", *args], cwd=ROOT, env=env(**(extra_env or {})),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc, _Lines(proc.stderr)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _accepted_commit(origin: Origin) -> str | None:
    if origin.ref("status/hq") is None:
        return None
    return report.parse_accepted(origin.files("status/hq")["accepted.yaml"]).accepted_commit


def test_hq_service_follows_a_local_origin_and_stops_on_sigterm(origin: Origin, tmp_path: Path, service) -> None:
    proc, lines = service("--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--poll-interval", "3600")
    lines.wait_for(r"pass: accepted main")
    head = origin.commit("another change", lambda w: (w / "README.md").write_text("changed\n"))
    _wait_until(lambda: _accepted_commit(origin) == head)  # woken by the watch on the origin's refs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    lines.wait_for(r"HQ stopped")


def test_hq_service_is_woken_by_a_signed_webhook(origin: Origin, tmp_path: Path, service) -> None:
    url = f"https://reconciler:{SECRET_TOKEN}@git.example.invalid/acme/specs.git"  # no local watch possible
    secret_file = tmp_path / "hook-secret"
    secret_file.write_text("hook-secret\n")
    proc, lines = service("--origin", url, "--workdir", str(tmp_path / "hq"), "--poll-interval", "3600",
                          "--listen", "127.0.0.1:0", "--insecure-http", "--webhook-secret-file", str(secret_file),
                          extra_env=_credential_env(origin, url))
    base = lines.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
    lines.wait_for(r"pass: accepted main")
    head = origin.commit("another change", lambda w: (w / "README.md").write_text("changed\n"))
    body = b'{"ref": "refs/heads/main"}'
    assert requests.post(base + "/v1/hooks/git", data=body, timeout=10).status_code == 401
    response = requests.post(base + "/v1/hooks/git", data=body,
                             headers={"X-Hub-Signature-256": sign(b"hook-secret", body)}, timeout=10)
    assert response.status_code == 202
    replay = requests.post(base + "/v1/hooks/git", data=body,
                           headers={"X-Hub-Signature-256": sign(b"hook-secret", body)}, timeout=10)
    assert replay.status_code == 409
    _wait_until(lambda: _accepted_commit(origin) == head)
    assert requests.get(base + "/healthz", timeout=10).json()["acceptedCommit"] == head
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert SECRET_TOKEN not in "".join(lines.seen)
