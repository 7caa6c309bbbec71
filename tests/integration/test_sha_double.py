"""The SHA double as a process: its routes over HTTP, its state across restarts, its qemu-nbd.

A fake node (a stdlib HTTP server in this process) answers the double's
``/discover`` and ``/backup/start`` and records what it got; the double's
qcow2 files are checked with ``qemu-img`` and its NBD exports opened through
qemu-nbd.  Loopback only; the double's qemu-nbd uses ports 10700-10799.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.shadouble.client import TEST_PORTS, ShaDouble
from tests.shadouble.fixtures import sha_double_fixture
from tests.testbed.hub import port_is_free

pytestmark = pytest.mark.integration

sha = sha_double_fixture()

GiB = 1 << 30
VCENTER = {"host": "127.0.0.1:8989", "user": "user", "password": "pass<&>"}
#: Two disks whose text order is not their key order: disk-16000 is disk 0.
VMS: list[dict[str, Any]] = [
    {"name": "pgtest10", "path": "/DC0/vm/pgtest10", "disks": [{"id": "disk-2000", "size_gb": 9}]},
    {
        "name": "pgtest1",
        "path": "/DC0/vm/pgtest1",
        "disks": [{"id": "disk-2001", "size_gb": 2}, {"id": "disk-16000", "size_gb": 1}],
    },
]


class FakeSna:
    """Answers ``/api/v1/discover`` with :data:`VMS` and ``/backup/start`` with ``start_status``."""

    def __init__(self) -> None:
        self.start_status = 200
        self.received: list[tuple[str, bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.received.append((self.path, body))
                answer: dict[str, Any]
                if self.path == "/api/v1/discover":
                    status, answer = 200, {"vcenter": {}, "vms": VMS}
                else:
                    status, answer = fake.start_status, {"status": "started"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def bodies(self, path: str) -> list[bytes]:
        return [body for p, body in self.received if p == path]


@pytest.fixture
def node() -> Iterator[FakeSna]:
    fake = FakeSna()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def free_ports(count: int) -> list[int]:
    """The lowest ``count`` ports of the double's range nothing holds now."""
    return [p for p in TEST_PORTS if port_is_free(p, reuse_address=True)][:count]


