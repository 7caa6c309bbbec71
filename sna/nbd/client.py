"""A pipelined NBD client on Twisted, over the sans-IO core in `sna.nbd.wire`.

This module owns one NBD session: connecting (``connect``), the handshake
(``NBD_OPT_GO``), and requests in transmission with many in flight, their
replies matched by handle.  It splits requests to the server's limits, turns
error replies into :class:`TransmissionError`, and fails everything pending
with :class:`ConnectionLost` when the connection goes.  It does not probe
(`sna.nbd.probe`) or relay (`sna.nbd.relay`), and keeps no global state: the
reactor is passed in.

Copies and memory.  Twisted transports only take ``bytes`` and join what is
queued into one new buffer, so writing whole requests with ``writeSequence``
would copy every queued payload at once (doubling the memory of a deep
pipeline).  Instead the protocol registers itself as a streaming producer on
its transport and feeds it about ``SEND_SLICE`` bytes at a time, each slice
built once from views of the caller's buffer (the header rides along with the
first slice); Twisted sends a lone ``bytes`` without copying it again.  A
READ's payload is kept as the received chunks and joined once at the end.

Flow control.  ``write`` and ``read`` never wait: they queue the request and
return its Deferred.  What the session holds is bounded by
``max_in_flight_bytes`` (64 MiB by default) only if the producer awaits
``drain()`` before each request: it fires while the payload bytes of
unanswered requests (write data not yet acknowledged plus read data not yet
delivered) are below the limit, so the total stays under the limit plus one
request.  The caller's buffer is referenced, not copied, until the write's
Deferred fires; it must not change before then.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Optional, TypeVar, Union

import attrs
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sna.nbd.errors import (
    ConnectionLost,
    ConnectTimeout,
    NBDError,
    OptionError,
    TransmissionError,
    UnsupportedRequest,
)
from sna.nbd.wire import (
    Chunk,
    ClientHandshake,
    Command,
    CommandFlag,
    Errno,
    ExportInfo,
    ExportReady,
    Goal,
    HandshakeEvent,
    MiB,
    ReplyParser,
    SendBytes,
    SimpleReply,
    abort_option,
    encode_request,
    errno_name,
)

log = Logger()

T = TypeVar("T")

#: Default bound on unanswered payload bytes per session (see the module docstring).
DEFAULT_MAX_IN_FLIGHT = 64 * MiB
#: How much the protocol hands its transport at a time.  Big enough that the
#: per-slice Python work is noise, small enough that the one copy per slice
#: stays in cache and the transport never holds more than this.
SEND_SLICE = 1 * MiB
DEFAULT_CONNECT_TIMEOUT = 10.0

#: What ``write`` accepts: anything with a contiguous byte buffer.
Payload = Union[bytes, bytearray, memoryview]


def feed_handshake(
    handshake: ClientHandshake,
    data: bytes,
    write: Callable[[bytes], None],
    close: Callable[[], None],
) -> tuple[list[HandshakeEvent], Optional[NBDError]]:
    """Give the server's bytes to ``handshake``, writing what it answers.

    Returns the events left for the caller (everything but the bytes to
    send) and the protocol error, if the server broke the handshake; the
    connection is then being closed, after ``NBD_OPT_ABORT`` when the
    server was still negotiating properly (the spec's soft way out).
    """
    try:
        events = handshake.receive_data(data)
    except NBDError as e:
        if isinstance(e, OptionError):
            write(abort_option())
        close()
        return [], e
    left: list[HandshakeEvent] = []
    for event in events:
        if isinstance(event, SendBytes):
            write(event.data)
        else:
            left.append(event)
    return left, None


def ack_now(transport: Any) -> None:
    """Acknowledge what the peer sent at once, instead of up to 40 ms later.

    qemu-nbd leaves Nagle on and writes an option reply's header and payload
    separately: the payload waits until the header is acknowledged, and a
    Linux receiver in its interactive mode delays that ACK by up to 40 ms,
    once per reply.  ``TCP_QUICKACK`` sends the pending ACK now and leaves
    that mode; the kernel may enter it again, so it is set after every read.
    ``transport`` is a Twisted TCP transport or a socket; anything else is ignored.
    """
    handle = transport.getHandle() if hasattr(transport, "getHandle") else transport
    if isinstance(handle, socket.socket) and handle.family in (socket.AF_INET, socket.AF_INET6):
        try:
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass  # closed under us: nothing to acknowledge


def client_endpoint(
    reactor: IReactorTCP, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """A TCP endpoint for ``host``; IP literals skip name resolution (no thread pool).

    The one such helper of ``sna.nbd``: the client, the probe and the relay use it.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return HostnameEndpoint(reactor, bare, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, bare, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, bare, port, timeout=timeout)


class _OneShotFactory(Factory):
    # connectProtocol's own factory logs "Starting factory <...OneShotFactory
    # object at 0x...>" and its stop for every connection.
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: Protocol) -> Deferred[Any]:
    """``connectProtocol``, without a log line for each connection's start and stop."""
    d: Deferred[Any] = endpoint.connect(_OneShotFactory(protocol))
    return d


