"""What the relay and the agent may say to each other: fact vocabularies and size limits of a check-in.

One definition for both ends, so an agent refuses at start-up what its relay
would refuse at every check-in (a 300-character host name, a label value
over 256 characters), instead of failing every check-in with a 400.
``docs/PROTOCOL.md`` describes the messages these limits apply to.
"""

from __future__ import annotations

FACT_KEYS = ("os", "arch", "hostname", "freeDiskMB")
OS_VALUES = ("linux", "windows", "darwin")
ARCH_VALUES = ("x86_64", "arm64", "x86")
MAX_HOSTNAME = 255
MAX_FREE_DISK_MB = 2**53 - 1  # the largest integer every JSON reader holds exactly
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_BODY = 1024 * 1024
MAX_INVENTORY = 2000
MAX_RESULTS = 1000
MAX_MESSAGE = 64 * 1024


def label_problem(key: str, value: str) -> str | None:
    """Why a label cannot be sent, or None."""
    if not key or len(key) > MAX_LABEL_KEY:
        return f"label keys must be 1 to {MAX_LABEL_KEY} characters, got {len(key)}"
    if len(value) > MAX_LABEL_VALUE:
        return f"label {key!r} must be at most {MAX_LABEL_VALUE} characters, got {len(value)}"
    return None


def fact_problem(key: str, value: object) -> str | None:
    """Why a fact cannot be sent, or None (``key`` is one of FACT_KEYS)."""
    if key == "os" and value not in OS_VALUES:
        return f"fact os must be one of {', '.join(OS_VALUES)}, got {value!r}"
    if key == "arch" and value not in ARCH_VALUES:
        return f"fact arch must be one of {', '.join(ARCH_VALUES)}, got {value!r}"
    if key == "hostname" and (not isinstance(value, str) or len(value) > MAX_HOSTNAME):
        return f"fact hostname must be a string of at most {MAX_HOSTNAME} characters"
    if key == "freeDiskMB" and (not isinstance(value, int) or isinstance(value, bool)
                                or not 0 <= value <= MAX_FREE_DISK_MB):
        return f"fact freeDiskMB must be an integer from 0 to {MAX_FREE_DISK_MB}, got {value!r}"
    return None
