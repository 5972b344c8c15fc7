"""End to end: an idle relay plans nothing; a change plans once.

A real origin, ``reconciler hq --once`` and a real ``reconciler relay``
(default ``--inventory-interval``), real agents in process. The relay's full
passes are counted from its ``GET /metrics``. "No pass happened" cannot be
waited for, so each quiet stretch ends with a marker: a new client whose
only row is settled (Skipped by a requirement, so no timer follows it). The
marker's registration makes exactly one pass; any pass the quiet stretch
caused shows as more than one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_helpers import Origin, RelayProcess, wait_for
from test_e2e_metrics import scrape, value
from test_e2e_relay import job, package, topology

from reconciler.agent.agent import Agent

pytestmark = pytest.mark.slow

SPECS = {
    "topology.yaml": topology(("relay-east", "hq-x")),
    "packages/tool-1.0.yaml": package("tool", "1.0", "{path: artifacts/tool}",
                                      extra="  requirements: {os: [linux]}\n"),
    "artifacts/tool/tool.txt": "tool\n",
    "jobs/install-tool.yaml": job("install-tool", "tool", "1.0", "relay-east"),
}


def passes(relay: RelayProcess) -> int:
    return int(value(scrape(relay.url), "reconciler_relay_full_pass_seconds_count") or 0)


def test_unchanged_check_ins_make_no_pass_and_a_registration_makes_one(tmp_path: Path) -> None:
    origin = Origin(tmp_path)
    origin.commit(SPECS)
    accepted = origin.accept(tmp_path / "hq")
    relay = RelayProcess("relay-east", origin.url, tmp_path / "relay", publish_interval=0.2, poll_seconds=1.0,
                         extra_args=["--inventory-interval", "900"]).start()
    try:
        def agent(client: str, os_name: str) -> Agent:
            return Agent(client, relay.url, tmp_path / "clients" / client, insecure_http=True,
                         enroll_secret=relay.enroll_secret, trust_keys=origin.trust_keys(),
                         fact_overrides={"os": os_name, "arch": "x86_64", "freeDiskMB": 50_000})

        wait_for(lambda: relay.health()["acceptedCommit"] == accepted, 60, what="the relay at the accepted commit")
        worker = agent("pc-1", "linux")

        def settled() -> bool:
            worker.run_once()  # registers, gets the install and runs it; then reports its result
            return origin.job_rows("relay-east", "install-tool").get("pc-1", {}).get("state") == "Succeeded"
        wait_for(settled, 60, what="pc-1 Succeeded on status/relay-east")

        def marker(client: str, clients: int) -> int:
            """Register a client the job skips; wait for the pass that publishes it; the pass count then."""
            agent(client, "windows").run_once()
            wait_for(lambda: (origin.relay_file("relay-east", "relay.yaml") or {}).get("clients") == clients, 60,
                     what=f"{clients} clients published")
            return passes(relay)

        counted = marker("pc-marker-1", 2)
        # Nothing changes: same facts, labels and inventory, no results. Check-ins for three times the
        # interval a relay used to re-plan at regardless (its check-in interval here, 1 s).
        quiet_until = time.monotonic() + 3.0
        while time.monotonic() < quiet_until:
            worker.run_once()
        assert marker("pc-marker-2", 3) == counted + 1, relay.output()
        assert origin.job_rows("relay-east", "install-tool")["pc-marker-2"]["state"] == "Skipped"
    finally:
        assert relay.stop() == 0, relay.output()
