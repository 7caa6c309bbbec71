"""The job state machine and its derived figures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sna.jobs.model import (
    BackupRequest,
    InvalidTransition,
    Job,
    JobStatus,
    NbdTarget,
    PushedProgress,
)
from sna.sbc import events

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def make_job(keys: tuple[str, ...] = ("2000", "2001")) -> Job:
    request = BackupRequest(
        job_id="j1",
        vm_name="vm",
        vcenter_host="vc",
        vcenter_user="u",
        vcenter_password="pw",
        vm_path="/DC/vm/vm",
        targets=tuple(
            NbdTarget(k, "127.0.0.1", 10100 + i, f"vm-disk{i}") for i, k in enumerate(keys)
        ),
        backup_type="full",
    )
    return Job.from_request(request, T0)


def test_password_is_not_in_the_repr_of_a_request() -> None:
    request = BackupRequest("j", "vm", "vc", "u", "hunter2", "/p", (), "full")
    assert "hunter2" not in repr(request)


def test_progress_is_weighted_by_bytes() -> None:
    job = make_job()
    job = job.apply(events.DiskStart("2000", bytes_total=900), T0)
    job = job.apply(events.DiskStart("2001", bytes_total=100), T0)
    job = job.apply(events.Progress(bytes_done=450, bytes_total=900, disk_key="2000"), T0)
    assert job.progress_percent == 45.0
    job = job.apply(events.DiskDone("2000", change_id="a/1"), T0)
    assert job.disks[0].bytes_done == 900
    assert job.progress_percent == 90.0


def test_never_100_before_the_job_completes() -> None:
    job = make_job(("2000",))
    job = job.apply(events.DiskStart("2000", bytes_total=10), T0)
    job = job.apply(events.DiskDone("2000", change_id="a/1"), T0)
    assert job.progress_percent < 100
    assert job.ended(T0, 0, None, None).progress_percent == 100


def test_without_totals_progress_counts_finished_disks() -> None:
    job = make_job()
    job = job.apply(events.DiskDone("2000", change_id="a/1"), T0)
    assert job.progress_percent == 50.0


def test_unknown_disk_keys_are_ignored() -> None:
    job = make_job()
    after = job.apply(events.DiskDone("9999", change_id="x"), T0)
    assert after.disks == job.disks


@pytest.mark.parametrize(
    ("exit_code", "signal", "cancel", "stopping", "status"),
    [
        (0, None, False, False, JobStatus.COMPLETED),
        (0, None, True, False, JobStatus.COMPLETED),
        (3, None, False, False, JobStatus.FAILED),
        (None, 9, False, False, JobStatus.FAILED),
        (None, 15, True, False, JobStatus.CANCELLED),
        (143, None, True, True, JobStatus.CANCELLED),
        (None, 15, False, True, JobStatus.INTERRUPTED),
    ],
)
def test_how_a_job_ends(
    exit_code: int | None, signal: int | None, cancel: bool, stopping: bool, status: JobStatus
) -> None:
    job = make_job()
    if cancel:
        job = job.cancelling(T0)
    ended = job.ended(T0, exit_code, signal, "last line", shutting_down=stopping)
    assert ended.status is status
    assert ended.ended_at == T0
    if status is JobStatus.FAILED:
        assert ended.error is not None and "last line" in ended.error


def test_ended_jobs_stay_ended() -> None:
    job = make_job().ended(T0, 0, None, None)
    with pytest.raises(InvalidTransition):
        job.ended(T0, 1, None, None)
    with pytest.raises(InvalidTransition):
        job.cancelling(T0)
    with pytest.raises(InvalidTransition):
        job.interrupted(T0, "x")
    assert job.apply(events.Error("late"), T0) is job


def test_error_event_fails_its_disk_and_becomes_the_reason() -> None:
    job = make_job().apply(events.Error("write failed", disk_key="2001"), T0)
    assert [d.status for d in job.disks] == ["pending", "failed"]
    assert job.ended(T0, 1, None, "other").error == "backup client exited with code 1: write failed"


def test_interrupted_keeps_finished_disks() -> None:
    job = make_job().apply(events.DiskDone("2000", change_id="a/1"), T0)
    job = job.interrupted(T0, "sna died")
    assert job.status is JobStatus.INTERRUPTED
    assert [d.status for d in job.disks] == ["completed", "failed"]
    assert job.disks[0].change_id == "a/1"


def test_record_round_trip() -> None:
    job = make_job().apply(events.DiskStart("2000", "incremental", "change id matches", 5), T0)
    job = job.pushed_progress(PushedProgress(stage="Transfer", bytes_transferred=4), T0)
    job = job.ended(T0, 2, None, "boom")
    assert Job.from_record(job.to_record()) == job
