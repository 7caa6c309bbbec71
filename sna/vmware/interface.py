"""The daemon's view of vSphere: credentials, operations, errors.

:class:`IVSphere` methods return Deferreds of JSON-ready dicts whose field
names are the Go SNA's (``reference/upstream-contracts.md`` §1.3), so the API
layer only adds HTTP.  Errors are :class:`VSphereError` subclasses, each with
the HTTP status the API answers with.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

DEFAULT_PORT = 443


class VSphereError(Exception):
    """A vSphere operation that failed; ``status`` and ``code`` are the API's answer."""

    status = 502
    code = "vcenter_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidVSphereRequest(VSphereError):
    status = 400
    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class AuthenticationFailed(VSphereError):
    status = 401
    code = "vcenter_auth_failed"


class PermissionDenied(VSphereError):
    """vCenter accepted the login but the user lacks a privilege the operation needs."""

    status = 403
    code = "vcenter_permission_denied"


class NotFound(VSphereError):
    status = 404
    code = "vm_not_found"


class Conflict(VSphereError):
    """The VM is not in a state that allows the operation (e.g. CBT with snapshots)."""

    status = 409
    code = "vm_state_conflict"


class Unreachable(VSphereError):
    status = 502
    code = "vcenter_unreachable"


class TimedOut(VSphereError):
    status = 504
    code = "vcenter_timeout"


class CertificateMismatch(VSphereError):
    status = 502
    code = "vcenter_certificate_rejected"


_HEX = re.compile(r"[0-9a-fA-F]+")


def normalise_thumbprint(value: str) -> str:
    """A SHA-1 or SHA-256 certificate thumbprint as vSphere shows it: ``AA:BB:...``."""
    digits = value.replace(":", "").replace(" ", "").strip()
    if not _HEX.fullmatch(digits) or len(digits) not in (40, 64):
        raise InvalidVSphereRequest(
            "vcenter_thumbprint",
            "vcenter_thumbprint must be a SHA-1 or SHA-256 hex digest (colons optional)",
        )
    digits = digits.upper()
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def parse_address(value: str, field: str = "vcenter") -> tuple[str, int]:
    """``host``, ``host:port`` or ``https://host[:port]/sdk`` as (host, port)."""
    text = value.strip()
    if not text:
        raise InvalidVSphereRequest(field, f"{field} is required")
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    except ValueError:  # an unbalanced [ of an IPv6 address
        raise InvalidVSphereRequest(field, f"{field} is not a valid address") from None
    if "://" in text:
        if parts.scheme != "https":
            raise InvalidVSphereRequest(
                field, f"{field} must be an https:// URL, not {parts.scheme}"
            )
        if parts.path not in ("", "/", "/sdk", "/sdk/") or parts.query or parts.fragment:
            raise InvalidVSphereRequest(field, f"{field} must name the /sdk endpoint or nothing")
    else:
        if text.count(":") > 1 and not text.startswith("["):
            raise InvalidVSphereRequest(
                field, f"{field}: put an IPv6 address in brackets, like [fe80::1]:443"
            )
        if parts.path or parts.query or parts.fragment:
            raise InvalidVSphereRequest(
                field, f"{field} must be host, host:port or https://host:port/sdk"
            )
    # Credentials travel in their own fields, never in the address.
    if parts.username is not None or parts.password is not None:
        raise InvalidVSphereRequest(field, f"{field} must not contain a user or password")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise InvalidVSphereRequest(field, f"{field} has an invalid port") from None
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        raise InvalidVSphereRequest(field, f"{field} has an invalid port")
    if not host or any(c.isspace() for c in host):
        raise InvalidVSphereRequest(field, f"{field} has no valid host")
    return host, port


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
