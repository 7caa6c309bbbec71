"""What the relay counts and notes of the bytes it moves, without touching them.

This module owns a relay's figures (:class:`RelayStats`, what
``GET /api/v1/relays`` and ``/metrics`` show), the window behind the current
rate (:class:`RateWindow`) and the last bytes a client sent (:class:`LastBytes`),
which tell a clean ``NBD_CMD_DISC`` end of session from a hub that went away.
It does no I/O and holds no connection: the data paths feed it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, Optional, Union

import attrs

from sna.nbd.wire import REQUEST_MAGIC, Command

__all__ = ["RATE_STEP", "RATE_WINDOW", "LastBytes", "RateWindow", "RelayState", "RelayStats"]

#: What ``GET /api/v1/relays`` calls a relay's state (see ``Relay.stats``).
RelayState = Literal["listening", "connected", "closed", "upstream_lost"]

#: bytes_per_second_current covers the last RATE_WINDOW seconds, counted in
#: slots of RATE_STEP seconds (so the window's start moves in steps).
RATE_WINDOW = 5.0
RATE_STEP = 1.0


@attrs.frozen
class RelayStats:
    """One relay's figures at one moment; what ``GET /api/v1/relays`` shows."""

    port: int
    """The NBD target port this relay forwards to."""
    listen_port: int
    job_id: str
    export: str
    disk_key: str
    state: RelayState
    bytes_to_hub: int
    bytes_from_hub: int
    connections: int
    """Client connections accepted since start."""
    active_connections: int
    started_at: float
    """When the relay started listening, in the relay clock's (monotonic) seconds."""
    bytes_per_second_current: float
    """Both directions together, over about the last RATE_WINDOW seconds."""
    bytes_per_second_average: float
    """Both directions together, since start (until stop)."""
    upstream_error: Optional[str]
    """Why the upstream was last lost, if it ever was."""


class RateWindow:
    """Bytes per RATE_STEP slot over the last RATE_WINDOW, for the current rate."""

    def __init__(self, window: float = RATE_WINDOW, step: float = RATE_STEP) -> None:
        self._step = step
        self._count = max(1, math.ceil(window / step))
        # Finished slots (index, bytes); the current one is kept apart so the
        # hot path only adds to an int.
        self._slots: deque[tuple[int, int]] = deque()
        self._slot = -(1 << 62)
        self._bytes = 0

    def add(self, now: float, n: int) -> None:
        slot = int(now // self._step)
        if slot != self._slot:
            if self._bytes:
                self._slots.append((self._slot, self._bytes))
            self._slot, self._bytes = slot, 0
            oldest = slot - self._count
            while self._slots and self._slots[0][0] < oldest:
                self._slots.popleft()
        self._bytes += n

    def rate(self, now: float, since: float) -> float:
        """Bytes per second from the start of the window (or ``since``) to ``now``."""
        slot = int(now // self._step)
        first = slot - self._count
        total = sum(n for index, n in self._slots if first <= index <= slot)
        if first <= self._slot <= slot:
            total += self._bytes
        elapsed = now - max(first * self._step, since)
        return total / elapsed if elapsed > 0 else 0.0


# Enough of the NBD request header to recognise NBD_CMD_DISC, compact or
# extended (NBD_OPT_EXTENDED_HEADERS, qemu >= 8.2; not in sna.nbd.wire).
_REQUEST_MAGIC = REQUEST_MAGIC.to_bytes(4, "big")
_EXTENDED_REQUEST_MAGIC = (0x21E41C71).to_bytes(4, "big")
_CMD_DISC = Command.DISC.to_bytes(2, "big")
_COMPACT = 28
_EXTENDED = 32


class LastBytes:
    """The last bytes of one direction of a connection, as far as the relay saw them."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def add(self, data: Union[bytes, memoryview]) -> None:
        self.tail = (self.tail + bytes(data[-_EXTENDED:]))[-_EXTENDED:]

    def end_with_disconnect(self) -> bool:
        """Whether they end with an NBD_CMD_DISC request, compact or extended."""
        compact, extended = self.tail[-_COMPACT:], self.tail[-_EXTENDED:]
        return (
            len(compact) == _COMPACT and compact[:4] == _REQUEST_MAGIC and compact[6:8] == _CMD_DISC
        ) or (
            len(extended) == _EXTENDED
            and extended[:4] == _EXTENDED_REQUEST_MAGIC
            and extended[6:8] == _CMD_DISC
        )
