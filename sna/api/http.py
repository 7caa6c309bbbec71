"""HTTP plumbing under the routes: connection limits, requests and JSON replies.

Everything a client can send before a route sees it is bounded here, and
each refusal is a JSON error that names the limit:

- connections: at most :attr:`ConnectionLimits.max_client_connections` from
  one client and :attr:`ConnectionLimits.max_connections` in all; when a
  limit is reached the client's (or anyone's) longest-idle connection is
  closed to make room, and only when every connection is answering a request
  is the new one refused (503 ``too_many_connections``);
- time: a request must arrive whole (line, headers, body) within
  :attr:`ConnectionLimits.request_timeout` of its first byte, however slowly
  the bytes trickle in (408 ``request_timeout``);
- sizes: :data:`MAX_REQUEST_LINE` (414), :data:`MAX_HEADER_BYTES` and
  :data:`MAX_HEADERS` (431), :data:`MAX_BODY` (413, also as soon as a chunk
  declares more than is left of it);
- framing: a bad request line, header, ``Content-Length`` or chunked body is
  a 400 naming it, never Twisted's bare ``400 Bad Request`` or a silent close;
  lines end in CR LF, and a bare LF is such a 400 the moment it arrives;
- methods are case-sensitive: one with a lower-case letter is none of sna's (501);
- JSON bodies: :data:`MAX_JSON_DEPTH` levels of nesting, integers within
  64 bits, finite floats, UTF-8.

This module knows nothing of the routes; :mod:`sna.api.app` raises
:class:`ApiError` and this module turns it into bytes.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import re
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

import attrs
import werkzeug.routing
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import provider

log = Logger()

#: The largest request body read; anything longer answers 413.
MAX_BODY = 1024 * 1024
#: The longest request line (``METHOD target HTTP/1.1``), in bytes; longer answers 414.
#: A percent-encoded inventory path of any real VM fits many times over.
MAX_REQUEST_LINE = 16 * 1024
#: Most bytes of header lines in one request (the request line not counted); more
#: answers 431.  The largest header a caller of ours sends is a vCenter password.
MAX_HEADER_BYTES = 16 * 1024
#: Most header lines in one request; more answers 431.
MAX_HEADERS = 100
#: Deepest nesting of arrays and objects in a JSON body; deeper answers 400.
#: The deepest body a caller sends (``stored_vm_info`` of ``vm-spec-changes``, a VM as
#: ``/discover`` answers) nests a handful of levels.
MAX_JSON_DEPTH = 32
#: JSON integers must fit SQLite's INTEGER (64 bits, signed); floats must be finite.
MAX_JSON_INT = 2**63 - 1
#: Seconds a connection refused for what it sent is still read (and what it
#: sends thrown away) after the answer, so that closing it does not reset
#: the connection and lose the answer before the client reads it.
LINGER_SECONDS = 2.0
_FIELD_TEXT = 200


@attrs.frozen
class ConnectionLimits:
    """The limits an operator may change (``twistd sna --max-connections`` ...)."""

    #: Open API connections in all: well under the 1024 descriptors systemd
    #: allows a service by default, which the jobs' pipes, logs and relays share.
    max_connections: int = 256
    #: Open API connections from one client address (an IPv6 client: its /64).
    #: The SHA, through the tunnel, is one client (127.0.0.1) with the legacy
    #: client's pushes and local monitoring; idle connections are closed to
    #: make room, so this only refuses when that many requests are in progress.
    max_client_connections: int = 128
    #: Seconds from the first byte of a request until the last byte of its body.
    request_timeout: float = 30.0
    #: Seconds a connection may stay open without sending a byte (keep-alive).
    idle_timeout: float = 60.0


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine ``code``, human ``message``."""

    def __init__(
        self, status: int, code: str, message: str, field: Optional[str] = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-cache")
    return _json_bytes(body)


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# -- the access log ----------------------------------------------------------


def _escape_table() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in itertools.chain(range(0x20), range(0x7F, 0x100))}
    table[ord("\\")] = "\\\\"
    table[ord('"')] = '\\"'
    return table


