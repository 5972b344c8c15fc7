"""End to end: ``GET /metrics`` of a real relay and a real HQ, scraped and parsed as Prometheus does.

A bare origin, ``reconciler hq --listen`` and one ``reconciler relay --hq-url``
on 127.0.0.1; real agents check in. Every sample asserted is read from the
text format with :func:`prometheus_client.parser.text_string_to_metric_families`,
and compared with what the services publish on the origin (status/<relay>,
status/hq). Every wait is on a condition with a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from e2e_helpers import HqProcess, Origin, RelayProcess, trust_keys, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_relay import job, package, topology

from reconciler.agent.agent import Agent

pytestmark = pytest.mark.slow

SPECS = {
    "topology.yaml": topology(("relay-east", "hq-x")),
    "packages/tool-1.0.yaml": package("tool", "1.0", "{path: artifacts/tool}"),
    "artifacts/tool/tool.txt": "tool\n",
    "jobs/install-tool.yaml": job("install-tool", "tool", "1.0", "relay-east"),
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of ``url/metrics``: (sample name, sorted labels) -> value."""
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def rows_of(samples: Samples, job_name: str) -> dict[str, int]:
    """``reconciler_rows{job=job_name}`` by state, zeros left out."""
    return {dict(labels)["state"]: int(v) for (name, labels), v in samples.items()
            if name == "reconciler_rows" and dict(labels)["job"] == job_name and v}


def nonzero(counts: dict[str, Any]) -> dict[str, int]:
    return {state: int(n) for state, n in counts.items() if n}


class Fleet:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.origin = Origin(base)
        self.commit = self.origin.commit(SPECS)
        self.hq = HqProcess(self.origin.url, base / "hq", "--poll-interval", "1", "--publish-interval", "1", "--relay-timeout", "5",
                            *self.origin.hq_trust_args()).start()
        wait_for(lambda: self.read_hq("accepted.yaml").get("acceptedCommit") == self.commit, 60,
                 what="HQ to accept the specs")
        self.relay = RelayProcess("relay-east", self.origin.url, base / "relay-east", extra_args=[
            "--hq-url", self.hq.url, "--heartbeat-interval", "0.5"]).start()
        wait_for(lambda: self.relay.health()["acceptedCommit"] == self.commit, 60, what="the relay at the commit")

    def read_hq(self, path: str) -> dict[str, Any]:
        data = self.origin.read("status/hq", path)
        return {} if data is None else dict(yaml.safe_load(data))

    def agent(self, client: str, **kwargs: Any) -> Agent:
        kwargs.setdefault("enroll_secret", self.relay.enroll_secret)
        kwargs.setdefault("trust_keys", self.origin.trust_keys())
        return Agent(client, self.relay.url, self.base / "clients" / client, insecure_http=True, **kwargs)

    def stop(self) -> None:
        if self.relay.proc is not None and self.relay.proc.poll() is None:  # the test kills it at the end
            assert self.relay.stop() == 0, self.relay.output()
        assert self.hq.stop() == 0, self.hq.output()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


