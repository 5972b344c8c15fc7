"""The relay's HTTP API on a real waitress server on 127.0.0.1: auth, validation, artifacts, hooks."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
from e2e_helpers import (
    CHILD_SECRET,
    ENROLL_SECRET,
    assert_json_error,
    checkin_body,
    malformed_requests,
    send_raw,
)

from reconciler import protocol
from reconciler.metrics import RelayMetrics
from reconciler.relay.server import RelayApp, Trust
from reconciler.relay.service import poll_seconds_from_env, relay_server
from reconciler.relay.state import (
    Generation,
    RelayState,
    StagedArtifact,
    make_generation,
)
from reconciler.relay.store import Store
from reconciler.serving import Server, parse_listen


@dataclass
class Relay:
    url: str
    store: Store
    state: RelayState
    cache: Path
    changes: list[str]


TRUST = Trust(enroll_secret=ENROLL_SECRET, child_secret=CHILD_SECRET)
ENROLL = {protocol.ENROLLMENT_HEADER: ENROLL_SECRET}
CHILD = {protocol.RELAY_SECRET_HEADER: CHILD_SECRET}  # what a child relay presents for artifacts


def _start(tmp_path: Path, secret: bytes | None = None, *, insecure: bool = False,
           trust: Trust = TRUST, metrics: RelayMetrics | None = None) -> tuple[Relay, Server]:
    store = Store(tmp_path / "relay")
    changes: list[str] = []
    state = RelayState("relay-a", store, poll_seconds=7, on_change=lambda: changes.append("change"),
                       on_git_hook=lambda: changes.append("hook"))
    cache = tmp_path / "relay" / "cache" / "sha256"
    cache.mkdir(parents=True)
    app = RelayApp(state, cache, webhook_secret=secret, insecure_webhook=insecure, trust=trust, metrics=metrics)
    server = relay_server(app, "127.0.0.1:0").start()
    return Relay(server.url, store, state, cache, changes), server


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r, server = _start(tmp_path)
    yield r
    server.stop()
    r.store.close()


def checkin(relay: Relay, client: str, token: str | None = None, *, enroll: bool | None = None,
            **kwargs: object) -> requests.Response:
    """A check-in with ``token``; with the enrolment secret when ``enroll`` (default: when there is no token)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if enroll or (enroll is None and not token):
        headers.update(ENROLL)
    return requests.post(f"{relay.url}/v1/clients/{client}/checkin", json=checkin_body(**kwargs),  # type: ignore[arg-type]
                         headers=headers, timeout=10)


