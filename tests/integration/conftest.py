"""Fixtures of the integration tests: daemons, job ids and NBD servers, cleaned up by pid.

Each daemon is stopped (TERM, then KILL) in a finalizer and its log checked
for unhandled errors; any double still alive whose ``--job-id`` is one the
test made is killed.  The nbdkit servers behind the ports ``nbd_ports()``
hands out live for the session and are stopped at its end.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import pytest

from tests.integration.harness import (
    NBD_SERVERS,
    SBC_COMMAND,
    Daemon,
    JobIds,
    NbdPortServers,
    doubles_of,
    kill_doubles,
    wait_for,
)

# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def nbd_port_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdPortServers]:
    """The servers behind ``nbd_ports()``: logs under the session's tmp, stopped at its end."""
    NBD_SERVERS.directory = tmp_path_factory.mktemp("nbd-ports")
    yield NBD_SERVERS
    NBD_SERVERS.stop_all()


@pytest.fixture
def job_ids(request: pytest.FixtureRequest) -> Iterator[JobIds]:
    ids = JobIds(request.node.name.removeprefix("test_")[:24].replace("[", "-").strip("]"))
    yield ids
    if kill_doubles(ids.made):
        wait_for(lambda: not doubles_of(ids.made), "leftover doubles to die", 5)


@pytest.fixture
def daemon_factory(tmp_path: Path, job_ids: JobIds) -> Iterator[Callable[..., Daemon]]:
    """Start daemons of this test's own; each is stopped by pid at the end."""
    started: list[Daemon] = []

    def make(
        name: str = "sna",
        sbc: str = SBC_COMMAND,
        extra: tuple[str, ...] = (),
        env: Optional[dict[str, str]] = None,
        start: bool = True,
    ) -> Daemon:
        daemon = Daemon(tmp_path / name, sbc=sbc, extra=extra, env=env)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.shutdown()
    for daemon in started:
        daemon.check_no_tracebacks()


@pytest.fixture(scope="session")
def shared_daemon(
    tmp_path_factory: pytest.TempPathFactory, nbd_port_servers: NbdPortServers
) -> Iterator[Daemon]:
    """One daemon for the tests that need nothing special of it."""
    daemon = Daemon(tmp_path_factory.mktemp("shared"))
    daemon.start()
    yield daemon
    daemon.shutdown()
    kill_doubles(_all_job_ids(daemon))
    daemon.check_no_tracebacks()


def _all_job_ids(daemon: Daemon) -> set[str]:
    return {
        p.name.removeprefix("backup-").removesuffix(".log")
        for p in daemon.log_dir.glob("backup-*.log")
    }


@pytest.fixture
def sna(shared_daemon: Daemon, job_ids: JobIds) -> Daemon:
    """The shared daemon, checked to still be alive for this test."""
    assert shared_daemon.process is not None and shared_daemon.process.poll() is None, (
        "the shared sna daemon died:\n" + shared_daemon.output()
    )
    return shared_daemon


@pytest.fixture
def http_port() -> Iterator[int]:
    """A loopback listener that answers every connection as an HTTP server would: not NBD."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, name="not-nbd", daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()
