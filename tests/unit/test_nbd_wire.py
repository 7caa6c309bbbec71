"""The NBD core in memory: the sans-IO handshake and parsers, and the Twisted
client and probe driven over ``StringTransport`` / ``MemoryReactorClock``.

The tests play the server with the encoders in `sna.nbd.wire` (plus raw
``struct`` where the point is the exact layout on the wire).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from sna.nbd import wire
from sna.nbd.client import SEND_SLICE, NBDClient, NBDClientProtocol
from sna.nbd.errors import (
    ConnectionLost,
    ExportNotFound,
    HandshakeError,
    NBDError,
    NotNBDServer,
    OptionError,
    ProtocolError,
    TransmissionError,
    UnsupportedRequest,
)
from sna.nbd.probe import (
    REFUSED_GRACE,
    REFUSED_RETRY,
    ProbeFailed,
    ProbeResult,
    probe,
    probe_all,
)
from sna.nbd.wire import (
    ClientHandshake,
    Command,
    CommandFlag,
    ExportInfo,
    ExportInfoReceived,
    ExportReady,
    ExportsListed,
    Goal,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReply,
    ReplyParser,
    SendBytes,
    SessionEnded,
    SimpleReply,
)
from sna.testing import failure_of, result_of

MiB = 1024 * 1024
#: What qemu-nbd 7.2 sends for a writable qcow2 with --shared=1 (verified).
QEMU_FLAGS = 0x0CED
QEMU_BLOCKS = (1, 4096, 32 * MiB)


# -- playing the server ----------------------------------------------------------


def greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return wire.encode_greeting(flags)


def info_replies(
    option: Option,
    size: int = 64 * MiB,
    flags: int = QEMU_FLAGS,
    blocks: Optional[tuple[int, int, int]] = QEMU_BLOCKS,
) -> bytes:
    """INFO(BLOCK_SIZE), INFO(EXPORT), ACK: what qemu-nbd answers to GO/INFO."""
    out = b""
    if blocks is not None:
        out += wire.encode_option_reply(
            option, OptionReply.INFO, wire.encode_info_block_size(*blocks)
        )
    out += wire.encode_option_reply(option, OptionReply.INFO, wire.encode_info_export(size, flags))
    return out + wire.encode_option_reply(option, OptionReply.ACK)


def expected_info_option(option: Option, export: str) -> bytes:
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, InfoType.BLOCK_SIZE)
    return struct.pack(">QII", wire.IHAVEOPT, option, len(data)) + data


def feed(hs: ClientHandshake, data: bytes, bytewise: bool) -> list[wire.HandshakeEvent]:
    if not bytewise:
        return hs.receive_data(data)
    events: list[wire.HandshakeEvent] = []
    for i in range(len(data)):
        events += hs.receive_data(data[i : i + 1])
    return events


def sent(events: list[wire.HandshakeEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, SendBytes))


def others(events: list[wire.HandshakeEvent]) -> list[wire.HandshakeEvent]:
    return [e for e in events if not isinstance(e, SendBytes)]


# -- handshake: success paths ----------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-chunk", "byte-by-byte"])
def test_go_handshake(bytewise: bool) -> None:
    hs = ClientHandshake("disk0", Goal.GO)
    events = feed(hs, greeting(), bytewise)
    assert sent(events) == struct.pack(">I", 0b11) + expected_info_option(Option.GO, "disk0")
    events = feed(hs, info_replies(Option.GO), bytewise)
    assert events == [
        ExportReady(ExportInfo("disk0", 64 * MiB, QEMU_FLAGS, 1, 4096, 32 * MiB), b"")
    ]
    assert hs.finished


def test_go_keeps_bytes_that_follow_the_ack() -> None:
    hs = ClientHandshake("disk0")
    hs.receive_data(greeting())
    reply = wire.encode_simple_reply(7)
    (event,) = hs.receive_data(info_replies(Option.GO) + reply)
    assert isinstance(event, ExportReady)
    assert event.leftover == reply


def test_client_sets_no_zeroes_only_when_offered() -> None:
    hs = ClientHandshake("disk0")
    events = hs.receive_data(greeting(HandshakeFlag.FIXED_NEWSTYLE))
    assert sent(events)[:4] == struct.pack(">I", wire.ClientFlag.FIXED_NEWSTYLE)


def test_unknown_handshake_flags_are_ignored() -> None:
    hs = ClientHandshake("disk0")
    events = hs.receive_data(greeting(0x8003))
    assert sent(events)[:4] == struct.pack(">I", 0b11)


def test_go_without_block_size_info_uses_safe_defaults() -> None:
    hs = ClientHandshake("disk0")
    hs.receive_data(greeting())
    (event,) = hs.receive_data(info_replies(Option.GO, blocks=None))
    assert isinstance(event, ExportReady)
    assert (event.info.min_block, event.info.preferred_block, event.info.max_block) == (
        1,
        4096,
        32 * MiB,
    )


def test_info_names_and_unknown_info_types_are_ignored() -> None:
    hs = ClientHandshake("disk0")
    hs.receive_data(greeting())
    noise = wire.encode_option_reply(
        Option.GO, OptionReply.INFO, struct.pack(">H", InfoType.NAME) + b"disk0"
    ) + wire.encode_option_reply(Option.GO, OptionReply.INFO, struct.pack(">H", 99) + b"?")
    (event,) = hs.receive_data(noise + info_replies(Option.GO))
    assert isinstance(event, ExportReady)


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-chunk", "byte-by-byte"])
def test_info_then_abort(bytewise: bool) -> None:
    hs = ClientHandshake("disk0", Goal.INFO)
    first = feed(hs, greeting(), bytewise)
    assert sent(first)[4:] == expected_info_option(Option.INFO, "disk0")
    events = feed(hs, info_replies(Option.INFO), bytewise)
    assert others(events) == [
        ExportInfoReceived(ExportInfo("disk0", 64 * MiB, QEMU_FLAGS, 1, 4096, 32 * MiB))
    ]
    assert sent(events) == struct.pack(">QII", wire.IHAVEOPT, Option.ABORT, 0)
    assert not hs.finished
    assert feed(hs, wire.encode_option_reply(Option.ABORT, OptionReply.ACK), bytewise) == [
        SessionEnded()
    ]
    assert hs.finished
    assert hs.connection_lost() is None


def test_server_may_close_instead_of_acking_abort() -> None:
    hs = ClientHandshake("disk0", Goal.INFO)
    hs.receive_data(greeting())
    hs.receive_data(info_replies(Option.INFO))
    assert hs.connection_lost() is None


def test_list() -> None:
    hs = ClientHandshake(goal=Goal.LIST)
    events = hs.receive_data(greeting())
    assert sent(events)[4:] == struct.pack(">QII", wire.IHAVEOPT, Option.LIST, 0)
    replies = (
        wire.encode_option_reply(Option.LIST, OptionReply.SERVER, wire.encode_rep_server("a"))
        + wire.encode_option_reply(
            Option.LIST, OptionReply.SERVER, wire.encode_rep_server("b", "second disk")
        )
        + wire.encode_option_reply(Option.LIST, OptionReply.ACK)
    )
    events = hs.receive_data(replies)
    assert others(events) == [ExportsListed(("a", "b"))]
    assert sent(events) == wire.abort_option()


def test_info_unsupported_falls_back_to_list() -> None:
    hs = ClientHandshake("disk1", Goal.INFO)
    hs.receive_data(greeting())
    events = hs.receive_data(wire.encode_option_reply(Option.INFO, OptionReply.ERR_UNSUP))
    assert sent(events) == struct.pack(">QII", wire.IHAVEOPT, Option.LIST, 0)
    listing = b"".join(
        wire.encode_option_reply(Option.LIST, OptionReply.SERVER, wire.encode_rep_server(n))
        for n in ("disk0", "disk1")
    ) + wire.encode_option_reply(Option.LIST, OptionReply.ACK)
    events = hs.receive_data(listing)
    assert others(events) == [ExportInfoReceived(ExportInfo("disk1", 0, 0, listed_only=True))]
    assert sent(events) == wire.abort_option()


def test_list_fallback_without_the_export_is_export_not_found() -> None:
    hs = ClientHandshake("disk9", Goal.INFO)
    hs.receive_data(greeting())
    hs.receive_data(wire.encode_option_reply(Option.INFO, OptionReply.ERR_UNSUP))
    listing = wire.encode_option_reply(
        Option.LIST, OptionReply.SERVER, wire.encode_rep_server("disk0")
    ) + wire.encode_option_reply(Option.LIST, OptionReply.ACK)
    with pytest.raises(ExportNotFound) as caught:
        hs.receive_data(listing)
    assert caught.value.export == "disk9"


@pytest.mark.parametrize("zeroes", [False, True], ids=["no-zeroes", "with-zeroes"])
def test_go_unsupported_falls_back_to_export_name(zeroes: bool) -> None:
    hs = ClientHandshake("disk0")
    flags = HandshakeFlag.FIXED_NEWSTYLE | (0 if zeroes else HandshakeFlag.NO_ZEROES)
    hs.receive_data(greeting(flags))
    events = hs.receive_data(wire.encode_option_reply(Option.GO, OptionReply.ERR_UNSUP))
    assert sent(events) == struct.pack(">QII", wire.IHAVEOPT, Option.EXPORT_NAME, 5) + b"disk0"
    answer = struct.pack(">QH", 10 * MiB, 0x0003) + (b"\0" * 124 if zeroes else b"")
    assert feed(hs, answer, bytewise=True) == [
        ExportReady(ExportInfo("disk0", 10 * MiB, 0x0003), b"")
    ]


def test_export_name_refused_by_hanging_up_is_export_not_found() -> None:
    hs = ClientHandshake("nope")
    hs.receive_data(greeting())
    hs.receive_data(wire.encode_option_reply(Option.GO, OptionReply.ERR_UNSUP))
    lost = hs.connection_lost()
    assert isinstance(lost, ExportNotFound)
    assert lost.export == "nope"


# -- handshake: failures ---------------------------------------------------------------


def test_unknown_export_names_it_and_keeps_the_servers_message() -> None:
    hs = ClientHandshake("nope")
    hs.receive_data(greeting())
    with pytest.raises(ExportNotFound) as caught:
        hs.receive_data(
            wire.encode_option_reply(
                Option.GO, OptionReply.ERR_UNKNOWN, b"export 'nope' not present"
            )
        )
    error = caught.value
    assert error.export == "nope"
    assert error.reply == "NBD_REP_ERR_UNKNOWN"
    assert error.option == "NBD_OPT_GO"
    assert error.server_message == "export 'nope' not present"
    assert "'nope'" in str(error)


@pytest.mark.parametrize(
    "reply",
    [OptionReply.ERR_POLICY, OptionReply.ERR_TLS_REQD, OptionReply.ERR_SHUTDOWN, 0x80000063],
)
def test_other_option_errors_are_named(reply: int) -> None:
    hs = ClientHandshake("disk0")
    hs.receive_data(greeting())
    with pytest.raises(OptionError) as caught:
        hs.receive_data(wire.encode_option_reply(Option.GO, reply, b"go away"))
    assert not isinstance(caught.value, ExportNotFound)
    assert caught.value.reply == wire.reply_name(reply)
    assert caught.value.reply.startswith("NBD_REP_ERR_")
    assert "go away" in str(caught.value)


def test_an_http_server_is_not_nbd_from_its_first_byte() -> None:
    hs = ClientHandshake("disk0")
    with pytest.raises(NotNBDServer) as caught:
        hs.receive_data(b"H")
    assert caught.value.received == b"H"
    hs = ClientHandshake("disk0")
    with pytest.raises(NotNBDServer) as caught:
        hs.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert b"HTTP/1.1 400" in caught.value.received


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (struct.pack(">QQ", wire.NBDMAGIC, wire.OLDSTYLE_MAGIC) + b"\0" * 8, "oldstyle"),
        (struct.pack(">QQH", wire.NBDMAGIC, 0x1234, 1), "unexpected magic"),
        (wire.encode_greeting(HandshakeFlag.NO_ZEROES), "fixed-newstyle"),
    ],
)
def test_bad_greetings(data: bytes, words: str) -> None:
    with pytest.raises(HandshakeError, match=words):
        ClientHandshake("disk0").receive_data(data)


@pytest.mark.parametrize(
    "reply",
    [
        struct.pack(">QIII", 0xDEADBEEF, Option.GO, OptionReply.ACK, 0),
        wire.encode_option_reply(Option.LIST, OptionReply.ACK),
        wire.encode_option_reply(Option.GO, OptionReply.SERVER, wire.encode_rep_server("x")),
        wire.encode_option_reply(Option.GO, OptionReply.ACK),  # no NBD_INFO_EXPORT first
        wire.encode_option_reply(Option.GO, OptionReply.INFO, b"\0"),
        wire.encode_option_reply(Option.GO, OptionReply.INFO, wire.encode_info_export(1, 1) + b"!"),
        wire.encode_option_reply(
            Option.GO, OptionReply.INFO, wire.encode_info_block_size(3, 4096, 32 * MiB)
        ),
        wire.encode_option_reply(
            Option.GO, OptionReply.INFO, wire.encode_info_block_size(512, 256, 32 * MiB)
        ),
        wire.encode_option_reply(
            Option.GO, OptionReply.INFO, wire.encode_info_block_size(512, 4096, 1000)
        ),
        struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, Option.GO, OptionReply.INFO, 1 << 30),
    ],
    ids=[
        "magic",
        "other-option",
        "server-to-go",
        "ack-without-export",
        "short-info",
        "long-export-info",
        "min-not-power-of-2",
        "preferred-below-min",
        "max-not-multiple",
        "huge-length",
    ],
)
def test_bad_option_replies(reply: bytes) -> None:
    hs = ClientHandshake("disk0")
    hs.receive_data(greeting())
    with pytest.raises(HandshakeError):
        hs.receive_data(reply)
    with pytest.raises(HandshakeError):
        hs.receive_data(b"more")


def test_connection_lost_at_each_stage() -> None:
    assert isinstance(ClientHandshake("d").connection_lost(), ConnectionLost)
    partial = ClientHandshake("d")
    partial.receive_data(greeting()[:5])
    assert isinstance(partial.connection_lost(), HandshakeError)
    waiting = ClientHandshake("d")
    waiting.receive_data(greeting())
    lost = waiting.connection_lost()
    assert isinstance(lost, ConnectionLost)
    assert "NBD_OPT_GO" in str(lost)
    done = ClientHandshake("d")
    done.receive_data(greeting() + info_replies(Option.GO))
    assert done.connection_lost() is None


def test_export_names_are_checked() -> None:
    with pytest.raises(ValueError):
        ClientHandshake("x" * 4097)
    with pytest.raises(ValueError):
        ClientHandshake("a\0b")


# -- handshake: fuzzing ------------------------------------------------------------------

_REPLY_TYPES = st.sampled_from([int(r) for r in OptionReply] + [0, 5, 0x80000000, 0xFFFFFFFF])
_OPTIONS = st.sampled_from([int(o) for o in Option] + [0, 42])


@st.composite
def option_replies(draw: st.DrawFn) -> bytes:
    """Mostly well-framed option replies with arbitrary contents."""
    data = draw(st.binary(max_size=40))
    option = draw(_OPTIONS)
    reply = draw(_REPLY_TYPES)
    if draw(st.booleans()):
        kind = draw(st.sampled_from([0, 1, 3, 7]))
        data = struct.pack(">H", kind) + data
    length = len(data) if draw(st.integers(0, 9)) else draw(st.integers(0, 0xFFFFFFFF))
    return struct.pack(">QIII", wire.OPTION_REPLY_MAGIC, option, reply, length) + data


@st.composite
def server_streams(draw: st.DrawFn) -> bytes:
    head = draw(st.sampled_from([greeting(), greeting(HandshakeFlag.FIXED_NEWSTYLE), b""]))
    body = b"".join(draw(st.lists(option_replies(), max_size=6)))
    tail = draw(st.binary(max_size=30))
    return head + body + tail


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    goal=st.sampled_from(list(Goal)),
    stream=st.one_of(st.binary(max_size=200), server_streams()),
    cuts=st.lists(st.integers(1, 50), max_size=20),
)
def test_handshake_raises_only_nbd_errors(goal: Goal, stream: bytes, cuts: list[int]) -> None:
    hs = ClientHandshake("disk0", goal)
    pieces = []
    rest = stream
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    try:
        for piece in pieces:
            for event in hs.receive_data(piece):
                assert isinstance(
                    event, (SendBytes, ExportReady, ExportInfoReceived, ExportsListed, SessionEnded)
                )
    except NBDError:
        pass
    lost = hs.connection_lost()
    assert lost is None or isinstance(lost, NBDError)


# -- transmission: encoding and replies -------------------------------------------------


@pytest.mark.parametrize("command", list(Command))
def test_every_command_encodes_to_the_spec_layout(command: Command) -> None:
    flags = CommandFlag.FUA | CommandFlag.NO_HOLE
    header = wire.encode_request(command, 0x0102030405060708, 1 << 40, 4096, flags)
    assert len(header) == 28
    assert header[:4] == bytes.fromhex("25609513")
    assert struct.unpack(">HHQQI", header[4:]) == (3, command, 0x0102030405060708, 1 << 40, 4096)
    assert wire.decode_request(header) == (3, command, 0x0102030405060708, 1 << 40, 4096)


def test_requests_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError):
        wire.encode_request(Command.WRITE, 1, 0, 1 << 32)
    with pytest.raises(ValueError):
        wire.encode_request(Command.READ, 1, -1, 1)


def test_names() -> None:
    assert wire.errno_name(28) == "ENOSPC"
    assert wire.errno_name(1) == "EPERM"
    assert wire.errno_name(22) == "EINVAL"
    assert wire.errno_name(99) == "E99"
    assert wire.reply_name(OptionReply.ERR_UNKNOWN) == "NBD_REP_ERR_UNKNOWN"
    assert wire.reply_name(0x80000063) == "NBD_REP_ERR_99"
    assert wire.option_name(7) == "NBD_OPT_GO"
    assert wire.command_name(6) == "NBD_CMD_WRITE_ZEROES"
    assert wire.command_name(77) == "NBD_CMD_77"


def test_export_info_helpers() -> None:
    info = ExportInfo("d", 1, QEMU_FLAGS)
    assert (info.read_only, info.can_flush, info.can_fua, info.can_trim) == (
        False,
        True,
        True,
        True,
    )
    assert info.can_write_zeroes and not info.can_multi_conn
    assert ExportInfo("d", 1, 0x0D6D).can_multi_conn
    assert ExportInfo("d", 1, 0x0003).read_only
    # Without HAS_FLAGS no bit counts.
    assert not ExportInfo("d", 1, 0x0002).read_only
    assert ExportInfo("d", 1, 1, max_block=wire.UNLIMITED_BLOCK).max_payload == 32 * MiB
    assert ExportInfo("d", 1, 1, max_block=wire.UNLIMITED_BLOCK).max_no_payload == 1 << 30
    assert ExportInfo("d", 1, 1, max_block=1 * MiB).max_no_payload == 1 * MiB


def reads(lengths: dict[int, int]) -> Callable[[int], Optional[int]]:
    return lengths.get


def test_reply_parser_in_one_chunk_and_byte_by_byte() -> None:
    data = os.urandom(1000)
    stream = (
        wire.encode_simple_reply(1)
        + wire.encode_simple_reply(2)
        + data
        + wire.encode_simple_reply(3, 28)
    )
    lengths = {1: 0, 2: 1000, 3: 4096}
    whole = ReplyParser(reads(lengths)).feed(stream)
    parser = ReplyParser(reads(lengths))
    bytewise: list[SimpleReply] = []
    for i in range(len(stream)):
        bytewise += parser.feed(stream[i : i + 1])
    for replies in (whole, bytewise):
        assert [(r.handle, r.error) for r in replies] == [(1, 0), (2, 0), (3, 28)]
        assert b"".join(replies[1].chunks) == data
        # A failed READ carries no payload.
        assert replies[2].chunks == ()


def test_reply_parser_keeps_received_chunks_without_copying() -> None:
    payload = os.urandom(64 * 1024)
    parser = ReplyParser(reads({5: len(payload)}))
    assert parser.feed(wire.encode_simple_reply(5)) == []
    (reply,) = parser.feed(payload)
    assert reply.chunks[0] is payload


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (wire.encode_simple_reply(9), "no request"),
        (struct.pack(">IHHQI", wire.STRUCTURED_REPLY_MAGIC, 1, 1, 1, 0), "structured"),
        (struct.pack(">IIQ", 0x12345678, 0, 1), "magic"),
    ],
)
def test_reply_parser_protocol_errors(stream: bytes, words: str) -> None:
    parser = ReplyParser(reads({1: 0}))
    with pytest.raises(ProtocolError, match=words):
        parser.feed(stream)
    with pytest.raises(ProtocolError):
        parser.feed(b"")


# -- the Twisted client over StringTransport --------------------------------------------


class Server:
    """Decodes what the client wrote, and answers as a server would."""

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self._seen = 0

    def requests(self) -> list[tuple[int, Command, int, int, int, bytes]]:
        """New requests since the last call: (flags, command, handle, offset, length, payload)."""
        raw = self.transport.value()
        found = []
        pos = self._seen
        while pos < len(raw):
            flags, command, handle, offset, length = wire.decode_request(raw[pos : pos + 28])
            pos += 28
            payload = b""
            if command is Command.WRITE:
                payload = raw[pos : pos + length]
                pos += length
            found.append((flags, command, handle, offset, length, payload))
        self._seen = pos
        return found


def open_client(
    flags: int = QEMU_FLAGS,
    blocks: Optional[tuple[int, int, int]] = QEMU_BLOCKS,
    size: int = 1 << 30,
    max_in_flight: int = 64 * MiB,
) -> tuple[NBDClient, NBDClientProtocol, StringTransport, Server]:
    protocol = NBDClientProtocol("disk0", max_in_flight)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.producer is protocol
    protocol.dataReceived(greeting())
    assert transport.value() == struct.pack(">I", 0b11) + expected_info_option(Option.GO, "disk0")
    transport.clear()
    protocol.dataReceived(info_replies(Option.GO, size, flags, blocks))
    info = result_of(protocol.ready)
    assert isinstance(info, ExportInfo)
    return NBDClient(protocol, info), protocol, transport, Server(transport)


def test_replies_out_of_order_reach_their_requests() -> None:
    client, protocol, _, server = open_client()
    d1 = client.read(0, 100)
    d2 = client.read(4096, 10)
    d3 = client.write(8192, b"abc")
    d4 = client.flush()
    sent_ = server.requests()
    assert [r[1] for r in sent_] == [Command.READ, Command.READ, Command.WRITE, Command.FLUSH]
    assert protocol.pending_requests == 4
    h1, h2, h3, h4 = (r[2] for r in sent_)
    assert len({h1, h2, h3, h4}) == 4
    assert sent_[2][5] == b"abc"
    first, second = os.urandom(100), os.urandom(10)
    protocol.dataReceived(
        wire.encode_simple_reply(h4)
        + wire.encode_simple_reply(h2)
        + second
        + wire.encode_simple_reply(h3)
    )
    assert result_of(d4) is None
    assert result_of(d3) is None
    assert result_of(d2) == second
    assert not d1.called
    protocol.dataReceived(wire.encode_simple_reply(h1) + first[:7])
    assert not d1.called
    protocol.dataReceived(first[7:])
    assert result_of(d1) == first
    assert protocol.pending_requests == 0


def test_an_oversize_write_is_split_on_block_boundaries() -> None:
    client, _, _, server = open_client()
    data = os.urandom(48 * MiB + 12345)
    offset = 4096 * 3 + 77
    d = client.write(offset, data)
    pieces = server.requests()
    assert len(pieces) == 2
    assert all(length <= 32 * MiB for _, _, _, _, length, _ in pieces)
    assert pieces[0][3] == offset
    # The cut lands on a preferred-block boundary, and the pieces tile the range.
    assert pieces[1][3] % 4096 == 0
    assert pieces[0][3] + pieces[0][4] == pieces[1][3]
    assert pieces[1][3] + pieces[1][4] == offset + len(data)
    assert b"".join(p[5] for p in pieces) == data
    assert not d.called


def test_split_follows_advertised_block_sizes() -> None:
    client, _, _, server = open_client(blocks=(512, 64 * 1024, 1 * MiB))
    client.write(512 * 3, bytes(3 * MiB))
    pieces = [(offset, length) for _, _, _, offset, length, _ in server.requests()]
    # Cut at 64 KiB multiples of the absolute offset, each piece at most 1 MiB.
    assert pieces == [(1536, MiB - 1536), (MiB, MiB), (2 * MiB, MiB), (3 * MiB, 1536)]


def test_a_split_read_is_joined_in_order() -> None:
    client, protocol, _, server = open_client(blocks=(1, 4096, 1 * MiB))
    data = os.urandom(2 * MiB + 100)
    d = client.read(10, len(data))
    pieces = server.requests()
    assert len(pieces) == 3
    at = 0
    answers = []
    for _, _, handle, _, length, _ in pieces:
        answers.append(wire.encode_simple_reply(handle) + data[at : at + length])
        at += length
    protocol.dataReceived(b"".join(reversed(answers)))
    assert result_of(d) == data


def test_zero_trim_and_flags() -> None:
    client, _, _, server = open_client()
    client.write_zeroes(0, 100 * MiB, no_hole=True)
    client.write_zeroes(0, 4096, fua=True)
    client.trim(0, 4096)
    client.write(0, b"x", fua=True)
    found = server.requests()
    zeroes = [r for r in found if r[1] is Command.WRITE_ZEROES]
    # WRITE_ZEROES obeys the advertised maximum even without a payload.
    assert [r[4] for r in zeroes] == [32 * MiB] * 3 + [4 * MiB, 4096]
    assert all(r[0] == CommandFlag.NO_HOLE for r in zeroes[:4])
    assert zeroes[4][0] == CommandFlag.FUA
    assert [r[0] for r in found if r[1] is Command.TRIM] == [0]
    assert [r[0] for r in found if r[1] is Command.WRITE] == [CommandFlag.FUA]


def test_error_replies_name_the_error() -> None:
    client, protocol, _, server = open_client()
    d = client.write(1 << 30, b"late")
    (request,) = server.requests()
    protocol.dataReceived(wire.encode_simple_reply(request[2], 28))
    error = failure_of(d, TransmissionError)
    assert isinstance(error, TransmissionError)
    assert (error.command, error.offset, error.length, error.error) == (
        "NBD_CMD_WRITE",
        1 << 30,
        4,
        "ENOSPC",
    )
    assert "ENOSPC" in str(error)


def test_the_first_error_of_a_split_request_is_reported() -> None:
    client, protocol, _, server = open_client(blocks=(1, 4096, 1 * MiB))
    d = client.write(0, bytes(2 * MiB))
    first, second = server.requests()
    protocol.dataReceived(wire.encode_simple_reply(second[2], 1))
    assert failure_of(d, TransmissionError).error == "EPERM"  # type: ignore[attr-defined]
    protocol.dataReceived(wire.encode_simple_reply(first[2]))
    assert protocol.pending_requests == 0


def test_connection_loss_fails_everything_pending() -> None:
    client, protocol, _, server = open_client(max_in_flight=1 * MiB)
    reads = [client.read(i * 4096, 4096) for i in range(5)]
    write = client.write(0, bytes(2 * MiB))
    drained = client.drain()
    server.requests()
    protocol.connectionLost(Failure(ConnectionDone("bye")))
    for d in [*reads, write, drained]:
        failure_of(d, ConnectionLost)
    assert client.in_flight_bytes == 0
    failure_of(client.read(0, 1), ConnectionLost)
    failure_of(client.drain(), ConnectionLost)
    assert result_of(client.close()) is None


def test_a_protocol_error_drops_the_connection() -> None:
    client, protocol, transport, _ = open_client()
    d = client.read(0, 10)
    protocol.dataReceived(wire.encode_simple_reply(0xBAD))
    assert transport.disconnected  # aborted, not a soft close
    protocol.connectionLost(Failure(ConnectionDone()))
    error = failure_of(d, ConnectionLost)
    assert "no request" in str(error)


def test_drain_waits_for_room_under_the_limit() -> None:
    client, protocol, _, server = open_client(max_in_flight=8 * MiB)
    assert result_of(client.drain()) is None
    client.write(0, bytes(4 * MiB))
    assert client.drain().called
    client.write(4 * MiB, bytes(4 * MiB))
    assert client.in_flight_bytes == 8 * MiB
    waiting = client.drain()
    assert not waiting.called
    first, _ = server.requests()
    protocol.dataReceived(wire.encode_simple_reply(first[2]))
    assert result_of(waiting) is None
    assert client.in_flight_bytes == 4 * MiB


def test_refused_before_sending() -> None:
    client, _, transport, _ = open_client(flags=0x0001, blocks=(512, 4096, 32 * MiB))
    for d in (
        client.write_zeroes(0, 512),
        client.trim(0, 512),
        client.flush(),
        client.write(0, b"x" * 512, fua=True),
        client.write(1, b"x" * 512),
        client.read(0, 100),
        client.read(-512, 512),
    ):
        failure_of(d, UnsupportedRequest)
    assert transport.value() == b""


def test_writes_to_a_read_only_export_go_to_the_server() -> None:
    # The server's EPERM is the authoritative answer, so it is asked.
    client, _, _, server = open_client(flags=0x0003)
    assert client.info.read_only
    client.write(0, b"x")
    assert [r[1] for r in server.requests()] == [Command.WRITE]


def test_close_waits_for_replies_then_disconnects() -> None:
    client, protocol, transport, server = open_client()
    write = client.write(0, b"data")
    closed = client.close()
    failure_of(client.read(0, 1), ConnectionLost)
    (request,) = server.requests()
    assert not transport.disconnecting
    protocol.dataReceived(wire.encode_simple_reply(request[2]))
    assert result_of(write) is None
    (disc,) = server.requests()
    assert disc[1] is Command.DISC
    assert transport.disconnecting
    assert transport.producer is None
    assert not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(closed) is None


def test_writes_follow_the_transports_pace() -> None:
    client, protocol, transport, server = open_client()
    protocol.pauseProducing()
    data = os.urandom(3 * MiB)
    client.write(100, data)
    assert transport.value() == b""
    writes: list[int] = []
    real_write = transport.write

    def recording_write(chunk: bytes) -> None:
        writes.append(len(chunk))
        real_write(chunk)
        protocol.pauseProducing()  # a full buffer, as a TCP transport would say

    transport.write = recording_write  # type: ignore[method-assign]
    while len(writes) < 10 and sum(writes) < 28 + len(data):
        protocol.resumeProducing()
    assert all(size <= SEND_SLICE for size in writes)
    assert sum(writes) == 28 + len(data)
    ((_, _, _, offset, length, payload),) = server.requests()
    assert (offset, length, payload) == (100, len(data), data)


def test_handshake_failure_aborts_softly() -> None:
    protocol = NBDClientProtocol("nope")
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(greeting())
    transport.clear()
    protocol.dataReceived(wire.encode_option_reply(Option.GO, OptionReply.ERR_UNKNOWN))
    assert transport.value() == wire.abort_option()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    failure_of(protocol.ready, ExportNotFound)


def test_cancelling_the_handshake_drops_the_connection() -> None:
    protocol = NBDClientProtocol("disk0")
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.ready.addErrback(lambda _: None)
    protocol.ready.cancel()
    assert transport.disconnected
    protocol.connectionLost(Failure(ConnectionDone()))


# -- the probe over MemoryReactorClock ---------------------------------------------------


def connected_probe(reactor: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """Complete the probe's pending TCP connect with a StringTransport."""
    _, _, factory, _, _ = reactor.tcpClients[-1]
    assert isinstance(factory, ClientFactory)
    protocol: Any = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_probe_answers_then_aborts() -> None:
    reactor = MemoryReactorClock()
    d = probe(reactor, "127.0.0.1", 10100, "disk0")
    fired: list[object] = []

    def record(result: object) -> object:
        fired.append(result)
        return result

    d.addBoth(record)
    protocol, transport = connected_probe(reactor)
    protocol.dataReceived(greeting())
    assert transport.value()[4:] == expected_info_option(Option.INFO, "disk0")
    transport.clear()
    protocol.dataReceived(info_replies(Option.INFO))
    assert transport.value() == wire.abort_option()
    protocol.dataReceived(wire.encode_option_reply(Option.ABORT, OptionReply.ACK))
    assert transport.disconnecting
    # The answer comes once the connection is really closed.
    assert not fired
    protocol.connectionLost(Failure(ConnectionDone()))
    info = result_of(d)
    assert isinstance(info, ExportInfo)
    assert info.size == 64 * MiB


