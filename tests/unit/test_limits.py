"""The API's limits, in memory: connections, time, sizes, framing, JSON depth and numbers.

Each test drives :class:`sna.api.http.ApiSite` through a
:class:`StringTransport` as a client would, byte for byte, and reads the
answer back with ``http.client``; time is a :class:`Clock`.
"""

from __future__ import annotations

import http.client
import io
import json
import re
from collections.abc import Iterator
from typing import Any, Optional

import attrs
import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from sna.api.http import (
    LINGER_SECONDS,
    MAX_BODY,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_JSON_DEPTH,
    MAX_REQUEST_LINE,
    ApiChannel,
    ApiSite,
    ConnectionLimits,
    access_log_line,
    client_key,
    json_depth,
    json_response,
)
from sna.api.validation import parse_progress_update
from sna.testing import result_of
from tests.unit.conftest import Harness, backup_body

# -- a client in memory -----------------------------------------------------------


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """A StringTransport that can close its writing side, as a TCP socket can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@attrs.frozen
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: Any

    @property
    def error(self) -> str:
        return str(self.body["error"])

    @property
    def message(self) -> str:
        return str(self.body["message"])


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


def parse_answer(data: bytes) -> Answer:
    """The first answer in ``data``; its body must be JSON."""
    response = http.client.HTTPResponse(_Bytes(data))  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    assert response.headers.get_content_type() == "application/json", data[:500]
    return Answer(response.status, response.headers, json.loads(body))


class Client:
    """One connection to a site, from ``host``."""

    ports = iter(range(40000, 60000))

    def __init__(self, site: ApiSite, host: str = "127.0.0.1") -> None:
        peer: Any = (
            IPv6Address("TCP", host, next(self.ports))
            if ":" in host
            else IPv4Address("TCP", host, next(self.ports))
        )
        self.transport = TCPTransport(peerAddress=peer)
        channel = site.buildProtocol(peer)
        assert isinstance(channel, ApiChannel)
        self.channel = channel
        channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: sna"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def answer(self) -> Optional[Answer]:
        data = self.transport.value()
        return parse_answer(data) if data else None

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.write_closed)

    def lost(self) -> None:
        """The peer is gone (as the reactor would say once the socket closes)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))


