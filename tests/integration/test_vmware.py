"""sna.vmware against a real vSphere SOAP endpoint: the testbed's vCenter simulator.

One simulator for the module (``testbed_fixture``), a real thread pool, and
pytest-twisted's reactor.  Each test that changes a VM has a VM of its own,
so the tests do not depend on their order.  The test side talks to vCenter
with plain pyVmomi (``testbed.connect()``) to set things up and to look at
what sna did (snapshots, sessions).  Loopback only; no test asserts how long
anything took.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any, Optional

import pytest
import pytest_twisted
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock, deferLater
from twisted.python.threadpool import ThreadPool

from sna.vmware import vsphere as vsphere_module
from sna.vmware.interface import (
    AuthenticationFailed,
    CertificateRejected,
    Conflict,
    Credentials,
    InvalidVSphereRequest,
    NotFound,
    TimedOut,
    Unreachable,
    VSphereError,
)
from sna.vmware.sessions import SessionPool
from sna.vmware.vsphere import VSphere
from tests.integration.harness import Daemon
from tests.testbed import Testbed, testbed_fixture

pytestmark = pytest.mark.integration

reactor: Any = _reactor
MiB = 1 << 20
#: Bounds hangs; these are not measurements.
CALL_TIMEOUT = 15.0

SPEC: dict[str, Any] = {
    "vms": [
        {
            "name": "pgtest1",
            "folder": "prod/db",
            "cpus": 2,
            "memory_mb": 2048,
            "guest_id": "ubuntu64Guest",
            "networks": ["VM Network", "DC0_DVPG0"],
            "disks": [
                {"capacity_bytes": 100 * MiB + 512, "controller": "scsi", "bus": 0},
                {"capacity_bytes": 32 * MiB + 512, "controller": "scsi", "bus": 1},
                {"capacity_bytes": 16 * MiB + 1024, "controller": "sata", "bus": 0, "thin": False},
            ],
        },
        # Names the "pgtest1" filter must rank behind the exact match.
        {"name": "pgtest10", "disks": [{"capacity_bytes": MiB}]},
        {"name": "OldPGTest1", "power": "off", "disks": [{"capacity_bytes": MiB}]},
        # One VM per test that changes one.
        {"name": "cbt-vm", "disks": [{"capacity_bytes": 4 * MiB}, {"capacity_bytes": 2 * MiB}]},
        {"name": "cbt-snap-vm", "disks": [{"capacity_bytes": 4 * MiB}]},
        {"name": "spec-vm", "memory_mb": 1024, "disks": [{"capacity_bytes": 4 * MiB}]},
        {"name": "power-vm", "disks": [{"capacity_bytes": MiB}]},
        {"name": "snap-vm", "folder": "backup", "disks": [{"capacity_bytes": MiB}]},
    ]
}

testbed = testbed_fixture(SPEC)

VM_FIELDS = {
    "id",
    "name",
    "path",
    "datacenter",
    "power_state",
    "guest_os",
    "memory_mb",
    "num_cpu",
    "cpus",
    "os_type",
    "vmx_version",
    "display_name",
    "annotation",
    "folder_path",
    "vmware_tools_status",
    "vmware_tools_version",
    "cbt_enabled",
    "disks",
    "networks",
}
DISK_FIELDS = {
    "id",
    "key",
    "label",
    "path",
    "vmdk_path",
    "size_gb",
    "capacity_bytes",
    "datastore",
    "provisioning_type",
    "unit_number",
    "controller",
    "controller_key",
}
NIC_FIELDS = {"label", "network_name", "adapter_type", "mac_address", "connected", "type"}
CHANGE_ID = re.compile(r"52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+")


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def thread_pool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=8, name="test-vmware")
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def admin(testbed: Testbed) -> Iterator[Any]:
    """The test's own pyVmomi session, to set things up and look at them."""
    si = testbed.connect()
    yield si
    Disconnect(si)


@pytest.fixture
def creds(testbed: Testbed) -> Credentials:
    vc = testbed.vcenter
    return Credentials(host=vc["host"], port=vc["port"], user=vc["user"], password=vc["password"])


