"""The ``twistd sipproxy-relay`` command line: the media relay on its own, driven over NG.

    twistd -n sipproxy-relay --listen-ng 127.0.0.1:2223 --port-min 30000 --port-max 40000 \\
        --interface inside/192.168.1.1 --interface outside/203.0.113.1 [--kernel auto|on|off]

A bad option ends the command with one line on stderr naming the option, and exit status 2.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from sipproxy.config import ConfigError

__all__ = ["EXIT_CONFIG_ERROR", "Options", "makeService", "relay_config"]

EXIT_CONFIG_ERROR = 2
_PREFIX = "sipproxy-relay"


class Options(usage.Options):
    """Options of ``twistd sipproxy-relay``."""

    synopsis = "[--listen-ng HOST:PORT] [--interface NAME/ADDRESS[!ADVERTISED]]..."
    longdesc = (
        "Run the sipproxy media relay as its own process. It speaks rtpengine's NG protocol "
        "(bencode over UDP) on --listen-ng, so sipproxy, or any proxy that drives rtpengine, "
        "can use it. Each --interface names a local address ports are opened on; the first is "
        "the default, and NG 'direction' names select them (internal/external mean "
        "inside/outside)."
    )
    optParameters = [
        ["listen-ng", "n", "127.0.0.1:2223", "UDP address of the NG control protocol"],
        ["port-min", None, "30000", "lowest media port"],
        ["port-max", None, "40000", "highest media port"],
        ["timeout", None, "60", "seconds of RTP silence that end a call"],
        ["silent-timeout", None, "3600", "the same for a stream on hold"],
        ["offer-timeout", None, "3600", "seconds a call may wait for its answer"],
        ["kernel", None, "auto", "the kernel fast path (nftables netdev ingress rules; needs "
         "CAP_NET_ADMIN): auto (when nft and the kernel can), on, off"],
        ["kernel-table", None, None, "the fast path's nftables table (default "
         "sipproxy_relay_<pid>)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["interface"] = []

    def opt_interface(self, value: str) -> None:
        """NAME/ADDRESS or NAME/ADDRESS!ADVERTISED (the address put in SDP); repeatable
        (default: default/127.0.0.1)"""
        self["interface"].append(value)

    opt_i = opt_interface


def _number(options: usage.Options, key: str, lo: float, hi: float, integer: bool) -> Any:
    text = options[key]
    try:
        value: float = int(text) if integer else float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ConfigError.for_key(f"--{key}", f'must be {kind} from {lo} to {hi}, got "{text}"')
    return value


def relay_config(options: usage.Options) -> Any:
    """The RelayConfig the options describe; ConfigError (one line, naming the option)."""
    from sipproxy.media.relay import RelayInterface
    from sipproxy.media.service import RelayConfig

    host, sep, port_text = str(options["listen-ng"]).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
        if not sep or not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError.for_key(
            "--listen-ng", f'must be ADDRESS:PORT, got "{options["listen-ng"]}"'
        ) from None
    port_min = _number(options, "port-min", 1024, 65534, True)
    port_max = _number(options, "port-max", 1025, 65535, True)
    if port_max - port_min < 1 or port_max - (port_min + port_min % 2) < 1:
        raise ConfigError.for_key(
            "--port-max", f"must leave room for an even/odd pair above --port-min {port_min}"
        )
    interfaces = []
    names: set[str] = set()
    for text in options["interface"] or ["default/127.0.0.1"]:
        try:
            interface = RelayInterface.parse(text)
        except ValueError as e:
            raise ConfigError.for_key("--interface", f'{e} in "{text}"') from None
        if interface.name in names:
            raise ConfigError.for_key("--interface", f'"{interface.name}" given twice')
        names.add(interface.name)
        interfaces.append(interface)
    kernel = str(options["kernel"])
    if kernel not in ("auto", "on", "off"):
        raise ConfigError.for_key("--kernel", f'must be auto, on or off, got "{kernel}"')
    table = options["kernel-table"]
    if table is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", table):
        raise ConfigError.for_key("--kernel-table", f'must be an nftables name, got "{table}"')
    return RelayConfig(
        interfaces=tuple(interfaces),
        port_min=port_min,
        port_max=port_max,
        timeout=_number(options, "timeout", 1, 86400, False),
        silent_timeout=_number(options, "silent-timeout", 1, 86400 * 7, False),
        offer_timeout=_number(options, "offer-timeout", 1, 86400 * 7, False),
        listen_ng=(host, port),
        kernel=kernel,
        kernel_table=table,
    )


def _fail(text: str) -> NoReturn:
    # twistd calls us before logging or daemonizing: stderr is still the terminal.
    sys.stderr.write(f"{_PREFIX}: {text}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_CONFIG_ERROR)


def makeService(options: usage.Options) -> IService:
    from sipproxy.media.service import makeRelayService

    try:
        config = relay_config(options)
    except ConfigError as e:
        _fail(str(e))
    service = makeRelayService(config)
    start = service.startService

    def startService() -> None:
        try:
            start()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            _fail(f"cannot listen on {e.interface or '*'}:{e.port}: {reason}")

    service.startService = startService  # type: ignore[method-assign]
    return service
