"""Helpers for backups through the whole system: the testbed, ``twistd sna`` and the real client.

The daemon runs with its default backup client (``sendense-backup-client``,
found beside its interpreter) and an ``--nbd-ports`` range that covers the
testbed hub's ports.  Jobs are started and followed through the HTTP API
only; what the targets hold is checked against the disks' flat files with
``qemu-img``, and snapshots are read with pyVmomi.  Nothing here asserts on
how long anything took.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from pyVim.connect import Disconnect

from tests.integration.harness import Api, Daemon, reaped
from tests.testbed import Testbed

KiB = 1 << 10
MiB = 1 << 20
#: The testbed's CBT block size in these tests.
BLOCK = 64 * KiB
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+$")
#: The daemon's default ``--sbc``: resolved on PATH, then beside the daemon's interpreter.
SBC = "sendense-backup-client"
#: Upper bound for one job of these tests; never a timing assertion.
JOB_DEADLINE = 90.0
POLL = 0.05
FINAL = ("completed", "failed", "cancelled", "interrupted")
#: An NBD request header (28 bytes) for each of a few hundred requests, the
#: handshake, FLUSH and DISC: what may cross the relay besides the data.
NBD_OVERHEAD = 8 * KiB


def start_sna(
    daemon_factory: Callable[..., Daemon], ports: range, *extra: str, name: str = "sna"
) -> Daemon:
    """A daemon of the test's own with the real client and ``ports`` as ``--nbd-ports``.

    The kill grace goes back to the daemon's default (the harness shortens
    it), so a cancelled client has time to remove its snapshot itself.
    """
    return daemon_factory(
        name=name,
        sbc=SBC,
        extra=(
            "--nbd-ports",
            f"{ports.start}-{ports.stop - 1}",
            "--kill-grace",
            "30",
            *extra,
        ),
    )


def nbd_targets(targets: Iterable[tuple[int, dict[str, Any]]]) -> str:
    """The ``nbd_targets`` text for ``(disk_key, target)`` pairs, in the order given."""
    return ",".join(f"{key}:{target['nbd_url']}" for key, target in targets)


def backup_request(
    testbed: Testbed,
    vm: str,
    job_id: str,
    targets: Mapping[int, dict[str, Any]],
    backup_type: str,
    **extra: Any,
) -> dict[str, Any]:
    """A ``/backup/start`` body in the SHA's shape for a VM of the testbed.

    ``vcenter_host`` is ``host:port`` and vCenter's certificate is pinned by
    the thumbprint the testbed reports.
    """
    vcenter = testbed.vcenter
    body: dict[str, Any] = {
        "job_id": job_id,
        "vm_name": vm,
        "vcenter_host": f"{vcenter['host']}:{vcenter['port']}",
        "vcenter_user": vcenter["user"],
        "vcenter_password": vcenter["password"],
        "vcenter_thumbprint": vcenter["thumbprint"],
        "vm_path": testbed.vm(vm)["path"],
        "nbd_targets": nbd_targets(sorted(targets.items())),
        "backup_type": backup_type,
        "nbd_host": "127.0.0.1",
    }
    body.update(extra)
    return body


@attrs.frozen
class Followed:
    """A job followed to its end: its final ``/status`` and every status seen on the way."""

    final: dict[str, Any]
    samples: list[dict[str, Any]]

    @property
    def disks(self) -> dict[int, dict[str, Any]]:
        """The final ``disks[]`` by integer disk key."""
        return by_key(self.final)

    def running_percents(self) -> list[float]:
        """``progress_percent`` of every sample taken while the job was running."""
        return [s["progress_percent"] for s in self.samples if s["status"] == "running"]


def by_key(status: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """A status's ``disks[]`` by integer disk key."""
    return {int(d["disk_key"]): d for d in status["disks"]}


def follow(api: Api, job_id: str, deadline: float = JOB_DEADLINE) -> Followed:
    """Poll ``/status/{job_id}`` until the job is final, keeping every answer."""
    samples: list[dict[str, Any]] = []
    end = time.monotonic() + deadline
    while True:
        status = api.status(job_id)
        samples.append(status)
        if status["status"] in FINAL:
            return Followed(status, samples)
        if time.monotonic() > end:
            pytest.fail(f"job {job_id} still running after {deadline:g} s: {status}")
        time.sleep(POLL)


def wait_running_until(
    api: Api,
    job_id: str,
    condition: Callable[[dict[str, Any]], bool],
    what: str,
    deadline: float = JOB_DEADLINE,
) -> dict[str, Any]:
    """Poll until ``condition(status)`` holds while the job still runs; fail if it ends first."""
    end = time.monotonic() + deadline
    while True:
        status = api.status(job_id)
        if status["status"] != "running":
            pytest.fail(f"job {job_id} ended before {what}: {status}")
        if condition(status):
            return status
        if time.monotonic() > end:
            pytest.fail(f"job {job_id}: no {what} after {deadline:g} s: {status}")
        time.sleep(POLL)


def run_backup(api: Api, body: dict[str, Any]) -> tuple[dict[str, Any], Followed]:
    """Start a job through the API and follow it to its end."""
    started = api.start(body)
    assert started["status"] == "started", started
    return started, follow(api, body["job_id"])


def assert_completed(followed: Followed) -> None:
    """The job ended ``completed``: exit 0, no error, 100 %."""
    final = followed.final
    assert final["status"] == "completed", final
    assert final["exit_code"] == 0 and final["error"] is None, final
    assert final["progress_percent"] == 100.0, final


def client_gone(pid: int, job_id: str) -> bool:
    """The job's client process has exited and been reaped by the daemon."""
    return reaped(pid, job_id)


# -- what the disks and targets hold ------------------------------------------------------------


def compare(testbed: Testbed, vm: str, disk_key: int, qcow2: str) -> None:
    """Assert a qcow2 (with its backing chain) holds exactly the disk's bytes."""
    flat = testbed.disk(vm, disk_key)["flat_file"]
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", flat, qcow2],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"{vm} disk {disk_key} vs {qcow2}: {result.stdout} {result.stderr}"
    )


def has_no_data(qcow2: str) -> bool:
    """Nothing of the qcow2 is allocated, not even as zeros: nothing was ever written to it."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", qcow2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return not any(extent["present"] or extent["data"] for extent in json.loads(out))


def blocks(ranges: Iterable[tuple[int, int]], capacity: int, block: int = BLOCK) -> int:
    """Bytes of the CBT blocks that ``(offset, length)`` ranges touch, clipped to the disk."""
    touched: set[int] = set()
    for offset, length in ranges:
        touched.update(range(offset // block, (offset + length - 1) // block + 1))
    return sum(min(block, capacity - b * block) for b in touched)


def serve_overlays(
    testbed: Testbed, vm: str, bases: Mapping[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Stop serving the bases (qemu-nbd locks backing files) and serve a qcow2 overlay on each."""
    for target in bases.values():
        testbed.stop_target(target["export"])
    return {
        key: testbed.add_target(vm, key, backing=Path(target["qcow2"]))
        for key, target in bases.items()
    }


def snapshots(testbed: Testbed, vm: str) -> list[str]:
    """Names of the VM's snapshots, read with pyVmomi."""
    si = testbed.connect()
    try:
        found = si.content.searchIndex.FindByInventoryPath(testbed.vm(vm)["path"])
        names: list[str] = []

        def walk(trees: Any) -> None:
            for tree in trees or []:
                names.append(tree.name)
                walk(tree.childSnapshotList)

        walk(found.snapshot.rootSnapshotList if found.snapshot else [])
        return names
    finally:
        Disconnect(si)
