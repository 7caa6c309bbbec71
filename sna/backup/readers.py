"""Where a disk's bytes come from: the :class:`IDiskReader` interface and its two readers.

- :class:`FolderReader` reads the snapshot disk's flat extent over the
  datastore HTTP ``/folder`` URL with ``Range`` requests, authenticated by
  the SOAP session cookie.  It checks the descriptor (one flat extent, not a
  delta) and probes for ``206 Partial Content`` before any byte is copied,
  and it never accepts a ``200`` full body in place of a range.
- :class:`NbdReader` reads an NBD export (``nbdkit vddk`` in production, the
  VDDK path; ``nbdkit file`` in tests) through :mod:`sna.nbd.client`.

A reader is opened once per disk, read with several requests in flight, and
closed (or aborted on cancellation).  Readers know nothing of targets, CBT or
events; they only fetch bytes, retrying what is safe to retry (reads).
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import Attribute, Interface, implementer

from sna.backup.options import NbdAddress
from sna.backup.vsphere import SnapshotDisk
from sna.nbd.client import NBDClient, NBDClientProtocol, connect
from sna.nbd.errors import ConnectTimeout, NBDError
from sna.nbd.wire import ExportInfo

log = Logger()

#: A descriptor is a few hundred bytes; anything bigger is not a text descriptor.
DESCRIPTOR_LIMIT = 64 * 1024
PROBE_LENGTH = 4096
#: The flat extent types: VMFS (ESXi, also on NFS) and FLAT (hosted products).
FLAT_EXTENTS = ("VMFS", "FLAT")
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?\s*$')
_CREATE_TYPE = re.compile(r'^createType\s*=\s*"([^"]*)"', re.MULTILINE)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class ReaderError(Exception):
    """The source cannot be read; the message says which disk, where and why."""


class IDiskReader(Interface):
    """Random-access reads of one disk of the snapshot."""

    description = Attribute("What is read, for logs and messages.")
    size = Attribute("Bytes the source holds (at least the disk's capacity), once open.")
    max_request = Attribute("The longest single read this source takes.")

    def open() -> Deferred[None]:
        """Check the source can be read (probe); fails with :class:`ReaderError`."""

    def read(offset: int, length: int) -> Deferred[bytes]:
        """Exactly ``length`` bytes from ``offset``, or a :class:`ReaderError`."""

    def close() -> Deferred[None]:
        """Release connections after the last read."""

    def abort() -> None:
        """Drop everything now: pending reads fail (cancellation)."""


# -- the datastore /folder reader -------------------------------------------------------


def parse_descriptor(text: str, descriptor_path: str) -> tuple[str, int, int]:
    """(flat file path in the datastore, extent bytes, offset in it) of a one-extent flat disk."""
    create_type = _CREATE_TYPE.search(text)
    extents = [m for m in (_EXTENT.match(line.strip()) for line in text.splitlines()) if m]
    kind = create_type.group(1) if create_type else "unknown"
    if len(extents) != 1 or extents[0].group(3).upper() not in FLAT_EXTENTS:
        found = ", ".join(m.group(3) for m in extents) or "none"
        raise ReaderError(
            f"{descriptor_path} is not a single flat extent (createType {kind!r}, "
            f"extents: {found}); the /folder reader cannot read it, use --reader nbd"
        )
    extent = extents[0]
    directory = posixpath.dirname(descriptor_path)
    flat = posixpath.join(directory, extent.group(4)) if directory else extent.group(4)
    offset_sectors = int(extent.group(5) or 0)
    return flat, int(extent.group(2)) * 512, offset_sectors * 512


class _Collect(Protocol):
    """A response body into memory, refusing more than expected."""

    def __init__(self, expected: int, done: Deferred[bytes]) -> None:
        self._expected = expected
        self._parts: list[bytes] = []
        self._received = 0
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._expected:
            if not self._done.called:
                self._done.errback(
                    ReaderError(f"the server sent more than the {self._expected} bytes asked for")
                )
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(ReaderError(f"the download broke off: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    """Drops a body we do not want (a 200 with the whole file, an error page) at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


class _Retryable(ReaderError):
    """A failure worth another try (throttling, a dropped connection)."""


