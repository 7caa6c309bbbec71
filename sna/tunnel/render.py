"""The tunnel's state as JSON, for ``GET /api/v1/tunnel`` and the ``tunnel`` of ``/health``.

Only what an operator may see: host, port, user and ports, never a key's
contents (the identity and known_hosts are paths and are not shown either).
"""

from __future__ import annotations

from typing import Any, Optional

from sna.api.render import timestamp
from sna.tunnel.supervisor import TunnelState


def summary(state: Optional[TunnelState]) -> dict[str, Any]:
    """The short form in ``/api/v1/health``."""
    if state is None or not state.configured:
        return {"configured": False, "state": "not_configured", "reason": None}
    return {
        "configured": True,
        "state": state.state,
        "since": timestamp(state.since),
        "reason": None if state.up else (state.last_error or state.state),
        "reconnects": state.reconnects,
    }


def full(state: Optional[TunnelState]) -> dict[str, Any]:
    """Everything ``GET /api/v1/tunnel`` answers."""
    if state is None or state.settings is None:
        return {
            "configured": False,
            "state": "not_configured",
            "since": None if state is None else timestamp(state.since),
            "last_error": None if state is None else state.last_error,
            "reconnects": 0 if state is None else state.reconnects,
            "host": None,
            "port": None,
            "user": None,
            "forwards": None,
            "refused_ports": [],
            "authenticated": False,
            "pid": None,
        }
    settings = state.settings
    return {
        "configured": True,
        "state": state.state,
        "since": timestamp(state.since),
        "last_error": state.last_error,
        "reconnects": state.reconnects,
        "host": state.host,
        "port": state.port,
        "user": state.user,
        "forwards": {
            "count": state.forwards,
            "nbd_ports": str(settings.nbd_ports),
            "sha_api_port": settings.sha_api_port,
            "reverse_port": settings.reverse_port,
            "api_port": settings.api_port,
        },
        "refused_ports": list(state.refused_ports),
        "authenticated": state.authenticated,
        "pid": state.pid,
    }
