"""The job manager and its snapshot janitor: what a job's record says of its snapshot.

A job whose client ended without removing its snapshot (killed, or it gave
up) is handed to the janitor with its request's credentials; every attempt
is written into the job's record; after a restart the record waits for
credentials, which a new job for the same vCenter and user brings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from sna.config import Settings
from sna.jobs.janitor import SnapshotJanitor
from sna.jobs.manager import JobManager
from sna.jobs.model import SNAPSHOT_PENDING, SNAPSHOT_REMOVED, JobStatus
from sna.testing import (
    FakeGateway,
    FakeLauncher,
    FakeLeftoverClients,
    MemoryJobStore,
    SteppingClock,
)
from sna.vmware.interface import Unreachable
from tests.unit.conftest import started
from tests.unit.test_process import REQUEST
from tests.unit.test_snapshot_janitor import VCenter


class Bench:
    def __init__(self, tmp_path: Path, store: MemoryJobStore | None = None) -> None:
        self.clock = Clock()
        self.now = SteppingClock()
        self.vcenter = VCenter()
        self.store = store or MemoryJobStore()
        self.launcher = FakeLauncher(self.clock, FilePath(str(tmp_path)))
        self.janitor = SnapshotJanitor(
            self.vcenter,
            self.clock,
            self.now,
            lambda *change: self.manager.snapshot_changed(*change),
            delays=(2.0, 8.0),
        )
        self.manager = JobManager(
            self.store,
            self.launcher,
            self.clock,
            Settings(kill_grace=5),
            self.now,
            gateway=FakeGateway(),
            leftovers=FakeLeftoverClients(),
            janitor=self.janitor,
        )
        self.janitor.startService()
        self.manager.recover()

    def say(self, job_id: str, **event: Any) -> None:
        self.launcher.transports[job_id].protocol.outReceived(json.dumps(event).encode() + b"\n")

    def stored(self, job_id: str) -> Any:
        [job] = [j for j in self.store.load_all() if j.job_id == job_id]
        return job


def test_a_killed_client_s_snapshot_is_removed_with_the_request_s_credentials(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path)
    bench.vcenter.script = [{"removed": ["sbak-backup-vm-1"]}]
    started(bench.manager, REQUEST)
    bench.launcher.transports[REQUEST.job_id].exit(signal=9)
    # The original request's password and vCenter (the client got the relays' ports).
    assert bench.vcenter.who(0) == ("admin", "pa55 word", "backup-vm-1")
    job = bench.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.FAILED
    assert job.snapshot is not None
    assert (job.snapshot.state, job.snapshot.removed_by) == (SNAPSHOT_REMOVED, "sna")
    assert bench.stored(REQUEST.job_id).snapshot == job.snapshot
    # A client that exits by itself and took no snapshot leaves nothing to do.
    other = attrs.evolve(REQUEST, job_id="exits-itself")
    started(bench.manager, other)
    bench.launcher.transports["exits-itself"].exit(1)
    assert len(bench.vcenter.calls) == 1
    assert bench.manager.get("exits-itself").snapshot is None


def test_a_snapshot_the_client_gave_up_on_is_pending_until_the_janitor_confirms(
    tmp_path: Path,
) -> None:
    bench = Bench(tmp_path)
    bench.vcenter.script = [Unreachable("vCenter unreachable"), {"removed": ["sbak-backup-vm-1"]}]
    started(bench.manager, REQUEST)
    job_id = REQUEST.job_id
    bench.say(job_id, event="snapshot", name="sbak-backup-vm-1", state="created")
    bench.say(job_id, event="error", message="disk 2000: reading failed", disk_key="2000")
    bench.say(
        job_id,
        event="snapshot",
        name="sbak-backup-vm-1",
        state="remains",
        message="snapshot sbak-backup-vm-1 could not be removed",
    )
    bench.launcher.transports[job_id].exit(1)
    job = bench.manager.get(job_id)
    # The error is the cause; the snapshot has its own field.
    assert job.error == "backup client exited with code 1: disk 2000: reading failed"
    assert job.snapshot is not None and job.snapshot.state == SNAPSHOT_PENDING
    assert job.snapshot.attempts == 1 and job.snapshot.reason == "vCenter unreachable"
    assert bench.stored(job_id).snapshot == job.snapshot
    bench.clock.advance(2)
    job = bench.manager.get(job_id)
    assert job.snapshot is not None and job.snapshot.state == SNAPSHOT_REMOVED
    assert bench.stored(job_id).snapshot == job.snapshot


def test_after_a_restart_a_pending_snapshot_waits_for_credentials(tmp_path: Path) -> None:
    first = Bench(tmp_path)
    first.vcenter.script = [Unreachable("vCenter unreachable")]
    started(first.manager, REQUEST)
    first.launcher.transports[REQUEST.job_id].exit(signal=9)
    first.janitor.stopService()

    again = Bench(tmp_path, store=first.store)
    job = again.manager.get(REQUEST.job_id)
    assert job.snapshot is not None and job.snapshot.state == SNAPSHOT_PENDING
    assert job.snapshot.needs_credentials and job.snapshot.next_attempt is None
    assert again.vcenter.calls == []
    # A new job for the same vCenter and user brings a password to use.
    again.vcenter.script = [{"removed": ["sbak-backup-vm-1"]}]
    started(again.manager, attrs.evolve(REQUEST, job_id="backup-vm-2"))
    assert again.vcenter.who(0) == ("admin", "pa55 word", "backup-vm-1")
    job = again.manager.get(REQUEST.job_id)
    assert job.snapshot is not None and job.snapshot.state == SNAPSHOT_REMOVED
    assert not job.snapshot.needs_credentials


def test_a_job_sna_lost_track_of_has_its_snapshot_pending(tmp_path: Path) -> None:
    first = Bench(tmp_path)
    started(first.manager, REQUEST)
    # sna dies with the job running: the record stays "running" in the store.
    again = Bench(tmp_path, store=first.store)
    job = again.manager.get(REQUEST.job_id)
    assert job.status is JobStatus.INTERRUPTED
    assert job.snapshot is not None and job.snapshot.needs_credentials


def test_a_stall_names_the_hub_s_port_not_the_relay_s(tmp_path: Path) -> None:
    bench = Bench(tmp_path)
    started(bench.manager, REQUEST)
    relayed = bench.launcher.requests[REQUEST.job_id].targets[0]
    bench.say(
        REQUEST.job_id,
        event="stall",
        on="hub_write",
        seconds=16,
        disk_key="2000",
        message=f"disk 2000: no write acknowledged by target {relayed.host}:{relayed.port}/vm-disk0",
    )
    stalled = bench.manager.get(REQUEST.job_id).stalled
    assert stalled is not None and stalled.on == "hub_write"
    assert stalled.message == "disk 2000: no write acknowledged by target 127.0.0.1:10100/vm-disk0"
