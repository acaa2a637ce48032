"""The relay's settings, declared once: :class:`RelaySettings` and its one reader.

Both ways of starting the relay read their settings here: the ``[media]`` section of the
proxy's config file (:mod:`sipproxy.plugins.media`, keys ``port_min``, ``timeout``, ...) and the
``twistd sipproxy-relay`` command line (:mod:`sipproxy.media.tap`, ``--port-min``,
``--timeout``, ...). Each field carries its documentation and bounds in its metadata
(``doc``, ``min``, ``max``); :func:`read_relay_settings` checks a mapping of raw values against
them and raises the project's one-line :class:`~sipproxy.config.ConfigError` naming the key.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

from sipproxy.config import ConfigError
from sipproxy.media.ports import RelayInterface

__all__ = [
    "DEFAULT_CACHE_TTL",
    "DEFAULT_KERNEL_POLL",
    "DEFAULT_OFFER_TIMEOUT",
    "DEFAULT_SILENT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "KERNEL_MODES",
    "RELAY_KEYS",
    "RelaySettings",
    "parse_address_port",
    "read_relay_settings",
]

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_SILENT_TIMEOUT: Final = 3600.0
DEFAULT_OFFER_TIMEOUT: Final = 3600.0
#: How long the NG server answers a retransmitted request from its cache (seconds).
DEFAULT_CACHE_TTL: Final = 30.0
#: How often the kernel fast path's counters are read (seconds), for statistics and timeouts.
DEFAULT_KERNEL_POLL: Final = 2.0
KERNEL_MODES: Final = ("auto", "on", "off")
#: one call needs a port pair per party
MIN_PAIRS: Final = 2
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_WEEK: Final = 7 * 86400


def _setting(default: Any, doc: str, *, min: float | None = None,
             max: float | None = None) -> Any:
    """A field users set: its default, documentation and bounds."""
    return field(default=default, metadata={"doc": doc, "min": min, "max": max})


@dataclass(frozen=True)
class RelaySettings:
    """What the relay needs: its interfaces (the first is the default), the port range, the
    timeouts, the NG control address (None: in process only) and the kernel fast path.
    Fields without ``doc`` in their metadata are not user settings."""

    interfaces: tuple[RelayInterface, ...] = _setting(
        (RelayInterface("default", "127.0.0.1"),),
        "the local addresses ports are opened on, NAME/ADDRESS[!ADVERTISED]; the first is "
        "the default")
    port_min: int = _setting(30000, "lowest media port (RTP even, RTCP = RTP + 1)",
                             min=1024, max=65534)
    port_max: int = _setting(40000, "highest media port", min=1025, max=65535)
    timeout: float = _setting(DEFAULT_TIMEOUT, "seconds of RTP silence that end a call",
                              min=1, max=86400)
    silent_timeout: float = _setting(DEFAULT_SILENT_TIMEOUT, "the same for a stream on hold",
                                     min=1, max=_WEEK)
    offer_timeout: float = _setting(DEFAULT_OFFER_TIMEOUT,
                                    "seconds a call may wait for its answer", min=1, max=_WEEK)
    listen_ng: tuple[str, int] | None = _setting(
        None, "ADDRESS:PORT (UDP) to answer NG commands on")
    kernel: str = _setting(
        "auto", "the kernel fast path (nftables netdev ingress rules; needs CAP_NET_ADMIN): "
        "auto (where nft and the kernel can), on, off")
    kernel_table: str | None = _setting(
        None, "the fast path's nftables table (default sipproxy_relay_<pid>)")
    cache_ttl: float = DEFAULT_CACHE_TTL
    kernel_poll: float = DEFAULT_KERNEL_POLL


#: the fields users set, by name
RELAY_KEYS: Final = tuple(f.name for f in fields(RelaySettings) if "doc" in f.metadata)

ErrorFactory = Callable[[str, str], ConfigError]


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


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    return repr(value) if isinstance(value, int | float) else type(value).__name__


def _number(name: str, value: object, error: ErrorFactory, *, text: bool) -> float:
    meta = next(f for f in fields(RelaySettings) if f.name == name)
    integer = meta.type in ("int", int)
    found: float = math.nan
    if text and isinstance(value, str):
        try:
            found = int(value) if integer else float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool) \
            and (not integer or isinstance(value, int)):
        found = value
    lo, hi = meta.metadata["min"], meta.metadata["max"]
    if not lo <= found <= hi:  # (nan never is)
        kind = "an integer" if integer else "a number"
        raise error(name, f"must be {kind} from {lo:g} to {hi:g}, got {_show(value)}")
    return found


def _interfaces(values: Sequence[object], error: ErrorFactory) -> tuple[RelayInterface, ...]:
    found: list[RelayInterface] = []
    for item in values:
        if isinstance(item, RelayInterface):
            interface = item
        elif isinstance(item, str):
            try:
                interface = RelayInterface.parse(item)
            except ValueError as e:
                raise error("interfaces", f'{e} in "{item}"') from None
        else:
            raise error("interfaces", f"must be NAME/ADDRESS[!ADVERTISED], got {_show(item)}")
        if any(f.name == interface.name for f in found):
            raise error("interfaces", f'"{interface.name}" given twice')
        found.append(interface)
    return tuple(found)


def _kernel(value: object, error: ErrorFactory, *, text: bool) -> str:
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, str) and value in KERNEL_MODES:
        return value
    choices = "auto, on or off" if text else '"auto", "on" or "off" (or true, false)'
    raise error("kernel", f"must be {choices}, got {_show(value)}")


def read_relay_settings(values: Mapping[str, object], error: ErrorFactory, *,
                        text: bool = False) -> RelaySettings:
    """Check the raw ``values`` of the settings in :data:`RELAY_KEYS` (a missing one takes
    its default; other keys are the caller's) and return them as :class:`RelaySettings`.

    :param error: makes the one-line error for a field name and the problem (the caller
        knows how the key is spelled: ``media.port_min``, ``--port-min``).
    :param text: the values are command-line text (``"60"``), not config-file values.
    :raises ConfigError: for the first value that is wrong.
    """
    got: dict[str, Any] = {}
    for f in fields(RelaySettings):
        if f.name not in RELAY_KEYS or f.name not in values:
            continue
        value = values[f.name]
        if value is None and f.default is None:
            continue
        if f.metadata["min"] is not None:
            got[f.name] = _number(f.name, value, error, text=text)
        elif f.name == "interfaces":
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise error(f.name, f"must be a list, got {_show(value)}")
            if value:
                got[f.name] = _interfaces(value, error)
        elif f.name == "listen_ng":
            address = parse_address_port(value) if isinstance(value, str) else None
            if address is None:
                raise error(f.name, f"must be ADDRESS:PORT, got {_show(value)}")
            got[f.name] = address
        elif f.name == "kernel":
            got[f.name] = _kernel(value, error, text=text)
        elif f.name == "kernel_table":
            if not isinstance(value, str) or not _TABLE_NAME.fullmatch(value):
                raise error(f.name, f"must be an nftables name, got {_show(value)}")
            got[f.name] = value
        else:  # a new field needs its check here
            raise AssertionError(f"no check for the relay setting {f.name}")
    settings = RelaySettings(**got)
    lowest = settings.port_min + settings.port_min % 2
    if (settings.port_max - lowest + 1) // 2 < MIN_PAIRS:
        raise error("port_max", f"must be at least {lowest + 2 * MIN_PAIRS - 1} (room for "
                                f"{MIN_PAIRS} even/odd port pairs from {lowest}, one call's), "
                                f"got {settings.port_max}")
    return settings

