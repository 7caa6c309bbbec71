"""The relay on the real reactor, against real qemu-nbd and plain TCP peers.

Every test runs once per data path: ``copy`` and ``transport``.
qemu-nbd comes from ``tests/integration/nbd_fixtures.py``; the other peers
(an answering server, a server that never reads) are made here.  Clients that
block (nbdcopy, plain sockets) run in threads so the reactor keeps relaying.
Deadlines only bound hangs; no test asserts how long anything took.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from sna.nbd.relay import Relay
from sna.nbd.wire import Command, encode_request
from tests.integration.nbd_fixtures import (
    HOST,
    MiB,
    free_port,
    image_compare,
    qemu_nbd_factory_fixture,  # noqa: F401  (the qemu_nbd_factory fixture)
)

pytestmark = pytest.mark.integration

reactor: Any = _reactor
T = TypeVar("T")
#: Generous: these bound hangs, they are not measurements.
TIMEOUT = 20.0
#: The relay's own buffering must stay under this, whatever the client pushes.
BUFFER_BOUND = 4 * MiB


@pytest.fixture(params=["copy", "transport"])
def data_path(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    return path


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


class LostCalls:
    """What on_upstream_lost was called with; ``first`` fires on the first call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.first: Deferred[str] = Deferred()

    def __call__(self, relay: Relay, reason: str) -> None:
        self.calls.append(reason)
        if not self.first.called:
            self.first.callback(reason)


async def start_relay(port: int, data_path: str, lost: LostCalls, export: str = "e") -> Relay:
    relay = Relay(
        reactor,
        HOST,
        port,
        job_id="it-relay",
        disk_key="2000",
        export=export,
        on_upstream_lost=lost,
        data_path=data_path,  # type: ignore[arg-type]
    )
    await relay.start()
    return relay


