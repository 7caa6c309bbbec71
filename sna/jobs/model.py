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
    #: ``backup``, or ``replication`` (``POST /api/v1/replicate``, :mod:`sna.jobs.replication`).
    kind: str = "backup"
    #: A replication job's request ``job_id`` (several VMs: several jobs of one id).
    replication_id: Optional[str] = None
    #: Per target key: why a replication has no previous change ID for the disk
    #: (:mod:`sna.jobs.replication`); the job shows it with the client's reason.
    previous_notes: tuple[tuple[str, str], ...] = ()

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
    #: The target's host as the request named it (replication: part of the chain's key).
    nbd_host: Optional[str] = None
    #: Why a replication had no previous change ID for this disk, when sna knows more
    #: than the client (its chain was kept for another target).
    previous_note: Optional[str] = None


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


#: Seconds of the copy the rate and the ETA are measured over.
RATE_WINDOW = 30.0
#: Samples of a job's progress are kept at least this many seconds apart (the last
#: is replaced until it is), so a window holds about ``RATE_WINDOW`` of them.
SAMPLE_SPACING = 1.0
#: Seconds after the last report the window's end stays there; later it moves with
#: the clock, so the rate of a client that stops reporting falls instead of staying.
REPORT_GRACE = 2.0


@attrs.frozen
class Sample:
    """How far a job's copy was at ``at`` (POSIX seconds): bytes and the share done."""

    at: float
    bytes_done: int
    fraction: float


def _interpolated(samples: Sequence[Sample], at: float) -> Sample:
    """The progress at ``at``, on the straight line between the samples around it.

    Before the first sample it is the first (the window is shortened to the copy).
    """
    before = samples[0]
    for sample in samples[1:]:
        if sample.at <= at:
            before = sample
            continue
        if before.at >= at:
            return before
        share = (at - before.at) / (sample.at - before.at)
        return Sample(
            at,
            round(before.bytes_done + share * (sample.bytes_done - before.bytes_done)),
            before.fraction + share * (sample.fraction - before.fraction),
        )
    return before


def _windowed(samples: Sequence[Sample], end: float) -> Optional[tuple[Sample, Sample]]:
    """The first and last progress of the window that ends at ``end``, or ``None``.

    The window is :data:`RATE_WINDOW` seconds long, shorter while the copy is
    younger; past the last sample the progress is taken to have stayed put.
    """
    if not samples:
        return None
    last = samples[-1]
    if end > last.at:
        last = Sample(end, last.bytes_done, last.fraction)
    first = _interpolated(samples, max(end - RATE_WINDOW, samples[0].at))
    if last.at - first.at <= 0:
        return None
    return first, last


def _sampled(samples: tuple[Sample, ...], sample: Sample) -> tuple[Sample, ...]:
    """``samples`` with ``sample`` added, spaced and cut to the window before it."""
    kept = list(samples)
    if len(kept) >= 2 and sample.at - kept[-2].at < SAMPLE_SPACING:
        kept[-1] = sample
    else:
        kept.append(sample)
    # One sample at or before the window's start stays, for the progress there.
    while len(kept) >= 2 and kept[1].at <= sample.at - RATE_WINDOW:
        del kept[0]
    return tuple(kept)


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


def _disk_copied(disk: DiskState) -> int:
    """Bytes of a disk's copy done, within its total (all of it once completed)."""
    total = disk.bytes_total or 0
    if disk.status == "completed":
        return max(total, disk.bytes_done) if total else disk.bytes_done
    return min(disk.bytes_done, total) if total else disk.bytes_done


