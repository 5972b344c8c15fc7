"""Serving HTTP and HTTPS: the servers HQ and the relays run their WSGI apps on.

:func:`make_server` picks one: :class:`TLSServer` (cheroot, which can speak
TLS) when given an :class:`ssl.SSLContext`, else :class:`Server` (waitress,
plain HTTP, only with ``--insecure-http``). Both bind in their constructor,
serve on a daemon thread, and have the same ``url``/``host``/``port``,
``start`` and ``close``.

A :class:`Server` binds in its constructor (so a bad address or a port in use
fails before anything starts, and port 0 is resolved to the real port at
once), then serves on a daemon thread. The thread runs waitress's event loop
one poll at a time over a socket map this module owns, so stopping is ours
to do, on that thread: :meth:`Server.close` sets a flag and wakes the poll,
and the serving thread, between two polls, closes the listening socket and
every open connection (idle keep-alive ones included) and stops the worker
threads before it ends. No socket is ever closed under a poll running on
another thread.

Only waitress's public API is used: ``create_server(app, map=...)`` fills
the map we pass, ``wasyncore.loop(map=..., count=1)`` polls it, and a
``trigger`` of our own in that map wakes the poll.

:class:`TLSServer` runs cheroot with an SSL adapter of its own: the TLS
handshake is advanced without blocking by a worker each time the client
sends something, and the connection waits on cheroot's selector in between,
with a deadline of :data:`HANDSHAKE_SECONDS` (cheroot's own adapter shakes
hands on the thread that accepts connections, so one client that connects
and stalls would hold up every other). A handshake that fails (a client that
does not trust us, a missing client certificate, garbage instead of a TLS
hello) closes that connection and nothing else; a client speaking plain HTTP
gets a 400 with a JSON error saying the server speaks HTTPS.

The module also holds the small WSGI helpers both apps share: the
``WSGIApp`` type, :func:`json_response` and :func:`read_body`.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from cheroot import wsgi as cheroot_wsgi
from cheroot.makefile import StreamReader, StreamWriter
from cheroot.server import HTTPConnection
from cheroot.ssl import Adapter
from waitress import trigger, wasyncore  # type: ignore[import-untyped]
from waitress.server import BaseWSGIServer, create_server  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

POLL_SECONDS = 1.0
"""Longest a poll of the serving thread blocks; a close wakes it at once, this only bounds a missed wake-up."""
JOIN_SECONDS = 10.0
"""How long :meth:`Server.close` waits for the serving thread (its worker threads get half of it)."""


# ------------------------------------------------------------------ WSGI helpers


def json_response(start_response: StartResponse, status: int, body: Mapping[str, Any]) -> list[bytes]:
    """Answer ``status`` with ``body`` as one line of JSON (keys sorted), never cached."""
    data = (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    start_response(f"{status} {reason}", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ])
    return [data]


def read_body(environ: Mapping[str, Any], limit: int) -> bytes | int:
    """The request body, or the HTTP status (400, 413) that refuses it when it cannot be taken.

    A body longer than ``limit`` is refused from its ``Content-Length``
    before a byte of it is read.
    """
    raw_length = environ.get("CONTENT_LENGTH") or ""
    if raw_length and not (raw_length.isascii() and raw_length.isdigit()):
        return 400
    length = int(raw_length) if raw_length else 0
    if length > limit:
        return 413
    stream = environ.get("wsgi.input")
    if stream is None or length == 0:
        return b""
    return bytes(stream.read(length))


# ------------------------------------------------------------------ addresses


class ListenError(ValueError):
    """A ``--listen`` value that is not ``HOST:PORT``."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``[::1]:PORT`` for IPv6, port 0 for any free port.

    Raises :class:`ListenError` (a ``ValueError``) naming the expected form.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ListenError(f"expected HOST:PORT ([ADDRESS]:PORT for IPv6), got {text!r}")
    return host, int(port_text)


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# ------------------------------------------------------------------ the server


class _FromThread(logging.Filter):
    """Drops the records of one thread: the serving thread's, while it shuts waitress down."""

    def __init__(self, ident: int | None) -> None:
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.ident


