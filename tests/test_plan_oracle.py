"""The fast engine equals the readable rules, on generated fleets with history.

:mod:`reconciler.plan.rules` plans each client on its own, in plain code;
:mod:`reconciler.plan.engine` shares decisions between clients of one shape,
replays results, caches cross-job rules and counts rollout per shape. These
properties generate relays with nested topology, jobs of every kind
(schedules, suspends, rollout limits, dependencies, conflicts, uninstalls),
clients that often look alike (so shapes and replays are exercised),
history of every sort (dispatched within and past their timeout, failed
with retries left and out of them, reruns, succeeded with drift, attempts
of an older revision), reruns narrowed by a ``rerunScope`` (relays nested
above or beside the planned one, clients in and out of the fleet, repairs
of installed software), offline clients, and artifacts not staged; then
check that the engine and the rules agree on every row, action, job roll-up
and usage, for a whole relay and for each check-in.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.plan import (
    ActionKind,
    Attempt,
    Client,
    History,
    Installed,
    Outcome,
    PlanMemo,
    RelayIndex,
    index_relay,
    operation_id,
    plan_client,
    plan_relay,
)
from reconciler.plan.rules import plan_client_by_rules, plan_relay_by_rules
from reconciler.plan.vocabulary import MAX_DEFERRALS
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
    RerunScope,
    Specs,
    Topology,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
NAMES = ("a", "b", "c")
VERSIONS = ("1.0", "1.5", "2.0")
OSES = ("windows", "linux")
ORACLE = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class World:
    """A relay's index, clients and history, as hypothesis prints them."""

    def __init__(self, index: RelayIndex, clients: tuple[Client, ...], history: History) -> None:
        self.index = index
        self.clients = clients
        self.history = history

    def __repr__(self) -> str:
        return (f"World(jobs={self.index.specs.jobs!r}, packages={self.index.specs.packages!r}, "
                f"staged={self.index.staged!r}, clients={self.clients!r}, history={dict(self.history)!r})")


