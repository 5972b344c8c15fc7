"""Relay check-in throughput and latency: one ``reconciler relay`` process, many simulated clients.

Builds a throw-away origin (a topology with one relay, ``--jobs`` install jobs
reaching all its clients), lets ``reconciler hq --once`` accept it, starts
``reconciler relay`` on 127.0.0.1 with an ephemeral port, registers
``--clients`` clients, then drives steady-state check-ins (facts, labels and
an inventory that already satisfies every job, as in a converged fleet) from
one process: ``--concurrency`` threads, each with its own keep-alive HTTP
connection, picking clients round-robin. It prints check-ins per second and
p50/p90/p99/max latency per fleet size.

Usage::

    python benchmarks/relay_bench.py                      # 1,000 and 10,000 clients
    python benchmarks/relay_bench.py --clients 1000 --duration 5 --concurrency 8
    python benchmarks/relay_bench.py --tls                # HTTPS (cheroot) instead of plain HTTP (waitress)

With ``--pass-commits K`` the measured window includes full passes: K times,
a changed job is pushed to the origin and ``reconciler hq --once`` accepts
it; the relay's watch picks the commit up and re-plans every client; the
next commit waits until that pass ended, and the load runs until the last
one did (at least ``--duration`` seconds). A monitor reads the relay's ``GET
/metrics`` every 0.1 s (``reconciler_relay_full_pass_seconds`` count and
sum): each new pass ended when its count moved and lasted what its sum grew
by. Check-ins whose request overlapped a pass are reported apart from the
others (p50/p99/max), with the relay's peak resident memory (``VmHWM``, its
process and the one running its full passes) and
the load average at start and end::

    python benchmarks/relay_bench.py --clients 10000,50000 --duration 40 --pass-commits 3

``--trees A,B`` runs the same benchmark against other checkouts (their
``reconciler`` package), alternating between them per fleet size, so two
versions are compared in one run on the same machine.

With ``--tls`` a throw-away CA (``tests/tls_helpers.py``, needs
``cryptography``) issues the relay a certificate for 127.0.0.1 and every
connection of the load generator verifies it; connections are kept alive, so
the handshake is paid once per connection, as by real agents.

The load generator is deliberately light (``http.client``, bodies serialised
once per client) so that on a small machine most of the CPU goes to the
relay being measured; both share the machine, so the figures are a lower
bound for a relay on its own host.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TREE = REPO  # the checkout whose ``reconciler`` the relay runs (``--trees``)
TARGET_RATE = 500.0
TARGET_P99_MS = 100.0


def _env() -> dict[str, str]:
    """The environment of the reconciler processes: ``TREE``'s package first. They also run in ``TREE``
    (``cwd``): ``python -m`` puts the working directory before ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TREE) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in (("GIT_AUTHOR_NAME", "bench"), ("GIT_AUTHOR_EMAIL", "bench@example.invalid"),
                       ("GIT_COMMITTER_NAME", "bench"), ("GIT_COMMITTER_EMAIL", "bench@example.invalid")):
        env.setdefault(key, value)
    return env


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=_env())


