"""Child processes of a testbed, and stopping them by pid without hitting a stranger.

A process is remembered as ``(pid, start time)``: the start time (field 22 of
``/proc/PID/stat``) tells a live testbed process from an unrelated one that
got the same pid after ours died, so ``down`` never signals the wrong process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

_PR_SET_PDEATHSIG = 1
STOP_GRACE = 5.0


@dataclass(frozen=True)
class ProcessRecord:
    """What the state file keeps of one process the testbed started."""

    role: str
    pid: int
    start_time: int
    argv0: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            role=str(data["role"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            argv0=str(data["argv0"]),
        )


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at
    # the last ')'.
    return raw.rsplit(b")", 1)[-1].decode().split()


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks after boot, or None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs (a zombie does not)."""
    fields = _stat_fields(record.pid)
    if fields is None or fields[0] == "Z":
        return False
    return int(fields[19]) == record.start_time


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel TERM the child when its parent dies.

    So a testbed whose owner is killed outright (SIGKILL, an OOM kill) leaves
    no simulator or qemu-nbd behind.  The kernel ties this to the *thread* that
    forked, so start testbeds from a thread that lives as long as they do.
    """

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)

    return preexec


def spawn(
    role: str,
    argv: Sequence[str],
    log: Path,
    *,
    die_with_parent: bool = True,
    cwd: Optional[Path] = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in its own session, stdout and stderr into ``log``.

    Its own session: a Ctrl-C at the terminal reaches only the owner, which
    then stops its children in order.
    """
    with open(log, "ab") as out:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )
    started = start_time(process.pid)
    record = ProcessRecord(role, process.pid, started if started is not None else -1, argv[0])
    return process, record


def stop(
    record: ProcessRecord,
    process: Optional[subprocess.Popen[bytes]] = None,
    grace: float = STOP_GRACE,
) -> bool:
    """TERM the process, KILL it if it outlives ``grace``; True if it was running.

    With ``process`` (our own child) it is also reaped; otherwise this waits
    until ``/proc`` shows it gone or a zombie of some other parent.
    """
    if process is not None and process.poll() is not None:
        return False
    if not is_running(record):
        if process is not None:
            _reap(process)
        return False
    try:
        # A paused process (Testbed.pause) would not act on TERM before it goes on.
        os.kill(record.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(record.pid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(record, process, wait):
            break
    if process is not None:
        _reap(process)
    return True


def _wait_gone(
    record: ProcessRecord, process: Optional[subprocess.Popen[bytes]], timeout: float
) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process is not None:
            if process.poll() is not None:
                return True
        elif not is_running(record):
            return True
        time.sleep(0.02)
    return False


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:  # pragma: no cover - after SIGKILL
        pass


class Paused:
    """A process held with SIGSTOP: a peer that does not answer (it still accepts
    connections, the kernel does that), until :meth:`resume` or the end of a ``with``."""

    def __init__(self, record: ProcessRecord) -> None:
        if not is_running(record):
            raise ProcessLookupError(f"{record.role} (pid {record.pid}) is not running")
        self.record = record
        self.resumed = False
        os.kill(record.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if not self.resumed and is_running(self.record):
            os.kill(self.record.pid, signal.SIGCONT)
        self.resumed = True

    def __enter__(self) -> Paused:
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume()


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
