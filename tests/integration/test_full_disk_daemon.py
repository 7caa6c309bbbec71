"""Storage runs out under a real ``twistd -n sna``: its state and log directories each on a
small filesystem the test fills, or makes read-only.

What an operator sees: ``/health`` says ``degraded`` and why while a directory cannot be
written; ``backup/start`` answers ``503 storage_unavailable`` and starts nothing (no
process, no spare used up); a job that was running when the disk filled ends as it
really ended, with its change IDs, and is written, and told to the SHA, once there is
room; cancel and SIGTERM work throughout; a read-only state directory stops the daemon
with one line.  The same faults in process, with a Clock: ``test_full_disk.py``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    START_DEADLINE,
    Daemon,
    JobIds,
    backup_body,
    cmdline,
    reaped,
    wait_for,
)
from tests.integration.smallfs import fill, make_read_only, small_filesystem
from tests.sbc_double import CHANGE_ID_PREFIX, gate_path
from tests.shadouble.client import ShaDouble
from tests.shadouble.fixtures import sha_double_fixture

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]

sha = sha_double_fixture()


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The state and log directories of the daemon named ``sna``, on small filesystems.

    Requested before ``daemon_factory``, so they are unmounted after its daemons stop.
    """
    root = tmp_path / "sna"
    with small_filesystem(root / "state") as state, small_filesystem(root / "log") as log:
        yield state, log


@pytest.fixture
def gates(job_ids: JobIds) -> Iterator[Callable[[str], Path]]:
    """The gate files of ``gate`` doubles, removed at the end."""
    made: list[Path] = []

    def gate(job_id: str) -> Path:
        made.append(gate_path(job_id))
        return made[-1]

    yield gate
    for path in made:
        path.unlink(missing_ok=True)


def health(daemon: Daemon) -> dict[str, Any]:
    answer = daemon.api.get("/api/v1/health")
    assert answer.status == 200, answer
    body: dict[str, Any] = answer.json()
    return body


