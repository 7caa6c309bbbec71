"""What ``/status`` and ``/progress`` say over time of a three-disk backup with one
empty disk (issue 12), through a real daemon.

With our client (the testbed's vCenter simulator with CBT, qemu-nbd targets,
``sendense-backup-client``): the bytes of the whole job are known before the
first disk is copied, the percentage is bytes-weighted and only grows, reaching
99.99 only once every byte is copied, an empty disk shows 100 % when done, and
the rate and the ETA are known during the first disk and do not fall to 0
between disks.  With the legacy Go client's lines and pushes (a double of
them, ``go_pusher.py``, under ``--sbc-legacy``): the disks weigh alike, the
percentage only grows and never jumps to 99.99 when the last disk starts.

Every sample is taken while the job runs, by polling; nothing asserts on how
long anything took.
"""

from __future__ import annotations

import itertools
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.backup_helpers import (
    BLOCK,
    JOB_DEADLINE,
    SBC,
    MiB,
    backup_request,
    blocks,
    compare,
)
from tests.integration.harness import Daemon, JobIds, backup_body
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

HUB_PORTS = range(10950, 11000)
FIRST = 512 * MiB
SECOND = 64 * MiB
SPEC: dict[str, Any] = {
    "cbt": {"block_size": BLOCK, "page_size": 8 * MiB},
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {
            "name": "truth3",
            "disks": [
                {"capacity_bytes": FIRST},
                {"capacity_bytes": SECOND},
                # Never written: nothing to copy.
                {"capacity_bytes": 16 * MiB},
            ],
        }
    ],
}

testbed = testbed_fixture(SPEC)


