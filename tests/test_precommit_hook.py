"""The ``reconciler-validate`` pre-commit hook, run by pre-commit itself in a real git repo.

The hook runs when a commit touches what validate reads or reports, and
judges the whole repo; a commit of other files skips it. pre-commit runs it
from a ``repo: local`` copy of the hook in ``.pre-commit-hooks.yaml`` with
``language: system`` (the ``reconciler`` installed next to this Python), so
the test needs no network; everything else about the hook is as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example-repo"
HOOKS = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
HOOK = next(hook for hook in HOOKS if hook["id"] == "reconciler-validate")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env=git_env()).stdout


def git_env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, GIT_AUTHOR_NAME="Admin", GIT_AUTHOR_EMAIL="admin@example.org",
               GIT_COMMITTER_NAME="Admin", GIT_COMMITTER_EMAIL="admin@example.org",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    out.update(extra)
    return out


class Repo:
    """A desired-state repo with the hook configured; ``run()`` is ``pre-commit run`` on what is staged."""

    def __init__(self, root: Path) -> None:
        self.path = root / "desired"
        self.home = root / "pre-commit-home"
        shutil.copytree(EXAMPLE, self.path)
        local = dict(HOOK, language="system")
        config = {"repos": [{"repo": "local", "hooks": [local]}]}
        (self.path / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        git(self.path, "init", "-q", "--initial-branch=main")
        git(self.path, "add", "--all")
        git(self.path, "commit", "-q", "-m", "desired state")

    def run(self) -> subprocess.CompletedProcess[str]:
        bin_dir = str(Path(sys.executable).parent)  # the reconciler installed with this Python comes first
        env = git_env(PRE_COMMIT_HOME=str(self.home), PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        return subprocess.run([sys.executable, "-m", "pre_commit", "run"], cwd=self.path, env=env,
                              capture_output=True, text=True, timeout=300)

    def commit(self) -> None:
        git(self.path, "commit", "-q", "--no-verify", "-m", "change")


def ran(proc: subprocess.CompletedProcess[str]) -> str:
    """``Skipped``, ``Passed`` or ``Failed``: pre-commit's verdict on the hook."""
    match = re.search(r"^reconciler validate\.+(?:\(no files to check\))?(Skipped|Passed|Failed)$", proc.stdout,
                      re.MULTILINE)
    assert match is not None, proc.stdout + proc.stderr
    return match.group(1)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


def test_the_hook_manifest_is_valid_for_pre_commit() -> None:
    proc = subprocess.run([sys.executable, "-m", "pre_commit", "validate-manifest", ".pre-commit-hooks.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert HOOK["entry"] == "reconciler validate"
    assert HOOK["pass_filenames"] is False
    assert not HOOK.get("always_run", False)  # it would run on every commit, whatever the files filter says


def test_a_commit_of_other_files_skips_it_even_when_the_repo_is_invalid(repo: Repo) -> None:
    # A broken job already committed: a hook that ran would fail, so "Skipped" is the files filter's doing.
    (repo.path / "jobs" / "install-7zip.yaml").write_text("kind: [\n", encoding="utf-8")
    git(repo.path, "add", "jobs")
    repo.commit()
    (repo.path / "README.md").write_text("notes\n", encoding="utf-8")
    (repo.path / ".github" / "workflows" / "validate.yml").write_text("on: push\n", encoding="utf-8")
    git(repo.path, "add", "README.md", ".github")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Skipped", 0)


def test_a_staged_spec_change_runs_it_on_the_whole_repo(repo: Repo) -> None:
    job = repo.path / "jobs" / "install-7zip.yaml"
    job.write_text(job.read_text(encoding="utf-8").replace("name: install-7zip", "name: Install_7zip"),
                   encoding="utf-8")
    git(repo.path, "add", "jobs")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Failed", 1)
    assert "jobs/install-7zip.yaml:" in proc.stdout and "error:" in proc.stdout
    repo.commit()
    # An artifact change runs it too, and it judges the whole repo: the job broken above still fails it.
    (repo.path / "artifacts" / "putty-0.81" / "putty.txt").write_text("0.81 rebuilt\n", encoding="utf-8")
    git(repo.path, "add", "artifacts")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Failed", 1)
    assert "jobs/install-7zip.yaml:" in proc.stdout


def test_a_valid_spec_change_passes_and_a_misplaced_spec_shows_its_warning(repo: Repo) -> None:
    (repo.path / "topology.yaml").write_text((repo.path / "topology.yaml").read_text(encoding="utf-8")
                                             + "# reviewed\n", encoding="utf-8")
    git(repo.path, "add", "topology.yaml")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Passed", 0)
    repo.commit()
    (repo.path / "job").mkdir()
    shutil.copy(repo.path / "jobs" / "install-putty.yaml", repo.path / "job" / "install-putty-2.yaml")
    git(repo.path, "add", "job")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Passed", 0)
    assert "job/install-putty-2.yaml:1:1: warning: not read" in proc.stdout


def test_a_symbolic_link_staged_as_a_spec_runs_it(repo: Repo) -> None:
    (repo.path / "packages" / "alias.yaml").symlink_to("7zip-23.01.yaml")
    git(repo.path, "add", "packages")
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Failed", 1)
    assert "packages/alias.yaml:1:1: error: a spec file must be a regular file" in proc.stdout


def test_a_commit_that_only_deletes_a_spec_skips_it_as_documented(repo: Repo) -> None:
    # pre-commit passes no deleted files; README says CI's validate judges such a commit.
    git(repo.path, "rm", "-q", "packages/vcredist-14.38.yaml")  # install-vcredist now names a missing package
    proc = repo.run()
    assert (ran(proc), proc.returncode) == ("Skipped", 0)
    validate = subprocess.run([sys.executable, "-m", "reconciler", "validate"], cwd=repo.path, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert validate.returncode == 1, validate.stdout


@pytest.mark.parametrize("path, runs", [
    ("topology.yaml", True),
    ("topology.yml", True),
    ("packages/7zip-23.01.yaml", True),
    ("packages/office/addin-2.4.0.yml", True),
    ("packages/README.md", True),
    ("jobs/install-7zip.yaml", True),
    ("jobs/install-7zip.YAML", True),  # validate warns about the suffix
    ("job/typo.yaml", True),  # validate warns: not read
    ("topology-old.yaml", True),
    ("artifacts/7zip-23.01/bin/7z.txt", True),
    ("README.md", False),
    ("docs/how-we-work.md", False),
    (".github/workflows/validate.yml", False),
    (".pre-commit-config.yaml", False),
    ("tools/.cache/x.yaml", False),
    ("scripts/sync.sh", False),
    ("packagesx", False),
])
def test_the_files_filter(path: str, runs: bool) -> None:
    assert (re.search(HOOK["files"], path) is not None) == runs


def test_the_documented_rev_is_the_release_tag_of_this_version() -> None:
    """``rev:`` in the hook's documentation is ``v<version>``, the tag each release gets."""
    found = {}
    for name in ("README.md", ".pre-commit-hooks.yaml"):
        text = (ROOT / name).read_text(encoding="utf-8")
        found[name] = re.findall(r"^[#\s]*-?\s*repo: .*\n[#\s]*rev: (\S+)$", text, re.MULTILINE)
    assert all(found.values()), found  # both documents show the snippet
    assert {rev for revs in found.values() for rev in revs} == {f"v{VERSION}"}
