"""IP address predicates shared by the core, the transports and the plugins.

Two meanings of "private" exist and are kept apart by name:

- :data:`PRIVATE_NETWORKS` (:func:`is_private`): the networks a LAN uses, and the ``nat``
  plugin's default LAN side (``[nat] inside_networks``): RFC 1918, IPv4 link-local and IPv6
  unique-local.
- :data:`NON_PUBLIC_NETWORKS` (:func:`is_non_public`): every range that cannot be reached from
  the Internet, as the ``media`` plugin judges an SDP address written by a party behind a
  NAT: the private networks plus carrier-grade NAT (RFC 6598) and IPv6 link-local.
- :data:`INTERNAL_NETWORKS`: a host on the LAN or this machine, the ``acl`` plugin's default
  inside (its ``inside_networks``): the private networks plus both link-locals and loopback.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = [
    "INTERNAL_NETWORKS",
    "NON_PUBLIC_NETWORKS",
    "PRIVATE_NETWORKS",
    "WILDCARD_ADDRESSES",
    "IPNetwork",
    "in_networks",
    "ip_of",
    "is_ip_literal",
    "is_non_public",
    "is_private",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Listener addresses that mean "every address of this machine" ("" too: no address given).
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
#: The networks a LAN uses (the ``nat`` plugin's default ``inside_networks``), as text.
PRIVATE_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fc00::/7",
)
#: Every range not reachable from the Internet: :data:`PRIVATE_NETWORKS`, carrier-grade NAT
#: (RFC 6598) and IPv6 link-local.
NON_PUBLIC_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "fc00::/7", "fe80::/10",
)
#: A host on the LAN or this machine (the ``acl`` plugin's default ``inside_networks``).
INTERNAL_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8",
    "fc00::/7", "fe80::/10", "::1/128",
)
_PRIVATE = tuple(ipaddress.ip_network(n) for n in PRIVATE_NETWORKS)
_NON_PUBLIC = tuple(ipaddress.ip_network(n) for n in NON_PUBLIC_NETWORKS)


@functools.lru_cache(maxsize=4096)
def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells (IPv6 bare or in brackets), ``None`` for a name.

    Cached: address checks run several times per message and hosts repeat."""
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


@functools.lru_cache(maxsize=4096)
def is_private(host: str) -> bool:
    """Is ``host`` an address in :data:`PRIVATE_NETWORKS` (cached: the same few hosts)?"""
    return in_networks(host, _PRIVATE)
