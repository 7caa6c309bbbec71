"""Fakes for tests: a process launcher without processes, a store without a disk, a thread
pool without threads.

They implement the same interfaces as the real parts (:class:`IProcessLauncher`,
:class:`IJobStore`) and are importable by any test.  Nothing in the daemon
imports this module.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Optional, TypeVar

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sna.jobs.leftovers import ILeftoverClients
from sna.jobs.model import BackupRequest, Job
from sna.jobs.store import IJobStore, OutboxRow, initial_state
from sna.nbd.gateway import ITargetGateway
from sna.nbd.probe import NbdAddress, ProbeFailed, ProbeResult
from sna.nbd.relay import RelayStats
from sna.nbd.wire import ExportInfo
from sna.sbc.command import ClientCommand, ClientUnavailable
from sna.sbc.joblog import LogDirectory
from sna.sbc.launcher import ClientProcess, ProcessLauncher
from sna.sbc.protocol import IClientObserver
from sna.sha.hub import IHub, Lookup
from sna.sha.messages import Message, final_messages
from sna.vmware.interface import Credentials, IVSphere

T = TypeVar("T")


@implementer(IJobStore)
class MemoryJobStore:
    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] = {}
        self.messages: list[OutboxRow] = []
        #: Never reused, as SQLite's AUTOINCREMENT.
        self._seqs = itertools.count(1)
        self.saves = 0
        self.closed = False

    def save(self, job: Job, outbox: Sequence[Message] = ()) -> None:
        self.saves += 1
        self.jobs[job.job_id] = job.to_record()
        for message in outbox:
            self.messages.append(
                OutboxRow(
                    seq=next(self._seqs),
                    job_id=job.job_id,
                    kind=message.kind,
                    path=message.path,
                    body=message.body,
                    disk_index=message.disk_index,
                    state=initial_state(message),
                    attempts=0,
                    reason=message.not_sent,
                    updated_at="",
                )
            )

    def load_all(self) -> list[Job]:
        return sorted((Job.from_record(r) for r in self.jobs.values()), key=lambda j: j.started_at)

    def delete(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
        self.messages = [m for m in self.messages if m.job_id not in job_ids]

    def load_settings(self) -> dict[str, Any]:
        return dict(self.settings)

    def save_settings(self, values: dict[str, Any]) -> None:
        self.settings = dict(values)

    def outbox(self, job_id: Optional[str] = None) -> list[OutboxRow]:
        return [m for m in self.messages if job_id is None or m.job_id == job_id]

    def outbox_update(self, seq: int, state: str, attempts: int, reason: Optional[str]) -> None:
        self.messages = [
            attrs.evolve(m, state=state, attempts=attempts, reason=reason) if m.seq == seq else m
            for m in self.messages
        ]

    def outbox_forget(self, job_id: str) -> None:
        self.messages = [m for m in self.messages if m.job_id != job_id]

    def outbox_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for message in self.messages:
            counts[message.state] = counts.get(message.state, 0) + 1
        return counts

    def close(self) -> None:
        self.closed = True


@implementer(IProcessTransport)
class FakeProcessTransport(StringTransport):
    """A process that only ends when told to, or on the signals in ``dies_on``.

    What is written to its stdin is in ``value()``.
    """

    def __init__(self, protocol: ProcessProtocol, pid: int, dies_on: tuple[str, ...]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.protocol = protocol
        self.pid: Optional[int] = pid
        self.signals: list[str] = []
        self.dies_on = dies_on
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signalID: str | int) -> None:
        if self.pid is None:
            raise ierror.ProcessExitedAlready()
        self.signals.append(str(signalID))
        if signalID in self.dies_on:
            self.exit(signal={"TERM": 15, "KILL": 9, "INT": 2}.get(str(signalID), 15))

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        raise NotImplementedError("the daemon writes only to a client's stdin")

    def exit(self, code: Optional[int] = None, signal: Optional[int] = None) -> None:
        """End the process with ``code`` or by ``signal``, as the reactor would report it."""
        self.pid = None
        if code == 0:
            reason = Failure(ierror.ProcessDone(0))
        else:
            reason = Failure(ierror.ProcessTerminated(exitCode=code, signal=signal))
        self.protocol.processEnded(reason)


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A clock whose ``spawnProcess`` starts nothing: each process is a
    :class:`FakeProcessTransport` in ``spawned``, with its argv and env."""

    def __init__(self, dies_on: tuple[str, ...] = ("TERM", "KILL")) -> None:
        super().__init__()
        self.dies_on = dies_on
        self.spawned: list[tuple[FakeProcessTransport, list[str], dict[str, str]]] = []
        self._pids = itertools.count(7000)

    def spawnProcess(  # type: ignore[override]
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        path: Optional[str] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        usePTY: bool = False,
        childFDs: Optional[Mapping[int, object]] = None,
    ) -> FakeProcessTransport:
        transport = FakeProcessTransport(processProtocol, next(self._pids), self.dies_on)
        self.spawned.append((transport, list(args), dict(env or {})))
        processProtocol.makeConnection(transport)
        return transport


