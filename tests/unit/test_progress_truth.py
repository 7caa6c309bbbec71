"""Progress that tells the truth: totals known from the plan, a percentage that only
grows and never reaches 99.99 early, finished empty disks at 100 %, and a rate and
ETA measured over a window of the copy (sna.jobs.model, sna.api.render).

Issue 12 saw, in a three-disk backup: ``total_bytes: 0`` and ``eta_seconds: 0``
until the last disk started, the percentage jumping from 33 to 99.99, and a
finished empty disk at 0 %.  Each test here replays one such sequence of the
client's events (or the legacy client's pushes) at set times.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sna.api import render
from sna.api.validation import parse_progress_update
from sna.contract.targets import NbdTarget
from sna.jobs.model import RATE_WINDOW, REPORT_GRACE, BackupRequest, Job
from sna.sbc import events

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
MiB = 1 << 20
GiB = 1 << 30


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_job(keys: tuple[str, ...] = ("2000", "2001", "2002")) -> Job:
    request = BackupRequest(
        job_id="backup-vm3-1",
        vm_name="vm3",
        vcenter_host="vc",
        vcenter_user="u",
        vcenter_password="pw",
        vm_path="/DC/vm/vm3",
        targets=tuple(
            NbdTarget(k, "127.0.0.1", 10100 + i, f"vm3-disk{i}") for i, k in enumerate(keys)
        ),
        backup_type="full",
    )
    return Job.from_request(request, T0)


def plan(job: Job, sizes: dict[str, int], when: float) -> Job:
    for key, size in sizes.items():
        job = job.apply(events.DiskPlan(key, "full", size), at(when))
    return job


def copy_disk(
    job: Job, key: str, size: int, start: float, per_second: int, percents: list[float]
) -> tuple[Job, float]:
    """Our client's events for one disk: start, a progress a second, done; returns
    the job and the time it ended.  Each percentage seen goes to ``percents``."""
    job = job.apply(events.DiskStart(key, "full", bytes_total=size), at(start))
    job = job.apply(events.Progress(0, size, key), at(start))
    done, now = 0, start
    while done < size:
        now += 1
        done = min(done + per_second, size)
        job = job.apply(events.Progress(done, size, key), at(now))
        percents.append(job.progress_percent)
    job = job.apply(events.DiskDone(key, f"52 aa/{key}", done, size), at(now))
    percents.append(job.progress_percent)
    return job, now


def test_a_planned_job_knows_its_total_before_any_byte() -> None:
    job = plan(make_job(), {"2000": 600 * MiB, "2001": 300 * MiB, "2002": 0}, 1)
    assert job.bytes_total == 900 * MiB
    body = render.progress(job, at(1))
    assert (body["total_bytes"], body["percentage"]) == (900 * MiB, 0.0)


def test_three_disks_one_empty_weighted_by_bytes_monotonic_and_never_99_99_early() -> None:
    job = plan(make_job(), {"2000": 600 * MiB, "2001": 300 * MiB, "2002": 0}, 1)
    percents: list[float] = []
    job, now = copy_disk(job, "2000", 600 * MiB, 2, 100 * MiB, percents)
    # Two thirds of the bytes: not a third of the disks.
    assert job.progress_percent == pytest.approx(66.67)
    job, now = copy_disk(job, "2001", 300 * MiB, now, 100 * MiB, percents)
    assert percents == sorted(percents), percents
    # 99.99 only with the last byte of 2001 (its last progress, then its disk_done):
    # only the empty disk is left, so it is the truth.
    assert [p for p in percents if p >= 99.99] == [99.99, 99.99]
    assert percents[-3] == pytest.approx(100 * 800 / 900, abs=0.01)
    job = job.apply(events.DiskStart("2002", "full", bytes_total=0), at(now))
    job = job.apply(events.DiskDone("2002", "52 aa/2002", 0, 0), at(now))
    assert job.progress_percent == 99.99
    disks = render.progress(job, at(now))["disk_progresses"]
    assert [d["percent"] for d in disks] == [100.0, 100.0, 100.0]
    assert job.ended(at(now + 1), 0, None, None).progress_percent == 100.0


def test_without_a_plan_disks_weigh_alike_and_the_last_one_starting_jumps_nowhere() -> None:
    """The issue's sequence: sizes learnt as each disk starts, the last disk empty."""
    job = make_job()
    percents: list[float] = []
    job, now = copy_disk(job, "2000", 100 * MiB, 0, 25 * MiB, percents)
    assert job.bytes_total is None
    assert render.progress(job, at(now))["total_bytes"] == 0
    assert job.progress_percent == pytest.approx(33.33)
    job, now = copy_disk(job, "2001", 10 * MiB, now, 5 * MiB, percents)
    assert job.progress_percent == pytest.approx(66.67)
    # The last, empty disk starts: every size is known now, and every byte copied.
    job = job.apply(events.DiskStart("2002", "full", bytes_total=0), at(now + 1))
    assert job.bytes_total == 110 * MiB
    assert job.progress_percent == pytest.approx(66.67)
    job = job.apply(events.DiskDone("2002", "52 aa/2002", 0, 0), at(now + 1))
    assert job.progress_percent == 99.99
    percents.append(job.progress_percent)
    assert percents == sorted(percents), percents


