"""The SQLite store, on a real database file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from twisted.python.filepath import FilePath

from sna.jobs.model import JobStatus
from sna.jobs.store import SCHEMA_VERSION, SQLiteJobStore
from tests.unit.test_model import T0, make_job


def test_jobs_and_settings_survive_reopening(tmp_path: Path) -> None:
    path = FilePath(str(tmp_path)).child("state").child("sna.sqlite")
    store = SQLiteJobStore(path)
    running = make_job()
    done = make_job().ended(T0, 0, None, None)
    store.save(running)
    store.save(done)  # same job id: replaces
    store.save_settings({"max_jobs": 2})
    store.close()
    again = SQLiteJobStore(path)
    assert again.load_all() == [done]
    assert again.count_by_status() == {JobStatus.COMPLETED: 1}
    assert again.load_settings() == {"max_jobs": 2}
    again.close()


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this sna"):
        SQLiteJobStore(FilePath(str(path))).load_all()


def test_the_sha_outbox_survives_reopening(tmp_path: Path) -> None:
    path = FilePath(str(tmp_path)).child("sna.sqlite")
    store = SQLiteJobStore(path)
    store.outbox_put("j1", '{"status":"failed"}')
    store.outbox_put("j2", '{"status":"completed"}')
    store.outbox_put("j1", '{"status":"completed"}')  # replaces
    store.outbox_remove("j2")
    store.outbox_remove("never-there")
    store.close()
    again = SQLiteJobStore(path)
    assert again.outbox_all() == [("j1", '{"status":"completed"}')]
    again.close()


def test_a_version_1_database_gets_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " started_at TEXT NOT NULL, last_update TEXT NOT NULL, record TEXT NOT NULL);"
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "PRAGMA user_version=1;"
    )
    db.close()
    store = SQLiteJobStore(FilePath(str(path)))
    store.save(make_job())
    store.outbox_put("j1", "{}")
    assert store.outbox_all() == [("j1", "{}")]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()
