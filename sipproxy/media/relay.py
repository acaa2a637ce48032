"""The userspace media relay: ports, calls, latching, counters, timeouts.

The model follows rtpengine's, so that the NG protocol maps onto it one to one:

- a :class:`Call` (by SIP Call-ID) has one :class:`Monologue` per party (by SIP tag); the two
  parties of a dialogue point at each other (``other``);
- a monologue has one :class:`MediaLeg` per ``m=`` line, and each leg a :class:`PacketStream`
  for RTP and one for RTCP: two UDP ports (RTP even, RTCP = RTP + 1) on the address of the
  interface facing that party. The party sends to these ports, and the relay sends to the party
  from them, so each side sees one address for us (symmetric RTP);
- a packet arriving on a party's port goes out of the other party's port of the same media, to
  that party's endpoint, byte for byte (SRTP passes untouched).

Endpoints: the address the SDP gives (``advertised``) until the first packet arrives; then the
packet's source (``learned``, symmetric latching: the phone behind NAT sends from an address
other than its SDP says). With ``strict source`` packets from any other source are dropped
afterwards; with ``media handover`` the endpoint follows the newest source; ``asymmetric``
disables learning.

Timeouts (all from the injected ``IReactorTime``): a call with only an offer ends after
``offer_timeout``; after the answer, an RTP stream that should be sending (by its SDP direction)
and has been silent for ``timeout`` ends the call, a held one after ``silent_timeout``. A call
ended by the relay itself is reported to every ``timeout_observers`` callback. Every end path
(delete, timeout, stop) closes every port of the call.

SDP rewriting for offers and answers is here too (:meth:`RelayEngine.offer` and
:meth:`RelayEngine.answer`), through :mod:`sipproxy.sdp`: only ``c=``, ``o=`` (when asked),
``m=`` ports and protocol, ``a=rtcp``, ``a=rtcp-mux`` and ICE attributes change.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sipproxy.media.kernel import HEADER_BYTES, Unsuitable
from sipproxy.sdp import MediaDescription, SessionDescription

__all__ = [
    "DEFAULT_KERNEL_POLL",
    "DEFAULT_OFFER_TIMEOUT",
    "DEFAULT_SILENT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_STREAMS",
    "Call",
    "MediaLeg",
    "Monologue",
    "OutOfPorts",
    "PacketStream",
    "PortAllocator",
    "RelayEngine",
    "RelayError",
    "RelayInterface",
    "SignalOptions",
    "StreamOffload",
    "UnknownCall",
]

_log = Logger(namespace="sipproxy.media.relay")

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_SILENT_TIMEOUT: Final = 3600.0
DEFAULT_OFFER_TIMEOUT: Final = 3600.0
#: How often the kernel fast path's counters are read (seconds), for statistics and timeouts.
DEFAULT_KERNEL_POLL: Final = 2.0
#: Packets of one direction that still reached userspace from the latched source after the
#: kernel rules went in, with the kernel's counter still at 0: the rules catch nothing (the
#: packets arrive on another device than the route to their source, or carry no UDP
#: checksum), so they go, and the stream stays in userspace.
KERNEL_MISSED: Final = 50
#: Receive buffer of each relay port (the kernel caps it at net.core.rmem_max): ~0.5 s of a
#: video stream, so a relay busy for a moment does not drop what arrived meanwhile.
RECEIVE_BUFFER: Final = 1 << 20

#: Media streams (m= lines) one SDP may ask the relay for: each takes a port pair per party,
#: and a call has a few (audio, video, text, BFCP), so a hostile offer cannot take the range.
MAX_STREAMS: Final = 16

#: rtpengine's legacy direction names, understood when no interface has that name.
DIRECTION_ALIASES: Final = {"internal": "inside", "external": "outside"}

Component = Literal["RTP", "RTCP"]
Address = tuple[str, int]


class RelayError(Exception):
    """A command the relay cannot carry out; ``str()`` is the NG ``error-reason``."""


class UnknownCall(RelayError):
    """No call (or no party) with that Call-ID / tag."""


class OutOfPorts(RelayError):
    """Every port pair of the range is taken."""


@dataclass(frozen=True, slots=True)
class RelayInterface:
    """A named local address the relay opens ports on (rtpengine's ``--interface``):
    ``name/address`` or ``name/address!advertised`` (the address written into SDP, for a
    relay behind a 1:1 NAT)."""

    name: str
    address: str
    advertised: str | None = None

    @property
    def sdp_address(self) -> str:
        return self.advertised or self.address

    @classmethod
    def parse(cls, text: str) -> RelayInterface:
        """``[name/]address[!advertised]``; raises ValueError with the problem."""
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


@dataclass(slots=True)
class SignalOptions:
    """What an offer or answer asks for beyond the SDP (the NG keys and flags)."""

    direction: tuple[str | None, str | None] = (None, None)
    #: Take endpoint addresses from ``received_from`` instead of the SDP (``SIP source address``).
    sip_source_address: bool = False
    received_from: str | None = None
    media_address: str | None = None
    asymmetric: bool = False
    strict_source: bool = False
    media_handover: bool = False
    replace_origin: bool = False
    replace_session_connection: bool = False
    replace_zero_address: bool = False
    #: The ``ICE`` key (``remove``, ``force``, ...); ICE is always removed, see ``warnings``.
    ice: str | None = None
    rtcp_mux: frozenset[str] = frozenset()
    transport_protocol: str | None = None
    full_rtcp_attribute: bool = False
    no_rtcp_attribute: bool = False
    label: str | None = None
    via_branch: str | None = None


def _family(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def _endpoint_dict(ep: Address) -> dict[str, Any]:
    return {"family": _family(ep[0]), "address": ep[0], "port": ep[1]}


# --------------------------------------------------------------------------- ports


class _PortProtocol(DatagramProtocol):
    """The protocol behind one relay port: hands every datagram to its stream."""

    noisy = False

    def __init__(self) -> None:
        self.stream: PacketStream | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.stream is not None:
            self.stream.received(datagram, (addr[0], addr[1]))


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
        return (self.port_max - self.port_min + 1) // 2

    def allocate(self) -> tuple[int, IListeningPort, IListeningPort]:
        """Open a pair; returns (RTP port number, RTP listening port, RTCP listening port).
        Each port's protocol is a fresh ``_PortProtocol`` whose ``stream`` the caller sets."""
        for _ in range(self.pairs):
            rtp, rtcp = _PortProtocol(), _PortProtocol()
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
            return port, first, second
        raise OutOfPorts("Ran out of ports")

    def release(self, port: int) -> None:
        self.in_use.discard(port)


# --------------------------------------------------------------------------- the model


class PacketStream:
    """One local port of one party: the party sends here, and gets the other side's packets
    from here. Counts what arrives."""

    __slots__ = (
        "_now",
        "_sendto",
        "advertised",
        "bytes",
        "component",
        "errors",
        "foreign",
        "kernel_bytes",
        "kernel_packets",
        "last_packet",
        "learned",
        "leg",
        "local_port",
        "no_kernel",
        "offload",
        "packets",
        "port",
    )

    def __init__(
        self, leg: MediaLeg, component: Component, local_port: int, port: IListeningPort
    ) -> None:
        self.leg = leg
        self.component = component
        self.local_port = local_port
        self.port = port
        self.advertised: Address | None = None
        self.learned: Address | None = None
        self.packets = 0
        self.bytes = 0
        self.errors = 0
        #: packets from another source than the latched one (they never meet kernel rules)
        self.foreign = 0
        self.last_packet: float | None = None
        #: what the kernel fast path forwarded for this stream (IP/UDP headers taken off)
        self.kernel_packets = 0
        self.kernel_bytes = 0
        #: the kernel rules of this stream and its peer, while installed or on their way
        self.offload: StreamOffload | None = None
        #: the kernel path failed or was abandoned for this stream: userspace for good
        self.no_kernel = False
        # per packet: the engine's clock and the socket itself, not Twisted's Port.write
        # (whose address checks cost as much as the forwarding)
        self._now = leg.monologue.call.engine.clock.seconds
        sock = getattr(port, "socket", None)
        self._sendto = sock.sendto if sock is not None else port.write  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> Address | None:
        """Where packets for this party go: the learned source, else what the SDP said."""
        return self.learned if self.learned is not None else self.advertised

    @property
    def engine(self) -> RelayEngine:
        return self.leg.monologue.call.engine

    def set_advertised(self, ep: Address | None) -> None:
        if ep != self.advertised:
            self.advertised = ep
            self.learned = None  # new signalling, new endpoint to learn
            if self.offload is not None:  # the kernel rules name the old endpoint
                self.engine.kernel_drop(self.offload, "the endpoints changed", first=True)

    def received(self, data: bytes, source: Address) -> None:
        leg = self.leg
        if self.learned is None:
            if not leg.asymmetric:
                self.learned = source
                if not self.no_kernel and self.engine.kernel is not None:
                    self.engine.kernel_offer(self)
        elif source != self.learned:
            # the kernel rules (never with media handover) match the latched source only, so
            # this packet came here and is handled as without them; they stay (else a stray
            # packet per port would push every call out of the kernel for good)
            if leg.strict_source:
                self.errors += 1
                return
            self.foreign += 1
            if leg.media_handover:
                self.learned = source
        self.packets += 1
        self.bytes += len(data)
        self.last_packet = self._now()
        peer = leg.peer()
        if peer is None:
            return
        is_rtcp = self.component == "RTCP" or (len(data) > 1 and 192 <= data[1] <= 223)
        out = peer.rtcp if is_rtcp and not peer.rtcp_mux else peer.rtp
        dest = out.endpoint
        if dest is None:
            return
        try:
            out._sendto(data, dest)
        except OSError:
            out.errors += 1

    def stats(self) -> dict[str, int]:
        """Userspace and kernel together."""
        return {"packets": self.packets + self.kernel_packets,
                "bytes": self.bytes + self.kernel_bytes, "errors": self.errors}

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"local port": self.local_port, "flags": [self.component]}
        if self.offload is not None and self.offload.active:
            out["flags"].append("kernel")
        if self.endpoint is not None:
            out["endpoint"] = _endpoint_dict(self.endpoint)
            out["flags"].append("filled")
        if self.advertised is not None:
            out["advertised endpoint"] = _endpoint_dict(self.advertised)
        if self.learned is not None:
            out["flags"].append("confirmed")
        if self.last_packet is not None:
            out["last packet"] = int(self.last_packet)
        out["stats"] = self.stats()
        out["userspace stats"] = {"packets": self.packets, "bytes": self.bytes}
        out["kernel stats"] = {"packets": self.kernel_packets, "bytes": self.kernel_bytes}
        return out


