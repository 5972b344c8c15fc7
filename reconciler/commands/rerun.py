"""``reconciler rerun JOB [--relay R]... [--client C]... [--repair] [REPO]``: raise ``spec.rerun`` of a job, in place.

Re-executing failed clients is a desired-state change like any other: the
admin commits the raised counter through a pull request, so who re-ran what
and when is in git history. ``--relay`` and ``--client`` narrow the rerun to
the failed clients of those relays (and of relays nested below them) or to
those clients, and ``--repair`` also reinstalls the package on the named
clients where it is installed already; they are written as the job's
``spec.rerunScope``, which replaces any earlier scope (a rerun without them
removes it: every Failed client runs again).

The edit is line-based so comments, key order, quoting and line endings
survive: the value of an existing ``rerun:`` line directly under ``spec:``
is replaced, or ``rerun: 1`` is inserted at the spec's indentation; an
existing ``rerunScope:`` block is taken out and the new one goes right after
the ``rerun:`` line. The result is parsed again and must differ from the
original in ``spec.rerun`` and ``spec.rerunScope`` alone, and the repo with
the edited file must validate as well as before; only then is the file
written (atomically). Otherwise it is left untouched.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reconciler import names, specs
from reconciler.fileio import write_atomic
from reconciler.repo_layout import select_specs
from reconciler.repo_tree import (
    DirectoryTree,
    EditedTree,
    load_tree,
    open_repo,
    repo_argument,
)
from reconciler.specs import RerunScope

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:(.*)$")
_RERUN = re.compile(r"^(?P<indent>[ ]+)rerun(?P<sep>\s*:\s*)(?P<value>[^#\s]+)(?P<rest>\s*(#.*)?)$")
_SCOPE_KEY = re.compile(r"^[ ]+rerunScope\s*:")
_SCOPE_FIELDS = ("rerun", "rerunScope")
# A scope list longer than this goes one item a line, so its diff reads item by item.
_FLOW_WIDTH = 100


class RerunError(Exception):
    """The job cannot be re-run by editing its file; the message says why."""


class UsageError(RerunError):
    """The command line asks for something no spec can say (exit code 2)."""


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


def _spec_body(lines: Sequence[str]) -> tuple[list[int], int]:
    """Indexes of the content lines of the top-level block-style ``spec:``, and their indentation."""
    spec_at = None
    for index, line in enumerate(lines):
        match = _TOP_KEY.match(line.rstrip("\r\n"))
        if match and match.group(1) == "spec":
            rest = match.group(2).strip()
            if rest and not rest.startswith("#"):
                raise RerunError("spec is written in flow style ({...}); edit it by hand")
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
    return body, _indent(lines[body[0]])


def raise_rerun(text: str, current: int) -> str:
    """``text`` with spec.rerun set to ``current + 1`` (pure; raises RerunError when it cannot)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    body, child = _spec_body(lines)
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


def _plain(item: str) -> str:
    """A name as YAML reads it back as that string: plain when it can be (``pc-01``), quoted otherwise (``"no"``)."""
    return item if _load(f"[{item}]") == [item] else f'"{item}"'


def _scope_lines(scope: RerunScope, indent: str, step: str, newline: str) -> list[str]:
    lines = [f"{indent}rerunScope:{newline}"]
    inner = indent + step
    for key, items in (("relays", scope.relays), ("clients", scope.clients)):
        if not items:
            continue
        flow = f"{inner}{key}: [{', '.join(_plain(i) for i in items)}]"
        if len(flow) <= _FLOW_WIDTH:
            lines.append(flow + newline)
        else:
            lines.append(f"{inner}{key}:{newline}")
            lines.extend(f"{inner}  - {_plain(i)}{newline}" for i in items)
    if scope.repair:
        lines.append(f"{inner}repair: true{newline}")
    return lines


