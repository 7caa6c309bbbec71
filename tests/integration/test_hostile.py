"""Hostile input against a real ``twistd sna``, over real sockets on loopback.

- every route gets property-based requests (Hypothesis): any method, path
  segment, header and body, sent as raw bytes;
- the framing and limit cases one by one (what Twisted or Klein used to
  answer in HTML, or not at all);
- a slowloris (1,100 slow connections from one client, the daemon held to
  systemd's default of 1024 descriptors), a trickling request and a flood;
- TLS on the API with a real certificate, and a token file others can read.

Each asserts what an operator relies on: no 500, JSON on every answer, no
client process, job log, job record or relay from a refused request, no
traceback in the daemon's log, and ``/health`` answering throughout.
Nothing here asserts how long anything took.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import resource
import select
import socket
import ssl
import string
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sna.api.app import SnaAPI
from sna.api.http import MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_REQUEST_LINE, ConnectionLimits
from tests.certs import self_signed
from tests.integration.harness import (
    START_DEADLINE,
    Api,
    Daemon,
    Response,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.integration

#: Answers a request may get from an upstream that is not there: the vCenter
#: at 127.0.0.1:1 or the NBD port nothing listens on.  Documented, not bugs.
UPSTREAM_ERRORS = {
    502: {"vcenter_unreachable", "nbd_target_unreachable", "vcenter_error"},
    503: {"nbd_target_unreachable", "vcenter_unreachable", "vcenter_timeout"},
}


def not_json_by_design(target: bytes) -> bool:
    """Whether a success answer to ``target`` is other than JSON by design:
    Prometheus text, the dashboard's page and files, a job log asked for as text."""
    path, _, query = target.partition(b"?")
    text = path.decode("latin-1")
    return (
        text in ("/metrics", "/")
        or text.startswith("/ui/")
        or (text.endswith("/log") and b"format=text" in query)
    )


#: Where the vSphere routes may be sent: nothing listens there, and no name
#: resolves to the network.
VCENTERS = ["127.0.0.1:1", "[::1]:1", "https://127.0.0.1:1/sdk", "", "127.0.0.1:0", "[::1"]
PROBE_SOURCE = "127.0.0.2"


# -- raw HTTP -------------------------------------------------------------------------


def read_answer(sock: socket.socket, head_only: bool = False) -> Response:
    """The answer on ``sock`` (the request said ``Connection: close``)."""
    response = http.client.HTTPResponse(sock, method="HEAD" if head_only else "GET")
    response.begin()
    return Response(response.status, response.headers, response.read())


def raw_exchange(
    port: int, data: bytes, source: Optional[str] = None, timeout: float = 30.0
) -> Response:
    source_address = (source, 0) if source else None
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=source_address
    ) as sock:
        sock.sendall(data)
        return read_answer(sock, head_only=data.startswith(b"HEAD "))


def health_from(port: int, source: str = PROBE_SOURCE, timeout: float = 30.0) -> int:
    """``/health`` asked from another loopback address than the tests' 127.0.0.1."""
    request = b"GET /api/v1/health HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(port, request, source, timeout)
    assert answer.json()["status"] in ("healthy", "degraded")
    return answer.status


def is_json_error(answer: Response, status: int, error: str, *words: str) -> dict[str, Any]:
    assert answer.status == status, answer
    body: dict[str, Any] = answer.json()
    assert body["error"] == error, body
    for word in words:
        assert word in body["message"], body
    return body


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- daemons --------------------------------------------------------------------------


class LimitedDaemon(Daemon):
    """A daemon held to ``nofile`` descriptors, as systemd holds a service by default."""

    nofile = 1024

    def argv(self, port: Optional[int] = None) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().argv(port)]


class HttpsApi(Api):
    def __init__(self, port: int, context: ssl.SSLContext, token: str) -> None:
        super().__init__(port)
        self.context = context
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None,
        timeout: float = 30.0,
    ) -> Response:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=self.context
        )
        try:
            conn.request(method, path, body=raw, headers=headers or {})
            answer = conn.getresponse()
            return Response(answer.status, answer.headers, answer.read())
        finally:
            conn.close()


