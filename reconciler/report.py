"""Status files: the relays' reports, HQ's aggregate of them, and summary.md.

Pure: values in, bytes out (and back). No git, network, disk or clock; the
callers (the relay loop, ``hq``, ``reconciler status``) pass the current
commit, the rows and the timestamps, and publish or print the result.

Two decisions shape it:

* **Deterministic bytes.** Keys and rows are sorted, every ``ClientState`` is
  present in every ``counts``, and the only timestamps are the ones the caller
  says changed (a row's ``updatedAt``; ``relay.yaml``'s ``updatedAt`` is the
  newest of them, never the wall clock). An unchanged fleet therefore renders
  byte-identical files, git sees no change and nobody commits. Relay
  liveness in ``relays.yaml`` follows the same rule: its state and the time
  of its last transition, never the moving time of the last heartbeat.
* **Bounded HQ reports.** ``relay.yaml`` carries, besides the fields of
  DESIGN section 5, a per-job digest (state, counts and the first
  :data:`FAILURE_LIMIT` failures). HQ aggregates those digests only, so its
  work and its files grow with relays and jobs, never with clients; the full
  rows stay in ``relays/<relay>/jobs/<job>.yaml`` for whoever wants them.
* **Read back through the schemas.** Every ``parse_*`` checks its file
  against its schema in ``schemas/`` (:mod:`reconciler.schema_check`) before
  building values, so the schema is the one definition of each file's
  shape, and a file that does not follow it is refused with the file and
  the field named (``relays/r/relay.yaml: jobs.j.counts.Failed: -1 is less
  than the minimum of 0``).
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import yaml

from reconciler import protocol, schema_check
from reconciler.errors import Cause, Problem
from reconciler.liveness import Liveness, RelayLiveness
from reconciler.plan import (
    ClientState,
    Installed,
    JobState,
    Plan,
    Reason,
    Row,
    job_state,
    parked,
)
from reconciler.reach import Reach, reach_of
from reconciler.specs import DestinationType, Job, SpecError, Specs
from reconciler.times import aware, format_time
from reconciler.times import parse_time as parse_time_text

FAILURE_LIMIT = 50
MAX_STATUS_FILE = 64 * 1024 * 1024
# Skip messages summarised per job ("6 skipped: requires os windows"): the commonest few, cut short.
SKIP_LIMIT = 5
# Distinct reasons counted per job (the schemas' maxProperties): the vocabulary is open, but not unbounded.
MAX_REASONS = 64
# Failures named per relay in summary.md's relay section.
RELAY_FAILURE_LIMIT = 3
# Lost relays named one by one at the top of summary.md (the rest are counted; all are in the relay table).
LOST_RELAY_NOTES = 5
SKIP_MESSAGE_LIMIT = 200
"""Bytes a status file read from git may hold; a relay job file of 50,000 rows is about 7 MB."""
"""Failed/Conflict rows kept per job in relay.yaml, HQ's job files and summary.md."""

LIST_LIMIT = 50
"""Names kept in other bounded lists (relays still waiting, validation errors in summary.md)."""

MESSAGE_LIMIT = 500
"""Characters of a row message kept in digests (the relay job file keeps what the relay gave)."""

STATES: tuple[ClientState, ...] = tuple(ClientState)
FAILURE_STATES = frozenset({ClientState.FAILED, ClientState.CONFLICT})
ACTIVE_STATES = frozenset({ClientState.PENDING, ClientState.IN_PROGRESS})
SCHEDULED_PREFIX = "scheduled for"

HQ_REF = "hq"
HQ_STATUS_REF = f"status/{HQ_REF}"
"""The branch HQ publishes its report on (``gitstore.STATUS_PREFIX`` + :data:`HQ_REF`); relays follow it."""
ACCEPTED_FILE = "accepted.yaml"
VALIDATION_FILE = "validation.yaml"
MANIFEST_FILE = "manifest.json"  # HQ's signed manifest of the accepted commit (reconciler.hq_manifest)
RELAYS_FILE = "relays.yaml"
MOVES_FILE = "moves.yaml"
MOVES_LIMIT = 1000  # moves a relay lists (the newest) and HQ passes on per relay
SUMMARY_FILE = "summary.md"
HQ_JOBS_DIR = "jobs/"

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ReportError(ValueError):
    """A status file is missing, unreadable or not in the expected shape."""


# ------------------------------------------------------------------ values


@dataclass(frozen=True)
class InventoryEntry:
    """One client as last reported, for inventory.json."""

    id: str
    facts: Mapping[str, str | int]
    labels: Mapping[str, str]
    installed: tuple[Installed, ...]
    online: bool
    last_contact: datetime | None = None  # published for offline clients only (it would change every check-in)
    # The OS's software list: only in the fleet inventory of `status --inventory` (relays publish software.json)
    software: tuple[protocol.SoftwareEntry, ...] | None = None


@dataclass(frozen=True)
class StatusRow:
    """One (job, client) row as published by a relay."""

    client: str
    state: ClientState
    installed_version: str | None
    attempts: int
    message: str
    updated_at: datetime | None = None
    reason: str | None = None  # the plan's Reason: filter on it, never parse the message


@dataclass(frozen=True)
class RelayJobStatus:
    """One job on one relay: its state, counts, and rows (all, or the first failures)."""

    job: str
    state: JobState
    counts: Mapping[str, int]
    rows: tuple[StatusRow, ...] = ()  # relays/<r>/jobs/<job>.yaml: every row; relay.yaml digest: first failures
    pending: Mapping[str, int] = field(default_factory=dict)  # digest: Pending rows by reason
    skipped: tuple[tuple[str, int], ...] = ()  # digest: the commonest skip messages, with their counts
    # digest of a clients job: the named clients registered at the relay (None: a relay that does not say)
    named: tuple[str, ...] | None = None
    reboot_required: int = 0  # Succeeded rows whose client waits for a reboot (reason rebootRequired)


@dataclass(frozen=True, order=True)
class Move:
    """A client that moved between relays: ``relay`` is where it came from (movedIn) or went (moves.yaml)."""

    client: str
    relay: str
    at: datetime


@dataclass(frozen=True)
class RelayStatus:
    """What HQ aggregates from one ``status/<relay>`` ref (relay.yaml)."""

    relay: str
    observed_commit: str | None
    clients: int
    updated_at: datetime | None
    errors: tuple[str, ...]
    jobs: Mapping[str, RelayJobStatus]  # digest: rows are the first FAILURE_LIMIT failures
    moved_in: tuple[Move, ...] = ()  # clients that said they came from another relay (relay: that one)
    moved_away: int = 0  # clients HQ says moved to another relay, no longer counted here
    retired: int = 0  # clients not heard from for the retention period, no longer counted
    clients_online: int | None = None  # None: a relay that does not say (older than these fields)
    clients_offline: int | None = None


@dataclass(frozen=True)
class EvaluationError:
    """A commit of the branch HQ tried to evaluate and could not (a read failure or a bug, not a spec error).

    HQ retries it; until then ``mainCommit``/``mainValid`` still describe the
    last commit it did evaluate, so this commit is never shown as valid.
    """

    commit: str
    message: str
    reason: str = field(default="internal", compare=False)  # a reconciler.errors.Cause value


@dataclass(frozen=True)
class Accepted:
    accepted_commit: str | None
    accepted_at: datetime | None
    main_commit: str | None  # the newest commit HQ finished evaluating
    main_valid: bool | None
    evaluation_error: EvaluationError | None = None  # a commit of the branch HQ could not evaluate (it retries)


@dataclass(frozen=True)
class Failure:
    job: str
    relay: str
    client: str
    state: ClientState
    installed_version: str | None
    attempts: int
    message: str


@dataclass(frozen=True)
class DestinationReport:
    """A job on one destination relay, covering its whole subtree."""

    relay: str
    relays: tuple[str, ...]  # the subtree: the relay and every relay below it
    state: JobState
    counts: Mapping[str, int]
    waiting_for: tuple[str, ...] = ()  # relays of the subtree without status for the accepted commit (bounded)
    waiting_count: int = 0
    reboot_required: int = 0  # Succeeded rows of the subtree whose client waits for a reboot


