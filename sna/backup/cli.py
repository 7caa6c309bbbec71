"""``sendense-backup-client``: the process around one :class:`~sna.backup.job.BackupJob`.

``main`` parses argv (:mod:`sna.backup.options`), sends human logs to stderr
(with the password masked, never on stdout), runs the job under
``twisted.internet.task.react`` and turns SIGTERM and SIGINT into a
cancellation that still removes the snapshot.  Exit status: 0 only when
every disk is done and the snapshot is gone; 2 for a usage error; 1 for any
other failure; 143 after SIGTERM and 130 after SIGINT.

It owns the process-wide things (reactor, signal handlers, log observers)
and nothing of the backup logic.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import IO, Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from zope.interface import implementer

from sna.backup.events import EventWriter, mask
from sna.backup.job import BackupJob
from sna.backup.options import PASSWORD_ENV, JobOptions, UsageError, parse_args
from sna.backup.reactor import ClientReactor
from sna.contract import standby

EXIT_USAGE = 2


@implementer(ILogObserver)
class StderrObserver:
    """Classic one-line log text on a stream, with secrets masked."""

    def __init__(self, stream: IO[str], secrets: Sequence[str]) -> None:
        self._stream = stream
        self._secrets = [s for s in secrets if s]

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if not text:
            return
        try:
            self._stream.write(mask(text, self._secrets))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing better to do with a log line


#: Twisted's own info chatter (factories starting and stopping, the main loop
#: ending), which says nothing about the backup; shown with --debug.
NOISY_NAMESPACES = (
    "twisted.internet.endpoints",
    "twisted.web.client",
    "twisted.internet.base",
)


@implementer(ILogFilterPredicate)
class QuietTwisted:
    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        namespace = str(event.get("log_namespace", ""))
        level = event.get("log_level", LogLevel.info)
        quiet = level <= LogLevel.info and namespace.startswith(NOISY_NAMESPACES)
        result: PredicateResult = PredicateResult.no if quiet else PredicateResult.maybe
        return result


def start_logging(debug: bool, secrets: Sequence[str]) -> None:
    level = LogLevel.debug if debug else LogLevel.info
    predicates: list[ILogFilterPredicate] = [LogLevelFilterPredicate(defaultLogLevel=level)]
    if not debug:
        predicates.append(QuietTwisted())
    observer = FilteringLogObserver(StderrObserver(sys.stderr, secrets), predicates)
    # redirectStandardIO=False: stdout is the event stream and must stay untouched.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    # pyVmomi and urllib3 log through the standard library.
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.WARNING)


def _run(reactor: object, options: JobOptions, events: EventWriter) -> Deferred[None]:
    client = ClientReactor.of(reactor)
    job = BackupJob(client, options, events)

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        client.threads.callFromThread(job.cancel, f"received {name}", 128 + signum)

    def install() -> None:
        # After the reactor's own handlers (installed at startup), so ours win:
        # the reactor must not stop before the snapshot is removed.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    IReactorCore(reactor).callWhenRunning(install)

    async def main() -> None:
        status = await job.run()
        if status:
            raise SystemExit(status)

    return Deferred.fromCoroutine(main())


def _is_standby(args: Sequence[str]) -> bool:
    """``[OPTIONS...] standby --spare-id ID``: the daemon puts these three last."""
    return len(args) >= 3 and list(args[-3:-1]) == [standby.COMMAND, standby.SPARE_ID_OPTION]


def _standby() -> Optional[tuple[list[str], dict[str, str]]]:
    """Wait, fully imported, for the daemon's job on stdin (:mod:`sna.contract.standby`).

    Returns the job's argv and added environment, or ``None`` at end of file
    (the spare was not needed).  Until a job arrives SIGINT ends the process
    quietly: there is nothing to clean up yet.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # The reactor is what react() would import first; a spare has it ready.
    from twisted.internet import reactor  # noqa: F401

    sys.stdout.buffer.write(standby.READY_LINE + b"\n")
    sys.stdout.buffer.flush()
    line = sys.stdin.buffer.readline(standby.MAX_JOB_LINE + 1)
    if not line:
        return None
    try:
        return standby.decode_job(line)
    except standby.HandoverError as e:
        raise UsageError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    if _is_standby(args):
        try:
            job = _standby()
        except UsageError as e:
            sys.stderr.write(f"sendense-backup-client: error: {e}\n")
            EventWriter(sys.stdout.buffer).error(f"usage: {e}")
            _exit_now(EXIT_USAGE)
            return
        if job is None:
            _exit_now(0)
            return
        # Words of --sbc before "standby" come before the job's argv, as they would.
        job_args, added = job
        args = [*args[:-3], *job_args]
        environ.update(added)
        # As a client started for the job would have them (nbdkit inherits them),
        # all but the password, which stays out of this process's environment.
        os.environ.update({k: v for k, v in added.items() if k != PASSWORD_ENV})
    password = environ.get(PASSWORD_ENV, "")
    events = EventWriter(sys.stdout.buffer, secrets=[password])
    try:
        options = parse_args(args, environ)
    except UsageError as e:
        # Human logging is not set up yet: argparse's style, plus the event sna reads.
        sys.stderr.write(f"sendense-backup-client: error: {mask(str(e), [password])}\n")
        events.error(f"usage: {e}")
        raise SystemExit(EXIT_USAGE) from None
    events = EventWriter(sys.stdout.buffer, secrets=[options.password])
    start_logging(options.debug, [options.password])
    if options.password_from_argv:
        Logger("sna.backup.cli").warn(
            "the vCenter password came from --vmware-password, which every local user "
            "can read in the process list; pass it in {variable} instead",
            variable=PASSWORD_ENV,
        )
    try:
        react(_run, (options, events))
    except SystemExit as e:
        _exit_now(e.code)


def _exit_now(code: object) -> None:
    """Exit with ``code`` without the interpreter's teardown.

    By now the reactor has stopped, every connection is closed and the
    snapshot is handled; what is left is freeing modules and objects, which
    takes some 40 ms of a job's wall time (sna counts a job as running until
    its client has exited).  Only the standard streams need flushing.
    """
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        sys.stderr.write(code + "\n")  # what SystemExit("text") would have printed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
