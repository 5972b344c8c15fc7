"""``reconciler clients``: the relay operator's view and control of who is a client.

Runs on the relay host against the relay's workdir, while the relay serves
or not: every change is one ``BEGIN IMMEDIATE`` transaction through
:class:`~reconciler.relay.store.Store` (SQLite in WAL mode), and the relay
reads credentials from the database at each request, so a change counts at
the client's next check-in (and in the relay's status at its next full
pass). Every change is recorded in the relay's ``client_events`` table with
the OS user who made it and when, and logged.

* ``list [ID]`` — id, state, host name, first and last seen (``--format
  json`` too); with an ID, that client and its recorded events.
* ``approve ID`` — admit a client waiting for approval (``--require-approval``).
* ``rekey ID`` — revoke the client's token, keeping its history; the agent's
  next check-in with the enrolment secret gets a new token.
* ``forget ID`` — delete the registration and its history (operations,
  attempts, status rows): a re-imaged PC enrols again as a new client. Its
  events are kept.

Exit codes: 0 done (or nothing to do), 1 no such client, 2 usage error or
no relay database in the workdir.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import names
from reconciler.logs import configure_logging
from reconciler.relay.state import DEFAULT_RETIRE_AFTER
from reconciler.relay.store import DB_NAME, ClientRecord, Store, StoreError
from reconciler.times import format_time, utc_now

log = logging.getLogger("reconciler.clients")

ACTIONS = ("list", "approve", "forget", "rekey")

PENDING = "pending approval"
REKEYED = "rekeyed"  # its token is revoked: the next enrolled check-in gets a new one
MOVED_AWAY = "moved away"
RETIRED = "retired"
ACTIVE = "active"


def state_of(record: ClientRecord, now: datetime, retire_after: timedelta = DEFAULT_RETIRE_AFTER) -> str:
    """How the relay treats a client now, as one word or two (retired by the relay's default 30 days)."""
    if not record.approved:
        return PENDING
    if not record.has_token:
        return REKEYED
    if record.moved_away():
        return MOVED_AWAY
    if now - record.last_seen > retire_after:
        return RETIRED
    return ACTIVE


def operator() -> str:
    """Who runs the command: the OS user, and who became it through sudo."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container): the uid still says who
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def _row(record: ClientRecord, now: datetime) -> dict[str, Any]:
    hostname = record.facts.get("hostname")
    return {"id": record.id, "state": state_of(record, now),
            "hostname": hostname if isinstance(hostname, str) else None,
            "firstSeen": format_time(record.first_seen), "lastSeen": format_time(record.last_seen),
            "movedTo": record.moved_to if record.moved_away() else None}


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("ID", "STATE", "HOSTNAME", "FIRST SEEN", "LAST SEEN")
    table = [header] + [(r["id"], r["state"] + (f" (to {r['movedTo']})" if r["movedTo"] else ""),
                         r["hostname"] or "-", r["firstSeen"], r["lastSeen"]) for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


def _list(store: Store, client_id: str | None, fmt: str) -> int:
    now = utc_now()
    records = store.clients(pending=True)
    if client_id is not None:
        records = [r for r in records if r.id == client_id]
        if not records and not store.events(client_id):
            print(f"reconciler clients: no client {client_id} at this relay", file=sys.stderr)
            return 1
    rows = [_row(r, now) for r in records]
    events = [{"at": format_time(e.at), "client": e.client, "action": e.action, "by": e.actor, "detail": e.detail}
              for e in store.events(client_id)] if client_id is not None else None
    if fmt == "json":
        doc: dict[str, Any] = {"clients": rows}
        if events is not None:
            doc["events"] = events
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if rows or client_id is None:
        _print_table(rows)
    if events is not None:
        print("")
        print(f"events of {client_id}:")
        for event in events:
            detail = f": {event['detail']}" if event["detail"] else ""
            print(f"  {event['at']}  {event['action']} by {event['by']}{detail}")
    return 0


def _change(store: Store, action: str, client_id: str) -> int:
    who = operator()
    now = utc_now()
    if action == "approve":
        done = store.approve(client_id, who, now)
        if done is False:
            print(f"client {client_id} is approved already")
            return 0
        found = done is not None
        said = f"client {client_id} approved by {who}: it gets its work at its next check-in"
    elif action == "rekey":
        found = store.rekey(client_id, who, now)
        said = (f"client {client_id} rekeyed by {who}: its token is revoked; its agent gets a new one at its "
                "next check-in with the enrolment secret (--enroll-secret-file), history kept")
    else:
        found = store.forget(client_id, who, now)
        said = (f"client {client_id} forgotten by {who}: registration and history deleted; the PC enrols again "
                "as a new client with the enrolment secret")
    if not found:
        print(f"reconciler clients: no client {client_id} at this relay", file=sys.stderr)
        return 1
    log.info("%s", said)
    print(said)
    return 0


def main(args: argparse.Namespace) -> int:
    configure_logging()
    action: str = args.action
    client_id: str | None = args.id
    if action != "list" and client_id is None:
        print(f"reconciler clients {action}: give the client's ID", file=sys.stderr)
        return 2
    if client_id is not None and not names.is_client_id(client_id):
        print(f"reconciler clients: invalid client id {client_id!r}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    if not (workdir / DB_NAME).is_file():
        print(f"reconciler clients: no relay database {workdir / DB_NAME}: give the relay's --workdir",
              file=sys.stderr)
        return 2
    try:
        store = Store(workdir)
    except StoreError as e:
        print(f"reconciler clients: {e}", file=sys.stderr)
        return 2
    try:
        if action == "list":
            return _list(store, client_id, args.format)
        return _change(store, action, client_id)  # type: ignore[arg-type]
    finally:
        store.close()