class FakeLauncher(ProcessLauncher):
    """The real :class:`ProcessLauncher` over a :class:`FakeProcessReactor`: job log,
    protocol, parser and masking as in production, but no process.

    ``transports[job_id]`` is the :class:`FakeProcessTransport` of a job's client
    and ``requests[job_id]`` the (relayed) request it was started with.  With
    ``unavailable`` set, :meth:`check` and :meth:`launch` raise
    :class:`ClientUnavailable` with that message.  ``dies_on`` is the signals the
    clients started from now on exit on.
    """

    def __init__(
        self,
        clock: IReactorTime,
        log_dir: FilePath[str],
        legacy: bool = False,
        dies_on: tuple[str, ...] = ("TERM", "KILL"),
    ) -> None:
        self.reactor = FakeProcessReactor(dies_on)
        logs = LogDirectory(log_dir, log_dir)
        logs.resolve()
        # A program that exists, so that ``executable()`` answers as for a real client.
        command = ClientCommand((sys.executable,), legacy)
        super().__init__(self.reactor, clock, command, logs, fixed_now, environ={})
        self.unavailable: Optional[str] = None
        self.transports: dict[str, FakeProcessTransport] = {}
        self.requests: dict[str, BackupRequest] = {}

    @property
    def dies_on(self) -> tuple[str, ...]:
        return self.reactor.dies_on

    @dies_on.setter
    def dies_on(self, signals: tuple[str, ...]) -> None:
        self.reactor.dies_on = signals

    def check(self) -> None:
        if self.unavailable is not None:
            raise ClientUnavailable(self.unavailable)
        super().check()

    def launch(self, request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        self.check()
        process = super().launch(request, observer)
        transport, _, _ = self.reactor.spawned[-1]
        self.transports[request.job_id] = transport
        self.requests[request.job_id] = request
        return process


@implementer(ITargetGateway)
class FakeGateway:
    """Targets that answer (or fail) as told, and relays that are only numbers."""

    def __init__(self) -> None:
        #: Probe failures by target port.
        self.failures: dict[int, ProbeFailed] = {}
        #: Relays by job: {disk_key: listen_port}.
        self.open: dict[str, dict[str, int]] = {}
        self.counts: dict[str, dict[str, tuple[int, int]]] = {}
        self.lost: dict[str, Callable[[str, str], None]] = {}
        self.probed: list[str] = []
        self._ports = itertools.count(30000)

    def probe(
        self, targets: Sequence[NbdAddress], timeout: float
    ) -> Deferred[list[ProbeResult[Any]]]:
        results: list[ProbeResult[Any]] = []
        for target in targets:
            self.probed.append(target.disk_key)
            error = self.failures.get(target.port)
            if error is None:
                info = ExportInfo(target.export, 1 << 30, 0, 1, 4096, 32 << 20)
                results.append(ProbeResult(target, info=info))
            else:
                results.append(ProbeResult(target, error=error))
        return succeed(results)

    def open_relays(
        self, job_id: str, targets: Sequence[NbdAddress], on_lost: Callable[[str, str], None]
    ) -> Deferred[list[int]]:
        ports = {t.disk_key: next(self._ports) for t in targets}
        self.open[job_id] = ports
        self.counts[job_id] = {key: (0, 0) for key in ports}
        self.lost[job_id] = on_lost
        return succeed(list(ports.values()))

    def close_relays(self, job_id: str) -> Deferred[list[RelayStats]]:
        final = self.stats(job_id)
        self.open.pop(job_id, None)
        return succeed(final)

    def stats(self, job_id: str) -> list[RelayStats]:
        return [
            RelayStats(
                port=0,
                listen_port=port,
                job_id=job_id,
                export="",
                disk_key=key,
                state="connected",
                bytes_to_hub=self.counts[job_id][key][0],
                bytes_from_hub=self.counts[job_id][key][1],
                connections=1,
                active_connections=1,
                started_at=0.0,
                bytes_per_second_current=0.0,
                bytes_per_second_average=0.0,
                upstream_error=None,
            )
            for key, port in self.open.get(job_id, {}).items()
        ]

    def all_stats(self) -> list[RelayStats]:
        return [s for job_id in self.open for s in self.stats(job_id)]


@implementer(IHub)
class FakeHub:
    """A SHA that answers change-ID questions as told and records what it is told."""

    def __init__(self) -> None:
        #: The answer for each disk index; a disk not here has no previous change ID.
        self.answers: dict[int, Lookup] = {}
        #: When set, lookups wait for it (its result is ignored).
        self.hold: Optional[Deferred[None]] = None
        self.asked: list[tuple[str, list[int]]] = []
        self.started: list[str] = []
        self.ended: list[tuple[str, Deferred[Any]]] = []

    def previous_change_ids(
        self, vm_name: str, indexes: Sequence[int]
    ) -> Deferred[dict[int, Lookup]]:
        self.asked.append((vm_name, list(indexes)))
        answer = {index: self.answers.get(index, Lookup()) for index in indexes}
        if self.hold is None:
            return succeed(answer)
        return self.hold.addCallback(lambda _: answer)

    def ended_messages(self, job: Job) -> list[Message]:
        return final_messages(job, fixed_now())

    def job_started(self, job: Job) -> None:
        self.started.append(job.job_id)

    def job_ended(self, job_id: str, closed: Deferred[Any]) -> None:
        self.ended.append((job_id, closed))

    def report(self, job_id: str) -> Optional[dict[str, Any]]:
        return None


class SteppingClock:
    """A wall clock for records that moves only when told to."""

    def __init__(self, start: Optional[datetime] = None) -> None:
        self.value = start or datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


_TRIAL = SynchronousTestCase()


def result_of(d: Deferred[T]) -> T:
    """What a Deferred that has fired holds (trial's ``successResultOf``, without a TestCase)."""
    return _TRIAL.successResultOf(d)


def failure_of(d: Deferred[Any], *kinds: type[BaseException]) -> BaseException:
    """The exception of a Deferred that has failed with one of ``kinds`` (trial's
    ``failureResultOf``)."""
    error: BaseException = _TRIAL.failureResultOf(d, *kinds).value
    return error


def fixed_now() -> datetime:
    return datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@implementer(IVSphere)
class FakeVSphere:
    """Answers every call with ``answers[method]`` (or raises ``errors[method]``) and records it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.answers: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, Exception] = {}
        self.closed = False

    def _answer(self, method: str, *args: Any) -> Deferred[dict[str, Any]]:
        self.calls.append((method, args))
        if method in self.errors:
            return fail(self.errors[method])
        return succeed(dict(self.answers.get(method, {"method": method})))

    def discover(
        self,
        credentials: Credentials,
        datacenter: Optional[str],
        name_filter: Optional[str],
        vcenter: Optional[str] = None,
    ) -> Deferred[dict[str, Any]]:
        return self._answer("discover", credentials, datacenter, name_filter, vcenter)

    def cbt_status(self, credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        return self._answer("cbt_status", credentials, vm_path)

    def enable_cbt(self, credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        return self._answer("enable_cbt", credentials, vm_path)

    def spec_changes(
        self, credentials: Credentials, vm_path: str, stored: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        return self._answer("spec_changes", credentials, vm_path, stored)

    def power_off(
        self, credentials: Credentials, vm_id: str, force: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        return self._answer("power_off", credentials, vm_id, force, timeout)

    def power_on(
        self, credentials: Credentials, vm_id: str, wait_for_tools: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        return self._answer("power_on", credentials, vm_id, wait_for_tools, timeout)

    def power_state(self, credentials: Credentials, vm_id: str) -> Deferred[dict[str, Any]]:
        return self._answer("power_state", credentials, vm_id)

    def remove_job_snapshots(
        self, credentials: Credentials, vm_path: str, job_id: Optional[str]
    ) -> Deferred[dict[str, Any]]:
        return self._answer("remove_job_snapshots", credentials, vm_path, job_id)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@implementer(IReactorFromThreads)
class SameThread:
    """Delivers "from a thread" calls at once: the reactor of a :class:`HeldThreadPool`."""

    def callFromThread(
        self, callable: Callable[..., object], *args: object, **kwargs: object
    ) -> None:
        callable(*args, **kwargs)


class HeldThreadPool:
    """A thread pool whose calls run on the test's thread when the test calls :meth:`run`.

    With ``at_once`` set, calls run as soon as they are queued, as on a pool
    with idle threads; a test holds the calls queued after it clears it.
    """

    def __init__(self, at_once: bool = False) -> None:
        self.pending: list[tuple[Any, Callable[..., Any], tuple[Any, ...]]] = []
        self.at_once = at_once
        self._running = False

    def callInThreadWithCallback(
        self, on_result: Any, f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        self.pending.append((on_result, f, args))
        if self.at_once and not self._running:
            self.run()

    def run(self, count: Optional[int] = None) -> int:
        """Run queued calls (and calls they queue), ``count`` of them or all; how many ran."""
        done = 0
        self._running = True
        try:
            while self.pending and (count is None or done < count):
                on_result, f, args = self.pending.pop(0)
                try:
                    result = f(*args)
                except BaseException:
                    on_result(False, Failure())
                else:
                    on_result(True, result)
                done += 1
        finally:
            self._running = False
        return done


@implementer(ILeftoverClients)
class FakeLeftoverClients:
    """Clients a dead daemon left: those of the pids in ``alive`` are found, and stay
    until the test calls :meth:`gone`; any other pid names no client."""

    def __init__(self, *alive: int) -> None:
        self.alive = set(alive)
        #: Each call: ``(pid, job_id, spare_id, grace)``.
        self.asked: list[tuple[int, str, Optional[str], float]] = []
        self._stopping: dict[int, Deferred[bool]] = {}

    def stop(self, pid: int, job_id: str, spare_id: Optional[str], grace: float) -> Deferred[bool]:
        self.asked.append((pid, job_id, spare_id, grace))
        if pid not in self.alive:
            return succeed(False)
        return self._stopping.setdefault(pid, Deferred())

    def gone(self, pid: int) -> None:
        """The client ``pid`` has exited: its stop fires ``True``."""
        self.alive.discard(pid)
        self._stopping.pop(pid).callback(True)
