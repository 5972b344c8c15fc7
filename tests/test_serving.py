"""The shared HTTP server on real sockets on 127.0.0.1: serving, stopping, listen addresses."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import requests

from reconciler.serving import (
    ListenError,
    Server,
    StartResponse,
    json_response,
    parse_listen,
)

DEADLINE = 10.0


def _hello(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    return json_response(start_response, 200, {"path": environ.get("PATH_INFO")})


def _wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {DEADLINE:g}s")
        time.sleep(0.01)


def _read_response(conn: socket.socket) -> bytes:
    """One HTTP response (headers and a Content-Length body) from a raw connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = conn.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server(_hello, "127.0.0.1:0", name="test-http").start()
    yield s
    s.close()


def test_serves_a_request_on_the_bound_port(server: Server) -> None:
    assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
    response = requests.get(server.url + "/anything", timeout=DEADLINE)
    assert response.status_code == 200
    assert response.json() == {"path": "/anything"}
    assert response.headers["Content-Type"] == "application/json"


def test_stop_closes_an_idle_keep_alive_connection_and_ends_the_thread(server: Server) -> None:
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    try:
        # Two requests on one connection: it is kept alive, then sits idle.
        for path in ("/one", "/two"):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
            assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        server.stop()
        assert conn.recv(1) == b""  # EOF: the server closed it (a hang would hit the socket timeout)
    finally:
        conn.close()
    _wait_until(lambda: not server.thread.is_alive(), "the serving thread to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE).close()
    server.close()  # a second close is a no-op


def test_close_cuts_off_a_request_in_flight() -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        entered.set()
        release.wait(DEADLINE)
        return json_response(start_response, 200, {})

    server = Server(slow, "127.0.0.1:0").start()
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _wait_until(entered.is_set, "the request to reach the app")
        closer = threading.Thread(target=server.close)
        closer.start()
        assert conn.recv(1) == b""  # the client's connection is closed, the app still running
        release.set()
        closer.join(DEADLINE)
        assert not closer.is_alive() and not server.thread.is_alive()
    finally:
        release.set()
        conn.close()


def test_a_server_never_started_releases_its_port_on_close() -> None:
    server = Server(_hello, "127.0.0.1:0")
    port = server.port
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()


def test_a_port_in_use_fails_when_the_server_is_made(server: Server) -> None:
    with pytest.raises(OSError):
        Server(_hello, f"127.0.0.1:{server.port}")


def test_ipv6_loopback_url_has_brackets() -> None:
    try:
        server = Server(_hello, "[::1]:0").start()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        assert requests.get(server.url + "/v6", timeout=DEADLINE).json() == {"path": "/v6"}
    finally:
        server.close()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:65535") == ("0.0.0.0", 65535)


@pytest.mark.parametrize("bad", ["host", "host:99999", ":80", "host:", "host:http", "[]:80", "host:٣"])
def test_parse_listen_refuses(bad: str) -> None:
    with pytest.raises(ListenError, match="HOST:PORT"):
        parse_listen(bad)
    assert issubclass(ListenError, ValueError)
