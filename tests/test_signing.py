"""HQ's manifest signatures (``reconciler/signing.py``) and the agent's verifier (``reconciler/agent/verify.py``).

No relay, no HQ: envelopes are signed here with throw-away Ed25519 keys and
handed to a :class:`Verifier` as a check-in reply would carry them, with the
exact job and package documents. The CLI cases run ``reconciler keygen`` and
``reconciler agent`` as subprocesses.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from e2e_helpers import reconciler

from reconciler.agent.verify import TRUST_FILE, Verifier
from reconciler.signing import (
    KeyFileError,
    Manifest,
    ManifestError,
    document_digest,
    key_id,
    open_envelope,
    public_key_text,
    read_private_key,
    read_public_key,
    sign,
    trusted_keys,
)

RELAY_URL = "http://127.0.0.1:8080"
ARTIFACT_SHA = hashlib.sha256(b"the tool's bytes").hexdigest()

JOB = """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: install-tool}
spec:
  jobType: install
  package: {name: tool, version: "1.0"}
  destinationType: allLowerClients
  destinations: [relay-a]
"""

PACKAGE = f"""\
apiVersion: reconciler/v1
kind: Package
metadata: {{name: tool-1.0}}
spec:
  name: tool
  version: "1.0"
  artifact: {{url: "https://downloads.example.invalid/tool.bin", sha256: "{ARTIFACT_SHA}"}}
  installer: {{type: command, install: [sh, install.sh], uninstall: [sh, -c, "true"], timeoutSeconds: 60}}
