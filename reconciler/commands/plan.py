"""``reconciler plan``: what every client would do under a repo's specs (the blast radius).

An admin runs it on a pull request, against an inventory file of clients
(DESIGN section 7), before anything reaches a relay::

    reconciler plan example-repo --inventory examples/inventory.json [--format json] [--now T]

``--inventory`` may be given several times (the files are merged), and takes
a relay's published ``relays/<relay>/inventory.json`` as it is, or the
fleet's from ``reconciler status --inventory FILE``.

Each relay of the topology is planned with the engine the relays run
(:func:`reconciler.plan.plan_relay`), as if every client checked in now with
no history: a row with an action is what its next check-in would start.
Exit 0 with the plan; 1 when the specs are invalid (the errors exactly as
``reconciler validate`` prints them, on stderr); 2 when the repo, the
inventory or ``--now`` cannot be used (every problem named by its field,
e.g. ``inventory.json: clients[3].installed[0].version: expected a string``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from reconciler import names, protocol
from reconciler.commands.validate import render as render_validation
from reconciler.plan import Client, Installed, Plan, Row, index_relay, plan_relay
from reconciler.repo_tree import load_repo, repo_argument
from reconciler.report import MAX_STATUS_FILE
from reconciler.specs import Specs
from reconciler.times import parse_time, utc_now

CLIENT_FIELDS = ("id", "relay", "facts", "labels", "installed", "online", "lastContact", "software")
# One inventory file: as large as a relay's published inventory.json may be.
MAX_INVENTORY_BYTES = MAX_STATUS_FILE
MAX_ERRORS = 20


class InventoryError(Exception):
    """The inventory file cannot be used; ``problems`` name each bad field."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


# ------------------------------------------------------------------ inventory


def parse_inventory(data: Any, relays: Sequence[str], source: str = "inventory") -> tuple[Client, ...]:
    """Clients from a decoded inventory document; raises :class:`InventoryError` naming every bad field.

    A client's ``facts``, ``labels`` and ``installed`` are what its check-in
    would carry as ``facts``, ``labels`` and ``inventory``, and are checked by
    the relay's own checks (:mod:`reconciler.protocol`): what the relay would
    refuse at a check-in is refused here too.
    """
    problems: list[protocol.FieldProblem] = []

    def bad(where: str, message: str) -> None:
        problems.append(protocol.FieldProblem(where, message))

    def expect(where: str, value: Any, kind: type, what: str) -> bool:
        if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            return True
        bad(where, f"expected {what}, got {protocol.type_name(value)}")
        return False

    def failed() -> InventoryError:
        lines = [f"{source}: {problem}" for problem in problems]
        if len(lines) > MAX_ERRORS:
            lines = [*lines[:MAX_ERRORS], f"{source}: ... and {len(lines) - MAX_ERRORS} more problems"]
        return InventoryError(lines)

    if not isinstance(data, dict):
        raise InventoryError([f"{source}: expected an object {{\"clients\": [...]}}, got {protocol.type_name(data)}"])
    for key in sorted(set(data) - {"clients", "relay"}):
        bad(key, "unknown field (an inventory holds \"clients\" and, as a relay publishes it, \"relay\")")
    known_relays = set(relays)
    listed = ", ".join(sorted(known_relays)) or "none"
    # A relay's published inventory.json names its relay once, for every client in it.
    file_relay = data.get("relay")
    if file_relay is not None and expect("relay", file_relay, str, "a string") and file_relay not in known_relays:
        bad("relay", f"unknown relay {file_relay!r} (relays in the topology: {listed})")
    if not isinstance(file_relay, str):
        file_relay = None
    if "clients" not in data:
        bad("clients", "missing required field")
        raise failed()
    raw_clients = data["clients"]
    if not expect("clients", raw_clients, list, "an array"):
        raise failed()
    clients: list[Client] = []
    first_at: dict[str, int] = {}
    for index, raw in enumerate(raw_clients):
        at = f"clients[{index}]"
        if not expect(at, raw, dict, "an object"):
            continue
        before = len(problems)
        for key in sorted(set(raw) - set(CLIENT_FIELDS)):
            bad(f"{at}.{key}", f"unknown field (allowed: {', '.join(CLIENT_FIELDS)})")
        for key in ("id", "relay"):
            if key in raw:
                expect(f"{at}.{key}", raw[key], str, "a string")
            elif key == "id" or file_relay is None:
                bad(f"{at}.{key}", "missing required field")
        client_id, relay = raw.get("id"), raw.get("relay", file_relay)
        if "relay" in raw and file_relay is not None and raw["relay"] != file_relay:
            bad(f"{at}.relay", f"{raw['relay']!r} is not the file's relay {file_relay!r}")
        if isinstance(client_id, str):
            if not names.is_client_id(client_id):
                bad(f"{at}.id", f"{client_id!r} is not a valid client id "
                    "(1-63 lowercase letters, digits, '.' and '-')")
            elif client_id in first_at:
                bad(f"{at}.id", f"duplicate client id {client_id!r} (first at clients[{first_at[client_id]}])")
            else:
                first_at[client_id] = index
        if "relay" in raw and isinstance(relay, str) and relay not in known_relays:
            bad(f"{at}.relay", f"unknown relay {relay!r} (relays in the topology: {listed})")
        facts = protocol.check_facts(raw.get("facts", {}), f"{at}.facts", problems)
        labels = protocol.check_labels(raw.get("labels", {}), f"{at}.labels", problems)
        installed = protocol.check_inventory(raw.get("installed", []), f"{at}.installed", problems)
        if "software" in raw:  # the OS's software list (status --inventory writes it): checked, not planned on
            protocol.check_software(raw["software"], f"{at}.software", problems)
        online = raw.get("online", True)
        expect(f"{at}.online", online, bool, "a boolean")
        last_seen = None
        if "lastContact" in raw:
            contact = raw["lastContact"]
            last_seen = parse_time(contact) if isinstance(contact, str) and len(contact) <= 64 else None
            if last_seen is None:
                bad(f"{at}.lastContact", "expected an RFC 3339 time such as 2026-11-30T08:00:00Z")
        if len(problems) == before and isinstance(client_id, str) and isinstance(relay, str):
            clients.append(Client(
                id=client_id, relay=relay, os=facts.get("os"), arch=facts.get("arch"),
                free_disk_mb=facts.get("freeDiskMB"), labels=tuple(sorted(labels.items())),
                installed=tuple(sorted((Installed(i["name"], i["version"]) for i in installed),
                                       key=lambda i: i.name)),
                online=online, last_seen=last_seen))
    if problems:
        raise failed()
    return tuple(clients)


