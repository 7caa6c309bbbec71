"""The NBD client and probe against real qemu-nbd processes on loopback.

Each test starts its own qemu-nbd (``tests/integration/nbd_fixtures.py``) on a
fresh qcow2 and runs on the real reactor through pytest-twisted.  The odd
servers a probe must recognise (an HTTP responder, a listener that never
speaks, a closed port) are made here.  No test asserts how long anything took.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol

from sna.jobs.model import NbdTarget
from sna.nbd.client import NBDClient, connect
from sna.nbd.errors import ConnectionLost, ConnectTimeout, ExportNotFound, TransmissionError
from sna.nbd.probe import ProbeFailed, probe, probe_all
from tests.integration.nbd_fixtures import (
    HOST,
    MiB,
    NbdServerProcess,
    free_port,
    image_compare,
    image_map,
    nbdkit_factory_fixture,  # noqa: F401  (the nbdkit_factory fixture)
    qemu_nbd_factory_fixture,  # noqa: F401  (the qemu_nbd_factory fixture)
)

pytestmark = pytest.mark.integration

reactor: Any = _reactor
SIZE = 64 * MiB
#: Generous: these bound hangs, they are not measurements.
TIMEOUT = 10.0


async def open_client(server: NbdServerProcess) -> NBDClient:
    return await connect(reactor, server.host, server.port, server.export, timeout=TIMEOUT)


def zeros_at(extents: list[dict[str, Any]], start: int, length: int) -> list[dict[str, Any]]:
    """The map's extents overlapping ``[start, start + length)``."""
    return [e for e in extents if e["start"] < start + length and e["start"] + e["length"] > start]


# -- odd servers --------------------------------------------------------------------


