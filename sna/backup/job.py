"""One backup run, start to finish: vCenter, the snapshot, every disk, the cleanup, the events.

:class:`BackupJob` is the only place that sequences things:

1. log in, find the VM, remove a leftover snapshot of *this* job (exact name),
   check CBT (enable it only on a VM without snapshots);
2. take the snapshot ``sbak-{job_id}``, list its disks, map each disk to
   exactly one target, by its device key or by the SHA's position
   (:mod:`sna.contract.disks`; anything else fails the run before any byte
   moves), connect every target and open every reader (sizes and the ``206``
   probe checked, still before any byte moves);
3. plan every disk before copying any: full or incremental and why, and the
   areas from ``QueryChangedDiskAreas`` (``"*"`` for a full), reported in a
   ``disk_plan`` event each, so the bytes of the whole job are known from
   the start;
4. per disk, copy the areas (:mod:`sna.backup.copier`, which ends with
   ``FLUSH``), and only then send ``disk_done`` with the snapshot's change ID;
5. always: close or abort the connections, remove the snapshot (also after a
   failure or a signal, retrying with backoff for ``--cleanup-timeout``, then
   leaving it to sna's janitor with a ``snapshot`` event saying so), log out;
   ``done`` only when all of it succeeded.

Blocking pyVmomi calls run on the job's worker threads, one at a time, and
each has a deadline (``--vcenter-timeout``): a call that overstays it is
abandoned to its thread and fails the step.  vCenter tasks are looked at
again and again, each look such a call, for at most ``--stall-timeout``.
Cancellation (SIGTERM/SIGINT, or a copy stalled for ``--stall-timeout``) is
cooperative: I/O is aborted, the current vCenter call is allowed to finish,
and the cleanup runs as after any failure.

A watchdog looks once a second at what the run waits on (a vCenter call or
task, a read of the source, a write to the hub) and reports a ``stall`` after
:data:`STALL_NOTICE` seconds without progress, and ``resume`` once it moves.

This module does not parse argv, configure logging or touch the reactor's
lifetime (that is :mod:`sna.backup.cli`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any, Optional, TypeVar

import attrs
from pyVmomi import vmodl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.backup import tls
from sna.backup.changeid import ChangeId, InvalidChangeId, parse_change_id, try_parse
from sna.backup.copier import CopyError, DiskCopy, DiskStats
from sna.backup.events import EventWriter
from sna.backup.extents import Area, ChangedAreaPager, PagingError, plan, total
from sna.backup.nbdkit import NbdkitError, VddkServers
from sna.backup.options import PASSWORD_ENV, JobOptions, NbdAddress
from sna.backup.reactor import ClientReactor
from sna.backup.readers import (
    FolderReader,
    IDiskReader,
    NbdReader,
    ReaderError,
    connect_address,
)
from sna.backup.vsphere import Session, SnapshotDisk, moref
from sna.contract import events as contract
from sna.contract.disks import map_disks, sha_keys
from sna.contract.targets import NbdTarget
from sna.contract.tls import ssl_context
from sna.contract.vcenter import TimedOut, VSphereError, fault_text
from sna.nbd.client import NBDClient
from sna.nbd.errors import NBDError

log = Logger()

T = TypeVar("T")

#: How often progress is reported per disk (the contract asks for at least once a second).
PROGRESS_INTERVAL = 1.0
#: How often the vCenter session is used while disks copy (idle sessions expire).
KEEPALIVE_INTERVAL = 300.0
#: How long a polite NBD disconnect may take before the connection is dropped.
CLOSE_TIMEOUT = 10.0
#: Seconds without progress before a ``stall`` is reported (half the stall
#: timeout when that is shorter), so sna shows it well within 30 s.
STALL_NOTICE = 15.0
#: The first pause between two looks at a vCenter task, then doubled up to the last.
TASK_LOOK_DELAYS = (0.1, 2.0)
#: The first pause between two attempts at removing the snapshot, then doubled up to the last.
REMOVAL_RETRY_DELAYS = (1.0, 15.0)
#: The longest a logout may take: it is a courtesy (the session times out anyway).
LOGOUT_TIMEOUT = 10.0


@attrs.frozen
class Waiting:
    """What the run waits for besides a disk's copy, since when (clock seconds).

    ``on`` is what a stall would be on: ``vcenter`` for its calls and tasks,
    ``source_read`` while the disks' readers open, ``hub_write`` while the
    targets connect.
    """

    on: str
    what: str
    since: float


@attrs.frozen
class StallSeen:
    """A stall the watchdog found: on what, since when, and what to tell."""

    on: str
    since: float
    message: str
    disk_key: Optional[str] = None


class JobError(Exception):
    """The run cannot go on; the message is the ``error`` event's."""

    def __init__(self, message: str, disk_key: Optional[str] = None) -> None:
        super().__init__(message)
        self.disk_key = disk_key


class Cancelled(Exception):
    pass


