"""HQ's signed manifest on status/hq: what it covers, when a new one is signed, and the CLI around the keys.

Real git (a bare origin of the example repo), real Ed25519 keys, HQ passes
driven one at a time; the relay's artifact cache packs the same in-repo
artifacts to show HQ signs the digests relays serve.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from test_hq import Origin, break_job, origin, run_cli  # noqa: F401 - origin is a fixture

from reconciler import report
from reconciler.gitstore import GitStore
from reconciler.hq import Hq
from reconciler.hq_manifest import ManifestSigner
from reconciler.relay.artifacts import ArtifactCache
from reconciler.repo_tree import load_commit
from reconciler.signing import (
    Manifest,
    key_id,
    open_envelope,
    parse_manifest,
    read_private_key,
    write_key_pair,
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def keys(tmp_path: Path, name: str) -> tuple[Path, Path]:
    private = tmp_path / "keys" / f"{name}.key"
    public, _ = write_key_pair(private)
    return private, public


def signed_hq(origin: Origin, workdir: Path, key: Path, clock: Clock, **signer_args: object) -> Hq:
    signer = ManifestSigner([read_private_key(key)], workdir, **signer_args)  # type: ignore[arg-type]
    return Hq(GitStore(str(origin.bare), workdir), signer=signer, clock=clock)


def published(origin: Origin) -> tuple[dict[str, object], Manifest]:
    envelope = json.loads(origin.files("status/hq")[report.MANIFEST_FILE])
    return envelope, parse_manifest(envelope["payload"])


def test_the_manifest_covers_every_document_and_the_artifacts_relays_serve(origin: Origin, tmp_path: Path) -> None:
    private, _ = keys(tmp_path, "hq")
    hq = signed_hq(origin, tmp_path / "hq", private, Clock())
    hq.run_pass()
    envelope, manifest = published(origin)
    key = read_private_key(private).public_key()
    opened, signer = open_envelope(envelope, {key_id(key): key})
    assert signer == key_id(key) and opened == manifest
    assert manifest.commit == origin.head
    files = origin.files(origin.head)
    specs = {p: d for p, d in files.items() if p == "topology.yaml" or p.startswith(("packages/", "jobs/"))}
    assert manifest.documents == {p: hashlib.sha256(d).hexdigest() for p, d in specs.items()}
    reader = GitStore(str(origin.bare), tmp_path / "reader")
    reader.fetch()
    loaded = load_commit(reader, origin.head)
    assert loaded.specs is not None
    assert manifest.relays == {r.name: r.parent for r in loaded.specs.topology.relays}
    cache = ArtifactCache(tmp_path / "relay", reader)
    in_repo = [p for p in loaded.specs.packages if p.artifact.path is not None]
    assert in_repo, "the example repo has in-repo artifacts"
    for package in in_repo:
        staged = cache.stage(origin.head, package)
        digest = manifest.artifacts[package.source]
        assert (digest.sha256, digest.size, digest.format) == (staged.sha256, staged.size, staged.format)


def test_a_restart_keeps_the_manifest_and_a_new_commit_or_key_signs_a_newer_one(origin: Origin,
                                                                                tmp_path: Path) -> None:
    private, _ = keys(tmp_path, "hq")
    _, next_public = keys(tmp_path, "next")
    clock = Clock()
    signed_hq(origin, tmp_path / "hq", private, clock).run_pass()
    first_envelope, first = published(origin)

    clock.now += timedelta(hours=1)
    again = signed_hq(origin, tmp_path / "hq", private, clock).run_pass()  # restarted, same keys
    assert again.published is None and published(origin)[0] == first_envelope

    origin.commit("a comment", lambda work: (work / "jobs" / "install-7zip.yaml").write_text(
        (work / "jobs" / "install-7zip.yaml").read_text() + "# reviewed\n"))
    signed_hq(origin, tmp_path / "hq", private, clock).run_pass()
    _, second = published(origin)
    assert second.commit == origin.head and second.serial > first.serial

    from reconciler.signing import public_key_text, read_public_key
    announced = signed_hq(origin, tmp_path / "hq", private, clock, next_keys=[read_public_key(next_public)])
    announced.run_pass()
    _, third = published(origin)
    assert third.commit == second.commit and third.serial > second.serial
    assert third.next_keys == (public_key_text(read_public_key(next_public)),)


def test_a_rejected_commit_keeps_the_manifest_of_the_accepted_one(origin: Origin, tmp_path: Path) -> None:
    private, _ = keys(tmp_path, "hq")
    accepted = origin.head
    hq = signed_hq(origin, tmp_path / "hq", private, Clock())
    hq.run_pass()
    origin.commit("broken", break_job)
    hq.run_pass()
    assert published(origin)[1].commit == accepted


def test_without_a_signing_key_no_manifest_is_published(origin: Origin, tmp_path: Path) -> None:
    Hq(GitStore(str(origin.bare), tmp_path / "hq")).run_pass()
    assert report.MANIFEST_FILE not in origin.files("status/hq")


def test_the_serial_outgrows_a_lost_status_ref(origin: Origin, tmp_path: Path) -> None:
    """status/hq deleted and HQ's workdir gone: the next serial is still newer (acceptance time in seconds)."""
    private, _ = keys(tmp_path, "hq")
    clock = Clock()
    signed_hq(origin, tmp_path / "hq", private, clock).run_pass()
    before = published(origin)[1].serial
    from test_hq import git
    git(origin.bare, "update-ref", "-d", "refs/heads/status/hq")
    clock.now += timedelta(seconds=5)
    signed_hq(origin, tmp_path / "hq-fresh", private, clock).run_pass()
    assert published(origin)[1].serial > before


def test_hq_cli_refuses_unusable_keys(origin: Origin, tmp_path: Path) -> None:
    private, public = keys(tmp_path, "hq")
    base = ["hq", "--origin", str(origin.bare), "--workdir", str(tmp_path / "hq"), "--once"]
    missing = run_cli(*base, "--signing-key", str(tmp_path / "nope.key"))
    assert missing.returncode == 2 and "nope.key" in missing.stderr
    a_public_key = run_cli(*base, "--signing-key", str(public))
    assert a_public_key.returncode == 2 and "private key" in a_public_key.stderr
    self_revoked = run_cli(*base, "--signing-key", str(private), "--revoke-key", str(public))
    assert self_revoked.returncode == 2 and "--revoke-key" in self_revoked.stderr
    lonely = run_cli(*base, "--next-key", str(public))
    assert lonely.returncode == 2 and "--signing-key" in lonely.stderr
    good = run_cli(*base, "--signing-key", str(private))
    assert good.returncode == 0, good.stderr
    assert published(origin)[1].commit == origin.head
