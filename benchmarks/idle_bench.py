"""Idle fleet: what HQ, relays and agents cost, and commit, when nothing changes.

Set-up: a local bare origin, ``reconciler hq --listen`` and two sibling
relays as real subprocesses on 127.0.0.1, the relays sending HQ a heartbeat
every ``--heartbeat-seconds``, and N real ``reconciler agent`` processes per
relay (their check-in interval is the relays' ``RECONCILER_POLL_SECONDS``).
One job installs a package on every client. Once ``status/hq`` shows every
client Succeeded, both relays alive, and the status refs have been still for
a while, the measured window starts: for ``--minutes`` it counts the commits
on every status ref, the heartbeats HQ received (from its ``GET /v1/relays``)
and the CPU time each process uses.

Target (the status issue): an idle fleet of HQ, 2 relays and 20 agents makes
0 commits in 5 minutes, heartbeats included.

    python benchmarks/idle_bench.py [--agents-per-relay 10] [--minutes 5] [--poll-seconds 10] [--heartbeat-seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from relay_bench import cpu_seconds  # the same /proc reading as the check-in benchmark

RELAYS = ("relay-east", "relay-west")

FILES = {
    "topology.yaml": """apiVersion: reconciler/v1
kind: Topology
metadata: {name: idle}
spec:
  headquarters: hq
  relays:
    - {name: relay-east, parent: hq}
    - {name: relay-west, parent: hq}
""",
    "packages/tool-1.0.yaml": """apiVersion: reconciler/v1
kind: Package
metadata: {name: tool-1.0}
spec:
  name: tool
  version: "1.0"
  artifact: {path: artifacts/tool}
  installer: {type: files}
""",
    "jobs/install-tool.yaml": """apiVersion: reconciler/v1
kind: Job
metadata: {name: install-tool}
spec:
  jobType: install
  package: {name: tool, version: "1.0"}
  destinationType: allLowerClients
  destinations: [relay-east, relay-west]
