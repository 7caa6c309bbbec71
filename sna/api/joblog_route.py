"""``GET /api/v1/jobs/{job_id}/log``: a job's log, read in pieces, followed by long polls.

The log is the file the daemon writes for the job (:mod:`sna.sbc.joblog`),
its lines already masked.  An answer carries the whole lines from a byte
``offset`` (by default where the job's own lines begin: the file also holds
earlier jobs of its id) up to :data:`MAX_JSON_BYTES`, and ``next_offset`` to
ask from next.  With ``wait``, an answer that would carry no line waits, up
to :data:`MAX_WAIT` seconds, until a line arrives or the job ends; the file
is looked at every :data:`POLL` seconds meanwhile.  A waiting request holds
its connection, which the connection limits never close for room
(:mod:`sna.api.http`), so at most :data:`MAX_WAITING` wait at once.
``format=text`` answers the lines as they are, ``text/plain``: the one
answer of the API that is not JSON, for ``curl``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest

from sna.api.http import ApiError, json_response
from sna.jobs.model import Job
from sna.sbc.joblog import LogDirectory, LogSlice, job_start, read_lines

#: Bytes of log lines one JSON answer carries at most (a line is at most 64 KiB).
MAX_JSON_BYTES = 256 * 1024
#: Bytes of log one ``format=text`` answer carries at most.
MAX_TEXT_BYTES = 8 * 1024 * 1024
#: The longest ``wait``, in seconds: well within the connection's idle timeout (60 s).
MAX_WAIT = 30.0
#: Seconds between looks at the file while a request waits.
POLL = 0.25
#: Requests that may wait at once; more are answered 503 ``too_many_waits``.
MAX_WAITING = 16
PARAMETERS = ("offset", "wait", "format")

T = TypeVar("T")


@attrs.frozen
class LogQuery:
    offset: Optional[int] = None
    wait: float = 0.0
    text: bool = False


def _single(args: Mapping[str, Sequence[str]], name: str) -> Optional[str]:
    values = args.get(name, ())
    if len(values) > 1:
        raise _invalid(name, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field)


def parse_query(args: Mapping[str, Sequence[str]]) -> LogQuery:
    """``offset`` (bytes, an integer >= 0), ``wait`` (seconds, 0 to 30), ``format``
    (``json`` or ``text``); anything else is refused, naming the parameter."""
    for name in args:
        if name not in PARAMETERS:
            raise _invalid(
                name, f"unknown query parameter {name[:40]!r} (known: {', '.join(PARAMETERS)})"
            )
    offset = None
    text = _single(args, "offset")
    if text is not None:
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise _invalid(
                "offset", f"offset must be a byte offset, an integer >= 0, not {text[:40]!r}"
            )
        offset = int(text)
    wait = 0.0
    text = _single(args, "wait")
    if text is not None:
        try:
            wait = float(text) if text.isascii() and text.strip() == text else -1.0
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT:
            raise _invalid(
                "wait",
                f"wait must be a number of seconds from 0 to {MAX_WAIT:g}, not {text[:40]!r}",
            )
    shape = _single(args, "format") or "json"
    if shape not in ("json", "text"):
        raise _invalid("format", f"format must be json or text, not {shape[:40]!r}")
    return LogQuery(offset, wait, shape == "text")


class JobLogs:
    """Answers ``GET /api/v1/jobs/{job_id}/log`` from the job logs of ``logs``.

    ``job`` gives a job's record (raising the manager's ``UnknownJob``);
    ``clock`` paces the waits.
    """

    def __init__(
        self,
        logs: LogDirectory,
        job: Callable[[str], Job],
        clock: IReactorTime,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._logs = logs
        self._job = job
        self._clock = clock
        self._max_waiting = max_waiting
        #: Requests waiting now.
        self.waiting = 0

    async def answer(
        self, request: IRequest, job_id: str, args: Mapping[str, Sequence[str]]
    ) -> bytes:
        job = self._job(job_id)
        query = parse_query(args)
        path = self._logs.find(job_id)
        offset = query.offset
        if offset is None:
            offset = self._read(path, job_id, lambda: job_start(path, job.started_at))
        limit = MAX_TEXT_BYTES if query.text else MAX_JSON_BYTES
        piece = self._slice(path, job_id, offset, limit, job)
        if piece.offset > piece.size:
            raise _invalid(
                "offset", f"offset {offset} is past the end of the log ({piece.size} bytes)"
            )
        if query.wait and not piece.data and job.status.active:
            job = await self._wait(request, job_id, path, offset, query.wait)
            piece = self._slice(path, job_id, offset, limit, job)
        complete = not job.status.active and piece.next_offset >= piece.size
        if query.text:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Sna-Next-Offset", str(piece.next_offset).encode())
            request.setHeader(b"X-Sna-Log-Complete", b"true" if complete else b"false")
            return piece.data
        body = {
            "job_id": job.job_id,
            "status": job.status.value,
            "offset": piece.offset,
            "next_offset": piece.next_offset,
            "size": piece.size,
            "lines": piece.lines,
            "complete": complete,
        }
        return json_response(request, body)

    def _slice(
        self, path: FilePath[str], job_id: str, offset: int, limit: int, job: Job
    ) -> LogSlice:
        return self._read(
            path, job_id, lambda: read_lines(path, offset, limit, not job.status.active)
        )

    @staticmethod
    def _read(path: FilePath[str], job_id: str, read: Callable[[], T]) -> T:
        try:
            return read()
        except FileNotFoundError:
            raise ApiError(
                410,
                "job_log_gone",
                f"the log of job {job_id} is gone: {path.path} does not exist (removed?)",
            ) from None
        except OSError as e:
            raise ApiError(
                503,
                "job_log_unreadable",
                f"cannot read the log of job {job_id} ({path.path}): {e.strerror or e}",
            ) from None

    async def _wait(
        self, request: IRequest, job_id: str, path: FilePath[str], offset: int, seconds: float
    ) -> Job:
        """Until the log has bytes past ``offset``, the job has ended, or ``seconds`` passed;
        the job's record then."""
        if self.waiting >= self._max_waiting:
            request.setHeader(b"Retry-After", b"1")
            raise ApiError(
                503,
                "too_many_waits",
                f"{self.waiting} requests already wait for job log lines (at most "
                f"{self._max_waiting}); ask again without wait, or later",
            )
        self.waiting += 1
        try:
            end = self._clock.seconds() + seconds
            while True:
                left = end - self._clock.seconds()
                if left <= 0:
                    break
                await deferLater(self._clock, min(POLL, left), lambda: None)
                job = self._job(job_id)
                if not job.status.active or self._grown(path, offset):
                    return job
        finally:
            self.waiting -= 1
        return self._job(job_id)

    @staticmethod
    def _grown(path: FilePath[str], offset: int) -> bool:
        try:
            # Not FilePath.getsize(): it keeps the first stat it made.
            return os.stat(path.path).st_size > offset
        except OSError:
            return True  # the next read says what is wrong
