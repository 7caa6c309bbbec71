"""Real NBD servers for tests (qemu-nbd, nbdkit), on free loopback ports.

``qemu_nbd(directory, size, export="disk0", shared=1, persistent=True,
read_only=False)`` creates a fresh qcow2 in ``directory``, starts qemu-nbd
serving it on 127.0.0.1 and returns a :class:`QemuNbd` (``host``, ``port``,
``export``, ``qcow2_path``, ``pid``, ``stop()``) once the port listens; the
caller stops it.  ``nbdkit(directory, plugin)`` does the same for nbdkit.
The ``qemu_nbd_factory`` and ``nbdkit_factory`` fixtures hand out the same
functions with ``directory`` under the test's ``tmp_path`` and stop every
server they started, by pid, in their finalizers.  Import a fixture into a
test module to use it::

    from tests.integration.nbd_fixtures import qemu_nbd_factory_fixture  # noqa: F401

    def test_x(qemu_nbd_factory):
        server = qemu_nbd_factory(64 * MiB, "vm-disk0", shared=1)

Readiness is read from ``/proc/net/tcp`` rather than by connecting: with
``--shared=1`` (and without ``-t``) a probing connection would use up the
server.  ``image_map`` and ``image_compare`` run ``qemu-img`` with ``-U`` so
they can read an image the server still has open.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.testbed.hub import listening as process_listens

HOST = "127.0.0.1"
MiB = 1024 * 1024
START_DEADLINE = 10.0
STOP_GRACE = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int, host: str = HOST) -> bool:
    """Whether some socket listens on ``host:port`` (IPv4), without connecting."""
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:  # pragma: no cover - Linux only
        return False
    # Columns: sl, local_address, rem_address, st (0A = LISTEN), ...
    return any(
        fields[1] == local and fields[3] == "0A" for fields in (line.split() for line in lines)
    )


class NbdServerProcess:
    """One NBD server process (qemu-nbd or nbdkit) on a loopback port."""

    def __init__(
        self, process: subprocess.Popen[bytes], host: str, port: int, export: str, log_path: Path
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.export = export
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"nbd://{self.host}:{self.port}/{self.export}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_exit(self, deadline: float = STOP_GRACE) -> Optional[int]:
        """The exit code once the process has exited by itself, or None."""
        try:
            return self.process.wait(deadline)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """TERM, then KILL after a grace period; reaps the process.  Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_GRACE)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} {self.url}>"


class QemuNbd(NbdServerProcess):
    """qemu-nbd serving one qcow2 export."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        host: str,
        port: int,
        export: str,
        log_path: Path,
        qcow2_path: Path,
        *,
        shared: int,
        persistent: bool,
        read_only: bool,
    ) -> None:
        super().__init__(process, host, port, export, log_path)
        self.qcow2_path = qcow2_path
        self.shared = shared
        self.persistent = persistent
        self.read_only = read_only


def _spawn(
    directory: Path, name: str, argv_for: Callable[[int], list[str]]
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start a server on a free port; return once it listens.

    A free port can be taken between our check and the server's bind, so a
    bind failure is retried on another port.
    """
    for attempt in range(3):
        port = free_port()
        log_path = directory / f"{name}-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv_for(port), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            if listening(port):
                return process, port, log_path
            if process.poll() is not None:
                break
            time.sleep(0.01)
        NbdServerProcess(process, HOST, port, "", log_path).stop()
        text = log_path.read_text("utf-8", "replace")
        if "in use" in text and attempt < 2:
            continue
        pytest.fail(f"{name} did not start listening on {HOST}:{port}:\n{text}")
    raise AssertionError("unreachable")  # pragma: no cover


