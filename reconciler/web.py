"""HQ's read-only web view: server-rendered HTML from the report of HQ's last pass.

``GET /`` (and ``/ui/``) lists the jobs with a progress bar and their counts
by state, the relays in tree order with their progress over every job and
their liveness, the accepted commit and the validation errors of the newest
``main``. ``GET /ui/jobs/<job>`` shows one job: its destinations, its
failures with their messages, and its client rows, filtered on the server by
``state``, ``relay`` and ``reason`` query parameters and cut into pages of
:data:`PAGE_SIZE` (``page``), so a job of 100,000 clients stays one small page.

Rendering is pure (a :class:`Snapshot` and rows in, a string out); every
value that comes from specs, relays or clients goes through
:func:`html.escape`, and every value put in a URL through
:func:`urllib.parse.quote`. Pages carry a strict Content-Security-Policy: no
inline script or style, only this module's stylesheet and script from
``/ui/static/``. Progress bars are CSS widths by class (``w0`` … ``w100``),
so no ``style`` attribute is needed. The script polls the same URL with
``?fragment=1`` every :data:`REFRESH_SECONDS` and swaps the ``<main>``
element (not while the filter form has the focus); with JavaScript off the
page is complete, only not live.

With a read token (``hq --ui-token-file``) every view request must carry it,
either as ``Authorization: Bearer <token>`` (scripts) or as the password of
HTTP Basic authentication with any user name (browsers ask for it). The
token covers the view only, not ``/healthz`` or the relay API.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from reconciler.plan import ClientState, Reason
from reconciler.report import (
    HqReport,
    JobReport,
    StatusRow,
    clients_label,
    liveness_label,
    relay_tree,
    short,
    state_label,
)
from reconciler.serving import StartResponse

UI_PREFIX = "/ui/"
JOBS_PREFIX = "/ui/jobs/"
STATIC_PREFIX = "/ui/static/"
PAGE_SIZE = 100
REFRESH_SECONDS = 5
MAX_QUERY = 2048  # characters of a query string read; longer ones are cut

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
"""No inline script or style anywhere: a value that escaped escaping still could not run."""

STATE_ORDER = (ClientState.SUCCEEDED, ClientState.IN_PROGRESS, ClientState.PENDING, ClientState.FAILED,
               ClientState.CONFLICT, ClientState.SKIPPED, ClientState.SUSPENDED)

STYLESHEET = "\n".join([
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
    "table{border-collapse:collapse;margin:.5em 0 1.5em}",
    "th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}",
    "td:first-child{white-space:nowrap}",
    "td.n{text-align:right;font-variant-numeric:tabular-nums}",
    ".bar{display:flex;width:12em;height:.9em;background:#eee;border-radius:3px;overflow:hidden}",
    ".bar span{display:block;height:100%}",
    ".s-Succeeded{background:#2e7d32}.s-InProgress{background:#1565c0}.s-Pending{background:#90caf9}",
    ".s-Failed{background:#c62828}.s-Conflict{background:#ef6c00}.s-Skipped{background:#9e9e9e}",
    ".s-Suspended{background:#6d4c41}",
    ".lost{color:#c62828;font-weight:bold}.errors li,.failure{color:#b71c1c}",
    ".msg{white-space:pre-wrap;word-break:break-word;max-width:50em}",
    "form label{margin-right:.8em}",
    *(f".w{n}{{width:{n}%}}" for n in range(101)),
])

SCRIPT = """\
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh")) || 5;
  function refresh() {
    var active = document.activeElement;
    if (active && active.closest && active.closest("main form")) { return; }  // never under the user's hands
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("main");
        var current = document.querySelector("main");
        if (fresh && current) { current.replaceWith(fresh); }
      })
      .catch(function () {});
  }
  window.setInterval(refresh, seconds * 1000);
})();
"""


@dataclass(frozen=True)
class Snapshot:
    """What the view shows between two passes: HQ's report and each relay's counts over every job."""

    report: HqReport
    relay_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    relay_refs: tuple[tuple[str, str], ...] = ()  # (relay, status ref sha) the report was read from, in tree order


@dataclass(frozen=True)
class RowFilter:
    """The job page's query: only rows in ``state``, on ``relay``, with ``reason`` (None: any); a page from 1."""

    state: str | None = None
    relay: str | None = None
    reason: str | None = None
    page: int = 1

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> RowFilter:
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        return cls(query.get("state") or None, query.get("relay") or None, query.get("reason") or None, page)

    def matches(self, relay: str, row: StatusRow) -> bool:
        return ((self.state is None or row.state.value == self.state)
                and (self.relay is None or relay == self.relay)
                and (self.reason is None or (row.reason or "") == self.reason))

    def query(self, **changes: Any) -> str:
        values = {"state": self.state, "relay": self.relay, "reason": self.reason, "page": self.page, **changes}
        return urlencode({k: v for k, v in values.items() if v is not None and not (k == "page" and v == 1)})


