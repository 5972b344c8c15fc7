"""Reading a desired-state repo, from a working tree or from a commit, the same way.

Both readers produce the same listing (:mod:`reconciler.repo_layout`) and
read only the files it selects, and :func:`load_tree` hands them to the pure
:func:`reconciler.specs.parse_repo` with an artifact check answered from that
listing. So ``reconciler validate`` on a checkout and HQ on the commit of
that checkout give one verdict, and every reader (HQ, the relays,
``reconciler status``, ``plan``, ``rerun``, the demo) goes through here.

A git checkout is judged as the commit ``git add -A`` would make
(:func:`reconciler.gitstore.worktree_snapshot`): ignored files, files git
keeps unchanged and encodings it converts are what HQ will see. A plain
directory is read as it is: the reader never follows a symbolic link while
listing and never opens anything but a regular file (``O_NOFOLLOW |
O_NONBLOCK`` and an ``fstat`` check, so a FIFO swapped in after listing
cannot hang it); like git, it skips ``.git`` and treats a folder holding a
``.git`` as a submodule.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from reconciler.gitstore import GitError, worktree_snapshot
from reconciler.repo_layout import (
    Entry,
    EntryKind,
    Selection,
    artifact_checker,
    select_specs,
)
from reconciler.specs import (
    JOBS_DIR,
    MAX_FILE_BYTES,
    PACKAGES_DIR,
    TOPOLOGY_FILES,
    ArtifactCheck,
    LoadResult,
    parse_repo,
)

SPEC_PREFIXES = (*TOPOLOGY_FILES, PACKAGES_DIR, JOBS_DIR)
MAX_ENTRIES = 1_000_000  # a working tree bigger than this is not a desired-state repo


class RepoTree(Protocol):
    """A repo's listing and the bytes of its regular files."""

    def entries(self) -> list[Entry]: ...

    def read(self, paths: Collection[str], limit: int) -> dict[str, bytes]:
        """The first ``limit + 1`` bytes of each regular file in ``paths``."""
        ...


class TreeError(OSError):
    """The working tree cannot be listed or read; ``strerror`` names the path."""


# ------------------------------------------------------------- working tree


class DirectoryTree:
    """A repo written in a plain directory (for a git checkout, see :func:`load_repo`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entries(self) -> list[Entry]:
        found: list[Entry] = []
        pending = [""]
        while pending:
            rel_dir = pending.pop()
            try:
                scan = list(os.scandir(self.root / rel_dir if rel_dir else self.root))
            except OSError as e:
                if not rel_dir:
                    raise
                raise TreeError(e.errno, f"cannot list {rel_dir}: {e.strerror}") from None
            for item in scan:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                if item.name == ".git":
                    continue
                mode = item.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    found.append(Entry(rel, EntryKind.SYMLINK, os.readlink(item.path)))
                elif stat.S_ISDIR(mode):
                    if os.path.lexists(os.path.join(item.path, ".git")):
                        found.append(Entry(rel, EntryKind.SUBMODULE))
                    else:
                        pending.append(rel)
                elif stat.S_ISREG(mode):
                    found.append(Entry(rel, EntryKind.FILE))
                else:
                    found.append(Entry(rel, EntryKind.OTHER))
                if len(found) > MAX_ENTRIES:
                    raise TreeError(0, f"cannot list it: more than {MAX_ENTRIES} files, not a desired-state repo")
        return sorted(found)

    def read(self, paths: Collection[str], limit: int) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for path in sorted(paths):
            try:
                files[path] = self._read(path, limit)
            except TreeError:
                raise
            except OSError as e:
                raise TreeError(e.errno, f"cannot read {path}: {e.strerror or e}") from None
        return files

    def _read(self, path: str, limit: int) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(self.root / path, flags)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TreeError(0, f"cannot read {path}: it is no longer a regular file")
            chunks: list[bytes] = []
            remaining = limit + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)


# ------------------------------------------------------------------- commit


class GitReader(Protocol):
    """What :class:`CommitTree` needs of :class:`reconciler.gitstore.GitStore`."""

    def list_tree(self, commit: str) -> list[tuple[str, str, str | None]]: ...

    def read_files(self, commit: str, prefixes: Sequence[str] = ..., max_size: int | None = ...) -> dict[str, bytes]: ...


class CommitTree:
    """A repo at one commit of a git mirror."""

    def __init__(self, store: GitReader, commit: str) -> None:
        self.store = store
        self.commit = commit

    def entries(self) -> list[Entry]:
        kinds = {"file": EntryKind.FILE, "symlink": EntryKind.SYMLINK, "submodule": EntryKind.SUBMODULE}
        return sorted(Entry(path, kinds.get(kind, EntryKind.OTHER), target)
                      for path, kind, target in self.store.list_tree(self.commit))

    def read(self, paths: Collection[str], limit: int) -> dict[str, bytes]:
        wanted = set(paths)
        files = self.store.read_files(self.commit, prefixes=SPEC_PREFIXES, max_size=limit)
        return {path: data for path, data in files.items() if path in wanted}


# ---------------------------------------------------------------- loading


class EditedTree:
    """A tree with some of its spec files' bytes replaced: an edit judged before it is written."""

    def __init__(self, tree: RepoTree, edited: Mapping[str, bytes]) -> None:
        self.tree = tree
        self.edited = dict(edited)

    def entries(self) -> list[Entry]:
        return self.tree.entries()

    def read(self, paths: Collection[str], limit: int) -> dict[str, bytes]:
        files = self.tree.read(paths, limit)
        files.update((path, data[: limit + 1]) for path, data in self.edited.items() if path in files)
        return files


