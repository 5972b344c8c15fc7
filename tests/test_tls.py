"""TLS end to end: real relay and HQ processes serving HTTPS, real agents and child relays verifying them.

A throw-away CA (``tests/tls_helpers.py``) issues a certificate for
127.0.0.1/localhost, an expired one, one for another host name and a client
certificate; a second CA stands for a man in the middle. Every refusal must
be our own one-line message naming the certificate problem, never a
traceback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from e2e_helpers import (
    ENROLL_SECRET,
    FileServer,
    HqProcess,
    Origin,
    RelayProcess,
    env,
    reconciler,
    secret_file,
    wait_for,
)
from e2e_helpers import REPO_ROOT as PROJECT_ROOT
from tls_helpers import CA, Issued

from reconciler.agent.agent import Agent, AgentConfigError
from reconciler.tls import ClientTLS, client_session

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="installer scripts are sh"),
]

TOPOLOGY = """\
apiVersion: reconciler/v1
kind: Topology
metadata: {name: test}
spec:
  headquarters: hq-x
  relays:
    - {name: region, parent: hq-x}
    - {name: site, parent: region}
"""

PAYLOAD = b"#!/bin/sh\necho tool\n"


def _package(url: str) -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: tool-1.0}}
spec:
  name: tool
  version: "1.0"
  artifact: {{url: "{url}", sha256: "{hashlib.sha256(PAYLOAD).hexdigest()}"}}
  installer: {{type: files}}
"""


JOB = """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: install-tool}
spec:
  jobType: install
  package: {name: tool, version: "1.0"}
  destinationType: allLowerClients
  destinations: [region]
"""


