"""The job manager over fakes: recovery after a restart, shutdown, persistence cadence,
and the stages of one managed job."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath

from sna.config import Settings
from sna.jobs.manager import JobManager, ManagedJob, PortInUse, ShuttingDown, Stage
from sna.jobs.model import BackupRequest, InvalidTransition, Job, JobStatus
from sna.nbd.relay import RelayStats
from sna.sbc.command import ClientUnavailable
from sna.testing import (
    FakeGateway,
    FakeHub,
    FakeLauncher,
    FakeLeftoverClients,
    MemoryJobStore,
    SteppingClock,
    failure_of,
)
from tests.unit.conftest import started
from tests.unit.test_model import T0, make_job
from tests.unit.test_process import REQUEST


def make_manager(
    tmp_path: Path,
    store: MemoryJobStore | None = None,
    leftovers: FakeLeftoverClients | None = None,
    gateway: FakeGateway | None = None,
) -> tuple[JobManager, FakeLauncher, MemoryJobStore, Clock]:
    clock = Clock()
    store = store or MemoryJobStore()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)))
    manager = JobManager(
        store,
        launcher,
        clock,
        Settings(kill_grace=5),
        SteppingClock(),
        gateway=gateway or FakeGateway(),
        leftovers=leftovers or FakeLeftoverClients(),
    )
    return manager, launcher, store, clock


def test_running_jobs_of_a_dead_daemon_become_interrupted(tmp_path: Path) -> None:
    store = MemoryJobStore()
    store.save(make_job())
    manager, _, _, _ = make_manager(tmp_path, store)
    manager.recover()
    job = manager.get("j1")
    assert job.status is JobStatus.INTERRUPTED
    assert job.error == "sna stopped while the job was running"
    assert store.load_all()[0].status is JobStatus.INTERRUPTED


def test_stored_settings_override_the_command_line(tmp_path: Path) -> None:
    store = MemoryJobStore()
    store.settings = {"max_jobs": 2, "kill_grace_seconds": 1}
    manager, _, _, _ = make_manager(tmp_path, store)
    manager.recover()
    assert (manager.settings.max_jobs, manager.settings.kill_grace) == (2, 1.0)


def test_shutdown_stops_clients_and_marks_jobs_interrupted(tmp_path: Path) -> None:
    manager, launcher, store, clock = make_manager(tmp_path)
    launcher.dies_on = ("KILL",)
    manager.recover()
    started(manager, REQUEST)
    stopped: list[object] = []
    manager.stop().addBoth(stopped.append)
    transport = launcher.transports[REQUEST.job_id]
    assert transport.signals == ["TERM"] and not stopped
    clock.advance(5)
    assert transport.signals == ["TERM", "KILL"]
    assert len(stopped) == 1
    job = store.load_all()[0]
    assert job.status is JobStatus.INTERRUPTED
    assert job.exit_signal == 9
    failure_of(ensureDeferred(manager.start(REQUEST)), ShuttingDown)


def test_progress_is_written_at_most_once_a_second(tmp_path: Path) -> None:
    manager, launcher, store, clock = make_manager(tmp_path)
    manager.recover()
    started(manager, REQUEST)
    saves = store.saves
    protocol = launcher.transports[REQUEST.job_id].protocol
    for done in range(0, 1000, 10):
        line = {"event": "progress", "disk_key": "2000", "bytes_done": done, "bytes_total": 1000}
        protocol.outReceived(json.dumps(line).encode() + b"\n")
    assert store.saves == saves
    clock.advance(1)
    assert store.saves == saves + 1
    assert store.load_all()[0].disks[0].bytes_done == 990
    launcher.transports[REQUEST.job_id].exit(0)
    assert store.load_all()[0].status is JobStatus.COMPLETED
    assert not clock.getDelayedCalls()


def test_a_finished_job_id_can_run_again(tmp_path: Path) -> None:
    manager, launcher, _, _ = make_manager(tmp_path)
    manager.recover()
    started(manager, REQUEST)
    launcher.transports[REQUEST.job_id].exit(1)
    assert manager.get(REQUEST.job_id).status is JobStatus.FAILED
    again = started(manager, REQUEST)
    assert again.status is JobStatus.RUNNING
    assert again.error is None


def test_a_failed_launch_restores_the_previous_record(tmp_path: Path) -> None:
    manager, launcher, _, _ = make_manager(tmp_path)
    manager.recover()
    started(manager, REQUEST)
    launcher.transports[REQUEST.job_id].exit(1)
    launcher.unavailable = "gone"
    refused = failure_of(ensureDeferred(manager.start(REQUEST)), ClientUnavailable)
    assert "gone" in str(refused)
    assert manager.get(REQUEST.job_id).status is JobStatus.FAILED


def test_bad_stored_settings_are_skipped(tmp_path: Path) -> None:
    store = MemoryJobStore()
    store.settings = {"max_jobs": "lots", "kill_grace_seconds": 2, "bogus": 1}
    manager, _, _, _ = make_manager(tmp_path, store)
    manager.recover()
    assert (manager.settings.max_jobs, manager.settings.kill_grace) == (8, 2.0)


def test_finished_jobs_past_retention_are_forgotten(tmp_path: Path) -> None:
    store = MemoryJobStore()
    old = make_job().ended(T0 - timedelta(days=31), 0, None, None)
    store.save(old)
    store.save(attrs.evolve(make_job(), job_id="recent").ended(T0, 1, None, None))
    manager, _, _, _ = make_manager(tmp_path, store)
    manager.recover()
    assert [j.job_id for j in manager.jobs()] == ["recent"]
    assert list(store.jobs) == ["recent"]
    manager.configure({"job_retention_days": 0})
    manager._now.advance(86400 * 365)  # type: ignore[attr-defined]
    assert manager.prune() == []


def test_ports_of_a_leftover_client_stay_taken_until_it_is_gone(tmp_path: Path) -> None:
    leftovers = FakeLeftoverClients(4242)
    store = MemoryJobStore()
    store.save(attrs.evolve(make_job(), job_id=REQUEST.job_id, pid=4242, spare_id="spare-1"))
    manager, _, _, _ = make_manager(tmp_path, store, leftovers)
    recovered: list[object] = []
    manager.recover().addBoth(recovered.append)
    assert leftovers.asked == [(4242, REQUEST.job_id, "spare-1", 5.0)]
    refused = failure_of(ensureDeferred(manager.start(REQUEST)), PortInUse)
    assert "interrupted job" in str(refused)
    assert not recovered
    leftovers.gone(4242)
    assert recovered == [[(True, True)]]
    assert started(manager, REQUEST).status is JobStatus.RUNNING


def test_every_ended_job_is_stored_with_its_messages_and_delivered_once(tmp_path: Path) -> None:
    store = MemoryJobStore()
    store.save(attrs.evolve(make_job(), job_id="left-running"))
    clock = Clock()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)))
    hub = FakeHub()
    gateway = FakeGateway()
    manager = JobManager(
        store, launcher, clock, Settings(), SteppingClock(), gateway=gateway, hub=hub
    )
    manager.recover()
    # A job interrupted by a restart owes the SHA its final state (failed), no completion.
    assert [(m.job_id, m.kind) for m in store.outbox()] == [("left-running", "telemetry")]
    assert json.loads(store.outbox()[0].body)["error"]["code"] == "INTERRUPTED"
    started(manager, REQUEST)
    assert hub.started == [REQUEST.job_id]
    assert gateway.open[REQUEST.job_id]
    launcher.transports[REQUEST.job_id].exit(2)
    assert [(m.job_id, m.kind) for m in store.outbox()][1:] == [(REQUEST.job_id, "telemetry")]
    [(job_id, closed)] = hub.ended
    assert job_id == REQUEST.job_id
    # Delivery waits for the relays: they are closed when ``closed`` fires.
    assert closed.called and REQUEST.job_id not in gateway.open


def test_a_completed_job_owes_one_completion_per_disk(tmp_path: Path) -> None:
    store = MemoryJobStore()
    clock = Clock()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)))
    manager = JobManager(
        store, launcher, clock, Settings(), SteppingClock(), gateway=FakeGateway(), hub=FakeHub()
    )
    manager.recover()
    started(manager, REQUEST)
    protocol = launcher.transports[REQUEST.job_id].protocol
    for key, change_id in (("2001", "52 aa/2"), ("2000", "52 bb/9")):
        line = {
            "event": "disk_done",
            "disk_key": key,
            "change_id": change_id,
            "bytes_done": 5,
            "bytes_total": 5,
        }
        protocol.outReceived(json.dumps(line).encode() + b"\n")
    launcher.transports[REQUEST.job_id].exit(0)
    rows = store.outbox(REQUEST.job_id)
    assert [(m.kind, m.disk_index) for m in rows] == [
        ("complete", 0),
        ("complete", 1),
        ("telemetry", None),
    ]
    assert [json.loads(m.body) for m in rows[:2]] == [
        {"disk_id": 0, "change_id": "52 bb/9", "bytes_transferred": 5},
        {"disk_id": 1, "change_id": "52 aa/2", "bytes_transferred": 5},
    ]
    assert json.loads(rows[2].body)["status"] == "completed"


def test_errors_name_the_hub_port_not_the_relay(tmp_path: Path) -> None:
    manager, launcher, _, _ = make_manager(tmp_path)
    manager.recover()
    started(manager, REQUEST)
    relayed = launcher.requests[REQUEST.job_id].targets[1]
    line = {"event": "error", "message": f"lost nbd://{relayed.host}:{relayed.port}/vm-disk1"}
    launcher.transports[REQUEST.job_id].protocol.outReceived(json.dumps(line).encode() + b"\n")
    launcher.transports[REQUEST.job_id].exit(1)
    assert manager.get(REQUEST.job_id).error == (
        "backup client exited with code 1: lost nbd://127.0.0.1:10101/vm-disk1"
    )


def test_the_last_words_on_stderr_name_the_hub_port_not_the_relay(tmp_path: Path) -> None:
    manager, launcher, _, _ = make_manager(tmp_path)
    manager.recover()
    started(manager, REQUEST)
    relayed = launcher.requests[REQUEST.job_id].targets[1]
    transport = launcher.transports[REQUEST.job_id]
    transport.protocol.errReceived(f"cannot reach {relayed.host}:{relayed.port}\n".encode())
    transport.exit(1)
    assert manager.get(REQUEST.job_id).error == (
        "backup client exited with code 1: cannot reach 127.0.0.1:10101"
    )


def test_a_reused_job_id_keeps_the_old_relays_apart(tmp_path: Path) -> None:
    gateway = FakeGateway()
    manager, launcher, store, clock = make_manager(tmp_path, gateway=gateway)
    launcher.dies_on = ("KILL",)
    manager.recover()
    first_closed: Deferred[None] = Deferred()
    close_now = gateway.close_relays
    closes: list[str] = []

    def close_the_first_later(job_id: str) -> Deferred[list[RelayStats]]:
        final: list[RelayStats] = []
        close_now(job_id).addCallback(final.extend)
        closes.append(job_id)
        if len(closes) > 1:
            return succeed(final)
        return first_closed.addCallback(lambda _: final)

    gateway.close_relays = close_the_first_later  # type: ignore[method-assign]
    started(manager, REQUEST)
    gateway.counts[REQUEST.job_id] = {"2000": (1000, 10), "2001": (500, 5)}
    launcher.transports[REQUEST.job_id].exit(1)
    started(manager, REQUEST)  # its first run's relays are still closing
    stopped: list[object] = []
    manager.stop().addBoth(stopped.append)
    clock.advance(5)
    assert store.load_all()[0].status is JobStatus.INTERRUPTED
    assert not stopped, "shutdown waits for the relays of every run"
    first_closed.callback(None)
    assert stopped
    job = store.load_all()[0]
    assert [(d.bytes_to_hub, d.bytes_from_hub) for d in job.disks] == [(0, 0), (0, 0)]


def _relayed(request: BackupRequest) -> BackupRequest:
    targets = tuple(attrs.evolve(t, port=30000 + i) for i, t in enumerate(request.targets))
    return attrs.evolve(request, targets=targets)


def test_a_managed_job_holds_its_id_and_ports_until_its_client_ends() -> None:
    managed = ManagedJob.admitted(REQUEST)
    assert (managed.stage, managed.holds_id, managed.ports) == (
        Stage.STARTING,
        True,
        [10100, 10101],
    )
    with pytest.raises(InvalidTransition):
        managed.ended(make_job())
    job = Job.from_request(REQUEST, T0, relay_ports=[30000, 30001])
    managed.launching(job, REQUEST, _relayed(REQUEST))
    assert (managed.stage, managed.holds_id, managed.ports) == (
        Stage.RUNNING,
        True,
        [10100, 10101],
    )
    with pytest.raises(InvalidTransition):
        managed.wait_for([], lambda m: None)
    assert managed.ended(job.ended(T0, 1, None, None)) is REQUEST
    assert (managed.stage, managed.holds_id, managed.ports) == (Stage.ENDING, False, [])
    # The password lives as long as the client, no longer.
    assert (managed.request, managed.relayed, managed.process) == (None, None, None)


def test_a_refused_launch_leaves_a_managed_job_starting() -> None:
    managed = ManagedJob.admitted(REQUEST)
    managed.launching(Job.from_request(REQUEST, T0), REQUEST, _relayed(REQUEST))
    managed.launch_failed()
    assert managed.stage is Stage.STARTING and managed.relayed is None
    with pytest.raises(InvalidTransition):
        managed.job  # noqa: B018


def test_a_managed_job_settles_once_all_it_waits_for_has_fired() -> None:
    job = Job.from_request(REQUEST, T0)
    managed = ManagedJob.admitted(REQUEST)
    managed.launching(job, REQUEST, _relayed(REQUEST))
    managed.ended(job.ended(T0, None, 9, None))
    closing: Deferred[None] = Deferred()
    cleanup: Deferred[None] = Deferred()
    settled: list[ManagedJob] = []
    managed.wait_for([closing, cleanup], settled.append)
    closing.callback(None)
    assert (managed.stage, settled) == (Stage.ENDING, [])
    with capturedLogs() as logged:
        cleanup.errback(RuntimeError("vCenter unreachable"))
    assert (managed.stage, settled) == (Stage.SETTLED, [managed])
    [event] = [e for e in logged if "log_failure" in e]
    assert event["job_id"] == REQUEST.job_id and event["stage"] == "ending"
    assert cleanup.result is None, "the failure goes no further"


def test_a_leftover_holds_its_ports_not_its_id_until_its_client_is_gone() -> None:
    job = attrs.evolve(make_job(), pid=4242).interrupted(T0, "sna stopped")
    managed = ManagedJob.stored(job)
    assert (managed.stage, managed.ports) == (Stage.SETTLED, [])
    managed.leftover()
    assert (managed.stage, managed.holds_id, managed.ports) == (
        Stage.LEFTOVER,
        False,
        [10100, 10101],
    )
    gone: Deferred[bool] = Deferred()
    settled: list[ManagedJob] = []
    managed.wait_for([gone], settled.append)
    assert not settled
    gone.callback(True)
    assert (managed.stage, managed.ports, settled) == (Stage.SETTLED, [], [managed])