def make_pool(
    thread_pool: ThreadPool, testbed: Optional[Testbed] = None, **kwargs: Any
) -> SessionPool:
    """A session pool; given the testbed, it trusts the simulator's certificate as a CA."""
    if testbed is not None:
        kwargs.setdefault("ca_file", testbed.vcenter["cert_file"])
    kwargs.setdefault("call_timeout", CALL_TIMEOUT)
    return SessionPool(reactor, thread_pool, **kwargs)


@pytest.fixture
def sessions(thread_pool: ThreadPool, testbed: Testbed) -> Iterator[SessionPool]:
    pool = make_pool(thread_pool, testbed)
    yield pool
    pytest_twisted.blockon(pool.close())


@pytest.fixture
def vsphere(sessions: SessionPool) -> VSphere:
    return VSphere(sessions, poll_interval=0.05, task_timeout=CALL_TIMEOUT)


def vm_object(admin: Any, testbed: Testbed, name: str) -> Any:
    vm = admin.content.searchIndex.FindByInventoryPath(testbed.vm(name)["path"].lstrip("/"))
    assert vm is not None
    return vm


def snapshot_names(vm: Any) -> list[str]:
    def walk(nodes: Any) -> Iterator[str]:
        for node in nodes or ():
            yield node.name
            yield from walk(node.childSnapshotList)

    return sorted(walk(vm.snapshot.rootSnapshotList if vm.snapshot is not None else None))


def take_snapshot(vm: Any, name: str) -> None:
    WaitForTask(vm.CreateSnapshot_Task(name=name, description="test", memory=False, quiesce=False))


def session_keys(admin: Any) -> set[str]:
    return {s.key for s in admin.content.sessionManager.sessionList}


