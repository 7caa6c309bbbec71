"""The SHA double's rules, in memory: each test fails if the double loses one of the SHA's.

The model is driven through ``routes.dispatch`` with raw request targets and
bodies, as the server drives it, with a clock the tests step; the start of a
backup runs over a fake hub.  The rules come from reference/sha-contract.md
(section in each test's docstring).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.shadouble import gojson
from tests.shadouble.model import Answer, GiB, ShaModel
from tests.shadouble.routes import dispatch
from tests.shadouble.start import Disk, Starter, StartRequest

JOB = "backup-pgtest1-1760099954"
T0 = 1760099954.25


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def model(clock: Clock) -> ShaModel:
    """A two-disk job as ``/_double/jobs`` makes it: parent running, disks pending."""
    m = ShaModel(clock)
    m.rows_only(JOB, "pgtest1", "full", [(0, 102), (1, 5)])
    return m


def call(
    model: ShaModel, method: str, target: str, body: Any = None, raw: Optional[bytes] = None
) -> Answer:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    return dispatch(model, method, target.encode("utf-8"), data).answer


def telemetry(
    model: ShaModel, body: Any = None, raw: Optional[bytes] = None, job: str = JOB
) -> Answer:
    return call(model, "POST", f"/api/v1/telemetry/backup/{job}", body, raw)


def complete(
    model: ShaModel, disk: int, change_id: str = "52 aa/1", nbytes: int = 0, job: str = JOB
) -> Answer:
    """A /complete; the ports it releases are released, as the server does after stopping qemu-nbd."""
    body = {"disk_id": disk, "change_id": change_id, "bytes_transferred": nbytes}
    answer = call(model, "POST", f"/api/v1/backups/{job}/complete", body)
    for port in answer.release_ports:
        model.release_port(port)
    return answer


def changeid(model: ShaModel, query: str) -> Answer:
    return call(model, "GET", f"/api/v1/backups/changeid?{query}")


def parent(model: ShaModel, job: str = JOB) -> Any:
    row = model.job(job)
    assert row is not None
    return row


def disk_row(model: ShaModel, index: int, job: str = JOB) -> Any:
    row = model.disk(job, index)
    assert row is not None
    return row


def assert_text(answer: Answer, status: int, text: str) -> None:
    assert (answer.status, answer.body, answer.content_type) == (
        status,
        text.encode() + b"\n",
        "text/plain; charset=utf-8",
    ), answer


def assert_backup_error(answer: Answer, status: int, error: str) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.content_type == "application/json"
    body: dict[str, Any] = json.loads(answer.body)
    assert list(body) == ["error", "details", "timestamp"], body
    assert body["error"] == error and body["timestamp"] == "", body
    return body


# -- telemetry: decoding (§2.3) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"eta_seconds": 1.0}',
        '{"bytes_transferred": 1e3}',
        '{"total_bytes": "5"}',
        '{"transfer_speed_bps": true}',
        '{"eta_seconds": 9223372036854775808}',
        '{"disks": [{"disk_index": 0.0}]}',
        '{"disks": [{"disk_index": 0, "bytes_transferred": 1.5}]}',
        '{"disks": [{"disk_index": "0"}]}',
        '{"progress_percent": "50"}',
        '{"progress_percent": 1e400}',
        '{"status": 1}',
        '{"error": "boom"}',
        '{"error": []}',
        '{"disks": {}}',
        '{"job_id": 5}',
        "[]",
        "",
        '{"status": "failed",}',
        '{"status": NaN}',
    ],
)
def test_telemetry_bodies_go_refuses_are_400_and_change_nothing(model: ShaModel, raw: str) -> None:
    answer = telemetry(model, raw=raw.encode())
    assert_text(answer, 400, "Invalid request body")
    assert parent(model).last_telemetry_at is None


def test_telemetry_float_fields_take_integers(model: ShaModel) -> None:
    answer = telemetry(
        model,
        raw=b'{"progress_percent": 50, "disks": [{"disk_index": 1, "progress_percent": 7}]}',
    )
    assert answer.status == 200, answer
    assert float(parent(model).progress_percent) == 50.0
    assert float(disk_row(model, 1).progress_percent) == 7.0


def test_telemetry_keys_match_like_go_and_unknown_ones_are_ignored(model: ShaModel) -> None:
    """Exact names first, then case-insensitive; unknown keys and nulls leave fields alone."""
    raw = b'{"STATUS": "failed", "Bytes_Transferred": 5, "whatever": {"x": [1.5]}, "current_phase": null}'
    assert telemetry(model, raw=raw).status == 200
    row = parent(model)
    assert (row.status, row.bytes_transferred, row.current_phase) == ("failed", 5, "pending")


def test_telemetry_reads_one_json_value_and_ignores_what_follows(model: ShaModel) -> None:
    """``json.NewDecoder(...).Decode``: trailing bytes are never read."""
    assert telemetry(model, raw=b'{"status": "failed"} and then some').status == 200
    assert parent(model).status == "failed"


# -- telemetry: the UPDATE (§2.3, §0) ---------------------------------------------------------------


def test_telemetry_for_an_unknown_job_is_500_text(model: ShaModel) -> None:
    answer = telemetry(model, {"status": "running", "bytes_transferred": 1}, job="backup-x-1")
    assert_text(answer, 500, "Failed to process telemetry")


def test_an_unchanged_update_is_500_in_the_same_second_and_200_a_second_later(
    model: ShaModel, clock: Clock
) -> None:
    body = {"status": "running", "bytes_transferred": 10, "progress_percent": 1.5}
    assert telemetry(model, body).status == 200
    # Same values, same second: 0 rows changed; the disk entries are skipped too.
    same = {**body, "disks": [{"disk_index": 0, "bytes_transferred": 10}]}
    assert_text(telemetry(model, same), 500, "Failed to process telemetry")
    assert disk_row(model, 0).bytes_transferred == 0
    clock.advance(1)
    assert telemetry(model, same).status == 200
    assert disk_row(model, 0).bytes_transferred == 10
    assert parent(model).last_telemetry_at == int(T0) + 1


def test_values_rounded_to_the_same_cents_count_as_unchanged(model: ShaModel) -> None:
    """progress_percent is DECIMAL(5,2): 50.474 and 50.471 are both stored as 50.47."""
    assert telemetry(model, {"progress_percent": 50.474}).status == 200
    assert str(parent(model).progress_percent) == "50.47"
    assert telemetry(model, {"progress_percent": 50.471}).status == 500


@pytest.mark.parametrize(("value", "status"), [(999.994, 200), (999.995, 500), (1000, 500)])
def test_progress_percent_must_fit_decimal_5_2(model: ShaModel, value: float, status: int) -> None:
    assert telemetry(model, {"progress_percent": value, "bytes_transferred": 3}).status == status
    assert parent(model).bytes_transferred == (3 if status == 200 else 0)


def test_eta_seconds_must_fit_int(model: ShaModel, clock: Clock) -> None:
    """eta_seconds decodes as Go's 64-bit int but the column is INT."""
    assert telemetry(model, {"eta_seconds": 2**31 - 1}).status == 200
    clock.advance(1)
    assert telemetry(model, {"eta_seconds": 2**31}).status == 500
    assert parent(model).eta_seconds == 2**31 - 1


