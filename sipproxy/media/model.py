"""The relay's call model: calls, parties, media legs and packet streams, and their state.

The model follows rtpengine's (``call.h``), so that the NG protocol maps onto it one to one:

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

Timeouts (all from the engine's ``IReactorTime``): a call with only an offer ends after
``offer_timeout``; after the answer, an RTP stream that should be sending (by its SDP direction)
and has been silent for ``timeout`` ends the call, a held one after ``silent_timeout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet.interfaces import IDelayedCall, IListeningPort

from sipproxy.media.ports import Address, PortAllocator, RelayInterface

if TYPE_CHECKING:
    from sipproxy.media.engine import RelayEngine
    from sipproxy.media.offload import StreamOffload

__all__ = ["Call", "Component", "MediaLeg", "Monologue", "PacketStream", "StreamTotals"]

Component = Literal["RTP", "RTCP"]


def _family(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def _endpoint_dict(ep: Address) -> dict[str, Any]:
    return {"family": _family(ep[0]), "address": ep[0], "port": ep[1]}


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
        """The engine this stream's call belongs to."""
        return self.leg.monologue.call.engine

    def set_advertised(self, ep: Address | None) -> None:
        """New signalling named ``ep``: learn the endpoint anew when it changed."""
        if ep != self.advertised:
            self.advertised = ep
            self.learned = None  # new signalling, new endpoint to learn
            if self.offload is not None:  # the kernel rules name the old endpoint
                self.engine.fast_path.drop(self.offload, "the endpoints changed", first=True)

    def received(self, data: bytes, source: Address) -> None:
        """A datagram from ``source`` on this port: latch, count, send it on to the peer."""
        leg = self.leg
        if self.learned is None:
            if not leg.asymmetric:
                self.learned = source
                fast_path = self.engine.fast_path
                if not self.no_kernel and fast_path.kernel is not None:
                    fast_path.offer(self)
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
        """The stream as an NG ``query`` reply describes it."""
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


class MediaLeg:
    """One ``m=`` line of one party, with its RTP and RTCP ports (opened at once)."""

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
        pair = allocator.allocate()
        self.rtp = PacketStream(self, "RTP", pair.number, pair.rtp)
        self.rtcp = PacketStream(self, "RTCP", pair.number + 1, pair.rtcp)
        pair.rtp_protocol.sink = self.rtp
        pair.rtcp_protocol.sink = self.rtcp
        self.closed = False

    def peer(self) -> MediaLeg | None:
        """The other party's leg of the same ``m=`` line, if any."""
        other = self.monologue.other
        if other is None:
            return None
        return other.medias.get(self.index)

    @property
    def streams(self) -> tuple[PacketStream, PacketStream]:
        return (self.rtp, self.rtcp)

    def close(self) -> list[Any]:
        """Close both ports (and their kernel rules); returns the Deferreds to wait for."""
        if self.closed:
            return []
        self.closed = True
        fast_path = self.monologue.call.engine.fast_path
        kernel = [fast_path.drop(s.offload, "") for s in self.streams if s.offload]
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
        """The leg as an NG ``query`` reply describes it."""
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
        """The leg of ``m=`` line ``index``, opened now if it is new."""
        leg = self.medias.get(index)
        if leg is None:
            engine = self.call.engine
            leg = MediaLeg(self, index, engine.allocator(self.interface))
            self.medias[index] = leg
        return leg

    def drop_leg(self, index: int) -> list[Any]:
        """Close the leg of ``m=`` line ``index`` (rejected or gone from the SDP)."""
        leg = self.medias.pop(index, None)
        return leg.close() if leg is not None else []

    def close(self) -> list[Any]:
        waits: list[Any] = []
        for leg in self.medias.values():
            waits.extend(leg.close())
        return waits

    def describe(self) -> dict[str, Any]:
        """The party as an NG ``query`` reply describes it."""
        out: dict[str, Any] = {"tag": self.tag, "created": int(self.created)}
        if self.label is not None:
            out["label"] = self.label
        if self.other is not None:
            out["in dialogue with"] = self.other.tag
        out["medias"] = [self.medias[i].describe() for i in sorted(self.medias)]
        return out


