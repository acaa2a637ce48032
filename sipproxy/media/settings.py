"""The relay's settings, declared once: :class:`RelaySettings`.

Both ways of starting the relay read them: the ``[media]`` section of the proxy's config file
(:mod:`sipproxy.plugins.media`, whose settings add its own keys to these: ``port_min``,
``timeout``, ...) and the ``twistd sipproxy-relay`` command line (:mod:`sipproxy.media.tap`, an
option per key: ``--port-min``, ``--timeout``, ...). Each key is a
:func:`~sipproxy.settings.setting` field, read by :func:`~sipproxy.settings.read_section` with
the project's one-line :class:`~sipproxy.settings.ConfigError` naming the key;
:func:`check_port_range` is the one check across keys.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from sipproxy.media.ports import RelayInterface
from sipproxy.settings import Section, setting, show

__all__ = [
    "DEFAULT_CACHE_TTL",
    "DEFAULT_INTERFACES",
    "DEFAULT_KERNEL_POLL",
    "DEFAULT_OFFER_TIMEOUT",
    "DEFAULT_SILENT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "KERNEL_MODES",
    "RelaySettings",
    "check_port_range",
    "parse_address_port",
]

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_SILENT_TIMEOUT: Final = 3600.0
DEFAULT_OFFER_TIMEOUT: Final = 3600.0
#: How long the NG server answers a retransmitted request from its cache (seconds).
DEFAULT_CACHE_TTL: Final = 30.0
#: How often the kernel fast path's counters are read (seconds), for statistics and timeouts.
DEFAULT_KERNEL_POLL: Final = 2.0
KERNEL_MODES: Final = ("auto", "on", "off")
#: The relay's interfaces when none are given: one, on the loopback address.
DEFAULT_INTERFACES: Final = (RelayInterface("default", "127.0.0.1"),)
#: one call needs a port pair per party
MIN_PAIRS: Final = 2
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_WEEK: Final = 7 * 86400


def parse_address_port(text: str) -> tuple[str, int] | None:
    """``ADDRESS:PORT`` (``[v6]:PORT`` too) with an IP address; None when it is not one."""
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port_text)


def _listen_address(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (``[v6]:PORT`` too) with an IP address, as (address, port)."""
    address = parse_address_port(text)
    if address is None:
        raise ValueError(f"must be ADDRESS:PORT, got {show(text)}")
    return address


def _kernel_mode(value: object) -> str:
    """One of :data:`KERNEL_MODES`; ``true`` and ``false`` are ``"on"`` and ``"off"``."""
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, str) and value in KERNEL_MODES:
        return value
    raise ValueError(f'must be "auto", "on" or "off" (or true, false), got {show(value)}')


def _nftables_name(text: str) -> str:
    """A name nftables takes for a table."""
    if not _TABLE_NAME.fullmatch(text):
        raise ValueError(f"must be an nftables name, got {show(text)}")
    return text


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What the relay needs: the port range, the timeouts, the NG control address (None: in
    process only) and the kernel fast path (the keys); and, not keys, its interfaces (the first
    is the default: the media plugin takes them from its listeners, ``twistd
    sipproxy-relay`` from ``--interface``) and two intervals the tests shorten."""

    port_min: int = setting(
        30000, min=1024, max=65534, doc="Lowest media port (RTP even, RTCP = RTP + 1).")
    port_max: int = setting(40000, min=1025, max=65535, doc="Highest media port.")
    timeout: float = setting(
        DEFAULT_TIMEOUT, min=1, max=86400, doc="Seconds of RTP silence that end a call.")
    silent_timeout: float = setting(
        DEFAULT_SILENT_TIMEOUT, min=1, max=_WEEK, doc="The same for a stream on hold.")
    offer_timeout: float = setting(
        DEFAULT_OFFER_TIMEOUT, min=1, max=_WEEK, doc="Seconds a call may wait for its answer.")
    listen_ng: tuple[str, int] | None = setting(
        None, kind="str", parse=_listen_address,
        doc="ADDRESS:PORT (UDP) to answer NG commands on.")
    kernel: str = setting(
        "auto", kind="any", choices=KERNEL_MODES, parse=_kernel_mode,
        doc="The kernel fast path (nftables netdev ingress rules; needs CAP_NET_ADMIN): auto"
            " (where nft and the kernel can), on, off.")
    kernel_table: str | None = setting(
        None, parse=_nftables_name,
        doc="The fast path's nftables table (default sipproxy_relay_<pid>).")
    interfaces: tuple[RelayInterface, ...] = DEFAULT_INTERFACES
    cache_ttl: float = DEFAULT_CACHE_TTL
    kernel_poll: float = DEFAULT_KERNEL_POLL


def check_port_range(settings: RelaySettings, table: Section) -> None:
    """The port range holds one call (a port pair per party).

    :raises ConfigError: naming ``port_max`` of ``table``.
    """
    lowest = settings.port_min + settings.port_min % 2
    if (settings.port_max - lowest + 1) // 2 < MIN_PAIRS:
        raise table.error("port_max", f"must be at least {lowest + 2 * MIN_PAIRS - 1} (room for "
                                      f"{MIN_PAIRS} even/odd port pairs from {lowest}, one "
                                      f"call's), got {settings.port_max}")
