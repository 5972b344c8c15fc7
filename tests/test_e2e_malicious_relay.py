"""End to end: a relay that speaks the real protocol but lies, and agents that run nothing it made up.

A real origin, ``reconciler hq --once --signing-key`` accepting its commits,
and a real ``reconciler relay`` subprocess (relay-a). In front of the relay
sits a tampering HTTP proxy on 127.0.0.1 (:class:`TamperingProxy`): agents
check in with it, it forwards each check-in to the real relay and rewrites
the JSON reply with the test's mutation before the agent sees it (artifact
downloads go through it too). What the agents send, their results included,
reaches the real relay unchanged, so the relay's published status shows each
refusal: a Failed row with reason ``securityError``, never retried.

Every install script writes ``ran-<package>`` under the client's root, so
"nothing ran" is read off the client's disk: no marker, no receipt, no
package directory. Each attack is shown to be the only thing wrong where
that can be shown: the same forged reply passes a verifier that lacks just
the piece of state (newest serial, pinned relay name, trusted key) that
refuses it here. The control runs the honest replies through the same proxy
and installs, so refusals are not an artifact of the proxy.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from e2e_helpers import Origin, RelayProcess, reconciler, wait_for

from reconciler import protocol
from reconciler.agent.agent import Agent
from reconciler.agent.verify import Verifier
from reconciler.signing import (
    document_digest,
    key_id,
    parse_manifest,
    sign,
)
from reconciler.specs import Package, parse_document

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="installer scripts are sh"),
]

Reply = dict[str, Any]
Mutation = Callable[[str, Reply], Reply]
"""(client id, the relay's reply) -> the reply the agent gets; called only for replies that carry actions."""

_CHECKIN = re.compile(r"^/v1/clients/([^/]+)/checkin$")
_ARTIFACT = re.compile(r"^/v1/artifacts/([0-9a-f]{64})$")
_FORWARDED = ("Content-Type", "Authorization", protocol.ENROLLMENT_HEADER, "Accept", "Range")


class TamperingProxy:
    """A relay in the middle: forwards to the real relay, lies in the replies (and artifacts) it hands back."""

    def __init__(self, upstream: str, mutate: Mutation | None = None) -> None:
        self.upstream = upstream
        self.mutate = mutate
        self.artifact_filter: Callable[[str, bytes], bytes] | None = None  # (sha256, relay's bytes) -> bytes sent
        self.extra_artifacts: dict[str, bytes] = {}  # sha256 -> bytes the relay does not have
        self.lock = threading.Lock()
        self.rewritten = 0  # replies with actions passed through ``mutate``
        self.tampered: list[tuple[str, Reply]] = []  # (client, reply sent) where it differs from the relay's
        self.results: list[dict[str, Any]] = []  # results agents reported (forwarded unchanged)
        self.artifact_gets: list[str] = []
        self.session = requests.Session()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _upstream(self, method: str, body: bytes | None) -> requests.Response:
                headers = {k: v for k in _FORWARDED if (v := self.headers.get(k)) is not None}
                return outer.session.request(method, outer.upstream + self.path, data=body, headers=headers,
                                             timeout=30, allow_redirects=False)

            @staticmethod
            def _headers(response: requests.Response) -> dict[str, str]:
                return {k: v for k in ("Content-Type", "Content-Range", "WWW-Authenticate")
                        if (v := response.headers.get(k)) is not None}

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                response = self._upstream("POST", body)
                data = response.content
                match = _CHECKIN.match(self.path)
                if match and response.status_code == 200:
                    try:
                        sent = json.loads(body)
                        with outer.lock:
                            outer.results.extend(sent.get("results", []))
                    except ValueError:
                        pass
                    data = outer.rewrite(match.group(1), response.json())
                self._send(response.status_code, data, self._headers(response))

            def do_GET(self) -> None:  # noqa: N802
                match = _ARTIFACT.match(self.path)
                if match:
                    sha = match.group(1)
                    with outer.lock:
                        outer.artifact_gets.append(sha)
                    if sha in outer.extra_artifacts:
                        self._send(200, outer.extra_artifacts[sha], {"Content-Type": "application/octet-stream"})
                        return
                response = self._upstream("GET", None)
                data = response.content
                if match and response.status_code == 200 and outer.artifact_filter is not None:
                    data = outer.artifact_filter(match.group(1), data)
                self._send(response.status_code, data, self._headers(response))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def rewrite(self, client: str, reply: Reply) -> bytes:
        honest = json.dumps(reply).encode()
        if self.mutate is None or not reply.get("actions"):
            return honest
        changed = self.mutate(client, copy.deepcopy(reply))
        out = json.dumps(changed).encode()
        with self.lock:
            self.rewritten += 1
            if changed != reply:
                self.tampered.append((client, copy.deepcopy(changed)))
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.session.close()


# ------------------------------------------------------------------ specs


def install_script(name: str) -> str:
    return f'#!/bin/sh\necho "ran" >> "$RECONCILER_ROOT/ran-{name}"\n'


def package(name: str, extra: str = "", version: str = "1.0", artifact: str | None = None) -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: {name}-{version}}}
spec:
  name: {name}
  version: "{version}"
  artifact: {{path: artifacts/{artifact or name}}}
  installer: {{type: command, install: [sh, install.sh], uninstall: [sh, -c, "true"], timeoutSeconds: 60}}
{extra}"""


def job(name: str, pkg: str, destination: str, version: str = "1.0") -> str:
    return f"""\
