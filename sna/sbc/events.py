"""Progress events reported by a backup client, whatever client it is.

Both parsers (:mod:`sna.sbc.parse`) produce these: the JSON-line events of
``sendense-backup-client`` and what can be read off the legacy Go client's
logrus lines.  They are plain frozen records; the job model applies them.
"""

from __future__ import annotations

from typing import Optional, Union

import attrs


@attrs.frozen
class Phase:
    """The client entered a new phase (``snapshot``, ``transfer``, ...)."""

    phase: str
    message: str = ""


@attrs.frozen
class DiskPlan:
    """What one disk's copy will do, known before any disk is copied.

    ``disk_key`` is the key of the disk's target in ``--nbd-targets``;
    ``vmware_disk_key`` the VMware device key it was mapped to.
    """

    disk_key: str
    sync_type: str
    bytes_total: int
    sync_reason: str = ""
    vmware_disk_key: Optional[str] = None
    capacity_bytes: Optional[int] = None


@attrs.frozen
class DiskStart:
    """Copying of one disk begins."""

    disk_key: str
    sync_type: str = "full"  # "full" or "incremental"
    sync_reason: str = ""
    bytes_total: Optional[int] = None
    vmware_disk_key: Optional[str] = None
    capacity_bytes: Optional[int] = None


@attrs.frozen
class Progress:
    """Bytes copied so far, for one disk when ``disk_key`` is set.

    ``disk_key`` is ``None`` when the client reports only an aggregate (the
    Go client's pushes, for example).
    """

    bytes_done: int
    bytes_total: Optional[int] = None
    disk_key: Optional[str] = None
    throughput_bps: Optional[float] = None


@attrs.frozen
class DiskDone:
    """One disk is copied and its target flushed; ``change_id`` is its new CBT change ID."""

    disk_key: Optional[str]
    change_id: Optional[str] = None
    bytes_done: Optional[int] = None
    bytes_total: Optional[int] = None


@attrs.frozen
class Error:
    """The client reported an error; the last one becomes the job's error."""

    message: str
    disk_key: Optional[str] = None


@attrs.frozen
class Done:
    """The client says it finished every disk."""

    message: str = ""


@attrs.frozen
class Stall:
    """No progress for ``seconds``, waiting on ``on`` (``vcenter``, ``source_read``, ``hub_write``)."""

    on: str
    seconds: float
    message: str = ""
    disk_key: Optional[str] = None


@attrs.frozen
class Resume:
    """What the last :class:`Stall` waited on has moved on (answered, progressed or given up)."""

    message: str = ""


@attrs.frozen
class Snapshot:
    """The job's snapshot was ``created``, ``removed``, or ``remains`` (the client gave up)."""

    name: str
    state: str
    message: str = ""


Event = Union[Phase, DiskPlan, DiskStart, Progress, DiskDone, Error, Done, Stall, Resume, Snapshot]
