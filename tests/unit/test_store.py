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