_ESCAPES = _escape_table()


def _text(value: bytes | str | None) -> str:
    """``value`` for a log line: printable ASCII as it is, every other byte ``\\xNN``.

    A request cannot start a new line, move the cursor or colour a
    terminal through the access log: CR, LF, ESC and every other control
    byte, and every non-ASCII byte, are escaped, as are ``\\`` and ``"``.
    """
    if value is None:
        return "-"
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace")
    return value.decode("latin-1").translate(_ESCAPES)


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: IRequest) -> str:
    """The combined log format, without query strings.

    The Go SNA's callers put vCenter passwords in query strings
    (``cbt-status``, ``power-state``); an access log must not keep them.
    """
    peer = request.getClientAddress()
    ip = getattr(peer, "host", "-")
    path, _, query = request.uri.partition(b"?")
    uri = _text(path) + ("?..." if query else "")
    return '"{ip}" - - {ts} "{method} {uri} {proto}" {code} {length} "{ref}" "{agent}"'.format(
        ip=_text(ip),
        ts=timestamp,
        method=_text(request.method),
        uri=uri,
        proto=_text(getattr(request, "clientproto", None)),
        code=getattr(request, "code", 0),
        length=getattr(request, "sentLength", 0) or "-",
        ref=_text(request.getHeader(b"referer")),
        agent=_text(request.getHeader(b"user-agent")),
    )


# -- connections ---------------------------------------------------------------