def select_rows(rows: Iterable[tuple[str, StatusRow]], wanted: RowFilter,
                page_size: int = PAGE_SIZE) -> tuple[list[tuple[str, StatusRow]], int]:
    """The rows of ``wanted``'s page and how many rows match in all."""
    start = (wanted.page - 1) * page_size
    selected: list[tuple[str, StatusRow]] = []
    total = 0
    for relay, row in rows:
        if wanted.matches(relay, row):
            if start <= total < start + page_size:
                selected.append((relay, row))
            total += 1
    return selected, total


# ---------------------------------------------------------------- rendering


def job_url(job: str) -> str:
    return JOBS_PREFIX + quote(job, safe="")


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def progress_bar(counts: Mapping[str, int]) -> str:
    """A stacked bar of the states, widths by class (the CSP allows no inline style)."""
    total = sum(counts.values())
    parts = []
    for state in STATE_ORDER:
        n = counts.get(state.value, 0)
        if n and total:
            width = max(1, round(100 * n / total))
            parts.append(f'<span class="s-{state.value} w{width}" title="{_e(state.value)}: {n}"></span>')
    done = counts.get(ClientState.SUCCEEDED.value, 0)
    label = f"{done} of {total} succeeded"
    return f'<div class="bar" role="img" aria-label="{_e(label)}">{"".join(parts)}</div>'


def counts_cells(counts: Mapping[str, int]) -> str:
    return "".join(f'<td class="n" data-state="{s.value}">{counts.get(s.value, 0)}</td>' for s in STATE_ORDER)


def _state_headers() -> str:
    return "".join(f"<th>{s.value}</th>" for s in STATE_ORDER)


def _page(title: str, main: str, fragment: bool) -> str:
    body = f'<main id="content">{main}</main>'
    if fragment:
        return body
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title>"
            f'<link rel="stylesheet" href="{STATIC_PREFIX}web.css">'
            f'<script src="{STATIC_PREFIX}web.js" defer></script></head>'
            f'<body data-refresh="{REFRESH_SECONDS}"><header><a href="{UI_PREFIX}">reconciler HQ</a></header>'
            f"{body}</body></html>\n")


def _heading(report: HqReport) -> str:
    accepted = report.accepted
    validity = {True: "valid", False: "INVALID", None: "absent"}[accepted.main_valid]
    parts = [f'<p>Accepted commit <code id="accepted-commit">{_e(accepted.accepted_commit or "none")}</code>; '
             f'{_e(report.branch)} <code>{_e(short(accepted.main_commit))}</code> '
             f'<span id="main-validity">{validity}</span></p>']
    if accepted.evaluation_error is not None:
        err = accepted.evaluation_error
        parts.append(f'<p class="failure">Cannot evaluate <code>{_e(short(err.commit))}</code>: '
                     f'<span class="msg">{_e(err.message)}</span></p>')
    if report.validation_errors:
        items = "".join(f"<li><code>{_e(e.path)}</code>: <span class=\"msg\">{_e(e.message)}</span></li>"
                        for e in report.validation_errors)
        parts.append(f'<h2>Validation errors of {_e(short(accepted.main_commit))}</h2>'
                     f'<ul class="errors" id="validation-errors">{items}</ul>')
    return "".join(parts)


def render_overview(snapshot: Snapshot | None, *, fragment: bool = False) -> str:
    """The job list and the relay tree."""
    if snapshot is None:
        return _page("reconciler HQ", "<p>HQ has not finished its first pass yet.</p>", fragment)
    report = snapshot.report
    rows = []
    for job in report.jobs:
        total = sum(job.counts.values())
        rows.append(f'<tr data-job="{_e(job.job)}"><td><a href="{_e(job_url(job.job))}">{_e(job.job)}</a></td>'
                    f"<td>{_e(state_label(job))}</td><td>{progress_bar(job.counts)}</td>"
                    f'{counts_cells(job.counts)}<td class="n">{total}</td></tr>')
    jobs = (f'<table id="jobs"><thead><tr><th>Job</th><th>State</th><th>Progress</th>{_state_headers()}'
            f'<th>Total</th></tr></thead><tbody>{"".join(rows)}</tbody></table>' if rows else "<p>No jobs.</p>")
    relays = []
    for depth, r in relay_tree(report.relays):
        counts = snapshot.relay_counts.get(r.relay, {})
        live = liveness_label(r)
        live_class = ' class="lost"' if live.startswith("LOST") else ""
        commit = "no status" if not r.reported else ("current" if r.current else short(r.observed_commit))
        errors = "".join(f'<div class="failure msg">{_e(e)}</div>' for e in r.errors)
        relays.append(f'<tr data-relay="{_e(r.relay)}"><td>{"&nbsp;&nbsp;" * depth}{_e(r.relay)}</td>'
                      f"<td{live_class}>{_e(live)}</td><td>{_e(commit)}</td><td>{_e(clients_label(r))}</td>"
                      f"<td>{progress_bar(counts)}</td>{counts_cells(counts)}<td>{errors}</td></tr>")
    relay_table = (f'<table id="relays"><thead><tr><th>Relay</th><th>Liveness</th><th>Commit</th>'
                   f"<th>Clients (on/off/all)</th><th>Progress</th>{_state_headers()}<th>Errors</th></tr></thead>"
                   f'<tbody>{"".join(relays)}</tbody></table>' if relays else "<p>No relays.</p>")
    main = f"{_heading(report)}<h2>Jobs</h2>{jobs}<h2>Relays</h2>{relay_table}"
    return _page("reconciler HQ", main, fragment)