def load_tree(tree: RepoTree) -> LoadResult:
    """Select, read and validate the specs of a repo; the listing's own errors and warnings included."""
    entries = tree.entries()
    selection = select_specs(entries)
    files = tree.read(selection.spec_paths, MAX_FILE_BYTES)
    return merge(parse_repo(files, artifact_checker(entries)), selection)


def spec_files(tree: RepoTree) -> dict[str, bytes]:
    """The spec files :func:`load_tree` reads, by path (at most ``MAX_FILE_BYTES + 1`` bytes each)."""
    return tree.read(select_specs(tree.entries()).spec_paths, MAX_FILE_BYTES)


def tree_artifact_check(tree: RepoTree) -> ArtifactCheck:
    """The artifact check :func:`load_tree` uses for this tree."""
    return artifact_checker(tree.entries())


def merge(result: LoadResult, selection: Selection) -> LoadResult:
    """``result`` with the listing's errors (which make it invalid) and warnings."""
    errors = tuple(sorted(set(result.errors) | set(selection.errors)))
    warnings = tuple(sorted(set(result.warnings) | set(selection.warnings)))
    return LoadResult(None if errors else result.specs, errors, warnings)


def find_repo(start: Path) -> Path:
    """The desired-state repo holding ``start``, found as git finds ``.git``.

    The nearest directory at or above ``start`` with a topology file; the
    search stops at the top of a git work tree. ``start`` itself when there
    is none (its problems are then said about it).
    """
    start = start.resolve()
    for folder in (start, *start.parents):
        if any((folder / name).is_file() for name in TOPOLOGY_FILES):
            return folder
        if (folder / ".git").exists():
            break
    return start


def repo_argument(given: str | None) -> str:
    """A command's REPO: as given, else the repo holding the current directory (relative to it)."""
    if given is not None:
        return given
    return os.path.relpath(find_repo(Path.cwd()))


def load_repo(root: Path) -> LoadResult:
    """Load and validate the repo in directory ``root`` (OSError if it cannot be read).

    In a git work tree, what ``git add -A`` would commit is judged (read like
    the commit HQ will see); a plain directory is read as it is.
    """
    return load_tree(open_repo(root))


def open_repo(root: Path) -> RepoTree:
    """The tree :func:`load_repo` judges for directory ``root`` (OSError if it cannot be read)."""
    if not root.is_dir():
        missing = not root.exists()
        raise (FileNotFoundError if missing else NotADirectoryError)(
            errno.ENOENT if missing else errno.ENOTDIR, "no such directory" if missing else "not a directory",
            str(root))
    try:
        snapshot = worktree_snapshot(root)
    except GitError as e:
        raise TreeError(0, f"cannot read it as git would commit it: {e}") from None
    if snapshot is not None:
        return CommitTree(*snapshot)
    return DirectoryTree(root)


def load_commit(store: GitReader, commit: str) -> LoadResult:
    """Load and validate the repo at ``commit`` of a git mirror."""
    return load_tree(CommitTree(store, commit))
