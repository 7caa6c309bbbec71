"""A disk's identity as the SHA gives it, and how targets map to a VM's disks.

The SHA numbers a VM's disks by their position ``i`` when the disk ids
``disk-{key}`` are sorted as text (``disk-16000`` before ``disk-2000``).  It
keys the target of disk ``i`` ``2000+i``, names its export ``{vm}-disk{i}``,
and calls ``i`` the ``disk_id`` of ``/complete`` and ``changeid`` and the
``disk_index`` of telemetry; it never reads the real device key back
(``reference/sha-contract.md`` §1.2, §6).  Targets keyed by the VM's own
device keys are mapped exactly; targets keyed ``2000 … 2000+n-1`` for a VM of
``n`` other disks are mapped by the SHA's position.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Optional

import attrs

#: The SHA's key of its disk 0.
SHA_FIRST_KEY = 2000

Mode = Literal["exact", "positional"]


def sha_order(keys: Iterable[str]) -> list[str]:
    """Disk keys in the SHA's order: by the text ``disk-{key}``."""
    return sorted(keys, key=lambda key: f"disk-{key}")


def disk_indexes(keys: Iterable[str]) -> dict[str, int]:
    """The SHA's index of each disk key among ``keys`` (a job's targets or a VM's disks)."""
    return {key: index for index, key in enumerate(sha_order(keys))}


def sha_keys(count: int) -> list[str]:
    """The target keys the SHA gives a VM of ``count`` disks."""
    return [str(SHA_FIRST_KEY + i) for i in range(count)]


@attrs.frozen
class DiskMap:
    """Which target each of a VM's disks is written to, and why."""

    mode: Mode
    #: VMware device key -> target key.
    targets: Mapping[str, str]

    def target_of(self, disk_key: str) -> str:
        return self.targets[disk_key]


def map_disks(disk_keys: Sequence[str], target_keys: Sequence[str]) -> Optional[DiskMap]:
    """Map a VM's disks to targets, or ``None`` when neither rule applies.

    Exactly, when the target keys are the VM's device keys; by the SHA's
    position, when they are ``2000 … 2000+n-1`` for a VM of ``n`` disks (and
    not its device keys).  Anything else maps nothing.
    """
    disks, targets = set(disk_keys), set(target_keys)
    if len(disks) != len(disk_keys) or len(targets) != len(target_keys):
        return None
    if disks == targets:
        return DiskMap("exact", {key: key for key in disk_keys})
    if targets == set(sha_keys(len(disks))):
        ordered = sha_order(disk_keys)
        return DiskMap("positional", {key: str(SHA_FIRST_KEY + i) for i, key in enumerate(ordered)})
    return None
