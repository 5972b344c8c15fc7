"""The specs as one relay plans with them: the jobs that reach it and its clients, packages, revisions.

Built once per accepted commit and artifact state (:func:`index_relay`) and
read by both the rules (:mod:`reconciler.plan.rules`) and the engine
(:mod:`reconciler.plan.engine`); the engine keeps what it derives from an
index in a :class:`~reconciler.plan.engine.PlanMemo` its caller owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter

from reconciler.plan.identity import plan_revision
from reconciler.reach import Reach, reach_of
from reconciler.specs import Job, Package, Specs


@dataclass(frozen=True)
class RelayIndex:
    """Specs pre-indexed for one relay (built once per accepted commit and artifact state).

    ``staged`` is what the relay can serve: (name, version) of every package
    whose artifact is in its cache, None when artifacts do not matter (a
    preview); an action that needs another one waits ("waiting for
    artifact"), with the reason in ``unavailable`` when the relay knows it.
    """

    relay: str
    specs: Specs
    relay_jobs: tuple[Job, ...]  # allLowerClients jobs reaching this relay (itself or an ancestor named)
    client_jobs: Mapping[str, tuple[Job, ...]]  # clients jobs by client id
    packages: Mapping[tuple[str, str], Package]  # (name, version) -> package
    revisions: Mapping[str, str]  # job name -> plan revision (job revision + package revision)
    jobs: tuple[Job, ...] = ()  # every job reaching the relay or one of its clients, by name
    staged: frozenset[tuple[str, str]] | None = None
    unavailable: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # The relay, then its parents up to HQ: a job's rerunScope covers this relay's
    # clients when it names one of them (a relay stands for its subtree).
    chain: tuple[str, ...] = ()


def index_relay(specs: Specs, relay: str, reach: Reach | None = None, *,
                staged: frozenset[tuple[str, str]] | None = None,
                unavailable: Mapping[tuple[str, str], str] | None = None) -> RelayIndex:
    """Index the specs for one relay: the jobs that reach it, packages, revisions, staged artifacts.

    ``reach`` is the commit's :func:`reconciler.reach.reach_of`, when the caller has it already.
    """
    reach = reach or reach_of(specs)
    packages = {(p.name, p.version): p for p in specs.packages}
    relay_jobs = reach.jobs_for(relay)
    by_client = reach.client_jobs
    reaching = tuple(sorted({*relay_jobs, *(j for jobs in by_client.values() for j in jobs)},
                            key=attrgetter("name")))
    revisions = {
        job.name: plan_revision(job, packages.get((job.package_name, job.package_version))
                                if job.package_version else None)
        for job in reaching}
    return RelayIndex(
        relay=relay,
        specs=specs,
        relay_jobs=relay_jobs,
        client_jobs=by_client,
        packages=packages,
        revisions=revisions,
        jobs=reaching,
        staged=staged,
        unavailable=dict(unavailable or {}),
        chain=reach.topology.ancestors(relay),
    )
