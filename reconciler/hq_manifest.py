"""HQ's side of the signed manifest: what it covers at an accepted commit, and when HQ signs a new one.

HQ signs a manifest (:mod:`reconciler.signing`) for each commit it accepts
and publishes the envelope as ``manifest.json`` on ``status/hq`` beside
``accepted.yaml``, in the same status commit, so a relay always reads the
manifest of the commit it follows. The manifest lists the sha256 of every
spec file at that commit and, for in-repo artifacts, the sha256 of the bytes
relays serve (the deterministic tar of a directory, a file as it is), packed
here with the relays' own code (:mod:`reconciler.packing`) in a temporary
directory under HQ's workdir and memoised by git object id, so an unchanged
artifact is packed once per HQ process.

The serial only grows: a new manifest gets ``max(last serial + 1, the
acceptance time in Unix seconds)``, so it keeps growing even when
``status/hq`` was lost and HQ starts afresh. A new manifest is signed when
the accepted commit changes or when HQ's keys (signing, next, revoked)
differ from the published manifest's; a restart with the same keys keeps
the published one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from reconciler.gitstore import GitStore
from reconciler.packing import ArtifactError, pack_repo_path, resolve_repo_path
from reconciler.repo_tree import CommitTree, spec_files
from reconciler.signing import (
    ArtifactDigest,
    KeyFileError,
    Manifest,
    ManifestError,
    document_digest,
    envelope_bytes,
    key_id,
    parse_manifest,
    public_key_text,
    read_private_key,
    read_public_key,
    sign,
)
from reconciler.specs import Specs
from reconciler.times import format_time

log = logging.getLogger("reconciler.hq")

class ManifestSigner:
    """Signs the manifest of each accepted commit with HQ's key(s)."""

    def __init__(self, keys: Sequence[Ed25519PrivateKey], workdir: Path, *,
                 next_keys: Sequence[Ed25519PublicKey] = (), revoked: Sequence[Ed25519PublicKey] = ()) -> None:
        if not keys:
            raise ValueError("a manifest signer needs at least one key")
        self.keys = tuple(keys)
        self.key_ids = tuple(key_id(k.public_key()) for k in self.keys)
        self.next_keys = tuple(public_key_text(k) for k in next_keys)
        self.revoked = tuple(key_id(k) for k in revoked)
        self.workdir = workdir
        self._packed: dict[tuple[str | None, str], ArtifactDigest] = {}  # (git object id, path) -> digest
        self._last: tuple[Manifest, tuple[str, ...], bytes] | None = None  # (manifest, signer ids, envelope file)

    def restore(self, data: bytes | None) -> None:
        """Take the manifest published on ``status/hq`` as the last one (its serial, and reuse if still right)."""
        if data is None:
            return
        try:
            envelope = json.loads(data)
            manifest = parse_manifest(envelope["payload"])
            signers = tuple(str(s["keyId"]) for s in envelope["signatures"])
        except (ValueError, KeyError, TypeError, ManifestError) as e:
            log.warning("cannot read back the published manifest (%s); the next one gets a new serial", e)
            return
        self._last = (manifest, signers, data)

    @property
    def serial(self) -> int | None:
        return None if self._last is None else self._last[0].serial

    def envelope_for(self, store: GitStore, commit: str, specs: Specs, now: datetime) -> bytes:
        """``manifest.json`` for ``commit``: the published one while it still says the same, else a new one."""
        last = self._last
        if (last is not None and last[0].commit == commit and last[1] == self.key_ids
                and last[0].next_keys == self.next_keys and last[0].revoked_keys == self.revoked):
            return last[2]
        serial = max((last[0].serial + 1) if last is not None else 1, int(now.timestamp()))
        manifest = self.build(store, commit, specs, serial, now)
        data = envelope_bytes(sign(manifest, self.keys))
        self._last = (manifest, self.key_ids, data)
        log.info("signed manifest %d for commit %s (%d documents, %d in-repo artifacts, key %s)", serial,
                 commit[:12], len(manifest.documents), len(manifest.artifacts), ", ".join(self.key_ids))
        return data

    def build(self, store: GitStore, commit: str, specs: Specs, serial: int, now: datetime) -> Manifest:
        documents = {path: document_digest(data) for path, data in spec_files(CommitTree(store, commit)).items()}
        return Manifest(
            serial=serial, commit=commit, issued_at=format_time(now), headquarters=specs.topology.headquarters,
            relays={relay.name: relay.parent for relay in specs.topology.relays}, documents=documents,
            artifacts=self._artifacts(store, commit, specs), next_keys=self.next_keys, revoked_keys=self.revoked)

    def _artifacts(self, store: GitStore, commit: str, specs: Specs) -> dict[str, ArtifactDigest]:
        """In-repo artifacts as relays pack them; one that cannot be packed is left out (relays refuse it too)."""
        digests: dict[str, ArtifactDigest] = {}
        for package in specs.packages:
            path = package.artifact.path
            if path is None:
                continue
            try:
                key = (store.object_id(commit, resolve_repo_path(store, commit, path)), path)
            except ArtifactError as e:
                log.warning("artifact of %s %s left out of the manifest: %s", package.name, package.version, e)
                continue
            known = self._packed.get(key) if key[0] is not None else None
            if known is None:
                work = Path(tempfile.mkdtemp(prefix="pack-", dir=self.workdir))
                try:
                    packed = pack_repo_path(store, commit, path, work)
                except ArtifactError as e:
                    log.warning("artifact of %s %s left out of the manifest: %s", package.name, package.version, e)
                    continue
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                known = ArtifactDigest(packed.sha256, packed.size, packed.format)
                if key[0] is not None:
                    self._packed[key] = known
            digests[package.source] = known
        return digests


def signer_from_files(signing_keys: Sequence[str], workdir: Path, *, next_keys: Sequence[str] = (),
                      revoked: Sequence[str] = ()) -> ManifestSigner:
    """A signer from ``--signing-key``, ``--next-key`` and ``--revoke-key`` files.

    :class:`reconciler.signing.KeyFileError` (a ValueError) names a file that cannot be used.
    """
    keys = [read_private_key(path) for path in signing_keys]
    nexts = [read_public_key(path) for path in next_keys]
    gone = [read_public_key(path) for path in revoked]
    own = {key_id(k.public_key()) for k in keys}
    for path, key in zip(revoked, gone):
        if key_id(key) in own:
            raise KeyFileError(f"--revoke-key {path} is also a --signing-key: HQ cannot sign with a key it revokes")
    return ManifestSigner(keys, workdir, next_keys=nexts, revoked=gone)
