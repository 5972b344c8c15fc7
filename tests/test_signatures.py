"""Signed commits: HQ's ``--allowed-signers`` gate and ``validate --allowed-signers``, on real git and real keys.

Keys are made here with ``ssh-keygen -t ed25519``, commits are signed with
``git -c gpg.format=ssh -c user.signingkey=KEY commit -S``, and git with
``ssh-keygen`` judges them: nothing is mocked. "ssh-keygen is missing" is a
real PATH without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_hq import ROOT, Origin, break_job, env, git, run_cli
from test_report import assert_valid_status_files

from reconciler import report
from reconciler.gitstore import GitStore
from reconciler.hq import Hq
from reconciler.signatures import COMMIT_PATH, MAX_COMMITS, SignatureGate

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")


class Keys:
    """Two ed25519 keys: ``admin`` is in the allowed-signers file, ``stranger`` is not."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.admin = self._make(root / "admin")
        self.stranger = self._make(root / "stranger")
        public = (root / "admin.pub").read_text().split()
        self.allowed = root / "allowed_signers"
        self.allowed.write_text(f"# who may sign main\nadmin@acme {public[0]} {public[1]}\n")
        self.stranger_fingerprint = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", str(root / "stranger.pub")],
            check=True, capture_output=True, text=True).stdout.split()[1]

    @staticmethod
    def _make(path: Path) -> Path:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                       check=True, capture_output=True)
        return path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def signing(key: Path) -> tuple[str, ...]:
    return ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")


def signed_commit(origin: Origin, key: Path, message: str, edit: Callable[[Path], None] | None = None,
                  push: bool = True) -> str:
    """A commit of the work tree signed with ``key`` (pushed to origin's main unless ``push`` is False)."""
    if edit is not None:
        edit(origin.work)
    git(origin.work, "add", "--all")
    git(origin.work, *signing(key), "commit", "--quiet", "--allow-empty", "-S", "-m", message)
    sha = git(origin.work, "rev-parse", "HEAD").strip()
    if push:
        git(origin.work, "push", "--quiet", "origin", "HEAD:main")
        origin.head = sha
    return sha


def gated(origin: Origin, workdir: Path, keys: Keys, policy: str = "head") -> Hq:
    return Hq(GitStore(str(origin.bare), workdir), signatures=SignatureGate.checked(keys.allowed, policy))


def touch(name: str) -> Callable[[Path], None]:
    return lambda work: (work / "notes").mkdir(exist_ok=True) or (work / "notes" / name).write_text(name)


def validation(origin: Origin) -> dict:
    return origin.yaml("status/hq", "validation.yaml")


def messages(origin: Origin) -> list[str]:
    return [e["message"] for e in validation(origin)["errors"] if e["path"] == COMMIT_PATH]


# ------------------------------------------------------------------ HQ's gate


