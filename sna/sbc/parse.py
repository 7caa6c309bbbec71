"""Reading a backup client's output lines as :mod:`sna.sbc.events`.

This module owns the two readings of a client's output:
:class:`JsonLineParser` for the JSON-lines contract of our
``sendense-backup-client`` (specified in ``docs/sbc-events.md``) and
:class:`LogrusLineParser` for what the legacy Go client prints.  A parser
turns one decoded line into zero or more events and never raises, whatever
the line holds.  It must not log, touch the process, the job or the log
file: the caller writes every raw line to the job's log itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, NoReturn, Optional

from zope.interface import Interface, implementer

from sna.contract import events as contract
from sna.sbc import events
from sna.sbc.events import Event

MAX_COUNT = contract.MAX_COUNT
MAX_TEXT = contract.MAX_TEXT
MAX_CHANGE_ID = contract.MAX_CHANGE_ID
SYNC_TYPES = contract.SYNC_TYPES
_DISK_KEY = contract.DISK_KEY
_PHASE = contract.PHASE_NAME
# C0 and C1 controls, DEL, and lone surrogates (which cannot be encoded as
# UTF-8): none of them may reach a log line, the store or an API response.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ILineParser(Interface):
    """Reads one backup client's output, a line at a time."""

    def parse(line: str) -> list[Event]:
        """The events ``line`` carries, usually none; never raises.

        ``line`` is decoded text without its line ending.  A parser may keep
        state from line to line, so each client process needs its own.
        """


def parser_for(legacy: bool) -> ILineParser:
    """A new parser for one client process: the Go client's if ``legacy``."""
    if legacy:
        return LogrusLineParser()
    return JsonLineParser()


def _clean(text: str, limit: int = MAX_TEXT) -> str:
    return _UNSAFE.sub("\ufffd", text[:limit].strip())


