"""The relay's transport data path, in memory: MemoryReactorClock and StringTransport.

The copy path's pumps have their own in-memory tests (``test_relay_copy.py``);
``tests/integration/test_relay.py`` runs both paths against real processes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Optional, cast

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorFDSet
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from sna.nbd.relay import (
    CONNECT_TIMEOUT,
    RATE_STEP,
    RATE_WINDOW,
    STOP_GRACE,
    Relay,
    RelayRegistry,
)
from sna.nbd.wire import Command, encode_request
from sna.testing import result_of

TARGET_PORT = 10809
MiB = 1 << 20


@attrs.define
class Side:
    """One relayed connection as the test sees it: both protocols and transports."""

    client: IProtocol
    client_transport: StringTransport
    connector_index: int
    upstream: Optional[IProtocol] = None
    upstream_transport: Optional[StringTransport] = None


@attrs.define
class Rig:
    reactor: MemoryReactorClock
    relay: Relay
    lost: list[tuple[Relay, str]]
    server_index: int = 0
    accepted: int = 0

    @property
    def factory(self) -> IProtocolFactory:
        factory: IProtocolFactory = self.reactor.tcpServers[self.server_index][1]
        return factory

    def accept(self) -> Side:
        """A backup client connects to the relay's port."""
        self.accepted += 1
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + self.accepted)
        protocol = self.factory.buildProtocol(peer)
        assert protocol is not None
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return Side(protocol, transport, len(self.reactor.tcpClients) - 1)

    def connect_upstream(self, side: Side) -> StringTransport:
        """The relay's pending upstream connection of ``side`` succeeds."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[side.connector_index]
        assert (host, port) == ("127.0.0.1", self.relay.target_port)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        side.upstream, side.upstream_transport = protocol, transport
        return transport

    def fail_upstream(self, side: Side, why: Exception) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[side.connector_index]
        factory.clientConnectionFailed(self.reactor.connectors[side.connector_index], Failure(why))

    def relayed(self) -> Side:
        side = self.accept()
        self.connect_upstream(side)
        return side


@pytest.fixture
def rig() -> Rig:
    reactor = MemoryReactorClock()
    lost: list[tuple[Relay, str]] = []
    relay = Relay(
        reactor,
        "127.0.0.1",
        TARGET_PORT,
        job_id="backup-pgtest1-1",
        disk_key="2000",
        export="pgtest1-disk0",
        on_upstream_lost=lambda relay, reason: lost.append((relay, reason)),
        clock=reactor.seconds,
    )
    result_of(Deferred.fromCoroutine(relay.start()))
    return Rig(reactor, relay, lost)


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Every log event emitted during the test, as structured events."""
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


# -- listening and connecting -------------------------------------------------


def test_listens_on_the_listen_host_and_a_free_port(rig: Rig) -> None:
    port, _factory, _backlog, interface = rig.reactor.tcpServers[0]
    assert (port, interface) == (0, "127.0.0.1")
    stats = rig.relay.stats()
    assert stats.state == "listening"
    assert (stats.port, stats.job_id, stats.disk_key, stats.export) == (
        TARGET_PORT,
        "backup-pgtest1-1",
        "2000",
        "pgtest1-disk0",
    )
    assert (stats.connections, stats.active_connections, stats.upstream_error) == (0, 0, None)


def test_in_memory_transports_take_the_transport_path(rig: Rig) -> None:
    side = rig.relayed()
    # StringTransport is no socket: whatever data_path says, bytes go through transports.
    assert side.client_transport.producer is side.upstream_transport


def test_client_is_not_read_until_the_upstream_connects(rig: Rig) -> None:
    side = rig.accept()
    assert side.client_transport.producerState == "paused"
    assert len(rig.reactor.tcpClients) == 1
    assert rig.relay.stats().active_connections == 1

    rig.connect_upstream(side)
    assert side.client_transport.producerState == "producing"
    assert rig.relay.stats().state == "connected"


def test_each_transport_is_the_other_ones_streaming_producer(rig: Rig) -> None:
    side = rig.relayed()
    upstream = side.upstream_transport
    assert upstream is not None
    assert (upstream.producer, upstream.streaming) == (side.client_transport, True)
    assert (side.client_transport.producer, side.client_transport.streaming) == (upstream, True)


def test_a_stalled_upstream_stops_reading_the_client(rig: Rig) -> None:
    side = rig.relayed()
    upstream = side.upstream_transport
    assert upstream is not None and upstream.producer is not None
    # What a real transport does when its write buffer is over bufferSize:
    upstream.producer.pauseProducing()
    assert side.client_transport.producerState == "paused"
    upstream.producer.resumeProducing()
    assert side.client_transport.producerState == "producing"


