"""Delivering what the SHA must get about ended jobs, from the store, in order.

The store keeps each ended job's messages (per-disk ``/complete``, then the
final telemetry) from the moment the job ends.  Here they are sent, one job's
after the other's in the order they were queued, each until the SHA answers
for good:

- 2xx: ``delivered``;
- a 4xx other than 408/429 (``/complete`` answers 404 for a job or disk it
  does not know, 400 for a body it cannot take): ``refused``, logged, never
  sent again; the job's next messages still go;
- telemetry answered 500 :data:`UNKNOWN_JOB_LIMIT` times in a row (the SHA
  does not know the job): ``given_up``;
- anything else (no answer, 5xx, 408, 429): sent again after 1, 2, 5, 10,
  30 s, then every 60 s, for as long as the daemon runs, and from the start
  again after a restart.

A SHA that is down, slow or restarting therefore gets every message once it
is back, in order; one that refuses a message says why in the job's status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.jobs.store import (
    DELIVERED,
    GIVEN_UP,
    NOT_SENT,
    PENDING,
    REFUSED,
    IJobStore,
    OutboxRow,
    StoreError,
)
from sna.sha import messages
from sna.sha.client import ShaClient, ShaUnreachable

#: Seconds before each new try of a message; the last one repeats.
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
UNKNOWN_JOB_LIMIT = 3
#: A failure is logged at warning level on its first try and every this many after.
WARN_EVERY = 10
#: Seconds between tries to record what the database refused.
RECORD_RETRY = 5.0


def describe(row: OutboxRow) -> str:
    """A message as the log and the job's status name it."""
    if row.kind == "complete":
        if row.disk_index is None:
            return "the completions"
        return f"the completion of disk {row.disk_index}"
    if row.kind == "replication_changeid":
        return f"the change ID of disk {row.disk_index}"
    if row.kind == "replication_end":
        return "the replication job's end"
    return "the final state"


