"""Prometheus metrics, collected on each scrape from the live objects.

Counters that must survive a job's end (relayed bytes per port, probe
failures) live in the relay registry and here; gauges (jobs by status,
active relays) are read from the job manager when scraped.  The registry is
our own, never the global one, so tests and several daemons in one process
do not share figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sna import __version__
from sna.nbd.relay import RelayRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LiveCollector(Collector):
    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]],
        relays: RelayRegistry,
        spares: Optional[Callable[[], dict[str, int]]],
        sha_messages: Optional[Callable[[], dict[str, int]]],
    ) -> None:
        self._job_counts = job_counts
        self._relays = relays
        self._spares = spares
        self._sha_messages = sha_messages

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("sna_jobs", "Jobs the daemon knows, by status.", labels=["status"])
        for status, count in self._job_counts().items():
            jobs.add_metric([status], count)
        yield jobs

        relayed = CounterMetricFamily(
            "sna_relay_bytes",
            "Bytes relayed through the NBD relays, by target port and direction.",
            labels=["port", "direction"],
        )
        for (port, direction), count in sorted(self._relays.totals().items()):
            relayed.add_metric([str(port), direction], count)
        yield relayed

        active = GaugeMetricFamily(
            "sna_relay_connections",
            "Client connections open through each relay.",
            labels=["port", "job_id"],
        )
        throughput = GaugeMetricFamily(
            "sna_relay_throughput_bytes_per_second",
            "Bytes per second through each relay over the last seconds.",
            labels=["port", "job_id"],
        )
        for relay in self._relays.relays():
            stats = relay.stats()
            labels = [str(stats.port), stats.job_id]
            active.add_metric(labels, stats.active_connections)
            throughput.add_metric(labels, stats.bytes_per_second_current)
        yield active
        yield throughput

        if self._spares is not None:
            spares = GaugeMetricFamily(
                "sna_spare_clients",
                "Backup clients started ahead of jobs, by state (starting, ready).",
                labels=["state"],
            )
            for state, count in sorted(self._spares().items()):
                spares.add_metric([state], count)
            yield spares

        if self._sha_messages is not None:
            messages = GaugeMetricFamily(
                "sna_sha_messages",
                "Completions and final states for the SHA, by state (pending: not taken yet).",
                labels=["state"],
            )
            counts = {"pending": 0, "delivered": 0, **self._sha_messages()}
            for state, count in sorted(counts.items()):
                messages.add_metric([state], count)
            yield messages

        info = GaugeMetricFamily("sna_info", "The running sna.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class Metrics:
    """The daemon's registry, and the counters other parts increment."""

    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]],
        relays: RelayRegistry,
        spares: Optional[Callable[[], dict[str, int]]] = None,
        sha_messages: Optional[Callable[[], dict[str, int]]] = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_LiveCollector(job_counts, relays, spares, sha_messages))
        self.probe_failures = Counter(
            "sna_nbd_probe_failures",
            "NBD targets that failed the pre-job handshake probe, by reason.",
            labelnames=["reason"],
            registry=self.registry,
        )

        self.sha_requests = Counter(
            "sna_sha_requests",
            "Requests to the SHA, by route (changeid, complete, telemetry) and outcome "
            "(delivered, refused, unknown_job, retry, unreachable).",
            labelnames=["route", "outcome"],
            registry=self.registry,
        )

    def probe_failed(self, reason: str) -> None:
        self.probe_failures.labels(reason=reason).inc()

    def sha_answered(self, route: str, outcome: str) -> None:
        self.sha_requests.labels(route=route, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
