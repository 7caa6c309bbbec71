"""The SHA as the daemon sees it: one object for the job manager, the API and the service.

:class:`ShaHub` asks the SHA for previous change IDs before a job starts,
pushes running jobs' telemetry (:mod:`~sna.sha.live`), and delivers what
ended jobs owe it (:mod:`~sna.sha.outbox`).  With the legacy Go client,
which asks for change IDs and posts its own completions, it only reports
telemetry and final states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sna.jobs.model import Job
from sna.jobs.store import IJobStore, StoreError
from sna.sha import messages
from sna.sha.client import ShaClient, ShaUnreachable
from sna.sha.live import LiveTelemetry
from sna.sha.outbox import Outbox, summary


@attrs.frozen
class Lookup:
    """The SHA's answer about one disk's previous change ID."""

    #: The change ID, or None when the SHA has none (``""``) or did not answer.
    change_id: Optional[str] = None
    #: Why there is no answer.
    error: Optional[str] = None


class IHub(Interface):
    """What the daemon tells and asks the SHA."""

    def previous_change_ids(vm_name: str, indexes: Sequence[int]) -> Deferred[dict[int, Lookup]]:
        """The SHA's last change ID of each disk index of a VM; never fails."""

    def ended_messages(job: Job) -> list[messages.Message]:
        """What the SHA must get now that ``job`` has ended (stored with it)."""

    def job_started(job: Job) -> None:
        """``job`` runs: its live telemetry starts."""

    def job_ended(job_id: str, closed: Deferred[Any]) -> None:
        """``job_id`` has ended and its messages are stored: deliver them once ``closed``
        (its NBD connections are closed) has fired."""

    def report(job_id: str) -> Optional[dict[str, Any]]:
        """How telemetry and deliveries of ``job_id`` stand, for its status."""


@implementer(IHub)
class ShaHub:
    log = Logger()

    def __init__(
        self,
        client: ShaClient,
        store: IJobStore,
        clock: IReactorTime,
        now: Callable[[], datetime],
        running: Callable[[], list[Job]],
        *,
        legacy: bool = False,
        on_answer: Callable[[str, str], None] = lambda route, outcome: None,
    ) -> None:
        self._client = client
        self._store = store
        self._now = now
        self._legacy = legacy
        self._on_answer = on_answer
        self.live = LiveTelemetry(
            client, clock, now, running, on_answer=lambda outcome: on_answer("telemetry", outcome)
        )
        self.outbox = Outbox(client, store, clock, on_answer=on_answer)

    @property
    def url(self) -> str:
        return self._client.base_url

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._legacy:
            self.log.info(
                "the legacy backup client asks the SHA for change IDs and posts its own "
                "completions; sna sends the SHA telemetry only"
            )
        self.live.start()
        self.outbox.start()

    def stop(self) -> None:
        self.live.stop()
        self.outbox.stop()

    def wait(self) -> Deferred[Any]:
        return self.outbox.wait()

    # -- IHub ---------------------------------------------------------------------------------

    def previous_change_ids(
        self, vm_name: str, indexes: Sequence[int]
    ) -> Deferred[dict[int, Lookup]]:
        if self._legacy:
            return succeed({})
        return Deferred.fromCoroutine(self._lookups(vm_name, list(dict.fromkeys(indexes))))

    async def _lookups(self, vm_name: str, indexes: list[int]) -> dict[int, Lookup]:
        asks = [Deferred.fromCoroutine(self._lookup(vm_name, index)) for index in indexes]
        results = await DeferredList(asks, consumeErrors=True)
        return {
            index: value
            if not isinstance(value, Failure)
            else Lookup(error=value.getErrorMessage())
            for index, (_, value) in zip(indexes, results, strict=True)
        }

    async def _lookup(self, vm_name: str, index: int) -> Lookup:
        path = messages.changeid_path(vm_name, index)
        try:
            answer = await self._client.request("GET", path)
        except ShaUnreachable as e:
            self._on_answer("changeid", "unreachable")
            return Lookup(error=str(e))
        if answer.code != 200:
            self._on_answer("changeid", messages.outcome("changeid", answer.code))
            return Lookup(error=f"GET {self.url}{path}: {answer.text()}")
        try:
            change_id = messages.previous_change_id(answer.body)
        except messages.BadAnswer as e:
            self._on_answer("changeid", "refused")
            return Lookup(error=f"GET {self.url}{path}: {e}")
        self._on_answer("changeid", "delivered")
        return Lookup(change_id=change_id)

    def ended_messages(self, job: Job) -> list[messages.Message]:
        found = messages.final_messages(job, self._now())
        if self._legacy:
            found = [m for m in found if m.kind != "complete"]
        return found

    def job_started(self, job: Job) -> None:
        self.live.job_started(job)

    def job_ended(self, job_id: str, closed: Deferred[Any]) -> None:
        live = self.live.finished(job_id)
        # Either may fail (a relay that would not close): the messages still go.
        self.outbox.deliver(job_id, after=DeferredList([closed, live], consumeErrors=True))

    def report(self, job_id: str) -> Optional[dict[str, Any]]:
        try:
            delivered = summary(self._store.outbox(job_id))
        except StoreError as e:
            delivered = {"completion": None, "final_state": None, "unavailable": e.message}
        pushes = self.live.state(job_id)
        if delivered is None and pushes is None:
            return None
        return {
            **(delivered or {"completion": None, "final_state": None}),
            "telemetry": pushes.to_json() if pushes is not None else None,
        }
