"""``reconciler validate``: check a desired-state repo the way CI does.

Formats: ``text`` (``path:line:column: error: message``), ``json`` for tools,
and ``github`` workflow annotations so errors appear on the pull request's
diff. YAML files that are not read (a mistyped folder, an upper-case suffix)
are listed as warnings in every format; they never make the repo invalid.
Exit 0 valid, 1 invalid, 2 when the repo cannot be read.

With ``--allowed-signers`` the commit ``--verify-commits`` names (``HEAD``
by default), or every commit of a ``BASE..TIP`` range, must be signed by a
key of that file (:mod:`reconciler.signatures`, HQ's own rule): a problem is
one more error at ``(commit)``, in every format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from reconciler.gitstore import GitError, checkout_store
from reconciler.repo_tree import TreeError, load_repo, repo_argument
from reconciler.signatures import COMMIT_PATH, SignatureGate, verify_commits
from reconciler.specs import LoadResult, SpecError


def _github_escape(text: str, *, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render(result: LoadResult, fmt: str, repo_arg: str) -> str:
    errors, warnings = result.errors, result.warnings
    if fmt == "json":
        return json.dumps({"valid": result.valid, "errors": [e.to_json() for e in errors],
                           "warnings": [w.to_json() for w in warnings]}, indent=2)
    if fmt == "github":
        lines = [_annotation("error", e, repo_arg) for e in errors]
        lines += [_annotation("warning", w, repo_arg) for w in warnings]
        lines.append(_count(errors, warnings))
        return "\n".join(lines)
    return "\n".join([*(str(e) for e in errors), *(_warning_line(w) for w in warnings), _count(errors, warnings)])


def _annotation(level: str, problem: SpecError, repo_arg: str) -> str:
    if problem.path == COMMIT_PATH:  # about a commit, not a file: shown on the run, not on a line
        return f"::{level} title=Commit signature::{_github_escape(problem.message)}"
    file = os.path.normpath(os.path.join(repo_arg, problem.path))
    return (f"::{level} file={_github_escape(file, property_value=True)},line={problem.line},"
            f"col={problem.column}::{_github_escape(problem.message)}")


def _warning_line(warning: SpecError) -> str:
    return f"{warning.path}:{warning.line}:{warning.column}: warning: {warning.message}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def _count(errors: tuple[SpecError, ...], warnings: tuple[SpecError, ...] = ()) -> str:
    also = f" ({_plural(len(warnings), 'warning')})" if warnings else ""
    if not errors:
        return f"valid: no errors{also}"
    return f"{_plural(len(errors), 'error')}{also}"


def _signature_errors(args: argparse.Namespace, root: Path) -> tuple[SpecError, ...] | str:
    """The signature errors of the commits ``--verify-commits`` names, or why they cannot be checked."""
    revs = args.verify_commits or "HEAD"
    try:
        gate = SignatureGate.checked(args.allowed_signers)
        store = checkout_store(root)
        if store is None:
            return f"{args.repo} is not in a git work tree: --allowed-signers checks its commits"
        return verify_commits(store, revs, gate.allowed_signers)
    except ValueError as e:
        return str(e)
    except GitError as e:
        return f"cannot check the signatures of {revs}: {e}"


def main(args: argparse.Namespace) -> int:
    args.repo = repo_argument(args.repo)
    root = Path(args.repo)
    unsigned: tuple[SpecError, ...] = ()
    if getattr(args, "verify_commits", None) and not getattr(args, "allowed_signers", None):
        print("reconciler validate: --verify-commits needs --allowed-signers", file=sys.stderr)
        return 2
    try:
        result = load_repo(root)
    except TreeError as e:
        print(f"reconciler validate: {args.repo}: {e.strerror}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"reconciler validate: cannot read {args.repo}: {e.strerror or e}", file=sys.stderr)
        return 2
    if getattr(args, "allowed_signers", None):
        checked = _signature_errors(args, root)
        if isinstance(checked, str):
            print(f"reconciler validate: {checked}", file=sys.stderr)
            return 2
        unsigned = checked
    if unsigned:
        result = LoadResult(None, tuple(sorted((*result.errors, *unsigned))), result.warnings)
    print(render(result, args.format, args.repo))
    return 0 if result.valid else 1
