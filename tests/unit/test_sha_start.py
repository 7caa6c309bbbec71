"""A job's start with a SHA to ask: previous change IDs, what wins, what a failed lookup does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from sna.sha.hub import Lookup
from sna.testing import FakeHub
from tests.unit.conftest import Harness, backup_body

JOB = "backup-pgtest1-1760099954"
A, B = "52 aa bb cc dd ee ff 00-11 22 33 44 55 66 77 88/5", "52 00/9"


@pytest.fixture
def hub(harness: Harness) -> FakeHub:
    fake = FakeHub()
    harness.manager.hub = fake
    return fake


def emit(harness: Harness, job_id: str, *lines: dict[str, Any]) -> None:
    protocol = harness.launcher.transports[job_id].protocol
    for line in lines:
        protocol.outReceived(json.dumps(line).encode() + b"\n")


def start(harness: Harness, **overrides: Any) -> tuple[int, Any]:
    return harness.request("POST", "/api/v1/backup/start", backup_body(**overrides))


def test_an_incremental_the_sha_s_way_starts_from_the_sha_s_change_ids(
    harness: Harness, hub: FakeHub
) -> None:
    hub.answers = {0: Lookup(A), 1: Lookup(B)}
    code, _ = start(harness, backup_type="incremental", previous_change_id="PLACEHOLDER")
    assert code == 200
    assert hub.asked == [("pgtest1", [0, 1])]
    request = harness.launcher.requests[JOB]
    assert request.previous_change_ids == (("2000", A), ("2001", B))
    args = harness.launcher.command.arguments(request)
    assert f'--previous-change-ids={{"2000":"{A}","2001":"{B}"}}' in args
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert [(d["previous_change_id"], d["previous_change_id_from"]) for d in status["disks"]] == [
        (A, "sha"),
        (B, "sha"),
    ]
    assert hub.started == [JOB]


def test_explicit_change_ids_win(harness: Harness, hub: FakeHub) -> None:
    hub.answers = {0: Lookup(A), 1: Lookup(B)}
    start(harness, backup_type="incremental", previous_change_ids={"2001": "52 11/3"})
    request = harness.launcher.requests[JOB]
    assert request.previous_change_ids == (("2000", A), ("2001", "52 11/3"))
    assert dict(request.previous_sources) == {"2000": "sha", "2001": "request"}


def test_one_explicit_change_id_for_the_job_wins_for_every_disk(
    harness: Harness, hub: FakeHub
) -> None:
    hub.answers = {0: Lookup(A), 1: Lookup(B)}
    start(harness, backup_type="incremental", previous_change_id="52 11/3")
    request = harness.launcher.requests[JOB]
    assert request.previous_change_ids == ()
    assert request.previous_change_id_of("2000") == request.previous_change_id_of("2001")


def test_a_disk_the_sha_has_nothing_for_is_copied_in_full(harness: Harness, hub: FakeHub) -> None:
    hub.answers = {0: Lookup(A), 1: Lookup(None)}
    start(harness, backup_type="incremental", previous_change_id="PLACEHOLDER")
    assert harness.launcher.requests[JOB].previous_change_ids == (("2000", A),)


def test_an_incremental_whose_base_the_sha_cannot_tell_starts_nothing(
    harness: Harness, hub: FakeHub
) -> None:
    hub.answers = {1: Lookup(error="GET http://127.0.0.1:8082/...: HTTP 500")}
    code, body = start(harness, backup_type="incremental", previous_change_id="PLACEHOLDER")
    assert (code, body["error"]) == (502, "sha_lookup_failed")
    assert "disk 1 (target 2001)" in body["message"] and "HTTP 500" in body["message"]
    assert harness.launcher.requests == {} and harness.gateway.open == {}
    assert harness.request("GET", f"/api/v1/status/{JOB}")[0] == 404


def test_a_full_is_copied_in_full_whatever_the_sha_says(harness: Harness, hub: FakeHub) -> None:
    hub.answers = {0: Lookup(A), 1: Lookup(error="connection refused")}
    code, _ = start(harness, backup_type="full")
    assert code == 200
    request = harness.launcher.requests[JOB]
    assert request.previous_change_ids == () and request.previous_change_id is None


def test_the_sha_is_asked_while_the_targets_are_probed(harness: Harness, hub: FakeHub) -> None:
    hub.hold = Deferred()
    d = harness.treq.request(
        "POST",
        "http://sna/api/v1/backup/start",
        data=json.dumps(backup_body(backup_type="incremental")).encode(),
        headers={"Content-Type": "application/json"},
    )
    answered: list[Any] = []
    d.addBoth(answered.append)
    harness.treq.flush()
    assert hub.asked and harness.gateway.probed == ["2000", "2001"]
    assert answered == [] and harness.launcher.requests == {}
    hub.hold.callback(None)
    harness.treq.flush()
    assert answered[0].code == 200 and JOB in harness.launcher.requests


def test_a_full_does_not_wait_for_the_sha(harness: Harness, hub: FakeHub) -> None:
    """Its answers are only logged: a slow SHA must not hold a full's start."""
    hub.hold = Deferred()
    code, _ = start(harness, backup_type="full")
    assert code == 200 and hub.asked == [("pgtest1", [0, 1])]
    hub.hold.callback(None)
    assert harness.launcher.requests[JOB].previous_change_ids == ()


