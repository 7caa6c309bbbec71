"""A ``twistd -n sna`` of our own on a free loopback port, for the demo and benchmarks.

It runs the daemon of this checkout's venv with its default backup client,
state and job logs under a work directory, and talks to its API with the
standard library.  Integration tests have their own harness
(tests/integration/harness.py) with pytest's cleanup.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TWISTD = Path(sys.executable).with_name("twistd")
START_DEADLINE = 30.0


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SnaError(RuntimeError):
    """The daemon did not start, or answered an error."""


class Sna:
    """The daemon process; ``extra`` are more ``twistd sna`` options."""

    def __init__(self, workdir: Path, extra: Sequence[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_dir = workdir / "log"
        self.output = workdir / "twistd.log"
        argv = [
            str(TWISTD),
            "-n",
            "--pidfile=",
            "sna",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--state-dir",
            str(workdir / "state"),
            "--log-dir",
            str(self.log_dir),
            *extra,
        ]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                self.call("GET", "/api/v1/health")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise SnaError(f"sna did not start; see {self.output}") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The twistd process (the daemon itself, not a wrapper)."""
        return self.process.pid

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API request; its JSON answer, or :class:`SnaError` for an HTTP error."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data else {}
            conn.request(method, path, body=data, headers=headers)
            answer = conn.getresponse()
            raw = answer.read()
        finally:
            conn.close()
        if answer.status >= 300:
            raise SnaError(f"{method} {path}: HTTP {answer.status}: {raw.decode()[:500]}")
        return json.loads(raw)

    def metric(self, name: str) -> float:
        """One sample of ``/metrics`` (``name`` with its labels, as printed); 0 if absent."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_spare(self, deadline: float = 10.0) -> bool:
        """Wait until a spare client is ready (as on an idle appliance); False if none came."""
        end = time.monotonic() + deadline
        while self.metric('sna_spare_clients{state="ready"}') < 1:
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not stopped within a minute."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
