"""The SQLite store, on a real database file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import attrs
import pytest
from twisted.python.filepath import FilePath

from sna.jobs.model import JobStatus
from sna.jobs.store import SCHEMA_VERSION, SQLiteJobStore, StoreError
from sna.sha.messages import Message
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


def test_an_ended_job_and_its_messages_are_one_write(tmp_path: Path) -> None:
    path = FilePath(str(tmp_path)).child("sna.sqlite")
    store = SQLiteJobStore(path)
    job = make_job().ended(T0, 0, None, None)
    messages = [
        Message("complete", "/api/v1/backups/j1/complete", '{"disk_id":0}', disk_index=0),
        Message("complete", "/api/v1/backups/j1/complete", "", not_sent="no change ID"),
        Message("telemetry", "/api/v1/telemetry/backup/j1", '{"status":"completed"}'),
    ]
    store.save(job, messages)
    first = store.outbox("j1")[0]
    store.outbox_update(first.seq, "delivered", 2, None)
    store.close()
    again = SQLiteJobStore(path)
    assert again.load_all() == [job]
    rows = again.outbox()
    assert [(r.kind, r.disk_index, r.state, r.attempts, r.reason) for r in rows] == [
        ("complete", 0, "delivered", 2, None),
        ("complete", None, "not_sent", 0, "no change ID"),
        ("telemetry", None, "pending", 0, None),
    ]
    assert again.outbox("other") == []
    assert again.outbox_counts() == {"delivered": 1, "not_sent": 1, "pending": 1}
    again.delete(["j1"])
    assert again.outbox() == [] and again.load_all() == []
    again.close()


def test_a_failing_message_write_loses_the_ended_record_too(tmp_path: Path) -> None:
    """One transaction: never an ended job whose messages to the SHA are missing."""
    store = SQLiteJobStore(FilePath(str(tmp_path)).child("sna.sqlite"))
    running = make_job()
    store.save(running)
    bad = Message("complete", "/p", "{}", disk_index=0)
    with pytest.raises(StoreError, match="NOT NULL constraint failed"):
        store.save(running.ended(T0, 0, None, None), [bad, attrs.evolve(bad, kind=None)])  # type: ignore[arg-type]
    assert store.load_all() == [running] and store.outbox() == []
    store.close()


def test_a_version_2_database_keeps_its_undelivered_final_states(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " started_at TEXT NOT NULL, last_update TEXT NOT NULL, record TEXT NOT NULL);"
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE sha_outbox (job_id TEXT PRIMARY KEY, body TEXT NOT NULL);"
        "PRAGMA user_version=2;"
    )
    old = {
        "job_id": "backup-a b-1",
        "status": "failed",
        "disks": [
            {"disk_key": "2001", "bytes_transferred": 5, "change_id": None},
            {"disk_key": "2000", "bytes_transferred": 7, "change_id": None},
        ],
        "error": {"message": "x", "code": "failed"},
    }
    db.execute("INSERT INTO sha_outbox VALUES (?, ?)", ("backup-a b-1", json.dumps(old)))
    db.commit()
    db.close()
    store = SQLiteJobStore(FilePath(str(path)))
    [row] = store.outbox()
    assert (row.job_id, row.kind, row.state) == ("backup-a b-1", "telemetry", "pending")
    assert row.path == "/api/v1/telemetry/backup/backup-a%20b-1"
    body = json.loads(row.body)
    # The SHA selects disk rows by index: each disk gets its own.
    assert [(d["disk_index"], d["bytes_transferred"]) for d in body["disks"]] == [(1, 5), (0, 7)]
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "sha_outbox" not in tables
    db.close()


def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
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
    job = make_job().ended(T0, 1, None, None)
    store.save(job, [Message("telemetry", "/p", "{}")])
    assert [r.path for r in store.outbox()] == ["/p"]
    store.close()
