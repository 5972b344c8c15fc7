"""Credentials kept out of every message, log line and status file.

One redactor for git origins, relay URLs, artifact URLs and free text that may
quote any of them: user-info and query values become ``***``, and the secrets
a URL carries are masked wherever else they appear (raw or percent-encoded).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final

_URL_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]]+")
_SCHEME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _authority(rest: str) -> tuple[str, str]:
    """``user@host:port`` and the rest of a URL after ``scheme://``.

    Split by hand: urllib would choke on odd ports or brackets, and a
    redactor must never raise.
    """
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos != -1:
            end = min(end, pos)
    return rest[:end], rest[end:]


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
    authority, tail = _authority(rest)
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


# ------------------------------------------------------------------ installer output

# Secret shapes masked in installer output before it leaves a client. Each
# keeps what names the secret (``password=``, ``Authorization:``) and masks
# the value, so the message still says what went wrong. Possessive
# quantifiers keep every pattern linear in its input.
_BUILTIN_OUTPUT_PATTERNS: Final = (
    # PEM private keys, a block cut off by the end of the output included
    (re.compile(r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY-----|\Z)",
                re.DOTALL), "-----BEGIN PRIVATE KEY----- *** -----END PRIVATE KEY-----"),
    # HTTP headers carrying credentials: the rest of the line
    (re.compile(r"(?im)\b((?:proxy-)?authorization|x-api-key|cookie|set-cookie)(\s*+:\s*+)[^\r\n]++"),
     r"\1\2***"),
    (re.compile(r"(?i)\b(bearer|basic)(\s++)[A-Za-z0-9._~+/-]++=*+"), r"\1\2***"),
    # key=value and key: value (also quoted and JSON-style) for credential-like keys
    (re.compile(r"(?i)(passw(?:or)?d|passphrase|\bpwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
                r"|credentials?)([\w-]*+[\"']?\s*+[=:]\s*+)(\"[^\"\r\n]*+\"|'[^'\r\n]*+'|[^\s,;&\"']++)"),
     r"\1\2***"),
    # AWS access key ids
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"), "***"),
)

MAX_REDACT_PATTERNS: Final = 16
"""At most this many ``spec.installer.redact`` patterns per package."""
MAX_REDACT_PATTERN_LENGTH: Final = 200
"""Characters of one ``spec.installer.redact`` pattern."""
MAX_REDACT_INPUT: Final = 10_000
"""Characters of text the patterns run over (its tail; the agent keeps at most 8,000 of a command's output):
what bounds their cost. A pattern may still scan the rest of the text from each position (`[ab]+c`
over `aaaa...`), which takes well under a second at this size."""


def redact_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``spec.installer.redact`` pattern, or None.

    It must be 1 to 200 characters, compile with Python's ``re``, not match
    the empty string (it would mask between every two characters), and hold
    no unbounded repetition inside another (``(a+)+``, ``(\\w*\\s?)*``), the
    shape that backtracks catastrophically; a possessive quantifier
    (``(a+)++``) or an atomic group (``(?>...)``) is allowed there. The text
    patterns run over is bounded as well (:data:`MAX_REDACT_INPUT`).
    """
    if not 0 < len(pattern) <= MAX_REDACT_PATTERN_LENGTH:
        return f"must be 1 to {MAX_REDACT_PATTERN_LENGTH} characters long, not {len(pattern)}"
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        return f"is not a valid regular expression: {e.msg} at position {e.pos}"
    except (RecursionError, OverflowError, ValueError):
        return "is not a valid regular expression"
    if _nested_repeat(pattern):
        return ("repeats an unbounded repetition (like (a+)+), which can take exponential time: make the "
                "inner or outer one possessive (a++) or atomic ((?>...))")
    if compiled.search("") is not None:
        return "matches the empty string: it would mask every position of the output"
    return None


def _nested_repeat(pattern: str) -> bool:
    """Whether ``pattern`` holds a greedy or lazy unbounded repeat inside another repeat."""
    try:
        from re import _constants, _parser  # type: ignore[attr-defined]  # the parser ``re`` itself uses
        parsed = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 - another Python's internals: compile() alone then decides
        return False
    repeats = {_constants.MAX_REPEAT, _constants.MIN_REPEAT}
    unbounded = _constants.MAXREPEAT

    def walk(items: Any, inside_repeat: bool) -> bool:
        for op, av in items:
            if op in repeats:
                low, high, sub = av
                if inside_repeat and high == unbounded:
                    return True
                if walk(sub, inside_repeat or high == unbounded or high > 1):
                    return True
            elif op is _constants.SUBPATTERN:
                if walk(av[3], inside_repeat):
                    return True
            elif op is _constants.BRANCH:
                if any(walk(branch, inside_repeat) for branch in av[1]):
                    return True
            elif op in (_constants.ASSERT, _constants.ASSERT_NOT):
                if walk(av[1], inside_repeat):
                    return True
            # POSSESSIVE_REPEAT and ATOMIC_GROUP never backtrack into their content
        return False

    return walk(parsed, False)


def compile_redact_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Operator patterns as :func:`redact_output` takes them; ValueError naming the first bad one."""
    compiled: list[re.Pattern[str]] = []
    for index, pattern in enumerate(patterns):
        problem = redact_pattern_problem(pattern)
        if problem is not None:
            raise ValueError(f"redact[{index}] {problem}")
        compiled.append(re.compile(pattern))
    return tuple(compiled)


def redact_output(text: str, patterns: Iterable[re.Pattern[str]] = ()) -> str:
    """``text`` (installer output, a message quoting it) with secrets masked as ``***``.

    Built-in shapes (private keys, credential headers, ``password=``/``token:``
    values, bearer tokens, AWS key ids, URL credentials), then each operator
    pattern's whole match. Only the last :data:`MAX_REDACT_INPUT` characters
    are kept, and a first line cut in the middle is dropped (when the window
    holds another), since a secret's name may have been cut off and the
    pattern naming it would no longer match.
    """
    if len(text) > MAX_REDACT_INPUT:
        text = text[-MAX_REDACT_INPUT:]
        newline = text.find("\n")
        text = "…" + (text[newline + 1:] if newline != -1 else text)
    for builtin, replacement in _BUILTIN_OUTPUT_PATTERNS:
        text = builtin.sub(replacement, text)
    text = redact_text(text)
    for pattern in patterns:
        text = pattern.sub("***", text)
    return text


# ------------------------------------------------------------------ origin credentials


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its user-info, and the (percent-decoded) user name and password it held.

    ``https://user:pa%40ss@host/x.git`` -> (``https://host/x.git``, ``user``, ``pa@ss``);
    a URL without user-info, a local path or an scp-like ``git@host:path`` is
    returned unchanged with (None, None).
    """
    if not _SCHEME_RE.match(url):
        return url, None, None
    scheme, rest = url.split("://", 1)
    authority, tail = _authority(rest)
    if "@" not in authority:
        return url, None, None
    userinfo, host = authority.rsplit("@", 1)
    user, sep, password = userinfo.partition(":")
    return (f"{scheme}://{host}{tail}", urllib.parse.unquote(user) or None,
            urllib.parse.unquote(password) if sep else None)
