"""Replication jobs (``POST /api/v1/replicate``) through the whole system.

Real parts only: the testbed's vCenter simulator with CBT, its ``qemu-nbd``
targets serving qcow2 files, ``twistd -n sna`` with the real backup client
and its relays.  A replication keeps one copy of each disk up to date: the
second run writes into the same targets as the first, starting from the
change IDs sna's own chain kept.  What a target holds is compared byte for
byte with the disk's flat file (``qemu-img compare``); the expected byte
counts are computed here from the writes made.  Every process is stopped by
pid (the testbed by its fixture, daemons by ``daemon_factory``).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.backup_helpers import (
    CHANGE_ID,
    NBD_OVERHEAD,
    MiB,
    assert_completed,
    blocks,
    client_gone,
    compare,
    follow,
    snapshots,
    start_sna,
    wait_running_until,
)
from tests.integration.harness import Daemon, JobIds, wait_for
from tests.integration.test_ctl import ctl_env, run_ctl
from tests.shadouble.client import ShaDouble
from tests.shadouble.fixtures import sha_double_fixture
from tests.testbed import Testbed, hub, testbed_fixture

pytestmark = pytest.mark.integration

HUB_PORTS = range(11000, 11100)
#: A port of that range nothing listens on (the testbed's hub takes the first free ones).
DEAD_PORT = HUB_PORTS.stop - 1
BIG = 384 * MiB
SIZES = {
    "rpa": {2000: 6 * MiB + 512, 16000: 3 * MiB},
    "rpb": {2000: 4 * MiB},
    "rpresize": {2000: 4 * MiB},
    "rpbig": {2000: BIG},
}
SPEC: dict[str, Any] = {
    "cbt": {"block_size": 64 * 1024, "page_size": 8 * MiB},
    "hub": {"ports": [HUB_PORTS.start, HUB_PORTS.stop - 2]},
    "vms": [
        {
            "name": "rpa",
            "cbt_enabled": True,
            "disks": [
                {"capacity_bytes": SIZES["rpa"][2000]},
                {"capacity_bytes": SIZES["rpa"][16000], "controller": "sata"},
            ],
        },
        {"name": "rpb", "disks": [{"capacity_bytes": SIZES["rpb"][2000]}]},
        {"name": "rpresize", "cbt_enabled": True, "disks": [{"capacity_bytes": 4 * MiB}]},
        {"name": "rpbig", "disks": [{"capacity_bytes": BIG}]},
    ],
}
#: The second run's changes: (offset, length, seed) by VM and disk key.
CHANGES = {
    "rpa": {2000: [(1 * MiB + 100, 4000, 40), (6 * MiB, 512, 41)], 16000: [(2 * MiB, 70_000, 42)]},
    "rpb": {2000: [(0, 4096, 43)]},
}

testbed = testbed_fixture(SPEC)
sha = sha_double_fixture()


@pytest.fixture(scope="module")
def data(testbed: Testbed) -> Testbed:
    tb = testbed
    tb.write("rpa", 2000, 0, 2 * MiB, seed=1)
    tb.write("rpa", 2000, SIZES["rpa"][2000] - 1000, 1000, seed=2)
    tb.write("rpa", 16000, 1 * MiB, 300_000, seed=3)
    tb.write("rpb", 2000, 512 * 1024, 1 * MiB, seed=4)
    tb.write("rpresize", 2000, 0, 1 * MiB, seed=5)
    for offset in range(0, BIG, 64 * MiB):
        tb.write("rpbig", 2000, offset, 64 * MiB, seed=100 + offset // MiB)
    return tb


def target_entry(tb: Testbed, vm: str, key: int, **extra: Any) -> dict[str, Any]:
    target = tb.target(vm, key)
    return {
        "device_path": target["nbd_url"],
        "vm_disk_id": key - 2000,
        "vmware_disk_key": str(key),
        "vm_path": tb.vm(vm)["path"],
        **extra,
    }


def replicate_body(tb: Testbed, job_id: str, vms: list[str]) -> dict[str, Any]:
    """The SHA's ``/replicate`` body for ``vms``, every disk to its testbed target."""
    vcenter = tb.vcenter
    return {
        "job_id": job_id,
        "vcenter": f"{vcenter['host']}:{vcenter['port']}",
        "username": vcenter["user"],
        "password": vcenter["password"],
        "vcenter_thumbprint": vcenter["thumbprint"],
        "vm_paths": [tb.vm(vm)["path"] for vm in vms],
        "oma_url": "http://127.0.0.1:8082",
        "nbd_targets": [target_entry(tb, vm, key) for vm in vms for key in SIZES[vm]],
    }


