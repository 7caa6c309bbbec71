"""VM records, name filters and spec diffs, from pyVmomi data objects built in memory.

The shapes the testbed cannot produce (RDM disks, e1000e and opaque NICs,
Go SNA records with empty fields) are covered here; the rest is compared
against the simulator in ``tests/integration/test_vmware.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pyVmomi import vim

from sna.vmware import specdiff
from sna.vmware.inventory import (
    Entity,
    disk_record,
    guest_family,
    nic_record,
    path_of,
    select_vms,
)
from sna.vmware.vsphere import is_job_snapshot

MiB = 1 << 20
dev = vim.vm.device


def vms(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "path": f"/DC0/vm/{n}"} for n in names]


# -- the name filter ---------------------------------------------------------------------------


def test_exact_names_come_before_substrings() -> None:
    listed = select_vms(vms("pgtest10", "OldPGTest1", "pgtest1", "web"), "pgtest1")
    assert [v["name"] for v in listed] == ["pgtest1", "pgtest10", "OldPGTest1"]


def test_exact_match_is_case_sensitive_substrings_are_not() -> None:
    listed = select_vms(vms("pgtest10", "PGtest1"), "pgtest1")
    assert [v["name"] for v in listed] == ["pgtest10", "PGtest1"]


def test_comma_separated_terms_list_each_vm_once() -> None:
    listed = select_vms(vms("a1", "b1", "ab1", "c"), " a1 , ab1,, b")
    assert [v["name"] for v in listed] == ["a1", "ab1", "b1"]


@pytest.mark.parametrize("empty", [None, "", " , "])
def test_no_filter_lists_everything(empty: Any) -> None:
    assert len(select_vms(vms("a", "b"), empty)) == 2


# -- guest families and paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "family"),
    [
        (("Microsoft Windows Server 2019 (64-bit)",), "windows"),
        ((None, None, "windows9Server64Guest"), "windows"),
        ((None, "", "winNetStandardGuest"), "windows"),
        (("Ubuntu Linux (64-bit)",), "linux"),
        ((None, "ubuntu64Guest"), "linux"),
        ((None, None, "rhel8_64Guest"), "linux"),
        ((None, None, "otherLinux64Guest"), "linux"),
        (("Oracle Solaris 11 (64-bit)", "solaris11_64Guest"), "unknown"),
        ((None, None, None), "unknown"),
        (("FreeBSD 12",), "unknown"),
    ],
)
def test_guest_family(names: tuple[Any, ...], family: str) -> None:
    assert guest_family(*names) == family


def test_paths_follow_folders_up_to_the_datacenter() -> None:
    tree = {
        "group-d1": Entity("Datacenters", None),
        "f-dcs": Entity("Europe", "group-d1"),
        "dc-1": Entity("DC1", "f-dcs", datacenter=True),
        "f-vm": Entity("vm", "dc-1"),
        "f-prod": Entity("prod", "f-vm"),
    }
    assert path_of(tree, "f-prod", "db1") == (
        "/Europe/DC1/vm/prod/db1",
        "/Europe/DC1/vm/prod",
        "DC1",
    )
    assert path_of(tree, "f-vm", "x%2fy") == ("/Europe/DC1/vm/x%2fy", "/Europe/DC1/vm", "DC1")
    assert path_of(tree, None, "orphan") == ("/orphan", "/", "")


# -- disks and NICs ----------------------------------------------------------------------------


def controllers() -> dict[int, Any]:
    return {
        1000: dev.ParaVirtualSCSIController(key=1000, busNumber=0),
        1003: dev.VirtualLsiLogicSASController(key=1003, busNumber=3),
        15001: dev.VirtualAHCIController(key=15001, busNumber=1),
        31000: dev.VirtualNVMEController(key=31000, busNumber=0),
        201: dev.VirtualIDEController(key=201, busNumber=1),
    }


def disk(key: int, controller: int, unit: int, backing: Any, kb: int = 0, size: int = 0) -> Any:
    return dev.VirtualDisk(
        key=key,
        controllerKey=controller,
        unitNumber=unit,
        capacityInKB=kb,
        capacityInBytes=size or None,
        deviceInfo=vim.Description(label=f"Hard disk {key}", summary=""),
        backing=backing,
    )


def flat(name: str, thin: bool) -> Any:
    return dev.VirtualDisk.FlatVer2BackingInfo(
        fileName=name, diskMode="persistent", thinProvisioned=thin
    )


@pytest.mark.parametrize(
    ("controller", "key", "name"),
    [(1003, 2048, "scsi3"), (15001, 16030, "sata1"), (31000, 32000, "nvme0"), (201, 3002, "ide1")],
)
def test_disk_controllers(controller: int, key: int, name: str) -> None:
    record = disk_record(
        disk(key, controller, 0, flat("[ds] v/v.vmdk", False), kb=1024), controllers()
    )
    assert (record["controller"], record["controller_key"], record["key"]) == (
        name,
        controller,
        key,
    )
    assert record["provisioning_type"] == "thick"


def test_disk_capacity_prefers_bytes_and_rounds_gigabytes_up() -> None:
    record = disk_record(
        disk(2000, 1000, 0, flat("[LocalDS_0] vm/vm.vmdk", True), kb=1024, size=MiB + 512),
        controllers(),
    )
    assert record == {
        "id": "disk-2000",
        "key": 2000,
        "label": "Hard disk 2000",
        "path": "[LocalDS_0] vm/vm.vmdk",
        "vmdk_path": "[LocalDS_0] vm/vm.vmdk",
        "size_gb": 1,
        "capacity_bytes": MiB + 512,
        "datastore": "LocalDS_0",
        "provisioning_type": "thin",
        "unit_number": 0,
        "controller": "scsi0",
        "controller_key": 1000,
    }
    only_kb = disk_record(
        disk(2001, 1000, 1, flat("[a b] c.vmdk", True), kb=3 << 20), controllers()
    )
    assert (only_kb["capacity_bytes"], only_kb["size_gb"], only_kb["datastore"]) == (
        3 << 30,
        3,
        "a b",
    )


def test_a_raw_device_mapping_has_unknown_provisioning() -> None:
    rdm = dev.VirtualDisk.RawDiskMappingVer1BackingInfo(fileName="[ds] v/rdm.vmdk")
    record = disk_record(disk(2001, 1000, 1, rdm, kb=1024), controllers())
    assert record["provisioning_type"] == "unknown"
    assert record["vmdk_path"] == "[ds] v/rdm.vmdk"


def nic(kind: Any, backing: Any, connected: bool = True) -> Any:
    return kind(
        key=4000,
        macAddress="00:50:56:AA:BB:CC",
        deviceInfo=vim.Description(label="Network adapter 1", summary=""),
        connectable=dev.VirtualDevice.ConnectInfo(connected=connected),
        backing=backing,
    )


def test_nics_of_every_backing() -> None:
    card = dev.VirtualEthernetCard
    standard = nic(dev.VirtualE1000e, card.NetworkBackingInfo(deviceName="VM Network"))
    port = vim.dvs.PortConnection(portgroupKey="dvportgroup-13", switchUuid="x")
    distributed = nic(dev.VirtualVmxnet3, card.DistributedVirtualPortBackingInfo(port=port), False)
    opaque = nic(dev.VirtualE1000, card.OpaqueNetworkBackingInfo(opaqueNetworkId="ls-1"))
    names = {"dvportgroup-13": "DPortGroup"}
    assert nic_record(standard, names) == {
        "label": "Network adapter 1",
        "network_name": "VM Network",
        "adapter_type": "e1000e",
        "mac_address": "00:50:56:AA:BB:CC",
        "connected": True,
        "type": "standard",
    }
    record = nic_record(distributed, names)
    assert (record["network_name"], record["type"], record["connected"]) == (
        "DPortGroup",
        "distributed",
        False,
    )
    assert nic_record(distributed, {})["network_name"] == "DVS-PG-dvportgroup-13"
    record = nic_record(opaque, names)
    assert (record["network_name"], record["adapter_type"], record["type"]) == (
        "NSX-ls-1",
        "e1000",
        "opaque",
    )


# -- job snapshots ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "job_id", "taken"),
    [
        ("sbak-backup-pg-1", "backup-pg-1", True),
        ("srep-rep-7", "rep-7", True),
        ("sbak-backup-pg-10", "backup-pg-1", False),
        ("sbak-backup-pg-1-old", "backup-pg-1", False),
        ("backup-pg-1", "backup-pg-1", False),
        ("cbt-init-1700000000", "backup-pg-1", False),
        ("sbak-anything", None, True),
        ("srep-anything", None, True),
        ("my-sbak-snapshot", None, False),
        ("Sbak-upper", None, False),
    ],
)
def test_job_snapshots(name: str, job_id: Any, taken: bool) -> None:
    assert is_job_snapshot(name, job_id) is taken


# -- spec diffs -------------------------------------------------------------------------------


def live_vm() -> dict[str, Any]:
    return {
        "id": "4205",
        "name": "pg1",
        "num_cpu": 2,
        "cpus": 2,
        "memory_mb": 4096,
        "power_state": "poweredOn",
        "os_type": "ubuntu64Guest",
        "vmx_version": "vmx-19",
        "display_name": "pg1",
        "annotation": "db",
        "folder_path": "/DC1/vm",
        "vmware_tools_status": "toolsOk",
        "vmware_tools_version": "12352",
        "cbt_enabled": True,
        "disks": [
            {
                "id": "disk-2000",
                "key": 2000,
                "label": "Hard disk 1",
                "capacity_bytes": 10 << 30,
                "size_gb": 10,
                "vmdk_path": "[ds] pg1/pg1.vmdk",
                "datastore": "ds",
            },
            {
                "id": "disk-2001",
                "key": 2001,
                "label": "Hard disk 2",
                "capacity_bytes": 5 << 30,
                "size_gb": 5,
                "vmdk_path": "[ds] pg1/pg1_1.vmdk",
                "datastore": "ds",
            },
        ],
        "networks": [
            {
                "label": "Network adapter 1",
                "network_name": "VM Network",
                "adapter_type": "vmxnet3",
                "mac_address": "00:50:56:aa:bb:cc",
                "connected": True,
                "type": "standard",
            },
        ],
    }


def test_no_changes() -> None:
    report = specdiff.report(specdiff.diff(live_vm(), live_vm()), "2025-10-10T12:39:15Z")
    assert report == {
        "has_changes": False,
        "changes_summary": "no changes",
        "changes_json": "",
        "check_time": "2025-10-10T12:39:15Z",
        "status": "success",
        "error_message": "",
        "changes": [],
    }


def test_a_go_sna_record_with_empty_fields_is_not_a_change() -> None:
    stored = live_vm()
    for field in ("cpus", "display_name", "folder_path", "vmware_tools_status", "os_type"):
        stored[field] = 0 if field == "cpus" else ""
    for d in stored["disks"]:  # the Go SNA's disks have no "key"
        del d["key"]
    for n in stored["networks"]:
        n["type"] = ""
    assert specdiff.diff(stored, live_vm()) == []


def test_hardware_disk_and_network_changes() -> None:
    stored = live_vm()
    live = live_vm()
    live["memory_mb"] = 8192
    live["power_state"] = "poweredOff"
    live["disks"][0]["capacity_bytes"] = 20 << 30
    live["disks"].pop(1)
    live["disks"].append(
        {
            "id": "disk-2016",
            "key": 2016,
            "label": "Hard disk 3",
            "capacity_bytes": MiB,
            "vmdk_path": "[ds] pg1/pg1_2.vmdk",
        }
    )
    live["networks"][0]["network_name"] = "Backup Net"
    live["networks"][0]["mac_address"] = "00:50:56:AA:BB:CC"  # MACs compare in any case
    live["networks"].append(
        {
            "label": "Network adapter 2",
            "network_name": "VM Network",
            "mac_address": "00:50:56:00:00:01",
            "connected": False,
        }
    )
    changes = specdiff.diff(stored, live)
    got = [(c["field"], c["type"], c.get("key") or c.get("mac_address")) for c in changes]
    assert got == [
        ("memory_mb", "modified", None),
        ("power_state", "modified", None),
        ("disks", "added", 2016),
        ("disks", "removed", 2001),
        ("disks.capacity_bytes", "resized", 2000),
        ("networks", "added", "00:50:56:00:00:01"),
        ("networks.network_name", "modified", "00:50:56:AA:BB:CC"),
    ]
    report = specdiff.report(changes, "t")
    assert report["has_changes"] is True
    assert json.loads(report["changes_json"]) == changes
    assert report["changes_summary"].startswith("7 changes: memory (MB) changed from 4096 to 8192")
    assert "disk 2000 resized from 10 GiB to 20 GiB" in report["changes_summary"]


def test_a_record_without_bytes_compares_gigabytes() -> None:
    stored = live_vm()
    del stored["disks"][0]["capacity_bytes"]
    live = live_vm()
    live["disks"][0]["size_gb"] = 12
    (change,) = specdiff.diff(stored, live)
    assert (change["field"], change["old"], change["new"]) == ("disks.size_gb", 10, 12)


def test_change_texts_read_as_json_not_python() -> None:
    stored = {
        "power_state": "poweredOn",
        "networks": [{"mac_address": "00:50:56:aa:bb:cc", "connected": True}],
    }
    live = {
        "power_state": "poweredOff",
        "networks": [{"mac_address": "00:50:56:aa:bb:cc", "connected": False}],
    }
    texts = [c["description"] for c in specdiff.diff(stored, live)]
    assert any("from poweredOn to poweredOff" in t for t in texts), texts
    assert any("from true to false" in t for t in texts), texts
    assert not any("'" in t or "False" in t for t in texts), texts