#: How a job's progress weighs its disks, settled when its copy begins: by their
#: bytes when every disk's size was known then, else each disk alike.
WEIGH_BYTES = "bytes"
WEIGH_DISKS = "disks"


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
    #: ``WEIGH_BYTES`` or ``WEIGH_DISKS`` once the copy has begun (see :attr:`fraction`).
    weighting: Optional[str] = None
    #: The highest ``progress_percent`` shown so far: it never goes back.
    percent_floor: float = 0.0
    #: The legacy client's pushes when no disk is known from its lines: the disks it
    #: finished (a push whose ``status`` turned ``completed``), their bytes, and the
    #: bytes of the one it copies now.
    pushed_runs: int = 0
    pushed_base: int = 0
    pushed_run_bytes: int = 0
    #: ``backup``, or ``replication`` (:mod:`sna.jobs.replication`).
    kind: str = "backup"
    #: A replication job's request ``job_id``; ``None`` for a backup.
    replication_id: Optional[str] = None
    #: The copy's progress over the last :data:`RATE_WINDOW` seconds, for the rate
    #: and the ETA; in memory only (a restarted daemon's jobs have ended).
    rate_samples: tuple[Sample, ...] = attrs.field(default=(), eq=False, repr=False)

    @classmethod
    def from_request(
        cls, request: BackupRequest, now: datetime, relay_ports: Sequence[Optional[int]] = ()
    ) -> Job:
        ports = list(relay_ports) or [None] * len(request.targets)
        indexes = request.disk_indexes
        notes = dict(request.previous_notes)
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
                    nbd_host=t.host,
                    previous_note=notes.get(t.disk_key),
                )
                for t, relay in zip(request.targets, ports, strict=True)
            ),
            started_at=now,
            last_update=now,
            kind=request.kind,
            replication_id=request.replication_id,
        )

    # -- derived values -------------------------------------------------

    @property
    def reports_per_disk(self) -> bool:
        """Whether the client tells us about disks, not only an aggregate (the Go pushes)."""
        return any(d.status != "pending" or d.bytes_total is not None for d in self.disks)

    @property
    def bytes_done(self) -> int:
        """Bytes copied over every disk (the legacy client's pushes without disks: theirs)."""
        if self.reports_per_disk:
            return sum(d.bytes_done for d in self.disks)
        return self.aggregate_done

    @property
    def bytes_total(self) -> Optional[int]:
        """Bytes to copy over all disks, ``None`` while any disk's size is unknown.

        Without any disk known, the job-wide total the client gave, if it did.
        """
        if self.reports_per_disk:
            if all(d.bytes_total is not None for d in self.disks):
                return sum(d.bytes_total or 0 for d in self.disks)
            return None
        return self.aggregate_total

    @property
    def fraction(self) -> float:
        """The share of the copy done, from 0 to 1, as the disks are weighed.

        Weighed by bytes when every disk's size was known at the copy's first byte
        (our client plans every disk first); else each disk alike, a disk's share
        growing with its bytes once its size is known (the legacy client names
        each disk only as it starts it).  Without any disk known, the legacy
        client's pushes: the disks it finished, and its bytes of the current one.
        """
        disks = self.disks
        if not disks:
            return 0.0
        if self.reports_per_disk:
            if self.weighting != WEIGH_DISKS:
                total = sum(d.bytes_total or 0 for d in disks)
                if total and all(d.bytes_total is not None for d in disks):
                    return min(sum(_disk_copied(d) for d in disks) / total, 1.0)
            return sum(_disk_fraction(d) for d in disks) / len(disks)
        push = self.pushed
        if push is None:
            aggregate = self.aggregate_total
            return min(self.aggregate_done / aggregate, 1.0) / len(disks) if aggregate else 0.0
        current = 0.0
        if push.status != "completed" and push.total_bytes:
            current = min(self.pushed_run_bytes / push.total_bytes, 1.0)
        return min((self.pushed_runs + current) / len(disks), 1.0)

    @property
    def progress_percent(self) -> float:
        """:attr:`fraction` in percent, never lower than shown before; 100 only once the
        job has completed, at most 99.99 until then."""
        if self.status is JobStatus.COMPLETED:
            return 100.0
        return min(max(self.percent_floor, round(100.0 * self.fraction, 2)), 99.99)

    def _window(self, now: datetime) -> Optional[tuple[Sample, Sample]]:
        if not self.status.active or not self.rate_samples:
            return None
        last = self.rate_samples[-1].at
        return _windowed(self.rate_samples, max(last, now.timestamp() - REPORT_GRACE))

    def rate_bps(self, now: datetime) -> Optional[float]:
        """Bytes per second over the last :data:`RATE_WINDOW` seconds of the copy.

        The window ends at the last report, or :data:`REPORT_GRACE` seconds before
        ``now`` once reports stop.  ``None`` before two reports of the copy, and
        once the job has ended.
        """
        window = self._window(now)
        if window is None:
            return None
        first, last = window
        return max(last.bytes_done - first.bytes_done, 0) / (last.at - first.at)

    def eta_seconds(self, now: datetime) -> Optional[float]:
        """Seconds until the copy is done at the pace of the same window.

        What is left of :attr:`fraction` over its rate of growth in the window:
        with disks weighed by bytes, the bytes left over the rate.  ``None`` while
        unknown (no pace yet, nothing moved in the window) and once ended.
        """
        window = self._window(now)
        if window is None:
            return None
        first, last = window
        if last.fraction >= 1.0:
            return 0.0
        pace = (last.fraction - first.fraction) / (last.at - first.at)
        if pace <= 0:
            return None
        return (1.0 - last.fraction) / pace

    def duration_seconds(self, now: datetime) -> float:
        """From the start to the end, or to ``now`` while running."""
        return max(((self.ended_at or now) - self.started_at).total_seconds(), 0.0)

    def average_rate_bps(self, now: datetime) -> Optional[float]:
        """Bytes copied over :meth:`duration_seconds`; ``None`` for a job of no duration."""
        duration = self.duration_seconds(now)
        return self.bytes_done / duration if duration > 0 else None

    def _measured(self, now: datetime) -> Job:
        """The job with its progress after a change measured: the weighting once the
        copy has begun, the highest percentage shown, a rate sample, the rate."""
        weighting = self.weighting
        if weighting is None and self.reports_per_disk and self._copy_begun:
            planned = all(d.bytes_total is not None for d in self.disks)
            weighting = WEIGH_BYTES if planned else WEIGH_DISKS
        job = attrs.evolve(self, weighting=weighting)
        fraction = job.fraction
        floor = max(self.percent_floor, min(round(100.0 * fraction, 2), 99.99))
        samples = self.rate_samples
        aggregate = not job.reports_per_disk and job.aggregate_total is not None
        if weighting is not None or aggregate:
            samples = _sampled(samples, Sample(now.timestamp(), job.bytes_done, fraction))
        job = attrs.evolve(job, percent_floor=floor, rate_samples=samples)
        return attrs.evolve(job, throughput_bps=job.rate_bps(now))

    @property
    def _copy_begun(self) -> bool:
        # Settled at the first byte (or the first disk done): a client may start
        # several disks before it copies any.
        return any(d.status == "completed" or d.bytes_done for d in self.disks)

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
        return self._applied(event, now)._measured(now)

    def _applied(self, event: events.Event, now: datetime) -> Job:
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
                reason = event.sync_reason
                if reason and disk.previous_note and event.sync_type == "full":
                    # sna's chain knows why there was no base; the client only that there was none.
                    reason = f"{reason}: {disk.previous_note}"
                job = self._with_disk(
                    index,
                    now,
                    sync_type=event.sync_type or disk.sync_type,
                    sync_reason=reason or disk.sync_reason,
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
                    # A disk's count never goes back (the legacy client's pushes may
                    # have counted ahead of its lines).
                    bytes_done=max(event.bytes_done, disk.bytes_done),
                    bytes_total=event.bytes_total
                    if event.bytes_total is not None
                    else disk.bytes_total,
                )
                # Bytes moving again end a stall, even one whose resume was lost.
                stalled = None if event.bytes_done > disk.bytes_done else self.stalled
                return job._touch(now, stalled=stalled)
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
        """Apply a push from the Go client (``push`` is merged with the ones before).

        Its pushes name no disk, and its byte counts start again with each disk.
        Once its lines have named the disk it copies, a push's new byte count is
        that disk's; before, the pushes alone count the disks it finished (a push
        whose ``status`` turns ``completed``) and the bytes of each (its last count
        in progress: the completed push's is its total).  A count
        the merge kept from an earlier push (the Go SNA kept the last non-zero
        one) says nothing new and is not used.  Its own ``percent`` and
        ``throughput_bps`` are kept with the push, not used.
        """
        last = self.pushed
        fresh = last is None or push.bytes_transferred != last.bytes_transferred
        finished = push.status == "completed" and (last is None or last.status != "completed")
        job = self._touch(
            now,
            pushed=push,
            current_operation=stage_operation(push.stage) or self.current_operation,
        )
        if self.reports_per_disk:
            running = [i for i, d in enumerate(job.disks) if d.status == "running"]
            if fresh and push.status != "completed" and len(running) == 1:
                disk = job.disks[running[0]]
                if disk.bytes_total is not None:
                    counted = min(max(disk.bytes_done, push.bytes_transferred), disk.bytes_total)
                    job = job._with_disk(running[0], now, bytes_done=counted)
            return job._measured(now)
        runs, base, current = self.pushed_runs, self.pushed_base, self.pushed_run_bytes
        if finished:
            # Its last push of a disk says bytes = its total (a job-wide estimate): the
            # disk's bytes are what its last push in progress counted.
            runs, base, current = runs + 1, base + current, 0
        elif fresh and push.status != "completed":
            current = push.bytes_transferred
        job = attrs.evolve(
            job,
            pushed_runs=runs,
            pushed_base=base,
            pushed_run_bytes=current,
            aggregate_done=base + current,
            aggregate_total=push.total_bytes or self.aggregate_total,
        )
        return job._measured(now)

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

        record = attrs.asdict(
            self,
            filter=lambda field, _value: field.name != "rate_samples",
            value_serializer=convert,
        )
        return record

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
