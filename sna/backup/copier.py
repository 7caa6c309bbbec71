"""One disk, from a reader into an NBD target: reads in flight, zero detection, FLUSH.

:class:`DiskCopy` runs a plan from :func:`sna.backup.extents.plan` with a few
workers sharing it.  Each worker reads a chunk, compares all of it with zeros
and sends either ``WRITE`` or ``WRITE_ZEROES`` (never ``TRIM``: on a qcow2
overlay a TRIM may leave the backing file's bytes visible), then awaits the
client's ``drain()`` so unacknowledged payload stays bounded.  Gap operations
zero ranges without reading them.  When every write is acknowledged it sends
``FLUSH``; only then does :meth:`DiskCopy.run` return, so the caller may
report the change ID.

It owns the byte counters of one disk (:class:`DiskStats`).  It never talks
to vCenter, never prints events (the job reads the counters), and on the
first error it stops issuing requests and raises :class:`CopyError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.backup.extents import Op, OpKind, is_zero
from sna.backup.readers import IDiskReader, ReaderError
from sna.nbd.client import NBDClient
from sna.nbd.errors import ConnectionLost, NBDError

log = Logger()


class CopyError(Exception):
    """Copying one disk failed; the message says where (reading or writing) and why."""

    def __init__(self, disk_key: str, message: str) -> None:
        super().__init__(message)
        self.disk_key = disk_key


@attrs.define
class DiskStats:
    """Byte counters of one disk's copy.

    ``bytes_total`` is what the areas hold (what sna shows as the disk's
    total); ``bytes_done`` counts acknowledged bytes of those areas, so it
    never decreases and ends equal to ``bytes_total``.  Of the areas,
    ``bytes_written`` went as ``WRITE`` and ``bytes_zero`` as
    ``WRITE_ZEROES`` (all-zero chunks).  Outside them, a full zeroes gaps
    (``bytes_zero_filled``) or leaves them (``bytes_skipped``).
    """

    bytes_total: int
    bytes_done: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zero: int = 0
    bytes_zero_filled: int = 0
    bytes_skipped: int = 0
    requests: int = 0


def _describe(error: Optional[BaseException]) -> str:
    if isinstance(error, (NBDError, ReaderError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


class DiskCopy:
    """Run ``ops`` from ``reader`` into ``target`` with ``workers`` reads in flight."""

    def __init__(
        self,
        disk_key: str,
        reader: IDiskReader,
        target: NBDClient,
        target_name: str,
        ops: Iterable[Op],
        stats: DiskStats,
        *,
        workers: int,
        stopped: Callable[[], Optional[str]] = lambda: None,
        name: Optional[str] = None,
    ) -> None:
        #: The key errors carry; ``name`` is how messages call the disk.
        self.disk_key = disk_key
        self._name = name or f"disk {disk_key}"
        self._reader = reader
        self._target = target
        self._target_name = target_name
        self._ops = iter(ops)
        self.stats = stats
        self._workers = max(1, workers)
        self._stopped = stopped
        self._error: Optional[CopyError] = None
        self._writes: set[Deferred[None]] = set()
        #: Reads under way, and waits on the target (drain, FLUSH): what a stall is on.
        self._reading = 0
        self._hub_waits = 0
        self._zeroes_supported = target.info.can_write_zeroes

    def waiting_on(self) -> Optional[str]:
        """What the copy waits for now: ``hub_write`` while the target has writes to
        acknowledge (or a FLUSH), else ``source_read`` while reads are under way."""
        if self._writes or self._hub_waits:
            return "hub_write"
        if self._reading:
            return "source_read"
        return None

    def _fail(self, error: CopyError) -> None:
        if self._error is None:
            self._error = error

    def _track(self, d: Deferred[None], op: Op, kind: str) -> None:
        self._writes.add(d)
        self.stats.requests += 1

        def ok(_: object) -> None:
            self._writes.discard(d)
            stats = self.stats
            if kind == "data":
                stats.bytes_written += op.length
                stats.bytes_done += op.length
            elif kind == "zero":
                stats.bytes_zero += op.length
                stats.bytes_done += op.length
            else:
                stats.bytes_zero_filled += op.length

        def failed(failure: Failure) -> None:
            self._writes.discard(d)
            what = "WRITE_ZEROES" if kind != "data" else "WRITE"
            request = f"{what} of {op.length} bytes at offset {op.offset}"
            if isinstance(failure.value, ConnectionLost):
                message = (
                    f"{self._name}: lost the connection to {self._target_name} "
                    f"({request}: {failure.value})"
                )
            else:
                message = (
                    f"{self._name}: {request} to {self._target_name} failed: "
                    f"{_describe(failure.value)}"
                )
            self._fail(CopyError(self.disk_key, message))

        d.addCallbacks(ok, failed)

    def _zero(self, offset: int, length: int) -> Deferred[None]:
        if self._zeroes_supported:
            return self._target.write_zeroes(offset, length)
        # A target without WRITE_ZEROES gets real zeros (plan() keeps these ops small).
        return self._target.write(offset, bytes(length))

    def _halted(self) -> bool:
        return self._error is not None or self._stopped() is not None

    async def _worker(self) -> None:
        while not self._halted():
            op = next(self._ops, None)
            if op is None:
                return
            if op.kind is OpKind.ZERO:
                self._track(self._zero(op.offset, op.length), op, "gap")
            else:
                self._reading += 1
                try:
                    data = await self._reader.read(op.offset, op.length)
                except Exception as e:
                    self._fail(
                        CopyError(
                            self.disk_key,
                            f"{self._name}: reading {op.length} bytes at offset "
                            f"{op.offset} from {self._reader.description} failed: {_describe(e)}",
                        )
                    )
                    return
                finally:
                    self._reading -= 1
                self.stats.bytes_read += len(data)
                if len(data) != op.length:
                    self._fail(
                        CopyError(
                            self.disk_key,
                            f"{self._name}: the source gave {len(data)} bytes "
                            f"for {op.length} at offset {op.offset}",
                        )
                    )
                    return
                if self._halted():
                    return
                if is_zero(data):
                    self._track(self._zero(op.offset, op.length), op, "zero")
                else:
                    self._track(self._target.write(op.offset, data), op, "data")
            self._hub_waits += 1
            try:
                await self._target.drain()
            except Exception as e:
                self._fail(
                    CopyError(
                        self.disk_key,
                        f"{self._name}: the connection to {self._target_name} "
                        f"failed: {_describe(e)}",
                    )
                )
                return
            finally:
                self._hub_waits -= 1

    async def run(self) -> DiskStats:
        """Copy everything, wait for every acknowledgement, FLUSH; raise :class:`CopyError`."""
        workers = [Deferred.fromCoroutine(self._worker()) for _ in range(self._workers)]
        for ok, value in await DeferredList(workers, consumeErrors=True):
            if not ok and isinstance(value, Failure):
                # A bug, not an I/O error (those are caught in the worker): keep its trace.
                log.failure("{disk}: copy worker crashed", value, disk=self._name)
                self._fail(
                    CopyError(
                        self.disk_key,
                        f"{self._name}: internal error: {value.getErrorMessage()}",
                    )
                )
        while self._writes:
            await DeferredList(list(self._writes), consumeErrors=True)
        if self._error is not None:
            raise self._error
        reason = self._stopped()
        if reason is not None:
            raise CopyError(self.disk_key, reason)
        self._hub_waits += 1
        try:
            await self._target.flush()
        except Exception as e:
            raise CopyError(
                self.disk_key,
                f"{self._name}: FLUSH of {self._target_name} failed: {_describe(e)}",
            ) from None
        finally:
            self._hub_waits -= 1
        return self.stats