class _HTTPError(Protocol):
    """Answers like an HTTP server that dislikes what it got: at once, then closes."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()


@pytest.fixture
def http_port() -> Iterator[int]:
    port: IListeningPort = reactor.listenTCP(0, Factory.forProtocol(_HTTPError), interface=HOST)
    yield port.getHost().port
    port.stopListening()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket nobody accepts on: the kernel completes the TCP handshake."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


# -- the client --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_reports_the_export(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, "vm-disk0", shared=1)
    client = await open_client(server)
    info = client.info
    assert (info.name, info.size) == ("vm-disk0", SIZE)
    assert (info.min_block, info.preferred_block, info.max_block) == (1, 4096, 32 * MiB)
    assert not info.read_only
    assert info.can_flush and info.can_fua and info.can_trim and info.can_write_zeroes
    # qemu-nbd 7.2 advertises multi-conn only when more than one client may share.
    assert not info.can_multi_conn
    await client.close()


@pytest_twisted.ensureDeferred
async def test_multi_conn_with_shared_exports(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, shared=2)
    client = await open_client(server)
    assert client.info.can_multi_conn
    await client.close()


@pytest_twisted.ensureDeferred
async def test_round_trip_at_odd_offsets(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE)
    client = await open_client(server)
    pieces = [(1, 1), (4097, 12345), (5 * MiB + 7, 3 * MiB + 1), (SIZE - 333, 333)]
    written = {offset: os.urandom(length) for offset, length in pieces}
    await gatherResults([client.write(offset, data) for offset, data in written.items()])
    for offset, data in written.items():
        assert await client.read(offset, len(data)) == data
    # Around the pieces the disk still reads as zeroes.
    around = await client.read(0, 8192)
    assert around[0] == 0 and around[1:2] == written[1] and around[2:4097] == bytes(4095)
    # A bytearray and a memoryview slice write just as well as bytes.
    await client.write(100, bytearray(b"abc"))
    await client.write(200, memoryview(b"--xyz--")[2:5])
    assert await client.read(100, 3) == b"abc"
    assert await client.read(200, 3) == b"xyz"
    await client.flush()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_write_zeroes_and_trim(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(16 * MiB)
    client = await open_client(server)
    await client.write(0, os.urandom(8 * MiB))
    await client.write_zeroes(1 * MiB, 2 * MiB)
    await client.write_zeroes(4 * MiB, 1 * MiB, no_hole=True)
    await client.trim(6 * MiB, 1 * MiB)  # a hint: no claim about its content
    await client.flush()
    assert await client.read(1 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert await client.read(4 * MiB, 1 * MiB) == bytes(1 * MiB)
    assert (await client.read(3 * MiB, 1 * MiB)).count(0) < 1 * MiB // 2
    extents = image_map(server.qcow2_path)
    punched = zeros_at(extents, 1 * MiB, 2 * MiB)
    assert punched and all(e["zero"] and not e["data"] for e in punched)
    # Without NO_HOLE qemu drops the clusters; with it they stay allocated.
    assert all("offset" not in e for e in punched)
    kept = zeros_at(extents, 4 * MiB, 1 * MiB)
    assert kept and all(e["zero"] and "offset" in e for e in kept)
    assert all(e["data"] for e in zeros_at(extents, 3 * MiB, 1 * MiB))
    await client.close()


@pytest_twisted.ensureDeferred
async def test_sixteen_requests_in_flight(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE)
    client = await open_client(server)
    blocks = [os.urandom(256 * 1024) for _ in range(16)]
    writes = [client.write(i * 1 * MiB + 3, block) for i, block in enumerate(blocks)]
    # All sixteen are on the wire before the first reply can have arrived.
    assert client.in_flight_bytes == 16 * 256 * 1024
    await gatherResults(writes)
    assert client.in_flight_bytes == 0
    reads = [client.read(i * 1 * MiB + 3, 256 * 1024) for i in range(16)]
    assert client.in_flight_bytes == 16 * 256 * 1024
    assert await gatherResults(reads) == blocks
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_48_mib_write_is_split_and_lands_intact(
    qemu_nbd_factory: Any, tmp_path: Path
) -> None:
    server = qemu_nbd_factory(SIZE)
    client = await open_client(server)
    data = os.urandom(48 * MiB)
    offset = 512 * 1024 + 3
    # One 48 MiB request would make qemu-nbd drop the connection.
    await client.write(offset, data)
    await client.flush()
    back = await client.read(offset, len(data))
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    raw = tmp_path / "expected.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(offset)
        f.write(data)
    await client.close()
    compared = image_compare(raw, server.qcow2_path)
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest_twisted.ensureDeferred
async def test_drain_bounds_what_is_in_flight(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE)
    client = await connect(
        reactor, server.host, server.port, server.export, TIMEOUT, max_in_flight_bytes=4 * MiB
    )
    highest = 0
    pending = []
    for i in range(32):
        await client.drain()
        pending.append(client.write(i * MiB, os.urandom(MiB)))
        highest = max(highest, client.in_flight_bytes)
    await gatherResults(pending)
    assert highest <= 4 * MiB
    await client.close()


@pytest_twisted.ensureDeferred
async def test_write_past_the_end_is_the_servers_error(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE)
    client = await open_client(server)
    with pytest.raises(TransmissionError) as caught:
        await client.write(SIZE - 10, b"x" * 100)
    error = caught.value
    assert error.command == "NBD_CMD_WRITE"
    assert error.error in ("ENOSPC", "EINVAL")
    assert (error.offset, error.length) == (SIZE - 10, 100)
    # A clean error reply: the session goes on.
    await client.write(0, b"still here")
    assert await client.read(0, 10) == b"still here"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_writing_a_read_only_qemu_export(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, read_only=True)
    client = await open_client(server)
    assert client.info.read_only
    with pytest.raises(TransmissionError) as caught:
        await client.write(0, b"no")
    # qemu-nbd 7.2 sends every request it rejects before running it
    # (read-only, past the end, misaligned) as EINVAL in a simple reply; its
    # "Export is read-only" text travels only in structured replies.
    assert caught.value.error == "EINVAL"
    assert caught.value.command == "NBD_CMD_WRITE"
    assert await client.read(0, 2) == b"\0\0"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_writing_a_read_only_nbdkit_export_is_eperm(nbdkit_factory: Any) -> None:
    server = nbdkit_factory(["memory", "16M"], read_only=True, export="disk0")
    client = await open_client(server)
    assert client.info.read_only
    with pytest.raises(TransmissionError) as caught:
        await client.write(0, b"no")
    assert caught.value.error == "EPERM"
    await client.close()


@pytest_twisted.ensureDeferred
async def test_close_ends_the_session(qemu_nbd_factory: Any) -> None:
    # Without -t qemu-nbd exits once its last client is gone: proof of a real close.
    server = qemu_nbd_factory(SIZE, persistent=False)
    client = await open_client(server)
    written = [client.write(i * MiB, os.urandom(MiB)) for i in range(8)]
    # close() lets the replies in flight arrive before NBD_CMD_DISC.
    await client.close()
    assert [d.called for d in written] == [True] * 8
    await gatherResults(written)
    assert server.wait_exit(TIMEOUT) == 0, server.log()


@pytest_twisted.ensureDeferred
async def test_a_dying_server_fails_every_pending_request(nbdkit_factory: Any) -> None:
    # The delay filter holds every write for a minute: all stay unanswered.
    server = nbdkit_factory(["--filter=delay", "memory", "16M", "wdelay=60"], export="disk0")
    client = await open_client(server)
    writes = [client.write(i * MiB, bytes(MiB)) for i in range(4)]
    server.process.kill()
    for d in writes:
        with pytest.raises(ConnectionLost):
            await d
    with pytest.raises(ConnectionLost):
        await client.read(0, 1)


@pytest_twisted.ensureDeferred
async def test_connect_errors(qemu_nbd_factory: Any, silent_port: int) -> None:
    server = qemu_nbd_factory(SIZE, shared=2)
    with pytest.raises(ExportNotFound) as caught:
        await connect(reactor, server.host, server.port, "nope", timeout=TIMEOUT)
    assert caught.value.export == "nope"
    with pytest.raises(ConnectTimeout):
        await connect(reactor, HOST, silent_port, "disk0", timeout=0.5)
    with pytest.raises(ConnectionRefusedError):
        await connect(reactor, HOST, free_port(), "disk0", timeout=TIMEOUT)


# -- the probe -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_probe_leaves_the_export_free(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, "vm-disk0", shared=1)
    info = await probe(reactor, server.host, server.port, "vm-disk0", timeout=TIMEOUT)
    assert (info.name, info.size, info.max_block) == ("vm-disk0", SIZE, 32 * MiB)
    assert not info.listed_only
    # With --shared=1 a session the probe left open would keep this one
    # waiting for a greeting until the timeout.
    client = await connect(reactor, server.host, server.port, "vm-disk0", timeout=TIMEOUT)
    await client.close()
    # And a second probe works just as well.
    assert (await probe(reactor, server.host, server.port, "vm-disk0", TIMEOUT)).size == SIZE


@pytest_twisted.ensureDeferred
async def test_probe_of_a_busy_shared_1_server_times_out(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, shared=1)
    client = await open_client(server)
    with pytest.raises(ProbeFailed) as caught:
        await probe(reactor, server.host, server.port, server.export, timeout=0.5)
    assert caught.value.reason == "timeout"
    await client.close()


async def probe_failure(port: int, export: str = "disk0", timeout: float = TIMEOUT) -> ProbeFailed:
    with pytest.raises(ProbeFailed) as caught:
        await probe(reactor, HOST, port, export, timeout=timeout)
    error = caught.value
    assert f"{HOST}:{port}" in error.message and repr(export) in error.message, error.message
    return error


@pytest_twisted.ensureDeferred
async def test_probe_of_a_missing_export(qemu_nbd_factory: Any) -> None:
    server = qemu_nbd_factory(SIZE, "vm-disk0", shared=1)
    error = await probe_failure(server.port, "vm-disk1")
    assert error.reason == "export_missing"
    assert "vm-disk1" in error.message
    # Nor did that probe leave a session behind.
    client = await open_client(server)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_probe_of_a_closed_port() -> None:
    assert (await probe_failure(free_port())).reason == "refused"


@pytest_twisted.ensureDeferred
async def test_probe_of_an_http_server(http_port: int) -> None:
    error = await probe_failure(http_port)
    assert error.reason == "not_nbd"
    assert "HTTP/1.1 400" in error.message


@pytest_twisted.ensureDeferred
async def test_probe_of_a_silent_server(silent_port: int) -> None:
    error = await probe_failure(silent_port, timeout=0.5)
    assert error.reason == "timeout"


@pytest_twisted.ensureDeferred
async def test_probe_all(qemu_nbd_factory: Any, http_port: int) -> None:
    server = qemu_nbd_factory(SIZE, "vm-disk0", shared=1)
    targets = [
        NbdTarget("2000", HOST, server.port, "vm-disk0"),
        NbdTarget("2001", HOST, server.port, "vm-disk9"),
        NbdTarget("2002", HOST, free_port(), "vm-disk0"),
        NbdTarget("2003", HOST, http_port, "vm-disk0"),
    ]
    d: Deferred[Any] = probe_all(reactor, targets, timeout=TIMEOUT)
    results = await d
    assert [r.target for r in results] == targets
    assert results[0].ok and results[0].info.size == SIZE
    assert [r.error.reason for r in results[1:]] == ["export_missing", "refused", "not_nbd"]


@pytest_twisted.ensureDeferred
async def test_a_cancelled_probe_fails_with_cancelled_error_not_first_error() -> None:
    """backup/start's client may hang up mid-probe: the cancel must stay a cancel."""
    from sna.nbd.gateway import NbdGateway
    from sna.nbd.relay import RelayRegistry

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts (in the kernel) and never speaks
    try:
        target = NbdTarget("2000", "127.0.0.1", listener.getsockname()[1], "d0")
        d = NbdGateway(_reactor, RelayRegistry()).probe([target], 30.0)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    finally:
        listener.close()
