"""The relay's copy data path, in memory: the pumps, and a relay whose transports are TCP.

No sockets: :class:`FakeSocket` is one end of a TCP connection as the pumps
and ``twisted.internet.tcp.Connection`` use it, with the kernel's side (what
the peer sent, how much the send buffer takes, errors) in the test's hands.
:func:`settle` plays the reactor: it calls every registered descriptor whose
socket is ready until none is.  Real sockets and processes are in
``tests/integration/test_relay.py``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional, Union, cast

import attrs
import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from sna.nbd.relay import Relay
from sna.nbd.relay.pumps import COPY_BUFFER, DISCARD_LIMIT, READ_BUDGET, LentSocket, SocketPath
from sna.nbd.wire import Command, encode_request

MiB = 1 << 20
TARGET_PORT = 10809
#: As much as a send buffer could ever take in these tests.
PLENTY = 1 << 40


class FakeSocket:
    """One end of a TCP connection: what the peer sent, what it took, how it ended."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # What the peer sent and this side has not read, one chunk per send.
        self.incoming: deque[bytes] = deque()
        self.eof = False
        self.recv_error: Optional[OSError] = None
        # How many more bytes send() takes before EAGAIN.
        self.room = PLENTY
        self.send_error: Optional[OSError] = None
        self.sent = bytearray()
        self.so_error = 0
        self.closed = False

    def feed(self, data: bytes, chunk: int = COPY_BUFFER) -> None:
        """The peer sends ``data``; it arrives in pieces of at most ``chunk`` bytes."""
        for start in range(0, len(data), chunk):
            self.incoming.append(data[start : start + chunk])

    @property
    def readable(self) -> bool:
        return bool(self.incoming) or self.eof or self.recv_error is not None

    @property
    def writable(self) -> bool:
        return self.room > 0 or self.send_error is not None or self.closed

    @property
    def unread(self) -> int:
        return sum(len(chunk) for chunk in self.incoming)

    # -- the socket.socket methods the relay and tcp.Connection use

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, level: int, optname: int, value: Union[int, bool]) -> None:
        pass

    def getsockopt(self, level: int, optname: int, /) -> int:
        return self.so_error if (level, optname) == (socket.SOL_SOCKET, socket.SO_ERROR) else 0

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0, /) -> int:
        data = self._take(nbytes or len(buffer), peek=False)
        buffer[: len(data)] = data
        return len(data)

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        return self._take(bufsize, peek=bool(flags & socket.MSG_PEEK))

    def send(self, data: Union[bytes, memoryview], flags: int = 0, /) -> int:
        if self.send_error is not None:
            raise self.send_error
        if self.room == 0:
            raise BlockingIOError(errno.EAGAIN, "would block")
        n = min(self.room, len(data))
        self.sent += data[:n]
        self.room -= n
        return n

    def shutdown(self, how: int, /) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def _take(self, most: int, peek: bool) -> bytes:
        if self.recv_error is not None:
            raise self.recv_error
        if not self.incoming:
            if self.eof:
                return b""
            raise BlockingIOError(errno.EAGAIN, "would block")
        chunk = self.incoming[0]
        data = chunk[:most]
        if not peek:
            if len(data) == len(chunk):
                self.incoming.popleft()
            else:
                self.incoming[0] = chunk[len(data) :]
        return data


def fake_of(descriptor: object) -> FakeSocket:
    if isinstance(descriptor, LentSocket):
        return cast(FakeSocket, descriptor.sock)
    assert isinstance(descriptor, tcp.Connection)
    return cast(FakeSocket, descriptor.socket)


def settle(reactor: MemoryReactorClock) -> None:
    """Do what a reactor would: call ready descriptors until none is ready."""
    for _ in range(10_000):
        readers = [d for d in reactor.getReaders() if fake_of(d).readable]
        writers = [d for d in reactor.getWriters() if fake_of(d).writable]
        if readers:
            descriptor, why = readers[0], readers[0].doRead()
        elif writers:
            descriptor, why = writers[0], writers[0].doWrite()
        else:
            return
        if why is not None:
            # What the reactor does with a descriptor that says it is done.
            reactor.removeReader(descriptor)
            reactor.removeWriter(descriptor)
            descriptor.connectionLost(Failure(why))
    pytest.fail("the descriptors never settled")


# -- the pumps, under a connection that only records ---------------------------------


