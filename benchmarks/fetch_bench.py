"""Benchmark: what a reconciler's fetch costs as the number of status branches on the origin grows.

A bare origin on local disk holds ``main``, ``status/hq`` and ``--relays``
other ``status/<relay>`` branches (written with ``git fast-import``). Each
way's mirror fetched once; then, ``--rounds`` times, every other relay's
branch moves by one commit (as each relay publishing once per interval
does) and ``status/hq`` moves too, and the mirrors fetch. Three ways side by
side, the order rotating each round, on three mirrors:

- ``all``: ``GitStore.fetch()``, every branch with its history
  (``+refs/heads/*``) — what HQ and ``reconciler status`` did;
- ``tips``: ``GitStore.fetch_tips(("main", "status/hq"))`` — ``main`` and
  ``status/hq`` with their history, every other ``status/*`` branch by its
  newest commit only (``--depth 1``) — what HQ does now;
- ``named``: ``GitStore.fetch(("main", "status/hq"))`` — what a relay does.

Also timed: a no-op fetch (nothing moved), and a fetch after one relay
moved (``named`` fetches nothing then: that relay is not its business). Printed: median wall time and
git's CPU time (children's user+system) per fetch, the CPU ratio against
``all``, and CPU seconds per hour at one fetch every ``--interval`` seconds
(HQ's poll interval, 30 s by default); then the size of the ``all`` and
``tips`` mirrors after the rounds, as they are and after the gc git runs
inside a fetch once the replaced tips are over an hour old (simulated by
ageing the objects' times).

``--history N`` (0 to skip) then times the first fetch of a fresh HQ
workdir from an origin whose relay branches have N commits each: ``all``
against ``tips``, with the mirror's size after each.

    python benchmarks/fetch_bench.py [--relays 1000] [--rounds 5] [--history 200] [--interval 30]
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


def history_import(bare: Path, refs: list[str], commits: int, chunk: int = 20) -> None:
    """``commits`` commits on each of ``refs``, written ``chunk`` generations per ``git fast-import``."""
    for first in range(0, commits, chunk):
        stream: list[bytes] = []
        for generation in range(first, min(commits, first + chunk)):
            stamp = 1_700_000_000 + generation * 60
            for ref in refs:
                data = (f"generation {generation} of {ref}\n" + "x" * 2000 + "\n").encode()
                message = f"{ref} {generation}".encode()
                stream.append(f"commit refs/heads/{ref}\n"
                              f"committer bench <bench@example.invalid> {stamp} +0000\n".encode())
                stream.append(b"data %d\n%s\n" % (len(message), message))
                if generation and generation == first:  # later ones follow the branch fast-import holds
                    stream.append(f"from refs/heads/{ref}^0\n".encode())
                stream.append(b"M 100644 inline relay.yaml\ndata %d\n%s\n" % (len(data), data))
        subprocess.run(["git", "fast-import", "--quiet", "--force"], cwd=bare, input=b"".join(stream), check=True,
                       env=GIT_ENV)


def disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def age(path: Path, seconds: float) -> None:
    """Make every object under ``path`` ``seconds`` old (as though the rounds happened that long ago)."""
    stamp = time.time() - seconds
    for f in (path / "objects").rglob("*"):
        if f.is_file():
            os.utime(f, (stamp, stamp))


def fresh_fetch(root: Path, relays: int, commits: int) -> None:
    bare = root / "history.git"
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True)
    others = [f"status/relay-{i:05d}" for i in range(relays)]
    started = time.perf_counter()
    history_import(bare, ["main", "status/hq", *others], commits)
    subprocess.run(["git", "gc", "--quiet"], cwd=bare, check=True, env=GIT_ENV)
    print(f"\nfirst fetch of a fresh HQ workdir: {relays} relay branches x {commits} commits "
          f"(origin {disk(bare) / 1e6:.1f} MB after gc, written in {time.perf_counter() - started:.0f} s)")
    print(f"{'way':<6} {'wall':>8} {'cpu':>8} {'mirror size':>12} {'commits in mirror':>18}")
    for way in ("all", "tips"):
        store = GitStore(str(bare), root / f"fresh-{way}")
        fetch: Callable[[], None] = store.fetch if way == "all" else lambda s=store: s.fetch_tips(("main", "status/hq"))
        wall, cpu = timed(fetch)
        count = subprocess.run(["git", f"--git-dir={store.repo_path}", "rev-list", "--all", "--count"],
                               capture_output=True, check=True, text=True).stdout.strip()
        print(f"{way:<6} {wall:>7.2f}s {cpu:>7.2f}s {disk(store.repo_path) / 1e6:>10.1f}MB {int(count):>18,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relays", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--history", type=int, default=200, help="commits per relay for the fresh fetch (0: skip)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between fetches (HQ's poll interval)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; git "
          f"{subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.split()[-1]}")
    ways = ("all", "tips", "named")
    per_hour = 3600 / args.interval
    with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
        root = Path(tmp)
        bare = root / "origin.git"
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(bare)], check=True)
        others = [f"status/relay-{i:05d}" for i in range(args.relays)]
        fast_import(bare, ["main", "status/hq", *others], 0)
        stores = {way: GitStore(str(bare), root / way) for way in ways}
        fetches: dict[str, Callable[[], None]] = {
            "all": stores["all"].fetch,
            "tips": lambda: stores["tips"].fetch_tips(("main", "status/hq")),
            "named": lambda: stores["named"].fetch(("main", "status/hq"))}
        for fetch in fetches.values():
            fetch()
        moved: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        idle: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        one: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for generation in range(1, args.rounds + 1):
            fast_import(bare, ["status/hq", *others], generation)
            shift = generation % len(ways)
            order = ways[shift:] + ways[:shift]
            for way in order:
                moved[way].append(timed(fetches[way]))
            for way in order:
                idle[way].append(timed(fetches[way]))
            fast_import(bare, [others[generation % len(others)]], args.rounds + generation)
            for way in order:
                one[way].append(timed(fetches[way]))
        mirrored = {way: len(store.list_status_refs()) for way, store in stores.items()}
        print(f"{args.relays} other status branches on the origin, {args.rounds} rounds; "
              f"status branches in the mirror: " + ", ".join(f"{w} {n}" for w, n in mirrored.items()))
        print(f"{'fetch':<30} " + " ".join(f"{w + ': wall':>11} {'cpu':>7}" for w in ways)
              + f" {'cpu ratio all/tips':>19} " + " ".join(f"{'cpu-s/h ' + w:>13}" for w in ways))
        for label, runs in (("every other relay moved by 1", moved), ("one relay moved", one),
                            ("nothing moved (no-op)", idle)):
            wall = {w: statistics.median(r[0] for r in runs[w]) for w in runs}
            cpu = {w: statistics.median(r[1] for r in runs[w]) for w in runs}
            ratio = cpu["all"] / cpu["tips"] if cpu["tips"] else float("inf")
            print(f"{label:<30} " + " ".join(f"{wall[w] * 1000:>9.0f}ms {cpu[w] * 1000:>5.0f}ms" for w in ways)
                  + f" {ratio:>19.1f} " + " ".join(f"{cpu[w] * per_hour:>13.1f}" for w in ways))
        sizes = {w: disk(stores[w].repo_path) for w in ("all", "tips")}
        age(stores["tips"].repo_path, 7200)
        subprocess.run(["git", f"--git-dir={stores['tips'].repo_path}", "-c", "gc.pruneExpire=1.hour.ago",
                        "-c", "gc.cruftPacks=true", "gc", "--quiet"], check=True)
        subprocess.run(["git", f"--git-dir={stores['all'].repo_path}", "gc", "--quiet"], check=True)
        after = {w: disk(stores[w].repo_path) for w in ("all", "tips")}
        print(f"mirror size after {args.rounds} rounds: all {sizes['all'] / 1e6:.1f} MB, tips {sizes['tips'] / 1e6:.1f} MB; "
              f"after gc (tips: replaced tips over an hour old dropped): all {after['all'] / 1e6:.1f} MB, "
              f"tips {after['tips'] / 1e6:.1f} MB")
        if args.history > 0:
            fresh_fetch(root, args.relays, args.history)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
