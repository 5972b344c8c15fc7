"""What an idle agent costs per check-in: detection at every check-in against detection on a schedule.

A real bare origin, ``reconciler hq`` accepting a topology, and one
``reconciler relay`` subprocess on 127.0.0.1 (the e2e tests' helpers). Two
in-process agents (two clients, two roots) hold the same ~20 installed
packages of mixed kinds, put in place through the agent's own
``installers.install`` and ``detection.remember``, as a verified install
action does:

* ``command`` packages whose ``installer.detect`` argv confirms the receipt
  (``${PYTHON} -c ...`` and ``test -e``): a process each per detection;
* ``command`` packages with a ``spec.detect`` command rule (a process each)
  and with a ``file`` rule (a read);
* ``files`` packages of a few hundred files each (the stat-signature check);
* ``deb`` packages in a ``dpkg --root`` sandbox when dpkg and dpkg-deb are
  installed (``dpkg-query`` per detection; ``dpkg --verify`` once per
  ``--rehash-interval``, a day, so only at the first detection).

The relay hands out no work, so every check-in is idle. The two agents check
in alternately, ``--detect-interval 0`` (every check-in asks every package,
the behaviour before the interval) and the default 600 s, for ``--rounds``
check-ins each after one first check-in (which asks everything for both).
Measured per check-in: CPU seconds of the agent process and its children
(``resource.getrusage``: the relay is a separate process that is only reaped
at the end, so it is not counted), wall time, and processes started (every
``subprocess.Popen`` counted). The software inventory is off (it has its own
60-minute schedule). Also printed: the cost per check-in averaged over one
interval at the default 30 s poll (one detecting check-in in twenty).

    python benchmarks/agent_idle_bench.py [--rounds 25] [--files-per-package 300]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reconciler.agent import detection  # noqa: E402
from reconciler.agent.agent import Agent  # noqa: E402
from reconciler.agent.installers import ArtifactRef, InstallerSpec, Layout, install  # noqa: E402

POLL_SECONDS = 30.0

_started = 0
_Popen = subprocess.Popen


class _CountingPopen(_Popen):  # type: ignore[type-arg]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _started
        _started += 1
        super().__init__(*args, **kwargs)


def tar_of(files: dict[str, bytes], where: Path) -> tuple[Path, ArtifactRef]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    path = where / f"{sha}.tar"
    path.write_bytes(data)
    return path, ArtifactRef(sha, "tar", len(data))


def build_deb(where: Path, name: str, version: str) -> tuple[Path, ArtifactRef]:
    tree = where / f"deb-{name}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Bench <b@example.org>\n"
        "Description: benchmark package\n")
    (tree / "opt" / name).mkdir(parents=True)
    for i in range(20):
        (tree / "opt" / name / f"file-{i}.txt").write_text(f"{name} {i}\n")
    out = where / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], check=True,
                   capture_output=True)
    data = out.read_bytes()
    return out, ArtifactRef(hashlib.sha256(data).hexdigest(), "file", len(data), out.name)


def dpkg_sandbox(base: Path) -> Path:
    root = base / "dpkg-root"
    admin = root / "var" / "lib" / "dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (admin / name).touch()
    return root


def populate(layout: Layout, work: Path, files_per_package: int, debs: bool) -> dict[str, int]:
    """Install the package mix into one agent's root; the number of packages of each kind."""
    work.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, int] = {}
    script = {"install.py": b"pass\n", "VERSION": b"version=1.0\n"}
    tar, ref = tar_of(script, work)

    def put(name: str, installer: InstallerSpec, kind: str, artifact: Path = tar, r: ArtifactRef = ref) -> None:
        detection.remember(layout, name, "1.0", installer)
        install(layout, name, "1.0", installer, artifact, r, f"op-{name}")
        kinds[kind] = kinds.get(kind, 0) + 1

    command = {"type": "command", "install": ["${PYTHON}", "install.py"], "uninstall": ["true"],
               "timeoutSeconds": 60}
    for i in range(4):
        put(f"py-detect-{i}", InstallerSpec.from_dict({**command, "detect": [
            "${PYTHON}", "-c", "import os, sys; sys.exit(0 if os.path.exists('install.py') else 1)"]}),
            "command, detect argv (python)")
    for i in range(3):
        put(f"test-detect-{i}", InstallerSpec.from_dict({**command, "detect": ["test", "-e", "${PACKAGE_DIR}/VERSION"]}),
            "command, detect argv (test -e)")
    for i in range(4):
        put(f"rule-command-{i}", InstallerSpec.from_dict({**command, "detection": {
            "command": ["${PYTHON}", "-c", "print('1.0')"]}}), "command, spec.detect command rule")
    for i in range(2):
        put(f"rule-file-{i}", InstallerSpec.from_dict({**command, "detection": {
            "file": "${PACKAGE_DIR}/VERSION", "versionPattern": r"version=(\S+)"}}), "command, spec.detect file rule")
    for i in range(5):
        tree = {f"lib/dir-{j // 50:02d}/file-{j:04d}.dat": (f"{i}-{j}\n" * 40).encode()
                for j in range(files_per_package)}
        files_tar, files_ref = tar_of(tree, work)
        put(f"files-{i}", InstallerSpec("files"), f"files ({files_per_package} files)", files_tar, files_ref)
    if debs:
        for i in range(2):
            deb, deb_ref = build_deb(work, f"bench-deb-{i}", "1.0")
            put(f"bench-deb-{i}", InstallerSpec.from_dict({"type": "deb", "packageName": f"bench-deb-{i}",
                                                           "timeoutSeconds": 120}), "deb (dpkg --root)", deb,
                deb_ref)
    return kinds


