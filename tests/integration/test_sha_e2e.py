"""Backups the SHA's way, end to end: the SHA double starts them and keeps what the hub keeps.

Everything is real: the testbed's vCenter simulator with CBT, ``twistd -n sna``
with ``--sha-url`` and its default backup client, and the SHA double
(``tests/shadouble``), which discovers the VM through sna, sizes fresh qcow2
files in whole GiB or makes overlays on its chain, serves them with qemu-nbd
and calls ``/backup/start`` with ``PLACEHOLDER`` exactly as the SHA does.  It
answers the node's change-ID lookups, per-disk completions and telemetry with
the SHA's strictness; the assertions read its rows and its request log.  What
a target must hold is checked against the disks' flat files with ``qemu-img
compare``.  Loopback only; every process is stopped by pid.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.backup_helpers import (
    CHANGE_ID,
    MiB,
    backup_request,
    blocks,
    compare,
    follow,
    snapshots,
    start_sna,
)
from tests.integration.harness import Daemon, JobIds, wait_for
from tests.shadouble.client import TEST_PORTS, ShaDouble
from tests.shadouble.fixtures import sha_double_fixture
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

#: The testbed hub's ports (for jobs the SHA double does not start) and the double's.
HUB_PORTS = range(10600, 10700)
NBD_PORTS = range(HUB_PORTS.start, TEST_PORTS.stop)
#: A space and a non-ASCII letter, within the SHA's 35 characters (sha-contract.md §6).
MIXED = "Büro Server (2)"
SIZES = {2000: 9 * MiB + 512, 16000: 5 * MiB}
#: The SHA's disk index of each: "disk-16000" sorts before "disk-2000".
INDEX = {16000: 0, 2000: 1}
BLOCK = 64 * 1024

SPEC: dict[str, Any] = {
    "cbt": {"block_size": BLOCK},
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {
            # A SCSI and a SATA disk: the SHA keys their targets 2000 and 2001.
            "name": MIXED,
            "cbt_enabled": True,
            "disks": [
                {"capacity_bytes": SIZES[2000]},
                {"capacity_bytes": SIZES[16000], "controller": "sata"},
            ],
        },
        {
            "name": "shadown",
            "cbt_enabled": True,
            "disks": [{"capacity_bytes": 3 * MiB}, {"capacity_bytes": 2 * MiB}],
        },
        {"name": "shafail", "cbt_enabled": True, "disks": [{"capacity_bytes": 2 * MiB}]},
        {
            # Enough to be cancelled mid-job.
            "name": "shacancel",
            "cbt_enabled": True,
            "disks": [{"capacity_bytes": 256 * MiB}],
        },
        {"name": "shaunknown", "cbt_enabled": True, "disks": [{"capacity_bytes": 2 * MiB}]},
    ],
}

testbed = testbed_fixture(SPEC)
sha = sha_double_fixture()
#: The SHA's job statuses; its disk rows' (sha-contract.md §2.3).
JOB_STATUSES = {"pending", "running", "completed", "failed", "cancelled"}
DISK_STATUSES = {"pending", "running", "completed", "failed"}


def vcenter(tb: Testbed) -> dict[str, str]:
    """The credentials the SHA keeps for the VM's vCenter."""
    vc = tb.vcenter
    return {"host": f"{vc['host']}:{vc['port']}", "user": vc["user"], "password": vc["password"]}


def pin(tb: Testbed) -> dict[str, str]:
    """What the real SHA does not send: the simulator's self-signed certificate, pinned."""
    return {"vcenter_thumbprint": tb.vcenter["thumbprint"]}


def sna_url(sna: Daemon) -> str:
    return f"http://127.0.0.1:{sna.port}"