def test_current_phase_must_fit_varchar_50(model: ShaModel, clock: Clock) -> None:
    assert telemetry(model, {"current_phase": "p" * 50}).status == 200
    clock.advance(1)
    assert telemetry(model, {"current_phase": "q" * 51}).status == 500
    assert parent(model).current_phase == "p" * 50


def test_zero_values_are_not_written(model: ShaModel, clock: Clock) -> None:
    """bytes, totals, speed, eta and progress are written only if > 0; phase only if not empty."""
    full = {
        "current_phase": "transferring",
        "bytes_transferred": 100,
        "total_bytes": 200,
        "transfer_speed_bps": 7,
        "eta_seconds": 9,
        "progress_percent": 50,
    }
    assert telemetry(model, full).status == 200
    clock.advance(1)
    zeros = {k: (0 if k != "current_phase" else "") for k in full}
    assert telemetry(model, zeros).status == 200
    row = parent(model)
    assert (row.current_phase, row.bytes_transferred, row.total_bytes) == ("transferring", 100, 200)
    assert (row.transfer_speed_bps, row.eta_seconds, float(row.progress_percent)) == (7, 9, 50.0)


def test_status_running_or_empty_leaves_the_status(model: ShaModel, clock: Clock) -> None:
    assert telemetry(model, {"status": "failed"}).status == 200
    for status in ("running", ""):
        clock.advance(1)
        assert telemetry(model, {"status": status}).status == 200
        assert parent(model).status == "failed"


def test_other_statuses_are_written_and_completed_sets_completed_at(
    model: ShaModel, clock: Clock
) -> None:
    assert telemetry(model, {"status": "cancelled"}).status == 200
    assert (parent(model).status, parent(model).completed_at) == ("cancelled", None)
    clock.advance(1)
    assert telemetry(model, {"status": "completed"}).status == 200
    assert (parent(model).status, parent(model).completed_at) == ("completed", int(T0) + 1)


def test_a_status_outside_the_enum_fails_the_whole_update(model: ShaModel) -> None:
    answer = telemetry(model, {"status": "in_progress", "bytes_transferred": 5})
    assert_text(answer, 500, "Failed to process telemetry")
    row = parent(model)
    assert (row.status, row.bytes_transferred, row.last_telemetry_at) == ("running", 0, None)


