"""``sna-ctl watch``: live progress of backups, drawn in place or written as lines.

A :class:`Watcher` polls ``/api/v1/status/{id}`` (one job) or
``/api/v1/jobs?status=running`` (every running job, and each new one), and
``/api/v1/relays`` for the bytes going to the hub, once per interval.  Rates
are measured here, from how each disk's ``bytes_done`` moved over the last
seconds (:class:`RateMeter`); the ETA is what is left at that rate.

Three outputs:

- a terminal (:class:`Screen`): per job a header line and one bar per disk
  (percent, bytes, rate, ETA, full or incremental, the relay's rate to the
  hub), redrawn in place with ANSI cursor movement, fitted to the terminal's
  width again when it changes (SIGWINCH); the cursor is hidden while it runs
  and shown again however it ends;
- anything else (:class:`PlainLines`): one line per job per change, at most
  one a second per job, no escape codes;
- ``--json``: the job's ``/status`` answer, one JSON object a line, as often.

An ended job leaves one result line (``completed in ...``, or its error).
The rendering functions are pure and take the terminal's width.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Optional, TextIO

import attrs

from sna.ctl import format as fmt
from sna.ctl.client import ApiFailure, Client, Unreachable, quote

#: The statuses a job ends in.
FINAL = frozenset({"completed", "failed", "cancelled", "interrupted"})
#: Seconds of samples a rate is measured over.
RATE_WINDOW = 5.0
#: Seconds the daemon may stay unreachable before watch gives up.
UNREACHABLE_GRACE = 30.0
#: At most one plain (or JSON) line per job this often, in seconds.
PLAIN_EVERY = 1.0

HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
ERASE_LINE = "\x1b[K"
ERASE_BELOW = "\x1b[J"


def up(lines: int) -> str:
    """Move the cursor to the first column, ``lines`` lines up."""
    return f"\x1b[{lines}F" if lines > 0 else "\r"


# -- rates ------------------------------------------------------------------------


@attrs.define
class RateMeter:
    """Bytes per second over the last :data:`RATE_WINDOW` seconds of samples."""

    window: float = RATE_WINDOW
    samples: deque[tuple[float, float]] = attrs.Factory(deque)

    def add(self, when: float, value: float) -> None:
        if self.samples and value < self.samples[-1][1]:
            # Counted again from zero (a new job of the same id): start over.
            self.samples.clear()
        self.samples.append((when, value))
        while len(self.samples) > 2 and when - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> Optional[float]:
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return (v1 - v0) / (t1 - t0)


@attrs.define
class Tracked:
    """One job as watch follows it: its last status and the meters of its bytes."""

    job_id: str
    status: dict[str, Any] = attrs.Factory(dict)
    total: RateMeter = attrs.Factory(RateMeter)
    disks: dict[str, RateMeter] = attrs.Factory(dict)

    def update(self, status: dict[str, Any], when: float) -> None:
        self.status = status
        self.total.add(when, float(status.get("bytes_done") or 0))
        for disk in status.get("disks") or []:
            key = disk_id(disk)
            self.disks.setdefault(key, RateMeter()).add(when, float(disk.get("bytes_done") or 0))

    def rates(self) -> Rates:
        measured = self.total.rate()
        if measured is None and self.status.get("status") == "running":
            # Before two samples: the client's own last figure.
            reported = self.status.get("throughput_bps")
            measured = float(reported) if isinstance(reported, (int, float)) else None
        return Rates(measured, {key: meter.rate() for key, meter in self.disks.items()})


@attrs.frozen
class Rates:
    total: Optional[float]
    disks: Mapping[str, Optional[float]]


def disk_id(disk: Mapping[str, Any]) -> str:
    """A disk of ``/status`` by its target key (what relays name it by)."""
    return str(disk.get("target_key") or disk.get("disk_key") or "?")


# -- what a job looks like -----------------------------------------------------------


def elapsed(status: Mapping[str, Any], now: datetime) -> Optional[float]:
    """Seconds the job has run (or ran): the daemon's ``duration_seconds`` when it says."""
    given = status.get("duration_seconds")
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        return float(given)
    start = fmt.parse_time(status.get("start_time"))
    if start is None:
        return None
    end = fmt.parse_time(status.get("end_time")) or now
    return max((end - start).total_seconds(), 0.0)


