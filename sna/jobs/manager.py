"""Running jobs: admission, one client process per job, and their records.

The :class:`JobManager` is the only writer of job records.  It admits a
request (no duplicate active job, no NBD port shared with another active job,
no more than ``max_jobs``), asks the SHA for the disks' previous change IDs
while it probes the targets, starts the client through an
:class:`~sna.sbc.launcher.IProcessLauncher`, folds the client's events into the
record, and persists it: at once on every status change, and at most once a
second for progress.  An ended job's record is stored together with what the
SHA must learn of it (:mod:`sna.sha`).

Storage runs out: a write the store refuses (:class:`~sna.jobs.store.StoreError`)
never stops a job or an answer.  The record, and the SHA's messages in order,
are kept in memory and written with the job's next write, or tried again every
:data:`WRITE_RETRY` seconds; the SHA hears of an ended job once they are
stored.  While anything is unwritten, or the state or log directory cannot
take a write, :meth:`JobManager.storage_problem` says why and no job starts
(:class:`StorageUnavailable`).

Each job in its hands is one :class:`ManagedJob`: its record and all that is
in flight for it (the requests, the client, the pending write, its relays
closing, a killed client's snapshot removal, a dead daemon's client being
stopped), moved through its :class:`Stage` by one method per step.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sna.config import ConfigError, Settings
from sna.contract.secrets import Masker
from sna.jobs import replication
from sna.jobs.janitor import Leftover, SnapshotJanitor
from sna.jobs.leftovers import ILeftoverClients, LeftoverClients
from sna.jobs.model import (
    BackupRequest,
    InvalidTransition,
    Job,
    JobStatus,
    PushedProgress,
    SnapshotState,
)
from sna.jobs.store import ChainRow, IChainStore, IJobStore, IStorageCheck, StoreError
from sna.logging import printable
from sna.nbd.gateway import ITargetGateway
from sna.nbd.probe import ProbeResult
from sna.nbd.relay import RelayStats
from sna.sbc import events
from sna.sbc.command import ClientCommand
from sna.sbc.joblog import JobLog
from sna.sbc.launcher import ClientProcess, IProcessLauncher, JobLogUnwritable, ProcessLauncher
from sna.sbc.protocol import IClientObserver
from sna.sha import messages
from sna.sha.hub import IHub, Lookup
from sna.sha.messages import Message
from sna.vmware.pins import VCenterPins

#: Progress is written to the database at most this often per job.
SAVE_INTERVAL = 1.0
#: Seconds between tries to write what the database refused.
WRITE_RETRY = 5.0


class JobError(Exception):
    """A request about jobs that cannot be done; ``code`` is the API error code."""

    code = "job_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownJob(JobError):
    code = "job_not_found"


class JobConflict(JobError):
    code = "job_conflict"


class JobActive(JobConflict):
    code = "job_already_running"


class PortInUse(JobConflict):
    code = "port_in_use"


class JobNotActive(JobConflict):
    code = "job_not_running"


class TargetUnreachable(JobError):
    """Some NBD target did not answer the probe; ``failures`` says which and why."""

    code = "nbd_target_unreachable"

    def __init__(self, failures: list[ProbeResult[Any]]) -> None:
        self.failures = failures
        parts = []
        for result in failures:
            target, error = result.target, result.error
            assert error is not None
            parts.append(f"disk {target.disk_key}: {error.message} ({error.reason})")
        super().__init__("NBD target unreachable: " + "; ".join(parts))

    @property
    def timed_out_only(self) -> bool:
        return all(r.error is not None and r.error.reason == "timeout" for r in self.failures)


class AtCapacity(JobError):
    code = "too_many_jobs"


class ShaLookupFailed(JobError):
    """The SHA did not say which change ID an incremental starts from."""

    code = "sha_lookup_failed"


class ShuttingDown(JobError):
    code = "shutting_down"


class SnapshotPending(JobConflict):
    """A snapshot an earlier job left on the VM could not be removed before this one."""

    code = "snapshot_pending"

    def __init__(self, vm_path: str, leftovers: Sequence[Leftover]) -> None:
        self.leftovers = list(leftovers)
        names = "; ".join(
            f"snapshot {left.name} of job {left.job_id} could not be removed: {left.reason}"
            for left in leftovers
        )
        super().__init__(
            f"VM {vm_path} still has a snapshot an earlier job left, which would break "
            f"this backup: {names}; nothing was started"
        )


class StorageUnavailable(JobError):
    """The state or log directory cannot be written: nothing is started or changed."""

    code = "storage_unavailable"


class Stage(enum.Enum):
    """How far a job is in the manager's hands (see :class:`ManagedJob`)."""

    #: Admitted: the SHA is asked, the targets probed, the relays opened; no client yet.
    STARTING = "starting"
    #: Its client runs.
    RUNNING = "running"
    #: Its client is gone: its relays are closing, a killed client's snapshot is going.
    ENDING = "ending"
    #: Found running when sna started: the client a dead daemon left is being stopped.
    LEFTOVER = "leftover"
    #: Nothing of it is in flight.
    SETTLED = "settled"


