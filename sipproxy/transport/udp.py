"""SIP over UDP: one datagram socket per listener; datagrams in, datagrams out, nothing else.

SIP meaning (parsing, error answers, routing) lives in :mod:`sipproxy.transport.manager`; this
protocol only moves bytes, so it can be driven by a fake datagram transport in unit tests.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

__all__ = ["SIPDatagramProtocol", "is_keepalive"]

DatagramHandler = Callable[[bytes, tuple[str, int]], None]


def is_keepalive(data: bytes) -> bool:
    """Empty datagrams and bare CRLFs (RFC 5626 4.4.1 style pings) carry no SIP message."""
    return not data.strip(b"\r\n")


class SIPDatagramProtocol(DatagramProtocol):
    """Hands every non-empty datagram to ``handler(data, (host, port))``; never raises."""

    log = Logger()

    def __init__(self, handler: DatagramHandler) -> None:
        self._handler = handler

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if is_keepalive(datagram):
            return
        try:
            self._handler(datagram, (addr[0], addr[1]))
        except Exception:
            self.log.failure("dropped a datagram from {addr}: handler failed", addr=addr)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Write one datagram; raises if the socket refuses it (bad address, too long...)."""
        if self.transport is None:
            raise ConnectionError("UDP socket is not listening")
        self.transport.write(data, addr)
