"""The NBD wire protocol, without I/O: constants, encoders, parsers, handshake.

This module owns the bytes of the NBD protocol as the client sees them
(fixed-newstyle handshake and simple-reply transmission), following the
NetworkBlockDevice ``doc/proto.md`` spec and what qemu-nbd 7.2 does.  It never
touches a socket, a reactor or a clock: the handshake is a state machine fed
with whatever bytes arrived, answering with events (bytes to send, the export
found, the end of the session), and the reply parser turns a byte stream into
replies.  `sna.nbd.client` and `sna.nbd.probe` drive it over Twisted; the relay
(`sna.nbd.relay`) may reuse its constants.

Transmission uses *simple* replies only; `NBD_OPT_STRUCTURED_REPLY` is never
negotiated.  The SNA writes backups into qemu-nbd: writes, zeroes, trims and
flushes get simple replies even when structured replies are on, and a simple
READ reply is exactly the bytes asked for, so it can be gathered without
per-chunk headers.  Structured replies only pay off for sparse reads and
``NBD_CMD_BLOCK_STATUS``, which the SNA does not need from its targets; without
them one less reply format can go wrong.  The price is the spec's caveat for
simple READ replies: a server that fails mid-read must hang up, which the
client reports as a lost connection.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Final, Optional, Union

import attrs

from sna.nbd.errors import (
    ConnectionLost,
    ExportNotFound,
    HandshakeError,
    NBDError,
    NotNBDServer,
    OptionError,
    ProtocolError,
)

# -- magics -------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
#: What an oldstyle server sends where a newstyle one sends IHAVEOPT.
OLDSTYLE_MAGIC: Final = 0x00420281861253
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# -- sizes ----------------------------------------------------------------------

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
#: The spec's longest string (export names, error messages).
MAX_STRING: Final = 4096
#: Any option reply longer than this is a broken or hostile server: the
#: longest legitimate one (NBD_REP_SERVER) holds two strings of MAX_STRING.
MAX_OPTION_REPLY: Final = 64 * KiB
#: The largest READ/WRITE payload every server must accept, and the most this
#: client ever puts in one request whatever a server advertises (qemu-nbd's
#: NBD_MAX_BUFFER_SIZE; a larger write makes qemu-nbd 7.2 drop the connection).
SAFE_MAX_PAYLOAD: Final = 32 * MiB
#: The block-size "maximum" meaning "no limit of its own".
UNLIMITED_BLOCK: Final = 0xFFFFFFFF
#: Cap for commands without payload when the server sets no maximum: lengths
#: are u32, and 1 GiB stays aligned to every power-of-two block size.
MAX_NO_PAYLOAD_LENGTH: Final = 1 * GiB
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
MAX_MIN_BLOCK: Final = 64 * KiB

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

GREETING_SIZE: Final = _GREETING.size
OPTION_REPLY_HEADER_SIZE: Final = _OPTION_REPLY.size
REQUEST_HEADER_SIZE: Final = _REQUEST.size
SIMPLE_REPLY_SIZE: Final = _SIMPLE_REPLY.size
_NBDMAGIC_BYTES: Final = NBDMAGIC.to_bytes(8, "big")


# -- numbers with names ---------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    """Sent by the server right after the magics."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """``NBD_FLAG_C_*``: the client's answer to the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11

    @property
    def wire_name(self) -> str:
        return f"NBD_OPT_{self.name}"


#: Bit 31 marks every option error reply.
REP_ERROR_BIT: Final = 1 << 31


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT + 10

    @property
    def wire_name(self) -> str:
        return f"NBD_REP_{self.name}"


class InfoType(enum.IntEnum):
    """``NBD_INFO_*``: what an ``NBD_REP_INFO`` reply carries."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8

    @property
    def wire_name(self) -> str:
        return f"NBD_CMD_{self.name}"


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Errno(enum.IntEnum):
    """The error values the spec allows in a reply (Linux numbering)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def option_name(value: int) -> str:
    try:
        return Option(value).wire_name
    except ValueError:
        return f"NBD_OPT_{value}"


def reply_name(value: int) -> str:
    try:
        return OptionReply(value).wire_name
    except ValueError:
        if value & REP_ERROR_BIT:
            return f"NBD_REP_ERR_{value - REP_ERROR_BIT}"
        return f"NBD_REP_{value}"


