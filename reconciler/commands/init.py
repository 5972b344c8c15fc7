"""``reconciler init [DIR]``: scaffold a desired-state repo that validates as it stands.

It writes a topology (HQ and one relay), one package with its artifact in
``artifacts/``, one job installing it, the spec schemas of the running
version in ``schemas/`` (the spec files' ``# yaml-language-server:``
modelines point there, so editors and CI tools resolve them offline), a CI
workflow and a pre-commit configuration that run ``reconciler validate``
with this very version, and a short README.

Decisions:

* A DIR that already holds specs (``topology.yaml``, YAML under
  ``packages/`` or ``jobs/``) is refused, exit 2, nothing written: init makes
  a new repo, it never edits one. Any other file it would write that exists
  already (a README of a fresh git host repo, schemas) is kept as it is and
  listed; ``reconciler schemas export DIR/schemas`` refreshes schemas.
* The version pinned in CI is the running installation's: the distribution
  that provides the ``reconciler`` package, found through
  :func:`importlib.metadata.packages_distributions`, with its name and
  version read from its metadata, never written down here (exit 2 when none
  or several do: a source tree run without installing, a stale install).
* Where the running installation came from decides what is pinned
  (:func:`install_source`, from the installer's ``direct_url.json``, PEP
  610): installed from a package index, ``<distribution>==<version>``; from
  a git URL, ``<distribution> @ git+<url>@<commit>``; from a local directory
  (a checkout, a wheel file), there is no source anyone else can install
  from: the workflow still names ``<distribution>==<version>`` with a comment
  saying to point it at your index or a pinned git URL.
* The pre-commit hook is the one of the project's ``.pre-commit-hooks.yaml``
  (shipped with the package). With a repository URL in the distribution's
  metadata (``Project-URL``) the configuration names that repository at
  ``rev: v<version>``; without one it declares the same hook as a local hook
  that installs the pinned requirement (``language: python``), which
  pre-commit runs alike; when the running installation came from a local
  directory, the local hook runs the ``reconciler`` on the committer's PATH
  (``language: system``), since nothing could install the pin.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reconciler.commands.schemas import shipped_spec_schemas
from reconciler.fileio import write_atomic
from reconciler.resources import pre_commit_hooks_file
from reconciler.specs import JOBS_DIR, PACKAGES_DIR, SPEC_SUFFIXES, TOPOLOGY_FILES

HQ = "hq-main"
RELAY = "relay-main"
PACKAGE = "hello"
VERSION = "1.0"
HOOK_ID = "reconciler-validate"
_URL_LABELS = ("repository", "source", "source code", "homepage")


class InitError(Exception):
    """The scaffold cannot be written; the message says why."""


def distribution() -> tuple[str, str]:
    """(name, version) of the installed distribution that provides the ``reconciler`` package."""
    names = list(dict.fromkeys(importlib.metadata.packages_distributions().get("reconciler") or []))
    if not names:
        raise InitError("cannot tell which installed distribution provides the reconciler package; "
                        "install it with pip to pin its version in the scaffold")
    if len(names) > 1:
        raise InitError(f"several installed distributions provide the reconciler package ({', '.join(names)}), "
                        "so which to pin is unclear; uninstall the stale one")
    metadata = importlib.metadata.metadata(names[0])
    return str(metadata["Name"]), str(metadata["Version"])


@dataclass(frozen=True)
class Source:
    """What installs the running version elsewhere: a pip requirement, and whether anyone but this machine can."""

    requirement: str
    installable: bool


def install_source(name: str, version: str) -> Source:
    """Where the running installation came from (PEP 610 ``direct_url.json``), as a pinned requirement."""
    try:
        raw = importlib.metadata.distribution(name).read_text("direct_url.json")
        direct = json.loads(raw) if raw else None
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        direct = None
    return source_of(name, version, direct)


def source_of(name: str, version: str, direct: object) -> Source:
    """The pinned requirement for an installation whose PEP 610 record is ``direct`` (None: from an index)."""
    pinned = Source(f"{name}=={version}", True)
    if not isinstance(direct, dict) or not isinstance(direct.get("url"), str):
        return pinned  # installed by name from an index
    url = direct["url"]
    vcs = direct.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("vcs") == "git" and isinstance(vcs.get("commit_id"), str):
        return Source(f"{name} @ git+{url}@{vcs['commit_id']}", not url.startswith("file:"))
    if "archive_info" in direct and url.startswith(("https://", "http://")):
        return Source(f"{name} @ {url}", True)
    return Source(f"{name}=={version}", False)  # a local directory or file: nothing to point others at


def repository_url(name: str) -> str | None:
    """The distribution's repository URL from its ``Project-URL`` metadata, if it declares one."""
    urls: dict[str, str] = {}
    for entry in importlib.metadata.metadata(name).get_all("Project-URL") or []:
        label, _, url = str(entry).partition(",")
        urls.setdefault(label.strip().lower(), url.strip())
    return next((urls[label] for label in _URL_LABELS if urls.get(label)), None)


