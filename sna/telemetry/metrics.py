"""Prometheus metrics, collected on each scrape from the live objects.

Counters that must survive a job's end (relayed bytes per port, probe
failures, jobs finished) live in the relay registry and here; gauges (jobs
by status, active relays, each VM's last success) are read from the job
manager when scraped.  The registry is our own, never the global one, so
tests and several daemons in one process do not share figures.

Every label's values are bounded: job results and statuses, hub ports of
the configured range, spare and message states, and one ``vm`` per VM the
node backs up; never a job id, which would make a series per job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sna import __version__
from sna.jobs.model import Job, JobStatus
from sna.nbd.relay import RelayRegistry
from sna.tunnel.supervisor import STATES as TUNNEL_STATES
from sna.tunnel.supervisor import TunnelState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
#: How jobs end, the values of ``result``: every one is there from the start, at 0.
RESULTS = tuple(s.value for s in JobStatus if not s.active)
#: Backups take minutes to days.
DURATION_BUCKETS = (
    10,
    60,
    300,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    12 * 3600,
    86400,
    2 * 86400,
    4 * 86400,
    7 * 86400,
)
#: And copy from an empty incremental to several TiB.
BYTES_BUCKETS = (
    MIB,
    16 * MIB,
    256 * MIB,
    GIB,
    4 * GIB,
    16 * GIB,
    64 * GIB,
    256 * GIB,
    TIB,
    4 * TIB,
    16 * TIB,
)


class _LiveCollector(Collector):
    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]],
        relays: RelayRegistry,
        spares: Optional[Callable[[], dict[str, int]]],
        sha_messages: Optional[Callable[[], dict[str, int]]],
        last_success: Optional[Callable[[], dict[str, float]]] = None,
    ) -> None:
        self._job_counts = job_counts
        self._relays = relays
        self._spares = spares
        self._sha_messages = sha_messages
        self._last_success = last_success

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
            "Client connections open through the relays of each hub port.",
            labels=["port"],
        )
        throughput = GaugeMetricFamily(
            "sna_relay_throughput_bytes_per_second",
            "Bytes per second through the relays of each hub port over the last seconds.",
            labels=["port"],
        )
        # By hub port, never by job: a port is one job's at a time, but the relay of
        # an ended job may still be closing when the next job of that port opens its own.
        ports: dict[int, tuple[int, float]] = {}
        for relay in self._relays.relays():
            stats = relay.stats()
            connections, rate = ports.get(stats.port, (0, 0.0))
            ports[stats.port] = (
                connections + stats.active_connections,
                rate + stats.bytes_per_second_current,
            )
        for port, (connections, rate) in sorted(ports.items()):
            active.add_metric([str(port)], connections)
            throughput.add_metric([str(port)], rate)
        yield active
        yield throughput

        if self._last_success is not None:
            last = GaugeMetricFamily(
                "sna_last_success_timestamp_seconds",
                "When the last completed backup of each VM ended (Unix time), from the "
                "job records: it survives restarts, until the records are forgotten.",
                labels=["vm"],
            )
            for vm, when in sorted(self._last_success().items()):
                last.add_metric([vm], when)
            yield last

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


class _TunnelCollector(Collector):
    """The SSH tunnel to the hub (sna.tunnel), once one is configured."""

    def __init__(self, tunnel: Callable[[], TunnelState]) -> None:
        self._tunnel = tunnel

    def collect(self) -> Iterator[Metric]:
        current = self._tunnel()
        if not current.configured:
            return
        up = GaugeMetricFamily(
            "sna_tunnel_up",
            "1 when the SSH tunnel to the hub has every forward and the hub answers through it.",
        )
        up.add_metric([], 1 if current.up else 0)
        yield up
        reconnects = CounterMetricFamily(
            "sna_tunnel_reconnects",
            "Times the tunnel's ssh was started again after a failure or a failed health check.",
        )
        reconnects.add_metric([], current.reconnects)
        yield reconnects
        states = GaugeMetricFamily(
            "sna_tunnel_state", "The tunnel's state: 1 for the current one.", labels=["state"]
        )
        for state in TUNNEL_STATES:
            states.add_metric([state], 1 if state == current.state else 0)
        yield states


class _SnapshotCollector(Collector):
    """Snapshots ended jobs left on their VMs, until the janitor has removed them."""

    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "sna_snapshots_pending",
            "Snapshots of ended jobs still on their VMs: the janitor retries their removal "
            "(each grows a delta disk on the datastore while it stays).",
        )
        pending.add_metric([], self._pending())
        yield pending


class Metrics:
    """The daemon's registry, and the counters other parts increment."""

    def __init__(
        self,
        job_counts: Callable[[], dict[str, int]],
        relays: RelayRegistry,
        spares: Optional[Callable[[], dict[str, int]]] = None,
        sha_messages: Optional[Callable[[], dict[str, int]]] = None,
        jobs: Optional[Callable[[], Iterable[Job]]] = None,
        process: bool = True,
        tunnel: Optional[Callable[[], TunnelState]] = None,
        snapshots_pending: Optional[Callable[[], int]] = None,
    ) -> None:
        self.registry = CollectorRegistry()
        if tunnel is not None:
            self.registry.register(_TunnelCollector(tunnel))
        if snapshots_pending is not None:
            self.registry.register(_SnapshotCollector(snapshots_pending))
        #: The job records, for each VM's last success at a scrape (kept since in
        #: ``_last_success``, so a record forgotten meanwhile does not take it back).
        self._jobs = jobs
        self._last_success: dict[str, float] = {}
        self.registry.register(
            _LiveCollector(
                job_counts,
                relays,
                spares,
                sha_messages,
                self.last_success if jobs is not None else None,
            )
        )
        if process:
            # The daemon's own CPU, memory, open descriptors and start time (Linux /proc).
            ProcessCollector(registry=self.registry)
        self.jobs_finished = Counter(
            "sna_jobs_finished",
            "Jobs that ended in this run of the daemon, by result (completed, failed, "
            "cancelled, interrupted).",
            labelnames=["result"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "sna_job_duration_seconds",
            "How long the jobs that ended in this run took, start to end, by result.",
            labelnames=["result"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.job_bytes = Histogram(
            "sna_job_bytes",
            "Bytes the jobs that ended in this run copied, by result.",
            labelnames=["result"],
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        for result in RESULTS:
            # Each series exists from the start, so increase() sees the first job too.
            self.jobs_finished.labels(result=result)
            self.job_duration.labels(result=result)
            self.job_bytes.labels(result=result)
        self.probe_failures = Counter(
            "sna_nbd_probe_failures",
            "NBD targets that failed the pre-job handshake probe, by reason.",
            labelnames=["reason"],
            registry=self.registry,
        )

        self.sha_requests = Counter(
            "sna_sha_requests",
            "Requests to the SHA, by route (changeid, complete, telemetry, replication_changeid, "
            "replication_end) and outcome "
            "(delivered, refused, unknown_job, retry, unreachable).",
            labelnames=["route", "outcome"],
            registry=self.registry,
        )

    def probe_failed(self, reason: str) -> None:
        self.probe_failures.labels(reason=reason).inc()

    def sha_answered(self, route: str, outcome: str) -> None:
        self.sha_requests.labels(route=route, outcome=outcome).inc()

    def job_ended(self, job: Job) -> None:
        """Count a job that ended (once per job, as the job manager tells it)."""
        result = job.status.value
        if result not in RESULTS or job.ended_at is None:
            return
        self.jobs_finished.labels(result=result).inc()
        self.job_duration.labels(result=result).observe(job.duration_seconds(job.ended_at))
        self.job_bytes.labels(result=result).observe(job.bytes_done)
        if job.status is JobStatus.COMPLETED:
            self._succeeded(job.vm_name, job.ended_at)

    def _succeeded(self, vm: str, when: datetime) -> None:
        at = when.timestamp()
        if at > self._last_success.get(vm, 0.0):
            self._last_success[vm] = at

    def last_success(self) -> dict[str, float]:
        """Each VM's last completed backup's end, Unix seconds: the records' and this run's."""
        if self._jobs is not None:
            for job in self._jobs():
                if job.status is JobStatus.COMPLETED and job.ended_at is not None:
                    self._succeeded(job.vm_name, job.ended_at)
        return dict(self._last_success)

    def render(self) -> bytes:
        return generate_latest(self.registry)
