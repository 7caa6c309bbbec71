"""The copy data path: two pumps moving one connection's bytes between lent sockets.

Once a connection's upstream is connected and both ends are real TCP sockets,
the Twisted transports lend their sockets to a :class:`SocketPath`, whose two
:class:`CopyPump`\\ s are driven by the reactor's readiness through our own
read/write descriptors: each ``recv_into``\\ s one page-aligned COPY_BUFFER and
``send``\\ s from it.  A pump holds at most one read, and stops reading its
source while its destination takes nothing, so a slow side slows the other
through TCP's window instead of growing the relay.  Measured on loopback
against ``socat -b 1048576``: about the same throughput, for less CPU per GiB
(benchmarks/README.md).

This module owns the sockets while they are lent, the pumps' buffers and the
bytes each pump has moved.  It never closes a socket (the transports get
theirs back to close them) and never decides what an end or an error means:
it reports them to its :class:`PathEvents`, the connection.
"""

from __future__ import annotations

import mmap
import os
import socket
from typing import Literal, Optional, Protocol

from twisted.internet.interfaces import IReactorFDSet, IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from sna.nbd.client import ack_now
from sna.nbd.relay.counters import LastBytes

__all__ = ["COPY_BUFFER", "DISCARD_LIMIT", "READ_BUDGET", "PathEvents", "Socket", "SocketPath"]

#: The copy pump's buffer, per direction and connection: the most one read
#: takes and the most the pump holds.  Measured on loopback (256 KiB to
#: 4 MiB): from 2 MiB on the relay keeps up with socat -b 1048576; more
#: mostly loosens the bound on what the relay holds.
COPY_BUFFER = 2 << 20
#: Bytes one readiness event may move before the pump yields to the rest of
#: the reactor (other connections, the API), so one fast connection cannot
#: starve them.  From one read to 8 MiB made no measurable difference.
READ_BUDGET = 4 << 20
#: Upper bound on what is read and dropped from the upstream socket before
#: it is closed once the client is done: closing a socket with unread data
#: sends a reset, which would throw away bytes still queued towards the hub.
DISCARD_LIMIT = 16 << 20

Side = Literal["client", "upstream"]


class Socket(Protocol):
    """What the pumps use of a socket: a non-blocking TCP ``socket.socket``."""

    def fileno(self) -> int: ...

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0, /) -> int: ...

    def send(self, data: memoryview, flags: int = 0, /) -> int: ...

    def getsockopt(self, level: int, optname: int, /) -> int: ...


class PathEvents(Protocol):
    """What a :class:`SocketPath` tells its connection."""

    def moved(self, n: int) -> None:
        """``n`` more bytes were sent on, either way."""

    def client_ended(self, error: Optional[OSError]) -> None:
        """The client closed (``None``) or failed; everything it sent has gone to the hub."""

    def upstream_ended(self, error: Optional[OSError]) -> None:
        """The hub closed (``None``) or failed; its last replies went to the client as far
        as the client took them."""


@implementer(IReadWriteDescriptor)
class LentSocket:
    """The reactor's view of one lent socket: readable feeds one pump, writable the other."""

    def __init__(self, path: SocketPath, sock: Socket, side: Side) -> None:
        self.path = path
        self.sock = sock
        self.side = side
        self.fd = sock.fileno()
        self.active = True
        # The hub's side: its replies are acknowledged at once (see ack_now).
        self.ack = side == "upstream"
        # Set by the pumps once both exist.
        self.source: CopyPump
        self.sink: CopyPump

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