def test_enum_values_match_case_insensitively_but_completed_at_needs_the_exact_word(
    model: ShaModel,
) -> None:
    """MariaDB stores 'Completed' as the ENUM member; the SHA's Go compares the raw text."""
    assert telemetry(model, {"status": "Completed"}).status == 200
    assert (parent(model).status, parent(model).completed_at) == ("completed", None)


@pytest.mark.parametrize(
    ("error", "message"), [({"message": "boom", "code": "X"}, "boom"), ({}, "")]
)
def test_an_error_object_forces_failed(
    model: ShaModel, error: dict[str, str], message: str
) -> None:
    assert telemetry(model, {"status": "completed", "error": error}).status == 200
    row = parent(model)
    assert (row.status, row.error_message, row.completed_at) == ("failed", message, int(T0))


def test_a_null_error_is_no_error(model: ShaModel) -> None:
    assert telemetry(model, {"bytes_transferred": 1, "error": None}).status == 200
    assert (parent(model).status, parent(model).error_message) == ("running", None)


def test_job_type_is_not_used(model: ShaModel) -> None:
    answer = call(model, "POST", f"/api/v1/telemetry/replication/{JOB}", {"bytes_transferred": 4})
    assert answer.status == 200
    assert parent(model).bytes_transferred == 4


def test_the_reply_is_the_shas_json(model: ShaModel) -> None:
    answer = telemetry(model, {"bytes_transferred": 1})
    body = json.loads(answer.body)
    assert list(body) == ["message", "status", "timestamp"]
    assert (body["message"], body["status"]) == ("Telemetry received and processed", "success")


# -- telemetry: disks[] ---------------------------------------------------------------------------


def test_disk_rows_are_selected_by_disk_index_not_position(model: ShaModel) -> None:
    disks = [
        {"disk_index": 1, "bytes_transferred": 7, "status": "running", "progress_percent": 12.5},
    ]
    assert telemetry(model, {"bytes_transferred": 7, "disks": disks}).status == 200
    assert (disk_row(model, 1).bytes_transferred, disk_row(model, 1).status) == (7, "running")
    assert (disk_row(model, 0).bytes_transferred, disk_row(model, 0).status) == (0, "pending")


def test_disk_bytes_and_progress_are_always_written(model: ShaModel, clock: Clock) -> None:
    assert telemetry(model, {"disks": [{"disk_index": 0, "bytes_transferred": 9}]}).status == 200
    clock.advance(1)
    # A null entry is a zero DiskTelemetry: disk_index 0, bytes 0.
    assert telemetry(model, raw=b'{"disks": [null]}').status == 200
    assert disk_row(model, 0).bytes_transferred == 0


def test_a_disk_status_outside_its_enum_is_only_logged(model: ShaModel) -> None:
    body = {
        "bytes_transferred": 1,
        "disks": [{"disk_index": 0, "bytes_transferred": 5, "status": "cancelled"}],
    }
    assert telemetry(model, body).status == 200
    row = disk_row(model, 0)
    assert (row.status, row.bytes_transferred) == ("pending", 0), "the whole disk UPDATE fails"
    assert [(p.kind, p.disk_index) for p in model.problems] == [("telemetry_disk_update_failed", 0)]


def test_a_disk_without_a_row_is_only_logged(model: ShaModel) -> None:
    body = {"bytes_transferred": 1, "disks": [{"disk_index": 2000, "bytes_transferred": 5}]}
    assert telemetry(model, body).status == 200
    assert [(p.kind, p.disk_index) for p in model.problems] == [("telemetry_disk_not_found", 2000)]


def test_a_disk_completed_by_telemetry_sets_completed_at_but_no_change_id(model: ShaModel) -> None:
    body = {"bytes_transferred": 1, "disks": [{"disk_index": 0, "status": "completed"}]}
    assert telemetry(model, body).status == 200
    row = disk_row(model, 0)
    assert (row.status, row.completed_at, row.disk_change_id) == ("completed", int(T0), None)
    assert json.loads(changeid(model, "vm_name=pgtest1").body)["change_id"] == ""


# -- /complete (§2.2) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"disk_id": 1.0, "change_id": "x"}',
        '{"disk_id": "1", "change_id": "x"}',
        '{"disk_id": true, "change_id": "x"}',
        '{"change_id": "x", "bytes_transferred": 1e3}',
        '{"change_id": "x", "bytes_transferred": 9223372036854775808}',
        '{"change_id": 5}',
        "[]",
        "",
    ],
)
def test_complete_bodies_go_refuses_are_400_json(model: ShaModel, raw: str) -> None:
    answer = call(model, "POST", f"/api/v1/backups/{JOB}/complete", raw=raw.encode())
    assert_backup_error(answer, 400, "invalid request body")
    assert disk_row(model, 1).status == "pending"