async def eventually(condition: Any, what: str, seconds: float = 10.0) -> None:
    """Wait (on the real reactor) until ``condition()`` holds."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"timed out waiting for {what}")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


# -- discovery --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_discover_reports_the_declared_disks_and_networks(
    vsphere: VSphere, creds: Credentials, testbed: Testbed
) -> None:
    answer = await vsphere.discover(creds, "DC0", "pgtest1")
    assert answer["vcenter"] == {"host": f"127.0.0.1:{creds.port}", "datacenter": "DC0"}
    vm = answer["vms"][0]
    declared = testbed.vm("pgtest1")
    assert set(vm) == VM_FIELDS
    assert (vm["name"], vm["path"], vm["id"]) == ("pgtest1", declared["path"], declared["uuid"])
    assert vm["path"] == "/DC0/vm/prod/db/pgtest1"
    assert (vm["datacenter"], vm["folder_path"]) == ("DC0", "/DC0/vm/prod/db")
    assert (vm["num_cpu"], vm["cpus"], vm["memory_mb"]) == (2, 2, 2048)
    assert (vm["guest_os"], vm["os_type"]) == ("linux", "ubuntu64Guest")
    assert (vm["power_state"], vm["cbt_enabled"]) == ("poweredOn", False)
    assert vm["vmx_version"].startswith("vmx-")
    assert vm["vmware_tools_status"] == "toolsNotInstalled"

    disks = vm["disks"]
    assert all(set(d) == DISK_FIELDS for d in disks)
    got = [
        (d["key"], d["capacity_bytes"], d["controller"], d["unit_number"], d["provisioning_type"])
        for d in disks
    ]
    assert got == [
        (2000, 100 * MiB + 512, "scsi0", 0, "thin"),
        (2016, 32 * MiB + 512, "scsi1", 0, "thin"),
        (16000, 16 * MiB + 1024, "sata0", 0, "thick"),
    ]
    assert [d["key"] for d in declared["disks"]] == [2000, 2016, 16000]
    for disk, spec_disk in zip(disks, declared["disks"], strict=True):
        assert disk["id"] == f"disk-{disk['key']}"
        assert disk["label"] == spec_disk["label"]
        assert disk["vmdk_path"] == disk["path"] == spec_disk["file"]
        assert disk["datastore"] == "LocalDS_0"
        assert disk["size_gb"] == 1  # rounded up, as the Go SNA does
    assert [d["controller_key"] for d in disks] == [1000, 1001, 15000]

    nics = vm["networks"]
    assert all(set(n) == NIC_FIELDS for n in nics)
    assert [(n["network_name"], n["type"], n["adapter_type"]) for n in nics] == [
        ("VM Network", "standard", "vmxnet3"),
        ("DC0_DVPG0", "distributed", "vmxnet3"),
    ]
    assert all(re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", n["mac_address"]) for n in nics)
    assert all(n["connected"] for n in nics)


@pytest_twisted.ensureDeferred
async def test_filter_lists_exact_names_before_substrings(
    vsphere: VSphere, creds: Credentials
) -> None:
    async def names(name_filter: Optional[str], datacenter: Optional[str] = None) -> list[str]:
        answer = await vsphere.discover(creds, datacenter, name_filter)
        return [vm["name"] for vm in answer["vms"]]

    listed = await names("pgtest1")
    assert listed[0] == "pgtest1"
    assert sorted(listed[1:]) == ["OldPGTest1", "pgtest10"]  # substrings, any case
    assert await names("pgtest10") == ["pgtest10"]
    assert await names("PGTEST10") == ["pgtest10"]
    assert await names(" pgtest10 , cbt-vm,nothing-like-it") == ["cbt-vm", "pgtest10"]
    assert await names("nothing-like-it") == []
    everything = await names(None)
    assert sorted(everything) == sorted(vm["name"] for vm in SPEC["vms"])
    assert await names("", "DC0") == everything


def test_discover_names_the_vcenter_as_the_request_did(
    testbed: Testbed, daemon_factory: Callable[..., Daemon]
) -> None:
    vc = testbed.vcenter
    sna = daemon_factory(extra=("--vcenter-ca-file", vc["cert_file"]))
    where = f"127.0.0.1:{vc['port']}"
    for named in (where, f"https://{where}/sdk", f" {where} "):
        body = {"vcenter": named, "username": vc["user"], "password": vc["password"]}
        answer = sna.api.post("/api/v1/discover", {**body, "filter": "pgtest10"})
        assert answer.status == 200, answer
        found = answer.json()
        assert found["vcenter"] == {"host": named, "datacenter": "DC0"}
        assert [vm["name"] for vm in found["vms"]] == ["pgtest10"]


@pytest_twisted.ensureDeferred
async def test_discover_of_an_unknown_datacenter_is_not_found(
    vsphere: VSphere, creds: Credentials
) -> None:
    with pytest.raises(NotFound, match="no datacenter DC9"):
        await vsphere.discover(creds, "DC9", None)


# -- CBT ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cbt_status_before_and_after_enabling(
    vsphere: VSphere, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    path = testbed.vm("cbt-vm")["path"]
    before = await vsphere.cbt_status(creds, path)
    assert before["enabled"] is False
    assert (before["vm_name"], before["power_state"], before["vm_path"]) == (
        "cbt-vm",
        "poweredOn",
        path,
    )
    assert before["has_snapshots"] is False
    assert [(d["key"], d["change_id"]) for d in before["disks"]] == [(2000, None), (2001, None)]

    enabled = await vsphere.enable_cbt(creds, path)
    assert enabled["enabled"] is True
    assert enabled["changed"] is True
    assert all(CHANGE_ID.fullmatch(d["change_id"] or "") for d in enabled["disks"])
    assert vm_object(admin, testbed, "cbt-vm").config.changeTrackingEnabled is True

    after = await vsphere.cbt_status(creds, path.lstrip("/"))  # the Go SNA's form, too
    assert after["enabled"] is True
    again = await vsphere.enable_cbt(creds, path)
    assert (again["enabled"], again["changed"]) == (True, False)


@pytest_twisted.ensureDeferred
async def test_enable_cbt_is_refused_while_the_vm_has_snapshots(
    vsphere: VSphere, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    path = testbed.vm("cbt-snap-vm")["path"]
    vm = vm_object(admin, testbed, "cbt-snap-vm")
    take_snapshot(vm, "someone-elses")
    status = await vsphere.cbt_status(creds, path)
    assert (status["has_snapshots"], status["snapshot_count"]) == (True, 1)
    with pytest.raises(Conflict, match="1 snapshot"):
        await vsphere.enable_cbt(creds, path)
    assert vm.config.changeTrackingEnabled is False
    assert snapshot_names(vm) == ["someone-elses"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_vm_path_is_not_found(vsphere: VSphere, creds: Credentials) -> None:
    with pytest.raises(NotFound, match="/DC0/vm/no-such-vm"):
        await vsphere.cbt_status(creds, "/DC0/vm/no-such-vm")
    with pytest.raises(NotFound, match="/DC0/vm/prod"):  # a folder is not a VM
        await vsphere.cbt_status(creds, "/DC0/vm/prod")


@pytest_twisted.ensureDeferred
async def test_a_bare_name_finds_its_vm(vsphere: VSphere, creds: Credentials) -> None:
    status = await vsphere.cbt_status(creds, "/pgtest10")
    assert status["vm_name"] == "pgtest10"
    assert status["vm_path"] == "/DC0/vm/pgtest10", "the real inventory path, not the name"
    status = await vsphere.cbt_status(creds, "DC0/vm/pgtest10")
    assert status["vm_path"] == "DC0/vm/pgtest10"


# -- spec changes ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_spec_changes_after_a_reconfiguration(
    vsphere: VSphere, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    path = testbed.vm("spec-vm")["path"]
    stored = (await vsphere.discover(creds, None, "spec-vm"))["vms"][0]
    unchanged = await vsphere.spec_changes(creds, path, stored)
    assert unchanged["has_changes"] is False
    assert (unchanged["status"], unchanged["error_message"], unchanged["changes"]) == (
        "success",
        "",
        [],
    )

    vm = vm_object(admin, testbed, "spec-vm")
    disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    disk.capacityInKB = 6 * 1024
    disk.capacityInBytes = 6 * MiB
    added = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=disk.controllerKey,
        unitNumber=1,
        capacityInKB=8 * 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", thinProvisioned=True, fileName="[LocalDS_0]"
        ),
    )
    spec = vim.vm.ConfigSpec(
        memoryMB=2048,
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk),
            vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=added),
        ],
    )
    WaitForTask(vm.ReconfigVM_Task(spec=spec))

    report = await vsphere.spec_changes(creds, path, stored)
    assert report["has_changes"] is True
    changes = report["changes"]
    assert json.loads(report["changes_json"]) == changes
    by_field = {(c["field"], c["type"]): c for c in changes}
    assert set(by_field) == {
        ("memory_mb", "modified"),
        ("disks", "added"),
        ("disks.capacity_bytes", "resized"),
    }
    assert (by_field["memory_mb", "modified"]["old"], by_field["memory_mb", "modified"]["new"]) == (
        1024,
        2048,
    )
    new_disk = by_field["disks", "added"]
    assert new_disk["key"] == 2001
    assert new_disk["new"]["capacity_bytes"] == 8 * MiB
    resized = by_field["disks.capacity_bytes", "resized"]
    assert (resized["key"], resized["old"], resized["new"]) == (2000, 4 * MiB, 6 * MiB)
    assert "memory" in report["changes_summary"]
    assert "disk 2001" in report["changes_summary"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["check_time"])


# -- power -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_power_off_and_on_round_trip(
    vsphere: VSphere, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    declared = testbed.vm("power-vm")
    vm_id = declared["uuid"]
    state = await vsphere.power_state(creds, vm_id)
    assert (state["vm_id"], state["power_state"]) == (vm_id, "poweredOn")
    assert state["tools_status"] == "toolsNotInstalled"
    assert "uptime_seconds" in state and "last_state_change" in state

    # No VMware Tools in the simulator: the guest cannot be asked, so it is powered off.
    off = await vsphere.power_off(creds, vm_id, False, 10)
    assert off["success"] is True
    assert (off["previous_state"], off["new_state"], off["operation"]) == (
        "poweredOn",
        "poweredOff",
        "power-off",
    )
    assert off["shutdown_method"] == "hard"
    assert vm_object(admin, testbed, "power-vm").runtime.powerState == "poweredOff"
    state = await vsphere.power_state(creds, vm_id)
    assert state["power_state"] == "poweredOff"
    assert "uptime_seconds" not in state

    again = await vsphere.power_off(creds, vm_id, True, 10)
    assert (again["success"], again["shutdown_method"], again["duration_seconds"]) == (
        True,
        "already-off",
        0,
    )

    on = await vsphere.power_on(creds, vm_id, False, 10)
    assert (on["success"], on["previous_state"], on["new_state"]) == (
        True,
        "poweredOff",
        "poweredOn",
    )
    assert "shutdown_method" not in on
    assert vm_object(admin, testbed, "power-vm").runtime.powerState == "poweredOn"
    already = await vsphere.power_on(creds, vm_id, False, 10)
    assert (already["success"], already["message"]) == (True, "VM already powered on")

    # The instance UUID and the moref find the same VM.
    instance = vm_object(admin, testbed, "power-vm").config.instanceUuid
    for other_id in (instance, declared["moref"]):
        assert (await vsphere.power_state(creds, other_id))["power_state"] == "poweredOn"


@pytest_twisted.ensureDeferred
async def test_power_on_waits_for_tools_within_its_timeout(
    vsphere: VSphere, creds: Credentials, testbed: Testbed
) -> None:
    vm_id = testbed.vm("OldPGTest1")["uuid"]
    on = await vsphere.power_on(creds, vm_id, True, 0.3)
    assert (on["success"], on["new_state"], on["tools_status"]) == (
        True,
        "poweredOn",
        "toolsNotInstalled",
    )
    assert "VMware Tools not running" in on["message"]
    await vsphere.power_off(creds, vm_id, True, 10)


@pytest_twisted.ensureDeferred
async def test_power_off_asks_the_guest_when_tools_run(
    vsphere: VSphere,
    creds: Credentials,
    testbed: Testbed,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The simulator's guests have no VMware Tools but do honour ShutdownGuest:
    # pretend Tools run, so the graceful path is taken against vCenter for real.
    monkeypatch.setattr(vsphere_module, "_tools_running", lambda props: True)
    vm_id = testbed.vm("pgtest10")["uuid"]
    off = await vsphere.power_off(creds, vm_id, False, 10)
    assert (off["success"], off["shutdown_method"], off["new_state"]) == (
        True,
        "graceful",
        "poweredOff",
    )
    assert vm_object(admin, testbed, "pgtest10").runtime.powerState == "poweredOff"
    on = await vsphere.power_on(creds, vm_id, True, 10)  # Tools "run" at once
    assert (on["success"], on["message"]) == (True, "VM power-on completed successfully")


@pytest_twisted.ensureDeferred
async def test_a_guest_still_shutting_down_is_answered_at_the_bound(
    sessions: SessionPool,
    creds: Credentials,
    testbed: Testbed,
    admin: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A guest that takes the shutdown request and stays on; the bound (normally
    # 50 s) is made short, the request's timeout is the SHA's 300 s.
    monkeypatch.setattr(vsphere_module, "_tools_running", lambda props: True)
    vsphere = VSphere(sessions, poll_interval=0.05, answer_within=0.5)
    asked: list[str] = []
    vsphere.shutdown_guest = lambda conn, ident: asked.append(ident)  # type: ignore[method-assign]
    declared = testbed.vm("spec-vm")
    pending = vsphere.power_off(creds, declared["uuid"], False, 300)
    off = await pending.addTimeout(CALL_TIMEOUT, reactor)  # bounds a hang; not a measurement
    assert asked == [declared["moref"]]
    assert (off["success"], off["new_state"], off["shutdown_method"]) == (
        True,
        "poweredOn",
        "graceful",
    )
    assert off["message"].startswith("the guest is still shutting down after ")
    assert off["message"].endswith(f"poll GET /api/v1/vm/{declared['uuid']}/power-state")
    assert vm_object(admin, testbed, "spec-vm").runtime.powerState == "poweredOn"


@pytest_twisted.ensureDeferred
async def test_a_uuid_is_found_in_any_case_and_without_dashes(
    vsphere: VSphere, creds: Credentials, testbed: Testbed
) -> None:
    vm_id = testbed.vm("pgtest1")["uuid"]
    # What moves with the wall clock between two answers is not what this is about.
    moving = ("vm_id", "timestamp", "uptime_seconds")
    expected = await vsphere.power_state(creds, vm_id)
    for spelling in (vm_id.upper(), vm_id.replace("-", ""), vm_id.upper().replace("-", "")):
        state = await vsphere.power_state(creds, spelling)
        assert state["vm_id"] == spelling, "the answer names the VM as asked"
        assert {k: v for k, v in state.items() if k not in moving} == {
            k: v for k, v in expected.items() if k not in moving
        }
        assert ("uptime_seconds" in state) == ("uptime_seconds" in expected)


@pytest_twisted.ensureDeferred
async def test_an_unknown_vm_id_is_not_found(vsphere: VSphere, creds: Credentials) -> None:
    unknown = "00000000-1111-2222-3333-444444444444"
    with pytest.raises(NotFound, match=unknown):
        await vsphere.power_state(creds, unknown)
    with pytest.raises(NotFound):
        await vsphere.power_off(creds, "vm-999999", False, 5)
    with pytest.raises(InvalidVSphereRequest, match="vm_id"):
        await vsphere.power_on(creds, "pgtest1", False, 5)


# -- snapshot cleanup --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cleanup_removes_only_the_backup_clients_snapshots(
    vsphere: VSphere, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    path = testbed.vm("snap-vm")["path"]
    vm = vm_object(admin, testbed, "snap-vm")
    for name in ("other", "sbak-job-1", "srep-job-1", "sbak-job-10", "srep-job-2", "keep-sbak-x"):
        take_snapshot(vm, name)

    answer = await vsphere.remove_job_snapshots(creds, path, "job-1")
    assert answer == {
        "vm_path": path,
        "job_id": "job-1",
        "removed": ["sbak-job-1", "srep-job-1"],
        "status": "success",
    }
    assert snapshot_names(vm) == ["keep-sbak-x", "other", "sbak-job-10", "srep-job-2"]

    nothing = await vsphere.remove_job_snapshots(creds, path, "job-1")
    assert nothing["removed"] == []

    everything = await vsphere.remove_job_snapshots(creds, path, None)
    assert sorted(everything["removed"]) == ["sbak-job-10", "srep-job-2"]
    assert snapshot_names(vm) == ["keep-sbak-x", "other"]

    with pytest.raises(NotFound, match="/DC0/vm/backup/gone"):
        await vsphere.remove_job_snapshots(creds, "/DC0/vm/backup/gone", "job-1")


# -- failures ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_refused_with_vcenters_reason(
    vsphere: VSphere, sessions: SessionPool, creds: Credentials, admin: Any
) -> None:
    before = session_keys(admin)
    wrong = Credentials(host=creds.host, port=creds.port, user=creds.user, password="wrong")
    with pytest.raises(AuthenticationFailed, match="Login failure") as raised:
        await vsphere.discover(wrong, None, None)
    assert raised.value.status == 401
    assert "wrong" not in raised.value.message
    assert sessions.session_count == 0
    assert session_keys(admin) == before


@pytest_twisted.ensureDeferred
async def test_a_closed_vcenter_port_is_unreachable(vsphere: VSphere, creds: Credentials) -> None:
    closed = Credentials(host="127.0.0.1", port=closed_port(), user=creds.user, password="x")
    with pytest.raises(Unreachable, match="refused") as raised:
        await vsphere.power_state(closed, "4205a8b3-0000-0000-0000-000000000000")
    assert raised.value.status == 502


@pytest_twisted.ensureDeferred
async def test_a_vcenter_that_never_answers_times_out(
    thread_pool: ThreadPool, creds: Credentials
) -> None:
    # The kernel completes the TCP handshake; nobody ever speaks TLS.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    pool = make_pool(thread_pool, call_timeout=0.5)
    try:
        mute = Credentials(
            host="127.0.0.1", port=silent.getsockname()[1], user=creds.user, password="x"
        )
        with pytest.raises(TimedOut) as raised:
            await VSphere(pool).cbt_status(mute, "/DC0/vm/pgtest10")
        assert raised.value.status == 504
        assert pool.session_count == 0
    finally:
        await pool.close()
        silent.close()


@pytest_twisted.ensureDeferred
async def test_a_malformed_vm_path_is_a_bad_request(vsphere: VSphere, creds: Credentials) -> None:
    with pytest.raises(InvalidVSphereRequest):
        await vsphere.cbt_status(creds, "/")


# -- TLS ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_default_verification_rejects_the_self_signed_certificate(
    thread_pool: ThreadPool, creds: Credentials, admin: Any
) -> None:
    before = session_keys(admin)
    pool = make_pool(thread_pool)  # the system CAs only
    try:
        with pytest.raises(CertificateRejected, match="not trusted") as raised:
            await VSphere(pool).cbt_status(creds, "/DC0/vm/pgtest10")
        assert raised.value.status == 502
    finally:
        await pool.close()
    assert session_keys(admin) == before


@pytest_twisted.ensureDeferred
async def test_a_pinned_thumbprint_is_trusted_and_a_wrong_one_refused(
    thread_pool: ThreadPool, creds: Credentials, testbed: Testbed
) -> None:
    vc = testbed.vcenter
    pool = make_pool(thread_pool)  # no CA trusts the simulator: only the pin can
    vsphere = VSphere(pool)
    try:
        for thumbprint in (vc["thumbprint"], vc["thumbprint_sha256"].replace(":", "").lower()):
            pinned = Credentials(
                host=creds.host,
                port=creds.port,
                user=creds.user,
                password=creds.password,
                thumbprint=thumbprint,
            )
            status = await vsphere.cbt_status(pinned, "/DC0/vm/pgtest10")
            assert status["vm_name"] == "pgtest10"
        # A logged-in pinned session must not carry a request with another pin.
        wrong_digits = ("00" if not vc["thumbprint"].startswith("00") else "11") + vc[
            "thumbprint"
        ].replace(":", "")[2:]
        wrong = Credentials(
            host=creds.host,
            port=creds.port,
            user=creds.user,
            password=creds.password,
            thumbprint=wrong_digits,
        )
        with pytest.raises(CertificateRejected, match="does not match"):
            await vsphere.cbt_status(wrong, "/DC0/vm/pgtest10")
    finally:
        await pool.close()


@pytest_twisted.ensureDeferred
async def test_insecure_mode_skips_verification_but_not_a_pin(
    thread_pool: ThreadPool, creds: Credentials
) -> None:
    pool = make_pool(thread_pool, insecure=True)
    vsphere = VSphere(pool)
    try:
        assert (await vsphere.cbt_status(creds, "/DC0/vm/pgtest10"))["vm_name"] == "pgtest10"
        wrong = Credentials(
            host=creds.host,
            port=creds.port,
            user=creds.user,
            password=creds.password,
            thumbprint="AA" * 32,
        )
        with pytest.raises(CertificateRejected):
            await vsphere.cbt_status(wrong, "/DC0/vm/pgtest10")
    finally:
        await pool.close()


# -- sessions ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sessions_are_reused_and_logged_out_when_idle(
    thread_pool: ThreadPool, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    clock = Clock()
    pool = make_pool(
        testbed=testbed, thread_pool=thread_pool, clock=clock, idle_timeout=30, check_interval=5
    )
    vsphere = VSphere(pool)
    before = session_keys(admin)
    try:
        await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
        await vsphere.power_state(creds, testbed.vm("pgtest10")["uuid"])
        ours = session_keys(admin) - before
        assert len(ours) == 1 and pool.session_count == 1

        clock.advance(20)  # used 20 s ago: still wanted
        assert pool.session_count == 1
        await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
        clock.advance(25)  # 25 s since the last use
        assert pool.session_count == 1
        clock.advance(10)  # 35 s: the next check logs it out
        assert pool.session_count == 0
        await eventually(lambda: not (session_keys(admin) & ours), "the idle logout")

        await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")  # a fresh login
        assert len(session_keys(admin) - before) == 1
    finally:
        await pool.close()
    await eventually(lambda: session_keys(admin) == before, "the logout at close")


@pytest_twisted.ensureDeferred
async def test_a_session_vcenter_forgot_is_replaced_transparently(
    vsphere: VSphere, sessions: SessionPool, creds: Credentials, admin: Any
) -> None:
    before = session_keys(admin)
    await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
    (ours,) = session_keys(admin) - before
    admin.content.sessionManager.TerminateSession([ours])

    status = await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
    assert status["vm_name"] == "pgtest10"
    (replacement,) = session_keys(admin) - before
    assert replacement != ours
    assert sessions.session_count == 1


@pytest_twisted.ensureDeferred
async def test_close_logs_out_and_refuses_more_work(
    thread_pool: ThreadPool, creds: Credentials, testbed: Testbed, admin: Any
) -> None:
    before = session_keys(admin)
    pool = make_pool(thread_pool, testbed)
    vsphere = VSphere(pool)
    await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
    other_user = Credentials(host=creds.host, port=creds.port, user=creds.user, password="wrong")
    with pytest.raises(AuthenticationFailed):
        await vsphere.cbt_status(other_user, "/DC0/vm/pgtest10")
    assert len(session_keys(admin) - before) == 1
    await vsphere.close()
    assert session_keys(admin) == before
    with pytest.raises(VSphereError, match="shut down"):
        await vsphere.cbt_status(creds, "/DC0/vm/pgtest10")
