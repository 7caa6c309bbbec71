"""CBT change IDs: parsing them and telling whether one can serve as an incremental's base.

A change ID is what vSphere puts in a disk backing's ``changeId``:
``"52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b/78"``, the UUID of the disk's
tracking instance (16 bytes as two groups of 8 space-separated hex pairs
joined by ``-``), a ``/`` and a sequence number.  A CBT reset starts a new
instance with a new UUID, after which no earlier ID may be used.

This module only parses and compares; it never talks to vCenter, and it never
rewrites an ID: what is passed back to ``QueryChangedDiskAreas`` and reported
in events is always the exact text vCenter gave.
"""

from __future__ import annotations

import re
from typing import Optional

import attrs

from sna.contract import events as contract

MAX_CHANGE_ID = contract.MAX_CHANGE_ID
_HEX = re.compile(r"[0-9a-fA-F]{32}")


class InvalidChangeId(ValueError):
    """The text is not a vSphere change ID; the message says why."""


@attrs.frozen
class ChangeId:
    """One parsed change ID.  ``text`` is exactly what was parsed."""

    text: str
    #: The tracking instance: 32 lower-case hex digits, separators removed.
    uuid: str
    sequence: int

    def same_instance(self, other: ChangeId) -> bool:
        """True when both IDs come from the same tracking instance (no CBT reset between)."""
        return self.uuid == other.uuid

    @property
    def uuid_text(self) -> str:
        """The UUID part as vSphere prints it, for messages."""
        return self.text.rpartition("/")[0].strip()


def parse_change_id(text: str) -> ChangeId:
    """Parse ``text`` or raise :class:`InvalidChangeId`.

    The UUID part may use any spacing and case (some tools normalise it), but
    must hold exactly 16 bytes of hex; the sequence is a decimal number.
    ``"*"`` is not a change ID here: it is a query, never a base.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidChangeId("the change ID is empty")
    if len(text) > MAX_CHANGE_ID or any(not c.isprintable() for c in text):
        raise InvalidChangeId("the change ID is too long or has control characters")
    uuid_part, slash, sequence = text.strip().rpartition("/")
    if not slash:
        raise InvalidChangeId(f"{text!r} has no '/<sequence>' part")
    if not sequence.isascii() or not sequence.isdigit():
        raise InvalidChangeId(f"{text!r}: the sequence {sequence!r} is not a number")
    digits = uuid_part.replace(" ", "").replace("-", "")
    if not _HEX.fullmatch(digits):
        raise InvalidChangeId(
            f"{text!r}: the UUID part is not 16 bytes of hex "
            "(like '52 ab f5 21 86 ad f2 ff-5b ef c0 f2 3b 53 eb 3b')"
        )
    return ChangeId(text=text, uuid=digits.lower(), sequence=int(sequence))


def try_parse(text: Optional[str]) -> Optional[ChangeId]:
    """``parse_change_id``, or None for None, empty or malformed text."""
    if text is None:
        return None
    try:
        return parse_change_id(text)
    except InvalidChangeId:
        return None
