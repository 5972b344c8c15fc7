"""GitStore and ChangeWatcher against real temporary git repositories (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.gitstore import (
    STATUS_PREFIX,
    Blob,
    ChangeWatcher,
    GitError,
    GitStore,
    History,
    MissingObjects,
    PushRejected,
    local_origin_path,
)
from reconciler.metrics import Metrics
from reconciler.redaction import redact_url

PROJECT_ROOT = Path(__file__).resolve().parents[1]

GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_AUTHOR_NAME": "Admin",
    "GIT_AUTHOR_EMAIL": "admin@example.com",
    "GIT_COMMITTER_NAME": "Admin",
    "GIT_COMMITTER_EMAIL": "admin@example.com",
    "GIT_TERMINAL_PROMPT": "0",
}


def git(*args: str, cwd: Path | None = None, input: bytes | None = None) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, input=input, capture_output=True, check=False
    )
    assert proc.returncode == 0, f"git {args}: {proc.stderr.decode()}"
    return proc.stdout.decode().strip()


def make_origin(path: Path) -> Path:
    git("init", "--quiet", "--bare", "--initial-branch=main", str(path))
    return path


class Author:
    """A human's work tree that commits to the origin's main with plain git."""

    def __init__(self, origin: Path, path: Path) -> None:
        self.origin = origin
        self.path = path
        git("init", "--quiet", "--initial-branch=main", str(path))
        git("remote", "add", "origin", str(origin), cwd=path)

    def commit(
        self,
        files: dict[str, bytes | str],
        message: str = "change",
        symlinks: dict[str, str] | None = None,
        executable: tuple[str, ...] = (),
        branch: str = "main",
    ) -> str:
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
            if rel in executable:
                target.chmod(0o755)
        for rel, link_to in (symlinks or {}).items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link_to, target)
        git("add", "-A", cwd=self.path)
        git("commit", "--quiet", "--allow-empty", "-m", message, cwd=self.path)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=self.path)
        return git("rev-parse", "HEAD", cwd=self.path)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return make_origin(tmp_path / "origin.git")


@pytest.fixture
def author(origin: Path, tmp_path: Path) -> Author:
    return Author(origin, tmp_path / "author")


@pytest.fixture
def store(origin: Path, tmp_path: Path) -> GitStore:
    return GitStore(str(origin), tmp_path / "work")


def origin_tree(origin: Path, ref: str) -> dict[str, str]:
    out = git(f"--git-dir={origin}", "ls-tree", "-r", ref)
    tree = {}
    for line in out.splitlines():
        _meta, path = line.split("\t", 1)
        tree[path] = git(f"--git-dir={origin}", "cat-file", "blob", f"{ref}:{path}")
    return tree


def poll(condition, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# --------------------------------------------------------------------------
# reading


def test_fetch_and_ref_sha_of_main(store: GitStore, author: Author) -> None:
    assert store.ref_sha("main") is None  # nothing fetched yet
    sha = author.commit({"topology.yaml": "kind: Topology\n"})
    store.fetch()
    assert store.ref_sha("main") == sha
    assert (store.workdir / "repo.git").is_dir()
    assert store.ref_sha("status/hq") is None


def test_empty_origin_fetches_without_refs(store: GitStore) -> None:
    store.fetch()
    assert store.ref_sha("main") is None
    assert store.list_status_refs() == {}


def test_fetch_prunes_deleted_branches_and_follows_recreated_origin(
    store: GitStore, author: Author, origin: Path, tmp_path: Path
) -> None:
    author.commit({"a": "1"}, branch="status/relay-kanto")
    author.commit({"a": "1"})
    store.fetch()
    assert set(store.list_status_refs()) == {"relay-kanto"}
    git(f"--git-dir={origin}", "branch", "-D", "status/relay-kanto")
    store.fetch()
    assert store.list_status_refs() == {}
    # the origin is deleted and recreated empty: no crash, main is simply absent
    subprocess.run(["rm", "-rf", str(origin)], check=True)
    with pytest.raises(GitError):
        store.fetch()
    make_origin(origin)
    store.fetch()
    assert store.ref_sha("main") is None
    fresh = Author(origin, tmp_path / "author2").commit({"b": "2"})
    store.fetch()
    assert store.ref_sha("main") == fresh


def test_fetch_of_named_branches_copies_only_them(store: GitStore, author: Author, origin: Path) -> None:
    """A relay asks for main and status/hq: other relays' status branches never reach its mirror."""
    hq = author.commit({"accepted.yaml": "x"}, branch="status/hq")
    main = author.commit({"topology.yaml": "kind: Topology\n"})
    author.commit({"a": "1"}, branch="status/relay-kanto")  # a child of main: its objects are kanto's alone
    store.fetch(("main", "status/hq"))
    assert store.ref_sha("main") == main
    assert store.ref_sha("status/hq") == hq
    assert store.list_status_refs() == {"hq": hq}
    # only the named refs went over the wire: the other branch's commit is not in the mirror either
    assert store.resolve_commit(git(f"--git-dir={origin}", "rev-parse", "status/relay-kanto")) is None


