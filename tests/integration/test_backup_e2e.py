"""Backups through the whole system, driven by the HTTP API only.

Everything is real: the testbed's vCenter simulator with CBT, the hub's
``qemu-nbd`` targets serving qcow2 files, ``twistd -n sna`` with its default
backup client (``sendense-backup-client``) and its byte-counting NBD relays.
Jobs are started with ``POST /api/v1/backup/start`` in the SHA's shape and
followed with ``/status``; the testbed only writes disk data, serves targets
(fresh qcow2 files, or overlays on an earlier backup for incrementals) and,
for one test, loses a target.  pyVmomi reads the snapshots.

What a target must hold is never taken from sna or the client: each qcow2 is
compared byte for byte with the disk's flat file (``qemu-img compare``; the
simulator's snapshots do not freeze data, so nothing writes to a disk while a
job runs), and the expected byte counts are computed here from the writes
made, rounded out to whole CBT blocks.  Loopback only; every process is
stopped by pid (the testbed by its fixture, daemons by ``daemon_factory``,
leftover clients by ``job_ids``).
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.backup_helpers import (
    BLOCK,
    CHANGE_ID,
    NBD_OVERHEAD,
    SBC,
    KiB,
    MiB,
    assert_completed,
    backup_request,
    blocks,
    by_key,
    client_gone,
    compare,
    follow,
    has_no_data,
    run_backup,
    serve_overlays,
    snapshots,
    start_sna,
    wait_running_until,
)
from tests.integration.harness import Daemon, JobIds, cmdline, wait_for
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

#: Not sna's default range, which the session's own NBD servers may fill; the
#: daemons of this module get it as --nbd-ports.
HUB_PORTS = range(10600, 10700)
ODD = {2000: 24 * MiB + 512, 2016: 9 * MiB + 3584, 16000: 5 * MiB + 1024}
BIG = 384 * MiB
#: Bytes through the relay after which a job counts as mid-copy (of BIG).
MID_COPY = 72 * MiB
WRONG_ID = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 01/1"

SPEC: dict[str, Any] = {
    # Pages smaller than the disks: the client must page QueryChangedDiskAreas.
    "cbt": {"block_size": BLOCK, "page_size": 8 * MiB},
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 1]},
    "vms": [
        {
            # CBT off: the client enables it (the VM has no snapshots).
            "name": "e2eodd",
            "disks": [
                {"capacity_bytes": ODD[2000]},
                {"capacity_bytes": ODD[2016], "controller": "scsi", "bus": 1},
                {"capacity_bytes": ODD[16000], "controller": "sata"},
            ],
        },
        {
            "name": "e2esha",
            "cbt_enabled": True,
            "disks": [
                {"capacity_bytes": 6 * MiB + 512},
                {"capacity_bytes": 3 * MiB, "controller": "sata"},
            ],
        },
        {
            "name": "e2ewrong",
            "disks": [{"capacity_bytes": 8 * MiB + 512}, {"capacity_bytes": 4 * MiB}],
        },
        {
            # Big enough that a cancel or a lost target lands mid-copy.
            "name": "e2ebig",
            "disks": [{"capacity_bytes": BIG}, {"capacity_bytes": 4 * MiB}],
        },
        {"name": "e2emap", "disks": [{"capacity_bytes": 2 * MiB}, {"capacity_bytes": 1 * MiB}]},
    ],
}

#: Writes by disk key: (offset, length, seed), seed None for zeros.
Writes = dict[int, list[tuple[int, int, int | None]]]

#: What the full backup of e2eodd finds.
ODD_DATA: Writes = {
    2000: [
        (0, 3 * MiB, 1),
        (7 * MiB + 512, 100_000, 2),  # unaligned, across block boundaries
        (12 * MiB, 256 * KiB, None),  # allocated and all zero: WRITE_ZEROES
        (ODD[2000] - 1000, 1000, 3),  # through the last, partial (512-byte) block
    ],
    2016: [(1 * MiB, 1536 * KiB, 4), (9 * MiB, 3584, 5)],  # the tail is a partial block
    16000: [(2 * MiB, 64 * KiB, 6), (ODD[16000] - 4096, 4096, 7)],
}
#: The changes the incremental must carry; none on 16000.
ODD_CHANGES: Writes = {
    2000: [
        (1 * MiB + 100, 4000, 40),  # inside one block
        (ODD[2000] - 512, 512, 41),  # the last, partial block alone
        (2 * MiB, BLOCK, None),  # a block of data that becomes all zero
        (16 * MiB - 1000, 300_000, 42),  # a new area, straddling blocks
    ],
    2016: [(6 * MiB, 200_000, 43)],
    16000: [],
}

testbed = testbed_fixture(SPEC)


def write_all(tb: Testbed, vm: str, writes: Writes) -> None:
    """Make the writes through the testbed (so CBT sees them)."""
    for key, ranges in writes.items():
        for offset, length, seed in ranges:
            if seed is None:
                tb.write(vm, key, offset, length, zero=True)
            else:
                tb.write(vm, key, offset, length, seed=seed)


def ranges_of(
    writes: list[tuple[int, int, int | None]], data_only: bool = False
) -> list[tuple[int, int]]:
    """The (offset, length) of the writes; with ``data_only``, of those that are not zeros."""
    return [(o, n) for o, n, seed in writes if seed is not None or not data_only]


@pytest.fixture(scope="module")
def data(testbed: Testbed) -> Iterator[Testbed]:
    """Each VM's first data: random areas, sparse gaps, allocated zeros, odd tails."""
    tb = testbed
    write_all(tb, "e2eodd", ODD_DATA)
    for key, seed in ((2000, 10), (16000, 11)):
        tb.write("e2esha", key, 0, 1 * MiB, seed=seed)
        tb.write("e2esha", key, 2 * MiB + 512, 300_000, seed=seed + 1)
    for key, seed in ((2000, 20), (2001, 21)):
        tb.write("e2ewrong", key, 0, 2 * MiB, seed=seed)
        tb.write("e2ewrong", key, 3 * MiB, 64 * KiB, seed=seed + 1)
    for offset in range(0, BIG, 64 * MiB):
        tb.write("e2ebig", 2000, offset, 64 * MiB, seed=100 + offset // MiB)
    tb.write("e2ebig", 2001, 0, 1 * MiB, seed=30)
    tb.write("e2emap", 2000, 0, 1 * MiB, seed=31)
    tb.write("e2emap", 2001, 4096, 8192, seed=32)
    yield tb


def hub_targets(tb: Testbed, vm: str) -> dict[int, dict[str, Any]]:
    """The targets the testbed's hub serves for a VM (currently), by disk key."""
    return {t["disk_key"]: t for t in tb.targets if t["vm"] == vm}


def check_progress_endpoint(sna: Daemon, job_id: str, status: str, job_status: str) -> None:
    """``/progress/{job_id}``: the SHA's ``status`` and the real ``job_status``."""
    answer = sna.api.get(f"/api/v1/progress/{job_id}")
    assert answer.status == 200, answer
    progress = answer.json()
    assert (progress["status"], progress["job_status"]) == (status, job_status), progress


def settled(tb: Testbed, target: dict[str, Any]) -> str:
    """Stop serving a target and return its qcow2, now with qemu-nbd's metadata written.

    Until a FLUSH or its exit, qemu-nbd may keep new clusters' metadata in
    memory, and ``qemu-img map -U`` of the file would show nothing written.
    """
    tb.stop_target(target["export"])
    qcow2: str = target["qcow2"]
    return qcow2


def cancel(sna: Daemon, job_id: str) -> None:
    """``POST /jobs/{job_id}/cancel``, accepted."""
    answer = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 202, answer
    assert answer.json()["status"] == "cancelling"


# -- tests ---------------------------------------------------------------------------------------


def test_full_then_incremental_of_odd_disks(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """Three disks on three controllers, odd sizes, sparse: a full, then an incremental."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    bases = hub_targets(tb, "e2eodd")
    assert set(bases) == set(ODD)

    # The full: every disk of three controllers, odd capacities, sparse; run by the
    # real client as a spare (started before the job, handed it over its stdin).
    sna.api.wait_spare_ready()
    job = job_ids("full")
    started, full = run_backup(sna.api, backup_request(tb, "e2eodd", job, bases, "full"))
    assert_completed(full)
    assert f" in spare client pid {started['pid']} " in sna.job_log(job).read_text()
    assert full.running_percents(), "the job was never seen running"
    assert all(p <= 99.99 for p in full.running_percents()), full.running_percents()
    check_progress_endpoint(sna, job, "completed", "completed")
    assert full.final["relay_bytes_to_hub"] > 0
    assert full.final["relay_bytes_to_hub"] == sum(d["bytes_to_hub"] for d in full.disks.values())
    for key, disk in full.disks.items():
        allocated = blocks(ranges_of(ODD_DATA[key]), ODD[key])
        data_bytes = blocks(ranges_of(ODD_DATA[key], data_only=True), ODD[key])
        assert disk["status"] == "completed", disk
        assert (disk["sync_type"], disk["sync_reason"]) == ("full", "backup_type full requested")
        assert CHANGE_ID.match(disk["change_id"]), disk
        assert disk["previous_change_id"] is None
        assert disk["bytes_done"] == disk["bytes_total"] == allocated, disk
        # The data crossed the relay; the zeros went as WRITE_ZEROES (no payload; the data
        # keeps apart from them), the gaps not at all.
        assert data_bytes <= disk["bytes_to_hub"] <= data_bytes + NBD_OVERHEAD, disk
        assert disk["nbd_port"] == bases[key]["port"] and disk["target_error"] is None
        compare(tb, "e2eodd", key, bases[key]["qcow2"])
    assert snapshots(tb, "e2eodd") == []
    wait_for(lambda: client_gone(started["pid"], job), "the full's client to be reaped")

    # Changes, then an incremental into qcow2 overlays on the full.
    write_all(tb, "e2eodd", ODD_CHANGES)
    overlays = serve_overlays(tb, "e2eodd", bases)
    previous = {str(k): d["change_id"] for k, d in full.disks.items()}
    job = job_ids("incr")
    body = backup_request(tb, "e2eodd", job, overlays, "incremental", previous_change_ids=previous)
    sna.api.wait_spare_ready()  # the replacement spare
    _, incr = run_backup(sna.api, body)
    assert_completed(incr)
    assert " in spare client pid " in sna.job_log(job).read_text()
    assert all(p <= 99.99 for p in incr.running_percents()), incr.running_percents()
    for key, disk in incr.disks.items():
        changed = blocks(ranges_of(ODD_CHANGES[key]), ODD[key])
        changed_data = blocks(ranges_of(ODD_CHANGES[key], data_only=True), ODD[key])
        old, new = previous[str(key)], disk["change_id"]
        assert disk["sync_type"] == "incremental", disk
        assert disk["sync_reason"] == f"changes since {old}"
        assert disk["previous_change_id"] == old
        assert new.split("/")[0] == old.split("/")[0], (old, new)
        assert int(new.split("/")[1]) > int(old.split("/")[1]), (old, new)
        assert disk["bytes_done"] == disk["bytes_total"] == changed, disk
        # Only the changed blocks crossed the relay, the zeroed one as WRITE_ZEROES.
        assert changed_data <= disk["bytes_to_hub"] <= changed_data + NBD_OVERHEAD, disk
        assert disk["bytes_to_hub"] < ODD[key] // 8, disk
        compare(tb, "e2eodd", key, overlays[key]["qcow2"])
    assert snapshots(tb, "e2eodd") == []


def test_sha_placeholder_incremental_falls_back_to_full(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """The SHA's request without a change ID: accepted, and every disk copied in full."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    targets = hub_targets(tb, "e2esha")
    job = job_ids("placeholder")
    body = backup_request(
        tb, "e2esha", job, targets, "incremental", previous_change_id="PLACEHOLDER"
    )
    _, run = run_backup(sna.api, body)
    assert_completed(run)
    assert run.final["backup_type"] == "incremental"
    for key, disk in run.disks.items():
        assert disk["sync_type"] == "full", disk
        assert disk["sync_reason"] == "no previous change ID for this disk", disk
        assert disk["previous_change_id"] is None
        assert CHANGE_ID.match(disk["change_id"]), disk
        compare(tb, "e2esha", key, targets[key]["qcow2"])
    assert snapshots(tb, "e2esha") == []


def test_a_ca_file_adds_to_the_system_s_cas_for_discover_and_backup_alike(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds, tmp_path: Path
) -> None:
    """The simulator's certificate among the "system" CAs (SSL_CERT_FILE, which the client
    inherits) and an unrelated --vcenter-ca-file: the daemon's /discover and the client's
    backup both trust vCenter.  (The client once trusted only the file.)"""
    tb = data
    other = tmp_path / "other-ca.pem"
    other.write_bytes(other_ca_pem())
    sna = daemon_factory(
        name="cafile",
        sbc=SBC,
        extra=(
            "--nbd-ports",
            f"{HUB_PORTS.start}-{HUB_PORTS.stop - 1}",
            "--vcenter-ca-file",
            str(other),
        ),
        env={"SSL_CERT_FILE": tb.vcenter["cert_file"]},
    )
    vcenter = tb.vcenter
    found = sna.api.post(
        "/api/v1/discover",
        {
            "vcenter": f"{vcenter['host']}:{vcenter['port']}",
            "username": vcenter["user"],
            "password": vcenter["password"],
            "filter": "e2esha",
        },
    )
    assert found.status == 200, found
    targets = hub_targets(tb, "e2esha")
    body = backup_request(tb, "e2esha", job_ids("cafile"), targets, "full")
    del body["vcenter_thumbprint"]
    _, run = run_backup(sna.api, body)
    assert_completed(run)
    for key, target in targets.items():
        compare(tb, "e2esha", key, target["qcow2"])


def other_ca_pem() -> bytes:
    """A CA certificate that signed nothing here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unrelated-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_wrong_or_reset_change_id_means_full_for_that_disk(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """Another instance's change ID for one disk, then a CBT reset: those disks go full."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    bases = hub_targets(tb, "e2ewrong")
    _, full = run_backup(sna.api, backup_request(tb, "e2ewrong", job_ids("full"), bases, "full"))
    assert_completed(full)
    ids = {str(k): d["change_id"] for k, d in full.disks.items()}
    tb.write("e2ewrong", 2000, 1 * MiB, 4096, seed=50)
    tb.write("e2ewrong", 2001, 2 * MiB + 512, 4096, seed=51)

    # Disk 2001's ID has the right shape but another tracking instance's UUID.
    overlays = serve_overlays(tb, "e2ewrong", bases)
    previous = {"2000": ids["2000"], "2001": WRONG_ID}
    body = backup_request(
        tb, "e2ewrong", job_ids("wrong"), overlays, "incremental", previous_change_ids=previous
    )
    _, mixed = run_backup(sna.api, body)
    assert_completed(mixed)
    disks = mixed.disks
    assert disks[2000]["sync_type"] == "incremental", disks[2000]
    assert disks[2000]["bytes_total"] == BLOCK
    assert disks[2001]["sync_type"] == "full", disks[2001]
    assert disks[2001]["sync_reason"].startswith(
        "the previous change ID is of another CBT tracking instance"
    ), disks[2001]
    assert disks[2001]["previous_change_id"] == WRONG_ID
    for key, target in overlays.items():
        compare(tb, "e2ewrong", key, target["qcow2"])

    # A CBT reset (off, then on): every disk's tracking instance changes.
    si = tb.connect()
    try:
        vm = si.content.searchIndex.FindByInventoryPath(tb.vm("e2ewrong")["path"])
        for enabled in (False, True):
            WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=enabled)))
    finally:
        Disconnect(si)
    tb.write("e2ewrong", 2001, 0, 4096, seed=52)
    again = serve_overlays(tb, "e2ewrong", overlays)
    previous = {str(k): d["change_id"] for k, d in disks.items()}
    body = backup_request(
        tb, "e2ewrong", job_ids("reset"), again, "incremental", previous_change_ids=previous
    )
    _, reset = run_backup(sna.api, body)
    assert_completed(reset)
    for key, disk in reset.disks.items():
        assert disk["sync_type"] == "full", disk
        assert "CBT was reset" in disk["sync_reason"], disk
        compare(tb, "e2ewrong", key, again[key]["qcow2"])
    assert snapshots(tb, "e2ewrong") == []