class StreamOffload:
    """A stream pair (same component, both parties) forwarded by the kernel, or about to be."""

    __slots__ = ("active", "dropped", "handle", "streams", "userspace_at_install")

    def __init__(self, streams: tuple[PacketStream, PacketStream]) -> None:
        self.streams = streams
        self.handle: Any = None  # the KernelForwarder's Offload once installed
        self.active = False
        self.dropped = False
        #: each stream's userspace packet count from its latched source when the rules went in
        self.userspace_at_install = (0, 0)


class MediaLeg:
    """One ``m=`` line of one party, with its RTP and RTCP ports."""

    def __init__(
        self, monologue: Monologue, index: int, allocator: PortAllocator
    ) -> None:
        self.monologue = monologue
        self.index = index
        self.allocator = allocator
        self.type = ""
        self.protocol = ""
        #: The protocol this party itself used (an answer toward it keeps it).
        self.own_protocol: str | None = None
        self.rtcp_mux = False
        self.offered_mux = False
        self.mux_policy: frozenset[str] = frozenset()
        self.sends = True
        self.asymmetric = False
        self.strict_source = False
        self.media_handover = False
        #: When the current signalling for this media happened (silence is counted from it).
        self.since = monologue.call.engine.clock.seconds()
        number, rtp_port, rtcp_port = allocator.allocate()
        self.rtp = PacketStream(self, "RTP", number, rtp_port)
        self.rtcp = PacketStream(self, "RTCP", number + 1, rtcp_port)
        rtp_port.protocol.stream = self.rtp  # type: ignore[attr-defined]
        rtcp_port.protocol.stream = self.rtcp  # type: ignore[attr-defined]
        self.closed = False

    def peer(self) -> MediaLeg | None:
        other = self.monologue.other
        if other is None:
            return None
        return other.medias.get(self.index)

    @property
    def streams(self) -> tuple[PacketStream, PacketStream]:
        return (self.rtp, self.rtcp)

    def close(self) -> list[Any]:
        """Close both ports; returns the Deferreds of ``stopListening``."""
        if self.closed:
            return []
        self.closed = True
        engine = self.monologue.call.engine
        kernel = [engine.kernel_drop(s.offload, "") for s in self.streams if s.offload]
        waits = [s.port.stopListening() for s in self.streams] + kernel
        self.allocator.release(self.rtp.local_port)
        return [w for w in waits if w is not None]

    def deadline(self, engine: RelayEngine) -> float:
        """When this party's RTP counts as gone silent."""
        limit = engine.timeout if self.sends else engine.silent_timeout
        last = self.rtp.last_packet
        if not self.sends and self.rtcp.last_packet is not None:
            last = max(last or 0.0, self.rtcp.last_packet)  # a held phone may send only RTCP
        return max(last or 0.0, self.since) + limit

    def describe(self) -> dict[str, Any]:
        flags = ["initialized"]
        if self.rtcp_mux:
            flags.append("rtcp-mux")
        return {
            "index": self.index + 1,
            "type": self.type,
            "protocol": self.protocol,
            "flags": flags,
            "streams": [s.describe() for s in self.streams],
        }


