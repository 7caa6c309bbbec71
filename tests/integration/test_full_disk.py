"""Storage runs out, on a real disk: the job manager, its SQLite store and its job logs on
small mounted filesystems that the tests fill, with the clients faked and time a Clock.

A write the disk refuses never leaves a job between states: it ends with its reason,
its relays close, a cancel signals its client; what it knew (its exit, its change IDs,
what the SHA must learn, in order) is kept in memory and written once there is room.
While anything cannot be written no job starts, and ``storage_problem`` says why.
Through a real daemon: ``test_full_disk_daemon.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath

from sna.config import Settings
from sna.contract.targets import NbdTarget
from sna.jobs.manager import WRITE_RETRY, JobManager, StorageUnavailable
from sna.jobs.model import BackupRequest, JobStatus
from sna.jobs.store import SQLiteJobStore
from sna.sbc.command import ClientCommand
from sna.sbc.joblog import JobLog, LogDirectory
from sna.sbc.launcher import JobLogUnwritable, ProcessLauncher
from sna.testing import (
    FakeGateway,
    FakeHub,
    FakeLauncher,
    FakeLeftoverClients,
    FakeProcessReactor,
    SteppingClock,
    failure_of,
    fixed_now,
    result_of,
)
from tests.integration.smallfs import fill, small_filesystem
from tests.unit.test_process import REQUEST, Recorder
from tests.unit.test_spare import ready

pytestmark = pytest.mark.integration

CHANGE_IDS = {"2000": "52 66 8c/5440", "2001": "52 66 8c/5441"}
OTHER = attrs.evolve(
    REQUEST,
    job_id="backup-vm-2",
    targets=(NbdTarget("2000", "127.0.0.1", 10102, "vm-disk0"),),
)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A state directory and a log directory, each on a small filesystem of its own."""
    with small_filesystem(tmp_path / "state") as state, small_filesystem(tmp_path / "log") as log:
        yield state, log


@attrs.define
class Wiring:
    state: Path
    log: Path
    clock: Clock
    store: SQLiteJobStore
    launcher: FakeLauncher
    gateway: FakeGateway
    hub: FakeHub
    manager: JobManager
    opened: list[SQLiteJobStore] = attrs.Factory(list)

    def start(self, request: BackupRequest = REQUEST) -> None:
        result_of(ensureDeferred(self.manager.start(request)))

    def say(self, request: BackupRequest, *lines: dict[str, object]) -> None:
        protocol = self.launcher.transports[request.job_id].protocol
        protocol.outReceived(b"".join(json.dumps(line).encode() + b"\n" for line in lines))

    def finish(self, request: BackupRequest = REQUEST) -> None:
        """The client reports each disk done with its change ID, and exits 0."""
        self.say(
            request,
            *(
                {"event": "disk_done", "disk_key": t.disk_key, "change_id": CHANGE_IDS[t.disk_key]}
                for t in request.targets
            ),
            {"event": "done"},
        )
        self.launcher.transports[request.job_id].protocol.errReceived(b"sbc: finished\n")
        self.launcher.transports[request.job_id].exit(0)

    def reopened(self) -> SQLiteJobStore:
        """The database as the next run of sna finds it."""
        self.opened.append(SQLiteJobStore(FilePath(str(self.state)).child("sna.sqlite")))
        return self.opened[-1]


@pytest.fixture
def wired(disks: tuple[Path, Path]) -> Iterator[Callable[[], Wiring]]:
    """Managers over ``disks``; their databases are closed before the disks are unmounted."""
    made: list[Wiring] = []

    def make() -> Wiring:
        made.append(wiring(*disks))
        return made[-1]

    yield make
    for w in made:
        w.manager.stop()  # its clients end, and their job logs close
        for store in (w.store, *w.opened):
            store.close()


def wiring(state: Path, log: Path) -> Wiring:
    clock = Clock()
    store = SQLiteJobStore(FilePath(str(state)).child("sna.sqlite"))
    launcher = FakeLauncher(clock, FilePath(str(log)))
    gateway = FakeGateway()
    hub = FakeHub()
    manager = JobManager(
        store,
        launcher,
        clock,
        Settings(kill_grace=5),
        SteppingClock(),
        gateway=gateway,
        hub=hub,
        leftovers=FakeLeftoverClients(),
    )
    manager.recover()
    return Wiring(state, log, clock, store, launcher, gateway, hub, manager)


# -- the log directory ------------------------------------------------------------------------


