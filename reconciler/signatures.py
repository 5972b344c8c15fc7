"""Signed commits: HQ's gate (``hq --allowed-signers``) and ``validate --allowed-signers``, one rule and one wording.

A commit passes only when git reports a good signature by a principal of an
SSH allowed-signers file (``%G?`` is ``G``; :meth:`GitStore.signature_checks
<reconciler.gitstore.GitStore.signature_checks>`). What fails is a
:class:`~reconciler.specs.SpecError` at :data:`COMMIT_PATH` line 1, so it is
published, printed and counted exactly like an invalid spec, next to any
spec errors of the same commit.

The policies, for a new tip of ``main``:

* ``head`` (the default, as Flux verifies the HEAD commit): the tip must be
  signed. Its signature covers the exact tree HQ accepts, so a merge commit
  signed by an allowed key vouches for the commits it brings in.
* ``all`` (like Argo CD's strict source integrity): every commit reachable
  from the tip and not from the last accepted commit (``git rev-list
  ACCEPTED..TIP``, the whole history when nothing was accepted yet) must be
  signed too; more than :data:`MAX_COMMITS` of them is an error.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from reconciler.fileio import TooLarge, read_at_most
from reconciler.gitstore import GitStore, SignatureCheck
from reconciler.specs import SpecError

POLICIES: Final = ("head", "all")
MAX_COMMITS: Final = 10_000
"""Most commits one evaluation checks under the ``all`` policy (and one ``validate --verify-commits`` range)."""
COMMIT_PATH: Final = "(commit)"
"""The path of a signature error: it is about a commit, not a file."""
MAX_ALLOWED_SIGNERS_BYTES: Final = 1 << 20

_KEY_TYPES: Final = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})


def ssh_keygen_problem() -> str | None:
    """Why commit signatures cannot be checked here (None when ``ssh-keygen`` is on PATH)."""
    if shutil.which("ssh-keygen") is None:
        return ("ssh-keygen is not on PATH: git needs it to check SSH commit signatures (install the OpenSSH "
                "client, e.g. apt-get install openssh-client)")
    return None


def _is_key(key_type: str, blob: str) -> bool:
    """Whether ``blob`` is the base64 of an SSH public key of ``key_type`` (its wire form names the type)."""
    if key_type not in _KEY_TYPES:
        return False
    try:
        raw = base64.b64decode(blob, validate=True)
    except ValueError:
        return False
    size = int.from_bytes(raw[:4], "big")
    return len(raw) > 4 + size and raw[4:4 + size] == key_type.encode("ascii")


def allowed_signers_entries(path: str | Path) -> int:
    """How many entries the allowed-signers file holds; ValueError (naming the file) when it is unreadable or has none.

    An entry is a line ``principals [options] keytype base64-key [comment]``
    (``admin@acme ssh-ed25519 AAAA...``), as ``ssh-keygen -Y verify`` reads it.
    """
    try:
        data = read_at_most(path, MAX_ALLOWED_SIGNERS_BYTES)
    except OSError as e:
        raise ValueError(f"cannot read the allowed signers file {path}: {e.strerror or e}") from None
    except TooLarge:
        raise ValueError(f"the allowed signers file {path} is larger than "
                         f"{MAX_ALLOWED_SIGNERS_BYTES // 1024} KiB") from None
    entries = 0
    for line in data.decode("utf-8", "replace").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if any(_is_key(words[i], words[i + 1]) for i in range(1, len(words) - 1)):
            entries += 1
    if not entries:
        raise ValueError(f"the allowed signers file {path} has no valid entry (a line like "
                         "`admin@acme ssh-ed25519 AAAA...`)")
    return entries


def signature_errors(checks: Sequence[SignatureCheck], tip: str | None = None) -> tuple[SpecError, ...]:
    """One error for each commit whose signature is not good; a commit other than ``tip`` says it came with it."""
    errors = []
    for check in checks:
        problem = check.problem()
        if problem is None:
            continue
        came = "" if tip is None or check.commit == tip else f" (one of the commits {tip[:12]} brings in)"
        errors.append(SpecError(COMMIT_PATH, 1, 1, f"commit {check.commit[:12]} {problem}{came}"))
    return tuple(errors)


def too_many(count: int, what: str) -> SpecError:
    return SpecError(COMMIT_PATH, 1, 1, f"{count} commits to check {what}: more than {MAX_COMMITS:,} cannot be "
                                        "checked one by one")


@dataclass(frozen=True)
class SignatureGate:
    """HQ's rule: which commits of a new ``main`` must be signed by a key of ``allowed_signers``."""

    allowed_signers: Path
    policy: str = "head"

    @classmethod
    def checked(cls, allowed_signers: str | Path, policy: str | None = None) -> SignatureGate:
        """A gate that can work on this machine: ValueError when ``ssh-keygen`` or the file is not usable."""
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown signature policy {policy!r} (expected one of {', '.join(POLICIES)})")
        problem = ssh_keygen_problem()
        if problem is not None:
            raise ValueError(problem)
        allowed_signers_entries(allowed_signers)
        return cls(Path(allowed_signers).absolute(), policy or "head")

    def errors(self, store: GitStore, tip: str, accepted: str | None) -> tuple[SpecError, ...]:
        """What keeps ``tip`` from being accepted after ``accepted`` (empty when its signatures pass)."""
        if self.policy != "all":
            return signature_errors(store.signature_checks([tip], self.allowed_signers), tip)
        base = accepted if accepted is not None and store.resolve_commit(accepted) is not None else None
        count = store.count_commits(tip, base)
        if count > MAX_COMMITS:
            since = "since the accepted commit" if base is not None else "in the whole history"
            head = signature_errors(store.signature_checks([tip], self.allowed_signers), tip)
            return (too_many(count, f"{since} for {tip[:12]} under the all signature policy"), *head)
        commits = [tip, *(c for c in store.rev_list(tip, base) if c != tip)]
        return signature_errors(store.signature_checks(commits, self.allowed_signers), tip)


def verify_commits(store: GitStore, revs: str, allowed_signers: Path) -> tuple[SpecError, ...]:
    """Errors for the commits ``revs`` names in a checkout: one commit (``HEAD``) or every one of ``BASE..TIP``.

    ValueError for a range or commit that the repository does not have; GitError when git fails.
    """
    base, dots, tip = revs.partition("..")
    if tip.startswith("."):
        raise ValueError(f"--verify-commits takes REV or BASE..TIP, not {revs!r}")
    names = (base or "HEAD", tip or "HEAD") if dots else (revs,)
    shas = []
    for name in names:
        sha = store.resolve_commit(name) if name and not name.startswith("-") else None
        if sha is None:
            raise ValueError(f"no commit {name!r} in this repository")
        shas.append(sha)
    if dots:
        count = store.count_commits(shas[1], shas[0])
        if count > MAX_COMMITS:
            return (too_many(count, f"in {revs}"),)
        commits = store.rev_list(shas[1], shas[0])
    else:
        commits = shas
    return signature_errors(store.signature_checks(commits, allowed_signers))

