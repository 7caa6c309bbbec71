"""The daemon's lifecycle: recover jobs, serve the API, stop clients on the way out.

:class:`SnaService` is the top ``MultiService``.  On start it settles the
directories and loads the store (jobs a dead daemon left ``running`` become
``interrupted``, their leftover clients are stopped and their ports kept
until they are gone) before its children start listening.  A state directory
that cannot be created or written (read-only, no permission), a job database
that cannot be opened, or no directory for job logs stops it with one line
naming the directory and the reason (:class:`CannotStart`); a full one does not:
it starts, and no job starts until there is room (the manager's
``storage_problem``).  On stop it stops listening first, then stops every
backup client (TERM, then KILL) and closes the store.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from sna.jobs.manager import JobManager
from sna.jobs.store import IJobStore, StoreError
from sna.sbc.joblog import LogDirectory, check_writable
from sna.sha.hub import ShaHub
from sna.vmware.interface import IVSphere

#: Seconds shutdown waits for final states to reach the SHA.
SHA_PUSH_GRACE = 5.0

#: How often finished jobs past the retention period are forgotten.
PRUNE_INTERVAL = 3600.0


#: Errors of a full disk: space may come back while sna runs.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CannotStart(SystemExit):
    """sna cannot run here; the message says why, on one line.

    A :class:`SystemExit`: twistd lets it through, and Python prints its
    message, not a traceback, and exits 1.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"sna cannot start: {reason}")


class SnaService(MultiService):
    log = Logger()

    def __init__(
        self,
        manager: JobManager,
        store: IJobStore,
        state_dir: FilePath[str],
        log_dir: LogDirectory,
        pool: ThreadPool,
        vsphere: IVSphere,
        clock: IReactorTime,
        hub: Optional[ShaHub] = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.manager = manager
        self._pool = pool
        self._vsphere = vsphere
        self._clock = clock
        self._hub = hub
        self._store = store
        self._state_dir = state_dir
        self._log_dir = log_dir
        self.recovered: Optional[Deferred[Any]] = None
        pruning = TimerService(PRUNE_INTERVAL, manager.prune)
        pruning.clock = clock
        pruning.setServiceParent(self)

    def startService(self) -> None:
        self._check_state_dir()
        try:
            self._log_dir.resolve()
        except RuntimeError as e:
            raise CannotStart(str(e)) from None
        self._pool.start()
        try:
            self.recovered = self.manager.recover()
        except StoreError as e:
            self._pool.stop()
            raise CannotStart(e.message) from None
        if self._hub is not None:
            # Telemetry of the jobs to come, and what an earlier run could not deliver.
            self._hub.start()
        # The start line, with these directories, is sna.tap.StartLine's, a child.
        super().startService()  # type: ignore[no-untyped-call]

    def attach_hub(self, hub: ShaHub) -> None:
        """Talk to the SHA through ``hub`` from now on (an enrolled node's tunnel came)."""
        self._hub = hub
        if self.running:
            hub.start()

    def _check_state_dir(self) -> None:
        path = self._state_dir.path
        try:
            self._state_dir.makedirs(ignoreExistingDirectory=True)
        except OSError as e:
            raise CannotStart(f"cannot create the state directory {path}: {e.strerror}") from None
        try:
            check_writable(self._state_dir)
        except OSError as e:
            if e.errno not in _FULL:
                raise CannotStart(
                    f"cannot write to the state directory {path}: {e.strerror}"
                ) from None
            self.log.error(
                "cannot write to the state directory {path}: {reason}; no job starts until it can",
                path=path,
                reason=e.strerror,
            )

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.manager.stop())
        d.addBoth(lambda _: self._vsphere.close())
        if self._hub is not None:
            hub = self._hub
            # What the jobs just stopped owe the SHA gets a moment to go; a SHA that
            # does not answer soon must not hold the shutdown (it stays stored).
            d.addBoth(lambda _: hub.wait().addTimeout(SHA_PUSH_GRACE, self._clock))

        def closed(result: object) -> None:
            if self._hub is not None:
                self._hub.stop()
            self._pool.stop()
            try:
                self._store.close()
            except StoreError as e:
                self.log.error("{reason}", reason=e.message)
            self.log.info("sna stopped")

        return d.addBoth(closed)
