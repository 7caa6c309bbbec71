"""``make demo``: a full and an incremental backup through the whole system.

Starts a testbed (the vCenter simulator with a two-disk VM holding data, and
the hub's qemu-nbd targets), starts ``twistd sna`` on a free loopback port,
backs the VM up in full through the API, changes some blocks, backs it up
incrementally into qcow2 overlays on the first backup, and checks each
backup with ``qemu-img compare`` against the disk.  Everything it started is
stopped at the end, whatever happened.  Loopback only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from tests.testbed import Testbed, human_size
from tests.testbed.sna import Sna

VM = "demo"
SPEC: dict[str, Any] = {
    "vms": [
        {
            "name": VM,
            "cbt_enabled": True,
            "disks": [
                {"capacity_bytes": 96 * 1024 * 1024, "controller": "scsi", "bus": 0},
                {"capacity_bytes": 40 * 1024 * 1024 + 512, "controller": "sata", "bus": 0},
            ],
        }
    ],
    "hub": True,
}
DEADLINE = 300.0


def say(text: str) -> None:
    print(text, flush=True)


def follow(sna: Sna, job_id: str) -> dict[str, Any]:
    """Print progress until the job ends; its last status."""
    shown: Optional[str] = None
    end = time.monotonic() + DEADLINE
    while True:
        status: dict[str, Any] = sna.call("GET", f"/api/v1/status/{job_id}")
        disks = "  ".join(
            f"{d['disk_key']}: {d['status']} {human_size(d['bytes_done'])}"
            + (f" ({d['sync_type']})" if d["sync_type"] else "")
            for d in status["disks"]
        )
        line = f"  {status['progress_percent']:6.2f}%  {status['current_operation']}  |  {disks}"
        if line != shown:
            say(line)
            shown = line
        if status["status"] != "running":
            return status
        if time.monotonic() > end:
            raise RuntimeError(f"job {job_id} still running after {DEADLINE:g} s")
        time.sleep(0.5)


def compare(flat: str, qcow2: str) -> bool:
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-q", "-f", "raw", "-F", "qcow2", flat, qcow2],
        check=False,
    )
    return result.returncode == 0


def backup(
    sna: Sna, testbed: Testbed, job_id: str, targets: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    vcenter = testbed.vcenter
    body = {
        "job_id": job_id,
        "vm_name": VM,
        "vcenter_host": f"{vcenter['host']}:{vcenter['port']}",
        "vcenter_user": vcenter["user"],
        "vcenter_password": vcenter["password"],
        "vcenter_thumbprint": vcenter["thumbprint"],
        "vm_path": testbed.vm(VM)["path"],
        "nbd_targets": ",".join(
            f"{t['disk_key']}:{t['nbd_url']}" for t in sorted(targets, key=lambda t: t["disk_key"])
        ),
        **extra,
    }
    started = sna.call("POST", "/api/v1/backup/start", body)
    say(f"  started {job_id}: backup client pid {started['pid']}")
    status = follow(sna, job_id)
    if status["status"] != "completed":
        raise RuntimeError(f"{job_id} ended {status['status']}: {status['error']}")
    return status


def check(testbed: Testbed, targets: list[dict[str, Any]]) -> bool:
    good = True
    for target in targets:
        flat = testbed.disk(VM, target["disk_key"])["flat_file"]
        same = compare(flat, target["qcow2"])
        good &= same
        verdict = "identical" if same else "DIFFERENT"
        say(f"  disk {target['disk_key']}: {Path(target['qcow2']).name} is {verdict} to the disk")
    return good


def main() -> int:
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            say(f"{tool} is missing: run make deps")
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sna-demo-"))
    testbed: Optional[Testbed] = None
    sna: Optional[Sna] = None
    try:
        say("Starting the testbed: vCenter simulator with CBT, and the hub's qemu-nbd targets")
        testbed = Testbed.start(SPEC, workdir / "testbed")
        keys = [d["key"] for d in testbed.vm(VM)["disks"]]
        for n, key in enumerate(keys):
            capacity = testbed.disk(VM, key)["capacity_bytes"]
            testbed.write(VM, key, 0, 8 << 20, seed=10 + n)
            testbed.write(VM, key, capacity // 2, 3 << 20, seed=20 + n)
            testbed.write(VM, key, capacity - 4096 * 3 - 512, 4096 * 3 + 512, seed=30 + n)
            say(f"  disk {key}: {human_size(capacity)}, data written in three regions")
        say(f"Starting sna (twistd) on 127.0.0.1, logs in {workdir}")
        sna = Sna(workdir / "sna")

        say("Full backup")
        fulls = [t for t in testbed.targets if t["vm"] == VM]
        status = backup(sna, testbed, f"backup-{VM}-full", fulls, backup_type="full")
        change_ids = {d["disk_key"]: d["change_id"] for d in status["disks"]}
        good = check(testbed, fulls)

        say("Changing blocks: a new region, the last partial block, a block zeroed")
        for n, key in enumerate(keys):
            capacity = testbed.disk(VM, key)["capacity_bytes"]
            testbed.write(VM, key, 20 << 20, 1 << 20, seed=40 + n)
            testbed.write(VM, key, capacity - 512, 512, seed=50 + n)
            testbed.write(VM, key, 1 << 20, 64 << 10, zero=True)

        say("Incremental backup into qcow2 overlays on the full backup")
        overlays = []
        for target in fulls:
            testbed.stop_target(target["export"])
            overlays.append(
                testbed.add_target(VM, target["disk_key"], backing=Path(target["qcow2"]))
            )
        status = backup(
            sna,
            testbed,
            f"backup-{VM}-incr",
            overlays,
            backup_type="incremental",
            previous_change_ids={str(k): v for k, v in change_ids.items()},
        )
        for disk in status["disks"]:
            say(
                f"  disk {disk['disk_key']}: {disk['sync_type']} ({disk['sync_reason']}), "
                f"{human_size(disk['bytes_to_hub'])} sent to the hub"
            )
        good &= check(testbed, overlays)
        say("Demo passed." if good else "Demo FAILED: a backup differs from its disk.")
        return 0 if good else 1
    except Exception as e:
        say(f"Demo failed: {e}")
        return 1
    finally:
        if sna is not None:
            sna.stop()
        if testbed is not None:
            testbed.stop()
        if os.environ.get("SNA_DEMO_KEEP"):
            say(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
