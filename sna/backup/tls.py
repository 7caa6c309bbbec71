"""The one TLS thing only the client does: read the certificate vCenter presents.

nbdkit-vddk needs vCenter's SHA-1 thumbprint as ``thumbprint=``.  Trusting
vCenter (thumbprints, the pinned socket, the context) is
:mod:`sna.contract.tls`, shared with the daemon.
"""

from __future__ import annotations

import socket
import ssl

from sna.contract.tls import TlsSettings, ssl_context, thumbprint_of


def server_thumbprint(host: str, port: int, settings: TlsSettings, timeout: float) -> str:
    """The SHA-1 thumbprint of the certificate the server presents (blocking).

    The connection is verified as every other one is, so what is returned is
    the certificate this run trusts.
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
