"""HQ's side of relay liveness: the heartbeats it receives, ``liveness.json``, and ``/v1/relays``.

Relays post heartbeats to HQ's ``--listen`` address
(``POST /v1/relays/<relay>/heartbeat``); :class:`Contacts` keeps the last
one of each relay in memory, and every HQ pass asks it to judge each relay
of the accepted topology (:func:`reconciler.liveness.judge`) on HQ's clock.
Only the judgement (alive, lost, unknown, and when that last changed) goes
to ``status/hq``; the last contact of a live relay, its live client counts
and errors are served at ``GET /v1/relays`` instead of committed.

The contacts are written to ``<workdir>/liveness.json`` (atomically) on a
transition, and otherwise at most every :data:`SAVE_SECONDS` while
heartbeats arrive, so an idle HQ does not write its disk at every
heartbeat, and a restarted HQ neither forgets when it last heard from a
relay nor calls every relay lost at once.

The endpoint's rules, in this order: POST only (405); a body of at most
:data:`reconciler.liveness.MAX_HEARTBEAT_BODY` bytes (413); with
``--heartbeat-secret-file``, an ``X-Hub-Signature-256`` HMAC of the body
(401, as the git webhook); a relay of the accepted topology (404; 503
before HQ has accepted a commit); a body following
``schemas/relay-heartbeat.schema.json`` and naming the relay of the URL
(400, naming the field). Every answer is JSON.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler.fileio import quarantine, write_json_atomic
from reconciler.liveness import (
    MAX_HEARTBEAT_BODY,
    Contact,
    Heartbeat,
    HeartbeatError,
    Liveness,
    RelayLiveness,
    contacts_json,
    deadline,
    heartbeat_json,
    judge,
    parse_contacts,
    parse_heartbeat,
)
from reconciler.serving import StartResponse, json_response, read_body
from reconciler.times import format_time
from reconciler.webhook import SIGNATURE_HEADER, verify_signature

log = logging.getLogger("reconciler.hq")

LIVENESS_FILE = "liveness.json"
SAVE_SECONDS = 60.0
"""Longest the contacts on disk lag those in memory while no relay changes state."""
RELAYS_PATH = "/v1/relays"
HEARTBEAT_PATH = re.compile(r"/v1/relays/([^/]*)/heartbeat")


class Contacts:
    """The last heartbeat of every relay and the liveness HQ published; shared by the HTTP threads and the loop."""

    def __init__(self, path: Path | None, timeout: float, listening_since: datetime,
                 clock: Callable[[], datetime]) -> None:
        self.path = path
        self.timeout = timedelta(seconds=timeout)
        self.listening_since = listening_since
        self.clock = clock
        self._lock = threading.Lock()
        self._contacts: dict[str, Contact] = self._load()
        self._relays: frozenset[str] | None = None  # the accepted topology's relays (None: no accepted commit)
        self._dirty = False
        self._saved_at: datetime | None = None
        self._save_failed = False

    # -- memory and disk -----------------------------------------------------

    def _load(self) -> dict[str, Contact]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            contacts = parse_contacts(json.loads(self.path.read_bytes()))
        except (OSError, ValueError) as e:
            quarantine(self.path, str(e))
            return {}
        log.info("read the last contacts of %d relays from %s", len(contacts), self.path)
        return contacts

    def save(self) -> None:
        """Write the contacts now (a failure is logged once, never raised: they are memory first)."""
        if self.path is None:
            return
        with self._lock:
            doc = contacts_json(self._contacts)
            self._dirty = False
            self._saved_at = self.clock()
        try:
            write_json_atomic(self.path, doc)
        except OSError as e:
            if not self._save_failed:
                log.warning("cannot write %s (relay contacts stay in memory): %s", self.path, e)
            self._save_failed = True
            return
        if self._save_failed:
            log.info("wrote %s again", self.path)
        self._save_failed = False

    # -- heartbeats ----------------------------------------------------------

    def known(self, relay: str) -> bool | None:
        """Whether ``relay`` is in the accepted topology (None: HQ has not accepted a commit yet)."""
        relays = self._relays
        return None if relays is None else relay in relays

    def record(self, heartbeat: Heartbeat) -> bool:
        """Remember a heartbeat arriving now; True when its relay is not published as alive (publish soon)."""
        now = self.clock()
        with self._lock:
            previous = self._contacts.get(heartbeat.relay)
            published = previous.liveness if previous is not None else RelayLiveness(Liveness.UNKNOWN, None)
            self._contacts[heartbeat.relay] = Contact(published, now, heartbeat)
            self._dirty = True
        return published.state is not Liveness.ALIVE

    # -- judging -------------------------------------------------------------

    def evaluate(self, relays: Iterable[str] | None) -> tuple[dict[str, RelayLiveness], list[str]]:
        """Judge every relay of the accepted topology now: the liveness to publish, and a note per transition.

        ``relays`` None (no accepted commit, or one that no longer loads)
        judges nothing and forgets nothing. Contacts of relays no longer in
        the topology are dropped. The contacts are
        saved on a transition, else when the last save is older than
        :data:`SAVE_SECONDS` and a heartbeat came since.
        """
        now = self.clock()
        published: dict[str, RelayLiveness] = {}
        notes: list[str] = []
        with self._lock:
            self._relays = None if relays is None else frozenset(relays)
            names = self._relays if self._relays is not None else frozenset(self._contacts)
            for gone in set(self._contacts) - names:
                del self._contacts[gone]
                self._dirty = True
            for name in sorted(self._relays or ()):
                contact = self._contacts.get(name) or Contact(RelayLiveness(Liveness.UNKNOWN, None))
                current = judge(contact.liveness, contact.last_contact, now, self.timeout, self.listening_since)
                if current != contact.liveness or name not in self._contacts:
                    if current.state is not contact.liveness.state:
                        notes.append(_transition_note(name, current, self.listening_since))
                    self._contacts[name] = Contact(current, contact.last_contact, contact.heartbeat)
                    self._dirty = True
                published[name] = current
            due = self._dirty and (bool(notes) or self._saved_at is None
                                   or now - self._saved_at >= timedelta(seconds=SAVE_SECONDS))
        if due:
            self.save()
        return published, notes

    def seconds_until_change(self) -> float | None:
        """Seconds until a relay would be lost without another heartbeat; None when none can be."""
        now = self.clock()
        with self._lock:
            deadlines = [deadline(c.liveness, c.last_contact, self.timeout, self.listening_since)
                         for name, c in self._contacts.items() if self._relays and name in self._relays]
        due = [d for d in deadlines if d is not None]
        return None if not due else max(0.0, (min(due) - now).total_seconds())

    def counts(self) -> dict[str, int]:
        """How many relays of the topology are alive, lost and unknown, as last judged."""
        with self._lock:
            states = [c.liveness.state for name, c in self._contacts.items() if self._relays and name in self._relays]
        return {state.value: states.count(state) for state in Liveness}

    def view(self) -> dict[str, Any]:
        """``GET /v1/relays``: every relay of the topology, judged now, with its last heartbeat."""
        now = self.clock()
        with self._lock:
            relays = sorted(self._relays or ())
            contacts = {name: self._contacts.get(name) for name in relays}
        out = []
        for name in relays:
            contact = contacts[name] or Contact(RelayLiveness(Liveness.UNKNOWN, None))
            current = judge(contact.liveness, contact.last_contact, now, self.timeout, self.listening_since)
            beat = heartbeat_json(contact.heartbeat) if contact.heartbeat is not None else None
            out.append({
                "relay": name,
                "liveness": current.state.value,
                "livenessSince": format_time(current.since),
                "lastContact": format_time(contact.last_contact),
                "observedCommit": beat["observedCommit"] if beat else None,
                "clients": beat["clients"] if beat else None,
                "errors": beat["errors"] if beat else None,
                "sentAt": beat["sentAt"] if beat else None,
            })
        return {"now": format_time(now), "timeoutSeconds": self.timeout.total_seconds(),
                "listeningSince": format_time(self.listening_since),
                "acceptedTopology": self._relays is not None, "relays": out}


def _transition_note(name: str, current: RelayLiveness, listening_since: datetime) -> str:
    if current.state is Liveness.ALIVE:
        return f"relay {name} is alive (heartbeat at {format_time(current.since)})"
    if current.state is Liveness.LOST:
        if current.last_contact is None:
            return f"relay {name} is LOST: no heartbeat since HQ started listening at {format_time(listening_since)}"
        return f"relay {name} is LOST: no heartbeat since {format_time(current.last_contact)}"
    return f"relay {name}: liveness unknown"


# ------------------------------------------------------------------ HTTP


class RelaysApi:
    """HQ's relay endpoints: ``POST /v1/relays/<relay>/heartbeat`` and ``GET /v1/relays``.

    ``on_transition`` is called when a heartbeat comes from a relay not
    published as alive, so HQ publishes its recovery at once rather than at
    the next poll.
    """

    def __init__(self, contacts: Contacts, secret: bytes | None, on_transition: Callable[[], None]) -> None:
        self.contacts = contacts
        self.secret = secret
        self.on_transition = on_transition

    def route(self, path: str, environ: Mapping[str, Any], start_response: StartResponse) -> list[bytes] | None:
        """The answer when ``path`` is one of these endpoints, else None."""
        method = environ.get("REQUEST_METHOD", "GET")
        if path == RELAYS_PATH:
            if method not in ("GET", "HEAD"):
                return json_response(start_response, 405, {"error": "use GET"})
            return json_response(start_response, 200, self.contacts.view())
        match = HEARTBEAT_PATH.fullmatch(path)
        if match is None:
            return None
        if method != "POST":
            return json_response(start_response, 405, {"error": "use POST"})
        return self.heartbeat(match.group(1), environ, start_response)

    def heartbeat(self, relay: str, environ: Mapping[str, Any], start_response: StartResponse) -> list[bytes]:
        body = read_body(environ, MAX_HEARTBEAT_BODY)
        if isinstance(body, int):
            messages = {400: "bad Content-Length", 413: f"body larger than {MAX_HEARTBEAT_BODY} bytes"}
            return json_response(start_response, body, {"error": messages.get(body, "bad request")})
        if self.secret is not None:
            header = environ.get("HTTP_X_HUB_SIGNATURE_256")
            if not verify_signature(self.secret, body, header):
                reason = "missing" if not header else "bad"
                return json_response(start_response, 401, {"error": f"{reason} {SIGNATURE_HEADER} signature "
                                                                    "(HMAC-SHA256 of the body)"})
        shown = relay[:70]
        known = self.contacts.known(relay)
        if known is None:
            return json_response(start_response, 503, {"error": "HQ has not accepted a commit yet, so it knows no "
                                                                "relays; send again later"})
        if not known:
            return json_response(start_response, 404, {"error": f"no relay {shown!r} in the accepted topology"})
        try:
            heartbeat = parse_heartbeat(body)
        except HeartbeatError as e:
            return json_response(start_response, 400, {"error": str(e)})
        if heartbeat.relay != relay:
            return json_response(start_response, 400, {"error": f"relay: {heartbeat.relay!r} is not the relay of "
                                                                f"the URL ({shown!r})"})
        if self.contacts.record(heartbeat):
            self.on_transition()
        return json_response(start_response, 200, {"ok": True, "relay": relay,
                                                   "timeoutSeconds": self.contacts.timeout.total_seconds()})
