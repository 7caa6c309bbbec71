"""The double's real I/O for starting backups: qemu-img, qemu-nbd, and HTTP to the node.

qemu-nbd runs with the SHA's flags (sha-contract.md §1.2, QM:77-85) except
``-b 127.0.0.1`` for ``-b 0.0.0.0``: loopback only.  Unlike the SHA it is
waited for until it listens, so a test never races its start.  It is
stopped as QM:133-195 does: SIGTERM, at most 5 s, then SIGKILL.

Each qemu-nbd dies with the double (``PR_SET_PDEATHSIG``).  The kernel ties
that to the *thread* that forked, and the HTTP server answers each request
on a thread that ends with it, so every qemu-nbd is started by one
long-lived spawner thread.

What was started, and whether it still runs, is kept for ``/_double/state``
and saved with the rest of the state; a restarted double lists the earlier
run's processes as not running (they died with it).
"""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.shadouble.start import HubFailure
from tests.testbed import hub as testbed_hub
from tests.testbed import procs

#: QM:144-170: SIGTERM, then SIGKILL after 5 s.
STOP_GRACE = 5.0
READY_DEADLINE = 10.0
#: The SHA's call to the node has no timeout (BH:431); a test must not hang for ever.
NODE_TIMEOUT = 120.0


@dataclass
class NbdProcess:
    port: int
    export: str
    qcow2: str
    job: str
    vm_name: str
    pid: int
    started_at: float
    process: Optional[subprocess.Popen[bytes]] = None
    record: Optional[procs.ProcessRecord] = None
    stopped_at: Optional[float] = None

    @property
    def running(self) -> bool:
        if self.record is None:
            return False
        if self.process is not None and self.process.poll() is not None:
            return False
        return procs.is_running(self.record)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "port": self.port,
            "export": self.export,
            "qcow2": self.qcow2,
            "job": self.job,
            "vm_name": self.vm_name,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
            "running": self.running,
        }


class RealHub:
    """qemu-img and qemu-nbd on this machine, and plain HTTP to a loopback node."""

    def __init__(self, log_dir: Path, earlier: Iterable[dict[str, Any]] = ()) -> None:
        self._log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qemu-nbd-spawner")
        self._by_port: dict[int, NbdProcess] = {}
        self._all: list[NbdProcess] = [
            NbdProcess(
                port=int(r["port"]),
                export=str(r["export"]),
                qcow2=str(r["qcow2"]),
                job=str(r["job"]),
                vm_name=str(r.get("vm_name", "")),
                pid=int(r["pid"]),
                started_at=float(r["started_at"]),
                stopped_at=r.get("stopped_at"),
            )
            for r in earlier
        ]

    # -- qcow2 -----------------------------------------------------------------------------

    def _qemu_img(self, argv: list[str]) -> None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as e:
            raise HubFailure("qemu-img is not installed (Debian package qemu-utils)") from e
        if done.returncode != 0:
            raise HubFailure(f"qemu-img create failed: {(done.stdout + done.stderr).strip()}")

    def create_full(self, path: Path, size_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The size in bytes, as the SHA passes it (QC:48): size_gb GiB exactly.
        self._qemu_img(["qemu-img", "create", "-f", "qcow2", str(path), str(size_bytes)])

    def create_overlay(self, path: Path, backing: Path) -> None:
        if not backing.exists():
            raise HubFailure(f"backing file not found: {backing}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._qemu_img(
            ["qemu-img", "create", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(path)]
        )

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    # -- qemu-nbd --------------------------------------------------------------------------

    def port_usable(self, port: int) -> bool:
        # As qemu-nbd binds (SO_REUSEADDR): a port in TIME_WAIT after a client
        # disconnected is free for it, and must stay the lowest free one.
        return testbed_hub.port_is_free(port, reuse_address=True)

    def serve(self, port: int, export: str, qcow2: Path, job_key: str, vm_name: str) -> int:
        argv = [
            "qemu-nbd",
            "-f",
            "qcow2",
            "-x",
            export,
            "-p",
            str(port),
            "-b",
            testbed_hub.HOST,
            "--shared",
            "10",
            "-t",
            str(qcow2),
        ]
        log = self._log_dir / f"qemu-nbd-{port}.log"
        try:
            process, record = self._spawner.submit(procs.spawn, "qemu-nbd", argv, log).result()
        except FileNotFoundError as e:
            raise HubFailure("qemu-nbd is not installed (Debian package qemu-utils)") from e
        started = NbdProcess(
            port, export, str(qcow2), job_key, vm_name, process.pid, time.time(), process, record
        )
        end = time.monotonic() + READY_DEADLINE
        while process.poll() is None and time.monotonic() < end:
            if testbed_hub.listening(process.pid, port):
                with self._lock:
                    self._by_port[port] = started
                    self._all.append(started)
                return process.pid
            time.sleep(0.02)
        procs.stop(record, process, STOP_GRACE)
        raise HubFailure(f"qemu-nbd did not listen on {port}: {procs.log_tail(log, 5)}")

    def stop(self, port: int) -> None:
        with self._lock:
            started = self._by_port.pop(port, None)
        if started is None or started.record is None:
            return
        procs.stop(started.record, started.process, STOP_GRACE)
        started.stopped_at = time.time()

    def stop_all(self) -> None:
        with self._lock:
            ports = list(self._by_port)
        for port in ports:
            self.stop(port)
        self._spawner.shutdown(wait=True)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [p.to_json() for p in self._all]

    # -- HTTP to the node -------------------------------------------------------------------

    def post_json(self, url: str, body: bytes) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=NODE_TIMEOUT
        )
        try:
            conn.request(
                "POST",
                parts.path or "/",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()
