"""vCenter addresses and certificate thumbprints as requests give them."""

from __future__ import annotations

import pytest

from sna.vmware.interface import (
    Credentials,
    InvalidVSphereRequest,
    normalise_thumbprint,
    parse_address,
)

SHA1 = "EC:72:B3:9B:66:CB:34:56:D0:24:2C:F9:F4:33:4A:44:3D:6E:05:74"
SHA256 = ":".join(["19", "D2"] * 16)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vc.example.com", ("vc.example.com", 443)),
        ("  vc.example.com  ", ("vc.example.com", 443)),
        ("vc.example.com:8443", ("vc.example.com", 8443)),
        ("10.0.0.5:443", ("10.0.0.5", 443)),
        ("https://vc.example.com/sdk", ("vc.example.com", 443)),
        ("https://vc.example.com:9443/sdk", ("vc.example.com", 9443)),
        ("https://vc.example.com:9443/sdk/", ("vc.example.com", 9443)),
        ("https://vc.example.com", ("vc.example.com", 443)),
        ("https://vc.example.com/", ("vc.example.com", 443)),
        ("[::1]", ("::1", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("https://[fe80::1]:444/sdk", ("fe80::1", 444)),
        ("vc.example.com:65535", ("vc.example.com", 65535)),
    ],
)
def test_addresses_accepted(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "is required"),
        ("   ", "is required"),
        ("http://vc.example.com/sdk", "https://"),
        ("ftp://vc.example.com", "https://"),
        ("https://vc.example.com/api", "/sdk"),
        ("https://vc.example.com/sdk?x=1", "/sdk"),
        ("https://vc.example.com/sdk#top", "/sdk"),
        ("vc.example.com/sdk", "host:port"),
        ("vc.example.com:0", "invalid port"),
        ("https://vc.example.com:0/sdk", "invalid port"),
        ("vc.example.com:65536", "invalid port"),
        ("vc.example.com:https", "invalid port"),
        ("::1", "brackets"),
        ("fe80::1:443", "brackets"),
        ("[::1", "not a valid address"),
        ("user@vc.example.com", "user or password"),
        ("https://user:secret@vc.example.com/sdk", "user or password"),
        ("https:///sdk", "no valid host"),
        (":443", "no valid host"),
    ],
)
def test_addresses_refused(value: str, complaint: str) -> None:
    with pytest.raises(InvalidVSphereRequest, match=complaint) as raised:
        parse_address(value, "vcenter_host")
    assert raised.value.field == "vcenter_host"
    assert raised.value.status == 400


def test_a_refused_address_does_not_echo_a_password() -> None:
    with pytest.raises(InvalidVSphereRequest) as raised:
        parse_address("https://admin:Secret-1@vc.example.com/sdk")
    assert "Secret-1" not in raised.value.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SHA1, SHA1),
        (SHA1.replace(":", ""), SHA1),
        (SHA1.lower(), SHA1),
        (SHA1.replace(":", "").lower(), SHA1),
        (f"  {SHA1} ", SHA1),
        (SHA1.replace(":", " "), SHA1),
        (SHA256, SHA256),
        (SHA256.replace(":", "").lower(), SHA256),
    ],
)
def test_thumbprints_accepted(value: str, expected: str) -> None:
    assert normalise_thumbprint(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "EC:72",
        SHA1[:-3],  # 19 bytes
        SHA1 + ":AA",  # 21 bytes
        SHA256 + ":AA",
        SHA1.replace("E", "G"),
        "sha1:" + SHA1,
        ":".join(["AB"] * 48),  # SHA-384: vSphere shows none
    ],
)
def test_thumbprints_refused(value: str) -> None:
    with pytest.raises(InvalidVSphereRequest) as raised:
        normalise_thumbprint(value)
    assert raised.value.field == "vcenter_thumbprint"


def test_credentials_keep_the_password_out_of_their_repr() -> None:
    creds = Credentials(host="vc", port=443, user="admin", password="Secret-1")
    assert "Secret-1" not in repr(creds)
    assert creds.where == "vc:443"
