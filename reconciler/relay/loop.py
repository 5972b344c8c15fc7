"""The relay's reconcile loop: follow HQ's accepted commit, plan every client, publish ``status/<relay>``.

The relay acts only on the commit HQ accepted (``accepted.yaml`` on
``status/hq``), never on raw ``main``. For each newly accepted commit it loads
the specs at that commit, stages the artifacts of every package that reaches
its subtree (:mod:`reconciler.relay.artifacts`), and swaps in a new
:class:`~reconciler.relay.state.Generation` (index and artifacts together)
for the check-in path to plan with.

A *full pass* (:mod:`reconciler.relay.full_pass`) plans every client from a
database snapshot, records when each row's state changed and renders the
status files; the loop publishes them when their content changed, at most
every ``--publish-interval``. Job rows and digests are rendered again only
for jobs whose rows changed; per-client detail (inventory.json,
software.json, client counts) at most every ``--inventory-interval``. A pass
that fails still publishes what it knows plus the error.

:class:`RelayLoop` holds these steps and the state between them; when to run
them (wake-ups, timers, signals) is the process's business,
:mod:`reconciler.relay.service`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from reconciler import report
from reconciler.errors import (
    Cause,
    Problem,
    ReconcilerError,
    problem,
    problem_of,
    retry_delay,
)
from reconciler.gitstore import (
    STATUS_PREFIX,
    FileContent,
    GitError,
    GitStore,
    MissingObjects,
)
from reconciler.metrics import RelayMetrics
from reconciler.reach import reach_of
from reconciler.relay.artifacts import (
    ArtifactCache,
    packages_to_stage,
    with_artifact_revisions,
)
from reconciler.relay.full_pass import PLANNING, FullPass, Passes
from reconciler.relay.state import Generation, RelayState, TrustBundle, make_generation
from reconciler.relay.store import Store
from reconciler.repo_tree import CommitTree, load_commit, spec_files
from reconciler.report import HQ_STATUS_REF
from reconciler.signing import ManifestError, parse_manifest
from reconciler.specs import Specs
from reconciler.times import utc_now

log = logging.getLogger("reconciler.relay")

# The steps of the loop, in the order the status files list what went wrong in them.
FOLLOW, ARTIFACTS, PUBLISHING, STATUS_PASS = "following HQ", "staging", "publishing", "status pass"
HOUSEKEEPING = "housekeeping"
STEPS = (FOLLOW, ARTIFACTS, PUBLISHING, PLANNING, STATUS_PASS, HOUSEKEEPING)

RESTAGE_SECONDS = 5.0  # retry artifacts the parent relay is still staging this often
OPERATION_RETENTION = timedelta(days=30)  # finished operations kept (the agent's journal keeps 30 days too)
CACHE_RETENTION_SECONDS = 7 * 24 * 3600.0  # unused artifacts kept this long after their last use


@dataclass(frozen=True)
class Accepted:
    """HQ's accepted commit and the specs at it, or why there are none."""

    commit: str | None
    specs: Specs | None
    error: Problem | None
    manifest: tuple[Mapping[str, Any], int] | None = None  # HQ's signed envelope of ``commit`` and its serial


