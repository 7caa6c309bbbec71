"""The NBD side of a backup job: probe every target, then relay it.

:class:`NbdGateway` is what the job manager talks to: it probes a job's
targets before anything starts, opens one :class:`~sna.nbd.relay.Relay` per
target for the job's life, and closes them with the job.  It owns the
daemon's :class:`~sna.nbd.relay.RelayRegistry`.  It decides nothing about
jobs: failures go back to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, FirstError, ensureDeferred
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sna.nbd.probe import NbdAddress, ProbeFailed, ProbeResult, probe_all
from sna.nbd.relay import Relay, RelayRegistry, RelayStats

#: How long a target may take to complete the handshake before it is "timeout".
DEFAULT_PROBE_TIMEOUT = 5.0


class ITargetGateway(Interface):
    """Probes and relays the NBD targets of jobs."""

    def probe(targets: Sequence[NbdAddress], timeout: float) -> Deferred[list[ProbeResult[Any]]]:
        """Probe every target concurrently; one result per target, in order."""

    def open_relays(
        job_id: str, targets: Sequence[NbdAddress], on_lost: Callable[[str, str], None]
    ) -> Deferred[list[int]]:
        """Start one relay per target; fires with their loopback ports, in order.

        ``on_lost(disk_key, reason)`` is called when a target's upstream drops.
        """

    def close_relays(job_id: str) -> Deferred[list[RelayStats]]:
        """Stop the job's relays; fires with their final figures once their
        connections are closed (bytes still in flight at the client's exit
        are counted by then)."""

    def stats(job_id: str) -> list[RelayStats]:
        """The job's relays, as they stand."""

    def all_stats() -> list[RelayStats]:
        """Every open relay, as it stands."""


@implementer(ITargetGateway)
class NbdGateway:
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        registry: RelayRegistry,
        tunnel_down: Callable[[str, int], Optional[str]] = lambda host, port: None,
    ) -> None:
        self._reactor = reactor
        self.registry = registry
        #: Why the tunnel to the hub cannot carry ``host:port`` now (sna.tunnel), or None.
        self._tunnel_down = tunnel_down

    def probe(
        self, targets: Sequence[NbdAddress], timeout: float
    ) -> Deferred[list[ProbeResult[Any]]]:
        def unwrap(failure: Failure) -> Failure:
            # probe_all fails only when cancelled (the HTTP client went away):
            # pass the CancelledError itself on, not gatherResults' FirstError.
            failure.trap(FirstError)
            first = failure.value
            assert isinstance(first, FirstError)
            sub: Failure = first.subFailure
            return sub

        return (
            probe_all(self._reactor, targets, timeout)
            .addCallback(self._blame_tunnel)
            .addErrback(unwrap)
        )

    def _blame_tunnel(self, results: list[ProbeResult[Any]]) -> list[ProbeResult[Any]]:
        """A failed target's message says so when the tunnel that carries its port is down."""
        blamed = []
        for result in results:
            error, target = result.error, result.target
            why = None if error is None else self._tunnel_down(target.host, target.port)
            if error is not None and why is not None:
                message = f"the tunnel to the hub is down ({why}); {error.message}"
                result = attrs.evolve(result, error=ProbeFailed(error.reason, message))
            blamed.append(result)
        return blamed

    def open_relays(
        self, job_id: str, targets: Sequence[NbdAddress], on_lost: Callable[[str, str], None]
    ) -> Deferred[list[int]]:
        return ensureDeferred(self._open(job_id, targets, on_lost))

    async def _open(
        self, job_id: str, targets: Sequence[NbdAddress], on_lost: Callable[[str, str], None]
    ) -> list[int]:
        ports = []
        for target in targets:
            relay = Relay(
                self._reactor,
                target.host,
                target.port,
                job_id=job_id,
                disk_key=target.disk_key,
                export=target.export,
                on_upstream_lost=lambda relay, reason: on_lost(relay.disk_key, reason),
            )
            self.registry.add(relay)
            try:
                ports.append(await relay.start())
            except BaseException:
                await self.close_relays(job_id)
                raise
            self.log.info(
                "job {job_id}: relay 127.0.0.1:{listen_port} -> {host}:{port} ({export})",
                job_id=job_id,
                listen_port=relay.listen_port,
                host=target.host,
                port=target.port,
                export=target.export,
            )
        return ports

    def close_relays(self, job_id: str) -> Deferred[list[RelayStats]]:
        relays = self.registry.by_job(job_id)

        def forget(_: object) -> list[RelayStats]:
            final = [relay.stats() for relay in relays]
            for relay in relays:
                self.registry.remove(relay)
            return final

        d: Deferred[Any] = DeferredList([r.stop() for r in relays], consumeErrors=True)
        return d.addCallback(forget)

    def stats(self, job_id: str) -> list[RelayStats]:
        return [r.stats() for r in self.registry.by_job(job_id)]

    def all_stats(self) -> list[RelayStats]:
        return [r.stats() for r in self.registry.relays()]
