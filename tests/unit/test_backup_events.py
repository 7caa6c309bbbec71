"""The client's stdout: each event one line that sna's own parser accepts, in contract order."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest

from sna.backup.events import MASK, EventWriter, encode
from sna.sbc import events as sbc
from sna.sbc.parse import JsonLineParser

NOW = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
CHANGE_ID = "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5440"


def writer(secrets: tuple[str, ...] = ()) -> tuple[EventWriter, io.BytesIO]:
    out = io.BytesIO()
    return EventWriter(out, now=lambda: NOW, secrets=secrets), out


def lines(out: io.BytesIO) -> list[str]:
    text = out.getvalue().decode("utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def test_encode_one_compact_line() -> None:
    line = encode("progress", {"disk_key": "2000", "bytes_done": 5, "gone": None}, ts="T")
    assert line == b'{"event":"progress","disk_key":"2000","bytes_done":5,"ts":"T"}\n'
    assert encode("error", {"message": "caf\u00e9 \u2603"}).decode("utf-8").count("\n") == 1


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        encode("progress", {"throughput_bps": float("nan")})


def test_a_whole_run_parses_as_snas_events() -> None:
    w, out = writer()
    w.phase("snapshot", "Creating snapshot sbak-1")
    w.disk_plan(
        "2001",
        "full",
        "backup_type full requested",
        1 << 30,
        vmware_disk_key="16000",
        capacity_bytes=2 << 30,
    )
    w.disk_start("2000", "full", "backup_type full requested", 1 << 30, capacity_bytes=2 << 30)
    w.progress("2000", 1 << 29, 1 << 30, 123456.7)
    w.disk_done("2000", CHANGE_ID, bytes_done=1 << 30, bytes_total=1 << 30, bytes_zero=0)
    w.error("snapshot could not be removed", disk_key=None)
    w.done("1 disk backed up", disks=1)
    parser = JsonLineParser()
    parsed = [parser.parse(line) for line in lines(out)]
    assert all(len(p) == 1 for p in parsed), parsed
    assert [p[0] for p in parsed] == [
        sbc.Phase("snapshot", "Creating snapshot sbak-1"),
        sbc.DiskPlan("2001", "full", 1 << 30, "backup_type full requested", "16000", 2 << 30),
        sbc.DiskStart("2000", "full", "backup_type full requested", 1 << 30, None, 2 << 30),
        sbc.Progress(1 << 29, 1 << 30, "2000", 123456.7),
        sbc.DiskDone("2000", CHANGE_ID, 1 << 30, 1 << 30),
        sbc.Error("snapshot could not be removed"),
        sbc.Done("1 disk backed up"),
    ]
    assert json.loads(lines(out)[0])["ts"] == "2026-01-02T03:04:05.678Z"


def test_secrets_are_masked_and_text_is_bounded() -> None:
    w, out = writer(secrets=("hunter2",))
    w.error("login as admin with hunter2 failed " + "x" * 10000)
    (record,) = [json.loads(line) for line in lines(out)]
    assert "hunter2" not in record["message"] and MASK in record["message"]
    assert len(record["message"]) == 4096


def test_ordering_rules_are_kept() -> None:
    w, out = writer()
    w.progress("2000", 1, 2, 0.0)  # before disk_start: not sent
    w.disk_start("2000", "full", "", 2)
    with pytest.raises(RuntimeError):
        w.disk_start("2000", "full", "", 2)
    with pytest.raises(RuntimeError):
        w.disk_done("2016", CHANGE_ID)
    w.disk_done("2000", CHANGE_ID)
    w.progress("2000", 2, 2, 0.0)  # after disk_done: not sent
    w.done("ok")
    w.error("after done")  # nothing follows done
    assert [json.loads(line)["event"] for line in lines(out)] == ["disk_start", "disk_done", "done"]


def test_a_broken_stdout_does_not_stop_the_run() -> None:
    class Broken(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise BrokenPipeError(32, "Broken pipe")

    w = EventWriter(Broken(), now=lambda: NOW)
    w.phase("cleanup", "Removing snapshot")
    assert w.broken
    w.done("still fine")
