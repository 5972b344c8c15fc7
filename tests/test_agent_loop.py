"""The agent against a real HTTP server on 127.0.0.1 that plays the relay (PROTOCOL.md).

The fake relay registers clients and hands out tokens, refuses check-ins with
a missing or wrong token, serves artifacts with Range support, replies with
canned actions and records every request it received. A test can hold
artifact downloads open (``hold_downloads``) to catch an agent mid-download.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.agent.agent import ARCH_VALUES, Agent, AgentConfigError, main
from reconciler.agent.reboot import read_boot_id

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class FakeRelay:
    """Relay state outliving its HTTP server, so a test can take the relay down and back up."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.checkins: list[dict[str, Any]] = []
        self.artifact_requests: list[dict[str, str]] = []
        self.replies: deque[list[dict[str, Any]]] = deque()
        self.artifacts: dict[str, bytes] = {}
        # while not None, artifact requests are recorded and left unanswered until the event is set
        self.hold_downloads: threading.Event | None = None
        # while True, artifact requests get their connection closed without an answer (a network blip)
        self.drop_downloads = False
        self.poll_seconds = 7
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value).encode())

            def do_POST(self) -> None:
                match = re.fullmatch(r"/v1/clients/([a-z0-9.-]+)/checkin", self.path)
                if not match:
                    return self._json(404, {"error": "not found"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                client = match.group(1)
                auth = self.headers.get("Authorization")
                relay.checkins.append({"client": client, "auth": auth, "body": body})
                reply: dict[str, Any] = {"pollSeconds": relay.poll_seconds}
                if client in relay.tokens:
                    if auth is None:
                        return self._json(401, {"error": "token required"})
                    if auth != f"Bearer {relay.tokens[client]}":
                        return self._json(403, {"error": "token does not match"})
                else:
                    relay.tokens[client] = reply["token"] = secrets.token_hex(16)
                reply["actions"] = relay.replies.popleft() if relay.replies else []
                self._json(200, reply)

            def do_GET(self) -> None:
                match = re.fullmatch(r"/v1/artifacts/([0-9a-f]{64})", self.path)
                if not match or match.group(1) not in relay.artifacts:
                    return self._json(404, {"error": "unknown artifact"})
                data = relay.artifacts[match.group(1)]
                relay.artifact_requests.append({"sha256": match.group(1), "range": self.headers.get("Range", "")})
                if relay.drop_downloads:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                hold = relay.hold_downloads
                if hold is not None:  # never answered: the client it was meant for gets killed meanwhile
                    hold.wait(timeout=60)
                    return
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged:
                    start = int(ranged.group(1))
                    return self._send(206, data[start:], "application/octet-stream",
                                      {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                self._send(200, data, "application/octet-stream")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None

    def bodies(self) -> list[dict[str, Any]]:
        return [c["body"] for c in self.checkins]


@pytest.fixture
def relay() -> Any:
    server = FakeRelay()
    server.start()
    yield server
    if server._server is not None:
        server.stop()


def make_tar(files: dict[str, str]) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    content = buffer.getvalue()
    return content, hashlib.sha256(content).hexdigest()


def files_action(op: str, sha: str, size: int, name: str = "notes", version: str = "1.0",
                 kind: str = "install", previous: str | None = None) -> dict[str, Any]:
    return {"operationId": op, "job": f"install-{name}", "action": kind,
            "package": {"name": name, "version": version}, "previousVersion": previous,
            "artifact": {"sha256": sha, "size": size, "format": "tar"},
            "installer": {"type": "files", "install": [], "uninstall": [], "detect": [], "timeoutSeconds": 600}}


def results_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["operationId"]: r for r in body["results"]}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_registration_facts_labels_and_token(relay: FakeRelay, tmp_path: Path) -> None:
    agent = Agent("pc-001", relay.url, tmp_path / "root", {"dept": "sales"},
                  [("os", "windows"), ("freeDiskMB", "123"), ("hostname", "sim-001")], insecure_http=True)
    first = agent.step()
    assert first.reached and first.poll_seconds == 7
    body = relay.checkins[0]["body"]
    assert set(body) == {"facts", "labels", "inventory", "results"}
    boot = read_boot_id()  # this machine's, where it has one readable
    assert body["facts"] == {"os": "windows", "arch": body["facts"]["arch"], "hostname": "sim-001",
                             "freeDiskMB": 123, **({"bootId": boot} if boot is not None else {})}
    assert body["facts"]["arch"] in ARCH_VALUES
    assert body["labels"] == {"dept": "sales"} and body["inventory"] == [] and body["results"] == []
    assert relay.checkins[0]["auth"] is None
    token_file = tmp_path / "root" / "token"
    assert token_file.read_text() == relay.tokens["pc-001"]
    if os.name != "nt":
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert agent.step().reached
    assert relay.checkins[1]["auth"] == f"Bearer {relay.tokens['pc-001']}"


def test_the_relay_that_answered_last_is_sent_back_and_a_damaged_record_of_it_is_ignored(
        relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "relay").write_bytes(b"../etc\xff\n")
    agent = Agent("pc-001", relay.url, root, {}, [], insecure_http=True)
    assert agent.step().reached
    assert "lastRelay" not in relay.checkins[0]["body"]
    (root / "relay").write_text("relay-kanto\n")
    assert agent.step().reached
    assert relay.checkins[1]["body"]["lastRelay"] == "relay-kanto"


def test_measured_facts_without_overrides(relay: FakeRelay, tmp_path: Path) -> None:
    facts = Agent("pc-001", relay.url, tmp_path, {}, {}, insecure_http=True).facts()
    assert facts["os"] in ("linux", "windows", "darwin") and facts["arch"] in ARCH_VALUES
    assert isinstance(facts["freeDiskMB"], int) and facts["freeDiskMB"] >= 0
    assert facts["hostname"] == socket.gethostname()


@pytest.mark.parametrize("fact, message", [(("color", "blue"), "unknown fact 'color'"),
                                           (("freeDiskMB", "lots"), "must be an integer"),
                                           (("os", "plan9"), "fact os must be one of"),
                                           # what the relay would refuse at every check-in is refused up front
                                           (("freeDiskMB", str(2**53)), "fact freeDiskMB must be an integer from 0"),
                                           (("hostname", "h" * 256), "fact hostname must be a string of at most 255")])
def test_bad_fact_override_is_a_usage_error(fact: tuple[str, str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AgentConfigError, match=message):
        Agent("pc-001", "http://127.0.0.1:9", tmp_path, {}, [fact], insecure_http=True)
    args = argparse.Namespace(id="pc-001", relay="http://127.0.0.1:9", root=str(tmp_path), insecure_unsigned_actions=True, label=[], insecure_http=True,
                              fact=[fact], poll_interval=None, once=True)
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("labels, message", [
    ([("dept", "x" * 257)], "label 'dept' must be at most 256 characters"),
    ([("k" * 129, "x")], "label keys must be 1 to 128 characters"),
    ([(f"l{i}", "x") for i in range(65)], "at most 64 labels"),
])
def test_labels_the_relay_would_refuse_are_a_usage_error(labels: list[tuple[str, str]], message: str,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(id="pc-001", relay="http://127.0.0.1:9", root=str(tmp_path), insecure_unsigned_actions=True, label=labels, insecure_http=True,
                              fact=[], poll_interval=None, once=True)
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_install_then_results_and_inventory_reported(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-1", sha, len(content))])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    first = agent.step()
    assert first.actions == 1 and first.ran == 1 and first.results[0]["status"] == "succeeded"
    assert (tmp_path / "root" / "packages" / "notes" / "1.0" / "notes.txt").read_text() == "hello"
    assert (tmp_path / "root" / "cache" / sha).exists()
    agent.step()
    report = relay.checkins[1]["body"]
    assert report["inventory"] == [{"name": "notes", "version": "1.0"}]
    result = results_of(report)["op-1"]
    assert result["status"] == "succeeded" and result["exitCode"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result["finishedAt"])
    agent.step()
    assert relay.checkins[2]["body"]["results"] == []  # acknowledged by the reply


def test_upgrade_and_uninstall_through_the_relay(relay: FakeRelay, tmp_path: Path) -> None:
    v1, sha1 = make_tar({"v.txt": "1"})
    v2, sha2 = make_tar({"v.txt": "2"})
    relay.artifacts.update({sha1: v1, sha2: v2})
    relay.replies.extend([
        [files_action("op-1", sha1, len(v1))],
        [files_action("op-2", sha2, len(v2), version="2.0", kind="upgrade", previous="1.0")],
        [{"operationId": "op-3", "job": "remove-notes", "action": "uninstall",
          "package": {"name": "notes", "version": None}, "previousVersion": None, "artifact": None,
          "installer": None}],
    ])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    for _ in range(4):
        agent.step()
    inventories = [b["inventory"] for b in relay.bodies()]
    assert inventories == [[], [{"name": "notes", "version": "1.0"}], [{"name": "notes", "version": "2.0"}], []]
    assert {op: r["status"] for b in relay.bodies() for op, r in results_of(b).items()} == {
        "op-1": "succeeded", "op-2": "succeeded", "op-3": "succeeded"}
    assert not (tmp_path / "root" / "packages" / "notes").exists()


def test_drift_is_reported_as_absent(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-1", sha, len(content))])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True, detect_seconds=0)
    agent.step()
    assert agent.inventory() == [{"name": "notes", "version": "1.0"}]
    (tmp_path / "root" / "packages" / "notes" / "1.0" / "notes.txt").unlink()
    (tmp_path / "root" / "packages" / "notes" / "1.0").rmdir()
    agent.step()
    assert relay.checkins[-1]["body"]["inventory"] == []


def test_sha256_mismatch_is_refused(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    tampered = content.replace(b"hello", b"HELLO")
    relay.artifacts[sha] = tampered
    relay.replies.append([files_action("op-1", sha, len(content))])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    result = agent.step().results[0]
    actual = hashlib.sha256(tampered).hexdigest()
    assert result["status"] == "failed"
    assert result["message"] == f"sha256 mismatch: expected {sha} got {actual}"
    assert list((tmp_path / "root" / "cache").iterdir()) == []
    assert agent.inventory() == [] and not (tmp_path / "root" / "packages" / "notes").exists()


@pytest.mark.parametrize("blip", ["missing on the relay", "connection dropped"])
def test_a_download_that_cannot_be_made_is_not_attempted(blip: str, relay: FakeRelay, tmp_path: Path) -> None:
    """Nothing ran, so the result says so: the relay sends the attempt again without using one up."""
    content, sha = make_tar({"notes.txt": "hello"})
    if blip == "missing on the relay":
        relay.artifacts.pop(sha, None)
    else:
        relay.artifacts[sha] = content
        relay.drop_downloads = True
    relay.replies.append([files_action("op-1", sha, len(content))])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    result = agent.step().results[0]
    assert (result["operationId"], result["status"], result["exitCode"]) == ("op-1", "notAttempted", None)
    assert sha in result["message"]
    assert agent.inventory() == [] and not (tmp_path / "root" / "packages" / "notes").exists()
    # the result is journalled and reported like any other; a repeat of op-1 is answered from the journal
    agent.step()
    assert results_of(relay.bodies()[-1])["op-1"]["status"] == "notAttempted"
    # the relay's next attempt (a new operation) installs once the artifact can be had
    relay.drop_downloads = False
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-2", sha, len(content))])
    assert agent.step().results[0]["status"] == "succeeded"
    assert agent.inventory() == [{"name": "notes", "version": "1.0"}]


def test_a_relay_sending_more_than_the_artifact_size_is_cut_off(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content + b"\0" * (4 * 1024 * 1024)  # an endless body, as far as the client cares
    relay.replies.append([files_action("op-1", sha, len(content))])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    result = agent.step().results[0]
    assert result["status"] == "failed"
    assert result["message"] == f"downloading artifact {sha}: the relay sent more than its {len(content)} bytes"
    assert all(f.stat().st_size <= len(content) + 1024 * 1024 for f in (tmp_path / "root" / "cache").rglob("*")
               if f.is_file())


def test_interrupted_download_resumes_with_range(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"big.bin": "x" * 50_000})
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-1", sha, len(content))])
    root = tmp_path / "root"
    (root / "cache").mkdir(parents=True)
    (root / "cache" / f"{sha}.part").write_bytes(content[:20_000])
    result = Agent("pc-001", relay.url, root, {}, {}, insecure_http=True).step().results[0]
    assert result["status"] == "succeeded"
    assert relay.artifact_requests == [{"sha256": sha, "range": "bytes=20000-"}]
    assert (root / "cache" / sha).read_bytes() == content


def test_verified_cached_artifact_is_reused(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.replies.append([files_action("op-1", sha, len(content))])  # the relay does not even have it
    root = tmp_path / "root"
    (root / "cache").mkdir(parents=True)
    (root / "cache" / sha).write_bytes(content)
    assert Agent("pc-001", relay.url, root, {}, {}, insecure_http=True).step().results[0]["status"] == "succeeded"
    assert relay.artifact_requests == []


def test_relay_down_then_up_delivers_pending_result(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-1", sha, len(content))])
    relay.poll_seconds = 5
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    assert agent.step().ran == 1
    relay.stop()
    for failures in (1, 2, 3, 4, 5):
        down = agent.step()
        assert not down.reached and "unreachable" in (down.error or "")
        assert agent.failures == failures
        assert 0.8 * min(5, 2 ** (failures - 1)) <= agent.next_delay() <= min(5, 2 ** (failures - 1))
    # a restart of the agent process keeps the owed result too
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    assert [r["operationId"] for r in agent.journal.pending_results()] == ["op-1"]
    relay.start()
    assert agent.step().reported == 1
    assert results_of(relay.checkins[-1]["body"])["op-1"]["status"] == "succeeded"
    assert agent.failures == 0 and agent.next_delay() == 5


def test_relay_never_reachable_once_exits_1(tmp_path: Path) -> None:
    args = argparse.Namespace(id="pc-001", relay=f"http://127.0.0.1:{closed_port()}", insecure_http=True, insecure_unsigned_actions=True, root=str(tmp_path / "r"),
                              label=[], fact=[], poll_interval=None, once=True)
    assert main(args) == 1


def test_refused_token_keeps_state_and_backs_off(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content
    relay.replies.append([files_action("op-1", sha, len(content))])
    root = tmp_path / "root"
    agent = Agent("pc-001", relay.url, root, {}, {}, insecure_http=True)
    agent.step()
    relay.tokens["pc-001"] = "rotated-by-someone-else"
    refused = agent.step()
    assert not refused.reached and refused.status_code == 403
    assert "refused our token" in (refused.error or "")
    assert "reconciler clients rekey pc-001 --workdir <the relay's workdir>" in (refused.error or "")
    assert agent.failures == 1
    assert (root / "token").exists() and (root / "receipts" / "notes.json").exists()
    assert [r["operationId"] for r in agent.journal.pending_results()] == ["op-1"]  # still owed
    (root / "token").unlink()  # an operator's decision: now the relay says 401
    assert agent.step().status_code == 401


def test_finished_action_sent_again_is_not_rerun(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"notes.txt": "hello"})
    relay.artifacts[sha] = content
    action = files_action("op-1", sha, len(content))
    relay.replies.extend([[action], [action]])
    agent = Agent("pc-001", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    agent.step()
    again = agent.step()  # reports op-1, and the reply asks for op-1 again
    assert again.actions == 1 and again.ran == 0
    agent.step()
    assert "op-1" in results_of(relay.checkins[-1]["body"])  # re-sent
    assert len(relay.artifact_requests) == 1


def test_cli_once_as_a_subprocess(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"install.py": "import os\nprint('hello from', os.environ['RECONCILER_PACKAGE_DIR'])\n"})
    relay.artifacts[sha] = content
    action = files_action("op-cli", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": [], "timeoutSeconds": 60}
    relay.replies.append([action])
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "agent", "--id", "pc-cli", "--relay", relay.url, "--insecure-http", "--insecure-unsigned-actions", "--root", str(root),
         "--label", "dept=it", "--fact", "arch=arm64", "--once"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (root / "receipts" / "tool.json").exists()
    assert (root / "packages" / "tool" / "1.0" / "install.py").exists()
    assert len(relay.checkins) == 2
    first, report = relay.bodies()
    assert first["labels"] == {"dept": "it"} and first["facts"]["arch"] == "arm64"
    result = results_of(report)["op-cli"]
    assert result["status"] == "succeeded" and result["message"].startswith("hello from ")
    assert report["inventory"] == [{"name": "tool", "version": "1.0"}]
    assert relay.checkins[1]["auth"] == f"Bearer {relay.tokens['pc-cli']}"


KILLABLE_INSTALL = """\
import os, time
with open(os.path.join(os.environ["RECONCILER_ROOT"], "runs.log"), "a+") as log:
    log.write("run\\n")
    log.seek(0)
    first = len(log.read().splitlines()) == 1
if first:  # tell the test we are mid-install, then hang until killed
    with open(os.environ["TEST_FIFO"], "w") as fifo:
        fifo.write(str(os.getpid()))
    time.sleep(120)
print("installed on the second try")
"""


@pytest.mark.skipif(os.name == "nt", reason="uses a FIFO and SIGKILL")
def test_kill_9_mid_install_converges_after_restart(relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"install.py": KILLABLE_INSTALL})
    relay.artifacts[sha] = content
    action = files_action("op-kill", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": [], "timeoutSeconds": 300}
    retry = {**action, "operationId": "op-kill-2"}  # what the relay sends once it has the failure
    relay.replies.extend([[action], [action], [retry]])  # it re-sends an operation it has no result for
    root, fifo = tmp_path / "root", tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TEST_FIFO": str(fifo)}
    argv = [sys.executable, "-m", "reconciler", "agent", "--id", "pc-kill", "--relay", relay.url, "--insecure-http", "--insecure-unsigned-actions",
            "--root", str(root), "--once"]
    agent = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    installer_pid: list[int] = []

    def read_fifo() -> None:
        with open(fifo) as handle:  # blocks until the installer is running
            installer_pid.append(int(handle.read()))

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(timeout=60)
    try:
        assert installer_pid, "the installer never started"
    finally:
        agent.kill()  # SIGKILL: no cleanup of any kind
        agent.wait()
        if installer_pid:
            os.kill(installer_pid[0], signal.SIGKILL)
    assert not (root / "receipts" / "tool.json").exists()
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # the killed installer's own end (SIGKILL) is the interrupted operation's result; only the
    # relay's retry, a new operation, runs the installer again
    assert (root / "runs.log").read_text() == "run\nrun\n"
    results = {op: r for body in relay.bodies() for op, r in results_of(body).items()}
    assert (results["op-kill"]["status"], results["op-kill"]["exitCode"]) == ("failed", -signal.SIGKILL)
    assert results["op-kill-2"]["status"] == "succeeded"
    assert results["op-kill-2"]["message"] == "installed on the second try"
    assert (root / "receipts" / "tool.json").exists()
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "tool", "version": "1.0"}]


LEAKY_INSTALLER = """import sys
def r(text):  # the secrets are spelled backwards here, so only the output holds them
    return text[::-1]
for i in range(300):
    print('progress line', i)
print('connecting with password=' + r('bd-2retnuh'))
print('Authorization: Bearer ' + r('gis.daolyap.9JiN1IzUIJiOicGbhJye'))
print('license key ' + r('2B77-A3F9-CIL') + ' accepted')
print('-----BEGIN PRIVATE KEY-----')
print(r('CSAAFEQAB0w9GikhqkgBNADABIQvEIIM'))
print('-----END PRIVATE KEY-----')
print('fatal: service did not start')
sys.exit(4)
"""
LEAKED = ("hunter2-db", "eyJhbGciOiJIUzI1NiJ9", "LIC-9F3A-77B2", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")


def _files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_installer_output_is_masked_and_cut_before_it_is_journalled_or_sent(relay: FakeRelay, tmp_path: Path) -> None:
    """``reconciler agent --output-tail``: built-in shapes and the spec's ``installer.redact`` patterns are
    masked before the result is journalled, so neither the relay nor the client's disk holds the secrets."""
    content, sha = make_tar({"install.py": LEAKY_INSTALLER})
    relay.artifacts[sha] = content
    action = files_action("op-leak", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": [], "timeoutSeconds": 60, "redact": ["LIC-[0-9A-F]{4}-[0-9A-F]{4}"]}
    relay.replies.append([action])
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "agent", "--id", "pc-leak", "--relay", relay.url, "--insecure-http", "--insecure-unsigned-actions", "--root", str(root),
         "--output-tail", "400", "--once"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = results_of(relay.bodies()[-1])["op-leak"]
    message = result["message"]
    assert result["status"] == "failed" and result["exitCode"] == 4
    assert message.startswith("exit code 4: …") and message.endswith("fatal: service did not start")
    assert len(message) <= 400 + len("exit code 4: ")  # --output-tail 400
    assert "password=***" in message and "license key *** accepted" in message and "Authorization: ***" in message
    assert "-----BEGIN PRIVATE KEY----- *** -----END PRIVATE KEY-----" in message
    assert not any(secret in message for secret in LEAKED)
    on_disk = _files_under(root)
    leaks = [(str(path), s) for path, data in on_disk.items() for s in LEAKED if s.encode() in data]
    assert leaks == [] and proc.stderr and not any(s in proc.stderr for s in LEAKED)


def test_a_redact_pattern_the_agent_cannot_run_safely_fails_the_action_before_it_runs(
        relay: FakeRelay, tmp_path: Path) -> None:
    content, sha = make_tar({"install.py": "open('ran', 'w').close()\n"})
    relay.artifacts[sha] = content
    action = files_action("op-bad", sha, len(content), name="tool")
    action["installer"] = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": [],
                           "detect": [], "timeoutSeconds": 60, "redact": ["(a+)+b"]}
    relay.replies.append([action])
    agent = Agent("pc-bad", relay.url, tmp_path / "root", {}, {}, insecure_http=True)
    [result] = agent.step().results
    assert result["status"] == "failed" and "installer.redact[0]" in result["message"]
    assert not (tmp_path / "root" / "packages" / "tool" / "1.0" / "ran").exists()


@pytest.mark.parametrize("tail", [-1, 8001])
def test_output_tail_is_bounded(tail: int, relay: FakeRelay, tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError):
        Agent("pc-1", relay.url, tmp_path / "root", {}, {}, output_tail=tail, insecure_http=True)
