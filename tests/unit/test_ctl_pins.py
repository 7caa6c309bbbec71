"""The daemon's side of sna-ctl vcenter: stored pins, their routes, and where they are used.

The store is real SQLite in a temporary directory; the routes run over the
unit harness (StubTreq); the session pool and the launcher are the real
ones over their fakes (no vCenter, no process).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from sna.api.app import SnaAPI
from sna.config import Settings
from sna.jobs.manager import JobManager, PinnedLauncher
from sna.jobs.model import BackupRequest
from sna.jobs.store import SCHEMA_VERSION, PinRow, SQLiteJobStore, StoreError
from sna.nbd.relay import RelayRegistry
from sna.telemetry.metrics import Metrics
from sna.testing import (
    FakeGateway,
    FakeLauncher,
    FakeVSphere,
    HeldThreadPool,
    MemoryJobStore,
    SameThread,
    SteppingClock,
    failure_of,
    fixed_now,
    result_of,
)
from sna.vmware.interface import CertificateRejected, Credentials
from sna.vmware.pins import PinsUnavailable, VCenterPins
from sna.vmware.sessions import Connection, SessionPool
from tests.unit.conftest import backup_body

SHA256 = ":".join(["AB"] * 32)
SHA1 = ":".join(["CD"] * 20)
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def store_at(tmp_path: Path) -> SQLiteJobStore:
    return SQLiteJobStore(FilePath(str(tmp_path / "sna.sqlite")))


# -- the store ----------------------------------------------------------------------


def test_a_version_3_database_gets_the_pins_table(tmp_path: Path) -> None:
    path = tmp_path / "sna.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " started_at TEXT NOT NULL, last_update TEXT NOT NULL, record TEXT NOT NULL);"
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO settings VALUES ('max_jobs', '4');"
        "PRAGMA user_version=3;"
    )
    db.close()
    store = store_at(tmp_path)
    assert store.load_pins() == []
    assert store.load_settings() == {"max_jobs": 4}
    store.save_pin(PinRow("vc.example.local", 443, SHA256, NOW.isoformat()))
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    db.close()
    again = store_at(tmp_path)
    assert again.load_pins() == [PinRow("vc.example.local", 443, SHA256, NOW.isoformat())]
    again.close()


def test_pins_are_kept_replaced_and_forgotten(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    pins = VCenterPins(store, lambda: NOW)
    pin, replaced = pins.pin("VC.Example.Local", 443, SHA256.replace(":", "").lower())
    assert (pin.host, pin.thumbprint, pin.algorithm, replaced) == (
        "vc.example.local",
        SHA256,
        "sha256",
        None,
    )
    pin2, replaced = pins.pin("vc.example.local", 443, SHA1)
    assert replaced == pin and pin2.algorithm == "sha1"
    pins.pin("::1", 8443, SHA256)
    assert [p.vcenter for p in pins.all()] == ["[::1]:8443", "vc.example.local:443"]
    # A new daemon reads them back.
    later = VCenterPins(store, lambda: NOW)
    assert later.thumbprint_for("VC.EXAMPLE.LOCAL", 443) == SHA1
    assert later.for_address("https://vc.example.local/sdk") == pin2
    assert later.for_address("vc.example.local:8443") is None
    assert later.for_address("not a host") is None
    assert later.forget("vc.example.local", 443) == pin2
    assert later.forget("vc.example.local", 443) is None
    assert [p.vcenter for p in VCenterPins(store, lambda: NOW).all()] == ["[::1]:8443"]
    store.close()


@attrs.define
class BrokenStore:
    """A pin store whose database refuses everything (a full or broken disk)."""

    reads: int = 0

    def load_pins(self) -> list[PinRow]:
        self.reads += 1
        raise StoreError("cannot read the job database /x/sna.sqlite: disk I/O error")

    def save_pin(self, pin: PinRow) -> None:
        raise StoreError("cannot write the job database /x/sna.sqlite: database or disk is full")

    def delete_pin(self, host: str, port: int) -> None:
        raise StoreError("cannot write the job database /x/sna.sqlite: database or disk is full")


def test_pins_that_cannot_be_read_refuse_rather_than_skip_the_check() -> None:
    store = BrokenStore()
    pins = VCenterPins(store, lambda: NOW)
    pins.startService()  # logs, and tries again at first use
    with pytest.raises(PinsUnavailable, match=r"cannot read the vCenter pins: .*disk I/O"):
        pins.thumbprint_for("vc.example.local", 443)
    assert store.reads == 2


# -- the routes ----------------------------------------------------------------------


@attrs.define
class Routes:
    pins: VCenterPins
    treq: StubTreq

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        d = self.treq.request(method, "http://sna" + path, data=data, headers=headers)
        self.treq.flush()
        response = result_of(d)
        return response.code, json.loads(result_of(response.content()))


@pytest.fixture
def routes(tmp_path: Path) -> Routes:
    clock = Clock()
    store = MemoryJobStore()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)).child("log"))
    manager = JobManager(store, launcher, clock, Settings(), fixed_now, gateway=FakeGateway())
    pins = VCenterPins(store_at(tmp_path), lambda: NOW)
    metrics = Metrics(lambda: manager.counts(), RelayRegistry())
    api = SnaAPI(manager, SteppingClock(), clock.seconds, metrics, FakeVSphere(), pins=pins)
    return Routes(pins, StubTreq(api.resource()))


def test_a_pin_is_stored_listed_and_removed(routes: Routes) -> None:
    code, body = routes.request(
        "PUT", "/api/v1/vcenter/pins/VC.example.local", {"thumbprint": SHA256.lower()}
    )
    assert code == 200
    assert body == {
        "vcenter": "vc.example.local:443",
        "host": "vc.example.local",
        "port": 443,
        "thumbprint": SHA256,
        "algorithm": "sha256",
        "created_at": "2026-11-26T12:00:00Z",
        "replaced": None,
    }
    code, body = routes.request(
        "PUT", "/api/v1/vcenter/pins/vc.example.local%3A443", {"thumbprint": SHA1}
    )
    assert (code, body["replaced"], body["algorithm"]) == (200, SHA256, "sha1")
    routes.request("PUT", "/api/v1/vcenter/pins/%5B::1%5D:8443", {"thumbprint": SHA256})
    code, body = routes.request("GET", "/api/v1/vcenter/pins")
    assert code == 200 and body["count"] == 2
    assert [p["vcenter"] for p in body["pins"]] == ["[::1]:8443", "vc.example.local:443"]
    assert routes.request("GET", "/api/v1/vcenter/pins/vc.example.local")[1]["thumbprint"] == SHA1
    code, body = routes.request("DELETE", "/api/v1/vcenter/pins/vc.example.local:443")
    assert (code, body["status"], body["thumbprint"]) == (200, "removed", SHA1)
    code, body = routes.request("DELETE", "/api/v1/vcenter/pins/vc.example.local:443")
    assert (code, body) == (
        404,
        {
            "error": "pin_not_found",
            "message": "no certificate pin is stored for vCenter vc.example.local:443",
        },
    )
    assert routes.pins.thumbprint_for("vc.example.local", 443) is None


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        ("vc:443", {}, "thumbprint", "thumbprint is required"),
        ("vc:443", {"thumbprint": 5}, "thumbprint", "thumbprint must be a string"),
        (
            "vc:443",
            {"thumbprint": "AB:CD"},
            "thumbprint",
            "thumbprint must be a SHA-256 or SHA-1 hex digest (64 or 40 hex digits, colons optional)",
        ),
        ("vc:0", {"thumbprint": SHA256}, "vcenter", "vcenter has an invalid port"),
        ("a:b:c", {"thumbprint": SHA256}, "vcenter", "vcenter: put an IPv6 address in brackets"),
        (
            "vc%1B%5B2J",
            {"thumbprint": SHA256},
            "vcenter",
            "vcenter has a control character (U+001B) at position 3",
        ),
    ],
)
def test_a_bad_pin_is_refused_naming_the_field(
    routes: Routes, path: str, body: dict[str, Any], field: str, message: str
) -> None:
    code, answer = routes.request("PUT", f"/api/v1/vcenter/pins/{path}", body)
    assert (code, answer["error"], answer["field"]) == (400, "invalid_request", field)
    assert answer["message"].startswith(message)
    assert routes.pins.all() == []


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("", "host", "host is required (a vCenter: host or host:port)"),
        ("?host=vc&port=http", "port", "port must be a number from 1 to 65535"),
        ("?host=vc&port=70000", "port", "port must be a number from 1 to 65535"),
        ("?host=vc:8443&port=443", "port", "port 443 differs from the port in host (8443)"),
        ("?host=https://vc/other", "host", "host must name the /sdk endpoint or nothing"),
    ],
)
def test_a_certificate_request_names_its_bad_field(
    routes: Routes, query: str, field: str, message: str
) -> None:
    code, answer = routes.request("GET", f"/api/v1/vcenter/certificate{query}")
    assert (code, answer) == (400, {"error": "invalid_request", "message": message, "field": field})


# -- where pins are used ----------------------------------------------------------------


@attrs.define
class RecordingVCenter:
    logins: list[Credentials] = attrs.Factory(list)
    refuse: Optional[BaseException] = None

    def connect(self, credentials: Credentials, context: Any, timeout: float) -> Connection:
        if self.refuse is not None:
            raise self.refuse
        self.logins.append(credentials)
        return Connection(si=object(), content=1, where=credentials.where, user=credentials.user)


def pool_with(pins: VCenterPins, vcenter: RecordingVCenter) -> tuple[SessionPool, HeldThreadPool]:
    threads = HeldThreadPool()
    pool = SessionPool(
        SameThread(),
        threads,  # type: ignore[arg-type]
        clock=Clock(),
        call_timeout=10,
        pins=pins.thumbprint_for,
    )
    pool.connect_session = vcenter.connect  # type: ignore[method-assign]
    return pool, threads


CREDS = Credentials(host="VC.example.local", port=443, user="admin", password="pw")


def test_sessions_verify_against_the_stored_pin_unless_the_request_pins() -> None:
    pins = VCenterPins(None, lambda: NOW)
    vcenter = RecordingVCenter()
    pool, threads = pool_with(pins, vcenter)
    result_of_call = pool.run(CREDS, lambda c: c.content, "testing")
    threads.run()
    assert result_of(result_of_call) == 1
    assert vcenter.logins[-1].thumbprint is None  # no pin: the CAs decide
    pins.pin("vc.example.local", 443, SHA256)
    d = pool.run(CREDS, lambda c: c.content, "testing")
    threads.run()
    result_of(d)
    assert vcenter.logins[-1].thumbprint == SHA256  # a new session, pinned
    own = attrs.evolve(CREDS, thumbprint=SHA1)
    d = pool.run(own, lambda c: c.content, "testing")
    threads.run()
    result_of(d)
    assert vcenter.logins[-1].thumbprint == SHA1  # the request's own pin wins
    assert len(vcenter.logins) == 3


def test_a_certificate_that_is_not_the_stored_pin_says_so() -> None:
    from sna.contract.tls import CertificateMismatch

    pins = VCenterPins(None, lambda: NOW)
    pins.pin("vc.example.local", 443, SHA256)
    vcenter = RecordingVCenter(refuse=CertificateMismatch(SHA256, ":".join(["00"] * 32)))
    pool, threads = pool_with(pins, vcenter)
    d = pool.run(CREDS, lambda c: c.content, "testing")
    threads.run()
    error = failure_of(d, CertificateRejected)
    assert "does not match the pinned " + SHA256 in str(error)
    assert "the pin stored for VC.example.local:443; sna-ctl vcenter trust" in str(error)


def request(**overrides: Any) -> BackupRequest:
    from sna.api.validation import parse_backup_request

    return parse_backup_request(backup_body(**overrides), Settings())


def test_a_backup_without_a_thumbprint_gets_the_stored_pin(tmp_path: Path) -> None:
    clock = Clock()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)).child("log"))
    pins = VCenterPins(None, lambda: NOW)
    pins.pin("vcenter.example.local", 443, SHA256)
    pinned = PinnedLauncher(launcher, pins, fixed_now)
    manager = JobManager(MemoryJobStore(), pinned, clock, Settings(), fixed_now, FakeGateway())
    manager.recover()
    job = result_of(ensureDeferred(manager.start(request())))
    assert launcher.requests[job.job_id].vcenter_thumbprint == SHA256
    _, argv, _ = launcher.reactor.spawned[-1]
    assert f"--vcenter-thumbprint={SHA256}" in argv
    lines = launcher.log_path(job.job_id).getContent().decode().splitlines()
    assert lines[0].split(" ", 2)[2].startswith("starting ")
    assert lines[-1].endswith(
        f"sna vCenter vcenter.example.local:443: the request pins no certificate; the stored "
        f"pin {SHA256} (sna-ctl vcenter trust, 2026-11-26T12:00:00Z) is used"
    )
    # A thumbprint of the request's own wins; another vCenter has no pin.
    own = result_of(
        ensureDeferred(
            manager.start(
                request(
                    job_id="backup-pgtest1-2",
                    vcenter_thumbprint=SHA1,
                    nbd_targets="2000:nbd://127.0.0.1:10102/pgtest1-disk0",
                )
            )
        )
    )
    assert launcher.requests[own.job_id].vcenter_thumbprint == SHA1
    other = result_of(
        ensureDeferred(
            manager.start(
                request(
                    job_id="backup-pgtest1-3",
                    vcenter_host="vcenter.example.local:8443",
                    nbd_targets="2000:nbd://127.0.0.1:10103/pgtest1-disk0",
                )
            )
        )
    )
    assert launcher.requests[other.job_id].vcenter_thumbprint is None
    assert "stored pin" not in launcher.log_path(other.job_id).getContent().decode()


def test_the_legacy_client_gets_no_pin(tmp_path: Path) -> None:
    clock = Clock()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)).child("log"), legacy=True)
    pins = VCenterPins(None, lambda: NOW)
    pins.pin("vcenter.example.local", 443, SHA256)
    pinned = PinnedLauncher(launcher, pins, fixed_now)
    manager = JobManager(MemoryJobStore(), pinned, clock, Settings(), fixed_now, FakeGateway())
    manager.recover()
    job = result_of(ensureDeferred(manager.start(request())))
    assert launcher.requests[job.job_id].vcenter_thumbprint is None
