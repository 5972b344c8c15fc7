"""Log set-up shared by the long-running processes (HQ, relay).

One line per event on stderr, with time, level and module, so a service
manager's journal reads like the process's history. The git layer's own
info lines (one per publish) are quieted: each process logs its pass once.
"""

from __future__ import annotations

import logging
import sys


def configure_logging() -> None:
    root = logging.getLogger("reconciler")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("reconciler.gitstore").setLevel(logging.WARNING)
