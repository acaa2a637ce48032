"""The ``twistd sipproxy-relay`` command line: the media relay on its own, driven over NG.

    twistd -n sipproxy-relay --listen-ng 127.0.0.1:2223 --port-min 30000 --port-max 40000 \\
        --interface inside/192.168.1.1 --interface outside/203.0.113.1 [--kernel auto|on|off]

A bad option ends the command with one line on stderr naming the option, and exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.python import usage

from sipproxy.config import ConfigError
from sipproxy.media.settings import RELAY_KEYS, RelaySettings, read_relay_settings

__all__ = ["EXIT_CONFIG_ERROR", "Options", "makeService", "relay_config"]

EXIT_CONFIG_ERROR = 2
_PREFIX = "sipproxy-relay"
#: the NG address when none is given (the relay on its own is driven over NG)
DEFAULT_LISTEN_NG = "127.0.0.1:2223"


def _option(name: str) -> str:
    """The option of the relay setting ``name`` (``port_min``: ``port-min``)."""
    return "interface" if name == "interfaces" else name.replace("_", "-")


def _parameters() -> list[list[Any]]:
    """The options of the settings that take one value, their help from the settings' docs."""
    found: list[list[Any]] = []
    for f in fields(RelaySettings):
        if f.name not in RELAY_KEYS or f.name == "interfaces":
            continue
        default = DEFAULT_LISTEN_NG if f.name == "listen_ng" else f.default
        if isinstance(default, float):
            default = f"{default:g}"
        found.append([_option(f.name), "n" if f.name == "listen_ng" else None,
                      None if default is None else str(default), f.metadata["doc"]])
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
    optParameters = _parameters()

    def __init__(self) -> None:
        super().__init__()
        self["interface"] = []

    def opt_interface(self, value: str) -> None:
        """NAME/ADDRESS or NAME/ADDRESS!ADVERTISED (the address put in SDP); repeatable
        (default: default/127.0.0.1)"""
        self["interface"].append(value)

    opt_i = opt_interface


def relay_config(options: usage.Options) -> RelaySettings:
    """The settings the options describe.

    :raises ConfigError: one line, naming the option.
    """
    values = {name: options[_option(name)] for name in RELAY_KEYS}
    return read_relay_settings(
        values, lambda name, problem: ConfigError.for_key(f"--{_option(name)}", problem),
        text=True)


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
