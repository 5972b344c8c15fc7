"""How long and how much memory ``reconciler validate`` takes on hostile spec files of at most 1 MiB.

Target: every file judged within 2 s and 256 MB on 2 cores. Each case (see
``tests/hostile_specs.py``) is validated by a fresh ``python -m reconciler
validate`` process, ``--runs`` times; the script prints the median and
maximum wall time, the peak resident memory (from ``wait4``), and the ratio
of the median to that of validating the example repo in the same run (the
cost of starting Python and importing the loader), so a noisy machine shows
up in both columns alike.

    python benchmarks/hostile_bench.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hostile_specs import hostile_files, write_case  # noqa: E402


def _run(repo: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS KiB, exit code) of one validate process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "validate", str(repo)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    try:
        example = work / "example"
        shutil.copytree(ROOT / "example-repo", example)
        cases = {"(example repo)": example}
        for name in sorted(hostile_files()):
            cases[name] = write_case(work, name)
        results = {name: [_run(repo) for _ in range(args.runs)] for name, repo in cases.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(t for t, _, _ in results["(example repo)"])
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {args.runs} runs each")
    print(f"{'case':24} {'median s':>9} {'max s':>7} {'peak MB':>8} {'x example':>10} exit")
    worst_time = worst_memory = 0.0
    for name, runs in results.items():
        times = [t for t, _, _ in runs]
        peak = max(m for _, m, _ in runs) / 1024
        median = statistics.median(times)
        codes = sorted({c for _, _, c in runs})
        print(f"{name:24} {median:9.2f} {max(times):7.2f} {peak:8.0f} {median / base:10.1f} {codes}")
        worst_time, worst_memory = max(worst_time, max(times)), max(worst_memory, peak)
    print(f"worst: {worst_time:.2f} s, {worst_memory:.0f} MB (target: 2 s, 256 MB)")
    return 0 if worst_time < 2.0 and worst_memory < 256 else 1


if __name__ == "__main__":
    sys.exit(main())
