"""The hub side of a testbed: one ``qemu-nbd`` per disk, serving a qcow2.

The flags are the Sendense hub's (``--shared=10 -t -f qcow2 -x EXPORT -p
PORT``), bound to loopback, on a free port of the range sna accepts for NBD
targets (10100-10200).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.testbed import procs
from tests.testbed.errors import TestbedError

HOST = "127.0.0.1"
#: sna's default --nbd-ports.
PORTS = range(10100, 10201)
DEFAULT_SHARED = 10
READY_DEADLINE = 10.0


class HubError(TestbedError):
    """A target could not be created or served."""


@dataclass
class Target:
    vm: str
    disk_key: int
    export: str
    port: int
    qcow2: Path
    process: subprocess.Popen[bytes]
    record: procs.ProcessRecord

    @property
    def nbd_url(self) -> str:
        return f"nbd://{HOST}:{self.port}/{self.export}"

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "disk_key": self.disk_key,
            "nbd_url": self.nbd_url,
            "qcow2": str(self.qcow2),
            "host": HOST,
            "port": self.port,
            "export": self.export,
            "pid": self.record.pid,
        }


def port_is_free(port: int, reuse_address: bool = False) -> bool:
    """Whether ``port`` can be bound on loopback now.

    ``reuse_address`` asks as a server that sets SO_REUSEADDR (qemu-nbd does)
    would: a port whose last connection lingers in TIME_WAIT counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def listening(pid: int, port: int, host: str = HOST) -> bool:
    """Whether process ``pid`` itself holds the socket listening on ``host:port`` (IPv4).

    Read from /proc rather than by connecting, so a probe neither takes one of
    qemu-nbd's client slots nor mistakes another listener (another test run's,
    on a shared machine) for ours.
    """
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    # Columns: sl, local_address, rem_address, st (0A = LISTEN), ..., inode (9th).
    inodes = {
        f"socket:[{fields[9]}]"
        for fields in (line.split() for line in lines)
        if fields[1] == local and fields[3] == "0A"
    }
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


def create_qcow2(path: Path, size: int, backing: Optional[Path] = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    argv += [str(path), str(size)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise HubError("qemu-img is not installed (Debian package qemu-utils; make deps)") from e
    if done.returncode != 0:
        raise HubError(f"qemu-img create {path} failed: {done.stderr.strip()}")


def serve(
    vm: str,
    disk_key: int,
    export: str,
    qcow2: Path,
    log_dir: Path,
    *,
    shared: int = DEFAULT_SHARED,
    ports: range = PORTS,
    die_with_parent: bool = True,
) -> Target:
    """Start ``qemu-nbd`` for ``qcow2`` on the first free port that works.

    Ports are tried from a random point of the range, so testbeds started at
    the same time rarely race for one; a lost race (qemu-nbd cannot bind)
    moves on to the next port.
    """
    candidates = list(ports)
    first = random.randrange(len(candidates))
    log = log_dir / f"{export}.log"
    for port in candidates[first:] + candidates[:first]:
        if not port_is_free(port):
            continue
        argv = [
            "qemu-nbd",
            "--format=qcow2",
            f"--export-name={export}",
            f"--bind={HOST}",
            f"--port={port}",
            f"--shared={shared}",
            "--persistent",
            str(qcow2),
        ]
        try:
            process, record = procs.spawn("qemu-nbd", argv, log, die_with_parent=die_with_parent)
        except FileNotFoundError as e:
            raise HubError(
                "qemu-nbd is not installed (Debian package qemu-utils; make deps)"
            ) from e
        end = time.monotonic() + READY_DEADLINE
        while process.poll() is None and time.monotonic() < end:
            if listening(process.pid, port):
                return Target(vm, disk_key, export, port, qcow2, process, record)
            time.sleep(0.02)
        procs.stop(record, process)
        if "Address already in use" not in procs.log_tail(log, 5):
            raise HubError(f"qemu-nbd for {export} did not start:\n{procs.log_tail(log)}")
    raise HubError(
        f"no free port in {ports.start}-{ports.stop - 1} for {export}: other NBD servers "
        '(the integration tests\' session servers?) hold them; choose others with "hub": {"ports": [LO, HI]}'
    )
