"""Enrolling the node with its hub, as a process the daemon runs and a restart resumes.

``POST /api/v1/enrollment/enroll`` makes the node's key and files at once and
answers; the rest goes on here (enrollment-tunnel.md §5):

1. enroll: send the public key, its fingerprint and the pairing code.  A
   5xx or no answer is retried with the same code (the hub spends it only
   once it has the enrollment row); a 401 is final (the code is wrong,
   expired or used).  The code lives in this coroutine's memory only, never
   in the database, a file or a log line, so a restart before the hub
   answered cannot resume: the enrollment is then ``failed``.
2. verify: sign ``b64decode(challenge)`` and send it, retried only until the
   first 200 and never again (a second verify re-opens a rejected enrollment
   or demotes an approved one on the hub).  The challenge is stored, so a
   restart in this step verifies then.
3. poll the result every 5-10 s (with jitter) until ``approved``,
   ``rejected`` (or ``expired``) or a 404 (the hub forgot it).  A restart
   while awaiting approval polls again, without verifying.

On ``approved`` the tunnel is given the key (:attr:`EnrollmentService.on_approved`),
as it is at every start of an approved enrollment; its first successful
authentication (:meth:`EnrollmentService.tunnel_changed` with ``up``) makes
the enrollment ``active``, the only proof the hub installed the key.
"""

from __future__ import annotations

import os
import random as random_module
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sna.config import PortRange
from sna.enrollment import model
from sna.enrollment.files import EnrollmentFiles
from sna.enrollment.hub import HubClient, HubError, HubTrust, hub_url
from sna.enrollment.keys import InvalidChallenge, NodeKey, comment_for
from sna.enrollment.model import Enrollment
from sna.enrollment.request import EnrollRequest
from sna.jobs.store import IEnrollmentStore, StoreError
from sna.tunnel.settings import TunnelSettings

log = Logger()

#: Seconds between two result polls: at least this, plus up to POLL_JITTER.
POLL_INTERVAL = 5.0
POLL_JITTER = 5.0
#: Backoff of the enroll and verify retries: 2, 4, 8 … at most 60 s, each ±20 %.
RETRY_FIRST = 2.0
RETRY_MAX = 60.0
#: How long the enroll call is retried with one code: the stock hub's codes last 600 s.
ENROLL_RETRY_WINDOW = 600.0

#: The tunnel's state that proves the hub installed the key, and the one that says it did not.
TUNNEL_UP = "up"
TUNNEL_UNENROLLED = "unenrolled"

HubFactory = Callable[[str, HubTrust], Any]


class EnrollmentConflict(Exception):
    """An enrollment is under way or done; it must be forgotten first."""

    def __init__(self, enrollment: Enrollment) -> None:
        self.enrollment = enrollment
        super().__init__(
            f"enrollment {enrollment.id} is {enrollment.state}; "
            "DELETE /api/v1/enrollment to forget it before enrolling again"
        )


class TunnelByHand(Exception):
    """The daemon's tunnel is configured by ``--tunnel-*`` options: an enrollment would replace it."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"the tunnel is configured by hand (--tunnel-host {host}); an enrollment would "
            "replace it: restart sna without the --tunnel-* options to enroll"
        )


class EnrollmentUnavailable(Exception):
    """The node's files or the database cannot be written; the message says which and why."""


def _no_tunnel(settings: Optional[TunnelSettings]) -> None:
    log.info("no tunnel supervisor is connected: the enrollment's tunnel is not started")


