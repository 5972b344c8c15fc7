"""Benchmark: one relay's full pass at 50,000 clients — re-plan and publish after a commit, and memory.

Builds a throw-away origin (one relay, ``--jobs`` install jobs reaching all
its clients, as ``relay_bench.py`` does), lets ``reconciler hq --once`` accept
it, and runs the relay's loop in this process (:class:`RelayLoop` on a real
SQLite store, a real git mirror and artifact cache), with ``--clients``
clients written straight into the store (registered, converged: each
reports every job's package installed). Then it times, ``--runs`` times each:

- **steady pass**: a full pass with no input changed (what a relay paid every
  30-60 s whether anything happened or not);
- **commit → published**: a new commit adds one job reaching every client;
  HQ accepts it; the relay follows it (``sync``: fetch, load, stage), plans
  every client, renders the status files and pushes ``status/<relay>`` to the
  origin. Target: within 5 s at 50,000 clients on 2 cores.

Printed: medians with min/max, the parts of the commit → published path,
the process's resident memory after the passes and its peak (``VmHWM``;
target under 400 MB), and the load average at start and end. With
``--pass-process`` the passes run in a child process, as ``reconciler relay``
runs them; memory and CPU are then this process's and the child's, summed.

    python benchmarks/relay_pass_bench.py [--clients 50000] [--jobs 5] [--runs 3] [--pass-process]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_bench import _env, _git, build_origin, cpu_seconds, memory_mb, reset_peak  # noqa: E402

from reconciler.gitstore import GitStore  # noqa: E402
from reconciler.plan.vocabulary import Installed  # noqa: E402
from reconciler.relay.artifacts import ArtifactCache  # noqa: E402
from reconciler.relay.loop import RelayLoop  # noqa: E402
from reconciler.relay.state import RelayState  # noqa: E402
from reconciler.relay.store import Store  # noqa: E402
from reconciler.times import utc_now  # noqa: E402

RELAY = "relay-bench"


def populate(store: Store, clients: int, jobs: int) -> None:
    now = utc_now()
    inventory = [Installed(f"app{i}", "1.0") for i in range(jobs)]
    for start in range(0, clients, 5000):
        with store.write() as db:
            for n in range(start, min(start + 5000, clients)):
                cid = f"pc-{n:06d}"
                store.register(db, cid, now)
                store.record_report(db, cid, {"os": "linux", "arch": "x86_64", "hostname": cid,
                                              "freeDiskMB": 50_000 + n % 977},
                                    {"dept": "sales" if n % 2 else "eng"}, inventory, now)


def add_job(base: Path, origin: Path, n: int) -> None:
    """Commit one more install job (its own package) reaching every client; HQ accepts it."""
    work = base / "work"
    (work / f"artifacts/new{n}").mkdir(parents=True, exist_ok=True)
    (work / f"artifacts/new{n}/app.txt").write_text(f"new {n}\n")
    (work / f"packages/new{n}.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: reconciler/v1
        kind: Package
        metadata: {{name: new{n}-1.0}}
        spec:
          name: new{n}
          version: "1.0"
          artifact: {{path: artifacts/new{n}}}
          installer: {{type: files}}
        """))
    (work / f"jobs/install-new{n}.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: reconciler/v1
        kind: Job
        metadata: {{name: install-new{n}}}
        spec:
          jobType: install
          package: {{name: new{n}, version: "1.0"}}
          destinationType: allLowerClients
          destinations: [{RELAY}]
          rollout: {{maxConcurrent: 50, maxFailures: "10%"}}
        """))
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", f"job {n}")
    _git(work, "push", "-q", "origin", "main")
    subprocess.run([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin), "--workdir",
                    str(base / "hq"), "--once"], check=True, capture_output=True, env=_env())


def span(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


CHILDREN: list[Any] = []  # the pass process, with --pass-process


def cpu() -> float:
    """CPU seconds of this process, its finished children (git) and the pass process: what the relay spent,
    load aside."""
    self_, children = os.times()[:2], os.times()[2:4]
    return sum(self_) + sum(children) + sum(cpu_seconds(c.pid) for c in CHILDREN if c.pid is not None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50_000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inventory-interval", type=float, default=900.0,
                        help="the relay's --inventory-interval (default 900, as the relay's; 0: refresh at every pass)")
    parser.add_argument("--pass-process", action="store_true",
                        help="run the full passes in a child process, as `reconciler relay` does")
    args = parser.parse_args()
    me = os.getpid()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="relay-pass-bench-") as tmp:
        base = Path(tmp)
        origin = build_origin(base, args.jobs)
        workdir = base / "relay"
        workdir.mkdir()
        store = Store(workdir)
        started = time.perf_counter()
        populate(store, args.clients, args.jobs)
        print(f"{args.clients} clients written in {time.perf_counter() - started:.1f} s; "
              f"RSS {memory_mb(me, 'VmRSS'):.0f} MB")
        state = RelayState(RELAY, store, poll_seconds=30.0, retire_after=timedelta(days=30))
        git = GitStore(str(origin), workdir)
        cache = ArtifactCache(workdir, git)
        cadence = ({"inventory_interval": args.inventory_interval}
                   if "inventory_interval" in inspect.signature(RelayLoop).parameters else {})
        loop = RelayLoop(RELAY, git, store, cache, state, publish_interval=0.0, **cadence)
        if args.pass_process:  # as `reconciler relay` runs them: in a child process
            from reconciler.relay.pass_process import PassProcess, PassSettings
            child = loop.passes = PassProcess(PassSettings(
                name=RELAY, workdir=workdir, synchronous=None, poll_seconds=30.0, offline_after=None,
                retire_after=timedelta(days=30), inventory_interval=args.inventory_interval), state, store)
            CHILDREN.append(child)
        loop.sync()
        peaks = reset_peak(me)
        started = time.perf_counter()
        loop.last_files = loop.full_pass()
        loop.publish(force=True)
        print(f"first pass + publish: {time.perf_counter() - started:.2f} s; RSS {memory_mb(me, 'VmRSS'):.0f} MB, "
              f"peak {memory_mb(me, 'VmHWM'):.0f} MB")
        overall = memory_mb(me, "VmHWM")
        reset_peak(me)

        steady: list[float] = []
        steady_cpu: list[float] = []
        for _ in range(args.runs):
            started, used = time.perf_counter(), cpu()
            loop.sync(fetch=False)
            loop.last_files = loop.full_pass()
            loop.publish(force=True)
            steady.append(time.perf_counter() - started)
            steady_cpu.append(cpu() - used)
        print(f"steady pass (nothing changed): {span(steady)}; CPU {span(steady_cpu)}; "
              f"peak {memory_mb(me, 'VmHWM'):.0f} MB")
        overall = max(overall, memory_mb(me, "VmHWM"))
        reset_peak(me)

        total: list[float] = []
        total_cpu: list[float] = []
        parts: dict[str, list[float]] = {"sync": [], "pass": [], "publish": []}
        for n in range(args.runs):
            add_job(base, origin, n)
            t0, used = time.perf_counter(), cpu()
            changed = loop.sync()
            t1 = time.perf_counter()
            loop.last_files = loop.full_pass()
            t2 = time.perf_counter()
            sha = loop.publish(force=True)
            t3 = time.perf_counter()
            assert changed and sha, "the new commit was neither followed nor published"
            total.append(t3 - t0)
            total_cpu.append(cpu() - used)
            parts["sync"].append(t1 - t0)
            parts["pass"].append(t2 - t1)
            parts["publish"].append(t3 - t2)
        print(f"commit -> published: {span(total)}  [sync {statistics.median(parts['sync']):.2f} s, "
              f"pass {statistics.median(parts['pass']):.2f} s, publish {statistics.median(parts['publish']):.2f} s]; "
              f"CPU {span(total_cpu)}")
        print(f"commit passes: peak {memory_mb(me, 'VmHWM'):.0f} MB")
        overall = max(overall, memory_mb(me, "VmHWM"))
        print(f"memory: RSS {memory_mb(me, 'VmRSS'):.0f} MB, peak {overall:.0f} MB"
              + ("" if peaks else " (peaks per phase not available: no /proc/self/clear_refs)"))
        for child in CHILDREN:
            if child.pid is not None:
                print(f"  of which the pass process: RSS {memory_mb(child.pid, 'VmRSS'):.0f} MB, "
                      f"peak since the last phase {memory_mb(child.pid, 'VmHWM'):.0f} MB")
            child.close()
        store.close()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
