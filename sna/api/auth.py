"""Bearer-token authorization in front of the API.

Off by default: the API listens on loopback and the SHA reaches it through
an SSH tunnel.  With ``--auth-token-file`` every route except
``/api/v1/health`` needs ``Authorization: Bearer <token>``, except the legacy
client's progress pushes from loopback and the dashboard's shell (``GET /``
and ``/ui/{file}``, which hold no data).  The token is
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import stat

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from sna.api.http import json_response

#: Routes anyone may read: liveness probes carry no token.
OPEN_PATHS = frozenset({b"/api/v1/health"})
_PUSH = re.compile(rb"/api/v1/progress/[^/]+/update")
#: The dashboard's shell (sna/web): its page, styles and script hold no data,
#: and a browser opening a page cannot send a token.  The page asks for the
#: token and sends it on every API call it makes; anything else needs it.
SHELL_PATHS = re.compile(rb"/|/ui/[A-Za-z0-9][A-Za-z0-9._-]*")
_SHELL_METHODS = frozenset({b"GET", b"HEAD"})


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
        if request.method in _SHELL_METHODS and SHELL_PATHS.fullmatch(request.path):
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
    """The token in ``path``: its first line, without surrounding whitespace.

    Refused (:class:`ValueError` saying why) unless the file is protected as
    PostgreSQL wants its server key: owned by the daemon's user and
    readable by no one else (0600 or stricter), or owned by root and at most
    readable by its group (0640), so that an administrator can give it to
    the service's group without giving it the right to change it.
    """
    with open(path, "rb") as f:
        check_secret_file(path, os.fstat(f.fileno()))
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    return token


def check_secret_file(path: str, status: os.stat_result) -> None:
    """:class:`ValueError` if the file described by ``status`` (the token, the
    API's TLS key) may be read or changed by users other than the daemon's and root."""
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{path} is not a regular file")
    mode = stat.S_IMODE(status.st_mode)
    allowed = 0o640 if status.st_uid == 0 else 0o600
    if status.st_uid not in (0, os.geteuid()):
        raise ValueError(
            f"{path} belongs to user {status.st_uid}, not to the daemon's user or root"
        )
    if mode & ~allowed & 0o777:
        who = "others" if mode & 0o007 else "its group"
        raise ValueError(
            f"{path} can be read or changed by {who} (mode {mode:04o}); "
            f"it must be {allowed:04o} or stricter (chmod 600 {path})"
        )
