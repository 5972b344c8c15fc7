"""Outcome-typed errors: git failures mapped by cause against real git and real HTTP origins."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import (
    Cause,
    Kind,
    ReconcilerError,
    git_cause,
    next_wakeup,
    problem,
    problem_of,
    retry_delay,
)
from reconciler.gitstore import GitError, GitStore, PushRejected


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    bare = tmp_path / "origin.git"
    git("init", "--quiet", "--bare", "-b", "main", str(bare), cwd=tmp_path)
    work = tmp_path / "work"
    git("init", "--quiet", "-b", "main", str(work), cwd=tmp_path)
    (work / "a.txt").write_text("a\n")
    git("add", "a.txt", cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "one", cwd=work)
    git("push", "--quiet", str(bare), "main", cwd=work)
    return bare


class _Refusing(BaseHTTPRequestHandler):
    """A git smart-HTTP origin that wants credentials nobody has."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def refusing_origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://user:s3cret-token@127.0.0.1:{server.server_address[1]}/repo.git"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_origin() -> Iterator[str]:
    """Accepts connections and never answers: a hung origin."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/repo.git"
    listener.close()


def test_an_origin_that_is_not_there_is_unreachable_and_retried(tmp_path: Path) -> None:
    store = GitStore(str(tmp_path / "no-such-origin.git"), tmp_path / "w")
    with pytest.raises(GitError) as info:
        store.fetch()
    assert (info.value.cause, info.value.kind) == (Cause.UNREACHABLE, Kind.TRANSIENT)


def test_refused_credentials_are_an_authentication_failure(refusing_origin: str, tmp_path: Path) -> None:
    store = GitStore(refusing_origin, tmp_path / "w", network_timeout=30)
    with pytest.raises(GitError) as info:
        store.fetch()
    assert (info.value.cause, info.value.kind) == (Cause.AUTHENTICATION, Kind.WAITING)
    assert "s3cret-token" not in info.value.message
    assert problem_of(info.value).to_dict()["reason"] == "authentication"


def test_a_hung_origin_is_a_timeout(silent_origin: str, tmp_path: Path) -> None:
    store = GitStore(silent_origin, tmp_path / "w", network_timeout=1)
    with pytest.raises(GitError) as info:
        store.fetch()
    assert info.value.cause is Cause.TIMEOUT


def test_a_commit_the_mirror_lacks_is_a_missing_ref(origin: Path, tmp_path: Path) -> None:
    store = GitStore(str(origin), tmp_path / "w")
    store.fetch()
    with pytest.raises(GitError) as info:
        store.read_file("0" * 40, "a.txt")
    assert (info.value.cause, info.value.kind) == (Cause.MISSING_REF, Kind.WAITING)


def test_a_push_rejected_every_time_is_its_own_cause(origin: Path, tmp_path: Path) -> None:
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho refused >&2\nexit 1\n")
    hook.chmod(0o755)
    store = GitStore(str(origin), tmp_path / "w")
    store.push_attempts = 1
    store.fetch()
    with pytest.raises(PushRejected) as info:
        store.publish("status/x", {"a.yaml": b"a: 1\n"}, "status")
    assert (info.value.cause, info.value.kind) == (Cause.PUSH_REJECTED, Kind.TRANSIENT)


@pytest.mark.parametrize(("text", "cause"), [
    ("fatal: Authentication failed for 'https://host/x.git/'", Cause.AUTHENTICATION),
    ("fatal: could not read Username for 'https://host': terminal prompts disabled", Cause.AUTHENTICATION),
    ("git@host: Permission denied (publickey).", Cause.AUTHENTICATION),
    ("fatal: couldn't find remote ref refs/heads/nope", Cause.MISSING_REF),
    ("fatal: unable to access 'https://host/': Could not resolve host: host", Cause.UNREACHABLE),
    ("timed out after 300s", Cause.TIMEOUT),
    ("error: object file is empty", Cause.GIT),
    ("fatal: write error: No space left on device", Cause.DISK_FULL),
    # names in the text never decide: a branch or a path called "timeout"
    ("fatal: couldn't find remote ref refs/heads/timeout-x", Cause.MISSING_REF),
    ("fatal: '/srv/timeoutlab/repo.git' does not appear to be a git repository", Cause.UNREACHABLE),
    ("fatal: unable to access 'https://host/': Operation timed out after 30001 milliseconds", Cause.TIMEOUT),
])
def test_git_text_names_its_cause(text: str, cause: Cause) -> None:
    assert git_cause(text) is cause


def test_exceptions_without_a_cause_are_classified() -> None:
    full = problem_of(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x"))
    assert (full.kind, full.cause) == (Kind.WAITING, Cause.DISK_FULL)
    bug = problem_of(KeyError("job"))
    assert (bug.kind, bug.cause, bug.message) == (Kind.WAITING, Cause.INTERNAL, "internal error: KeyError: 'job'")
    stalled = problem_of(ReconcilerError("relay x is not in the topology", Cause.UNKNOWN_RELAY))
    assert (stalled.kind, stalled.retried) == (Kind.STALLED, False)


def test_messages_are_one_bounded_line() -> None:
    long = problem(Cause.GIT, "line one\nline two " + "x" * 5000)
    assert "\n" not in long.message and len(long.message) <= 500 and long.message.startswith("line one line two")


def test_the_next_wakeup_backs_off_and_a_stall_waits_for_a_change() -> None:
    assert [retry_delay(n) for n in (0, 1, 2, 3, 7, 50)] == [0.0, 5.0, 10.0, 20.0, 300.0, 300.0]
    transient = problem(Cause.UNREACHABLE, "x")
    assert next_wakeup(60.0, transient, 1) == 5.0
    assert next_wakeup(60.0, transient, 9) == 60.0  # never later than the poll interval
    assert next_wakeup(60.0, problem(Cause.INVALID_SPECS, "x"), 1) == 60.0
    assert next_wakeup(60.0, None, 0) == 60.0
