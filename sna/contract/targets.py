"""NBD targets: one type, and the grammar of ``nbd_targets`` / ``--nbd-targets``.

A target is where one disk is written: ``{disk_key}:nbd://{host}:{port}/{export}``,
entries joined by commas.  The disk key is a decimal number (the VMware
device key, or the SHA's ``2000+i``); the export is the URL's path,
percent-encoded when written so that a comma or a space in it cannot split
or break the list, and decoded when read.  The daemon's API reads a
request's targets by this grammar and adds its own policy (allowed hosts and
ports, how many); it writes the relayed targets for the client with
:func:`format_targets`; the client reads them back with :func:`parse_targets`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Optional

import attrs

#: The NBD protocol's limit on export names, in bytes.
MAX_EXPORT = 4096
#: What the Go client took for a target URL without a host or a port.
LENIENT_HOST = "127.0.0.1"
LENIENT_PORT = 10809


@attrs.frozen
class NbdTarget:
    """Where one disk is written."""

    disk_key: str
    host: str
    port: int
    export: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{urllib.parse.quote(self.export, safe='')}"

    @property
    def spec(self) -> str:
        """The target as one ``nbd_targets`` entry."""
        return f"{self.disk_key}:{self.url}"

    def describe(self) -> str:
        return f"{self.host}:{self.port}/{self.export}"


class TargetError(ValueError):
    """An entry that is not a target: ``number`` counts from 1, ``reason`` says why."""

    def __init__(self, number: int, entry: str, reason: str) -> None:
        self.number = number
        self.entry = entry
        self.reason = reason
        super().__init__(f"entry {number} ({entry[:200]!r}): {reason}")


def format_targets(targets: Iterable[NbdTarget]) -> str:
    return ",".join(target.spec for target in targets)


def parse_disk_key(text: str) -> Optional[str]:
    """A disk key without leading zeros, or None if ``text`` is not 1-9 ASCII digits."""
    key = text.strip()
    if not key.isascii() or not key.isdigit() or len(key) > 9:
        return None
    return str(int(key))


def parse_target(entry: str, lenient: bool = False) -> NbdTarget:
    """One entry; ``ValueError`` with the reason.  ``lenient``: the Go client's defaults
    for a URL without a host (127.0.0.1) or a port (10809)."""
    if not entry:
        raise ValueError("is empty; the format is {disk_key}:nbd://{host}:{port}/{export}")
    raw_key, sep, url = entry.partition(":")
    if not sep or not url.startswith("nbd://"):
        raise ValueError("must look like {disk_key}:nbd://{host}:{port}/{export}")
    key = parse_disk_key(raw_key)
    if key is None:
        raise ValueError(f"disk key {raw_key!r} is not a number (a VMware device key, like 2000)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced [ of an IPv6 address
        raise ValueError("the URL has no host") from None
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("the URL must have no user, query or fragment")
    host = parts.hostname or (LENIENT_HOST if lenient else "")
    if not host:
        raise ValueError("the URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    if port is None and lenient:
        port = LENIENT_PORT
    if port is None:
        raise ValueError("the URL has no port")
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    export = urllib.parse.unquote(parts.path[1:])
    if not export:
        raise ValueError("the URL names no export")
    if len(export.encode()) > MAX_EXPORT or any(not c.isprintable() for c in export):
        raise ValueError("the export name is too long or has control characters")
    return NbdTarget(key, host, port, export)


def parse_targets(text: str, lenient: bool = False) -> tuple[NbdTarget, ...]:
    """Every entry of ``text`` (spaces around commas ignored); :class:`TargetError` for the
    first that is not a target, or repeats a disk key or a port."""
    targets: list[NbdTarget] = []
    keys: dict[str, int] = {}
    ports: dict[int, int] = {}
    for number, raw in enumerate(text.split(","), 1):
        entry = raw.strip()
        try:
            target = parse_target(entry, lenient)
        except ValueError as e:
            raise TargetError(number, entry, str(e)) from None
        if target.disk_key in keys:
            raise TargetError(
                number,
                entry,
                f"disk key {target.disk_key} is already used by entry {keys[target.disk_key]}",
            )
        # Whatever the hosts: they are all this machine's loopback (or the tunnel's).
        if target.port in ports:
            raise TargetError(
                number, entry, f"port {target.port} is already used by entry {ports[target.port]}"
            )
        keys[target.disk_key] = ports[target.port] = number
        targets.append(target)
    return tuple(targets)