class CopyPump:
    """One direction, src socket -> dst socket: recv_into one buffer, send from it, as socat does.

    Two copies per byte, but large reads keep the system calls few.  The pump
    holds at most one read's worth of bytes.  When dst takes no more it stops
    reading src until writable() has flushed, so the kernel stops the sender
    through TCP's window: that is the backpressure.
    """

    def __init__(self, path: SocketPath, src: LentSocket, dst: LentSocket) -> None:
        self.path = path
        self.src = src
        self.dst = dst
        self.fdset = path.fdset
        self.last = LastBytes()
        self.moved = 0
        self.ended = False
        # mmap, not bytearray: page-aligned, which this kind of CPU copies into
        # several times faster (nbd-baselines.md, observation 6); pages are
        # only touched as far as reads fill them.
        self.buffer = mmap.mmap(-1, COPY_BUFFER)
        self.view = memoryview(self.buffer)
        # Bytes read but not yet sent: view[start:end].
        self.start = 0
        self.end = 0
        src.source = self
        dst.sink = self

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def readable(self) -> None:
        # The pump holds nothing here (its source is not read while it does),
        # so the whole buffer is free.
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
                self.last.add(view[:n])
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
            self._count(moved)

    def flush(self) -> bool:
        """Send on what the pump holds; True when it holds nothing more."""
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
            self._count(moved)

    def writable(self) -> None:
        if self.flush():
            self.fdset.removeWriter(self.dst)
            if self.ended:
                self.path.source_ended(self.src.side)
            elif self.src.active:
                self.fdset.addReader(self.src)

    def close(self) -> None:
        """Release the buffer (the sockets stay with their transports)."""
        self.start = self.end = 0
        self.view.release()
        try:
            self.buffer.close()
        except BufferError:
            # A slice still referenced somewhere (a traceback being logged):
            # the mapping goes when that reference does.
            pass

    def _wait_for_dst(self) -> None:
        self.fdset.removeReader(self.src)
        self.fdset.addWriter(self.dst)

    def _count(self, moved: int) -> None:
        self.moved += moved
        if moved:
            self.path.events.moved(moved)


class SocketPath:
    """The data path of one connection while both its sockets are lent to the pumps.

    The caller takes the sockets from their transports first (they must not
    be registered with the reactor for the same descriptors meanwhile) and
    gives them back after :meth:`finish`.
    """

    def __init__(
        self, fdset: IReactorFDSet, client: Socket, upstream: Socket, events: PathEvents
    ) -> None:
        self.fdset = fdset
        self.events = events
        self.client = LentSocket(self, client, "client")
        self.upstream = LentSocket(self, upstream, "upstream")
        self.to_hub = CopyPump(self, self.client, self.upstream)
        try:
            self.from_hub = CopyPump(self, self.upstream, self.client)
        except OSError:
            self.to_hub.close()
            raise
        self.running = False

    def start(self) -> None:
        self.running = True
        self.fdset.addReader(self.client)
        self.fdset.addReader(self.upstream)

    @property
    def buffered(self) -> int:
        return self.to_hub.buffered + self.from_hub.buffered

    def moved(self) -> tuple[int, int]:
        """Bytes sent on so far: (to the hub, from the hub)."""
        return self.to_hub.moved, self.from_hub.moved

    def said_goodbye(self) -> bool:
        """Whether the last thing the client sent was NBD_CMD_DISC."""
        return self.to_hub.last.end_with_disconnect()

    def flush(self) -> None:
        """Send on what the pumps hold, as far as the peers take it right now."""
        self.to_hub.flush()
        self.from_hub.flush()

    def source_ended(self, side: Side) -> None:
        if not self.running:
            return
        if side == "client":
            if self.to_hub.buffered:
                # writable() calls back here once the hub has taken the rest.
                self.to_hub.ended = True
                self.fdset.removeReader(self.client)
                return
            self.events.client_ended(None)
        else:
            # Replies the hub sent before closing still go to the client, as
            # far as it takes them right now; it must learn of the close at once.
            self.from_hub.flush()
            self.events.upstream_ended(None)

    def failed(self, side: Side, exc: OSError) -> None:
        if not self.running:
            return
        if side == "client":
            self.events.client_ended(exc)
        else:
            self.events.upstream_ended(exc)

    def finish(self, drain_upstream: bool) -> None:
        """Stop moving bytes; the sockets can go back to their transports."""
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


def _discard_readable(sock: Socket) -> None:
    scratch = memoryview(bytearray(1 << 16))
    left = DISCARD_LIMIT
    while left > 0:
        try:
            n = sock.recv_into(scratch, 0, socket.MSG_DONTWAIT)
        except OSError:
            return
        if not n:
            return
        left -= n
