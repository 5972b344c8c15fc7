"""``validate`` on a working tree and HQ on its commit give the same verdict.

Each case writes a small repo with one trick in it (symbolic links to spec
files and folders, links out of an artifact, loops, mistyped folders), then
loads it twice: from the directory, as ``reconciler validate`` does in CI,
and from a real commit of it pushed to a bare origin, as HQ and the relays
do. Errors and warnings must be equal, and each case names the verdict it
expects, so agreement on a wrong answer fails too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.gitstore import GitStore
from reconciler.repo_tree import load_commit, load_repo
from reconciler.specs import LoadResult

TOPOLOGY = """apiVersion: reconciler/v1
kind: Topology
metadata: {name: acme}
spec:
  headquarters: hq-tokyo
  relays:
    - {name: relay-kanto, parent: hq-tokyo}
"""
PACKAGE = """apiVersion: reconciler/v1
kind: Package
metadata: {name: app-1.0}
spec:
  name: app
  version: "1.0"
  artifact: {path: ARTIFACT}
  installer: {type: files}
"""
JOB = """apiVersion: reconciler/v1
kind: Job
metadata: {name: NAME}
spec:
  jobType: install
  package: {name: app, version: "1.0"}
  destinationType: allLowerClients
  destinations: [relay-kanto]