def test_the_400_details_are_gos_error_text(model: ShaModel) -> None:
    raw = b'{"disk_id": 1.5, "change_id": "x"}'
    body = assert_backup_error(
        call(model, "POST", f"/api/v1/backups/{JOB}/complete", raw=raw), 400, "invalid request body"
    )
    assert (
        body["details"]
        == "json: cannot unmarshal number 1.5 into Go struct field .disk_id of type int"
    )


@pytest.mark.parametrize(
    "raw", ["{}", '{"change_id": ""}', '{"change_id": null, "disk_id": 0}', "null"]
)
def test_complete_needs_a_change_id(model: ShaModel, raw: str) -> None:
    answer = call(model, "POST", f"/api/v1/backups/{JOB}/complete", raw=raw.encode())
    assert_backup_error(answer, 400, "missing change_id")


def test_disk_id_absent_means_disk_0(model: ShaModel) -> None:
    answer = call(model, "POST", f"/api/v1/backups/{JOB}/complete", {"change_id": "c"})
    assert answer.status == 200
    assert (disk_row(model, 0).status, disk_row(model, 1).status) == ("completed", "pending")


def test_complete_for_an_unknown_job_or_disk_index_is_404(model: ShaModel) -> None:
    body = assert_backup_error(
        complete(model, 0, job="backup-pgtest1-1"), 404, "backup job not found"
    )
    assert body["details"] == "backup disk not found: job_id=backup-pgtest1-1 disk_index=0"
    assert_backup_error(complete(model, 2), 404, "backup job not found")
    assert_backup_error(complete(model, 2000), 404, "backup job not found")


def test_complete_writes_the_disk_row(model: ShaModel) -> None:
    answer = complete(model, 1, "52 1d/212", 5368709120)
    assert answer.status == 200
    assert list(json.loads(answer.body)) == [
        "backup_id",
        "change_id",
        "message",
        "status",
        "timestamp",
    ]
    row = disk_row(model, 1)
    assert (row.status, row.disk_change_id, row.bytes_transferred, row.completed_at) == (
        "completed",
        "52 1d/212",
        5368709120,
        int(T0),
    )
    assert disk_row(model, 0).status == "pending"
    assert parent(model).status == "running", "one disk of two does not complete the job"
    assert answer.release_ports == ()


def test_a_change_id_longer_than_its_column_is_500(model: ShaModel) -> None:
    assert_backup_error(complete(model, 0, "c" * 256), 500, "failed to complete backup")
    assert complete(model, 0, "c" * 255).status == 200


def test_the_last_disk_completes_the_job(model: ShaModel, clock: Clock) -> None:
    assert complete(model, 0, "c0", 3).status == 200
    clock.advance(2)
    assert complete(model, 1, "c1", 4).status == 200
    row = parent(model)
    assert (row.status, row.completed_at, row.bytes_transferred) == ("completed", int(T0) + 2, 7)
    assert model.branch_runs == {JOB: 1}
    assert model.contexts[row.vm_backup_context_id].successful_backups == 1


def test_the_parent_keeps_bytes_telemetry_set(model: ShaModel) -> None:
    assert telemetry(model, {"bytes_transferred": 1000}).status == 200
    complete(model, 0, "c0", 3)
    complete(model, 1, "c1", 4)
    assert parent(model).bytes_transferred == 1000


def test_an_identical_repeat_is_404_in_the_same_second_and_reruns_the_branch_later(
    model: ShaModel, clock: Clock
) -> None:
    complete(model, 0, "c0")
    complete(model, 1, "c1")
    assert_backup_error(complete(model, 1, "c1"), 404, "backup job not found")
    assert model.branch_runs == {JOB: 1}
    clock.advance(1)
    assert complete(model, 1, "c1").status == 200
    assert model.branch_runs == {JOB: 2}
    context_id = parent(model).vm_backup_context_id
    assert model.contexts[context_id].successful_backups == 2


def test_complete_turns_a_failed_job_completed(model: ShaModel) -> None:
    telemetry(model, {"status": "failed", "error": {"message": "x"}})
    complete(model, 0, "c0")
    complete(model, 1, "c1")
    assert parent(model).status == "completed"


def test_the_branch_releases_every_port_of_the_vm_name(model: ShaModel) -> None:
    """§1.4: ports of the VM name cut out of the job id, other jobs of that VM included."""
    model.allocate_port(
        "backup-pgtest1-disk0-x-disk0", "pgtest1", "pgtest1-disk0", range(10700, 10800)
    )
    model.allocate_port(
        "backup-pgtest1-disk1-x-disk1", "pgtest1", "pgtest1-disk1", range(10700, 10800)
    )
    model.allocate_port("leak-disk0", "pgtest1", "pgtest1-disk0", range(10700, 10800))
    model.allocate_port("other-disk0", "pgtest10", "pgtest10-disk0", range(10700, 10800))
    assert complete(model, 0, "c0").release_ports == ()
    assert complete(model, 1, "c1").release_ports == (10700, 10701, 10702)


