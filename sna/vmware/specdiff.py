"""What changed in a VM since it was recorded: the diff behind ``/vm-spec-changes``.

Pure functions over two VM records shaped like ``/discover``'s (the stored
one may come from the Go SNA, which leaves several fields empty).  Disks are
matched by device key, networks by MAC address.  Knows nothing of vCenter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Optional

#: Top-level fields compared, with the words a summary uses for them.
SCALARS: tuple[tuple[str, str, str], ...] = (
    ("name", "name", "metadata"),
    ("num_cpu", "CPUs", "hardware"),
    ("cpus", "CPUs (cpus)", "hardware"),
    ("memory_mb", "memory (MB)", "hardware"),
    ("vmx_version", "hardware version", "hardware"),
    ("os_type", "guest OS type", "hardware"),
    ("power_state", "power state", "state"),
    ("cbt_enabled", "changed block tracking", "state"),
    ("vmware_tools_status", "VMware Tools status", "state"),
    ("vmware_tools_version", "VMware Tools version", "state"),
    ("display_name", "display name", "metadata"),
    ("annotation", "annotation", "metadata"),
    ("folder_path", "folder", "metadata"),
)

#: Fields the Go SNA's discovery never filled: empty there means "not known",
#: not "empty", so an empty stored value is not compared.
UNKNOWN_WHEN_EMPTY = frozenset(
    {
        "cpus",
        "os_type",
        "display_name",
        "folder_path",
        "vmware_tools_status",
        "vmware_tools_version",
    }
)

DISK_FIELDS = (("vmdk_path", "file"), ("datastore", "datastore"))
NIC_FIELDS = (
    ("network_name", "network"),
    ("connected", "connected"),
    ("adapter_type", "adapter type"),
)

_DISK_ID = re.compile(r"disk-(\d+)")


def _known(field: str, value: Any) -> bool:
    if value is None:
        return False
    return not (field in UNKNOWN_WHEN_EMPTY and value in ("", 0))


def _disk_key(disk: Mapping[str, Any]) -> Optional[int]:
    key = disk.get("key")
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    match = _DISK_ID.fullmatch(str(disk.get("id", "")))
    return int(match.group(1)) if match else None


def _size(value: Any) -> str:
    if not isinstance(value, int) or value < 0:
        return str(value)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} bytes"


def _capacity(disk: Mapping[str, Any]) -> Optional[int]:
    capacity = disk.get("capacity_bytes")
    if isinstance(capacity, int) and capacity > 0:
        return capacity
    return None


def _disk_changes(stored: list[Any], live: list[Any]) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    old = {k: d for d in stored if isinstance(d, Mapping) and (k := _disk_key(d)) is not None}
    new = {k: d for d in live if (k := _disk_key(d)) is not None}
    for key in sorted(new.keys() - old.keys()):
        disk = new[key]
        changes.append(
            _change(
                "disk",
                "added",
                "disks",
                None,
                disk,
                (
                    f"disk {key} ({disk.get('label', '')}, {_size(disk.get('capacity_bytes'))}) added"
                ),
                key=key,
            )
        )
    for key in sorted(old.keys() - new.keys()):
        disk = old[key]
        changes.append(
            _change(
                "disk",
                "removed",
                "disks",
                dict(disk),
                None,
                f"disk {key} ({disk.get('label', '')}) removed",
                key=key,
            )
        )
    for key in sorted(old.keys() & new.keys()):
        before, after = old[key], new[key]
        was, now = _capacity(before), _capacity(after)
        if was is None and isinstance(before.get("size_gb"), int):
            # A record without bytes: compare what it has.
            was, now = before["size_gb"], after.get("size_gb")
            field = "disks.size_gb"
        else:
            field = "disks.capacity_bytes"
        if was is not None and was != now:
            changes.append(
                _change(
                    "disk",
                    "resized",
                    field,
                    was,
                    now,
                    (
                        f"disk {key} resized from {_size(was)} to {_size(now)}"
                        if field == "disks.capacity_bytes"
                        else f"disk {key} resized from {was} GB to {now} GB"
                    ),
                    key=key,
                )
            )
        for name, words in DISK_FIELDS:
            if before.get(name) and before.get(name) != after.get(name):
                changes.append(
                    _change(
                        "disk",
                        "modified",
                        f"disks.{name}",
                        before.get(name),
                        after.get(name),
                        (
                            f"disk {key} {words} changed from {_shown(before.get(name))} "
                            f"to {_shown(after.get(name))}"
                        ),
                        key=key,
                    )
                )
    return changes


def _nic_id(nic: Mapping[str, Any]) -> str:
    mac = str(nic.get("mac_address") or "").lower()
    return mac or f"label:{nic.get('label', '')}"


def _network_changes(stored: list[Any], live: list[Any]) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    old = {_nic_id(n): n for n in stored if isinstance(n, Mapping)}
    new = {_nic_id(n): n for n in live}
    for ident in sorted(new.keys() - old.keys()):
        nic = new[ident]
        changes.append(
            _change(
                "network",
                "added",
                "networks",
                None,
                nic,
                (
                    f"network adapter {nic.get('mac_address', '')} on "
                    f"{nic.get('network_name', '')} added"
                ),
                mac_address=nic.get("mac_address", ""),
            )
        )
    for ident in sorted(old.keys() - new.keys()):
        nic = old[ident]
        changes.append(
            _change(
                "network",
                "removed",
                "networks",
                dict(nic),
                None,
                (
                    f"network adapter {nic.get('mac_address', '')} on "
                    f"{nic.get('network_name', '')} removed"
                ),
                mac_address=nic.get("mac_address", ""),
            )
        )
    for ident in sorted(old.keys() & new.keys()):
        before, after = old[ident], new[ident]
        for name, words in NIC_FIELDS:
            if name in before and before[name] != after.get(name):
                if name != "connected" and not before[name]:
                    continue
                changes.append(
                    _change(
                        "network",
                        "modified",
                        f"networks.{name}",
                        before[name],
                        after.get(name),
                        (
                            f"network adapter {after.get('mac_address', '')} {words} changed "
                            f"from {_shown(before[name])} to {_shown(after.get(name))}"
                        ),
                        mac_address=after.get("mac_address", ""),
                    )
                )
    return changes


def _shown(value: Any) -> str:
    """A value in a change's text: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _change(
    category: str,
    kind: str,
    field: str,
    old: Any,
    new: Any,
    description: str,
    **ident: Any,
) -> dict[str, Any]:
    """One entry of ``changes``; ``ident`` names the disk (``key``) or adapter (``mac_address``)."""
    return {
        "category": category,
        "type": kind,
        "field": field,
        **ident,
        "old": old,
        "new": new,
        "description": description,
    }