def test_a_log_disk_that_fills_mid_job_costs_lines_not_the_job(
    wired: Callable[[], Wiring],
) -> None:
    w = wired()
    w.start()
    w.say(REQUEST, {"event": "progress", "disk_key": "2000", "bytes_done": 5, "bytes_total": 10})
    filler = fill(w.log)
    # Each line from here on is refused by the disk; none of it may reach the reactor.
    w.finish()
    job = w.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.COMPLETED, job.error
    assert {d.disk_key: d.change_id for d in job.disks} == CHANGE_IDS
    assert w.gateway.open == {}, "its relays are closed"
    assert [job_id for job_id, _ in w.hub.ended] == [REQUEST.job_id]
    [stored] = w.reopened().load_all()
    assert stored.status is JobStatus.COMPLETED
    assert {d.disk_key: d.change_id for d in stored.disks} == CHANGE_IDS

    problem = w.manager.storage_problem()
    assert problem is not None and str(w.log) in problem and "No space left" in problem
    refused = failure_of(ensureDeferred(w.manager.start(OTHER)), StorageUnavailable)
    assert "nothing was started" in str(refused)
    filler.unlink()
    assert w.manager.storage_problem() is None
    w.start(OTHER)


def test_cancel_and_shutdown_work_while_the_log_disk_is_full(wired: Callable[[], Wiring]) -> None:
    w = wired()
    w.start()
    w.start(OTHER)
    fill(w.log)
    protocol = w.launcher.transports[REQUEST.job_id].protocol
    protocol.errReceived(b"sbc: still copying\n" * 100)
    w.manager.cancel(REQUEST.job_id)
    assert w.launcher.transports[REQUEST.job_id].signals == ["TERM"]
    assert w.manager.get(REQUEST.job_id).status is JobStatus.CANCELLED
    stopped = w.manager.stop()
    assert w.launcher.transports[OTHER.job_id].signals == ["TERM"]
    result_of(stopped)
    assert w.manager.get(OTHER.job_id).status is JobStatus.INTERRUPTED
    assert w.gateway.open == {}


def test_a_job_log_says_what_it_lost_once_it_can(disks: tuple[Path, Path]) -> None:
    _, log = disks
    path = log / "backup-j.log"
    job_log = JobLog(FilePath(str(path)), fixed_now)
    job_log.write("stdout", "before")
    filler = fill(log)
    # Longer than what is left of the file's last page: the first may be cut short.
    job_log.write("stdout", "lost one " + "x" * 8192)
    job_log.write("stderr", "lost two " + "x" * 8192)
    assert job_log.lost == 2
    assert job_log.problem is not None and "No space left on device" in job_log.problem
    filler.unlink()
    job_log.write("stdout", "after")
    job_log.close()
    text = path.read_text()
    lines = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("2026-")]
    assert lines[0] == "before"
    assert lines[-2:] == [
        f"2 line(s) not written here: cannot write the job log {path}: No space left on device",
        "after",
    ]
    assert "lost two" not in text
    assert job_log.problem is None


def test_a_full_log_disk_refuses_a_start_and_keeps_the_spare(disks: tuple[Path, Path]) -> None:
    state, log = disks
    reactor = FakeProcessReactor()
    logs = LogDirectory(FilePath(str(log)), FilePath(str(log)))
    logs.resolve()
    command = ClientCommand.parse(sys.executable + " -u client.py")
    launcher = ProcessLauncher(reactor, reactor, command, logs, fixed_now, environ={}, spares=1)
    assert launcher.spares is not None
    launcher.spares.startService()
    store = SQLiteJobStore(FilePath(str(state)).child("sna.sqlite"))
    try:
        [(spare, _, _)] = reactor.spawned
        ready(spare)
        gateway = FakeGateway()
        manager = JobManager(
            store,
            launcher,
            reactor,
            Settings(),
            SteppingClock(),
            gateway=gateway,
        )
        manager.recover()
        filler = fill(log)
        for _ in range(3):
            refused = failure_of(ensureDeferred(manager.start(REQUEST)), StorageUnavailable)
            assert str(log) in str(refused) and "No space left on device" in str(refused)
        assert gateway.probed == [], "refused before anything started"
        # The disk fills between the check and the launch: the spare goes back.
        with pytest.raises(JobLogUnwritable, match="No space left on device"):
            launcher.launch(REQUEST, Recorder())
        reactor.advance(0)
        assert len(reactor.spawned) == 1 and not spare.stdin_closed, "the spare waits, unused"
        assert not list(log.glob("backup-*.log"))
        filler.unlink()
        result_of(ensureDeferred(manager.start(REQUEST)))
        assert manager.get(REQUEST.job_id).pid == spare.pid
        spare.exit(0)
    finally:
        launcher.spares.stopService()
        store.close()


# -- the state database -----------------------------------------------------------------------


def test_a_full_state_disk_refuses_a_start_before_anything(wired: Callable[[], Wiring]) -> None:
    w = wired()
    filler = fill(w.state)
    refused = failure_of(ensureDeferred(w.manager.start(REQUEST)), StorageUnavailable)
    assert str(w.state) in str(refused) and "No space left on device" in str(refused)
    assert (w.gateway.probed, w.launcher.reactor.spawned) == ([], [])
    assert not list(w.log.glob("backup-*.log"))
    filler.unlink()
    assert w.manager.storage_problem() is None
    w.start()


