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
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from sna.jobs.manager import JobManager
from sna.jobs.store import IJobStore
from sna.sbc.process import LogDirectory

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
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.manager = manager
        self._store = store
        self._state_dir = state_dir
        self._log_dir = log_dir
        self.recovered: Optional[Deferred[Any]] = None
        TimerService(PRUNE_INTERVAL, manager.prune).setServiceParent(self)

    def startService(self) -> None:
        self._state_dir.makedirs(ignoreExistingDirectory=True)
        self._log_dir.resolve()
        self.recovered = self.manager.recover()
        self.log.info(
            "sna started: state in {state}, job logs in {logs}",
            state=self._state_dir.path,
            logs=self._log_dir.current.path,
        )
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        d = maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.manager.stop())

        def closed(result: object) -> None:
            self._store.close()
            self.log.info("sna stopped")

        return d.addBoth(closed)
