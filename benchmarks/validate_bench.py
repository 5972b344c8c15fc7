"""Benchmark: ``reconciler validate`` on a repo of 5,000 spec files.

Generates, in a temporary directory, a desired-state repo shaped like a large
fleet's: one topology with 50 relays (regions with nested sites), 2,500
packages (half ``files``, half ``command`` installers, each with a small
in-repo artifact directory) and 2,499 jobs (``allLowerClients`` and
``clients`` destinations, some scheduled, with retry and rollout settings).
It then runs ``python -m reconciler validate`` on it several times as a
subprocess, the way CI does, and prints the median wall time and the
machine's core count. The target is a median under 5 s on 2 cores.

    python benchmarks/validate_bench.py [--runs 5] [--packages 2500] [--relays 50] [--keep DIR]
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
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _relays(count: int) -> list[tuple[str, str]]:
    """(name, parent) pairs: one regional relay per ten, the others sites under it."""
    relays: list[tuple[str, str]] = []
    region = ""
    for index in range(count):
        if index % 10 == 0:
            region = f"relay-region-{index // 10:02d}"
            relays.append((region, "hq"))
        else:
            relays.append((f"relay-site-{index:03d}", region))
    return relays


def generate(root: Path, *, packages: int, relays: int) -> int:
    """Write the repo under ``root``; return the number of spec files written."""
    relay_list = _relays(relays)
    lines = [
        "apiVersion: reconciler/v1",
        "kind: Topology",
        "metadata:",
        "  name: bench-fleet",
        "spec:",
        "  headquarters: hq-central",
        "  relays:",
    ]
    for name, parent in relay_list:
        parent = "hq-central" if parent == "hq" else parent
        lines += [f"    - name: {name}", f"      parent: {parent}",
                  f"      labels: {{region: r{name[-2:]}, tier: site}}"]
    (root / "topology.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = 1

    (root / "packages").mkdir()
    (root / "jobs").mkdir()
    for index in range(packages):
        name = f"app-{index:04d}"
        version = f"{1 + index % 7}.{index % 13}.{index % 5}"
        spec_name = f"{name}-{version}"
        artifact = root / "artifacts" / spec_name
        artifact.mkdir(parents=True)
        (artifact / "README.txt").write_text(f"{name} {version}\n", encoding="utf-8")
        if index % 2:
            installer = [
                "    type: command",
                '    install: ["${PYTHON}", "setup.py", "install"]',
                '    uninstall: ["${PYTHON}", "setup.py", "uninstall"]',
                '    detect: ["${PYTHON}", "setup.py", "detect"]',
                "    timeoutSeconds: 300",
            ]
            (artifact / "setup.py").write_text("print('ok')\n", encoding="utf-8")
        else:
            installer = ["    type: files"]
        extra: list[str] = []
        if index % 3 == 0:
            extra += ["  requirements:", "    os: [windows]", "    arch: [x86_64, arm64]",
                      "    minFreeDiskMB: 200", "    labels: {dept: sales}"]
        if index % 5 == 0 and index > 0:
            extra += ["  dependsOn:", f"    - name: app-{index - 1:04d}", '      minVersion: "1.0"']
        text = "\n".join([
            "# yaml-language-server: $schema=../../schemas/package.schema.json",
            "apiVersion: reconciler/v1",
            "kind: Package",
            "metadata:",
            f"  name: {spec_name}",
            "  annotations: {owner: desktop-team}",
            "spec:",
            f"  name: {name}",
            f'  version: "{version}"',
            f"  description: Benchmark package number {index}.",
            "  artifact:",
            f"    path: artifacts/{spec_name}",
            "  installer:",
            *installer,
            *extra,
        ]) + "\n"
        (root / "packages" / f"{spec_name}.yaml").write_text(text, encoding="utf-8")
        written += 1

        if written >= 5000:
            break
        job_type = "uninstall" if index % 11 == 10 else "install"
        package_line = (f"  package: {{name: {name}}}" if job_type == "uninstall"
                        else f'  package: {{name: {name}, version: "{version}"}}')
        if index % 4 == 3:
            destination = ["  destinationType: clients",
                           f"  destinations: [pc-{index:04d}-a, pc-{index:04d}-b, pc-{index:04d}-c]"]
        else:
            targets = ", ".join(relay_list[(index + k) % len(relay_list)][0] for k in range(3))
            destination = ["  destinationType: allLowerClients", f"  destinations: [{targets}]"]
        extra = []
        if index % 6 == 0:
            extra += ["  schedule:", '    notBefore: "2027-04-01T09:00:00+09:00"',
                      '    notAfter: "2027-06-30T18:00:00Z"']
        if index % 4 == 0:
            extra += ["  retry:", "    limit: 5", "    backoffSeconds: 30",
                      "  rollout:", "    maxConcurrent: 20", '    maxFailures: "10%"']
        text = "\n".join([
            "# yaml-language-server: $schema=../../schemas/job.schema.json",
            "apiVersion: reconciler/v1",
            "kind: Job",
            "metadata:",
            f"  name: {job_type}-{name}",
            "spec:",
            f"  jobType: {job_type}",
            package_line,
            *destination,
            *extra,
        ]) + "\n"
        (root / "jobs" / f"{job_type}-{name}.yaml").write_text(text, encoding="utf-8")
        written += 1
    return written


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_validate(repo: Path) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + sys), exit code and the output's tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(repo)],
                          capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    return elapsed, _children_cpu() - cpu_before, proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="validate runs to take the median of (default 5)")
    parser.add_argument("--packages", type=int, default=2500, help="packages to generate (default 2500)")
    parser.add_argument("--relays", type=int, default=50, help="relays in the topology (default 50)")
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR (must not exist) and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="validate-bench-") as tmp:
        repo = Path(args.keep) if args.keep else Path(tmp) / "repo"
        repo.mkdir(parents=True)
        spec_files = generate(repo, packages=args.packages, relays=args.relays)
        times, cpu_times = [], []
        for run in range(args.runs):
            elapsed, cpu, code, output = run_validate(repo)
            if code != 0:
                print(f"validate exited {code} on the generated repo:\n{output}", file=sys.stderr)
                return 1
            times.append(elapsed)
            cpu_times.append(cpu)
            print(f"run {run + 1}: {elapsed:.2f} s wall, {cpu:.2f} s cpu", file=sys.stderr)
        print(f"spec files: {spec_files}")
        print(f"runs: {args.runs}  median: {statistics.median(times):.2f} s  "
              f"min: {min(times):.2f} s  max: {max(times):.2f} s")
        # CPU time does not grow when other work shares the machine; wall time does.
        print(f"median cpu (user+sys): {statistics.median(cpu_times):.2f} s")
        print(f"cpu_count: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