def image_info(target: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def nbd_pids(state: dict[str, Any]) -> list[int]:
    return [p["pid"] for p in state["qemu_nbd"] if p["running"]]


def test_rows_and_the_request_log_survive_a_restart(sha: ShaDouble) -> None:
    job = "backup-vm é x-1760099954"
    sha.jobs(job, "vm é x", [{"disk_index": 0, "size_gb": 1}, {"disk_index": 1, "size_gb": 1}])
    encoded = "backup-vm%20%C3%A9%20x-1760099954"
    answer = sha.request("POST", f"/api/v1/telemetry/backup/{encoded}", {"bytes_transferred": 5})
    assert answer.status == 200, answer
    port = sha.port

    sha.restart()
    assert sha.port == port, "the same port, so the node's --sha-url still works"
    state = sha.state()
    assert sha.job(state, job)["bytes_transferred"] == 5
    logged = sha.requests(path_prefix="/api/v1/telemetry/")
    assert [(r["raw_path"], r["path"], r["status"]) for r in logged] == [
        (f"/api/v1/telemetry/backup/{encoded}", f"/api/v1/telemetry/backup/{job}", 200)
    ]
    body = {"disk_id": 1, "change_id": "52 aa/7", "bytes_transferred": 3}
    assert sha.request("POST", f"/api/v1/backups/{encoded}/complete", body).status == 200
    assert sha.disks(sha.state(), job)[1]["disk_change_id"] == "52 aa/7"


def test_ids_with_an_encoded_slash_do_not_reach_the_routes(sha: ShaDouble) -> None:
    sha.jobs("backup-a-1", "a")
    answer = sha.request("POST", "/api/v1/backups/backup-a%2F1/complete", {"change_id": "x"})
    assert (answer.status, answer.text) == (404, "404 page not found\n")
    assert sha.requests()[-1]["path"] == "/api/v1/backups/backup-a/1/complete"


def test_a_full_then_an_incremental_the_shas_way(sha: ShaDouble, node: FakeSna) -> None:
    expected_ports = free_ports(2)
    started = sha.backup(
        "pgtest1", "full", node.url, VCENTER, sna_extra={"vcenter_thumbprint": "AA:BB"}
    )
    job = started["backup_id"]

    # The disks came from the node's discovery, as the SHA learns them.
    assert [json.loads(b) for b in node.bodies("/api/v1/discover")] == [
        {
            "vcenter": VCENTER["host"],
            "username": VCENTER["user"],
            "password": VCENTER["password"],
            "filter": "pgtest1",
            "vcenter_thumbprint": "AA:BB",
        }
    ]
    # Disk 0 is disk-16000 (text order), 1 GiB; disk 1 is disk-2001, 2 GiB.
    assert started["ports"] == expected_ports
    targets = ",".join(
        f"{2000 + i}:nbd://127.0.0.1:{port}/pgtest1-disk{i}"
        for i, port in enumerate(expected_ports)
    )
    assert node.bodies("/api/v1/backup/start") == [
        (
            '{"backup_type":"full","job_id":"' + job + '","nbd_host":"127.0.0.1",'
            '"nbd_targets":"' + targets + '","previous_change_id":"PLACEHOLDER",'
            '"vcenter_host":"127.0.0.1:8989","vcenter_password":"pass\\u003c\\u0026\\u003e",'
            '"vcenter_thumbprint":"AA:BB","vcenter_user":"user","vm_name":"pgtest1",'
            '"vm_path":"/DC0/vm/pgtest1"}'
        ).encode()
    ]
    for i, (qcow2, size) in enumerate(zip(started["qcow2_paths"], (1, 2), strict=True)):
        assert image_info(qcow2)["virtual-size"] == size * GiB
        # qemu-nbd serves it under the SHA's export name.
        served = image_info(f"nbd://127.0.0.1:{expected_ports[i]}/pgtest1-disk{i}")
        assert served["virtual-size"] == size * GiB

    pids = nbd_pids(sha.state())
    assert len(pids) == 2 and all(alive(p) for p in pids)
    complete = f"/api/v1/backups/{job}/complete"
    assert sha.request("POST", complete, {"disk_id": 0, "change_id": "c0"}).status == 200
    assert all(alive(p) for p in pids), "one disk of two releases nothing"
    assert sha.request("POST", complete, {"disk_id": 1, "change_id": "c1"}).status == 200
    # The last /complete stopped qemu-nbd and freed the ports before it answered.
    assert not any(alive(p) for p in pids)
    assert all(port_is_free(p, reuse_address=True) for p in expected_ports)
    state = sha.state()
    assert sha.job(state, job)["status"] == "completed"
    assert state["completion_branch_runs"] == {job: 1}
    assert state["port_allocations"] == [] and nbd_pids(state) == []

    changeid = sha.request("GET", "/api/v1/backups/changeid?vm_name=pgtest1&disk_id=1").json()
    assert (changeid["change_id"], changeid["backup_job_id"]) == ("c1", job)

    # A second start of the VM in the same second would collide on the job id (§6).
    sha.advance_clock(1)
    incremental = sha.backup("pgtest1", "incremental", node.url, VCENTER, disks=VMS[1]["disks"])
    assert incremental["ports"] == expected_ports, "the lowest free ports again"
    for overlay, full in zip(incremental["qcow2_paths"], started["qcow2_paths"], strict=True):
        info = image_info(overlay)
        assert (info["backing-filename"], info["virtual-size"]) == (
            full,
            image_info(full)["virtual-size"],
        )
    assert json.loads(node.bodies("/api/v1/backup/start")[-1])["backup_type"] == "incremental"
    assert sha.state()["problems"] == []


def test_an_incremental_without_a_completed_full_is_refused(sha: ShaDouble, node: FakeSna) -> None:
    answer = sha.backup("pgtest1", "incremental", node.url, VCENTER, expect=400)
    assert answer == {
        "error": "no previous backup found",
        "details": "full backup required before incremental",
        "timestamp": "",
    }
    state = sha.state()
    assert state["backup_jobs"] == [] and state["backup_disks"] == []
    assert node.bodies("/api/v1/backup/start") == []


def test_a_node_refusing_the_start_is_cleaned_up_as_the_sha_does(
    sha: ShaDouble, node: FakeSna
) -> None:
    node.start_status = 503
    answer = sha.backup("pgtest1", "full", node.url, VCENTER, expect=500)
    assert (answer["error"], answer["details"], answer["sna_status"]) == (
        "SNA API error",
        "status: 503",
        503,
    )
    state = sha.state()
    assert [j["id"].startswith("backup-pgtest1-disk") for j in state["backup_jobs"]] == [True, True]
    assert state["backup_disks"] == [] and state["port_allocations"] == []
    assert nbd_pids(state) == [] and not any(alive(p["pid"]) for p in state["qemu_nbd"])
    assert len(list(sha.workdir.glob("pgtest1/disk-*/*.qcow2"))) == 2, "the files stay"


def test_down_keeps_qemu_nbd_and_sigterm_stops_it(sha: ShaDouble, node: FakeSna) -> None:
    started = sha.backup("pgtest10", "full", node.url, VCENTER)
    pids = nbd_pids(sha.state())
    assert len(pids) == 1

    kept = http.client.HTTPConnection("127.0.0.1", sha.port, timeout=5)
    kept.request("GET", "/api/v1/backups/changeid?vm_name=pgtest10")
    assert kept.getresponse().read()

    sha.down()
    with pytest.raises(OSError):
        sha.request("GET", "/_double/state", timeout=2)
    with pytest.raises((OSError, http.client.HTTPException)):
        kept.request("GET", "/api/v1/backups/changeid?vm_name=pgtest10")
        kept.getresponse().read()
    kept.close()
    assert alive(pids[0]), "the SHA's qemu-nbd outlives its API"
    sha.up()
    assert sha.job(sha.state(), started["backup_id"])["status"] == "running"

    assert sha.stop() == 0
    assert not alive(pids[0])