"""

DOCUMENTS = {"jobs/install-tool.yaml": JOB, "packages/tool-1.0.yaml": PACKAGE}


def manifest(serial: int = 1, *, next_keys: tuple[str, ...] = (), revoked: tuple[str, ...] = (),
             documents: dict[str, str] | None = None) -> Manifest:
    texts = DOCUMENTS if documents is None else documents
    return Manifest(serial=serial, commit="c0ffee" + "0" * 34, issued_at="2026-11-30T12:00:00Z",
                    headquarters="hq-x", relays={"relay-a": "hq-x", "relay-b": "hq-x"},
                    documents={path: document_digest(text.encode()) for path, text in texts.items()},
                    next_keys=next_keys, revoked_keys=revoked)


def action(operation_id: str = "op-1") -> dict[str, Any]:
    """The install action a relay hands out for JOB, as ``relay/server.py`` ``action_json`` writes it."""
    return {
        "operationId": operation_id, "job": "install-tool", "action": "install",
        "package": {"name": "tool", "version": "1.0"}, "previousVersion": None,
        "artifact": {"sha256": ARTIFACT_SHA, "size": 16, "format": "file", "fileName": "tool.bin"},
        "installer": {"type": "command", "install": ["sh", "install.sh"], "uninstall": ["sh", "-c", "true"],
                      "detect": [], "timeoutSeconds": 60},
        "documents": {"job": "jobs/install-tool.yaml", "package": "packages/tool-1.0.yaml"},
    }


def reply(envelope: dict[str, Any] | None, *actions: dict[str, Any], relay: str = "relay-a") -> dict[str, Any]:
    out: dict[str, Any] = {"pollSeconds": 30, "relay": relay, "actions": list(actions)}
    if envelope is not None:
        out["manifest"] = envelope
        out["documents"] = dict(DOCUMENTS)
    return out


@pytest.fixture
def keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, Ed25519PrivateKey]:
    return Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


# ------------------------------------------------------------------ envelopes


def test_sign_and_open_round_trip(keys: Any) -> None:
    key = keys[0]
    original = manifest(7, next_keys=(public_key_text(keys[1].public_key()),))
    envelope = sign(original, [key])
    assert json.loads(json.dumps(envelope)) == envelope  # plain JSON on the wire
    opened, signer = open_envelope(envelope, trusted_keys([key.public_key()]))
    assert opened == original
    assert signer == key_id(key.public_key()) and signer.startswith("SHA256:")
    assert envelope["signatures"][0]["keyId"] == signer


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_one_flipped_byte_fails(keys: Any, where: str) -> None:
    key = keys[0]
    envelope = sign(manifest(3), [key])
    if where == "payload":
        payload = envelope["payload"]
        at = payload.index('"serial":3') + len('"serial":')
        envelope["payload"] = payload[:at] + "4" + payload[at + 1:]
    else:
        raw = bytearray(base64.b64decode(envelope["signatures"][0]["signature"]))
        raw[10] ^= 0x01
        envelope["signatures"][0]["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(ManifestError, match="does not verify"):
        open_envelope(envelope, trusted_keys([key.public_key()]))


def test_an_unknown_key_fails(keys: Any) -> None:
    envelope = sign(manifest(), [keys[1]])
    with pytest.raises(ManifestError, match="not signed by a trusted key") as caught:
        open_envelope(envelope, trusted_keys([keys[0].public_key()]))
    assert key_id(keys[1].public_key()) in str(caught.value)
    with pytest.raises(ManifestError, match="no payload or no signatures"):
        open_envelope({"payload": envelope["payload"], "signatures": []}, trusted_keys([keys[1].public_key()]))


def test_one_trusted_key_among_several_signatures_suffices(keys: Any) -> None:
    stranger, trusted, other = keys
    envelope = sign(manifest(), [stranger, other, trusted])
    assert len(envelope["signatures"]) == 3
    opened, signer = open_envelope(envelope, trusted_keys([trusted.public_key()]))
    assert signer == key_id(trusted.public_key()) and opened.serial == 1
    # A forged signature under a trusted key's id does not stop a good one later in the list.
    forged = copy.deepcopy(envelope)
    forged["signatures"][0]["keyId"] = key_id(trusted.public_key())
    assert open_envelope(forged, trusted_keys([trusted.public_key()]))[1] == key_id(trusted.public_key())


# ------------------------------------------------------------------ the verifier


def test_an_honest_reply_passes_and_a_tampered_one_is_refused(keys: Any, tmp_path: Path) -> None:
    verifier = Verifier([keys[0].public_key()], tmp_path, "pc-1")
    envelope = sign(manifest(1), [keys[0]])
    assert verifier.refusals(reply(envelope, action()), RELAY_URL) == {}
    tampered = action("op-2")
    tampered["installer"]["install"] = ["sh", "-c", "touch /tmp/pwned"]
    document = reply(envelope, action("op-3"), tampered)
    refused = verifier.refusals(document, RELAY_URL)
    assert list(refused) == [1] and "installer is not the package document's (install differ)" in refused[1]
    unsigned = reply(None, action("op-4"))
    assert "without HQ's signed manifest" in verifier.refusals(unsigned, RELAY_URL)[0]


def test_a_verified_envelope_is_not_checked_again_but_any_change_is(keys: Any, tmp_path: Path) -> None:
    """The relay sends the same envelope with every reply: one check; a changed signature or payload, or a
    revoked key, is checked afresh."""
    verifier = Verifier([keys[0].public_key(), keys[1].public_key()], tmp_path, "pc-1")
    envelope = sign(manifest(1), [keys[0]])
    calls: list[int] = []
    import reconciler.agent.verify as verify_module
    real = verify_module.open_envelope

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    verify_module.open_envelope = counting  # type: ignore[assignment]
    try:
        for n in range(3):
            assert verifier.refusals(reply(envelope, action(f"op-{n}")), RELAY_URL) == {}
        assert len(calls) == 1
        forged = copy.deepcopy(envelope)
        raw = bytearray(base64.b64decode(forged["signatures"][0]["signature"]))
        raw[5] ^= 0x01
        forged["signatures"][0]["signature"] = base64.b64encode(bytes(raw)).decode()
        assert "does not verify" in verifier.refusals(reply(forged, action("op-9")), RELAY_URL)[0]
        assert len(calls) == 2
        revoking = sign(manifest(2, revoked=(key_id(keys[0].public_key()),)), [keys[1]])
        assert verifier.refusals(reply(revoking, action("op-10")), RELAY_URL) == {}
        assert "not signed by a trusted key" in verifier.refusals(reply(envelope, action("op-11")), RELAY_URL)[0]
    finally:
        verify_module.open_envelope = real  # type: ignore[assignment]


@pytest.mark.parametrize("kind", ["install", "upgrade", "downgrade"])
def test_an_older_version_is_a_downgrade_whatever_the_action_calls_it(keys: Any, tmp_path: Path, kind: str) -> None:
    """The job installs tool 1.0 and does not allow downgrades; the client has tool 2.0 (HQ's plan skips it)."""
    verifier = Verifier([keys[0].public_key()], tmp_path, "pc-1")
    envelope = sign(manifest(1), [keys[0]])
    older = action()
    older["action"] = kind
    why = verifier.refusals(reply(envelope, older), RELAY_URL, {"tool": "2.0"})[0]
    assert why.startswith("job install-tool does not allow downgrades"), why
    # The same action where 1.0 is not older than what is there (or nothing is) passes.
    for installed in ({}, {"tool": "1.0"}, {"tool": "0.9"}, {"other": "9.0"}):
        plain = action()
        plain["action"] = "install"
        assert verifier.refusals(reply(envelope, plain), RELAY_URL, installed) == {}, installed
    # A job that allows downgrades takes the downgrade.
    allowing = JOB.replace("  destinations: [relay-a]\n", "  destinations: [relay-a]\n  allowDowngrade: true\n")
    texts = {**DOCUMENTS, "jobs/install-tool.yaml": allowing}
    allowed = reply(sign(manifest(2, documents=texts), [keys[0]]), older)
    allowed["documents"] = texts
    assert verifier.refusals(allowed, RELAY_URL, {"tool": "2.0"}) == {}


UNINSTALL_JOB = """\
apiVersion: reconciler/v1
kind: Job
metadata: {name: uninstall-tool}
spec:
  jobType: uninstall
  package: {name: tool}
  destinationType: allLowerClients
  destinations: [relay-a]
"""


def test_an_install_after_a_removal_in_the_same_reply_is_not_a_downgrade(keys: Any, tmp_path: Path) -> None:
    """HQ's plan sends an uninstall job's removal and the install that waits for it in one reply."""
    texts = {**DOCUMENTS, "jobs/uninstall-tool.yaml": UNINSTALL_JOB}
    envelope = sign(manifest(1, documents=texts), [keys[0]])
    verifier = Verifier([keys[0].public_key()], tmp_path, "pc-1")

    def removal(version: str | None) -> dict[str, Any]:
        return {"operationId": "op-rm", "job": "uninstall-tool", "action": "uninstall",
                "package": {"name": "tool", "version": version}, "previousVersion": None, "artifact": None,
                "installer": None, "documents": {"job": "jobs/uninstall-tool.yaml"}}

    def check(*actions: dict[str, Any]) -> dict[int, str]:
        document = reply(envelope, *actions)
        document["documents"] = texts
        return verifier.refusals(document, RELAY_URL, {"tool": "2.0"})

    assert check(removal("2.0"), action()) == {}
    assert check(removal(None), action()) == {}
    # Not freed: the removal comes after the install, or removes a version that is not there.
    assert list(check(action(), removal("2.0"))) == [0]
    assert "does not allow downgrades" in check(removal("3.0"), action())[1]
    # A removal the verifier refuses frees nothing either.
    forged = removal("2.0")
    forged["documents"] = {"job": "jobs/uninstall-other.yaml"}
    assert sorted(check(forged, action())) == [0, 1]


def test_requirements_and_schedule_the_client_can_see_are_checked(keys: Any, tmp_path: Path) -> None:
    """A package for another os or label, or a job whose notBefore is well ahead of this client's clock, is
    refused; the same action for a client that fits (or within the clock skew allowed) is not."""
    from datetime import UTC, datetime, timedelta

    job = JOB.replace("  destinations: [relay-a]\n",
                      '  destinations: [relay-a]\n  schedule: {notBefore: "2027-01-01T00:00:00Z"}\n')
    package = PACKAGE + "  requirements: {os: [windows], labels: {dept: sales}}\n"
    documents = {"jobs/install-tool.yaml": job, "packages/tool-1.0.yaml": package}
    envelope = sign(manifest(1, documents=documents), [keys[0]])
    document = reply(envelope, action())
    document["documents"] = dict(documents)
    start = datetime(2027, 1, 1, tzinfo=UTC)
    fits = {"facts": {"os": "windows", "arch": "x86_64"}, "labels": {"dept": "sales"}}

    def why(facts: dict[str, str], labels: dict[str, str], now: datetime) -> str | None:
        verifier = Verifier([keys[0].public_key()], tmp_path / str(len(list(tmp_path.iterdir()))), "pc-1")
        return verifier.refusals(document, RELAY_URL, {}, facts=facts, labels=labels, now=now).get(0)

    assert why(fits["facts"], fits["labels"], start) is None
    assert why(fits["facts"], fits["labels"], start - timedelta(minutes=10)) is None  # clocks drift a little
    early = why(fits["facts"], fits["labels"], start - timedelta(days=1))
    assert early is not None and "starts at 2027-01-01T00:00:00Z" in early
    linux = why({"os": "linux", "arch": "x86_64"}, fits["labels"], start)
    assert linux is not None and "requires os windows; this client reports linux" in linux
    other_dept = why(fits["facts"], {"dept": "hr"}, start)
    assert other_dept is not None and "requires label dept=sales" in other_dept


def test_key_rotation_is_accepted_only_when_announced(keys: Any, tmp_path: Path) -> None:
    key1, key2, _ = keys
    rotated = sign(manifest(2), [key2])

    fresh = Verifier([key1.public_key()], tmp_path / "unannounced", "pc-1")
    assert fresh.refusals(reply(sign(manifest(1), [key1]), action()), RELAY_URL) == {}
    why = fresh.refusals(reply(rotated, action()), RELAY_URL)[0]
    assert "not signed by a trusted key" in why and key_id(key2.public_key()) in why

    root = tmp_path / "announced"
    verifier = Verifier([key1.public_key()], root, "pc-1")
    announcing = sign(manifest(1, next_keys=(public_key_text(key2.public_key()),)), [key1])
    assert verifier.refusals(reply(announcing, action()), RELAY_URL) == {}
    assert key_id(key2.public_key()) in verifier.trusted()
    assert verifier.refusals(reply(rotated, action()), RELAY_URL) == {}
    # Learned for good: a new verifier on the same root (the agent restarted) still trusts key2.
    assert Verifier([key1.public_key()], root, "pc-1").refusals(reply(sign(manifest(3), [key2]), action()),
                                                                RELAY_URL) == {}


def test_revocation_drops_a_learned_key_and_even_the_anchor(keys: Any, tmp_path: Path) -> None:
    key1, key2, _ = keys
    kid1, kid2 = key_id(key1.public_key()), key_id(key2.public_key())

    # A learned key revoked by the anchor is no longer trusted.
    verifier = Verifier([key1.public_key()], tmp_path / "learned", "pc-1")
    assert verifier.refusals(reply(sign(manifest(1, next_keys=(public_key_text(key2.public_key()),)), [key1]),
                                   action()), RELAY_URL) == {}
    assert kid2 in verifier.trusted()
    assert verifier.refusals(reply(sign(manifest(2, revoked=(kid2,)), [key1]), action()), RELAY_URL) == {}
    assert set(verifier.trusted()) == {kid1}
    assert "not signed by a trusted key" in verifier.refusals(reply(sign(manifest(3), [key2]), action()),
                                                              RELAY_URL)[0]

    # The anchor itself, revoked by a manifest signed with the (trusted) next key.
    root = tmp_path / "anchor"
    verifier = Verifier([key1.public_key()], root, "pc-1")
    assert verifier.refusals(reply(sign(manifest(1, next_keys=(public_key_text(key2.public_key()),)), [key1]),
                                   action()), RELAY_URL) == {}
    assert verifier.refusals(reply(sign(manifest(2, revoked=(kid1,)), [key2]), action()), RELAY_URL) == {}
    assert set(verifier.trusted()) == {kid2}
    assert "not signed by a trusted key" in verifier.refusals(reply(sign(manifest(3), [key1]), action()),
                                                              RELAY_URL)[0]
    restarted = Verifier([key1.public_key()], root, "pc-1")  # the --trust-key file still names key1
    assert set(restarted.trusted()) == {kid2}

    # A manifest cannot revoke the key it is signed with.
    own = Verifier([key1.public_key()], tmp_path / "own", "pc-1")
    assert own.refusals(reply(sign(manifest(1, revoked=(kid1,)), [key1]), action()), RELAY_URL) == {}
    assert set(own.trusted()) == {kid1}


def test_serial_rollback_is_refused_and_remembered_across_restarts(keys: Any, tmp_path: Path) -> None:
    key = keys[0]
    verifier = Verifier([key.public_key()], tmp_path, "pc-1")
    assert verifier.refusals(reply(sign(manifest(5), [key]), action()), RELAY_URL) == {}
    assert verifier.serial == 5
    why = verifier.refusals(reply(sign(manifest(4), [key]), action()), RELAY_URL)[0]
    assert "manifest serial 4 is older than serial 5" in why
    saved = json.loads((tmp_path / TRUST_FILE).read_text())
    assert saved["serial"] == 5 and saved["relays"] == {RELAY_URL: "relay-a"}
    assert stat.S_IMODE((tmp_path / TRUST_FILE).stat().st_mode) == 0o600

    restarted = Verifier([key.public_key()], tmp_path, "pc-1")
    assert restarted.serial == 5
    assert "older than serial 5" in restarted.refusals(reply(sign(manifest(4), [key]), action()), RELAY_URL)[0]
    assert restarted.refusals(reply(sign(manifest(5), [key]), action()), RELAY_URL) == {}  # the same one again
    assert restarted.refusals(reply(sign(manifest(6), [key]), action()), RELAY_URL) == {}
    assert Verifier([key.public_key()], tmp_path, "pc-1").serial == 6


def test_a_pinned_relay_name_cannot_change(keys: Any, tmp_path: Path) -> None:
    key = keys[0]
    envelope = sign(manifest(1), [key])
    verifier = Verifier([key.public_key()], tmp_path, "pc-1")
    assert verifier.refusals(reply(envelope, relay="relay-a"), RELAY_URL) == {}
    why = verifier.refusals(reply(envelope, action(), relay="relay-b"), RELAY_URL)[0]
    assert "answered as 'relay-a' before and now as 'relay-b'" in why
    # Another URL is another relay: its name is pinned on its own.
    assert verifier.refusals(reply(envelope, action(), relay="relay-a"), "http://127.0.0.1:9090") == {}


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"serial": -1}', b'{"serial": 1, "relays": [1]}'])
def test_a_corrupt_trust_file_is_a_key_file_error(keys: Any, tmp_path: Path, content: bytes) -> None:
    (tmp_path / TRUST_FILE).write_bytes(content)
    with pytest.raises(KeyFileError, match="trust.json is unreadable"):
        Verifier([keys[0].public_key()], tmp_path, "pc-1")


