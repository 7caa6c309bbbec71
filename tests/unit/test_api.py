"""The routes, over fakes: validation, answers, errors, and that bad input starts nothing."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from sna.contract.argv import PASSWORD_ENV
from tests.unit.conftest import Harness, backup_body

REQUIRED = [
    "job_id",
    "vm_name",
    "vcenter_host",
    "vcenter_user",
    "vcenter_password",
    "vm_path",
    "nbd_targets",
]


def events(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_start_answers_like_the_go_sna(harness: Harness) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body())
    assert code == 200
    # The pid is the spawned client's, as the launcher reports it.
    pid = harness.launcher.transports["backup-pgtest1-1760099954"].pid
    assert isinstance(pid, int)
    assert body == {
        "job_id": "backup-pgtest1-1760099954",
        "status": "started",
        "message": "Backup started for pgtest1",
        "started_at": "2026-11-26T12:00:00Z",
        "pid": pid,
    }
    # The client writes through the relays; the job remembers the hub's ports.
    request = harness.launcher.requests["backup-pgtest1-1760099954"]
    relays = harness.gateway.open["backup-pgtest1-1760099954"]
    assert [(t.host, t.port) for t in request.targets] == [
        ("127.0.0.1", relays["2000"]),
        ("127.0.0.1", relays["2001"]),
    ]
    status = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert [(d["nbd_port"], d["relay_port"]) for d in status["disks"]] == [
        (10100, relays["2000"]),
        (10101, relays["2001"]),
    ]


@pytest.mark.parametrize("field", REQUIRED)
def test_each_required_field_is_named(harness: Harness, field: str) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(**{field: None}))
    assert code == 400
    assert body == {"error": "invalid_request", "message": f"{field} is required", "field": field}
    assert harness.launcher.requests == {}


@pytest.mark.parametrize("field", REQUIRED)
def test_empty_string_counts_as_missing(harness: Harness, field: str) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(**{field: ""}))
    assert (code, body["message"]) == (400, f"{field} is required")


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"backup_type": "weekly"}, "backup_type", "backup_type must be 'full' or 'incremental'"),
        ({"backup_type": None}, "backup_type", "backup_type must be 'full' or 'incremental'"),
        (
            {"backup_type": "incremental", "previous_change_id": "  "},
            "previous_change_id",
            "previous_change_id is required for incremental backups",
        ),
        (
            {"backup_type": "incremental"},
            "previous_change_id",
            "previous_change_id is required for incremental backups",
        ),
        ({"job_id": 5}, "job_id", "job_id must be a string"),
        ({"vm_name": ["a"]}, "vm_name", "vm_name must be a string"),
        ({"vm_path": "/DC1/vm/a\x00b"}, "vm_path", "vm_path must not contain NUL characters"),
    ],
)
def test_field_errors(
    harness: Harness, overrides: dict[str, Any], field: str, message: str
) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(**overrides))
    assert (code, body["field"], body["message"]) == (400, field, message)
    assert harness.launcher.requests == {}


@pytest.mark.parametrize(
    "job_id, reason",
    [
        ("x/../../tmp/pwn", "must not contain '/'"),
        ("backup-a/b-1", "must not contain '/'"),
        ("backup-a\tb-1", "control character (U+0009) at position 9"),
        ("backup-\x1b[2J-1", "control character (U+001B)"),
        ("backup-\x7f-1", "control character (U+007F)"),
        ("   ", "blank"),
        ("a" * 256, "256 characters, more than the 255 allowed"),
    ],
)
def test_what_cannot_be_a_job_id_is_refused(harness: Harness, job_id: str, reason: str) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(job_id=job_id))
    assert (code, body["field"]) == (400, "job_id")
    assert reason in body["message"]
    assert harness.launcher.requests == {}


@pytest.mark.parametrize(
    "job_id",
    [
        "backup-SQL Server 01-1796166100",
        "backup-Büro-Server (alt) v1.2-1796166100",
        "backup-日本語のVM-1796166100",
        "-lead",
        "..",
        "backup-50% done #1?-1796166100",
        "a" * 255,
    ],
)
def test_job_ids_as_the_sha_makes_them(harness: Harness, job_id: str) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(job_id=job_id))
    assert (code, body["job_id"]) == (200, job_id)
    assert harness.launcher.requests[job_id].job_id == job_id
    quoted = urllib.parse.quote(job_id, safe="")
    for path in (f"/api/v1/status/{quoted}", f"/api/v1/jobs/{quoted}/status"):
        code, body = harness.request("GET", path)
        assert (code, body["job_id"]) == (200, job_id), path
    code, body = harness.request("GET", f"/api/v1/progress/{quoted}")
    assert (code, body["job_id"]) == (200, job_id)
    code, body = harness.request("POST", f"/api/v1/jobs/{quoted}/cancel")
    assert (code, body["job_id"]) == (202, job_id)


def test_a_percent_in_a_job_id_is_decoded_once(harness: Harness) -> None:
    job_id = "backup-100%20-1"
    assert harness.request("POST", "/api/v1/backup/start", backup_body(job_id=job_id))[0] == 200
    code, body = harness.request("GET", "/api/v1/status/backup-100%2520-1")
    assert (code, body["job_id"]) == (200, job_id)
    code, body = harness.request("GET", "/api/v1/status/backup-100%20-1")
    assert (code, body["error"]) == (404, "job_not_found")


@pytest.mark.parametrize(
    ("targets", "reason"),
    [
        ("2000:nbd://10.0.0.5:10100/x", "host 10.0.0.5 is not an allowed NBD host"),
        ("2000:nbd://127.0.0.1:22/x", "port 22 is outside the allowed NBD port range 10100-10200"),
        ("2000:nbd://127.0.0.1:10201/x", "port 10201 is outside"),
        ("abc:nbd://127.0.0.1:10100/x", "disk key 'abc' is not a number"),
        ("2000:http://127.0.0.1:10100/x", "must look like {disk_key}:nbd://"),
        ("2000:nbd://127.0.0.1/x", "the URL has no port"),
        ("2000:nbd://127.0.0.1:99999/x", "the port is not a number"),
        ("2000:nbd://127.0.0.1:10100/", "the URL names no export"),
        ("2000:nbd://127.0.0.1:10100/x,", "is empty"),
        (
            "2000:nbd://127.0.0.1:10100/a,2000:nbd://127.0.0.1:10101/b",
            "disk key 2000 is already used by entry 1",
        ),
        (
            "2000:nbd://127.0.0.1:10100/a,2001:nbd://localhost:10100/b",
            "port 10100 is already used by entry 1",
        ),
    ],
)
def test_target_errors(harness: Harness, targets: str, reason: str) -> None:
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body(nbd_targets=targets))
    assert (code, body["field"]) == (400, "nbd_targets")
    assert reason in body["message"]
    assert harness.launcher.requests == {}


def test_placeholder_is_an_unknown_change_id(harness: Harness) -> None:
    """The real SHA sends this; it starts, and the client is given no change ID."""
    body = backup_body(backup_type="incremental", previous_change_id="PLACEHOLDER")
    assert harness.request("POST", "/api/v1/backup/start", body)[0] == 200
    request = harness.launcher.requests["backup-pgtest1-1760099954"]
    assert request.backup_type == "incremental"
    assert request.previous_change_id is None
    args = harness.launcher.command.arguments(request)
    assert "--previous-change-id" not in args and "PLACEHOLDER" not in args


def test_export_names_are_quoted_for_the_client(harness: Harness) -> None:
    body = backup_body(nbd_targets="2000:nbd://127.0.0.1:10100/my%2Cvm%20disk0")
    assert harness.request("POST", "/api/v1/backup/start", body)[0] == 200
    [target] = harness.launcher.requests["backup-pgtest1-1760099954"].targets
    assert target.export == "my,vm disk0"
    assert target.spec == f"2000:nbd://127.0.0.1:{target.port}/my%2Cvm%20disk0"


def test_ipv6_loopback_target(harness: Harness) -> None:
    code, _ = harness.request(
        "POST", "/api/v1/backup/start", backup_body(nbd_targets="2000:nbd://[::1]:10100/x")
    )
    assert code == 200
    status = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert [(d["nbd_port"], d["export"]) for d in status["disks"]] == [(10100, "x")]


@pytest.mark.parametrize(
    ("raw", "headers", "code", "error"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_json"),
        (b"\xff\xfe", {}, 400, "invalid_json"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b"{" + b" " * (2 * 1024 * 1024) + b"}", {}, 413, "body_too_large"),
    ],
)
def test_bodies_that_are_not_json_objects(
    harness: Harness, raw: bytes, headers: dict[str, str], code: int, error: str
) -> None:
    got, body = harness.request("POST", "/api/v1/backup/start", raw=raw, headers=headers)
    assert (got, body["error"]) == (code, error)
    assert body["message"]
    assert harness.launcher.requests == {}


def test_same_job_twice_conflicts(harness: Harness) -> None:
    assert harness.request("POST", "/api/v1/backup/start", backup_body())[0] == 200
    code, body = harness.request(
        "POST", "/api/v1/backup/start", backup_body(nbd_targets="2000:nbd://127.0.0.1:10150/x")
    )
    assert (code, body["error"]) == (409, "job_already_running")
    assert len(harness.launcher.requests) == 1


def test_port_of_another_running_job_conflicts(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    code, body = harness.request(
        "POST",
        "/api/v1/backup/start",
        backup_body(job_id="other", nbd_targets="2016:nbd://127.0.0.1:10101/y"),
    )
    assert (code, body["error"]) == (409, "port_in_use")
    assert "10101" in body["message"] and "backup-pgtest1-1760099954" in body["message"]


def test_port_is_free_again_once_the_job_ends(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.launcher.transports["backup-pgtest1-1760099954"].exit(0)
    code, _ = harness.request(
        "POST",
        "/api/v1/backup/start",
        backup_body(job_id="other", nbd_targets="2000:nbd://127.0.0.1:10101/y"),
    )
    assert code == 200


def test_max_jobs(harness: Harness) -> None:
    for n in range(3):
        target = f"2000:nbd://127.0.0.1:{10100 + n}/x"
        code, _ = harness.request(
            "POST", "/api/v1/backup/start", backup_body(job_id=f"j{n}", nbd_targets=target)
        )
        assert code == 200
    code, body = harness.request(
        "POST",
        "/api/v1/backup/start",
        backup_body(job_id="j9", nbd_targets="2000:nbd://127.0.0.1:10150/x"),
    )
    assert (code, body["error"]) == (503, "too_many_jobs")


def test_missing_client_is_500_and_leaves_no_job(harness: Harness) -> None:
    harness.launcher.unavailable = "backup client '/opt/sbc' does not exist"
    code, body = harness.request("POST", "/api/v1/backup/start", backup_body())
    assert (code, body["error"]) == (500, "backup_client_unavailable")
    assert "/opt/sbc" in body["message"]
    assert harness.request("GET", "/api/v1/jobs")[1]["count"] == 0


def test_status_follows_the_client(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    transport = harness.launcher.transports["backup-pgtest1-1760099954"]
    transport.protocol.outReceived(
        events(
            {"event": "disk_start", "disk_key": "2000", "sync_type": "full", "bytes_total": 300},
            {"event": "disk_start", "disk_key": "2001", "sync_type": "full", "bytes_total": 100},
            {"event": "progress", "disk_key": "2000", "bytes_done": 300, "bytes_total": 300},
            {"event": "disk_done", "disk_key": "2000", "change_id": "uuid-a/7"},
        )
    )
    code, body = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")
    assert code == 200
    assert body["status"] == "running"
    assert body["progress_percent"] == 75.0
    assert [d["change_id"] for d in body["disks"]] == ["uuid-a/7", None]
    transport.protocol.outReceived(
        events(
            {"event": "progress", "disk_key": "2001", "bytes_done": 100, "bytes_total": 100},
        )
    )
    # Every byte is copied, but the last disk is not flushed yet: not 100.
    assert (
        harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]["progress_percent"]
        < 100
    )
    transport.protocol.outReceived(
        events({"event": "disk_done", "disk_key": "2001", "change_id": "uuid-b/9"})
    )
    transport.exit(0)
    body = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert (body["status"], body["progress_percent"], body["exit_code"]) == ("completed", 100, 0)
    sha = harness.request("GET", "/api/v1/jobs/backup-pgtest1-1760099954/status")[1]
    assert sha["status"] == "completed"
    assert sha["progress_data"] == {
        "percent": 100.0,
        "bytes_transferred": 400,
        "current_operation": "Completed",
    }


def test_failure_keeps_exit_code_and_last_error(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    transport = harness.launcher.transports["backup-pgtest1-1760099954"]
    transport.protocol.outReceived(events({"event": "error", "message": "NBD write failed"}))
    transport.exit(3)
    body = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert body["status"] == "failed"
    assert body["exit_code"] == 3
    assert body["error"] == "backup client exited with code 3: NBD write failed"
    assert {d["status"] for d in body["disks"]} == {"failed"}
    progress = harness.request("GET", "/api/v1/progress/backup-pgtest1-1760099954")[1]
    assert progress["status"] == "failed"
    assert progress["last_error"]["message"] == body["error"]


def test_last_stderr_line_when_no_error_event(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    transport = harness.launcher.transports["backup-pgtest1-1760099954"]
    transport.protocol.errReceived(b"connecting\nTraceback: boom\n")
    transport.exit(1)
    body = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert body["error"] == "backup client exited with code 1: Traceback: boom"


def test_cancel(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    code, body = harness.request("POST", "/api/v1/jobs/backup-pgtest1-1760099954/cancel")
    assert (code, body["status"]) == (202, "cancelling")
    transport = harness.launcher.transports["backup-pgtest1-1760099954"]
    assert transport.signals == ["TERM"]
    body = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert body["status"] == "cancelled"
    code, body = harness.request("POST", "/api/v1/jobs/backup-pgtest1-1760099954/cancel")
    assert (code, body["error"]) == (409, "job_not_running")
    assert harness.request("POST", "/api/v1/jobs/nope/cancel")[0] == 404


def test_cancel_kills_after_the_grace_period(harness: Harness) -> None:
    harness.launcher.dies_on = ("KILL",)
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.request("POST", "/api/v1/jobs/backup-pgtest1-1760099954/cancel")
    transport = harness.launcher.transports["backup-pgtest1-1760099954"]
    harness.clock.advance(harness.manager.settings.kill_grace - 1)
    assert transport.signals == ["TERM"]
    harness.clock.advance(1)
    assert transport.signals == ["TERM", "KILL"]
    assert harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]["status"] == (
        "cancelled"
    )


def test_jobs_filter(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    harness.launcher.transports["backup-pgtest1-1760099954"].exit(0)
    harness.request(
        "POST",
        "/api/v1/backup/start",
        backup_body(job_id="second", nbd_targets="2000:nbd://127.0.0.1:10120/x"),
    )
    assert harness.request("GET", "/api/v1/jobs")[1]["count"] == 2
    running = harness.request("GET", "/api/v1/jobs?status=running")[1]
    assert [j["job_id"] for j in running["jobs"]] == ["second"]
    code, body = harness.request("GET", "/api/v1/jobs?status=bogus")
    assert (code, body["field"]) == (400, "status")


def test_unknown_job_and_route(harness: Harness) -> None:
    for path in ("/api/v1/status/nope", "/api/v1/jobs/nope/status", "/api/v1/progress/nope"):
        code, body = harness.request("GET", path)
        assert (code, body["error"]) == (404, "job_not_found")
    code, body = harness.request("GET", "/api/v1/nothing")
    assert (code, body["error"]) == (404, "not_found")
    code, body = harness.request("GET", "/api/v1/backup/start")
    assert (code, body["error"]) == (405, "method_not_allowed")


def test_progress_push_from_the_go_client(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    job = "backup-pgtest1-1760099954"
    push = {
        "stage": "Transfer",
        "status": "in_progress",
        "bytes_transferred": 0,
        "throughput_bps": 0,
        "sync_type": "initial",
    }
    code, body = harness.request("POST", f"/api/v1/progress/{job}/update", push)
    assert (code, body) == (200, {"job_id": job, "status": "success"})
    total = 109521666048
    push = {
        "stage": "Transfer",
        "status": "in_progress",
        "bytes_transferred": 3221225472,
        "total_bytes": total,
        "throughput_bps": 104857600,
    }
    harness.request("POST", f"/api/v1/progress/{job}/update", push)
    # The rate is sna's own, over its window: 1000 MiB in the next 10 s.
    harness.now.advance(10)
    push = {**push, "bytes_transferred": 3221225472 + 1000 * 1048576, "throughput_bps": 1}
    harness.request("POST", f"/api/v1/progress/{job}/update", push)
    body = harness.request("GET", f"/api/v1/progress/{job}")[1]
    assert body["status"] == "in_progress"
    assert body["phase"] == "Transfer"
    assert body["current_operation"] == "Transferring Data"
    assert body["sync_type"] == "full"
    assert body["bytes_transferred"] == 4269801472
    assert body["throughput"]["current_mbps"] == 100
    # No line named a disk: the push's bytes are a share of the first of two disks.
    assert body["percentage"] == round(100 * 4269801472 / total / 2, 2)
    assert body["timing"]["eta_seconds"] == round((2 * total - 4269801472) / 104857600)
    assert set(body) >= {
        "percentage",
        "current_operation",
        "timing",
        "vm_info",
        "phases",
        "errors",
        "last_error",
    }
    code, body = harness.request("POST", "/api/v1/progress/unknown/update", push)
    assert code == 404
    code, body = harness.request(
        "POST", f"/api/v1/progress/{job}/update", {"bytes_transferred": -1}
    )
    assert (code, body["field"]) == (400, "bytes_transferred")


def test_health_uptime_is_real(harness: Harness) -> None:
    harness.clock.advance(3725)
    body = harness.request("GET", "/api/v1/health")[1]
    assert body["status"] == "healthy"
    assert body["uptime"] == "1h2m5s"
    assert body["uptime_seconds"] == 3725
    assert body["jobs"]["running"] == 0
    assert body["version"]
    assert body["snapshots_pending"] == 0


def test_config_is_applied_and_persisted(harness: Harness) -> None:
    code, body = harness.request(
        "PUT", "/api/v1/config", {"max_jobs": 1, "nbd_ports": "10100-10110"}
    )
    assert code == 200
    assert body["config"]["max_jobs"] == 1
    assert harness.store.settings == {"max_jobs": 1, "nbd_ports": "10100-10110"}
    code, body = harness.request(
        "POST", "/api/v1/backup/start", backup_body(nbd_targets="2000:nbd://127.0.0.1:10111/x")
    )
    assert code == 400 and "10100-10110" in body["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"nbd_port": 10809}, "nbd_port"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"max_jobs": True}, "max_jobs"),
        ({"nbd_ports": "22"}, None),
        ({"nbd_ports": "x-y"}, "nbd_ports"),
        ({"nbd_hosts": []}, "nbd_hosts"),
        ({"kill_grace_seconds": -1}, "kill_grace_seconds"),
    ],
)
def test_config_rejects_bad_values(harness: Harness, change: dict[str, Any], field: Any) -> None:
    code, body = harness.request("PUT", "/api/v1/config", change)
    if field is None:  # a single port is a valid range of one
        assert code == 200
        return
    assert (code, body["field"]) == (400, field)
    assert harness.store.settings == {}


def test_password_never_in_answers_or_records(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    job = "backup-pgtest1-1760099954"
    for path in (
        f"/api/v1/status/{job}",
        f"/api/v1/progress/{job}",
        "/api/v1/jobs",
        f"/api/v1/jobs/{job}/status",
    ):
        assert "s3cret-P@ss" not in json.dumps(harness.request("GET", path)[1])
    assert "s3cret-P@ss" not in json.dumps(harness.store.jobs)


def test_the_client_gets_the_password_in_its_environment_and_echoes_it_masked(
    harness: Harness,
) -> None:
    """The real launcher's wiring, over a reactor that spawns nothing."""
    job = "backup-pgtest1-1760099954"
    harness.request("POST", "/api/v1/backup/start", backup_body())
    [(transport, args, env)] = harness.launcher.reactor.spawned
    assert transport is harness.launcher.transports[job]
    assert args[1:] == harness.launcher.command.arguments(harness.launcher.requests[job])
    assert env[PASSWORD_ENV] == "s3cret-P@ss"
    assert not any("s3cret-P@ss" in word for word in args)
    transport.protocol.errReceived(b"Error: login with s3cret-P@ss refused\n")
    transport.exit(1)
    body = harness.request("GET", f"/api/v1/status/{job}")[1]
    assert body["error"] == "backup client exited with code 1: Error: login with ******** refused"
    log = harness.launcher.log_path(job).getContent().decode()
    assert "stderr Error: login with ******** refused" in log
    assert "s3cret-P@ss" not in log