def client_key(address: IAddress) -> str:
    """Whose connection this is, for the per-client limit.

    An IPv4 address, or an IPv6 client's /64 (one host usually holds a whole
    /64); a UNIX socket's clients are all ``local``.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "local"
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionTable:
    """The open API connections, by client, and which of them are idle.

    A connection is idle while no request of it is being answered: waiting
    for a request, or receiving one.  The idle are kept oldest first (by when
    they became idle), so a limit closes the connection that has been
    waiting longest; a connection being answered is never closed for room.
    """

    #: Seconds between two log lines about limits being reached.
    REPORT_EVERY = 60.0

    def __init__(self, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self._clock = clock
        self._open: dict[ApiChannel, str] = {}
        self._per_client: dict[str, int] = {}
        self._idle: dict[ApiChannel, None] = {}
        self._evicted = 0
        self._refused = 0
        self._next_report = 0.0

    def count(self, client: Optional[str] = None) -> int:
        return len(self._open) if client is None else self._per_client.get(client, 0)

    def admit(self, channel: ApiChannel) -> bool:
        """Count ``channel`` in, closing an idle one for room if needed; False: refuse it."""
        client = channel.client
        if self.count(client) >= self.limits.max_client_connections and not self._evict(client):
            self._report(refused=client)
            return False
        if self.count() >= self.limits.max_connections and not self._evict(None):
            self._report(refused=client)
            return False
        self._open[channel] = client
        self._per_client[client] = self.count(client) + 1
        self._idle[channel] = None
        return True

    def busy(self, channel: ApiChannel) -> None:
        self._idle.pop(channel, None)

    def idle(self, channel: ApiChannel) -> None:
        if channel in self._open:
            self._idle.pop(channel, None)
            self._idle[channel] = None

    def closed(self, channel: ApiChannel) -> None:
        client = self._open.pop(channel, None)
        self._idle.pop(channel, None)
        if client is not None:
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]

    def _evict(self, client: Optional[str]) -> bool:
        victim = next(
            (c for c in self._idle if client is None or self._open[c] == client),
            None,
        )
        if victim is None:
            return False
        owner = self._open[victim]
        # Its descriptor closes a moment later; its place is free now.
        self.closed(victim)
        victim.evict()
        self._report(evicted=owner)
        return True

    def _report(self, evicted: Optional[str] = None, refused: Optional[str] = None) -> None:
        self._evicted += evicted is not None
        self._refused += refused is not None
        now = self._clock.seconds()
        if now < self._next_report:
            return
        self._next_report = now + self.REPORT_EVERY
        log.warn(
            "API connection limits reached ({per_client} per client, {total} in all; "
            "{open} open): {evicted} idle connections closed and {refused} refused "
            "since the last report, the latest from {client}",
            per_client=self.limits.max_client_connections,
            total=self.limits.max_connections,
            open=len(self._open),
            evicted=self._evicted,
            refused=self._refused,
            client=evicted or refused,
        )
        self._evicted = self._refused = 0


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Bytes a request target must not hold raw: controls, space, DEL, non-ASCII.
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class ApiChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with sna's limits, and JSON for every refusal.

    The channel reads the request line and headers itself (through
    :class:`HTTPChannel`); these overrides check each piece first and name
    what is wrong, where Twisted would answer a bare ``400 Bad Request`` or
    close the connection without a word.
    """

    # Twisted's own limits sit just above ours, so ours always answer first.
    MAX_LENGTH = max(MAX_REQUEST_LINE, MAX_HEADER_BYTES)
    maxHeaders = MAX_HEADERS + 1
    totalHeadersSize = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1

    site: ApiSite
    client = "-"
    _admitted = False
    _closing = False
    _busy = False
    _awaiting_request_line = True
    _header_bytes = 0
    _header_lines = 0
    _framing: Optional[bytes] = None
    _deadline: Optional[IDelayedCall] = None
    _linger: Optional[IDelayedCall] = None
    _context = "request"

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.client = client_key(self.transport.getPeer())  # type: ignore[union-attr]
        self._admitted = self.site.connections.admit(self)
        if not self._admitted:
            self.refuse(
                503,
                "too_many_connections",
                f"too many connections: {self.site.limits.max_client_connections} from "
                f"{self.client} or {self.site.limits.max_connections} in all, each answering "
                "a request; try again later",
                linger=False,
            )

    # -- receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._deadline is None and not self._busy and data:
            self._deadline = self.callLater(  # type: ignore[no-untyped-call]
                self.site.limits.request_timeout, self._too_slow
            )
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.line_mode and b"\n" in data and not self._busyReceiving and not self._closing:
            # Lines are split at CR LF, so the line still waiting for one (the
            # request line or a header) can only hold a bare LF: say so now
            # rather than wait for a CR LF the client will never send.
            if b"\n" in self._buffer.partition(b"\r\n")[0]:
                self._bare_lf()

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if b"\n" in line:
            self._bare_lf()
            return
        if self._awaiting_request_line:
            if line:
                self._context = "request line"
                if not self._request_line_ok(line):
                    return
                self._awaiting_request_line = False
        else:
            self._context = "headers"
            self._header_bytes += len(line)
            self._header_lines += bool(line)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.refuse(
                    431,
                    "headers_too_large",
                    f"the request headers are larger than {MAX_HEADER_BYTES} bytes",
                )
                return
            if self._header_lines > MAX_HEADERS:
                self.refuse(
                    431, "headers_too_large", f"the request has more than {MAX_HEADERS} headers"
                )
                return
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._awaiting_request_line:
            self._request_line_too_long()
        else:
            self.refuse(
                431,
                "headers_too_large",
                f"a request header is longer than {MAX_HEADER_BYTES} bytes",
            )

    def _request_line_too_long(self) -> None:
        self.refuse(
            414,
            "request_line_too_long",
            f"the request line is longer than {MAX_REQUEST_LINE} bytes",
        )

    def _bare_lf(self) -> None:
        # RFC 9112 2.2 lets a server take a bare LF as a line end; Twisted's
        # parser does not (nor does its chunked decoder), and a server that
        # splits lines differently from a proxy in front of it is how requests
        # are smuggled.  So it is refused, at once.
        if self._awaiting_request_line:
            self.refuse(
                400, "bad_request_line", "the request line ends in a bare LF; lines end in CR LF"
            )
        else:
            self.refuse(400, "bad_header", "a header line ends in a bare LF; lines end in CR LF")

    def _request_line_ok(self, line: bytes) -> bool:
        if len(line) > MAX_REQUEST_LINE:
            self._request_line_too_long()
            return False
        parts = line.split(b" ")
        if len(parts) != 3 or not all(parts):
            self.refuse(
                400,
                "bad_request_line",
                "the request line must be METHOD, a path and HTTP/1.1, separated by one space",
            )
            return False
        method, target, version = parts
        if version not in _VERSIONS:
            if version.startswith(b"HTTP/"):
                self.refuse(
                    505,
                    "http_version_not_supported",
                    f"{_text(version[:20])} is not supported; use HTTP/1.1",
                )
            else:
                self.refuse(400, "bad_request_line", "the request line does not end in HTTP/1.1")
            return False
        if not _TOKEN.fullmatch(method):
            self.refuse(400, "bad_request_line", "the request method is not a token")
            return False
        if _NOT_IN_TARGET.search(target):
            self.refuse(
                400,
                "bad_request_line",
                "the request target has a control, space or non-ASCII byte (percent-encode them)",
            )
            return False
        return True

    def headerReceived(self, line: bytes) -> bool:
        if self._closing:
            return False
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Not echoed: a broken "Authorization Bearer ..." would put the token in the log.
            self.refuse(
                400,
                "bad_header",
                "a header line is not 'Name: value' (a token, a colon, the value)",
            )
            return False
        value = value.strip(b" \t")
        shown = _text(name[:40])
        if b"\0" in value or b"\r" in value or b"\n" in value:
            self.refuse(400, "bad_header", f"header {shown} has a NUL, CR or LF in its value")
            return False
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit():
                self.refuse(
                    400,
                    "bad_content_length",
                    f"Content-Length must be a number of bytes, not '{_text(value[:40])}'",
                )
                return False
            if len(value) > 20 or int(value) > MAX_BODY:
                self.refuse(413, "body_too_large", f"request body is larger than {MAX_BODY} bytes")
                return False
        elif lowered == b"transfer-encoding":
            coding = value.lower()
            if coding == b"identity":
                return bool(super().headerReceived(line))  # type: ignore[no-untyped-call]
            if coding != b"chunked":
                self.refuse(
                    501,
                    "unsupported_transfer_encoding",
                    f"Transfer-Encoding {_text(value[:40])} is not supported; only chunked is",
                )
                return False
        if lowered in (b"content-length", b"transfer-encoding"):
            if self._framing is not None:
                self.refuse(
                    400,
                    "bad_framing",
                    "a request must have one Content-Length or one Transfer-Encoding: "
                    f"chunked, not {_text(self._framing)} and {shown}",
                )
                return False
            self._framing = lowered
        return bool(super().headerReceived(line))  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._busy:
            self._context = "chunked body" if self._framing == b"transfer-encoding" else "body"
        super().rawDataReceived(data)
        if not self._busy and not self._closing and self._framing == b"transfer-encoding":
            self._check_declared_chunk()

    def _check_declared_chunk(self) -> None:
        """Refuse a chunked body as soon as a chunk-size line declares more than
        is left of :data:`MAX_BODY`, before any of that chunk's bytes arrive."""
        decoder = self._transferDecoder
        # While a chunk is being read, the decoder's ``length`` is what is still
        # to come of it (Twisted's _ChunkedTransferDecoder).
        if decoder is None or getattr(decoder, "state", None) != "BODY":
            return
        request = self.requests[-1]
        if isinstance(request, ApiRequest) and request.declares_too_much(decoder.length):
            self.refuse(413, "body_too_large", f"request body is larger than {MAX_BODY} bytes")

    def allContentReceived(self) -> None:
        if self._closing:
            return
        self._cancel_deadline()
        self._busy = True
        self._awaiting_request_line = True
        self._header_bytes = self._header_lines = 0
        self._framing = None
        self._context = "request"
        self.site.connections.busy(self)
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Request) -> None:
        self._busy = False
        if not self._closing:
            self.site.connections.idle(self)
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # What Twisted finds wrong that the checks above let through
        # (a malformed chunked body, mostly): answered in JSON, with where.
        self.refuse(400, "bad_request", f"the request is malformed HTTP (in its {self._context})")

    # -- time ----------------------------------------------------------------

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(
            408,
            "request_timeout",
            f"the request did not arrive in full within {self.site.limits.request_timeout:g} s "
            "of its first byte",
        )

    def timeoutConnection(self) -> None:
        if self._deadline is not None:
            self.refuse(
                408,
                "request_timeout",
                f"no byte of the request for {self.site.limits.idle_timeout:g} s",
            )
        else:
            super().timeoutConnection()  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    # -- ending --------------------------------------------------------------

    def evict(self) -> None:
        """Close this idle connection to make room for another (the table forgot it)."""
        if self._deadline is not None:
            # Part of a request has arrived: say why it will not be answered.
            self.refuse(
                503,
                "too_many_connections",
                "connection closed to make room for others: too many connections from "
                f"{self.client} or in all; send the request again",
                linger=False,
            )
        else:
            self._closing = True
            self._cancel_deadline()
            self.setTimeout(None)  # type: ignore[no-untyped-call]
            self.loseConnection()  # type: ignore[no-untyped-call]

    def refuse(self, status: int, code: str, message: str, linger: bool = True) -> None:
        """Answer ``status`` with a JSON error and close, whatever was received."""
        if self._closing:
            return
        self._closing = True
        self._cancel_deadline()
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.site.connections.busy(self)
        body = _json_bytes({"error": code, "message": message})
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            "Cache-Control: no-cache\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        transport = self.transport
        assert transport is not None
        transport.write(head + body)
        log.info(
            "refused a request from {client}: {status} {code}: {message}",
            client=self.client,
            status=status,
            code=code,
            message=message,
        )
        if (
            linger
            and ITCPTransport.providedBy(transport)
            and not ISSLTransport.providedBy(transport)
        ):
            # Close our side only and keep reading until the client closes
            # its side (or LINGER_SECONDS pass): data still arriving after a
            # full close would reset the connection and could lose the answer.
            transport.loseWriteConnection()
            self._linger = self.callLater(  # type: ignore[no-untyped-call]
                LINGER_SECONDS, transport.abortConnection
            )
        else:
            self.loseConnection()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._closing = True
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self._admitted:
            self.site.connections.closed(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class ApiRequest(Request):
    """A request that keeps at most ``MAX_BODY`` bytes of its body and answers
    in JSON what Twisted and Klein would answer in HTML.

    A declared ``Content-Length`` over the limit is refused by the channel
    before any of the body arrives; a chunked body that grows over it, or
    whose chunk-size line declares more than is left, ends the connection
    with 413 as soon as it does.
    """

    max_body = MAX_BODY
    body_too_large = False
    _received = 0

    def declares_too_much(self, pending: int) -> bool:
        """Whether ``pending`` more bytes, declared but not received, pass the limit."""
        if self._received + pending > self.max_body:
            self.body_too_large = True
        return self.body_too_large

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body and not self.body_too_large:
            self.body_too_large = True
            refuse = getattr(self.channel, "refuse", None)
            if refuse is not None:
                refuse(413, "body_too_large", f"request body is larger than {MAX_BODY} bytes")
        if not self.body_too_large:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        problem = self._problem()
        if problem is None:
            super().process()  # type: ignore[no-untyped-call]
            return
        self.site = self.channel.site  # type: ignore[attr-defined]
        status, code, message = problem
        self.write(json_response(self, {"error": code, "message": message}, status))  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]

    def _problem(self) -> Optional[tuple[int, str, str]]:
        """What makes this request unanswerable by any route, if anything."""
        if self.method != self.method.upper():
            # werkzeug upper-cases the method before matching, which would
            # serve "get" as GET; RFC 9110 9.1: methods are case-sensitive.
            return (
                501,
                "method_not_implemented",
                f"{_text(self.method[:40])} is not a method sna implements; methods are "
                "case-sensitive and all of sna's are upper-case",
            )
        if self.path == b"*":
            method = _text(self.method)
            return 405, "method_not_allowed", f"{method} is not allowed on *"
        try:
            for segment in self.path.split(b"/"):
                unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            return 400, "invalid_path", "the path is not UTF-8 once percent-decoded"
        try:
            self.getRequestHostname().decode("utf-8")  # type: ignore[no-untyped-call]
        except UnicodeDecodeError:
            return 400, "invalid_host", "the Host header is not UTF-8"
        return None

    def processingFailed(self, reason: Failure) -> Failure:
        log.failure("unhandled error answering {path}", reason, path=_text(self.path))
        if self.startedWriting:
            self.channel.loseConnection()
        else:
            body = {"error": "internal_error", "message": "internal error; see the sna log"}
            self.write(json_response(self, body, 500))  # type: ignore[no-untyped-call]
            self.finish()  # type: ignore[no-untyped-call]
        return reason


