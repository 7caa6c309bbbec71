"""Checking that NBD targets answer, without opening their exports.

This module owns the pre-flight probe of ``POST /backup/start``: connect, do
the fixed-newstyle handshake, ask ``NBD_OPT_INFO`` about the export (or find
it in ``NBD_OPT_LIST`` on servers without INFO), then ``NBD_OPT_ABORT`` and
close.  The export is never entered, so a hub's qemu-nbd started with
``--shared=1`` is free for the backup client as soon as the probe's
Deferred fires (the connection is closed by then).  A failure becomes a
:class:`ProbeFailed` whose ``reason`` an API can map to a status code.  It
does not validate target hosts or ports (the API does) and never writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, Literal, Optional, Protocol, TypeVar

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
)
from twisted.internet.defer import (
    TimeoutError as DeferredTimeoutError,
)
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.nbd.client import ack_now, client_endpoint, connect_protocol, feed_handshake
from sna.nbd.errors import (
    ExportNotFound,
    HandshakeError,
    NBDError,
    NotNBDServer,
)
from sna.nbd.wire import (
    ClientHandshake,
    ExportInfo,
    ExportInfoReceived,
    Goal,
    SessionEnded,
)

log = Logger()

DEFAULT_PROBE_TIMEOUT = 5.0
#: How long a refused target is asked again.  The SHA starts qemu-nbd and calls
#: backup/start without waiting for it to listen (sha-contract.md §1.2).
REFUSED_GRACE = 1.0
REFUSED_RETRY = 0.05

ProbeReason = Literal[
    "refused", "timeout", "not_nbd", "export_missing", "handshake_error", "unreachable"
]


class ProbeFailed(NBDError):
    """A target did not answer as an NBD server with that export."""

    def __init__(self, reason: ProbeReason, message: str) -> None:
        self.reason: ProbeReason = reason
        self.message = message
        super().__init__(message)


class NbdAddress(Protocol):
    """What :func:`probe_all` needs of a target (`sna.jobs.model.NbdTarget` fits)."""

    @property
    def disk_key(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def export(self) -> str: ...


TargetT = TypeVar("TargetT", bound=NbdAddress)


@attrs.frozen
class ProbeResult(Generic[TargetT]):
    """One target's outcome: ``info`` when it answered, else ``error``."""

    target: TargetT
    info: Optional[ExportInfo] = None
    error: Optional[ProbeFailed] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Timeout(Exception):
    """The probe's own deadline passed (whatever the cancellation then raised)."""


