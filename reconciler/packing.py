"""In-repo artifacts as every relay serves them: a file as it is, a directory as a deterministic tar.

A directory is packed as an uncompressed tar with entries sorted, mtime 0,
uid/gid 0, no user or group names and modes normalised to 0644/0755, so every
relay packing the same tree gets the same bytes and the same sha256, and HQ,
which signs that sha256 in its manifest (:mod:`reconciler.hq_manifest`),
gets it too. A symlink that leaves the directory is refused.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from reconciler.fileio import sha256_file

MAX_SYMLINK_HOPS = 8


class ArtifactError(Exception):
    """The artifact cannot be staged (refused or unavailable); the message says why."""


class ArtifactRefused(ArtifactError):
    """The artifact itself is wrong (sha256 mismatch, zip-slip, escaping link): only a new commit fixes it."""


class ArtifactPending(ArtifactError):
    """Not staged yet, but expected soon (the parent relay is still staging it): try again shortly."""




# ------------------------------------------------------------------ hashing writer


class HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()




# ------------------------------------------------------------------ deterministic tar


def escapes(link_path: str, target: str) -> bool:
    """Whether a symlink at ``link_path`` (relative to the artifact root) points outside it."""
    if not target or target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return joined == ".." or joined.startswith("../") or joined.startswith("/")


def pack_directory(root: Path, out: BinaryIO) -> tuple[str, int]:
    """Write ``root`` as a deterministic tar to ``out``; (sha256, size). ArtifactError on an escaping link."""
    entries: list[tuple[tuple[str, ...], str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            full = base / name
            rel = full.relative_to(root).as_posix()
            entries.append((tuple(rel.split("/")), rel, full))
    entries.sort()
    real_root = root.resolve()
    writer = HashingWriter(out)
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for _, rel, full in entries:
            st = os.lstat(full)
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                real = full.resolve()  # through every link on the way, not just this one
                if escapes(rel, target) or (real != real_root and real_root not in real.parents):
                    raise ArtifactRefused(f"symlink {rel} -> {target} leaves the artifact directory")
                info.type = tarfile.SYMTYPE
                info.linkname = target
                info.mode = 0o755
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.type = tarfile.REGTYPE
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                info.size = st.st_size
                with open(full, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                raise ArtifactRefused(f"{rel} is neither a file, a directory nor a symlink")
    return writer.digest.hexdigest(), writer.size


class GitReader(Protocol):
    def path_kind(self, commit: str, path: str) -> str | None: ...
    def symlink_target(self, commit: str, path: str) -> str | None: ...
    def export_path(self, commit: str, path: str, dest: Path) -> None: ...


def resolve_repo_path(git: GitReader, commit: str, path: str) -> str:
    """Follow symlinks (within the repo) to the file or directory an artifact path names."""
    current = path
    for _ in range(MAX_SYMLINK_HOPS):
        if git.path_kind(commit, current) != "symlink":
            return current
        target = git.symlink_target(commit, current) or ""
        if escapes(current, target):
            raise ArtifactRefused(f"artifact path {path!r} leaves the repository through a symlink")
        current = posixpath.normpath(posixpath.join(posixpath.dirname(current), target))
    raise ArtifactRefused(f"artifact path {path!r}: too many levels of symlinks")


@dataclass(frozen=True)
class Packed:
    """An in-repo artifact made servable: the file, its sha256 and size, its format and (a file's) name."""

    path: Path
    sha256: str
    size: int
    format: str  # "tar" or "file"
    file_name: str | None = None


def pack_repo_path(git: GitReader, commit: str, path: str, work: Path, *, durable: bool = False) -> Packed:
    """Export the artifact at ``path`` of ``commit`` into the empty directory ``work`` and make it servable.

    ``durable``: fsync the tar before returning (a relay installs it into its cache next).
    """
    resolved = resolve_repo_path(git, commit, path)
    kind = git.path_kind(commit, resolved)
    if kind == "file":
        exported = work / "file"
        git.export_path(commit, resolved, exported)
        return Packed(exported, sha256_file(exported), exported.stat().st_size, "file", repo_file_name(path))
    if kind == "dir":
        tree = work / "tree"
        git.export_path(commit, resolved, tree)
        packed = work / "packed.tar"
        with open(packed, "wb") as out:
            sha, size = pack_directory(tree, out)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        return Packed(packed, sha, size, "tar")
    if kind is None:
        raise ArtifactRefused(f"artifact path {path!r} does not exist at {commit[:12]}")
    raise ArtifactRefused(f"artifact path {path!r} is a {kind}, not a file or directory")


def url_file_name(url: str) -> str:
    """The file name a ``url`` artifact is served and unpacked under (``artifact`` when the URL has none)."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name or name in (".", "..") or "\\" in name or "\0" in name or len(name) > 255:
        return "artifact"
    return name


def url_artifact_form(url: str) -> tuple[str, str | None]:
    """How relays serve a ``url`` artifact: (format, ``fileName``): a ``.tar`` as a tar, anything else as a file."""
    name = url_file_name(url)
    return ("tar", None) if name.lower().endswith(".tar") else ("file", name)


def repo_file_name(path: str) -> str:
    """The ``fileName`` of an in-repo file artifact: the base name of its path as the package names it."""
    return PurePosixPath(path).name
