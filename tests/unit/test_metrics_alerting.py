"""The metrics operators alert on (sna.telemetry.metrics): jobs finished by result,
their durations and bytes, each VM's last success (from the records, so across
restarts), the process's own figures, and relay gauges whose labels stay bounded.

Jobs end through the real job manager over fakes; what is checked is the
Prometheus text a scrape gets, parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Optional

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from sna.config import Settings
from sna.contract.targets import NbdTarget
from sna.jobs.manager import JobManager
from sna.jobs.model import BackupRequest, Job
from sna.nbd.relay import RelayRegistry, RelayStats
from sna.telemetry.metrics import BYTES_BUCKETS, DURATION_BUCKETS, RESULTS, Metrics
from sna.testing import FakeGateway, FakeLauncher, MemoryJobStore, SteppingClock
from tests.unit.conftest import started

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
GiB = 1 << 30


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and labels; a repeated series fails the test."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice in one scrape"
            samples[key] = sample.value
    return samples


def value(metrics: Metrics, name: str, **labels: str) -> Optional[float]:
    return scrape(metrics).get((name, tuple(sorted(labels.items()))))


def request(job_id: str, vm: str, port: int) -> BackupRequest:
    return BackupRequest(
        job_id=job_id,
        vm_name=vm,
        vcenter_host="vc",
        vcenter_user="u",
        vcenter_password="pw",
        vm_path=f"/DC/vm/{vm}",
        targets=(NbdTarget("2000", "127.0.0.1", port, f"{vm}-disk0"),),
        backup_type="full",
    )


@attrs.define
class Node:
    """A job manager over fakes whose ends the metrics count, as tap wires them."""

    clock: Clock
    now: SteppingClock
    store: MemoryJobStore
    launcher: FakeLauncher
    manager: JobManager
    metrics: Metrics

    def run(self, job_id: str, vm: str, port: int, seconds: float, copied: int, code: int) -> Job:
        job = started(self.manager, request(job_id, vm, port))
        transport = self.launcher.transports[job_id]
        lines = [
            {"event": "disk_plan", "disk_key": "2000", "sync_type": "full", "bytes_total": copied},
            {"event": "disk_start", "disk_key": "2000", "sync_type": "full"},
            {"event": "progress", "disk_key": "2000", "bytes_done": copied},
        ]
        transport.protocol.outReceived(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        self.now.advance(seconds)
        if code == 143:
            self.manager.cancel(job_id)  # the fake client dies of the TERM
        else:
            transport.exit(code)
        assert job.job_id == job_id
        return self.manager.get(job_id)


def make_node(tmp_path: Any, store: Optional[MemoryJobStore] = None, start: datetime = T0) -> Node:
    clock = Clock()
    now = SteppingClock(start)
    store = store or MemoryJobStore()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)).child("log"))
    relays = RelayRegistry()
    holder: list[JobManager] = []
    metrics = Metrics(lambda: holder[0].counts(), relays, jobs=lambda: holder[0].jobs())
    manager = JobManager(
        store,
        launcher,
        clock,
        Settings(max_jobs=4, kill_grace=1),
        now,
        gateway=FakeGateway(),
        on_job_ended=metrics.job_ended,
    )
    holder.append(manager)
    manager.recover()
    return Node(clock, now, store, launcher, manager, metrics)


@pytest.fixture
def node(tmp_path: Any) -> Iterator[Node]:
    yield make_node(tmp_path)


def test_every_result_is_there_at_zero_before_any_job(node: Node) -> None:
    for result in RESULTS:
        assert value(node.metrics, "sna_jobs_finished_total", result=result) == 0.0
        assert value(node.metrics, "sna_job_duration_seconds_count", result=result) == 0.0
        assert value(node.metrics, "sna_job_bytes_count", result=result) == 0.0
    assert set(RESULTS) == {"completed", "failed", "cancelled", "interrupted"}


def test_jobs_finished_durations_and_bytes_by_result(node: Node) -> None:
    node.run("a", "web01", 10100, 90, 3 * GiB, 0)
    node.run("b", "web01", 10101, 30, 100, 3)
    node.run("c", "db01", 10102, 4000, 5 * GiB, 0)
    node.run("d", "db01", 10103, 5, 0, 143)
    metrics = node.metrics
    counts = {r: value(metrics, "sna_jobs_finished_total", result=r) for r in RESULTS}
    assert counts == {"completed": 2.0, "failed": 1.0, "cancelled": 1.0, "interrupted": 0.0}
    assert value(metrics, "sna_job_duration_seconds_sum", result="completed") == 4090.0
    # 90 s and 4000 s: one in the 300 s bucket, both in the 2 h one.
    assert value(metrics, "sna_job_duration_seconds_bucket", result="completed", le="60.0") == 0
    assert value(metrics, "sna_job_duration_seconds_bucket", result="completed", le="300.0") == 1
    assert value(metrics, "sna_job_duration_seconds_bucket", result="completed", le="7200.0") == 2
    assert value(metrics, "sna_job_bytes_sum", result="completed") == 8 * GiB
    le_4g = floatToGoString(4 * GiB)  # type: ignore[no-untyped-call]
    assert value(metrics, "sna_job_bytes_bucket", result="completed", le=le_4g) == 1
    le_1m = floatToGoString(1 << 20)  # type: ignore[no-untyped-call]
    assert value(metrics, "sna_job_bytes_bucket", result="cancelled", le=le_1m) == 1
    # Buckets that span what backups are: minutes to a week, MiB to TiB.
    assert DURATION_BUCKETS[0] <= 60 and DURATION_BUCKETS[-1] >= 7 * 86400
    assert BYTES_BUCKETS[0] == 1 << 20 and BYTES_BUCKETS[-1] >= 1 << 40


def test_a_job_reused_id_or_a_forgotten_record_never_takes_a_count_back(node: Node) -> None:
    node.run("a", "web01", 10100, 10, 1, 0)
    node.run("a", "web01", 10100, 10, 1, 3)
    assert value(node.metrics, "sna_jobs_finished_total", result="completed") == 1
    assert value(node.metrics, "sna_jobs_finished_total", result="failed") == 1
    node.manager.settings = attrs.evolve(node.manager.settings, retention_days=1)
    node.now.advance(3 * 86400)
    assert node.manager.prune() == ["a"]
    assert value(node.metrics, "sna_jobs_finished_total", result="failed") == 1


def test_last_success_per_vm_comes_from_the_records_and_survives_a_restart(
    node: Node, tmp_path: Any
) -> None:
    first = node.run("a", "web01", 10100, 60, 1, 0)
    node.run("b", "web01", 10101, 60, 1, 3)
    node.run("c", "db 01", 10102, 60, 1, 0)
    assert first.ended_at is not None
    assert value(node.metrics, "sna_last_success_timestamp_seconds", vm="web01") == (
        first.ended_at.timestamp()
    )
    # A VM whose backups all failed has no series; no series carries a job id.
    samples = scrape(node.metrics)
    vms = {dict(k[1])["vm"] for k in samples if k[0] == "sna_last_success_timestamp_seconds"}
    assert vms == {"web01", "db 01"}
    assert not any("job_id" in dict(labels) for _, labels in samples)
    # A new daemon on the same records: the counters start again, the last successes not.
    again = make_node(tmp_path / "again", node.store, node.now())
    assert value(again.metrics, "sna_jobs_finished_total", result="completed") == 0
    assert value(again.metrics, "sna_last_success_timestamp_seconds", vm="web01") == (
        first.ended_at.timestamp()
    )
    later = again.run("d", "web01", 10100, 60, 1, 0)
    assert later.ended_at is not None and later.ended_at > first.ended_at
    assert value(again.metrics, "sna_last_success_timestamp_seconds", vm="web01") == (
        later.ended_at.timestamp()
    )


def test_jobs_running_when_the_daemon_died_count_as_interrupted(node: Node, tmp_path: Any) -> None:
    started(node.manager, request("a", "web01", 10100))
    # The daemon dies: its records say running.
    again = make_node(tmp_path / "again", node.store)
    assert value(again.metrics, "sna_jobs_finished_total", result="interrupted") == 1


def test_process_metrics(node: Node) -> None:
    samples = {name for name, _ in scrape(node.metrics)}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert name in samples, name


class FakeRelay:
    """What the collector reads of a relay: its figures."""

    def __init__(self, stats: RelayStats) -> None:
        self.job_id = stats.job_id
        self._stats = stats

    def stats(self) -> RelayStats:
        return self._stats


def relay_stats(port: int, job_id: str, connections: int, rate: float) -> RelayStats:
    return RelayStats(
        port=port,
        listen_port=40000 + port % 1000,
        job_id=job_id,
        export="x",
        disk_key="2000",
        state="connected",
        bytes_to_hub=0,
        bytes_from_hub=0,
        connections=connections,
        active_connections=connections,
        started_at=0.0,
        bytes_per_second_current=rate,
        bytes_per_second_average=rate,
        upstream_error=None,
    )


def test_relay_gauges_are_per_hub_port_never_per_job() -> None:
    relays = RelayRegistry()
    # An ended job's relay still closing while the next job of its port has opened one.
    relays.add(FakeRelay(relay_stats(10100, "old-job", 0, 0.0)))  # type: ignore[arg-type]
    relays.add(FakeRelay(relay_stats(10100, "new-job", 1, 5e6)))  # type: ignore[arg-type]
    relays.add(FakeRelay(relay_stats(10101, "new-job", 1, 2e6)))  # type: ignore[arg-type]
    metrics = Metrics(dict, relays, process=False)
    samples = scrape(metrics)
    gauges = {
        (name, dict(labels)["port"]): v
        for (name, labels), v in samples.items()
        if name.startswith("sna_relay_") and name != "sna_relay_bytes_total"
    }
    assert gauges == {
        ("sna_relay_connections", "10100"): 1.0,
        ("sna_relay_connections", "10101"): 1.0,
        ("sna_relay_throughput_bytes_per_second", "10100"): 5e6,
        ("sna_relay_throughput_bytes_per_second", "10101"): 2e6,
    }
    assert not any("job_id" in dict(labels) for _, labels in samples)


def test_a_job_without_an_end_is_not_counted(node: Node) -> None:
    job = started(node.manager, request("a", "web01", 10100))
    node.metrics.job_ended(job)
    assert value(node.metrics, "sna_jobs_finished_total", result="completed") == 0
    assert job.started_at == T0
