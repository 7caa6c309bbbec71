"""What one line of ``ssh``'s stderr means for the tunnel.

OpenSSH 9.2p1, run with ``-o LogLevel=DEBUG1`` (checked against the real
client and Debian's sshd, loopback only).  ``VERBOSE`` would be enough for
``Authenticated to``, but a refused channel is reported as ``channel 4: open
failed: administratively prohibited`` alone: only the ``debug1`` lines
before it (``Connection to port P forwarding ...``, ``channel 4: new
direct-tcpip``) say which port it was for.  Pure parsing, no I/O, no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Optional, Union

import attrs

#: The prefix of ssh's debug lines: parsed, never logged (they are many).
DEBUG_PREFIX = "debug1: "


@attrs.frozen
class Authenticated:
    """The hub accepted the node's key."""


@attrs.frozen
class ForwardsReady:
    """Every remote forward was granted, after every local listener was bound."""


@attrs.frozen
class HostKeyRejected:
    """The hub's host key is not the pinned one (``changed``) or none is pinned for it."""

    changed: bool


@attrs.frozen
class VerificationFailed:
    """``Host key verification failed.``: ssh ends now."""


@attrs.frozen
class PermissionDenied:
    """The hub refused the node's key: not installed, or revoked."""


@attrs.frozen
class LocalPortBusy:
    port: int


@attrs.frozen
class RemoteListenFailed:
    port: int


@attrs.frozen
class ConnectionToPort:
    """A local connection arrived on the forwarded port ``port`` (a channel follows)."""

    port: int


@attrs.frozen
class ChannelOpened:
    channel: int


@attrs.frozen
class ChannelFailed:
    """The hub would not open the channel: ``prohibited`` by policy, or for ``reason``."""

    channel: int
    prohibited: bool
    reason: str


@attrs.frozen
class ChannelFreed:
    channel: int


Event = Union[
    Authenticated,
    ForwardsReady,
    HostKeyRejected,
    VerificationFailed,
    PermissionDenied,
    LocalPortBusy,
    RemoteListenFailed,
    ConnectionToPort,
    ChannelOpened,
    ChannelFailed,
    ChannelFreed,
]

_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Event]]] = [
    (re.compile(r"^Authenticated to "), lambda m: Authenticated()),
    (
        re.compile(r"^debug1: forwarding_success: all expected forwarding replies received"),
        lambda m: ForwardsReady(),
    ),
    (re.compile(r"^Host key for .* has changed"), lambda m: HostKeyRejected(changed=True)),
    (re.compile(r"^No \S+ host key is known for "), lambda m: HostKeyRejected(changed=False)),
    (re.compile(r"^Host key verification failed\."), lambda m: VerificationFailed()),
    (re.compile(r"Permission denied \("), lambda m: PermissionDenied()),
    (
        re.compile(r"^bind \[[^\]]*\]:(\d+): Address already in use"),
        lambda m: LocalPortBusy(int(m[1])),
    ),
    (
        re.compile(r"remote port forwarding failed for listen port (\d+)"),
        lambda m: RemoteListenFailed(int(m[1])),
    ),
    (
        re.compile(r"^debug1: Connection to port (\d+) forwarding to "),
        lambda m: ConnectionToPort(int(m[1])),
    ),
    (re.compile(r"^debug1: channel (\d+): new direct-tcpip "), lambda m: ChannelOpened(int(m[1]))),
    (
        re.compile(r"^channel (\d+): open failed: (.*)$"),
        lambda m: ChannelFailed(int(m[1]), m[2].startswith("administratively prohibited"), m[2]),
    ),
    (re.compile(r"^debug1: channel (\d+): free: direct-tcpip"), lambda m: ChannelFreed(int(m[1]))),
]


def parse(line: str) -> Optional[Event]:
    """The event ``line`` reports, or None for a line that changes nothing."""
    for pattern, make in _PATTERNS:
        match = pattern.search(line)
        if match is not None:
            return make(match)
    return None


def is_debug(line: str) -> bool:
    return line.startswith(DEBUG_PREFIX)
