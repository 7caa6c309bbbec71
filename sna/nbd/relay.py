"""The byte-counting TCP relay the daemon puts in front of each NBD target port.

For the life of a backup job the backup client does not connect to the hub's
NBD port itself: it connects to a :class:`Relay` on loopback, and the relay
opens one upstream connection per client connection and moves the bytes,
counting them each way.  :class:`RelayRegistry` holds every relay of the
daemon for the API and the metrics.

This module owns the listening port, both sockets of every relayed connection
and their byte counts.  It must not touch the bytes: it never alters, delays
or parses NBD traffic, except that it remembers the last request header the
client sent, to tell a clean ``NBD_CMD_DISC`` end of session from a hub that
went away.  It never decides what happens to a job: an upstream failure is
reported through ``on_upstream_lost`` and the job manager decides.

The data path is chosen per connection once the upstream is connected:

``copy`` (the default when both ends are real TCP sockets of a file-descriptor reactor)
    The Twisted transports lend their sockets to two pumps driven by the
    reactor's readiness through our own read/write descriptors; each pump
    ``recv_into``s one page-aligned COPY_BUFFER and ``send``s from it.  A pump
    holds at most one read, and stops reading its source while its
    destination takes nothing, so a slow side slows the other through TCP's
    window instead of growing the relay.  The transports get their sockets
    back to close them.  Measured on loopback against ``socat -b 1048576``:
    about the same throughput, for less CPU per GiB (benchmarks/README.md).

``splice`` (Linux; only when asked for)
    The same pumps, moving bulk bytes ``socket -> pipe -> socket`` with
    ``os.splice`` so they never enter the relay: the least relay CPU, but on
    loopback the receiver pays more for the spliced buffers and the copy path
    moves more.  Kept for upstreams behind a real network interface.

``transport`` (any reactor, and in-memory tests)
    ``twisted.protocols.portforward``'s design: the client transport is paused
    until the upstream connects, then each transport is registered as the
    other's streaming producer.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Optional

import attrs
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor, isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IPushProducer,
    IReactorFDSet,
    IReactorTCP,
    IReactorTime,
    IReadWriteDescriptor,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sna.nbd.client import ack_now
from sna.nbd.wire import REQUEST_MAGIC, Command

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

__all__ = [
    "Relay",
    "RelayRegistry",
    "RelayState",
    "RelayStats",
    "splice_available",
]

log = Logger()

RelayState = Literal["listening", "connected", "closed", "upstream_lost"]
DataPath = Literal["auto", "copy", "splice", "transport"]

#: The copy pump's buffer, per direction and connection: the most one read
#: takes and the most the pump holds.  Measured on loopback (256 KiB to
#: 4 MiB): from 2 MiB on the relay keeps up with socat -b 1048576; more
#: mostly loosens the bound on what the relay holds.
COPY_BUFFER = 2 << 20
#: Capacity asked for each splice pipe.  1 MiB is the unprivileged maximum
#: (/proc/sys/fs/pipe-max-size) and lets one splice move a whole NBD request
#: of the sizes clients use; the pages are only referenced, never copied.
PIPE_SIZE = 1 << 20
#: Bytes one readiness event may move before the pump yields to the rest of
#: the reactor (other connections, the API), so one fast connection cannot
#: starve them.  From one read to 8 MiB made no measurable difference.
READ_BUDGET = 4 << 20
#: How long an upstream connection attempt may take.
CONNECT_TIMEOUT = 30.0
#: How long stop() lets connections flush before aborting them.
STOP_GRACE = 2.0
#: bytes_per_second_current covers the last RATE_WINDOW seconds, counted in
#: slots of RATE_STEP seconds (so the window's start moves in steps).
RATE_WINDOW = 5.0
RATE_STEP = 1.0
#: Upper bound on what the copy and splice paths read and drop from the
#: upstream socket before closing it once the client is done: closing a socket
#: with unread data sends a reset, which would throw away bytes still queued
#: towards the hub.
DISCARD_LIMIT = 16 << 20

#: Reads up to this size go through Python on the splice path: as cheap as
#: splicing them (two system calls either way) and the relay sees the bytes.
SMALL_READ = 4096

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# Enough of the NBD request header to recognise NBD_CMD_DISC, compact or
# extended (NBD_OPT_EXTENDED_HEADERS, qemu >= 8.2; not in sna.nbd.wire).
_REQUEST_MAGIC = REQUEST_MAGIC.to_bytes(4, "big")
_EXTENDED_REQUEST_MAGIC = (0x21E41C71).to_bytes(4, "big")
_CMD_DISC = Command.DISC.to_bytes(2, "big")
_TAIL = 32


def _is_disconnect(tail: bytes) -> bool:
    """Whether ``tail``, the last bytes a client sent, ends with an NBD_CMD_DISC request."""
    compact, extended = tail[-28:], tail[-32:]
    return (len(compact) == 28 and compact[:4] == _REQUEST_MAGIC and compact[6:8] == _CMD_DISC) or (
        len(extended) == 32
        and extended[:4] == _EXTENDED_REQUEST_MAGIC
        and extended[6:8] == _CMD_DISC
    )


def splice_available() -> bool:
    """Whether this platform can relay with ``os.splice`` (Linux, Python 3.10+)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


