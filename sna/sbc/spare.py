"""Spare backup clients: started before any job, so a job does not wait for Python's imports.

A spare is our client run as ``standby --spare-id ID`` (:mod:`sna.contract.standby`).
:class:`SparePool` is a service that keeps ``size`` of them: it starts them,
notices when one is ready (its first stdout line), hands a ready one to the
launcher for a job and starts a replacement; one handed out whose job could
not start after all is given back.  A spare that is never used is
retired after :data:`MAX_AGE`, so an upgraded client is picked up without a
restart of sna.

A spare that exits before it is ready (a client without ``standby``, a
broken installation), or soon after, is logged with its last stderr line and
replaced after :data:`RETRY_DELAY`; after :data:`MAX_FAILURES` such exits in
a row the pool stops trying for :data:`MAX_AGE` and every job starts its own
client, as without spares.  A spare the pool stops gets end of file on
stdin, then TERM and KILL if it lingers.  Nothing here touches a job: until
the handover a spare's output goes to the daemon's log.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.contract import standby
from sna.logging import printable

#: An unused spare is replaced after this many seconds.
MAX_AGE = 3600.0
#: Spares that die before they are ready, in a row, before the pool gives up.
MAX_FAILURES = 3
#: Seconds before starting again after a spare died before it was ready.
RETRY_DELAY = 5.0
#: Seconds a spare has to exit after its stdin is closed, before TERM.
STOP_GRACE = 2.0
#: Output a spare may print before it is ready (a traceback, at most).
MAX_EARLY_OUTPUT = 64 * 1024


class SpareProtocol(ProcessProtocol):
    """One spare: waits for its ready line, then forwards everything to its job's protocol."""

    log = Logger()

    def __init__(self, pool: SparePool, spare_id: str, started: float) -> None:
        self.pool = pool
        self.spare_id = spare_id
        self.pid: Optional[int] = None
        self.started = started
        self.ready = False
        self.ready_at = 0.0
        self.ended = False
        self.rejected = False
        self.job: Optional[ProcessProtocol] = None
        self._stop_calls: list[IDelayedCall] = []
        self._out = b""
        self._err = b""
        self.retire_call: Optional[IDelayedCall] = None
        self.gone: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        pass  # stdin stays open: the job comes that way

    def outReceived(self, data: bytes) -> None:
        if self.job is not None:
            self.job.outReceived(data)
            return
        if self.ready or self.rejected:
            # Nothing is expected before the job: said once, otherwise ignored.
            self.log.warn(
                "spare backup client pid {pid} printed '{data}' while waiting",
                pid=self.pid,
                data=printable(data[:200].decode("utf-8", "replace")),
            )
            return
        self._out = (self._out + data)[-MAX_EARLY_OUTPUT:]
        line, newline, _ = self._out.partition(b"\n")
        if not newline:
            return
        self._out = b""
        if line.rstrip(b"\r") == standby.READY_LINE:
            self.ready = True
            self.pool._spare_ready(self)
        else:
            self.rejected = True
            self.log.warn(
                "spare backup client pid {pid} printed '{line}' instead of its ready line; "
                "stopping it",
                pid=self.pid,
                line=printable(line[:200].decode("utf-8", "replace")),
            )
            self.pool._retire(self, "it did not say it was ready")

    def errReceived(self, data: bytes) -> None:
        if self.job is not None:
            self.job.errReceived(data)
            return
        self._err = (self._err + data)[-MAX_EARLY_OUTPUT:]

    def last_error(self) -> str:
        lines = [x.strip() for x in self._err.decode("utf-8", "replace").splitlines()]
        lines = [x for x in lines if x]
        return lines[-1] if lines else "no output"

    def hand_over(
        self, argv: Sequence[str], env: Mapping[str, str], protocol: ProcessProtocol
    ) -> IProcessTransport:
        """Give this spare its job; from now on ``protocol`` sees all it does."""
        transport = self.transport
        assert transport is not None and self.ready and not self.ended
        self.job = protocol
        if self.retire_call is not None and self.retire_call.active():
            self.retire_call.cancel()
        transport.write(standby.encode_job(argv, env))
        # The job's protocol closes stdin in its connectionMade, after the line is flushed.
        protocol.makeConnection(transport)
        return transport

    def stop(self, clock: IReactorTime) -> None:
        """End an unused spare: end of file on its stdin, which it takes as "not needed";
        TERM after :data:`STOP_GRACE` and KILL after twice that if it is still there."""
        if self.transport is None or self.ended or self._stop_calls:
            return
        self.transport.closeStdin()
        self._stop_calls = [
            clock.callLater(STOP_GRACE, self._signal, "TERM"),
            clock.callLater(2 * STOP_GRACE, self._signal, "KILL"),
        ]

    def _signal(self, name: str) -> None:
        if self.transport is not None and not self.ended:
            self.log.warn(
                "spare backup client pid {pid} did not exit; sending {signal}",
                pid=self.pid,
                signal=name,
            )
            try:
                self.transport.signalProcess(name)
            except ierror.ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        for call in [self.retire_call, *self._stop_calls]:
            if call is not None and call.active():
                call.cancel()
        try:
            if self.job is not None:
                self.job.processEnded(reason)
            else:
                self.pool._spare_ended(self, reason)
        finally:
            self.gone.callback(None)


