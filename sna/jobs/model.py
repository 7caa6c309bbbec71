"""Job records and the job state machine.

A :class:`Job` is immutable; every change (a progress event, the client's
exit, a cancel) makes a new one through a method here, so the rules about
which status may follow which live in one place.  Times are aware UTC
datetimes.  No secret is ever part of a :class:`Job`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Optional

import attrs

from sna.contract import events as contract
from sna.contract.disks import disk_indexes
from sna.contract.ids import snapshot_name
from sna.contract.targets import NbdTarget, format_targets
from sna.sbc import events


class JobStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def active(self) -> bool:
        return self is JobStatus.RUNNING


class InvalidTransition(Exception):
    """A job was asked to move to a status its current one cannot lead to."""


@attrs.frozen
class BackupRequest:
    """A validated ``POST /api/v1/backup/start``; the password never leaves it."""

    job_id: str
    vm_name: str
    vcenter_host: str
    vcenter_user: str
    vcenter_password: str = attrs.field(repr=False)
    vm_path: str
    targets: tuple[NbdTarget, ...]
    backup_type: str
    previous_change_id: Optional[str] = None
    #: Per target key; wins over ``previous_change_id`` for that disk.
    previous_change_ids: tuple[tuple[str, str], ...] = ()
    #: The vCenter certificate's SHA-1 or SHA-256 thumbprint, to pin it.
    vcenter_thumbprint: Optional[str] = None
    #: Per target key: the disk's capacity when its previous change ID was
    #: taken, from sna's own records (a resized disk is copied in full).
    previous_capacities: tuple[tuple[str, int], ...] = ()
    #: Per target key: where its previous change ID came from (``request``, ``sha``).
    previous_sources: tuple[tuple[str, str], ...] = ()

    def previous_change_id_of(self, disk_key: str) -> Optional[str]:
        return dict(self.previous_change_ids).get(disk_key, self.previous_change_id)

    def previous_source_of(self, disk_key: str) -> Optional[str]:
        if self.previous_change_id_of(disk_key) is None:
            return None
        return dict(self.previous_sources).get(disk_key, "request")

    @property
    def disk_indexes(self) -> dict[str, int]:
        """The SHA's index of each target (:func:`sna.contract.disks.disk_indexes`)."""
        return disk_indexes(t.disk_key for t in self.targets)

    @property
    def nbd_targets(self) -> str:
        return format_targets(self.targets)


@attrs.frozen
class DiskState:
    """One disk of a job, as far as the client has told us.

    ``disk_key`` is the key of the disk's target in ``nbd_targets``: what
    the client's events name it by.  ``vmware_disk_key`` is the VMware device
    key the client mapped that target to, once it has said so, and
    ``disk_index`` the SHA's number of the disk (:mod:`sna.contract.disks`).
    """

    disk_key: str
    export: str
    port: int
    status: str = "pending"  # pending | running | completed | failed
    sync_type: Optional[str] = None
    sync_reason: Optional[str] = None
    bytes_done: int = 0
    bytes_total: Optional[int] = None
    change_id: Optional[str] = None
    #: The loopback relay the client was given for this disk's target.
    relay_port: Optional[int] = None
    #: Bytes that crossed the relay, each way.
    bytes_to_hub: int = 0
    bytes_from_hub: int = 0
    #: Why the hub side of this disk's target dropped, if it did.
    target_error: Optional[str] = None
    #: The change ID an incremental of this disk starts from, if one was given.
    previous_change_id: Optional[str] = None
    #: Where that came from: ``request`` or ``sha`` (its changeid route).
    previous_source: Optional[str] = None
    disk_index: int = 0
    vmware_disk_key: Optional[str] = None
    #: The disk's capacity in the snapshot, once the client has said it.
    capacity_bytes: Optional[int] = None


@attrs.frozen
class PushedProgress:
    """The last progress pushed by the legacy Go client to ``/progress/{id}/update``."""

    stage: str = ""
    status: str = ""
    sync_type: str = ""
    bytes_transferred: int = 0
    total_bytes: int = 0
    throughput_bps: float = 0.0
    percent: float = 0.0