@attrs.frozen
class RelayStats:
    """One relay's figures at one moment; what ``GET /api/v1/relays`` shows."""

    port: int
    """The NBD target port this relay forwards to."""
    listen_port: int
    job_id: str
    export: str
    disk_key: str
    state: RelayState
    bytes_to_hub: int
    bytes_from_hub: int
    connections: int
    """Client connections accepted since start."""
    active_connections: int
    started_at: float
    """When the relay started listening, in the relay clock's (monotonic) seconds."""
    bytes_per_second_current: float
    """Both directions together, over about the last RATE_WINDOW seconds."""
    bytes_per_second_average: float
    """Both directions together, since start (until stop)."""
    upstream_error: Optional[str]
    """Why the upstream was last lost, if it ever was."""


class _RateWindow:
    """Bytes per RATE_STEP slot over the last RATE_WINDOW, for the current rate."""

    def __init__(self, window: float = RATE_WINDOW, step: float = RATE_STEP) -> None:
        self._step = step
        self._count = max(1, math.ceil(window / step))
        # Finished slots (index, bytes); the current one is kept apart so the
        # hot path only adds to an int.
        self._slots: deque[tuple[int, int]] = deque()
        self._slot = -(1 << 62)
        self._bytes = 0

    def add(self, now: float, n: int) -> None:
        slot = int(now // self._step)
        if slot != self._slot:
            if self._bytes:
                self._slots.append((self._slot, self._bytes))
            self._slot, self._bytes = slot, 0
            oldest = slot - self._count
            while self._slots and self._slots[0][0] < oldest:
                self._slots.popleft()
        self._bytes += n

    def rate(self, now: float, since: float) -> float:
        """Bytes per second from the start of the window (or ``since``) to ``now``."""
        slot = int(now // self._step)
        first = slot - self._count
        total = sum(n for index, n in self._slots if first <= index <= slot)
        if first <= self._slot <= slot:
            total += self._bytes
        elapsed = now - max(first * self._step, since)
        return total / elapsed if elapsed > 0 else 0.0


def _client_endpoint(reactor: IReactorTCP, host: str, port: int) -> IStreamClientEndpoint:
    # An address literal needs no name resolution; HostnameEndpoint would send
    # even "127.0.0.1" through the resolver (a thread) on every connection.
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)


def _server_endpoint(reactor: IReactorTCP, host: str) -> IStreamServerEndpoint:
    if isIPv6Address(host):
        return TCP6ServerEndpoint(reactor, 0, interface=host)
    return TCP4ServerEndpoint(reactor, 0, interface=host)


def _pending_bytes(transport: Optional[ITransport]) -> int:
    """What a Twisted transport has accepted but not yet handed to the kernel."""
    if not isinstance(transport, FileDescriptor):
        return 0
    # FileDescriptor keeps two buffers; _tempDataLen is private but has been
    # the size of the second one for as long as the class has existed.
    pending: int = len(transport.dataBuffer) - transport.offset
    return pending + int(getattr(transport, "_tempDataLen", 0))


def _peer_has_finished(transport: ITransport) -> bool:
    """Whether the peer of ``transport`` has already closed (EOF is waiting).

    Used when the upstream closes first: at the end of a clean NBD session the
    client sends NBD_CMD_DISC and closes, and the hub's close can overtake the
    client's, so "upstream closed while the client was connected" alone would
    report a loss at the end of every job.
    """
    if not isinstance(transport, tcp.Connection):
        return False
    try:
        peeked = transport.getHandle().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        # A broken client connection: the client went first.
        return True
    return peeked == b""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


# -- the socket data paths (copy, splice) ----------------------------------------


@implementer(IReadWriteDescriptor)
class _LentSocket:
    """The reactor's view of one lent socket: readable feeds one pump, writable the other."""

    def __init__(self, path: _SocketPath, transport: tcp.Connection, side: str) -> None:
        self.path = path
        self.transport = transport
        self.sock = transport.getHandle()
        self.side = side
        self.fd: int = transport.fileno()
        self.active = True
        # The hub's side: its replies are acknowledged at once (see ack_now).
        self.ack = side == "upstream"
        # Set by the pumps once both exist.
        self.source: _Pump
        self.sink: _Pump

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        if self.active:
            self.source.readable()
            if self.ack:
                ack_now(self.sock)

    def doWrite(self) -> None:
        if self.active:
            self.sink.writable()

    def connectionLost(self, reason: Failure) -> None:
        # Called by the reactor on a hangup or error it saw before any read
        # could tell us; the socket's own error says what happened.
        if not self.active:
            return
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.path.failed(self.side, OSError(code, os.strerror(code)))
        else:
            self.path.source_ended(self.side)

    def logPrefix(self) -> str:
        return "sna-relay-" + self.side


class _Pump:
    """One direction of a connection whose sockets are lent: src socket -> dst socket.

    A pump holds at most one read's worth of bytes.  When dst takes no more
    it stops reading src until writable() has flushed, so the kernel stops the
    sender through TCP's window: that is the backpressure.
    """

    def __init__(self, path: _SocketPath, src: _LentSocket, dst: _LentSocket) -> None:
        self.path = path
        self.src = src
        self.dst = dst
        self.fdset = path.fdset
        # The last bytes read from src, as far as the pump has seen them.
        self.tail = b""
        self.moved = 0
        self.ended = False
        src.source = self
        dst.sink = self

    @property
    def buffered(self) -> int:
        raise NotImplementedError

    def readable(self) -> None:
        raise NotImplementedError

    def flush(self) -> bool:
        """Send on what the pump holds; True when it holds nothing more."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the pump owns (the sockets stay with their transports)."""

    def writable(self) -> None:
        if self.flush():
            self.fdset.removeWriter(self.dst)
            if self.ended:
                self.path.source_ended(self.src.side)
            elif self.src.active:
                self.fdset.addReader(self.src)

    def _wait_for_dst(self) -> None:
        self.fdset.removeReader(self.src)
        self.fdset.addWriter(self.dst)


class _CopyPump(_Pump):
    """recv_into one page-aligned buffer and send from it, as socat does.

    Two copies per byte, but large reads keep the system calls few, and the
    receiver gets ordinary socket buffers (see _SplicePump for why that matters).
    """

    def __init__(self, path: _SocketPath, src: _LentSocket, dst: _LentSocket) -> None:
        super().__init__(path, src, dst)
        # mmap, not bytearray: page-aligned, which this kind of CPU copies into
        # several times faster (nbd-baselines.md, observation 6); pages are
        # only touched as far as reads fill them.
        self.buffer = mmap.mmap(-1, COPY_BUFFER)
        self.view = memoryview(self.buffer)
        # Bytes read but not yet sent: view[start:end].
        self.start = 0
        self.end = 0

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def readable(self) -> None:
        # The pump holds nothing here (see _Pump), so the whole buffer is free.
        recv_into, send, view = self.src.sock.recv_into, self.dst.sock.send, self.view
        budget = READ_BUDGET
        moved = 0
        try:
            while budget > 0:
                try:
                    n = recv_into(view)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self.path.failed(self.src.side, exc)
                    return
                if n == 0:
                    self.ended = True
                    self.path.source_ended(self.src.side)
                    return
                budget -= n
                self.tail = (self.tail + bytes(view[max(0, n - _TAIL) : n]))[-_TAIL:]
                sent = 0
                while sent < n:
                    try:
                        out = send(view[sent:n])
                    except BlockingIOError:
                        self.start, self.end = sent, n
                        self._wait_for_dst()
                        return
                    except OSError as exc:
                        self.start, self.end = sent, n
                        self.path.failed(self.dst.side, exc)
                        return
                    sent += out
                    moved += out
        finally:
            self.moved += moved
            self.path.progress(moved)

    def flush(self) -> bool:
        moved = 0
        try:
            while self.start < self.end:
                try:
                    out = self.dst.sock.send(self.view[self.start : self.end])
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self.path.failed(self.dst.side, exc)
                    return False
                self.start += out
                moved += out
            self.start = self.end = 0
            return True
        finally:
            self.moved += moved
            self.path.progress(moved)

    def close(self) -> None:
        self.start = self.end = 0
        self.view.release()
        try:
            self.buffer.close()
        except BufferError:
            # A slice still referenced somewhere (a traceback being logged):
            # the mapping goes when that reference does.
            pass


class _SplicePump(_Pump):
    """socket -> pipe -> socket with os.splice: the bytes never enter the relay.

    The relay's own CPU is the lowest of the paths, but the skbs it sends are
    made of the sender's page fragments, and on loopback the receiver pays for
    that: measured against nbdkit on loopback it moved less than the copy pump
    (benchmarks/README.md).  It is kept for upstreams behind a real NIC.
    Reads of at most SMALL_READ bytes (request headers, replies) go through
    read/write instead: as cheap, and the pump sees them.
    """

    def __init__(self, path: _SocketPath, src: _LentSocket, dst: _LentSocket) -> None:
        super().__init__(path, src, dst)
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = _grow_pipe(self.wfd)
        self.in_pipe = 0
        # A small read that dst did not take in full: sent before the pipe.
        self.leftover = b""

    @property
    def buffered(self) -> int:
        return self.in_pipe + len(self.leftover)

    def readable(self) -> None:
        # The pump holds nothing here (see _Pump), so an EAGAIN from the first
        # splice means "src has nothing more now", never "the pipe is full".
        splice = os.splice
        src, dst, rfd, wfd = self.src.fd, self.dst.fd, self.rfd, self.wfd
        capacity = self.capacity
        budget = READ_BUDGET
        moved = 0
        try:
            while budget > 0:
                try:
                    n = splice(src, wfd, capacity, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self.path.failed(self.src.side, exc)
                    return
                if n == 0:
                    self.ended = True
                    self.path.source_ended(self.src.side)
                    return
                budget -= n
                if n <= SMALL_READ:
                    data = os.read(rfd, n)
                    self.tail = (self.tail + data)[-_TAIL:]
                    try:
                        out = os.write(dst, data)
                    except BlockingIOError:
                        out = 0
                    except OSError as exc:
                        self.leftover = data
                        self.path.failed(self.dst.side, exc)
                        return
                    moved += out
                    if out < n:
                        self.leftover = data[out:]
                        self._wait_for_dst()
                        return
                    continue
                self.tail = b""
                while n:
                    try:
                        out = splice(rfd, dst, n, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        self.in_pipe = n
                        self._wait_for_dst()
                        return
                    except OSError as exc:
                        self.in_pipe = n
                        self.path.failed(self.dst.side, exc)
                        return
                    n -= out
                    moved += out
        finally:
            self.moved += moved
            self.path.progress(moved)

    def flush(self) -> bool:
        moved = 0
        try:
            while self.leftover:
                try:
                    out = os.write(self.dst.fd, self.leftover)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self.path.failed(self.dst.side, exc)
                    return False
                self.leftover = self.leftover[out:]
                moved += out
            while self.in_pipe:
                try:
                    out = os.splice(self.rfd, self.dst.fd, self.in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self.path.failed(self.dst.side, exc)
                    return False
                self.in_pipe -= out
                moved += out
            return True
        finally:
            self.moved += moved
            self.path.progress(moved)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.in_pipe = 0
        self.leftover = b""


def _grow_pipe(fd: int) -> int:
    import fcntl

    try:
        return int(fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE))
    except OSError:
        # Over the per-user pipe allowance (pipe-user-pages-soft): a smaller
        # pipe only means more, smaller splices.
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


_PUMPS: dict[str, type[_Pump]] = {"copy": _CopyPump, "splice": _SplicePump}


class _SocketPath:
    """The data path of one connection while both sockets are lent to its pumps."""

    def __init__(
        self, conn: _Connection, kind: str, client: tcp.Connection, upstream: tcp.Connection
    ) -> None:
        self.conn = conn
        self.kind = kind
        self.fdset = IReactorFDSet(conn.relay._reactor)
        self.client = _LentSocket(self, client, "client")
        self.upstream = _LentSocket(self, upstream, "upstream")
        pump = _PUMPS[kind]
        self.to_hub = pump(self, self.client, self.upstream)
        try:
            self.from_hub = pump(self, self.upstream, self.client)
        except OSError:
            self.to_hub.close()
            raise
        self.running = False

    def start(self) -> None:
        # Take the sockets from the transports: while they are lent, the
        # transports must not be registered with the reactor for the same fd.
        for side in (self.client, self.upstream):
            side.transport.stopReading()
            side.transport.stopWriting()
        self.running = True
        self.fdset.addReader(self.client)
        self.fdset.addReader(self.upstream)

    def progress(self, n: int) -> None:
        self.conn.relay._progress(n)

    @property
    def buffered(self) -> int:
        return self.to_hub.buffered + self.from_hub.buffered

    def source_ended(self, side: str) -> None:
        if not self.running:
            return
        if side == "client":
            if self.to_hub.buffered:
                # writable() calls back here once the hub has taken the rest.
                self.to_hub.ended = True
                self.fdset.removeReader(self.client)
                return
            self.conn.client_finished("client closed the connection")
        else:
            # Replies the hub sent before closing still go to the client, as
            # far as it takes them right now; it must learn of the close at once.
            self.from_hub.flush()
            self.conn.upstream_finished(None)

    def failed(self, side: str, exc: OSError) -> None:
        if not self.running:
            return
        if side == "client":
            self.conn.client_finished("client connection failed: " + _error_text(exc))
        else:
            self.conn.upstream_finished(exc)

    def finish(self, drain_upstream: bool) -> None:
        """Stop moving bytes and give both sockets back to their transports."""
        if not self.running:
            return
        self.running = False
        for side in (self.client, self.upstream):
            side.active = False
            self.fdset.removeReader(side)
            self.fdset.removeWriter(side)
        if drain_upstream:
            _discard_readable(self.upstream.sock)
        self.to_hub.close()
        self.from_hub.close()

    def moved(self) -> tuple[int, int]:
        return self.to_hub.moved, self.from_hub.moved


def _discard_readable(sock: socket.socket) -> None:
    scratch = bytearray(1 << 16)
    left = DISCARD_LIMIT
    while left > 0:
        try:
            n = sock.recv_into(scratch, 0, socket.MSG_DONTWAIT)
        except OSError:
            return
        if not n:
            return
        left -= n


# -- protocols and one relayed connection -----------------------------------


class _ClientProtocol(Protocol):
    """The connection the backup client opened to the relay's port."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.conn: Optional[_Connection] = None

    def connectionMade(self) -> None:
        # Nothing may be read before there is somewhere to send it.
        assert self.transport is not None
        IPushProducer(self.transport).pauseProducing()
        self.conn = self.relay._accepted(self)

    def dataReceived(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.client_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.conn is not None:
            self.conn.client_lost(reason)


class _UpstreamProtocol(Protocol):
    """The relay's connection to the NBD target."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def connectionMade(self) -> None:
        self.conn.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        ack_now(self.transport)
        self.conn.upstream_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conn.upstream_lost(reason)


class _Connection:
    """One client connection and its upstream connection."""

    def __init__(self, relay: Relay, number: int, client: _ClientProtocol) -> None:
        self.relay = relay
        self.number = number
        assert client.transport is not None
        self.client_transport: ITransport = client.transport
        self.upstream_transport: Optional[ITransport] = None
        self.connecting: Optional[Deferred[IProtocol]] = None
        self.path: Optional[_SocketPath] = None
        # Counted by the transport path; the splice path counts in its pumps.
        self.to_hub = 0
        self.from_hub = 0
        # The last bytes the client sent, on the transport path.
        self.tail = b""
        self.client_open = True
        self.upstream_open = False
        self.closing = False
        self.ended = False

    # -- figures

    @property
    def relaying(self) -> bool:
        return self.upstream_open and not self.closing

    def counts(self) -> tuple[int, int]:
        if self.path is None:
            return self.to_hub, self.from_hub
        to_hub, from_hub = self.path.moved()
        return self.to_hub + to_hub, self.from_hub + from_hub

    def said_goodbye(self) -> bool:
        """Whether the last thing the client sent was NBD_CMD_DISC."""
        tail = self.path.to_hub.tail if self.path is not None else self.tail
        return _is_disconnect(tail)

    def buffered(self) -> int:
        if self.path is not None:
            return self.path.buffered
        return _pending_bytes(self.client_transport) + _pending_bytes(self.upstream_transport)

    # -- setting up

    def connect(self, endpoint: IStreamClientEndpoint) -> None:
        d = endpoint.connect(_UpstreamFactory(self))
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: IProtocol) -> None:
        self.connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if failure.check(CancelledError, ConnectingCancelledError) or self.closing:
            self._maybe_ended()
            return
        self._lose_upstream(
            "cannot connect to " + self.relay._target + ": " + _failure_text(failure)
        )
        self._maybe_ended()

    def upstream_made(self, protocol: _UpstreamProtocol) -> None:
        assert protocol.transport is not None
        self.upstream_transport = upstream = protocol.transport
        self.upstream_open = True
        if self.closing:
            upstream.loseConnection()
            return
        client = self.client_transport
        for transport in (client, upstream):
            # NBD replies are small; they must not wait for Nagle.
            if ITCPTransport.providedBy(transport):
                ITCPTransport(transport).setTcpNoDelay(True)
        self.relay._upstream_connected(self)
        kind = self.relay._socket_path
        if (
            kind is not None
            and isinstance(client, tcp.Connection)
            and isinstance(upstream, tcp.Connection)
        ):
            try:
                self.path = _SocketPath(self, kind, client, upstream)
            except OSError as exc:
                # Out of memory or file descriptors for the buffer or pipes:
                # this connection can still be relayed the portable way.
                log.warn(
                    "relay {job_id}/{disk_key}: no {kind} path ({error}), using transports",
                    job_id=self.relay.job_id,
                    disk_key=self.relay.disk_key,
                    kind=kind,
                    error=_error_text(exc),
                )
            else:
                self.path.start()
                return
        IConsumer(upstream).registerProducer(IPushProducer(client), True)
        IConsumer(client).registerProducer(IPushProducer(upstream), True)
        IPushProducer(client).resumeProducing()

    # -- the transport data path

    def client_data(self, data: bytes) -> None:
        upstream = self.upstream_transport
        if upstream is None or self.closing:
            # Read by a transport handed back for closing: never relayed.
            return
        upstream.write(data)
        self.tail = (self.tail + data[-_TAIL:])[-_TAIL:]
        self.to_hub += len(data)
        self.relay._progress(len(data))

    def upstream_data(self, data: bytes) -> None:
        if self.closing:
            return
        self.client_transport.write(data)
        self.from_hub += len(data)
        self.relay._progress(len(data))

    # -- ending

    def client_lost(self, reason: Failure) -> None:
        self.client_open = False
        if not self.closing:
            self.client_finished("client closed the connection")
        self._maybe_ended()

    def upstream_lost(self, reason: Failure) -> None:
        self.upstream_open = False
        if not self.closing:
            self.upstream_finished(reason)
        self._maybe_ended()

    def client_finished(self, why: str) -> None:
        """The client is done: deliver what it sent, then close the upstream."""
        if self.closing:
            return
        self.closing = True
        log.debug(
            "relay {job_id}/{disk_key} connection {number}: {why}",
            job_id=self.relay.job_id,
            disk_key=self.relay.disk_key,
            number=self.number,
            why=why,
        )
        if self.connecting is not None:
            self.connecting.cancel()
        if self.path is not None:
            # A pump only reports the client's end once it has sent all it held.
            self.path.finish(drain_upstream=True)
        self._close(self.client_transport)
        if self.upstream_transport is not None:
            # A transport flushes its buffer before closing.
            self._close(self.upstream_transport)

    def upstream_finished(self, why: Optional[BaseException | Failure]) -> None:
        """The upstream closed or failed while the client was connected."""
        if self.closing:
            return
        # An NBD server closes first only after NBD_CMD_DISC, and the client
        # closes right after sending it; the hub's close can still reach the
        # relay before the client's.  Both are the normal end of a session.
        if self.said_goodbye() or _peer_has_finished(self.client_transport):
            self.client_finished("session ended")
            return
        if why is None or (isinstance(why, Failure) and why.check(ConnectionDone)):
            reason = "upstream " + self.relay._target + " closed the connection"
        else:
            text = _failure_text(why) if isinstance(why, Failure) else _error_text(why)
            reason = "connection to upstream " + self.relay._target + " lost: " + text
        self._lose_upstream(reason)

    def _lose_upstream(self, reason: str) -> None:
        self.closing = True
        if self.path is not None:
            self.path.finish(drain_upstream=False)
        self.relay._upstream_lost(self, reason)
        self._close(self.client_transport)
        if self.upstream_transport is not None:
            self._close(self.upstream_transport)

    def shutdown(self) -> None:
        """Close both sides because the relay stops."""
        if self.path is not None and not self.closing:
            # What the pumps hold goes on if the peers take it right now; a
            # transport flushes its own buffer while it closes.
            self.path.to_hub.flush()
            self.path.from_hub.flush()
        self.client_finished("relay stopped")

    def abort(self) -> None:
        for transport in (self.client_transport, self.upstream_transport):
            abort = getattr(transport, "abortConnection", None)
            if callable(abort):
                abort()

    @staticmethod
    def _close(transport: ITransport) -> None:
        # A consumer that still has a (paused) producer registered waits for
        # it instead of closing; the peer is going away, so drop it first.
        if getattr(transport, "producer", None) is not None:
            IConsumer(transport).unregisterProducer()
        transport.loseConnection()

    def _maybe_ended(self) -> None:
        if self.ended or self.client_open or self.upstream_open or self.connecting is not None:
            return
        self.ended = True
        self.relay._ended(self)


def _failure_text(failure: Failure) -> str:
    if failure.value is None:
        return failure.getErrorMessage()
    return _error_text(failure.value)


class _UpstreamFactory(Factory):
    # Not connectProtocol's factory: that one logs its start and stop for
    # every connection.
    noisy = False

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Optional[IAddress]) -> _UpstreamProtocol:
        return _UpstreamProtocol(self.conn)


class _RelayFactory(Factory):
    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Optional[IAddress]) -> _ClientProtocol:
        return _ClientProtocol(self.relay)


