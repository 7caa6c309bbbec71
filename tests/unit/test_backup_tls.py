"""Thumbprints and descriptors: the small parsers the readers and TLS rest on."""

from __future__ import annotations

import hashlib

import pytest

from sna.backup.readers import ReaderError, parse_descriptor
from sna.backup.tls import TlsSettings, matches, normalise_thumbprint, ssl_context

DER = b"not really a certificate, but bytes to hash"


def test_thumbprints_normalise_and_match() -> None:
    sha1 = hashlib.sha1(DER).hexdigest()
    pretty = ":".join(sha1[i : i + 2] for i in range(0, 40, 2)).lower()
    assert normalise_thumbprint(pretty) == pretty.upper()
    assert matches(normalise_thumbprint(sha1), DER)
    assert matches(normalise_thumbprint(hashlib.sha256(DER).hexdigest()), DER)
    assert not matches(normalise_thumbprint("00" * 20), DER)


@pytest.mark.parametrize("text", ["", "zz" * 20, "ab" * 19, "abc"])
def test_bad_thumbprints(text: str) -> None:
    with pytest.raises(ValueError):
        normalise_thumbprint(text)


def test_pinned_context_checks_nothing_but_the_pin() -> None:
    import ssl

    context = ssl_context(TlsSettings(thumbprint=normalise_thumbprint("ab" * 20)))
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert context.sslsocket_class is not ssl.SSLSocket
    verified = ssl_context(TlsSettings())
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname


DESCRIPTOR = """# Disk DescriptorFile
version=1
createType="vmfs"

# Extent description
RW 34817 VMFS "vm1-flat.vmdk"

ddb.adapterType = "lsilogic"
"""


def test_flat_descriptor() -> None:
    assert parse_descriptor(DESCRIPTOR, "vm1/vm1.vmdk") == ("vm1/vm1-flat.vmdk", 34817 * 512, 0)
    hosted = DESCRIPTOR.replace('VMFS "vm1-flat.vmdk"', 'FLAT "x-flat.vmdk" 8')
    assert parse_descriptor(hosted, "a/b/x.vmdk") == ("a/b/x-flat.vmdk", 34817 * 512, 4096)


@pytest.mark.parametrize(
    "extents",
    [
        'RW 34817 VMFSSPARSE "vm1-000001-delta.vmdk"',
        'RW 34817 SESPARSE "vm1-000001-sesparse.vmdk"',
        'RW 100 VMFS "a-flat.vmdk"\nRW 100 VMFS "b-flat.vmdk"',
        "",
    ],
)
def test_not_a_single_flat_extent(extents: str) -> None:
    text = DESCRIPTOR.replace('RW 34817 VMFS "vm1-flat.vmdk"', extents)
    with pytest.raises(ReaderError, match="--reader nbd"):
        parse_descriptor(text, "vm1/vm1.vmdk")
