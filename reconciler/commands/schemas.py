"""``reconciler schemas export DIR``: write the shipped spec schemas into a desired-state repo.

A repo keeps a copy of the schemas of the version that validates it in
``schemas/`` (``reconciler init`` puts them there), so the
``# yaml-language-server: $schema=./schemas/…`` modelines of its spec files
resolve in any editor or CI tool without a network. Exporting again after
an upgrade refreshes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reconciler.fileio import write_atomic
from reconciler.resources import schemas_dir

# The schemas of the files a desired-state repo holds (the others describe the protocol and status files).
SPEC_SCHEMAS = ("topology.schema.json", "package.schema.json", "job.schema.json")


def shipped_spec_schemas() -> dict[str, bytes]:
    """File name -> bytes of every spec schema of the running installation."""
    source = schemas_dir()
    return {name: (source / name).read_bytes() for name in SPEC_SCHEMAS}


def export(target: Path) -> list[Path]:
    """Write (or refresh) the spec schemas into ``target``, creating it; the files written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in shipped_spec_schemas().items():
        path = target / name
        write_atomic(path, data)
        written.append(path)
    return written


def main(args: argparse.Namespace) -> int:
    try:
        written = export(Path(args.dir))
    except OSError as e:
        print(f"reconciler schemas export: cannot write {e.filename or args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
