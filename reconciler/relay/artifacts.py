"""The relay's content-addressed artifact cache: ``<workdir>/cache/sha256/<hash>``.

Every package that reaches the relay (or any relay below it, so children can
pull from it) is staged here before a client is told to install it, and
served from here by ``GET /v1/artifacts/<sha256>``:

* an in-repo **file** is staged as-is (format ``file``, ``fileName`` = its
  basename);
* an in-repo **directory** is packed as a deterministic uncompressed tar
  (entries sorted, mtime 0, uid/gid 0, no user or group names, modes
  normalised to 0644/0755), so every relay packing the same tree gets the same
  bytes and the same sha256; a symlink that leaves the directory is refused;
* a **url** artifact is fetched with requests, streamed to disk and verified
  against the spec's sha256 (a mismatch is refused). With ``--parent-url`` the
  parent relay's cache is asked first, so the far origin serves each artifact
  once per top-level relay, not once per relay. The parent serves its cache
  only to child relays that present its ``--child-secret-file``
  (``--parent-secret-file`` here); without it the parent's 401 is logged and
  the artifact comes from its URL. A ``.tar`` URL is served as a
  tar after checking that no entry leaves the archive (zip-slip).

Files appear in the cache only by atomic rename after verification, so a
relay killed while staging never serves a partial artifact, and a present
file is trusted on restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import requests

from reconciler import protocol
from reconciler.fileio import fsync_dir, write_atomic
from reconciler.metrics import RelayMetrics
from reconciler.packing import (
    ArtifactError,
    ArtifactPending,
    ArtifactRefused,
    GitReader,
    HashingWriter,
    escapes,
    pack_repo_path,
    repo_file_name,
    resolve_repo_path,
    url_artifact_form,
    url_file_name,
)
from reconciler.reach import Reach, reach_of
from reconciler.redaction import redact_url
from reconciler.relay.state import StagedArtifact
from reconciler.specs import JobType, Package, Specs
from reconciler.tls import tls_problem

log = logging.getLogger("reconciler.relay")

CHUNK = 1 << 20
HTTP_TIMEOUT = (10.0, 300.0)
PARENT_GRACE_SECONDS = 60.0
"""How long a child relay waits for its parent to stage an artifact before going to the URL itself."""


# ------------------------------------------------------------------ which packages


def packages_to_stage(specs: Specs, relay: str, reach: Reach | None = None) -> tuple[Package, ...]:
    """Packages installed by the jobs reaching the relay's subtree, with their dependencies' packages.

    The subtree, not only the relay's own clients: nested relays fetch their
    URL artifacts from this one (``--parent-url``), and a ``clients`` job's
    client may check in anywhere.
    """
    by_name: dict[str, list[Package]] = {}
    for package in specs.packages:
        by_name.setdefault(package.name, []).append(package)
    wanted: dict[tuple[str, str], Package] = {}
    queue: list[Package] = []
    for job in (reach or reach_of(specs)).jobs_below(relay):
        if job.job_type is JobType.INSTALL and job.package_version is not None:
            queue += [p for p in by_name.get(job.package_name, ()) if p.version == job.package_version]
    while queue:
        package = queue.pop()
        key = (package.name, package.version)
        if key in wanted:
            continue
        wanted[key] = package
        for dependency in package.depends_on:
            queue += by_name.get(dependency.name, ())
    return tuple(sorted(wanted.values(), key=lambda p: (p.name, p.version)))


def with_artifact_revisions(specs: Specs, staged: Mapping[tuple[str, str], StagedArtifact]) -> Specs:
    """Specs whose package revisions also cover the artifact's content.

    An admin who fixes a script inside an artifact directory changes no
    package YAML, yet every client must get the new content: folding the
    artifact's sha256 into the revision makes the plan treat it as a new
    revision (retries reset, the fix is dispatched).
    """
    packages = []
    for package in specs.packages:
        artifact = staged.get((package.name, package.version))
        if artifact is None:
            packages.append(package)
            continue
        revision = hashlib.sha256(f"{package.revision}\n{artifact.sha256}".encode()).hexdigest()
        packages.append(replace(package, revision=revision))
    return replace(specs, packages=tuple(packages))


def check_tar(path: Path) -> None:
    """Refuse a tar with an entry that would land outside the unpack directory (zip-slip) or is a device."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith("/") or "\\" in name or ".." in parts or (len(name) > 1 and name[1] == ":"):
                    raise ArtifactRefused(f"archive entry {name!r} would be written outside the package directory")
                if member.issym() and escapes(name, member.linkname):
                    raise ArtifactRefused(f"archive symlink {name!r} -> {member.linkname!r} leaves the package")
                if member.islnk() and escapes("", member.linkname):  # hard link names are archive-relative
                    raise ArtifactRefused(f"archive hard link {name!r} -> {member.linkname!r} leaves the package")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise ArtifactRefused(f"archive entry {name!r} is a device, fifo or other special file")
    except tarfile.TarError as e:
        raise ArtifactRefused(f"not a valid tar archive: {e}") from None


