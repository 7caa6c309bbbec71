"""The real :class:`IVSphere`: every operation the API offers, done in vCenter with pyvmomi.

:class:`VSphere` runs on the reactor thread and hands each blocking step to
the :class:`~sna.vmware.sessions.SessionPool` (thread pool, deadline, session
reuse, error translation).  Waiting (for a task, a guest shutdown, VMware
Tools) happens here, between short calls, so no pool thread sleeps.  Each
step that changes something in vCenter does it as its last call, so a step
the pool repeats on a fresh session never changes anything twice.

The power routes answer within :data:`ANSWER_WITHIN` seconds whatever the
request's ``timeout``: the SHA's HTTP client gives up after 60 s.  What is
still under way then (a guest shutting down, a power task) goes on in
vCenter, and the answer says so with the VM's state as last read.

Answers use the Go SNA's field names (``reference/upstream-contracts.md``
§1.3); this module knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Optional, TypeVar

import attrs
from pyVmomi import vim
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from sna.contract import ids
from sna.contract.vcenter import walk_snapshots
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

T = TypeVar("T")

log = Logger()

#: The longest sna waits for a vCenter task (a reconfiguration, a snapshot removal).
TASK_TIMEOUT = 300.0
#: How often a guest shutdown or VMware Tools start is checked.
POLL_INTERVAL = 2.0
#: The longest a power-off or power-on takes to answer, whatever its ``timeout``:
#: the SHA's HTTP client gives up after 60 s, and the answer must reach it first.
ANSWER_WITHIN = 50.0
#: The first wait before looking at a power task again (then doubled, up to the poll interval).
TASK_FIRST_LOOK = 0.05
#: The message of a power-off that ended with the VM off (the Go SNA's words).
POWERED_OFF = "VM power-off completed successfully"

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
#: What is read of a vCenter task to know whether it has ended.
TASK_PROPERTIES = ("info.state", "info.error")


def _snapshot_nodes(props: Properties) -> list[Any]:
    info = props.get("snapshot")
    return list(walk_snapshots(info.rootSnapshotList if info is not None else None))


def is_job_snapshot(name: str, job_id: Optional[str]) -> bool:
    """Whether a snapshot is one the backup client made (for ``job_id``, or for any job)."""
    if job_id is None:
        return name.startswith(ids.JOB_SNAPSHOT_PREFIXES)
    return name in ids.job_snapshot_names(job_id)


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


def _is_off(props: Properties) -> bool:
    return _power_state(props) == "poweredOff"


def _is_on(props: Properties) -> bool:
    return _power_state(props) == "poweredOn"


def _task_ended(info: Properties, credentials: Credentials, what: str) -> bool:
    """Whether a task (its ``TASK_PROPERTIES``) has succeeded; its failure is raised."""
    state = info.get("info.state")
    if state == "error":
        fault = info.get("info.error")
        error = translate(fault, credentials, what) if isinstance(fault, Exception) else fault
        if isinstance(error, VSphereError):
            raise error
        raise VSphereError(f"{what} failed on vCenter {credentials.where}: {error}")
    return state == "success"


# -- the blocking steps of the power routes (run on the thread pool) -------------------


def find_power(conn: Connection, vm_id: str) -> tuple[str, Properties]:
    """The moref id of the VM with this ``vm_id``, and its power properties."""
    ident = find_vm_by_id(conn, vm_id)
    return ident, retrieve_one(conn, VM, ident, POWER_PROPERTIES)


def look_power(
    conn: Connection, ident: str, task_id: Optional[str]
) -> tuple[Properties, Optional[Properties]]:
    """The VM's power properties and, read before them, the state of a task (if any)."""
    task = retrieve_one(conn, vim.Task, task_id, TASK_PROPERTIES) if task_id else None
    return retrieve_one(conn, VM, ident, POWER_PROPERTIES), task


def shutdown_guest(conn: Connection, ident: str) -> None:
    conn.ref(VM, ident).ShutdownGuest()


def start_power_off(conn: Connection, ident: str) -> str:
    return moid(conn.ref(VM, ident).PowerOffVM_Task())


def start_power_on(conn: Connection, ident: str) -> str:
    return moid(conn.ref(VM, ident).PowerOnVM_Task())


