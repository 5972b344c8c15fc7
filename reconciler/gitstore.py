"""Every read and write of git goes through this module.

Each reconciler keeps a bare mirror of its origin at ``<workdir>/repo.git``:
``fetch`` copies origin's branches into the mirror's own ``refs/heads/*``
(so ``git -C repo.git log status/hq`` works there exactly as on the origin),
specs are read straight from commits with ``ls-tree`` plus one ``cat-file
--batch`` process (never a checkout), and status is published by building a
commit with plumbing in a throw-away index and pushing it without force.

Decisions behind it:

* **Credentials never reach disk, argv or a message.** The origin URL is handed
  to git through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n`` environment entries
  as ``remote.origin.url`` (readable only by our own user), so it is not
  stored in the mirror's config. It is handed over *without* user-info: git
  gives the URL to its remote helper (``git-remote-https origin <url>``) on
  the command line, where ``ps`` shows it to every user. A user name and
  password (from the URL, or ``password`` from a file or the environment)
  travel as an ``http.<origin>.extraHeader: Authorization: Basic ...``
  config entry in the environment instead, scoped to the origin's URL.
  Every failure is wrapped in :class:`GitError` whose text went through
  :func:`redact_url`.
* **Single writer per ref, but no blind trust.** ``publish`` asks the origin for
  the ref's tip (``ls-remote``) before building, so a stale local copy can
  neither make it report "unchanged" wrongly nor overwrite anything: the push
  is never forced, and a rejected push is rebuilt on the new tip and retried
  with jittered backoff.
* **The mirror is a cache.** It is created atomically (``git init`` in a
  temporary directory, then ``rename``), so a killed process never leaves a
  half-made clone behind; one that is unusable anyway is moved aside and
  recreated, and stale ``*.lock`` files from a killed git are removed when a
  store opens it (one process per workdir).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Final

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from reconciler.errors import Cause, ReconcilerError, git_cause
from reconciler.metrics import Metrics
from reconciler.redaction import redact_text, redact_url, split_credentials, url_secrets

log = logging.getLogger(__name__)

STATUS_PREFIX: Final = "status/"

DEFAULT_IDENTITY: Final = ("reconciler", "reconciler@localhost")

_REPO_DIR: Final = "repo.git"
_MAX_MESSAGE: Final = 2000
_CHUNK: Final = 1 << 20
# Oversized blobs up to this size are streamed through the batch (and cut);
# bigger ones get a process of their own that is killed after the head.
_STREAM_LIMIT: Final = 8 << 20
_EMPTY_TREE: Final = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"

# Inherited variables that would point git at some other repository or index
# (for instance when we run inside a git hook).
_SCRUBBED_ENV: Final = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_COMMON_DIR",
    "GIT_CEILING_DIRECTORIES",
    "GIT_QUARANTINE_PATH",
)

_SCHEME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHA_RE: Final = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_REF_RE: Final = re.compile(r"^[A-Za-z0-9._+-]+(?:/[A-Za-z0-9._+-]+)*$")


class GitError(ReconcilerError):
    """A git operation failed. The message never contains credentials.

    Its :class:`~reconciler.errors.Cause` says why (authentication, a missing
    ref, a timeout, an unreachable origin), read from git's C-locale error
    text when the raiser does not name it.
    """

    def __init__(self, message: str, cause: Cause | None = None) -> None:
        super().__init__(message, cause if cause is not None else git_cause(message))


class MissingObjects(GitError):
    """Files given as :class:`Blob` name objects the mirror no longer holds: write their content again."""


class PushRejected(GitError):
    """The origin kept rejecting a non-forced push after every retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Cause.PUSH_REJECTED)


# --------------------------------------------------------------------------
# Commit signatures

SIGNATURE_PROBLEMS: Final[Mapping[str, str]] = {
    "N": "is not signed",
    "U": "is signed by a key not in the allowed signers file",
    "B": "has a bad signature",
    "E": "has a signature that cannot be checked",
    "X": "has an expired signature",
    "Y": "is signed by an expired key",
    "R": "is signed by a revoked key",
}
"""What each of git's ``%G?`` letters but ``G`` says of a commit, after "commit <sha> "."""


@dataclass(frozen=True)
class Blob:
    """A file's content by its blob id, already written to the mirror (:meth:`GitStore.store_blobs`).

    :meth:`GitStore.publish` takes it in place of the content: a process
    that renders files writes them, and the one that publishes them never
    holds their bytes.
    """

    sha: str


FileContent = bytes | Blob
"""What :meth:`GitStore.publish` takes for one file: its bytes, or a :class:`Blob` already written."""


@dataclass(frozen=True)
class SignatureCheck:
    """git's verdict on one commit's signature against an allowed-signers file.

    ``status`` is git's ``%G?`` letter: only ``G`` (a good signature by a
    principal the file lists) is good; ``U`` is a good signature by a key the
    file does not list. ``signer`` is the principal (``%GS``, empty unless
    ``G``), ``fingerprint`` the key's (``%GF``, ``SHA256:...``).
    """

    commit: str
    status: str
    signer: str = ""
    fingerprint: str = ""

    @property
    def good(self) -> bool:
        return self.status == "G"

    def problem(self) -> str | None:
        """What is wrong with the signature, after "commit <sha> " (None when it is good)."""
        if self.good:
            return None
        text = SIGNATURE_PROBLEMS.get(self.status, f"has a signature git reports as {self.status!r}")
        return f"{text} ({self.fingerprint})" if self.fingerprint and self.status != "N" else text


# --------------------------------------------------------------------------
# URLs and redaction


def worktree_snapshot(root: Path) -> tuple[GitStore, str] | None:
    """A reader and the tree ``git add -A`` would commit for directory ``root``.

    None outside a git work tree, and for a directory the work tree ignores.

    ``reconciler validate`` on a checkout must judge what HQ will see at the
    commit: not ignored files, not the disk's bytes of a file git keeps
    unchanged (``--assume-unchanged``, a sparse checkout's missing files),
    encodings git converts on the way in, and a folder holding a stray
    ``.git`` only where git itself would add a submodule. So the work tree is
    staged into a throw-away copy of the index, and that index's tree is read
    like a commit. (Blobs land in the repository's object store, as with any
    ``git add``; nothing else of the repository changes.) A checkout git
    refuses to read (another owner, a broken index) is a :class:`GitError`.
    """
    root = root.resolve()
    if not any((folder / ".git").exists() for folder in (root, *root.parents)):
        return None

    def git(*args: str, extra: Mapping[str, str] | None = None) -> str:
        proc = _git_in(root, *args, extra=extra)
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.decode("utf-8", "replace").split())[:_MAX_MESSAGE]
            raise GitError(f"git {args[0]} in {root} failed: {detail or 'no output'}")
        return proc.stdout.decode("utf-8", "surrogateescape")

    inside = git("rev-parse", "--is-inside-work-tree").strip()
    if inside != "true":
        return None
    # A folder the enclosing repository ignores (a virtualenv's site-packages, a
    # build directory) is no part of it: git would commit none of it, so its
    # files are read as they are.
    ignored = _git_in(root, "check-ignore", "--quiet", "--", ".")
    if ignored.returncode == 0:
        return None
    prefix, git_dir = git("rev-parse", "--show-prefix", "--absolute-git-dir").splitlines()[:2]
    with tempfile.TemporaryDirectory(prefix="reconciler-validate-") as tmp:
        index = Path(tmp) / "index"
        source = Path(git_dir) / "index"
        if source.exists():
            shutil.copyfile(source, index)
        staged = {"GIT_INDEX_FILE": str(index)}
        git("add", "--all", "--", ".", extra=staged)
        tree = git("write-tree", extra=staged).strip()
    store = GitStore.reading(Path(git_dir))
    if prefix:
        found = store._git("rev-parse", "--verify", "--quiet", f"{tree}:{prefix.rstrip('/')}", check=False)
        tree = found.stdout.decode("ascii").strip() if found.returncode == 0 else _EMPTY_TREE
    return store, tree


_SUBCOMMAND = re.compile(r"[a-z][a-z-]{0,30}")  # a git subcommand: the label of reconciler_git_errors_total


