"""SQLite persistence of job records, run-time settings and the SHA's messages
(and the vCenter certificate pins operators store with ``sna-ctl vcenter trust``).

One small database under the state directory.  Writes are a few rows each
and go to a local disk, so they run on the reactor thread, in WAL mode with
``synchronous=NORMAL`` (a power cut may lose the last progress write, never
corrupt the file).  The schema is versioned with ``PRAGMA user_version``.

The SHA's messages (``sha_messages``) are what it must learn of ended jobs,
in order: written in the same transaction as the ended job's record, so a
completion can never be lost between the two, and kept, with how far each
got, as long as the job.

Whatever SQLite or the disk refuses (a full disk, a read-only directory) is
:class:`StoreError`, naming the database and the reason; the caller decides
what to keep in memory.  :meth:`SQLiteJobStore.storage_problem` says whether
the directory can take a write now.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Optional

import attrs
from twisted.python.filepath import FilePath
from zope.interface import Interface, classImplements, implementer

from sna.contract.disks import disk_indexes
from sna.jobs.model import Job, JobStatus
from sna.sbc.joblog import probe
from sna.sha.messages import Message

SCHEMA_VERSION = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    last_update TEXT NOT NULL,
    record      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Version 3: what the SHA must get about ended jobs (per-disk completions, then
-- the final state), in order, with how far each got.
CREATE TABLE IF NOT EXISTS sha_messages (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    path       TEXT NOT NULL,
    body       TEXT NOT NULL,
    disk_index INTEGER,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    reason     TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sha_messages_by_job ON sha_messages (job_id, seq);
-- Version 4: the vCenter certificates operators pinned (sna-ctl vcenter trust), by
-- vCenter host (lower case, IPv6 without brackets) and port.
CREATE TABLE IF NOT EXISTS vcenter_pins (
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL,
    thumbprint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (host, port)
);
-- Version 5: the node's enrollment with its hub (sna.enrollment), at most one row:
-- its state and record as JSON.  Never the pairing code.
CREATE TABLE IF NOT EXISTS enrollment (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    record     TEXT NOT NULL
);
-- Version 6: each replicated disk's last change ID, by vCenter, VM, VMware disk key
-- and target (host/export): where its next replication starts (sna.jobs.replication).
CREATE TABLE IF NOT EXISTS replication_chain (
    vcenter        TEXT NOT NULL,
    vm_path        TEXT NOT NULL,
    disk_key       TEXT NOT NULL,
    target         TEXT NOT NULL,
    change_id      TEXT NOT NULL,
    capacity_bytes INTEGER,
    job_id         TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (vcenter, vm_path, disk_key, target)
);
"""

#: The state of a message still to be sent; the others are final.
PENDING = "pending"
DELIVERED = "delivered"
#: The SHA answered that it never will take it (a 4xx).
REFUSED = "refused"
#: Telemetry of a job the SHA does not know (it answered 500 every time).
GIVEN_UP = "given_up"
#: Kept to say why it could not be made (a disk without a change ID); never sent.
NOT_SENT = "not_sent"


@attrs.frozen
class OutboxRow:
    """One message for the SHA and how far its delivery got."""

    seq: int
    job_id: str
    kind: str
    path: str
    body: str
    disk_index: Optional[int]
    state: str
    attempts: int
    reason: Optional[str]
    updated_at: str


class StoreError(Exception):
    """The database could not be read or written; the message names it and says why."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.message = message
        #: The disk (or the database's quota) is full: space may come back.
        self.full = full


def initial_state(message: Message) -> str:
    return PENDING if message.not_sent is None else NOT_SENT


class IJobStore(Interface):
    """Where job records, changed settings and the SHA's messages are kept between runs."""

    def save(job: Job, outbox: Sequence[Message] = ()) -> None:
        """Insert or replace the record of ``job.job_id`` and queue ``outbox`` with it,
        in one transaction: an ended job and what the SHA must learn of it go together."""

    def load_all() -> list[Job]:
        """Every stored job, oldest first."""

    def delete(job_ids: list[str]) -> None:
        """Forget these jobs and their messages."""

    def load_settings() -> dict[str, Any]:
        """The run-time settings changed through the API, by wire name."""

    def save_settings(values: dict[str, Any]) -> None:
        """Replace the stored run-time settings."""

    def outbox(job_id: Optional[str] = None) -> list[OutboxRow]:
        """The SHA's messages, of one job or of every job, in the order they were queued."""

    def outbox_update(seq: int, state: str, attempts: int, reason: Optional[str]) -> None:
        """Record how far one message got."""

    def outbox_counts() -> dict[str, int]:
        """How many messages are in each state."""

    def outbox_forget(job_id: str) -> None:
        """Drop ``job_id``'s messages (a new job of that id replaces its record)."""

    def close() -> None:
        """Release the database."""