async def until(check: Callable[[], bool], what: str, deadline: float = TIMEOUT) -> None:
    end = reactor.seconds() + deadline
    while not check():
        if reactor.seconds() > end:
            pytest.fail(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def within(d: Deferred[T], what: str, deadline: float = TIMEOUT) -> T:
    box: list[T] = []
    d.addCallback(box.append)
    await until(lambda: bool(box), what, deadline)
    return box[0]


def paths_used(events: list[LogEvent]) -> set[str]:
    """The data path of every relayed connection that ended, from the relay's log."""
    return {e["data_path"] for e in events if "data_path" in e and "number" in e}


def write_source(path: Path, size: int) -> None:
    """Random data with a hole in the middle, so zero handling crosses the relay too."""
    with open(path, "wb") as f:
        f.write(os.urandom(size // 4))
        f.seek(size // 2)
        f.write(os.urandom(size - size // 2))


# -- servers made here -----------------------------------------------------------


class Answering(Protocol):
    """Reads exactly ``expect`` bytes, then answers ``reply`` and waits for the close."""

    def __init__(self, expect: int, reply: bytes) -> None:
        self.expect = expect
        self.reply = reply
        self.received = 0
        self.digest = hashlib.sha256()
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.received == self.expect:
            assert self.transport is not None
            self.transport.write(self.reply)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


class Stalled(Protocol):
    """Accepts, then reads nothing until ``resume()``; hashes what it reads after that."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)


def listen(protocol: Protocol) -> IListeningPort:
    factory = Factory.forProtocol(lambda: protocol)
    port: IListeningPort = reactor.listenTCP(0, factory, interface=HOST)
    return port


# -- tests -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nbdcopy_through_the_relay_lands_unchanged(
    qemu_nbd_factory: Callable[..., Any], tmp_path: Path, data_path: str, events: list[LogEvent]
) -> None:
    size = 32 * MiB
    source = tmp_path / "source.raw"
    write_source(source, size)
    server = qemu_nbd_factory(size, "pgtest1-disk0", shared=10)
    lost = LostCalls()
    relay = await start_relay(server.port, data_path, lost, export="pgtest1-disk0")
    try:
        copy = await deferToThread(
            subprocess.run,
            ["nbdcopy", "--flush", str(source), f"nbd://{HOST}:{relay.listen_port}/pgtest1-disk0"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=TIMEOUT,
        )
        assert copy.returncode == 0, copy.stderr
        await until(lambda: relay.stats().active_connections == 0, "the connections to end")
        stats = relay.stats()
    finally:
        await relay.stop()

    # 24 MiB of data crossed, plus NBD headers one way and replies the other.
    assert stats.bytes_to_hub > 24 * MiB
    assert stats.bytes_from_hub > 0
    assert stats.connections >= 1
    assert (stats.state, lost.calls) == ("listening", [])
    assert paths_used(events) == {data_path}
    server.stop()
    compared = image_compare(source, server.qcow2_path)
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest_twisted.ensureDeferred
async def test_counters_equal_the_bytes_that_crossed(data_path: str) -> None:
    request = os.urandom(8 * MiB + 123)
    reply = os.urandom(MiB + 7)
    peer = Answering(len(request), reply)
    port = listen(peer)
    lost = LostCalls()
    relay = await start_relay(port.getHost().port, data_path, lost)  # type: ignore[attr-defined]

    def client() -> bytes:
        with socket.create_connection((HOST, relay.listen_port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            answer = b""
            while len(answer) < len(reply):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                answer += chunk
            return answer

    try:
        answer = await deferToThread(client)
        await within(peer.done, "the peer to see the close")
        await until(lambda: relay.stats().active_connections == 0, "the connection to end")
        stats = relay.stats()
    finally:
        await relay.stop()
        await maybeDeferred(port.stopListening)

    assert answer == reply
    assert peer.digest.digest() == hashlib.sha256(request).digest()
    assert (stats.bytes_to_hub, stats.bytes_from_hub) == (len(request), len(reply))
    assert (stats.connections, lost.calls) == (1, [])


@pytest_twisted.ensureDeferred
async def test_killing_qemu_nbd_mid_transfer_closes_the_client_and_reports(
    qemu_nbd_factory: Callable[..., Any], data_path: str
) -> None:
    server = qemu_nbd_factory(256 * MiB, "disk0", shared=10)
    lost = LostCalls()
    relay = await start_relay(server.port, data_path, lost, export="disk0")
    # nbdcopy copying from a pipe: it keeps writing for as long as we feed it.
    copy = subprocess.Popen(
        ["nbdcopy", "--", "-", f"nbd://{HOST}:{relay.listen_port}/disk0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stop_feeding = threading.Event()

    def feed() -> None:
        assert copy.stdin is not None
        block = os.urandom(MiB)
        try:
            for _ in range(200):
                if stop_feeding.is_set():
                    break
                copy.stdin.write(block)
            copy.stdin.close()
        except OSError:
            pass  # nbdcopy died: the point of the test

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        await until(lambda: relay.stats().bytes_to_hub >= 8 * MiB, "data to flow")
        os.kill(server.pid, signal.SIGKILL)
        reason = await within(lost.first, "on_upstream_lost")
        code = await deferToThread(copy.wait, TIMEOUT)
        await until(lambda: relay.stats().active_connections == 0, "the connections to end")
        stats = relay.stats()
    finally:
        stop_feeding.set()
        if copy.poll() is None:
            copy.kill()
            copy.wait()
        await relay.stop()
        feeder.join(TIMEOUT)

    assert code != 0, "nbdcopy finished although its server was killed"
    assert f"{HOST}:{server.port}" in reason
    assert lost.calls[:1] == [reason]
    assert (stats.state, stats.upstream_error) == ("upstream_lost", lost.calls[-1])


class ClosesOnRequest(Protocol):
    """Closes the connection as soon as it has received one 28-byte NBD request header."""

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 28:
            assert self.transport is not None
            self.transport.loseConnection()


@pytest.mark.parametrize(
    ("command", "is_loss"), [(Command.DISC, False), (Command.FLUSH, True)], ids=["disc", "flush"]
)
@pytest_twisted.ensureDeferred
async def test_hub_closing_first_is_a_loss_unless_the_client_sent_disc(
    data_path: str, command: Command, is_loss: bool
) -> None:
    # The client keeps its socket open after its request, as a client that
    # sent NBD_CMD_DISC does for a moment before closing: the hub's close
    # always reaches the relay first here.
    header = encode_request(command, handle=1, offset=0, length=0)
    port = listen(ClosesOnRequest())
    lost = LostCalls()
    relay = await start_relay(port.getHost().port, data_path, lost)  # type: ignore[attr-defined]

    def send_and_wait() -> bytes:
        with socket.create_connection((HOST, relay.listen_port), timeout=TIMEOUT) as sock:
            sock.sendall(header)
            try:
                return sock.recv(1)
            except ConnectionResetError:
                return b""

    try:
        assert await deferToThread(send_and_wait) == b"", "the client was not closed"
        await until(lambda: relay.stats().active_connections == 0, "the connection to end")
        stats = relay.stats()
    finally:
        await relay.stop()
        await maybeDeferred(port.stopListening)

    assert stats.bytes_to_hub == 28
    if is_loss:
        assert len(lost.calls) == 1 and "closed the connection" in lost.calls[0]
        assert stats.state == "upstream_lost"
    else:
        assert lost.calls == []
        assert stats.state == "listening"


@pytest_twisted.ensureDeferred
async def test_upstream_dying_while_the_client_waits_closes_the_client(
    qemu_nbd_factory: Callable[..., Any], data_path: str
) -> None:
    server = qemu_nbd_factory(16 * MiB, "disk0", shared=10)
    lost = LostCalls()
    relay = await start_relay(server.port, data_path, lost)

    def greeted_then_ended() -> tuple[bytes, bytes]:
        with socket.create_connection((HOST, relay.listen_port), timeout=TIMEOUT) as sock:
            greeting = b""
            while len(greeting) < 18:
                chunk = sock.recv(18 - len(greeting))
                assert chunk, "closed before the NBD greeting"
                greeting += chunk
            os.kill(server.pid, signal.SIGKILL)
            try:
                after = sock.recv(1)
            except ConnectionResetError:
                after = b"<reset>"
            return greeting, after

    try:
        greeting, after = await deferToThread(greeted_then_ended)
        reason = await within(lost.first, "on_upstream_lost")
    finally:
        await relay.stop()

    assert greeting.startswith(b"NBDMAGICIHAVEOPT")
    assert after in (b"", b"<reset>"), "the client was not closed"
    assert f"{HOST}:{server.port}" in reason


@pytest_twisted.ensureDeferred
async def test_refused_upstream_closes_the_client_and_reports(data_path: str) -> None:
    lost = LostCalls()
    relay = await start_relay(free_port(), data_path, lost)

    def connect_and_read() -> bytes:
        with socket.create_connection((HOST, relay.listen_port), timeout=TIMEOUT) as sock:
            try:
                return sock.recv(1)
            except ConnectionResetError:
                return b""

    try:
        assert await deferToThread(connect_and_read) == b""
        reason = await within(lost.first, "on_upstream_lost")
        stats = relay.stats()
    finally:
        await relay.stop()
    assert "refused" in reason
    assert (stats.state, stats.upstream_error) == ("upstream_lost", reason)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_does_not_read_bounds_the_relays_buffering(
    data_path: str,
) -> None:
    total = 128 * MiB
    block = os.urandom(MiB)
    peer = Stalled()
    port = listen(peer)
    lost = LostCalls()
    relay = await start_relay(port.getHost().port, data_path, lost)  # type: ignore[attr-defined]
    most = 0

    def sample() -> None:
        nonlocal most
        most = max(most, relay.buffered_bytes())

    sampler = LoopingCall(sample)
    sampler.start(0.002)
    sock = socket.create_connection((HOST, relay.listen_port), timeout=TIMEOUT)
    sent = 0
    digest = hashlib.sha256()

    def push(stall_after: Optional[float]) -> None:
        """Send the stream from ``sent`` on; with ``stall_after``, stop once sends block."""
        nonlocal sent
        sock.settimeout(stall_after if stall_after is not None else TIMEOUT)
        while sent < total:
            offset = sent % MiB
            chunk = memoryview(block)[offset:]
            chunk = chunk[: total - sent]
            try:
                n = sock.send(chunk)
            except TimeoutError:
                if stall_after is not None:
                    return
                raise
            digest.update(chunk[:n])
            sent += n

    try:
        # Phase 1: the upstream reads nothing; the client gets stuck.
        await deferToThread(push, 0.5)
        pushed_while_stalled = sent
        sample()
        most_while_stalled = most
        # Phase 2: the upstream reads again; everything still arrives, in order.
        peer.resume()
        await deferToThread(push, None)
        sock.close()
        await until(lambda: peer.received == total, "the upstream to read everything")
        await until(lambda: relay.stats().active_connections == 0, "the connection to end")
        stats = relay.stats()
    finally:
        sock.close()
        sampler.stop()
        await relay.stop()
        await maybeDeferred(port.stopListening)

    assert pushed_while_stalled < total, "the client was never held back"
    assert most_while_stalled <= BUFFER_BOUND
    assert most <= BUFFER_BOUND
    assert peer.digest.digest() == digest.digest()
    assert stats.bytes_to_hub == total
    assert lost.calls == []
