"""Hostile and wrong requests: a precise 4xx in JSON, and nothing started."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import pytest

from sna.contract.argv import option_value
from sna.contract.ids import log_file_name
from tests.integration.harness import (
    Daemon,
    JobIds,
    Response,
    backup_body,
    double_invocation,
    doubles_of,
    nbd_ports,
    targets,
)

pytestmark = pytest.mark.integration

DaemonFactory = Callable[..., Daemon]

REQUIRED = (
    "job_id",
    "vm_name",
    "vcenter_host",
    "vcenter_user",
    "vcenter_password",
    "vm_path",
    "nbd_targets",
)


@contextmanager
def nothing_started(daemon: Daemon, job_ids: JobIds) -> Iterator[None]:
    """The block must not add a job, a job log or a client process."""
    before_count = daemon.api.jobs()["count"]
    before_logs = daemon.job_logs()
    before_doubles = set(doubles_of(job_ids.made))
    yield
    assert daemon.api.jobs()["count"] == before_count
    assert daemon.job_logs() == before_logs
    assert set(doubles_of(job_ids.made)) <= before_doubles


def check_error(answer: Response, status: int, field: Optional[str], message: str = "") -> Any:
    assert answer.status == status, answer
    body = answer.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if field is not None:
        assert field in body["message"], body
    if message:
        assert body["message"] == message, body
    return body


def start(daemon: Daemon, body: Any, **kwargs: Any) -> Response:
    return daemon.api.post("/api/v1/backup/start", body, **kwargs)


def test_malformed_bodies(sna: Daemon, job_ids: JobIds) -> None:
    good = json.dumps(backup_body(job_ids("malformed"))).encode()
    json_type = {"Content-Type": "application/json"}
    with nothing_started(sna, job_ids):
        check_error(start(sna, None, raw=good[:-5], headers=json_type), 400, None)
        check_error(start(sna, None, raw=b"\xff\xfe{}", headers=json_type), 400, None)
        array = check_error(start(sna, [json.loads(good)]), 400, None)
        assert "object" in array["message"]
        check_error(start(sna, None, raw=b"", headers=json_type), 400, None)
        check_error(start(sna, None, raw=b"null", headers=json_type), 400, None)


def test_wrong_types(sna: Daemon, job_ids: JobIds) -> None:
    with nothing_started(sna, job_ids):
        body = check_error(start(sna, {**backup_body(job_ids("t")), "job_id": 5}), 400, "job_id")
        assert body["message"] == "job_id must be a string"
        wrong: list[tuple[str, object]] = [
            ("vm_name", ["pgtest1"]),
            ("vcenter_password", {"x": 1}),
            ("nbd_targets", 2000),
            ("backup_type", True),
            ("previous_change_id", 7),
        ]
        for field, value in wrong:
            request = {**backup_body(job_ids("t")), field: value}
            answer = check_error(start(sna, request), 400, field)
            assert answer["message"] == f"{field} must be a string", answer


@pytest.mark.parametrize("field", REQUIRED)
@pytest.mark.parametrize("how", ["absent", "null", "empty"])
def test_missing_required_field(sna: Daemon, job_ids: JobIds, field: str, how: str) -> None:
    body = backup_body(job_ids("missing"))
    if how == "absent":
        del body[field]
    else:
        body[field] = None if how == "null" else ""
    with nothing_started(sna, job_ids):
        check_error(start(sna, body), 400, field, f"{field} is required")


def test_backup_type(sna: Daemon, job_ids: JobIds) -> None:
    with nothing_started(sna, job_ids):
        for value in ("weekly", "FULL", " full"):
            check_error(
                start(sna, backup_body(job_ids("type"), backup_type=value)),
                400,
                "backup_type",
                "backup_type must be 'full' or 'incremental'",
            )
        for previous in (None, "", "  "):
            check_error(
                start(
                    sna,
                    backup_body(
                        job_ids("type"), backup_type="incremental", previous_change_id=previous
                    ),
                ),
                400,
                "previous_change_id",
                "previous_change_id is required for incremental backups",
            )


@pytest.mark.parametrize(
    "job_id",
    ["../x", "a/b", "x\0y", "a" * 300, "tab\t", "bell\x07", "   "],
    ids=["dotdot-x", "slash", "nul", "long", "tab", "control", "blank"],
)
def test_hostile_job_id(sna: Daemon, job_ids: JobIds, job_id: str) -> None:
    with nothing_started(sna, job_ids):
        request = {**backup_body(job_ids("hostile")), "job_id": job_id}
        body = check_error(start(sna, request), 400, "job_id")
        assert body.get("field") == "job_id"
        assert len(body["message"]) < 400


@pytest.mark.parametrize(
    "name",
    ["SQL Server 01", "Büro-Server (alt) v1.2", "-lead", ".hidden", "..", "50% done"],
)
def test_job_ids_as_the_sha_makes_them_run_byte_for_byte(
    sna: Daemon, job_ids: JobIds, name: str
) -> None:
    """``backup-{vm_name}-{unix}`` with the VM name raw: through the daemon to the client."""
    job_id = name if name in ("..", "-lead", ".hidden") else f"backup-{name}-{job_ids('x')}"
    job_ids.made.add(job_id)
    answer = start(sna, {**backup_body(job_ids("odd")), "job_id": job_id})
    assert answer.status == 200 and answer.json()["job_id"] == job_id, answer
    assert sna.api.wait_status(job_id, "completed")["job_id"] == job_id
    log = sna.job_log(job_id)
    assert log.name == log_file_name(job_id) and log.parent == sna.log_dir
    invocation = double_invocation(log.read_text())
    assert option_value(invocation["argv"], "--job-id") == job_id
    assert invocation["env"]["MIGRATEKIT_JOB_ID"] == job_id
    quoted = urllib.parse.quote(job_id, safe="")
    assert sna.api.get(f"/api/v1/jobs/{quoted}/status").json()["job_id"] == job_id


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("2000:nbd://10.0.0.5:10150/d0", "10.0.0.5"),
        ("2000:nbd://127.0.0.1:22/d0", "22"),
        ("2000:nbd://127.0.0.1:10201/d0", "10201"),
        ("2000:nbd://127.0.0.1:10099/d0", "10099"),
        ("2000:nbd://127.0.0.1:0/d0", "port"),
        ("2000:nbd://127.0.0.1:99999/d0", "port"),
        ("2000:nbd://127.0.0.1/d0", "port"),
        ("2000:nbd://127.0.0.1:10150/", "export"),
        ("2000:nbd://user:pw@127.0.0.1:10150/d0", "user"),
        ("2000:nbd://127.0.0.1:10150/d0?x=1", "query"),
        ("2000:http://127.0.0.1:10150/d0", "nbd://"),
        ("disk0:nbd://127.0.0.1:10150/d0", "disk0"),
        ("-1:nbd://127.0.0.1:10150/d0", "-1"),
        ("2000:nbd://127.0.0.1:10150/d0%0a", "control"),
        ("", "nbd_targets is required"),
        ("2000:nbd://127.0.0.1:10150/d0,", "empty"),
    ],
    ids=[
        "host-10.x",
        "port-22",
        "port-10201",
        "port-10099",
        "port-0",
        "port-99999",
        "no-port",
        "no-export",
        "userinfo",
        "query",
        "scheme",
        "key-not-numeric",
        "key-negative",
        "export-newline",
        "empty",
        "trailing-comma",
    ],
)
def test_hostile_targets(sna: Daemon, job_ids: JobIds, entry: str, reason: str) -> None:
    with nothing_started(sna, job_ids):
        body = check_error(start(sna, backup_body(job_ids("tgt"), nbd_targets=entry)), 400, None)
        assert body.get("field") == "nbd_targets", body
        assert "nbd_targets" in body["message"], body
        assert reason in body["message"], body


def test_duplicate_disk_keys_and_ports(sna: Daemon, job_ids: JobIds) -> None:
    a, b = nbd_ports(2)
    with nothing_started(sna, job_ids):
        keys = check_error(
            start(
                sna,
                backup_body(
                    job_ids("dup"),
                    nbd_targets=f"2000:nbd://127.0.0.1:{a}/d0,2000:nbd://127.0.0.1:{b}/d1",
                ),
            ),
            400,
            "nbd_targets",
        )
        assert "disk key 2000" in keys["message"]
        ports = check_error(
            start(
                sna,
                backup_body(
                    job_ids("dup"),
                    nbd_targets=f"2000:nbd://127.0.0.1:{a}/d0,2001:nbd://127.0.0.1:{a}/d1",
                ),
            ),
            400,
            "nbd_targets",
        )
        assert f"port {a}" in ports["message"]


@pytest.mark.parametrize("field", ["vcenter_password", "vcenter_user", "vm_path"])
def test_oversized_field(sna: Daemon, job_ids: JobIds, field: str) -> None:
    """A field too long for any client is the caller's error (400), not ours (500)."""
    value = "/DC1/vm/" + "v" * 200_000 if field == "vm_path" else "x" * 200_000
    request = {**backup_body(job_ids("huge")), field: value}
    with nothing_started(sna, job_ids):
        body = check_error(start(sna, request), 400, field)
        assert len(body["message"]) < 1000


