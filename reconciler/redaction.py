"""Credentials kept out of every message, log line and status file.

One redactor for git origins, relay URLs, artifact URLs and free text that may
quote any of them: user-info and query values become ``***``, and the secrets
a URL carries are masked wherever else they appear (raw or percent-encoded).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Final

_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]]+")
_SCHEME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str) -> str:
    """Return ``url`` with its user-info and query values replaced by ``***``.

    ``https://user:tok@host/x.git`` -> ``https://***@host/x.git``;
    ``https://host/x.git?token=abc`` -> ``https://host/x.git?token=***``.
    Local paths and scp-like ``git@host:path`` (no secret in them) are returned
    unchanged.
    """
    if not _SCHEME_RE.match(url):
        return url
    scheme, rest = url.split("://", 1)
    # Split off the authority by hand: urllib would choke on odd ports or
    # brackets, and a redactor must never raise.
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos != -1:
            end = min(end, pos)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    query_start = tail.find("?")
    if query_start != -1:
        frag_start = tail.find("#", query_start)
        query_end = len(tail) if frag_start == -1 else frag_start
        query = tail[query_start + 1 : query_end]
        redacted = "&".join(
            (part.split("=", 1)[0] + "=***") if "=" in part else part
            for part in query.split("&")
        )
        tail = tail[: query_start + 1] + redacted + tail[query_end:]
    return f"{scheme}://{authority}{tail}"


def url_secrets(url: str) -> list[str]:
    """Strings of ``url`` that must never appear in a message, raw or decoded."""
    if not _SCHEME_RE.match(url):
        return []
    parts = urllib.parse.urlsplit(url)
    found: list[str] = []
    if parts.password:
        found.append(parts.password)
    elif parts.username and len(parts.username) >= 8:
        found.append(parts.username)  # https://<token>@host form
    for _, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=False):
        found.append(value)
    out: list[str] = []
    for secret in found:
        for form in (secret, urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)):
            if len(form) >= 3 and form not in out:
                out.append(form)
    return sorted(out, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL in it redacted and each of ``secrets`` masked."""
    text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
