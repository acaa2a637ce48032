"""The proxy's own addresses: which host and port name it toward a peer, and whether a host,
URI or Via names one of its sockets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sipproxy.addressing import WILDCARD_ADDRESSES as WILDCARDS
from sipproxy.addressing import is_ip_literal

if TYPE_CHECKING:
    from sipproxy.context import Target
    from sipproxy.message import Source, Via
    from sipproxy.transport.manager import Listener, TransportManager
    from sipproxy.transport.sides import SourceAddresses
    from sipproxy.uri import URI

__all__ = ["OwnAddresses"]

#: bound on each cache (the same few peers, every request)
_CACHE_SIZE = 10000


class OwnAddresses:
    """What names the proxy, from its listeners (and the connections it opened, RFC 5923).

    :param transports: the transport manager (its ``listeners``; a double may lack the flow
        methods, then no connection of ours is considered).
    :param domains: the configured domains, lower case.
    """

    def __init__(self, transports: TransportManager, domains: frozenset[str]) -> None:
        self.transports = transports
        self.domains = domains
        #: the transports know the connections the proxy opened (RFC 5923 reuse); doubles may not
        self.opens_flows = hasattr(transports, "flow_address")
        #: the route lookups (the transports' own, shared with their choice of listener)
        self.sources: SourceAddresses = transports.sides.sources
        self._own_cache: dict[tuple[str, int], bool] = {}

    @property
    def listeners(self) -> list[Listener]:
        return self.transports.listeners

    def local_address_for(self, remote: str) -> str:
        """The local IP the kernel would use toward ``remote`` (no packet is sent; loopback
        when it has no route there), from the transports' route lookups."""
        local = self.sources.source_for(remote)
        if local is not None:
            return local
        return "::1" if ":" in remote else "127.0.0.1"

    def advertised(
        self, listener: Listener | None, remote: str, target: Target | None = None
    ) -> tuple[str, int]:
        """The host and port that name us toward ``remote``: the listener's (a wildcard
        one's: the address the kernel sends from toward there), or, over a connection we
        opened from a side without a TLS listener, that connection's (RFC 5923)."""
        if target is not None and self.opens_flows:
            flow = self.transports.flow_address(target, listener)
            if flow is not None:
                return flow
        if listener is None:
            return self.local_address_for(remote), 5060
        host = listener.via_host
        if host in WILDCARDS:
            host = self.local_address_for(remote)
        return host, listener.port

    def is_own_address(self, host: str, port: int | None) -> bool:
        """Does ``host[:port]`` name one of our listeners (configured, advertised or, for
        wildcard listeners, an address of this machine)? ``port`` None: any port."""
        if port is not None and self.opens_flows and self.transports.is_flow_port(port):
            # the local port of a connection we opened: ours when the host is (not cached:
            # such ports come and go)
            return self.is_own_address(host, None)
        key = (host, port or 0)
        cached = self._own_cache.get(key)
        if cached is not None:
            return cached
        own = False
        for lst in self.listeners:
            if port is not None and lst.port != port:
                continue
            if host in (lst.via_host.lower(), lst.address):
                own = True
                break
            if lst.address in WILDCARDS and is_ip_literal(host) \
                    and self.local_address_for(host) == host:
                own = True
                break
        if len(self._own_cache) < _CACHE_SIZE:
            self._own_cache[key] = own
        return own

    def is_local_domain(self, host: str) -> bool:
        """Is the proxy registrar for ``host`` (a configured domain or an own address)?"""
        host = host.lower()
        return host in self.domains or self.is_own_address(host, None)

    def is_local_uri(self, uri: URI) -> bool:
        """A Request-URI we route with the location service: our domain, or our own socket."""
        return uri.is_sip and (uri.host.lower() in self.domains or self.is_own_uri(uri))

    def is_own_uri(self, uri: URI) -> bool:
        """Does ``uri`` name one of our sockets (host and port; the scheme's default port)?"""
        if not uri.is_sip:
            return False
        port = uri.port if uri.port is not None else (5061 if uri.secure else 5060)
        return self.is_own_address(uri.host.lower(), port)

    def is_own_via(self, via: Via) -> bool:
        """Was ``via`` put there by this proxy?"""
        port = via.port if via.port is not None else 5060
        return self.is_own_address(via.host.lower(), port)

    def listener_of(self, source: Source) -> Listener | None:
        """The listener a message with ``source`` arrived on (for a connection the proxy
        opened: that side's listener, of the same transport if there is one)."""
        transport = source.transport.upper()
        for lst in self.listeners:
            if lst.transport == transport and lst.port == source.local_port and (
                lst.address == source.local_host or lst.address in WILDCARDS
            ):
                return lst
        # a connection the proxy opened itself (its local port is no listener's): what names
        # us on that side is that side's listener, of the same transport if there is one
        side = [lst for lst in self.listeners if source.side and lst.side == source.side]
        return next((lst for lst in side if lst.transport == transport), side[0] if side else None)
