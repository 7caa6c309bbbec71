"""Checking request bodies, once, at the edge.

Each parser takes the decoded JSON object and returns a frozen record or
raises :class:`~sna.api.http.ApiError` naming the field and the reason, with
the Go SNA's messages where it had one (``vm_name is required``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Optional

import attrs
from twisted.web.iweb import IRequest

from sna.api.http import MAX_JSON_INT, ApiError
from sna.config import Settings, normalise_host
from sna.contract import ids
from sna.contract import targets as targets_grammar
from sna.contract.targets import NbdTarget
from sna.contract.tls import InvalidThumbprint, normalise_thumbprint
from sna.jobs.model import BackupRequest, PushedProgress
from sna.vmware.interface import Credentials, InvalidVSphereRequest, parse_address

#: The SHA sends this literally when it does not know the previous change ID.
PLACEHOLDER = "PLACEHOLDER"

MAX_TARGETS = 256
#: Longest value of a text field: they become the client's argv and environment,
#: where Linux allows 128 KiB per string, and no real value comes near this.
MAX_FIELD = 4096
MAX_TARGETS_TEXT = 64 * 1024
_REQUIRED = (
    "job_id",
    "vm_name",
    "vcenter_host",
    "vcenter_user",
    "vcenter_password",
    "vm_path",
    "nbd_targets",
)


#: Fields that may hold any character but NUL: secrets, which are masked
#: wherever they could be shown, and the job id, which has its own rule.
_ANY_TEXT = frozenset({"vcenter_password", "password", "job_id"})
#: Characters no other text field may hold, because each of those fields can
#: reach a log line, the job log or the client's argv: the ones a job id may
#: not hold either (:data:`sna.contract.ids.JOB_ID_RULE`), control characters
#: (Unicode Cc: C0 with TAB, CR, LF and ESC, DEL, C1) and lone surrogates.
#: Everything else, spaces and non-ASCII letters included, is allowed: vCenter
#: names may hold them.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: Passwords: characters XML 1.0 cannot carry, not even escaped.  vSphere's
#: SOAP would carry the password to vCenter, which refuses such a request
#: (a 502 from vCenter, or a job that fails at its login, for input that
#: could never have worked).
_NOT_XML = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_PASSWORDS = frozenset({"vcenter_password", "password"})


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field=field)


def check_text(field: str, value: str) -> str:
    """``value`` if it holds none of the characters :data:`_UNSAFE` names, else a 400."""
    found = _UNSAFE.search(value)
    if found is not None:
        char = found.group()
        kind = "a control character" if unicodedata.category(char) == "Cc" else "a lone surrogate"
        raise invalid(
            field, f"{field} has {kind} (U+{ord(char):04X}) at position {found.start() + 1}"
        )
    return value


def _string(body: Mapping[str, Any], field: str, required: bool) -> Optional[str]:
    value = body.get(field)
    if value is None or (value == "" and required):
        if required:
            raise invalid(field, f"{field} is required")
        return None
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a string")
    if "\0" in value:
        raise invalid(field, f"{field} must not contain NUL characters")
    limit = MAX_TARGETS_TEXT if field == "nbd_targets" else MAX_FIELD
    if len(value) > limit:
        raise invalid(field, f"{field} is too long ({len(value)} characters, at most {limit})")
    if field not in _ANY_TEXT:
        check_text(field, value)
    elif field in _PASSWORDS:
        if _NOT_XML.search(value):
            # Which character, and where, would tell part of the secret: neither is said.
            raise invalid(field, f"{field} has a control character that vCenter cannot be sent")
    return value


def check_job_id(job_id: str) -> str:
    """The SHA's job id, byte for byte, if it can be one (:mod:`sna.contract.ids`)."""
    try:
        return ids.check_job_id(job_id)
    except ids.InvalidJobId as e:
        raise invalid("job_id", f"{e} ({ids.JOB_ID_RULE})") from None


