"""The layout of a desired-state repo: which files are specs, what is not read, where artifact paths lead.

Pure over a listing of the repo's entries (path, kind, symlink target), so a
working tree (``reconciler validate`` in CI) and a commit (HQ, the relays)
are judged by the same function and get the same verdict. The listing is
git's: regular files, symbolic links, submodules and, in a working tree,
anything else (a FIFO, a socket, a device); directories exist only through
what they hold, and symbolic links are never followed while listing.

Decisions:

* Spec files are regular files. ``topology.yaml`` (or ``.yml``) at the top,
  ``*.yaml``/``*.yml`` anywhere below ``packages/`` and ``jobs/``. A spec
  file or spec folder that is a symbolic link, a submodule or a special file
  is an error, not followed: a commit cannot pull specs from outside itself,
  and reading a FIFO would hang.
* YAML files that are not read are reported as warnings, so a mistyped
  folder (``job/x.yaml``), an upper-case suffix or a second topology file is
  never silently ignored. Dot folders (``.github/``) and ``artifacts/`` (the
  conventional home of package payloads) are not reported.
* Artifact paths are resolved through symbolic links the way a checkout
  would, component by component; a directory artifact may hold symbolic
  links only when they resolve inside it (what the relay packs and the agent
  unpacks), and no special files or submodules.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from reconciler.specs import (
    JOBS_DIR,
    PACKAGES_DIR,
    SPEC_SUFFIXES,
    TOPOLOGY_FILES,
    ArtifactCheck,
    SpecError,
)

MAX_SYMLINK_HOPS = 40
ARTIFACTS_DIR = "artifacts/"
SPEC_DIRS = (PACKAGES_DIR, JOBS_DIR)
_YAML_SUFFIXES = (".yaml", ".yml")


class EntryKind(StrEnum):
    FILE = "file"
    SYMLINK = "symlink"
    SUBMODULE = "submodule"
    OTHER = "other"  # FIFO, socket, device: only a working tree has them


@dataclass(frozen=True, order=True)
class Entry:
    """One non-directory entry of the repo; ``target`` is a symbolic link's target."""

    path: str  # repo-relative, posix
    kind: EntryKind
    target: str | None = None


@dataclass(frozen=True)
class Selection:
    """The spec files to read, and what the listing alone shows to be wrong or unread."""

    spec_paths: tuple[str, ...]
    errors: tuple[SpecError, ...]
    warnings: tuple[SpecError, ...]