""",
    "artifacts/tool/tool.txt": "tool\n",
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def status_commits(origin: Path) -> dict[str, int]:
    """Commits on every ``status/*`` branch of the origin."""
    refs = git(origin, "for-each-ref", "--format=%(refname:short)", "refs/heads/status/").split()
    return {ref: int(git(origin, "rev-list", "--count", ref)) for ref in refs}


def succeeded(origin: Path) -> int:
    result = subprocess.run(["git", "-C", str(origin), "show", "status/hq:jobs/install-tool.yaml"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return 0
    return int(((yaml.safe_load(result.stdout) or {}).get("counts") or {}).get("Succeeded", 0))


def hq_relays(url: str) -> dict[str, dict[str, object]]:
    """HQ's ``GET /v1/relays``, by relay name."""
    with urllib.request.urlopen(f"{url}/v1/relays", timeout=10) as response:
        return {r["relay"]: r for r in json.load(response)["relays"]}


def published_liveness(origin: Path) -> dict[str, str]:
    """Each relay's liveness as relays.yaml on status/hq gives it."""
    result = subprocess.run(["git", "-C", str(origin), "show", "status/hq:relays.yaml"], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    return {r["relay"]: r.get("liveness", "-") for r in (yaml.safe_load(result.stdout) or {}).get("relays", [])}


def full_passes(url: str) -> int:
    """How many full passes a relay ran (its ``GET /metrics``)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("reconciler_relay_full_pass_seconds_count"):
                return int(float(line.split()[-1]))
    return 0


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents-per-relay", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="agents' check-in interval")
    parser.add_argument("--heartbeat-seconds", type=float, default=15.0, help="relays' heartbeat interval to HQ")
    parser.add_argument("--keep", action="store_true", help="keep the origin and logs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reconciler-idle-bench-"))
    origin, admin = work / "origin.git", work / "admin"
    git(work, "init", "-q", "--bare", "-b", "main", str(origin))
    git(work, "init", "-q", "-b", "main", str(admin))
    for rel, text in FILES.items():
        (admin / rel).parent.mkdir(parents=True, exist_ok=True)
        (admin / rel).write_text(text)
    git(admin, "add", "-A")
    git(admin, "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-q", "-m", "specs")
    git(admin, "remote", "add", "origin", str(origin))
    git(admin, "push", "-q", "origin", "main")

    project = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "RECONCILER_POLL_SECONDS": f"{args.poll_seconds:g}",
           "PYTHONPATH": project + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logs = work / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, *argv: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", "reconciler", *argv],
                                           stdout=log, stderr=subprocess.STDOUT, env=env)

    total = args.agents_per_relay * len(RELAYS)
    enroll_file = work / "enroll.secret"  # the relays admit the agents that present it
    enroll_file.write_text("benchmark-enrolment-secret-0123456789\n")
    try:
        spawn("hq", "hq", "--origin", str(origin), "--workdir", str(work / "hq"), "--listen", "127.0.0.1:0", "--insecure-http")
        hq_file = work / "hq" / "listen.url"
        wait_for(lambda: hq_file.is_file() and hq_file.read_text().strip(), 60, "HQ to listen")
        hq_url = hq_file.read_text().strip()
        for relay in RELAYS:
            spawn(relay, "relay", "--name", relay, "--origin", str(origin), "--workdir", str(work / relay),
                  "--listen", "127.0.0.1:0", "--insecure-http", "--hq-url", hq_url,
                  "--heartbeat-interval", f"{args.heartbeat_seconds:g}", "--enroll-secret-file", str(enroll_file))
        for relay in RELAYS:
            url_file = work / relay / "listen.url"
            wait_for(lambda: url_file.is_file() and url_file.read_text().strip(), 60, f"{relay} to listen")
            url = url_file.read_text().strip()
            for i in range(args.agents_per_relay):
                cid = f"pc-{relay.removeprefix('relay-')}-{i:03d}"
                spawn(cid, "agent", "--id", cid, "--relay", url, "--insecure-http", "--insecure-unsigned-actions", "--root", str(work / "clients" / cid),
                      "--fact", "os=linux", "--fact", "arch=x86_64", "--enroll-secret-file", str(enroll_file))
        settle_start = time.monotonic()
        wait_for(lambda: succeeded(origin) == total, 600, f"every one of {total} clients to succeed")
        wait_for(lambda: set(published_liveness(origin).values()) == {"alive"}, 120, "both relays published alive")
        # Settled means the refs stay still for a minute (and at least three check-in rounds): the
        # software the clients report after their installs, and its publish, belong to the rollout.
        still = status_commits(origin)
        while True:
            time.sleep(max(60.0, 3 * args.poll_seconds))
            now = status_commits(origin)
            if now == still:
                break
            still = now
        print(f"settled in {time.monotonic() - settle_start:.0f} s: {total} clients, status refs {sorted(still)}",
              flush=True)

        relay_urls = {relay: (work / relay / "listen.url").read_text().strip() for relay in RELAYS}
        passes_before = {relay: full_passes(url) for relay, url in relay_urls.items()}
        cpu_before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        contacts_before = {name: r["lastContact"] for name, r in hq_relays(hq_url).items()}
        window = args.minutes * 60
        start = time.monotonic()
        minute = 0
        while (elapsed := time.monotonic() - start) < window:
            time.sleep(min(60.0, window - elapsed))
            minute += 1
            counts = status_commits(origin)
            new = {ref: counts[ref] - still.get(ref, 0) for ref in counts}
            print(f"  after {time.monotonic() - start:.0f} s: {sum(new.values())} new status commits {new}",
                  flush=True)
        cpu = {name: cpu_seconds(p.pid) - cpu_before[name] for name, p in procs.items()}
        passes = {relay: full_passes(url) - passes_before[relay] for relay, url in relay_urls.items()}
        exited = [name for name, p in procs.items() if p.poll() is not None]
        live = hq_relays(hq_url)
        liveness = published_liveness(origin)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    counts = status_commits(origin)
    new = {ref: counts[ref] - still.get(ref, 0) for ref in counts}
    agents = [cpu[name] for name in cpu if name.startswith("pc-")]
    minutes = window / 60
    print(f"cores: {os.cpu_count()}, load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"idle window {minutes:g} min, HQ + {len(RELAYS)} relays + {total} agents, check-in every "
          f"{args.poll_seconds:g} s")
    print(f"status commits in the window: {sum(new.values())} {new} (target 0)")
    print(f"relay full passes in the window: {passes} (an idle relay plans only to refresh per-client detail, "
          f"once per --inventory-interval, 900 s by default)")
    beats = int(window // args.heartbeat_seconds)
    print(f"heartbeats: every {args.heartbeat_seconds:g} s, about {beats} per relay in the window; HQ's last contact "
          + ", ".join(f"{name} {contacts_before[name]} -> {r['lastContact']} ({r['liveness']})"
                      for name, r in sorted(live.items()))
          + f"; relays.yaml says {liveness}")
    print(f"CPU seconds per minute: hq {cpu['hq'] / minutes:.2f}, "
          + ", ".join(f"{r} {cpu[r] / minutes:.2f}" for r in RELAYS)
          + f", agents {sum(agents) / minutes:.2f} together ({max(agents) / minutes:.2f} the busiest)")
    if exited:
        print(f"processes that exited during the run: {', '.join(exited)} (logs in {logs})")
        return 1
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
