"""The dashboard's shell at ``/`` and ``/ui/{file}``: files, headers, refusals, auth.

Requests go through the API's real site (:class:`ApiSite`) byte for byte over
a :class:`StringTransport`, so that paths reach the routes exactly as a
client sent them (``..`` and ``%2e%2e`` included), with no socket.
"""

from __future__ import annotations

import http.client
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import IResource

from sna.api.auth import BearerTokenAuthorization
from sna.api.http import ApiSite, ConnectionLimits
from sna.web.shell import CONTENT_SECURITY_POLICY, Shell
from tests.unit.conftest import Harness

STATIC = Path(__file__).resolve().parents[2] / "sna" / "web" / "static"
TOKEN = "t0ken-for-the-web-tests"


@attrs.frozen
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get_content_type() == "application/json", self
        return json.loads(self.body)


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


def exchange(
    resource: IResource,
    path: str,
    method: str = "GET",
    headers: Optional[dict[str, str]] = None,
) -> Answer:
    """One request on a new connection to a site of ``resource``, as the bytes a client sends."""
    site = ApiSite(resource, ConnectionLimits())
    site.logFile = io.StringIO()
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)
    assert channel is not None
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = http.client.HTTPResponse(_Bytes(transport.value()), method=method)  # type: ignore[arg-type]
    response.begin()
    answer = Answer(response.status, response.headers, response.read())
    channel.connectionLost(None)  # type: ignore[arg-type]
    return answer


@pytest.fixture
def api(harness: Harness) -> IResource:
    return harness.api.resource()


@pytest.fixture
def guarded(harness: Harness) -> IResource:
    return BearerTokenAuthorization(harness.api.resource(), TOKEN.encode())


def shipped() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in STATIC.iterdir() if p.is_file()}


# -- what is served ------------------------------------------------------------------


def test_the_page_is_at_the_root_with_its_security_headers(api: IResource) -> None:
    answer = exchange(api, "/")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert answer.body == (STATIC / "index.html").read_bytes()
    policy = answer.headers["Content-Security-Policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    for kind in ("script-src", "style-src", "img-src", "connect-src"):
        assert directives[kind] == "'self'", kind
    assert directives["frame-ancestors"] == "'none'"
    assert directives["form-action"] == "'none'"
    assert "unsafe" not in policy
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("index.html", "text/html; charset=utf-8"),
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_each_file_is_served_with_its_type(api: IResource, name: str, content_type: str) -> None:
    answer = exchange(api, f"/ui/{name}")
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"] == content_type
    assert answer.body == (STATIC / name).read_bytes()
    assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_every_shipped_file_is_served_and_nothing_else() -> None:
    assert {name: asset.body for name, asset in Shell().assets().items()} == shipped()


def test_a_current_copy_is_not_sent_again(api: IResource) -> None:
    first = exchange(api, "/ui/dashboard.js")
    etag = first.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    again = exchange(api, "/ui/dashboard.js", headers={"If-None-Match": f'"other", {etag}'})
    assert (again.status, again.body) == (304, b"")
    assert again.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    changed = exchange(api, "/ui/dashboard.js", headers={"If-None-Match": '"other"'})
    assert (changed.status, changed.body) == (200, first.body)


def test_head_answers_the_headers_only(api: IResource) -> None:
    answer = exchange(api, "/", method="HEAD")
    assert (answer.status, answer.body) == (200, b"")
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_other_methods_are_refused(api: IResource) -> None:
    answer = exchange(api, "/", method="POST")
    assert (answer.status, answer.json()["error"]) == (405, "method_not_allowed")


# -- what is not ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/ui/unknown.js",
        "/ui/",
        "/ui",
        "/ui/index.htm",
        "/ui/static",
        "/ui/dashboard.js/",
        "/ui/./dashboard.js",
        "/ui/.dashboard.js",
        "/ui/shell.py",
        "/ui/__init__.py",
        "/index.html",
        "/static/dashboard.js",
        "/ui/DASHBOARD.JS",
    ],
)
def test_unknown_files_and_directories_are_404(api: IResource, path: str) -> None:
    answer = exchange(api, path)
    assert answer.status == 404, answer
    assert answer.json()["error"] == "not_found"
    assert "Content-Security-Policy" not in answer.headers


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../../etc/passwd",
        "/ui/../../../../../../etc/passwd",
        "/ui/%2e%2e/%2e%2e/etc/passwd",
        "/ui/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/ui/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/..%5c..%5cetc%5cpasswd",
        "/ui/%252e%252e%252fetc%252fpasswd",
        "/ui/../shell.py",
        "/ui/%2e%2e/shell.py",
        "/ui/..%2fshell.py",
        "/ui/static/../shell.py",
        "/ui//etc/passwd",
        "/ui/%2fetc%2fpasswd",
        "/ui/..",
        "/ui/%2e%2e",
    ],
)
def test_no_path_leaves_the_shipped_files(api: IResource, path: str) -> None:
    answer = exchange(api, path)
    assert answer.status in (400, 404), answer
    assert answer.json()["error"] in ("not_found", "invalid_path")
    assert b"root:" not in answer.body
    assert b"import" not in answer.body


