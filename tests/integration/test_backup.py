"""Backups end to end: start over HTTP, the double runs, the job ends as it should."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from sna.contract.argv import option_value
from tests.integration.harness import (
    Daemon,
    JobIds,
    backup_body,
    double_invocation,
    double_lines,
    nbd_ports,
    targets,
)

pytestmark = pytest.mark.integration

SHA_STATUS_KEYS = {"job_id", "status", "last_update", "progress_data"}
PROGRESS_KEYS = {
    "job_id",
    "status",
    "sync_type",
    "phase",
    "percentage",
    "current_operation",
    "bytes_transferred",
    "total_bytes",
    "throughput",
    "timing",
    "vm_info",
    "phases",
    "errors",
    "last_error",
}


def printed_change_ids(daemon: Daemon, job_id: str) -> dict[str, str]:
    """The change IDs the double printed in its ``disk_done`` events, by disk key."""
    found = {}
    for line in double_lines(daemon.job_log(job_id).read_text()):
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "disk_done":
                found[event["disk_key"]] = event["change_id"]
    return found


def check_started(answer: dict[str, object], job_id: str) -> None:
    assert set(answer) == {"job_id", "status", "message", "started_at", "pid"}
    assert answer["job_id"] == job_id
    assert answer["status"] == "started"
    assert answer["message"] == "Backup started for pgtest1"
    assert isinstance(answer["started_at"], str)
    datetime.strptime(answer["started_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert isinstance(answer["pid"], int) and answer["pid"] > 0


def test_full_backup_single_disk(sna: Daemon, job_ids: JobIds) -> None:
    """The seed's Test 1: one disk, full."""
    job_id = job_ids("full")
    port = nbd_ports(1)[0]
    body = backup_body(
        job_id, nbd_targets=f"2000:nbd://127.0.0.1:{port}/pgtest1-disk0", backup_type="full"
    )
    started = sna.api.start(body)
    check_started(started, job_id)

    status = sna.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert status["status"] == "completed", status
    assert status["exit_code"] == 0
    assert status["error"] is None
    assert status["progress_percent"] == 100
    assert status["vm_path"] == "/DC1/vm/pgtest1"
    assert status["pid"] == started["pid"]
    printed = printed_change_ids(sna, job_id)
    assert set(printed) == {"2000"}
    [disk] = status["disks"]
    assert disk["disk_key"] == "2000"
    assert disk["nbd_port"] == port
    assert disk["status"] == "completed"
    assert disk["change_id"] == printed["2000"]
    assert disk["bytes_done"] == disk["bytes_total"] > 0

    sha = sna.api.get(f"/api/v1/jobs/{job_id}/status")
    assert sha.status == 200
    sha_body = sha.json()
    assert SHA_STATUS_KEYS <= set(sha_body)
    assert sha_body["job_id"] == job_id
    assert sha_body["status"] == "completed"
    assert isinstance(sha_body["last_update"], str)
    assert set(sha_body["progress_data"]) == {"percent", "bytes_transferred", "current_operation"}
    assert sha_body["progress_data"]["percent"] == 100
    assert sha_body["progress_data"]["bytes_transferred"] == disk["bytes_total"]

    progress = sna.api.get(f"/api/v1/progress/{job_id}")
    assert progress.status == 200
    assert progress.headers["Cache-Control"] == "no-cache"
    upstream = progress.json()
    assert PROGRESS_KEYS <= set(upstream)
    assert upstream["job_id"] == job_id
    assert upstream["status"] == "completed"
    assert upstream["percentage"] == 100
    assert upstream["sync_type"] == "full"
    assert upstream["bytes_transferred"] == upstream["total_bytes"] == disk["bytes_total"]
    assert set(upstream["throughput"]) == {
        "current_mbps",
        "average_mbps",
        "peak_mbps",
        "last_update",
    }
    assert set(upstream["timing"]) == {
        "start_time",
        "last_update",
        "elapsed_ms",
        "phase_start",
        "phase_elapsed_ms",
        "eta_seconds",
    }
    assert set(upstream["vm_info"]) == {
        "name",
        "path",
        "disk_size_gb",
        "disk_size_bytes",
        "cbt_enabled",
    }
    assert upstream["vm_info"]["path"] == "/DC1/vm/pgtest1"
    assert len(upstream["phases"]) == 1
    assert upstream["errors"] == [] and upstream["last_error"] is None

    assert job_id in sna.api.job_ids("completed")
    assert job_id not in sna.api.job_ids("running")
    assert job_id not in sna.api.job_ids("failed")


