"""Reading vCenter's inventory, and VMs as the Go SNA's ``/discover`` describes them.

Two kinds of functions: blocking ones taking a :class:`Connection` (they run
on the thread pool, through the session pool) and pure ones turning retrieved
properties into JSON-ready dicts.  Inventories come from one PropertyCollector
retrieval per kind of object over a ContainerView, never one call per VM; a
property vCenter leaves unset is simply absent, and every converter copes.

Nothing here changes anything in vCenter, manages sessions or knows HTTP.
"""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import attrs
from pyVmomi import vim, vmodl

from sna.vmware.interface import InvalidVSphereRequest, NotFound
from sna.vmware.sessions import Connection

PC: Any = vmodl.query.PropertyCollector
GiB = 1 << 30

#: What ``/discover`` and the spec comparison read of each VM, in one retrieval.
VM_PROPERTIES = (
    "name",
    "parent",
    "parentVApp",
    "config.uuid",
    "config.version",
    "config.guestId",
    "config.guestFullName",
    "config.annotation",
    "config.changeTrackingEnabled",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "runtime.powerState",
    "guest.guestFullName",
    "guest.toolsStatus",
    "guest.toolsVersion",
)

Properties = dict[str, Any]


# -- retrieval ----------------------------------------------------------------------


def moid(obj: Any) -> str:
    value: str = obj._moId
    return value


def collect(conn: Connection, spec: Any) -> list[tuple[Any, Properties]]:
    """Every object of a filter spec with its properties, following continuation tokens."""
    collector = conn.content.propertyCollector
    result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    found: list[tuple[Any, Properties]] = []
    while result is not None:
        for content in result.objects:
            for missing in content.missingSet or ():
                # govmomi's simulator answers a retrieval on a forgotten
                # session this way instead of with a fault; vCenter may too.
                if isinstance(missing.fault, vim.fault.NotAuthenticated):
                    raise missing.fault
            found.append((content.obj, {p.name: p.val for p in content.propSet or ()}))
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return found


def retrieve_view(
    conn: Connection, root: Any, kinds: Sequence[tuple[Any, Sequence[str]]]
) -> list[tuple[Any, Properties]]:
    """Properties of every object of the given kinds below ``root`` (recursively)."""
    manager = conn.content.viewManager
    view = manager.CreateContainerView(root, [kind for kind, _ in kinds], True)
    traversal = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
        propSet=[PC.PropertySpec(type=kind, pathSet=list(paths)) for kind, paths in kinds],
    )
    try:
        found = collect(conn, spec)
    except BaseException:
        # The first failure is the one to report (a dead session fails both);
        # vCenter drops the session's views with the session anyway.
        with contextlib.suppress(Exception):
            view.Destroy()
        raise
    view.Destroy()
    return found


def retrieve_objects(
    conn: Connection, objects: Iterable[Any], kind: Any, paths: Sequence[str]
) -> list[tuple[Any, Properties]]:
    """Properties of the given objects (all of one kind)."""
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=obj, skip=False) for obj in objects],
        propSet=[PC.PropertySpec(type=kind, pathSet=list(paths))],
    )
    return collect(conn, spec)


def retrieve_one(conn: Connection, kind: Any, object_id: str, paths: Sequence[str]) -> Properties:
    """Properties of one object; :class:`ManagedObjectNotFound` if it is gone."""
    found = retrieve_objects(conn, [conn.ref(kind, object_id)], kind, paths)
    if not found:
        raise vmodl.fault.ManagedObjectNotFound(obj=conn.ref(kind, object_id))  # type: ignore[no-untyped-call]
    return found[0][1]


# -- the folder tree and paths -------------------------------------------------------


@attrs.frozen
class Entity:
    name: str
    parent: Optional[str]
    datacenter: bool = False


Tree = dict[str, Entity]


def entity_tree(conn: Connection) -> Tree:
    """Folders, datacenters and vApps by moref id: enough to spell inventory paths."""
    found = retrieve_view(
        conn,
        conn.content.rootFolder,
        [
            (vim.Folder, ("name", "parent")),
            (vim.Datacenter, ("name", "parent")),
            # A vApp's parent is a resource pool; in the VM tree it sits in its folder.
            (vim.VirtualApp, ("name", "parentFolder", "parentVApp")),
        ],
    )
    tree: Tree = {}
    for obj, props in found:
        parent = props.get("parentFolder") or props.get("parentVApp") or props.get("parent")
        tree[moid(obj)] = Entity(
            name=props.get("name", ""),
            parent=moid(parent) if parent is not None else None,
            datacenter=isinstance(obj, vim.Datacenter),
        )
    return tree