def _git_in(directory: Path, *args: str, extra: Mapping[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    """``git -C directory ...`` on a user's checkout: no prompt, C locale, none of the caller's GIT_* overrides."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", LANGUAGE="C", **(extra or {}))
    try:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise GitError(f"git {args[0]} in {directory} failed: {e}") from None


def local_commit(directory: Path, rev: str) -> str | None:
    """The full sha ``rev`` names in the git checkout at ``directory`` (``HEAD``, ``HEAD~1``, a branch,
    an abbreviation); None outside a checkout or when it names no commit there."""
    if not rev or rev.startswith("-") or "\n" in rev or "\x00" in rev:
        return None
    try:
        proc = _git_in(directory, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}",
                       timeout=60)
    except GitError:
        return None
    sha = proc.stdout.decode("ascii", "replace").strip()
    return sha if proc.returncode == 0 and _SHA_RE.fullmatch(sha) else None


def checkout_store(directory: Path) -> GitStore | None:
    """A reader of the repository whose work tree holds ``directory`` (for its commits); None outside one."""
    directory = directory.resolve()
    if not any((folder / ".git").exists() for folder in (directory, *directory.parents)):
        return None
    proc = _git_in(directory, "rev-parse", "--is-inside-work-tree", "--absolute-git-dir", timeout=60)
    lines = proc.stdout.decode("utf-8", "surrogateescape").splitlines()
    if proc.returncode != 0 or len(lines) < 2 or lines[0] != "true":
        return None
    return GitStore.reading(Path(lines[1]))


ORIGIN_PASSWORD_ENV: Final = "RECONCILER_ORIGIN_PASSWORD"


def origin_password(path: str | None) -> str | None:
    """The origin's password (or token) from ``--origin-password-file`` (the file's first line), else from
    ``$RECONCILER_ORIGIN_PASSWORD``; None if neither is given. OSError or ValueError for a bad file."""
    if path:
        with open(path, "rb") as handle:
            raw = handle.read(64 * 1024 + 1)
        if len(raw) > 64 * 1024:
            raise ValueError(f"password file {path} is larger than 64 KiB")
        lines = raw.decode("utf-8").splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            raise ValueError(f"password file {path} is empty")
        return password
    return os.environ.get(ORIGIN_PASSWORD_ENV) or None


def url_credentials_warning(origin: str, password_given: bool = False) -> str | None:
    """What to say when ``--origin`` itself carries a secret (None when it does not).

    Git never sees it on a command line (:class:`GitStore`), but this
    process's own argv cannot be rewritten portably once it runs: on POSIX
    the command line restarts itself without it (``cli``), elsewhere ``ps``
    still shows it there for as long as the process lives. A URL with a
    user name only is taken for the ``https://<token>@host`` form unless a
    password is given separately (``password_given``).
    """
    _, user, password = split_credentials(origin)
    if password is None and (user is None or password_given or not url_secrets(origin)):
        return None
    return (f"the origin URL {redact_url(origin)} carries a secret: git gets it through the environment "
            "only, but this process's own command line still shows it to every user (ps). Leave it out "
            f"of the URL and give it with --origin-password-file F or ${ORIGIN_PASSWORD_ENV} (or use "
            "git's credential helpers or an SSH key)")


def local_origin_path(origin: str) -> Path | None:
    """The filesystem path of a local or ``file://`` origin, else None.

    Follows git's own rule: ``scheme://`` is a URL (only ``file`` is local);
    ``host:path`` with no slash before the first colon is scp-like ssh.
    """
    if origin.startswith("file://"):
        parts = urllib.parse.urlsplit(origin)
        if parts.netloc not in ("", "localhost"):
            return None
        return Path(urllib.parse.unquote(parts.path))
    if _SCHEME_RE.match(origin):
        return None
    colon = origin.find(":")
    if colon != -1:
        slash = origin.find("/")
        is_drive = colon == 1 and origin[0].isalpha()  # C:\repo
        if not is_drive and (slash == -1 or slash > colon):
            return None
    return Path(origin).expanduser().absolute()


# --------------------------------------------------------------------------
# Paths and refs


def _check_branch(ref: str) -> str:
    """Validate a branch name (without ``refs/heads/``); ValueError if unsafe."""
    if (
        not _REF_RE.match(ref)
        or ref.startswith("-")
        or ".." in ref
        or any(c.startswith(".") or c.endswith(".lock") for c in ref.split("/"))
        or ref.endswith(".")
    ):
        raise ValueError(f"invalid branch name {ref!r}")
    return ref


def _norm_path(path: str) -> str:
    """Repo-relative posix path without ``./`` or trailing ``/``; "" is the root."""
    if path.startswith("/") or "\0" in path:
        raise ValueError(f"not a repo-relative path: {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path leaves the repository: {path!r}")
    return "/".join(parts)


def _object_names(requests: Sequence[tuple[str, str]]) -> list[str]:
    """``<commit>:<path>`` for each request, as ``git cat-file --batch`` reads them one a line."""
    names = []
    for commit, path in requests:
        clean = _norm_path(path)
        if "\n" in commit or "\n" in clean:
            raise ValueError(f"newline in {commit!r}:{clean!r}")
        names.append(f"{commit}:{clean}")
    return names


def _check_publish_path(path: str) -> str:
    parts = path.split("/")
    if (
        not path
        or "\0" in path
        or any(p in ("", ".", "..") or p.lower() == ".git" for p in parts)
    ):
        raise ValueError(f"invalid file path for a status commit: {path!r}")
    return path


def _safe_component(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise GitError(f"refusing to export unsafe tree entry name {name!r}")
    return name


class _TreeEntry:
    __slots__ = ("mode", "type", "sha", "size", "path")

    def __init__(self, mode: str, type_: str, sha: str, size: int | None, path: str) -> None:
        self.mode = mode
        self.type = type_
        self.sha = sha
        self.size = size
        self.path = path

    @property
    def kind(self) -> str:
        if self.mode == "040000":
            return "dir"
        if self.mode == "120000":
            return "symlink"
        if self.mode == "160000":
            return "submodule"
        return "file"


def _parse_ls_tree(out: bytes, with_size: bool) -> list[_TreeEntry]:
    entries: list[_TreeEntry] = []
    for record in out.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        fields = meta.decode("ascii").split()
        size: int | None = None
        if with_size:
            # "-" for trees and submodules; a blob missing from the object store is
            # listed with a size git cannot tell (reading it fails later, as a GitError)
            size = int(fields[3]) if fields[3].isdigit() else None
        entries.append(
            _TreeEntry(fields[0], fields[1], fields[2], size, raw_path.decode("utf-8", "surrogateescape"))
        )
    return entries


# --------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class History:
    """How much history a writer keeps on its ``status/*`` branch: commits newer than ``days`` and at most ``commits``.

    ``None`` for either means no bound of that kind. The branch's single
    writer squashes older history when it has grown a quarter past a bound
    (so it rewrites rarely, not at every publish): the oldest kept commit
    becomes a root whose tree is what it always had. ``main`` and other
    writers' branches are never touched.
    """

    days: float | None = 30.0
    commits: int | None = 10_000

    @property
    def bounded(self) -> bool:
        return self.days is not None or self.commits is not None


KEEP_ALL = History(None, None)


def history_of(days: float | None, commits: int | None) -> History:
    """The history a ``--status-history-days``/``--status-history-commits`` pair asks for (0 or None: no bound)."""
    return History(days or None, commits or None)


class GitStore:
    """A reconciler's view of its origin: a bare mirror it fetches, reads and pushes from.

    ``origin`` is a local path, a ``file://`` URL or any URL git understands
    (credentials in it, in git's credential helpers or in git config).
    Thread-safe: every method runs its own git processes.
    """

    def __init__(
        self,
        origin: str,
        workdir: Path,
        *,
        push_attempts: int = 5,
        backoff_seconds: float = 0.05,
        network_timeout: float = 300.0,
        password: str | None = None,
        history: History = KEEP_ALL,
    ) -> None:
        self.origin = origin
        self.history = history
        self.clock: Callable[[], float] = time.time  # the squashing's "now" (tests turn it)
        self._squash_refused_until = float("-inf")  # origin refused a rewrite: no squashing before then
        # path -> (content, blob id) of the tree last written: unchanged files are not written again
        self._blobs: dict[str, tuple[bytes, str]] = {}
        self.password = password
        self.workdir = Path(workdir)
        self.repo_path = self.workdir / _REPO_DIR
        self.push_attempts = max(1, push_attempts)
        self.backoff_seconds = backoff_seconds
        self.network_timeout = network_timeout
        self._secrets = url_secrets(origin) + ([password] if password and len(password) >= 3 else [])
        self._lock = threading.Lock()
        self._ready = False
        self._identity: dict[str, str] | None = None
        self._env = self._make_env()
        self.metrics: Metrics | None = None  # counts failed git commands and push retries when set

    def __repr__(self) -> str:
        return f"GitStore(origin={redact_url(self.origin)!r}, workdir={str(self.workdir)!r})"

    @classmethod
    def adding_objects(cls, workdir: Path) -> GitStore:
        """A store that writes objects into the mirror another :class:`GitStore` keeps in ``workdir``.

        For a process beside the mirror's owner (a relay's pass process): it
        never creates, repairs, fetches or pushes; :meth:`store_blobs` only.
        """
        store = cls("", workdir)
        store._ready = True
        return store

    @classmethod
    def reading(cls, git_dir: Path) -> GitStore:
        """A store that only reads an existing repository (a checkout's): no origin, no mirror."""
        store = cls("", git_dir.parent)
        store.repo_path = git_dir
        store._ready = True
        return store

    # -- process plumbing ---------------------------------------------------

    def _make_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["GIT_TERMINAL_PROMPT"] = "0"
        env["LC_ALL"] = "C"
        env["LANGUAGE"] = "C"
        # The origin (with any credentials) reaches git only through the
        # environment: never argv (visible in ps), never the mirror's config.
        try:
            n = int(env.get("GIT_CONFIG_COUNT", "0"))
        except ValueError:
            n = 0
        origin_url, user, password = split_credentials(self.origin)
        if self.password is not None:
            password = self.password
        local = local_origin_path(self.origin)
        if local is not None and not self.origin.startswith("file://"):
            origin_url = str(local)
        entries = [("remote.origin.url", origin_url)]
        if (user is not None or password is not None) and origin_url.lower().startswith(("http://", "https://")):
            token = base64.b64encode(f"{user or 'git'}:{password or ''}".encode()).decode("ascii")
            self._secrets = sorted({*self._secrets, token}, key=len, reverse=True)
            entries.append((f"http.{origin_url}.extraHeader", f"Authorization: Basic {token}"))
        elif user is not None and local is None:
            # ssh://user@host: the user name is no secret and ssh needs it; a password cannot be
            # given to ssh this way (use a key), so it is dropped rather than put on a command line.
            scheme, rest = origin_url.split("://", 1)
            entries[0] = ("remote.origin.url", f"{scheme}://{urllib.parse.quote(user, safe='')}@{rest}")
        for key, value in entries:
            env[f"GIT_CONFIG_KEY_{n}"] = key
            env[f"GIT_CONFIG_VALUE_{n}"] = value
            n += 1
        env["GIT_CONFIG_COUNT"] = str(n)
        return env

    def redact(self, text: str) -> str:
        """``text`` without credentials: URLs redacted and this origin's secrets masked (for errors not from git)."""
        return redact_text(text, self._secrets)

    def _fail(self, what: str, detail: str | bytes) -> GitError:
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        detail = " ".join(line.strip() for line in detail.splitlines() if line.strip())
        if len(detail) > _MAX_MESSAGE:
            detail = detail[:_MAX_MESSAGE] + " …"
        msg = f"git {what} failed: {detail or 'no output'} (origin {redact_url(self.origin)})"
        if self.metrics is not None:
            self.metrics.git_errors.labels(what if _SUBCOMMAND.fullmatch(what) else "other").inc()
        return GitError(redact_text(msg, self._secrets), git_cause(detail))

    def _git(
        self,
        *args: str,
        input: bytes | None = None,
        input_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        network: bool = False,
        git_dir: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run git on the mirror; its standard input is ``input``, or the file ``input_file``, or nothing."""
        cmd = ["git", f"--git-dir={git_dir or self.repo_path}", *args]
        full_env = self._env if env is None else {**self._env, **env}
        try:
            with contextlib.ExitStack() as stack:
                stdin: int | BinaryIO | None = subprocess.DEVNULL
                if input is not None:
                    stdin = None
                elif input_file is not None:
                    stdin = stack.enter_context(open(input_file, "rb"))
                proc = subprocess.run(
                    cmd,
                    input=input,
                    stdin=stdin,
                    capture_output=True,
                    env=full_env,
                    timeout=self.network_timeout if network else None,
                )
        except subprocess.TimeoutExpired as e:
            raise self._fail(args[0], f"timed out after {e.timeout:.0f}s") from None
        except OSError as e:
            raise self._fail(args[0], str(e)) from None
        if check and proc.returncode != 0:
            raise self._fail(args[0], proc.stderr or proc.stdout)
        return proc

    def _out(self, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> str:
        return self._git(*args, input=input, env=env).stdout.decode("utf-8", "surrogateescape").strip()

    # -- the mirror ---------------------------------------------------------

    def _ensure_repo(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise GitError(f"cannot create workdir {self.workdir}: {e}") from None
            self.remove_stale_scratch()
            if self.repo_path.exists() and not self._usable(self.repo_path):
                trash = self.workdir / f".{_REPO_DIR}.broken-{uuid.uuid4().hex[:8]}"
                log.warning("git mirror %s is unusable; recreating it", self.repo_path)
                os.replace(self.repo_path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if not self.repo_path.exists():
                self._create_repo()
            else:
                self._remove_stale_locks()
            self._ready = True

    def _usable(self, path: Path) -> bool:
        if not (path / "HEAD").is_file() or not (path / "objects").is_dir():
            return False
        proc = self._git("rev-parse", "--is-bare-repository", check=False, git_dir=path)
        return proc.returncode == 0 and proc.stdout.strip() == b"true"

    def _create_repo(self) -> None:
        tmp = self.workdir / f".{_REPO_DIR}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._git("init", "--quiet", "--bare", "--initial-branch=main", str(tmp), git_dir=tmp)
            # Auto-gc runs inside the git command that triggered it: nothing
            # outlives the reconciler, and a kill stops it with its parent.
            self._git("config", "gc.autoDetach", "false", git_dir=tmp)
            os.rename(tmp, self.repo_path)  # atomic: the mirror exists whole or not at all
        except OSError as e:
            if not self._usable(self.repo_path):  # else: someone else just made it
                raise GitError(f"cannot create git mirror {self.repo_path}: {e}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _scratch(self) -> tempfile.TemporaryDirectory[str]:
        """A scratch directory beside the mirror, named for this process: one a killed process leaves behind
        (tens of MB of blobs at a large relay) is removed when a store next opens the mirror."""
        return tempfile.TemporaryDirectory(prefix=f".{_REPO_DIR}.{os.getpid()}.", suffix=".tmp", dir=self.workdir)

    def remove_stale_scratch(self) -> None:
        """Remove the scratch directories beside the mirror of processes that have ended (killed mid-way)."""
        for path in self.workdir.glob(f".{_REPO_DIR}.*.tmp"):
            try:
                pid = int(path.name.split(".")[3])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)

    def _remove_stale_locks(self) -> None:
        # A git killed mid-update leaves "<ref>.lock" behind and every later
        # update of that ref would fail; the mirror is ours alone, so any lock
        # found at open time is stale.
        candidates = list((self.repo_path / "refs").rglob("*.lock"))
        candidates += [self.repo_path / n for n in ("packed-refs.lock", "HEAD.lock", "config.lock", "shallow.lock")]
        for lock in candidates:
            try:
                lock.unlink()
                log.info("removed stale git lock %s", lock)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove stale git lock %s: %s", lock, e)

    # -- refs ---------------------------------------------------------------

    def fetch(self, branches: Sequence[str] | None = None) -> None:
        """Copy origin's branches into the mirror's refs/heads: every one (pruning deleted ones), or only ``branches``.

        With ``branches``, only those are asked for (git's protocol v2 sends a
        ref prefix, so the origin lists just them: the cost of a fetch does
        not grow with the number of status branches others publish), and a
        branch origin no longer has is deleted from the mirror.
        """
        self._ensure_repo()
        flags = ("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules")
        if branches is None:
            self._git(*flags, "--prune", "origin", "+refs/heads/*:refs/heads/*", network=True)
            return
        wanted = sorted(set(branches))
        for ref in wanted:
            _check_branch(ref)
        if not wanted:
            return
        specs = [f"+refs/heads/{ref}:refs/heads/{ref}" for ref in wanted]
        proc = self._git(*flags, "origin", *specs, network=True, check=False)
        if proc.returncode == 0:
            return
        # One of them is missing on origin (git fails the whole fetch then): ask which exist.
        present = self._remote_heads(wanted)
        for ref in wanted:
            if ref not in present and self.ref_sha(ref) is not None:
                self._git("update-ref", "-d", f"refs/heads/{ref}")
        specs = [f"+refs/heads/{ref}:refs/heads/{ref}" for ref in wanted if ref in present]
        if specs:
            self._git(*flags, "origin", *specs, network=True)

    def _remote_heads(self, refs: Sequence[str] | None = None) -> dict[str, str]:
        """Origin's branches (``refs``, or all) and their tips, as one ``git ls-remote --heads`` lists them."""
        names = () if refs is None else tuple(f"refs/heads/{ref}" for ref in refs)
        out = self._git("ls-remote", "--heads", "origin", *names, network=True).stdout
        heads: dict[str, str] = {}
        for line in out.decode("utf-8", "surrogateescape").splitlines():
            sha, _, name = line.partition("\t")
            if name.startswith("refs/heads/") and (refs is None or name in names):
                heads[name[len("refs/heads/"):]] = sha
        return heads

    def fetch_tips(self, full: Sequence[str] | None = None, *, _retry: bool = True) -> None:
        """Copy origin's branches into the mirror, ``status/*`` branches by their newest commit only.

        Every ``status/<name>`` branch is fetched shallow (``--depth 1``):
        the mirror holds its tip commit and tree, never its history, so a
        fresh mirror does not copy months of every relay's history, and the
        mirror's size follows the number of relays, not of their publishes.
        A rewritten (squashed) status branch is simply a new tip (``+``).

        ``full`` names the branches that keep their whole history: HQ's
        ``main``, which validation and ``status --commit`` walk, and the
        ``status/*`` branch the caller writes itself, whose squash walks it.
        With ``full`` None, every branch outside ``status/`` keeps its
        history.

        One ``ls-remote`` lists origin's branches first; branches origin no
        longer has are deleted, and git fetches only when a tip differs from
        the mirror's (the ``status/*`` ones with one pattern, the kept ones
        by name). So a fetch when nothing moved is that listing alone.

        The old tips a shallow fetch leaves unreachable are dropped by the gc
        git runs inside a fetch once they are an hour old (in a cruft pack
        until then), not git's default two weeks. Needs git 2.29 or later
        (negative refspecs keep ``full`` status branches out of the pattern);
        with git before 2.37 the replaced tips wait loose rather than in a
        cruft pack.
        """
        self._ensure_repo()
        keep = None if full is None else {_check_branch(ref) for ref in full}
        remote = self._remote_heads()
        local: dict[str, str] = {}
        for line in self._out("for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/").splitlines():
            sha, _, name = line.partition(" ")
            local[name[len("refs/heads/"):]] = sha

        def followed(name: str) -> bool:
            return name.startswith(STATUS_PREFIX) or (name in keep if keep is not None else True)

        def shallow(name: str) -> bool:
            return name.startswith(STATUS_PREFIX) and (keep is None or name not in keep)

        gone = sorted(name for name in local if followed(name) and name not in remote)
        if gone:
            self._git("update-ref", "--stdin", input="".join(f"delete refs/heads/{name}\n" for name in gone).encode(
                "utf-8", "surrogateescape"))
        moved = sorted(name for name, sha in remote.items() if followed(name) and local.get(name) != sha)
        whole = [name for name in moved if not shallow(name)]
        tips = [name for name in moved if shallow(name)]
        flags = ("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules")
        if whole:
            self.fetch(whole)
        if tips:
            negotiation: list[str] = []
            if len(tips) <= _NAMED_TIPS:
                specs = [f"+refs/heads/{name}:refs/heads/{name}" for name in tips]
                # what the mirror has of these branches is all the origin needs to hear of (not every ref)
                negotiation = [f"--negotiation-tip=refs/heads/{name}" for name in tips if name in local]
            else:  # one pattern: git matches a thousand named refspecs (or negotiation tips) far more slowly
                specs = [f"+refs/heads/{STATUS_PREFIX}*:refs/heads/{STATUS_PREFIX}*",
                         *(f"^refs/heads/{name}" for name in sorted(keep or ()) if name.startswith(STATUS_PREFIX))]
            proc = self._git("-c", f"gc.pruneExpire={_SHALLOW_PRUNE_EXPIRE}", "-c", "gc.cruftPacks=true",
                             *flags, "--depth=1", *negotiation, "origin", *specs, network=True, check=False)
            if proc.returncode != 0:
                if not _retry:
                    raise self._fail("fetch", proc.stderr or proc.stdout)
                # every status branch deleted between the listing and the fetch fails it: list again, once
                log.info("fetching %d moved status branches failed (%s); listing origin again", len(tips),
                         self.redact(" ".join(proc.stderr.decode("utf-8", "replace").split()))[:200])
                self.fetch_tips(full, _retry=False)

    def ref_sha(self, ref: str) -> str | None:
        """Commit sha of origin's branch ``ref`` as of the last fetch, None if absent."""
        _check_branch(ref)
        self._ensure_repo()
        proc = self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{ref}^{{commit}}", check=False)
        if proc.returncode != 0:
            return None
        return proc.stdout.decode("ascii").strip()

    def resolve_commit(self, rev: str) -> str | None:
        """The full sha of commit ``rev`` (a sha, an abbreviation or a branch) in the mirror; None if unknown."""
        self._ensure_repo()
        if "\n" in rev or "\x00" in rev:
            return None
        try:
            return self._commit(rev)
        except GitError:
            return None

    def contains(self, commit: str, other: str) -> bool:
        """Whether ``commit`` is ``other`` or a descendant of it (``other`` is in its history)."""
        if commit == other:
            return True
        self._ensure_repo()
        proc = self._git("merge-base", "--is-ancestor", "--end-of-options", other, commit, check=False)
        if proc.returncode in (0, 1):
            return proc.returncode == 0
        raise self._fail("merge-base", proc.stderr)

    def list_status_refs(self) -> dict[str, str]:
        """``{name: sha}`` for every ``status/<name>`` branch as of the last fetch."""
        self._ensure_repo()
        prefix = f"refs/heads/{STATUS_PREFIX}"
        out = self._out("for-each-ref", "--format=%(objectname) %(refname)", prefix)
        refs: dict[str, str] = {}
        for line in out.splitlines():
            sha, _, name = line.partition(" ")
            refs[name[len(prefix):]] = sha
        return refs

    # -- reading at a commit ------------------------------------------------

    def _commit(self, commit: str) -> str:
        """Resolve ``commit`` (a sha or a mirrored branch name) to a commit sha."""
        return self._resolve(commit, "commit")

    def _tree(self, treeish: str) -> str:
        """Resolve a commit (sha or mirrored branch) or a tree sha to its tree."""
        return self._resolve(treeish, "tree")

    def _resolve(self, name: str, kind: str) -> str:
        """The sha of the ``kind`` object ``name`` peels to; GitError (a missing ref) when the mirror lacks it."""
        if not name or name.startswith("-"):
            raise GitError(f"invalid commit {name!r}", Cause.MISSING_REF)
        proc = self._git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{{kind}}}", check=False)
        if proc.returncode != 0:
            raise GitError(f"commit {name!r} is not in the mirror of {redact_url(self.origin)} (fetch first?)",
                           Cause.MISSING_REF)
        return proc.stdout.decode("ascii").strip()

    def object_id(self, commit: str, path: str) -> str | None:
        """``<object id>-<mode>`` of ``path`` at ``commit`` (None if absent): equal ids, equal content."""
        entry = self._entry(commit, path)
        return None if entry is None else f"{entry.sha}-{entry.mode}"

    def _entry(self, commit: str, path: str) -> _TreeEntry | None:
        self._ensure_repo()
        sha = self._commit(commit)
        path = _norm_path(path)
        if not path:
            tree = self._out("rev-parse", f"{sha}^{{tree}}")
            return _TreeEntry("040000", "tree", tree, None, "")
        out = self._git("ls-tree", "-z", "--full-tree", sha, "--", path).stdout
        for entry in _parse_ls_tree(out, with_size=False):
            if entry.path == path:
                return entry
        return None

    def read_files(
        self, commit: str, prefixes: Sequence[str] = ("",), max_size: int | None = None
    ) -> dict[str, bytes]:
        """Regular files at ``commit`` whose path starts with one of ``prefixes``.

        Prefixes are plain string prefixes of the repo-relative posix path
        (``"packages/"``, ``"topology.yaml"``; ``""`` is everything). Symlinks
        and submodules are not file content and are left out (see
        :meth:`path_kind`). A file larger than ``max_size`` comes back cut to
        ``max_size + 1`` bytes, so the caller can report "too large" without
        the whole blob being read.
        """
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        self._ensure_repo()
        sha = self._tree(commit)
        out = self._git("ls-tree", "-r", "-l", "-z", "--full-tree", sha).stdout
        wanted = [
            e
            for e in _parse_ls_tree(out, with_size=True)
            if e.mode in ("100644", "100755", "100664")
            and any(e.path.startswith(p) for p in prefixes)
        ]
        limit = None if max_size is None else max_size + 1
        result: dict[str, bytes] = {}
        batched: list[_TreeEntry] = []
        for entry in wanted:
            if limit is not None and entry.size is not None and entry.size > max(limit, _STREAM_LIMIT):
                # Really big (an artifact): read its head in a process of its
                # own and kill it, rather than pipe the whole blob through.
                result[entry.path] = self._read_head(entry.sha, limit)
            else:
                batched.append(entry)
        unique = sorted({e.sha for e in batched})
        blobs: dict[str, bytearray] = {s: bytearray() for s in unique}

        def sink(index: int, size: int) -> Callable[[bytes], object]:
            buf = blobs[unique[index]]
            if limit is None or size <= limit:
                return buf.extend

            def keep_head(chunk: bytes) -> None:
                if len(buf) < limit:
                    buf.extend(chunk[: limit - len(buf)])

            return keep_head

        self._cat_batch(unique, sink)
        for entry in batched:
            result[entry.path] = bytes(blobs[entry.sha])
        return dict(sorted(result.items()))

    def list_tree(self, commit: str) -> list[tuple[str, str, str | None]]:
        """Every non-directory entry at ``commit``: ``(path, kind, symlink target or None)``.

        ``kind`` is ``"file"``, ``"symlink"`` or ``"submodule"``; the targets of
        all symbolic links are read through one ``git cat-file --batch``.
        """
        self._ensure_repo()
        sha = self._tree(commit)
        entries = _parse_ls_tree(self._git("ls-tree", "-r", "-z", "--full-tree", sha).stdout, with_size=False)
        links = [e for e in entries if e.kind == "symlink"]
        shas = sorted({e.sha for e in links})
        targets: dict[str, bytearray] = {s: bytearray() for s in shas}

        def sink(index: int, size: int) -> Callable[[bytes], object]:
            buf = targets[shas[index]]

            def keep(chunk: bytes) -> None:
                if len(buf) < 4096:  # a link target is a path, never longer than PATH_MAX
                    buf.extend(chunk[: 4096 - len(buf)])

            return keep

        self._cat_batch(shas, sink)
        return [(e.path, e.kind, bytes(targets[e.sha]).decode("utf-8", "surrogateescape") if e.kind == "symlink"
                 else None) for e in entries]

    def read_file(self, commit: str, path: str, max_size: int | None = None) -> bytes | None:
        """Content of the regular file ``path`` at ``commit``; None if there is none.

        A file larger than ``max_size`` comes back cut to ``max_size + 1``
        bytes (never read whole), so the caller can say "too large".
        """
        entry = self._entry(commit, path)
        if entry is None or entry.kind != "file":
            return None
        if max_size is not None and int(self._out("cat-file", "-s", entry.sha)) > max_size:
            return self._read_head(entry.sha, max_size + 1)
        return self._git("cat-file", "blob", entry.sha).stdout

    def read_paths(self, requests: Sequence[tuple[str, str]], max_size: int | None = None) -> list[bytes | None]:
        """Contents of many ``(commit, path)`` files through one ``git cat-file --batch``.

        HQ reads one small file from each of hundreds of relay refs per pass;
        one process for all of them instead of a few per ref keeps that pass
        cheap. Entries that are absent or not a file come back as None; with
        ``max_size``, a larger file comes back cut to ``max_size + 1`` bytes
        and is never read whole.
        """
        if not requests:
            return []
        if max_size is not None:
            sizes = self._blob_sizes(requests)
            small = [i for i, size in enumerate(sizes) if size is not None and size <= max_size]
            contents = self.read_paths([requests[i] for i in small]) if small else []
            found: list[bytes | None] = [None] * len(requests)
            for i, content in zip(small, contents):
                found[i] = content
            for i, size in enumerate(sizes):
                if size is not None and size > max_size:
                    sha = self._out("rev-parse", "--verify", "--quiet", "--end-of-options",
                                    f"{requests[i][0]}:{_norm_path(requests[i][1])}")
                    found[i] = self._read_head(sha, max_size + 1)
            return found
        self._ensure_repo()
        names = _object_names(requests)
        cmd = ["git", f"--git-dir={self.repo_path}", "cat-file", "--batch"]
        try:
            proc = subprocess.run(cmd, input="".join(f"{n}\n" for n in names).encode("utf-8", "surrogateescape"),
                                  capture_output=True, env=self._env, timeout=self.network_timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise self._fail("cat-file", str(e)) from None
        if proc.returncode != 0:
            raise self._fail("cat-file", proc.stderr)
        out = proc.stdout
        pos = 0
        results: list[bytes | None] = []
        for name in names:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            pos = end + 1
            if len(header) != 3:  # "<name> missing" or "ambiguous"
                results.append(None)
                continue
            size = int(header[2])
            content = out[pos:pos + size]
            pos += size + 1
            results.append(bytes(content) if header[1] == b"blob" else None)
        return results

    def _blob_sizes(self, requests: Sequence[tuple[str, str]]) -> list[int | None]:
        """The size of each ``(commit, path)`` blob (None when absent or not a blob), from one batch-check."""
        self._ensure_repo()
        names = _object_names(requests)
        proc = self._git("cat-file", "--batch-check=%(objecttype) %(objectsize)",
                         input="".join(f"{n}\n" for n in names).encode("utf-8", "surrogateescape"))
        sizes: list[int | None] = []
        for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
            kind, _, size = line.partition(" ")
            sizes.append(int(size) if kind == "blob" and size.isdigit() else None)
        return sizes

    def path_kind(self, commit: str, path: str) -> str | None:
        """``"file"``, ``"dir"``, ``"symlink"`` (or ``"submodule"``) at ``commit``; None if absent."""
        entry = self._entry(commit, path)
        return None if entry is None else entry.kind

    def symlink_target(self, commit: str, path: str) -> str | None:
        """The target of the symlink at ``path``; None if ``path`` is not a symlink."""
        entry = self._entry(commit, path)
        if entry is None or entry.kind != "symlink":
            return None
        return self._git("cat-file", "blob", entry.sha).stdout.decode("utf-8", "surrogateescape")

    def export_path(self, commit: str, path: str, dest: Path) -> None:
        """Write the file, symlink or directory tree at ``path`` to ``dest``.

        Executable bits and symlinks are preserved (a link's target is written
        as is; whoever unpacks it decides whether it may escape). A directory
        is written into ``dest`` (created if needed); a file or symlink
        replaces ``dest``. Submodules cannot be exported.
        """
        entry = self._entry(commit, path)
        if entry is None:
            raise GitError(f"{path!r} does not exist at {commit}")
        dest = Path(dest)
        try:
            if entry.kind == "dir":
                self._export_tree(entry.sha, dest)
            elif entry.kind in ("file", "symlink"):
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._export_entries([(entry, dest)], atomic=True)
            else:
                raise GitError(f"{path!r} at {commit} is a submodule and cannot be exported")
        except OSError as e:
            raise GitError(f"cannot export {path!r} to {dest}: {e}") from None

    def _export_tree(self, tree: str, dest: Path) -> None:
        out = self._git("ls-tree", "-r", "-z", tree).stdout
        dest.mkdir(parents=True, exist_ok=True)
        targets: list[tuple[_TreeEntry, Path]] = []
        for entry in _parse_ls_tree(out, with_size=False):
            if entry.kind == "submodule":
                raise GitError(f"submodule {entry.path!r} cannot be exported")
            parts = [_safe_component(p) for p in entry.path.split("/")]
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            targets.append((entry, target))
        self._export_entries(targets, atomic=False)

    def _export_entries(self, targets: list[tuple[_TreeEntry, Path]], atomic: bool) -> None:
        # Files first, symlinks last: nothing is ever written through a link
        # this export created.
        files = [t for t in targets if t[0].kind == "file"]
        links = [t for t in targets if t[0].kind == "symlink"]
        current: list[BinaryIO] = []  # the one file being written, if any
        written: list[tuple[Path, Path, int]] = []

        def sink(index: int, size: int) -> Callable[[bytes], object]:
            entry, target = files[index]
            if current:
                current.pop().close()
            if not atomic and (target.is_symlink() or target.is_dir()):
                raise GitError(f"cannot export over {target}")
            write_to = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp") if atomic else target
            written.append((write_to, target, 0o755 if entry.mode == "100755" else 0o644))
            current.append(open(write_to, "wb"))  # noqa: SIM115 - closed by the next sink call or below
            return current[0].write

        try:
            self._cat_batch([e.sha for e, _ in files], sink)
        except BaseException:
            if atomic:
                for write_to, target, _ in written:
                    write_to.unlink(missing_ok=True)
            raise
        finally:
            if current:
                current.pop().close()
        for write_to, target, mode in written:
            os.chmod(write_to, mode)
            if write_to != target:
                os.replace(write_to, target)
        if links:
            link_targets: list[bytearray] = [bytearray() for _ in links]
            self._cat_batch([e.sha for e, _ in links], lambda i, size: link_targets[i].extend)
            for (_, target), raw in zip(links, link_targets):
                if target.is_symlink() or target.is_file():
                    target.unlink()
                os.symlink(bytes(raw).decode("utf-8", "surrogateescape"), target)

    def _cat_batch(self, shas: Sequence[str], sink: Callable[[int, int], Callable[[bytes], object]]) -> None:
        """Stream blobs through one ``git cat-file --batch``; ``sink(i, size)`` returns a writer."""
        if not shas:
            return
        cmd = ["git", f"--git-dir={self.repo_path}", "cat-file", "--batch"]
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env
            )
        except OSError as e:
            raise self._fail("cat-file", str(e)) from None
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        request = "".join(f"{s}\n" for s in shas).encode("ascii")
        stdin = proc.stdin

        def feed() -> None:  # a thread, so a large request cannot deadlock against git's output
            try:
                stdin.write(request)
            except OSError:
                pass
            finally:
                try:
                    stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, name="git-cat-file-feed", daemon=True)
        feeder.start()
        ok = False
        try:
            for index, sha in enumerate(shas):
                header = proc.stdout.readline().decode("ascii", "replace").split()
                if len(header) != 3 or header[0] != sha:
                    raise self._fail("cat-file", f"object {sha} unreadable: {' '.join(header) or 'no output'}")
                size = int(header[2])
                write = sink(index, size)
                remaining = size
                while remaining:
                    chunk = proc.stdout.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise self._fail("cat-file", f"object {sha} cut short")
                    write(chunk)
                    remaining -= len(chunk)
                proc.stdout.read(1)  # the newline after each object
            ok = True
        finally:
            if not ok:
                proc.kill()
            feeder.join()
            proc.stdout.close()
            stderr = proc.stderr.read()
            proc.stderr.close()
            code = proc.wait()
        if code != 0:
            raise self._fail("cat-file", stderr)

    def _read_head(self, sha: str, n: int) -> bytes:
        """The first ``n`` bytes of a blob, without streaming the rest of it."""
        cmd = ["git", f"--git-dir={self.repo_path}", "cat-file", "blob", sha]
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self._env
            )
        except OSError as e:
            raise self._fail("cat-file", str(e)) from None
        assert proc.stdout is not None
        try:
            data = bytearray()
            while len(data) < n:
                chunk = proc.stdout.read(n - len(data))
                if not chunk:
                    break
                data.extend(chunk)
        finally:
            proc.kill()
            proc.stdout.close()
            proc.wait()
        if len(data) < n:
            raise self._fail("cat-file", f"object {sha} shorter than its listed size")
        return bytes(data)

    def count_commits(self, tip: str, exclude: str | None = None) -> int:
        """How many commits ``git rev-list tip ^exclude`` lists (the whole history without ``exclude``)."""
        self._ensure_repo()
        args = [self._commit(tip)] + ([f"^{self._commit(exclude)}"] if exclude is not None else [])
        return int(self._out("rev-list", "--count", "--end-of-options", *args))

    def rev_list(self, tip: str, exclude: str | None = None, limit: int | None = None) -> list[str]:
        """The commits reachable from ``tip`` and not from ``exclude``, newest first, as ``git rev-list`` lists them."""
        self._ensure_repo()
        args = [self._commit(tip)] + ([f"^{self._commit(exclude)}"] if exclude is not None else [])
        most = [] if limit is None else [f"--max-count={limit}"]
        return self._out("rev-list", *most, "--end-of-options", *args).split()

    def signature_checks(self, commits: Sequence[str], allowed_signers: Path) -> list[SignatureCheck]:
        """git's verdict on the signature of each of ``commits`` (in their order) against ``allowed_signers``.

        The file is given with ``-c gpg.ssh.allowedSignersFile`` and the
        verifier with ``-c gpg.ssh.program=ssh-keygen``, so no user or global
        git config decides who may sign. git runs ``ssh-keygen`` for every
        signed commit; a missing ``ssh-keygen`` or an unreadable file is a
        :class:`GitError` (git itself would call the signature bad, or the
        key unknown), never a verdict.
        """
        self._ensure_repo()
        if not commits:
            return []
        try:
            with open(allowed_signers, "rb"):
                pass
        except OSError as e:
            raise GitError(f"cannot read the allowed signers file {allowed_signers}: {e.strerror or e}",
                           Cause.GIT) from None
        shas = [self._commit(c) for c in commits]
        proc = self._git(
            "-c", f"gpg.ssh.allowedSignersFile={Path(allowed_signers).absolute()}",
            "-c", "gpg.ssh.program=ssh-keygen",
            "log", "--no-walk=unsorted", "--no-show-signature", "--stdin", "--format=%H%x00%G?%x00%GS%x00%GF",
            input="".join(f"{sha}\n" for sha in dict.fromkeys(shas)).encode("ascii"), check=False,
        )
        stderr = proc.stderr.decode("utf-8", "replace")
        # git calls the signature bad when it cannot start ssh-keygen: that is no verdict
        lines = dict.fromkeys(" ".join(line.split()) for line in stderr.splitlines() if line.strip())
        detail = " ".join(lines)[:_MAX_MESSAGE] or "no output"
        if proc.returncode != 0 or "cannot run" in stderr:
            raise GitError(self.redact(f"git log cannot check commit signatures: {detail}"), Cause.GIT)
        found: dict[str, SignatureCheck] = {}
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            fields = line.split("\0")
            if len(fields) == 4 and fields[0]:
                found[fields[0]] = SignatureCheck(*fields)
        missing = [sha for sha in shas if sha not in found]
        if missing:
            raise GitError(self.redact(f"git log gave no signature verdict for commit {missing[0]}: {detail}"),
                           Cause.GIT)
        return [found[sha] for sha in shas]

    def commit_info(self, commit: str) -> tuple[str, datetime]:
        """(subject, committer time as an aware UTC datetime) of ``commit``."""
        self._ensure_repo()
        sha = self._commit(commit)
        out = self._git("log", "-1", "--no-show-signature", "--format=%ct%x00%s", sha, "--").stdout
        stamp, _, subject = out.rstrip(b"\n").partition(b"\0")
        when = datetime.fromtimestamp(int(stamp), tz=timezone.utc)
        return subject.decode("utf-8", "replace"), when

    # -- publishing ---------------------------------------------------------

    def publish(self, ref: str, files: Mapping[str, FileContent], message: str) -> str | None:
        """Make ``files`` the complete tree of origin's branch ``ref``; return the new commit.

        A file is its bytes, or a :class:`Blob` already in the mirror
        (:class:`MissingObjects` when it no longer is).

        Returns None, committing and pushing nothing, when origin's tip of
        ``ref`` already has exactly this tree. Only ``status/*`` refs may be
        written. The push is never forced: when it is rejected the commit is
        rebuilt on the new tip (re-checking "unchanged") and retried with
        jittered exponential backoff; :class:`PushRejected` after
        ``push_attempts`` tries.
        """
        _check_branch(ref)
        if not ref.startswith(STATUS_PREFIX) or ref == STATUS_PREFIX:
            raise ValueError(f"publish writes only {STATUS_PREFIX}* refs, not {ref!r}")
        for path in files:
            _check_publish_path(path)
        dirs = {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}
        if clash := sorted(dirs & set(files)):
            raise ValueError(f"{clash[0]!r} cannot be both a file and a directory")
        self._ensure_repo()
        tree = self._write_tree(files)
        last_error = ""
        for attempt in range(self.push_attempts):
            if attempt:
                if self.metrics is not None:
                    self.metrics.push_retries.inc()
                delay = self.backoff_seconds * (2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.5))
            tip = self._sync_ref(ref)
            if tip is not None and self._out("rev-parse", f"{tip}^{{tree}}") == tree:
                return None
            # squash only on a first try, and not while origin refuses rewrites: a retry is a plain fast-forward
            base = tip
            if attempt == 0 and tip is not None and self.clock() >= self._squash_refused_until:
                base = self._bounded(tip)
            commit = self._commit_tree(tree, base, message)
            # a squashed history replaces the branch: only if origin's tip is still the one squashed
            rejected, detail = self._push(commit, ref, lease=tip if base != tip else None)
            if not rejected:
                self._git("update-ref", f"refs/heads/{ref}", commit)
                log.info("published %s to %s", commit[:12], ref)
                return commit
            if base != tip and "stale info" not in detail:
                # not a push that came in between: origin refuses to rewrite the branch (a protected branch)
                self._squash_refused_until = self.clock() + SQUASH_RETRY_SECONDS
                log.warning("origin refused the squashed history of %s (%s); publishing without squashing, and "
                            "trying again in a day (allow force pushes on status branches for this account)",
                            ref, detail)
            last_error = detail
            log.info("push of %s rejected (attempt %d/%d), rebuilding on the new tip", ref, attempt + 1, self.push_attempts)
        raise PushRejected(
            redact_text(
                f"push to {ref} on {redact_url(self.origin)} rejected {self.push_attempts} times: {last_error}",
                self._secrets,
            )
        )

    def _write_tree(self, files: Mapping[str, FileContent]) -> str:
        """Write ``files`` as blobs and a tree; the tree's id."""
        if not files:
            return self._out("hash-object", "-w", "-t", "tree", "--stdin", input=b"") or _EMPTY_TREE
        try:
            return self._write_tree_once(files)
        except GitError:
            if self._blobs:
                self.forget_blobs()  # a blob written before is gone from the mirror: write them all
                try:
                    return self._write_tree_once(files)
                except GitError:
                    self._check_blobs(files)
                    raise
            self._check_blobs(files)
            raise

    def _check_blobs(self, files: Mapping[str, FileContent]) -> None:
        """:class:`MissingObjects` naming the first file whose :class:`Blob` the mirror does not hold."""
        given = {path: content.sha for path, content in files.items() if isinstance(content, Blob)}
        if not given:
            return
        out = self._git("cat-file", "--batch-check=%(objectname) %(objecttype)",
                        input="".join(f"{sha}\n" for sha in given.values()).encode("ascii")).stdout
        held = {line.split(b" ")[0].decode("ascii") for line in out.splitlines() if line.endswith(b" blob")}
        for path, sha in sorted(given.items()):
            if sha not in held:
                raise MissingObjects(f"{path}: blob {sha} is not in the mirror {self.repo_path}", Cause.GIT)

    def store_blobs(self, files: Mapping[str, FileContent]) -> dict[str, Blob]:
        """Write the content of ``files`` into the mirror; each file's :class:`Blob`.

        A file with the content it had at the last call keeps its blob: only
        changed files are written (a 50,000-client relay's status is tens of
        MB; a pass changes a few files of it), all of them through one ``git
        fast-import`` (one pack, in C) rather than one loose object each.
        Files given as a :class:`Blob` are taken as they are.
        """
        paths = sorted(files)
        known: dict[str, str] = {}
        for path in paths:
            content = files[path]
            if isinstance(content, Blob):
                known[path] = content.sha
            elif (held := self._blobs.get(path)) is not None and (held[0] is content or held[0] == content):
                known[path] = held[1]
        if len(known) < len(paths):
            with self._scratch() as tmp:
                # The stream goes through a file, written piece by piece: never a second copy of tens of MB.
                stream = Path(tmp, "blobs")
                with open(stream, "wb") as out:
                    for mark, path in enumerate(paths, start=1):
                        if path not in known:
                            content = files[path]
                            assert isinstance(content, bytes)
                            out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(content)))
                            out.write(content)
                            out.write(b"\n")
                marks_file = Path(tmp, "marks")
                self._git("fast-import", "--quiet", f"--export-marks={marks_file}", input_file=stream)
                shas = {int(label[1:]): sha for label, _, sha in
                        (line.partition(" ") for line in marks_file.read_text(encoding="ascii").splitlines())}
            for mark, path in enumerate(paths, start=1):
                if path not in known:
                    known[path] = shas[mark]
        self._blobs = {path: (content, known[path]) for path in paths
                       if isinstance(content := files[path], bytes)}
        return {path: Blob(known[path]) for path in paths}

    def forget_blobs(self) -> None:
        """Write every file again at the next :meth:`store_blobs`, even those whose content did not change."""
        self._blobs = {}

    def _write_tree_once(self, files: Mapping[str, FileContent]) -> str:
        blobs = self.store_blobs(files)
        with self._scratch() as tmp:
            index_env = {"GIT_INDEX_FILE": str(Path(tmp, "index"))}
            info = b"".join(
                f"100644 {blob.sha}\t".encode() + path.encode("utf-8", "surrogateescape") + b"\0"
                for path, blob in blobs.items()
            )
            self._git("update-index", "--add", "-z", "--index-info", input=info, env=index_env)
            return self._out("write-tree", env=index_env)

    def _sync_ref(self, ref: str) -> str | None:
        """Origin's current tip of ``ref``, mirrored locally; None if origin has no such branch."""
        remote = self._remote_heads((ref,)).get(ref)
        local = self.ref_sha(ref)
        if remote is None:
            if local is not None:
                self._git("update-ref", "-d", f"refs/heads/{ref}")
            return None
        if remote != local:
            self._git(
                "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
                "origin", f"+refs/heads/{ref}:refs/heads/{ref}",
                network=True,
            )
            return self.ref_sha(ref)
        return remote

    def _bounded(self, tip: str) -> str:
        """``tip``, or when its history has grown a quarter past :attr:`history`'s bounds, a squashed copy of it.

        The copy keeps the newest commits within the bounds, with their trees,
        messages, authors and dates; the oldest of them loses its parents.
        It is written to the mirror only (the caller's push publishes it).
        """
        policy = self.history
        if not policy.bounded:
            return tip
        lines = self._out("rev-list", "--first-parent", "--timestamp", tip).splitlines()
        stamps = [int(line.split(" ", 1)[0]) for line in lines]  # newest first
        now = self.clock()
        over_count = policy.commits is not None and len(lines) > policy.commits + max(1, policy.commits // 4)
        over_age = policy.days is not None and bool(stamps) and \
            now - stamps[-1] > policy.days * 1.25 * 86400
        if not (over_count or over_age):
            return tip
        keep = len(lines)
        if policy.commits is not None:
            keep = min(keep, max(1, policy.commits))
        if policy.days is not None:
            cutoff = now - policy.days * 86400
            keep = min(keep, max(1, sum(1 for stamp in stamps if stamp >= cutoff)))
        # one git log for every kept commit, newest first: fields split by US, commits by NUL
        fmt = "%T%x1f%an%x1f%ae%x1f%ad%x1f%cn%x1f%ce%x1f%cd%x1f%B"
        raw = self._git("log", "-z", "--first-parent", "--date=raw", f"--format={fmt}", f"--max-count={keep}",
                        tip).stdout.decode("utf-8", "surrogateescape")
        records = [record.split("\x1f", 7) for record in raw.split("\x00") if record][::-1]  # oldest first
        stream = bytearray()
        for mark, (tree, an, ae, ad, cn, ce, cd, body) in enumerate(records, start=1):
            message = body.rstrip("\n") + "\n"
            if mark == 1:
                message += (f"\nHistory before this commit was squashed by the branch's writer "
                            f"({len(lines) - keep} older commits).\n")
            data = message.encode("utf-8", "surrogateescape")
            stream += f"commit {_SQUASH_REF}\nmark :{mark}\n".encode()
            stream += f"author {an} <{ae}> {ad}\ncommitter {cn} <{ce}> {cd}\n".encode("utf-8", "surrogateescape")
            stream += b"data %d\n%s\n" % (len(data), data)
            if mark > 1:
                stream += f"from :{mark - 1}\n".encode()
            stream += f"M 040000 {tree} \"\"\n\n".encode()
        # the first commit has no parent: the scratch ref starts empty
        stream = bytearray(f"reset {_SQUASH_REF}\n\n".encode()) + stream
        self._git("fast-import", "--quiet", "--force", input=bytes(stream))
        squashed = self._out("rev-parse", _SQUASH_REF)
        self._git("update-ref", "-d", _SQUASH_REF)
        log.info("squashing %d commits of history older than the newest %d (tip %s)", len(lines) - keep, keep,
                 tip[:12])
        return squashed

    def _commit_tree(self, tree: str, parent: str | None, message: str) -> str:
        args = ["commit-tree", "--no-gpg-sign", tree]
        if parent is not None:
            args += ["-p", parent]
        args += ["-F", "-"]
        return self._out(*args, input=message.encode("utf-8"), env=self._identity_env())

    def _identity_env(self) -> dict[str, str]:
        if self._identity is None:
            identity: dict[str, str] = {}
            for key, field, default in (
                ("name", "NAME", DEFAULT_IDENTITY[0]),
                ("email", "EMAIL", DEFAULT_IDENTITY[1]),
            ):
                configured = self._git("config", "--get", f"user.{key}", check=False).stdout.strip()
                if configured:
                    continue
                for role in ("AUTHOR", "COMMITTER"):
                    var = f"GIT_{role}_{field}"
                    if not self._env.get(var):
                        identity[var] = default
            self._identity = identity
        return self._identity

    def _push(self, commit: str, ref: str, lease: str | None = None) -> tuple[bool, str]:
        """Push (True, detail) if origin rejected it; raise on any other failure.

        Never forced, except with ``lease``: then ``commit`` replaces the
        branch only if origin's tip is still ``lease`` (``--force-with-lease``),
        which is how a squashed history is published.
        """
        force = [f"--force-with-lease=refs/heads/{ref}:{lease}"] if lease is not None else []
        proc = self._git(
            "push", "--porcelain", "--no-verify", "--no-signed", "--quiet", *force,
            "origin", f"{commit}:refs/heads/{ref}",
            check=False, network=True,
        )
        if proc.returncode == 0:
            return False, ""
        stdout = proc.stdout.decode("utf-8", "replace")
        stderr = proc.stderr.decode("utf-8", "replace")
        status = [line for line in stdout.splitlines() if line.startswith("!\t")]
        if status:
            return True, redact_text(" ".join(status[0].split("\t")[2:]) or "rejected", self._secrets)
        raise self._fail("push", stderr or stdout)


SQUASH_RETRY_SECONDS = 86400.0  # after origin refused a squashed history, how long to publish without squashing
_SQUASH_REF = "refs/reconciler/squash"  # where a squashed history is built before it is pushed
_NAMED_TIPS = 64  # up to this many moved status branches are fetched by name, more by one pattern
_SHALLOW_PRUNE_EXPIRE = "1.hour.ago"  # how long gc keeps the objects of status tips a shallow fetch replaced


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------
# Change watching


def _git_dir_of(path: Path) -> Path:
    dot_git = path / ".git"
    return dot_git if dot_git.is_dir() else path


class _RefsHandler(FileSystemEventHandler):
    """Turns writes under ``refs/`` or to ``packed-refs`` into a wake-up."""

    # opened / closed_no_write are someone merely reading a ref (our own fetch)
    _WRITES: Final = frozenset({"created", "deleted", "modified", "moved", "closed"})

    def __init__(self, git_dir: Path, wake: Callable[[], None], lost: Callable[[], None]) -> None:
        super().__init__()
        self._refs = str(git_dir / "refs")
        self._roots = {str(git_dir), self._refs}
        self._wake = wake
        self._lost = lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in self._WRITES:
            return
        src = os.fsdecode(event.src_path)
        if event.event_type in ("deleted", "moved") and src in self._roots:
            self._lost()  # the origin was removed or replaced: watch again at the next wait
            return
        for path in (src, os.fsdecode(event.dest_path) if event.dest_path else ""):
            if not path or path.endswith(".lock"):
                continue  # git's lock files come and go before the ref itself changes
            if path == self._refs or path.startswith(self._refs + os.sep) or os.path.basename(path) == "packed-refs":
                self._wake()
                return


class _WatchdogStopNoise(logging.Filter):
    """Drops the error line watchdog's inotify emitter logs when it is stopped while reading.

    Stopping a watcher races with its reader thread; since watchdog 6 the
    loser logs "queue_events() called when the thread is inactive" at error
    level, which every ``status --wait`` would print on exit. Nothing is
    lost: the watcher is being stopped on purpose. Other records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_WatchdogStopNoise())


class ChangeWatcher:
    """Wakes a reconcile loop: watchdog on a local origin's refs (reacts at once), an explicit trigger (webhook), or the poll interval as fallback.

    A wake-up is a ``threading.Event``: anything that happens between two
    ``wait`` calls is kept until the next one, and it is cleared when ``wait``
    returns, before the caller fetches, so no change can slip between the
    wake-up and the fetch. If a local origin is deleted and recreated, the
    watch is re-established at the next ``wait`` (and that counts as a change).
    """

    def __init__(self, origin: str, poll_interval: float) -> None:
        self.origin = origin
        self.poll_interval = poll_interval
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._watched: tuple[int, int] | None = None
        self._watch_lost = False  # the watched directory itself went away
        self._started = False
        self._local = local_origin_path(origin)

    def start(self) -> None:
        """Watch a local origin's refs; without a local origin, only trigger and poll wake."""
        with self._lock:
            self._started = True
            if self._local is not None:
                self._rewatch()

    def trigger(self) -> None:
        """Wake the loop now (thread-safe; the webhook handler calls this)."""
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a change, a trigger or ``timeout`` (default: the poll interval).

        True if woken by a change or trigger, False on timeout.
        """
        if self._started and self._local is not None:
            with self._lock:
                if self._stale():
                    self._rewatch()
                    self._event.set()  # the origin appeared or was replaced: that is a change
        woke = self._event.wait(self.poll_interval if timeout is None else timeout)
        self._event.clear()
        return woke

    def stop(self) -> None:
        """Stop watching; a ``wait`` in progress returns at once."""
        with self._lock:
            self._started = False
            self._stop_observer()
        self._event.set()

    # -- internals ------------------------------------------------------------

    def _identity(self) -> tuple[int, int] | None:
        assert self._local is not None
        try:
            st = os.stat(_git_dir_of(self._local) / "refs")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _stale(self) -> bool:
        # The inode alone is not enough: a recreated directory may reuse it.
        return self._watch_lost or self._identity() != self._watched

    def _rewatch(self) -> None:
        self._stop_observer()
        self._watch_lost = False
        assert self._local is not None
        git_dir = _git_dir_of(self._local)
        identity = self._identity()
        if identity is None:
            return  # no origin yet: poll, and look again at the next wait
        handler = _RefsHandler(git_dir, self._event.set, self._lose_watch)
        observer = Observer()
        try:
            observer.schedule(handler, str(git_dir / "refs"), recursive=True)
            observer.schedule(handler, str(git_dir), recursive=False)  # packed-refs
            observer.daemon = True
            observer.start()
        except OSError as e:
            log.warning("cannot watch %s (%s); polling every %ss", git_dir, e, self.poll_interval)
            return
        self._observer = observer
        self._watched = identity
        self._watch_lost = False

    def _lose_watch(self) -> None:
        self._watch_lost = True
        self._event.set()

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        self._watched = None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception:  # noqa: BLE001 - a dying watch must not break shutdown
                log.debug("error stopping watchdog observer", exc_info=True)
