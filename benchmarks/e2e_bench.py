"""End-to-end latency: commit → first client action, and commit → HQ summary.

Set-up: a local bare origin, ``reconciler hq`` and two sibling relays as real
subprocesses on 127.0.0.1, and N agents per relay simulated in this process
with the real ``Agent`` class over the real HTTP API (each checks in every
second, as ``RECONCILER_POLL_SECONDS=1`` tells it).

For each of several commits (each adds a job installing a new package on all
lower clients of both relays) it measures:

* commit → first action: from the push until the first agent receives an
  action for that package;
* commit → summary: from the push until ``status/hq`` shows every client of
  that job Succeeded.

Prints the median and spread of each. Targets: first action < 2 s, summary
< 10 s.

    python benchmarks/e2e_bench.py [--agents-per-relay 100] [--commits 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.agent.agent import Agent  # noqa: E402

RELAYS = ("relay-east", "relay-west")
ENROLL_SECRET = "benchmark-enrolment-secret-0123456789"

TOPOLOGY = """apiVersion: reconciler/v1
kind: Topology
metadata: {name: bench}
spec:
  headquarters: hq
  relays:
    - {name: relay-east, parent: hq}
    - {name: relay-west, parent: hq}
"""

PACKAGE = """apiVersion: reconciler/v1
kind: Package
metadata: {{name: tool-{n}}}
spec:
  name: tool-{n}
  version: "1.0"
  artifact: {{path: artifacts/tool-{n}}}
  installer: {{type: files}}
"""

JOB = """apiVersion: reconciler/v1
kind: Job
metadata: {{name: install-tool-{n}}}
spec:
  jobType: install
  package: {{name: tool-{n}, version: "1.0"}}
  destinationType: allLowerClients
  destinations: [relay-east, relay-west]
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def add_job(admin: Path, n: int) -> None:
    (admin / "artifacts" / f"tool-{n}").mkdir(parents=True)
    (admin / "artifacts" / f"tool-{n}" / "tool.txt").write_text(f"tool {n}\n")
    (admin / "packages" / f"tool-{n}.yaml").write_text(PACKAGE.format(n=n))
    (admin / "jobs" / f"install-tool-{n}.yaml").write_text(JOB.format(n=n))
    git(admin, "add", "-A")
    git(admin, "commit", "-q", "-m", f"install tool-{n}")


def succeeded(origin: Path, job: str) -> int:
    result = subprocess.run(["git", "-C", str(origin), "show", f"status/hq:jobs/{job}.yaml"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return 0
    data = yaml.safe_load(result.stdout) or {}
    return int((data.get("counts") or {}).get("Succeeded", 0))


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


class Fleet:
    """N in-process agents per relay, each checking in every poll interval."""

    def __init__(self, root: Path, urls: dict[str, str], per_relay: int) -> None:
        self.agents = [
            Agent(f"pc-{relay.removeprefix('relay-')}-{i:04d}", urls[relay], root / relay / str(i),
                  fact_overrides=[("os", "linux"), ("arch", "x86_64")], poll_interval=1.0,
                  enroll_secret=ENROLL_SECRET, insecure_http=True)
            for relay in RELAYS for i in range(per_relay)
        ]
        self.first_action: dict[str, float] = {}
        self.watch: str | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _step(self, agent: Agent) -> None:
        # After the warm-up the only actions a client can get are the new job's.
        watch = self.watch
        result = agent.step()
        if watch and result.actions:
            with self.lock:
                self.first_action.setdefault(watch, time.monotonic())

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            list(self.pool.map(self._step, self.agents))
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.pool.shutdown(wait=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents-per-relay", type=int, default=100)
    parser.add_argument("--commits", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reconciler-e2e-bench-"))
    origin, admin = work / "origin.git", work / "admin"
    git(work, "init", "-q", "--bare", "-b", "main", str(origin))
    git(work, "init", "-q", "-b", "main", str(admin))
    for sub in ("packages", "jobs", "artifacts"):
        (admin / sub).mkdir()
    (admin / "topology.yaml").write_text(TOPOLOGY)
    add_job(admin, 0)
    git(admin, "remote", "add", "origin", str(origin))
    git(admin, "push", "-q", "origin", "main")

    env = {**os.environ, "RECONCILER_POLL_SECONDS": "1"}
    logs = work / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *argv: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "reconciler", *argv],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))

    fleet: Fleet | None = None
    enroll_file = work / "enroll.secret"  # the relays admit the agents that present it
    enroll_file.write_text(ENROLL_SECRET + "\n")
    try:
        spawn("hq", "hq", "--origin", str(origin), "--workdir", str(work / "hq"), "--poll-interval", "10")
        urls: dict[str, str] = {}
        for relay in RELAYS:
            spawn(relay, "relay", "--name", relay, "--origin", str(origin), "--workdir", str(work / relay),
                  "--listen", "127.0.0.1:0", "--insecure-http", "--poll-interval", "10", "--publish-interval", "1",
                  "--enroll-secret-file", str(enroll_file))
        for relay in RELAYS:
            url_file = work / relay / "listen.url"
            wait_for(lambda: url_file.is_file() and url_file.read_text().strip(), 60, f"{relay} to listen")
            urls[relay] = url_file.read_text().strip()
        fleet = Fleet(work / "clients", urls, args.agents_per_relay)
        total = len(fleet.agents)
        fleet.start()
        wait_for(lambda: succeeded(origin, "install-tool-0") == total, 180, "the warm-up job to complete")

        first_action: list[float] = []
        summary: list[float] = []
        for n in range(1, args.commits + 1):
            add_job(admin, n)
            fleet.watch = f"tool-{n}"
            t0 = time.monotonic()
            git(admin, "push", "-q", "origin", "main")
            job = f"install-tool-{n}"
            wait_for(lambda: succeeded(origin, job) == total, 120, f"{job} on every client")
            t_summary = time.monotonic() - t0
            t_first = fleet.first_action.get(f"tool-{n}", float("nan")) - t0
            first_action.append(t_first)
            summary.append(t_summary)
            print(f"commit {n}: first action {t_first:.2f} s, summary shows all {total} results {t_summary:.2f} s",
                  flush=True)
    finally:
        if fleet is not None:
            fleet.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"cores: {os.cpu_count()}, relays: {len(RELAYS)}, agents: {total}, commits: {args.commits}")
    print(f"commit -> first client action: median {statistics.median(first_action):.2f} s "
          f"(min {min(first_action):.2f}, max {max(first_action):.2f}); target < 2 s")
    print(f"commit -> HQ summary with every result: median {statistics.median(summary):.2f} s "
          f"(min {min(summary):.2f}, max {max(summary):.2f}); target < 10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
