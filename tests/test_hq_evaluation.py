"""HQ records only evaluations it finished: a failed one is retried, and never reported as valid.

Real git throughout (a bare origin in a temp dir). The fault is injected at
one boundary: a :class:`GitStore` whose reads at one commit raise, or a
real git failure (a blob missing from HQ's mirror) for the command line.
Time is HQ's injected clock; the service test polls with a deadline.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from test_hq import ROOT, Origin, _Lines, _wait_until, break_job, env, git, run_cli
from test_report import assert_valid_status_files

from reconciler import hq as hq_module
from reconciler import report
from reconciler.errors import FIRST_RETRY_SECONDS
from reconciler.gitstore import GitError, GitStore
from reconciler.hq import Hq, PassResult

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FaultyStore(GitStore):
    """A GitStore whose every read at a broken commit raises, as a failing disk or a bug would."""

    def __init__(self, origin: str, workdir: Path) -> None:
        super().__init__(origin, workdir)
        self.broken: dict[str, BaseException] = {}
        self.failures: Counter[str] = Counter()  # raising reads per commit: one per evaluation attempt

    def _check(self, commits: Sequence[str]) -> None:
        for commit in commits:
            if commit in self.broken:
                self.failures[commit] += 1
                raise self.broken[commit]

    def read_files(self, commit: str, prefixes: Sequence[str] = ("",), max_size: int | None = None) -> dict[str, bytes]:
        self._check([commit])
        return super().read_files(commit, prefixes, max_size)

    def read_file(self, commit: str, path: str) -> bytes | None:
        self._check([commit])
        return super().read_file(commit, path)

    def read_paths(self, requests: Sequence[tuple[str, str]]) -> list[bytes | None]:
        self._check([commit for commit, _ in requests])
        return super().read_paths(requests)

    def list_tree(self, commit: str) -> list[tuple[str, str, str | None]]:
        self._check([commit])
        return super().list_tree(commit)

    def path_kind(self, commit: str, path: str) -> str | None:
        self._check([commit])
        return super().path_kind(commit, path)

    def symlink_target(self, commit: str, path: str) -> str | None:
        self._check([commit])
        return super().symlink_target(commit, path)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


def accepted_yaml(origin: Origin) -> report.Accepted:
    return report.parse_accepted(origin.files("status/hq")["accepted.yaml"])


def assert_never_reported(origin: Origin, commit: str) -> None:
    """status/hq neither accepts nor validates ``commit``: no file names it as evaluated."""
    accepted = accepted_yaml(origin)
    assert accepted.accepted_commit != commit
    assert accepted.main_commit != commit, f"status/hq reports {commit[:12]} as evaluated (mainValid " \
                                           f"{accepted.main_valid}) although its evaluation failed"
    assert origin.yaml("status/hq", "validation.yaml")["mainCommit"] != commit


def run_like_the_service(hq: Hq) -> PassResult | None:
    """One pass as the long-running loop runs it: whatever a pass raises is logged and the loop goes on."""
    try:
        return hq.run_pass()
    except Exception:  # noqa: BLE001 - the service's own behaviour
        return None


def change_readme(work: Path) -> None:
    (work / "README.md").write_text("a change HQ accepts\n")


@pytest.mark.parametrize(("change", "valid"), [(change_readme, True), (break_job, False)],
                         ids=["valid-commit", "invalid-commit"])
def test_a_failed_evaluation_is_never_published_as_valid_and_is_retried_with_backoff(
        origin: Origin, tmp_path: Path, change: Callable[[Path], None], valid: bool) -> None:
    clock = Clock()
    store = FaultyStore(str(origin.bare), tmp_path / "hq")
    hq = Hq(store, clock=clock)
    good = origin.head
    hq.run_pass()
    accepted_at = accepted_yaml(origin).accepted_at

    new = origin.commit("a commit HQ cannot read yet", change)
    store.broken[new] = GitError("git cat-file failed: object unreadable")
    run_like_the_service(hq)
    assert_never_reported(origin, new)
    run_like_the_service(hq)  # the next pass must not take the commit as evaluated
    assert_never_reported(origin, new)

    # Nothing moved, and status/hq says which commit could not be evaluated and why.
    assert (hq.main_commit, hq.main_valid, hq.accepted_commit, hq.validation_errors) == (good, True, good, ())
    files = origin.files("status/hq")
    assert accepted_yaml(origin) == report.Accepted(
        good, accepted_at, good, True, report.EvaluationError(new, "git cat-file failed: object unreadable"))
    assert origin.yaml("status/hq", "validation.yaml") == {"mainCommit": good, "valid": True, "errors": []}
    summary = files["summary.md"].decode()
    assert f"main `{new[:12]}` could not be evaluated" in summary and "object unreadable" in summary
    assert_valid_status_files(files)

    # Retried on HQ's clock: 5 s, then 10 s, then 20 s; nothing new to publish between attempts.
    commits = origin.count("status/hq")
    assert store.failures[new] == 1 and hq.seconds_until_retry() == FIRST_RETRY_SECONDS
    clock.advance(4)
    assert hq.run_pass().error is None and store.failures[new] == 1
    clock.advance(1)
    result = hq.run_pass()
    assert result.error is not None and new[:12] in result.error and store.failures[new] == 2
    assert hq.seconds_until_retry() == 10
    clock.advance(9)
    hq.run_pass()
    assert store.failures[new] == 2
    clock.advance(1)
    hq.run_pass()
    assert store.failures[new] == 3 and hq.seconds_until_retry() == 20
    assert origin.count("status/hq") == commits
    assert_never_reported(origin, new)

    # The fault clears: the next due attempt evaluates the commit for real.
    del store.broken[new]
    clock.advance(20)
    result = hq.run_pass()
    assert result.error is None and result.published is not None
    accepted = accepted_yaml(origin)
    assert accepted.evaluation_error is None and hq.seconds_until_retry() is None
    validation = origin.yaml("status/hq", "validation.yaml")
    if valid:
        assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (new, new, True)
        assert accepted.accepted_at == T0 + timedelta(seconds=35)
        assert validation == {"mainCommit": new, "valid": True, "errors": []}
    else:
        assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (good, new, False)
        assert validation["mainCommit"] == new and validation["valid"] is False
        assert {e["path"] for e in validation["errors"]} == {"jobs/broken.yaml", "jobs/install-7zip.yaml"}
    assert_valid_status_files(origin.files("status/hq"))


def test_any_exception_counts_as_a_failed_evaluation_and_a_newer_commit_is_tried_at_once(
        origin: Origin, tmp_path: Path) -> None:
    clock = Clock()
    store = FaultyStore(str(origin.bare), tmp_path / "hq")
    hq = Hq(store, clock=clock)
    hq.run_pass()

    stuck = origin.commit("a commit whose evaluation runs out of memory", change_readme)
    store.broken[stuck] = MemoryError()
    result = run_like_the_service(hq)
    assert result is not None and result.error is not None
    assert_never_reported(origin, stuck)
    error = accepted_yaml(origin).evaluation_error
    assert error == report.EvaluationError(stuck, "internal error: MemoryError")
    assert error is not None and error.reason == "internal"  # a bug: HQ retries it with backoff

    # main moves on: the new commit is evaluated in the next pass, with no backoff to wait out.
    newer = origin.commit("the next commit", lambda w: (w / "README.md").write_text("newer\n"))
    result = hq.run_pass()
    assert result.error is None and store.failures[stuck] == 1
    accepted = accepted_yaml(origin)
    assert (accepted.accepted_commit, accepted.main_commit, accepted.evaluation_error) == (newer, newer, None)

    # main is reset to the commit evaluated last while a retry is pending: nothing is left to retry.
    broken = origin.commit("fails again", lambda w: (w / "README.md").write_text("again\n"))
    store.broken[broken] = RuntimeError("a bug")
    assert hq.run_pass().error is not None
    failed = report.EvaluationError(broken, "internal error: RuntimeError: a bug")
    assert accepted_yaml(origin).evaluation_error == failed
    git(origin.work, "push", "--quiet", "--force", "origin", f"{newer}:main")
    assert hq.run_pass().error is None and hq.seconds_until_retry() is None
    assert accepted_yaml(origin).evaluation_error is None


def test_a_restarted_hq_whose_first_evaluation_fails_keeps_the_last_evaluated_commit(
        origin: Origin, tmp_path: Path) -> None:
    first = Hq(GitStore(str(origin.bare), tmp_path / "hq-1"))
    first.run_pass()
    bad = origin.commit("break a job", break_job)
    first.run_pass()  # rejected: main is bad, invalid, with its errors
    before = origin.files("status/hq")

    store = FaultyStore(str(origin.bare), tmp_path / "hq-2")
    store.broken[bad] = GitError("git ls-tree failed: disk I/O error")
    result = Hq(store, clock=Clock()).run_pass()  # a new process, empty workdir
    assert result.error is not None
    after = origin.files("status/hq")
    assert accepted_yaml(origin) == report.Accepted(
        first.accepted_commit, first.accepted_at, bad, False,
        report.EvaluationError(bad, "git ls-tree failed: disk I/O error"))
    assert accepted_yaml(origin).evaluation_error.reason == "git"  # type: ignore[union-attr]
    assert after["validation.yaml"] == before["validation.yaml"]  # the errors found before the restart stay
    assert_valid_status_files(after)


def test_retry_delay_doubles_from_five_seconds_up_to_five_minutes() -> None:
    assert [hq_module.retry_delay(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]


# ------------------------------------------------------------ command line


def break_mirror(origin: Origin, workdir: Path, commit: str, path: str) -> tuple[Path, bytes]:
    """Fetch ``commit`` into HQ's mirror, then delete the blob of ``path`` from it: a real git read failure.

    The mirror's refs already point at ``commit``, so later fetches bring
    nothing and the object stays missing until :func:`repair_mirror`.
    """
    GitStore(str(origin.bare), workdir).fetch()
    blob = git(origin.bare, "rev-parse", f"{commit}:{path}").strip()
    loose = workdir / "repo.git" / "objects" / blob[:2] / blob[2:]
    assert loose.is_file(), "a small fetch leaves its objects loose"
    data = loose.read_bytes()
    loose.unlink()
    return loose, data


def repair_mirror(broken: tuple[Path, bytes]) -> None:
    loose, data = broken
    loose.write_bytes(data)


def edit_job(work: Path) -> None:
    path = work / "jobs" / "install-7zip.yaml"
    path.write_text(path.read_text() + "# reviewed\n")


def test_hq_once_exits_1_with_one_line_and_publishes_the_error(origin: Origin, tmp_path: Path) -> None:
    workdir = tmp_path / "hq"
    good = origin.head
    assert run_cli("hq", "--origin", str(origin.bare), "--workdir", str(workdir), "--once").returncode == 0
    new = origin.commit("edit a job", edit_job)
    broken = break_mirror(origin, workdir, new, "jobs/install-7zip.yaml")

    proc = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(workdir), "--once")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot evaluate main {new[:12]}" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert_never_reported(origin, new)
    accepted = accepted_yaml(origin)
    assert (accepted.accepted_commit, accepted.main_commit, accepted.main_valid) == (good, good, True)
    assert accepted.evaluation_error is not None and accepted.evaluation_error.commit == new

    repair_mirror(broken)
    proc = run_cli("hq", "--origin", str(origin.bare), "--workdir", str(workdir), "--once")
    assert proc.returncode == 0, proc.stderr
    accepted = accepted_yaml(origin)
    assert (accepted.accepted_commit, accepted.main_commit, accepted.evaluation_error) == (new, new, None)


def test_hq_service_keeps_serving_and_retries_until_the_fault_clears(origin: Origin, tmp_path: Path) -> None:
    workdir = tmp_path / "hq"
    good = origin.head
    assert run_cli("hq", "--origin", str(origin.bare), "--workdir", str(workdir), "--once").returncode == 0
    new = origin.commit("edit a job", edit_job)
    broken = break_mirror(origin, workdir, new, "jobs/install-7zip.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin.bare),
                             "--workdir", str(workdir), "--poll-interval", "3600", "--listen", "127.0.0.1:0", "--insecure-http"],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = _Lines(proc.stderr)
        base = lines.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        lines.wait_for(rf"ERROR .*cannot evaluate main {new[:12]}: .* \(attempt 1, next in 5s;")
        health = requests.get(base + "/healthz", timeout=10).json()
        assert (health["mainCommit"], health["evaluationError"]["commit"]) == (good, new)
        _wait_until(lambda: (accepted_yaml(origin).evaluation_error or report.EvaluationError("", "")).commit == new)
        assert_never_reported(origin, new)

        repair_mirror(broken)  # no push, no webhook: only the scheduled retry can pick this up
        _wait_until(lambda: accepted_yaml(origin).accepted_commit == new, timeout=60)
        assert accepted_yaml(origin).evaluation_error is None
        assert requests.get(base + "/healthz", timeout=10).json()["evaluationError"] is None
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
