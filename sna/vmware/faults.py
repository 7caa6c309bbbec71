"""What pyvmomi and the network raise, as the daemon's :class:`VSphereError` answers.

One function, :func:`translate`, used where a call on the thread pool has
failed.  It owns the mapping from vSphere faults and socket/TLS errors to the
HTTP statuses of ``interface``; it must never put a password in a message
(pyvmomi faults do not carry one, and the messages here name ``user@host``).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from xml.parsers.expat import ExpatError

from pyVmomi import vim, vmodl

from sna.contract.soap import NotVSphere
from sna.contract.tls import CertificateMismatch
from sna.contract.vcenter import fault_text
from sna.vmware.interface import (
    AuthenticationFailed,
    CertificateRejected,
    Conflict,
    Credentials,
    NotFound,
    PermissionDenied,
    TimedOut,
    Unreachable,
    VSphereError,
)


def is_not_authenticated(error: BaseException) -> bool:
    """Whether vCenter no longer knows the session (expired, or logged out elsewhere)."""
    return isinstance(error, vim.fault.NotAuthenticated)


#: Faults that mean "not now, in this state", not "vCenter is broken".
_CONFLICTS = (
    vim.fault.InvalidPowerState,
    vim.fault.InvalidState,
    vim.fault.TaskInProgress,
    vim.fault.ToolsUnavailable,
    vim.fault.SnapshotFault,
)


def translate(error: BaseException, credentials: Credentials, what: str) -> BaseException:
    """``error`` (raised while doing ``what``) as a :class:`VSphereError`.

    Errors that are neither vSphere faults nor network or TLS failures are
    returned unchanged: they are bugs, and the API answers them with a 500.
    """
    where = credentials.where
    who = f"{credentials.user}@{where}"
    if isinstance(error, VSphereError):
        return error
    if isinstance(error, vim.fault.InvalidLogin):
        return AuthenticationFailed(
            f"vCenter {where} refused the login of {credentials.user}: {fault_text(error)}"
        )
    # NotAuthenticated is a kind of NoPermission, so it goes first.
    if isinstance(error, vim.fault.NotAuthenticated):
        return AuthenticationFailed(
            f"vCenter {where} does not accept the session of {credentials.user} "
            f"({fault_text(error)})"
        )
    if isinstance(error, vim.fault.NoPermission):
        privilege = getattr(error, "privilegeId", None) or "a privilege"
        return PermissionDenied(f"{who} lacks {privilege} for {what}: {fault_text(error)}")
    if isinstance(error, vmodl.fault.ManagedObjectNotFound):
        return NotFound(f"{what}: the object is no longer in vCenter {where}")
    if isinstance(error, _CONFLICTS):
        return Conflict(f"{what}: {fault_text(error)}")
    if isinstance(error, vmodl.MethodFault):
        return VSphereError(f"{what} failed on vCenter {where}: {fault_text(error)}")
    if isinstance(error, CertificateMismatch):
        return CertificateRejected(f"vCenter {where}: {error}")
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = getattr(error, "verify_message", None) or str(error)
        return CertificateRejected(
            f"vCenter {where} presented a certificate that is not trusted ({reason}); "
            "pin it with vcenter_thumbprint, or trust its CA"
        )
    if isinstance(error, ssl.SSLError):
        return Unreachable(f"TLS with vCenter {where} failed: {error.reason or error}")
    if isinstance(error, TimeoutError):
        return TimedOut(f"vCenter {where} did not answer in time ({what})")
    if isinstance(error, ConnectionRefusedError):
        return Unreachable(f"vCenter {where} refused the connection")
    if isinstance(error, socket.gaierror):
        return Unreachable(f"cannot resolve vCenter host {credentials.host}: {error.strerror}")
    if isinstance(error, OSError):
        return Unreachable(f"cannot reach vCenter {where}: {error.strerror or error}")
    if isinstance(error, http.client.HTTPException | ExpatError | NotVSphere):
        return Unreachable(f"vCenter {where} did not answer as vSphere does: {error}")
    return error
