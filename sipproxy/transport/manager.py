"""
The SIP transport layer (RFC 3261 section 18): listeners, connections, and where bytes go.

:class:`TransportManager` is the service that owns every socket. Inbound, it turns datagrams
and framed stream messages into messages (:class:`Message`) stamped with their
:class:`Source` (RFC 3261 18.2.1 / RFC 3581 received and rport included) and hands them to the
receiver; what does not parse is answered statelessly when it is a request and dropped when it
is a response. Outbound, it implements :class:`ITransportSender`: requests go to a
:class:`Target` (stream connections reused through the
:class:`~sipproxy.transport.pool.ConnectionPool`, RFC 3261 18.1.1 size rule), responses follow
the Via rules of RFC 3261 18.2.2 and RFC 3581 (:func:`route_response`).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.ssl import TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from sipproxy.addressing import WILDCARD_ADDRESSES
from sipproxy.message import (
    DEFAULT_LIMITS,
    Limits,
    Message,
    ParseError,
    Request,
    Response,
    Source,
    Via,
    new_tag,
    parse_message,
)
from sipproxy.message_counts import MessageCounts
from sipproxy.settings import Section
from sipproxy.transaction import ITransportSender
from sipproxy.transport.certificates import load_certificate_pair
from sipproxy.transport.endpoints import ClientEndpoints, address_family, ip_address
from sipproxy.transport.pool import ConnectionPool, peer_key, pool_key
from sipproxy.transport.sides import (
    DestinationSides,
    Sided,
    SourceAddresses,
    listener_candidates,
    preferred_listener,
)
from sipproxy.transport.tcp import SIPStreamProtocol, unmapped
from sipproxy.transport.tls import (
    ServerCertificate,
    SIPTLSStreamProtocol,
    TLSClientPolicy,
)
from sipproxy.transport.tls_connections import TLSConnections
from sipproxy.transport.udp import SIPDatagramProtocol

if TYPE_CHECKING:
    from sipproxy.context import Target
    from sipproxy.flood import FloodGuard
    from sipproxy.flows import FlowTracker

__all__ = [
    "RELIABLE_TRANSPORTS",
    "UDP_SIZE_LIMIT",
    "ListenSpec",
    "Listener",
    "ResponseRoute",
    "TransmittingSender",
    "TransportManager",
    "route_response",
    "stamp_via",
    "stateless_error_response",
]

RELIABLE_TRANSPORTS = frozenset({"TCP", "TLS", "SCTP", "TLS-SCTP", "WS", "WSS"})
UDP_SIZE_LIMIT = 1300
"""RFC 3261 18.1.1: a request larger than this (path MTU unknown) must not go over UDP."""
UDP_ONLY_TTL = 600.0
"""Seconds a UDP target whose TCP connection failed gets large requests over UDP directly."""
UDP_ONLY_MAX = 10_000
"""Such targets remembered at most (the oldest is forgotten first)."""
SIZE_SWITCH_CONNECT_TIMEOUT = 2.0
"""Seconds that TCP connection may take: a phone behind its own NAT drops the SYN silently,
and its call should not wait the full connect timeout before going over UDP."""

PEERS_REMEMBERED = 4096
"""UDP peers whose :class:`Source` a listener keeps (:attr:`Listener.peers`)."""

_LOCAL_ADDRESSES_REMEMBERED = 256  # local address and port -> listener(s), remembered at most
_STOP_GRACE = 2.0  # seconds stopService lets connections flush before aborting them


class ListenSpec(Sided, Protocol):
    """What the manager reads from a listen entry (:class:`sipproxy.config.ListenConfig` fits):
    its side, transport and address (:class:`~sipproxy.transport.sides.Sided`), port and
    advertised host."""

    @property
    def port(self) -> int: ...
    @property
    def advertise(self) -> str | None: ...


# --------------------------------------------------------------------------------------------
# Pure decisions: response routing and stateless error answers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResponseRoute:
    """
    Where a response goes.

    :ivar transport: upper case, from the top Via (``"UDP"``, ``"TCP"``, ``"TLS"`` ...).
    :ivar host: IP address (or, rarely, a name) to send to when no connection is reused.
    :ivar port: port for ``host``.
    :ivar connection: for a reliable transport, the ``(host, port)`` of the peer whose connection
        the request came on: use it if it is still open (RFC 3261 18.2.2), else ``host``/``port``.
    """

    transport: str
    host: str
    port: int
    connection: tuple[str, int] | None = None


def route_response(via: Via, source: Source | None) -> ResponseRoute:
    """
    RFC 3261 18.2.2 with RFC 3581: where to send a response whose top Via is ``via``.

    ``source`` is where the request came from: the response goes to its address (the
    ``received`` the proxy wrote, :func:`stamp_via`), over its connection if still open, and for
    ``rport`` to its port; otherwise to the sent-by port. Nothing the requester wrote can send
    the response to another host: a Via ``maddr`` is ignored (RFC 3261 18.2.2 honours it for
    multicast, which the proxy never answers to), and so is a client's own ``received``.
    """
    # the transport the request really arrived on wins over what its Via claims (a UDP
    # datagram whose Via says TLS is still answered over UDP: RFC 4475 3.3.5)
    transport = source.transport.upper() if source is not None else via.transport.upper()
    if transport in RELIABLE_TRANSPORTS:
        connection = None
        if source is not None and source.transport.upper() == transport:
            connection = (source.host, source.port)
        host = source.host if source is not None else via.received or via.host
        return ResponseRoute(transport, host, _sent_by_port(via), connection)
    return ResponseRoute(transport, *_datagram_destination(via, source))


def _sent_by_port(via: Via) -> int:
    port = via.port
    if port is not None:
        return port
    return 5061 if via.transport.upper() in ("TLS", "WSS", "TLS-SCTP") else 5060


def _datagram_destination(via: Via, source: Source | None) -> tuple[str, int]:
    """:func:`route_response`'s host and port over an unreliable transport (no
    :class:`ResponseRoute` made: :meth:`TransportManager.transmit_response` calls it for every
    response to a datagram)."""
    rport = via.rport
    if source is None:
        host = via.received or via.host
    elif rport is True:
        return source.host, source.port
    else:
        host = source.host
    if isinstance(rport, int) and not isinstance(rport, bool):
        return host, rport
    return host, _sent_by_port(via)


# Liberal on purpose: LWS inside the Request-URI (RFC 4475 3.1.2.8) still deserves its 400.
_REQUEST_LINE = re.compile(rb"[A-Za-z0-9.!%*_+`'~-]+ +[^ ].* SIP/[^ ]*[ \t]*\Z", re.I | re.S)
_COPIED = {"via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id"}
_LINE_END = re.compile(rb"\r?\n")


def stateless_error_response(data: bytes, status: int, reason: str) -> bytes | None:
    """
    A minimal response to a request that did not parse, or ``None`` when it cannot be answered.

    The Via, From, To, Call-ID and CSeq lines are copied raw (unfolded) so the client can match
    the answer to its transaction; a To without a tag gets one. Nothing is sent for a response,
    an ACK, or anything without a Via.
    """
    data = data.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    lines = _LINE_END.split(head)
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None or lines[0].split(b" ", 1)[0].upper() == b"ACK":
        return None
    found: dict[str, list[bytes]] = {}
    last: str | None = None
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if last is not None:
                found[last][-1] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().decode("latin-1").lower()
        key = _COMPACT.get(key, key)
        if not colon or key not in _COPIED:
            last = None
            continue
        found.setdefault(key, []).append(value.strip())
        last = key
    if not found.get("via"):
        return None
    phrase = " ".join(reason.split()) or "Bad Request"
    out = [f"SIP/2.0 {status} {phrase}".encode("utf-8", "replace")]
    for key, name in _COPIED.items():
        for value in found.get(key, []):
            if key == "to" and b"tag=" not in value.lower():
                value += b";tag=" + new_tag().encode()
            out.append(name.encode() + b": " + value)
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


def _enlarge_receive_buffer(port: Any) -> None:
    """Let a burst of datagrams wait in the kernel while the reactor is busy, instead of being
    dropped (the default buffer holds a few hundred SIP messages). Root may exceed rmem_max."""
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            return
        except OSError:
            continue


@functools.lru_cache(maxsize=4096)
def _not_unicast(host: str) -> bool:
    """Addresses a response must never be sent to (RFC 4475 3.3.10: broadcast Via)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_multicast or ip.is_unspecified or str(ip) == "255.255.255.255"