def replicate(sna: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    answer = sna.api.post("/api/v1/replicate", body)
    assert answer.status == 200, answer
    started: dict[str, Any] = answer.json()
    assert (started["job_id"], started["status"]) == (body["job_id"], "started"), started
    assert started["vm_count"] == len(body["vm_paths"]), started
    return started


def by_key(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(d["disk_key"]): d for d in status["disks"]}


def write(tb: Testbed, vm: str) -> None:
    for key, ranges in CHANGES[vm].items():
        for offset, length, seed in ranges:
            tb.write(vm, key, offset, length, seed=seed)


# -- tests ---------------------------------------------------------------------------------------


def test_two_vms_full_then_incremental_into_the_same_targets(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    vms = ["rpa", "rpb"]

    # The first run: one job per VM, named after the request's job_id; every disk in full.
    first = job_ids("first")
    body = replicate_body(tb, first, vms)
    # One target as the SHA sends it when its SHA_NBD_HOST is unset: no host, meaning
    # the hub's port on the node's loopback.
    hostless = body["nbd_targets"][-1]
    hostless["device_path"] = hostless["device_path"].replace("nbd://127.0.0.1:", "nbd://:")
    assert hostless["device_path"].startswith("nbd://:"), hostless
    started = replicate(sna, body)
    assert [j["job_id"] for j in started["jobs"]] == [f"{first}-1", f"{first}-2"]
    group = sna.api.get(f"/api/v1/status/{first}")
    assert group.status == 200, group
    assert group.json()["kind"] == "replication"
    runs = {vm: follow(sna.api, f"{first}-{n}") for n, vm in enumerate(vms, 1)}
    previous: dict[tuple[str, int], str] = {}
    for vm, run in runs.items():
        assert_completed(run)
        assert run.final["kind"] == "replication", run.final
        assert run.final["replication"] == {
            "replication_id": first,
            "jobs": [f"{first}-1", f"{first}-2"],
        }
        assert run.final["vm_path"] == tb.vm(vm)["path"]
        for key, disk in by_key(run.final).items():
            assert (disk["sync_type"], disk["sync_reason"]) == (
                "full",
                "no previous change ID for this disk",
            ), disk
            assert CHANGE_ID.match(disk["change_id"]), disk
            previous[vm, key] = disk["change_id"]
            compare(tb, vm, key, tb.target(vm, key)["qcow2"])
        assert snapshots(tb, vm) == []
    # The request's job_id answers as its jobs together, on every route the SHA polls.
    status = sna.api.get(f"/api/v1/status/{first}").json()
    assert status["status"] == "completed" and status["progress_percent"] == 100.0, status
    assert {int(d["disk_key"]) for d in status["disks"]} == {2000, 16000}
    assert len(status["disks"]) == 3
    progress = sna.api.get(f"/api/v1/progress/{first}")
    assert progress.status == 200 and progress.json()["job_status"] == "completed", progress
    sha_status = sna.api.get(f"/api/v1/jobs/{first}/status")
    assert sha_status.status == 200 and sha_status.json()["status"] == "completed", sha_status
    for run in runs.values():
        pid, job_id = run.final["pid"], run.final["job_id"]
        wait_for(lambda pid=pid, job_id=job_id: client_gone(pid, job_id), "the client to go")

    # Guest writes, then the second run: the same targets, only the changed blocks move.
    for vm in vms:
        write(tb, vm)
    second = job_ids("second")
    replicate(sna, replicate_body(tb, second, vms))
    for n, vm in enumerate(vms, 1):
        run = follow(sna.api, f"{second}-{n}")
        assert_completed(run)
        for key, disk in by_key(run.final).items():
            old = previous[vm, key]
            changed = blocks([(o, n) for o, n, _ in CHANGES[vm][key]], SIZES[vm][key])
            assert disk["sync_type"] == "incremental", disk
            assert disk["sync_reason"] == f"changes since {old}", disk
            assert disk["previous_change_id"] == old
            assert disk["previous_change_id_from"] == "chain"
            assert disk["bytes_done"] == disk["bytes_total"] == changed, disk
            assert changed <= disk["bytes_to_hub"] <= changed + NBD_OVERHEAD, disk
            compare(tb, vm, key, tb.target(vm, key)["qcow2"])
        assert snapshots(tb, vm) == []


def test_the_sha_hears_each_change_id_then_the_end_with_its_token(
    data: Testbed,
    daemon_factory: Callable[..., Daemon],
    job_ids: JobIds,
    sha: ShaDouble,
    tmp_path: Path,
) -> None:
    tb = data
    token = "sha-token-" + hashlib.sha256(tmp_path.as_posix().encode()).hexdigest()[:16]
    token_file = tmp_path / "sha-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    sna = start_sna(
        daemon_factory, HUB_PORTS, "--sha-url", sha.url, "--sha-token-file", str(token_file)
    )
    job = job_ids("sha")
    replicate(sna, replicate_body(tb, job, ["rpa", "rpb"]))
    finals = {vm: follow(sna.api, f"{job}-{n}").final for n, vm in enumerate(["rpa", "rpb"], 1)}
    prefix = f"/api/v1/replications/{job}"
    wait_for(
        lambda: any(r["method"] == "PUT" for r in sha.requests(prefix)),
        "the replication job's end at the SHA",
    )
    sent = sha.requests(prefix)
    # Each disk's change ID, then (once both VMs have ended) one update with the end.
    assert [r["method"] for r in sent] == ["POST"] * 3 + ["PUT"], sent
    assert {r["route"] for r in sent} == {"replication-changeid", "replication-update"}
    assert all(r["status"] == 200 for r in sent), sent
    bearer = "Bearer sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert all(r["auth"] == bearer for r in sent), [r["auth"] for r in sent]
    assert token not in sna.output() and all(token not in r["body"] for r in sent)
    reported = sorted(
        (json.loads(r["body"])["disk_id"], json.loads(r["body"])["change_id"]) for r in sent[:3]
    )
    expected = sorted(
        (f"disk-{d['disk_key']}", d["change_id"])
        for final in finals.values()
        for d in final["disks"]
    )
    assert reported == expected
    end = json.loads(sent[3]["body"])
    assert (end["id"], end["status"], end["progress"]) == (job, "completed", 100.0), end
    assert end["replication_type"] == "initial" and end["error_message"] == "", end
    rows = sha.state()["replications"][job]
    assert rows["updates"][-1]["status"] == "completed"
    assert sorted(rows["change_ids"]) == ["disk-16000", "disk-2000"]
    # The backup telemetry route is the SHA's for backup jobs: replications never go there.
    assert sha.requests("/api/v1/telemetry/") == []
    for n in (1, 2):
        report = sna.api.status(f"{job}-{n}")["sha"]
        assert report["completion"]["state"] == "delivered", report
    # The end went with the job that ended last, and is delivered.
    ends = [sna.api.status(f"{job}-{n}")["sha"]["final_state"] for n in (1, 2)]
    assert [e["state"] for e in ends if e is not None] == ["delivered"], ends


def test_a_target_that_does_not_answer_starts_nothing(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    job = job_ids("dead")
    body = replicate_body(tb, job, ["rpa", "rpb"])
    dead = f"nbd://127.0.0.1:{DEAD_PORT}/rpb-gone"
    body["nbd_targets"][-1]["device_path"] = dead
    answer = sna.api.post("/api/v1/replicate", body)
    assert answer.status == 502, answer
    error = answer.json()
    assert error["error"] == "nbd_target_unreachable", error
    assert [(t["port"], t["export"]) for t in error["targets"]] == [(DEAD_PORT, "rpb-gone")]
    # Nothing started: no job of either VM, none under the request's id, no snapshot.
    for job_id in (job, f"{job}-1", f"{job}-2"):
        assert sna.api.get(f"/api/v1/status/{job_id}").status == 404
    assert sna.api.job_ids() == []
    assert snapshots(tb, "rpa") == [] and snapshots(tb, "rpb") == []
    assert sna.job_logs() == set()


def test_a_resized_disk_is_replicated_in_full_with_the_reason(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    first = job_ids("before")
    replicate(sna, replicate_body(tb, first, ["rpresize"]))
    run = follow(sna.api, first)
    assert_completed(run)
    assert by_key(run.final)[2000]["sync_type"] == "full"

    # The disk grows by 2 MiB; the hub grows its volume alike and serves it again.
    grown = 6 * MiB
    si = tb.connect()
    try:
        vm = si.content.searchIndex.FindByInventoryPath(tb.vm("rpresize")["path"])
        device: Any = next(
            d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        )
        device.capacityInKB = grown // 1024
        device.capacityInBytes = grown
        change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=device)
        WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))
    finally:
        Disconnect(si)
    target = tb.target("rpresize", 2000)
    tb.stop_target(target["export"])
    subprocess.run(["qemu-img", "resize", "-q", target["qcow2"], str(grown)], check=True)
    served = hub.serve(
        "rpresize",
        2000,
        target["export"],
        Path(target["qcow2"]),
        tb.workdir / "hub",
        ports=range(HUB_PORTS.start, HUB_PORTS.stop - 1),
    )
    tb._add_target(served)
    tb.write("rpresize", 2000, grown - 4096, 4096, seed=6)

    second = job_ids("after")
    replicate(sna, replicate_body(tb, second, ["rpresize"]))
    run = follow(sna.api, second)
    assert_completed(run)
    disk = by_key(run.final)[2000]
    assert disk["sync_type"] == "full", disk
    assert disk["previous_change_id_from"] == "chain", disk
    assert disk["capacity_bytes"] == grown, disk
    assert disk["sync_reason"] == (
        f"the disk was resized since the previous change ID ({4 * MiB} bytes then, {grown} now)"
    ), disk
    with open(tb.disk("rpresize", 2000)["flat_file"], "rb") as f:
        assert len(f.read()) == grown
    compare(tb, "rpresize", 2000, served.qcow2.as_posix())
    assert snapshots(tb, "rpresize") == []


