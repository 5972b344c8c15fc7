"""``reconciler validate``: check a desired-state repo the way CI does.

Formats: ``text`` (``path:line:column: error: message``), ``json`` for tools,
and ``github`` workflow annotations so errors appear on the pull request's
diff. Exit 0 valid, 1 invalid, 2 when the repo cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from reconciler.specs import LoadResult, SpecError, load_repo


def _github_escape(text: str, *, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render(result: LoadResult, fmt: str, repo_arg: str) -> str:
    errors = result.errors
    if fmt == "json":
        return json.dumps({"valid": result.valid, "errors": [e.to_json() for e in errors]}, indent=2)
    if fmt == "github":
        lines = []
        for e in errors:
            file = os.path.normpath(os.path.join(repo_arg, e.path))
            lines.append(f"::error file={_github_escape(file, property_value=True)},line={e.line},"
                         f"col={e.column}::{_github_escape(e.message)}")
        lines.append(_count(errors))
        return "\n".join(lines)
    return "\n".join([*(str(e) for e in errors), _count(errors)])


def _count(errors: tuple[SpecError, ...]) -> str:
    if not errors:
        return "valid: no errors"
    return f"{len(errors)} error{'s' if len(errors) != 1 else ''}"


def main(args: argparse.Namespace) -> int:
    root = Path(args.repo)
    try:
        result = load_repo(root)
    except OSError as e:
        print(f"reconciler validate: cannot read {args.repo}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(render(result, args.format, args.repo))
    return 0 if result.valid else 1