def build_origin(base: Path, jobs: int) -> Path:
    origin = base / "origin.git"
    work = base / "work"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], check=True, env=_env())
    subprocess.run(["git", "init", "-q", "--initial-branch=main", str(work)], check=True, env=_env())
    files = {"topology.yaml": """\
        apiVersion: reconciler/v1
        kind: Topology
        metadata: {name: bench}
        spec:
          headquarters: hq-bench
          relays:
            - {name: relay-bench, parent: hq-bench}
        """}
    for i in range(jobs):
        files[f"artifacts/app{i}/app.txt"] = f"app {i}\n"
        files[f"packages/app{i}.yaml"] = f"""\
            apiVersion: reconciler/v1
            kind: Package
            metadata: {{name: app{i}-1.0}}
            spec:
              name: app{i}
              version: "1.0"
              artifact: {{path: artifacts/app{i}}}
              installer: {{type: files}}
              requirements: {{os: [linux]}}
            """
        files[f"jobs/install-app{i}.yaml"] = f"""\
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
    for rel, text in files.items():
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "bench specs")
    _git(work, "remote", "add", "origin", str(origin))
    _git(work, "push", "-q", "origin", "main")
    accept(base, origin)
    return origin


def accept(base: Path, origin: Path) -> None:
    subprocess.run([sys.executable, "-m", "reconciler", "hq", "--origin", str(origin), "--workdir",
                    str(base / "hq"), "--once"], check=True, capture_output=True, env=_env(), cwd=TREE)


def push_change(base: Path, origin: Path, round_: int) -> None:
    """Commit a changed job (app0's maxConcurrent) and let HQ accept it: every client is re-planned."""
    work = base / "work"
    job = work / "jobs" / "install-app0.yaml"
    text = job.read_text()
    head, _, tail = text.partition("maxConcurrent: ")
    job.write_text(f"{head}maxConcurrent: {50 + round_}{tail[tail.index(','):]}")
    _git(work, "commit", "-q", "-am", f"bench change {round_}")
    _git(work, "push", "-q", "origin", "main")
    accept(base, origin)


TLS_CONTEXT: ssl.SSLContext | None = None
STDLIB_CLIENT = False  # --stdlib-client: drive the load with http.client instead of RawConnection
"""Set by ``--tls``: every connection of the load generator is HTTPS, verified with the throw-away CA."""


def connect(host: str, timeout: float) -> http.client.HTTPConnection:
    if TLS_CONTEXT is not None:
        return http.client.HTTPSConnection(host, timeout=timeout, context=TLS_CONTEXT)
    return http.client.HTTPConnection(host, timeout=timeout)


def load_connect(host: str, timeout: float) -> http.client.HTTPConnection | RawConnection:
    """A connection of the load generator."""
    return connect(host, timeout) if STDLIB_CLIENT else RawConnection(host, timeout)


class RawConnection:
    """A keep-alive HTTP/1.1 connection that sends prebuilt request bytes and reads a reply by its
    Content-Length: a few µs of the load generator's CPU per check-in where ``http.client`` (its header
    parsing goes through the email package) costs hundreds, so on a shared machine the relay under
    test gets the CPU, not the generator (``--stdlib-client`` measures with ``http.client``)."""

    def __init__(self, host: str, timeout: float) -> None:
        name, _, port = host.rpartition(":")
        sock = socket.create_connection((name.strip("[]"), int(port)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = TLS_CONTEXT.wrap_socket(sock, server_hostname=name.strip("[]")) if TLS_CONTEXT else sock
        self.host = host
        self.buffer = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"reply without Content-Length: {head[:200]!r}")
        while len(rest) < length:
            self.buffer = rest
            self._receive()
            rest = self.buffer
        self.buffer = rest[length:]
        return int(head[9:12]), rest[:length]

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the relay closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _strip_scheme(url: str) -> str:
    return url.removeprefix("https://").removeprefix("http://")


def tls_options(base: Path) -> list[str]:
    """Issue the relay a certificate from a throw-away CA; set :data:`TLS_CONTEXT` to trust it."""
    global TLS_CONTEXT
    sys.path.insert(0, str(REPO / "tests"))
    from tls_helpers import CA
    ca = CA(base / "pki")
    issued = ca.issue("relay")
    TLS_CONTEXT = ssl.create_default_context(cafile=str(ca.cert_file))
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def start_relay(base: Path, origin: Path, publish_interval: float,
                tls: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    workdir = base / "relay"
    enroll_file = base / "enroll.secret"  # the benchmark's clients register with it
    enroll_file.write_text(ENROLL_SECRET + "\n")
    log = open(base / "relay.log", "wb")  # noqa: SIM115
    serving = tls_options(base) if tls else ["--insecure-http"]
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "relay", "--name", "relay-bench", "--origin",
                             str(origin), "--workdir", str(workdir), "--listen", "127.0.0.1:0", *serving,
                             "--publish-interval", str(publish_interval), "--enroll-secret-file", str(enroll_file)],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=TREE)
    deadline = time.monotonic() + 60
    url_file = workdir / "listen.url"
    while not url_file.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"relay did not start:\n{(base / 'relay.log').read_text()}")
        time.sleep(0.05)
    url = url_file.read_text().strip()
    while True:  # wait until it serves the accepted commit
        conn = connect(_strip_scheme(url), timeout=10)
        conn.request("GET", "/healthz")
        health = json.loads(conn.getresponse().read())
        conn.close()
        if health.get("acceptedCommit"):
            return proc, url
        if time.monotonic() > deadline:
            raise SystemExit("relay never reached the accepted commit")
        time.sleep(0.1)


