"""The relay engine: ties the call model, the ports, offer/answer and the kernel fast path.

:class:`RelayEngine` is what the NG commands (:mod:`sipproxy.media.ng`) drive: ``offer`` and
``answer`` find or make the call's parties and legs (:mod:`sipproxy.media.model`), open their
ports (:mod:`sipproxy.media.ports`), and rewrite the SDP (:mod:`sipproxy.media.offer_answer`);
``delete``, ``query`` and ``list`` read and end calls. A call ended by the relay itself
(timeout, shutdown) is reported to every ``timeout_observers`` callback. Every end path
(delete, timeout, stop) closes every port of the call. Latched stream pairs go to the kernel
fast path when one is in use (:mod:`sipproxy.media.offload`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from sipproxy.media.errors import RelayError, UnknownCall
from sipproxy.media.model import Call, Monologue, PacketStream, StreamTotals
from sipproxy.media.offer_answer import (
    RelayedMedia,
    SignalOptions,
    answer_mux,
    check_stream_count,
    media_endpoints,
    offer_mux,
    rewrite_sdp,
    translate_protocol,
)
from sipproxy.media.offload import KernelOffloader, KernelOffloads, StreamOffload
from sipproxy.media.ports import DIRECTION_ALIASES, PortAllocator, RelayInterface
from sipproxy.media.settings import (
    DEFAULT_KERNEL_POLL,
    DEFAULT_OFFER_TIMEOUT,
    DEFAULT_SILENT_TIMEOUT,
    DEFAULT_TIMEOUT,
)
from sipproxy.sdp import SessionDescription

__all__ = ["RelayEngine"]

_log = Logger(namespace="sipproxy.media.relay")


class RelayEngine:
    """All calls of one relay.

    :param reactor: opens the UDP ports.
    :param clock: an ``IReactorTime`` that times everything.
    :param interfaces: the local addresses ports open on; the first is the default.
    """

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
        #: what the calls that ended relayed (the metrics add the live calls' counts to it)
        self.ended_totals = StreamTotals()
        self._allocators: dict[str, PortAllocator] = {}
        #: Called with (call_id, reason) when the relay ends a call itself ("timeout",
        #: "shutdown"): the proxy ends the SIP call.
        self.timeout_observers: list[Callable[[str, str], None]] = []
        #: the stream pairs in the kernel fast path
        self.fast_path = KernelOffloads(clock, kernel_poll)

    # -- the kernel fast path

    @property
    def kernel(self) -> KernelOffloader[Any] | None:
        """The kernel fast path in use, or None: userspace only."""
        return self.fast_path.kernel

    def use_kernel(self, forwarder: KernelOffloader[Any] | None) -> None:
        """Forward latched streams with ``forwarder`` (a started
        :class:`~sipproxy.media.kernel.KernelForwarder`) from now, the ones latched before it
        started too (None: no more new ones)."""
        latched: list[PacketStream] = []
        if forwarder is not None:
            latched = [stream for call in list(self.calls.values())
                       for leg in list(call.legs()) for stream in leg.streams
                       if stream.learned is not None]
        self.fast_path.use(forwarder, latched)

    def offloads(self) -> list[StreamOffload]:
        """The stream pairs the kernel forwards now."""
        return self.fast_path.active()

    # -- interfaces and ports

    def allocator(self, interface: RelayInterface) -> PortAllocator:
        """The port pairs of ``interface``'s address (one allocator per address)."""
        found = self._allocators.get(interface.address)
        if found is None:
            found = PortAllocator(self.reactor, interface.address, self.port_min, self.port_max)
            self._allocators[interface.address] = found
        return found

    def interface(self, name: str | None) -> RelayInterface:
        """The interface an NG ``direction`` names (None: the default).

        :raises RelayError: for a name no interface has.
        """
        if name is None:
            return self.default_interface
        found = self.interfaces.get(name)
        if found is None:
            found = self.interfaces.get(DIRECTION_ALIASES.get(name, ""))
        if found is None:
            raise RelayError(f"Unknown interface {name!r}")
        return found

    def port_usage(self) -> dict[str, tuple[int, int]]:
        """Per interface name: (ports the relay holds open, ports of the range still free).
        Interfaces on one address share its port range, and so its counts."""
        usage: dict[str, tuple[int, int]] = {}
        for name, interface in self.interfaces.items():
            allocator = self.allocator(interface)
            used = len(allocator.in_use) * 2
            usage[name] = (used, allocator.pairs * 2 - used)
        return usage

    def open_ports(self) -> int:
        """How many UDP ports the relay holds open."""
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

    def _relay_sdp(
        self,
        sdp: SessionDescription,
        sender: Monologue,
        receiver: Monologue,
        options: SignalOptions,
        *,
        offer: bool,
    ) -> SessionDescription:
        """Take the sender's endpoints from ``sdp`` into its legs (opening the ports both
        parties need); return ``sdp`` rewritten for the receiver."""
        check_stream_count(sdp)
        relayed: dict[int, RelayedMedia] = {}
        for index, media in enumerate(sdp.media):
            if media.port == 0:
                self._drop(sender, receiver, index)
                continue
            ep = media_endpoints(media, options)
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
            protocol = translate_protocol(media.proto, options.transport_protocol,
                                          peer.own_protocol, offer=offer)
            if protocol is not None:
                peer.protocol = protocol
            if offer:
                leg.offered_mux = media.rtcp_mux
                leg.mux_policy = options.rtcp_mux
                mux = offer_mux(media.rtcp_mux, options.rtcp_mux)
            else:
                mux = answer_mux(media.rtcp_mux, options.rtcp_mux, peer.mux_policy,
                                 peer.offered_mux)
            if mux.sender is not None:
                leg.rtcp_mux = mux.sender
            if mux.receiver is not None:
                peer.rtcp_mux = mux.receiver
            relayed[index] = RelayedMedia(peer.rtp.local_port, peer.rtcp.local_port,
                                          mux.toward_receiver, protocol)
        for i in [i for i in sender.medias if i >= len(sdp.media)]:
            self._drop(sender, receiver, i)
        return rewrite_sdp(sdp, receiver.interface.sdp_address, relayed, options, offer=offer)

    def _drop(self, sender: Monologue, receiver: Monologue, index: int) -> None:
        sender.drop_leg(index)
        receiver.drop_leg(index)

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
        """A call's parties, legs, streams and counters (NG ``query``)."""
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall("Unknown call-id")
        return call.describe()

    def list_calls(self, limit: int = 32) -> list[str]:
        """Up to ``limit`` Call-IDs (NG ``list``)."""
        return list(self.calls)[:limit]

    def end_call(self, call: Call, reason: str, *, report: bool = True) -> list[Any]:
        """Close ``call``; ``report``: tell the ``timeout_observers`` (the relay ended it)."""
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
            self.ended_totals.add(call)
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