@pytest.fixture
def own_daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts itself; stopped by pid and checked for tracebacks."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.shutdown()
    for daemon in started:
        daemon.check_no_tracebacks()


@pytest.fixture(scope="module")
def unreachable_nbd_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def hostile(
    tmp_path_factory: pytest.TempPathFactory, unreachable_nbd_port: int
) -> Iterator[Daemon]:
    """A daemon whose only allowed NBD port has nothing behind it: nothing can start."""
    port = unreachable_nbd_port
    daemon = Daemon(
        tmp_path_factory.mktemp("hostile"),
        extra=("--nbd-ports", f"{port}-{port}", "--nbd-probe-timeout", "2"),
    )
    daemon.start()
    yield daemon
    daemon.shutdown()
    daemon.check_no_tracebacks()


class Untouched:
    """What a refused request must not change: jobs, job logs, relays, child processes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.children = children(daemon.pid)

    def check(self) -> None:
        daemon = self.daemon
        assert daemon.api.jobs()["count"] == 0
        assert daemon.job_logs() == set()
        assert daemon.api.get("/api/v1/relays").json()["count"] == 0
        assert children(daemon.pid) <= self.children
        assert health_from(daemon.port) == 200


# -- property-based requests against every route ----------------------------------------


def _rules() -> list[tuple[str, list[str]]]:
    rules = []
    for rule in SnaAPI.app.url_map.iter_rules():
        methods = sorted(m for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
        rules.append((rule.rule, methods))
    return rules


RULES = _rules()

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=20).map(lambda t: t + "\x1b[2J\r\nforged"),
    st.sampled_from(
        [
            "",
            " ",
            "..",
            "../../etc/passwd",
            "a/b",
            "%2F",
            "PLACEHOLDER",
            "x" * 5000,
            "SQL Server 01 (ü)",
            "\u2028",
            "\ud800",
            "\0",
            "$(reboot)",
            "'; DROP TABLE jobs; --",
        ]
    ),
)
hostile_numbers = st.one_of(
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 2**1024, 10**400, 0, -1, 2**63 - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_scalars = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12,
)


GOOD: dict[str, Any] = {
    "job_id": "backup-hostile-1",
    "vm_name": "hostile",
    "vcenter_host": "vcenter.example.local",
    "vcenter_user": "administrator@vsphere.local",
    "vcenter_password": "pw",
    "vm_path": "/DC1/vm/hostile",
    "backup_type": "full",
    "previous_change_id": "PLACEHOLDER",
    "username": "u",
    "password": "p",
    "action": "cleanup_all",
    "stored_vm_info": {"name": "hostile", "disks": []},
    "timeout": 10,
    "stage": "Transfer",
    "bytes_transferred": 1,
    "max_jobs": 4,
}


def _field_value(draw: st.DrawFn, name: str, port: int) -> Any:
    """Mostly what a caller would send, sometimes anything at all."""
    if name == "vcenter":
        return draw(st.sampled_from(VCENTERS))
    good = GOOD.get(name)
    if name == "nbd_targets":
        good = f"2000:nbd://127.0.0.1:{port}/hostile-disk0"
    if good is not None and draw(st.integers(0, 3)):
        return good
    return draw(json_values)


FIELDS = [
    "job_id",
    "vm_name",
    "vcenter_host",
    "vcenter_user",
    "vcenter_password",
    "vm_path",
    "nbd_targets",
    "backup_type",
    "previous_change_id",
    "previous_change_ids",
    "vcenter",
    "username",
    "password",
    "action",
    "stored_vm_info",
    "timeout",
    "force",
    "stage",
    "bytes_transferred",
    "total_bytes",
    "percent",
    "throughput_bps",
    "max_jobs",
    "nbd_hosts",
    "kill_grace_seconds",
]


@st.composite
def bodies(draw: st.DrawFn, port: int) -> Optional[bytes]:
    kind = draw(st.sampled_from(["none", "object", "json", "bytes", "deep", "number"]))
    if kind == "none":
        return None
    if kind == "object":
        names = [name for name in FIELDS if draw(st.integers(0, 3))]
        body = {name: _field_value(draw, name, port) for name in names}
        return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "json":
        value = draw(json_values)
        if isinstance(value, dict):
            value.pop("vcenter", None)
        return json.dumps(value).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(MAX_JSON_DEPTH - 2, 3000))
        return b'{"stored_vm_info":' + b"[" * depth + b"]" * depth + b"}"
    number = draw(st.sampled_from(["1" + "0" * 400, "1e400", str(2**1024), "-1e999", "9" * 5000]))
    field = draw(st.sampled_from(["bytes_transferred", "timeout", "max_jobs", "percent"]))
    return f'{{"{field}": {number}}}'.encode()


def _segment(text: str, encode: bool) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return urllib.parse.quote(raw, safe="").encode("ascii") if encode else raw


@st.composite
def requests(draw: st.DrawFn, port: int) -> bytes:
    template, methods = draw(st.sampled_from(RULES))
    others = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "X-Y"]
    method = draw(st.sampled_from(methods if draw(st.integers(0, 3)) else others))
    encode = draw(st.booleans()) or draw(st.booleans())
    path = template.encode()
    # Every route parameter (<job_id>, <path:vm_path>, <path:file>, <vcenter>...).
    for placeholder in set(re.findall(rb"<[^>]+>", path)):
        value = draw(hostile_text | st.just("DC1/vm/hostile") | st.just("backup-hostile-1"))
        path = path.replace(placeholder, _segment(value, encode) or b"x")
    if draw(st.booleans()):
        query = {"status": draw(hostile_text), "vcenter": draw(st.sampled_from(VCENTERS))}
        query["username"] = draw(hostile_text)
        query["password"] = draw(hostile_text)
        path += b"?" + b"&".join(
            k.encode() + b"=" + _segment(v, encode=True) for k, v in query.items()
        )
    headers = [b"Host: sna", b"Connection: close"]
    content_type = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                "multipart/form-data; boundary=zz",
                "application/x-www-form-urlencoded",
                "application/vnd.x+json",
            ]
        )
    )
    if content_type:
        headers.append(f"Content-Type: {content_type}".encode())
    if draw(st.booleans()):
        headers.append(b"X-vCenter-Host: " + draw(st.sampled_from(VCENTERS)).encode())
        headers.append(
            b"X-vCenter-User: " + draw(st.text(string.printable[:94], max_size=20)).encode()
        )
    if draw(st.booleans()):
        header_value = draw(st.binary(max_size=40)).translate(None, b"\r\n\0")
        headers.append(b"User-Agent: " + header_value)
    body = draw(bodies(port))
    if body is not None:
        if draw(st.booleans()):
            headers.append(b"Content-Length: %d" % len(body))
        else:
            headers.append(b"Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    head = method.encode() + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"
    return head + (body or b"")


def check_answer(request: bytes, answer: Response) -> None:
    method, _, rest = request.partition(b" ")
    target = rest.partition(b" ")[0]
    designed = not_json_by_design(target) and answer.status in (200, 304)
    if method == b"HEAD":
        # No body to read the error from: an upstream's 502/503 is all it may be.
        assert answer.status < 500 or answer.status in UPSTREAM_ERRORS, answer
        assert designed or answer.headers.get_content_type() == "application/json", answer
        return
    assert answer.status < 500 or (
        answer.headers.get_content_type() == "application/json"
        and answer.json().get("error") in UPSTREAM_ERRORS.get(answer.status, ())
    ), answer
    if designed:
        return
    assert answer.headers.get_content_type() == "application/json", answer
    body = answer.json()
    if answer.status >= 400:
        assert isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("message"), str) and body["message"], body


def test_property_based_requests_against_every_route(
    hostile: Daemon, unreachable_nbd_port: int
) -> None:
    untouched = Untouched(hostile)
    seen: dict[int, int] = {}

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(unreachable_nbd_port))
    def one(request: bytes) -> None:
        answer = raw_exchange(hostile.port, request)
        seen[answer.status] = seen.get(answer.status, 0) + 1
        check_answer(request, answer)
        untouched.check()

    one()
    # The examples reached the routes, not only the refusals in front of them.
    assert {200, 400, 404, 405} <= set(seen), seen


# -- one by one: what used to be HTML, a bare 400 or no answer ---------------------------

FRAMING = [
    ("utf8-path", b"GET /api/v1/status/%ff HTTP/1.1\r\n", b"", 400, "invalid_path", "UTF-8"),
    (
        "utf8-vm-path",
        b"GET /api/v1/vms/%c3%28/cbt-status HTTP/1.1\r\n",
        b"",
        400,
        "invalid_path",
        "UTF-8",
    ),
    ("options-star", b"OPTIONS * HTTP/1.1\r\n", b"", 405, "method_not_allowed", "*"),
    (
        "multipart",
        b"POST /api/v1/backup/start HTTP/1.1\r\n"
        b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 5\r\n",
        b"hello",
        415,
        "unsupported_media_type",
        "multipart/form-data",
    ),
    (
        "bad-chunk",
        b"POST /api/v1/backup/start HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"zz\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
        "chunked",
    ),
    (
        "bad-length",
        b"POST /api/v1/backup/start HTTP/1.1\r\nContent-Length: abc\r\n",
        b"",
        400,
        "bad_content_length",
        "Content-Length",
    ),
    (
        "two-lengths",
        b"POST /api/v1/backup/start HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n",
        b"{}",
        400,
        "bad_framing",
        "Content-Length",
    ),
    (
        "length-and-chunked",
        b"POST /api/v1/backup/start HTTP/1.1\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n",
        b"{}",
        400,
        "bad_framing",
        "Transfer-Encoding",
    ),
    (
        "long-line",
        b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n",
        b"",
        414,
        "request_line_too_long",
        str(MAX_REQUEST_LINE),
    ),
    (
        "long-header",
        b"GET /api/v1/health HTTP/1.1\r\nX-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n",
        b"",
        431,
        "headers_too_large",
        str(MAX_HEADER_BYTES),
    ),
    (
        "many-headers",
        b"GET /api/v1/health HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)),
        b"",
        431,
        "headers_too_large",
        "headers",
    ),
    ("http2", b"PRI * HTTP/2.0\r\n", b"SM\r\n\r\n", 505, "http_version_not_supported", "HTTP/1.1"),
    ("no-version", b"GET /api/v1/health\r\n", b"", 400, "bad_request_line", "HTTP/1.1"),
    ("bad-header", b"GET /api/v1/health HTTP/1.1\r\nHost sna\r\n", b"", 400, "bad_header", ""),
    (
        "host-not-utf8",
        b"GET /api/v1/health HTTP/1.1\r\nHost: \xff\xfe\r\n",
        b"",
        400,
        "invalid_host",
        "Host",
    ),
    (
        "deep-json",
        b"POST /api/v1/discover HTTP/1.1\r\nContent-Length: 2000\r\n",
        b"[" * 1000 + b"]" * 1000,
        400,
        "json_too_deep",
        str(MAX_JSON_DEPTH),
    ),
    (
        "huge-number",
        b"POST /api/v1/progress/x/update HTTP/1.1\r\nContent-Length: 30\r\n",
        b'{"bytes_transferred": 1e400}  ',
        400,
        "invalid_request",
        "bytes_transferred",
    ),
    (
        "body-too-large",
        b"POST /api/v1/backup/start HTTP/1.1\r\nContent-Length: 2000000\r\n",
        b"x" * 100_000,
        413,
        "body_too_large",
        "1048576",
    ),
    # Issue 11's findings: each once waited for the 408, was served or took no route.
    (
        "chunk-declares-too-much",
        b"POST /api/v1/backup/start HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"100001\r\n",
        413,
        "body_too_large",
        "1048576",
    ),
    (
        "lower-case-method",
        b"get /api/v1/health HTTP/1.1\r\n",
        b"",
        501,
        "method_not_implemented",
        "case-sensitive",
    ),
    (
        "lower-case-post",
        b"post /api/v1/backup/start HTTP/1.1\r\nContent-Length: 2\r\n",
        b"{}",
        501,
        "method_not_implemented",
        "post",
    ),
    (
        "lf-in-vm-path",
        b"GET /api/v1/vms/a%0ab/cbt-status HTTP/1.1\r\n"
        b"X-vCenter-Host: 127.0.0.1:1\r\nX-vCenter-User: u\r\nX-vCenter-Password: p\r\n",
        b"",
        400,
        "invalid_request",
        "vm_path",
    ),
    (
        "lf-in-vm-path-enable-cbt",
        b"POST /api/v1/vms/DC1/vm/a%0Ab/enable-cbt HTTP/1.1\r\nContent-Length: 60\r\n",
        b'{"vcenter": "127.0.0.1:1", "username": "u", "password": "p"}',
        400,
        "invalid_request",
        "vm_path",
    ),
]


@pytest.mark.parametrize(
    ("head", "body", "status", "error", "word"),
    [case[1:] for case in FRAMING],
    ids=[case[0] for case in FRAMING],
)
def test_every_answer_is_json_naming_what_was_wrong(
    hostile: Daemon, head: bytes, body: bytes, status: int, error: str, word: str
) -> None:
    untouched = Untouched(hostile)
    if b"Host" not in head:
        head += b"Host: sna\r\n"
    answer = raw_exchange(hostile.port, head + b"Connection: close\r\n\r\n" + body)
    is_json_error(answer, status, error, word)
    untouched.check()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/v1/health HTTP/1.1\n",
        b"GET /api/v1/health HTTP/1.1\nHost: sna\nConnection: close\n\n",
        b"GET /api/v1/health HTTP/1.1\r\nHost: sna\nConnection: close\n\n",
    ],
    ids=["request-line", "every-line", "header"],
)
def test_a_bare_lf_is_answered_not_left_waiting(hostile: Daemon, request_bytes: bytes) -> None:
    """Nothing more is sent: the answer must come from the LF, not from the request timeout."""
    untouched = Untouched(hostile)
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=60) as sock:
        sock.sendall(request_bytes)
        answer = read_answer(sock)
    error = "bad_request_line" if request_bytes.count(b"\r") == 0 else "bad_header"
    body = is_json_error(answer, 400, error, "bare LF")
    assert "field" not in body
    untouched.check()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vm_path", "/DC1/vm/x\n2026-01-01 sna process ended: exit_code=0"),
        ("vcenter_user", "admin\r\x1b[2J"),
        ("previous_change_id", "52 aa/7\nforged"),
        ("vm_name", "x\x85y"),
        ("vcenter_host", "vc\x00"),
    ],
)
def test_control_characters_never_reach_a_log(
    hostile: Daemon, unreachable_nbd_port: int, field: str, value: str
) -> None:
    untouched = Untouched(hostile)
    body = {
        "job_id": "backup-x-1",
        "vm_name": "x",
        "vcenter_host": "vc",
        "vcenter_user": "u",
        "vcenter_password": "p",
        "vm_path": "/DC1/vm/x",
        "nbd_targets": f"2000:nbd://127.0.0.1:{unreachable_nbd_port}/x-disk0",
        "backup_type": "incremental",
        field: value,
    }
    answer = hostile.api.post("/api/v1/backup/start", body)
    assert is_json_error(answer, 400, "invalid_request", field)["field"] == field
    untouched.check()
    output = hostile.output()
    assert "\x1b" not in output and "\r" not in output
    assert not any(line.startswith(("forged", "2026-01-01")) for line in output.split("\n"))


def test_the_access_log_writes_no_escape_or_newline(hostile: Daemon) -> None:
    raw_exchange(
        hostile.port,
        b"GET /api/v1/health HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n"
        b"User-Agent: \x1b[31mred\x1b[0m\x0bx\r\nReferer: a\x08\x08\x08b\r\n\r\n",
    )
    output = hostile.output()
    assert "\x1b" not in output and "\x08" not in output and "\x0b" not in output
    assert "\\x1b[31mred\\x1b[0m\\x0bx" in output


# -- slow clients and floods --------------------------------------------------------------


def _enough_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the test needs {needed} descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class SlowClients:
    """``count`` connections from 127.0.0.1 that send a request a byte at a time."""

    REQUEST = b"GET /api/v1/health HTTP/1.1\r\nX-Slow: " + b"a" * 1000

    def __init__(self, port: int, count: int) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            self.sockets.append(sock)
        self.sent = 0

    def connected(self, wait: float) -> int:
        """How many have finished connecting (or been refused), after up to ``wait`` s."""
        poller = select.poll()
        for sock in self.sockets:
            poller.register(sock, select.POLLOUT)
        end = time.monotonic() + wait
        ready: set[int] = set()
        while len(ready) < len(self.sockets) and time.monotonic() < end:
            ready.update(fd for fd, _ in poller.poll(100))
            for fd in ready:
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
        return len(ready)

    def trickle(self) -> None:
        """One more byte on every connection that still takes it."""
        byte = self.REQUEST[self.sent : self.sent + 1]
        self.sent += 1
        for sock in self.sockets:
            try:
                sock.send(byte)
            except OSError:
                pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_slowloris_from_one_client_cannot_pin_the_descriptors(
    tmp_path: Path, own_daemons: list[Daemon]
) -> None:
    """1,100 slow connections from one client, the daemon at systemd's 1024 descriptors:
    it keeps answering ``/health`` (from another address, and from the same one)."""
    attackers = 1100
    _enough_descriptors(attackers + 200)
    daemon = LimitedDaemon(tmp_path / "slowloris")
    own_daemons.append(daemon)
    daemon.start()
    idle = descriptors(daemon.pid)
    slow = SlowClients(daemon.port, attackers)
    try:
        probes = []
        for _ in range(10):
            connected = slow.connected(wait=1.0)
            slow.trickle()
            try:
                probes.append(health_from(daemon.port, timeout=5))
            except OSError as e:
                probes.append(repr(e))
            if connected == attackers:
                break
        assert connected == attackers, "the daemon stopped accepting connections"
        assert probes == [200] * len(probes)
        # The attacker keeps what the limits allow; the rest were closed.
        bound = idle + ConnectionLimits().max_connections + 16
        wait_for(lambda: descriptors(daemon.pid) <= bound, f"at most {bound} descriptors")
        # The same client still gets an answer: its longest-idle connection makes room.
        assert daemon.api.get("/api/v1/health").status == 200
        assert health_from(daemon.port) == 200
    finally:
        slow.close()
    assert "API connection limits reached" in daemon.output()


def test_a_trickled_request_is_cut_off(tmp_path: Path, own_daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path / "trickle", extra=("--request-timeout", "1"))
    own_daemons.append(daemon)
    daemon.start()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nX-Slow: ")
        sock.setblocking(False)
        received = b""

        def answered() -> bool:
            nonlocal received
            try:
                sock.send(b"a")
            except OSError:
                pass
            try:
                while chunk := sock.recv(65536):
                    received += chunk
                return True  # the daemon closed its side
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_for(answered, "the daemon to cut the trickle off", deadline=30, interval=0.1)
    answer = parse_raw(received)
    is_json_error(answer, 408, "request_timeout", "1 s")
    assert daemon.api.get("/api/v1/health").status == 200


def parse_raw(data: bytes) -> Response:
    class _Bytes:
        def makefile(self, mode: str) -> io.BytesIO:
            return io.BytesIO(data)

    response = http.client.HTTPResponse(_Bytes())  # type: ignore[arg-type]
    response.begin()
    return Response(response.status, response.headers, response.read())


def test_a_flood_is_answered_in_json_and_health_keeps_answering(hostile: Daemon) -> None:
    untouched = Untouched(hostile)
    requests = [
        b"GET /api/v1/health HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/jobs HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/status/%ff HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n\r\n",
        b"POST /api/v1/backup/start HTTP/1.1\r\nHost: sna\r\nConnection: close\r\n"
        b"Content-Length: 7\r\n\r\n[[[[[[[",
        b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]
    failures: list[str] = []
    health: list[int] = []
    done = threading.Event()

    def flood(worker: int) -> None:
        for n in range(120):
            request = requests[(worker + n) % len(requests)]
            try:
                answer = raw_exchange(hostile.port, request)
                check_answer(request, answer)
            except Exception as e:  # collected: a thread cannot fail the test itself
                failures.append(f"{request[:40]!r}: {e!r}")
        # Connections opened and dropped before sending anything.
        for _ in range(50):
            socket.create_connection(("127.0.0.1", hostile.port), timeout=30).close()

    def probe() -> None:
        while not done.is_set():
            try:
                health.append(health_from(hostile.port))
            except Exception as e:
                failures.append(f"health: {e!r}")

    workers = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
    prober = threading.Thread(target=probe)
    prober.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    prober.join()
    assert failures == []
    assert health and set(health) == {200}
    untouched.check()


# -- TLS and the token file ----------------------------------------------------------------


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (mode 0600)."""
    made = self_signed(directory, "api", hosts=("127.0.0.1", "localhost"))
    return Path(made.key), Path(made.cert)


