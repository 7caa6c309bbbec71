"""The exceptions of the NBD client, each naming what the server said.

This module owns only the exception classes; the wire core (`sna.nbd.wire`)
raises them and the Twisted client (`sna.nbd.client`) and probe
(`sna.nbd.probe`) pass them on.  Every one derives from :class:`NBDError`, so
callers can catch the family, and each carries the fields a log line needs
(export, option or command, the server's error name) as attributes rather
than only inside the message.  Nothing here does I/O.
"""

from __future__ import annotations

from sna.logging import printable


class NBDError(Exception):
    """Something went wrong talking NBD; the message is meant for humans."""


class NotNBDServer(NBDError):
    """The peer's first bytes are not the NBD greeting (an HTTP server, say)."""

    def __init__(self, received: bytes) -> None:
        self.received = bytes(received)
        super().__init__(
            f"the peer is not an NBD server: it sent '{printable(self.received[:32])}' "
            "instead of the NBDMAGIC greeting"
        )


class HandshakeError(NBDError):
    """The server broke the handshake protocol or ended it early."""


class ConnectionLost(NBDError):
    """The connection closed before an answer arrived.

    During the handshake this means the server hung up; in transmission every
    request still waiting for its reply fails with this.
    """


class OptionError(HandshakeError):
    """The server answered an option with an ``NBD_REP_ERR_*`` reply."""

    def __init__(self, option: str, reply: str, message: str = "", *, text: str = "") -> None:
        self.option = option
        self.reply = reply
        #: The human text the server sent with its error reply, if any.
        self.server_message = message
        text = text or f"the server answered {option} with {reply}"
        super().__init__(f"{text}: {message}" if message else text)


class ExportNotFound(OptionError):
    """The server has no export of that name (``NBD_REP_ERR_UNKNOWN``)."""

    def __init__(self, export: str, option: str, reply: str, message: str = "") -> None:
        self.export = export
        super().__init__(
            option,
            reply,
            message,
            text=f"the server has no export named {export!r} ({option}: {reply})",
        )


class UnsupportedRequest(NBDError):
    """A request the export does not allow was refused before it was sent.

    The NBD spec forbids sending a command the server did not advertise
    (``NBD_CMD_WRITE_ZEROES`` without ``NBD_FLAG_SEND_WRITE_ZEROES``…) or a
    request not aligned to the advertised minimum block size.
    """


class ProtocolError(NBDError):
    """The server sent something the transmission protocol does not allow."""


class TransmissionError(NBDError):
    """The server answered a request with a nonzero error (``ENOSPC``, ``EPERM``…)."""

    def __init__(self, command: str, offset: int, length: int, errno: int, error: str) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.errno = errno
        #: The server's error by name, e.g. ``"ENOSPC"``.
        self.error = error
        super().__init__(
            f"{command} of {length} bytes at offset {offset} failed: {error} ({errno})"
        )


class ConnectTimeout(NBDError):
    """Connecting and negotiating did not finish within the timeout."""
