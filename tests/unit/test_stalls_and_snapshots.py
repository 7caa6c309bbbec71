"""Stalls and the job's snapshot: the client's events, the contract flag, the record, ``/status``.

The client writes ``stall``, ``resume`` and ``snapshot`` events
(:mod:`sna.backup.events`); the daemon reads them (:mod:`sna.sbc.parse`),
the job model keeps a stall until progress resumes and says a snapshot is
pending when the client ended without removing it, and ``render.status``
shows both.  ``--stall-timeout`` goes from the daemon's argv to the client's
options through :mod:`sna.contract.argv`.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from sna.api import render
from sna.backup.events import EventWriter
from sna.backup.options import UsageError, parse_args
from sna.contract import argv as cli
from sna.contract import ids
from sna.contract.targets import NbdTarget
from sna.jobs.model import (
    SNAPSHOT_PENDING,
    SNAPSHOT_PRESENT,
    SNAPSHOT_REMOVED,
    BackupRequest,
    Job,
    JobStatus,
    SnapshotState,
    Stall,
)
from sna.sbc import events
from sna.sbc.parse import JsonLineParser

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def parse(**fields: Any) -> list[events.Event]:
    return JsonLineParser().parse(json.dumps(fields))


def make_job(job_id: str = "backup-vm-1") -> Job:
    request = BackupRequest(
        job_id=job_id,
        vm_name="vm",
        vcenter_host="vc.example:443",
        vcenter_user="u",
        vcenter_password="pw",
        vm_path="/DC/vm/vm",
        targets=(NbdTarget("2000", "127.0.0.1", 10100, "vm-disk0"),),
        backup_type="full",
    )
    return Job.from_request(request, T0)


# -- the events on the wire ---------------------------------------------------------------


def test_the_client_s_new_events_are_what_the_daemon_reads() -> None:
    out = io.BytesIO()
    writer = EventWriter(out, now=lambda: T0, secrets=["s3cret"])
    writer.stall("hub_write", 15.04, "disk 2000: no write acknowledged", disk_key="2000")
    writer.resume("moving again")
    writer.snapshot("sbak-j", "created")
    writer.snapshot("sbak-j", "remains", "vCenter s3cret unreachable")
    parser = JsonLineParser()
    read = [e for line in out.getvalue().decode().splitlines() for e in parser.parse(line)]
    assert read == [
        events.Stall("hub_write", 15.0, "disk 2000: no write acknowledged", "2000"),
        events.Resume("moving again"),
        events.Snapshot("sbak-j", "created"),
        events.Snapshot("sbak-j", "remains", "vCenter ******** unreachable"),
    ]


def test_the_writer_refuses_what_the_contract_does_not_know() -> None:
    writer = EventWriter(io.BytesIO())
    with pytest.raises(ValueError):
        writer.stall("disk", 1.0, "?")
    with pytest.raises(ValueError):
        writer.snapshot("sbak-j", "gone")


@pytest.mark.parametrize(
    "fields",
    [
        {"event": "stall", "seconds": 3},
        {"event": "stall", "on": "network", "seconds": 3},
        {"event": "stall", "on": "vcenter"},
        {"event": "stall", "on": "vcenter", "seconds": -1},
        {"event": "stall", "on": "vcenter", "seconds": "3"},
        {"event": "stall", "on": "vcenter", "seconds": 10**12},
        {"event": "stall", "on": "vcenter", "seconds": 3, "disk_key": "a b"},
        {"event": "snapshot", "state": "created"},
        {"event": "snapshot", "name": "", "state": "created"},
        {"event": "snapshot", "name": "sbak-j", "state": "lost"},
        {"event": "snapshot", "name": 7, "state": "created"},
    ],
)
def test_broken_events_are_dropped(fields: dict[str, Any]) -> None:
    assert parse(**fields) == []


def test_a_stall_s_seconds_may_be_an_integer() -> None:
    assert parse(event="stall", on="vcenter", seconds=20) == [events.Stall("vcenter", 20.0)]


# -- the job model ----------------------------------------------------------------------------


def test_a_stall_is_kept_until_bytes_move_again() -> None:
    job = make_job().apply(events.DiskStart("2000", bytes_total=100), T0)
    job = job.apply(events.Progress(bytes_done=10, disk_key="2000"), T0)
    later = T0 + 20 * SECOND
    job = job.apply(events.Stall("hub_write", 16.0, "no ack", "2000"), later)
    assert job.stalled == Stall("hub_write", later - 16 * SECOND, "no ack", "2000")
    # Progress events of the same count (the client sends one a second) keep it.
    job = job.apply(events.Progress(bytes_done=10, disk_key="2000"), later + SECOND)
    assert job.stalled is not None
    # The same stall said again keeps its first since.
    job = job.apply(events.Stall("hub_write", 1.0, "no ack", "2000"), later + 2 * SECOND)
    assert job.stalled is not None and job.stalled.since == later - 16 * SECOND
    assert job.apply(events.Progress(bytes_done=11, disk_key="2000"), later).stalled is None
    assert job.apply(events.Resume(), later).stalled is None
    assert job.apply(events.Phase("cleanup"), later).stalled is None


def test_an_ended_job_is_not_stalled() -> None:
    job = make_job().apply(events.Stall("vcenter", 30.0, "finding VM"), T0)
    assert job.ended(T0, 1, None, None).stalled is None
    assert job.interrupted(T0, "sna stopped").stalled is None


def test_a_snapshot_the_client_did_not_remove_is_pending_once_it_ends() -> None:
    job = make_job().apply(events.Snapshot("sbak-backup-vm-1", "created"), T0)
    assert job.snapshot == SnapshotState("sbak-backup-vm-1", SNAPSHOT_PRESENT)
    job = job.apply(events.Snapshot("sbak-backup-vm-1", "remains", "vCenter unreachable"), T0)
    ended = job.apply(events.Error("reading disk 2000 failed"), T0).ended(T0, 1, None, None)
    assert ended.status is JobStatus.FAILED
    # The job's error is the cause, not the snapshot.
    assert ended.error == "backup client exited with code 1: reading disk 2000 failed"
    assert ended.snapshot == SnapshotState(
        "sbak-backup-vm-1", SNAPSHOT_PENDING, reason="vCenter unreachable"
    )


def test_a_removed_snapshot_stays_removed() -> None:
    job = make_job().apply(events.Snapshot("sbak-backup-vm-1", "created"), T0)
    job = job.apply(events.Snapshot("sbak-backup-vm-1", "removed"), T0 + SECOND)
    for ended in (job.ended(T0, 1, None, None), job.ended(T0, None, 9, None)):
        assert ended.snapshot is not None
        assert ended.snapshot.state == SNAPSHOT_REMOVED
        assert (ended.snapshot.removed_by, ended.snapshot.removed_at) == ("client", T0 + SECOND)


def test_a_killed_client_may_have_left_a_snapshot_it_never_spoke_of() -> None:
    job = make_job("backup-x" * 20)
    killed = job.ended(T0, None, 9, None)
    assert killed.snapshot is not None and killed.snapshot.pending
    # The name the client would have given it (the janitor removes by job id anyway).
    assert killed.snapshot.name == ids.snapshot_name("backup-x" * 20)
    assert "killed by signal 9" in (killed.snapshot.reason or "")
    # A client that exited by itself and never said it took one took none.
    assert job.ended(T0, 1, None, None).snapshot is None
    assert job.ended(T0, 0, None, None).snapshot is None


def test_a_job_sna_lost_track_of_may_have_left_one() -> None:
    assert make_job().interrupted(T0, "sna stopped").snapshot == SnapshotState(
        "sbak-backup-vm-1", SNAPSHOT_PENDING, reason="sna stopped while the job was running"
    )


def test_the_record_keeps_stall_and_snapshot() -> None:
    job = make_job().apply(events.Stall("source_read", 17.5, "no bytes", "2000"), T0)
    job = job.apply(events.Snapshot("sbak-backup-vm-1", "created"), T0)
    assert Job.from_record(json.loads(json.dumps(job.to_record()))) == job
    ended = job.ended(T0, None, 9, None).snapshot_changed(
        SnapshotState(
            "sbak-backup-vm-1",
            SNAPSHOT_PENDING,
            reason="vCenter unreachable",
            attempts=2,
            next_attempt=T0 + 10 * SECOND,
        )
    )
    assert Job.from_record(json.loads(json.dumps(ended.to_record()))) == ended
    # Records written before these fields existed still load.
    old = job.to_record()
    del old["stalled"], old["snapshot"]
    assert Job.from_record(old).snapshot is None


# -- /status -----------------------------------------------------------------------------------


def test_status_says_stalled_since_when_and_on_what() -> None:
    job = make_job().apply(events.Stall("vcenter", 16.0, "vCenter: finding VM, no answer"), T0)
    body = render.status(job)
    assert body["status"] == "running"
    assert body["stalled"] == {
        "on": "vcenter",
        "since": "2026-11-26T11:59:44.000Z",
        "disk_key": None,
        "message": "vCenter: finding VM, no answer",
    }
    assert render.status(job.apply(events.Resume(), T0))["stalled"] is None


def test_status_shows_the_snapshot_pending_until_removed() -> None:
    job = make_job()
    assert render.status(job)["snapshot"] is None
    pending = job.ended(T0, None, 9, None).snapshot_changed(
        SnapshotState(
            "sbak-backup-vm-1",
            SNAPSHOT_PENDING,
            reason="vCenter unreachable",
            attempts=1,
            next_attempt=T0 + 5 * SECOND,
        )
    )
    assert render.status(pending)["snapshot"] == {
        "name": "sbak-backup-vm-1",
        "state": "pending",
        "reason": "vCenter unreachable",
        "removal_attempts": 1,
        "next_attempt": "2026-11-26T12:00:05.000Z",
        "needs_credentials": False,
        "removed_by": None,
        "removed_at": None,
    }


# -- --stall-timeout through the contract --------------------------------------------------


JOB = cli.JobArguments(
    endpoint="vc:443",
    user="u",
    password="pw",
    vm_path="/DC/vm/vm",
    targets=(NbdTarget("2000", "127.0.0.1", 10100, "vm-disk0"),),
    job_id="j",
    backup_type="full",
    stall_timeout=42.5,
)


def test_the_daemon_s_stall_timeout_reaches_the_client() -> None:
    argv = cli.build(JOB)
    assert "--stall-timeout=42.5" in argv
    options = parse_args(argv, cli.environment(JOB))
    assert options.stall_timeout == 42.5
    assert cli.build(attrs.evolve(JOB, stall_timeout=600.0))[-1] == "--stall-timeout=600"


def test_without_one_the_client_keeps_its_default_and_the_go_client_gets_none() -> None:
    plain = attrs.evolve(JOB, stall_timeout=None)
    assert not any(a.startswith("--stall-timeout") for a in cli.build(plain))
    assert parse_args(cli.build(plain), cli.environment(plain)).stall_timeout == 600.0
    assert not any(a.startswith("--stall-timeout") for a in cli.build(JOB, legacy=True))


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_a_stall_timeout_that_is_no_duration_is_a_usage_error(value: str) -> None:
    argv = [*cli.build(attrs.evolve(JOB, stall_timeout=None)), f"--stall-timeout={value}"]
    with pytest.raises(UsageError, match="--stall-timeout"):
        parse_args(argv, cli.environment(JOB))


def test_the_client_s_vcenter_and_cleanup_deadlines() -> None:
    argv = [*cli.build(JOB), "--vcenter-timeout=7", "--cleanup-timeout=30"]
    options = parse_args(argv, cli.environment(JOB))
    assert (options.vcenter_timeout, options.cleanup_timeout) == (7.0, 30.0)
    defaults = parse_args(cli.build(JOB), cli.environment(JOB))
    assert (defaults.vcenter_timeout, defaults.cleanup_timeout) == (60.0, 120.0)
