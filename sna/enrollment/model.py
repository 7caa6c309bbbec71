"""One enrollment of this node with a hub: its states and its record.

Plain data, no I/O.  The record is what the job database keeps (never the
pairing code) and what ``GET /api/v1/enrollment/status`` shows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

import attrs

from sna.enrollment.hub import HubTrust
from sna.enrollment.keys import HostKey

NOT_ENROLLED = "not_enrolled"
#: The key is made; the enroll call to the hub is being sent (or retried).
ENROLLING = "enrolling"
#: The hub answered with a challenge; the signed challenge is being sent (or retried).
PENDING_VERIFICATION = "pending_verification"
#: The hub took the signature; it is asked for the administrator's decision every 5-10 s.
AWAITING_APPROVAL = "awaiting_approval"
#: The hub says approved: the tunnel is given the key and tried.
APPROVED = "approved"
#: The tunnel authenticated with the key: the hub really installed it.
ACTIVE = "active"
REJECTED = "rejected"
FAILED = "failed"

STATES = (
    NOT_ENROLLED,
    ENROLLING,
    PENDING_VERIFICATION,
    AWAITING_APPROVAL,
    APPROVED,
    ACTIVE,
    REJECTED,
    FAILED,
)
#: States a new enrollment may replace without DELETE first.
REPLACEABLE = frozenset({NOT_ENROLLED, REJECTED, FAILED})
#: States whose key the tunnel uses.
TUNNEL_STATES = frozenset({APPROVED, ACTIVE})


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@attrs.frozen
class Enrollment:
    """An enrollment: where the hub is, how it is trusted, the node's key, how far it got."""

    id: str
    state: str
    since: datetime
    created_at: datetime
    oma_host: str
    oma_port: int
    hub_url: str
    trust: HubTrust
    ssh_host: str
    ssh_port: int
    ssh_user: str
    host_key: HostKey
    vma_name: str
    vma_version: str
    public_key: str
    fingerprint: str
    key_comment: str
    #: The hub's id of this enrollment (from its enroll answer).
    hub_enrollment_id: Optional[str] = None
    #: The hub's challenge, kept until the signature is taken (to verify after a restart).
    challenge: Optional[str] = None
    #: Why it failed, was rejected, or what an operator should know of this state.
    reason: Optional[str] = None
    #: The last error of a call still being retried (the hub is unreachable, a 5xx).
    last_error: Optional[str] = None

    def moved(self, state: str, now: datetime, reason: Optional[str] = None) -> Enrollment:
        return attrs.evolve(self, state=state, since=now, reason=reason, last_error=None)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "since": self.since.isoformat(),
            "created_at": self.created_at.isoformat(),
            "oma_host": self.oma_host,
            "oma_port": self.oma_port,
            "hub_url": self.hub_url,
            "trust": self.trust.to_json(),
            "ssh_host": self.ssh_host,
            "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
            "host_key": self.host_key.line,
            "vma_name": self.vma_name,
            "vma_version": self.vma_version,
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "key_comment": self.key_comment,
            "hub_enrollment_id": self.hub_enrollment_id,
            "challenge": self.challenge,
            "reason": self.reason,
            "last_error": self.last_error,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Enrollment:
        kind, _, data = str(record["host_key"]).partition(" ")
        return cls(
            id=record["id"],
            state=record["state"],
            since=datetime.fromisoformat(record["since"]),
            created_at=datetime.fromisoformat(record["created_at"]),
            oma_host=record["oma_host"],
            oma_port=int(record["oma_port"]),
            hub_url=record["hub_url"],
            trust=HubTrust.from_json(record["trust"]),
            ssh_host=record["ssh_host"],
            ssh_port=int(record["ssh_port"]),
            ssh_user=record["ssh_user"],
            host_key=HostKey(kind, data),
            vma_name=record["vma_name"],
            vma_version=record["vma_version"],
            public_key=record["public_key"],
            fingerprint=record["fingerprint"],
            key_comment=record["key_comment"],
            hub_enrollment_id=record.get("hub_enrollment_id"),
            challenge=record.get("challenge"),
            reason=record.get("reason"),
            last_error=record.get("last_error"),
        )

    def file_record(self) -> dict[str, Any]:
        """What ``enrollment.json`` holds beside the key."""
        return {
            "id": self.id,
            "enrollment_id": self.hub_enrollment_id,
            "hub": self.hub_url,
            "fingerprint": self.fingerprint,
            "status": self.state,
        }

    def to_json(self, tunnel: Optional[str]) -> dict[str, Any]:
        """The status route's answer (never the challenge or the pairing code)."""
        return {
            "state": self.state,
            "since": timestamp(self.since),
            "reason": self.reason,
            "last_error": self.last_error,
            "id": self.id,
            "enrollment_id": self.hub_enrollment_id,
            "hub_url": self.hub_url,
            **self.trust.to_json(),
            "vma_name": self.vma_name,
            "vma_version": self.vma_version,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "ssh_host": self.ssh_host,
            "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
            "host_key": self.host_key.line,
            "host_key_fingerprint": self.host_key.fingerprint,
            "tunnel": tunnel,
            "created_at": timestamp(self.created_at),
        }