# ------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class StageResult:
    staged: dict[tuple[str, str], StagedArtifact]
    errors: dict[tuple[str, str], str]  # refused (needs a new commit) or failed (network: retry later)
    pending: dict[tuple[str, str], str]  # waiting for the parent relay: retry soon
    transient: frozenset[tuple[str, str]] = frozenset()  # the errors worth retrying for the same commit


class ArtifactCache:
    """Stages artifacts into ``<workdir>/cache/sha256`` and remembers what each in-repo path packed to."""

    def __init__(self, workdir: Path, git: GitReader, *, parent_url: str | None = None,
                 parent_secret: str | None = None, session: requests.Session | None = None,
                 parent_session: requests.Session | None = None,
                 clock: Any = time.monotonic) -> None:
        self.root = Path(workdir) / "cache"
        self.dir = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.memo_dir = self.root / "trees"
        for d in (self.dir, self.tmp, self.memo_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # a previous run killed mid-staging
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        self.git = git
        self.parent_url = parent_url.rstrip("/") if parent_url else None
        # The parent serves artifacts only to its clients and to child relays presenting its --child-secret-file.
        self.parent_headers = {protocol.RELAY_SECRET_HEADER: parent_secret} if parent_secret else {}
        self.session = session or requests.Session()
        # The parent is a relay of our own tree: trusted through --ca-file (and our client certificate, with
        # mutual TLS); artifact URLs elsewhere through the system's trust store.
        self.parent_session = parent_session or self.session
        self.clock = clock
        self._parent_missing_since: dict[str, float] = {}
        self.metrics: RelayMetrics | None = None  # counts cache hits and misses when set

    def path(self, sha: str) -> Path:
        return self.dir / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    # -- staging -------------------------------------------------------------

    def stage_all(self, commit: str, packages: Iterable[Package]) -> StageResult:
        staged: dict[tuple[str, str], StagedArtifact] = {}
        errors: dict[tuple[str, str], str] = {}
        pending: dict[tuple[str, str], str] = {}
        transient: set[tuple[str, str]] = set()
        for package in packages:
            key = (package.name, package.version)
            try:
                staged[key] = self.stage(commit, package)
                self.touch(staged[key].sha256)
            except ArtifactPending as e:
                pending[key] = str(e)
            except ArtifactRefused as e:
                errors[key] = str(e)
                log.error("artifact of %s %s refused: %s", package.name, package.version, e)
            except ArtifactError as e:
                errors[key] = str(e)
                transient.add(key)
                log.warning("artifact of %s %s not staged (will retry): %s", package.name, package.version, e)
            except Exception as e:  # noqa: BLE001 - one bad artifact must not stop the others
                errors[key] = f"{type(e).__name__}: {e}"
                transient.add(key)
                log.exception("staging the artifact of %s %s failed", package.name, package.version)
        return StageResult(staged, errors, pending, frozenset(transient))

    def stage(self, commit: str, package: Package) -> StagedArtifact:
        artifact = package.artifact
        if artifact.url is not None:
            return self.stage_url(artifact.url, (artifact.sha256 or "").lower())
        if artifact.path is not None:
            return self.stage_repo_path(commit, artifact.path)
        raise ArtifactRefused("package has neither an artifact path nor a url")

    def _memo(self, commit: str, path: str) -> Path | None:
        """Memo file keyed by the git object id of ``path`` (same tree, same tar: skip re-packing)."""
        object_id_of = getattr(self.git, "object_id", None)  # test doubles of the git reader may lack it
        if object_id_of is None:
            return None
        try:
            object_id = object_id_of(commit, path)
        except Exception:  # noqa: BLE001 - the memo is an optimisation only
            return None
        return None if not isinstance(object_id, str) else self.memo_dir / f"{object_id}.json"

    def stage_repo_path(self, commit: str, path: str) -> StagedArtifact:
        memo = self._memo(commit, resolve_repo_path(self.git, commit, path))
        file_name = repo_file_name(path)
        if memo is not None and memo.is_file():
            try:
                known = json.loads(memo.read_text())
                if self.has(known["sha256"]):
                    self._lookup(True)
                    return StagedArtifact(known["sha256"], int(known["size"]), known["format"],
                                          file_name if known["format"] == "file" else None)
            except (ValueError, KeyError, TypeError):
                pass
        self._lookup(False)
        work = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp))
        try:
            packed = pack_repo_path(self.git, commit, path, work, durable=True)
            self._install(packed.path, packed.sha256)
            result = StagedArtifact(packed.sha256, packed.size, packed.format, packed.file_name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if memo is not None:
            write_atomic(memo, json.dumps({"sha256": result.sha256, "size": result.size,
                                            "format": result.format}).encode())
        return result

    def stage_url(self, url: str, sha: str) -> StagedArtifact:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ArtifactRefused(f"artifact sha256 {sha!r} is not 64 hex digits")
        fmt, shown_name = url_artifact_form(url)
        file_name = shown_name or url_file_name(url)
        cached = self.has(sha)
        self._lookup(cached)
        if not cached:
            self._fetch(url, sha)
        if fmt == "tar":
            check_tar(self.path(sha))
        size = self.path(sha).stat().st_size
        return StagedArtifact(sha, size, fmt, file_name if fmt == "file" else None)

    def _lookup(self, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.cache_lookups.labels("hit" if hit else "miss").inc()

    def size_bytes(self) -> int:
        """The bytes of every artifact in the cache (read when metrics are scraped)."""
        total = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass  # pruned meanwhile
        return total

    def _fetch(self, url: str, sha: str) -> None:
        if self.parent_url is not None:
            status = self._try_parent(sha)
            if status == "ok":
                self._parent_missing_since.pop(sha, None)
                return
            if status == "missing":
                first = self._parent_missing_since.setdefault(sha, self.clock())
                if self.clock() - first < PARENT_GRACE_SECONDS:
                    raise ArtifactPending("the parent relay has not staged it yet")
                log.warning("parent relay still lacks %s after %.0fs; fetching it from its URL",
                            sha, PARENT_GRACE_SECONDS)
        self._download(url, sha, source=redact_url(url))

    def _try_parent(self, sha: str) -> str:
        """'ok' (now cached), 'missing' (parent answered 404) or 'error' (unreachable, bad data)."""
        try:
            self._download(f"{self.parent_url}/v1/artifacts/{sha}", sha, source="the parent relay",
                           headers=self.parent_headers, session=self.parent_session)
            return "ok"
        except _NotFound:
            return "missing"
        except _Refused as e:
            log.warning("parent relay refused to serve %s (%s): give this relay --parent-secret-file holding the "
                        "parent's --child-secret-file; using the artifact's URL", sha, e)
            return "error"
        except ArtifactError as e:
            log.warning("parent relay could not provide %s (%s); using the artifact's URL", sha, e)
            return "error"

    def _download(self, url: str, sha: str, *, source: str, headers: Mapping[str, str] | None = None,
                  session: requests.Session | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        handle, temp_name = tempfile.mkstemp(prefix="download-", dir=self.tmp)
        temp = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as out:
                writer = HashingWriter(out)
                if parsed.scheme == "file":
                    try:
                        with open(urllib.parse.unquote(parsed.path), "rb") as src:
                            for chunk in iter(lambda: src.read(CHUNK), b""):
                                writer.write(chunk)
                    except OSError as e:
                        raise ArtifactError(f"cannot read {source}: {e.strerror or e}") from None
                elif parsed.scheme in ("http", "https"):
                    self._http_get(session or self.session, url, writer, source, headers or {})
                else:
                    raise ArtifactRefused(f"unsupported artifact URL scheme {parsed.scheme!r} (http, https, file)")
                out.flush()
                os.fsync(out.fileno())
            got = writer.digest.hexdigest()
            if got != sha:
                raise ArtifactRefused(f"sha256 mismatch for the download from {source}: expected {sha}, got {got}; "
                                    "refused")
            self._install(temp, sha)
        finally:
            temp.unlink(missing_ok=True)

    def _http_get(self, session: requests.Session, url: str, writer: HashingWriter, source: str,
                  headers: Mapping[str, str]) -> None:
        try:
            # A request carrying a secret follows no redirect: requests would resend the header to any host.
            with session.get(url, stream=True, timeout=HTTP_TIMEOUT, headers=dict(headers),
                             allow_redirects=not headers) as response:
                if response.status_code == 404:
                    raise _NotFound(f"{source} answered 404")
                if response.status_code in (401, 403):
                    raise _Refused(f"{source} answered HTTP {response.status_code}")
                if response.status_code != 200:
                    raise ArtifactError(f"{source} answered HTTP {response.status_code}")
                for chunk in response.iter_content(CHUNK):
                    writer.write(chunk)
        except requests.RequestException as e:
            problem = tls_problem(e)
            raise ArtifactError(f"cannot download from {source}: {problem or type(e).__name__}") from None

    def prune(self, keep: Iterable[str], max_age_seconds: float) -> int:
        """Delete cached artifacts not in ``keep`` and untouched for ``max_age_seconds``.

        Staging touches every artifact of the current commit, so only what no
        recent commit needed goes (a child relay or a slow client may still be
        catching up on the previous one).
        """
        keep = set(keep)
        horizon = time.time() - max_age_seconds
        removed = 0
        for path in self.dir.iterdir():
            try:
                if path.name not in keep and path.stat().st_mtime < horizon:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        for memo in self.memo_dir.iterdir():
            try:
                if memo.stat().st_mtime < horizon:
                    memo.unlink()
            except OSError:
                pass
        return removed

    def touch(self, sha: str) -> None:
        try:
            os.utime(self.path(sha))
        except OSError:
            pass

    def _install(self, path: Path, sha: str) -> None:
        target = self.path(sha)
        if target.is_file():
            return
        os.chmod(path, 0o644)
        os.replace(path, target)
        fsync_dir(self.dir)


class _NotFound(ArtifactError):
    pass


class _Refused(ArtifactError):
    """The server wants a credential we lack (401/403)."""


