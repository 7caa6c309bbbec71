"""Running a SHA double from tests and ``make demo``: :class:`ShaDouble` (standard library only).

    with ShaDouble(tmp_path / "sha").start() as sha:
        started = sha.backup("pgtest1", "full", sna_url, vcenter)
        sha.wait(lambda s: sha.job(s, started["backup_id"])["status"] == "completed",
                 "the job to complete")

The process is ``python -m tests.shadouble`` from the repository root with
this checkout's venv interpreter.  It dies with the thread that started it
(``PR_SET_PDEATHSIG``, via tests/testbed/procs.py), so start it from a
thread that lives as long as it should (pytest's main thread does); its
qemu-nbd processes die with it.  ``close()`` (the context manager's exit,
the fixture's finalizer) stops it by pid and never raises.

Everything a test needs is over HTTP: :meth:`state` (the rows), :meth:`requests`
(what the node sent and what it got), :meth:`backup` and :meth:`jobs` (what
the SHA would start), :meth:`request` for the SHA routes themselves.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, TypeVar

from tests.testbed import procs

REPO = Path(__file__).resolve().parents[2]
#: The tests' own qemu-nbd range for the double (others use 10100-10200 and 10600-10699).
TEST_PORTS = range(10700, 10800)
START_DEADLINE = 20.0
STOP_DEADLINE = 15.0
WAIT_DEADLINE = 20.0
HTTP_TIMEOUT = 150.0

T = TypeVar("T")


class ShaDoubleError(AssertionError):
    """The double did not start, answer, or reach what a test waited for."""


@dataclass(frozen=True)
class Reply:
    """One HTTP answer of the double."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.text[:500]}>"


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _answered(value: Any) -> bool:
    """Something other than None, False or an empty collection (a 0 counts)."""
    if value is None or value is False:
        return False
    return not (isinstance(value, (list, tuple, dict, set, str, bytes)) and not value)


