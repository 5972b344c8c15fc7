"""``reconciler rerun``: raise spec.rerun in place, keeping everything else byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.commands.rerun import RerunError, raise_rerun
from reconciler.repo_tree import load_repo
from reconciler.resources import example_repo_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(example_repo_dir(), target)
    return target


def rerun(repo: Path, job: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", "rerun", job, str(repo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    body = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    return [line for line in body if line.startswith("-")], [line for line in body if line.startswith("+")]


def test_existing_rerun_line_is_raised_keeping_its_comment(repo: Path) -> None:
    path = repo / "jobs" / "install-vpn-client.yaml"
    path.write_text(path.read_text().replace("  rerun: 0\n", "  rerun: 4   # bumped after the driver fix\n"))
    before = path.read_text()
    proc = rerun(repo, "install-vpn-client")
    assert proc.returncode == 0, proc.stderr
    removed, added = changed_lines(proc.stdout)
    assert removed == ["-  rerun: 4   # bumped after the driver fix"]
    assert added == ["+  rerun: 5   # bumped after the driver fix"]
    assert proc.stdout.startswith("--- a/jobs/install-vpn-client.yaml\n+++ b/jobs/install-vpn-client.yaml\n")
    after = path.read_text()
    assert after == before.replace("rerun: 4 ", "rerun: 5 ")
    assert "pull request" in proc.stderr


def test_missing_rerun_is_inserted_at_the_spec_indentation(repo: Path) -> None:
    path = repo / "jobs" / "install-7zip.yaml"
    before = path.read_text()
    proc = rerun(repo, "install-7zip")
    assert proc.returncode == 0, proc.stderr
    removed, added = changed_lines(proc.stdout)
    assert (removed, added) == ([], ["+  rerun: 1"])
    after = path.read_text()
    assert after.startswith(before.rstrip("\n"))  # every original line, comments included, is kept
    assert yaml.safe_load(after)["spec"]["rerun"] == 1
    assert load_repo(repo).valid
    # And again: now the line exists.
    proc = rerun(repo, "install-7zip")
    assert changed_lines(proc.stdout) == (["-  rerun: 1"], ["+  rerun: 2"])


def test_every_example_job_can_be_rerun_with_a_one_line_diff(repo: Path) -> None:
    for path in sorted((repo / "jobs").glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        original = yaml.safe_load(path.read_text())
        proc = rerun(repo, name)
        assert proc.returncode == 0, proc.stderr
        removed, added = changed_lines(proc.stdout)
        assert len(added) == 1 and len(removed) <= 1, proc.stdout
        edited = yaml.safe_load(path.read_text())
        assert edited["spec"]["rerun"] == original["spec"].get("rerun", 0) + 1
        edited["spec"].pop("rerun")
        original["spec"].pop("rerun", None)
        assert edited == original
    assert load_repo(repo).valid


def test_unknown_job_is_a_clear_error(repo: Path) -> None:
    proc = rerun(repo, "install-nothing")
    assert proc.returncode == 1
    assert "no job named 'install-nothing'" in proc.stderr and "install-7zip" in proc.stderr
    assert proc.stdout == ""


def test_not_a_directory(tmp_path: Path) -> None:
    proc = rerun(tmp_path / "missing", "install-7zip")
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_nested_rerun_keys_are_not_touched_and_crlf_is_kept() -> None:
    text = (
        "apiVersion: reconciler/v1\r\n"
        "kind: Job\r\n"
        "metadata:\r\n"
        "    name: x\r\n"
        "spec:\r\n"
        "    jobType: install\r\n"
        "    rollout:\r\n"
        "        rerun: 9\r\n"
        "    # trailing comment in the spec\r\n"
        "\r\n"
        "# end of file\r\n"
    )
    out = raise_rerun(text, 0)
    assert out.splitlines(keepends=True)[8] == "    rerun: 1\r\n"
    assert out.replace("    rerun: 1\r\n", "", 1) == text
    spec = yaml.safe_load(out)["spec"]
    assert spec["rerun"] == 1 and spec["rollout"]["rerun"] == 9


@pytest.mark.parametrize("text, message", [
    ("apiVersion: reconciler/v1\nspec: {jobType: install}\n", "flow style"),
    ("apiVersion: reconciler/v1\nkind: Job\n", "no top-level 'spec:'"),
    ("spec:\n  rerun: &a 3\n", "by hand"),
])
def test_edits_it_cannot_make_safely_are_refused(text: str, message: str) -> None:
    with pytest.raises(RerunError, match=message):
        raise_rerun(text, 3)


def test_a_non_integer_rerun_is_refused_and_the_file_left_alone(repo: Path) -> None:
    path = repo / "jobs" / "install-putty.yaml"
    path.write_text(path.read_text() + '  rerun: "two"\n')
    before = path.read_bytes()
    proc = rerun(repo, "install-putty")
    assert proc.returncode == 1 and "not a non-negative integer" in proc.stderr
    assert path.read_bytes() == before
