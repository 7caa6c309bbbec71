"""The daemon's view of vSphere: credentials, operations, errors.

:class:`IVSphere` methods return Deferreds of JSON-ready dicts whose field
names are the Go SNA's (``reference/upstream-contracts.md`` §1.3), so the API
layer only adds HTTP.  Errors are the contract's :class:`~sna.contract.vcenter.VSphereError`
subclasses (shared with the backup client), each with the HTTP status the API
answers with.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from sna.contract import vcenter
from sna.contract.vcenter import (
    AuthenticationFailed,
    CertificateRejected,
    Conflict,
    NotFound,
    PermissionDenied,
    TimedOut,
    Unreachable,
    VSphereError,
)

__all__ = [
    "AuthenticationFailed",
    "CertificateRejected",
    "Conflict",
    "Credentials",
    "IVSphere",
    "InvalidVSphereRequest",
    "NotFound",
    "PermissionDenied",
    "TimedOut",
    "Unreachable",
    "VSphereError",
    "parse_address",
]


class InvalidVSphereRequest(VSphereError):
    """A request field that cannot name a vCenter or a VM; ``field`` names it."""

    status = 400
    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_address(value: str, field: str = "vcenter") -> tuple[str, int]:
    """A request's vCenter address as (host, port) (:func:`sna.contract.vcenter.parse_address`)."""
    try:
        return vcenter.parse_address(value, field)
    except vcenter.InvalidAddress as e:
        raise InvalidVSphereRequest(field, str(e)) from None


@attrs.frozen
class Credentials:
    """Who to be on which vCenter.  The password is in no repr and no log."""

    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    thumbprint: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class IVSphere(Interface):
    """Every vSphere operation the API offers; each runs off the reactor thread."""

    def discover(
        credentials: Credentials,
        datacenter: Optional[str],
        name_filter: Optional[str],
        vcenter: Optional[str] = None,
    ) -> Deferred[dict[str, Any]]:
        """``{"vcenter": {...}, "vms": [...]}`` as ``POST /api/v1/discover`` answers.

        ``vcenter`` is the vCenter as the request named it, given back
        unchanged as ``vcenter.host`` (``host:port`` when it is not given).
        """

    def cbt_status(credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        """``{"enabled", "vm_name", "power_state", "vm_path", ...}`` for one VM."""

    def enable_cbt(credentials: Credentials, vm_path: str) -> Deferred[dict[str, Any]]:
        """Turn CBT on (refusing with :class:`Conflict` when the VM has snapshots)."""

    def spec_changes(
        credentials: Credentials, vm_path: str, stored: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        """The diff of ``stored`` (a ``/discover`` VM) against the live VM."""

    def power_off(
        credentials: Credentials, vm_id: str, force: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        """Shut the guest down (or power off when ``force`` or without tools).

        Answers within ``timeout`` and at most 50 s, the VM off or not yet.
        """

    def power_on(
        credentials: Credentials, vm_id: str, wait_for_tools: bool, timeout: float
    ) -> Deferred[dict[str, Any]]:
        """Power the VM on; answers within ``timeout`` and at most 50 s."""

    def power_state(credentials: Credentials, vm_id: str) -> Deferred[dict[str, Any]]:
        """The VM's power and tools state."""

    def remove_job_snapshots(
        credentials: Credentials, vm_path: str, job_id: Optional[str]
    ) -> Deferred[dict[str, Any]]:
        """Remove the snapshots a backup client made (for ``job_id``, or all of them)."""

    def close() -> Deferred[None]:
        """Log out every session."""
