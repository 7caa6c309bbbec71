"""The vSphere testbed itself: the simulator's inventory, CBT answers and hub, with pyVmomi.

One testbed serves the module (each test uses its own VM of the spec); the
``up``/``down`` tests start their own through the command line.  Expected CBT
answers are computed here from the writes made, independently of the
simulator: the written byte ranges rounded out to whole CBT blocks.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.testbed import Testbed, TestbedError, load_spec, pattern, testbed_fixture
from tests.testbed.core import hub_options
from tests.testbed.procs import ProcessRecord, is_running, stop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BLOCK = 64 * 1024
PAGE = 16 * MiB
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+$")
DEADLINE = 20.0
#: The hub's ports in these tests: not sna's default range (10100-10200), which the
#: integration session's own NBD servers may fill.
HUB = {"ports": [10300, 10399]}

SPEC: dict[str, Any] = {
    "cbt": {"block_size": BLOCK, "page_size": PAGE},
    "vms": [
        {
            # Only read: its flat files stay untouched.
            "name": "pgtest1",
            "cpus": 2,
            "memory_mb": 2048,
            "disks": [
                {"capacity_bytes": 64 * MiB, "controller": "scsi", "bus": 0},
                {"capacity_bytes": 10 * MiB + 512, "controller": "scsi", "bus": 0},
                {"capacity_bytes": 32 * MiB + 4096, "controller": "sata", "bus": 0},
                {"capacity_bytes": 8 * MiB, "controller": "nvme", "bus": 1},
                {"capacity_bytes": 4 * MiB, "controller": "ide", "bus": 1},
                {"capacity_bytes": 16 * MiB, "controller": "scsi", "bus": 2, "unit": 3},
            ],
        },
        {
            "name": "cbtvm",
            "folder": "backup/tests",
            "disks": [
                {"capacity_bytes": 64 * MiB + 4096},
                {"capacity_bytes": 16 * MiB, "controller": "sata"},
                {"capacity_bytes": 4 * MiB, "controller": "sata"},
            ],
        },
        {
            "name": "resetvm",
            "disks": [{"capacity_bytes": 8 * MiB}, {"capacity_bytes": 8 * MiB}],
        },
        {
            "name": "offvm",
            "power": "off",
            "cbt_enabled": True,
            "disks": [{"capacity_bytes": 4 * MiB, "controller": "nvme"}],
        },
        {"name": "growvm", "disks": [{"capacity_bytes": 4 * MiB}]},
    ],
    "hub": HUB,
}

#: (key, controller class, bus, unit) of pgtest1's disks, by ESXi's numbering.
PGTEST1_DISKS = [
    (2000, vim.vm.device.ParaVirtualSCSIController, 0, 0),
    (2001, vim.vm.device.ParaVirtualSCSIController, 0, 1),
    (16000, vim.vm.device.VirtualAHCIController, 0, 0),
    (32015, vim.vm.device.VirtualNVMEController, 1, 0),
    (3002, vim.vm.device.VirtualIDEController, 1, 0),
    (2035, vim.vm.device.ParaVirtualSCSIController, 2, 3),
]

testbed = testbed_fixture(SPEC)


@pytest.fixture(scope="module")
def si(testbed: Testbed) -> Iterator[Any]:
    instance = testbed.connect()
    yield instance
    Disconnect(instance)


def find_vm(si: Any, testbed: Testbed, name: str) -> Any:
    vm = si.content.searchIndex.FindByInventoryPath(testbed.vm(name)["path"])
    assert vm is not None, f"{testbed.vm(name)['path']} is not in the inventory"
    return vm


def disks_of(devices: Iterable[Any]) -> dict[int, Any]:
    return {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}


# -- CBT helpers ----------------------------------------------------------------


def blocks(
    writes: Iterable[tuple[int, int]], capacity: int, start: int = 0
) -> list[tuple[int, int]]:
    """The byte ranges CBT must report for ``writes`` of (offset, length)."""
    touched = set()
    for offset, length in writes:
        touched.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))
    areas: list[tuple[int, int]] = []
    for block in sorted(touched):
        lo, hi = max(block * BLOCK, start), min((block + 1) * BLOCK, capacity)
        if lo >= hi:
            continue
        if areas and areas[-1][0] + areas[-1][1] == lo:
            areas[-1] = (areas[-1][0], hi - areas[-1][0])
        else:
            areas.append((lo, hi - lo))
    return areas


def merge(areas: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(areas):
        if merged and merged[-1][0] + merged[-1][1] >= start:
            end = max(merged[-1][0] + merged[-1][1], start + length)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        else:
            merged.append((start, length))
    return merged


def query(
    vm: Any, snapshot: Any, key: int, change_id: str, start: int = 0
) -> list[tuple[int, int]]:
    """QueryChangedDiskAreas over the rest of the disk, page by page, as a client must."""
    devices = (snapshot.config if snapshot is not None else vm.config).hardware.device
    capacity = disks_of(devices)[key].capacityInBytes
    areas: list[tuple[int, int]] = []
    offset = start
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(
            snapshot=snapshot, deviceKey=key, startOffset=offset, changeId=change_id
        )
        assert info.startOffset == offset
        assert 0 < info.length <= PAGE
        for area in info.changedArea:
            assert offset <= area.start and area.start + area.length <= offset + info.length
            areas.append((area.start, area.length))
        offset += info.length
    assert offset == capacity
    return merge(areas)


def snapshot(vm: Any, name: str) -> Any:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    assert task.info.entity == vm
    return task.info.result


def change_ids(snap: Any) -> dict[int, str]:
    return {key: d.backing.changeId for key, d in disks_of(snap.config.hardware.device).items()}


def reconfigure(vm: Any, **spec: Any) -> None:
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(**spec)))


def write(
    testbed: Testbed, vm: str, key: int, offset: int, length: int, **how: Any
) -> tuple[int, int]:
    answer = testbed.write(vm, key, offset, length, **how)
    assert answer["offset"] == offset and answer["length"] == length
    return offset, length


# -- inventory -------------------------------------------------------------------


def test_inventory_has_the_spec_disks(testbed: Testbed, si: Any) -> None:
    vm = find_vm(si, testbed, "pgtest1")
    assert vm.config.hardware.numCPU == 2 and vm.config.hardware.memoryMB == 2048
    assert vm.runtime.powerState == "poweredOn"
    devices = {d.key: d for d in vm.config.hardware.device}
    disks = disks_of(vm.config.hardware.device)
    assert list(disks) == [key for key, *_ in PGTEST1_DISKS]
    declared = SPEC["vms"][0]["disks"]
    for (key, controller_type, bus, unit), spec_disk in zip(PGTEST1_DISKS, declared, strict=True):
        disk = disks[key]
        capacity = spec_disk["capacity_bytes"]
        assert disk.capacityInBytes == capacity
        assert disk.capacityInKB == capacity // 1024
        controller = devices[disk.controllerKey]
        assert isinstance(controller, controller_type)
        assert (controller.busNumber, disk.unitNumber) == (bus, unit)
        assert key in controller.device
        assert disk.backing.thinProvisioned
        assert disk.deviceInfo.label.startswith("Hard disk ")
        assert disk.backing.changeId is None  # CBT is off on this VM

    described = testbed.vm("pgtest1")
    assert described["path"] == "/DC0/vm/pgtest1"
    for disk_info, (key, *_) in zip(described["disks"], PGTEST1_DISKS, strict=True):
        assert disk_info["key"] == key
        assert disk_info["capacity_bytes"] == disks[key].capacityInBytes
        flat = Path(disk_info["flat_file"])
        assert flat.name.endswith("-flat.vmdk")
        assert flat.is_relative_to(Path(testbed.vcenter["datastore_dir"]))
        stat = flat.stat()
        assert stat.st_size == disk_info["capacity_bytes"]
        assert stat.st_blocks == 0  # a fresh thin disk allocates nothing
        descriptor = flat.with_name(flat.name.replace("-flat.vmdk", ".vmdk"))
        assert f'"{flat.name}"' in descriptor.read_text()

    assert find_vm(si, testbed, "cbtvm").parent.name == "tests"
    assert testbed.vm("cbtvm")["path"] == "/DC0/vm/backup/tests/cbtvm"
    assert vm.snapshot is None  # an unset property answers None, not a dropped connection


def test_tls_and_credentials(testbed: Testbed) -> None:
    vc = testbed.vcenter
    assert (vc["host"], vc["url"]) == ("127.0.0.1", f"https://127.0.0.1:{vc['port']}/sdk")
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((vc["host"], vc["port"])))
    sha1 = hashlib.sha1(der).hexdigest().upper()
    assert vc["thumbprint"] == ":".join(sha1[i : i + 2] for i in range(0, len(sha1), 2))
    # Not a publicly trusted certificate.  (The context must be explicit: without
    # one, pyVmomi skips verification for 127.0.0.1, localhost and ::1 by itself.)
    with pytest.raises(ssl.SSLCertVerificationError):
        SmartConnect(
            host=vc["host"],
            port=vc["port"],
            user=vc["user"],
            pwd=vc["password"],
            sslContext=ssl.create_default_context(),
        )
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(
            host=vc["host"],
            port=vc["port"],
            user=vc["user"],
            pwd="wrong-" + vc["password"],
            sslContext=testbed.ssl_context(),
        )
    insecure = SmartConnect(
        host=vc["host"],
        port=vc["port"],
        user=vc["user"],
        pwd=vc["password"],
        disableSslCertValidation=True,
    )
    try:
        assert insecure.content.about.apiType == "VirtualCenter"
    finally:
        Disconnect(insecure)


# -- changed block tracking ------------------------------------------------------


def test_cbt_star_and_incrementals_match_the_writes(testbed: Testbed, si: Any) -> None:
    vm = find_vm(si, testbed, "cbtvm")
    capacity = 64 * MiB + 4096
    reconfigure(vm, changeTrackingEnabled=True)
    assert vm.config.changeTrackingEnabled

    first = [
        write(testbed, "cbtvm", 2000, 0, 100, seed=1),
        write(testbed, "cbtvm", 2000, 5 * BLOCK, 2 * BLOCK, seed=2),
        write(testbed, "cbtvm", 2000, 30 * MiB + 17, 3 * MiB, seed=3),  # spans two pages
        write(testbed, "cbtvm", 2000, capacity - 1000, 1000, seed=4),  # the partial last block
    ]
    zeros_16000 = [write(testbed, "cbtvm", 16000, 3 * BLOCK + 17, 5000, zero=True)]
    a = snapshot(vm, "A")
    ids_a = change_ids(a)
    assert all(CHANGE_ID.match(change_id) for change_id in ids_a.values())
    assert ids_a[2000].endswith("/1")
    assert (
        len({change_id.split("/")[0] for change_id in ids_a.values()}) == 3
    )  # one instance per disk
    assert disks_of(vm.config.hardware.device)[2000].backing.changeId == ids_a[2000]

    # "*" on a fresh thin disk: exactly the allocated blocks (zeros written count).
    assert query(vm, a, 2000, "*") == blocks(first, capacity)
    assert query(vm, a, 16000, "*") == blocks(zeros_16000, 16 * MiB)
    assert query(vm, a, 16001, "*") == []

    second = [
        write(testbed, "cbtvm", 2000, 0, 100, seed=1),  # the same bytes again: still a change
        write(testbed, "cbtvm", 2000, 100 * BLOCK, BLOCK // 2, seed=5),
        write(testbed, "cbtvm", 2000, 5 * BLOCK, BLOCK, zero=True),
    ]
    b = snapshot(vm, "B")
    ids_b = change_ids(b)
    assert ids_b[2000] == ids_a[2000].replace("/1", "/2")
    assert change_ids(a) == ids_a  # A keeps its IDs

    assert query(vm, b, 2000, ids_a[2000]) == blocks(second, capacity)
    assert query(vm, b, 2000, ids_b[2000]) == []
    assert query(vm, b, 16000, ids_a[16000]) == []
    assert query(vm, b, 2000, "*") == blocks(first + second, capacity)
    assert query(vm, a, 2000, "*") == blocks(first, capacity)  # A still answers as of A
    start = 50 * BLOCK + 123
    assert query(vm, b, 2000, ids_a[2000], start=start) == blocks(second, capacity, start)

    # The bytes are where the writes put them.
    assert testbed.read("cbtvm", 2000, 0, 100) == pattern(1, 0, 100)
    assert testbed.read("cbtvm", 2000, 6 * BLOCK, BLOCK) == pattern(2, 6 * BLOCK, BLOCK)
    assert testbed.read("cbtvm", 2000, 5 * BLOCK, BLOCK) == bytes(BLOCK)
    assert testbed.read("cbtvm", 2000, capacity - 1000, 1000) == pattern(4, capacity - 1000, 1000)

    # The usual backup cycle: drop the old snapshot, take a new one, ask since the old ID.
    WaitForTask(a.RemoveSnapshot_Task(removeChildren=False))
    third = [write(testbed, "cbtvm", 2000, 40 * MiB, 2 * MiB + 1, seed=6)]
    c = snapshot(vm, "C")
    assert query(vm, c, 2000, ids_a[2000]) == blocks(second + third, capacity)
    assert query(vm, c, 2000, ids_b[2000]) == blocks(third, capacity)
    WaitForTask(vm.RemoveAllSnapshots_Task())
    assert vm.snapshot is None


def test_cbt_faults_and_reset(testbed: Testbed, si: Any) -> None:
    vm = find_vm(si, testbed, "resetvm")
    before = snapshot(vm, "before CBT")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=before, deviceKey=2000, startOffset=0, changeId="*")
    WaitForTask(before.RemoveSnapshot_Task(removeChildren=False))

    reconfigure(vm, changeTrackingEnabled=True)
    written = [write(testbed, "resetvm", 2000, 3 * BLOCK, 10, seed=9)]
    s1 = snapshot(vm, "S1")
    ids = change_ids(s1)

    def invalid(property_name: str, **call: Any) -> None:
        args = {"snapshot": s1, "deviceKey": 2000, "startOffset": 0, "changeId": ids[2000]}
        args.update(call)
        with pytest.raises(vmodl.fault.InvalidArgument) as raised:
            vm.QueryChangedDiskAreas(**args)
        assert raised.value.invalidProperty == property_name

    invalid("changeId", changeId="not a change id")
    invalid("changeId", changeId=ids[2001])  # another disk's
    invalid("changeId", changeId=ids[2000].replace("/1", "/7"))  # later than S1
    invalid("deviceKey", deviceKey=2999)
    invalid("startOffset", startOffset=8 * MiB)  # == capacity
    invalid("snapshot", snapshot=None)  # a running VM needs a snapshot
    other = snapshot(find_vm(si, testbed, "offvm"), "foreign")
    invalid("snapshot", snapshot=other)
    WaitForTask(other.RemoveSnapshot_Task(removeChildren=False))

    # A reset (CBT off and on) starts a new tracking instance: old IDs are unusable,
    # "*" still reports what the disk holds.
    WaitForTask(vm.RemoveAllSnapshots_Task())
    reconfigure(vm, changeTrackingEnabled=False)
    assert disks_of(vm.config.hardware.device)[2000].backing.changeId is None
    reconfigure(vm, changeTrackingEnabled=True)
    s2 = snapshot(vm, "S2")
    new_id = change_ids(s2)[2000]
    assert new_id.split("/")[0] != ids[2000].split("/")[0]
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=2000, startOffset=0, changeId=ids[2000])
    assert query(vm, s2, 2000, "*") == blocks(written, 8 * MiB)
    WaitForTask(vm.RemoveAllSnapshots_Task())


def test_powered_off_vm_answers_without_a_snapshot(testbed: Testbed, si: Any) -> None:
    vm = find_vm(si, testbed, "offvm")
    assert vm.runtime.powerState == "poweredOff" and vm.config.changeTrackingEnabled
    key = testbed.vm("offvm")["disks"][0]["key"]
    start_id = disks_of(vm.config.hardware.device)[key].backing.changeId
    assert CHANGE_ID.match(start_id)
    written = [write(testbed, "offvm", key, MiB, 3 * BLOCK, seed=11)]
    assert query(vm, None, key, start_id) == blocks(written, 4 * MiB)
    assert query(vm, None, key, "*") == blocks(written, 4 * MiB)


def test_disks_added_and_grown_at_run_time(testbed: Testbed, si: Any) -> None:
    vm = find_vm(si, testbed, "growvm")
    disk = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=1000,
        unitNumber=1,
        capacityInKB=2048,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="", diskMode="persistent", thinProvisioned=True
        ),
    )
    add = vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
    reconfigure(vm, deviceChange=[add])
    disks = disks_of(vm.config.hardware.device)
    assert sorted(disks) == [2000, 2001]  # ESXi's key for SCSI(0:1)
    assert disks[2001].capacityInBytes == 2 * MiB
    assert disks[2001].deviceInfo.label == "Hard disk 2"

    grown = disks[2000]
    grown.capacityInKB = 6 * 1024
    edit = vim.vm.device.VirtualDeviceSpec(operation="edit", device=grown)
    reconfigure(vm, deviceChange=[edit])
    assert disks_of(vm.config.hardware.device)[2000].capacityInBytes == 6 * MiB

    live = {
        d["key"]: d
        for d in next(v for v in testbed.inventory()["vms"] if v["name"] == "growvm")["disks"]
    }
    assert Path(live[2001]["flat_file"]).stat().st_size == 2 * MiB
    assert Path(live[2000]["flat_file"]).stat().st_size == 6 * MiB
    testbed.write("growvm", 2001, MiB, 100, seed=3)
    assert Path(live[2001]["flat_file"]).read_bytes()[MiB : MiB + 100] == pattern(3, MiB, 100)


def test_writes_are_checked(testbed: Testbed) -> None:
    with pytest.raises(TestbedError, match="beyond the disk"):
        testbed.write("pgtest1", 3002, 4 * MiB - 10, 11, seed=1)
    with pytest.raises(TestbedError, match="no disk with key 2999"):
        testbed.write("pgtest1", 2999, 0, 1, seed=1)
    with pytest.raises(TestbedError, match="no such VM"):
        testbed.write("/DC0/vm/nonesuch", 2000, 0, 1, seed=1)


def testhub_options() -> None:
    assert hub_options({}) is None
    assert hub_options({"hub": True}) == (10, range(10100, 10201))  # sna's --nbd-ports
    assert hub_options({"hub": {"shared": 1, "ports": [10300, 10309]}}) == (1, range(10300, 10310))
    with pytest.raises(TestbedError, match='spec "hub" is'):
        load_spec({"vms": [], "hub": {"ports": [10200, 10100]}})


def test_pattern_depends_only_on_seed_and_position() -> None:
    whole = pattern(5, 1000, 200_000)
    assert pattern(5, 70_000, 1234) == whole[69_000 : 69_000 + 1234]
    assert pattern(6, 1000, 100) != whole[:100]


# -- the hub ---------------------------------------------------------------------


def nbd_size(url: str) -> int:
    done = subprocess.run(
        ["qemu-img", "info", "--output=json", url], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    size: int = json.loads(done.stdout)["virtual-size"]
    return size


def test_hub_targets_answer(testbed: Testbed) -> None:
    expected = [
        (vm["name"], disk["key"], f"{vm['name']}-disk{index}", disk["capacity_bytes"])
        for vm in testbed.vms
        for index, disk in enumerate(vm["disks"])
    ]
    assert [(t["vm"], t["disk_key"], t["export"]) for t in testbed.targets] == [
        e[:3] for e in expected
    ]
    for target, (_vm, _key, export, _capacity) in zip(testbed.targets, expected, strict=True):
        assert 10300 <= target["port"] <= 10399
        assert target["nbd_url"] == f"nbd://127.0.0.1:{target['port']}/{export}"
        assert Path(target["qcow2"]).is_file()
    for target, (*_, capacity) in list(zip(testbed.targets, expected, strict=True))[:3]:
        assert nbd_size(target["nbd_url"]) == capacity

    # An incremental's target: an overlay on the full backup's qcow2, served once
    # the full one is not (qemu-nbd locks what it serves, backing files too).
    full = testbed.add_target("pgtest1", 2001)
    testbed.stop_target(full["export"])
    incremental = testbed.add_target("pgtest1", 2001, backing=Path(full["qcow2"]))
    assert incremental["export"] == "pgtest1-2001-1"
    assert nbd_size(incremental["nbd_url"]) == 10 * MiB + 512
    testbed.stop_target(incremental["export"])
    assert len(testbed.targets) == len(expected)


# -- the command line ------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.testbed", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_write_and_cbt_commands(testbed: Testbed) -> None:
    state = str(testbed.workdir)
    done = run_cli(
        "write", "--state", state, "--vm", "/DC0/vm/resetvm", "--disk", "2001",
        "--offset", "64K", "--length", "10K", "--seed", "5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote      10 KiB of the seed-5 pattern at [64 KiB, 74 KiB)" in done.stdout
    assert testbed.read("resetvm", 2001, 65536, 10240) == pattern(5, 65536, 10240)

    done = run_cli("cbt", "--state", state, "--vm", "resetvm", "--disk", "2001", "--json")
    assert done.returncode == 0, done.stderr
    cbt = json.loads(done.stdout)
    assert {"start": 65536, "length": BLOCK} in cbt["written"]

    done = run_cli(
        "write", "--state", state, "--vm", "resetvm", "--disk", "2001",
        "--offset", "8M", "--length", "1",
    )  # fmt: skip
    assert done.returncode == 1 and "beyond the disk" in done.stderr


# -- up and down -----------------------------------------------------------------

SMALL_SPEC = {
    "vms": [
        {
            "name": "pgtest1",
            "disks": [
                {"capacity_bytes": 4 * MiB, "controller": "scsi", "bus": 0},
                {"capacity_bytes": 2 * MiB + 512, "controller": "sata", "bus": 1},
            ],
        }
    ],
    "hub": HUB,
}


def start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any], list[ProcessRecord]]:
    spec = tmp_path / "spec.json"
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(SMALL_SPEC))
    state = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "tests.testbed", "up", "--spec", str(spec), "--state", str(state)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert up.stdout is not None
    line = up.stdout.readline()
    if not line:
        up.wait(10)
        pytest.fail(f"up printed nothing; stderr:\n{up.stderr.read() if up.stderr else ''}")
    info = json.loads(line)
    state_file = json.loads((state / "state.json").read_text())
    return up, info, [ProcessRecord.from_json(p) for p in state_file["processes"]]


def wait_gone(records: list[ProcessRecord]) -> None:
    end = time.monotonic() + DEADLINE
    while running := [r for r in records if is_running(r)]:
        assert time.monotonic() < end, f"still running: {running}"
        time.sleep(0.05)


def check_up_output(info: dict[str, Any], state: Path) -> None:
    assert set(info) >= {"vcenter", "vms", "targets"}
    assert set(info["vcenter"]) >= {"url", "host", "port", "user", "password", "thumbprint"}
    (vm,) = info["vms"]
    assert set(vm) >= {"name", "path", "disks"}
    assert [(d["key"], d["capacity_bytes"]) for d in vm["disks"]] == [
        (2000, 4 * MiB),
        (16030, 2 * MiB + 512),
    ]
    assert all(Path(d["flat_file"]).is_file() for d in vm["disks"])
    assert [(t["vm"], t["disk_key"]) for t in info["targets"]] == [
        ("pgtest1", 2000),
        ("pgtest1", 16030),
    ]
    assert all(set(t) >= {"vm", "disk_key", "nbd_url", "qcow2"} for t in info["targets"])
    assert nbd_size(info["targets"][1]["nbd_url"]) == 2 * MiB + 512
    with socket.create_connection((info["vcenter"]["host"], info["vcenter"]["port"]), timeout=5):
        pass
    assert json.loads((state / "info.json").read_text()) == info


def test_up_then_down(tmp_path: Path) -> None:
    up, info, children = start_up(tmp_path)
    try:
        check_up_output(info, tmp_path / "state")
        assert [r.role for r in children] == ["vcsim", "qemu-nbd", "qemu-nbd"]
        again = run_cli(
            "up", "--spec", str(tmp_path / "spec.json"), "--state", str(tmp_path / "state")
        )
        assert again.returncode == 1 and "already running" in again.stderr
        down = run_cli("down", "--state", str(tmp_path / "state"))
        assert down.returncode == 0, down.stderr
        assert up.wait(DEADLINE) == 0
        wait_gone(children)
        assert not (tmp_path / "state" / "state.json").exists()
        assert "no testbed is running" in run_cli("down", "--state", str(tmp_path / "state")).stderr
    finally:
        for record in children:
            stop(record)
        up.kill()
        up.wait(5)


def test_up_stops_everything_on_sigterm_and_when_killed(tmp_path: Path) -> None:
    up, _, children = start_up(tmp_path / "term")
    up.send_signal(signal.SIGTERM)
    assert up.wait(DEADLINE) == 0
    wait_gone(children)

    up, _, children = start_up(tmp_path / "kill")
    up.kill()  # no cleanup by up: the children die with it, and down has nothing left
    up.wait(5)
    wait_gone(children)
    down = run_cli("down", "--state", str(tmp_path / "kill" / "state"))
    assert down.returncode == 0
    assert not (tmp_path / "kill" / "state" / "state.json").exists()


def test_spec_errors_are_reported(tmp_path: Path) -> None:
    bad = {"vms": [{"name": "x", "disks": [{"capacity_bytes": 4 * MiB, "controller": "usb"}]}]}
    with pytest.raises(TestbedError, match='controller "usb" is not one of scsi, sata, nvme, ide'):
        Testbed.start(bad, tmp_path / "bad")
    odd = {"vms": [{"name": "x", "disks": [{"capacity_bytes": 1000}]}]}
    with pytest.raises(TestbedError, match="not a positive multiple of 512"):
        Testbed.start(odd, tmp_path / "odd")
    with pytest.raises(TestbedError, match="unknown field"):
        Testbed.start({"vms": [{"name": "x", "disk": []}]}, tmp_path / "typo")
