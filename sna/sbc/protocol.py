"""The ProcessProtocol of a job's client: lines in, events and the exit out.

:class:`BackupClientProtocol` splits the child's two streams into bounded
lines (:data:`MAX_LINE`), masks secrets in every form
(:class:`~sna.contract.secrets.Masker`), writes each line to the job log,
parses it into :mod:`sna.sbc.events` and tells an :class:`IClientObserver`;
at the exit it names the line that explains a failure (:data:`_ERROR_LINE`,
else the last stderr line; for a client killed by a signal, only an error
line).  Whatever happens to the job log (a full disk), the observer hears
every event and the exit.  It neither starts nor stops a process, and knows
no job record: that is the observer's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional, cast

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from sna.contract import events as contract
from sna.contract.secrets import Masker
from sna.sbc import events
from sna.sbc.joblog import JobLog
from sna.sbc.parse import ILineParser

#: Lines that say what went wrong, preferred over the last line (a Go panic is
#: followed by its goroutine dump, a cobra error by the usage text).
_ERROR_LINE = re.compile(
    r"^(panic: |fatal error: |Error: |Traceback |[A-Za-z_.]*(Error|Exception): )"
    r"|^(ERROR|CRITICAL|FATAL)[: ]"
    r"|level=(error|fatal|panic)\b"
)

MASK = contract.MASK

#: Lines longer than this are cut: a runaway child must not grow our memory.
MAX_LINE = 64 * 1024


class IClientObserver(Interface):
    """Told what one backup-client process does."""

    def event_received(event: events.Event) -> None:
        """The client reported ``event``."""

    def process_ended(
        exit_code: Optional[int], exit_signal: Optional[int], last_output: Optional[str]
    ) -> None:
        """The process has exited and been reaped."""


class _Lines:
    """Split a byte stream into decoded lines, bounding what one line may hold."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            complete.append(self._buffer[:MAX_LINE])
            self._buffer = b""
        return [line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r") for line in complete]

    def rest(self) -> list[str]:
        rest, self._buffer = self._buffer, b""
        return [rest.decode("utf-8", "replace")] if rest else []


class BackupClientProtocol(ProcessProtocol):
    """Lines in, events and the exit out; nothing else."""

    log = Logger()

    def __init__(
        self,
        job_id: str,
        observer: IClientObserver,
        job_log: JobLog,
        stdout_parser: ILineParser,
        stderr_parser: Optional[ILineParser],
        secrets: Sequence[str] = (),
    ) -> None:
        self.job_id = job_id
        # A client may echo its password (in an error, a URL, a traceback), escaped
        # or quoted: every line is masked before it is logged, parsed or kept.
        self._mask = Masker(secrets)
        self._observer = observer
        self._job_log = job_log
        self._parsers = {"stdout": stdout_parser, "stderr": stderr_parser}
        self._lines = {"stdout": _Lines(), "stderr": _Lines()}
        self.last_output: Optional[str] = None
        self.last_error_line: Optional[str] = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        self._received("stderr", data)

    def _received(self, stream: str, data: bytes) -> None:
        for line in self._lines[stream].feed(data):
            self._line(stream, line)

    def _line(self, stream: str, line: str) -> None:
        try:
            self._handle(stream, line)
        except Exception:
            # Raised into the reactor, it would close the child's pipe and the job
            # would never hear of its end: this line is lost, not the job.
            self.log.failure(
                "job {job_id}: handling a line of the backup client's {stream}",
                job_id=self.job_id,
                stream=stream,
            )

    def _handle(self, stream: str, line: str) -> None:
        line = self._mask(line)
        self._job_log.write(stream, line)
        parser = self._parsers[stream]
        if parser is not None:
            for event in parser.parse(line):
                self._observer.event_received(self._masked(event))
        if stream == "stderr" and line.strip():
            self.last_output = line.strip()
            if _ERROR_LINE.search(line):
                self.last_error_line = self.last_output

    def _masked(self, event: events.Event) -> events.Event:
        """``event`` with its text masked again, as the parser decoded it from the line."""
        if not self._mask:
            return event
        changes = {}
        for field in attrs.fields(type(event)):
            value = getattr(event, field.name)
            if isinstance(value, str) and (masked := self._mask(value)) != value:
                changes[field.name] = masked
        if not changes:
            return event
        masked_event: events.Event = attrs.evolve(cast(Any, event), **changes)
        return masked_event

    def processEnded(self, reason: Failure) -> None:
        exit_code: Optional[int] = None
        exit_signal: Optional[int] = None
        if reason.check(ierror.ProcessDone):
            exit_code = 0
        elif isinstance(reason.value, ierror.ProcessTerminated):
            exit_code = reason.value.exitCode
            exit_signal = reason.value.signal
        for stream, lines in self._lines.items():
            for line in lines.rest():
                self._line(stream, line)
        # Only what is known of the end: an exit code or a signal, never "None".
        ended = [f"exit_code={exit_code}"] if exit_code is not None else []
        if exit_signal is not None:
            ended.append(f"signal={exit_signal}")
        # The job log never raises: a full disk costs lines, not the job's end.
        self._job_log.write("sna", "process ended: " + (" ".join(ended) or "no exit status"))
        self._job_log.close()
        self.log.info(
            "backup client of job {job_id} ended: {how}",
            job_id=self.job_id,
            exit_code=exit_code,
            exit_signal=exit_signal,
            how=f"exit code {exit_code}"
            if exit_code is not None
            else (f"signal {exit_signal}" if exit_signal is not None else "no exit status"),
        )
        # A killed client did not choose its last words: only an error line explains it.
        last = self.last_error_line
        if exit_signal is None:
            last = last or self.last_output
        try:
            self._observer.process_ended(exit_code, exit_signal, last)
        except Exception:
            self.log.failure("job {job_id}: telling the end of its client", job_id=self.job_id)
        finally:
            self.ended.callback(None)