class EnrollmentService(Service):
    """The node's one enrollment: started by :meth:`enroll`, resumed by :meth:`startService`."""

    def __init__(
        self,
        store: IEnrollmentStore,
        files: EnrollmentFiles,
        reactor: IReactorTime,
        now: Callable[[], datetime],
        api_port: int,
        nbd_ports: Callable[[], PortRange],
        hub_factory: Optional[HubFactory] = None,
        random: Callable[[], float] = random_module.random,
        use_tunnel: Callable[[Optional[TunnelSettings]], object] = _no_tunnel,
        tunnel_by_hand: Optional[str] = None,
    ) -> None:
        self._store = store
        self._files = files
        self._clock = reactor
        self._now = now
        self._api_port = api_port
        self._nbd_ports = nbd_ports
        self._hub_factory: HubFactory = hub_factory or (
            lambda url, trust: HubClient(reactor, url, trust)
        )
        self._random = random
        #: Hook of the tunnel supervisor (``supervisor.use``): given the tunnel of an
        #: approved enrollment, or ``None`` when the enrollment is forgotten.
        self.use_tunnel = use_tunnel
        #: The hub host of a tunnel given by ``--tunnel-*`` options, which no
        #: enrollment may replace.
        self._tunnel_by_hand = tunnel_by_hand
        self._enrollment: Optional[Enrollment] = None
        self._since = now()
        self._work: Optional[Deferred[None]] = None
        #: The tunnel's last state name, as :meth:`tunnel_changed` was told.
        self._tunnel: Optional[str] = None

    # -- the hooks of the tunnel supervisor ----------------------------------

    def on_approved(self, settings: TunnelSettings) -> None:
        """Hand an approved enrollment's tunnel to the supervisor (:attr:`use_tunnel`)."""
        self.use_tunnel(settings)

    def tunnel_changed(self, state_name: str, authenticated: bool = False) -> None:
        """The supervisor's state changed: its ssh authenticating with the enrollment's
        key (``authenticated``, or ``up``) makes an approved enrollment active; ``unenrolled`` (the hub
        refuses the key) takes an active one back to approved."""
        self._tunnel = state_name
        enrollment = self._enrollment
        if enrollment is None or enrollment.state not in model.TUNNEL_STATES:
            return
        if (authenticated or state_name == TUNNEL_UP) and (
            enrollment.state == model.APPROVED or enrollment.reason is not None
        ):
            self._move(enrollment.moved(model.ACTIVE, self._now()))
        elif state_name == TUNNEL_UNENROLLED:
            reason = (
                "the hub refuses the node's key (ssh: Permission denied): it was not "
                "installed on the hub, or it was revoked; see the hub's authorized_keys"
            )
            if enrollment.reason != reason:
                self._move(enrollment.moved(model.APPROVED, self._now(), reason))

    def tunnel_settings(self, enrollment: Enrollment) -> TunnelSettings:
        return TunnelSettings(
            host=enrollment.ssh_host,
            identity=self._files.private_key,
            known_hosts=self._files.known_hosts,
            api_port=self._api_port,
            port=enrollment.ssh_port,
            user=enrollment.ssh_user,
            nbd_ports=self._nbd_ports(),
            enrollment_id=enrollment.hub_enrollment_id,
        )

    # -- the service ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        try:
            record = self._store.load_enrollment()
        except StoreError as e:
            log.error("cannot read the stored enrollment: {reason}", reason=e.message)
            return
        if record is None:
            return
        enrollment = Enrollment.from_record(record)
        self._enrollment = enrollment
        log.info(
            "enrollment {id} with {hub} is {state}",
            id=enrollment.id,
            hub=enrollment.hub_url,
            state=enrollment.state,
        )
        if enrollment.state == model.ENROLLING:
            self._move(
                enrollment.moved(
                    model.FAILED,
                    self._now(),
                    "the daemon restarted before the hub answered the enroll request, and the "
                    "pairing code is never stored: enroll again (the code may still be unused)",
                )
            )
        elif enrollment.state == model.PENDING_VERIFICATION:
            if enrollment.challenge is None:
                self._move(
                    enrollment.moved(model.FAILED, self._now(), "no stored challenge to sign")
                )
            else:
                self._begin(self._verify_then_poll(enrollment))
        elif enrollment.state == model.AWAITING_APPROVAL:
            self._begin(self._poll(enrollment))
        elif enrollment.state in model.TUNNEL_STATES:
            self._start_tunnel(enrollment)

    def stopService(self) -> Any:
        self._cancel()
        return super().stopService()  # type: ignore[no-untyped-call]

    # -- what the API asks ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        enrollment = self._enrollment
        if enrollment is None:
            return {
                "state": model.NOT_ENROLLED,
                "since": model.timestamp(self._since),
                "reason": None,
                "tunnel": self._tunnel,
            }
        return enrollment.to_json(self._tunnel)

    def enroll(self, request: EnrollRequest) -> Enrollment:
        """Make the key and files, store the enrollment, start talking to the hub; answer at once."""
        if self._tunnel_by_hand is not None:
            raise TunnelByHand(self._tunnel_by_hand)
        current = self._enrollment
        if current is not None and current.state not in model.REPLACEABLE:
            raise EnrollmentConflict(current)
        self._cancel()
        now = self._now()
        key = NodeKey.generate(comment_for(request.vma_name))
        enrollment = Enrollment(
            id=str(uuid.uuid4()),
            state=model.ENROLLING,
            since=now,
            created_at=now,
            oma_host=request.oma_host,
            oma_port=request.oma_port,
            hub_url=hub_url(request.trust, request.oma_host, request.oma_port),
            trust=request.trust,
            ssh_host=request.ssh_host,
            ssh_port=request.ssh_port,
            ssh_user=request.ssh_user,
            host_key=request.host_key,
            vma_name=request.vma_name,
            vma_version=request.vma_version,
            public_key=key.public_line,
            fingerprint=key.fingerprint,
            key_comment=key.comment,
        )
        try:
            self._files.prepare()
            self._files.write(
                os.path.basename(self._files.private_key), key.private_openssh(), 0o600
            )
            self._files.write(
                os.path.basename(self._files.public_key), key.public_line.encode() + b"\n", 0o644
            )
            known = request.host_key.known_hosts_line(request.ssh_host, request.ssh_port)
            self._files.write(os.path.basename(self._files.known_hosts), known.encode(), 0o644)
            self._files.write_record(enrollment.file_record())
        except OSError as e:
            raise EnrollmentUnavailable(
                f"cannot write the node's key under {self._files.directory}: {e.strerror or e}"
            ) from None
        try:
            self._store.save_enrollment(enrollment.to_record())
        except StoreError as e:
            raise EnrollmentUnavailable(e.message) from None
        self._enrollment = enrollment
        log.info(
            "enrollment {id} started with {hub} ({trust}): node key {fingerprint}",
            id=enrollment.id,
            hub=enrollment.hub_url,
            trust=enrollment.trust.describe(),
            fingerprint=enrollment.fingerprint,
        )
        self._begin(self._enroll(enrollment, key, request.pairing_code))
        return enrollment

    def forget(self) -> Optional[Enrollment]:
        """Stop whatever the enrollment was doing, stop its tunnel, delete its record and files."""
        enrollment = self._enrollment
        if enrollment is None:
            return None
        # First, so that nothing its work hears from now on can change it back.
        self._enrollment = None
        self._since = self._now()
        self._cancel()
        if enrollment.state in model.TUNNEL_STATES:
            self.use_tunnel(None)
        try:
            self._store.delete_enrollment()
            self._files.remove()
        except StoreError as e:
            raise EnrollmentUnavailable(e.message) from None
        except OSError as e:
            raise EnrollmentUnavailable(
                f"cannot remove the node's key under {self._files.directory}: {e.strerror or e}"
            ) from None
        log.info("enrollment {id} ({state}) forgotten", id=enrollment.id, state=enrollment.state)
        return enrollment

    # -- the work ---------------------------------------------------------------

    def _begin(self, coroutine: Any) -> None:
        self._cancel()
        work: Deferred[None] = ensureDeferred(coroutine)
        self._work = work

        def done(result: object) -> None:
            if self._work is work:
                self._work = None

        def failed(failure: Any) -> None:
            if not failure.check(CancelledError):
                log.failure("enrollment work failed", failure)

        work.addErrback(failed).addBoth(done)

    def _cancel(self) -> None:
        work, self._work = self._work, None
        if work is not None:
            work.cancel()

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self._clock, seconds, lambda: None)

    def _backoff(self, attempt: int) -> float:
        base = min(RETRY_MAX, RETRY_FIRST * 2 ** (attempt - 1))
        return float(base * (0.8 + 0.4 * self._random()))

    def _move(self, enrollment: Enrollment) -> Enrollment:
        """Make ``enrollment`` the current one: stored, in enrollment.json, logged if its state moved."""
        previous = self._enrollment
        self._still_current(enrollment)
        self._enrollment = enrollment
        if previous is None or previous.state != enrollment.state:
            log.info(
                "enrollment {id}: {old} -> {state}{why}",
                id=enrollment.id,
                old=previous.state if previous is not None else model.NOT_ENROLLED,
                state=enrollment.state,
                reason=enrollment.reason,
                why=f" ({enrollment.reason})" if enrollment.reason else "",
            )
        try:
            self._store.save_enrollment(enrollment.to_record())
        except StoreError as e:
            log.error(
                "cannot store enrollment {id} ({state}): {reason}",
                id=enrollment.id,
                state=enrollment.state,
                reason=e.message,
            )
        try:
            self._files.write_record(enrollment.file_record())
        except OSError as e:
            log.error(
                "cannot write {path}: {reason}", path=self._files.record, reason=e.strerror or e
            )
        return enrollment

    def _note_error(self, enrollment: Enrollment, error: str) -> Enrollment:
        """A call that is retried failed: kept for the status route, logged once per new error."""
        self._still_current(enrollment)
        if enrollment.last_error != error:
            log.warn(
                "enrollment {id} ({state}): {error}; trying again",
                id=enrollment.id,
                state=enrollment.state,
                error=error,
            )
            enrollment = attrs.evolve(enrollment, last_error=error)
            self._enrollment = enrollment
        return enrollment

    def _still_current(self, enrollment: Enrollment) -> None:
        """Stop the work of an enrollment that was forgotten or replaced meanwhile."""
        current = self._enrollment
        if current is None or current.id != enrollment.id:
            raise CancelledError(f"enrollment {enrollment.id} is no longer the current one")

    def _hub(self, enrollment: Enrollment) -> Any:
        return self._hub_factory(enrollment.hub_url, enrollment.trust)

    def _fail(self, enrollment: Enrollment, reason: str) -> None:
        self._move(enrollment.moved(model.FAILED, self._now(), reason))

    def _hub_or_fail(self, enrollment: Enrollment) -> Any:
        """The hub's client, or None once the enrollment failed for its TLS trust."""
        try:
            return self._hub(enrollment)
        except (OSError, ValueError) as e:
            self._fail(enrollment, f"cannot use the hub's TLS trust: {e}")
            return None

    @staticmethod
    def _forgotten(enrollment: Enrollment, error: HubError) -> Optional[str]:
        """Why the enrollment is over when the hub answers 404 for it; None otherwise."""
        if error.status != 404:
            return None
        return (
            f"the hub no longer knows enrollment {enrollment.hub_enrollment_id} "
            f"({error.message}): enroll again with a new code"
        )

    async def _enroll(self, enrollment: Enrollment, key: NodeKey, pairing_code: str) -> None:
        hub = self._hub_or_fail(enrollment)
        if hub is None:
            return
        started = self._clock.seconds()
        attempt = 0
        while True:
            try:
                enrolled = await hub.enroll(
                    pairing_code,
                    enrollment.public_key,
                    enrollment.vma_name,
                    enrollment.vma_version,
                    enrollment.fingerprint,
                )
                break
            except HubError as e:
                if e.status == 401:
                    reason = (
                        f"the hub refused the pairing code ({e.message}): it is wrong, expired "
                        "or already used; get a new code on the hub and enroll again"
                    )
                    self._fail(enrollment, reason)
                    return
                if e.final:
                    self._fail(enrollment, e.message)
                    return
                if self._clock.seconds() - started >= ENROLL_RETRY_WINDOW:
                    reason = (
                        f"the hub did not take the enroll request in {ENROLL_RETRY_WINDOW:g} s "
                        f"(last: {e.message}); enroll again with a new code"
                    )
                    self._fail(enrollment, reason)
                    return
                attempt += 1
                enrollment = self._note_error(enrollment, e.message)
                await self._sleep(self._backoff(attempt))
        del pairing_code  # the hub has spent it
        enrollment = self._move(
            attrs.evolve(
                enrollment.moved(model.PENDING_VERIFICATION, self._now()),
                hub_enrollment_id=enrolled.enrollment_id,
                challenge=enrolled.challenge,
            )
        )
        await self._verify_then_poll(enrollment, key)

    async def _verify_then_poll(
        self, enrollment: Enrollment, key: Optional[NodeKey] = None
    ) -> None:
        assert enrollment.hub_enrollment_id is not None and enrollment.challenge is not None
        try:
            if key is None:
                with open(self._files.private_key, "rb") as f:
                    key = NodeKey.load(f.read(), enrollment.key_comment)
            signature = key.sign_challenge(enrollment.challenge)
        except (OSError, ValueError) as e:
            reason = (
                f"cannot sign the hub's challenge: {e}"
                if isinstance(e, InvalidChallenge)
                else f"cannot read the node's key {self._files.private_key}: {e}"
            )
            self._fail(enrollment, reason)
            return
        hub = self._hub_or_fail(enrollment)
        if hub is None:
            return
        attempt = 0
        while True:
            try:
                await hub.verify(enrollment.hub_enrollment_id, signature)
                break
            except HubError as e:
                if e.final:
                    self._fail(enrollment, self._forgotten(enrollment, e) or e.message)
                    return
                attempt += 1
                enrollment = self._note_error(enrollment, e.message)
                await self._sleep(self._backoff(attempt))
        # Taken: never sent again (a second verify re-opens or demotes it on the hub).
        enrollment = self._move(
            attrs.evolve(enrollment.moved(model.AWAITING_APPROVAL, self._now()), challenge=None)
        )
        await self._poll(enrollment, hub)

    async def _poll(self, enrollment: Enrollment, hub: Any = None) -> None:
        assert enrollment.hub_enrollment_id is not None
        if hub is None:
            hub = self._hub_or_fail(enrollment)
            if hub is None:
                return
        while True:
            try:
                status = await hub.result(enrollment.hub_enrollment_id)
            except HubError as e:
                forgotten = self._forgotten(enrollment, e)
                if forgotten is not None:
                    self._fail(enrollment, forgotten)
                    return
                if e.final and e.status is None:  # TLS trust: polling again cannot help
                    self._fail(enrollment, e.message)
                    return
                enrollment = self._note_error(enrollment, e.message)
            else:
                if status == "approved":
                    enrollment = self._move(enrollment.moved(model.APPROVED, self._now()))
                    self._start_tunnel(enrollment)
                    return
                if status == "rejected":
                    reason = "the hub's administrator rejected this node"
                    self._move(enrollment.moved(model.REJECTED, self._now(), reason))
                    return
                if status == "expired":
                    reason = "the hub says the enrollment expired: enroll again with a new code"
                    self._fail(enrollment, reason)
                    return
                if enrollment.last_error is not None:
                    enrollment = attrs.evolve(enrollment, last_error=None)
                    self._enrollment = enrollment
            await self._sleep(POLL_INTERVAL + POLL_JITTER * self._random())

    def _start_tunnel(self, enrollment: Enrollment) -> None:
        if self._tunnel_by_hand is not None:
            log.warn(
                "enrollment {id} is {state}, but the tunnel is configured by hand "
                "(--tunnel-host {host}): the enrollment's tunnel is not started",
                id=enrollment.id,
                state=enrollment.state,
                host=self._tunnel_by_hand,
            )
            return
        missing = [
            path
            for path in (self._files.private_key, self._files.known_hosts)
            if not os.path.exists(path)
        ]
        if missing:
            reason = f"the enrollment's files are missing ({', '.join(missing)}): forget it and enroll again"
            self._fail(enrollment, reason)
            return
        self.on_approved(self.tunnel_settings(enrollment))
