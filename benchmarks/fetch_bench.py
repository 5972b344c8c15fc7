"""Benchmark: what a relay's fetch costs as the number of status branches on the origin grows.

A bare origin on local disk holds ``main``, ``status/hq`` and ``--relays``
other ``status/<relay>`` branches (written with ``git fast-import``). A
relay's mirror fetched once; then, ``--rounds`` times, every other relay's
branch moves by one commit (as each relay publishing once per interval
does) and ``status/hq`` moves too, and the mirror fetches. Two ways side by
side, alternating each round, on two mirrors:

- ``all``: ``GitStore.fetch()``, every branch (``+refs/heads/*``) — what
  HQ and ``reconciler status`` do, and what relays did;
- ``named``: ``GitStore.fetch(("main", "status/hq"))`` — what a relay does.

Also timed: a no-op fetch (nothing moved). Printed: median wall time and
git's CPU time (children's user+system) per fetch, their ratio, and CPU
seconds per hour at one fetch every 30 s.

    python benchmarks/fetch_bench.py [--relays 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from reconciler.gitstore import GitStore  # noqa: E402

GIT_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def fast_import(bare: Path, refs: list[str], generation: int) -> None:
    """One new commit on each of ``refs`` (a child of its current tip, if any), each with a changed file."""
    chunks: list[bytes] = []
    stamp = 1_700_000_000 + generation * 60
    for mark, ref in enumerate(refs, start=1):
        body = f"generation {generation} of {ref}\n" + "x" * 2000 + "\n"
        data = body.encode()
        message = f"{ref} {generation}".encode()
        chunks.append(f"commit refs/heads/{ref}\nmark :{mark}\n"
                      f"committer bench <bench@example.invalid> {stamp} +0000\n".encode())
        chunks.append(b"data %d\n%s\n" % (len(message), message))
        if generation:
            chunks.append(f"from refs/heads/{ref}^0\n".encode())
        chunks.append(b"M 100644 inline relay.yaml\ndata %d\n%s\n" % (len(data), data))
    subprocess.run(["git", "fast-import", "--quiet", "--force"], cwd=bare, input=b"".join(chunks), check=True,
                   env=GIT_ENV)


def timed(fetch: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and children's CPU seconds of one fetch."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    fetch()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relays", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
        root = Path(tmp)
        bare = root / "origin.git"
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True)
        others = [f"status/relay-{i:05d}" for i in range(args.relays)]
        fast_import(bare, ["main", "status/hq", *others], 0)
        stores = {"all": GitStore(str(bare), root / "all"), "named": GitStore(str(bare), root / "named")}
        fetches: dict[str, Callable[[], None]] = {
            "all": stores["all"].fetch, "named": lambda: stores["named"].fetch(("main", "status/hq"))}
        for fetch in fetches.values():
            fetch()
        moved: dict[str, list[tuple[float, float]]] = {"all": [], "named": []}
        idle: dict[str, list[tuple[float, float]]] = {"all": [], "named": []}
        for generation in range(1, args.rounds + 1):
            fast_import(bare, ["status/hq", *others], generation)
            order = ("all", "named") if generation % 2 else ("named", "all")
            for way in order:
                moved[way].append(timed(fetches[way]))
            for way in order:
                idle[way].append(timed(fetches[way]))
        mirrored = {way: len(store.list_status_refs()) for way, store in stores.items()}
        load = os.getloadavg()
        print(f"{args.relays} other status branches on the origin, {args.rounds} rounds "
              f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}); "
              f"status branches in the mirror: all {mirrored['all']}, named {mirrored['named']}")
        print(f"{'fetch':<34} {'all: wall':>10} {'cpu':>8} {'named: wall':>12} {'cpu':>8} {'cpu ratio':>10} "
              f"{'cpu-s/h all':>12} {'named':>8}")
        for label, runs in (("every other relay moved by 1", moved), ("nothing moved (no-op)", idle)):
            wall = {w: statistics.median(r[0] for r in runs[w]) for w in runs}
            cpu = {w: statistics.median(r[1] for r in runs[w]) for w in runs}
            ratio = cpu["all"] / cpu["named"] if cpu["named"] else float("inf")
            print(f"{label:<34} {wall['all'] * 1000:>8.0f}ms {cpu['all'] * 1000:>6.0f}ms "
                  f"{wall['named'] * 1000:>10.0f}ms {cpu['named'] * 1000:>6.0f}ms {ratio:>10.1f} "
                  f"{cpu['all'] * 120:>12.1f} {cpu['named'] * 120:>8.1f}")


if __name__ == "__main__":
    main()
