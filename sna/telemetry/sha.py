"""Pushing a job's final state to the SHA, so it never stays "running" there.

The SHA takes backup telemetry at ``POST {sha}/api/v1/telemetry/backup/{job_id}``
(``reference/upstream-contracts.md`` §3.7) and applies any status other than
``running``; an ``error`` object forces ``failed``.  One push per ended job,
retried a few times with backoff; a SHA that stays down is logged, never
fatal.  Nothing here changes a job.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sna.api.render import timestamp_seconds
from sna.jobs.model import Job, JobStatus

#: Seconds to wait before each retry after the first attempt.
RETRY_DELAYS = (1.0, 5.0, 30.0)
REQUEST_TIMEOUT = 10.0


def telemetry(job: Job) -> dict[str, Any]:
    """The SHA's ``TelemetryUpdate`` for an ended job."""
    completed = job.status is JobStatus.COMPLETED
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "job_type": "backup",
        "status": "completed" if completed else "failed",
        "current_phase": "completed" if completed else job.status.value,
        "bytes_transferred": job.bytes_done,
        "total_bytes": job.bytes_total or job.bytes_done,
        "transfer_speed_bps": 0,
        "eta_seconds": 0,
        "progress_percent": job.progress_percent,
        "disks": [
            {
                "disk_key": d.disk_key,
                "status": d.status,
                "bytes_transferred": d.bytes_done,
                "total_bytes": d.bytes_total or 0,
                "change_id": d.change_id,
                "sync_type": d.sync_type,
            }
            for d in job.disks
        ],
        "timestamp": timestamp_seconds(job.ended_at or job.last_update),
    }
    if not completed:
        body["error"] = {
            "message": job.error or f"backup {job.status.value}",
            "code": job.status.value,
            "timestamp": body["timestamp"],
        }
    return body


class ShaNotifier:
    """Posts each ended job's telemetry to the SHA with a treq-like ``client``."""

    log = Logger()

    def __init__(self, client: Any, base_url: str, clock: IReactorTime) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._pending: set[Deferred[None]] = set()

    def job_ended(self, job: Job) -> None:
        d = ensureDeferred(self._push(job))
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    def wait(self) -> Deferred[Any]:
        """Fires once every push under way has finished (for shutdown)."""
        return DeferredList(list(self._pending), consumeErrors=True)

    async def _push(self, job: Job) -> None:
        url = f"{self._base}/api/v1/telemetry/backup/{job.job_id}"
        body = json.dumps(telemetry(job)).encode()
        last: Optional[str] = None
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS), 1):
            if delay:
                await deferLater(self._clock, delay, lambda: None)
            try:
                response = await self._client.post(
                    url,
                    data=body,
                    headers={"Content-Type": ["application/json"]},
                    timeout=REQUEST_TIMEOUT,
                )
                await response.content()
            except Exception as e:  # any transport failure is worth a retry
                last = f"{type(e).__name__}: {e}"
            else:
                if 200 <= response.code < 300:
                    self.log.info(
                        "job {job_id}: final state {status} pushed to the SHA",
                        job_id=job.job_id,
                        status=job.status.value,
                    )
                    return
                last = f"HTTP {response.code}"
                if 400 <= response.code < 500 and response.code not in (408, 429):
                    # The SHA refuses this push as such: asking again changes nothing.
                    break
            self.log.warn(
                "job {job_id}: pushing the final state to the SHA failed (attempt {attempt}): "
                "{reason}",
                job_id=job.job_id,
                attempt=attempt,
                reason=last,
            )
        self.log.error(
            "job {job_id}: the SHA never took the final state ({reason})",
            job_id=job.job_id,
            reason=last,
        )
