"""The git webhook: ``POST /v1/hooks/git``, authenticated by default, replays refused.

A push hook only wakes the reconcile loop (the loop then fetches and decides
for itself), so its body is never interpreted: a forged or replayed hook can
at worst cause extra fetches. Still, an open hook lets anyone on the network
make a service fetch as often as they like, so it is closed unless the
operator says otherwise:

* **A secret, or an explicit opt-out.** With a secret the body must carry a
  valid ``X-Hub-Signature-256: sha256=<hex>`` (HMAC-SHA256, the format
  GitHub, Gitea and GitLab-compatible hosts send), compared in constant time.
  Without one the hook is refused (401) unless the service was started with
  ``--insecure-unsigned-webhook``; everything else the service serves keeps
  working, and the poll interval still picks up every change.
* **No replays.** A signed hook is accepted once: the signatures (and the
  ``X-GitHub-Delivery``/``X-Gitea-Delivery``/``X-Gogs-Delivery`` ids) of the
  last :data:`REPLAY_WINDOW` accepted hooks are remembered and a repeat is
  409. Hosts put the pushed commits in the body, so two genuine pushes never
  share a signature. A sender of its own (a cron job, a CI step) that posts
  the same body each time adds ``X-Reconciler-Timestamp: <unix seconds>`` and
  signs ``<timestamp>.<body>`` instead of the body: the signature then differs
  each time, and a timestamp more than :data:`MAX_SKEW_SECONDS` away from the
  server's clock is refused (401). The window is in memory: a restarted
  service could accept one old hook again, which costs one fetch.

HQ serves :func:`hook_handler`; a relay's app checks hooks with a
:class:`HookGuard` of its own. Both read the secret with
:func:`read_secret_file`. Relay heartbeats to HQ are signed the same way
(:func:`sign`, :func:`verify_signature`), with a secret of their own.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reconciler.serving import StartResponse, json_response, read_body

log = logging.getLogger(__name__)

HOOK_PATH = "/v1/hooks/git"
SIGNATURE_HEADER = "X-Hub-Signature-256"
TIMESTAMP_HEADER = "X-Reconciler-Timestamp"
MAX_HOOK_BODY = 1024 * 1024
MAX_SKEW_SECONDS = 300
REPLAY_WINDOW = 4096
# WSGI names of the delivery-id headers git hosts send (one id per delivery, the same on a redelivery)
DELIVERY_HEADERS = ("HTTP_X_GITHUB_DELIVERY", "HTTP_X_GITEA_DELIVERY", "HTTP_X_GOGS_DELIVERY")
INSECURE_FLAG = "--insecure-unsigned-webhook"


def read_secret_file(path: str | Path) -> bytes:
    """A shared secret (webhook, heartbeats): the file's bytes without surrounding whitespace (a trailing newline is common)."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Hub-Signature-256`` header value for ``body`` (sent with ``X-Reconciler-Timestamp: timestamp`` if given)."""
    return "sha256=" + hmac.new(secret, _signed(body, timestamp), hashlib.sha256).hexdigest()


def _signed(body: bytes, timestamp: int | None) -> bytes:
    return body if timestamp is None else str(timestamp).encode("ascii") + b"." + body


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``sha256=<hex HMAC-SHA256 of body>``; constant-time."""
    if not header:
        return False
    scheme, _, digest = header.strip().partition("=")
    if scheme.lower() != "sha256" or not digest:
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), digest.strip().lower().encode("ascii", "replace"))


class HookRefused(Exception):
    """A hook that must not wake anything: ``status`` (401, 409) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HookGuard:
    """Decides whether a hook may wake a fetch: its signature, its freshness, and whether it was seen before.

    ``secret`` None refuses every hook unless ``insecure`` (the operator's
    ``--insecure-unsigned-webhook``), which accepts any. Thread-safe: the
    servers run requests on several threads.
    """

    def __init__(self, secret: bytes | None, *, insecure: bool = False, window: int = REPLAY_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.insecure = insecure and secret is None
        self.window = window
        self.clock = clock
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        """How hooks are treated, for the start-up log line."""
        return "signed" if self.secret is not None else ("unsigned (insecure)" if self.insecure else "refused")

    def check(self, environ: Mapping[str, Any], body: bytes) -> None:
        """Return if the hook may wake a fetch; raise :class:`HookRefused` if not (and remember it if so)."""
        if self.secret is None:
            if self.insecure:
                return
            raise HookRefused(401, f"webhook refused: this server has no webhook secret (start it with "
                                   f"--webhook-secret-file, or {INSECURE_FLAG} to accept unsigned hooks)")
        header = environ.get("HTTP_X_HUB_SIGNATURE_256")
        raw_timestamp = environ.get("HTTP_X_RECONCILER_TIMESTAMP")
        timestamp: int | None = None
        if raw_timestamp is not None:
            text = str(raw_timestamp).strip()
            if not (text.isascii() and text.isdigit() and len(text) <= 12):
                raise HookRefused(401, f"bad {TIMESTAMP_HEADER}: expected Unix seconds")
            timestamp = int(text)
            if abs(self.clock() - timestamp) > MAX_SKEW_SECONDS:
                raise HookRefused(401, f"{TIMESTAMP_HEADER} more than {MAX_SKEW_SECONDS} s from this "
                                       f"server's clock")
        if not verify_signature(self.secret, _signed(body, timestamp), header):
            reason = "missing" if not header else "bad"
            raise HookRefused(401, f"{reason} {SIGNATURE_HEADER} signature (HMAC-SHA256 of the "
                                   f"{'timestamp and ' if timestamp is not None else ''}body)")
        assert header is not None
        keys = ["sig:" + header.strip().partition("=")[2].strip().lower()]
        keys += [f"id:{environ[name]}"[:200] for name in DELIVERY_HEADERS if environ.get(name)]
        with self._lock:
            if any(key in self._seen for key in keys):
                raise HookRefused(409, "hook already delivered (same signature or delivery id): replay refused")
            for key in keys:
                self._seen[key] = None
            while len(self._seen) > self.window:
                self._seen.popitem(last=False)


def hook_handler(environ: Mapping[str, Any], start_response: StartResponse,
                 guard: HookGuard, trigger: Callable[[], None]) -> list[bytes]:
    """Handle ``POST /v1/hooks/git``: let ``guard`` check it, then trigger."""
    if environ.get("REQUEST_METHOD") != "POST":
        return json_response(start_response, 405, {"error": "use POST"})
    body = read_body(environ, MAX_HOOK_BODY)
    if isinstance(body, int):
        messages = {400: "bad Content-Length", 413: f"body larger than {MAX_HOOK_BODY} bytes"}
        return json_response(start_response, body, {"error": messages.get(body, "bad request")})
    try:
        guard.check(environ, body)
    except HookRefused as e:
        log.warning("%s", e.message)
        return json_response(start_response, e.status, {"error": e.message})
    trigger()
    return json_response(start_response, 202, {"ok": True, "status": "fetch scheduled"})