def test_a_slow_client_stops_reading_the_upstream(rig: Rig) -> None:
    side = rig.relayed()
    assert side.client_transport.producer is not None
    side.client_transport.producer.pauseProducing()
    assert side.upstream_transport is not None
    assert side.upstream_transport.producerState == "paused"


# -- counting -----------------------------------------------------------------


def test_counts_every_byte_each_way(rig: Rig) -> None:
    side = rig.relayed()
    assert side.upstream is not None and side.upstream_transport is not None
    requests = [b"\x25\x60\x95\x13" + bytes(24), b"w" * 65536, b"x" * 7]
    for chunk in requests:
        side.client.dataReceived(chunk)
    side.upstream.dataReceived(b"\x67\x44\x66\x98" + bytes(12))

    assert side.upstream_transport.value() == b"".join(requests)
    assert side.client_transport.value() == b"\x67\x44\x66\x98" + bytes(12)
    stats = rig.relay.stats()
    assert (stats.bytes_to_hub, stats.bytes_from_hub) == (28 + 65536 + 7, 16)


def test_counts_survive_the_end_of_a_connection(rig: Rig) -> None:
    first, second = rig.relayed(), rig.relayed()
    first.client.dataReceived(b"a" * 100)
    second.client.dataReceived(b"b" * 50)
    assert second.upstream is not None
    second.upstream.dataReceived(b"c" * 16)

    first.client.connectionLost(Failure(ConnectionDone()))
    assert first.upstream is not None
    first.upstream.connectionLost(Failure(ConnectionDone()))

    stats = rig.relay.stats()
    assert (stats.bytes_to_hub, stats.bytes_from_hub) == (150, 16)
    assert (stats.connections, stats.active_connections) == (2, 1)


def test_rates_over_the_recent_window_and_since_start(rig: Rig) -> None:
    side = rig.relayed()
    rig.reactor.advance(RATE_STEP / 2)
    for _ in range(10):
        side.client.dataReceived(b"d" * MiB)
        rig.reactor.advance(RATE_STEP)
    stats = rig.relay.stats()
    assert stats.bytes_per_second_current == pytest.approx(MiB / RATE_STEP, rel=0.25)
    assert stats.bytes_per_second_average == pytest.approx(10 * MiB / (10.5 * RATE_STEP))

    # Idle for longer than the window: the current rate falls to zero, the
    # average keeps counting the idle time.
    rig.reactor.advance(2 * RATE_WINDOW)
    stats = rig.relay.stats()
    assert stats.bytes_per_second_current == 0.0
    assert stats.bytes_per_second_average == pytest.approx(
        10 * MiB / (10.5 * RATE_STEP + 2 * RATE_WINDOW)
    )

    # A burst after the idle time counts in full towards the current rate.
    side.client.dataReceived(b"e" * (5 * MiB))
    rig.reactor.advance(RATE_STEP)
    assert rig.relay.stats().bytes_per_second_current == pytest.approx(
        5 * MiB / RATE_WINDOW, rel=0.25
    )


def test_current_rate_right_after_start_covers_only_the_time_since(rig: Rig) -> None:
    side = rig.relayed()
    rig.reactor.advance(0.25)
    side.client.dataReceived(b"s" * MiB)
    assert rig.relay.stats().bytes_per_second_current == pytest.approx(4 * MiB)


# -- ending -------------------------------------------------------------------


def test_client_close_flushes_then_closes_the_upstream(rig: Rig) -> None:
    side = rig.relayed()
    side.client.dataReceived(b"last request")
    side.client.connectionLost(Failure(ConnectionDone()))

    upstream = side.upstream_transport
    assert upstream is not None
    assert upstream.value() == b"last request"
    # Closing, and not waiting for the gone client to produce more.
    assert upstream.disconnecting
    assert upstream.producer is None
    assert rig.lost == []

    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionDone()))
    stats = rig.relay.stats()
    assert (stats.state, stats.active_connections, stats.bytes_to_hub) == ("listening", 0, 12)


def test_client_leaving_while_connecting_cancels_the_connection(rig: Rig) -> None:
    side = rig.accept()
    side.client.connectionLost(Failure(ConnectionDone()))
    assert rig.reactor.connectors[side.connector_index].stoppedConnecting
    assert rig.lost == []
    assert rig.relay.stats().active_connections == 0


def test_upstream_connect_failure_closes_the_client_and_reports(rig: Rig) -> None:
    side = rig.accept()
    rig.fail_upstream(side, ConnectionRefusedError())

    assert side.client_transport.disconnecting
    assert side.client_transport.value() == b""
    [(relay, reason)] = rig.lost
    assert relay is rig.relay
    assert "127.0.0.1:10809" in reason and "refused" in reason
    stats = rig.relay.stats()
    assert (stats.state, stats.upstream_error) == ("upstream_lost", reason)


