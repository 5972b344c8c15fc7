"""Benchmark: a simulated day of 1,000 relays × 1,000 clients publishing status to one real git origin.

Each relay's status is generated in process from a model of a fleet's day,
with a simulated clock stepping by the relay publish interval (60 s):

- clients power on and off with a diurnal pattern: a quarter always on,
  most on from about 08:00 to about 17:30, ``--laptops`` (15 %) on for 1–3
  sessions of 30 minutes to 3 hours between 07:00 and 24:00; a client
  counts as offline from the moment it goes off;
- two rollouts (10:00 and 14:00 by default): a commit adds a job reaching
  every client; each relay starts at most ``maxConcurrent`` 50 at a time,
  an action goes out at the client's next check-in (within 30 s) and runs
  1–5 minutes, 3 % of attempts fail (retried after 10 minutes, at most 3
  attempts); offline clients wait (``clientOffline``) until they come on;
- a little drift: 2 % of clients lose an installed package during the day
  and get it back (a repair); free disk crosses a GiB boundary now and then.

The files are the bytes a relay commits. Job files, ``relay.yaml`` and
``inventory.json`` are rendered incrementally (only the rows and clients
that changed are rendered again, with ``report``'s own row and line
renderers); every ``--verify-every``-th commit of a relay is rendered again
whole with ``report.render_relay_status`` from a ``plan.Plan`` of the same
rows and ``InventoryEntry``s, and must be byte-identical (the count is
printed). ``software.json`` is ``report.render_relay_software``.

The layout (scale issue, item 1): job files and ``relay.yaml``'s digests
are committed whenever they change, at most once per publish interval;
``inventory.json``, ``software.json`` and ``relay.yaml``'s
``clientsOnline``/``clientsOffline`` are refreshed at most every
``--inventory-interval`` (900 s) and otherwise ride along unchanged. One
commit of a relay counts as one push. Pushes are *counted, not performed*:
a day of 1,000 relays is some 440,000 pushes, at 0.2–0.3 s each through
``GitStore.publish`` on this machine more than a day of wall time. Instead
the relays are simulated one after the other (a relay's day does not depend
on another's) and each relay's day goes into the bare origin through ``git
fast-import`` (:class:`Writer`), making on ``refs/heads/status/<relay>``
the same commits (parent = the previous tip, same trees and blobs) a push
per commit would. The objects land packed, not loose as small pushes leave
them; sizes are compared after ``git gc --prune=now``, and a check run
(``--check-relays``, one simulated hour) writes the same commits with
``GitStore.publish`` (the relay's real publish path, one real push each)
next to ``fast-import`` and prints the ratio.

Cost: a relay-day of 1,000 clients is about 120 MB of files committed
(raw) and a few CPU-seconds of rendering plus git's hashing and deltas;
``--relays`` scales it down (pushes and growth are per relay and add up).

Reported: pushes per hour of the day (total, per relay mean and max);
commits, bytes added to the origin per day before and after ``git gc``;
a real ``reconciler hq --once`` pass over the origin; a fresh ``git clone
--mirror`` (seconds and bytes); and, for ``--old-relays`` of the same
relays, the previous layout (inventory and online counts in every commit,
publish interval 10 s) side by side, with the ratio.

    python benchmarks/scale_sim.py [--relays 1000] [--clients 1000] [--hours 24] [--quick]
        [--old-relays 2] [--check-relays 5] [--check-hour 10] [--rollouts 10,14] [--laptops 0.15]
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hq_bench import synthetic_repo

from reconciler import plan, report
from reconciler.gitstore import GitStore
from reconciler.hq import Hq
from reconciler.plan import ClientState, Installed, Reason
from reconciler.plan.vocabulary import offline_message
from reconciler.report import Accepted, InventoryEntry, StatusRow
from reconciler.times import format_precise, format_time

GIT_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@reconciler.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@reconciler.invalid"}
DAY0 = datetime(2026, 11, 30, tzinfo=UTC)  # the simulated day starts at 00:00 UTC
EPOCH0 = int(DAY0.timestamp())
STEP = 60  # the relay publish interval (s)
OLD_STEP = 10  # the previous default publish interval (s)
POLL = 30  # agents' check-in interval (s)
MAX_CONCURRENT = 50
MAX_ATTEMPTS = 3
FAIL_RATE = 0.03
RETRY_AFTER = 600
EXISTING_JOBS = 2  # jobs that completed before the day
FAIL_MESSAGE = "exit 1603: installer failed: another installation is in progress"
SLOT_MESSAGE = f"waiting for a rollout slot (maxConcurrent {MAX_CONCURRENT})"
BASE_SOFTWARE = [(f"OS Component {k:02d}", f"10.0.{k}", "registry") for k in range(40)]
VARIANTS = [[(f"Department App {v}-{k}", f"{v}.{k}", "registry") for k in range(8)] for v in range(7)]

_flow: Any = report._yaml_flow  # the renderers report uses for one row / one inventory line
_row_json: Any = report._row_json
_inventory_json: Any = report._inventory_json
_why: Any = report._why
_cut: Any = report._cut


RowFields = tuple[ClientState, Reason, int, str, str | None, datetime]  # state, reason, attempts, message, installed, since


def _status_fields(row: RowFields) -> tuple[Any, ...]:
    state, reason, attempts, message, installed, updated = row
    return state, installed, attempts, message, updated, reason.value


def sim_time(seconds: float) -> datetime:
    return DAY0 + timedelta(seconds=int(seconds))


def job_name(j: int) -> str:
    return f"install-tool-{j}"


# ------------------------------------------------------------------- the model


@dataclass
class JobRows:
    """One job's rows on one relay: per client (state, reason, attempts, message, installed, updated)."""

    index: int
    rows: list[RowFields]
    lines: list[str]
    waiting: deque[int] = field(default_factory=deque)  # online clients waiting for a slot, in order
    taken: int = 0  # slots held: queued for a check-in or in progress
    dirty: set[int] = field(default_factory=set)  # rows changed since the last render
    attempts: dict[int, int] = field(default_factory=dict)
    rendered: tuple[str | None, bytes, dict[str, Any]] | None = None  # (observedCommit, job file, digest)
    open: set[int] = field(default_factory=set)  # rows not Succeeded


