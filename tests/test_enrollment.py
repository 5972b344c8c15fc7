"""Who may be a client: enrolment, approval, the lifecycle commands, and credentials for artifacts.

Everything is real: the relay's WSGI app on waitress on 127.0.0.1 with its
SQLite store, the real :class:`~reconciler.agent.agent.Agent`, the
``reconciler clients`` and ``reconciler relay``/``agent`` command lines as
subprocesses (the lifecycle commands run while the relay serves, as on a
relay host), and a child relay's artifact cache fetching from its parent.
"""

from __future__ import annotations

import getpass
import hashlib
import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from e2e_helpers import (
    CHILD_SECRET,
    ENROLL_SECRET,
    Origin,
    assert_json_error,
    reconciler,
    secret_file,
    wait_for,
)
from test_relay_server import TRUST, Relay, _package_tar, _specs, _start, checkin

from reconciler import protocol
from reconciler.agent.agent import Agent
from reconciler.packing import ArtifactError
from reconciler.relay.artifacts import ArtifactCache
from reconciler.relay.server import Trust
from reconciler.relay.state import StagedArtifact, make_generation
from reconciler.serving import Server

WORKDIR_HINT = "--workdir <the relay's workdir>"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Relay, Server]]:
    r, server = _start(tmp_path)
    yield r, server
    server.stop()
    r.store.close()


@pytest.fixture
def relay(served: tuple[Relay, Server]) -> Relay:
    return served[0]


def _workdir(relay: Relay) -> Path:
    return relay.store.path.parent


def _serve_app(relay: Relay) -> str:
    """Serve a job installing app 1.0 (its artifact staged): every client gets one action. Its sha256."""
    content = _package_tar()
    sha = hashlib.sha256(content).hexdigest()
    (relay.cache / sha).write_bytes(content)
    relay.state.generation = make_generation("c" * 40, _specs(), "relay-a",
                                             artifacts={("app", "1.0"): StagedArtifact(sha, len(content), "tar")})
    return sha


def _agent(relay: Relay, root: Path, client: str = "pc-1", secret: str | None = ENROLL_SECRET) -> Agent:
    return Agent(client, relay.url, root, {}, {}, enroll_secret=secret, insecure_http=True)


def _clients(relay: Relay, *args: str, check: bool = True) -> str:
    return reconciler("clients", *args, "--workdir", str(_workdir(relay)), check=check).stdout


def _listed(relay: Relay) -> dict[str, dict[str, object]]:
    doc = json.loads(_clients(relay, "list", "--format", "json"))
    return {row["id"]: row for row in doc["clients"]}


def _artifact(relay: Relay, sha: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(f"{relay.url}/v1/artifacts/{sha}", headers=headers, timeout=10)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ who may register


def test_an_unknown_id_without_the_secret_is_not_registered(relay: Relay) -> None:
    """Squatting: a caller without the enrolment secret cannot take an id before the real PC."""
    refused = checkin(relay, "pc-1", enroll=False)
    assert_json_error(refused, 401, "no enrolment secret")
    assert refused.json()["reason"] == protocol.REASON_ENROLLMENT_REQUIRED
    assert "token" not in refused.json()
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert relay.store.client("pc-1") is None
    # the real PC, enrolled, registers afterwards
    assert checkin(relay, "pc-1").json()["token"]


def test_a_wrong_secret_is_refused_and_registers_nothing(relay: Relay) -> None:
    for wrong in ("x" * len(ENROLL_SECRET), ENROLL_SECRET[:-1], ENROLL_SECRET + "x", ""):
        response = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", json={"facts": {}, "inventory": []},
                                 headers={protocol.ENROLLMENT_HEADER: wrong}, timeout=10)
        assert_json_error(response, 401, f"wrong secret {wrong!r}")
        assert response.json()["reason"] == protocol.REASON_ENROLLMENT_REFUSED
    assert relay.store.client("pc-1") is None


