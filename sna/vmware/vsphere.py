"""The real :class:`IVSphere`: every operation the API offers, done in vCenter with pyvmomi.

:class:`VSphere` runs on the reactor thread and hands each blocking step to
the :class:`~sna.vmware.sessions.SessionPool` (thread pool, deadline, session
reuse, error translation).  Waiting (for a task, a guest shutdown, VMware
Tools) happens here, between short calls, so no pool thread sleeps.  Each
step that changes something in vCenter does it as its last call, so a step
the pool repeats on a fresh session never changes anything twice.

Answers use the Go SNA's field names (``reference/upstream-contracts.md``
§1.3); this module knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Optional

from pyVmomi import vim
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from sna.vmware import specdiff
from sna.vmware.faults import translate
from sna.vmware.interface import (
    Conflict,
    Credentials,
    IVSphere,
    NotFound,
    TimedOut,
    VSphereError,
)
from sna.vmware.inventory import (
    Properties,
    datacenters,
    entity_tree,
    find_vm_by_id,
    find_vm_by_path,
    moid,
    path_of,
    read_vms,
    retrieve_one,
    select_vms,
)
from sna.vmware.sessions import Connection, SessionPool

log = Logger()

#: The longest sna waits for a vCenter task (a reconfiguration, a snapshot removal).
TASK_TIMEOUT = 300.0
#: How often a guest shutdown or VMware Tools start is checked.
POLL_INTERVAL = 2.0
#: Snapshot names the backup client gives: ``sbak-<job>`` for backups, ``srep-<job>`` otherwise.
JOB_SNAPSHOT_PREFIXES = ("sbak-", "srep-")

VM = vim.VirtualMachine

#: What the CBT answers read of a VM.
CBT_PROPERTIES = (
    "name",
    "config.uuid",
    "config.changeTrackingEnabled",
    "config.hardware.device",
    "runtime.powerState",
    "snapshot",
)

#: What the power answers read of a VM.
POWER_PROPERTIES = (
    "name",
    "runtime.powerState",
    "runtime.bootTime",
    "summary.runtime.bootTime",
    "guest.toolsStatus",
    "guest.toolsRunningStatus",
)


def _snapshots(tree: Any) -> Iterator[Any]:
    """Every snapshot of a ``SnapshotTree`` list, parents before children."""
    for node in tree or ():
        yield node
        yield from _snapshots(node.childSnapshotList)


def _snapshot_nodes(props: Properties) -> list[Any]:
    info = props.get("snapshot")
    return list(_snapshots(info.rootSnapshotList if info is not None else None))


def is_job_snapshot(name: str, job_id: Optional[str]) -> bool:
    """Whether a snapshot is one the backup client made (for ``job_id``, or for any job)."""
    if job_id is None:
        return name.startswith(JOB_SNAPSHOT_PREFIXES)
    return name in {prefix + job_id for prefix in JOB_SNAPSHOT_PREFIXES}


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _power_state(props: Properties) -> str:
    return str(props.get("runtime.powerState") or "unknown")


def _tools_status(props: Properties) -> str:
    return str(props.get("guest.toolsStatus") or "toolsNotInstalled")


def _tools_running(props: Properties) -> bool:
    if props.get("guest.toolsRunningStatus") == "guestToolsRunning":
        return True
    return props.get("guest.toolsStatus") in ("toolsOk", "toolsOld")


def _boot_time(props: Properties) -> Optional[datetime]:
    boot = props.get("runtime.bootTime") or props.get("summary.runtime.bootTime")
    return boot if isinstance(boot, datetime) else None


def cbt_record(vm_path: str, props: Properties) -> dict[str, Any]:
    """The ``cbt-status`` answer: the Go SNA's four fields, then snapshots and disks."""
    devices = props.get("config.hardware.device") or []
    disks = [
        {
            "key": int(d.key),
            "label": d.deviceInfo.label if d.deviceInfo is not None else "",
            # vCenter shows a change ID on a disk once tracking has started for it.
            "change_id": getattr(d.backing, "changeId", None) or None,
        }
        for d in devices
        if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    snapshots = _snapshot_nodes(props)
    return {
        "enabled": bool(props.get("config.changeTrackingEnabled")),
        "vm_name": props.get("name", ""),
        "power_state": _power_state(props),
        "vm_path": vm_path,
        "vm_id": props.get("config.uuid") or "",
        "has_snapshots": bool(snapshots),
        "snapshot_count": len(snapshots),
        "disks": disks,
    }


@implementer(IVSphere)
class VSphere:
    """vCenter operations over a :class:`SessionPool` (which also sets the clock).

    ``task_timeout`` bounds waiting for vCenter tasks that have no timeout of
    their own in the API (CBT reconfiguration, snapshot removal);
    ``poll_interval`` is how often shutdowns and VMware Tools are checked.
    """

    def __init__(
        self,
        sessions: SessionPool,
        *,
        task_timeout: float = TASK_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._sessions = sessions
        self._clock = sessions.clock
        self._task_timeout = task_timeout
        self._poll_interval = poll_interval

    # -- IVSphere -----------------------------------------------------------------------

    def discover(
        self, credentials: Credentials, datacenter: Optional[str], name_filter: Optional[str]
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._discover(credentials, datacenter, name_filter))

    def cbt_status(self, credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._cbt_status(credentials, vm_path))

    def enable_cbt(self, credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._enable_cbt(credentials, vm_path))

    def spec_changes(
        self, credentials: Credentials, vm_path: str, stored: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._spec_changes(credentials, vm_path, stored))

    def power_off(
        self, credentials: Credentials, vm_id: str, force: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._power_off(credentials, vm_id, force, timeout))

    def power_on(
        self, credentials: Credentials, vm_id: str, wait_for_tools: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._power_on(credentials, vm_id, wait_for_tools, timeout))

    def power_state(self, credentials: Credentials, vm_id: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._power_state(credentials, vm_id))

    def remove_job_snapshots(
        self, credentials: Credentials, vm_path: str, job_id: Optional[str]
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._remove_job_snapshots(credentials, vm_path, job_id))

    def close(self) -> Deferred[None]:
        return self._sessions.close()

    # -- helpers -----------------------------------------------------------------------

    def _now(self) -> str:
        return _rfc3339(datetime.fromtimestamp(self._clock.seconds(), UTC))

    async def _sleep(self, seconds: float) -> None:
        await deferLater(self._clock, max(seconds, 0.0))

    async def _wait_task(
        self, credentials: Credentials, task_id: str, what: str, deadline: float
    ) -> None:
        """Wait for a vCenter task to end; its failure is raised as a VSphereError."""
        delay = 0.05
        while True:

            def check(conn: Connection) -> Properties:
                return retrieve_one(conn, vim.Task, task_id, ("info.state", "info.error"))

            info = await self._sessions.run(credentials, check, f"checking on {what}")
            state = info.get("info.state")
            if state == "success":
                return
            if state == "error":
                fault = info.get("info.error")
                error = (
                    translate(fault, credentials, what) if isinstance(fault, Exception) else fault
                )
                if isinstance(error, VSphereError):
                    raise error
                raise VSphereError(f"{what} failed on vCenter {credentials.where}: {error}")
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                raise TimedOut(
                    f"{what} is still running on vCenter {credentials.where} "
                    f"(task {task_id}); it goes on there"
                )
            await self._sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    async def _power_props(self, credentials: Credentials, ident: str) -> Properties:
        def read(conn: Connection) -> Properties:
            return retrieve_one(conn, VM, ident, POWER_PROPERTIES)

        return await self._sessions.run(credentials, read, f"reading the power state of {ident}")

    async def _find_by_id(self, credentials: Credentials, vm_id: str) -> tuple[str, Properties]:
        def find(conn: Connection) -> tuple[str, Properties]:
            ident = find_vm_by_id(conn, vm_id)
            return ident, retrieve_one(conn, VM, ident, POWER_PROPERTIES)

        return await self._sessions.run(credentials, find, f"finding VM {vm_id}")

    # -- operations -----------------------------------------------------------------

    async def _discover(
        self, credentials: Credentials, datacenter: Optional[str], name_filter: Optional[str]
    ) -> dict[str, Any]:
        wanted = (datacenter or "").strip("/") or None

        def work(conn: Connection) -> tuple[list[dict[str, Any]], list[str]]:
            tree = entity_tree(conn)
            known = datacenters(tree)
            root = None
            if wanted is not None:
                if wanted not in known:
                    raise NotFound(
                        f"no datacenter {wanted} on vCenter {conn.where} "
                        f"(it has {', '.join(sorted(known)) or 'none'})"
                    )
                root = conn.ref(vim.Datacenter, known[wanted])
            return read_vms(conn, root=root, tree=tree), sorted(known)

        vms, names = await self._sessions.run(credentials, work, "discovering VMs")
        shown = wanted or (names[0] if len(names) == 1 else "")
        return {
            "vcenter": {"host": credentials.host, "datacenter": shown},
            "vms": select_vms(vms, name_filter),
        }

    async def _cbt_status(self, credentials: Credentials, vm_path: str) -> dict[str, Any]:
        def work(conn: Connection) -> tuple[str, Properties]:
            ident = find_vm_by_path(conn, vm_path)
            if "/" in vm_path.strip("/"):
                return vm_path, retrieve_one(conn, VM, ident, CBT_PROPERTIES)
            # A bare name: the answer gives the VM's inventory path, as /discover would.
            props = retrieve_one(conn, VM, ident, (*CBT_PROPERTIES, "parent", "parentVApp"))
            parent = props.get("parentVApp") or props.get("parent")
            parent_id = moid(parent) if parent is not None else None
            return path_of(entity_tree(conn), parent_id, props.get("name", ""))[0], props

        path, props = await self._sessions.run(
            credentials, work, f"reading the CBT status of {vm_path}"
        )
        return cbt_record(path, props)

    async def _enable_cbt(self, credentials: Credentials, vm_path: str) -> dict[str, Any]:
        """Turn CBT on with a reconfiguration; refused (409) while the VM has snapshots.

        VMware requires a VM without snapshots.  On a powered-on VM tracking
        starts at the next stun (the backup's own snapshot), as vSphere does.
        """

        def start(conn: Connection) -> tuple[str, Optional[str]]:
            ident = find_vm_by_path(conn, vm_path)
            props = retrieve_one(conn, VM, ident, CBT_PROPERTIES)
            if props.get("config.changeTrackingEnabled"):
                return ident, None
            count = len(_snapshot_nodes(props))
            if count:
                raise Conflict(
                    f"VM {vm_path} has {count} snapshot{'s' if count != 1 else ''}; VMware "
                    "enables changed block tracking only on a VM without snapshots: "
                    "remove them first"
                )
            spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)  # type: ignore[no-untyped-call]
            return ident, moid(conn.ref(VM, ident).ReconfigVM_Task(spec=spec))

        ident, task = await self._sessions.run(credentials, start, f"enabling CBT on {vm_path}")
        if task is not None:
            deadline = self._clock.seconds() + self._task_timeout
            await self._wait_task(credentials, task, f"enabling CBT on {vm_path}", deadline)
            log.info("enabled CBT on {vm_path}", vm_path=vm_path)

        def read(conn: Connection) -> Properties:
            return retrieve_one(conn, VM, ident, CBT_PROPERTIES)

        status = cbt_record(
            vm_path,
            await self._sessions.run(credentials, read, f"reading the CBT status of {vm_path}"),
        )
        return {**status, "changed": task is not None}

    async def _spec_changes(
        self, credentials: Credentials, vm_path: str, stored: dict[str, Any]
    ) -> dict[str, Any]:
        def work(conn: Connection) -> dict[str, Any]:
            return read_vms(conn, vm_id=find_vm_by_path(conn, vm_path))[0]

        live = await self._sessions.run(
            credentials, work, f"reading the specification of {vm_path}"
        )
        return specdiff.report(specdiff.diff(stored, live), self._now())

    async def _power_off(
        self, credentials: Credentials, vm_id: str, force: bool, timeout: float
    ) -> dict[str, Any]:
        """Shut the VM down and wait, within ``timeout`` seconds, until it is off.

        Without ``force`` and with VMware Tools running, the guest is asked
        to shut down and its power state is polled until it is off; if it is
        still on at ``timeout`` the answer says so (``success`` false, the
        real ``new_state``) and nothing harder is tried: the caller did not
        ask for a power cut.  With ``force``, or without Tools (the guest
        cannot be asked), the VM is powered off, as the Go SNA did.
        """
        started = self._clock.seconds()
        deadline = started + timeout
        ident, before = await self._find_by_id(credentials, vm_id)
        previous = _power_state(before)
        if previous == "poweredOff":
            message = "VM is already powered off"
            return self._power_answer(
                vm_id, "power-off", previous, before, started, "already-off", True, message
            )
        method = "hard"
        if not force and previous == "poweredOn" and _tools_running(before):

            def shutdown(conn: Connection) -> None:
                conn.ref(VM, ident).ShutdownGuest()

            try:
                await self._sessions.run(
                    credentials, shutdown, f"shutting down the guest of {vm_id}"
                )
                method = "graceful"
            except Conflict as e:
                # Tools stopped between our look and the request: power off instead.
                log.info(
                    "guest shutdown of {vm_id} refused ({error}); powering off",
                    vm_id=vm_id,
                    error=e.message,
                )
        if method == "graceful":
            after = await self._power_props(credentials, ident)
            while _power_state(after) != "poweredOff":
                remaining = deadline - self._clock.seconds()
                if remaining <= 0:
                    break
                await self._sleep(min(self._poll_interval, remaining))
                after = await self._power_props(credentials, ident)
        else:

            def power_off(conn: Connection) -> str:
                return moid(conn.ref(VM, ident).PowerOffVM_Task())

            try:
                task = await self._sessions.run(credentials, power_off, f"powering off {vm_id}")
                await self._wait_task(credentials, task, f"powering off {vm_id}", deadline)
            except Conflict:
                # It went off on its own in the meantime; the state read below tells.
                pass
            after = await self._power_props(credentials, ident)
        new_state = _power_state(after)
        success = new_state == "poweredOff"
        if success:
            message = "VM power-off completed successfully"
        else:
            message = f"the guest did not shut down within {timeout:g} s; the VM is {new_state}"
        return self._power_answer(
            vm_id, "power-off", previous, after, started, method, success, message
        )

    async def _power_on(
        self, credentials: Credentials, vm_id: str, wait_for_tools: bool, timeout: float
    ) -> dict[str, Any]:
        """Power the VM on; with ``wait_for_tools``, also wait (within ``timeout``) for Tools.

        Tools that do not come up are reported in ``message``, not as a
        failure: the VM is on.
        """
        started = self._clock.seconds()
        deadline = started + timeout
        ident, before = await self._find_by_id(credentials, vm_id)
        previous = _power_state(before)
        if previous == "poweredOn":
            return self._power_answer(
                vm_id, "power-on", previous, before, started, None, True, "VM already powered on"
            )

        def power_on(conn: Connection) -> str:
            return moid(conn.ref(VM, ident).PowerOnVM_Task())

        task = await self._sessions.run(credentials, power_on, f"powering on {vm_id}")
        await self._wait_task(credentials, task, f"powering on {vm_id}", deadline)
        after = await self._power_props(credentials, ident)
        message = "VM power-on completed successfully"
        if wait_for_tools and _power_state(after) == "poweredOn":
            while not _tools_running(after):
                remaining = deadline - self._clock.seconds()
                if remaining <= 0:
                    message = f"VM powered on; VMware Tools not running after {timeout:g} s"
                    break
                await self._sleep(min(self._poll_interval, remaining))
                after = await self._power_props(credentials, ident)
        new_state = _power_state(after)
        return self._power_answer(
            vm_id, "power-on", previous, after, started, None, new_state == "poweredOn", message
        )

    def _power_answer(
        self,
        vm_id: str,
        operation: str,
        previous: str,
        after: Properties,
        started: float,
        method: Optional[str],
        success: bool,
        message: str,
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "success": success,
            "vm_id": vm_id,
            "previous_state": previous,
            "new_state": _power_state(after),
            "operation": operation,
        }
        if method is not None:
            answer["shutdown_method"] = method
        answer["tools_status"] = _tools_status(after)
        answer["duration_seconds"] = round(self._clock.seconds() - started)
        answer["timestamp"] = self._now()
        answer["message"] = message
        return answer

    async def _power_state(self, credentials: Credentials, vm_id: str) -> dict[str, Any]:
        _, props = await self._find_by_id(credentials, vm_id)
        state = _power_state(props)
        answer: dict[str, Any] = {
            "vm_id": vm_id,
            "power_state": state,
            "tools_status": _tools_status(props),
        }
        boot = _boot_time(props)
        if boot is not None:
            answer["last_state_change"] = _rfc3339(boot)
            if state == "poweredOn":
                answer["uptime_seconds"] = max(0, int(self._clock.seconds() - boot.timestamp()))
        answer["timestamp"] = self._now()
        return answer

    async def _remove_job_snapshots(
        self, credentials: Credentials, vm_path: str, job_id: Optional[str]
    ) -> dict[str, Any]:
        """Remove the backup client's snapshots of a VM, one after the other, waiting for each.

        With a ``job_id``: ``sbak-<job_id>`` and ``srep-<job_id>``; without:
        every ``sbak-``/``srep-`` snapshot.  Other snapshots are never
        touched; the children of a removed snapshot are kept.
        """

        def find(conn: Connection) -> list[tuple[str, str]]:
            props = retrieve_one(conn, VM, find_vm_by_path(conn, vm_path), ("snapshot",))
            return [
                (moid(node.snapshot), str(node.name))
                for node in _snapshot_nodes(props)
                if is_job_snapshot(str(node.name), job_id)
            ]

        targets = await self._sessions.run(credentials, find, f"listing the snapshots of {vm_path}")
        deadline = self._clock.seconds() + self._task_timeout
        removed: list[str] = []
        for snapshot_id, name in targets:

            def remove(conn: Connection, snapshot_id: str = snapshot_id) -> str:
                snapshot = conn.ref(vim.vm.Snapshot, snapshot_id)
                return moid(snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True))

            try:
                task = await self._sessions.run(credentials, remove, f"removing snapshot {name}")
                await self._wait_task(credentials, task, f"removing snapshot {name}", deadline)
            except NotFound:
                # Gone already (another cleanup, or a person): the goal is met.
                log.info(
                    "snapshot {name} of {vm_path} was already gone", name=name, vm_path=vm_path
                )
                continue
            except VSphereError as e:
                log.warn(
                    "removing snapshot {name} of {vm_path} failed after removing {removed}: "
                    "{error}",
                    name=name,
                    vm_path=vm_path,
                    removed=removed,
                    error=e.message,
                )
                raise
            removed.append(name)
            log.info(
                "removed snapshot {name} of {vm_path} (job {job_id})",
                name=name,
                vm_path=vm_path,
                job_id=job_id,
            )
        return {"vm_path": vm_path, "job_id": job_id, "removed": removed, "status": "success"}