class RelayModel:
    """One relay's clients, rows and inventory, moved forward by events; renders the files it would publish."""

    def __init__(self, name: str, clients: int, seed: int, rollouts: list[float], laptops: float = 0.15) -> None:
        self.name = name
        self.rng = random.Random(seed)
        rng = self.rng
        self.ids = [f"{name}-pc-{i:04d}" for i in range(clients)]
        self.events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, client, job)
        self._seq = 0
        self.online = [False] * clients
        self.last_seen = [DAY0 - timedelta(hours=14, minutes=rng.randrange(120)) for _ in range(clients)]
        self.disk = [rng.randrange(20, 200) * 1024 + rng.randrange(1024) for _ in range(clients)]
        self.labels = [{"dept": ("sales", "eng", "ops", "finance")[i % 4], "site": name} for i in range(clients)]
        self.installed: list[set[int]] = [set(range(EXISTING_JOBS)) for _ in range(clients)]
        self.commit: str | None = None
        self.jobs: list[JobRows] = []
        self.inv_lines: list[str] = []
        self.inv_dirty: set[int] = set(range(clients))
        self.soft_version = 0  # moves when a client's software list changes
        self._software: tuple[int, bytes] | None = None
        self._inventory: tuple[bytes, int] | None = None
        self._lists: dict[tuple[int, frozenset[int]], tuple[tuple[str, str, str], ...]] = {}
        self.newest: datetime | None = None
        self.version = 0  # moves whenever a row changes
        for i in range(clients):
            kind = rng.random()
            if kind < 0.25:  # always on
                self.online[i] = True
                self.last_seen[i] = DAY0
                continue
            if kind < 1 - laptops:  # office hours
                on = rng.gauss(8 * 3600, 2700)
                sessions = [(on, on + max(3600.0, rng.gauss(9.5 * 3600, 3600)))]
            else:  # laptop: a few sessions
                sessions = []
                for _ in range(rng.randint(1, 3)):
                    start = rng.uniform(7 * 3600, 21 * 3600)
                    sessions.append((start, start + rng.uniform(1800, 3 * 3600)))
            for start, end in sessions:
                self.push(start, "on", i)
                self.push(end, "off", i)
            for _ in range(rng.choice((0, 0, 1, 1, 2))):  # free disk crossing a GiB boundary
                start, end = rng.choice(sessions)
                self.push(rng.uniform(start, end), "disk", i)
        for i in range(clients):
            if rng.random() < 0.02:  # drift: an installed package goes missing, gets repaired
                self.push(rng.uniform(9 * 3600, 18 * 3600), "drift", i, rng.randrange(EXISTING_JOBS))
        for j in range(EXISTING_JOBS):
            self.jobs.append(self._settled_job(j))
        for k, at in enumerate(rollouts):
            self.push(at, "commit", -1, EXISTING_JOBS + k)

    def push(self, at: float, kind: str, client: int, job: int = -1) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, client, job))

    def _settled_job(self, j: int) -> JobRows:
        done: list[RowFields] = [(ClientState.SUCCEEDED, Reason.DONE, 1, "", f"1.{j}",
                                  DAY0 - timedelta(days=3, seconds=self.rng.randrange(86400))) for _ in self.ids]
        rows = JobRows(j, done, [""] * len(self.ids), dirty=set(range(len(self.ids))))
        for row in done:
            self.newest = row[5] if self.newest is None or row[5] > self.newest else self.newest
        return rows

    # -- rows ---------------------------------------------------------------

    def set_row(self, job: JobRows, i: int, state: ClientState, reason: Reason, attempts: int, message: str,
                installed: str | None, at: float) -> None:
        old = job.rows[i]
        updated = sim_time(at) if old[0] is not state else old[5]
        if old[0] is not state:
            self.newest = updated if self.newest is None or updated > self.newest else self.newest
        new = (state, reason, attempts, message, installed, updated)
        if new != old:
            job.rows[i] = new
            job.dirty.add(i)
            self.version += 1
            if state is ClientState.SUCCEEDED:
                job.open.discard(i)
            else:
                job.open.add(i)

    def offline_row(self, job: JobRows, i: int, at: float) -> None:
        old = job.rows[i]
        message = offline_message(self.last_seen[i], "")
        self.set_row(job, i, ClientState.PENDING, Reason.CLIENT_OFFLINE, old[2], message, old[4], at)

    def wait(self, job: JobRows, i: int, at: float) -> None:
        """Client ``i`` wants job's action: queued for its next check-in if a slot is free, else waiting."""
        old = job.rows[i]
        if not self.online[i]:
            self.offline_row(job, i, at)
            return
        if job.taken < MAX_CONCURRENT:
            job.taken += 1
            self.set_row(job, i, ClientState.PENDING, Reason.QUEUED, old[2], "", old[4], at)
            self.push(at + self.rng.uniform(0, POLL), "checkin", i, job.index)
        else:
            self.set_row(job, i, ClientState.PENDING, Reason.ROLLOUT_SLOT, old[2], SLOT_MESSAGE, old[4], at)
            job.waiting.append(i)

    def free_slot(self, job: JobRows, at: float) -> None:
        job.taken -= 1
        while job.waiting and job.taken < MAX_CONCURRENT:
            i = job.waiting.popleft()
            row = job.rows[i]
            if row[0] is ClientState.PENDING and row[1] is Reason.ROLLOUT_SLOT and self.online[i]:
                self.wait(job, i, at)

    def advance(self, until: float) -> None:
        """Apply every event up to ``until`` (seconds into the day)."""
        events = self.events
        while events and events[0][0] <= until:
            at, _, kind, i, j = heapq.heappop(events)
            if kind == "on":
                self.online[i] = True
                self.inv_dirty.add(i)
                for job in self.jobs:
                    row = job.rows[i]
                    if row[0] is ClientState.PENDING and row[1] is Reason.CLIENT_OFFLINE:
                        self.wait(job, i, at)
            elif kind == "off":
                self.online[i] = False
                self.last_seen[i] = sim_time(at)
                self.inv_dirty.add(i)
                for job in self.jobs:
                    row = job.rows[i]
                    if row[0] is ClientState.PENDING and row[1] in (Reason.QUEUED, Reason.ROLLOUT_SLOT):
                        if row[1] is Reason.QUEUED:
                            self.free_slot(job, at)
                        self.offline_row(job, i, at)
            elif kind == "disk":
                self.disk[i] += self.rng.choice((-1, 1)) * 1024
                self.inv_dirty.add(i)
            elif kind == "drift":
                job = self.jobs[j]
                if self.online[i] and job.rows[i][0] is ClientState.SUCCEEDED:
                    self.installed[i].discard(j)
                    self.inv_dirty.add(i)
                    self.soft_version += 1
                    job.attempts[i] = 0
                    self.set_row(job, i, ClientState.PENDING, Reason.QUEUED, 0, "", None, at)
                    self.wait(job, i, at)
            elif kind == "commit":
                self.commit_job(j, at)
            elif kind == "checkin":
                job = self.jobs[j]
                row = job.rows[i]
                if row[0] is not ClientState.PENDING or row[1] is not Reason.QUEUED:
                    continue
                attempt = job.attempts.get(i, 0) + 1
                job.attempts[i] = attempt
                message = f"attempt {attempt}/{MAX_ATTEMPTS} dispatched at {format_precise(sim_time(at))}"
                self.set_row(job, i, ClientState.IN_PROGRESS, Reason.IN_PROGRESS, attempt, message, row[4], at)
                self.push(at + self.rng.uniform(60, 300), "done", i, j)
            elif kind == "done":
                job = self.jobs[j]
                attempt = job.attempts[i]
                if self.rng.random() >= FAIL_RATE:
                    self.set_row(job, i, ClientState.SUCCEEDED, Reason.DONE, attempt, "", f"1.{j}", at)
                    self.installed[i].add(j)
                    self.inv_dirty.add(i)
                    self.soft_version += 1
                elif attempt < MAX_ATTEMPTS:
                    retry = format_precise(sim_time(at + RETRY_AFTER))
                    self.set_row(job, i, ClientState.PENDING, Reason.RETRY_BACKOFF, attempt,
                                 f"attempt {attempt}/{MAX_ATTEMPTS} failed: {FAIL_MESSAGE}; retry after {retry}",
                                 job.rows[i][4], at)
                    self.push(at + RETRY_AFTER, "retry", i, j)
                else:
                    self.set_row(job, i, ClientState.FAILED, Reason.FAILED, attempt, FAIL_MESSAGE, job.rows[i][4], at)
                self.free_slot(job, at)
            elif kind == "retry":
                job = self.jobs[j]
                row = job.rows[i]
                if row[0] is ClientState.PENDING and row[1] is Reason.RETRY_BACKOFF:
                    self.wait(job, i, at)

    def commit_job(self, j: int, at: float) -> None:
        """HQ accepted a commit adding job ``j``: every client gets a row; observedCommit moves in every job file."""
        placeholder = (ClientState.PENDING, Reason.QUEUED, 0, "", None, sim_time(at))
        job = JobRows(j, [placeholder] * len(self.ids), [""] * len(self.ids), dirty=set(range(len(self.ids))),
                      open=set(range(len(self.ids))))
        self.jobs.append(job)
        self.version += 1
        self.newest = sim_time(at)
        order = list(range(len(self.ids)))
        self.rng.shuffle(order)
        for i in order:
            self.wait(job, i, at)

    # -- rendering ------------------------------------------------------------

    def status_rows(self, job: JobRows) -> list[StatusRow]:
        return [StatusRow(self.ids[i], s, inst, att, msg, upd, reason.value)
                for i, (s, reason, att, msg, inst, upd) in enumerate(job.rows)]

    def job_files(self, observed: str | None) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The job files and relay.yaml's job digests (rows rendered again only where they changed)."""
        prefix = report.relay_prefix(self.name)
        files: dict[str, bytes] = {}
        digests: dict[str, Any] = {}
        for job in self.jobs:
            name = job_name(job.index)
            if job.rendered is not None and not job.dirty and job.rendered[0] == observed:
                files[f"{prefix}jobs/{name}.yaml"] = job.rendered[1]
                digests[name] = job.rendered[2]
                continue
            for i in job.dirty:
                s, reason, att, msg, inst, upd = job.rows[i]
                job.lines[i] = f"- {_flow(_row_json(StatusRow(self.ids[i], s, inst, att, msg, upd, reason.value)))}\n"
            job.dirty.clear()
            open_rows = sorted(job.open)
            counts = report.zero_counts()
            counts[ClientState.SUCCEEDED.value] = len(job.rows) - len(open_rows)
            for i in open_rows:
                counts[job.rows[i][0].value] += 1
            scheduled, offline = plan.parked({job.rows[i][1] for i in open_rows
                                              if job.rows[i][0] is ClientState.PENDING})
            state = plan.job_state(counts, scheduled=scheduled, offline=offline)
            head = report.dump_yaml({"counts": dict(counts), "job": name, "observedCommit": observed,
                                     "relay": self.name, "state": state.value}).decode("utf-8")
            data = "".join([head, "rows:\n", *job.lines]).encode("utf-8")
            files[f"{prefix}jobs/{name}.yaml"] = data
            unsettled = [StatusRow(self.ids[i], *_status_fields(job.rows[i])) for i in open_rows]
            failures = [r for r in unsettled if r.state in report.FAILURE_STATES][:report.FAILURE_LIMIT]
            digests[name] = {"state": state.value, "counts": counts,
                             "failures": [{**_row_json(r), "message": _cut(r.message)} for r in failures],
                             **_why(unsettled)}
            job.rendered = (observed, data, digests[name])
        return files, digests

    def entry(self, i: int) -> InventoryEntry:
        cid = self.ids[i]
        facts: dict[str, str | int] = {"arch": "x86_64", "freeDiskMB": self.disk[i] // 1024 * 1024, "hostname": cid, "os": "windows"}
        installed = tuple(Installed(f"tool-{j}", f"1.{j}") for j in sorted(self.installed[i]))
        online = self.online[i]
        return InventoryEntry(cid, facts, self.labels[i], installed, online, None if online else self.last_seen[i])

    def inventory(self) -> list[InventoryEntry]:
        return [self.entry(i) for i in range(len(self.ids))]

    def inventory_file(self) -> tuple[bytes, int]:
        """inventory.json (client lines rendered again only where they changed) and the clients online."""
        if not self.inv_lines:
            self.inv_lines = [""] * len(self.ids)
        if not self.inv_dirty and self._inventory is not None:
            return self._inventory
        for i in self.inv_dirty:
            self.inv_lines[i] = _flow(_inventory_json(self.entry(i)))
        self.inv_dirty.clear()
        body = ",\n".join(self.inv_lines)
        data = f'{{"clients": [\n{body}\n], "relay": {_flow(self.name)}}}\n'.encode()
        self._inventory = (data, sum(self.online))
        return self._inventory

    def software_list(self, i: int) -> tuple[tuple[str, str, str], ...]:
        """Client ``i``'s software list: the OS's, its department's, and the tools installed (one tuple per set)."""
        key = (i % len(VARIANTS), frozenset(self.installed[i]))
        found = self._lists.get(key)
        if found is None:
            found = tuple(sorted(BASE_SOFTWARE + VARIANTS[key[0]] +
                                 [(f"Tool {j}", f"1.{j}", "registry") for j in sorted(key[1])]))
            self._lists[key] = found
        return found

    def software_file(self) -> bytes:
        if self._software is not None and self._software[0] == self.soft_version:
            return self._software[1]
        lists = {cid: (self.software_list(i), 0) for i, cid in enumerate(self.ids)}
        data = report.render_relay_software(self.name, lists)
        self._software = (self.soft_version, data)
        return data

    def relay_yaml(self, observed: str | None, digests: dict[str, Any], online: int) -> bytes:
        doc: dict[str, Any] = {"relay": self.name, "observedCommit": observed, "clients": len(self.ids), "clientsOnline": online,
               "clientsOffline": len(self.ids) - online, "updatedAt": format_time(self.newest), "errors": [],
               "problems": [], "jobs": digests}
        return report.dump_yaml(doc)

    def reference_files(self, observed: str | None, inventory: list[InventoryEntry]) -> dict[str, bytes]:
        """The same status rendered whole by ``report.render_relay_status`` (for the byte-for-byte check)."""
        rows, rollups, updated = [], [], {}
        for job in self.jobs:
            name = job_name(job.index)
            job_rows = [plan.Row(name, self.name, self.ids[i], s, None, f"tool-{job.index}", f"1.{job.index}", inst,
                                 att, msg, None, reason)
                        for i, (s, reason, att, msg, inst, _) in enumerate(job.rows)]
            rows.extend(job_rows)
            rollups.append(plan.rollup(name, job_rows))
            updated.update({(name, self.ids[i]): row[5] for i, row in enumerate(job.rows)})
        the_plan = plan.Plan(self.name, tuple(rows), (), tuple(rollups))
        return report.render_relay_status(self.name, observed, the_plan, updated, inventory, [])


# ------------------------------------------------------------- the publishers


Commit = tuple[float, str, dict[str, bytes]]  # (seconds into the day, message, the files that changed)


class Writer:
    """Writes relays' commits onto ``refs/heads/status/<relay>`` of a bare origin through ``git fast-import``.

    A relay's commits go in one piece: first every version of each file, in
    order (``git fast-import`` deltas a blob against the blob written just
    before it, so that is the previous version of the same file), then the
    commits, each the previous tip's tree with the changed files. A new
    ``git fast-import`` process every ``relays_per_pack`` relays.
    """

    open: list[Writer] = []  # noqa: RUF012 - every writer, to stop their processes if the run fails

    def __init__(self, origin: Path, relays_per_pack: int = 100) -> None:
        self.origin = origin
        self.relays_per_pack = relays_per_pack
        self.proc: subprocess.Popen[bytes] | None = None
        self.relays_in_stream = 0
        self.mark = 0
        self.commits = 0
        self.raw_bytes = 0
        Writer.open.append(self)

    def _stdin(self) -> IO[bytes]:
        if self.proc is not None and self.relays_in_stream >= self.relays_per_pack:
            self.close()
        if self.proc is None:
            self.proc = subprocess.Popen(["git", "fast-import", "--quiet", "--depth=50"], cwd=self.origin,
                                         stdin=subprocess.PIPE, env=GIT_ENV)
            self.relays_in_stream = 0
            self.mark = 0
        assert self.proc.stdin is not None
        return self.proc.stdin

    def relay(self, relay: str, commits: list[Commit], exists: bool = False) -> None:
        """Append ``commits`` to ``status/<relay>`` (on its current tip when ``exists``)."""
        if not commits:
            return
        out = self._stdin()
        self.relays_in_stream += 1
        marks: dict[tuple[int, str], int] = {}
        paths = sorted({path for _, _, files in commits for path in files})
        for path in paths:
            for k, (_, _, files) in enumerate(commits):
                content = files.get(path)
                if content is not None:
                    self.mark += 1
                    marks[(k, path)] = self.mark
                    out.write(b"blob\nmark :%d\ndata %d\n%s\n" % (self.mark, len(content), content))
                    self.raw_bytes += len(content)
        ref = f"refs/heads/status/{relay}".encode()
        for k, (at, message, files) in enumerate(commits):
            data = message.encode()
            parts = [b"commit %s\ncommitter reconciler <reconciler@localhost> %d +0000\ndata %d\n%s\n"
                     % (ref, EPOCH0 + int(at), len(data), data)]
            if k == 0 and exists:
                parts.append(b"from %s^0\n" % ref)
            parts.extend(b"M 100644 :%d %s\n" % (marks[(k, path)], path.encode()) for path in sorted(files))
            parts.append(b"\n")
            out.write(b"".join(parts))
            self.commits += 1

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            if self.proc.wait() != 0:
                raise SystemExit("git fast-import failed")
            self.proc = None


@dataclass
class Publisher:
    """One layout's publishing for one relay: what was committed last, when the inventory is due."""

    relay: RelayModel
    inventory_interval: float  # 0: inventory and online counts live in every commit (the previous layout)
    phase: float
    committed: dict[str, bytes] = field(default_factory=dict)
    inventory_due: float = 0.0
    inventory: bytes = b""
    software: bytes = b""
    online: int = 0
    pushes: int = 0
    verified: int = 0
    stores: dict[str, GitStore] = field(default_factory=dict)
    seen: tuple[int, str | None] = (-1, None)  # the model's version and observedCommit last rendered

    def step(self, at: float, observed: str | None, verify: bool) -> dict[str, bytes] | None:
        """The files to commit at ``at`` (seconds into the day), or None when nothing a commit carries changed.

        ``verify``: if there is a commit, check its files against ``report.render_relay_status``.
        """
        relay = self.relay
        refresh = self.inventory_interval == 0 or at >= self.inventory_due or not self.committed
        if not refresh and self.seen == (relay.version, observed):
            return None  # nothing a commit carries changed (a relay skips its render on the same fingerprint)
        self.seen = (relay.version, observed)
        if refresh:
            if self.inventory_interval:
                while self.inventory_due <= at:
                    self.inventory_due = (self.inventory_due or self.phase) + self.inventory_interval
            self.inventory, self.online = relay.inventory_file()
            self.software = relay.software_file()
        job_files, digests = relay.job_files(observed)
        prefix = report.relay_prefix(relay.name)
        files = {**job_files, f"{prefix}relay.yaml": relay.relay_yaml(observed, digests, self.online),
                 f"{prefix}inventory.json": self.inventory, f"{prefix}{report.SOFTWARE_FILE}": self.software}
        changed = {path: data for path, data in files.items() if self.committed.get(path) != data}
        if not changed:
            return None
        if verify:
            reference = relay.reference_files(observed, relay.inventory() if refresh else self.snapshot())
            mine = {path: data for path, data in files.items() if not path.endswith(report.SOFTWARE_FILE)}
            if reference != mine:
                bad = sorted(p for p in set(reference) | set(mine) if reference.get(p) != mine.get(p))
                raise SystemExit(f"{relay.name}: incremental rendering differs from render_relay_status in {bad}")
            self.verified += 1
        self.committed = files
        return changed

    def snapshot(self) -> list[InventoryEntry]:
        """The inventory as last published (for the check: parsed back from the published file)."""
        return list(report.parse_relay_inventory(self.inventory, f"{report.relay_prefix(self.relay.name)}inventory.json")[1])


# ------------------------------------------------------------------ helpers


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=GIT_ENV).stdout.decode()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_objects(origin: Path) -> dict[str, int]:
    out = {}
    for line in git(origin, "count-objects", "-v").splitlines():
        key, _, value = line.partition(": ")
        out[key] = int(value)
    return out


