"""The VDDK path: one ``nbdkit vddk`` per disk of the snapshot, started and stopped by the client.

``nbdkit vddk`` must be told the snapshot (``snapshot=snapshot-123``), which
exists only once the client has taken it, so the client starts these
servers itself, after the snapshot and before any byte moves, and reads
them with :class:`sna.backup.readers.NbdReader` over a Unix socket.  The
command line is migratekit's (``--exit-with-parent --readonly --foreground
--unix --pidfile``, ``transports=file:nbdssl:nbd`` so SAN is never tried),
except that the password goes through an inherited pipe (``password=-3``),
never on argv, and nbdkit's output goes to our stderr, never to stdout.

This module owns those processes and their socket directory; it does not
read disks or talk to vCenter.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from sna.backup.options import NbdAddress
from sna.backup.reactor import ClientReactor
from sna.backup.vsphere import SnapshotDisk

log = Logger()

#: The fd nbdkit reads the password from (``password=-3``).
PASSWORD_FD = 3
READY_TIMEOUT = 30.0
STOP_GRACE = 5.0


class NbdkitError(Exception):
    """nbdkit could not be started; the message says why."""


class _Process(ProcessProtocol):
    def __init__(self, password: str) -> None:
        self._password = password
        self.ended: Deferred[None] = Deferred()
        self.status: Optional[str] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.writeToChild(PASSWORD_FD, self._password.encode("utf-8"))
        self.transport.closeChildFD(PASSWORD_FD)
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.status = (
            "exited with status 0"
            if reason.check(ProcessDone)
            else reason.getErrorMessage().rstrip(".")
        )
        if not self.ended.called:  # a timed-out wait cancels it
            self.ended.callback(None)


class VddkServers:
    """``nbdkit vddk`` processes, one per disk; :meth:`stop` ends them all."""

    def __init__(
        self,
        reactor: ClientReactor,
        *,
        nbdkit: str,
        libdir: str,
        server: str,
        port: int,
        user: str,
        password: str,
        thumbprint: str,
        vm_moref: str,
        snapshot_moref: str,
        transports: str = "file:nbdssl:nbd",
        compression: Optional[str] = None,
        environ: Mapping[str, str],
    ) -> None:
        self._reactor = reactor
        self._nbdkit = nbdkit
        self._password = password
        self._environ = dict(environ)
        self._params = [
            f"libdir={libdir}",
            f"server={server}",
            f"port={port}",
            f"user={user}",
            f"password=-{PASSWORD_FD}",
            f"thumbprint={thumbprint}",
            f"vm=moref={vm_moref}",
            f"snapshot={snapshot_moref}",
            f"transports={transports}",
        ]
        if compression and compression.lower() != "none":
            self._params.append(f"compression={compression.lower()}")
        self._directory: Optional[str] = None
        self._running: list[tuple[str, Any, _Process]] = []

    def argv(self, disk: SnapshotDisk, socket: str, pidfile: str) -> list[str]:
        return [
            self._nbdkit,
            "--exit-with-parent",
            "--readonly",
            "--foreground",
            f"--unix={socket}",
            f"--pidfile={pidfile}",
            "vddk",
            *self._params,
            f"file={disk.file_name}",
        ]

    async def start(self, disk: SnapshotDisk) -> NbdAddress:
        """Start the server of one disk and wait until it accepts connections."""
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="sbc-nbdkit-")
        socket = os.path.join(self._directory, f"{disk.key}.sock")
        pidfile = os.path.join(self._directory, f"{disk.key}.pid")
        argv = self.argv(disk, socket, pidfile)
        executable = shutil.which(self._nbdkit, path=self._environ.get("PATH"))
        if executable is None:
            raise NbdkitError(f"disk {disk.key}: {self._nbdkit!r} was not found (--nbdkit)")
        process = _Process(self._password)
        log.info(
            "disk {key}: starting {argv}",
            key=disk.key,
            argv=" ".join(a for a in argv if not a.startswith("password=")),
        )
        transport = self._reactor.processes.spawnProcess(
            process,
            executable,
            argv,
            env=self._environ,
            # stdout to our stderr: our stdout carries events only.
            childFDs={0: "w", 1: 2, 2: 2, PASSWORD_FD: "w"},
        )
        self._running.append((disk.key, transport, process))
        waited = 0.0
        while not os.path.exists(pidfile):
            if process.status is not None:
                raise NbdkitError(
                    f"disk {disk.key}: nbdkit vddk {process.status} before it was ready "
                    "(its messages are in the log)"
                )
            if waited >= READY_TIMEOUT:
                raise NbdkitError(
                    f"disk {disk.key}: nbdkit vddk not ready after {READY_TIMEOUT:g} s"
                )
            await deferLater(self._reactor.clock, 0.05, lambda: None)
            waited += 0.05
        return NbdAddress(export="", socket=socket)

    async def stop(self) -> None:
        """TERM every server, KILL what is left after a grace period, remove the sockets."""
        running, self._running = self._running, []
        for _, transport, process in running:
            if process.status is None:
                transport.signalProcess("TERM")
        for key, transport, process in running:
            if process.status is None:
                try:
                    await process.ended.addTimeout(STOP_GRACE, self._reactor.clock)
                except Exception:
                    log.warn("nbdkit of disk {key} ignored TERM; killing it", key=key)
                    try:
                        os.kill(transport.pid, signal.SIGKILL)
                    except (OSError, TypeError):
                        pass
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
