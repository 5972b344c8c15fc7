"""The ``dependsOn`` of an install action, and whether this client meets it right now.

The relay plans dependencies (a dependent goes out with or after its
dependency), but it plans from the inventory of the *last* check-in. Actions
of one reply run in order, and the dependency sent first may fail, be
refused, or time out; the dependent must then not run on top of nothing. So
the agent checks, just before it would run the dependent, the same thing it
reports as its inventory: a receipt confirmed against the machine (files
present, ``detect`` exits 0), or what the package's detection rule finds
(detection.py), at ``minVersion`` or newer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler import names
from reconciler.agent.detection import installed_now
from reconciler.agent.errors import InstallError
from reconciler.agent.installers import Layout
from reconciler.versions import at_least

MAX_DEPENDENCIES = 64
_KEYS = frozenset({"name", "minVersion"})


@dataclass(frozen=True)
class Dependency:
    """One entry of ``dependsOn``: a software name and the lowest acceptable version, if any."""

    name: str
    min_version: str | None = None

    def describe(self) -> str:
        return self.name if self.min_version is None else f"{self.name} (>= {self.min_version})"


def parse_depends_on(value: Any) -> tuple[Dependency, ...]:
    """Validate an action's ``dependsOn``; a malformed one makes the action fail (:class:`InstallError`).

    Unknown keys are refused rather than ignored: a constraint the agent does
    not understand must not be taken as met.
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InstallError("invalid dependsOn: must be a list")
    if len(value) > MAX_DEPENDENCIES:
        raise InstallError(f"invalid dependsOn: at most {MAX_DEPENDENCIES} dependencies, got {len(value)}")
    out = []
    for index, item in enumerate(value):
        where = f"invalid dependsOn[{index}]"
        if not isinstance(item, dict):
            raise InstallError(f"{where}: must be an object")
        unknown = sorted(str(key) for key in item if key not in _KEYS)
        if unknown:
            raise InstallError(f"{where}: unknown key {unknown[0]!r}")
        name, minimum = item.get("name"), item.get("minVersion")
        if not isinstance(name, str) or not names.is_name(name):
            raise InstallError(f"{where}.name: {name!r} is not a software name")
        if minimum is not None and not (isinstance(minimum, str) and names.is_version(minimum)):
            raise InstallError(f"{where}.minVersion: {minimum!r} is not a version")
        out.append(Dependency(name, minimum))
    return tuple(out)


def unmet(layout: Layout, dependencies: tuple[Dependency, ...]) -> str | None:
    """Why the first unmet dependency is unmet, or ``None`` when every one is installed and confirmed."""
    for dependency in dependencies:
        entry = installed_now(layout, dependency.name)
        if entry is None:
            return f"dependency {dependency.describe()} is not installed"
        if dependency.min_version is not None and not at_least(entry["version"], dependency.min_version):
            return f"dependency {dependency.describe()} is not installed ({entry['version']} is)"
    return None