@dataclass
class ShaDouble:
    """One double process on a directory of its own, restartable on the same state.

    ``root`` holds ``state.json`` (the rows and the request log), ``hub/``
    (the qcow2 files), ``state.json.logs/`` (qemu-nbd output), ``port`` and
    ``double-N.log`` (the process's output, one per start).
    """

    root: Path
    ports: range = TEST_PORTS
    python: str = field(default_factory=_python)
    port: int = 0
    process: Optional[subprocess.Popen[bytes]] = None
    record: Optional[procs.ProcessRecord] = None
    runs: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def workdir(self) -> Path:
        return self.root / "hub"

    @property
    def port_file(self) -> Path:
        return self.root / "port"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, what sna takes as ``--sha-url``."""
        assert self.port, "the double has not been started"
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything every run of the process wrote."""
        return "".join(
            p.read_text("utf-8", "replace") for p in sorted(self.root.glob("double-*.log"))
        )

    # -- the process -------------------------------------------------------------------------

    def start(self) -> ShaDouble:
        """Start the process (on the last port if it ran before) and wait until it listens."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.port_file.unlink(missing_ok=True)
        self.runs += 1
        argv = [
            self.python,
            "-m",
            "tests.shadouble",
            "--listen-port",
            str(self.port),
            "--any-port",
            "--state",
            str(self.state_path),
            "--workdir",
            str(self.workdir),
            "--ports",
            f"{self.ports.start}-{self.ports.stop - 1}",
            "--port-file",
            str(self.port_file),
        ]
        log = self.root / f"double-{self.runs}.log"
        self.process, self.record = procs.spawn("sha-double", argv, log, cwd=REPO)
        end = time.monotonic() + START_DEADLINE
        while True:
            if self.process.poll() is not None:
                raise ShaDoubleError(
                    f"the SHA double exited with {self.process.returncode}:\n{procs.log_tail(log)}"
                )
            try:
                self.port = int(self.port_file.read_text())
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > end:
                self.close()
                raise ShaDoubleError(f"the SHA double did not listen:\n{procs.log_tail(log)}")
            time.sleep(0.02)
        return self

    def stop(self) -> Optional[int]:
        """SIGTERM and wait (it stops its qemu-nbd first); its exit code, None if not running."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.terminate()
        try:
            return process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise ShaDoubleError("the SHA double ignored SIGTERM") from None

    def restart(self) -> ShaDouble:
        """Stop and start again on the same state file, and the same port if it is free."""
        self.stop()
        return self.start()

    def down(self) -> None:
        """The SHA is down: connections are refused; its qemu-nbd processes keep serving."""
        self._signal(signal.SIGUSR1)
        self.wait_for(lambda: not self._answers(), "the double to stop listening", 10.0)

    def up(self) -> None:
        """Listen again on the same port after :meth:`down`."""
        self._signal(signal.SIGUSR2)
        self.wait_for(self._answers, "the double to listen again", 15.0)

    def _signal(self, sig: int) -> None:
        assert self.process is not None and self.process.poll() is None, "not running"
        os.kill(self.process.pid, sig)

    def _answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.connect()
            conn.close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        """For finalizers: stop the process by pid (TERM, then KILL); never raises."""
        try:
            self.stop()
        except Exception:  # a finalizer must not hide the failure of the test
            pass
        if self.record is not None and self.process is not None:
            procs.stop(self.record, self.process, 2.0)

    def __enter__(self) -> ShaDouble:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    # -- HTTP --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> Reply:
        """One request; ``path`` goes on the wire as given (percent-encode it yourself)."""
        data = raw
        sent = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=sent)
            answer = conn.getresponse()
            return Reply(answer.status, dict(answer.headers), answer.read())
        finally:
            conn.close()

    def _control(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        reply = self.request(method, path, body)
        if reply.status != expect:
            raise ShaDoubleError(f"{method} {path}: expected {expect}, got {reply!r}")
        return reply.json()

    def state(self) -> dict[str, Any]:
        """``GET /_double/state``: every table, chains, allocations, branch runs, problems, qemu-nbd."""
        state: dict[str, Any] = self._control("GET", "/_double/state")
        return state

    def requests(self, path_prefix: Optional[str] = None, since: int = 0) -> list[dict[str, Any]]:
        """The request log (entries after ``since``), optionally only decoded paths starting so."""
        query = urllib.parse.urlencode(
            {"since": since, **({"path_prefix": path_prefix} if path_prefix else {})}
        )
        entries: list[dict[str, Any]] = self._control("GET", f"/_double/requests?{query}")[
            "requests"
        ]
        return entries

    def backup(
        self,
        vm_name: str,
        backup_type: str,
        sna_url: str,
        vcenter: Mapping[str, str],
        *,
        vm_path: Optional[str] = None,
        disks: Optional[Iterable[Mapping[str, Any]]] = None,
        sna_extra: Optional[Mapping[str, Any]] = None,
        expect: int = 200,
    ) -> dict[str, Any]:
        """``POST /_double/backups``: start a backup the SHA's way; its answer (``expect``-ed)."""
        body: dict[str, Any] = {
            "vm_name": vm_name,
            "backup_type": backup_type,
            "sna_url": sna_url,
            "vcenter": dict(vcenter),
        }
        if vm_path is not None:
            body["vm_path"] = vm_path
        if disks is not None:
            body["disks"] = [dict(d) for d in disks]
        if sna_extra is not None:
            body["sna_extra"] = dict(sna_extra)
        answer: dict[str, Any] = self._control("POST", "/_double/backups", body, expect)
        return answer

    def jobs(
        self,
        job_id: str,
        vm_name: str,
        disks: Iterable[Mapping[str, int]] = ({"disk_index": 0, "size_gb": 1},),
        backup_type: str = "full",
        expect: int = 200,
    ) -> dict[str, Any]:
        """``POST /_double/jobs``: a running parent and pending disk rows, nothing else."""
        body = {
            "job_id": job_id,
            "vm_name": vm_name,
            "backup_type": backup_type,
            "disks": [dict(d) for d in disks],
        }
        answer: dict[str, Any] = self._control("POST", "/_double/jobs", body, expect)
        return answer

    def advance_clock(self, seconds: float = 1.0) -> int:
        """Move the double's clock forward (``POST /_double/clock``); its new time in seconds."""
        answer = self._control("POST", "/_double/clock", {"advance": seconds})
        return int(answer["now"])

    # -- reading the state -------------------------------------------------------------------

    @staticmethod
    def job(state: Mapping[str, Any], job_id: str) -> dict[str, Any]:
        """The ``backup_jobs`` row ``job_id`` of a :meth:`state`."""
        for row in state["backup_jobs"]:
            if row["id"] == job_id:
                return dict(row)
        raise ShaDoubleError(f"no backup_jobs row {job_id!r}")

    @staticmethod
    def disks(state: Mapping[str, Any], job_id: str) -> dict[int, dict[str, Any]]:
        """The ``backup_disks`` rows of parent ``job_id`` by disk index."""
        return {d["disk_index"]: d for d in state["backup_disks"] if d["backup_job_id"] == job_id}

    def wait(
        self,
        predicate: Callable[[dict[str, Any]], Optional[T]],
        what: str,
        deadline: float = WAIT_DEADLINE,
        interval: float = 0.05,
    ) -> T:
        """Call ``predicate(state())`` until it answers (not None, False or empty); its answer."""
        last: dict[str, Any] = {}

        def check() -> Optional[T]:
            nonlocal last
            last = self.state()
            return predicate(last)

        try:
            return self.wait_for(check, what, deadline, interval)
        except ShaDoubleError:
            summary = json.dumps(
                {k: last.get(k) for k in ("backup_jobs", "backup_disks", "problems")}, indent=1
            )
            raise ShaDoubleError(f"timed out waiting for {what}; last state:\n{summary}") from None

    @staticmethod
    def wait_for(
        check: Callable[[], Optional[T]],
        what: str,
        deadline: float = WAIT_DEADLINE,
        interval: float = 0.05,
    ) -> T:
        end = time.monotonic() + deadline
        while True:
            result = check()
            if _answered(result):
                assert result is not None
                return result
            if time.monotonic() > end:
                raise ShaDoubleError(f"timed out waiting for {what}")
            time.sleep(interval)
