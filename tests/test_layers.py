"""The pure core imports no I/O layer (STYLE: layers you can see).

``specs``, ``versions``, ``plan`` and ``report`` must not reach git, the
network, a database, subprocesses or the clock-driven shells; this test reads
their imports with ``ast`` so a violation fails CI, like an import-linter
contract would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"
CORE = ["specs.py", "versions.py", "plan/__init__.py", "plan/vocabulary.py", "plan/identity.py", "plan/engine.py", "report.py", "names.py", "repo_layout.py"]
FORBIDDEN = {
    "git", "requests", "waitress", "watchdog", "sqlite3", "subprocess", "socket", "http",
    "urllib", "threading", "reconciler.gitstore", "reconciler.hq", "reconciler.relay",
    "reconciler.agent", "reconciler.commands", "reconciler.cli",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io_layer(module: str) -> None:
    path = PACKAGE / module
    assert path.is_file(), f"core module {module} is missing"
    bad = sorted(
        name for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )
    assert bad == [], f"{module} imports I/O modules: {bad}"
