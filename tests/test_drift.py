"""Drift means content: a ``files`` package's receipt records what its directory held, and check-ins compare.

Real trees in temp dirs installed through ``installers.install``; the edits
are the ones a person or a program makes (a byte changed in place, its mtime
set back as ``touch -d`` does, a file removed or added, a link re-pointed).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_agent_installers import FILES, build_tar
from test_agent_loop import FakeRelay, files_action, make_tar, relay  # noqa: F401

from reconciler.agent import content
from reconciler.agent.agent import Agent
from reconciler.agent.detection import DEFAULT_DETECT_SECONDS, inventory
from reconciler.agent.installers import Layout, install, is_present, read_receipt


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    result = Layout(tmp_path / "root")
    result.create()
    return result


def installed(layout: Layout, tmp_path: Path) -> Path:
    tar, ref = build_tar(tmp_path / "a.tar", ("bin/app", b"\x7fELF" + b"\0" * 1000), ("share/readme.txt", "hello\n"),
                         ("share/data.bin", bytes(range(256)) * 16))
    install(layout, "app", "1.0", FILES, tar, ref, "op-1")
    return layout.package_dir("app", "1.0")


def check(layout: Layout, **kwargs: object) -> str | None:
    receipt = read_receipt(layout, "app")
    assert receipt is not None and receipt.content is not None
    return content.check(layout.package_dir("app", "1.0"), layout.content_index("app"), receipt.content["digest"],
                         **kwargs)  # type: ignore[arg-type]


def test_the_receipt_records_the_content(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    receipt = read_receipt(layout, "app")
    assert receipt is not None and receipt.content is not None
    assert (receipt.content["algorithm"], receipt.content["files"], receipt.content["bytes"]) == ("sha256", 3,
                                                                                                  1004 + 6 + 4096)
    index = json.loads(layout.content_index("app").read_text())
    assert index["digest"] == receipt.content["digest"] == content.tree_digest(content.index_tree(tree))
    assert sorted(index["files"]) == ["bin/app", "share/data.bin", "share/readme.txt"]
    assert check(layout) is None and is_present(layout, receipt)


def test_a_byte_changed_in_place_with_its_mtime_set_back_is_drift(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    target = tree / "share" / "data.bin"
    before = target.stat()
    with open(target, "r+b") as handle:  # same size, same inode
        handle.seek(100)
        handle.write(b"\xff")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # what `touch -d` does
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    if os.name != "nt":  # setting mtime moves ctime: the cheap check sees it
        assert check(layout, full=False) == "1 modified (share/data.bin)"
    assert check(layout, full=True) == "1 modified (share/data.bin)"
    receipt = read_receipt(layout, "app")
    assert receipt is not None and not is_present(layout, receipt)
    assert inventory(layout) == []


def test_touch_d_from_the_command_line_too(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    target = tree / "share" / "readme.txt"
    target.write_text("HELLO\n")
    subprocess.run(["touch", "-d", "2001-01-01 00:00:00", str(target)], check=True)
    assert check(layout, full=False) == "1 modified (share/readme.txt)"


def test_a_change_no_stat_can_see_waits_for_the_full_rehash(layout: Layout, tmp_path: Path) -> None:
    """A change below the file system keeps every signature: only re-hashing finds it (content.py)."""
    tree = installed(layout, tmp_path)
    target = tree / "bin" / "app"
    with open(target, "r+b") as handle:
        handle.write(b"MZ")
    index = json.loads(layout.content_index("app").read_text())
    st = target.stat()
    index["files"]["bin/app"].update({"size": st.st_size, "mtimeNs": st.st_mtime_ns, "ino": st.st_ino,
                                      "ctimeNs": st.st_ctime_ns})  # as if the stat had not moved
    layout.content_index("app").write_text(json.dumps(index))
    assert check(layout, full=False) is None
    assert check(layout, full=True) == "1 modified (bin/app)"


def test_the_full_rehash_runs_on_its_schedule(layout: Layout, tmp_path: Path) -> None:
    installed(layout, tmp_path)
    verified = json.loads(layout.content_index("app").read_text())["verifiedAt"]
    assert check(layout, rehash_seconds=3600, now=verified + 10) is None
    assert json.loads(layout.content_index("app").read_text())["verifiedAt"] == verified  # cheap: not a full check
    assert check(layout, rehash_seconds=3600, now=verified + 3600) is None
    assert json.loads(layout.content_index("app").read_text())["verifiedAt"] == verified + 3600


def test_removed_and_added_files_are_drift(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    (tree / "share" / "readme.txt").unlink()
    (tree / "bin" / "helper").write_text("new")
    assert check(layout, full=False) == "1 removed (share/readme.txt); 1 added (bin/helper)"


def test_a_relinked_symlink_is_drift(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    (tree / "bin" / "link").symlink_to("app")
    layout.content_index("app").unlink()  # rebuilt from a full hash: it no longer matches the receipt's digest
    assert check(layout) == "content differs from the receipt's digest (its per-file index was lost)"


def test_a_lost_index_is_rebuilt_when_the_content_is_unchanged(layout: Layout, tmp_path: Path) -> None:
    installed(layout, tmp_path)
    layout.content_index("app").write_text("{ not json")
    assert check(layout) is None
    assert json.loads(layout.content_index("app").read_text())["format"] == content.FORMAT


def test_touched_but_unchanged_is_not_drift_and_is_remembered(layout: Layout, tmp_path: Path) -> None:
    tree = installed(layout, tmp_path)
    target = tree / "share" / "readme.txt"
    os.utime(target, ns=(1, 1_000_000_000))
    assert check(layout, full=False) is None
    assert json.loads(layout.content_index("app").read_text())["files"]["share/readme.txt"]["mtimeNs"] == 1_000_000_000


def test_a_drifted_package_is_reported_absent_and_a_reinstall_heals_it(relay: FakeRelay, tmp_path: Path) -> None:
    root = tmp_path / "root"
    data, sha = make_tar({"notes.txt": "original\n"})
    relay.artifacts[sha] = data
    relay.replies.append([files_action("op-1", sha, len(data))])
    clock = [0.0]
    agent = Agent("pc-drift", relay.url, root, {}, {}, insecure_http=True, monotonic=lambda: clock[0])
    agent.step()
    agent.step()
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "notes", "version": "1.0"}]
    (root / "packages" / "notes" / "1.0" / "notes.txt").write_text("edited!!\n")  # same size
    clock[0] += DEFAULT_DETECT_SECONDS - 1
    agent.step()  # within --detect-interval: the last detection stands
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "notes", "version": "1.0"}]
    clock[0] += 1
    agent.step()  # the first check-in after it finds the drift
    assert relay.checkins[-1]["body"]["inventory"] == []
    relay.replies.append([files_action("op-2", sha, len(data))])  # the plan's "drift: client reports notes missing"
    agent.step()
    agent.step()
    assert relay.checkins[-1]["body"]["inventory"] == [{"name": "notes", "version": "1.0"}]
    assert (root / "packages" / "notes" / "1.0" / "notes.txt").read_text() == "original\n"


def test_rehash_interval_must_be_positive(tmp_path: Path) -> None:
    from reconciler.agent.agent import AgentConfigError
    with pytest.raises(AgentConfigError, match="--rehash-interval"):
        Agent("pc-1", "http://127.0.0.1:1", tmp_path, insecure_http=True, rehash_seconds=0)
