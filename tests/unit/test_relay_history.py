"""The relay history behind the dashboard's chart, in memory.

Real :class:`Relay` objects on a :class:`MemoryReactorClock` (which is a
:class:`twisted.internet.task.Clock`) count the bytes the test feeds them;
:class:`RelayHistory` reads their registry and the sampler service runs on
the same clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from sna.api.app import SnaAPI
from sna.nbd.relay import Relay, RelayRegistry
from sna.nbd.relay.history import INTERVAL, WINDOW, RelayHistory, RelayHistorySampler
from sna.tap import Options, makeService
from sna.telemetry.metrics import Metrics
from sna.testing import result_of
from tests.unit.conftest import Harness

EPOCH = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


@attrs.define
class Pipe:
    """One relayed connection: what the client sends goes to the hub, and back."""

    relay: Relay
    client: IProtocol
    upstream: IProtocol

    def to_hub(self, n: int) -> None:
        self.client.dataReceived(b"w" * n)

    def from_hub(self, n: int) -> None:
        self.upstream.dataReceived(b"r" * n)


@attrs.define
class Bench:
    reactor: MemoryReactorClock
    registry: RelayRegistry
    history: RelayHistory
    pipes: list[Pipe] = attrs.field(factory=list)
    _peers: Iterator[int] = attrs.field(factory=lambda: iter(range(40000, 50000)))

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.reactor.seconds())

    def relay(self, port: int, job_id: str = "backup-pgtest1-1", disk: int = 0) -> Relay:
        relay = Relay(
            self.reactor,
            "127.0.0.1",
            port,
            job_id=job_id,
            disk_key=str(2000 + disk),
            export=f"pgtest1-disk{disk}",
            clock=self.reactor.seconds,
        )
        result_of(Deferred.fromCoroutine(relay.start()))
        self.registry.add(relay)
        return relay

    def pipe(self) -> Pipe:
        """A client connects to the newest relay, and its upstream connects."""
        servers = self.reactor.tcpServers
        peer = IPv4Address("TCP", "127.0.0.1", next(self._peers))
        client = servers[-1][1].buildProtocol(peer)
        client.makeConnection(StringTransport(peerAddress=peer))
        _host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        upstream = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        upstream.makeConnection(StringTransport())
        pipe = Pipe(self.registry.relays()[-1], client, upstream)
        self.pipes.append(pipe)
        return pipe

    def stop(self, relay: Relay) -> None:
        """The relay's job ends: it stops, its connections close, the registry lets it go."""
        stopped = relay.stop()
        for pipe in self.pipes:
            if pipe.relay is relay:
                pipe.client.connectionLost(Failure(ConnectionDone()))
                pipe.upstream.connectionLost(Failure(ConnectionDone()))
        result_of(stopped)
        self.registry.remove(relay)

    def tick(self, seconds: float = INTERVAL) -> None:
        self.reactor.advance(seconds)
        self.history.sample()


@pytest.fixture
def bench() -> Bench:
    reactor = MemoryReactorClock()
    registry = RelayRegistry()
    holder: list[Bench] = []
    history = RelayHistory(registry, reactor, lambda: holder[0].wall())
    holder.append(Bench(reactor, registry, history))
    return holder[0]


def samples(history: RelayHistory, port: int) -> list[tuple[int, int, float]]:
    (found,) = [p for p in history.ports() if p.port == port]
    return [(s.bytes_to_hub, s.bytes_from_hub, s.seconds) for s in found.samples]


def test_the_first_reading_is_the_baseline_then_each_span_is_a_sample(bench: Bench) -> None:
    bench.relay(10100)
    pipe = bench.pipe()
    pipe.to_hub(1000)
    bench.history.sample()
    assert bench.history.ports() == []
    assert bench.history.sampled_at == EPOCH

    pipe.to_hub(5 * 1024 * 1024)
    pipe.from_hub(16)
    bench.tick()
    (port,) = bench.history.ports()
    assert (port.port, port.job_id, port.export, port.disk_key, port.active) == (
        10100,
        "backup-pgtest1-1",
        "pgtest1-disk0",
        "2000",
        True,
    )
    (sample,) = port.samples
    assert (sample.bytes_to_hub, sample.bytes_from_hub, sample.seconds) == (5 * 1024**2, 16, 5.0)
    assert sample.throughput_bps == (5 * 1024**2 + 16) / 5.0
    assert sample.time == EPOCH + timedelta(seconds=5)
    assert sample.job_id == "backup-pgtest1-1"

    bench.tick()
    assert samples(bench.history, 10100) == [(5 * 1024**2, 16, 5.0), (0, 0, 5.0)]


