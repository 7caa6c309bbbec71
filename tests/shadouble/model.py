"""The SHA's backup rows and the rules of the three routes the node calls.

Pure: no I/O, no threads, no global clock.  Time comes from an injected
clock and is kept in whole seconds (truncated), as the SHA's DATETIME and
TIMESTAMP columns keep it; the size of a qcow2 (for the chain totals) comes
from an injected function.  Everything cites reference/sha-contract.md.

What is kept (§1.2, §2, the migrations cited there):

- ``backup_jobs``: parent rows (``backup-{vm}-{unix}``, running) and per-disk
  rows (``backup-{vm}-disk{i}-{YYYYMMDD-HHMMSS}``, pending, the qcow2 as
  ``repository_path``);
- ``backup_disks``: one per parent and disk index, where ``/complete``
  writes the change ID;
- ``vm_backup_contexts``: one per VM name (compared as the column collation
  does), with ``successful_backups``;
- ``backup_chains``: one per context and disk index, advanced only by the
  all-disks-completed branch of ``/complete``;
- the NBD port allocations, which the SHA keeps in memory only (§1.4): they
  are not saved, so a restarted double starts with none, like the SHA.

The database is MariaDB in strict mode (§0): a value that does not fit its
column (ENUM, VARCHAR, INT, DECIMAL(5,2)) fails the whole statement, and an
UPDATE reports the rows it *changed*, not the rows it matched.  String
comparisons follow the columns' ``*_ci`` collations (:func:`collate`).

Things the SHA only logs are kept in :attr:`ShaModel.problems`, so tests can
assert there are none.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Optional, TypeVar, Union

from tests.shadouble import gojson
from tests.shadouble.gojson import FLOAT64, INT, INT64, STRING, GoJSONError, GoStruct

Clock = Callable[[], float]
FileSize = Callable[[str], int]

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
DISK_STATUSES = ("pending", "running", "completed", "failed")
BACKUP_TYPES = ("full", "incremental", "differential")
PARENT_PATH = "/multi-disk-parent"
ID_LENGTH = 64
PHASE_LENGTH = 50
CHANGE_ID_LENGTH = 255
TEXT_BYTES = 65535
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
GiB = 1 << 30
#: The per-disk row lookup of the all-completed branch looks this far around the parent's creation (§2.2).
PER_DISK_WINDOW = 60
CENT = Decimal("0.01")

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

# The request bodies as the SHA declares them (§2.2, §2.3).
COMPLETE_REQUEST = gojson.Struct(
    "", (("change_id", STRING), ("disk_id", INT), ("bytes_transferred", INT64))
)
TELEMETRY_ERROR = gojson.Struct(
    "services.TelemetryError", (("message", STRING), ("code", STRING), ("timestamp", STRING))
)
DISK_TELEMETRY = gojson.Struct(
    "services.DiskTelemetry",
    (
        ("disk_index", INT),
        ("bytes_transferred", INT64),
        ("total_bytes", INT64),
        ("status", STRING),
        ("progress_percent", FLOAT64),
    ),
)
TELEMETRY_UPDATE = gojson.Struct(
    "services.TelemetryUpdate",
    (
        ("job_id", STRING),
        ("job_type", STRING),
        ("status", STRING),
        ("current_phase", STRING),
        ("bytes_transferred", INT64),
        ("total_bytes", INT64),
        ("transfer_speed_bps", INT64),
        ("eta_seconds", INT),
        ("progress_percent", FLOAT64),
        ("disks", gojson.Slice(DISK_TELEMETRY)),
        ("error", gojson.Pointer(TELEMETRY_ERROR)),
        ("timestamp", STRING),
    ),
)


def collate(text: str) -> str:
    """A key equal for strings the SHA's ``utf8mb4_*_ci`` columns compare as equal.

    Approximately: case-insensitive (casefold), accent-insensitive (combining
    marks dropped after NFD) and PAD SPACE (trailing spaces ignored).
    """
    decomposed = unicodedata.normalize("NFD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return bare.casefold().rstrip(" ")


def _like_key(text: str) -> str:
    """As :func:`collate` for ``LIKE``, which does not pad."""
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def rfc3339(seconds: int) -> str:
    """``time.Now().Format(time.RFC3339)`` in local time, ``Z`` for UTC as Go writes it."""
    text = datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def atoi(text: str) -> int:
    """Go's ``strconv.Atoi``: optional sign, ASCII decimal digits, in int64; else ValueError."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or any(c not in "0123456789" for c in digits):
        raise ValueError(f'strconv.Atoi: parsing "{text}": invalid syntax')
    value = int(text)
    if not gojson.INT64_MIN <= value <= gojson.INT64_MAX:
        raise ValueError(f'strconv.Atoi: parsing "{text}": value out of range')
    return value