def test_body_too_large(sna: Daemon, job_ids: JobIds) -> None:
    body = backup_body(job_ids("big"))
    body["padding"] = "x" * (2 * 1024 * 1024)
    with nothing_started(sna, job_ids):
        check_error(start(sna, body), 413, None)


def test_body_too_large_chunked(sna: Daemon, job_ids: JobIds) -> None:
    """Without a Content-Length the limit still holds."""
    raw = json.dumps({**backup_body(job_ids("chunked")), "padding": "x" * (2 * 1024 * 1024)})
    chunks = [raw[i : i + 65536].encode() for i in range(0, len(raw), 65536)]
    conn = http.client.HTTPConnection("127.0.0.1", sna.port, timeout=15)
    with nothing_started(sna, job_ids):
        try:
            conn.request(
                "POST",
                "/api/v1/backup/start",
                body=iter(chunks),
                headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                encode_chunked=True,
            )
            answer = conn.getresponse()
            response = Response(answer.status, answer.headers, answer.read())
        finally:
            conn.close()
        check_error(response, 413, None)


def test_wrong_content_type(sna: Daemon, job_ids: JobIds) -> None:
    raw = json.dumps(backup_body(job_ids("ctype"))).encode()
    with nothing_started(sna, job_ids):
        body = check_error(
            start(sna, None, raw=raw, headers={"Content-Type": "text/plain"}), 415, None
        )
        assert "application/json" in body["message"]
        check_error(
            start(
                sna, None, raw=raw, headers={"Content-Type": "application/x-www-form-urlencoded"}
            ),
            415,
            None,
        )