def test_upstream_dropping_mid_transfer_closes_the_client_and_reports(
    rig: Rig, events: list[LogEvent]
) -> None:
    side = rig.relayed()
    side.client.dataReceived(b"w" * 4096)
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionLost("Connection lost: reset")))

    assert side.client_transport.disconnecting
    [(_relay, reason)] = rig.lost
    assert "lost" in reason
    assert rig.relay.stats().state == "upstream_lost"
    [warning] = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert (warning["job_id"], warning["disk_key"], warning["reason"]) == (
        "backup-pgtest1-1",
        "2000",
        reason,
    )


def test_upstream_closing_first_counts_as_lost(rig: Rig) -> None:
    # An NBD server never closes first while its client is connected (the
    # client sends NBD_CMD_DISC and closes); a clean close of the upstream
    # is still a loss unless the client has closed too.
    side = rig.relayed()
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionDone()))
    assert side.client_transport.disconnecting
    [(_relay, reason)] = rig.lost
    assert "closed the connection" in reason


def request(command: Command, extended: bool = False) -> bytes:
    """An NBD request header, compact or extended (NBD_OPT_EXTENDED_HEADERS)."""
    if not extended:
        return encode_request(command, handle=7, offset=0, length=0)
    return bytes.fromhex("21e41c71") + struct.pack(">HHQQQ", 0, command, 7, 0, 0)


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("how", [ConnectionDone(), ConnectionLost()])
def test_upstream_closing_after_nbd_disc_is_the_normal_end(
    rig: Rig, extended: bool, how: Exception
) -> None:
    # The client sent NBD_CMD_DISC and is about to close; the hub's close
    # reached the relay first.
    side = rig.relayed()
    side.client.dataReceived(b"w" * 4096 + request(Command.WRITE, extended))
    side.client.dataReceived(request(Command.DISC, extended)[:10])
    side.client.dataReceived(request(Command.DISC, extended)[10:])
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(how))
    assert side.client_transport.disconnecting
    assert rig.lost == []
    assert rig.relay.stats().state == "listening"


def test_upstream_closing_after_another_request_is_a_loss(rig: Rig) -> None:
    side = rig.relayed()
    side.client.dataReceived(request(Command.FLUSH))  # the client waits for its reply
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionDone()))
    assert side.client_transport.disconnecting
    assert len(rig.lost) == 1


def test_upstream_loss_is_reported_once_per_incident(rig: Rig) -> None:
    first, second = rig.relayed(), rig.relayed()
    assert first.upstream is not None and second.upstream is not None
    first.upstream.connectionLost(Failure(ConnectionLost()))
    second.upstream.connectionLost(Failure(ConnectionLost()))
    third = rig.accept()
    rig.fail_upstream(third, ConnectionRefusedError())
    assert len(rig.lost) == 1
    assert "refused" in (rig.relay.stats().upstream_error or "")

    # A working upstream ends the incident; the next loss is a new one.
    fourth = rig.relayed()
    assert rig.relay.stats().state == "connected"
    assert fourth.upstream is not None
    fourth.upstream.connectionLost(Failure(ConnectionLost()))
    assert len(rig.lost) == 2


def test_a_failing_callback_does_not_stop_the_relay_closing_the_client(
    events: list[LogEvent],
) -> None:
    reactor = MemoryReactorClock()

    def explode(relay: Relay, reason: str) -> None:
        raise RuntimeError("job manager bug")

    relay = Relay(
        reactor, "127.0.0.1", TARGET_PORT, job_id="j", disk_key="2000", export="e",
        on_upstream_lost=explode, clock=reactor.seconds,
    )  # fmt: skip
    result_of(Deferred.fromCoroutine(relay.start()))
    rig = Rig(reactor, relay, [])
    side = rig.accept()
    rig.fail_upstream(side, ConnectionRefusedError())
    assert side.client_transport.disconnecting
    assert any(e.get("log_failure") is not None for e in events)


# -- stopping -----------------------------------------------------------------


def test_stop_closes_listener_and_connections_then_fires(rig: Rig) -> None:
    busy, waiting = rig.relayed(), rig.accept()
    d = rig.relay.stop()

    assert busy.client_transport.disconnecting
    assert busy.upstream_transport is not None and busy.upstream_transport.disconnecting
    assert waiting.client_transport.disconnecting
    assert rig.reactor.connectors[waiting.connector_index].stoppedConnecting
    assert not d.called, "fired before the connections were closed"

    busy.client.connectionLost(Failure(ConnectionDone()))
    assert busy.upstream is not None
    busy.upstream.connectionLost(Failure(ConnectionDone()))
    waiting.client.connectionLost(Failure(ConnectionDone()))
    assert result_of(d) is None
    assert rig.relay.stats().state == "closed"
    assert rig.lost == []
    assert result_of(rig.relay.stop()) is None