def test_fetch_of_named_branches_drops_one_origin_lost_and_fetches_the_rest(
    store: GitStore, author: Author, origin: Path
) -> None:
    author.commit({"accepted.yaml": "x"}, branch="status/hq")
    store.fetch(("main", "status/hq"))  # main does not exist yet: status/hq still arrives
    assert store.ref_sha("main") is None and store.ref_sha("status/hq") is not None
    main = author.commit({"b": "2"})
    git(f"--git-dir={origin}", "branch", "-D", "status/hq")
    store.fetch(("main", "status/hq"))
    assert store.ref_sha("main") == main
    assert store.ref_sha("status/hq") is None
    with pytest.raises(ValueError):
        store.fetch(("main", "--upload-pack=touch /tmp/x"))


def test_list_status_refs(store: GitStore, author: Author) -> None:
    main = author.commit({"x": "1"})
    hq = author.commit({"y": "2"}, branch="status/hq")
    kanto = author.commit({"z": "3"}, branch="status/relay-kanto")
    store.fetch()
    assert store.list_status_refs() == {"hq": hq, "relay-kanto": kanto}
    assert store.ref_sha("main") == main


def test_read_files_by_prefix(store: GitStore, author: Author) -> None:
    sha = author.commit(
        {
            "topology.yaml": "t",
            "packages/7zip.yaml": "p1",
            "packages/sub/deep.yaml": "p2",
            "jobs/j.yaml": "j",
            "README.md": "r",
        },
        symlinks={"packages/link.yaml": "7zip.yaml"},
    )
    store.fetch()
    got = store.read_files(sha, ("topology.yaml", "packages/"))
    assert got == {
        "packages/7zip.yaml": b"p1",
        "packages/sub/deep.yaml": b"p2",
        "topology.yaml": b"t",
    }
    everything = store.read_files(sha)
    assert set(everything) == {"topology.yaml", "packages/7zip.yaml", "packages/sub/deep.yaml", "jobs/j.yaml", "README.md"}
    assert store.read_files(sha, ("nothing/",)) == {}


def test_read_files_truncates_large_files(store: GitStore, author: Author) -> None:
    big = os.urandom(300_000)
    huge = b"MZ" + bytes(9 << 20)  # beyond the streaming limit: read by its head only
    sha = author.commit(
        {"jobs/big.yaml": big, "jobs/small.yaml": "ok", "jobs/edge.yaml": b"x" * 100, "jobs/huge.bin": huge}
    )
    store.fetch()
    got = store.read_files(sha, ("jobs/",), max_size=100)
    assert got["jobs/big.yaml"] == big[:101]
    assert got["jobs/huge.bin"] == huge[:101]
    assert got["jobs/small.yaml"] == b"ok"
    assert got["jobs/edge.yaml"] == b"x" * 100  # exactly max_size is not too large
    assert store.read_files(sha, ("jobs/big",))["jobs/big.yaml"] == big


def test_read_file_and_read_paths_never_read_a_large_file_whole(store: GitStore, author: Author) -> None:
    """A status file a relay pushed can be any size: readers get max_size + 1 bytes and say it is too large."""
    big = os.urandom(300_000)
    sha = author.commit({"relays/a/relay.yaml": big, "relays/b/relay.yaml": "ok", "relays/c/relay.yaml": b"x" * 100})
    store.fetch()
    assert store.read_file(sha, "relays/a/relay.yaml", max_size=100) == big[:101]
    assert store.read_file(sha, "relays/c/relay.yaml", max_size=100) == b"x" * 100
    assert store.read_file(sha, "relays/a/relay.yaml") == big
    got = store.read_paths([(sha, "relays/a/relay.yaml"), (sha, "relays/none.yaml"), (sha, "relays/b/relay.yaml"),
                            (sha, "relays/c/relay.yaml"), (sha, "relays")], max_size=100)
    assert got == [big[:101], None, b"ok", b"x" * 100, None]


def fast_import_commit(origin: Path, files: dict[str, bytes]) -> str:
    """One commit with many files on origin's main, written by a single git fast-import."""
    stream = bytearray(b"commit refs/heads/main\ncommitter Admin <admin@example.com> 1700000000 +0000\ndata 4\nbulk\n")
    for path, content in files.items():
        stream += f"M 100644 inline {path}\ndata {len(content)}\n".encode() + content + b"\n"
    git(f"--git-dir={origin}", "fast-import", "--quiet", input=bytes(stream))
    return git(f"--git-dir={origin}", "rev-parse", "main")


def test_read_files_of_5000_files(store: GitStore, origin: Path) -> None:
    files = {f"packages/p{i:04d}.yaml": f"name: p{i}\n".encode() for i in range(5000)}
    files.update({f"packages/same{i}.yaml": b"duplicate content\n" for i in range(3)})
    files["topology.yaml"] = b"t\n"
    sha = fast_import_commit(origin, files)
    store.fetch()
    got = store.read_files(sha, ("packages/",))
    assert len(got) == 5003
    assert got["packages/p4321.yaml"] == b"name: p4321\n"
    assert got["packages/same2.yaml"] == b"duplicate content\n"