@attrs.frozen
class Stall:
    """A running job that has made no progress since ``since``, waiting on ``on``.

    ``on`` is ``vcenter`` (a call or task that does not end), ``source_read``
    (the datastore or nbdkit gives no bytes) or ``hub_write`` (the hub's NBD
    target acknowledges no write), as the client reports it.
    """

    on: str
    since: datetime
    message: str = ""
    disk_key: Optional[str] = None


#: A job's snapshot is on the VM, and its client still runs (or said it could not remove it).
SNAPSHOT_PRESENT = "present"
#: The job ended and its snapshot may still be on the VM: sna's janitor removes it.
SNAPSHOT_PENDING = "pending"
#: vCenter confirmed the snapshot gone.
SNAPSHOT_REMOVED = "removed"


@attrs.frozen
class SnapshotState:
    """What sna knows of the ``sbak-`` snapshot a job's client took."""

    name: str
    state: str  # SNAPSHOT_PRESENT | SNAPSHOT_PENDING | SNAPSHOT_REMOVED
    #: Why it is not removed yet: what the client or the janitor last ran into.
    reason: Optional[str] = None
    #: The janitor's attempts so far.
    attempts: int = 0
    #: When the janitor tries again, if it holds credentials to.
    next_attempt: Optional[datetime] = None
    #: sna holds no vCenter password to remove it with (it was restarted since the
    #: job ran, or vCenter refused the password): it waits for a job or a
    #: ``POST /cleanup`` with credentials for the same vCenter and user.
    needs_credentials: bool = False
    #: ``client`` or ``sna``, once removed.
    removed_by: Optional[str] = None
    removed_at: Optional[datetime] = None

    @property
    def pending(self) -> bool:
        return self.state == SNAPSHOT_PENDING


# The Go SNA's names for the Go client's stages (its mapStageToOperation).
_STAGE_OPERATIONS = {
    "Discover": "Discovering VM",
    "EnableCBT": "Enabling CBT",
    "QueryCBT": "Querying CBT",
    "Snapshot": "Creating Snapshot",
    "PrepareVolumes": "Preparing Volumes",
    "StartExports": "Starting Exports",
    "Transfer": "Transferring Data",
    "Finalize": "Finalizing",
    "PersistChangeIDs": "Persisting Change IDs",
}


def stage_operation(stage: str) -> str:
    return _STAGE_OPERATIONS.get(stage, stage)


def _disk_fraction(disk: DiskState) -> float:
    if disk.status == "completed":
        return 1.0
    if disk.bytes_total:
        return min(disk.bytes_done / disk.bytes_total, 1.0)
    return 0.0


def utcnow() -> datetime:
    return datetime.now(UTC)