"""


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _link(root: Path, rel: str, target: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def base(root: Path, artifact: str = "artifacts/app-1.0") -> None:
    _write(root, "topology.yaml", TOPOLOGY)
    _write(root, "packages/app-1.0.yaml", PACKAGE.replace("ARTIFACT", artifact))
    _write(root, "jobs/install-app.yaml", JOB.replace("NAME", "install-app"))
    _write(root, "artifacts/app-1.0/app.txt", "app 1.0\n")


def symlinked_spec_file(root: Path) -> None:
    base(root)
    _write(root, "shared/extra.yaml", JOB.replace("NAME", "extra"))
    _link(root, "jobs/extra.yaml", "../shared/extra.yaml")


def spec_folder_to_usr(root: Path) -> None:
    base(root)
    shutil.rmtree(root / "jobs")
    _link(root, "jobs", "/usr")


def spec_subfolder_link(root: Path) -> None:
    base(root)
    _write(root, "elsewhere/more.yaml", JOB.replace("NAME", "more"))
    _link(root, "packages/more", "../elsewhere")


def artifact_link_loop(root: Path) -> None:
    base(root, artifact="artifacts/loop")
    _link(root, "artifacts/loop", "loop")


def artifact_two_link_loop(root: Path) -> None:
    base(root, artifact="artifacts/a")
    _link(root, "artifacts/a", "b")
    _link(root, "artifacts/b", "a")


def artifact_holds_link_out_of_repo(root: Path) -> None:
    base(root)
    _link(root, "artifacts/app-1.0/escape", "../../../outside")


def artifact_holds_link_into_repo(root: Path) -> None:
    base(root)
    _write(root, "secrets.txt", "not part of the package\n")
    _link(root, "artifacts/app-1.0/config", "../../secrets.txt")


def artifact_holds_link_that_climbs_through_a_link(root: Path) -> None:
    # Lexically "sub/up/.." is "sub", inside; really sub/up is the artifact
    # root, and its ".." is artifacts/: outside the artifact.
    base(root)
    _link(root, "artifacts/app-1.0/sub/up", "..")
    _link(root, "artifacts/app-1.0/climb", "sub/up/..")


def artifact_holds_link_within(root: Path) -> None:
    base(root)
    _link(root, "artifacts/app-1.0/current", "app.txt")


def artifact_path_through_a_link(root: Path) -> None:
    base(root, artifact="artifacts/current")
    _link(root, "artifacts/current", "app-1.0")


def unread_yaml_files(root: Path) -> None:
    base(root)
    _write(root, "job/typo.yaml", JOB.replace("NAME", "typo"))
    _write(root, "jobs/shout.YAML", JOB.replace("NAME", "shout"))
    _write(root, "topology-old.yaml", TOPOLOGY)
    _write(root, ".github/workflows/validate.yml", "on: push\n")
    _write(root, "artifacts/app-1.0/config.yaml", "a: 1\n")


# case -> (set-up, expected (path, start of message) of errors, of warnings)
CASES: dict[str, tuple[Callable[[Path], None], set[tuple[str, str]], set[tuple[str, str]]]] = {
    "symlinked-spec-file": (symlinked_spec_file, {("jobs/extra.yaml", "a spec file must be a regular file")},
                            {("shared/extra.yaml", "not read: specs are read from")}),
    "spec-folder-to-usr": (spec_folder_to_usr, {("jobs", "jobs/ may hold only regular files")}, set()),
    "spec-subfolder-link": (spec_subfolder_link, {("packages/more", "packages/ may hold only regular files")},
                            {("elsewhere/more.yaml", "not read: specs are read from")}),
    "artifact-link-loop": (artifact_link_loop, {("packages/app-1.0.yaml", "/spec/artifact/path: artifact path "
                                                 "'artifacts/loop' is a symbolic link loop")}, set()),
    "artifact-two-link-loop": (artifact_two_link_loop, {("packages/app-1.0.yaml", "/spec/artifact/path: artifact "
                                                         "path 'artifacts/a' is a symbolic link loop")}, set()),
    "artifact-link-out-of-repo": (artifact_holds_link_out_of_repo, {(
        "packages/app-1.0.yaml", "/spec/artifact/path: artifact path 'artifacts/app-1.0' holds a symbolic link "
                                 "that leaves it (escape -> ../../../outside)")}, set()),
    "artifact-link-into-repo": (artifact_holds_link_into_repo, {(
        "packages/app-1.0.yaml", "/spec/artifact/path: artifact path 'artifacts/app-1.0' holds a symbolic link "
                                 "that leaves it (config -> ../../secrets.txt)")}, set()),
    "artifact-link-climbs": (artifact_holds_link_that_climbs_through_a_link, {(
        "packages/app-1.0.yaml", "/spec/artifact/path: artifact path 'artifacts/app-1.0' holds a symbolic link "
                                 "that leaves it (climb -> sub/up/..)")}, set()),
    "artifact-link-within": (artifact_holds_link_within, set(), set()),
    "artifact-path-through-link": (artifact_path_through_a_link, set(), set()),
    "unread-yaml-files": (unread_yaml_files, set(), {
        ("job/typo.yaml", "not read: specs are read from topology.yaml, packages/ and jobs/ only"),
        ("jobs/shout.YAML", "not read: spec files end in .yaml or .yml, in lower case"),
        ("topology-old.yaml", "not read: the topology is read from topology.yaml only"),
    }),
}


def ignored_artifact(root: Path) -> None:
    base(root)
    _write(root, ".gitignore", "artifacts/\n")


def stray_git_file_in_an_artifact(root: Path) -> None:
    base(root)
    _write(root, "artifacts/app-1.0/.git", "gitdir: /nowhere\n")


def ignored_spec_file(root: Path) -> None:
    base(root)
    _write(root, ".gitignore", "jobs/local-*.yaml\n")
    _write(root, "jobs/local-test.yaml", "kind: [\n")  # broken, but never committed


def _commit_base(root: Path) -> None:
    base(root)
    _git("add", "-A", cwd=root)
    _git("commit", "--quiet", "-m", "base", cwd=root)


def assumed_unchanged_spec(root: Path) -> None:
    _commit_base(root)
    _git("update-index", "--assume-unchanged", "jobs/install-app.yaml", cwd=root)
    with open(root / "jobs" / "install-app.yaml", "a", encoding="utf-8") as job:
        job.write("x: [\n")  # git add ignores it: the commit keeps the indexed file


def skipped_worktree_spec(root: Path) -> None:
    _commit_base(root)  # as a sparse checkout leaves it: in the index, not on disk
    _git("update-index", "--skip-worktree", "packages/app-1.0.yaml", cwd=root)
    (root / "packages" / "app-1.0.yaml").unlink()


def spec_in_another_encoding(root: Path) -> None:
    base(root)
    _write(root, ".gitattributes", "jobs/other.yaml working-tree-encoding=UTF-16LE\n")
    (root / "jobs" / "other.yaml").write_bytes(JOB.replace("NAME", "other").encode("utf-16-le"))


# Cases that differ from a plain directory only inside a git work tree: there,
# validate reads what `git add -A` would commit, as HQ will see it.
IN_A_CHECKOUT: dict[str, tuple[Callable[[Path], None], set[tuple[str, str]]]] = {
    "ignored-artifact": (ignored_artifact, {("packages/app-1.0.yaml", "/spec/artifact/path: artifact path "
                                                                      "'artifacts/app-1.0' does not exist")}),
    "stray-git-file-in-an-artifact": (stray_git_file_in_an_artifact, set()),
    "ignored-spec-file": (ignored_spec_file, set()),
    "assumed-unchanged-spec": (assumed_unchanged_spec, set()),
    "skipped-worktree-spec": (skipped_worktree_spec, set()),
    "spec-in-another-encoding": (spec_in_another_encoding, set()),
}


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


def _commit_and_load(repo: Path, tmp_path: Path) -> LoadResult:
    origin = tmp_path / "origin.git"
    _git("init", "--quiet", "--bare", "--initial-branch=main", str(origin), cwd=tmp_path)
    if not (repo / ".git").exists():
        _git("init", "--quiet", "--initial-branch=main", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "--quiet", "--allow-empty", "-m", "specs", cwd=repo)
    _git("push", "--quiet", str(origin), "HEAD:refs/heads/main", cwd=repo)
    store = GitStore(str(origin), tmp_path / "mirror")
    store.fetch()
    commit = store.ref_sha("main")
    assert commit is not None
    return load_commit(store, commit)


def _summary(problems: tuple[object, ...]) -> set[tuple[str, str]]:
    return {(p.path, p.message) for p in problems}  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_and_hq_agree(case: str, tmp_path: Path) -> None:
    setup, errors, warnings = CASES[case]
    repo = tmp_path / "repo"
    repo.mkdir()
    setup(repo)
    on_disk = load_repo(repo)
    at_commit = _commit_and_load(repo, tmp_path)

    assert on_disk.errors == at_commit.errors
    assert on_disk.warnings == at_commit.warnings
    assert on_disk.valid == at_commit.valid == (not errors)
    for expected, got in ((errors, on_disk.errors), (warnings, on_disk.warnings)):
        found = _summary(got)
        assert len(found) == len(expected), found
        for path, start in expected:
            assert any(p == path and m.startswith(start) for p, m in found), (path, start, found)


@pytest.mark.parametrize("case", sorted(IN_A_CHECKOUT))
def test_validate_in_a_checkout_reads_what_git_commits(case: str, tmp_path: Path) -> None:
    setup, errors = IN_A_CHECKOUT[case]
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "--quiet", "--initial-branch=main", cwd=repo)
    setup(repo)
    in_checkout = load_repo(repo)
    at_commit = _commit_and_load(repo, tmp_path)
    assert in_checkout.errors == at_commit.errors
    assert {(e.path, e.message) for e in in_checkout.errors} == errors


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("where", ["jobs/pipe.yaml", "topology.yaml", "artifacts/app-1.0/pipe"])
def test_a_fifo_is_an_error_and_never_opened(where: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    base(repo)
    (repo / where).unlink(missing_ok=True)
    os.mkfifo(repo / where)
    # A subprocess with a generous limit: opening the FIFO would block for ever.
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(repo)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    shown = where if where != "artifacts/app-1.0/pipe" else "packages/app-1.0.yaml"
    assert any(line.startswith(f"{shown}:") for line in proc.stdout.splitlines()), proc.stdout
    assert ("not a regular file" in proc.stdout) or ("which is not a file, folder or symbolic link" in proc.stdout)


def test_an_empty_folder_is_no_artifact_on_disk_or_in_git(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    base(repo, artifact="artifacts/empty")
    (repo / "artifacts" / "empty").mkdir()
    on_disk = load_repo(repo)
    assert [e.message for e in on_disk.errors] == [
        "/spec/artifact/path: artifact path 'artifacts/empty' does not exist"]
    assert on_disk.errors == _commit_and_load(repo, tmp_path).errors


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to hand the checkout over")
def test_a_checkout_git_refuses_to_read_is_an_error_not_a_guess(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "--quiet", "--initial-branch=main", cwd=repo)
    base(repo)
    _write(repo, ".gitignore", "jobs/local.yaml\n")
    _write(repo, "jobs/local.yaml", "kind: [\n")  # ignored: never committed
    shutil.chown(repo, user="nobody")  # git refuses a repository owned by someone else
    for path in repo.rglob("*"):
        os.lchown(path, 65534, -1)
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(repo)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot read it as git would commit it" in proc.stderr and "Traceback" not in proc.stderr
