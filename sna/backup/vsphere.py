"""The client's vCenter session: blocking pyVmomi calls, one at a time.

:class:`Session` wraps one logged-in ServiceInstance and offers what a backup
needs: the VM by inventory path, CBT state and enabling it, the job's
snapshot (create, find by exact name, remove), the snapshot's disks with their
backing file and change ID, one ``QueryChangedDiskAreas`` window, and the
session cookie that authenticates datastore ``/folder`` downloads.

Every method blocks and makes one request (or a few, for a login); tasks
are only started here, and :mod:`sna.backup.job` looks at them again and
again, so that each call it makes has a deadline and no call waits for a
task to end.  Faults become :class:`VSphereError` with a message that names
the object and vSphere's own text.  This module keeps no global
state, logs no secret, and knows nothing of NBD, events or Twisted.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Optional

import attrs
from pyVim.connect import Disconnect
from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import SoapStubAdapter
from twisted.logger import Logger

from sna.backup.extents import Area, ChangeWindow
from sna.contract.soap import NotVSphere, negotiate_version
from sna.contract.vcenter import NotFound, VSphereError, fault_text, walk_snapshots

log = Logger()

_DATASTORE_PATH = re.compile(r"^\[(?P<datastore>[^\]]+)\]\s*(?P<path>.+)$")


@attrs.frozen
class SnapshotDisk:
    """A virtual disk as the snapshot sees it."""

    key: str
    label: str
    capacity: int
    #: ``[datastore] dir/name.vmdk``: the descriptor of the disk at the snapshot point.
    file_name: str
    datastore: str
    #: The descriptor's path inside the datastore.
    path: str
    change_id: Optional[str]
    backing_type: str
    #: True when the backing has a parent (a delta of an earlier snapshot).
    has_parent: bool


@attrs.frozen
class TaskLook:
    """A vCenter task as one look at it found it."""

    ended: bool
    result: Any = None


def _disk_from_device(device: Any) -> SnapshotDisk:
    backing = device.backing
    capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
    file_name = getattr(backing, "fileName", "") or ""
    match = _DATASTORE_PATH.match(file_name)
    datastore, path = (match["datastore"], match["path"]) if match else ("", file_name)
    label = device.deviceInfo.label if device.deviceInfo is not None else f"disk {device.key}"
    return SnapshotDisk(
        key=str(device.key),
        label=label,
        capacity=int(capacity),
        file_name=file_name,
        datastore=datastore,
        path=path,
        change_id=getattr(backing, "changeId", None) or None,
        backing_type=type(backing).__name__.rsplit(".", 1)[-1],
        has_parent=getattr(backing, "parent", None) is not None,
    )


def moref(managed_object: Any) -> str:
    """``vm-123``, ``snapshot-456``: the id nbdkit-vddk's ``vm=moref=`` and ``snapshot=`` want."""
    return str(managed_object._moId)