def test_a_directory_is_never_listed(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.js").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "run.py").write_text("x")
    (tmp_path / ".hidden.js").write_text("x")
    outside = tmp_path.parent / "outside.js"
    outside.write_text("secret")
    shell = Shell(tmp_path)
    assert set(shell.assets()) == {"index.html"}
    for name in ("sub", "sub/inner.js", "../outside.js", "", ".", "..", "notes.txt", "run.py"):
        assert shell.asset(name) is None, name


# -- the page itself -----------------------------------------------------------------


class _Page(HTMLParser):
    """Every element's attributes, and the text inside script and style elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, Optional[str]]]] = []
        self.inline: list[str] = []
        self._inside: Optional[str] = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._inside = tag

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside and data.strip():
            self.inline.append(data)


def test_the_page_has_no_inline_code_and_loads_only_the_daemons_files() -> None:
    page = _Page()
    page.feed((STATIC / "index.html").read_text())
    assert page.inline == []
    served = set(Shell().assets())
    loaded = []
    for tag, attributes in page.elements:
        assert "style" not in attributes, tag
        assert not [a for a in attributes if a.startswith("on")], (tag, attributes)
        for name in ("src", "href", "action"):
            value = attributes.get(name)
            if value is not None:
                loaded.append(value)
    assert loaded, "the page loads its script and styles"
    for url in loaded:
        assert url.startswith("/ui/") and url.removeprefix("/ui/") in served, url
    scripts = [a.get("src") for tag, a in page.elements if tag == "script"]
    assert scripts == ["/ui/dashboard.js"]


def test_the_script_and_styles_name_no_other_host() -> None:
    for name in ("dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        hosts = set(re.findall(r"\b(?:https?|wss?):/+([^/\"'`\s]+)", text))
        assert hosts <= {"www.w3.org"}, (name, hosts)  # the SVG namespace names, loads nothing
        assert "innerHTML" not in text and "outerHTML" not in text and "eval(" not in text
        assert "document.cookie" not in text and "localStorage" not in text


# -- auth: the shell is open, the data is not ------------------------------------------


@pytest.mark.parametrize("path", ["/", "/ui/index.html", "/ui/dashboard.js", "/ui/favicon.svg"])
def test_the_shell_needs_no_token(guarded: IResource, path: str) -> None:
    answer = exchange(guarded, path)
    assert answer.status == 200, answer
    assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs?status=running",
        "/api/v1/jobs?limit=20",
        "/api/v1/status/backup-pgtest1-1",
        "/api/v1/relays",
        "/api/v1/relays/history",
        "/api/v1/jobs/backup-pgtest1-1/log?offset=0&wait=10",
        "/api/v1/config",
        "/metrics",
        "/ui/../api/v1/jobs",
        "/ui/%2e%2e/api/v1/jobs",
        "/ui/x/../../api/v1/jobs",
        "//api/v1/jobs",
    ],
)
def test_data_routes_still_need_the_token(guarded: IResource, path: str) -> None:
    answer = exchange(guarded, path)
    assert (answer.status, answer.json()["error"]) == (401, "unauthorized"), answer
    with_token = exchange(guarded, path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert with_token.status != 401, with_token


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_only_reading_the_shell_is_open(guarded: IResource, method: str) -> None:
    answer = exchange(guarded, "/", method=method)
    assert answer.status == 401, answer