def path_of(tree: Tree, parent: Optional[str], name: str) -> tuple[str, str, str]:
    """(inventory path, parent folder path, datacenter name) of an object named ``name``.

    Paths are govmomi's ``InventoryPath``: ``/DC1/vm/folder/name``, the root
    folder left out.  Names are as vCenter returns them (``/`` in a name is
    already escaped as ``%2f``).
    """
    names: list[str] = []
    datacenter = ""
    seen: set[str] = set()
    while parent is not None and parent in tree and parent not in seen:
        seen.add(parent)
        entity = tree[parent]
        if entity.parent is None:
            break  # the root folder ("Datacenters") is not part of paths
        names.append(entity.name)
        if entity.datacenter and not datacenter:
            datacenter = entity.name
        parent = entity.parent
    folder = "/" + "/".join(reversed(names))
    return folder.rstrip("/") + "/" + name, folder, datacenter


def datacenters(tree: Tree) -> dict[str, str]:
    """Datacenter name -> moref id."""
    return {e.name: key for key, e in tree.items() if e.datacenter}


def portgroup_names(conn: Connection) -> dict[str, str]:
    """Distributed port group key -> name, for NICs on distributed switches."""
    found = retrieve_view(
        conn, conn.content.rootFolder, [(vim.dvs.DistributedVirtualPortgroup, ("key", "name"))]
    )
    return {props.get("key", moid(obj)): props.get("name", "") for obj, props in found}


def needs_portgroups(vms: Iterable[Properties]) -> bool:
    for props in vms:
        for device in props.get("config.hardware.device") or ():
            if isinstance(
                getattr(device, "backing", None),
                vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo,
            ):
                return True
    return False


# -- finding one VM ---------------------------------------------------------------------

_MOREF = re.compile(r"vm-\d+")
_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)


def find_vm_by_path(conn: Connection, vm_path: str) -> str:
    """The moref id of the VM at an inventory path (``/DC/vm/x`` or ``DC/vm/x``).

    A bare name (no ``/`` inside) is also accepted when exactly one VM has it.
    """
    text = vm_path.strip("/")
    if not text:
        raise InvalidVSphereRequest(
            "vm_path", "vm_path must be an inventory path like /DC1/vm/name"
        )
    entity = conn.content.searchIndex.FindByInventoryPath(text)
    if entity is None and "/" not in text:
        named = [
            obj
            for obj, props in retrieve_view(
                conn, conn.content.rootFolder, [(vim.VirtualMachine, ("name",))]
            )
            if props.get("name") == text
        ]
        if len(named) > 1:
            raise InvalidVSphereRequest(
                "vm_path", f"{len(named)} VMs are named {text}; give the inventory path"
            )
        entity = named[0] if named else None
    if not isinstance(entity, vim.VirtualMachine):
        raise NotFound(f"no VM at {vm_path} on vCenter {conn.where}")
    return moid(entity)


def find_vm_by_id(conn: Connection, vm_id: str) -> str:
    """The moref id of the VM with this BIOS UUID (``/discover``'s ``id``), instance UUID or moref.

    The whole inventory is searched (no datacenter needed).  vCenter answers
    from its index; where ``FindByUuid`` fails with a bare RuntimeFault
    (govmomi's simulator does when it holds objects of its own), the VMs'
    UUIDs are read with one retrieval instead.
    """
    if _MOREF.fullmatch(vm_id):
        retrieve_one(conn, vim.VirtualMachine, vm_id, ("name",))
        return vm_id
    if not _UUID.fullmatch(vm_id):
        raise InvalidVSphereRequest(
            "vm_id", "vm_id must be a VM's BIOS UUID (/discover's id), instance UUID or moref"
        )
    # vCenter keeps UUIDs in lower case with dashes and may match only that spelling.
    vm_id = str(uuid.UUID(vm_id))
    index = conn.content.searchIndex
    for instance in (False, True):
        try:
            found = index.FindByUuid(None, vm_id, True, instance)
        except vmodl.RuntimeFault as e:
            if type(e) is not vmodl.RuntimeFault:
                raise
            return _scan_for_uuid(conn, vm_id)
        if isinstance(found, vim.VirtualMachine):
            return moid(found)
    raise NotFound(f"no VM with BIOS or instance UUID {vm_id} on vCenter {conn.where}")