class ApiSite(Site):
    """The API's site: :class:`ApiChannel` connections of :class:`ApiRequest`\\ s."""

    protocol = ApiChannel  # type: ignore[assignment]
    displayTracebacks = False
    # Factory.doStart and doStop log "Starting factory <ApiSite object at 0x...>";
    # the port's own "ApiSite starting on 8081" line says it already.
    noisy = False

    def __init__(
        self,
        resource: IResource,
        limits: ConnectionLimits = ConnectionLimits(),
        reactor: Optional[IReactorTime] = None,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource,
            ApiRequest,
            logFormatter=access_log_line,
            timeout=limits.idle_timeout,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.limits = limits
        self.connections = ConnectionTable(limits, self.reactor)


def make_site(
    resource: IResource,
    limits: ConnectionLimits = ConnectionLimits(),
    reactor: Optional[IReactorTime] = None,
) -> ApiSite:
    return ApiSite(resource, limits, reactor)


class PathConverter(werkzeug.routing.PathConverter):
    """``<path:...>`` that takes every character, a line feed too.

    werkzeug's matches with ``.``, which stops at a newline, so a ``%0a`` in a
    VM path took no route (404) where the route's own check names the field
    and the character (400).
    """

    regex = r"[^/][\s\S]*?"


# -- JSON bodies ---------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@attrs.frozen
class _OutOfRange:
    """A JSON number no field can hold; refused, with its place, once the body is parsed."""

    text: str


def _integer(text: str) -> int | _OutOfRange:
    # More than 19 digits cannot be within 64 bits; int() of 4300 would raise.
    if len(text.lstrip("-")) > 19:
        return _OutOfRange(text)
    value = int(text)
    return value if -MAX_JSON_INT <= value <= MAX_JSON_INT else _OutOfRange(text)


def _float(text: str) -> float | _OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, found without parsing it.

    ``json.loads`` recurses once per level and would hit Python's recursion
    limit (a 500) on a body a thousand levels deep; this does not recurse.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def _out_of_range(value: Any, where: str) -> Optional[tuple[str, _OutOfRange]]:
    """The first number out of range in ``value`` and where it is (``a.b[2].c``)."""
    if isinstance(value, _OutOfRange):
        return where, value
    if isinstance(value, dict):
        items: Any = ((f"{where}.{k}" if where else k, v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for place, item in items:
        found = _out_of_range(item, place)
        if found is not None:
            return found
    return None


def read_json_object(request: IRequest) -> dict[str, Any]:
    """The request body as a JSON object, or an :class:`ApiError` saying why not."""
    assert request.content is not None
    raw = request.content.read(MAX_BODY + 1)
    if getattr(request, "body_too_large", False) or len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body is larger than {MAX_BODY} bytes")
    content_type = request.getHeader(b"content-type")
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != b"application/json" and not media.endswith(b"+json"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"request body must be application/json, not {_text(media[:100])}",
            )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not UTF-8") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ApiError(
            400,
            "json_too_deep",
            f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
        )
    try:
        body = json.loads(
            text, parse_constant=_no_constants, parse_int=_integer, parse_float=_float
        )
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    found = _out_of_range(body, "")
    if found is not None:
        where, number = found
        shown = number.text if len(number.text) <= 40 else number.text[:20] + "..."
        raise ApiError(
            400,
            "invalid_request",
            f"{where[:_FIELD_TEXT]} is out of range ({shown}): integers must be within "
            f"±{MAX_JSON_INT} (64 bits) and other numbers finite",
            field=where[:_FIELD_TEXT],
        )
    return body