def _same_host(a: str, b: str) -> bool:
    return peer_key(a, 0) == peer_key(b, 0)


# --------------------------------------------------------------------------------------------
# Listeners
# --------------------------------------------------------------------------------------------
class Listener:
    """
    One listening socket and what the proxy needs to put in Via / Record-Route for it.

    :ivar side: ``"inside"`` or ``"outside"``.
    :ivar transport: ``"UDP"``, ``"TCP"`` or ``"TLS"`` (upper case, as in a Via).
    :ivar address: the bound IP (may be a wildcard such as ``0.0.0.0``).
    :ivar port: the bound port (the real one once started, also when configured as 0).
    :ivar via_host: the host to advertise (``advertise`` from the config, else ``address``).
    :ivar certificate: TLS only: the certificate and key (``certificate``/``key`` of the spec).
    """

    def __init__(self, spec: ListenSpec) -> None:
        self.side = spec.side
        self.transport = spec.transport.upper()
        self.certificate: ServerCertificate | None = None
        if self.transport not in ("UDP", "TCP", "TLS"):
            raise ValueError(f"transport {spec.transport!r} is not supported by TransportManager")
        self.address = spec.address
        self.port = spec.port
        self.via_host = spec.advertise or spec.address
        self.family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self.listening_port: IListeningPort | None = None
        self.udp: SIPDatagramProtocol | None = None
        #: UDP: the :class:`Source` of each peer heard from lately and how to answer it, by the
        #: address the socket reported (messages from one peer share one immutable Source)
        self.peers: dict[tuple[str, int], tuple[Source, Callable[[bytes], None]]] = {}

    def remember_peer(
        self, addr: tuple[str, int], host: str
    ) -> tuple[Source, Callable[[bytes], None]]:
        """The source of datagrams from ``addr`` (``host``: its address without an IPv4-mapped
        prefix) and the function that sends a datagram back there, kept in :attr:`peers`
        (at most :data:`PEERS_REMEMBERED`: all are forgotten when it is full)."""
        source = Source("UDP", host, addr[1], self.address, self.port, self.side)

        def reply(answer: bytes) -> None:
            if self.udp is not None:
                self.udp.send(answer, addr)

        if len(self.peers) >= PEERS_REMEMBERED:
            self.peers.clear()
        peer = self.peers[addr] = (source, reply)
        return peer

    @property
    def bind_host(self) -> str | None:
        """The address outgoing connections of this side bind to, None for a wildcard."""
        return None if self.address in WILDCARD_ADDRESSES else self.address

    def __repr__(self) -> str:
        where = f"{self.address}:{self.port}"
        if self.via_host not in WILDCARD_ADDRESSES:  # else: the route's address toward each peer
            where += f" via {self.via_host}"
        return f"<Listener {self.side} {self.transport} {where}>"


