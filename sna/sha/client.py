"""One request to the SHA's API, bounded in time, with what went wrong said plainly."""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)

#: Seconds one request may take, answer included (the Go client's was 10 s).
REQUEST_TIMEOUT = 10.0
#: The most of an answer that is read; the SHA's are a few hundred bytes.
MAX_ANSWER = 64 * 1024


@attrs.frozen
class Answer:
    code: int
    body: bytes

    def text(self, limit: int = 200) -> str:
        """The answer for a log line: its status and the start of its body."""
        body = self.body[:limit].decode("utf-8", "replace").strip()
        return f"HTTP {self.code}" + (f": {body}" if body else "")


class ShaUnreachable(Exception):
    """The request got no answer: refused, reset, timed out."""


#: What each of the Agent's errors that wrap others means, for a log line.
_WRAPPERS: dict[type[Exception], str] = {
    ResponseNeverReceived: "no answer",
    ResponseFailed: "the answer was cut off",
    RequestTransmissionFailed: "the request could not be sent",
}


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    # Agent's own logs "Starting factory _HTTP11ClientFactory(<function ... at
    # 0x...>, ...)" and its stop for every connection: two lines a request.
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """Agent's connection pool, without a log line for each connection's start and stop."""

    _factory = _QuietHTTP11ClientFactory

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)  # type: ignore[no-untyped-call]


def _wrapped(error: object) -> Optional[str]:
    """What an Agent error that wraps others says, or None; their own text is Failure reprs."""
    for kind, what in _WRAPPERS.items():
        if isinstance(error, kind):
            reasons: list[Failure] = getattr(error, "reasons", [])
            return f"{what}: " + "; ".join(reason.getErrorMessage() for reason in reasons)
    return None


class ShaClient:
    """Requests to ``base_url`` (the SHA's API) with a treq-like ``http`` client."""

    def __init__(
        self,
        http: Any,
        base_url: str,
        clock: IReactorTime,
        timeout: float = REQUEST_TIMEOUT,
        token: Optional[bytes] = None,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._clock = clock
        self._timeout = timeout
        #: The SHA's bearer token (``--sha-token-file``): in headers only, never in a message.
        self._token = token

    def request(self, method: str, path: str, body: Optional[str] = None) -> Deferred[Answer]:
        """The answer to one request; :class:`ShaUnreachable` if none came in time."""
        d = ensureDeferred(self._request(method, path, body))
        d.addTimeout(self._timeout, self._clock)

        def unreachable(failure: Failure) -> Answer:
            error = failure.value
            if isinstance(error, defer.TimeoutError):
                reason = f"no answer within {self._timeout:g} s"
            else:
                reason = _wrapped(error) or str(error) or type(error).__name__
            raise ShaUnreachable(f"{method} {self.base_url}{path}: {reason}") from None

        return d.addErrback(unreachable)

    async def _request(self, method: str, path: str, body: Optional[str]) -> Answer:
        headers = {"Accept": ["application/json"]}
        if self._token is not None:
            headers["Authorization"] = ["Bearer " + self._token.decode("ascii", "replace")]
        data = None
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            data = body.encode("utf-8")
        response = await self._http.request(
            method, self.base_url + path, data=data, headers=headers
        )
        content: bytes = await response.content()
        return Answer(response.code, content[:MAX_ANSWER])
