"""The relay's artifact cache: deterministic tars from a real git origin, URL fetches, parent relays."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import FileServer, Origin

from reconciler.gitstore import GitStore
from reconciler.packing import ArtifactError, ArtifactPending, pack_directory
from reconciler.relay.artifacts import (
    PARENT_GRACE_SECONDS,
    ArtifactCache,
    check_tar,
    packages_to_stage,
    with_artifact_revisions,
)
from reconciler.relay.state import StagedArtifact
from reconciler.specs import Artifact, Installer, InstallerType, Package, parse_repo

# ------------------------------------------------------------------ fixtures


@pytest.fixture
def files() -> Iterator[FileServer]:
    server = FileServer({})
    yield server
    server.close()


def package(name: str = "app", version: str = "1.0", path: str | None = None, url: str | None = None,
            sha256: str | None = None) -> Package:
    return Package(spec_name=f"{name}-{version}", name=name, version=version,
                   artifact=Artifact(path=path, url=url, sha256=sha256),
                   installer=Installer(InstallerType.FILES), revision="r0")


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Origin, GitStore]:
    origin = Origin(tmp_path)
    origin.commit({
        "artifacts/app/bin/run.sh": "#!/bin/sh\necho hi\n",
        "artifacts/app/README": "read me\n",
        "artifacts/app/link": None,
        "artifacts/setup.exe": b"MZ\x00binary",
        "artifacts/escape/evil": None,
    })
    os.symlink("README", origin.work / "artifacts/app/link")
    (origin.work / "artifacts/escape").mkdir()
    os.symlink("../../../etc/passwd", origin.work / "artifacts/escape/evil")
    os.symlink("app", origin.work / "artifacts/app-alias")
    origin.commit({})
    store = GitStore(origin.url, tmp_path / "relay")
    store.fetch()
    return origin, store


def head(origin: Origin) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin.work, capture_output=True, text=True,
                          check=True).stdout.strip()


# ------------------------------------------------------------------ deterministic tar


def _tree(root: Path, mtime: int, mode_bits: int) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("b")
    (root / "a.txt").write_text("a")
    (root / "sub" / "tool").write_text("#!/bin/sh\n")
    os.chmod(root / "sub" / "tool", 0o700 | mode_bits)
    os.chmod(root / "a.txt", 0o600)
    os.symlink("../a.txt", root / "sub" / "to-a")
    for p in [root / "a.txt", root / "b.txt", root / "sub" / "tool", root / "sub"]:
        os.utime(p, (mtime, mtime))


def test_pack_directory_is_deterministic_and_normalised(tmp_path: Path) -> None:
    _tree(tmp_path / "one", 1_000_000, 0)
    _tree(tmp_path / "two", 2_000_000, 0o055)
    out1, out2 = io.BytesIO(), io.BytesIO()
    sha1, size1 = pack_directory(tmp_path / "one", out1)
    sha2, size2 = pack_directory(tmp_path / "two", out2)
    assert (sha1, size1) == (sha2, size2) and out1.getvalue() == out2.getvalue()
    assert sha1 == hashlib.sha256(out1.getvalue()).hexdigest() and size1 == len(out1.getvalue())
    with tarfile.open(fileobj=io.BytesIO(out1.getvalue())) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.txt", "b.txt", "sub", "sub/to-a", "sub/tool"]
    by_name = {m.name: m for m in members}
    assert by_name["a.txt"].mode == 0o644 and by_name["sub/tool"].mode == 0o755 and by_name["sub"].mode == 0o755
    assert by_name["sub/to-a"].issym() and by_name["sub/to-a"].linkname == "../a.txt"
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "up/../x"])
def test_pack_directory_refuses_escaping_symlinks(tmp_path: Path, target: str) -> None:
    root = tmp_path / "dir"
    (root / "sub" / "deep").mkdir(parents=True)
    os.symlink("../..", root / "sub" / "deep" / "up")  # inside on its own: points at the root
    os.symlink(target.replace("up/", "deep/up/"), root / "sub" / "link")
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        pack_directory(root, io.BytesIO())


def _tar(entries: list[tarfile.TarInfo]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("entry", [
    _info("../evil.txt"),
    _info("ok/../../evil.txt"),
    _info("/etc/cron.d/evil"),
    _info("link", tarfile.SYMTYPE, "../../etc"),
    _info("hard", tarfile.LNKTYPE, "../outside"),
    _info("dev", tarfile.CHRTYPE),
])
def test_check_tar_refuses_zip_slip(tmp_path: Path, entry: tarfile.TarInfo) -> None:
    path = tmp_path / "evil.tar"
    path.write_bytes(_tar([_info("fine.txt"), entry]))
    with pytest.raises(ArtifactError):
        check_tar(path)


def test_check_tar_accepts_a_normal_archive(tmp_path: Path) -> None:
    path = tmp_path / "ok.tar"
    path.write_bytes(_tar([_info("dir", tarfile.DIRTYPE), _info("dir/file"), _info("dir/l", tarfile.SYMTYPE, "file")]))
    check_tar(path)
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArtifactError, match="not a valid tar"):
        check_tar(path)


# ------------------------------------------------------------------ in-repo artifacts


def test_stage_repo_file_and_directory(repo: tuple[Origin, GitStore], tmp_path: Path) -> None:
    origin, store = repo
    commit = head(origin)
    cache = ArtifactCache(tmp_path / "relay", store)
    exe = cache.stage(commit, package(path="artifacts/setup.exe"))
    assert exe.format == "file" and exe.file_name == "setup.exe"
    assert cache.path(exe.sha256).read_bytes() == b"MZ\x00binary" and exe.size == 9

    tar = cache.stage(commit, package(path="artifacts/app"))
    assert tar.format == "tar" and tar.file_name is None
    assert hashlib.sha256(cache.path(tar.sha256).read_bytes()).hexdigest() == tar.sha256
    with tarfile.open(cache.path(tar.sha256)) as archive:
        names = {m.name: m for m in archive.getmembers()}
    assert set(names) == {"README", "bin", "bin/run.sh", "link"}
    assert names["bin/run.sh"].mode == 0o755 and names["link"].linkname == "README"

    # Another relay packing the same tree gets the same bytes; a symlinked path resolves inside the repo.
    other = ArtifactCache(tmp_path / "relay2", store)
    assert other.stage(commit, package(path="artifacts/app")) == tar
    assert other.stage(commit, package(path="artifacts/app-alias")).sha256 == tar.sha256


def test_stage_refuses_escaping_symlink_and_missing_paths(repo: tuple[Origin, GitStore], tmp_path: Path) -> None:
    origin, store = repo
    cache = ArtifactCache(tmp_path / "relay", store)
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        cache.stage(head(origin), package(path="artifacts/escape"))
    with pytest.raises(ArtifactError, match="does not exist"):
        cache.stage(head(origin), package(path="artifacts/nothing"))
    assert list(cache.tmp.iterdir()) == []  # no leftovers


def test_changed_script_changes_sha_and_revision(repo: tuple[Origin, GitStore], tmp_path: Path) -> None:
    origin, store = repo
    cache = ArtifactCache(tmp_path / "relay", store)
    first = cache.stage(head(origin), package(path="artifacts/app"))
    origin.commit({"artifacts/app/bin/run.sh": "#!/bin/sh\necho fixed\n"})
    store.fetch()
    second = cache.stage(head(origin), package(path="artifacts/app"))
    assert first.sha256 != second.sha256
    specs = parse_repo({"topology.yaml": b"""apiVersion: reconciler/v1
