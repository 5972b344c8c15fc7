"""The relay's client API: a WSGI app (served by :mod:`reconciler.serving`, HTTPS) speaking docs/PROTOCOL.md.

A check-in is the hot path, and it touches only the calling client's rows:
authenticate, record its facts, labels, inventory and results, plan that one
client against the relay's in-memory :class:`~reconciler.plan.RelayIndex`
and the rollout usage counted on the other clients' row states (one indexed
query, in the same transaction), record the operations handed out, commit,
reply. Nothing in it scans all clients; the loop's full pass does that, off
the request path. A check-in that changes nothing (the same report but for
free disk, no results, nothing handed out, no row moved) is read and planned
in a read transaction and takes no write lock at all: the store's in-memory
overlay remembers when the client was seen (:meth:`Store.flush_seen` writes
it in batches).

Check-ins are read one at a time (:attr:`RelayApp.checkin_gate`): once the
request is read and parsed, a check-in takes the gate for authentication and
the read-only path, and lets it go before it waits for the write lock (so
writers, one at a time anyway, hold no reader up). The server's threads are
for slow transfers (bodies, artifact downloads, TLS); the work of a
check-in is a few hundred microseconds of Python that the GIL runs one
thread at a time anyway, and each SQLite call in it lets go of the GIL.
With eight threads working check-ins at once, each of those calls could
hand the GIL to another thread and back: at times about 70 thread switches
per check-in, more CPU than the check-ins themselves
(``benchmarks/RESULTS.md``, "Check-ins read one at a time").

Two rules shape the code:

* **Client input never causes a 5xx or a traceback.** Every request is
  validated against the protocol before anything is written (unknown and
  mistyped fields, bad ids, bodies over 1 MiB, wrong Content-Type, malformed
  JSON); any refusal is a 4xx with ``{"error": "..."}``. A 500 means a relay
  bug, is logged with its traceback, and still answers in JSON.
* **Only an enrolled caller registers, and a token is never handed to anyone
  else.** A check-in of an unknown id registers it only when it presents the
  relay's enrolment secret (``X-Reconciler-Enrollment``, compared in constant
  time), or when the relay runs with open enrolment (trust on first use, an
  explicit flag); the reply carries the client's token. Once the client has
  checked in with that token (its registration is *confirmed*), a check-in
  without it is 401 and one with another token 403, secret or not. Until
  then an enrolled check-in gets a fresh token (the old one stops working),
  so a reply lost after the relay committed the registration (a relay killed
  at that instant, a dropped connection) never locks the client out, while a
  caller without the secret can neither register an id nor take over one
  that has not used its token yet. ``reconciler clients rekey`` revokes a
  token, which puts the registration back in that unconfirmed state.
* **Approval.** With ``--require-approval`` a new registration gets its token
  but every check-in is answered 403 ``pendingApproval`` (nothing planned,
  nothing handed out) until ``reconciler clients approve``: the operator
  admits the very machine that holds the token.
* **Artifacts need a credential:** the token of an approved client of this
  relay (``Authorization: Bearer``) or, for a child relay, the secret of
  ``--child-secret-file`` (``X-Reconciler-Relay-Secret``). Credentials are
  checked before the hash is even looked at, so a stranger cannot learn what
  the cache holds.
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
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from reconciler import names, protocol, specs
from reconciler.credentials import secret_matches
from reconciler.metrics import METRICS_PATH, RelayMetrics, metrics_app_response
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
    TrustBundle,
)
from reconciler.relay.store import CheckinView, FinishedOperation, token_matches
from reconciler.times import utc_now
from reconciler.webhook import HookGuard, HookRefused

log = logging.getLogger("reconciler.relay")

MAX_BODY = protocol.MAX_BODY

RANGE = re.compile(r"bytes=([0-9]{1,18})-([0-9]{0,18})")
CHECKIN_PATH = re.compile(r"/v1/clients/([^/]*)/checkin")
ARTIFACT_PATH = re.compile(r"/v1/artifacts/([^/]*)")

CHUNK = 256 * 1024

# The WSGI environ keys of the credential headers.
_ENROLLMENT_ENVIRON = "HTTP_" + protocol.ENROLLMENT_HEADER.upper().replace("-", "_")
_RELAY_SECRET_ENVIRON = "HTTP_" + protocol.RELAY_SECRET_HEADER.upper().replace("-", "_")


# ------------------------------------------------------------------ validation


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = (), *,
                 reason: str | None = None, token: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.reason = reason  # one of protocol.REFUSAL_REASONS on a 401/403 of a check-in
        self.token = token  # a pending client's new token rides on its 403

    def body(self) -> dict[str, str]:
        out = {"error": self.message}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.token is not None:
            out["token"] = self.token
        return out


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
    trust_serial: int | None = None  # the newest manifest serial the agent has verified
    software_digest: str | None = None  # the digest of the client's current OS software list
    software: tuple[protocol.SoftwareEntry, ...] | None = None  # the list, when it was sent
    software_omitted: int = 0


def parse_checkin(doc: Any) -> Checkin:
    """A decoded check-in body, checked by :func:`reconciler.protocol.check_checkin`; HttpError(400) if it fails."""
    try:
        body = protocol.check_checkin(doc)
    except protocol.ProtocolError as e:
        raise _bad(str(e)) from None
    inventory = sorted((Installed(entry["name"], entry["version"], entry.get("source", "reconciler"))
                        for entry in body["inventory"]),
                       key=lambda i: i.name)
    software = body.get("software")
    return Checkin(body["facts"], body.get("labels", {}), tuple(inventory), tuple(body.get("results", ())),
                   body.get("lastRelay"), body.get("trustSerial"), body.get("softwareDigest"),
                   None if software is None else tuple(software), body.get("softwareOmitted", 0))


_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="reconciler"')


def _refused(status: int, reason: str, message: str, token: str | None = None) -> HttpError:
    return HttpError(status, message, [_CHALLENGE] if status == 401 else [], reason=reason, token=token)


def _needs_enrollment(client_id: str, registered: bool) -> HttpError:
    why = ("has no valid token (it was revoked, or the reply that carried it was lost)" if registered
           else "is not registered with this relay")
    return _refused(401, protocol.REASON_ENROLLMENT_REQUIRED,
                    f"client {client_id} {why}: check in with the relay's enrolment secret "
                    f"({protocol.ENROLLMENT_HEADER}; the agent's --enroll-secret-file) to get a token")


def _pending(client_id: str, token: str | None = None) -> HttpError:
    return _refused(403, protocol.REASON_PENDING_APPROVAL,
                    f"client {client_id} is registered and waits for approval: on the relay host, run "
                    f"`reconciler clients approve {client_id} --workdir <the relay's workdir>`", token)


@dataclass(frozen=True)
class Trust:
    """Who may register with the relay and who may download its artifacts (README, "Enrolment").

    The default admits nobody new: ``reconciler relay`` refuses to start
    without ``--enroll-secret-file`` or ``--open-enrollment``.
    """

    enroll_secret: str | None = None  # agents present it (X-Reconciler-Enrollment) to register
    open_enrollment: bool = False  # any caller registers an unknown id: trust on first use
    require_approval: bool = False  # new registrations wait for `reconciler clients approve`
    child_secret: str | None = None  # child relays present it (X-Reconciler-Relay-Secret) for artifacts


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


def action_json(action: Action, artifact: StagedArtifact | None, trust: TrustBundle | None = None,
                reboot: str = "never") -> protocol.Action:
    """An action as the check-in reply carries it (``schemas/checkin-reply.schema.json``); with HQ's signed
    manifest, the paths of the documents it comes from. ``reboot`` is the job's reboot policy
    (:func:`reconciler.specs.reboot_policy`); ``never`` is not written."""
    package = action.package
    installer = protocol.installer_of(package.installer) if package is not None else None
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
        reply["dependsOn"] = protocol.dependencies_of(package)
    if reboot != "never":
        reply["reboot"] = reboot
    if trust is not None:
        documents: protocol.ActionDocuments = {"job": trust.job_sources.get(action.job, "")}
        if package is not None:
            documents["package"] = package.source
        reply["documents"] = documents
    return reply


def attach_trust(reply: protocol.CheckinReply, trust: TrustBundle | None, agent_serial: int | None) -> None:
    """Add HQ's signed manifest and the documents the actions name to a reply.

    Sent with every reply that hands out actions, and once to an agent that
    has not verified this serial yet (so idle agents learn new serials and
    next keys too); an idle check-in of an agent that has it costs nothing.
    """
    if trust is None or (not reply["actions"] and agent_serial is not None and agent_serial >= trust.serial):
        return
    reply["manifest"] = dict(trust.envelope)
    paths: set[str] = set()
    for action in reply["actions"]:
        named = action.get("documents")
        if named is not None:
            paths.add(named["job"])
            if "package" in named:
                paths.add(named["package"])
    reply["documents"] = {path: trust.documents[path] for path in sorted(paths) if path in trust.documents}


_STATUS_TEXT = {200: "200 OK", 202: "202 Accepted", 206: "206 Partial Content", 400: "400 Bad Request",
                401: "401 Unauthorized", 403: "403 Forbidden", 404: "404 Not Found",
                405: "405 Method Not Allowed", 409: "409 Conflict", 411: "411 Length Required",
                413: "413 Content Too Large", 415: "415 Unsupported Media Type",
                416: "416 Range Not Satisfiable", 500: "500 Internal Server Error",
                503: "503 Service Unavailable"}


class RelayApp:
    """The WSGI application. ``cache_dir`` is the content-addressed ``cache/sha256`` directory."""

    def __init__(self, state: RelayState, cache_dir: Path, *, webhook_secret: bytes | None = None,
                 insecure_webhook: bool = False, trust: Trust = Trust(),
                 now: Callable[[], datetime] = utc_now, metrics: RelayMetrics | None = None) -> None:
        self.metrics = metrics  # None: GET /metrics is 404
        self.trust = trust
        self.state = state
        self.store = state.store
        self.cache_dir = Path(cache_dir)
        self.webhook = HookGuard(webhook_secret, insecure=insecure_webhook)
        self.now = now
        # Held by a check-in from its parsed request until it writes or replies (the module's docstring).
        self.checkin_gate = threading.Lock()

    # -- plumbing ------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return self._route(environ, start_response)
        except HttpError as e:
            return self._json(start_response, e.status, e.body(), e.headers)
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
            if self.metrics is None:
                return self._json(start_response, 200, self.checkin(match.group(1), environ))
            return self._json(start_response, 200, self._counted_checkin(match.group(1), environ, self.metrics))
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
        if path == METRICS_PATH and self.metrics is not None:
            return metrics_app_response(self.metrics, method, start_response)
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

    # -- credentials ---------------------------------------------------------

    def _enrolled(self, client_id: str, environ: Mapping[str, Any]) -> str | None:
        """How the caller may register: "enrolment secret", "open enrolment", or None (it may not).

        A secret presented and wrong is refused outright (401), even with open
        enrolment: an agent configured with a stale secret should hear so.
        """
        presented = environ.get(_ENROLLMENT_ENVIRON)
        if presented is None:
            return "open enrolment" if self.trust.open_enrollment else None
        secret = self.trust.enroll_secret
        if secret is not None and secret_matches(presented, secret):
            return "enrolment secret"
        if secret is None and self.trust.open_enrollment:
            return "open enrolment"
        log.warning("client %s presented a wrong enrolment secret", client_id)
        raise _refused(401, protocol.REASON_ENROLLMENT_REFUSED,
                       f"wrong enrolment secret ({protocol.ENROLLMENT_HEADER}): the agent's --enroll-secret-file "
                       "must hold the relay's --enroll-secret-file")

    def _authorize_download(self, environ: Mapping[str, Any]) -> None:
        """Let an artifact go only to an approved client of this relay or to a child relay (401/403 otherwise)."""
        presented = environ.get(_RELAY_SECRET_ENVIRON)
        if presented is not None:
            if self.trust.child_secret is not None and secret_matches(presented, self.trust.child_secret):
                return
            log.warning("a download presented a wrong child-relay secret")
            raise HttpError(401, f"wrong relay secret ({protocol.RELAY_SECRET_HEADER}): the child relay's "
                                 "--parent-secret-file must hold this relay's --child-secret-file", [_CHALLENGE])
        token = _bearer(environ)
        if token is None:
            raise HttpError(401, "artifacts are served to this relay's clients and child relays only: send the "
                                 "client's token (Authorization: Bearer <token>) or a child relay's secret "
                                 f"({protocol.RELAY_SECRET_HEADER})", [_CHALLENGE])
        holder = self.store.client_of_token(token)
        if holder is None:
            raise _refused(401, protocol.REASON_TOKEN_REFUSED, "this token belongs to no client of this relay")
        client_id, approved = holder
        if not approved:
            raise _pending(client_id)

    # -- check-in ------------------------------------------------------------

    def _counted_checkin(self, client_id: str, environ: Mapping[str, Any],
                         metrics: RelayMetrics) -> protocol.CheckinReply:
        """:meth:`checkin`, counted by status code (refusals by reason) and timed."""
        code = 500
        with metrics.checkin_seconds.time():
            try:
                reply = self.checkin(client_id, environ)
                code = 200
                return reply
            except HttpError as e:
                code = e.status
                if e.reason is not None:
                    metrics.enrolment_refusals.labels(e.reason).inc()
                raise
            finally:
                metrics.checkins.labels(str(code)).inc()

    def checkin(self, client_id: str, environ: Mapping[str, Any]) -> protocol.CheckinReply:
        if not names.is_client_id(client_id):
            raise _bad("invalid client id: use 1-63 lowercase letters, digits, '.' and '-'")
        token = _bearer(environ)
        enrolled = self._enrolled(client_id, environ)
        request = parse_checkin(parse_json(self._body(environ, json_required=True)))
        with ExitStack() as gate:
            gate.enter_context(self.checkin_gate)
            return self._checkin(client_id, token, enrolled, request, gate)

    def _checkin(self, client_id: str, token: str | None, enrolled: str | None, request: Checkin,
                 gate: ExitStack) -> protocol.CheckinReply:
        """The work of a check-in whose request is read and parsed: under :attr:`checkin_gate` (held by
        ``gate``) until it is known to write; it lets the gate go before it waits for the write lock."""
        # Authenticate before taking the write lock: a refused client costs one indexed read (which also
        # reads what tells whether this check-in changes anything).
        view = self.store.checkin_view(client_id)
        credentials = None if view is None else view.credentials
        reissue = confirm = False
        if credentials is None:
            if enrolled is None:
                raise _needs_enrollment(client_id, registered=False)
        elif token is not None and token_matches(token, credentials.token_hash):
            confirm = not credentials.confirmed
        elif credentials.confirmed:
            # Its token has been used: nobody else gets one, whatever they present.
            if enrolled is not None and self.trust.enroll_secret is not None:
                log.warning("client %s presented the enrolment secret without its token; if that PC lost its "
                            "token or was re-imaged: reconciler clients rekey %s --workdir %s", client_id, client_id,
                            self.store.path.parent)
            if token is None:
                raise _refused(401, protocol.REASON_TOKEN_REQUIRED,
                               f"client {client_id} is registered: send its token (Authorization: Bearer <token>)")
            raise _refused(403, protocol.REASON_TOKEN_REFUSED, f"this token does not belong to client {client_id}")
        elif enrolled is not None:
            reissue = True  # never used (its reply may have been lost) or rekeyed: an enrolled caller gets one
        else:
            raise _needs_enrollment(client_id, registered=True)
        approved = credentials.approved if credentials is not None else not self.trust.require_approval
        now = self.now()
        state = self.state
        generation = state.generation
        if view is not None and not reissue and not confirm:
            quiet = self._quiet_checkin(client_id, view, request, approved, generation, now)
            if quiet is not None:  # nothing to write: no write transaction, the overlay remembers it was seen
                if not approved:
                    raise _pending(client_id)
                return self._reply(*quiet[:2], request, None, quiet[2])
        gate.close()  # writers wait for the write lock, one at a time anyway; a long wait holds no other up
        changed = False
        new_token: str | None = None
        finished: Sequence[FinishedOperation] = ()
        held_software: str | None = None
        with self.store.write() as db:
            if credentials is None:
                # First check-in (or a relay that lost its database), by an enrolled caller.
                new_token = self.store.register(db, client_id, now, approved=approved, actor=f"relay ({enrolled})")
                if new_token is None:
                    raise HttpError(409, f"client {client_id} registered concurrently; check in again with its token")
                changed = approved
            elif reissue:
                new_token = self.store.reissue(db, client_id, now, actor=f"relay ({enrolled})")
                if new_token is None:
                    raise _refused(401, protocol.REASON_TOKEN_REQUIRED,
                                   f"client {client_id} is registered: send its token (Authorization: Bearer <token>)")
            elif confirm and not self.store.confirm(db, client_id, credentials.token_hash):
                raise _refused(403, protocol.REASON_TOKEN_REFUSED, f"this token does not belong to client {client_id}")
            if approved:
                actions, generation, planned_change, finished = self._record_and_plan(db, client_id, request,
                                                                                     generation, now)
                changed |= planned_change
            else:
                # Registered, waiting: remember what it is (the operator sees its host name), plan nothing.
                self.store.record_report(db, client_id, request.facts, request.labels, request.inventory, now)
                actions = ()
            # The OS's software list: stored when sent, never a reason to plan (it changes no plan).
            if request.software is not None and request.software_digest is not None:
                self.store.record_software(db, client_id, request.software_digest, request.software_omitted,
                                           request.software, now)
                held_software = request.software_digest
            else:
                held_software = self.store.software_digest(client_id, db)
        # Committed: count it (a transaction rolled back counts nothing).
        if self.metrics is not None:
            if new_token is not None and credentials is None:
                self.metrics.registrations.inc()
            for operation in finished:
                self.metrics.results.labels(operation.outcome.value).inc()
        if not approved:
            if new_token is not None and credentials is None:
                log.info("client %s registered (%s); it waits for approval: reconciler clients approve %s "
                         "--workdir %s", client_id, enrolled, client_id, self.store.path.parent)
            raise _pending(client_id, new_token)
        # Everything this reply acknowledges and hands out is on disk.
        if new_token is not None:
            log.info("client %s %s (%s)", client_id, "registered" if credentials is None else "got a new token "
                     "(its token was revoked, or its registration reply was lost)", enrolled)
        if changed:
            state.on_change()
        return self._reply(actions, generation, request, new_token, held_software)

    def _reply(self, actions: Sequence[Action], generation: Generation, request: Checkin, new_token: str | None,
               held_software: str | None) -> protocol.CheckinReply:
        poll = self.state.poll_seconds
        reply: protocol.CheckinReply = {
            "pollSeconds": int(poll) if float(poll).is_integer() else poll,
            "actions": [action_json(a, self._artifact_for(a, generation), generation.trust,
                                    self._reboot_for(a, generation)) for a in actions],
        }
        attach_trust(reply, generation.trust, request.trust_serial)
        if new_token is not None:
            reply["token"] = new_token
        reply["relay"] = self.state.name
        reply["softwareDigest"] = held_software  # the agent sends its list again when this is not its digest
        return reply

    def _quiet_checkin(self, client_id: str, view: CheckinView, request: Checkin, approved: bool,
                       generation: Generation, now: datetime,
                       ) -> tuple[tuple[Action, ...], Generation, str | None] | None:
        """A check-in of a registered client that changes nothing: its actions, generation and held software
        digest, planned in one read transaction (no write lock); None when something must be written.

        ``view`` is the client's row as read at authentication. Something must be written when the check-in
        carries results; when its labels, inventory or facts other than
        :data:`~reconciler.relay.store.FAST_FACTS` differ from the stored ones; when it arrived from another
        relay, sends a new software list, or ends a wait for a reboot; when its plan hands out an action or
        moves one of its rows; and when its stored ``last_seen`` is older than the online window less two
        flush intervals (a client coming back: :meth:`Store.usage` counts online clients by ``last_seen`` in
        SQLite). Otherwise the overlay remembers when it was seen and its facts.
        """
        store = self.store
        state = self.state
        stored, held = view.report, view.software_digest
        if request.results or store.report_changes(stored, request.facts, request.labels, request.inventory):
            return None
        if stored.last_seen < state.online_since(now) + timedelta(seconds=2 * store.flush_interval):
            return None
        if request.last_relay is not None and request.last_relay != state.name \
                and stored.came_from != request.last_relay:
            return None
        if request.software is not None and request.software_digest is not None \
                and request.software_digest != held:
            return None
        actions: tuple[Action, ...] = ()
        boot_id = request.facts.get("bootId")
        if boot_id is not None or (approved and generation.index is not None):
            db = store.db
            db.execute("BEGIN")
            try:
                if store.reboot_would_clear(db, client_id, boot_id):
                    return None
                if approved and generation.index is not None:
                    actions, generation, moved = self._plan(db, client_id, request, generation, now)
                    if actions or moved:
                        return None
            finally:
                db.execute("COMMIT")
        store.note_seen(client_id, request.facts, now)
        return actions, generation, held

    def _record_and_plan(self, db: sqlite3.Connection, client_id: str, request: Checkin, generation: Generation,
                         now: datetime) -> tuple[tuple[Action, ...], Generation, bool, list[FinishedOperation]]:
        """Record an admitted client's report and results, plan it, record what is handed out (in ``db``'s
        transaction): the actions, the generation they were planned with, whether anything changed, and the
        operations whose results were recorded."""
        state = self.state
        changed = False
        changed |= self.store.record_report(db, client_id, request.facts, request.labels, request.inventory, now)
        if request.last_relay is not None and request.last_relay != state.name:
            # It moved here: HQ tells that relay, which stops counting it (README, "Clients move and retire").
            changed |= self.store.record_arrival(db, client_id, request.last_relay, now)
        boot_id = request.facts.get("bootId")
        finished = self.store.record_results(db, client_id, request.results, now, boot_id)
        if finished:
            changed = True
        if self.store.clear_reboots(db, client_id, boot_id, now):
            changed = True  # rows waiting for this client's reboot are plain Succeeded now
        actions: tuple[Action, ...] = ()
        if generation.index is not None:
            actions, generation, moved = self._plan(db, client_id, request, generation, now)
            for action in actions:
                attempt = Attempt(
                    operation_id=action.operation_id, job=action.job, client=client_id,
                    revision=action.revision, rerun=action.rerun, attempt=action.attempt, action=action.kind,
                    version=action.version, outcome=Outcome.DISPATCHED, dispatched_at=now)
                if self.store.record_dispatch(db, attempt):
                    changed = True
            if moved:
                self.store.set_row_states(db, moved)
                changed = True
        return actions, generation, changed, finished

    def _plan(self, db: sqlite3.Connection, client_id: str, request: Checkin, generation: Generation,
              now: datetime) -> tuple[tuple[Action, ...], Generation, list[tuple[str, str, str, datetime]]]:
        """Plan one client in ``db``'s transaction: its actions, the generation planned with, and its rows
        whose state moved as (job, client, state, since)."""
        state = self.state
        index = generation.index
        assert index is not None
        client = Client(
            id=client_id, relay=state.name, os=request.facts.get("os"), arch=request.facts.get("arch"),
            free_disk_mb=request.facts.get("freeDiskMB"),
            labels=tuple(sorted(request.labels.items())), installed=request.inventory, online=True)
        history = self.store.history_of(client_id, db)
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
        moved = [(row.job, client_id, row.state.value, now) for row in planned.rows
                 if previous.get(row.job) is None or previous[row.job].state != row.state.value]
        return planned.actions, generation, moved

    @staticmethod
    def _reboot_for(action: Action, generation: Generation) -> str:
        """The reboot policy of an action's job (``never`` when the job is not in the index)."""
        index = generation.index
        job = next((j for j in index.jobs if j.name == action.job), None) if index is not None else None
        return "never" if job is None else specs.reboot_policy(job, action.package)

    @staticmethod
    def _artifact_for(action: Action, generation: Generation) -> StagedArtifact | None:
        if action.kind is ActionKind.UNINSTALL or action.package is None:
            return None
        return generation.artifacts.get((action.package.name, action.package.version))

    # -- artifacts -----------------------------------------------------------

    def artifact(self, sha: str, environ: Mapping[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        self._authorize_download(environ)
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
                       ("ETag", f'"{sha}"'), ("Cache-Control", "private, max-age=31536000, immutable")]
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
