"""Benchmark: the size of a relay's ``software.json`` and the time to render and read it.

Two fleets of ``--clients`` clients (default 50,000), ``--packages``
packages each (default 300):

* **same**: every client has the same list;
* **mixed**: each client lacks each package with probability 2%, has it at
  another version with probability 10%, and has 5 of 2,000 rare packages.

For each: the bytes of ``relays/<relay>/software.json``, the time to render
it (``report.render_relay_software``, done by the relay's pass when a list
changed) and to read it back (``report.parse_relay_software``, done by
``reconciler status --software``), and the bytes of one client's list in a
check-in.

    python benchmarks/software_bench.py [--clients 50000] [--packages 300]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler import report  # noqa: E402

Lists = dict[str, tuple[list[tuple[str, str, str]], int]]


def fleets(clients: int, packages: int) -> dict[str, Lists]:
    base = [(f"package-name-{i:03d}", f"1.{i}.0-1", "dpkg") for i in range(packages)]
    rnd = random.Random(1)
    mixed: Lists = {}
    for n in range(clients):
        own = [(name, version if rnd.random() > 0.1 else version + "~old", source)
               for name, version, source in base if rnd.random() > 0.02]
        own += [(f"rare-{rnd.randrange(2000)}", "1", "dpkg") for _ in range(5)]
        mixed[f"pc-{n:05d}"] = (own, 0)
    return {"same": {f"pc-{n:05d}": (base, 0) for n in range(clients)}, "mixed": mixed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50_000)
    parser.add_argument("--packages", type=int, default=300)
    args = parser.parse_args()
    for name, lists in fleets(args.clients, args.packages).items():
        started = time.perf_counter()
        data = report.render_relay_software("relay-a", lists)
        rendered = time.perf_counter() - started
        started = time.perf_counter()
        parsed = report.parse_relay_software(data, "relays/relay-a/software.json")
        read = time.perf_counter() - started
        assert len(parsed.clients) == args.clients
        print(f"{name:5}: {args.clients} clients x {args.packages} packages: software.json {len(data) / 1024:.0f} KiB, "
              f"render {rendered:.2f} s, read {read:.2f} s")
    one = [{"name": f"package-name-{i:03d}", "version": f"1.{i}.0-1", "source": "dpkg"} for i in range(args.packages)]
    print(f"one client's list in a check-in: {len(json.dumps(one))} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