def test_a_completed_job_the_database_cannot_take_is_kept_and_written_later(
    wired: Callable[[], Wiring],
) -> None:
    w = wired()
    w.start()
    fill(w.state)
    w.finish()
    job = w.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.COMPLETED
    assert {d.disk_key: d.change_id for d in job.disks} == CHANGE_IDS
    assert w.gateway.open == {}, "its relays are closed"
    assert w.hub.ended == [], "the SHA hears of it once what it must learn is stored"
    problem = w.manager.storage_problem()
    assert problem is not None and "database or disk is full" in problem
    assert "1 job record(s) kept in memory" in problem
    failure_of(ensureDeferred(w.manager.start(OTHER)), StorageUnavailable)
    # Still no room at the next try: still kept.
    w.clock.advance(WRITE_RETRY)
    assert w.manager.storage_problem() is not None and w.hub.ended == []

    (w.state / "filler").unlink()
    w.clock.advance(WRITE_RETRY)
    assert w.manager.storage_problem() is None
    assert [job_id for job_id, _ in w.hub.ended] == [REQUEST.job_id]
    again = w.reopened()
    [stored] = again.load_all()
    assert stored.status is JobStatus.COMPLETED
    assert {d.disk_key: d.change_id for d in stored.disks} == CHANGE_IDS
    expected = w.hub.ended_messages(stored)
    assert [(r.kind, r.disk_index, r.body) for r in again.outbox(REQUEST.job_id)] == [
        (m.kind, m.disk_index, m.body) for m in expected
    ]
    assert not w.clock.getDelayedCalls()


def test_a_restart_after_the_late_write_shows_the_backup_completed(
    wired: Callable[[], Wiring],
) -> None:
    w = wired()
    w.start()
    filler = fill(w.state)
    w.finish()
    filler.unlink()
    w.clock.advance(WRITE_RETRY)
    result_of(w.manager.stop())
    w.store.close()
    after = wired()
    job = after.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.COMPLETED
    assert {d.disk_key: d.change_id for d in job.disks} == CHANGE_IDS


def test_cancel_signals_the_client_while_the_database_is_full(wired: Callable[[], Wiring]) -> None:
    w = wired()
    w.start()
    filler = fill(w.state)
    w.manager.cancel(REQUEST.job_id)
    assert w.launcher.transports[REQUEST.job_id].signals == ["TERM"]
    assert w.manager.get(REQUEST.job_id).status is JobStatus.CANCELLED
    filler.unlink()
    w.clock.advance(WRITE_RETRY)
    [stored] = w.reopened().load_all()
    assert stored.status is JobStatus.CANCELLED


def test_a_job_started_just_before_the_disk_filled_runs_in_memory(
    wired: Callable[[], Wiring],
) -> None:
    """The check passed, the first write did not: the job runs, it is not undone."""
    w = wired()
    w.manager.storage_problem = lambda: None  # type: ignore[method-assign]
    filler = fill(w.state)
    w.start()
    assert w.manager.get(REQUEST.job_id).status is JobStatus.RUNNING
    w.finish()
    filler.unlink()
    w.clock.advance(WRITE_RETRY)
    [stored] = w.reopened().load_all()
    assert stored.status is JobStatus.COMPLETED


def test_a_stop_with_the_database_still_full_says_what_is_lost(
    wired: Callable[[], Wiring],
) -> None:
    w = wired()
    w.start()
    fill(w.state)
    w.finish()
    with capturedLogs() as logged:
        result_of(w.manager.stop())
    [lost] = [e for e in logged if e.get("job_id") == REQUEST.job_id and "after" in e]
    assert lost["status"] == "completed"
    assert lost["after"] == "it will show as interrupted"
    for change_id in CHANGE_IDS.values():
        assert change_id in lost["change_ids"]
    assert "message(s) for the SHA are lost" in lost["sha"]
    assert "database or disk is full" in lost["problem"]
    assert not w.clock.getDelayedCalls()


def test_settings_the_database_cannot_take_are_refused_unchanged(
    wired: Callable[[], Wiring],
) -> None:
    w = wired()
    before = w.manager.settings
    filler = fill(w.state)
    # A transaction that needs room: many settings at once.
    with pytest.raises(StorageUnavailable, match="the settings are unchanged"):
        w.manager.configure({"max_jobs": 2, "nbd_hosts": ",".join(["127.0.0.1"] * 2000)})
    assert w.manager.settings == before
    filler.unlink()
    assert w.manager.configure({"max_jobs": 2}).max_jobs == 2


def test_jobs_a_dead_daemon_left_on_a_full_disk_are_written_later(
    wired: Callable[[], Wiring],
) -> None:
    first = wired()
    first.start()
    # sna dies with the job running (its database is left as a killed process leaves it).
    filler = fill(first.state)
    w = wired()
    job = w.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.INTERRUPTED
    assert w.manager.storage_problem() is not None
    assert w.hub.ended == []
    filler.unlink()
    w.clock.advance(WRITE_RETRY)
    assert [job_id for job_id, _ in w.hub.ended] == [REQUEST.job_id]
    again = w.reopened()
    [stored] = again.load_all()
    assert stored.status is JobStatus.INTERRUPTED
    assert [r.kind for r in again.outbox(REQUEST.job_id)][-1] == "telemetry"
