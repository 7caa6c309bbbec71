"""vCenter addresses as requests give them, read alike by the daemon and the client."""

from __future__ import annotations

import pytest

from sna.backup.options import UsageError, parse_endpoint
from sna.vmware.interface import Credentials, InvalidVSphereRequest, parse_address


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
    # The client reads --vmware-endpoint by the same rule.
    assert parse_endpoint(value) == expected


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
    with pytest.raises(UsageError, match=complaint):
        parse_endpoint(value)


def test_a_refused_address_does_not_echo_a_password() -> None:
    with pytest.raises(InvalidVSphereRequest) as raised:
        parse_address("https://admin:Secret-1@vc.example.com/sdk")
    assert "Secret-1" not in raised.value.message


def test_credentials_keep_the_password_out_of_their_repr() -> None:
    creds = Credentials(host="vc", port=443, user="admin", password="Secret-1")
    assert "Secret-1" not in repr(creds)
    assert creds.where == "vc:443"
