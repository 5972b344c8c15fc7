"""Signed manifests: what they cost, side by side with the unsigned path in one run.

(a) Relay check-ins per second. Two throw-away origins with the same specs
(one topology, ``--jobs`` install jobs every client already satisfies, as in
``relay_bench.py``); ``reconciler hq --once`` accepts both, and signs the
second one's manifest (``--signing-key``). One ``reconciler relay`` per
origin on 127.0.0.1; ``--clients`` clients register with each, then idle
check-ins are driven from ``--concurrency`` threads with keep-alive
connections, alternating between the relays for ``--rounds`` rounds of
``--duration`` seconds each (the column that goes first rotates), so both
see the same neighbours' load. Three columns:

* ``unsigned``: HQ does not sign; agents send no ``trustSerial``;
* ``signed``: HQ signs; agents send the serial they verified (what a
  verifying agent does after its first reply), so idle replies carry no
  manifest;
* ``signed, stale``: the same relay, check-ins without ``trustSerial``:
  every reply carries the manifest (an agent that has not verified this
  serial yet: once per new accepted commit per agent). Shown for scale,
  not a steady state.

(b) Action latency: the agent's side of a check-in, from the reply's bytes to
the results of its actions, in-process and without HTTP (what
``Agent.checkin``/``Agent.step`` do after the POST returns: decode and check
the reply, run ``Verifier.refusals`` (with the inventory the check-in
reported) when the agent verifies, then ``run_action`` for each action).
The reply has ``--actions`` install actions (``files`` installer, a 64 KiB
artifact already in the agent's cache, reinstalled each run) and, signed, a
manifest listing ``--documents`` documents and the job and package documents
the actions name. Runs alternate between an unverified agent and a verifying one;
medians of ``--runs`` each. Verification alone is timed too, warm (the
agent's own verifier: documents parsed before, the serial known) and cold
(a new verifier per reply: parses the documents and writes ``trust.json``,
as for the first reply of a new accepted commit).

Target: signed within 10% of unsigned, for (a) and (b).

Usage::

    python benchmarks/signing_bench.py
    python benchmarks/signing_bench.py --clients 1000 --duration 5 --rounds 3 --runs 300
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_bench  # noqa: E402 - the relay benchmark's origin, relay and load generator
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from reconciler import protocol  # noqa: E402
from reconciler.agent.agent import Agent  # noqa: E402
from reconciler.agent.verify import Verifier  # noqa: E402
from reconciler.signing import Manifest, document_digest, sign, write_key_pair  # noqa: E402
from reconciler.specs import Package, parse_document  # noqa: E402

TARGET_RATIO = 1.10


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------ (a) check-ins per second


def _hq_sign(base: Path, origin: Path) -> int:
    """Let HQ sign the accepted commit's manifest; returns its serial."""
    key = base / "hq-signing.key"
    write_key_pair(key)
    subprocess.run([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin), "--workdir", str(base / "hq"),
                    "--signing-key", str(key), "--once"], check=True, capture_output=True, env=relay_bench._env())
    data = subprocess.run(["git", f"--git-dir={origin}", "show", "status/hq:manifest.json"], check=True,
                          capture_output=True).stdout
    return int(json.loads(json.loads(data)["payload"])["serial"])


def _with_serial(clients: list[relay_bench.Client], serial: int | None) -> list[relay_bench.Client]:
    """The same clients (ids, tokens) whose check-ins carry ``trustSerial`` (None: none)."""
    out = []
    for client in clients:
        copy = relay_bench.Client.__new__(relay_bench.Client)
        copy.id, copy.token = client.id, client.token
        body = json.loads(client.body)
        if serial is None:
            body.pop("trustSerial", None)
        else:
            body["trustSerial"] = serial
        copy.body = json.dumps(body).encode()
        out.append(copy)
    return out