class _StreamFactory(Factory):
    def __init__(self, manager: TransportManager, listener: Listener) -> None:
        self.manager = manager
        self.listener = listener

    def buildProtocol(self, addr: Any) -> SIPStreamProtocol | None:
        host = unmapped(getattr(addr, "host", ""))
        if self.listener.transport == "TLS":
            # admitted by _GuardedTLSFactory, outside the TLS layer (it cannot take a None)
            proto: SIPStreamProtocol = self.manager.tls.new_protocol(
                self.listener.side, outgoing=False)
        else:
            if not self.manager._admit(host):
                return None  # refused: Twisted closes the socket at once
            proto = self.manager._new_stream(self.listener.side, outgoing=False)
        self.manager._accepted(proto, host)
        return proto


class _GuardedTLSFactory(TLSMemoryBIOFactory):
    """Refuses banned or over-limit sources before any TLS state is made for them."""

    def __init__(self, options: Any, manager: TransportManager, wrapped: _StreamFactory) -> None:
        super().__init__(options, False, wrapped)
        self.manager = manager

    def buildProtocol(self, addr: Any) -> Any:
        if not self.manager._admit(unmapped(getattr(addr, "host", ""))):
            return None
        return super().buildProtocol(addr)


class _DropLog:
    """Log dropped input without letting a flood of garbage flood the log."""

    def __init__(self, log: Logger, clock: Any, burst: int = 10, period: float = 60.0) -> None:
        self.log = log
        self.clock = clock
        self.burst = burst
        self.period = period
        self._window_start = -period
        self._count = 0
        self._suppressed = 0

    def __call__(self, fmt: str, **kw: object) -> None:
        now = self.clock.seconds()
        if now - self._window_start >= self.period:
            if self._suppressed:
                self.log.info("{n} more dropped messages not logged", n=self._suppressed)
            self._window_start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self.burst:
            self._count += 1
            self.log.info(fmt, **kw)
        else:
            self._suppressed += 1