apiVersion: reconciler/v1
kind: Job
metadata: {{name: {name}}}
spec:
  jobType: install
  package: {{name: {pkg}, version: "{version}"}}
  destinationType: allLowerClients
  destinations: [{destination}]
  retry: {{limit: 1, backoffSeconds: 0}}
"""


TOPOLOGY = """\
apiVersion: reconciler/v1
kind: Topology
metadata: {name: test}
spec:
  headquarters: hq-x
  relays:
    - {name: relay-a, parent: hq-x}
    - {name: relay-b, parent: hq-x}
"""

# The first accepted commit: a job installing ``legacy`` on relay-a's clients.
FIRST = {
    "topology.yaml": TOPOLOGY,
    "artifacts/legacy/install.sh": install_script("legacy"),
    "packages/legacy-1.0.yaml": package("legacy"),
    "jobs/install-legacy.yaml": job("install-legacy", "legacy", "relay-a"),
}
# The second (current) one: HQ no longer wants legacy installed; tool, then addon (it needs tool) on
# relay-a's clients; bee on relay-b's clients only.
SECOND = {
    "jobs/install-legacy.yaml": None,
    "artifacts/tool/install.sh": install_script("tool"),
    "artifacts/addon/install.sh": install_script("addon"),
    "artifacts/bee/install.sh": install_script("bee"),
    "packages/tool-1.0.yaml": package("tool"),
    "packages/addon-1.0.yaml": package("addon", '  dependsOn: [{name: tool, minVersion: "1.0"}]\n'),
    "packages/bee-1.0.yaml": package("bee"),
    "jobs/install-tool.yaml": job("install-tool", "tool", "relay-a"),
    "jobs/install-addon.yaml": job("install-addon", "addon", "relay-a"),
    "jobs/install-bee.yaml": job("install-bee", "bee", "relay-b"),
}
PACKAGES = ("legacy", "tool", "addon", "bee")


def installer_json(pkg: Package) -> dict[str, Any]:
    spec = pkg.installer
    out: dict[str, Any] = {"type": spec.type.value, "install": list(spec.install), "uninstall": list(spec.uninstall),
                           "detect": list(spec.detect), "timeoutSeconds": spec.timeout_seconds}
    if spec.redact:
        out["redact"] = list(spec.redact)
    return out


def relay_operations(relay: RelayProcess, client: str, job_name: str) -> list[tuple[str, str]]:
    """(operation id, outcome) of the job's operations for the client, in the relay's own database."""
    db = sqlite3.connect(relay.workdir / "relay.sqlite3")
    try:
        return db.execute("SELECT operation_id, outcome FROM operations WHERE client = ? AND job = ? "
                          "ORDER BY dispatched_at", (client, job_name)).fetchall()
    finally:
        db.close()


class World:
    """The origin with both commits accepted, relay-a running, and what a lying relay could collect."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.hq = base / "hq"
        self.first = self.origin.commit(FIRST, "legacy")
        assert self.origin.accept(self.hq) == self.first
        # What a relay keeps from the first accepted commit: HQ's envelope and the documents it covers.
        self.old_envelope: dict[str, Any] = json.loads(self.origin.read("status/hq", "manifest.json") or b"null")
        self.old_documents = self.texts(self.first, "jobs/install-legacy.yaml", "packages/legacy-1.0.yaml")
        self.second = self.origin.commit(SECOND, "tool, addon, bee")
        assert self.origin.accept(self.hq) == self.second
        self.envelope: dict[str, Any] = json.loads(self.origin.read("status/hq", "manifest.json") or b"null")
        self.old_manifest = parse_manifest(self.old_envelope["payload"])
        self.manifest = parse_manifest(self.envelope["payload"])
        assert (self.old_manifest.commit, self.manifest.commit) == (self.first, self.second)
        assert self.old_manifest.serial < self.manifest.serial
        self.documents = self.texts(self.second, "jobs/install-bee.yaml", "packages/bee-1.0.yaml",
                                    "packages/tool-1.0.yaml")
        self.relay = RelayProcess("relay-a", self.origin.url, base / "relay-a").start()
        wait_for(lambda: self.relay.health()["acceptedCommit"] == self.second, 30, what="relay-a at the commit")
        self.proxies: list[TamperingProxy] = []

    def texts(self, commit: str, *paths: str) -> dict[str, str]:
        out = {}
        for path in paths:
            data = self.origin.read(commit, path)
            assert data is not None, path
            out[path] = data.decode("utf-8")
        return out

    def proxy(self, mutate: Mutation | None = None) -> TamperingProxy:
        proxy = TamperingProxy(self.relay.url, mutate)
        self.proxies.append(proxy)
        return proxy

    def root(self, client: str) -> Path:
        return self.base / "clients" / client

    def agent(self, client: str, proxy: TamperingProxy, trust: list[Any] | None = None) -> Agent:
        return Agent(client, proxy.url, self.root(client), enroll_secret=self.relay.enroll_secret,
                     insecure_http=True, trust_keys=self.origin.trust_keys() if trust is None else trust)

    def fresh_verifier(self, client: str, name: str, keys: list[Any] | None = None) -> Verifier:
        """A verifier that has seen nothing yet (no serial, no pinned name): what an attack must get past."""
        return Verifier(keys or self.origin.trust_keys(), self.base / "fresh" / name, client)

    def row(self, job_name: str, client: str) -> dict[str, Any]:
        return self.origin.job_rows("relay-a", job_name).get(client, {})

    def wait_row(self, job_name: str, client: str, state: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (r := self.row(job_name, client)).get("state") == state and r, timeout,
                        what=f"{job_name} for {client} to be {state} (row now {self.row(job_name, client)})")

    def converge(self, agent: Agent, job_name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        """Check in (each round runs what it is given and reports) until the job's row is in ``state``."""
        def settled() -> dict[str, Any] | None:
            assert agent.run_once() == 0
            row = self.row(job_name, agent.client_id)
            return row if row.get("state") == state else None
        return wait_for(settled, timeout, interval=0.2,
                        what=f"{job_name} for {agent.client_id} to be {state} ({self.row(job_name, agent.client_id)})")

    def ran(self, client: str) -> set[str]:
        """The packages whose install script ran on the client, and whatever else a forged command left."""
        root = self.root(client)
        found = {name for name in PACKAGES if (root / f"ran-{name}").exists()}
        found |= {p.name for p in root.glob("pwn*")} if root.is_dir() else set()
        return found

    def installed(self, client: str) -> set[str]:
        root = self.root(client)
        receipts = {p.stem for p in (root / "receipts").glob("*.json")}
        packages = {p.name for p in (root / "packages").iterdir()} if (root / "packages").is_dir() else set()
        assert receipts == packages, f"receipts {receipts} but package directories {packages}"
        return receipts

    def assert_refused(self, proxy: TamperingProxy, client: str, job_name: str, why: str) -> dict[str, Any]:
        """The relay's row is Failed for a security reason naming ``why``; the refusal reached it as sent."""
        row = self.wait_row(job_name, client, "Failed")
        assert row["reason"] == "securityError", row
        assert row["message"].startswith("refused by the client: security: "), row
        assert why in row["message"], row
        assert proxy.tampered and all(c == client for c, _ in proxy.tampered)
        refused = [r for r in proxy.results if r["status"] == "refused"]
        assert refused and all(why in r["message"] for r in refused), proxy.results
        # The relay recorded the one operation it sent as refused by the client, and sent it once only.
        operations = self.operations(client, job_name)
        assert [outcome for _, outcome in operations] == ["refused"], operations
        assert operations[0][0] in {r["operationId"] for r in refused}
        return row

    def operations(self, client: str, job_name: str) -> list[tuple[str, str]]:
        return relay_operations(self.relay, client, job_name)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        if self.relay.proc is not None and self.relay.proc.poll() is None:
            self.relay.proc.kill()
            self.relay.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("malicious-relay"))
    yield w
    assert "Traceback" not in w.relay.output()
    w.close()


