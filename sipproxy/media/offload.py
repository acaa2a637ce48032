"""The engine's side of the kernel fast path: which stream pairs are offloaded, and their counts.

Once both streams of a pair (the same component of the same media, one per party) are latched,
:class:`KernelOffloads` hands the pair to a :class:`KernelOffloader` (in production
:class:`sipproxy.media.kernel.KernelForwarder`, which installs nftables rules); it polls the
rules' counters into the streams' statistics and timeouts, and takes the pair back to userspace
when an endpoint moves, the call ends, or the rules catch nothing. The offloader is reached only
through the protocols below, so the bookkeeping here does not depend on nftables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sipproxy.media.kernel import HEADER_BYTES, Unsuitable
from sipproxy.media.ports import Address

if TYPE_CHECKING:
    from sipproxy.media.kernel import KernelForwarder, Offload
    from sipproxy.media.model import PacketStream

__all__ = [
    "KERNEL_MISSED",
    "Counters",
    "KernelOffloader",
    "KernelOffloads",
    "OffloadRules",
    "StreamOffload",
]

_log = Logger(namespace="sipproxy.media.relay")

#: Packets of one direction that still reached userspace from the latched source after the
#: kernel rules went in, with the kernel's counter still at 0: the rules catch nothing (the
#: packets arrive on another device than the route to their source, or carry no UDP
#: checksum), so they go, and the stream stays in userspace.
KERNEL_MISSED: Final = 50

#: counter name -> (packets, bytes), as the kernel counts them (IP and UDP headers included)
Counters = dict[str, tuple[int, int]]


class OffloadRules(Protocol):
    """The installed rules of one stream pair, as the offloader hands them out."""

    @property
    def counters(self) -> tuple[str, str]:
        """The name of each direction's counter (first stream's packets, then the other's)."""

    @property
    def seen(self) -> list[tuple[int, int]]:
        """Each direction's counter when last read, (packets, bytes); updated in place."""


RulesT = TypeVar("RulesT", bound=OffloadRules)


class KernelOffloader(Protocol[RulesT]):
    """What the engine needs from a kernel fast path (a started one)."""

    #: called with the rules that went with the kernel's table once it is made again: the
    #: engine installs their streams anew
    lost: Callable[[list[RulesT]], None] | None

    def install(self, a: tuple[Address, Address],
                b: tuple[Address, Address]) -> defer.Deferred[RulesT]:
        """Forward between ``a`` = (A's source, the relay port A sends to) and ``b`` (the
        same for B); fails with :class:`~sipproxy.media.kernel.Unsuitable` where it cannot
        serve the pair."""

    def remove(self, rules: RulesT, *, first: bool = False) -> defer.Deferred[Counters]:
        """Delete ``rules``; fires with their counters' last values. ``first``: ahead of
        every command still waiting."""

    def counters(self) -> defer.Deferred[Counters]:
        """Every counter's current value."""


if TYPE_CHECKING:

    def _implements(forwarder: KernelForwarder) -> KernelOffloader[Offload]:
        """(mypy checks here that the nftables forwarder is a :class:`KernelOffloader`)"""
        return forwarder


class StreamOffload:
    """A stream pair (same component, both parties) forwarded by the kernel, or about to be."""

    __slots__ = ("active", "dropped", "handle", "streams", "userspace_at_install")

    def __init__(self, streams: tuple[PacketStream, PacketStream]) -> None:
        self.streams = streams
        #: the offloader's rules once installed
        self.handle: OffloadRules | None = None
        self.active = False
        self.dropped = False
        #: each stream's userspace packet count from its latched source when the rules went in
        self.userspace_at_install = (0, 0)


