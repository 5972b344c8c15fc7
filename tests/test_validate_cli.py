"""``reconciler validate`` as CI runs it: a real subprocess, real directories.

Contract (DESIGN section 7): exit 0 valid, 1 invalid, 2 usage or I/O error;
text lines ``path:line:column: error: message`` then a count; ``--format
json`` for tools; ``--format github`` workflow annotations.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = PROJECT_ROOT / "example-repo"
BAD = Path(__file__).parent / "bad"
ERROR_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+):(?P<column>\d+): error: (?P<message>.+)$")


def validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "reconciler", "validate", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def bad_repo(tmp_path: Path) -> Path:
    """Three bad files: a job, a package and the topology."""
    repo = tmp_path / "repo"
    shutil.copytree(BAD / "three-bad-files", repo, ignore=shutil.ignore_patterns("expected.txt"))
    return repo


def test_example_repo_is_valid(tmp_path: Path) -> None:
    proc = validate(str(EXAMPLE), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "valid: no errors"
    assert proc.stderr == ""


def test_repo_defaults_to_the_current_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    assert validate(cwd=repo).returncode == 0
    (repo / "jobs" / "install-7zip.yaml").write_text("kind: [\n", encoding="utf-8")
    proc = validate(cwd=repo)
    assert proc.returncode == 1
    assert proc.stdout.startswith("jobs/install-7zip.yaml:2:1: error: YAML syntax error")


def test_invalid_repo_prints_one_line_per_error_and_a_count(bad_repo: Path) -> None:
    proc = validate("repo", cwd=bad_repo.parent)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "3 errors"
    parsed = [ERROR_LINE.match(line) for line in lines[:-1]]
    assert all(parsed), lines
    assert [(m["path"], int(m["line"]), int(m["column"])) for m in parsed if m] == [
        ("jobs/install-app.yaml", 6, 12),
        ("packages/app-1.0.yaml", 9, 11),
        ("topology.yaml", 13, 15),
    ]
    assert "unknown parent 'relay-osak'" in lines[2]


def test_a_single_error_is_counted_in_the_singular(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BAD / "topology-self-parent", repo, ignore=shutil.ignore_patterns("expected.txt"))
    proc = validate(str(repo), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == "1 error"


def test_json_format(bad_repo: Path) -> None:
    proc = validate(str(bad_repo), "--format", "json", cwd=bad_repo.parent)
    assert proc.returncode == 1
    document = json.loads(proc.stdout)
    assert set(document) == {"valid", "errors", "warnings"}
    assert document["valid"] is False
    assert len(document["errors"]) == 3
    for error in document["errors"]:
        assert set(error) == {"path", "line", "column", "pointer", "message"}
        assert isinstance(error["line"], int) and isinstance(error["column"], int)
    first = document["errors"][0]
    assert (first["path"], first["line"], first["column"], first["pointer"]) == ("jobs/install-app.yaml", 6, 12, "/spec/jobType")
    assert "'reinstall' is not one of" in first["message"]


def test_json_format_on_a_valid_repo(tmp_path: Path) -> None:
    proc = validate(str(EXAMPLE), "--format=json", cwd=tmp_path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"valid": True, "errors": [], "warnings": []}


def test_github_format(bad_repo: Path) -> None:
    proc = validate("repo", "--format", "github", cwd=bad_repo.parent)
    assert proc.returncode == 1
    annotations = [line for line in proc.stdout.splitlines() if line.startswith("::")]
    assert len(annotations) == 3
    assert annotations[0].startswith("::error file=repo/jobs/install-app.yaml,line=6,col=12::/spec/jobType: ")
    assert annotations[2].startswith("::error file=repo/topology.yaml,line=13,col=15::")
    pattern = re.compile(r"^::error file=[^,:]+,line=\d+,col=\d+::.+$")
    assert all(pattern.match(line) for line in annotations), annotations


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = validate(str(tmp_path / "no-such-repo"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "no-such-repo" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    proc = validate(str(EXAMPLE), "--format", "xml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--format" in proc.stderr
    assert proc.stdout == ""


@pytest.fixture
def repo_with_unread_yaml(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    (repo / "job").mkdir()
    shutil.copy(repo / "jobs" / "install-7zip.yaml", repo / "job" / "typo.yaml")
    shutil.move(repo / "jobs" / "install-7zip.yaml", repo / "jobs" / "install-7zip.YAML")
    shutil.copy(repo / "topology.yaml", repo / "topology-old.yaml")
    return repo


UNREAD = ["job/typo.yaml", "jobs/install-7zip.YAML", "topology-old.yaml"]


def test_yaml_files_that_are_not_read_are_warned_about_in_text(repo_with_unread_yaml: Path) -> None:
    proc = validate(str(repo_with_unread_yaml), cwd=repo_with_unread_yaml)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "valid: no errors (3 warnings)"
    assert [line.split(":", 1)[0] for line in lines[:-1]] == UNREAD
    assert all(": warning: not read: " in line for line in lines[:-1]), lines


def test_yaml_files_that_are_not_read_are_warned_about_in_json(repo_with_unread_yaml: Path) -> None:
    proc = validate(str(repo_with_unread_yaml), "--format", "json", cwd=repo_with_unread_yaml)
    document = json.loads(proc.stdout)
    assert document["valid"] is True and document["errors"] == []
    assert [w["path"] for w in document["warnings"]] == UNREAD
    assert all(w["message"].startswith("not read: ") and w["line"] == 1 for w in document["warnings"])


def test_yaml_files_that_are_not_read_are_warned_about_in_github(repo_with_unread_yaml: Path) -> None:
    proc = validate("repo", "--format", "github", cwd=repo_with_unread_yaml.parent)
    annotations = [line for line in proc.stdout.splitlines() if line.startswith("::")]
    assert [a.split(",", 1)[0] for a in annotations] == [f"::warning file=repo/{path}" for path in UNREAD]


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    for index in range(3000):  # far more output than a pipe buffers
        (repo / "jobs" / f"broken-{index}.yaml").write_text("kind: [\n", encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "validate", str(repo)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # what `| head -1` reads, then it goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"jobs/broken-0.yaml:2:1: error: YAML syntax error")
    assert err == ""
    assert code == 141


@pytest.mark.parametrize("encoding", ["ascii", "cp932"])
def test_a_console_that_cannot_show_a_character_gets_an_escape(tmp_path: Path, encoding: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    text = (repo / "jobs" / "install-7zip.yaml").read_text(encoding="utf-8")
    (repo / "jobs" / "install-7zip.yaml").write_text(text.replace("name: install-7zip", "name: café"),
                                                     encoding="utf-8")
    env = dict(os.environ, PYTHONIOENCODING=encoding)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    for fmt in ("text", "github"):
        proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(repo), "--format", fmt],
                              env=env, capture_output=True, timeout=60, check=False)
        assert proc.returncode == 1 and proc.stderr == b"", proc.stderr
        assert b"'caf\\xe9' is not a valid name" in proc.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(BAD / "three-bad-files")],
                              cwd=PROJECT_ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("reconciler validate: cannot write the output: ") and "Traceback" not in proc.stderr


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_a_folder_its_enclosing_repository_ignores_is_read_as_files(tmp_path: Path) -> None:
    # A project clone with its virtualenv inside: an installed copy of the
    # example repo lies in a folder the clone's .gitignore names.
    clone = tmp_path / "clone"
    clone.mkdir()
    _git("init", "-q", cwd=clone)
    (clone / ".gitignore").write_text(".venv/\n", encoding="utf-8")
    installed = clone / ".venv" / "lib" / "site-packages" / "reconciler" / "example-repo"
    shutil.copytree(EXAMPLE, installed)
    objects_before = _git("count-objects", cwd=clone)
    proc = validate(str(installed), cwd=tmp_path)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "valid: no errors", "")
    # read as files: the bad file counts, and nothing was staged into the clone
    (installed / "jobs" / "install-7zip.yaml").write_text("kind: [\n", encoding="utf-8")
    proc = validate(".", cwd=installed)
    assert proc.returncode == 1
    assert proc.stdout.startswith("jobs/install-7zip.yaml:2:1: error: YAML syntax error")
    assert _git("count-objects", cwd=clone) == objects_before


def test_an_ignored_file_inside_a_tracked_checkout_is_still_not_read(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLE, repo)
    _git("init", "-q", cwd=repo)
    (repo / ".gitignore").write_text("jobs/broken.yaml\n", encoding="utf-8")
    (repo / "jobs" / "broken.yaml").write_text("kind: [\n", encoding="utf-8")
    proc = validate(".", cwd=repo)
    assert (proc.returncode, proc.stdout.strip()) == (0, "valid: no errors")


def reconciler(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_commands_find_the_repo_from_a_subdirectory_as_git_finds_its_own(tmp_path: Path) -> None:
    repo = tmp_path / "desired"
    shutil.copytree(EXAMPLE, repo)
    _git("init", "-q", cwd=repo)
    deep = repo / "artifacts" / "7zip-23.01"
    assert deep.is_dir()
    proc = validate(cwd=deep)
    assert (proc.returncode, proc.stdout.strip()) == (0, "valid: no errors")
    (repo / "jobs" / "install-7zip.yaml").write_text("kind: [\n", encoding="utf-8")
    proc = validate("--format", "github", cwd=repo / "jobs")
    assert proc.returncode == 1
    assert proc.stdout.startswith("::error file=../jobs/install-7zip.yaml,line=2"), proc.stdout
    shutil.copy(EXAMPLE / "jobs" / "install-7zip.yaml", repo / "jobs" / "install-7zip.yaml")
    plan = reconciler("plan", "--inventory", str(PROJECT_ROOT / "examples" / "inventory.json"), cwd=repo / "jobs")
    assert plan.returncode == 0 and "actions on" in plan.stdout, plan.stderr
    rerun = reconciler("rerun", "install-vpn-client", cwd=repo / "packages")
    assert rerun.returncode == 0, rerun.stderr
    assert "+  rerun: 1" in rerun.stdout or "rerun: 1" in (repo / "jobs" / "install-vpn-client.yaml").read_text()


def test_validate_and_rerun_from_folders_of_an_admins_clone(tmp_path: Path) -> None:
    """An admin's clone of the origin, the desired-state repo at its top or in a folder of it."""
    seed = tmp_path / "seed"
    shutil.copytree(EXAMPLE, seed / "fleet")  # a monorepo: the desired state lives in fleet/
    (seed / "README.md").write_text("infrastructure\n", encoding="utf-8")
    _git("init", "-q", "--initial-branch=main", cwd=seed)
    _git("add", "--all", cwd=seed)
    _git("-c", "user.name=Admin", "-c", "user.email=admin@example.org", "commit", "-q", "-m", "seed", cwd=seed)
    _git("init", "-q", "--bare", "--initial-branch=main", "origin.git", cwd=tmp_path)
    _git("push", "-q", str(tmp_path / "origin.git"), "main", cwd=seed)
    _git("clone", "-q", "origin.git", "admin", cwd=tmp_path)
    fleet = tmp_path / "admin" / "fleet"
    nested = fleet / "artifacts" / "7zip-23.01" / "bin"
    for folder in (fleet / "jobs", nested):
        proc = validate(cwd=folder)
        assert (proc.returncode, proc.stdout.strip()) == (0, "valid: no errors"), (folder, proc.stdout, proc.stderr)
    (fleet / "jobs" / "install-7zip.yaml").write_text("kind: [\n", encoding="utf-8")
    for folder in (fleet / "jobs", nested):
        proc = validate(cwd=folder)
        assert proc.returncode == 1
        assert proc.stdout.startswith("jobs/install-7zip.yaml:2:1: error:"), proc.stdout  # as git prints paths
    # At the top of the clone there is no topology at or above (the search stops at .git): said, not guessed.
    top = validate(cwd=tmp_path / "admin")
    assert top.returncode == 1 and top.stdout.startswith("topology.yaml:1:1: error: missing topology.yaml")
    _git("checkout", "-q", "--", "fleet/jobs/install-7zip.yaml", cwd=tmp_path / "admin")
    rerun = reconciler("rerun", "install-vpn-client", cwd=nested)
    assert rerun.returncode == 0, rerun.stderr
    assert _git("status", "--porcelain", cwd=tmp_path / "admin") == " M fleet/jobs/install-vpn-client.yaml\n"
    assert "  rerun: 1\n" in (fleet / "jobs" / "install-vpn-client.yaml").read_text(encoding="utf-8")


def test_the_search_stops_at_the_top_of_a_git_work_tree(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE, tmp_path / "outer")  # a topology above the work tree must not be taken
    inner = tmp_path / "outer" / "inner"
    (inner / "sub").mkdir(parents=True)
    _git("init", "-q", cwd=inner)
    proc = validate(cwd=inner / "sub")
    assert proc.returncode == 1
    assert proc.stdout.startswith("topology.yaml:1:1: error: missing topology.yaml"), proc.stdout


def test_a_repo_that_is_missing_or_a_file_is_named_once_with_the_reason(tmp_path: Path) -> None:
    missing = validate(str(tmp_path / "nowhere"), cwd=tmp_path)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"reconciler validate: cannot read {tmp_path / 'nowhere'}: no such directory\n"
    (tmp_path / "file").write_text("x")
    a_file = validate(str(tmp_path / "file"), cwd=tmp_path)
    assert (a_file.returncode, a_file.stderr) == (
        2, f"reconciler validate: cannot read {tmp_path / 'file'}: not a directory\n")