def test_a_commit_signed_by_an_allowed_key_is_accepted(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    good = signed_commit(origin, keys.admin, "signed by admin")
    hq = gated(origin, tmp_path / "hq", keys)
    result = hq.run_pass()
    assert result.line is not None and f"accepted main {good[:12]}" in result.line
    assert hq.accepted_commit == good
    assert validation(origin) == {"mainCommit": good, "valid": True, "errors": []}
    assert_valid_status_files(origin.files("status/hq"))


def test_an_unsigned_commit_is_rejected_and_the_accepted_commit_stays(origin: Origin, tmp_path: Path,
                                                                      keys: Keys) -> None:
    good = signed_commit(origin, keys.admin, "signed by admin")
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    unsigned = origin.commit("unsigned change", touch("a"))
    result = hq.run_pass()
    assert result.line is not None and f"rejected main {unsigned[:12]}" in result.line
    assert hq.accepted_commit == good
    files = origin.files("status/hq")
    accepted = report.parse_accepted(files["accepted.yaml"])
    assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (good, unsigned, False)
    assert validation(origin)["errors"] == [
        {"path": "(commit)", "line": 1, "column": 1, "message": f"commit {unsigned[:12]} is not signed"}]
    summary = files["summary.md"].decode()
    assert "is invalid and is not applied" in summary
    assert f"- `(commit):1:1` commit {unsigned[:12]} is not signed" in summary
    assert_valid_status_files(files)
    status = run_cli("status", "--origin", str(origin.bare))
    assert f"(commit):1:1: commit {unsigned[:12]} is not signed" in status.stdout, status.stdout + status.stderr


def test_spec_errors_and_signature_errors_appear_together(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    signed_commit(origin, keys.admin, "signed by admin")
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    bad = origin.commit("unsigned and broken", break_job)
    hq.run_pass()
    paths = [e["path"] for e in validation(origin)["errors"]]
    assert paths[0] == COMMIT_PATH and {"jobs/broken.yaml", "jobs/install-7zip.yaml"} <= set(paths)
    assert messages(origin) == [f"commit {bad[:12]} is not signed"]


def test_a_commit_signed_by_an_unknown_key_is_rejected(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    stranger = signed_commit(origin, keys.stranger, "signed by a stranger")
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    assert hq.accepted_commit is None and hq.main_valid is False
    assert messages(origin) == [f"commit {stranger[:12]} is signed by a key not in the allowed signers file "
                                f"({keys.stranger_fingerprint})"]
    assert keys.stranger_fingerprint.startswith("SHA256:")
    assert "No commit has been accepted yet." in origin.files("status/hq")["summary.md"].decode()


def test_a_tampered_signature_is_rejected(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    good = signed_commit(origin, keys.admin, "signed by admin")
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    honest = signed_commit(origin, keys.admin, "install 7-Zip everywhere", touch("b"), push=False)
    raw = subprocess.run(["git", "cat-file", "commit", honest], cwd=origin.work, check=True,
                         capture_output=True).stdout
    assert b"-----BEGIN SSH SIGNATURE-----" in raw
    forged = raw.replace(b"install 7-Zip everywhere", b"install 7-Zip nowhere")  # the signature no longer fits
    path = tmp_path / "forged"
    path.write_bytes(forged)
    tampered = git(origin.work, "hash-object", "-w", "-t", "commit", str(path)).strip()
    git(origin.work, "push", "--quiet", "origin", f"{tampered}:refs/heads/main")
    hq.run_pass()
    assert hq.accepted_commit == good and hq.main_commit == tampered
    assert messages(origin) == [f"commit {tampered[:12]} has a bad signature"]


def _merge_of_unsigned_work(origin: Origin, keys: Keys, sign_merge: bool) -> tuple[str, list[str]]:
    """A feature branch of two unsigned commits merged into main (the merge signed by admin or not)."""
    git(origin.work, "checkout", "--quiet", "-b", "feature")
    brought = [origin.commit(f"feature {n}", touch(f"f{n}")) for n in (1, 2)]
    git(origin.work, "checkout", "--quiet", "main")
    git(origin.work, "reset", "--quiet", "--hard", brought[0] + "~1")
    signed_commit(origin, keys.admin, "meanwhile on main", touch("m"), push=False)
    merge = ["merge", "--quiet", "--no-ff", "-m", "merge feature", "feature"]
    if sign_merge:
        git(origin.work, *signing(keys.admin), *merge[:1], "-S", *merge[1:])
    else:
        git(origin.work, *merge)
    git(origin.work, "push", "--quiet", "--force", "origin", "HEAD:main")
    origin.head = git(origin.work, "rev-parse", "HEAD").strip()
    return origin.head, brought


def test_head_policy_a_signed_merge_vouches_for_the_commits_it_brings_in(origin: Origin, tmp_path: Path,
                                                                         keys: Keys) -> None:
    signed_commit(origin, keys.admin, "signed base")
    hq = gated(origin, tmp_path / "hq", keys, "head")
    hq.run_pass()
    merge, _ = _merge_of_unsigned_work(origin, keys, sign_merge=True)
    hq.run_pass()
    assert hq.accepted_commit == merge
    assert validation(origin)["valid"] is True


def test_all_policy_needs_every_new_commit_signed(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    base = signed_commit(origin, keys.admin, "signed base")
    hq = gated(origin, tmp_path / "hq", keys, "head")  # the example's root commit is unsigned
    hq.run_pass()
    assert hq.accepted_commit == base
    hq.signatures = SignatureGate.checked(keys.allowed, "all")  # from here on: ACCEPTED..TIP
    merge, brought = _merge_of_unsigned_work(origin, keys, sign_merge=True)
    hq.run_pass()
    assert hq.accepted_commit == base and hq.main_valid is False
    assert sorted(messages(origin)) == sorted(
        f"commit {sha[:12]} is not signed (one of the commits {merge[:12]} brings in)" for sha in brought)


def test_all_policy_refuses_more_than_ten_thousand_new_commits(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    base = signed_commit(origin, keys.admin, "signed base")
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    hq.signatures = SignatureGate.checked(keys.allowed, "all")
    count = MAX_COMMITS + 1
    stream = "".join(f"commit refs/heads/main\ncommitter T <t@example.invalid> {1700000000 + n} +0000\n"
                     f"data 4\nc{n % 100:02d}\n" + (f"from {base}\n" if n == 0 else "") + "\n" for n in range(count))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=origin.work, input=stream.encode(), check=True)
    tip = git(origin.work, "rev-parse", "refs/heads/main").strip()
    git(origin.work, "push", "--quiet", "origin", "refs/heads/main:main")
    hq.run_pass()
    assert hq.accepted_commit == base and hq.main_commit == tip and hq.main_valid is False
    assert sorted(messages(origin)) == sorted([
        f"{count} commits to check since the accepted commit for {tip[:12]} under the all signature policy: "
        f"more than {MAX_COMMITS:,} cannot be checked one by one",
        f"commit {tip[:12]} is not signed"])


def test_an_unsigned_merge_is_rejected_under_both_policies(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    base = signed_commit(origin, keys.admin, "signed base")
    hqs = {policy: gated(origin, tmp_path / policy, keys) for policy in ("head", "all")}
    for policy, hq in hqs.items():
        hq.run_pass()
        hq.signatures = SignatureGate.checked(keys.allowed, policy)
    merge, brought = _merge_of_unsigned_work(origin, keys, sign_merge=False)
    for policy, hq in hqs.items():
        hq.run_pass()
        assert hq.accepted_commit == base and hq.main_valid is False
        unsigned = [e.message for e in hq.validation_errors if e.path == COMMIT_PATH]
        assert f"commit {merge[:12]} is not signed" in unsigned
        assert len(unsigned) == (1 if policy == "head" else 1 + len(brought)), policy


def test_all_policy_checks_the_whole_history_before_anything_was_accepted(origin: Origin, tmp_path: Path,
                                                                          keys: Keys) -> None:
    root = origin.head  # the unsigned example commit
    tip = signed_commit(origin, keys.admin, "signed on top")
    hq = gated(origin, tmp_path / "hq", keys, "all")
    hq.run_pass()
    assert hq.accepted_commit is None
    assert messages(origin) == [f"commit {root[:12]} is not signed (one of the commits {tip[:12]} brings in)"]


def test_a_restarted_hq_with_the_gate_keeps_the_accepted_commit_and_judges_new_ones(origin: Origin, tmp_path: Path,
                                                                                    keys: Keys) -> None:
    unsigned = origin.head
    Hq(GitStore(str(origin.bare), tmp_path / "hq")).run_pass()  # no gate yet: accepted unsigned
    hq = gated(origin, tmp_path / "hq", keys)
    hq.run_pass()
    assert (hq.accepted_commit, hq.main_valid) == (unsigned, True)  # not re-judged
    later = origin.commit("unsigned after the gate", touch("c"))
    hq.run_pass()
    assert hq.accepted_commit == unsigned and messages(origin) == [f"commit {later[:12]} is not signed"]


def _path_without_ssh_keygen(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin-without-ssh-keygen"
    bin_dir.mkdir()
    git_path = shutil.which("git")
    assert git_path is not None
    (bin_dir / "git").symlink_to(git_path)
    return str(bin_dir)


def test_without_ssh_keygen_the_evaluation_fails_and_is_not_a_verdict(origin: Origin, tmp_path: Path, keys: Keys,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    signed_commit(origin, keys.admin, "signed by admin")
    gate = SignatureGate.checked(keys.allowed)
    monkeypatch.setenv("PATH", _path_without_ssh_keygen(tmp_path))  # git calls such a signature "bad"
    hq = Hq(GitStore(str(origin.bare), tmp_path / "hq"), signatures=gate)
    result = hq.run_pass()
    assert result.error is not None and "cannot run ssh-keygen" in result.error
    assert hq.accepted_commit is None and hq.main_valid is None
    assert report.parse_accepted(origin.files("status/hq")["accepted.yaml"]).evaluation_error is not None


# ---------------------------------------------------------------- the command line


def test_hq_once_with_allowed_signers(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    good = signed_commit(origin, keys.admin, "signed by admin")
    args = ("hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--once",
            "--allowed-signers", str(keys.allowed), "--signature-policy", "all")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert validation(origin)["valid"] is False  # the unsigned root commit under the all policy
    proc = run_cli(*args[:-1], "head")
    assert proc.returncode == 0, proc.stderr
    assert report.parse_accepted(origin.files("status/hq")["accepted.yaml"]).accepted_commit == good


@pytest.mark.parametrize("content, says", [
    (None, "cannot read the allowed signers file"),
    ("", "has no valid entry"),
    ("admin@acme ssh-ed25519 not-base64!\n# ssh-ed25519 AAAA\n", "has no valid entry"),
])
def test_hq_refuses_to_start_with_a_bad_allowed_signers_file(origin: Origin, tmp_path: Path, content: str | None,
                                                             says: str) -> None:
    allowed = tmp_path / "allowed"
    if content is not None:
        allowed.write_text(content)
    proc = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--once",
                   "--allowed-signers", str(allowed))
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert origin.ref("status/hq") is None


def test_hq_refuses_to_start_without_ssh_keygen(origin: Origin, tmp_path: Path, keys: Keys) -> None:
    proc = subprocess.run([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin.bare), "--workdir",
                           str(tmp_path / "hq"), "--once", "--allowed-signers", str(keys.allowed)],
                          cwd=ROOT, env=env(PATH=_path_without_ssh_keygen(tmp_path)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "ssh-keygen is not on PATH" in proc.stderr, proc.stderr


def test_hq_signature_policy_needs_allowed_signers(origin: Origin, tmp_path: Path) -> None:
    proc = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--once",
                   "--signature-policy", "all")
    assert proc.returncode == 2 and "--signature-policy needs --allowed-signers" in proc.stderr


def validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", "validate", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=120)


def test_validate_checks_the_head_commit(origin: Origin, keys: Keys) -> None:
    unsigned = origin.head
    allowed = ("--allowed-signers", str(keys.allowed))
    proc = validate(".", *allowed, cwd=origin.work)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"(commit):1:1: error: commit {unsigned[:12]} is not signed", "1 error"]
    signed_commit(origin, keys.admin, "signed by admin")
    proc = validate(".", *allowed, cwd=origin.work)
    assert (proc.returncode, proc.stdout.strip()) == (0, "valid: no errors"), proc.stderr
    proc = validate(".", *allowed, "--verify-commits", "HEAD~1", "--format", "github", cwd=origin.work)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"::error title=Commit signature::commit {unsigned[:12]} is not signed",
                                        "1 error"]


def test_validate_checks_every_commit_of_a_range(origin: Origin, keys: Keys) -> None:
    base = origin.head
    first = origin.commit("unsigned", touch("d"))
    stranger = signed_commit(origin, keys.stranger, "signed by a stranger", touch("e"))
    tip = signed_commit(origin, keys.admin, "signed by admin", touch("f"))
    allowed = ("--allowed-signers", str(keys.allowed))
    proc = validate(".", *allowed, "--verify-commits", f"{base}..{tip}", cwd=origin.work)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[-1] == "2 errors" and sorted(lines[:-1]) == sorted([
        f"(commit):1:1: error: commit {stranger[:12]} is signed by a key not in the allowed signers file "
        f"({keys.stranger_fingerprint})",
        f"(commit):1:1: error: commit {first[:12]} is not signed",
    ])
    proc = validate(".", *allowed, "--verify-commits", f"{stranger}..{tip}", "--format", "github", cwd=origin.work)
    assert (proc.returncode, proc.stdout.strip()) == (0, "valid: no errors"), proc.stderr
    # spec errors of the work tree and signature errors together
    break_job(origin.work)
    proc = validate(".", *allowed, "--verify-commits", f"{base}..{first}", "--format", "github", cwd=origin.work)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == f"::error title=Commit signature::commit {first[:12]} is not signed"
    assert any(re.match(r"::error file=.*jobs/broken\.yaml,", line) for line in lines)


@pytest.mark.parametrize("extra, says", [
    (("--verify-commits", "no-such-branch"), "no commit 'no-such-branch'"),
    (("--verify-commits", "HEAD...HEAD"), "takes REV or BASE..TIP"),
])
def test_validate_a_bad_revision_is_a_usage_error(origin: Origin, keys: Keys, extra: tuple[str, ...],
                                                  says: str) -> None:
    proc = validate(".", "--allowed-signers", str(keys.allowed), *extra, cwd=origin.work)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_validate_with_a_bad_allowed_signers_file_or_outside_git_exits_2(origin: Origin, tmp_path: Path,
                                                                          keys: Keys) -> None:
    proc = validate(".", "--allowed-signers", str(keys.admin) + ".pub", cwd=origin.work)
    assert proc.returncode == 2 and "has no valid entry" in proc.stderr, proc.stderr
    proc = validate(".", "--allowed-signers", str(tmp_path / "missing"), cwd=origin.work)
    assert proc.returncode == 2 and "cannot read the allowed signers file" in proc.stderr, proc.stderr
    plain = tmp_path / "plain"
    shutil.copytree(origin.work, plain, ignore=shutil.ignore_patterns(".git"))
    proc = validate(str(plain), "--allowed-signers", str(keys.allowed), cwd=tmp_path)
    assert proc.returncode == 2 and "is not in a git work tree" in proc.stderr, proc.stderr
    proc = validate(".", "--verify-commits", "HEAD", cwd=origin.work)
    assert proc.returncode == 2 and "--verify-commits needs --allowed-signers" in proc.stderr, proc.stderr