class Outbox:
    """Sends the store's pending messages to the SHA."""

    log = Logger()

    def __init__(
        self,
        client: ShaClient,
        store: IJobStore,
        clock: IReactorTime,
        on_answer: Callable[[str, str], None] = lambda kind, outcome: None,
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        self._on_answer = on_answer
        #: One delivery at a time per job, so its messages stay in order.
        self._draining: dict[str, Deferred[None]] = {}
        #: What a job's next message waits for (its NBD connections closing).
        self._gates: dict[str, Deferred[Any]] = {}
        self._sleeps: set[Deferred[None]] = set()
        #: Jobs whose delivery waits to try again.
        self._backing_off: set[str] = set()
        self._waiters: list[Deferred[None]] = []
        self._stopped = False
        #: How far messages got that the database would not record yet, by seq.
        self._unrecorded: dict[int, tuple[str, int, Optional[str]]] = {}
        self._recording: Optional[IDelayedCall] = None
        self._store_failing: Optional[str] = None

    def start(self) -> None:
        """Send what an earlier run left pending."""
        try:
            rows = self._store.outbox()
        except StoreError as e:
            self.log.error(
                "cannot read what the SHA is owed ({reason}); it is sent at the next start",
                reason=e.message,
            )
            return
        for job_id in dict.fromkeys(r.job_id for r in rows if r.state == PENDING):
            self.deliver(job_id)

    def deliver(self, job_id: str, after: Optional[Deferred[Any]] = None) -> None:
        """Send ``job_id``'s pending messages, once ``after`` (if given) has fired.

        A delivery of the job already under way takes them in turn, after it.
        """
        if self._stopped:
            return
        if after is not None:
            self._gates[job_id] = after
        if job_id in self._draining:
            return
        d = ensureDeferred(self._drain(job_id))
        self._draining[job_id] = d

        def done(result: object) -> None:
            if self._draining.get(job_id) is d:
                del self._draining[job_id]
                self._idle()
            # A Deferred's error is a Failure; a stop cancels the pauses between sends.
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure(
                    "job {job_id}: delivering to the SHA stopped", result, job_id=job_id
                )

        d.addBoth(done)

    def stop(self) -> None:
        """No more sends; what is pending stays in the store for the next start."""
        self._stopped = True
        for sleep in list(self._sleeps):
            sleep.cancel()
        if self._recording is not None and self._recording.active():
            self._recording.cancel()
        self._write_records()
        for seq, (state, _, _) in self._unrecorded.items():
            self.log.error(
                "message {seq} to the SHA is {state} but could not be recorded: "
                "the next start may send it again",
                seq=seq,
                state=state,
            )

    def wait(self) -> Deferred[None]:
        """Fires once no message is being sent or about to be: every delivery has ended
        or waits to try again.  Cancelling it cancels no delivery."""
        done: Deferred[None] = Deferred()
        self._waiters.append(done)
        self._idle()
        return done

    def _idle(self) -> None:
        if set(self._draining) - self._backing_off:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    async def _drain(self, job_id: str) -> None:
        while not self._stopped:
            gate = self._gates.pop(job_id, None)
            if gate is not None:
                await gate
            try:
                pending = self._pending(job_id)
            except StoreError as e:
                self._failing(e)
                await self._sleep(RECORD_RETRY)
                continue
            if not pending:
                return
            await self._send(pending[0])

    def _pending(self, job_id: str) -> list[OutboxRow]:
        """The job's messages still to send, as far as this run knows (the database's
        states, and those it would not record yet)."""
        rows = self._store.outbox(job_id)
        return [r for r in rows if self._unrecorded.get(r.seq, (r.state,))[0] == PENDING]

    def _record(self, row: OutboxRow, state: str, attempts: int, reason: Optional[str]) -> None:
        """Record how far a message got; what the database refuses is kept here and
        written again every :data:`RECORD_RETRY` seconds (a delivered message is
        then never sent again in this run)."""
        self._unrecorded[row.seq] = (state, attempts, reason)
        self._write_records()

    def _write_records(self) -> None:
        self._recording = None
        for seq, (state, attempts, reason) in list(self._unrecorded.items()):
            try:
                self._store.outbox_update(seq, state, attempts, reason)
            except StoreError as e:
                self._failing(e)
                if self._recording is None and not self._stopped:
                    self._recording = self._clock.callLater(RECORD_RETRY, self._write_records)
                return
            del self._unrecorded[seq]
        if self._store_failing is not None:
            self.log.info("what the SHA took is recorded again")
            self._store_failing = None

    def _failing(self, error: StoreError) -> None:
        if self._store_failing is None:
            self.log.error(
                "cannot record what the SHA took ({reason}); kept in memory until the "
                "database takes it",
                reason=error.message,
            )
        self._store_failing = error.message

    async def _send(self, row: OutboxRow) -> None:
        attempts = row.attempts
        unknown = 0
        what = describe(row)
        while not self._stopped:
            attempts += 1
            try:
                answer = await self._client.request(messages.method(row.kind), row.path, row.body)
            except ShaUnreachable as e:
                outcome, reason = "unreachable", str(e)
            else:
                outcome, reason = messages.outcome(row.kind, answer.code), answer.text()
            if self._stopped:
                # Whatever the answer, it is recorded as the next run will see it.
                self._record(row, PENDING, attempts, reason)
                return
            self._on_answer(row.kind, outcome)
            if outcome == "delivered":
                self._record(row, DELIVERED, attempts, None)
                self.log.info("job {job_id}: the SHA took {what}", job_id=row.job_id, what=what)
                return
            if outcome == "refused":
                self._record(row, REFUSED, attempts, reason)
                self.log.error(
                    "job {job_id}: the SHA refused {what} ({reason}); it is not sent again",
                    job_id=row.job_id,
                    what=what,
                    reason=reason,
                )
                return
            if outcome == "unknown_job":
                unknown += 1
                if unknown >= UNKNOWN_JOB_LIMIT:
                    self._record(row, GIVEN_UP, attempts, reason)
                    self.log.error(
                        "job {job_id}: the SHA answered {reason} to {what} {count} times: "
                        "it does not know this job; not sent again",
                        job_id=row.job_id,
                        what=what,
                        reason=reason,
                        count=unknown,
                    )
                    return
            else:
                unknown = 0
            self._record(row, PENDING, attempts, reason)
            delay = BACKOFF[min(attempts, len(BACKOFF)) - 1]
            if attempts == 1 or attempts % WARN_EVERY == 0:
                self.log.warn(
                    "job {job_id}: {what} did not reach the SHA (attempt {attempts}: {reason}); "
                    "trying again in {delay:g} s, and until it does",
                    job_id=row.job_id,
                    what=what,
                    attempts=attempts,
                    reason=reason,
                    delay=delay,
                )
            self._backing_off.add(row.job_id)
            self._idle()
            try:
                await self._sleep(delay)
            finally:
                self._backing_off.discard(row.job_id)
            try:
                if not any(r.seq == row.seq for r in self._store.outbox(row.job_id)):
                    return  # forgotten meanwhile: a new job of that id replaced its record
            except StoreError:
                pass  # the database cannot say; the message is still owed

    async def _sleep(self, seconds: float) -> None:
        d = deferLater(self._clock, seconds, lambda: None)
        self._sleeps.add(d)
        try:
            await d
        except CancelledError:
            pass
        finally:
            self._sleeps.discard(d)


def summary(rows: list[OutboxRow]) -> Optional[dict[str, Any]]:
    """How a job's messages to the SHA stand, for its status; None if it has none."""
    if not rows:
        return None
    completes = [r for r in rows if r.kind in ("complete", "replication_changeid")]
    finals = [r for r in rows if r.kind in ("telemetry", "replication_end")]
    completion: Optional[dict[str, Any]] = None
    if completes:
        states = {r.state for r in completes}
        if states & {REFUSED, GIVEN_UP}:
            state = REFUSED
        elif NOT_SENT in states:
            state = NOT_SENT
        elif PENDING in states:
            state = "pending"
        else:
            state = DELIVERED
        errors = [
            f"{describe(r)}: {r.reason}" for r in completes if r.state != DELIVERED and r.reason
        ]
        completion = {
            "state": state,
            "error": "; ".join(errors) or None,
            "disks": [
                {
                    "disk_index": r.disk_index,
                    "state": r.state,
                    "attempts": r.attempts,
                    "reason": r.reason,
                }
                for r in completes
            ],
        }
    final = finals[-1] if finals else None
    return {
        "completion": completion,
        "final_state": None
        if final is None
        else {"state": final.state, "attempts": final.attempts, "reason": final.reason},
    }
