"""Benchmark: HQ's reaction time to a push, and its aggregation over 1,000 relays.

(a) **push → HQ pass started.** A bare origin on local disk holding the
    example repo; ``reconciler hq`` runs in the background as a subprocess
    (poll interval one hour, so only the watch on the origin's refs can wake
    it). Each of ``--pushes`` pushes changes ``README.md`` on ``main``; the
    pass that accepts that commit logs ``pass: accepted main <sha> ... (N s)``.
    The pass started at (time the line arrived − N s); the latency is that
    minus the time ``git push`` was started. Also reported: push → the new
    ``status/hq`` commit on the origin (the pass finished and published).
    Target: median push → pass started under 1 s.

(b) **aggregation.** An origin whose ``main`` holds a topology of
    ``--relays`` relays (regions with nested sites) and ``--jobs`` jobs, and
    one ``status/<relay>`` ref per relay with ``--clients`` clients each
    (rendered with ``report.render_relay_status``, written in one go with
    ``git fast-import``). Times, on a fresh HQ workdir:

    - ``fetch``: mirroring the origin (all refs), for context;
    - ``aggregate (cold)``: reading every relay's ``relay.yaml`` from git,
      parsing, aggregating and rendering ``status/hq`` (everything a pass
      does after the fetch, except the push);
    - ``full first pass``: fetch + validate + aggregate + publish;
    - ``steady pass``: one relay ref moved, the next pass (only it is re-read);
    - ``pure aggregate + render``: :func:`report.aggregate` and
      :func:`report.render_hq_status` alone on parsed statuses.

    Target: aggregation over 1,000 relays × 100 clients under 5 s.

    python benchmarks/hq_bench.py [--pushes 20] [--relays 1000] [--clients 100] [--jobs 3] [--only a|b]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import queue
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from reconciler import report  # noqa: E402
from reconciler.gitstore import GitStore  # noqa: E402
from reconciler.hq import Hq  # noqa: E402
from reconciler.plan import ClientState, Installed, JobRollup, Plan, Row  # noqa: E402
from reconciler.report import HQ_STATUS_REF, Accepted, InventoryEntry  # noqa: E402
from reconciler.resources import example_repo_dir  # noqa: E402

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@reconciler.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@reconciler.invalid",
}


def git(cwd: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, input=input,
                          env={**os.environ, **GIT_ENV}).stdout.decode()


def make_origin(root: Path, content: Path | None = None) -> tuple[Path, Path]:
    bare, work = root / "origin.git", root / "work"
    git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    if content is not None:
        shutil.copytree(content, work)
    else:
        work.mkdir()
    git(work, "init", "--quiet", "--initial-branch=main")
    git(work, "remote", "add", "origin", str(bare))
    return bare, work


def commit_and_push(work: Path, message: str) -> str:
    git(work, "add", "--all")
    git(work, "commit", "--quiet", "--allow-empty", "-m", message)
    git(work, "push", "--quiet", "origin", "HEAD:main")
    return git(work, "rev-parse", "HEAD").strip()


# ----------------------------------------------------------------- (a) latency


def bench_push_latency(pushes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hq-bench-a-") as tmp:
        root = Path(tmp)
        bare, work = make_origin(root, example_repo_dir())
        commit_and_push(work, "example repo")
        env = {**os.environ, **GIT_ENV, "PYTHONPATH": str(PROJECT_ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "hq", "--origin", str(bare), "--workdir", str(root / "hq"),
             "--poll-interval", "3600"],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[tuple[float, str]] = queue.Queue()

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.put((time.monotonic(), line))

        threading.Thread(target=pump, daemon=True).start()

        def wait_line(pattern: str, timeout: float = 30) -> tuple[float, re.Match[str]]:
            deadline = time.monotonic() + timeout
            while True:
                at, line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                match = re.search(pattern, line)
                if match:
                    return at, match

        def status_sha() -> str:
            return git(bare, "rev-parse", f"refs/heads/{HQ_STATUS_REF}").strip()

        try:
            wait_line(r"pass: accepted main")
            to_start: list[float] = []
            to_published: list[float] = []
            for i in range(pushes):
                (work / "README.md").write_text(f"push {i}\n")
                git(work, "add", "--all")
                git(work, "commit", "--quiet", "-m", f"push {i}")
                before = status_sha()
                pushed_at = time.monotonic()
                git(work, "push", "--quiet", "origin", "HEAD:main")
                head = git(work, "rev-parse", "HEAD").strip()
                arrived, match = wait_line(rf"pass: accepted main {head[:12]}.*\((\d+\.\d+)s\)")
                to_start.append(arrived - float(match.group(1)) - pushed_at)
                # The pass published before it logged, so status/hq has moved by now.
                assert status_sha() != before
                to_published.append(arrived - pushed_at)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
        print(f"(a) push -> HQ pass started, local origin, {pushes} pushes:")
        print(f"    median {statistics.median(to_start) * 1000:.0f} ms, "
              f"max {max(to_start) * 1000:.0f} ms  (target < 1000 ms)")
        print(f"    push -> status/hq published: median {statistics.median(to_published) * 1000:.0f} ms, "
              f"max {max(to_published) * 1000:.0f} ms")


# ------------------------------------------------------------- (b) aggregation


def synthetic_repo(work: Path, relays: int, jobs: int) -> list[tuple[str, str]]:
    """Topology of ``relays`` relays: regions of ~32, half of each region's sites nested one deeper."""
    names: list[tuple[str, str]] = []
    regions = max(1, relays // 32)
    for r in range(regions):
        names.append((f"region-{r:02d}", "hq"))
    index = 0
    while len(names) < relays:
        region = f"region-{index % regions:02d}"
        site = f"site-{index:04d}"
        parent = region if index % 2 == 0 or not names[-1][0].startswith("site-") else names[-1][0]
        names.append((site, parent))
        index += 1
    lines = ["apiVersion: reconciler/v1", "kind: Topology", "metadata: {name: bench}", "spec:",
             "  headquarters: hq-central", "  relays:"]
    for name, parent in names:
        lines.append(f"    - {{name: {name}, parent: {'hq-central' if parent == 'hq' else parent}}}")
    (work / "topology.yaml").write_text("\n".join(lines) + "\n")
    (work / "packages").mkdir()
    (work / "jobs").mkdir()
    (work / "artifacts").mkdir()
    for j in range(jobs):
        (work / "artifacts" / f"tool-{j}.txt").write_text(f"tool {j}\n")
        (work / "packages" / f"tool-{j}.yaml").write_text(
            f"apiVersion: reconciler/v1\nkind: Package\nmetadata: {{name: tool-{j}}}\nspec:\n"
            f"  name: tool-{j}\n  version: \"1.{j}\"\n  artifact: {{path: artifacts/tool-{j}.txt}}\n"
            f"  installer: {{type: files}}\n")
        destinations = ", ".join(f"region-{r:02d}" for r in range(regions))
        (work / "jobs" / f"install-tool-{j}.yaml").write_text(
            f"apiVersion: reconciler/v1\nkind: Job\nmetadata: {{name: install-tool-{j}}}\nspec:\n"
            f"  jobType: install\n  package: {{name: tool-{j}, version: \"1.{j}\"}}\n"
            f"  destinationType: allLowerClients\n  destinations: [{destinations}]\n")
    return names


STATES = [ClientState.SUCCEEDED] * 90 + [ClientState.FAILED] * 3 + [ClientState.IN_PROGRESS] * 3 + \
         [ClientState.PENDING] * 2 + [ClientState.SKIPPED] * 2


def relay_status_files(relay: str, commit: str, clients: int, jobs: int, rng: random.Random) -> dict[str, bytes]:
    t0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
    ids = [f"{relay}-pc-{i:04d}" for i in range(clients)]
    rows, rollups, updated = [], [], {}
    for j in range(jobs):
        job = f"install-tool-{j}"
        states = []
        for client in ids:
            state = rng.choice(STATES)
            states.append(state)
            installed = f"1.{j}" if state is ClientState.SUCCEEDED else None
            message = "exit 1603: installer failed: another installation is in progress" \
                if state is ClientState.FAILED else ""
            rows.append(Row(job, relay, client, state, None, f"tool-{j}", f"1.{j}", installed,
                            1 if state in (ClientState.SUCCEEDED, ClientState.FAILED) else 0, message))
            updated[(job, client)] = t0 + timedelta(seconds=rng.randrange(86400))
        counts = report.count_states(states)
        rollups.append(JobRollup(job, report.job_state(counts), counts))
    inventory = [InventoryEntry(c, {"os": "windows", "arch": "x86_64", "hostname": c, "freeDiskMB": 50000},
                                {"dept": "sales"}, tuple(Installed(f"tool-{j}", f"1.{j}") for j in range(jobs)), True)
                 for c in ids]
    plan = Plan(relay, tuple(rows), (), tuple(rollups))
    return report.render_relay_status(relay, commit, plan, updated, inventory, [])


def fast_import(bare: Path, refs: dict[str, dict[str, bytes]]) -> None:
    chunks: list[bytes] = []
    for ref, files in refs.items():
        message = f"status of {ref}".encode()
        chunks.append(f"commit refs/heads/{ref}\ncommitter bench <bench@reconciler.invalid> 1795000000 +0000\n"
                      f"data {len(message)}\n".encode() + message + b"\n")
        for path, data in sorted(files.items()):
            chunks.append(f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n")
        chunks.append(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], cwd=bare, input=b"".join(chunks), check=True)


def bench_aggregation(relays: int, clients: int, jobs: int, profile: bool = False, repeat: int = 3) -> None:
    with tempfile.TemporaryDirectory(prefix="hq-bench-b-") as tmp:
        root = Path(tmp)
        bare, work = make_origin(root)
        names = synthetic_repo(work, relays, jobs)
        main = commit_and_push(work, "synthetic fleet")
        started = time.monotonic()
        rng = random.Random(42)
        refs = {f"status/{name}": relay_status_files(name, main, clients, jobs, rng) for name, _ in names}
        render_s = time.monotonic() - started
        size = sum(len(d) for files in refs.values() for d in files.values())
        fast_import(bare, refs)
        print(f"(b) {relays} relay refs x {clients} clients x {jobs} jobs "
              f"({relays * clients * jobs:,} rows, {size / 1e6:.0f} MB of status; "
              f"relays rendered in {render_s:.1f} s, {render_s / relays * 1000:.1f} ms each)")

        # Cold aggregation on a fresh HQ, fetch separated out.
        store = GitStore(str(bare), root / "hq-a")
        t = time.monotonic()
        store.fetch()
        fetch_s = time.monotonic() - t
        hq = Hq(store)
        hq._restored = True
        hq._evaluate(store.ref_sha("main"))
        assert hq.accepted_commit == main, hq.validation_errors[:3]
        specs = hq._accepted_specs()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        t = time.monotonic()
        statuses, read = hq._read_relays(specs)
        read_s = time.monotonic() - t
        t = time.monotonic()
        accepted = Accepted(hq.accepted_commit, hq.accepted_at, main, True)
        hq_report = report.aggregate(specs, accepted, "main", (), statuses)
        files = report.render_hq_status(hq_report)
        pure_s = time.monotonic() - t
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        assert read == relays and len(files) == jobs + 4
        print(f"    fetch (mirror the origin):          {fetch_s:6.2f} s")
        print(f"    aggregate (cold): read + parse      {read_s:6.2f} s  ({relays} relay.yaml from git)")
        print(f"                      aggregate+render  {pure_s:6.2f} s")
        print(f"                      total             {read_s + pure_s:6.2f} s  (target < 5 s)")

        # A real first pass, end to end, on another fresh workdir.
        t = time.monotonic()
        first = Hq(GitStore(str(bare), root / "hq-b")).run_pass()
        full_s = time.monotonic() - t
        assert first.published is not None
        # Steady state: one relay moved.
        hq_b = Hq(GitStore(str(bare), root / "hq-b"))
        hq_b.run_pass()
        moved = names[len(names) // 2][0]
        GitStore(str(bare), root / "relay").publish(
            f"status/{moved}", relay_status_files(moved, main, clients, jobs, random.Random(7)), "moved")
        t = time.monotonic()
        steady = hq_b.run_pass()
        steady_s = time.monotonic() - t
        assert steady.relays_read == 1 and steady.published is not None
        t = time.monotonic()
        idle = hq_b.run_pass()
        idle_s = time.monotonic() - t
        assert idle.published is None
        print(f"    full first pass (fetch+validate+aggregate+publish): {full_s:6.2f} s")
        print(f"    steady pass, one relay moved:                       {steady_s:6.2f} s")
        print(f"    idle pass, nothing moved (no commit):               {idle_s:6.2f} s")
        summary = files[report.SUMMARY_FILE]
        print(f"    status/hq size: {sum(len(d) for d in files.values()) / 1e3:.0f} kB, "
              f"summary.md {len(summary) / 1e3:.1f} kB, {len(summary.splitlines())} lines")

        # The cold read + parse again, interleaved: relay.yaml read line by line (report.load_dumped) and
        # through the YAML parser alone (what HQ did before), on the same fetched mirror.
        if repeat:
            fast_reader = report.load_dumped
            times: dict[str, list[float]] = {"line reader": [], "yaml only": []}
            for round_ in range(repeat):
                for way in (("line reader", "yaml only") if round_ % 2 == 0 else ("yaml only", "line reader")):
                    report.load_dumped = fast_reader if way == "line reader" else (lambda data: None)  # type: ignore[assignment]
                    fresh = Hq(store)
                    fresh._restored = True
                    fresh._evaluate(store.ref_sha("main"))
                    specs_again = fresh._accepted_specs()
                    t = time.monotonic()
                    again, _ = fresh._read_relays(specs_again)
                    report.render_hq_status(report.aggregate(specs_again, accepted, "main", (), again))
                    times[way].append(time.monotonic() - t)
            report.load_dumped = fast_reader
            medians = {way: statistics.median(values) for way, values in times.items()}
            print(f"    cold read + parse + aggregate + render, median of {repeat}: line reader "
                  f"{medians['line reader']:.2f} s, yaml only {medians['yaml only']:.2f} s, "
                  f"ratio {medians['yaml only'] / medians['line reader']:.2f}")

        # HQ as a process: one pass on a fresh workdir (fetch, validate, aggregate, publish), its peak memory.
        env = {**os.environ, **GIT_ENV, "PYTHONPATH": str(PROJECT_ROOT)}
        t = time.monotonic()
        # the Python process's own peak (RUSAGE_SELF) apart from the git processes it ran (with a local
        # origin those include the origin's upload-pack and pack-objects)
        script = ("import resource, sys; from reconciler.cli import main; code = main(sys.argv[1:]); "
                  "print('self', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'children', "
                  "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
        proc = subprocess.run([sys.executable, "-c", script, "hq", "--origin", str(bare), "--workdir",
                               str(root / "hq-process"), "--once"], cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        once_s = time.monotonic() - t
        assert proc.returncode == 0, proc.stderr[-2000:]
        fields = proc.stderr.split()[-4:]
        print(f"    hq --once, fresh workdir (a process): {once_s:6.2f} s, peak resident memory: HQ (Python) "
              f"{int(fields[1]) / 1024:.0f} MB, largest git process under it {int(fields[3]) / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--relays", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b"])
    parser.add_argument("--profile", action="store_true", help="(b): cProfile of the cold aggregation, top 30")
    parser.add_argument("--repeat", type=int, default=3,
                        help="(b): rounds of the cold read with and without the line reader, interleaved (0: none)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"{git(Path.cwd(), '--version').strip()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.only in (None, "a"):
        bench_push_latency(args.pushes)
    if args.only in (None, "b"):
        bench_aggregation(args.relays, args.clients, args.jobs, args.profile, args.repeat)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
