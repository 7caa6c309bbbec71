"""The client's stdout: JSON-line events, as ``docs/sbc-events.md`` specifies.

:func:`encode` turns one event into one line (UTF-8 JSON, one object, no NaN,
``\\n``-terminated); :class:`EventWriter` writes lines to stdout, flushing each
one, and keeps the contract's ordering rules (one ``disk_start`` per disk,
nothing for a disk after its ``disk_done``, nothing after ``done``).  Secrets
handed to the writer are masked in every text field.

This module owns stdout and nothing else: human logs go to stderr through
Twisted's logger, never here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Optional, Union

from twisted.logger import Logger

from sna.contract import events as contract

log = Logger()

MAX_TEXT = contract.MAX_TEXT
MASK = contract.MASK

Value = Union[str, int, float, bool, None]


def rfc3339(moment: datetime) -> str:
    stamp = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def encode(event: str, fields: Mapping[str, Value], *, ts: Optional[str] = None) -> bytes:
    """One event as one line: ``{"event": ..., fields..., "ts": ...}\\n``.

    ``None`` fields are left out (absent and null mean the same to sna);
    non-finite floats are refused, since sna drops a line that has one.
    """
    record: dict[str, Any] = {"event": event}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"event field {key} is not finite: {value!r}")
        record[key] = value
    if ts is not None:
        record["ts"] = ts
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "replace") + b"\n"


class EventWriter:
    """Writes events to a binary stream (stdout), one flushed line each.

    If the stream breaks (the daemon went away), events are dropped and the
    run goes on: the cleanup (removing the snapshot) matters more than the
    report.
    """

    def __init__(
        self,
        stream: IO[bytes],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        secrets: Iterable[str] = (),
    ) -> None:
        self._stream = stream
        self._now = now
        self._secrets = tuple(s for s in secrets if s)
        self._planned: set[str] = set()
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._done = False
        self.broken = False

    def _text(self, text: str) -> str:
        return mask(text, self._secrets)[:MAX_TEXT]

    def emit(self, event: str, **fields: Value) -> None:
        if self._done:
            log.warn("event {event} after done is not sent", event=event)
            return
        clean = {k: self._text(v) if isinstance(v, str) else v for k, v in fields.items()}
        line = encode(event, clean, ts=rfc3339(self._now()))
        if self.broken:
            return
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            self.broken = True
            log.error("stdout is gone, events are no longer sent: {error}", error=str(e))

    # -- the event kinds of docs/sbc-events.md --------------------------------

    def phase(self, phase: str, message: str) -> None:
        self.emit(contract.PHASE, phase=phase, message=message)

    def disk_plan(
        self, disk_key: str, sync_type: str, sync_reason: str, bytes_total: int, **extra: Value
    ) -> None:
        """What one disk's copy will do, sent for every disk before any is copied."""
        self._once(contract.DISK_PLAN, self._planned, disk_key)
        self._disk(contract.DISK_PLAN, disk_key, sync_type, sync_reason, bytes_total, extra)

    def disk_start(
        self, disk_key: str, sync_type: str, sync_reason: str, bytes_total: int, **extra: Value
    ) -> None:
        self._once(contract.DISK_START, self._started, disk_key)
        self._disk(contract.DISK_START, disk_key, sync_type, sync_reason, bytes_total, extra)

    def _once(self, event: str, sent: set[str], disk_key: str) -> None:
        # A plan comes before the disk's start, and each comes once.
        if disk_key in sent or disk_key in self._started:
            raise RuntimeError(f"{event} for disk {disk_key} after its {event} or start")
        sent.add(disk_key)

    def _disk(
        self,
        event: str,
        disk_key: str,
        sync_type: str,
        sync_reason: str,
        bytes_total: int,
        extra: dict[str, Value],
    ) -> None:
        self.emit(
            event,
            disk_key=disk_key,
            sync_type=sync_type,
            sync_reason=sync_reason,
            bytes_total=bytes_total,
            **extra,
        )

    def progress(
        self, disk_key: str, bytes_done: int, bytes_total: int, throughput_bps: float
    ) -> None:
        if disk_key not in self._started or disk_key in self._finished:
            return
        self.emit(
            contract.PROGRESS,
            disk_key=disk_key,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            throughput_bps=round(throughput_bps, 1),
        )

    def disk_done(self, disk_key: str, change_id: str, **extra: Value) -> None:
        if disk_key not in self._started or disk_key in self._finished:
            raise RuntimeError(f"disk_done for disk {disk_key} out of order")
        self._finished.add(disk_key)
        self.emit(contract.DISK_DONE, disk_key=disk_key, change_id=change_id, **extra)

    def error(self, message: str, disk_key: Optional[str] = None, **extra: Value) -> None:
        self.emit(contract.ERROR, message=message or "unknown error", disk_key=disk_key, **extra)

    def stall(self, on: str, seconds: float, message: str, disk_key: Optional[str] = None) -> None:
        """No progress for ``seconds``, waiting on ``on`` (:data:`contract.STALL_ON`)."""
        if on not in contract.STALL_ON:
            raise ValueError(f"a stall is on one of {sorted(contract.STALL_ON)}, not {on!r}")
        self.emit(
            contract.STALL, on=on, seconds=round(seconds, 1), message=message, disk_key=disk_key
        )

    def resume(self, message: str) -> None:
        self.emit(contract.RESUME, message=message)

    def snapshot(self, name: str, state: str, message: Optional[str] = None) -> None:
        if state not in contract.SNAPSHOT_STATES:
            raise ValueError(
                f"a snapshot is one of {sorted(contract.SNAPSHOT_STATES)}, not {state!r}"
            )
        self.emit(contract.SNAPSHOT, name=name, state=state, message=message)

    def done(self, message: str, **extra: Value) -> None:
        self.emit(contract.DONE, message=message, **extra)
        self._done = True
