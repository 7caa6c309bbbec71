"""How the client trusts vCenter: one setting, one :mod:`ssl` context for SOAP and ``/folder``.

Four ways, one of them per run:

- a pinned certificate (``--vcenter-thumbprint``, SHA-1 as vSphere shows it,
  or SHA-256): every TLS connection, SOAP or datastore HTTP, must present
  exactly that certificate; chain and name are not checked;
- only when asked (``--insecure``), nothing checked;
- a CA bundle (``--vcenter-ca-file``): chain and host name checked against it;
- the system's CAs (the default, ``SSL_CERT_FILE`` honoured), chain and host
  name checked.

The first that is given wins, in that order.

Always an explicit context: pyVmomi makes an unverified one by itself for
127.0.0.1/localhost when given none.  This module builds contexts; only
:func:`server_thumbprint` opens a connection.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from typing import Optional

import attrs

_DIGESTS = {20: "sha1", 32: "sha256", 64: "sha512"}


def normalise_thumbprint(text: str) -> str:
    """``AA:BB:...`` upper case, from any spacing, colons or case; SHA-1, -256 or -512 length."""
    digits = re.sub(r"[\s:]", "", text).upper()
    if not re.fullmatch(r"[0-9A-F]+", digits or "-") or len(digits) // 2 not in _DIGESTS:
        raise ValueError(f"{text!r} is not a SHA-1, SHA-256 or SHA-512 certificate thumbprint")
    if len(digits) % 2:
        raise ValueError(f"{text!r} has an odd number of hex digits")
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def thumbprint_of(der: bytes, algorithm: str = "sha1") -> str:
    return normalise_thumbprint(hashlib.new(algorithm, der).hexdigest())


def matches(thumbprint: str, der: bytes) -> bool:
    """Does the DER certificate have this (normalised) thumbprint?"""
    algorithm = _DIGESTS[len(thumbprint.replace(":", "")) // 2]
    return thumbprint_of(der, algorithm) == thumbprint


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
            return "certificate NOT verified (--insecure)"
        if self.ca_file:
            return f"certificate verified against {self.ca_file}"
        return "certificate verified against the system CAs"


class CertificateMismatch(ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one."""

    def __str__(self) -> str:
        # SSLError's own str() shows the args tuple.
        return str(self.args[0]) if self.args else "certificate mismatch"


def _pinned_socket_class(thumbprint: str) -> type[ssl.SSLSocket]:
    class PinnedSSLSocket(ssl.SSLSocket):
        # The check runs on every handshake, so a later connection of pyVmomi's
        # pool cannot skip it (pyVmomi's own thumbprint option checks only
        # after a failed CA verification, and then disables it in the context).
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            der = self.getpeercert(binary_form=True)
            if der is None or not matches(thumbprint, der):
                seen = thumbprint_of(der) if der else "none"
                raise CertificateMismatch(
                    f"vCenter's certificate (SHA-1 {seen}) is not the pinned one ({thumbprint})"
                )

    return PinnedSSLSocket


def server_thumbprint(host: str, port: int, settings: TlsSettings, timeout: float) -> str:
    """The SHA-1 thumbprint of the certificate the server presents (blocking).

    The connection is verified as every other one is, so what is returned is
    the certificate this run trusts; nbdkit-vddk needs it as ``thumbprint=``.
    """
    if settings.thumbprint and len(settings.thumbprint) == 59:  # already SHA-1
        return settings.thumbprint
    context = ssl_context(settings)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return thumbprint_of(der, "sha1")


def ssl_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context for pyVmomi (``SmartConnect(sslContext=...)``)."""
    if settings.insecure or settings.thumbprint:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if settings.thumbprint:
            context.sslsocket_class = _pinned_socket_class(settings.thumbprint)
        return context
    return ssl.create_default_context(cafile=settings.ca_file)
