"""Replication jobs (``POST /api/v1/replicate``): planning them and their change-ID chain.

A replication keeps one copy of each VM disk up to date in the same NBD
target, run after run.  Each VM of a request becomes one job of the job
manager's, run by the same backup client as a backup, and told apart by its
``kind`` (``replication``) and ``replication_id`` (the request's ``job_id``).

What the next run of a disk starts from is sna's own: the change-ID chain
(:class:`~sna.jobs.store.ChainRow`), one row per vCenter, VM, VMware disk key
and target, written when a job completes.  A run plans each disk from it: the
row of the same target gives the previous change ID and the disk's capacity
then, so the client copies only what changed, or copies in full when CBT was
reset (another tracking instance) or the disk was resized, and says why.  A
disk with rows only for other targets is copied in full, the job saying which
target the chain was kept for.

This module is pure: no I/O, no Twisted.  The manager stores the chain; the
API parses requests (:mod:`sna.api.replicate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Optional

import attrs

from sna.config import normalise_host
from sna.contract import vcenter
from sna.contract.targets import NbdTarget
from sna.jobs.model import BackupRequest, Job, JobStatus
from sna.jobs.store import ChainRow

KIND = "replication"


@attrs.frozen
class ReplicatedVM:
    """One VM of a replicate request: its job id and targets keyed by VMware disk key."""

    job_id: str
    vm_path: str
    targets: tuple[NbdTarget, ...]

    @property
    def vm_name(self) -> str:
        """The last component of the inventory path."""
        return self.vm_path.rstrip("/").rsplit("/", 1)[-1]


@attrs.frozen
class ReplicationRequest:
    """A validated ``POST /api/v1/replicate``; the password never leaves it."""

    job_id: str
    #: As the request gave it (``host`` or ``host:port``): the client's vCenter.
    vcenter: str
    #: ``host:port``, lower case: the chain's key.
    vcenter_key: str
    username: str
    password: str = attrs.field(repr=False)
    vms: tuple[ReplicatedVM, ...]
    thumbprint: Optional[str] = None


def vm_job_ids(job_id: str, count: int) -> list[str]:
    """The jobs' ids: ``job_id`` for one VM, ``{job_id}-{n}`` (n from 1) for several."""
    if count == 1:
        return [job_id]
    return [f"{job_id}-{n}" for n in range(1, count + 1)]


def target_identity(target: NbdTarget) -> str:
    """What a disk's chain is kept for: ``host/export``.

    Not the port: the hub gives each job a port of its range, while the
    export names the volume it keeps.  A target without an export name is
    known by ``host:port``.
    """
    host = normalise_host(target.host)
    return f"{host}/{target.export}" if target.export else f"{host}:{target.port}"


def _identity_of(host: str, port: int, export: str) -> str:
    return target_identity(NbdTarget("", host, port, export))


def plan(request: ReplicationRequest, chains: Sequence[Sequence[ChainRow]]) -> list[BackupRequest]:
    """One backup-client request per VM, from ``chains`` (each VM's rows, newest first).

    A disk with a row for its target starts from that row's change ID (the
    client decides whether it can: same tracking instance, same capacity);
    one without copies in full, with a note when rows for other targets exist.
    """
    requests = []
    for vm, rows in zip(request.vms, chains, strict=True):
        previous: dict[str, str] = {}
        capacities: dict[str, int] = {}
        notes: dict[str, str] = {}
        for target in vm.targets:
            identity = target_identity(target)
            mine = [r for r in rows if r.disk_key == target.disk_key]
            same = next((r for r in mine if r.target == identity), None)
            if same is not None:
                previous[target.disk_key] = same.change_id
                if same.capacity_bytes:
                    capacities[target.disk_key] = same.capacity_bytes
            elif mine:
                notes[target.disk_key] = (
                    f"the last replication of disk {target.disk_key} (job {mine[0].job_id}) "
                    f"went to target {mine[0].target}, not {identity}"
                )
        requests.append(
            BackupRequest(
                job_id=vm.job_id,
                vm_name=vm.vm_name,
                vcenter_host=request.vcenter,
                vcenter_user=request.username,
                vcenter_password=request.password,
                vm_path=vm.vm_path,
                targets=vm.targets,
                # Per disk: incremental from its chain, else full (the client says why).
                backup_type="incremental",
                previous_change_ids=tuple(sorted(previous.items())),
                previous_sources=tuple(sorted((key, "chain") for key in previous)),
                previous_capacities=tuple(sorted(capacities.items())),
                previous_notes=tuple(sorted(notes.items())),
                vcenter_thumbprint=request.thumbprint,
                kind=KIND,
                replication_id=request.job_id,
            )
        )
    return requests