def test_a_new_job_of_an_ended_job_s_id_starts_with_nothing_owed(
    harness: Harness, hub: FakeHub
) -> None:
    start(harness)
    harness.launcher.transports[JOB].exit(1)
    assert [m.kind for m in harness.store.outbox(JOB)] == ["telemetry"]
    assert start(harness)[0] == 200
    assert harness.store.outbox(JOB) == []
    harness.launcher.transports[JOB].exit(1)
    assert len(harness.store.outbox(JOB)) == 1


def test_a_disk_resized_since_its_previous_backup_is_known_from_sna_s_records(
    harness: Harness, hub: FakeHub
) -> None:
    start(harness, job_id="backup-pgtest1-1")
    emit(
        harness,
        "backup-pgtest1-1",
        {
            "event": "disk_plan",
            "disk_key": "2000",
            "sync_type": "full",
            "bytes_total": 5,
            "vmware_disk_key": "2000",
            "capacity_bytes": 268435456,
        },
        {"event": "disk_start", "disk_key": "2000", "sync_type": "full"},
        {"event": "disk_done", "disk_key": "2000", "change_id": A},
    )
    harness.launcher.transports["backup-pgtest1-1"].exit(0)
    hub.answers = {0: Lookup(A), 1: Lookup(B)}
    start(harness, job_id="backup-pgtest1-2", backup_type="incremental")
    request = harness.launcher.requests["backup-pgtest1-2"]
    # Only what sna itself saw: disk 2001's change ID has no record here.
    assert request.previous_capacities == (("2000", 268435456),)
    args = harness.launcher.command.arguments(request)
    assert '--previous-capacities={"2000":268435456}' in args


def test_targets_keyed_the_sha_s_way_show_both_keys(harness: Harness, hub: FakeHub) -> None:
    start(harness)
    emit(
        harness,
        JOB,
        {
            "event": "disk_plan",
            "disk_key": "2000",
            "sync_type": "full",
            "bytes_total": 7,
            "vmware_disk_key": "16000",
            "capacity_bytes": 1024,
        },
        {
            "event": "disk_plan",
            "disk_key": "2001",
            "sync_type": "full",
            "bytes_total": 3,
            "vmware_disk_key": "2000",
            "capacity_bytes": 2048,
        },
    )
    status = harness.request("GET", f"/api/v1/status/{JOB}")[1]
    assert [(d["disk_key"], d["target_key"], d["disk_index"]) for d in status["disks"]] == [
        ("16000", "2000", 0),
        ("2000", "2001", 1),
    ]
    assert status["bytes_total"] == 10
    assert [d["capacity_bytes"] for d in status["disks"]] == [1024, 2048]
