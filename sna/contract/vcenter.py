"""vCenter as both sides name it: its address, its errors, its faults and snapshots.

:func:`parse_address` reads what a request's ``vcenter_host`` (or
``vcenter``) and the client's ``--vmware-endpoint`` hold.  The exceptions are
the one type per failure both sides raise; ``status`` and ``code`` are what the
daemon's API answers with.  :func:`fault_text` and :func:`walk_snapshots`
read pyVmomi objects by their attributes only: nothing here talks to vCenter.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

DEFAULT_PORT = 443


class InvalidAddress(ValueError):
    """The text is not a vCenter address; the message names it and says why."""


def parse_address(value: str, name: str = "vcenter") -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or ``https://host[:port]/sdk`` as (host, port).

    ``name`` is how messages call the value (a request field, an option).
    """
    text = value.strip()
    if not text:
        raise InvalidAddress(f"{name} is required")
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    except ValueError:  # an unbalanced [ of an IPv6 address
        raise InvalidAddress(f"{name} is not a valid address") from None
    if "://" in text:
        if parts.scheme != "https":
            raise InvalidAddress(f"{name} must be an https:// URL, not {parts.scheme}")
        if parts.path not in ("", "/", "/sdk", "/sdk/") or parts.query or parts.fragment:
            raise InvalidAddress(f"{name} must name the /sdk endpoint or nothing")
    else:
        if text.count(":") > 1 and not text.startswith("["):
            raise InvalidAddress(f"{name}: put an IPv6 address in brackets, like [fe80::1]:443")
        if parts.path or parts.query or parts.fragment:
            raise InvalidAddress(f"{name} must be host, host:port or https://host:port/sdk")
    # Credentials travel in their own fields, never in the address.
    if parts.username is not None or parts.password is not None:
        raise InvalidAddress(f"{name} must not contain a user or password")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise InvalidAddress(f"{name} has an invalid port") from None
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        raise InvalidAddress(f"{name} has an invalid port")
    if not host or any(c.isspace() for c in host):
        raise InvalidAddress(f"{name} has no valid host")
    return host, port


class VSphereError(Exception):
    """A vSphere operation that failed; the message is for operators."""

    status = 502
    code = "vcenter_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class CertificateRejected(VSphereError):
    """vCenter's certificate is not trusted, or is not the pinned one."""

    status = 502
    code = "vcenter_certificate_rejected"


def fault_text(fault: Any) -> str:
    """vSphere's words for a fault: its type and its most helpful message.

    ``InvalidLogin: Cannot complete login due to an incorrect user name or
    password.``; the invalid property, when the fault names one; the type
    alone when the fault says nothing else.  Never a stack dump.
    """
    name: str = type(fault).__name__.rsplit(".", 1)[-1]
    message = ""
    for attribute in ("msg", "localizedMessage"):
        text = getattr(fault, attribute, None)
        if text:
            message = str(text)
            break
    else:
        for part in getattr(fault, "faultMessage", None) or ():
            text = getattr(part, "message", None)
            if text:
                message = str(text)
                break
    if not message and isinstance(fault, BaseException) and not hasattr(fault, "faultMessage"):
        message = str(fault)
    prop = getattr(fault, "invalidProperty", None)
    if prop:
        message = f"{message} (invalid property {prop})".strip()
    return f"{name}: {message}" if message else name


def walk_snapshots(trees: Any) -> Iterator[Any]:
    """Every ``SnapshotTree`` of a VM's ``snapshot.rootSnapshotList``, parents first."""
    for tree in trees or ():
        yield tree
        yield from walk_snapshots(tree.childSnapshotList)