def test_an_unconfirmed_registration_cannot_be_hijacked(relay: Relay) -> None:
    """The registering reply was lost: without the secret nobody gets a token for the id; with it, the PC does."""
    lost = checkin(relay, "pc-1").json()["token"]
    stored = relay.store.credentials("pc-1")
    assert stored is not None and not stored.confirmed
    for label, token in (("no token", None), ("made-up token", "y" * 43),
                         ("the lost token's neighbour", lost[:-1] + ("A" if lost[-1] != "A" else "B"))):
        response = checkin(relay, "pc-1", token, enroll=False)
        assert_json_error(response, 401, label)
        assert response.json()["reason"] == protocol.REASON_ENROLLMENT_REQUIRED and "token" not in response.json()
    assert relay.store.credentials("pc-1") == stored, "a refused caller changed the registration"
    # the real agent, presenting the secret again, recovers
    recovered = checkin(relay, "pc-1")
    assert recovered.status_code == 200 and recovered.json()["token"] != lost


def test_a_confirmed_registration_is_not_reissued_even_with_the_secret(relay: Relay) -> None:
    token = checkin(relay, "pc-1").json()["token"]
    assert checkin(relay, "pc-1", token).status_code == 200  # confirmed: the token was used
    again = checkin(relay, "pc-1", enroll=True)
    assert_json_error(again, 401, "secret but no token")
    assert again.json()["reason"] == protocol.REASON_TOKEN_REQUIRED and "token" not in again.json()
    other = checkin(relay, "pc-1", "z" * 43, enroll=True)
    assert_json_error(other, 403, "secret and a wrong token")
    assert other.json()["reason"] == protocol.REASON_TOKEN_REFUSED
    assert checkin(relay, "pc-1", token).status_code == 200


def test_an_unenrolled_agent_cannot_register_and_says_what_to_do(relay: Relay, tmp_path: Path) -> None:
    agent = _agent(relay, tmp_path / "root", secret=None)
    step = agent.step()
    assert not step.reached and step.status_code == 401
    assert "--enroll-secret-file" in (step.error or "")
    assert agent.token is None and relay.store.client("pc-1") is None


def test_an_agent_with_a_wrong_secret_is_told_so(relay: Relay, tmp_path: Path) -> None:
    step = _agent(relay, tmp_path / "root", secret="not-the-relays-secret-000").step()
    assert not step.reached and step.status_code == 401
    assert "refused our enrolment secret" in (step.error or "")
    assert relay.store.client("pc-1") is None


def test_open_enrolment_is_trust_on_first_use(tmp_path: Path) -> None:
    relay, server = _start(tmp_path, trust=Trust(open_enrollment=True))
    try:
        assert checkin(relay, "pc-1", enroll=False).json()["token"]
        wrong = requests.post(f"{relay.url}/v1/clients/pc-2/checkin", json={"facts": {}, "inventory": []},
                              headers={protocol.ENROLLMENT_HEADER: "a-stale-secret-from-elsewhere"}, timeout=10)
        assert wrong.status_code == 200, "with open enrolment and no secret, any secret is as good as none"
    finally:
        server.stop()
        relay.store.close()


def test_a_relay_admitting_nobody_registers_nobody(tmp_path: Path) -> None:
    relay, server = _start(tmp_path, trust=Trust())
    try:
        assert_json_error(checkin(relay, "pc-1", enroll=False), 401, "no secret")
        assert_json_error(checkin(relay, "pc-1", enroll=True), 401, "a secret the relay does not have")
        assert relay.store.client("pc-1") is None
    finally:
        server.stop()
        relay.store.close()


# ------------------------------------------------------------------ approval