def test_the_api_over_tls_with_a_token(tmp_path: Path, own_daemons: list[Daemon]) -> None:
    key, cert = _certificate(tmp_path)
    token = tmp_path / "token"
    token.write_text("t0ken-for-tls\n")
    token.chmod(0o600)
    daemon = Daemon(tmp_path / "tls")
    listen = f"ssl:{daemon.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    daemon.extra = ("--listen", listen, "--auth-token-file", str(token))
    context = ssl.create_default_context(cafile=str(cert))
    daemon.api = HttpsApi(daemon.port, context, "t0ken-for-tls")
    own_daemons.append(daemon)
    daemon.start()

    assert daemon.api.get("/api/v1/health").json()["status"] in ("healthy", "degraded")
    refused = daemon.api.get("/api/v1/jobs")
    is_json_error(refused, 401, "unauthorized")
    allowed = daemon.api.request(
        "GET", "/api/v1/jobs", headers={"Authorization": "Bearer t0ken-for-tls"}
    )
    assert allowed.status == 200 and allowed.json()["count"] == 0
    # The limits hold on TLS connections too.
    head = b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(head)
            is_json_error(read_answer(tls), 414, "request_line_too_long")
    # Plain HTTP on the TLS port is not served (and is not an error in the log).
    with pytest.raises((http.client.HTTPException, OSError)):
        Api(daemon.port).get("/api/v1/health")
    assert "without --auth-token-file" not in daemon.output()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620], ids=oct)
