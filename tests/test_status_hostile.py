"""Status built from hostile client text stays inert: summary.md rendered as GitHub renders it, the status
files, and ``reconciler status`` in a terminal.

Relays publish rows whose messages, skip reasons, relay errors, host names and labels are attacks on a
Markdown renderer (links, images, raw HTML, table-breaking pipes and newlines) and on a terminal (ANSI,
OSC 8 hyperlinks, bidi overrides); HQ aggregates them for real; the assertions are on the HTML that a
GFM renderer (markdown-it-py's ``gfm-like`` preset: tables, autolinked URLs and e-mail addresses, raw
HTML allowed) makes of ``summary.md``, and on the bytes of every status file and of the terminal report.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from test_hq import Origin, hq_pass, run_cli
from test_report import NAMED_JOBS

from reconciler import report
from reconciler.gitstore import GitStore
from reconciler.plan import ClientState, JobRollup, JobState, Plan, Reason, Row

HOSTILE = [
    "[re-enter your password](https://evil.example/login)",
    "![tracker](https://evil.example/p.png)",
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "<a href='https://evil.example'>docs</a>",
    "<https://evil.example/angle>",
    "see https://evil.example/bare and www.evil.example and ftp://evil.example/f",
    "mail admin@evil.example now",
    "[ref]: https://evil.example/refdef",
    "[ref] [ref][] [x][ref]",
    "javascript:alert(1)",
    "a | b | c",
    "first line\n| injected | row |\n| --- | --- |",
    "\\| escaped pipe \\\\| again",
    "`tick` ``two`` ```three",
    "&lt;script&gt; &#60;img&#62; &amp;",
    "\x1b[31mred\x1b[0m \x1b[2J clear",
    "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07 osc8",
    "\x9b31m C1 CSI \x9d0;title\x9c",
    "bell\x07 backspace\x08 nul\x00 del\x7f",
    "\u202egnp.exe bidi \u2066isolate\u2069",
    "line\r\ncarriage\rreturn",
    "*bold* _em_ ~~strike~~ # not a heading",
]
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # tab and newline are layout
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
JOB = "install-7zip"  # reaches every relay of the example repo


def _relay_files(relay: str, commit: str, offset: int) -> dict[str, bytes]:
    rows = []
    for i, text in enumerate(HOSTILE):
        client = f"pc-{relay.removeprefix('relay-')}-{i:03d}"
        state = ClientState.FAILED if i % 3 else ClientState.SKIPPED
        rows.append(Row(JOB, relay, client, state, None, "7zip", "23.01", None, 1 if state is ClientState.FAILED else 0,
                        HOSTILE[(i + offset) % len(HOSTILE)],
                        Reason.REQUIREMENTS if state is ClientState.SKIPPED else None))
    rows.sort(key=lambda r: r.client)
    counts = report.count_states(r.state for r in rows)
    plan = Plan(relay, tuple(rows), (), (JobRollup(JOB, JobState.FAILED, counts),))
    inventory = [report.InventoryEntry(r.client, {"os": "linux", "arch": "x86_64", "freeDiskMB": 10,
                                                  "hostname": HOSTILE[(n + offset) % len(HOSTILE)][:255]},
                                       {"dept": HOSTILE[n % len(HOSTILE)][:256]}, (), True)
                 for n, r in enumerate(rows)]
    errors = [HOSTILE[(offset + 3) % len(HOSTILE)], HOSTILE[(offset + 7) % len(HOSTILE)]]
    return report.render_relay_status(relay, commit, plan, {(r.job, r.client): T0 for r in rows}, inventory,
                                      errors, named_jobs=NAMED_JOBS)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Origin, Path]:
    base = tmp_path_factory.mktemp("hostile")
    origin = Origin(base)
    hq = hq_pass(origin, base / "hq")
    for offset, relay in enumerate(("relay-kanto", "relay-yokohama", "relay-osaka", "relay-fukuoka")):
        GitStore(str(origin.bare), base / "relays" / relay).publish(
            f"status/{relay}", _relay_files(relay, origin.head, offset), f"status of {relay}")
    # a broken main whose errors quote hostile text: validation errors reach summary.md too
    origin.commit("hostile job", lambda w: (w / "jobs" / "evil.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: '[x](https://evil.example) <b>|</b>'}\n"
        "spec: {jobType: '<img src=x>', package: {name: '![i](https://evil.example/i.png)'}}\n"))
    hq.run_pass()
    return origin, base


class _Html(HTMLParser):
    """Tags, attributes and tables of rendered HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.tables: list[list[list[str]]] = []  # table -> row -> cell kinds (th/td)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(tag)


