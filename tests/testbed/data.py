"""The bytes the testbed writes, and sizes as people type and read them."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

#: The unit of the seeded pattern: each aligned chunk has its own generator.
PATTERN_CHUNK = 64 * 1024
#: How much one piece of a streamed write holds.
PIECE = 1024 * 1024


def pattern_chunks(seed: int, offset: int, length: int) -> Iterator[bytes]:
    """The seeded pattern for ``[offset, offset + length)``, in pieces of at most 1 MiB.

    The byte at disk offset X for seed S is always the same, whatever the
    offset and length of the write that put it there: a test can recompute
    what any part of a disk must hold from the seeds it wrote.
    """
    position, end = offset, offset + length
    piece = bytearray()
    while position < end:
        index, skip = divmod(position, PATTERN_CHUNK)
        chunk = random.Random(f"sna-testbed:{seed}:{index}").randbytes(PATTERN_CHUNK)
        take = min(PATTERN_CHUNK - skip, end - position)
        piece += chunk[skip : skip + take]
        position += take
        if len(piece) >= PIECE:
            yield bytes(piece)
            piece.clear()
    if piece:
        yield bytes(piece)


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The seeded pattern for ``[offset, offset + length)`` in one piece."""
    return b"".join(pattern_chunks(seed, offset, length))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``64KiB``, ``1M``, ``2G``, or ``0x1000``; units are binary."""
    if text.lower().startswith("0x"):
        return int(text, 16)
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64K, 1MiB, 2G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def human_size(n: int) -> str:
    """An exact size in binary units: ``65536`` -> ``64 KiB``,
    ``104858112`` -> ``100 MiB + 512 B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            whole, rest = divmod(n, scale)
            return f"{whole} {unit}" + (f" + {human_size(rest)}" if rest else "")
    return f"{n} B"