@attrs.frozen
class Decision:
    sync_type: str  # "full" or "incremental"
    reason: str
    base: Optional[ChangeId] = None


@attrs.frozen
class CopyPlan:
    """What one disk's copy will do: its decision and the areas it reads."""

    decision: Decision
    areas: list[Area]


@attrs.define
class DiskRun:
    """What the job knows about one disk during the run."""

    disk: SnapshotDisk
    target: NbdTarget
    change_id: ChangeId
    client: Optional[NBDClient] = None
    reader: Optional[IDiskReader] = None
    copy_plan: Optional[CopyPlan] = None
    stats: Optional[DiskStats] = None
    started: float = 0.0
    done: bool = False

    @property
    def key(self) -> str:
        """The disk's key in events: its target's key in ``--nbd-targets``."""
        return self.target.disk_key

    @property
    def name(self) -> str:
        """The disk in messages: its device key, and its target's key when that differs."""
        if self.target.disk_key == self.disk.key:
            return f"disk {self.disk.key}"
        return f"disk {self.disk.key} (target {self.target.disk_key})"


def decide(
    disk: SnapshotDisk,
    current: ChangeId,
    backup_type: Optional[str],
    previous: Optional[str],
    previous_capacity: Optional[int] = None,
) -> Decision:
    """Full or incremental for one disk, and why (pure; the reasons reach the operator).

    ``previous_capacity`` is the disk's capacity when ``previous`` was taken,
    as sna recorded it.  Whether the disk was resized is decided from that
    and from vSphere (a new tracking instance), never from the target's
    size: the SHA rounds its targets up to whole GiB.
    """
    if backup_type == "full":
        return Decision("full", "backup_type full requested")
    if not previous:
        return Decision("full", "no previous change ID for this disk")
    try:
        base = parse_change_id(previous)
    except InvalidChangeId as e:
        return Decision("full", f"the previous change ID is not usable: {e}")
    if not base.same_instance(current):
        return Decision(
            "full",
            f"the previous change ID is of another CBT tracking instance "
            f"({base.uuid_text!r}; the disk's is {current.uuid_text!r}): "
            "CBT was reset, or the ID is another disk's",
        )
    if base.sequence > current.sequence:
        return Decision(
            "full",
            f"the previous change ID {base.text!r} is newer than the snapshot's {current.text!r}",
        )
    if previous_capacity is not None and previous_capacity != disk.capacity:
        return Decision(
            "full",
            f"the disk was resized since the previous change ID "
            f"({previous_capacity} bytes then, {disk.capacity} now)",
        )
    return Decision("incremental", f"changes since {base.text}", base)


def map_targets(disks: list[SnapshotDisk], targets: tuple[NbdTarget, ...]) -> dict[str, NbdTarget]:
    """Disk key -> target; anything unmatched on either side is a :class:`JobError`.

    Targets keyed by the VM's device keys map exactly; targets keyed the
    SHA's way (``2000+i``, its disk ``i`` in text order of ``disk-{key}``)
    map by that position (:func:`sna.contract.disks.map_disks`).
    """
    if len(targets) == 1 and targets[0].disk_key == "":
        # The Go client's single-disk mode (no --nbd-targets).
        if len(disks) != 1:
            raise JobError(
                f"no --nbd-targets given and the VM has {len(disks)} disks "
                f"({', '.join(d.key for d in disks)}): map each disk key to a target"
            )
        return {disks[0].key: attrs.evolve(targets[0], disk_key=disks[0].key)}
    by_key = {t.disk_key: t for t in targets}
    disk_keys = [d.key for d in disks]
    mapping = map_disks(disk_keys, [t.disk_key for t in targets])
    if mapping is not None:
        return {key: by_key[mapping.target_of(key)] for key in disk_keys}
    unmapped = [d for d in disks if d.key not in by_key]
    unknown = [t.disk_key for t in targets if t.disk_key not in disk_keys]
    problems = []
    if unmapped:
        problems.append(
            "disks without a target in --nbd-targets: "
            + ", ".join(f"{d.key} ({d.label}, {d.file_name})" for d in unmapped)
        )
    if unknown:
        problems.append(
            "--nbd-targets names disk keys the VM does not have: "
            + ", ".join(unknown)
            + f" (the VM's disks: {', '.join(disk_keys) or 'none'})"
        )
    positional = ", ".join(sha_keys(len(disks)))
    raise JobError(
        "; ".join(problems)
        + f"; targets must be keyed by the VM's device keys or, the SHA's way, {positional}"
        + "; nothing was copied"
    )


