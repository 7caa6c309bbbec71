"""``POST /api/v1/enrollment/enroll``: its body checked once, field by field.

The upstream fields (``oma_host``, ``oma_port``, ``pairing_code``,
``vma_name``, ``vma_version``) and what the hub never sends, which the
operator must: how its enrollment URL is trusted (``tls_ca_file``,
``tls_pin_sha256`` or ``"plain_http": true``, exactly one), where its sshd
is (``ssh_host``, ``ssh_port``, ``ssh_user``) and its host key
(``ssh_host_key``).  Every refusal is a 400 naming the field; no message
ever repeats the pairing code.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from sna import __version__
from sna.api.validation import check_text, invalid
from sna.contract.tls import InvalidThumbprint, normalise_thumbprint
from sna.enrollment.hub import HubTrust, load_ca_certificates
from sna.enrollment.keys import HostKey, InvalidHostKey, parse_host_key
from sna.tunnel.settings import DEFAULT_SSH_PORT, DEFAULT_USER

#: The hub's enrollment port: its TLS front on 443, or its plain API on 8082.
DEFAULT_TLS_PORT = 443
DEFAULT_PLAIN_PORT = 8082
MAX_NAME = 255
#: A host name as DNS writes it (labels of letters, digits and hyphens).
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
#: A POSIX user name as useradd accepts it (vma_tunnel).
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: Pairing codes are XXXX-XXXX-XXXX on the stock hub; any printable ASCII word is sent.
_CODE = re.compile(r"[\x21-\x7e]{1,128}")
_FIELDS = frozenset(
    {
        "oma_host",
        "oma_port",
        "pairing_code",
        "vma_name",
        "vma_version",
        "tls_ca_file",
        "tls_pin_sha256",
        "plain_http",
        "ssh_host",
        "ssh_port",
        "ssh_user",
        "ssh_host_key",
    }
)


@attrs.frozen
class EnrollRequest:
    oma_host: str
    oma_port: int
    pairing_code: str = attrs.field(repr=False)
    vma_name: str
    vma_version: str
    trust: HubTrust
    ssh_host: str
    ssh_port: int
    ssh_user: str
    host_key: HostKey


def _text(body: Mapping[str, Any], field: str, limit: int = MAX_NAME) -> Optional[str]:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a string")
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise invalid(field, f"{field} is too long ({len(value)} characters, at most {limit})")
    return check_text(field, value)


def _host(body: Mapping[str, Any], field: str, default: Optional[str] = None) -> str:
    value = _text(body, field)
    if value is None:
        if default is not None:
            return default
        raise invalid(field, f"{field} is required (the hub's host name or IP address)")
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(value) or value.replace(".", "").isdigit():
        raise invalid(
            field,
            f"{field} must be a host name or an IP address, without scheme, port or path",
        )
    return value.rstrip(".").lower()


def _port(body: Mapping[str, Any], field: str, default: int) -> int:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise invalid(field, f"{field} must be an integer from 1 to 65535")
    return value


def _trust(body: Mapping[str, Any]) -> HubTrust:
    ca_file = _text(body, "tls_ca_file", 4096)
    pin_text = _text(body, "tls_pin_sha256", 200)
    plain = body.get("plain_http", False)
    if plain is None:
        plain = False
    if not isinstance(plain, bool):
        raise invalid("plain_http", "plain_http must be true or false")
    given = [
        name
        for name, on in (
            ("tls_ca_file", ca_file),
            ("tls_pin_sha256", pin_text),
            ("plain_http", plain),
        )
        if on
    ]
    if not given:
        raise invalid(
            "tls_pin_sha256",
            "say how the hub's enrollment URL is trusted: tls_ca_file (a PEM file of CAs), "
            'tls_pin_sha256 (the SHA-256 of its certificate) or "plain_http": true '
            "(a stock hub's http://<hub>:8082)",
        )
    if len(given) > 1:
        raise invalid(given[1], f"give only one of {', '.join(given)}")
    if pin_text is not None:
        try:
            pin = normalise_thumbprint(pin_text)
        except InvalidThumbprint:
            pin = ""
        if len(pin.replace(":", "")) != 64:
            raise invalid(
                "tls_pin_sha256",
                "tls_pin_sha256 must be a SHA-256 digest: 64 hex digits, colons optional",
            )
        return HubTrust(pin_sha256=pin)
    if ca_file is not None:
        if not ca_file.startswith("/"):
            raise invalid("tls_ca_file", "tls_ca_file must be an absolute path on the node")
        try:
            load_ca_certificates(ca_file)
            ssl.create_default_context(cafile=ca_file)
        except OSError as e:
            raise invalid("tls_ca_file", f"tls_ca_file cannot be read: {e.strerror or e}") from None
        except (ValueError, ssl.SSLError) as e:
            raise invalid(
                "tls_ca_file", f"tls_ca_file is not a PEM file of certificates: {e}"
            ) from None
        return HubTrust(ca_file=ca_file)
    return HubTrust(plain_http=True)


def parse_enroll_request(body: Mapping[str, Any]) -> EnrollRequest:
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise invalid(unknown[0][:100], f"unknown field {unknown[0][:100]!r}")
    oma_host = _host(body, "oma_host")
    code = body.get("pairing_code")
    if code is None or code == "":
        raise invalid("pairing_code", "pairing_code is required (from the hub's enrollment page)")
    if not isinstance(code, str):
        raise invalid("pairing_code", "pairing_code must be a string")
    code = code.strip()
    if not _CODE.fullmatch(code):
        # Never the code itself in the answer: it is a secret.
        raise invalid(
            "pairing_code",
            "pairing_code must be 1 to 128 printable ASCII characters without spaces "
            "(like XXXX-XXXX-XXXX)",
        )
    trust = _trust(body)
    oma_port = _port(body, "oma_port", DEFAULT_PLAIN_PORT if trust.plain_http else DEFAULT_TLS_PORT)
    vma_name = _text(body, "vma_name") or socket.gethostname() or "sna"
    vma_version = _text(body, "vma_version") or __version__
    ssh_host = _host(body, "ssh_host", default=oma_host)
    ssh_port = _port(body, "ssh_port", DEFAULT_SSH_PORT)
    user = _text(body, "ssh_user", 32) or DEFAULT_USER
    if not _USER.fullmatch(user):
        raise invalid(
            "ssh_user", "ssh_user must be a user name like vma_tunnel ([a-z_][a-z0-9_-]*)"
        )
    key_text = body.get("ssh_host_key")
    if key_text is None or key_text == "":
        raise invalid(
            "ssh_host_key",
            "ssh_host_key is required: the hub's SSH host key line ('ssh-ed25519 AAAA…', "
            "from /etc/ssh/ssh_host_ed25519_key.pub on the hub); the hub never sends it",
        )
    if not isinstance(key_text, str):
        raise invalid("ssh_host_key", "ssh_host_key must be a string")
    if len(key_text) > 16 * 1024:
        raise invalid("ssh_host_key", "ssh_host_key is too long for a public key line")
    check_text("ssh_host_key", key_text.strip())
    try:
        host_key = parse_host_key(key_text)
    except InvalidHostKey as e:
        raise invalid("ssh_host_key", f"ssh_host_key {e}") from None
    return EnrollRequest(
        oma_host=oma_host,
        oma_port=oma_port,
        pairing_code=code,
        vma_name=vma_name,
        vma_version=vma_version,
        trust=trust,
        ssh_host=ssh_host,
        ssh_port=ssh_port,
        ssh_user=user,
        host_key=host_key,
    )
