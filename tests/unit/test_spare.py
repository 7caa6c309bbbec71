"""Spare clients: the standby handshake, the pool's life cycle, the launcher's handover."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from sna.contract import standby
from sna.sbc.command import ClientCommand
from sna.sbc.joblog import JobLog, LogDirectory
from sna.sbc.launcher import JobLogUnwritable, ProcessLauncher
from sna.sbc.spare import MAX_AGE, MAX_FAILURES, RETRY_DELAY, STOP_GRACE, SparePool
from sna.testing import FakeProcessReactor, FakeProcessTransport, fixed_now
from tests.unit.test_process import REQUEST, Recorder

READY = standby.READY_LINE + b"\n"


def pool_of(reactor: FakeProcessReactor, size: int = 1) -> SparePool:
    pool = SparePool(reactor, reactor, lambda: "/opt/sbc", ("--flag",), {"PATH": "/bin"}, size=size)
    pool.startService()
    return pool


def ready(transport: FakeProcessTransport) -> None:
    transport.protocol.childDataReceived(1, READY)


# -- the handshake ---------------------------------------------------------------------------


def test_a_job_line_round_trips() -> None:
    line = standby.encode_job(["migrate", "--job-id", "j ö"], {"SNA_VCENTER_PASSWORD": "p w"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert standby.decode_job(line) == (
        ["migrate", "--job-id", "j ö"],
        {"SNA_VCENTER_PASSWORD": "p w"},
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
        (b'{"env": {}}\n', '"argv" must be a list of strings'),
        (b'{"argv": ["a", 1]}\n', '"argv" must be a list of strings'),
        (b'{"argv": [], "env": {"A": 1}}\n', '"env" must be an object of strings'),
        (b"\xff\n", "not JSON"),
        (b'{"argv": []}' + b" " * standby.MAX_JOB_LINE, "longer than"),
    ],
)
def test_a_bad_job_line_says_why(line: bytes, message: str) -> None:
    with pytest.raises(standby.HandoverError, match=message):
        standby.decode_job(line)


# -- the pool --------------------------------------------------------------------------------


def test_a_spare_is_started_with_no_job_and_only_the_base_environment() -> None:
    reactor = FakeProcessReactor()
    pool = pool_of(reactor)
    [(transport, args, env)] = reactor.spawned
    assert args[:4] == ["/opt/sbc", "--flag", "standby", "--spare-id"]
    assert len(args) == 5 and args[4] == pool.spares[0].spare_id
    assert env == {"PATH": "/bin"}
    assert not transport.stdin_closed, "the job comes over stdin"
    assert pool.take() is None, "not ready yet"


def test_a_ready_spare_is_handed_out_once_and_replaced() -> None:
    reactor = FakeProcessReactor()
    pool = pool_of(reactor)
    first = reactor.spawned[0][0]
    ready(first)
    spare = pool.take()
    assert spare is not None and spare.transport is first
    assert len(reactor.spawned) == 1, "not before the job is handed over"
    reactor.advance(0)
    assert len(reactor.spawned) == 2, "a replacement starts at once"
    assert pool.take() is None, "the replacement is not ready yet"
    ids = {a[4] for _, a, _ in reactor.spawned}
    assert len(ids) == 2, "every spare has its own id"


def test_a_spare_that_dies_before_it_is_ready_is_retried_then_given_up() -> None:
    reactor = FakeProcessReactor()
    pool = pool_of(reactor)
    for attempt in range(MAX_FAILURES):
        transport = reactor.spawned[-1][0]
        transport.protocol.childDataReceived(2, b"sbc: error: invalid choice: 'standby'\n")
        transport.exit(2)
        if attempt < MAX_FAILURES - 1:
            assert len(reactor.spawned) == attempt + 1, "not at once"
            reactor.advance(RETRY_DELAY)
            assert len(reactor.spawned) == attempt + 2
    reactor.advance(RETRY_DELAY * 10)
    assert len(reactor.spawned) == MAX_FAILURES
    assert pool.disabled == "sbc: error: invalid choice: 'standby'"
    assert pool.take() is None


def test_a_spare_that_dies_soon_after_ready_counts_as_a_failure() -> None:
    reactor = FakeProcessReactor()
    pool = pool_of(reactor)
    for n in range(MAX_FAILURES):
        transport = reactor.spawned[-1][0]
        ready(transport)
        transport.exit(1)  # crashes right after its ready line
        assert len(reactor.spawned) == n + 1, "not respawned in a tight loop"
        reactor.advance(RETRY_DELAY)
    assert pool.disabled is not None
    assert len(reactor.spawned) == MAX_FAILURES
    # Tried again much later: a fixed client is picked up without a restart.
    reactor.advance(MAX_AGE)
    assert pool.disabled is None and len(reactor.spawned) == MAX_FAILURES + 1


def test_a_long_waiting_spare_that_is_killed_is_replaced_at_once() -> None:
    reactor = FakeProcessReactor()
    pool = pool_of(reactor)
    reactor.spawned[0][0].exit(1)  # one early failure
    reactor.advance(RETRY_DELAY)
    ready(reactor.spawned[1][0])
    reactor.advance(MAX_AGE / 2)
    reactor.spawned[1][0].exit(signal=9)
    assert len(reactor.spawned) == 3, "replaced at once"
    assert pool.disabled is None


def test_output_other_than_the_ready_line_stops_the_spare() -> None:
    reactor = FakeProcessReactor(dies_on=("KILL",))
    pool = pool_of(reactor)
    transport = reactor.spawned[0][0]
    transport.protocol.childDataReceived(1, b"Traceback (most recent call last):\n")
    transport.protocol.childDataReceived(1, b'  File "x.py", line 1\n')
    assert transport.stdin_closed
    assert pool.take() is None
    reactor.advance(STOP_GRACE)
    assert transport.signals == ["TERM"], "it lingered after end of file"
    reactor.advance(STOP_GRACE)
    assert transport.signals == ["TERM", "KILL"]
    assert pool._failures == 1, "it never became ready: a failure"


def test_an_unused_spare_is_retired() -> None:
    reactor = FakeProcessReactor(dies_on=("KILL",))
    pool = pool_of(reactor)
    first = reactor.spawned[0][0]
    ready(first)
    reactor.advance(MAX_AGE)
    assert first.stdin_closed, "end of file: not needed"
    assert len(reactor.spawned) == 2
    done: list[object] = []
    pool.stopService().addBoth(done.append)
    assert not done, "shutdown waits for the retired spare too"
    reactor.advance(2 * STOP_GRACE)
    assert first.signals == ["TERM", "KILL"]
    assert done


def test_a_missing_client_is_retried_later() -> None:
    reactor = FakeProcessReactor()
    missing = [True]

    def executable() -> str:
        if missing[0]:
            raise FileNotFoundError("backup client /opt/sbc does not exist")
        return "/opt/sbc"

    pool = SparePool(reactor, reactor, executable, (), {}, size=1)
    pool.startService()
    assert reactor.spawned == []
    missing[0] = False
    reactor.advance(RETRY_DELAY)
    assert len(reactor.spawned) == 1


# -- the launcher ----------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[tuple[ProcessLauncher, FakeProcessReactor]]:
    reactor = FakeProcessReactor()
    logs = LogDirectory(FilePath(str(tmp_path)), FilePath(str(tmp_path)))
    command = ClientCommand.parse(sys.executable + " -u client.py")
    launcher = ProcessLauncher(
        reactor, reactor, command, logs, fixed_now, environ={"PATH": "/bin", "X": "y"}, spares=1
    )
    assert launcher.spares is not None
    launcher.spares.startService()
    yield launcher, reactor
    launcher.spares.stopService()


def test_a_job_goes_to_a_ready_spare_over_its_stdin(
    launcher: tuple[ProcessLauncher, FakeProcessReactor], tmp_path: Path
) -> None:
    launch, reactor = launcher
    spare_transport, spare_args, _ = reactor.spawned[0]
    ready(spare_transport)
    observer = Recorder()
    process = launch.launch(REQUEST, observer)

    assert process.pid == spare_transport.pid
    assert process.spare_id == spare_args[-1]
    argv, env = standby.decode_job(spare_transport.value())
    spawned_argv = launch.command.arguments(REQUEST)
    prefix = len(launch.command.argv) - 1  # "-u client.py": the spare was started with them
    assert argv == spawned_argv[prefix:]
    assert argv[0] == "migrate"
    assert env == {"MIGRATEKIT_JOB_ID": "backup-vm-1", "SNA_VCENTER_PASSWORD": "pa55 word"}
    assert spare_transport.stdin_closed, "one job per spare"
    reactor.advance(0)
    assert len(reactor.spawned) == 2, "a new spare replaces it"

    # From now on the spare's output and exit are the job's.
    spare_transport.protocol.childDataReceived(
        1, b'{"event":"phase","phase":"prepare","message":"hi"}\n'
    )
    assert [type(e).__name__ for e in observer.events] == ["Phase"]
    spare_transport.exit(0)
    assert observer.ended == (0, None, None)
    log_text = (tmp_path / "backup-backup-vm-1.log").read_text()
    assert f"in spare client pid {process.pid}" in log_text
    assert "pa55 word" not in log_text


def test_without_a_ready_spare_the_job_spawns_its_own(
    launcher: tuple[ProcessLauncher, FakeProcessReactor],
) -> None:
    launch, reactor = launcher
    process = launch.launch(REQUEST, Recorder())
    assert len(reactor.spawned) == 2
    transport, args, env = reactor.spawned[1]
    assert process.pid == transport.pid and process.spare_id is None
    assert "--job-id=backup-vm-1" in args and env["SNA_VCENTER_PASSWORD"] == "pa55 word"


def test_the_legacy_client_has_no_spares(tmp_path: Path) -> None:
    reactor = FakeProcessReactor()
    logs = LogDirectory(FilePath(str(tmp_path)), FilePath(str(tmp_path)))
    command = ClientCommand.parse("/opt/migratekit", legacy=True)
    assert ProcessLauncher(reactor, reactor, command, logs, fixed_now, spares=2).spares is None


def test_a_job_log_that_cannot_be_written_gives_the_spare_back(
    launcher: tuple[ProcessLauncher, FakeProcessReactor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    launch, reactor = launcher
    transport = reactor.spawned[0][0]
    ready(transport)

    def full(self: JobLog, stream: str, line: str) -> None:
        self.problem = f"cannot write the job log {self.path.path}: No space left on device"

    monkeypatch.setattr(JobLog, "write", full)
    with pytest.raises(JobLogUnwritable, match="No space left on device"):
        launch.launch(REQUEST, Recorder())
    assert not transport.stdin_closed and transport.value() == b"", "no job, still waiting"
    assert not (tmp_path / "backup-backup-vm-1.log").exists()
    reactor.advance(0)
    assert len(reactor.spawned) == 1, "it is the pool's again: no replacement"
    monkeypatch.undo()
    assert launch.launch(REQUEST, Recorder()).pid == transport.pid


def test_a_spare_that_ended_unnoticed_is_not_handed_out(
    launcher: tuple[ProcessLauncher, FakeProcessReactor],
) -> None:
    launch, reactor = launcher
    transport = reactor.spawned[0][0]
    ready(transport)
    transport.protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=1)))
    process = launch.launch(REQUEST, Recorder())
    assert process.spare_id is None