def test_approval_flow(tmp_path: Path) -> None:
    relay, server = _start(tmp_path, trust=Trust(enroll_secret=ENROLL_SECRET, require_approval=True))
    try:
        _serve_app(relay)
        agent = _agent(relay, tmp_path / "root")
        waiting = agent.step()
        assert not waiting.reached and waiting.status_code == 403
        assert "waiting for approval" in (waiting.error or "")
        assert f"reconciler clients approve pc-1 {WORKDIR_HINT}" in (waiting.error or "")
        assert agent.token is not None, "the registering 403 carries the token the approval admits"
        record = relay.store.client("pc-1")
        assert record is not None and not record.approved
        assert relay.store.clients() == [], "a pending client is never planned"
        assert relay.store.operations_of("pc-1") == []

        again = checkin(relay, "pc-1", agent.token)
        assert_json_error(again, 403, "pending, with its token")
        assert again.json()["reason"] == protocol.REASON_PENDING_APPROVAL and "token" not in again.json()
        assert _listed(relay)["pc-1"]["state"] == "pending approval"

        # the operator approves while the relay serves
        said = _clients(relay, "approve", "pc-1")
        assert "approved" in said
        served = agent.step()
        assert served.reached and served.actions == 1 and served.results[0]["status"] == "succeeded"
        assert _listed(relay)["pc-1"]["state"] == "active"
        assert "approved already" in _clients(relay, "approve", "pc-1")
        [approval] = [e for e in relay.store.events("pc-1") if e.action == "approved"]
        assert approval.actor.startswith(getpass.getuser())
    finally:
        server.stop()
        relay.store.close()


# ------------------------------------------------------------------ lifecycle commands


def test_rekeyed_client_recovers_with_its_history(relay: Relay, tmp_path: Path) -> None:
    sha = _serve_app(relay)
    agent = _agent(relay, tmp_path / "root")
    assert agent.step().ran == 1 and agent.step().reached  # installed, result reported
    old = agent.token
    assert old is not None
    history = relay.store.operations_of("pc-1")
    assert len(history) == 1
    assert _artifact(relay, sha, _bearer(old)).status_code == 200

    _clients(relay, "rekey", "pc-1")
    assert _listed(relay)["pc-1"]["state"] == "rekeyed"
    revoked = checkin(relay, "pc-1", old)
    assert_json_error(revoked, 401, "revoked token")
    assert revoked.json()["reason"] == protocol.REASON_ENROLLMENT_REQUIRED
    assert_json_error(_artifact(relay, sha, _bearer(old)), 401, "artifact with a revoked token")

    # the agent re-enrols at once with its secret, and keeps its history
    step = agent.step()
    assert step.reached, step.error
    assert agent.token not in (None, old)
    assert relay.store.operations_of("pc-1") == history
    assert _listed(relay)["pc-1"]["state"] == "active"
    assert [e.action for e in relay.store.events("pc-1")] == ["registered", "rekeyed", "newToken"]


def test_a_rekeyed_client_without_the_secret_is_told_the_command(relay: Relay, tmp_path: Path) -> None:
    agent = _agent(relay, tmp_path / "root")
    assert agent.step().reached and agent.step().reached
    _clients(relay, "rekey", "pc-1")
    unenrolled = _agent(relay, tmp_path / "root", secret=None)  # the same root, without --enroll-secret-file
    step = unenrolled.step()
    assert not step.reached and step.status_code == 401
    assert "--enroll-secret-file" in (step.error or "")


def test_a_stolen_token_is_refused_and_names_the_rekey_command(relay: Relay, tmp_path: Path) -> None:
    agent = _agent(relay, tmp_path / "root")
    assert agent.step().reached and agent.step().reached
    agent.layout.token.write_text("w" * 43)  # not its token any more
    step = agent.step()
    assert not step.reached and step.status_code == 403
    assert f"reconciler clients rekey pc-1 {WORKDIR_HINT}" in (step.error or "")


