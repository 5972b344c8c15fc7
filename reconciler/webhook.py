"""The HTTP bits HQ and the relays share: ``/healthz``, the git webhook, serving.

``POST /v1/hooks/git`` only wakes the reconcile loop (the loop then fetches
and decides for itself), so its body is never interpreted: a forged or
replayed hook can at worst cause one extra fetch. Still, when a secret is
configured the body must carry a valid ``X-Hub-Signature-256: sha256=<hex>``
(HMAC-SHA256, the format GitHub, Gitea and GitLab-compatible hosts send),
compared in constant time; anything else is 401.

Every response is JSON; errors are ``{"error": "..."}`` with a 4xx status,
never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOOK_PATH = "/v1/hooks/git"
HEALTH_PATH = "/healthz"
SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_HOOK_BODY = 1024 * 1024

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            500: "Internal Server Error"}


class ListenError(ValueError):
    """``--listen`` is not ``HOST:PORT``."""


def read_secret_file(path: str | Path) -> bytes:
    """The webhook secret: the file's bytes without surrounding whitespace (a trailing newline is common)."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"webhook secret file {path} is empty")
    return secret


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` header value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``sha256=<hex HMAC-SHA256 of body>``; constant-time."""
    if not header:
        return False
    scheme, _, digest = header.strip().partition("=")
    if scheme.lower() != "sha256" or not digest:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), digest.strip().lower().encode("ascii", "replace"))


def json_response(start_response: StartResponse, status: int, body: Mapping[str, Any]) -> list[bytes]:
    data = (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")
    start_response(f"{status} {_REASONS.get(status, 'Status')}", [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ])
    return [data]


def read_body(environ: Mapping[str, Any], limit: int = MAX_HOOK_BODY) -> bytes | int:
    """The request body, or an HTTP status (411/413/400) when it cannot be taken."""
    raw_length = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(raw_length) if raw_length else 0
    except ValueError:
        return 400
    if length < 0:
        return 400
    if length > limit:
        return 413
    stream = environ.get("wsgi.input")
    if stream is None or length == 0:
        return b""
    data = stream.read(length)
    return bytes(data)


def hook_handler(environ: Mapping[str, Any], start_response: StartResponse,
                 secret: bytes | None, trigger: Callable[[], None]) -> list[bytes]:
    """Handle ``POST /v1/hooks/git``: check the signature when a secret is set, then trigger."""
    if environ.get("REQUEST_METHOD") != "POST":
        return json_response(start_response, 405, {"error": "use POST"})
    body = read_body(environ)
    if isinstance(body, int):
        messages = {400: "bad Content-Length", 413: f"body larger than {MAX_HOOK_BODY} bytes"}
        return json_response(start_response, body, {"error": messages.get(body, "bad request")})
    if secret is not None:
        header = environ.get("HTTP_X_HUB_SIGNATURE_256")
        if not verify_signature(secret, body, header):
            reason = "missing" if not header else "bad"
            log.warning("webhook refused: %s %s header", reason, SIGNATURE_HEADER)
            return json_response(start_response, 401, {"error": f"{reason} {SIGNATURE_HEADER} signature"})
    trigger()
    return json_response(start_response, 202, {"ok": True, "status": "fetch scheduled"})


def make_app(trigger: Callable[[], None], secret: bytes | None,
             health: Callable[[], Mapping[str, Any]] | None = None) -> WSGIApp:
    """A WSGI app serving ``GET /healthz`` and ``POST /v1/hooks/git`` (HQ's whole API)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if path == HEALTH_PATH:
                if method not in ("GET", "HEAD"):
                    return json_response(start_response, 405, {"error": "use GET"})
                return json_response(start_response, 200, {"ok": True, **(health() if health else {})})
            if path == HOOK_PATH:
                return hook_handler(environ, start_response, secret, trigger)
            return json_response(start_response, 404, {"error": f"no such endpoint: {path}"})
        except Exception:  # noqa: BLE001 - a bug must give a JSON 500, not a traceback to the caller
            log.exception("error serving %s %s", method, path)
            return json_response(start_response, 500, {"error": "internal error"})

    return app


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


class Server:
    """A waitress server on a daemon thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, app: WSGIApp, listen: str, *, threads: int = 4, name: str = "http") -> None:
        from waitress.server import create_server  # type: ignore[import-untyped]

        host, port = parse_listen(listen)
        self._server: Any = create_server(app, host=host, port=port, threads=threads,
                                          ident="reconciler", clear_untrusted_proxy_headers=True,
                                          asyncore_loop_timeout=0.2)
        self.host = host
        self.port: int = int(self._server.effective_port)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        except (OSError, ValueError):  # sockets closed under the loop during shutdown
            pass

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every connection and end the serving thread."""
        from waitress import wasyncore  # type: ignore[import-untyped]

        self._server.task_dispatcher.shutdown()
        wasyncore.close_all(self._server._map, ignore_all=True)  # an empty map ends the loop
        self._thread.join(timeout=5)
