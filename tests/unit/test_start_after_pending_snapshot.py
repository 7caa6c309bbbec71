"""A new job of a VM whose snapshot an earlier job left pending: removed first, or refused.

The earlier job's client is killed, its snapshot pending with the janitor
(vCenter did not answer); a new job of the same VM (same vCenter and VM
path) has the janitor try the removal at once, with its own credentials,
and starts only once vCenter confirms.  vCenter is a scripted fake (a
``None`` answer is a call under way until the test fires it), time a
:class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from sna.api import openapi
from sna.api.app import SnaAPI
from sna.config import Settings
from sna.jobs.janitor import CLEAR_WITHIN, SnapshotJanitor
from sna.jobs.manager import JobManager, SnapshotPending, UnknownJob
from sna.jobs.model import SNAPSHOT_PENDING, SNAPSHOT_REMOVED, BackupRequest, Job, JobStatus
from sna.nbd.relay import RelayRegistry
from sna.telemetry.metrics import Metrics
from sna.testing import (
    FakeGateway,
    FakeLauncher,
    FakeLeftoverClients,
    FakeVSphere,
    MemoryJobStore,
    SteppingClock,
    failure_of,
    result_of,
)
from sna.vmware.interface import AuthenticationFailed, Unreachable
from tests.unit.conftest import started
from tests.unit.test_process import REQUEST
from tests.unit.test_snapshot_janitor import VCenter

#: The job that left its snapshot, and the next backup of the same VM.
OLD = REQUEST
NEW = attrs.evolve(REQUEST, job_id="backup-vm-2", vcenter_password="new pa55")
UNREACHABLE = "vCenter vcenter.example.local:443 did not answer"


class Bench:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.vcenter = VCenter()
        self.gateway = FakeGateway()
        self.launcher = FakeLauncher(self.clock, FilePath(str(tmp_path)))
        self.janitor = SnapshotJanitor(
            self.vcenter,
            self.clock,
            SteppingClock(),
            lambda *change: self.manager.snapshot_changed(*change),
            delays=(30.0, 60.0),
        )
        self.manager = JobManager(
            MemoryJobStore(),
            self.launcher,
            self.clock,
            Settings(kill_grace=5),
            SteppingClock(),
            gateway=self.gateway,
            leftovers=FakeLeftoverClients(),
            janitor=self.janitor,
        )
        self.janitor.startService()
        self.manager.recover()

    def leave_pending(self, request: BackupRequest = OLD, *answers: Any) -> None:
        """``request``'s client is killed; the janitor's first attempt gets ``answers[0]``
        (vCenter unreachable by default): its snapshot is pending, retried in 30 s."""
        self.vcenter.script = list(answers) or [Unreachable(UNREACHABLE)]
        started(self.manager, request)
        self.launcher.transports[request.job_id].exit(signal=9)
        snapshot = self.manager.get(request.job_id).snapshot
        assert snapshot is not None and snapshot.state == SNAPSHOT_PENDING, snapshot

    def start(self, request: BackupRequest = NEW) -> Deferred[Job]:
        return ensureDeferred(self.manager.start(request))

    def removals(self) -> list[tuple[str, str, str]]:
        """(user, password, job id) of each removal vCenter was asked for."""
        return [self.vcenter.who(i) for i in range(len(self.vcenter.calls))]


def test_the_new_job_removes_the_old_snapshot_with_its_credentials_before_it_launches(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    # vCenter is back; the janitor's next attempt is 30 s away.  The removal is under
    # way (held), and nothing of the new job is started meanwhile.
    bench.vcenter.script = [None]
    d = bench.start()
    assert not d.called
    assert bench.removals()[1] == ("admin", "new pa55", OLD.job_id)
    assert NEW.job_id not in bench.launcher.transports
    assert NEW.job_id not in bench.gateway.open
    bench.vcenter.held.pop().callback({"removed": [f"sbak-{OLD.job_id}"]})
    job = result_of(d)
    assert job.status is JobStatus.RUNNING and NEW.job_id in bench.launcher.transports
    old = bench.manager.get(OLD.job_id).snapshot
    assert old is not None and (old.state, old.removed_by) == (SNAPSHOT_REMOVED, "sna")
    # The scheduled attempt is gone with the snapshot.
    bench.clock.advance(60)
    assert len(bench.vcenter.calls) == 2
    assert bench.manager.snapshots_pending() == []


def test_a_removal_that_fails_refuses_the_job_and_starts_nothing(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    bench.vcenter.script = [Unreachable(UNREACHABLE)]
    error = failure_of(bench.start(), SnapshotPending)
    assert isinstance(error, SnapshotPending) and error.code == "snapshot_pending"
    # The VM, the snapshot, the earlier job and vCenter's reason, in one sentence.
    assert error.message == (
        f"VM {OLD.vm_path} still has a snapshot an earlier job left, which would break this "
        f"backup: snapshot sbak-{OLD.job_id} of job {OLD.job_id} could not be removed: "
        f"{UNREACHABLE}; nothing was started"
    )
    assert len(bench.vcenter.calls) == 2
    assert NEW.job_id not in bench.launcher.transports
    assert NEW.job_id not in bench.launcher.requests
    assert NEW.job_id not in bench.gateway.open
    with pytest.raises(UnknownJob):
        bench.manager.get(NEW.job_id)
    assert bench.manager.active_jobs() == []
    # The janitor goes on with its retries, and the request holds nothing: once vCenter
    # answers, the same request starts.
    old = bench.manager.get(OLD.job_id).snapshot
    assert old is not None and old.state == SNAPSHOT_PENDING and old.next_attempt is not None
    bench.vcenter.script = [{"removed": [f"sbak-{OLD.job_id}"]}]
    assert result_of(bench.start()).status is JobStatus.RUNNING


def test_a_replication_is_refused_alike(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    bench.vcenter.script = [Unreachable(UNREACHABLE)]
    other_vm = attrs.evolve(
        NEW,
        job_id="backup-other-1",
        vm_path="/DC1/vm/other",
        targets=tuple(attrs.evolve(t, port=t.port + 10) for t in NEW.targets),
    )
    d = ensureDeferred(bench.manager.start_all([other_vm, NEW]))
    failure_of(d, SnapshotPending)
    assert bench.launcher.transports.keys() == {OLD.job_id}
    assert bench.gateway.open == {}


def test_vcenter_silent_for_the_whole_wait_refuses_the_job(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    bench.vcenter.script = [None]
    d = bench.start()
    bench.clock.advance(CLEAR_WITHIN - 1)
    assert not d.called
    bench.clock.advance(1)
    error = failure_of(d, SnapshotPending)
    assert f"vCenter did not answer within {CLEAR_WITHIN:g} s" in str(error)
    assert NEW.job_id not in bench.launcher.transports
    # The attempt goes on: its late answer still counts.
    bench.vcenter.held.pop().callback({"removed": [f"sbak-{OLD.job_id}"]})
    assert bench.manager.snapshots_pending() == []


def test_an_attempt_under_way_is_waited_for_not_doubled(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    # The janitor's first attempt hangs on vCenter when the new job comes.
    bench.leave_pending(OLD, None)
    d = bench.start()
    assert len(bench.vcenter.calls) == 1 and not d.called
    bench.vcenter.held.pop().callback({"removed": [f"sbak-{OLD.job_id}"]})
    assert result_of(d).status is JobStatus.RUNNING
    assert len(bench.vcenter.calls) == 1


def test_other_vms_and_the_same_job_id_are_not_held(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    bench.vcenter.script = []
    # Another VM of the same vCenter, and the same path on another vCenter.
    other_vm = attrs.evolve(NEW, job_id="backup-other-1", vm_path="/DC1/vm/other")
    assert started(bench.manager, other_vm).status is JobStatus.RUNNING
    bench.launcher.transports[other_vm.job_id].exit(0)
    other_vcenter = attrs.evolve(NEW, job_id="backup-vm-3", vcenter_host="vc2.example.local")
    assert started(bench.manager, other_vcenter).status is JobStatus.RUNNING
    bench.launcher.transports[other_vcenter.job_id].exit(0)
    # The job's own id again: its client removes a leftover of its own name.
    assert started(bench.manager, OLD).status is JobStatus.RUNNING
    assert len(bench.vcenter.calls) == 1


def test_the_api_answers_409_snapshot_pending_as_its_document_says(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending()
    bench.vcenter.script = [Unreachable(UNREACHABLE)]
    metrics = Metrics(dict, RelayRegistry())
    api = SnaAPI(bench.manager, SteppingClock(), bench.clock.seconds, metrics, FakeVSphere())
    treq = StubTreq(api.resource())
    body = {
        "job_id": NEW.job_id,
        "vm_name": NEW.vm_name,
        "vcenter_host": NEW.vcenter_host,
        "vcenter_user": NEW.vcenter_user,
        "vcenter_password": NEW.vcenter_password,
        "vm_path": NEW.vm_path,
        "nbd_targets": ",".join(
            f"{t.disk_key}:nbd://{t.host}:{t.port}/{t.export}" for t in NEW.targets
        ),
        "backup_type": "full",
    }
    d = treq.request(
        "POST",
        "http://sna/api/v1/backup/start",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    treq.flush()
    response = result_of(d)
    answer = json.loads(result_of(response.content()))
    assert response.code == 409, answer
    assert answer["error"] == "snapshot_pending"
    assert f"snapshot sbak-{OLD.job_id} of job {OLD.job_id}" in answer["message"]
    assert NEW.vcenter_password not in answer["message"]
    operation = openapi.document()["paths"]["/api/v1/backup/start"]["post"]
    assert "snapshot_pending" in json.dumps(operation["responses"]["409"])


def test_an_attempt_under_way_that_fails_is_tried_again_with_the_new_credentials(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path)
    bench.leave_pending(OLD, None)
    bench.vcenter.script = [{"removed": [f"sbak-{OLD.job_id}"]}]
    d = bench.start()
    # vCenter refuses the old password; the new request's is tried at once.
    bench.vcenter.held.pop().errback(AuthenticationFailed("vCenter refused the login"))
    assert result_of(d).status is JobStatus.RUNNING
    assert [who[:2] for who in bench.removals()] == [("admin", "pa55 word"), ("admin", "new pa55")]
    assert bench.manager.snapshots_pending() == []