@attrs.define
class Ends:
    """The connection as the pumps see it (PathEvents): it records, and finishes the
    path on an end as the real one does (draining the upstream when the client went)."""

    path: Optional[SocketPath] = None
    moved_bytes: int = 0
    client: list[Optional[OSError]] = attrs.Factory(list)
    upstream: list[Optional[OSError]] = attrs.Factory(list)

    def moved(self, n: int) -> None:
        self.moved_bytes += n

    def client_ended(self, error: Optional[OSError]) -> None:
        self.client.append(error)
        assert self.path is not None
        self.path.finish(drain_upstream=True)

    def upstream_ended(self, error: Optional[OSError]) -> None:
        self.upstream.append(error)
        assert self.path is not None
        self.path.finish(drain_upstream=False)


@attrs.define
class Pumps:
    reactor: MemoryReactorClock
    client: FakeSocket
    upstream: FakeSocket
    ends: Ends
    path: SocketPath

    def side(self, name: str) -> FakeSocket:
        return self.client if name == "client" else self.upstream

    def lent(self, name: str) -> LentSocket:
        return self.path.client if name == "client" else self.path.upstream


@pytest.fixture
def pumps() -> Iterator[Pumps]:
    reactor = MemoryReactorClock()
    client, upstream, ends = FakeSocket(10), FakeSocket(11), Ends()
    path = SocketPath(reactor, client, upstream, ends)
    ends.path = path
    path.start()
    yield Pumps(reactor, client, upstream, ends, path)
    path.finish(drain_upstream=False)


def test_bytes_cross_both_ways_in_order_and_are_counted(pumps: Pumps) -> None:
    request, reply = os.urandom(5 * MiB + 17), os.urandom(3 * MiB + 5)
    pumps.client.feed(request, chunk=MiB + 3)
    pumps.upstream.feed(reply, chunk=64 << 10)
    settle(pumps.reactor)

    assert bytes(pumps.upstream.sent) == request
    assert bytes(pumps.client.sent) == reply
    assert pumps.path.moved() == (len(request), len(reply))
    assert pumps.ends.moved_bytes == len(request) + len(reply)
    assert (pumps.ends.client, pumps.ends.upstream) == ([], [])
    assert pumps.path.buffered == 0


@pytest.mark.parametrize(("src", "dst"), [("client", "upstream"), ("upstream", "client")])
def test_a_side_that_takes_nothing_stops_the_reading_of_the_other(
    pumps: Pumps, src: str, dst: str
) -> None:
    data = os.urandom(5 * COPY_BUFFER)
    pumps.side(src).feed(data)
    pumps.side(dst).room = 1000
    settle(pumps.reactor)

    # One read taken, 1000 bytes of it sent, the rest held; the source is
    # no longer read, so the sender is held back by TCP's window.
    assert pumps.path.buffered == COPY_BUFFER - 1000
    assert pumps.side(src).unread == len(data) - COPY_BUFFER
    assert pumps.lent(src) not in pumps.reactor.getReaders()
    assert pumps.lent(dst) in pumps.reactor.getWriters()
    # Only what was sent on counts.
    assert pumps.ends.moved_bytes == 1000

    pumps.side(dst).room = PLENTY
    settle(pumps.reactor)
    assert bytes(pumps.side(dst).sent) == data
    assert pumps.ends.moved_bytes == len(data)
    assert pumps.lent(src) in pumps.reactor.getReaders()
    assert pumps.lent(dst) not in pumps.reactor.getWriters()
    assert pumps.path.buffered == 0


def test_one_readiness_event_moves_at_most_the_read_budget(pumps: Pumps) -> None:
    # So that one fast connection cannot keep the reactor from the others.
    pumps.client.feed(os.urandom(3 * READ_BUDGET))
    pumps.path.client.doRead()
    assert 0 < pumps.ends.moved_bytes <= READ_BUDGET
    assert pumps.client.unread > 0


@pytest.mark.parametrize("seen_by", ["read", "hangup"])
def test_the_clients_end_is_reported_once_all_it_sent_reached_the_hub(
    pumps: Pumps, seen_by: str
) -> None:
    data = os.urandom(COPY_BUFFER)
    pumps.client.feed(data)
    pumps.client.eof = True
    pumps.upstream.room = 100
    settle(pumps.reactor)
    if seen_by == "hangup":
        # The reactor saw the hangup while the pump still held bytes.
        pumps.path.client.connectionLost(Failure(ConnectionDone()))
    assert pumps.ends.client == []

    pumps.upstream.room = PLENTY
    settle(pumps.reactor)
    assert pumps.ends.client == [None]
    assert bytes(pumps.upstream.sent) == data
    assert pumps.ends.upstream == []


