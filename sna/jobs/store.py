"""SQLite persistence of job records and run-time settings.

One small database under the state directory.  Writes are a single row each
and go to a local disk, so they run on the reactor thread, in WAL mode with
``synchronous=NORMAL`` (a power cut may lose the last progress write, never
corrupt the file).  The schema is versioned with ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Optional

from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

from sna.jobs.model import Job, JobStatus

SCHEMA_VERSION = 2

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
-- Version 2: final states the SHA has not taken yet, re-sent after a restart.
CREATE TABLE IF NOT EXISTS sha_outbox (
    job_id TEXT PRIMARY KEY,
    body   TEXT NOT NULL
);
"""


class IJobStore(Interface):
    """Where job records and changed settings are kept between runs."""

    def save(job: Job) -> None:
        """Insert or replace the record of ``job.job_id``."""

    def load_all() -> list[Job]:
        """Every stored job, oldest first."""

    def delete(job_ids: list[str]) -> None:
        """Forget these jobs."""

    def load_settings() -> dict[str, Any]:
        """The run-time settings changed through the API, by wire name."""

    def save_settings(values: dict[str, Any]) -> None:
        """Replace the stored run-time settings."""

    def outbox_put(job_id: str, body: str) -> None:
        """Keep ``body`` (a job's final state for the SHA) until it is taken."""

    def outbox_remove(job_id: str) -> None:
        """The SHA took (or refused for good) the final state of ``job_id``."""

    def outbox_all() -> list[tuple[str, str]]:
        """Every final state not taken yet: (job_id, body)."""

    def close() -> None:
        """Release the database."""


@implementer(IJobStore)
class SQLiteJobStore:
    def __init__(self, path: FilePath[str]) -> None:
        self._path = path
        self._db: Optional[sqlite3.Connection] = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent().makedirs(ignoreExistingDirectory=True)
            db = sqlite3.connect(self._path.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                db.close()
                raise RuntimeError(
                    f"{self._path.path} has schema version {version}, newer than this sna "
                    f"({SCHEMA_VERSION}); refusing to touch it"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db = db
        return self._db

    def save(self, job: Job) -> None:
        self._conn().execute(
            "INSERT OR REPLACE INTO jobs (job_id, status, started_at, last_update, record)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                job.job_id,
                job.status.value,
                job.started_at.isoformat(),
                job.last_update.isoformat(),
                json.dumps(job.to_record()),
            ),
        )

    def load_all(self) -> list[Job]:
        rows = self._conn().execute("SELECT record FROM jobs ORDER BY started_at, job_id")
        return [Job.from_record(json.loads(record)) for (record,) in rows]

    def delete(self, job_ids: list[str]) -> None:
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])

    def count_by_status(self) -> dict[JobStatus, int]:
        rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {JobStatus(status): count for status, count in rows}

    def load_settings(self) -> dict[str, Any]:
        rows = self._conn().execute("SELECT key, value FROM settings")
        return {key: json.loads(value) for key, value in rows}

    def save_settings(self, values: dict[str, Any]) -> None:
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.execute("DELETE FROM settings")
            db.executemany(
                "INSERT INTO settings (key, value) VALUES (?, ?)",
                [(key, json.dumps(value)) for key, value in values.items()],
            )

    def outbox_put(self, job_id: str, body: str) -> None:
        self._conn().execute(
            "INSERT OR REPLACE INTO sha_outbox (job_id, body) VALUES (?, ?)", (job_id, body)
        )

    def outbox_remove(self, job_id: str) -> None:
        self._conn().execute("DELETE FROM sha_outbox WHERE job_id = ?", (job_id,))

    def outbox_all(self) -> list[tuple[str, str]]:
        rows = self._conn().execute("SELECT job_id, body FROM sha_outbox ORDER BY rowid")
        return [(job_id, body) for job_id, body in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