def test_ports_are_allocated_lowest_first_and_skip_unusable_ones(model: ShaModel) -> None:
    ports = range(10700, 10800)
    assert model.allocate_port("a", "vm", "vm-disk0", ports) == 10700
    assert model.allocate_port("b", "vm", "vm-disk1", ports, lambda p: p != 10701) == 10702
    model.release_port(10700)
    assert model.allocate_port("c", "vm", "vm-disk2", ports) == 10700


# -- changeid (§2.1) ------------------------------------------------------------------------------


def test_changeid_needs_a_vm_name(model: ShaModel) -> None:
    assert_backup_error(changeid(model, "disk_id=0"), 400, "missing vm_name")
    assert_backup_error(changeid(model, "vm_name=&disk_id=0"), 400, "missing vm_name")
    # A pair with ';' is dropped by Go's ParseQuery.
    assert_backup_error(changeid(model, "vm_name=pgtest1;x"), 400, "missing vm_name")


@pytest.mark.parametrize("disk_id", ["x", "1.0", "%201", "0x1", "1_0", "99999999999999999999", "-"])
def test_changeid_disk_id_must_be_what_atoi_takes(model: ShaModel, disk_id: str) -> None:
    assert_backup_error(
        changeid(model, f"vm_name=pgtest1&disk_id={disk_id}"), 400, "invalid disk_id"
    )


@pytest.mark.parametrize(
    ("disk_id", "echoed"), [("", "0"), ("%2B1", "1"), ("-0", "0"), ("007", "7")]
)
def test_changeid_disk_id_is_echoed_as_the_integer_read(
    model: ShaModel, disk_id: str, echoed: str
) -> None:
    answer = changeid(model, f"vm_name=pgtest1&disk_id={disk_id}")
    assert json.loads(answer.body)["disk_id"] == echoed


def test_changeid_without_a_previous_backup(model: ShaModel) -> None:
    answer = changeid(model, "vm_name=pgtest1")
    assert answer.status == 200
    assert answer.body == (
        b'{"change_id":"","disk_id":"0","message":"No previous backup found","vm_name":"pgtest1"}\n'
    )


def test_changeid_with_a_previous_backup_is_a_sorted_string_map(model: ShaModel) -> None:
    complete(model, 1, "52 1d/212")
    answer = changeid(model, "vm_name=pgtest1&disk_id=1")
    assert answer.body == (
        b'{"backup_job_id":"backup-pgtest1-1760099954","change_id":"52 1d/212","disk_id":"1",'
        b'"message":"Previous change_id found","vm_name":"pgtest1"}\n'
    )


def test_changeid_takes_the_newest_completion_of_any_job_of_the_vm(
    model: ShaModel, clock: Clock
) -> None:
    second = "backup-pgtest1-1760100000"
    model.rows_only(second, "pgtest1", "incremental", [(0, 102)])
    clock.advance(5)
    complete(model, 0, "newer", job=second)
    clock.advance(5)
    complete(model, 0, "older-job-later", job=JOB)
    body = json.loads(changeid(model, "vm_name=pgtest1&disk_id=0").body)
    assert (body["change_id"], body["backup_job_id"]) == ("older-job-later", JOB)


@pytest.mark.parametrize("name", ["pgtest1", "PGTEST1", "pgtést1", "pgtest1%20%20"])
def test_changeid_matches_vm_names_as_the_collation_does(clock: Clock, name: str) -> None:
    model = ShaModel(clock)
    model.rows_only("backup-PgTest1-1", "PgTest1", "full", [(0, 1)])
    complete(model, 0, "c0", job="backup-PgTest1-1")
    body = json.loads(changeid(model, f"vm_name={name}").body)
    assert body["change_id"] == "c0"
    assert body["vm_name"] == name.replace("%20", " "), "the name is echoed as asked"


def test_changeid_does_not_match_another_vm(model: ShaModel) -> None:
    complete(model, 0, "c0")
    assert json.loads(changeid(model, "vm_name=pgtest10").body)["change_id"] == ""


def test_changeid_logs_a_tie_the_database_would_decide(model: ShaModel) -> None:
    model.rows_only("backup-pgtest1-2", "pgtest1", "full", [(0, 1)])
    complete(model, 0, "a")
    complete(model, 0, "b", job="backup-pgtest1-2")
    changeid(model, "vm_name=pgtest1")
    assert "changeid_tie" in [p.kind for p in model.problems]


# -- routing (§0, §6) -----------------------------------------------------------------------------


