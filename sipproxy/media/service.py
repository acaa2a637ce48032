"""The media relay as a Twisted service: in the proxy's process or on its own.

In process (what the ``media`` plugin will do)::

    service = makeRelayService(RelayConfig(interfaces=(RelayInterface("inside", "192.168.1.1"),
                                                       RelayInterface("outside", "203.0.113.1"))))
    service.setServiceParent(parent)
    relay = LocalRelay(service.engine)          # an IMediaRelay

With ``listen_ng`` set it also answers NG commands on UDP (``twistd sipproxy-relay``), so other
proxies, or a sipproxy on another host, can drive it. Stopping the service ends every call and
closes every port (the end observers hear "shutdown").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from sipproxy.media.ng import DEFAULT_CACHE_TTL, NGCommands, NGServerProtocol
from sipproxy.media.relay import (
    DEFAULT_OFFER_TIMEOUT,
    DEFAULT_SILENT_TIMEOUT,
    DEFAULT_TIMEOUT,
    RelayEngine,
    RelayInterface,
)

__all__ = ["RelayConfig", "RelayService", "makeRelayService"]

_log = Logger(namespace="sipproxy.media.service")


@dataclass(frozen=True)
class RelayConfig:
    """What the relay needs: its interfaces (the first is the default), the port range, the
    timeouts, and the NG control address (None: in process only)."""

    interfaces: tuple[RelayInterface, ...]
    port_min: int = 30000
    port_max: int = 40000
    timeout: float = DEFAULT_TIMEOUT
    silent_timeout: float = DEFAULT_SILENT_TIMEOUT
    offer_timeout: float = DEFAULT_OFFER_TIMEOUT
    listen_ng: tuple[str, int] | None = None
    cache_ttl: float = DEFAULT_CACHE_TTL


class RelayService(MultiService):
    """The relay engine, and the NG server when configured. ``ng_port`` is the listening
    port while running (``ng_port.getHost().port`` when ``listen_ng`` asked for port 0)."""

    def __init__(self, config: RelayConfig, reactor: Any, clock: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.engine = RelayEngine(
            reactor,
            clock,
            list(config.interfaces),
            config.port_min,
            config.port_max,
            timeout=config.timeout,
            silent_timeout=config.silent_timeout,
            offer_timeout=config.offer_timeout,
        )
        self.commands = NGCommands(self.engine)
        self.protocol = NGServerProtocol(self.commands, clock, config.cache_ttl)
        self.ng_port: Any = None

    def startService(self) -> None:
        if self.config.listen_ng is not None:
            host, port = self.config.listen_ng
            self.ng_port = self.reactor.listenUDP(port, self.protocol, interface=host)
            bound = self.ng_port.getHost()
            _log.info("media relay: NG control on {host}:{port}", host=bound.host, port=bound.port)
        for i in self.config.interfaces:
            _log.info(
                "media relay: interface {name} on {address} (in SDP: {sdp}), ports {lo}-{hi}",
                name=i.name, address=i.address, sdp=i.sdp_address,
                lo=self.config.port_min, hi=self.config.port_max,
            )
        super().startService()

    def stopService(self) -> defer.Deferred[Any]:
        waits: list[Any] = [defer.maybeDeferred(super().stopService)]
        waits.extend(self.engine.stop())
        port, self.ng_port = self.ng_port, None
        if port is not None:
            waits.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults([w for w in waits if isinstance(w, defer.Deferred)])


def makeRelayService(config: RelayConfig, reactor: Any = None, clock: Any = None) -> RelayService:
    """Build the relay; ``clock`` (an IReactorTime) defaults to the reactor."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service = RelayService(config, reactor, clock if clock is not None else reactor)
    service.setName("sipproxy-relay")
    return service