def test_incremental_two_disks(sna: Daemon, job_ids: JobIds) -> None:
    """The seed's Test 2: two disks, incremental, first as the SHA sends it (PLACEHOLDER).

    ``PLACEHOLDER`` means "no previous change ID": the job starts, the client
    is given none, and each disk falls back to a full copy that says why.
    """
    placeholder_id = job_ids("placeholder")
    ports = nbd_ports(2)
    started = sna.api.start(
        backup_body(
            placeholder_id,
            disks=2,
            nbd_targets=targets(ports),
            backup_type="incremental",
            previous_change_id="PLACEHOLDER",
        )
    )
    check_started(started, placeholder_id)
    unknown = sna.api.wait_status(placeholder_id, "completed", "failed", "cancelled")
    assert unknown["status"] == "completed", unknown
    assert unknown["backup_type"] == "incremental"
    assert [(d["sync_type"], bool(d["sync_reason"])) for d in unknown["disks"]] == [
        ("full", True),
        ("full", True),
    ]
    argv = double_invocation(sna.job_log(placeholder_id).read_text())["argv"]
    assert option_value(argv, "--backup-type") == "incremental"
    assert "--previous-change-id" not in argv
    assert "PLACEHOLDER" not in argv

    # A change ID from a real full backup of the same VM.
    full_id = job_ids("base")
    sna.api.start(backup_body(full_id, disks=2))
    base = sna.api.wait_status(full_id, "completed", "failed")
    assert base["status"] == "completed", base
    previous = base["disks"][0]["change_id"]
    assert previous

    job_id = job_ids("incr")
    body = backup_body(
        job_id,
        nbd_targets=targets(ports),
        backup_type="incremental",
        previous_change_id=previous,
    )
    started = sna.api.start(body)
    check_started(started, job_id)
    status = sna.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert status["status"] == "completed", status
    assert status["exit_code"] == 0
    assert status["backup_type"] == "incremental"
    assert status["progress_percent"] == 100
    printed = printed_change_ids(sna, job_id)
    assert set(printed) == {"2000", "2001"}
    assert len(set(printed.values())) == 2, "the double gives each disk its own change ID"
    assert {d["disk_key"]: d["change_id"] for d in status["disks"]} == printed
    assert [d["nbd_port"] for d in status["disks"]] == ports
    assert all(d["status"] == "completed" for d in status["disks"])

    argv = double_invocation(sna.job_log(job_id).read_text())["argv"]
    assert option_value(argv, "--backup-type") == "incremental"
    assert option_value(argv, "--previous-change-id") == previous
    # The client is given the daemon's relays in front of the targets, not the targets.
    relay_ports = [d["relay_port"] for d in status["disks"]]
    assert all(isinstance(p, int) for p in relay_ports) and not set(relay_ports) & set(ports)
    relayed = ",".join(
        f"{key}:nbd://127.0.0.1:{port}/pgtest1-disk{i}"
        for i, (key, port) in enumerate(zip(["2000", "2001"], relay_ports, strict=True))
    )
    assert option_value(argv, "--nbd-targets") == relayed

    sha = sna.api.get(f"/api/v1/jobs/{job_id}/status").json()
    assert sha["status"] == "completed"
    assert sha["progress_data"]["bytes_transferred"] == sum(
        d["bytes_total"] for d in status["disks"]
    )
    listed = sna.api.jobs("completed")
    assert job_id in [j["job_id"] for j in listed["jobs"]]
    assert listed["count"] == len(listed["jobs"])


def test_client_fails(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("fail")
    sna.api.start(backup_body(job_id, vm="fail"))
    status = sna.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert status["status"] == "failed", status
    assert status["exit_code"] == 3
    assert "NBD write failed: connection reset" in status["error"]
    assert status["progress_percent"] < 100
    assert [d["status"] for d in status["disks"]] == ["failed"]

    sha = sna.api.get(f"/api/v1/jobs/{job_id}/status").json()
    assert sha["status"] == "failed"
    progress = sna.api.get(f"/api/v1/progress/{job_id}").json()
    assert progress["status"] == "failed"
    assert progress["errors"] and "NBD write failed" in progress["errors"][0]["message"]
    assert job_id in sna.api.job_ids("failed")
    assert job_id not in sna.api.job_ids("completed")


def test_client_crashes(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("crash")
    sna.api.start(backup_body(job_id, vm="crash"))
    status = sna.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert status["status"] == "failed", status
    assert status["exit_code"] == 2
    assert status["exit_signal"] is None
    assert "code 2" in status["error"]
    # The half JSON line it left on stdout is in the log but made no progress.
    log_text = sna.job_log(job_id).read_text()
    assert '"bytes_do' in log_text
    assert "process ended: exit_code=2" in log_text
    assert status["bytes_done"] == 0


def test_progress_while_running(sna: Daemon, job_ids: JobIds) -> None:
    """A job seen mid-copy: partial progress everywhere, listed as running."""
    job_id = job_ids("slow")
    sna.api.start(backup_body(job_id, vm="slow", disks=2))
    status = sna.api.wait_progress(job_id)
    assert status["status"] == "running", status
    assert 0 < status["progress_percent"] < 100
    assert status["exit_code"] is None and status["end_time"] is None
    assert job_id in sna.api.job_ids("running")
    sha = sna.api.get(f"/api/v1/jobs/{job_id}/status").json()
    assert sha["status"] == "running"
    assert 0 < sha["progress_data"]["bytes_transferred"]
    assert sha["progress_data"]["percent"] < 100
    progress = sna.api.get(f"/api/v1/progress/{job_id}").json()
    assert progress["status"] == "in_progress"
    assert progress["bytes_transferred"] > 0
    # 0 while a disk's size is still unknown (the upstream default), else the sum.
    assert progress["total_bytes"] == 0 or progress["bytes_transferred"] < progress["total_bytes"]
    assert 0 < progress["percentage"] < 100
    assert {d["disk_id"] for d in progress["disk_progresses"]} == {"2000", "2001"}

    final = sna.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert final["status"] == "completed", final
    assert final["progress_percent"] == 100
    assert job_id not in sna.api.job_ids("running")