@attrs.define
class _Pending:
    """A request sent (or queued) and not yet answered."""

    command: Command
    offset: int
    length: int
    deferred: Deferred[tuple[Chunk, ...]]
    #: Payload bytes this request holds: write data out, or read data back.
    weight: int


@implementer(IPushProducer)
class NBDClientProtocol(Protocol):
    """One NBD session: the handshake, then pipelined requests.

    ``ready`` fires with the :class:`ExportInfo` once ``NBD_OPT_GO`` succeeds
    (or fails with the handshake's error); cancelling it drops the connection.
    :meth:`request` is the low-level call; :class:`NBDClient` is the API.
    The protocol is its transport's streaming producer (see the module
    docstring), which is how its writes follow the socket's pace.
    """

    def __init__(self, export: str, max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_in_flight_bytes <= 0:
            raise ValueError("max_in_flight_bytes must be positive")
        self.export = export
        self.max_in_flight_bytes = max_in_flight_bytes
        self.info: Optional[ExportInfo] = None
        self.ready: Deferred[ExportInfo] = Deferred(self._cancel_handshake)
        self._handshake = ClientHandshake(export, Goal.GO)
        self._parser = ReplyParser(self._payload_length)
        self._pending: dict[int, _Pending] = {}
        self._handles = itertools.count(1)
        self._in_flight = 0
        self._drain_waiters: deque[Deferred[None]] = deque()
        self._closed_waiters: list[Deferred[None]] = []
        self._outgoing: deque[Chunk] = deque()
        self._paused = False
        self._registered = False
        self._connected = False
        self._lost = False
        #: Why the session is ending, for everything failed because of it.
        self._reason: Optional[NBDError] = None
        self._closing = False
        self._close_when_sent = False

    # -- state --------------------------------------------------------------

    @property
    def in_flight_bytes(self) -> int:
        """Payload bytes of requests not yet answered."""
        return self._in_flight

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is gone (at once if it already is)."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    # -- Protocol --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        transport = self.transport
        assert transport is not None
        if ITCPTransport.providedBy(transport):
            # Small requests (flush, trim, the DISC) must not wait for
            # Nagle behind unacknowledged payload.
            transport.setTcpNoDelay(True)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        ack_now(self.transport)
        if self._closing and self._close_when_sent and not self._pending:
            return
        if self.info is None:
            self._handshake_data(data)
            return
        try:
            replies = self._parser.feed(data)
        except NBDError as e:
            log.error(
                "NBD export {export}: protocol error from the server, dropping the connection: {error}",
                export=self.export,
                error=str(e),
            )
            self._abort(e)
            return
        for reply in replies:
            self._complete(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._lost = True
        self._registered = False
        self._outgoing.clear()
        if not self.ready.called:
            error = self._reason or self._handshake.connection_lost()
            self.ready.errback(
                error or ConnectionLost("the connection closed during the handshake")
            )
        why = self._reason or ConnectionLost(
            f"connection lost: {reason.getErrorMessage()}"
            if not self._closing
            else "the client closed the connection"
        )
        pending, self._pending = self._pending, {}
        self._in_flight = 0
        if pending:
            log.warn(
                "NBD export {export}: connection lost with {count} requests unanswered: {why}",
                export=self.export,
                count=len(pending),
                why=str(why),
            )
        for request in pending.values():
            request.deferred.errback(
                ConnectionLost(
                    f"{request.command.wire_name} of {request.length} bytes at offset "
                    f"{request.offset} got no reply: {why}"
                )
            )
        waiters, self._drain_waiters = self._drain_waiters, deque()
        for waiter in waiters:
            waiter.errback(ConnectionLost(str(why)))
        closed, self._closed_waiters = self._closed_waiters, []
        for d in closed:
            d.callback(None)

    # -- handshake ----------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        if self._reason is not None:
            return  # failed already; the connection is closing
        events, error = feed_handshake(self._handshake, data, self._write, self._close_transport)
        if error is not None:
            self._reason = error
            return
        for event in events:
            if isinstance(event, ExportReady):
                self.info = event.info
                log.debug(
                    "NBD export {export}: {size} bytes, flags {flags:#x}, "
                    "blocks {min_block}/{preferred_block}/{max_block}",
                    export=self.export,
                    size=event.info.size,
                    flags=event.info.transmission_flags,
                    min_block=event.info.min_block,
                    preferred_block=event.info.preferred_block,
                    max_block=event.info.max_block,
                )
                if self.ready.called:
                    return  # the caller gave up (timeout) and the transport is being dropped
                self.ready.callback(event.info)
                if event.leftover:
                    self.dataReceived(event.leftover)

    def _cancel_handshake(self, d: Deferred[ExportInfo]) -> None:
        if self.transport is not None and self._connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- requests ------------------------------------------------------------

    def request(
        self,
        command: Command,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: Optional[memoryview] = None,
    ) -> Deferred[tuple[Chunk, ...]]:
        """Send one request; fires with a READ's chunks (empty for the rest).

        No splitting and no checks against the export's limits here: that is
        :class:`NBDClient`'s job.  A WRITE's ``payload`` must be ``length``
        bytes, and is referenced until sent.
        """
        if self.info is None:
            return fail(NBDError("the handshake has not finished"))
        if self._lost or self._closing:
            return fail(self._reason or ConnectionLost("the connection is closed or closing"))
        handle = next(self._handles)
        header = encode_request(command, handle, offset, length, flags)
        weight = length if command in (Command.READ, Command.WRITE) else 0
        d: Deferred[tuple[Chunk, ...]] = Deferred()
        self._pending[handle] = _Pending(command, offset, length, d, weight)
        self._in_flight += weight
        self._outgoing.append(header)
        if payload is not None:
            self._outgoing.append(payload)
        self._pump()
        return d

    def _payload_length(self, handle: int) -> Optional[int]:
        request = self._pending.get(handle)
        if request is None:
            return None
        return request.length if request.command is Command.READ else 0

    def _complete(self, reply: SimpleReply) -> None:
        request = self._pending.pop(reply.handle, None)
        if request is None:
            return  # failed already: the connection went while replies were parsed
        self._in_flight -= request.weight
        if reply.error:
            error = TransmissionError(
                request.command.wire_name,
                request.offset,
                request.length,
                reply.error,
                errno_name(reply.error),
            )
            if reply.error == Errno.ESHUTDOWN:
                # The spec: a client told ESHUTDOWN must disconnect softly.
                self.disconnect()
            request.deferred.errback(error)
        else:
            request.deferred.callback(reply.chunks)
        self._release_drain_waiters()
        if self._closing and not self._pending and not self._close_when_sent:
            self._send_disc()

    # -- flow control ------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Fires when fewer than ``max_in_flight_bytes`` payload bytes are unanswered."""
        if self._lost:
            return fail(self._reason or ConnectionLost("the connection is closed"))
        if self._in_flight < self.max_in_flight_bytes and not self._drain_waiters:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _release_drain_waiters(self) -> None:
        # One at a time: a waiter's callback may issue the next request and
        # fill the window again.
        while self._drain_waiters and self._in_flight < self.max_in_flight_bytes:
            self._drain_waiters.popleft().callback(None)

    # -- closing -------------------------------------------------------------

    def disconnect(self) -> Deferred[None]:
        """Soft disconnect: wait for pending replies, send NBD_CMD_DISC, close.

        New requests fail from now on.  Fires when the connection is gone.
        """
        closed = self.when_closed()
        if self._lost or self._closing:
            return closed
        self._closing = True
        if self.info is None:
            # An option is outstanding, and no other may be sent before its
            # reply (not even NBD_OPT_ABORT): hang up.
            self._close_transport()
        elif not self._pending:
            self._send_disc()
        return closed

    def abort(self, reason: Optional[NBDError] = None) -> None:
        """Hard disconnect: drop the connection now; pending requests fail."""
        self._abort(reason or ConnectionLost("the client aborted the connection"))

    def _abort(self, reason: NBDError) -> None:
        self._reason = self._reason or reason
        if self.transport is not None and self._connected:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _send_disc(self) -> None:
        self._close_when_sent = True
        # DISC has no reply, so its handle is never looked up.
        self._outgoing.append(encode_request(Command.DISC, next(self._handles), 0, 0))
        self._pump()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or not self._connected:
            return
        if self._registered:
            # A registered producer keeps a TCP transport open after loseConnection.
            self._registered = False
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()

    # -- sending -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._outgoing.append(data)
        self._pump()

    def _pump(self) -> None:
        """Hand queued bytes to the transport until it says it is full."""
        transport = self.transport
        if transport is None or not self._connected:
            return
        outgoing = self._outgoing
        while outgoing and not self._paused:
            parts: list[Chunk] = []
            size = 0
            while outgoing and size < SEND_SLICE:
                item = outgoing[0]
                room = SEND_SLICE - size
                if len(item) <= room:
                    parts.append(outgoing.popleft())
                    size += len(item)
                else:
                    view = memoryview(item)
                    parts.append(view[:room])
                    outgoing[0] = view[room:]
                    size += room
            if len(parts) == 1 and isinstance(parts[0], bytes):
                transport.write(parts[0])
            else:
                # The one copy of the payload (see the module docstring).
                transport.write(b"".join(parts))
        if not outgoing and self._close_when_sent:
            self._close_transport()

    # -- IPushProducer (the transport pacing our writes) ---------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._paused = True
        self._outgoing.clear()


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the first failure of several; callers want the original."""
    error = failure.value
    if isinstance(error, FirstError):
        inner: Failure = error.subFailure
        return inner
    return failure


def _gather(ds: list[Deferred[T]]) -> Deferred[list[T]]:
    if len(ds) == 1:
        return ds[0].addCallback(lambda value: [value])
    return gatherResults(ds, consumeErrors=True).addErrback(_first_error)


def _join(chunk_lists: list[tuple[Chunk, ...]]) -> bytes:
    if len(chunk_lists) == 1 and len(chunk_lists[0]) == 1:
        only = chunk_lists[0][0]
        if isinstance(only, bytes):
            return only
    return b"".join(itertools.chain.from_iterable(chunk_lists))


def _none(_: object) -> None:
    return None


class NBDClient:
    """An open NBD export.  Every method returns a Deferred (``await`` it or chain it).

    Requests may be issued without waiting for earlier ones; each is split
    into pieces of at most the export's maximum (never above 32 MiB for READ
    and WRITE), cut at preferred-block boundaries, and the returned Deferred
    fires when every piece is answered (or fails with the first error).
    Offsets and lengths must be multiples of the export's minimum block size.
    Use :meth:`drain` to bound memory (see the module docstring).
    """

    def __init__(self, protocol: NBDClientProtocol, info: ExportInfo) -> None:
        self._protocol = protocol
        self._info = info

    @property
    def info(self) -> ExportInfo:
        return self._info

    @property
    def export(self) -> str:
        return self._info.name

    @property
    def in_flight_bytes(self) -> int:
        return self._protocol.in_flight_bytes

    @property
    def max_in_flight_bytes(self) -> int:
        return self._protocol.max_in_flight_bytes

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        error = self._check(Command.READ, offset, length)
        if error is not None:
            return fail(error)
        if not length:
            return succeed(b"")
        pieces = [
            self._protocol.request(Command.READ, start, size)
            for start, size in self._pieces(offset, length, self._info.max_payload)
        ]
        return _gather(pieces).addCallback(_join)

    def write(self, offset: int, data: Payload, *, fua: bool = False) -> Deferred[None]:
        """Write ``data`` at ``offset``; the buffer must not change until this fires."""
        view = memoryview(data)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        length = view.nbytes
        error = self._check(Command.WRITE, offset, length, fua=fua)
        if error is not None:
            return fail(error)
        if not length:
            return succeed(None)
        flags = CommandFlag.FUA if fua else 0
        pieces = [
            self._protocol.request(
                Command.WRITE, start, size, flags, view[start - offset : start - offset + size]
            )
            for start, size in self._pieces(offset, length, self._info.max_payload)
        ]
        return _gather(pieces).addCallback(_none)

    def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> Deferred[None]:
        """Make the range read as zeroes; ``no_hole`` asks the server to keep it allocated."""
        error = self._check(Command.WRITE_ZEROES, offset, length, fua=fua)
        if error is not None:
            return fail(error)
        flags = (CommandFlag.NO_HOLE if no_hole else 0) | (CommandFlag.FUA if fua else 0)
        return self._no_payload(Command.WRITE_ZEROES, offset, length, flags)

    def trim(self, offset: int, length: int) -> Deferred[None]:
        """Tell the server the range is unused; its content is undefined afterwards."""
        error = self._check(Command.TRIM, offset, length)
        if error is not None:
            return fail(error)
        return self._no_payload(Command.TRIM, offset, length, 0)

    def flush(self) -> Deferred[None]:
        """Fires once every write answered before now is on stable storage."""
        error = self._check(Command.FLUSH, 0, 0)
        if error is not None:
            return fail(error)
        return self._protocol.request(Command.FLUSH).addCallback(_none)

    def drain(self) -> Deferred[None]:
        """Fires when there is room for more requests under ``max_in_flight_bytes``.

        A producer awaits this before each request to keep the session's
        memory bounded; it fails with :class:`ConnectionLost` once the
        connection is gone.
        """
        return self._protocol.drain()

    def close(self) -> Deferred[None]:
        """Wait for every pending reply, send ``NBD_CMD_DISC``, close the connection."""
        return self._protocol.disconnect()

    def abort(self) -> None:
        """Drop the connection at once; pending requests fail with ConnectionLost."""
        self._protocol.abort()

    # -- helpers ---------------------------------------------------------------

    def _no_payload(self, command: Command, offset: int, length: int, flags: int) -> Deferred[None]:
        if not length:
            return succeed(None)
        pieces = [
            self._protocol.request(command, start, size, flags)
            for start, size in self._pieces(offset, length, self._info.max_no_payload)
        ]
        return _gather(pieces).addCallback(_none)

    def _check(
        self, command: Command, offset: int, length: int, *, fua: bool = False
    ) -> Optional[NBDError]:
        info = self._info
        if offset < 0 or length < 0:
            return UnsupportedRequest(f"negative offset or length ({offset}, {length})")
        needs = {
            Command.FLUSH: (info.can_flush, "NBD_FLAG_SEND_FLUSH"),
            Command.TRIM: (info.can_trim, "NBD_FLAG_SEND_TRIM"),
            Command.WRITE_ZEROES: (info.can_write_zeroes, "NBD_FLAG_SEND_WRITE_ZEROES"),
        }
        if command in needs and not needs[command][0]:
            return UnsupportedRequest(
                f"export {info.name!r} does not offer {command.wire_name} (no {needs[command][1]})"
            )
        if fua and not info.can_fua:
            return UnsupportedRequest(f"export {info.name!r} does not offer FUA")
        minimum = info.min_block
        if offset % minimum or length % minimum:
            return UnsupportedRequest(
                f"{command.wire_name} at {offset} of {length} bytes is not aligned to "
                f"the export's minimum block size {minimum}"
            )
        # Ranges past the end go to the server: it answers them with a clean
        # error (qemu-nbd: ENOSPC for writes, EINVAL for reads) and may know
        # better (a resized export).
        return None

    def _pieces(self, offset: int, length: int, limit: int) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` pieces of at most ``limit``, cut on block boundaries.

        Cuts fall on multiples of the preferred block size (absolute offsets,
        so every piece after the first starts aligned), else of the minimum.
        """
        preferred = self._info.preferred_block
        minimum = self._info.min_block
        end = offset + length
        position = offset
        while position < end:
            stop = min(end, position + limit)
            if stop < end:
                for block in (preferred, minimum):
                    aligned = stop - stop % block
                    if aligned > position:
                        stop = aligned
                        break
            yield position, stop - position
            position = stop


async def connect(
    reactor: IReactorTCP,
    host: str,
    port: int,
    export: str,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    *,
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT,
) -> NBDClient:
    """Connect, negotiate ``export`` with ``NBD_OPT_GO``, and return the open client.

    ``reactor`` must also provide ``IReactorTime`` (every real reactor and
    ``MemoryReactorClock`` do).  Connecting and negotiating together are
    bounded by ``timeout``: past it the connection is dropped and
    :class:`ConnectTimeout` raised.  Socket errors are Twisted's
    (``ConnectionRefusedError``…); protocol errors are :class:`NBDError` subclasses.
    """
    client = await connect_endpoint(
        client_endpoint(reactor, host, port, timeout),
        IReactorTime(reactor),
        export,
        f"NBD export {export!r} at {host}:{port}",
        timeout,
        max_in_flight_bytes,
    )
    log.info(
        "NBD export {export} at {host}:{port} open: {size} bytes",
        export=export,
        host=host,
        port=port,
        size=client.info.size,
    )
    return client


async def connect_endpoint(
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
    export: str,
    where: str,
    timeout: float,
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT,
) -> NBDClient:
    """:func:`connect` over any stream endpoint (a Unix socket too); ``where`` names it
    in the :class:`ConnectTimeout` raised when no session is open within ``timeout``."""
    protocol = NBDClientProtocol(export, max_in_flight_bytes)

    def handshake(_: Any) -> Deferred[ExportInfo]:
        return protocol.ready

    def timed_out(result: Any, seconds: float) -> Any:
        if isinstance(result, Failure):
            raise ConnectTimeout(f"{where}: no NBD session within {seconds:g} s")
        return result

    d = connect_protocol(endpoint, protocol).addCallback(handshake)
    info = await d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
    return NBDClient(protocol, info)