def _modeline(schema: str, depth: int) -> str:
    return f"# yaml-language-server: $schema={'../' * depth or './'}schemas/{schema}.schema.json\n"


def _topology() -> str:
    return _modeline("topology", 0) + f"""\
# The relay tree: HQ at the root, relays below it (nest relays with parent: <relay>).
apiVersion: reconciler/v1
kind: Topology
metadata:
  name: fleet
spec:
  headquarters: {HQ}
  relays:
    - name: {RELAY}
      parent: {HQ}
"""


def _package() -> str:
    return _modeline("package", 1) + f"""\
# One version of one piece of software; its files are in artifacts/{PACKAGE}-{VERSION}.
apiVersion: reconciler/v1
kind: Package
metadata:
  name: {PACKAGE}-{VERSION}
spec:
  name: {PACKAGE}
  version: "{VERSION}"
  artifact:
    path: artifacts/{PACKAGE}-{VERSION}
  installer:
    type: files
"""


def _job() -> str:
    return _modeline("job", 1) + f"""\
# Install {PACKAGE} {VERSION} on every client of {RELAY} and of the relays below it.
apiVersion: reconciler/v1
kind: Job
metadata:
  name: install-{PACKAGE}
spec:
  jobType: install
  package:
    name: {PACKAGE}
    version: "{VERSION}"
  destinationType: allLowerClients
  destinations: [{RELAY}]
"""


def _workflow(dist: str, version: str, source: Source) -> str:
    local = "" if source.installable else (
        f"# reconciler {version} was installed from a local directory when this was written: point the\n"
        f"# install step at your package index or at a git URL pinned to a commit ({dist} @ git+URL@SHA).\n")
    return f"""\
# Validate every spec on each pull request with reconciler {version}, the version that wrote this
# repo; errors appear as annotations on the changed lines.
{local}name: validate
on:
  pull_request:
  push:
    branches: [main]
jobs:
  validate:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - run: {_install_command(source)}
      - run: reconciler validate . --format github
"""


def _install_command(source: Source) -> str:
    """The pip command that installs exactly this distribution and version."""
    return " ".join(["pip", "install", f'"{source.requirement}"'])


def _hook() -> dict[str, Any]:
    hooks = yaml.safe_load(pre_commit_hooks_file().read_text(encoding="utf-8"))
    for hook in hooks if isinstance(hooks, list) else []:
        if isinstance(hook, dict) and hook.get("id") == HOOK_ID:
            return dict(hook)
    raise InitError(f"the shipped pre-commit hooks define no {HOOK_ID!r} hook")


