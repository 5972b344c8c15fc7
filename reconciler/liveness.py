"""Relay liveness: the heartbeat a relay sends HQ, and HQ's rule for alive, lost and unknown.

A relay proves it is alive by posting a small heartbeat to HQ's HTTP API
(``POST /v1/relays/<relay>/heartbeat``, every ``--heartbeat-interval``):
which accepted commit it serves, how many clients it has online and
offline, and its current errors (bounded). HQ judges each relay of its
accepted topology on its own clock with :func:`judge`:

* ``alive``: HQ received a heartbeat within the timeout (``--relay-timeout``);
* ``lost``: the last heartbeat is older than the timeout, or there never
  was one and HQ has been listening for longer than the timeout;
* ``unknown``: no heartbeat yet, and HQ has listened for less than the
  timeout (it cannot tell yet).

Two decisions shape it:

* **Only transitions are published.** :class:`RelayLiveness` is what goes
  to git (``relays.yaml`` on ``status/hq``): the state, when it last
  changed, and, for a lost relay only, its last contact (fixed while it
  stays lost). The last contact of a live relay moves with every heartbeat
  and is served live by HQ instead, so a healthy idle fleet makes no
  commits.
* **A restarted HQ is not a dead fleet.** While HQ was down nobody could
  reach it, so the timeout of a relay counts from its last contact or from
  when HQ started listening, whichever is later; a relay already lost stays
  lost (same since, same last contact) until it calls again.

Pure: values in, values out; the callers pass ``now``. The heartbeat's
shape is ``schemas/relay-heartbeat.schema.json``, checked with
:mod:`reconciler.schema_check`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from reconciler import protocol, schema_check
from reconciler.times import format_time, parse_time

HEARTBEAT_SCHEMA = "relay-heartbeat"
MAX_HEARTBEAT_BODY = 64 * 1024
"""Bytes a heartbeat body may hold; HQ refuses a larger one (413) before reading it."""
HEARTBEAT_ERRORS = 5
"""Errors a heartbeat names (it also says how many there are)."""
HEARTBEAT_ERROR_CHARS = 300
"""Characters of each error a heartbeat keeps."""
DEFAULT_HEARTBEAT_SECONDS = 60.0
DEFAULT_RELAY_TIMEOUT_SECONDS = 300.0


class Liveness(str, Enum):
    """What HQ says of a relay's heartbeats."""

    ALIVE = "alive"
    LOST = "lost"
    UNKNOWN = "unknown"


class HeartbeatError(ValueError):
    """A heartbeat body HQ refuses (400); the message names the field."""


@dataclass(frozen=True)
class ClientCounts:
    """A relay's clients: all registered, those that checked in within its online window, the others."""

    total: int
    online: int
    offline: int


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat, as a relay sends it and HQ keeps the last one of each relay."""

    relay: str
    observed_commit: str | None
    clients: ClientCounts
    error_count: int
    errors: tuple[str, ...]  # the first HEARTBEAT_ERRORS, each cut at HEARTBEAT_ERROR_CHARS
    sent_at: datetime  # the relay's clock: shown, never used to judge liveness


@dataclass(frozen=True)
class RelayLiveness:
    """What status/hq publishes of a relay's liveness; it changes only on a transition."""

    state: Liveness
    since: datetime | None  # the last transition (None: unknown since HQ started)
    last_contact: datetime | None = None  # only for a lost relay: its last heartbeat, fixed while lost


# ------------------------------------------------------------------ the heartbeat


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def make_heartbeat(relay: str, observed_commit: str | None, clients: ClientCounts, errors: Sequence[str],
                   sent_at: datetime) -> Heartbeat:
    """A heartbeat naming the first few of ``errors``, each cut short: a heartbeat stays small at any error count."""
    first = tuple(_cut(" ".join(e.split()), HEARTBEAT_ERROR_CHARS) for e in errors[:HEARTBEAT_ERRORS])
    return Heartbeat(relay, observed_commit, clients, len(errors), first, sent_at)


def heartbeat_json(heartbeat: Heartbeat) -> dict[str, Any]:
    """The body of ``POST /v1/relays/<relay>/heartbeat`` (``schemas/relay-heartbeat.schema.json``)."""
    c = heartbeat.clients
    return {
        "relay": heartbeat.relay,
        "observedCommit": heartbeat.observed_commit,
        "clients": {"total": c.total, "online": c.online, "offline": c.offline},
        "errors": {"count": heartbeat.error_count, "first": list(heartbeat.errors)},
        "sentAt": format_time(heartbeat.sent_at),
    }


