"""Bearer-token authorization in front of the API.

Off by default: the API listens on loopback and the SHA reaches it through
an SSH tunnel.  With ``--auth-token-file`` every route except
``/api/v1/health`` needs ``Authorization: Bearer <token>``, except the legacy
client's progress pushes from loopback.  The token is
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import re

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from sna.api.http import json_response

#: Routes anyone may read: liveness probes carry no token.
OPEN_PATHS = frozenset({b"/api/v1/health"})
_PUSH = re.compile(rb"/api/v1/progress/[^/]+/update")


def _from_loopback(request: IRequest) -> bool:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Unauthorized(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="sna"')
        body = {"error": "unauthorized", "message": "a valid bearer token is required"}
        return json_response(request, body, 401)


class BearerTokenAuthorization(Resource):
    """Hands the request to ``wrapped`` only when it carries the token."""

    def __init__(self, wrapped: IResource, token: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if not token:
            raise ValueError("the API token is empty")
        self._wrapped = wrapped
        self._token = token

    def _authorized(self, request: IRequest) -> bool:
        if request.path in OPEN_PATHS:
            return True
        if _PUSH.fullmatch(request.path) and _from_loopback(request):
            # The legacy Go client pushes progress from this host and sends no token.
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self._token)

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        # Give the path segment back: the wrapped Klein resource routes on the whole path.
        request.postpath.insert(0, request.prepath.pop())
        if self._authorized(request):
            return self._wrapped
        return _Unauthorized()

    def render(self, request: IRequest) -> bytes:
        return _Unauthorized().render(request)


def read_token(path: str) -> bytes:
    """The token in ``path``: its first line, without surrounding whitespace."""
    with open(path, "rb") as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    return token
