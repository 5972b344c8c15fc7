"""Origin credentials against a real HTTP git server on 127.0.0.1: never in a git process's argv, never on
disk; and what HQ, relays and agents write is owner-only.

The server is ``git http-backend`` behind a small WSGI app that insists on HTTP Basic authentication.
While it answers a request, the git processes that made it are alive and waiting, so the app reads the
command line of every process then (``/proc/<pid>/cmdline``): no polling race decides the verdict.
"""

from __future__ import annotations

import base64
import os
import socketserver
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from e2e_helpers import RelayProcess
from test_hq import Origin, run_cli

from reconciler.agent.agent import Agent

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc/<pid>/cmdline")

USER = "reconciler"
PASSWORD = "pa55-w0rd-7c1e9b"


def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue  # gone meanwhile
    return found


class GitHttpServer:
    """``git http-backend`` for the repositories under ``root``, behind HTTP Basic auth, on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.requests: list[dict[str, Any]] = []  # per authenticated request: what ran at that moment
        self.refused = 0

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        self.server = make_server("127.0.0.1", 0, self.app, server_class=Server, handler_class=Quiet)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, repo: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}/{repo}"

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("HTTP_AUTHORIZATION") != self.expected:
            self.refused += 1
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Length", "0")])
            return [b""]
        self.requests.append({"path": environ.get("PATH_INFO"), "processes": _cmdlines()})
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "REMOTE_USER": USER, "REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": environ["REQUEST_METHOD"],
               "PATH_INFO": environ.get("PATH_INFO", ""), "QUERY_STRING": environ.get("QUERY_STRING", ""),
               "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""), "CONTENT_LENGTH": str(len(body))}
        for name in ("HTTP_CONTENT_ENCODING", "HTTP_GIT_PROTOCOL"):
            if environ.get(name):
                env[name] = environ[name]
        if environ.get("HTTP_GIT_PROTOCOL"):
            env["GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = value.strip()
            elif key:
                headers.append((key, value.strip()))
        start_response(status, headers)
        return [payload]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Origin, GitHttpServer]]:
    origin = Origin(tmp_path)
    server = GitHttpServer(tmp_path)
    yield origin, server
    server.close()


def _leaks(server: GitHttpServer, *allowed_pids: int) -> list[str]:
    return [cmd for seen in server.requests for pid, cmd in seen["processes"].items()
            if PASSWORD in cmd and pid not in allowed_pids]


def _helpers_seen(server: GitHttpServer) -> int:
    """Requests during which a git process held the origin URL on its command line (the remote helper)."""
    return sum(1 for seen in server.requests
               if any(f"127.0.0.1:{server.port}/origin.git" in cmd and "git" in cmd
                      for cmd in seen["processes"].values()))


def test_a_password_in_the_origin_url_never_stays_on_any_command_line(
        served: tuple[Origin, GitHttpServer], tmp_path: Path) -> None:
    origin, server = served
    url = server.url("origin.git", f"{USER}:{PASSWORD}@")
    hq = subprocess.Popen([sys.executable, "-m", "reconciler", "hq", "--origin", url, "--workdir", str(tmp_path / "hq"), "--once"],
                          cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    stdout, stderr = hq.communicate(timeout=120)
    assert hq.returncode == 0, stderr
    assert origin.ref("status/hq") is not None  # fetched and pushed over HTTP with the credentials
    assert len(server.requests) >= 3 and _helpers_seen(server) == len(server.requests)
    # the command restarted itself (same process id) with the password moved to its environment:
    # by the first request, no process's argv holds it, not even our own
    assert _leaks(server) == []
    assert "--origin-password-file" in stderr and PASSWORD not in stdout + stderr
    on_disk = [p for p in (tmp_path / "hq").rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert on_disk == []


def test_the_password_file_and_the_environment_keep_it_off_every_command_line(
        served: tuple[Origin, GitHttpServer], tmp_path: Path) -> None:
    origin, server = served
    password_file = tmp_path / "origin-password"
    password_file.write_text(PASSWORD + "\n")
    url = server.url("origin.git", f"{USER}@")
    proc = run_cli("hq", "--origin", url, "--workdir", str(tmp_path / "hq"), "--once",
                   "--origin-password-file", str(password_file))
    assert proc.returncode == 0, proc.stderr
    assert origin.ref("status/hq") is not None
    assert "--origin-password-file" not in proc.stderr  # nothing to warn about
    status = run_cli("status", "--origin", url, "--format", "json",
                     extra_env={"RECONCILER_ORIGIN_PASSWORD": PASSWORD, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert status.returncode == 0, status.stderr
    assert _helpers_seen(server) == len(server.requests) >= 4
    assert _leaks(server) == []  # not even the reconciler processes' own argv
    in_url = run_cli("status", "--origin", server.url("origin.git", f"{USER}:{PASSWORD}@"),
                     extra_env={"XDG_CACHE_HOME": str(tmp_path / "cache2")})
    assert in_url.returncode == 0, in_url.stderr
    assert "--origin-password-file" in in_url.stderr and PASSWORD not in in_url.stdout + in_url.stderr
    without = run_cli("hq", "--origin", url, "--workdir", str(tmp_path / "hq2"), "--once",
                      extra_env={"GIT_TERMINAL_PROMPT": "0"})
    assert without.returncode == 1 and server.refused > 0  # the server does insist


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_hq_and_relay_state_and_the_agent_journal_and_token_are_owner_only(tmp_path: Path) -> None:
    origin = Origin(tmp_path)
    hq = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--once")
    assert hq.returncode == 0, hq.stderr
    written = [p for p in (tmp_path / "hq").rglob("*")]
    assert written and [str(p) for p in [tmp_path / "hq", *written] if not _private(p)] == []

    relay = RelayProcess("relay-kanto", str(origin.bare), tmp_path / "relay-kanto").start()
    try:
        agent = Agent("pc-kanto-001", relay.url, tmp_path / "agent", {}, {}, enroll_secret=relay.enroll_secret,
                      insecure_http=True)
        assert agent.step().reached
        relay_files = list((tmp_path / "relay-kanto").rglob("*"))  # the helper made the workdir itself
        assert any(p.name.startswith("relay.sqlite3") for p in relay_files)
        assert [str(p) for p in relay_files if not _private(p)] == []
    finally:
        relay.stop()
    layout = agent.layout
    assert layout.token.exists() and _private(layout.token)
    entries = list(layout.journal.glob("*.json"))
    assert _private(layout.journal) and all(_private(p) for p in entries)
