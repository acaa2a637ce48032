"""SIP over UDP: one datagram socket per listener; datagrams in, datagrams out, nothing else.

SIP meaning (parsing, error answers, routing) lives in :mod:`sipproxy.transport.manager`; this
protocol only moves bytes, so it can be driven by a fake datagram transport in unit tests.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from twisted.internet import udp
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

__all__ = ["SIPDatagramProtocol", "is_keepalive"]

DatagramHandler = Callable[[bytes, tuple[str, int]], None]

#: addresses a socket's ``write`` accepted once, per listener; beyond this many, every new one
#: goes through ``write`` (and its checks) again
_CHECKED_MAX = 4096


def is_keepalive(data: bytes) -> bool:
    """Empty datagrams and bare CRLFs (RFC 5626 4.4.1 style pings) carry no SIP message."""
    return not data.strip(b"\r\n")


class SIPDatagramProtocol(DatagramProtocol):
    """Hands every non-empty datagram to ``handler(data, (host, port))``; never raises."""

    log = Logger()

    def __init__(self, handler: DatagramHandler) -> None:
        self._handler = handler
        self._socket: socket.socket | None = None
        self._checked: set[str] = set()

    def startProtocol(self) -> None:
        # Twisted's Port.write checks the address's form and family on every datagram; send()
        # writes to the socket itself once write() has accepted an address (a real port only)
        transport = self.transport
        self._socket = transport.socket if isinstance(transport, udp.Port) else None
        self._checked = set()

    def stopProtocol(self) -> None:
        self._socket = None

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if is_keepalive(datagram):
            return
        try:
            self._handler(datagram, (addr[0], addr[1]))
        except Exception:
            self.log.failure("dropped a datagram from {addr}: handler failed", addr=addr)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Write one datagram; raises if the socket refuses it (bad address, too long...)."""
        transport = self.transport
        if transport is None:
            raise ConnectionError("UDP socket is not listening")
        sock = self._socket
        host = addr[0]
        if sock is None or host not in self._checked:
            transport.write(data, addr)
            if sock is not None and len(self._checked) < _CHECKED_MAX:
                self._checked.add(host)
            return
        while True:  # what Port.write does with the socket's errors
            try:
                sock.sendto(data, addr)
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno == errno.EMSGSIZE:
                    raise MessageLengthError("message too long") from None
                if e.errno == errno.ECONNREFUSED:
                    return  # an earlier datagram's ICMP error: nothing to do with this one
                raise
