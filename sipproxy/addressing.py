"""IP address predicates shared by the core, the transports and the plugins.

Two meanings of "private" exist and are kept apart by name:

- :data:`INSIDE_NETWORKS`: the networks the ``nat`` plugin treats as the LAN side by default
  (``[nat] inside_networks``): RFC 1918, IPv4 link-local and IPv6 unique-local.
- :data:`NON_PUBLIC_NETWORKS`: every range that cannot be reached from the Internet, as the
  ``media`` plugin judges an SDP address written by a party behind a NAT: the inside networks
  plus carrier-grade NAT (RFC 6598) and IPv6 link-local.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = [
    "INSIDE_NETWORKS",
    "NON_PUBLIC_NETWORKS",
    "IPNetwork",
    "in_networks",
    "ip_of",
    "is_ip_literal",
    "is_non_public",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The default LAN side of the ``nat`` plugin (its ``inside_networks``), as text.
INSIDE_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7",
)
#: Every range not reachable from the Internet: :data:`INSIDE_NETWORKS`, carrier-grade NAT
#: (RFC 6598) and IPv6 link-local.
NON_PUBLIC_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "fc00::/7", "fe80::/10",
)
_NON_PUBLIC = tuple(ipaddress.ip_network(n) for n in NON_PUBLIC_NETWORKS)


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is the literal of (IPv6 bare or in brackets), None for a name."""
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return None


def is_ip_literal(host: str) -> bool:
    """Is ``host`` an IPv4 or IPv6 address (IPv6 without brackets), not a name?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def in_networks(host: str, networks: Iterable[IPNetwork]) -> bool:
    """Is ``host`` (an IP literal, IPv6 bare or in brackets) in one of ``networks``? A name
    is in none."""
    ip = ip_of(host)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


@functools.lru_cache(maxsize=4096)
def is_non_public(host: str) -> bool:
    """Is ``host`` an address in :data:`NON_PUBLIC_NETWORKS` (cached: the same few hosts)?"""
    return in_networks(host, _NON_PUBLIC)
