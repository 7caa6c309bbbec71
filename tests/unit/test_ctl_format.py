"""sna-ctl's text for people: sizes, rates, ETAs, bars, tables, the watch screen and lines."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest

from sna.ctl import format as fmt
from sna.ctl.watch import (
    ERASE_BELOW,
    HIDE_CURSOR,
    SHOW_CURSOR,
    PlainLines,
    RateMeter,
    Rates,
    Screen,
    Tracked,
    job_lines,
    plain_line,
    result_line,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NOW = datetime(2026, 11, 26, 9, 13, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * KiB, "10.0 KiB"),
        (117 * MiB, "117 MiB"),
        (int(12.34 * GiB), "12.3 GiB"),
        (MiB - 1, "1.00 MiB"),  # rounds up into the next unit, never "1024 KiB"
        (3 << 40, "3.00 TiB"),
        (None, "-"),
        (-1, "-"),
    ],
)
def test_sizes_have_three_significant_digits(count: Any, text: str) -> None:
    assert fmt.size(count) == text


@pytest.mark.parametrize(
    ("per_second", "text"),
    [(117 * MiB, "117 MiB/s"), (1.5 * KiB, "1.50 KiB/s"), (0, "0 B/s"), (None, "-")],
)
def test_rates(per_second: Any, text: str) -> None:
    assert fmt.rate(per_second) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (5.9, "0:05"), (62, "1:02"), (3599, "59:59"), (3723, "1:02:03"), (None, "-")],
)
def test_durations_read_like_restics(seconds: Any, text: str) -> None:
    assert fmt.duration(seconds) == text


@pytest.mark.parametrize(
    ("remaining", "per_second", "text"),
    [
        (1000 * MiB, 100 * MiB, "0:10"),
        (3600 * MiB, MiB, "1:00:00"),
        (0, MiB, "0:00"),
        (1000, 0, "-"),  # stalled: no ETA, not infinity
        (1000, None, "-"),
        (None, MiB, "-"),
    ],
)
def test_eta_is_what_is_left_at_the_rate(remaining: Any, per_second: Any, text: str) -> None:
    assert fmt.eta(remaining, per_second) == text


@pytest.mark.parametrize(
    ("fraction", "text"),
    [
        (0.0, "[          ]"),
        (0.05, "[>         ]"),
        (0.5, "[=====>    ]"),
        (0.99, "[=========>]"),
        (1.0, "[==========]"),
        (1.7, "[==========]"),
        (None, "[          ]"),
    ],
)
def test_bars_fill_their_width(fraction: Any, text: str) -> None:
    assert fmt.bar(fraction, 12) == text
    assert len(fmt.bar(fraction, 12)) == 12


def test_percent_is_clamped_and_one_decimal() -> None:
    assert [fmt.percent(p) for p in (48.123, 100, 120, -3, None)] == [
        "48.1%",
        "100.0%",
        "100.0%",
        "0.0%",
        "-",
    ]


def test_control_characters_never_reach_the_terminal() -> None:
    assert fmt.printable("vm\x1b[2J\r\nx\x7f") == "vm\\x1b[2J\\x0d\\x0ax\\x7f"
    assert fmt.printable("Zürich 東京") == "Zürich 東京"


def test_widths_count_wide_characters_twice() -> None:
    assert fmt.width("東京") == 4
    assert fmt.width("e\u0301") == 1  # a combining accent takes no column
    assert fmt.fit("東京都庁", 5) == "東京~"
    assert fmt.width(fmt.fit("東京都庁", 5)) <= 5
    assert fmt.fit("short", 10) == "short"


def test_a_table_aligns_columns_and_numbers_right() -> None:
    lines = fmt.table(
        ["ID", "VM", "BYTES"],
        [["a", "pgtest1", "1.00 GiB"], ["longer-id", "東京", "12 B"]],
        right=(2,),
    )
    assert lines == [
        "ID         VM          BYTES",
        "a          pgtest1  1.00 GiB",
        "longer-id  東京         12 B",
    ]


def test_a_wide_table_cuts_only_the_columns_it_may() -> None:
    rows = [["backup-" + "x" * 40 + "-1796166100", "pgtest1", "completed", "1.00 GiB"]]
    headers = ["ID", "VM", "STATUS", "BYTES"]
    full = fmt.table(headers, rows)
    assert fmt.width(full[1]) == 88
    cut = fmt.table(headers, rows, right=(3,), shrink=(0, 1), max_width=60)
    assert all(fmt.width(line) <= 60 for line in cut)
    assert cut[1].startswith("backup-xxx") and "~" in cut[1]
    # The columns it may not cut are whole.
    assert cut[1].endswith("pgtest1  completed  1.00 GiB")
    # Narrower than what may be cut: the cut columns stop at their headers' width.
    tiny = fmt.table(headers, rows, shrink=(0,), max_width=10)
    assert tiny[1].split()[0] == "b~" and tiny[0].startswith("ID  VM")


def test_a_rate_is_measured_over_the_last_seconds() -> None:
    meter = RateMeter(window=5.0)
    assert meter.rate() is None
    meter.add(0.0, 0)
    meter.add(1.0, 100 * MiB)
    assert meter.rate() == 100 * MiB
    for second in range(2, 12):
        meter.add(float(second), 100 * MiB + (second - 1) * 10 * MiB)
    # Only the last five seconds count: 10 MiB/s, not the early burst.
    assert meter.rate() == pytest.approx(10 * MiB)
    meter.add(12.0, 0)  # counted again from zero: start over
    assert meter.rate() is None


def status(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "backup-pgtest1-1764148323",
        "status": "running",
        "vm_name": "pgtest1",
        "backup_type": "incremental",
        "current_operation": "Copying disk 2001",
        "start_time": "2026-11-26T09:12:03.000Z",
        "end_time": None,
        "progress_percent": 62.5,
        "bytes_done": 5 * GiB,
        "bytes_total": 8 * GiB,
        "throughput_bps": 100.0 * MiB,
        "error": None,
        "stalled": None,
        "disks": [
            {
                "disk_key": "2000",
                "target_key": "2000",
                "status": "completed",
                "sync_type": "full",
                "bytes_done": 4 * GiB,
                "bytes_total": 4 * GiB,
            },
            {
                "disk_key": "2001",
                "target_key": "2001",
                "status": "running",
                "sync_type": "incremental",
                "bytes_done": 1 * GiB,
                "bytes_total": 4 * GiB,
            },
        ],
    }
    body.update(overrides)
    return body


RELAYS = [
    {"job_id": "backup-pgtest1-1764148323", "disk_key": "2001", "throughput_bps": 96.0 * MiB},
    {"job_id": "someone-else", "disk_key": "2001", "throughput_bps": 1.0},
]


def test_a_job_is_a_header_and_a_bar_per_disk() -> None:
    rates = Rates(total=128.0 * MiB, disks={"2000": None, "2001": 128.0 * MiB})
    lines = job_lines(status(), rates, RELAYS, 120, NOW)
    assert lines[0] == (
        "backup-pgtest1-1764148323  pgtest1  incremental  running  1:00  Copying disk 2001"
    )
    done, running, total = lines[1:]
    assert done.startswith("  disk 2000  full ") and "100.0%" in done and "[====" in done
    assert "ETA -" in done  # a finished disk has no ETA
    # 3 GiB left at 128 MiB/s: 24 s.
    assert "disk 2001  incremental" in running and "25.0%" in running
    assert "1.00 GiB/4.00 GiB" in running and "128 MiB/s" in running and "ETA 0:24" in running
    assert "hub 96.0 MiB/s" in running
    # The job as a whole: 3 GiB left at 128 MiB/s, the relays' rates summed.
    assert total.startswith("  all ") and "62.5%" in total and "ETA 0:24" in total
    assert "5.00 GiB/8.00 GiB" in total and "hub 96.0 MiB/s" in total
    # Every bar starts in the same column.
    assert len({line.index("[") for line in lines[1:]}) == 1


def test_the_bars_grow_and_shrink_with_the_terminal() -> None:
    rates = Rates(total=None, disks={})
    narrow = job_lines(status(), rates, [], 80, NOW)
    wide = job_lines(status(), rates, [], 200, NOW)
    bar_of = lambda line: line[line.index("[") : line.index("]") + 1]  # noqa: E731
    assert len(bar_of(narrow[1])) < len(bar_of(wide[1])) <= 42
    assert len(bar_of(narrow[1])) >= 12


def test_a_stall_is_shown_under_the_job() -> None:
    stalled = {"on": "hub_write", "since": "2026-11-26T09:12:50.000Z", "message": "no acks\x1b[31m"}
    lines = job_lines(status(stalled=stalled), Rates(None, {}), [], 120, NOW)
    assert lines[-1].startswith("  stalled on hub_write since ")
    assert lines[-1].endswith("no acks\\x1b[31m")


def test_result_lines_say_how_a_job_ended() -> None:
    completed = status(
        status="completed",
        end_time="2026-11-26T09:13:05.000Z",
        bytes_done=3 * GiB,
    )
    assert result_line(completed, NOW) == (
        "backup-pgtest1-1764148323: completed in 1:02, 3.00 GiB at 49.5 MiB/s"
    )
    # The daemon's own duration and average win when it gives them.
    given = {**completed, "duration_seconds": 120.0, "average_rate_bps": 25.0 * MiB}
    assert result_line(given, NOW).endswith("completed in 2:00, 3.00 GiB at 25.0 MiB/s")
    failed = status(
        status="failed",
        end_time="2026-11-26T09:12:33.000Z",
        error="backup client exited with code 3: disk 2001: NBD write failed",
    )
    assert result_line(failed, NOW) == (
        "backup-pgtest1-1764148323: failed after 0:30 (5.00 GiB copied): "
        "backup client exited with code 3: disk 2001: NBD write failed"
    )


def test_a_plain_line_has_no_escape_codes() -> None:
    line = plain_line(status(vm_name="x\x1b[2J"), Rates(128.0 * MiB, {}), RELAYS, NOW)
    assert "\x1b" not in line
    assert line == (
        "backup-pgtest1-1764148323 running 62.5% 5.00 GiB/8.00 GiB 128 MiB/s ETA 0:24 "
        "hub 96.0 MiB/s | disk 2000 full 100.0% | disk 2001 incremental 25.0%"
    )


def test_the_screen_redraws_in_place_and_restores_the_cursor() -> None:
    out = io.StringIO()
    screen = Screen(out, lambda: 20)
    screen.start()
    screen.draw(["one", "two", "x" * 50])
    first = out.getvalue()
    assert first.startswith(HIDE_CURSOR + "\r")
    # Cut to the width less one column: the terminal never wraps a line.
    assert "x" * 18 + "~\x1b[K\n" in first
    out.truncate(0)
    out.seek(0)
    screen.draw(["only"], above=["job a: completed"])
    again = out.getvalue()
    # Up the three lines drawn, the lasting line, the new block, and the rest erased.
    assert again == "\x1b[3Fjob a: completed\x1b[K\nonly\x1b[K\n" + ERASE_BELOW
    out.truncate(0)
    out.seek(0)
    screen.close(["interrupted"])
    assert out.getvalue() == "interrupted\x1b[K\n" + SHOW_CURSOR


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_one_per_change_and_at_most_one_a_second() -> None:
    out, clock = io.StringIO(), FakeClock()
    lines = PlainLines(out, clock)
    lines.job("a", "a 10%")
    lines.job("a", "a 10%")  # no change
    clock.now += 0.5
    lines.job("a", "a 20%")  # a change, but within the second
    lines.job("b", "b 5%")  # another job has its own second
    clock.now += 0.6
    lines.job("a", "a 30%")
    clock.now += 5
    lines.job("a", "a 30%")  # still no change
    lines.job("a", "a: completed", final=True)  # the end always shows
    assert out.getvalue().splitlines() == ["a 10%", "b 5%", "a 30%", "a: completed"]


def test_tracking_measures_each_disk() -> None:
    tracked = Tracked("backup-pgtest1-1764148323")
    before = status()
    tracked.update(before, 10.0)
    # Before a second sample: the client's own figure for the job, nothing per disk.
    assert tracked.rates() == Rates(100.0 * MiB, {"2000": None, "2001": None})
    after = status(bytes_done=5 * GiB + 64 * MiB)
    after["disks"][1]["bytes_done"] = 1 * GiB + 64 * MiB
    tracked.update(after, 10.5)
    rates = tracked.rates()
    assert rates.total == 128 * MiB and rates.disks["2001"] == 128 * MiB
    assert rates.disks["2000"] == 0