def _reply_size(host: str, client: relay_bench.Client) -> tuple[int, bool]:
    conn = relay_bench.connect(host, timeout=30)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {client.token}"}
        conn.request("POST", f"/v1/clients/{client.id}/checkin", body=client.body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, data[:200]
        return len(data), "manifest" in json.loads(data)
    finally:
        conn.close()


def checkin_rates(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="signing-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bases = {"unsigned": base / "unsigned", "signed": base / "signed"}
        origins = {}
        for name, where in bases.items():
            where.mkdir()
            origins[name] = relay_bench.build_origin(where, args.jobs)
        serial = _hq_sign(bases["signed"], origins["signed"])
        hosts, pids = {}, {}
        for name, where in bases.items():
            proc, url = relay_bench.start_relay(where, origins[name], args.publish_interval)
            procs.append(proc)
            hosts[name], pids[name] = relay_bench._strip_scheme(url), proc.pid
        fleets: dict[str, list[relay_bench.Client]] = {}
        for name in bases:
            clients = [relay_bench.Client(f"pc-{i:06d}", args.jobs) for i in range(args.clients)]
            _, elapsed, errors = relay_bench.run_load(hosts[name], clients, args.concurrency, None, register=True)
            assert not errors, f"{errors} errors registering with the {name} relay"
            print(f"  {name} relay: {args.clients} clients registered in {elapsed:.1f}s")
            fleets[name] = clients
        for name in bases:
            relay_bench.wait_published(origins[name], args.clients)
        modes = {
            "unsigned": (hosts["unsigned"], pids["unsigned"], _with_serial(fleets["unsigned"], None)),
            "signed": (hosts["signed"], pids["signed"], _with_serial(fleets["signed"], serial)),
            "signed, stale": (hosts["signed"], pids["signed"], _with_serial(fleets["signed"], None)),
        }
        sizes = {mode: _reply_size(host, clients[0]) for mode, (host, _, clients) in modes.items()}
        for mode, (size, has_manifest) in sizes.items():
            print(f"  idle reply, {mode}: {size} bytes{' (carries the manifest)' if has_manifest else ''}")
        assert not sizes["unsigned"][1] and not sizes["signed"][1] and sizes["signed, stale"][1]
        for host, _, clients in modes.values():  # warm-up
            relay_bench.run_load(host, clients, args.concurrency, min(2.0, args.duration), register=False)
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        cpu: dict[str, list[float]] = {mode: [] for mode in modes}
        p99: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            line = []
            order = list(modes.items())
            order = order[round_ % len(order):] + order[:round_ % len(order)]  # no column always goes first
            for mode, (host, pid, clients) in order:
                before = relay_bench.cpu_seconds(pid)
                lat, elapsed, errors = relay_bench.run_load(host, clients, args.concurrency, args.duration,
                                                            register=False)
                used = relay_bench.cpu_seconds(pid) - before
                assert not errors, f"{errors} errors in {mode}"
                rates[mode].append(len(lat) / elapsed)
                cpu[mode].append(used / max(len(lat), 1) * 1e6)
                p99[mode].append(relay_bench._percentile(lat, 99) * 1000)
                line.append(f"{mode} {rates[mode][-1]:.0f}/s ({cpu[mode][-1]:.0f} µs CPU, p99 {p99[mode][-1]:.1f} ms)")
            print(f"  round {round_ + 1}: " + ", ".join(line) + f"; load {load()}")
        result = {mode: {"rate": statistics.median(rates[mode]), "cpu_us": statistics.median(cpu[mode]),
                         "p99_ms": statistics.median(p99[mode]), "reply_bytes": sizes[mode][0]} for mode in modes}
        result["ratio"] = result["unsigned"]["rate"] / result["signed"]["rate"]
        result["cpu_ratio"] = result["signed"]["cpu_us"] / result["unsigned"]["cpu_us"]
        return result
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ (b) action latency

RELAY_URL = "http://127.0.0.1:9"  # never contacted: the artifacts are in the agents' caches


def _job(i: int) -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Job
metadata: {{name: install-app{i}}}
spec:
  jobType: install
  package: {{name: app{i}, version: "1.0"}}
  destinationType: allLowerClients
  destinations: [relay-bench]
  rollout: {{maxConcurrent: 50, maxFailures: "10%"}}
"""


def _package(i: int, sha: str) -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: app{i}-1.0}}
spec:
  name: app{i}
  version: "1.0"
  artifact: {{url: "https://downloads.example.invalid/app{i}.bin", sha256: "{sha}"}}
  installer: {{type: files}}
  requirements: {{os: [linux]}}
"""


class Fixture:
    """A signed manifest of ``documents`` documents, ``actions`` actions and their artifacts."""

    def __init__(self, actions: int, documents: int) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.artifacts = [os.urandom(64 * 1024) for _ in range(actions)]
        shas = [hashlib.sha256(data).hexdigest() for data in self.artifacts]
        self.documents: dict[str, str] = {}
        for i in range(actions):
            self.documents[f"jobs/install-app{i}.yaml"] = _job(i)
            self.documents[f"packages/app{i}-1.0.yaml"] = _package(i, shas[i])
        digests = {path: document_digest(text.encode()) for path, text in self.documents.items()}
        for n in range(documents - len(digests)):  # the rest of the repo: other packages and jobs
            digests[f"packages/other{n:05d}-1.0.yaml"] = hashlib.sha256(b"%d" % n).hexdigest()
        manifest = Manifest(serial=int(time.time()), commit="ab" * 20, issued_at="2026-11-30T12:00:00Z",
                            headquarters="hq-bench", relays={"relay-bench": "hq-bench"}, documents=digests)
        self.envelope = sign(manifest, [self.key])
        self.payload_bytes = len(self.envelope["payload"])
        self.actions = []
        for i in range(actions):
            pkg = parse_document(f"packages/app{i}-1.0.yaml", self.documents[f"packages/app{i}-1.0.yaml"].encode())
            assert isinstance(pkg, Package)
            spec = pkg.installer
            self.actions.append({
                "job": f"install-app{i}", "action": "install", "package": {"name": f"app{i}", "version": "1.0"},
                "previousVersion": None,
                "artifact": {"sha256": shas[i], "size": len(self.artifacts[i]), "format": "file",
                             "fileName": f"app{i}.bin"},
                "installer": {"type": spec.type.value, "install": list(spec.install),
                              "uninstall": list(spec.uninstall), "detect": list(spec.detect),
                              "timeoutSeconds": spec.timeout_seconds},
                "documents": {"job": f"jobs/install-app{i}.yaml", "package": f"packages/app{i}-1.0.yaml"},
            })

    def reply(self, tag: str, signed: bool) -> bytes:
        """A check-in reply's bytes, each action under a new operation id (a new operation each run)."""
        actions = [dict(a, operationId=f"op-{tag}-{i}") for i, a in enumerate(self.actions)]
        reply: dict[str, Any] = {"pollSeconds": 30, "relay": "relay-bench", "actions": actions}
        if signed:
            reply["manifest"] = self.envelope
            reply["documents"] = self.documents
        return json.dumps(reply).encode()

    def agent(self, root: Path, signed: bool) -> Agent:
        agent = Agent(root.name, RELAY_URL, root, insecure_http=True,
                      trust_keys=[self.key.public_key()] if signed else ())
        for data in self.artifacts:
            target = agent.layout.cached_artifact(hashlib.sha256(data).hexdigest())
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return agent


def handle(agent: Agent, data: bytes) -> None:
    """What the agent does with a check-in reply (``Agent.checkin`` after the POST, then ``Agent.step``)."""
    reply = protocol.check_reply(protocol.decode_json(data, "reply"))
    refused: dict[int, str] = {}
    if agent.verifier is not None:
        # the inventory the check-in reported (built for its body, verifying or not): every package at 1.0
        installed = {a["package"]["name"]: "1.0" for a in reply["actions"]}
        refused = agent.verifier.refusals(reply, RELAY_URL, installed)
    for index, action in enumerate(reply["actions"]):
        if index in refused:
            raise AssertionError(f"refused: {refused[index]}")
        result = agent.run_action(action)
        assert result is not None and result["status"] == "succeeded", result


def action_latency(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="signing-bench-agent-"))
    try:
        fixture = Fixture(args.actions, args.documents)
        agents = {"unverified": fixture.agent(base / "pc-unverified", False),
                  "signed": fixture.agent(base / "pc-signed", True)}
        print(f"  reply: {args.actions} actions; signed, a manifest of {args.documents} documents "
              f"({fixture.payload_bytes} bytes) and {len(fixture.documents)} documents; "
              f"unsigned {len(fixture.reply('x', False))} bytes, signed {len(fixture.reply('x', True))} bytes")
        times: dict[str, list[float]] = {mode: [] for mode in agents}
        for run in range(args.runs + 5):
            for mode, agent in (agents.items() if run % 2 else reversed(agents.items())):
                data = fixture.reply(f"{run}", mode == "signed")
                started = time.perf_counter()
                handle(agent, data)
                if run >= 5:  # the first runs install for the first time and warm the caches
                    times[mode].append(time.perf_counter() - started)
        warm, cold = [], []
        verifier = agents["signed"].verifier
        assert verifier is not None
        for run in range(args.runs):
            reply = protocol.check_reply(protocol.decode_json(fixture.reply(f"v{run}", True), "reply"))
            started = time.perf_counter()
            assert verifier.refusals(reply, RELAY_URL, {}) == {}
            warm.append(time.perf_counter() - started)
            fresh = base / "fresh" / str(run)
            fresh.mkdir(parents=True)
            started = time.perf_counter()
            assert Verifier([fixture.key.public_key()], fresh, "pc-cold").refusals(reply, RELAY_URL, {}) == {}
            cold.append(time.perf_counter() - started)
        result = {mode: statistics.median(values) * 1000 for mode, values in times.items()}
        result["ratio"] = result["signed"] / result["unverified"]
        result["verify_warm_ms"] = statistics.median(warm) * 1000
        result["verify_cold_ms"] = statistics.median(cold) * 1000
        result["p90"] = {mode: sorted(v)[int(0.9 * (len(v) - 1))] * 1000 for mode, v in times.items()}
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="clients per relay (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of windows (default 3)")
    parser.add_argument("--jobs", type=int, default=5, help="install jobs reaching every client (default 5)")
    parser.add_argument("--publish-interval", type=float, default=10.0, help="relay --publish-interval")
    parser.add_argument("--actions", type=int, default=5, help="actions per reply in (b) (default 5)")
    parser.add_argument("--documents", type=int, default=1000, help="documents the manifest lists (default 1000)")
    parser.add_argument("--runs", type=int, default=200, help="replies per agent in (b) (default 200)")
    parser.add_argument("--skip-relay", action="store_true", help="only (b)")
    args = parser.parse_args()
    print(f"signing benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load()}")
    ok = True
    if not args.skip_relay:
        print(f"(a) relay check-ins: {args.clients} clients per relay, {args.jobs} jobs, concurrency "
              f"{args.concurrency}, {args.rounds} rounds of {args.duration:.0f} s per column")
        a = checkin_rates(args)
        for mode in ("unsigned", "signed", "signed, stale"):
            m = a[mode]
            print(f"  {mode:<14} median {m['rate']:.0f} check-ins/s, relay CPU {m['cpu_us']:.0f} µs per check-in, "
                  f"p99 {m['p99_ms']:.1f} ms, idle reply {m['reply_bytes']} bytes")
        met = a["ratio"] <= TARGET_RATIO
        ok &= met
        print(f"  unsigned / signed rate: {a['ratio']:.3f}; signed / unsigned CPU per check-in: {a['cpu_ratio']:.3f} "
              f"-> {'OK' if met else 'MISSED'} (target <= {TARGET_RATIO})")
    print(f"(b) agent, reply -> results: {args.actions} actions, {args.runs} replies each, alternating")
    b = action_latency(args)
    print(f"  unverified     median {b['unverified']:.2f} ms per reply (p90 {b['p90']['unverified']:.2f} ms)")
    print(f"  signed         median {b['signed']:.2f} ms per reply (p90 {b['p90']['signed']:.2f} ms)")
    print(f"  verification alone: warm {b['verify_warm_ms']:.2f} ms, cold (new verifier, writes trust.json) "
          f"{b['verify_cold_ms']:.2f} ms per reply")
    met = b["ratio"] <= TARGET_RATIO
    ok &= met
    print(f"  signed / unverified: {b['ratio']:.3f} -> {'OK' if met else 'MISSED'} (target <= {TARGET_RATIO})")
    print(f"load average at the end: {load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
