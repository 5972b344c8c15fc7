"""Every shipped schema compiles under ajv's strict mode for draft 2020-12.

Strict tools (ajv, which editors and CI linters embed) refuse what lenient
ones pass silently: a ``required`` naming a property its schema does not
declare, a keyword without the ``type`` it applies to, a union type, an
unknown keyword or format. The test runs the real ajv command line
(ajv-cli 5 with ajv-formats), installed by ``.ci/run`` into ``.ci/ajv``;
``$RECONCILER_AJV`` names another ``ajv`` executable. Without either (or
without Node.js) it is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = sorted((ROOT / "schemas").glob("*.schema.json"))


def _ajv() -> str | None:
    named = os.environ.get("RECONCILER_AJV")
    if named:
        return named
    local = ROOT / ".ci" / "ajv" / "node_modules" / ".bin" / "ajv"
    return str(local) if local.exists() else None


AJV = _ajv()
needs_ajv = pytest.mark.skipif(AJV is None or shutil.which("node") is None,
                               reason="ajv-cli is not installed (.ci/run installs it into .ci/ajv; or set "
                                      "$RECONCILER_AJV) or node is missing")


def _compile(schema: Path) -> subprocess.CompletedProcess[str]:
    assert AJV is not None
    return subprocess.run([AJV, "compile", "--strict=true", "--spec=draft2020", "-c", "ajv-formats", "-s", str(schema)],
                          capture_output=True, text=True, timeout=120)


def test_every_schema_is_checked() -> None:
    assert len(SCHEMAS) >= 14


@needs_ajv
@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda p: p.name)
def test_schema_compiles_under_ajv_strict_mode(schema: Path) -> None:
    done = _compile(schema)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout + done.stderr


# What strict mode refuses and lenient validators pass: the check above is strict only if these fail.
_LAX: dict[str, dict[str, Any]] = {
    "required-not-declared": {"type": "object", "properties": {"a": {"type": "string"}},
                              "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    "required-without-type": {"properties": {"a": {"required": ["b"]}}},
    "union-type": {"type": ["string", "integer"]},
    "unknown-keyword": {"type": "string", "descripton": "a typo"},
}


@needs_ajv
@pytest.mark.parametrize("name", sorted(_LAX))
def test_strict_mode_refuses_what_it_should(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.schema.json"
    path.write_text(json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", **_LAX[name]}),
                    encoding="utf-8")
    done = _compile(path)
    assert done.returncode != 0
    assert "strict mode" in done.stdout + done.stderr