def test_read_file_path_kind_and_symlinks(store: GitStore, author: Author) -> None:
    sha = author.commit(
        {"artifacts/tool/bin/run.sh": "#!/bin/sh\n", "artifacts/setup.msi": b"\x00MSI"},
        symlinks={"artifacts/tool/current": "bin"},
    )
    store.fetch()
    assert store.read_file(sha, "artifacts/setup.msi") == b"\x00MSI"
    assert store.read_file(sha, "./artifacts/setup.msi") == b"\x00MSI"
    assert store.read_file(sha, "artifacts/missing.msi") is None
    assert store.read_file(sha, "artifacts/tool") is None  # a directory is not a file
    assert store.path_kind(sha, "artifacts/setup.msi") == "file"
    assert store.path_kind(sha, "artifacts/tool") == "dir"
    assert store.path_kind(sha, "artifacts/tool/") == "dir"
    assert store.path_kind(sha, "") == "dir"
    assert store.path_kind(sha, "artifacts/tool/current") == "symlink"
    assert store.path_kind(sha, "artifacts/nope") is None
    assert store.path_kind(sha, "artifacts/setup.msi/inside") is None
    assert store.symlink_target(sha, "artifacts/tool/current") == "bin"
    assert store.symlink_target(sha, "artifacts/setup.msi") is None
    with pytest.raises(ValueError):
        store.path_kind(sha, "../outside")


def test_reading_an_unknown_commit_is_a_git_error(store: GitStore, author: Author) -> None:
    author.commit({"a": "1"})
    store.fetch()
    with pytest.raises(GitError):
        store.read_files("0" * 40)
    with pytest.raises(GitError):
        store.read_file("--output=/tmp/x", "a")


def test_export_path_preserves_modes_and_symlinks(store: GitStore, author: Author, tmp_path: Path) -> None:
    sha = author.commit(
        {"artifacts/tool/bin/run.sh": "#!/bin/sh\necho hi\n", "artifacts/tool/data/a.txt": "a", "artifacts/one.bin": b"\x01\x02"},
        symlinks={"artifacts/tool/latest": "bin/run.sh"},
        executable=("artifacts/tool/bin/run.sh",),
    )
    store.fetch()
    dest = tmp_path / "stage" / "tool"
    store.export_path(sha, "artifacts/tool", dest)
    assert (dest / "bin" / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert os.access(dest / "bin" / "run.sh", os.X_OK)
    assert not os.access(dest / "data" / "a.txt", os.X_OK)
    assert (dest / "latest").is_symlink() and os.readlink(dest / "latest") == "bin/run.sh"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "bin", "bin/run.sh", "data", "data/a.txt", "latest"
    ]
    single = tmp_path / "stage" / "one.bin"
    store.export_path(sha, "artifacts/one.bin", single)
    assert single.read_bytes() == b"\x01\x02"
    link = tmp_path / "stage" / "link"
    store.export_path(sha, "artifacts/tool/latest", link)
    assert os.readlink(link) == "bin/run.sh"
    with pytest.raises(GitError):
        store.export_path(sha, "artifacts/missing", tmp_path / "stage" / "missing")


def test_commit_info(store: GitStore, author: Author) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    sha = author.commit({"a": "1"}, message="Add 7-Zip 23.01\n\nlonger body")
    store.fetch()
    subject, when = store.commit_info(sha)
    assert subject == "Add 7-Zip 23.01"
    assert when.tzinfo is not None and when.utcoffset().total_seconds() == 0
    assert before <= when <= datetime.now(timezone.utc)


# --------------------------------------------------------------------------
# publishing


def test_publish_creates_status_ref_with_exactly_the_given_files(store: GitStore, origin: Path, author: Author) -> None:
    main = author.commit({"topology.yaml": "t"})
    files = {"relays/kanto/relay.yaml": b"clients: 3\n", "relays/kanto/jobs/j1.yaml": b"state: Completed\n"}
    sha = store.publish("status/relay-kanto", files, "status: kanto")
    assert sha is not None
    assert git(f"--git-dir={origin}", "rev-parse", "refs/heads/status/relay-kanto") == sha
    assert origin_tree(origin, "status/relay-kanto") == {k: v.decode().strip() for k, v in files.items()}
    assert git(f"--git-dir={origin}", "log", "-1", "--format=%s|%an <%ae>", "status/relay-kanto").startswith("status: kanto|")
    assert git(f"--git-dir={origin}", "rev-parse", "main") == main  # main untouched
    store.fetch()
    assert store.ref_sha("status/relay-kanto") == sha


def test_publish_identical_tree_makes_no_commit(store: GitStore, origin: Path) -> None:
    files = {"accepted.yaml": b"commit: abc\n"}
    first = store.publish("status/hq", files, "one")
    assert first is not None
    assert store.publish("status/hq", dict(files), "two") is None
    assert git(f"--git-dir={origin}", "rev-parse", "status/hq") == first
    assert git(f"--git-dir={origin}", "rev-list", "--count", "status/hq") == "1"