@attrs.frozen
class Window:
    """The time a power request may take: ``seconds`` from ``start`` (clock seconds)."""

    start: float
    seconds: float

    @property
    def end(self) -> float:
        return self.start + self.seconds


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
    ``poll_interval`` is how often shutdowns and VMware Tools are checked;
    ``answer_within`` bounds a power-off or power-on, vCenter calls included.
    """

    # The blocking steps of the power routes, as attributes so their waiting
    # can be tested without a vCenter (as SessionPool's are).
    find_power = staticmethod(find_power)
    look_power = staticmethod(look_power)
    shutdown_guest = staticmethod(shutdown_guest)
    start_power_off = staticmethod(start_power_off)
    start_power_on = staticmethod(start_power_on)

    def __init__(
        self,
        sessions: SessionPool,
        *,
        task_timeout: float = TASK_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
        answer_within: float = ANSWER_WITHIN,
    ) -> None:
        self._sessions = sessions
        self._clock = sessions.clock
        self._task_timeout = task_timeout
        self._poll_interval = poll_interval
        self._answer_within = answer_within

    # -- IVSphere -----------------------------------------------------------------------

    def discover(
        self,
        credentials: Credentials,
        datacenter: Optional[str],
        name_filter: Optional[str],
        vcenter: Optional[str] = None,
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._discover(credentials, datacenter, name_filter, vcenter))

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
                return retrieve_one(conn, vim.Task, task_id, TASK_PROPERTIES)

            info = await self._sessions.run(credentials, check, f"checking on {what}")
            if _task_ended(info, credentials, what):
                return
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                raise TimedOut(
                    f"{what} is still running on vCenter {credentials.where} "
                    f"(task {task_id}); it goes on there"
                )
            await self._sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def _window(self, timeout: float) -> Window:
        return Window(self._clock.seconds(), min(timeout, self._answer_within))

    async def _within(
        self,
        window: Window,
        credentials: Credentials,
        work: Callable[[Connection], T],
        what: str,
    ) -> T:
        """``work`` on the pool, given up with :class:`TimedOut` when ``window`` ends.

        The whole call is bounded, waiting for a login included: the call
        is cancelled then (a thread cannot be stopped; the pool deals with
        what it yields late).
        """
        remaining = window.end - self._clock.seconds()
        if remaining > 0:
            call = self._sessions.run(credentials, work, what)
            timer = self._clock.callLater(remaining, call.cancel)
            try:
                return await call
            except CancelledError:
                pass
            finally:
                if timer.active():
                    timer.cancel()
        raise TimedOut(
            f"vCenter {credentials.where} did not finish {what} within {window.seconds:g} s"
        )

    async def _wait_power(
        self,
        window: Window,
        credentials: Credentials,
        ident: str,
        what: str,
        props: Properties,
        done: Callable[[Properties], bool],
        task: Optional[str] = None,
        first_look: float = 0.0,
    ) -> tuple[Properties, bool]:
        """Look at the VM until ``done`` holds or ``task`` has ended.

        Returns the VM's properties as last read (``props`` before the first
        look) and whether the wait ended so.  A look starts only before
        ``window`` ends and is cut off at its end: the answer is due then.
        A task that failed raises its error.
        """

        def look(conn: Connection) -> tuple[Properties, Optional[Properties]]:
            return self.look_power(conn, ident, task)

        delay = first_look
        while self._clock.seconds() + delay < window.end:
            if delay > 0:
                await self._sleep(delay)
            try:
                props, info = await self._within(window, credentials, look, what)
            except TimedOut:
                break
            if info is not None and _task_ended(info, credentials, what):
                return props, True
            if done(props):
                return props, True
            if task is None:
                delay = self._poll_interval
            else:
                delay = min(max(delay * 2, TASK_FIRST_LOOK), self._poll_interval)
        return props, False

    def _going_on(
        self, vm_id: str, operation: str, window: Window, props: Properties, what: str
    ) -> str:
        """The message (and log line) of an operation still under way when the answer is due."""
        waited = round(self._clock.seconds() - window.start)
        state = _power_state(props)
        log.info(
            "{operation} of {vm_id}: {what} after {waited} s; answering with the VM {state}",
            operation=operation,
            vm_id=vm_id,
            what=what,
            waited=waited,
            state=state,
        )
        return (
            f"{what} after {waited} s (the VM is {state}); it goes on: "
            f"poll GET /api/v1/vm/{vm_id}/power-state"
        )

    async def _find_by_id(self, credentials: Credentials, vm_id: str) -> tuple[str, Properties]:
        def find(conn: Connection) -> tuple[str, Properties]:
            return self.find_power(conn, vm_id)

        return await self._sessions.run(credentials, find, f"finding VM {vm_id}")

    # -- operations -----------------------------------------------------------------

    async def _discover(
        self,
        credentials: Credentials,
        datacenter: Optional[str],
        name_filter: Optional[str],
        vcenter: Optional[str],
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
            "vcenter": {
                "host": credentials.where if vcenter is None else vcenter,
                "datacenter": shown,
            },
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
        """Shut the VM down and wait until it is off, within ``timeout`` and ``answer_within``.

        Without ``force`` and with VMware Tools running, the guest is asked
        to shut down and its power state is polled until it is off; with
        ``force``, or without Tools (the guest cannot be asked), the VM is
        powered off and the task waited for, as the Go SNA did.  When the
        answer is due first, it is ``success`` true with the VM's state and
        a message saying the shutdown goes on: the SHA then polls
        ``power-state`` until the VM is off.  Nothing harder is ever tried
        than was asked.
        """
        window = self._window(timeout)

        def find(conn: Connection) -> tuple[str, Properties]:
            return self.find_power(conn, vm_id)

        ident, before = await self._within(window, credentials, find, f"finding VM {vm_id}")
        previous = _power_state(before)
        if previous == "poweredOff":
            message = "VM is already powered off"
            return self._power_answer(
                vm_id, "power-off", previous, before, window, "already-off", True, message
            )
        method = "hard"
        task: Optional[str] = None
        if not force and previous == "poweredOn" and _tools_running(before):

            def shutdown(conn: Connection) -> None:
                self.shutdown_guest(conn, ident)

            try:
                await self._within(
                    window, credentials, shutdown, f"shutting down the guest of {vm_id}"
                )
                method = "graceful"
            except Conflict as e:
                # Tools stopped between our look and the request: power off instead.
                log.info(
                    "guest shutdown of {vm_id} refused ({error}); powering off",
                    vm_id=vm_id,
                    error=e.message,
                )
        if method == "hard":

            def power_off(conn: Connection) -> str:
                return self.start_power_off(conn, ident)

            try:
                task = await self._within(window, credentials, power_off, f"powering off {vm_id}")
            except Conflict:
                # Refused in the VM's state: if it went off on its own meanwhile, that is
                # what was asked; otherwise the refusal is the answer.
                def look(conn: Connection) -> tuple[Properties, Optional[Properties]]:
                    return self.look_power(conn, ident, None)

                after, _ = await self._within(window, credentials, look, f"powering off {vm_id}")
                if not _is_off(after):
                    raise
                return self._power_answer(
                    vm_id, "power-off", previous, after, window, method, True, POWERED_OFF
                )
        after, ended = await self._wait_power(
            window, credentials, ident, f"powering off {vm_id}", before, _is_off, task
        )
        new_state = _power_state(after)
        success = True
        if new_state == "poweredOff":
            message = POWERED_OFF
        elif not ended:
            what = (
                "the guest is still shutting down"
                if task is None
                else f"the power-off task {task} is still running in vCenter"
            )
            message = self._going_on(vm_id, "power-off", window, after, what)
        else:
            # The task ended, yet the VM is on again (someone powered it on).
            success = False
            message = f"the power-off task ended but the VM is {new_state}"
        return self._power_answer(
            vm_id, "power-off", previous, after, window, method, success, message
        )

    async def _power_on(
        self, credentials: Credentials, vm_id: str, wait_for_tools: bool, timeout: float
    ) -> dict[str, Any]:
        """Power the VM on; with ``wait_for_tools``, also wait for Tools.

        Bounded like :meth:`_power_off`: a power-on task still running when
        the answer is due is ``success`` true with the VM's state and a
        message (the SHA, which wants ``new_state`` ``poweredOn``, reports it
        then).  Tools that do not come up are said in ``message``, not as a
        failure: the VM is on.
        """
        window = self._window(timeout)

        def find(conn: Connection) -> tuple[str, Properties]:
            return self.find_power(conn, vm_id)

        ident, before = await self._within(window, credentials, find, f"finding VM {vm_id}")
        previous = _power_state(before)
        if previous == "poweredOn":
            return self._power_answer(
                vm_id, "power-on", previous, before, window, None, True, "VM already powered on"
            )

        def power_on(conn: Connection) -> str:
            return self.start_power_on(conn, ident)

        what = f"powering on {vm_id}"
        task = await self._within(window, credentials, power_on, what)
        after, ended = await self._wait_power(
            window, credentials, ident, what, before, _is_on, task
        )
        if not ended:
            message = self._going_on(
                vm_id,
                "power-on",
                window,
                after,
                f"the power-on task {task} is still running in vCenter",
            )
            return self._power_answer(
                vm_id, "power-on", previous, after, window, None, True, message
            )
        message = "VM power-on completed successfully"
        if wait_for_tools and _is_on(after) and not _tools_running(after):
            after, ready = await self._wait_power(
                window,
                credentials,
                ident,
                f"waiting for the VMware Tools of {vm_id}",
                after,
                _tools_running,
                first_look=self._poll_interval,
            )
            if not ready:
                waited = round(self._clock.seconds() - window.start)
                message = f"VM powered on; VMware Tools not running after {waited} s"
        if not _is_on(after):
            # The task ended, yet the VM is not on (someone powered it off again).
            message = f"the power-on task ended but the VM is {_power_state(after)}"
        return self._power_answer(
            vm_id, "power-on", previous, after, window, None, _is_on(after), message
        )

    def _power_answer(
        self,
        vm_id: str,
        operation: str,
        previous: str,
        after: Properties,
        window: Window,
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
        answer["duration_seconds"] = round(self._clock.seconds() - window.start)
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
                    "removing snapshot {name} of {vm_path} failed after removing {removed_text}: "
                    "{error}",
                    name=name,
                    vm_path=vm_path,
                    removed=removed,
                    removed_text=", ".join(removed) or "none",
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