def test_conflicts_with_running_jobs(sna: Daemon, job_ids: JobIds) -> None:
    job_id = job_ids("running")
    ports = nbd_ports(2)
    first = sna.api.start(backup_body(job_id, vm="hang", nbd_targets=targets(ports)))
    try:
        sna.api.wait_progress(job_id)
        with nothing_started(sna, job_ids):
            again = check_error(
                start(sna, backup_body(job_id, vm="hang", nbd_targets=targets(nbd_ports(1)))),
                409,
                None,
            )
            assert again["error"] == "job_already_running"
            assert job_id in again["message"]
            other = job_ids("other")
            busy = check_error(
                start(
                    sna,
                    backup_body(
                        other,
                        nbd_targets=f"2000:nbd://127.0.0.1:{nbd_ports(1)[0]}/x,"
                        f"2001:nbd://127.0.0.1:{ports[1]}/y",
                    ),
                ),
                409,
                None,
            )
            assert busy["error"] == "port_in_use"
            assert str(ports[1]) in busy["message"]
        # The running job is untouched: same process, one launch in its log.
        status = sna.api.status(job_id)
        assert status["status"] == "running"
        assert status["pid"] == first["pid"]
        assert sna.job_log(job_id).read_text().count(" sna starting ") == 1
        assert doubles_of({job_id}) == [first["pid"]]
    finally:
        sna.api.post(f"/api/v1/jobs/{job_id}/cancel")
    sna.api.wait_status(job_id, "cancelled")
    # Once it has ended, its ports are free again.
    reuse = job_ids("reuse")
    sna.api.start(backup_body(reuse, nbd_targets=targets(ports)))
    assert sna.api.wait_status(reuse, "completed", "failed")["status"] == "completed"


def test_too_many_jobs(daemon_factory: DaemonFactory, job_ids: JobIds) -> None:
    daemon = daemon_factory(extra=("--max-jobs", "2"))
    running = [job_ids("hang"), job_ids("hang")]
    for job_id in running:
        daemon.api.start(backup_body(job_id, vm="hang"))
    with nothing_started(daemon, job_ids):
        body = check_error(start(daemon, backup_body(job_ids("third"), vm="hang")), 503, None)
        assert body["error"] == "too_many_jobs"
        assert "2" in body["message"]
    daemon.api.post(f"/api/v1/jobs/{running[0]}/cancel")
    daemon.api.wait_status(running[0], "cancelled")
    fourth = job_ids("fourth")
    daemon.api.start(backup_body(fourth))
    assert daemon.api.wait_status(fourth, "completed", "failed")["status"] == "completed"


def test_unknown_route_and_wrong_method(sna: Daemon) -> None:
    for path in ("/api/v1/nope", "/ui/nope", "/api/v2/health", "/api/v1/status/"):
        answer = sna.api.get(path)
        check_error(answer, 404, None)
    wrong = [
        ("GET", "/api/v1/backup/start"),
        ("DELETE", "/api/v1/health"),
        ("POST", "/api/v1/status/some-job"),
        ("GET", "/api/v1/jobs/some-job/cancel"),
    ]
    for method, path in wrong:
        answer = sna.api.request(method, path)
        body = check_error(answer, 405, None)
        assert method in body["message"], body
    bad_filter = sna.api.get("/api/v1/jobs?status=bogus")
    check_error(bad_filter, 400, "status")
