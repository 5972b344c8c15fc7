"""HQ's signed manifest of an accepted state, and the Ed25519 keys that sign and verify it.

When HQ accepts a commit it signs a *manifest*: the commit, a serial that
only grows, the sha256 of every spec document at that commit, the sha256 of
every in-repo artifact as relays pack it, the relay tree, and the keys HQ
will sign with next or no longer trusts. Relays hand the signed manifest and
the exact documents to agents with every action, and an agent that trusts
HQ's public key runs an action only when all of it checks out
(:mod:`reconciler.agent.verify`). A relay cannot forge any of it: it holds
no signing key.

The wire form is an *envelope*, ``{"payload": "<manifest JSON text>",
"signatures": [{"keyId": ..., "signature": <base64>}]}``: the signatures are
over the payload's UTF-8 bytes exactly as sent, so no reader ever
re-serialises JSON before checking a signature. A manifest may carry several
signatures (the old and the new key during a rotation); a verifier accepts it
when one signature by a key it trusts verifies.

Key files are PEM (``reconciler keygen`` writes a PKCS#8 private key and a
SubjectPublicKeyInfo public key); OpenSSH ``ssh-ed25519`` keys are read too.
A key id is the key's OpenSSH fingerprint (``SHA256:...``, what
``ssh-keygen -lf`` prints), so operators can compare ids with the tools they
know.

Pure apart from :func:`read_private_key` and :func:`read_public_key`, which
read a file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from reconciler import names
from reconciler.fileio import TooLarge, read_at_most

MANIFEST_KIND = "Manifest"
MANIFEST_API = "reconciler/v1"
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024  # a manifest lists every document: 100,000 of them fit
MAX_SIGNATURES = 8
MAX_KEYS = 16
MAX_KEY_FILE = 64 * 1024
SHA256_HEX = frozenset("0123456789abcdef")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


class ManifestError(ValueError):
    """A manifest or envelope that does not verify or does not follow the format; the message says what."""


# ------------------------------------------------------------------ keys


def key_id(key: Ed25519PublicKey) -> str:
    """The key's OpenSSH fingerprint, ``SHA256:<base64 without padding>``."""
    blob = base64.b64decode(public_key_text(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as one OpenSSH line (``ssh-ed25519 AAAA...``): how manifests list next keys."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def parse_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or an OpenSSH line; :class:`KeyFileError` naming ``where`` otherwise."""
    text = data.strip()
    try:
        if text.startswith(b"ssh-"):
            key: Any = serialization.load_ssh_public_key(text.split(b"\n", 1)[0])
        else:
            key = serialization.load_pem_public_key(text)
    except (ValueError, UnsupportedAlgorithm, IndexError) as e:
        raise KeyFileError(f"{where}: not a PEM or OpenSSH public key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: not an Ed25519 key (reconciler keygen makes one)")
    return key


def parse_private_key(data: bytes, where: str) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from PEM (PKCS#8) or OpenSSH format."""
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key: Any = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: not an unencrypted PEM or OpenSSH private key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where}: not an Ed25519 key (reconciler keygen makes one)")
    return key


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _read_key_file(path: str | Path) -> bytes:
    try:
        return read_at_most(path, MAX_KEY_FILE)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read it: {e.strerror or e}") from None
    except TooLarge:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE} bytes, not a key file") from None


def read_private_key(path: str | Path) -> Ed25519PrivateKey:
    return parse_private_key(_read_key_file(path), str(path))


def read_public_key(path: str | Path) -> Ed25519PublicKey:
    """A public key file. A private key is refused: it belongs on HQ only, never beside an agent."""
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path}: this is a private key; give the public key (the .pub beside it)")
    return parse_public_key(data, str(path))


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key: (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_key_pair(private_path: Path, *, force: bool = False) -> tuple[Path, str]:
    """Write a new key to ``private_path`` (owner-only) and its public half beside it (``.pub``).

    Returns the public key's path and the key id. An existing file is never
    overwritten unless ``force``.
    """
    public_path = private_path.with_name(private_path.name.removesuffix(".key") + ".pub")
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} exists (give --force to replace it)")
    private, public = generate_key()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(private_path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        os.write(fd, private)
    finally:
        os.close(fd)
    public_path.write_bytes(public)
    return public_path, key_id(parse_public_key(public, str(public_path)))


# ------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class ArtifactDigest:
    """An in-repo artifact as relays pack and serve it."""

    sha256: str
    size: int
    format: str  # "tar" or "file"

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "format": self.format}


@dataclass(frozen=True)
class Manifest:
    """What HQ accepted, as signed: documents and in-repo artifacts by repo path."""

    serial: int
    commit: str
    issued_at: str
    headquarters: str
    relays: Mapping[str, str]  # relay -> parent
    documents: Mapping[str, str]  # repo path -> sha256 of the file's bytes
    artifacts: Mapping[str, ArtifactDigest] = field(default_factory=dict)  # package document path -> artifact
    next_keys: tuple[str, ...] = ()  # OpenSSH lines: keys HQ will sign with next
    revoked_keys: tuple[str, ...] = ()  # key ids no verifier may trust any more

    def chain(self, relay: str) -> tuple[str, ...]:
        """``relay``, its parent relays and HQ, bottom up (empty for a relay not in the tree)."""
        if relay not in self.relays:
            return ()
        chain: list[str] = []
        current = relay
        while current in self.relays and current not in chain:
            chain.append(current)
            current = self.relays[current]
        if current == self.headquarters:
            chain.append(current)
        return tuple(chain)

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": MANIFEST_API, "kind": MANIFEST_KIND, "serial": self.serial, "commit": self.commit,
            "issuedAt": self.issued_at, "headquarters": self.headquarters, "relays": dict(self.relays),
            "documents": dict(self.documents),
            "artifacts": {path: digest.to_json() for path, digest in self.artifacts.items()},
            "nextKeys": list(self.next_keys), "revokedKeys": list(self.revoked_keys),
        }


