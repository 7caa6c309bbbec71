"""The daemon's own life: stopping, dying, restarting, settings, startup errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sna import __version__ as SNA_VERSION
from tests.integration.harness import (
    DOUBLE,
    KILL_GRACE,
    START_DEADLINE,
    Daemon,
    JobIds,
    backup_body,
    client_alive,
    cmdline,
    reaped,
    twistd_command,
    wait_for,
)

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]


def test_sigterm_stops_clients_and_marks_jobs_interrupted(
    daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    daemon = daemon_factory()
    job_id = job_ids("hang")
    pid = daemon.api.start(backup_body(job_id, vm="hang"))["pid"]
    daemon.api.wait_progress(job_id)

    # twistd re-raises the signal it stopped on, so -SIGTERM is a clean exit.
    assert daemon.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "sna stopped" in daemon.output()
    # The daemon waited for its child: gone and reaped before twistd exited.
    assert reaped(pid, job_id)
    log_text = daemon.job_log(job_id).read_text()
    assert "got SIGTERM" in log_text
    assert "process ended: exit_code=143" in log_text

    daemon.start()
    status = daemon.api.status(job_id)
    assert status["status"] == "interrupted", status
    assert status["exit_code"] == 143
    assert status["end_time"] is not None
    assert job_id in daemon.api.job_ids("interrupted")
    assert daemon.api.job_ids("running") == []
    assert daemon.api.get(f"/api/v1/jobs/{job_id}/status").json()["status"] == "interrupted"


@pytest.mark.parametrize(("mode", "spare"), [("hang", False), ("stubborn", False), ("hang", True)])
def test_sigkill_leaves_client_that_restart_terminates(
    daemon_factory: DaemonFactory, job_ids: JobIds, mode: str, spare: bool
) -> None:
    daemon = daemon_factory(extra=() if spare else ("--spare-clients", "0"))
    job_id = job_ids(mode)
    if spare:
        daemon.api.wait_spare_ready()
    pid = daemon.api.start(backup_body(job_id, vm=mode))["pid"]
    daemon.api.wait_progress(job_id)
    # A spare's argv names no job; the job's record keeps its --spare-id instead.
    assert ("standby" in cmdline(pid)) is spare

    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    # Nobody told the client: it outlives the daemon.
    assert client_alive(pid, job_id)

    daemon.start()
    status = daemon.api.status(job_id)
    assert status["status"] == "interrupted", status
    assert status["error"]
    assert daemon.api.job_ids("running") == []
    # The new daemon finds the leftover by its pid and --job-id (or --spare-id) and stops it
    # (TERM, and KILL after the grace period for the stubborn one).
    wait_for(
        lambda: not client_alive(pid, job_id),
        f"leftover {mode} client {pid} to be terminated",
        deadline=KILL_GRACE + 15,
    )
    assert "terminating leftover backup client" in daemon.output()
    # The daemon stays usable afterwards.
    assert daemon.api.get("/api/v1/health").status == 200


def test_a_spare_takes_the_job_over_its_stdin(
    daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    """The job goes to the ready spare: no password in its argv or environment, and a
    new spare replaces it; its output and exit are the job's as with a spawned client."""
    daemon = daemon_factory()
    daemon.api.wait_spare_ready()
    job_id = job_ids("hang")
    password = "Pw-spare-" + job_id
    pid = daemon.api.start(backup_body(job_id, vm="hang", password=password))["pid"]
    daemon.api.wait_progress(job_id)
    argv = cmdline(pid)
    assert argv[-3:-1] == ["standby", "--spare-id"], argv
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert password.encode() not in environ
    assert b"MIGRATEKIT_JOB_ID" not in environ, "started before any job"
    log_text = daemon.job_log(job_id).read_text()
    assert f"in spare client pid {pid}" in log_text
    assert password not in log_text
    daemon.api.wait_spare_ready()  # the replacement

    assert daemon.api.post(f"/api/v1/jobs/{job_id}/cancel").status == 202
    status = daemon.api.wait_status(job_id, "cancelled")
    assert status["exit_code"] == 143
    wait_for(lambda: reaped(pid, job_id), f"spare {pid} to be reaped")

    # Jobs one after another each get a ready spare, and complete.
    for n in range(2):
        daemon.api.wait_spare_ready()
        done = job_ids(f"ok{n}")
        daemon.api.start(backup_body(done))
        assert daemon.api.wait_status(done, "completed", "failed")["status"] == "completed"
        assert " in spare client pid " in daemon.job_log(done).read_text()

    # Stopping the daemon ends its idle spare too.
    spares = [p for p in _children_of(daemon) if "standby" in cmdline(p)]
    assert spares
    daemon.stop()
    for spare in spares:
        wait_for(lambda spare=spare: not cmdline(spare), f"idle spare {spare} to exit")


