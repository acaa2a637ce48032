"""The UDP protocol's write path on a real loopback socket (sends need no running reactor)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import error
from twisted.internet import reactor as _reactor

from sipproxy.transport.udp import SIPDatagramProtocol

reactor: object = _reactor


@pytest.fixture
def listening() -> Iterator[tuple[SIPDatagramProtocol, socket.socket]]:
    proto = SIPDatagramProtocol(lambda data, addr: None)
    port = reactor.listenUDP(0, proto, interface="127.0.0.1")  # type: ignore[attr-defined]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    try:
        yield proto, peer
    finally:
        peer.close()
        port.stopListening()


def test_every_datagram_arrives_whole_and_in_order(listening):
    proto, peer = listening
    addr = peer.getsockname()
    sent = [f"datagram {i}".encode() * (i + 1) for i in range(5)]
    for data in sent:  # the first goes through Port.write, the others to the socket
        proto.send(data, addr)
    assert [peer.recv(65535) for _ in sent] == sent


def test_a_hostname_or_the_wrong_family_is_refused_as_before(listening):
    proto, peer = listening
    proto.send(b"x", peer.getsockname())
    for bad in (("localhost", 5060), ("::1", 5060)):
        with pytest.raises(error.InvalidAddressError):
            proto.send(b"x", bad)
        with pytest.raises(error.InvalidAddressError):  # not remembered as checked
            proto.send(b"x", bad)


def test_a_datagram_too_long_raises_message_length_error(listening):
    proto, peer = listening
    addr = peer.getsockname()
    proto.send(b"first", addr)
    with pytest.raises(error.MessageLengthError):
        proto.send(b"x" * 70000, addr)
    proto.send(b"after", addr)
    assert [peer.recv(65535), peer.recv(65535)] == [b"first", b"after"]


def test_without_a_transport_send_raises():
    with pytest.raises(ConnectionError):
        SIPDatagramProtocol(lambda data, addr: None).send(b"x", ("127.0.0.1", 5060))
