"""Times as the whole system writes and reads them: RFC 3339, UTC, ``Z`` suffix.

One formatter for status files, the wire protocol, the agent's journal and
plan messages, one reader for all of them, and the one wall clock the shells
default to (pure code takes ``now`` as an argument and never calls
:func:`utc_now` itself).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import overload


def utc_now() -> datetime:
    """The wall clock in UTC: the default clock of every long-running loop."""
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """``moment`` with a time zone; naive times are taken as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


@overload
def format_time(moment: datetime) -> str: ...
@overload
def format_time(moment: None) -> None: ...
def format_time(moment: datetime | None) -> str | None:
    """``2027-04-01T00:00:00Z``: UTC at whole seconds (naive means UTC; None stays None)."""
    if moment is None:
        return None
    return aware(moment).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_precise(moment: datetime) -> str:
    """Like :func:`format_time`, keeping a fraction of a second when there is one."""
    utc = aware(moment).astimezone(timezone.utc)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime | None:
    """The time ``text`` names (naive means UTC); ``None`` for anything that is not RFC 3339."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return aware(moment)