def test_a_forgotten_client_enrols_again_as_new(relay: Relay, tmp_path: Path) -> None:
    _serve_app(relay)
    agent = _agent(relay, tmp_path / "root")
    assert agent.step().ran == 1 and agent.step().reached
    before = relay.store.client("pc-1")
    old_token = agent.token
    assert before is not None and old_token is not None and relay.store.operations_of("pc-1") and relay.store.row_states_of("pc-1")

    said = _clients(relay, "forget", "pc-1")
    assert "forgotten" in said
    assert relay.store.client("pc-1") is None
    assert relay.store.operations_of("pc-1") == [] and relay.store.row_states_of("pc-1") == {}
    assert "pc-1" not in _listed(relay)

    # a re-imaged PC: a new root, the same id, the enrolment secret
    fresh = _agent(relay, tmp_path / "reimaged")
    step = fresh.step()
    assert step.reached and step.actions == 1, step.error
    after = relay.store.client("pc-1")
    assert after is not None and after.first_seen >= before.last_seen
    # its old token is dead
    assert_json_error(checkin(relay, "pc-1", old_token), 401, "the forgotten client's token")
    events = [e.action for e in relay.store.events("pc-1")]
    assert events[:2] == ["registered", "forgotten"] and events[2] == "registered"


def test_lifecycle_commands_refuse_what_they_cannot_do(relay: Relay, tmp_path: Path) -> None:
    for action in ("approve", "forget", "rekey"):
        proc = reconciler("clients", action, "pc-none", "--workdir", str(_workdir(relay)), check=False)
        assert proc.returncode == 1 and "no client pc-none" in proc.stderr
        proc = reconciler("clients", action, "--workdir", str(_workdir(relay)), check=False)
        assert proc.returncode == 2 and "give the client's ID" in proc.stderr
    proc = reconciler("clients", "list", "--workdir", str(tmp_path / "nothing-here"), check=False)
    assert proc.returncode == 2 and "no relay database" in proc.stderr
    assert not (tmp_path / "nothing-here").exists(), "list created a workdir"
    proc = reconciler("clients", "rekey", "PC_1", "--workdir", str(_workdir(relay)), check=False)
    assert proc.returncode == 2 and "invalid client id" in proc.stderr


def test_list_shows_states_hostnames_and_one_clients_events(relay: Relay, tmp_path: Path) -> None:
    checkin(relay, "pc-1", hostname="desk-1")
    token = checkin(relay, "pc-2").json()["token"]
    checkin(relay, "pc-2", token)
    _clients(relay, "rekey", "pc-2")
    listed = _listed(relay)
    assert listed["pc-1"]["state"] == "active" and listed["pc-1"]["hostname"] == "desk-1"
    assert listed["pc-2"]["state"] == "rekeyed"
    assert listed["pc-1"]["firstSeen"] and listed["pc-1"]["lastSeen"]
    text = _clients(relay, "list")
    assert text.splitlines()[0].split() == ["ID", "STATE", "HOSTNAME", "FIRST", "SEEN", "LAST", "SEEN"]
    one = _clients(relay, "list", "pc-2")
    assert "rekeyed by" in one and "pc-1" not in one


# ------------------------------------------------------------------ artifacts