class KernelOffloads:
    """Every stream pair of one engine that is in the kernel or on its way there.

    :param clock: the engine's ``IReactorTime`` (counter polls, last-packet times).
    :param poll: seconds between counter polls while any pair is in the kernel.
    """

    def __init__(self, clock: Any, poll: float) -> None:
        self.clock = clock
        self.poll = poll
        #: the kernel fast path, or None: userspace only
        self.kernel: KernelOffloader[Any] | None = None
        self._offloads: set[StreamOffload] = set()
        self._poller: LoopingCall | None = None
        self._logged: set[str] = set()

    def use(self, forwarder: KernelOffloader[Any] | None,
            latched: Iterable[PacketStream]) -> None:
        """Offload with ``forwarder`` from now, the ``latched`` streams too (None: no more
        new ones)."""
        self.kernel = forwarder
        if forwarder is None:
            return
        forwarder.lost = self._lost
        for stream in latched:
            if not stream.no_kernel and stream.offload is None:
                self.offer(stream)

    def _lost(self, handles: list[Any]) -> None:
        """Their rules went with the kernel's table (made again now): install them anew."""
        for offload in [o for o in self._offloads if o.handle in handles]:
            self._forget(offload)
            self.offer(offload.streams[0])

    def active(self) -> list[StreamOffload]:
        """The pairs the kernel forwards now."""
        return [o for o in self._offloads if o.active]

    def _log_once(self, kind: str, text: str, *, warn: bool = True) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            (_log.warn if warn else _log.info)("media relay: {text} (logged once)", text=text)

    def offer(self, stream: PacketStream) -> None:
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

    def _installed(self, handle: OffloadRules, offload: StreamOffload) -> None:
        offload.handle = handle
        if offload.dropped or self.kernel is None:  # gone meanwhile (an endpoint moved, ...)
            self._forget(offload)
            self._remove(offload, first=True)
            return
        # the rules took over atomically: what reached the sockets before is still
        # forwarded by userspace, what comes now never reaches them
        offload.active = True
        first, second = offload.streams
        offload.userspace_at_install = (first.packets - first.foreign,
                                        second.packets - second.foreign)
        if self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.clock
            self._poller.start(self.poll, now=False).addErrback(
                lambda f: _log.failure("media relay: kernel counter poll", f))

    def _install_failed(self, failure: Any, offload: StreamOffload) -> None:
        if offload.dropped:  # gone meanwhile (the call ended, the relay is stopping)
            return
        if failure.check(Unsuitable):
            self._log_once("unsuitable", f"kernel fast path: cannot serve a stream, it stays "
                           f"in userspace: {failure.getErrorMessage()}", warn=False)
        else:
            self._log_once("install", f"kernel fast path: installing rules failed, "
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
        if not self._offloads and self._poller is not None:
            poller, self._poller = self._poller, None
            if poller.running:
                poller.stop()

    def drop(self, offload: StreamOffload, why: str, *, for_good: bool = False,
             first: bool = False) -> defer.Deferred[Any] | None:
        """Back to userspace for the pair.

        :param why: logged once when not empty.
        :param for_good: the pair never goes to the kernel again.
        :param first: the rules' removal goes ahead of every command waiting (installs, other
            calls' ends, counter polls): the rules send to an endpoint that moved.
        :returns: a Deferred that fires (never fails) when the rules are gone, or None.
        """
        if why:
            self._log_once(why[:12], f"kernel fast path: back to userspace: {why}",
                           warn=for_good)
        if for_good:
            for s in offload.streams:
                s.no_kernel = True
        installed = offload.handle is not None and not offload.dropped
        self._forget(offload)
        if installed:
            return self._remove(offload, first=first)
        return None

    def _remove(self, offload: StreamOffload, *,
                first: bool = False) -> defer.Deferred[Any] | None:
        if self.kernel is None:  # stopped: deleting the table takes every rule with it
            return None
        d = self.kernel.remove(offload.handle, first=first)
        d.addCallback(lambda final: self._count(offload, final))
        d.addErrback(lambda f: self._log_once(
            "remove", f"kernel fast path: removing rules failed: {f.getErrorMessage()}"))
        return d

    def _count(self, offload: StreamOffload, counters: Counters) -> None:
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
            self.drop(offload, "the kernel rules caught none of a stream's packets "
                      "(they arrive on another device than the route to their source, "
                      "or without a UDP checksum): it stays in userspace", for_good=True)

    def _poll(self) -> defer.Deferred[Any] | None:
        if self.kernel is None:
            return None
        d = self.kernel.counters()

        def got(counters: Counters) -> None:
            for offload in list(self._offloads):
                if offload.active:
                    self._count(offload, counters)

        d.addCallback(got)
        d.addErrback(lambda f: self._log_once(
            "poll", f"kernel fast path: reading counters failed: {f.getErrorMessage()}"))
        return d