class IStorageCheck(Interface):
    """A store that can tell whether it could write now."""

    def storage_problem() -> Optional[str]:
        """Why a write would fail now (the directory is full or read-only), or ``None``."""


@attrs.frozen
class PinRow:
    """One stored vCenter pin: the thumbprint is normalised, ``created_at`` RFC 3339."""

    host: str
    port: int
    thumbprint: str
    created_at: str


class IPinStore(Interface):
    """Where the vCenter certificate pins are kept between runs (:mod:`sna.vmware.pins`)."""

    def load_pins() -> list[PinRow]:
        """Every stored pin."""

    def save_pin(pin: PinRow) -> None:
        """Insert or replace the pin of ``pin.host`` and ``pin.port``."""

    def delete_pin(host: str, port: int) -> None:
        """Forget the pin of this vCenter, if there is one."""


class IEnrollmentStore(Interface):
    """Where the node's enrollment with its hub is kept between runs (:mod:`sna.enrollment`)."""

    def load_enrollment() -> Optional[dict[str, Any]]:
        """The stored enrollment record, or ``None``."""

    def save_enrollment(record: dict[str, Any]) -> None:
        """Store ``record`` (with its ``id`` and ``state``), replacing any other."""

    def delete_enrollment() -> None:
        """Forget the enrollment."""


#: SQLite's result code for "database or disk is full".
_SQLITE_FULL = 13