def test_the_percentage_never_goes_back() -> None:
    """A client that refines a disk's total upwards mid-copy."""
    job = plan(make_job(("2000", "2001")), {"2000": 100 * MiB, "2001": 100 * MiB}, 0)
    job = job.apply(events.DiskStart("2000", "incremental", bytes_total=100 * MiB), at(1))
    job = job.apply(events.Progress(80 * MiB, 100 * MiB, "2000"), at(2))
    assert job.progress_percent == 40.0
    job = job.apply(events.Progress(80 * MiB, 300 * MiB, "2000"), at(3))
    assert job.fraction < 0.4
    assert job.progress_percent == 40.0
    # A failed job keeps what it showed.
    failed = job.ended(at(4), 1, None, "boom")
    assert failed.progress_percent == 40.0
    assert Job.from_record(failed.to_record()).progress_percent == 40.0


def test_rate_and_eta_are_bytes_over_the_last_30_seconds_across_disks() -> None:
    sizes = {"2000": 50 * 10 * MiB, "2001": 2000 * MiB, "2002": 0}
    job = plan(make_job(), sizes, 0)
    job = job.apply(events.DiskStart("2000", "full", bytes_total=sizes["2000"]), at(1))
    job = job.apply(events.Progress(0, sizes["2000"], "2000", throughput_bps=0.0), at(1))
    # Not two reports of the copy yet: no rate, no ETA, in both routes.
    assert job.rate_bps(at(1)) is None and job.eta_seconds(at(1)) is None
    status = render.status(job, now=at(1))
    assert (status["throughput_bps"], status["eta_seconds"]) == (None, None)
    assert render.progress(job, at(1))["timing"]["eta_seconds"] == 0
    # 10 MiB/s for 50 s (disk 2000), then straight on into disk 2001.
    done = 0
    for second in range(2, 52):
        done += 10 * MiB
        job = job.apply(events.Progress(done, sizes["2000"], "2000", 1e12), at(second))
    job = job.apply(events.DiskDone("2000", "52 aa/1", done, sizes["2000"]), at(51))
    job = job.apply(events.DiskStart("2001", "full", bytes_total=sizes["2001"]), at(51))
    # The client's own figure for a disk just started is 0: not the job's rate.
    job = job.apply(events.Progress(0, sizes["2001"], "2001", throughput_bps=0.0), at(51))
    assert job.rate_bps(at(51)) == pytest.approx(10 * MiB)
    # Then 40 MiB/s for 15 s: the window holds 15 s of each pace.
    copied = 0
    for second in range(52, 67):
        copied += 40 * MiB
        job = job.apply(events.Progress(copied, sizes["2001"], "2001", 1.0), at(second))
    expected = (15 * 10 * MiB + 15 * 40 * MiB) / RATE_WINDOW
    assert job.rate_bps(at(66)) == pytest.approx(expected)
    left = sizes["2000"] + sizes["2001"] - job.bytes_done
    assert job.eta_seconds(at(66)) == pytest.approx(left / expected)
    status = render.status(job, now=at(66))
    assert status["throughput_bps"] == round(expected, 1)
    assert status["eta_seconds"] == round(left / expected)
    body = render.progress(job, at(66))
    assert body["throughput"]["current_mbps"] == pytest.approx(expected / MiB)
    assert body["timing"]["eta_seconds"] == round(left / expected)
    # The SHA's telemetry reads the rate as of the last report.
    assert job.throughput_bps == pytest.approx(expected)


def test_a_client_that_stops_reporting_has_its_rate_fall() -> None:
    job = plan(make_job(("2000",)), {"2000": 1000 * MiB}, 0)
    job = job.apply(events.DiskStart("2000", "full", bytes_total=1000 * MiB), at(0))
    for second in range(1, 31):
        job = job.apply(events.Progress(second * 10 * MiB, 1000 * MiB, "2000"), at(second))
    assert job.rate_bps(at(30)) == pytest.approx(10 * MiB)
    # Within the grace after the last report, the window still ends at it.
    assert job.rate_bps(at(30 + REPORT_GRACE)) == pytest.approx(10 * MiB)
    # Later it follows the clock: 15 s of nothing in a 30 s window halves the rate.
    assert job.rate_bps(at(30 + REPORT_GRACE + 15)) == pytest.approx(5 * MiB)
    assert job.rate_bps(at(30 + REPORT_GRACE + 30)) == 0.0
    assert job.eta_seconds(at(30 + REPORT_GRACE + 30)) is None
    # A client that reports without moving: the same.
    for second in range(31, 61):
        job = job.apply(events.Progress(300 * MiB, 1000 * MiB, "2000"), at(second))
    assert job.rate_bps(at(60)) == 0.0


