"""Removing the snapshots that ended jobs left on their VMs, until vCenter confirms.

Our client removes its ``sbak-{job_id}`` snapshot at the end, on failure and
on SIGTERM, and retries for a while when vCenter does not answer.  What it
could not remove (vCenter away for longer, a client killed outright, sna
stopped mid-job) the job's record says is ``pending``
(:meth:`sna.jobs.model.Job.ended`), and the :class:`SnapshotJanitor` takes
it over: it asks vCenter to remove the job's snapshots, again and again with
a growing pause, until vCenter answers that none is left; each attempt is
written into the job's record through ``record``, so ``/status`` shows the
removal pending (with the last reason and the next attempt) until then.

Credentials.  The janitor removes with the credentials of the job's request,
which it keeps in memory while the removal is pending and never stores.
After a restart it holds none: a snapshot still pending then is shown with
``needs_credentials`` and waits until sna holds credentials for the same
vCenter and user again (a new job's, :meth:`SnapshotJanitor.job_started`, or
those given to ``POST /api/v1/cleanup``, :meth:`SnapshotJanitor.offer`), and
is retried with those.  A snapshot whose credentials vCenter refuses waits
the same way.  Only the job's own snapshot names are ever removed.

Before a new job.  A snapshot still pending on a VM breaks the next backup
of that VM (its client would read the delta disk the old snapshot left), so
a new job of the same VM (same vCenter and VM path, another job id) first
has the janitor remove it (:meth:`SnapshotJanitor.clear_for`): with the new
request's credentials, at once rather than at the next scheduled attempt
(an attempt already under way is waited for instead), and for at most
:data:`CLEAR_WITHIN` seconds.  What is still there then is the manager's
reason to refuse the job.

This module writes no record itself (the manager does, through ``record``)
and never touches a job's client.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.jobs.model import SNAPSHOT_REMOVED, BackupRequest, Job, SnapshotState
from sna.vmware.interface import (
    AuthenticationFailed,
    CertificateRejected,
    Credentials,
    IVSphere,
    NotFound,
    PermissionDenied,
    VSphereError,
    parse_address,
)

#: The first pause before the janitor tries again, then doubled up to the second.
RETRY_DELAYS = (5.0, 600.0)

#: How long a new job waits for the removal of a pending snapshot of its VM: as long
#: as one vCenter call may take (sna.vmware.sessions.CALL_TIMEOUT).
CLEAR_WITHIN = 60.0

#: Failures that another attempt with the same credentials cannot mend.
_CREDENTIALS_REFUSED = (AuthenticationFailed, PermissionDenied, CertificateRejected)

#: Writes a job's snapshot state into its record: job id, the job's ``started_at``
#: (so a newer job of the same id is left alone), the new state.
Record = Callable[[str, datetime, SnapshotState], None]


@attrs.frozen
class _Who:
    """A vCenter and a user: credentials for one serve every snapshot of the other."""

    host: str
    port: int
    user: str

    @classmethod
    def of(cls, credentials: Credentials) -> _Who:
        return cls(credentials.host.lower(), credentials.port, credentials.user)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@attrs.define(eq=False)
class _Pending:
    """One job's snapshot the janitor is removing."""

    job_id: str
    started_at: datetime
    vm_path: str
    #: None when the job's ``vcenter_host`` names no vCenter (nothing can be done).
    who: Optional[_Who]
    state: SnapshotState
    credentials: Optional[Credentials] = attrs.field(default=None, repr=False)
    delay: float = RETRY_DELAYS[0]
    call: Optional[IDelayedCall] = None
    attempt: Optional[Deferred[None]] = None


@attrs.frozen
class Leftover:
    """A pending snapshot still on the VM a new job is to back up, and why."""

    job_id: str
    vm_path: str
    name: str
    reason: str


def _who(vcenter_host: str, user: str) -> Optional[_Who]:
    try:
        host, port = parse_address(vcenter_host, "vcenter_host")
    except VSphereError:
        return None
    return _Who(host.lower(), port, user)


def credentials_of(request: BackupRequest) -> Optional[Credentials]:
    """The vCenter credentials of a request, or None if its host names no vCenter."""
    try:
        host, port = parse_address(request.vcenter_host, "vcenter_host")
    except VSphereError:
        return None
    return Credentials(
        host=host,
        port=port,
        user=request.vcenter_user,
        password=request.vcenter_password,
        thumbprint=request.vcenter_thumbprint,
    )


