"""HTTP plumbing under the routes: bounded request bodies and JSON replies."""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import provider

#: The largest request body read; anything longer answers 413.
MAX_BODY = 1024 * 1024


class BoundedRequest(Request):
    """A request that keeps at most ``MAX_BODY`` bytes of its body.

    Longer bodies are still drained from the connection, but not stored, and
    :attr:`body_too_large` tells the handler to refuse them.
    """

    max_body = MAX_BODY
    body_too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    return value.replace("\\", "\\\\").replace('"', '\\"')


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


def make_site(resource: IResource) -> Site:
    site = Site(resource, logFormatter=access_log_line)
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    return site


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
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


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
                f"request body must be application/json, not {media.decode('latin-1')}",
            )
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not UTF-8") from None
    except ValueError as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return body
