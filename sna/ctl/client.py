"""The daemon's HTTP API, called synchronously: one connection per request.

:meth:`Client.call` answers the decoded JSON of a 2xx answer; an error
answer raises :class:`ApiFailure` with the API's ``error`` and ``message``;
a daemon that cannot be reached (refused, reset, TLS failure, timeout)
raises :class:`Unreachable`.  The token travels only in the
``Authorization`` header.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from sna.ctl.config import Settings

#: The most of an answer read (a long job list is a few MiB at most).
MAX_ANSWER = 64 * 1024 * 1024
QueryValue = Union[str, int, float, Sequence[str]]


class ApiFailure(Exception):
    """The daemon answered with an error: HTTP ``status``, its ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No answer from the daemon; the message says where and why."""


def quote(segment: str) -> str:
    """One path segment, percent-encoded (``/`` included)."""
    return urllib.parse.quote(segment, safe="")


class Client:
    """Requests to the daemon that ``settings`` name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        parts = urllib.parse.urlsplit(settings.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._context: Optional[ssl.SSLContext] = None
        if self._https:
            context = ssl.create_default_context(cafile=settings.ca_file)
            if settings.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Optional[QueryValue]]] = None,
        body: Any = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """``method path`` (``path`` under the daemon's URL, already quoted); the JSON answer."""
        target = path
        if query:
            pairs: list[tuple[str, str]] = []
            for key, value in query.items():
                if value is None:
                    continue
                if isinstance(value, (list, tuple)):
                    pairs.extend((key, str(v)) for v in value)
                else:
                    pairs.append((key, str(value)))
            if pairs:
                target += "?" + urllib.parse.urlencode(pairs)
        headers = {"Accept": "application/json", "User-Agent": "sna-ctl"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        conn = self._connection(timeout if timeout is not None else self.settings.timeout)
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER)
        except ssl.SSLCertVerificationError as e:
            raise Unreachable(
                f"cannot reach the daemon at {self.settings.url}: its certificate is not "
                f"trusted ({e.verify_message}); give its CA with --ca-file"
            ) from None
        except TimeoutError:
            raise Unreachable(
                f"the daemon at {self.settings.url} did not answer within {conn.timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise Unreachable(f"cannot reach the daemon at {self.settings.url}: {reason}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if 200 <= response.status < 300:
            if answer is None and raw:
                raise ApiFailure(
                    response.status, "not_json", f"the daemon's answer to {path} is not JSON"
                )
            return answer
        if isinstance(answer, dict) and isinstance(answer.get("message"), str):
            raise ApiFailure(response.status, str(answer.get("error", "error")), answer["message"])
        raise ApiFailure(
            response.status, "http_error", f"HTTP {response.status} {response.reason} for {path}"
        )

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)