def test_probe_timeout_drops_the_connection() -> None:
    reactor = MemoryReactorClock()
    d = probe(reactor, "127.0.0.1", 10100, "disk0", timeout=0.5)
    protocol, transport = connected_probe(reactor)
    reactor.advance(0.5)
    assert transport.disconnected
    error = failure_of(d, ProbeFailed)
    assert isinstance(error, ProbeFailed)
    assert error.reason == "timeout"
    assert "127.0.0.1:10100" in error.message and "'disk0'" in error.message
    protocol.connectionLost(Failure(ConnectionDone()))


def test_probe_timeout_while_connecting() -> None:
    reactor = MemoryReactorClock()
    d = probe(reactor, "127.0.0.1", 10100, "disk0", timeout=2)
    reactor.advance(2)
    error = failure_of(d, ProbeFailed)
    assert error.reason == "timeout"  # type: ignore[attr-defined]


def test_probe_keeps_an_answer_whose_abort_was_never_acknowledged() -> None:
    reactor = MemoryReactorClock()
    d = probe(reactor, "127.0.0.1", 10100, "disk0", timeout=1)
    protocol, transport = connected_probe(reactor)
    protocol.dataReceived(greeting() + info_replies(Option.INFO))
    reactor.advance(1)
    assert transport.disconnected
    assert isinstance(result_of(d), ExportInfo)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not_nbd"),
        (
            greeting() + wire.encode_option_reply(Option.INFO, OptionReply.ERR_UNKNOWN, b"no"),
            "export_missing",
        ),
        (
            greeting() + wire.encode_option_reply(Option.INFO, OptionReply.ERR_POLICY),
            "handshake_error",
        ),
        (greeting()[:10], "handshake_error"),
        (b"", "handshake_error"),
    ],
    ids=["http", "missing", "policy", "truncated", "silent-close"],
)
def test_probe_failures_are_classified(answer: bytes, reason: str) -> None:
    reactor = MemoryReactorClock()
    d = probe(reactor, "127.0.0.1", 10100, "disk0")
    protocol, _ = connected_probe(reactor)
    protocol.dataReceived(answer)
    protocol.connectionLost(Failure(ConnectionDone()))
    error = failure_of(d, ProbeFailed)
    assert error.reason == reason  # type: ignore[attr-defined]


