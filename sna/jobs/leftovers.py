"""Backup clients left running by a daemon that died, and stopping them.

A client outlives its daemon: when sna starts again, the job it ran is
``interrupted`` and the client, if its pid still names that job, is stopped
before the job's NBD ports may serve another.  The :class:`JobManager
<sna.jobs.manager.JobManager>` asks through :class:`ILeftoverClients`; the
one real implementation reads ``/proc`` and signals through
:mod:`sna.sbc.process`, and tests give it a fake.  Nothing here starts a process.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from sna.sbc.process import terminate_leftover


class ILeftoverClients(Interface):
    """Finds and stops the client of an interrupted job, which is no child of ours."""

    def stop(pid: int, job_id: str, spare_id: Optional[str], grace: float) -> Deferred[bool]:
        """Stop ``pid`` if it is still the client of ``job_id`` (or of the spare
        ``spare_id`` that took it): TERM, then KILL after ``grace`` seconds.

        Fires ``True`` once the client found is gone, ``False`` at once if there was none.
        """


@implementer(ILeftoverClients)
class LeftoverClients:
    """The clients as ``/proc`` shows them."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def stop(self, pid: int, job_id: str, spare_id: Optional[str], grace: float) -> Deferred[bool]:
        return terminate_leftover(self._clock, pid, job_id, grace, spare_id)
