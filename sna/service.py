"""The daemon's lifecycle: recover jobs, serve the API, stop clients on the way out.

:class:`SnaService` is the top ``MultiService``.  On start it settles the
directories and loads the store (jobs a dead daemon left ``running`` become
``interrupted``, their leftover clients are stopped and their ports kept
until they are gone) before its children start listening.  On stop it stops listening
first, then stops every backup client (TERM, then KILL) and closes the store.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from sna.jobs.manager import JobManager
from sna.jobs.store import IJobStore
from sna.sbc.joblog import LogDirectory
from sna.sha.hub import ShaHub
from sna.vmware.interface import IVSphere

#: Seconds shutdown waits for final states to reach the SHA.
SHA_PUSH_GRACE = 5.0

#: How often finished jobs past the retention period are forgotten.
PRUNE_INTERVAL = 3600.0


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
        self._state_dir.makedirs(ignoreExistingDirectory=True)
        self._log_dir.resolve()
        self._pool.start()
        self.recovered = self.manager.recover()
        if self._hub is not None:
            # Telemetry of the jobs to come, and what an earlier run could not deliver.
            self._hub.start()
        self.log.info(
            "sna started: state in {state}, job logs in {logs}",
            state=self._state_dir.path,
            logs=self._log_dir.current.path,
        )
        super().startService()  # type: ignore[no-untyped-call]

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
            self._store.close()
            self.log.info("sna stopped")

        return d.addBoth(closed)