class Call:
    """Everything the relay holds for one Call-ID, and the timer that ends it when silent."""

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
        """The party ``tag``, made (facing ``interface``) if it is new."""
        found = self.monologues.get(tag)
        if found is None:
            found = Monologue(self, tag, interface)
            self.monologues[tag] = found
        return found

    def retag(self, mono: Monologue, tag: str) -> None:
        """``mono`` is known by ``tag`` from now (the answerer's tag arrived)."""
        if self.monologues.get(mono.tag) is mono:
            del self.monologues[mono.tag]
        mono.tag = tag
        self.monologues[tag] = mono

    def legs(self) -> Iterator[MediaLeg]:
        for mono in self.monologues.values():
            yield from mono.medias.values()

    # -- timeouts

    def deadline(self) -> float:
        """When the call ends unless something happens (an answer, a packet)."""
        engine = self.engine
        if not self.answered:
            return self.last_signal + engine.offer_timeout
        deadlines = [leg.deadline(engine) for leg in self.legs() if leg.peer() is not None]
        if not deadlines:
            return self.last_signal + engine.offer_timeout
        return min(deadlines)

    def schedule(self) -> None:
        """(Re)arm the timer for :meth:`deadline`."""
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
        """Stop the timer and close every port; returns the Deferreds to wait for."""
        self.ended = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waits: list[Any] = []
        for mono in self.monologues.values():
            waits.extend(mono.close())
        return waits

    def directions(self, caller_tag: str | None, now: float) -> list[dict[str, Any]]:
        """Per media line and direction, what the RTP port of the sending party got: the
        admin status page's ``media`` entries (:mod:`sipproxy.admin.status`). The party
        ``caller_tag`` (None: the first one the relay heard of) sends ``caller->callee``."""
        monologues = list(self.monologues.values())
        if caller_tag is None and monologues:
            caller_tag = monologues[0].tag
        result = []
        for mono in monologues:
            direction = "caller->callee" if mono.tag == caller_tag else "callee->caller"
            for index in sorted(mono.medias):
                leg = mono.medias[index]
                if leg.closed:
                    continue
                rtp = leg.rtp
                kernel = rtp.offload is not None and rtp.offload.active
                result.append({
                    "direction": direction,
                    "media": leg.type,
                    "packets": rtp.packets + rtp.kernel_packets,
                    "bytes": rtp.bytes + rtp.kernel_bytes,
                    "path": "kernel" if kernel else "userspace",
                    "last_packet_age": None if rtp.last_packet is None
                    else round(max(0.0, now - rtp.last_packet), 3),
                })
        return sorted(result, key=lambda m: m["direction"] != "caller->callee")

    def describe(self) -> dict[str, Any]:
        """The call as an NG ``query`` or ``delete`` reply describes it."""
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


class StreamTotals:
    """Packets and bytes relayed, summed by (interface name, path): the interface is the side
    of the party that sent them, the path ``"userspace"`` or ``"kernel"``. The engine keeps
    the totals of the calls that ended; the metrics add the live calls' counts to a copy."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}

    def copy(self) -> StreamTotals:
        """An independent copy."""
        other = StreamTotals()
        other.counts = {key: list(value) for key, value in self.counts.items()}
        return other

    def add(self, call: Call) -> None:
        """Add what every stream of ``call`` relayed."""
        for leg in call.legs():
            interface = leg.monologue.interface.name
            for stream in leg.streams:
                self._add((interface, "userspace"), stream.packets, stream.bytes)
                self._add((interface, "kernel"), stream.kernel_packets, stream.kernel_bytes)

    def _add(self, key: tuple[str, str], packets: int, size: int) -> None:
        if packets or size:
            counts = self.counts.setdefault(key, [0, 0])
            counts[0] += packets
            counts[1] += size