def parse_targets(text: str, settings: Settings) -> tuple[NbdTarget, ...]:
    """``nbd_targets`` by the contract's grammar, then this daemon's policy:
    at most :data:`MAX_TARGETS`, allowed hosts (normalised) and ports only."""
    entries = [e.strip() for e in text.split(",")]
    if len(entries) > MAX_TARGETS:
        raise invalid("nbd_targets", f"nbd_targets has more than {MAX_TARGETS} entries")
    try:
        targets = targets_grammar.parse_targets(text)
    except targets_grammar.TargetError as e:
        raise invalid("nbd_targets", f"nbd_targets {e}") from None
    allowed = []
    for number, (entry, target) in enumerate(zip(entries, targets, strict=True), 1):
        where = f"nbd_targets entry {number} ({entry[:200]!r})"
        host = normalise_host(target.host)
        if host not in settings.nbd_hosts:
            raise invalid(
                "nbd_targets",
                f"{where}: host {host} is not an allowed NBD host "
                f"(allowed: {', '.join(settings.nbd_hosts)})",
            )
        if target.port not in settings.nbd_ports:
            raise invalid(
                "nbd_targets",
                f"{where}: port {target.port} is outside the allowed NBD port range "
                f"{settings.nbd_ports}",
            )
        allowed.append(attrs.evolve(target, host=host))
    return tuple(allowed)


def parse_backup_request(
    body: Mapping[str, Any], settings: Settings, sha: bool = False
) -> BackupRequest:
    """A ``/backup/start`` body; ``sha``: a SHA can be asked for previous change IDs,
    so an incremental may give none (the SHA sends ``PLACEHOLDER``)."""
    values = {field: _string(body, field, True) for field in _REQUIRED}
    job_id = check_job_id(values["job_id"] or "")
    backup_type = _string(body, "backup_type", False)
    if backup_type not in ("full", "incremental"):
        raise invalid("backup_type", "backup_type must be 'full' or 'incremental'")
    previous = _string(body, "previous_change_id", False)
    targets = parse_targets(values["nbd_targets"] or "", settings)
    per_disk = _previous_change_ids(body.get("previous_change_ids"), targets)
    per_disk_given = any(v is not None for v in (body.get("previous_change_ids") or {}).values())
    if (
        backup_type == "incremental"
        and not sha
        and not (previous or "").strip()
        and not per_disk_given
    ):
        raise invalid(
            "previous_change_id", "previous_change_id is required for incremental backups"
        )
    if previous is not None and previous.strip() in ("", PLACEHOLDER):
        # What the real SHA sends when it does not know: an incremental from an
        # unknown point, which the client turns into a full per disk (and says so).
        previous = None
    if previous is not None and len(previous) > MAX_CHANGE_ID:
        raise invalid(
            "previous_change_id", f"previous_change_id is longer than {MAX_CHANGE_ID} characters"
        )
    thumbprint = _thumbprint(body)
    return BackupRequest(
        job_id=job_id,
        vm_name=values["vm_name"] or "",
        vcenter_host=values["vcenter_host"] or "",
        vcenter_user=values["vcenter_user"] or "",
        vcenter_password=values["vcenter_password"] or "",
        vm_path=values["vm_path"] or "",
        targets=targets,
        backup_type=backup_type,
        previous_change_id=previous,
        previous_change_ids=per_disk,
        vcenter_thumbprint=thumbprint,
    )


#: VMware change IDs are about 60 characters; this leaves room, not abuse.
MAX_CHANGE_ID = 256


