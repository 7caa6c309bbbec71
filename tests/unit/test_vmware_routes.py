"""The vSphere routes over a fake vSphere: request parsing, credentials, errors."""

from __future__ import annotations

from typing import Any

import pytest

from sna.vmware.interface import AuthenticationFailed, Conflict, NotFound, TimedOut
from tests.unit.conftest import Harness, backup_body

CREDS = {"vcenter": "vcenter.example.local", "username": "admin", "password": "s3cret"}


def test_discover_passes_credentials_datacenter_and_filter(harness: Harness) -> None:
    harness.vsphere.answers["discover"] = {"vcenter": {"host": "x"}, "vms": []}
    body = {**CREDS, "datacenter": "DC1", "filter": "pgtest1", "credential_id": 7}
    code, answer = harness.request("POST", "/api/v1/discover", body)
    assert (code, answer) == (200, {"vcenter": {"host": "x"}, "vms": []})
    [(method, (creds, datacenter, name_filter, named))] = harness.vsphere.calls
    assert (method, named) == ("discover", "vcenter.example.local")
    assert (creds.host, creds.port, creds.user, creds.password) == (
        "vcenter.example.local",
        443,
        "admin",
        "s3cret",
    )
    assert (datacenter, name_filter) == ("DC1", "pgtest1")


@pytest.mark.parametrize(
    ("vcenter", "where"),
    [
        ("vc.local", ("vc.local", 443)),
        ("vc.local:8443", ("vc.local", 8443)),
        ("https://vc.local:9443/sdk", ("vc.local", 9443)),
        ("[::1]:8443", ("::1", 8443)),
    ],
)
def test_vcenter_address_forms(harness: Harness, vcenter: str, where: tuple[str, int]) -> None:
    harness.request("POST", "/api/v1/discover", {**CREDS, "vcenter": vcenter})
    creds = harness.vsphere.calls[0][1][0]
    assert (creds.host, creds.port) == where


@pytest.mark.parametrize(
    "vcenter",
    [
        "127.0.0.1:8989",
        "vc.local",
        "VC.Local:8443",
        "https://vc.local:9443/sdk",
        "https://vc.local/",
        "[::1]:8443",
        " vc.local:8443 ",
    ],
)
def test_discover_names_the_vcenter_as_the_request_did(harness: Harness, vcenter: str) -> None:
    # The Go SNA echoed the request's vcenter byte for byte; the SHA stores it.
    harness.request("POST", "/api/v1/discover", {**CREDS, "vcenter": vcenter})
    [(_, (_, _, _, named))] = harness.vsphere.calls
    assert named == vcenter


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vcenter": None}, "vcenter"),
        ({"username": ""}, "username"),
        ({"password": 5}, "password"),
        ({"vcenter": "http://vc.local/sdk"}, "vcenter"),
        ({"vcenter": "vc.local:99999"}, "vcenter"),
        ({"vcenter_thumbprint": "zz"}, "vcenter_thumbprint"),
    ],
)
def test_bad_credentials(harness: Harness, change: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**CREDS, **change}.items() if v is not None}
    code, answer = harness.request("POST", "/api/v1/discover", body)
    assert (code, answer["error"], answer["field"]) == (400, "invalid_request", field)
    assert harness.vsphere.calls == []


def test_thumbprint_is_normalised(harness: Harness) -> None:
    digest = "ab" * 32
    harness.request("POST", "/api/v1/discover", {**CREDS, "vcenter_thumbprint": digest})
    assert harness.vsphere.calls[0][1][0].thumbprint == ":".join(["AB"] * 32)


def test_cbt_status_takes_credentials_from_headers_or_query(harness: Harness) -> None:
    code, _ = harness.request(
        "GET",
        "/api/v1/vms/DC1/vm/pgtest1/cbt-status",
        headers={
            "X-vCenter-Host": "vc.local",
            "X-vCenter-User": "admin",
            "X-vCenter-Password": "pw",
        },
    )
    assert code == 200
    assert harness.vsphere.calls[-1][1][1] == "/DC1/vm/pgtest1"
    code, _ = harness.request(
        "GET", "/api/v1/vms/DC1/vm/pgtest1/cbt-status?vcenter=vc&username=u&password=p"
    )
    assert code == 200
    assert harness.vsphere.calls[-1][1][0].password == "p"
    code, answer = harness.request("GET", "/api/v1/vms/DC1/vm/pgtest1/cbt-status")
    assert (code, answer["field"]) == (400, "vcenter")


def test_enable_cbt_refused_with_snapshots(harness: Harness) -> None:
    harness.vsphere.errors["enable_cbt"] = Conflict("VM /DC1/vm/a has snapshots")
    code, answer = harness.request("POST", "/api/v1/vms/DC1/vm/a/enable-cbt", CREDS)
    assert (code, answer["error"]) == (409, "vm_state_conflict")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (NotFound("no VM at /DC1/vm/x"), 404, "vm_not_found"),
        (AuthenticationFailed("Cannot complete login"), 401, "vcenter_auth_failed"),
        (TimedOut("vc.local:443 did not answer in 30 s"), 504, "vcenter_timeout"),
    ],
)
def test_vsphere_errors(harness: Harness, error: Exception, status: int, code: str) -> None:
    harness.vsphere.errors["power_state"] = error
    got, answer = harness.request(
        "GET", "/api/v1/vm/4205a8b3/power-state?vcenter=vc&username=u&password=p"
    )
    assert (got, answer["error"], answer["message"]) == (status, code, str(error))