@implementer(IDiskReader)
class FolderReader:
    """``https://{vcenter}/folder/{path}?dcPath=..&dsName=..`` with ``Range`` requests."""

    def __init__(
        self,
        reactor: Any,
        *,
        base_url: str,
        datacenter: str,
        disk: SnapshotDisk,
        cookie: str,
        policy: IPolicyForHTTPS,
        connections: int,
        io_timeout: float,
        retries: int = 3,
        max_request: int = 32 << 20,
    ) -> None:
        self._reactor = reactor
        self._base = base_url.rstrip("/")
        self._datacenter = datacenter
        self._disk = disk
        self._cookie = cookie
        self._timeout = io_timeout
        self._retries = retries
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = connections
        self._pool.retryAutomatically = False  # we retry ourselves, counting attempts
        self._agent = Agent(reactor, contextFactory=policy, pool=self._pool)
        self._pending: set[Deferred[Any]] = set()
        self._aborted = False
        self.max_request = max_request
        self.size = 0
        self.flat_path = ""
        self._offset = 0
        self.description = f"{self._base}/folder/ [{disk.datastore}] {disk.path}"

    def _url(self, path: str) -> bytes:
        query = urllib.parse.urlencode({"dcPath": self._datacenter, "dsName": self._disk.datastore})
        return f"{self._base}/folder/{urllib.parse.quote(path)}?{query}".encode("ascii")

    async def _get_range(
        self, path: str, start: int, length: int, *, exact: bool
    ) -> tuple[bytes, int]:
        """``length`` bytes of ``path`` from ``start``: (body, the file's total size).

        ``exact`` demands ``206`` with exactly that range; otherwise a short
        file (``206`` for less, or ``200`` for a file smaller than asked) is
        fine, which is how the small descriptor is fetched.
        """
        end = start + length - 1
        headers = Headers(
            {
                b"Cookie": [self._cookie.encode("latin-1")],
                b"Range": [f"bytes={start}-{end}".encode("ascii")],
                b"User-Agent": [b"sendense-backup-client"],
            }
        )
        url = self._url(path)
        request = self._agent.request(b"GET", url, headers)
        self._pending.add(request)
        try:
            response: IResponse = await request.addTimeout(self._timeout, self._reactor)
        except Exception as e:
            raise _Retryable(f"GET {path} bytes {start}-{end}: {_reason(e)}") from None
        finally:
            self._pending.discard(request)
        status = response.code
        if status == 503:
            response.deliverBody(_Discard())
            raise _Retryable(f"GET {path}: 503 (the server is throttling)")
        if status == 200 and not exact and response.length != -1 and response.length <= length:
            body = await self._body(response, length, path)
            return body, len(body)
        if status != 206:
            response.deliverBody(_Discard())
            raise ReaderError(
                f"GET {path} with Range bytes={start}-{end} answered {status} "
                f"{response.phrase.decode('latin-1', 'replace')}, not 206 Partial Content"
            )
        ranges = response.headers.getRawHeaders(b"content-range") or []
        match = _CONTENT_RANGE.match(ranges[0].decode("latin-1")) if len(ranges) == 1 else None
        if match is None:
            response.deliverBody(_Discard())
            raise ReaderError(f"GET {path}: 206 without a valid Content-Range ({ranges!r})")
        got_start, got_end = int(match.group(1)), int(match.group(2))
        file_size = int(match.group(3)) if match.group(3) != "*" else -1
        if got_start != start or (exact and got_end != end) or got_end > end:
            response.deliverBody(_Discard())
            raise ReaderError(
                f"GET {path}: asked for bytes {start}-{end}, got {got_start}-{got_end}"
            )
        body = await self._body(response, got_end - got_start + 1, path)
        if len(body) != got_end - got_start + 1:
            raise _Retryable(f"GET {path}: {len(body)} bytes for range {got_start}-{got_end}")
        return body, file_size

    async def _body(self, response: IResponse, expected: int, path: str) -> bytes:
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(expected, done))
        self._pending.add(done)
        try:
            return await done.addTimeout(self._timeout, self._reactor)
        except ReaderError as e:
            raise _Retryable(f"GET {path}: {e}") from None
        except Exception as e:
            raise _Retryable(f"GET {path}: {_reason(e)}") from None
        finally:
            self._pending.discard(done)

    async def _with_retries(
        self, path: str, start: int, length: int, exact: bool
    ) -> tuple[bytes, int]:
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._get_range(path, start, length, exact=exact)
            except _Retryable as e:
                if self._aborted or attempt > self._retries:
                    raise ReaderError(f"{e} (after {attempt} attempts)") from None
                log.warn(
                    "read of {path} failed, retrying in {delay}s: {error}",
                    path=path,
                    delay=delay,
                    error=str(e),
                )
                await deferLater(self._reactor, delay, lambda: None)
                delay *= 2

    async def _open(self) -> None:
        disk = self._disk
        if not disk.datastore or not disk.path.endswith(".vmdk"):
            raise ReaderError(
                f"disk {disk.key}: backing file {disk.file_name!r} is not a datastore .vmdk"
            )
        if disk.has_parent:
            raise ReaderError(
                f"disk {disk.key}: the snapshot's disk is a delta of an earlier snapshot "
                "(the VM had snapshots); the /folder reader reads flat disks only"
            )
        raw, _ = await self._with_retries(disk.path, 0, DESCRIPTOR_LIMIT, exact=False)
        if raw[:4] in (b"KDMV", b"COWD") or b"\0" in raw:
            raise ReaderError(
                f"disk {disk.key}: {disk.path} is a binary (sparse) VMDK, not a flat descriptor"
            )
        flat, extent_size, offset = parse_descriptor(raw.decode("utf-8", "replace"), disk.path)
        if extent_size < disk.capacity:
            raise ReaderError(
                f"disk {disk.key}: the flat extent of {disk.path} has {extent_size} bytes, "
                f"less than the capacity {disk.capacity}"
            )
        self.flat_path = flat
        self._offset = offset
        probe = min(PROBE_LENGTH, disk.capacity)
        try:
            _, file_size = await self._with_retries(flat, offset, probe, exact=True)
        except ReaderError as e:
            # ESXi refuses ranged reads of a running VM's disk on VMFS6 and vSAN (HTTP 500).
            raise ReaderError(
                f"disk {disk.key}: the probe read of {flat} failed ({e}); the /folder reader "
                "cannot read this disk here, use --reader vddk"
            ) from None
        if 0 <= file_size < offset + disk.capacity:
            raise ReaderError(
                f"disk {disk.key}: {flat} has {file_size} bytes, less than the capacity {disk.capacity}"
            )
        self.size = disk.capacity
        self.description = f"/folder [{disk.datastore}] {flat}"
        log.info(
            "disk {key}: reading {flat} over /folder (Range requests answered 206)",
            key=disk.key,
            flat=flat,
        )

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open())

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        async def go() -> bytes:
            body, _ = await self._with_retries(self.flat_path, self._offset + offset, length, True)
            return body

        return Deferred.fromCoroutine(go())

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    def abort(self) -> None:
        self._aborted = True
        for d in list(self._pending):
            d.cancel()
        self._pool.closeCachedConnections()


