"""One relayed connection: the client's, the upstream one the relay opens for it, and its phase.

This module owns the two Twisted protocols of a relayed connection, the
choice of its data path once the upstream is connected, the transport data
path itself, and the connection's :class:`ConnectionPhase`, whose
transitions are all in :data:`TRANSITIONS`.  The data paths:

``copy``
    Both ends are real TCP sockets and the relay has a file-descriptor
    reactor: the transports lend their sockets to a
    :class:`~sna.nbd.relay.pumps.SocketPath`.
``transport`` (any reactor, and in-memory tests)
    ``twisted.protocols.portforward``'s design: the client transport is paused
    until the upstream connects, then each transport is registered as the
    other's streaming producer.

It never alters or parses the bytes, except that it remembers the last ones
the client sent, to tell a clean ``NBD_CMD_DISC`` end of session from a hub
that went away.  What a loss means is not its business: it tells its
:class:`Owner` (the relay), which tells the job manager.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IPushProducer,
    IReactorFDSet,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.nbd.client import ack_now
from sna.nbd.relay.counters import LastBytes
from sna.nbd.relay.pumps import SocketPath

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

__all__ = ["TRANSITIONS", "ClientProtocol", "Connection", "ConnectionPhase", "Owner"]

log = Logger()


class ConnectionPhase(enum.Enum):
    """Where one relayed connection is in its life."""

    CONNECTING = "connecting"
    """The client is accepted and not read; the upstream is being connected."""
    RELAYING = "relaying"
    """Both sides are connected and bytes move."""
    CLOSING = "closing"
    """One side is done (or the relay stops): both transports are being closed."""
    ENDED = "ended"
    """Both transports are closed and no connection attempt is left; counted by the relay."""


#: Every transition a connection may make.
TRANSITIONS: dict[ConnectionPhase, frozenset[ConnectionPhase]] = {
    ConnectionPhase.CONNECTING: frozenset({ConnectionPhase.RELAYING, ConnectionPhase.CLOSING}),
    ConnectionPhase.RELAYING: frozenset({ConnectionPhase.CLOSING}),
    ConnectionPhase.CLOSING: frozenset({ConnectionPhase.ENDED}),
    ConnectionPhase.ENDED: frozenset(),
}


class Owner(TypingProtocol):
    """What a connection needs of its relay (``sna.nbd.relay.lifecycle.Relay``)."""

    job_id: str
    disk_key: str

    @property
    def target(self) -> str:
        """The upstream, as ``host:port`` for messages."""

    def count(self, n: int) -> None:
        """``n`` more bytes were relayed, either way."""

    def upstream_connected(self, conn: Connection) -> None:
        """``conn``'s upstream connected and the connection relays."""

    def upstream_lost(self, conn: Connection, reason: str) -> None:
        """``conn``'s upstream failed or closed while its client was still there."""

    def connection_ended(self, conn: Connection) -> None:
        """``conn`` is over: both sides closed; its counts are final."""


