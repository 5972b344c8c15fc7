"""``reconciler init`` and ``reconciler schemas export``: a new desired-state repo that works as it stands.

Everything runs the real command line in a subprocess. The modelines of the
scaffold's spec files are followed as an editor follows them (relative to
the file) and handed to a real JSON Schema tool, ``check-jsonschema`` (a
test dependency), with every proxy variable pointing at a closed port: the
schemas resolve from the repo itself, offline.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.commands.init import scaffold, source_of
from reconciler.resources import pre_commit_hooks_file, schemas_dir

SPEC_FILES = ("topology.yaml", "packages/hello-1.0.yaml", "jobs/install-hello.yaml")
SPEC_SCHEMAS = ("topology.schema.json", "package.schema.json", "job.schema.json")
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def reconciler(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def check_jsonschema(schema: Path, document: Path) -> subprocess.CompletedProcess[str]:
    dead = "http://127.0.0.1:9"  # nothing listens there: any download fails
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")}
    env.update({"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead, "http_proxy": dead, "https_proxy": dead})
    return subprocess.run([str(CHECK_JSONSCHEMA), "--schemafile", str(schema), str(document)],
                          capture_output=True, text=True, env=env, timeout=120)


def modeline_schema(path: Path) -> Path:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    return (path.parent / first[len(prefix):]).resolve()


def installed() -> tuple[str, str]:
    (name, *_) = importlib.metadata.packages_distributions()["reconciler"]
    metadata = importlib.metadata.metadata(name)
    return metadata["Name"], metadata["Version"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("init") / "fleet"
    done = reconciler("init", str(root))
    assert done.returncode == 0, done.stderr
    return root


def test_the_scaffold_validates_right_away(repo: Path) -> None:
    done = reconciler("validate", str(repo))
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip() == "valid: no errors"


def test_the_scaffold_holds_one_of_each_and_the_tooling(repo: Path) -> None:
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert files == sorted([*SPEC_FILES, "artifacts/hello-1.0/README.txt", ".github/workflows/validate.yml",
                            ".pre-commit-config.yaml", "README.md", *(f"schemas/{s}" for s in SPEC_SCHEMAS)])
    topology = yaml.safe_load((repo / "topology.yaml").read_text(encoding="utf-8"))
    assert [relay["parent"] for relay in topology["spec"]["relays"]] == [topology["spec"]["headquarters"]]


def test_init_in_the_current_directory(tmp_path: Path) -> None:
    done = reconciler("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert reconciler("validate", str(tmp_path)).returncode == 0


def test_the_vendored_schemas_are_the_shipped_ones(repo: Path) -> None:
    for name in SPEC_SCHEMAS:
        assert (repo / "schemas" / name).read_bytes() == (schemas_dir() / name).read_bytes(), name


@pytest.mark.parametrize("spec", SPEC_FILES)
def test_the_modelines_resolve_in_the_repo_and_a_real_tool_accepts_the_file(repo: Path, spec: Path) -> None:
    schema = modeline_schema(repo / spec)
    assert schema.parent == (repo / "schemas").resolve()  # the repo's copy, not a URL or the installation's
    assert schema.is_file()
    done = check_jsonschema(schema, repo / spec)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok -- validation done" in done.stdout


@pytest.mark.parametrize(("spec", "old", "new", "field"), [
    ("jobs/install-hello.yaml", "  jobType: install\n", "  jobType: install\n  suspend: yes\n", "$.spec.suspend"),
    ("jobs/install-hello.yaml", "  jobType: install\n", "  jobType: reinstall\n", "$.spec.jobType"),
    ("packages/hello-1.0.yaml", "    type: files\n", "    type: files\n    shell: bash\n", "$.spec.installer"),
    ("topology.yaml", "  headquarters: hq-main\n", "  headquarters: HQ Main\n", "$.spec.headquarters"),
])
def test_a_broken_spec_is_rejected_by_the_real_tool_and_by_validate(tmp_path: Path, spec: str, old: str, new: str,
                                                                    field: str) -> None:
    assert reconciler("init", str(tmp_path)).returncode == 0
    path = tmp_path / spec
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")
    done = check_jsonschema(modeline_schema(path), path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert field in done.stdout
    validated = reconciler("validate", str(tmp_path))
    assert validated.returncode == 1
    assert validated.stdout.startswith(f"{spec}:")


def test_the_workflow_installs_the_running_version_and_validates(repo: Path) -> None:
    name, version = installed()
    text = (repo / ".github/workflows/validate.yml").read_text(encoding="utf-8")
    workflow: Any = yaml.safe_load(text)
    runs = [step["run"] for step in workflow["jobs"]["validate"]["steps"] if "run" in step]
    assert runs == [f'pip install "{name}=={version}"', "reconciler validate . --format github"]
    # these tests run from a checkout (pip install -e .): nobody else can install from it, and the file says so
    assert "installed from a local directory" in text


@pytest.mark.parametrize(("direct", "requirement", "installable"), [
    (None, "reconciler-gitops==0.1.0", True),  # by name from an index
    ({"url": "https://git.example.org/it/reconciler.git",
      "vcs_info": {"vcs": "git", "commit_id": "0123abc", "requested_revision": "v0.1.0"}},
     "reconciler-gitops @ git+https://git.example.org/it/reconciler.git@0123abc", True),
    ({"url": "file:///home/admin/reconciler", "vcs_info": {"vcs": "git", "commit_id": "0123abc"}},
     "reconciler-gitops @ git+file:///home/admin/reconciler@0123abc", False),
    ({"url": "https://files.example.org/reconciler_gitops-0.1.0-py3-none-any.whl",
      "archive_info": {"hashes": {"sha256": "00"}}},
     "reconciler-gitops @ https://files.example.org/reconciler_gitops-0.1.0-py3-none-any.whl", True),
    ({"url": "file:///home/admin/reconciler", "dir_info": {"editable": True}}, "reconciler-gitops==0.1.0", False),
    ({"url": "file:///tmp/reconciler_gitops-0.1.0-py3-none-any.whl", "archive_info": {}},
     "reconciler-gitops==0.1.0", False),
])
def test_the_pin_follows_where_the_running_installation_came_from(direct: Any, requirement: str,
                                                                 installable: bool) -> None:
    source = source_of("reconciler-gitops", "0.1.0", direct)
    assert (source.requirement, source.installable) == (requirement, installable)
    workflow = yaml.safe_load(scaffold("reconciler-gitops", "0.1.0", source)[".github/workflows/validate.yml"])
    assert workflow["jobs"]["validate"]["steps"][2]["run"] == f'pip install "{requirement}"'
    config = yaml.safe_load(scaffold("reconciler-gitops", "0.1.0", source)[".pre-commit-config.yaml"])
    (hook,) = config["repos"][0]["hooks"]
    if installable:
        assert hook["language"] == "python" and hook["additional_dependencies"] == [requirement]
    else:  # nothing to install the pin from: the reconciler on the committer's PATH
        assert hook["language"] == "system" and "additional_dependencies" not in hook


def test_the_pre_commit_config_uses_the_projects_hook_at_this_version(repo: Path) -> None:
    name, version = installed()
    (hook_definition,) = yaml.safe_load(pre_commit_hooks_file().read_text(encoding="utf-8"))
    config: Any = yaml.safe_load((repo / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    (entry,) = config["repos"]
    (hook,) = entry["hooks"]
    assert hook["id"] == hook_definition["id"] == "reconciler-validate"
    if entry["repo"] == "local" and hook["language"] == "system":  # installed from this checkout: nothing to pin
        assert {k: v for k, v in hook.items() if k != "language"} == \
            {k: v for k, v in hook_definition.items() if k not in ("description", "language")}
    elif entry["repo"] == "local":  # no repository URL in the metadata: the same hook, pinned by its dependency
        assert hook["additional_dependencies"] == [f"{name}=={version}"]
        assert {k: v for k, v in hook.items() if k != "additional_dependencies"} == \
            {k: v for k, v in hook_definition.items() if k != "description"}
    else:
        assert entry["rev"] == f"v{version}"
    # and pre-commit itself (a test dependency) accepts the file
    done = subprocess.run([str(Path(sys.executable).with_name("pre-commit")), "validate-config",
                           str(repo / ".pre-commit-config.yaml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_init_refuses_a_repo_that_holds_specs_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mine.yaml").write_text("kind: Job\n", encoding="utf-8")
    done = reconciler("init", str(tmp_path))
    assert done.returncode == 2
    assert "already holds specs (jobs/mine.yaml)" in done.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["jobs", "jobs/mine.yaml"]


def test_init_twice_overwrites_nothing(repo: Path, tmp_path: Path) -> None:
    assert reconciler("init", str(tmp_path)).returncode == 0
    topology = tmp_path / "topology.yaml"
    topology.write_text(topology.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    done = reconciler("init", str(tmp_path))
    assert done.returncode == 2
    assert "already holds specs (topology.yaml, packages/hello-1.0.yaml, jobs/install-hello.yaml)" in done.stderr
    assert topology.read_text(encoding="utf-8").endswith("# edited\n")


def test_init_keeps_other_files_that_exist(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# ours\n", encoding="utf-8")
    done = reconciler("init", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "# ours\n"
    assert f"kept {tmp_path / 'README.md'}" in done.stdout
    assert reconciler("validate", str(tmp_path)).returncode == 0


def test_init_refuses_a_file_as_its_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    done = reconciler("init", str(tmp_path / "file"))
    assert done.returncode == 2
    assert "is not a directory" in done.stderr


def test_schemas_export_writes_and_refreshes_the_spec_schemas(tmp_path: Path) -> None:
    target = tmp_path / "schemas"
    done = reconciler("schemas", "export", str(target))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(SPEC_SCHEMAS)
    (target / "job.schema.json").write_text("{}", encoding="utf-8")  # an older version's
    assert reconciler("schemas", "export", str(target)).returncode == 0
    for name in SPEC_SCHEMAS:
        assert (target / name).read_bytes() == (schemas_dir() / name).read_bytes(), name


def test_schemas_export_says_when_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    done = reconciler("schemas", "export", str(tmp_path / "file"))
    assert done.returncode == 2
    assert done.stderr.startswith("reconciler schemas export: cannot write")


def test_pre_commit_runs_the_scaffolds_hook_and_it_catches_a_broken_spec(tmp_path: Path) -> None:
    # The scaffold's configuration as written, except that pre-commit runs the reconciler installed next to
    # this Python (language: system) instead of installing the pinned one from an index: no network.
    root = tmp_path / "fleet"
    assert reconciler("init", str(root)).returncode == 0
    config: Any = yaml.safe_load((root / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    for entry in config["repos"]:
        if entry["repo"] != "local":  # a repository URL: declare its hook locally, from the shipped definition
            (definition,) = yaml.safe_load(pre_commit_hooks_file().read_text(encoding="utf-8"))
            entry.clear()
            entry.update({"repo": "local", "hooks": [definition]})
        for hook in entry["hooks"]:
            hook.update(language="system")
            hook.pop("additional_dependencies", None)
    (root / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "GIT_AUTHOR_NAME": "Admin", "GIT_AUTHOR_EMAIL": "admin@example.org",
           "GIT_COMMITTER_NAME": "Admin", "GIT_COMMITTER_EMAIL": "admin@example.org",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "PRE_COMMIT_HOME": str(tmp_path / "home"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True, timeout=300)

    assert run("git", "init", "-q", "--initial-branch=main").returncode == 0
    assert run("git", "add", "--all").returncode == 0
    passed = run(sys.executable, "-m", "pre_commit", "run", "--all-files")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "reconciler validate" in passed.stdout and "Passed" in passed.stdout
    job = root / "jobs" / "install-hello.yaml"
    job.write_text(job.read_text(encoding="utf-8").replace("  jobType: install\n", "  jobType: install\n"
                                                           "  suspend: yes\n"), encoding="utf-8")
    assert run("git", "add", "jobs").returncode == 0
    failed = run(sys.executable, "-m", "pre_commit", "run")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "jobs/install-hello.yaml:" in failed.stdout and "/spec/suspend: expected boolean" in failed.stdout
