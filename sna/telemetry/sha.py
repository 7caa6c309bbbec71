"""Pushing a job's final state to the SHA, so it never stays "running" there.

The SHA takes backup telemetry at ``POST {sha}/api/v1/telemetry/backup/{job_id}``
(``reference/upstream-contracts.md`` §3.7) and applies any status other than
``running``; an ``error`` object forces ``failed``.  One push per ended job,
retried a few times with backoff.  Until the SHA takes it (or refuses it with
a 4xx, which asking again would not change) the body waits in the store's
outbox: it is sent again every :data:`RESEND_INTERVAL` and at the next start,
so a SHA that was down, or a shutdown that cut a push short, loses nothing.
A SHA that stays down is logged, never fatal.  Nothing here changes a job.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from sna.api.render import timestamp_seconds
from sna.jobs.model import Job, JobStatus
from sna.jobs.store import IJobStore

#: Seconds to wait before each retry after the first attempt.
RETRY_DELAYS = (1.0, 5.0, 30.0)
REQUEST_TIMEOUT = 10.0
#: Seconds between sends of what the SHA has not taken yet (after the retries).
RESEND_INTERVAL = 300.0


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

    def __init__(
        self, client: Any, base_url: str, clock: IReactorTime, store: Optional[IJobStore] = None
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._clock = clock
        self._store = store
        self._pending: set[Deferred[None]] = set()
        #: Jobs whose push is under way.
        self._sending: set[str] = set()
        self._resend = LoopingCall(self._send_outbox)
        self._resend.clock = clock
        self._stopped = False

    def start(self) -> None:
        """Send what an earlier run left in the outbox, and keep re-sending it."""
        if self._store is not None and not self._resend.running:
            self._resend.start(RESEND_INTERVAL, now=True)

    def stop(self) -> None:
        """No more sends; what is not taken stays in the outbox for the next start."""
        self._stopped = True
        if self._resend.running:
            self._resend.stop()

    def job_ended(self, job: Job) -> None:
        body = json.dumps(telemetry(job))
        if self._store is not None:
            self._store.outbox_put(job.job_id, body)
        self._send(job.job_id, body, job.status.value)

    def wait(self) -> Deferred[Any]:
        """Fires once every push under way has finished (for shutdown)."""
        return DeferredList(list(self._pending), consumeErrors=True)

    def _send_outbox(self) -> None:
        assert self._store is not None
        for job_id, body in self._store.outbox_all():
            if job_id not in self._sending:
                self._send(job_id, body, "left from before")

    def _send(self, job_id: str, body: str, status: str) -> None:
        if self._stopped or job_id in self._sending:
            return
        self._sending.add(job_id)
        d = ensureDeferred(self._push(job_id, body.encode(), status))
        self._pending.add(d)

        def done(_: object) -> None:
            self._pending.discard(d)
            self._sending.discard(job_id)

        d.addBoth(done)

    def _taken(self, job_id: str) -> None:
        if self._store is not None and not self._stopped:
            self._store.outbox_remove(job_id)

    async def _push(self, job_id: str, body: bytes, status: str) -> None:
        url = f"{self._base}/api/v1/telemetry/backup/{job_id}"
        last: Optional[str] = None
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS), 1):
            if delay:
                await deferLater(self._clock, delay, lambda: None)
                if self._stopped:
                    return
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
                        "job {job_id}: final state ({status}) pushed to the SHA",
                        job_id=job_id,
                        status=status,
                    )
                    self._taken(job_id)
                    return
                last = f"HTTP {response.code}"
                if 400 <= response.code < 500 and response.code not in (408, 429):
                    # The SHA refuses this push as such: asking again changes nothing.
                    self.log.error(
                        "job {job_id}: the SHA refused the final state ({reason}); not sent again",
                        job_id=job_id,
                        reason=last,
                    )
                    self._taken(job_id)
                    return
            self.log.warn(
                "job {job_id}: pushing the final state to the SHA failed (attempt {attempt}): "
                "{reason}",
                job_id=job_id,
                attempt=attempt,
                reason=last,
            )
        self.log.error(
            "job {job_id}: the SHA did not take the final state ({reason}); {again}",
            job_id=job_id,
            reason=last,
            again=(
                f"sent again every {RESEND_INTERVAL:g} s and at the next start"
                if self._store is not None
                else "given up"
            ),
        )