def _job_summary(job: JobReport) -> str:
    destinations = "".join(
        f'<tr><td>{_e(d.relay)}</td><td>{_e(d.state.value)}</td><td>{progress_bar(d.counts)}</td>'
        f"{counts_cells(d.counts)}</tr>" for d in job.relays)
    version = f" {_e(job.version)}" if job.version else ""
    return (f"<h1>Job {_e(job.job)}</h1><p>{_e(job.job_type)} {_e(job.package)}{version}: "
            f'<span id="job-state">{_e(state_label(job))}</span></p>{_reboots(job)}'
            f'<table id="job-counts"><thead><tr><th>Progress</th>{_state_headers()}</tr></thead>'
            f"<tbody><tr><td>{progress_bar(job.counts)}</td>{counts_cells(job.counts)}</tr></tbody></table>"
            f'<h2>Destinations</h2><table id="destinations"><thead><tr><th>Relay</th><th>State</th>'
            f"<th>Progress</th>{_state_headers()}</tr></thead><tbody>{destinations}</tbody></table>")


def _reboots(job: JobReport) -> str:
    """How many clients wait for a reboot, linking to their rows (the reason filter); nothing when none."""
    if not job.reboot_required:
        return ""
    link = f"{job_url(job.job)}?{RowFilter(reason=Reason.REBOOT_REQUIRED.value).query()}"
    return (f'<p id="reboots">Succeeded, <a href="{_e(link)}">{job.reboot_required} waiting for a reboot</a>'
            "</p>")


def _failures(job: JobReport) -> str:
    if not job.failures:
        return ""
    items = "".join(f'<tr class="failure"><td>{_e(f.relay)}</td><td>{_e(f.client)}</td><td>{_e(f.state.value)}</td>'
                    f'<td class="n">{f.attempts}</td><td class="msg">{_e(f.message)}</td></tr>' for f in job.failures)
    more = (f"<p>{job.failure_count - len(job.failures)} more not listed.</p>"
            if job.failure_count > len(job.failures) else "")
    return (f'<h2>Failures ({job.failure_count})</h2><table id="failures"><thead><tr><th>Relay</th><th>Client</th>'
            f"<th>State</th><th>Attempts</th><th>Message</th></tr></thead><tbody>{items}</tbody></table>{more}")


def _select(name: str, options: Sequence[str], chosen: str | None) -> str:
    opts = ['<option value="">any</option>'] + [
        f'<option value="{_e(o)}"{" selected" if o == chosen else ""}>{_e(o)}</option>' for o in options]
    return f'<label>{name} <select name="{name}">{"".join(opts)}</select></label>'


