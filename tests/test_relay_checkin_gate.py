"""Check-ins are read one at a time once their request is parsed (``RelayApp.checkin_gate``): the relay app
on its real servers (waitress for plain HTTP, cheroot for HTTPS) on 127.0.0.1, a real SQLite file, concurrent
clients."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_helpers import ENROLL_SECRET, checkin_body
from test_relay_server import _specs
from tls_helpers import CA

from reconciler import protocol
from reconciler.relay.server import RelayApp, Trust
from reconciler.relay.service import relay_server
from reconciler.relay.state import RelayState, StagedArtifact, make_generation
from reconciler.relay.store import CheckinView, Store
from reconciler.tls import ServerTLS, server_context

DEADLINE = 10.0
CLIENTS = 4


@dataclass
class Relay:
    url: str
    app: RelayApp
    store: Store
    verify: str | bool  # what requests verifies the server with
    tls: ssl.SSLContext | None  # a client context for raw connections (HTTPS)


@pytest.fixture(params=["http", "https"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Relay]:
    store = Store(tmp_path / "relay")
    state = RelayState("relay-a", store, poll_seconds=7)
    state.generation = make_generation("c" * 40, _specs(), "relay-a",
                                       artifacts={("app", "1.0"): StagedArtifact("ab" * 32, 10240, "tar")})
    cache = tmp_path / "relay" / "cache" / "sha256"
    cache.mkdir(parents=True)
    app = RelayApp(state, cache, trust=Trust(enroll_secret=ENROLL_SECRET))
    verify: str | bool = False
    client_tls: ssl.SSLContext | None = None
    server_tls: ssl.SSLContext | None = None
    if request.param == "https":
        ca = CA(tmp_path / "pki")
        issued = ca.issue("relay")
        server_tls = server_context(ServerTLS(issued.cert, issued.key))
        verify = str(ca.cert_file)
        client_tls = ssl.create_default_context(cafile=verify)
    server = relay_server(app, "127.0.0.1:0", tls=server_tls).start()
    yield Relay(server.url, app, store, verify, client_tls)
    server.stop()
    store.close()


def checkin(relay: Relay, client: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {protocol.ENROLLMENT_HEADER: ENROLL_SECRET}
    return requests.post(f"{relay.url}/v1/clients/{client}/checkin", json=checkin_body(), headers=headers,
                         timeout=DEADLINE, verify=relay.verify)


def registered(relay: Relay, client: str) -> str:
    response = checkin(relay, client, None)
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def test_concurrent_check_ins_are_read_one_at_a_time(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = {f"pc-{i}": registered(relay, f"pc-{i}") for i in range(CLIENTS)}
    # Every check-in is read by the server and parsed by the app before any goes on: they are in flight at once.
    arrived = threading.Barrier(CLIENTS, timeout=DEADLINE)
    real_body = relay.app._body

    def body_then_meet(environ: Any, *, json_required: bool) -> bytes:
        data = real_body(environ, json_required=json_required)
        arrived.wait()
        return data

    # Inside the work of a check-in, each one waits a moment for another to come in alongside it.
    active = 0
    most = 0
    lock = threading.Lock()
    another = threading.Event()
    real_view = relay.store.checkin_view

    def watched_view(client_id: str) -> CheckinView | None:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
            if active > 1:
                another.set()
        try:
            another.wait(0.2)
            return real_view(client_id)
        finally:
            with lock:
                active -= 1

    with monkeypatch.context() as patched, ThreadPoolExecutor(CLIENTS) as pool:
        patched.setattr(relay.app, "_body", body_then_meet)
        patched.setattr(relay.store, "checkin_view", watched_view)
        replies = list(pool.map(lambda item: checkin(relay, *item), tokens.items()))
    assert [r.status_code for r in replies] == [200] * CLIENTS, [r.text for r in replies]
    assert all(r.json()["relay"] == "relay-a" for r in replies)
    assert most == 1 and not another.is_set()


def _stalled_request(relay: Relay, client: str, token: str) -> socket.socket:
    """A check-in whose headers and half of whose body are sent, the rest never."""
    body = json.dumps(checkin_body()).encode()
    host, port = relay.url.rsplit("/", 1)[-1].split(":")
    sock: socket.socket = socket.create_connection((host, int(port)), timeout=DEADLINE)
    if relay.tls is not None:
        sock = relay.tls.wrap_socket(sock, server_hostname=host)
    head = (f"POST /v1/clients/{client}/checkin HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:len(body) // 2])
    return sock


def test_a_client_that_stalls_sending_its_body_holds_up_no_other_check_in(relay: Relay) -> None:
    slow = registered(relay, "pc-slow")
    fast = registered(relay, "pc-fast")
    stalled = [_stalled_request(relay, "pc-slow", slow) for _ in range(3)]
    try:
        for _ in range(3):
            response = checkin(relay, "pc-fast", fast)
            assert response.status_code == 200, response.text
            assert response.json()["relay"] == "relay-a"
    finally:
        for sock in stalled:
            sock.close()
    assert checkin(relay, "pc-slow", slow).status_code == 200
