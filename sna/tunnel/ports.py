"""Who holds a TCP port on this machine, as far as ``/proc`` shows it.

Best effort, for an operator's message: the listening socket's inode from
``/proc/net/tcp`` and ``tcp6``, then the process whose descriptors include
that socket.  A process of another user is invisible without privileges;
then only the port is named.  Reads small ``/proc`` files only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

#: ``st`` of a listening socket in /proc/net/tcp.
_LISTEN = "0A"


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """Inodes of the sockets listening on ``port``, any address."""
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            _, _, hex_port = fields[1].rpartition(":")
            try:
                if int(hex_port, 16) == port:
                    found.add(fields[9])
            except ValueError:
                continue
    return found


def port_holder(port: int, proc: Path = Path("/proc")) -> Optional[str]:
    """``pid 1234 (nbdkit)`` for the process listening on ``port``, or None if not visible."""
    inodes = {f"socket:[{inode}]" for inode in listening_inodes(port, proc)}
    if not inodes:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in inodes:
                try:
                    name = (entry / "comm").read_text().strip()
                except OSError:
                    name = "?"
                return f"pid {entry.name} ({name})"
    return None