def _render(markdown: str) -> tuple[str, _Html]:
    md = MarkdownIt("gfm-like")  # tables, strikethrough, linkify; raw HTML passes through
    tokens = md.parse(markdown)
    raw = [t for t in tokens if t.type == "html_block"] + [
        c for t in tokens if t.children for c in t.children if c.type == "html_inline"]
    assert raw == [], f"raw HTML reached the renderer: {[t.content for t in raw][:3]}"
    html = md.renderer.render(tokens, md.options, {})
    parser = _Html()
    parser.feed(html)
    return html, parser


def test_summary_md_renders_without_links_images_html_or_broken_rows(published: tuple[Origin, Path]) -> None:
    origin, _ = published
    summary = origin.files("status/hq")["summary.md"].decode("utf-8")
    assert "## Failures" in summary and "## Validation errors" in summary and "## Relays" in summary
    html, parsed = _render(summary)
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"a", "img", "script", "iframe", "b", "svg", "style", "link"}, sorted(tags)
    assert not any(name.startswith("on") or value and "evil.example" in value
                   for _, attrs in parsed.tags for name, value in attrs)
    assert CONTROL.search(html) is None and CONTROL.search(summary) is None
    assert parsed.tables, "summary.md has tables"
    for table in parsed.tables:
        assert len({len(row) for row in table}) == 1, f"a row with a different number of cells: {table}"
    failures = next(t for t in parsed.tables if len(t[0]) == 6)  # Job Relay Client State Attempts Message
    listed = summary.split("## Failures (")[1].split(")")[0]
    assert len(failures) - 1 == min(int(listed), report.FAILURE_LIMIT)
    # the hostile text is still there to read, as text
    assert "re-enter your password" in html and "evil.example" in html
    # GitHub also links bare e-mail addresses (this renderer does not): their @ is an entity in summary.md
    assert "admin&#64;evil.example" in summary and "admin@evil.example" not in summary


def test_status_files_hold_no_control_or_bidi_characters(published: tuple[Origin, Path]) -> None:
    origin, _ = published
    for ref in ("status/hq", "status/relay-kanto", "status/relay-osaka"):
        files = origin.files(ref)
        assert files
        for path, data in files.items():
            text = data.decode("utf-8")
            assert CONTROL.search(text) is None, f"{ref}:{path}: {CONTROL.search(text)!r}"


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_the_terminal_report_holds_no_control_or_bidi_characters(published: tuple[Origin, Path], fmt: str) -> None:
    origin, base = published
    proc = run_cli("status", "--origin", str(origin.bare), "--format", fmt,
                   extra_env={"XDG_CACHE_HOME": str(base / f"cache-{fmt}")})
    assert proc.returncode == 0, proc.stderr
    assert "evil.example" in proc.stdout
    for stream in (proc.stdout, proc.stderr):
        assert CONTROL.search(stream) is None, repr(CONTROL.search(stream))


def test_the_renderer_used_here_does_make_links_images_and_html_of_unescaped_text() -> None:
    """The checks above could fail: fed the hostile text unescaped, this renderer makes the dangerous HTML."""
    md = MarkdownIt("gfm-like")
    html = md.render("see https://evil.example/x and admin@evil.example [a](https://e.example) "
                     "![i](https://e.example/i.png)\n\n<script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")
    parser = _Html()
    parser.feed(html)
    tags = [tag for tag, _ in parser.tags]
    assert tags.count("a") == 2 and "img" in tags and "script" in tags
    with pytest.raises(AssertionError, match="raw HTML"):
        _render("<b>x</b>")
