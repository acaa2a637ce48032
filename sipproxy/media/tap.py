"""The ``twistd sipproxy-relay`` command line: the media relay on its own, driven over NG.

    twistd -n sipproxy-relay --listen-ng 127.0.0.1:2223 --port-min 30000 --port-max 40000 \\
        --interface inside/192.168.1.1 --interface outside/203.0.113.1 [--kernel auto|on|off] \\
        [--metrics 127.0.0.1:9101]

``--metrics ADDRESS:PORT`` serves the relay's Prometheus metrics over HTTP at ``/metrics``
(:mod:`sipproxy.media.metrics`: sessions, streams and packets by path, ports per interface,
and the process's): counts only, no call or phone details, and no token (bind it to an address
only your Prometheus reaches).

A bad option ends the command with one line on stderr naming the option, and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.python import usage
from twisted.web.resource import Resource

from sipproxy.media.ports import RelayInterface
from sipproxy.media.settings import (
    DEFAULT_INTERFACES,
    RelaySettings,
    check_port_range,
    parse_address_port,
)
from sipproxy.settings import ConfigError, Section, SettingSpec, read_section, settings_of, show

if TYPE_CHECKING:
    from sipproxy.media.service import RelayService

__all__ = ["EXIT_CONFIG_ERROR", "Options", "makeService", "metrics_address", "relay_config"]

EXIT_CONFIG_ERROR = 2
_PREFIX = "sipproxy-relay"
#: the NG address when none is given (the relay on its own is driven over NG)
DEFAULT_LISTEN_NG = "127.0.0.1:2223"


def _option(key: str) -> str:
    """The option of the relay setting ``key`` (``port_min``: ``port-min``)."""
    return key.replace("_", "-")


def _parameters() -> list[list[Any]]:
    """An option per key of :class:`~sipproxy.media.settings.RelaySettings`, its help the
    key's doc."""
    found: list[list[Any]] = []
    for key, spec in settings_of(RelaySettings).items():
        default = DEFAULT_LISTEN_NG if key == "listen_ng" else spec.default
        if isinstance(default, float):
            default = f"{default:g}"
        found.append([_option(key), "n" if key == "listen_ng" else None,
                      None if default is None else str(default), spec.doc])
    return found


class Options(usage.Options):
    """Options of ``twistd sipproxy-relay``, one per setting of
    :class:`~sipproxy.media.settings.RelaySettings`."""

    synopsis = "[--listen-ng HOST:PORT] [--interface NAME/ADDRESS[!ADVERTISED]]..."
    longdesc = (
        "Run the sipproxy media relay as its own process. It speaks rtpengine's NG protocol "
        "(bencode over UDP) on --listen-ng, so sipproxy, or any proxy that drives rtpengine, "
        "can use it. Each --interface names a local address ports are opened on; the first is "
        "the default, and NG 'direction' names select them (internal/external mean "
        "inside/outside)."
    )
    optParameters = [
        *_parameters(),
        ["metrics", None, None, "ADDRESS:PORT (HTTP) to serve Prometheus /metrics on (default:"
                                " none)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["interface"] = []

    def opt_interface(self, value: str) -> None:
        """NAME/ADDRESS or NAME/ADDRESS!ADVERTISED (the address put in SDP); repeatable
        (default: default/127.0.0.1)"""
        self["interface"].append(value)

    opt_i = opt_interface


class _OptionTable(Section):
    """The options as a config table, for :func:`read_section`: errors name the option."""

    def path(self, key: str) -> str:
        return f"--{_option(key)}"


def _value(spec: SettingSpec, text: str) -> object:
    """An option's text as the config file would give the key's value (``"60"``: 60)."""
    choices = spec.choices
    if choices and text not in choices:  # "on", not the config file's true
        spelled = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise ConfigError.for_key(f"--{_option(spec.key)}", f"must be {spelled}, got {show(text)}")
    numbers: tuple[type[int | float], ...] = {"int": (int,), "float": (int, float)}.get(
        spec.kind, ())
    for number in numbers:
        try:
            return number(text)
        except ValueError:
            continue
    return text  # text, or a number that is none: refused in the key's own words


def _interfaces(texts: list[str]) -> tuple[RelayInterface, ...]:
    found: list[RelayInterface] = []
    for text in texts:
        try:
            interface = RelayInterface.parse(text)
        except ValueError as e:
            raise ConfigError.for_key("--interface", f'{e} in "{text}"') from None
        if any(f.name == interface.name for f in found):
            raise ConfigError.for_key("--interface", f'"{interface.name}" given twice')
        found.append(interface)
    return tuple(found) or DEFAULT_INTERFACES


def relay_config(options: usage.Options) -> RelaySettings:
    """The settings the options describe.

    :raises ConfigError: one line, naming the option.
    """
    given = {key: _value(spec, options[_option(key)])
             for key, spec in settings_of(RelaySettings).items()
             if options[_option(key)] is not None}
    table = _OptionTable("", given)
    settings = read_section(RelaySettings, table, interfaces=_interfaces(options["interface"]))
    check_port_range(settings, table)
    return settings


def _fail(text: str) -> NoReturn:
    # twistd calls us before logging or daemonizing: stderr is still the terminal.
    sys.stderr.write(f"{_PREFIX}: {text}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_CONFIG_ERROR)


def metrics_address(options: usage.Options) -> tuple[str, int] | None:
    """``--metrics`` as (address, port), None when not given.

    :raises ConfigError: naming ``--metrics``.
    """
    text = options["metrics"]
    if text is None:
        return None
    address = parse_address_port(text)
    if address is None:
        raise ConfigError.for_key("--metrics", f"must be ADDRESS:PORT, got {show(text)}")
    return address


def _with_metrics(relay: RelayService, address: tuple[str, int]) -> IService:
    """``relay`` and an HTTP listener of its metrics at ``address``."""
    from twisted.application.internet import TCPServer

    from sipproxy.admin.metrics import MetricsPage, process_registry
    from sipproxy.admin.service import QuietSite
    from sipproxy.media.metrics import RelayCollector

    top = MultiService()
    relay.setServiceParent(top)
    root = Resource()
    root.putChild(b"metrics", MetricsPage(process_registry(RelayCollector(relay.engine))))
    host, port = address
    TCPServer(port, QuietSite(root), interface=host).setServiceParent(top)
    return top


def makeService(options: usage.Options) -> IService:
    from sipproxy.media.service import makeRelayService

    try:
        config = relay_config(options)
        metrics = metrics_address(options)
    except ConfigError as e:
        _fail(str(e))
    relay = makeRelayService(config)
    service = relay if metrics is None else _with_metrics(relay, metrics)
    # (the metrics' TCPServer binds in privilegedStartService, the relay in startService)
    service.privilegedStartService = _one_line(  # type: ignore[method-assign]
        service.privilegedStartService)
    service.startService = _one_line(service.startService)  # type: ignore[method-assign]
    return service


def _one_line(start: Callable[[], None]) -> Callable[[], None]:
    """``start``, ending the command with one line when a port is taken."""
    def started() -> None:
        try:
            start()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            _fail(f"cannot listen on {e.interface or '*'}:{e.port}: {reason}")

    return started
