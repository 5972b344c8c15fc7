"""Progress where people wait (``reconciler demo``, ``reconciler status --wait``).

:func:`progress_line` says where each job stands in one line
(``install-7zip 3/5 (1 failed) | install-putty 0/2 (scheduled)``) and
:class:`LiveLine` shows a line that changes: redrawn in place on a terminal
(``\\r``, erase to the end of the line), and on anything else (a pipe, a CI
log) one plain line per change, with no carriage return or escape code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

ERASE_LINE = "\r\033[K"  # back to column 0, erase to the end of the line
FALLBACK_COLUMNS = 120


def progress_line(jobs: Sequence[Mapping[str, Any]]) -> str:
    """One line of per-job counts from jobs as the JSON report has them (``name``, ``state``, ``counts``)."""
    parts = []
    for job in jobs:
        counts = job.get("counts", {})
        total = sum(counts.values())
        done = counts.get("Succeeded", 0)
        failed = counts.get("Failed", 0)
        text = f"{job['name']} {done}/{total}"
        if failed:
            text += f" ({failed} failed)"
        if job.get("state") == "Scheduled":
            text += " (scheduled)"
        parts.append(text)
    if not any(sum(job.get("counts", {}).values()) for job in jobs):
        return "waiting for the relays to report their clients"
    return " | ".join(parts)


def _columns(out: TextIO) -> int:
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns > 0 else FALLBACK_COLUMNS  # a pseudo-terminal nobody sized says 0


class LiveLine:
    """A line that changes: redrawn in place when ``out`` is a terminal, else printed once per change.

    :meth:`show` ignores a line equal to the last one; :meth:`finish` ends a
    redrawn line with a newline, so what is printed next starts on its own line.
    """

    def __init__(self, out: TextIO, *, indent: str = "", tty: bool | None = None) -> None:
        self.out = out
        self.indent = indent
        self.tty = out.isatty() if tty is None else tty
        self.last = ""
        self._open = False  # a redrawn line is on the screen without its newline

    def show(self, line: str) -> None:
        if not line or line == self.last:
            return
        self.last = line
        if self.tty:
            width = _columns(self.out) - len(self.indent) - 1  # never wrap: \r goes back one screen line only
            self.out.write(ERASE_LINE + self.indent + line[: max(width, 1)])
            self._open = True
        else:
            self.out.write(f"{self.indent}{line}\n")
        self.out.flush()

    def finish(self) -> None:
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False