class Session:
    """One logged-in vCenter session."""

    def __init__(self, service_instance: Any, where: str, about: str = "") -> None:
        self._si = service_instance
        self.where = where
        #: What the server says it is (read at login, so no call is needed to log it).
        self.about = about

    @classmethod
    def login(
        cls,
        host: str,
        port: int,
        user: str,
        password: str,
        context: ssl.SSLContext,
        timeout: float,
    ) -> Session:
        """Log in; every request of it, the API version's included, times out after
        ``timeout`` seconds of silence (pyVmomi's ``SmartConnect`` asks for the
        version without any)."""
        where = f"vCenter {host}:{port}"
        try:
            version = negotiate_version(host, port, context, timeout)
            stub = SoapStubAdapter(  # type: ignore[no-untyped-call]
                host=host,
                port=port,
                version=version,
                path="/sdk",
                sslContext=context,
                httpConnectionTimeout=timeout,
            )
            service_instance: Any = vim.ServiceInstance
            si = service_instance("ServiceInstance", stub)
            try:
                content = si.RetrieveContent()
                content.sessionManager.Login(user, password, None)
            except BaseException:
                stub.DropConnections()  # type: ignore[no-untyped-call]
                raise
        except vmodl.MethodFault as e:
            raise VSphereError(f"cannot log in to {where}: {fault_text(e)}") from None
        except NotVSphere as e:
            raise VSphereError(f"{where} does not answer as vSphere does: {e}") from None
        except ssl.SSLError as e:
            raise VSphereError(f"TLS with {where} failed: {e}") from None
        except OSError as e:
            raise VSphereError(f"cannot reach {where}: {e}") from None
        return cls(si, where, str(content.about.fullName))

    def session_cookie(self) -> str:
        """``vmware_soap_session=...``: what authenticates ``/folder`` requests."""
        cookie = str(getattr(self._si._stub, "cookie", "") or "")
        value = cookie.split(";", 1)[0].strip()
        if not value:
            raise VSphereError(f"{self.where} gave no session cookie")
        return value

    def keepalive(self) -> None:
        """The cheapest call there is, to keep the session from expiring."""
        self._si.CurrentTime()

    def logout(self) -> None:
        try:
            Disconnect(self._si)  # type: ignore[no-untyped-call]
        except Exception as e:  # logging out is a courtesy; the session times out anyway
            log.warn("logging out of {where} failed: {error}", where=self.where, error=str(e))

    # -- the VM -------------------------------------------------------------------

    def find_vm(self, path: str) -> Any:
        try:
            vm = self._si.content.searchIndex.FindByInventoryPath(path)
        except vmodl.MethodFault as e:
            raise VSphereError(f"looking up VM {path!r} failed: {fault_text(e)}") from None
        if vm is None or not isinstance(vm, vim.VirtualMachine):
            raise NotFound(f"no VM at inventory path {path!r} on {self.where}")
        return vm

    def datacenter_path(self, vm: Any) -> str:
        """The VM's datacenter as ``dcPath`` wants it (folders above it included)."""
        entity = vm.parent
        while entity is not None and not isinstance(entity, vim.Datacenter):
            entity = entity.parent
        if entity is None:
            raise VSphereError(f"VM {vm.name!r} is in no datacenter")
        names = []
        root = self._si.content.rootFolder
        while entity is not None and entity != root:
            names.append(entity.name)
            entity = entity.parent
        return "/".join(reversed(names))

    def cbt_enabled(self, vm: Any) -> bool:
        return bool(vm.config.changeTrackingEnabled)

    def snapshot_names(self, vm: Any) -> list[str]:
        info = vm.snapshot
        return [tree.name for tree in walk_snapshots(info.rootSnapshotList if info else [])]

    def snapshots_named(self, vm: Any, name: str) -> list[Any]:
        info = vm.snapshot
        trees = walk_snapshots(info.rootSnapshotList if info else [])
        return [tree.snapshot for tree in trees if tree.name == name]

    # -- tasks: started here, watched by the job (each look is one bounded call) -----

    def start_enable_cbt(self, vm: Any) -> Any:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)  # type: ignore[no-untyped-call]
        return vm.ReconfigVM_Task(spec=spec)

    def start_create_snapshot(self, vm: Any, name: str, description: str, quiesce: bool) -> Any:
        return vm.CreateSnapshot_Task(
            name=name, description=description, memory=False, quiesce=quiesce
        )

    def start_remove_snapshot(self, snapshot: Any) -> Any:
        return snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)

    def look_at_task(self, task: Any, what: str) -> TaskLook:
        """One look at a task: whether it has ended, and its result.  A failed task
        raises :class:`VSphereError` naming ``what``."""
        try:
            info = task.info
        except vmodl.MethodFault as e:
            raise VSphereError(f"{what}: cannot read its task: {fault_text(e)}") from None
        state = str(info.state)
        if state == "error":
            raise VSphereError(f"{what} failed: {fault_text(info.error)}")
        return TaskLook(ended=state == "success", result=info.result)

    def snapshot_disks(self, snapshot: Any) -> list[SnapshotDisk]:
        devices = snapshot.config.hardware.device
        return [_disk_from_device(d) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]

    def changed_window(
        self, vm: Any, snapshot: Any, disk_key: str, start: int, change_id: str
    ) -> ChangeWindow:
        """One ``QueryChangedDiskAreas`` answer (faults are raised as pyVmomi's)."""
        info = vm.QueryChangedDiskAreas(
            snapshot=snapshot, deviceKey=int(disk_key), startOffset=start, changeId=change_id
        )
        areas = tuple(Area(int(a.start), int(a.length)) for a in (info.changedArea or []))
        return ChangeWindow(int(info.startOffset), int(info.length), areas)
