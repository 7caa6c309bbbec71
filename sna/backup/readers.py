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
import ssl
import urllib.parse
from typing import Any, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from sna.backup.https import HttpError, RangeConnection
from sna.backup.options import NbdAddress
from sna.backup.reactor import ClientReactor
from sna.backup.vsphere import SnapshotDisk
from sna.nbd.client import NBDClient, connect, connect_endpoint
from sna.nbd.errors import NBDError

log = Logger()

#: A descriptor is a few hundred bytes; anything bigger is not a text descriptor.
DESCRIPTOR_LIMIT = 64 * 1024
PROBE_LENGTH = 4096
#: The flat extent types: VMFS (ESXi, also on NFS) and FLAT (hosted products).
FLAT_EXTENTS = ("VMFS", "FLAT")
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?\s*$')
_CREATE_TYPE = re.compile(r'^createType\s*=\s*"([^"]*)"', re.MULTILINE)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


#: What a read gives: ``bytes``, or the ``bytearray`` a body was received into.
Buffer = Union[bytes, bytearray]


class ReaderError(Exception):
    """The source cannot be read; the message says which disk, where and why."""


class IDiskReader(Interface):
    """Random-access reads of one disk of the snapshot."""

    description = Attribute("What is read, for logs and messages.")
    size = Attribute("Bytes the source holds (at least the disk's capacity), once open.")
    max_request = Attribute("The longest single read this source takes.")

    def open() -> Deferred[None]:
        """Check the source can be read (probe); fails with :class:`ReaderError`."""

    def read(offset: int, length: int) -> Deferred[Buffer]:
        """Exactly ``length`` bytes from ``offset``, or a :class:`ReaderError`.

        The buffer is the caller's from then on (nothing reuses it)."""

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


class _Retryable(ReaderError):
    """A failure worth another try (throttling, a dropped connection)."""


