"""``make demo``: a full and an incremental backup the SHA's way, through the whole system.

Starts the vCenter simulator with a two-disk VM holding data (a SCSI and a
SATA disk, so the SHA's positional disk keys are in play), a SHA test double
(tests/shadouble) and ``twistd sna --sha-url`` on free loopback ports.  The
double starts each backup as the SHA does: it discovers the VM through sna,
makes qcow2 files (whole GiB for the full, overlays on it for the
incremental), serves them with qemu-nbd and calls ``/backup/start`` with
``PLACEHOLDER``.  After each backup the demo prints what the hub received
(the change-ID lookups, the per-disk completions, the telemetry) and the rows
it keeps, and checks each qcow2 chain with ``qemu-img compare`` against its
disk.  Everything it started is stopped at the end, whatever happened.
Loopback only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Optional

from tests.shadouble.client import ShaDouble
from tests.testbed import Testbed, human_size
from tests.testbed.sna import Sna

VM = "demo vm"
#: sna's default --nbd-ports: the double serves its targets there, as the SHA does.
HUB_PORTS = range(10100, 10201)
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
}
DEADLINE = 300.0


def say(text: str) -> None:
    print(text, flush=True)


def follow(sna: Sna, job_id: str) -> dict[str, Any]:
    """Print progress until the job ends; its last status."""
    shown: Optional[str] = None
    end = time.monotonic() + DEADLINE
    path = f"/api/v1/status/{urllib.parse.quote(job_id, safe='')}"
    while True:
        status: dict[str, Any] = sna.call("GET", path)
        disks = "  ".join(
            f"disk {d['disk_index']} ({d['disk_key']}): {d['status']} {human_size(d['bytes_done'])}"
            + (f" {d['sync_type']}" if d["sync_type"] else "")
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


def hub_received(sha: ShaDouble, job_id: str, since: int) -> None:
    """What the SHA double got about ``job_id``, in the order it came, and the rows it keeps."""
    say("  The hub received, in this order:")
    for entry in sha.requests(since=since):
        path, answer = entry["path"], f"HTTP {entry['status']}"
        if path == "/api/v1/backups/changeid":
            query = urllib.parse.parse_qs(entry["query"])
            change_id = json.loads(entry["answer"]).get("change_id", "")
            say(
                f"    GET  changeid disk_id={query['disk_id'][0]}: "
                f"{answer}, change_id {change_id!r}"
            )
        elif path == f"/api/v1/backups/{job_id}/complete":
            body = json.loads(entry["body"])
            say(
                f"    POST complete disk_id={body['disk_id']} change_id {body['change_id']!r} "
                f"bytes_transferred={body['bytes_transferred']}: {answer}"
            )
        elif path == f"/api/v1/telemetry/backup/{job_id}":
            body = json.loads(entry["body"])
            disks = ", ".join(
                f"{d['disk_index']}:{d['status']} {d['progress_percent']:g}%" for d in body["disks"]
            )
            say(
                f"    POST telemetry {body['status']}/{body['current_phase']} "
                f"{body['progress_percent']:g}% {human_size(body['bytes_transferred'])} of "
                f"{human_size(body['total_bytes'])}"
                + (f" [{disks}]" if disks else "")
                + f": {answer}"
            )
    state = sha.state()
    row = ShaDouble.job(state, job_id)
    say(f"  The hub's job {job_id}: {row['status']}, {human_size(row['bytes_transferred'])}")
    for index, disk in sorted(ShaDouble.disks(state, job_id).items()):
        say(f"    disk {index}: {disk['status']}, change ID {disk['disk_change_id']!r}")


def backup(
    sha: ShaDouble, sna: Sna, testbed: Testbed, backup_type: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One backup started by the SHA double; its answer and sna's last status of the job."""
    vcenter = testbed.vcenter
    since = len(sha.requests())
    sha.advance_clock(1)  # the SHA's job ids are in seconds
    started = sha.backup(
        VM,
        backup_type,
        f"http://127.0.0.1:{sna.port}",
        {
            "host": f"{vcenter['host']}:{vcenter['port']}",
            "user": vcenter["user"],
            "password": vcenter["password"],
        },
        # Not sent by the real SHA: the simulator's self-signed certificate, pinned.
        sna_extra={"vcenter_thumbprint": vcenter["thumbprint"]},
    )
    job_id = started["backup_id"]
    say(f"  the SHA started {job_id}: targets {started['nbd_targets_string']}")
    status = follow(sna, job_id)
    if status["status"] != "completed":
        raise RuntimeError(f"{job_id} ended {status['status']}: {status['error']}")
    for disk in status["disks"]:
        say(
            f"  disk {disk['disk_index']} is VMware disk {disk['disk_key']} (target key "
            f"{disk['target_key']}): {disk['sync_type']} ({disk['sync_reason']})"
        )
    sha.wait(
        lambda s: (
            ShaDouble.job(s, job_id)["status"] == "completed"
            and any(
                r["path"] == f"/api/v1/telemetry/backup/{job_id}"
                and json.loads(r["body"])["status"] == "completed"
                for r in sha.requests(since=since)
            )
        ),
        "the hub to complete the job",
        deadline=60,
    )
    hub_received(sha, job_id, since)
    return started, status


