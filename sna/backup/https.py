"""Ranged HTTPS GETs on the reactor with the standard library's ssl, straight into the caller's buffer.

The ``/folder`` reader moves every byte of a disk through here, so this path
is built for CPU, the scarce resource on a backup node: Twisted's ``Agent``
over pyOpenSSL handed each 16 KiB TLS record through four protocol layers as
a new ``bytes`` and joined them at the end (0.77 CPU-s per GiB measured
against the vCenter simulator); here ``SSLSocket.recv_into`` decrypts each
record into its place in the destination buffer (about 0.5 CPU-s per GiB,
the cost of a blocking ``ssl`` loop) and nothing else touches the bytes.

:class:`RangeConnection` is one keep-alive HTTP/1.1 connection: a
non-blocking socket wrapped by :mod:`ssl`, registered with the reactor as a
file descriptor, running one request at a time.  :meth:`RangeConnection.get`
sends a ``GET`` and reads the status and headers; a body of known length
that fits the caller's buffer is read into it, any other (an error page,
chunked) is not read and the connection is closed.  Everything that goes
wrong on the connection (refused, reset, TLS, a malformed answer, no answer
within the timeout) is an :class:`HttpError`; the connection is then closed
and useless.  Statuses are the caller's to judge.

It speaks just what a datastore ``/folder`` read needs: no redirects, no
proxies, no request bodies, no chunked bodies.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from sna.backup.reactor import ClientReactor

#: The status line and headers of a response may not be longer than this.
MAX_HEAD = 64 * 1024
#: Bytes a body read waits for before it is woken (``SO_RCVLOWAT``).
LOW_WATER = 256 * 1024
#: What the TLS layer may hold of a body: one record and its overhead.
TLS_RECORD = 16 * 1024 + 512


class HttpError(Exception):
    """The connection failed or the server broke HTTP; the message says how."""


@attrs.frozen
class Response:
    """A response's status and headers; ``body`` bytes of it are in the caller's buffer."""

    status: int
    reason: str
    #: Header names in lower case; a repeated header keeps its values joined by ", ".
    headers: Mapping[str, str]
    #: Bytes of the body read into the buffer (0 when the body was not read).
    body: int


def parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """Status, reason and headers of a response head (without its blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HttpError("the response head is not text") from None
    status_line, *lines = text.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _is_number(parts[1]):
        raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def _is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


class _Wait(Exception):
    """The socket must become readable (``write=False``) or writable first."""

    def __init__(self, write: bool) -> None:
        self.write = write


def _io(call: Callable[..., int], *args: Any) -> int:
    """Run a non-blocking socket or TLS call; :class:`_Wait` when it would block."""
    try:
        return call(*args)
    except ssl.SSLWantReadError:
        raise _Wait(False) from None
    except ssl.SSLWantWriteError:
        raise _Wait(True) from None
    except BlockingIOError:
        raise _Wait(False) from None


@implementer(IReadDescriptor, IWriteDescriptor)
class RangeConnection:
    """One TLS connection to an HTTPS server, driven by the reactor (see the module docstring)."""

    def __init__(
        self,
        reactor: ClientReactor,
        sock: ssl.SSLSocket,
        where: str,
        timeout: float,
        authority: str = "",
    ) -> None:
        self._reactor = reactor
        self._fdset = reactor.fds
        self._clock = reactor.clock
        self._sock = sock
        self._fd = sock.fileno()
        self.where = where
        #: The Host header: host:port, an IPv6 address in brackets.
        self._authority = authority or where
        self._timeout = timeout
        self.closed = False
        self.busy = False
        self._step: Optional[Callable[[], None]] = None
        self._done: Optional[Deferred[Any]] = None
        self._timer: Optional[IDelayedCall] = None
        self._reading = self._writing = False
        # A request's state.
        self._out = b""
        self._head = bytearray()
        self._into: Optional[memoryview] = None
        self._response: Optional[Response] = None
        self._want = 0
        self._got = 0
        self._close_after = False
        self._lowat = 1

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        reactor: ClientReactor,
        host: str,
        port: int,
        context: ssl.SSLContext,
        timeout: float,
    ) -> Deferred[RangeConnection]:
        """Connect and finish the TLS handshake (the context verifies the server)."""
        where = f"{host}:{port}"
        authority = f"[{host}]:{port}" if ":" in host else where

        async def go() -> RangeConnection:
            address = await _resolve(reactor, host, port)
            try:
                raw = socket.socket(address[0], socket.SOCK_STREAM)
            except OSError as e:
                raise HttpError(f"cannot connect to {where}: {e}") from None
            try:
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Wrapped before connecting: SSLSocket.connect_ex sets up the TLS object.
                # An IP address is checked against the certificate's IP names (no SNI then).
                tls = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
            except (OSError, ValueError) as e:
                raw.close()
                raise HttpError(f"cannot set up TLS to {where}: {e}") from None
            try:
                code = tls.connect_ex(address[4])
            except OSError as e:
                tls.close()
                raise HttpError(f"cannot connect to {where}: {e}") from None
            if code not in (0, errno.EINPROGRESS):
                tls.close()
                raise HttpError(f"cannot connect to {where}: {errno.errorcode.get(code, code)}")
            conn = cls(reactor, tls, where, timeout, authority)
            await conn._start(conn._connect_step, "connecting")
            return conn

        return Deferred.fromCoroutine(go())

    def _connect_error(self) -> Optional[HttpError]:
        try:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return None
        if not code:
            return None
        return HttpError(f"cannot connect to {self.where}: {errno.errorcode.get(code, code)}")

    def _connect_step(self) -> None:
        # Writable once the connect finished (or failed).
        error = self._connect_error()
        if error is not None:
            raise error
        if not self._connected():
            raise _Wait(True)
        self._step = self._handshake_step
        self._handshake_step()

    def _connected(self) -> bool:
        try:
            self._sock.getpeername()
        except OSError:
            return False
        return True

    def _handshake_step(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            raise _Wait(False) from None
        except ssl.SSLWantWriteError:
            raise _Wait(True) from None
        except ssl.SSLCertVerificationError as e:
            raise HttpError(f"TLS with {self.where}: {e}") from None
        except (ssl.SSLError, OSError) as e:
            raise HttpError(f"TLS handshake with {self.where} failed: {e}") from None
        self._finish(self)

    # -- requests ----------------------------------------------------------------------------

    def get(self, target: str, headers: Mapping[str, str], into: memoryview) -> Deferred[Response]:
        """``GET target``; the body goes into ``into`` when it has a length that fits."""
        if self.closed or self.busy:
            raise HttpError(f"connection to {self.where} is {'closed' if self.closed else 'busy'}")
        lines = [f"GET {target} HTTP/1.1", f"Host: {self._authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._head = bytearray()
        self._into = into
        self._response = None
        return self._start(self._send_step, f"on GET {target.partition('?')[0]}")

    def _send_step(self) -> None:
        while self._out:
            sent = _io(self._sock.send, self._out)
            self._out = self._out[sent:]
        self._step = self._head_step
        self._head_step()

    def _head_step(self) -> None:
        chunk = bytearray(16384)
        while True:
            n = _io(self._sock.recv_into, chunk)
            if n == 0:
                raise HttpError(f"{self.where} closed the connection before answering")
            start = max(0, len(self._head) - 3)
            self._head += chunk[:n]
            end = self._head.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(self._head) > MAX_HEAD:
                raise HttpError(f"{self.where} sent a response head over {MAX_HEAD} bytes")
        status, reason, headers = parse_head(bytes(self._head[:end]))
        rest = self._head[end + 4 :]
        self._head = bytearray()
        into = self._into
        assert into is not None
        length = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked or not _is_number(length) or int(length) > len(into) or len(rest) > int(length):
            # Not a body we read (an error page, chunked): the connection cannot be reused.
            self._finish(Response(status, reason, headers, 0), close=True)
            return
        self._want = int(length)
        into[: len(rest)] = rest
        self._got = len(rest)
        self._response = Response(status, reason, headers, self._want)
        self._close_after = "close" in headers.get("connection", "").lower()
        self._step = self._body_step
        self._body_step()

    def _body_step(self) -> None:
        into = self._into
        assert into is not None
        while self._got < self._want:
            want = self._want - self._got
            try:
                n = _io(self._sock.recv_into, into[self._got :], want)
            except _Wait:
                self._low_water(want)
                raise
            if n == 0:
                raise HttpError(
                    f"{self.where} closed the connection after {self._got} of {self._want} "
                    "body bytes"
                )
            self._got += n
        response = self._response
        assert response is not None
        # More than the body (the TLS layer holds bytes nobody asked for): not reusable.
        self._finish(response, close=self._close_after or self._sock.pending() > 0)

    def _low_water(self, remaining: int) -> None:
        """Be woken only once a good part of what is left has arrived.

        Waking per TLS record (16 KiB) costs more CPU than the bytes; with
        ``SO_RCVLOWAT`` the kernel reports the socket readable once
        :data:`LOW_WATER` bytes wait.  Near the end of the body less is asked
        for: the TLS layer may hold up to one record of it already.
        """
        self._set_low_water(max(1, min(LOW_WATER, remaining - TLS_RECORD)))

    def _set_low_water(self, mark: int) -> None:
        if mark != self._lowat:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self._lowat = mark

    def _idle_step(self) -> None:
        # Idle, so anything readable is the server closing (or misbehaving): done with it.
        probe = bytearray(1)
        try:
            _io(self._sock.recv_into, probe)
        except _Wait:
            raise
        except (ssl.SSLError, OSError):
            pass
        self.close()

    # -- the engine ----------------------------------------------------------------------------

    def _start(self, step: Callable[[], None], what: str) -> Deferred[Any]:
        self.busy = True
        self._step = step
        done: Deferred[Any] = Deferred(lambda d: self._fail(CancelledError(), cancelled=True))
        self._done = done
        self._timer = self._clock.callLater(
            self._timeout,
            lambda: self._fail(
                HttpError(f"{self.where}: no progress {what} for {self._timeout:g} s")
            ),
        )
        self._run()
        return done

    def _run(self) -> None:
        step = self._step
        if step is None:
            return
        try:
            step()
        except _Wait as wait:
            if self._timer is not None and self._timer.active() and self.busy:
                self._timer.reset(self._timeout)
            self._watch(read=not wait.write, write=wait.write)
        except HttpError as e:
            self._fail(e)
        except (ssl.SSLError, OSError) as e:
            self._fail(HttpError(f"connection to {self.where} failed: {e}"))
        except Exception as e:  # a bug here must fail the request, not the reactor
            self._fail(HttpError(f"connection to {self.where}: {type(e).__name__}: {e}"))

    def _watch(self, read: bool, write: bool) -> None:
        if self.closed:
            return
        if read != self._reading:
            (self._fdset.addReader if read else self._fdset.removeReader)(self)
            self._reading = read
        if write != self._writing:
            (self._fdset.addWriter if write else self._fdset.removeWriter)(self)
            self._writing = write

    def _finish(self, result: Any, close: bool = False) -> None:
        done, self._done = self._done, None
        self._stop_timer()
        self.busy = False
        self._into = None
        if close:
            self.close()
        elif not self.closed:
            self._set_low_water(1)
            # Idle: watch for the server closing, so the next request does not find out.
            self._step = self._idle_step
            self._watch(read=True, write=False)
        if done is not None:
            done.callback(result)

    def _fail(self, error: Exception, cancelled: bool = False) -> None:
        done, self._done = self._done, None
        self.close()
        if done is not None and not cancelled:
            done.errback(Failure(error))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        """Drop the connection (a request in progress fails)."""
        if self.closed:
            return
        self._step = None
        self._into = None
        self._stop_timer()
        self._watch(read=False, write=False)
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        done, self._done = self._done, None
        if done is not None:
            done.errback(Failure(HttpError(f"connection to {self.where} closed")))

    # -- IReadDescriptor, IWriteDescriptor -----------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        self._run()

    def doWrite(self) -> None:
        self._run()

    def connectionLost(self, reason: Failure) -> None:
        # A refused or unreachable connect shows as an error event, never as writable.
        error = self._connect_error() if self._step == self._connect_step else None
        self._fail(
            error or HttpError(f"connection to {self.where} lost: {reason.getErrorMessage()}")
        )

    def logPrefix(self) -> str:
        return "https-range"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _resolve(reactor: ClientReactor, host: str, port: int) -> tuple[Any, ...]:
    """The first address of ``host`` (IP literals without a lookup; names on the job's
    worker thread)."""
    if _is_ip(host):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return (family, socket.SOCK_STREAM, 0, "", (host, port))
    try:
        found = await deferToThreadPool(
            reactor.threads, reactor.pool, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as e:
        raise HttpError(f"cannot resolve {host}: {e}") from None
    if not found:
        raise HttpError(f"cannot resolve {host}: no address")
    return tuple(found[0])
