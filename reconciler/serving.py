"""Serving HTTP: the one waitress server HQ and the relays run their WSGI apps on.

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

The module also holds the small WSGI helpers both apps share: the
``WSGIApp`` type, :func:`json_response` and :func:`read_body`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

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


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