def test_a_client_without_standby_still_runs_jobs(
    daemon_factory: DaemonFactory, job_ids: JobIds, tmp_path: Path
) -> None:
    """A --sbc that does not know `standby` fails as a spare; jobs start their own client."""
    wrapper = tmp_path / "old-client"
    wrapper.write_text(
        f"#!/bin/sh\n[ \"$1\" = standby ] && {{ echo 'unknown command' >&2; exit 2; }}\n"
        f'exec {sys.executable} {DOUBLE} "$@"\n'
    )
    wrapper.chmod(0o755)
    daemon = daemon_factory(sbc=str(wrapper))
    wait_for(
        lambda: "exited before it was ready" in daemon.output(), "the spare to fail", deadline=10
    )
    job_id = job_ids("ok")
    daemon.api.start(backup_body(job_id))
    assert daemon.api.wait_status(job_id, "completed", "failed")["status"] == "completed"
    assert " sna starting " in daemon.job_log(job_id).read_text()
    assert "unknown command" in daemon.output()


def _children_of(daemon: Daemon) -> list[int]:
    assert daemon.process is not None
    try:
        text = Path(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_missing_client(daemon_factory: DaemonFactory, job_ids: JobIds) -> None:
    daemon = daemon_factory(sbc="/nonexistent/sbc")
    job_id = job_ids("nosbc")
    answer = daemon.api.post("/api/v1/backup/start", backup_body(job_id))
    assert answer.status == 500, answer
    body = answer.json()
    assert body["error"] == "backup_client_unavailable"
    assert "/nonexistent/sbc" in body["message"]
    assert "does not exist" in body["message"]
    assert daemon.api.jobs()["jobs"] == []
    assert daemon.api.get(f"/api/v1/status/{job_id}").status == 404
    assert daemon.job_logs() == set()
    assert daemon.api.get("/api/v1/health").json()["jobs"]["running"] == 0


def test_health(sna: Daemon) -> None:
    first = sna.api.get("/api/v1/health")
    assert first.status == 200
    body = first.json()
    assert body["status"] == "healthy"
    assert body["version"] == SNA_VERSION
    assert isinstance(body["uptime_seconds"], (int, float))
    assert body["uptime_seconds"] >= 0
    assert set(body["jobs"]) >= {"running", "completed", "failed", "cancelled", "interrupted"}
    listed = sna.api.jobs()["jobs"]
    for status, count in body["jobs"].items():
        assert count == sum(1 for job in listed if job["status"] == status), status
    assert body["running_jobs"] == body["jobs"]["running"]

    def grown() -> bool:
        later = sna.api.get("/api/v1/health").json()
        return bool(later["uptime_seconds"] > body["uptime_seconds"])

    wait_for(grown, "uptime_seconds to grow")


def test_config_applies_and_persists(daemon_factory: DaemonFactory, job_ids: JobIds) -> None:
    daemon = daemon_factory()
    initial = daemon.api.get("/api/v1/config")
    assert initial.status == 200
    assert initial.json()["config"]["max_jobs"] == 8

    answer = daemon.api.request("PUT", "/api/v1/config", {"max_jobs": 1})
    assert answer.status == 200, answer
    assert answer.json()["config"]["max_jobs"] == 1
    assert daemon.api.get("/api/v1/config").json()["config"]["max_jobs"] == 1
    assert daemon.api.get("/api/v1/health").json()["max_jobs"] == 1

    first = job_ids("first")
    daemon.api.start(backup_body(first, vm="hang"))
    second = job_ids("second")
    refused = daemon.api.post("/api/v1/backup/start", backup_body(second, vm="hang"))
    assert refused.status == 503, refused
    assert refused.json()["error"] == "too_many_jobs"
    assert daemon.api.get(f"/api/v1/status/{second}").status == 404

    unknown = daemon.api.request("PUT", "/api/v1/config", {"max_jobz": 3})
    assert unknown.status == 400, unknown
    assert unknown.json()["error"] == "invalid_config"
    assert "max_jobz" in unknown.json()["message"]
    bad = daemon.api.request("PUT", "/api/v1/config", {"max_jobs": 0})
    assert bad.status == 400, bad
    assert "max_jobs" in bad.json()["message"]
    assert daemon.api.get("/api/v1/config").json()["config"]["max_jobs"] == 1

    assert daemon.api.post(f"/api/v1/jobs/{first}/cancel").status == 202
    daemon.api.wait_status(first, "cancelled")
    daemon.restart()
    assert daemon.api.get("/api/v1/config").json()["config"]["max_jobs"] == 1
    assert daemon.api.get("/api/v1/health").json()["max_jobs"] == 1


def test_help_from_any_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [*twistd_command(), "-n", "sna", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--listen",
        "--state-dir",
        "--log-dir",
        "--sbc",
        "--nbd-ports",
        "--nbd-hosts",
        "--max-jobs",
        "--kill-grace",
        "--sbc-legacy",
    ):
        assert option in result.stdout, option


def test_port_in_use_stops_startup(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(tmp_path / "sna")
        process = subprocess.Popen(
            daemon.argv(port),
            cwd=daemon.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = process.communicate(timeout=START_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"twistd kept running with its port taken:\n{output}")
    assert process.returncode != 0, output
    assert str(port) in output
    assert "Address already in use" in output or "Couldn't listen" in output, output


def test_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*twistd_command(), "-n", "--pidfile=", "sna", "--nbd-ports", "200-100"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_DEADLINE,
    )
    assert result.returncode != 0
    assert "nbd-ports" in result.stdout + result.stderr
