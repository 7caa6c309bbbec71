"""Self-signed certificates for the tests' loopback TLS servers (the API, the hub double, HTTPS ranges).

One helper for all: an EC P-256 certificate for ``127.0.0.1`` (and any other
names given), a CA so that the certificate file can also be the CA file a
client trusts, valid from an hour ago for a day; its key written mode 0600,
as the daemon and OpenSSL-based servers want.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@attrs.frozen
class Certificate:
    cert: str
    key: str
    der: bytes

    @property
    def sha256(self) -> str:
        """The certificate's SHA-256, lower-case hex (what a pin names)."""
        return hashlib.sha256(self.der).hexdigest()


def _name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def self_signed(
    directory: str | os.PathLike[str],
    name: str = "sna-test",
    hosts: Sequence[str] = ("127.0.0.1",),
) -> Certificate:
    """Write ``{name}.crt`` and ``{name}.key`` into ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return Certificate(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))
