"""Job logs: the file of every line a job's client printed, and the directory they go in.

:class:`JobLog` appends timestamped lines to one job's log
(:func:`sna.contract.ids.log_file_name`); :class:`LogDirectory` settles where
logs go, the preferred directory or one under the state dir, and says when
they cannot be written (:meth:`LogDirectory.problem`).  A job log never
raises once open: a write the disk refuses (full, read-only, gone) costs that
line, is counted, and is said in the log once it can be written again and in
the daemon's log; the job it belongs to goes on.  What a line says (masking,
parsing) is the protocol's business, not this module's; the writing side
never reads a log back.

The reading side, for ``GET /api/v1/jobs/{job_id}/log``, is at the end:
:func:`read_lines` reads whole lines from a byte offset, :func:`job_start`
finds where a job's own lines begin in a file that earlier jobs of its id
also wrote, and :meth:`LogDirectory.find` which directory holds it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Optional

import attrs
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from sna.contract.ids import log_file_name

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
                    "cannot use log directory {path}: {reason}",
                    path=candidate.path,
                    reason=e.strerror or str(e),
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

    def find(self, job_id: str) -> FilePath[str]:
        """Where the log of ``job_id`` is: in the directory in use, else the other one (an
        earlier run may have written it there); the former if neither has it."""
        name = log_file_name(job_id)
        here = self.current.child(name)
        for directory in (self.current, self.preferred, self.fallback):
            candidate = directory.child(name)
            if candidate.isfile():
                return candidate
        return here

    def problem(self) -> Optional[str]:
        """Why job logs cannot be written now, or ``None``.

        A job log whose last write failed says it; else a write is tried.
        """
        for job_log in self._open:
            if job_log.problem is not None:
                return job_log.problem
        return probe(self.current, "the log directory")


# -- reading a job log back (GET /api/v1/jobs/{job_id}/log) -----------------------------

#: How much of a log :func:`job_start` reads at a time.
_SCAN_CHUNK = 64 * 1024


@attrs.frozen
class LogSlice:
    """Whole lines of a log from ``offset`` up to ``next_offset`` (bytes), each without
    its ``\\n``; ``size`` is the file's size when it was read."""

    offset: int
    next_offset: int
    size: int
    data: bytes

    @property
    def lines(self) -> list[str]:
        text = self.data.decode("utf-8", "replace")
        return text.removesuffix("\n").split("\n") if text else []


def read_lines(path: FilePath[str], offset: int, limit: int, ended: bool) -> LogSlice:
    """Whole lines of ``path`` from ``offset``, at most ``limit`` bytes of them.

    A last line without its newline yet is left for later, unless the job has
    ``ended`` (nothing will finish it) or it alone is longer than ``limit`` (it
    is then cut there).  Raises :class:`OSError` if the file cannot be read.
    """
    with open(path.path, "rb") as log:
        size = os.fstat(log.fileno()).st_size
        log.seek(offset)
        data = log.read(min(limit, max(size - offset, 0)))
    end = data.rfind(b"\n") + 1
    if end == 0 and data:
        whole = ended and offset + len(data) >= size
        end = len(data) if whole or len(data) >= limit else 0
    elif end < len(data) and ended and offset + len(data) >= size:
        end = len(data)
    return LogSlice(offset, offset + end, size, data[:end])


def _stamp(line: bytes) -> Optional[datetime]:
    """The time a log line starts with (``2026-11-26T09:12:03.482Z``), if it does."""
    head = line[:30].split(b" ", 1)[0]
    try:
        moment = datetime.fromisoformat(head.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else None


def job_start(path: FilePath[str], started: datetime) -> int:
    """The offset of the first line of ``path`` written at or after ``started``.

    A log is appended to by every job of its id, one after the other: the job
    that started at ``started`` wrote from its first line on (the ``sna
    starting`` line, written after its start).  The file's size if no line is.
    Raises :class:`OSError` if the file cannot be read.
    """
    # Lines carry milliseconds; the job's start has microseconds.
    since = started.replace(microsecond=started.microsecond // 1000 * 1000)
    offset = 0
    rest = b""
    with open(path.path, "rb") as log:
        while True:
            chunk = log.read(_SCAN_CHUNK)
            if not chunk:
                # A last line without its newline (a cut write) is a line too.
                moment = _stamp(rest) if rest else None
                return offset if moment is not None and moment >= since else offset + len(rest)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                moment = _stamp(line)
                if moment is not None and moment >= since:
                    return offset
                offset += len(line) + 1