class DatabaseError(Exception):
    """A statement MariaDB in strict mode refuses; the text is its message."""


class PrepareError(Exception):
    """``PrepareBackupDisk`` failed (§1.1 step 6b); the text is the error's."""


# -- rows ---------------------------------------------------------------------------------------


@dataclass
class BackupJob:
    """A ``backup_jobs`` row, parent or per-disk (M0410, M1008, M1010)."""

    id: str
    vm_backup_context_id: Optional[str]
    vm_name: str
    backup_type: str
    status: str = "pending"
    repository_path: str = ""
    disk_id: int = 0
    parent_backup_id: Optional[str] = None
    current_phase: str = "pending"
    bytes_transferred: int = 0
    total_bytes: int = 0
    transfer_speed_bps: int = 0
    eta_seconds: int = 0
    progress_percent: Decimal = Decimal("0.00")
    error_message: Optional[str] = None
    created_at: int = 0
    started_at: Optional[int] = None
    completed_at: Optional[int] = None
    last_telemetry_at: Optional[int] = None
    #: Insertion order, for ties the SHA leaves to the database.
    seq: int = 0

    @property
    def is_parent(self) -> bool:
        return self.repository_path == PARENT_PATH


@dataclass
class BackupDisk:
    """A ``backup_disks`` row (M1008, M1010): ``backup_job_id`` is the parent's id."""

    id: int
    vm_backup_context_id: str
    backup_job_id: str
    disk_index: int
    vmware_disk_key: int
    size_gb: int
    qcow2_path: Optional[str]
    created_at: int
    status: str = "pending"
    disk_change_id: Optional[str] = None
    bytes_transferred: int = 0
    progress_percent: Decimal = Decimal("0.00")
    completed_at: Optional[int] = None


@dataclass
class BackupContext:
    """A ``vm_backup_contexts`` row: one per VM name (the double has one repository)."""

    context_id: str
    vm_name: str
    created_at: int
    successful_backups: int = 0
    last_backup_id: Optional[str] = None
    last_backup_type: Optional[str] = None
    last_backup_at: Optional[int] = None


@dataclass
class Chain:
    """A ``backup_chains`` row ``chain-{context}-disk{i}`` (§1.3, CM:147-225)."""

    id: str
    vm_context_id: str
    disk_id: int
    full_backup_id: str = ""
    latest_backup_id: str = ""
    total_backups: int = 0
    total_size_bytes: int = 0


@dataclass
class PortAllocation:
    """One port of the SHA's in-memory allocator (PA:14-19), under job ``{per_disk_id}-disk{i}``."""

    port: int
    job_id: str
    vm_name: str
    export: str
    allocated_at: int


