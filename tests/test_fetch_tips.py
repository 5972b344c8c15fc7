"""GitStore.fetch_tips: status branches by their newest commit only, main and the caller's own branch in full.

Real bare origins and mirrors in temp dirs; history is written with plain git.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from reconciler.gitstore import GitStore, History
from tests.test_gitstore import GIT_ENV, Author, git, origin  # noqa: F401 - the fixture


def _count(store: GitStore, ref: str) -> int:
    return store.count_commits(ref)


def _relay_history(author: Author, relay: str, commits: int) -> str:
    sha = ""
    for n in range(commits):
        sha = author.commit({f"relays/{relay}/relay.yaml": f"n: {n}\n"}, f"{relay} {n}", branch=f"status/{relay}")
    return sha


def _orphan_author(origin: Path, path: Path) -> Author:
    """An author whose status branches are histories of their own (as each writer's are), not children of main."""
    author = Author(origin, path)
    git("checkout", "--quiet", "--orphan", "status", cwd=path)
    return author


def test_status_branches_arrive_as_their_tip_only_while_main_and_status_hq_keep_history(
        origin: Path, tmp_path: Path) -> None:
    main_author = Author(origin, tmp_path / "main")
    mains = [main_author.commit({"topology.yaml": f"n: {n}\n"}, f"main {n}") for n in range(3)]
    relay = _orphan_author(origin, tmp_path / "relay")
    kanto = _relay_history(relay, "relay-kanto", 4)
    hq = GitStore(str(origin), tmp_path / "hq")
    for n in range(3):
        hq.publish("status/hq", {"accepted.yaml": f"n: {n}\n".encode()}, f"hq {n}")
    mirror = GitStore(str(origin), tmp_path / "mirror")
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.ref_sha("main") == mains[-1] and mirror.ref_sha("status/relay-kanto") == kanto
    assert _count(mirror, "main") == 3 and _count(mirror, "status/hq") == 3
    assert _count(mirror, "status/relay-kanto") == 1  # the tip alone: its three parents never arrived
    assert mirror.resolve_commit(git(f"--git-dir={origin}", "rev-parse", "status/relay-kanto~1")) is None
    assert mirror.read_file("status/relay-kanto", "relays/relay-kanto/relay.yaml") == b"n: 3\n"
    # the relay publishes again: one more tip, still no history; main's history is walked as before
    newer = _relay_history(relay, "relay-kanto", 1)
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.ref_sha("status/relay-kanto") == newer and _count(mirror, "status/relay-kanto") == 1
    assert mirror.contains(mains[-1], mains[0]) and mirror.rev_list(mains[-1], mains[0]) == mains[:0:-1]


def test_a_relay_branch_squashed_or_deleted_on_origin_is_followed(origin: Path, tmp_path: Path) -> None:
    relay = GitStore(str(origin), tmp_path / "relay", history=History(days=None, commits=4))
    mirror = GitStore(str(origin), tmp_path / "mirror")
    for n in range(6):
        relay.publish("status/relay-a", {"n.txt": f"{n}\n".encode()}, f"publish {n}")
        relay.publish("status/relay-b", {"n.txt": f"{n}\n".encode()}, f"publish {n}")
        mirror.fetch_tips(("main", "status/hq"))
    before = git(f"--git-dir={origin}", "rev-parse", "status/relay-a")
    relay.publish("status/relay-a", {"n.txt": b"6\n"}, "publish 6")  # 6 > 4 + 1: the writer squashes
    tip = git(f"--git-dir={origin}", "rev-parse", "status/relay-a")
    assert subprocess.run(["git", f"--git-dir={origin}", "merge-base", "--is-ancestor", before, tip],
                          env=GIT_ENV).returncode == 1  # a rewrite, not a fast-forward
    git(f"--git-dir={origin}", "branch", "-D", "status/relay-b")
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.list_status_refs() == {"relay-a": tip}
    assert mirror.read_file("status/relay-a", "n.txt") == b"6\n"


def test_hq_publishes_and_squashes_its_own_branch_from_a_shallow_mirror(origin: Path, tmp_path: Path) -> None:
    """The mirror is shallow for relays' tips; status/hq's own history is whole, so its squash and its
    lease-guarded push work as in a full mirror."""
    relay = _orphan_author(origin, tmp_path / "relay")
    store = GitStore(str(origin), tmp_path / "hq", history=History(days=None, commits=4))
    for n in range(7):
        _relay_history(relay, "relay-kanto", 1)
        store.fetch_tips(("main", "status/hq"))
        store.publish("status/hq", {"n.txt": f"{n}\n".encode()}, f"hq {n}")
    chain = git(f"--git-dir={origin}", "rev-list", "--first-parent", "status/hq").splitlines()
    assert len(chain) == 5  # the seventh publish found 6 > 4 + 1 commits: kept 4, and put itself on top
    messages = [git(f"--git-dir={origin}", "log", "-1", "--format=%s", sha) for sha in chain]
    assert messages == [f"hq {n}" for n in range(6, 1, -1)]
    assert "squashed" in git(f"--git-dir={origin}", "log", "-1", "--format=%B", chain[-1])
    assert (store.repo_path / "shallow").is_file()  # the relay's tips are what is shallow
    assert store.count_commits("status/hq") == len(chain)


def test_without_names_every_branch_outside_status_keeps_history(origin: Path, tmp_path: Path) -> None:
    """``reconciler status`` does not know HQ's branch before it reads status/hq: all other branches are whole."""
    author = Author(origin, tmp_path / "author")
    commits = [author.commit({"a": f"{n}"}, f"release {n}", branch="release") for n in range(3)]
    relay = _orphan_author(origin, tmp_path / "relay")
    _relay_history(relay, "hq", 3)
    mirror = GitStore(str(origin), tmp_path / "mirror")
    mirror.fetch_tips()
    assert mirror.ref_sha("release") == commits[-1] and _count(mirror, "release") == 3
    assert _count(mirror, "status/hq") == 1
    git(f"--git-dir={origin}", "branch", "-D", "release")
    mirror.fetch_tips()
    assert mirror.ref_sha("release") is None and mirror.ref_sha("status/hq") is not None


def test_replaced_tips_leave_the_mirror_at_its_next_gc(origin: Path, tmp_path: Path) -> None:
    """An old relay tip is unreachable after a shallow fetch; the gc git runs inside a fetch drops it once an hour
    old (not two weeks, git's default)."""
    relay = _orphan_author(origin, tmp_path / "relay")
    first = _relay_history(relay, "relay-kanto", 1)
    mirror = GitStore(str(origin), tmp_path / "mirror")
    mirror.fetch_tips(("main", "status/hq"))
    for key, value in (("fetch.unpackLimit", "1"), ("gc.autoPackLimit", "1")):  # each fetch packs, and gc runs
        git(f"--git-dir={mirror.repo_path}", "config", key, value)
    _relay_history(relay, "relay-kanto", 1)
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.resolve_commit(first) == first  # still in the object store, unreachable
    stamp = time.time() - 7200  # the objects fetched so far are two hours old
    for path in (mirror.repo_path / "objects").rglob("*"):
        if path.is_file():
            os.utime(path, (stamp, stamp))
    third = _relay_history(relay, "relay-kanto", 1)
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.resolve_commit(first) is None
    assert mirror.ref_sha("status/relay-kanto") == third
    assert mirror.read_file("status/relay-kanto", "relays/relay-kanto/relay.yaml") == b"n: 0\n"


def test_an_origin_without_relay_branches_fetches_and_prunes_the_last_one(origin: Path, tmp_path: Path) -> None:
    """git fails a shallow fetch that matches no branch; with none on origin that is no error."""
    main = Author(origin, tmp_path / "main").commit({"topology.yaml": "n: 0\n"})
    mirror = GitStore(str(origin), tmp_path / "mirror")
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.ref_sha("main") == main and mirror.list_status_refs() == {}
    hq = GitStore(str(origin), tmp_path / "hq").publish("status/hq", {"a": b"1"}, "hq")
    relay = _orphan_author(origin, tmp_path / "relay")
    _relay_history(relay, "relay-kanto", 1)
    mirror.fetch_tips(("main", "status/hq"))
    assert set(mirror.list_status_refs()) == {"hq", "relay-kanto"}
    git(f"--git-dir={origin}", "branch", "-D", "status/relay-kanto")  # only the excluded status/hq is left
    mirror.fetch_tips(("main", "status/hq"))
    assert mirror.list_status_refs() == {"hq": hq}


def test_a_branch_deleted_between_the_listing_and_the_fetch_is_left_out(origin: Path, tmp_path: Path) -> None:
    relay = _orphan_author(origin, tmp_path / "relay")
    _relay_history(relay, "relay-a", 1)
    b = _relay_history(relay, "relay-b", 1)
    deleted: list[bool] = []

    class Racing(GitStore):
        def _git(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
            if "--depth=1" in args and not deleted:
                deleted.append(True)
                git(f"--git-dir={origin}", "branch", "-D", "status/relay-a")
            return super()._git(*args, **kwargs)

    mirror = Racing(str(origin), tmp_path / "mirror")
    mirror.fetch_tips(("main", "status/hq"))
    assert deleted and mirror.list_status_refs() == {"relay-b": b}
    assert mirror.count_commits("status/relay-b") == 1


def test_every_moved_branch_deleted_before_the_fetch_is_no_error(origin: Path, tmp_path: Path) -> None:
    """git fails a shallow fetch whose pattern matches nothing; the origin is listed again and found empty."""
    relay = _orphan_author(origin, tmp_path / "relay")
    _relay_history(relay, "relay-a", 1)
    fetches: list[tuple[str, ...]] = []

    class Racing(GitStore):
        def _git(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
            if "--depth=1" in args:
                fetches.append(args)
                if len(fetches) == 1:
                    git(f"--git-dir={origin}", "branch", "-D", "status/relay-a")
            return super()._git(*args, **kwargs)

    mirror = Racing(str(origin), tmp_path / "mirror")
    mirror.fetch_tips(("main", "status/hq"))
    assert len(fetches) == 1 and mirror.list_status_refs() == {}  # listed again: nothing left to fetch
