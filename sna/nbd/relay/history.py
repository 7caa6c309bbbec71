"""Relay throughput over the last minutes, per NBD target port, for the dashboard.

:class:`RelayHistory` reads the registry's cumulative byte counts every
:data:`INTERVAL` seconds and keeps, per NBD target port, what crossed the
relays of that port between two readings, for the last :data:`WINDOW`
seconds (``GET /api/v1/relays/history``).  :class:`RelayHistorySampler` is
the service that reads it on the reactor's clock while the daemon runs.

It only reads :class:`RelayRegistry`: it starts, stops and touches no relay
and no byte.  Its memory is bounded: at most ``WINDOW / INTERVAL`` samples per
port and :data:`MAX_PORTS` ports; a port that had no relay and moved no
byte for a whole window is forgotten.  Nothing of it survives a restart.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.nbd.relay.counters import RelayStats
from sna.nbd.relay.registry import RelayRegistry

__all__ = [
    "INTERVAL",
    "MAX_PORTS",
    "WINDOW",
    "PortHistory",
    "RelayHistory",
    "RelayHistorySampler",
    "Sample",
]

log = Logger()

#: Seconds between two readings of the registry.
INTERVAL = 5.0
#: Seconds of samples kept per port.
WINDOW = 600.0
#: Most ports kept; past it, the ports idle the longest are forgotten first.
#: (The daemon's NBD port range is 101 ports by default.)
MAX_PORTS = 256


@attrs.frozen
class Sample:
    """What crossed one port's relays between two readings."""

    at: float
    """When the span ended, in the sampler clock's seconds."""
    time: datetime
    """When the span ended, by the wall clock."""
    seconds: float
    """How long the span was (``INTERVAL`` unless readings were late)."""
    bytes_to_hub: int
    bytes_from_hub: int
    job_id: Optional[str]
    """The job whose relay served the port when the span ended; None if none did."""

    @property
    def throughput_bps(self) -> float:
        """Both directions together, in bytes per second over the span."""
        return (self.bytes_to_hub + self.bytes_from_hub) / self.seconds


@attrs.define
class PortHistory:
    """One NBD target port's samples, oldest first, and what is known of its relay."""

    port: int
    samples: deque[Sample]
    job_id: Optional[str] = None
    export: Optional[str] = None
    disk_key: Optional[str] = None
    active: bool = False
    """Whether a relay serves the port now."""
    last_traffic: float = -math.inf
    """When bytes last crossed (or a relay last served) the port, in clock seconds."""


class RelayHistory:
    """Per NBD target port, the bytes its relays moved in each of the last spans.

    Each :meth:`sample` reads :meth:`RelayRegistry.totals` (which keeps the
    bytes of removed relays, so counts never go backwards) and records the
    difference from the previous reading as one :class:`Sample` per port.
    The first reading only sets the baseline.
    """

    def __init__(
        self,
        registry: RelayRegistry,
        clock: IReactorTime,
        now: Callable[[], datetime],
        interval: float = INTERVAL,
        window: float = WINDOW,
        max_ports: int = MAX_PORTS,
    ) -> None:
        if not 0 < interval <= window:
            raise ValueError("the interval must be positive and at most the window")
        self.interval = interval
        self.window = window
        self._registry = registry
        self._clock = clock
        self._now = now
        self._max_ports = max_ports
        self._per_port = math.ceil(window / interval)
        self._ports: dict[int, PortHistory] = {}
        self._previous: Optional[dict[int, tuple[int, int]]] = None
        self._previous_at = 0.0
        self.sampled_at: Optional[datetime] = None
        """When the last reading was taken, by the wall clock; None before the first."""

    def sample(self) -> None:
        """Read the registry once and record what moved since the last reading."""
        at = self._clock.seconds()
        totals = _per_port(self._registry.totals())
        live = {stats.port: stats for stats in _live_stats(self._registry)}
        previous, since = self._previous, self._previous_at
        if previous is not None and at <= since:
            return  # the clock did not move: nothing to divide by
        self._previous, self._previous_at = totals, at
        self.sampled_at = self._now()
        if previous is None:
            return
        seconds = at - since
        for port in sorted(set(totals) | set(live)):
            to_hub, from_hub = totals.get(port, (0, 0))
            before_to, before_from = previous.get(port, (0, 0))
            moved = (max(to_hub - before_to, 0), max(from_hub - before_from, 0))
            stats = live.get(port)
            history = self._ports.get(port)
            if history is None:
                if stats is None and moved == (0, 0):
                    continue  # a port used long ago: nothing to show
                history = self._ports[port] = PortHistory(port, deque(maxlen=self._per_port))
            history.samples.append(
                Sample(
                    at=at,
                    time=self.sampled_at,
                    seconds=seconds,
                    bytes_to_hub=moved[0],
                    bytes_from_hub=moved[1],
                    job_id=stats.job_id if stats is not None else None,
                )
            )
            history.active = stats is not None
            if stats is not None:
                history.job_id, history.export = stats.job_id, stats.export
                history.disk_key = stats.disk_key
            if stats is not None or moved != (0, 0):
                history.last_traffic = at
        self._forget(at)

    def _forget(self, at: float) -> None:
        """Drop samples older than the window, idle ports, and ports past the bound."""
        oldest = at - self.window
        for port, history in list(self._ports.items()):
            while history.samples and history.samples[0].at <= oldest:
                history.samples.popleft()
            if not history.samples or (not history.active and history.last_traffic <= oldest):
                del self._ports[port]
        if len(self._ports) > self._max_ports:
            by_age = sorted(self._ports.values(), key=lambda h: (h.last_traffic, h.port))
            for history in by_age[: len(self._ports) - self._max_ports]:
                del self._ports[history.port]

    def ports(self) -> list[PortHistory]:
        """Every port kept, by port number."""
        return [self._ports[port] for port in sorted(self._ports)]


def _per_port(totals: dict[tuple[int, str], int]) -> dict[int, tuple[int, int]]:
    """``RelayRegistry.totals()`` as ``{port: (to_hub, from_hub)}``."""
    ports: dict[int, tuple[int, int]] = {}
    for (port, direction), count in totals.items():
        to_hub, from_hub = ports.get(port, (0, 0))
        if direction == "to_hub":
            to_hub += count
        else:
            from_hub += count
        ports[port] = (to_hub, from_hub)
    return ports


def _live_stats(registry: RelayRegistry) -> list[RelayStats]:
    return [relay.stats() for relay in registry.relays()]


class RelayHistorySampler(Service):
    """Takes a :class:`RelayHistory` sample every ``history.interval`` seconds.

    A reading that raises is logged and the next one still happens: the
    history is for people, and must never stop the daemon or the sampling.
    """

    def __init__(self, history: RelayHistory, clock: IReactorTime) -> None:
        self._history = history
        self._loop = LoopingCall(self._sample)
        self._loop.clock = clock
        self._running: Optional[Deferred[LoopingCall]] = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._running = self._loop.start(self._history.interval, now=True)
        self._running.addErrback(self._stopped_by_error)

    def stopService(self) -> Optional[Deferred[None]]:
        if self._loop.running:
            self._loop.stop()
        self._running = None
        return super().stopService()  # type: ignore[no-any-return, no-untyped-call]

    def _sample(self) -> None:
        try:
            self._history.sample()
        except Exception:
            log.failure("cannot sample the relays' byte counts")

    def _stopped_by_error(self, failure: Failure) -> None:
        # _sample catches what sample() raises: this is a bug in the loop itself.
        log.failure("the relay history sampler stopped", failure)
