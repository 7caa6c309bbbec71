"""Areas of a disk: what to copy, what to zero, and how to cut it into requests.

Everything here is pure and synchronous, so the rules that decide which bytes
move are tested in memory:

- :func:`page_changed_areas` pages ``QueryChangedDiskAreas`` to the end of
  the disk (``startOffset = previous start + length``, never called at the
  capacity, failing on an answer that makes no progress or skips bytes);
- :func:`normalise` clips to the disk and merges overlapping or touching areas;
- :func:`gaps` is the complement (what a full leaves unread);
- :func:`plan` orders read and zero-fill operations by offset and cuts the
  reads at absolute multiples of the request size;
- :func:`is_zero` decides whether a whole chunk is zero, comparing every byte.

It does no I/O and knows nothing of vCenter or NBD objects: the query is a
callable handed in by the caller.
"""

from __future__ import annotations

import enum
import functools
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional, Union

import attrs


@attrs.frozen
class Area:
    """``length`` bytes of a disk from ``start``."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@attrs.frozen
class ChangeWindow:
    """One ``QueryChangedDiskAreas`` answer: the range it covers and the areas in it."""

    start: int
    length: int
    areas: tuple[Area, ...]


class PagingError(Exception):
    """vCenter's answers do not cover the disk sensibly; the message says how."""


def normalise(areas: Iterable[Area], capacity: int) -> list[Area]:
    """Sorted, clipped to ``[0, capacity)``, empty ones dropped, overlapping or touching ones merged."""
    clipped = []
    for area in areas:
        start = max(area.start, 0)
        end = min(area.end, capacity)
        if end > start:
            clipped.append((start, end))
    clipped.sort()
    merged: list[Area] = []
    for start, end in clipped:
        if merged and start <= merged[-1].end:
            last = merged[-1]
            if end > last.end:
                merged[-1] = Area(last.start, end - last.start)
        else:
            merged.append(Area(start, end - start))
    return merged


def total(areas: Iterable[Area]) -> int:
    return sum(area.length for area in areas)


def gaps(areas: Sequence[Area], capacity: int) -> list[Area]:
    """What of ``[0, capacity)`` the (normalised) ``areas`` do not cover."""
    result: list[Area] = []
    position = 0
    for area in areas:
        if area.start > position:
            result.append(Area(position, area.start - position))
        position = max(position, area.end)
    if position < capacity:
        result.append(Area(position, capacity - position))
    return result


class ChangedAreaPager:
    """The paging of ``QueryChangedDiskAreas`` over a disk, one answer at a time.

    vSphere answers for a window ``[startOffset, startOffset + length)``; the
    next call starts where that window ends (:attr:`next_start`, ``None`` once
    the disk is covered).  It is never asked for ``start == capacity``
    (vSphere answers that with InvalidArgument), and an answer that starts
    after the requested offset (bytes nobody reported on) or makes no
    progress is an error rather than a silent hole or an endless loop.
    """

    def __init__(self, capacity: int, *, max_pages: int = 1_000_000) -> None:
        self._capacity = capacity
        self._max_pages = max_pages
        self._start = 0
        self._pages = 0
        self._found: list[Area] = []

    @property
    def next_start(self) -> Optional[int]:
        """Where the next call starts, or ``None`` when every byte is covered."""
        if self._start >= self._capacity:
            return None
        if self._pages >= self._max_pages:
            raise PagingError(f"more than {self._max_pages} QueryChangedDiskAreas pages")
        return self._start

    def add(self, window: ChangeWindow) -> None:
        """The answer to the call from :attr:`next_start`."""
        start = self._start
        self._pages += 1
        if window.start > start:
            raise PagingError(
                f"QueryChangedDiskAreas from offset {start} answered from {window.start}: "
                f"the {window.start - start} bytes between would go unreported"
            )
        end = window.start + window.length
        if window.length <= 0 or end <= start:
            raise PagingError(
                f"QueryChangedDiskAreas from offset {start} made no progress "
                f"(startOffset {window.start}, length {window.length})"
            )
        for area in window.areas:
            # Areas outside the window it claims to cover are not trusted to be complete.
            lo = max(area.start, window.start)
            hi = min(area.end, end)
            if hi > lo:
                self._found.append(Area(lo, hi - lo))
        self._start = end

    def areas(self) -> list[Area]:
        """Every area reported, normalised (call once :attr:`next_start` is ``None``)."""
        return normalise(self._found, self._capacity)


def page_changed_areas(
    query: Callable[[int], ChangeWindow], capacity: int, *, max_pages: int = 1_000_000
) -> list[Area]:
    """Every area ``query`` reports from offset 0 to ``capacity``, normalised.

    ``query(start)`` is one ``QueryChangedDiskAreas(..., startOffset=start, ...)``;
    the paging rules are :class:`ChangedAreaPager`'s.
    """
    pager = ChangedAreaPager(capacity, max_pages=max_pages)
    while (start := pager.next_start) is not None:
        pager.add(query(start))
    return pager.areas()


class OpKind(enum.Enum):
    #: Read the range from the source and write it (or WRITE_ZEROES it when all zero).
    COPY = "copy"
    #: WRITE_ZEROES the range without reading it (a full's gap on a target not known zero).
    ZERO = "zero"


@attrs.frozen
class Op:
    kind: OpKind
    offset: int
    length: int


def split(area: Area, chunk: int) -> Iterator[Area]:
    """``area`` in pieces of at most ``chunk``, cut at absolute multiples of ``chunk``.

    Absolute cuts keep every piece after the first aligned the same way whatever
    the area's start, which suits both the source's and the target's blocks.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    position, end = area.start, area.end
    while position < end:
        stop = min(end, (position // chunk + 1) * chunk)
        yield Area(position, stop - position)
        position = stop


def plan(
    areas: Sequence[Area],
    capacity: int,
    *,
    chunk: int,
    zero_gaps: bool,
    zero_chunk: int = 1 << 30,
) -> Iterator[Op]:
    """The operations for one disk, in offset order, made as they are consumed.

    ``areas`` (normalised) are copied in requests of at most ``chunk`` bytes.
    With ``zero_gaps`` everything else of ``[0, capacity)`` is zeroed (pieces
    of at most ``zero_chunk``, so a huge gap does not become one giant batch);
    without, it is left alone.  Lazy: a 2 TiB disk in 4 MiB requests would be
    half a million objects.
    """
    copies = (Op(OpKind.COPY, p.start, p.length) for a in areas for p in split(a, chunk))
    if not zero_gaps:
        return copies
    zeroes = (
        Op(OpKind.ZERO, p.start, p.length)
        for gap in gaps(areas, capacity)
        for p in split(gap, zero_chunk)
    )
    return heapq.merge(copies, zeroes, key=lambda op: op.offset)


@functools.lru_cache(maxsize=16)
def _zeros(length: int) -> bytes:
    # bytes(n) is calloc'd: large ones cost address space, not memory, until compared.
    return bytes(length)


def is_zero(data: Union[bytes, bytearray, memoryview]) -> bool:
    """True only when every byte of ``data`` is zero.

    One comparison with zeros, which CPython does with ``memcmp`` for
    ``bytes`` and ``bytearray`` (tens of GB/s, stopping at the first
    difference).  Never sampled: a chunk with a single non-zero byte
    anywhere is data.
    """
    if type(data) is memoryview:
        data = bytes(data)  # memoryview == bytes compares item by item
    return data == _zeros(len(data))