def _attempt(rnd: random.Random, index: RelayIndex, job: Job, cid: str) -> Attempt:
    revision = index.revisions[job.name] if rnd.random() < 0.85 else "an-older-revision"
    repaired = job.rerun_scope is not None and job.rerun_scope.repair
    outcome = rnd.choice([Outcome.DISPATCHED, Outcome.SUCCEEDED, Outcome.FAILED, Outcome.FAILED,
                         Outcome.NOT_ATTEMPTED, Outcome.REFUSED, *[Outcome.SUCCEEDED] * (3 if repaired else 0)])
    number = rnd.randint(1, max(1, job.retry_limit) + 1)
    dispatched = NOW - timedelta(seconds=rnd.choice([5, 200, 700, 4000, 90_000]))
    finished = None if outcome is Outcome.DISPATCHED else dispatched + timedelta(seconds=rnd.choice([1, 30]))
    version = job.package_version or rnd.choice(VERSIONS)
    kind = ActionKind.INSTALL if job.job_type is JobType.INSTALL else ActionKind.UNINSTALL
    op = operation_id(job.name, revision, max(0, job.rerun - rnd.randint(0, 1)), cid, job.package_name, version,
                      number)
    return Attempt(operation_id=op, job=job.name, client=cid, revision=revision,
                   rerun=max(0, job.rerun - rnd.randint(0, 1)), attempt=number, action=kind, version=version,
                   outcome=outcome, dispatched_at=dispatched, finished_at=finished,
                   message=rnd.choice(["", "exit code 3: disk full"]),
                   deferrals=rnd.choice([0, 0, 1, 5, MAX_DEFERRALS - 1]),
                   # the installer asked for a reboot the client has not made yet (only a success keeps it)
                   reboot_pending=outcome is Outcome.SUCCEEDED and rnd.random() < 0.4)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    relay_names = [f"r{k}" for k in range(rnd.randint(1, 3))]
    relays = tuple(Relay(name, rnd.choice(["hq", *relay_names[:k]])) for k, name in enumerate(relay_names))
    packages: list[Package] = []
    for name in NAMES:
        for version in rnd.sample(VERSIONS, rnd.randint(1, 3)):
            requirements = Requirements(os=(rnd.choice(OSES),)) if rnd.random() < 0.2 else Requirements()
            depends: tuple[Dependency, ...] = ()
            if rnd.random() < 0.3:
                depends = (Dependency(rnd.choice([n for n in NAMES if n != name]), rnd.choice([None, "1.5"])),)
            installer = Installer(InstallerType.COMMAND, ("i",), ("u",), timeout_seconds=rnd.choice([60, 600]))
            packages.append(Package(spec_name=f"{name}-{version}", name=name, version=version,
                                    artifact=Artifact(path=name), installer=installer, requirements=requirements,
                                    depends_on=depends, revision=f"p-{name}-{version}-{rnd.random()}"))
    client_ids = [f"pc-{k:02d}" for k in range(rnd.randint(1, 14))]
    relay = rnd.choice(relay_names)
    jobs: list[Job] = []
    for k in range(rnd.randint(1, 5)):
        package = rnd.choice(packages)
        uninstall = rnd.random() < 0.25
        named = rnd.random() < 0.2
        pool = client_ids if named else relay_names
        destinations = tuple(sorted(set(rnd.sample(pool, rnd.randint(1, min(2, len(pool)))))))
        not_before = not_after = None
        roll = rnd.random()
        if roll < 0.08:
            not_before = NOW + timedelta(days=1)
        elif roll < 0.16:
            not_after = NOW - timedelta(days=1)
        failures: int | str | None = rnd.choice([None, None, 0, 1, "30%"])
        scope = None
        if rnd.random() < 0.4:
            pool = [*client_ids, "pc-elsewhere"]
            scope_clients = tuple(rnd.sample(pool, rnd.randint(0, min(6, len(pool)))))
            scope_relays = tuple(rnd.sample(relay_names, rnd.randint(0 if scope_clients else 1, len(relay_names))))
            repair = bool(scope_clients) and not uninstall and rnd.random() < 0.5
            scope = RerunScope(relays=scope_relays, clients=scope_clients, repair=repair)
        jobs.append(Job(
            name=f"job-{k}", job_type=JobType.UNINSTALL if uninstall else JobType.INSTALL,
            package_name=package.name,
            package_version=(rnd.choice([None, package.version]) if uninstall else package.version),
            destination_type=DestinationType.CLIENTS if named else DestinationType.ALL_LOWER_CLIENTS,
            destinations=destinations, not_before=not_before, not_after=not_after,
            retry_limit=rnd.choice([0, 1, 3]), backoff_seconds=rnd.choice([0, 60, 3600]), rerun=rnd.randint(0, 2),
            suspend=rnd.random() < 0.08, allow_downgrade=rnd.random() < 0.3,
            max_concurrent=rnd.choice([None, None, 1, 2]), max_failures=failures,
            revision=f"j-{k}-{rnd.random()}", rerun_scope=scope))
    specs = Specs(Topology("hq", relays), tuple(packages), tuple(jobs))
    staged = None
    if rnd.random() < 0.5:
        staged = frozenset((p.name, p.version) for p in packages if rnd.random() < 0.8)
    index = index_relay(specs, relay, staged=staged, unavailable={("a", "1.0"): "sha256 mismatch (refused)"})
    # Few distinct looks, so that many clients share a shape.
    looks = [(rnd.choice([*OSES, None]), tuple(Installed(n, rnd.choice(VERSIONS)) for n in NAMES
                                               if rnd.random() < 0.4)) for _ in range(rnd.randint(1, 3))]
    for job in jobs:  # a repair has something to do only where the job's version is installed
        if job.rerun_scope is not None and job.rerun_scope.repair and job.package_version and rnd.random() < 0.7:
            os_, installed = looks[0]
            kept = tuple(item for item in installed if item.name != job.package_name)
            looks[0] = (os_, tuple(sorted((*kept, Installed(job.package_name, job.package_version)),
                                          key=lambda item: item.name)))
    clients = []
    history: dict[tuple[str, str], Attempt] = {}
    for cid in client_ids:
        os_, installed = rnd.choice(looks)
        online = rnd.random() < 0.85
        clients.append(Client(id=cid, relay=relay, os=os_, arch="x86_64", free_disk_mb=5000, installed=installed,
                              online=online, last_seen=None if online else rnd.choice([None, NOW - timedelta(hours=2)])))
        for job in jobs:
            repaired = job.rerun_scope is not None and cid in job.rerun_scope.clients
            if job.name in index.revisions and rnd.random() < (0.7 if repaired else 0.3):
                history[(job.name, cid)] = _attempt(rnd, index, job, cid)
    return World(index, tuple(clients), history)