def test_a_token_file_others_can_read_stops_the_start(
    tmp_path: Path, own_daemons: list[Daemon], mode: int
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    daemon = Daemon(tmp_path / "token-mode", extra=("--auth-token-file", str(token)))
    own_daemons.append(daemon)
    process = daemon.spawn()
    assert process.wait(START_DEADLINE) != 0
    # One line, not twistd's usage text before it.
    [line] = daemon.output().strip().splitlines()
    assert line.startswith(f"twistd sna: --auth-token-file: {token} can be read or changed by")
    assert f"{mode:04o}" in line
    assert "s3cret" not in daemon.output()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--listen", "tcp:80a", "twistd sna: --listen tcp:80a: "),
        ("--nbd-ports", "5-3", "twistd sna: --nbd-ports must be a range of ports"),
        ("--max-connections", "0", "twistd sna: --max-connections must be an integer"),
    ],
)
def test_a_value_twistd_sna_refuses_is_one_line(
    tmp_path: Path, own_daemons: list[Daemon], option: str, value: str, message: str
) -> None:
    daemon = Daemon(tmp_path / "bad-value", extra=(option, value))
    own_daemons.append(daemon)
    assert daemon.spawn().wait(START_DEADLINE) == 1
    [line] = daemon.output().strip().splitlines()
    assert line.startswith(message), line


def test_a_port_in_use_stops_the_start_with_one_line(
    tmp_path: Path, own_daemons: list[Daemon]
) -> None:
    daemon = Daemon(tmp_path / "port-in-use")
    own_daemons.append(daemon)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", daemon.port))
        taken.listen()
        assert daemon.spawn().wait(START_DEADLINE) == 1
    output = daemon.output()
    lines = [line for line in output.splitlines() if "cannot start" in line]
    assert len(lines) == 1, output
    assert lines[0].endswith(
        f"sna cannot start: cannot listen on tcp:{daemon.port}:interface=127.0.0.1: "
        "Address already in use"
    ), output
    assert "Traceback" not in output, output