# ------------------------------------------------------------------ the command line


def test_keygen_writes_an_owner_only_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "hq.key"
    public = tmp_path / "keys" / "hq.pub"
    made = reconciler("keygen", "--out", str(private))
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    kid = key_id(read_public_key(public))
    assert kid in made.stdout
    assert key_id(read_private_key(private).public_key()) == kid  # the pair belongs together
    first = private.read_bytes()

    again = reconciler("keygen", "--out", str(private), check=False)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    assert private.read_bytes() == first

    forced = reconciler("keygen", "--out", str(private), "--force")
    assert private.read_bytes() != first and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert key_id(read_public_key(public)) in forced.stdout and key_id(read_public_key(public)) != kid


def test_agent_needs_a_trust_key_or_the_insecure_opt_out(tmp_path: Path) -> None:
    base = ("agent", "--id", "pc-1", "--relay", "http://127.0.0.1:9", "--insecure-http", "--root",
            str(tmp_path / "root"), "--once")
    neither = reconciler(*base, check=False)
    assert neither.returncode == 2
    assert "--trust-key" in neither.stderr and "--insecure-unsigned-actions" in neither.stderr
    key = tmp_path / "hq.key"
    reconciler("keygen", "--out", str(key))
    both = reconciler(*base, "--trust-key", str(tmp_path / "hq.pub"), "--insecure-unsigned-actions", check=False)
    assert both.returncode == 2 and "contradict" in both.stderr
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    bad = reconciler(*base, "--trust-key", str(garbage), check=False)
    assert bad.returncode == 2 and str(garbage) in bad.stderr
    assert not (tmp_path / "root" / TRUST_FILE).exists()
