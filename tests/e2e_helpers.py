"""Shared helpers for relay tests: a real bare origin, HQ and relay processes, waiting with deadlines.

Everything runs for real on 127.0.0.1 with ephemeral ports: a bare git origin
built with git subprocesses, ``reconciler hq --once`` after each commit,
``reconciler relay`` subprocesses that write the address they bound to
``<workdir>/listen.url``. Waiting is always on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The secrets test relays run with unless a test gives its own (README, "Enrolment").
ENROLL_SECRET = "test-enrolment-secret-0123456789"
CHILD_SECRET = "test-child-relay-secret-0123456789"


def signing_keys(directory: Path) -> tuple[Path, Path]:
    """HQ's manifest signing key and its public half under ``directory`` (made on first use): (private, public)."""
    from reconciler.signing import write_key_pair

    private = directory / "hq-signing.key"
    public = directory / "hq-signing.pub"
    if not private.is_file():
        write_key_pair(private)
    return private, public


def admin_signing(directory: Path, work: Path) -> Path:
    """Make ``work`` sign every commit with an SSH key made here; the allowed-signers file listing it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "admin-ssh"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@example.invalid", "-f", str(key)],
                       check=True, capture_output=True)
    allowed = directory / "allowed_signers"
    allowed.write_text(f"test@example.invalid {(directory / 'admin-ssh.pub').read_text().strip()}\n")
    for name, value in (("gpg.format", "ssh"), ("user.signingkey", str(key)), ("commit.gpgsign", "true")):
        git(work, "config", name, value)
    return allowed


def trust_keys(directory: Path) -> list[Any]:
    """The public keys an in-process Agent trusts (``trust_keys=``) for HQ's key under ``directory``."""
    from reconciler.signing import read_public_key

    return [read_public_key(signing_keys(directory)[1])]


def secret_file(path: Path, secret: str) -> Path:
    """Write ``secret`` to ``path`` (mode 0600) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ waiting


def wait_for(condition: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = condition()
        except Exception as e:  # noqa: BLE001 - keep polling through transient errors
            last = e
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# ------------------------------------------------------------------ processes


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("GIT_AUTHOR_NAME", "test")
    out.setdefault("GIT_AUTHOR_EMAIL", "test@example.invalid")
    out.setdefault("GIT_COMMITTER_NAME", "test")
    out.setdefault("GIT_COMMITTER_EMAIL", "test@example.invalid")
    out.update(extra)
    return out


def reconciler(*args: str, timeout: float = 60.0, check: bool = True,
               extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**(extra_env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"reconciler {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env(), timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout.strip()


class Origin:
    """A bare origin and a working clone to commit specs from."""

    def __init__(self, base: Path) -> None:
        self.path = base / "origin.git"
        self.work = base / "work"
        subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(self.path)], check=True,
                       env=env())
        subprocess.run(["git", "init", "-q", "--initial-branch=main", str(self.work)], check=True, env=env())
        git(self.work, "remote", "add", "origin", str(self.path))
        # The admin signs every commit; HQ accepts only commits signed by an allowed key (README, "Signed commits").
        self.allowed_signers = admin_signing(base / "keys", self.work)

    @property
    def url(self) -> str:
        return str(self.path)

    @property
    def signing_key(self) -> Path:
        """HQ's manifest signing key for this origin (``hq --signing-key``)."""
        return signing_keys(self.path.parent / "keys")[0]

    @property
    def trust_key(self) -> Path:
        """Its public half (``agent --trust-key``)."""
        return signing_keys(self.path.parent / "keys")[1]

    def trust_keys(self) -> list[Any]:
        return trust_keys(self.path.parent / "keys")

    def hq_trust_args(self) -> list[str]:
        """HQ's half of the chain of trust: the commit signature gate and the manifest signing key."""
        return ["--allowed-signers", str(self.allowed_signers), "--signing-key", str(self.signing_key)]

    def write(self, files: Mapping[str, str | bytes | None]) -> None:
        """Write (or with None, delete) files in the working clone."""
        for rel, content in files.items():
            target = self.work / rel
            if content is None:
                if target.is_dir() and not target.is_symlink():
                    import shutil
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(textwrap.dedent(content).lstrip(), encoding="utf-8")
            if rel.endswith(".sh"):
                target.chmod(0o755)

    def commit(self, files: Mapping[str, str | bytes | None], message: str = "specs") -> str:
        self.write(files)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD")

    def read(self, ref: str, path: str) -> bytes | None:
        proc = subprocess.run(["git", f"--git-dir={self.path}", "show", f"{ref}:{path}"], capture_output=True,
                              env=env())
        return proc.stdout if proc.returncode == 0 else None

    def ref(self, ref: str) -> str | None:
        proc = subprocess.run(["git", f"--git-dir={self.path}", "rev-parse", "--verify", "--quiet",
                               f"refs/heads/{ref}"], capture_output=True, text=True, env=env())
        return proc.stdout.strip() if proc.returncode == 0 else None

    def accept(self, hq_workdir: Path) -> str:
        """Run ``reconciler hq --once`` and return the accepted commit."""
        reconciler("hq", "--origin", self.url, "--workdir", str(hq_workdir), *self.hq_trust_args(), "--once",
                   timeout=120)
        data = self.read("status/hq", "accepted.yaml")
        assert data is not None, "hq published no accepted.yaml"
        accepted = yaml.safe_load(data)["acceptedCommit"]
        assert accepted, f"hq accepted nothing: {data.decode()}"
        return str(accepted)

    def relay_file(self, relay: str, name: str) -> Any:
        data = self.read(f"status/{relay}", f"relays/{relay}/{name}")
        if data is None:
            return None
        return json.loads(data) if name.endswith(".json") else yaml.safe_load(data)

    def job_rows(self, relay: str, job: str) -> dict[str, dict[str, Any]]:
        doc = self.relay_file(relay, f"jobs/{job}.yaml")
        return {} if doc is None else {row["client"]: row for row in doc.get("rows", [])}


