"""
Which side of the proxy a destination is on, and so which listener a request to it leaves from.

A destination is on the side whose interface the kernel routes it through: the side of the
listener bound to the address the kernel would send from toward it (:class:`SourceAddresses`,
a connected UDP socket's ``getsockname()``: a route lookup, no packet sent). A provider on a
private address reached through the outside interface (a SIP trunk over a VPN or a carrier's
network) is then outside, like a public one. ``[upstream] side`` names the side of the
upstream's addresses outright (:meth:`DestinationSides.pin`). When neither says (a loopback
destination, listeners on every address, a source address no listener has, or one that listeners
of both sides have), the address class decides: private, link-local and loopback addresses are
inside, the rest outside.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from sipproxy.addressing import INTERNAL_NETWORKS, WILDCARD_ADDRESSES, in_networks, ip_of

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from sipproxy.context import Target

__all__ = [
    "ROUTE_CACHE_SIZE",
    "ROUTE_TTL",
    "DestinationSides",
    "Sided",
    "SourceAddresses",
    "kernel_source_address",
    "listener_candidates",
    "pick_listener",
    "preferred_listener",
]

#: seconds a route lookup is trusted (routes change when a VPN comes up or goes down)
ROUTE_TTL = 30.0
#: destinations whose route lookup is remembered at most (the least recently used go first)
ROUTE_CACHE_SIZE = 4096
#: upstream addresses whose side ``[upstream] side`` pins at most (DNS may move the provider)
_PINNED_MAX = 64

_INTERNAL = tuple(ipaddress.ip_network(n) for n in INTERNAL_NETWORKS)


def kernel_source_address(host: str) -> str | None:
    """
    The local address the kernel sends from toward ``host`` (an IP literal), or ``None`` when
    it has no route there.

    ``connect()`` on a UDP socket only looks the route up: no packet is sent and nothing
    waits, so the reactor is never blocked. A name is never looked up here (that would be a
    blocking DNS query): it gets ``None``.
    """
    ip = ip_of(host)
    if ip is None:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((str(ip), 9))
            local = str(s.getsockname()[0])
    except OSError:
        return None
    return local.split("%", 1)[0]  # an IPv6 link-local source carries its scope


class SourceAddresses:
    """
    :func:`kernel_source_address` per destination, remembered for ``ttl`` seconds of
    ``clock`` and for at most ``size`` destinations (the least recently used forgotten first).

    :param lookup: the route lookup (tests give a table's).
    """

    def __init__(
        self,
        clock: IReactorTime,
        lookup: Callable[[str], str | None] = kernel_source_address,
        ttl: float = ROUTE_TTL,
        size: int = ROUTE_CACHE_SIZE,
    ) -> None:
        self.clock = clock
        self.lookup = lookup
        self.ttl = ttl
        self.size = size
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    def source_for(self, host: str) -> str | None:
        """The address the kernel sends from toward ``host``; ``None``: no route, or a name."""
        return self.looked_up(host)[1]

    def looked_up(self, host: str) -> tuple[float, str | None]:
        """Until when the lookup for ``host`` holds, and its :meth:`source_for` answer."""
        now = self.clock.seconds()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(host)
            return cached
        entry = (now + self.ttl, self.lookup(host))
        self._cache[host] = entry
        self._cache.move_to_end(host)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return entry


class Sided(Protocol):
    """What the side rules read of a listener (the transports' and the test doubles')."""

    @property
    def side(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def address(self) -> str: ...


L = TypeVar("L", bound=Sided)


class DestinationSides:
    """
    The side of a destination (see the module docstring) for the proxy's ``listeners``.

    :param sources: the route lookups.
    """

    def __init__(self, listeners: Sequence[Sided], sources: SourceAddresses) -> None:
        self.listeners = listeners
        self.sources = sources
        self._pinned: OrderedDict[str, str] = OrderedDict()
        #: host -> (until when, routed side, side): every request asks, the answer is kept as
        #: long as the route lookup it came from (the oldest forgotten first)
        self._answers: OrderedDict[str, tuple[float, str | None, str | None]] = OrderedDict()

    def pin(self, host: str, side: str) -> None:
        """Requests to ``host`` (an IP literal: an address of the upstream) leave from
        ``side``, whatever the route (``[upstream] side``)."""
        ip = ip_of(host)
        if ip is None:
            return
        for key in {host, str(ip)}:
            self._pinned[key] = side
            self._pinned.move_to_end(key)
            self._answers.pop(key, None)
        while len(self._pinned) > _PINNED_MAX:
            self._pinned.popitem(last=False)

    def routed_side(self, host: str) -> str | None:
        """
        The side the network puts ``host`` on: the pinned one, else the side of the listeners
        bound to the address the kernel sends from toward it. ``None`` when the network does not
        say: a name, a loopback address (every one is routed through ``lo``), no route, only
        wildcard listeners, or a source address no listener, or listeners of both sides, have.
        """
        return self._answer(host)[0]

    def side_of(self, host: str) -> str | None:
        """:meth:`routed_side`, else by address class (``None`` for a name)."""
        return self._answer(host)[1]

    def _answer(self, host: str) -> tuple[str | None, str | None]:
        pinned = self._pinned.get(host)
        if pinned is not None:
            return pinned, pinned
        now = self.sources.clock.seconds()
        cached = self._answers.get(host)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        ip = ip_of(host)
        if ip is None:
            return None, None
        until, routed = self._routed(ip, now)
        side = routed or ("inside" if in_networks(host, _INTERNAL) else "outside")
        self._answers[host] = (until, routed, side)
        self._answers.move_to_end(host)
        while len(self._answers) > self.sources.size:
            self._answers.popitem(last=False)
        return routed, side

    def _routed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                now: float) -> tuple[float, str | None]:
        """The routed side of ``ip`` and until when that holds (the route lookup's expiry)."""
        pinned = self._pinned.get(str(ip))  # pinned as spelled otherwise
        if pinned is not None or ip.is_loopback:
            return now + self.sources.ttl, pinned
        until, source = self.sources.looked_up(str(ip))
        if source is None:
            return until, None
        sides = {lst.side for lst in self.listeners
                 if lst.address not in WILDCARD_ADDRESSES and ip_of(lst.address) == ip_of(source)}
        return until, sides.pop() if len(sides) == 1 else None


def _version(address: str) -> int:
    return 6 if ":" in address else 4


def pick_listener(
    listeners: Sequence[L], sides: DestinationSides, target: Target,
    side: str | None = None, transport: str | None = None,
) -> L | None:
    """
    The listener a request to ``target`` leaves from (its Via/Record-Route address).

    Candidates have ``transport`` (default ``target.transport``; outgoing TLS leaves from a
    TCP, else UDP, listener when there is no TLS one; a TCP target with no TCP listener falls
    back to UDP), ``side`` when given, and an address family that fits an IP target. Without
    ``side``, the target's side (:meth:`DestinationSides.side_of`) is preferred.
    """
    ip = ip_of(target.host)
    candidates = listener_candidates(listeners, (transport or target.transport).upper(), side,
                                     ip.version if ip is not None else None)
    return preferred_listener(candidates, sides, target.host if ip is not None else None, side)


def listener_candidates(
    listeners: Sequence[L], wanted: str, side: str | None, version: int | None
) -> list[L]:
    """:func:`pick_listener`'s candidates, best first, for a target over ``wanted`` (upper
    case) whose address is of IP ``version`` (``None``: a name). They depend on nothing but
    the listeners, so a caller may keep them."""
    candidates = [lst for lst in listeners if lst.transport == wanted]
    if wanted == "TLS":
        # outgoing TLS needs no TLS listener: a TCP (else UDP) socket of the side names us
        # (a TLS listener for the phones inside does not name us toward the provider)
        candidates += [lst for lst in listeners if lst.transport == "TCP"]
        candidates += [lst for lst in listeners if lst.transport == "UDP"]
    if not candidates and wanted == "TCP":
        candidates = [lst for lst in listeners if lst.transport == "UDP"]
    if side is not None:
        candidates = [lst for lst in candidates if lst.side == side]
    if version is not None:
        fitting = [lst for lst in candidates if _version(lst.address) == version]
        candidates = fitting or candidates
    return candidates


def preferred_listener(
    candidates: Sequence[L], sides: DestinationSides, ip_host: str | None, side: str | None
) -> L | None:
    """:func:`pick_listener`'s choice among ``candidates``: without ``side``, the first on
    the side of ``ip_host`` (the target's IP address; ``None`` for a name), else the first."""
    if not candidates:
        return None
    if side is None and ip_host is not None:
        preferred = sides.side_of(ip_host)
        for lst in candidates:
            if lst.side == preferred:
                return lst
    return candidates[0]