def set_scope(text: str, scope: RerunScope | None) -> str:
    """``text`` with spec.rerunScope replaced by ``scope`` (removed for None), right after ``rerun:``.

    Pure; expects the ``rerun:`` line :func:`raise_rerun` makes sure of.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    body, child = _spec_body(lines)
    keys = [i for i in body if _indent(lines[i]) == child]
    found = [i for i in keys if _SCOPE_KEY.match(lines[i])]
    if len(found) > 1:
        raise RerunError(f"rerunScope is written twice (lines {found[0] + 1} and {found[1] + 1}); fix it by hand")
    if found:
        # The key line, and every line deeper than the spec's keys up to the next key
        # (comments between them too); comments after its last line stay.
        start = found[0]
        following = [i for i in body if i > start and _indent(lines[i]) <= child]
        stop = following[0] if following else body[-1] + 1
        last = max(i for i in body if start <= i < stop)
        del lines[start:last + 1]
    if scope is None:
        return "".join(lines)
    body, _ = _spec_body(lines)
    at = next((i for i in body if _indent(lines[i]) == child and _RERUN.match(lines[i].rstrip("\r\n"))), None)
    if at is None:
        raise RerunError("the file has no 'rerun:' line directly under spec:")
    if not lines[at].endswith(("\n", "\r")):
        lines[at] += newline
    step = " " * max(child, 2)
    lines[at + 1:at + 1] = _scope_lines(scope, " " * child, step, newline)
    return "".join(lines)


def _scope_value(scope: RerunScope | None) -> dict[str, Any] | None:
    """``spec.rerunScope`` as YAML reads it back."""
    if scope is None:
        return None
    value: dict[str, Any] = {}
    if scope.relays:
        value["relays"] = list(scope.relays)
    if scope.clients:
        value["clients"] = list(scope.clients)
    if scope.repair:
        value["repair"] = True
    return value


def _without_rerun(doc: Any) -> Any:
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        return doc
    return {**doc, "spec": {k: v for k, v in doc["spec"].items() if k not in _SCOPE_FIELDS}}


def _names(values: Sequence[str], option: str, limit: int, valid: Any, what: str) -> tuple[str, ...]:
    for value in values:
        if not valid(value):
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise UsageError(f"{option} {shown!r} is not a valid {what}: lower-case letters, digits, '.' and '-', "
                             f"at most 63 characters")
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise UsageError(f"{option} {value} is given twice")
        seen.add(value)
    if len(values) > limit:
        raise UsageError(f"at most {limit} {option} options (got {len(values)}); name their relays instead")
    return tuple(values)


def scope_of(relays: Sequence[str], clients: Sequence[str], repair: bool) -> RerunScope | None:
    """The scope the options ask for (None: every Failed client); raises UsageError for what no spec can say."""
    if repair and not clients:
        raise UsageError("--repair needs --client: it reinstalls on the named clients only, never on a whole relay")
    scope = RerunScope(
        relays=_names(relays, "--relay", specs.MAX_RERUN_SCOPE_RELAYS, names.is_name, "relay name"),
        clients=_names(clients, "--client", specs.MAX_RERUN_SCOPE_CLIENTS, names.is_client_id, "client id"),
        repair=repair)
    return scope if scope.relays or scope.clients else None


def rerun(repo: Path, job: str, scope: RerunScope | None = None) -> tuple[Path, str, str]:
    """Raise the job's spec.rerun and set its scope in its file; return (path, old text, new text)."""
    path, doc = find_job_file(repo, job)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise RerunError(f"{path}: spec is not a mapping")
    current = spec.get("rerun", 0)
    if not isinstance(current, int) or isinstance(current, bool) or current < 0:
        raise RerunError(f"{path}: spec.rerun is {current!r}, not a non-negative integer; fix it by hand")
    tree = open_repo(repo)
    before = load_tree(tree)
    if scope is not None and before.specs is not None:
        relays = {r.name for r in before.specs.topology.relays}
        unknown = [r for r in scope.relays if r not in relays]
        if unknown:
            listed = ", ".join(sorted(relays))
            raise RerunError(f"{path}: unknown relay {unknown[0]!r} (relays in the topology: {listed})")
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    old = raw.decode("utf-8-sig")
    try:
        new = set_scope(raise_rerun(old, current), scope)
    except RerunError as e:
        raise RerunError(f"{path}: {e}") from None
    edited = _load(new)
    wanted = _scope_value(scope)
    if (not isinstance(edited, dict) or not isinstance(edited.get("spec"), dict)
            or edited["spec"].get("rerun") != current + 1 or edited["spec"].get("rerunScope") != wanted
            or _without_rerun(edited) != _without_rerun(doc)):
        raise RerunError(f"{path}: could not set spec.rerun and spec.rerunScope safely by editing lines; "
                         f"edit them by hand")
    rel = path.relative_to(repo).as_posix()
    data = (b"\xef\xbb\xbf" if bom else b"") + new.encode("utf-8")
    # Errors the file already had are the admin's business; the edit must add none
    # (compared by message: an inserted line moves the positions of later errors).
    had = {e.message for e in before.errors if e.path == rel}
    added = [e for e in load_tree(EditedTree(tree, {rel: data})).errors if e.path == rel and e.message not in had]
    if added:
        details = "\n".join(f"  {e}" for e in added)
        raise RerunError(f"{path}: the edit would not validate, so the file is left unchanged "
                         f"(lines as they would be):\n{details}")
    write_atomic(path, data, mode=None)
    return path, old, new


def _listed(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _summary(scope: RerunScope | None) -> str:
    """What the raised rerun does, in words."""
    if scope is None:
        return "every Failed client runs again"
    who = []
    if scope.relays:
        below = "it" if len(scope.relays) == 1 else "them"
        who.append(f"the Failed clients of {_listed(scope.relays)} (and of the relays below {below})")
    if scope.clients:
        who.append(f"the Failed rows of {_listed(scope.clients)}")
    text = f"only {' and '.join(who)} run again"
    if scope.repair:
        text += f"; {_listed(scope.clients)} also reinstall the package where it is installed"
    return text


def main(args: argparse.Namespace) -> int:
    args.repo = repo_argument(args.repo)
    repo = Path(args.repo)
    try:
        scope = scope_of(args.relay or [], args.client or [], args.repair)
    except UsageError as e:
        print(f"reconciler rerun: {e}", file=sys.stderr)
        return 2
    if not repo.is_dir():
        print(f"reconciler rerun: {args.repo}: not a directory", file=sys.stderr)
        return 2
    try:
        path, old, new = rerun(repo, args.job, scope)
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
    print(f"raised spec.rerun of {args.job}: {_summary(scope)} once {rel} is committed through a pull request",
          file=sys.stderr)
    return 0
