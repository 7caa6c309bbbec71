"""The node's SSH key and the hub's host key: made, read, fingerprinted, signed with.

No I/O.  The formats are OpenSSH's: a private key in the ``openssh-key-v1``
format (``ssh -i`` and ``ssh-keygen -y`` read it; a raw seed is refused,
enrollment-tunnel.md §4 #9), a public key as one ``type base64 comment``
line, and a fingerprint as ``ssh-keygen -lf`` prints it: ``SHA256:`` and the
unpadded base64 of the SHA-256 of the key blob.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: Host key types a hub's sshd may present, as known_hosts names them.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
#: What a key comment may hold: it goes into the hub's authorized_keys line.
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")
_MAX_COMMENT = 64


class InvalidHostKey(ValueError):
    """The text is not an SSH public key line; the message says why."""


class InvalidChallenge(ValueError):
    """The hub's challenge is not base64."""


def fingerprint(blob: bytes) -> str:
    """``SHA256:…`` of a public key blob, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def comment_for(name: str) -> str:
    """A key comment naming the node: ``sna-<name>``, one word of safe characters."""
    safe = _COMMENT_UNSAFE.sub("-", name).strip("-") or "node"
    return ("sna-" + safe)[:_MAX_COMMENT]


@attrs.frozen
class NodeKey:
    """An Ed25519 key pair of the node, with the comment its public line carries."""

    private: Ed25519PrivateKey
    comment: str

    @classmethod
    def generate(cls, comment: str) -> NodeKey:
        if _COMMENT_UNSAFE.search(comment):
            raise ValueError(f"key comment {comment!r} has characters outside [A-Za-z0-9._@-]")
        return cls(Ed25519PrivateKey.generate(), comment)

    @classmethod
    def load(cls, private_openssh: bytes, comment: str) -> NodeKey:
        key = serialization.load_ssh_private_key(private_openssh, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the stored node key is not an Ed25519 key")
        return cls(key, comment)

    def private_openssh(self) -> bytes:
        """The private key in OpenSSH's own format, unencrypted (the file is 0600)."""
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    def blob(self) -> bytes:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .split()[1]
        )

    @property
    def public_line(self) -> str:
        """``ssh-ed25519 AAAA… comment``: one line, no newline; what the hub is sent."""
        return f"ssh-ed25519 {self.blob().decode('ascii')} {self.comment}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(base64.b64decode(self.blob()))

    def sign_challenge(self, challenge: str) -> str:
        """The signature of ``b64decode(challenge)``, standard base64 with padding.

        The hub's challenge is 64 hex digits, which is valid base64 too: it is
        decoded as base64 (48 bytes), as the Go node and the hub's designed
        verifier do (enrollment-tunnel.md §1.6).
        """
        try:
            message = base64.b64decode(challenge.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidChallenge("the hub's challenge is not base64") from None
        return base64.b64encode(self.private.sign(message)).decode("ascii")


@attrs.frozen
class HostKey:
    """The hub's SSH host key, as the operator gave it: a type and its base64 blob."""

    type: str
    data: str

    @property
    def line(self) -> str:
        return f"{self.type} {self.data}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(base64.b64decode(self.data))

    def known_hosts_line(self, host: str, port: int) -> str:
        """The known_hosts line of this key for ``host``: ``[host]:port`` unless port 22."""
        name = host if port == 22 else f"[{host}]:{port}"
        return f"{name} {self.line}\n"


def parse_host_key(text: str) -> HostKey:
    """A host key from ``type base64 [comment]`` (a ``.pub`` file's or
    ``ssh-keyscan``'s line, whose leading host name is skipped)."""
    words = text.strip().split()
    if words and words[0] not in HOST_KEY_TYPES and len(words) >= 3:
        words = words[1:]  # "host type base64", as ssh-keyscan prints it
    if len(words) < 2:
        raise InvalidHostKey("must be a public key line like 'ssh-ed25519 AAAA…'")
    kind, data = words[0], words[1]
    if kind not in HOST_KEY_TYPES:
        raise InvalidHostKey(f"key type {kind[:40]!r} is not one of {', '.join(HOST_KEY_TYPES)}")
    try:
        blob = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidHostKey("the key's base64 part is not base64") from None
    if _blob_type(blob) != kind:
        raise InvalidHostKey(f"the key's base64 part is not a {kind} key")
    try:
        serialization.load_ssh_public_key(f"{kind} {data}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidHostKey(f"the key's base64 part is not a valid {kind} key") from None
    return HostKey(kind, data)


def _blob_type(blob: bytes) -> str:
    """The key type a blob starts with (an SSH string), or ``""``."""
    if len(blob) < 4:
        return ""
    (length,) = struct.unpack(">I", blob[:4])
    return blob[4 : 4 + length].decode("ascii", "replace") if length <= 64 else ""