def _scan_for_uuid(conn: Connection, vm_id: str) -> str:
    wanted = vm_id.lower()
    found = retrieve_view(
        conn,
        conn.content.rootFolder,
        [(vim.VirtualMachine, ("config.uuid", "config.instanceUuid"))],
    )
    for field in ("config.uuid", "config.instanceUuid"):
        matches = [obj for obj, props in found if (props.get(field) or "").lower() == wanted]
        if len(matches) > 1:
            raise InvalidVSphereRequest(
                "vm_id", f"{len(matches)} VMs have the UUID {vm_id}; use the instance UUID"
            )
        if matches:
            return moid(matches[0])
    raise NotFound(f"no VM with BIOS or instance UUID {vm_id} on vCenter {conn.where}")


# -- VMs as /discover describes them ---------------------------------------------------

_LINUX = re.compile(
    r"linux|ubuntu|debian|centos|rhel|red ?hat|sles|suse|fedora|rocky|alma|photon|coreos"
    r"|flatcar|asianux|mandr|turbolinux|amazon"
)


def guest_family(*names: Optional[str]) -> str:
    """``windows``, ``linux`` or ``unknown`` from the first name that tells."""
    for name in names:
        text = (name or "").lower()
        if "windows" in text or text.startswith("win"):
            return "windows"
        if _LINUX.search(text):
            return "linux"
    return "unknown"


def _controller_prefix(device: Any) -> str:
    if isinstance(device, vim.vm.device.VirtualSCSIController):
        return "scsi"
    if isinstance(device, vim.vm.device.VirtualSATAController):
        return "sata"
    if isinstance(device, vim.vm.device.VirtualNVMEController):
        return "nvme"
    if isinstance(device, vim.vm.device.VirtualIDEController):
        return "ide"
    return ""


def _datastore_of(file_name: str) -> str:
    """``LocalDS_0`` of ``[LocalDS_0] vm/vm.vmdk``."""
    if file_name.startswith("[") and "]" in file_name:
        return file_name[1 : file_name.index("]")]
    return ""


def disk_record(disk: Any, controllers: dict[int, Any]) -> dict[str, Any]:
    key = int(disk.key)
    capacity = int(disk.capacityInBytes or 0) or int(disk.capacityInKB or 0) * 1024
    backing = disk.backing
    file_name = str(getattr(backing, "fileName", "") or "")
    if isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
        provisioning = "thin" if backing.thinProvisioned else "thick"
    else:
        provisioning = "unknown"
    controller_key = int(disk.controllerKey) if disk.controllerKey is not None else -1
    controller = controllers.get(controller_key)
    name = (
        f"{_controller_prefix(controller)}{controller.busNumber}" if controller is not None else ""
    )
    return {
        "id": f"disk-{key}",
        "key": key,
        "label": disk.deviceInfo.label if disk.deviceInfo is not None else "",
        "path": file_name,
        "vmdk_path": file_name,
        "size_gb": math.ceil(capacity / GiB),
        "capacity_bytes": capacity,
        "datastore": _datastore_of(file_name),
        "provisioning_type": provisioning,
        "unit_number": int(disk.unitNumber) if disk.unitNumber is not None else -1,
        "controller": name,
        "controller_key": controller_key,
    }


_ADAPTERS: tuple[tuple[Any, str], ...] = (
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualVmxnet2, "vmxnet2"),
    (vim.vm.device.VirtualVmxnet, "vmxnet"),
    (vim.vm.device.VirtualPCNet32, "pcnet32"),
    (vim.vm.device.VirtualSriovEthernetCard, "sriov"),
)