def test_once_the_client_is_done_unread_replies_are_dropped_not_left_to_reset(
    pumps: Pumps,
) -> None:
    # Replies the client will never read: left unread, closing the upstream
    # socket would send a reset, and the hub could lose the last writes.
    pumps.upstream.feed(os.urandom(DISCARD_LIMIT + MiB), chunk=MiB)
    pumps.client.eof = True
    pumps.path.client.doRead()
    assert pumps.ends.client == [None]
    assert pumps.upstream.unread == MiB  # bounded by DISCARD_LIMIT
    assert pumps.client.sent == b""
    assert pumps.reactor.getReaders() == pumps.reactor.getWriters() == []


def test_the_hubs_close_is_reported_at_once_after_what_the_client_takes(
    pumps: Pumps,
) -> None:
    reply = os.urandom(4096)
    pumps.upstream.feed(reply)
    pumps.client.room = 1000
    settle(pumps.reactor)
    pumps.client.room = 500
    pumps.path.upstream.connectionLost(Failure(ConnectionDone()))

    # The client learns of the close now, with what it could take of the rest.
    assert pumps.ends.upstream == [None]
    assert bytes(pumps.client.sent) == reply[:1500]
    assert pumps.ends.moved_bytes == 1500
    assert pumps.ends.client == []


def test_the_hubs_close_after_its_last_reply_is_reported_after_the_reply(pumps: Pumps) -> None:
    reply = os.urandom(3 * MiB)
    pumps.upstream.feed(reply)
    pumps.upstream.eof = True
    settle(pumps.reactor)
    assert pumps.ends.upstream == [None]
    assert bytes(pumps.client.sent) == reply


def reset() -> OSError:
    return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


def broken() -> OSError:
    return BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@pytest.mark.parametrize(
    ("where", "failing"),
    [
        ("recv", "client"),
        ("recv", "upstream"),
        ("send", "client"),
        ("send", "upstream"),
        ("hangup", "client"),
        ("hangup", "upstream"),
    ],
)
def test_a_failing_side_is_reported_with_its_error(pumps: Pumps, where: str, failing: str) -> None:
    other = "upstream" if failing == "client" else "client"
    sock = pumps.side(failing)
    if where == "recv":
        sock.recv_error = reset()
    elif where == "send":
        sock.send_error = broken()
        pumps.side(other).feed(b"x" * 100)
    else:
        sock.so_error = errno.ECONNRESET
        pumps.lent(failing).connectionLost(Failure(ConnectionDone()))
    settle(pumps.reactor)

    reported = pumps.ends.client if failing == "client" else pumps.ends.upstream
    not_reported = pumps.ends.upstream if failing == "client" else pumps.ends.client
    [error] = reported
    assert error is not None
    assert error.errno == (errno.EPIPE if where == "send" else errno.ECONNRESET)
    assert not_reported == []
    assert pumps.reactor.getReaders() == pumps.reactor.getWriters() == []


def test_a_finished_path_moves_nothing_more_and_reports_nothing(pumps: Pumps) -> None:
    pumps.path.finish(drain_upstream=False)
    pumps.client.feed(b"late")
    pumps.client.recv_error = reset()
    pumps.path.client.doRead()
    pumps.path.upstream.doWrite()
    pumps.path.client.connectionLost(Failure(ConnectionDone()))
    assert pumps.reactor.getReaders() == pumps.reactor.getWriters() == []
    assert (pumps.ends.client, pumps.ends.upstream, pumps.ends.moved_bytes) == ([], [], 0)
    assert pumps.upstream.sent == b""


@pytest.mark.parametrize(
    ("last", "goodbye"),
    [
        (encode_request(Command.DISC, handle=7, offset=0, length=0), True),
        (encode_request(Command.FLUSH, handle=7, offset=0, length=0), False),
    ],
    ids=["disc", "flush"],
)
def test_the_pumps_see_whether_the_client_said_goodbye(
    pumps: Pumps, last: bytes, goodbye: bool
) -> None:
    # The header split over two reads, after a write bigger than any read.
    pumps.client.feed(os.urandom(COPY_BUFFER + 10))
    pumps.client.feed(last[:5])
    pumps.client.feed(last[5:])
    settle(pumps.reactor)
    assert pumps.path.said_goodbye() is goodbye


# -- a relay whose transports are TCP connections over fake sockets ------------------


class FakeTCP(tcp.Connection):
    """A connected tcp.Connection over a FakeSocket: what the copy path is chosen for."""

    def __init__(self, sock: FakeSocket, protocol: IProtocol, reactor: MemoryReactorClock) -> None:
        super().__init__(cast(socket.socket, sock), protocol, reactor)
        self.connected = 1

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000 + self.fileno())

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 50000)


