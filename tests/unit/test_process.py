"""The launcher's command line and environment, and the ProcessProtocol adapter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import attrs
import pytest
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from sna.backup.options import parse_args
from sna.contract.argv import PASSWORD_ENV
from sna.jobs.leftovers import is_client_of
from sna.jobs.model import BackupRequest, NbdTarget
from sna.sbc import events
from sna.sbc.command import ClientCommand, ClientUnavailable
from sna.sbc.joblog import JobLog, LogDirectory
from sna.sbc.launcher import ProcessLauncher
from sna.sbc.parse import JsonLineParser
from sna.sbc.protocol import BackupClientProtocol, IClientObserver
from sna.testing import FakeProcessReactor, fixed_now

REQUEST = BackupRequest(
    job_id="backup-vm-1",
    vm_name="vm",
    vcenter_host="vcenter.example.local",
    vcenter_user="admin",
    vcenter_password="pa55 word",
    vm_path="/DC1/vm/vm",
    targets=(
        NbdTarget("2000", "127.0.0.1", 10100, "vm-disk0"),
        NbdTarget("2001", "127.0.0.1", 10101, "vm-disk1"),
    ),
    backup_type="incremental",
    previous_change_id="52 66/5440",
)


def test_our_client_gets_the_password_in_its_environment_only() -> None:
    command = ClientCommand.parse("/usr/bin/sendense-backup-client")
    args = command.arguments(REQUEST)
    assert not any("pa55 word" in a for a in args)
    assert args == [
        "migrate",
        "--vmware-endpoint=vcenter.example.local",
        "--vmware-username=admin",
        "--vmware-path=/DC1/vm/vm",
        "--nbd-targets=2000:nbd://127.0.0.1:10100/vm-disk0,2001:nbd://127.0.0.1:10101/vm-disk1",
        "--job-id=backup-vm-1",
        "--backup-type=incremental",
        "--previous-change-id=52 66/5440",
    ]
    env = command.environment(REQUEST, {"PATH": "/bin", "SECRET_TOKEN": "x", "HOME": "/root"})
    assert env == {
        "PATH": "/bin",
        "HOME": "/root",
        "MIGRATEKIT_JOB_ID": "backup-vm-1",
        PASSWORD_ENV: "pa55 word",
    }


@pytest.mark.parametrize(
    "job_id, user",
    [
        ("backup-SQL Server 01-1796166100", "administrator@vsphere.local"),
        ("-backup-starting-with-a-dash", "-admin"),
        ("backup-Büro (alt) v1.2-1796166100", "DOMAIN\\backup user"),
        ("backup-" + "x" * 236 + "-1796166100", "--vmware-path=/evil"),
    ],
)
def test_what_the_daemon_writes_our_client_reads_back(job_id: str, user: str) -> None:
    request = attrs.evolve(REQUEST, job_id=job_id, vcenter_user=user)
    command = ClientCommand.parse("/usr/bin/sendense-backup-client")
    environ = command.environment(request, {})
    options = parse_args(command.arguments(request), environ)
    assert (options.job_id, options.user, options.vm_path) == (job_id, user, "/DC1/vm/vm")
    assert options.password == "pa55 word" and not options.password_from_argv
    assert [t.disk_key for t in options.targets] == ["2000", "2001"]
    assert options.previous_change_id == "52 66/5440"


def test_the_legacy_client_gets_the_go_argv_as_one_word_per_flag() -> None:
    command = ClientCommand.parse("/usr/local/bin/migratekit", legacy=True)
    assert command.arguments(REQUEST) == [
        "migrate",
        "--vmware-endpoint=vcenter.example.local",
        "--vmware-username=admin",
        "--vmware-password=pa55 word",
        "--vmware-path=/DC1/vm/vm",
        "--nbd-targets=2000:nbd://127.0.0.1:10100/vm-disk0,2001:nbd://127.0.0.1:10101/vm-disk1",
        "--job-id=backup-vm-1",
    ]
    env = command.environment(REQUEST, {})
    assert PASSWORD_ENV not in env
    assert env["MIGRATEKIT_PREVIOUS_CHANGE_ID"] == "52 66/5440"


def test_command_prefix_arguments_come_first() -> None:
    command = ClientCommand.parse("python3 -u 'my client.py'")
    assert command.arguments(REQUEST)[:3] == ["-u", "my client.py", "migrate"]


def test_unavailable_clients(tmp_path: Path) -> None:
    with pytest.raises(ClientUnavailable, match="does not exist"):
        ClientCommand.parse(str(tmp_path / "nope")).executable()
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ClientUnavailable, match="not an executable file"):
        ClientCommand.parse(str(plain)).executable()
    with pytest.raises(ClientUnavailable, match="not found on PATH"):
        ClientCommand.parse("no-such-sbc-anywhere").executable()
    assert ClientCommand.parse("sh").executable().endswith("/sh")


@implementer(IClientObserver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[events.Event] = []
        self.ended: Optional[tuple[Optional[int], Optional[int], Optional[str]]] = None

    def event_received(self, event: events.Event) -> None:
        self.events.append(event)

    def process_ended(
        self, exit_code: Optional[int], exit_signal: Optional[int], last_output: Optional[str]
    ) -> None:
        self.ended = (exit_code, exit_signal, last_output)


def make_protocol(tmp_path: Path) -> tuple[BackupClientProtocol, Recorder, Path]:
    log = tmp_path / "backup-j.log"
    recorder = Recorder()
    protocol = BackupClientProtocol(
        "j", recorder, JobLog(FilePath(str(log)), fixed_now), JsonLineParser(), None
    )
    return protocol, recorder, log


def test_lines_split_across_reads(tmp_path: Path) -> None:
    protocol, recorder, log = make_protocol(tmp_path)
    line = json.dumps({"event": "disk_done", "disk_key": "2000", "change_id": "c/1"}).encode()
    protocol.outReceived(line[:10])
    assert recorder.events == []
    protocol.outReceived(line[10:] + b"\n" + b'{"event":"done"}')
    assert recorder.events == [events.DiskDone("2000", change_id="c/1")]
    protocol.errReceived(b"warn: slow\r\n")
    protocol.processEnded(Failure(ierror.ProcessDone(0)))
    # The last line had no newline: it still counts.
    assert recorder.events[-1] == events.Done()
    assert recorder.ended == (0, None, "warn: slow")
    text = log.read_text()
    assert "2026-11-26T12:00:00.000Z stdout {" in text
    assert "stderr warn: slow\n" in text
    assert "process ended: exit_code=0" in text


def test_a_password_the_client_echoes_is_masked(tmp_path: Path) -> None:
    log = tmp_path / "backup-j.log"
    recorder = Recorder()
    protocol = BackupClientProtocol(
        "j",
        recorder,
        JobLog(FilePath(str(log)), fixed_now),
        JsonLineParser(),
        None,
        secrets=("pa55 word",),
    )
    line = {"event": "error", "message": "login failed for admin/pa55 word"}
    protocol.outReceived(json.dumps(line).encode() + b"\n")
    protocol.errReceived(b"Error: bad password pa55 word\n")
    protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=1)))
    assert recorder.events == [events.Error("login failed for admin/********")]
    assert recorder.ended == (1, None, "Error: bad password ********")
    assert "pa55" not in log.read_text()


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (
            b"panic: interface conversion\n\ngoroutine 1 [running]:\nmain.go:412 +0x1c4\n",
            "panic: interface conversion",
        ),
        (b"Error: no VM at /DC/vm/x\nUsage:\n  migrate [flags]\n", "Error: no VM at /DC/vm/x"),
        (
            b"Traceback (most recent call last):\n  File x\nOSError: disk gone\n",
            "OSError: disk gone",
        ),
        (b"just some words\n", "just some words"),
    ],
)
def test_the_line_that_explains_a_failure(tmp_path: Path, stderr: bytes, reason: str) -> None:
    protocol, recorder, _ = make_protocol(tmp_path)
    protocol.errReceived(stderr)
    protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=2)))
    assert recorder.ended == (2, None, reason)


def test_killed_process(tmp_path: Path) -> None:
    protocol, recorder, _ = make_protocol(tmp_path)
    protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=None, signal=9)))
    assert recorder.ended == (None, 9, None)


def test_runaway_lines_are_cut(tmp_path: Path) -> None:
    protocol, _, log = make_protocol(tmp_path)
    protocol.outReceived(b"x" * (200 * 1024))
    protocol.processEnded(Failure(ierror.ProcessDone(0)))
    longest = max(len(line) for line in log.read_text().splitlines())
    assert longest < 70 * 1024


@pytest.mark.usefixtures("tmp_path")
def test_log_directory_falls_back(tmp_path: Path) -> None:
    logs = LogDirectory(FilePath("/proc/not/a/dir"), FilePath(str(tmp_path / "fallback")))
    assert logs.resolve().path == str(tmp_path / "fallback")
    assert (tmp_path / "fallback").is_dir()


def test_launcher_masks_the_password_in_the_job_log(tmp_path: Path) -> None:
    """A real spawn, through a fake reactor that records what it was asked to run."""
    reactor = FakeProcessReactor()
    logs = LogDirectory(FilePath(str(tmp_path)), FilePath(str(tmp_path)))
    command = ClientCommand.parse(sys.executable + " -u client.py", legacy=True)
    launcher = ProcessLauncher(reactor, reactor, command, logs, fixed_now, environ={})
    process = launcher.launch(REQUEST, Recorder())
    [(transport, args, _env)] = reactor.spawned
    assert process.pid == transport.pid
    assert args[0] == os.path.abspath(sys.executable)
    assert "--vmware-password=pa55 word" in args  # legacy: the Go client reads it from argv
    text = (tmp_path / "backup-backup-vm-1.log").read_text()
    assert "pa55 word" not in text
    assert "'--vmware-password=********'" in text


def test_is_client_of_reads_the_real_cmdline() -> None:
    assert not is_client_of(os.getpid(), "backup-vm-1")
    assert not is_client_of(2**22 + 12345, "backup-vm-1")