def action_for(reply: Reply, job_name: str) -> dict[str, Any] | None:
    return next((a for a in reply["actions"] if a.get("job") == job_name), None)


def swap_to(world: World, action: dict[str, Any], job_name: str, pkg_path: str) -> None:
    """Make ``action`` (keeping its operation id) the install of another real, signed job and package."""
    pkg = parse_document(pkg_path, world.documents[pkg_path].encode())
    assert isinstance(pkg, Package)
    digest = world.manifest.artifacts[pkg_path]
    action.update({"job": job_name, "action": "install", "package": {"name": pkg.name, "version": pkg.version},
                   "previousVersion": None, "installer": installer_json(pkg), "artifact": digest.to_json(),
                   "documents": {"job": f"jobs/{job_name}.yaml", "package": pkg_path}})
    action.pop("dependsOn", None)


# ------------------------------------------------------------------ the attacks


def test_control_the_honest_relay_through_the_same_proxy_installs(world: World) -> None:
    """Every reply goes through the proxy's rewrite (re-serialised, unchanged): tool, then addon, run."""
    proxy = world.proxy(lambda _client, reply: reply)
    agent = world.agent("pc-control", proxy)
    world.converge(agent, "install-addon", "Succeeded")
    assert world.wait_row("install-tool", "pc-control", "Succeeded")["reason"] == "done"
    assert world.ran("pc-control") == {"tool", "addon"}
    assert world.installed("pc-control") == {"tool", "addon"}
    assert proxy.rewritten >= 2 and proxy.tampered == []
    assert [r["status"] for r in proxy.results] == ["succeeded", "succeeded"]
    assert len(proxy.artifact_gets) == 2  # both artifacts came through the proxy
    assert agent.verifier is not None and agent.verifier.serial == world.manifest.serial


