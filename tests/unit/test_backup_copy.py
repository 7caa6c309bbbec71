"""One disk's copy against in-memory fakes: what becomes WRITE, WRITE_ZEROES, FLUSH, and errors.

Also the disk-to-target mapping, which must fail before any byte moves.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed

from sna.backup.copier import CopyError, DiskCopy, DiskStats
from sna.backup.extents import Area, plan
from sna.backup.job import JobError, map_targets
from sna.backup.readers import ReaderError
from sna.backup.vsphere import SnapshotDisk
from sna.contract.targets import NbdTarget
from sna.nbd.errors import ConnectionLost, TransmissionError

MiB = 1 << 20


class FakeReader:
    description = "fake source"
    max_request = 32 * MiB

    def __init__(self, data: bytes, fail_at: Optional[int] = None) -> None:
        self.size = len(data)
        self.data = data
        self.fail_at = fail_at
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        self.reads.append((offset, length))
        if offset == self.fail_at:
            return fail(ReaderError("GET: 500 Internal Server Error"))
        return succeed(self.data[offset : offset + length])


@attrs.frozen
class Info:
    can_write_zeroes: bool = True


class FakeTarget:
    """Records requests and keeps the image; ``hold`` leaves writes unanswered until released."""

    def __init__(self, size: int, write_error: Optional[Exception] = None) -> None:
        self.info = Info()
        self.image = bytearray(b"\xee" * size)  # not zero: WRITE_ZEROES must really zero
        self.log: list[tuple[str, int, int]] = []
        self.write_error = write_error
        self.flushed_after: Optional[int] = None

    def write(self, offset: int, data: bytes) -> Deferred[None]:
        self.log.append(("write", offset, len(data)))
        if self.write_error is not None:
            return fail(self.write_error)
        self.image[offset : offset + len(data)] = data
        return succeed(None)

    def write_zeroes(self, offset: int, length: int) -> Deferred[None]:
        self.log.append(("zeroes", offset, length))
        self.image[offset : offset + length] = bytes(length)
        return succeed(None)

    def drain(self) -> Deferred[None]:
        return succeed(None)

    def flush(self) -> Deferred[None]:
        self.log.append(("flush", 0, 0))
        return succeed(None)


def copier(reader: FakeReader, target: FakeTarget, ops: Any, total: int, **kw: Any) -> DiskCopy:
    # The fakes stand in for IDiskReader and NBDClient (duck-typed).
    return DiskCopy("2000", cast(Any, reader), cast(Any, target), "t", ops, DiskStats(total), **kw)


def run(copy: DiskCopy) -> Any:
    d = Deferred.fromCoroutine(copy.run())
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the fakes answer synchronously"
    return results[0]


def source() -> bytes:
    data = bytearray(12 * MiB + 512)
    data[0:MiB] = b"\x01" * MiB  # data
    # 1-2 MiB: zero inside an area; 4-8 MiB: data with one byte at the very end
    data[8 * MiB - 1] = 7
    data[12 * MiB : 12 * MiB + 512] = b"\x09" * 512  # the odd tail
    return bytes(data)


def test_zero_chunks_become_write_zeroes_and_flush_comes_last() -> None:
    data = source()
    areas = [Area(0, 2 * MiB), Area(4 * MiB, 4 * MiB), Area(12 * MiB, 512)]
    target = FakeTarget(len(data))
    ops = plan(areas, len(data), chunk=MiB, zero_gaps=True)
    copy = copier(FakeReader(data), target, ops, sum(a.length for a in areas), workers=3)
    stats = copy.stats
    assert run(copy) is stats
    assert bytes(target.image) == data
    flushes = [entry for entry in target.log if entry[0] == "flush"]
    assert flushes == [("flush", 0, 0)] and target.log[-1] == ("flush", 0, 0)
    writes = [(o, n) for kind, o, n in target.log if kind == "write"]
    assert (7 * MiB, MiB) in writes  # one non-zero byte at the end: data
    assert (MiB, MiB) not in writes  # all zero: no payload
    assert ("zeroes", MiB, MiB) in target.log
    assert stats.bytes_written == 2 * MiB + 512  # 0-1 MiB, 7-8 MiB, the tail
    assert stats.bytes_zero == 4 * MiB  # 1-2 MiB, 4-7 MiB
    assert stats.bytes_done == stats.bytes_total == stats.bytes_read
    assert stats.bytes_zero_filled == len(data) - stats.bytes_total


def test_without_zero_gaps_the_gaps_are_left_alone() -> None:
    data = source()
    target = FakeTarget(len(data))
    ops = plan([Area(0, MiB)], len(data), chunk=MiB, zero_gaps=False)
    run(copier(FakeReader(data), target, ops, MiB, workers=2))
    assert [e for e in target.log if e[0] != "flush"] == [("write", 0, MiB)]
    assert target.image[MiB:] == b"\xee" * (len(data) - MiB)


def test_a_read_error_fails_the_disk_without_flush() -> None:
    data = source()
    target = FakeTarget(len(data))
    ops = plan([Area(0, 4 * MiB)], len(data), chunk=MiB, zero_gaps=False)
    failure = run(copier(FakeReader(data, fail_at=2 * MiB), target, ops, 4 * MiB, workers=1))
    assert isinstance(failure.value, CopyError)
    assert "reading 1048576 bytes at offset 2097152 from fake source" in str(failure.value)
    assert all(kind != "flush" for kind, _, _ in target.log)
    assert ("write", 3 * MiB, MiB) not in target.log  # stopped at the first error


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (
            ConnectionLost("connection lost: Connection was closed cleanly."),
            "lost the connection to t",
        ),
        (TransmissionError("NBD_CMD_WRITE", 0, MiB, 28, "ENOSPC"), "ENOSPC"),
    ],
)
def test_a_write_error_fails_the_disk_without_flush(error: Exception, words: str) -> None:
    data = source()
    target = FakeTarget(len(data), write_error=error)
    ops = plan([Area(0, 2 * MiB)], len(data), chunk=MiB, zero_gaps=False)
    failure = run(copier(FakeReader(data), target, ops, 2 * MiB, workers=2))
    assert isinstance(failure.value, CopyError) and failure.value.disk_key == "2000"
    assert words in str(failure.value)
    assert all(kind != "flush" for kind, _, _ in target.log)


def test_a_stop_request_ends_the_copy_without_flush() -> None:
    data = source()
    target = FakeTarget(len(data))
    ops = plan([Area(0, 4 * MiB)], len(data), chunk=MiB, zero_gaps=False)
    stop = copier(FakeReader(data), target, ops, 4 * MiB, workers=1, stopped=lambda: "SIGTERM")
    failure = run(stop)
    assert "SIGTERM" in str(failure.value)
    assert target.log == []


def disk(key: str) -> SnapshotDisk:
    return SnapshotDisk(
        key, f"disk {key}", MiB, f"[ds] vm/{key}.vmdk", "ds", f"vm/{key}.vmdk", None, "Flat", False
    )


def target(key: str) -> NbdTarget:
    return NbdTarget(key, "127.0.0.1", 10100, f"e{key}")


def test_mapping_is_exact() -> None:
    mapping = map_targets([disk("2000"), disk("2016")], (target("2016"), target("2000")))
    assert mapping == {"2000": target("2000"), "2016": target("2016")}


def test_targets_keyed_the_sha_s_way_map_by_its_position() -> None:
    # SCSI 2000 and SATA 16000: the SHA's disk 0 is "disk-16000", the first in text order.
    mapping = map_targets([disk("2000"), disk("16000")], (target("2000"), target("2001")))
    assert mapping == {"16000": target("2000"), "2000": target("2001")}


def test_unmapped_and_unknown_keys_are_named_together() -> None:
    with pytest.raises(JobError) as raised:
        map_targets([disk("2000"), disk("2016")], (target("2000"), target("2999")))
    message = str(raised.value)
    assert "disks without a target in --nbd-targets: 2016" in message
    assert "does not have: 2999" in message
    assert "or, the SHA's way, 2000, 2001" in message
    assert "nothing was copied" in message


def test_single_disk_mode() -> None:
    single = (NbdTarget("", "127.0.0.1", 10808, "migration"),)
    assert map_targets([disk("2000")], single)["2000"].disk_key == "2000"
    with pytest.raises(JobError, match="has 2 disks"):
        map_targets([disk("2000"), disk("2001")], single)
