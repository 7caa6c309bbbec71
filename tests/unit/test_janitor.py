"""The daemon removing the snapshot of a killed client."""

from __future__ import annotations

from sna.jobs.janitor import SnapshotJanitor
from sna.testing import FakeVSphere
from sna.vmware.interface import NotFound
from tests.unit.test_process import REQUEST


def test_removes_the_jobs_snapshot_with_the_requests_credentials() -> None:
    vsphere = FakeVSphere()
    vsphere.answers["remove_job_snapshots"] = {"removed": ["sbak-backup-vm-1"]}
    SnapshotJanitor(vsphere).client_killed(REQUEST)
    [(method, (creds, vm_path, job_id))] = vsphere.calls
    assert method == "remove_job_snapshots"
    assert (creds.host, creds.port, creds.user, creds.password) == (
        "vcenter.example.local",
        443,
        "admin",
        "pa55 word",
    )
    assert (vm_path, job_id) == ("/DC1/vm/vm", "backup-vm-1")


def test_never_fails() -> None:
    vsphere = FakeVSphere()
    vsphere.errors["remove_job_snapshots"] = NotFound("no VM at /DC1/vm/vm")
    results: list[object] = []
    SnapshotJanitor(vsphere).client_killed(REQUEST).addBoth(results.append)
    assert results == [None]
