"""Every relay of the daemon, for the API and the metrics.

:class:`RelayRegistry` owns the list of live relays and the byte counts of
relays that were removed, so that counters built on it never go backwards.
It starts and stops nothing: ``sna.nbd.gateway`` does.
"""

from __future__ import annotations

from sna.nbd.relay.counters import RelayStats
from sna.nbd.relay.lifecycle import Relay

__all__ = ["RelayRegistry"]


class RelayRegistry:
    """Every relay of the daemon, for ``GET /api/v1/relays`` and ``/metrics``.

    :meth:`totals` keeps counting the bytes of removed relays, so Prometheus
    counters built on it never go backwards.  Remove a relay once, after its
    stop() has fired, so its last bytes are in the totals.
    """

    def __init__(self) -> None:
        self._relays: list[Relay] = []
        self._retired: dict[tuple[int, str], int] = {}

    def add(self, relay: Relay) -> None:
        if relay not in self._relays:
            self._relays.append(relay)

    def remove(self, relay: Relay) -> None:
        if relay not in self._relays:
            return
        self._relays.remove(relay)
        _add_counts(self._retired, relay.stats())

    def relays(self) -> list[Relay]:
        return list(self._relays)

    def by_job(self, job_id: str) -> list[Relay]:
        return [relay for relay in self._relays if relay.job_id == job_id]

    def totals(self) -> dict[tuple[int, str], int]:
        """Cumulative bytes per (target port, "to_hub" | "from_hub")."""
        totals = dict(self._retired)
        for relay in self._relays:
            _add_counts(totals, relay.stats())
        return totals


def _add_counts(totals: dict[tuple[int, str], int], stats: RelayStats) -> None:
    for direction, count in (("to_hub", stats.bytes_to_hub), ("from_hub", stats.bytes_from_hub)):
        key = (stats.port, direction)
        totals[key] = totals.get(key, 0) + count