def gc(origin: Path) -> float:
    started = time.perf_counter()
    git(origin, "gc", "--quiet", "--prune=now")
    return time.perf_counter() - started


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def make_main(root: Path, relays: int, rollouts: int) -> tuple[Path, list[str], list[str]]:
    """A bare origin whose main has a topology of ``relays`` relays; one commit per job added (the rollouts)."""
    bare, work = root / "origin.git", root / "main-work"
    git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    work.mkdir()
    git(work, "init", "--quiet", "--initial-branch=main")
    commits = []
    names: list[str] = []
    for k in range(rollouts + 1):
        for sub in ("packages", "jobs", "artifacts"):
            shutil.rmtree(work / sub, ignore_errors=True)
        names = [name for name, _ in synthetic_repo(work, relays, EXISTING_JOBS + k)]
        git(work, "add", "--all")
        git(work, "commit", "--quiet", "-m", f"jobs: {EXISTING_JOBS + k}")
        commits.append(git(work, "rev-parse", "HEAD").strip())
    git(work, "push", "--quiet", str(bare), "HEAD:main")
    return bare, names, commits


# --------------------------------------------------------------------- runs


def simulate(args: argparse.Namespace, root: Path) -> None:
    rollouts = [h * 3600.0 for h in args.rollout_hours]
    bare, names, mains = make_main(root, args.relays, len(rollouts))
    origins = {way: root / f"{way}.git" for way in ("start", "old", "new-subset")}
    for path in origins.values():
        git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(path))
    writer = Writer(bare)
    start_writer, old_writer, sub_writer = (Writer(origins[way]) for way in ("start", "old", "new-subset"))
    old_n = min(args.old_relays, len(names))
    hours = args.hours
    per_hour = [[0] * len(names) for _ in range(hours)]
    old_per_hour = [0] * hours
    old_per_relay = [0] * old_n
    phases = random.Random(1)
    verified = commits_made = 0
    started = time.perf_counter()

    def observed(at: float) -> str:
        return mains[sum(1 for r in rollouts if r <= at)]

    print(f"simulating {len(names)} relays x {args.clients} clients x {hours} h from {args.start_hour:02d}:00, relay by relay "
          f"(each relay's day is independent of the others')", flush=True)
    for n, name in enumerate(names):
        model = RelayModel(name, args.clients, 1000 + n, rollouts, args.laptops)
        pub = Publisher(model, args.inventory_interval, phases.uniform(0, args.inventory_interval))
        begin = args.start_hour * 3600.0
        model.advance(begin - STEP)
        files = pub.step(begin - STEP, observed(begin - STEP), verify=n == 0)
        assert files is not None
        # the state before the first step (yesterday's at 00:00), already on the origin: not counted
        first: Commit = (begin - STEP, f"status/{name}: accepted {observed(begin - STEP)[:12]}", files)
        start_writer.relay(name, [first])
        day: list[Commit] = [first]
        old_day: list[Commit] = [first]
        old_pub = Publisher(model, 0, 0, committed=dict(pub.committed), inventory=pub.inventory,
                            software=pub.software, online=pub.online) if n < old_n else None
        for hour in range(hours):
            for minute in range(60):
                at = begin + hour * 3600.0 + (minute + 1) * STEP
                if old_pub is not None:  # the previous layout: six 10 s publishes a minute, inventory live
                    for sub in range(STEP // OLD_STEP):
                        sub_at = at - STEP + (sub + 1) * OLD_STEP
                        model.advance(sub_at)
                        files = old_pub.step(sub_at, observed(sub_at), verify=False)
                        if files is not None:
                            old_day.append((sub_at, f"status/{name}: previous layout", files))
                            old_per_hour[hour] += 1
                            old_per_relay[n] += 1
                model.advance(at)
                head = observed(at)
                files = pub.step(at, head, args.verify_every > 0 and commits_made % args.verify_every == 0)
                if files is not None:
                    day.append((at, f"status/{name}: accepted {head[:12]}", files))
                    per_hour[hour][n] += 1
                    commits_made += 1
        verified += pub.verified
        writer.relay(name, day)
        if old_pub is not None:
            old_writer.relay(name, old_day)
            sub_writer.relay(name, day)
        if (n + 1) % max(1, len(names) // 10) == 0 or n + 1 == len(names):
            done = sum(sum(per_hour[h][:n + 1]) for h in range(hours))
            print(f"  {n + 1:5,} relays done: {done:9,} pushes ({done / (n + 1):5.1f} per relay), "
                  f"{mb(writer.raw_bytes)} raw, elapsed {time.perf_counter() - started:5.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    for w in Writer.open:
        w.close()
    sim_s = time.perf_counter() - started

    print(f"\nsimulated {hours} h of {len(names)} relays x {args.clients} clients in {sim_s:.0f} s; "
          f"{verified} commits checked byte-for-byte against report.render_relay_status")
    print("pushes are counted, not performed: every relay's commits went into the origin through git fast-import "
          "(the same commits, trees and blobs one push per commit makes; packed, where small pushes leave "
          f"loose objects): {commits_made:,} pushes at the 0.1-0.2 s one GitStore.publish takes on this machine "
          f"(--check-relays times them) would take {commits_made * 0.15 / 3600:.1f} h")
    rollout_hours = {h + k - args.start_hour for h in args.rollout_hours for k in (0, 1)}
    idle = [h for h in range(hours) if h not in rollout_hours]
    busy = [h for h in range(hours) if h in rollout_hours]
    total = sum(map(sum, per_hour))
    print(f"\npushes in {hours} h: {total:,} ({total / len(names):.0f} per relay). By hour of the day:")
    print(f"{'hour':<8} {'all relays':>11} {'per relay':>10} {'max relay':>10}")
    for h in range(hours):
        print(f"{h + args.start_hour:02d}:00{'*' if h in rollout_hours else ' ':<3} {sum(per_hour[h]):>11,} "
              f"{sum(per_hour[h]) / len(names):>10.1f} {max(per_hour[h]):>10}")
    for label, group in (("idle hours (mean)", idle), ("rollout hours* (mean)", busy)):
        if group:
            mean = sum(sum(per_hour[h]) for h in group) / len(group)
            print(f"{label:<22} {mean:>11,.0f} pushes/h, {mean / len(names):.1f} per relay, "
                  f"max {max(max(per_hour[h]) for h in group)} for one relay")

    sizes = {}
    for way, path in (("day", bare), *origins.items()):
        before = dir_bytes(path), count_objects(path)
        gc_s = gc(path)
        sizes[way] = (before, dir_bytes(path), gc_s)
    (day_before, objects), day_after, gc_s = sizes["day"]
    start_after = sizes["start"][1]
    added = day_after - start_after
    print(f"\norigin: {writer.commits - len(names):,} commits in {hours} h, {mb(writer.raw_bytes)} of changed files "
          f"committed (raw, including yesterday's {len(names)} states)")
    print(f"  before gc: {mb(day_before)} ({objects['count']:,} loose objects, {objects['packs']} packs from "
          f"fast-import, {objects['in-pack']:,} objects in packs)")
    print(f"  after git gc --prune=now ({gc_s:.0f} s): {mb(day_after)}; yesterday's states alone: {mb(start_after)}")
    print(f"  added by the {hours} simulated h (after gc): {mb(added)}, {mb(added / len(names))} per relay")
    if hours == 24:
        print(f"  extrapolated, linear (not simulated): a year without a bound {mb(start_after + added * 365)}; with "
              f"--status-history-days 30 (squashed at 37.5 days) the origin holds "
              f"{mb(start_after + added * 30)}-{mb(start_after + added * 37.5)}")

    env = {**GIT_ENV, "PYTHONPATH": str(PROJECT_ROOT)}
    for label in ("fresh workdir: mirror fetch + validate + aggregate + publish", "again, nothing moved"):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "reconciler", "hq", "--once", "--origin", str(bare),
                               "--workdir", str(root / "hq")], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, check=False)
        lines = [line.split("INFO ", 1)[-1] for line in proc.stderr.splitlines() if "pass:" in line][-1:]
        print(f"{'' if 'again' in label else chr(10)}reconciler hq --once ({label}): {time.perf_counter() - t:.1f} s, "
              f"exit {proc.returncode}; {lines[0].strip() if lines else proc.stderr[-300:]}")

    hq_aggregation(bare, root / "hq-parts", mains[-1])

    for way in ("--mirror", "--bare"):
        target = root / f"clone{way}.git"
        t = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", way, "--no-local", str(bare), str(target)], check=True, env=GIT_ENV)
        print(f"git clone {way} --no-local of the origin after gc: {time.perf_counter() - t:.1f} s, "
              f"{mb(dir_bytes(target))} on disk")
        shutil.rmtree(target)

    if old_n:
        old_added = sizes["old"][1] - start_after * old_n / len(names)
        sub_added = sizes["new-subset"][1] - start_after * old_n / len(names)
        old_total = sum(old_per_relay)
        sub_total = sum(sum(per_hour[h][:old_n]) for h in range(hours))
        print(f"\nprevious layout (inventory and online counts in every commit, publish interval {OLD_STEP} s) "
              f"and this one, the same {old_n} relays x {args.clients} clients, {hours} h "
              f"(growth: origin after gc less yesterday's states, scaled from the whole origin's):")
        print(f"{'':<30} {'previous':>12} {'now':>12} {'ratio':>7}")
        print(f"{f'pushes per relay in {hours} h':<30} {old_total / old_n:>12,.0f} {sub_total / old_n:>12,.0f} "
              f"{old_total / max(1, sub_total):>7.1f}")
        peak_old = max(old_per_hour) / old_n
        peak_new = max(sum(per_hour[h][:old_n]) for h in range(hours)) / old_n
        print(f"{'pushes per relay, peak hour':<30} {peak_old:>12,.0f} {peak_new:>12,.0f} "
              f"{peak_old / max(1, peak_new):>7.1f}")
        print(f"{'raw bytes committed':<30} {mb(old_writer.raw_bytes):>12} {mb(sub_writer.raw_bytes):>12} "
              f"{old_writer.raw_bytes / max(1, sub_writer.raw_bytes):>7.1f}")
        print(f"{'origin growth after gc':<30} {mb(old_added):>12} {mb(sub_added):>12} "
              f"{old_added / max(1, sub_added):>7.1f}")


def hq_aggregation(bare: Path, workdir: Path, main: str) -> None:
    """HQ's first pass in parts, in process (as ``hq_bench.py`` does): the mirror fetch, then the aggregation."""
    store = GitStore(str(bare), workdir)
    t = time.perf_counter()
    store.fetch()
    fetch_s = time.perf_counter() - t
    hq = Hq(store)
    hq._restored = True
    hq._evaluate(store.ref_sha("main"))
    assert hq.accepted_commit == main, hq.validation_errors[:3]
    specs = hq._accepted_specs()
    t = time.perf_counter()
    statuses, read = hq._read_relays(specs)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    files = report.render_hq_status(report.aggregate(specs, Accepted(hq.accepted_commit, hq.accepted_at, main, True),
                                                     "main", (), statuses))
    pure_s = time.perf_counter() - t
    print(f"HQ in process, fresh workdir: fetch (mirror every status branch) {fetch_s:.1f} s; read + parse {read} "
          f"relay.yaml {read_s:.2f} s; aggregate + render {pure_s:.2f} s ({len(files)} files)")


def check_real_pushes(args: argparse.Namespace, root: Path) -> None:
    """The same relays' commits for one simulated hour, once through GitStore.publish, once through fast-import."""
    rollouts = [h * 3600.0 for h in args.rollout_hours]
    names = [f"site-{n:04d}" for n in range(args.check_relays)]
    origins = {way: root / f"check-{way}.git" for way in ("publish", "fast-import")}
    for path in origins.values():
        git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(path))
        # no gc --auto after a push (past 6,700 loose objects): the sizes before gc are the pushes' own
        git(path, "config", "receive.autogc", "false")
    writer = Writer(origins["fast-import"])
    phases = random.Random(2)
    start = args.check_hour * 3600.0
    commit = "0" * 40
    pushes = 0
    publish_s = 0.0
    sizes0: dict[str, int] = {}
    pubs: list[Publisher] = []
    t = time.perf_counter()
    for first_pass in (True, False):  # yesterday's state of every relay first, then the hour
        for n, name in enumerate(names):
            if first_pass:
                model = RelayModel(name, args.clients, 5000 + n, rollouts, args.laptops)
                pub = Publisher(model, args.inventory_interval, phases.uniform(0, args.inventory_interval))
                model.advance(start)
                files = pub.step(start, commit, verify=False)
                assert files is not None
                store = GitStore(str(origins["publish"]), root / "check-work" / name)
                assert store.publish(f"status/{name}", pub.committed, "status") is not None
                pub.stores["s"] = store
                writer.relay(name, [(start, "status", files)])
                pubs.append(pub)
                continue
            pub = pubs[n]
            store = pub.stores["s"]
            day: list[Commit] = []
            for minute in range(60):
                at = start + (minute + 1) * STEP
                pub.relay.advance(at)
                files = pub.step(at, commit, verify=False)
                if files is None:
                    continue
                before = time.perf_counter()
                assert store.publish(f"status/{name}", pub.committed, "status") is not None
                publish_s += time.perf_counter() - before
                day.append((at, "status", files))
                pushes += 1
            writer.relay(name, day, exists=True)
        if first_pass:
            writer.close()
            sizes0 = {way: dir_bytes(path) for way, path in origins.items()}
    writer.close()
    before_gc = {way: (dir_bytes(path) - sizes0[way], count_objects(path)) for way, path in origins.items()}
    for path in origins.values():
        gc(path)
    after_gc = {way: dir_bytes(path) for way, path in origins.items()}
    for path in origins.values():  # deltas found again (none reused), the same way for both
        git(path, "repack", "-a", "-d", "-f", "--window=10", "--depth=50")
    after_f = {way: dir_bytes(path) for way, path in origins.items()}
    print(f"\ncheck: {args.check_relays} relays x {args.clients} clients, {args.check_hour:02d}:00-"
          f"{args.check_hour + 1:02d}:00, {pushes} commits each way ({time.perf_counter() - t:.0f} s; "
          f"GitStore.publish: {publish_s / max(1, pushes) * 1000:.0f} ms per real push)")
    print(f"{'':<28} {'GitStore.publish':>17} {'fast-import':>12} {'ratio':>7}")
    print(f"{'added before gc':<28} {mb(before_gc['publish'][0]):>17} {mb(before_gc['fast-import'][0]):>12} "
          f"{before_gc['publish'][0] / max(1, before_gc['fast-import'][0]):>7.2f}")
    print(f"{'  loose objects, packs':<28} {before_gc['publish'][1]['count']:>11,}, {before_gc['publish'][1]['packs']:>3}"
          f" {before_gc['fast-import'][1]['count']:>6,}, {before_gc['fast-import'][1]['packs']:>3}")
    print(f"{'origin after gc':<28} {mb(after_gc['publish']):>17} {mb(after_gc['fast-import']):>12} "
          f"{after_gc['publish'] / max(1, after_gc['fast-import']):>7.2f}")
    print(f"{'after git repack -a -d -f':<28} {mb(after_f['publish']):>17} {mb(after_f['fast-import']):>12} "
          f"{after_f['publish'] / max(1, after_f['fast-import']):>7.2f}")


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relays", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--start-hour", type=int, default=0,
                        help="publish from this hour of the day on (the fleet's day before it is simulated, not published)")
    parser.add_argument("--rollouts", default="10,14", help="hours of the day at which a commit adds a job")
    parser.add_argument("--inventory-interval", type=float, default=900.0)
    parser.add_argument("--laptops", type=float, default=0.15,
                        help="share of clients on for a few sessions a day (the churn); a quarter is always on")
    parser.add_argument("--old-relays", type=int, default=2, help="relays also published the previous way")
    parser.add_argument("--check-relays", type=int, default=5, help="relays of the GitStore.publish check (0: none)")
    parser.add_argument("--check-hour", type=int, default=10)
    parser.add_argument("--verify-every", type=int, default=1440,
                        help="check one relay's files against render_relay_status every N relay-steps (0: never)")
    parser.add_argument("--quick", action="store_true", help="10 relays x 200 clients, 12 h, a small check")
    parser.add_argument("--keep", type=Path, help="keep the origins in this directory")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.relays, args.clients, args.hours = 10, 200, 12
        args.old_relays, args.check_relays, args.verify_every = 1, 2, 7
    args.rollout_hours = [int(h) for h in args.rollouts.split(",") if h.strip()]
    load = os.getloadavg()
    print(f"scale_sim: {' '.join(sys.argv[1:]) or '(defaults)'}; {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}, {git(Path.cwd(), '--version').strip()}; "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-sim-") as tmp:
        root = (args.keep or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        try:
            simulate(args, root)
            if args.check_relays:
                check_real_pushes(args, root)
        finally:
            for writer in Writer.open:
                writer.kill()
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
