"""Job logs: the file of every line a job's client printed, and the directory they go in.

:class:`JobLog` appends timestamped lines to one job's log
(:func:`sna.contract.ids.log_file_name`); :class:`LogDirectory` settles where
logs go, the preferred directory or one under the state dir, and says when
they cannot be written (:meth:`LogDirectory.problem`).  A job log never
raises once open: a write the disk refuses (full, read-only, gone) costs that
line, is counted, and is said in the log once it can be written again and in
the daemon's log; the job it belongs to goes on.  What a line says (masking,
parsing) is the protocol's business, not this module's; it never reads a log
back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Optional

from twisted.logger import Logger
from twisted.python.filepath import FilePath

#: What a directory must take for sna to call it writable: room for some lines and
#: records, not just one.
PROBE_BYTES = 16 * 1024
#: The file :func:`probe` writes, and removes at once.
PROBE_NAME = ".sna-write-probe"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def check_writable(directory: FilePath[str]) -> None:
    """Raise the :class:`OSError` of a write of :data:`PROBE_BYTES` to ``directory``, if any.

    The file written is removed at once.
    """
    path = directory.child(PROBE_NAME).path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, bytes(PROBE_BYTES))
    finally:
        try:
            os.close(fd)
        finally:
            os.unlink(path)


def probe(directory: FilePath[str], what: str) -> Optional[str]:
    """Why ``directory`` (named ``what`` in the answer) cannot take
    :data:`PROBE_BYTES` now, or ``None`` if it can."""
    try:
        check_writable(directory)
    except OSError as e:
        return f"cannot write to {what} {directory.path}: {e.strerror or e}"
    return None


class JobLog:
    """A job's log (:func:`sna.contract.ids.log_file_name`): every line of both
    streams, timestamped, appended.

    Opening it raises :class:`OSError`; nothing after that does.  While its
    disk refuses writes, ``problem`` says why and ``lost`` counts the lines
    dropped.
    """

    log = Logger()

    def __init__(
        self,
        path: FilePath[str],
        now: Callable[[], datetime],
        on_close: Callable[[JobLog], None] = lambda log: None,
    ) -> None:
        self.path = path
        self._now = now
        self._on_close = on_close
        # Unbuffered: a line is on disk or refused when write() returns, never
        # half-kept in a buffer that a later flush or close would raise about.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd: Optional[int] = os.open(path.path, flags, 0o666)
        #: Why the last write failed; ``None`` once one succeeds again.
        self.problem: Optional[str] = None
        #: Lines dropped since ``problem`` was set.
        self.lost = 0
        self._cut = False

    def write(self, stream: str, line: str) -> None:
        if self._fd is None:
            return
        stamp = self._now().astimezone(UTC).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        data = f"{stamp} {stream} {line}\n".encode("utf-8", "replace")
        if self.problem is not None:
            # What the log lacks is said in it, where it lacks it.
            note = f"{stamp} sna {self.lost} line(s) not written here: {self.problem}\n"
            data = (b"\n" if self._cut else b"") + note.encode("utf-8", "replace") + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            self._cut = self._cut or len(view) < len(data)
            self.lost += 1
            if self.problem is None:
                self.problem = f"cannot write the job log {self.path.path}: {e.strerror or e}"
                self.log.error("{problem}; its lines are lost until it can", problem=self.problem)
            return
        if self.problem is not None:
            self.log.info(
                "job log {path} is written again; {lost} line(s) were lost",
                path=self.path.path,
                lost=self.lost,
            )
            self.problem, self.lost, self._cut = None, 0, False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as e:
            self.log.error(
                "closing the job log {path}: {reason}", path=self.path.path, reason=e.strerror
            )
        if self.problem is not None:
            self.log.error(
                "job log {path} closed with its last {lost} line(s) lost: {problem}",
                path=self.path.path,
                lost=self.lost,
                problem=self.problem,
            )
        self._on_close(self)


class LogDirectory:
    """Where job logs go: the preferred directory, else one under the state dir."""

    log = Logger()

    def __init__(self, preferred: FilePath[str], fallback: FilePath[str]) -> None:
        self.preferred = preferred
        self.fallback = fallback
        self.current = preferred
        #: The job logs open now, for :meth:`problem`.
        self._open: list[JobLog] = []

    def resolve(self) -> FilePath[str]:
        for candidate in (self.preferred, self.fallback):
            try:
                candidate.makedirs(ignoreExistingDirectory=True)
            except OSError as e:
                self.log.warn(
                    "cannot use log directory {path}: {reason}", path=candidate.path, reason=e
                )
                continue
            if os.access(candidate.path, os.W_OK | os.X_OK):
                if candidate is not self.preferred:
                    self.log.warn(
                        "job logs go to {path} instead of {preferred}",
                        path=candidate.path,
                        preferred=self.preferred.path,
                    )
                self.current = candidate
                return candidate
            self.log.warn("cannot write to log directory {path}", path=candidate.path)
        raise RuntimeError(
            f"neither {self.preferred.path} nor {self.fallback.path} can hold job logs"
        )

    def open(self, path: FilePath[str], now: Callable[[], datetime]) -> JobLog:
        """Open the job log at ``path`` (raises :class:`OSError`), watched by :meth:`problem`."""
        job_log = JobLog(path, now, on_close=self._open.remove)
        self._open.append(job_log)
        return job_log

    def problem(self) -> Optional[str]:
        """Why job logs cannot be written now, or ``None``.

        A job log whose last write failed says it; else a write is tried.
        """
        for job_log in self._open:
            if job_log.problem is not None:
                return job_log.problem
        return probe(self.current, "the log directory")
