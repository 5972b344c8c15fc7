"""Benchmark: the plan engine on 100,000 clients x 10 jobs across 50 relays (10^6 pairs).

Builds the specs in memory (no YAML, no disk): a topology of 50 relays (five
regions, each with sites below it, some sites nested two deep), 10 jobs that
reach every relay (installs with requirements, a dependency, a schedule,
rollout limits, an uninstall), and 100,000 clients with varied facts, labels
and inventories. Then it times:

* ``plan_relay`` over all 50 relays (index built beforehand, as a relay does
  once per accepted commit), for two fleets:
  - **steady**: a converged fleet as a relay sees it, with history for every
    row the system ever acted on (one attempt per pair, 10^6 entries), 3% of
    rows drifted, 1% in progress, 0.5% failed;
  - **fresh**: nothing installed, no history (every pair needs an action:
    the worst case, a brand-new site);
* ``plan_client`` for one client (the check-in path), median of 1,000 calls.

``--scoped`` raises two jobs' ``rerun`` with a ``rerunScope`` (one region's
subtree and 500 clients for ``install-vpn-client``; a repair of 200 clients
for ``install-agent-tools``), to show what scopes cost; without it no job
has one, the figures to compare with a tree before scopes existed.

Each figure is the median of ``--runs`` runs of the sum of the 50
``plan_relay`` calls' times (the caller freeing the plans afterwards is
timed and printed apart), after one first pass on fresh
indexes that is reported on its own (it also fills the per-index caches a
relay keeps for the life of an accepted commit). Targets on the 2-core
reference machine: 10^6 pairs under 2 s for either fleet, one client under
1 ms. The machine's load average is printed too: a shared machine makes wall
times noisy, so compare versions in the same time window.

    python benchmarks/plan_bench.py [--runs 5] [--clients 100000] [--scoped] [--profile [steady|fresh]]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.plan import (  # noqa: E402
    ActionKind,
    Attempt,
    Client,
    Installed,
    Outcome,
    PlanMemo,
    RelayIndex,
    RolloutUsage,
    index_relay,
    plan_client,
    plan_relay,
)
from reconciler.specs import (  # noqa: E402
    Artifact,
    Dependency,
    DestinationType,
    Installer,
    InstallerType,
    Job,
    JobType,
    Package,
    Relay,
    Requirements,
    RerunScope,
    Specs,
    Topology,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def build_specs() -> Specs:
    relays: list[Relay] = []
    for region in range(5):
        name = f"relay-region-{region}"
        relays.append(Relay(name, "hq"))
        for site in range(9):
            # sites 6-8 of each region hang below site 5: nested two deep
            parent = f"relay-site-{region}-5" if site >= 6 else name
            relays.append(Relay(f"relay-site-{region}-{site}", parent))
    assert len(relays) == 50

    def package(name: str, version: str, *, req: Requirements = Requirements(),
                deps: tuple[Dependency, ...] = (), timeout: int = 600) -> Package:
        return Package(spec_name=f"{name}-{version}", name=name, version=version,
                       artifact=Artifact(path=f"artifacts/{name}-{version}"),
                       installer=Installer(InstallerType.COMMAND, ("setup",), ("remove",), (), timeout),
                       requirements=req, depends_on=deps, revision=f"rev-{name}-{version}")

    packages = (
        package("7zip", "23.01"),
        package("vcredist", "14.38.33130", req=Requirements(os=("windows",))),
        package("office-addin", "2.4.0", req=Requirements(os=("windows",), min_free_disk_mb=500),
                deps=(Dependency("vcredist", "14.30"),)),
        package("putty", "0.81", req=Requirements(arch=("x86_64", "arm64"))),
        package("vpn-client", "5.1.0", req=Requirements(min_free_disk_mb=1024), timeout=120),
        package("legacy-toolbar", "1.2"),
        package("teams-meeting", "24.1"),
        package("browser", "131.0.2", req=Requirements(labels=(("dept", "sales"),))),
        package("agent-tools", "3.2"),
        package("pdf-reader", "11.0"),
    )
    regions = tuple(f"relay-region-{r}" for r in range(5))

    def job(name: str, software: str, version: str | None, **kw: object) -> Job:
        return Job(name=name, job_type=JobType.UNINSTALL if version is None else JobType.INSTALL,
                   package_name=software, package_version=version,
                   destination_type=DestinationType.ALL_LOWER_CLIENTS, destinations=regions,
                   revision=f"jobrev-{name}", **kw)  # type: ignore[arg-type]

    jobs = (
        job("install-7zip", "7zip", "23.01"),
        job("install-vcredist", "vcredist", "14.38.33130"),
        job("install-office-addin", "office-addin", "2.4.0"),
        job("install-putty", "putty", "0.81", max_concurrent=50),
        job("install-vpn-client", "vpn-client", "5.1.0", max_concurrent=100, max_failures="10%"),
        job("uninstall-legacy-toolbar", "legacy-toolbar", None),
        job("install-teams-meeting", "teams-meeting", "24.1",
            not_before=datetime(2027, 4, 1, tzinfo=timezone.utc)),
        job("install-browser", "browser", "131.0.2"),
        job("install-agent-tools", "agent-tools", "3.2", max_failures=50),
        job("install-pdf-reader", "pdf-reader", "11.0", allow_downgrade=True),
    )
    return Specs(Topology("hq", tuple(relays)), packages, tuple(sorted(jobs, key=lambda j: j.name)))


def with_scopes(specs: Specs, clients: int) -> Specs:
    """Two jobs re-run under a scope: a region's subtree and 500 clients; a repair of 200 clients."""
    every = max(1, clients // 500)
    scopes = {
        "install-vpn-client": RerunScope(relays=("relay-region-2",),
                                         clients=tuple(f"pc-{n:06d}" for n in range(0, clients, every))[:500]),
        "install-agent-tools": RerunScope(clients=tuple(f"pc-{n:06d}" for n in range(3, clients, every))[:200],
                                          repair=True),
    }
    jobs = tuple(replace(job, rerun=1, rerun_scope=scopes[job.name]) if job.name in scopes else job
                 for job in specs.jobs)
    return replace(specs, jobs=jobs)


def build_fleet(specs: Specs, clients: int, *, steady: bool, seed: int = 7,
                ) -> tuple[dict[str, list[Client]], dict[str, dict[tuple[str, str], Attempt]]]:
    """Clients per relay and history per relay."""
    rng = random.Random(seed)
    relays = [r.name for r in specs.topology.relays]
    indexes = {r: index_relay(specs, r) for r in relays}
    by_relay: dict[str, list[Client]] = {r: [] for r in relays}
    history: dict[str, dict[tuple[str, str], Attempt]] = {r: {} for r in relays}
    installs = [j for j in specs.jobs if j.job_type is JobType.INSTALL and j.not_before is None]
    for n in range(clients):
        relay = relays[n % len(relays)]
        cid = f"pc-{n:06d}"
        os_ = rng.choices(("windows", "linux", "darwin"), (70, 25, 5))[0]
        arch = rng.choices(("x86_64", "arm64", "x86"), (85, 10, 5))[0]
        disk = rng.choice((200, 800, 4096, 20480, 51200, 102400, 256000))
        labels = (("dept", rng.choice(("sales", "eng", "ops", "hr"))), ("host", cid))
        installed: dict[str, str] = {}
        if rng.random() < 0.03:
            installed["legacy-toolbar"] = "1.2"
        if rng.random() < 0.02:
            installed["pdf-reader"] = "12.0"  # newer: downgraded (allowDowngrade)
        index = indexes[relay]
        if steady:
            for job in installs:
                package = index.packages[(job.package_name, job.package_version or "")]
                req = package.requirements
                if (req.os and os_ not in req.os) or (req.arch and arch not in req.arch) or \
                        (req.min_free_disk_mb is not None and disk < req.min_free_disk_mb) or \
                        any(dict(labels).get(k) != v for k, v in req.labels):
                    continue
                roll = rng.random()
                if roll < 0.03:
                    continue  # drifted: removed behind the agent's back, re-planned
                finished: datetime | None = NOW - timedelta(days=3)
                outcome, message = Outcome.SUCCEEDED, ""
                if roll < 0.04:
                    outcome, finished = Outcome.DISPATCHED, None
                elif roll < 0.045:
                    outcome, message = Outcome.FAILED, "exit code 1603"
                else:
                    installed[job.package_name] = job.package_version or ""
                attempt = 3 if outcome is Outcome.FAILED else 1
                dispatched = NOW - timedelta(seconds=30) if outcome is Outcome.DISPATCHED else NOW - timedelta(days=3)
                history[relay][(job.name, cid)] = Attempt(
                    operation_id=f"op-{n:06d}-{job.name}", job=job.name, client=cid,
                    revision=index.revisions[job.name], rerun=0, attempt=attempt,
                    action=ActionKind.INSTALL, version=job.package_version, outcome=outcome,
                    dispatched_at=dispatched, finished_at=finished, message=message)
        by_relay[relay].append(Client(
            id=cid, relay=relay, os=os_, arch=arch, free_disk_mb=disk, labels=labels,
            installed=tuple(Installed(k, v) for k, v in sorted(installed.items())),
            online=rng.random() < 0.9))
    return by_relay, history


def time_relays(indexes: dict[str, RelayIndex], fleet: dict[str, list[Client]],
                history: dict[str, dict[tuple[str, str], Attempt]],
                memos: dict[str, PlanMemo]) -> tuple[float, int, int, float]:
    """Sum of the plan_relay calls' times; then the time to drop all the plans, measured apart.

    As in the relay, each index has its memo, and the cyclic garbage collector
    rests during a pass (a pass allocates ~10^6 acyclic objects).
    """
    elapsed = 0.0
    rows = actions = 0
    plans = []
    for relay, index in indexes.items():
        gc.disable()
        start = time.perf_counter()
        plan = plan_relay(index, fleet[relay], history[relay], NOW, memos[relay])
        elapsed += time.perf_counter() - start
        gc.enable()
        rows += len(plan.rows)
        actions += len(plan.actions)
        plans.append(plan)
    del plan
    start = time.perf_counter()
    plans.clear()
    return elapsed, rows, actions, time.perf_counter() - start


def time_client(index: RelayIndex, client: Client, history: dict[tuple[str, str], Attempt],
                memo: PlanMemo, calls: int = 1000) -> float:
    usage = {name: RolloutUsage(in_progress=3, failed=1, targets=2000) for name in index.revisions}
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        plan_client(index, client, history, usage, NOW, memo)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--scoped", action="store_true", help="two jobs re-run under a rerunScope (one a repair)")
    parser.add_argument("--profile", nargs="?", const="steady", choices=("steady", "fresh"),
                        help="print a cProfile of one pass over that fleet (default steady)")
    args = parser.parse_args()

    specs = build_specs()
    if args.scoped:
        specs = with_scopes(specs, args.clients)
    indexes = {r.name: index_relay(specs, r.name) for r in specs.topology.relays}
    print(f"cores: {os.cpu_count()}  python: {sys.version.split()[0]}  "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    scoped = " (two with a rerunScope)" if args.scoped else ""
    print(f"fleet: {args.clients} clients, {len(specs.jobs)} jobs{scoped}, {len(indexes)} relays")

    for label, steady in (("steady", True), ("fresh", False)):
        fleet, history = build_fleet(specs, args.clients, steady=steady)
        entries = sum(len(h) for h in history.values())
        if args.profile == label:
            profiler = cProfile.Profile()
            profiler.enable()
            time_relays(indexes, fleet, history, {r: PlanMemo(i) for r, i in indexes.items()})
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        # Fresh indexes: the first pass also fills the per-index decision caches (cold).
        indexes = {r.name: index_relay(specs, r.name) for r in specs.topology.relays}
        memos = {r: PlanMemo(i) for r, i in indexes.items()}
        cold, rows, actions, _ = time_relays(indexes, fleet, history, memos)
        times = []
        drops = []
        for _ in range(args.runs):
            elapsed, rows, actions, dropped = time_relays(indexes, fleet, history, memos)
            times.append(elapsed)
            drops.append(dropped)
        print(f"plan_relay {label}: {rows} rows, {actions} actions, {entries} history entries: "
              f"median {statistics.median(times):.3f} s over {args.runs} runs "
              f"(min {min(times):.3f}, max {max(times):.3f}; first pass on a new index {cold:.3f} s; "
              f"freeing the plans afterwards {statistics.median(drops):.3f} s)")
        if steady:
            relay = specs.topology.relays[7].name
            client = fleet[relay][0]
            per_client = [time_client(indexes[relay], client, history[relay], memos[relay])
                          for _ in range(args.runs)]
            print(f"plan_client one client: median {statistics.median(per_client) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
