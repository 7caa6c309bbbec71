"""``POST /api/v1/replicate``: its body, checked once at the edge.

The Go SNA's request shape (``reference/upstream-contracts.md`` §1.3 #10):
``job_id``, ``vcenter``, ``username``, ``password``, ``vm_paths`` and
``nbd_targets``, a list of ``{device_path, vm_disk_id, vmware_disk_key}``;
``oma_url`` is taken and not used (sna reports to its ``--sha-url``).  Which
VM a target belongs to: the one its ``vm_path`` names, else, with one VM,
that VM, and with several, the VM at the same position (one target each, as
the Go SNA paired them).  A ``device_path`` without a host
(``nbd://:10100/x``, what the SHA sends when its ``SHA_NBD_HOST`` is unset)
names the hub's port on the node's loopback, where the tunnel brings it.
Every error is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sna.api.http import ApiError
from sna.api.validation import (
    MAX_FIELD,
    MAX_TARGETS,
    check_job_id,
    check_text,
    credentials,
    invalid,
    parse_targets,
)
from sna.config import Settings
from sna.contract import ids
from sna.contract.targets import NbdTarget
from sna.jobs.replication import ReplicatedVM, ReplicationRequest, vcenter_key, vm_job_ids

#: VMs one request may name (each is a job of its own, and ``--max-jobs`` still holds).
MAX_VMS = 64
#: A ``device_path`` without a host, ``nbd://:PORT/EXPORT``, and what it stands for.
HOSTLESS = "nbd://:"
TUNNEL_NBD = "nbd://127.0.0.1"


def _vm_paths(body: Mapping[str, Any]) -> list[str]:
    field = "vm_paths"
    value = body.get(field)
    if value is None or value == []:
        raise invalid(field, "vm_paths is required (one or more VM inventory paths)")
    if not isinstance(value, list):
        raise invalid(field, "vm_paths must be a list of VM inventory paths")
    if len(value) > MAX_VMS:
        raise invalid(field, f"vm_paths has {len(value)} entries, at most {MAX_VMS}")
    paths: list[str] = []
    for n, item in enumerate(value):
        where = f"vm_paths[{n}]"
        if not isinstance(item, str) or not item.strip():
            raise invalid(field, f"{where} must be a VM inventory path like /DC1/vm/name")
        if "\0" in item or len(item) > MAX_FIELD:
            raise invalid(field, f"{where} is not a VM inventory path")
        check_text(field, item)
        path = "/" + item.strip().strip("/")
        if path in paths:
            raise invalid(field, f"{where} names {path} a second time")
        paths.append(path)
    return paths


def _disk_key(entry: Mapping[str, Any], where: str) -> str:
    value = entry.get("vmware_disk_key")
    field = f"{where}.vmware_disk_key"
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        raise invalid(field, f"{field} is required (the VMware device key of the disk, e.g. 2000)")
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise invalid(field, f"{field} must be a VMware device key, a decimal number like 2000")
    return str(int(value))


def _target(entry: Any, n: int, settings: Settings) -> tuple[NbdTarget, Any]:
    """One ``nbd_targets`` entry: its target (keyed by VMware disk key) and its ``vm_path``."""
    where = f"nbd_targets[{n}]"
    if not isinstance(entry, dict):
        raise invalid(
            "nbd_targets", f"{where} must be an object with device_path and vmware_disk_key"
        )
    key = _disk_key(entry, where)
    field = f"{where}.device_path"
    device = entry.get("device_path")
    if not isinstance(device, str) or not device.strip():
        raise invalid(field, f"{field} is required (nbd://host:port/export)")
    if "," in device or "\0" in device or len(device) > MAX_FIELD:
        raise invalid(field, f"{field} is not an nbd://host:port/export URL")
    device = device.strip()
    if device.startswith(HOSTLESS):
        # The SHA leaves the host out when its SHA_NBD_HOST is unset (migration.go):
        # the node is to reach the hub's port where the tunnel brings it, its loopback.
        device = TUNNEL_NBD + device[len("nbd://") :]
    try:
        [target] = parse_targets(f"{key}:{device}", settings)
    except ApiError as e:
        reason = e.message.split("): ", 1)[-1]
        raise invalid(field, f"{field} {device[:200]!r}: {reason}") from None
    disk_id = entry.get("vm_disk_id")
    if disk_id is not None and (isinstance(disk_id, bool) or not isinstance(disk_id, int)):
        raise invalid(f"{where}.vm_disk_id", f"{where}.vm_disk_id must be an integer")
    return target, entry.get("vm_path")


def _targets_by_vm(
    body: Mapping[str, Any], paths: list[str], settings: Settings
) -> list[tuple[NbdTarget, ...]]:
    value = body.get("nbd_targets")
    if value is None or value == []:
        raise invalid("nbd_targets", "nbd_targets is required (one target per disk of each VM)")
    if not isinstance(value, list):
        raise invalid("nbd_targets", "nbd_targets must be a list of {device_path, vmware_disk_key}")
    if len(value) > MAX_TARGETS:
        raise invalid("nbd_targets", f"nbd_targets has more than {MAX_TARGETS} entries")
    parsed = [_target(entry, n, settings) for n, entry in enumerate(value)]
    named = [vm_path for _, vm_path in parsed if vm_path is not None]
    by_vm: list[list[NbdTarget]] = [[] for _ in paths]
    if named and len(named) != len(parsed):
        raise invalid(
            "nbd_targets", "nbd_targets: either every entry names its vm_path or none does"
        )
    if named:
        for n, (target, vm_path) in enumerate(parsed):
            field = f"nbd_targets[{n}].vm_path"
            path = "/" + vm_path.strip().strip("/") if isinstance(vm_path, str) else None
            if path not in paths:
                raise invalid(field, f"{field} must be one of vm_paths")
            by_vm[paths.index(path)].append(target)
    elif len(paths) == 1:
        by_vm[0] = [target for target, _ in parsed]
    elif len(parsed) == len(paths):
        for n, (target, _) in enumerate(parsed):
            by_vm[n].append(target)
    else:
        raise invalid(
            "nbd_targets",
            f"nbd_targets has {len(parsed)} entries for {len(paths)} VMs: with several VMs, "
            "give each entry the vm_path of its VM, or exactly one entry per VM in order",
        )
    ports: dict[int, str] = {}
    for path, targets in zip(paths, by_vm, strict=True):
        if not targets:
            raise invalid("nbd_targets", f"nbd_targets has no entry for {path}")
        keys = [t.disk_key for t in targets]
        for key in keys:
            if keys.count(key) > 1:
                raise invalid("nbd_targets", f"nbd_targets names disk {key} of {path} twice")
        for target in targets:
            holder = ports.setdefault(target.port, f"disk {target.disk_key} of {path}")
            if holder != f"disk {target.disk_key} of {path}":
                raise invalid(
                    "nbd_targets",
                    f"nbd_targets gives NBD port {target.port} to {holder} and to disk "
                    f"{target.disk_key} of {path}",
                )
    return [tuple(targets) for targets in by_vm]


def parse_replicate_request(body: Mapping[str, Any], settings: Settings) -> ReplicationRequest:
    job_value = body.get("job_id")
    if not isinstance(job_value, str) or job_value == "":
        raise invalid(
            "job_id", "job_id is required" if not job_value else "job_id must be a string"
        )
    job_id = check_job_id(job_value)
    creds = credentials(body)
    oma_url = body.get("oma_url")
    if oma_url is not None and not isinstance(oma_url, str):
        raise invalid("oma_url", "oma_url must be a string (it is not used: see --sha-url)")
    paths = _vm_paths(body)
    targets = _targets_by_vm(body, paths, settings)
    job_ids = vm_job_ids(job_id, len(paths))
    for derived in job_ids:
        try:
            ids.check_job_id(derived)
        except ids.InvalidJobId:
            raise invalid(
                "job_id",
                f"job_id is too long for {len(paths)} VMs: their jobs are named "
                f"{job_ids[0]}, ... ({ids.JOB_ID_RULE})",
            ) from None
    return ReplicationRequest(
        job_id=job_id,
        vcenter=body["vcenter"].strip(),
        vcenter_key=vcenter_key(body["vcenter"]),
        username=creds.user,
        password=creds.password,
        thumbprint=creds.thumbprint,
        vms=tuple(
            ReplicatedVM(job_id=vm_job, vm_path=path, targets=vm_targets)
            for vm_job, path, vm_targets in zip(job_ids, paths, targets, strict=True)
        ),
    )