@attrs.define(eq=False)
class ManagedJob:
    """One job in the manager's hands: its record and all that is in flight for it.

    A started job goes :meth:`admitted` (``STARTING``), :meth:`launching`
    (``RUNNING``), :meth:`ended` (``ENDING``), and settles once what it was
    given to :meth:`wait_for` has fired.  A job a dead daemon left running
    goes :meth:`stored`, :meth:`leftover`, and settles the same way.  Until it
    settles it is live: it may hold its job id and NBD ports against other
    starts, and shutdown waits for its relays and snapshot.
    """

    log = Logger()

    job_id: str
    stage: Stage
    _job: Optional[Job] = attrs.field(default=None, alias="job")
    #: The request as the SHA sent it (the hub's ports, the password) and as the
    #: client got it (the relays' ports): in memory only, dropped when the client ends.
    request: Optional[BackupRequest] = None
    relayed: Optional[BackupRequest] = None
    process: Optional[ClientProcess] = None
    #: The write of its progress due within :data:`SAVE_INTERVAL`, if one is.
    save_call: Optional[IDelayedCall] = None
    #: What must fire before it settles: relays closing, a snapshot removal, a client's end.
    waits: list[Deferred[Any]] = attrs.Factory(list)
    #: Its record is newer than the stored one: the store refused the last write.
    unsaved: bool = False
    #: Messages for the SHA not stored yet, in order: they go with the next write.
    unsent: list[Message] = attrs.Factory(list)
    #: What an earlier job of its id still owed the SHA is to be dropped before its
    #: record is next written.
    forget_outbox: bool = False
    #: Set while the SHA is to hear of its end once its messages are stored: what
    #: delivery waits for (its relays closing).
    hub_gate: Optional[Deferred[Any]] = None
    #: The status of its record in the store, ``None`` if none was ever written.
    stored_status: Optional[JobStatus] = None

    @classmethod
    def admitted(cls, request: BackupRequest) -> ManagedJob:
        return cls(request.job_id, Stage.STARTING, request=request)

    @classmethod
    def stored(cls, job: Job) -> ManagedJob:
        return cls(job.job_id, Stage.SETTLED, job=job, stored_status=job.status)

    @property
    def job(self) -> Job:
        """Its record, as served and stored; a job still starting has none."""
        if self._job is None:
            raise InvalidTransition(f"job {self.job_id} has not started")
        return self._job

    @job.setter
    def job(self, job: Job) -> None:
        self._job = job

    @property
    def holds_id(self) -> bool:
        """Whether another start of its job id is refused: it is starting or running."""
        return self.stage in (Stage.STARTING, Stage.RUNNING)

    @property
    def ports(self) -> list[int]:
        """The hub's NBD ports no other job may use now."""
        if self.stage is Stage.STARTING:
            assert self.request is not None
            return [t.port for t in self.request.targets]
        if self.stage in (Stage.RUNNING, Stage.LEFTOVER):
            return [d.port for d in self.job.disks]
        return []

    def launching(self, job: Job, request: BackupRequest, relayed: BackupRequest) -> None:
        """Its relays are open and its client is being launched with ``relayed``."""
        self._expect(Stage.STARTING)
        self.stage, self._job, self.request, self.relayed = Stage.RUNNING, job, request, relayed

    def launch_failed(self) -> None:
        """The launcher refused: still no client, and no record."""
        self._expect(Stage.RUNNING)
        self.stage, self._job, self.relayed = Stage.STARTING, None, None

    def launched(self, process: ClientProcess, now: datetime) -> None:
        """Its client is launched; one that has already ended is not kept."""
        if self.stage is Stage.RUNNING and process.running:
            self.process = process
            self.job = self.job.spawned(process.pid, now, process.spare_id)

    def ended(self, job: Job) -> BackupRequest:
        """Its client is gone, and ``job`` says how; returns the request, no longer kept."""
        self._expect(Stage.RUNNING)
        request = self.request
        assert request is not None
        self.stage, self._job = Stage.ENDING, job
        self.request = self.relayed = self.process = None
        return request

    def leftover(self) -> None:
        """It was running when sna stopped, and its client may still be."""
        self._expect(Stage.SETTLED)
        self.stage = Stage.LEFTOVER

    def wait_for(
        self, waits: Sequence[Deferred[Any]], settled: Callable[[ManagedJob], None]
    ) -> None:
        """Settle once each of ``waits`` has fired, then call ``settled``.

        A failure of one is logged there, and goes no further.
        """
        if self.stage not in (Stage.ENDING, Stage.LEFTOVER):
            raise InvalidTransition(f"job {self.job_id} is {self.stage.value}: nothing to wait for")
        self.waits.extend(waits)
        for d in waits:
            d.addBoth(self._waited, d, settled)
        self._settle(settled)

    def _waited(
        self, result: object, d: Deferred[Any], settled: Callable[[ManagedJob], None]
    ) -> object:
        self.waits.remove(d)
        if isinstance(result, Failure):
            self.log.failure(
                "job {job_id}: what it waited for while {stage} failed",
                result,
                job_id=self.job_id,
                stage=self.stage.value,
            )
            result = None
        self._settle(settled)
        return result

    def _settle(self, settled: Callable[[ManagedJob], None]) -> None:
        if not self.waits and self.stage in (Stage.ENDING, Stage.LEFTOVER):
            self.stage = Stage.SETTLED
            settled(self)

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise InvalidTransition(f"job {self.job_id} is {self.stage.value}, not {stage.value}")


@implementer(IClientObserver)
class _Observer:
    def __init__(self, manager: JobManager, managed: ManagedJob) -> None:
        self._manager = manager
        self._managed = managed

    def event_received(self, event: events.Event) -> None:
        self._manager._event(self._managed, event)

    def process_ended(
        self, exit_code: Optional[int], exit_signal: Optional[int], last_output: Optional[str]
    ) -> None:
        self._manager._ended(self._managed, exit_code, exit_signal, last_output)


