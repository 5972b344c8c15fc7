"""Shared test set-up.

CI machines may have no git identity configured; tests make real commits, so
give git one through the environment (inherited by every subprocess).
"""

from __future__ import annotations

import os

os.environ.setdefault("GIT_AUTHOR_NAME", "reconciler tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@reconciler.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "reconciler tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@reconciler.invalid")
os.environ.setdefault("GIT_TERMINAL_PROMPT", "0")
