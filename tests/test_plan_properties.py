"""Properties of the plan engine over generated fleets (hypothesis, 500 examples each).

A generated fleet is a random relay tree, a handful of packages (with
requirements and dependencies), jobs of every kind (nested and named
destinations, suspended, scheduled, downgrades, uninstalls) and clients with
random facts and inventories. The properties:

* the same input gives the same plan, whatever the order of the clients;
* without rollout limits, a relay's plan is its clients' plans side by side;
* convergence: applying every action to the inventory and planning again
  (no history) leaves no action and no Pending row except rows waiting for
  a future schedule or for a dependency that waits for one;
* with rollout limits, repeating that never starts more than
  ``maxConcurrent`` clients of a job per relay at once, and still converges;
* a row exists exactly for the clients a job reaches: ``allLowerClients``
  reaches a relay's clients exactly when the relay or one of its ancestors
  (computed here independently) is a destination; ``clients`` reaches the
  named clients; no action for anyone else;
* conflicts are symmetric: a row naming job B in conflict means B's row for
  that client is a Conflict naming it back.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.plan import (
    Action,
    ActionKind,
    Client,
    ClientState,
    Installed,
    Plan,
    index_relay,
    plan_relay,
    rollup,
)
from reconciler.specs import (
    Artifact,
    Dependency,
    DestinationType,
    Installer,
    InstallerType,
    Job,
    JobType,
    Package,
    Relay,
    Requirements,
    Specs,
    Topology,
)
from reconciler.versions import at_least

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
NAMES = ("a", "b", "c", "d")
VERSIONS = ("1.0", "1.5", "2.0", "10.0")
OSES = ("windows", "linux", "darwin")
PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Fleet:
    def __init__(self, specs: Specs, clients: tuple[Client, ...]) -> None:
        self.specs = specs
        self.clients = clients
        self.parents = {r.name: r.parent for r in specs.topology.relays}

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Fleet(specs={self.specs!r}, clients={self.clients!r})"


@st.composite
def fleets(draw: st.DrawFn, *, rollout: bool = False) -> Fleet:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    relay_names = [f"r{k}" for k in range(draw(st.integers(1, 6)))]
    relays = tuple(Relay(name, rnd.choice(["hq", *relay_names[:k]])) for k, name in enumerate(relay_names))

    packages: list[Package] = []
    for name in NAMES:
        for version in rnd.sample(VERSIONS, rnd.randint(1, 3)):
            requirements = Requirements()
            if rnd.random() < 0.3:
                requirements = Requirements(os=tuple(rnd.sample(OSES, rnd.randint(1, 2))))
            if rnd.random() < 0.15:
                requirements = replace(requirements, min_free_disk_mb=rnd.choice([100, 1000]))
            depends: tuple[Dependency, ...] = ()
            if rnd.random() < 0.3:
                other = rnd.choice([n for n in NAMES if n != name])
                depends = (Dependency(other, rnd.choice([None, "1.5"])),)
            packages.append(Package(
                spec_name=f"{name}-{version}", name=name, version=version, artifact=Artifact(path=name),
                installer=Installer(InstallerType.FILES), requirements=requirements, depends_on=depends,
                revision=f"p-{name}-{version}-{rnd.random()}"))

    client_ids = [f"pc-{k}" for k in range(draw(st.integers(1, 7)))]
    jobs: list[Job] = []
    for k in range(draw(st.integers(1, 5))):
        package = rnd.choice(packages)
        uninstall = rnd.random() < 0.25
        named = rnd.random() < 0.25
        destinations = tuple(sorted(set(rnd.sample(client_ids if named else relay_names,
                                                   rnd.randint(1, min(2, len(client_ids if named else relay_names)))))))
        not_before = not_after = None
        roll = rnd.random()
        if roll < 0.1:
            not_before = NOW + timedelta(days=1)
        elif roll < 0.2:
            not_after = NOW - timedelta(days=1)
        elif roll < 0.3:
            not_before, not_after = NOW - timedelta(days=1), NOW + timedelta(days=1)
        jobs.append(Job(
            name=f"job-{k}", job_type=JobType.UNINSTALL if uninstall else JobType.INSTALL,
            package_name=package.name,
            package_version=(rnd.choice([None, package.version]) if uninstall else package.version),
            destination_type=DestinationType.CLIENTS if named else DestinationType.ALL_LOWER_CLIENTS,
            destinations=destinations, not_before=not_before, not_after=not_after,
            suspend=rnd.random() < 0.1, allow_downgrade=rnd.random() < 0.3,
            max_concurrent=(rnd.choice([None, 1, 2]) if rollout else None),
            revision=f"j-{k}-{rnd.random()}"))

    clients = tuple(
        Client(id=cid, relay=rnd.choice(relay_names), os=rnd.choice([*OSES, None]),
               arch="x86_64", free_disk_mb=rnd.choice([None, 50, 500, 5000]),
               installed=tuple(Installed(n, rnd.choice(VERSIONS)) for n in NAMES if rnd.random() < 0.35),
               online=(rnd.random() < 0.8) if rollout else True)
        for cid in client_ids)
    specs = Specs(Topology("hq", relays), tuple(packages), tuple(jobs))
    return Fleet(specs, clients)


def plan_all(fleet: Fleet, clients: Sequence[Client] | None = None) -> dict[str, Plan]:
    clients = fleet.clients if clients is None else clients
    return {relay.name: plan_relay(index_relay(fleet.specs, relay.name),
                                   [c for c in clients if c.relay == relay.name], {}, NOW)
            for relay in fleet.specs.topology.relays}


def apply(clients: Sequence[Client], actions: Sequence[Action]) -> tuple[Client, ...]:
    """What the agents would do: run every action in order, as the inventory reports it after."""
    by_client: dict[str, list[Action]] = {}
    for action in actions:
        by_client.setdefault(action.client, []).append(action)
    result = []
    for client in clients:
        installed = {i.name: i.version for i in client.installed}
        for action in by_client.get(client.id, []):
            if action.kind is ActionKind.UNINSTALL:
                installed.pop(action.name, None)
            else:
                assert action.version is not None
                installed[action.name] = action.version
        result.append(replace(client, installed=tuple(Installed(n, v) for n, v in sorted(installed.items()))))
    return tuple(result)


def reaches(fleet: Fleet, job: Job, client: Client) -> bool:
    if job.destination_type is DestinationType.CLIENTS:
        return client.id in job.destinations
    relay: str | None = client.relay
    while relay is not None and relay != "hq":
        if relay in job.destinations:
            return True
        relay = fleet.parents.get(relay)
    return False


# --------------------------------------------------------------- properties


@PROPERTY
@given(fleets())
def test_same_input_same_plan(fleet: Fleet) -> None:
    first = plan_all(fleet)
    assert plan_all(fleet) == first
    assert plan_all(fleet, list(reversed(fleet.clients))) == first


@PROPERTY
@given(fleets())
def test_without_rollout_limits_each_client_is_planned_on_its_own(fleet: Fleet) -> None:
    # twins (same facts and inventory, another id) exercise the reuse of a client's plan
    twins = tuple(replace(c, id=f"{c.id}-twin") for c in fleet.clients)
    clients = fleet.clients + twins
    for relay, together in plan_all(fleet, clients).items():
        index = index_relay(fleet.specs, relay)
        alone = [plan_relay(index, [c], {}, NOW) for c in sorted(clients, key=lambda c: c.id) if c.relay == relay]
        assert together.rows == tuple(sorted((r for p in alone for r in p.rows), key=lambda r: (r.job, r.client)))
        assert together.actions == tuple(a for p in alone for a in p.actions)
        # the pass counts states per shape and per replayed plan: the same as counting the rows
        specs = {j.name: j for j in fleet.specs.jobs}
        assert together.jobs == tuple(
            rollup(j.job, [r for r in together.rows if r.job == j.job], suspended=specs[j.job].suspend,
                   max_failures=specs[j.job].max_failures) for j in together.jobs)


def _assert_dependencies_installed(clients: Sequence[Client], actions: Sequence[Action]) -> None:
    """An install goes out only when its dependencies are installed already, never beside them."""
    installed = {c.id: {i.name: i.version for i in c.installed} for c in clients}
    for action in actions:
        if action.kind is ActionKind.UNINSTALL or action.package is None:
            continue
        for dep in action.package.depends_on:
            have = installed[action.client].get(dep.name)
            assert have is not None and (dep.min_version is None or at_least(have, dep.min_version)), action


WAITING = re.compile(r"^(scheduled for |waiting for dependency )")


@PROPERTY
@given(fleets())
def test_applying_the_actions_converges(fleet: Fleet) -> None:
    # A dependent goes out only once its dependency is installed: one round
    # per link of the longest dependency chain, then nothing more to do.
    clients = fleet.clients
    for _ in range(len(fleet.specs.jobs) + 1):
        actions = [a for p in plan_all(fleet, clients).values() for a in p.actions]
        if not actions:
            break
        _assert_dependencies_installed(clients, actions)
        clients = apply(clients, actions)
    again = plan_all(fleet, clients)
    assert [a for p in again.values() for a in p.actions] == []
    for plan in again.values():
        for row in plan.rows:
            assert row.state is not ClientState.IN_PROGRESS
            if row.state is ClientState.PENDING:
                assert WAITING.match(row.message), row


@PROPERTY
@given(fleets(rollout=True))
def test_rollout_never_exceeds_max_concurrent_and_still_converges(fleet: Fleet) -> None:
    jobs = {j.name: j for j in fleet.specs.jobs}
    clients = tuple(replace(c, online=True) for c in fleet.clients)
    for _ in range(len(clients) + 2):
        plans = plan_all(fleet, clients)
        actions = [a for p in plans.values() for a in p.actions]
        if not actions:
            break
        for plan in plans.values():
            started: dict[str, int] = {}
            for action in plan.actions:
                started[action.job] = started.get(action.job, 0) + 1
            for name, count in started.items():
                limit = jobs[name].max_concurrent
                assert limit is None or count <= limit, (plan.relay, name, count)
        clients = apply(clients, actions)
    assert [a for p in plan_all(fleet, clients).values() for a in p.actions] == []


@PROPERTY
@given(fleets())
def test_rows_exactly_for_reached_clients(fleet: Fleet) -> None:
    plans = plan_all(fleet)
    rows = {(r.job, r.client) for p in plans.values() for r in p.rows}
    expected = {(j.name, c.id) for j in fleet.specs.jobs for c in fleet.clients if reaches(fleet, j, c)}
    assert rows == expected
    for plan in plans.values():
        for action in plan.actions:
            assert (action.job, action.client) in expected
            assert any(c.id == action.client and c.relay == plan.relay for c in fleet.clients)


@PROPERTY
@given(fleets(), st.data())
def test_nested_relays_are_reached_exactly_through_an_ancestor(fleet: Fleet, data: st.DataObject) -> None:
    relays = [r.name for r in fleet.specs.topology.relays]
    destination = data.draw(st.sampled_from(relays))
    base = fleet.specs.packages[0]
    job = Job(name="probe", job_type=JobType.INSTALL, package_name=base.name, package_version=base.version,
              destination_type=DestinationType.ALL_LOWER_CLIENTS, destinations=(destination,), revision="x")
    specs = replace(fleet.specs, jobs=(job,))
    for relay in relays:
        probe_client = Client(id="probe-client", relay=relay)
        plan = plan_relay(index_relay(specs, relay), [probe_client], {}, NOW)
        below = relay == destination
        walk: str | None = relay
        while walk is not None and walk != "hq" and not below:
            walk = fleet.parents.get(walk)
            below = walk == destination
        assert [r.client for r in plan.rows] == (["probe-client"] if below else [])


NAMED = re.compile(r"job (\S+) \(wants")


@PROPERTY
@given(fleets())
def test_conflicts_are_symmetric(fleet: Fleet) -> None:
    rows = {(r.job, r.client): r for p in plan_all(fleet).values() for r in p.rows}
    for (job, client), row in rows.items():
        if row.state is not ClientState.CONFLICT:
            continue
        others = NAMED.findall(row.message)
        assert others
        for other in others:
            back = rows[(other, client)]
            assert back.state is ClientState.CONFLICT
            assert job in NAMED.findall(back.message)
        assert row.action is None