def document_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sign(manifest: Manifest, keys: Sequence[Ed25519PrivateKey]) -> dict[str, Any]:
    """The envelope: the manifest's canonical JSON and one signature per key."""
    if not keys:
        raise ValueError("sign needs at least one key")
    payload = canonical(manifest.to_json())
    data = payload.encode("utf-8")
    return {"payload": payload, "signatures": [
        {"keyId": key_id(key.public_key()), "signature": base64.b64encode(key.sign(data)).decode("ascii")}
        for key in keys]}


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """How an envelope is stored (``manifest.json`` on ``status/hq``)."""
    return (json.dumps(envelope, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and SHA256_HEX.issuperset(value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(payload: str) -> Manifest:
    """The manifest in a payload (already verified); :class:`ManifestError` naming the field that is wrong."""
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        raise ManifestError("manifest payload is not JSON") from None
    if not isinstance(raw, dict) or raw.get("kind") != MANIFEST_KIND or raw.get("apiVersion") != MANIFEST_API:
        raise ManifestError(f"manifest payload is not a {MANIFEST_API} {MANIFEST_KIND}")
    serial, commit, issued = raw.get("serial"), raw.get("commit"), raw.get("issuedAt")
    if not (isinstance(serial, int) and not isinstance(serial, bool) and 0 < serial < 2**63):
        raise ManifestError("manifest.serial: expected a positive integer")
    if not (isinstance(commit, str) and len(commit) in (40, 64) and SHA256_HEX.issuperset(commit)):
        raise ManifestError("manifest.commit: expected a git commit id")
    if not isinstance(issued, str) or len(issued) > 40:
        raise ManifestError("manifest.issuedAt: expected a time")
    hq, relays = raw.get("headquarters"), raw.get("relays")
    if not isinstance(hq, str) or not names.is_name(hq):
        raise ManifestError("manifest.headquarters: expected a name")
    if not isinstance(relays, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in relays.items()):
        raise ManifestError("manifest.relays: expected an object of relay names to parents")
    documents = raw.get("documents")
    if not isinstance(documents, dict) or not all(isinstance(k, str) and _is_sha256(v) for k, v in documents.items()):
        raise ManifestError("manifest.documents: expected an object of paths to sha256 digests")
    artifacts: dict[str, ArtifactDigest] = {}
    raw_artifacts = raw.get("artifacts", {})
    if not isinstance(raw_artifacts, dict):
        raise ManifestError("manifest.artifacts: expected an object")
    for path, item in raw_artifacts.items():
        if not (isinstance(item, dict) and _is_sha256(item.get("sha256")) and _int(item.get("size"))
                and item.get("format") in ("tar", "file")):
            raise ManifestError(f"manifest.artifacts[{path[:100]!r}]: expected sha256, size and format")
        artifacts[path] = ArtifactDigest(item["sha256"], item["size"], item["format"])
    next_keys, revoked = raw.get("nextKeys", []), raw.get("revokedKeys", [])
    for label, values in (("nextKeys", next_keys), ("revokedKeys", revoked)):
        if not (isinstance(values, list) and len(values) <= MAX_KEYS and all(isinstance(v, str) for v in values)):
            raise ManifestError(f"manifest.{label}: expected at most {MAX_KEYS} strings")
    return Manifest(serial, commit, issued, hq, dict(relays), dict(documents), artifacts, tuple(next_keys),
                    tuple(revoked))


def open_envelope(envelope: object, trusted: Mapping[str, Ed25519PublicKey]) -> tuple[Manifest, str]:
    """The manifest of an envelope one of whose signatures verifies with a ``trusted`` key (by key id),
    and that key's id. :class:`ManifestError` says why not: malformed, no trusted key, bad signature."""
    if not isinstance(envelope, dict):
        raise ManifestError("the relay sent no signed manifest")
    payload, signatures = envelope.get("payload"), envelope.get("signatures")
    if not isinstance(payload, str) or not isinstance(signatures, list) or not signatures:
        raise ManifestError("the manifest envelope has no payload or no signatures")
    data = payload.encode("utf-8", "surrogatepass")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ManifestError(f"the manifest is larger than {MAX_ENVELOPE_BYTES} bytes")
    seen: list[str] = []
    forged: str | None = None
    for item in signatures[:MAX_SIGNATURES]:
        if not isinstance(item, dict) or not isinstance(item.get("keyId"), str):
            continue
        kid = item["keyId"][:80]
        seen.append(kid)
        key = trusted.get(kid)
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(str(item.get("signature", "")), validate=True), data)
        except (InvalidSignature, ValueError):
            forged = kid
            continue
        return parse_manifest(payload), kid
    if forged is not None:
        raise ManifestError(f"the manifest's signature by trusted key {forged} does not verify "
                            "(altered in transit or forged)")
    shown = ", ".join(seen[:3]) or "none"
    raise ManifestError(f"the manifest is not signed by a trusted key (signed by: {shown})")


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(key): key for key in keys}
