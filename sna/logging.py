"""The daemon's own log for machines: one JSON object per line, through twistd's ``--logger``.

``twistd --logger=sna.logging.json_observer -n sna ...`` replaces twistd's
text lines on standard output with JSON lines, for journald or Loki users
who would rather not parse text (docs/operations.md, "The daemon's own
log").  Each event becomes one object::

    {"time": "2026-11-26T09:12:03.482Z", "level": "info",
     "namespace": "sna.jobs.manager.JobManager",
     "message": "job backup-pgtest1-1764148323: cancel requested",
     "fields": {"job_id": "backup-pgtest1-1764148323"}}

``message`` is the text line's message, formatted the same way; ``fields``
holds the event's own keyword fields, those that are plain JSON (strings,
numbers, booleans, null, and lists and objects of them), and nothing else:
never an object's repr, never bytes.  A field whose name says it is a
secret is left out whatever its value, though no log call of sna's passes
one.  An event with a traceback (``log.failure``) adds ``error`` with the
exception's type, message and traceback.

This module also holds :func:`printable`, how a log line shows text it
does not trust.  It formats what it is given; it never decides what is logged.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any, Optional

from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["JsonLinesObserver", "event_record", "json_observer", "printable"]

#: Keys twisted.python.log's events carry besides their ``log_*`` ones; they
#: repeat the message, the time or the failure and are no fields of the event.
_LEGACY_KEYS = frozenset({"message", "format", "system", "isError", "why", "failure", "time"})
#: A field whose name matches is never written.
_SECRET = re.compile(r"password|passwd|token|secret|authorization|credential", re.IGNORECASE)
#: How deep a field's lists and objects may nest and still count as plain JSON.
_MAX_DEPTH = 8
_NOT_PLAIN = object()


def json_observer() -> ILogObserver:
    """The observer factory ``twistd --logger`` calls: JSON lines on standard output.

    twistd calls it before it redirects ``sys.stdout`` into the log, so the
    lines go to the real standard output (the journal under systemd).
    """
    return JsonLinesObserver(sys.stdout)


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event to ``out`` as one line of JSON, and flushes it."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        line = json.dumps(event_record(event), separators=(",", ":"), allow_nan=False)
        self._out.write(line + "\n")
        self._out.flush()


def event_record(event: LogEvent) -> dict[str, Any]:
    """What :class:`JsonLinesObserver` writes of ``event``, before encoding."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _rfc3339(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "namespace": str(event.get("log_namespace") or "-"),
        "message": formatEvent(event),
    }
    fields = _fields(event)
    if fields:
        record["fields"] = fields
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = {
            "type": _qualified_name(failure.type),
            "message": failure.getErrorMessage(),
            "traceback": failure.getTraceback(),
        }
    return record


def printable(text: str | bytes) -> str:
    """``text`` for a log line: control characters (CR, LF, ESC, ...) as ``\\xNN`` or ``\\uNNNN``.

    What a peer or a request sent cannot start a new line or drive a
    terminal, and reads as it is otherwise, without Python's quotes (or the
    ``b''`` of bytes).  Of bytes, printable ASCII is kept and every other
    byte becomes ``\\xNN``: they may not be text at all.
    """
    if isinstance(text, bytes):
        return "".join(chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}" for byte in text)
    return "".join(_escaped(char) if _control(char) else char for char in text)


def _fields(event: LogEvent) -> dict[str, Any]:
    # twisted.python.log's events and events that went through its legacy
    # wrapper carry "isError"; only then are the legacy keys not the event's own.
    legacy = "isError" in event or event.get("log_namespace") == "log_legacy"
    fields = {}
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or _SECRET.search(key):
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        plain = _plain(value, _MAX_DEPTH)
        if plain is not _NOT_PLAIN:
            fields[key] = plain
    return fields


def _plain(value: object, depth: int) -> object:
    """``value`` as plain JSON (tuples as lists), or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NOT_PLAIN
    if depth == 0:
        return _NOT_PLAIN
    if isinstance(value, (list, tuple)):
        items = [_plain(item, depth - 1) for item in value]
        return _NOT_PLAIN if any(item is _NOT_PLAIN for item in items) else items
    if isinstance(value, dict):
        members = {}
        for key, item in value.items():
            plain = _plain(item, depth - 1)
            if not isinstance(key, str) or plain is _NOT_PLAIN:
                return _NOT_PLAIN
            if not _SECRET.search(key):
                members[key] = plain
        return members
    return _NOT_PLAIN


def _rfc3339(timestamp: Optional[float]) -> str:
    when = datetime.now(UTC) if timestamp is None else _utc(timestamp)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _qualified_name(kind: object) -> str:
    module = getattr(kind, "__module__", None)
    name = getattr(kind, "__qualname__", None) or getattr(kind, "__name__", None)
    if name is None:
        return "-"
    return name if module in (None, "builtins") else f"{module}.{name}"


def _control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
