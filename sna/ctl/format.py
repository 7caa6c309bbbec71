"""Numbers and records as text for people: sizes, rates, durations, bars, tables.

Every function is pure.  Widths are display columns: East Asian wide
characters count two, combining marks none, so tables of VM names in any
script line up.  Text that comes from the daemon goes through
:func:`printable` before it reaches a terminal: a VM name or an error with
an escape sequence must not move the cursor or recolour the screen.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Optional

#: What a value nobody knows yet looks like.
UNKNOWN = "-"
#: Marks text cut to fit a column.
CUT = "~"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size(count: Optional[float]) -> str:
    """Bytes in binary units with three significant digits: ``512 B``, ``1.50 KiB``,
    ``117 MiB``, ``12.3 GiB``."""
    if count is None or not math.isfinite(count) or count < 0:
        return UNKNOWN
    value = float(count)
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{int(value)} B"
    # Rounding may make 1023.9 KiB read "1024 KiB": show it as the next unit.
    if round(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if value < 9.995:
        return f"{value:.2f} {_UNITS[unit]}"
    if value < 99.95:
        return f"{value:.1f} {_UNITS[unit]}"
    return f"{value:.0f} {_UNITS[unit]}"


def rate(per_second: Optional[float]) -> str:
    """Bytes per second: ``117 MiB/s``; ``-`` when unknown."""
    if per_second is None or not math.isfinite(per_second) or per_second < 0:
        return UNKNOWN
    return f"{size(per_second)}/s"


def duration(seconds: Optional[float]) -> str:
    """``M:SS`` under an hour, then ``H:MM:SS`` (restic's way); ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return UNKNOWN
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def eta(remaining: Optional[float], per_second: Optional[float]) -> str:
    """How long ``remaining`` bytes take at ``per_second``; ``-`` when it cannot be told."""
    if remaining is None or per_second is None or not per_second > 0:
        return UNKNOWN
    return duration(max(remaining, 0) / per_second)


def percent(value: Optional[float]) -> str:
    """``48.1%``; ``-`` when unknown."""
    if value is None or not math.isfinite(value):
        return UNKNOWN
    return f"{min(max(value, 0.0), 100.0):.1f}%"


def bar(fraction: Optional[float], width: int) -> str:
    """``[=====>    ]`` of ``width`` columns in all (brackets included).

    An unknown fraction is an empty bar; a full one has no ``>``.
    """
    inner = max(width - 2, 0)
    if fraction is None or not math.isfinite(fraction):
        return "[" + " " * inner + "]"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * inner)
    if filled >= inner:
        return "[" + "=" * inner + "]"
    head = ">" if fraction > 0 else " "
    return "[" + "=" * filled + head + " " * (inner - filled - 1) + "]"


def printable(text: object) -> str:
    """``text`` with every control character (and lone surrogate) shown as an escape."""
    out = []
    for char in str(text):
        code = ord(char)
        category = unicodedata.category(char)
        if category == "Cc" or category == "Cs":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def width(text: str) -> int:
    """Display columns of ``text`` (wide characters two, combining marks none)."""
    return sum(char_width(c) for c in text)


def fit(text: str, columns: int) -> str:
    """``text`` cut to at most ``columns`` display columns, ending in ``~`` if cut."""
    if width(text) <= columns:
        return text
    if columns <= 0:
        return ""
    kept = []
    used = 0
    for char in text:
        w = char_width(char)
        if used + w > columns - len(CUT):
            break
        kept.append(char)
        used += w
    return "".join(kept) + CUT


def pad(text: str, columns: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``columns`` display columns (on the left if ``right``)."""
    space = " " * max(columns - width(text), 0)
    return space + text if right else text + space


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Sequence[int] = (),
    shrink: Sequence[int] = (),
    max_width: Optional[int] = None,
    gap: int = 2,
) -> list[str]:
    """The lines of a table: a header row and ``rows``, columns ``gap`` apart.

    Columns listed in ``right`` are right-aligned (numbers).  When the table
    is wider than ``max_width``, the ``shrink`` columns are cut (widest
    first, each to no less than its header) until it fits or they cannot
    give more; the other columns are never cut.  Trailing spaces are dropped.
    """
    cells = [[printable(c) for c in row] for row in rows]
    count = len(headers)
    widths = [width(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row[:count]):
            widths[i] = max(widths[i], width(cell))
    if max_width is not None:
        total = sum(widths) + gap * (count - 1)
        while total > max_width:
            candidates = [i for i in shrink if widths[i] > max(width(headers[i]), len(CUT) + 1)]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            floor = max(width(headers[widest]), len(CUT) + 1)
            take = min(total - max_width, widths[widest] - floor)
            widths[widest] -= take
            total -= take
    lines = []
    for row in [list(headers), *cells]:
        parts = [
            pad(fit(cell, widths[i]), widths[i], right=i in right)
            for i, cell in enumerate(row[:count])
        ]
        lines.append((" " * gap).join(parts).rstrip())
    return lines


def parse_time(text: Optional[str]) -> Optional[datetime]:
    """An RFC 3339 time of the API (``...Z``) as an aware datetime; ``None`` if absent or bad."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def local_time(text: Optional[str]) -> str:
    """An API time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` if absent."""
    moment = parse_time(text)
    if moment is None:
        return UNKNOWN
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
