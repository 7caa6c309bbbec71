"""Areas: paging QueryChangedDiskAreas, merging, gaps, request cutting, zero detection."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sna.backup.extents import (
    Area,
    ChangeWindow,
    Op,
    OpKind,
    PagingError,
    gaps,
    is_zero,
    normalise,
    page_changed_areas,
    plan,
    split,
    total,
)

MiB = 1 << 20


def pager(
    areas: list[Area], capacity: int, page: int
) -> tuple[list[int], Callable[[int], ChangeWindow]]:
    """A fake QueryChangedDiskAreas answering ``page`` bytes at a time; records the offsets asked."""
    asked: list[int] = []

    def query(start: int) -> ChangeWindow:
        assert 0 <= start < capacity, "never called at or past the capacity"
        asked.append(start)
        end = min(start + page, capacity)
        inside = tuple(
            Area(max(a.start, start), min(a.end, end) - max(a.start, start))
            for a in areas
            if a.start < end and a.end > start
        )
        return ChangeWindow(start, end - start, inside)

    return asked, query


def test_paging_to_the_end_of_the_disk() -> None:
    capacity = 17 * MiB + 512
    areas = [Area(0, 65536), Area(4 * MiB - 512, 1024), Area(capacity - 512, 512)]
    asked, query = pager(areas, capacity, 4 * MiB)
    found = page_changed_areas(query, capacity)
    assert asked == [0, 4 * MiB, 8 * MiB, 12 * MiB, 16 * MiB]
    # The area cut by the page boundary comes back whole.
    assert found == areas


def test_one_page_when_the_server_answers_for_the_whole_disk() -> None:
    asked, query = pager([Area(0, 512)], 10 * MiB, 1 << 40)
    assert page_changed_areas(query, 10 * MiB) == [Area(0, 512)]
    assert asked == [0]


def test_no_progress_is_an_error_not_a_loop() -> None:
    def stuck(start: int) -> ChangeWindow:
        return ChangeWindow(start, 0, ())

    with pytest.raises(PagingError, match="no progress"):
        page_changed_areas(stuck, MiB)


def test_a_window_starting_late_is_an_error() -> None:
    def late(start: int) -> ChangeWindow:
        return ChangeWindow(start + 512, MiB, ())

    with pytest.raises(PagingError, match="unreported"):
        page_changed_areas(late, MiB)


def test_areas_outside_the_window_or_disk_are_clipped() -> None:
    def sloppy(start: int) -> ChangeWindow:
        return ChangeWindow(0, 2 * MiB, (Area(-512, 1024), Area(MiB, 4 * MiB)))

    assert page_changed_areas(sloppy, MiB + 512) == [Area(0, 512), Area(MiB, 512)]


def test_normalise_merges_overlapping_and_touching() -> None:
    areas = [Area(100, 50), Area(0, 100), Area(120, 100), Area(300, 0), Area(400, 10)]
    assert normalise(areas, 405) == [Area(0, 220), Area(400, 5)]


def test_gaps_are_the_complement() -> None:
    areas = [Area(0, 10), Area(20, 5)]
    assert gaps(areas, 30) == [Area(10, 10), Area(25, 5)]
    assert gaps([], 30) == [Area(0, 30)]
    assert gaps([Area(0, 30)], 30) == []


def test_split_cuts_at_absolute_multiples() -> None:
    pieces = list(split(Area(3 * MiB, 9 * MiB + 512), 4 * MiB))
    assert pieces == [
        Area(3 * MiB, MiB),
        Area(4 * MiB, 4 * MiB),
        Area(8 * MiB, 4 * MiB),
        Area(12 * MiB, 512),
    ]


def test_plan_caps_requests_and_fills_gaps_in_order() -> None:
    areas = [Area(MiB, 9 * MiB)]
    ops = list(plan(areas, 12 * MiB + 512, chunk=4 * MiB, zero_gaps=True))
    assert ops == [
        Op(OpKind.ZERO, 0, MiB),
        Op(OpKind.COPY, MiB, 3 * MiB),
        Op(OpKind.COPY, 4 * MiB, 4 * MiB),
        Op(OpKind.COPY, 8 * MiB, 2 * MiB),
        Op(OpKind.ZERO, 10 * MiB, 2 * MiB + 512),
    ]
    assert all(op.length <= 4 * MiB for op in ops if op.kind is OpKind.COPY)
    assert list(plan(areas, 12 * MiB, chunk=4 * MiB, zero_gaps=False)) == [
        op for op in ops if op.kind is OpKind.COPY
    ]


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 700)), max_size=20),
    st.integers(1, 6000),
    st.integers(1, 900),
    st.booleans(),
)
def test_plan_covers_exactly(
    raw: list[tuple[int, int]], capacity: int, chunk: int, zero_gaps: bool
) -> None:
    areas = normalise([Area(s, n) for s, n in raw], capacity)
    ops = list(plan(areas, capacity, chunk=chunk, zero_gaps=zero_gaps, zero_chunk=1000))
    covered = [(op.offset, op.offset + op.length) for op in ops]
    assert covered == sorted(covered)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(covered))
    copied = sum(op.length for op in ops if op.kind is OpKind.COPY)
    assert copied == total(areas)
    assert all(op.length <= chunk for op in ops if op.kind is OpKind.COPY)
    if zero_gaps:
        assert sum(op.length for op in ops) == capacity
    else:
        assert all(op.kind is OpKind.COPY for op in ops)


def test_zero_detection_reads_every_byte() -> None:
    chunk = 4 * MiB
    assert is_zero(bytes(chunk))
    assert is_zero(b"")
    last = bytearray(chunk)
    last[-1] = 1
    assert not is_zero(bytes(last))
    # Where a sampler (start, quarters, end, 8 KiB each) would look: nowhere here.
    between = bytearray(chunk)
    between[chunk // 8] = 0x80
    assert not is_zero(bytes(between))
    first = bytearray(chunk)
    first[0] = 1
    assert not is_zero(bytes(first))
    assert not is_zero(bytearray(b"\0\0\1"))
    assert is_zero(memoryview(bytes(513)))
    # A body received into a bytearray is checked as it is, every byte.
    assert is_zero(bytearray(chunk))
    assert not is_zero(last) and not is_zero(between) and not is_zero(first)
    assert not is_zero(memoryview(last))