def test_ids_are_matched_on_the_percent_decoded_path(clock: Clock) -> None:
    model = ShaModel(clock)
    job = "backup-vm é x-1760099954"
    model.rows_only(job, "vm é x", "full", [(0, 1)])
    encoded = "backup-vm%20%C3%A9%20x-1760099954"
    assert (
        call(model, "POST", f"/api/v1/telemetry/backup/{encoded}", {"bytes_transferred": 1}).status
        == 200
    )
    assert complete(model, 0, job=encoded).status == 200
    assert parent(model, job).status == "completed"


def test_a_recased_id_finds_its_rows_but_is_logged_and_releases_nothing(model: ShaModel) -> None:
    """The id columns are *_ci: the database matches; the port release compares bytes (§1.4)."""
    model.allocate_port("k0", "pgtest1", "pgtest1-disk0", range(10700, 10800))
    recased = JOB.upper()
    assert telemetry(model, {"bytes_transferred": 1}, job=recased).status == 200
    assert complete(model, 0, job=recased).status == 200
    assert complete(model, 1, job=recased).release_ports == ()
    assert parent(model).status == "completed"
    kinds = [p.kind for p in model.problems]
    assert kinds == ["id_matched_by_collation"] * 3


def test_an_encoded_slash_in_an_id_does_not_match_the_route(model: ShaModel) -> None:
    assert_text(complete(model, 0, job="backup-a%2Fb-1"), 404, "404 page not found")
    assert_text(telemetry(model, {"bytes_transferred": 1}, job="a%2Fb"), 404, "404 page not found")


def test_other_methods_on_a_route_are_405_and_unknown_paths_404(model: ShaModel) -> None:
    assert call(model, "GET", f"/api/v1/backups/{JOB}/complete") == Answer(405)
    assert call(model, "POST", "/api/v1/backups/changeid") == Answer(405)
    assert call(model, "OPTIONS", f"/api/v1/telemetry/backup/{JOB}") == Answer(405)
    assert_text(call(model, "GET", "/api/v1/nothing"), 404, "404 page not found")
    assert_text(call(model, "POST", f"/api/v1/backups/{JOB}/complete/"), 404, "404 page not found")


def test_a_path_that_is_not_clean_is_redirected(model: ShaModel) -> None:
    answer = call(model, "POST", "/api/v1//backups/a%20b/./complete?x=1")
    assert answer.status == 301
    assert dict(answer.headers)["Location"] == "/api/v1/backups/a%20b/complete?x=1"


def test_a_bad_escape_is_400_from_the_server(model: ShaModel) -> None:
    assert_text(call(model, "GET", "/api/v1/backups/%zz/complete"), 400, "400 Bad Request")


def test_the_shas_other_backup_routes_are_not_emulated(model: ShaModel) -> None:
    assert call(model, "GET", f"/api/v1/backups/{JOB}").status == 501
    assert call(model, "POST", "/api/v1/backups").status == 501


def test_plus_in_a_query_is_a_space(clock: Clock) -> None:
    model = ShaModel(clock)
    model.rows_only("backup-a b-1", "a b", "full", [(0, 1)])
    complete(model, 0, "c0", job="backup-a%20b-1")
    assert json.loads(changeid(model, "vm_name=a+b&vm_name=zzz").body)["change_id"] == "c0"


# -- saving ---------------------------------------------------------------------------------------


def test_the_model_survives_json_but_allocations_do_not(model: ShaModel, clock: Clock) -> None:
    telemetry(model, {"progress_percent": 12.34, "disks": [{"disk_index": 7}]})
    complete(model, 0, "c0")
    model.allocate_port("k", "pgtest1", "pgtest1-disk0", range(10700, 10701))
    loaded = ShaModel.from_json(json.loads(json.dumps(model.to_json())), clock)
    assert {k: v for k, v in loaded.snapshot().items() if k != "port_allocations"} == {
        k: v for k, v in model.snapshot().items() if k != "port_allocations"
    }
    assert str(parent(loaded).progress_percent) == "12.34"
    assert loaded.allocations == {}, "the SHA keeps allocations in memory only (§1.4)"
    loaded.rows_only("backup-pgtest1-2", "pgtest1", "full", [(0, 1)])
    assert disk_row(loaded, 0, "backup-pgtest1-2").id == 3


# -- gojson -----------------------------------------------------------------------------------------


def test_go_encoding_escapes_html_and_keeps_other_characters() -> None:
    assert (
        gojson.encode({"b": "<a&b>\u2028é", "a": 1})
        == b'{"a":1,"b":"\\u003ca\\u0026b\\u003e\\u2028\xc3\xa9"}\n'
    )


def test_go_decoding_folds_kelvin_and_long_s_like_go() -> None:
    kind = gojson.Struct("T", (("ks", gojson.STRING),))
    assert gojson.decode('{"\u212a\u017f": "x"}'.encode(), kind) == {"ks": "x"}


