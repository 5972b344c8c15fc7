"""The relay's client API: a WSGI app (served by waitress) speaking docs/PROTOCOL.md.

A check-in is the hot path, and it touches only the calling client's rows:
authenticate, record its facts, labels, inventory and results, plan that one
client against the relay's in-memory :class:`~reconciler.plan.RelayIndex`
and the rollout usage counted on the other clients' row states (one indexed
query, in the same transaction), record the operations handed out, commit,
reply. Nothing in it scans all clients; the loop's full pass does that, off
the request path.

Two rules shape the code:

* **Client input never causes a 5xx or a traceback.** Every request is
  validated against the protocol before anything is written (unknown and
  mistyped fields, bad ids, bodies over 1 MiB, wrong Content-Type, malformed
  JSON); any refusal is a 4xx with ``{"error": "..."}``. A 500 means a relay
  bug, is logged with its traceback, and still answers in JSON.
* **Registration is trust on first use, confirmed by use.** The first check-in
  of an unknown id registers it and the reply carries its token. Once the
  client has checked in with that token, a check-in without it is 401 and one
  with another token 403. Until then a token-less check-in gets a fresh token
  (the old one stops working): otherwise a reply lost after the relay
  committed the registration (a relay killed at that instant, a dropped
  connection) would lock the client out for good.
* **A reply acknowledges only what is committed.** The results it accepts and
  the operations it hands out are in SQLite (one transaction, committed)
  before the first byte of the reply is written, so a relay killed at any
  moment never forgets an operation a client may be running.

``pollSeconds`` is 30 unless the environment sets ``RECONCILER_POLL_SECONDS``
(tests and the demo use a second or two).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from reconciler import names, protocol
from reconciler.plan import (
    Action,
    ActionKind,
    Attempt,
    Client,
    Installed,
    Outcome,
    plan_client,
)
from reconciler.relay.state import (
    DEFAULT_POLL_SECONDS,
    Generation,
    RelayState,
    StagedArtifact,
)
from reconciler.relay.store import token_matches
from reconciler.times import utc_now
from reconciler.webhook import read_secret_file, verify_signature

log = logging.getLogger("reconciler.relay")

MAX_BODY = protocol.MAX_BODY
POLL_SECONDS_ENV = "RECONCILER_POLL_SECONDS"
WEBHOOK_SECRET_ENV = "RECONCILER_WEBHOOK_SECRET_FILE"

RANGE = re.compile(r"bytes=([0-9]{1,18})-([0-9]{0,18})")
CHECKIN_PATH = re.compile(r"/v1/clients/([^/]*)/checkin")
ARTIFACT_PATH = re.compile(r"/v1/artifacts/([^/]*)")

MAX_INVENTORY = protocol.MAX_INVENTORY
MAX_RESULTS = protocol.MAX_RESULTS
MAX_MESSAGE = protocol.MAX_MESSAGE
CHUNK = 256 * 1024


def poll_seconds_from_env(default: float = DEFAULT_POLL_SECONDS) -> float:
    """``RECONCILER_POLL_SECONDS`` if it is a positive number, else ``default``."""
    raw = os.environ.get(POLL_SECONDS_ENV)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number", POLL_SECONDS_ENV, raw)
        return default
    return value if value > 0 else default


# ------------------------------------------------------------------ validation


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _bad(message: str) -> HttpError:
    return HttpError(400, message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body: UTF-8, no duplicate keys, no NaN, and only valid Unicode text."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _bad("request body is not UTF-8") from None
    except RecursionError:
        raise _bad("request body is nested too deeply") from None
    except ValueError as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    where = _invalid_text(value)
    if where is not None:
        raise _bad(f"{where}: text is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text")
    return value


def _invalid_text(value: Any) -> str | None:
    """Where the first string (key or value) holding a lone surrogate is, or None.

    JSON's ``\\ud800`` escapes decode to such strings; they cannot be stored,
    logged or published as UTF-8, so they are refused at the door.
    """
    pending: list[tuple[str, Any]] = [("body", value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _is_unicode(key):
                    return f"{where}: a key"
                pending.append((f"{where}.{key}" if where != "body" else key, child))
        elif isinstance(item, list):
            pending.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _bad(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


@dataclass(frozen=True)
class CheckinRequest:
    facts: dict[str, Any]
    labels: dict[str, str]
    inventory: tuple[Installed, ...]
    results: tuple[dict[str, Any], ...]


def parse_checkin(doc: Any) -> CheckinRequest:
    """Validate a check-in body per docs/PROTOCOL.md; HttpError(400) naming the first problem."""
    if not isinstance(doc, dict):
        raise _bad("check-in body must be a JSON object")
    _check_keys(doc, ("facts", "labels", "inventory", "results"), "body")
    for required in ("facts", "inventory"):
        if required not in doc:
            raise _bad(f"body: missing field {required!r}")

    facts = doc["facts"]
    if not isinstance(facts, dict):
        raise _bad("facts: must be an object")
    _check_keys(facts, protocol.FACT_KEYS, "facts")
    for key in protocol.FACT_KEYS:
        problem = protocol.fact_problem(key, facts[key]) if key in facts else None
        if problem is not None:
            raise _bad(f"facts.{key}: {problem}")

    labels = doc.get("labels", {})
    if not isinstance(labels, dict):
        raise _bad("labels: must be an object of strings")
    if len(labels) > protocol.MAX_LABELS:
        raise _bad(f"labels: at most {protocol.MAX_LABELS} labels")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise _bad(f"labels.{key[:128]}: must be a string")
        problem = protocol.label_problem(key, value)
        if problem is not None:
            raise _bad(f"labels: {problem}")

    inventory = doc["inventory"]
    if not isinstance(inventory, list):
        raise _bad("inventory: must be a list")
    if len(inventory) > MAX_INVENTORY:
        raise _bad(f"inventory: at most {MAX_INVENTORY} entries")
    installed: dict[str, Installed] = {}
    for i, entry in enumerate(inventory):
        where = f"inventory[{i}]"
        if not isinstance(entry, dict):
            raise _bad(f"{where}: must be an object with name and version")
        _check_keys(entry, ("name", "version"), where)
        name, version = entry.get("name"), entry.get("version")
        if not names.is_name(name):
            raise _bad(f"{where}.name: must be a package name")
        if not names.is_version(version):
            raise _bad(f"{where}.version: must be a version string")
        if name in installed:
            raise _bad(f"{where}: package {name!r} listed twice (one entry per package name)")
        installed[name] = Installed(name, version)

    results = doc.get("results", [])
    if not isinstance(results, list):
        raise _bad("results: must be a list")
    if len(results) > MAX_RESULTS:
        raise _bad(f"results: at most {MAX_RESULTS} per check-in")
    checked: list[dict[str, Any]] = []
    for i, result in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(result, dict):
            raise _bad(f"{where}: must be an object")
        _check_keys(result, ("operationId", "status", "exitCode", "message", "finishedAt"), where)
        op = result.get("operationId")
        if not names.is_operation_id(op):
            raise _bad(f"{where}.operationId: must be an operation id")
        if result.get("status") not in ("succeeded", "failed"):
            raise _bad(f"{where}.status: must be 'succeeded' or 'failed'")
        code = result.get("exitCode")
        if code is not None and (not _is_int(code) or not -2**31 <= code < 2**32):
            raise _bad(f"{where}.exitCode: must be an integer or null")
        message = result.get("message", "")
        if message is None:
            message = ""
        if not isinstance(message, str) or len(message) > MAX_MESSAGE:
            raise _bad(f"{where}.message: must be a string of at most {MAX_MESSAGE} characters")
        finished_at = result.get("finishedAt")
        if finished_at is not None and not _valid_time(finished_at):
            raise _bad(f"{where}.finishedAt: must be an RFC 3339 time")
        checked.append({"operationId": op, "status": result["status"], "exitCode": code, "message": message})
    return CheckinRequest(dict(facts), dict(labels), tuple(sorted(installed.values(), key=lambda i: i.name)),
                          tuple(checked))


def _valid_time(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _unauthorized(client_id: str) -> HttpError:
    return HttpError(401, f"client {client_id} is registered: send its token (Authorization: Bearer <token>)",
                     [("WWW-Authenticate", 'Bearer realm="reconciler"')])


def _bearer(environ: Mapping[str, Any]) -> str | None:
    header = environ.get("HTTP_AUTHORIZATION")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not names.is_token(token.strip()):
        raise HttpError(401, "malformed Authorization header: expected 'Bearer <token>'",
                        [("WWW-Authenticate", 'Bearer realm="reconciler"')])
    return str(token).strip()


# ------------------------------------------------------------------ the app


def action_json(action: Action, artifact: StagedArtifact | None) -> dict[str, Any]:
    package = action.package
    installer: dict[str, Any] | None = None
    if package is not None:
        spec = package.installer
        installer = {"type": spec.type.value, "install": list(spec.install), "uninstall": list(spec.uninstall),
                     "detect": list(spec.detect), "timeoutSeconds": spec.timeout_seconds}
    reply: dict[str, Any] = {
        "operationId": action.operation_id,
        "job": action.job,
        "action": action.kind.value,
        "package": {"name": action.name, "version": action.version},
        "previousVersion": action.previous_version,
        "artifact": None if artifact is None else artifact.to_json(),
        "installer": installer,
    }
    if package is not None and action.kind is not ActionKind.UNINSTALL and package.depends_on:
        # The agent runs the action only when these are installed (the plan never
        # sends a dependent before that, but an agent does not take a relay's word).
        reply["dependsOn"] = [{"name": d.name, **({"minVersion": d.min_version} if d.min_version else {})}
                              for d in package.depends_on]
    return reply


_STATUS_TEXT = {200: "200 OK", 202: "202 Accepted", 206: "206 Partial Content", 400: "400 Bad Request",
                401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
                405: "405 Method Not Allowed", 409: "409 Conflict", 411: "411 Length Required",
                413: "413 Content Too Large", 415: "415 Unsupported Media Type",
                416: "416 Range Not Satisfiable", 500: "500 Internal Server Error",
                503: "503 Service Unavailable"}


class RelayApp:
    """The WSGI application. ``cache_dir`` is the content-addressed ``cache/sha256`` directory."""

    def __init__(self, state: RelayState, cache_dir: Path, *, webhook_secret: bytes | None = None,
                 now: Callable[[], datetime] = utc_now) -> None:
        self.state = state
        self.store = state.store
        self.cache_dir = Path(cache_dir)
        self.webhook_secret = webhook_secret
        self.now = now

    # -- plumbing ------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return self._route(environ, start_response)
        except HttpError as e:
            return self._json(start_response, e.status, {"error": e.message}, e.headers)
        except Exception:
            log.exception("relay error handling %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return self._json(start_response, 500, {"error": "internal relay error (logged on the relay)"})

    def _json(self, start_response: Callable[..., Any], status: int, value: Any,
              headers: Sequence[tuple[str, str]] = ()) -> list[bytes]:
        body = json.dumps(value, separators=(",", ":")).encode("utf-8")
        start_response(_STATUS_TEXT.get(status, f"{status} Error"), [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), *headers])
        return [body]

    def _route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        match = CHECKIN_PATH.fullmatch(path)
        if match:
            self._allow(method, ("POST",))
            return self._json(start_response, 200, self.checkin(match.group(1), environ))
        match = ARTIFACT_PATH.fullmatch(path)
        if match:
            self._allow(method, ("GET", "HEAD"))
            return self.artifact(match.group(1), environ, start_response)
        if path == "/healthz":
            self._allow(method, ("GET", "HEAD"))
            generation = self.state.generation
            return self._json(start_response, 200, {
                "ok": True, "relay": self.state.name, "acceptedCommit": generation.commit,
                "clients": self.state.client_count, "errors": list(self.state.errors)})
        if path == "/v1/hooks/git":
            self._allow(method, ("POST",))
            self.git_hook(environ)
            return self._json(start_response, 202, {"ok": True})
        raise HttpError(404, f"no such endpoint: {path[:200]}")

    @staticmethod
    def _allow(method: str, allowed: Sequence[str]) -> None:
        if method not in allowed:
            raise HttpError(405, f"method {method[:20]} not allowed here (use {', '.join(allowed)})",
                            [("Allow", ", ".join(allowed))])

    @staticmethod
    def _body(environ: Mapping[str, Any], *, json_required: bool) -> bytes:
        if json_required:
            ctype = environ.get("CONTENT_TYPE", "")
            if ctype.split(";", 1)[0].strip().lower() != "application/json":
                raise HttpError(415, "Content-Type must be application/json")
        raw_length = environ.get("CONTENT_LENGTH") or ""
        if raw_length:
            if not (raw_length.isascii() and raw_length.isdigit()):
                raise _bad("invalid Content-Length")
            length = int(raw_length)
            if length > MAX_BODY:
                raise HttpError(413, f"request body is larger than {MAX_BODY} bytes")
        else:
            length = MAX_BODY + 1
        body: bytes = environ["wsgi.input"].read(length)
        if len(body) > MAX_BODY:
            raise HttpError(413, f"request body is larger than {MAX_BODY} bytes")
        return body

    # -- check-in ------------------------------------------------------------

    def checkin(self, client_id: str, environ: Mapping[str, Any]) -> dict[str, Any]:
        if not names.is_client_id(client_id):
            raise _bad("invalid client id: use 1-63 lowercase letters, digits, '.' and '-'")
        token = _bearer(environ)
        request = parse_checkin(parse_json(self._body(environ, json_required=True)))
        # Authenticate before taking the write lock: a refused client costs one indexed read.
        credentials = self.store.credentials(client_id)
        reissue = confirm = False
        if credentials is not None:
            known_hash, confirmed = credentials
            if token is None:
                if confirmed:
                    raise _unauthorized(client_id)
                reissue = True  # the reply that carried its token may have been lost
            elif not token_matches(token, known_hash):
                raise HttpError(403, f"this token does not belong to client {client_id}")
            else:
                confirm = not confirmed
        now = self.now()
        state = self.state
        generation = state.generation
        changed = False
        new_token: str | None = None
        with self.store.write() as db:
            if credentials is None:
                # First check-in (or a relay that lost its database): trust on first use.
                new_token = self.store.register(db, client_id, now)
                if new_token is None:
                    raise HttpError(409, f"client {client_id} registered concurrently; check in again with its token")
                changed = True
            elif reissue:
                new_token = self.store.reissue(db, client_id)
                if new_token is None:
                    raise _unauthorized(client_id)
            elif confirm and not self.store.confirm(db, client_id, credentials[0]):
                raise HttpError(403, f"this token does not belong to client {client_id}")
            changed |= self.store.record_report(db, client_id, request.facts, request.labels, request.inventory, now)
            if self.store.record_results(db, client_id, request.results, now):
                changed = True
            actions: tuple[Action, ...] = ()
            if generation.index is not None:
                client = Client(
                    id=client_id, relay=state.name, os=request.facts.get("os"), arch=request.facts.get("arch"),
                    free_disk_mb=request.facts.get("freeDiskMB"),
                    labels=tuple(sorted(request.labels.items())), installed=request.inventory, online=True)
                history = self.store.history_of(client_id, db)
                index = generation.index
                # Rollout limits count the other clients' rows, in this transaction: whatever
                # another check-in started and committed before this one holds its slot.
                limited = tuple(j.name for j in (*index.relay_jobs, *index.client_jobs.get(client_id, ()))
                                if j.max_concurrent is not None or j.max_failures is not None)
                usage = self.store.usage(db, limited, client_id, state.online_since(now))
                try:
                    planned = plan_client(index, client, history, usage, now, state.memo_for(index))
                except Exception:
                    isolated = state.isolate(generation, lambda alone: plan_client(alone, client, history, {}, now))
                    if isolated is None or isolated.index is None:
                        raise
                    generation = isolated
                    planned = plan_client(isolated.index, client, history, usage, now, state.memo_for(isolated.index))
                rows, actions = planned.rows, planned.actions
                for action in actions:
                    attempt = Attempt(
                        operation_id=action.operation_id, job=action.job, client=client_id,
                        revision=action.revision, rerun=action.rerun, attempt=action.attempt, action=action.kind,
                        version=action.version, outcome=Outcome.DISPATCHED, dispatched_at=now)
                    if self.store.record_dispatch(db, attempt):
                        changed = True
                previous = self.store.row_states_of(client_id, db)
                moved = [(row.job, client_id, row.state.value, now) for row in rows
                         if previous.get(row.job) is None or previous[row.job].state != row.state.value]
                if moved:
                    self.store.set_row_states(db, moved)
                    changed = True
        # Committed: everything this reply acknowledges and hands out is on disk.
        if new_token is not None:
            log.info("client %s %s", client_id, "registered" if credentials is None else "got a new token "
                     "(its registration reply was lost)")
        if changed:
            state.on_change()
        poll = state.poll_seconds
        reply: dict[str, Any] = {
            "pollSeconds": int(poll) if float(poll).is_integer() else poll,
            "actions": [action_json(a, self._artifact_for(a, generation)) for a in actions],
        }
        if new_token is not None:
            reply["token"] = new_token
        return reply

    @staticmethod
    def _artifact_for(action: Action, generation: Generation) -> StagedArtifact | None:
        if action.kind is ActionKind.UNINSTALL or action.package is None:
            return None
        return generation.artifacts.get((action.package.name, action.package.version))

    # -- artifacts -----------------------------------------------------------

    def artifact(self, sha: str, environ: Mapping[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not names.is_sha256(sha):
            raise _bad("artifact id must be 64 lowercase hex digits (its sha256)")
        path = self.cache_dir / sha
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the file wrapper
        except FileNotFoundError:
            raise HttpError(404, f"artifact {sha} is not in this relay's cache") from None
        try:
            size = os.fstat(handle.fileno()).st_size
            start, end = 0, size - 1
            status = 200
            headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes"),
                       ("ETag", f'"{sha}"'), ("Cache-Control", "public, max-age=31536000, immutable")]
            raw_range = environ.get("HTTP_RANGE")
            if raw_range:
                match = RANGE.fullmatch(raw_range.strip())
                if not match:
                    raise HttpError(416, "only a single 'bytes=N-' or 'bytes=N-M' range is supported",
                                    [("Content-Range", f"bytes */{size}")])
                start = int(match.group(1))
                if match.group(2):
                    end = min(int(match.group(2)), size - 1)
                if start >= size or start > end:
                    raise HttpError(416, f"range starts beyond the artifact's {size} bytes",
                                    [("Content-Range", f"bytes */{size}")])
                status = 206
                headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            length = max(0, end - start + 1)
            headers.append(("Content-Length", str(length)))
            start_response(_STATUS_TEXT[status], headers)
            if environ.get("REQUEST_METHOD") == "HEAD":
                handle.close()
                return [b""]
            handle.seek(start)
            wrapper = environ.get("wsgi.file_wrapper")
            if wrapper is not None and end == size - 1:
                return wrapper(handle, CHUNK)  # type: ignore[no-any-return]
            return _read_range(handle, length)
        except BaseException:
            handle.close()
            raise

    # -- git webhook ---------------------------------------------------------

    def git_hook(self, environ: Mapping[str, Any]) -> None:
        body = self._body(environ, json_required=False)
        if self.webhook_secret is not None:
            signature = environ.get("HTTP_X_HUB_SIGNATURE_256") or ""
            if not verify_signature(self.webhook_secret, body, signature):
                raise HttpError(401, "missing or wrong X-Hub-Signature-256 (HMAC-SHA256 of the body)")
        self.state.on_git_hook()


def _read_range(handle: Any, length: int) -> Iterator[bytes]:
    try:
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        handle.close()


def load_webhook_secret() -> bytes | None:
    """The secret in the file named by ``RECONCILER_WEBHOOK_SECRET_FILE``; None leaves the hook open.

    ``reconciler relay`` has no ``--webhook-secret-file`` flag: the hook only
    wakes the loop (it fetches and decides for itself), so an open hook costs
    at most an extra fetch; set the variable to require signed hooks.
    """
    path = os.environ.get(WEBHOOK_SECRET_ENV)
    return read_secret_file(path) if path else None


# ------------------------------------------------------------------ serving


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class ServerHandle:
    """A waitress server on its own thread, with the address it actually bound."""

    def __init__(self, app: Callable[..., Iterable[bytes]], listen: str, *, threads: int = 8) -> None:
        from waitress.server import create_server  # type: ignore[import-untyped]

        host, port = parse_listen(listen)
        # Waitress warns "Task queue depth is N" for every request queued behind busy workers:
        # normal under load, and thousands of lines a second would cost more than the queueing.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self.server: Any = create_server(
            app, host=host, port=port, threads=threads, ident="reconciler-relay",
            # Bodies above 1 MiB get our own JSON 413; waitress only guards against
            # absurd uploads (it buffers a body before the app sees it).
            max_request_body_size=16 * MAX_BODY, connection_limit=2000, backlog=1024,
            channel_timeout=120, expose_tracebacks=False)
        bound_host = self.server.effective_host
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        self.url = f"http://{bound_host}:{self.server.effective_port}"
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="relay-http", daemon=True)

    def start(self) -> ServerHandle:
        self.thread.start()
        return self

    def _serve(self) -> None:
        from waitress import wasyncore  # type: ignore[import-untyped]

        server = self.server
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)
        finally:
            # Sockets are closed on the thread that polls them, never under its feet.
            logging.getLogger("waitress").setLevel(logging.CRITICAL)
            try:
                for dispatcher in list(server._map.values()):
                    dispatcher.handle_close()
                server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
            except Exception:  # noqa: BLE001 - shutting down: nothing left to protect
                log.debug("error stopping the HTTP server", exc_info=True)

    def stop(self) -> None:
        """Stop accepting, close every connection and stop the worker threads."""
        self._stopping.set()
        try:
            self.server.pull_trigger()
        except OSError:
            pass
        self.thread.join(timeout=10)
