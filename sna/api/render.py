"""Job records as the JSON the SHA and operators read.

``status`` is our own shape (a superset of the Go SNA's ``/status``);
``sha_job_status`` is what the SHA's phantom-job detector reads; ``progress``
is the Go SNA's ``/progress`` shape, field for field.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Optional

from sna.jobs.model import DiskState, Job, JobStatus, SnapshotState, Stall, utcnow
from sna.nbd.relay import RelayStats

MIB = 1024 * 1024
GIB = 1024 * MIB


def timestamp(value: Optional[datetime]) -> Optional[str]:
    """RFC 3339 in UTC with milliseconds, ``Z``-suffixed."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def timestamp_seconds(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def relay(stats: RelayStats, now: float) -> dict[str, Any]:
    return {
        "job_id": stats.job_id,
        "disk_key": stats.disk_key,
        "export": stats.export,
        "nbd_port": stats.port,
        "listen_port": stats.listen_port,
        "state": stats.state,
        "bytes_to_hub": stats.bytes_to_hub,
        "bytes_from_hub": stats.bytes_from_hub,
        "connections": stats.connections,
        "active_connections": stats.active_connections,
        "throughput_bps": round(stats.bytes_per_second_current, 1),
        "average_throughput_bps": round(stats.bytes_per_second_average, 1),
        "uptime_seconds": round(max(now - stats.started_at, 0.0), 3),
        "upstream_error": stats.upstream_error,
    }


def disk(d: DiskState) -> dict[str, Any]:
    return {
        # The VMware device key once the client has mapped the target; until then
        # the target's key, which it is unless the targets are keyed the SHA's way.
        "disk_key": d.vmware_disk_key or d.disk_key,
        "target_key": d.disk_key,
        "disk_index": d.disk_index,
        "capacity_bytes": d.capacity_bytes,
        "export": d.export,
        "nbd_port": d.port,
        "status": d.status,
        "sync_type": d.sync_type,
        "sync_reason": d.sync_reason,
        "bytes_done": d.bytes_done,
        "bytes_total": d.bytes_total,
        "change_id": d.change_id,
        "previous_change_id": d.previous_change_id,
        "previous_change_id_from": d.previous_source,
        "relay_port": d.relay_port,
        "bytes_to_hub": d.bytes_to_hub,
        "bytes_from_hub": d.bytes_from_hub,
        "target_error": d.target_error,
    }


def stalled(stall: Optional[Stall]) -> Optional[dict[str, Any]]:
    """Why a running job makes no progress, since when; ``None`` while it does."""
    if stall is None:
        return None
    return {
        "on": stall.on,
        "since": timestamp(stall.since),
        "disk_key": stall.disk_key,
        "message": stall.message or None,
    }


def snapshot(state: Optional[SnapshotState]) -> Optional[dict[str, Any]]:
    """The job's ``sbak-`` snapshot and its removal; ``None`` when none was taken."""
    if state is None:
        return None
    return {
        "name": state.name,
        "state": state.state,
        "reason": state.reason,
        "removal_attempts": state.attempts,
        "next_attempt": timestamp(state.next_attempt),
        "needs_credentials": state.needs_credentials,
        "removed_by": state.removed_by,
        "removed_at": timestamp(state.removed_at),
    }


def _rounded(value: Optional[float], digits: int = 1) -> Optional[float]:
    return None if value is None else round(value, digits)


def _whole(value: Optional[float]) -> Optional[int]:
    return None if value is None else round(value)


def status(
    job: Job, sha: Optional[dict[str, Any]] = None, now: Optional[datetime] = None
) -> dict[str, Any]:
    """A job for operators and the SHA at ``now``; ``sha`` is how its reports to the
    SHA stand."""
    now = utcnow() if now is None else now
    return {
        "job_id": job.job_id,
        "status": job.status.value,
        "progress_percent": job.progress_percent,
        "current_operation": job.current_operation,
        "start_time": timestamp(job.started_at),
        "last_update": timestamp(job.last_update),
        "vm_path": job.vm_path,
        "vm_name": job.vm_name,
        "backup_type": job.backup_type,
        "phase": job.phase,
        "pid": job.pid,
        "end_time": timestamp(job.ended_at),
        "exit_code": job.exit_code,
        "exit_signal": job.exit_signal,
        "error": job.error,
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "throughput_bps": _rounded(job.rate_bps(now)),
        "eta_seconds": _whole(job.eta_seconds(now)),
        "duration_seconds": round(job.duration_seconds(now), 3),
        "average_rate_bps": _rounded(job.average_rate_bps(now)),
        "relay_bytes_to_hub": sum(d.bytes_to_hub for d in job.disks),
        "relay_bytes_from_hub": sum(d.bytes_from_hub for d in job.disks),
        "disks": [disk(d) for d in job.disks],
        "stalled": stalled(job.stalled),
        "snapshot": snapshot(job.snapshot),
        "sha": sha,
    }


