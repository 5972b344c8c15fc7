"""``reconciler rerun``: raise spec.rerun (and set spec.rerunScope) in place, keeping everything else byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler import cli
from reconciler.commands.rerun import RerunError, raise_rerun, set_scope
from reconciler.repo_tree import load_repo
from reconciler.resources import example_repo_dir
from reconciler.specs import MAX_RERUN_SCOPE_CLIENTS, RerunScope

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(example_repo_dir(), target)
    return target


def rerun(repo: Path, job: str, *options: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``reconciler rerun JOB [options] REPO`` (REPO after the options, as the README shows it)."""
    where = [str(repo)] if repo != cwd else []
    return subprocess.run([sys.executable, "-m", "reconciler", "rerun", job, *options, *where], cwd=cwd,
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


# ------------------------------------------------------------------ scopes


def _spec(path: Path) -> dict[str, object]:
    spec: dict[str, object] = yaml.safe_load(path.read_text(encoding="utf-8"))["spec"]
    return spec


def test_a_scope_is_written_after_rerun_and_the_repo_still_validates(repo: Path) -> None:
    path = repo / "jobs" / "install-vpn-client.yaml"
    before = path.read_text()
    proc = rerun(repo, "install-vpn-client", "--relay", "relay-osaka", "--client", "pc-fukuoka-001",
                 "--client", "pc-fukuoka-002")
    assert proc.returncode == 0, proc.stderr
    assert changed_lines(proc.stdout) == (["-  rerun: 0"], [
        "+  rerun: 1", "+  rerunScope:", "+    relays: [relay-osaka]", "+    clients: [pc-fukuoka-001, pc-fukuoka-002]"])
    assert path.read_text() == before.replace("  rerun: 0\n", "  rerun: 1\n  rerunScope:\n    relays: [relay-osaka]\n"
                                                              "    clients: [pc-fukuoka-001, pc-fukuoka-002]\n")
    assert "only the Failed clients of relay-osaka (and of the relays below it) and the Failed rows of " \
           "pc-fukuoka-001, pc-fukuoka-002 run again" in proc.stderr
    loaded = load_repo(repo)
    assert loaded.specs is not None
    (job,) = [j for j in loaded.specs.jobs if j.name == "install-vpn-client"]
    assert (job.rerun, job.rerun_scope) == (1, RerunScope(relays=("relay-osaka",),
                                                          clients=("pc-fukuoka-001", "pc-fukuoka-002")))


def test_a_new_scope_replaces_the_old_one_and_a_plain_rerun_removes_it(repo: Path) -> None:
    path = repo / "jobs" / "install-7zip.yaml"
    path.write_text(path.read_text() + (
        "  rerun: 4  # ticket 812\n"
        "  rerunScope:\n"
        "    # the Yokohama PCs after the disk cleanup\n"
        "    relays:\n"
        "      - relay-yokohama\n"
        "\n"
        "    clients: [pc-kanto-007]\n"
        "  # the rollout is paced by the night window\n"
        "  allowDowngrade: false\n"
        "# end of file\n"))
    proc = rerun(repo, "install-7zip", "--client", "pc-kanto-001", "--repair")
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert text.endswith(
        "  rerun: 5  # ticket 812\n"
        "  rerunScope:\n"
        "    clients: [pc-kanto-001]\n"
        "    repair: true\n"
        "  # the rollout is paced by the night window\n"
        "  allowDowngrade: false\n"
        "# end of file\n")
    assert _spec(path)["rerunScope"] == {"clients": ["pc-kanto-001"], "repair": True}
    proc = rerun(repo, "install-7zip")
    assert proc.returncode == 0, proc.stderr
    assert changed_lines(proc.stdout) == (
        ["-  rerun: 5  # ticket 812", "-  rerunScope:", "-    clients: [pc-kanto-001]", "-    repair: true"],
        ["+  rerun: 6  # ticket 812"])
    assert "rerunScope" not in _spec(path) and "every Failed client runs again" in proc.stderr
    assert load_repo(repo).valid


@pytest.mark.parametrize(("options", "code", "message"), [
    (["--repair"], 2, "--repair needs --client"),
    (["--relay", "relay-osaka", "--repair"], 2, "--repair needs --client"),
    (["--relay", "relay-nagoya"], 1, "jobs/install-vpn-client.yaml: unknown relay 'relay-nagoya' (relays in the "
                                     "topology: relay-fukuoka, relay-kanto, relay-osaka, relay-yokohama)"),
    (["--relay", "hq-tokyo"], 1, "unknown relay 'hq-tokyo'"),
    # a relay of the topology that holds no client of the job: the repo would not validate
    (["--relay", "relay-kanto"], 1, "the edit would not validate, so the file is left unchanged"),
    (["--client", "PC-01"], 2, "--client 'PC-01' is not a valid client id"),
    (["--client", "pc-\u00e9"], 2, "--client 'pc-\u00e9' is not a valid client id"),
    (["--client", "pc-1\n"], 2, "is not a valid client id"),
    (["--relay", "../relay-osaka"], 2, "--relay '../relay-osaka' is not a valid relay name"),
    (["--client", "pc-1", "--client", "pc-1"], 2, "--client pc-1 is given twice"),
])
def test_bad_scopes_are_refused_and_the_file_left_alone(repo: Path, options: list[str], code: int,
                                                        message: str) -> None:
    path = repo / "jobs" / "install-vpn-client.yaml"
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    proc = rerun(repo, "install-vpn-client", *options)
    assert (proc.returncode, proc.stdout) == (code, "")
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("reconciler rerun: ")
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


def test_a_relay_outside_the_job_names_the_field_and_the_line_it_would_have(repo: Path) -> None:
    proc = rerun(repo, "install-vpn-client", "--relay", "relay-kanto")
    assert proc.returncode == 1
    assert ("  jobs/install-vpn-client.yaml:18:14: error: /spec/rerunScope/relays/0: relay 'relay-kanto' is "
            "outside this job's destinations") in proc.stderr


def test_a_clients_job_takes_only_its_own_clients(repo: Path) -> None:
    path = repo / "jobs" / "install-office-addin.yaml"
    before = path.read_bytes()
    proc = rerun(repo, "install-office-addin", "--client", "pc-kanto-002")
    assert proc.returncode == 1 and "'pc-kanto-002' is not one of this job's destinations" in proc.stderr
    assert path.read_bytes() == before
    proc = rerun(repo, "install-office-addin", "--client", "pc-osaka-001", "--repair")
    assert proc.returncode == 0, proc.stderr
    assert _spec(path)["rerunScope"] == {"clients": ["pc-osaka-001"], "repair": True}


def test_any_valid_client_id_is_taken_and_read_back_as_written(repo: Path) -> None:
    # Client ids are not in the repo: any id of the right shape is fine, even ones YAML would read as
    # something else unquoted.
    ids = ["no", "123", "null", "on", "1e3", "pc.kanto-1", "0x1f"]
    proc = rerun(repo, "install-7zip", *[f"--client={cid}" for cid in ids])
    assert proc.returncode == 0, proc.stderr
    assert _spec(repo / "jobs" / "install-7zip.yaml")["rerunScope"] == {"clients": ids}
    assert '"no", "123", "null", "on"' in proc.stdout
    assert load_repo(repo).valid


def test_many_clients_go_one_a_line_and_the_bound_is_the_specs(repo: Path, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    path = repo / "jobs" / "install-7zip.yaml"
    many = [f"pc-kanto-{i:05d}" for i in range(MAX_RERUN_SCOPE_CLIENTS)]
    options = [f"--client={cid}" for cid in many]
    assert cli.main(["rerun", "install-7zip", *options, str(repo)]) == 0
    out, _ = capsys.readouterr()
    assert "+    clients:\n+      - pc-kanto-00000\n+      - pc-kanto-00001\n" in out
    assert _spec(path)["rerunScope"] == {"clients": many}
    before = path.read_bytes()
    assert cli.main(["rerun", "install-7zip", *options, "--client=pc-one-more", str(repo)]) == 2
    _, err = capsys.readouterr()
    assert f"at most {MAX_RERUN_SCOPE_CLIENTS} --client options (got {MAX_RERUN_SCOPE_CLIENTS + 1})" in err
    assert path.read_bytes() == before


def test_it_finds_the_repo_from_a_subdirectory_of_a_git_checkout(repo: Path) -> None:
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    proc = rerun(repo, "install-putty", "--relay", "relay-yokohama", cwd=repo / "jobs")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--- a/jobs/install-putty.yaml\n")
    assert _spec(repo / "jobs" / "install-putty.yaml")["rerunScope"] == {"relays": ["relay-yokohama"]}


def test_crlf_and_a_byte_order_mark_are_kept(repo: Path) -> None:
    path = repo / "jobs" / "install-putty.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_text().replace("\n", "\r\n").encode())
    proc = rerun(repo, "install-putty", "--client", "pc-yokohama-001")
    assert proc.returncode == 0, proc.stderr
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"  rerun: 1\r\n  rerunScope:\r\n    clients: [pc-yokohama-001]\r\n")


def test_set_scope_takes_out_a_flow_scope_over_several_lines_wherever_it_is() -> None:
    text = ("spec:\n"
            "  jobType: install\n"
            "  rerunScope: {relays: [a],\n"
            "     clients: [b]}\n"
            "  rerun: 2\n"
            "  suspend: false\n")
    assert set_scope(text, RerunScope(clients=("c",))) == (
        "spec:\n  jobType: install\n  rerun: 2\n  rerunScope:\n    clients: [c]\n  suspend: false\n")
    assert set_scope(text, None) == "spec:\n  jobType: install\n  rerun: 2\n  suspend: false\n"


@pytest.mark.parametrize(("text", "message"), [
    ("spec:\n  rerun: 1\n  rerunScope: {clients: [a]}\n  rerunScope: {clients: [b]}\n", "written twice"),
    ("spec:\n  jobType: install\n", "no 'rerun:' line"),
])
def test_scopes_it_cannot_set_safely_are_refused(text: str, message: str) -> None:
    with pytest.raises(RerunError, match=message):
        set_scope(text, RerunScope(clients=("c",)))


def test_a_scope_whose_anchor_is_used_elsewhere_is_refused_and_the_file_left_alone(repo: Path) -> None:
    path = repo / "jobs" / "install-7zip.yaml"
    path.write_text(path.read_text() + "  rerun: 1\n  rerunScope: &scope {clients: [pc-1]}\nx-copy: *scope\n")
    before = path.read_bytes()
    proc = rerun(repo, "install-7zip", "--client", "pc-2")
    assert proc.returncode == 1
    assert "install-7zip.yaml: could not set spec.rerun and spec.rerunScope safely" in proc.stderr
    assert path.read_bytes() == before