class RelayLoop:
    """One relay's reconcile loop; ``sync`` and ``full_pass`` are usable on their own in tests."""

    def __init__(self, name: str, git: GitStore, store: Store, cache: ArtifactCache, state: RelayState, *,
                 publish_interval: float = 10.0, inventory_interval: float = 0.0,
                 clock: Callable[[], datetime] = utc_now, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.git = git
        self.store = store
        self.cache = cache
        self.state = state
        self.publish_interval = publish_interval
        # Per-client detail (inventory.json, software.json, the client counts) is refreshed at most this often
        # (0: at every pass); job rows, digests and errors are not held back.
        self.inventory_interval = inventory_interval
        self.clock = clock
        self.monotonic = monotonic
        # What went wrong, by where: the status files show these, in this order.
        self.problems: dict[str, tuple[Problem, ...]] = {}
        self.retry_at: float | None = None  # monotonic time to retry staging for the same commit
        self._stage_failures = 0  # stagings in a row with downloads worth retrying
        # The status files last rendered and last published: their bytes, or blob ids in the git mirror
        # when a pass process wrote them there.
        self.last_files: Mapping[str, FileContent] | None = None
        self.published_files: Mapping[str, FileContent] | None = None
        self.metrics: RelayMetrics | None = None  # times full passes and publishing when set
        self.last_publish = float("-inf")
        self._specs: Specs | None = None
        self._moves_tip: str | None = None  # the status/hq commit whose moves.yaml was last read
        # The full pass and what it keeps between passes; the process runs it in a process of its own
        # (reconciler.relay.pass_process).
        self.passes: Passes = FullPass(name, store, state, inventory_interval=inventory_interval, clock=clock,
                                       monotonic=monotonic)
        self._detail_due: float | None = None  # monotonic time from which per-client detail may be refreshed
        # When time alone next changes a row (monotonic; inf: never), and whether rows wait for a timer the
        # plan does not date (results due, retries): the process's business to pass again then.
        self.timer_at = float("inf")
        self.ticking = False
        self._last_event = -1  # the newest client event seen (clients_changed)
        # The branch HQ accepts commits of (accepted.yaml names it): fetched with status/hq, and no
        # other branch: the fetch's cost does not grow with the status branches other relays publish.
        self.branch = "main"

    # -- what went wrong ------------------------------------------------------

    def settle(self, where: str, outcome: BaseException | Problem | Sequence[Problem] | None) -> None:
        """Record how the step ``where`` ended: the one place errors become status errors.

        ``None`` clears what the step reported before; an exception is
        classified (:func:`reconciler.errors.problem_of`) and logged, with its
        traceback when it is a bug.
        """
        if outcome is None:
            self.problems.pop(where, None)
            return
        if isinstance(outcome, BaseException):
            found = problem_of(outcome)
            found = replace(found, message=f"{where} failed: {self.git.redact(found.message)}")
            log.error("%s", found.message, exc_info=None if isinstance(outcome, ReconcilerError) else outcome)
            self.problems[where] = (found,)
        elif isinstance(outcome, Problem):
            self.problems[where] = (outcome,)
        else:
            self.problems[where] = tuple(outcome)

    def status_problems(self) -> list[Problem]:
        """Everything the status files should say went wrong, in a stable order."""
        return [p for where in STEPS for p in self.problems.get(where, ())] + [
            p for where, found in self.problems.items() if where not in STEPS for p in found]

    # -- following HQ --------------------------------------------------------

    def read_accepted(self, fetch: bool = True) -> Accepted:
        """Fetch, then HQ's accepted commit and the specs at it (from the local mirror if the fetch failed)."""
        fetch_error: Problem | None = None
        if fetch:
            try:
                self.git.fetch((HQ_STATUS_REF, self.branch))
            except GitError as e:
                fetch_error = problem(e.cause, f"fetch failed (using the last fetched state): {e}")
                log.warning("%s", fetch_error.message)
        try:
            accepted = self._read_accepted(fetch and fetch_error is None)
        except GitError as e:
            accepted = Accepted(None, None, problem(e.cause, f"cannot read {HQ_STATUS_REF}: {e}"))
        if fetch_error is not None:
            error = fetch_error if accepted.error is None else replace(
                fetch_error, message=f"{fetch_error.message}; {accepted.error.message}")
            accepted = replace(accepted, error=error)
        return accepted

    def _read_accepted(self, fetch: bool) -> Accepted:
        hq_tip = self.git.ref_sha(HQ_STATUS_REF)
        if hq_tip is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, f"no accepted commit yet: {HQ_STATUS_REF} does not exist (is HQ running?)"))
        data = self.git.read_file(hq_tip, report.ACCEPTED_FILE, report.MAX_STATUS_FILE)
        if data is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, f"no accepted commit yet: {HQ_STATUS_REF} has no {report.ACCEPTED_FILE}"))
        try:
            commit = report.parse_accepted(data).accepted_commit
        except report.ReportError as e:
            return Accepted(None, None, problem(
                Cause.INTERNAL, f"cannot read {HQ_STATUS_REF}:{report.ACCEPTED_FILE}: {e}"))
        if commit is None:
            return Accepted(None, None, problem(
                Cause.MISSING_REF, "no accepted commit yet: HQ has not accepted any commit of main"))
        branch = report.parse_branch(data)
        if branch != self.branch:
            log.info("HQ accepts commits of branch %r: following it", branch)
            self.branch = branch
            if fetch and self.git.resolve_commit(commit) is None:
                self.git.fetch((branch,))
        manifest = self._read_manifest(hq_tip, commit)
        if commit == self.state.generation.commit and self._specs is not None:
            return Accepted(commit, self._specs, None, manifest)
        loaded = load_commit(self.git, commit)  # the same reading and checks as HQ's
        if not loaded.valid or loaded.specs is None:
            first = loaded.errors[0] if loaded.errors else "no specs"
            return Accepted(commit, None, problem(
                Cause.INVALID_SPECS, f"the specs at accepted commit {commit[:12]} do not load here "
                                     f"({len(loaded.errors)} errors, first: {first})"))
        return Accepted(commit, loaded.specs, None, manifest)

    def _read_manifest(self, hq_tip: str, commit: str) -> tuple[Mapping[str, Any], int] | None:
        """HQ's signed manifest envelope on ``status/hq`` if it is the one of ``commit`` (not checked: no key here)."""
        data = self.git.read_file(hq_tip, report.MANIFEST_FILE, report.MAX_STATUS_FILE)
        if data is None:
            return None
        try:
            envelope = json.loads(data)
            manifest = parse_manifest(envelope["payload"])
        except (ValueError, KeyError, TypeError, ManifestError) as e:
            log.warning("%s:%s unreadable (%s); agents that verify refuse every action", HQ_STATUS_REF,
                        report.MANIFEST_FILE, e)
            return None
        if manifest.commit != commit:
            log.warning("%s:%s is for commit %s, not the accepted %s; agents that verify refuse every action",
                        HQ_STATUS_REF, report.MANIFEST_FILE, manifest.commit[:12], commit[:12])
            return None
        return envelope, manifest.serial

    def _trust(self, commit: str, specs: Specs, manifest: tuple[Mapping[str, Any], int] | None) -> TrustBundle | None:
        """What agents get with their actions: the manifest and the documents of ``commit`` (read once per commit)."""
        if manifest is None:
            return None
        current = self.state.generation.trust
        if current is not None and self.state.generation.commit == commit:
            if current.serial == manifest[1]:
                return current
            return replace(current, envelope=manifest[0], serial=manifest[1])
        documents = {path: data.decode("utf-8") for path, data in spec_files(CommitTree(self.git, commit)).items()}
        return TrustBundle(manifest[0], manifest[1], documents, {job.name: job.source for job in specs.jobs})

    def known_relay(self, specs: Specs) -> bool:
        return any(relay.name == self.name for relay in specs.topology.relays)

    def sync(self, fetch: bool = True) -> bool:
        """Follow HQ: a new accepted commit (or artifacts now staged) installs a new generation.

        Returns True when the generation changed.
        """
        accepted = self.read_accepted(fetch)
        current = self.state.generation
        errors = [accepted.error] if accepted.error else []
        changed = self.follow_moves() > 0
        if accepted.specs is not None and accepted.commit is not None:
            if not self.known_relay(accepted.specs):
                errors.append(problem(Cause.UNKNOWN_RELAY, f"relay {self.name!r} is not in the topology at accepted "
                                                           f"commit {accepted.commit[:12]}: serving no actions"))
                if current.commit != accepted.commit or current.index is not None:
                    self.state.serve(Generation(commit=accepted.commit))
                    changed = True
                self._specs = accepted.specs
            elif accepted.commit != current.commit or current.index is None or self.retry_due():
                generation = self._build(accepted.commit, accepted.specs)
                generation = replace(generation, trust=self._trust(accepted.commit, accepted.specs, accepted.manifest))
                self._specs = accepted.specs
                if (generation.commit != current.commit or current.index is None
                        or generation.artifacts != current.artifacts or generation.unavailable != current.unavailable
                        or generation.trust != current.trust):
                    self.state.serve(generation)
                    changed = True
            else:
                trust = self._trust(accepted.commit, accepted.specs, accepted.manifest)
                if trust != current.trust:  # the same commit, signed anew (a key rotation), or HQ stopped signing
                    self.state.serve(replace(current, trust=trust))
        self.settle(FOLLOW, errors or None)
        return changed

    def _build(self, commit: str, specs: Specs) -> Generation:
        reach = reach_of(specs)
        packages = packages_to_stage(specs, self.name, reach)
        result = self.cache.stage_all(commit, packages)
        unavailable = {**result.errors, **result.pending}
        self.settle(ARTIFACTS, [
            problem(Cause.UNREACHABLE if key in result.transient else Cause.ARTIFACT_MISMATCH,
                    f"artifact of {key[0]} {key[1]}: {message}")
            for key, message in sorted(result.errors.items())] or None)
        if commit != self.state.generation.commit:
            self._stage_failures = 0
        if result.pending:
            self.retry_at = self.monotonic() + RESTAGE_SECONDS
        elif result.transient:
            self._stage_failures += 1
            self.retry_at = self.monotonic() + retry_delay(self._stage_failures)
        else:
            self.retry_at = None  # staged, or refused: only a new commit can change that
        if commit != self.state.generation.commit:
            log.info("relay %s now at accepted commit %s (%d packages staged%s)", self.name, commit[:12],
                     len(result.staged), f", {len(unavailable)} unavailable" if unavailable else "")
        return make_generation(commit, with_artifact_revisions(specs, result.staged), self.name, reach=reach,
                               artifacts=result.staged, unavailable=unavailable)

    def retry_due(self) -> bool:
        return self.retry_at is not None and self.monotonic() >= self.retry_at

    # -- the full pass -------------------------------------------------------

    def full_pass(self) -> Mapping[str, FileContent]:
        """Plan every client, refresh rollout counters and row states; return the status files.

        :attr:`passes` does the work (in this process or its own); what it
        found is applied here: the counts and errors the metrics and
        heartbeats show, the timers, the planning error.
        """
        started = time.perf_counter()
        self.problems.pop(STATUS_PASS, None)
        self.problems.pop(PLANNING, None)
        listed = self.status_problems()  # the pass's own go between the steps before planning and the rest
        cut = sum(len(self.problems.get(where, ())) for where in STEPS[:STEPS.index(PLANNING)])
        result = self.passes.run(listed[:cut], listed[cut:])
        self.settle(PLANNING, result.planning)
        self._last_event = result.last_event
        state = self.state
        state.client_count, state.clients_online = result.client_count, result.clients_online
        state.row_counts, state.errors = result.row_counts, result.errors
        now = self.monotonic()
        self.timer_at, self.ticking = now + result.timer_in, result.ticking
        self._detail_due = None if result.detail_in is None else now + result.detail_in
        if self.metrics is not None:
            self.metrics.full_pass_seconds.observe(time.perf_counter() - started)
        return result.files

    def clients_changed(self) -> bool:
        """Whether a client event (``reconciler clients approve``/``rekey``/``forget``, a registration) was
        recorded since the last pass or call: one indexed read, asked once per check-in interval."""
        seen, self._last_event = self._last_event, self.store.last_event()
        return self._last_event != seen

    def detail_due_in(self) -> float | None:
        """Seconds until per-client detail may be refreshed; None when it is refreshed at every pass."""
        if self._detail_due is None:
            return None if self.inventory_interval <= 0 else 0.0
        return max(0.0, self._detail_due - self.monotonic())

    def follow_moves(self) -> int:
        """Read ``moves.yaml`` on status/hq when it changed; record the clients that left this relay.

        Returns how many clients it marked as moved away (then a pass is due).
        A file HQ wrote that cannot be read is logged and skipped: moves only
        correct counts, they never block the relay.
        """
        try:
            tip = self.git.ref_sha(HQ_STATUS_REF)
            if tip is None or tip == self._moves_tip:
                return 0
            data = self.git.read_file(tip, report.MOVES_FILE, report.MAX_STATUS_FILE)
            moves = report.parse_moves(data) if data is not None else {}
        except GitError as e:  # transient: tried again at the next sync
            log.warning("cannot read %s:%s (client moves not followed yet): %s", HQ_STATUS_REF, report.MOVES_FILE, e)
            return 0
        except report.ReportError as e:  # the same commit reads the same: say it once
            log.warning("cannot read %s:%s (client moves not followed): %s", HQ_STATUS_REF, report.MOVES_FILE, e)
            self._moves_tip = tip
            return 0
        self._moves_tip = tip
        mine = moves.get(self.name, ())
        changed = self.store.record_departures((m.client, m.relay, m.at) for m in mine) if mine else 0
        if changed:
            log.info("%d clients moved to other relays (per HQ); they are counted there now", changed)
        return changed

    def error_files(self, error: BaseException) -> dict[str, bytes]:
        """Status files when a pass failed outright: at least the commit and the error get published."""
        self.settle(STATUS_PASS, error)
        problems = self.status_problems()
        self.passes.forget_render()
        return report.render_relay_status(self.name, self.state.generation.commit, None, {}, [],
                                          [p.message for p in problems], problems=problems)

    def housekeeping(self) -> None:
        """Prune old finished operations and artifacts no current package uses."""
        removed = self.store.prune_operations(self.clock() - OPERATION_RETENTION)
        keep = {a.sha256 for a in self.state.generation.artifacts.values()}
        dropped = self.cache.prune(keep, CACHE_RETENTION_SECONDS)
        if removed or dropped:
            log.info("housekeeping: pruned %d old operations and %d unused artifacts", removed, dropped)

    # -- publishing ----------------------------------------------------------

    def publish_due_in(self) -> float | None:
        """Seconds until the pending status may be published; None when nothing is pending."""
        if self.last_files is None or self.last_files == self.published_files:
            return None
        return max(0.0, self.last_publish + self.publish_interval - self.monotonic())

    def publish(self, force: bool = False) -> str | None:
        """Publish the last rendered files if they changed and the interval allows; the new commit or None."""
        due = self.publish_due_in()
        if due is None or (due > 0 and not force):
            return None
        files = self.last_files
        assert files is not None
        self.last_publish = self.monotonic()
        commit = self.state.generation.commit
        message = (f"status/{self.name}: accepted {commit[:12]}" if commit else f"status/{self.name}: no accepted commit")
        started = time.perf_counter()
        try:
            sha = self.git.publish(STATUS_PREFIX + self.name, files, message)
            if self.metrics is not None:
                self.metrics.publish_seconds.observe(time.perf_counter() - started)
        except (GitError, ValueError) as e:
            cause = e.cause if isinstance(e, GitError) else Cause.INTERNAL
            if isinstance(e, MissingObjects):  # the pass process's blobs are gone (a gc): the next pass writes them
                self.passes.forget_render()
            self.settle(PUBLISHING, problem(cause, f"publishing status failed (will retry): {e}"))
            log.error("%s", self.problems[PUBLISHING][0].message)
            return None
        self.settle(PUBLISHING, None)
        self.published_files = files
        if sha:
            log.info("published status/%s %s", self.name, sha[:12])
        return sha
