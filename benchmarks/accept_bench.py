"""Benchmark: HQ accepting a 5,000-file repo against ``reconciler validate`` on the same files.

Target: an HQ pass that evaluates and accepts a new commit of the repo
within 1.5x of ``validate`` on its checkout, measured side by side in one
run. The repo is ``validate_bench.py``'s (one topology of 50 relays, 2,500
packages with in-repo artifact directories, 2,499 jobs), committed to a
local bare origin. Each round runs, as subprocesses:

* ``reconciler validate <checkout>``, the way CI does;
* ``reconciler hq --once`` on a warm workdir after a new commit was pushed
  (a one-line change to a job), so the pass fetches the commit, reads and
  checks every spec at it, accepts it and publishes ``status/hq``.

    python benchmarks/accept_bench.py [--runs 5] [--packages 2500]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from validate_bench import generate  # noqa: E402

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def _timed(*args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          cwd=HERE.parent, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"reconciler {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--packages", type=int, default=2500)
    parser.add_argument("--relays", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="accept-bench-"))
    try:
        checkout, origin, hq = work / "repo", work / "origin.git", work / "hq"
        checkout.mkdir()
        files = generate(checkout, packages=args.packages, relays=args.relays)
        _git("init", "-q", "--bare", "--initial-branch=main", str(origin), cwd=work)
        _git("init", "-q", "--initial-branch=main", cwd=checkout)
        _git("add", "-A", cwd=checkout)
        _git("commit", "-q", "-m", "fleet", cwd=checkout)
        _git("push", "-q", str(origin), "HEAD:main", cwd=checkout)
        _timed("hq", "--origin", str(origin), "--workdir", str(hq), "--once")  # the mirror, warm
        job = sorted((checkout / "jobs").glob("*.yaml"))[0]
        validate, accept = [], []
        for run in range(args.runs):
            validate.append(_timed("validate", str(checkout)))
            with open(job, "a", encoding="utf-8") as handle:
                handle.write(f"# change {run}\n")
            _git("commit", "-q", "-am", f"change {run}", cwd=checkout)
            _git("push", "-q", str(origin), "HEAD:main", cwd=checkout)
            accept.append(_timed("hq", "--origin", str(origin), "--workdir", str(hq), "--once"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    v, a = statistics.median(validate), statistics.median(accept)
    print(f"{files} spec files, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, {args.runs} runs")
    print(f"validate       median {v:.2f} s  (min {min(validate):.2f}, max {max(validate):.2f})")
    print(f"hq --once      median {a:.2f} s  (min {min(accept):.2f}, max {max(accept):.2f})")
    print(f"ratio hq/validate {a / v:.2f} (target <= 1.5)")
    return 0 if a / v <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