class Monologue:
    """One party of a call (one SIP tag), and the interface facing it."""

    def __init__(self, call: Call, tag: str, interface: RelayInterface) -> None:
        self.call = call
        self.tag = tag
        self.interface = interface
        self.created = call.engine.clock.seconds()
        self.other: Monologue | None = None
        self.medias: dict[int, MediaLeg] = {}
        self.label: str | None = None

    def leg(self, index: int) -> MediaLeg:
        leg = self.medias.get(index)
        if leg is None:
            engine = self.call.engine
            leg = MediaLeg(self, index, engine.allocator(self.interface))
            self.medias[index] = leg
        return leg

    def drop_leg(self, index: int) -> list[Any]:
        leg = self.medias.pop(index, None)
        return leg.close() if leg is not None else []

    def close(self) -> list[Any]:
        waits: list[Any] = []
        for leg in self.medias.values():
            waits.extend(leg.close())
        return waits

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tag": self.tag, "created": int(self.created)}
        if self.label is not None:
            out["label"] = self.label
        if self.other is not None:
            out["in dialogue with"] = self.other.tag
        out["medias"] = [self.medias[i].describe() for i in sorted(self.medias)]
        return out


class Call:
    """Everything the relay holds for one Call-ID."""

    def __init__(self, engine: RelayEngine, call_id: str) -> None:
        self.engine = engine
        self.call_id = call_id
        self.created = engine.clock.seconds()
        self.last_signal = self.created
        self.monologues: dict[str, Monologue] = {}
        self.answered = False
        self.ended = False
        self._timer: IDelayedCall | None = None

    def monologue(self, tag: str, interface: RelayInterface) -> Monologue:
        found = self.monologues.get(tag)
        if found is None:
            found = Monologue(self, tag, interface)
            self.monologues[tag] = found
        return found

    def retag(self, mono: Monologue, tag: str) -> None:
        if self.monologues.get(mono.tag) is mono:
            del self.monologues[mono.tag]
        mono.tag = tag
        self.monologues[tag] = mono

    def legs(self) -> Iterator[MediaLeg]:
        for mono in self.monologues.values():
            yield from mono.medias.values()

    # -- timeouts

    def deadline(self) -> float:
        engine = self.engine
        if not self.answered:
            return self.last_signal + engine.offer_timeout
        deadlines = [leg.deadline(engine) for leg in self.legs() if leg.peer() is not None]
        if not deadlines:
            return self.last_signal + engine.offer_timeout
        return min(deadlines)

    def schedule(self) -> None:
        if self.ended:
            return
        clock = self.engine.clock
        delay = max(0.0, self.deadline() - clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = clock.callLater(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.ended:
            return
        if self.engine.clock.seconds() >= self.deadline():
            self.engine.end_call(self, "timeout")
        else:
            self.schedule()

    # -- the end

    def close(self) -> list[Any]:
        self.ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waits: list[Any] = []
        for mono in self.monologues.values():
            waits.extend(mono.close())
        return waits

    def describe(self) -> dict[str, Any]:
        totals = {c: {"packets": 0, "bytes": 0, "errors": 0} for c in ("RTP", "RTCP")}
        for leg in self.legs():
            for stream in leg.streams:
                for k, v in stream.stats().items():
                    totals[stream.component][k] += v
        return {
            "created": int(self.created),
            "last signal": int(self.last_signal),
            "tags": {tag: mono.describe() for tag, mono in self.monologues.items()},
            "totals": totals,
        }


# --------------------------------------------------------------------------- the engine


@dataclass
class _Endpoints:
    rtp: Address | None
    rtcp: Address | None
    sends: bool


class RelayEngine:
    """All calls of one relay. ``reactor`` opens the UDP ports; ``clock`` times everything."""

    def __init__(
        self,
        reactor: Any,
        clock: Any,
        interfaces: list[RelayInterface],
        port_min: int = 30000,
        port_max: int = 40000,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        silent_timeout: float = DEFAULT_SILENT_TIMEOUT,
        offer_timeout: float = DEFAULT_OFFER_TIMEOUT,
        kernel_poll: float = DEFAULT_KERNEL_POLL,
    ) -> None:
        if not interfaces:
            raise ValueError("the relay needs at least one interface")
        self.reactor = reactor
        self.clock = clock
        self.interfaces = {i.name: i for i in interfaces}
        self.default_interface = interfaces[0]
        self.port_min = port_min
        self.port_max = port_max
        self.timeout = timeout
        self.silent_timeout = silent_timeout
        self.offer_timeout = offer_timeout
        self.calls: dict[str, Call] = {}
        self._allocators: dict[str, PortAllocator] = {}
        #: Called with (call_id, reason) when the relay ends a call itself ("timeout",
        #: "shutdown"): the proxy ends the SIP call.
        self.timeout_observers: list[Callable[[str, str], None]] = []
        #: the kernel fast path (a started KernelForwarder), or None: userspace only
        self.kernel: Any = None
        self.kernel_poll = kernel_poll
        self._offloads: set[StreamOffload] = set()
        self._kernel_poller: LoopingCall | None = None
        self._kernel_logged: set[str] = set()

    # -- the kernel fast path

    def use_kernel(self, forwarder: Any) -> None:
        """Forward latched streams with ``forwarder`` (a started KernelForwarder) from now,
        the ones latched before it started too (None: no more new ones)."""
        self.kernel = forwarder
        if forwarder is None:
            return
        forwarder.lost = self._kernel_lost
        for call in list(self.calls.values()):
            for leg in list(call.legs()):
                for stream in leg.streams:
                    if stream.learned is not None and not stream.no_kernel \
                            and stream.offload is None:
                        self.kernel_offer(stream)

    def _kernel_lost(self, handles: list[Any]) -> None:
        """Their rules went with the kernel's table (made again now): install them anew."""
        for offload in [o for o in self._offloads if o.handle in handles]:
            self._forget(offload)
            self.kernel_offer(offload.streams[0])

    def offloads(self) -> list[StreamOffload]:
        return [o for o in self._offloads if o.active]

    def _kernel_log(self, kind: str, text: str, *, warn: bool = True) -> None:
        if kind not in self._kernel_logged:
            self._kernel_logged.add(kind)
            (_log.warn if warn else _log.info)("media relay: {text} (logged once)", text=text)

    def kernel_offer(self, stream: PacketStream) -> None:
        """``stream`` just latched: hand the pair to the kernel when its peer has too."""
        leg = stream.leg
        peer = leg.peer()
        if peer is None or self.kernel is None:
            return
        if stream.component == "RTP":
            if leg.rtcp_mux != peer.rtcp_mux:
                return  # one side muxes: RTCP needs demultiplexing in userspace
            other = peer.rtp
        else:
            if leg.rtcp_mux or peer.rtcp_mux:
                return
            other = peer.rtcp
        if any(x.asymmetric or x.media_handover for x in (leg, peer)):
            return
        if other.learned is None or other.offload is not None or other.no_kernel \
                or stream.offload is not None:
            return
        a, b = stream.learned, other.learned
        if a is None or ":" in a[0] + b[0] + leg.allocator.address + peer.allocator.address:
            return  # the fast path is IPv4 only
        offload = StreamOffload((stream, other))
        stream.offload = other.offload = offload
        self._offloads.add(offload)
        d = self.kernel.install((a, (leg.allocator.address, stream.local_port)),
                                (b, (peer.allocator.address, other.local_port)))
        d.addCallbacks(self._installed, self._install_failed, callbackArgs=(offload,),
                       errbackArgs=(offload,))

    def _installed(self, handle: Any, offload: StreamOffload) -> None:
        offload.handle = handle
        if offload.dropped or self.kernel is None:  # gone meanwhile (an endpoint moved, ...)
            self._forget(offload)
            self._kernel_remove(offload, first=True)
            return
        # the rules took over atomically: what reached the sockets before is still
        # forwarded by userspace, what comes now never reaches them
        offload.active = True
        first, second = offload.streams
        offload.userspace_at_install = (first.packets - first.foreign,
                                        second.packets - second.foreign)
        if self._kernel_poller is None:
            self._kernel_poller = LoopingCall(self._kernel_poll)
            self._kernel_poller.clock = self.clock
            self._kernel_poller.start(self.kernel_poll, now=False).addErrback(
                lambda f: _log.failure("media relay: kernel counter poll", f))

    def _install_failed(self, failure: Any, offload: StreamOffload) -> None:
        if offload.dropped:  # gone meanwhile (the call ended, the relay is stopping)
            return
        if failure.check(Unsuitable):
            self._kernel_log("unsuitable", f"kernel fast path: cannot serve a stream, it stays "
                             f"in userspace: {failure.getErrorMessage()}", warn=False)
        else:
            self._kernel_log("install", f"kernel fast path: installing rules failed, "
                             f"userspace relay instead: {failure.getErrorMessage()}")
        self._forget(offload)
        for s in offload.streams:
            s.no_kernel = True

    def _forget(self, offload: StreamOffload) -> None:
        offload.active = False
        offload.dropped = True
        self._offloads.discard(offload)
        for s in offload.streams:
            if s.offload is offload:
                s.offload = None
        if not self._offloads and self._kernel_poller is not None:
            poller, self._kernel_poller = self._kernel_poller, None
            if poller.running:
                poller.stop()

    def kernel_drop(self, offload: StreamOffload, why: str, *, for_good: bool = False,
                    first: bool = False) -> Any:
        """Back to userspace for the pair (``why`` is logged once when not empty); returns a
        Deferred that fires (never fails) when the rules are gone. ``first``: their removal
        goes ahead of every nft command waiting (installs, other calls' ends, counter polls):
        the rules send to an endpoint that moved."""
        if why:
            self._kernel_log(why[:12], f"kernel fast path: back to userspace: {why}",
                             warn=for_good)
        if for_good:
            for s in offload.streams:
                s.no_kernel = True
        installed = offload.handle is not None and not offload.dropped
        self._forget(offload)
        if installed:
            return self._kernel_remove(offload, first=first)
        return None

    def _kernel_remove(self, offload: StreamOffload, *, first: bool = False) -> Any:
        if self.kernel is None:  # stopped: deleting the table takes every rule with it
            return None
        d = self.kernel.remove(offload.handle, first=first)
        d.addCallback(lambda final: self._count(offload, final))
        d.addErrback(lambda f: self._kernel_log(
            "remove", f"kernel fast path: removing rules failed: {f.getErrorMessage()}"))
        return d

    def _count(self, offload: StreamOffload, counters: Any) -> None:
        """Add what the kernel counted since the last look to the streams; rules that catch
        none of a direction's packets (userspace still gets them all) go."""
        if not counters or offload.handle is None:
            return
        now = self.clock.seconds()
        seen = offload.handle.seen
        missed = False
        for n, name in enumerate(offload.handle.counters):
            packets, octets = counters.get(name, seen[n])
            stream = offload.streams[n]
            latched = stream.packets - stream.foreign  # foreign ones never meet the rules
            if packets == 0 and latched - offload.userspace_at_install[n] >= KERNEL_MISSED:
                missed = True
            dp, db = packets - seen[n][0], octets - seen[n][1]
            if dp <= 0:
                continue
            seen[n] = (packets, octets)
            stream.kernel_packets += dp
            stream.kernel_bytes += max(0, db - HEADER_BYTES * dp)
            stream.last_packet = now
        if missed and offload.active:
            self.kernel_drop(offload, "the kernel rules caught none of a stream's packets "
                             "(they arrive on another device than the route to their source, "
                             "or without a UDP checksum): it stays in userspace", for_good=True)

    def _kernel_poll(self) -> Any:
        if self.kernel is None:
            return None
        d = self.kernel.counters()

        def got(counters: dict[str, tuple[int, int]]) -> None:
            for offload in list(self._offloads):
                if offload.active:
                    self._count(offload, counters)

        d.addCallback(got)
        d.addErrback(lambda f: self._kernel_log(
            "poll", f"kernel fast path: reading counters failed: {f.getErrorMessage()}"))
        return d

    def allocator(self, interface: RelayInterface) -> PortAllocator:
        found = self._allocators.get(interface.address)
        if found is None:
            found = PortAllocator(self.reactor, interface.address, self.port_min, self.port_max)
            self._allocators[interface.address] = found
        return found

    def interface(self, name: str | None) -> RelayInterface:
        if name is None:
            return self.default_interface
        found = self.interfaces.get(name)
        if found is None:
            found = self.interfaces.get(DIRECTION_ALIASES.get(name, ""))
        if found is None:
            raise RelayError(f"Unknown interface {name!r}")
        return found

    def open_ports(self) -> int:
        return sum(len(a.in_use) * 2 for a in self._allocators.values())

    # -- signalling

    def offer(
        self,
        call_id: str,
        from_tag: str,
        sdp: SessionDescription,
        options: SignalOptions,
        to_tag: str | None = None,
    ) -> SessionDescription:
        """Relay the offer ``sdp`` of party ``from_tag``; returns the SDP for the other party."""
        # Resolve the interfaces first: a mistake must not leave a half-made call behind.
        first = self.interface(options.direction[0])
        second = self.interface(options.direction[1])
        call = self.calls.get(call_id)
        new_call = call is None
        if call is None:
            call = Call(self, call_id)
            self.calls[call_id] = call
        try:
            sender = call.monologue(from_tag, first)
            receiver = sender.other
            if receiver is None:
                receiver = call.monologues.get(to_tag) if to_tag else None
                if receiver is None:
                    receiver = call.monologue(to_tag or "", second)
            elif to_tag and receiver.tag != to_tag:
                call.retag(receiver, to_tag)
            sender.other, receiver.other = receiver, sender
            if options.label is not None:
                sender.label = options.label
            out = self._relay_sdp(sdp, sender, receiver, options, offer=True)
        except BaseException:
            if new_call:
                self.end_call(call, "error", report=False)
            raise
        call.last_signal = self.clock.seconds()
        call.schedule()
        return out

    def answer(
        self,
        call_id: str,
        from_tag: str,
        to_tag: str,
        sdp: SessionDescription,
        options: SignalOptions,
    ) -> SessionDescription:
        """Relay the answer ``sdp`` of party ``to_tag`` to the offer of ``from_tag``."""
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall("Unknown call-id")
        offerer = call.monologues.get(from_tag)
        if offerer is None or offerer.other is None:
            raise UnknownCall("Unknown from-tag")
        answerer = offerer.other
        if answerer.tag != to_tag:
            existing = call.monologues.get(to_tag)
            if existing is not None and existing is not offerer:
                answerer = existing
                offerer.other, answerer.other = answerer, offerer
            else:
                call.retag(answerer, to_tag)
        if options.label is not None:
            answerer.label = options.label
        out = self._relay_sdp(sdp, answerer, offerer, options, offer=False)
        call.answered = True
        call.last_signal = self.clock.seconds()
        call.schedule()
        return out

    def _endpoints(
        self, session: SessionDescription, media: MediaDescription, options: SignalOptions
    ) -> _Endpoints:
        conn = media.effective_connection
        hold = conn is None or conn.is_hold
        if options.media_address:
            address: str | None = options.media_address
        elif options.sip_source_address and options.received_from and not hold:
            address = options.received_from
        else:
            address = None if hold or conn is None else conn.address
        sends = media.direction in ("sendrecv", "sendonly") and not hold and media.port != 0
        if address is None or media.port == 0:
            return _Endpoints(None, None, sends)
        rtp = (address, media.port)
        rtcp_attr = media.rtcp
        if rtcp_attr is not None:
            rtcp_address = rtcp_attr.address if rtcp_attr.address and not (
                options.media_address or options.sip_source_address
            ) else address
            rtcp: Address = (rtcp_address, rtcp_attr.port)
        else:
            rtcp = (address, media.port + 1)
        return _Endpoints(rtp, rtcp, sends)

    def _relay_sdp(
        self,
        sdp: SessionDescription,
        sender: Monologue,
        receiver: Monologue,
        options: SignalOptions,
        *,
        offer: bool,
    ) -> SessionDescription:
        """Take the sender's endpoints from ``sdp``; return it rewritten for the receiver."""
        if len(sdp.media) > MAX_STREAMS:
            raise RelayError(f"Too many media streams ({len(sdp.media)}, at most {MAX_STREAMS})")
        out = sdp.copy()
        address = receiver.interface.sdp_address
        for index, media in enumerate(out.media):
            if media.port == 0:
                self._drop(sender, receiver, index)
                continue
            ep = self._endpoints(out, media, options)
            leg = sender.leg(index)
            peer = receiver.leg(index)
            leg.type = media.media
            leg.own_protocol = media.proto
            leg.protocol = media.proto
            leg.rtp.set_advertised(ep.rtp)
            leg.rtcp.set_advertised(ep.rtcp)
            leg.sends = ep.sends
            leg.asymmetric = options.asymmetric
            leg.strict_source = options.strict_source
            leg.media_handover = options.media_handover
            now = self.clock.seconds()
            leg.since = peer.since = now
            self._rewrite_protocol(media, leg, peer, options, offer=offer)
            mux = self._negotiate_mux(media, leg, peer, options, offer=offer)
            conn = media.effective_connection
            keep_hold = conn is not None and conn.is_hold and not options.replace_zero_address
            if not keep_hold:
                if media.connection is not None or not options.replace_session_connection:
                    media.set_connection_address(address)
            media.port = peer.rtp.local_port
            if mux and (not offer or "require" in options.rtcp_mux):
                media.rtcp = None
            elif options.no_rtcp_attribute:
                media.rtcp = None
            elif options.full_rtcp_attribute:
                media.set_rtcp(peer.rtcp.local_port, address)
            else:
                media.set_rtcp(peer.rtcp.local_port)
            media.rtcp_mux = mux
        for i in [i for i in sender.medias if i >= len(out.media)]:
            self._drop(sender, receiver, i)
        if options.replace_session_connection and out.connection is not None:
            if not out.connection.is_hold or options.replace_zero_address:
                out.set_connection_address(address)
        if options.replace_origin and out.origin is not None:
            out.set_origin_address(address)
        out.remove_ice_everywhere()
        return out

    def _drop(self, sender: Monologue, receiver: Monologue, index: int) -> None:
        sender.drop_leg(index)
        receiver.drop_leg(index)

    @staticmethod
    def _rewrite_protocol(
        media: MediaDescription,
        leg: MediaLeg,
        peer: MediaLeg,
        options: SignalOptions,
        *,
        offer: bool,
    ) -> None:
        wanted = options.transport_protocol
        if not offer and wanted is None and peer.own_protocol is not None:
            # An answer goes back in the offerer's own protocol (when that is only a matter of
            # the profile's name: AVP and AVPF, SAVP and SAVPF).
            wanted = peer.own_protocol
            if _is_secure(wanted) != _is_secure(media.proto):
                return
        if wanted is None or wanted == "accept" or wanted == media.proto:
            return
        if _is_secure(wanted) != _is_secure(media.proto):
            raise RelayError(
                f"Cannot translate {media.proto} to {wanted}: this relay passes SRTP through "
                "and does not encrypt or decrypt"
            )
        media.proto = wanted
        peer.protocol = wanted

    @staticmethod
    def _negotiate_mux(
        media: MediaDescription,
        leg: MediaLeg,
        peer: MediaLeg,
        options: SignalOptions,
        *,
        offer: bool,
    ) -> bool:
        """rtcp-mux (RFC 5761) toward the receiver; sets who muxes. ``leg`` is the sender's."""
        policy = options.rtcp_mux
        has_mux = media.rtcp_mux
        if offer:
            leg.offered_mux = has_mux
            leg.mux_policy = policy
            if "require" in policy:
                peer.rtcp_mux = True
                return True
            if "offer" in policy:
                return True
            return has_mux and not ({"demux", "reject"} & policy)
        # An answer: the sender answers the receiver's offer.
        leg.rtcp_mux = has_mux or "require" in peer.mux_policy
        policy = peer.mux_policy | policy
        if "reject" in policy:
            peer.rtcp_mux = False
        elif "demux" in policy:
            peer.rtcp_mux = peer.offered_mux
        else:
            peer.rtcp_mux = peer.offered_mux and leg.rtcp_mux
        return peer.rtcp_mux

    # -- the end of calls

    def delete(self, call_id: str, from_tag: str | None = None) -> dict[str, Any]:
        """End a call (every port closed); returns its statistics as ``query`` would."""
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall("Unknown call-id")
        if from_tag is not None and from_tag not in call.monologues:
            raise UnknownCall("Unknown from-tag")
        stats = call.describe()
        self.end_call(call, "delete", report=False)
        return stats

    def query(self, call_id: str) -> dict[str, Any]:
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall("Unknown call-id")
        return call.describe()

    def list_calls(self, limit: int = 32) -> list[str]:
        return list(self.calls)[:limit]

    def end_call(self, call: Call, reason: str, *, report: bool = True) -> list[Any]:
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
        waits = call.close()
        if reason == "timeout":
            _log.info("media relay: call {call_id} timed out", call_id=call.call_id)
        if report:
            for observer in list(self.timeout_observers):
                try:
                    observer(call.call_id, reason)
                except Exception:
                    _log.failure("media relay: timeout observer failed")
        return waits

    def stop(self) -> list[Any]:
        """End every call (reported as "shutdown"); returns the port-closing Deferreds."""
        waits: list[Any] = []
        for call in list(self.calls.values()):
            waits.extend(self.end_call(call, "shutdown"))
        return waits


def _is_secure(proto: str) -> bool:
    return "SAVP" in proto.upper()