def read_inventory(path: Path, relays: Sequence[str], source: str | None = None) -> tuple[Client, ...]:
    """Read and check an inventory file (raises :class:`InventoryError`)."""
    name = source if source is not None else str(path)
    try:
        with path.open("rb") as stream:  # a pipe (`<(...)`) works; an endless one stops at the limit
            data = stream.read(MAX_INVENTORY_BYTES + 1)
    except OSError as e:
        raise InventoryError([f"{name}: cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_INVENTORY_BYTES:
        raise InventoryError([f"{name}: more than {MAX_INVENTORY_BYTES // (1024 * 1024)} MiB; "
                              "an inventory is at most what the relays publish"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InventoryError([f"{name}: not UTF-8 text"]) from None
    try:
        json.loads(text)  # a syntax error, named by line and column
    except json.JSONDecodeError as e:
        raise InventoryError([f"{name}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"]) from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, nesting too deep: said below
        pass
    try:  # then as the relay reads a check-in: no duplicate keys, NaN or lone surrogates
        doc = protocol.decode_json(data, "inventory")
    except protocol.ProtocolError as e:
        raise InventoryError([f"{name}: {e}"]) from None
    return parse_inventory(doc, relays, name)


def read_inventories(paths: Sequence[str], relays: Sequence[str]) -> tuple[Client, ...]:
    """Read and merge several inventory files (``--inventory`` given more than once).

    Each file is checked on its own, then a client id found in two files is
    an error naming both: a client belongs to one relay, and which of two
    reports is current cannot be told from the files.
    """
    problems: list[str] = []
    clients: list[Client] = []
    first: dict[str, tuple[str, int, str]] = {}
    given: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in given:
            problems.append(f"{path}: given twice (also as {given[real]}); each inventory is read once")
            continue
        given[real] = path
        try:
            found = read_inventory(Path(path), relays, path)
        except InventoryError as e:
            problems.extend(e.problems)
            continue
        for index, client in enumerate(found):
            seen = first.get(client.id)
            if seen is not None:
                where, at, relay = seen
                problems.append(f"{path}: clients[{index}].id: client {client.id!r} (relay {client.relay}) is also "
                                f"in {where} at clients[{at}] (relay {relay}); a client belongs to one relay")
                continue
            first[client.id] = (path, index, client.relay)
            clients.append(client)
    if problems:
        if len(problems) > MAX_ERRORS:
            problems = [*problems[:MAX_ERRORS], f"... and {len(problems) - MAX_ERRORS} more problems"]
        raise InventoryError(problems)
    return tuple(clients)


# ------------------------------------------------------------------ planning


def parse_now(text: str | None) -> datetime:
    """``--now``: an RFC 3339 time (naive means UTC); None is the current time."""
    if text is None:
        return utc_now()
    moment = parse_time(text)
    if moment is None:
        raise ValueError(f"--now: {text!r} is not an RFC 3339 time (e.g. 2027-04-01T09:00:00+09:00)")
    return moment


def plan_inventory(specs: Specs, clients: Sequence[Client], now: datetime) -> tuple[Plan, ...]:
    """Plan every relay of the topology for the inventory's clients, with no history."""
    by_relay: dict[str, list[Client]] = {}
    for client in clients:
        by_relay.setdefault(client.relay, []).append(client)
    return tuple(plan_relay(index_relay(specs, relay.name), by_relay.get(relay.name, ()), {}, now)
                 for relay in sorted(specs.topology.relays, key=lambda r: r.name))


def _acted_version(row: Row, actions: Mapping[str, str | None]) -> str | None:
    """The version a row's action works on (an uninstall's is the installed one), else the desired one."""
    if row.action is not None and row.operation_id is not None and row.operation_id in actions:
        return actions[row.operation_id]
    if row.action is not None and row.version is None:
        return row.installed_version
    return row.version


def plan_rows(plans: Sequence[Plan]) -> list[dict[str, Any]]:
    """The JSON rows, sorted by job, relay, client."""
    rows: list[dict[str, Any]] = []
    for plan in plans:
        versions = {a.operation_id: a.version for a in plan.actions}
        for row in plan.rows:
            rows.append({
                "job": row.job, "relay": row.relay, "client": row.client, "state": row.state.value,
                "action": row.action.value if row.action is not None else None,
                "package": {"name": row.name, "version": _acted_version(row, versions)},
                "message": row.message,
            })
    rows.sort(key=lambda r: (r["job"], r["relay"], r["client"]))
    return rows


def render_json(plans: Sequence[Plan]) -> str:
    return json.dumps({"rows": plan_rows(plans)}, indent=2, sort_keys=True)


def render_text(plans: Sequence[Plan], clients: Sequence[Client]) -> str:
    """One table per relay (job, client, state, action, package, message), then the job states."""
    per_relay: dict[str, int] = {}
    for client in clients:
        per_relay[client.relay] = per_relay.get(client.relay, 0) + 1
    by_plan: dict[str, list[dict[str, Any]]] = {}
    for row in plan_rows(plans):
        by_plan.setdefault(row["relay"], []).append(row)
    out: list[str] = []
    total_actions = 0
    for plan in plans:
        count = per_relay.get(plan.relay, 0)
        rows = by_plan.get(plan.relay, [])
        total_actions += len(plan.actions)
        out.append(f"relay {plan.relay}: {count} client{'s' if count != 1 else ''}, "
                   f"{len(plan.actions)} action{'s' if len(plan.actions) != 1 else ''}")
        if rows:
            table = [("JOB", "CLIENT", "STATE", "ACTION", "PACKAGE", "MESSAGE")]
            for r in rows:
                package = r["package"]["name"] + (f" {r['package']['version']}" if r["package"]["version"] else "")
                table.append((r["job"], r["client"], r["state"], r["action"] or "-", package, r["message"]))
            widths = [max(len(line[k]) for line in table) for k in range(5)]
            for line in table:
                cells = [line[k].ljust(widths[k]) for k in range(5)]
                out.append(("  " + "  ".join(cells) + "  " + line[5]).rstrip())
        if plan.jobs:
            states = ", ".join(f"{j.job} {j.state.value}" for j in plan.jobs)
            out.append(f"  jobs: {states}")
        out.append("")
    clients_acting = len({a.client for p in plans for a in p.actions})
    out.append(f"{total_actions} action{'s' if total_actions != 1 else ''} on {clients_acting} "
               f"client{'s' if clients_acting != 1 else ''}")
    return "\n".join(out)


# ------------------------------------------------------------------ command


def main(args: argparse.Namespace) -> int:
    args.repo = repo_argument(args.repo)
    try:
        result = load_repo(Path(args.repo))
    except OSError as e:
        print(f"reconciler plan: cannot read {args.repo}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not result.valid or result.specs is None:
        print(render_validation(result, "text", args.repo), file=sys.stderr)
        return 1
    specs = result.specs
    try:
        now = parse_now(args.now)
    except ValueError as e:
        print(f"reconciler plan: {e}", file=sys.stderr)
        return 2
    try:
        clients = read_inventories(args.inventory, [r.name for r in specs.topology.relays])
    except InventoryError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    plans = plan_inventory(specs, clients, now)
    print(render_json(plans) if args.format == "json" else render_text(plans, clients))
    return 0