def mid_copy(key: int) -> Callable[[dict[str, Any]], bool]:
    """The job is well into copying disk ``key``.

    The client reports bytes once a second, which on this disk may be most
    of the copy; the relay's live counter shows data moving much sooner.
    Past the client's 64 MiB in flight, writes have been acknowledged.
    """

    def check(status: dict[str, Any]) -> bool:
        disk = by_key(status)[key]
        return bool(disk["bytes_done"] > 0 or disk["bytes_to_hub"] > MID_COPY)

    return check


def test_cancel_mid_copy(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """A cancel mid-copy: the client removes the snapshot and exits; no change ID."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    targets = {key: tb.add_target("e2ebig", key) for key in (2000, 2001)}
    job = job_ids("cancel")
    started = sna.api.start(backup_request(tb, "e2ebig", job, targets, "full"))
    wait_running_until(sna.api, job, mid_copy(2000), "bytes copied")
    cancel(sna, job)
    run = follow(sna.api, job)
    final = run.final
    assert final["status"] == "cancelled", final
    assert final["error"] == "cancelled by request", final
    # The client stopped on SIGTERM by itself, after its cleanup (not SIGKILLed).
    assert (final["exit_code"], final["exit_signal"]) == (128 + signal.SIGTERM, None), final
    for disk in run.disks.values():
        assert disk["change_id"] is None, disk
        assert disk["status"] == "failed", disk
    # Mid-way: part of the disk reached the target, not all of it.
    assert run.disks[2000]["bytes_to_hub"] < BIG, "the copy was not stopped mid-way"
    assert not has_no_data(settled(tb, targets[2000]))
    assert snapshots(tb, "e2ebig") == []
    wait_for(lambda: client_gone(started["pid"], job), "the cancelled client to be reaped")
    # The SHA knows only "completed" and "failed" as final progress states.
    check_progress_endpoint(sna, job, "failed", "cancelled")


def test_target_killed_mid_copy(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """The hub's qemu-nbd dies mid-copy: the job fails naming the target; no change ID."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    targets = {key: tb.add_target("e2ebig", key) for key in (2000, 2001)}
    lost = targets[2000]
    job = job_ids("nbdkill")
    started = sna.api.start(backup_request(tb, "e2ebig", job, targets, "full"))
    wait_running_until(sna.api, job, mid_copy(2000), "bytes copied")
    os.kill(lost["pid"], signal.SIGKILL)
    run = follow(sna.api, job)
    final = run.final
    assert final["status"] == "failed", final
    assert final["error"].startswith("backup client exited with code 1: "), final
    assert "disk 2000: lost the connection to target" in final["error"], final
    disk = run.disks[2000]
    assert disk["status"] == "failed" and disk["change_id"] is None, disk
    assert disk["target_error"] is not None, disk
    assert disk["target_error"].startswith(f"NBD target {lost['port']} ({lost['export']}) dropped")
    assert disk["bytes_to_hub"] < BIG, "the copy was not cut mid-way"
    assert run.disks[2001]["change_id"] is None, run.disks[2001]
    assert snapshots(tb, "e2ebig") == []
    wait_for(lambda: client_gone(started["pid"], job), "the failed client to be reaped")


def test_client_killed_mid_copy_has_its_snapshot_removed_by_the_daemon(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """The client SIGKILLed mid-copy: failed, no change ID, and the daemon removes the
    snapshot the client could not (with the request's credentials, kept in memory)."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    targets = {key: tb.add_target("e2ebig", key) for key in (2000, 2001)}
    job = job_ids("sbckill")
    sna.api.wait_spare_ready()  # a spare: its argv names no job, the daemon still cleans up
    started = sna.api.start(backup_request(tb, "e2ebig", job, targets, "full"))
    wait_running_until(sna.api, job, mid_copy(2000), "bytes copied")
    assert any(a.endswith("sendense-backup-client") for a in cmdline(started["pid"]))
    assert "standby" in cmdline(started["pid"])
    assert f" in spare client pid {started['pid']} " in sna.job_log(job).read_text()
    os.kill(started["pid"], signal.SIGKILL)
    run = follow(sna.api, job)
    final = run.final
    assert final["status"] == "failed", final
    assert final["error"].startswith("backup client was killed by signal 9"), final
    assert (final["exit_code"], final["exit_signal"]) == (None, signal.SIGKILL), final
    for disk in run.disks.values():
        assert disk["change_id"] is None and disk["status"] == "failed", disk
        # The relay lost its client, not the hub.
        assert disk["target_error"] is None, disk
    wait_for(lambda: client_gone(started["pid"], job), "the killed client to be reaped")
    wait_for(lambda: snapshots(tb, "e2ebig") == [], "the daemon to remove the snapshot")

    # The operator's route finds nothing left to remove.
    v = tb.vcenter
    answer = sna.api.post(
        "/api/v1/cleanup",
        {
            "action": "delete_snapshot",
            "job_id": job,
            "vcenter": f"{v['host']}:{v['port']}",
            "username": v["user"],
            "password": v["password"],
            "vcenter_thumbprint": v["thumbprint"],
        },
    )
    assert answer.status == 200, answer
    assert answer.json()["removed"] == []


def test_unknown_disk_key_fails_before_any_write(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    """A target for a disk the VM lacks: the job fails after the snapshot, before any write."""
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    targets = {key: tb.add_target("e2emap", key) for key in (2000, 2001)}
    # A real, served export (the daemon probes every target) under a key the VM lacks.
    targets[2999] = tb.add_target("e2emap", 2000, export="e2emap-nosuchdisk")
    job = job_ids("unknown-key")
    started, run = run_backup(sna.api, backup_request(tb, "e2emap", job, targets, "full"))
    final = run.final
    assert final["status"] == "failed", final
    assert "2999" in final["error"] and "nothing was copied" in final["error"], final
    assert final["relay_bytes_to_hub"] == 0, final
    for key, disk in run.disks.items():
        assert disk["status"] == "failed" and disk["change_id"] is None, disk
        assert disk["sync_type"] is None, disk
        assert has_no_data(settled(tb, targets[key])), f"disk {key}'s target was written"
    assert snapshots(tb, "e2emap") == []
    wait_for(lambda: client_gone(started["pid"], job), "the failed client to be reaped")