class ClientProtocol(Protocol):
    """The connection the backup client opened to the relay's port."""

    def __init__(self, accept: Callable[[ClientProtocol], Connection]) -> None:
        self.accept = accept
        self.conn: Optional[Connection] = None

    def connectionMade(self) -> None:
        # Nothing may be read before there is somewhere to send it.
        assert self.transport is not None
        IPushProducer(self.transport).pauseProducing()
        self.conn = self.accept(self)

    def dataReceived(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.client_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.conn is not None:
            self.conn.client_lost(reason)


class _UpstreamProtocol(Protocol):
    """The relay's connection to the NBD target."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def connectionMade(self) -> None:
        self.conn.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        ack_now(self.transport)
        self.conn.upstream_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conn.upstream_lost(reason)


class _UpstreamFactory(Factory):
    # Not connectProtocol's factory: that one logs its start and stop for
    # every connection.
    noisy = False

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Optional[IAddress]) -> _UpstreamProtocol:
        return _UpstreamProtocol(self.conn)


class Connection:
    """One client connection and its upstream connection.

    ``fdset`` is the reactor to lend the sockets to (the copy path), or
    ``None`` for the transport path whatever the transports are.
    """

    def __init__(
        self,
        owner: Owner,
        number: int,
        client: ClientProtocol,
        fdset: Optional[IReactorFDSet],
    ) -> None:
        self.owner = owner
        self.number = number
        assert client.transport is not None
        self.client_transport: ITransport = client.transport
        self.upstream_transport: Optional[ITransport] = None
        self.connecting: Optional[Deferred[IProtocol]] = None
        self.fdset = fdset
        self.path: Optional[SocketPath] = None
        self.phase = ConnectionPhase.CONNECTING
        # Which transports are still open, as Twisted last told us.
        self.client_open = True
        self.upstream_open = False
        # Counted by the transport path; the copy path counts in its pumps.
        self.to_hub = 0
        self.from_hub = 0
        # The last bytes the client sent, on the transport path.
        self.last = LastBytes()

    # -- figures

    @property
    def data_path(self) -> str:
        return "copy" if self.path is not None else "transport"

    @property
    def closing(self) -> bool:
        """Whether the connection is past relaying: closing or ended."""
        return self.phase in (ConnectionPhase.CLOSING, ConnectionPhase.ENDED)

    def counts(self) -> tuple[int, int]:
        """Bytes relayed so far: (to the hub, from the hub)."""
        if self.path is None:
            return self.to_hub, self.from_hub
        to_hub, from_hub = self.path.moved()
        return self.to_hub + to_hub, self.from_hub + from_hub

    def said_goodbye(self) -> bool:
        """Whether the last thing the client sent was NBD_CMD_DISC."""
        if self.path is not None:
            return self.path.said_goodbye()
        return self.last.end_with_disconnect()

    def buffered(self) -> int:
        """Bytes read from one side and not yet handed to the other's kernel."""
        if self.path is not None:
            return self.path.buffered
        return _pending_bytes(self.client_transport) + _pending_bytes(self.upstream_transport)

    # -- the phase

    def _enter(self, phase: ConnectionPhase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"relay connection {self.number}: {self.phase} -> {phase}")
        self.phase = phase

    # -- setting up

    def connect(self, endpoint: IStreamClientEndpoint) -> None:
        d = endpoint.connect(_UpstreamFactory(self))
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: IProtocol) -> None:
        self.connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not (failure.check(CancelledError, ConnectingCancelledError) or self.closing):
            self._lose_upstream(
                "cannot connect to " + self.owner.target + ": " + _failure_text(failure)
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
        self._enter(ConnectionPhase.RELAYING)
        self.owner.upstream_connected(self)
        if (
            self.fdset is not None
            and isinstance(client, tcp.Connection)
            and isinstance(upstream, tcp.Connection)
        ):
            try:
                path = SocketPath(self.fdset, client.getHandle(), upstream.getHandle(), self)
            except OSError as exc:
                # Out of memory for the buffers: this connection can still be
                # relayed the portable way.
                log.warn(
                    "relay {job_id}/{disk_key}: no copy path ({error}), using transports",
                    job_id=self.owner.job_id,
                    disk_key=self.owner.disk_key,
                    error=_error_text(exc),
                )
            else:
                # While the sockets are lent, the transports must not be
                # registered with the reactor for the same descriptors.
                for transport in (client, upstream):
                    transport.stopReading()
                    transport.stopWriting()
                self.path = path
                path.start()
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
        self.last.add(data)
        self.to_hub += len(data)
        self.owner.count(len(data))

    def upstream_data(self, data: bytes) -> None:
        if self.closing:
            return
        self.client_transport.write(data)
        self.from_hub += len(data)
        self.owner.count(len(data))

    # -- what the copy path reports (sna.nbd.relay.pumps.PathEvents)

    def moved(self, n: int) -> None:
        self.owner.count(n)

    def client_ended(self, error: Optional[OSError]) -> None:
        if error is None:
            self.client_finished("client closed the connection")
        else:
            self.client_finished("client connection failed: " + _error_text(error))

    def upstream_ended(self, error: Optional[OSError]) -> None:
        self.upstream_finished(error)

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
        self._enter(ConnectionPhase.CLOSING)
        log.debug(
            "relay {job_id}/{disk_key} connection {number}: {why}",
            job_id=self.owner.job_id,
            disk_key=self.owner.disk_key,
            number=self.number,
            why=why,
        )
        if self.connecting is not None:
            self.connecting.cancel()
        if self.path is not None:
            # A pump only reports the client's end once it has sent all it held.
            self.path.finish(drain_upstream=True)
        self._close_both()

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
            reason = "upstream " + self.owner.target + " closed the connection"
        else:
            text = _failure_text(why) if isinstance(why, Failure) else _error_text(why)
            reason = "connection to upstream " + self.owner.target + " lost: " + text
        self._lose_upstream(reason)

    def _lose_upstream(self, reason: str) -> None:
        self._enter(ConnectionPhase.CLOSING)
        if self.path is not None:
            self.path.finish(drain_upstream=False)
        self.owner.upstream_lost(self, reason)
        self._close_both()

    def shutdown(self) -> None:
        """Close both sides because the relay stops."""
        if self.path is not None and not self.closing:
            # What the pumps hold goes on if the peers take it right now; a
            # transport flushes its own buffer while it closes.
            self.path.flush()
        self.client_finished("relay stopped")

    def abort(self) -> None:
        for transport in (self.client_transport, self.upstream_transport):
            abort = getattr(transport, "abortConnection", None)
            if callable(abort):
                abort()

    def _close_both(self) -> None:
        # A transport flushes its buffer before closing.
        _close(self.client_transport)
        if self.upstream_transport is not None:
            _close(self.upstream_transport)

    def _maybe_ended(self) -> None:
        if (
            self.phase is not ConnectionPhase.CLOSING
            or self.client_open
            or self.upstream_open
            or self.connecting is not None
        ):
            return
        self._enter(ConnectionPhase.ENDED)
        self.owner.connection_ended(self)


def _close(transport: ITransport) -> None:
    # A consumer that still has a (paused) producer registered waits for it
    # instead of closing; the peer is going away, so drop it first.
    if getattr(transport, "producer", None) is not None:
        IConsumer(transport).unregisterProducer()
    transport.loseConnection()


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


def _failure_text(failure: Failure) -> str:
    if failure.value is None:
        return failure.getErrorMessage()
    return _error_text(failure.value)