def check(testbed: Testbed, started: dict[str, Any], status: dict[str, Any]) -> bool:
    good = True
    for disk in status["disks"]:
        flat = testbed.disk(VM, int(disk["disk_key"]))["flat_file"]
        qcow2 = started["qcow2_paths"][disk["disk_index"]]
        same = compare(flat, qcow2)
        good &= same
        say(
            f"  disk {disk['disk_index']}: {Path(qcow2).name} is "
            f"{'identical' if same else 'DIFFERENT'} to VMware disk {disk['disk_key']}"
        )
    return good


def main() -> int:
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            say(f"{tool} is missing: run make deps")
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sna-demo-"))
    testbed: Optional[Testbed] = None
    sha: Optional[ShaDouble] = None
    sna: Optional[Sna] = None
    try:
        say("Starting the vCenter simulator with CBT")
        testbed = Testbed.start(SPEC, workdir / "testbed")
        keys = [d["key"] for d in testbed.vm(VM)["disks"]]
        for n, key in enumerate(keys):
            capacity = testbed.disk(VM, key)["capacity_bytes"]
            testbed.write(VM, key, 0, 8 << 20, seed=10 + n)
            testbed.write(VM, key, capacity // 2, 3 << 20, seed=20 + n)
            testbed.write(VM, key, capacity - 4096 * 3 - 512, 4096 * 3 + 512, seed=30 + n)
            say(f"  disk {key}: {human_size(capacity)}, data written in three regions")
        say("Starting a SHA test double (tests/shadouble)")
        sha = ShaDouble(workdir / "sha", ports=HUB_PORTS).start()
        say(f"Starting sna (twistd) --sha-url {sha.url}, logs in {workdir}")
        sna = Sna(workdir / "sna", ["--sha-url", sha.url])

        say("Full backup, started by the SHA")
        started, status = backup(sha, sna, testbed, "full")
        good = check(testbed, started, status)

        say("Changing blocks: a new region, the last partial block, a block zeroed")
        for n, key in enumerate(keys):
            capacity = testbed.disk(VM, key)["capacity_bytes"]
            testbed.write(VM, key, 20 << 20, 1 << 20, seed=40 + n)
            testbed.write(VM, key, capacity - 512, 512, seed=50 + n)
            testbed.write(VM, key, 1 << 20, 64 << 10, zero=True)

        say("Incremental backup, started by the SHA: PLACEHOLDER, overlays on the full")
        started, status = backup(sha, sna, testbed, "incremental")
        for disk in status["disks"]:
            say(
                f"  disk {disk['disk_index']}: {human_size(disk['bytes_to_hub'])} sent to the hub, "
                f"from the change ID the SHA gave ({disk['previous_change_id_from']})"
            )
        good &= check(testbed, started, status)
        say("Demo passed." if good else "Demo FAILED: a backup differs from its disk.")
        return 0 if good else 1
    except Exception as e:
        say(f"Demo failed: {e}")
        return 1
    finally:
        if sna is not None:
            sna.stop()
        if sha is not None:
            sha.close()
        if testbed is not None:
            testbed.stop()
        if os.environ.get("SNA_DEMO_KEEP"):
            say(f"Kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
