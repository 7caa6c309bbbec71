"""``sna.backup.https``: ranged GETs over real TLS sockets, against a scripted server.

The server is the standard library's ``ssl`` in a thread, on 127.0.0.1, with
a certificate made for the test; each path makes it answer one way (a
range, an error page, a chunked body, a cut body, nothing).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from sna.backup.https import HttpError, RangeConnection, parse_head
from sna.backup.reactor import ClientReactor
from sna.backup.readers import FolderReader, ReaderError
from sna.backup.vsphere import SnapshotDisk
from sna.contract.tls import TlsSettings, ssl_context, thumbprint_of
from tests.certs import self_signed

pytestmark = pytest.mark.integration

DATA = bytes(range(256)) * 4096 * 4  # 4 MiB with a pattern
#: The client's view of the test's reactor (IP addresses only: its pool never starts).
CLIENT = ClientReactor.of(reactor)


def make_certificate(directory: Path) -> tuple[Path, Path, bytes]:
    made = self_signed(directory)
    return Path(made.cert), Path(made.key), made.der


class ScriptedServer:
    """Answers by path; counts the connections it accepted."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                buffer = b""
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    lines = head.decode().split("\r\n")
                    path = lines[0].split(" ")[1]
                    headers = dict(line.split(": ", 1) for line in lines[1:])
                    self.requests.append(path)
                    if not self._answer(conn, path, headers):
                        return
        except (OSError, ssl.SSLError):
            return

    def _answer(self, conn: ssl.SSLSocket, path: str, headers: dict[str, str]) -> bool:
        if path.startswith("/data"):
            first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
            body = DATA[first : last + 1]
            extra = "Connection: close\r\n" if "close" in path else ""
            conn.sendall(
                f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                f"Content-Range: bytes {first}-{last}/{len(DATA)}\r\n{extra}\r\n".encode()
                + body
            )
            return "close" not in path
        if path == "/missing":
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
            return True
        if path == "/chunked":
            conn.sendall(
                b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n4\r\noops\r\n0\r\n\r\n"
            )
            return True
        if path == "/cut":
            conn.sendall(
                b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100000\r\n\r\n" + DATA[:10]
            )
            return False
        if path == "/superscript":
            # "²".isdigit() is True, int("²") fails: not a length to read.
            conn.sendall(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: ²\r\n\r\n".encode("latin-1")
            )
            return False
        if path == "/garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            return False
        if path == "/silent":
            self._stop.wait(5)
            return False
        return False

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(certificate: tuple[Path, Path, bytes]) -> Iterator[ScriptedServer]:
    cert, key, _ = certificate
    s = ScriptedServer(cert, key)
    yield s
    s.close()


def trusting(certificate: tuple[Path, Path, bytes]) -> ssl.SSLContext:
    return ssl_context(TlsSettings(ca_file=str(certificate[0])))


def test_a_response_head_is_parsed() -> None:
    status, reason, headers = parse_head(
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2"
    )
    assert (status, reason) == (206, "Partial Content")
    assert headers == {"content-length": "5", "x-a": "1, 2"}
    with pytest.raises(HttpError, match="status line"):
        parse_head(b"SSH-2.0-OpenSSH_9.2")
    with pytest.raises(HttpError, match="status line"):
        parse_head("HTTP/1.1 ²00 OK".encode("latin-1"))
    with pytest.raises(HttpError, match="malformed header"):
        parse_head(b"HTTP/1.1 200 OK\r\nno colon here")


@pytest_twisted.ensureDeferred
async def test_ranges_land_in_the_buffer_on_one_kept_alive_connection(
    server: ScriptedServer, certificate: tuple[Path, Path, bytes]
) -> None:
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, trusting(certificate), 5)
    for first, length in ((0, 4096), (12345, 1 << 20), (len(DATA) - 7, 7)):
        buffer = bytearray(length)
        response = await conn.get(
            f"/data?{first}", {"Range": f"bytes={first}-{first + length - 1}"}, memoryview(buffer)
        )
        assert response.status == 206 and response.body == length
        assert response.headers["content-range"].startswith(f"bytes {first}-")
        assert buffer == DATA[first : first + length]
    assert server.connections == 1 and not conn.closed
    conn.close()


