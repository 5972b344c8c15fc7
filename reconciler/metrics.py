"""Prometheus metrics of one HQ or relay process: ``GET /metrics`` in the text format (README, "Metrics").

Each process keeps its own :class:`~prometheus_client.CollectorRegistry`
(never the library's global one), so tests and several relays in one
process do not collide. Events are counted where they happen (counters,
histograms); gauges of current state (rows by state, clients online, cache
size, relay liveness) are read at scrape time by a :class:`Snapshot`
collector from what the process already keeps, so nothing is counted twice.

``/metrics`` is served without credentials, like ``/healthz``: it carries
counts and job names, never a client id, token or secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from reconciler import protocol

METRICS_PATH = "/metrics"

# Check-ins take milliseconds; a full pass or a publish up to minutes on a large fleet.
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Snapshot(Collector):
    """A collector that reads current state when scraped: ``read()`` returns the metric families."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from self._read()


def gauge(name: str, documentation: str, labels: Sequence[str],
          samples: Iterable[tuple[Sequence[str], float]]) -> GaugeMetricFamily:
    """A gauge family with one sample per (label values, value)."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def row_gauge(counts: Iterable[tuple[tuple[str, str], int]]) -> GaugeMetricFamily:
    return gauge("reconciler_rows", "Rows (client x job) by job and state, as the last full pass counted them",
                 ("job", "state"), ((key, n) for key, n in counts))


class Metrics:
    """What every process counts: git failures and push retries (see :class:`reconciler.gitstore.GitStore`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.git_errors = Counter("reconciler_git_errors", "git commands that failed, by git subcommand",
                                  ["command"], registry=self.registry)
        self.push_retries = Counter("reconciler_git_push_retries",
                                    "status pushes the origin rejected and that were retried on the new tip",
                                    registry=self.registry)

    def add_snapshot(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(Snapshot(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HqMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.pass_seconds = Histogram("reconciler_hq_pass_seconds", "Duration of HQ's passes (fetch, evaluate, "
                                      "aggregate, publish)", buckets=_SLOW_BUCKETS, registry=self.registry)


class RelayMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.checkins = Counter("reconciler_checkins", "Check-ins answered, by HTTP status code", ["code"],
                                registry=r)
        self.checkin_seconds = Histogram("reconciler_checkin_seconds", "Time to answer a check-in",
                                         buckets=_FAST_BUCKETS, registry=r)
        self.registrations = Counter("reconciler_registrations", "Clients registered (given their first token)",
                                     registry=r)
        self.enrolment_refusals = Counter("reconciler_checkin_refusals", "Check-ins refused for their credentials, "
                                          "by reason (enrollmentRequired, enrollmentRefused, tokenRequired, "
                                          "tokenRefused, pendingApproval)", ["reason"], registry=r)
        self.results = Counter("reconciler_results", "Operation results recorded, by status (refused: the agent "
                               "refused an action that failed its signature checks)", ["status"], registry=r)
        self.full_pass_seconds = Histogram("reconciler_relay_full_pass_seconds", "Duration of the relay's full "
                                           "passes (plan every client)", buckets=_SLOW_BUCKETS, registry=r)
        self.publish_seconds = Histogram("reconciler_relay_publish_seconds", "Duration of publishing status/<relay> "
                                         "(commit and push)", buckets=_SLOW_BUCKETS, registry=r)
        self.cache_lookups = Counter("reconciler_artifact_cache_lookups", "Artifacts staged, by result: hit (in "
                                     "the cache already) or miss (downloaded or packed)", ["result"], registry=r)
        for status in protocol.RESULT_STATUSES:
            self.results.labels(status)
        for reason in protocol.REFUSAL_REASONS:
            self.enrolment_refusals.labels(reason)
        for result in ("hit", "miss"):
            self.cache_lookups.labels(result)


def metrics_app_response(metrics: Metrics, method: str,
                         start_response: Callable[..., object]) -> list[bytes]:
    """The ``GET /metrics`` response (405 for anything but GET and HEAD)."""
    if method not in ("GET", "HEAD"):
        body = b'{"error":"use GET"}'
        start_response("405 Method Not Allowed", [("Content-Type", "application/json"), ("Allow", "GET, HEAD"),
                                                  ("Content-Length", str(len(body)))])
        return [body]
    body = metrics.render()
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body))),
                              ("Cache-Control", "no-store")])
    return [b"" if method == "HEAD" else body]