def test_artifacts_need_an_approved_clients_token_or_the_child_secret(tmp_path: Path) -> None:
    relay, server = _start(tmp_path, trust=Trust(enroll_secret=ENROLL_SECRET, require_approval=True,
                                                  child_secret=CHILD_SECRET))
    try:
        content = bytes(range(256)) * 64
        sha = hashlib.sha256(content).hexdigest()
        (relay.cache / sha).write_bytes(content)
        assert_json_error(_artifact(relay, sha, {}), 401, "no credential")
        assert_json_error(_artifact(relay, "0" * 64, {}), 401, "no credential for an unknown hash either")
        assert_json_error(_artifact(relay, sha, _bearer("q" * 43)), 401, "a token nobody holds")
        assert_json_error(_artifact(relay, sha, {protocol.RELAY_SECRET_HEADER: "not-the-child-secret"}), 401,
                          "a wrong child secret")
        pending = checkin(relay, "pc-1").json()["token"]  # a 403 body carrying the pending client's token
        refused = _artifact(relay, sha, _bearer(pending))
        assert_json_error(refused, 403, "a pending client's token")
        assert refused.json()["reason"] == protocol.REASON_PENDING_APPROVAL
        _clients(relay, "approve", "pc-1")
        full = _artifact(relay, sha, _bearer(pending))
        assert full.status_code == 200 and full.content == content
        assert full.headers["Cache-Control"].startswith("private")
        part = _artifact(relay, sha, {**_bearer(pending), "Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == content[100:]
        assert _artifact(relay, "0" * 64, _bearer(pending)).status_code == 404
        assert _artifact(relay, "not-a-hash", _bearer(pending)).status_code == 400
        child = _artifact(relay, sha, {protocol.RELAY_SECRET_HEADER: CHILD_SECRET, "Range": "bytes=0-9"})
        assert child.status_code == 206 and child.content == content[:10]
        # a token revoked by a rekey no longer downloads
        _clients(relay, "rekey", "pc-1")
        assert_json_error(_artifact(relay, sha, _bearer(pending)), 401, "a rekeyed client's token")
    finally:
        server.stop()
        relay.store.close()


def test_a_child_relay_fetches_from_its_parent_only_with_its_secret(relay: Relay, tmp_path: Path) -> None:
    content = b"an artifact only the parent relay has\n"
    sha = hashlib.sha256(content).hexdigest()
    (relay.cache / sha).write_bytes(content)
    unreachable = "http://127.0.0.1:9/tool.bin"  # the origin URL: never reached when the parent serves

    child = ArtifactCache(tmp_path / "child", None, parent_url=relay.url,  # type: ignore[arg-type]
                          parent_secret=CHILD_SECRET)
    staged = child.stage_url(unreachable, sha)
    assert staged.sha256 == sha and child.path(sha).read_bytes() == content

    stranger = ArtifactCache(tmp_path / "stranger", None, parent_url=relay.url)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError):  # the parent refuses (401), and the URL is unreachable
        stranger.stage_url(unreachable, sha)
    assert not stranger.has(sha)
    wrong = ArtifactCache(tmp_path / "wrong", None, parent_url=relay.url,  # type: ignore[arg-type]
                          parent_secret="a-secret-the-parent-does-not-know")
    with pytest.raises(ArtifactError):
        wrong.stage_url(unreachable, sha)
    assert not wrong.has(sha)


# ------------------------------------------------------------------ hostile input


def _raw(relay: Relay, headers: list[tuple[bytes, bytes]], body: bytes = b'{"facts": {}, "inventory": []}',
         path: str = "/v1/clients/pc-1/checkin", method: bytes = b"POST") -> tuple[int, bytes]:
    """A request written byte by byte (header values no client library would send)."""
    parts = urllib.parse.urlsplit(relay.url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10) as sock:
        lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: relay", b"Connection: close",
                 b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode(),
                 *(name + b": " + value for name, value in headers)]
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


@pytest.mark.parametrize("label, value", [
    ("latin-1 bytes", b"\xff\xfe\xfd" + ENROLL_SECRET.encode()),
    ("invalid UTF-8", ENROLL_SECRET.encode()[:-2] + b"\xc3\x28"),
    ("the secret in UTF-8 with a non-ASCII letter", ENROLL_SECRET.encode()[:-1] + "é".encode()),
    ("64 KiB", b"s" * 65536),
    ("empty", b""),
])
def test_odd_enrolment_headers_get_a_json_401(relay: Relay, label: str, value: bytes) -> None:
    status, body = _raw(relay, [(protocol.ENROLLMENT_HEADER.encode(), value)])
    assert status == 401, (label, status, body[:300])
    doc = json.loads(body)
    assert doc["reason"] == protocol.REASON_ENROLLMENT_REFUSED and b"Traceback" not in body
    assert relay.store.client("pc-1") is None


