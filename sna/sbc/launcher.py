"""Starting and stopping a job's backup client.

:class:`ProcessLauncher` (the one :class:`IProcessLauncher`) opens the job log,
builds the protocol with the right parser, and starts the client: a spare from
:mod:`sna.sbc.spare` when one is ready, else ``reactor.spawnProcess`` with the
argv and environment of :class:`~sna.sbc.command.ClientCommand`.  A job log
that cannot be written is :class:`JobLogUnwritable`, raised before any client
has the job (a spare taken for it goes back to the pool).
:class:`ClientProcess` stops a child procmon-style: TERM, then KILL after a
grace period.  Reading the child's output is the protocol's
(:mod:`sna.sbc.protocol`); clients a dead daemon left are not ours to stop
here (:mod:`sna.jobs.leftovers`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Optional

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from sna.contract import ids
from sna.contract.secrets import Masker
from sna.jobs.model import BackupRequest
from sna.sbc.command import ClientCommand, ClientUnavailable
from sna.sbc.joblog import LogDirectory
from sna.sbc.parse import parser_for
from sna.sbc.protocol import BackupClientProtocol, IClientObserver
from sna.sbc.spare import SparePool


class JobLogUnwritable(ClientUnavailable):
    """The job's log cannot be written (its disk is full or read-only): no client was started."""


class ClientProcess:
    """A running backup client: its pid, and stopping it TERM-then-KILL."""

    log = Logger()

    def __init__(
        self,
        transport: IProcessTransport,
        protocol: BackupClientProtocol,
        clock: IReactorTime,
        spare_id: Optional[str] = None,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._clock = clock
        self._kill_call: Optional[IDelayedCall] = None
        self.pid: int = transport.pid or 0
        #: A spare's ``--spare-id``: what names the process when its argv does not name the job.
        self.spare_id = spare_id
        self.running = True
        protocol.ended.addBoth(self._ended)

    def _ended(self, result: object) -> object:
        self.running = False
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        return result

    def _signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except ierror.ProcessExitedAlready:
            pass

    def stop(self, grace: float) -> Deferred[None]:
        """SIGTERM now, SIGKILL if still running after ``grace`` seconds; fires once reaped."""
        if not self.running:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._protocol.ended.addBoth(lambda _: done.callback(None))
        if self._kill_call is None:
            self.log.info("stopping backup client pid {pid} (TERM)", pid=self.pid)
            self._signal("TERM")
            self._kill_call = self._clock.callLater(grace, self._kill)
        return done

    def _kill(self) -> None:
        self.log.warn("backup client pid {pid} ignored TERM; sending KILL", pid=self.pid)
        self._signal("KILL")


class IProcessLauncher(Interface):
    """Starts backup clients."""

    def check() -> None:
        """Raise :class:`ClientUnavailable` if no client can be started now."""

    def launch(request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        """Start the client for ``request``; raise :class:`ClientUnavailable` if it cannot be
        (:class:`JobLogUnwritable` if its log cannot be written)."""

    def storage_problem() -> Optional[str]:
        """Why job logs cannot be written now, or ``None``."""


@implementer(IProcessLauncher)
class ProcessLauncher:
    """The real launcher: ``reactor.spawnProcess`` with an explicit argv and environment."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        command: ClientCommand,
        log_dir: LogDirectory,
        now: Callable[[], datetime],
        environ: Optional[Mapping[str, str]] = None,
        spares: int = 0,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.command = command
        self._log_dir = log_dir
        self._now = now
        self._environ = dict(os.environ if environ is None else environ)
        #: Clients started ahead of jobs (our client only, never the legacy one);
        #: a service for the caller to start.
        self.spares: Optional[SparePool] = None
        if spares > 0 and not command.legacy:
            self.spares = SparePool(
                reactor,
                clock,
                command.executable,
                command.argv[1:],
                command.base_environment(self._environ),
                size=spares,
            )

    def check(self) -> None:
        self.command.executable()

    def storage_problem(self) -> Optional[str]:
        return self._log_dir.problem()

    def log_path(self, job_id: str) -> FilePath[str]:
        return self._log_dir.current.child(ids.log_file_name(job_id))

    def launch(self, request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        executable = self.command.executable()
        if self.command.legacy and (request.previous_change_ids or request.vcenter_thumbprint):
            self.log.warn(
                "job {job_id}: the legacy client takes no per-disk change IDs and no "
                "vCenter thumbprint; they are not passed on",
                job_id=request.job_id,
            )
        args = [executable, *self.command.arguments(request)]
        env = self.command.environment(request, self._environ)
        log_path = self.log_path(request.job_id)
        new_log = not log_path.exists()
        try:
            job_log = self._log_dir.open(log_path, self._now)
        except OSError as e:
            raise JobLogUnwritable(
                f"cannot open the job log {log_path.path}: {e.strerror or e}"
            ) from e
        spare = self.spares.take() if self.spares is not None else None
        if spare is not None:
            job_log.write(
                "sna",
                f"starting {self._shown(args, request)} in spare client pid {spare.pid} "
                f"(started {self._clock.seconds() - spare.started:.1f} s ago)",
            )
        else:
            job_log.write("sna", f"starting {self._shown(args, request)}")
        if job_log.problem is not None:
            # A job whose log cannot be written is not started: nothing would tell
            # an operator what it did.
            job_log.close()
            self._forget_log(log_path, new_log)
            if spare is not None and self.spares is not None:
                self.spares.give_back(spare)
            raise JobLogUnwritable(job_log.problem)
        if spare is not None:
            base = self.command.base_environment(self._environ)
            added = {k: v for k, v in env.items() if base.get(k) != v}
        legacy = self.command.legacy
        parser = parser_for(legacy)
        protocol = BackupClientProtocol(
            request.job_id,
            observer,
            job_log,
            parser,
            parser if legacy else None,
            secrets=(request.vcenter_password,),
        )
        if spare is not None:
            # The spare was started with the command's own arguments; the job's follow them.
            transport = spare.hand_over(args[len(self.command.argv) :], added, protocol)
            process = ClientProcess(transport, protocol, self._clock, spare.spare_id)
            job_log.write("sna", f"pid {process.pid}")
            self.log.info(
                "job {job_id}: handed to spare backup client pid {pid}",
                job_id=request.job_id,
                pid=process.pid,
            )
            return process
        try:
            transport = self._reactor.spawnProcess(protocol, executable, args, env=env, path=None)
        except OSError as e:
            job_log.close()
            self._forget_log(log_path, new_log)
            raise ClientUnavailable(f"cannot start backup client {executable}: {e}") from e
        process = ClientProcess(transport, protocol, self._clock)
        job_log.write("sna", f"pid {process.pid}")
        self.log.info(
            "job {job_id}: started backup client pid {pid}", job_id=request.job_id, pid=process.pid
        )
        return process

    def _forget_log(self, log_path: FilePath[str], new_log: bool) -> None:
        """No job exists: leave no log claiming one did."""
        if not new_log:
            return
        try:
            log_path.remove()
        except OSError as e:
            self.log.warn(
                "cannot remove the log {path} of a job not started: {reason}",
                path=log_path.path,
                reason=e.strerror,
            )

    @staticmethod
    def _shown(args: Sequence[str], request: BackupRequest) -> str:
        """The command line as it may be logged: the password masked, in any form."""
        return Masker([request.vcenter_password])(shlex.join(args))