def sample_until_final(sna: Daemon, job_id: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``/status`` and ``/progress`` of the job, polled together until it is final."""
    samples = []
    end = time.monotonic() + JOB_DEADLINE
    path = quote(job_id, safe="")
    while True:
        status = sna.api.status(job_id)
        answer = sna.api.get(f"/api/v1/progress/{path}")
        assert answer.status == 200, answer
        samples.append((status, answer.json()))
        if status["status"] != "running":
            return samples
        if time.monotonic() > end:
            pytest.fail(f"job {job_id} still running: {status}")
        time.sleep(0.05)


def grows(values: list[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def test_our_client_three_disks_one_empty(
    testbed: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = testbed
    for offset in range(0, FIRST, 64 * MiB):
        tb.write("truth3", 2000, offset, 64 * MiB, seed=1 + offset // MiB)
    tb.write("truth3", 2001, 0, SECOND, seed=500)
    sizes = [blocks([(0, FIRST)], FIRST), blocks([(0, SECOND)], SECOND), 0]
    total = sum(sizes)
    # Small reads, one at a time: the first disk takes some reports, however fast the machine.
    sna = daemon_factory(
        name="truth",
        sbc=f"{SBC} --chunk-size {256 * 1024} --reads-in-flight 1",
        extra=("--nbd-ports", f"{HUB_PORTS.start}-{HUB_PORTS.stop - 1}", "--spare-clients", "0"),
    )
    targets = {key: tb.add_target("truth3", key) for key in (2000, 2001, 2002)}
    job = job_ids("truth3")
    sna.api.start(backup_request(tb, "truth3", job, targets, "full"))
    samples = sample_until_final(sna, job)
    final, final_progress = samples[-1]
    assert final["status"] == "completed", final
    running = [(s, p) for s, p in samples if s["status"] == "running"]
    copying = [(s, p) for s, p in running if s["bytes_done"] > 0]
    assert copying, "the job was never seen copying"

    # The whole job's bytes, known before the first byte: in every sample with bytes.
    for status, progress in copying:
        assert status["bytes_total"] == total, status
        assert progress["total_bytes"] == total, progress
    # Bytes-weighted, only growing, and 99.99 only once every byte is copied.
    for percents in (
        [s["progress_percent"] for s, _ in running],
        [p["percentage"] for _, p in running],
    ):
        assert grows(percents), percents
    for status, _ in running:
        share = 100 * status["bytes_done"] / total
        assert status["progress_percent"] == pytest.approx(min(share, 99.99), abs=0.01), status
    # The first disk's copy already has a rate and an ETA, and the rate holds between disks.
    first_disk = [
        (s, p) for s, p in copying if s["disks"][0]["status"] == "running" and s["throughput_bps"]
    ]
    assert first_disk, "no rate while the first disk was copied"
    for status, progress in first_disk:
        # Whole seconds: what is left over the same window's rate (0 when under half
        # a second is left, however fast the machine).
        left = (total - status["bytes_done"]) / status["throughput_bps"]
        assert status["eta_seconds"] is not None, status
        assert abs(status["eta_seconds"] - left) <= 1, (left, status)
        assert progress["timing"]["eta_seconds"] >= 0, progress
    measured = [s for s, _ in copying if s["throughput_bps"] is not None]
    later = measured[measured.index(first_disk[0][0]) :]
    assert all(s["throughput_bps"] > 0 for s in later), [s["throughput_bps"] for s in later]
    # The empty disk: nothing to copy, and 100 % once done.
    assert [d["bytes_total"] for d in final["disks"]] == sizes
    assert [d["percent"] for d in final_progress["disk_progresses"]] == [100.0, 100.0, 100.0]
    assert (final["progress_percent"], final_progress["percentage"]) == (100.0, 100.0)
    assert (final["throughput_bps"], final["eta_seconds"]) == (None, None)
    assert final["average_rate_bps"] > 0 and final["duration_seconds"] > 0
    for key, target in targets.items():
        compare(tb, "truth3", key, target["qcow2"])


PUSHER = Path(__file__).with_name("go_pusher.py")


def test_the_legacy_client_s_lines_and_pushes(
    daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    sna = daemon_factory(name="legacy", extra=("--sbc-legacy",), start=False)
    sna.sbc = " ".join(
        shlex.quote(word)
        for word in (sys.executable, str(PUSHER), "--sna-port", str(sna.port), "--mib", "8,4,0")
    )
    sna.start()
    job = job_ids("go3")
    sna.api.start(backup_body(job, vm="gopush", disks=3))
    samples = sample_until_final(sna, job)
    final, final_progress = samples[-1]
    assert final["status"] == "completed", final
    running = [(s, p) for s, p in samples if s["status"] == "running"]
    percents = [s["progress_percent"] for s, _ in running]
    assert grows(percents), percents
    assert grows([p["percentage"] for _, p in running])
    # Its own percent (5, 10) is not taken: nothing was copied then.
    before = [
        s for s, _ in running if s["bytes_done"] == 0 and s["disks"][0]["status"] == "pending"
    ]
    assert all(s["progress_percent"] == 0 for s in before), before
    # The disks weigh alike (their sizes come one by one): no jump to 99.99 when the
    # last, empty, disk starts; 99.99 only once it is done.
    for status, _ in running:
        done = [d["status"] for d in status["disks"]].count("completed")
        # A disk copied to its last byte weighs its whole third before its end is
        # reported, and the percent is rounded to two places: 66.67 with one done.
        assert status["progress_percent"] <= round(100 * (done + 1) / 3, 2), status
        if done < 3:
            assert status["progress_percent"] < 99.99, status
    # The pushes' bytes count for the disk its lines name, seen mid-disk.
    mid = [
        s
        for s, _ in running
        if s["disks"][0]["status"] == "running" and 0 < s["disks"][0]["bytes_done"] < 8 * MiB
    ]
    assert mid, "the first disk was never seen part copied"
    assert any(s["eta_seconds"] for s in mid), [s["eta_seconds"] for s in mid]
    assert [d["bytes_done"] for d in final["disks"]] == [8 * MiB, 4 * MiB, 0]
    assert [d["percent"] for d in final_progress["disk_progresses"]] == [100.0, 100.0, 100.0]
    assert final_progress["current_operation"] == "Completed"
