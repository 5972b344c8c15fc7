"""The shape of a package's detection rule (``spec.detect``), checked the same way by ``validate`` and the agent.

A rule says how a client finds out whether a piece of software is installed,
and at which version, whoever installed it. Exactly one of:

``command``
    an argv run without a shell: exit 0 means present, anything else absent.
    The version is the first line of its standard output, or the one group
    of ``versionPattern`` searched in that output.
``file``
    a path: present when it exists. With ``versionPattern``, the version is
    the pattern's group searched in the file's first :data:`MAX_FILE_READ`
    bytes.
``registry``
    a Windows registry value (``key`` and ``value``): present when the value
    exists; its data (through ``versionPattern`` if given) is the version.
    On other systems the rule never matches.

Present without a readable version means "present at the package's own
version". Placeholders (:data:`PLACEHOLDERS`) may appear in the argv, the
path and the registry key; any other ``${...}`` is refused.

Pure: values in, problems out. :mod:`reconciler.specs` reports the problems
with file:line:column; :mod:`reconciler.agent.detection` checks a rule that
arrives in an action again before running it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from reconciler.redaction import redact_pattern_problem

RULE_KINDS: Final = ("command", "file", "registry")
# Placeholders of detection rules: the installer's three, and the usual install roots.
# ${PYTHON}, ${ROOT} and ${PACKAGE_DIR} are the agent's (installers.substitute); the others
# come from the client's environment variable of that name (PROGRAMFILES_X86 reads
# "ProgramFiles(x86)"), and a rule using one that is not set there does not match.
AGENT_PLACEHOLDERS: Final = ("PYTHON", "ROOT", "PACKAGE_DIR")
ENVIRONMENT_PLACEHOLDERS: Final = {
    "PROGRAMFILES": "ProgramFiles",
    "PROGRAMFILES_X86": "ProgramFiles(x86)",
    "PROGRAMDATA": "ProgramData",
    "LOCALAPPDATA": "LOCALAPPDATA",
    "APPDATA": "APPDATA",
    "SYSTEMROOT": "SystemRoot",
    "HOME": "HOME",
}
PLACEHOLDERS: Final = AGENT_PLACEHOLDERS + tuple(ENVIRONMENT_PLACEHOLDERS)
REGISTRY_HIVES: Final = ("HKLM", "HKCU", "HKEY_LOCAL_MACHINE", "HKEY_CURRENT_USER")

MAX_ARGV: Final = 64  # arguments of a detect command
MAX_ARG: Final = 4096  # characters of one argument
MAX_PATH: Final = 1024  # characters of a file path or registry key
MAX_VALUE_NAME: Final = 256  # characters of a registry value name
MAX_PATTERN: Final = 200  # characters of a versionPattern
MAX_TIMEOUT_SECONDS: Final = 60  # a detect command is killed after at most this
MAX_OUTPUT_READ: Final = 64 * 1024  # bytes of a detect command's output read
MAX_FILE_READ: Final = 64 * 1024  # bytes of a file a versionPattern searches
MAX_REGISTRY_DATA: Final = 4096  # characters of a registry value's data read

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def placeholder_problem(text: str) -> str | None:
    """Why ``text`` uses a placeholder no client knows (``${FOO}``), or None."""
    for match in _PLACEHOLDER.finditer(text):
        if match.group(1) not in PLACEHOLDERS:
            shown = match.group(0)[:40]
            return f"unknown placeholder {shown!r} (known: {', '.join('${' + p + '}' for p in PLACEHOLDERS)})"
    return None


def version_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``versionPattern``, or None.

    The same safety as redaction patterns (compiles, at most 200 characters,
    no nested unbounded repetition, does not match the empty string), and
    exactly one capturing group: the version.
    """
    problem = redact_pattern_problem(pattern)
    if problem is not None:
        return problem
    groups = re.compile(pattern).groups
    if groups != 1:
        return f"must have exactly one capturing group (the version), has {groups}"
    return None


