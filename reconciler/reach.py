"""Reach: which relays a job reaches, and which jobs reach a relay, once per accepted commit.

DESIGN's ``allLowerClients``: a job naming relay R reaches every client of R
and of every relay nested below R; a ``clients`` job reaches the clients it
names on whatever relay they check in. Three places ask about it: a relay's
plan (the jobs for its own clients), a relay's artifact cache (the jobs for
any client of its subtree, whose relays fetch from it), and HQ's roll-up (the
relays whose status counts for a job). :func:`reach_of` answers all three
from one walk of the topology, built once per accepted commit and handed to
whoever asks; nothing here is cached on a whole ``Specs`` value, whose hash
alone would cost more than the walk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from reconciler.specs import DestinationType, Job, Specs, Topology


@dataclass(frozen=True)
class TopologyIndex:
    """The relay tree, indexed: each relay's parent, chain of ancestors and subtree."""

    parents: Mapping[str, str]
    chains: Mapping[str, tuple[str, ...]]  # relay -> itself, then its parents up to (not including) HQ
    subtrees: Mapping[str, frozenset[str]]  # relay -> itself and every relay below it, at any depth

    def ancestors(self, relay: str) -> tuple[str, ...]:
        """The relay itself, then its parent relays up to HQ (empty for an unknown name)."""
        return self.chains.get(relay, ())

    def subtree(self, relay: str) -> frozenset[str]:
        """The relay and every relay nested below it (empty for an unknown name or HQ)."""
        return self.subtrees.get(relay, frozenset())


def index_topology(topology: Topology) -> TopologyIndex:
    """One walk up from each relay; a cycle (never accepted) ends a walk instead of looping."""
    parents = {relay.name: relay.parent for relay in topology.relays}
    chains: dict[str, tuple[str, ...]] = {}
    members: dict[str, set[str]] = {name: set() for name in parents}
    for name in parents:
        chain: list[str] = []
        seen: set[str] = set()
        current = name
        while current in parents and current not in seen:
            chain.append(current)
            seen.add(current)
            members[current].add(name)
            current = parents[current]
        chains[name] = tuple(chain)
    return TopologyIndex(
        parents=MappingProxyType(dict(parents)),
        chains=MappingProxyType(chains),
        subtrees=MappingProxyType({name: frozenset(found) for name, found in members.items()}),
    )


@dataclass(frozen=True)
class Reach:
    """Jobs and relays of one accepted commit, paired both ways."""

    topology: TopologyIndex
    job_relays: Mapping[str, frozenset[str]]  # job -> relays whose clients it may reach
    relay_jobs: Mapping[str, tuple[Job, ...]]  # relay -> allLowerClients jobs for its own clients, by name
    client_jobs: Mapping[str, tuple[Job, ...]]  # client id -> clients jobs naming it, by name
    subtree_jobs: Mapping[str, tuple[Job, ...]]  # relay -> jobs that may reach a client of its subtree, by name

    def relays_of(self, job: str) -> frozenset[str]:
        return self.job_relays.get(job, frozenset())

    def jobs_for(self, relay: str) -> tuple[Job, ...]:
        """allLowerClients jobs for the relay's own clients (its chain meets their destinations)."""
        return self.relay_jobs.get(relay, ())

    def jobs_below(self, relay: str) -> tuple[Job, ...]:
        """Jobs that may reach a client of the relay or of any relay below it (``clients`` jobs always may)."""
        return self.subtree_jobs.get(relay, ())


def reach_of(specs: Specs, topology: TopologyIndex | None = None) -> Reach:
    """The reach of every job of ``specs`` (pass ``topology`` when it is indexed already)."""
    tree = topology or index_topology(specs.topology)
    relays = frozenset(tree.parents)
    jobs = sorted(specs.jobs, key=lambda j: j.name)
    job_relays: dict[str, frozenset[str]] = {}
    relay_jobs: dict[str, list[Job]] = {name: [] for name in relays}
    client_jobs: dict[str, list[Job]] = {}
    subtree_jobs: dict[str, list[Job]] = {name: [] for name in relays}
    for job in jobs:
        if job.destination_type is DestinationType.CLIENTS:
            job_relays[job.name] = relays
            for client in dict.fromkeys(job.destinations):
                client_jobs.setdefault(client, []).append(job)
            for name in relays:
                subtree_jobs[name].append(job)
            continue
        reached: set[str] = set()
        for destination in job.destinations:
            reached |= tree.subtree(destination)
        job_relays[job.name] = frozenset(reached)
        for name in sorted(reached):
            relay_jobs[name].append(job)
        # the relays whose subtree holds a reached relay: the reached ones and their ancestors
        for name in {a for r in reached for a in tree.ancestors(r)}:
            subtree_jobs[name].append(job)
    return Reach(
        topology=tree,
        job_relays=MappingProxyType(job_relays),
        relay_jobs=MappingProxyType({name: tuple(found) for name, found in relay_jobs.items()}),
        client_jobs=MappingProxyType({client: tuple(found) for client, found in client_jobs.items()}),
        subtree_jobs=MappingProxyType({name: tuple(found) for name, found in subtree_jobs.items()}),
    )
