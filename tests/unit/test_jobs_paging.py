"""``GET /api/v1/jobs``: paging, the filters, and each job's duration and average rate
(sna.jobs.history and the route), through the API over fakes."""

from __future__ import annotations

import json
import urllib.parse
from datetime import timedelta
from typing import Any

import pytest

from sna.api import render
from tests.unit.conftest import Harness, backup_body


def start(harness: Harness, job_id: str, vm: str, port: int, exit_code: int | None = 0) -> None:
    """A one-disk job of ``vm`` started now; it ends with ``exit_code`` unless None."""
    body = backup_body(
        job_id=job_id,
        vm_name=vm,
        vm_path=f"/DC1/vm/{vm}",
        nbd_targets=f"2000:nbd://127.0.0.1:{port}/{vm}-disk0",
    )
    code, answer = harness.request("POST", "/api/v1/backup/start", body)
    assert code == 200, answer
    if exit_code is not None:
        harness.launcher.transports[job_id].exit(exit_code)


def listed(harness: Harness, query: str = "") -> dict[str, Any]:
    code, body = harness.request("GET", "/api/v1/jobs" + query)
    assert code == 200, body
    assert body["count"] == len(body["jobs"])
    answer: dict[str, Any] = body
    return answer


def ids(body: dict[str, Any]) -> list[str]:
    return [job["job_id"] for job in body["jobs"]]


@pytest.fixture
def five(harness: Harness) -> Harness:
    """Five jobs a minute apart: pgtest1 (completed, failed), pgtest10, web01, and
    a pgtest1 job still running."""
    plan = [
        ("j1", "pgtest1", 0),
        ("j2", "pgtest10", 0),
        ("j3", "pgtest1", 3),
        ("j4", "web01", 0),
        ("j5", "pgtest1", None),
    ]
    for n, (job_id, vm, exit_code) in enumerate(plan):
        start(harness, job_id, vm, 10100 + n, exit_code)
        harness.now.advance(60)
    return harness


def test_defaults_list_everything_newest_first(five: Harness) -> None:
    body = listed(five)
    assert ids(body) == ["j5", "j4", "j3", "j2", "j1"]
    assert (body["total"], body["limit"], body["offset"], body["next_offset"]) == (5, 100, 0, None)


def test_pages_cover_every_job_once(five: Harness) -> None:
    seen: list[str] = []
    offsets = []
    query: dict[str, Any] = {"limit": 2}
    while True:
        body = listed(five, "?" + urllib.parse.urlencode(query))
        assert body["total"] == 5 and body["limit"] == 2
        seen += ids(body)
        offsets.append(body["next_offset"])
        if body["next_offset"] is None:
            break
        query["offset"] = body["next_offset"]
    assert seen == ["j5", "j4", "j3", "j2", "j1"]
    assert offsets == [2, 4, None]
    past = listed(five, "?offset=7")
    assert (ids(past), past["total"], past["next_offset"]) == ([], 5, None)


def test_filters_combine(five: Harness) -> None:
    assert ids(listed(five, "?vm_name=pgtest1")) == ["j5", "j3", "j1"]
    assert ids(listed(five, "?vm_name=pgtest1&status=completed")) == ["j1"]
    assert ids(listed(five, "?status=completed&status=failed")) == ["j4", "j3", "j2", "j1"]
    # Exact names: pgtest10 is not pgtest1, and a name with a space is one name.
    assert ids(listed(five, "?vm_name=pgtest10")) == ["j2"]
    assert ids(listed(five, "?vm_name=pgtest")) == []
    # since: started at or after; j3 started exactly two minutes after j1.
    first = listed(five, "?vm_name=pgtest1&status=completed")["jobs"][0]["start_time"]
    body = listed(five, f"?since={first}")
    assert ids(body) == ["j5", "j4", "j3", "j2", "j1"]
    three = five.manager.get("j3").started_at
    body = listed(five, "?since=" + urllib.parse.quote(render.timestamp(three) or ""))
    assert ids(body) == ["j5", "j4", "j3"]
    body = listed(five, "?vm_name=pgtest1&limit=1&since=" + (render.timestamp(three) or ""))
    assert (ids(body), body["total"], body["next_offset"]) == (["j5"], 2, 1)


def test_since_takes_any_offset_even_with_its_plus_not_encoded(five: Harness) -> None:
    three = five.manager.get("j3").started_at
    # j3's start in UTC+01:00.
    shifted = (three + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    encoded = urllib.parse.quote(f"{shifted}+01:00")
    assert ids(listed(five, f"?since={encoded}")) == ["j5", "j4", "j3"]
    # A '+' sent as it is arrives as a space: still the offset it meant.
    assert ids(listed(five, f"?since={shifted}+01:00")) == ["j5", "j4", "j3"]
    assert ids(listed(five, f"?since={shifted}-01:00")) == []


def test_each_job_has_its_duration_and_average_rate(harness: Harness) -> None:
    start(harness, "j1", "pgtest1", 10100, exit_code=None)
    transport = harness.launcher.transports["j1"]
    lines = [
        {"event": "disk_plan", "disk_key": "2000", "sync_type": "full", "bytes_total": 1000},
        {"event": "disk_start", "disk_key": "2000", "sync_type": "full", "bytes_total": 1000},
        {"event": "progress", "disk_key": "2000", "bytes_done": 400, "bytes_total": 1000},
    ]
    harness.now.advance(8)
    transport.protocol.outReceived(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    harness.now.advance(2)
    [running] = listed(harness)["jobs"]
    assert (running["duration_seconds"], running["average_rate_bps"]) == (10.0, 40.0)
    harness.now.advance(10)
    transport.exit(0)
    harness.now.advance(100)
    [ended] = listed(harness)["jobs"]
    assert ended["duration_seconds"] == 20.0
    assert ended["average_rate_bps"] == 20.0
    status = harness.request("GET", "/api/v1/status/j1")[1]
    assert (status["duration_seconds"], status["average_rate_bps"]) == (20.0, 20.0)


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("?limit=0", "limit", "limit must be an integer from 1 to 1000, not 0"),
        ("?limit=1001", "limit", "limit must be an integer from 1 to 1000, not 1001"),
        ("?limit=ten", "limit", "limit must be an integer from 1 to 1000, not 'ten'"),
        ("?limit=-1", "limit", "limit must be an integer from 1 to 1000, not '-1'"),
        ("?limit=5&limit=6", "limit", "limit is given 2 times; give it once"),
        ("?offset=-2", "offset", "offset must be an integer from 0 to 1000000000000, not '-2'"),
        ("?status=bogus", "status", "status must be one of: "),
        ("?vm_name=", "vm_name", "vm_name must not be empty"),
        ("?since=2026-11-26", "since", "since must be an RFC 3339 time with its offset"),
        ("?since=2026-11-26T09:00:00", "since", "since must be an RFC 3339 time"),
        ("?since=yesterday", "since", "since must be an RFC 3339 time"),
        ("?vm=pgtest1", "vm", "unknown query parameter 'vm' (known: status, vm_name, since"),
        ("?vm_name=%ff", "vm_name", "query parameter 'vm_name' is not UTF-8"),
    ],
)
def test_bad_queries_name_the_parameter(
    five: Harness, query: str, field: str, message: str
) -> None:
    code, body = five.request("GET", "/api/v1/jobs" + query)
    assert (code, body["error"], body["field"]) == (400, "invalid_request", field), body
    assert body["message"].startswith(message), body