# -- the relay ------------------------------------------------------------


class Relay:
    """A loopback listener relaying every connection to one NBD target.

    ``reactor`` must provide :class:`IReactorTCP` and :class:`IReactorTime`;
    the copy and splice paths also need :class:`IReactorFDSet`.  ``clock``
    returns monotonic seconds (default :func:`time.monotonic`) and is only
    used for the figures.  ``data_path`` is ``"auto"`` (copy where the reactor
    allows it, else transport), ``"copy"``, ``"splice"`` (both fail at
    construction where unavailable) or ``"transport"``.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        target_host: str,
        target_port: int,
        *,
        job_id: str,
        disk_key: str,
        export: str,
        listen_host: str = "127.0.0.1",
        on_upstream_lost: Optional[Callable[[Relay, str], None]] = None,
        clock: Optional[Callable[[], float]] = None,
        data_path: DataPath = "auto",
    ) -> None:
        if data_path not in ("auto", "copy", "splice", "transport"):
            raise ValueError(f"unknown data path {data_path!r}")
        fd_reactor = IReactorFDSet.providedBy(reactor)
        if data_path in ("copy", "splice") and not fd_reactor:
            raise ValueError(f"the {data_path} data path needs a file-descriptor reactor")
        if data_path == "splice" and not splice_available():
            raise ValueError("the splice data path needs Linux and os.splice")
        self._reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.job_id = job_id
        self.disk_key = disk_key
        self.export = export
        self.listen_host = listen_host
        self.listen_port = 0
        self._target = f"{target_host}:{target_port}"
        self._on_upstream_lost = on_upstream_lost
        self._clock = clock or time.monotonic
        # The pump kind for connections between real TCP sockets; None: transports.
        self._socket_path: Optional[Literal["copy", "splice"]] = None
        if data_path in ("copy", "splice"):
            self._socket_path = data_path
        elif data_path == "auto" and fd_reactor:
            self._socket_path = "copy"
        self._endpoint = _client_endpoint(reactor, target_host, target_port)
        self._port: Optional[IListeningPort] = None
        self._connections: list[_Connection] = []
        self._accepted_count = 0
        # Bytes of connections that have ended.
        self._done_to_hub = 0
        self._done_from_hub = 0
        self._started: Optional[float] = None
        self._stopped_at: Optional[float] = None
        self._rate = _RateWindow()
        self._upstream_error: Optional[str] = None
        self._incident = False
        self._stopping = False
        self._listener_closing = False
        self._stop_waiters: list[Deferred[None]] = []
        self._stopped = False
        self._grace: Optional[IDelayedCall] = None

    @property
    def data_path(self) -> Literal["copy", "splice", "transport"]:
        """The path new connections take when both ends are real TCP sockets."""
        return self._socket_path or "transport"

    async def start(self) -> int:
        """Listen on ``listen_host`` and a free port; return the port."""
        port = await _server_endpoint(self._reactor, self.listen_host).listen(_RelayFactory(self))
        self._port = port
        self.listen_port = int(getattr(port.getHost(), "port", 0))
        self._started = self._clock()
        log.info(
            "relay {job_id}/{disk_key} listening on {listen_host}:{listen_port} for {target}"
            " ({data_path})",
            job_id=self.job_id,
            disk_key=self.disk_key,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            target=self._target,
            data_path=self.data_path,
        )
        return self.listen_port

    def stop(self) -> Deferred[None]:
        """Close the listener and every connection; fires when all are closed.

        Bytes the relay holds are sent on where the peer takes them; a
        connection still open STOP_GRACE seconds later is aborted.
        """
        d: Deferred[None] = Deferred()
        if self._stopped:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if self._stopping:
            return d
        self._stopping = True
        self._stopped_at = self._clock()
        if self._port is not None:
            self._listener_closing = True
            maybeDeferred(self._port.stopListening).addBoth(self._listener_closed)
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            self._grace = IReactorTime(self._reactor).callLater(STOP_GRACE, self._abort_all)
        self._check_stopped()
        return d

    def stats(self) -> RelayStats:
        now = self._clock()
        to_hub, from_hub = self._totals()
        total = to_hub + from_hub
        started = self._started
        end = self._stopped_at if self._stopped_at is not None else now
        elapsed = 0.0 if started is None else end - started
        running = not self._stopping
        return RelayStats(
            port=self.target_port,
            listen_port=self.listen_port,
            job_id=self.job_id,
            export=self.export,
            disk_key=self.disk_key,
            state=self._state(),
            bytes_to_hub=to_hub,
            bytes_from_hub=from_hub,
            connections=self._accepted_count,
            active_connections=len(self._connections),
            started_at=0.0 if started is None else started,
            bytes_per_second_current=(
                self._rate.rate(now, started) if started is not None and running else 0.0
            ),
            bytes_per_second_average=total / elapsed if elapsed > 0 else 0.0,
            upstream_error=self._upstream_error,
        )

    def buffered_bytes(self) -> int:
        """Bytes the relay holds in user space or its pipes, read but not yet sent on."""
        return sum(conn.buffered() for conn in self._connections)

    # -- called by connections

    def _accepted(self, client: _ClientProtocol) -> _Connection:
        self._accepted_count += 1
        conn = _Connection(self, self._accepted_count, client)
        self._connections.append(conn)
        log.info(
            "relay {job_id}/{disk_key} connection {number} from {peer}",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            peer=conn.client_transport.getPeer(),
        )
        if self._stopping:
            conn.shutdown()
        else:
            conn.connect(self._endpoint)
        return conn

    def _upstream_connected(self, conn: _Connection) -> None:
        # A working upstream ends an incident: a later loss is a new one.
        self._incident = False

    def _upstream_lost(self, conn: _Connection, reason: str) -> None:
        if self._stopping:
            # The relay is closing everything anyway; not an incident.
            log.info(
                "relay {job_id}/{disk_key} connection {number} while stopping: {reason}",
                job_id=self.job_id,
                disk_key=self.disk_key,
                number=conn.number,
                reason=reason,
            )
            return
        self._upstream_error = reason
        log.warn(
            "relay {job_id}/{disk_key} connection {number}: {reason}",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            reason=reason,
        )
        if self._incident:
            return
        self._incident = True
        if self._on_upstream_lost is not None:
            try:
                self._on_upstream_lost(self, reason)
            except Exception:
                log.failure("on_upstream_lost of relay {job_id} failed", job_id=self.job_id)

    def _ended(self, conn: _Connection) -> None:
        to_hub, from_hub = conn.counts()
        self._done_to_hub += to_hub
        self._done_from_hub += from_hub
        self._connections.remove(conn)
        log.info(
            "relay {job_id}/{disk_key} connection {number} closed:"
            " {to_hub} bytes to hub, {from_hub} bytes from hub ({data_path})",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            to_hub=to_hub,
            from_hub=from_hub,
            data_path=conn.path.kind if conn.path is not None else "transport",
        )
        self._check_stopped()

    def _progress(self, n: int) -> None:
        if n:
            self._rate.add(self._clock(), n)

    # -- internals

    def _totals(self) -> tuple[int, int]:
        to_hub, from_hub = self._done_to_hub, self._done_from_hub
        for conn in self._connections:
            a, b = conn.counts()
            to_hub += a
            from_hub += b
        return to_hub, from_hub

    def _state(self) -> RelayState:
        if self._stopping:
            return "closed"
        if self._incident:
            return "upstream_lost"
        if any(conn.relaying for conn in self._connections):
            return "connected"
        return "listening"

    def _listener_closed(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure(
                "relay {job_id}/{disk_key}: closing the listener failed",
                result,
                job_id=self.job_id,
                disk_key=self.disk_key,
            )
        self._listener_closing = False
        self._check_stopped()

    def _abort_all(self) -> None:
        self._grace = None
        for conn in list(self._connections):
            conn.abort()

    def _check_stopped(self) -> None:
        if not self._stopping or self._listener_closing or self._connections or self._stopped:
            return
        self._stopped = True
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        log.info("relay {job_id}/{disk_key} stopped", job_id=self.job_id, disk_key=self.disk_key)
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)


# -- the registry -----------------------------------------------------------


class RelayRegistry:
    """Every relay of the daemon, for ``GET /api/v1/relays`` and ``/metrics``.

    :meth:`totals` keeps counting the bytes of removed relays, so Prometheus
    counters built on it never go backwards.  Remove a relay once, after its
    stop() has fired, so its last bytes are in the totals.
    """

    def __init__(self) -> None:
        self._relays: list[Relay] = []
        self._retired: dict[tuple[int, str], int] = {}

    def add(self, relay: Relay) -> None:
        if relay not in self._relays:
            self._relays.append(relay)

    def remove(self, relay: Relay) -> None:
        if relay not in self._relays:
            return
        self._relays.remove(relay)
        stats = relay.stats()
        for direction, count in (
            ("to_hub", stats.bytes_to_hub),
            ("from_hub", stats.bytes_from_hub),
        ):
            key = (stats.port, direction)
            self._retired[key] = self._retired.get(key, 0) + count

    def relays(self) -> list[Relay]:
        return list(self._relays)

    def by_job(self, job_id: str) -> list[Relay]:
        return [relay for relay in self._relays if relay.job_id == job_id]

    def totals(self) -> dict[tuple[int, str], int]:
        """Cumulative bytes per (target port, "to_hub" | "from_hub")."""
        totals = dict(self._retired)
        for relay in self._relays:
            stats = relay.stats()
            for direction, count in (
                ("to_hub", stats.bytes_to_hub),
                ("from_hub", stats.bytes_from_hub),
            ):
                key = (stats.port, direction)
                totals[key] = totals.get(key, 0) + count
        return totals
