"""How both sides trust vCenter (sna.contract.tls): one rule, one context, one mismatch."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sna.contract.tls import (
    CertificateMismatch,
    InvalidThumbprint,
    TlsSettings,
    matches,
    normalise_thumbprint,
    ssl_context,
)

DER = b"not really a certificate, but bytes to digest"
SHA1 = hashlib.sha1(DER).hexdigest().upper()
SHA1_PRETTY = ":".join(SHA1[i : i + 2] for i in range(0, 40, 2))
SHA256 = hashlib.sha256(DER).hexdigest().upper()


@pytest.mark.parametrize(
    "value",
    [
        SHA1_PRETTY,
        SHA1,
        SHA1.lower(),
        f"  {SHA1_PRETTY} ",
        SHA1_PRETTY.replace(":", " "),
        SHA1_PRETTY.lower(),
    ],
)
def test_thumbprints_normalise(value: str) -> None:
    assert normalise_thumbprint(value) == SHA1_PRETTY


@pytest.mark.parametrize(
    "value",
    [
        "",
        "EC:72",
        SHA1_PRETTY[:-3],  # 19 bytes
        SHA1_PRETTY + ":AA",  # 21 bytes
        SHA1_PRETTY.replace("A", "G") if "A" in SHA1_PRETTY else "GG" * 20,
        "sha1:" + SHA1,
        ":".join(["AB"] * 48),  # SHA-384: vSphere shows none
        "ab" * 64,  # SHA-512 neither
        "abc",
    ],
)
def test_what_is_not_a_thumbprint(value: str) -> None:
    with pytest.raises(InvalidThumbprint, match="SHA-1 or SHA-256"):
        normalise_thumbprint(value)


def test_thumbprints_match_their_certificate() -> None:
    assert matches(normalise_thumbprint(SHA1), DER)
    assert matches(normalise_thumbprint(SHA256), DER)
    assert not matches(normalise_thumbprint("00" * 20), DER)


def test_the_system_s_cas_are_trusted_by_default() -> None:
    context = ssl_context(TlsSettings())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_insecure_checks_nothing() -> None:
    context = ssl_context(TlsSettings(insecure=True))
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


@pytest.mark.parametrize("digest", [SHA1, SHA256])
@pytest.mark.parametrize("insecure", [False, True])
def test_a_pin_wins_and_accepts_only_its_certificate(digest: str, insecure: bool) -> None:
    context = ssl_context(TlsSettings(thumbprint=digest, insecure=insecure, ca_file="/nope"))
    # The pin replaces CA verification, and is checked after every handshake.
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert context.sslsocket_class is not ssl.SSLSocket
    context.check(DER)  # type: ignore[attr-defined]
    with pytest.raises(CertificateMismatch) as raised:
        context.check(DER + b"!")  # type: ignore[attr-defined]
    assert raised.value.expected == normalise_thumbprint(digest)
    assert "does not match the pinned" in str(raised.value)
    assert isinstance(raised.value, ssl.SSLCertVerificationError)


def test_contexts_are_never_shared() -> None:
    assert ssl_context(TlsSettings()) is not ssl_context(TlsSettings())


def ca_pem(path: Path, name: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with path.open("ab") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


def names(context: ssl.SSLContext) -> set[str]:
    return {dict(x[0] for x in c["subject"])["commonName"] for c in context.get_ca_certs()}


def test_a_ca_file_is_trusted_besides_the_system_s_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--vcenter-ca-file adds to the system's CAs, on both sides (the client once used
    only the file: /discover of a vCenter worked, a backup of it then failed TLS)."""
    system = tmp_path / "system.pem"
    ca_pem(system, "system-ca-1")
    ca_pem(system, "system-ca-2")
    monkeypatch.setenv("SSL_CERT_FILE", str(system))  # the system's CAs, as OpenSSL finds them
    extra = ca_pem(tmp_path / "extra.pem", "extra-ca")
    assert names(ssl_context(TlsSettings())) == {"system-ca-1", "system-ca-2"}
    trusted = names(ssl_context(TlsSettings(ca_file=str(extra))))
    assert trusted == {"system-ca-1", "system-ca-2", "extra-ca"}