def printable_path(path: str) -> str:
    """A path safe to print: undecodable bytes of a file name become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _what(entry: Entry) -> str:
    if entry.kind is EntryKind.SYMLINK:
        return f"a symbolic link (to {printable_path(entry.target or '')!r})"
    if entry.kind is EntryKind.SUBMODULE:
        return "a git submodule"
    return "not a regular file (a FIFO, socket or device)"


def _in_spec_dir(path: str) -> bool:
    return path.startswith(SPEC_DIRS) or path + "/" in SPEC_DIRS


def _is_yaml(path: str) -> bool:
    return path.lower().endswith(_YAML_SUFFIXES)


def _not_reported(path: str) -> bool:
    return path.startswith(ARTIFACTS_DIR) or any(part.startswith(".") for part in path.split("/"))


def select_specs(entries: Iterable[Entry]) -> Selection:
    """Which entries are spec files, which are errors, and which YAML files are not read."""
    specs: list[str] = []
    errors: list[SpecError] = []
    warnings: list[SpecError] = []
    for entry in sorted(entries):
        path = entry.path
        shown = printable_path(path)
        is_topology = path in TOPOLOGY_FILES
        in_spec_dir = _in_spec_dir(path)
        if is_topology or (in_spec_dir and path.endswith(SPEC_SUFFIXES)):
            if shown != path:
                errors.append(SpecError(shown, 1, 1, "the file name is not valid UTF-8; rename the file"))
            elif entry.kind is EntryKind.FILE:
                specs.append(path)
            else:
                errors.append(SpecError(shown, 1, 1, f"a spec file must be a regular file, but this is "
                                                     f"{_what(entry)}; it is not read"))
            continue
        if in_spec_dir and entry.kind is not EntryKind.FILE:
            errors.append(SpecError(shown, 1, 1, f"{path.split('/')[0]}/ may hold only regular files and folders, "
                                                 f"but this is {_what(entry)}; it is not followed"))
            continue
        if not _is_yaml(path) or _not_reported(path):
            continue
        if in_spec_dir:
            why = "spec files end in .yaml or .yml, in lower case"
        elif "/" not in path and path.lower().startswith("topology"):
            why = "the topology is read from topology.yaml only"
        else:
            why = "specs are read from topology.yaml, packages/ and jobs/ only"
        warnings.append(SpecError(shown, 1, 1, f"not read: {why}"))
    return Selection(tuple(specs), tuple(errors), tuple(warnings))


# ------------------------------------------------------------------ artifacts


def link_escapes(link_path: str, target: str) -> bool:
    """Whether a symbolic link at ``link_path`` (relative to some root) points outside that root, lexically."""
    if not target or target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return joined == ".." or joined.startswith("../") or joined.startswith("/")


class _Listing:
    """The entries by path, with the directories they imply, for resolving paths."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.by_path = {entry.path: entry for entry in entries}
        self.paths = sorted(self.by_path)
        self.dirs = {""}
        for path in self.paths:
            parts = path.split("/")
            for end in range(1, len(parts)):
                self.dirs.add("/".join(parts[:end]))

    def below(self, directory: str) -> list[Entry]:
        prefix = directory + "/"
        start = bisect.bisect_left(self.paths, prefix)
        found: list[Entry] = []
        for path in self.paths[start:]:
            if not path.startswith(prefix):
                break
            found.append(self.by_path[path])
        return found

    def resolve(self, path: str) -> tuple[str | None, str | None]:
        """(where ``path`` leads, None) following symbolic links like a checkout would, or (None, problem)."""
        queue = [p for p in path.split("/") if p not in ("", ".")]
        resolved: list[str] = []
        hops = 0
        while queue:
            part = queue.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return None, "leaves the repo through a symbolic link"
                resolved.pop()
                continue
            candidate = "/".join([*resolved, part])
            entry = self.by_path.get(candidate)
            if entry is None:
                if candidate in self.dirs:
                    resolved.append(part)
                    continue
                return None, "is a broken symbolic link" if hops else "does not exist"
            if entry.kind is EntryKind.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None, "is a symbolic link loop"
                target = entry.target or ""
                if not target or target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":"):
                    return None, "leaves the repo through a symbolic link"
                queue = [p for p in target.split("/") if p] + queue
                continue
            if queue:
                return None, "does not exist"  # a file used as a directory
            resolved.append(part)
        return "/".join(resolved), None


def artifact_checker(entries: Sequence[Entry]) -> ArtifactCheck:
    """An :data:`~reconciler.specs.ArtifactCheck` answering from the listing alone.

    It is also an :class:`~reconciler.specs.ArtifactKinds`: it tells a directory
    (packed as a tar) from a file (a native installer's artifact must be one).
    """
    return _ArtifactChecker(_Listing(entries))


class _ArtifactChecker:
    def __init__(self, listing: _Listing) -> None:
        self.listing = listing

    def __call__(self, relpath: str) -> str | None:
        listing = self.listing
        resolved, problem = listing.resolve(relpath)
        if problem is not None or resolved is None:
            return problem or "does not exist"
        if resolved == "":
            return "is the whole repo"
        entry = listing.by_path.get(resolved)
        if entry is not None:
            if entry.kind is EntryKind.SUBMODULE:
                return "is a git submodule, not a file or directory"
            if entry.kind is EntryKind.OTHER:
                return "is not a regular file or directory"
            return None
        return _check_directory(listing, resolved)

    def is_directory(self, relpath: str) -> bool:
        """Whether ``relpath`` (which the check accepted) leads to a directory rather than a file."""
        resolved, problem = self.listing.resolve(relpath)
        return problem is None and resolved is not None and resolved not in self.listing.by_path


def _check_directory(listing: _Listing, directory: str) -> str | None:
    """The first entry that keeps a directory from being shipped as an artifact, or None."""
    cut = len(directory) + 1
    for entry in listing.below(directory):
        rel = printable_path(entry.path[cut:])
        if entry.kind is EntryKind.SUBMODULE:
            return f"holds a git submodule ({rel})"
        if entry.kind is EntryKind.OTHER:
            return f"holds {rel}, which is not a file, folder or symbolic link"
        if entry.kind is not EntryKind.SYMLINK:
            continue
        target = entry.target or ""
        shown = f"{rel} -> {printable_path(target)}"
        if link_escapes(entry.path[cut:], target):
            return f"holds a symbolic link that leaves it ({shown})"
        resolved, problem = listing.resolve(entry.path)
        if problem is not None or resolved is None:
            return f"holds a symbolic link that {problem or 'does not resolve'} ({shown})"
        if resolved != directory and not resolved.startswith(directory + "/"):
            return f"holds a symbolic link that leaves it ({shown})"
    return None