@implementer(IJobStore, IStorageCheck)
class SQLiteJobStore:
    def __init__(self, path: FilePath[str]) -> None:
        self._path = path
        self._db: Optional[sqlite3.Connection] = None

    @contextlib.contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """Raise what SQLite or the disk refuses as :class:`StoreError`."""
        try:
            yield
        except sqlite3.Error as e:
            full = getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL
            raise StoreError(f"cannot {doing} {self._path.path}: {e}", full) from e
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreError(f"cannot {doing} {self._path.path}: {e.strerror or e}", full) from e

    def storage_problem(self) -> Optional[str]:
        return probe(self._path.parent(), "the state directory")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                with self._failing("open the job database"):
                    self._db = self._open()
            except StoreError as e:
                # SQLite says "disk I/O error" when it cannot make the WAL's index on a
                # full disk: the directory says why.
                problem = self.storage_problem()
                if problem is None:
                    raise
                raise StoreError(f"{e.message} ({problem})", e.full) from e
        return self._db

    def _open(self) -> sqlite3.Connection:
        self._path.parent().makedirs(ignoreExistingDirectory=True)
        db = sqlite3.connect(self._path.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path.path} has schema version {version}, newer than this sna "
                    f"({SCHEMA_VERSION}); refusing to touch it"
                )
            if version < SCHEMA_VERSION:
                # Only an older database is written here: a current one opens on a
                # full disk, to be read, and written once there is room.
                db.executescript(_SCHEMA)
                with db:
                    db.execute("BEGIN")
                    if version == 2:
                        _outbox_from_version_2(db)
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def save(self, job: Job, outbox: Sequence[Message] = ()) -> None:
        with self._failing("write the job database"):
            self._save(job, outbox)

    def _save(self, job: Job, outbox: Sequence[Message]) -> None:
        db = self._conn()
        record = (
            job.job_id,
            job.status.value,
            job.started_at.isoformat(),
            job.last_update.isoformat(),
            json.dumps(job.to_record()),
        )
        sql = (
            "INSERT OR REPLACE INTO jobs (job_id, status, started_at, last_update, record)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        if not outbox:
            db.execute(sql, record)
            return
        now = _now()
        with db:
            db.execute("BEGIN")
            db.execute(sql, record)
            db.executemany(
                "INSERT INTO sha_messages"
                " (job_id, kind, path, body, disk_index, state, reason, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        job.job_id,
                        m.kind,
                        m.path,
                        m.body,
                        m.disk_index,
                        initial_state(m),
                        m.not_sent,
                        now,
                    )
                    for m in outbox
                ],
            )

    def load_all(self) -> list[Job]:
        with self._failing("read the job database"):
            rows = self._conn().execute("SELECT record FROM jobs ORDER BY started_at, job_id")
            return [Job.from_record(json.loads(record)) for (record,) in rows]

    def delete(self, job_ids: list[str]) -> None:
        with self._failing("write the job database"):
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])
                db.executemany("DELETE FROM sha_messages WHERE job_id = ?", [(j,) for j in job_ids])

    def count_by_status(self) -> dict[JobStatus, int]:
        with self._failing("read the job database"):
            rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            return {JobStatus(status): count for status, count in rows}

    def load_settings(self) -> dict[str, Any]:
        with self._failing("read the job database"):
            rows = self._conn().execute("SELECT key, value FROM settings")
            return {key: json.loads(value) for key, value in rows}

    def save_settings(self, values: dict[str, Any]) -> None:
        with self._failing("write the job database"):
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.execute("DELETE FROM settings")
                db.executemany(
                    "INSERT INTO settings (key, value) VALUES (?, ?)",
                    [(key, json.dumps(value)) for key, value in values.items()],
                )

    def outbox(self, job_id: Optional[str] = None) -> list[OutboxRow]:
        columns = ", ".join(field.name for field in attrs.fields(OutboxRow))
        with self._failing("read the job database"):
            if job_id is None:
                rows = self._conn().execute(f"SELECT {columns} FROM sha_messages ORDER BY seq")
            else:
                rows = self._conn().execute(
                    f"SELECT {columns} FROM sha_messages WHERE job_id = ? ORDER BY seq", (job_id,)
                )
            return [OutboxRow(*row) for row in rows]

    def outbox_update(self, seq: int, state: str, attempts: int, reason: Optional[str]) -> None:
        with self._failing("write the job database"):
            self._conn().execute(
                "UPDATE sha_messages SET state = ?, attempts = ?, reason = ?, updated_at = ?"
                " WHERE seq = ?",
                (state, attempts, reason, _now(), seq),
            )

    def outbox_counts(self) -> dict[str, int]:
        with self._failing("read the job database"):
            rows = self._conn().execute("SELECT state, COUNT(*) FROM sha_messages GROUP BY state")
            return {state: count for state, count in rows}

    def outbox_forget(self, job_id: str) -> None:
        with self._failing("write the job database"):
            self._conn().execute("DELETE FROM sha_messages WHERE job_id = ?", (job_id,))

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with self._failing("close the job database"):
                db.close()

    # -- the replication change-ID chain (IChainStore, sna.jobs.replication) ----

    def chain_rows(self, vcenter: str, vm_path: str) -> list[ChainRow]:
        with self._failing("read the job database"):
            rows = self._conn().execute(
                "SELECT vcenter, vm_path, disk_key, target, change_id, capacity_bytes, job_id,"
                " updated_at FROM replication_chain WHERE vcenter = ? AND vm_path = ?"
                " ORDER BY updated_at DESC, disk_key, target",
                (vcenter, vm_path),
            )
            return [ChainRow(*row) for row in rows]

    def chain_save(self, rows: Sequence[ChainRow]) -> None:
        with self._failing("write the job database"):
            db = self._conn()
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT OR REPLACE INTO replication_chain (vcenter, vm_path, disk_key,"
                    " target, change_id, capacity_bytes, job_id, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [attrs.astuple(row) for row in rows],
                )

    # -- vCenter pins (IPinStore) ------------------------------------------

    def load_pins(self) -> list[PinRow]:
        with self._failing("read the job database"):
            rows = self._conn().execute(
                "SELECT host, port, thumbprint, created_at FROM vcenter_pins ORDER BY host, port"
            )
            return [PinRow(*row) for row in rows]

    def save_pin(self, pin: PinRow) -> None:
        with self._failing("write the job database"):
            self._conn().execute(
                "INSERT OR REPLACE INTO vcenter_pins (host, port, thumbprint, created_at)"
                " VALUES (?, ?, ?, ?)",
                (pin.host, pin.port, pin.thumbprint, pin.created_at),
            )

    def delete_pin(self, host: str, port: int) -> None:
        with self._failing("write the job database"):
            self._conn().execute(
                "DELETE FROM vcenter_pins WHERE host = ? AND port = ?", (host, port)
            )

    # -- the enrollment with the hub (IEnrollmentStore) ------------------------

    def load_enrollment(self) -> Optional[dict[str, Any]]:
        with self._failing("read the job database"):
            row = (
                self._conn()
                .execute("SELECT record FROM enrollment ORDER BY updated_at DESC LIMIT 1")
                .fetchone()
            )
            return None if row is None else dict(json.loads(row[0]))

    def save_enrollment(self, record: dict[str, Any]) -> None:
        with self._failing("write the job database"):
            db = self._conn()
            with db:
                db.execute("BEGIN")
                # One enrollment at a time: a new one replaces any other.
                db.execute("DELETE FROM enrollment WHERE id != ?", (record["id"],))
                db.execute(
                    "INSERT OR REPLACE INTO enrollment (id, state, updated_at, record)"
                    " VALUES (?, ?, ?, ?)",
                    (record["id"], record["state"], _now(), json.dumps(record)),
                )

    def delete_enrollment(self) -> None:
        with self._failing("write the job database"):
            self._conn().execute("DELETE FROM enrollment")


