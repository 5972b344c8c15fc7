"""Version ordering for package versions.

The rule, exactly:

1. A version is split into *segments*: maximal runs of digits (numeric
   segments) and maximal runs of letters (text segments). Every other
   character (``.``, ``-``, ``_``, ``+``, ``~``) only separates segments.
   ``"23.01"`` is ``[23, 1]``; ``"1.0a"`` is ``[1, 0, "a"]``;
   ``"2.0-rc1"`` is ``[2, 0, "rc", 1]``.
2. Numeric segments compare as integers, so leading zeros do not count:
   ``1.10 > 1.9`` and ``23.01 == 23.1``.
3. Text segments compare case-insensitively by their letters:
   ``beta > alpha``, ``RC == rc``.
4. At the same position a numeric segment is newer than a text segment:
   ``1.0.1 > 1.0a``.
5. Trailing zero numeric segments are ignored, so ``2.0 == 2.0.0``.
   Otherwise a version that extends another one is newer:
   ``2.0 < 2.0.1`` and ``1.0 < 1.0a``.

Equal versions under this rule are the *same* version for planning: a client
with ``2.0.0`` installed satisfies a job that wants ``2.0``.

The order is total and consistent with equality, so versions can be sorted.
This mirrors the RPM ``rpmvercmp`` family of rules (numbers beat letters,
longer beats shorter) with trailing zeros ignored as in PEP 440.
"""

from __future__ import annotations

import re
from functools import lru_cache

_SEGMENT = re.compile(r"\d+|[A-Za-z]+")

VersionKey = tuple[tuple[int, int, str], ...]


@lru_cache(maxsize=65536)
def version_key(version: str) -> VersionKey:
    """A sort key implementing the module's rule."""
    parts: list[tuple[int, int, str]] = []
    for match in _SEGMENT.finditer(version):
        text = match.group()
        if text.isdigit():
            parts.append((1, int(text), ""))
        else:
            parts.append((0, 0, text.lower()))
    while parts and parts[-1] == (1, 0, ""):
        parts.pop()
    return tuple(parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, the same as, or newer than ``b``."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def same_version(a: str, b: str) -> bool:
    return version_key(a) == version_key(b)


def at_least(version: str, minimum: str) -> bool:
    """True when ``version`` is ``minimum`` or newer."""
    return version_key(version) >= version_key(minimum)
