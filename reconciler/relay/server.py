"""The relay's client API: a WSGI app (served by :mod:`reconciler.serving`, HTTPS) speaking docs/PROTOCOL.md.

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

``pollSeconds`` is 30 unless the relay's environment sets
``RECONCILER_POLL_SECONDS`` (read by :mod:`reconciler.relay.service`; tests
and the demo use a second or two).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

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
    Generation,
    RelayState,
    StagedArtifact,
)
from reconciler.relay.store import token_matches
from reconciler.times import utc_now
from reconciler.webhook import HookGuard, HookRefused

log = logging.getLogger("reconciler.relay")

MAX_BODY = protocol.MAX_BODY

RANGE = re.compile(r"bytes=([0-9]{1,18})-([0-9]{0,18})")
CHECKIN_PATH = re.compile(r"/v1/clients/([^/]*)/checkin")
ARTIFACT_PATH = re.compile(r"/v1/artifacts/([^/]*)")

CHUNK = 256 * 1024


# ------------------------------------------------------------------ validation


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


def _bad(message: str) -> HttpError:
    return HttpError(400, message)


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body (:func:`reconciler.protocol.decode_json`); HttpError(400) if it is not."""
    try:
        return protocol.decode_json(body)
    except protocol.ProtocolError as e:
        raise _bad(str(e)) from None


@dataclass(frozen=True)
class Checkin:
    """A checked check-in body, as the relay records and plans it: the inventory sorted by name."""

    facts: protocol.Facts
    labels: dict[str, str]
    inventory: tuple[Installed, ...]
    results: tuple[protocol.Result, ...]
    last_relay: str | None = None  # the relay that last answered the client


def parse_checkin(doc: Any) -> Checkin:
    """A decoded check-in body, checked by :func:`reconciler.protocol.check_checkin`; HttpError(400) if it fails."""
    try:
        body = protocol.check_checkin(doc)
    except protocol.ProtocolError as e:
        raise _bad(str(e)) from None
    inventory = sorted((Installed(entry["name"], entry["version"]) for entry in body["inventory"]),
                       key=lambda i: i.name)
    return Checkin(body["facts"], body.get("labels", {}), tuple(inventory), tuple(body.get("results", ())),
                   body.get("lastRelay"))


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


def action_json(action: Action, artifact: StagedArtifact | None) -> protocol.Action:
    """An action as the check-in reply carries it (``schemas/checkin-reply.schema.json``)."""
    package = action.package
    installer: protocol.Installer | None = None
    if package is not None:
        spec = package.installer
        installer = {"type": spec.type.value, "install": list(spec.install), "uninstall": list(spec.uninstall),
                     "detect": list(spec.detect), "timeoutSeconds": spec.timeout_seconds}
        if spec.redact:
            installer["redact"] = list(spec.redact)
    reply: protocol.Action = {
        "operationId": action.operation_id,
        "job": action.job,
        "action": action.kind.value,
        "package": {"name": action.name, "version": action.version},
        "previousVersion": action.previous_version,
        # StagedArtifact.to_json writes the protocol's artifact object
        "artifact": None if artifact is None else cast(protocol.Artifact, artifact.to_json()),
        "installer": installer,
    }
    if package is not None and action.kind is not ActionKind.UNINSTALL and package.depends_on:
        # The agent runs the action only when these are installed (the plan never
        # sends a dependent before that, but an agent does not take a relay's word).
        reply["dependsOn"] = [_dependency(d.name, d.min_version) for d in package.depends_on]
    return reply


def _dependency(name: str, min_version: str | None) -> protocol.Dependency:
    dependency: protocol.Dependency = {"name": name}
    if min_version:
        dependency["minVersion"] = min_version
    return dependency


_STATUS_TEXT = {200: "200 OK", 202: "202 Accepted", 206: "206 Partial Content", 400: "400 Bad Request",
                401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
                405: "405 Method Not Allowed", 409: "409 Conflict", 411: "411 Length Required",
                413: "413 Content Too Large", 415: "415 Unsupported Media Type",
                416: "416 Range Not Satisfiable", 500: "500 Internal Server Error",
                503: "503 Service Unavailable"}


class RelayApp:
    """The WSGI application. ``cache_dir`` is the content-addressed ``cache/sha256`` directory."""

    def __init__(self, state: RelayState, cache_dir: Path, *, webhook_secret: bytes | None = None,
                 insecure_webhook: bool = False, now: Callable[[], datetime] = utc_now) -> None:
        self.state = state
        self.store = state.store
        self.cache_dir = Path(cache_dir)
        self.webhook = HookGuard(webhook_secret, insecure=insecure_webhook)
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

    def checkin(self, client_id: str, environ: Mapping[str, Any]) -> protocol.CheckinReply:
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
            if request.last_relay is not None and request.last_relay != state.name:
                # It moved here: HQ tells that relay, which stops counting it (README, "Clients move and retire").
                changed |= self.store.record_arrival(db, client_id, request.last_relay, now)
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
                previous = self.store.row_states_of(client_id, db)
                usage = self.store.usage(db, limited, client_id, state.online_since(now), previous)
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
        reply: protocol.CheckinReply = {
            "pollSeconds": int(poll) if float(poll).is_integer() else poll,
            "actions": [action_json(a, self._artifact_for(a, generation)) for a in actions],
        }
        if new_token is not None:
            reply["token"] = new_token
        reply["relay"] = state.name
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
        """Wake a fetch if the hook passes :class:`~reconciler.webhook.HookGuard` (signed, fresh, not a replay)."""
        body = self._body(environ, json_required=False)
        try:
            self.webhook.check(environ, body)
        except HookRefused as e:
            log.warning("%s", e.message)
            raise HttpError(e.status, e.message) from None
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