kind: Topology
metadata: {name: t}
spec: {headquarters: hq-x, relays: [{name: relay-a, parent: hq-x}]}
"""}, lambda p: None).specs
    assert specs is not None
    from dataclasses import replace
    specs = replace(specs, packages=(package(path="artifacts/app"),))
    rev1 = with_artifact_revisions(specs, {("app", "1.0"): first}).packages[0].revision
    rev2 = with_artifact_revisions(specs, {("app", "1.0"): second}).packages[0].revision
    assert len({rev1, rev2, "r0"}) == 3
    assert with_artifact_revisions(specs, {}).packages[0].revision == "r0"


def test_unchanged_tree_is_not_packed_again(repo: tuple[Origin, GitStore], tmp_path: Path) -> None:
    origin, store = repo
    calls: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def export_path(self, commit: str, path: str, dest: Path) -> None:
            calls.append(path)
            store.export_path(commit, path, dest)

    cache = ArtifactCache(tmp_path / "relay", Counting())  # type: ignore[arg-type]
    first = cache.stage(head(origin), package(path="artifacts/app"))
    origin.commit({"unrelated.txt": "x"})
    store.fetch()
    assert cache.stage(head(origin), package(path="artifacts/app")) == first
    assert calls == ["artifacts/app"]


def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "relay" / "cache" / "tmp" / "stage-x").mkdir(parents=True)
    (tmp_path / "relay" / "cache" / "tmp" / "download-y").write_bytes(b"partial")
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    assert list(cache.tmp.iterdir()) == []


# ------------------------------------------------------------------ URL artifacts


def test_url_artifact_is_fetched_and_verified(files: FileServer, tmp_path: Path) -> None:
    content = b"installer bytes" * 1000
    sha = hashlib.sha256(content).hexdigest()
    files.files["/dl/tool-1.0.msi"] = content
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    staged = cache.stage("c", package(url=f"{files.url}/dl/tool-1.0.msi", sha256=sha))
    assert staged == StagedArtifact(sha, len(content), "file", "tool-1.0.msi")
    assert cache.path(sha).read_bytes() == content
    cache.stage("c", package(url=f"{files.url}/dl/tool-1.0.msi", sha256=sha))
    assert files.hits == {"/dl/tool-1.0.msi": 1}  # cached: fetched once


def test_url_sha256_mismatch_is_refused(files: FileServer, tmp_path: Path) -> None:
    files.files["/dl/tool.msi"] = b"tampered"
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    wanted = hashlib.sha256(b"original").hexdigest()
    result = cache.stage_all("c", [package(url=f"{files.url}/dl/tool.msi", sha256=wanted)])
    assert result.staged == {} and "sha256 mismatch" in result.errors[("app", "1.0")]
    assert "refused" in result.errors[("app", "1.0")] and not result.transient
    assert not cache.has(wanted) and list(cache.tmp.iterdir()) == []


def test_url_errors_are_reported(files: FileServer, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    sha = "a" * 64
    result = cache.stage_all("c", [
        package("missing", url=f"{files.url}/nothing", sha256=sha),
        package("refused", url="http://127.0.0.1:9/x", sha256=sha),
        package("ftp", url="ftp://host/x", sha256=sha),
    ])
    assert set(result.errors) == {("missing", "1.0"), ("refused", "1.0"), ("ftp", "1.0")}
    assert "unsupported" in result.errors[("ftp", "1.0")]
    # Network trouble is retried for the same commit; a wrong spec waits for a new commit.
    assert result.transient == {("missing", "1.0"), ("refused", "1.0")}


def test_url_tar_is_checked_for_zip_slip(files: FileServer, tmp_path: Path) -> None:
    evil = _tar([_info("ok.txt"), _info("../../evil.txt")])
    good = _tar([_info("ok.txt")])
    files.files["/evil.tar"], files.files["/good.tar"] = evil, good
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="outside the package directory"):
        cache.stage("c", package(url=f"{files.url}/evil.tar", sha256=hashlib.sha256(evil).hexdigest()))
    staged = cache.stage("c", package(url=f"{files.url}/good.tar", sha256=hashlib.sha256(good).hexdigest()))
    assert staged.format == "tar" and staged.file_name is None


def test_file_url(tmp_path: Path) -> None:
    source = tmp_path / "pkg.bin"
    source.write_bytes(b"local")
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    staged = cache.stage("c", package(url=source.as_uri(), sha256=hashlib.sha256(b"local").hexdigest()))
    assert staged.file_name == "pkg.bin" and cache.path(staged.sha256).read_bytes() == b"local"


def test_parent_relay_is_asked_first(files: FileServer, tmp_path: Path) -> None:
    content = b"big download"
    sha = hashlib.sha256(content).hexdigest()
    origin = FileServer({"/tool.msi": content})
    try:
        files.files[f"/v1/artifacts/{sha}"] = content  # `files` plays the parent relay
        cache = ArtifactCache(tmp_path / "child", None, parent_url=files.url)  # type: ignore[arg-type]
        cache.stage("c", package(url=f"{origin.url}/tool.msi", sha256=sha))
        assert origin.hits == {} and files.hits == {f"/v1/artifacts/{sha}": 1}
    finally:
        origin.close()


def test_parent_without_the_artifact_is_waited_for_then_bypassed(files: FileServer, tmp_path: Path) -> None:
    content = b"big download"
    sha = hashlib.sha256(content).hexdigest()
    origin = FileServer({"/tool.msi": content})
    now = [1000.0]
    try:
        cache = ArtifactCache(tmp_path / "child", None, parent_url=files.url,  # type: ignore[arg-type]
                              clock=lambda: now[0])
        pkg = package(url=f"{origin.url}/tool.msi", sha256=sha)
        with pytest.raises(ArtifactPending):
            cache.stage("c", pkg)
        assert cache.stage_all("c", [pkg]).pending
        assert origin.hits == {}
        now[0] += PARENT_GRACE_SECONDS + 1
        assert cache.stage("c", pkg).sha256 == sha
        assert origin.hits == {"/tool.msi": 1}
    finally:
        origin.close()


def test_unreachable_parent_falls_back_to_the_url(files: FileServer, tmp_path: Path) -> None:
    content = b"x"
    sha = hashlib.sha256(content).hexdigest()
    files.files["/tool.msi"] = content
    cache = ArtifactCache(tmp_path / "child", None, parent_url="http://127.0.0.1:9")  # type: ignore[arg-type]
    assert cache.stage("c", package(url=f"{files.url}/tool.msi", sha256=sha)).sha256 == sha


def test_parent_serving_wrong_bytes_falls_back_to_the_url(files: FileServer, tmp_path: Path) -> None:
    content = b"right"
    sha = hashlib.sha256(content).hexdigest()
    files.files[f"/v1/artifacts/{sha}"] = b"wrong"
    files.files["/tool.msi"] = content
    cache = ArtifactCache(tmp_path / "child", None, parent_url=files.url)  # type: ignore[arg-type]
    assert cache.stage("c", package(url=f"{files.url}/tool.msi", sha256=sha)).sha256 == sha


# ------------------------------------------------------------------ which packages


TOPOLOGY = b"""apiVersion: reconciler/v1
kind: Topology
metadata: {name: t}
spec:
  headquarters: hq-x
  relays:
    - {name: region, parent: hq-x}
    - {name: site-a, parent: region}
    - {name: site-b, parent: region}
    - {name: other, parent: hq-x}
