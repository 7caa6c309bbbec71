"""Replication jobs in memory: the request, the plan from the chain, the chain's rows and
store, the request's jobs as one, what the SHA is sent, and the manager starting them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.filepath import FilePath

from sna.api.http import ApiError
from sna.api.replicate import parse_replicate_request
from sna.config import Settings
from sna.contract.targets import NbdTarget
from sna.jobs import replication
from sna.jobs.manager import JobManager, PortInUse, TargetUnreachable
from sna.jobs.model import Job, JobStatus
from sna.jobs.store import SCHEMA_VERSION, ChainRow, SQLiteJobStore
from sna.nbd.probe import ProbeFailed
from sna.sbc import events
from sna.sha import messages
from sna.sha.client import ShaClient
from sna.tap import Options
from sna.testing import (
    FakeGateway,
    FakeHub,
    FakeLauncher,
    MemoryJobStore,
    SteppingClock,
    failure_of,
    result_of,
)
from tests.unit.test_model import T0

SETTINGS = Settings()


def body(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "job_id": "job-20261126-091203.120-a1b2c3",
        "vcenter": "VC.example.local",
        "username": "administrator@vsphere.local",
        "password": "pa55 word",
        "vm_paths": ["/DC1/vm/pg"],
        "oma_url": "http://127.0.0.1:8082",
        "nbd_targets": [
            {
                "device_path": "nbd://127.0.0.1:10100/vol-1",
                "vm_disk_id": 0,
                "vmware_disk_key": "2000",
            },
            {
                "device_path": "nbd://127.0.0.1:10101/vol-2",
                "vm_disk_id": 1,
                "vmware_disk_key": 2001,
            },
        ],
    }
    value.update(overrides)
    return value


def refused(value: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_replicate_request(value, SETTINGS)
    assert caught.value.status == 400
    return caught.value


# -- the request ---------------------------------------------------------------------------------


def test_one_vm_takes_every_target_under_the_request_s_job_id() -> None:
    request = parse_replicate_request(body(), SETTINGS)
    [vm] = request.vms
    assert (vm.job_id, vm.vm_path, vm.vm_name) == (request.job_id, "/DC1/vm/pg", "pg")
    assert vm.targets == (
        NbdTarget("2000", "127.0.0.1", 10100, "vol-1"),
        NbdTarget("2001", "127.0.0.1", 10101, "vol-2"),
    )
    assert request.vcenter_key == "vc.example.local:443"
    assert "pa55" not in repr(request)


def test_several_vms_pair_with_targets_by_vm_path_or_in_order() -> None:
    targets = [
        {
            "device_path": "nbd://127.0.0.1:10102/c",
            "vmware_disk_key": "2000",
            "vm_path": "DC1/vm/b/",
        },
        {
            "device_path": "nbd://127.0.0.1:10100/a",
            "vmware_disk_key": "2000",
            "vm_path": "/DC1/vm/a",
        },
        {
            "device_path": "nbd://127.0.0.1:10101/b",
            "vmware_disk_key": "2001",
            "vm_path": "/DC1/vm/a",
        },
    ]
    request = parse_replicate_request(
        body(vm_paths=["/DC1/vm/a", "/DC1/vm/b"], nbd_targets=targets), SETTINGS
    )
    assert [(vm.job_id, [t.export for t in vm.targets]) for vm in request.vms] == [
        ("job-20261126-091203.120-a1b2c3-1", ["a", "b"]),
        ("job-20261126-091203.120-a1b2c3-2", ["c"]),
    ]
    # Without vm_path, several VMs take one target each, in order (the Go SNA's pairing).
    for target in targets:
        del target["vm_path"]
    request = parse_replicate_request(
        body(vm_paths=["/DC1/vm/x", "/DC1/vm/y", "/DC1/vm/z"], nbd_targets=targets), SETTINGS
    )
    assert [[t.export for t in vm.targets] for vm in request.vms] == [["c"], ["a"], ["b"]]
    error = refused(body(vm_paths=["/DC1/vm/x", "/DC1/vm/y"], nbd_targets=targets))
    assert error.field == "nbd_targets" and "3 entries for 2 VMs" in error.message


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"job_id": None}, "job_id", "job_id is required"),
        ({"job_id": 7}, "job_id", "must be a string"),
        ({"job_id": "a/b"}, "job_id", "'/'"),
        ({"vcenter": None}, "vcenter", "vcenter is required"),
        ({"password": ""}, "password", "password is required"),
        ({"vm_paths": None}, "vm_paths", "vm_paths is required"),
        ({"vm_paths": ["/DC1/vm/pg", "DC1/vm/pg"]}, "vm_paths", "a second time"),
        ({"vm_paths": [""]}, "vm_paths", "vm_paths[0]"),
        ({"vm_paths": ["/DC1/vm/\x1b"]}, "vm_paths", "control character"),
        ({"nbd_targets": []}, "nbd_targets", "nbd_targets is required"),
        ({"nbd_targets": "2000:nbd://127.0.0.1:10100/x"}, "nbd_targets", "must be a list"),
        ({"nbd_targets": [5]}, "nbd_targets", "nbd_targets[0] must be an object"),
        ({"oma_url": 5}, "oma_url", "oma_url must be a string"),
    ],
)
def test_a_bad_request_is_refused_naming_the_field(
    overrides: dict[str, Any], field: str, words: str
) -> None:
    error = refused(body(**overrides))
    assert error.field == field and words in error.message, error.message


OK_PATH = "nbd://127.0.0.1:10100/x"


@pytest.mark.parametrize(
    ("entry", "field", "words"),
    [
        ({"device_path": OK_PATH}, ".vmware_disk_key", "is required"),
        ({"device_path": OK_PATH, "vmware_disk_key": "20a0"}, ".vmware_disk_key", "a decimal"),
        ({"device_path": OK_PATH, "vmware_disk_key": True}, ".vmware_disk_key", "a decimal"),
        ({"vmware_disk_key": "2000"}, ".device_path", "is required"),
        (
            {"device_path": "nbd://10.0.0.9:10100/x", "vmware_disk_key": "2000"},
            ".device_path",
            "not an allowed NBD host",
        ),
        (
            {"device_path": "nbd://127.0.0.1:99/x", "vmware_disk_key": "2000"},
            ".device_path",
            "outside the allowed",
        ),
        (
            {"device_path": "http://127.0.0.1:10100/x", "vmware_disk_key": "2000"},
            ".device_path",
            "nbd://",
        ),
        (
            {"device_path": OK_PATH + ",2001:nbd://h:1/y", "vmware_disk_key": "2000"},
            ".device_path",
            "is not an nbd://",
        ),
        (
            {"device_path": OK_PATH, "vmware_disk_key": "2000", "vm_disk_id": "0"},
            ".vm_disk_id",
            "an integer",
        ),
        (
            {"device_path": OK_PATH, "vmware_disk_key": "2000", "vm_path": "/DC1/vm/other"},
            ".vm_path",
            "one of vm_paths",
        ),
    ],
)
def test_a_bad_target_is_refused_naming_its_field(
    entry: dict[str, Any], field: str, words: str
) -> None:
    error = refused(body(nbd_targets=[entry]))
    assert error.field == "nbd_targets[0]" + field, (error.field, error.message)
    assert words in error.message, error.message


def test_disks_and_ports_are_given_once() -> None:
    twice = [
        {"device_path": "nbd://127.0.0.1:10100/a", "vmware_disk_key": "2000"},
        {"device_path": "nbd://127.0.0.1:10101/b", "vmware_disk_key": "2000"},
    ]
    assert "disk 2000 of /DC1/vm/pg twice" in refused(body(nbd_targets=twice)).message
    shared = [
        {"device_path": "nbd://127.0.0.1:10100/a", "vmware_disk_key": "2000", "vm_path": "/a/vm/a"},
        {"device_path": "nbd://127.0.0.1:10100/b", "vmware_disk_key": "2000", "vm_path": "/a/vm/b"},
    ]
    error = refused(body(vm_paths=["/a/vm/a", "/a/vm/b"], nbd_targets=shared))
    assert "NBD port 10100" in error.message
    mixed = [dict(shared[0]), {"device_path": "nbd://127.0.0.1:10101/b", "vmware_disk_key": "1"}]
    assert (
        "every entry names its vm_path or none"
        in refused(body(vm_paths=["/a/vm/a", "/a/vm/b"], nbd_targets=mixed)).message
    )


def test_a_job_id_too_long_for_its_vms_is_refused() -> None:
    targets = [
        {"device_path": f"nbd://127.0.0.1:{10100 + n}/v{n}", "vmware_disk_key": "2000"}
        for n in range(2)
    ]
    error = refused(body(job_id="j" * 254, vm_paths=["/D/vm/a", "/D/vm/b"], nbd_targets=targets))
    assert error.field == "job_id" and "too long for 2 VMs" in error.message
    parse_replicate_request(body(job_id="j" * 255), SETTINGS)


# -- the plan and the chain ------------------------------------------------------------------------


def row(disk_key: str, target: str, change_id: str, capacity: int = 1 << 20) -> ChainRow:
    return ChainRow("vc:443", "/DC1/vm/pg", disk_key, target, change_id, capacity, "old", "t")


def test_each_disk_starts_from_its_row_for_the_same_target() -> None:
    request = parse_replicate_request(body(), SETTINGS)
    # Disk 2000's volume is served on another port this time: the same target.
    rows = [row("2000", "127.0.0.1/vol-1", "52 aa/7"), row("2001", "127.0.0.1/other", "52 bb/3")]
    [planned] = replication.plan(request, [rows])
    assert planned.kind == "replication" and planned.replication_id == request.job_id
    assert planned.backup_type == "incremental"
    assert planned.previous_change_ids == (("2000", "52 aa/7"),)
    assert planned.previous_sources == (("2000", "chain"),)
    assert planned.previous_capacities == (("2000", 1 << 20),)
    [(key, note)] = planned.previous_notes
    assert key == "2001"
    assert note == (
        "the last replication of disk 2001 (job old) went to target 127.0.0.1/other, "
        "not 127.0.0.1/vol-2"
    )
    # No rows at all: every disk in full, without a note.
    [fresh] = replication.plan(request, [[]])
    assert fresh.previous_change_ids == () and fresh.previous_notes == ()


def test_a_completed_replication_leaves_one_row_per_disk_with_a_change_id() -> None:
    request = parse_replicate_request(body(), SETTINGS)
    [planned] = replication.plan(request, [[]])
    job = Job.from_request(planned, T0)
    job = job.apply(events.DiskPlan("2000", "full", 10, capacity_bytes=1 << 21), T0)
    job = job.apply(events.DiskDone("2000", change_id="52 cc/1"), T0)
    assert replication.chain_rows(job, "vc:443", "now") == []  # still running
    done = job.ended(T0, 0, None, None)
    assert replication.chain_rows(done, "vc:443", "now") == [
        ChainRow(
            "vc:443", "/DC1/vm/pg", "2000", "127.0.0.1/vol-1", "52 cc/1", 1 << 21, job.job_id, "now"
        )
    ]
    assert replication.chain_rows(job.ended(T0, 3, None, None), "vc:443", "now") == []
    backup = attrs.evolve(done, kind="backup", replication_id=None)
    assert replication.chain_rows(backup, "vc:443", "now") == []


def test_the_job_shows_why_sna_had_no_base_for_a_disk() -> None:
    request = parse_replicate_request(body(), SETTINGS)
    [planned] = replication.plan(request, [[row("2001", "127.0.0.1/other", "52 bb/3")]])
    job = Job.from_request(planned, T0)
    job = job.apply(
        events.DiskPlan("2001", "full", 10, "no previous change ID for this disk"),
        T0,
    )
    disk = job.disks[1]
    assert disk.sync_reason == (
        "no previous change ID for this disk: the last replication of disk 2001 (job old) "
        "went to target 127.0.0.1/other, not 127.0.0.1/vol-2"
    )
    again = Job.from_record(json.loads(json.dumps(job.to_record())))
    assert (again.kind, again.replication_id, again.disks[1].nbd_host) == (
        "replication",
        request.job_id,
        "127.0.0.1",
    )


def test_the_chain_is_stored_by_its_key_and_a_version_4_database_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " started_at TEXT NOT NULL, last_update TEXT NOT NULL, record TEXT NOT NULL);"
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE vcenter_pins (host TEXT NOT NULL, port INTEGER NOT NULL,"
        " thumbprint TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (host, port));"
        "INSERT INTO settings VALUES ('max_jobs', '4');"
        "PRAGMA user_version=4;"
    )
    db.close()
    store = SQLiteJobStore(FilePath(str(path)))
    assert store.chain_rows("vc:443", "/DC1/vm/pg") == []
    first = [row("2000", "h/a", "52 aa/1"), row("2001", "h/b", "52 bb/1")]
    store.chain_save(first)
    newer = attrs.evolve(first[0], change_id="52 aa/2", updated_at="u")
    store.chain_save([newer, row("2000", "h/c", "52 aa/9")])
    assert store.load_settings() == {"max_jobs": 4}
    store.close()
    again = SQLiteJobStore(FilePath(str(path)))
    assert again.chain_rows("vc:443", "/DC1/vm/pg") == [
        newer,
        row("2000", "h/c", "52 aa/9"),
        first[1],
    ]
    assert again.chain_rows("vc:443", "/DC1/vm/other") == []
    again.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    db.close()


# -- the request's jobs as one, and the SHA's messages ---------------------------------------------


def two_jobs() -> tuple[Job, Job]:
    targets = [
        {"device_path": "nbd://127.0.0.1:10100/a", "vmware_disk_key": "2000"},
        {"device_path": "nbd://127.0.0.1:10101/b", "vmware_disk_key": "2016"},
    ]
    request = parse_replicate_request(
        body(vm_paths=["/DC1/vm/a", "/DC1/vm/b"], nbd_targets=targets), SETTINGS
    )
    first, second = (Job.from_request(r, T0) for r in replication.plan(request, [[], []]))
    return first, second


def test_the_request_s_jobs_show_as_one() -> None:
    first, second = two_jobs()
    group = replication.group_view("job-20261126-091203.120-a1b2c3", [second, first])
    assert group is not None
    assert (group.job_id, group.status, group.vm_name) == (
        "job-20261126-091203.120-a1b2c3",
        JobStatus.RUNNING,
        "a, b",
    )
    assert [d.export for d in group.disks] == ["a", "b"]
    done = first.ended(T0, 0, None, None)
    failed = second.ended(T0, 2, None, "boom")
    group = replication.group_view("r", [done, failed])
    assert group is not None and group.status is JobStatus.FAILED and group.ended_at == T0
    assert group.error == f"{failed.job_id}: backup client exited with code 2: boom"
    group = replication.group_view("r", [done, second.cancelling(T0).ended(T0, None, 15, None)])
    assert group is not None and group.status is JobStatus.CANCELLED
    assert replication.group_view("r", []) is None


def test_the_sha_gets_each_disk_s_change_id_and_once_the_request_s_end() -> None:
    first, second = two_jobs()
    first = first.apply(events.DiskPlan("2000", "full", 7, vmware_disk_key="2000"), T0)
    first = first.apply(events.DiskDone("2000", change_id="52 aa/4", bytes_done=7), T0)
    first = first.ended(T0, 0, None, None)
    sent = messages.replication_messages(first, [first, second], T0)
    assert [(m.kind, m.path, json.loads(m.body)) for m in sent] == [
        (
            "replication_changeid",
            "/api/v1/replications/job-20261126-091203.120-a1b2c3/changeid",
            {"change_id": "52 aa/4", "disk_id": "disk-2000"},
        )
    ]
    second = second.ended(T0, 1, None, "no")
    [end] = messages.replication_messages(second, [first, second], T0)
    assert (end.kind, messages.method(end.kind)) == ("replication_end", "PUT")
    assert end.path == "/api/v1/replications/job-20261126-091203.120-a1b2c3"
    update = json.loads(end.body)
    assert (update["id"], update["status"], update["replication_type"]) == (
        "job-20261126-091203.120-a1b2c3",
        "failed",
        "initial",
    )
    assert update["error_message"] == f"{second.job_id}: backup client exited with code 1: no"
    assert update["bytes_transferred"] == 7 and update["created_at"] == T0.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


# -- the manager -------------------------------------------------------------------------------------


def make_manager(
    tmp_path: Path, gateway: FakeGateway, store: Any = None
) -> tuple[JobManager, FakeLauncher, Any]:
    clock = Clock()
    store = store if store is not None else MemoryJobStore()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)))
    manager = JobManager(
        store, launcher, clock, Settings(), SteppingClock(), gateway=gateway, hub=FakeHub()
    )
    manager.recover()
    return manager, launcher, store


def test_one_unreachable_target_starts_no_vm_of_the_request(tmp_path: Path) -> None:
    gateway = FakeGateway()
    gateway.failures[10101] = ProbeFailed("refused", "nothing listens")
    manager, launcher, _ = make_manager(tmp_path, gateway)
    first, second = two_jobs()
    requests = replication.plan(
        parse_replicate_request(
            body(
                vm_paths=["/DC1/vm/a", "/DC1/vm/b"],
                nbd_targets=[
                    {"device_path": "nbd://127.0.0.1:10100/a", "vmware_disk_key": "2000"},
                    {"device_path": "nbd://127.0.0.1:10101/b", "vmware_disk_key": "2016"},
                ],
            ),
            SETTINGS,
        ),
        [[], []],
    )
    error = failure_of(ensureDeferred(manager.start_all(requests)), TargetUnreachable)
    assert isinstance(error, TargetUnreachable)
    assert [r.target.port for r in error.failures] == [10101]
    assert manager.jobs() == [] and launcher.transports == {} and gateway.open == {}
    del gateway.failures[10101]
    jobs = result_of(ensureDeferred(manager.start_all(requests)))
    assert [j.job_id for j in jobs] == [first.job_id, second.job_id]
    assert [j.kind for j in jobs] == ["replication", "replication"]
    # One VM's conflict (a port of a running job) refuses the other VM too.
    free = attrs.evolve(
        requests[0], job_id="x", targets=(NbdTarget("2000", "127.0.0.1", 10150, "z"),)
    )
    taken = attrs.evolve(requests[1], job_id="y")
    error = failure_of(ensureDeferred(manager.start_all([free, taken])), PortInUse)
    assert "NBD port 10101" in str(error)
    assert sorted(j.job_id for j in manager.jobs()) == sorted([first.job_id, second.job_id])
    assert "x" not in launcher.transports and "x" not in gateway.open


def test_a_completed_replication_extends_the_chain_and_the_sha_hears_its_end(
    tmp_path: Path,
) -> None:
    store = SQLiteJobStore(FilePath(str(tmp_path)).child("sna.sqlite"))
    manager, launcher, _ = make_manager(tmp_path, FakeGateway(), store)
    request = parse_replicate_request(body(), SETTINGS)
    [planned] = replication.plan(
        request, [manager.replication_chain(request.vcenter_key, "/DC1/vm/pg")]
    )
    [job] = result_of(ensureDeferred(manager.start_all([planned])))
    protocol = launcher.transports[job.job_id].protocol
    for key, change_id in (("2000", "52 aa/2"), ("2001", "52 bb/5")):
        line = {
            "event": "disk_plan",
            "disk_key": key,
            "sync_type": "full",
            "bytes_total": 10,
            "capacity_bytes": 4096,
        }
        protocol.outReceived(json.dumps(line).encode() + b"\n")
        line = {"event": "disk_done", "disk_key": key, "change_id": change_id}
        protocol.outReceived(json.dumps(line).encode() + b"\n")
    launcher.transports[job.job_id].exit(0)
    rows = manager.replication_chain("vc.example.local:443", "/DC1/vm/pg")
    assert sorted((r.disk_key, r.target, r.change_id, r.capacity_bytes) for r in rows) == [
        ("2000", "127.0.0.1/vol-1", "52 aa/2", 4096),
        ("2001", "127.0.0.1/vol-2", "52 bb/5", 4096),
    ]
    assert [(m.kind, m.disk_index) for m in store.outbox(job.job_id)] == [
        ("replication_changeid", 0),
        ("replication_changeid", 1),
        ("replication_end", None),
    ]
    # The next run starts each disk from there.
    [following] = replication.plan(request, [rows])
    assert following.previous_change_ids == (("2000", "52 aa/2"), ("2001", "52 bb/5"))
    store.close()


# -- the SHA's bearer token (--sha-token-file) ----------------------------------------------------


class _Response:
    code = 200

    async def content(self) -> bytes:
        return b"{}"


class _Http:
    """A treq-like client that keeps the headers of each request."""

    def __init__(self) -> None:
        self.headers: list[dict[str, list[str]]] = []

    async def request(
        self, method: str, url: str, data: Any = None, headers: Any = None
    ) -> _Response:
        self.headers.append(headers)
        return _Response()


@pytest.mark.parametrize("token", [None, b"s3cret-token"])
def test_the_sha_gets_the_bearer_token_when_one_is_configured(token: Any) -> None:
    http = _Http()
    client = ShaClient(http, "http://127.0.0.1:8082/", Clock(), token=token)
    answer = result_of(client.request("PUT", "/api/v1/replications/r", "{}"))
    assert answer.code == 200
    [headers] = http.headers
    expected = None if token is None else ["Bearer s3cret-token"]
    assert headers.get("Authorization") == expected


def test_sha_token_file_is_read_and_checked(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    options = Options()
    options.parseOptions(
        ["--sha-url", "http://127.0.0.1:8082", "--sha-token-file", str(token_file)]
    )
    assert options["sha-token"] == b"s3cret-token"
    # Without --sha-url: kept for the SHA an enrolled node's tunnel brings.
    alone = Options()
    alone.parseOptions(["--sha-token-file", str(token_file)])
    assert (alone["sha-url"], alone["sha-token"]) == (None, b"s3cret-token")
    token_file.chmod(0o644)
    with pytest.raises(usage.UsageError, match=r"--sha-token-file: .* can be read"):
        Options().parseOptions(
            ["--sha-url", "http://127.0.0.1:8082", "--sha-token-file", str(token_file)]
        )


def test_after_a_restart_the_request_s_end_goes_once_with_every_job_interrupted(
    tmp_path: Path,
) -> None:
    store = MemoryJobStore()
    for job in two_jobs():
        store.save(job)
    manager, _, _ = make_manager(tmp_path, FakeGateway(), store)
    ends = [m for m in store.outbox() if m.kind == "replication_end"]
    assert [json.loads(m.body)["status"] for m in ends] == ["failed"]
    assert all(j.status is JobStatus.INTERRUPTED for j in manager.jobs())


def test_a_device_path_without_a_host_is_the_hub_s_port_through_the_tunnel() -> None:
    """The SHA sends nbd://:PORT/EXPORT when its SHA_NBD_HOST is unset (migration.go)."""
    value = body()
    value["nbd_targets"][0]["device_path"] = "nbd://:10100/vol-1"
    [vm] = parse_replicate_request(value, SETTINGS).vms
    first = vm.targets[0]
    assert (first.host, first.port, first.export) == ("127.0.0.1", 10100, "vol-1")
    # Only the host may be left out: the port is the hub's to say.
    value["nbd_targets"][0]["device_path"] = "nbd://:/vol-1"
    assert refused(value).body()["field"] == "nbd_targets[0].device_path"