def average_rate(status: Mapping[str, Any], now: datetime) -> Optional[float]:
    """The job's bytes over its time: the daemon's ``average_rate_bps`` when it says."""
    given = status.get("average_rate_bps")
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        return float(given)
    seconds = elapsed(status, now)
    done = status.get("bytes_done")
    if not seconds or not isinstance(done, int):
        return None
    return done / seconds


def _fraction(done: Any, total: Any) -> Optional[float]:
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        return min(done / total, 1.0)
    return None


def _relay_rates(relays: Sequence[Mapping[str, Any]], job_id: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for relay in relays:
        if relay.get("job_id") == job_id:
            key = str(relay.get("disk_key"))
            rates[key] = rates.get(key, 0.0) + float(relay.get("throughput_bps") or 0.0)
    return rates


def job_lines(
    status: Mapping[str, Any],
    rates: Rates,
    relays: Sequence[Mapping[str, Any]],
    columns: int,
    now: datetime,
) -> list[str]:
    """A job as a header and one progress bar per disk (and one for all, with several)."""
    job_id = fmt.printable(status.get("job_id", "?"))
    header = "  ".join(
        fmt.printable(part)
        for part in (
            job_id,
            status.get("vm_name") or "",
            status.get("backup_type") or "",
            status.get("status") or "",
            fmt.duration(elapsed(status, now)),
            status.get("current_operation") or "",
        )
        if part
    )
    hub = _relay_rates(relays, str(status.get("job_id")))
    rows: list[tuple[list[str], Optional[float]]] = []
    completed = status.get("status") == "completed"
    for disk in status.get("disks") or []:
        key = disk_id(disk)
        done, total = disk.get("bytes_done"), disk.get("bytes_total")
        fraction = 1.0 if disk.get("status") == "completed" or completed else _fraction(done, total)
        rate = rates.disks.get(key) if disk.get("status") == "running" else None
        remaining = total - done if isinstance(total, int) and isinstance(done, int) else None
        rows.append(
            (
                [
                    f"disk {fmt.printable(disk.get('disk_key') or key)}",
                    fmt.printable(disk.get("sync_type") or "-"),
                    fmt.percent(None if fraction is None else 100 * fraction),
                    f"{fmt.size(done)}/{fmt.size(total)}",
                    fmt.rate(rate),
                    f"ETA {fmt.eta(remaining, rate) if disk.get('status') == 'running' else '-'}",
                    f"hub {fmt.rate(hub.get(key))}" if key in hub else "",
                ],
                fraction,
            )
        )
    if len(rows) > 1 or not rows:
        done, total = status.get("bytes_done"), status.get("bytes_total")
        percent = status.get("progress_percent")
        fraction = (
            float(percent) / 100 if isinstance(percent, (int, float)) else _fraction(done, total)
        )
        remaining = total - done if isinstance(total, int) and isinstance(done, int) else None
        running = status.get("status") == "running"
        rows.append(
            (
                [
                    "all",
                    "",
                    fmt.percent(None if fraction is None else 100 * fraction),
                    f"{fmt.size(done)}/{fmt.size(total)}",
                    fmt.rate(rates.total if running else None),
                    f"ETA {fmt.eta(remaining, rates.total) if running else '-'}",
                    f"hub {fmt.rate(sum(hub.values()))}" if hub else "",
                ],
                fraction,
            )
        )
    widths = [max(fmt.width(cells[i]) for cells, _ in rows) for i in range(7)]
    fixed = 2 + sum(widths) + 2 * 7
    bar_width = min(max(columns - 1 - fixed, 12), 42)
    lines = [header]
    for cells, fraction in rows:
        parts = [
            fmt.pad(cells[0], widths[0]),
            fmt.pad(cells[1], widths[1]),
            fmt.bar(fraction, bar_width),
            fmt.pad(cells[2], widths[2], right=True),
            fmt.pad(cells[3], widths[3], right=True),
            fmt.pad(cells[4], widths[4], right=True),
            fmt.pad(cells[5], widths[5]),
            cells[6],
        ]
        lines.append(("  " + "  ".join(parts)).rstrip())
    stalled = status.get("stalled")
    if isinstance(stalled, Mapping):
        since = fmt.local_time(stalled.get("since"))
        message = fmt.printable(stalled.get("message") or "")
        lines.append(f"  stalled on {fmt.printable(stalled.get('on'))} since {since}: {message}")
    return lines


def result_line(status: Mapping[str, Any], now: datetime) -> str:
    """How a job ended, in one line: ``{id}: completed in 1:02, 3.50 GiB at 57.4 MiB/s``."""
    job_id = fmt.printable(status.get("job_id", "?"))
    state = fmt.printable(status.get("status", "?"))
    seconds = fmt.duration(elapsed(status, now))
    done = fmt.size(status.get("bytes_done"))
    if state == "completed":
        return f"{job_id}: completed in {seconds}, {done} at {fmt.rate(average_rate(status, now))}"
    error = status.get("error")
    reason = f": {fmt.printable(error)}" if error else ""
    return f"{job_id}: {state} after {seconds} ({done} copied){reason}"


def plain_line(
    status: Mapping[str, Any], rates: Rates, relays: Sequence[Mapping[str, Any]], now: datetime
) -> str:
    """A running job in one line without escapes (watch with stdout not a terminal)."""
    job_id = fmt.printable(status.get("job_id", "?"))
    done, total = status.get("bytes_done"), status.get("bytes_total")
    remaining = total - done if isinstance(total, int) and isinstance(done, int) else None
    parts = [
        job_id,
        fmt.printable(status.get("status", "?")),
        fmt.percent(status.get("progress_percent")),
        f"{fmt.size(done)}/{fmt.size(total)}",
        fmt.rate(rates.total),
        f"ETA {fmt.eta(remaining, rates.total)}",
    ]
    hub = _relay_rates(relays, str(status.get("job_id")))
    if hub:
        parts.append(f"hub {fmt.rate(sum(hub.values()))}")
    for disk in status.get("disks") or []:
        fraction = (
            1.0
            if disk.get("status") == "completed"
            else _fraction(disk.get("bytes_done"), disk.get("bytes_total"))
        )
        parts.append(
            f"| disk {fmt.printable(disk.get('disk_key') or disk_id(disk))} "
            f"{fmt.printable(disk.get('sync_type') or '-')} "
            f"{fmt.percent(None if fraction is None else 100 * fraction)}"
        )
    stalled = status.get("stalled")
    if isinstance(stalled, Mapping):
        parts.append(f"| stalled on {fmt.printable(stalled.get('on'))}")
    return " ".join(parts)


# -- outputs -------------------------------------------------------------------------


class Screen:
    """A block of lines redrawn in place on a terminal, with lines above it that stay."""

    def __init__(self, out: TextIO, columns: Callable[[], int]) -> None:
        self._out = out
        self.columns = columns
        self._height = 0
        self._started = False

    def start(self) -> None:
        self._out.write(HIDE_CURSOR)
        self._started = True

    def draw(self, block: Sequence[str], above: Sequence[str] = ()) -> None:
        """Replace the block with ``block``; ``above`` is written once, above it, for good."""
        width = max(self.columns() - 1, 1)
        parts = [up(self._height)]
        for line in [*above, *block]:
            parts.append(fmt.fit(line, width) + ERASE_LINE + "\n")
        parts.append(ERASE_BELOW)
        self._out.write("".join(parts))
        self._out.flush()
        self._height = len(block)

    def close(self, final: Sequence[str] = ()) -> None:
        """Leave ``final`` below what is drawn and show the cursor again."""
        if final:
            width = max(self.columns() - 1, 1)
            self._out.write("".join(fmt.fit(line, width) + ERASE_LINE + "\n" for line in final))
        self._height = 0
        if self._started:
            self._out.write(SHOW_CURSOR)
        self._out.flush()


class PlainLines:
    """One line per job per change, at most one per :data:`PLAIN_EVERY` seconds per job."""

    def __init__(self, out: TextIO, clock: Callable[[], float]) -> None:
        self._out = out
        self._clock = clock
        self._last: dict[str, tuple[str, float]] = {}

    def job(self, job_id: str, text: str, final: bool = False) -> None:
        now = self._clock()
        last = self._last.get(job_id)
        if last is not None and not final:
            if last[0] == text or now - last[1] < PLAIN_EVERY:
                return
        self._last[job_id] = (text, now)
        if final:
            self._last.pop(job_id, None)
        self._out.write(text + "\n")
        self._out.flush()

    def note(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()


# -- waiting, resizes and Ctrl-C -------------------------------------------------------


class Stop(Exception):
    """SIGTERM: end as Ctrl-C does, cursor restored."""


class Waker:
    """Sleeps until the next poll, or until the terminal is resized (SIGWINCH)."""

    def __init__(self) -> None:
        self.resized = False
        self._read: Optional[int] = None
        self._write: Optional[int] = None
        self._saved: list[tuple[int, Any]] = []
        self._saved_fd: Optional[int] = None

    def __enter__(self) -> Waker:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._saved_fd = signal.set_wakeup_fd(self._write)
        self._saved.append((signal.SIGWINCH, signal.signal(signal.SIGWINCH, self._winch)))
        self._saved.append((signal.SIGTERM, signal.signal(signal.SIGTERM, self._term)))
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in reversed(self._saved):
            signal.signal(number, handler)
        self._saved.clear()
        signal.set_wakeup_fd(self._saved_fd if self._saved_fd is not None else -1)
        for fd in (self._read, self._write):
            if fd is not None:
                os.close(fd)
        self._read = self._write = None

    def _winch(self, number: int, frame: object) -> None:
        self.resized = True

    def _term(self, number: int, frame: object) -> None:
        raise Stop()

    def wait(self, seconds: float) -> None:
        """Return after ``seconds``, or at once after a resize."""
        if self.resized or self._read is None:
            return
        ready, _, _ = select.select([self._read], [], [], max(seconds, 0.0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 512):
                    pass


class Sleeper:
    """What :class:`Waker` is without a terminal: a plain sleep (SIGTERM still ends cleanly)."""

    resized = False

    def __enter__(self) -> Sleeper:
        self._saved = signal.signal(signal.SIGTERM, self._term)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._saved)

    def _term(self, number: int, frame: object) -> None:
        raise Stop()

    def wait(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.0))


# -- the loop ---------------------------------------------------------------------------

#: Exit statuses of watch (besides the CLI's own): the job ended other than completed,
#: and Ctrl-C (or SIGTERM) before it ended.
EXIT_NOT_COMPLETED = 4
EXIT_INTERRUPTED = 130


def terminal_columns(out: TextIO) -> Callable[[], int]:
    def columns() -> int:
        try:
            return os.get_terminal_size(out.fileno()).columns or 80
        except (OSError, ValueError):
            return 80

    return columns


class Watcher:
    """Follows one job (``job_id``) to its end, or every running job until stopped.

    ``mode`` is ``tty``, ``plain`` or ``json``.
    """

    def __init__(
        self,
        client: Client,
        out: TextIO,
        job_id: Optional[str],
        mode: str,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._out = out
        self._job_id = job_id
        self._mode = mode
        self._interval = interval
        self._clock = clock
        self._now = now
        self._tracked: dict[str, Tracked] = {}
        self._relays: list[dict[str, Any]] = []
        self._problem: Optional[str] = None
        self._unreachable_since: Optional[float] = None
        self.screen: Optional[Screen] = None
        self.lines: Optional[PlainLines] = None
        if mode == "tty":
            self.screen = Screen(out, terminal_columns(out))
        else:
            self.lines = PlainLines(out, clock)

    def run(self) -> int:
        pacer: Waker | Sleeper = Waker() if self.screen is not None else Sleeper()
        final: list[str] = []
        code = EXIT_INTERRUPTED
        try:
            with pacer:
                if self.screen is not None:
                    self.screen.start()
                while True:
                    started = self._clock()
                    ended = self._poll()
                    if ended is not None:
                        code, final = ended
                        return code
                    self._show()
                    while True:
                        left = self._interval - (self._clock() - started)
                        if pacer.resized:
                            pacer.resized = False
                            self._show()
                        if left <= 0:
                            break
                        pacer.wait(left)
        except (KeyboardInterrupt, Stop):
            final = ["interrupted"] if self.screen is not None else []
            return EXIT_INTERRUPTED
        finally:
            if self.screen is not None:
                self.screen.close(final)

    # -- polling --

    def _poll(self) -> Optional[tuple[int, list[str]]]:
        """One round of requests; the exit status and last lines once the watched job ended."""
        try:
            if self._job_id is not None:
                statuses = [self._client.get(f"/api/v1/status/{quote(self._job_id)}")]
            else:
                answer = self._client.get(
                    "/api/v1/jobs", query={"status": "running", "limit": 1000}
                )
                statuses = [j for j in answer.get("jobs") or [] if j.get("status") == "running"]
            try:
                relays = self._client.get("/api/v1/relays").get("relays") or []
            except ApiFailure:
                relays = []
        except Unreachable as e:
            now = self._clock()
            if self._unreachable_since is None:
                self._unreachable_since = now
            if now - self._unreachable_since > UNREACHABLE_GRACE:
                raise
            self._problem = f"{e}; trying again"
            return None
        self._unreachable_since = None
        self._problem = None
        self._relays = relays
        when = self._clock()
        seen = set()
        for status in statuses:
            job_id = str(status.get("job_id"))
            seen.add(job_id)
            self._tracked.setdefault(job_id, Tracked(job_id)).update(status, when)
        if self._job_id is not None:
            status = statuses[0]
            if status.get("status") in FINAL:
                return self._finish(status)
            return None
        for job_id in sorted(set(self._tracked) - seen):
            self._ended(job_id)
        return None

    def _finish(self, status: dict[str, Any]) -> tuple[int, list[str]]:
        now = self._now()
        result = result_line(status, now)
        code = 0 if status.get("status") == "completed" else EXIT_NOT_COMPLETED
        if self.screen is not None:
            tracked = self._tracked[str(status.get("job_id"))]
            block = job_lines(status, tracked.rates(), [], self.screen.columns(), now)
            self.screen.draw(block)
            return code, [result]
        assert self.lines is not None
        job_id = str(status.get("job_id"))
        if self._mode == "json":
            self.lines.job(job_id, json.dumps(status), final=True)
        else:
            self.lines.job(job_id, result, final=True)
        return code, []

    def _ended(self, job_id: str) -> None:
        """A job left the running list: say how it ended, once."""
        tracked = self._tracked.pop(job_id)
        try:
            status = self._client.get(f"/api/v1/status/{quote(job_id)}")
        except ApiFailure:
            status = {**tracked.status, "status": "gone"}
        now = self._now()
        if self.screen is not None:
            self.screen.draw(self._blocks(now), above=[result_line(status, now)])
        elif self.lines is not None:
            text = json.dumps(status) if self._mode == "json" else result_line(status, now)
            self.lines.job(job_id, text, final=True)

    # -- drawing --

    def _ordered(self) -> list[Tracked]:
        return sorted(
            self._tracked.values(), key=lambda t: (str(t.status.get("start_time")), t.job_id)
        )

    def _blocks(self, now: datetime) -> list[str]:
        assert self.screen is not None
        columns = self.screen.columns()
        block: list[str] = []
        for tracked in self._ordered():
            block.extend(job_lines(tracked.status, tracked.rates(), self._relays, columns, now))
        if not block:
            block.append("no backup is running; waiting for one (Ctrl-C to stop)")
        if self._problem is not None:
            block.append(fmt.printable(self._problem))
        return block

    def _show(self) -> None:
        now = self._now()
        if self.screen is not None:
            self.screen.draw(self._blocks(now))
            return
        assert self.lines is not None
        if self._problem is not None:
            self.lines.job("", fmt.printable(self._problem))
        if not self._tracked and self._job_id is None:
            self.lines.job("", "no backup is running; waiting for one")
        for tracked in self._ordered():
            if self._mode == "json":
                text = json.dumps(tracked.status)
            else:
                text = plain_line(tracked.status, tracked.rates(), self._relays, now)
            self.lines.job(tracked.job_id, text)