def test_each_port_has_its_own_line(bench: Bench) -> None:
    bench.history.sample()
    bench.relay(10100, disk=0)
    first = bench.pipe()
    bench.relay(10101, disk=1)
    second = bench.pipe()
    first.to_hub(300)
    second.to_hub(7)
    bench.tick()
    assert [p.port for p in bench.history.ports()] == [10100, 10101]
    assert samples(bench.history, 10100) == [(300, 0, 5.0)]
    assert samples(bench.history, 10101) == [(7, 0, 5.0)]


def test_a_removed_relay_keeps_its_bytes_and_its_port_is_forgotten_after_a_window(
    bench: Bench,
) -> None:
    bench.history.sample()
    relay = bench.relay(10100)
    pipe = bench.pipe()
    pipe.to_hub(4096)
    bench.tick()
    bench.stop(relay)
    bench.tick()
    (port,) = bench.history.ports()
    assert port.active is False
    # The bytes of a removed relay stay in the totals: nothing counts twice or backwards.
    assert samples(bench.history, 10100)[-1][:2] == (0, 0)
    assert port.job_id == "backup-pgtest1-1"

    # The last bytes crossed at 5 s: the port is shown until a whole window has passed.
    while bench.reactor.seconds() < 5 + WINDOW - INTERVAL:
        bench.tick()
    assert [p.port for p in bench.history.ports()] == [10100]
    bench.tick()
    assert bench.history.ports() == []


def test_a_new_job_on_a_port_used_before_starts_from_its_own_bytes(bench: Bench) -> None:
    bench.history.sample()
    old = bench.relay(10100, job_id="backup-a-1")
    bench.pipe().to_hub(1000)
    bench.tick()
    bench.stop(old)
    bench.relay(10100, job_id="backup-b-2")
    bench.pipe().to_hub(10)
    bench.tick()
    (port,) = bench.history.ports()
    assert [(s.bytes_to_hub, s.job_id) for s in port.samples] == [
        (1000, "backup-a-1"),
        (10, "backup-b-2"),
    ]
    assert port.job_id == "backup-b-2"


def test_memory_is_bounded_by_the_window(bench: Bench) -> None:
    bench.history.sample()
    bench.relay(10100)
    pipe = bench.pipe()
    for n in range(300):
        pipe.to_hub(n + 1)
        bench.tick()
    (port,) = bench.history.ports()
    assert len(port.samples) == WINDOW / INTERVAL
    assert port.samples[-1].bytes_to_hub == 300
    assert port.samples[0].bytes_to_hub == 300 - WINDOW / INTERVAL + 1
    assert port.samples[0].at > bench.reactor.seconds() - WINDOW


def test_at_most_max_ports_are_kept_the_longest_idle_go_first() -> None:
    reactor = MemoryReactorClock()
    registry = RelayRegistry()
    history = RelayHistory(registry, reactor, lambda: EPOCH, max_ports=2)
    bench = Bench(reactor, registry, history)
    history.sample()
    relays = []
    for port in (10100, 10101, 10102):
        relays.append(bench.relay(port, job_id=f"job-{port}"))
        bench.pipe().to_hub(port)
        bench.tick()
    # Stop the first two relays' jobs; the third still runs.
    for relay in relays[:2]:
        bench.stop(relay)
    bench.tick()
    assert [p.port for p in history.ports()] == [10101, 10102]


def test_a_late_reading_divides_by_the_real_span(bench: Bench) -> None:
    bench.history.sample()
    bench.relay(10100)
    bench.pipe().to_hub(12_000)
    bench.tick(12.0)
    (port,) = bench.history.ports()
    (sample,) = port.samples
    assert (sample.seconds, sample.throughput_bps) == (12.0, 1000.0)


def test_a_reading_at_the_same_instant_adds_nothing(bench: Bench) -> None:
    bench.history.sample()
    bench.relay(10100)
    bench.pipe().to_hub(10)
    bench.tick()
    bench.history.sample()
    assert samples(bench.history, 10100) == [(10, 0, 5.0)]