@ORACLE
@given(worlds())
def test_plan_relay_equals_the_rules(world: World) -> None:
    engine = plan_relay(world.index, world.clients, world.history, NOW)
    rules = plan_relay_by_rules(world.index, world.clients, world.history, NOW)
    assert engine.rows == rules.rows
    assert engine.actions == rules.actions
    assert engine.jobs == rules.jobs
    assert engine.usage == rules.usage
    assert all(row.reason is not None for row in engine.rows)
    # a memo shared with earlier calls changes nothing
    memo = PlanMemo(world.index)
    plan_relay(world.index, world.clients[::-1], {}, NOW, memo)
    assert plan_relay(world.index, world.clients, world.history, NOW, memo) == engine


@ORACLE
@given(worlds())
def test_plan_client_equals_the_rules_for_every_check_in(world: World) -> None:
    memo = PlanMemo(world.index)
    whole = plan_relay(world.index, world.clients, world.history, NOW)
    for client in world.clients:
        checking_in = replace(client, online=True)
        usage = whole.usage  # the other clients' usage is what a relay counts at a check-in
        engine = plan_client(world.index, checking_in, world.history, usage, NOW, memo)
        rules = plan_client_by_rules(world.index, checking_in, world.history, usage, NOW)
        assert engine == rules
        assert all(row.reason is not None for row in engine.rows)


def _rescoped(world: World, scope: RerunScope | None, history: History | None = None) -> World:
    """The same world with every job's rerunScope replaced (and its history, when given)."""
    specs = world.index.specs
    jobs = tuple(replace(job, rerun_scope=scope) for job in specs.jobs)
    index = index_relay(replace(specs, jobs=jobs), world.index.relay, staged=world.index.staged,
                        unavailable=world.index.unavailable)
    return World(index, world.clients, world.history if history is None else history)


def _plan(world: World) -> tuple[object, ...]:
    plan = plan_relay(world.index, world.clients, world.history, NOW)
    return plan.rows, plan.jobs, plan.usage


@ORACLE
@given(worlds())
def test_a_scope_that_covers_every_client_plans_as_no_scope(world: World) -> None:
    plain = _plan(_rescoped(world, None))
    assert _plan(_rescoped(world, RerunScope(relays=(world.index.relay,)))) == plain
    assert _plan(_rescoped(world, RerunScope(relays=world.index.chain[-1:]))) == plain  # the top of its subtree
    assert _plan(_rescoped(world, RerunScope(clients=tuple(c.id for c in world.clients)))) == plain


@ORACLE
@given(worlds())
def test_a_scope_that_covers_no_client_resets_no_row(world: World) -> None:
    # As if the rerun had never been raised for anyone: every attempt at its job's current rerun.
    rerun = {job.name: job.rerun for job in world.index.specs.jobs}
    unraised = {key: replace(a, rerun=rerun[a.job]) for key, a in world.history.items()}
    elsewhere = [r.name for r in world.index.specs.topology.relays if r.name not in world.index.chain]
    scope = RerunScope(relays=tuple(elsewhere), clients=("pc-elsewhere",))
    assert _plan(_rescoped(world, scope))[0] == _plan(_rescoped(world, None, unraised))[0]
