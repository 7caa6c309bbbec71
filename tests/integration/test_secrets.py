"""The vCenter password: into the client's environment, never anywhere else.

Except for the legacy Go client, which reads it nowhere but argv (documented).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sna.contract.argv import PASSWORD_ENV
from sna.sbc.command import PASSED_ENV
from tests.integration.harness import (
    Daemon,
    JobIds,
    backup_body,
    cmdline,
    double_invocation,
    job_of,
    reaped,
    wait_for,
)

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]


def new_password() -> str:
    return f"Pw-{uuid.uuid4().hex}"


def every_answer(daemon: Daemon, job_id: str) -> list[str]:
    """Every API answer that is about ``job_id`` or lists it."""
    paths = [
        f"/api/v1/status/{job_id}",
        f"/api/v1/jobs/{job_id}/status",
        f"/api/v1/progress/{job_id}",
        "/api/v1/jobs",
        "/api/v1/health",
        "/api/v1/config",
    ]
    answers = []
    for path in paths:
        answer = daemon.api.get(path)
        assert answer.status == 200, (path, answer)
        answers.append(answer.text)
    return answers


def state_files(daemon: Daemon) -> list[Path]:
    return [p for p in daemon.state_dir.rglob("*") if p.is_file()]


#: What a client may find in its environment: what the daemon passes on, the job
#: id, the password (ours only), and what Python adds by itself (PEP 538).
CLIENT_ENV = {*PASSED_ENV, PASSWORD_ENV, "MIGRATEKIT_JOB_ID", "LC_CTYPE"}
#: Set in the daemon's own environment; it must not reach any client.
CANARY = "SNA_IT_DAEMON_ONLY_TOKEN"


def test_password_goes_to_env_only(daemon_factory: DaemonFactory, job_ids: JobIds) -> None:
    daemon = daemon_factory(env={CANARY: "daemon-only"})
    password = new_password()
    job_id = job_ids("hang")
    start = daemon.api.post(
        "/api/v1/backup/start", backup_body(job_id, vm="hang", password=password)
    )
    assert start.status == 200, start
    assert password not in start.text
    pid = start.json()["pid"]
    daemon.api.wait_progress(job_id)

    argv = cmdline(pid)
    assert argv, "the double should be running"
    assert job_of(pid) == job_id
    assert password not in "\0".join(argv)
    assert "--vmware-password" not in argv
    for answer in every_answer(daemon, job_id):
        assert password not in answer

    assert daemon.api.post(f"/api/v1/jobs/{job_id}/cancel").status == 202
    daemon.api.wait_status(job_id, "cancelled")
    wait_for(lambda: reaped(pid, job_id), f"double {pid} to be reaped")

    # A job that runs to the end, and one that fails, with the same password.
    done_id, failed_id = job_ids("ok"), job_ids("fail")
    daemon.api.start(backup_body(done_id, password=password))
    daemon.api.start(backup_body(failed_id, vm="fail", password=password))
    assert daemon.api.wait_status(done_id, "completed", "failed")["status"] == "completed"
    assert daemon.api.wait_status(failed_id, "completed", "failed")["status"] == "failed"

    log_text = daemon.job_log(job_id).read_text()
    invocation = double_invocation(log_text)
    assert invocation["password_in_env"] is True
    assert invocation["env"]["MIGRATEKIT_JOB_ID"] == job_id
    assert "password_in_env=true" in log_text
    # The daemon's own environment is not handed down wholesale (the Go SNA did).
    assert CANARY not in invocation["env"]
    assert set(invocation["env"]) <= CLIENT_ENV, set(invocation["env"]) - CLIENT_ENV

    for some_id in (job_id, done_id, failed_id):
        assert password not in daemon.job_log(some_id).read_text()
        for answer in every_answer(daemon, some_id):
            assert password not in answer
    daemon.stop()
    output = daemon.output()
    assert "backup/start" in output, "the twistd log should hold the access log"
    assert password not in output
    # Nor in the job database (the records, the settings, the WAL).
    assert state_files(daemon)
    for path in state_files(daemon):
        assert password.encode() not in path.read_bytes(), path


def test_legacy_client_gets_password_on_argv(
    daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    daemon = daemon_factory("legacy", extra=("--sbc-legacy",))
    password = new_password()
    job_id = job_ids("hang")
    pid = daemon.api.start(backup_body(job_id, vm="hang", password=password))["pid"]
    wait_for(lambda: "stalled" in daemon.job_log(job_id).read_text(), "the legacy double to stall")

    argv = cmdline(pid)
    assert f"--vmware-password={password}" in argv
    invocation = double_invocation(daemon.job_log(job_id).read_text())
    assert invocation["password_in_env"] is False
    assert invocation["env"]["MIGRATEKIT_JOB_ID"] == job_id
    assert daemon.api.post(f"/api/v1/jobs/{job_id}/cancel").status == 202
    daemon.api.wait_status(job_id, "cancelled")

    # Still never in our own logs or answers: the launch line masks it.
    assert password not in daemon.job_log(job_id).read_text()
    assert "--vmware-password" in daemon.job_log(job_id).read_text()
    for answer in every_answer(daemon, job_id):
        assert password not in answer
    assert password not in daemon.output()


def test_legacy_client_output_yields_change_ids(
    daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    daemon = daemon_factory("legacy", extra=("--sbc-legacy",))
    job_id = job_ids("legacy")
    daemon.api.start(backup_body(job_id, vm="legacy", disks=2))
    status = daemon.api.wait_status(job_id, "completed", "failed", "cancelled", "interrupted")
    assert status["status"] == "completed", status
    assert status["exit_code"] == 0

    # What the Go client logged as stored, disk by disk, in order.
    stored = [
        line.rsplit("Stored ChangeID in database: ", 1)[1].strip()
        for line in daemon.job_log(job_id).read_text().splitlines()
        if "Stored ChangeID in database: " in line
    ]
    assert len(stored) == 2 and len(set(stored)) == 2
    disks = {d["disk_key"]: d for d in status["disks"]}
    assert set(disks) == {"2000", "2001"}
    assert disks["2000"]["change_id"] == stored[0]
    assert disks["2001"]["change_id"] == stored[1]
    assert all(d["status"] == "completed" for d in disks.values())
    assert all(d["sync_type"] == "full" for d in disks.values())
    assert status["progress_percent"] == 100
