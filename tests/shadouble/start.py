"""``POST /_double/backups``: what the SHA's ``POST /api/v1/backups`` does, in its order.

sha-contract.md §1.1 and §1.2, step by step: the VM's disks in string
order of ``disk_id``, the job id ``backup-{vm}-{unix}``, the parent row, then
per disk the incremental pre-check, the qcow2 (an empty image of whole GiB,
or an overlay on the chain's latest file), the per-disk and ``backup_disks``
rows, a port and a qemu-nbd; then the targets string and the SHA's exact
``/backup/start`` body to the node.  A failed pre-check, prepare or node
call cleans up as the SHA does: qemu-nbd stopped, ports released, the parent
row deleted (and with it its ``backup_disks`` rows); per-disk rows and qcow2
files stay.

The double differs from the SHA only where a test needs it, each said where
it happens: it learns the disks from the node's ``/discover`` (the SHA has
them from an earlier discovery), it waits until each qemu-nbd listens, it
skips ports something else holds, and its answers carry what tests need.

All I/O goes through :class:`Hub`, and the model is reached only inside
``change()`` (the server's lock); so this runs in memory in unit tests, and
in the server the node's own calls to the double are answered while it
waits for the node.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from tests.shadouble import gojson
from tests.shadouble.gojson import GoStruct
from tests.shadouble.model import (
    BackupContext,
    BackupJob,
    DatabaseError,
    GiB,
    PrepareError,
    ShaModel,
    collate,
    rfc3339,
)

#: What the SHA always sends as ``previous_change_id`` (§1.1).
PLACEHOLDER = "PLACEHOLDER"
NBD_HOST = "127.0.0.1"
#: The SHA server's WriteTimeout (§0, SV:478-480).
SHA_WRITE_TIMEOUT = 15.0


class HubFailure(Exception):
    """A qemu-img or qemu-nbd step failed; the text says why."""


class Hub(Protocol):
    """The I/O of starting a backup: qcow2 files, qemu-nbd, and HTTP to the node."""

    def create_full(self, path: Path, size_bytes: int) -> None:
        """``qemu-img create -f qcow2 PATH SIZE`` (QC:48); HubFailure if it fails."""

    def create_overlay(self, path: Path, backing: Path) -> None:
        """``qemu-img create -f qcow2 -b BACKING -F qcow2 PATH`` (QC:89-93)."""

    def remove(self, path: Path) -> None:
        """Delete a qcow2 (LR's clean-ups); no error if it is gone."""

    def port_usable(self, port: int) -> bool:
        """Whether nothing else holds ``port`` (the SHA does not ask; the double does)."""

    def serve(self, port: int, export: str, qcow2: Path, job_key: str, vm_name: str) -> int:
        """Start qemu-nbd and wait until it listens; its pid, or HubFailure."""

    def stop(self, port: int) -> None:
        """Stop the qemu-nbd on ``port`` (TERM, at most 5 s, KILL), if any."""

    def post_json(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` as application/json; status and body, or OSError."""


@dataclass(frozen=True)
class Reply:
    """An answer of a control route: status and JSON body."""

    status: int
    body: dict[str, Any]


def _error(status: int, error: str, details: str, **extra: Any) -> Reply:
    """The SHA's error shape (§0), plus what a test needs to see."""
    return Reply(status, {"error": error, "details": details, "timestamp": "", **extra})


class BadRequest(ValueError):
    """A control request the double cannot act on."""


@dataclass(frozen=True)
class Disk:
    """A VM disk as the SHA's ``vm_disks`` row has it: its id text and size in whole GiB."""

    id: str
    size_gb: int


@dataclass(frozen=True)
class StartRequest:
    vm_name: str
    backup_type: str
    sna_url: str
    vcenter_host: str
    vcenter_user: str
    vcenter_password: str
    vm_path: Optional[str] = None
    disks: Optional[tuple[Disk, ...]] = None
    sna_extra: Mapping[str, Any] = field(default_factory=dict)


def _string(body: Mapping[str, Any], name: str, where: str = "") -> str:
    value = body.get(name)
    if not isinstance(value, str) or value == "":
        raise BadRequest(f"{where}{name} is required (a non-empty string)")
    return value


def loopback_url(url: str) -> str:
    """An ``http://`` URL of a loopback host, without a trailing slash; BadRequest otherwise."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme != "http" or not loopback:
        raise BadRequest(f"sna_url must be http:// on a loopback address, not {url!r}")
    return url.rstrip("/")


def parse_start(body: Any) -> StartRequest:
    """The body of ``POST /_double/backups``; BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body is a JSON object")
    vm_name = body.get("vm_name")
    if not isinstance(vm_name, str) or vm_name == "":
        raise BadRequest("vm_name is required")
    backup_type = body.get("backup_type")
    if backup_type not in ("full", "incremental"):
        raise BadRequest("backup_type must be 'full' or 'incremental'")
    sna_url = loopback_url(_string(body, "sna_url"))
    vcenter = body.get("vcenter")
    if not isinstance(vcenter, dict):
        raise BadRequest('vcenter is required: {"host", "user", "password"}')
    vm_path = body.get("vm_path")
    if vm_path is not None and not isinstance(vm_path, str):
        raise BadRequest("vm_path is a string")
    disks: Optional[tuple[Disk, ...]] = None
    if body.get("disks") is not None:
        disks = _parse_disks(body["disks"])
    extra = body.get("sna_extra") or {}
    if not isinstance(extra, dict):
        raise BadRequest("sna_extra is an object")
    return StartRequest(
        vm_name=vm_name,
        backup_type=backup_type,
        sna_url=sna_url,
        vcenter_host=_string(vcenter, "host", "vcenter."),
        vcenter_user=_string(vcenter, "user", "vcenter."),
        vcenter_password=_string(vcenter, "password", "vcenter."),
        vm_path=vm_path,
        disks=disks,
        sna_extra=extra,
    )


def _parse_disks(value: Any) -> tuple[Disk, ...]:
    if not isinstance(value, list):
        raise BadRequest('disks is a list of {"id": "disk-2000", "size_gb": 1}')
    disks = []
    for item in value:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("id"), str)
            or not isinstance(item.get("size_gb"), int)
            or isinstance(item.get("size_gb"), bool)
        ):
            raise BadRequest(f'each disk is {{"id": "disk-2000", "size_gb": 1}}, not {item!r}')
        disks.append(Disk(item["id"], item["size_gb"]))
    return tuple(disks)


@dataclass
class Prepared:
    """One disk made ready: its rows, file, port and qemu-nbd."""

    disk_index: int
    disk: Disk
    per_disk_id: str
    qcow2: Path
    port: int
    export: str
    pid: int


ModelAccess = Callable[[], AbstractContextManager[ShaModel]]


class Starter:
    """Runs ``POST /_double/backups`` against the model (through ``change``) and a Hub."""

    def __init__(self, change: ModelAccess, hub: Hub, workdir: Path, ports: range) -> None:
        self._change = change
        self._hub = hub
        self._workdir = workdir
        self._ports = ports
        # One start at a time, as one test would drive the SHA; the node's
        # calls to the double are not behind this lock.
        self._serial = threading.Lock()

    def start(self, request: StartRequest) -> Reply:
        """The whole start; BadRequest for a VM name the workdir cannot hold."""
        self._check_paths(request.vm_name)
        try:
            disks, vm_path = self._disks(request)
        except _Stop as stop:
            return stop.reply
        with self._serial:
            return self._start(request, disks, vm_path)

    # -- what the SHA knows from discovery ---------------------------------------------------------

    def _disks(self, request: StartRequest) -> tuple[tuple[Disk, ...], str]:
        """The VM's disks and path: given, or from the node's ``/discover`` as the SHA learns them."""
        if request.disks is not None and request.vm_path is not None:
            return request.disks, request.vm_path
        body: dict[str, Any] = {
            "vcenter": request.vcenter_host,
            "username": request.vcenter_user,
            "password": request.vcenter_password,
            "filter": request.vm_name,
        }
        thumbprint = request.sna_extra.get("vcenter_thumbprint")
        if thumbprint is not None:
            body["vcenter_thumbprint"] = thumbprint
        try:
            status, answer = self._hub.post_json(
                request.sna_url + "/api/v1/discover", json.dumps(body).encode()
            )
        except OSError as e:
            raise _Stop(_error(502, "discovery failed", str(e))) from None
        text = answer.decode("utf-8", "replace")
        if status != 200:
            raise _Stop(
                _error(
                    502, "discovery failed", f"status: {status}", sna_status=status, sna_body=text
                )
            )
        try:
            vms = json.loads(answer).get("vms") or []
        except (ValueError, AttributeError):
            raise _Stop(_error(502, "discovery failed", "not JSON", sna_body=text)) from None
        vm = next(
            (v for v in vms if isinstance(v, dict) and v.get("name") == request.vm_name), None
        )
        if vm is None:
            raise _Stop(
                _error(404, "VM not found", f"discover found no VM named {request.vm_name!r}")
            )
        disks = request.disks
        if disks is None:
            try:
                disks = _parse_disks(
                    [
                        {"id": d.get("id"), "size_gb": d.get("size_gb")}
                        for d in vm.get("disks") or []
                    ]
                )
            except (BadRequest, AttributeError):
                raise _Stop(_error(502, "discovery failed", "bad disks", sna_body=text)) from None
        vm_path = request.vm_path if request.vm_path is not None else str(vm.get("path", ""))
        return disks, vm_path

    def _check_paths(self, vm_name: str) -> None:
        """The qcow2 files go under the workdir by VM name; a name must not lead out of it."""
        root = self._workdir.resolve()
        inside = (root / vm_name / "disk-0").resolve()
        if root not in inside.parents or "\x00" in vm_name:
            raise BadRequest(f"vm_name {vm_name!r} would put files outside the workdir")

    # -- the SHA's steps ------------------------------------------------------------------------

    def _start(self, request: StartRequest, disks: tuple[Disk, ...], vm_path: str) -> Reply:
        if not disks:
            return _error(
                404,
                "No disks found for VM",
                "VM has no disks in database - ensure VM discovery completed",
            )
        # §1.1 step 2: ORDER BY disk_id, as text ("disk-16000" before "disk-2000").
        ordered = sorted(disks, key=lambda d: (collate(d.id), d.id))
        with self._change() as model:
            try:
                context = model.context_for(request.vm_name)
            except DatabaseError as e:
                return _error(500, "failed to create backup context", str(e))
            job_id = f"backup-{request.vm_name}-{model.now()}"
            try:
                model.insert_parent(job_id, context, request.vm_name, request.backup_type)
            except DatabaseError as e:
                return _error(500, "failed to create parent backup job", str(e))
        prepared: list[Prepared] = []
        for disk_index, disk in enumerate(ordered):
            outcome = self._prepare(request, context, job_id, disk_index, disk)
            if isinstance(outcome, Reply):
                self._clean_up(job_id, prepared)
                return outcome
            prepared.append(outcome)
        targets = ",".join(
            f"{2000 + p.disk_index}:nbd://{NBD_HOST}:{p.port}/{p.export}" for p in prepared
        )
        sna_request: dict[str, Any] = {
            "vm_name": request.vm_name,
            "vcenter_host": request.vcenter_host,
            "vcenter_user": request.vcenter_user,
            "vcenter_password": request.vcenter_password,
            "vm_path": vm_path,
            "nbd_host": NBD_HOST,
            "nbd_targets": targets,
            "job_id": job_id,
            "backup_type": request.backup_type,
            "previous_change_id": PLACEHOLDER,
        }
        sna_request.update(request.sna_extra)
        # A Go map: json.Marshal sorts its keys (BH:428).
        body = gojson.marshal(sna_request)
        began = time.monotonic()
        try:
            status, answer = self._hub.post_json(request.sna_url + "/api/v1/backup/start", body)
        except OSError as e:
            self._clean_up(job_id, prepared)
            return _error(500, "failed to call SNA API", str(e), sna_request=sna_request)
        sna_body = answer.decode("utf-8", "replace")
        sna_seconds = time.monotonic() - began
        if sna_seconds > SHA_WRITE_TIMEOUT:
            # The SHA's own answer has a 15 s write deadline (§0) and its call
            # to the node none: a slow node loses the SHA's caller its answer.
            with self._change() as model:
                model.log_problem(
                    "sna_start_slow",
                    job_id,
                    None,
                    f"/backup/start took {sna_seconds:.1f} s, over the SHA's {SHA_WRITE_TIMEOUT:g} s",
                )
        if status not in (200, 202):
            self._clean_up(job_id, prepared)
            return _error(
                500,
                "SNA API error",
                f"status: {status}",
                sna_status=status,
                sna_body=sna_body,
                sna_request=sna_request,
            )
        return Reply(
            200,
            self._started(
                request,
                job_id,
                context,
                prepared,
                targets,
                sna_request,
                status,
                sna_body,
                sna_seconds,
            ),
        )

    def _prepare(
        self,
        request: StartRequest,
        context: BackupContext,
        job_id: str,
        disk_index: int,
        disk: Disk,
    ) -> Prepared | Reply:
        """§1.1 steps 6a-6b for disk ``disk_index``: its files, rows, port and qemu-nbd."""

        def failed(error: str) -> Reply:
            return _error(500, "failed to prepare backup disk", error)

        vm_name = request.vm_name
        total_bytes = disk.size_gb * GiB
        parent: Optional[BackupJob] = None
        with self._change() as model:
            if (
                request.backup_type == "incremental"
                and model.previous_disk(vm_name, disk_index) is None
            ):
                return _error(
                    400, "no previous backup found", "full backup required before incremental"
                )
            if total_bytes <= 0:
                return failed(
                    "backup request validation failed: total_bytes must be greater than 0"
                )
            if request.backup_type == "incremental":
                try:
                    parent = model.chain_parent(context.context_id, disk_index)
                except PrepareError as e:
                    return failed(str(e))
            per_disk_id = model.per_disk_id(vm_name, disk_index)
        qcow2 = self._workdir / vm_name / f"disk-{disk_index}" / f"{per_disk_id}.qcow2"
        try:
            if parent is None:
                self._hub.create_full(qcow2, total_bytes)
            else:
                self._hub.create_overlay(qcow2, Path(parent.repository_path))
        except HubFailure as e:
            return failed(f"failed to create backup in repository: {e}")
        with self._change() as model:
            try:
                model.insert_per_disk(
                    per_disk_id,
                    context,
                    vm_name,
                    disk_index,
                    request.backup_type,
                    str(qcow2),
                    parent.id if parent is not None else None,
                    total_bytes,
                )
            except DatabaseError as e:
                self._hub.remove(qcow2)
                return failed(
                    f"failed to create backup in repository: failed to insert backup_jobs: {e}"
                )
            model.insert_disk(context, job_id, disk_index, total_bytes, str(qcow2))
        export = f"{vm_name}-disk{disk_index}"
        job_key = f"{per_disk_id}-disk{disk_index}"
        with self._change() as model:
            try:
                port = model.allocate_port(
                    job_key, vm_name, export, self._ports, self._hub.port_usable
                )
            except PrepareError as e:
                self._delete_backup(per_disk_id, qcow2)
                return failed(str(e))
        try:
            pid = self._hub.serve(port, export, qcow2, job_key, vm_name)
        except HubFailure as e:
            with self._change() as model:
                model.release_port(port)
            self._delete_backup(per_disk_id, qcow2)
            return failed(f"failed to start qemu-nbd: {e}")
        return Prepared(disk_index, disk, per_disk_id, qcow2, port, export, pid)

    def _delete_backup(self, per_disk_id: str, qcow2: Path) -> None:
        """``repo.DeleteBackup`` after a failed port or qemu-nbd: the per-disk row and its file."""
        with self._change() as model:
            model.delete_job(per_disk_id)
        self._hub.remove(qcow2)

    def _clean_up(self, job_id: str, prepared: list[Prepared]) -> None:
        """BH:262-277: qemu-nbd and ports of the prepared disks, then the parent row."""
        for disk in prepared:
            self._hub.stop(disk.port)
            with self._change() as model:
                model.release_port(disk.port)
        with self._change() as model:
            model.delete_job(job_id)

    def _started(
        self,
        request: StartRequest,
        job_id: str,
        context: BackupContext,
        prepared: list[Prepared],
        targets: str,
        sna_request: dict[str, Any],
        sna_status: int,
        sna_body: str,
        sna_seconds: float,
    ) -> dict[str, Any]:
        """The SHA's BackupResponse (BH:462-478), then the double's additions."""
        results = [
            {
                "disk_id": p.disk_index,
                "nbd_port": p.port,
                "nbd_export_name": p.export,
                "qcow2_path": str(p.qcow2),
                "qemu_nbd_pid": p.pid,
                "status": "prepared",
                # The double's: which disk of the request this is, and its rows.
                "disk_index": p.disk_index,
                "source_disk_id": p.disk.id,
                "size_gb": p.disk.size_gb,
                "vmware_disk_key": 2000 + p.disk_index,
                "per_disk_backup_id": p.per_disk_id,
            }
            for p in prepared
        ]
        with self._change() as model:
            created = model.now()
        response = GoStruct(
            backup_id=job_id,
            # The SHA puts the legacy replication context here; the double has none.
            vm_context_id=context.context_id,
            vm_name=request.vm_name,
            disk_results=results,
            nbd_targets_string=targets,
            backup_type=request.backup_type,
            type="",
            repository_id="",
            status="started",
            bytes_transferred=0,
            total_bytes=0,
            disks_count=0,
            current_phase="",
            transfer_speed_bps=0,
            progress_percent=0,
            created_at=rfc3339(created),
        )
        response.update(
            sna_seconds=round(sna_seconds, 3),
            qcow2_paths=[str(p.qcow2) for p in prepared],
            ports=[p.port for p in prepared],
            sna_request=sna_request,
            sna_status=sna_status,
            sna_body=sna_body,
        )
        return response


class _Stop(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body.get("error"))
        self.reply = reply