classImplements(SQLiteJobStore, IPinStore)
classImplements(SQLiteJobStore, IEnrollmentStore)


# -- the replication change-ID chain (sna.jobs.replication) ---------------------


@attrs.frozen
class ChainRow:
    """A replicated disk's last change ID, and what it was taken for."""

    vcenter: str
    vm_path: str
    disk_key: str
    target: str
    change_id: str
    capacity_bytes: Optional[int]
    job_id: str
    updated_at: str


class IChainStore(Interface):
    """Where the replication change-ID chain is kept (:mod:`sna.jobs.replication`)."""

    def chain_rows(vcenter: str, vm_path: str) -> list[ChainRow]:
        """Every row of a VM, newest first."""

    def chain_save(rows: Sequence[ChainRow]) -> None:
        """Store ``rows`` in one transaction, each replacing the row of its key."""


classImplements(SQLiteJobStore, IChainStore)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _outbox_from_version_2(db: sqlite3.Connection) -> None:
    """Version 2 kept one final state per job (``sha_outbox``): queue each as version 3 does.

    Those bodies named disks by their key, while the SHA selects disk rows by
    index: each disk gets the SHA's index of its key (:mod:`sna.contract.disks`).
    """
    now = _now()
    old = db.execute("SELECT job_id, body FROM sha_outbox ORDER BY rowid").fetchall()
    for job_id, text in old:
        body = json.loads(text)
        disks = body.get("disks") or []
        indexes = disk_indexes(str(d.get("disk_key")) for d in disks)
        failed = body.get("status") != "completed"
        body["disks"] = [
            {
                "disk_index": indexes[str(d.get("disk_key"))],
                "bytes_transferred": int(d.get("bytes_transferred") or 0),
                "total_bytes": int(d.get("total_bytes") or 0),
                "status": "failed",
                "progress_percent": 0.0,
            }
            for d in disks
            if failed
        ]
        path = "/api/v1/telemetry/backup/" + urllib.parse.quote(job_id, safe="")
        db.execute(
            "INSERT INTO sha_messages (job_id, kind, path, body, state, updated_at)"
            " VALUES (?, 'telemetry', ?, ?, ?, ?)",
            (job_id, path, json.dumps(body, separators=(",", ":")), PENDING, now),
        )
    db.execute("DROP TABLE sha_outbox")