def usage() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measured_step(agent: Agent) -> tuple[float, float, int]:
    """One check-in: (CPU seconds of this process and its children, wall seconds, processes started)."""
    started = _started
    cpu, wall = usage(), time.perf_counter()
    result = agent.step()
    wall, cpu = time.perf_counter() - wall, usage() - cpu
    if not result.reached or result.actions:
        raise SystemExit(f"check-in of {agent.client_id} was not idle: {result}")
    return cpu, wall, _started - started


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="idle check-ins per agent (default: 25)")
    parser.add_argument("--files-per-package", type=int, default=300)
    parser.add_argument("--dir", default=None, help="where to build (default: the system temp dir)")
    args = parser.parse_args()
    print("command: python benchmarks/agent_idle_bench.py " + " ".join(sys.argv[1:]))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    from e2e_helpers import ENROLL_SECRET  # noqa: F401 - the tests' helpers: a real origin, HQ and relay
    from test_e2e_relay import Cluster, topology

    base = Path(tempfile.mkdtemp(prefix="agent-idle-bench-", dir=args.dir))
    cluster = Cluster(base)
    try:
        debs = shutil.which("dpkg") is not None and shutil.which("dpkg-deb") is not None
        commit = cluster.accept({"topology.yaml": topology(("relay-a", "hq-x"))})
        relay = cluster.relay("relay-a", publish_interval=60.0)
        cluster.at_commit(relay, commit)
        sandbox = {name: dpkg_sandbox(base / name) if debs else None for name in ("d0", "d600")}
        agents = {
            name: Agent(f"pc-{name}", relay.url, base / "clients" / name, enroll_secret=relay.enroll_secret,
                        insecure_http=True, dpkg_root=sandbox[name], detect_seconds=seconds)
            for name, seconds in (("d0", 0.0), ("d600", detection.DEFAULT_DETECT_SECONDS))}
        for name, agent in agents.items():
            kinds = populate(agent.layout, base / "work" / name, args.files_per_package, debs)
        print(f"packages per agent: {sum(kinds.values())}: "
              + "; ".join(f"{n} {k}" for k, n in kinds.items()) + ("" if debs else " (no dpkg: no deb packages)"))
        subprocess.Popen = _CountingPopen  # type: ignore[misc]
        first = {name: measured_step(agent) for name, agent in agents.items()}
        inventories = {name: len(agent.inventory()) for name, agent in agents.items()}
        if len(set(inventories.values())) != 1 or inventories["d0"] != sum(kinds.values()):
            raise SystemExit(f"not every package is reported installed: {inventories}")
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in agents}
        for _ in range(args.rounds):  # interleaved: the machine's noise falls on both alike
            for name, agent in agents.items():
                samples[name].append(measured_step(agent))
        subprocess.Popen = _Popen  # type: ignore[misc]

        def med(name: str, i: int) -> float:
            return statistics.median(s[i] for s in samples[name])

        print(f"first check-in after start (asks every package): d0 cpu {first['d0'][0] * 1000:.1f} ms, "
              f"{first['d0'][2]} processes; d600 cpu {first['d600'][0] * 1000:.1f} ms, {first['d600'][2]} processes")
        print(f"{'per idle check-in (median of ' + str(args.rounds) + ')':<44}{'--detect-interval 0':>22}"
              f"{'default 600 s':>16}{'ratio':>9}")
        for label, i, scale, unit in (("CPU, self + children", 0, 1000, "ms"), ("wall", 1, 1000, "ms"),
                                      ("processes started", 2, 1, "")):
            a, b = med("d0", i) * scale, med("d600", i) * scale
            ratio = f"{a / b:.1f}x" if b else "-"
            print(f"{label:<44}{a:>19.1f} {unit:<2}{b:>13.1f} {unit:<2}{ratio:>9}")
        per_interval = detection.DEFAULT_DETECT_SECONDS / POLL_SECONDS
        # one check-in per interval asks everything, as every check-in of d0 does
        amortized = (med("d0", 0) + (per_interval - 1) * med("d600", 0)) / per_interval
        print(f"CPU per check-in averaged over one 600 s interval at a 30 s poll (1 detecting check-in in "
              f"{per_interval:.0f}): {amortized * 1000:.1f} ms, against {med('d0', 0) * 1000:.1f} ms "
              f"({med('d0', 0) / amortized:.1f}x); per agent-hour: {amortized * 3600 / POLL_SECONDS:.2f} CPU-s "
              f"against {med('d0', 0) * 3600 / POLL_SECONDS:.2f} CPU-s")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