class SparePool(Service):
    """Keeps ``size`` spare clients started and ready; :meth:`take` hands one out."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        executable: Callable[[], str],
        prefix: Sequence[str],
        env: Mapping[str, str],
        size: int = 1,
    ) -> None:
        """``executable`` is a callable giving the program's path (or raising, see
        :meth:`sna.sbc.command.ClientCommand.executable`); ``prefix`` the
        arguments before ``standby``; ``env`` the spares' whole environment."""
        self._reactor = reactor
        self._clock = clock
        self._executable = executable
        self._prefix = tuple(prefix)
        self._env = dict(env)
        self.size = size
        self.spares: list[SpareProtocol] = []
        #: Spares being stopped (retired, rejected): waited for at shutdown.
        self._stopping: set[SpareProtocol] = set()
        self._failures = 0
        self.disabled: Optional[str] = None
        self._retry: Optional[IDelayedCall] = None

    # -- the service --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._fill()

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        spares, self.spares = self.spares, []
        for spare in spares:
            spare.stop(self._clock)
        waiting = [s.gone for s in (*spares, *self._stopping) if not s.ended]
        return DeferredList(waiting)

    # -- handing out ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Spares by state, for /metrics: ``starting`` (importing) and ``ready``."""
        ready = sum(1 for s in self.spares if s.ready and not s.ended)
        return {"starting": len(self.spares) - ready, "ready": ready}

    def take(self) -> Optional[SpareProtocol]:
        """A ready spare, now no longer the pool's, or ``None``; a replacement is started."""
        for spare in self.spares:
            if spare.ready and not spare.ended:
                self.spares.remove(spare)
                # After the handover: the job's start does not wait for a fork.
                self._clock.callLater(0, self._fill)
                return spare
        return None

    def give_back(self, spare: SpareProtocol) -> None:
        """A spare :meth:`take` handed out whose job could not start after all: the pool's
        again (its replacement is not started), or stopped if the pool has enough."""
        usable = spare.ready and not spare.ended and spare.job is None
        if self.running and usable and len(self.spares) < self.size:
            self.spares.insert(0, spare)
            return
        self._stopping.add(spare)
        spare.gone.addBoth(lambda _: self._stopping.discard(spare))
        spare.stop(self._clock)

    def _fill(self) -> None:
        while self.running and self.disabled is None and len(self.spares) < self.size:
            if self._retry is not None and self._retry.active():
                return
            if not self._start_one():
                return

    def _retry_later(self, delay: float = RETRY_DELAY) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(delay, self._fill)

    def _enable_again(self) -> None:
        self.log.info("trying spare backup clients again")
        self.disabled = None
        self._failures = 0
        self._fill()

    def _start_one(self) -> bool:
        try:
            executable = self._executable()
        except Exception as e:
            self.log.warn("cannot start a spare backup client: {reason}", reason=str(e))
            self._retry_later()
            return False
        spare_id = secrets.token_hex(8)
        spare = SpareProtocol(self, spare_id, self._clock.seconds())
        args = [
            executable,
            *self._prefix,
            standby.COMMAND,
            standby.SPARE_ID_OPTION,
            spare_id,
        ]
        try:
            transport = self._reactor.spawnProcess(
                spare, executable, args, env=self._env, path=None
            )
        except OSError as e:
            self.log.warn(
                "cannot start a spare backup client {exe}: {reason}",
                exe=executable,
                reason=e.strerror or str(e),
            )
            self._retry = self._clock.callLater(RETRY_DELAY, self._fill)
            return False
        spare.pid = transport.pid
        self.spares.append(spare)
        spare.retire_call = self._clock.callLater(MAX_AGE, self._retire, spare, "unused")
        self.log.debug("spare backup client pid {pid} started", pid=spare.pid)
        return True

    def _retire(self, spare: SpareProtocol, why: str) -> None:
        """Stop a spare that is not handed out (unused too long, or not ready as it should be)."""
        if spare in self.spares:
            self.log.info("retiring spare backup client pid {pid} ({why})", pid=spare.pid, why=why)
            self.spares.remove(spare)
            self._stopping.add(spare)
            spare.gone.addBoth(lambda _: self._stopping.discard(spare))
            spare.stop(self._clock)
            self._fill()

    # -- what spares do -----------------------------------------------------------------------

    def _spare_ready(self, spare: SpareProtocol) -> None:
        spare.ready_at = self._clock.seconds()
        self.log.debug("spare backup client pid {pid} ready", pid=spare.pid)

    def _spare_ended(self, spare: SpareProtocol, reason: Failure) -> None:
        was_ours = spare in self.spares
        if was_ours:
            self.spares.remove(spare)
        if not self.running:
            return
        if spare.ready and not was_ours:
            self._fill()  # stopped by us: expected
            return
        if spare.ready and self._clock.seconds() - spare.ready_at >= MAX_AGE / 2:
            # It served its time: a spare killed by someone after a long wait.
            self._failures = 0
            self.log.warn(
                "spare backup client pid {pid} exited while waiting: {reason}",
                pid=spare.pid,
                reason=reason.getErrorMessage(),
            )
            self._fill()
            return
        self._failures += 1
        self.log.warn(
            "spare backup client pid {pid} exited {when} ({reason}): {last}",
            pid=spare.pid,
            when="while waiting" if spare.ready else "before it was ready",
            reason=reason.getErrorMessage(),
            last=spare.last_error(),
        )
        if self._failures >= MAX_FAILURES:
            self.disabled = spare.last_error()
            self.log.warn(
                "no spare backup clients after {count} failures in a row; each job starts "
                "its own client; trying again in {delay:g} s",
                count=self._failures,
                delay=MAX_AGE,
            )
            self._retry = self._clock.callLater(MAX_AGE, self._enable_again)
            return
        self._retry_later()