def nic_record(nic: Any, portgroups: dict[str, str]) -> dict[str, Any]:
    backing = nic.backing
    card = vim.vm.device.VirtualEthernetCard
    if isinstance(backing, card.NetworkBackingInfo):
        kind, network = "standard", backing.deviceName or ""
    elif isinstance(backing, card.DistributedVirtualPortBackingInfo):
        key = (backing.port.portgroupKey if backing.port is not None else None) or ""
        kind, network = "distributed", portgroups.get(key) or f"DVS-PG-{key}"
    elif isinstance(backing, card.OpaqueNetworkBackingInfo):
        kind, network = "opaque", f"NSX-{backing.opaqueNetworkId}"
    else:
        kind, network = "unknown", ""
    adapter = next((name for cls, name in _ADAPTERS if isinstance(nic, cls)), "unknown")
    connectable = nic.connectable
    return {
        "label": nic.deviceInfo.label if nic.deviceInfo is not None else "",
        "network_name": network,
        "adapter_type": adapter,
        "mac_address": nic.macAddress or "",
        "connected": bool(connectable.connected) if connectable is not None else False,
        "type": kind,
    }


def vm_record(
    obj: Any, props: Properties, tree: Tree, portgroups: dict[str, str]
) -> dict[str, Any]:
    """One VM as the Go SNA's ``VMInfo`` (``/discover``), every field filled."""
    name = props.get("name", "")
    parent = props.get("parent") or props.get("parentVApp")
    path, folder, datacenter = path_of(tree, moid(parent) if parent is not None else None, name)
    devices = props.get("config.hardware.device") or []
    controllers = {int(d.key): d for d in devices if _controller_prefix(d)}
    disks = [
        disk_record(d, controllers) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    nics = [
        nic_record(d, portgroups)
        for d in devices
        if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ]
    num_cpu = int(props.get("config.hardware.numCPU") or 0)
    return {
        "id": props.get("config.uuid") or moid(obj),
        "name": name,
        "path": path,
        "datacenter": datacenter,
        "power_state": str(props.get("runtime.powerState") or "unknown"),
        "guest_os": guest_family(
            props.get("guest.guestFullName"),
            props.get("config.guestFullName"),
            props.get("config.guestId"),
        ),
        "memory_mb": int(props.get("config.hardware.memoryMB") or 0),
        "num_cpu": num_cpu,
        "cpus": num_cpu,
        "os_type": props.get("config.guestId") or "",
        "vmx_version": props.get("config.version") or "",
        "display_name": name,
        "annotation": props.get("config.annotation") or "",
        "folder_path": folder,
        "vmware_tools_status": str(props.get("guest.toolsStatus") or "toolsNotInstalled"),
        "vmware_tools_version": str(props.get("guest.toolsVersion") or ""),
        "cbt_enabled": bool(props.get("config.changeTrackingEnabled")),
        "disks": disks,
        "networks": nics,
    }


def read_vms(
    conn: Connection,
    root: Optional[Any] = None,
    vm_id: Optional[str] = None,
    tree: Optional[Tree] = None,
) -> list[dict[str, Any]]:
    """VM records of every VM below ``root`` (or of one VM), sorted by path; blocking."""
    if vm_id is not None:
        props = retrieve_one(conn, vim.VirtualMachine, vm_id, VM_PROPERTIES)
        found = [(conn.ref(vim.VirtualMachine, vm_id), props)]
    else:
        found = retrieve_view(
            conn,
            root if root is not None else conn.content.rootFolder,
            [(vim.VirtualMachine, VM_PROPERTIES)],
        )
    if tree is None:
        tree = entity_tree(conn)
    portgroups = portgroup_names(conn) if needs_portgroups(p for _, p in found) else {}
    records = [vm_record(obj, props, tree, portgroups) for obj, props in found]
    return sorted(records, key=lambda r: str(r["path"]))


def select_vms(vms: list[dict[str, Any]], name_filter: Optional[str]) -> list[dict[str, Any]]:
    """The VMs a comma-separated name filter asks for: exact names first, then substrings.

    ``"pgtest1"`` lists ``pgtest1`` before ``pgtest10``, so a caller taking
    the first VM gets the one it named (the Go SNA matched substrings only,
    in inventory order).  Substrings match case-insensitively.
    """
    terms = [t.strip() for t in (name_filter or "").split(",") if t.strip()]
    if not terms:
        return list(vms)
    exact = [vm for vm in vms if vm["name"] in terms]
    taken = {id(vm) for vm in exact}
    lowered = [t.lower() for t in terms]
    partial = [
        vm
        for vm in vms
        if id(vm) not in taken and any(t in str(vm["name"]).lower() for t in lowered)
    ]
    return exact + partial
