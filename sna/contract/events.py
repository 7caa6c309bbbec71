"""The backup client's events: their names, fields and value rules (``docs/sbc-events.md``).

The client writes them (:mod:`sna.backup.events`), one JSON object a line on
stdout; the daemon reads them (:mod:`sna.sbc.parse`) and drops a line that
breaks a rule here.  :data:`FIELDS` lists each event's required and optional
fields; a client may add others, which the daemon ignores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PHASE = "phase"
DISK_PLAN = "disk_plan"
DISK_START = "disk_start"
PROGRESS = "progress"
DISK_DONE = "disk_done"
ERROR = "error"
DONE = "done"
STALL = "stall"
RESUME = "resume"
SNAPSHOT = "snapshot"

#: Largest count accepted: the int64 the store and the Go client use.
MAX_COUNT = 2**63 - 1
#: Longest text kept from a field; the raw line is in the job log anyway.
MAX_TEXT = 4096
#: Longest change ID; VMware's are about 60 characters.
MAX_CHANGE_ID = 256
SYNC_TYPES = frozenset({"full", "incremental"})
#: What a secret (the vCenter password) reads as wherever it would be shown: events,
#: the job log, a job's error, the daemon's log.
MASK = "********"
DISK_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PHASE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: What a ``stall`` waits on: a vCenter call or task, a read of the source
#: disk (the datastore, nbdkit), a write to the hub's NBD target.
STALL_ON = frozenset({"vcenter", "source_read", "hub_write"})
#: What a ``snapshot`` event says of the job's snapshot: taken, removed, or
#: left on the VM when the client gave up removing it (sna's janitor then does).
SNAPSHOT_CREATED = "created"
SNAPSHOT_REMOVED = "removed"
SNAPSHOT_REMAINS = "remains"
SNAPSHOT_STATES = frozenset({SNAPSHOT_CREATED, SNAPSHOT_REMOVED, SNAPSHOT_REMAINS})
#: The longest a stall may have lasted, in seconds, for sna to take it (a year).
MAX_STALL_SECONDS = 366 * 86400.0

#: Each event's (required, optional) fields, besides ``event`` and ``ts``.
FIELDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    PHASE: (frozenset({"phase"}), frozenset({"message"})),
    DISK_PLAN: (
        frozenset({"disk_key", "sync_type", "bytes_total"}),
        frozenset({"sync_reason", "vmware_disk_key", "capacity_bytes"}),
    ),
    DISK_START: (
        frozenset({"disk_key", "sync_type"}),
        frozenset({"sync_reason", "bytes_total", "vmware_disk_key", "capacity_bytes"}),
    ),
    PROGRESS: (frozenset({"disk_key", "bytes_done"}), frozenset({"bytes_total", "throughput_bps"})),
    DISK_DONE: (frozenset({"disk_key", "change_id"}), frozenset({"bytes_done", "bytes_total"})),
    ERROR: (frozenset({"message"}), frozenset({"disk_key"})),
    DONE: (frozenset(), frozenset({"message"})),
    STALL: (frozenset({"on", "seconds"}), frozenset({"message", "disk_key"})),
    RESUME: (frozenset(), frozenset({"message"})),
    SNAPSHOT: (frozenset({"name", "state"}), frozenset({"message"})),
}