# -- starting a backup (§1.1, §1.2) ---------------------------------------------------------------


class FakeHub:
    """Records what the start asks of the hub; the node answers ``sna_status``."""

    def __init__(self, sna_status: int = 200, busy: tuple[int, ...] = ()) -> None:
        self.sna_status = sna_status
        self.busy = busy
        self.files: dict[Path, tuple[str, Any]] = {}
        self.removed: list[Path] = []
        self.serving: dict[int, tuple[str, Path]] = {}
        self.stopped: list[int] = []
        self.posts: list[tuple[str, bytes]] = []

    def create_full(self, path: Path, size_bytes: int) -> None:
        self.files[path] = ("full", size_bytes)

    def create_overlay(self, path: Path, backing: Path) -> None:
        self.files[path] = ("overlay", backing)

    def remove(self, path: Path) -> None:
        self.removed.append(path)
        self.files.pop(path, None)

    def port_usable(self, port: int) -> bool:
        return port not in self.busy

    def serve(self, port: int, export: str, qcow2: Path, job_key: str, vm_name: str) -> int:
        self.serving[port] = (export, qcow2)
        return 40000 + port

    def stop(self, port: int) -> None:
        self.stopped.append(port)
        self.serving.pop(port, None)

    def post_json(self, url: str, body: bytes) -> tuple[int, bytes]:
        self.posts.append((url, body))
        return self.sna_status, b'{"status":"started"}'


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


def starter(model: ShaModel, hub: FakeHub, workdir: Path = Path("/hub")) -> Starter:
    @contextmanager
    def change() -> Iterator[ShaModel]:
        yield model

    return Starter(change, hub, workdir, range(10700, 10800))


def request(
    backup_type: str = "full", vm: str = "pgtest1", disks: tuple[Disk, ...] = ()
) -> StartRequest:
    return StartRequest(
        vm_name=vm,
        backup_type=backup_type,
        sna_url="http://127.0.0.1:9081",
        vcenter_host="vc:443",
        vcenter_user="u",
        vcenter_password="p<&>",
        vm_path=f"/DC1/vm/{vm}",
        disks=disks or (Disk("disk-2000", 2), Disk("disk-16000", 1)),
        sna_extra={"vcenter_thumbprint": "AB:CD"},
    )


def test_a_full_start_orders_disks_as_text_and_sends_the_shas_body(
    clock: Clock, hub: FakeHub
) -> None:
    model = ShaModel(clock)
    hub.busy = (10700,)
    reply = starter(model, hub).start(request())
    assert reply.status == 200, reply
    job = "backup-pgtest1-1760099954"
    # "disk-16000" sorts before "disk-2000": it is disk 0, 1 GiB.
    sizes = {str(p): v for p, v in hub.files.items()}
    stamp = model.per_disk_id("pgtest1", 0).rsplit("-", 2)[-2:]
    disk0 = f"/hub/pgtest1/disk-0/backup-pgtest1-disk0-{'-'.join(stamp)}.qcow2"
    assert sizes[disk0] == ("full", 1 * GiB)
    assert [p for p in reply.body["ports"]] == [10701, 10702]
    targets = "2000:nbd://127.0.0.1:10701/pgtest1-disk0,2001:nbd://127.0.0.1:10702/pgtest1-disk1"
    assert hub.posts == [
        (
            "http://127.0.0.1:9081/api/v1/backup/start",
            (
                b'{"backup_type":"full","job_id":"%s","nbd_host":"127.0.0.1","nbd_targets":"%s",'
                b'"previous_change_id":"PLACEHOLDER","vcenter_host":"vc:443",'
                b'"vcenter_password":"p\\u003c\\u0026\\u003e","vcenter_thumbprint":"AB:CD",'
                b'"vcenter_user":"u","vm_name":"pgtest1","vm_path":"/DC1/vm/pgtest1"}'
            )
            % (job.encode(), targets.encode()),
        )
    ]
    assert reply.body["backup_id"] == job and reply.body["nbd_targets_string"] == targets
    assert parent(model, job).status == "running"
    assert {d.disk_index: d.size_gb for d in model.disks_of(job)} == {0: 1, 1: 2}
    assert all(d.status == "pending" for d in model.disks_of(job))
    per_disk = [j for j in model.jobs.values() if not j.is_parent]
    assert [(j.status, j.disk_id, j.total_bytes) for j in per_disk] == [
        ("pending", 0, 1 * GiB),
        ("pending", 1, 2 * GiB),
    ]