def chain_rows(job: Job, vcenter_key: str, now: str) -> list[ChainRow]:
    """The chain's new rows once ``job`` has completed: one per disk with a change ID."""
    if job.kind != KIND or job.status is not JobStatus.COMPLETED:
        return []
    return [
        ChainRow(
            vcenter=vcenter_key,
            vm_path=job.vm_path,
            disk_key=disk.vmware_disk_key or disk.disk_key,
            target=_identity_of(disk.nbd_host or "", disk.port, disk.export),
            change_id=disk.change_id,
            capacity_bytes=disk.capacity_bytes,
            job_id=job.job_id,
            updated_at=now,
        )
        for disk in job.disks
        if disk.change_id
    ]


# -- a request's jobs as one (/status, /progress and /jobs/{id}/status of its job_id) --------

#: Which status the request's jobs show as one, the first that any of them has.
_GROUP_ORDER = (
    JobStatus.RUNNING,
    JobStatus.FAILED,
    JobStatus.INTERRUPTED,
    JobStatus.CANCELLED,
    JobStatus.COMPLETED,
)


def group_view(replication_id: str, jobs: Iterable[Job]) -> Optional[Job]:
    """The jobs of one replicate request as one record under its ``job_id``.

    Running while any runs; else failed, interrupted or cancelled if any is
    (in that order), else completed.  Its disks are all its VMs' disks, its
    times the first start and the last end, its error every job's.
    """
    members = sorted(jobs, key=lambda j: j.job_id)
    if not members:
        return None
    status = next(s for s in _GROUP_ORDER if any(j.status is s for j in members))
    first = min(members, key=lambda j: j.started_at)
    ended: list[datetime] = [j.ended_at for j in members if j.ended_at is not None]
    running = [j for j in members if j.status.active]
    errors = [f"{j.job_id}: {j.error}" for j in members if j.error]
    phases = {j.phase for j in members}
    return attrs.evolve(
        first,
        job_id=replication_id,
        vm_name=", ".join(j.vm_name for j in members),
        vm_path=", ".join(j.vm_path for j in members),
        disks=tuple(d for j in members for d in j.disks),
        status=status,
        phase=phases.pop() if len(phases) == 1 else (status.value if not running else "transfer"),
        current_operation="; ".join(f"{j.job_id}: {j.current_operation}" for j in members),
        started_at=first.started_at,
        last_update=max(j.last_update for j in members),
        ended_at=max(ended) if not running and ended else None,
        pid=None,
        spare_id=None,
        exit_code=None
        if running
        else next((j.exit_code for j in members if j.exit_code), members[0].exit_code),
        exit_signal=None,
        error="; ".join(errors) or None,
        cancel_requested=any(j.cancel_requested for j in members),
        throughput_bps=sum(j.throughput_bps or 0.0 for j in running) or None,
        pushed=None,
        stalled=next((j.stalled for j in running if j.stalled is not None), None),
        snapshot=None,
        weighting=None,
        percent_floor=min(j.percent_floor for j in members),
        rate_samples=(),
    )


def vcenter_key(text: str) -> str:
    """A vCenter as the chain knows it: ``host:port``, lower case."""
    try:
        host, port = vcenter.parse_address(text, "vcenter")
    except vcenter.InvalidAddress:
        return text.strip().lower()
    return f"{host.lower()}:{port}"
