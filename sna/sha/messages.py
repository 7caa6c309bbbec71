"""What sna sends the SHA, shaped as the SHA's Go structs decode it.

Pure functions of a :class:`~sna.jobs.model.Job`: the request paths
(job ids percent-encoded, byte for byte), the per-disk ``/complete`` bodies,
the telemetry bodies (live and final), and what an answer means.  Every
count is a JSON integer (Go refuses ``1.0`` for an ``int``), disks are named
by the SHA's ``disk_index`` and statuses are only those its columns hold
(``reference/sha-contract.md`` §2.2, §2.3, §5).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Optional

import attrs

from sna.jobs.model import DiskState, Job, JobStatus

#: Longest wait the SHA's ``eta_seconds`` (an INT column) is given.
MAX_ETA = 30 * 86400

#: ``complete`` and ``telemetry`` for backups; ``replication_changeid`` (each disk's
#: change ID) and ``replication_end`` (the request's end, a PUT) for replication jobs.
Kind = Literal["complete", "telemetry", "replication_changeid", "replication_end"]


def method(kind: str) -> str:
    """The HTTP method of a message: the replication job update is a PUT, the rest POSTs."""
    return "PUT" if kind == "replication_end" else "POST"


@attrs.frozen
class Message:
    """One request the SHA must get: what the outbox keeps until it is answered."""

    kind: Kind
    path: str
    body: str
    disk_index: Optional[int] = None
    #: Why this message is kept but never sent (it could not be made right).
    not_sent: Optional[str] = None


def quoted(job_id: str) -> str:
    """A job id as one path segment: every byte but unreserved ones percent-encoded."""
    return urllib.parse.quote(job_id, safe="")


def complete_path(job_id: str) -> str:
    return f"/api/v1/backups/{quoted(job_id)}/complete"


def telemetry_path(job_id: str) -> str:
    return f"/api/v1/telemetry/backup/{quoted(job_id)}"


def changeid_path(vm_name: str, disk_index: int) -> str:
    query = urllib.parse.urlencode(
        {"vm_name": vm_name, "disk_id": str(disk_index)}, quote_via=urllib.parse.quote
    )
    return f"/api/v1/backups/changeid?{query}"


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as sna's own answers show times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(body: Mapping[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _percent(done: int, total: int) -> float:
    return round(100.0 * min(done, total) / total, 2) if total else 0.0


def _disk_percent(disk: DiskState) -> float:
    if disk.status == "completed":
        return 100.0
    return _percent(disk.bytes_done, disk.bytes_total or 0)


def by_index(job: Job) -> list[DiskState]:
    return sorted(job.disks, key=lambda d: d.disk_index)


def total_bytes(job: Job) -> int:
    """The job's bytes to copy as far as known (a disk not planned yet counts 0)."""
    return sum(d.bytes_total or 0 for d in job.disks)


# -- /complete -----------------------------------------------------------------------------


def completions(job: Job) -> list[Message]:
    """One ``/complete`` per disk, in the SHA's disk order: only for a completed job.

    All or nothing: when a disk has no change ID, no disk is reported (one
    message says why, never sent), since the SHA completes a job only when
    every disk row is completed, and a later incremental would start from
    the change IDs of a job the hub's chain never kept.
    """
    if job.status is not JobStatus.COMPLETED:
        return []
    path = complete_path(job.job_id)
    missing = [d.disk_key for d in by_index(job) if not d.change_id]
    if missing:
        reason = f"the backup client reported no change ID for disk {', '.join(missing)}"
        return [Message("complete", path, "", not_sent=reason)]
    return [
        Message(
            "complete",
            path,
            _encode(
                {
                    "disk_id": disk.disk_index,
                    "change_id": disk.change_id,
                    "bytes_transferred": int(disk.bytes_done),
                }
            ),
            disk_index=disk.disk_index,
        )
        for disk in by_index(job)
    ]


# -- telemetry -----------------------------------------------------------------------------

#: Our phases as the SHA's ``current_phase`` shows them.
_PHASES = {"transfer": "transferring"}