def _reason(error: BaseException) -> str:
    if isinstance(error, (TimeoutError, CancelledError)):
        return "no answer in time (or cancelled)"
    if isinstance(error, (ResponseFailed, RequestGenerationFailed)):
        reasons = getattr(error, "reasons", [])
        return "; ".join(r.getErrorMessage() for r in reasons) or str(error)
    return f"{type(error).__name__}: {error}"


# -- the NBD reader ------------------------------------------------------------------------


async def connect_address(
    reactor: Any, address: NbdAddress, timeout: float, max_in_flight_bytes: int
) -> NBDClient:
    """An open :class:`NBDClient` for a TCP or Unix-socket address."""
    if address.socket is None:
        assert address.host is not None and address.port is not None
        tcp: IReactorTCP = reactor
        return await connect(
            tcp,
            address.host,
            address.port,
            address.export,
            timeout,
            max_in_flight_bytes=max_in_flight_bytes,
        )
    # sna.nbd.client.connect speaks TCP only; the same protocol serves a Unix socket.
    unix: IReactorUNIX = reactor
    clock: IReactorTime = reactor
    protocol = NBDClientProtocol(address.export, max_in_flight_bytes)
    endpoint = UNIXClientEndpoint(unix, address.socket, timeout=int(max(timeout, 1)))

    def handshake(_: object) -> Deferred[ExportInfo]:
        return protocol.ready

    def timed_out(result: Any, seconds: float) -> Any:
        if isinstance(result, Failure):
            raise ConnectTimeout(f"NBD {address.describe()}: no session within {seconds:g} s")
        return result

    d = connectProtocol(endpoint, protocol).addCallback(handshake)
    info = await d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
    return NBDClient(protocol, info)


@implementer(IDiskReader)
class NbdReader:
    """Reads an NBD export: one connection, requests pipelined by the caller."""

    def __init__(
        self, reactor: Any, address: NbdAddress, disk: SnapshotDisk, timeout: float
    ) -> None:
        self._reactor = reactor
        self._address = address
        self._disk = disk
        self._timeout = timeout
        self._client: Optional[NBDClient] = None
        self.size = 0
        self.max_request = 32 << 20
        self.description = f"NBD {address.describe()}"

    async def _open(self) -> None:
        try:
            client = await connect_address(self._reactor, self._address, self._timeout, 64 << 20)
        except (NBDError, OSError, ConnectionDone) as e:
            raise ReaderError(
                f"disk {self._disk.key}: cannot open source {self.description}: {e}"
            ) from None
        except Exception as e:
            raise ReaderError(
                f"disk {self._disk.key}: cannot open source {self.description}: {_reason(e)}"
            ) from None
        self._client = client
        self.size = client.info.size
        self.max_request = client.info.max_payload
        if self.size < self._disk.capacity:
            raise ReaderError(
                f"disk {self._disk.key}: source {self.description} has {self.size} bytes, "
                f"less than the capacity {self._disk.capacity}"
            )
        log.info(
            "disk {key}: reading {source} ({size} bytes)",
            key=self._disk.key,
            source=self.description,
            size=self.size,
        )

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open())

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        assert self._client is not None, "read before open"

        def failed(failure: Failure) -> Failure:
            # The copier says which disk, offset and source; this says what NBD said.
            return Failure(ReaderError(str(failure.value)))

        return self._client.read(offset, length).addErrback(failed)

    def close(self) -> Deferred[None]:
        if self._client is None:
            return succeed(None)
        return self._client.close()

    def abort(self) -> None:
        if self._client is not None:
            self._client.abort()
