"""Telemetry of running jobs, pushed to the SHA while they run.

The SHA learns that a job lives, and how far it got, only from telemetry
(``reference/sha-contract.md`` §2.3): its stale-job detector fails a job
whose pushes stop, and only once a first push has come.  So a job is pushed
at once when it starts (before its snapshot), then, checked every second:

- when its phase or a disk's status changes, at most every
  :data:`MIN_SPACING` seconds;
- when bytes move, every :data:`MOVING_INTERVAL` seconds;
- when nothing moves, every :data:`IDLE_INTERVAL` seconds.

Never two pushes of one job within :data:`MIN_SPACING` (the SHA answers 500
to an update that changes no column, its time column having a resolution
of one second), and one at a time.  Best effort: a push that fails is not
retried (the next one carries the news), nothing here ever slows or fails a
backup, and a job the SHA keeps answering 500 (it does not know it) stops
being pushed after :data:`UNKNOWN_JOB_LIMIT` answers in a row, logged once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sna.jobs.model import Job
from sna.sha import messages
from sna.sha.client import ShaClient

TICK = 1.0
MIN_SPACING = 1.1
MOVING_INTERVAL = 4.0
IDLE_INTERVAL = 25.0
UNKNOWN_JOB_LIMIT = 3
#: Ended jobs whose push record is kept for their status (the oldest go first).
KEEP_ENDED = 1000


@attrs.define
class JobPushes:
    """How the live telemetry of one job is going (shown in its status)."""

    sent: int = 0
    delivered: int = 0
    last_sent: Optional[float] = None
    last_sent_at: Optional[datetime] = None
    last_answer: Optional[str] = None
    #: Why pushes fail now (None once one got through again).
    failing: Optional[str] = None
    #: Why pushes stopped for good.
    stopped: Optional[str] = None
    unknown_job_answers: int = 0
    last_shape: Optional[str] = None
    last_content: Optional[str] = None
    in_flight: Optional[Deferred[None]] = None
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "pushes": self.sent,
            "delivered": self.delivered,
            "last_push": messages.timestamp(self.last_sent_at) if self.last_sent_at else None,
            "last_answer": self.last_answer,
            "failing": self.failing,
            "stopped": self.stopped,
        }


def _shape(body: dict[str, Any]) -> str:
    """What of a body calls for a prompt push: the phase and the disks' statuses."""
    disks = ",".join(f"{d['disk_index']}:{d['status']}" for d in body.get("disks", []))
    return f"{body.get('status')}|{body.get('current_phase')}|{disks}"


class LiveTelemetry:
    """Pushes every running job's telemetry at the cadence above."""

    log = Logger()

    def __init__(
        self,
        client: ShaClient,
        clock: IReactorTime,
        now: Callable[[], datetime],
        running: Callable[[], list[Job]],
        on_answer: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._now = now
        self._running = running
        self._on_answer = on_answer
        self._jobs: dict[str, JobPushes] = {}
        self._ended: dict[str, None] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(TICK, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def job_started(self, job: Job) -> None:
        """A first push now: the SHA's stale-job detector covers the job from here on."""
        # A new run of an ended job's id starts afresh.
        self._ended.pop(job.job_id, None)
        self._jobs[job.job_id] = JobPushes()
        self._consider(job)

    def finished(self, job_id: str) -> Deferred[None]:
        """No more pushes of ``job_id``; fires once its push under way (if any) is done."""
        pushes = self._jobs.get(job_id)
        if pushes is None:
            return succeed(None)
        pushes.finished = True
        self._ended[job_id] = None
        while len(self._ended) > KEEP_ENDED:
            oldest = next(iter(self._ended))
            del self._ended[oldest]
            self._jobs.pop(oldest, None)
        if pushes.in_flight is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        pushes.in_flight.addBoth(lambda _: done.callback(None))
        return done

    def state(self, job_id: str) -> Optional[JobPushes]:
        return self._jobs.get(job_id)

    def _tick(self) -> None:
        for job in self._running():
            self._consider(job)

    def _consider(self, job: Job) -> None:
        pushes = self._jobs.setdefault(job.job_id, JobPushes())
        if pushes.finished or pushes.stopped or pushes.in_flight is not None:
            return
        if not job.status.active or job.kind != "backup":
            # The SHA's telemetry route updates backup jobs only (sha-contract.md §2.3).
            return
        now = self._clock.seconds()
        body = messages.telemetry(job, self._now(), rate=job.throughput_bps or 0.0)
        shape, content = _shape(body), messages.significant(body)
        if pushes.last_sent is not None:
            since = now - pushes.last_sent
            due = (
                (since >= MIN_SPACING and shape != pushes.last_shape)
                or (since >= MOVING_INTERVAL and content != pushes.last_content)
                or since >= IDLE_INTERVAL
            )
            if not due:
                return
        pushes.sent += 1
        pushes.last_sent, pushes.last_sent_at = now, self._now()
        pushes.last_shape, pushes.last_content = shape, content
        d = self._client.request("POST", messages.telemetry_path(job.job_id), messages.encode(body))
        pushes.in_flight = d.addCallbacks(
            lambda answer: self._answered(job.job_id, pushes, answer.code, answer.text()),
            lambda failure: self._failed(job.job_id, pushes, failure.getErrorMessage()),
        )

        def done(_: object) -> None:
            pushes.in_flight = None

        pushes.in_flight.addBoth(done)

    def _answered(self, job_id: str, pushes: JobPushes, code: int, text: str) -> None:
        pushes.last_answer = text
        outcome = messages.outcome("telemetry", code)
        self._on_answer(outcome)
        if outcome == "delivered":
            pushes.delivered += 1
            pushes.unknown_job_answers = 0
            if pushes.failing is not None:
                self.log.info("job {job_id}: telemetry reaches the SHA again", job_id=job_id)
                pushes.failing = None
            return
        if outcome != "unknown_job":
            pushes.unknown_job_answers = 0
        else:
            pushes.unknown_job_answers += 1
            if pushes.unknown_job_answers >= UNKNOWN_JOB_LIMIT:
                pushes.stopped = (
                    f"the SHA answered {text} to {UNKNOWN_JOB_LIMIT} pushes in a row: "
                    "it does not know this job"
                )
                self.log.error(
                    "job {job_id}: no more live telemetry: {reason}",
                    job_id=job_id,
                    reason=pushes.stopped,
                )
                return
        self._failing(job_id, pushes, text)

    def _failed(self, job_id: str, pushes: JobPushes, reason: str) -> None:
        pushes.last_answer = reason
        pushes.unknown_job_answers = 0
        self._on_answer("unreachable")
        self._failing(job_id, pushes, reason)

    def _failing(self, job_id: str, pushes: JobPushes, reason: str) -> None:
        if pushes.failing is None:
            # Once, not on every push: the next pushes try again anyway.
            self.log.warn(
                "job {job_id}: telemetry to the SHA failed ({reason}); still trying",
                job_id=job_id,
                reason=reason,
            )
        pushes.failing = reason
