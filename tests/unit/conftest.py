"""Shared in-memory wiring for unit tests: the API over fakes, no sockets, no processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Optional

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from sna.api.app import SnaAPI
from sna.config import Settings
from sna.jobs.manager import JobManager
from sna.jobs.model import BackupRequest, Job
from sna.nbd.relay import RelayRegistry
from sna.telemetry.metrics import Metrics
from sna.testing import (
    FakeGateway,
    FakeLauncher,
    FakeVSphere,
    MemoryJobStore,
    SteppingClock,
    result_of,
)


@attrs.define
class Harness:
    clock: Clock
    now: SteppingClock
    store: MemoryJobStore
    launcher: FakeLauncher
    gateway: FakeGateway
    vsphere: FakeVSphere
    manager: JobManager
    api: SnaAPI
    treq: StubTreq

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        d = self.treq.request(method, "http://sna" + path, data=data, headers=hdrs)
        self.treq.flush()
        response = result_of(d)
        content = result_of(response.content())
        return response.code, json.loads(content) if content else None


def started(manager: JobManager, request: BackupRequest) -> Job:
    """Run ``manager.start`` to its end (every fake fires at once)."""
    return result_of(ensureDeferred(manager.start(request)))


def backup_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "job_id": "backup-pgtest1-1760099954",
        "vm_name": "pgtest1",
        "vcenter_host": "vcenter.example.local",
        "vcenter_user": "administrator@vsphere.local",
        "vcenter_password": "s3cret-P@ss",
        "vm_path": "/DC1/vm/pgtest1",
        "nbd_targets": "2000:nbd://127.0.0.1:10100/pgtest1-disk0,"
        "2001:nbd://127.0.0.1:10101/pgtest1-disk1",
        "backup_type": "full",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
def harness(tmp_path: Any) -> Iterator[Harness]:
    clock = Clock()
    now = SteppingClock()
    store = MemoryJobStore()
    launcher = FakeLauncher(clock, FilePath(str(tmp_path)).child("log"))
    gateway = FakeGateway()
    relays = RelayRegistry()
    metrics = Metrics(lambda: manager.counts(), relays)
    manager = JobManager(
        store,
        launcher,
        clock,
        Settings(max_jobs=3),
        now,
        gateway=gateway,
        on_probe_failure=metrics.probe_failed,
    )
    manager.recover()
    vsphere = FakeVSphere()
    api = SnaAPI(manager, now, clock.seconds, metrics, vsphere)
    yield Harness(
        clock, now, store, launcher, gateway, vsphere, manager, api, StubTreq(api.resource())
    )