def _previous_change_ids(value: Any, targets: tuple[NbdTarget, ...]) -> tuple[tuple[str, str], ...]:
    """``{"2000": "52 ../7", ...}`` as sorted pairs; PLACEHOLDER or empty means unknown."""
    field = "previous_change_ids"
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid(field, f"{field} must be an object of change IDs by disk key")
    keys = {t.disk_key for t in targets}
    seen: set[str] = set()
    pairs = []
    for raw_key, change_id in value.items():
        key = targets_grammar.parse_disk_key(raw_key) or raw_key.strip()
        if key not in keys:
            raise invalid(
                field, f"{field} names disk {raw_key[:20]!r}, which is not in nbd_targets"
            )
        if key in seen:
            raise invalid(field, f"{field} names disk {key} twice")
        seen.add(key)
        if change_id is None:
            continue
        if not isinstance(change_id, str) or "\0" in change_id:
            raise invalid(field, f"{field}[{key}] must be a string")
        if len(change_id) > MAX_CHANGE_ID:
            raise invalid(field, f"{field}[{key}] is longer than {MAX_CHANGE_ID} characters")
        check_text(f"{field}[{key}]", change_id)
        if change_id.strip() in ("", PLACEHOLDER):
            continue
        pairs.append((key, change_id))
    return tuple(sorted(pairs))


def _number(body: Mapping[str, Any], field: str, integer: bool) -> float:
    """A number of bytes (``integer``) or a rate: 0 to 2**63-1, or a finite float."""
    value = body.get(field, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, f"{field} must be a number")
    if integer and not isinstance(value, int):
        raise invalid(field, f"{field} must be an integer")
    if value < 0:
        raise invalid(field, f"{field} must not be negative")
    if value > MAX_JSON_INT or not math.isfinite(value):
        raise invalid(field, f"{field} must be at most {MAX_JSON_INT} (2**63-1)")
    return value


def parse_progress_update(
    body: Mapping[str, Any], previous: Optional[PushedProgress]
) -> PushedProgress:
    """A push from the Go client, applied on top of its previous push as the Go SNA did."""
    last = previous or PushedProgress()
    stage = _string(body, "stage", False)
    status = _string(body, "status", False)
    sync_type = _string(body, "sync_type", False)
    transferred = int(_number(body, "bytes_transferred", True))
    total = int(_number(body, "total_bytes", True))
    throughput = float(_number(body, "throughput_bps", False))
    percent = float(_number(body, "percent", False))
    if percent > 100:
        raise invalid("percent", "percent must be at most 100")
    transferred = transferred or last.bytes_transferred
    total = total or last.total_bytes
    if not percent:
        percent = 100.0 * transferred / total if total else last.percent
    kind = {"full": "full", "initial": "full", "incremental": "incremental"}.get(
        sync_type or "", last.sync_type
    )
    return PushedProgress(
        stage=stage if stage is not None else last.stage,
        status=status or last.status,
        sync_type=kind,
        bytes_transferred=transferred,
        total_bytes=total,
        throughput_bps=throughput,
        percent=min(percent, 100.0),
    )


def _thumbprint(body: Mapping[str, Any]) -> Optional[str]:
    """``vcenter_thumbprint``, normalised (:func:`sna.contract.tls.normalise_thumbprint`)."""
    text = _optional(body, "vcenter_thumbprint")
    if text is None:
        return None
    try:
        return normalise_thumbprint(text)
    except InvalidThumbprint:
        raise invalid(
            "vcenter_thumbprint",
            "vcenter_thumbprint must be a SHA-1 or SHA-256 hex digest (colons optional)",
        ) from None


def _optional(body: Mapping[str, Any], field: str) -> Optional[str]:
    value = _string(body, field, False)
    return value.strip() or None if value is not None else None


def credentials(
    values: Mapping[str, Any],
    host_field: str = "vcenter",
    user_field: str = "username",
    password_field: str = "password",
) -> Credentials:
    """vCenter credentials from request fields (the Go SNA's names by default)."""
    host_text = _string(values, host_field, True) or ""
    user = _string(values, user_field, True) or ""
    password = _string(values, password_field, True) or ""
    try:
        host, port = parse_address(host_text, host_field)
    except InvalidVSphereRequest as e:
        raise invalid(e.field, e.message) from None
    thumbprint = _thumbprint(values)
    return Credentials(host=host, port=port, user=user, password=password, thumbprint=thumbprint)