def _live_disk_status(disk: DiskState) -> str:
    # "completed" is the SHA's word for a disk whose /complete it took: a disk
    # marked so by telemetry would count towards the job's completion without
    # its change ID (sha-contract.md §2.3), so a copied disk stays "running".
    return {"pending": "pending", "failed": "failed"}.get(disk.status, "running")


def _error_code(job: Job) -> str:
    if job.status is JobStatus.INTERRUPTED:
        return "INTERRUPTED"
    if job.exit_signal is not None:
        return "CLIENT_KILLED"
    if any(d.target_error for d in job.disks):
        return "NBD_TARGET_LOST"
    return "BACKUP_FAILED"


def telemetry(job: Job, now: datetime, rate: float = 0.0) -> dict[str, Any]:
    """The SHA's ``TelemetryUpdate`` for ``job`` as it is now.

    A running job reports job-cumulative bytes and every disk by its index.
    A completed one reports 100 % and no disks (their rows are the
    ``/complete`` calls'); a failed or interrupted one ``failed`` with an
    ``error``, a cancelled one ``cancelled``, their disks ``failed``.
    """
    done, total = job.bytes_done, total_bytes(job)
    status = job.status
    body: dict[str, Any] = {"job_id": job.job_id, "job_type": "backup"}
    if status is JobStatus.RUNNING:
        speed = max(int(rate), 0)
        eta = min(int((total - done) / rate), MAX_ETA) if rate > 0 and total > done else 0
        body.update(
            status="running",
            current_phase=_PHASES.get(job.phase, job.phase)[:50],
            bytes_transferred=done,
            total_bytes=total,
            transfer_speed_bps=speed,
            eta_seconds=eta,
            progress_percent=job.progress_percent,
            disks=[_disk(d, _live_disk_status(d)) for d in by_index(job)],
        )
    elif status is JobStatus.COMPLETED:
        body.update(
            status="completed",
            current_phase="completed",
            bytes_transferred=done,
            total_bytes=max(total, done),
            transfer_speed_bps=0,
            eta_seconds=0,
            progress_percent=100.0,
            disks=[],
        )
    else:
        body.update(
            status="cancelled" if status is JobStatus.CANCELLED else "failed",
            current_phase=status.value,
            bytes_transferred=done,
            total_bytes=total,
            transfer_speed_bps=0,
            eta_seconds=0,
            progress_percent=_percent(done, total),
            disks=[_disk(d, "failed") for d in by_index(job)],
        )
        if status is not JobStatus.CANCELLED:
            # An error object makes the SHA mark the job failed whatever the status says.
            body["error"] = {
                "message": job.error or f"backup {status.value}",
                "code": _error_code(job),
                "timestamp": _timestamp(job.ended_at or now),
            }
    body["timestamp"] = _timestamp(now)
    return body


def _disk(disk: DiskState, status: str) -> dict[str, Any]:
    return {
        "disk_index": disk.disk_index,
        "bytes_transferred": int(disk.bytes_done),
        "total_bytes": int(disk.bytes_total or 0),
        "status": status,
        "progress_percent": _disk_percent(disk),
    }


def significant(body: Mapping[str, Any]) -> str:
    """What of a telemetry body the SHA stores: two pushes equal here change no row."""
    return _encode({k: v for k, v in body.items() if k != "timestamp"})


def final_messages(job: Job, now: datetime) -> list[Message]:
    """What must reach the SHA once ``job`` has ended, in order: completions, then its state.

    A completed job whose disks cannot be completed at the SHA (one has no
    change ID) is reported failed there: its backup cannot start a chain,
    and a completed job without completed disks could be neither restored
    nor continued.
    """
    found = completions(job)
    body = telemetry(job, now)
    unusable = [m.not_sent for m in found if m.not_sent is not None]
    if unusable:
        body = telemetry(attrs.evolve(job, status=JobStatus.FAILED, error=unusable[0]), now)
        body["error"]["code"] = "NO_CHANGE_ID"
    return [*found, Message("telemetry", telemetry_path(job.job_id), _encode(body))]


def encode(body: Mapping[str, Any]) -> str:
    return _encode(body)


# -- replication jobs ----------------------------------------------------------------------
#
# Where the Go client and SNA reported them (upstream-contracts.md §3.5, §1.3 #10):
# each disk's change ID to POST /api/v1/replications/{job_id}/changeid as
# {"change_id", "disk_id": "disk-<VMware key>"}, and the end of the request's work to
# PUT /api/v1/replications/{job_id}, a ReplicationJob with its status; both under the
# request's job_id (the SHA's replication job).