def test_interval_and_window_are_checked() -> None:
    with pytest.raises(ValueError, match="interval"):
        RelayHistory(RelayRegistry(), MemoryReactorClock(), lambda: EPOCH, interval=0)
    with pytest.raises(ValueError, match="interval"):
        RelayHistory(RelayRegistry(), MemoryReactorClock(), lambda: EPOCH, interval=10, window=5)


# -- the service -------------------------------------------------------------------


def test_the_sampler_reads_every_interval_while_running(bench: Bench) -> None:
    sampler = RelayHistorySampler(bench.history, bench.reactor)
    bench.relay(10100)
    pipe = bench.pipe()
    sampler.startService()
    assert bench.history.sampled_at == EPOCH  # the baseline, at once
    pipe.to_hub(100)
    bench.reactor.advance(INTERVAL)
    pipe.to_hub(200)
    bench.reactor.advance(INTERVAL)
    assert samples(bench.history, 10100) == [(100, 0, 5.0), (200, 0, 5.0)]

    sampler.stopService()
    pipe.to_hub(300)
    bench.reactor.advance(10 * INTERVAL)
    assert len(samples(bench.history, 10100)) == 2
    assert not sampler.running


class _Flaky(RelayRegistry):
    """A registry whose next reading fails once."""

    fail = False

    def totals(self) -> dict[tuple[int, str], int]:
        if self.fail:
            self.fail = False
            raise RuntimeError("a bug in a reading")
        return super().totals()


def test_a_failed_reading_is_logged_and_sampling_goes_on() -> None:
    reactor = MemoryReactorClock()
    registry = _Flaky()
    history = RelayHistory(registry, reactor, lambda: EPOCH)
    bench = Bench(reactor, registry, history)
    sampler = RelayHistorySampler(history, reactor)
    bench.relay(10100)
    pipe = bench.pipe()
    sampler.startService()
    registry.fail = True
    with capturedLogs() as events:
        reactor.advance(INTERVAL)
    assert [e["log_format"] for e in events if e["log_level"] is LogLevel.critical] == [
        "cannot sample the relays' byte counts"
    ]
    pipe.to_hub(50)
    reactor.advance(INTERVAL)
    assert samples(history, 10100) == [(50, 0, 10.0)]
    sampler.stopService()


# -- GET /api/v1/relays/history ------------------------------------------------------


def get(api: SnaAPI, path: str) -> tuple[int, Any]:
    stub = StubTreq(api.resource())
    response = result_of(stub.get("http://sna" + path))
    return response.code, json.loads(result_of(response.content()))


def test_the_route_answers_every_port_and_its_samples(harness: Harness, bench: Bench) -> None:
    api = SnaAPI(
        harness.manager,
        harness.now,
        harness.clock.seconds,
        Metrics(harness.manager.counts, bench.registry),
        harness.vsphere,
        relay_history=bench.history,
    )
    code, body = get(api, "/api/v1/relays/history")
    assert (code, body) == (
        200,
        {
            "interval_seconds": 5.0,
            "window_seconds": 600.0,
            "sampled_at": None,
            "ports": [],
            "count": 0,
        },
    )
    bench.history.sample()
    bench.relay(10100)
    bench.pipe().to_hub(2_500_000)
    bench.tick()
    code, body = get(api, "/api/v1/relays/history")
    assert code == 200
    assert body["sampled_at"] == "2026-11-26T09:00:05.000Z"
    assert body["count"] == 1
    assert body["ports"] == [
        {
            "nbd_port": 10100,
            "job_id": "backup-pgtest1-1",
            "export": "pgtest1-disk0",
            "disk_key": "2000",
            "active": True,
            "samples": [
                {
                    "time": "2026-11-26T09:00:05.000Z",
                    "seconds": 5.0,
                    "bytes_to_hub": 2_500_000,
                    "bytes_from_hub": 0,
                    "throughput_bps": 500_000.0,
                    "job_id": "backup-pgtest1-1",
                }
            ],
        }
    ]


def test_without_a_history_the_route_is_not_there(harness: Harness) -> None:
    code, body = harness.request("GET", "/api/v1/relays/history")
    assert (code, body["error"]) == (404, "not_found")


def test_the_daemon_runs_one_sampler(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--spare-clients", "0"])
    service = makeService(options, MemoryReactorClock())
    samplers = [s for s in service if isinstance(s, RelayHistorySampler)]  # type: ignore[attr-defined]
    assert len(samplers) == 1