def test_stop_aborts_connections_that_do_not_close(rig: Rig) -> None:
    side = rig.relayed()
    d = rig.relay.stop()
    rig.reactor.advance(STOP_GRACE)
    assert side.client_transport.disconnected  # abortConnection, not just loseConnection
    side.client.connectionLost(Failure(ConnectionLost()))
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionLost()))
    assert result_of(d) is None
    assert rig.lost == []


def test_stop_during_an_incident_closes_and_reports_nothing_more(rig: Rig) -> None:
    side = rig.relayed()
    assert side.upstream is not None
    side.upstream.connectionLost(Failure(ConnectionLost()))
    assert rig.relay.stats().state == "upstream_lost"
    waiting = rig.accept()
    d = rig.relay.stop()
    waiting.client.connectionLost(Failure(ConnectionDone()))
    side.client.connectionLost(Failure(ConnectionDone()))
    assert result_of(d) is None
    stats = rig.relay.stats()
    assert (stats.state, stats.active_connections) == ("closed", 0)
    assert len(rig.lost) == 1


def test_stop_with_no_connections_fires_at_once(rig: Rig) -> None:
    assert result_of(rig.relay.stop()) is None
    assert rig.relay.stats().bytes_per_second_current == 0.0


# -- construction and registry --------------------------------------------------


@pytest.mark.parametrize("path", ["zerocopy", "splice"])
def test_unknown_data_path_is_refused(path: str) -> None:
    # splice was a path until it was measured no better than copy and removed.
    with pytest.raises(ValueError):
        Relay(
            MemoryReactorClock(), "127.0.0.1", 1, job_id="j", disk_key="k", export="e",
            data_path=path,  # type: ignore[arg-type]
        )  # fmt: skip


@pytest.mark.parametrize("host", ["::1", "[::1]", "127.0.0.1"])
def test_address_literals_are_connected_without_name_resolution(host: str) -> None:
    reactor = MemoryReactorClock()
    relay = Relay(reactor, host, TARGET_PORT, job_id="j", disk_key="k", export="e")
    result_of(Deferred.fromCoroutine(relay.start()))
    Rig(reactor, relay, []).accept()
    [(connected, port, _factory, timeout, _bind)] = reactor.tcpClients
    assert (connected, port, timeout) == (host.strip("[]"), TARGET_PORT, CONNECT_TIMEOUT)


def test_auto_takes_the_copy_path_on_a_file_descriptor_reactor() -> None:
    relay = Relay(MemoryReactorClock(), "127.0.0.1", 1, job_id="j", disk_key="k", export="e")
    assert relay.data_path == "copy"
    forced = Relay(
        MemoryReactorClock(), "127.0.0.1", 1, job_id="j", disk_key="k", export="e",
        data_path="transport",
    )  # fmt: skip
    assert forced.data_path == "transport"


def test_socket_paths_need_a_file_descriptor_reactor() -> None:
    # MemoryReactor provides IReactorFDSet; RaisingMemoryReactor only does sockets.
    reactor = RaisingMemoryReactor()
    assert not IReactorFDSet.providedBy(reactor)
    assert Relay(reactor, "127.0.0.1", 1, job_id="j", disk_key="k", export="e").data_path == (
        "transport"
    )
    with pytest.raises(ValueError):
        Relay(reactor, "127.0.0.1", 1, job_id="j", disk_key="k", export="e", data_path="copy")


def test_registry_lists_relays_and_keeps_totals_after_removal() -> None:
    reactor = MemoryReactorClock()
    registry = RelayRegistry()
    rigs = []
    for job, port in (("a", 10100), ("a", 10101), ("b", 10100)):
        relay = Relay(
            reactor, "127.0.0.1", port, job_id=job, disk_key="2000", export="e",
            clock=reactor.seconds,
        )  # fmt: skip
        registry.add(relay)
        result_of(Deferred.fromCoroutine(relay.start()))
        rigs.append(Rig(reactor, relay, [], server_index=len(reactor.tcpServers) - 1))
    relays = [rig.relay for rig in rigs]
    registry.add(relays[0])
    assert registry.relays() == relays
    assert registry.by_job("a") == relays[:2]

    for n, rig in enumerate(rigs, start=1):
        side = rig.relayed()
        assert side.upstream is not None
        side.client.dataReceived(b"x" * (1000 * n))
        side.upstream.dataReceived(b"y" * n)

    expected = {
        (10100, "to_hub"): 1000 + 3000,
        (10100, "from_hub"): 1 + 3,
        (10101, "to_hub"): 2000,
        (10101, "from_hub"): 2,
    }
    assert registry.totals() == expected
    registry.remove(relays[2])
    registry.remove(relays[2])
    assert registry.relays() == relays[:2]
    assert registry.totals() == expected