class BackupJob:
    """One run.  :meth:`run` returns the exit status; :meth:`cancel` may come at any time."""

    def __init__(self, reactor: ClientReactor, options: JobOptions, events: EventWriter) -> None:
        self._reactor = reactor
        self._clock = reactor.clock
        self._options = options
        self._events = events
        self._pool = reactor.pool
        #: Calls on the worker threads, abandoned ones included (the pool stops only at 0).
        self._calls_in_flight = 0
        #: The vCenter call or task the run waits for now, if any.
        self._waiting: Optional[Waiting] = None
        #: The stall last reported, until a ``resume``.
        self._stall: Optional[StallSeen] = None
        #: The disk copy under way, whose reads and writes a stall may be on.
        self._copying: Optional[DiskCopy] = None
        #: The cancellation came from the watchdog: the run failed, nobody cancelled it.
        self._stalled_out = False
        #: A signal came during the cleanup: the current removal attempt is the last.
        self._hurry = False
        self._session: Optional[Session] = None
        self._vm: Any = None
        self._snapshot: Any = None
        self._snapshot_requested = False
        self._vddk: Optional[VddkServers] = None
        self._disks: list[DiskRun] = []
        self._current: Optional[DiskRun] = None
        self._cancel_reason: Optional[str] = None
        self._cancel_status = 1
        self._finishing = False
        self._progress = LoopingCall(self._tick)
        self._progress.clock = reactor.clock
        self._keepalive = LoopingCall(self._keep_session)
        self._keepalive.clock = reactor.clock
        self._last_tick: tuple[float, int] = (0.0, 0)
        self._last_change = 0.0
        self._summary = {"bytes_read": 0, "bytes_written": 0, "bytes_zero": 0}

    # -- public -----------------------------------------------------------------------------

    def cancel(self, reason: str, status: int = 1, *, stalled: bool = False) -> None:
        """Stop the run: abort I/O now; the cleanup (snapshot removal) still runs.

        ``stalled``: the watchdog's doing; the error is ``reason`` itself, not a cancellation.
        """
        if self._cancel_reason is not None:
            if self._finishing:
                self._hurry = True
            log.info(
                "already stopping ({reason}); ignoring: {new}",
                reason=self._cancel_reason,
                new=reason,
            )
            return
        self._cancel_reason = reason
        self._cancel_status = status
        self._stalled_out = stalled
        if self._finishing:
            self._hurry = True
            log.warn("{reason} during the cleanup: finishing the cleanup first", reason=reason)
            return
        log.warn("stopping: {reason}", reason=reason)
        for run in self._disks:
            if run.client is not None:
                run.client.abort()
            if run.reader is not None:
                run.reader.abort()

    async def run(self) -> int:
        self._pool.start()
        self._progress.start(PROGRESS_INTERVAL, now=False)
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False)
        status = 0
        try:
            await self._backup()
        except Exception as e:
            status = self._report_failure(e)
        finally:
            if self._keepalive.running:
                self._keepalive.stop()
            self._current = self._copying = None
        self._finishing = True
        try:
            cleaned = await self._cleanup(success=status == 0, failed=status != 0)
        finally:
            # The watchdog also sees the cleanup (a removal that hangs is a stall).
            if self._progress.running:
                self._progress.stop()
            self._stall_over("the run is over")
        if status == 0 and self._cancel_reason is not None:
            # A signal after the last disk_done: the data is safe, but the run was asked to stop.
            self._events.error(f"cancelled: {self._cancel_reason}")
            status = self._cancel_status
        if status == 0 and not cleaned:
            status = 1
        if status == 0:
            count = len(self._disks)
            self._events.done(
                f"{count} disk{'s' if count != 1 else ''} backed up",
                disks=count,
                **self._summary,
            )
        if self._calls_in_flight == 0:
            self._pool.stop()
        return status

    # -- the run -----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._cancel_reason is not None:
            raise Cancelled(self._cancel_reason)

    @property
    def _call_timeout(self) -> float:
        options = self._options
        return min(options.vcenter_timeout, options.stall_timeout)

    async def _call(
        self, what: str, f: Callable[..., T], *args: Any, timeout: Optional[float] = None
    ) -> T:
        """A blocking vCenter call on a worker thread, given up after its deadline.

        ``what`` names it in a stall and in the :class:`TimedOut` error.
        Calls come one at a time; one given up stays on its thread (a daemon
        thread) until its socket times out, and what it yields then is dropped.
        """
        outer = self._waiting
        if outer is None:
            self._waiting = Waiting("vcenter", what, self._clock.seconds())
        limit = self._call_timeout if timeout is None else timeout
        try:
            return await self._in_thread(f, *args).addTimeout(limit, self._clock)
        except DeferTimeoutError:
            raise TimedOut(
                f"vCenter {self._options.endpoint} did not answer within {limit:g} s ({what})"
            ) from None
        finally:
            if outer is None:
                self._waiting = None

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """``f(*args)`` on the pool; its result is dropped if the Deferred was cancelled."""
        d: Deferred[T] = Deferred()
        self._calls_in_flight += 1

        def finished(success: bool, result: Any) -> None:
            self._calls_in_flight -= 1
            if d.called:
                log.info("a vCenter call given up earlier has ended")
                return
            if success:
                d.callback(result)
            else:
                d.errback(result)

        def from_thread(success: bool, result: Any) -> None:
            self._reactor.threads.callFromThread(finished, success, result)

        self._pool.callInThreadWithCallback(from_thread, f, *args)
        return d

    async def _waiting_for(self, what: str, work: Coroutine[Any, Any, T], on: str = "vcenter") -> T:
        """``work`` (several calls, pauses) seen by the watchdog as one wait on ``on``."""
        outer = self._waiting
        if outer is None:
            self._waiting = Waiting(on, what, self._clock.seconds())
        try:
            return await work
        finally:
            if outer is None:
                self._waiting = None

    async def _task(
        self, session: Session, what: str, start: Callable[..., Any], *args: Any
    ) -> Any:
        """Start a vCenter task, then look at it until it ends (its result) or
        ``--stall-timeout`` has passed (:class:`TimedOut`; it goes on in vCenter)."""
        return await self._waiting_for(
            what, self._run_task(session, what, start, args, self._options.stall_timeout)
        )

    async def _run_task(
        self,
        session: Session,
        what: str,
        start: Callable[..., Any],
        args: tuple[Any, ...],
        limit: float,
    ) -> Any:
        deadline = self._clock.seconds() + limit
        task = await self._call(what, start, *args)
        delay, longest = TASK_LOOK_DELAYS
        while True:
            look = await self._call(what, session.look_at_task, task, what)
            if look.ended:
                return look.result
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                raise TimedOut(
                    f"{what}: vCenter {self._options.endpoint}'s task has not ended after "
                    f"{limit:g} s (it goes on in vCenter)"
                )
            await _sleep(self._clock, min(delay, remaining))
            delay = min(delay * 2, longest)

    async def _backup(self) -> None:
        options = self._options
        self._events.phase("prepare", f"Connecting to vCenter {options.endpoint}")
        log.info(
            "job {job}: VM {vm} on vCenter {endpoint} as {user}, {tls}",
            job=options.job_id,
            vm=options.vm_path,
            endpoint=options.endpoint,
            user=options.user,
            tls=options.tls.describe(),
        )
        session = self._session = await self._login()
        log.info("logged in to {where} ({about})", where=session.where, about=session.about)
        self._check()
        vm = self._vm = await self._call(
            f"finding VM {options.vm_path!r}", session.find_vm, options.vm_path
        )
        name = options.snapshot_name
        for leftover in await self._call(
            f"listing the snapshots of VM {options.vm_path!r}", session.snapshots_named, vm, name
        ):
            # Only this job's own name: other jobs' snapshots are never touched.
            log.warn("removing leftover snapshot {name} of an earlier attempt", name=name)
            await self._task(
                session,
                f"removing leftover snapshot {name}",
                session.start_remove_snapshot,
                leftover,
            )
        await self._ensure_cbt(session, vm)
        self._check()

        self._events.phase("snapshot", f"Creating snapshot {name}")
        self._snapshot_requested = True
        self._snapshot = await self._task(
            session,
            f"creating snapshot {name} of VM {options.vm_path!r}",
            session.start_create_snapshot,
            vm,
            name,
            f"Sendense backup {options.job_id} (removed when the backup ends)",
            options.quiesce,
        )
        if self._snapshot is None:
            raise VSphereError(f"creating snapshot {name!r} returned no snapshot")
        log.info("snapshot {name} created", name=name)
        self._events.snapshot(name, contract.SNAPSHOT_CREATED)
        self._check()
        disks = await self._call(
            f"reading the disks of snapshot {name}", session.snapshot_disks, self._snapshot
        )
        mapping = map_targets(disks, options.targets)
        for disk in disks:
            target = mapping[disk.key]
            if target.disk_key != disk.key:
                log.info(
                    "disk {key} ({label}) goes to target {target} ({address}): the targets are "
                    "keyed the SHA's way, 2000 + the disk's position in text order of disk-<key>",
                    key=disk.key,
                    label=disk.label,
                    target=target.disk_key,
                    address=target.describe(),
                )
            change_id = try_parse(disk.change_id)
            if change_id is None:
                raise JobError(
                    f"disk {disk.key} ({disk.label}) has no valid change ID in the snapshot "
                    f"({disk.change_id!r}): CBT is not active on it; nothing was copied",
                    target.disk_key,
                )
            self._disks.append(DiskRun(disk, target, change_id))
        await self._waiting_for(
            "connecting to the targets", self._connect_targets(), on="hub_write"
        )
        await self._open_readers(session)
        await self._plan()

        count = len(self._disks)
        self._events.phase("transfer", f"Copying {count} disk{'s' if count != 1 else ''}")
        for run in self._disks:
            self._check()
            await self._copy(run)

    async def _plan(self) -> None:
        """Decide and find the areas of every disk, then report them all, before any copy."""
        options = self._options
        for run in self._disks:
            self._check()
            decision = decide(
                run.disk,
                run.change_id,
                options.backup_type,
                options.previous_for(run.key),
                options.previous_capacities.get(run.key),
            )
            run.copy_plan = await self._areas_for(run, decision)
        self._check()
        for run in self._disks:
            assert run.copy_plan is not None
            decision, areas = run.copy_plan.decision, run.copy_plan.areas
            self._events.disk_plan(
                run.key,
                decision.sync_type,
                decision.reason,
                total(areas),
                vmware_disk_key=run.disk.key,
                capacity_bytes=run.disk.capacity,
                areas=len(areas),
                base_change_id=decision.base.text if decision.base else None,
            )

    async def _areas_for(self, run: DiskRun, decision: Decision) -> CopyPlan:
        """The areas a disk's copy reads; a full when vCenter refuses the base."""
        disk = run.disk
        if decision.base is not None:
            try:
                return CopyPlan(decision, await self._areas(run, decision.base.text))
            except vmodl.MethodFault as e:
                decision = Decision(
                    "full", f"the previous change ID was rejected by vCenter: {fault_text(e)}"
                )
        try:
            return CopyPlan(decision, await self._areas(run, "*"))
        except vmodl.MethodFault as e:
            # Not VMFS, or CBT enabled while snapshots existed: no allocation map.
            log.warn(
                "{disk}: QueryChangedDiskAreas('*') failed ({fault}): copying the whole disk",
                disk=run.name,
                fault=fault_text(e),
            )
            return CopyPlan(
                attrs.evolve(
                    decision, reason=f"{decision.reason}; no allocation map, whole disk read"
                ),
                [Area(0, disk.capacity)],
            )

    async def _ensure_cbt(self, session: Session, vm: Any) -> None:
        where = f"VM {self._options.vm_path!r}"
        if await self._call(f"reading CBT of {where}", session.cbt_enabled, vm):
            return
        snapshots = await self._call(
            f"listing the snapshots of {where}", session.snapshot_names, vm
        )
        if snapshots:
            raise JobError(
                f"CBT is off on VM {self._options.vm_path!r} and the VM has snapshots "
                f"({', '.join(snapshots[:5])}): VMware supports enabling CBT only on a VM "
                "without snapshots; remove them (or enable CBT yourself), then retry"
            )
        log.info("enabling CBT on VM {vm} (it has no snapshots)", vm=self._options.vm_path)
        await self._task(session, f"enabling CBT on {where}", session.start_enable_cbt, vm)

    async def _each_disk(self, work: Callable[[DiskRun], Coroutine[Any, Any, None]]) -> None:
        """``work`` for every disk at once (a VM's disks open in the time of one);
        the error of the first failing disk, in disk order, is raised."""
        results = await DeferredList(
            [Deferred.fromCoroutine(work(run)) for run in self._disks], consumeErrors=True
        )
        for ok, value in results:
            if not ok and isinstance(value, Failure):
                value.raiseException()

    async def _connect_targets(self) -> None:
        await self._each_disk(self._connect_target)

    async def _connect_target(self, run: DiskRun) -> None:
        options = self._options
        target = run.target
        address = NbdAddress(export=target.export, host=target.host, port=target.port)
        where = f"{run.name}: target {address.describe()}"
        try:
            client = await connect_address(
                self._reactor, address, options.connect_timeout, options.max_in_flight_bytes
            )
        except (NBDError, OSError) as e:
            raise JobError(f"{where}: cannot connect: {e}", run.key) from None
        except Exception as e:
            raise JobError(f"{where}: cannot connect: {type(e).__name__}: {e}", run.key) from None
        run.client = client
        self._check()
        info = client.info
        if info.read_only:
            raise JobError(f"{where} is read-only", run.key)
        if not info.can_flush:
            raise JobError(
                f"{where} does not offer FLUSH, so the backup could not be made durable",
                run.key,
            )
        if info.size < run.disk.capacity:
            raise JobError(
                f"{where} has {info.size} bytes, less than the disk's {run.disk.capacity}; "
                "nothing was copied",
                run.key,
            )

    async def _vddk_servers(self) -> VddkServers:
        options = self._options
        assert options.vddk_libdir is not None
        try:
            thumbprint = await self._call(
                "reading vCenter's certificate",
                tls.server_thumbprint,
                options.host,
                options.port,
                options.tls,
                options.connect_timeout,
            )
        except OSError as e:
            raise JobError(f"cannot get vCenter's certificate thumbprint for VDDK: {e}") from None
        environ = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
        self._vddk = VddkServers(
            self._reactor,
            nbdkit=options.nbdkit,
            libdir=options.vddk_libdir,
            server=options.host,
            port=options.port,
            user=options.user,
            password=options.password,
            thumbprint=thumbprint,
            vm_moref=moref(self._vm),
            snapshot_moref=moref(self._snapshot),
            transports=options.vddk_transports,
            compression=options.compression,
            environ=environ,
        )
        return self._vddk

    async def _open_readers(self, session: Session) -> None:
        options = self._options
        if options.reader == "folder":
            cookie = await self._call("reading the session cookie", session.session_cookie)
            datacenter = await self._call(
                "finding the VM's datacenter", session.datacenter_path, self._vm
            )
            context = ssl_context(options.tls)

            def folder_reader(run: DiskRun) -> IDiskReader:
                return FolderReader(
                    self._reactor,
                    host=options.host,
                    port=options.port,
                    datacenter=datacenter,
                    disk=run.disk,
                    cookie=cookie,
                    context=context,
                    connections=options.reads_in_flight,
                    io_timeout=options.io_timeout,
                )

            # Each reader's TLS handshake and probe read, for every disk at once.
            await self._waiting_for(
                "opening the disks' sources",
                self._each_disk(lambda run: self._open_reader(run, folder_reader(run))),
                on="source_read",
            )
            return
        servers = await self._vddk_servers() if options.reader == "vddk" else None
        for run in self._disks:
            address: Optional[NbdAddress]
            if servers is not None:
                try:
                    address = await servers.start(run.disk)
                except NbdkitError as e:
                    raise JobError(str(e), run.key) from None
            else:
                address = options.reader_nbd.get(run.disk.key)
            if address is None:
                raise JobError(
                    f"disk {run.disk.key}: --reader nbd and no --reader-nbd-url for it",
                    run.key,
                )
            reader = NbdReader(self._reactor, address, run.disk, options.connect_timeout)
            await self._waiting_for(
                f"opening the source of {run.name}",
                self._open_reader(run, reader),
                on="source_read",
            )

    async def _open_reader(self, run: DiskRun, reader: IDiskReader) -> None:
        run.reader = reader
        try:
            await reader.open()
        except ReaderError as e:
            raise JobError(str(e), run.key) from None
        self._check()

    async def _areas(self, run: DiskRun, change_id: str) -> list[Area]:
        session, vm, snapshot = self._session, self._vm, self._snapshot
        assert session is not None
        key = run.disk.key
        pager = ChangedAreaPager(run.disk.capacity)
        # One call per page, each with its deadline.
        while (start := pager.next_start) is not None:
            window = await self._call(
                f"QueryChangedDiskAreas of {run.name} from offset {start}",
                session.changed_window,
                vm,
                snapshot,
                key,
                start,
                change_id,
            )
            pager.add(window)
        return pager.areas()

    async def _copy(self, run: DiskRun) -> None:
        options = self._options
        disk = run.disk
        assert run.client is not None and run.reader is not None and run.copy_plan is not None
        decision, areas = run.copy_plan.decision, run.copy_plan.areas
        self._check()
        target_zero = options.targets_zero()
        zero_gaps = decision.sync_type == "full" and not target_zero
        chunk = min(options.chunk_size, run.client.info.max_payload, run.reader.max_request)
        zeroes = run.client.info.can_write_zeroes
        ops = plan(
            areas,
            disk.capacity,
            chunk=chunk,
            zero_gaps=zero_gaps,
            zero_chunk=(1 << 30) if zeroes else chunk,
        )
        stats = DiskStats(bytes_total=total(areas))
        if decision.sync_type == "full" and not zero_gaps:
            stats.bytes_skipped = disk.capacity - stats.bytes_total
        target_name = f"target {run.target.describe()}"
        log.info(
            "{disk} ({label}, {capacity} bytes): {sync} ({reason}); {areas} areas, "
            "{total} bytes from {source} to {target}",
            disk=run.name,
            label=disk.label,
            capacity=disk.capacity,
            sync=decision.sync_type,
            reason=decision.reason,
            areas=len(areas),
            total=stats.bytes_total,
            source=run.reader.description,
            target=target_name,
        )
        self._events.disk_start(
            run.key,
            decision.sync_type,
            decision.reason,
            stats.bytes_total,
            vmware_disk_key=disk.key,
            capacity_bytes=disk.capacity,
            areas=len(areas),
            reader=options.reader,
            base_change_id=decision.base.text if decision.base else None,
            zero_gaps=zero_gaps,
        )
        run.stats = stats
        run.started = self._clock.seconds()
        self._current = run
        self._last_tick = (run.started, 0)
        self._last_change = run.started
        self._events.progress(run.key, 0, stats.bytes_total, 0.0)
        copy = self._copying = DiskCopy(
            run.key,
            run.reader,
            run.client,
            target_name,
            ops,
            stats,
            workers=options.reads_in_flight,
            stopped=lambda: self._cancel_reason,
            name=run.name,
        )
        await copy.run()
        # Flushed: the bytes the change ID describes are durable on the target.
        elapsed = max(self._clock.seconds() - run.started, 1e-6)
        self._current = self._copying = None
        run.done = True
        self._events.progress(
            run.key, stats.bytes_done, stats.bytes_total, stats.bytes_done / elapsed
        )
        self._events.disk_done(
            run.key,
            run.change_id.text,
            bytes_done=stats.bytes_done,
            bytes_total=stats.bytes_total,
            sync_type=decision.sync_type,
            bytes_read=stats.bytes_read,
            bytes_written=stats.bytes_written,
            bytes_zero=stats.bytes_zero,
            bytes_zero_filled=stats.bytes_zero_filled,
            bytes_skipped=stats.bytes_skipped,
            duration_seconds=round(elapsed, 3),
            throughput_bps=round(stats.bytes_done / elapsed, 1),
        )
        for key in self._summary:
            self._summary[key] += getattr(stats, key)
        log.info(
            "{disk} done in {seconds:.1f}s: {read} bytes read, {written} written, "
            "{zero} as zeroes, change ID {change_id}",
            disk=run.name,
            seconds=elapsed,
            read=stats.bytes_read,
            written=stats.bytes_written,
            zero=stats.bytes_zero,
            change_id=run.change_id.text,
        )

    # -- progress and the stall watchdog ---------------------------------------------------

    def _tick(self) -> None:
        now = self._clock.seconds()
        run = self._current
        if run is not None and run.stats is not None:
            done = run.stats.bytes_done
            then, before = self._last_tick
            rate = (done - before) / (now - then) if now > then else 0.0
            self._last_tick = (now, done)
            self._events.progress(run.key, done, run.stats.bytes_total, max(rate, 0.0))
            if done != before:
                self._last_change = now
        self._watch(now)

    @property
    def _stall_notice(self) -> float:
        return min(STALL_NOTICE, self._options.stall_timeout / 2)

    def _stalled_on(self, now: float) -> Optional[StallSeen]:
        """What the run waits on now, and since when; ``None`` while it moves."""
        waiting = self._waiting
        if waiting is not None:
            where = f"vCenter {self._options.endpoint}: " if waiting.on == "vcenter" else ""
            return StallSeen(
                waiting.on,
                waiting.since,
                f"{where}{waiting.what}, no end after {now - waiting.since:.0f} s",
            )
        run, copy = self._current, self._copying
        if run is None or copy is None:
            return None
        on = copy.waiting_on() or "source_read"
        if on == "hub_write":
            where = f"no write acknowledged by target {run.target.describe()}"
        else:
            source = run.reader.description if run.reader is not None else "the source"
            where = f"no bytes from {source}"
        return StallSeen(
            on,
            self._last_change,
            f"{run.name}: {where} for {now - self._last_change:.0f} s",
            run.key,
        )

    def _watch(self, now: float) -> None:
        """Report a stall once it has lasted :attr:`_stall_notice`, its end once it ends;
        end a copy that has stalled for ``--stall-timeout``."""
        seen = self._stalled_on(now)
        if seen is not None and now - seen.since < self._stall_notice:
            seen = None
        reported = self._stall
        if reported is not None and (
            seen is None
            or (seen.on, seen.since, seen.disk_key)
            != (reported.on, reported.since, reported.disk_key)
        ):
            self._stall_over(f"the wait is over after {now - reported.since:.0f} s")
        if seen is not None and self._stall is None:
            self._stall = seen
            log.warn("stalled: {message}", message=seen.message)
            self._events.stall(seen.on, now - seen.since, seen.message, seen.disk_key)
        if (
            seen is not None
            and self._copying is not None
            and self._waiting is None
            and now - seen.since > self._options.stall_timeout
            and self._cancel_reason is None
        ):
            run = self._current
            target = run.target.describe() if run is not None else "?"
            source = run.reader.description if run is not None and run.reader else "?"
            what = "the target's write acknowledgements" if seen.on == "hub_write" else "the source"
            self.cancel(
                f"{run.name if run else 'the copy'}: no progress for "
                f"{self._options.stall_timeout:g} s, waiting on {what} "
                f"(source {source}, target {target}); --stall-timeout ends the run",
                stalled=True,
            )

    def _stall_over(self, message: str) -> None:
        if self._stall is None:
            return
        self._stall = None
        log.info("no longer stalled: {message}", message=message)
        self._events.resume(message)

    def _keep_session(self) -> None:
        # A copy can outlast vCenter's idle-session timeout; without a SOAP call
        # now and then the snapshot could not be removed at the end.
        session = self._session
        if session is None or self._calls_in_flight:
            return

        def failed(failure: Failure) -> None:
            log.warn("vCenter keepalive failed: {error}", error=failure.getErrorMessage())

        # Not a wait of the run's (the watchdog looks at the copy then), and short.
        keepalive = self._in_thread(session.keepalive).addTimeout(self._call_timeout, self._clock)
        keepalive.addErrback(failed)

    # -- failure and cleanup ---------------------------------------------------------------

    def _report_failure(self, error: Exception) -> int:
        disk_key = getattr(error, "disk_key", None)
        if self._cancel_reason is not None and self._stalled_out:
            message = self._cancel_reason
            if self._current is not None:
                disk_key = self._current.key
            log.error("backup failed: {message}", message=message)
            self._events.error(message, disk_key=disk_key)
            return self._cancel_status
        if self._cancel_reason is not None:
            if isinstance(error, Cancelled) or self._current is None:
                message = f"cancelled: {self._cancel_reason}"
            else:
                message = f"cancelled: {self._cancel_reason} (while copying {self._current.name})"
                disk_key = self._current.key
            self._events.error(message, disk_key=disk_key)
            return self._cancel_status
        if isinstance(error, (JobError, CopyError, VSphereError, ReaderError, PagingError)):
            message = str(error)
        elif isinstance(error, vmodl.MethodFault):
            message = f"vCenter: {fault_text(error)}"
        else:
            log.failure("unexpected error", None)
            message = f"internal error: {type(error).__name__}: {error}"
        log.error("backup failed: {message}", message=message)
        self._events.error(message, disk_key=disk_key)
        return 1

    async def _cleanup(self, success: bool, failed: bool) -> bool:
        """Close connections, remove the snapshot, log out; False if the snapshot may remain.

        ``failed``: the run has already reported why it failed, and that stays
        its error; a snapshot left behind is then told in a ``snapshot`` event only.
        """
        name = self._options.snapshot_name
        self._events.phase(
            "cleanup",
            f"Removing snapshot {name}" if self._snapshot_requested else "Closing connections",
        )
        for run in self._disks:
            for closer in (run.client, run.reader):
                if closer is None:
                    continue
                if success:
                    try:
                        await closer.close().addTimeout(CLOSE_TIMEOUT, self._clock)
                    except Exception as e:
                        log.warn("closing a connection failed: {error}", error=str(e))
                        closer.abort()
                else:
                    closer.abort()
        if self._vddk is not None:
            await self._vddk.stop()
        ok = True
        if self._snapshot_requested and self._session is not None:
            ok = await self._waiting_for(
                f"removing snapshot {name}", self._remove_snapshot(name, failed)
            )
        if self._session is not None:
            try:
                await self._call(
                    "logging out",
                    self._session.logout,
                    timeout=min(LOGOUT_TIMEOUT, self._call_timeout),
                )
            except TimedOut as e:
                log.warn("{error}; the session times out by itself", error=str(e))
        return ok

    async def _login(self) -> Session:
        options = self._options
        return await self._call(
            f"logging in as {options.user}",
            Session.login,
            options.host,
            options.port,
            options.user,
            options.password,
            ssl_context(options.tls),
            # A call given up leaves its thread soon after.
            min(options.io_timeout, self._call_timeout),
        )

    async def _remove_snapshot(self, name: str, failed: bool) -> bool:
        """Remove the snapshot, retrying with backoff for ``--cleanup-timeout``.

        Each attempt after the first logs in again (vCenter may have restarted,
        the session expired) and finds the snapshot by its name: none left is
        success.  Giving up sends ``snapshot`` ``remains`` (sna's janitor goes
        on), and an ``error`` only when nothing else failed the run.
        """
        options = self._options
        deadline = self._clock.seconds() + options.cleanup_timeout
        delay, longest = REMOVAL_RETRY_DELAYS
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._remove_once(name, attempt, deadline)
            except Exception as e:
                error = _describe(e)
                log.warn(
                    "removing snapshot {name} failed (attempt {attempt}): {error}",
                    name=name,
                    attempt=attempt,
                    error=error,
                )
            else:
                self._snapshot = None
                log.info("snapshot {name} removed", name=name)
                self._events.snapshot(name, contract.SNAPSHOT_REMOVED)
                return True
            remaining = deadline - self._clock.seconds()
            if remaining <= 0 or self._hurry:
                break
            await _sleep(self._clock, min(delay, remaining))
            delay = min(delay * 2, longest)
        message = (
            f"snapshot {name} of VM {options.vm_path!r} could not be removed "
            f"({attempt} attempt{'s' if attempt != 1 else ''}; last: {error}); "
            "it is left to sna's janitor, or remove it in vCenter"
        )
        log.error("{message}", message=message)
        self._events.snapshot(name, contract.SNAPSHOT_REMAINS, message)
        if not failed:
            self._events.error(message)
        return False

    async def _remove_once(self, name: str, attempt: int, deadline: float) -> None:
        session = self._session
        assert session is not None
        what = f"removing snapshot {name}"
        if attempt > 1:
            # The session may have expired (a long copy, vCenter restarted):
            # a new one finds the snapshot again by its name.
            session = self._session = await self._login()
            self._vm = await self._call(
                f"finding VM {self._options.vm_path!r}", session.find_vm, self._options.vm_path
            )
            self._snapshot = None
        if self._snapshot is not None:
            snapshots = [self._snapshot]
        else:
            snapshots = await self._call(
                f"looking for snapshot {name}", session.snapshots_named, self._vm, name
            )
        for snapshot in snapshots:
            limit = min(self._options.stall_timeout, deadline - self._clock.seconds())
            await self._run_task(session, what, session.start_remove_snapshot, (snapshot,), limit)


def _describe(error: Exception) -> str:
    if isinstance(error, vmodl.MethodFault):
        return f"vCenter: {fault_text(error)}"
    if isinstance(error, (VSphereError, JobError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    return deferLater(clock, seconds, lambda: None)