@dataclass(frozen=True)
class Problem:
    """Something the SHA would only log: the answer does not show it."""

    at: int
    kind: str
    job_id: str
    disk_index: Optional[int]
    detail: str


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, and the ports whose qemu-nbd the caller must stop before sending it."""

    status: int
    body: bytes = b""
    content_type: Optional[str] = None
    headers: tuple[tuple[str, str], ...] = ()
    release_ports: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def text_answer(status: int, text: str) -> Answer:
    """``http.Error``: the text, a newline, plain text (§0: the telemetry handler's errors)."""
    return Answer(
        status,
        (text + "\n").encode(),
        TEXT_TYPE,
        (("X-Content-Type-Options", "nosniff"),),
    )


def json_answer(status: int, value: Any) -> Answer:
    return Answer(status, gojson.encode(value), JSON_TYPE)


def backup_error(status: int, error: str, details: str) -> Answer:
    """``sendError`` of the backup handlers: ``timestamp`` is never filled (§0)."""
    return json_answer(status, GoStruct(error=error, details=details, timestamp=""))


# -- column rules (strict mode) ----------------------------------------------------------------


def _enum(value: str, members: Sequence[str], column: str) -> str:
    """The ENUM member ``value`` names; MariaDB matches members with the column's collation."""
    for member in members:
        if collate(member) == collate(value):
            return member
    raise DatabaseError(f"Data truncated for column '{column}' at row 1")


def _varchar(value: str, length: int, column: str) -> str:
    if len(value) > length:
        raise DatabaseError(f"Data too long for column '{column}' at row 1")
    return value


def _decimal_5_2(value: float, column: str) -> Decimal:
    """DECIMAL(5,2): rounded to cents; 1000 or more either way does not fit."""
    out_of_range = DatabaseError(f"Out of range value for column '{column}' at row 1")
    exact = Decimal(repr(value))
    if abs(exact) >= 1000:
        raise out_of_range
    stored = exact.quantize(CENT, rounding=ROUND_HALF_UP)
    if abs(stored) >= 1000:
        raise out_of_range
    return stored


def _int32(value: int, column: str) -> int:
    if not INT32_MIN <= value <= INT32_MAX:
        raise DatabaseError(f"Out of range value for column '{column}' at row 1")
    return value


def _text(value: str, column: str) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > TEXT_BYTES:
        raise DatabaseError(f"Data too long for column '{column}' at row 1")
    return value


def _job_value(column: str, value: Any) -> Any:
    if column == "status":
        return _enum(value, JOB_STATUSES, column)
    if column == "current_phase":
        return _varchar(value, PHASE_LENGTH, column)
    if column == "eta_seconds":
        return _int32(value, column)
    if column == "progress_percent":
        return _decimal_5_2(value, column)
    if column == "error_message":
        return _text(value, column)
    return value


def _disk_value(column: str, value: Any) -> Any:
    if column == "status":
        return _enum(value, DISK_STATUSES, column)
    if column == "progress_percent":
        return _decimal_5_2(value, column)
    if column == "disk_change_id":
        return _varchar(value, CHANGE_ID_LENGTH, column)
    return value


Row = TypeVar("Row", BackupJob, BackupDisk)


def _update(row: Row, values: Mapping[str, Any], rule: Callable[[str, Any], Any]) -> bool:
    """One UPDATE of one row: every value fits or nothing is written; True if a column changed.

    MariaDB (without ``clientFoundRows``, §0) counts a row as affected only
    if a stored value differs, so an identical write is "0 rows".
    """
    stored = {column: rule(column, value) for column, value in values.items()}
    changed = any(getattr(row, column) != value for column, value in stored.items())
    for column, value in stored.items():
        setattr(row, column, value)
    return changed


# -- the model ----------------------------------------------------------------------------------


class ShaModel:
    """The SHA's backup tables and its rules for the node's calls (§1.2, §2)."""

    def __init__(self, clock: Clock, file_size: FileSize = lambda path: 0) -> None:
        self._clock = clock
        self._file_size = file_size
        self.jobs: dict[str, BackupJob] = {}
        self.disks: list[BackupDisk] = []
        self.contexts: dict[str, BackupContext] = {}
        self.chains: dict[str, Chain] = {}
        self.allocations: dict[int, PortAllocation] = {}
        self.problems: list[Problem] = []
        #: Runs of the all-disks-completed branch of /complete, by job (§2.2: a repeat re-runs it).
        self.branch_runs: dict[str, int] = {}
        #: Replication jobs as the node reported them, by job id: each disk's change IDs
        #: (``disk-<key>`` -> in the order stored) and the job updates (PUT bodies).
        self.replications: dict[str, dict[str, Any]] = {}
        self._next_disk_id = 1
        self._seq = 0

    def now(self) -> int:
        return int(self._clock())

    # -- lookups, as the SHA's WHERE clauses compare -------------------------------------------

    def job(self, job_id: str) -> Optional[BackupJob]:
        """The ``backup_jobs`` row ``WHERE id = ?`` finds (the column is ``utf8mb4_unicode_ci``)."""
        key = collate(job_id)
        return next((j for j in self.jobs.values() if collate(j.id) == key), None)

    def disks_of(self, job_id: str) -> list[BackupDisk]:
        key = collate(job_id)
        return [d for d in self.disks if collate(d.backup_job_id) == key]

    def disk(self, job_id: str, disk_index: int) -> Optional[BackupDisk]:
        return next((d for d in self.disks_of(job_id) if d.disk_index == disk_index), None)

    def context_of_vm(self, vm_name: str) -> Optional[BackupContext]:
        key = collate(vm_name)
        return next((c for c in self.contexts.values() if collate(c.vm_name) == key), None)

    def _completed_disks_of_vm(self, vm_name: str, disk_index: int) -> list[BackupDisk]:
        """``backup_disks`` JOIN ``vm_backup_contexts`` on the VM name, completed, newest first.

        Ties on ``completed_at`` (seconds) are left to the database by the SHA
        (§2.1, not confirmed); the double puts the later-inserted row first.
        """
        key = collate(vm_name)
        contexts = {c.context_id for c in self.contexts.values() if collate(c.vm_name) == key}
        found = [
            d
            for d in self.disks
            if d.vm_backup_context_id in contexts
            and d.disk_index == disk_index
            and d.status == "completed"
            and d.disk_change_id is not None
        ]
        return sorted(
            found,
            key=lambda d: (d.completed_at is not None, d.completed_at or 0, d.id),
            reverse=True,
        )

    def _note_collation(self, asked: str, stored: str, disk_index: Optional[int]) -> None:
        """A job id that found its row only through the collation (case, accents, trailing spaces).

        The SHA's database accepts it, but its port release compares the VM
        name byte for byte (PA:152-193), so the job's qemu-nbd would stay.
        """
        if asked != stored:
            self.log_problem(
                "id_matched_by_collation",
                stored,
                disk_index,
                f"asked for {asked!r}; the row is {stored!r}",
            )

    def log_problem(self, kind: str, job_id: str, disk_index: Optional[int], detail: str) -> None:
        """Keep something the SHA would only log (or not notice), for tests to assert on."""
        self.problems.append(Problem(self.now(), kind, job_id, disk_index, detail))

    # -- GET /api/v1/backups/changeid (§2.1) -----------------------------------------------------

    def changeid(self, query: Mapping[str, Sequence[str]]) -> Answer:
        """The previous change ID of a VM's disk, from any job of that VM name."""
        vm_name = (query.get("vm_name") or [""])[0]
        disk_text = (query.get("disk_id") or [""])[0]
        if vm_name == "":
            return backup_error(400, "missing vm_name", "vm_name query parameter is required")
        disk_index = 0
        if disk_text != "":
            try:
                disk_index = atoi(disk_text)
            except ValueError:
                return backup_error(400, "invalid disk_id", "disk_id must be numeric")
        found = [
            d for d in self._completed_disks_of_vm(vm_name, disk_index) if d.disk_change_id != ""
        ]
        if not found:
            return json_answer(
                200,
                {
                    "vm_name": vm_name,
                    "disk_id": str(disk_index),
                    "change_id": "",
                    "message": "No previous backup found",
                },
            )
        best = found[0]
        if len(found) > 1 and found[1].completed_at == best.completed_at:
            if found[1].disk_change_id != best.disk_change_id:
                self.log_problem(
                    "changeid_tie",
                    best.backup_job_id,
                    disk_index,
                    f"{best.backup_job_id} and {found[1].backup_job_id} completed in the same "
                    "second with different change IDs; the SHA's pick is up to the database",
                )
        return json_answer(
            200,
            {
                "vm_name": vm_name,
                "disk_id": str(disk_index),
                "change_id": best.disk_change_id,
                "backup_job_id": best.backup_job_id,
                "message": "Previous change_id found",
            },
        )

    # -- POST /api/v1/backups/{backup_id}/complete (§2.2) ---------------------------------------

    def complete(self, backup_id: str, body: bytes) -> Answer:
        """One disk's completion; the last one completes the job and releases its ports."""
        try:
            request = gojson.decode(body, COMPLETE_REQUEST)
        except GoJSONError as e:
            return backup_error(400, "invalid request body", str(e))
        change_id: str = request["change_id"]
        disk_index: int = request["disk_id"]
        if change_id == "":
            return backup_error(400, "missing change_id", "change_id field is required")
        now = self.now()
        row = self.disk(backup_id, disk_index)
        not_found = backup_error(
            404,
            "backup job not found",
            f"backup disk not found: job_id={backup_id} disk_index={disk_index}",
        )
        if row is None:
            return not_found
        self._note_collation(backup_id, row.backup_job_id, disk_index)
        try:
            changed = _update(
                row,
                {
                    "status": "completed",
                    "disk_change_id": change_id,
                    "bytes_transferred": request["bytes_transferred"],
                    "completed_at": now,
                },
                _disk_value,
            )
        except DatabaseError as e:
            return backup_error(
                500, "failed to complete backup", f"failed to update backup disk: {e}"
            )
        if not changed:
            return not_found
        disks = self.disks_of(backup_id)
        release: tuple[int, ...] = ()
        if disks and all(d.status == "completed" for d in disks):
            release = self._all_completed(backup_id, disks, now)
        answer = json_answer(
            200,
            {
                "status": "completed",
                "backup_id": backup_id,
                "change_id": change_id,
                "message": "Backup completed successfully, change_id recorded",
                "timestamp": rfc3339(now),
            },
        )
        return replace(answer, release_ports=release)

    def _all_completed(self, backup_id: str, disks: list[BackupDisk], now: int) -> tuple[int, ...]:
        """BE:622-790: the parent, the context, the per-disk rows, the chains, then the ports."""
        parent = self.job(backup_id)
        key = parent.id if parent is not None else backup_id
        self.branch_runs[key] = self.branch_runs.get(key, 0) + 1
        if parent is not None:
            total = parent.bytes_transferred
            if total <= 0:
                total = sum(d.bytes_transferred for d in disks)
            _update(
                parent,
                {"status": "completed", "bytes_transferred": total, "completed_at": now},
                _job_value,
            )
            context = self.contexts.get(parent.vm_backup_context_id or "")
            if context is not None:
                context.successful_backups += 1
                context.last_backup_id = backup_id
                context.last_backup_type = parent.backup_type
                context.last_backup_at = now
                for disk in sorted(disks, key=lambda d: d.id):
                    self._complete_per_disk(parent, context, disk, now)
        return tuple(self.ports_for_backup_job(backup_id))

    def _complete_per_disk(
        self, parent: BackupJob, context: BackupContext, disk: BackupDisk, now: int
    ) -> None:
        """The per-disk row found by context, type, ``LIKE '%disk{i}%'`` and ±1 min; its chain."""
        pattern = _like_key(f"disk{disk.disk_index}")
        candidates = [
            j
            for j in self.jobs.values()
            if j.vm_backup_context_id == context.context_id
            and collate(j.backup_type) == collate(parent.backup_type)
            and pattern in _like_key(j.id)
            and abs(j.created_at - parent.created_at) <= PER_DISK_WINDOW
        ]
        if not candidates:
            self.log_problem(
                "per_disk_row_not_found",
                parent.id,
                disk.disk_index,
                "no per-disk backup_jobs row: it stays as it is and the chain is not advanced",
            )
            return
        per_disk = max(candidates, key=lambda j: (j.created_at, j.seq))
        per_disk.status = "completed"
        per_disk.completed_at = now
        size = self._file_size(disk.qcow2_path) if disk.qcow2_path else 0
        chain_id = f"chain-{context.context_id}-disk{disk.disk_index}"
        if len(chain_id) > ID_LENGTH:
            self.log_problem(
                "chain_not_advanced",
                parent.id,
                disk.disk_index,
                f"chain id {chain_id!r} is longer than VARCHAR({ID_LENGTH})",
            )
            return
        # Created on first use: the SHA expects a row made elsewhere (§1.3, not confirmed).
        chain = self.chains.setdefault(
            chain_id, Chain(chain_id, context.context_id, disk.disk_index)
        )
        if parent.backup_type == "full" and chain.full_backup_id == "":
            chain.full_backup_id = per_disk.id
        chain.latest_backup_id = per_disk.id
        chain.total_backups += 1
        chain.total_size_bytes += size

    # -- POST /api/v1/telemetry/{job_type}/{job_id} (§2.3) ---------------------------------------

    def telemetry(self, job_type: str, job_id: str, body: bytes) -> Answer:
        """The parent row's UPDATE by the "written if" rules, then each ``disks[]`` entry."""
        del job_type  # unused by the SHA as well (§2.3)
        try:
            update = gojson.decode(body, TELEMETRY_UPDATE)
        except GoJSONError:
            return text_answer(400, "Invalid request body")
        failed = text_answer(500, "Failed to process telemetry")
        now = self.now()
        values: dict[str, Any] = {"last_telemetry_at": now}
        for column in ("bytes_transferred", "total_bytes", "transfer_speed_bps", "eta_seconds"):
            if update[column] > 0:
                values[column] = update[column]
        if update["current_phase"] != "":
            values["current_phase"] = update["current_phase"]
        if update["progress_percent"] > 0:
            values["progress_percent"] = update["progress_percent"]
        status: str = update["status"]
        if status not in ("", "running"):
            values["status"] = status
            if status == "completed":
                values["completed_at"] = now
        if update["error"] is not None:
            values["error_message"] = update["error"]["message"]
            values["status"] = "failed"
            values["completed_at"] = now
        job = self.job(job_id)
        if job is None:
            return failed
        self._note_collation(job_id, job.id, None)
        try:
            changed = _update(job, values, _job_value)
        except DatabaseError:
            return failed
        if not changed:
            return failed
        for disk in update["disks"] or []:
            self._telemetry_disk(job_id, disk, now)
        return json_answer(
            200,
            {
                "status": "success",
                "message": "Telemetry received and processed",
                "timestamp": rfc3339(now),
            },
        )

    def _replication(self, job_id: str) -> dict[str, Any]:
        return self.replications.setdefault(job_id, {"change_ids": {}, "updates": []})

    def replication_changeid(self, job_id: str, body: bytes) -> Answer:
        """``POST /replications/{job_id}/changeid`` (RPL StoreChangeID): kept per disk.

        The SHA looks the job up in ``replication_jobs`` (404 when absent); the
        double keeps any job's, its table being the node's reports alone.
        """
        try:
            request = json.loads(body)
        except ValueError as e:
            return backup_error(400, "Invalid request body", str(e))
        if not isinstance(request, dict):
            return backup_error(400, "Invalid request body", "not an object")
        change_id = request.get("change_id")
        if not isinstance(change_id, str) or change_id == "":
            return backup_error(400, "Missing change_id", "change_id field is required")
        disk_id = request.get("disk_id") or "disk-2000"
        if not isinstance(disk_id, str):
            return backup_error(400, "Invalid request body", "disk_id is a string")
        self._replication(job_id)["change_ids"].setdefault(disk_id, []).append(change_id)
        return json_answer(
            200,
            {
                "job_id": job_id,
                "disk_id": disk_id,
                "change_id": change_id,
                "message": "ChangeID stored successfully",
            },
        )

    def replication_update(self, job_id: str, body: bytes) -> Answer:
        """``PUT /replications/{id}`` (RPL Update): the body kept, its ``id`` the URL's."""
        try:
            update = json.loads(body)
        except ValueError as e:
            return backup_error(400, "Invalid request payload", str(e))
        if not isinstance(update, dict):
            return backup_error(400, "Invalid request payload", "not an object")
        update["id"] = job_id
        self._replication(job_id)["updates"].append(update)
        return json_answer(200, update)

    def _telemetry_disk(self, job_id: str, disk: Mapping[str, Any], now: int) -> None:
        index: int = disk["disk_index"]
        row = self.disk(job_id, index)
        if row is None:
            self.log_problem(
                "telemetry_disk_not_found",
                job_id,
                index,
                "no backup_disks row with this disk_index; the SHA ignores the entry",
            )
            return
        values: dict[str, Any] = {
            "bytes_transferred": disk["bytes_transferred"],
            "progress_percent": disk["progress_percent"],
        }
        if disk["status"] != "":
            values["status"] = disk["status"]
            if disk["status"] == "completed":
                values["completed_at"] = now
        try:
            _update(row, values, _disk_value)
        except DatabaseError as e:
            self.log_problem("telemetry_disk_update_failed", job_id, index, str(e))

    # -- rows made by POST /api/v1/backups (§1.1, §1.2) -------------------------------------------

    def _check_new_id(self, job_id: str) -> None:
        _varchar(job_id, ID_LENGTH, "id")
        existing = self.job(job_id)
        if existing is not None:
            raise DatabaseError(f"Duplicate entry '{existing.id}' for key 'PRIMARY'")

    def context_for(self, vm_name: str) -> BackupContext:
        """Find or create the VM's ``vm_backup_contexts`` row (BH:204-230)."""
        found = self.context_of_vm(vm_name)
        if found is not None:
            return found
        context_id = _varchar(f"ctx-backup-{vm_name}-{self.now()}", ID_LENGTH, "context_id")
        context = BackupContext(context_id, vm_name, self.now())
        self.contexts[context_id] = context
        return context

    def _insert_job(self, job: BackupJob) -> BackupJob:
        self._check_new_id(job.id)
        _enum(job.backup_type, BACKUP_TYPES, "backup_type")
        self._seq += 1
        job.seq = self._seq
        self.jobs[job.id] = job
        return job

    def insert_parent(
        self, job_id: str, context: BackupContext, vm_name: str, backup_type: str
    ) -> BackupJob:
        """The parent row, ``running`` from the start (BH:241-257)."""
        now = self.now()
        return self._insert_job(
            BackupJob(
                id=job_id,
                vm_backup_context_id=context.context_id,
                vm_name=vm_name,
                backup_type=backup_type,
                status="running",
                repository_path=PARENT_PATH,
                created_at=now,
                started_at=now,
            )
        )

    def previous_disk(self, vm_name: str, disk_index: int) -> Optional[BackupDisk]:
        """The incremental pre-check's row (BH:290-307): completed, change id not NULL."""
        found = self._completed_disks_of_vm(vm_name, disk_index)
        return found[0] if found else None

    def chain_parent(self, context_id: str, disk_index: int) -> BackupJob:
        """The per-disk row an incremental overlay is backed by (BE:294-309, LR:96)."""
        chain = next(
            (
                c
                for c in self.chains.values()
                if c.vm_context_id == context_id and c.disk_id == disk_index
            ),
            None,
        )
        if chain is None:
            raise PrepareError("failed to get backup chain for incremental: backup chain not found")
        if chain.latest_backup_id == "":
            raise PrepareError(
                "no parent backup found for incremental - full backup required first"
            )
        parent = self.job(chain.latest_backup_id)
        if parent is None:
            raise PrepareError(
                "failed to create backup in repository: parent backup not found: backup not found"
            )
        return parent

    def per_disk_id(self, vm_name: str, disk_index: int) -> str:
        """``backup-{vm}-disk{i}-{YYYYMMDD-HHMMSS}`` in local time (MD:163-166)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.now()))
        return f"backup-{vm_name}-disk{disk_index}-{stamp}"

    def insert_per_disk(
        self,
        job_id: str,
        context: BackupContext,
        vm_name: str,
        disk_index: int,
        backup_type: str,
        qcow2: str,
        parent_backup_id: Optional[str],
        total_bytes: int,
    ) -> BackupJob:
        """The per-disk row, ``pending`` (LR:139-155)."""
        return self._insert_job(
            BackupJob(
                id=job_id,
                vm_backup_context_id=context.context_id,
                vm_name=vm_name,
                backup_type=backup_type,
                status="pending",
                repository_path=qcow2,
                disk_id=disk_index,
                parent_backup_id=parent_backup_id,
                total_bytes=total_bytes,
                created_at=self.now(),
            )
        )

    def insert_disk(
        self,
        context: BackupContext,
        parent_id: str,
        disk_index: int,
        total_bytes: int,
        qcow2: Optional[str],
    ) -> Optional[BackupDisk]:
        """The ``backup_disks`` row (LR:167-199); the SHA only logs a failure."""
        if self.disk(parent_id, disk_index) is not None:
            self.log_problem(
                "backup_disks_insert_failed",
                parent_id,
                disk_index,
                f"Duplicate entry '{parent_id}-{disk_index}' for key 'uk_backup_disk'",
            )
            return None
        row = BackupDisk(
            id=self._next_disk_id,
            vm_backup_context_id=context.context_id,
            backup_job_id=parent_id,
            disk_index=disk_index,
            vmware_disk_key=2000 + disk_index,
            size_gb=(total_bytes + GiB - 1) // GiB,
            qcow2_path=qcow2,
            created_at=self.now(),
        )
        self._next_disk_id += 1
        self.disks.append(row)
        return row

    def delete_job(self, job_id: str) -> None:
        """``DELETE FROM backup_jobs WHERE id=?``, cascading to its ``backup_disks`` (M1008:71-72)."""
        job = self.job(job_id)
        if job is None:
            return
        del self.jobs[job.id]
        key = collate(job.id)
        self.disks = [d for d in self.disks if collate(d.backup_job_id) != key]

    def rows_only(
        self, job_id: str, vm_name: str, backup_type: str, disks: Iterable[tuple[int, int]]
    ) -> BackupJob:
        """A parent (running), ``backup_disks`` and per-disk rows (pending) for ``(disk_index, size_gb)``s.

        No files, ports or qemu-nbd: for tests that call the node directly.
        """
        context = self.context_for(vm_name)
        self._check_new_id(job_id)
        now = self.now()
        parent = self._insert_job(
            BackupJob(
                id=job_id,
                vm_backup_context_id=context.context_id,
                vm_name=vm_name,
                backup_type=backup_type,
                status="running",
                repository_path=PARENT_PATH,
                created_at=now,
                started_at=now,
            )
        )
        for disk_index, size_gb in disks:
            self.insert_disk(context, job_id, disk_index, size_gb * GiB, None)
            # The per-disk row too, so the all-completed branch finds it as for a
            # started job; without a file.  An id that does not fit is left out
            # (the branch then logs per_disk_row_not_found, as the SHA would).
            per_disk_id = self.per_disk_id(vm_name, disk_index)
            try:
                self.insert_per_disk(
                    per_disk_id, context, vm_name, disk_index, backup_type, "", None, size_gb * GiB
                )
            except DatabaseError:
                pass
        return parent

    # -- NBD ports (PA, §1.4) -------------------------------------------------------------------

    def allocate_port(
        self,
        job_key: str,
        vm_name: str,
        export: str,
        ports: range,
        usable: Callable[[int], bool] = lambda port: True,
    ) -> int:
        """The lowest port of ``ports`` not allocated (PA:55) and ``usable`` (the double's addition)."""
        for port in ports:
            if port not in self.allocations and usable(port):
                self.allocations[port] = PortAllocation(port, job_key, vm_name, export, self.now())
                return port
        raise PrepareError(
            f"failed to allocate NBD port: no available ports in range {ports.start}-{ports.stop - 1}"
        )

    def release_port(self, port: int) -> None:
        self.allocations.pop(port, None)

    def ports_for_backup_job(self, backup_id: str) -> list[int]:
        """PA:152-193: every port allocated for the VM name cut out of ``backup-{vm}-{ts}``."""
        vm_name = ""
        if len(backup_id.encode("utf-8", "surrogateescape")) > 7 and backup_id.startswith(
            "backup-"
        ):
            rest = backup_id[7:]
            last = rest.rfind("-")
            if last > 0:
                vm_name = rest[:last]
        if vm_name == "":
            return []
        return sorted(p for p, a in self.allocations.items() if a.vm_name == vm_name)

    # -- saving and showing --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every table, the chains with their VM and latest qcow2, allocations, counts, problems."""
        chains = []
        for chain in self.chains.values():
            row = _row_json(chain)
            context = self.contexts.get(chain.vm_context_id)
            latest = self.job(chain.latest_backup_id) if chain.latest_backup_id else None
            row["vm_name"] = context.vm_name if context is not None else None
            row["latest_qcow2"] = latest.repository_path if latest is not None else None
            chains.append(row)
        return {
            "backup_jobs": [_row_json(j) for j in self.jobs.values()],
            "backup_disks": [_row_json(d) for d in self.disks],
            "vm_backup_contexts": [_row_json(c) for c in self.contexts.values()],
            "backup_chains": chains,
            "port_allocations": [_row_json(a) for a in self.allocations.values()],
            "completion_branch_runs": dict(self.branch_runs),
            "problems": [_row_json(p) for p in self.problems],
            "replications": json.loads(json.dumps(self.replications)),
        }

    def to_json(self) -> dict[str, Any]:
        """What is saved: the tables, counts and problems; not the allocations (§1.4: memory only)."""
        saved = self.snapshot()
        del saved["port_allocations"]
        saved["next_disk_id"] = self._next_disk_id
        saved["seq"] = self._seq
        return saved

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], clock: Clock, file_size: FileSize = lambda path: 0
    ) -> ShaModel:
        model = cls(clock, file_size)
        for row in data.get("backup_jobs", []):
            job = _row_from_json(BackupJob, row)
            model.jobs[job.id] = job
        model.disks = [_row_from_json(BackupDisk, row) for row in data.get("backup_disks", [])]
        for row in data.get("vm_backup_contexts", []):
            context = _row_from_json(BackupContext, row)
            model.contexts[context.context_id] = context
        for row in data.get("backup_chains", []):
            chain = _row_from_json(Chain, row)
            model.chains[chain.id] = chain
        model.problems = [_row_from_json(Problem, row) for row in data.get("problems", [])]
        model.branch_runs = {
            str(k): int(v) for k, v in data.get("completion_branch_runs", {}).items()
        }
        model.replications = dict(data.get("replications", {}))
        model._next_disk_id = int(data.get("next_disk_id", len(model.disks) + 1))
        model._seq = int(data.get("seq", len(model.jobs)))
        return model


AnyRow = Union[BackupJob, BackupDisk, BackupContext, Chain, PortAllocation, Problem]
R = TypeVar("R", BackupJob, BackupDisk, BackupContext, Chain, PortAllocation, Problem)


def _row_json(row: AnyRow) -> dict[str, Any]:
    """A row as JSON: DECIMAL(5,2) columns as numbers."""
    out = asdict(row)
    for name, value in out.items():
        if isinstance(value, Decimal):
            out[name] = float(value)
    return out


def _row_from_json(cls: type[R], data: Mapping[str, Any]) -> R:
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    for name, value in values.items():
        if name == "progress_percent" and value is not None:
            values[name] = Decimal(repr(float(value))).quantize(CENT)
    return cls(**values)