def wait_published(origin: Path, size: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["git", f"--git-dir={origin}", "show",
                               "status/relay-bench:relays/relay-bench/relay.yaml"], capture_output=True, text=True)
        if proc.returncode == 0 and f"clients: {size}\n" in proc.stdout:
            return
        time.sleep(0.5)
    raise SystemExit(f"the relay did not publish status for {size} clients within {timeout}s")


ENROLL_SECRET = "benchmark-enrolment-secret-0123456789"


class Client:
    __slots__ = ("id", "token", "body", "request")

    def __init__(self, client_id: str, jobs: int) -> None:
        self.id = client_id
        self.token = ""
        self.request: bytes | None = None  # the raw request, once it carries the token
        doc = {"facts": {"os": "linux", "arch": "x86_64", "hostname": client_id, "freeDiskMB": 50_000},
               "labels": {"dept": "sales" if hash(client_id) % 2 else "eng"},
               "inventory": [{"name": f"app{i}", "version": "1.0"} for i in range(jobs)],
               "results": []}
        self.body = json.dumps(doc).encode()


def _checkin(conn: http.client.HTTPConnection | RawConnection, client: Client) -> dict[str, Any] | None:
    """One check-in; the reply's JSON when the client has no token yet (it brings one), else None."""
    headers = {"Content-Type": "application/json"}
    if client.token:
        headers["Authorization"] = f"Bearer {client.token}"
    else:
        headers["X-Reconciler-Enrollment"] = ENROLL_SECRET
    path = f"/v1/clients/{client.id}/checkin"
    if isinstance(conn, RawConnection):
        if client.request is None:
            client.request = (f"POST {path} HTTP/1.1\r\nHost: {conn.host}\r\nContent-Length: {len(client.body)}\r\n"
                              + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + client.body
        status, data = conn.exchange(client.request)
    else:
        conn.request("POST", path, body=client.body, headers=headers)
        response = conn.getresponse()
        status, data = response.status, response.read()
    if status != 200:
        raise RuntimeError(f"check-in of {client.id}: HTTP {status}: {data[:200]!r}")
    return json.loads(data) if not client.token else None


def run_load(host: str, clients: list[Client], concurrency: int, duration: float | None,
             register: bool, starts: list[float] | None = None,
             keep_going: Callable[[], bool] | None = None, once: bool = False) -> tuple[list[float], float, int]:
    """Check clients in; returns (latencies in seconds, elapsed, errors). With ``starts``, each check-in's
    start (``time.perf_counter()``) is appended to it, in the order of the latencies. With ``keep_going``,
    the load goes on past ``duration`` while it answers True. ``register`` and ``once`` check each client
    in once (``register``: to take its token)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    began_at: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0]
    cursor = [0]
    lock = threading.Lock()
    stop_at = None if duration is None else time.perf_counter() + duration

    def worker(slot: int) -> None:
        conn = load_connect(host, timeout=30)
        mine = latencies[slot]
        mine_started = began_at[slot]
        while True:
            with lock:
                index = cursor[0]
                cursor[0] += 1
            if (register or once) and index >= len(clients):
                break
            if stop_at is not None and time.perf_counter() >= stop_at and (keep_going is None or not keep_going()):
                break
            client = clients[index % len(clients)]
            started = time.perf_counter()
            try:
                reply = _checkin(conn, client)
            except (OSError, http.client.HTTPException, RuntimeError) as e:
                errors[0] += 1
                if errors[0] <= 5:
                    print(f"  error: {e}", file=sys.stderr)
                conn.close()
                conn = load_connect(host, timeout=30)
                continue
            mine.append(time.perf_counter() - started)
            mine_started.append(started)
            if register and reply is not None:
                client.token = reply["token"]
                client.request = None
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if starts is not None:
        starts.extend(x for chunk in began_at for x in chunk)
    return [x for chunk in latencies for x in chunk], elapsed, errors[0]


class PassMonitor:
    """Reads the relay's full-pass histogram every ``interval`` s: (start, end) of each pass seen, in
    ``time.perf_counter()`` time (the end is when the count moved: within ``interval`` of the real one)."""

    def __init__(self, host: str, interval: float = 0.1) -> None:
        self.host = host
        self.interval = interval
        self.passes: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self, conn: http.client.HTTPConnection) -> tuple[float, float]:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        count = total = 0.0
        for line in text.splitlines():
            if line.startswith("reconciler_relay_full_pass_seconds_count"):
                count = float(line.split()[-1])
            elif line.startswith("reconciler_relay_full_pass_seconds_sum"):
                total = float(line.split()[-1])
        return count, total

    def _run(self) -> None:
        conn = connect(self.host, timeout=30)
        count, total = self.read(conn)
        while not self._stop.wait(self.interval):
            try:
                now_count, now_total = self.read(conn)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = connect(self.host, timeout=30)
                continue
            if now_count > count:
                ended = time.perf_counter()
                self.passes.append((ended - (now_total - total), ended))
                count, total = now_count, now_total
        conn.close()

    def __enter__(self) -> PassMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class MemorySampler:
    """The largest sum of the relay's processes' ``VmRSS`` seen, sampling every ``interval`` s: the peak the
    processes reached together (the sum of each one's ``VmHWM`` adds peaks that came at different times)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, memory_mb(self.pid, "VmRSS"))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def split_by_passes(latencies: list[float], starts: list[float], passes: list[tuple[float, float]],
                    ) -> tuple[list[float], list[float]]:
    """(latencies of check-ins whose request overlapped a pass, the others)."""
    during: list[float] = []
    outside: list[float] = []
    for latency, start in zip(latencies, starts):
        end = start + latency
        (during if any(start <= p_end and end >= p_start for p_start, p_end in passes) else outside).append(latency)
    return during, outside


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants running the same executable (the relay runs its full passes in a child
    process; git commands it runs are not counted), from ``/proc``."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return [pid]
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        try:
            if os.readlink(f"/proc/{current}/exe") != exe:
                continue
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        found.append(current)
        for task in tasks:
            try:
                queue.extend(int(child) for child in (task / "children").read_text().split())
            except (OSError, ValueError):
                pass
    return found


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """Resident memory of a process and its descendants (each one's ``VmHWM``, or another field such as
    ``VmRSS``), summed, MB; 0 where ``/proc`` does not say. Summed peaks are an upper bound of the peak of
    the sum: the processes need not peak at once."""
    total = 0.0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def reset_peak(pid: int) -> bool:
    """Start the ``VmHWM`` of a process and its descendants again from their current RSS (Linux
    ``clear_refs``), so a phase (here the measured window, apart from registering the whole fleet at once
    before it) has its own peak."""
    try:
        for member in process_tree(pid):
            Path(f"/proc/{member}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench(size: int, args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        origin = build_origin(base, args.jobs)
        proc, url = start_relay(base, origin, args.publish_interval, args.tls)
        host = _strip_scheme(url)
        clients = [Client(f"pc-{i:06d}", args.jobs) for i in range(size)]
        setup_sampler = MemorySampler(proc.pid).__enter__()
        lat, elapsed, errors = run_load(host, clients, args.concurrency, None, register=True)
        print(f"{size:>6} clients: registered in {elapsed:.1f}s ({size / elapsed:.0f}/s), errors {errors}")
        if not args.no_settle:
            # Steady state: the relay has planned, recorded and published the whole new fleet once.
            settled = time.perf_counter()
            wait_published(origin, size)
            print(f"{size:>6} clients: first full status published {time.perf_counter() - settled:.1f}s later")
        # Warm-up: every client's first check-in with its token confirms it (a write); a fleet does that
        # once, so the window measures the check-ins that follow.
        run_load(host, clients, args.concurrency, None, register=False, once=True)
        setup_peak = memory_mb(proc.pid)
        setup_sampler.__exit__()
        print(f"{size:>6} clients: relay RSS {memory_mb(proc.pid, 'VmRSS'):.0f} MB before the window, "
              f"peak {setup_peak:.0f} MB while the whole fleet registered and confirmed (sum of the processes' "
              f"RSS sampled: peak {setup_sampler.peak_mb:.0f} MB)")
        window_sampler = MemorySampler(proc.pid).__enter__()
        windowed = reset_peak(proc.pid)
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--duration",
                                         str(int(args.duration)), "--format", "speedscope", "--output",
                                         f"{args.profile}-{size}.json", "--nonblocking"])
        cpu_before = cpu_seconds(proc.pid)
        starts: list[float] = []
        passes: list[tuple[float, float]] = []
        if args.pass_commits:
            # One commit, then wait for a full pass to end, K times; the load runs until then (at least
            # --duration s, at most --pass-timeout s more per commit).
            def changes() -> None:
                stopped.wait(min(5.0, args.duration / 4))
                for k in range(args.pass_commits):
                    seen = len(monitor.passes)
                    push_change(base, origin, k + 1)
                    deadline = time.perf_counter() + args.pass_timeout
                    while len(monitor.passes) <= seen and time.perf_counter() < deadline:
                        time.sleep(0.1)
                    time.sleep(1.0)  # some check-ins after the pass, before the next commit

            stopped = threading.Event()
            changer = threading.Thread(target=changes, daemon=True)
            with PassMonitor(host) as monitor:
                changer.start()
                lat, elapsed, errors = run_load(host, clients, args.concurrency, args.duration, register=False,
                                                starts=starts, keep_going=changer.is_alive)
                stopped.set()
                changer.join()
            passes = monitor.passes
        else:
            lat, elapsed, errors = run_load(host, clients, args.concurrency, args.duration, register=False,
                                            starts=starts)
        cpu = cpu_seconds(proc.pid) - cpu_before
        window_sampler.__exit__()
        if profiler is not None:
            profiler.wait(timeout=120)
        result: dict[str, Any] = {
            "clients": size, "checkins": len(lat), "seconds": elapsed, "rate": len(lat) / elapsed,
            "p50_ms": statistics.median(lat) * 1000, "p90_ms": _percentile(lat, 90) * 1000,
            "p99_ms": _percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000, "errors": errors,
            "relay_cpu_us_per_checkin": cpu / max(len(lat), 1) * 1e6,
        }
        result["tree"] = str(TREE)
        result["relay_hwm_mb"] = memory_mb(proc.pid) if windowed else max(setup_peak, memory_mb(proc.pid))
        result["relay_setup_hwm_mb"] = setup_peak
        result["relay_rss_peak_mb"] = window_sampler.peak_mb  # the summed RSS, sampled
        result["relay_setup_rss_peak_mb"] = setup_sampler.peak_mb
        if args.pass_commits:
            during, outside = split_by_passes(lat, starts, passes)
            result["passes"] = [round(end - start, 2) for start, end in passes]
            for name, values in (("during", during), ("outside", outside)):
                result[f"{name}_checkins"] = len(values)
                result[f"{name}_p50_ms"] = statistics.median(values) * 1000 if values else None
                result[f"{name}_p99_ms"] = _percentile(values, 99) * 1000 if values else None
                result[f"{name}_max_ms"] = max(values) * 1000 if values else None
            # check-ins/s while a pass ran: those that overlapped one, over the passes' total time
            busy = sum(end - start for start, end in passes)
            result["during_rate"] = len(during) / busy if busy > 0 else None

            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value:.1f} ms"

            print(f"{size:>6} clients: {len(passes)} full passes in the window ({', '.join(f'{d:.2f}s' for d in result['passes'])}); "
                  f"during passes {len(during)} check-ins"
                  + (f" ({result['during_rate']:.0f}/s)" if result["during_rate"] else "")
                  + f", p50 {ms(result['during_p50_ms'])}, p99 {ms(result['during_p99_ms'])}, "
                  f"max {ms(result['during_max_ms'])}; outside {len(outside)}, p50 {ms(result['outside_p50_ms'])}, "
                  f"p99 {ms(result['outside_p99_ms'])}, max {ms(result['outside_max_ms'])}")
        ok = result["rate"] >= TARGET_RATE and result["p99_ms"] < TARGET_P99_MS and not errors
        print(f"{size:>6} clients: {result['rate']:.0f} check-ins/s over {elapsed:.1f}s "
              f"({result['checkins']} check-ins, concurrency {args.concurrency}), "
              f"p50 {result['p50_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
              f"max {result['max_ms']:.1f} ms, errors {errors} -> {'OK' if ok else 'MISSED'} "
              f"(target >= {TARGET_RATE:.0f}/s, p99 < {TARGET_P99_MS:.0f} ms); "
              f"relay CPU {result['relay_cpu_us_per_checkin']:.0f} µs per check-in, "
              f"relay peak RSS in the window {result['relay_hwm_mb']:.0f} MB (sampled sum: "
              f"{result['relay_rss_peak_mb']:.0f} MB) [{TREE}]")
        return result
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            print(f"  kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux ``/proc``; 0 elsewhere).

    On a shared machine the rate moves with the neighbours' load; the relay's
    CPU per check-in moves much less, so it is printed beside the rate.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1000,10000", help="comma-separated fleet sizes (default 1000,10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measured load per size")
    parser.add_argument("--jobs", type=int, default=5, help="install jobs reaching every client (default 5)")
    parser.add_argument("--publish-interval", type=float, default=10.0, help="relay --publish-interval")
    parser.add_argument("--tls", action="store_true",
                        help="serve and drive HTTPS (cheroot, a throw-away CA) instead of plain HTTP (waitress)")
    parser.add_argument("--stdlib-client", action="store_true",
                        help="drive the load with http.client (the generator takes more of the shared CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--no-settle", action="store_true",
                        help="measure right after registration, while the relay's first full pass runs")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="record the relay with py-spy during the measured load (PREFIX-<size>.json)")
    parser.add_argument("--pass-commits", type=int, default=0, metavar="K",
                        help="push K changed commits during the measured window, so full passes run in it, and "
                             "report the check-ins during passes apart (default 0)")
    parser.add_argument("--pass-timeout", type=float, default=120.0,
                        help="with --pass-commits: the longest to wait for the full pass after a commit (s)")
    parser.add_argument("--trees", metavar="DIR,DIR",
                        help="run the relay from these checkouts in turn, per fleet size (default: this one)")
    args = parser.parse_args()
    global STDLIB_CLIENT
    STDLIB_CLIENT = args.stdlib_client
    print(f"relay benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.jobs} jobs, "
          f"concurrency {args.concurrency}, {'HTTPS' if args.tls else 'plain HTTP'}, "
          f"load from {'http.client' if args.stdlib_client else 'raw sockets'}; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    global TREE
    trees = [Path(t).resolve() for t in args.trees.split(",")] if args.trees else [REPO]
    results = []
    for size in args.clients.split(","):
        for tree in trees:
            TREE = tree
            results.append(bench(int(size), args))
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.pass_commits:
        print("| tree | clients | check-ins/s | p99 | max | passes | during passes: check-ins/s, p50, p99, max | "
              "outside: p99, max | relay VmHWM (sampled RSS) |")
        for r in results:
            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value:.0f} ms"
            print(f"| {r['tree']} | {r['clients']:,} | {r['rate']:,.0f} | {r['p99_ms']:.0f} ms | {r['max_ms']:.0f} ms | "
                  f"{' / '.join(f'{d:.1f} s' for d in r['passes'])} | "
                  f"{'-' if not r['during_rate'] else format(r['during_rate'], ',.0f')}, {ms(r['during_p50_ms'])}, "
                  f"{ms(r['during_p99_ms'])}, {ms(r['during_max_ms'])} | {ms(r['outside_p99_ms'])}, "
                  f"{ms(r['outside_max_ms'])} | {r['relay_hwm_mb']:.0f} MB ({r['relay_rss_peak_mb']:.0f} MB) |")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["rate"] >= TARGET_RATE and r["p99_ms"] < TARGET_P99_MS and not r["errors"]
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
