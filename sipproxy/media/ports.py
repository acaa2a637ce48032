"""The relay's local side: its interfaces, their port pairs, and the sockets behind them.

Each party of a call gets, per media stream, two UDP ports on the address of the interface
facing it (RTP even, RTCP = RTP + 1, as rtpengine's ``media_socket.c`` hands them out). A
datagram arriving on a port goes to the :class:`PacketSink` the call model attached to it; this
module knows nothing of calls.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Final, Protocol

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol

from sipproxy.media.errors import OutOfPorts

__all__ = [
    "DIRECTION_ALIASES",
    "RECEIVE_BUFFER",
    "Address",
    "PacketSink",
    "PortAllocator",
    "PortPair",
    "PortProtocol",
    "RelayInterface",
]

#: Receive buffer of each relay port (the kernel caps it at net.core.rmem_max): ~0.5 s of a
#: video stream, so a relay busy for a moment does not drop what arrived meanwhile.
RECEIVE_BUFFER: Final = 1 << 20

#: rtpengine's legacy direction names, understood when no interface has that name.
DIRECTION_ALIASES: Final = {"internal": "inside", "external": "outside"}

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class RelayInterface:
    """A named local address the relay opens ports on (rtpengine's ``--interface``).

    Written ``name/address`` or ``name/address!advertised``: the advertised address is the one
    written into SDP, for a relay behind a 1:1 NAT.
    """

    name: str
    address: str
    advertised: str | None = None

    @property
    def sdp_address(self) -> str:
        """The address the other side is told to send to."""
        return self.advertised or self.address

    @classmethod
    def parse(cls, text: str) -> RelayInterface:
        """Read ``[name/]address[!advertised]``.

        :raises ValueError: with the problem, for the caller's one-line config error.
        """
        name, sep, rest = text.partition("/")
        if not sep:
            name, rest = "default", text
        address, sep, advertised = rest.partition("!")
        if not name or any(c in name for c in " !/"):
            raise ValueError(f"interface name must be a non-empty word, got {name!r}")
        for what in (address, advertised) if sep else (address,):
            try:
                ipaddress.ip_address(what)
            except ValueError:
                raise ValueError(f"not an IP address: {what!r}") from None
        return cls(name, address, advertised if sep else None)


class PacketSink(Protocol):
    """Where the datagrams of one port go (the call model's stream of that port)."""

    def received(self, data: bytes, source: Address) -> None:
        """One datagram from ``source``."""


class PortProtocol(DatagramProtocol):
    """The protocol behind one relay port: hands every datagram to its :attr:`sink`."""

    noisy = False

    def __init__(self) -> None:
        #: set by the call model once the port belongs to a stream; None drops datagrams
        self.sink: PacketSink | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.sink is not None:
            self.sink.received(datagram, (addr[0], addr[1]))


@dataclass(frozen=True, slots=True)
class PortPair:
    """An open RTP/RTCP pair: ``number`` is the RTP port (RTCP is ``number + 1``)."""

    number: int
    rtp: IListeningPort
    rtcp: IListeningPort
    rtp_protocol: PortProtocol
    rtcp_protocol: PortProtocol


class PortAllocator:
    """Even/odd port pairs from ``[port_min, port_max]`` on one local address.

    Pairs are handed out round-robin so a port just freed is not reused at once (late packets
    of the last call must not reach the next). A port some other program holds is skipped.
    """

    def __init__(self, reactor: Any, address: str, port_min: int, port_max: int) -> None:
        if port_min % 2:
            port_min += 1
        if port_max - port_min < 1:
            raise ValueError("the port range holds no even/odd pair")
        self.reactor = reactor
        self.address = address
        self.port_min = port_min
        self.port_max = port_max
        self._next = port_min
        self.in_use: set[int] = set()

    @property
    def pairs(self) -> int:
        """How many pairs the range holds."""
        return (self.port_max - self.port_min + 1) // 2

    def allocate(self) -> PortPair:
        """Open the next free pair; each port gets a fresh :class:`PortProtocol`.

        :raises OutOfPorts: when every pair is taken (by the relay or another program).
        """
        for _ in range(self.pairs):
            rtp, rtcp = PortProtocol(), PortProtocol()
            port = self._next
            self._next = port + 2 if port + 3 <= self.port_max else self.port_min
            if port in self.in_use:
                continue
            try:
                first = self.reactor.listenUDP(port, rtp, interface=self.address)
            except CannotListenError:
                continue
            try:
                second = self.reactor.listenUDP(port + 1, rtcp, interface=self.address)
            except CannotListenError:
                first.stopListening()
                continue
            for opened in (first, second):
                sock = getattr(opened, "socket", None)
                if sock is not None:  # rides out a scheduling hiccup without dropping media
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.in_use.add(port)
            return PortPair(port, first, second, rtp, rtcp)
        raise OutOfPorts("Ran out of ports")

    def release(self, port: int) -> None:
        """The pair of RTP port ``port`` is closed: it may be handed out again."""
        self.in_use.discard(port)
