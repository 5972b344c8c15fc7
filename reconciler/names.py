"""The shapes of names and ids, defined once and matched against whole strings.

Every name, id and digest the system passes around (spec names, relay names,
client ids, package versions, operation ids, tokens, sha256 digests) has one
pattern here, and every check uses :func:`re.fullmatch` through the helpers
below. A pattern anchored with ``^...$`` and used with ``re.match`` or
``re.search`` accepts a trailing newline (``$`` matches before a final
``\\n`` in Python), which let ``"pc-01\\n"`` register as a second client that
prints as ``pc-01``. The JSON Schemas in ``schemas/`` carry the same patterns
with ECMA-262 anchors (``^...$``, where ``$`` means the end of input);
:func:`schema_pattern` gives that form, and ``tests/test_names.py`` keeps the
schemas and this module in step.
"""

from __future__ import annotations

import re
from typing import TypeGuard

# Spec names (metadata.name, relay names, software names) and client ids: a
# DNS label with dots, 1 to 63 characters. They become file names and git
# branch names (``status/<relay>``), so no ``..`` and no ``.lock`` ending,
# which git refuses in a ref.
NAME = r"(?!.*\.lock$)[a-z0-9]((?:[a-z0-9-]|\.(?!\.)){0,61}[a-z0-9])?"
VERSION = r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}"
SHA256 = r"[0-9a-f]{64}"
OPERATION_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
TOKEN = r"[A-Za-z0-9_-]{16,128}"
LABEL_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})"
COMMIT = r"[0-9a-f]{40}([0-9a-f]{24})?"
# A client's boot id (the check-in's bootId fact and result field): Linux's boot_id (a UUID), Windows' boot
# counter, a boot time; it changes at every boot of the machine.
BOOT_ID = r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}"
# A notification receiver's URL (topology.yaml spec.notifications[].url): http(s), a host, no whitespace.
HTTP_URL = r"https?://[^\s/?#]+[^\s]*"
# A file name inside a directory given on the command line (a notification's secretFile): no path, no dot first.
FILE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# Text of the OS's software inventory (a software name or version): anything but C0 and C1 control characters.
SOFTWARE_TEXT = r"[^\u0000-\u001f\u007f-\u009f]*"
# A machine-readable reason or problem kind in a status file (``retryBackoff``,
# ``unreachable``): lower camel case. The vocabularies stay open, so a reader
# of an older version accepts a reason a newer relay writes.
REASON = r"[a-z][A-Za-z]{0,63}"
# A time as status files write it: UTC, whole seconds.
UTC_TIME = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
# An RFC 3339 date-time with an offset, in the years 1970 to 9999 (schedule
# times): every field in its range, so what the schema lets through converts
# to UTC without overflow.
TIME = (r"(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]"
        r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")

# Native installers (docs/INSTALLERS.md): an MSI ProductCode as Windows Installer requires it and the
# registry spells it (an upper-case GUID in braces), a public property name msiexec takes on its command
# line and a value it can carry there (no double quote, no control character), and a package manager's
# package name (rpm's shape; Debian's rule, policy 5.6.1, is narrower).
MSI_PRODUCT_CODE = r"\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}"
MSI_PROPERTY = r"[A-Z][A-Z0-9_.]*"
MSI_PROPERTY_VALUE = r'[^"\u0000-\u001f]*'
PACKAGE_NAME = r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}"
DEB_PACKAGE_NAME = r"[a-z0-9][a-z0-9+.-]{1,127}"

_NAME = re.compile(NAME)
_VERSION = re.compile(VERSION)
_SHA256 = re.compile(SHA256)
_OPERATION_ID = re.compile(OPERATION_ID)
_TOKEN = re.compile(TOKEN)
_LABEL_KEY = re.compile(LABEL_KEY)
_COMMIT = re.compile(COMMIT)
_BOOT_ID = re.compile(BOOT_ID)


def schema_pattern(pattern: str) -> str:
    """The pattern as a JSON Schema ``pattern`` (ECMA-262, anchored at both ends)."""
    return f"^{pattern}$"


def _full(compiled: re.Pattern[str], value: object) -> TypeGuard[str]:
    return isinstance(value, str) and compiled.fullmatch(value) is not None


def is_name(value: object) -> TypeGuard[str]:
    """A spec name, relay name or software name."""
    return _full(_NAME, value)


def is_client_id(value: object) -> TypeGuard[str]:
    """A client id (the same shape as a name: it becomes a file name and a URL segment)."""
    return _full(_NAME, value)


def is_version(value: object) -> TypeGuard[str]:
    return _full(_VERSION, value)


def is_sha256(value: object) -> TypeGuard[str]:
    return _full(_SHA256, value)


def is_operation_id(value: object) -> TypeGuard[str]:
    return _full(_OPERATION_ID, value)


def is_token(value: object) -> TypeGuard[str]:
    return _full(_TOKEN, value)


def is_label_key(value: object) -> TypeGuard[str]:
    return _full(_LABEL_KEY, value)


def is_commit(value: object) -> TypeGuard[str]:
    return _full(_COMMIT, value)


def is_boot_id(value: object) -> TypeGuard[str]:
    return _full(_BOOT_ID, value)