class _Service:
    """A reconciler service subprocess logging to ``log``: its output, and a stop that insists on SIGTERM."""

    name: str
    proc: subprocess.Popen[str] | None
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.output()}") from None


class RelayProcess(_Service):
    """``reconciler relay`` as a subprocess; ``url`` once it has bound its port."""

    def __init__(self, name: str, origin: str, workdir: Path, *, parent_url: str | None = None,
                 poll_interval: float = 30.0, publish_interval: float = 0.5, poll_seconds: float = 1.0,
                 listen: str = "127.0.0.1:0", extra_env: Mapping[str, str] | None = None,
                 extra_args: Iterable[str] = (), insecure_http: bool = True) -> None:
        self.name = name
        self.insecure_http = insecure_http
        self.extra_args = list(extra_args)
        self.listen = listen
        self.origin = origin
        self.workdir = workdir
        self.parent_url = parent_url
        self.poll_interval = poll_interval
        self.publish_interval = publish_interval
        self.extra_env = {"RECONCILER_POLL_SECONDS": str(poll_seconds), **(extra_env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log = workdir.parent / f"{workdir.name}.log"
        # Enrolled by default: agents of the tests present ``enroll_secret`` (None with --open-enrollment
        # or a test's own --enroll-secret-file); child relays present CHILD_SECRET to their parent.
        given = set(self.extra_args)
        self.enroll_secret: str | None = None
        self.enroll_secret_file: Path | None = None  # for agents run as subprocesses
        if not given & {"--open-enrollment", "--enroll-secret-file"}:
            self.enroll_secret = ENROLL_SECRET
            self.enroll_secret_file = secret_file(workdir.parent / f"{workdir.name}.enroll-secret", ENROLL_SECRET)
            self.extra_args += ["--enroll-secret-file", str(self.enroll_secret_file)]
        if "--inventory-interval" not in given:  # the tests read per-client detail at once
            self.extra_args += ["--inventory-interval", "0"]
        if "--child-secret-file" not in given:
            path = secret_file(workdir.parent / f"{workdir.name}.child-secret", CHILD_SECRET)
            self.extra_args += ["--child-secret-file", str(path)]
        if parent_url and "--parent-secret-file" not in given:
            path = secret_file(workdir.parent / f"{workdir.name}.parent-secret", CHILD_SECRET)
            self.extra_args += ["--parent-secret-file", str(path)]

    def start(self, timeout: float = 30.0) -> RelayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        listen_file = self.workdir / "listen.url"
        listen_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "reconciler", "relay", "--name", self.name, "--origin", self.origin,
                "--workdir", str(self.workdir), "--listen", self.listen,
                *(["--insecure-http"] if self.insecure_http else []), "--poll-interval", str(self.poll_interval), "--publish-interval", str(self.publish_interval)]
        if self.parent_url:
            args += ["--parent-url", self.parent_url]
        args += self.extra_args
        handle = open(self.log, "a", encoding="utf-8")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                     env=env(**self.extra_env))
        handle.close()

        def bound() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"relay {self.name} exited {self.proc.returncode}:\n{self.output()}")
            return listen_file.read_text().strip() if listen_file.is_file() else None

        deadline = time.monotonic() + timeout
        while True:
            try:
                url = bound()
            except AssertionError:
                raise
            if url:
                self.url = url
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"relay {self.name} did not bind within {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def health(self) -> dict[str, Any]:
        response = requests.get(f"{self.url}/healthz", timeout=5)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


