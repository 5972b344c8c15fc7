"""Identities of a plan: a job's plan revision and the operation ids of its actions.

The *plan revision* of a job is sha256 over the job's revision
and its package's revision, so editing either (the package revision covers
its artifact) is a new revision, while raising ``rerun`` or suspending is
not. An ``operationId`` is ``"op-"`` + the 24 hex digits of a 12-byte
BLAKE2b over (job, plan revision, rerun, client, software name, version,
attempt, and the operation id of the attempt it follows, if any):
deterministic, stable for the same inputs, and never equal to an earlier
operation of the same job and client (a drift re-install after a success,
or a spec reverted to an earlier revision, gets a new id, so the agent's
journal cannot answer it with an old result). BLAKE2b rather than sha256:
a pass over a new site hashes one id per action, and BLAKE2b does it in
two thirds of the time; 96 bits are ample for ids.
"""

from __future__ import annotations

import hashlib

from reconciler.specs import Job, Package


def plan_revision(job: Job, package: Package | None) -> str:
    """sha256 over the job's revision and its package's revision ("" when none)."""
    basis = f"{job.revision}\n{package.revision if package is not None else ''}"
    return hashlib.sha256(basis.encode()).hexdigest()


def operation_id(job: str, revision: str, rerun: int, client: str, name: str, version: str | None,
                 attempt: int, previous: str = "") -> str:
    """The deterministic operation id (see the module docstring)."""
    text = "\x1f".join((job, revision, str(rerun), client, name, version or "", str(attempt), previous))
    return "op-" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
