"""``ack_now``: prompt ACKs on the TCP sockets that talk to NBD servers, and nothing else."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet.testing import StringTransport

from sna.nbd.client import ack_now

pytestmark = pytest.mark.integration


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


def test_a_tcp_socket_gets_quickack(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, accepted = tcp_pair
    accepted.sendall(b"x")
    assert client.recv(1) == b"x"
    # The interactive mode in which Linux delays ACKs (what qemu-nbd's split replies hit).
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
    ack_now(client)
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_a_unix_socket_is_left_alone() -> None:
    left, right = socket.socketpair()
    with left, right:
        ack_now(left)  # TCP options would fail on it: it must not be tried


def test_a_closed_socket_is_no_error(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = tcp_pair
    client.close()
    ack_now(client)


def test_a_transport_without_a_socket_is_ignored() -> None:
    ack_now(StringTransport())
    ack_now(None)
