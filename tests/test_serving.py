"""The shared HTTP server on real sockets on 127.0.0.1: serving, stopping, listen addresses."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import requests
from tls_helpers import CA, Issued

from reconciler.serving import (
    ListenError,
    Server,
    StartResponse,
    TLSServer,
    json_response,
    make_server,
    parse_listen,
)
from reconciler.tls import ServerTLS, server_context

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


# ------------------------------------------------------------------ HTTPS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Issued]:
    ca = CA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("server")


@pytest.fixture
def tls_server(pki: tuple[CA, Issued]) -> Iterator[TLSServer]:
    ca, issued = pki
    s = TLSServer(_hello, "127.0.0.1:0", server_context(ServerTLS(issued.cert, issued.key)), name="test-https",
                  max_request_body_size=1000).start()
    yield s
    s.close()


def _tls_connection(ca: CA, port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                               server_hostname="127.0.0.1")


def test_https_serves_a_request_on_the_bound_port(tls_server: TLSServer, pki: tuple[CA, Issued]) -> None:
    assert tls_server.port != 0 and tls_server.url == f"https://127.0.0.1:{tls_server.port}"
    response = requests.get(tls_server.url + "/anything", timeout=DEADLINE, verify=str(pki[0].cert_file))
    assert response.status_code == 200 and response.json() == {"path": "/anything"}


def test_https_refuses_a_body_over_the_limit_before_the_app(tls_server: TLSServer, pki: tuple[CA, Issued]) -> None:
    response = requests.post(tls_server.url + "/big", data=b"x" * 5000, timeout=DEADLINE,
                             verify=str(pki[0].cert_file))
    assert response.status_code == 413


def test_https_answers_plain_http_with_a_json_400(tls_server: TLSServer) -> None:
    response = requests.get(tls_server.url.replace("https://", "http://") + "/x", timeout=DEADLINE)
    assert response.status_code == 400 and "https://" in response.json()["error"]


def test_https_stop_closes_an_idle_keep_alive_connection_and_ends_the_thread(tls_server: TLSServer,
                                                                            pki: tuple[CA, Issued]) -> None:
    conn = _tls_connection(pki[0], tls_server.port)
    try:
        for path in ("/one", "/two"):
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
            assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        tls_server.stop()
        try:
            assert conn.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # closed under us: also not a hang
    finally:
        conn.close()
    _wait_until(lambda: not tls_server.thread.is_alive(), "the serving thread to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tls_server.port), timeout=DEADLINE).close()
    tls_server.close()


def test_https_a_port_in_use_fails_when_the_server_is_made(tls_server: TLSServer, pki: tuple[CA, Issued]) -> None:
    with pytest.raises(OSError):
        TLSServer(_hello, f"127.0.0.1:{tls_server.port}", server_context(ServerTLS(pki[1].cert, pki[1].key)))


def test_make_server_picks_https_with_a_context(pki: tuple[CA, Issued]) -> None:
    plain = make_server(_hello, "127.0.0.1:0")
    secure = make_server(_hello, "127.0.0.1:0", tls=server_context(ServerTLS(pki[1].cert, pki[1].key)))
    try:
        assert isinstance(plain, Server) and plain.url.startswith("http://")
        assert isinstance(secure, TLSServer) and secure.url.startswith("https://")
    finally:
        plain.close()
        secure.close()