@implementer(ITransportSender)
class TransmittingSender:
    """The manager's send path for the transaction layer, which accepts ``None`` for "sent":
    :meth:`TransportManager.transmit_request` and :meth:`~TransportManager.transmit_response`
    under the names :class:`ITransportSender` gives them."""

    def __init__(self, manager: TransportManager) -> None:
        self.send_request = manager.transmit_request
        self.send_response = manager.transmit_response


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------
@implementer(ITransportSender)
class TransportManager(Service):
    """
    All SIP sockets of the proxy, as one service.

    :param reactor: provides ``IReactorUDP``, ``IReactorTCP`` and ``IReactorTime`` (every timer,
        connect and listen goes through it).
    :param receiver: called with every message that parsed; ``message.source`` is a :class:`Source`
        whose ``side`` is the listener's side. Requests have had RFC 3261 18.2.1 ``received`` and
        RFC 3581 ``rport`` added to their top Via already. Exceptions it raises are logged.
    :param listens: listen entries (:class:`ListenSpec`; ``sipproxy.config.ListenConfig`` objects).
    :param idle_timeout: seconds without traffic after which a connection is closed (None: never).
    :param connect_timeout: seconds an outgoing TCP connection may take to establish.
    :param limits: message size limits for parsing and framing.
    :param flood: the flood guard (:class:`sipproxy.flood.FloodGuard`): asked before any parse for
        every datagram and stream message (a banned source costs a dict lookup), at accept for
        every connection, and after parse for every request (scanner User-Agents). ``None``: no
        flood protection.
    :param message_timeout: seconds a TCP/TLS peer has to finish a message it started (None:
        no limit).
    :param sources: the route lookups that tell a destination's side (default: the kernel's,
        cached on ``reactor``'s clock).

    :ivar flows: which connections carry a registration or a dialog (a
        :class:`sipproxy.flows.FlowTracker`, set by whoever builds the proxy; None: all do).
        When the flood guard's connection table is full, the accepted connection that has gone
        longest without a SIP message and carries neither is closed to make room for a new one;
        a CRLF keepalive re-arms the idle timer only on a connection that carries one (or that the
        proxy opened).
    :ivar pool: the stream connections (:class:`~sipproxy.transport.pool.ConnectionPool`):
        the ones the proxy opened by host, port and TLS server name, every one by its peer.
    :ivar endpoints: builds the outgoing TCP and TLS endpoints
        (:class:`~sipproxy.transport.endpoints.ClientEndpoints`).
    :ivar tls: the TLS connections: opening, reconnects, accepted ones
        (:class:`~sipproxy.transport.tls_connections.TLSConnections`).
    :ivar sides: the side of a destination
        (:class:`~sipproxy.transport.sides.DestinationSides`): the route the kernel takes
        there, or ``[upstream] side`` for the upstream's addresses.
    """

    log = Logger()
    udp_size_limit = UDP_SIZE_LIMIT

    def __init__(
        self,
        reactor: Any,
        receiver: Callable[[Message], None],
        listens: Iterable[ListenSpec],
        *,
        idle_timeout: float | None = 600.0,
        connect_timeout: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
        flood: FloodGuard | None = None,
        message_timeout: float | None = None,
        sources: SourceAddresses | None = None,
    ) -> None:
        self.reactor = reactor
        self.flood = flood
        self.message_timeout = message_timeout
        self.receiver = receiver
        #: messages received and sent, by method and status code (read by the admin metrics)
        self.counts = MessageCounts()
        specs = list(listens)
        self.listeners = [Listener(spec) for spec in specs]
        self.sides = DestinationSides(self.listeners, sources or SourceAddresses(reactor))
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.limits = limits
        self.endpoints = ClientEndpoints(reactor, connect_timeout)
        self.pool = ConnectionPool()
        self._streams: set[SIPStreamProtocol] = set()
        # accepted connections, the one longest without a SIP message first
        self._incoming: OrderedDict[SIPStreamProtocol, None] = OrderedDict()
        self.flows: FlowTracker | None = None
        self._udp_only: dict[tuple[str, int], float] = {}  # target -> until when
        # what listener_for_source and _listener_for_request found, by the local address and
        # port asked about (forgotten when a listener's port may change: _listen)
        self._arrived_on: dict[tuple[str, int], Listener | None] = {}
        self._named_by: dict[tuple[str, int], list[Listener]] = {}
        # choose_listener's candidates by transport, side and IP version
        self._candidates: dict[tuple[str, str | None, int | None], list[Listener]] = {}
        self._lost_waiters: dict[SIPStreamProtocol, list[defer.Deferred[None]]] = {}
        #: for the transaction layer: no Deferred per UDP datagram (:class:`TransmittingSender`)
        self.sender = TransmittingSender(self)
        self._drop_log = _DropLog(self.log, reactor)
        self.tls = TLSConnections(self, reactor, self.pool, self.endpoints,
                                  idle_timeout=idle_timeout, limits=limits,
                                  message_timeout=message_timeout)
        for i, (spec, listener) in enumerate(zip(specs, self.listeners, strict=True)):
            if listener.transport == "TLS":
                listener.certificate = _listener_certificate(i, spec)

    @property
    def tls_client(self) -> TLSClientPolicy | None:
        """How outgoing TLS connections are made (set by the ``tls`` plugin); None: TLS targets
        fail with "no TLS client configured"."""
        return self.tls.policy

    @tls_client.setter
    def tls_client(self, policy: TLSClientPolicy | None) -> None:
        self.tls.policy = policy

    # -- service ---------------------------------------------------------------------------------

    def startService(self) -> None:
        opened: list[Listener] = []
        try:
            for listener in self.listeners:
                self._listen(listener)
                opened.append(listener)
        except Exception:
            for listener in opened:
                if listener.listening_port is not None:
                    listener.listening_port.stopListening()
                    listener.listening_port = None
            raise
        self.tls.start()
        super().startService()

    def _listen(self, listener: Listener) -> None:
        interface = "" if listener.address == "0.0.0.0" else listener.address
        listener.peers.clear()  # their sources name the port, which may change here
        self._arrived_on.clear()
        self._named_by.clear()
        if listener.transport == "UDP":
            proto = SIPDatagramProtocol(functools.partial(self._datagram_received, listener))
            # a datagram may hold a whole message (64 KiB); Twisted reads 8 KiB by default
            port = self.reactor.listenUDP(listener.port, proto, interface=interface,
                                          maxPacketSize=65535)
            _enlarge_receive_buffer(port)
            listener.udp = proto
        else:
            port = self.reactor.listenTCP(
                listener.port, self.server_factory(listener), interface=interface
            )
        listener.listening_port = port
        listener.port = port.getHost().port
        self.log.info("SIP listening: {listener}", listener=listener)

    def server_factory(self, listener: Listener) -> IProtocolFactory:
        """
        The factory of the connections the stream ``listener`` (TCP, or TLS) accepts: what
        its port listens with. A banned or over-limit source gets no protocol (Twisted closes
        its socket at once); tests drive it with made-up peer addresses.
        """
        factory = _StreamFactory(self, listener)
        if listener.transport != "TLS":
            return factory
        assert listener.certificate is not None
        policy = self.tls.policy
        options = listener.certificate.options(
            policy.server_minimum if policy is not None else TLSVersion.TLSv1_2
        )
        return _GuardedTLSFactory(options, self, factory)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.tls.stop()
        if self.flood is not None:
            self.flood.stop()
        waits: list[defer.Deferred[Any]] = []
        for listener in self.listeners:
            if listener.listening_port is not None:
                waits.append(defer.maybeDeferred(listener.listening_port.stopListening))
                listener.listening_port = None
                listener.udp = None
        self.pool.cancel()
        for proto in list(self._streams):
            waits.append(self._close_stream(proto))
        done = defer.DeferredList(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def _close_stream(self, proto: SIPStreamProtocol) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._lost_waiters.setdefault(proto, []).append(d)
        proto.close()
        abort = self.reactor.callLater(_STOP_GRACE, self._abort, proto)
        d.addBoth(lambda r: abort.cancel() if abort.active() else None)
        return d

    @staticmethod
    def _abort(proto: SIPStreamProtocol) -> None:
        transport = proto.transport
        if transport is not None and hasattr(transport, "abortConnection"):
            transport.abortConnection()

    def open_connections(self) -> dict[str, int]:
        """The TCP and TLS connections open now (accepted and opened), by transport."""
        counts = {"TCP": 0, "TLS": 0}
        for proto in list(self._streams):
            counts[proto.kind] = counts.get(proto.kind, 0) + 1
        return counts

    # -- choosing sockets ------------------------------------------------------------------------

    def choose_listener(
        self, target: Target, side: str | None = None, transport: str | None = None
    ) -> Listener | None:
        """
        The listener a request to ``target`` leaves from (its Via/Record-Route address), by
        :func:`~sipproxy.transport.sides.pick_listener`: without ``side``, one on the side
        whose interface the kernel routes ``target`` through (:attr:`sides`). The proxy may
        override this method.
        """
        wanted = (transport or target.transport).upper()
        ip = ip_address(target.host)
        version = ip.version if ip is not None else None
        key = (wanted, side, version)
        candidates = self._candidates.get(key)
        if candidates is None:
            candidates = listener_candidates(self.listeners, wanted, side, version)
            self._candidates[key] = candidates  # a few keys: transports x sides x families
        return preferred_listener(candidates, self.sides,
                                  target.host if ip is not None else None, side)

    # -- connections the proxy opened (RFC 5923 reuse) --------------------------------------

    def flow_address(self, target: Target, listener: Listener | None) -> tuple[str, int] | None:
        """
        What names us on our own connection to ``target``, when a request to it is to name
        that connection rather than ``listener``: an outgoing TLS connection from a side with
        no TLS listener. The peer can reach nothing else of ours (nothing speaks TLS on the
        side's UDP/TCP port) and finds the connection by its address and port. The host is
        the listener's advertised one (1:1 NAT), else the connection's local address.
        """
        if target.transport.upper() != "TLS" or (listener is not None and
                                                 listener.transport == "TLS"):
            return None
        local = self.tls.outgoing_local(target.host, target.port,
                                        target.server_name or target.host)
        if local is None:
            return None
        if listener is not None and listener.via_host not in WILDCARD_ADDRESSES:
            return listener.via_host, local[1]
        return local

    def open_flow(self, target: Target) -> defer.Deferred[Any] | None:
        """A Deferred that fires once the connection :meth:`flow_address` would name for ``target``
        is open (fails as sending would), or None when nothing is to wait for."""
        if target.transport.upper() != "TLS":
            return None
        listener = self.choose_listener(target)
        if listener is not None and listener.transport == "TLS":
            return None
        if self.flow_address(target, listener) is not None:
            return None
        return self.tls.open(listener.side if listener is not None else "",
                             listener.bind_host if listener is not None else None,
                             target.host, target.port, target.server_name or target.host)

    def is_flow_port(self, port: int) -> bool:
        """Is ``port`` the local port of a connection the proxy opened (now or recently)?"""
        return self.tls.is_own_port(port)

    def transport_for(self, request_bytes_len: int, target: Target) -> str:
        """
        The transport a request of that size goes over to ``target`` (RFC 3261 18.1.1).

        A UDP target gets ``"TCP"`` when the request is larger than :attr:`udp_size_limit`
        (1300) bytes; the proxy calls this with the size it is about to send (including its own
        Via) and writes the answer in its Via. :meth:`send_request` then sends over TCP to the
        same host and port.
        """
        wanted = target.transport.upper()
        if (wanted == "UDP" and request_bytes_len > self.udp_size_limit
                and not self._known_udp_only(target)):
            return "TCP"
        return wanted

    def _known_udp_only(self, target: Target) -> bool:
        key = peer_key(target.host, target.port)
        until = self._udp_only.get(key)
        if until is not None and until <= self.reactor.seconds():
            del self._udp_only[key]
            until = None
        return until is not None

    def _send_size_switched(self, request: Request, target: Target,
                            done: defer.Deferred[None]) -> None:
        """
        A large request to a UDP target goes over TCP (:meth:`transport_for`); most phones that
        register over UDP (desk phones, softphones) have no TCP listener, so when the connection
        fails (or takes over :data:`SIZE_SWITCH_CONNECT_TIMEOUT`) the request goes over UDP after
        all, its Via back to UDP, as it would without the size rule, and the target gets UDP
        directly for :data:`UDP_ONLY_TTL` seconds.
        """
        over_tcp: defer.Deferred[None] = defer.Deferred()

        def over_udp(_: object) -> None:
            key = peer_key(target.host, target.port)
            self._udp_only.pop(key, None)
            while len(self._udp_only) >= UDP_ONLY_MAX:
                del self._udp_only[next(iter(self._udp_only))]
            self._udp_only[key] = self.reactor.seconds() + UDP_ONLY_TTL
            via = request.top_via
            if via is not None and via.transport.upper() == "TCP":
                via = via.copy()
                via.transport = "UDP"
                via.touch()
                request.update_top_via(via)
            self.send_request(request, target).chainDeferred(done)

        over_tcp.addCallbacks(done.callback, over_udp)
        try:
            listener = self._listener_for_request(request, "TCP", target)
            self._send_stream(listener.side if listener is not None else "",
                              listener.bind_host if listener is not None else None,
                              self._serialize(request, "TCP"), target.host, target.port,
                              over_tcp, connect_timeout=SIZE_SWITCH_CONNECT_TIMEOUT)
        except Exception:
            over_tcp.errback()

    def listener_for_source(self, source: Source) -> Listener | None:
        """The UDP listener a message with this source arrived on (``None``: not UDP, or no
        listener has that address and port now)."""
        if source.transport.upper() != "UDP":
            return None
        local = (source.local_host, source.local_port)
        try:
            return self._arrived_on[local]
        except KeyError:
            pass
        found = None
        for lst in self.listeners:
            if lst.transport == "UDP" and lst.port == local[1] and _same_host(lst.address,
                                                                                local[0]):
                found = lst
                break
        if len(self._arrived_on) >= _LOCAL_ADDRESSES_REMEMBERED:
            self._arrived_on.clear()
        self._arrived_on[local] = found
        return found

    def _listener_for_request(
        self, request: Request, transport: str, target: Target
    ) -> Listener | None:
        """The listener named by the request's top Via (which the proxy built), else chosen."""
        via = request.top_via
        side: str | None = None
        if via is not None:
            named = self._named_listeners(via.host, via.port if via.port is not None else 5060)
            for lst in named:
                if lst.transport == transport:
                    return lst
            if named:
                side = named[0].side
        return self.choose_listener(target, side=side, transport=transport)

    def _named_listeners(self, host: str, port: int) -> list[Listener]:
        """The listeners a Via or Record-Route naming ``host:port`` names."""
        key = (host, port)
        named = self._named_by.get(key)
        if named is None:
            named = [lst for lst in self.listeners
                     if lst.port == port and _same_host(lst.via_host, host)]
            if len(self._named_by) >= _LOCAL_ADDRESSES_REMEMBERED:
                self._named_by.clear()
            self._named_by[key] = named
        return named

    # -- ITransportSender ------------------------------------------------------------------------

    def send_request(self, request: Request, target: Target) -> defer.Deferred[None]:
        """
        Send ``request`` to ``target``.

        Returns a Deferred that fires with None once the bytes are handed to the kernel (UDP: at
        once; TCP: when written on an established connection) and fails otherwise (no listener,
        connection refused or timed out, socket error, service stopped). Never raises.

        UDP leaves from the listener the top Via names (else :meth:`choose_listener`); a UDP
        target whose request has a top Via saying TCP (the proxy applied :meth:`transport_for`)
        goes over TCP, or over UDP when that connection fails (:meth:`_send_size_switched`).
        TCP reuses any open connection to ``(host, port)``, accepted or opened, else connects
        (bound to the listener's address) and queues the request until connected.
        """
        try:
            sent = self.transmit_request(request, target)
        except Exception:
            return defer.fail()
        return defer.succeed(None) if sent is None else sent

    def transmit_request(self, request: Request, target: Target) -> defer.Deferred[None] | None:
        """
        :meth:`send_request` under :class:`ITransportSender`'s contract, for the transaction
        layer: ``None`` once a datagram is handed to the kernel (UDP to an IP address, the
        common case: no Deferred made and fired per datagram), else a Deferred as for
        :meth:`send_request`; raises what fails at once.
        """
        try:
            self.counts.requests_sent[request.method] += 1
        except KeyError:
            self.counts.requests_sent["OTHER"] += 1
        transport = target.transport.upper()
        via = request.top_via
        if transport == "UDP" and via is not None and via.transport.upper() == "TCP":
            switched: defer.Deferred[None] = defer.Deferred()
            self._send_size_switched(request, target, switched)
            return switched
        data = self._serialize(request, transport)
        listener = self._listener_for_request(request, transport, target)
        if transport == "UDP":
            if listener is None or listener.transport != "UDP":
                raise ConnectionError(f"no UDP listener to send to {target.host}")
            return self._send_datagram(listener, data, target.host, target.port)
        done: defer.Deferred[None] = defer.Deferred()
        try:
            if transport == "TCP":
                side = listener.side if listener is not None else ""
                bind = listener.bind_host if listener is not None else None
                self._send_stream(side, bind, data, target.host, target.port, done)
            elif transport == "TLS":
                side = listener.side if listener is not None else ""
                bind = listener.bind_host if listener is not None else None
                self.tls.send(side, bind, data, target.host, target.port,
                              target.server_name or target.host, done)
            else:
                raise ConnectionError(f"transport {transport} is not supported")
        except Exception:
            done.errback()
        return done

    def send_response(
        self, response: Response, request_source: Source | None
    ) -> defer.Deferred[None]:
        """
        Send ``response`` per its top Via (:func:`route_response`); the Deferred is as for requests.

        Reliable: over the connection the request came on if still open, else a new TCP
        connection to received-or-sent-by host and sent-by port. UDP: from the socket the request
        arrived on (else a UDP listener of the same side) to the source (rport) / sent-by port.
        Never to a broadcast, multicast or unspecified address, and never without
        ``request_source``: a response leaves from the side its request came from.
        """
        try:
            sent = self.transmit_response(response, request_source)
        except Exception:
            return defer.fail()
        return defer.succeed(None) if sent is None else sent

    def transmit_response(
        self, response: Response, request_source: Source | None
    ) -> defer.Deferred[None] | None:
        """:meth:`send_response` under :class:`ITransportSender`'s contract, as
        :meth:`transmit_request`: ``None`` once a datagram is handed to the kernel."""
        self.counts.responses_sent[response.status] += 1
        via = response.top_via
        if via is None:
            raise ValueError("response has no Via")
        if request_source is None:
            raise ValueError("a response is only sent back where its request came from")
        side = request_source.side
        transport = request_source.transport.upper()
        if transport in RELIABLE_TRANSPORTS:
            route = route_response(via, request_source)
            data = self._serialize(response, transport)
            done: defer.Deferred[None] = defer.Deferred()
            try:
                self._send_reliable_response(side, data, via, route, done)
            except Exception:
                done.errback()
            return done
        host, port = _datagram_destination(via, request_source)
        data = self._serialize(response, transport)
        if _not_unicast(host):
            raise ValueError(f"refusing to send a response to {host}")
        listener = self.listener_for_source(request_source)
        if listener is None:
            listener = self._side_listener(side, "UDP", host)
        if listener is None:
            raise ConnectionError("no UDP listener")
        return self._send_datagram(listener, data, host, port)

    def _send_reliable_response(
        self, side: str, data: bytes, via: Via, route: ResponseRoute, done: defer.Deferred[None]
    ) -> None:
        if route.transport == "TLS":
            self._send_tls_response(side, data, via, route, done)
            return
        if route.connection is not None:
            proto = self._tcp_connection(*route.connection)
            if proto is not None:
                proto.write(data)
                done.callback(None)
                return
        if route.transport != "TCP":
            raise ConnectionError(f"cannot open a {route.transport} connection")
        listener = self._side_listener(side, "TCP", route.host)
        bind = listener.bind_host if listener is not None else None
        self._send_stream(side, bind, data, route.host, route.port, done)

    def _send_tls_response(
        self, side: str, data: bytes, via: Via, route: ResponseRoute, done: defer.Deferred[None]
    ) -> None:
        """Over the TLS connection the request came on, else a new one to received/sent-by,
        verified for the Via's sent-by host (RFC 3261 18.2.2, 26.3.2.1)."""
        if route.connection is not None:
            proto = self.tls.connection_to(route.connection)
            if proto is not None:
                proto.write(data)
                done.callback(None)
                return
        listener = self._side_listener(side, "TLS", route.host) or self._side_listener(
            side, "TCP", route.host) or self._side_listener(side, "UDP", route.host)
        bind = listener.bind_host if listener is not None else None
        self.tls.send(side, bind, data, route.host, route.port, via.host, done)

    # -- sending internals -----------------------------------------------------------------------

    @staticmethod
    def _serialize(message: Message, transport: str) -> bytes:
        if transport != "UDP":
            message.ensure_content_length()  # RFC 3261 18.3: mandatory on streams
        return message.to_bytes()

    def _side_listener(self, side: str, transport: str, host: str) -> Listener | None:
        family = address_family(host)
        best: Listener | None = None
        for lst in self.listeners:
            if lst.transport != transport or (side and lst.side != side):
                continue
            if family is None or lst.family == family:
                return lst
            best = best or lst
        return best

    def _send_datagram(
        self, listener: Listener, data: bytes, host: str, port: int
    ) -> defer.Deferred[None] | None:
        """Hand a datagram to the kernel: at once to an IP address (``None``), else once
        ``host`` resolves (a Deferred); raises what fails at once."""
        proto = listener.udp
        if proto is None:
            raise ConnectionError(f"{listener} is not listening")
        if ip_address(host) is not None:
            address = host
            if listener.family == socket.AF_INET6 and address_family(host) == socket.AF_INET:
                address = "::ffff:" + host
            proto.send(data, (address, port))
            return None
        done: defer.Deferred[None] = defer.Deferred()

        def send(ip: str) -> None:
            try:
                self._send_datagram(listener, data, ip, port)
            except Exception:
                done.errback()
                return
            done.callback(None)

        self.reactor.resolve(host).addCallbacks(send, done.errback)
        return done

    def _send_stream(
        self,
        side: str,
        bind: str | None,
        data: bytes,
        host: str,
        port: int,
        done: defer.Deferred[None],
        connect_timeout: float | None = None,
    ) -> None:
        """Over TCP: on any open connection with ``host:port`` (opened or accepted), else on
        one the pool opens from ``bind`` (``connect_timeout``: the endpoint's unless given)."""
        proto = self._tcp_connection(host, port)
        if proto is not None:
            proto.write(data)
            done.callback(None)
            return
        key = pool_key(host, port)
        self.pool.send(key, data, done,
                       lambda: self._open_tcp(side, bind, key[0], port, connect_timeout))

    def _tcp_connection(self, host: str, port: int) -> SIPStreamProtocol | None:
        return self.pool.get(pool_key(host, port)) or self.pool.peer("TCP", host, port)

    def _open_tcp(self, side: str, bind: str | None, host: str, port: int,
                  timeout: float | None) -> defer.Deferred[SIPStreamProtocol]:
        """The pool's opener for TCP: one connection attempt, logged when it fails."""
        if not self.running:
            raise ConnectionError("the transport service is stopped")
        proto = self._new_stream(side, outgoing=True)
        connecting = connectProtocol(self.endpoints.tcp(host, port, bind, timeout), proto)
        return connecting.addErrback(self._connect_failed, host, port)

    def _connect_failed(self, reason: Failure, host: str, port: int) -> Failure:
        self.log.info("cannot connect to {host}:{port}: {error}",
                      host=host, port=port, error=reason.getErrorMessage())
        return reason

    # -- receiving -------------------------------------------------------------------------------

    def _new_stream(self, side: str, *, outgoing: bool) -> SIPStreamProtocol:
        return SIPStreamProtocol(
            self, self.reactor, side,
            outgoing=outgoing, idle_timeout=self.idle_timeout, limits=self.limits,
            message_timeout=self.message_timeout,
        )

    def _admit(self, host: str) -> bool:
        """May a connection from ``host`` be accepted? (counted when it may)"""
        return self.flood is None or self.flood.admit_connection(host, self._make_room)

    def _accepted(self, proto: SIPStreamProtocol, host: str) -> None:
        proto.admitted = host if self.flood is not None else None
        self._incoming[proto] = None

    def _carries_state(self, proto: SIPStreamProtocol) -> bool:
        flows = self.flows
        return flows is None or flows.in_use(proto.kind, proto.peer[0], proto.peer[1])

    def _make_room(self) -> bool:
        """The connection table is full: close the accepted connection longest without a SIP
        message that carries no registration or dialog. ``False``: every one does."""
        incoming = self._incoming
        for _ in range(len(incoming)):
            proto = next(iter(incoming))
            if proto.closing or self._carries_state(proto):
                incoming.move_to_end(proto)  # kept: look at the others first next time
                continue
            del incoming[proto]
            host = proto.admitted
            if host is not None and self.flood is not None:
                self.flood.connection_closed(host)
                proto.admitted = None
                self.flood.refusals.refused(
                    "connections_evicted", host, "closed an idle connection from {host}:{port} "
                    "to make room for a new one", host=host, port=proto.peer[1])
            self._abort_stream(proto)
            return True
        return False

    def keepalive_counts(self, proto: SIPStreamProtocol) -> bool:
        """Does a CRLF keepalive on ``proto`` count as traffic (re-arm its idle timer)? Only
        on a connection that carries a registration or a dialog, or one the proxy opened."""
        return proto.outgoing or self._carries_state(proto)

    def _datagram_received(self, listener: Listener, data: bytes, addr: tuple[str, int]) -> None:
        peer = listener.peers.get(addr)
        if peer is not None:
            host = peer[0].host
        else:
            host = unmapped(addr[0]) if listener.family == socket.AF_INET6 else addr[0]
        # before anything else: a banned or flooding source costs a dict lookup or two
        flood = self.flood
        if flood is not None and not flood.allow(host):
            return
        if peer is None:
            peer = listener.remember_peer(addr, host)
        self._dispatch(data, peer[0], peer[1])

    def stream_connected(self, proto: SIPStreamProtocol) -> None:
        self._streams.add(proto)
        if isinstance(proto, SIPTLSStreamProtocol):
            self.tls.connected(proto)  # found as TLS only: no clear text on a TLS route
            return
        self.pool.register_peer(proto)

    def stream_message(self, proto: SIPStreamProtocol, data: bytes) -> None:
        peer, local = proto.peer, proto.local
        flood = self.flood
        # connections we opened (to the provider) are not rate limited: we chose that peer
        if flood is not None and not proto.outgoing and not flood.allow(peer[0]):
            self._abort_stream(proto)  # banned: nothing more from this connection
            return
        if proto in self._incoming:
            self._incoming.move_to_end(proto)
        source = Source(proto.kind, peer[0], peer[1], local[0], local[1], proto.side)
        self._dispatch(data, source, proto.write)

    def stream_framing_error(
        self, proto: SIPStreamProtocol, error: ParseError, data: bytes
    ) -> None:
        answer = None if error.is_response else stateless_error_response(
            data, error.status, error.reason
        )
        if answer is not None:
            proto.write(answer)
        if self.flood is not None:
            self.flood.penalize(proto.peer[0], "unframable")

    def stream_too_slow(self, proto: SIPStreamProtocol) -> None:
        if self.flood is not None:
            self.flood.refuse(proto.peer[0], "slow", "closed a connection from {host}: a message "
                              "took more than {timeout:g} s", timeout=proto.message_timeout or 0)

    def _abort_stream(self, proto: SIPStreamProtocol) -> None:
        transport = proto.transport
        proto.close()
        if transport is not None and hasattr(transport, "abortConnection"):
            transport.abortConnection()

    def stream_lost(self, proto: SIPStreamProtocol, reason: Failure) -> None:
        self._streams.discard(proto)
        self._incoming.pop(proto, None)
        if proto.admitted is not None:
            if self.flood is not None:
                self.flood.connection_closed(proto.admitted)
            proto.admitted = None
        self.pool.forget(proto)
        if isinstance(proto, SIPTLSStreamProtocol):
            self.tls.lost(proto, reason)
        for d in self._lost_waiters.pop(proto, []):
            d.callback(None)

    def _dispatch(self, data: bytes, source: Source, reply: Callable[[bytes], None]) -> None:
        """Parse, stamp and deliver one message; answer or drop what does not parse."""
        try:
            message = parse_message(data, self.limits)
        except ParseError as e:
            if self.flood is not None:
                self.flood.penalize(source.host, "unparsable")
            answer = None if e.is_response else stateless_error_response(data, e.status, e.reason)
            if answer is None:
                self._drop_log(
                    "dropped unparsable {what} from {host}:{port}: {reason}",
                    what="response" if e.is_response else "message",
                    host=source.host, port=source.port, reason=e.reason,
                )
                return
            self._drop_log(
                "answered unparsable request from {host}:{port} with {status}: {reason}",
                host=source.host, port=source.port, status=e.status, reason=e.reason,
            )
            reply(answer)
            return
        message.source = source
        try:
            # parsed lazily by the message layer, needed by everything after us: a request
            # whose From or To does not parse must be refused here, or it is never answered
            message.from_  # noqa: B018
            message.to  # noqa: B018
            if isinstance(message, Request):
                if self.flood is not None and not self.flood.screen(message, source.host):
                    return  # a scanner: dropped without an answer
                stamp_via(message, source)
                try:
                    self.counts.requests_received[message.method] += 1
                except KeyError:
                    self.counts.requests_received["OTHER"] += 1
            else:
                self.counts.responses_received[message.status] += 1
        except ParseError as e:
            if self.flood is not None:
                self.flood.penalize(source.host, "unparsable")
            answer = None
            if isinstance(message, Request):
                answer = stateless_error_response(data, e.status, e.reason)
            self._drop_log(
                "refused {what} from {host}:{port}: {reason}",
                what="request" if answer is not None else "message",
                host=source.host, port=source.port, reason=e.reason,
            )
            if answer is not None:
                reply(answer)
            return
        try:
            self.receiver(message)
        except Exception:
            self.log.failure("receiver failed on a message from {host}", host=source.host)


def _listener_certificate(index: int, spec: ListenSpec) -> ServerCertificate:
    """Load a TLS listener's certificate and key now, so a bad file is a config error."""
    table = Section(f"listen[{index}]")
    cert = getattr(spec, "certificate", None)
    key = getattr(spec, "key", None)
    if not cert or not key:
        raise table.error("certificate", 'a TLS listener needs "certificate" and "key"')
    return load_certificate_pair(table, cert, key)


def stamp_via(request: Request, source: Source) -> None:
    """
    RFC 3261 18.2.1 and RFC 3581: record in the top Via where the request really came from.

    ``received`` is added when the sent-by host is not the source address (or when ``rport`` asks
    for it), and a ``received`` the client wrote itself is replaced; ``rport`` gets the source port
    (a value the client wrote included: RFC 3581 section 4).
    """
    via = request.top_via
    if via is None:
        return
    changed = False
    rport = via.rport
    if rport is True or (rport is not None and rport != source.port):
        via.set_param("rport", str(source.port))
        changed = True
    received = via.received
    if (received is not None and not _same_host(received, source.host)) or (
        received is None and (changed or not _same_host(via.host, source.host))
    ):
        via.set_param("received", source.host)
        changed = True
    if changed:
        request.update_top_via(via)