@pytest_twisted.ensureDeferred
async def test_an_error_page_is_read_and_the_connection_kept(
    server: ScriptedServer, certificate: tuple[Path, Path, bytes]
) -> None:
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, trusting(certificate), 5)
    buffer = bytearray(4096)
    response = await conn.get("/missing", {}, memoryview(buffer))
    assert (response.status, response.reason, response.body) == (404, "Not Found", 9)
    assert not conn.closed
    response = await conn.get("/data", {"Range": "bytes=0-9"}, memoryview(buffer))
    assert response.status == 206 and buffer[:10] == DATA[:10]
    conn.close()


@pytest_twisted.ensureDeferred
async def test_bodies_it_does_not_read_close_the_connection(
    server: ScriptedServer, certificate: tuple[Path, Path, bytes]
) -> None:
    context = trusting(certificate)
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, context, 5)
    response = await conn.get("/chunked", {}, memoryview(bytearray(4096)))
    assert (response.status, response.body) == (500, 0)
    assert conn.closed
    # Longer than the buffer: not read either.
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, context, 5)
    response = await conn.get("/data", {"Range": "bytes=0-99"}, memoryview(bytearray(10)))
    assert (response.status, response.body) == (206, 0)
    assert conn.closed
    # A length that is not ASCII digits is no length.
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, context, 5)
    response = await conn.get("/superscript", {}, memoryview(bytearray(10)))
    assert (response.status, response.body) == (206, 0)
    assert conn.closed
    # Connection: close is honoured once the body is in.
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, context, 5)
    buffer = bytearray(100)
    response = await conn.get("/data-close", {"Range": "bytes=0-99"}, memoryview(buffer))
    assert response.body == 100 and buffer == DATA[:100]
    assert conn.closed


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/cut", "closed the connection after 10 of 100000 body bytes"),
        ("/garbage", "not an HTTP/1.x status line"),
        ("/silent", "no progress on GET /silent for 0.5 s"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_broken_answer_is_an_http_error(
    server: ScriptedServer, certificate: tuple[Path, Path, bytes], path: str, message: str
) -> None:
    conn = await RangeConnection.open(CLIENT, "127.0.0.1", server.port, trusting(certificate), 0.5)
    with pytest.raises(HttpError, match=message):
        await conn.get(path, {}, memoryview(bytearray(100000)))
    assert conn.closed
    with pytest.raises(HttpError, match="closed"):
        conn.get("/data", {}, memoryview(bytearray(1)))


@pytest_twisted.ensureDeferred
async def test_the_server_is_verified(
    server: ScriptedServer, certificate: tuple[Path, Path, bytes]
) -> None:
    with pytest.raises(HttpError, match="certificate verify failed"):
        await RangeConnection.open(CLIENT, "127.0.0.1", server.port, ssl_context(TlsSettings()), 5)
    wrong = "AA:" * 19 + "AA"
    with pytest.raises(HttpError, match="does not match the pinned"):
        await RangeConnection.open(
            CLIENT, "127.0.0.1", server.port, ssl_context(TlsSettings(thumbprint=wrong)), 5
        )
    right = thumbprint_of(certificate[2], "sha256")
    conn = await RangeConnection.open(
        CLIENT, "127.0.0.1", server.port, ssl_context(TlsSettings(thumbprint=right)), 5
    )
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_closed_port_is_an_http_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HttpError, match=r"cannot connect to 127\.0\.0\.1"):
        await RangeConnection.open(CLIENT, "127.0.0.1", port, ssl.create_default_context(), 5)


@pytest_twisted.ensureDeferred
async def test_closing_the_reader_fails_a_read_still_connecting() -> None:
    """A server that accepts and never answers the TLS handshake: close() ends the read now."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        disk = SnapshotDisk(
            key="2000",
            label="Hard disk 1",
            capacity=1 << 20,
            file_name="[ds] vm/vm.vmdk",
            datastore="ds",
            path="vm/vm.vmdk",
            change_id=None,
            backing_type="flat",
            has_parent=False,
        )
        reader = FolderReader(
            CLIENT,
            host="127.0.0.1",
            port=silent.getsockname()[1],
            datacenter="DC0",
            disk=disk,
            cookie="vmware_soap_session=x",
            context=ssl_context(TlsSettings(insecure=True)),
            connections=1,
            io_timeout=60,
        )
        reading = reader.read(0, 4096)
        await deferLater(reactor, 0.2, lambda: None)
        assert not reading.called, "the handshake is waiting"
        await reader.close()
        with pytest.raises(ReaderError, match="closed"):
            await reading