class Server:
    """A WSGI app served by waitress on a daemon thread.

    The socket is bound when the object is made: ``url``, ``host`` and
    ``port`` are the address actually bound (the real port when 0 was
    asked for). :meth:`start` starts serving; :meth:`close` (also called
    :meth:`stop`) stops accepting, closes every open connection and ends
    the thread.

    The keyword options are waitress's own, chosen per process: ``threads``
    run the app, at most ``connection_limit`` connections are open at once
    (more wait in the kernel's ``backlog``), an idle connection is closed
    after ``channel_timeout`` seconds, and a request body larger than
    ``max_request_body_size`` is refused by waitress before the app sees it
    (waitress buffers a body first, so this bounds memory; apps set their
    own, smaller limits with a JSON error). ``quiet_queue`` mutes waitress's
    "Task queue depth" warning, normal under load for a server whose
    clients poll. Tracebacks never reach a client, and proxy headers are
    ignored.
    """

    def __init__(self, app: WSGIApp, listen: str, *, name: str = "http", ident: str = "reconciler",
                 threads: int = 4, connection_limit: int = 100, backlog: int = 1024,
                 channel_timeout: float = 120.0, max_request_body_size: int = 16 * 1024 * 1024,
                 quiet_queue: bool = False) -> None:
        host, port = parse_listen(listen)
        if quiet_queue:
            logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._map: dict[int, Any] = {}
        try:
            self._server: Any = create_server(
                app, map=self._map, host=host, port=port, threads=threads, ident=ident,
                connection_limit=connection_limit, backlog=backlog, channel_timeout=channel_timeout,
                max_request_body_size=max_request_body_size, expose_tracebacks=False,
                clear_untrusted_proxy_headers=True, asyncore_use_poll=True)
        except BaseException:
            wasyncore.close_all(self._map, ignore_all=True)  # a socket made before the bind failed
            raise
        # Several sockets when the host name resolves to several addresses; the URL names the first.
        bound: list[tuple[str, int]] = list(getattr(self._server, "effective_listen", None)
                                            or [(self._server.effective_host, self._server.effective_port)])
        self.host: str = str(bound[0][0])
        self.port: int = int(bound[0][1])
        self.url: str = _url(self.host, self.port)
        self._wake: Any = trigger.trigger(self._map)
        self._stopping = threading.Event()
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> Server:
        """Serve on the daemon thread; returns self."""
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every open connection and end the serving thread (idempotent)."""
        self._stopping.set()
        if self.thread.is_alive():
            try:
                self._wake.pull_trigger()
            except OSError:  # already closed by the serving thread: it is ending
                pass
            self.thread.join(timeout=JOIN_SECONDS)
            if self.thread.is_alive():
                log.warning("HTTP server on %s did not stop within %gs", self.url, JOIN_SECONDS)
        elif self.thread.ident is None:  # never started: no poll runs, close from here
            self._close_sockets()

    stop = close

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set() and self._map:
                wasyncore.loop(timeout=POLL_SECONDS, map=self._map, use_poll=True, count=1)
        except Exception:  # noqa: BLE001 - the loop itself failed: log it, then still close everything
            log.exception("HTTP server on %s failed", self.url)
        finally:
            self._close_sockets()

    def _close_sockets(self) -> None:
        """Close the listener, then every connection, stop the worker threads, then the wake-up pipes.

        Runs on the serving thread (or on the caller's when the server never
        started), so no poll is using the sockets. The wake-up pipes close
        last: a worker finishing a request pulls its server's pipe, and a
        closed one would make that a write to a stale descriptor (they are
        left open if a worker outlives the wait). Waitress's own warnings
        about what this cuts short (pending requests cancelled, workers still
        busy) are expected here and not logged.
        """
        if self._closed:
            return
        self._closed = True
        waitress_log = logging.getLogger("waitress")
        quiet = _FromThread(threading.get_ident())
        waitress_log.addFilter(quiet)
        try:
            dispatchers = list(self._map.values())
            for listener in (d for d in dispatchers if isinstance(d, BaseWSGIServer)):
                # The base class's close: the socket only, not the listener's wake-up pipe.
                self._quietly(wasyncore.dispatcher.close, listener)
            for connection in (d for d in dispatchers if not isinstance(d, (BaseWSGIServer, trigger.trigger))):
                self._quietly(connection.handle_close)
            tasks = self._server.task_dispatcher
            tasks.shutdown(cancel_pending=True, timeout=JOIN_SECONDS / 2)
            if not tasks.threads:
                wasyncore.close_all(self._map, ignore_all=True)
        finally:
            waitress_log.removeFilter(quiet)

    @staticmethod
    def _quietly(close: Callable[..., Any], *args: Any) -> None:
        try:
            close(*args)
        except Exception:  # noqa: BLE001 - closing: nothing left to protect
            log.debug("error closing %r", args or close, exc_info=True)


# ------------------------------------------------------------------ HTTPS (cheroot)


HANDSHAKE_SECONDS = 10.0
"""Longest a client may take over its TLS handshake (no thread waits for it meanwhile)."""

_PLAIN_HTTP_BODY = (json.dumps({"error": "this server speaks HTTPS only: use an https:// URL"}) + "\n").encode()


class _WorkerHandshakeAdapter(Adapter):
    """Wraps accepted sockets without a handshake; :class:`_HandshakingConnection` does it on a worker."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__("", "")
        self.context = context

    def bind(self, sock: Any) -> Any:
        return sock

    def wrap(self, sock: Any) -> tuple[Any, dict[str, str]]:
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, self.get_environ(wrapped)

    def get_environ(self, sock: Any = None) -> dict[str, str]:
        return {"wsgi.url_scheme": "https", "HTTPS": "on"}

    def makefile(self, sock: Any, mode: str = "r", bufsize: int = -1) -> Any:
        return (StreamReader if "r" in mode else StreamWriter)(sock, mode, bufsize)