class _ProbeProtocol(TwistedProtocol):
    """Runs ``Goal.INFO``; ``result`` fires once the connection is closed."""

    def __init__(self, export: str) -> None:
        self._handshake = ClientHandshake(export, Goal.INFO)
        self._info: Optional[ExportInfo] = None
        self._error: Optional[NBDError] = None
        self.connected_at_all = False
        self.result: Deferred[ExportInfo] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.connected_at_all = True

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None or self._handshake.finished:
            return
        transport = self.transport
        assert transport is not None
        ack_now(transport)
        events, error = feed_handshake(
            self._handshake, data, transport.write, transport.loseConnection
        )
        if error is not None:
            self._error = error
            return
        for event in events:
            if isinstance(event, ExportInfoReceived):
                self._info = event.info
            elif isinstance(event, SessionEnded):
                transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.result.called:
            return
        if self._info is not None:
            # NBD_OPT_ABORT was sent; whether the server acknowledged it or
            # just hung up (the spec allows both), the answer is in.
            self.result.callback(self._info)
            return
        problem = self._error or self._handshake.connection_lost()
        self.result.errback(problem or HandshakeError("the server closed the connection"))

    def _cancel(self, d: Deferred[ExportInfo]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if self._info is not None:
            # Only the ABORT's acknowledgement was missing: the answer stands.
            d.callback(self._info)


def probe(
    reactor: IReactorTCP,
    host: str,
    port: int,
    export: str,
    timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> Deferred[ExportInfo]:
    """Check that ``host:port`` is an NBD server with ``export``; never enters it.

    Fires with the export's :class:`ExportInfo` once the connection is
    closed again, or fails with :class:`ProbeFailed`.  The whole probe
    (connect, handshake, abort) is bounded by ``timeout``; on timeout the
    connection is dropped.  ``reactor`` must also provide ``IReactorTime``.
    An export name NBD cannot carry (over 4096 bytes, or with a NUL) raises
    ``ValueError`` at once: that is the caller's validation to do.
    """
    clock = IReactorTime(reactor)
    protocol = _ProbeProtocol(export)
    where = f"NBD export {export!r} at {host}:{port}"

    def answer(_: Any) -> Deferred[ExportInfo]:
        return protocol.result

    def timed_out(result: Any, seconds: float) -> Any:
        if isinstance(result, Failure):
            raise _Timeout()
        return result

    def succeeded(info: ExportInfo) -> ExportInfo:
        log.info(
            "NBD probe {host}:{port}/{export}: {size} bytes, flags {flags:#x}",
            host=host,
            port=port,
            export=export,
            size=info.size,
            flags=info.transmission_flags,
        )
        return info

    def failed(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return failure  # the caller cancelled: not a verdict on the target
        if failure.check(ierror.ConnectingCancelledError):
            return Failure(CancelledError())  # cancelled while still connecting
        problem = _classify(failure, where, timeout, protocol.connected_at_all)
        log.info(
            "NBD probe {host}:{port}/{export} failed ({reason}): {message}",
            host=host,
            port=port,
            export=export,
            reason=problem.reason,
            message=problem.message,
        )
        return Failure(problem)

    d = connect_protocol(client_endpoint(reactor, host, port, timeout), protocol)
    d.addCallback(answer)
    d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
    checked: Deferred[ExportInfo] = d.addCallbacks(succeeded, failed)
    return checked


def _classify(failure: Failure, where: str, timeout: float, connected: bool) -> ProbeFailed:
    e = failure.value
    if isinstance(e, (_Timeout, DeferredTimeoutError, ierror.TimeoutError)):
        if connected:
            return ProbeFailed(
                "timeout",
                f"{where}: connected, but no complete NBD answer within {timeout:g} s "
                "(a qemu-nbd at its --shared limit accepts and stays silent)",
            )
        return ProbeFailed("timeout", f"{where}: TCP connect did not finish within {timeout:g} s")
    if isinstance(e, ierror.ConnectionRefusedError):
        return ProbeFailed("refused", f"{where}: connection refused (nothing listens there)")
    if isinstance(e, NotNBDServer):
        return ProbeFailed("not_nbd", f"{where}: {e}")
    if isinstance(e, ExportNotFound):
        return ProbeFailed("export_missing", f"{where}: {e}")
    if isinstance(e, NBDError):
        return ProbeFailed("handshake_error", f"{where}: NBD handshake failed: {e}")
    return ProbeFailed("unreachable", f"{where}: {failure.getErrorMessage()}")


def probe_all(
    reactor: IReactorTCP,
    targets: Iterable[TargetT],
    timeout: float = DEFAULT_PROBE_TIMEOUT,
    refused_grace: float = REFUSED_GRACE,
) -> Deferred[list[ProbeResult[TargetT]]]:
    """Probe every target at once; one result per target, in the given order.

    Never fails for a target's sake: each failure is a ``ProbeResult`` with
    ``error`` set.  A target that refuses the connection is asked again,
    with growing pauses, for ``refused_grace`` seconds (at most ``timeout``):
    a qemu-nbd started a moment ago may not listen yet.
    """
    clock = IReactorTime(reactor)

    async def one(target: TargetT) -> ProbeResult[TargetT]:
        give_up = clock.seconds() + min(refused_grace, timeout)
        pause = REFUSED_RETRY
        while True:
            try:
                info = await probe(reactor, target.host, target.port, target.export, timeout)
            except ProbeFailed as problem:
                if problem.reason != "refused" or clock.seconds() + pause > give_up:
                    return ProbeResult(target, error=problem)
            else:
                return ProbeResult(target, info=info)
            await deferLater(clock, pause, lambda: None)
            pause *= 2

    return gatherResults(
        [Deferred.fromCoroutine(one(target)) for target in targets], consumeErrors=True
    )
