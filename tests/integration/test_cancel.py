"""Cancelling a running backup: TERM, KILL after the grace period, the child reaped."""

from __future__ import annotations

import pytest

from tests.integration.harness import (
    Daemon,
    JobIds,
    backup_body,
    client_alive,
    reaped,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_cancel_running_job(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("hang")
    pid = sna.api.start(backup_body(job_id, vm="hang"))["pid"]
    sna.api.wait_progress(job_id)
    assert client_alive(pid, job_id)

    answer = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 202, answer
    assert answer.json()["job_id"] == job_id

    status = sna.api.wait_status(job_id, "cancelled", "failed", "completed", "interrupted")
    assert status["status"] == "cancelled", status
    assert status["exit_code"] == 143
    wait_for(lambda: reaped(pid, job_id), f"double pid {pid} to be reaped")
    assert "got SIGTERM" in sna.job_log(job_id).read_text()
    assert job_id in sna.api.job_ids("cancelled")
    assert sna.api.get(f"/api/v1/jobs/{job_id}/status").json()["status"] == "cancelled"

    again = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status == 409, again
    assert again.json()["error"] == "job_not_running"
    assert sna.api.status(job_id)["status"] == "cancelled"


def test_cancel_finished_job(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("done")
    sna.api.start(backup_body(job_id))
    assert sna.api.wait_status(job_id, "completed", "failed")["status"] == "completed"
    answer = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 409, answer
    body = answer.json()
    assert body["error"] == "job_not_running"
    assert job_id in body["message"]
    assert sna.api.status(job_id)["status"] == "completed"


def test_cancel_unknown_job(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("nosuch")
    answer = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 404, answer
    body = answer.json()
    assert body["error"] == "job_not_found"
    assert job_id in body["message"]
    assert sna.api.get(f"/api/v1/status/{job_id}").status == 404
    assert sna.api.get(f"/api/v1/jobs/{job_id}/status").status == 404
    assert sna.api.get(f"/api/v1/progress/{job_id}").status == 404


def test_cancel_stubborn_client_is_killed(sna: Daemon, job_ids: JobIds) -> None:
    """A client that ignores SIGTERM gets SIGKILL after --kill-grace."""
    job_id = job_ids("stubborn")
    pid = sna.api.start(backup_body(job_id, vm="stubborn"))["pid"]
    sna.api.wait_progress(job_id)

    answer = sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert answer.status == 202, answer
    status = sna.api.wait_status(job_id, "cancelled", "failed", "completed", "interrupted")
    assert status["status"] == "cancelled", status
    assert status["exit_signal"] == 9
    assert status["exit_code"] is None
    wait_for(lambda: reaped(pid, job_id), f"double pid {pid} to be reaped")
    assert "got SIGTERM" not in sna.job_log(job_id).read_text()
    assert "ignored TERM; sending KILL" in sna.output()