"""


def _pkg(name: str, version: str, depends: str = "") -> bytes:
    deps = f"\n  dependsOn: [{{name: {depends}}}]" if depends else ""
    return f"""apiVersion: reconciler/v1
kind: Package
metadata: {{name: {name}-{version}}}
spec:
  name: {name}
  version: "{version}"
  artifact: {{url: "http://x/{name}", sha256: "{'a' * 64}"}}
  installer: {{type: files}}{deps}
""".encode()


def _job(name: str, package_name: str, version: str | None, dest_type: str, dests: str,
         job_type: str = "install") -> bytes:
    ver = f', version: "{version}"' if version else ""
    return f"""apiVersion: reconciler/v1
kind: Job
metadata: {{name: {name}}}
spec:
  jobType: {job_type}
  package: {{name: {package_name}{ver}}}
  destinationType: {dest_type}
  destinations: [{dests}]
""".encode()


def test_packages_to_stage_cover_the_subtree_and_dependencies() -> None:
    result = parse_repo({
        "topology.yaml": TOPOLOGY,
        "packages/a.yaml": _pkg("a", "1"), "packages/b.yaml": _pkg("b", "1"), "packages/c.yaml": _pkg("c", "1"),
        "packages/d.yaml": _pkg("d", "1", depends="e"), "packages/e.yaml": _pkg("e", "2"),
        "packages/f.yaml": _pkg("f", "1"), "packages/g.yaml": _pkg("g", "1"),
        "jobs/a.yaml": _job("job-a", "a", "1", "allLowerClients", "region"),
        "jobs/b.yaml": _job("job-b", "b", "1", "allLowerClients", "site-b"),
        "jobs/c.yaml": _job("job-c", "c", "1", "allLowerClients", "other"),
        "jobs/d.yaml": _job("job-d", "d", "1", "clients", "pc-1"),
        "jobs/f.yaml": _job("job-f", "f", None, "allLowerClients", "region", job_type="uninstall"),
    }, lambda p: None)
    assert result.specs is not None, result.errors

    def names(relay: str) -> list[str]:
        return [p.name for p in packages_to_stage(result.specs, relay)]  # type: ignore[arg-type]

    assert names("region") == ["a", "b", "d", "e"]  # its own, a child's, clients jobs and a dependency
    assert names("site-a") == ["a", "d", "e"]
    assert names("site-b") == ["a", "b", "d", "e"]
    assert names("other") == ["c", "d", "e"]


def test_prune_removes_only_old_unused_artifacts(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "relay", None)  # type: ignore[arg-type]
    for name in ("a" * 64, "b" * 64, "c" * 64):
        cache.path(name).write_bytes(b"x")
    old = 1_000_000_000
    os.utime(cache.path("a" * 64), (old, old))
    os.utime(cache.path("b" * 64), (old, old))
    assert cache.prune(keep={"b" * 64}, max_age_seconds=3600) == 1
    assert not cache.has("a" * 64) and cache.has("b" * 64) and cache.has("c" * 64)
