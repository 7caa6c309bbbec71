"""What one tunnel to a hub is: where, as whom, with which key, forwarding which ports.

Plain data, no I/O.  :mod:`sna.enrollment` makes one from an approved
enrollment, :mod:`sna.tap` from the ``--tunnel-*`` options of a node keyed
by hand; the supervisor (:mod:`sna.tunnel.supervisor`) runs ssh from it.
"""

from __future__ import annotations

from typing import Optional

import attrs

from sna.config import PortRange

#: The SSH user every node logs in as on a stock hub (enrollment-tunnel.md §1.9).
DEFAULT_USER = "vma_tunnel"
#: The hub's sshd port on a stock hub.
DEFAULT_SSH_PORT = 443
#: The hub's API, forwarded to the same port on the node's loopback.
DEFAULT_SHA_API_PORT = 8082
#: Where the hub reaches the node's API: its own loopback, this port.
DEFAULT_REVERSE_PORT = 9081
#: The hub's qemu-nbd port allocator's range (enrollment-tunnel.md §3).
DEFAULT_NBD_PORTS = PortRange(10100, 10200)


@attrs.frozen
class TunnelSettings:
    """One tunnel.  Every forward is ``127.0.0.1:P`` on both sides, as the hub's sshd compares them."""

    #: The hub's SSH host name or address, and port.
    host: str
    identity: str
    """Path of the node's private key (OpenSSH format, mode 0600)."""
    known_hosts: str
    """Path of a known_hosts file holding the hub's pinned host key, ``[host]:port`` form."""
    #: The node's API port on its own loopback: the target of the reverse forward.
    api_port: int
    port: int = DEFAULT_SSH_PORT
    user: str = DEFAULT_USER
    #: The hub's qemu-nbd ports, each forwarded to the same port on the node.
    nbd_ports: PortRange = DEFAULT_NBD_PORTS
    sha_api_port: int = DEFAULT_SHA_API_PORT
    reverse_port: int = DEFAULT_REVERSE_PORT
    #: An ssh ProxyCommand to reach the hub through (a jump host; the tests' namespaces).
    proxy_command: Optional[str] = None
    #: Which enrollment this tunnel belongs to, or None for a node keyed by hand.
    enrollment_id: Optional[str] = None
