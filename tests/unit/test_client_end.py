"""How a client's end is told: a killed client's reason, and an end that always arrives,
whatever its job log or its observer run into."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from twisted.internet import error as ierror
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from sna.jobs.model import JobStatus
from sna.sbc import events, joblog
from sna.sbc.joblog import JobLog
from sna.sbc.parse import JsonLineParser
from sna.sbc.protocol import BackupClientProtocol, IClientObserver
from sna.testing import fixed_now
from tests.unit.conftest import Harness, started
from tests.unit.test_process import REQUEST, Recorder, make_protocol

KILLED = Failure(ierror.ProcessTerminated(exitCode=None, signal=9))


@pytest.mark.parametrize(
    "stderr",
    [
        b"sbc-double: stalled, waiting for a signal\n",
        b"INFO:sna.backup:copying disk 2000\n",
        b'time="2026-11-26T12:00:00Z" level=info msg="Starting parallel full copy"\n',
    ],
)
def test_a_killed_client_is_not_explained_by_an_info_line(tmp_path: Path, stderr: bytes) -> None:
    protocol, recorder, _ = make_protocol(tmp_path)
    protocol.errReceived(stderr)
    protocol.processEnded(KILLED)
    assert recorder.ended == (None, 9, None)


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (b"Error: NBD write failed\nsbc: retrying\n", "Error: NBD write failed"),
        (
            b"ERROR:sna.backup.job:vCenter gone\nINFO:x:waiting\n",
            "ERROR:sna.backup.job:vCenter gone",
        ),
        (
            b'time="t" level=error msg="disk read failed"\ntime="t" level=info msg="retry"\n',
            'time="t" level=error msg="disk read failed"',
        ),
    ],
)
def test_a_killed_client_is_explained_by_its_last_error_line(
    tmp_path: Path, stderr: bytes, reason: str
) -> None:
    protocol, recorder, _ = make_protocol(tmp_path)
    protocol.errReceived(stderr)
    protocol.processEnded(KILLED)
    assert recorder.ended == (None, 9, reason)


def test_the_job_of_a_killed_client_says_the_signal_only(harness: Harness) -> None:
    started(harness.manager, REQUEST)
    transport = harness.launcher.transports[REQUEST.job_id]
    transport.protocol.errReceived(b"sbc-double: stalled, waiting for a signal\n")
    transport.exit(signal=9)
    job = harness.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.FAILED
    assert job.error == "backup client was killed by signal 9"


def test_a_client_that_exits_with_a_code_is_still_explained_by_its_last_line(
    tmp_path: Path,
) -> None:
    protocol, recorder, _ = make_protocol(tmp_path)
    protocol.errReceived(b"could not reach vcenter.example.local\n")
    protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=4)))
    assert recorder.ended == (4, None, "could not reach vcenter.example.local")


@implementer(IClientObserver)
class Broken(Recorder):
    """An observer that fails on each event and at the end (after recording them)."""

    def event_received(self, event: events.Event) -> None:
        super().event_received(event)
        raise OSError(errno.ENOSPC, "No space left on device")

    def process_ended(
        self, exit_code: int | None, exit_signal: int | None, last: str | None
    ) -> None:
        super().process_ended(exit_code, exit_signal, last)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_nothing_an_observer_raises_escapes_the_protocol(tmp_path: Path) -> None:
    observer = Broken()
    protocol = BackupClientProtocol(
        "j",
        observer,
        JobLog(FilePath(str(tmp_path / "backup-j.log")), fixed_now),
        JsonLineParser(),
        None,
    )
    with capturedLogs() as logged:
        protocol.outReceived(b'{"event":"phase","phase":"a"}\n{"event":"phase","phase":"b"}\n')
        protocol.processEnded(Failure(ierror.ProcessDone(0)))
    assert [e.phase for e in observer.events if isinstance(e, events.Phase)] == ["a", "b"]
    assert observer.ended == (0, None, None)
    assert protocol.ended.called
    assert sum(1 for e in logged if e.get("log_failure") is not None) == 3


def test_a_job_log_the_disk_refuses_costs_lines_never_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full disk itself is tests/integration/test_full_disk.py; here os.write refuses."""
    protocol, recorder, log = make_protocol(tmp_path)
    real_write = os.write

    def refused(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(joblog.os, "write", refused)
    line = {"event": "disk_done", "disk_key": "2000", "change_id": "c/1"}
    protocol.outReceived(json.dumps(line).encode() + b"\n")
    protocol.errReceived(b"Error: lost\n")
    protocol.processEnded(Failure(ierror.ProcessDone(0)))
    monkeypatch.setattr(joblog.os, "write", real_write)
    assert recorder.events == [events.DiskDone("2000", change_id="c/1")]
    assert recorder.ended == (0, None, "Error: lost")
    assert protocol.ended.called
    assert log.read_text() == ""
