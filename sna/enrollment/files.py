"""The enrollment's files under ``<state-dir>/enrollment/`` (mode 0700), each written atomically.

==========================  ======  ============================================
file                        mode    holds
==========================  ======  ============================================
``sha_tunnel_ed25519``      0600    the node's private key, OpenSSH format
``sha_tunnel_ed25519.pub``  0644    the exact public key line sent to the hub
``known_hosts``             0644    ``[host]:port type base64``: the hub's pinned host key
``enrollment.json``         0600    enrollment id, hub, fingerprint, status
==========================  ======  ============================================

Each file is written to a new temporary name in the same directory
(``O_CREAT|O_EXCL``, its final mode from the start), flushed with ``fsync``,
renamed over the old one, and the directory is synced: a crash leaves the
old file or the new one, never half of one.  The files are a few hundred
bytes, so this runs on the reactor thread.  The pairing code is never
written anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import attrs

DIRECTORY = "enrollment"
PRIVATE_KEY = "sha_tunnel_ed25519"
PUBLIC_KEY = PRIVATE_KEY + ".pub"
KNOWN_HOSTS = "known_hosts"
RECORD = "enrollment.json"
_ALL = (PRIVATE_KEY, PUBLIC_KEY, KNOWN_HOSTS, RECORD)


@attrs.frozen
class EnrollmentFiles:
    """The enrollment directory under a state directory."""

    directory: str

    @classmethod
    def under(cls, state_dir: str) -> EnrollmentFiles:
        return cls(os.path.join(state_dir, DIRECTORY))

    @property
    def private_key(self) -> str:
        return os.path.join(self.directory, PRIVATE_KEY)

    @property
    def public_key(self) -> str:
        return os.path.join(self.directory, PUBLIC_KEY)

    @property
    def known_hosts(self) -> str:
        return os.path.join(self.directory, KNOWN_HOSTS)

    @property
    def record(self) -> str:
        return os.path.join(self.directory, RECORD)

    def prepare(self) -> None:
        """Make the directory (and its parents), mode 0700 whatever the umask or a former mode."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def write(self, name: str, data: bytes, mode: int) -> None:
        """Replace ``name`` in the directory by ``data`` with ``mode``, atomically."""
        final = os.path.join(self.directory, name)
        temporary = os.path.join(self.directory, f".{name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            try:
                os.fchmod(fd, mode)  # the umask may have taken bits the file needs
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, final)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        self._sync_directory()

    def enrolled(self) -> bool:
        """Whether the record says the hub approved this node (``approved`` or ``active``).

        For option parsing, before the database is open: the record is written
        with every change of state (a missing or unreadable one says no).
        """
        try:
            with open(self.record, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and record.get("status") in ("approved", "active")

    def write_record(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        self.write(RECORD, data, 0o600)

    def remove(self) -> None:
        """Delete the enrollment's files (and leftovers of interrupted writes); keep the directory."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name in _ALL or (name.startswith(".") and name.endswith(".tmp")):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
