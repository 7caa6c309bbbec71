"""The reactor as the client uses it: one object, each use typed by its interface.

The client runs on one reactor (``task.react``), but each part needs a
different side of it: time, TCP and Unix connections for NBD, file
descriptors for the ``/folder`` reader, processes for nbdkit, and the way
back from the vSphere worker thread.  :class:`ClientReactor` names each, so
code says which it uses and mypy checks it, as the daemon's parts do with
their ``IReactorTime`` or ``IReactorProcess`` arguments.  It also carries the
job's worker threads (its vSphere calls, name lookups): nothing in the
client uses the global reactor's thread pool.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from twisted.python.threadpool import ThreadPool

#: Worker threads: the job's calls come one at a time, but a call it gave up on
#: (past its deadline) keeps its thread until its socket times out.
WORKER_THREADS = 4


class WorkerPool(ThreadPool):
    """The job's worker threads; daemon threads, so a vCenter call stuck in a
    socket cannot keep the process alive after the run has given up on it."""

    def __init__(self) -> None:
        super().__init__(minthreads=1, maxthreads=WORKER_THREADS, name="vsphere")

    def threadFactory(self, *args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


@attrs.frozen
class ClientReactor:
    clock: IReactorTime
    tcp: IReactorTCP
    unix: IReactorUNIX
    fds: IReactorFDSet
    processes: IReactorProcess
    threads: IReactorFromThreads
    #: Blocking calls run here, one at a time (started and stopped by the job); one
    #: given up past its deadline keeps a thread, and the next call runs on another.
    pool: ThreadPool

    @classmethod
    def of(cls, reactor: object, pool: ThreadPool | None = None) -> ClientReactor:
        """``reactor`` seen through each interface (a ``TypeError`` if it lacks one)."""
        return cls(
            clock=IReactorTime(reactor),
            tcp=IReactorTCP(reactor),
            unix=IReactorUNIX(reactor),
            fds=IReactorFDSet(reactor),
            processes=IReactorProcess(reactor),
            threads=IReactorFromThreads(reactor),
            pool=pool if pool is not None else WorkerPool(),
        )
