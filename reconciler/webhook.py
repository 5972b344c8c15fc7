"""The git webhook: ``POST /v1/hooks/git`` and its ``X-Hub-Signature-256`` check.

A push hook only wakes the reconcile loop (the loop then fetches and decides
for itself), so its body is never interpreted: a forged or replayed hook can
at worst cause one extra fetch. Still, when a secret is configured the body
must carry a valid ``X-Hub-Signature-256: sha256=<hex>`` (HMAC-SHA256, the
format GitHub, Gitea and GitLab-compatible hosts send), compared in constant
time; anything else is 401.

HQ serves :func:`hook_handler`; a relay's app checks hooks with
:func:`verify_signature`. Both read the secret with :func:`read_secret_file`.
Relay heartbeats to HQ are signed the same way (:func:`sign`,
:func:`verify_signature`), with a secret of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reconciler.serving import StartResponse, json_response, read_body

log = logging.getLogger(__name__)

HOOK_PATH = "/v1/hooks/git"
SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_HOOK_BODY = 1024 * 1024


def read_secret_file(path: str | Path) -> bytes:
    """A shared secret (webhook, heartbeats): the file's bytes without surrounding whitespace (a trailing newline is common)."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
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


def hook_handler(environ: Mapping[str, Any], start_response: StartResponse,
                 secret: bytes | None, trigger: Callable[[], None]) -> list[bytes]:
    """Handle ``POST /v1/hooks/git``: check the signature when a secret is set, then trigger."""
    if environ.get("REQUEST_METHOD") != "POST":
        return json_response(start_response, 405, {"error": "use POST"})
    body = read_body(environ, MAX_HOOK_BODY)
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
