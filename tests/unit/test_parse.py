"""The two readings of a backup client's output: JSON lines and the Go client's logs."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from sna.sbc import events
from sna.sbc.events import Event
from sna.sbc.parse import (
    MAX_COUNT,
    MAX_TEXT,
    ILineParser,
    JsonLineParser,
    LogrusLineParser,
    parser_for,
)

CHANGE_ID_0 = "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5440"
CHANGE_ID_1 = "52 0f 31 aa 9b 11 40 7e-8d 3c 62 19 04 5b e2 c1/1337"


def line(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False)


def parse_json(text: str) -> list[Event]:
    return JsonLineParser().parse(text)


ALL_KINDS = (
    events.Phase,
    events.DiskPlan,
    events.DiskStart,
    events.Progress,
    events.DiskDone,
    events.Error,
    events.Done,
    events.Stall,
    events.Resume,
    events.Snapshot,
)


def assert_sound(event: Event) -> None:
    """One of the records, holding nothing a log line, the store or JSON cannot take."""
    assert isinstance(event, ALL_KINDS)
    for value in attrs.asdict(event).values():
        if isinstance(value, str):
            value.encode("utf-8")  # no lone surrogates
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
        elif isinstance(value, float):
            assert math.isfinite(value) and value >= 0
        elif isinstance(value, int):
            assert not isinstance(value, bool) and 0 <= value <= MAX_COUNT
        else:
            assert value is None


def parse_all(parser: ILineParser, lines: list[str]) -> list[Event]:
    found: list[Event] = []
    for text in lines:
        found.extend(parser.parse(text))
    return found


def test_parser_for_gives_a_fresh_parser_of_the_right_kind() -> None:
    legacy = parser_for(legacy=True)
    assert isinstance(legacy, LogrusLineParser)
    assert isinstance(parser_for(legacy=False), JsonLineParser)
    assert parser_for(legacy=True) is not legacy
    for parser in (legacy, parser_for(legacy=False)):
        assert verifyObject(ILineParser, parser)


def test_legacy_parsers_do_not_share_state() -> None:
    first, second = parser_for(legacy=True), parser_for(legacy=True)
    first.parse("2025/10/10 13:39:15 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000) → h:1/e")
    assert second.parse("2025/10/10 13:44:20 📋 Stored ChangeID in database: a/1") == [
        events.DiskDone(None, change_id="a/1")
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            line(event="phase", phase="snapshot", message="Creating snapshot sbak-J"),
            events.Phase("snapshot", "Creating snapshot sbak-J"),
        ),
        (line(event="phase", phase="cleanup"), events.Phase("cleanup", "")),
        (
            line(
                event="disk_start",
                disk_key="2000",
                sync_type="full",
                sync_reason="no previous change ID",
                bytes_total=109521666048,
            ),
            events.DiskStart("2000", "full", "no previous change ID", 109521666048),
        ),
        (
            line(event="disk_start", disk_key=2001, sync_type="incremental"),
            events.DiskStart("2001", "incremental", "", None),
        ),
        (
            line(
                event="disk_start",
                disk_key="2001",
                sync_type="full",
                vmware_disk_key=16000,
                capacity_bytes=5 << 30,
            ),
            events.DiskStart("2001", "full", "", None, "16000", 5 << 30),
        ),
        (
            line(
                event="disk_plan",
                disk_key="2000",
                sync_type="incremental",
                sync_reason="changes since 52 aa/3",
                bytes_total=65536,
                vmware_disk_key="16000",
                capacity_bytes=5368709120,
                areas=1,
                base_change_id="52 aa/3",
            ),
            events.DiskPlan(
                "2000", "incremental", 65536, "changes since 52 aa/3", "16000", 5368709120
            ),
        ),
        (
            line(event="disk_plan", disk_key=2001, sync_type="full", bytes_total=0),
            events.DiskPlan("2001", "full", 0),
        ),
        (
            line(
                event="progress",
                disk_key="2000",
                bytes_done=3221225472,
                bytes_total=109521666048,
                throughput_bps=104857600.5,
            ),
            events.Progress(3221225472, 109521666048, "2000", 104857600.5),
        ),
        (
            line(event="progress", disk_key=2000, bytes_done=0, throughput_bps=7),
            events.Progress(0, None, "2000", 7.0),
        ),
        (
            line(event="progress", disk_key="2000", bytes_done=1, bytes_total=None),
            events.Progress(1, None, "2000", None),
        ),
        (
            line(
                event="disk_done",
                disk_key="2000",
                change_id=CHANGE_ID_0,
                bytes_done=109521666048,
                bytes_total=109521666048,
            ),
            events.DiskDone("2000", CHANGE_ID_0, 109521666048, 109521666048),
        ),
        (
            line(event="disk_done", disk_key=2001, change_id=CHANGE_ID_1),
            events.DiskDone("2001", CHANGE_ID_1, None, None),
        ),
        (
            line(event="error", message="NBD write failed: connection reset", disk_key="2000"),
            events.Error("NBD write failed: connection reset", "2000"),
        ),
        (line(event="error", message="vCenter login failed"), events.Error("vCenter login failed")),
        (
            line(event="error", message="x", disk_key=None),
            events.Error("x", None),
        ),
        (line(event="done", message="2 disks backed up"), events.Done("2 disks backed up")),
        (line(event="done"), events.Done("")),
    ],
)
def test_json_events(text: str, expected: Event) -> None:
    assert parse_json(text) == [expected]


def test_json_timestamps_extra_fields_and_whitespace_are_ignored() -> None:
    text = line(
        ts="2025-10-10T13:39:12+01:00",
        event="progress",
        disk_key="2000",
        bytes_done=10,
        bytes_total=20,
        future_field={"nested": [1, 2]},
    )
    assert parse_json("  " + text + " \t") == [events.Progress(10, 20, "2000")]
    # ts is ignored whatever it holds.
    assert parse_json(line(event="done", ts=12)) == [events.Done()]


def test_json_largest_count_is_accepted() -> None:
    text = line(event="progress", disk_key="2000", bytes_done=MAX_COUNT, bytes_total=MAX_COUNT)
    assert parse_json(text) == [events.Progress(MAX_COUNT, MAX_COUNT, "2000")]


def test_json_text_is_cleaned_not_refused() -> None:
    """Messages are for people: control characters and lone surrogates become U+FFFD."""
    assert parse_json('{"event":"error","message":"bad\\u0000thing\\nhere\\ud800"}') == [
        events.Error("bad\ufffdthing\ufffdhere\ufffd")
    ]
    (long,) = parse_json(line(event="done", message="x" * (MAX_TEXT * 3)))
    assert isinstance(long, events.Done)
    assert long.message == "x" * MAX_TEXT


def test_json_non_utf8_after_replacement_decoding() -> None:
    raw = b'{"event":"done","message":"caf\xe9 \xff\xfe"}'
    assert parse_json(raw.decode("utf-8", "replace")) == [events.Done("caf\ufffd \ufffd\ufffd")]
    raw_key = b'{"ev\xffent":"done"}'
    assert parse_json(raw_key.decode("utf-8", "replace")) == []


PROGRESS = {"event": "progress", "disk_key": "2000", "bytes_done": 1, "bytes_total": 2}
DISK_DONE = {"event": "disk_done", "disk_key": "2000", "change_id": CHANGE_ID_0}
DISK_START = {"event": "disk_start", "disk_key": "2000", "sync_type": "full"}
DISK_PLAN = {"event": "disk_plan", "disk_key": "2000", "sync_type": "full", "bytes_total": 9}


def changed(base: dict[str, Any], **changes: Any) -> str:
    return json.dumps({**base, **changes})


def without(base: dict[str, Any], key: str) -> str:
    return json.dumps({k: v for k, v in base.items() if k != key})


HOSTILE = [
    # not a JSON object
    "",
    "   ",
    "Creating snapshot  45%",
    "null",
    "42",
    '"event"',
    '[{"event":"done"}]',
    "{",
    '{"event":"done"',
    '{"event":"done"} trailing',
    '{"event":"done"}{"event":"done"}',
    "{'event':'done'}",
    # NUL bytes: raw in the line, raw inside a string, before and after the object
    '{"event":"done","message":"a\x00b"}',
    '\x00{"event":"done"}',
    '{"event":"done"}\x00',
    # the event itself
    '{"message":"no event"}',
    '{"event":null}',
    '{"event":5}',
    '{"event":"DONE"}',
    '{"event":"finished"}',
    '{"event":["done"]}',
    '{"event":"done","event":"done"}',
    # missing required fields
    without(PROGRESS, "disk_key"),
    without(PROGRESS, "bytes_done"),
    without(DISK_DONE, "change_id"),
    without(DISK_DONE, "disk_key"),
    without(DISK_START, "sync_type"),
    without(DISK_START, "disk_key"),
    without(DISK_PLAN, "disk_key"),
    without(DISK_PLAN, "sync_type"),
    without(DISK_PLAN, "bytes_total"),
    changed(DISK_PLAN, bytes_total=-1),
    changed(DISK_PLAN, bytes_total=1.0),
    changed(DISK_PLAN, sync_type="differential"),
    changed(DISK_PLAN, vmware_disk_key="disk 2000"),
    changed(DISK_PLAN, capacity_bytes="5 GiB"),
    changed(DISK_START, vmware_disk_key=-5),
    '{"event":"phase","message":"no phase"}',
    '{"event":"error"}',
    # wrong types
    changed(PROGRESS, bytes_done="1"),
    changed(PROGRESS, bytes_done=1.0),
    changed(PROGRESS, bytes_done=1e3),
    changed(PROGRESS, bytes_done=True),
    changed(PROGRESS, bytes_done=None),
    changed(PROGRESS, bytes_done=[1]),
    changed(PROGRESS, bytes_total=False),
    changed(PROGRESS, bytes_total="2"),
    changed(PROGRESS, throughput_bps="fast"),
    changed(PROGRESS, throughput_bps=True),
    changed(PROGRESS, disk_key=True),
    changed(PROGRESS, disk_key=None),
    changed(PROGRESS, disk_key=2000.0),
    changed(PROGRESS, disk_key={"key": 2000}),
    changed(PROGRESS, disk_key=""),
    changed(PROGRESS, disk_key="20 00"),
    changed(PROGRESS, disk_key="../2000"),
    changed(PROGRESS, disk_key="2000\u0000"),
    changed(PROGRESS, disk_key="k" * 65),
    changed(DISK_START, sync_type="differential"),
    changed(DISK_START, sync_type="FULL"),
    changed(DISK_START, sync_type=None),
    changed(DISK_START, sync_reason=5),
    changed(DISK_DONE, change_id=""),
    changed(DISK_DONE, change_id="   "),
    changed(DISK_DONE, change_id=5440),
    changed(DISK_DONE, change_id=None),
    changed(DISK_DONE, change_id="52 66/1\u0000"),
    changed(DISK_DONE, change_id="52 66/1\n"),
    changed(DISK_DONE, change_id="x" * 257),
    '{"event":"phase","phase":5}',
    '{"event":"phase","phase":"Transfer"}',
    '{"event":"phase","phase":"snap shot"}',
    '{"event":"phase","phase":"snapshot","message":5}',
    '{"event":"error","message":""}',
    '{"event":"error","message":" \\n "}',
    '{"event":"error","message":["x"]}',
    '{"event":"error","message":"x","disk_key":true}',
    '{"event":"done","message":{}}',
    # negative and huge numbers
    changed(PROGRESS, bytes_done=-1),
    changed(PROGRESS, bytes_total=-2),
    changed(PROGRESS, disk_key=-2000),
    changed(PROGRESS, throughput_bps=-0.5),
    changed(PROGRESS, bytes_done=MAX_COUNT + 1),
    changed(PROGRESS, bytes_total=10**30),
    '{"event":"progress","disk_key":"2000","bytes_done":' + "9" * 5000 + "}",
    '{"event":"progress","disk_key":"2000","bytes_done":1,"throughput_bps":1e400}',
    '{"event":"progress","disk_key":"2000","bytes_done":1,"throughput_bps":NaN}',
    '{"event":"progress","disk_key":"2000","bytes_done":1,"throughput_bps":Infinity}',
    '{"event":"progress","disk_key":"2000","bytes_done":1,"throughput_bps":-Infinity}',
    # deep nesting
    '{"event":"done","x":' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"event":"done","x":' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_json_refuses(text: str) -> None:
    assert parse_json(text) == []


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KINDS = [
    "phase",
    "disk_plan",
    "disk_start",
    "progress",
    "disk_done",
    "error",
    "done",
    "stall",
    "resume",
    "snapshot",
]
FIELDS = [
    "event",
    "phase",
    "message",
    "disk_key",
    "sync_type",
    "sync_reason",
    "bytes_total",
    "vmware_disk_key",
    "capacity_bytes",
    "bytes_done",
    "throughput_bps",
    "change_id",
    "on",
    "seconds",
    "name",
    "state",
    "ts",
]


@settings(max_examples=300)
@given(
    kind=st.sampled_from(KINDS) | st.text(max_size=12),
    fields=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values),
)
def test_json_parse_never_raises_on_event_shaped_objects(kind: str, fields: dict[str, Any]) -> None:
    text = json.dumps({**fields, "event": kind})
    found = parse_json(text)
    assert len(found) <= 1
    for event in found:
        assert_sound(event)


@settings(max_examples=300)
@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", "replace")))
def test_json_parse_never_raises_on_text(text: str) -> None:
    found = parse_json(text)
    assert len(found) <= 1
    for event in found:
        assert_sound(event)


counts = st.integers(min_value=0, max_value=MAX_COUNT)
disk_keys = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)


@given(
    key=disk_keys | st.integers(min_value=0, max_value=2**31),
    done=counts,
    total=st.none() | counts,
    rate=st.none() | st.floats(min_value=0, allow_infinity=False, allow_nan=False),
)
def test_json_valid_progress_round_trips(
    key: str | int, done: int, total: int | None, rate: float | None
) -> None:
    text = line(
        event="progress", disk_key=key, bytes_done=done, bytes_total=total, throughput_bps=rate
    )
    assert parse_json(text) == [events.Progress(done, total, str(key), rate)]


T = 'time="2025-10-10T13:39:12+01:00"'
DISK0 = 'disk="[datastore1] pgtest1/pgtest1.vmdk" vm=pgtest1'
DISK1 = 'disk="[datastore1] pgtest1/pgtest1_1.vmdk" vm=pgtest1'
JOB = "job_id=backup-pgtest1-1760099954"
BAR = "\x1b[0;32m{}\x1b[0m {:3d}% \x1b[0;36m[\x1b[0m{:<40}\x1b[0;36m]\x1b[0m ({}/100) [1s:1s]"


def bar(title: str, *percents: int) -> str:
    """What schollz/progressbar leaves on stdout: redraws separated by carriage returns."""
    return "".join("\r" + BAR.format(title, p, "=" * (p * 40 // 100), p) for p in percents)


def disk_lines(
    index: int, key: str, disk: str, size_gb: str, size: int, change_id: str
) -> list[str]:
    """One disk of a first full backup, as upstream-contracts.md 3.8 lists it."""
    return [
        f"2025/10/10 13:39:15 📡 Getting ChangeID from BACKUP API for VM pgtest1 disk {index}",
        "2025/10/10 13:39:15 ⚠️ Could not extract disk index from job ID "
        "backup-pgtest1-1760099954 or export , defaulting to 0",
        "2025/10/10 13:39:15 📋 No previous ChangeID found",
        "2025/10/10 13:39:15 📋 No ChangeID found in database - target doesn't exist,"
        " full copy needed",
        f'{T} level=info msg="Data does not exist, full copy needed"',
        "2025/10/10 13:39:15 🔥 NBD Target Connect() called - establishing NBD connection",
        f"2025/10/10 13:39:15 ✅ DIRECT MATCH: VMware disk disk-{key} (key:{key})"
        f" → 127.0.0.1:1010{index}/pgtest1-disk{index}",
        f"2025/10/10 13:39:15 ✅ NBD connection ready: 127.0.0.1:1010{index}/pgtest1-disk{index}",
        'libnbd: debug: nbd1: nbd_connect_tcp: enter: hostname="127.0.0.1" port="10100"',
        f'{T} level=info msg="🚀 Starting parallel full copy" {disk}',
        f'{T} level=info msg="📊 Total disk size: {size_gb} GB ({size} bytes)" {disk}',
        f'{T} level=info msg="🔧 Using 3 parallel workers for full copy" {disk}',
        f'{T} level=info msg="🚀 Full copy worker started" end=36507222016 size_mb=34816'
        " start=0 worker_id=0",
        f'{T} level=info msg="⏱️  Cadence evaluation" current_progress=2.94'
        " last_sent_progress=0 progress_delta=2.94 progress_threshold=10"
        " time_since_last_sec=6.1 time_threshold_sec=5",
        f'{T} level=info msg="🌐 Starting HTTP POST to SHA" bytes=3221225472 {JOB}'
        ' progress=2.94 url="http://localhost:8082/api/v1/telemetry/backup/'
        'backup-pgtest1-1760099954"',
        f'{T} level=info msg="✅ Telemetry accepted by SHA - HTTP 200 OK" {JOB}'
        " phase=transferring progress=2.94 status_code=200",
        f'{T} level=info msg="✅ Full copy worker completed successfully"'
        f" bytes_copied={size // 3} chunks_processed=1088 duration=5m1s mb_copied=34816"
        " sparse_saved_mb=20000 sparse_skipped=625 throughput_mbps=115.67 worker_id=0",
        f'{T} level=info msg="🚀 Sending job status telemetry to SHA" {JOB}'
        " phase=completed status=completed",
        f'{T} level=info msg="📊 Final progress update sent to SNA" {disk}',
        f'{T} level=info msg="✅ Parallel full copy completed successfully"'
        f' bytes_copied={size} disk="[datastore1] x.vmdk" gb_copied=102 vm=pgtest1',
        f"2025/10/10 13:44:20 📡 Storing ChangeID via BACKUP completion API for disk {index}",
        "2025/10/10 13:44:20 🔄 API URL: http://localhost:8082/api/v1/backups/"
        "backup-pgtest1-1760099954/complete",
        "2025/10/10 13:44:20 ✅ Successfully stored ChangeID in SHA database",
        f"2025/10/10 13:44:20 📋 Stored ChangeID in database: {change_id}",
    ]


FULL_BACKUP = [
    f'{T} level=info msg="✅ Change tracking (CBT) is already enabled - will use for'
    ' accurate progress"',
    f'{T} level=info msg="🔍 CBT Status Debug: ChangeTrackingEnabled = true"',
    f'{T} level=info msg="🧹 Checking for old snapshots with matching prefix" {JOB} prefix=sbak-',
    f'{T} level=info msg="Setting Disk Bus: virtio"',
    f'{T} level=info msg="Set progress tracking job ID from command line flag" {JOB}',
    f'{T} level=info msg="🎯 SNA progress tracking enabled" {JOB} vma_url="http://localhost:8081"',
    f'{T} level=info msg="🎯 Early progress tracking enabled - monitoring all migration'
    f' phases" {JOB}',
    f'{T} level=info msg="🚀 SHA telemetry tracking initialized (push-based real-time'
    f' progress)" {JOB} job_type=backup sha_url="http://localhost:8082"',
    f'{T} level=info msg="📸 Creating job-specific snapshot" {JOB} prefix=sbak-'
    " snapshot_name=sbak-backup-pgtest1-1760099954",
    bar("Creating snapshot", 0, 45, 100),
    "",
    *disk_lines(0, "2000", DISK0, "102.00", 109521666048, CHANGE_ID_0),
    *disk_lines(1, "2001", DISK1, "20.00", 21474836480, CHANGE_ID_1),
    bar("Removing snapshot", 50, 100),
    "",
    f'{T} level=info msg="Migration completed"',
]


def test_legacy_full_backup_of_two_disks() -> None:
    assert parse_all(LogrusLineParser(), FULL_BACKUP) == [
        events.Phase("snapshot", "Creating snapshot"),
        events.DiskStart("2000", "full", "no previous change ID"),
        events.Phase("transfer", "Copying disk 2000"),
        events.Progress(0, 109521666048, "2000"),
        events.Progress(109521666048, 109521666048, "2000"),
        events.DiskDone("2000", CHANGE_ID_0, 109521666048, 109521666048),
        events.DiskStart("2001", "full", "no previous change ID"),
        events.Progress(0, 21474836480, "2001"),
        events.Progress(21474836480, 21474836480, "2001"),
        events.DiskDone("2001", CHANGE_ID_1, 21474836480, 21474836480),
        events.Phase("cleanup", "Removing snapshot"),
        events.Done("Migration completed"),
    ]


INCREMENTAL_BACKUP = [
    bar("Creating snapshot", 100),
    # Disk 2000: its change ID matches; nothing changed since.
    f'{T} level=info msg="Starting incremental copy"',
    "2025/10/10 14:00:01 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000)"
    " → 127.0.0.1:10100/pgtest1-disk0",
    f'{T} level=info msg="🚀 Starting parallel incremental copy" {DISK0}',
    f'{T} level=info msg="No changed disk areas, skipping copy" {DISK0}',
    f'{T} level=info msg="📊 Sent completion update to SNA (zero changed blocks)" {DISK0}',
    f"2025/10/10 14:00:02 📋 Stored ChangeID in database: {CHANGE_ID_0}",
    # Disk 2001: the SHA handed back disk 0's change ID, so the UUIDs differ.
    f'{T} level=warning msg="Change ID mismatch, full copy needed"'
    f' currentChangeId="{CHANGE_ID_0}" snapshotChangeId="{CHANGE_ID_1}"',
    "2025/10/10 14:00:02 ✅ DIRECT MATCH: VMware disk disk-2001 (key:2001)"
    " → 127.0.0.1:10101/pgtest1-disk1",
    f'{T} level=info msg="🚀 Starting parallel full copy" {DISK1}',
    f'{T} level=info msg="📊 Total disk size: 20.00 GB (21474836480 bytes)" {DISK1}',
    f'{T} level=info msg="✅ Parallel full copy completed successfully"'
    f" bytes_copied=21474836480 {DISK1} gb_copied=20",
    f"2025/10/10 14:05:00 📋 Stored ChangeID in database: {CHANGE_ID_1}",
    bar("Removing snapshot", 100),
    f'{T} level=info msg="Migration completed"',
]


def test_legacy_incremental_backup_of_two_disks() -> None:
    assert parse_all(LogrusLineParser(), INCREMENTAL_BACKUP) == [
        events.Phase("snapshot", "Creating snapshot"),
        events.Phase("transfer", "Copying data"),
        events.DiskStart("2000", "incremental", "previous change ID matches"),
        events.Progress(0, 0, "2000"),
        events.DiskDone("2000", CHANGE_ID_0, 0, 0),
        events.DiskStart("2001", "full", "change ID mismatch"),
        events.Progress(0, 21474836480, "2001"),
        events.Progress(21474836480, 21474836480, "2001"),
        events.DiskDone("2001", CHANGE_ID_1, 21474836480, 21474836480),
        events.Phase("cleanup", "Removing snapshot"),
        events.Done("Migration completed"),
    ]


def test_legacy_incremental_with_a_delta() -> None:
    parser = LogrusLineParser()
    assert parse_all(
        parser,
        [
            "2025/10/10 14:00:01 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000) → h:1/e",
            f'{T} level=info msg="Starting incremental copy"',
            f'{T} level=info msg="📊 Total delta size: 812.00 MB (143 extents)" {DISK0}',
            f'{T} level=info msg="🔧 Using 3 parallel workers" {DISK0}',
            # The incremental copy connects to its target again.
            "2025/10/10 14:00:01 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000) → h:1/e",
            f'{T} level=info msg="✅ Parallel incremental copy completed successfully"'
            f" bytes_copied=862978048 mb_copied=823 {DISK0}",
            "2025/10/10 14:00:09 📋 Stored ChangeID in database: 52 aa/77",
        ],
    ) == [
        events.DiskStart("2000", "", ""),
        events.DiskStart("2000", "incremental", "previous change ID matches"),
        events.Phase("transfer", "Copying disk 2000"),
        events.Progress(0, 812 * 2**20, "2000"),
        events.Progress(862978048, 862978048, "2000"),
        events.DiskDone("2000", "52 aa/77", 862978048, 862978048),
    ]


def test_legacy_failure_lines() -> None:
    parser = LogrusLineParser()
    assert parse_all(
        parser,
        [
            f'{T} level=error msg="❌ HTTP Do() failed - network error" duration=3'
            f' error="dial tcp 127.0.0.1:8082: connect: connection refused" {JOB}',
            f'{T} level=error msg="Worker error" error="worker 1: target write failed:'
            ' \\"nbd_pwrite\\": Broken pipe"',
            f'{T} level=fatal msg="Failed to stop nbdkit servers" error="kill: no such process"',
            f"{T} level=panic msg=boom",
            f'{T} level=error error="only an error"',
            f"{T} level=error",
            "Error: no NBD target found for VMware disk key 2016 (disk disk-2016)",
            "Usage:",
            "  migratekit migrate [flags]",
            "panic: interface conversion: types.BaseVirtualDeviceBackingInfo is nil",
            "goroutine 1 [running]:",
        ],
    ) == [
        events.Error(
            "HTTP Do() failed - network error: dial tcp 127.0.0.1:8082: connect: connection refused"
        ),
        events.Error('Worker error: worker 1: target write failed: "nbd_pwrite": Broken pipe'),
        events.Error("Failed to stop nbdkit servers: kill: no such process"),
        events.Error("boom"),
        events.Error("only an error"),
        events.Error("level=error"),
        events.Error("no NBD target found for VMware disk key 2016 (disk disk-2016)"),
        events.Error("panic: interface conversion: types.BaseVirtualDeviceBackingInfo is nil"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        # Quoted values are read as values, not searched as text.
        f'{T} level=info msg="peer said level=error msg=\\"Migration completed\\""',
        f'{T} level=info msg="x" note="Error: not a cobra line"',
        f'{T} level=warning msg="⚠️ Chunk copy failed, retrying..." error="EOF"',
        f'{T} level=info msg="Migration completed with warnings"',
        f'{T} level=info msg="📋 Found previous ChangeID in database: 52 aa/1"',
        # Not logrus at all: an unterminated quote, a word without a value.
        f'{T} level=error msg="unterminated',
        f"{T} level=error this-is-not-logfmt",
        "time=",
        # A per-worker completion is not the disk's.
        f'{T} level=info msg="✅ Full copy worker completed successfully" bytes_copied=5',
        "2025/10/10 13:39:15 ✅ DIRECT MATCH: VMware disk disk-2000 (key:)",
        "2025/10/10 13:39:15 📋 Stored ChangeID in database: ",
        f'{T} level=info msg="📊 Total disk size: lots"',
        f'{T} level=info msg="📊 Total delta size: 1234567890123456 MB (9 extents)"',
        f'{T} level=info msg="📊 Total disk size: 1 GB (' + "9" * 30 + ' bytes)"',
        "Error:",
        "random nbdkit noise: error: failed",
    ],
)
def test_legacy_lines_that_say_nothing(text: str) -> None:
    assert LogrusLineParser().parse(text) == []


def test_legacy_logfmt_escapes() -> None:
    parser = LogrusLineParser()
    found = parser.parse(
        f'{T} level=error msg="a \\"quoted\\" \\\\ word\\tand \\u00e9 \\x41 \\101 \\q"'
    )
    assert found == [events.Error('a "quoted" \\ word\ufffdand é A A \\q')]


def test_legacy_phase_is_reported_once_per_change() -> None:
    parser = LogrusLineParser()
    assert parser.parse(bar("Creating snapshot", 1, 2, 3)) == [
        events.Phase("snapshot", "Creating snapshot")
    ]
    assert parser.parse(bar("Creating snapshot", 100)) == []
    assert parser.parse(bar("Removing snapshot", 10) + bar("Creating snapshot", 10)) == [
        events.Phase("cleanup", "Removing snapshot"),
        events.Phase("snapshot", "Creating snapshot"),
    ]


def test_legacy_decision_after_the_match_updates_the_disk() -> None:
    parser = LogrusLineParser()
    parser.parse("2025/10/10 14:00:01 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000) → h:1/e")
    parser.parse(f'{T} level=info msg="📊 Total disk size: 1.00 GB (1073741824 bytes)"')
    assert parser.parse(f'{T} level=info msg="Data does not exist, full copy needed"') == [
        events.DiskStart("2000", "full", "no previous change ID", 1073741824)
    ]


def test_legacy_nothing_is_attributed_to_a_finished_disk() -> None:
    parser = LogrusLineParser()
    parse_all(
        parser,
        [
            "2025/10/10 14:00:01 ✅ DIRECT MATCH: VMware disk disk-2000 (key:2000) → h:1/e",
            f'{T} level=info msg="No changed disk areas, skipping copy"',
            "2025/10/10 14:00:02 📋 Stored ChangeID in database: 52 aa/3",
        ],
    )
    assert parser.parse(f'{T} level=info msg="📊 Total disk size: 1.00 GB (1073741824 bytes)"') == [
        events.Progress(0, 1073741824, None)
    ]


def test_legacy_single_disk_mode_has_no_disk_key() -> None:
    """Without --nbd-targets the Go client never names the disk."""
    parser = LogrusLineParser()
    assert parse_all(
        parser,
        [
            f'{T} level=info msg="Data does not exist, full copy needed"',
            f'{T} level=info msg="📊 Total disk size: 2.00 GB (2147483648 bytes)"',
            f'{T} level=info msg="✅ Parallel full copy completed successfully"',
            "2025/10/10 13:44:20 📋 Stored ChangeID in database: 52 aa/2",
        ],
    ) == [
        events.Progress(0, 2147483648, None),
        events.Progress(2147483648, 2147483648, None),
        events.DiskDone(None, "52 aa/2", 2147483648, 2147483648),
    ]


FRAGMENTS = [
    'time="2025-10-10T13:39:12+01:00" ',
    "level=",
    "error",
    "info",
    "fatal",
    " msg=",
    '"',
    '\\"',
    "\\",
    "\\u",
    "\\U0011ffff",
    "\\x",
    "=",
    " ",
    "\r",
    "\x1b[",
    "\x1b[0;32m",
    "2025/10/10 13:39:15 ",
    "DIRECT MATCH: VMware disk disk-2000 (key:",
    "2000",
    "9" * 25,
    ")",
    "Stored ChangeID in database:",
    "Total delta size: ",
    "Total disk size: ",
    " MB",
    " GB (",
    " bytes)",
    ".",
    "bytes_copied=",
    "Parallel full copy completed successfully",
    "No changed disk areas, skipping copy",
    "Data does not exist, full copy needed",
    "Starting incremental copy",
    "Creating snapshot",
    "Removing snapshot",
    "Migration completed",
    "Error: ",
    "panic: ",
    "\x00",
    "\ud800",
    "\ufffd",
    "📋 ",
]
logrus_like = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=30).map("".join)


@settings(max_examples=500)
@given(st.lists(logrus_like | st.text(), max_size=20))
def test_legacy_parse_never_raises(lines: list[str]) -> None:
    parser = LogrusLineParser()
    for text in lines:
        for event in parser.parse(text):
            assert_sound(event)