def parse_heartbeat(body: bytes) -> Heartbeat:
    """A heartbeat body as HQ receives it; :class:`HeartbeatError` naming the field when it is refused.

    The bytes follow the protocol's JSON rules (UTF-8, no duplicate keys,
    no ``NaN``), the value the schema.
    """
    try:
        doc = protocol.decode_json(body, "heartbeat")
    except protocol.ProtocolError as e:
        raise HeartbeatError(str(e)) from None
    return check_heartbeat(doc)


def check_heartbeat(doc: Any) -> Heartbeat:
    """A decoded heartbeat checked against its schema; :class:`HeartbeatError` naming the field."""
    found = schema_check.problem(HEARTBEAT_SCHEMA, doc)
    if found is not None:
        raise HeartbeatError(found)
    sent_at = parse_time(doc["sentAt"])
    if sent_at is None:  # the schema's pattern lets 2026-13-45 through
        raise HeartbeatError(f"sentAt: {doc['sentAt']!r} is not a time")
    clients = doc["clients"]
    errors = doc["errors"]
    if int(errors["count"]) < len(errors["first"]):
        raise HeartbeatError(f"errors.count: {errors['count']} is less than the {len(errors['first'])} errors given")
    return Heartbeat(doc["relay"], doc["observedCommit"],
                     ClientCounts(int(clients["total"]), int(clients["online"]), int(clients["offline"])),
                     int(errors["count"]), tuple(errors["first"]), sent_at)


# ------------------------------------------------------------------ the rule


def judge(previous: RelayLiveness | None, last_contact: datetime | None, now: datetime, timeout: timedelta,
          listening_since: datetime) -> RelayLiveness:
    """A relay's liveness at ``now`` (see the module docstring); ``previous`` is returned when nothing changed.

    ``listening_since`` is when this HQ process started receiving heartbeats.
    A transition to ``alive`` happened at the last contact, one to ``lost``
    when the timeout ran out: the result depends on the facts, not on when
    a pass happened to look.
    """
    before = previous.state if previous is not None else Liveness.UNKNOWN
    if last_contact is not None and now - last_contact <= timeout:
        state, since = Liveness.ALIVE, last_contact
    elif before is Liveness.LOST and previous is not None:
        return previous
    elif now - listening_since <= timeout:
        return previous if previous is not None else RelayLiveness(Liveness.UNKNOWN, None)
    else:
        state = Liveness.LOST
        since = max(last_contact or listening_since, listening_since) + timeout
    if previous is not None and previous.state is state:
        return previous
    return RelayLiveness(state, since, last_contact if state is Liveness.LOST else None)


def deadline(current: RelayLiveness | None, last_contact: datetime | None, timeout: timedelta,
             listening_since: datetime) -> datetime | None:
    """When :func:`judge` calls this relay lost if no heartbeat arrives; None when it already is."""
    if current is not None and current.state is Liveness.LOST:
        return None
    return max(last_contact or listening_since, listening_since) + timeout


# ------------------------------------------------------------------ what HQ keeps on disk


@dataclass(frozen=True)
class Contact:
    """HQ's memory of one relay: the liveness it published, the last heartbeat and when it arrived."""

    liveness: RelayLiveness
    last_contact: datetime | None = None
    heartbeat: Heartbeat | None = None


def contacts_json(contacts: Mapping[str, Contact]) -> dict[str, Any]:
    """``liveness.json`` in HQ's workdir: what a restarted HQ needs not to forget its relays."""
    return {"version": 1, "relays": {
        name: {
            "liveness": c.liveness.state.value,
            "since": format_time(c.liveness.since),
            "lastContact": format_time(c.last_contact),
            "heartbeat": None if c.heartbeat is None else heartbeat_json(c.heartbeat),
        }
        for name, c in sorted(contacts.items())
    }}


def parse_contacts(doc: Any) -> dict[str, Contact]:
    """The contacts of a ``liveness.json``; ValueError when it is not one this version wrote."""
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("relays"), dict):
        raise ValueError("not a version 1 liveness file")
    contacts: dict[str, Contact] = {}
    for name, raw in doc["relays"].items():
        if not isinstance(raw, dict):
            raise ValueError(f"relays.{name}: expected an object")
        state = Liveness(raw.get("liveness"))
        since = _optional_time(raw.get("since"), f"relays.{name}.since")
        last = _optional_time(raw.get("lastContact"), f"relays.{name}.lastContact")
        heartbeat = None
        if raw.get("heartbeat") is not None:
            try:
                heartbeat = check_heartbeat(raw["heartbeat"])
            except HeartbeatError as e:
                raise ValueError(f"relays.{name}.heartbeat: {e}") from None
        contacts[str(name)] = Contact(RelayLiveness(state, since, last if state is Liveness.LOST else None),
                                      last, heartbeat)
    return contacts


def _optional_time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    moment = parse_time(value) if isinstance(value, str) else None
    if moment is None:
        raise ValueError(f"{what}: {value!r} is not a time")
    return moment