def sha_job_status(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "status": job.status.value,
        "last_update": timestamp(job.last_update),
        "progress_data": {
            "percent": job.progress_percent,
            "bytes_transferred": job.bytes_done,
            "current_operation": job.current_operation,
        },
        "exit_code": job.exit_code,
        "error": job.error,
    }


def _disk_percent(d: DiskState) -> float:
    """A disk's share copied; 100 once it is done, even with nothing to copy."""
    if d.status == "completed":
        return 100.0
    if d.bytes_total:
        return round(100.0 * min(d.bytes_done, d.bytes_total) / d.bytes_total, 2)
    return 0.0


# Our phases named as the SHA's MapVMAPhaseToStatus expects them.
_PHASES = {
    "starting": "Initializing",
    "snapshot": "Snapshot Creation",
    "transfer": "Copying Data",
    "cleanup": "Cleanup",
    "finishing": "Cleanup",
    "completed": "Completed",
    "failed": "Error",
    "cancelled": "Error",
    "interrupted": "Error",
}


def progress(job: Job, now: datetime) -> dict[str, Any]:
    """The Go SNA's ``GET /progress/{id}`` body (the SHA's GUI proxy forwards it)."""
    push = job.pushed
    elapsed = max((((job.ended_at or now) - job.started_at).total_seconds()), 0.0)
    done, total = job.bytes_done, job.bytes_total or 0
    if job.status is JobStatus.RUNNING:
        state = (push.status if push is not None else "") or "in_progress"
        phase = (push.stage if push is not None else "") or _PHASES.get(job.phase, job.phase)
        percent = job.progress_percent
    else:
        # The SHA knows only completed and failed as final states.
        state = "completed" if job.status is JobStatus.COMPLETED else "failed"
        phase = _PHASES.get(job.status.value, job.status.value)
        percent = job.progress_percent
    # Measured over the same window as /status's (Job.rate_bps); 0 when unknown or ended.
    throughput = job.rate_bps(now) or 0.0
    average = done / elapsed if elapsed > 0 else 0.0
    eta = _whole(job.eta_seconds(now)) or 0
    sync_types = {d.sync_type for d in job.disks if d.sync_type}
    if push is not None and push.sync_type:
        sync_type = push.sync_type
    elif sync_types:
        sync_type = "incremental" if sync_types == {"incremental"} else "full"
    else:
        sync_type = ""
    errors = []
    if job.error:
        errors.append(
            {"message": job.error, "timestamp": timestamp(job.ended_at or job.last_update)}
        )
    started = timestamp_seconds(job.started_at)
    last = timestamp_seconds(job.last_update)
    elapsed_ms = int(elapsed * 1000)
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "status": state,
        "job_status": job.status.value,
        "sync_type": sync_type,
        "phase": phase,
        "percentage": percent,
        "current_operation": job.current_operation,
        "bytes_transferred": done,
        "total_bytes": total,
        "throughput": {
            "current_mbps": throughput / MIB,
            "average_mbps": average / MIB,
            "peak_mbps": max(throughput, average) / MIB,
            "last_update": last,
        },
        "timing": {
            "start_time": started,
            "last_update": last,
            "elapsed_ms": elapsed_ms,
            "phase_start": started,
            "phase_elapsed_ms": elapsed_ms,
            "eta_seconds": eta,
        },
        "vm_info": {
            "name": job.vm_name,
            "path": job.vm_path,
            "disk_size_gb": total // GIB,
            "disk_size_bytes": total,
            "cbt_enabled": bool(sync_type),
        },
        "phases": [
            {
                "name": phase,
                "status": state,
                "start_time": started,
                "end_time": timestamp_seconds(job.ended_at) if job.ended_at else "",
                "duration_ms": elapsed_ms,
            }
        ],
        "errors": errors,
        "last_error": errors[-1] if errors else None,
    }
    if job.disks:
        body["disk_progresses"] = [
            {
                "disk_id": d.vmware_disk_key or d.disk_key,
                "label": f"Disk {d.vmware_disk_key or d.disk_key}",
                "bytes_transferred": d.bytes_done,
                "total_bytes": d.bytes_total or 0,
                "percent": _disk_percent(d),
                "throughput_mbps": throughput / MIB if d.status == "running" else 0.0,
                "status": d.status,
            }
            for d in job.disks
        ]
    return body
