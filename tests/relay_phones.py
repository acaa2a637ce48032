"""RTP endpoints on loopback for the relay's tests (test_relay, test_kernel): a UDP phone that
queues what it receives, SDP offering a port, numbered RTP packets."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

LOCAL = "127.0.0.1"


def sdp(port: int, host: str = LOCAL, extra: str = "", media: str = "") -> bytes:
    text = (
        f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n{extra}{media}"
    )
    return text.encode()


class Phone(DatagramProtocol):
    """One end of a call: a UDP socket that queues what it receives."""

    def __init__(self) -> None:
        self.received: defer.DeferredQueue[tuple[bytes, tuple[str, int]]] = defer.DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.put((datagram, (addr[0], addr[1])))

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.write(data, (LOCAL, port))


def rtp(seq: int, payload: bytes = b"voice") -> bytes:
    return bytes([0x80, 0, 0, seq & 0xFF]) + b"\0" * 8 + payload