def test_power_defaults_and_checks(harness: Harness) -> None:
    harness.request("POST", "/api/v1/vm/4205a8b3/power-off", {**CREDS, "vm_id": "ignored"})
    assert harness.vsphere.calls[-1][1][1:] == ("4205a8b3", False, 300.0)
    harness.request("POST", "/api/v1/vm/4205a8b3/power-on", {**CREDS, "timeout": 180})
    assert harness.vsphere.calls[-1][1][1:] == ("4205a8b3", False, 180.0)
    code, answer = harness.request(
        "POST", "/api/v1/vm/4205a8b3/power-off", {**CREDS, "force": "yes"}
    )
    assert (code, answer["field"]) == (400, "force")


def test_spec_changes_needs_the_stored_vm(harness: Harness) -> None:
    code, answer = harness.request(
        "POST", "/api/v1/vm-spec-changes", {**CREDS, "vm_path": "/DC1/vm/a"}
    )
    assert (code, answer["field"]) == (400, "stored_vm_info")
    stored = {"name": "a", "memory_mb": 1024}
    code, _ = harness.request(
        "POST",
        "/api/v1/vm-spec-changes",
        {**CREDS, "vm_path": "DC1/vm/a", "stored_vm_info": stored},
    )
    assert code == 200
    assert harness.vsphere.calls[-1][1][1:] == ("/DC1/vm/a", stored)


def test_cleanup_finds_the_vm_of_a_known_job(harness: Harness) -> None:
    harness.request("POST", "/api/v1/backup/start", backup_body())
    job = "backup-pgtest1-1760099954"
    body = {**CREDS, "action": "delete_snapshot", "job_id": job}
    code, answer = harness.request("POST", "/api/v1/cleanup", body)
    assert (code, answer["error"]) == (409, "vm_busy")
    # cleanup_all of the same VM would remove the running job's snapshot too.
    everything = {**CREDS, "action": "cleanup_all", "vm_path": "/DC1/vm/pgtest1"}
    assert harness.request("POST", "/api/v1/cleanup", everything)[0] == 409
    harness.launcher.transports[job].exit(1)
    harness.vsphere.answers["remove_job_snapshots"] = {"removed": [f"sbak-{job}"]}
    code, answer = harness.request("POST", "/api/v1/cleanup", body)
    assert (code, answer) == (
        200,
        {"action": "delete_snapshot", "removed": [f"sbak-{job}"], "job_id": job},
    )
    assert harness.vsphere.calls[-1][1][1:] == ("/DC1/vm/pgtest1", job)


def test_cleanup_checks(harness: Harness) -> None:
    code, answer = harness.request("POST", "/api/v1/cleanup", {**CREDS, "action": "nuke"})
    assert (code, answer["field"]) == (400, "action")
    code, answer = harness.request(
        "POST", "/api/v1/cleanup", {**CREDS, "action": "delete_snapshot"}
    )
    assert (code, answer["field"]) == (400, "job_id")
    code, answer = harness.request(
        "POST", "/api/v1/cleanup", {**CREDS, "action": "delete_snapshot", "job_id": "unknown"}
    )
    assert (code, answer["field"]) == (400, "vm_path")
    code, _ = harness.request(
        "POST", "/api/v1/cleanup", {**CREDS, "action": "cleanup_all", "vm_path": "/DC1/vm/a"}
    )
    assert code == 200
    assert harness.vsphere.calls[-1][1][1:] == ("/DC1/vm/a", None)


def test_cleanup_takes_the_job_id_byte_for_byte(harness: Harness) -> None:
    # The snapshot is sbak-{job_id}: a trimmed id would name another snapshot.
    body = {**CREDS, "action": "delete_snapshot", "vm_path": "/DC1/vm/a"}
    code, _ = harness.request("POST", "/api/v1/cleanup", {**body, "job_id": " backup-a-1 "})
    assert code == 200
    assert harness.vsphere.calls[-1][1][1:] == ("/DC1/vm/a", " backup-a-1 ")
    code, answer = harness.request("POST", "/api/v1/cleanup", {**body, "job_id": "   "})
    assert (code, answer["field"]) == (400, "job_id")
    assert answer["message"].startswith("job_id is blank")


def test_double_slashes_are_not_found(harness: Harness) -> None:
    code, answer = harness.request("GET", "/api/v1//health")
    assert (code, answer["error"]) == (404, "not_found")


@pytest.mark.parametrize("timeout", [0.5, True, -1, 7200, "60"])
def test_power_timeout_bounds(harness: Harness, timeout: Any) -> None:
    code, answer = harness.request(
        "POST", "/api/v1/vm/4205a8b3/power-on", {**CREDS, "timeout": timeout}
    )
    assert (code, answer["field"]) == (400, "timeout")