class _Invalid(Exception):
    """A JSON event that breaks the contract; the line yields no event."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Which of two values a reader picks is up to the reader: refuse both.
        raise ValueError("duplicate key")
    return obj


def _required(obj: Mapping[str, object], key: str) -> object:
    if key not in obj:
        raise _Invalid(key)
    return obj[key]


def _count(value: object) -> int:
    # bool is an int subclass: `true` must not pass for 1.
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise _Invalid(value)
    return value


def _optional_count(obj: Mapping[str, object], key: str) -> Optional[int]:
    value = obj.get(key)
    return None if value is None else _count(value)


def _disk_key(value: object) -> str:
    if type(value) is int:
        return str(_count(value))
    if isinstance(value, str) and _DISK_KEY.fullmatch(value):
        return value
    raise _Invalid(value)


def _text(obj: Mapping[str, object], key: str, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Invalid(key)
    text = _clean(value)
    if required and not text:
        raise _Invalid(key)
    return text


def _rate(obj: Mapping[str, object], key: str) -> Optional[float]:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(value)
    if not math.isfinite(value) or value < 0:
        raise _Invalid(value)
    return float(value)


def _change_id(value: object) -> str:
    # A change ID is the base of the next incremental: a damaged one is
    # refused, not repaired.
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_CHANGE_ID
        or _UNSAFE.search(value)
    ):
        raise _Invalid(value)
    return value.strip()


def _phase_event(obj: Mapping[str, object]) -> Event:
    phase = _required(obj, "phase")
    if not isinstance(phase, str) or not _PHASE.fullmatch(phase):
        raise _Invalid(phase)
    return events.Phase(phase, _text(obj, "message"))


def _sync_type(obj: Mapping[str, object]) -> str:
    sync_type = _required(obj, "sync_type")
    if not isinstance(sync_type, str) or sync_type not in SYNC_TYPES:
        raise _Invalid(sync_type)
    return sync_type


def _optional_disk_key(obj: Mapping[str, object], key: str) -> Optional[str]:
    value = obj.get(key)
    return None if value is None else _disk_key(value)


def _disk_fields(obj: Mapping[str, object], total_required: bool) -> dict[str, Any]:
    """What ``disk_plan`` and ``disk_start`` carry alike."""
    return {
        "disk_key": _disk_key(_required(obj, "disk_key")),
        "sync_type": _sync_type(obj),
        "sync_reason": _text(obj, "sync_reason"),
        "bytes_total": _count(_required(obj, "bytes_total"))
        if total_required
        else _optional_count(obj, "bytes_total"),
        "vmware_disk_key": _optional_disk_key(obj, "vmware_disk_key"),
        "capacity_bytes": _optional_count(obj, "capacity_bytes"),
    }


def _disk_plan_event(obj: Mapping[str, object]) -> Event:
    return events.DiskPlan(**_disk_fields(obj, total_required=True))


def _disk_start_event(obj: Mapping[str, object]) -> Event:
    return events.DiskStart(**_disk_fields(obj, total_required=False))


def _progress_event(obj: Mapping[str, object]) -> Event:
    return events.Progress(
        bytes_done=_count(_required(obj, "bytes_done")),
        bytes_total=_optional_count(obj, "bytes_total"),
        disk_key=_disk_key(_required(obj, "disk_key")),
        throughput_bps=_rate(obj, "throughput_bps"),
    )


def _disk_done_event(obj: Mapping[str, object]) -> Event:
    return events.DiskDone(
        disk_key=_disk_key(_required(obj, "disk_key")),
        change_id=_change_id(_required(obj, "change_id")),
        bytes_done=_optional_count(obj, "bytes_done"),
        bytes_total=_optional_count(obj, "bytes_total"),
    )


def _error_event(obj: Mapping[str, object]) -> Event:
    key = obj.get("disk_key")
    return events.Error(
        message=_text(obj, "message", required=True),
        disk_key=None if key is None else _disk_key(key),
    )


def _done_event(obj: Mapping[str, object]) -> Event:
    return events.Done(_text(obj, "message"))


def _stall_event(obj: Mapping[str, object]) -> Event:
    on = _required(obj, "on")
    if not isinstance(on, str) or on not in contract.STALL_ON:
        raise _Invalid(on)
    seconds = _rate(obj, "seconds")
    if seconds is None or seconds > contract.MAX_STALL_SECONDS:
        raise _Invalid(seconds)
    return events.Stall(
        on=on,
        seconds=seconds,
        message=_text(obj, "message"),
        disk_key=_optional_disk_key(obj, "disk_key"),
    )


def _resume_event(obj: Mapping[str, object]) -> Event:
    return events.Resume(_text(obj, "message"))


def _snapshot_event(obj: Mapping[str, object]) -> Event:
    state = _required(obj, "state")
    if not isinstance(state, str) or state not in contract.SNAPSHOT_STATES:
        raise _Invalid(state)
    _required(obj, "name")
    return events.Snapshot(
        name=_text(obj, "name", required=True),
        state=state,
        message=_text(obj, "message"),
    )


_JSON_EVENTS: Mapping[str, Callable[[Mapping[str, object]], Event]] = {
    contract.PHASE: _phase_event,
    contract.DISK_PLAN: _disk_plan_event,
    contract.DISK_START: _disk_start_event,
    contract.PROGRESS: _progress_event,
    contract.DISK_DONE: _disk_done_event,
    contract.ERROR: _error_event,
    contract.DONE: _done_event,
    contract.STALL: _stall_event,
    contract.RESUME: _resume_event,
    contract.SNAPSHOT: _snapshot_event,
}


@implementer(ILineParser)
class JsonLineParser:
    """``sendense-backup-client``'s stdout: one JSON object per line.

    Stateless.  Anything that is not an event of ``docs/sbc-events.md``,
    exactly, yields nothing.
    """

    def parse(self, line: str) -> list[Event]:
        if not line.lstrip().startswith("{"):
            return []
        try:
            obj: object = json.loads(
                line, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
            )
        # ValueError covers JSONDecodeError and integers past the int-to-str
        # digit limit; RecursionError a line of deeply nested arrays.
        except (ValueError, RecursionError):
            return []
        if not isinstance(obj, dict):
            return []
        kind = obj.get("event")
        build = _JSON_EVENTS.get(kind) if isinstance(kind, str) else None
        if build is None:
            return []
        try:
            return [build(obj)]
        except _Invalid:
            return []


# CSI sequences (colours, cursor moves) and two-character escapes, as the
# progress bar library writes them.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
# One logrus key=value pair: a bare value, or a Go-quoted one (%q).
_LOGFMT_PAIR = re.compile(r'[ \t]*([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)', re.DOTALL)
_GO_ESCAPE = re.compile(
    r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", re.DOTALL
)
_GO_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
# Go's standard `log` prefix, LstdFlags (microseconds optional).
_STDLIB_PREFIX = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{1,9})? ")
# The emoji and symbols the Go client starts its messages with.
_LEADING_SYMBOLS = re.compile(r"^[^\w(\[<\"']+")
_DIRECT_MATCH = re.compile(r"DIRECT MATCH: VMware disk \S+ \(key:(\d{1,10})\)")
_BYTES = re.compile(r"\((\d+) bytes\)")
_SIZE = re.compile(r"(?<![\d.])(\d{1,15}(?:\.\d{1,9})?) ?(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)\b")
# The Go client divides by 1024**n and prints "MB"/"GB".
_UNITS = {
    "B": 1,
    "KB": 2**10,
    "KiB": 2**10,
    "MB": 2**20,
    "MiB": 2**20,
    "GB": 2**30,
    "GiB": 2**30,
    "TB": 2**40,
    "TiB": 2**40,
}
_ERROR_LEVELS = frozenset({"error", "fatal", "panic"})

# Messages logged by target.NeedsFullCopy, before the disk's target is matched.
_SYNC_DECISIONS = (
    ("Data does not exist, full copy needed", "full", "no previous change ID"),
    ("No or invalid change ID found", "full", "previous change ID missing or invalid"),
    ("Change ID mismatch, full copy needed", "full", "change ID mismatch"),
    ("Starting incremental copy", "incremental", "previous change ID matches"),
)
_TRANSFER_STARTS = ("Starting parallel full copy", "Starting parallel incremental copy")
_COPY_COMPLETIONS = (
    "Parallel full copy completed successfully",
    "Parallel incremental copy completed successfully",
)
_SNAPSHOT_STARTS = ("Creating snapshot", "Creating job-specific snapshot")
_STORED_CHANGE_ID = "Stored ChangeID in database:"


def _go_unescape(match: re.Match[str]) -> str:
    escape = match.group(1)
    if escape in _GO_ESCAPES:
        return _GO_ESCAPES[escape]
    if len(escape) == 1:
        return match.group(0)
    if escape[0] in "xuU":
        code = int(escape[1:], 16)
        # \x is a byte of invalid UTF-8 in Go's %q; \u/\U may name no character.
        if (escape[0] == "x" and code >= 0x80) or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return "\ufffd"
        return chr(code)
    code = int(escape, 8)
    return chr(code) if code < 0x80 else "\ufffd"


def _logfmt(text: str) -> Optional[dict[str, str]]:
    """The key=value pairs of a logrus TextFormatter line, or None if it is not one."""
    fields: dict[str, str] = {}
    position = 0
    end = len(text.rstrip())
    while position < end:
        match = _LOGFMT_PAIR.match(text, position)
        if match is None:
            return None
        key, value = match.groups()
        if value.startswith('"'):
            value = _GO_ESCAPE.sub(_go_unescape, value[1:-1])
        fields[key] = value
        position = match.end()
    return fields


def _bare(message: str) -> str:
    return _LEADING_SYMBOLS.sub("", message).strip()


def _number(text: Optional[str]) -> Optional[int]:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def _size(message: str) -> Optional[int]:
    exact = _BYTES.search(message)
    if exact is not None:
        return _number(exact.group(1))
    approximate = _SIZE.search(message)
    if approximate is None:
        return None
    value = int(Decimal(approximate.group(1)) * _UNITS[approximate.group(2)])
    return value if value <= MAX_COUNT else None


@implementer(ILineParser)
class LogrusLineParser:
    """The legacy Go client's stdout and stderr: logrus, stdlib ``log`` and cobra lines.

    The Go client says which disk it copies only once (the ``DIRECT MATCH``
    line) and its full/incremental decision before that, so this parser
    remembers the current disk and the pending decision; one instance must
    read both of a process's streams.
    """

    def __init__(self) -> None:
        #: The disk being copied, from its DIRECT MATCH until its change ID is stored.
        self._disk: Optional[str] = None
        #: (sync_type, reason) decided for a disk not yet matched.
        self._decision: Optional[tuple[str, str]] = None
        self._total: Optional[int] = None
        self._copied: Optional[int] = None
        self._phase: Optional[str] = None

    def parse(self, line: str) -> list[Event]:
        found: list[Event] = []
        # Progress bars redraw with \r; each piece is a line of its own.
        for piece in line.split("\r"):
            text = _ANSI.sub("", piece).strip()
            if text:
                found.extend(self._line(text))
        return found

    def _line(self, text: str) -> list[Event]:
        if text.startswith(("time=", "level=")):
            fields = _logfmt(text)
            if fields is None or not ("msg" in fields or "level" in fields):
                return []
            message = _bare(fields.get("msg", ""))
            if fields.get("level") in _ERROR_LEVELS:
                parts = [part for part in (message, fields.get("error", "").strip()) if part]
                return self._error(": ".join(parts) or "level=" + fields["level"])
            return self._message(message, fields)
        stdlib = _STDLIB_PREFIX.match(text)
        if stdlib is not None:
            return self._message(_bare(text[stdlib.end() :]), {})
        if text.startswith("Error: "):
            return self._error(text[len("Error: ") :])
        if text.startswith("panic: "):
            return self._error(text)
        return self._message(_bare(text), {})

    def _error(self, message: str) -> list[Event]:
        # No disk key: the Go client logs at error level for things that do
        # not fail the disk (a telemetry POST that failed, for one); its exit
        # status says whether the run failed.
        text = _clean(message)
        return [events.Error(text)] if text else []

    def _message(self, message: str, fields: Mapping[str, str]) -> list[Event]:
        if message.startswith("DIRECT MATCH:"):
            match = _DIRECT_MATCH.match(message)
            return self._disk_matched(match.group(1)) if match else []
        for prefix, sync_type, reason in _SYNC_DECISIONS:
            if message.startswith(prefix):
                found = self._decided(sync_type, reason)
                if sync_type == "incremental":
                    found += self._enter("transfer")
                return found
        if message.startswith(_TRANSFER_STARTS):
            return self._enter("transfer")
        if message.startswith(("Total disk size:", "Total delta size")):
            total = _size(message)
            if total is None:
                return []
            self._total = total
            return [events.Progress(bytes_done=0, bytes_total=total, disk_key=self._disk)]
        if message.startswith(_COPY_COMPLETIONS):
            return self._copied_all(_number(fields.get("bytes_copied")))
        if message.startswith("No changed disk areas, skipping copy"):
            return self._copied_all(0)
        if message.startswith(_STORED_CHANGE_ID):
            return self._stored(message[len(_STORED_CHANGE_ID) :])
        if message.startswith(_SNAPSHOT_STARTS):
            return self._enter("snapshot")
        if message.startswith("Removing snapshot"):
            return self._enter("cleanup")
        if message == "Migration completed":
            return [events.Done(message)]
        return []

    def _enter(self, phase: str) -> list[Event]:
        # A progress bar repeats its text on every redraw: report a phase once.
        if phase == self._phase:
            return []
        self._phase = phase
        if phase == "snapshot":
            message = "Creating snapshot"
        elif phase == "cleanup":
            message = "Removing snapshot"
        elif self._disk is not None:
            message = f"Copying disk {self._disk}"
        else:
            message = "Copying data"
        return [events.Phase(phase, message)]

    def _disk_matched(self, key: str) -> list[Event]:
        # The incremental copy connects to its target a second time, which
        # logs the same DIRECT MATCH again.
        if key == self._disk:
            return []
        self._disk, self._total, self._copied = key, None, None
        sync_type, reason = self._decision or ("", "")
        self._decision = None
        return [events.DiskStart(disk_key=key, sync_type=sync_type, sync_reason=reason)]

    def _decided(self, sync_type: str, reason: str) -> list[Event]:
        if self._disk is not None and self._copied is None:
            return [
                events.DiskStart(
                    disk_key=self._disk,
                    sync_type=sync_type,
                    sync_reason=reason,
                    bytes_total=self._total,
                )
            ]
        self._decision = (sync_type, reason)
        return []

    def _copied_all(self, copied: Optional[int]) -> list[Event]:
        if copied is None:
            copied = self._total
        if copied is None:
            return []
        self._copied = self._total = copied
        return [events.Progress(bytes_done=copied, bytes_total=copied, disk_key=self._disk)]

    def _stored(self, rest: str) -> list[Event]:
        change_id = rest.strip()
        if not change_id or len(change_id) > MAX_CHANGE_ID or _UNSAFE.search(change_id):
            return []
        done = events.DiskDone(
            disk_key=self._disk,
            change_id=change_id,
            bytes_done=self._copied,
            bytes_total=self._total,
        )
        self._disk, self._total, self._copied = None, None, None
        return [done]