@attrs.define
class Relayed:
    client: FakeSocket
    upstream: FakeSocket


@attrs.define
class CopyRig:
    reactor: MemoryReactorClock
    relay: Relay
    lost: list[str]
    fds: int = 100

    def relayed(self) -> Relayed:
        """A client connects and the relay's upstream connection succeeds."""
        server_factory: IProtocolFactory = self.reactor.tcpServers[0][1]
        client = self._socket()
        protocol = server_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        protocol.makeConnection(FakeTCP(client, protocol, self.reactor))

        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        upstream = self._socket()
        wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", TARGET_PORT))
        assert wrapper is not None
        wrapper.makeConnection(FakeTCP(upstream, wrapper, self.reactor))
        return Relayed(client, upstream)

    def _socket(self) -> FakeSocket:
        self.fds += 1
        return FakeSocket(self.fds)


@pytest.fixture
def copy_rig() -> CopyRig:
    reactor = MemoryReactorClock()
    lost: list[str] = []
    relay = Relay(
        reactor, "127.0.0.1", TARGET_PORT, job_id="backup-pgtest1-1", disk_key="2000",
        export="pgtest1-disk0", on_upstream_lost=lambda relay, reason: lost.append(reason),
        clock=reactor.seconds,
    )  # fmt: skip
    started: list[Any] = []
    Deferred.fromCoroutine(relay.start()).addBoth(started.append)
    assert started == [relay.listen_port]
    return CopyRig(reactor, relay, lost)


def test_tcp_transports_lend_their_sockets_to_the_pumps(copy_rig: CopyRig) -> None:
    side = copy_rig.relayed()
    readers = copy_rig.reactor.getReaders()
    assert {type(r) for r in readers} == {LentSocket}
    assert {fake_of(r) for r in readers} == {side.client, side.upstream}
    assert copy_rig.relay.stats().state == "connected"

    request, reply = os.urandom(3 * MiB), os.urandom(MiB)
    side.client.feed(request)
    side.upstream.feed(reply)
    settle(copy_rig.reactor)
    copy_rig.reactor.advance(0.5)
    stats = copy_rig.relay.stats()
    assert (stats.bytes_to_hub, stats.bytes_from_hub) == (len(request), len(reply))
    assert (bytes(side.upstream.sent), bytes(side.client.sent)) == (request, reply)
    assert stats.bytes_per_second_current == pytest.approx((len(request) + len(reply)) / 0.5)

    side.client.eof = True
    settle(copy_rig.reactor)
    assert side.client.closed and side.upstream.closed
    stats = copy_rig.relay.stats()
    assert (stats.state, stats.active_connections, stats.bytes_to_hub) == (
        "listening",
        0,
        len(request),
    )
    assert copy_rig.lost == []


def test_on_the_copy_path_a_hub_closing_after_disc_is_the_normal_end(copy_rig: CopyRig) -> None:
    side = copy_rig.relayed()
    side.client.feed(os.urandom(MiB) + encode_request(Command.DISC, handle=1, offset=0, length=0))
    settle(copy_rig.reactor)
    side.upstream.eof = True
    settle(copy_rig.reactor)
    assert side.client.closed
    assert copy_rig.lost == []
    assert copy_rig.relay.stats().state == "listening"


def test_on_the_copy_path_a_hub_closing_mid_session_is_a_loss(copy_rig: CopyRig) -> None:
    side = copy_rig.relayed()
    side.client.feed(encode_request(Command.FLUSH, handle=1, offset=0, length=0))
    settle(copy_rig.reactor)
    side.upstream.recv_error = reset()
    settle(copy_rig.reactor)
    assert side.client.closed
    [reason] = copy_rig.lost
    assert "127.0.0.1:10809" in reason and "reset" in reason
    assert copy_rig.relay.stats().state == "upstream_lost"


def test_stop_sends_on_what_the_pumps_hold_then_closes(copy_rig: CopyRig) -> None:
    side = copy_rig.relayed()
    data = os.urandom(MiB)
    side.client.feed(data)
    side.upstream.room = 1000
    settle(copy_rig.reactor)
    assert copy_rig.relay.buffered_bytes() == MiB - 1000

    side.upstream.room = PLENTY
    d = copy_rig.relay.stop()
    settle(copy_rig.reactor)
    assert bytes(side.upstream.sent) == data
    assert side.client.closed and side.upstream.closed
    stopped: list[object] = []
    d.addBoth(stopped.append)
    assert stopped == [None]
    assert copy_rig.relay.stats().bytes_to_hub == MiB
