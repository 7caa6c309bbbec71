"""Starting, watching and stopping one backup-client process per job.

:class:`ClientCommand` is what to run (the ``--sbc`` command) and how the
request becomes argv and environment.  :class:`BackupClientProtocol` is a thin
adapter: it splits the child's two streams into lines, writes them with a
timestamp to ``backup-{job_id}.log``, parses them into events and hands
events and the exit to an :class:`IClientObserver`.  :class:`ClientProcess`
stops a child procmon-style: TERM, then KILL after a grace period.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Optional

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from sna.contract import argv as cli
from sna.contract import ids, standby
from sna.jobs.model import BackupRequest
from sna.sbc import events
from sna.sbc.parse import ILineParser, parser_for
from sna.sbc.spare import SparePool

PASSWORD_ENV = cli.PASSWORD_ENV

#: Variables of the daemon's own environment a client may need; nothing else is passed.
PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "SHA_API_URL",
)

#: Lines that say what went wrong, preferred over the last line (a Go panic is
#: followed by its goroutine dump, a cobra error by the usage text).
_ERROR_LINE = re.compile(
    r"^(panic: |fatal error: |Error: |Traceback |[A-Za-z_.]*(Error|Exception): )"
    r"|level=(error|fatal|panic)\b"
)

#: What a secret is replaced with wherever it would be shown.
MASK = "********"

#: Lines longer than this are cut: a runaway child must not grow our memory.
MAX_LINE = 64 * 1024


class ClientUnavailable(Exception):
    """The configured backup client cannot be run; the message says why."""


class IClientObserver(Interface):
    """Told what one backup-client process does."""

    def event_received(event: events.Event) -> None:
        """The client reported ``event``."""

    def process_ended(
        exit_code: Optional[int], exit_signal: Optional[int], last_output: Optional[str]
    ) -> None:
        """The process has exited and been reaped."""


@attrs.frozen
class ClientCommand:
    """The backup-client command line, from ``--sbc`` and ``--sbc-legacy``."""

    argv: tuple[str, ...]
    legacy: bool = False
    #: vCenter TLS for our client: no verification (--vcenter-insecure), extra CAs.
    insecure: bool = False
    ca_file: Optional[str] = None

    @classmethod
    def parse(cls, command: str, legacy: bool = False) -> ClientCommand:
        argv = tuple(shlex.split(command))
        if not argv:
            raise ValueError("the backup-client command is empty")
        return cls(argv, legacy)

    def executable(self) -> str:
        """The absolute path of the program, or :class:`ClientUnavailable`."""
        program = self.argv[0]
        if os.sep in program:
            path = os.path.abspath(program)
            if not os.path.exists(path):
                raise ClientUnavailable(f"backup client {path} does not exist")
            if os.path.isdir(path) or not os.access(path, os.X_OK):
                raise ClientUnavailable(f"backup client {path} is not an executable file")
            return path
        found = shutil.which(program)
        if found is None:
            # Installed beside the daemon (the same venv's bin/), even when that
            # directory is not on PATH, as under `make run`.
            beside = os.path.join(os.path.dirname(sys.executable), program)
            if os.access(beside, os.X_OK) and not os.path.isdir(beside):
                return beside
            raise ClientUnavailable(f"backup client {program!r} was not found on PATH")
        return os.path.abspath(found)

    def job(self, request: BackupRequest) -> cli.JobArguments:
        """What the client is told of ``request`` (and of this daemon's vCenter TLS)."""
        return cli.JobArguments(
            endpoint=request.vcenter_host,
            user=request.vcenter_user,
            password=request.vcenter_password,
            vm_path=request.vm_path,
            targets=request.targets,
            job_id=request.job_id,
            backup_type=request.backup_type,
            previous_change_id=request.previous_change_id,
            previous_change_ids=request.previous_change_ids,
            previous_capacities=request.previous_capacities,
            thumbprint=request.vcenter_thumbprint,
            ca_file=self.ca_file,
            insecure=self.insecure,
        )

    def arguments(self, request: BackupRequest) -> list[str]:
        """argv after the program: the ``--sbc`` words, then :func:`sna.contract.argv.build`."""
        return [*self.argv[1:], *cli.build(self.job(request), self.legacy)]

    @staticmethod
    def base_environment(base: Mapping[str, str]) -> dict[str, str]:
        """What every client gets of the daemon's environment (a spare gets only this)."""
        env = {key: base[key] for key in PASSED_ENV if key in base}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return env

    def environment(self, request: BackupRequest, base: Mapping[str, str]) -> dict[str, str]:
        env = self.base_environment(base)
        env.update(cli.environment(self.job(request), self.legacy))
        return env


class JobLog:
    """A job's log (:func:`sna.contract.ids.log_file_name`): every line of both
    streams, timestamped, appended."""

    def __init__(self, path: FilePath[str], now: Callable[[], datetime]) -> None:
        self.path = path
        self._now = now
        self._file: Optional[IO[bytes]] = open(path.path, "ab")

    def write(self, stream: str, line: str) -> None:
        if self._file is None:
            return
        stamp = self._now().astimezone(UTC).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        self._file.write(f"{stamp} {stream} {line}\n".encode("utf-8", "replace"))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogDirectory:
    """Where job logs go: the preferred directory, else one under the state dir."""

    log = Logger()

    def __init__(self, preferred: FilePath[str], fallback: FilePath[str]) -> None:
        self.preferred = preferred
        self.fallback = fallback
        self.current = preferred

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
        # A client may echo its password (in an error, a URL, a traceback): every
        # line is masked before it is logged, parsed or kept.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
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
        for line in self._lines["stdout"].feed(data):
            self._line("stdout", line)

    def errReceived(self, data: bytes) -> None:
        for line in self._lines["stderr"].feed(data):
            self._line("stderr", line)

    def _line(self, stream: str, line: str) -> None:
        for secret in self._secrets:
            line = line.replace(secret, MASK)
        self._job_log.write(stream, line)
        parser = self._parsers[stream]
        if parser is not None:
            for event in parser.parse(line):
                self._observer.event_received(event)
        if stream == "stderr" and line.strip():
            self.last_output = line.strip()
            if _ERROR_LINE.search(line):
                self.last_error_line = self.last_output

    def processEnded(self, reason: Failure) -> None:
        for stream, lines in self._lines.items():
            for line in lines.rest():
                self._line(stream, line)
        exit_code: Optional[int] = None
        exit_signal: Optional[int] = None
        if reason.check(ierror.ProcessDone):
            exit_code = 0
        elif isinstance(reason.value, ierror.ProcessTerminated):
            exit_code = reason.value.exitCode
            exit_signal = reason.value.signal
        self._job_log.write("sna", f"process ended: exit_code={exit_code} signal={exit_signal}")
        self._job_log.close()
        self.log.info(
            "backup client of job {job_id} ended: exit code {exit_code}, signal {exit_signal}",
            job_id=self.job_id,
            exit_code=exit_code,
            exit_signal=exit_signal,
        )
        try:
            self._observer.process_ended(
                exit_code, exit_signal, self.last_error_line or self.last_output
            )
        finally:
            self.ended.callback(None)


class ClientProcess:
    """A running backup client: its pid, and stopping it TERM-then-KILL."""

    log = Logger()

    def __init__(
        self,
        transport: IProcessTransport,
        protocol: BackupClientProtocol,
        clock: IReactorTime,
        spare_id: Optional[str] = None,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._clock = clock
        self._kill_call: Optional[IDelayedCall] = None
        self.pid: int = transport.pid or 0
        #: A spare's ``--spare-id``: what names the process when its argv does not name the job.
        self.spare_id = spare_id
        self.running = True
        protocol.ended.addBoth(self._ended)

    def _ended(self, result: object) -> object:
        self.running = False
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        return result

    def _signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except ierror.ProcessExitedAlready:
            pass

    def stop(self, grace: float) -> Deferred[None]:
        """SIGTERM now, SIGKILL if still running after ``grace`` seconds; fires once reaped."""
        if not self.running:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._protocol.ended.addBoth(lambda _: done.callback(None))
        if self._kill_call is None:
            self.log.info("stopping backup client pid {pid} (TERM)", pid=self.pid)
            self._signal("TERM")
            self._kill_call = self._clock.callLater(grace, self._kill)
        return done

    def _kill(self) -> None:
        self.log.warn("backup client pid {pid} ignored TERM; sending KILL", pid=self.pid)
        self._signal("KILL")


class IProcessLauncher(Interface):
    """Starts backup clients."""

    def check() -> None:
        """Raise :class:`ClientUnavailable` if no client can be started now."""

    def launch(request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        """Start the client for ``request``; raise :class:`ClientUnavailable` if it cannot be."""


@implementer(IProcessLauncher)
class ProcessLauncher:
    """The real launcher: ``reactor.spawnProcess`` with an explicit argv and environment."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        command: ClientCommand,
        log_dir: LogDirectory,
        now: Callable[[], datetime],
        environ: Optional[Mapping[str, str]] = None,
        spares: int = 0,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.command = command
        self._log_dir = log_dir
        self._now = now
        self._environ = dict(os.environ if environ is None else environ)
        #: Clients started ahead of jobs (our client only, never the legacy one);
        #: a service for the caller to start.
        self.spares: Optional[SparePool] = None
        if spares > 0 and not command.legacy:
            self.spares = SparePool(
                reactor,
                clock,
                command.executable,
                command.argv[1:],
                command.base_environment(self._environ),
                size=spares,
            )

    def check(self) -> None:
        self.command.executable()

    def log_path(self, job_id: str) -> FilePath[str]:
        return self._log_dir.current.child(ids.log_file_name(job_id))

    def launch(self, request: BackupRequest, observer: IClientObserver) -> ClientProcess:
        executable = self.command.executable()
        if self.command.legacy and (request.previous_change_ids or request.vcenter_thumbprint):
            self.log.warn(
                "job {job_id}: the legacy client takes no per-disk change IDs and no "
                "vCenter thumbprint; they are not passed on",
                job_id=request.job_id,
            )
        args = [executable, *self.command.arguments(request)]
        env = self.command.environment(request, self._environ)
        log_path = self.log_path(request.job_id)
        new_log = not log_path.exists()
        try:
            job_log = JobLog(log_path, self._now)
        except OSError as e:
            raise ClientUnavailable(f"cannot open the job log: {e.strerror}") from e
        spare = self.spares.take() if self.spares is not None else None
        try:
            if spare is not None:
                job_log.write(
                    "sna",
                    f"starting {self._shown(args, request)} in spare client pid {spare.pid} "
                    f"(started {self._clock.seconds() - spare.started:.1f} s ago)",
                )
            else:
                job_log.write("sna", f"starting {self._shown(args, request)}")
        except OSError as e:
            job_log.close()
            if spare is not None:
                spare.stop(self._clock)  # not handed a job: it exits
            raise ClientUnavailable(f"cannot write the job log: {e.strerror}") from e
        if spare is not None:
            base = self.command.base_environment(self._environ)
            added = {k: v for k, v in env.items() if base.get(k) != v}
        legacy = self.command.legacy
        parser = parser_for(legacy)
        protocol = BackupClientProtocol(
            request.job_id,
            observer,
            job_log,
            parser,
            parser if legacy else None,
            secrets=(request.vcenter_password,),
        )
        if spare is not None:
            # The spare was started with the command's own arguments; the job's follow them.
            transport = spare.hand_over(args[len(self.command.argv) :], added, protocol)
            process = ClientProcess(transport, protocol, self._clock, spare.spare_id)
            job_log.write("sna", f"pid {process.pid}")
            self.log.info(
                "job {job_id}: handed to spare backup client pid {pid}",
                job_id=request.job_id,
                pid=process.pid,
            )
            return process
        try:
            transport = self._reactor.spawnProcess(protocol, executable, args, env=env, path=None)
        except OSError as e:
            job_log.close()
            if new_log:
                # No job exists: leave no log claiming one did.
                log_path.remove()
            raise ClientUnavailable(f"cannot start backup client {executable}: {e}") from e
        process = ClientProcess(transport, protocol, self._clock)
        job_log.write("sna", f"pid {process.pid}")
        self.log.info(
            "job {job_id}: started backup client pid {pid}", job_id=request.job_id, pid=process.pid
        )
        return process

    @staticmethod
    def _shown(args: Sequence[str], request: BackupRequest) -> str:
        """The command line as it may be logged: the password masked."""
        password = request.vcenter_password

        def shown(word: str) -> str:
            name, sep, value = word.partition("=")
            if word == password:
                return MASK
            if sep and name.startswith("--") and value == password:
                return f"{name}={MASK}"
            return word

        return shlex.join(shown(a) for a in args)


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
    log = Logger()
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