def rule_problems(raw: Any) -> list[tuple[str, str]]:
    """Every problem of a rule as ``(field, message)``; the field is relative to the rule (``command/2``).

    Checks what a JSON Schema cannot: placeholders and the pattern. The shape
    (exactly one kind, types, sizes) is checked too, so an agent can use this
    alone on a rule from the wire.
    """
    if not isinstance(raw, Mapping):
        return [("", "must be an object")]
    problems: list[tuple[str, str]] = []
    allowed = (*RULE_KINDS, "versionPattern", "timeoutSeconds")
    for key in raw:
        if key not in allowed:
            problems.append((str(key)[:64], f"unknown field (allowed: {', '.join(allowed)})"))
    kinds = [k for k in RULE_KINDS if k in raw]
    if len(kinds) != 1:
        problems.append(("", f"must have exactly one of {', '.join(RULE_KINDS)}, has "
                             f"{', '.join(kinds) if kinds else 'none'}"))
        return problems
    kind = kinds[0]
    value = raw[kind]
    if kind == "command":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_ARGV:
            problems.append(("command", f"must be a list of 1 to {MAX_ARGV} strings"))
        else:
            for index, arg in enumerate(value):
                if not isinstance(arg, str) or len(arg) > MAX_ARG:
                    problems.append((f"command/{index}", f"must be a string of at most {MAX_ARG} characters"))
                    continue
                problem = placeholder_problem(arg)
                if problem is not None:
                    problems.append((f"command/{index}", problem))
            if isinstance(value[0], str) and not value[0]:
                problems.append(("command/0", "the program must not be empty"))
    elif kind == "file":
        if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH or "\0" in value:
            problems.append(("file", f"must be a path of 1 to {MAX_PATH} characters"))
        else:
            problem = placeholder_problem(value)
            if problem is not None:
                problems.append(("file", problem))
    else:
        problems.extend(_registry_problems(value))
    if "timeoutSeconds" in raw:
        timeout = raw["timeoutSeconds"]
        if kind != "command":
            problems.append(("timeoutSeconds", "only a command rule has a timeout"))
        elif (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not float(timeout).is_integer()
              or not 1 <= timeout <= MAX_TIMEOUT_SECONDS):
            problems.append(("timeoutSeconds", f"must be an integer from 1 to {MAX_TIMEOUT_SECONDS}"))
    if "versionPattern" in raw:
        pattern = raw["versionPattern"]
        if not isinstance(pattern, str):
            problems.append(("versionPattern", "must be a string"))
        else:
            problem = version_pattern_problem(pattern)
            if problem is not None:
                problems.append(("versionPattern", f"pattern {pattern[:60]!r} {problem}"))
    return problems


def _registry_problems(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, Mapping):
        return [("registry", "must be an object with key and value")]
    problems: list[tuple[str, str]] = []
    for key in value:
        if key not in ("key", "value"):
            problems.append((f"registry/{str(key)[:64]}", "unknown field (allowed: key, value)"))
    key = value.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_PATH or "\0" in key:
        problems.append(("registry/key", f"must be a registry key of 1 to {MAX_PATH} characters"))
    else:
        hive = key.replace("/", "\\").split("\\", 1)[0]
        if hive not in REGISTRY_HIVES or "\\" not in key.replace("/", "\\"):
            problems.append(("registry/key", f"must start with one of {', '.join(REGISTRY_HIVES)} and a "
                                             "backslash (HKLM\\SOFTWARE\\...)"))
        problem = placeholder_problem(key)
        if problem is not None:
            problems.append(("registry/key", problem))
    name = value.get("value")
    if not isinstance(name, str) or len(name) > MAX_VALUE_NAME or "\0" in name:
        problems.append(("registry/value", f"must be a value name of at most {MAX_VALUE_NAME} characters "
                                           "(empty for the key's default value)"))
    return problems
