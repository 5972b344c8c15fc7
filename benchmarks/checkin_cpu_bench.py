"""CPU per steady-state check-in of the relay app, in process (no HTTP), one tree against another.

A real SQLite file in a temp dir, ``--clients`` clients registered and
converged (5 install jobs reaching all, every package installed), then
``--checkins`` check-ins round-robin that change nothing but free disk
space, called on :class:`~reconciler.relay.server.RelayApp` directly from
one thread. Prints the CPU time per check-in (``time.process_time``; the
neighbours' load moves it much less than wall time) and how many write
transactions SQLite saw (``total_changes`` of the check-in connection).

Each ``--trees`` checkout runs in its own subprocess (its ``reconciler``
package first on ``PYTHONPATH``), alternating, ``--rounds`` times::

    python benchmarks/checkin_cpu_bench.py --trees /work/main,. --clients 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ENROLL = "checkin-cpu-bench-enrolment-secret-0123"


def measure(clients: int, checkins: int, jobs: int) -> dict[str, Any]:
    """Run in the tree under test (its ``reconciler`` is the one imported)."""
    from reconciler.relay.server import RelayApp, Trust
    from reconciler.relay.state import RelayState, StagedArtifact, make_generation
    from reconciler.relay.store import Store
    from reconciler.specs import parse_repo

    files = {"topology.yaml": b"apiVersion: reconciler/v1\nkind: Topology\nmetadata: {name: t}\n"
                              b"spec: {headquarters: hq-x, relays: [{name: relay-a, parent: hq-x}]}\n"}
    for i in range(jobs):
        files[f"packages/app{i}.yaml"] = (
            f"apiVersion: reconciler/v1\nkind: Package\nmetadata: {{name: app{i}-1.0}}\n"
            f"spec:\n  name: app{i}\n  version: '1.0'\n  artifact: {{path: artifacts/app{i}}}\n"
            f"  installer: {{type: files}}\n").encode()
        files[f"jobs/install-app{i}.yaml"] = (
            f"apiVersion: reconciler/v1\nkind: Job\nmetadata: {{name: install-app{i}}}\n"
            f"spec:\n  jobType: install\n  package: {{name: app{i}, version: '1.0'}}\n"
            f"  destinationType: allLowerClients\n  destinations: [relay-a]\n"
            f"  rollout: {{maxConcurrent: 50, maxFailures: '10%'}}\n").encode()
    result = parse_repo(files, lambda path: None)
    assert result.specs is not None, result.errors
    with tempfile.TemporaryDirectory(prefix="checkin-cpu-") as tmp:
        store = Store(Path(tmp))
        state = RelayState("relay-a", store, poll_seconds=30)
        state.generation = make_generation(
            "c" * 40, result.specs, "relay-a",
            artifacts={(f"app{i}", "1.0"): StagedArtifact("ab" * 32, 10, "tar") for i in range(jobs)})
        clock = [datetime(2026, 3, 1, tzinfo=timezone.utc)]
        app = RelayApp(state, Path(tmp) / "cache", trust=Trust(enroll_secret=ENROLL), now=lambda: clock[0])
        inventory = [{"name": f"app{i}", "version": "1.0"} for i in range(jobs)]
        tokens: dict[str, str] = {}

        def call(client: str, disk: int) -> dict[str, Any]:
            body = json.dumps({"facts": {"os": "linux", "arch": "x86_64", "hostname": client, "freeDiskMB": disk},
                               "labels": {"dept": "eng"}, "inventory": inventory, "results": []}).encode()
            environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/json",
                       "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
            if client in tokens:
                environ["HTTP_AUTHORIZATION"] = f"Bearer {tokens[client]}"
            else:
                environ["HTTP_X_RECONCILER_ENROLLMENT"] = ENROLL
            return app.checkin(client, environ)  # type: ignore[return-value]

        ids = [f"pc-{i:06d}" for i in range(clients)]
        for client in ids:
            reply = call(client, 50_000)
            tokens[client] = reply["token"]
        for client in ids:  # the first token use confirms the registration (a write)
            call(client, 50_000)
        changes = store.db.total_changes
        started_cpu, started = time.process_time(), time.perf_counter()
        for n in range(checkins):
            clock[0] += timedelta(milliseconds=1)
            call(ids[n % clients], 50_000 - n % 997)
        cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
        written = store.db.total_changes - changes
        flush = getattr(store, "flush_seen", None)
        flushed = flush() if flush is not None else 0
        store.close()
    return {"cpu_us": cpu / checkins * 1e6, "wall_us": wall / checkins * 1e6, "rows_written": written,
            "flushed": flushed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default=".", help="comma-separated checkouts to compare (default: this one)")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--checkins", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.clients, args.checkins, args.jobs)))
        return 0
    print(f"check-in CPU benchmark: {args.clients} clients, {args.checkins} check-ins per run, {args.jobs} jobs; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    runs: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
    for round_ in range(args.rounds):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run([sys.executable, __file__, "--child", "--clients", str(args.clients),
                                  "--checkins", str(args.checkins), "--jobs", str(args.jobs)],
                                 capture_output=True, text=True, env=env, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs[tree].append(run)
            print(f"round {round_ + 1} {tree}: {run['cpu_us']:.0f} µs CPU, {run['wall_us']:.0f} µs wall per check-in, "
                  f"{run['rows_written']} rows written by {args.checkins} check-ins, {run['flushed']} flushed after")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = statistics.median(r["cpu_us"] for r in runs[trees[0]])
    for tree in trees:
        median = statistics.median(r["cpu_us"] for r in runs[tree])
        print(f"{tree}: median {median:.0f} µs CPU per check-in ({median / base:.2f} x {trees[0].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