def changeid_report_path(replication_id: str) -> str:
    return f"/api/v1/replications/{quoted(replication_id)}/changeid"


def replication_path(replication_id: str) -> str:
    return f"/api/v1/replications/{quoted(replication_id)}"


def _replication_status(status: JobStatus) -> str:
    return {JobStatus.COMPLETED: "completed", JobStatus.CANCELLED: "cancelled"}.get(
        status, "failed"
    )


def replication_messages(job: Job, group: list[Job], now: datetime) -> list[Message]:
    """What the SHA must get now that ``job``, a replication job of ``group``, has ended.

    Completed: each disk's change ID.  Then, once no job of the request runs any
    more, the request's end: completed when every job completed, else failed
    (cancelled when one was cancelled and none failed), with every job's error.
    """
    replication_id = job.replication_id or job.job_id
    found = []
    if job.status is JobStatus.COMPLETED:
        for disk in by_index(job):
            if not disk.change_id:
                continue
            body: dict[str, Any] = {
                "change_id": disk.change_id,
                "disk_id": f"disk-{disk.vmware_disk_key or disk.disk_key}",
            }
            if disk.previous_change_id:
                body["previous_change_id"] = disk.previous_change_id
            found.append(
                Message(
                    "replication_changeid",
                    changeid_report_path(replication_id),
                    _encode(body),
                    disk_index=disk.disk_index,
                )
            )
    if any(j.status.active for j in group):
        return found
    members = group or [job]
    statuses = {j.status for j in members}
    if statuses == {JobStatus.COMPLETED}:
        status = JobStatus.COMPLETED
    elif statuses <= {JobStatus.COMPLETED, JobStatus.CANCELLED}:
        status = JobStatus.CANCELLED
    else:
        status = JobStatus.FAILED
    done = sum(j.bytes_done for j in members)
    total = sum(total_bytes(j) for j in members)
    errors = [f"{j.job_id}: {j.error}" for j in members if j.error]
    incremental = any(d.sync_type == "incremental" for j in members for d in j.disks)
    update = {
        "id": replication_id,
        "status": _replication_status(status),
        "progress": 100.0 if status is JobStatus.COMPLETED else _percent(done, max(total, 1)),
        "current_operation": status.value.capitalize(),
        "replication_type": "incremental" if incremental else "initial",
        "bytes_transferred": done,
        "total_bytes": max(total, done),
        "transfer_speed_bps": 0,
        "error_message": "; ".join(errors),
        "created_at": _timestamp(min(j.started_at for j in members)),
        "updated_at": _timestamp(now),
    }
    found.append(Message("replication_end", replication_path(replication_id), _encode(update)))
    return found


# -- answers -------------------------------------------------------------------------------

#: What an answer means; a request with no answer at all is ``unreachable``.
Outcome = Literal["delivered", "refused", "retry", "unknown_job"]


def outcome(kind: str, code: int) -> Outcome:
    """What an HTTP answer to a ``kind`` message means for it.

    2xx: taken.  A 4xx other than 408 and 429 will be the same next time:
    refused (``/complete`` answers 404 for a job or disk index the SHA does
    not know).  The telemetry route answers 500 for an unknown job (and for
    an update that changes nothing, which sna never sends twice in a
    second): a bounded number of those ends it.  Anything else may pass
    later: retry.
    """
    if 200 <= code < 300:
        return "delivered"
    if 400 <= code < 500 and code not in (408, 429):
        return "refused"
    if kind == "telemetry" and code == 500:
        return "unknown_job"
    return "retry"


class BadAnswer(ValueError):
    """The SHA's answer is not what its route returns."""


def previous_change_id(body: bytes) -> Optional[str]:
    """The ``change_id`` of a ``changeid`` answer; None when the SHA has none (``""``)."""
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadAnswer(f"the answer is not JSON: {e}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("change_id"), str):
        raise BadAnswer("the answer has no change_id string")
    change_id: str = answer["change_id"]
    return change_id if change_id.strip() else None