def test_an_incremental_start_needs_a_completed_disk_with_a_change_id(
    clock: Clock, hub: FakeHub
) -> None:
    """§1.3: checked per disk; the prepared disks are cleaned up, per-disk rows and files stay."""
    model = ShaModel(clock)
    two = (Disk("disk-2000", 1), Disk("disk-2001", 1))
    full = starter(model, hub).start(request(disks=two)).body["backup_id"]
    complete(model, 0, "c0", job=full)
    complete(model, 1, "c1", job=full)
    clock.advance(1)
    three = (*two, Disk("disk-2002", 1))
    reply = starter(model, hub).start(request("incremental", disks=three))
    assert (reply.status, reply.body) == (
        400,
        {
            "error": "no previous backup found",
            "details": "full backup required before incremental",
            "timestamp": "",
        },
    )
    job = f"backup-pgtest1-{int(T0) + 1}"
    assert model.job(job) is None and model.disks_of(job) == []
    assert sorted(hub.stopped) == [10700, 10701] and model.allocations == {}
    overlays = [v for v in hub.files.values() if v[0] == "overlay"]
    assert len(overlays) == 2, "the qcow2 files of the prepared disks stay"
    assert len([j for j in model.jobs.values() if not j.is_parent]) == 4


def test_an_incremental_overlays_the_chains_latest_file(clock: Clock, hub: FakeHub) -> None:
    model = ShaModel(clock)
    one = (Disk("disk-2000", 1),)
    full = starter(model, hub).start(request(disks=one)).body
    complete(model, 0, "c0", job=full["backup_id"])
    clock.advance(1)
    incremental = starter(model, hub).start(request("incremental", disks=one)).body
    assert hub.files[Path(incremental["qcow2_paths"][0])] == (
        "overlay",
        Path(full["qcow2_paths"][0]),
    )
    assert incremental["ports"] == [10700], "the full's port was released at its completion"


def test_a_node_refusing_the_start_cleans_up(clock: Clock) -> None:
    model = ShaModel(clock)
    hub = FakeHub(sna_status=409)
    reply = starter(model, hub).start(request())
    assert reply.status == 500 and reply.body["error"] == "SNA API error", reply
    assert (reply.body["details"], reply.body["sna_status"]) == ("status: 409", 409)
    assert model.job("backup-pgtest1-1760099954") is None and model.disks == []
    assert sorted(hub.stopped) == [10700, 10701] and model.allocations == {}
    assert len(model.jobs) == 2 and len(hub.files) == 2, "per-disk rows and files stay"


def test_two_starts_of_a_vm_in_one_second_collide(clock: Clock, hub: FakeHub) -> None:
    model = ShaModel(clock)
    assert starter(model, hub).start(request(disks=(Disk("disk-2000", 1),))).status == 200
    reply = starter(model, hub).start(request(disks=(Disk("disk-2000", 1),)))
    assert (reply.status, reply.body["error"]) == (500, "failed to create parent backup job")


def test_a_vm_name_too_long_for_the_per_disk_id_fails_the_prepare(
    clock: Clock, hub: FakeHub
) -> None:
    """§6: the per-disk id is the name + 29 characters, in VARCHAR(64)."""
    model = ShaModel(clock)
    reply = starter(model, hub).start(request(vm="v" * 36, disks=(Disk("disk-2000", 1),)))
    assert (reply.status, reply.body["error"]) == (500, "failed to prepare backup disk")
    assert len(hub.removed) == 1 and hub.files == {}, "LR removes the file it made"
    assert model.jobs == {}
    assert (
        starter(model, hub).start(request(vm="v" * 35, disks=(Disk("disk-2000", 1),))).status == 200
    )


def test_chains_advance_only_when_every_disk_is_completed(clock: Clock, hub: FakeHub) -> None:
    """§2.2 step 3: per-disk rows completed and chains advanced in the all-completed branch only."""
    model = ShaModel(clock)
    two = (Disk("disk-2000", 1), Disk("disk-2001", 1))
    started = starter(model, hub).start(request(disks=two)).body
    job = started["backup_id"]
    per_disk = [r["per_disk_backup_id"] for r in started["disk_results"]]
    complete(model, 0, "c0", job=job)
    assert model.chains == {}
    assert [parent(model, p).status for p in per_disk] == ["pending", "pending"]
    clock.advance(1)
    complete(model, 1, "c1", job=job)
    assert [parent(model, p).status for p in per_disk] == ["completed", "completed"]
    context = parent(model, job).vm_backup_context_id
    chain = model.chains[f"chain-{context}-disk1"]
    assert (chain.latest_backup_id, chain.full_backup_id, chain.total_backups) == (
        per_disk[1],
        per_disk[1],
        1,
    )
    assert model.problems == []
    assert model.allocations == {}, "the answer's ports were released"


def test_rows_only_jobs_complete_without_problems(model: ShaModel) -> None:
    complete(model, 0, "c0")
    complete(model, 1, "c1")
    assert model.problems == []
    assert len(model.chains) == 2
