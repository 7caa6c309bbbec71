"""A relay's life: listening for one NBD target, its connections, its figures, stopping.

:class:`Relay` owns the listening port, the list of its live connections, the
byte counts of those that ended, and its :class:`RelayPhase`, whose
transitions are all in :data:`TRANSITIONS`.  It never decides what happens to
a job: an upstream failure is reported once per incident through
``on_upstream_lost`` and the job manager decides.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Optional

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorFDSet,
    IReactorTCP,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.nbd.client import client_endpoint
from sna.nbd.relay.connection import ClientProtocol, Connection, ConnectionPhase
from sna.nbd.relay.counters import RateWindow, RelayState, RelayStats

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

__all__ = ["CONNECT_TIMEOUT", "STOP_GRACE", "TRANSITIONS", "DataPath", "Relay", "RelayPhase"]

log = Logger()

DataPath = Literal["auto", "copy", "transport"]

#: How long an upstream connection attempt may take.
CONNECT_TIMEOUT = 30.0
#: How long stop() lets connections flush before aborting them.
STOP_GRACE = 2.0


class RelayPhase(enum.Enum):
    """Where a relay is in its life."""

    SERVING = "serving"
    """Relaying every connection it accepts (from construction to stop())."""
    UPSTREAM_LOST = "upstream_lost"
    """Serving, but the upstream was lost and has not connected since: one incident."""
    STOPPING = "stopping"
    """stop() was called: the listener and every connection are closing."""
    STOPPED = "stopped"
    """All closed; stop() has fired."""


#: Every transition a relay may make.
TRANSITIONS: dict[RelayPhase, frozenset[RelayPhase]] = {
    RelayPhase.SERVING: frozenset({RelayPhase.UPSTREAM_LOST, RelayPhase.STOPPING}),
    RelayPhase.UPSTREAM_LOST: frozenset({RelayPhase.SERVING, RelayPhase.STOPPING}),
    RelayPhase.STOPPING: frozenset({RelayPhase.STOPPED}),
    RelayPhase.STOPPED: frozenset(),
}


class Relay:
    """A loopback listener relaying every connection to one NBD target.

    ``reactor`` must provide :class:`IReactorTCP` and :class:`IReactorTime`;
    the copy path also needs :class:`IReactorFDSet`.  ``clock`` returns
    monotonic seconds (default :func:`time.monotonic`) and is only used for
    the figures.  ``data_path`` is ``"auto"`` (copy where the reactor allows
    it, else transport), ``"copy"`` (fails at construction where unavailable)
    or ``"transport"``.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        target_host: str,
        target_port: int,
        *,
        job_id: str,
        disk_key: str,
        export: str,
        listen_host: str = "127.0.0.1",
        on_upstream_lost: Optional[Callable[[Relay, str], None]] = None,
        clock: Optional[Callable[[], float]] = None,
        data_path: DataPath = "auto",
    ) -> None:
        if data_path not in ("auto", "copy", "transport"):
            raise ValueError(f"unknown data path {data_path!r}")
        fd_reactor = IReactorFDSet.providedBy(reactor)
        if data_path == "copy" and not fd_reactor:
            raise ValueError("the copy data path needs a file-descriptor reactor")
        self._reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.job_id = job_id
        self.disk_key = disk_key
        self.export = export
        self.listen_host = listen_host
        self.listen_port = 0
        self.target = f"{target_host}:{target_port}"
        self._on_upstream_lost = on_upstream_lost
        self._clock = clock or time.monotonic
        # Where connections between real TCP sockets lend them; None: transports.
        self._fdset = IReactorFDSet(reactor) if fd_reactor and data_path != "transport" else None
        self._endpoint = client_endpoint(reactor, target_host, target_port, CONNECT_TIMEOUT)
        self._phase = RelayPhase.SERVING
        # The listener, until it has closed.
        self._port: Optional[IListeningPort] = None
        self._connections: list[Connection] = []
        self._accepted_count = 0
        # Bytes of connections that have ended.
        self._done_to_hub = 0
        self._done_from_hub = 0
        self._started: Optional[float] = None
        self._stopped_at: Optional[float] = None
        self._rate = RateWindow()
        self._upstream_error: Optional[str] = None
        self._stop_waiters: list[Deferred[None]] = []
        self._grace: Optional[IDelayedCall] = None

    @property
    def data_path(self) -> Literal["copy", "transport"]:
        """The path new connections take when both ends are real TCP sockets."""
        return "copy" if self._fdset is not None else "transport"

    async def start(self) -> int:
        """Listen on ``listen_host`` and a free port; return the port."""
        port = await _server_endpoint(self._reactor, self.listen_host).listen(_RelayFactory(self))
        self._port = port
        self.listen_port = int(getattr(port.getHost(), "port", 0))
        self._started = self._clock()
        log.info(
            "relay {job_id}/{disk_key} listening on {listen_host}:{listen_port} for {target}"
            " ({data_path})",
            job_id=self.job_id,
            disk_key=self.disk_key,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            target=self.target,
            data_path=self.data_path,
        )
        return self.listen_port

    def stop(self) -> Deferred[None]:
        """Close the listener and every connection; fires when all are closed.

        Bytes the relay holds are sent on where the peer takes them; a
        connection still open STOP_GRACE seconds later is aborted.
        """
        d: Deferred[None] = Deferred()
        if self._phase is RelayPhase.STOPPED:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if self._phase is RelayPhase.STOPPING:
            return d
        self._enter(RelayPhase.STOPPING)
        self._stopped_at = self._clock()
        if self._port is not None:
            maybeDeferred(self._port.stopListening).addBoth(self._listener_closed)
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            self._grace = IReactorTime(self._reactor).callLater(STOP_GRACE, self._abort_all)
        self._check_stopped()
        return d

    def stats(self) -> RelayStats:
        now = self._clock()
        to_hub, from_hub = self._totals()
        total = to_hub + from_hub
        started = self._started
        end = self._stopped_at if self._stopped_at is not None else now
        elapsed = 0.0 if started is None else end - started
        running = not self._stopping
        return RelayStats(
            port=self.target_port,
            listen_port=self.listen_port,
            job_id=self.job_id,
            export=self.export,
            disk_key=self.disk_key,
            state=self._state(),
            bytes_to_hub=to_hub,
            bytes_from_hub=from_hub,
            connections=self._accepted_count,
            active_connections=len(self._connections),
            started_at=0.0 if started is None else started,
            bytes_per_second_current=(
                self._rate.rate(now, started) if started is not None and running else 0.0
            ),
            bytes_per_second_average=total / elapsed if elapsed > 0 else 0.0,
            upstream_error=self._upstream_error,
        )

    def buffered_bytes(self) -> int:
        """Bytes the relay holds, read from one side but not yet handed to the other's kernel."""
        return sum(conn.buffered() for conn in self._connections)

    # -- what its connections report (sna.nbd.relay.connection.Owner)

    def count(self, n: int) -> None:
        if n:
            self._rate.add(self._clock(), n)

    def upstream_connected(self, conn: Connection) -> None:
        # A working upstream ends an incident: a later loss is a new one.
        if self._phase is RelayPhase.UPSTREAM_LOST:
            self._enter(RelayPhase.SERVING)

    def upstream_lost(self, conn: Connection, reason: str) -> None:
        if self._stopping:
            # The relay is closing everything anyway; not an incident.
            log.info(
                "relay {job_id}/{disk_key} connection {number} while stopping: {reason}",
                job_id=self.job_id,
                disk_key=self.disk_key,
                number=conn.number,
                reason=reason,
            )
            return
        self._upstream_error = reason
        log.warn(
            "relay {job_id}/{disk_key} connection {number}: {reason}",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            reason=reason,
        )
        if self._phase is RelayPhase.UPSTREAM_LOST:
            return
        self._enter(RelayPhase.UPSTREAM_LOST)
        if self._on_upstream_lost is not None:
            try:
                self._on_upstream_lost(self, reason)
            except Exception:
                log.failure("on_upstream_lost of relay {job_id} failed", job_id=self.job_id)

    def connection_ended(self, conn: Connection) -> None:
        to_hub, from_hub = conn.counts()
        self._done_to_hub += to_hub
        self._done_from_hub += from_hub
        self._connections.remove(conn)
        log.info(
            "relay {job_id}/{disk_key} connection {number} closed:"
            " {to_hub} bytes to hub, {from_hub} bytes from hub ({data_path})",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            to_hub=to_hub,
            from_hub=from_hub,
            data_path=conn.data_path,
        )
        self._check_stopped()

    # -- internals

    @property
    def _stopping(self) -> bool:
        return self._phase in (RelayPhase.STOPPING, RelayPhase.STOPPED)

    def _enter(self, phase: RelayPhase) -> None:
        if phase not in TRANSITIONS[self._phase]:
            raise RuntimeError(f"relay {self.job_id}/{self.disk_key}: {self._phase} -> {phase}")
        self._phase = phase

    def _state(self) -> RelayState:
        if self._stopping:
            return "closed"
        if self._phase is RelayPhase.UPSTREAM_LOST:
            return "upstream_lost"
        if any(conn.phase is ConnectionPhase.RELAYING for conn in self._connections):
            return "connected"
        return "listening"

    def _accepted(self, client: ClientProtocol) -> Connection:
        self._accepted_count += 1
        conn = Connection(self, self._accepted_count, client, self._fdset)
        self._connections.append(conn)
        peer = conn.client_transport.getPeer()
        log.info(
            "relay {job_id}/{disk_key} connection {number} from {peer}",
            job_id=self.job_id,
            disk_key=self.disk_key,
            number=conn.number,
            # host:port, not the address object's repr
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
        )
        if self._stopping:
            conn.shutdown()
        else:
            conn.connect(self._endpoint)
        return conn

    def _totals(self) -> tuple[int, int]:
        to_hub, from_hub = self._done_to_hub, self._done_from_hub
        for conn in self._connections:
            a, b = conn.counts()
            to_hub += a
            from_hub += b
        return to_hub, from_hub

    def _listener_closed(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure(
                "relay {job_id}/{disk_key}: closing the listener failed",
                result,
                job_id=self.job_id,
                disk_key=self.disk_key,
            )
        self._port = None
        self._check_stopped()

    def _abort_all(self) -> None:
        self._grace = None
        for conn in list(self._connections):
            conn.abort()

    def _check_stopped(self) -> None:
        if self._phase is not RelayPhase.STOPPING or self._port is not None or self._connections:
            return
        self._enter(RelayPhase.STOPPED)
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        log.info("relay {job_id}/{disk_key} stopped", job_id=self.job_id, disk_key=self.disk_key)
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)


class _RelayFactory(Factory):
    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Optional[IAddress]) -> ClientProtocol:
        return ClientProtocol(self.relay._accepted)


def _server_endpoint(reactor: IReactorTCP, host: str) -> IStreamServerEndpoint:
    if isIPv6Address(host):
        return TCP6ServerEndpoint(reactor, 0, interface=host)
    return TCP4ServerEndpoint(reactor, 0, interface=host)