def test_probe_all_reports_each_target_in_order() -> None:
    from sna.jobs.model import NbdTarget

    reactor = MemoryReactorClock()
    targets = [NbdTarget("2000", "127.0.0.1", 10100, "a"), NbdTarget("2001", "::1", 10101, "b")]
    d = probe_all(reactor, targets, timeout=3)
    first = reactor.tcpClients[0]
    second = reactor.tcpClients[1]
    assert (first[0], first[1], second[0], second[1]) == ("127.0.0.1", 10100, "::1", 10101)
    second[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    protocol = first[2].buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(greeting() + info_replies(Option.INFO))
    protocol.connectionLost(Failure(ConnectionDone()))
    # Refused is asked again, with growing pauses, for REFUSED_GRACE seconds.
    attempts = 1
    while not d.called:
        reactor.advance(0.01)
        while len(reactor.tcpClients) > 1 + attempts:
            reactor.tcpClients[1 + attempts][2].clientConnectionFailed(
                None, Failure(ConnectionRefusedError())
            )
            attempts += 1
    assert reactor.seconds() <= REFUSED_GRACE and attempts >= 4
    results = result_of(d)
    assert [r.target for r in results] == targets
    assert isinstance(results[0], ProbeResult) and results[0].ok
    assert results[0].info.size == 64 * MiB
    assert not results[1].ok and results[1].error.reason == "refused"


def test_a_target_that_begins_to_listen_a_moment_later_passes() -> None:
    """The SHA starts qemu-nbd and calls backup/start without waiting for it to listen."""
    from sna.jobs.model import NbdTarget

    reactor = MemoryReactorClock()
    d = probe_all(reactor, [NbdTarget("2000", "127.0.0.1", 10100, "a")], timeout=3)
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert not d.called
    reactor.advance(REFUSED_RETRY)
    protocol = reactor.tcpClients[1][2].buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(greeting() + info_replies(Option.INFO))
    protocol.connectionLost(Failure(ConnectionDone()))
    [result] = result_of(d)
    assert result.ok