def quoted(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def requests_of(double: ShaDouble, job_id: str, route: str) -> list[dict[str, Any]]:
    """What the node sent the double about ``job_id`` on ``route`` (complete, telemetry)."""
    prefix = {
        "complete": f"/api/v1/backups/{job_id}/complete",
        "telemetry": f"/api/v1/telemetry/backup/{job_id}",
    }[route]
    return [r for r in double.requests() if r["path"] == prefix]


def bodies(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(e["body"]) for e in entries]


def completed_at_the_sha(double: ShaDouble, job_id: str) -> dict[str, Any]:
    """Wait until the SHA's parent row of ``job_id`` is completed; its state."""
    return double.wait(
        lambda s: s if ShaDouble.job(s, job_id)["status"] == "completed" else None,
        f"the SHA to complete {job_id}",
        deadline=60,
    )


def sha_backup(
    double: ShaDouble, tb: Testbed, sna: Daemon, vm: str, backup_type: str
) -> dict[str, Any]:
    """A backup started by the SHA double; its answer.  The double's clock moves a second
    first, so two backups of one VM never share a job id (the SHA's are in seconds)."""
    double.advance_clock(1)
    return double.backup(vm, backup_type, sna_url(sna), vcenter(tb), sna_extra=pin(tb))


def final_pushed(double: ShaDouble, job_id: str) -> list[dict[str, Any]]:
    """Wait until the request log holds the job's final telemetry (the double logs a
    request once it has answered it); the job's telemetry requests."""

    def final() -> list[dict[str, Any]]:
        found = requests_of(double, job_id, "telemetry")
        last = json.loads(found[-1]["body"]) if found else {}
        return found if last.get("status") not in (None, "running") else []

    return wait_for(final, f"the final telemetry of {job_id}")


def check_telemetry(entries: list[dict[str, Any]], disks: int, final: str) -> None:
    """Every push was taken; the running ones name every disk by index with statuses the
    SHA's column holds; the last one is ``final``."""
    assert entries, "no telemetry"
    assert all(e["status"] == 200 for e in entries), [(e["status"], e["answer"]) for e in entries]
    pushed = bodies(entries)
    running = [b for b in pushed if b["status"] == "running"]
    assert running, "no telemetry while the job ran"
    for body in running:
        assert [d["disk_index"] for d in body["disks"]] == list(range(disks)), body
        assert {d["status"] for d in body["disks"]} <= DISK_STATUSES - {"completed"}, body
        for field in ("bytes_transferred", "total_bytes", "transfer_speed_bps", "eta_seconds"):
            assert type(body[field]) is int, (field, body)
    assert pushed[0]["status"] == "running", "the first push is the job's start"
    assert pushed[-1]["status"] == final, pushed[-1]
    assert all(b["status"] in JOB_STATUSES for b in pushed)


# -- tests ---------------------------------------------------------------------------------------


def test_a_full_then_an_incremental_the_sha_s_way(
    testbed: Testbed, sha: ShaDouble, daemon_factory: Callable[..., Daemon]
) -> None:
    """A VM named with a space and an umlaut, a SCSI and a SATA disk keyed 2000 and 2001 by
    the SHA, a full into fresh GiB-sized qcow2 files, then an incremental started with
    PLACEHOLDER into overlays: change IDs from the SHA, only the changed blocks moved,
    every disk row completed with its change ID, both chains equal to the disks."""
    tb = testbed
    for key, seed in ((2000, 1), (16000, 2)):
        tb.write(MIXED, key, 0, 1 * MiB, seed=seed)
        tb.write(MIXED, key, SIZES[key] - 4096, 4096, seed=seed + 10)
    sna = start_sna(daemon_factory, NBD_PORTS, "--sha-url", sha.url)

    full = sha_backup(sha, tb, sna, MIXED, "full")
    job = full["backup_id"]
    assert job.startswith(f"backup-{MIXED}-")
    assert full["nbd_targets_string"].startswith(f"2000:nbd://127.0.0.1:{full['ports'][0]}/")
    final = follow(sna.api, job).final
    assert final["status"] == "completed", final
    # The SHA's disk i is disk-<key> i in text order; sna says which target went where.
    by_index = {d["disk_index"]: d for d in final["disks"]}
    for key, index in INDEX.items():
        disk = by_index[index]
        assert (disk["disk_key"], disk["target_key"]) == (str(key), str(2000 + index)), disk
        assert disk["sync_type"] == "full" and CHANGE_ID.match(disk["change_id"]), disk
        assert disk["capacity_bytes"] == SIZES[key]
    job_log = sna.job_log(job).read_text()
    assert "the targets are keyed the SHA's way" in job_log

    state = completed_at_the_sha(sha, job)
    final_pushed(sha, job)
    rows = ShaDouble.disks(state, job)
    for key, index in INDEX.items():
        row = rows[index]
        assert row["status"] == "completed", row
        assert row["disk_change_id"] == by_index[index]["change_id"]
        assert row["bytes_transferred"] == by_index[index]["bytes_done"]
        compare(tb, MIXED, key, full["qcow2_paths"][index])
    assert state["completion_branch_runs"] == {job: 1}
    assert not any(p["running"] for p in state["qemu_nbd"] if p["job"] == job)
    completes = requests_of(sha, job, "complete")
    assert [
        (b["disk_id"], e["status"]) for b, e in zip(bodies(completes), completes, strict=True)
    ] == [
        (0, 200),
        (1, 200),
    ]
    telemetry = requests_of(sha, job, "telemetry")
    check_telemetry(telemetry, 2, "completed")
    # In order: every completion after the last running push, the final state after them.
    assert telemetry[-2]["seq"] < completes[0]["seq"] < completes[1]["seq"] < telemetry[-1]["seq"]
    # What sna says of it: the SHA took the completion of every disk, then the final state.
    assert final["sha"]["completion"]["state"] in ("pending", "delivered")
    report = wait_for(
        lambda: (lambda r: r if r["final_state"]["state"] == "delivered" else None)(
            sna.api.status(job)["sha"]
        ),
        "sna to record the final state delivered",
    )
    assert report["completion"]["state"] == "delivered"
    assert [d["state"] for d in report["completion"]["disks"]] == ["delivered", "delivered"]
    assert report["telemetry"]["stopped"] is None and report["telemetry"]["delivered"] >= 1
    metrics = sna.api.get("/metrics").text
    assert 'sna_sha_requests_total{outcome="delivered",route="complete"} 2.0' in metrics
    assert 'sna_sha_messages{state="delivered"} 3.0' in metrics
    assert 'sna_sha_messages{state="pending"} 0.0' in metrics
    assert state["problems"] == [], state["problems"]

    # Changes, then an incremental exactly as the SHA starts it.
    changes = {2000: [(2 * MiB + 100, 5000)], 16000: [(4 * MiB, BLOCK)]}
    for key, writes in changes.items():
        for offset, length in writes:
            tb.write(MIXED, key, offset, length, seed=offset % 251)
    incr = sha_backup(sha, tb, sna, MIXED, "incremental")
    assert incr["sna_request"]["previous_change_id"] == "PLACEHOLDER"
    job2 = incr["backup_id"]
    second = follow(sna.api, job2).final
    assert second["status"] == "completed", second
    lookups = [
        r for r in sha.requests("/api/v1/backups/changeid") if r["seq"] > completes[-1]["seq"]
    ]
    asked = sorted(urllib.parse.parse_qs(r["query"])["disk_id"][0] for r in lookups)
    assert asked == ["0", "1"], lookups
    state = completed_at_the_sha(sha, job2)
    final_pushed(sha, job2)
    rows2 = ShaDouble.disks(state, job2)
    for disk in second["disks"]:
        index, key = disk["disk_index"], int(disk["disk_key"])
        assert disk["sync_type"] == "incremental", disk
        assert disk["previous_change_id"] == by_index[index]["change_id"]
        assert disk["previous_change_id_from"] == "sha"
        # Only the changed blocks, though the overlay is a whole GiB and the disk not.
        assert disk["bytes_done"] == blocks(changes[key], SIZES[key], BLOCK), disk
        assert rows2[index]["disk_change_id"] == disk["change_id"] != by_index[index]["change_id"]
        compare(tb, MIXED, key, incr["qcow2_paths"][index])
    assert state["completion_branch_runs"] == {job: 1, job2: 1}
    check_telemetry(requests_of(sha, job2, "telemetry"), 2, "completed")
    assert snapshots(tb, MIXED) == []


def test_a_sha_that_is_down_gets_every_completion_once_even_across_a_restart(
    testbed: Testbed, sha: ShaDouble, daemon_factory: Callable[..., Daemon]
) -> None:
    tb = testbed
    tb.write("shadown", 2000, 0, 2 * MiB, seed=5)
    tb.write("shadown", 2001, 1 * MiB, 1 * MiB, seed=6)
    sna = start_sna(daemon_factory, NBD_PORTS, "--sha-url", sha.url)
    started = sha_backup(sha, tb, sna, "shadown", "full")
    job = started["backup_id"]
    sha.down()
    try:
        assert follow(sna.api, job).final["status"] == "completed"
        wait_for(
            lambda: sna.api.status(job)["sha"]["completion"]["disks"][0]["attempts"] >= 1,
            "a first, refused, attempt at the first completion",
        )
        assert sna.api.status(job)["sha"]["completion"]["state"] == "pending"
        sna.restart()
        assert sna.api.status(job)["sha"]["completion"]["state"] == "pending"
    finally:
        sha.up()
    state = completed_at_the_sha(sha, job)
    for index, row in ShaDouble.disks(state, job).items():
        assert row["status"] == "completed" and row["disk_change_id"], (index, row)
    # The double logs a request once it has answered it.
    completes = wait_for(
        lambda: (lambda found: found if len(found) >= 2 else None)(
            requests_of(sha, job, "complete")
        ),
        "both completions in the request log",
    )
    assert sorted(json.loads(e["body"])["disk_id"] for e in completes) == [0, 1]
    assert all(e["status"] == 200 for e in completes)
    assert state["completion_branch_runs"] == {job: 1}
    wait_for(
        lambda: sna.api.status(job)["sha"]["final_state"]["state"] == "delivered",
        "the final state to be delivered",
    )
    assert sna.api.status(job)["sha"]["completion"]["state"] == "delivered"
    for key, qcow2 in zip((2000, 2001), started["qcow2_paths"], strict=True):
        compare(tb, "shadown", key, qcow2)


def test_a_failed_job_completes_nothing_and_says_failed(
    testbed: Testbed, sha: ShaDouble, daemon_factory: Callable[..., Daemon]
) -> None:
    tb = testbed
    sna = start_sna(daemon_factory, NBD_PORTS, "--sha-url", sha.url)
    sha.advance_clock(1)
    started = sha.backup(
        "shafail",
        "full",
        sna_url(sna),
        vcenter(tb),
        vm_path="/DC0/vm/no-such-vm",
        disks=[{"id": "disk-2000", "size_gb": 1}],
        sna_extra=pin(tb),
    )
    job = started["backup_id"]
    final = follow(sna.api, job).final
    assert final["status"] == "failed", final
    state = sha.wait(
        lambda s: s if ShaDouble.job(s, job)["status"] == "failed" else None, "the SHA's failed row"
    )
    row = ShaDouble.job(state, job)
    assert row["error_message"] == final["error"]
    assert {d["status"] for d in ShaDouble.disks(state, job).values()} == {"failed"}
    pushed = bodies(final_pushed(sha, job))
    assert pushed[-1]["status"] == "failed" and pushed[-1]["error"]["message"] == final["error"]
    assert requests_of(sha, job, "complete") == []
    assert final["sha"]["completion"] is None


def test_a_cancelled_job_completes_nothing_and_says_cancelled(
    testbed: Testbed, sha: ShaDouble, daemon_factory: Callable[..., Daemon]
) -> None:
    tb = testbed
    for offset in range(0, 256 * MiB, 32 * MiB):
        tb.write("shacancel", 2000, offset, 32 * MiB, seed=offset // MiB)
    sna = start_sna(daemon_factory, NBD_PORTS, "--sha-url", sha.url)
    job = sha_backup(sha, tb, sna, "shacancel", "full")["backup_id"]
    answer = sna.api.post(f"/api/v1/jobs/{quoted(job)}/cancel")
    assert answer.status == 202, answer
    final = follow(sna.api, job).final
    assert final["status"] == "cancelled", final
    state = sha.wait(
        lambda s: s if ShaDouble.job(s, job)["status"] == "cancelled" else None,
        "the SHA's cancelled row",
    )
    assert {d["status"] for d in ShaDouble.disks(state, job).values()} == {"failed"}
    pushed = bodies(final_pushed(sha, job))
    assert pushed[-1]["status"] == "cancelled" and "error" not in pushed[-1]
    assert requests_of(sha, job, "complete") == []
    assert snapshots(tb, "shacancel") == []


def test_a_job_the_sha_does_not_know_stops_being_pushed(
    testbed: Testbed, sha: ShaDouble, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """Started by someone else than the SHA: it answers 500 to telemetry, 404 to /complete.
    The backup itself is fine; the pushes end, and the job's status says why."""
    tb = testbed
    tb.write("shaunknown", 2000, 0, 1 * MiB, seed=9)
    sna = start_sna(daemon_factory, NBD_PORTS, "--sha-url", sha.url)
    targets = {t["disk_key"]: t for t in tb.targets if t["vm"] == "shaunknown"}
    job = job_ids("unknown")
    answer = sna.api.start(backup_request(tb, "shaunknown", job, targets, "full"))
    assert answer["status"] == "started"
    assert follow(sna.api, job).final["status"] == "completed"
    report = wait_for(
        lambda: (lambda r: r if r["final_state"]["state"] == "given_up" else None)(
            sna.api.status(job)["sha"]
        ),
        "the final state to be given up",
        60,
    )
    assert report["completion"]["state"] == "refused"
    assert "HTTP 404" in report["completion"]["error"]
    pushes = requests_of(sha, job, "telemetry")
    assert all(e["status"] == 500 for e in pushes)
    # Bounded: at most three live pushes and three of the final state.
    assert 3 <= len(pushes) <= 6, len(pushes)
    compare(tb, "shaunknown", 2000, targets[2000]["qcow2"])