def command_name(value: int) -> str:
    try:
        return Command(value).wire_name
    except ValueError:
        return f"NBD_CMD_{value}"


def errno_name(value: int) -> str:
    """``ENOSPC`` for 28; servers may send values the spec does not list."""
    try:
        return Errno(value).name
    except ValueError:
        return f"E{value}"


# -- the export -----------------------------------------------------------------


@attrs.frozen
class ExportInfo:
    """What the server told us about one export.

    Block sizes are the server's ``NBD_INFO_BLOCK_SIZE`` constraints, or the
    spec's defaults when it sent none (with the maximum capped at the safe
    32 MiB rather than "unlimited").
    """

    name: str
    size: int
    transmission_flags: int
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_block: int = SAFE_MAX_PAYLOAD
    #: True when the server does not implement ``NBD_OPT_INFO`` and the export
    #: was only seen in ``NBD_OPT_LIST``: it exists, but its size and flags are
    #: unknown (reported as 0) because learning them would mean entering it.
    listed_only: bool = False

    def _has(self, flag: TransmissionFlag) -> bool:
        # Without HAS_FLAGS the other bits mean nothing (the spec makes it mandatory).
        flags = self.transmission_flags
        return bool(flags & TransmissionFlag.HAS_FLAGS) and bool(flags & flag)

    @property
    def read_only(self) -> bool:
        return self._has(TransmissionFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._has(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._has(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._has(TransmissionFlag.SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def max_payload(self) -> int:
        """The longest READ or WRITE this client sends to this export."""
        return min(self.max_block, SAFE_MAX_PAYLOAD)

    @property
    def max_no_payload(self) -> int:
        """The longest WRITE_ZEROES or TRIM this client sends.

        The spec binds WRITE_ZEROES to an advertised maximum too (TRIM it does
        not, but one rule for both costs only a few 28-byte requests).
        """
        if self.max_block == UNLIMITED_BLOCK:
            return MAX_NO_PAYLOAD_LENGTH
        return min(self.max_block, MAX_NO_PAYLOAD_LENGTH)


# -- encoders -------------------------------------------------------------------


def encode_export_name(export: str) -> bytes:
    name = export.encode("utf-8")
    if len(name) > MAX_STRING:
        raise ValueError(f"export name is {len(name)} bytes; NBD allows at most {MAX_STRING}")
    if b"\0" in name:
        raise ValueError("export name contains a NUL character")
    return name


def encode_client_flags(flags: int) -> bytes:
    return _CLIENT_FLAGS.pack(flags)


def encode_option(option: Option, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def encode_info_request(
    option: Option, export: str, info: tuple[InfoType, ...] = (InfoType.BLOCK_SIZE,)
) -> bytes:
    """An ``NBD_OPT_INFO`` or ``NBD_OPT_GO``: the name, then the info types wanted.

    NBD_INFO_EXPORT is always sent by the server and need not be asked for;
    asking for NBD_INFO_BLOCK_SIZE tells the server we obey its constraints.
    """
    name = encode_export_name(export)
    data = b"".join(
        [_U32.pack(len(name)), name, _U16.pack(len(info)), *(_U16.pack(i) for i in info)]
    )
    return encode_option(option, data)


def encode_request(
    command: Command, handle: int, offset: int, length: int, flags: int = 0
) -> bytes:
    """The 28-byte request header; a WRITE's payload follows it on the wire."""
    try:
        return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)
    except struct.error as e:
        raise ValueError(
            f"{command.wire_name} does not fit the wire format "
            f"(flags={flags}, handle={handle}, offset={offset}, length={length}): {e}"
        ) from None


def decode_request(header: bytes) -> tuple[int, Command, int, int, int]:
    """``(flags, command, handle, offset, length)`` of a request header (for tests and relays)."""
    magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return flags, Command(command), handle, offset, length


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (what a server sends; tests play server with it)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """An option reply (server side; for tests)."""
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    """The fixed-newstyle server greeting (server side; for tests)."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def encode_info_export(size: int, flags: int) -> bytes:
    """The data of an ``NBD_REP_INFO`` carrying ``NBD_INFO_EXPORT`` (for tests)."""
    return _INFO_EXPORT.pack(InfoType.EXPORT, size, flags)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """The data of an ``NBD_REP_INFO`` carrying ``NBD_INFO_BLOCK_SIZE`` (for tests)."""
    return _INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, minimum, preferred, maximum)


def encode_rep_server(name: str, description: str = "") -> bytes:
    """The data of an ``NBD_REP_SERVER`` list entry (for tests)."""
    raw = name.encode("utf-8")
    return _U32.pack(len(raw)) + raw + description.encode("utf-8")


# -- the handshake ----------------------------------------------------------------


class Goal(enum.Enum):
    """What a handshake is for."""

    #: Enter transmission on the export (``NBD_OPT_GO``).
    GO = "go"
    #: Learn about the export without entering it (``NBD_OPT_INFO``), then abort.
    INFO = "info"
    #: List the exports (``NBD_OPT_LIST``), then abort.
    LIST = "list"


@attrs.frozen
class SendBytes:
    """Write these bytes to the server."""

    data: bytes


@attrs.frozen
class ExportReady:
    """``Goal.GO`` succeeded: transmission starts now.

    ``leftover`` is whatever arrived after the last handshake byte; it belongs
    to the transmission phase.
    """

    info: ExportInfo
    leftover: bytes = b""


@attrs.frozen
class ExportInfoReceived:
    """``Goal.INFO`` succeeded; ``NBD_OPT_ABORT`` has been queued to send."""

    info: ExportInfo


@attrs.frozen
class ExportsListed:
    """``Goal.LIST`` succeeded; ``NBD_OPT_ABORT`` has been queued to send."""

    names: tuple[str, ...]


@attrs.frozen
class SessionEnded:
    """The server acknowledged ``NBD_OPT_ABORT``: close the connection."""


HandshakeEvent = Union[SendBytes, ExportReady, ExportInfoReceived, ExportsListed, SessionEnded]


class _State(enum.Enum):
    GREETING = "greeting"
    OPTION_REPLY = "option reply"
    EXPORT_NAME_REPLY = "export name reply"
    ABORTING = "aborting"
    DONE = "done"
    FAILED = "failed"


class ClientHandshake:
    """The client side of the fixed-newstyle handshake, fed with received bytes.

    ``receive_data`` returns the events the bytes caused, in order; the
    caller writes every :class:`SendBytes` and acts on the rest.  Any
    violation raises an :class:`NBDError` subclass and leaves the machine
    failed.  An :class:`OptionError` means the server is still haggling
    properly: the caller should send :func:`abort_option` before closing (the
    spec's soft disconnect); after any other error it just closes.

    Fallbacks for servers without the INFO extension: ``NBD_OPT_GO`` answered
    with ``NBD_REP_ERR_UNSUP`` falls back to ``NBD_OPT_EXPORT_NAME``, and
    ``NBD_OPT_INFO`` to ``NBD_OPT_LIST`` (the export's presence only).
    """

    def __init__(self, export: str = "", goal: Goal = Goal.GO) -> None:
        self.export = export
        self.goal = goal
        self._name = encode_export_name(export)
        self._buffer = bytearray()
        self._state = _State.GREETING
        self._option: Optional[Option] = None
        self._no_zeroes = False
        self._size: Optional[int] = None
        self._flags = 0
        self._block_sizes: Optional[tuple[int, int, int]] = None
        self._listed: list[str] = []
        #: LIST is standing in for an unsupported INFO.
        self._list_for_info = False

    @property
    def finished(self) -> bool:
        """True once the handshake reached its goal (or the abort was answered)."""
        return self._state is _State.DONE

    @property
    def waiting_for(self) -> str:
        """What the machine waits for, for error messages."""
        if self._state in (_State.OPTION_REPLY, _State.ABORTING) and self._option is not None:
            return f"the reply to {self._option.wire_name}"
        return f"the {self._state.value}"

    def receive_data(self, data: bytes) -> list[HandshakeEvent]:
        if self._state in (_State.DONE, _State.FAILED):
            raise HandshakeError(f"{len(data)} unexpected bytes after the handshake ended")
        self._buffer += data
        events: list[HandshakeEvent] = []
        try:
            while self._step(events):
                pass
        except NBDError:
            self._state = _State.FAILED
            raise
        return events

    def connection_lost(self) -> Optional[NBDError]:
        """The error a close at this point means, or None if it was expected."""
        state = self._state
        if state in (_State.DONE, _State.FAILED, _State.ABORTING):
            # After NBD_OPT_ABORT the spec lets a server hang up without the ACK.
            return None
        waiting_for = self.waiting_for
        self._state = _State.FAILED
        if state is _State.GREETING:
            if not self._buffer:
                return ConnectionLost(
                    "the server closed the connection before sending the NBD greeting"
                )
            return HandshakeError(
                f"the server closed the connection {len(self._buffer)} bytes into the greeting"
            )
        if state is _State.EXPORT_NAME_REPLY:
            # NBD_OPT_EXPORT_NAME has no error reply: the spec has the server
            # end the session when it cannot serve the export.
            return ExportNotFound(
                self.export,
                Option.EXPORT_NAME.wire_name,
                "connection closed",
                "the server ended the session instead of opening the export",
            )
        return ConnectionLost(f"the server closed the connection while we waited for {waiting_for}")

    # -- steps ------------------------------------------------------------

    def _step(self, events: list[HandshakeEvent]) -> bool:
        """Consume one message if it is complete; True to try another."""
        if self._state is _State.GREETING:
            return self._greeting(events)
        if self._state in (_State.OPTION_REPLY, _State.ABORTING):
            return self._option_reply(events)
        if self._state is _State.EXPORT_NAME_REPLY:
            return self._export_name_reply(events)
        if self._buffer:
            raise HandshakeError(f"{len(self._buffer)} unexpected bytes after the handshake ended")
        return False

    def _greeting(self, events: list[HandshakeEvent]) -> bool:
        buf = self._buffer
        if len(buf) < GREETING_SIZE:
            # Fail on the first wrong byte: an HTTP server's "HTTP/1.1 400"
            # may be all it ever sends, and it may keep the connection open.
            seen = min(len(buf), len(_NBDMAGIC_BYTES))
            if buf[:seen] != _NBDMAGIC_BYTES[:seen]:
                raise NotNBDServer(bytes(buf))
            return False
        magic, second, flags = _GREETING.unpack_from(buf)
        if magic != NBDMAGIC:
            raise NotNBDServer(bytes(buf))
        if second == OLDSTYLE_MAGIC:
            raise HandshakeError("the server speaks oldstyle NBD, which this client does not")
        if second != IHAVEOPT:
            raise HandshakeError(f"unexpected magic {second:#018x} after NBDMAGIC")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise HandshakeError("the server does not offer fixed-newstyle negotiation")
        del buf[:GREETING_SIZE]
        client_flags = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            # Only when offered: a server must drop a client setting flags it did not offer.
            client_flags |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        if self.goal is Goal.LIST:
            first = self._option_bytes(Option.LIST)
        else:
            first = self._info_option(Option.GO if self.goal is Goal.GO else Option.INFO)
        events.append(SendBytes(encode_client_flags(client_flags) + first))
        self._state = _State.OPTION_REPLY
        return True

    def _info_option(self, option: Option) -> bytes:
        self._option = option
        return encode_info_request(option, self.export)

    def _option_bytes(self, option: Option, data: bytes = b"") -> bytes:
        self._option = option
        return encode_option(option, data)

    def _send(self, events: list[HandshakeEvent], option: Option, data: bytes = b"") -> None:
        events.append(SendBytes(self._option_bytes(option, data)))

    def _send_abort(self, events: list[HandshakeEvent]) -> None:
        self._send(events, Option.ABORT)
        self._state = _State.ABORTING

    def _option_reply(self, events: list[HandshakeEvent]) -> bool:
        buf = self._buffer
        if len(buf) < OPTION_REPLY_HEADER_SIZE:
            return False
        magic, option, reply, length = _OPTION_REPLY.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise HandshakeError(f"bad option reply magic {magic:#x}")
        assert self._option is not None
        if option != self._option:
            raise HandshakeError(
                f"got a reply to {option_name(option)} while waiting for {self.waiting_for}"
            )
        if length > MAX_OPTION_REPLY:
            raise HandshakeError(
                f"{reply_name(reply)} reply to {self._option.wire_name} claims {length} bytes"
            )
        end = OPTION_REPLY_HEADER_SIZE + length
        if len(buf) < end:
            return False
        data = bytes(buf[OPTION_REPLY_HEADER_SIZE:end])
        del buf[:end]
        self._handle_reply(reply, data, events)
        return self._state in (_State.OPTION_REPLY, _State.ABORTING, _State.EXPORT_NAME_REPLY)

    def _handle_reply(self, reply: int, data: bytes, events: list[HandshakeEvent]) -> None:
        option = self._option
        assert option is not None
        if option is Option.ABORT:
            # Any answer to ABORT (the ACK, or an error from an old server) ends it.
            self._state = _State.DONE
            events.append(SessionEnded())
            return
        if reply & REP_ERROR_BIT:
            self._handle_error(option, reply, data.decode("utf-8", "replace"), events)
            return
        if reply == OptionReply.INFO and option in (Option.GO, Option.INFO):
            self._parse_info(data)
        elif reply == OptionReply.SERVER and option is Option.LIST:
            self._listed.append(self._parse_server(data))
        elif reply == OptionReply.ACK and option in (Option.GO, Option.INFO):
            info = self._export_info()
            if option is Option.GO:
                self._state = _State.DONE
                events.append(ExportReady(info, bytes(self._buffer)))
                self._buffer.clear()
            else:
                events.append(ExportInfoReceived(info))
                self._send_abort(events)
        elif reply == OptionReply.ACK and option is Option.LIST:
            names = tuple(self._listed)
            if not self._list_for_info:
                events.append(ExportsListed(names))
            elif self.export in names:
                events.append(ExportInfoReceived(ExportInfo(self.export, 0, 0, listed_only=True)))
            else:
                raise ExportNotFound(
                    self.export,
                    Option.LIST.wire_name,
                    "not listed",
                    f"the server lists {len(names)} other export(s)",
                )
            self._send_abort(events)
        else:
            raise HandshakeError(f"unexpected {reply_name(reply)} reply to {option.wire_name}")

    def _handle_error(
        self, option: Option, reply: int, message: str, events: list[HandshakeEvent]
    ) -> None:
        if reply == OptionReply.ERR_UNSUP and option is Option.GO:
            self._send(events, Option.EXPORT_NAME, self._name)
            self._state = _State.EXPORT_NAME_REPLY
            return
        if reply == OptionReply.ERR_UNSUP and option is Option.INFO:
            self._list_for_info = True
            self._send(events, Option.LIST)
            return
        if reply == OptionReply.ERR_UNKNOWN and option in (Option.GO, Option.INFO):
            raise ExportNotFound(self.export, option.wire_name, reply_name(reply), message)
        raise OptionError(option.wire_name, reply_name(reply), message)

    def _parse_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise HandshakeError(f"NBD_REP_INFO of {len(data)} bytes has no type")
        (kind,) = _U16.unpack_from(data)
        if kind == InfoType.EXPORT:
            if len(data) != _INFO_EXPORT.size:
                raise HandshakeError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            _, self._size, self._flags = _INFO_EXPORT.unpack(data)
        elif kind == InfoType.BLOCK_SIZE:
            if len(data) != _INFO_BLOCK_SIZE.size:
                raise HandshakeError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
            self._block_sizes = _check_block_sizes(minimum, preferred, maximum)
        # Names, descriptions and types from newer specs: the spec says ignore.

    def _parse_server(self, data: bytes) -> str:
        if len(data) < 4:
            raise HandshakeError(f"NBD_REP_SERVER of {len(data)} bytes")
        (length,) = _U32.unpack_from(data)
        if length > len(data) - 4:
            raise HandshakeError(f"NBD_REP_SERVER name of {length} bytes in {len(data)}")
        return data[4 : 4 + length].decode("utf-8", "replace")

    def _export_info(self) -> ExportInfo:
        if self._size is None:
            raise HandshakeError("the server acknowledged without sending NBD_INFO_EXPORT")
        if self._block_sizes is None:
            return ExportInfo(self.export, self._size, self._flags)
        minimum, preferred, maximum = self._block_sizes
        return ExportInfo(self.export, self._size, self._flags, minimum, preferred, maximum)

    def _export_name_reply(self, events: list[HandshakeEvent]) -> bool:
        need = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        if len(self._buffer) < need:
            return False
        size, flags = _EXPORT_NAME_REPLY.unpack_from(self._buffer)
        del self._buffer[:need]
        self._state = _State.DONE
        events.append(ExportReady(ExportInfo(self.export, size, flags), bytes(self._buffer)))
        self._buffer.clear()
        return False


def abort_option() -> bytes:
    """``NBD_OPT_ABORT``: the soft way out of option haggling."""
    return encode_option(Option.ABORT)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_block_sizes(minimum: int, preferred: int, maximum: int) -> tuple[int, int, int]:
    if not _is_power_of_two(minimum) or minimum > MAX_MIN_BLOCK:
        raise HandshakeError(f"invalid minimum block size {minimum}")
    if not _is_power_of_two(preferred) or preferred < minimum:
        raise HandshakeError(f"invalid preferred block size {preferred} (minimum {minimum})")
    if maximum != UNLIMITED_BLOCK and (maximum < minimum or maximum % minimum):
        raise HandshakeError(f"invalid maximum block size {maximum} (minimum {minimum})")
    return minimum, preferred, maximum


# -- transmission replies -----------------------------------------------------------

#: A piece of a READ reply's payload: a received chunk or a view into one.
Chunk = Union[bytes, memoryview]


@attrs.frozen
class SimpleReply:
    handle: int
    error: int
    #: A successful READ's data as received, in order; join to get bytes.
    chunks: tuple[Chunk, ...] = ()


class ReplyParser:
    """Splits the server's transmission stream into simple replies.

    A simple reply does not say how long it is: a successful READ is followed
    by the bytes requested.  ``payload_length(handle)`` answers that for the
    request with that handle (0 for anything but a READ), or None when no
    request has that handle, which is a protocol error.

    Payload bytes are not copied: each reply keeps the received chunks (or
    views into them), so a READ costs one copy in total, when the caller joins.
    """

    def __init__(self, payload_length: Callable[[int], Optional[int]]) -> None:
        self._payload_length = payload_length
        self._header = bytearray()
        self._handle = 0
        self._error = 0
        self._remaining = 0
        self._chunks: list[Chunk] = []
        self._broken: Optional[ProtocolError] = None

    def feed(self, data: bytes) -> list[SimpleReply]:
        if self._broken is not None:
            raise self._broken
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._broken = e
            raise

    def _feed(self, data: bytes) -> list[SimpleReply]:
        replies: list[SimpleReply] = []
        size = len(data)
        pos = 0
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                if pos == 0 and take == size:
                    self._chunks.append(data)
                else:
                    self._chunks.append(memoryview(data)[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    replies.append(SimpleReply(self._handle, 0, tuple(self._chunks)))
                    self._chunks = []
                continue
            if not self._header and size - pos >= SIMPLE_REPLY_SIZE:
                header: Union[bytes, bytearray] = data
                at = pos
                pos += SIMPLE_REPLY_SIZE
            else:
                take = min(SIMPLE_REPLY_SIZE - len(self._header), size - pos)
                self._header += data[pos : pos + take]
                pos += take
                if len(self._header) < SIMPLE_REPLY_SIZE:
                    break
                header, at = self._header, 0
            magic, error, handle = _SIMPLE_REPLY.unpack_from(header, at)
            self._header = bytearray()
            reply = self._start(magic, error, handle)
            if reply is not None:
                replies.append(reply)
        return replies

    def _start(self, magic: int, error: int, handle: int) -> Optional[SimpleReply]:
        if magic == STRUCTURED_REPLY_MAGIC:
            raise ProtocolError("the server sent a structured reply, which was not negotiated")
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic {magic:#010x}")
        length = self._payload_length(handle)
        if length is None:
            raise ProtocolError(f"reply for handle {handle:#x}, which no request has")
        # A failed READ carries no payload: the spec has the server either send
        # none or hang up.
        if error or not length:
            return SimpleReply(handle, error)
        self._handle = handle
        self._remaining = length
        return None
