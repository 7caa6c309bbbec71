"""Backup clients left running by a daemon that died, and stopping them.

A client outlives its daemon: when sna starts again, the job it ran is
``interrupted`` and the client, if its pid still names that job, is stopped
before the job's NBD ports may serve another.  The :class:`JobManager
<sna.jobs.manager.JobManager>` asks through :class:`ILeftoverClients`; the
one real implementation, :class:`LeftoverClients`, reads ``/proc`` and
signals the pid (:func:`terminate_leftover`), and tests give it a fake.
Nothing here starts a process, and a client of this daemon's own is
:mod:`sna.sbc.launcher`'s to stop, not this module's.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from sna.contract import argv as cli
from sna.contract import standby

log = Logger()


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


def process_cmdline(pid: int) -> Optional[list[str]]:
    """argv of a live process, or ``None`` if it is gone (or not ours to read)."""
    try:
        raw = FilePath(f"/proc/{pid}/cmdline").getContent()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def is_client_of(pid: int, job_id: str, spare_id: Optional[str] = None) -> bool:
    """Whether ``pid`` is a backup client started for ``job_id`` (pids get reused).

    Its argv names the job (``--job-id``) or, for a spare that was handed the
    job, the spare (``--spare-id``), which the job's record keeps.
    """
    argv = process_cmdline(pid)
    if not argv:
        return False
    if cli.option_value(argv, "--job-id") == job_id:
        return True
    return spare_id is not None and cli.option_value(argv, standby.SPARE_ID_OPTION) == spare_id


def terminate_leftover(
    clock: IReactorTime, pid: int, job_id: str, grace: float, spare_id: Optional[str] = None
) -> Deferred[bool]:
    """Stop a client left running by an earlier daemon; fires ``True`` if one was found.

    It is no longer our child, so we cannot reap it: we poll until it is gone.
    """
    if not is_client_of(pid, job_id, spare_id):
        return succeed(False)
    log.warn(
        "terminating leftover backup client pid {pid} of interrupted job {job_id}",
        pid=pid,
        job_id=job_id,
    )
    done: Deferred[bool] = Deferred()
    deadline = clock.seconds() + grace
    killed = False

    def send(sig: int) -> bool:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def poll() -> None:
        nonlocal killed
        if not is_client_of(pid, job_id, spare_id) or _is_zombie(pid):
            done.callback(True)
            return
        if not killed and clock.seconds() >= deadline:
            killed = True
            send(signal.SIGKILL)
        clock.callLater(0.1, poll)

    send(signal.SIGTERM)
    poll()
    return done


def _is_zombie(pid: int) -> bool:
    try:
        stat = FilePath(f"/proc/{pid}/stat").getContent()
    except OSError:
        return True
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat.rsplit(b")", 1)[-1].split()[:1] == [b"Z"]