def test_previous_change_ids_per_disk(harness: Harness) -> None:
    body = backup_body(
        backup_type="incremental",
        previous_change_ids={"2000": "52 aa/7", "2001": "PLACEHOLDER"},
        vcenter_thumbprint="ab" * 20,
    )
    assert harness.request("POST", "/api/v1/backup/start", body)[0] == 200
    request = harness.launcher.requests["backup-pgtest1-1760099954"]
    assert request.previous_change_ids == (("2000", "52 aa/7"),)
    args = harness.launcher.command.arguments(request)
    assert '--previous-change-ids={"2000":"52 aa/7"}' in args
    assert "--vcenter-thumbprint=" + ":".join(["AB"] * 20) in args
    status = harness.request("GET", "/api/v1/status/backup-pgtest1-1760099954")[1]
    assert [d["previous_change_id"] for d in status["disks"]] == ["52 aa/7", None]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"2016": "x/1"}, "names disk '2016', which is not in nbd_targets"),
        ({"2000": 5}, "previous_change_ids[2000] must be a string"),
        (["x"], "previous_change_ids must be an object"),
        ({"2000": "x" * 300}, "is longer than 256 characters"),
        ({"2000": "a/1", "02000": "b/2"}, "names disk 2000 twice"),
    ],
)
def test_bad_previous_change_ids(harness: Harness, value: Any, message: str) -> None:
    body = backup_body(backup_type="incremental", previous_change_ids=value)
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert (code, answer["field"]) == (400, "previous_change_ids")
    assert message in answer["message"]
    assert harness.launcher.requests == {}


def test_an_incremental_needs_a_real_entry_in_previous_change_ids(harness: Harness) -> None:
    body = backup_body(backup_type="incremental", previous_change_ids={"2000": None})
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert (code, answer["field"]) == (400, "previous_change_id")
