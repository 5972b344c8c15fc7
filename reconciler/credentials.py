"""Shared secrets that travel in HTTP headers: reading them from files, comparing them.

The relay's enrolment secret (agents present it once, to register) and the
secret a child relay presents to its parent for artifacts are sent as header
values, so a secret file must hold one line of visible ASCII: anything else
(an empty file, a secret with spaces, bytes that are not ASCII, a key file
pasted by mistake) is refused when the process starts, naming the file,
rather than failing at the first request. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

MIN_SECRET = 16  # characters: a guessable secret is no secret
MAX_SECRET = 1024  # characters: it travels in a header on every registration


class SecretFileError(ValueError):
    """The secret file cannot be used; the message names it and says why (a usage error, exit 2)."""


def read_header_secret(path: str | Path) -> str:
    """The secret in ``path``: one line of visible ASCII, 16 to 1,024 characters, surrounding whitespace dropped."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecretFileError(f"secret file {path} does not exist") from None
    except IsADirectoryError:
        raise SecretFileError(f"secret file {path} is a directory") from None
    except OSError as e:
        raise SecretFileError(f"cannot read secret file {path}: {e.strerror or e}") from None
    text = raw.strip()
    if not text:
        raise SecretFileError(f"secret file {path} is empty")
    if not all(0x21 <= byte <= 0x7E for byte in text):
        raise SecretFileError(f"secret file {path} must hold one line of visible ASCII characters (no spaces, "
                              "no other bytes): it is sent in an HTTP header")
    if not MIN_SECRET <= len(text) <= MAX_SECRET:
        raise SecretFileError(f"the secret in {path} has {len(text)} characters; use {MIN_SECRET} to {MAX_SECRET} "
                              "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return text.decode("ascii")


def secret_matches(presented: str | None, secret: str) -> bool:
    """Whether a header value is ``secret``, in constant time; any value that is not visible ASCII is not."""
    if presented is None:
        return False
    # WSGI hands header values over as latin-1 text: bytes above 0x7e can never match an ASCII secret.
    value = presented.strip().encode("latin-1", "replace")
    return hmac.compare_digest(value, secret.encode("ascii"))