class Pki:
    def __init__(self, base: Path) -> None:
        self.ca = CA(base / "ca", "fleet-ca")
        self.mitm = CA(base / "mitm", "mitm-ca")
        self.good = self.ca.issue("relay")
        self.expired = self.ca.issue("expired", expired=True)
        self.wrong_host = self.ca.issue("elsewhere", hosts=("relay.elsewhere.example",))
        self.forged = self.mitm.issue("forged")
        self.client = self.ca.issue("client", hosts=("pc-1",), client=True)
        self.stranger = self.mitm.issue("stranger", hosts=("pc-1",), client=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class World:
    """An origin with one accepted job for ``region`` (a URL artifact), and the relays a test starts."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.files = FileServer({"/tool.sh": PAYLOAD})
        self.commit = self.origin.commit({"topology.yaml": TOPOLOGY,
                                          "packages/tool-1.0.yaml": _package(f"{self.files.url}/tool.sh"),
                                          "jobs/install-tool.yaml": JOB})
        assert self.origin.accept(base / "hq-once") == self.commit
        self.services: list[RelayProcess | HqProcess] = []

    def relay(self, name: str, cert: Issued, *extra: str, parent_url: str | None = None) -> RelayProcess:
        relay = RelayProcess(name, self.origin.url, self.base / name, parent_url=parent_url, insecure_http=False,
                             extra_args=["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), *extra])
        self.services.append(relay)
        return relay.start()

    def close(self) -> None:
        for service in self.services:
            if service.proc is not None and service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait(timeout=10)
        self.files.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def _agent_cli(world: World, client: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    enroll = secret_file(world.base / "agent.enroll-secret", ENROLL_SECRET)  # the test relays' default secret
    return subprocess.run([sys.executable, "-m", "reconciler", "agent", "--id", client, "--relay", url,
                           "--root", str(world.base / "clients" / client), "--enroll-secret-file", str(enroll),
                           "--insecure-unsigned-actions", *args, "--once"],
                          cwd=PROJECT_ROOT, env=env(), capture_output=True, text=True, timeout=120)


def _receipts(world: World, client: str) -> set[str]:
    directory = world.base / "clients" / client / "receipts"
    return {p.stem for p in directory.glob("*.json")} if directory.is_dir() else set()


def _health(url: str, ca: Path) -> dict[str, object]:
    response = client_session(ClientTLS(ca)).get(f"{url}/healthz", timeout=10)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def test_an_agent_converges_over_tls_and_a_child_relay_fetches_from_its_tls_parent(world: World, pki: Pki) -> None:
    region = world.relay("region", pki.good)
    assert region.url.startswith("https://127.0.0.1:")
    wait_for(lambda: _health(region.url, pki.ca.cert_file)["acceptedCommit"] == world.commit, 60,
             what="region serving the accepted commit")
    site = world.relay("site", pki.good, "--ca-file", str(pki.ca.cert_file), parent_url=region.url)
    wait_for(lambda: _health(site.url, pki.ca.cert_file)["acceptedCommit"] == world.commit, 60,
             what="site serving the accepted commit")

    for client, relay in (("pc-region", region), ("pc-site", site)):
        def converged(client: str = client, relay: RelayProcess = relay) -> bool:
            proc = _agent_cli(world, client, relay.url, "--ca-file", str(pki.ca.cert_file))
            assert proc.returncode == 0, proc.stderr
            return _receipts(world, client) == {"tool"}
        wait_for(converged, 90, interval=0.5, what=f"{client} to install the tool over TLS")
    assert world.files.hits == {"/tool.sh": 1}, "the child relay did not get the artifact from its TLS parent"
    assert "plain HTTP" not in region.output()


@pytest.mark.parametrize("cert_name, ours", [
    ("forged", "was issued by a CA that is not trusted"),  # a man in the middle with another CA's certificate
    ("expired", "has expired"),
    ("wrong_host", "is not for this IP address"),
])
def test_an_agent_refuses_a_relay_certificate_it_cannot_trust(world: World, pki: Pki, cert_name: str,
                                                              ours: str) -> None:
    relay = world.relay("region", getattr(pki, cert_name))
    proc = _agent_cli(world, "pc-1", relay.url, "--ca-file", str(pki.ca.cert_file))
    assert proc.returncode == 1
    assert f"TLS with relay {relay.url} failed: the server's certificate {ours}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _receipts(world, "pc-1") == set()


def test_the_system_store_does_not_trust_a_private_ca(world: World, pki: Pki) -> None:
    relay = world.relay("region", pki.good)
    proc = _agent_cli(world, "pc-1", relay.url)  # no --ca-file: the system's CAs only
    assert proc.returncode == 1 and "not trusted" in proc.stderr and "Traceback" not in proc.stderr


def test_a_plain_http_agent_is_refused_by_a_tls_relay(world: World, pki: Pki) -> None:
    relay = world.relay("region", pki.good)
    plain = relay.url.replace("https://", "http://")
    refused = _agent_cli(world, "pc-1", plain)
    assert refused.returncode == 2 and "--insecure-http" in refused.stderr
    proc = _agent_cli(world, "pc-1", plain, "--insecure-http")
    assert proc.returncode == 1
    assert "did not accept plain HTTP" in proc.stderr and "use an https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mutual_tls_refuses_an_agent_without_a_client_certificate_and_accepts_the_right_one(world: World,
                                                                                          pki: Pki) -> None:
    relay = world.relay("region", pki.good, "--tls-client-ca", str(pki.ca.cert_file))
    ca = ("--ca-file", str(pki.ca.cert_file))
    bare = _agent_cli(world, "pc-1", relay.url, *ca)
    assert bare.returncode == 1 and "client certificate" in bare.stderr and "Traceback" not in bare.stderr
    stranger = _agent_cli(world, "pc-1", relay.url, *ca, "--client-cert", str(pki.stranger.cert),
                          "--client-key", str(pki.stranger.key))
    assert stranger.returncode == 1 and "Traceback" not in stranger.stderr
    assert _receipts(world, "pc-1") == set()

    def converged() -> bool:
        proc = _agent_cli(world, "pc-1", relay.url, *ca, "--client-cert", str(pki.client.cert),
                          "--client-key", str(pki.client.key))
        assert proc.returncode == 0, proc.stderr
        return _receipts(world, "pc-1") == {"tool"}
    wait_for(converged, 90, interval=0.5, what="the agent with a client certificate to converge")


def test_a_child_relay_presents_its_client_certificate_to_a_parent_that_requires_one(world: World,
                                                                                      pki: Pki) -> None:
    ca = str(pki.ca.cert_file)
    region = world.relay("region", pki.good, "--tls-client-ca", ca)
    site = world.relay("site", pki.good, "--ca-file", ca, "--client-cert", str(pki.client.cert), "--client-key",
                       str(pki.client.key), parent_url=region.url)
    wait_for(lambda: _health(site.url, pki.ca.cert_file)["acceptedCommit"] == world.commit, 60,
             what="site serving the accepted commit")

    def converged() -> bool:
        proc = _agent_cli(world, "pc-site", site.url, "--ca-file", ca)
        assert proc.returncode == 0, proc.stderr
        return _receipts(world, "pc-site") == {"tool"}
    wait_for(converged, 90, interval=0.5, what="pc-site to install the tool")
    assert world.files.hits == {"/tool.sh": 1}, "the child relay did not get the artifact from its mTLS parent"


def test_a_relay_with_a_bad_certificate_pair_does_not_start(world: World, pki: Pki) -> None:
    mismatched = reconciler("relay", "--name", "region", "--origin", world.origin.url, "--workdir",
                            str(world.base / "r1"), "--listen", "127.0.0.1:0", "--tls-cert", str(pki.good.cert),
                            "--tls-key", str(pki.expired.key), check=False)
    assert mismatched.returncode == 2 and "the key does not belong to the certificate" in mismatched.stderr
    missing = reconciler("relay", "--name", "region", "--origin", world.origin.url, "--workdir",
                         str(world.base / "r2"), "--listen", "127.0.0.1:0", "--tls-cert",
                         str(world.base / "nope.pem"), "--tls-key", str(pki.good.key), check=False)
    assert missing.returncode == 2 and "cannot read it" in missing.stderr
    half = reconciler("relay", "--name", "region", "--origin", world.origin.url, "--workdir",
                      str(world.base / "r3"), "--listen", "127.0.0.1:0", "--tls-cert", str(pki.good.cert), check=False)
    assert half.returncode == 2 and "give both or neither" in half.stderr
    plain = reconciler("relay", "--name", "region", "--origin", world.origin.url, "--workdir",
                       str(world.base / "r4"), "--listen", "127.0.0.1:0", check=False)
    assert plain.returncode == 2 and "--insecure-http" in plain.stderr
    for proc in (mismatched, missing, half, plain):
        assert "Traceback" not in proc.stderr


def test_hq_refuses_tls_options_it_cannot_use(world: World, pki: Pki) -> None:
    without_listen = reconciler("hq", "--origin", world.origin.url, "--workdir", str(world.base / "h1"), "--once",
                                "--tls-cert", str(pki.good.cert), "--tls-key", str(pki.good.key), check=False)
    assert without_listen.returncode == 2 and "need --listen" in without_listen.stderr
    plain = reconciler("hq", "--origin", world.origin.url, "--workdir", str(world.base / "h2"), "--listen",
                       "127.0.0.1:0", check=False)
    assert plain.returncode == 2 and "--insecure-http" in plain.stderr
    mismatched = reconciler("hq", "--origin", world.origin.url, "--workdir", str(world.base / "h3"), "--listen",
                            "127.0.0.1:0", "--tls-cert", str(pki.good.cert), "--tls-key", str(pki.client.key),
                            check=False)
    assert mismatched.returncode == 2 and "the key does not belong to the certificate" in mismatched.stderr
    for proc in (without_listen, plain, mismatched):
        assert "Traceback" not in proc.stderr


def test_in_process_agents_refuse_plain_http_unless_asked(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="--insecure-http"):
        Agent("pc-1", "http://127.0.0.1:9", tmp_path / "a")
    Agent("pc-1", "http://127.0.0.1:9", tmp_path / "b", insecure_http=True)


def test_stalled_and_garbage_tls_clients_do_not_block_others(world: World, pki: Pki) -> None:
    relay = world.relay("region", pki.good)
    port = int(relay.url.rsplit(":", 1)[1])
    hostile: list[socket.socket] = []
    try:
        for _ in range(10):  # more than the relay has worker threads
            hostile.append(socket.create_connection(("127.0.0.1", port), timeout=10))  # connects, says nothing
        for _ in range(10):  # more than the relay has worker threads
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a TLS hello, then silence
            hostile.append(s)
        for _ in range(10):  # more than the relay has worker threads
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(os.urandom(512))  # garbage instead of a hello
            hostile.append(s)
        started = time.monotonic()
        for _ in range(5):
            assert _health(relay.url, pki.ca.cert_file)["ok"] is True
        assert time.monotonic() - started < 5.0, "honest clients waited behind hostile ones"
    finally:
        for s in hostile:
            s.close()


def test_a_relay_sends_heartbeats_to_a_tls_hq_with_its_ca(world: World, pki: Pki) -> None:
    hq = HqProcess(world.origin.url, world.base / "hq", "--poll-interval", "1", "--tls-cert", str(pki.good.cert),
                   "--tls-key", str(pki.good.key))
    world.services.append(hq)
    hq.start()
    assert hq.url.startswith("https://")
    region = world.relay("region", pki.good, "--ca-file", str(pki.ca.cert_file), "--hq-url", hq.url,
                         "--heartbeat-interval", "1")
    # A relay that does not trust HQ's certificate says why in its log.
    site = world.relay("site", pki.good, "--hq-url", hq.url, "--heartbeat-interval", "1",
                       parent_url=region.url, )

    def relays() -> dict[str, object] | None:
        response = client_session(ClientTLS(pki.ca.cert_file)).get(f"{hq.url}/v1/relays", timeout=10)
        body = response.json()
        return body if "region" in str(body) else None
    wait_for(relays, 60, interval=0.3, what="HQ to hear region's heartbeat over TLS")
    # Its heartbeats start after its first full pass; staging from its parent (untrusted too) may say so first.
    wait_for(lambda: any("heartbeat to HQ" in line and "not trusted" in line for line in site.output().splitlines()),
             60, interval=0.3, what="site to log the untrusted HQ")
    assert "Traceback" not in site.output()
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{hq.url}/healthz", timeout=10, verify=str(pki.mitm.cert_file))


def test_hq_with_mutual_tls_hears_only_the_relay_with_a_client_certificate(world: World, pki: Pki) -> None:
    ca = str(pki.ca.cert_file)
    hq = HqProcess(world.origin.url, world.base / "hq", "--poll-interval", "1", "--tls-cert", str(pki.good.cert),
                   "--tls-key", str(pki.good.key), "--tls-client-ca", ca)
    world.services.append(hq)
    hq.start()
    region = world.relay("region", pki.good, "--ca-file", ca, "--client-cert", str(pki.client.cert),
                         "--client-key", str(pki.client.key), "--hq-url", hq.url, "--heartbeat-interval", "1")
    site = world.relay("site", pki.good, "--ca-file", ca, "--hq-url", hq.url, "--heartbeat-interval", "1",
                       parent_url=region.url)
    mtls = client_session(ClientTLS(pki.ca.cert_file, pki.client.cert, pki.client.key))

    def contacts() -> dict[str, object]:
        body = mtls.get(f"{hq.url}/v1/relays", timeout=10).json()
        return {row["relay"]: row["lastContact"] for row in body["relays"]}
    wait_for(lambda: contacts().get("region"), 60, interval=0.3, what="HQ to hear region's heartbeat over mutual TLS")
    wait_for(lambda: "client certificate" in site.output(), 60, interval=0.3,
             what="site to log that HQ wants a client certificate")
    assert contacts().get("site") is None, "HQ heard a relay that presented no client certificate"
    assert "Traceback" not in site.output()
    with pytest.raises(requests.exceptions.RequestException):
        client_session(ClientTLS(pki.ca.cert_file)).get(f"{hq.url}/healthz", timeout=10)