def spare_clients(daemon: Daemon) -> list[int]:
    """Pids of the daemon's children that are spare clients (``standby`` in their argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == daemon.pid and "standby" in cmdline(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def change_ids(status: dict[str, Any]) -> dict[str, str]:
    return {d["target_key"]: d["change_id"] for d in status["disks"]}


def refused_for_storage(daemon: Daemon, body: dict[str, Any], where: Path) -> str:
    answer = daemon.api.post("/api/v1/backup/start", body)
    assert answer.status == 503, answer
    error = answer.json()
    assert error["error"] == "storage_unavailable", error
    assert str(where) in error["message"], error
    message: str = error["message"]
    return message


def test_a_full_log_disk_refuses_starts_and_uses_no_spare(
    mounted: tuple[Path, Path], daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    _, log = mounted
    daemon = daemon_factory()
    daemon.api.wait_spare_ready()
    spares = spare_clients(daemon)
    assert len(spares) == 1
    filler = fill(log)
    tried = [job_ids("ok") for _ in range(5)]
    for job_id in tried:
        message = refused_for_storage(daemon, backup_body(job_id), log)
        assert "No space left on device" in message
    assert spare_clients(daemon) == spares, "the same spare, still waiting: none leaked"
    assert not daemon.job_logs()
    for job_id in tried:
        assert daemon.api.get(f"/api/v1/status/{job_id}").status == 404
    state = health(daemon)
    assert state["status"] == "degraded"
    assert str(log) in state["reason"] and "No space left on device" in state["reason"]

    filler.unlink()
    wait_for(lambda: health(daemon)["status"] == "healthy", "sna to be healthy again")
    done = job_ids("ok")
    started = daemon.api.start(backup_body(done))
    assert started["pid"] == spares[0], "the spare that waited takes the job"
    assert daemon.api.wait_status(done, "completed", "failed")["status"] == "completed"


def test_a_full_state_disk_refuses_starts_and_health_says_why(
    mounted: tuple[Path, Path], daemon_factory: DaemonFactory, job_ids: JobIds
) -> None:
    state, _ = mounted
    daemon = daemon_factory(extra=("--spare-clients", "0"))
    filler = fill(state)
    job_id = job_ids("ok")
    refused_for_storage(daemon, backup_body(job_id), state)
    assert daemon.api.get(f"/api/v1/status/{job_id}").status == 404
    assert not daemon.job_logs()
    answer = health(daemon)
    assert answer["status"] == "degraded" and str(state) in answer["reason"]
    # A full disk is no reason not to start: sna starts, and says it.
    daemon.restart()
    assert health(daemon)["status"] == "degraded"
    refused_for_storage(daemon, backup_body(job_id), state)

    filler.unlink()
    wait_for(lambda: health(daemon)["status"] == "healthy", "sna to be healthy again")
    daemon.api.start(backup_body(job_id))
    assert daemon.api.wait_status(job_id, "completed", "failed")["status"] == "completed"


def test_a_state_disk_that_fills_mid_job_loses_nothing_it_can_write_later(
    mounted: tuple[Path, Path],
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    gates: Callable[[str], Path],
    sha: ShaDouble,
) -> None:
    state, _ = mounted
    daemon = daemon_factory(extra=("--sha-url", sha.url))
    job_id, stuck = job_ids("gate"), job_ids("hang")
    sha.jobs(
        job_id, "gate", disks=({"disk_index": 0, "size_gb": 1}, {"disk_index": 1, "size_gb": 1})
    )
    daemon.api.start(backup_body(job_id, vm="gate", disks=2))
    hanging = daemon.api.start(backup_body(stuck, vm="hang"))["pid"]
    daemon.api.wait_progress(job_id)
    daemon.api.wait_progress(stuck)

    filler = fill(state)
    gates(job_id).touch()
    status = daemon.api.wait_status(job_id, "completed", "failed")
    assert status["status"] == "completed", status
    assert status["exit_code"] == 0
    ids = change_ids(status)
    assert set(ids) == {"2000", "2001"} and all(
        i.startswith(CHANGE_ID_PREFIX) for i in ids.values()
    )
    answer = health(daemon)
    assert answer["status"] == "degraded"
    assert "database or disk is full" in answer["reason"], answer
    # Cancel still stops a client; a start is still refused, and starts nothing.
    assert daemon.api.post(f"/api/v1/jobs/{stuck}/cancel").status == 202
    assert daemon.api.wait_status(stuck, "cancelled")["status"] == "cancelled"
    wait_for(lambda: reaped(hanging, stuck), "the cancelled client to be reaped")
    refused_for_storage(daemon, backup_body(job_ids("ok")), state)
    assert sha.requests(f"/api/v1/backups/{job_id}/complete") == [], "not before it is stored"

    filler.unlink()
    wait_for(lambda: health(daemon)["status"] == "healthy", "the records to be written")
    completions = wait_for(
        lambda: (
            [r for r in sha.requests(f"/api/v1/backups/{job_id}/complete") if r["status"] == 200]
            if len(sha.requests(f"/api/v1/backups/{job_id}/complete")) >= 2
            else None
        ),
        "the SHA to get both completions",
    )
    assert len(completions) == 2
    daemon.restart()
    after = daemon.api.status(job_id)
    assert after["status"] == "completed" and change_ids(after) == ids
    assert daemon.api.status(stuck)["status"] == "cancelled"


def test_a_log_disk_that_fills_mid_job_costs_lines_not_the_job(
    mounted: tuple[Path, Path],
    daemon_factory: DaemonFactory,
    job_ids: JobIds,
    gates: Callable[[str], Path],
) -> None:
    _, log = mounted
    daemon = daemon_factory()
    job_id, stuck = job_ids("gate"), job_ids("hang")
    daemon.api.start(backup_body(job_id, vm="gate", disks=2))
    hanging = daemon.api.start(backup_body(stuck, vm="hang"))["pid"]
    daemon.api.wait_progress(job_id)
    daemon.api.wait_progress(stuck)

    fill(log)
    gates(job_id).touch()
    status = daemon.api.wait_status(job_id, "completed", "failed")
    assert status["status"] == "completed", status
    ids = change_ids(status)
    assert set(ids) == {"2000", "2001"} and all(ids.values())
    assert health(daemon)["status"] == "degraded"
    assert daemon.api.post(f"/api/v1/jobs/{stuck}/cancel").status == 202
    assert daemon.api.wait_status(stuck, "cancelled")["status"] == "cancelled"
    wait_for(lambda: reaped(hanging, stuck), "the cancelled client to be reaped")
    # SIGTERM stops it, and the next run knows the backup as it ended.
    assert daemon.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    (log / "filler").unlink()
    daemon.start()
    after = daemon.api.status(job_id)
    assert after["status"] == "completed" and change_ids(after) == ids


@pytest.mark.parametrize("what", ["existing", "missing"])
def test_a_read_only_state_directory_stops_the_daemon_with_one_line(
    mounted: tuple[Path, Path], daemon_factory: DaemonFactory, what: str
) -> None:
    state, _ = mounted
    daemon = daemon_factory(start=False)
    if what == "existing":
        daemon.start()
        daemon.stop()
    else:
        # A state directory that does not exist yet, in a read-only place.
        daemon.state_dir = state / "sna"
    make_read_only(state)
    process = daemon.spawn()
    assert process.wait(START_DEADLINE) == 1
    output = daemon.output_path.read_text("utf-8", "replace")
    verb = "write to" if what == "existing" else "create"
    expected = f"sna cannot start: cannot {verb} the state directory {daemon.state_dir}: Read-only file system"
    lines = [line for line in output.splitlines() if "sna cannot start" in line]
    assert len(lines) == 1 and lines[0].endswith(expected), output
    assert "Traceback" not in output, output


def test_a_state_disk_that_filled_while_sna_was_stopped_is_named_in_one_line(
    mounted: tuple[Path, Path], daemon_factory: DaemonFactory
) -> None:
    """sna cannot open its database without room for the WAL's index: it says why."""
    state, _ = mounted
    daemon = daemon_factory(start=False)
    daemon.start()
    daemon.stop()
    filler = fill(state)
    process = daemon.spawn()
    assert process.wait(START_DEADLINE) == 1
    output = daemon.output_path.read_text("utf-8", "replace")
    [line] = [line for line in output.splitlines() if "sna cannot start" in line]
    assert f"cannot open the job database {state / 'sna.sqlite'}: " in line, output
    assert f"cannot write to the state directory {state}: No space left on device" in line
    assert "Traceback" not in output, output
    filler.unlink()
    daemon.start()