def test_a_control_character_in_the_secret_is_refused_by_the_server(relay: Relay) -> None:
    """waitress refuses a header with a control character before the app sees it (a plain-text 400)."""
    status, body = _raw(relay, [(protocol.ENROLLMENT_HEADER.encode(), ENROLL_SECRET.encode()[:-1] + b"\x01")])
    assert status == 400 and b"Traceback" not in body
    assert relay.store.client("pc-1") is None


def test_odd_credentials_on_artifacts_get_a_json_4xx(relay: Relay) -> None:
    path = "/v1/artifacts/" + "0" * 64
    for label, headers in (
        ("relay secret in latin-1", [(protocol.RELAY_SECRET_HEADER.encode(), b"\xff" * 40)]),
        ("huge relay secret", [(protocol.RELAY_SECRET_HEADER.encode(), b"x" * 65536)]),
        ("bearer with bytes", [(b"Authorization", b"Bearer \xff\xfe" + b"a" * 40)]),
        ("huge bearer", [(b"Authorization", b"Bearer " + b"a" * 65536)]),
    ):
        status, body = _raw(relay, headers, b"", path, b"GET")
        assert status == 401, (label, status, body[:300])
        assert json.loads(body)["error"] and b"Traceback" not in body


def test_a_flood_of_huge_headers_is_refused_without_a_traceback(relay: Relay) -> None:
    status, body = _raw(relay, [(f"X-Junk-{i}".encode(), b"j" * 8000) for i in range(64)]
                        + [(protocol.ENROLLMENT_HEADER.encode(), ENROLL_SECRET.encode())])
    assert 400 <= status < 500 and b"Traceback" not in body
    assert relay.store.client("pc-1") is None


# ------------------------------------------------------------------ start-up


def _relay_exit(tmp_path: Path, *args: str) -> tuple[int, str]:
    proc = reconciler("relay", "--name", "relay-a", "--origin", str(tmp_path / "no-origin.git"),
                      "--workdir", str(tmp_path / "relay-work"), "--listen", "127.0.0.1:0", "--insecure-http", *args,
                      check=False, timeout=60)
    return proc.returncode, proc.stderr


def test_a_relay_without_an_enrolment_policy_refuses_to_start(tmp_path: Path) -> None:
    code, err = _relay_exit(tmp_path)
    assert code == 2 and "--enroll-secret-file" in err and "--open-enrollment" in err and "Traceback" not in err
    good = secret_file(tmp_path / "enroll.secret", ENROLL_SECRET)
    code, err = _relay_exit(tmp_path, "--enroll-secret-file", str(good), "--open-enrollment")
    assert code == 2 and "exclude each other" in err


