"""Running jobs: admission, one client process per job, and their records.

The :class:`JobManager` is the only writer of job records.  It admits a
request (no duplicate active job, no NBD port shared with another active job,
no more than ``max_jobs``), asks the SHA for the disks' previous change IDs
while it probes the targets, starts the client through an
:class:`~sna.sbc.process.IProcessLauncher`, folds the client's events into the
record, and persists it: at once on every status change, and at most once a
second for progress.  An ended job's record is stored together with what the
SHA must learn of it (:mod:`sna.sha`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sna.config import ConfigError, Settings
from sna.jobs.model import BackupRequest, Job, JobStatus, PushedProgress
from sna.jobs.store import IJobStore
from sna.nbd.gateway import ITargetGateway
from sna.nbd.probe import ProbeResult
from sna.nbd.relay import RelayStats
from sna.sbc import events
from sna.sbc.process import ClientProcess, IClientObserver, IProcessLauncher, terminate_leftover
from sna.sha.hub import IHub, Lookup
from sna.sha.messages import Message

#: Progress is written to the database at most this often per job.
SAVE_INTERVAL = 1.0


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


@implementer(IClientObserver)
class _Observer:
    def __init__(self, manager: JobManager, job_id: str) -> None:
        self._manager = manager
        self._job_id = job_id

    def event_received(self, event: events.Event) -> None:
        self._manager._event(self._job_id, event)

    def process_ended(
        self, exit_code: Optional[int], exit_signal: Optional[int], last_output: Optional[str]
    ) -> None:
        self._manager._ended(self._job_id, exit_code, exit_signal, last_output)


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
        on_client_killed: Callable[[BackupRequest], Deferred[Any]] = lambda request: succeed(None),
        hub: Optional[IHub] = None,
    ) -> None:
        #: The SHA, when sna reports to one (``--sha-url``).
        self.hub = hub
        self._on_client_killed = on_client_killed
        #: The requests of running jobs, password included: memory only, never stored.
        self._requests: dict[str, tuple[BackupRequest, BackupRequest]] = {}
        #: Snapshot removals after killed clients, waited for at shutdown.
        self._cleanups: set[Deferred[Any]] = set()
        self._store = store
        self._launcher = launcher
        self._gateway = gateway
        self._on_probe_failure = on_probe_failure
        self._clock = clock
        self._now = now
        self.settings = settings
        self._jobs: dict[str, Job] = {}
        self._processes: dict[str, ClientProcess] = {}
        self._save_calls: dict[str, IDelayedCall] = {}
        self._stopping = False
        #: NBD ports of clients left by a dead daemon, until they are gone.
        self._reserved: dict[int, str] = {}
        #: Requests admitted whose client is not spawned yet (probing, relaying).
        self._starting: dict[str, BackupRequest] = {}
        #: Relays of ended jobs still closing.
        self._closing: dict[str, Deferred[None]] = {}

    # -- lifecycle ------------------------------------------------------

    def recover(self) -> Deferred[Any]:
        """Load the store: running jobs of a dead daemon become ``interrupted``.

        Their clients, if still alive, are terminated; the Deferred fires when
        they are gone.
        """
        self._apply_stored_settings()
        leftovers = []
        for job in self._store.load_all():
            if job.status.active:
                job = job.interrupted(self._now(), "sna stopped while the job was running")
                # The hub delivers stored messages when it starts.
                self._store.save(job, self._ended_messages(job))
                self.log.warn("job {job_id} was running when sna stopped", job_id=job.job_id)
                if job.pid:
                    leftovers.append(self._stop_leftover(job))
            self._jobs[job.job_id] = job
        self.prune()
        return DeferredList(leftovers, consumeErrors=True)

    def _apply_stored_settings(self) -> None:
        for key, value in self._store.load_settings().items():
            try:
                self.settings = self.settings.updated({key: value})
            except ConfigError as e:
                self.log.error("ignoring stored setting {key}: {reason}", key=key, reason=e.message)
            else:
                self.log.info("stored setting {key} = {value}", key=key, value=value)

    def _stop_leftover(self, job: Job) -> Deferred[bool]:
        # Its ports stay taken until it is gone: a new job must not share a hub
        # port with a client that is still writing.
        ports = [d.port for d in job.disks]
        for port in ports:
            self._reserved[port] = job.job_id
        assert job.pid is not None
        d = terminate_leftover(
            self._clock, job.pid, job.job_id, self.settings.kill_grace, job.spare_id
        )

        def release(result: bool) -> bool:
            for port in ports:
                self._reserved.pop(port, None)
            return result

        return d.addBoth(release)

    def prune(self) -> list[str]:
        """Forget finished jobs older than the retention period; returns their ids."""
        days = self.settings.retention_days
        if not days:
            return []
        cutoff = self._now() - timedelta(days=days)
        old = [
            j.job_id
            for j in self._jobs.values()
            if not j.status.active and (j.ended_at or j.last_update) < cutoff
        ]
        if old:
            self._store.delete(old)
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
        stops = [p.stop(self.settings.kill_grace) for p in self._processes.values()]
        d: Deferred[Any] = DeferredList(stops, consumeErrors=True)

        def flushed(result: object) -> Deferred[Any]:
            for job_id in list(self._save_calls):
                self._save_now(job_id)
            # Every job has ended by now, so each relay is closing; wait for them,
            # and for the snapshots of clients that had to be killed.
            waits = [*self._closing.values(), *self._cleanups]
            return DeferredList(waits, consumeErrors=True)

        return d.addBoth(flushed)

    # -- queries --------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self._with_relay_counts(self._jobs[job_id])
        except KeyError:
            raise UnknownJob(f"job {job_id} not found") from None

    def jobs(self, status: Optional[JobStatus] = None) -> list[Job]:
        return [
            self._with_relay_counts(j)
            for j in self._jobs.values()
            if status is None or j.status is status
        ]

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

    def relays(self) -> list[RelayStats]:
        return self._gateway.all_stats()

    def counts(self) -> dict[str, int]:
        counted = Counter(j.status for j in self._jobs.values())
        return {status.value: counted.get(status, 0) for status in JobStatus}

    def active_jobs(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.status.active]

    # -- commands -------------------------------------------------------

    async def start(self, request: BackupRequest) -> Job:
        """Admit ``request``, probe and relay its targets, spawn its client.

        The job is ``running`` on return.  Until the client is spawned the
        request holds its job id and ports, so a concurrent start conflicts;
        if any step fails nothing is left: no job, no relay, no process.
        """
        self._admit(request)
        self._starting[request.job_id] = request
        try:
            return await self._start(request)
        finally:
            del self._starting[request.job_id]

    def _admit(self, request: BackupRequest) -> None:
        if self._stopping:
            raise ShuttingDown("sna is shutting down")
        current = self._jobs.get(request.job_id)
        if request.job_id in self._starting or (current is not None and current.status.active):
            pid = f" (pid {current.pid})" if current is not None and current.pid else ""
            raise JobActive(f"job {request.job_id} is already running{pid}")
        active = self.active_jobs()
        ports = {d.port: j.job_id for j in active for d in j.disks}
        for starting in self._starting.values():
            ports.update((t.port, starting.job_id) for t in starting.targets)
        for target in request.targets:
            if target.port in ports:
                raise PortInUse(
                    f"NBD port {target.port} (disk {target.disk_key}) is in use by "
                    f"running job {ports[target.port]}"
                )
            if target.port in self._reserved:
                raise PortInUse(
                    f"NBD port {target.port} (disk {target.disk_key}) is still in use by the "
                    f"client of interrupted job {self._reserved[target.port]}, being stopped"
                )
        running = len(active) + len(self._starting)
        if running >= self.settings.max_jobs:
            raise AtCapacity(f"{running} jobs are running, the maximum is {self.settings.max_jobs}")
        self._launcher.check()

    async def _start(self, request: BackupRequest) -> Job:
        # The SHA is asked while the targets are probed: neither waits for the other.
        asking: Deferred[dict[int, Lookup]] = succeed({})
        if self.hub is not None:
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
        if self._stopping:
            raise ShuttingDown("sna is shutting down")
        request = self._with_previous(request, answers)
        job_id = request.job_id
        ports = await self._gateway.open_relays(
            job_id, request.targets, lambda key, reason: self._upstream_lost(job_id, key, reason)
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
            return self._spawn(request, relayed, ports)
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
        sources = {key: "request" for key in explicit}
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
                "{change_id}; {use}",
                job_id=request.job_id,
                index=index,
                key=key,
                change_id=repr(answer.change_id or ""),
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
        capacities = {}
        for target in request.targets:
            previous = request.previous_change_id_of(target.disk_key)
            capacity = self._capacity_at(previous) if previous else None
            if capacity is not None:
                capacities[target.disk_key] = capacity
        return attrs.evolve(request, previous_capacities=tuple(sorted(capacities.items())))

    def _capacity_at(self, change_id: str) -> Optional[int]:
        """The disk's capacity when sna's own records last saw ``change_id`` taken."""
        for job in sorted(self._jobs.values(), key=lambda j: j.started_at, reverse=True):
            for disk in job.disks:
                if disk.change_id == change_id and disk.capacity_bytes:
                    return disk.capacity_bytes
        return None

    def _spawn(self, request: BackupRequest, relayed: BackupRequest, ports: list[int]) -> Job:
        previous = self._jobs.get(request.job_id)
        job = Job.from_request(request, self._now(), relay_ports=ports)
        self._jobs[job.job_id] = job
        try:
            process = self._launcher.launch(relayed, _Observer(self, job.job_id))
        except BaseException:
            if previous is None:
                del self._jobs[job.job_id]
            else:
                self._jobs[job.job_id] = previous
            raise
        self._processes[job.job_id] = process
        self._requests[job.job_id] = (request, relayed)
        if previous is not None:
            # The new job replaces the ended one's record: what that one still owed
            # the SHA goes with it, so the new job's status speaks of itself only.
            self._store.outbox_forget(job.job_id)
        if process.running:
            self._update(self._jobs[job.job_id].spawned(process.pid, self._now(), process.spare_id))
        self._save_now(job.job_id)
        if self.hub is not None:
            self.hub.job_started(self._jobs[job.job_id])
        self.log.info(
            "job {job_id}: {backup_type} backup of {vm_path}, {disks} disk(s), pid {pid}",
            job_id=job.job_id,
            backup_type=request.backup_type,
            vm_path=request.vm_path,
            disks=len(request.targets),
            pid=process.pid,
        )
        return self._jobs[job.job_id]

    def _upstream_lost(self, job_id: str, disk_key: str, reason: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or not job.status.active:
            return
        self.log.error(
            "job {job_id}: NBD target of disk {disk_key} dropped: {reason}",
            job_id=job_id,
            disk_key=disk_key,
            reason=reason,
        )
        self._update(job.target_lost(disk_key, reason, self._now()))
        self._save_now(job_id)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.status.active:
            raise JobNotActive(f"job {job_id} is not running (status {job.status.value})")
        if not job.cancel_requested:
            job = self._update(job.cancelling(self._now()))
            self._save_now(job_id)
            self.log.info("job {job_id}: cancel requested", job_id=job_id)
            process = self._processes.get(job_id)
            if process is not None:
                process.stop(self.settings.kill_grace)
        return job

    def push_progress(self, job_id: str, push: PushedProgress) -> Job:
        job = self.get(job_id)
        if not job.status.active:
            raise JobNotActive(f"job {job_id} is not running (status {job.status.value})")
        job = self._update(job.pushed_progress(push, self._now()))
        self._save_soon(job_id)
        return job

    def configure(self, changes: Mapping[str, Any]) -> Settings:
        """Apply and persist run-time settings; raises ConfigError, changing nothing."""
        new = self.settings.updated(changes)
        stored = {**self._store.load_settings(), **changes}
        self._store.save_settings(stored)
        self.settings = new
        self.log.info("settings changed: {changes}", changes=dict(changes))
        return new

    # -- from the client ------------------------------------------------

    def _hub_addresses(self, job_id: str, text: str) -> str:
        """``text`` with the relays' loopback addresses put back as the hub's.

        The client only knows the relays; an operator reading the job's error
        wants the port the SHA gave.
        """
        requests = self._requests.get(job_id)
        if requests is None:
            return text
        original, relayed = requests
        for hub, relay in zip(original.targets, relayed.targets, strict=True):
            text = text.replace(f"{relay.host}:{relay.port}", f"{hub.host}:{hub.port}")
        return text

    def _event(self, job_id: str, event: events.Event) -> None:
        if isinstance(event, events.Error):
            event = attrs.evolve(event, message=self._hub_addresses(job_id, event.message))
        job = self._jobs[job_id]
        new = job.apply(event, self._now())
        if isinstance(event, events.DiskDone):
            disk = next((d for d in new.disks if d.disk_key == event.disk_key), None)
            self.log.info(
                "job {job_id}: disk {disk_index} (target {disk_key}, VMware disk {vmware_key}) "
                "done, change ID {change_id}",
                job_id=job_id,
                disk_index=disk.disk_index if disk else None,
                disk_key=event.disk_key,
                vmware_key=disk.vmware_disk_key if disk else None,
                change_id=event.change_id,
            )
        self._update(new)
        self._save_soon(job_id)

    def _ended(
        self,
        job_id: str,
        exit_code: Optional[int],
        exit_signal: Optional[int],
        last_output: Optional[str],
    ) -> None:
        self._processes.pop(job_id, None)
        requests = self._requests.pop(job_id, None)
        if last_output is not None:
            last_output = self._hub_addresses(job_id, last_output)
        job = self._with_relay_counts(self._jobs[job_id])
        job = job.ended(
            self._now(), exit_code, exit_signal, last_output, shutting_down=self._stopping
        )
        if (
            requests is not None
            and exit_signal is not None
            and job.status is not JobStatus.COMPLETED
        ):
            cleanup = self._on_client_killed(requests[0])
            self._cleanups.add(cleanup)
            cleanup.addBoth(lambda _: self._cleanups.discard(cleanup))
        self._update(job)
        # The SHA's messages are stored with the ended record, in one transaction.
        self._save_now(job_id, self._ended_messages(job))
        closing = self._gateway.close_relays(job_id).addCallback(self._final_counts, job_id)
        self._closing[job_id] = closing
        if self.hub is not None:
            # Completions only once every disk is flushed and disconnected, relays included:
            # the SHA stops the job's qemu-nbd on the last one.
            self.hub.job_ended(job_id, closing)

        def closed(result: object) -> None:
            if self._closing.get(job_id) is closing:
                del self._closing[job_id]

        closing.addBoth(closed)
        self.log.info(
            "job {job_id} {status}: exit code {exit_code}, error {error}",
            job_id=job_id,
            status=job.status.value,
            exit_code=exit_code,
            error=job.error,
        )

    def _final_counts(self, stats: list[RelayStats], job_id: str) -> None:
        """The relays are closed: the bytes they moved after the client's exit count too."""
        job = self._jobs.get(job_id)
        if job is None or job.status.active or not stats:
            return
        self._update(
            job.with_relay_counts({s.disk_key: (s.bytes_to_hub, s.bytes_from_hub) for s in stats})
        )
        self._save_now(job_id)

    # -- persistence ----------------------------------------------------

    def _update(self, job: Job) -> Job:
        self._jobs[job.job_id] = job
        return job

    def _save_soon(self, job_id: str) -> None:
        if job_id not in self._save_calls:
            self._save_calls[job_id] = self._clock.callLater(SAVE_INTERVAL, self._save_now, job_id)

    def _save_now(self, job_id: str, outbox: Sequence[Message] = ()) -> None:
        call = self._save_calls.pop(job_id, None)
        if call is not None and call.active():
            call.cancel()
        self._store.save(self._jobs[job_id], outbox)

    def _ended_messages(self, job: Job) -> list[Message]:
        return self.hub.ended_messages(job) if self.hub is not None else []
