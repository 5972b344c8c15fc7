"""What a ``files`` package's directory holds, recorded at install and checked at check-ins (drift).

At install the agent hashes every file of ``packages/<name>/<version>`` and
writes an index, ``content/<name>.json``::

    {"format": 1, "digest": "<sha256>", "verifiedAt": <unix time>,
     "files": {"bin/app": {"size": 12, "mtimeNs": ..., "ctimeNs": ..., "ino": ..., "sha256": "..."},
               "lib/link": {"link": "target"}, ...}}

``digest`` is one SHA-256 over the sorted list of (relative path, kind,
sha256 or link target): the whole tree in one value, which the receipt
keeps too (``content``: algorithm, digest, file and byte counts).

At each detection (a check-in once the agent's ``--detect-interval`` has
passed, or the first after an action; detection.py) :func:`check` compares
the tree with the index *cheaply*:
one ``lstat`` per file, and a file whose signature (size, mtime, inode and,
on POSIX, ctime) differs is re-hashed; a removed or added file is a change
at once. A file whose signature changed but whose content did not (touched,
copied back) only gets its new signature recorded. Every
``rehash_seconds`` (the agent's ``--rehash-interval``, a day by default)
every file is re-hashed whatever its signature says.

What the stat check sees: any change in size, a write (it moves mtime and
ctime), a file replaced by another (inode), a file added or removed, and on
POSIX a write whose mtime was set back afterwards (``touch -d``), since
setting mtime moves ctime, which no user can set back. What it cannot see:
a change that keeps size, mtime, inode and ctime, i.e. one made beneath the
file system (a raw disk edit, a snapshot restored with times kept) or,
on Windows, where ctime is the creation time, an in-place write whose mtime
was set back. Those are found by the next full re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Final

from reconciler.fileio import write_json_atomic

DEFAULT_REHASH_SECONDS: Final = 86400.0
FORMAT: Final = 1
_CHUNK = 1024 * 1024
_SHOWN = 5  # paths named per kind of change in a drift message


def _signature(st: os.stat_result) -> dict[str, int]:
    sig = {"size": st.st_size, "mtimeNs": st.st_mtime_ns, "ino": st.st_ino}
    if os.name != "nt":
        sig["ctimeNs"] = st.st_ctime_ns
    return sig


_POSIX = os.name != "nt"


def _same_signature(entry: dict[str, Any], st: os.stat_result) -> bool:
    """:func:`_signature` compared field by field (the check-in's hot loop: no dict per file)."""
    return (entry.get("size") == st.st_size and entry.get("mtimeNs") == st.st_mtime_ns
            and entry.get("ino") == st.st_ino and (not _POSIX or entry.get("ctimeNs") == st.st_ctime_ns))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan(root: Path) -> dict[str, os.stat_result]:
    """Every non-directory entry under ``root`` (not following links), by ``/``-separated relative path."""
    found: dict[str, os.stat_result] = {}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((Path(entry.path), rel + "/"))
                else:
                    found[rel] = st
    return found


def _entry(path: Path, st: os.stat_result) -> dict[str, Any]:
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path)}
    if not stat.S_ISREG(st.st_mode):
        return {"special": stat.S_IFMT(st.st_mode)}  # never opened: a FIFO would block
    return {**_signature(st), "sha256": sha256_of(path)}


def _identity(entry: dict[str, Any]) -> str:
    """What of an entry is content: its hash, link target or kind (signatures are not)."""
    if "link" in entry:
        return f"link\0{entry['link']}"
    if "special" in entry:
        return f"special\0{entry['special']}"
    return f"file\0{entry.get('sha256')}"


def tree_digest(files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{_identity(files[rel])}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def index_tree(root: Path) -> dict[str, dict[str, Any]]:
    """Hash every file of a tree (the full re-hash)."""
    return {rel: _entry(root / rel, st) for rel, st in scan(root).items()}


def _summary(files: dict[str, dict[str, Any]], digest: str) -> dict[str, Any]:
    size = sum(int(e.get("size", 0)) for e in files.values())
    return {"algorithm": "sha256", "digest": digest, "files": len(files), "bytes": size}


def record(root: Path, index_path: Path, now: float | None = None) -> dict[str, Any]:
    """Hash a freshly installed tree, write its index, and return the receipt's ``content``."""
    files = index_tree(root)
    digest = tree_digest(files)
    _write(index_path, files, digest, time.time() if now is None else now)
    return _summary(files, digest)


def _write(index_path: Path, files: dict[str, dict[str, Any]], digest: str, verified_at: float) -> None:
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index_path, {"format": FORMAT, "digest": digest, "verifiedAt": verified_at, "files": files})


def _read(index_path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict)
            or not all(isinstance(v, dict) for v in doc["files"].values())
            or not isinstance(doc.get("verifiedAt"), (int, float)) or not isinstance(doc.get("digest"), str)):
        return None
    return doc


def _listed(paths: list[str]) -> str:
    shown = ", ".join(sorted(paths)[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def check(root: Path, index_path: Path, expected_digest: str | None, rehash_seconds: float = DEFAULT_REHASH_SECONDS,
          now: float | None = None, *, full: bool | None = None) -> str | None:
    """What changed in an installed tree since it was recorded, or None when nothing did.

    ``full`` forces (True) or forbids (False) the full re-hash; by default it
    runs when the index was last fully verified ``rehash_seconds`` ago or more.
    A lost or unreadable index is rebuilt from a full re-hash, checked against
    ``expected_digest`` (the receipt's). The index is only updated when the
    tree is unchanged, so a drifted package stays drifted until reinstalled.
    """
    now = time.time() if now is None else now
    try:
        current = scan(root)
    except OSError as exc:
        return f"cannot read the package directory: {exc.strerror or exc}"
    doc = _read(index_path)
    if doc is None:
        files = {rel: _entry(root / rel, st) for rel, st in current.items()}
        digest = tree_digest(files)
        if expected_digest is not None and digest != expected_digest:
            return "content differs from the receipt's digest (its per-file index was lost)"
        _write(index_path, files, digest, now)
        return None
    recorded: dict[str, dict[str, Any]] = doc["files"]
    if full is None:
        full = now - float(doc["verifiedAt"]) >= rehash_seconds
    modified: list[str] = []
    removed = [rel for rel in recorded if rel not in current]
    added = [rel for rel in current if rel not in recorded]
    refreshed = False
    for rel, entry in recorded.items():
        st = current.get(rel)
        if st is None:
            continue
        if "sha256" in entry and stat.S_ISREG(st.st_mode) and not full and _same_signature(entry, st):
            continue
        try:
            now_entry = _entry(root / rel, st)
        except OSError:
            removed.append(rel)
            continue
        if _identity(now_entry) != _identity(entry):
            modified.append(rel)
        elif now_entry != entry:
            recorded[rel] = now_entry  # same content, new signature: remember it so the next check is cheap
            refreshed = True
    changes = [f"{len(paths)} {what} ({_listed(paths)})" for what, paths in
               (("modified", modified), ("removed", removed), ("added", added)) if paths]
    if changes:
        return "; ".join(changes)
    if full or refreshed:
        _write(index_path, recorded, doc["digest"], now if full else float(doc["verifiedAt"]))
    return None
