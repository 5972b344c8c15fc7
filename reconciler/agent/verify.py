"""The agent's check of every action against HQ's signed manifest, before anything runs.

An agent given HQ's public key (``--trust-key``) runs an action only when

* the reply carries a manifest envelope with a signature that verifies with
  a key the agent trusts (its ``--trust-key`` files and the next keys earlier
  manifests announced, less the keys a manifest revoked);
* the manifest's serial is not older than the newest this agent has verified
  (no rollback to an older accepted state);
* the job document and (for installs) the package document the action names
  are in the reply, and their sha256 are the manifest's;
* the action is what those documents say: the job's name, type, package and
  version; for installs the installer's type, argv, timeout, redaction
  patterns and detection rule, the artifact's sha256 (the package's ``url`` sha256, or the
  manifest's digest of an in-repo artifact) and the dependencies; a
  downgrade only when the job allows it (an older version than the one
  this client reported installed is a downgrade, whatever the action calls
  it); nothing of a suspended job, nothing of a job whose ``notBefore`` is
  more than :data:`SCHEDULE_SKEW` ahead of this client's clock, no package
  whose os, arch or label requirements this client's check-in did not meet;
* the job's destination covers this client as far as the agent can tell: a
  ``clients`` job names its id; an ``allLowerClients`` job names the relay
  this agent talks to or one above it in the manifest's relay tree. The
  relay's name is pinned per relay URL the first time it answers (trust on
  first use; ``<root>/trust.json``), so a relay cannot later pass itself
  off as another.

Anything else is refused: the action never runs, and its result is
``refused`` with the reason, which the relay shows as a Failed row with
reason ``securityError`` and never retries.

The state (newest serial, learned and revoked keys, pinned relay names) is
``<root>/trust.json``, written atomically and only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reconciler import protocol
from reconciler.fileio import write_atomic
from reconciler.packing import repo_file_name, url_artifact_form
from reconciler.signing import (
    KeyFileError,
    Manifest,
    ManifestError,
    key_id,
    open_envelope,
    parse_public_key,
)
from reconciler.specs import (
    DestinationType,
    Job,
    JobType,
    Package,
    parse_document,
    reboot_policy,
)
from reconciler.times import aware, format_time, utc_now
from reconciler.versions import compare_versions

log = logging.getLogger("reconciler.agent")

TRUST_FILE = "trust.json"
INSTALL_KINDS = ("install", "upgrade", "downgrade")
MAX_LEARNED_KEYS = 16
MAX_PINNED_RELAYS = 64
_PARSED_LIMIT = 256  # documents kept parsed between check-ins, by digest


@dataclass
class TrustState:
    """What the agent has learned: persisted in ``<root>/trust.json``."""

    serial: int = 0
    learned: list[str] = field(default_factory=list)  # OpenSSH public key lines announced as next keys
    revoked: list[str] = field(default_factory=list)  # key ids
    relays: dict[str, str] = field(default_factory=dict)  # relay URL -> the relay name it answered with first

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "learnedKeys": self.learned, "revokedKeys": self.revoked,
                "relays": self.relays}

    @classmethod
    def from_json(cls, raw: Any) -> TrustState:
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        serial = raw.get("serial", 0)
        learned, revoked, relays = raw.get("learnedKeys", []), raw.get("revokedKeys", []), raw.get("relays", {})
        if not (isinstance(serial, int) and not isinstance(serial, bool) and serial >= 0):
            raise ValueError("serial is not a non-negative integer")
        if not (isinstance(learned, list) and all(isinstance(k, str) for k in learned)
                and isinstance(revoked, list) and all(isinstance(k, str) for k in revoked)
                and isinstance(relays, dict) and all(isinstance(v, str) for v in relays.values())):
            raise ValueError("keys or relays malformed")
        return cls(serial, list(learned), list(revoked), dict(relays))


class Refusal(Exception):
    """Why an action must not run (the message goes to the relay after ``security:``)."""


class Verifier:
    """Checks check-in replies for one agent; ``refusals`` is the one entry point."""

    def __init__(self, anchors: Sequence[Ed25519PublicKey], root: Path, client_id: str) -> None:
        if not anchors:
            raise ValueError("a verifier needs at least one trusted key")
        self.anchors = tuple(anchors)
        self.path = root / TRUST_FILE
        self.client_id = client_id
        self.state = self._load()
        self._parsed: dict[str, Package | Job] = {}
        self._opened: tuple[tuple[str, str, frozenset[str]], tuple[Manifest, str]] | None = None

    def _load(self) -> TrustState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return TrustState()
        try:
            return TrustState.from_json(json.loads(raw))
        except ValueError as e:
            # Starting afresh would forget the newest serial (a rollback window): refuse to guess.
            raise KeyFileError(f"{self.path} is unreadable ({e}); restore it, or delete it to trust afresh "
                               "(the agent then accepts any manifest serial once)") from None

    def _save(self) -> None:
        write_atomic(self.path, (json.dumps(self.state.to_json(), indent=1, sort_keys=True) + "\n").encode(), 0o600)

    @property
    def serial(self) -> int:
        return self.state.serial

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        keys: dict[str, Ed25519PublicKey] = {key_id(k): k for k in self.anchors}
        for line in self.state.learned:
            try:
                key = parse_public_key(line.encode("ascii", "replace"), "a learned key")
            except KeyFileError:
                continue
            keys[key_id(key)] = key
        for revoked in self.state.revoked:
            keys.pop(revoked, None)
        return keys

    # -- a reply --------------------------------------------------------------

    def refusals(self, reply: Mapping[str, Any], relay_url: str, installed: Mapping[str, str] | None = None, *,
                 facts: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
                 now: datetime | None = None) -> dict[int, str]:
        """For each action of ``reply`` (by position) that must not run, why; learns what the manifest says.

        ``installed``: package name -> version installed on this client before the reply's actions run (the
        inventory its check-in reported, which HQ's rules planned on), so that an older version sent as an
        install or upgrade is still a downgrade. A verified uninstall earlier in the reply removes its
        package first (HQ's plan sends a removal and the install that waits for it together): the install
        after it starts from nothing. ``facts`` and ``labels``: what the check-in reported (the package's
        os, arch and label requirements are checked against them, when given); ``now``: this client's clock
        (a job's ``notBefore`` more than :data:`SCHEDULE_SKEW` ahead of it is refused).
        """
        actions = reply.get("actions") or []
        client = _Client(facts, labels, now or utc_now())
        try:
            manifest = self._accept(reply, relay_url)
        except Refusal as e:
            if not actions:
                log.warning("relay %s sent a manifest this client does not accept: %s",
                            reply.get("relay") or relay_url, e)
            else:
                log.error("refusing %d action%s from relay %s: %s", len(actions), "s" if len(actions) != 1 else "",
                          reply.get("relay") or relay_url, e)
            return {i: str(e) for i in range(len(actions))}
        refused: dict[int, str] = {}
        documents = reply.get("documents")
        documents = documents if isinstance(documents, dict) else {}
        relay = str(reply.get("relay") or "")
        view = dict(installed or {})  # as the actions before this one leave it (HQ's plan: removals go first)
        for i, action in enumerate(actions):
            try:
                self.check_action(action, manifest, documents, relay, view, client)
            except Refusal as e:
                refused[i] = str(e)
                continue
            if action.get("action") == "uninstall":
                name, version = action["package"]["name"], action["package"].get("version")
                if version is None or view.get(name) == version:  # as installers.uninstall removes it
                    view.pop(name, None)
        return refused

    def _accept(self, reply: Mapping[str, Any], relay_url: str) -> Manifest | None:
        """The reply's verified manifest (None when it has none and no actions); Refusal for all actions."""
        relay = reply.get("relay")
        changed = False
        if isinstance(relay, str):
            pinned = self.state.relays.get(relay_url)
            if pinned is None:
                if len(self.state.relays) >= MAX_PINNED_RELAYS:
                    self.state.relays.pop(next(iter(self.state.relays)))
                self.state.relays[relay_url] = relay
                changed = True
            elif pinned != relay:
                raise Refusal(f"the relay at this URL answered as {pinned!r} before and now as {relay!r}")
        envelope = reply.get("manifest")
        if envelope is None:
            if changed:
                self._save()
            if reply.get("actions"):
                raise Refusal("the relay sent actions without HQ's signed manifest")
            return None
        try:
            manifest, signer = self._open(envelope)
        except ManifestError as e:
            if changed:
                self._save()
            raise Refusal(str(e)) from None
        if manifest.serial < self.state.serial:
            if changed:
                self._save()
            raise Refusal(f"manifest serial {manifest.serial} is older than serial {self.state.serial} this "
                          "client has already verified (a replayed or rolled-back manifest)")
        if manifest.serial > self.state.serial:
            self.state.serial = manifest.serial
            changed = True
        changed |= self._learn(manifest, signer)
        if changed:
            self._save()
        return manifest

    def _open(self, envelope: object) -> tuple[Manifest, str]:
        """:func:`open_envelope`, remembering the last envelope that verified: the relay sends the same one with
        every reply until HQ signs a new one, and checking it again would give the same answer (same payload,
        same signatures, same trusted keys) at a cost that grows with the number of documents."""
        trusted = self.trusted()
        key = _envelope_key(envelope, trusted)
        if key is not None and self._opened is not None and self._opened[0] == key:
            return self._opened[1]
        opened = open_envelope(envelope, trusted)
        if key is not None:
            self._opened = (key, opened)
        return opened

    def _learn(self, manifest: Manifest, signer: str) -> bool:
        """Take the manifest's next and revoked keys (it verified with ``signer``, which it cannot revoke)."""
        changed = False
        for line in manifest.next_keys:
            if line not in self.state.learned:
                try:
                    parse_public_key(line.encode("ascii", "replace"), "manifest.nextKeys")
                except KeyFileError:
                    continue
                self.state.learned = [*self.state.learned, line][-MAX_LEARNED_KEYS:]
                changed = True
        for kid in manifest.revoked_keys:
            if kid != signer and kid not in self.state.revoked:
                self.state.revoked = [*self.state.revoked, kid][-MAX_LEARNED_KEYS:]
                self.state.learned = [k for k in self.state.learned if not _is_key(k, kid)]
                changed = True
        return changed

    # -- one action -----------------------------------------------------------

    def _document(self, manifest: Manifest, documents: Mapping[str, Any], path: object, what: str) -> Package | Job:
        if not isinstance(path, str) or not path:
            raise Refusal(f"the action names no {what} document")
        expected = manifest.documents.get(path)
        if expected is None:
            raise Refusal(f"{what} document {path[:200]!r} is not in HQ's manifest (serial {manifest.serial}, "
                          f"commit {manifest.commit[:12]})")
        text = documents.get(path)
        if not isinstance(text, str):
            raise Refusal(f"the relay did not send {what} document {path[:200]!r}")
        data = text.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise Refusal(f"{what} document {path[:200]!r} is not the one HQ signed (sha256 {digest[:12]}…, "
                          f"signed {expected[:12]}…)")
        parsed = self._parsed.get(digest)
        if parsed is None:
            try:
                parsed = parse_document(path, data)
            except ValueError as e:
                raise Refusal(f"{what} document {path[:200]!r} does not load: {str(e)[:300]}") from None
            if len(self._parsed) >= _PARSED_LIMIT:
                self._parsed.clear()
            self._parsed[digest] = parsed
        return parsed

    def check_action(self, action: Any, manifest: Manifest | None, documents: Mapping[str, Any], relay: str,
                     installed: Mapping[str, str] | None = None, client: _Client | None = None) -> None:
        """Refusal unless the action is what HQ's manifest and the documents it covers say."""
        if manifest is None:
            raise Refusal("the relay sent actions without HQ's signed manifest")
        if not isinstance(action, dict):
            raise Refusal("the action is not an object")
        named = action.get("documents")
        if not isinstance(named, dict):
            raise Refusal("the action names no signed documents")
        job = self._document(manifest, documents, named.get("job"), "job")
        if not isinstance(job, Job):
            raise Refusal("the action's job document is not a job")
        if job.name != action.get("job"):
            raise Refusal(f"the action says job {str(action.get('job'))[:100]!r}, its document is job {job.name!r}")
        if job.suspend:
            raise Refusal(f"job {job.name} is suspended")
        if client is not None and job.not_before is not None and client.now < aware(job.not_before) - SCHEDULE_SKEW:
            raise Refusal(f"job {job.name} starts at {format_time(aware(job.not_before))}; this client's clock "
                          f"says {format_time(client.now)}")
        self._check_destination(job, manifest, relay)
        kind = action.get("action")
        raw_package = action.get("package")
        package_ref: dict[str, Any] = raw_package if isinstance(raw_package, dict) else {}
        name, version = package_ref.get("name"), package_ref.get("version")
        if name != job.package_name:
            raise Refusal(f"the action is for package {str(name)[:100]!r}, job {job.name} for {job.package_name!r}")
        if job.job_type is JobType.UNINSTALL:
            if kind != "uninstall":
                raise Refusal(f"job {job.name} uninstalls; the action says {str(kind)[:40]!r}")
            if job.package_version is not None and version not in (None, job.package_version):
                raise Refusal(f"job {job.name} uninstalls {job.package_version}; the action says {str(version)[:64]!r}")
            removed: Package | Job | None = None
            if action.get("reboot", "never") != "never" and job.reboot is None and named.get("package") is not None:
                removed = self._document(manifest, documents, named.get("package"), "package")
            _check_reboot(action, job, removed if isinstance(removed, Package) else None)
            return  # the uninstall runs the installer recorded when the package was installed (verified then)
        if kind not in INSTALL_KINDS:
            raise Refusal(f"job {job.name} installs; the action says {str(kind)[:40]!r}")
        if kind == "downgrade" and not job.allow_downgrade:
            raise Refusal(f"job {job.name} does not allow downgrades")
        have = (installed or {}).get(job.package_name)
        if (have is not None and job.package_version is not None and not job.allow_downgrade
                and compare_versions(have, job.package_version) > 0):
            # install() replaces whatever version is there: an older one is a downgrade whatever the action says
            raise Refusal(f"job {job.name} does not allow downgrades: {job.package_name} {have} is installed, "
                          f"the action ({str(kind)[:40]}) installs {job.package_version}")
        if version != job.package_version:
            raise Refusal(f"job {job.name} installs version {job.package_version}; the action says "
                          f"{str(version)[:64]!r}")
        package = self._document(manifest, documents, named.get("package"), "package")
        if not isinstance(package, Package):
            raise Refusal("the action's package document is not a package")
        if (package.name, package.version) != (name, version):
            raise Refusal(f"the package document is {package.name} {package.version}, the action {name} {version}")
        if client is not None:
            _check_requirements(package, client)
        self._check_installer(action.get("installer"), package)
        self._check_artifact(action.get("artifact"), package, manifest)
        if (action.get("dependsOn") or []) != protocol.dependencies_of(package):
            raise Refusal("the action's dependencies are not the package document's")
        _check_reboot(action, job, package)

    def _check_destination(self, job: Job, manifest: Manifest, relay: str) -> None:
        if job.destination_type is DestinationType.CLIENTS:
            if self.client_id not in job.destinations:
                raise Refusal(f"job {job.name} is for other clients, not {self.client_id}")
            return
        chain = manifest.chain(relay) if relay else ()
        if not chain:
            raise Refusal(f"relay {relay[:64]!r} is not in HQ's topology: job {job.name} cannot be for its clients")
        if not set(job.destinations) & set(chain):
            raise Refusal(f"job {job.name} is for the clients below {', '.join(job.destinations[:3])}; this client "
                          f"is below {' < '.join(chain)}")

    @staticmethod
    def _check_installer(raw: Any, package: Package) -> None:
        expected: dict[str, Any] = dict(protocol.installer_of(package.installer))
        if not isinstance(raw, dict) or raw != expected:
            differs = ("the installer" if not isinstance(raw, dict) else
                       ", ".join(k for k in sorted(set(raw) | set(expected)) if raw.get(k) != expected.get(k)))
            raise Refusal(f"the action's installer is not the package document's ({differs[:200]} differ)")

    @staticmethod
    def _check_artifact(raw: Any, package: Package, manifest: Manifest) -> None:
        if not isinstance(raw, dict):
            raise Refusal("the action has no artifact")
        sha = raw.get("sha256")
        shown = (raw.get("format"), raw.get("fileName"))
        if package.artifact.url is not None:
            expected = (package.artifact.sha256 or "").lower()
            if sha != expected:
                raise Refusal(f"the action's artifact sha256 {str(sha)[:64]} is not the package document's {expected}")
            if shown != url_artifact_form(package.artifact.url):
                raise Refusal("the action's artifact format or file name is not the package document's")
            return
        digest = manifest.artifacts.get(package.source)
        if digest is None:
            raise Refusal(f"HQ's manifest has no digest of the artifact of {package.source}")
        if sha != digest.sha256 or raw.get("size") != digest.size:
            raise Refusal(f"the action's artifact (sha256 {str(sha)[:64]}) is not the one HQ signed "
                          f"({digest.sha256})")
        name = repo_file_name(package.artifact.path or "") if digest.format == "file" else None
        if shown != (digest.format, name):
            raise Refusal("the action's artifact format or file name is not the one HQ signed")


SCHEDULE_SKEW = timedelta(minutes=15)
"""How far this client's clock may be behind the relay's before a job's ``notBefore`` refuses its action."""


@dataclass(frozen=True)
class _Client:
    """What this client reported in the check-in the reply answers, and its clock."""

    facts: Mapping[str, Any] | None
    labels: Mapping[str, str] | None
    now: datetime


def _check_reboot(action: Mapping[str, Any], job: Job, package: Package | None) -> None:
    """Refusal if the action may reboot the client where the signed documents do not allow it.

    ``reboot`` absent or ``never`` is always accepted: it asks for less
    than the documents may allow (a relay that does not know the field).
    """
    said = action.get("reboot", "never")
    if said not in protocol.REBOOT_POLICIES:
        raise Refusal(f"the action's reboot {str(said)[:40]!r} is not one of {', '.join(protocol.REBOOT_POLICIES)}")
    allowed = reboot_policy(job, package)
    if said != "never" and said != allowed:
        raise Refusal(f"the action says reboot {said}; job {job.name} and its package say {allowed}")


def _check_requirements(package: Package, client: _Client) -> None:
    """The package's os, arch and label requirements, against what this client reported (free disk changes
    by the minute: that one is the relay's to judge)."""
    required = package.requirements
    facts = client.facts
    if facts is not None:
        for fact, allowed in (("os", required.os), ("arch", required.arch)):
            if allowed and facts.get(fact) not in allowed:
                raise Refusal(f"package {package.name} {package.version} requires {fact} {', '.join(allowed)}; "
                              f"this client reports {str(facts.get(fact))[:40]}")
    if client.labels is not None:
        for key, value in required.labels:
            if client.labels.get(key) != value:
                raise Refusal(f"package {package.name} {package.version} requires label {key}={value}")


def _envelope_key(envelope: object, trusted: Mapping[str, Ed25519PublicKey]) -> tuple[str, str, frozenset[str]] | None:
    """What makes two verifications of an envelope the same: its payload, its signatures, the trusted keys."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), str):
        return None
    try:
        signatures = json.dumps(envelope.get("signatures"), sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return None
    return envelope["payload"], signatures, frozenset(trusted)


def _is_key(line: str, kid: str) -> bool:
    try:
        return key_id(parse_public_key(line.encode("ascii", "replace"), "a learned key")) == kid
    except KeyFileError:
        return False