def create_qcow2(path: Path, size: int) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def qemu_nbd(
    directory: Path,
    size: int = 64 * MiB,
    export: str = "disk0",
    *,
    shared: int = 1,
    persistent: bool = True,
    read_only: bool = False,
    image: Optional[Path] = None,
    extra: Sequence[str] = (),
) -> QemuNbd:
    """Start qemu-nbd on a fresh qcow2 of ``size`` bytes (or on ``image``).

    ``persistent`` is qemu-nbd's ``-t``: without it the server exits once its
    last client has gone, like a hub started without ``-t`` would.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = image if image is not None else create_qcow2(directory / f"{export}.qcow2", size)

    def argv(port: int) -> list[str]:
        return [
            "qemu-nbd",
            "-f",
            "qcow2",
            "-x",
            export,
            "-b",
            HOST,
            "-p",
            str(port),
            f"--shared={shared}",
            "--cache=writeback",
            *(["-t"] if persistent else []),
            *(["-r"] if read_only else []),
            *extra,
            str(path),
        ]

    process, port, log_path = _spawn(directory, "qemu-nbd", argv)
    return QemuNbd(
        process,
        HOST,
        port,
        export,
        log_path,
        path,
        shared=shared,
        persistent=persistent,
        read_only=read_only,
    )


def nbdkit(
    directory: Path, plugin: Sequence[str], *, read_only: bool = False, export: str = ""
) -> NbdServerProcess:
    """Start ``nbdkit -f`` with ``plugin`` (e.g. ``["memory", "16M"]``) on a free port.

    Plugins like ``memory`` serve any export name; ``export`` is only what
    the returned object reports.
    """
    directory.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        return [
            "nbdkit",
            "-f",
            "-i",
            HOST,
            "-p",
            str(port),
            *(["-r"] if read_only else []),
            *plugin,
        ]

    process, port, log_path = _spawn(directory, "nbdkit", argv)
    return NbdServerProcess(process, HOST, port, export, log_path)


@pytest.fixture(name="qemu_nbd_factory")
def qemu_nbd_factory_fixture(tmp_path: Path) -> Iterator[Callable[..., QemuNbd]]:
    """``qemu_nbd`` with ``directory`` made under ``tmp_path``; all stopped at teardown."""
    started: list[QemuNbd] = []

    def start(size: int = 64 * MiB, export: str = "disk0", **kwargs: Any) -> QemuNbd:
        directory = kwargs.pop("directory", None) or tmp_path / f"nbd-{len(started)}"
        server = qemu_nbd(directory, size, export, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(name="nbdkit_factory")
def nbdkit_factory_fixture(tmp_path: Path) -> Iterator[Callable[..., NbdServerProcess]]:
    """``nbdkit`` with ``directory`` made under ``tmp_path``; all stopped at teardown."""
    started: list[NbdServerProcess] = []

    def start(plugin: Sequence[str], **kwargs: Any) -> NbdServerProcess:
        server = nbdkit(tmp_path / f"nbdkit-{len(started)}", plugin, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def image_map(path: Path) -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` of a qcow2, readable while qemu-nbd has it open."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "-f", "qcow2", "--output=json", str(path)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    extents: list[dict[str, Any]] = json.loads(out)
    return extents


def image_compare(raw: Path, qcow2: Path) -> subprocess.CompletedProcess[bytes]:
    """``qemu-img compare`` of a raw file against a qcow2 (exit 0: identical)."""
    return subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def nbdkit_on_ports(
    directory: Path,
    ports: Sequence[int],
    plugin: Sequence[str],
    *,
    exit_with_parent: bool = True,
) -> dict[int, NbdServerProcess]:
    """Start one ``nbdkit -f`` with ``plugin`` on each of ``ports``, all at once.

    For ports a test cannot choose freely (the daemon's allowed NBD range).
    Returns the servers by port once they listen; a port some other process
    holds is left out.  ``exit_with_parent`` makes nbdkit die with the test
    process should it never reach its finalizer.  The caller stops them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    starting: dict[int, NbdServerProcess] = {}
    for port in ports:
        if listening(port):
            continue
        log_path = directory / f"nbdkit-{port}.log"
        argv = [
            "nbdkit",
            "-f",
            *(["--exit-with-parent"] if exit_with_parent else []),
            "-i",
            HOST,
            "-p",
            str(port),
            *plugin,
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        starting[port] = NbdServerProcess(process, HOST, port, "", log_path)
    started: dict[int, NbdServerProcess] = {}
    end = time.monotonic() + START_DEADLINE
    while starting and time.monotonic() < end:
        for port, server in list(starting.items()):
            if not server.alive():
                del starting[port]
                text = server.log()
                if "in use" not in text:
                    # Not someone else's port: nbdkit itself is broken.
                    for other in [*starting.values(), *started.values()]:
                        other.stop()
                    pytest.fail(f"nbdkit exited instead of listening on {HOST}:{port}:\n{text}")
            elif process_listens(server.pid, port):
                started[port] = starting.pop(port)
        time.sleep(0.005)
    if starting:
        for server in [*starting.values(), *started.values()]:
            server.stop()
        pytest.fail(f"nbdkit did not start listening on {HOST}:{sorted(starting)}")
    return started
