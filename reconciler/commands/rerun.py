"""``reconciler rerun JOB [REPO]``: raise ``spec.rerun`` of a job by one, in place.

Re-executing failed clients is a desired-state change like any other: the
admin commits the raised counter through a pull request, so who re-ran what
and when is in git history. The edit is line-based so comments, key order,
quoting and line endings survive: the value of an existing ``rerun:`` line
directly under ``spec:`` is replaced, or ``rerun: 1`` is inserted at the
spec's indentation. The result is parsed again and must differ from the
original in ``spec.rerun`` alone, and must still validate; otherwise the file
is left untouched.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from reconciler import specs
from reconciler.fileio import write_atomic
from reconciler.repo_layout import select_specs
from reconciler.repo_tree import DirectoryTree, load_repo, repo_argument

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:(.*)$")
_RERUN = re.compile(r"^(?P<indent>[ ]+)rerun(?P<sep>\s*:\s*)(?P<value>[^#\s]+)(?P<rest>\s*(#.*)?)$")


class RerunError(Exception):
    """The job cannot be re-run by editing its file; the message says why."""


def _load(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return None


def find_job_file(repo: Path, job: str) -> tuple[Path, Any]:
    """The job spec file whose metadata.name is ``job``, and its parsed document."""
    jobs_dir = repo / specs.JOBS_DIR
    tree = DirectoryTree(repo)  # the files validate and HQ read, and only those: no links followed
    candidates = [p for p in select_specs(tree.entries()).spec_paths if p.startswith(specs.JOBS_DIR)]
    known: list[str] = []
    for rel in candidates:
        path = repo / rel
        try:
            text = tree.read([rel], specs.MAX_FILE_BYTES)[rel].decode("utf-8-sig")
        except (OSError, UnicodeDecodeError):
            continue
        doc = _load(text)
        if not isinstance(doc, dict) or doc.get("kind") != "Job":
            continue
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        if name == job:
            return path, doc
        if isinstance(name, str):
            known.append(name)
    hint = f" (jobs: {', '.join(sorted(known))})" if known else ""
    raise RerunError(f"no job named {job!r} in {jobs_dir}{hint}")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def raise_rerun(text: str, current: int) -> str:
    """``text`` with spec.rerun set to ``current + 1`` (pure; raises RerunError when it cannot)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    spec_at = None
    for index, line in enumerate(lines):
        match = _TOP_KEY.match(line.rstrip("\r\n"))
        if match and match.group(1) == "spec":
            rest = match.group(2).strip()
            if rest and not rest.startswith("#"):
                raise RerunError("spec is written in flow style ({...}); add 'rerun' by hand")
            spec_at = index
    if spec_at is None:
        raise RerunError("the file has no top-level 'spec:' block")
    end = len(lines)
    for index in range(spec_at + 1, len(lines)):
        line = lines[index]
        if _is_content(line) and _indent(line) == 0:
            end = index
            break
    body = [i for i in range(spec_at + 1, end) if _is_content(lines[i])]
    if not body:
        raise RerunError("spec is empty")
    child = _indent(lines[body[0]])
    value = current + 1
    for index in body:
        line = lines[index]
        if _indent(line) != child:
            continue
        bare = line.rstrip("\r\n")
        match = _RERUN.match(bare)
        if match and len(match.group("indent")) == child:
            ending = line[len(bare):]
            lines[index] = f"{match.group('indent')}rerun{match.group('sep')}{value}{match.group('rest')}{ending}"
            return "".join(lines)
        if bare.lstrip().startswith("rerun") and bare.lstrip()[5:].lstrip().startswith(":"):
            raise RerunError(f"cannot edit line {index + 1} ({bare.strip()!r}); raise spec.rerun by hand")
    # Insert after the spec block's last content line (trailing comments stay where they are).
    last = body[-1]
    if not lines[last].endswith(("\n", "\r")):
        lines[last] += newline
    lines.insert(last + 1, f"{' ' * child}rerun: {value}{newline}")
    return "".join(lines)


def _without_rerun(doc: Any) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        return doc
    return {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "rerun"}}




def rerun(repo: Path, job: str) -> tuple[Path, str, str]:
    """Raise the job's spec.rerun in its file; return (path, old text, new text)."""
    path, doc = find_job_file(repo, job)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise RerunError(f"{path}: spec is not a mapping")
    current = spec.get("rerun", 0)
    if not isinstance(current, int) or isinstance(current, bool) or current < 0:
        raise RerunError(f"{path}: spec.rerun is {current!r}, not a non-negative integer; fix it by hand")
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    old = raw.decode("utf-8-sig")
    new = raise_rerun(old, current)
    edited = _load(new)
    if (not isinstance(edited, dict) or not isinstance(edited.get("spec"), dict)
            or edited["spec"].get("rerun") != current + 1 or _without_rerun(edited) != _without_rerun(doc)):
        raise RerunError(f"{path}: could not raise spec.rerun safely by editing lines; raise it by hand")
    rel = path.relative_to(repo).as_posix()
    # Errors the file already had are the admin's business; the edit must add none
    # (compared by message: an inserted line moves the positions of later errors).
    before = {e.message for e in load_repo(repo).errors if e.path == rel}
    write_atomic(path, (b"\xef\xbb\xbf" if bom else b"") + new.encode("utf-8"), mode=None)
    after = [e for e in load_repo(repo).errors if e.path == rel and e.message not in before]
    if after:
        write_atomic(path, raw, mode=None)
        details = "\n".join(f"  {e}" for e in after)
        raise RerunError(f"{path}: the edited file does not validate; left unchanged:\n{details}")
    return path, old, new


def main(args: argparse.Namespace) -> int:
    args.repo = repo_argument(args.repo)
    repo = Path(args.repo)
    if not repo.is_dir():
        print(f"reconciler rerun: {args.repo}: not a directory", file=sys.stderr)
        return 2
    try:
        path, old, new = rerun(repo, args.job)
    except RerunError as e:
        print(f"reconciler rerun: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"reconciler rerun: {e}", file=sys.stderr)
        return 2
    rel = path.relative_to(repo).as_posix()
    diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                fromfile=f"a/{rel}", tofile=f"b/{rel}")
    sys.stdout.writelines(line if line.endswith("\n") else line + "\n" for line in diff)
    print(f"raised spec.rerun of {args.job}; commit {rel} through a pull request to re-run its failed clients",
          file=sys.stderr)
    return 0
