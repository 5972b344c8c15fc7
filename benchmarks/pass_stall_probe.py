"""What holds a relay's check-ins up during a full pass: the longest stretches one thread holds the GIL.

In one process: a throw-away origin (``relay_bench.build_origin``),
``--clients`` clients registered and converged through
:class:`~reconciler.relay.server.RelayApp` (no HTTP), a
:class:`~reconciler.relay.loop.RelayLoop` on a real git mirror. After a
first pass, a changed job is committed and accepted, the loop syncs, and the
second full pass runs while a probe thread asks for the GIL every
millisecond: every stretch longer than ``--gap-ms`` that it waited is a
stretch no check-in thread could run either. Each is printed with the pass
phase it fell in (the loop's, store's, planner's and renderer's methods timed by wrappers), then
a cProfile of the same kind of pass (a third commit) prints the functions
with the most own time::

    python benchmarks/pass_stall_probe.py --clients 50000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay_bench  # noqa: E402

from reconciler import plan, report  # noqa: E402
from reconciler.gitstore import GitStore  # noqa: E402
from reconciler.relay.artifacts import ArtifactCache  # noqa: E402
from reconciler.relay.loop import RelayLoop  # noqa: E402
from reconciler.relay.server import RelayApp, Trust  # noqa: E402
from reconciler.relay.state import RelayState  # noqa: E402
from reconciler.relay.store import Store  # noqa: E402

PHASES: list[tuple[str, float, float]] = []


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so each call's (label, start, end) lands in :data:`PHASES`."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            PHASES.append((label, started, time.perf_counter()))

    setattr(owner, name, wrapper)


def probe(stop: threading.Event, gaps: list[tuple[float, float]], gap: float) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        if now - last > gap:
            gaps.append((last, now))
        last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50_000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    args = parser.parse_args()
    print(f"pass stall probe: {args.clients} clients, {args.jobs} jobs; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; switch interval {sys.getswitchinterval() * 1000:.0f} ms")
    base = Path(tempfile.mkdtemp(prefix="pass-stall-"))
    origin = relay_bench.build_origin(base, args.jobs)
    workdir = base / "relay"
    store = Store(workdir)
    state = RelayState("relay-bench", store, poll_seconds=30)
    git = GitStore(str(origin), workdir)
    cache = ArtifactCache(workdir, git)
    loop = RelayLoop("relay-bench", git, store, cache, state, publish_interval=0)
    assert loop.sync(fetch=True), "the relay did not load the accepted commit"
    app = RelayApp(state, cache.dir, trust=Trust(enroll_secret=relay_bench.ENROLL_SECRET))
    inventory = [{"name": f"app{i}", "version": "1.0"} for i in range(args.jobs)]
    tokens: dict[str, str] = {}

    def checkin(client: str) -> None:
        body = json.dumps({"facts": {"os": "linux", "arch": "x86_64", "hostname": client, "freeDiskMB": 50_000},
                           "labels": {"dept": "eng"}, "inventory": inventory, "results": []}).encode()
        environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body)}
        if client in tokens:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {tokens[client]}"
        else:
            environ["HTTP_X_RECONCILER_ENROLLMENT"] = relay_bench.ENROLL_SECRET
        reply = app.checkin(client, environ)
        if "token" in reply:
            tokens[client] = reply["token"]

    started = time.perf_counter()
    ids = [f"pc-{i:06d}" for i in range(args.clients)]
    for client in ids:
        checkin(client)
    for client in ids:
        checkin(client)
    print(f"registered {args.clients} clients in {time.perf_counter() - started:.0f}s")
    started = time.perf_counter()
    loop.full_pass()
    print(f"first pass {time.perf_counter() - started:.1f}s")

    for owner, name, label in ((store, "clients", "store.clients"), (store, "history", "store.history"),
                               (store, "row_states", "store.row_states"),
                               (store, "software_digests", "store.software_digests"),
                               (loop, "_counted", "loop._counted"), (loop, "_software_file", "loop._software_file"),
                               (loop, "_record_row_states", "loop._record_row_states"),
                               (plan, "plan_relay", "plan.plan_relay"),
                               (report, "render_relay_status", "report.render_relay_status")):
        timed(owner, name, label)
    PHASES.clear()

    def changed_pass(round_: int, profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        """(when the pass began, how long it took) after a new commit was accepted and synced."""
        relay_bench.push_change(base, origin, round_)
        assert loop.sync(fetch=True), "the relay did not take the new commit"
        began = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        loop.full_pass()
        if profiler is not None:
            profiler.disable()
        return began, time.perf_counter() - began

    stop = threading.Event()
    gaps: list[tuple[float, float]] = []
    prober = threading.Thread(target=probe, args=(stop, gaps, args.gap_ms / 1000), daemon=True)
    prober.start()
    t0, elapsed = changed_pass(1)
    stop.set()
    prober.join()
    gaps = [g for g in gaps if g[1] >= t0]  # those of the pass (not of the commit and sync before it)
    print(f"\nsecond pass (a new commit) {elapsed:.1f}s; stretches over {args.gap_ms:.0f} ms no other thread ran: "
          f"{len(gaps)}, longest {max((b - a for a, b in gaps), default=0) * 1000:.0f} ms, "
          f"total {sum(b - a for a, b in gaps):.1f}s")
    print("phases (start-end s after the pass began): " + "; ".join(
        f"{label} {s - t0:.2f}-{e - t0:.2f}" for label, s, e in sorted(PHASES, key=lambda p: p[1])
        if e - s > 0.05))
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:15]:
        inside = [label for label, s, e in PHASES if s <= b and e >= a]
        print(f"  {(b - a) * 1000:6.0f} ms at {a - t0:6.2f}s, in: {', '.join(inside) or '(between the timed phases)'}")
    profiler = cProfile.Profile()
    _, elapsed = changed_pass(2, profiler)
    print(f"\nthird pass (a new commit, under cProfile) {elapsed:.1f}s; most own time:")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    store.close()
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
