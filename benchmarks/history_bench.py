"""Benchmark: what a fresh clone of the origin costs after a month of status publishing, with and without a bound.

A relay publishing ``status/<relay>`` once a minute for ``--days`` days is
simulated with ``git fast-import`` (one commit per minute; each commit
changes the rows of ``--changed`` of ``--clients`` clients in one job file
and touches ``relay.yaml``, as a rollout with some churn does). Two origins
get the same month:

- ``keep all``: the history as it grows without a bound;
- ``bounded``: the same, then one ``GitStore.publish`` with
  ``History(days=--keep-days)`` and the clock at the end of the month, which
  squashes everything older than the bound (what a relay running with
  ``--status-history-days`` does once its history is a quarter past it).

Each origin is then packed (``git gc --prune=now``, as a hosted service
does in time), and a fresh ``git clone --mirror`` is timed (median of
``--rounds``). Printed: commits, origin size after gc, clone wall time and
bytes received, and the ratios.

    python benchmarks/history_bench.py [--days 30] [--keep-days 7] [--clients 1000] [--changed 10]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from reconciler.gitstore import GitStore, History  # noqa: E402

GIT_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
REF = "status/relay-kanto"


def write_month(origin: Path, start: int, minutes: int, clients: int, changed: int) -> None:
    """Feed ``git fast-import`` one status commit per minute from ``start`` (Unix seconds), as it is made."""
    rng = random.Random(7)
    rows = [f"- client: pc-{i:05d}\n  state: Succeeded\n  message: installed\n" for i in range(clients)]
    proc = subprocess.Popen(["git", "fast-import", "--quiet"], cwd=origin, stdin=subprocess.PIPE, env=GIT_ENV)
    assert proc.stdin is not None
    proc.stdin.write(f"reset refs/heads/{REF}\n\n".encode())
    for minute in range(minutes):
        for i in rng.sample(range(clients), changed):
            state = rng.choice(("Succeeded", "InProgress", "Failed", "Pending"))
            rows[i] = f"- client: pc-{i:05d}\n  state: {state}\n  message: attempt {minute}\n"
        job = ("job: install-7zip\nrows:\n" + "".join(rows)).encode()
        stamp = start + minute * 60
        relay = f"relay: relay-kanto\nupdatedAt: {stamp}\n".encode()
        message = f"status/relay-kanto: minute {minute}".encode()
        proc.stdin.write(b"".join((
            f"commit refs/heads/{REF}\ncommitter bench <bench@example.invalid> {stamp} +0000\n".encode(),
            b"data %d\n%s\n" % (len(message), message),
            b"M 100644 inline relays/relay-kanto/jobs/install-7zip.yaml\ndata %d\n%s\n" % (len(job), job),
            b"M 100644 inline relays/relay-kanto/relay.yaml\ndata %d\n%s\n\n" % (len(relay), relay))))
    proc.stdin.close()
    if proc.wait() != 0:
        raise SystemExit("git fast-import failed")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clone_cost(origin: Path, work: Path, rounds: int) -> tuple[float, int, int]:
    """Median wall seconds of a fresh mirror clone, the clone's size on disk, its commit count."""
    times = []
    size = commits = 0
    for n in range(rounds):
        target = work / f"clone-{n}.git"
        started = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", "--mirror", "--no-local", str(origin), str(target)], check=True,
                       env=GIT_ENV)
        times.append(time.perf_counter() - started)
        size = dir_bytes(target)
        commits = int(subprocess.run(["git", f"--git-dir={target}", "rev-list", "--all", "--count"], check=True,
                                     capture_output=True, text=True).stdout)
        shutil.rmtree(target)
    return statistics.median(times), size, commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keep-days", type=float, default=7.0)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10, help="clients whose row changes each minute")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    minutes = args.days * 24 * 60
    end = int(time.time())
    start = end - minutes * 60
    with tempfile.TemporaryDirectory(prefix="history-bench-") as tmp:
        root = Path(tmp)
        origins = {way: root / f"{way.replace(' ', '-')}.git" for way in ("keep all", "bounded")}
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origins["keep all"])],
                       check=True)
        made = time.perf_counter()
        write_month(origins["keep all"], start, minutes, args.clients, args.changed)
        print(f"(wrote {minutes:,} commits in {time.perf_counter() - made:.0f} s)")
        shutil.copytree(origins["keep all"], origins["bounded"])
        store = GitStore(str(origins["bounded"]), root / "writer", history=History(days=args.keep_days, commits=None))
        store.clock = lambda: float(end + 60)
        started = time.perf_counter()
        store.publish(REF, {"relays/relay-kanto/relay.yaml": b"relay: relay-kanto\n"}, "status/relay-kanto: next")
        squash_s = time.perf_counter() - started
        figures = {}
        for way, origin in origins.items():
            subprocess.run(["git", f"--git-dir={origin}", "gc", "--quiet", "--prune=now"], check=True, env=GIT_ENV)
            wall, size, commits = clone_cost(origin, root, args.rounds)
            figures[way] = (commits, dir_bytes(origin), wall, size)
        load = os.getloadavg()
        print(f"{args.days} simulated days of one publish a minute ({minutes:,} commits), {args.clients} clients, "
              f"{args.changed} rows changing a minute; bound {args.keep_days:g} days "
              f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        print(f"publish that squashed: {squash_s:.2f} s")
        print(f"{'':<10} {'commits':>8} {'origin after gc':>16} {'clone wall':>11} {'clone size':>11}")
        for way, (commits, origin_size, wall, size) in figures.items():
            print(f"{way:<10} {commits:>8,} {origin_size / 1e6:>14.1f}MB {wall:>10.2f}s {size / 1e6:>9.1f}MB")
        full, bounded = figures["keep all"], figures["bounded"]
        print(f"ratio keep-all / bounded: origin {full[1] / bounded[1]:.1f}, clone time {full[2] / bounded[2]:.1f}, "
              f"clone size {full[3] / bounded[3]:.1f}")


if __name__ == "__main__":
    main()