def test_ended_jobs_have_no_rate_but_an_average() -> None:
    job = plan(make_job(("2000",)), {"2000": 100 * MiB}, 0)
    job = job.apply(events.DiskStart("2000", "full", bytes_total=100 * MiB), at(0))
    job = job.apply(events.Progress(50 * MiB, 100 * MiB, "2000"), at(5))
    job = job.apply(events.DiskDone("2000", "52 aa/1", 100 * MiB, 100 * MiB), at(10))
    ended = job.ended(at(20), 0, None, None)
    status = render.status(ended, now=at(100))
    assert (status["throughput_bps"], status["eta_seconds"]) == (None, None)
    assert status["duration_seconds"] == 20.0
    assert status["average_rate_bps"] == round(100 * MiB / 20, 1)
    body = render.progress(ended, at(100))
    assert body["throughput"]["current_mbps"] == 0.0
    assert body["timing"]["eta_seconds"] == 0


def push(job: Job, when: float, **fields: object) -> Job:
    """A push of the legacy Go client, merged with the ones before as the route does."""
    return job.pushed_progress(parse_progress_update(fields, job.pushed), at(when))


def test_legacy_pushes_count_for_the_disk_its_lines_name() -> None:
    """The Go client's lines name each disk as it starts it; its pushes carry the bytes."""
    job = make_job(("2000", "2001"))
    job = push(job, 0, stage="Initializing", status="in_progress", percent=5)
    job = push(job, 1, stage="Creating Snapshot", status="in_progress", percent=15)
    # Its own percent is not ours: nothing is copied yet.
    assert job.progress_percent == 0.0
    job = job.apply(events.DiskStart("2000", "full", "no previous change ID"), at(2))
    job = job.apply(events.Progress(0, 4 * GiB, "2000"), at(2))
    job = push(job, 2, stage="Transfer", status="in_progress", sync_type="initial")
    job = push(job, 4, stage="Transfer", bytes_transferred=1 * GiB, total_bytes=9 * GiB)
    assert job.disks[0].bytes_done == 1 * GiB
    assert job.current_operation == "Transferring Data"
    # Disk 2001's size is not known yet: each disk weighs half.
    assert job.progress_percent == 12.5
    job = push(job, 6, stage="Transfer", bytes_transferred=2 * GiB, total_bytes=9 * GiB)
    assert job.rate_bps(at(6)) == pytest.approx(GiB / 2)
    job = push(job, 8, status="completed", bytes_transferred=9 * GiB, total_bytes=9 * GiB)
    assert job.disks[0].bytes_done == 2 * GiB, "a completed push is no disk's bytes"
    job = job.apply(events.Progress(4 * GiB, 4 * GiB, "2000"), at(8))
    job = job.apply(events.DiskDone("2000", "52 aa/1", 4 * GiB, 4 * GiB), at(8))
    assert job.progress_percent == 50.0
    job = job.apply(events.DiskStart("2001", "full", "no previous change ID"), at(9))
    job = job.apply(events.Progress(0, 1 * GiB, "2001"), at(9))
    # Its start push: 0 bytes, which the merge replaces by the last count.  Not news.
    job = push(job, 9, stage="Transfer", status="in_progress", bytes_transferred=0)
    assert job.disks[1].bytes_done == 0
    assert job.progress_percent == 50.0
    job = push(job, 10, bytes_transferred=512 * MiB, total_bytes=9 * GiB)
    assert job.disks[1].bytes_done == 512 * MiB
    assert job.progress_percent == 75.0
    assert job.bytes_total == 5 * GiB


def test_legacy_pushes_alone_count_disks_by_their_completed_pushes() -> None:
    """No line of the client was understood: its pushes are all there is."""
    job = make_job(("2000", "2001"))
    job = push(job, 0, stage="Transfer", status="in_progress", sync_type="initial")
    job = push(job, 2, stage="Transfer", bytes_transferred=1 * GiB, total_bytes=4 * GiB)
    assert job.progress_percent == 12.5
    job = push(job, 3, stage="Transfer", bytes_transferred=3 * GiB, total_bytes=4 * GiB)
    assert job.rate_bps(at(3)) == pytest.approx(2 * GiB)
    # The disk's last push says its bytes are the total: the disk's are what it counted.
    job = push(job, 4, status="completed", bytes_transferred=4 * GiB, total_bytes=4 * GiB)
    assert (job.progress_percent, job.bytes_done) == (50.0, 3 * GiB)
    # The second disk: its count starts again from 0 (the merge keeps 4 GiB).
    job = push(job, 5, status="in_progress", bytes_transferred=0)
    assert (job.progress_percent, job.bytes_done) == (50.0, 3 * GiB)
    job = push(job, 7, bytes_transferred=2 * GiB, total_bytes=4 * GiB)
    assert (job.progress_percent, job.bytes_done) == (75.0, 5 * GiB)
    # The second disk's last push: its end (a 0, which the merge replaces).
    job = push(job, 8, status="completed", bytes_transferred=0)
    assert job.progress_percent == 99.99
    assert job.bytes_done == 5 * GiB
