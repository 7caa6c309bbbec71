"""Credentials a ``POST /api/v1/cleanup`` proved good serve the snapshot janitor."""

from __future__ import annotations

from typing import Any

import attrs
from treq.testing import StubTreq

from sna.api.app import SnaAPI
from sna.vmware.interface import AuthenticationFailed, Credentials
from tests.unit.conftest import Harness
from tests.unit.test_vmware_routes import CREDS


def test_the_credentials_of_a_cleanup_that_worked_are_offered(harness: Harness) -> None:
    offered: list[Credentials] = []
    api = SnaAPI(
        harness.manager,
        harness.now,
        harness.clock.seconds,
        harness.api._metrics,
        harness.vsphere,
        on_credentials=offered.append,
    )
    harness = attrs.evolve(harness, api=api, treq=StubTreq(api.resource()))
    body: dict[str, Any] = {**CREDS, "action": "cleanup_all", "vm_path": "/DC1/vm/a"}
    harness.vsphere.answers["remove_job_snapshots"] = {"removed": []}
    assert harness.request("POST", "/api/v1/cleanup", body)[0] == 200
    [credentials] = offered
    assert (credentials.user, credentials.password) == (CREDS["username"], CREDS["password"])
    # Credentials vCenter refused are not offered.
    harness.vsphere.errors["remove_job_snapshots"] = AuthenticationFailed("InvalidLogin")
    assert harness.request("POST", "/api/v1/cleanup", body)[0] == 401
    assert len(offered) == 1