class Held(Resource):
    """``/hold...`` stays unanswered until the test finishes it; anything else answers at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.path.startswith(b"/hold"):
            self.held.append(request)
            return NOT_DONE_YET
        return json_response(request, {"path": request.path.decode()})


LIMITS = ConnectionLimits(
    max_connections=5, max_client_connections=3, request_timeout=30, idle_timeout=60
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def held() -> Held:
    return Held()


@pytest.fixture
def site(held: Held, clock: Clock) -> Iterator[ApiSite]:
    site = ApiSite(held, LIMITS, reactor=clock)
    site.logFile = io.StringIO()
    yield site


@pytest.fixture
def api_site(harness: Harness) -> ApiSite:
    site = ApiSite(harness.api.resource(), ConnectionLimits(), reactor=harness.clock)
    site.logFile = io.StringIO()
    return site


def exchange(site: ApiSite, raw: bytes, host: str = "127.0.0.1") -> Answer:
    """Send ``raw`` on a new connection; its answer (the connection is then gone)."""
    client = Client(site, host)
    client.send(raw)
    answer = client.answer()
    assert answer is not None, f"no answer to {raw[:100]!r}"
    client.lost()
    return answer


def refused(answer: Answer, status: int, error: str, *words: str) -> None:
    assert (answer.status, answer.error) == (status, error), answer
    for word in words:
        assert word in answer.message, answer


# -- time ------------------------------------------------------------------------


def test_a_trickle_cannot_keep_a_request_open(site: ApiSite, clock: Clock) -> None:
    """One byte a second restarts an idle timeout forever; the request deadline holds."""
    client = Client(site)
    client.send(b"GET /x HTTP/1.1\r\nX-Slow: ")
    for _ in range(100):
        if client.answer() is not None:
            break
        clock.advance(1)
        client.send(b"a")
    answer = client.answer()
    assert answer is not None, "a trickling client kept its request open for 100 s"
    refused(answer, 408, "request_timeout", "30 s")
    assert client.closing
    assert "Connection" in answer.headers and answer.headers["Connection"] == "close"


def test_a_silent_half_request_is_answered_before_closing(site: ApiSite, clock: Clock) -> None:
    client = Client(site)
    client.send(b"GET /x HTT")
    clock.advance(LIMITS.request_timeout + 1)
    answer = client.answer()
    assert answer is not None
    refused(answer, 408, "request_timeout")


def test_an_idle_keep_alive_connection_closes_without_a_word(site: ApiSite, clock: Clock) -> None:
    client = Client(site)
    client.request("GET", "/a")
    first = client.answer()
    assert first is not None and first.status == 200
    client.transport.clear()
    clock.advance(LIMITS.idle_timeout + 1)
    assert client.closing
    assert client.transport.value() == b""


def test_time_spent_answering_is_not_the_clients(site: ApiSite, held: Held, clock: Clock) -> None:
    client = Client(site)
    client.request("GET", "/hold")
    clock.advance(LIMITS.request_timeout * 10)
    assert client.answer() is None and not client.closing
    held.held[0].write(json_response(held.held[0], {"done": True}))
    held.held[0].finish()
    answer = client.answer()
    assert answer is not None and answer.body == {"done": True}


# -- connections -----------------------------------------------------------------


def test_a_client_at_its_limit_loses_its_oldest_idle_connection(site: ApiSite) -> None:
    old = [Client(site) for _ in range(LIMITS.max_client_connections)]
    old[1].request("GET", "/a")  # answered: idle again, now the newest idle
    new = Client(site)
    assert old[0].closing and not old[1].closing and not old[2].closing
    assert old[0].transport.value() == b"", "a connection that sent nothing gets no answer"
    new.request("GET", "/b")
    answer = new.answer()
    assert answer is not None and answer.status == 200
    assert site.connections.count("127.0.0.1") == LIMITS.max_client_connections


def test_an_evicted_half_request_is_told_why(site: ApiSite) -> None:
    first = Client(site)
    first.send(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    for _ in range(LIMITS.max_client_connections):
        Client(site)
    answer = first.answer()
    assert answer is not None
    refused(answer, 503, "too_many_connections", "make room")


def test_connections_answering_requests_are_never_closed_for_room(
    site: ApiSite, held: Held
) -> None:
    busy = [Client(site) for _ in range(LIMITS.max_client_connections)]
    for client in busy:
        client.request("GET", "/hold")
    late = Client(site)
    answer = late.answer()
    assert answer is not None
    refused(answer, 503, "too_many_connections", str(LIMITS.max_client_connections))
    assert late.transport.disconnecting and not late.transport.write_closed
    assert not any(client.closing for client in busy)
    # Refused, it never counted.
    late.lost()
    assert site.connections.count("127.0.0.1") == LIMITS.max_client_connections
    # Once one is answered it is idle again, and makes room.
    request = held.held[0]
    request.write(json_response(request, {}))
    request.finish()
    Client(site)
    assert busy[0].closing


def test_other_clients_are_not_held_back_by_one(site: ApiSite) -> None:
    greedy = [Client(site, "192.0.2.1") for _ in range(10)]
    assert sum(not c.closing for c in greedy) == LIMITS.max_client_connections
    other = Client(site, "192.0.2.2")
    other.request("GET", "/a")
    answer = other.answer()
    assert answer is not None and answer.status == 200


def test_the_total_limit_closes_the_longest_idle_of_anyone(site: ApiSite) -> None:
    clients = [Client(site, f"192.0.2.{i}") for i in range(1, LIMITS.max_connections + 1)]
    assert site.connections.count() == LIMITS.max_connections
    Client(site, "192.0.2.99")
    assert clients[0].closing
    assert [c.closing for c in clients[1:]] == [False] * (LIMITS.max_connections - 1)
    assert site.connections.count() == LIMITS.max_connections


def test_closed_connections_give_their_place_back(site: ApiSite) -> None:
    clients = [Client(site) for _ in range(LIMITS.max_client_connections)]
    for client in clients:
        client.lost()
    assert site.connections.count() == 0
    again = [Client(site) for _ in range(LIMITS.max_client_connections)]
    assert not any(c.closing for c in again)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1), "127.0.0.1"),
        (IPv6Address("TCP", "::1", 1), "::1"),
        (IPv6Address("TCP", "::ffff:192.0.2.7", 1), "192.0.2.7"),
        (IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1), "2001:db8:1:2::/64"),
        (IPv6Address("TCP", "2001:db8:1:2:ffff::1", 1), "2001:db8:1:2::/64"),
        (UNIXAddress(b"/run/sna.sock"), "local"),
    ],
)
def test_whose_connection_it_is(address: Any, key: str) -> None:
    assert client_key(address) == key


# -- the request line and headers ------------------------------------------------


def test_a_request_line_at_the_limit_is_read(site: ApiSite) -> None:
    path = "/" + "a" * (MAX_REQUEST_LINE - len("GET / HTTP/1.1"))
    line = f"GET {path} HTTP/1.1".encode()
    assert len(line) == MAX_REQUEST_LINE
    answer = exchange(site, line + b"\r\nHost: sna\r\n\r\n")
    assert answer.status == 200


def test_a_request_line_over_the_limit_is_414(site: ApiSite) -> None:
    line = b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n"
    refused(exchange(site, line), 414, "request_line_too_long", str(MAX_REQUEST_LINE))
    # Also while it is still arriving, with no end of line yet.
    still_coming = b"GET /" + b"a" * (MAX_REQUEST_LINE + 100)
    refused(exchange(site, still_coming), 414, "request_line_too_long")


def test_headers_over_the_limit_are_431(site: ApiSite) -> None:
    long_header = b"X-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n"
    answer = exchange(site, b"GET /a HTTP/1.1\r\n" + long_header + b"\r\n")
    refused(answer, 431, "headers_too_large", str(MAX_HEADER_BYTES))
    many_small = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 300) for i in range(60))
    answer = exchange(site, b"GET /a HTTP/1.1\r\n" + many_small + b"\r\n")
    refused(answer, 431, "headers_too_large", str(MAX_HEADER_BYTES))
    too_many = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    answer = exchange(site, b"GET /a HTTP/1.1\r\n" + too_many + b"\r\n")
    refused(answer, 431, "headers_too_large", str(MAX_HEADERS))
    just_enough = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))
    assert exchange(site, b"GET /a HTTP/1.1\r\n" + just_enough + b"\r\n").status == 200


@pytest.mark.parametrize(
    ("line", "status", "error", "word"),
    [
        (b"GET /a", 400, "bad_request_line", "METHOD"),
        (b"GET  /a HTTP/1.1", 400, "bad_request_line", "METHOD"),
        (b"GET /a HTTP/1.1 x", 400, "bad_request_line", "METHOD"),
        (b"GET /a HTTP/2.0", 505, "http_version_not_supported", "HTTP/2.0"),
        (b"PRI * HTTP/2.0", 505, "http_version_not_supported", "HTTP/1.1"),
        (b"GET /a SPDY/3", 400, "bad_request_line", "HTTP/1.1"),
        (b"G(T /a HTTP/1.1", 400, "bad_request_line", "method"),
        (b"GET /a\x1b[31m HTTP/1.1", 400, "bad_request_line", "control"),
        (b"GET /a\x7f HTTP/1.1", 400, "bad_request_line", "control"),
        (b"GET /\xc3\xa4 HTTP/1.1", 400, "bad_request_line", "percent-encode"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad_request_line", "METHOD"),
    ],
    ids=[
        "two-parts",
        "two-spaces",
        "four-parts",
        "http2",
        "h2-preface",
        "not-http",
        "method",
        "esc",
        "del",
        "raw-utf8",
        "tls-hello",
    ],
)
def test_a_bad_request_line_is_named(
    site: ApiSite, line: bytes, status: int, error: str, word: str
) -> None:
    refused(exchange(site, line + b"\r\nHost: sna\r\n\r\n"), status, error, word)


@pytest.mark.parametrize(
    ("headers", "status", "error", "word"),
    [
        (b"Host sna", 400, "bad_header", "Name: value"),
        (b"Bad Name: x", 400, "bad_header", "Name: value"),
        (b": x", 400, "bad_header", "Name: value"),
        (b"Content-Length: abc", 400, "bad_content_length", "Content-Length"),
        (b"Content-Length: -1", 400, "bad_content_length", "Content-Length"),
        (b"Content-Length: 1, 1", 400, "bad_content_length", "Content-Length"),
        (b"Content-Length: " + b"9" * 5000, 413, "body_too_large", str(MAX_BODY)),
        (b"Content-Length: %d" % (MAX_BODY + 1), 413, "body_too_large", str(MAX_BODY)),
        (b"Content-Length: 1\r\nContent-Length: 1", 400, "bad_framing", "one Content-Length"),
        (
            b"Content-Length: 1\r\nTransfer-Encoding: chunked",
            400,
            "bad_framing",
            "Transfer-Encoding",
        ),
        (b"Transfer-Encoding: gzip", 501, "unsupported_transfer_encoding", "gzip"),
        (b"Transfer-Encoding: chunked, gzip", 501, "unsupported_transfer_encoding", "chunked"),
    ],
    ids=[
        "no-colon",
        "space-in-name",
        "no-name",
        "length-text",
        "length-negative",
        "length-list",
        "length-5000-digits",
        "length-over-body-limit",
        "two-lengths",
        "length-and-chunked",
        "gzip",
        "chunked-gzip",
    ],
)
def test_bad_headers_and_framing_are_named(
    site: ApiSite, headers: bytes, status: int, error: str, word: str
) -> None:
    raw = b"POST /a HTTP/1.1\r\nHost: sna\r\n" + headers + b"\r\n\r\n"
    refused(exchange(site, raw), status, error, word)


def test_a_broken_header_is_not_echoed(site: ApiSite) -> None:
    """A missing colon must not put a token into the answer or the log."""
    with capturedLogs() as logged:
        answer = exchange(site, b"GET /a HTTP/1.1\r\nAuthorization Bearer s3cret\r\n\r\n")
    refused(answer, 400, "bad_header", "Name: value")
    assert "s3cret" not in json.dumps(answer.body)
    assert not any("s3cret" in repr(event) for event in logged)


def test_a_malformed_chunked_body_is_named(site: ApiSite) -> None:
    raw = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    refused(exchange(site, raw), 400, "bad_request", "chunked body")


def test_a_chunked_body_over_the_limit_is_cut_short(site: ApiSite, held: Held) -> None:
    client = Client(site)
    client.send(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    for _ in range(MAX_BODY // len(chunk) + 2):
        client.send(chunk)
    answer = client.answer()
    assert answer is not None
    refused(answer, 413, "body_too_large", str(MAX_BODY))
    client.send(chunk + b"0\r\n\r\n")
    assert not held.held
    assert client.transport.value().count(b"HTTP/1.1") == 1


def test_a_refused_connection_lingers_then_goes(site: ApiSite, clock: Clock) -> None:
    client = Client(site)
    client.send(b"GET /a HTTP/9.9\r\n\r\n")
    assert client.transport.write_closed and not client.transport.disconnecting
    # What still arrives is read and thrown away.
    client.send(b"more bytes that nobody will parse\r\n\r\n")
    assert client.transport.value().count(b"HTTP/1.1 ") == 1
    clock.advance(LINGER_SECONDS)
    assert client.transport.disconnected


def test_every_refusal_is_logged_in_one_line(site: ApiSite) -> None:
    with capturedLogs() as events:
        exchange(site, b"GET /a HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    mine = [e for e in events if e.get("code") == "bad_content_length"]
    assert len(mine) == 1 and mine[0]["log_level"] == LogLevel.info
    assert not any("log_failure" in e for e in events)


# -- what Twisted and Klein would answer in HTML ------------------------------------


def test_invalid_utf8_in_the_path_is_json(api_site: ApiSite) -> None:
    for path in (
        b"/api/v1/status/%ff",
        b"/api/v1/vms/%c3/cbt-status",
        b"/api/v1/vm/%80/power-state",
    ):
        answer = exchange(api_site, b"GET " + path + b" HTTP/1.1\r\nHost: sna\r\n\r\n")
        refused(answer, 400, "invalid_path", "UTF-8")


def test_a_host_that_is_not_utf8_is_json(api_site: ApiSite) -> None:
    answer = exchange(api_site, b"GET /api/v1/health HTTP/1.1\r\nHost: \xff\r\n\r\n")
    refused(answer, 400, "invalid_host", "Host")


@pytest.mark.parametrize("method", [b"OPTIONS", b"GET", b"POST"])
def test_the_asterisk_target_is_json(api_site: ApiSite, method: bytes) -> None:
    answer = exchange(api_site, method + b" * HTTP/1.1\r\nHost: sna\r\n\r\n")
    refused(answer, 405, "method_not_allowed", "*")


def test_a_multipart_body_is_not_parsed_but_refused(api_site: ApiSite, harness: Harness) -> None:
    form = b'--zz\r\nContent-Disposition: form-data; name="job_id"\r\n\r\nx\r\n--zz--\r\n'
    broken = b"--zz\r\nnonsense"
    for body in (form, broken):
        client = Client(api_site)
        client.request(
            "POST",
            "/api/v1/backup/start",
            body,
            Content_Type="multipart/form-data; boundary=zz",
        )
        answer = client.answer()
        assert answer is not None
        refused(answer, 415, "unsupported_media_type", "multipart/form-data")
    assert harness.manager.jobs() == []


def test_an_error_outside_the_routes_is_json(clock: Clock) -> None:
    class Broken(Resource):
        def getChildWithDefault(self, path: bytes, request: Any) -> Any:
            raise RuntimeError("boom")

    site = ApiSite(Broken(), LIMITS, reactor=clock)
    answer = exchange(site, b"GET /x HTTP/1.1\r\nHost: sna\r\n\r\n")
    refused(answer, 500, "internal_error")
    assert "boom" not in json.dumps(answer.body)


# -- the access log ----------------------------------------------------------------


@attrs.define
class LoggedRequest:
    uri: bytes
    method: bytes = b"GET"
    clientproto: bytes = b"HTTP/1.1"
    code: int = 200
    sentLength: int = 10
    headers: dict[bytes, bytes] = attrs.Factory(dict)

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1)

    def getHeader(self, name: bytes) -> Optional[bytes]:
        return self.headers.get(name)


def test_the_access_log_escapes_what_could_forge_or_colour_a_line() -> None:
    hostile = b'\x1b[31mred\r\nforged 200\x7f\xc3\xa4"\\'
    request = LoggedRequest(
        uri=b"/api/v1/status/" + hostile + b"?password=secret",
        headers={b"user-agent": hostile, b"referer": hostile},
    )
    line = access_log_line("[ts]", request)  # type: ignore[arg-type]
    assert all(0x20 <= ord(c) < 0x7F for c in line), line
    assert '\\x1b[31mred\\x0d\\x0aforged 200\\x7f\\xc3\\xa4\\"\\\\' in line
    # Four quoted fields (ip, request, referer, agent), whatever the request held.
    assert len(re.findall(r'"((?:[^"\\]|\\.)*)"', line)) == 4, line
    assert "secret" not in line and "?..." in line


def test_the_access_log_of_a_real_request_is_escaped(api_site: ApiSite) -> None:
    exchange(api_site, b"GET /api/v1/health HTTP/1.1\r\nUser-Agent: a\x1bb\r\n\r\n")
    log = api_site._logFile
    assert isinstance(log, io.StringIO)
    assert "a\\x1bb" in log.getvalue() and "\x1b" not in log.getvalue()


# -- JSON depth --------------------------------------------------------------------

BODY_ROUTES = [
    ("POST", "/api/v1/backup/start"),
    ("POST", "/api/v1/progress/backup-pgtest1-1760099954/update"),
    ("PUT", "/api/v1/config"),
    ("POST", "/api/v1/discover"),
    ("POST", "/api/v1/vms/DC1/vm/x/enable-cbt"),
    ("POST", "/api/v1/vm-spec-changes"),
    ("POST", "/api/v1/vm/vm-42/power-off"),
    ("POST", "/api/v1/vm/vm-42/power-on"),
    ("POST", "/api/v1/cleanup"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("shape", ["array", "object", "in-a-field"])
def test_json_nested_a_thousand_deep_is_400_on_every_body_route(
    harness: Harness, method: str, path: str, shape: str
) -> None:
    deep = {
        "array": "[" * 1000 + "]" * 1000,
        "object": '{"a":' * 1000 + "1" + "}" * 1000,
        "in-a-field": '{"stored_vm_info": ' + "[" * 1000 + "]" * 1000 + "}",
    }[shape]
    code, body = harness.request(method, path, raw=deep.encode())
    assert (code, body["error"]) == (400, "json_too_deep"), body
    assert str(MAX_JSON_DEPTH) in body["message"]
    assert harness.manager.jobs() == []


def test_json_depth_is_counted_outside_strings_only() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert json_depth('["\\"[[[", [2]]') == 2
    assert json_depth("[" * 10 + "]" * 10) == 10
    assert json_depth('"no brackets"') == 0


def test_the_depth_limit_itself_is_allowed(harness: Harness) -> None:
    at_limit = '{"stored_vm_info":' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    code, body = harness.request("POST", "/api/v1/vm-spec-changes", raw=at_limit.encode())
    assert code == 400 and body["error"] != "json_too_deep", body


# -- numbers ---------------------------------------------------------------------------

JOB = "backup-pgtest1-1760099954"
HUGE = ["1" + "0" * 400, str(2**1024), str(2**63), str(-(2**63)), "1e400", "-1e400", "1e999999999"]


@pytest.mark.parametrize("number", HUGE)
@pytest.mark.parametrize("field", ["bytes_transferred", "total_bytes", "throughput_bps", "percent"])
def test_progress_numbers_out_of_range_are_named_and_never_stored(
    harness: Harness, field: str, number: str
) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    raw = f'{{"stage": "Transfer", "{field}": {number}}}'.encode()
    code, body = harness.request("POST", f"/api/v1/progress/{JOB}/update", raw=raw)
    assert (code, body["field"]) == (400, field), body
    assert "2**63" in body["message"] or "9223372036854775807" in body["message"]
    assert harness.request("GET", f"/api/v1/progress/{JOB}")[0] == 200
    assert harness.manager.get(JOB).pushed is None


def test_the_largest_numbers_are_stored_and_shown(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    push = {"bytes_transferred": 2**63 - 1, "total_bytes": 2**63 - 1, "throughput_bps": 9e18}
    code, _ = harness.request("POST", f"/api/v1/progress/{JOB}/update", push)
    assert code == 200
    code, progress = harness.request("GET", f"/api/v1/progress/{JOB}")
    assert code == 200 and progress["bytes_transferred"] == 2**63 - 1


def test_a_nested_number_out_of_range_is_named_by_its_place(harness: Harness) -> None:
    raw = b'{"stored_vm_info": {"disks": [{"size_gb": 1}, {"size_gb": 1e400}]}}'
    code, body = harness.request("POST", "/api/v1/vm-spec-changes", raw=raw)
    assert (code, body["field"]) == (400, "stored_vm_info.disks[1].size_gb"), body


@pytest.mark.parametrize(
    ("key", "number"),
    [
        ("max_jobs", "1" + "0" * 400),
        ("kill_grace_seconds", "1e400"),
        ("job_retention_days", str(2**1024)),
        ("nbd_probe_timeout_seconds", "-1e999"),
    ],
)
def test_config_numbers_out_of_range(harness: Harness, key: str, number: str) -> None:
    code, body = harness.request("PUT", "/api/v1/config", raw=f'{{"{key}": {number}}}'.encode())
    assert (code, body["field"]) == (400, key), body


def test_power_timeouts_out_of_range(harness: Harness) -> None:
    raw = b'{"vcenter": "vc", "username": "u", "password": "p", "timeout": 1e400}'
    code, body = harness.request("POST", "/api/v1/vm/vm-42/power-off", raw=raw)
    assert (code, body["field"]) == (400, "timeout"), body
    assert harness.vsphere.calls == []


def test_validation_alone_refuses_what_the_body_reader_would(harness: Harness) -> None:
    """Defence in depth: a dict that never went through JSON still cannot store 2**1024."""
    from sna.api.http import ApiError

    for value in (2**1024, 2**63, float("inf"), float("nan")):
        with pytest.raises(ApiError) as raised:
            parse_progress_update({"bytes_transferred": 1, "throughput_bps": value}, None)
        assert raised.value.field == "throughput_bps"


def test_a_disk_key_of_five_thousand_digits_is_400(harness: Harness) -> None:
    body = backup_body(previous_change_ids={"9" * 5000: "52 x/1"})
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert (code, answer["field"]) == (400, "previous_change_ids"), answer
    assert len(answer["message"]) < 300


# -- control characters ------------------------------------------------------------------

CONTROLS = ["\r", "\n", "\x1b", "\t", "\x7f", "\x85", "\x9b", "\ud800"]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    "field",
    ["vm_name", "vm_path", "vcenter_host", "vcenter_user", "previous_change_id", "nbd_targets"],
)
def test_control_characters_in_backup_fields_are_named(
    harness: Harness, field: str, char: str
) -> None:
    body = backup_body(backup_type="incremental", previous_change_id="52 aa/7")
    body[field] = body[field][:5] + char + body[field][5:]
    code, answer = harness.request(
        "POST", "/api/v1/backup/start", raw=json.dumps(body).encode("utf-8", "surrogatepass")
    )
    assert (code, answer["field"]) == (400, field), answer
    assert f"U+{ord(char):04X}" in answer["message"] and "position 6" in answer["message"]
    assert harness.manager.jobs() == [] and harness.launcher.requests == {}


def test_control_characters_in_per_disk_change_ids(harness: Harness) -> None:
    body = backup_body(
        backup_type="incremental", previous_change_ids={"2000": "52 aa/7\nforged line"}
    )
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert (code, answer["field"]) == (400, "previous_change_ids[2000]"), answer


@pytest.mark.parametrize(
    "name",
    ["SQL Server 01", "Büro-Server (alt) v1.2", "日本語 VM", "50% done", "a\\b", "x" * 80, "😀 vm"],
)
def test_real_vcenter_names_still_pass(harness: Harness, name: str) -> None:
    body = backup_body(vm_name=name, vm_path=f"/DC1/vm/Folder (1)/{name}")
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert code == 200, answer


def test_a_password_may_hold_anything_but_nul(harness: Harness) -> None:
    """It is never shown anywhere (masked), so no character of it is refused but NUL
    and those vCenter cannot be sent (tests/unit/test_openapi_findings.py)."""
    body = backup_body(vcenter_password="p\tw\x7f\u00e4\n\x85")
    assert harness.request("POST", "/api/v1/backup/start", body)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/api/v1/vms/DC1/vm/x%1b%5B2J/cbt-status", None, "vm_path"),
        # A LF inside the path once took no route (404): werkzeug's path converter
        # matched with "." and so stopped at a newline.
        ("GET", "/api/v1/vms/a%0ab/cbt-status", None, "vm_path"),
        ("GET", "/api/v1/vms/DC1/vm/x%0A/cbt-status", None, "vm_path"),
        ("POST", "/api/v1/vms/DC1%0a/vm/x/enable-cbt", "creds", "vm_path"),
        ("POST", "/api/v1/vms/DC1/vm/a%0ab/enable-cbt", "creds", "vm_path"),
        ("POST", "/api/v1/vms/DC1/vm/x%07/enable-cbt", "creds", "vm_path"),
        ("POST", "/api/v1/vm/vm-1%0d/power-off", "creds", "vm_id"),
        ("GET", "/api/v1/vm/vm-1%0a/power-state", None, "vm_id"),
        ("POST", "/api/v1/discover", {"username": "adm\nin"}, "username"),
        ("POST", "/api/v1/discover", {"vcenter": "vc\x1b"}, "vcenter"),
        ("POST", "/api/v1/discover", {"datacenter": "DC\r1"}, "datacenter"),
        ("POST", "/api/v1/cleanup", {"action": "cleanup_all", "vm_path": "/D\n"}, "vm_path"),
        ("POST", "/api/v1/progress/backup-pgtest1-1760099954/update", {"stage": "T\n"}, "stage"),
        ("PUT", "/api/v1/config", {"nbd_hosts": ["127.0.0.1", "a\x1bb"]}, "nbd_hosts"),
    ],
)
def test_control_characters_on_other_routes(
    harness: Harness, method: str, path: str, body: Any, field: str
) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    creds = {"vcenter": "vc", "username": "u", "password": "p"}
    if body == "creds":
        body = creds
    elif path.endswith(("/discover", "/cleanup")):
        body = {**creds, **body}
    headers = {"X-vCenter-Host": "vc", "X-vCenter-User": "u", "X-vCenter-Password": "p"}
    d = harness.treq.request(
        method,
        "http://sna" + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    harness.treq.flush()
    response = result_of(d)
    answer = json.loads(result_of(response.content()))
    assert (response.code, answer.get("field")) == (400, field), answer
    assert harness.vsphere.calls == []


# -- the edges found by the hostile tests (issue 11) ------------------------------------


def test_a_chunk_declaring_more_than_the_limit_is_413_at_once(site: ApiSite, held: Held) -> None:
    """The chunk-size line alone says the body will be too large: no waiting for the bytes."""
    client = Client(site)
    client.send(b"POST /hold HTTP/1.1\r\nHost: sna\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"%x\r\n" % (MAX_BODY + 1))
    answer = client.answer()
    assert answer is not None, "a chunk declaring more than the body limit was waited for"
    refused(answer, 413, "body_too_large", str(MAX_BODY))
    assert client.closing and answer.headers["Connection"] == "close"
    assert not held.held


def test_chunks_declaring_more_than_the_limit_together_are_413(site: ApiSite, held: Held) -> None:
    client = Client(site)
    client.send(b"POST /hold HTTP/1.1\r\nHost: sna\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"400\r\n" + b"x" * 0x400 + b"\r\n")
    assert client.answer() is None
    client.send(b"%x;ext=1\r\n" % (MAX_BODY - 0x400 + 1))
    answer = client.answer()
    assert answer is not None
    refused(answer, 413, "body_too_large", str(MAX_BODY))
    assert not held.held


def test_a_chunk_declaring_the_limit_itself_is_read(site: ApiSite) -> None:
    client = Client(site)
    client.send(b"POST /a HTTP/1.1\r\nHost: sna\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"%x\r\n" % MAX_BODY)
    assert client.answer() is None and not client.closing
    client.send(b"x" * MAX_BODY + b"\r\n0\r\n\r\n")
    answer = client.answer()
    assert answer is not None and answer.status == 200, answer


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"GET /a HTTP/1.1\n", "bad_request_line"),
        (b"GET /a HTTP/1.1\nHost: sna\n\n", "bad_request_line"),
        (b"GET /a HTTP/1.1\nHost: sna\r\n\r\n", "bad_request_line"),
        (b"\r\nGET /a HTTP/1.1\n", "bad_request_line"),
        (b"GET /a HTTP/1.1\r\nHost: sna\n", "bad_header"),
        (b"GET /a HTTP/1.1\r\nHost: sna\n\r\n", "bad_header"),
        (b"GET /a HTTP/1.1\r\nHost: sna\r\n\n", "bad_header"),
    ],
    ids=[
        "request-line",
        "all-lines",
        "request-line-then-crlf",
        "after-empty-line",
        "header",
        "header-then-crlf",
        "end-of-headers",
    ],
)
def test_a_bare_lf_is_refused_at_once(site: ApiSite, raw: bytes, error: str) -> None:
    """Lines end in CR LF, as Twisted's parser reads them; a bare LF is a 400 at once,
    not a request left waiting for a CR LF that will never come."""
    client = Client(site)
    client.send(raw)
    answer = client.answer()
    assert answer is not None, f"no answer to {raw!r}"
    refused(answer, 400, error, "bare LF")
    assert client.closing


def test_cr_lf_split_between_reads_is_one_line_end(site: ApiSite) -> None:
    client = Client(site)
    for piece in (b"GET /a HTTP/1.1\r", b"\nHost: sna\r", b"\n\r", b"\n"):
        assert client.answer() is None
        client.send(piece)
    answer = client.answer()
    assert answer is not None and answer.status == 200, answer


def test_a_lf_in_a_body_is_the_bodys_business(site: ApiSite) -> None:
    """Bodies (and the next request behind one) are not lines: a LF there is data."""
    client = Client(site)
    first = b"POST /a HTTP/1.1\r\nHost: sna\r\nContent-Length: 3\r\n\r\na\nb"
    chunked = (
        b"POST /b HTTP/1.1\r\nHost: sna\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\n\n\n\n\r\n0\r\n\r\n"
    )
    client.send(first + chunked + b"GET /c HTTP/1.1\r\nHost: sna\r\n\r\n")
    answers = client.transport.value()
    assert answers.count(b"HTTP/1.1 200 OK") == 3, answers
    assert not client.closing


@pytest.mark.parametrize("method", [b"get", b"Get", b"post", b"head", b"options", b"foo"])
def test_a_method_is_case_sensitive(api_site: ApiSite, harness: Harness, method: bytes) -> None:
    """RFC 9110 9.1: ``get`` is not ``GET``; no method of sna's has a lower-case letter."""
    client = Client(api_site)
    body = json.dumps(backup_body()).encode()
    client.send(
        method + b" /api/v1/backup/start HTTP/1.1\r\nHost: sna\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    answer = client.answer()
    assert answer is not None
    refused(answer, 501, "method_not_implemented", method.decode(), "case-sensitive")
    assert harness.manager.jobs() == []
    # The request was well-formed HTTP: the connection goes on.
    assert not client.closing
    client.transport.clear()
    client.request("GET", "/api/v1/health")
    again = client.answer()
    assert again is not None and again.status == 200