class JobManager:
    log = Logger()

    def __init__(
        self,
        store: IJobStore,
        launcher: IProcessLauncher,
        clock: IReactorTime,
        settings: Settings,
        now: Callable[[], datetime],
        gateway: ITargetGateway,
        on_probe_failure: Callable[[str], None] = lambda reason: None,
        janitor: Optional[SnapshotJanitor] = None,
        hub: Optional[IHub] = None,
        leftovers: Optional[ILeftoverClients] = None,
        on_job_ended: Callable[[Job], None] = lambda job: None,
    ) -> None:
        #: The SHA, when sna reports to one (``--sha-url``).
        self.hub = hub
        #: Told of every job that ends in this run, once (the metrics count them).
        self._on_job_ended = on_job_ended
        #: Removes the snapshots that ended jobs left on their VMs (sna.jobs.janitor).
        self._janitor = janitor
        self._store = store
        self._launcher = launcher
        self._gateway = gateway
        self._on_probe_failure = on_probe_failure
        self._clock = clock
        self._now = now
        self._leftovers = leftovers if leftovers is not None else LeftoverClients(clock)
        self.settings = settings
        #: Every job by id, ended ones included (the newest of a reused id).
        self._jobs: dict[str, ManagedJob] = {}
        #: The jobs not settled, in the order they came: starting ones (not in ``_jobs``
        #: yet), and ended ones whose id a newer job has taken.
        self._live: list[ManagedJob] = []
        self._stopping = False
        #: Jobs whose record the store refused, oldest first, and why it did.
        self._unsaved: list[ManagedJob] = []
        self._write_problem: Optional[str] = None
        self._retry_call: Optional[IDelayedCall] = None

    # -- lifecycle ------------------------------------------------------

    def recover(self) -> Deferred[Any]:
        """Load the store: running jobs of a dead daemon become ``interrupted``.

        Their clients, if still alive, are terminated; the Deferred fires when
        they are gone.
        """
        self._apply_stored_settings()
        leftovers = []
        stored = self._store.load_all()
        # All are known first: a replication's end goes once none of its jobs runs.
        for job in stored:
            self._jobs[job.job_id] = ManagedJob.stored(job)
        for job in stored:
            managed = self._jobs[job.job_id]
            if job.status.active:
                job = managed.job = job.interrupted(
                    self._now(), "sna stopped while the job was running"
                )
                # The hub delivers stored messages when it starts; ones stored later
                # are its to deliver then.
                saved = self._save_now(managed, self._ended_messages(job))
                if not saved and self.hub is not None:
                    managed.hub_gate = succeed(None)
                self._job_ended(job)
                self.log.warn("job {job_id} was running when sna stopped", job_id=job.job_id)
                if job.pid:
                    leftovers.append(self._stop_leftover(managed))
            if self._janitor is not None:
                # A snapshot still pending: no credentials are held for it any more.
                self._janitor.stored(managed.job)
        self.prune()
        return DeferredList(leftovers, consumeErrors=True)

    def _apply_stored_settings(self) -> None:
        for key, value in self._store.load_settings().items():
            try:
                self.settings = self.settings.updated({key: value})
            except ConfigError as e:
                self.log.error("ignoring stored setting {key}: {reason}", key=key, reason=e.message)
            else:
                self.log.info(
                    "stored setting {key} = {text}", key=key, value=value, text=json.dumps(value)
                )

    def _stop_leftover(self, managed: ManagedJob) -> Deferred[bool]:
        # Its ports stay taken until it is gone: a new job must not share a hub
        # port with a client that is still writing.
        job = managed.job
        assert job.pid is not None
        managed.leftover()
        self._live.append(managed)
        d = self._leftovers.stop(job.pid, job.job_id, job.spare_id, self.settings.kill_grace)
        managed.wait_for([d], self._live.remove)
        return d

    def prune(self) -> list[str]:
        """Forget finished jobs older than the retention period; returns their ids."""
        days = self.settings.retention_days
        if not days:
            return []
        cutoff = self._now() - timedelta(days=days)
        old = [
            j.job_id
            for j in self._all()
            if not j.status.active and (j.ended_at or j.last_update) < cutoff
        ]
        if old:
            try:
                self._store.delete(old)
            except StoreError as e:
                self.log.warn("cannot forget old jobs: {reason}", reason=e.message)
                return []
            for job_id in old:
                del self._jobs[job_id]
            self.log.info(
                "forgot {count} job(s) finished more than {days} days ago",
                count=len(old),
                days=days,
            )
        return old

    def stop(self) -> Deferred[Any]:
        """Stop every client (TERM, then KILL) and write every record."""
        self._stopping = True
        # Collected first: a client that ends at once takes its job out of ``_live``.
        running = [m.process for m in self._live if m.process is not None]
        stops = [p.stop(self.settings.kill_grace) for p in running]
        d: Deferred[Any] = DeferredList(stops, consumeErrors=True)

        def flushed(result: object) -> Deferred[Any]:
            for managed in self._jobs.values():
                if managed.save_call is not None:
                    self._save_now(managed)
            # Every job has ended by now, so each relay is closing; wait for them,
            # and for the snapshots of clients that had to be killed.
            waits = [w for m in self._live if m.stage is Stage.ENDING for w in m.waits]
            return DeferredList(waits, consumeErrors=True).addBoth(self._last_writes)

        return d.addBoth(flushed)

    def _last_writes(self, result: object) -> None:
        """One more try of what the store refused, and what is lost said of each job."""
        self._retry_writes()
        call, self._retry_call = self._retry_call, None
        if call is not None and call.active():
            call.cancel()
        for managed in self._unsaved:
            job = managed.job
            if managed.stored_status is None:
                after = "it will not be known"
            elif managed.stored_status.active:
                after = "it will show as interrupted"
            else:
                after = f"it will show as {managed.stored_status.value}, as last written"
            change_ids = "; ".join(
                f"disk {d.disk_index} (target {d.disk_key}): {d.change_id}"
                for d in job.disks
                if d.change_id
            )
            self.log.error(
                "job {job_id} {status}, but its record could not be written ({problem}): "
                "after a restart {after}; {sha}change IDs: {change_ids}",
                job_id=job.job_id,
                status=job.status.value,
                problem=self._write_problem,
                after=after,
                sha=f"{len(managed.unsent)} message(s) for the SHA are lost; "
                if managed.unsent
                else "",
                change_ids=change_ids or "none",
            )

    # -- queries --------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self._with_relay_counts(self._jobs[job_id].job)
        except KeyError:
            raise UnknownJob(f"job {job_id} not found") from None

    def jobs(self, status: Optional[JobStatus] = None) -> list[Job]:
        return [
            self._with_relay_counts(j) for j in self._all() if status is None or j.status is status
        ]

    def _all(self) -> list[Job]:
        return [managed.job for managed in self._jobs.values()]

    def _with_relay_counts(self, job: Job) -> Job:
        """A running job with its relays' live byte counts (kept in the record at its end)."""
        if not job.status.active:
            return job
        stats = self._gateway.stats(job.job_id)
        if not stats:
            return job
        return job.with_relay_counts(
            {s.disk_key: (s.bytes_to_hub, s.bytes_from_hub) for s in stats}
        )

    def replication_jobs(self, replication_id: str) -> list[Job]:
        """The jobs of one replicate request (its ``job_id``), ended ones included."""
        return [
            self._with_relay_counts(j) for j in self._all() if j.replication_id == replication_id
        ]

    def replication_chain(self, vcenter_key: str, vm_path: str) -> list[ChainRow]:
        """A VM's replication chain, newest first (:class:`StorageUnavailable` if unreadable)."""
        chain = IChainStore(self._store, None)
        if chain is None:
            return []
        try:
            return chain.chain_rows(vcenter_key, vm_path)
        except StoreError as e:
            raise StorageUnavailable(f"{e.message}; nothing was started") from e

    def relays(self) -> list[RelayStats]:
        return self._gateway.all_stats()

    def counts(self) -> dict[str, int]:
        counted = Counter(j.status for j in self._all())
        return {status.value: counted.get(status, 0) for status in JobStatus}

    def snapshots_pending(self) -> list[str]:
        """The ended jobs whose snapshot is still on its VM until the janitor removes it."""
        return self._janitor.pending() if self._janitor is not None else []

    def active_jobs(self) -> list[Job]:
        return [j for j in self._all() if j.status.active]

    def storage_problem(self) -> Optional[str]:
        """Why jobs cannot be recorded or logged now, or ``None``.

        A record the store refused and that is kept in memory says it until it
        is written; else the state directory and the log directory are each
        tried with a write.  While there is one, no job starts.
        """
        if self._unsaved:
            count = len(self._unsaved)
            return (
                f"{self._write_problem} ({count} job record(s) kept in memory until it can "
                "be written)"
            )
        check = IStorageCheck(self._store, None)
        problem = check.storage_problem() if check is not None else None
        return problem or self._launcher.storage_problem()

    # -- commands -------------------------------------------------------

    async def start(self, request: BackupRequest) -> Job:
        """Admit ``request``, probe and relay its targets, spawn its client.

        The job is ``running`` on return.  Until the client is spawned the
        request holds its job id and ports, so a concurrent start conflicts;
        if any step fails nothing is left: no job, no relay, no process.
        """
        managed = self._admit(request)
        try:
            return await self._start(managed, request)
        finally:
            if managed.stage is Stage.STARTING:
                self._live.remove(managed)

    def _admit(self, request: BackupRequest) -> ManagedJob:
        if self._stopping:
            raise ShuttingDown("sna is shutting down")
        holding = [m for m in self._live if m.holds_id]
        for managed in holding:
            if managed.job_id == request.job_id:
                running = managed.stage is Stage.RUNNING and managed.job.pid
                pid = f" (pid {managed.job.pid})" if running else ""
                raise JobActive(f"job {request.job_id} is already running{pid}")
        for target in request.targets:
            holder = next((m for m in self._live if target.port in m.ports), None)
            if holder is None:
                continue
            if holder.stage is Stage.LEFTOVER:
                raise PortInUse(
                    f"NBD port {target.port} (disk {target.disk_key}) is still in use by the "
                    f"client of interrupted job {holder.job_id}, being stopped"
                )
            raise PortInUse(
                f"NBD port {target.port} (disk {target.disk_key}) is in use by "
                f"running job {holder.job_id}"
            )
        if len(holding) >= self.settings.max_jobs:
            raise AtCapacity(
                f"{len(holding)} jobs are running, the maximum is {self.settings.max_jobs}"
            )
        self._launcher.check()
        problem = self.storage_problem()
        if problem is not None:
            raise StorageUnavailable(f"{problem}; nothing was started")
        managed = ManagedJob.admitted(request)
        self._live.append(managed)
        return managed

    @property
    def _starting(self) -> dict[str, BackupRequest]:
        """The requests admitted whose client is not launched yet, by job id."""
        # tests/unit/test_nbd_gate.py reads it to see a start in progress.
        return {
            m.job_id: m.request
            for m in self._live
            if m.stage is Stage.STARTING and m.request is not None
        }

    async def start_all(self, requests: Sequence[BackupRequest]) -> list[Job]:
        """Start several jobs as one request (a replication of several VMs).

        Every request is admitted and every target probed before any client
        starts: one refusal (a conflict, capacity, an unreachable target, which
        are all named) refuses them all and leaves nothing.  Returns the jobs,
        ``running``, in the order of ``requests``.
        """
        admitted: list[ManagedJob] = []
        try:
            for request in requests:
                admitted.append(self._admit(request))
            prepared = await DeferredList(
                [Deferred.fromCoroutine(self._prepare(request)) for request in requests],
                consumeErrors=True,
            )
            ready: list[BackupRequest] = []
            failures: list[Failure] = []
            for _, value in prepared:
                if isinstance(value, Failure):
                    failures.append(value)
                else:
                    ready.append(value)
            unreachable = [f.value for f in failures if isinstance(f.value, TargetUnreachable)]
            if unreachable:
                raise TargetUnreachable([r for error in unreachable for r in error.failures])
            if failures:
                failures[0].raiseException()
            jobs: list[Job] = []
            try:
                for managed, request in zip(admitted, ready, strict=True):
                    jobs.append(await self._launch(managed, request))
            except BaseException:
                # Rare (the launcher refused one): the ones started are stopped, not kept.
                for job in jobs:
                    self.cancel(job.job_id)
                raise
            return jobs
        finally:
            for managed in admitted:
                if managed.stage is Stage.STARTING:
                    self._live.remove(managed)

    async def _start(self, managed: ManagedJob, request: BackupRequest) -> Job:
        return await self._launch(managed, await self._prepare(request))

    async def _prepare(self, request: BackupRequest) -> BackupRequest:
        """``request`` with its previous change IDs, once every target has answered."""
        # A snapshot an earlier job left on this VM is removed first, while the
        # targets are probed (sna.jobs.janitor).
        clearing: Deferred[list[Leftover]] = succeed([])
        if self._janitor is not None:
            clearing = self._janitor.clear_for(request)
        # The SHA is asked while the targets are probed: neither waits for the other.
        asking: Deferred[dict[int, Lookup]] = succeed({})
        # A replication starts from sna's own chain (sna.jobs.replication), not the SHA's.
        if self.hub is not None and request.kind == "backup":
            asking = self.hub.previous_change_ids(
                request.vm_name, sorted(request.disk_indexes.values())
            )
            if request.backup_type == "full":
                # A full is copied in full whatever the answer: it is only logged, and a
                # slow SHA must not hold the start.
                asking.addCallback(lambda answers: self._with_previous(request, answers))
                asking.addErrback(lambda f: self.log.failure("logging the SHA's answers", f))
                asking = succeed({})
        results = await self._gateway.probe(request.targets, self.settings.probe_timeout)
        answers = await asking
        failures = [r for r in results if r.error is not None]
        if failures:
            for result in failures:
                assert result.error is not None
                self._on_probe_failure(result.error.reason)
            raise TargetUnreachable(failures)
        leftovers = await clearing
        if self._stopping:
            raise ShuttingDown("sna is shutting down")
        if leftovers:
            refusal = SnapshotPending(request.vm_path, leftovers)
            self.log.error(
                "job {job_id} refused: {message}",
                job_id=request.job_id,
                vm_path=request.vm_path,
                old_job_ids=[left.job_id for left in leftovers],
                message=refusal.message,
            )
            raise refusal
        return self._with_previous(request, answers)

    async def _launch(self, managed: ManagedJob, request: BackupRequest) -> Job:
        """Open ``request``'s relays and spawn its client."""
        job_id = request.job_id
        ports = await self._gateway.open_relays(
            job_id, request.targets, lambda key, reason: self._upstream_lost(managed, key, reason)
        )
        try:
            if self._stopping:
                raise ShuttingDown("sna is shutting down")
            relayed = attrs.evolve(
                request,
                targets=tuple(
                    attrs.evolve(target, host="127.0.0.1", port=port)
                    for target, port in zip(request.targets, ports, strict=True)
                ),
            )
            return self._spawn(managed, request, relayed, ports)
        except BaseException:
            await self._gateway.close_relays(job_id)
            raise

    def _with_previous(
        self, request: BackupRequest, answers: Mapping[int, Lookup]
    ) -> BackupRequest:
        """``request`` with the SHA's previous change IDs, and the disks' sizes then.

        The SHA's answer is the base of an incremental disk that the request
        gives no change ID for (``PLACEHOLDER`` or none): explicit ones win.
        For a full it is only logged.  An incremental whose base the SHA
        could not tell is refused (:class:`ShaLookupFailed`): copying every
        byte instead would be a surprise no one asked for.
        """
        explicit = dict(request.previous_change_ids)
        found = dict(explicit)
        given_sources = dict(request.previous_sources)
        sources = {key: given_sources.get(key, "request") for key in explicit}
        incremental = request.backup_type == "incremental"
        for key, index in sorted(request.disk_indexes.items(), key=lambda item: item[1]):
            answer = answers.get(index)
            if answer is None:
                continue
            used = incremental and key not in explicit and request.previous_change_id is None
            if answer.error is not None:
                if used:
                    raise ShaLookupFailed(
                        f"cannot ask the SHA for the previous change ID of disk {index} "
                        f"(target {key}) of {request.vm_name!r}: {answer.error}; "
                        "nothing was started"
                    )
                self.log.warn(
                    "job {job_id}: the SHA did not say disk {index}'s last change ID "
                    "({reason}); not needed",
                    job_id=request.job_id,
                    index=index,
                    reason=answer.error,
                )
                continue
            self.log.info(
                "job {job_id}: the SHA's last change ID of disk {index} (target {key}) is "
                "'{shown}'; {use}",
                job_id=request.job_id,
                index=index,
                key=key,
                change_id=answer.change_id or "",
                shown=printable(answer.change_id or ""),
                use="the incremental starts from it"
                if used and answer.change_id
                else ("none: a full copy" if used else "not used"),
            )
            if used and answer.change_id is not None:
                found[key] = answer.change_id
                sources[key] = "sha"
        request = attrs.evolve(
            request,
            previous_change_ids=tuple(sorted(found.items())),
            previous_sources=tuple(sorted(sources.items())),
        )
        capacities = dict(request.previous_capacities)
        for target in request.targets:
            previous = request.previous_change_id_of(target.disk_key)
            if target.disk_key in capacities:
                continue
            capacity = self._capacity_at(previous) if previous else None
            if capacity is not None:
                capacities[target.disk_key] = capacity
        return attrs.evolve(request, previous_capacities=tuple(sorted(capacities.items())))

    def _capacity_at(self, change_id: str) -> Optional[int]:
        """The disk's capacity when sna's own records last saw ``change_id`` taken."""
        for job in sorted(self._all(), key=lambda j: j.started_at, reverse=True):
            for disk in job.disks:
                if disk.change_id == change_id and disk.capacity_bytes:
                    return disk.capacity_bytes
        return None

    def _spawn(
        self, managed: ManagedJob, request: BackupRequest, relayed: BackupRequest, ports: list[int]
    ) -> Job:
        job_id = managed.job_id
        previous = self._jobs.get(job_id)
        managed.launching(
            Job.from_request(request, self._now(), relay_ports=ports), request, relayed
        )
        try:
            process = self._launcher.launch(relayed, _Observer(self, managed))
        except JobLogUnwritable as e:
            managed.launch_failed()
            raise StorageUnavailable(f"{e}; nothing was started") from e
        except BaseException:
            managed.launch_failed()
            raise
        managed.launched(process, self._now())
        self._jobs[job_id] = managed
        # The new job replaces the ended one's record: what that one still owed
        # the SHA goes with it, so the new job's status speaks of itself only.
        managed.forget_outbox = previous is not None
        # Its client runs: a write refused now keeps the job in memory, never undoes it.
        self._save_now(managed)
        if self._janitor is not None:
            # A pending snapshot of this job id is its client's to remove now, and its
            # credentials serve the pending snapshots of the same vCenter and user.
            self._janitor.job_started(request)
        if self.hub is not None:
            self.hub.job_started(managed.job)
        self.log.info(
            "job {job_id}: {backup_type} backup of {vm_path}, {disks} disk(s), pid {pid}",
            job_id=job_id,
            backup_type=request.backup_type,
            vm_path=request.vm_path,
            disks=len(request.targets),
            pid=process.pid,
        )
        return managed.job

    def _upstream_lost(self, managed: ManagedJob, disk_key: str, reason: str) -> None:
        if managed.stage is not Stage.RUNNING:
            return
        self.log.error(
            "job {job_id}: NBD target of disk {disk_key} dropped: {reason}",
            job_id=managed.job_id,
            disk_key=disk_key,
            reason=reason,
        )
        managed.job = managed.job.target_lost(disk_key, reason, self._now())
        self._save_now(managed)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.status.active:
            raise JobNotActive(f"job {job_id} is not running (status {job.status.value})")
        if not job.cancel_requested:
            managed = self._jobs[job_id]
            job = managed.job = job.cancelling(self._now())
            self._save_now(managed)
            self.log.info("job {job_id}: cancel requested", job_id=job_id)
            if managed.process is not None:
                managed.process.stop(self.settings.kill_grace)
        return job

    def push_progress(self, job_id: str, push: PushedProgress) -> Job:
        job = self.get(job_id)
        if not job.status.active:
            raise JobNotActive(f"job {job_id} is not running (status {job.status.value})")
        managed = self._jobs[job_id]
        if managed.request is not None:
            # The Go client's pushes are its lines by another way: masked alike.
            mask = Masker([managed.request.vcenter_password])
            push = attrs.evolve(push, stage=mask(push.stage), status=mask(push.status))
        job = managed.job = job.pushed_progress(push, self._now())
        self._save_soon(managed)
        return job

    def configure(self, changes: Mapping[str, Any]) -> Settings:
        """Apply and persist run-time settings; raises ConfigError (or StorageUnavailable
        when they cannot be stored), changing nothing."""
        new = self.settings.updated(changes)
        try:
            stored = {**self._store.load_settings(), **changes}
            self._store.save_settings(stored)
        except StoreError as e:
            raise StorageUnavailable(f"{e.message}; the settings are unchanged") from e
        self.settings = new
        self.log.info(
            "settings changed: {text}",
            changes=dict(changes),
            text=", ".join(f"{key} = {json.dumps(value)}" for key, value in changes.items()),
        )
        return new

    # -- from the client ------------------------------------------------

    def _hub_addresses(self, managed: ManagedJob, text: str) -> str:
        """``text`` with the relays' loopback addresses put back as the hub's.

        The client only knows the relays; an operator reading the job's error
        wants the port the SHA gave.
        """
        if managed.request is None or managed.relayed is None:
            return text
        for hub, relay in zip(managed.request.targets, managed.relayed.targets, strict=True):
            text = text.replace(f"{relay.host}:{relay.port}", f"{hub.host}:{hub.port}")
        return text

    def _event(self, managed: ManagedJob, event: events.Event) -> None:
        if managed.stage is not Stage.RUNNING:
            return
        if isinstance(event, (events.Error, events.Stall)):
            event = attrs.evolve(event, message=self._hub_addresses(managed, event.message))
        new = managed.job.apply(event, self._now())
        if isinstance(event, events.DiskDone):
            disk = next((d for d in new.disks if d.disk_key == event.disk_key), None)
            self.log.info(
                "job {job_id}: {disk} done, change ID {change_id}",
                job_id=managed.job_id,
                disk=f"disk {disk.disk_index} (target {event.disk_key}"
                + (f", VMware disk {disk.vmware_disk_key})" if disk.vmware_disk_key else ")")
                if disk
                else f"target {event.disk_key}",
                disk_index=disk.disk_index if disk else None,
                disk_key=event.disk_key,
                vmware_key=disk.vmware_disk_key if disk else None,
                change_id=event.change_id,
            )
        managed.job = new
        self._save_soon(managed)

    def _ended(
        self,
        managed: ManagedJob,
        exit_code: Optional[int],
        exit_signal: Optional[int],
        last_output: Optional[str],
    ) -> None:
        if last_output is not None:
            last_output = self._hub_addresses(managed, last_output)
        job = self._with_relay_counts(managed.job).ended(
            self._now(), exit_code, exit_signal, last_output, shutting_down=self._stopping
        )
        request = managed.ended(job)
        if job.kind == replication.KIND:
            self._extend_chain(job)
        # The SHA's messages are stored with the ended record, in one transaction; if
        # the store refuses, both are kept and go with the next write that it takes.
        self._save_now(managed, self._ended_messages(job))
        self._job_ended(job)
        closing = self._gateway.close_relays(managed.job_id).addCallback(
            self._final_counts, managed
        )
        if self.hub is not None:
            # Completions only once every disk is flushed and disconnected, relays included:
            # the SHA stops the job's qemu-nbd on the last one.
            managed.hub_gate = closing
            if not managed.unsaved:
                self._tell_hub(managed)
        waits = [closing]
        if self._janitor is not None:
            # A snapshot its client did not say it removed (a killed client's, one it
            # gave up on) is pending: the janitor's first attempt is waited for, not its retries.
            waits.append(self._janitor.job_ended(job, request))
        managed.wait_for(waits, self._live.remove)
        self.log.info(
            "job {job_id} {status}: {how}{error_text}",
            job_id=managed.job_id,
            status=job.status.value,
            exit_code=exit_code,
            exit_signal=exit_signal,
            error=job.error,
            how=f"exit code {exit_code}"
            if exit_code is not None
            else (f"killed by signal {exit_signal}" if exit_signal else "no exit code"),
            error_text=f", error: {job.error}" if job.error else "",
        )

    def _extend_chain(self, job: Job) -> None:
        """A completed replication's change IDs become where its disks' next run starts.

        A write the store refuses costs only bytes: the next run starts from the
        older change IDs (what changed since then includes what changed since
        now) or, without any, copies in full.
        """
        chain = IChainStore(self._store, None)
        rows = replication.chain_rows(
            job, replication.vcenter_key(job.vcenter_host), self._now().isoformat()
        )
        if chain is None or not rows:
            return
        try:
            chain.chain_save(rows)
        except StoreError as e:
            self.log.error(
                "job {job_id}: cannot keep its change IDs for the next replication of "
                "{vm_path} ({reason}); it starts from older ones, or copies in full",
                job_id=job.job_id,
                vm_path=job.vm_path,
                reason=e.message,
            )
            return
        self.log.info(
            "job {job_id}: the next replication of {vm_path} starts from {change_ids}",
            job_id=job.job_id,
            vm_path=job.vm_path,
            change_ids="; ".join(f"disk {r.disk_key} ({r.target}): {r.change_id}" for r in rows),
        )

    def _final_counts(self, stats: list[RelayStats], managed: ManagedJob) -> None:
        """The relays are closed: the bytes they moved after the client's exit count too."""
        # A job pruned meanwhile, or one whose id a newer job has taken, is not written.
        if self._jobs.get(managed.job_id) is not managed or not stats:
            return
        managed.job = managed.job.with_relay_counts(
            {s.disk_key: (s.bytes_to_hub, s.bytes_from_hub) for s in stats}
        )
        self._save_now(managed)

    def snapshot_changed(self, job_id: str, started_at: datetime, snapshot: SnapshotState) -> None:
        """The janitor's news of an ended job's snapshot; a newer job of its id is left alone."""
        managed = self._jobs.get(job_id)
        if managed is None or managed.job.started_at != started_at:
            return
        managed.job = managed.job.snapshot_changed(snapshot)
        self._save_now(managed)

    # -- persistence ----------------------------------------------------

    def _save_soon(self, managed: ManagedJob) -> None:
        if managed.save_call is None:
            managed.save_call = self._clock.callLater(SAVE_INTERVAL, self._save_now, managed)

    def _save_now(self, managed: ManagedJob, outbox: Sequence[Message] = ()) -> bool:
        """Write ``managed``'s record with ``outbox`` and what earlier writes could not
        store; whether the store took it.  What it refuses is kept, never raised."""
        call, managed.save_call = managed.save_call, None
        if call is not None and call.active():
            call.cancel()
        managed.unsent.extend(outbox)
        try:
            if managed.forget_outbox:
                self._store.outbox_forget(managed.job_id)
                managed.forget_outbox = False
            self._store.save(managed.job, managed.unsent)
        except StoreError as e:
            self._write_failed(managed, e)
            return False
        managed.unsent = []
        managed.stored_status = managed.job.status
        if managed.unsaved:
            managed.unsaved = False
            self._unsaved.remove(managed)
            self.log.info(
                "job {job_id}: its record ({status}) is written now",
                job_id=managed.job_id,
                status=managed.job.status.value,
            )
            if not self._unsaved:
                self.log.info("the job database is written again")
                self._write_problem = None
        if managed.hub_gate is not None:
            self._tell_hub(managed)
        return True

    def _write_failed(self, managed: ManagedJob, error: StoreError) -> None:
        if self._write_problem is None:
            self.log.error(
                "{problem}; job records are kept in memory and written once it can be "
                "(tried every {delay:g} s); no job starts until then",
                problem=error.message,
                delay=WRITE_RETRY,
            )
        self._write_problem = error.message
        if not managed.unsaved:
            managed.unsaved = True
            self._unsaved.append(managed)
            self.log.warn(
                "job {job_id}: its record ({status}) is kept in memory until it can be written",
                job_id=managed.job_id,
                status=managed.job.status.value,
            )
        if self._retry_call is None:
            self._retry_call = self._clock.callLater(WRITE_RETRY, self._retry_writes)

    def _retry_writes(self) -> None:
        """Write what the store refused, oldest first, until it refuses again."""
        call, self._retry_call = self._retry_call, None
        if call is not None and call.active():
            call.cancel()
        for managed in list(self._unsaved):
            if self._jobs.get(managed.job_id) is not managed:
                # Forgotten, or replaced by a newer job of its id (which drops what
                # this one owed the SHA): writing it would undo the newer record.
                managed.unsaved = False
                self._unsaved.remove(managed)
                managed.unsent = []
                if not self._unsaved:
                    self._write_problem = None
                continue
            if not self._save_now(managed):
                return

    def _tell_hub(self, managed: ManagedJob) -> None:
        """The ended job's messages are stored: the SHA gets them once its relays are closed."""
        assert self.hub is not None and managed.hub_gate is not None
        gate, managed.hub_gate = managed.hub_gate, None
        self.hub.job_ended(managed.job_id, gate)

    def _job_ended(self, job: Job) -> None:
        """Tell ``on_job_ended``; what it raises is logged, never the job's end's business."""
        try:
            self._on_job_ended(job)
        except Exception:
            self.log.failure("job {job_id}: telling that it ended", job_id=job.job_id)

    def _ended_messages(self, job: Job) -> list[Message]:
        if self.hub is None:
            return []
        if job.replication_id is not None:
            # The request's end goes once the last of its jobs has ended.
            group = self.replication_jobs(job.replication_id)
            return messages.replication_messages(job, group, self._now())
        return self.hub.ended_messages(job)


