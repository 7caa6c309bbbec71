"""The vim25 API version both sides ask vCenter for before they log in.

pyVmomi's ``SmartConnect`` negotiates it too, but without a socket timeout
(a hung vCenter held a login for minutes) and with its own idea of when to
verify certificates; so the daemon's sessions and the backup client read
``/sdk/vimServiceVersions.xml`` themselves, with the caller's TLS context and
deadline.  Blocking: call it on a worker thread.
"""

from __future__ import annotations

import http.client
import ssl
from xml.etree import ElementTree

from pyVmomi.VmomiSupport import GetServiceVersions, versionIdMap

#: The most of the version document read; a real one is a few KiB.
MAX_VERSION_DOCUMENT = 1 << 20


class NotVSphere(Exception):
    """The address answers HTTPS but does not serve the vSphere SOAP API."""


def negotiate_version(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str:
    """The newest vim25 API version both pyVmomi and the server speak.

    Raises :class:`NotVSphere` for an answer that is not the vSphere
    document, and what :mod:`http.client` raises (``OSError``, ``ssl.SSLError``,
    ``TimeoutError``) when there is no answer within ``timeout``.
    """
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", "/sdk/vimServiceVersions.xml")
        response = conn.getresponse()
        body = response.read(MAX_VERSION_DOCUMENT)
    finally:
        conn.close()
    if response.status != 200:
        raise NotVSphere(f"HTTP {response.status} for /sdk/vimServiceVersions.xml")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise NotVSphere(f"unreadable /sdk/vimServiceVersions.xml: {e}") from None
    supported: set[str] = set()
    for namespace in root.findall("namespace"):
        if namespace.findtext("name") == "urn:vim25":
            supported.add(namespace.findtext("version") or "")
            supported.update(v.text or "" for v in namespace.findall("priorVersions/version"))
    for version in GetServiceVersions("vim25"):  # type: ignore[no-untyped-call]
        if versionIdMap[version] in supported:
            chosen: str = version
            return chosen
    raise NotVSphere(f"no vim25 API version in common (the server has {sorted(supported)})")
