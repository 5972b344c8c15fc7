"""Layers you can see, enforced for every module of the package (like import-linter contracts).

Each module of ``reconciler/`` belongs to exactly one layer; a new module
must be placed here before the suite passes. The contracts:

* the **pure core** (specs, versions, plan, report, reach, protocol, …)
  imports no I/O module (``os``, ``gc``, ``subprocess``, ``sqlite3``,
  ``socket``, threads, HTTP, git, a database) and no shell of this package;
* **shared shells** (git, file writes, HTTP serving, logging) import the core
  and each other, never a service or a command;
* the **agent** imports no relay or HQ code; the **relay** imports no HQ
  code; **HQ** imports no relay or agent code;
* **commands** import services, never the reverse; only the CLI imports
  commands.

Imports are read with ``ast``, including imports inside functions, so a
lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"

CORE = {
    "reconciler", "reconciler.specs", "reconciler.versions", "reconciler.names",
    "reconciler.reach", "reconciler.repo_layout", "reconciler.report", "reconciler.protocol", "reconciler.schema_check",
    "reconciler.errors", "reconciler.times", "reconciler.redaction", "reconciler.resources", "reconciler.liveness",
    "reconciler.plan", "reconciler.plan.vocabulary", "reconciler.plan.index", "reconciler.plan.identity", "reconciler.plan.rules",
    "reconciler.plan.engine", "reconciler.detection_rules",
}
SHELLS = {
    "reconciler.gitstore", "reconciler.fileio", "reconciler.repo_tree", "reconciler.logs",
    "reconciler.serving", "reconciler.webhook", "reconciler.credentials", "reconciler.tls", "reconciler.signing",
    "reconciler.packing", "reconciler.signatures", "reconciler.progress", "reconciler.metrics", "reconciler.web",
}
SERVICES = {"reconciler.hq", "reconciler.hq_liveness", "reconciler.hq_manifest", "reconciler.hq_notify", "reconciler.relay",
            "reconciler.agent"}  # packages and modules
COMMANDS = {"reconciler.commands"}
CLI = {"reconciler.cli", "reconciler.__main__", "reconciler.settings"}

IO_MODULES = {
    "os", "gc", "subprocess", "sqlite3", "socket", "threading", "multiprocessing", "asyncio", "signal",
    "shutil", "tempfile", "http", "urllib.request", "requests", "waitress", "cheroot", "ssl", "watchdog", "selectors",
    "concurrent",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def layer_of(name: str) -> str:
    if name in CORE:
        return "core"
    for layer, roots in (("shell", SHELLS), ("service", SERVICES), ("command", COMMANDS), ("cli", CLI)):
        if _within(name, roots):
            return layer
    raise AssertionError(f"module {name} is in no layer: place it in tests/test_layers.py")


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, relative imports resolved, ``from x import y`` as x and x.y."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return {m for m in found if m and m != "__future__"}


def internal(imports: set[str]) -> set[str]:
    """The package's own modules among ``imports`` (``from reconciler import x`` names x)."""
    return {m for m in imports if m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 30
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n in CORE))
def test_the_pure_core_does_no_io(name: str) -> None:
    found = imports_of(name)
    io = sorted(m for m in found if _within(m, IO_MODULES))
    assert io == [], f"{name} imports I/O modules: {io}"
    outside = sorted(m for m in internal(found) if layer_of(m) != "core")
    assert outside == [], f"{name} (pure core) imports shells or services: {outside}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) == "shell"))
def test_shells_import_no_service_or_command(name: str) -> None:
    above = sorted(m for m in internal(imports_of(name)) if layer_of(m) in ("service", "command", "cli"))
    assert above == [], f"{name} imports {above}"


@pytest.mark.parametrize(("service", "forbidden"), [
    ("reconciler.agent", {"reconciler.relay", "reconciler.hq", "reconciler.hq_liveness", "reconciler.hq_manifest",
                          "reconciler.hq_notify"}),
    ("reconciler.relay", {"reconciler.hq", "reconciler.hq_liveness", "reconciler.hq_manifest", "reconciler.hq_notify",
                          "reconciler.agent"}),
    ("reconciler.hq", {"reconciler.relay", "reconciler.agent"}),
    ("reconciler.hq_liveness", {"reconciler.hq", "reconciler.relay", "reconciler.agent"}),
    ("reconciler.hq_manifest", {"reconciler.hq", "reconciler.relay", "reconciler.agent"}),
    ("reconciler.hq_notify", {"reconciler.hq", "reconciler.relay", "reconciler.agent"}),
])
def test_services_stay_apart(service: str, forbidden: set[str]) -> None:
    for name in (n for n in MODULES if _within(n, {service})):
        bad = sorted(m for m in internal(imports_of(name)) if _within(m, forbidden))
        assert bad == [], f"{name} imports {bad}"
        commands = sorted(m for m in internal(imports_of(name)) if layer_of(m) in ("command", "cli"))
        assert commands == [], f"{name} (a service) imports commands: {commands}"


def test_only_the_cli_imports_commands() -> None:
    for name in MODULES:
        if layer_of(name) in ("cli", "command"):
            continue
        bad = sorted(m for m in internal(imports_of(name)) if layer_of(m) == "command")
        assert bad == [], f"{name} imports commands {bad}"


def test_relay_modules_take_no_value_type_from_its_http_handlers() -> None:
    """``relay/server.py`` holds the HTTP endpoints; only the process that serves them imports it."""
    for name in (n for n in MODULES if _within(n, {"reconciler.relay"})):
        if name in ("reconciler.relay.server", "reconciler.relay.service"):
            continue
        assert "reconciler.relay.server" not in imports_of(name), name


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The contracts can fail: a core module importing os, lazily, is caught."""
    probe = "reconciler.specs"
    source = MODULES[probe].read_text(encoding="utf-8")
    MODULES[probe] = tmp_path / "specs.py"
    try:
        (tmp_path / "specs.py").write_text(source + "\n\ndef _lazy() -> None:\n    import os.path\n")
        with pytest.raises(AssertionError, match="os.path"):
            test_the_pure_core_does_no_io(probe)
    finally:
        MODULES[probe] = PACKAGE / "specs.py"