def test_publish_takes_blobs_another_store_wrote_into_the_mirror(store: GitStore, origin: Path) -> None:
    store.publish("status/hq", {"a.yaml": b"first"}, "one")  # the mirror exists
    writer = GitStore.adding_objects(store.workdir)  # as a relay's pass process writes them
    blobs = writer.store_blobs({"jobs/a.yaml": b"rows\n", "relay.yaml": b"clients: 3\n"})
    assert set(blobs) == {"jobs/a.yaml", "relay.yaml"} and all(isinstance(b, Blob) for b in blobs.values())
    again = writer.store_blobs({"jobs/a.yaml": b"rows\n", "relay.yaml": b"clients: 4\n"})
    assert again["jobs/a.yaml"] == blobs["jobs/a.yaml"] and again["relay.yaml"] != blobs["relay.yaml"]
    sha = store.publish("status/hq", {**again, "c.yaml": b"bytes beside blobs"}, "two")
    assert sha is not None
    assert origin_tree(origin, "status/hq") == {"jobs/a.yaml": "rows", "relay.yaml": "clients: 4",
                                                "c.yaml": "bytes beside blobs"}
    assert store.publish("status/hq", {**again, "c.yaml": b"bytes beside blobs"}, "three") is None  # unchanged


def test_publish_of_a_blob_the_mirror_does_not_hold_names_the_file(store: GitStore, origin: Path) -> None:
    store.publish("status/hq", {"a.yaml": b"first"}, "one")
    gone = Blob("0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(MissingObjects, match="jobs/b.yaml: blob 0123456789ab"):
        store.publish("status/hq", {"a.yaml": b"second", "jobs/b.yaml": gone}, "two")
    assert origin_tree(origin, "status/hq") == {"a.yaml": "first"}  # nothing half-published
    assert store.publish("status/hq", {"a.yaml": b"second"}, "three") is not None


def test_publish_changed_content_extends_history(store: GitStore, origin: Path) -> None:
    first = store.publish("status/hq", {"a.yaml": b"1", "b.yaml": b"gone soon"}, "one")
    second = store.publish("status/hq", {"a.yaml": b"2"}, "two")
    assert second is not None and second != first
    assert git(f"--git-dir={origin}", "rev-parse", f"{second}^") == first
    assert origin_tree(origin, "status/hq") == {"a.yaml": "2"}  # complete tree: b.yaml removed
    empty = store.publish("status/hq", {}, "nothing to report")
    assert empty is not None and origin_tree(origin, "status/hq") == {}


def _first_parent_chain(origin: Path, ref: str) -> list[str]:
    return git(f"--git-dir={origin}", "rev-list", "--first-parent", ref).splitlines()


def test_a_bounded_history_is_squashed_by_its_writer_keeping_the_newest_commits(
    origin: Path, author: Author, tmp_path: Path
) -> None:
    main = author.commit({"topology.yaml": "kind: Topology\n"})
    store = GitStore(str(origin), tmp_path / "bounded", history=History(days=None, commits=10))
    trees = []
    for n in range(13):  # 13 commits: a quarter past the bound of 10 is 12.5
        store.publish("status/relay-a", {"n.txt": f"{n}\n".encode()}, f"publish {n}")
        trees.append(git(f"--git-dir={origin}", "rev-parse", "status/relay-a^{tree}"))
    assert len(_first_parent_chain(origin, "status/relay-a")) == 13
    before = git(f"--git-dir={origin}", "rev-parse", "status/relay-a")
    store.publish("status/relay-a", {"n.txt": b"13\n"}, "publish 13")  # the newest 10 kept, then the new one
    trees.append(git(f"--git-dir={origin}", "rev-parse", "status/relay-a^{tree}"))
    chain = _first_parent_chain(origin, "status/relay-a")
    assert len(chain) == 11
    # every kept commit still has its tree and message, newest first; the oldest kept one is a root
    kept_trees = [git(f"--git-dir={origin}", "rev-parse", f"{sha}^{{tree}}") for sha in chain]
    assert kept_trees == trees[::-1][:11]
    messages = [git(f"--git-dir={origin}", "log", "-1", "--format=%s", sha) for sha in chain]
    assert messages == [f"publish {n}" for n in range(13, 2, -1)]
    root = chain[-1]
    assert git(f"--git-dir={origin}", "rev-list", "--parents", "-n1", root) == root  # no parent
    assert "squashed" in git(f"--git-dir={origin}", "log", "-1", "--format=%B", root)
    # the old tip is no longer reachable from the branch; main and other branches are untouched
    assert subprocess.run(["git", f"--git-dir={origin}", "merge-base", "--is-ancestor", before, "status/relay-a"],
                          env=GIT_ENV).returncode == 1
    assert git(f"--git-dir={origin}", "rev-parse", "main") == main
    # publishing on goes on from the squashed chain (a fast-forward again)
    store.publish("status/relay-a", {"n.txt": b"14\n"}, "publish 14")
    assert len(_first_parent_chain(origin, "status/relay-a")) == 12


def test_a_history_bound_by_age_keeps_recent_commits_and_a_fresh_clone_gets_only_them(
    origin: Path, tmp_path: Path
) -> None:
    store = GitStore(str(origin), tmp_path / "aged", history=History(days=30, commits=None))
    for n in range(5):
        store.publish("status/hq", {"n.txt": f"{n}\n".encode()}, f"publish {n}")
    store.clock = lambda: time.time() + 36 * 86400  # a month on: under 30 * 1.25 days, nothing squashed yet
    store.publish("status/hq", {"n.txt": b"5\n"}, "publish 5")
    assert len(_first_parent_chain(origin, "status/hq")) == 6
    store.clock = lambda: time.time() + 40 * 86400  # every commit is now past 37.5 days: only the tip is kept
    store.publish("status/hq", {"n.txt": b"6\n"}, "publish 6")
    assert len(_first_parent_chain(origin, "status/hq")) == 2
    git(f"--git-dir={origin}", "gc", "--quiet", "--prune=now")
    clone = tmp_path / "clone.git"
    git("clone", "--quiet", "--mirror", str(origin), str(clone))
    assert int(git(f"--git-dir={clone}", "rev-list", "--all", "--count")) == 2


def test_a_squash_never_overwrites_a_tip_that_moved_on_origin(origin: Path, tmp_path: Path) -> None:
    """The squashed chain is pushed with a lease on the tip it was built from: a push in between wins, and the
    squash is rebuilt on it."""
    other = GitStore(str(origin), tmp_path / "w2")
    moved: list[str] = []

    class Racing(GitStore):
        def _bounded(self, tip: str) -> str:
            squashed = super()._bounded(tip)
            if squashed != tip and not moved:  # another writer pushes between the squash and its push
                sha = other.publish("status/relay-a", {"n.txt": b"from elsewhere\n"}, "elsewhere")
                assert sha is not None
                moved.append(sha)
            return squashed

    store = Racing(str(origin), tmp_path / "w1", history=History(days=None, commits=10), backoff_seconds=0.0)
    for n in range(14):
        store.publish("status/relay-a", {"n.txt": f"{n}\n".encode()}, f"publish {n}")
    assert moved, "no squash happened"
    chain = _first_parent_chain(origin, "status/relay-a")
    messages = [git(f"--git-dir={origin}", "log", "-1", "--format=%s", sha) for sha in chain]
    # the other push is kept: the lease refused the squash, and the retry went on top as a fast-forward
    assert messages[:2] == ["publish 13", "elsewhere"] and moved[0] == chain[1]
    assert len(chain) == 15
    store.publish("status/relay-a", {"n.txt": b"14\n"}, "publish 14")  # the next publish squashes
    assert len(_first_parent_chain(origin, "status/relay-a")) == 11


def test_an_origin_that_refuses_rewrites_still_gets_every_publish(origin: Path, tmp_path: Path) -> None:
    """A protected status branch (no force pushes): publishing goes on unsquashed, and squashing waits a day."""
    git(f"--git-dir={origin}", "config", "receive.denyNonFastForwards", "true")
    store = GitStore(str(origin), tmp_path / "w", history=History(days=None, commits=10), backoff_seconds=0.0)
    now = [time.time()]
    store.clock = lambda: now[0]
    published = [store.publish("status/relay-a", {"n.txt": f"{n}\n".encode()}, f"publish {n}") for n in range(16)]
    assert all(published) and git(f"--git-dir={origin}", "rev-parse", "status/relay-a") == published[-1]
    assert len(_first_parent_chain(origin, "status/relay-a")) == 16  # nothing lost, nothing squashed
    assert store._squash_refused_until == pytest.approx(now[0] + 86400)
    git(f"--git-dir={origin}", "config", "receive.denyNonFastForwards", "false")
    store.publish("status/relay-a", {"n.txt": b"16\n"}, "publish 16")  # within the day: still not tried
    assert len(_first_parent_chain(origin, "status/relay-a")) == 17
    now[0] += 86401
    store.publish("status/relay-a", {"n.txt": b"17\n"}, "publish 17")  # a day later: squashed
    assert len(_first_parent_chain(origin, "status/relay-a")) == 11


def test_publish_refuses_non_status_refs_and_bad_paths(store: GitStore, origin: Path, author: Author) -> None:
    main = author.commit({"a": "1"})
    for ref in ("main", "refs/heads/status/x", "status/", "status/../main", "-status/x"):
        with pytest.raises(ValueError):
            store.publish(ref, {"a": b"1"}, "no")
    for path in ("/abs", "a/../b", "a//b", ".git/config", ""):
        with pytest.raises(ValueError):
            store.publish("status/x", {path: b"1"}, "no")
    assert git(f"--git-dir={origin}", "rev-parse", "main") == main
    assert git(f"--git-dir={origin}", "for-each-ref", "refs/heads/status/") == ""


def test_publish_ignores_a_stale_local_copy(store: GitStore, origin: Path, tmp_path: Path) -> None:
    """The local mirror says "unchanged", but someone else moved the ref: origin wins the comparison."""
    files = {"f": b"mine"}
    store.publish("status/x", files, "mine")
    other = GitStore(str(origin), tmp_path / "other")
    theirs = other.publish("status/x", {"f": b"theirs"}, "theirs")
    again = store.publish("status/x", files, "mine again")
    assert again is not None and git(f"--git-dir={origin}", "rev-parse", f"{again}^") == theirs
    assert origin_tree(origin, "status/x") == {"f": "mine"}


def test_stale_publisher_recovers_without_force(origin: Path, tmp_path: Path) -> None:
    a = GitStore(str(origin), tmp_path / "a")
    b = GitStore(str(origin), tmp_path / "b")
    history = []
    for i in range(3):
        for name, s in (("a", a), ("b", b)):
            sha = s.publish("status/shared", {"who": name.encode(), "round": str(i).encode()}, f"{name} {i}")
            assert sha is not None
            history.append(sha)
    tip = git(f"--git-dir={origin}", "rev-parse", "status/shared")
    assert tip == history[-1]
    for sha in history:
        subprocess.run(["git", f"--git-dir={origin}", "merge-base", "--is-ancestor", sha, tip], check=True)
    assert git(f"--git-dir={origin}", "rev-list", "--count", "status/shared") == str(len(history))
    assert origin_tree(origin, "status/shared") == {"who": "b", "round": "2"}


def test_push_rejected_after_bounded_attempts(origin: Path, tmp_path: Path) -> None:
    """A hook that refuses every update: publish gives up with PushRejected, not a hang."""
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'frozen by test' >&2\nexit 1\n")
    hook.chmod(0o755)
    s = GitStore(str(origin), tmp_path / "w", push_attempts=3, backoff_seconds=0.01)
    with pytest.raises(PushRejected) as info:
        s.publish("status/x", {"a": b"1"}, "m")
    assert "rejected 3 times" in str(info.value)
    assert git(f"--git-dir={origin}", "for-each-ref", "refs/heads/status/") == ""



def test_a_rejected_push_is_counted_as_a_retry_and_a_failed_command_as_a_git_error(origin: Path,
                                                                                   tmp_path: Path) -> None:
    """reconciler_git_push_retries_total counts each rebuilt push; reconciler_git_errors_total each failed
    git command, by subcommand (README, "Metrics")."""
    hook = origin / "hooks" / "pre-receive"
    marker = tmp_path / "refused-once"
    hook.write_text(f"#!/bin/sh\nif [ ! -e '{marker}' ]; then touch '{marker}'; echo 'busy' >&2; exit 1; fi\n")
    hook.chmod(0o755)
    metrics = Metrics()
    s = GitStore(str(origin), tmp_path / "w", push_attempts=3, backoff_seconds=0.01)
    s.metrics = metrics

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert s.publish("status/x", {"a": b"1"}, "m") is not None
    assert sample("reconciler_git_push_retries_total") == 1
    assert sample("reconciler_git_errors_total", command="push") is None
    gone = GitStore(str(tmp_path / "gone.git"), tmp_path / "w2")
    gone.metrics = metrics
    with pytest.raises(GitError):
        gone.fetch()
    assert sample("reconciler_git_errors_total", command="fetch") == 1
    assert sample("reconciler_git_push_retries_total") == 1


RACER = """
import json, sys, time
from pathlib import Path
from reconciler.gitstore import GitStore, PushRejected
origin, workdir, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = GitStore(origin, Path(workdir), push_attempts=20, backoff_seconds=0.01)
store.fetch()  # mirror ready before the start line
go = Path(workdir).parent / "go"
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # start together: the pushes really overlap
    time.sleep(0.001)
results = []
for i in range(count):
    try:
        sha = store.publish("status/race", {"who": name.encode(), "n": str(i).encode()}, f"{name} {i}")
        results.append(sha)
    except PushRejected:
        results.append("rejected")
print(json.dumps(results))
"""


def test_two_processes_racing_keep_a_linear_history(origin: Path, tmp_path: Path) -> None:
    count = 12
    env = {**GIT_ENV, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(origin), str(tmp_path / name), name, str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        for name in ("p1", "p2")
    ]
    (tmp_path / "go").touch()
    published: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        results = json.loads(out)
        assert len(results) == count and None not in results
        published += [r for r in results if r != "rejected"]
    assert len(published) >= count  # both made progress; contention may cost a few
    tip = git(f"--git-dir={origin}", "rev-parse", "status/race")
    history = git(f"--git-dir={origin}", "rev-list", "status/race").split()
    assert set(history) == set(published)  # every acknowledged commit survived, nothing else exists
    assert len(history) == len(published)
    assert git(f"--git-dir={origin}", "rev-list", "--min-parents=2", "status/race") == ""
    assert git(f"--git-dir={origin}", "rev-list", "--max-parents=0", "status/race") == history[-1]
    assert tip == history[0]
    git(f"--git-dir={origin}", "fsck", "--strict")


# --------------------------------------------------------------------------
# credentials and URLs


def test_unreachable_origin_error_hides_credentials(tmp_path: Path) -> None:
    s = GitStore("http://user:s3cret@127.0.0.1:1/x.git?token=t0ken-value", tmp_path / "w")
    with pytest.raises(GitError) as info:
        s.fetch()
    message = str(info.value)
    assert "s3cret" not in message and "t0ken-value" not in message
    assert "127.0.0.1" in message
    with pytest.raises(GitError) as info:
        s.publish("status/x", {"a": b"1"}, "m")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in repr(s)
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file())
    assert b"s3cret" not in on_disk


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:tok@host/x.git", "https://***@host/x.git"),
        ("https://ghp_abcdef123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("https://host:8443/x.git?token=abc&ref=main", "https://host:8443/x.git?token=***&ref=***"),
        ("https://u:p@host/x?private_token=z#frag", "https://***@host/x?private_token=***#frag"),
        ("https://host/x.git", "https://host/x.git"),
        ("ssh://git@host:22/x.git", "ssh://***@host:22/x.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
        ("/srv/git/origin.git", "/srv/git/origin.git"),
        ("file:///srv/git/origin.git", "file:///srv/git/origin.git"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("/srv/origin.git", Path("/srv/origin.git")),
        ("file:///srv/origin%20x.git", Path("/srv/origin x.git")),
        ("https://host/x.git", None),
        ("ssh://host/x.git", None),
        ("git@host:x.git", None),
        ("host:x.git", None),
    ],
)
def test_local_origin_path(origin: str, expected: Path | None) -> None:
    assert local_origin_path(origin) == expected


def test_local_origin_path_relative_is_absolute() -> None:
    assert local_origin_path("./repos/o:1.git") == Path.cwd() / "repos" / "o:1.git"


# --------------------------------------------------------------------------
# restarts


def test_restart_reuses_the_clone_and_sees_new_commits(origin: Path, author: Author, tmp_path: Path) -> None:
    first = author.commit({"a": "1"})
    s1 = GitStore(str(origin), tmp_path / "w")
    s1.fetch()
    inode = (tmp_path / "w" / "repo.git").stat().st_ino
    second = author.commit({"a": "2"})
    s2 = GitStore(str(origin), tmp_path / "w")
    assert s2.ref_sha("main") == first  # the mirror survived the restart
    s2.fetch()
    assert s2.ref_sha("main") == second
    assert (tmp_path / "w" / "repo.git").stat().st_ino == inode
    assert s2.read_file(second, "a") == b"2"


def test_half_created_clone_and_stale_locks_are_recovered(origin: Path, author: Author, tmp_path: Path) -> None:
    sha = author.commit({"a": "1"})
    work = tmp_path / "w"
    (work / "repo.git").mkdir(parents=True)  # killed before the mirror was made
    (work / "repo.git" / "objects").mkdir()
    (work / ".repo.git.999999999.deadbeef.tmp").mkdir()  # a killed creator's leftovers
    s = GitStore(str(origin), work)
    s.fetch()
    assert s.ref_sha("main") == sha
    assert not (work / ".repo.git.999999999.deadbeef.tmp").exists()
    # a git killed mid-update left a ref lock behind: the next process clears it
    (work / "repo.git" / "refs" / "heads" / "main.lock").write_text("stale")
    newer = author.commit({"a": "2"})
    s2 = GitStore(str(origin), work)
    s2.fetch()
    assert s2.ref_sha("main") == newer


def test_the_scratch_files_of_a_killed_writer_are_removed_when_the_mirror_is_next_opened(
        origin: Path, author: Author, tmp_path: Path) -> None:
    author.commit({"a": "1"})
    work = tmp_path / "w"
    GitStore(str(origin), work).fetch()
    # a relay's pass process, killed once it has written its blobs' stream and before git read it
    script = f"""
import os, sys
sys.path.insert(0, {str(PROJECT_ROOT)!r})
from pathlib import Path
from reconciler.gitstore import GitStore
store = GitStore.adding_objects(Path({str(work)!r}))
store._git = lambda *args, **kwargs: os._exit(9)
store.store_blobs({{"relays/r/inventory.json": b"x" * 1_000_000}})
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    left = [path for path in work.iterdir() if path.name != "repo.git"]
    assert left and sum(f.stat().st_size for d in left for f in d.rglob("*") if f.is_file()) >= 1_000_000
    GitStore(str(origin), work).fetch()  # the next process to open the mirror
    assert [path.name for path in work.iterdir()] == ["repo.git"]


# --------------------------------------------------------------------------
# change watching


def test_watcher_wakes_on_push_well_before_the_poll_interval(origin: Path, author: Author, store: GitStore) -> None:
    author.commit({"a": "0"})
    watcher = ChangeWatcher(str(origin), poll_interval=30)
    watcher.start()
    try:
        watcher.wait(timeout=0)  # forget anything from setup
        store.fetch()  # reading the origin is not a change
        assert watcher.wait(timeout=0.3) is False
        author.commit({"a": "1"})
        assert watcher.wait() is True  # woken by the push: the 30 s poll would return False
        # an event that arrives between waits is kept for the next wait
        store.publish("status/hq", {"x": b"1"}, "status")
        assert poll(lambda: watcher.wait(timeout=0.05))
    finally:
        watcher.stop()


def test_watcher_rewatches_a_recreated_origin(origin: Path, tmp_path: Path) -> None:
    watcher = ChangeWatcher(str(origin), poll_interval=30)
    watcher.start()
    try:
        subprocess.run(["rm", "-rf", str(origin)], check=True)
        assert watcher.wait(timeout=5) is True  # losing the origin wakes the loop (its fetch will fail)
        assert watcher.wait(timeout=0.2) is False  # and a missing origin does not spin
        make_origin(origin)
        assert watcher.wait(timeout=5) is True  # the recreated origin counts as a change
        watcher.wait(timeout=0)
        Author(origin, tmp_path / "a2").commit({"b": "1"})
        assert watcher.wait(timeout=10) is True
    finally:
        watcher.stop()


def test_watcher_trigger_wakes_a_waiting_loop(origin: Path) -> None:
    watcher = ChangeWatcher(str(origin), poll_interval=30)
    watcher.start()
    try:
        timer = threading.Timer(0.05, watcher.trigger)
        timer.start()
        assert watcher.wait() is True  # woken by the trigger: the 30 s poll would return False
        timer.join()
    finally:
        watcher.stop()


def test_watcher_times_out_without_events() -> None:
    watcher = ChangeWatcher("https://git.example.invalid/fleet.git", poll_interval=0.1)
    watcher.start()  # not local: nothing to watch
    try:
        assert watcher.wait() is False  # the poll interval passed with no event
        watcher.trigger()  # a trigger between waits is not lost
        assert watcher.wait() is True
        assert watcher.wait(timeout=0.01) is False
    finally:
        watcher.stop()


def test_status_prefix_constant() -> None:
    assert STATUS_PREFIX == "status/"


def test_read_paths_reads_many_refs_in_one_batch(tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    writer = GitStore(str(origin), tmp_path / "writer")
    first = writer.publish("status/a", {"relays/a/relay.yaml": b"a: 1\n", "dir/x": b"x"}, "a")
    second = writer.publish("status/b", {"relays/b/relay.yaml": b"b: 2\n"}, "b")
    assert first and second
    reader = GitStore(str(origin), tmp_path / "reader")
    reader.fetch()
    got = reader.read_paths([
        ("status/a", "relays/a/relay.yaml"),
        ("status/b", "relays/b/relay.yaml"),
        ("status/b", "relays/a/relay.yaml"),  # absent on that ref
        ("status/a", "dir"),  # a directory, not a file
        (second, "relays/b/relay.yaml"),  # by sha
    ])
    assert got == [b"a: 1\n", b"b: 2\n", None, None, b"b: 2\n"]
    assert reader.read_paths([]) == []


def test_watchdogs_stop_race_line_is_dropped_and_other_lines_are_not(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import reconciler.gitstore  # noqa: F401 - installs the filter

    emitter = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.ERROR, logger="watchdog"):
        emitter.error("InotifyEmitter.queue_events() called when the thread is inactive")
        emitter.error("inotify watch limit reached")
    assert [r.getMessage() for r in caplog.records] == ["inotify watch limit reached"]


def _git_config(store: GitStore) -> dict[str, str]:
    env = store._env
    return {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(int(env["GIT_CONFIG_COUNT"]))}


@pytest.mark.parametrize(("url", "password", "remote", "basic"), [
    ("https://ci:s3cret-pw@git.example/org/x.git", None, "https://git.example/org/x.git", "ci:s3cret-pw"),
    ("https://ci@git.example/org/x.git", "from-file-pw", "https://git.example/org/x.git", "ci:from-file-pw"),
    ("https://git.example/org/x.git", "from-file-pw", "https://git.example/org/x.git", "git:from-file-pw"),
    ("https://ghp_tok3nvalue@git.example/org/x.git", None, "https://git.example/org/x.git", "ghp_tok3nvalue:"),
    ("https://git.example/org/x.git", None, "https://git.example/org/x.git", None),
    ("ssh://deploy:no-use@git.example/org/x.git", None, "ssh://deploy@git.example/org/x.git", None),
])
def test_the_origin_reaches_git_without_user_info(url: str, password: str | None, remote: str, basic: str | None,
                                                  tmp_path: Path) -> None:
    """Git hands remote.origin.url to its remote helper on a command line: credentials go in a header entry."""
    import base64

    config = _git_config(GitStore(url, tmp_path, password=password))
    assert config["remote.origin.url"] == remote
    header = config.get(f"http.{remote}.extraHeader")
    if basic is None:
        assert not any("extraHeader" in key for key in config)
    else:
        assert header == "Authorization: Basic " + base64.b64encode(basic.encode()).decode()