def _forged_install(client: str, reply: Reply) -> Reply:
    action = action_for(reply, "install-tool")
    if action is not None:
        action["installer"]["install"] = ["sh", "-c", 'touch "${ROOT}/pwned"']
    return reply


def test_an_altered_installer_argv_is_refused_by_an_agent_process(world: World) -> None:
    """``reconciler agent --trust-key F --once`` as a subprocess: the relay's install command is not HQ's."""
    proxy = world.proxy(_forged_install)
    root = world.root("pc-argv")
    assert world.relay.enroll_secret_file is not None
    reconciler("agent", "--id", "pc-argv", "--relay", proxy.url, "--insecure-http", "--root", str(root),
               "--trust-key", str(world.origin.trust_key), "--enroll-secret-file", str(world.relay.enroll_secret_file),
               "--once")
    world.assert_refused(proxy, "pc-argv", "install-tool",
                         "the action's installer is not the package document's (install differ)")
    assert proxy.tampered[0][1]["actions"][0]["installer"]["install"][0:2] == ["sh", "-c"]
    assert not (root / "pwned").exists() and world.ran("pc-argv") == set()
    assert world.installed("pc-argv") == set()
    assert proxy.artifact_gets == [], "the agent downloaded an artifact of an action it refused"


def test_an_altered_artifact_sha256_is_refused_before_the_download(world: World) -> None:
    evil = b"#!/bin/sh\ntouch \"$RECONCILER_ROOT/pwned\"\n"
    evil_sha = document_digest(evil)

    def swap_artifact(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-tool")
        if action is not None:
            action["artifact"] = {"sha256": evil_sha, "size": len(evil), "format": "file", "fileName": "install.sh"}
        return reply

    proxy = world.proxy(swap_artifact)
    proxy.extra_artifacts[evil_sha] = evil
    agent = world.agent("pc-sha", proxy)
    assert agent.run_once() == 0
    signed = world.manifest.artifacts["packages/tool-1.0.yaml"].sha256
    row = world.assert_refused(proxy, "pc-sha", "install-tool",
                               f"the action's artifact (sha256 {evil_sha}) is not the one HQ signed ({signed})")
    assert row["attempts"] == 1
    assert proxy.artifact_gets == []
    assert world.ran("pc-sha") == set() and world.installed("pc-sha") == set()
    assert agent.run_once() == 0 and proxy.rewritten == 1, "the relay sent the refused action again"


def test_a_reboot_the_signed_documents_do_not_allow_is_refused(world: World) -> None:
    """The relay adds ``reboot: ifRequired`` to an action whose job and package say nothing (never)."""
    def add_reboot(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-tool")
        if action is not None:
            action["reboot"] = "ifRequired"
        return reply

    proxy = world.proxy(add_reboot)
    agent = world.agent("pc-reboot", proxy)
    assert agent.run_once() == 0
    world.assert_refused(proxy, "pc-reboot", "install-tool",
                         "the action says reboot ifRequired; job install-tool and its package say never")
    assert world.ran("pc-reboot") == set() and world.installed("pc-reboot") == set()


def test_other_bytes_under_the_signed_sha256_fail_the_download_check(world: World) -> None:
    """The action is HQ's to the letter; the bytes served for it are not (same size, one word changed)."""
    proxy = world.proxy()
    served: list[str] = []

    def corrupt(sha: str, data: bytes) -> bytes:
        served.append(sha)
        assert b"ran-tool" in data
        return data.replace(b"ran-tool", b"pwn-tool")

    proxy.artifact_filter = corrupt
    agent = world.agent("pc-bytes", proxy)
    assert agent.run_once() == 0
    row = world.wait_row("install-tool", "pc-bytes", "Failed")
    signed = world.manifest.artifacts["packages/tool-1.0.yaml"].sha256
    assert row["reason"] == "failed" and f"sha256 mismatch: expected {signed}" in row["message"], row
    assert served == [signed]
    assert world.ran("pc-bytes") == set() and world.installed("pc-bytes") == set()
    assert not any(world.root("pc-bytes").joinpath("cache").rglob("*")), "the wrong bytes were kept"


FABRICATED = package("tool").replace("install: [sh, install.sh]", 'install: [sh, -c, "touch \\"${ROOT}/pwned\\""]')


@pytest.mark.parametrize("variant", ["new-path", "signed-path", "other-package"])
def test_a_package_no_accepted_commit_has_is_refused(world: World, variant: str) -> None:
    """The relay hands out a package document of its own making, with the installer it says."""
    fabricated = FABRICATED if variant != "other-package" else FABRICATED.replace("tool", "evil")
    path = {"new-path": "packages/tool-1.0-hotfix.yaml", "signed-path": "packages/tool-1.0.yaml",
            "other-package": "packages/evil-1.0.yaml"}[variant]
    pkg = parse_document(path, fabricated.encode())
    assert isinstance(pkg, Package) and "touch" in pkg.installer.install[2]

    def fabricate(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-tool")
        if action is not None:
            action["documents"]["package"] = path
            action["installer"] = installer_json(pkg)
            action["package"] = {"name": pkg.name, "version": pkg.version}
            reply["documents"][path] = fabricated
        return reply

    client = f"pc-fab-{variant}"
    proxy = world.proxy(fabricate)
    assert world.agent(client, proxy).run_once() == 0
    why = {
        "new-path": f"package document '{path}' is not in HQ's manifest (serial {world.manifest.serial}",
        "signed-path": f"package document '{path}' is not the one HQ signed (sha256 "
                       f"{document_digest(fabricated.encode())[:12]}",
        "other-package": "the action is for package 'evil', job install-tool for 'tool'",
    }[variant]
    world.assert_refused(proxy, client, "install-tool", why)
    assert not (world.root(client) / "pwned").exists() and world.ran(client) == set()
    assert world.installed(client) == set() and proxy.artifact_gets == []


def test_a_job_for_another_subtree_is_refused(world: World) -> None:
    """relay-a hands its client relay-b's real, signed job (and package, artifact digest and all)."""
    def other_subtree(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-tool")
        if action is not None:
            swap_to(world, action, "install-bee", "packages/bee-1.0.yaml")
            reply["documents"].update(world.documents)
        return reply

    proxy = world.proxy(other_subtree)
    assert world.agent("pc-subtree", proxy).run_once() == 0
    world.assert_refused(proxy, "pc-subtree", "install-tool",
                         "job install-bee is for the clients below relay-b; this client is below relay-a < hq-x")
    assert world.ran("pc-subtree") == set() and world.installed("pc-subtree") == set()
    # Everything else about the forged action is HQ's: the bee documents are the signed ones.
    sent = proxy.tampered[0][1]
    for path in ("jobs/install-bee.yaml", "packages/bee-1.0.yaml"):
        assert document_digest(sent["documents"][path].encode()) == world.manifest.documents[path]


def test_a_replayed_older_manifest_is_refused(world: World) -> None:
    """After an honest round (tool installed, serial N verified), the relay replays the first commit's
    envelope with its legacy job instead of the addon: valid once, but older than what the agent has seen."""
    def replay(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-addon")
        if action is None:
            return reply
        legacy = parse_document("packages/legacy-1.0.yaml", world.old_documents["packages/legacy-1.0.yaml"].encode())
        assert isinstance(legacy, Package)
        action.update({"job": "install-legacy", "package": {"name": "legacy", "version": "1.0"},
                       "installer": installer_json(legacy),
                       "artifact": world.old_manifest.artifacts["packages/legacy-1.0.yaml"].to_json(),
                       "documents": {"job": "jobs/install-legacy.yaml", "package": "packages/legacy-1.0.yaml"}})
        action.pop("dependsOn", None)
        reply["manifest"] = copy.deepcopy(world.old_envelope)
        reply["documents"] = dict(world.old_documents)
        return reply

    proxy = world.proxy(replay)
    agent = world.agent("pc-replay", proxy)
    world.converge(agent, "install-addon", "Failed")
    assert world.row("install-tool", "pc-replay")["state"] == "Succeeded"
    world.assert_refused(proxy, "pc-replay", "install-addon",
                         f"manifest serial {world.old_manifest.serial} is older than serial "
                         f"{world.manifest.serial} this client has already verified")
    assert world.ran("pc-replay") == {"tool"} and world.installed("pc-replay") == {"tool"}
    assert agent.verifier is not None and agent.verifier.serial == world.manifest.serial
    # The replayed reply is a complete, validly signed one: only the serial the agent remembers refuses it.
    replayed = proxy.tampered[0][1]
    assert world.fresh_verifier("pc-replay", "replay").refusals(replayed, proxy.url) == {}


def _rogue_key_envelope(world: World, fabricated_path: str, fabricated: str, key: Ed25519PrivateKey,
                        how: str) -> dict[str, Any]:
    """HQ's current manifest with the fabricated document added, signed (or not) as ``how`` says."""
    manifest = world.manifest
    documents = {**manifest.documents, fabricated_path: document_digest(fabricated.encode())}
    # The fabricated package keeps tool's (real) artifact, so the artifact digest is listed for it too.
    artifacts = {**manifest.artifacts, fabricated_path: manifest.artifacts["packages/tool-1.0.yaml"]}
    forged = replace(manifest, serial=manifest.serial + 1, documents=documents, artifacts=artifacts)
    envelope = sign(forged, [key])
    hq_id = world.envelope["signatures"][0]["keyId"]
    if how == "claims-hq-key-id":
        envelope["signatures"][0]["keyId"] = hq_id
    elif how == "keeps-hq-signature":
        envelope["signatures"] = copy.deepcopy(world.envelope["signatures"])
    return envelope


@pytest.mark.parametrize("how", ["own-key", "claims-hq-key-id", "keeps-hq-signature"])
def test_a_manifest_signed_by_another_key_is_refused(world: World, how: str) -> None:
    """The relay covers its fabricated package by adding it to the manifest and signing that itself."""
    rogue = Ed25519PrivateKey.generate()
    path = "packages/tool-1.0-hotfix.yaml"
    pkg = parse_document(path, FABRICATED.encode())
    assert isinstance(pkg, Package)
    envelope = _rogue_key_envelope(world, path, FABRICATED, rogue, how)

    def resign(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-tool")
        if action is not None:
            action["documents"]["package"] = path
            action["installer"] = installer_json(pkg)
            reply["documents"][path] = FABRICATED
            reply["manifest"] = copy.deepcopy(envelope)
        return reply

    client = f"pc-key-{how}"
    proxy = world.proxy(resign)
    assert world.agent(client, proxy).run_once() == 0
    hq_id = world.envelope["signatures"][0]["keyId"]
    why = (f"the manifest is not signed by a trusted key (signed by: {key_id(rogue.public_key())})"
           if how == "own-key" else
           f"the manifest's signature by trusted key {hq_id} does not verify (altered in transit or forged)")
    world.assert_refused(proxy, client, "install-tool", why)
    assert not (world.root(client) / "pwned").exists() and world.ran(client) == set()
    assert world.installed(client) == set()
    # The forgery is otherwise complete: an agent that trusted the relay's key would have run it.
    if how == "own-key":
        sent = proxy.tampered[0][1]
        assert world.fresh_verifier(client, how, [rogue.public_key()]).refusals(sent, proxy.url) == {}
    # The trust state learned nothing from the forgery: not its serial, not its key.
    trust = json.loads((world.root(client) / "trust.json").read_text())
    assert trust["serial"] <= world.manifest.serial and trust["learnedKeys"] == []
    assert base64.b64decode(envelope["signatures"][0]["signature"])  # a real signature, not garbage


def test_a_relay_claiming_another_relays_name_after_it_was_pinned_is_refused(world: World) -> None:
    """After an honest round as relay-a, the relay answers as relay-b, handing out relay-b's real job."""
    def impersonate(client: str, reply: Reply) -> Reply:
        action = action_for(reply, "install-addon")
        if action is not None:
            swap_to(world, action, "install-bee", "packages/bee-1.0.yaml")
            reply["documents"].update(world.documents)
            reply["relay"] = "relay-b"
        return reply

    proxy = world.proxy(impersonate)
    agent = world.agent("pc-pinned", proxy)
    world.converge(agent, "install-addon", "Failed")
    world.assert_refused(proxy, "pc-pinned", "install-addon",
                         "the relay at this URL answered as 'relay-a' before and now as 'relay-b'")
    assert world.ran("pc-pinned") == {"tool"} and world.installed("pc-pinned") == {"tool"}
    trust = json.loads((world.root("pc-pinned") / "trust.json").read_text())
    assert trust["relays"] == {proxy.url: "relay-a"}
    # To an agent that had not pinned the name, the same reply is a valid job of relay-b's.
    assert world.fresh_verifier("pc-pinned", "pinned").refusals(proxy.tampered[0][1], proxy.url) == {}


UNINSTALL_TOOL_2 = """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: uninstall-tool}
spec:
  jobType: uninstall
  package: {name: tool, version: "2.0"}
  destinationType: allLowerClients
  destinations: [relay-a]
"""


def test_an_older_version_sent_as_an_upgrade_is_refused_as_a_downgrade(tmp_path: Path) -> None:
    """The client has tool 2.0; HQ's current commit has a job for tool 1.0 without allowDowngrade (the plan
    skips it: newer version present). The relay sends that signed job's action, calling it an upgrade."""
    origin = Origin(tmp_path)
    hq = tmp_path / "hq"
    first = origin.commit({
        "topology.yaml": TOPOLOGY,
        "artifacts/tool/install.sh": install_script("tool"),
        "artifacts/tool2/install.sh": install_script("tool2"),
        "packages/tool-1.0.yaml": package("tool"),
        "packages/tool-2.0.yaml": package("tool", version="2.0", artifact="tool2"),
        "jobs/install-tool-2.yaml": job("install-tool-2", "tool", "relay-a", version="2.0"),
    })
    assert origin.accept(hq) == first
    relay = RelayProcess("relay-a", origin.url, tmp_path / "relay-a").start()
    proxy: TamperingProxy | None = None
    try:
        wait_for(lambda: relay.health()["acceptedCommit"] == first, 30, what="relay-a at the first commit")
        second_files = {"jobs/install-tool-2.yaml": None,
                        "jobs/install-tool-1.yaml": job("install-tool-1", "tool", "relay-a"),
                        "artifacts/other/install.sh": install_script("other"),
                        "packages/other-1.0.yaml": package("other"),
                        "jobs/install-other.yaml": job("install-other", "other", "relay-a")}
        signed: dict[str, str] = {}

        seen: list[list[str]] = []  # the jobs of each reply with actions, as the relay sent them

        def downgrade(client: str, reply: Reply) -> Reply:
            seen.append([a["job"] for a in reply["actions"]])
            action = action_for(reply, "install-other")
            if action is None:
                return reply
            pkg = parse_document("packages/tool-1.0.yaml", signed["packages/tool-1.0.yaml"].encode())
            assert isinstance(pkg, Package)
            digest = parse_manifest(reply["manifest"]["payload"]).artifacts["packages/tool-1.0.yaml"]
            action.update({"job": "install-tool-1", "action": "upgrade", "package": {"name": "tool", "version": "1.0"},
                           "previousVersion": "2.0", "installer": installer_json(pkg), "artifact": digest.to_json(),
                           "documents": {"job": "jobs/install-tool-1.yaml", "package": "packages/tool-1.0.yaml"}})
            reply["documents"].update(signed)
            return reply

        proxy = TamperingProxy(relay.url, downgrade)
        root = tmp_path / "clients" / "pc-down"
        agent = Agent("pc-down", proxy.url, root, enroll_secret=relay.enroll_secret, insecure_http=True,
                      trust_keys=origin.trust_keys())
        assert agent.run_once() == 0
        wait_for(lambda: origin.job_rows("relay-a", "install-tool-2").get("pc-down", {}).get("state") == "Succeeded",
                 30, what="tool 2.0 installed")
        assert json.loads((root / "receipts" / "tool.json").read_text())["version"] == "2.0"
        assert (root / "ran-tool2").exists() and proxy.tampered == []

        second = origin.commit(second_files, "tool 1.0 again, and other")
        assert origin.accept(hq) == second
        for path in ("jobs/install-tool-1.yaml", "packages/tool-1.0.yaml"):
            data = origin.read(second, path)
            assert data is not None
            signed[path] = data.decode()
        wait_for(lambda: relay.health()["acceptedCommit"] == second, 30, what="relay-a at the second commit")

        def refused() -> dict[str, Any] | None:
            assert agent.run_once() == 0
            row = origin.job_rows("relay-a", "install-other").get("pc-down", {})
            return row if row.get("state") == "Failed" else None

        row = wait_for(refused, 30, interval=0.2, what="install-other refused")
        assert row["reason"] == "securityError", row
        assert "job install-tool-1 does not allow downgrades: tool 2.0 is installed, the action (upgrade) " \
               "installs 1.0" in row["message"], row
        assert [outcome for _, outcome in relay_operations(relay, "pc-down", "install-other")] == ["refused"]
        # HQ's own plan for that job on this client: nothing to do, a newer version is there.
        skipped = origin.job_rows("relay-a", "install-tool-1").get("pc-down", {})
        assert (skipped.get("state"), skipped.get("reason")) == ("Skipped", "newerPresent"), skipped
        assert json.loads((root / "receipts" / "tool.json").read_text())["version"] == "2.0"
        assert [p.name for p in (root / "packages" / "tool").iterdir()] == ["2.0"]
        assert not (root / "ran-tool").exists() and not (root / "ran-other").exists()
        # Signed, destined to this client and complete: only the version installed here refuses it.
        fresh = Verifier(origin.trust_keys(), tmp_path / "fresh", "pc-down")
        assert fresh.refusals(proxy.tampered[0][1], proxy.url, {}) == {}
        assert fresh.refusals(proxy.tampered[0][1], proxy.url, {"tool": "2.0"}) != {}

        # HQ removes 2.0 (an uninstall job naming it): the relay sends the removal and the install of 1.0
        # that waits for it in one reply, and the agent runs both: the install starts from nothing.
        third = origin.commit({"jobs/uninstall-tool.yaml": UNINSTALL_TOOL_2}, "remove tool 2.0")
        assert origin.accept(hq) == third
        wait_for(lambda: relay.health()["acceptedCommit"] == third, 30, what="relay-a at the third commit")

        def installed_old() -> dict[str, Any] | None:
            assert agent.run_once() == 0
            row = origin.job_rows("relay-a", "install-tool-1").get("pc-down", {})
            return row if row.get("state") == "Succeeded" else None

        wait_for(installed_old, 30, interval=0.2, what="tool 1.0 installed after the removal")
        assert ["uninstall-tool", "install-tool-1"] in seen, seen
        assert json.loads((root / "receipts" / "tool.json").read_text())["version"] == "1.0"
        assert (root / "ran-tool").exists() and len(proxy.tampered) == 1
        assert [r["status"] for r in proxy.results if r["status"] == "refused"] == ["refused"]
    finally:
        if proxy is not None:
            proxy.close()
        relay.stop()