class SnapshotJanitor(Service):
    """Retries the removal of every pending job snapshot; a service for its timers.

    ``record`` is the job manager's (the only writer of job records);
    ``delays`` the first and the longest pause between two attempts;
    ``clear_within`` how long :meth:`clear_for` waits for vCenter.
    ``vm_busy(vm_path)`` names the job that
    is backing up that VM now, if one is: as ``POST /cleanup`` does, the
    janitor leaves such a VM alone until that job has ended.
    """

    log = Logger()

    def __init__(
        self,
        vsphere: IVSphere,
        clock: IReactorTime,
        now: Callable[[], datetime],
        record: Record,
        delays: tuple[float, float] = RETRY_DELAYS,
        vm_busy: Callable[[str], Optional[str]] = lambda vm_path: None,
        clear_within: float = CLEAR_WITHIN,
    ) -> None:
        self._vsphere = vsphere
        self._clock = clock
        self._now = now
        self._record = record
        self._vm_busy = vm_busy
        self._first_delay, self._longest_delay = delays
        self._clear_within = clear_within
        self._pending: dict[str, _Pending] = {}
        self._stopped = False

    # -- what the manager tells it ------------------------------------------------------

    def job_ended(self, job: Job, request: BackupRequest) -> Deferred[None]:
        """A job's client is gone; if its record says its snapshot is pending, remove it.

        Fires after the first attempt (retries go on by themselves); never fails.
        """
        if job.snapshot is None or not job.snapshot.pending:
            return succeed(None)
        credentials = credentials_of(request)
        entry = self._take(job, credentials)
        if entry is None:
            return succeed(None)
        return self._attempt(entry)

    def stored(self, job: Job) -> None:
        """A job loaded at startup whose snapshot is pending: no credentials are held for it."""
        if job.snapshot is None or not job.snapshot.pending:
            return
        entry = self._take(job, None)
        if entry is None:
            return
        self.log.warn(
            "job {job_id}: its snapshot {name} may still be on VM {vm_path}; sna holds no "
            "password for {who} since it was restarted, and removes it once a job or "
            "POST /api/v1/cleanup brings credentials for them",
            job_id=job.job_id,
            name=entry.state.name,
            vm_path=job.vm_path,
            who=str(entry.who),
        )

    def job_started(self, request: BackupRequest) -> None:
        """A job starts: a pending snapshot of the same job id is its client's to remove
        (it removes a leftover of its own name first); its credentials serve the others."""
        entry = self._pending.pop(request.job_id, None)
        if entry is not None:
            self._cancel(entry)
            self.log.info(
                "job {job_id} starts again: its client removes snapshot {name} if still there",
                job_id=request.job_id,
                name=entry.state.name,
            )
        credentials = credentials_of(request)
        if credentials is not None:
            self.offer(credentials)

    def offer(self, credentials: Credentials) -> None:
        """Credentials sna holds now (a job's, a cleanup request's): every snapshot of
        that vCenter and user waiting for credentials is tried again with them."""
        who = _Who.of(credentials)
        for entry in list(self._pending.values()):
            if entry.who == who and entry.credentials is None:
                entry.credentials = credentials
                entry.delay = self._first_delay
                self.log.info(
                    "job {job_id}: credentials for {who} are here; removing snapshot {name}",
                    job_id=entry.job_id,
                    who=str(who),
                    name=entry.state.name,
                )
                self._attempt(entry)

    def clear_for(self, request: BackupRequest) -> Deferred[list[Leftover]]:
        """Remove the pending snapshots of ``request``'s VM before its job starts.

        Each is tried now with ``request``'s credentials (one under way is
        waited for first), within ``clear_within`` seconds in all.  Fires
        with the ones still on the VM then (none: the job may start); never
        fails.  An attempt vCenter has not answered by then goes on, and its
        retries after it, as for any pending snapshot.  A pending snapshot
        of the same job id is left to its client (:meth:`job_started`).
        """
        credentials = credentials_of(request)
        if credentials is None:
            return succeed([])
        vcenter = (credentials.host.lower(), credentials.port)
        entries = [
            entry
            for entry in self._pending.values()
            if entry.job_id != request.job_id
            and entry.vm_path == request.vm_path
            and entry.who is not None
            and (entry.who.host, entry.who.port) == vcenter
        ]
        if not entries:
            return succeed([])
        deadline = self._clock.seconds() + self._clear_within
        for entry in entries:
            self.log.info(
                "job {job_id} is to back up VM {vm_path}: removing snapshot {name} of "
                "job {old_job_id} first",
                job_id=request.job_id,
                vm_path=entry.vm_path,
                name=entry.state.name,
                old_job_id=entry.job_id,
            )
        tries = [
            Deferred.fromCoroutine(self._clear(entry, credentials, deadline)) for entry in entries
        ]

        def left(results: list[tuple[bool, Any]]) -> list[Leftover]:
            leftovers = []
            for entry, (ok, result) in zip(entries, results, strict=True):
                if not ok:
                    self.log.failure(
                        "job {job_id}: removing its snapshot", result, job_id=entry.job_id
                    )
                    result = self._leftover(entry, f"internal error: {result.getErrorMessage()}")
                if result is not None:
                    leftovers.append(result)
            return leftovers

        return DeferredList(tries, consumeErrors=True).addCallback(left)

    async def _clear(
        self, entry: _Pending, credentials: Credentials, deadline: float
    ) -> Optional[Leftover]:
        """One pending snapshot tried now; what is left of it at ``deadline``, or None."""
        if entry.attempt is not None:
            await self._until(entry.attempt, deadline)
        if self._pending.get(entry.job_id) is entry and entry.attempt is None:
            if self._stopped:
                return self._leftover(entry, "sna is shutting down")
            if self._clock.seconds() < deadline:
                if entry.call is not None and entry.call.active():
                    entry.call.cancel()
                # The new request's credentials: its own client is about to use them.
                entry.credentials = credentials
                await self._until(self._attempt(entry), deadline)
        if self._pending.get(entry.job_id) is not entry:
            return None
        if entry.attempt is not None:
            return self._leftover(
                entry,
                f"vCenter did not answer within {self._clear_within:g} s (the removal goes on)",
            )
        return self._leftover(entry, entry.state.reason or "not removed")

    def _until(self, attempt: Deferred[None], deadline: float) -> Deferred[None]:
        """Fires when ``attempt`` has or at ``deadline``, whichever comes first; never
        cancels it (its end is the janitor's to record)."""
        waited: Deferred[None] = Deferred()
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            return succeed(None)

        def fire() -> None:
            if not waited.called:
                waited.callback(None)

        timer = self._clock.callLater(remaining, fire)

        def ended(result: object) -> object:
            if timer.active():
                timer.cancel()
            fire()
            return result

        attempt.addBoth(ended)
        return waited

    @staticmethod
    def _leftover(entry: _Pending, reason: str) -> Leftover:
        return Leftover(entry.job_id, entry.vm_path, entry.state.name, reason)

    def pending(self) -> list[str]:
        """The job ids whose snapshot removal is pending, for logs and tests."""
        return sorted(self._pending)

    # -- the service ----------------------------------------------------------------------

    def stopService(self) -> None:
        """No more retries: timers and retries under way are cancelled (the records keep
        ``pending``; after the restart they wait for credentials)."""
        self._stopped = True
        for entry in self._pending.values():
            self._cancel(entry)
        super().stopService()  # type: ignore[no-untyped-call]

    # -- attempts -----------------------------------------------------------------------

    def _take(self, job: Job, credentials: Optional[Credentials]) -> Optional[_Pending]:
        assert job.snapshot is not None
        old = self._pending.pop(job.job_id, None)
        if old is not None:
            self._cancel(old)
        who = _who(job.vcenter_host, job.vcenter_user)
        state = attrs.evolve(job.snapshot, next_attempt=None, needs_credentials=credentials is None)
        entry = _Pending(
            job.job_id,
            job.started_at,
            job.vm_path,
            who,
            state,
            credentials,
            delay=self._first_delay,
        )
        if who is None:
            self._update(
                entry,
                reason=f"vcenter_host {job.vcenter_host!r} names no vCenter: remove "
                f"snapshot {state.name} in vCenter",
            )
            return None
        self._pending[job.job_id] = entry
        if credentials is None:
            self._update(entry, reason=state.reason or "sna was restarted since the job ran")
        return entry

    def _attempt(self, entry: _Pending) -> Deferred[None]:
        entry.call = None
        credentials = entry.credentials
        assert credentials is not None
        busy = self._vm_busy(entry.vm_path)
        if busy is not None:
            self._later(
                entry,
                entry.state.attempts,
                f"job {busy} is backing up VM {entry.vm_path} and uses its snapshot; "
                "waiting until it has ended",
            )
            return succeed(None)
        d = self._vsphere.remove_job_snapshots(credentials, entry.vm_path, entry.job_id)
        # Kept before its callbacks run: an answer at once must still clear it.
        attempt: Deferred[None] = d  # type: ignore[assignment]
        entry.attempt = attempt
        d.addCallbacks(self._removed, self._failed, callbackArgs=(entry,), errbackArgs=(entry,))
        return attempt

    def _removed(self, answer: dict[str, Any], entry: _Pending) -> None:
        entry.attempt = None
        if self._pending.get(entry.job_id) is not entry:
            return  # a newer job of the same id took over
        del self._pending[entry.job_id]
        removed = list(answer.get("removed", []))
        self._update(
            entry,
            state=SNAPSHOT_REMOVED,
            attempts=entry.state.attempts + 1,
            reason=None,
            next_attempt=None,
            needs_credentials=False,
            removed_by="sna",
            removed_at=self._now(),
        )
        self.log.info(
            "job {job_id}: vCenter confirms no snapshot of it is left on VM {vm_path} "
            "(removed now: {removed_text})",
            job_id=entry.job_id,
            vm_path=entry.vm_path,
            removed=removed,
            removed_text=", ".join(str(name) for name in removed) or "none",
        )

    def _failed(self, failure: Failure, entry: _Pending) -> None:
        entry.attempt = None
        if failure.check(CancelledError) or self._pending.get(entry.job_id) is not entry:
            return
        error = failure.value
        attempts = entry.state.attempts + 1
        if isinstance(error, VSphereError):
            reason = error.message
        else:
            self.log.failure("job {job_id}: removing its snapshot", failure, job_id=entry.job_id)
            reason = f"internal error: {failure.getErrorMessage()}"
        if isinstance(error, _CREDENTIALS_REFUSED):
            entry.credentials = None
            self._update(
                entry,
                attempts=attempts,
                reason=reason,
                next_attempt=None,
                needs_credentials=True,
            )
            self.log.error(
                "job {job_id}: vCenter refused the credentials to remove snapshot {name} "
                "({reason}); waiting for other credentials for {who}",
                job_id=entry.job_id,
                name=entry.state.name,
                reason=reason,
                who=str(entry.who),
            )
            return
        if isinstance(error, NotFound):
            # The VM is gone from that path: deleted (its snapshots with it), or moved
            # or renamed (they are still on it, where sna cannot name it).  Trying
            # again cannot tell which, so it stops, and says so.
            del self._pending[entry.job_id]
            reason = (
                f"{reason}: it was deleted, moved or renamed; sna stops trying. If it "
                f"still exists, remove snapshot {entry.state.name} from it in vCenter"
            )
            self._update(entry, attempts=attempts, reason=reason, next_attempt=None)
            self.log.warn(
                "job {job_id}: snapshot {name} not removed: {reason}",
                job_id=entry.job_id,
                name=entry.state.name,
                reason=reason,
            )
            return
        delay = self._later(entry, attempts, reason)
        if delay is not None:
            self.log.warn(
                "job {job_id}: removing snapshot {name} from VM {vm_path} failed "
                "(attempt {attempts}): {reason}; trying again in {delay:g} s",
                job_id=entry.job_id,
                name=entry.state.name,
                vm_path=entry.vm_path,
                attempts=attempts,
                reason=reason,
                delay=delay,
            )

    def _later(self, entry: _Pending, attempts: int, reason: str) -> Optional[float]:
        """Record ``reason`` and try again after the entry's pause (doubled for the
        next time); returns the pause, or None when nothing is retried any more."""
        if self._stopped:
            self._update(entry, attempts=attempts, reason=reason, next_attempt=None)
            return None
        delay = entry.delay
        entry.delay = min(delay * 2, self._longest_delay)
        entry.call = self._clock.callLater(delay, self._attempt, entry)
        self._update(
            entry,
            attempts=attempts,
            reason=reason,
            next_attempt=self._now() + timedelta(seconds=delay),
            needs_credentials=False,
        )
        return delay

    def _cancel(self, entry: _Pending) -> None:
        if entry.call is not None and entry.call.active():
            entry.call.cancel()
        entry.call = None
        if entry.attempt is not None:
            entry.attempt.cancel()

    def _update(self, entry: _Pending, **changes: Any) -> None:
        entry.state = attrs.evolve(entry.state, **changes)
        self._record(entry.job_id, entry.started_at, entry.state)