def diff(stored: Mapping[str, Any], live: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every difference between a stored VM record and the live one, in a stable order.

    Only what the stored record says is compared: a field it lacks (or, for
    the fields the Go SNA never filled, leaves empty) is not a change.
    """
    changes: list[dict[str, Any]] = []
    for field, words, category in SCALARS:
        if field not in stored or not _known(field, stored[field]):
            continue
        before, after = stored[field], live.get(field)
        if before != after:
            changes.append(
                _change(
                    category,
                    "modified",
                    field,
                    before,
                    after,
                    f"{words} changed from {_shown(before)} to {_shown(after)}",
                )
            )
    if isinstance(stored.get("disks"), list):
        changes.extend(_disk_changes(stored["disks"], list(live.get("disks") or [])))
    if isinstance(stored.get("networks"), list):
        changes.extend(_network_changes(stored["networks"], list(live.get("networks") or [])))
    return changes


def report(changes: list[dict[str, Any]], check_time: str) -> dict[str, Any]:
    """The Go SNA's ``/vm-spec-changes`` answer for a list of changes."""
    if changes:
        count = len(changes)
        summary = f"{count} change{'s' if count != 1 else ''}: " + "; ".join(
            c["description"] for c in changes
        )
        changes_json = json.dumps(changes, indent=2, sort_keys=True)
    else:
        summary, changes_json = "no changes", ""
    return {
        "has_changes": bool(changes),
        "changes_summary": summary,
        "changes_json": changes_json,
        "check_time": check_time,
        "status": "success",
        "error_message": "",
        "changes": changes,
    }