#: Headers that carry credentials, so they stay out of URLs and access logs.
CREDENTIAL_HEADERS = {
    "vcenter": b"x-vcenter-host",
    "username": b"x-vcenter-user",
    "password": b"x-vcenter-password",
    "vcenter_thumbprint": b"x-vcenter-thumbprint",
}


def credentials_from_request(request: IRequest) -> Credentials:
    """Credentials of a GET: headers first, else the Go SNA's query parameters."""
    values: dict[str, Any] = {}
    for field, header in CREDENTIAL_HEADERS.items():
        raw = request.getHeader(header)
        if raw is None:
            args = request.args.get(field.encode(), [])
            raw = args[0] if args else None
        if raw is not None:
            values[field] = raw.decode("utf-8", "replace")
    return credentials(values)


def inventory_path(captured: str) -> str:
    """A VM inventory path from a URL: ``DC/vm/x`` and ``/DC/vm/x`` are the same."""
    path = "/" + captured.strip("/")
    if path == "/" or "\0" in path or len(path) > MAX_FIELD:
        raise invalid("vm_path", "vm_path must be an inventory path like /DC1/vm/name")
    return check_text("vm_path", path)


def check_vm_id(vm_id: str) -> str:
    """A VM named in a URL (``/vm/{vm_id}/...``): a managed object id, a name or a path."""
    if not vm_id.strip() or len(vm_id) > MAX_FIELD:
        raise invalid("vm_id", f"vm_id must be 1 to {MAX_FIELD} characters, not blank")
    return check_text("vm_id", vm_id)


@attrs.frozen
class PowerRequest:
    credentials: Credentials
    force: bool
    timeout: float
    wait_for_tools: bool


def _flag(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(field, f"{field} must be true or false")
    return value


def parse_power_request(body: Mapping[str, Any], default_timeout: float) -> PowerRequest:
    timeout = body.get("timeout")
    if timeout is None or (timeout == 0 and not isinstance(timeout, bool)):
        timeout = default_timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 1 <= timeout <= 3600
    ):
        raise invalid("timeout", "timeout must be a number of seconds from 1 to 3600")
    return PowerRequest(
        credentials=credentials(body),
        force=_flag(body, "force"),
        timeout=float(timeout),
        wait_for_tools=_flag(body, "wait_for_tools"),
    )


@attrs.frozen
class CleanupRequest:
    action: str
    job_id: Optional[str]
    vm_path: Optional[str]
    credentials: Credentials


CLEANUP_ACTIONS = ("delete_snapshot", "cleanup_all")


def parse_cleanup_request(body: Mapping[str, Any]) -> CleanupRequest:
    action = _string(body, "action", True)
    if action not in CLEANUP_ACTIONS:
        raise invalid("action", f"action must be one of: {', '.join(CLEANUP_ACTIONS)}")
    # Byte for byte, as backup/start takes it: the snapshot's name is made of it.
    job_id = _string(body, "job_id", False) or None
    if job_id is not None:
        check_job_id(job_id)
    elif action == "delete_snapshot":
        raise invalid("job_id", "job_id is required")
    vm_path = _optional(body, "vm_path")
    return CleanupRequest(
        action=action,
        job_id=job_id,
        vm_path=inventory_path(vm_path) if vm_path is not None else None,
        credentials=credentials(body),
    )


def parse_discover_request(
    body: Mapping[str, Any],
) -> tuple[Credentials, Optional[str], Optional[str]]:
    return credentials(body), _optional(body, "datacenter"), _optional(body, "filter")


def parse_spec_request(body: Mapping[str, Any]) -> tuple[Credentials, str, dict[str, Any]]:
    path = _string(body, "vm_path", True) or ""
    stored = body.get("stored_vm_info")
    if not isinstance(stored, dict):
        raise invalid("stored_vm_info", "stored_vm_info is required (a VM as /discover returns it)")
    return credentials(body), inventory_path(path), stored