@pytest.mark.parametrize("flag", ["--enroll-secret-file", "--child-secret-file", "--parent-secret-file"])
def test_bad_secret_files_stop_the_relay_with_a_clear_message(tmp_path: Path, flag: str) -> None:
    good = secret_file(tmp_path / "enroll.secret", ENROLL_SECRET)
    cases = {
        "does not exist": tmp_path / "missing.secret",
        "is empty": secret_file(tmp_path / "empty.secret", ""),
        "is a directory": tmp_path,
        "visible ASCII": tmp_path / "binary.secret",
        "has 5 characters": secret_file(tmp_path / "short.secret", "short"),
        "no spaces": secret_file(tmp_path / "spaced.secret", "two words in a secret file"),
    }
    (tmp_path / "binary.secret").write_bytes(b"\xff\xfe" + b"k" * 30)
    for expected, path in cases.items():
        base = [] if flag == "--enroll-secret-file" else ["--enroll-secret-file", str(good)]
        code, err = _relay_exit(tmp_path, *base, flag, str(path))
        assert code == 2, (flag, expected, err)
        assert expected in err and str(path) in err and "Traceback" not in err, (flag, expected, err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_secret_file_stops_the_relay(tmp_path: Path) -> None:
    locked = secret_file(tmp_path / "locked.secret", ENROLL_SECRET)
    locked.chmod(0)
    code, err = _relay_exit(tmp_path, "--enroll-secret-file", str(locked))
    assert code == 2 and "cannot read secret file" in err


def test_bad_secret_files_stop_the_agent_with_a_clear_message(tmp_path: Path) -> None:
    for expected, path in (("does not exist", tmp_path / "missing.secret"),
                           ("is empty", secret_file(tmp_path / "empty.secret", "\n"))):
        proc = reconciler("agent", "--id", "pc-1", "--relay", "http://127.0.0.1:9", "--insecure-http", "--insecure-unsigned-actions",
                          "--root", str(tmp_path / "root"), "--enroll-secret-file", str(path), "--once", check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_open_enrolment_warns_at_start_up(tmp_path: Path) -> None:
    from e2e_helpers import RelayProcess

    origin = Origin(tmp_path)
    relay = RelayProcess("relay-a", origin.url, tmp_path / "relay", extra_args=["--open-enrollment"])
    assert relay.enroll_secret is None
    try:
        relay.start()
        wait_for(lambda: "open enrolment" in relay.output(), 30, what="the open-enrolment warning")
        assert "WARNING" in relay.output()
        response = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", json={"facts": {}, "inventory": []},
                                 timeout=10)
        assert response.status_code == 200 and response.json()["token"]
    finally:
        relay.stop()


def test_the_test_relays_enrol_by_default() -> None:
    assert TRUST.enroll_secret == ENROLL_SECRET and not TRUST.open_enrollment


# ------------------------------------------------------------------ secrets never follow a redirect


class _Redirecting:
    """Two HTTP servers on 127.0.0.1: ``url`` answers everything with a 307 to ``elsewhere``, which records headers."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[dict[str, str]] = []
        outer = self

        class Elsewhere(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append(dict(self.headers.items()))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

            def log_message(self, *args: object) -> None:
                pass

        self.target = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
        elsewhere = f"http://127.0.0.1:{self.target.server_address[1]}"

        class Redirect(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(307)
                self.send_header("Location", elsewhere + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.redirect = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        self.url = f"http://127.0.0.1:{self.redirect.server_address[1]}"
        for server in (self.target, self.redirect):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        for server in (self.target, self.redirect):
            server.shutdown()
            server.server_close()


def test_secrets_never_follow_a_redirect(tmp_path: Path) -> None:
    servers = _Redirecting()
    try:
        step = Agent("pc-1", servers.url, tmp_path / "root", {}, {}, enroll_secret=ENROLL_SECRET,
                     insecure_http=True).step()
        assert not step.reached and step.status_code == 307
        cache = ArtifactCache(tmp_path / "child", None, parent_url=servers.url,  # type: ignore[arg-type]
                              parent_secret=CHILD_SECRET)
        with pytest.raises(ArtifactError):
            cache.stage_url("http://127.0.0.1:9/tool.bin", "0" * 64)
        assert all(protocol.ENROLLMENT_HEADER not in seen and protocol.RELAY_SECRET_HEADER not in seen
                   for seen in servers.seen), servers.seen
    finally:
        servers.close()


def test_the_relay_log_names_the_command_with_its_workdir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    relay, server = _start(tmp_path, trust=Trust(enroll_secret=ENROLL_SECRET, require_approval=True))
    try:
        with caplog.at_level("INFO", logger="reconciler.relay"):
            token = checkin(relay, "pc-1").json()["token"]
            checkin(relay, "pc-1", token)
            _clients(relay, "approve", "pc-1")
            checkin(relay, "pc-1", enroll=True)  # a re-imaged PC: the secret, no token
        text = caplog.text
        assert f"reconciler clients approve pc-1 --workdir {_workdir(relay)}" in text
        assert f"reconciler clients rekey pc-1 --workdir {_workdir(relay)}" in text
    finally:
        server.stop()
        relay.store.close()