class HqProcess(_Service):
    """``reconciler hq`` as a long-running subprocess listening on 127.0.0.1; ``url`` once it has bound."""

    def __init__(self, origin: str, workdir: Path, *args: str) -> None:
        self.name = "hq"
        self.origin = origin
        self.workdir = workdir
        self.args = list(args)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log = workdir.parent / f"{workdir.name}.log"

    def start(self, timeout: float = 30.0) -> HqProcess:
        listen_file = self.workdir / "listen.url"
        listen_file.unlink(missing_ok=True)
        handle = open(self.log, "a", encoding="utf-8")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler", "hq", "--origin", self.origin,
                                      "--workdir", str(self.workdir), "--listen", "127.0.0.1:0",
                                      *([] if "--tls-cert" in self.args else ["--insecure-http"]), *self.args],
                                     stdout=handle, stderr=subprocess.STDOUT, text=True, env=env())
        handle.close()

        def bound() -> str | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hq exited {self.proc.returncode}:\n{self.output()}")
            return listen_file.read_text().strip() if listen_file.is_file() else None

        deadline = time.monotonic() + timeout
        while not (url := bound()):
            if time.monotonic() > deadline:
                raise AssertionError(f"hq did not bind within {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        self.url = url
        return self

    def relays(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/relays``, by relay name."""
        response = requests.get(f"{self.url}/v1/relays", timeout=5)
        response.raise_for_status()
        return {r["relay"]: r for r in response.json()["relays"]}


class FileServer:
    """A tiny HTTP server on 127.0.0.1 serving fixed bytes per path and counting hits."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                data = outer.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------ malformed requests


def _raw_body(good: Mapping[str, Any], section: str, key: str, escaped: str) -> bytes:
    """``good`` with ``section.key`` set to the JSON string escape ``escaped`` (a lone surrogate, say)."""
    doc = json.loads(json.dumps(good))
    doc[section][key] = "@@"
    return json.dumps(doc).replace('"@@"', f'"{escaped}"').encode()


def malformed_requests(client_id: str) -> list[tuple[str, str, str, dict[str, str], bytes, int | None]]:
    """(label, method, path, headers, body, expected status or None for any 4xx).

    Every entry is client input the relay must refuse with a 4xx JSON error,
    never a 500 or a traceback. None of them may register ``client_id``.
    """
    path = f"/v1/clients/{client_id}/checkin"
    good = {"facts": {"os": "linux", "arch": "x86_64", "hostname": "h", "freeDiskMB": 10},
            "labels": {}, "inventory": [], "results": []}
    ok_result = {"operationId": "op-1", "status": "succeeded", "exitCode": 0, "message": "", "finishedAt":
                 "2026-11-23T10:00:00Z"}
    js = {"Content-Type": "application/json"}

    def body(**changes: Any) -> bytes:
        doc = json.loads(json.dumps(good))
        for key, value in changes.items():
            doc[key] = value
        return json.dumps(doc).encode()

    def without(key: str) -> bytes:
        doc = dict(good)
        del doc[key]
        return json.dumps(doc).encode()

    def result(**changes: Any) -> bytes:
        r = dict(ok_result)
        for key, value in changes.items():
            if value is ...:
                del r[key]
            else:
                r[key] = value
        return body(results=[r])

    post = "POST"
    cases: list[tuple[str, str, str, dict[str, str], bytes, int | None]] = [
        ("truncated JSON", post, path, js, b'{"facts": {', 400),
        ("not JSON at all", post, path, js, b"hello", 400),
        ("JSON array body", post, path, js, b"[]", 400),
        ("JSON string body", post, path, js, b'"x"', 400),
        ("JSON null body", post, path, js, b"null", 400),
        ("empty body", post, path, js, b"", 400),
        ("unknown top-level field", post, path, js, body(extra=1), 400),
        ("lastRelay not a relay name", post, path, js, body(lastRelay="../relay-a"), 400),
        ("lastRelay a number", post, path, js, body(lastRelay=7), 400),
        ("missing facts", post, path, js, without("facts"), 400),
        ("missing inventory", post, path, js, without("inventory"), 400),
        ("facts not an object", post, path, js, body(facts=[1]), 400),
        ("unknown fact", post, path, js, body(facts={"cpu": "fast"}), 400),
        ("bad os", post, path, js, body(facts={"os": "beos"}), 400),
        ("bad arch", post, path, js, body(facts={"arch": "m68k"}), 400),
        ("freeDiskMB a string", post, path, js, body(facts={"freeDiskMB": "10"}), 400),
        ("freeDiskMB negative", post, path, js, body(facts={"freeDiskMB": -1}), 400),
        ("freeDiskMB a bool", post, path, js, body(facts={"freeDiskMB": True}), 400),
        ("freeDiskMB a float", post, path, js, body(facts={"freeDiskMB": 1.5}), 400),
        ("hostname a number", post, path, js, body(facts={"hostname": 7}), 400),
        ("labels a list", post, path, js, body(labels=["a"]), 400),
        ("label value a number", post, path, js, body(labels={"dept": 3}), 400),
        ("inventory an object", post, path, js, body(inventory={"app": "1"}), 400),
        ("inventory entry a string", post, path, js, body(inventory=["app"]), 400),
        ("inventory entry extra field", post, path, js,
         body(inventory=[{"name": "app", "version": "1", "x": 1}]), 400),
        ("inventory bad name", post, path, js, body(inventory=[{"name": "../etc", "version": "1"}]), 400),
        ("inventory version a number", post, path, js, body(inventory=[{"name": "app", "version": 1.0}]), 400),
        ("inventory duplicate name", post, path, js,
         body(inventory=[{"name": "app", "version": "1"}, {"name": "app", "version": "2"}]), 400),
        ("results an object", post, path, js, body(results={}), 400),
        ("result without operationId", post, path, js, result(operationId=...), 400),
        ("result bad operationId", post, path, js, result(operationId="../x y"), 400),
        ("result bad status", post, path, js, result(status="done"), 400),
        ("result unknown field", post, path, js, result(stdout="x"), 400),
        ("result exitCode a string", post, path, js, result(exitCode="0"), 400),
        ("result message a number", post, path, js, result(message=5), 400),
        ("result finishedAt garbage", post, path, js, result(finishedAt="yesterday"), 400),
        ("wrong Content-Type", post, path, {"Content-Type": "text/plain"}, body(), 415),
        ("no Content-Type", post, path, {}, body(), 415),
        ("body over 1 MiB", post, path, js, b'{"facts": {}, "inventory": [], "labels": {"a": "'
         + b"x" * (1024 * 1024) + b'"}}', 413),
        ("not UTF-8", post, path, js, b'{"facts": {"hostname": "\xff\xfe"}, "inventory": []}', 400),
        ("duplicate JSON key", post, path, js, b'{"facts": {}, "facts": {}, "inventory": []}', 400),
        ("NaN in JSON", post, path, js, b'{"facts": {"freeDiskMB": NaN}, "inventory": []}', 400),
        ("nested too deeply", post, path, js, b"[" * 100_000 + b"]" * 100_000, 400),
        ("huge integer", post, path, js, b'{"facts": {"freeDiskMB": ' + b"9" * 5000 + b'}, "inventory": []}',
         400),
        ("malformed Authorization", post, path, {**js, "Authorization": "Basic dXNlcjpwdw=="}, body(), 401),
        ("Authorization bearer garbage", post, path, {**js, "Authorization": "Bearer a b c"}, body(), 401),
        ("uppercase client id", post, "/v1/clients/PC-1/checkin", js, body(), 400),
        ("client id too long", post, f"/v1/clients/{'a' * 64}/checkin", js, body(), 400),
        ("client id with dots only edge", post, "/v1/clients/-pc/checkin", js, body(), 400),
        ("client id with a trailing newline", post, f"/v1/clients/{client_id}%0A/checkin", js, body(), 400),
        ("client id with a trailing CR LF", post, f"/v1/clients/{client_id}%0D%0A/checkin", js, body(), 400),
        ("check-in path with a trailing newline", post, f"{path}%0A", js, body(), 404),
        ("lone surrogate in hostname", post, path, js, _raw_body(good, "facts", "hostname", "\\ud800"), 400),
        ("lone surrogate in a label value", post, path, js, _raw_body(good, "labels", "dept", "\\udfff"), 400),
        ("lone surrogate in a label key", post, path, js,
         json.dumps(good).replace('"labels": {}', '"labels": {"\\ud800": "x"}').encode(), 400),
        ("lone surrogate in a result message", post, path, js,
         body(results=[ok_result]).replace(b'"message": ""', b'"message": "ok \\udc80"'), 400),
        ("empty client id", post, "/v1/clients//checkin", js, body(), 400),
        ("GET on check-in", "GET", path, {}, b"", 405),
        ("PUT on check-in", "PUT", path, js, body(), 405),
        ("unknown endpoint", "GET", "/v1/nothing", {}, b"", 404),
        ("path traversal", "GET", "/v1/artifacts/../../relay.sqlite3", {}, b"", None),
        # 401 without a credential, 400 and 404 with one (tests/test_enrollment.py tells them apart)
        ("artifact id not a hash", "GET", "/v1/artifacts/not-a-hash", {}, b"", None),
        ("unknown artifact", "GET", "/v1/artifacts/" + "0" * 64, {}, b"", None),
        ("POST on artifact", post, "/v1/artifacts/" + "0" * 64, js, b"{}", 405),
        ("DELETE on healthz", "DELETE", "/healthz", {}, b"", 405),
        ("GET on git hook", "GET", "/v1/hooks/git", {}, b"", 405),
    ]
    return cases


def send_raw(url: str, method: str, path: str, headers: Mapping[str, str], body: bytes,
             session: requests.Session | None = None) -> requests.Response:
    http = session or requests
    request_headers = {"Accept": "application/json", **headers}  # requests adds no Content-Type for bytes
    return http.request(method, url + path, headers=request_headers, data=body if body else None,
                        timeout=30)


def assert_json_error(response: requests.Response, expected: int | None, label: str) -> None:
    code = response.status_code
    if expected is None:
        assert 400 <= code < 500, f"{label}: expected a 4xx, got {code}: {response.text[:300]}"
    else:
        assert code == expected, f"{label}: expected {expected}, got {code}: {response.text[:300]}"
    assert response.headers.get("Content-Type", "").startswith("application/json"), \
        f"{label}: error is not JSON ({response.headers.get('Content-Type')}): {response.text[:300]}"
    doc = response.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], f"{label}: {doc!r}"
    assert "Traceback" not in response.text, f"{label}: traceback leaked"


def checkin_body(inventory: Iterable[Mapping[str, str]] = (), results: Iterable[Mapping[str, Any]] = (),
                 **facts: Any) -> dict[str, Any]:
    base = {"os": "linux", "arch": "x86_64", "hostname": "test", "freeDiskMB": 100_000}
    base.update(facts)
    return {"facts": base, "labels": {}, "inventory": list(inventory), "results": list(results)}