@implementer(IDiskReader)
class FolderReader:
    """``https://{vcenter}/folder/{path}?dcPath=..&dsName=..`` with ``Range`` requests.

    Each request runs on a :class:`~sna.backup.https.RangeConnection` of the
    reader's own, kept alive between requests, and its body is read straight
    into the buffer the read returns.  Callers keep at most ``connections``
    reads in flight (the copier's workers); each has a connection then.
    """

    def __init__(
        self,
        reactor: ClientReactor,
        *,
        host: str,
        port: int,
        datacenter: str,
        disk: SnapshotDisk,
        cookie: str,
        context: ssl.SSLContext,
        connections: int,
        io_timeout: float,
        retries: int = 3,
        max_request: int = 32 << 20,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._base = f"https://{_host_for_url(host)}:{port}"
        self._datacenter = datacenter
        self._disk = disk
        self._cookie = cookie
        self._context = context
        self._timeout = io_timeout
        self._retries = retries
        self._connections = connections
        self._idle: list[RangeConnection] = []
        self._open_connections: set[RangeConnection] = set()
        #: Connections being opened and retry pauses: what abort() cancels.
        self._waiting: set[Deferred[Any]] = set()
        self._aborted = False
        self.max_request = max_request
        self.size = 0
        self.flat_path = ""
        self._offset = 0
        self.description = f"{self._base}/folder/ [{disk.datastore}] {disk.path}"

    def _target(self, path: str) -> str:
        query = urllib.parse.urlencode({"dcPath": self._datacenter, "dsName": self._disk.datastore})
        return f"/folder/{urllib.parse.quote(path)}?{query}"

    async def _connection(self) -> RangeConnection:
        if self._aborted:
            raise ReaderError("the reader was closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open_connections.discard(conn)
        opening = RangeConnection.open(
            self._reactor, self._host, self._port, self._context, self._timeout
        )
        self._waiting.add(opening)
        try:
            conn = await opening
        except HttpError as e:
            raise _Retryable(str(e)) from None
        except CancelledError:
            raise ReaderError("the reader was closed") from None
        finally:
            self._waiting.discard(opening)
        self._open_connections.add(conn)
        if self._aborted:
            conn.close()
            raise ReaderError("the reader was closed")
        return conn

    def _done_with(self, conn: RangeConnection) -> None:
        if conn.closed:
            self._open_connections.discard(conn)
        elif len(self._idle) < self._connections:
            self._idle.append(conn)
        else:
            conn.close()
            self._open_connections.discard(conn)

    async def _get_range(
        self, path: str, start: int, length: int, *, exact: bool
    ) -> tuple[Buffer, int]:
        """``length`` bytes of ``path`` from ``start``: (body, the file's total size).

        ``exact`` demands ``206`` with exactly that range; otherwise a short
        file (``206`` for less, or ``200`` for a file smaller than asked) is
        fine, which is how the small descriptor is fetched.
        """
        end = start + length - 1
        headers = {
            "Cookie": self._cookie,
            "Range": f"bytes={start}-{end}",
            "User-Agent": "sendense-backup-client",
        }
        buffer = bytearray(length)
        conn = await self._connection()
        try:
            response = await conn.get(self._target(path), headers, memoryview(buffer))
        except HttpError as e:
            raise _Retryable(f"GET {path} bytes {start}-{end}: {e}") from None
        finally:
            self._done_with(conn)
        status = response.status
        if status == 503:
            raise _Retryable(f"GET {path}: 503 (the server is throttling)")
        if status == 200 and not exact and response.body:
            return bytes(buffer[: response.body]), response.body
        if status != 206:
            raise ReaderError(
                f"GET {path} with Range bytes={start}-{end} answered {status} "
                f"{response.reason}, not 206 Partial Content"
            )
        content_range = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.match(content_range)
        if match is None:
            raise ReaderError(f"GET {path}: 206 without a valid Content-Range ({content_range!r})")
        got_start, got_end = int(match.group(1)), int(match.group(2))
        file_size = int(match.group(3)) if match.group(3) != "*" else -1
        if got_start != start or (exact and got_end != end) or got_end > end:
            raise ReaderError(
                f"GET {path}: asked for bytes {start}-{end}, got {got_start}-{got_end}"
            )
        if response.body != got_end - got_start + 1:
            raise _Retryable(f"GET {path}: {response.body} bytes for range {got_start}-{got_end}")
        if response.body == length:
            return buffer, file_size
        return bytes(buffer[: response.body]), file_size

    async def _with_retries(
        self, path: str, start: int, length: int, exact: bool
    ) -> tuple[Buffer, int]:
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
                pause = deferLater(self._reactor.clock, delay, lambda: None)
                self._waiting.add(pause)
                try:
                    await pause
                except CancelledError:
                    raise ReaderError(f"{e} (closed while waiting to retry)") from None
                finally:
                    self._waiting.discard(pause)
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

    def read(self, offset: int, length: int) -> Deferred[Buffer]:
        async def go() -> Buffer:
            body, _ = await self._with_retries(self.flat_path, self._offset + offset, length, True)
            return body

        return Deferred.fromCoroutine(go())

    def close(self) -> Deferred[None]:
        """Close every connection; reads still under way fail, and none starts again."""
        self._aborted = True
        for waiting in list(self._waiting):
            waiting.cancel()
        for conn in list(self._open_connections):
            conn.close()
        self._open_connections.clear()
        self._idle.clear()
        return succeed(None)

    def abort(self) -> None:
        self.close()


def _reason(error: BaseException) -> str:
    if isinstance(error, (TimeoutError, CancelledError)):
        return "no answer in time (or cancelled)"
    return f"{type(error).__name__}: {error}"


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the NBD reader ------------------------------------------------------------------------


async def connect_address(
    reactor: ClientReactor, address: NbdAddress, timeout: float, max_in_flight_bytes: int
) -> NBDClient:
    """An open :class:`NBDClient` for a TCP or Unix-socket address."""
    if address.socket is None:
        assert address.host is not None and address.port is not None
        return await connect(
            reactor.tcp,
            address.host,
            address.port,
            address.export,
            timeout,
            max_in_flight_bytes=max_in_flight_bytes,
        )
    endpoint = UNIXClientEndpoint(reactor.unix, address.socket, timeout=int(max(timeout, 1)))
    return await connect_endpoint(
        endpoint,
        reactor.clock,
        address.export,
        f"NBD {address.describe()}",
        timeout,
        max_in_flight_bytes,
    )


@implementer(IDiskReader)
class NbdReader:
    """Reads an NBD export: one connection, requests pipelined by the caller."""

    def __init__(
        self, reactor: ClientReactor, address: NbdAddress, disk: SnapshotDisk, timeout: float
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

    def read(self, offset: int, length: int) -> Deferred[Buffer]:
        assert self._client is not None, "read before open"

        def failed(failure: Failure) -> Failure:
            # The copier says which disk, offset and source; this says what NBD said.
            return Failure(ReaderError(str(failure.value)))

        d: Deferred[Buffer] = self._client.read(offset, length)  # type: ignore[assignment]
        return d.addErrback(failed)

    def close(self) -> Deferred[None]:
        if self._client is None:
            return succeed(None)
        return self._client.close()

    def abort(self) -> None:
        if self._client is not None:
            self._client.abort()