def render_job(snapshot: Snapshot | None, job_name: str, rows: Sequence[tuple[str, StatusRow]] | None,
               wanted: RowFilter, *, fragment: bool = False, page_size: int = PAGE_SIZE) -> str | None:
    """A job's page; None when the report has no such job. ``rows`` None: the relays' rows are unreadable."""
    if snapshot is None:
        return render_overview(None, fragment=fragment)
    job = next((j for j in snapshot.report.jobs if j.job == job_name), None)
    if job is None:
        return None
    reasons = sorted({r.reason for _, r in rows or () if r.reason})
    form = (f'<form method="get" action="{_e(job_url(job.job))}" id="filter">'
            f"{_select('state', [s.value for s in STATE_ORDER], wanted.state)}"
            f"{_select('relay', [d for d in (r.relay for r in snapshot.report.relays)], wanted.relay)}"
            f"{_select('reason', reasons, wanted.reason)}"
            '<button type="submit">Filter</button></form>')
    if rows is None:
        table = "<p>The relays' client rows cannot be read now.</p>"
    else:
        page, total = select_rows(rows, wanted, page_size)
        pages = max(1, -(-total // page_size))
        body = "".join(
            f'<tr data-client="{_e(row.client)}" data-state="{_e(row.state.value)}"><td>{_e(relay)}</td>'
            f"<td>{_e(row.client)}</td><td>{_e(row.state.value)}</td><td>{_e(row.reason or '')}</td>"
            f"<td>{_e(row.installed_version or '')}</td><td class=\"n\">{row.attempts}</td>"
            f'<td class="msg">{_e(row.message)}</td></tr>' for relay, row in page)
        nav = []
        if wanted.page > 1:
            nav.append(f'<a rel="prev" href="{_e(job_url(job.job) + "?" + wanted.query(page=wanted.page - 1))}">'
                       "previous</a>")
        if wanted.page < pages:
            nav.append(f'<a rel="next" href="{_e(job_url(job.job) + "?" + wanted.query(page=wanted.page + 1))}">'
                       "next</a>")
        table = (f'<p id="row-count">{total} matching client{"s" if total != 1 else ""}, page {wanted.page} of '
                 f'{pages}</p><table id="rows"><thead><tr><th>Relay</th><th>Client</th><th>State</th><th>Reason</th>'
                 f"<th>Installed</th><th>Attempts</th><th>Message</th></tr></thead><tbody>{body}</tbody></table>"
                 f'<nav>{" ".join(nav)}</nav>')
    main = f"{_heading(snapshot.report)}{_job_summary(job)}{_failures(job)}<h2>Clients</h2>{form}{table}"
    return _page(f"Job {job.job} - reconciler HQ", main, fragment)


# --------------------------------------------------------------------- WSGI


def _respond(start_response: StartResponse, status: str, body: str, content_type: str = "text/html; charset=utf-8",
             extra: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    data = body.encode("utf-8")
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data))),
                            ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                            ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"), *extra])
    return [data]


def authorized(environ: Mapping[str, Any], token: bytes | None) -> bool:
    """Whether the request carries the read token (always, without one): Bearer, or Basic's password."""
    if token is None:
        return True
    header = str(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, value = header.partition(" ")
    given: bytes | None = None
    if scheme.lower() == "bearer":
        given = value.strip().encode("utf-8")
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    return given is not None and hmac.compare_digest(given, token)


def _query(environ: Mapping[str, Any]) -> dict[str, str]:
    raw = str(environ.get("QUERY_STRING", ""))[:MAX_QUERY]
    return {k: v[0] for k, v in parse_qs(raw).items()}


class WebView:
    """The view's WSGI routes; ``route`` answers a view path and returns None for any other."""

    def __init__(self, snapshot: Callable[[], Snapshot | None],
                 job_rows: Callable[[str], Sequence[tuple[str, StatusRow]] | None], token: bytes | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        self.snapshot = snapshot
        self.job_rows = job_rows
        self.token = token
        self.page_size = page_size

    def route(self, path: str, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes] | None:
        if not (path == "/" or path.startswith(UI_PREFIX) or path == UI_PREFIX.rstrip("/")):
            return None
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "use GET", "text/plain; charset=utf-8",
                            [("Allow", "GET, HEAD")])
        if path == STATIC_PREFIX + "web.css":
            return _respond(start_response, "200 OK", STYLESHEET, "text/css; charset=utf-8")
        if path == STATIC_PREFIX + "web.js":
            return _respond(start_response, "200 OK", SCRIPT, "text/javascript; charset=utf-8")
        if not authorized(environ, self.token):
            return _respond(start_response, "401 Unauthorized", "the web view needs its read token",
                            "text/plain; charset=utf-8",
                            [("WWW-Authenticate", 'Basic realm="reconciler hq", charset="UTF-8"')])
        query = _query(environ)
        fragment = query.get("fragment") == "1"
        if path in ("/", UI_PREFIX, UI_PREFIX.rstrip("/")):
            return _respond(start_response, "200 OK", render_overview(self.snapshot(), fragment=fragment))
        if path.startswith(JOBS_PREFIX):
            name = path[len(JOBS_PREFIX):].encode("latin-1", "replace").decode("utf-8", "replace")  # PEP 3333
            snapshot = self.snapshot()
            known = snapshot is not None and any(j.job == name for j in snapshot.report.jobs)
            rows = self.job_rows(name) if known else None
            page = render_job(snapshot, name, rows, RowFilter.from_query(query), fragment=fragment,
                              page_size=self.page_size)
            if page is not None:
                return _respond(start_response, "200 OK", page)
        return _respond(start_response, "404 Not Found", _page("not found", "<p>No such page.</p>", fragment))