class _HandshakingConnection(HTTPConnection):
    """A cheroot connection whose TLS handshake runs step by step, never blocking a worker.

    Each time the connection has input, a worker advances the handshake
    without blocking; when it needs more from the client, the connection
    goes back to cheroot's selector (``communicate`` returns True, "keep it
    open") and no thread waits for it. Once the handshake is done the
    requests are served as usual. A handshake not done within
    :data:`HANDSHAKE_SECONDS` (counted when the client next sends
    something; a silent one is closed as idle) or one that fails closes
    this connection only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshaken = False
        self.since = time.monotonic()

    def communicate(self) -> bool:
        if not self.handshaken and isinstance(self.socket, ssl.SSLSocket):
            step = self._handshake_step()
            if step is not True:
                return step is None  # None: waiting for the client (back to the selector); False: close
            if not self._has_input():
                return True
        return bool(super().communicate())  # type: ignore[no-untyped-call]

    def _handshake_step(self) -> bool | None:
        """True once the handshake is done, None while it waits for the client, False when it failed."""
        sock: ssl.SSLSocket = self.socket
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if time.monotonic() - self.since > HANDSHAKE_SECONDS:
                log.debug("TLS handshake with %s took over %gs: closed", self.remote_addr, HANDSHAKE_SECONDS)
                return False
            return None
        except ssl.SSLError as e:
            if "HTTP_REQUEST" in (getattr(e, "reason", None) or "").upper():
                self._answer_plain_http()
            log.debug("TLS handshake with %s failed: %s", self.remote_addr, e)
            return False
        except OSError as e:  # a reset: this connection only
            log.debug("TLS handshake with %s failed: %s", self.remote_addr, e)
            return False
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
        self.handshaken = True
        return True

    def _has_input(self) -> bool:
        """Whether a request is already there to read (decrypted and buffered, or on the socket)."""
        try:
            return self.socket.pending() > 0 or bool(select.select([self.socket], [], [], 0)[0])
        except (OSError, ValueError):
            return True  # let the read find out

    def _answer_plain_http(self) -> None:
        """A 400 in plain HTTP on the raw socket, below the TLS layer, to a client that sent plain HTTP."""
        head = ("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(_PLAIN_HTTP_BODY)}\r\nConnection: close\r\n\r\n").encode("ascii")
        try:
            self.socket.settimeout(1.0)
            socket.socket.sendall(self.socket, head + _PLAIN_HTTP_BODY)  # the raw socket, below TLS
        except OSError:
            pass


class _CherootServer(cheroot_wsgi.Server):
    ConnectionClass = _HandshakingConnection

    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        log.log(min(level, logging.DEBUG) if not traceback else logging.ERROR, "%s", msg, exc_info=traceback)


class TLSServer:
    """A WSGI app served over HTTPS by cheroot on a daemon thread; the same interface as :class:`Server`.

    ``threads`` workers run the app (and the handshakes); at most
    ``connection_limit`` requests wait for a worker; an idle connection is
    closed after ``channel_timeout`` seconds; a body over
    ``max_request_body_size`` is refused (413) before the app sees it.
    """

    def __init__(self, app: WSGIApp, listen: str, context: ssl.SSLContext, *, name: str = "https",
                 ident: str = "reconciler", threads: int = 4, connection_limit: int = 100, backlog: int = 1024,
                 channel_timeout: float = 120.0, max_request_body_size: int = 16 * 1024 * 1024,
                 quiet_queue: bool = False) -> None:
        host, port = parse_listen(listen)
        self._server: Any = _CherootServer((host, port), app, numthreads=threads, server_name=ident,
                                           max=connection_limit, request_queue_size=backlog,
                                           timeout=max(1, round(channel_timeout)),
                                           shutdown_timeout=round(JOIN_SECONDS / 2))
        self._server.ssl_adapter = _WorkerHandshakeAdapter(context)
        self._server.max_request_body_size = max_request_body_size
        self._server.keep_alive_conn_limit = connection_limit
        self._server.prepare()  # binds: a port in use fails here
        bound = self._server.bind_addr
        self.host: str = str(bound[0])
        self.port: int = int(bound[1])
        self.url: str = _url(self.host, self.port, "https")
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _serve(self) -> None:
        try:
            self._server.serve()
        except Exception:  # noqa: BLE001
            log.exception("HTTPS server on %s failed", self.url)

    def start(self) -> TLSServer:
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every open connection and end the serving thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server.stop()
        if self.thread.ident is not None:
            self.thread.join(timeout=JOIN_SECONDS)
            if self.thread.is_alive():
                log.warning("HTTPS server on %s did not stop within %gs", self.url, JOIN_SECONDS)

    stop = close


AnyServer = Server | TLSServer


def make_server(app: WSGIApp, listen: str, *, tls: ssl.SSLContext | None = None, **options: Any) -> AnyServer:
    """:class:`TLSServer` with ``tls``, else :class:`Server` (plain HTTP), bound to ``listen``, not yet started."""
    if tls is not None:
        return TLSServer(app, listen, tls, **options)
    return Server(app, listen, **options)
