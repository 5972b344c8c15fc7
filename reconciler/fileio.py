"""Crash-safe file writes and content hashing, shared by the agent, the relay and the CLI.

Every state file is replaced atomically (temp file, fsync, rename, fsync of
the directory), so a process killed at any moment leaves the old content or
the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks (artifacts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TooLarge(ValueError):
    """A file holds more than the reader takes."""


def read_at_most(path: str | Path, limit: int) -> bytes:
    """A small file's bytes (a key, a list of keys): OSError when unreadable, :class:`TooLarge` beyond ``limit``."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{path} is larger than {limit} bytes")
    return data


def fsync_dir(directory: Path) -> None:
    """Make a rename durable. Windows cannot open directories; NTFS journals renames."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int | None = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half.

    ``mode`` is applied at creation, so a secret (the agent token, 0600) is
    never readable by others, not even for a moment. ``mode=None`` keeps the
    mode of the file being replaced (an admin's spec file), or 0644 for a new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if os.name != "nt":
            os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any, mode: int = 0o644) -> None:
    """:func:`write_atomic` for a JSON document (sorted keys: diffable by a human)."""
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode)


def quarantine(path: Path, reason: str) -> None:
    """Move an unreadable state file aside for inspection instead of deleting or trusting it."""
    target = path.with_name(path.name + ".corrupt")
    log.warning("%s is unreadable (%s); moved to %s", path, reason, target.name)
    try:
        os.replace(path, target)
    except OSError:
        path.unlink(missing_ok=True)