# -- stored vCenter pins in the launch path ---------------------------------------------


@implementer(IProcessLauncher)
class PinnedLauncher:
    """``launcher``, with the stored pin of the job's vCenter as the client's thumbprint.

    A backup request without ``vcenter_thumbprint`` (the SHA never sends one)
    whose vCenter has a pin (:mod:`sna.vmware.pins`) is launched as if it had
    sent that pin; the job log says so, after the client's ``starting`` line.
    A thumbprint in the request wins.  The legacy client takes no thumbprint:
    it gets none.
    """

    log = Logger()

    def __init__(
        self, launcher: ProcessLauncher, pins: VCenterPins, now: Callable[[], datetime]
    ) -> None:
        self.launcher = launcher
        self._pins = pins
        self._now = now

    @property
    def command(self) -> ClientCommand:
        """The client's command, as the launcher it wraps has it."""
        return self.launcher.command

    def check(self) -> None:
        self.launcher.check()

    def storage_problem(self) -> Optional[str]:
        return self.launcher.storage_problem()

    def launch(self, request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        pin = None
        if request.vcenter_thumbprint is None and not self.launcher.command.legacy:
            pin = self._pins.for_address(request.vcenter_host)
        if pin is None:
            return self.launcher.launch(request, observer)
        process = self.launcher.launch(
            attrs.evolve(request, vcenter_thumbprint=pin.thumbprint), observer
        )
        note = (
            f"vCenter {pin.vcenter}: the request pins no certificate; the stored pin "
            f"{pin.thumbprint} (sna-ctl vcenter trust, {pin.to_json()['created_at']}) is used"
        )
        self.log.info("job {job_id}: {note}", job_id=request.job_id, note=note)
        try:
            job_log = JobLog(self.launcher.log_path(request.job_id), self._now)
        except OSError as e:
            # The client runs: a note it cannot get never undoes the job.
            self.log.warn(
                "job {job_id}: cannot note the pin in its log: {reason}",
                job_id=request.job_id,
                reason=e.strerror or e,
            )
            return process
        job_log.write("sna", note)
        job_log.close()
        return process
