"""From a raw request to a model call, as Go's HTTP server and gorilla/mux 1.8 route it.

Pure.  What the SHA does before a handler runs (sha-contract.md §0, §6):

- the request target is parsed like ``url.ParseRequestURI``: a control
  character or a bad ``%`` escape is a 400 from the server itself;
- mux matches the **percent-decoded** path (no ``UseEncodedPath``): ``{id}``
  is ``[^/]+``, so an id with ``%2F`` in it decodes to ``/`` and the route
  does not match (404 ``404 page not found``);
- mux first cleans the path (``path.Clean``, trailing slash kept) and answers
  a path that is not clean with a 301 to the clean one;
- a path that matches a route with another method is a 405 with no body;
  the CORS middleware runs only for a matched route, so that holds for
  ``OPTIONS`` too;
- the query is parsed like ``url.ParseQuery``: ``&`` separates, a pair with
  ``;`` or a bad escape is dropped, ``+`` is a space, the first value counts.

Only the routes the node calls are emulated: the three of backups, and the
two of replication jobs (a change ID per disk, the job's update).  The SHA's other backup
routes that the same paths could reach answer 501 (not emulated), so a node
calling one shows up instead of passing for a missing route.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from tests.shadouble.model import Answer, ShaModel, json_answer, text_answer

_HEX = b"0123456789abcdefABCDEF"
#: What Go's ``escape(path, encodePath)`` leaves alone besides letters and digits.
_PATH_SAFE = "-_.~$&+,/:;=@"


class BadTarget(ValueError):
    """The server itself refuses the request target (``400 Bad Request``)."""


def unescape(text: bytes, plus_is_space: bool) -> bytes:
    """Go's ``unescape``: ``%`` needs two hex digits; ``+`` is a space only in a query."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == 0x25:
            pair = text[i + 1 : i + 3]
            if len(pair) < 2 or any(b not in _HEX for b in pair):
                raise ValueError(f"invalid URL escape {text[i : i + 3]!r}")
            out.append(int(pair, 16))
            i += 3
            continue
        out.append(0x20 if c == 0x2B and plus_is_space else c)
        i += 1
    return bytes(out)


def _go_string(raw: bytes) -> str:
    """A Go string (bytes) as str; invalid UTF-8 survives as surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def split_target(target: bytes) -> tuple[str, str]:
    """The decoded path and the raw query of a request target (``url.ParseRequestURI``)."""
    if any(b < 0x20 or b == 0x7F for b in target):
        raise BadTarget("invalid control character in URL")
    match = re.match(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?]*", target)
    if match is not None:
        target = target[match.end() :] or b"/"
    if not target.startswith(b"/"):
        raise BadTarget("invalid URI for request")
    raw_path, _, raw_query = target.partition(b"?")
    try:
        path = unescape(raw_path, plus_is_space=False)
    except ValueError as e:
        raise BadTarget(str(e)) from None
    return _go_string(path), raw_query.decode("latin-1")


def parse_query(raw: str) -> dict[str, list[str]]:
    """``url.ParseQuery`` (Go 1.17 and later), keeping what it keeps despite its error."""
    values: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        if ";" in pair or pair == "":
            continue
        key, _, value = pair.partition("=")
        try:
            k = _go_string(unescape(key.encode("latin-1"), plus_is_space=True))
            v = _go_string(unescape(value.encode("latin-1"), plus_is_space=True))
        except ValueError:
            continue
        values.setdefault(k, []).append(v)
    return values


def clean_path(path: str) -> str:
    """mux's ``cleanPath``: Go's ``path.Clean`` of a rooted path, the trailing slash kept."""
    if path == "":
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    parts: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)
    cleaned = "/" + "/".join(parts)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


@dataclass(frozen=True)
class Routed:
    """The answer, and what the request log keeps of how it was routed."""

    answer: Answer
    #: ``changeid``, ``complete``, ``telemetry``, ``not-emulated``, ``method-not-allowed``,
    #: ``redirect``, ``not-found`` or ``bad-request``.
    route: str
    #: The percent-decoded path; None if the target could not be parsed.
    path: Optional[str]
    query: str


Handler = Callable[[ShaModel, tuple[str, ...], str, bytes], Answer]


def _changeid(model: ShaModel, _args: tuple[str, ...], query: str, _body: bytes) -> Answer:
    return model.changeid(parse_query(query))


def _complete(model: ShaModel, args: tuple[str, ...], _query: str, body: bytes) -> Answer:
    return model.complete(args[0], body)


def _telemetry(model: ShaModel, args: tuple[str, ...], _query: str, body: bytes) -> Answer:
    return model.telemetry(args[0], args[1], body)


def _replication_changeid(
    model: ShaModel, args: tuple[str, ...], _query: str, body: bytes
) -> Answer:
    return model.replication_changeid(args[0], body)


def _replication_update(model: ShaModel, args: tuple[str, ...], _query: str, body: bytes) -> Answer:
    return model.replication_update(args[0], body)


_VAR = "([^/]+)"
#: The SHA's backup and telemetry routes in registration order (BH:1000-1021, TH:96).
ROUTES: tuple[tuple[str, str, str, Optional[Handler]], ...] = (
    ("POST", "/api/v1/backups", "start", None),
    ("GET", "/api/v1/backups/stats", "stats", None),
    ("GET", "/api/v1/backups", "list", None),
    ("GET", "/api/v1/backups/changeid", "changeid", _changeid),
    ("GET", f"/api/v1/backups/{_VAR}/chain", "chain", None),
    ("POST", f"/api/v1/backups/{_VAR}/complete", "complete", _complete),
    ("GET", f"/api/v1/backups/{_VAR}", "details", None),
    ("DELETE", f"/api/v1/backups/{_VAR}", "delete", None),
    ("POST", f"/api/v1/telemetry/{_VAR}/{_VAR}", "telemetry", _telemetry),
    # The replication routes the node calls (sha/api/server.go:97-101), behind requireAuth.
    ("GET", "/api/v1/replications/changeid", "replication-lookup", None),
    (
        "POST",
        f"/api/v1/replications/{_VAR}/changeid",
        "replication-changeid",
        _replication_changeid,
    ),
    ("GET", f"/api/v1/replications/{_VAR}", "replication-details", None),
    ("PUT", f"/api/v1/replications/{_VAR}", "replication-update", _replication_update),
    ("DELETE", f"/api/v1/replications/{_VAR}", "replication-delete", None),
)


def dispatch(model: ShaModel, method: str, target: bytes, body: bytes) -> Routed:
    """Route one request to the model as the SHA's server would, and answer it."""
    try:
        path, query = split_target(target)
    except BadTarget:
        return Routed(text_answer(400, "400 Bad Request"), "bad-request", None, "")
    cleaned = clean_path(path)
    if cleaned != path:
        location = urllib.parse.quote(cleaned.encode("utf-8", "surrogateescape"), safe=_PATH_SAFE)
        if query:
            location += "?" + query
        return Routed(Answer(301, headers=(("Location", location),)), "redirect", path, query)
    method_mismatch = False
    for route_method, pattern, name, handler in ROUTES:
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        if route_method != method:
            method_mismatch = True
            continue
        if handler is None:
            answer = json_answer(
                501, {"error": "not emulated by the SHA double", "route": f"{method} {pattern}"}
            )
            return Routed(answer, "not-emulated", path, query)
        return Routed(handler(model, match.groups(), query, body), name, path, query)
    if method_mismatch:
        return Routed(Answer(405), "method-not-allowed", path, query)
    return Routed(text_answer(404, "404 page not found"), "not-found", path, query)