@dataclass(frozen=True)
class JobReport:
    job: str
    job_type: str
    package: str
    version: str | None
    destination_type: str
    destinations: tuple[str, ...]
    state: JobState
    counts: Mapping[str, int]
    relays: tuple[DestinationReport, ...]
    failures: tuple[Failure, ...]  # first FAILURE_LIMIT by (relay, client)
    failure_count: int
    waiting_for: tuple[str, ...] = ()  # bounded
    waiting_count: int = 0
    scheduled_for: datetime | None = None  # the job's notBefore while it is Scheduled
    pending: Mapping[str, int] = field(default_factory=dict)  # Pending rows by reason, all relays
    skipped: tuple[tuple[str, int], ...] = ()  # the commonest skip messages, all relays
    not_registered: tuple[str, ...] = ()  # client ids the job names that no relay knows (bounded)
    not_registered_count: int = 0
    reboot_required: int = 0  # Succeeded rows whose client waits for a reboot, all relays

    @property
    def clients(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class RelayReport:
    """One relay of the topology as HQ last saw its ref."""

    relay: str
    parent: str
    reported: bool
    observed_commit: str | None
    current: bool  # observed_commit is the accepted commit
    clients: int
    updated_at: datetime | None
    errors: tuple[str, ...]
    failed: int = 0  # Failed and Conflict rows over every job
    clients_online: int | None = None  # as the relay last published them (None: it does not say)
    clients_offline: int | None = None
    liveness: RelayLiveness | None = None  # HQ's judgement of its heartbeats (None: HQ receives none)
    moved_away: int = 0  # clients that moved to another relay (counted there)
    retired: int = 0  # clients not heard from for the retention period (counted nowhere)


@dataclass(frozen=True)
class HqReport:
    """Everything on ``status/hq``."""

    branch: str
    accepted: Accepted
    validation_errors: tuple[SpecError, ...]
    jobs: tuple[JobReport, ...]
    relays: tuple[RelayReport, ...]
    # relay -> the clients that left it for another relay (Move.relay: where to); moves.yaml
    moves: Mapping[str, tuple[Move, ...]] = field(default_factory=dict)


# ------------------------------------------------------------- small helpers


def parse_time(text: Any) -> datetime | None:
    """A status file's time field: None when absent, a :class:`ReportError` when not RFC 3339."""
    if text is None or text == "":
        return None
    if isinstance(text, datetime):
        return aware(text)
    moment = parse_time_text(text) if isinstance(text, str) else None
    if moment is None:
        raise ReportError(f"expected an RFC 3339 time, got {text!r}")
    return moment


def zero_counts() -> dict[str, int]:
    return {state.value: 0 for state in STATES}


def count_states(states: Iterable[ClientState | str]) -> dict[str, int]:
    counts = zero_counts()
    for state in states:
        counts[ClientState(state).value] += 1
    return counts


def add_counts(total: dict[str, int], more: Mapping[str, int]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + int(value)


# Pending rows that only time, a commit or the client's return moves.
_SETTLED_REASONS = frozenset({Reason.SCHEDULED.value, Reason.HALTED.value, Reason.CLIENT_OFFLINE.value})


def is_waiting_row(state: ClientState | str, message: str, reason: str | None = None) -> bool:
    """Pending/InProgress and bound to move without a new commit.

    A row waiting for a future schedule, held by a Halted job or waiting
    for an offline client is settled: only time, a commit (a rerun) or the
    client's return moves it. Decided by the row's reason;
    only a row of a relay that writes none (an older version) is judged by
    its message.
    """
    if ClientState(state) not in ACTIVE_STATES:
        return False
    if reason is not None:
        return reason not in _SETTLED_REASONS
    return not message.startswith(SCHEDULED_PREFIX)


def _cut(message: str, limit: int = MESSAGE_LIMIT) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def dump_yaml(data: Mapping[str, Any]) -> bytes:
    """A status file's YAML: block mappings with sorted keys, list items one per line as JSON flow values.

    Written directly rather than through PyYAML's representer, which spent a
    second on HQ's 2,500 job files of a large fleet; the C JSON encoder
    writes each list item (a relay's roll-up, a failure) on one line, which
    also keeps a change to one of them a one-line diff. Strings that could
    read as anything but themselves are double-quoted with JSON escapes, and
    every character YAML reads differently from JSON is escaped, so any YAML
    reader gets back exactly ``data``.
    """
    out: list[str] = []
    _emit_mapping(data, "", out)
    return "".join(out).encode("utf-8")


def _emit_mapping(data: Mapping[str, Any], indent: str, out: list[str]) -> None:
    for key in sorted(data):
        value = data[key]
        name = _yaml_scalar(key)
        if isinstance(value, Mapping):
            if not value:
                out.append(f"{indent}{name}: {{}}\n")
            else:
                out.append(f"{indent}{name}:\n")
                _emit_mapping(value, indent + "  ", out)
        elif isinstance(value, (list, tuple)):
            if not value:
                out.append(f"{indent}{name}: []\n")
            else:
                out.append(f"{indent}{name}:\n")
                out.extend(f"{indent}- {_yaml_flow(item)}\n" for item in value)
        else:
            out.append(f"{indent}{name}: {_yaml_scalar(value)}\n")


_YAML_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = frozenset(form for word in ("yes", "no", "true", "false", "on", "off", "null", "y", "n")
                        for form in (word, word.title(), word.upper()))


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str) and _YAML_PLAIN.fullmatch(value) and value not in _YAML_WORDS:
        return value
    return _yaml_flow(value)


def _yaml_flow(value: Any) -> str:
    """``value`` as a JSON text that any YAML reader reads back as ``value``."""
    return _YAML_UNSAFE.sub(_escape_char, json.dumps(value, sort_keys=True, ensure_ascii=False))


_Parse = TypeVar("_Parse", bound=Callable[..., Any])


def _reading(name: str) -> Callable[[_Parse], _Parse]:
    """Make any failure of a status-file reader a :class:`ReportError`: a file a relay wrote is input, never a crash.

    The schema checks come first and name the field; this catches what a
    hostile file could still provoke past them (a value too large to
    convert, nesting too deep), so one relay's file never stops HQ.
    """
    def wrap(parse: _Parse) -> _Parse:
        @functools.wraps(parse)
        def reader(*args: Any, **kwargs: Any) -> Any:
            try:
                return parse(*args, **kwargs)
            except ReportError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
                    OverflowError) as e:
                raise ReportError(f"{name}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
        return reader  # type: ignore[return-value]
    return wrap


def load_yaml(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_STATUS_FILE:
        raise ReportError(f"{what}: {len(data)} bytes, more than a status file may hold ({MAX_STATUS_FILE})")
    dumped = load_dumped(data)
    if dumped is not None:  # dump_yaml's own layout: read line by line, JSON values through the C decoder
        return dumped
    try:
        value = yaml.load(data.decode("utf-8"), Loader=_Loader)
    except (UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError, OverflowError) as e:
        # ValueError: an integer of thousands of digits; RecursionError: nesting too deep to build
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ReportError(f"{what}: not readable YAML: {text}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{what}: expected a mapping")
    _refuse_aliases(value, what)
    return value


class _NotDumped(Exception):
    """The text is not laid out as :func:`dump_yaml` writes it (read it as YAML)."""


# A line :func:`load_dumped` cannot be sure YAML reads as JSON does: a control character (tab, CR), a
# character YAML breaks lines at or refuses, or an escaped surrogate (JSON pairs them, YAML does not).
_NOT_DUMPED_TEXT = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                              "\u2066-\u2069\ud800-\udfff\ufeff\ufffe\uffff]|\\\\u[dD][89abAB]")
_DUMPED_KEY = re.compile(r'([A-Za-z][A-Za-z0-9_./-]*|"(?:[^"\\]|\\.)*"):(?: (.*))?')


def load_dumped(data: bytes) -> dict[str, Any] | None:
    """``data`` read as the mapping :func:`dump_yaml` wrote, when it is laid out exactly so; else None.

    That layout is block mappings indented by two, list items as ``- `` and
    one JSON value a line, and every other value a plain word or a JSON
    text. Read line by line, each JSON text through the C JSON decoder, it
    takes a fraction of the time PyYAML's constructor does (HQ reads one
    ``relay.yaml`` per relay). Whatever YAML might read differently from
    JSON sends the whole file back to the YAML reader (None): a number with
    an exponent (a string to YAML 1.1), a word YAML reads as a boolean or
    null, a tab, a comment, an anchor, a key given twice, any other
    indentation. So the result is always what ``yaml.safe_load`` gives.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n") or _NOT_DUMPED_TEXT.search(text):
        return None
    lines = text[:-1].split("\n")
    try:
        value, end = _dumped_mapping(lines, 0, 0)
    except (_NotDumped, ValueError, RecursionError):
        return None
    return value if end == len(lines) and value else None


def _dumped_mapping(lines: list[str], at: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    prefix, item = " " * indent, " " * indent + "- "
    while at < len(lines):
        line = lines[at]
        body = line[indent:]
        if not line.startswith(prefix) or body.startswith(" "):
            if len(line) - len(line.lstrip(" ")) < indent and line.strip():
                break  # the end of this mapping
            raise _NotDumped
        match = _DUMPED_KEY.fullmatch(body)
        if match is None:
            raise _NotDumped
        key = _dumped_word(match.group(1)) if not match.group(1).startswith('"') else _dumped_json(match.group(1))
        if not isinstance(key, str) or key in out:
            raise _NotDumped
        at += 1
        rest = match.group(2)
        value: Any
        if rest is not None:
            value = _dumped_word(rest) if _YAML_PLAIN.fullmatch(rest) or rest in ("null", "true", "false") \
                else _dumped_json(rest)
        elif at < len(lines) and lines[at].startswith(item):
            items: list[Any] = []
            while at < len(lines) and lines[at].startswith(item):
                items.append(_dumped_json(lines[at][len(item):]))
                at += 1
            value = items
        elif at < len(lines) and lines[at].startswith(prefix + "  ") and lines[at][indent + 2:indent + 3] != " ":
            value, at = _dumped_mapping(lines, at, indent + 2)
        else:
            raise _NotDumped  # "key:" with nothing under it is null to YAML; dump_yaml never writes it
        out[key] = value
    return out, at


def _dumped_word(word: str) -> Any:
    if word in ("null", "true", "false"):
        return {"null": None, "true": True, "false": False}[word]
    if word in _YAML_WORDS:
        raise _NotDumped
    return word


def _dumped_float(text: str) -> float:
    if "e" in text or "E" in text:
        raise _NotDumped  # 1e3 is a number to JSON and a string to YAML 1.1
    return float(text)


def _not_json(text: str) -> Any:
    raise _NotDumped  # NaN, Infinity


_DUMPED_JSON = json.JSONDecoder(parse_float=_dumped_float, parse_constant=_not_json)


def _dumped_json(text: str) -> Any:
    if text.isdigit() and text.isascii() and (text[0] != "0" or text == "0"):
        return int(text)  # the counts: most values of a relay.yaml
    if text.startswith(" "):
        raise _NotDumped
    return _DUMPED_JSON.decode(text)


def _refuse_aliases(value: Any, what: str) -> None:
    """A status file's YAML never uses anchors and aliases (our writer emits none); refuse one that does.

    An alias makes one node appear many times: ten nested aliases of ten
    items make 10^10 items for anything that walks the value (a schema
    check, a message), however small the file. The walk here visits each
    node once and stops at the first one seen twice.
    """
    seen: set[int] = set()
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                raise ReportError(f"{what}: uses YAML anchors and aliases, which status files never do")
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)


def _checked(doc: Mapping[str, Any], schema: str, what: str) -> dict[str, Any]:
    """``doc`` if it follows ``schemas/<schema>.schema.json``, else a :class:`ReportError` naming the file and field."""
    problem = schema_check.problem(schema, doc)
    if problem is not None:
        raise ReportError(f"{what}: {problem}")
    return dict(doc)


def _counts(counts: Mapping[str, int]) -> dict[str, int]:
    """A schema-checked ``counts``: every state, in :data:`STATES` order."""
    return {state.value: int(counts[state.value]) for state in STATES}


def _time(text: str | None, what: str) -> datetime | None:
    """A schema-checked time field (the schema's pattern still lets ``2026-13-45...`` through)."""
    try:
        return parse_time(text)
    except ReportError as e:
        raise ReportError(f"{what}: {e}") from None


# ------------------------------------------------------------ relay status


def relay_prefix(relay: str) -> str:
    return f"relays/{relay}/"


def reboots_waiting(rows: Iterable[StatusRow | Row]) -> int:
    """How many rows are Succeeded with reason ``rebootRequired``: clients waiting for a reboot."""
    return sum(1 for r in rows if r.reason == Reason.REBOOT_REQUIRED.value)


def _reboot_field(count: int) -> dict[str, int]:
    """``rebootRequired`` of a status file: written only when a client waits (files stay byte-stable)."""
    return {"rebootRequired": count} if count else {}


def _row_json(row: StatusRow) -> dict[str, Any]:
    out = {
        "client": row.client,
        "state": row.state.value,
        "installedVersion": row.installed_version,
        "attempts": row.attempts,
        "message": row.message,
        "updatedAt": format_time(row.updated_at),
    }
    if row.reason is not None:
        out["reason"] = row.reason
    return out


def render_relay_job(job: str, relay: str, state: JobState, counts: Mapping[str, int],
                     rows: Sequence[StatusRow], reboot_required: int = 0) -> bytes:
    """A relay's job file: a small YAML head, then one row per line as a JSON object.

    A row is a YAML flow mapping written by the C JSON encoder, with every
    character YAML reads differently from JSON escaped (C1 controls, line and
    paragraph separators, non-characters), which keeps a 10,000-client file a
    few milliseconds of work and a change to one client a one-line diff; the
    whole file is still one YAML document for any YAML reader and the schema.
    """
    return _job_head(job, relay, state, counts, reboot_required, bool(rows)) + _row_lines(rows)


def _job_head(job: str, relay: str, state: JobState, counts: Mapping[str, int],
              reboot_required: int, has_rows: bool) -> bytes:
    """A job file's head. It names no commit: ``relay.yaml`` in the same tree does, so a job whose rows
    did not change keeps its file byte for byte across commits (no new blob to hash, store and push)."""
    head = dump_yaml({"counts": dict(counts), "job": job, "relay": relay,
                      "state": state.value, **_reboot_field(reboot_required)})
    return head + (b"rows:\n" if has_rows else b"rows: []\n")


# What JSON leaves raw but a YAML reader refuses, or folds as a line break; and the bidi controls,
# which reorder what a terminal or a diff shows (``cat``, ``git show`` of a status file). Escaped, so
# a reader still gets the text back exactly.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff\ufffe\uffff]")


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_json_text(text: str) -> str:
    """JSON text (``json.dumps(..., ensure_ascii=False)``) with the C1, bidi and other characters a
    terminal would act on written as ``\\u`` escapes: the same JSON value, inert on a screen."""
    return _YAML_UNSAFE.sub(_escape_char, text)


class RowTimes(Mapping[tuple[str, str], datetime]):
    """When each row last changed state, (job, client) -> time, held per job (job -> client -> time).

    A relay of 50,000 clients and six jobs has 300,000 rows: one dict per
    job keyed by the client id the rows already hold took 11 MB there
    (tracemalloc), one dict keyed by a (job, client) tuple made per row 26 MB.
    """

    __slots__ = ("by_job",)

    def __init__(self, by_job: dict[str, dict[str, datetime]] | None = None) -> None:
        self.by_job: dict[str, dict[str, datetime]] = {} if by_job is None else by_job

    def __getitem__(self, key: tuple[str, str]) -> datetime:
        return self.by_job[key[0]][key[1]]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((job, client) for job, times in self.by_job.items() for client in times)

    def __len__(self) -> int:
        return sum(len(times) for times in self.by_job.values())


def _times_by_job(updated_at: Mapping[tuple[str, str], datetime]) -> dict[str, dict[str, datetime]]:
    if isinstance(updated_at, RowTimes):
        return updated_at.by_job
    by_job: dict[str, dict[str, datetime]] = {}
    for (job, client), at in updated_at.items():
        by_job.setdefault(job, {})[client] = at
    return by_job


def _status_rows(rows: Iterable[Row], times: Mapping[str, datetime]) -> list[StatusRow]:
    """One job's rows as status rows, sorted by client; ``times``: client -> when its row last changed."""
    return sorted(
        (StatusRow(r.client, ClientState(r.state), r.installed_version, r.attempts, r.message,
                   times.get(r.client), r.reason.value if r.reason is not None else None)
         for r in rows),
        key=lambda r: r.client,
    )


def render_relay_status(relay: str, observed_commit: str | None, plan: Plan | None,
                        updated_at: Mapping[tuple[str, str], datetime],
                        inventory: Sequence[InventoryEntry], errors: Sequence[str],
                        unplannable: Iterable[str] = (), problems: Sequence[Problem] = (),
                        named_jobs: Iterable[str] = (), moved_in: Sequence[Move] = (),
                        moved_away: Sequence[Move] = (),
                        retired: Sequence[tuple[str, datetime]] = (),
                        job_cache: JobCache | None = None,
                        detail: RelayDetail | None = None) -> dict[str, bytes]:
    """The files of ``status/<relay>``: relay.yaml, jobs/<job>.yaml per job reaching the relay, inventory.json.

    ``updated_at`` maps (job, client) to when that row's state last changed;
    relay.yaml's ``updatedAt`` is the newest of them (None without rows), so
    unchanged input gives byte-identical output. ``plan`` None (the relay could
    not plan, e.g. before HQ accepted a commit) writes no job files. Jobs in
    ``unplannable`` (the relay left them out because planning them failed;
    ``errors`` says why) are ``Invalid`` here, with no rows. ``problems`` are
    the same failures for machines: kind (stalled, waiting, transient),
    reason and message each. ``named_jobs`` are the jobs that name their
    clients: their digests list the named clients this relay has, so HQ can
    tell which named clients no relay knows. ``inventory`` holds the clients
    the relay counts; ``moved_in`` (clients that came from another relay,
    the newest :data:`MOVES_LIMIT`), ``moved_away`` (clients HQ says went to
    another relay) and ``retired`` ((client, last contact) not heard from
    for the retention period) are listed only when there are any, so a
    fleet without moves keeps its files byte for byte.

    ``job_cache`` (job -> the key of its rows and what they rendered to,
    :class:`CachedJob`), kept by the caller between calls, spares
    re-rendering a job whose rows did not change: a commit that adds one job
    renders one job's rows (the others keep their files, head included, unless
    their state moved).
    ``detail`` (:func:`relay_detail`), when given, is the per-client part
    published instead of one rendered from ``inventory``: ``inventory.json``
    and the client counts, refreshed by the caller at its own cadence.
    """
    prefix = relay_prefix(relay)
    named = set(named_jobs)
    files: dict[str, bytes] = {}
    digests: dict[str, Any] = {}
    newest: datetime | None = None
    if plan is not None:
        by_job: dict[str, list[Row]] = {}
        for rollup in plan.jobs:
            by_job.setdefault(rollup.job, [])
        for row in plan.rows:
            by_job.setdefault(row.job, []).append(row)
        states = {rollup.job: JobState(rollup.state) for rollup in plan.jobs}
        for job in unplannable:
            by_job.setdefault(job, [])
            states[job] = JobState.INVALID
        times_by_job = _times_by_job(updated_at)
        for job in sorted(by_job):
            job_rows = by_job[job]
            times = times_by_job.get(job, {})
            key = hash((tuple(job_rows), tuple(times.get(r.client) for r in job_rows)))
            cached = job_cache.get(job) if job_cache is not None else None
            if cached is not None and cached.key == key:
                part, body = cached.part, None
            else:
                status_rows = _status_rows(job_rows, times)
                part, body = _job_part(status_rows), _row_lines(status_rows)
            state = states.get(job) or job_state(part.counts)
            if part.newest is not None:
                newest = part.newest if newest is None or part.newest > newest else newest
            head = _job_head(job, relay, state, part.counts, part.reboots, bool(job_rows))
            if body is not None:
                data = head + body
            else:
                assert cached is not None  # the rows are the cached file's: only its head may differ
                data = cached.file if cached.head == len(head) and cached.file.startswith(head) \
                    else head + cached.file[cached.head:]
            if job_cache is not None:
                job_cache[job] = CachedJob(key, part, data, len(head))
            files[f"{prefix}jobs/{job}.yaml"] = data
            digests[job] = {
                "state": state.value,
                "counts": dict(part.counts),
                "failures": list(part.failures),
                **part.why,
                **_reboot_field(part.reboots),
            }
            if job in named:
                digests[job]["named"] = part.clients.split("\n") if part.clients else []
        if job_cache is not None:
            for gone in set(job_cache) - set(by_job):
                del job_cache[gone]
    if detail is None:
        detail = relay_detail(relay, inventory)
    relay_doc: dict[str, Any] = {
        "relay": relay,
        "observedCommit": observed_commit,
        "clients": detail.clients,
        "clientsOnline": detail.online,
        "clientsOffline": detail.clients - detail.online,
        "updatedAt": format_time(newest),
        "errors": [_cut(e) for e in errors],
        "problems": [{**p.to_dict(), "message": _cut(p.message)} for p in problems],
        "jobs": digests,
    }
    if moved_in:
        newest_moves = sorted(moved_in, key=lambda m: (m.at, m.client), reverse=True)[:MOVES_LIMIT]
        # Rounded up to the second: the old relay compares it with the client's last check-in there,
        # which came before it, and must still find it earlier.
        relay_doc["movedIn"] = [{"client": m.client, "from": m.relay, "at": format_time(_second_up(m.at))}
                                for m in sorted(newest_moves)]
    if moved_away:
        shown = sorted(moved_away)[:LIST_LIMIT]
        relay_doc["movedAway"] = {"count": len(moved_away), "clients": [
            {"client": m.client, "to": m.relay, "at": format_time(m.at)} for m in shown]}
    if retired:
        relay_doc["retired"] = {"count": len(retired), "clients": [
            {"client": c, "lastContact": format_time(t)} for c, t in sorted(retired)[:LIST_LIMIT]]}
    files[f"{prefix}relay.yaml"] = dump_yaml(relay_doc)
    files[f"{prefix}inventory.json"] = detail.inventory
    return files


@dataclass(frozen=True)
class RelayDetail:
    """The per-client part of a relay's status: ``inventory.json`` and the client counts it implies."""

    clients: int
    online: int
    inventory: bytes


def relay_detail(relay: str, inventory: Sequence[InventoryEntry]) -> RelayDetail:
    """``inventory.json`` of ``inventory`` (the clients the relay counts), with its counts."""
    clients = (_inventory_json(entry) for entry in sorted(inventory, key=lambda e: e.id))
    return RelayDetail(len(inventory), sum(1 for entry in inventory if entry.online),
                       _inventory_document(clients, {"relay": relay}))


@dataclass(frozen=True)
class JobPart:
    """What a job's rows on one relay render to, apart from the file's head (which names the commit)."""

    counts: Mapping[str, int]
    failures: tuple[Mapping[str, Any], ...]
    why: Mapping[str, Any]
    reboots: int
    # The clients with rows, sorted, one per line: one string rather than one per client, which a relay
    # keeps between passes and which would pin the memory of the pass around them (client ids hold no newline).
    clients: str
    newest: datetime | None  # the latest row update


@dataclass(frozen=True)
class CachedJob:
    """A job file as last rendered: the key of its rows, their digest, the file, and its head's length."""

    key: int
    part: JobPart
    file: bytes
    head: int


JobCache = dict[str, CachedJob]
"""Per job: the job file as last rendered (:func:`render_relay_status`'s ``job_cache``)."""


_CLIENT_MARK = "client-placeholder"


def _row_lines(rows: Sequence[StatusRow]) -> bytes:
    """The rows lines of a job file, byte for byte what ``_yaml_flow(_row_json(row))`` gives each row.

    Rows differ mostly in their client: each distinct rest of a row is
    encoded once, and the client spliced in where the sorted keys put it
    (second, after the integer ``attempts``, so the first occurrence of the
    mark is the client's).
    """
    templates: dict[tuple[Any, ...], tuple[str, str]] = {}
    out: list[str] = []
    for row in rows:
        key = (row.attempts, row.installed_version, row.message, row.reason, row.state, row.updated_at)
        template = templates.get(key)
        if template is None:
            text = _yaml_flow(_row_json(replace(row, client=_CLIENT_MARK)))
            head, _, tail = text.partition(json.dumps(_CLIENT_MARK))
            template = templates[key] = (f"- {head}", f"{tail}\n")
        out.append(template[0] + _yaml_flow(row.client) + template[1])
    return "".join(out).encode("utf-8")


def _job_part(rows: Sequence[StatusRow]) -> JobPart:
    newest: datetime | None = None
    for r in rows:
        if r.updated_at is not None:
            stamp = r.updated_at if r.updated_at.tzinfo else r.updated_at.replace(tzinfo=timezone.utc)
            newest = stamp if newest is None or stamp > newest else newest
    failures = [r for r in rows if r.state in FAILURE_STATES][:FAILURE_LIMIT]
    return JobPart(
        counts=count_states(r.state for r in rows),
        failures=tuple({**_row_json(r), "message": _cut(r.message)} for r in failures),
        why=_why(rows), reboots=reboots_waiting(rows), clients="\n".join(sorted({r.client for r in rows})),
        newest=newest)


def _second_up(moment: datetime) -> datetime:
    return moment if not moment.microsecond else moment.replace(microsecond=0) + timedelta(seconds=1)


def _inventory_json(entry: InventoryEntry, relay: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": entry.id,
        "facts": dict(sorted(entry.facts.items())),
        "labels": dict(sorted(entry.labels.items())),
        "installed": [{"name": i.name, "version": i.version,
                       **({"source": i.source} if i.source != "reconciler" else {})}
                      for i in sorted(entry.installed, key=lambda i: (i.name, i.version))],
        "online": entry.online,
    }
    if not entry.online and entry.last_contact is not None:
        doc["lastContact"] = format_time(entry.last_contact)
    if entry.software is not None:
        doc["software"] = [dict(e) for e in entry.software]
    if relay is not None:
        doc["relay"] = relay
    return doc


def _inventory_document(clients: Iterable[Mapping[str, Any]], extra: Mapping[str, Any]) -> bytes:
    """``{"clients": [...], ...extra}`` with one client per line, in UTF-8.

    A change to one client is a one-line diff, and the C JSON encoder (not
    used with ``indent=``) keeps it fast for large relays. Control and bidi
    characters a JSON encoder leaves raw are written as ``\\u`` escapes.
    The clients are taken one at a time and each line is written as it is
    encoded: at 50,000 clients the file is 17 MB, and only it is held whole.
    """
    out = io.BytesIO()
    out.write(b'{"clients": [')
    separator = b"\n"
    for client in clients:
        out.write(separator)
        out.write(_yaml_flow(client).encode("utf-8"))  # JSON, with C1 and bidi controls escaped
        separator = b",\n"
    out.write(b"]" if separator == b"\n" else b"\n]")
    out.write("".join(f", {json.dumps(key)}: {_yaml_flow(value)}" for key, value in extra.items()).encode("utf-8"))
    out.write(b"}\n")
    return out.getvalue()


def _published_json(data: bytes, path: str, schema: str, name: str) -> dict[str, Any]:
    """A relay's published JSON status file, checked against ``schemas/<schema>.schema.json`` and its path
    (``relays/<relay>/<name>`` of the relay it names); :class:`ReportError` naming the file and field."""
    if len(data) > MAX_STATUS_FILE:
        raise ReportError(f"{path}: {len(data)} bytes, more than a status file may hold ({MAX_STATUS_FILE})")
    try:
        value = protocol.decode_json(data, path)
    except protocol.ProtocolError as e:
        raise ReportError(str(e)) from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected an object")
    doc: dict[str, Any] = _checked(value, schema, path)
    if path != f"{relay_prefix(doc['relay'])}{name}":
        raise ReportError(f"{path}: names relay {doc['relay']!r}")
    return doc


@_reading("inventory.json")
def parse_relay_inventory(data: bytes, path: str) -> tuple[str, tuple[InventoryEntry, ...]]:
    """A relay's published ``relays/<relay>/inventory.json``: its relay and clients.

    Raises :class:`ReportError` when it is not JSON, does not follow
    ``schemas/status-inventory.schema.json`` or names another relay than its path.
    """
    doc = _published_json(data, path, "status-inventory", "inventory.json")
    relay = doc["relay"]
    # What a relay would refuse at a check-in, and `plan --inventory` refuses, is refused here too.
    problems: list[protocol.FieldProblem] = []
    for i, c in enumerate(doc["clients"]):
        protocol.check_facts(c["facts"], f"clients[{i}].facts", problems)
        protocol.check_labels(c["labels"], f"clients[{i}].labels", problems)
        protocol.check_inventory(c["installed"], f"clients[{i}].installed", problems)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ReportError(f"{path}: {problems[0]}{more}")
    return relay, tuple(
        InventoryEntry(id=c["id"], facts=c["facts"], labels=c["labels"], online=c["online"],
                       installed=tuple(Installed(i["name"], i["version"], i.get("source", "reconciler"))
                                       for i in c["installed"]),
                       last_contact=_time(c.get("lastContact"), path))
        for c in doc["clients"])


def render_fleet_inventory(clients: Sequence[tuple[str, InventoryEntry]]) -> str:
    """The fleet's inventory, (relay, client) pairs as ``reconciler plan --inventory`` reads it."""
    return _inventory_document((_inventory_json(entry, relay)
                                for relay, entry in sorted(clients, key=lambda c: (c[0], c[1].id))), {}).decode("utf-8")


# ------------------------------------------------------------ software inventory

SOFTWARE_FILE = "software.json"


@dataclass(frozen=True)
class SoftwareHolder:
    """One (name, version, source) of a relay's software.json and the clients that have it."""

    name: str
    version: str
    source: str
    clients: tuple[str, ...]


@dataclass(frozen=True)
class RelaySoftware:
    """A relay's published software inventory."""

    relay: str
    clients: tuple[str, ...]  # the clients whose list the relay holds
    omitted: Mapping[str, int]  # client -> entries its agent cut from its list
    holders: tuple[SoftwareHolder, ...]

    def lists(self) -> dict[str, tuple[protocol.SoftwareEntry, ...]]:
        """Client -> its software list, as its check-in carried it (sorted)."""
        out: dict[str, list[protocol.SoftwareEntry]] = {c: [] for c in self.clients}
        for h in self.holders:
            for c in h.clients:
                out[c].append({"name": h.name, "version": h.version, "source": h.source})
        return {c: tuple(sorted(entries, key=lambda e: (e["name"].lower(), e["name"], e["version"], e["source"])))
                for c, entries in out.items()}


def render_relay_software(relay: str, lists: Mapping[str, tuple[Sequence[tuple[str, str, str]], int]]) -> bytes:
    """``relays/<relay>/software.json``: who has which software, compact (``schemas/status-software.schema.json``).

    ``lists`` maps client -> (its (name, version, source) entries, how many
    its agent cut). Clients are listed once, sorted; each (name, source) is
    one line, its versions name their clients by index into that list, as
    ``clients`` or, when most clients have it, as ``allBut`` (the others):
    a fleet where every PC has the same 300 packages costs 300 short lines
    plus the client ids, whatever its size.
    """
    clients = sorted(lists)
    index = {c: i for i, c in enumerate(clients)}
    groups: dict[tuple[tuple[str, str, str], ...], list[int]] = {}  # clients with the same list, walked once
    for client in clients:
        groups.setdefault(tuple(lists[client][0]), []).append(index[client])
    holders: dict[tuple[str, str], dict[str, list[int]]] = {}
    for entries, members in groups.items():
        for name, version, source in set(entries):  # an entry listed twice holds its client once
            holders.setdefault((name, source), {}).setdefault(version, []).extend(members)
    lines = []
    everyone = len(clients)
    all_indices = frozenset(range(everyone))
    for (name, source) in sorted(holders, key=lambda k: (k[0].lower(), k[0], k[1])):
        versions: dict[str, Any] = {}
        for version, have in sorted(holders[(name, source)].items()):
            if len(have) == everyone:  # every client: nothing to compute (each index appears once)
                versions[version] = {"allBut": []}
            elif len(have) * 2 > everyone:
                versions[version] = {"allBut": sorted(all_indices.difference(have))}
            else:
                versions[version] = {"clients": sorted(have)}
        lines.append(_yaml_flow({"name": name, "source": source, "versions": versions}))
    omitted = {c: lists[c][1] for c in clients if lists[c][1]}
    head = f'{{"relay": {_yaml_flow(relay)}, "clients": {_yaml_flow(clients)}, "omitted": {_yaml_flow(omitted)}'
    body = ",\n".join(lines)
    return (f'{head}, "software": [\n{body}\n]}}\n' if lines else f'{head}, "software": []}}\n').encode("utf-8")


@_reading("software.json")
def parse_relay_software(data: bytes, path: str) -> RelaySoftware:
    """A relay's published ``relays/<relay>/software.json``; :class:`ReportError` naming the file and field."""
    doc = _published_json(data, path, "status-software", SOFTWARE_FILE)
    relay = doc["relay"]
    clients = tuple(doc["clients"])
    if len(set(clients)) != len(clients):
        raise ReportError(f"{path}: clients: lists a client twice")
    for client in doc["omitted"]:
        if client not in set(clients):
            raise ReportError(f"{path}: omitted.{client[:64]}: not one of its clients")
    holders: list[SoftwareHolder] = []
    everyone = frozenset(range(len(clients)))
    for i, item in enumerate(doc["software"]):
        for key, text in (("name", item["name"]), *((f"versions.{v[:64]}", v) for v in item["versions"])):
            problem = protocol.software_text_problem(text, "name" if key == "name" else "version")
            if problem is not None:
                raise ReportError(f"{path}: software[{i}].{key}: {problem}")
        for version, who in sorted(item["versions"].items()):
            listed = who["allBut"] if "allBut" in who else who["clients"]
            if listed and max(listed) >= len(clients):
                raise ReportError(f"{path}: software[{i}].versions.{version[:64]}: a client index beyond "
                                  f"the {len(clients)} clients")
            if "allBut" in who and not listed:
                holders.append(SoftwareHolder(item["name"], version, item["source"], clients))
                continue
            indices = sorted(everyone.difference(listed)) if "allBut" in who else sorted(set(listed))
            holders.append(SoftwareHolder(item["name"], version, item["source"], tuple(clients[n] for n in indices)))
    return RelaySoftware(relay, clients, {c: int(n) for c, n in doc["omitted"].items()}, tuple(holders))


def _why(rows: Iterable[StatusRow]) -> dict[str, Any]:
    """A digest's ``pending`` (Pending rows by reason) and ``skipped`` (the commonest skip messages)."""
    pending: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for r in rows:
        if r.state is ClientState.PENDING and r.reason:
            pending[r.reason] = pending.get(r.reason, 0) + 1
        elif r.state is ClientState.SKIPPED:
            message = _cut(r.message, SKIP_MESSAGE_LIMIT)
            skipped[message] = skipped.get(message, 0) + 1
    return {"pending": dict(sorted(pending.items())),
            "skipped": [{"message": m, "count": n} for m, n in _commonest(skipped.items())]}


def _bounded_reasons(counts: Mapping[str, int]) -> dict[str, int]:
    """Reason counts, sorted; beyond MAX_REASONS distinct reasons the rarest are summed as ``other``."""
    if len(counts) <= MAX_REASONS:
        return dict(sorted(counts.items()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:MAX_REASONS - 1])
    kept["other"] = kept.get("other", 0) + sum(n for _, n in ranked[MAX_REASONS - 1:])
    return dict(sorted(kept.items()))


def _commonest(counted: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(counted, key=lambda item: (-item[1], item[0]))[:SKIP_LIMIT]


def _row(raw: Mapping[str, Any], what: str) -> StatusRow:
    """A schema-checked row."""
    return StatusRow(client=raw["client"], state=ClientState(raw["state"]), installed_version=raw["installedVersion"],
                     attempts=int(raw["attempts"]), message=raw["message"], updated_at=_time(raw["updatedAt"], what),
                     reason=raw.get("reason"))


@_reading("relay.yaml")
def parse_relay_status(files: Mapping[str, bytes]) -> RelayStatus:
    """Read a relay's ``relays/<relay>/relay.yaml`` (other files in ``files`` are ignored).

    Raises :class:`ReportError` when it is missing, does not follow
    ``schemas/status-relay.schema.json``, or names another relay than its path.
    """
    candidates = [p for p in files if p.startswith("relays/") and p.endswith("/relay.yaml") and p.count("/") == 2]
    if len(candidates) != 1:
        raise ReportError("expected exactly one relays/<relay>/relay.yaml")
    path = candidates[0]
    doc = _checked(load_yaml(files[path], path), "status-relay", path)
    relay: str = doc["relay"]
    if path != f"{relay_prefix(relay)}relay.yaml":
        raise ReportError(f"{path}: relay {relay!r} does not match the file's path")
    jobs = {
        name: RelayJobStatus(job=name, state=JobState(digest["state"]), counts=_counts(digest["counts"]),
                             rows=tuple(_row(r, path) for r in digest["failures"]),
                             pending=dict(digest.get("pending", {})),
                             skipped=tuple((s["message"], int(s["count"])) for s in digest.get("skipped", ())),
                             named=tuple(digest["named"]) if "named" in digest else None,
                             reboot_required=int(digest.get("rebootRequired", 0)))
        for name, digest in sorted(doc["jobs"].items())
    }
    moved_in = tuple(Move(m["client"], m["from"], at) for m in doc.get("movedIn", ())
                     if (at := _time(m["at"], path)) is not None)
    return RelayStatus(relay=relay, observed_commit=doc["observedCommit"], clients=int(doc["clients"]),
                       updated_at=_time(doc["updatedAt"], path), errors=tuple(doc["errors"]), jobs=jobs,
                       moved_in=moved_in, moved_away=int(doc.get("movedAway", {}).get("count", 0)),
                       retired=int(doc.get("retired", {}).get("count", 0)),
                       clients_online=_optional_int(doc.get("clientsOnline")),
                       clients_offline=_optional_int(doc.get("clientsOffline")))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


_ROWS_MARKER = b"\nrows:\n"


def _relay_job_lines(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """The YAML head and the row lines of a file laid out as :func:`render_relay_job` writes it, else None.

    That layout ends with ``rows:`` and one ``- {...}`` line per row, each a
    JSON object that any YAML reader reads the same. Any other layout (a
    hand edit, another writer) returns None and is read as plain YAML.
    """
    at = data.find(_ROWS_MARKER)
    if at < 0 or not data.endswith(b"\n"):
        return None
    lines = data[at + len(_ROWS_MARKER):-1].split(b"\n")
    if not all(line.startswith(b"- {") and line.endswith(b"}") for line in lines):
        return None
    return data[: at + 1], [line[2:] for line in lines]


@_reading("job status file")
def parse_relay_job(data: bytes, what: str = "job status") -> tuple[str, RelayJobStatus]:
    """Read ``relays/<relay>/jobs/<job>.yaml``: (relay, the job with every row).

    The commit the rows are for is ``relay.yaml``'s ``observedCommit`` in the
    same tree (files of earlier versions also name it in the head; ignored).

    Checked against ``schemas/status-relay-job.schema.json``: the head (job,
    relay, state, counts) as a whole, then each row with the schema's
    compiled ``#/$defs/row`` check. Rows in :func:`render_relay_job`'s layout
    are read as the JSON lines they are rather than through the YAML parser,
    so a file of 50,000 rows reads in well under a second.
    """
    split = _relay_job_lines(data)
    parsed = _read_relay_job_lines(*split, what) if split is not None else None
    if parsed is None:
        doc = load_yaml(data, what)
        rows = doc.get("rows")
        head, raw_rows = ({**doc, "rows": []}, rows) if isinstance(rows, list) else (doc, [])
    else:
        head, raw_rows = parsed
    head = _checked(head, "status-relay-job", what)
    row_follows_schema = schema_check.compiled("status-relay-job", "/$defs/row")
    for index, raw in enumerate(raw_rows):
        if not row_follows_schema(raw):
            problem = schema_check.problem("status-relay-job", raw, "/$defs/row", f"rows[{index}]")
            raise ReportError(f"{what}: {problem}")
    status = RelayJobStatus(job=head["job"], state=JobState(head["state"]), counts=_counts(head["counts"]),
                            rows=tuple(_row(raw, what) for raw in raw_rows),
                            reboot_required=int(head.get("rebootRequired", 0)))
    return head["relay"], status


def _read_relay_job_lines(head: bytes, lines: list[bytes], what: str) -> tuple[dict[str, Any], list[Any]] | None:
    """The head (``rows`` empty) and the decoded rows of a split job file; None if the lines are not JSON."""
    doc = load_yaml(head, what)
    if "rows" in doc:
        return None
    try:
        rows = [json.loads(line) for line in lines]
    except ValueError:  # UnicodeDecodeError included: read the file as YAML, which names the problem
        return None
    return {**doc, "rows": []}, rows


# ----------------------------------------------------------- accepted.yaml


def render_accepted(accepted: Accepted, branch: str) -> bytes:
    doc: dict[str, Any] = {
        "acceptedCommit": accepted.accepted_commit,
        "acceptedAt": format_time(accepted.accepted_at),
        "branch": branch,
        "mainCommit": accepted.main_commit,
        "mainValid": accepted.main_valid,
    }
    error = accepted.evaluation_error
    if error is not None:  # absent when there is none: files written before the field existed stay unchanged
        doc["evaluationError"] = {"commit": error.commit, "message": error.message, "reason": error.reason}
    return dump_yaml(doc)


def _accepted_doc(data: bytes) -> dict[str, Any]:
    """accepted.yaml, checked; a field an older HQ did not write takes its schema ``default``."""
    doc = schema_check.with_defaults("status-accepted", load_yaml(data, ACCEPTED_FILE))
    return _checked(doc, "status-accepted", ACCEPTED_FILE)


@_reading("accepted.yaml")
def parse_accepted(data: bytes) -> Accepted:
    """Read status/hq ``accepted.yaml`` (acceptedCommit, acceptedAt, mainCommit, mainValid, evaluationError)."""
    doc = _accepted_doc(data)
    raw_error = doc.get("evaluationError")
    return Accepted(
        accepted_commit=doc["acceptedCommit"],
        accepted_at=_time(doc["acceptedAt"], ACCEPTED_FILE),
        main_commit=doc["mainCommit"],
        main_valid=doc["mainValid"],
        evaluation_error=None if raw_error is None else EvaluationError(
            raw_error["commit"], raw_error["message"], raw_error.get("reason", Cause.INTERNAL.value)),
    )


@_reading("accepted.yaml")
def parse_branch(data: bytes) -> str:
    """The branch accepted.yaml names (``main`` in files written before it did)."""
    branch: str = _accepted_doc(data)["branch"]
    return branch


# --------------------------------------------------------- validation.yaml


def render_validation(main_commit: str | None, errors: Sequence[SpecError]) -> bytes:
    return dump_yaml({
        "mainCommit": main_commit,
        "valid": None if main_commit is None else not errors,
        "errors": [
            {"path": e.path, "line": e.line, "column": e.column, "message": e.message}
            for e in sorted(errors)
        ],
    })


@_reading("validation.yaml")
def parse_validation(data: bytes) -> tuple[str | None, tuple[SpecError, ...]]:
    """Read status/hq ``validation.yaml``: the main commit evaluated and its errors."""
    doc = _checked(load_yaml(data, VALIDATION_FILE), "status-validation", VALIDATION_FILE)
    errors = tuple(SpecError(e["path"], int(e["line"]), int(e["column"]), e["message"]) for e in doc["errors"])
    return doc["mainCommit"], errors


# ------------------------------------------------------------ aggregation


def _bounded(names: Iterable[str]) -> tuple[tuple[str, ...], int]:
    ordered = sorted(names)
    return tuple(ordered[:LIST_LIMIT]), len(ordered)


def aggregate(specs: Specs | None, accepted: Accepted, branch: str,
              validation_errors: Sequence[SpecError], relays: Mapping[str, RelayStatus],
              liveness: Mapping[str, RelayLiveness] | None = None) -> HqReport:
    """HQ's roll-up of every relay's status for the accepted specs.

    A relay that has not published status for the accepted commit is
    *waiting*: its last known counts are still shown (stale data beats none),
    and every job reaching it is InProgress until it catches up. Status refs
    of relays that are not in the topology are ignored. ``liveness`` is HQ's
    judgement of each relay's heartbeats (None when HQ receives none); it
    is shown beside the relay and changes no job's state.
    """
    accepted_commit = accepted.accepted_commit
    jobs: list[JobReport] = []
    relay_reports: list[RelayReport] = []
    if specs is not None:
        reach = reach_of(specs)
        names = {r.name for r in specs.topology.relays}
        current = {n for n in names if n in relays and relays[n].observed_commit == accepted_commit}
        for job in specs.jobs:
            jobs.append(_job_report(reach, job, relays, current))
        for relay in sorted(specs.topology.relays, key=lambda r: r.name):
            status = relays.get(relay.name)
            relay_reports.append(RelayReport(
                relay=relay.name,
                parent=relay.parent,
                reported=status is not None,
                observed_commit=status.observed_commit if status else None,
                current=relay.name in current,
                clients=status.clients if status else 0,
                updated_at=status.updated_at if status else None,
                errors=tuple(_cut(e) for e in status.errors[:LIST_LIMIT]) if status else (),
                failed=sum(d.counts.get(ClientState.FAILED.value, 0) + d.counts.get(ClientState.CONFLICT.value, 0)
                           for d in status.jobs.values()) if status else 0,
                clients_online=status.clients_online if status else None,
                clients_offline=status.clients_offline if status else None,
                liveness=liveness.get(relay.name) if liveness is not None else None,
                moved_away=status.moved_away if status else 0,
                retired=status.retired if status else 0,
            ))
    return HqReport(branch=branch, accepted=accepted, validation_errors=tuple(sorted(validation_errors)),
                    jobs=tuple(jobs), relays=tuple(relay_reports),
                    moves=_moves(relays, {r.name for r in specs.topology.relays} if specs is not None else set()))


def _moves(relays: Mapping[str, RelayStatus], names: set[str]) -> dict[str, tuple[Move, ...]]:
    """Per relay of the topology, the clients that moved from it to another (the newest move per client)."""
    newest: dict[tuple[str, str], Move] = {}  # (old relay, client) -> Move(client, new relay, when)
    for relay in sorted(names):
        status = relays.get(relay)
        for m in status.moved_in if status is not None else ():
            if m.relay in names and m.relay != relay:
                seen = newest.get((m.relay, m.client))
                if seen is None or (m.at, relay) > (seen.at, seen.relay):
                    newest[(m.relay, m.client)] = Move(m.client, relay, m.at)
    out: dict[str, list[Move]] = {}
    for (old, _), move in newest.items():
        out.setdefault(old, []).append(move)
    return {old: tuple(sorted(sorted(moves, key=lambda m: (m.at, m.client), reverse=True)[:MOVES_LIMIT]))
            for old, moves in sorted(out.items())}


def render_moves(moves: Mapping[str, Sequence[Move]]) -> bytes:
    """status/hq's ``moves.yaml``: per relay, the clients that moved from it and where to."""
    return dump_yaml({"moves": {relay: [{"client": m.client, "to": m.relay, "at": format_time(m.at)}
                                        for m in moved] for relay, moved in sorted(moves.items())}})


@_reading("moves.yaml")
def parse_moves(data: bytes) -> dict[str, tuple[Move, ...]]:
    """Read status/hq's ``moves.yaml`` (``schemas/status-moves.schema.json``)."""
    doc = _checked(load_yaml(data, MOVES_FILE), "status-moves", MOVES_FILE)
    return {relay: tuple(Move(m["client"], m["to"], at) for m in moved
                         if (at := _time(m["at"], MOVES_FILE)) is not None)
            for relay, moved in doc["moves"].items()}


# A relay's job state when it has Pending rows -> the reason they all wait for (None: some run).
_PARKED_BY = {JobState.SCHEDULED: Reason.SCHEDULED, JobState.CLIENTS_OFFLINE: Reason.CLIENT_OFFLINE}


def _job_report(reach: Reach, job: Job, relays: Mapping[str, RelayStatus], current: set[str]) -> JobReport:
    reached = reach.relays_of(job.name)

    def reboots(members: Iterable[str]) -> int:
        """Clients of these relays waiting for a reboot."""
        total = 0
        for name in members:
            status = relays.get(name)
            digest = status.jobs.get(job.name) if status else None
            total += digest.reboot_required if digest is not None else 0
        return total

    def rollup(members: Iterable[str]) -> tuple[dict[str, int], bool, set[str], bool, tuple[bool, bool]]:
        """Counts, halted, relays waited for, invalid, and (scheduled, offline) as :func:`parked` says."""
        counts = zero_counts()
        halted = invalid = False
        parked_by: set[JobState] = set()  # states of the relays with Pending rows
        waiting: set[str] = set()
        for name in members:
            if name not in current:
                waiting.add(name)
            status = relays.get(name)
            digest = status.jobs.get(job.name) if status else None
            if digest is not None:
                add_counts(counts, digest.counts)
                halted = halted or digest.state is JobState.HALTED
                # a relay that cannot plan the job says so (its error is in relay.yaml)
                invalid = invalid or (digest.state is JobState.INVALID and name in current)
                if digest.counts.get(ClientState.PENDING.value, 0):
                    parked_by.add(digest.state)
        # A relay's Pending rows wait for its schedule (Scheduled), for offline clients (ClientsOffline), or run.
        reasons = {_PARKED_BY.get(state) for state in parked_by}
        return counts, halted, waiting, invalid, parked(reasons)

    destinations: list[DestinationReport] = []
    if job.destination_type is DestinationType.ALL_LOWER_CLIENTS:
        for destination in sorted(set(job.destinations)):
            members = reach.topology.subtree(destination)
            counts, halted, waiting, invalid, (scheduled, offline) = rollup(members)
            shown, total = _bounded(waiting)
            destinations.append(DestinationReport(
                relay=destination, relays=tuple(sorted(members)),
                state=job_state(counts, suspended=job.suspend, halted=halted, waiting=bool(waiting),
                                invalid=invalid, scheduled=scheduled, offline=offline),
                counts=counts, waiting_for=shown, waiting_count=total, reboot_required=reboots(members)))
    else:
        for name in sorted(reached):
            status = relays.get(name)
            digest = status.jobs.get(job.name) if status else None
            if digest is None or not (sum(digest.counts.values()) or digest.state is JobState.INVALID):
                continue
            counts, halted, waiting, invalid, (scheduled, offline) = rollup([name])
            shown, total = _bounded(waiting)
            destinations.append(DestinationReport(
                relay=name, relays=(name,),
                state=job_state(counts, suspended=job.suspend, halted=halted, waiting=bool(waiting),
                                invalid=invalid, scheduled=scheduled, offline=offline),
                counts=counts, waiting_for=shown, waiting_count=total, reboot_required=reboots([name])))
    counts, halted, waiting, invalid, (scheduled, offline) = rollup(reached)
    digests = {name: digest for name in sorted(reached)
               if (status := relays.get(name)) is not None and (digest := status.jobs.get(job.name)) is not None}
    # A client the job names that no relay knows is a Pending row of HQ's (once every relay has reported).
    missing: list[str] = []
    if job.destination_type is DestinationType.CLIENTS and not waiting:
        present: set[str] = set()
        known = True
        for digest in digests.values():
            if digest.named is not None:
                present.update(digest.named)
            elif sum(digest.counts.values()):  # an older relay with rows: which named clients is not known
                known = False
                break
        missing = sorted(set(job.destinations) - present) if known else []
    if missing:
        counts[ClientState.PENDING.value] += len(missing)
        scheduled = offline = False
    state = job_state(counts, suspended=job.suspend, halted=halted, waiting=bool(waiting), invalid=invalid,
                      scheduled=scheduled, offline=offline)
    failures: list[Failure] = []
    pending: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for name, digest in digests.items():
        for row in digest.rows:
            if row.state in FAILURE_STATES:
                failures.append(Failure(job.name, name, row.client, row.state, row.installed_version,
                                        row.attempts, _cut(row.message)))
        for reason, n in digest.pending.items():
            pending[reason] = pending.get(reason, 0) + n
        for message, n in digest.skipped:
            skipped[message] = skipped.get(message, 0) + n
    failures.sort(key=lambda f: (f.relay, f.client))
    shown, total = _bounded(waiting)
    return JobReport(
        job=job.name,
        job_type=job.job_type.value,
        package=job.package_name,
        version=job.package_version,
        destination_type=job.destination_type.value,
        destinations=tuple(job.destinations),
        state=state,
        counts=counts,
        relays=tuple(destinations),
        failures=tuple(failures[:FAILURE_LIMIT]),
        failure_count=counts[ClientState.FAILED.value] + counts[ClientState.CONFLICT.value],
        waiting_for=shown,
        waiting_count=total,
        scheduled_for=job.not_before if state is JobState.SCHEDULED else None,
        pending=_bounded_reasons({**pending, **({Reason.NOT_REGISTERED.value: len(missing)} if missing else {})}),
        skipped=tuple(_commonest(skipped.items())),
        not_registered=tuple(missing[:LIST_LIMIT]),
        not_registered_count=len(missing),
        reboot_required=reboots(reached),
    )


# ------------------------------------------------------------- HQ files


def _failure_json(f: Failure) -> dict[str, Any]:
    return {"relay": f.relay, "client": f.client, "state": f.state.value,
            "installedVersion": f.installed_version, "attempts": f.attempts, "message": f.message}


def render_job_report(report: JobReport, accepted_commit: str | None) -> bytes:
    return dump_yaml({
        "job": report.job,
        "acceptedCommit": accepted_commit,
        "jobType": report.job_type,
        "package": {"name": report.package, "version": report.version},
        "destinationType": report.destination_type,
        "destinations": list(report.destinations),
        "state": report.state.value,
        "scheduledFor": format_time(report.scheduled_for),
        "clients": report.clients,
        "counts": dict(report.counts),
        "relays": [
            {"relay": d.relay, "subtree": list(d.relays), "state": d.state.value, "counts": dict(d.counts),
             "waitingFor": list(d.waiting_for), "waitingCount": d.waiting_count,
             **_reboot_field(d.reboot_required)}
            for d in report.relays
        ],
        "waitingFor": list(report.waiting_for),
        "waitingCount": report.waiting_count,
        "failures": [_failure_json(f) for f in report.failures],
        "failureCount": report.failure_count,
        "pending": dict(report.pending),
        "skipped": [{"message": m, "count": n} for m, n in report.skipped],
        "notRegistered": list(report.not_registered),
        "notRegisteredCount": report.not_registered_count,
        **_reboot_field(report.reboot_required),
    })


@_reading("job report")
def parse_job_report(data: bytes, what: str = "job report") -> JobReport:
    """Read one of status/hq's ``jobs/<job>.yaml`` (``schemas/status-job.schema.json``)."""
    doc = _checked(load_yaml(data, what), "status-job", what)
    return JobReport(
        job=doc["job"],
        job_type=doc["jobType"],
        package=doc["package"]["name"],
        version=doc["package"]["version"],
        destination_type=doc["destinationType"],
        destinations=tuple(doc["destinations"]),
        state=JobState(doc["state"]),
        counts=_counts(doc["counts"]),
        relays=tuple(
            DestinationReport(relay=d["relay"], relays=tuple(d["subtree"]), state=JobState(d["state"]),
                              counts=_counts(d["counts"]), waiting_for=tuple(d["waitingFor"]),
                              waiting_count=int(d["waitingCount"]),
                              reboot_required=int(d.get("rebootRequired", 0)))
            for d in doc["relays"]
        ),
        failures=tuple(
            Failure(doc["job"], f["relay"], f["client"], ClientState(f["state"]), f["installedVersion"],
                    int(f["attempts"]), f["message"])
            for f in doc["failures"]
        ),
        failure_count=int(doc["failureCount"]),
        waiting_for=tuple(doc["waitingFor"]),
        waiting_count=int(doc["waitingCount"]),
        scheduled_for=_time(doc.get("scheduledFor"), what),
        pending=dict(doc.get("pending", {})),
        skipped=tuple((s["message"], int(s["count"])) for s in doc.get("skipped", ())),
        not_registered=tuple(doc.get("notRegistered", ())),
        not_registered_count=int(doc.get("notRegisteredCount", 0)),
        reboot_required=int(doc.get("rebootRequired", 0)),
    )


def _relay_json(r: RelayReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "relay": r.relay, "parent": r.parent, "reported": r.reported, "observedCommit": r.observed_commit,
        "current": r.current, "clients": r.clients, "updatedAt": format_time(r.updated_at),
        "errors": list(r.errors), "failed": r.failed}
    if r.clients_online is not None and r.clients_offline is not None:
        out["clientsOnline"], out["clientsOffline"] = r.clients_online, r.clients_offline
    if r.liveness is not None:
        out["liveness"] = r.liveness.state.value
        out["livenessSince"] = format_time(r.liveness.since)
        if r.liveness.state is Liveness.LOST:
            out["lastContact"] = format_time(r.liveness.last_contact)
    if r.moved_away:
        out["movedAway"] = r.moved_away
    if r.retired:
        out["retired"] = r.retired
    return out


def render_relays(report: HqReport) -> bytes:
    return dump_yaml({
        "acceptedCommit": report.accepted.accepted_commit,
        "relays": [_relay_json(r) for r in report.relays],
    })


def _relay_report(r: Mapping[str, Any]) -> RelayReport:
    """A schema-checked entry of relays.yaml."""
    liveness = None
    if "liveness" in r:
        state = Liveness(r["liveness"])
        liveness = RelayLiveness(state, _time(r.get("livenessSince"), RELAYS_FILE),
                                 _time(r.get("lastContact"), RELAYS_FILE) if state is Liveness.LOST else None)
    return RelayReport(relay=r["relay"], parent=r["parent"], reported=r["reported"],
                       observed_commit=r["observedCommit"], current=r["current"], clients=int(r["clients"]),
                       updated_at=_time(r["updatedAt"], RELAYS_FILE), errors=tuple(r["errors"]),
                       failed=int(r.get("failed", 0)), clients_online=_optional_int(r.get("clientsOnline")),
                       clients_offline=_optional_int(r.get("clientsOffline")), liveness=liveness,
                       moved_away=int(r.get("movedAway", 0)), retired=int(r.get("retired", 0)))


@_reading("relays.yaml")
def parse_relays(data: bytes) -> tuple[RelayReport, ...]:
    """Read status/hq's ``relays.yaml`` (``schemas/status-relays.schema.json``)."""
    doc = _checked(load_yaml(data, RELAYS_FILE), "status-relays", RELAYS_FILE)
    return tuple(_relay_report(r) for r in doc["relays"])


def render_hq_status(report: HqReport) -> dict[str, bytes]:
    """The complete tree of ``status/hq``."""
    files = {
        ACCEPTED_FILE: render_accepted(report.accepted, report.branch),
        VALIDATION_FILE: render_validation(report.accepted.main_commit, report.validation_errors),
        RELAYS_FILE: render_relays(report),
        SUMMARY_FILE: render_summary(report).encode("utf-8"),
    }
    for job in report.jobs:
        files[f"{HQ_JOBS_DIR}{job.job}.yaml"] = render_job_report(job, report.accepted.accepted_commit)
    if report.moves:  # only when a client moved: a fleet without moves keeps its tree as it was
        files[MOVES_FILE] = render_moves(report.moves)
    return files


@_reading("status/hq")
def parse_hq_status(files: Mapping[str, bytes]) -> HqReport:
    """Read back a ``status/hq`` tree (raises ReportError without accepted.yaml)."""
    if ACCEPTED_FILE not in files:
        raise ReportError(f"status/hq has no {ACCEPTED_FILE}")
    accepted = parse_accepted(files[ACCEPTED_FILE])
    errors: tuple[SpecError, ...] = ()
    if VALIDATION_FILE in files:
        _, errors = parse_validation(files[VALIDATION_FILE])
    jobs = tuple(
        parse_job_report(files[path], path)
        for path in sorted(files)
        if path.startswith(HQ_JOBS_DIR) and path.endswith(".yaml")
    )
    relays = parse_relays(files[RELAYS_FILE]) if RELAYS_FILE in files else ()
    moves = parse_moves(files[MOVES_FILE]) if MOVES_FILE in files else {}
    return HqReport(branch=parse_branch(files[ACCEPTED_FILE]), accepted=accepted, validation_errors=errors,
                    jobs=jobs, relays=relays, moves=moves)


# ------------------------------------------------------------- summary.md

SUMMARY_COLUMNS: tuple[ClientState, ...] = (
    ClientState.SUCCEEDED, ClientState.IN_PROGRESS, ClientState.PENDING,
    ClientState.FAILED, ClientState.SKIPPED, ClientState.CONFLICT,
)

_MD_SPECIAL = re.compile(r"([`|<>\[\]\\])")  # brackets too: a client's message never becomes a link or image


# Characters that act on a terminal or reorder text (C0/C1 controls, DEL, bidi overrides): shown escaped.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What GitHub turns into a live link without any markup.
_AUTOLINK = re.compile(r"(?i)\b(https?|ftp)://|\bwww\.|(?<=[\w.+-])@(?=[\w-]+\.)")  # URLs, e-mail addresses


def printable(text: str) -> str:
    """``text`` on one line with every control character shown as an escape (``\\x1b``), never acted on."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", " ".join(text.split()))


def _md(text: str, limit: int = 200) -> str:
    """One table cell: a single line, bounded; controls shown escaped; pipes, backticks, angle and
    square brackets escaped; bare URLs and e-mail addresses kept from becoming live links."""
    text = _cut(printable(text), limit)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return _AUTOLINK.sub(lambda m: m.group().replace(":", "&#58;").replace(".", "&#46;").replace("@", "&#64;"),
                         text)


def short(commit: str | None) -> str:
    return commit[:12] if commit else "none"


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """A GitHub table whose columns are also padded, so it reads in a terminal."""
    widths = [max(len(h), 3, *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return [line(header), rule, *(line(r) for r in rows)]


def relay_tree(relays: Sequence[RelayReport]) -> list[tuple[int, RelayReport]]:
    """The relays in tree order (each after its parent, siblings by name), with their depth below HQ."""
    children: dict[str, list[RelayReport]] = {}
    names = {r.relay for r in relays}
    for r in sorted(relays, key=lambda r: r.relay):
        children.setdefault(r.parent if r.parent in names else "", []).append(r)
    ordered: list[tuple[int, RelayReport]] = []
    stack = [(0, r) for r in reversed(children.get("", []))]
    seen: set[str] = set()
    while stack:
        depth, r = stack.pop()
        if r.relay in seen:  # a cycle cannot validate; never loop on one
            continue
        seen.add(r.relay)
        ordered.append((depth, r))
        stack += [(depth + 1, c) for c in reversed(children.get(r.relay, []))]
    return ordered


def relay_liveness(relays: Iterable[RelayReport]) -> dict[str, RelayLiveness] | None:
    """The liveness HQ published for each relay, to aggregate with again (None when it published none)."""
    found = {r.relay: r.liveness for r in relays if r.liveness is not None}
    return found or None


def lost_relays(relays: Sequence[RelayReport]) -> list[RelayReport]:
    """The relays HQ calls lost, in tree order."""
    return [r for _, r in relay_tree(relays) if r.liveness is not None and r.liveness.state is Liveness.LOST]


def liveness_label(r: RelayReport) -> str:
    """``alive``, ``LOST since T (last contact T0)``, or ``-`` when HQ cannot tell (or receives no heartbeats)."""
    live = r.liveness
    if live is None or live.state is Liveness.UNKNOWN:
        return "-"
    if live.state is Liveness.ALIVE:
        return "alive"
    contact = format_time(live.last_contact) if live.last_contact else "never"
    return f"LOST since {format_time(live.since) or '?'} (last contact {contact})"


def clients_label(r: RelayReport) -> str:
    """``online/offline/total``, or the total alone for a relay that does not publish the split; then
    the clients it no longer counts: ``3/1/4, 2 moved away, 1 retired``."""
    if r.clients_online is None or r.clients_offline is None:
        label = f"-/-/{r.clients}"
    else:
        label = f"{r.clients_online}/{r.clients_offline}/{r.clients}"
    if r.moved_away:
        label += f", {r.moved_away} moved away"
    if r.retired:
        label += f", {r.retired} retired"
    return label


def jobs_reaching(report: HqReport, relay: str) -> list[str]:
    """The jobs whose destinations (subtrees, or the relays of named clients) include ``relay``."""
    return [job.job for job in report.jobs if any(relay in d.relays for d in job.relays)]


def _lost_relay_notes(report: HqReport) -> list[str]:
    """The top of summary.md: one line per lost relay, naming the jobs it holds in their last reported state."""
    lost = lost_relays(report.relays)
    out = []
    for r in lost[:LOST_RELAY_NOTES]:
        jobs = jobs_reaching(report, r.relay)
        held = f"; jobs reaching it keep the state it last reported ({_md(_names(jobs))})" if jobs else ""
        out.append(f"> **Relay {_md(r.relay)} is {_md(liveness_label(r))}**: no heartbeat reaches HQ, so its "
                   f"status below is as it last published it{held}.")
        out.append("")
    if len(lost) > LOST_RELAY_NOTES:
        out += [f"> … and {len(lost) - LOST_RELAY_NOTES} more lost relays (see Relays below).", ""]
    return out


def _relay_section(report: HqReport, failures: Sequence[Failure]) -> list[str]:
    """summary.md's relays: a table in tree order (nesting indented), then the first failures of each."""
    out = [f"## Relays ({len(report.relays)})", ""]
    behind = sum(1 for r in report.relays if not r.current)
    if behind:
        out += [f"{behind} of {len(report.relays)} relays have not reported the accepted commit.", ""]
    rows = []
    tree = relay_tree(report.relays)
    for depth, r in tree[:LIST_LIMIT]:
        if not r.reported:
            seen = "no status yet"
        elif r.current:
            seen = "accepted commit"
        else:
            seen = f"behind: `{short(r.observed_commit)}`"
        name = "\u00a0\u00a0" * depth + ("└ " if depth else "") + _md(r.relay)
        rows.append([name, liveness_label(r), clients_label(r), seen, format_time(r.updated_at) or "-",
                     str(r.failed), _md(r.errors[0], 200) if r.errors else "-"])
    out += _table(["Relay", "Liveness", "Clients on/off/total", "Status for", "Last change", "Failed", "Error"],
                  rows, [False, False, True, False, False, True, False])
    if len(tree) > LIST_LIMIT:
        out.append(f"… and {len(tree) - LIST_LIMIT} more relays (all in `relays.yaml`)")
    by_relay: dict[str, list[Failure]] = {}
    for f in failures:
        by_relay.setdefault(f.relay, []).append(f)
    first = [(r.relay, by_relay[r.relay][:RELAY_FAILURE_LIMIT]) for _, r in tree if r.relay in by_relay]
    if first:
        out += ["", "First failures per relay:", ""]
        for relay, shown in first[:LIST_LIMIT]:
            listed = "; ".join(f"{_md(f.client)} ({_md(f.job)}): {_md(f.message, 120)}" for f in shown)
            out.append(f"- {_md(relay)}: {listed}")
    out.append("")
    return out


def plural(count: int, word: str) -> str:
    """``1 relay``, ``2 relays``."""
    return f"{count} {word}{'s' if count != 1 else ''}"


def state_label(job: JobReport) -> str:
    """A job's state as people read it: ``Scheduled (from 2027-04-01T00:00:00Z)``, ``InProgress (waiting for 2 relays)``."""
    label = job.state.value
    if job.state is JobState.SCHEDULED and job.scheduled_for is not None:
        label += f" (from {format_time(job.scheduled_for)})"
    if job.state is JobState.CLIENTS_OFFLINE and job.pending.get(Reason.CLIENT_OFFLINE.value):
        label += f" ({plural(job.pending[Reason.CLIENT_OFFLINE.value], 'client')} waited for)"
    if job.waiting_count:
        label += f" (waiting for {plural(job.waiting_count, 'relay')})"
    return label


def pending_label(job: JobReport) -> str:
    """``12 scheduled, 3 rolloutSlot``: the job's Pending rows by reason, most first ("" when none)."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(job.pending.items(), key=lambda i: (-i[1], i[0])) if n)


def skipped_label(job: JobReport) -> str:
    """``6 skipped: requires os windows; 1 skipped: ...``: the commonest skip messages ("" when none)."""
    return "; ".join(f"{n} skipped: {message}" for message, n in job.skipped)


def not_registered_label(job: JobReport) -> str:
    """``pc-a, pc-b (+3 more)``: the client ids a job names that no relay knows."""
    more = job.not_registered_count - len(job.not_registered)
    return ", ".join(job.not_registered) + (f" (+{more} more)" if more > 0 else "")


def summary_columns(jobs: Iterable[JobReport]) -> tuple[ClientState, ...]:
    """The state columns of a jobs table: :data:`SUMMARY_COLUMNS`, plus Suspended when a row is."""
    suspended = any(job.counts.get(ClientState.SUSPENDED.value, 0) for job in jobs)
    return SUMMARY_COLUMNS + ((ClientState.SUSPENDED,) if suspended else ())


def count_label(job: JobReport, state: ClientState) -> str:
    """A jobs table cell: the rows in ``state``; Succeeded says how many wait for a reboot: ``40 (3 waiting for
    a reboot)``."""
    cell = str(job.counts.get(state.value, 0))
    if state is ClientState.SUCCEEDED and job.reboot_required:
        cell += f" ({job.reboot_required} waiting for a reboot)"
    return cell


def package_label(job: JobReport) -> str:
    version = job.version or "any version"
    verb = "" if job.job_type == "install" else f"{job.job_type} "
    return f"{verb}{job.package} {version}"


def render_summary(report: HqReport, only_job: str | None = None) -> str:
    """summary.md: jobs table, failures, validation errors, relays behind, accepted commit.

    Bounded at any fleet size: one row per job, at most FAILURE_LIMIT failure
    rows and LIST_LIMIT validation errors and relays, the rest counted.
    """
    accepted = report.accepted
    jobs = [j for j in report.jobs if only_job is None or j.job == only_job]
    out: list[str] = ["# Software distribution status", ""]
    failed = accepted.evaluation_error
    if failed is not None:
        last = (f"this report is for `{short(accepted.main_commit)}`, the last commit evaluated"
                if accepted.main_commit else "no commit has been evaluated yet")
        out.append(f"> **{_md(report.branch)} `{short(failed.commit)}` could not be evaluated** "
                   f"({_md(failed.message, 300)}); HQ retries it. Until then the accepted commit "
                   f"`{short(accepted.accepted_commit)}` stays in force and {last}.")
        out.append("")
    if accepted.main_valid is False:
        out.append(f"> **main `{short(accepted.main_commit)}` is invalid and is not applied**; "
                   f"the accepted commit `{short(accepted.accepted_commit)}` stays in force. See validation errors below.")
        out.append("")
    elif accepted.main_commit is None and failed is None:
        out += [f"> Branch `{report.branch}` not found on the origin.", ""]
    out += _lost_relay_notes(report)

    out += [f"## Jobs ({len(jobs)})", ""]
    if jobs:
        columns = summary_columns(jobs)
        header = ["Job", "Package", "Destinations", "Clients", *(s.value for s in columns), "State"]
        rows = []
        for job in jobs:
            rows.append([
                _md(job.job), _md(package_label(job)), _md(_names(job.destinations)), str(job.clients),
                *(count_label(job, s) for s in columns), state_label(job),
            ])
        out += _table(header, rows, [False, False, False, True, *([True] * len(columns)), False])
    elif accepted.accepted_commit is None:
        out.append("No commit has been accepted yet.")
    else:
        out.append("No jobs in the accepted commit.")
    out.append("")

    why = [(job, pending_label(job), skipped_label(job)) for job in jobs]
    why = [(job, pending, skipped) for job, pending, skipped in why if pending or skipped]
    if why:
        out += ["## Why clients wait or were skipped", ""]
        out += _table(["Job", "Pending, by reason", "Skipped"],
                      [[_md(job.job), _md(pending) or "-", _md(skipped) or "-"] for job, pending, skipped in why],
                      [False, False, False])
        out.append("")
        for job, _, _ in why:
            if job.not_registered_count:
                out.append(f"- {_md(job.job)} names clients no relay knows: {_md(not_registered_label(job))}")
        if any(job.not_registered_count for job, _, _ in why):
            out.append("")

    failures = [f for j in jobs for f in j.failures]
    failure_total = sum(j.failure_count for j in jobs)
    out += [f"## Failures ({failure_total})", ""]
    if failure_total:
        shown = failures[:FAILURE_LIMIT]
        out += _table(
            ["Job", "Relay", "Client", "State", "Attempts", "Message"],
            [[_md(f.job), _md(f.relay), _md(f.client), f.state.value, str(f.attempts), _md(f.message)]
             for f in shown],
            [False, False, False, False, True, False],
        )
        if failure_total > len(shown):
            out.append("")
            out.append(f"… and {failure_total - len(shown)} more (full rows: `relays/<relay>/jobs/<job>.yaml` "
                       "on each relay's status ref)")
    else:
        out.append("None.")
    out.append("")

    errors = report.validation_errors
    out += [f"## Validation errors ({len(errors)})", ""]
    if errors:
        out.append(f"main `{short(accepted.main_commit)}`:")
        out.append("")
        for e in errors[:LIST_LIMIT]:
            out.append(f"- `{_md(e.path, 300)}:{e.line}:{e.column}` {_md(e.message, 300)}")
        if len(errors) > LIST_LIMIT:
            out.append(f"- … and {len(errors) - LIST_LIMIT} more (see `validation.yaml`)")
    else:
        out.append("None." if accepted.main_commit else "main not evaluated.")
    out.append("")

    if report.relays:
        out += _relay_section(report, failures)

    out += ["## Accepted commit", ""]
    if accepted.accepted_commit:
        when = format_time(accepted.accepted_at) or "unknown time"
        out.append(f"`{accepted.accepted_commit}` on `{_md(report.branch)}`, accepted {when}.")
    else:
        out.append("None yet.")
    return "\n".join(out) + "\n"


# --------------------------------------------------------- file → schema

STATUS_SCHEMAS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"relays/[^/]+/relay\.yaml"), "status-relay"),
    (re.compile(r"relays/[^/]+/jobs/[^/]+\.yaml"), "status-relay-job"),
    (re.compile(r"relays/[^/]+/inventory\.json"), "status-inventory"),
    (re.compile(r"relays/[^/]+/software\.json"), "status-software"),
    (re.compile(r"accepted\.yaml"), "status-accepted"),
    (re.compile(r"validation\.yaml"), "status-validation"),
    (re.compile(r"relays\.yaml"), "status-relays"),
    (re.compile(r"moves\.yaml"), "status-moves"),
    (re.compile(r"jobs/[^/]+\.yaml"), "status-job"),
)


def schema_name(path: str) -> str | None:
    """The ``schemas/<name>.schema.json`` a status file follows (None for summary.md)."""
    for pattern, name in STATUS_SCHEMAS:
        if pattern.fullmatch(path):
            return name
    return None


def load_status_file(path: str, data: bytes) -> Any:
    """Plain value of a status file, for schema validation."""
    if path.endswith(".json"):
        return json.loads(data)
    return load_yaml(data, path)


__all__ = [
    "ACCEPTED_FILE", "Accepted", "DestinationReport", "EvaluationError", "FAILURE_LIMIT", "Failure", "HqReport",
    "InventoryEntry", "JobReport", "RELAYS_FILE", "RelayJobStatus", "RelayReport", "RelayStatus", "ReportError",
    "RowTimes", "SUMMARY_FILE", "StatusRow", "VALIDATION_FILE", "aggregate", "count_states", "format_time",
    "is_waiting_row", "job_state", "parse_accepted", "parse_hq_status", "parse_job_report", "parse_relay_job",
    "parse_relay_status", "parse_validation", "render_accepted", "render_hq_status", "render_relay_status",
    "render_summary", "render_validation", "schema_name",
]