def test_relay_and_hq_metrics_count_what_they_serve_and_publish(fleet: Fleet) -> None:
    relay_url = fleet.relay.url
    before = scrape(relay_url)
    assert value(before, "reconciler_checkins_total", code="200") is None  # no check-in yet: no sample
    assert value(before, "reconciler_registrations_total") == 0
    assert value(before, "reconciler_checkin_refusals_total", reason="enrollmentRequired") == 0
    assert value(before, "reconciler_results_total", status="refused") == 0
    assert value(before, "reconciler_git_push_retries_total") == 0
    assert value(before, "reconciler_relay_full_pass_seconds_count") is not None

    # Two enrolled agents install the tool: check-ins counted and timed, two registrations, two results.
    for client in ("c-one", "c-two"):
        assert fleet.agent(client).run_once() == 0
    served = scrape(relay_url)
    answered = value(served, "reconciler_checkins_total", code="200")
    assert answered is not None and answered >= 4  # each agent: a check-in, then one reporting its result
    assert value(served, "reconciler_checkin_seconds_count") == answered
    assert value(served, "reconciler_registrations_total") == 2
    assert value(served, "reconciler_results_total", status="succeeded") == 2
    assert value(served, "reconciler_artifact_cache_lookups_total", result="miss") == 1  # packed once
    cache_bytes = value(served, "reconciler_artifact_cache_bytes")
    assert cache_bytes is not None and cache_bytes > 0

    # A stranger without the enrolment secret, and one with a wrong secret: refused, by reason.
    assert fleet.agent("c-stranger", enroll_secret=None).run_once() == 1  # refused: not reached
    assert fleet.agent("c-liar", enroll_secret="not-the-secret").run_once() == 1
    refused = scrape(relay_url)
    assert value(refused, "reconciler_checkin_refusals_total", reason="enrollmentRequired") == 1
    assert value(refused, "reconciler_checkin_refusals_total", reason="enrollmentRefused") == 1
    assert value(refused, "reconciler_checkins_total", code="401") == 2
    assert value(refused, "reconciler_registrations_total") == 2
    assert value(refused, "reconciler_checkins_total", code="200") == answered

    # An agent that trusts another signing key refuses the action it is handed: a security refusal.
    other_keys = trust_keys(fleet.base / "other-keys")
    assert fleet.agent("c-wary", trust_keys=other_keys).run_once() == 0
    wary = scrape(relay_url)
    assert value(wary, "reconciler_results_total", status="refused") == 1
    assert value(wary, "reconciler_registrations_total") == 3

    # Rows by state are those of the published status; clients online are the three registered ones.
    def relay_agrees() -> Samples | None:
        doc = fleet.origin.relay_file("relay-east", "jobs/install-tool.yaml") or {}
        published = nonzero(doc.get("counts", {}))
        samples = scrape(relay_url)
        online = value(samples, "reconciler_clients", relay="relay-east", state="online")
        if published.get("Succeeded") != 2 or sum(published.values()) != 3 or online != 3:
            return None
        return samples if rows_of(samples, "install-tool") == published else None

    agreed = wait_for(relay_agrees, 60, what="relay-east's rows metric to match its published status")
    assert value(agreed, "reconciler_clients", relay="relay-east", state="offline") == 0
    assert (value(agreed, "reconciler_relay_full_pass_seconds_count") or 0) >= 1
    assert (value(agreed, "reconciler_relay_publish_seconds_count") or 0) >= 1

    # HQ: the relay is up, and its rows are the aggregate HQ published on status/hq.
    def hq_agrees() -> Samples | None:
        published = nonzero(fleet.read_hq("jobs/install-tool.yaml").get("counts", {}))
        samples = scrape(fleet.hq.url)
        if published.get("Succeeded") != 2 or sum(published.values()) != 3:
            return None
        if value(samples, "reconciler_relay_up", relay="relay-east") != 1:
            return None
        return samples if rows_of(samples, "install-tool") == published else None

    hq_samples = wait_for(hq_agrees, 60, what="HQ's rows metric to match status/hq and relay-east up")
    assert (value(hq_samples, "reconciler_hq_pass_seconds_count") or 0) >= 1
    # A healthy fleet: no git command failed on either side, no push was retried.
    for samples in (agreed, hq_samples):
        assert [k for k, v in samples.items() if k[0] == "reconciler_git_errors_total" and v] == []
        assert value(samples, "reconciler_git_push_retries_total") == 0
    assert value(hq_samples, "reconciler_checkins_total", code="200") is None  # relay metrics stay on relays

    # /metrics is read-only.
    assert requests.post(f"{relay_url}/metrics", timeout=10).status_code == 405
    assert requests.post(f"{fleet.hq.url}/metrics", timeout=10).status_code == 405

    # A killed relay is down on HQ's metric once HQ judges it lost.
    fleet.relay.kill9()
    wait_for(lambda: value(scrape(fleet.hq.url), "reconciler_relay_up", relay="relay-east") == 0, 60,
             what="relay-east down on HQ's metrics")