def _pre_commit(dist: str, version: str, source: Source) -> str:
    hook = _hook()
    url = repository_url(dist)
    if url and source.installable:
        repo: dict[str, Any] = {"repo": url, "rev": f"v{version}", "hooks": [{"id": hook["id"]}]}
        note = f"# Runs `reconciler validate` before each commit: the project's {HOOK_ID} hook at v{version}.\n"
    elif source.installable:
        local = {key: value for key, value in hook.items() if key != "description"}
        repo = {"repo": "local", "hooks": [{**local, "additional_dependencies": [source.requirement]}]}
        note = (f"# Runs `reconciler validate` before each commit: the project's {HOOK_ID} hook, declared here\n"
                f"# as a local hook of {dist} {version}.\n")
    else:
        local = {key: value for key, value in hook.items() if key != "description"}
        repo = {"repo": "local", "hooks": [{**local, "language": "system"}]}
        note = (f"# Runs `reconciler validate` before each commit: the project's {HOOK_ID} hook, declared here\n"
                f"# as a local hook. reconciler {version} was installed from a local directory, which no one\n"
                f"# else can install from, so the hook runs the `reconciler` on your PATH (language: system).\n"
                f"# Installed from an index or a pinned git URL, `reconciler init` pins it here instead.\n")
    return note + yaml.safe_dump({"repos": [repo]}, sort_keys=False, default_flow_style=False)


def _readme(dist: str, version: str) -> str:
    return f"""\
# Desired state

The software this fleet should run, as specs that `reconciler` ({dist} {version}) reads:

- `topology.yaml`: HQ ({HQ}) and the relays below it.
- `packages/`: one file per version of a piece of software; its files live in `artifacts/`.
- `jobs/`: what to install or remove where.
- `schemas/`: the JSON Schemas of these files, which the `# yaml-language-server` line at the top of
  each spec points to (editors show help and errors as you type). Refresh them after an upgrade with
  `reconciler schemas export schemas`.

Change anything through a pull request: CI (`.github/workflows/validate.yml`) and the pre-commit hook
(`pre-commit install`) run `reconciler validate`, which names the file, line and field of every error.
"""


def scaffold(dist: str, version: str, source: Source | None = None) -> dict[str, bytes]:
    """Repo-relative path -> content of every file init writes."""
    source = source or Source(f"{dist}=={version}", True)
    files = {
        "topology.yaml": _topology(),
        f"{PACKAGES_DIR}{PACKAGE}-{VERSION}.yaml": _package(),
        f"{JOBS_DIR}install-{PACKAGE}.yaml": _job(),
        f"artifacts/{PACKAGE}-{VERSION}/README.txt": f"{PACKAGE} {VERSION}: the files of this package, "
                                                     f"unpacked on each client as they are here.\n",
        ".github/workflows/validate.yml": _workflow(dist, version, source),
        ".pre-commit-config.yaml": _pre_commit(dist, version, source),
        "README.md": _readme(dist, version),
    }
    encoded = {path: text.encode("utf-8") for path, text in files.items()}
    encoded.update({f"schemas/{name}": data for name, data in shipped_spec_schemas().items()})
    return encoded


def existing_specs(root: Path) -> list[str]:
    """Spec files already in ``root`` (repo-relative), which init refuses to overwrite."""
    found = [name for name in TOPOLOGY_FILES if (root / name).exists()]
    for folder in (PACKAGES_DIR, JOBS_DIR):
        base = root / folder
        if base.is_dir():
            found += sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.suffix in SPEC_SUFFIXES)
    return found


def main(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if root.exists() and not root.is_dir():
        print(f"reconciler init: {root} is not a directory", file=sys.stderr)
        return 2
    present = existing_specs(root) if root.is_dir() else []
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        print(f"reconciler init: {root} already holds specs ({shown}); init writes a new repo and overwrites "
              f"nothing (refresh its schemas with: reconciler schemas export {root / 'schemas'})", file=sys.stderr)
        return 2
    try:
        dist, version = distribution()
        files = scaffold(dist, version, install_source(dist, version))
        kept = []
        for rel, data in files.items():
            path = root / rel
            if path.exists() or path.is_symlink():
                kept.append(rel)
                continue
            write_atomic(path, data)
            print(f"wrote {path}")
    except InitError as e:
        print(f"reconciler init: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"reconciler init: cannot write {e.filename or root}: {e.strerror or e}", file=sys.stderr)
        return 2
    for rel in kept:
        print(f"kept {root / rel} (it exists already)")
    print(f"a desired-state repo for reconciler {version} ({dist}); check it with: reconciler validate {root}")
    return 0