def test_another_target_is_replicated_in_full_saying_where_the_chain_went(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    first = job_ids("old-target")
    replicate(sna, replicate_body(tb, first, ["rpb"]))
    assert_completed(follow(sna.api, first))
    old = tb.target("rpb", 2000)
    new = tb.add_target("rpb", 2000)
    body = replicate_body(tb, job_ids("new-target"), ["rpb"])
    body["nbd_targets"][0]["device_path"] = new["nbd_url"]
    replicate(sna, body)
    run = follow(sna.api, body["job_id"])
    assert_completed(run)
    disk = by_key(run.final)[2000]
    assert disk["sync_type"] == "full" and disk["previous_change_id"] is None, disk
    assert disk["sync_reason"] == (
        "no previous change ID for this disk: the last replication of disk 2000 "
        f"(job {first}) went to target 127.0.0.1/{old['export']}, "
        f"not 127.0.0.1/{new['export']}"
    ), disk
    compare(tb, "rpb", 2000, new["qcow2"])
    tb.stop_target(new["export"])


def test_cancel_of_a_replication_job(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    job = job_ids("cancel")
    replicate(sna, replicate_body(tb, job, ["rpbig", "rpb"]))
    wait_running_until(
        sna.api, f"{job}-1", lambda s: s["relay_bytes_to_hub"] > 16 * MiB, "bytes through the relay"
    )
    assert_completed(follow(sna.api, f"{job}-2"))
    # The request's job_id cancels what of it still runs.
    answer = sna.api.post(f"/api/v1/jobs/{job}/cancel")
    assert answer.status == 202, answer
    assert (answer.json()["job_id"], answer.json()["status"]) == (job, "cancelling")
    run = follow(sna.api, f"{job}-1")
    assert run.final["status"] == "cancelled", run.final
    assert run.final["kind"] == "replication"
    group = sna.api.status(job)
    assert (group["status"], group["kind"]) == ("cancelled", "replication"), group
    assert sna.api.post(f"/api/v1/jobs/{job}/cancel").status == 409
    # Counted as backups are: one completed, one cancelled.
    metrics = sna.api.get("/metrics").text
    assert 'sna_jobs_finished_total{result="completed"} 1.0' in metrics
    assert 'sna_jobs_finished_total{result="cancelled"} 1.0' in metrics
    wait_for(lambda: snapshots(tb, "rpbig") == [], "the cancelled job's snapshot to go")
    # Nothing of the cancelled disk entered the chain: its next run copies in full.
    again = job_ids("again")
    replicate(sna, replicate_body(tb, again, ["rpbig"]))
    status = wait_running_until(
        sna.api, again, lambda s: s["disks"][0]["sync_type"] is not None, "the disk's plan"
    )
    disk = status["disks"][0]
    assert (disk["sync_type"], disk["sync_reason"]) == (
        "full",
        "no previous change ID for this disk",
    ), disk
    assert sna.api.post(f"/api/v1/jobs/{again}/cancel").status == 202
    assert follow(sna.api, again).final["status"] == "cancelled"
    wait_for(lambda: snapshots(tb, "rpbig") == [], "the second snapshot to go")


def test_a_replication_running_when_sna_stops_is_interrupted_after_the_restart(
    data: Testbed, daemon_factory: Callable[..., Daemon], job_ids: JobIds, tmp_path: Path
) -> None:
    tb = data
    sna = start_sna(daemon_factory, HUB_PORTS)
    job = job_ids("restart")
    replicate(sna, replicate_body(tb, job, ["rpbig"]))
    wait_running_until(
        sna.api, job, lambda s: s["relay_bytes_to_hub"] > 16 * MiB, "bytes through the relay"
    )
    sna.stop(signal.SIGTERM)
    sna.start()
    status = sna.api.status(job)
    assert (status["status"], status["kind"]) == ("interrupted", "replication"), status
    assert status["replication"] == {"replication_id": job, "jobs": [job]}
    wait_for(lambda: snapshots(tb, "rpbig") == [], "the interrupted job's snapshot to go")
    log = sna.api.get(f"/api/v1/jobs/{job}/log")
    assert log.status == 200 and "snapshot" in log.text, log
    # The operator's tools see it as they see a backup.
    home = tmp_path / "home"
    home.mkdir()
    env = ctl_env(sna, home)
    listed = run_ctl(["jobs"], env)
    assert listed.returncode == 0 and job in listed.stdout, listed
    assert "interrupted" in listed.stdout.split(job, 1)[1].splitlines()[0], listed.stdout
    shown = run_ctl(["log", job], env)
    assert shown.returncode == 0 and "snapshot" in shown.stdout, shown


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b.pop("job_id"), "job_id"),
        (lambda b: b.update(job_id="a/b"), "job_id"),
        (lambda b: b.pop("password"), "password"),
        (lambda b: b.update(vcenter=""), "vcenter"),
        (lambda b: b.update(vm_paths=[]), "vm_paths"),
        (lambda b: b.update(vm_paths="/DC0/vm/x"), "vm_paths"),
        (lambda b: b.update(vm_paths=["/DC0/vm/x", "/DC0/vm/x/"]), "vm_paths"),
        (lambda b: b.update(nbd_targets=[]), "nbd_targets"),
        (lambda b: b["nbd_targets"][0].pop("vmware_disk_key"), "nbd_targets[0].vmware_disk_key"),
        (
            lambda b: b["nbd_targets"][0].update(vmware_disk_key="x1"),
            "nbd_targets[0].vmware_disk_key",
        ),
        (lambda b: b["nbd_targets"][0].pop("device_path"), "nbd_targets[0].device_path"),
        (
            lambda b: b["nbd_targets"][0].update(device_path="nbd://10.0.0.9:10105/x"),
            "nbd_targets[0].device_path",
        ),
        (
            lambda b: b["nbd_targets"][0].update(device_path="nbd://127.0.0.1:9/x"),
            "nbd_targets[0].device_path",
        ),
        (lambda b: b["nbd_targets"][0].update(vm_path="/DC0/vm/other"), "nbd_targets[0].vm_path"),
        (lambda b: b["nbd_targets"][0].update(vm_disk_id="0"), "nbd_targets[0].vm_disk_id"),
        (lambda b: b.update(oma_url=5), "oma_url"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    sna: Daemon, change: Callable[[dict[str, Any]], Any], field: str
) -> None:
    body: dict[str, Any] = {
        "job_id": "replication-bad-1",
        "vcenter": "127.0.0.1:8989",
        "username": "user",
        "password": "pass",
        "vm_paths": ["/DC0/vm/x"],
        "oma_url": "http://127.0.0.1:8082",
        "nbd_targets": [
            {
                "device_path": "nbd://127.0.0.1:10105/x-disk0",
                "vm_disk_id": 0,
                "vmware_disk_key": "2000",
                "vm_path": "/DC0/vm/x",
            }
        ],
    }
    change(body)
    answer = sna.api.post("/api/v1/replicate", body)
    assert answer.status == 400, answer
    error = answer.json()
    assert (error["error"], error["field"]) == ("invalid_request", field), error
    assert sna.api.get("/api/v1/status/replication-bad-1").status == 404