@attrs.frozen
class Job:
    job_id: str
    vm_name: str
    vm_path: str
    vcenter_host: str
    vcenter_user: str
    backup_type: str
    previous_change_id: Optional[str]
    disks: tuple[DiskState, ...]
    started_at: datetime
    last_update: datetime
    status: JobStatus = JobStatus.RUNNING
    phase: str = "starting"
    current_operation: str = "Starting backup client"
    pid: Optional[int] = None
    #: The ``--spare-id`` of a spare client that took the job (its argv names no job).
    spare_id: Optional[str] = None
    ended_at: Optional[datetime] = None
    exit_code: Optional[int] = None
    exit_signal: Optional[int] = None
    error: Optional[str] = None
    cancel_requested: bool = False
    throughput_bps: Optional[float] = None
    #: Totals when the client reports only an aggregate (the Go client).
    aggregate_done: int = 0
    aggregate_total: Optional[int] = None
    pushed: Optional[PushedProgress] = None
    #: Set while the client reports no progress (kept until it reports progress again).
    stalled: Optional[Stall] = None
    #: The job's snapshot, once the client has said it took one (or may have).
    snapshot: Optional[SnapshotState] = None

    @classmethod
    def from_request(
        cls, request: BackupRequest, now: datetime, relay_ports: Sequence[Optional[int]] = ()
    ) -> Job:
        ports = list(relay_ports) or [None] * len(request.targets)
        indexes = request.disk_indexes
        return cls(
            job_id=request.job_id,
            vm_name=request.vm_name,
            vm_path=request.vm_path,
            vcenter_host=request.vcenter_host,
            vcenter_user=request.vcenter_user,
            backup_type=request.backup_type,
            previous_change_id=request.previous_change_id,
            disks=tuple(
                DiskState(
                    t.disk_key,
                    t.export,
                    t.port,
                    relay_port=relay,
                    previous_change_id=request.previous_change_id_of(t.disk_key),
                    previous_source=request.previous_source_of(t.disk_key),
                    disk_index=indexes[t.disk_key],
                )
                for t, relay in zip(request.targets, ports, strict=True)
            ),
            started_at=now,
            last_update=now,
        )

    # -- derived values -------------------------------------------------

    @property
    def reports_per_disk(self) -> bool:
        """Whether the client tells us about disks, not only an aggregate (the Go pushes)."""
        return any(d.status != "pending" or d.bytes_total is not None for d in self.disks)

    @property
    def bytes_done(self) -> int:
        if self.reports_per_disk:
            return sum(d.bytes_done for d in self.disks)
        return self.aggregate_done

    @property
    def bytes_total(self) -> Optional[int]:
        """Bytes to copy over all disks, ``None`` while any disk's size is unknown."""
        if self.reports_per_disk:
            if all(d.bytes_total is not None for d in self.disks):
                return sum(d.bytes_total or 0 for d in self.disks)
            return None
        return self.aggregate_total

    @property
    def progress_percent(self) -> float:
        """Bytes-weighted over every disk; 100 only once the job has completed."""
        if self.status is JobStatus.COMPLETED:
            return 100.0
        total = self.bytes_total
        if self.reports_per_disk:
            if total:
                percent = 100.0 * min(self.bytes_done, total) / total
            else:
                # Some disk's size is not known yet: weigh the disks equally.
                percent = 100.0 * sum(_disk_fraction(d) for d in self.disks) / len(self.disks)
        elif self.pushed is not None and self.pushed.percent:
            percent = self.pushed.percent
        elif total:
            percent = 100.0 * min(self.bytes_done, total) / total
        else:
            percent = 0.0
        return min(round(percent, 2), 99.99)

    # -- transitions ----------------------------------------------------

    def _touch(self, now: datetime, **changes: Any) -> Job:
        return attrs.evolve(self, last_update=now, **changes)

    def _disk(self, key: Optional[str]) -> Optional[int]:
        for index, disk in enumerate(self.disks):
            if disk.disk_key == key:
                return index
        return None

    def _with_disk(self, index: int, now: datetime, **changes: Any) -> Job:
        disks = list(self.disks)
        disks[index] = attrs.evolve(disks[index], **changes)
        return self._touch(now, disks=tuple(disks))

    def spawned(self, pid: int, now: datetime, spare_id: Optional[str] = None) -> Job:
        return self._touch(now, pid=pid, spare_id=spare_id)

    def apply(self, event: events.Event, now: datetime) -> Job:
        """The job after one event from its client.  Events after the end are ignored."""
        if not self.status.active:
            return self
        match event:
            case events.Phase(phase=phase, message=message):
                return self._touch(
                    now, phase=phase, current_operation=message or phase, stalled=None
                )
            case events.DiskPlan(disk_key=key) | events.DiskStart(disk_key=key):
                index = self._disk(key)
                if index is None:
                    return self._touch(now)
                disk = self.disks[index]
                job = self._with_disk(
                    index,
                    now,
                    sync_type=event.sync_type or disk.sync_type,
                    sync_reason=event.sync_reason or disk.sync_reason,
                    bytes_total=event.bytes_total
                    if event.bytes_total is not None
                    else disk.bytes_total,
                    vmware_disk_key=event.vmware_disk_key or disk.vmware_disk_key,
                    capacity_bytes=event.capacity_bytes or disk.capacity_bytes,
                )
                if isinstance(event, events.DiskPlan):
                    return job
                return job._with_disk(index, now, status="running")._touch(
                    now,
                    phase="transfer",
                    current_operation=f"Copying disk {event.vmware_disk_key or key}",
                )
            case events.Progress(disk_key=None):
                return self._touch(
                    now,
                    aggregate_done=event.bytes_done,
                    aggregate_total=event.bytes_total or self.aggregate_total,
                    throughput_bps=event.throughput_bps,
                )
            case events.Progress(disk_key=key):
                index = self._disk(key)
                if index is None:
                    return self._touch(now)
                disk = self.disks[index]
                job = self._with_disk(
                    index,
                    now,
                    status="running" if disk.status == "pending" else disk.status,
                    bytes_done=event.bytes_done,
                    bytes_total=event.bytes_total
                    if event.bytes_total is not None
                    else disk.bytes_total,
                )
                # Bytes moving again end a stall, even one whose resume was lost.
                stalled = None if event.bytes_done > disk.bytes_done else self.stalled
                return job._touch(now, throughput_bps=event.throughput_bps, stalled=stalled)
            case events.DiskDone(disk_key=key):
                index = self._disk(key)
                if index is None:
                    return self._touch(now)
                disk = self.disks[index]
                total = event.bytes_total if event.bytes_total is not None else disk.bytes_total
                done = event.bytes_done if event.bytes_done is not None else (total or 0)
                return self._with_disk(
                    index,
                    now,
                    status="completed",
                    change_id=event.change_id or disk.change_id,
                    bytes_done=done,
                    bytes_total=total,
                )._touch(now, stalled=None)
            case events.Error(message=message, disk_key=key):
                job = self._touch(now, error=message)
                index = job._disk(key)
                if index is not None:
                    job = job._with_disk(index, now, status="failed")
                return job
            case events.Done(message=message):
                return self._touch(
                    now,
                    phase="finishing",
                    current_operation=message or "Backup client finished",
                    stalled=None,
                )
            case events.Stall(on=on, seconds=seconds, message=message, disk_key=key):
                since = now - timedelta(seconds=seconds)
                old = self.stalled
                if old is not None and (old.on, old.disk_key) == (on, key):
                    since = min(since, old.since)
                return self._touch(now, stalled=Stall(on, since, message, key))
            case events.Resume():
                return self._touch(now, stalled=None)
            case events.Snapshot(name=name, state=state, message=message):
                return self._touch(now, snapshot=self._snapshot_reported(name, state, message, now))
        return self  # pragma: no cover - the match is exhaustive

    def _snapshot_reported(
        self, name: str, state: str, message: str, now: datetime
    ) -> SnapshotState:
        if state == contract.SNAPSHOT_REMOVED:
            return SnapshotState(name, SNAPSHOT_REMOVED, removed_by="client", removed_at=now)
        if state == contract.SNAPSHOT_REMAINS:
            return SnapshotState(name, SNAPSHOT_PRESENT, reason=message or None)
        return SnapshotState(name, SNAPSHOT_PRESENT)

    def _snapshot_at_end(self, killed: bool, reason: str) -> Optional[SnapshotState]:
        """The snapshot once the client is gone: one it did not say it removed is pending.

        A killed client may have taken one without saying so: the janitor looks.
        """
        snapshot = self.snapshot
        if snapshot is not None and snapshot.state == SNAPSHOT_PRESENT:
            return attrs.evolve(snapshot, state=SNAPSHOT_PENDING, reason=snapshot.reason or reason)
        if snapshot is None and killed:
            return SnapshotState(snapshot_name(self.job_id), SNAPSHOT_PENDING, reason=reason)
        return snapshot

    def snapshot_changed(self, snapshot: SnapshotState) -> Job:
        """The janitor's news of an ended job's snapshot (the job's times stay as they are)."""
        return attrs.evolve(self, snapshot=snapshot)

    def pushed_progress(self, push: PushedProgress, now: datetime) -> Job:
        """Apply a push from the Go client; its byte counts become the aggregate."""
        return self._touch(
            now,
            pushed=push,
            aggregate_done=push.bytes_transferred or self.aggregate_done,
            aggregate_total=push.total_bytes or self.aggregate_total,
            throughput_bps=push.throughput_bps,
            current_operation=stage_operation(push.stage) or self.current_operation,
        )

    def with_relay_counts(self, counts: Mapping[str, tuple[int, int]]) -> Job:
        """The byte counts of the disks' relays, ``{disk_key: (to_hub, from_hub)}``."""
        disks = tuple(
            attrs.evolve(
                d, bytes_to_hub=counts[d.disk_key][0], bytes_from_hub=counts[d.disk_key][1]
            )
            if d.disk_key in counts
            else d
            for d in self.disks
        )
        return attrs.evolve(self, disks=disks)

    def target_lost(self, disk_key: str, reason: str, now: datetime) -> Job:
        """The hub side of a disk's NBD target dropped while the job ran."""
        index = self._disk(disk_key)
        if index is None or not self.status.active:
            return self
        disk = self.disks[index]
        error = f"NBD target {disk.port} ({disk.export}) dropped: {reason}"
        return self._with_disk(index, now, target_error=error)

    def cancelling(self, now: datetime) -> Job:
        if not self.status.active:
            raise InvalidTransition(f"job {self.job_id} is {self.status.value}")
        return self._touch(now, cancel_requested=True, current_operation="Cancelling")

    def ended(
        self,
        now: datetime,
        exit_code: Optional[int],
        exit_signal: Optional[int],
        last_output: Optional[str],
        shutting_down: bool = False,
    ) -> Job:
        """The job once its client process has gone, however it went."""
        if not self.status.active:
            raise InvalidTransition(f"job {self.job_id} already ended as {self.status.value}")
        if exit_code == 0:
            status, error = JobStatus.COMPLETED, None
            operation = "Completed"
        elif self.cancel_requested:
            status, error = JobStatus.CANCELLED, "cancelled by request"
            operation = "Cancelled"
        elif shutting_down:
            status = JobStatus.INTERRUPTED
            error = "sna was stopped while the backup client was running"
            operation = "Interrupted"
        else:
            status, operation = JobStatus.FAILED, "Failed"
            if exit_code is not None:
                how = f"backup client exited with code {exit_code}"
            else:
                how = f"backup client was killed by signal {exit_signal}"
            # A dropped hub connection is the cause; what the client said follows from it.
            causes = [f"disk {d.disk_key}: {d.target_error}" for d in self.disks if d.target_error]
            reason = self.error or last_output
            if reason:
                causes.append(reason)
            error = f"{how}: {'; '.join(causes)}" if causes else how
        disks = self.disks
        if status is not JobStatus.COMPLETED:
            disks = tuple(
                d if d.status == "completed" else attrs.evolve(d, status="failed") for d in disks
            )
        if exit_signal is not None:
            left = f"the backup client was killed by signal {exit_signal} before removing it"
        else:
            left = "the backup client ended without removing it"
        return self._touch(
            now,
            status=status,
            ended_at=now,
            exit_code=exit_code,
            exit_signal=exit_signal,
            error=error,
            current_operation=operation,
            phase=status.value,
            disks=disks,
            stalled=None,
            snapshot=self._snapshot_at_end(exit_signal is not None, left),
        )

    def interrupted(self, now: datetime, reason: str) -> Job:
        """A job found running in the store when the daemon starts."""
        if not self.status.active:
            raise InvalidTransition(f"job {self.job_id} is {self.status.value}")
        return self._touch(
            now,
            status=JobStatus.INTERRUPTED,
            ended_at=now,
            error=reason,
            current_operation="Interrupted",
            phase="interrupted",
            disks=tuple(
                d if d.status == "completed" else attrs.evolve(d, status="failed")
                for d in self.disks
            ),
            stalled=None,
            # What the client said last may not have been written before sna stopped.
            snapshot=self._snapshot_at_end(True, "sna stopped while the job was running"),
        )

    # -- persistence ----------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the store (not the API's shape)."""

        def convert(_inst: Any, _field: Any, value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, JobStatus):
                return value.value
            return value

        return attrs.asdict(self, value_serializer=convert)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        data = dict(record)
        for key in ("started_at", "last_update", "ended_at"):
            if data.get(key) is not None:
                data[key] = datetime.fromisoformat(data[key])
        data["status"] = JobStatus(data["status"])
        data["disks"] = tuple(DiskState(**d) for d in data["disks"])
        if data.get("pushed") is not None:
            data["pushed"] = PushedProgress(**data["pushed"])
        if data.get("stalled") is not None:
            stalled = dict(data["stalled"])
            stalled["since"] = datetime.fromisoformat(stalled["since"])
            data["stalled"] = Stall(**stalled)
        if data.get("snapshot") is not None:
            snapshot = dict(data["snapshot"])
            for key in ("next_attempt", "removed_at"):
                if snapshot.get(key) is not None:
                    snapshot[key] = datetime.fromisoformat(snapshot[key])
            data["snapshot"] = SnapshotState(**snapshot)
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
