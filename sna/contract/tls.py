"""How both sides trust vCenter: thumbprints, the pinned socket, one ``ssl_context()``.

One setting, three ways, the most specific winning:

- a pinned certificate (a request's ``vcenter_thumbprint``, the client's
  ``--vcenter-thumbprint``; SHA-1 as vSphere shows it, or SHA-256): every TLS
  connection, SOAP or datastore HTTP, must present exactly that certificate,
  checked right after each handshake; chain and name are not checked
  (vCenters mostly have self-signed certificates, which is why people pin);
- ``insecure`` (``--vcenter-insecure``, ``--insecure``): nothing is checked;
- otherwise the system's CAs (``SSL_CERT_FILE`` honoured) and, with a CA
  file (``--vcenter-ca-file``), that file's too: chain and host name checked.

:func:`ssl_context` makes a fresh context each time: pyVmomi may change a
context it is given, and one request's pin must never reach another's
connection.  It reads the CA files it names; nothing here connects.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from typing import Optional

import attrs

#: Thumbprint length in hex digits -> the digest it is.
_DIGESTS = {40: "sha1", 64: "sha256"}


class InvalidThumbprint(ValueError):
    """The text is not a certificate thumbprint; the message says why."""


class CertificateMismatch(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        self.message = f"certificate thumbprint {actual} does not match the pinned {expected}"
        super().__init__(self.message)

    def __str__(self) -> str:
        # SSLError's own str() shows the args tuple.
        return self.message


def normalise_thumbprint(text: str) -> str:
    """``AA:BB:…`` in upper case, from any case, colons or spaces; SHA-1 or SHA-256."""
    digits = re.sub(r"[\s:]", "", text).upper()
    if not re.fullmatch(r"[0-9A-F]+", digits or "-") or len(digits) not in _DIGESTS:
        raise InvalidThumbprint(
            f"{text[:200]!r} is not a SHA-1 or SHA-256 certificate thumbprint "
            "(40 or 64 hex digits, colons optional)"
        )
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def thumbprint_of(der: bytes, algorithm: str = "sha1") -> str:
    """The thumbprint of a DER certificate, as :func:`normalise_thumbprint` writes it."""
    return normalise_thumbprint(hashlib.new(algorithm, der).hexdigest())


def algorithm_of(thumbprint: str) -> str:
    """``sha1`` or ``sha256``: the digest a thumbprint is, by its length (any form)."""
    return _DIGESTS[len(re.sub(r"[\s:]", "", thumbprint))]


def thumbprints(der: bytes) -> dict[str, str]:
    """Both thumbprints of a DER certificate, ``{"sha256": ..., "sha1": ...}``."""
    return {algorithm: thumbprint_of(der, algorithm) for algorithm in ("sha256", "sha1")}


def matches(thumbprint: str, der: bytes) -> bool:
    """Whether the DER certificate has this (normalised) thumbprint."""
    digits = thumbprint.replace(":", "")
    actual = hashlib.new(_DIGESTS[len(digits)], der).hexdigest().upper()
    return hmac.compare_digest(actual, digits)


@attrs.frozen
class TlsSettings:
    """What to trust; when several are set, the thumbprint wins, then ``insecure``."""

    thumbprint: Optional[str] = None
    ca_file: Optional[str] = None
    insecure: bool = False

    def describe(self) -> str:
        if self.thumbprint:
            return f"certificate pinned to {self.thumbprint}"
        if self.insecure:
            return "certificate NOT verified (insecure)"
        if self.ca_file:
            return f"certificate verified against the system CAs and {self.ca_file}"
        return "certificate verified against the system CAs"


class _PinnedSocket(ssl.SSLSocket):
    """Checks the peer certificate against the context's pin right after the handshake.

    Every connection pyVmomi or sna opens with a pinned context goes through
    here (``SSLContext.sslsocket_class``), so no byte of a request reaches a
    server with another certificate, and nothing can skip the check (pyVmomi's
    own thumbprint option checks only after a failed CA verification).
    """

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        context = self.context
        if isinstance(context, _PinnedContext):
            context.check(self.getpeercert(binary_form=True) or b"")


class _PinnedContext(ssl.SSLContext):
    sslsocket_class = _PinnedSocket
    thumbprint: str

    def check(self, der: bytes) -> None:
        if not matches(self.thumbprint, der):
            algorithm = _DIGESTS[len(self.thumbprint.replace(":", ""))]
            raise CertificateMismatch(self.thumbprint, thumbprint_of(der, algorithm))


def ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """A fresh client context for vCenter, trusting as ``settings`` say (module docstring)."""
    if settings.thumbprint is not None:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.thumbprint = normalise_thumbprint(settings.thumbprint)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        pinned.minimum_version = ssl.TLSVersion.TLSv1_2
        return pinned
    context = ssl.create_default_context()
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif settings.ca_file is not None:
        # Besides the system's CAs, as --vcenter-ca-file says.
        context.load_verify_locations(cafile=settings.ca_file)
    return context