def test_listen_address_parsing() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("8080", ":80", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_poll_seconds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECONCILER_POLL_SECONDS", raising=False)
    assert poll_seconds_from_env() == 30
    monkeypatch.setenv("RECONCILER_POLL_SECONDS", "1.5")
    assert poll_seconds_from_env() == 1.5
    monkeypatch.setenv("RECONCILER_POLL_SECONDS", "soon")
    assert poll_seconds_from_env() == 30
    for beyond in ("1e10", "inf", "nan", "-5"):  # agents would refuse the reply, or wait for ever
        monkeypatch.setenv("RECONCILER_POLL_SECONDS", beyond)
        assert poll_seconds_from_env() == 30


def test_healthz(relay: Relay) -> None:
    response = requests.get(f"{relay.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json()["ok"] is True and response.json()["relay"] == "relay-a"


def test_metrics_count_check_ins_by_code_and_refusals_by_reason(tmp_path: Path) -> None:
    """``GET /metrics`` (README, "Metrics"): a pending registration, a stolen token and a malformed body."""
    metrics = RelayMetrics()
    relay, server = _start(tmp_path, trust=Trust(enroll_secret=ENROLL_SECRET, require_approval=True),
                           metrics=metrics)
    try:
        def sample(name: str, **labels: str) -> float | None:
            return metrics.registry.get_sample_value(name, labels)

        pending = checkin(relay, "pc-1")
        assert_json_error(pending, 403, "pending approval")
        token = pending.json()["token"]
        assert sample("reconciler_registrations_total") == 1
        assert sample("reconciler_checkin_refusals_total", reason=protocol.REASON_PENDING_APPROVAL) == 1
        other = checkin(relay, "pc-2").json()["token"]
        assert checkin(relay, "pc-1", token).status_code == 403  # confirms pc-1's token: it is taken now
        assert_json_error(checkin(relay, "pc-1", other), 403, "another client's token")
        assert sample("reconciler_checkin_refusals_total", reason=protocol.REASON_TOKEN_REFUSED) == 1
        assert sample("reconciler_checkin_refusals_total", reason=protocol.REASON_PENDING_APPROVAL) == 3
        assert sample("reconciler_registrations_total") == 2
        bad = requests.post(f"{relay.url}/v1/clients/pc-1/checkin", data=b"{", timeout=5,
                            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        assert_json_error(bad, 400, "malformed JSON")
        assert sample("reconciler_checkins_total", code="400") == 1
        assert sample("reconciler_checkins_total", code="403") == 4
        assert sample("reconciler_checkins_total", code="200") is None
        assert sample("reconciler_checkin_seconds_count") == 5
        scraped = requests.get(f"{relay.url}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert 'reconciler_checkins_total{code="403"} 4.0' in scraped.text.splitlines()
        assert "pc-1" not in scraped.text and token not in scraped.text  # never a client id or a token
    finally:
        server.stop()
        relay.store.close()


def test_metrics_are_not_served_without_a_registry(relay: Relay) -> None:
    assert requests.get(f"{relay.url}/metrics", timeout=5).status_code == 404


def test_registration_then_token_required(relay: Relay) -> None:
    first = checkin(relay, "pc-1")
    assert first.status_code == 200, first.text
    token = first.json()["token"]
    assert first.json() == {"token": token, "pollSeconds": 7, "actions": [], "relay": "relay-a",
                            "softwareDigest": None}
    assert relay.changes == ["change"]

    again = checkin(relay, "pc-1", token)
    assert again.status_code == 200 and "token" not in again.json()

    missing = checkin(relay, "pc-1")
    assert_json_error(missing, 401, "no token")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")

    other = checkin(relay, "pc-2").json()["token"]
    assert_json_error(checkin(relay, "pc-1", other), 403, "another client's token")
    assert_json_error(checkin(relay, "pc-1", "x" * 43), 403, "made-up token")
    assert checkin(relay, "pc-1", token).status_code == 200


def test_lost_registration_reply_does_not_lock_the_client_out(relay: Relay) -> None:
    """Until a client has used its token, an enrolled check-in gets a new one (the old one stops working)."""
    lost = checkin(relay, "pc-1").json()["token"]
    retry = checkin(relay, "pc-1")
    assert retry.status_code == 200
    token = retry.json()["token"]
    assert token != lost
    stale = checkin(relay, "pc-1", lost)  # not yet confirmed: only the enrolment secret gets a token now
    assert_json_error(stale, 401, "the token whose reply was lost")
    assert stale.json()["reason"] == "enrollmentRequired"
    assert checkin(relay, "pc-1", token).status_code == 200
    assert_json_error(checkin(relay, "pc-1"), 401, "no token once confirmed")


def test_unregistered_client_with_a_token_registers_afresh(relay: Relay) -> None:
    """A relay that lost its database re-registers clients that present the enrolment secret."""
    refused = checkin(relay, "pc-9", "y" * 43)
    assert_json_error(refused, 401, "unknown client with a token")
    assert refused.json()["reason"] == protocol.REASON_ENROLLMENT_REQUIRED
    response = checkin(relay, "pc-9", "y" * 43, enroll=True)
    assert response.status_code == 200 and response.json()["token"]


def test_report_is_stored(relay: Relay) -> None:
    token = checkin(relay, "pc-1").json()["token"]
    response = checkin(relay, "pc-1", token, inventory=[{"name": "app", "version": "1.0"}], os="windows")
    assert response.status_code == 200
    record = relay.store.client("pc-1")
    assert record is not None and record.facts["os"] == "windows"
    assert [(i.name, i.version) for i in record.inventory] == [("app", "1.0")]


def test_results_for_unknown_operations_are_ignored(relay: Relay) -> None:
    token = checkin(relay, "pc-1").json()["token"]
    result = {"operationId": "op-nope", "status": "failed", "exitCode": 1, "message": "x",
              "finishedAt": "2026-11-23T10:00:00Z"}
    assert checkin(relay, "pc-1", token, results=[result]).status_code == 200
    assert relay.store.operation("op-nope") is None


def test_no_accepted_commit_means_no_actions(relay: Relay) -> None:
    assert relay.state.generation == Generation()
    response = checkin(relay, "pc-1")
    assert response.json()["actions"] == []


def test_malformed_requests_get_json_4xx_and_the_relay_keeps_serving(relay: Relay) -> None:
    cases = malformed_requests("pc-new")
    assert len(cases) >= 30
    session = requests.Session()
    for label, method, path, headers, body, expected in cases:
        assert_json_error(send_raw(relay.url, method, path, headers, body, session), expected, label)
    assert relay.store.client("pc-new") is None, "a refused request registered the client"
    assert checkin(relay, "pc-new").status_code == 200


def test_malformed_requests_from_a_registered_client(relay: Relay) -> None:
    token = checkin(relay, "pc-1").json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    for label, method, path, headers, body, expected in malformed_requests("pc-1"):
        if "Authorization" in headers:
            continue
        response = send_raw(relay.url, method, path, {**headers, **auth}, body)
        assert_json_error(response, expected, label)


def _stage(relay: Relay, content: bytes) -> str:
    sha = hashlib.sha256(content).hexdigest()
    (relay.cache / sha).write_bytes(content)
    return sha


def test_artifact_download_and_resume(relay: Relay) -> None:
    content = bytes(range(256)) * 4096  # 1 MiB
    sha = _stage(relay, content)
    full = requests.get(f"{relay.url}/v1/artifacts/{sha}", headers=CHILD, timeout=10)
    assert full.status_code == 200 and full.content == content
    assert full.headers["Content-Type"] == "application/octet-stream"
    assert full.headers["Accept-Ranges"] == "bytes"

    part = requests.get(f"{relay.url}/v1/artifacts/{sha}", headers={**CHILD, "Range": "bytes=1000-"}, timeout=10)
    assert part.status_code == 206 and part.content == content[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(content) - 1}/{len(content)}"

    middle = requests.get(f"{relay.url}/v1/artifacts/{sha}", headers={**CHILD, "Range": "bytes=10-19"}, timeout=10)
    assert middle.status_code == 206 and middle.content == content[10:20]

    beyond = requests.get(f"{relay.url}/v1/artifacts/{sha}", headers={**CHILD, "Range": f"bytes={len(content)}-"},
                          timeout=10)
    assert_json_error(beyond, 416, "range beyond the end")
    assert beyond.headers["Content-Range"] == f"bytes */{len(content)}"

    head = requests.head(f"{relay.url}/v1/artifacts/{sha}", headers=CHILD, timeout=10)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(content))


def test_empty_artifact(relay: Relay) -> None:
    sha = _stage(relay, b"")
    response = requests.get(f"{relay.url}/v1/artifacts/{sha}", headers=CHILD, timeout=10)
    assert response.status_code == 200 and response.content == b""


def test_git_hook_without_secret_is_refused(relay: Relay) -> None:
    """Authenticated by default: no secret and no opt-out refuses every hook; the rest keeps serving."""
    response = requests.post(f"{relay.url}/v1/hooks/git", data=b"{}", timeout=5)
    assert_json_error(response, 401, "unsigned hook on a relay without a secret")
    assert "--webhook-secret-file" in response.json()["error"]
    assert relay.changes == []
    assert requests.get(f"{relay.url}/healthz", timeout=5).status_code == 200


def test_git_hook_unsigned_when_explicitly_insecure(tmp_path: Path) -> None:
    r, server = _start(tmp_path, insecure=True)
    try:
        for _ in range(2):  # no signature, so nothing to recognise a replay by: each one wakes a fetch
            assert requests.post(f"{r.url}/v1/hooks/git", data=b"{}", timeout=5).status_code == 202
        assert r.changes == ["hook", "hook"]
    finally:
        server.stop()
        r.store.close()


def test_git_hook_with_secret(tmp_path: Path) -> None:
    r, server = _start(tmp_path, secret=b"s3cret", insecure=True)  # a secret wins over the opt-out
    try:
        body = json.dumps({"ref": "refs/heads/status/hq"}).encode()
        assert_json_error(requests.post(f"{r.url}/v1/hooks/git", data=body, timeout=5), 401, "unsigned hook")
        bad = {"X-Hub-Signature-256": "sha256=" + "0" * 64}
        assert_json_error(requests.post(f"{r.url}/v1/hooks/git", data=body, headers=bad, timeout=5), 401,
                          "wrong signature")
        assert r.changes == []
        good = {"X-Hub-Signature-256": "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest(),
                "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
        assert requests.post(f"{r.url}/v1/hooks/git", data=body, headers=good, timeout=5).status_code == 202
        assert r.changes == ["hook"]
        assert_json_error(requests.post(f"{r.url}/v1/hooks/git", data=body, headers=good, timeout=5), 409,
                          "replayed hook")
        other_id = {**good, "X-GitHub-Delivery": "another-id"}
        assert_json_error(requests.post(f"{r.url}/v1/hooks/git", data=body, headers=other_id, timeout=5), 409,
                          "replayed signature under a fresh delivery id")
        assert r.changes == ["hook"]
        assert r.changes == ["hook"]
    finally:
        server.stop()
        r.store.close()


def test_staged_artifact_json() -> None:
    assert StagedArtifact("a" * 64, 3, "file", "setup.sh").to_json() == {
        "sha256": "a" * 64, "size": 3, "format": "file", "fileName": "setup.sh"}
    assert "fileName" not in StagedArtifact("a" * 64, 3, "tar").to_json()


def test_server_stops_and_frees_its_port(tmp_path: Path) -> None:
    r, server = _start(tmp_path)
    assert requests.get(f"{r.url}/healthz", timeout=5).status_code == 200
    server.stop()
    r.store.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{r.url}/healthz", timeout=2)


# ------------------------------------------------------------------ planning at check-in


def _specs(max_concurrent: int | None = None):  # type: ignore[no-untyped-def]
    from reconciler.specs import parse_repo

    rollout = f"\n  rollout: {{maxConcurrent: {max_concurrent}}}" if max_concurrent else ""
    result = parse_repo({
        "topology.yaml": b"apiVersion: reconciler/v1\nkind: Topology\nmetadata: {name: t}\n"
                         b"spec: {headquarters: hq-x, relays: [{name: relay-a, parent: hq-x}]}\n",
        "packages/app.yaml": b"apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: app-1.0}\n"
                             b"spec:\n  name: app\n  version: '1.0'\n  artifact: {path: artifacts/app}\n"
                             b"  installer: {type: command, install: [sh, install.sh], uninstall: [sh, rm.sh],"
                             b" timeoutSeconds: 120}\n",
        "jobs/install-app.yaml": ("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: install-app}\n"
                                  "spec:\n  jobType: install\n  package: {name: app, version: '1.0'}\n"
                                  f"  destinationType: allLowerClients\n  destinations: [relay-a]{rollout}\n").encode(),
    }, lambda path: None)
    assert result.specs is not None, result.errors
    return result.specs


def _serve_plan(relay: Relay, *, staged: bool = True, max_concurrent: int | None = None) -> None:
    artifact = StagedArtifact("ab" * 32, 10240, "tar")
    relay.state.generation = make_generation(
        "c" * 40, _specs(max_concurrent), "relay-a", artifacts={("app", "1.0"): artifact} if staged else {},
        unavailable={} if staged else {("app", "1.0"): "sha256 mismatch (refused)"})


def _in_progress(relay: Relay, job: str, other_than: str = "") -> int:
    """Online clients InProgress for ``job``, as the next check-in counts them (from the row states)."""
    now = datetime.now(timezone.utc)
    with relay.store.snapshot() as db:
        return relay.store.usage(db, [job], other_than, relay.state.online_since(now))[job].in_progress


def _result(op: str, status: str = "succeeded") -> dict[str, object]:
    return {"operationId": op, "status": status, "exitCode": 0 if status == "succeeded" else 1,
            "message": "done", "finishedAt": "2026-11-23T10:00:00Z"}


def test_checkin_hands_out_actions_once_and_records_results(relay: Relay) -> None:
    _serve_plan(relay)
    first = checkin(relay, "pc-1").json()
    token = first["token"]
    [action] = first["actions"]
    assert action == {
        "operationId": action["operationId"], "job": "install-app", "action": "install",
        "package": {"name": "app", "version": "1.0"}, "previousVersion": None,
        "artifact": {"sha256": "ab" * 32, "size": 10240, "format": "tar"},
        "installer": {"type": "command", "install": ["sh", "install.sh"], "uninstall": ["sh", "rm.sh"],
                      "detect": [], "timeoutSeconds": 120},
    }
    op = action["operationId"]
    stored = relay.store.operation(op)
    assert stored is not None and stored.outcome.value == "dispatched" and stored.attempt == 1
    assert _in_progress(relay, "install-app") == 1
    assert relay.store.row_states_of("pc-1")["install-app"].state == "InProgress"

    # No result yet (the agent was restarted mid-install): the same operation again, not a new one.
    again = checkin(relay, "pc-1", token).json()["actions"]
    assert [a["operationId"] for a in again] == [op]
    assert len(relay.store.operations_of("pc-1")) == 1 and _in_progress(relay, "install-app") == 1

    done = checkin(relay, "pc-1", token, results=[_result(op)], inventory=[{"name": "app", "version": "1.0"}])
    assert done.json()["actions"] == []
    assert relay.store.operation(op).outcome.value == "succeeded"  # type: ignore[union-attr]
    assert _in_progress(relay, "install-app") == 0
    assert relay.store.row_states_of("pc-1")["install-app"].state == "Succeeded"
    # The agent re-sends the result until it sees a reply: a no-op.
    assert checkin(relay, "pc-1", token, results=[_result(op, "failed")],
                   inventory=[{"name": "app", "version": "1.0"}]).status_code == 200
    assert relay.store.operation(op).outcome.value == "succeeded"  # type: ignore[union-attr]


def test_rollout_slots_are_shared_across_check_ins(relay: Relay) -> None:
    _serve_plan(relay, max_concurrent=1)
    first = checkin(relay, "pc-1").json()
    assert len(first["actions"]) == 1
    assert checkin(relay, "pc-2").json()["actions"] == []  # waiting for a rollout slot
    assert relay.store.row_states_of("pc-2")["install-app"].state == "Pending"
    op = first["actions"][0]["operationId"]
    checkin(relay, "pc-1", first["token"], results=[_result(op)], inventory=[{"name": "app", "version": "1.0"}])
    assert len(checkin(relay, "pc-2").json()["actions"]) == 1


def test_rollout_usage_is_counted_on_the_other_clients_row_states(relay: Relay) -> None:
    _serve_plan(relay, max_concurrent=5)
    token = checkin(relay, "pc-1").json()["token"]
    assert _in_progress(relay, "install-app") == 1
    assert _in_progress(relay, "install-app", other_than="pc-1") == 0  # a client's own rows are replanned
    # the row state is the truth: a client that stops being online frees its slot without any counter
    with relay.store.write() as db:
        db.execute("UPDATE clients SET last_seen = 0 WHERE id = 'pc-1'")
    assert _in_progress(relay, "install-app") == 0
    assert checkin(relay, "pc-1", token).status_code == 200  # back online: its operation counts again
    assert _in_progress(relay, "install-app") == 1


def test_actions_whose_artifact_is_unavailable_are_held(relay: Relay) -> None:
    _serve_plan(relay, staged=False)
    response = checkin(relay, "pc-1").json()
    assert response["actions"] == [] and relay.store.operations_of("pc-1") == []
    assert relay.store.row_states_of("pc-1")["install-app"].state == "Pending"
    assert _in_progress(relay, "install-app") == 0


def test_published_free_disk_is_rounded_to_whole_gib() -> None:
    from reconciler.relay.full_pass import published_facts

    facts = {"os": "linux", "freeDiskMB": 51_300}
    assert published_facts(facts) == {"os": "linux", "freeDiskMB": 51_200}
    assert published_facts({"freeDiskMB": 51_999}) == published_facts({"freeDiskMB": 51_300})
    assert facts["freeDiskMB"] == 51_300 and published_facts({"os": "darwin"}) == {"os": "darwin"}


def test_a_job_the_relay_cannot_plan_costs_that_job_only(relay: Relay) -> None:
    # A value past what the loader allows (HQ never accepts it), standing in for
    # any planning failure nobody foresaw: the relay must keep serving every other job.
    from dataclasses import replace
    from datetime import datetime, timedelta, timezone

    from reconciler.relay.state import unplannable_errors

    specs = _specs()
    good = specs.jobs[0]
    west_of_utc = timezone(-timedelta(hours=23, minutes=59))
    bad = replace(good, name="install-app-later", revision="r2",
                  not_before=datetime(9999, 12, 31, 23, 59, 59, tzinfo=west_of_utc))
    relay.state.generation = make_generation("c" * 40, replace(specs, jobs=(good, bad)), "relay-a",
                                             artifacts={("app", "1.0"): StagedArtifact("ab" * 32, 10240, "tar")})
    first = checkin(relay, "pc-1")
    assert first.status_code == 200, first.text
    assert [a["job"] for a in first.json()["actions"]] == ["install-app"]
    generation = relay.state.generation
    assert set(generation.unplannable) == {"install-app-later"}
    assert "OverflowError" in generation.unplannable["install-app-later"]
    assert generation.index is not None and "install-app-later" not in generation.index.revisions
    assert unplannable_errors(generation) == [
        "job install-app-later cannot be planned on this relay and is left out until the next commit: "
        + generation.unplannable["install-app-later"]]
    # later check-ins of this and other clients keep working on the isolated index
    token = first.json()["token"]
    assert checkin(relay, "pc-1", token).status_code == 200
    assert [a["job"] for a in checkin(relay, "pc-2").json()["actions"]] == ["install-app"]


def test_an_action_names_the_dependencies_the_agent_must_see_installed(relay: Relay) -> None:
    from reconciler.specs import parse_repo

    result = parse_repo({
        "topology.yaml": b"apiVersion: reconciler/v1\nkind: Topology\nmetadata: {name: t}\n"
                         b"spec: {headquarters: hq-x, relays: [{name: relay-a, parent: hq-x}]}\n",
        "packages/runtime.yaml": b"apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: runtime-2.0}\n"
                                 b"spec: {name: runtime, version: '2.0', artifact: {path: a}, installer: {type: files}}\n",
        "packages/addon.yaml": b"apiVersion: reconciler/v1\nkind: Package\nmetadata: {name: addon-1.0}\n"
                               b"spec: {name: addon, version: '1.0', artifact: {path: a}, installer: {type: files},\n"
                               b"       dependsOn: [{name: runtime, minVersion: '2.0'}]}\n",
        "jobs/runtime.yaml": b"apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: install-runtime}\n"
                             b"spec: {jobType: install, package: {name: runtime, version: '2.0'},\n"
                             b"       destinationType: allLowerClients, destinations: [relay-a]}\n",
        "jobs/addon.yaml": b"apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: install-addon}\n"
                           b"spec: {jobType: install, package: {name: addon, version: '1.0'},\n"
                           b"       destinationType: allLowerClients, destinations: [relay-a]}\n",
    }, lambda path: None)
    assert result.specs is not None, result.errors
    staged = StagedArtifact("cd" * 32, 10, "tar")
    relay.state.generation = make_generation("d" * 40, result.specs, "relay-a",
                                             artifacts={("runtime", "2.0"): staged, ("addon", "1.0"): staged})
    first = checkin(relay, "pc-1").json()
    assert [(a["job"], a.get("dependsOn")) for a in first["actions"]] == [("install-runtime", None)]
    assert relay.store.row_states_of("pc-1")["install-addon"].state == "Pending"
    op = first["actions"][0]["operationId"]
    after = checkin(relay, "pc-1", first["token"], results=[_result(op)],
                    inventory=[{"name": "runtime", "version": "2.0"}]).json()
    assert [(a["job"], a.get("dependsOn")) for a in after["actions"]] == [
        ("install-addon", [{"name": "runtime", "minVersion": "2.0"}])]


def _package_tar() -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in (("install.sh", b"exit 0\n"), ("rm.sh", b"exit 0\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


def test_a_download_blip_uses_up_no_attempt(tmp_path: Path) -> None:
    """A real agent that cannot download the artifact reports notAttempted; the relay sends attempt 1 again."""
    from datetime import timedelta

    from reconciler.agent.agent import Agent

    clock = [datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)]
    store = Store(tmp_path / "relay")
    state = RelayState("relay-a", store, poll_seconds=7)
    cache = tmp_path / "relay" / "cache" / "sha256"
    cache.mkdir(parents=True)
    content = _package_tar()
    sha = hashlib.sha256(content).hexdigest()
    state.generation = make_generation("c" * 40, _specs(), "relay-a",
                                       artifacts={("app", "1.0"): StagedArtifact(sha, len(content), "tar")})
    server = relay_server(RelayApp(state, cache, trust=TRUST, now=lambda: clock[0]), "127.0.0.1:0").start()
    try:
        agent = Agent("pc-1", server.url, tmp_path / "client", [], [], enroll_secret=ENROLL_SECRET,
                      insecure_http=True)
        first = agent.step()  # the action goes out; its artifact is not in the relay's cache (a 404)
        [result] = first.results
        assert result["status"] == "notAttempted"
        blip = store.operation(result["operationId"])
        assert blip is not None and blip.attempt == 1

        agent.step()  # the result reaches the relay: nothing is handed out again yet
        assert store.operation(blip.operation_id).outcome.value == "notAttempted"  # type: ignore[union-attr]
        assert store.row_states_of("pc-1")["install-app"].state == "Pending"
        assert [o.operation_id for o in store.operations_of("pc-1")] == [blip.operation_id]

        (cache / sha).write_bytes(content)  # the relay can serve it again
        clock[0] += timedelta(seconds=61)
        again = agent.step()
        assert [r["status"] for r in again.results] == ["succeeded"]
        retried = store.operation(again.results[0]["operationId"])
        assert retried is not None and retried.operation_id != blip.operation_id
        assert (retried.attempt, retried.deferrals) == (1, 1)  # the blip used up no attempt, and is counted
        agent.step()
        assert store.row_states_of("pc-1")["install-app"].state == "Succeeded"
    finally:
        server.stop()
        store.close()
