"""The whole package type-checks under ``mypy --strict`` (STYLE: type hints everywhere).

Runs mypy as a subprocess on the installed sources; a new untyped function or
an ``Any`` leaking into the pure core fails CI here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_is_mypy_strict_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "mypy-cache"),
         "--no-error-summary", "reconciler"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
