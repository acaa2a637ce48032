"""The media relay as a Twisted service: in the proxy's process or on its own.

In process (what the ``media`` plugin will do)::

    service = makeRelayService(RelaySettings(interfaces=(RelayInterface("inside", "192.168.1.1"),
                                                         RelayInterface("outside", "203.0.113.1"))))
    service.setServiceParent(parent)
    relay = LocalRelay(service.engine)          # an IMediaRelay

With ``listen_ng`` set it also answers NG commands on UDP (``twistd sipproxy-relay``), so other
proxies, or a sipproxy on another host, can drive it. Stopping the service ends every call and
closes every port (the end observers hear "shutdown").

``kernel`` (``"auto"``, ``"on"``, ``"off"``) turns on the kernel fast path
(:mod:`sipproxy.media.kernel`): checked once at start (nft and the netdev ingress hook's
expressions must work, which needs CAP_NET_ADMIN); ``auto`` quietly stays in userspace where
they do not, ``on`` logs a warning then. Stopping deletes its nftables table.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from sipproxy.media.engine import RelayEngine
from sipproxy.media.kernel import KernelForwarder, NftRunner, process_runner
from sipproxy.media.ng import NGCommands, NGServerProtocol
from sipproxy.media.settings import KERNEL_MODES, RelaySettings

__all__ = ["RelayService", "makeRelayService"]

_log = Logger(namespace="sipproxy.media.service")


class RelayService(MultiService):
    """The relay engine, and the NG server when configured. ``ng_port`` is the listening
    port while running (``ng_port.getHost().port`` when ``listen_ng`` asked for port 0)."""

    def __init__(self, config: RelaySettings, reactor: Any, clock: Any,
                 kernel_runner: NftRunner | None = None) -> None:
        super().__init__()
        if config.kernel not in KERNEL_MODES:
            raise ValueError(f'kernel must be "auto", "on" or "off", got {config.kernel!r}')
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
            kernel_poll=config.kernel_poll,
        )
        self.kernel: KernelForwarder | None = None
        if config.kernel != "off":
            self.kernel = KernelForwarder(kernel_runner or process_runner(reactor),
                                          config.kernel_table)
        self._kernel_start: defer.Deferred[Any] | None = None
        self.commands = NGCommands(self.engine)
        self.protocol = NGServerProtocol(self.commands, clock, config.cache_ttl)
        self.ng_port: Any = None

    def startService(self) -> None:
        if self.config.listen_ng is not None:
            host, port = self.config.listen_ng
            self.ng_port = self.reactor.listenUDP(port, self.protocol, interface=host,
                                                  maxPacketSize=65535)  # SDP > 8 KiB
            bound = self.ng_port.getHost()
            _log.info("media relay: NG control on {host}:{port}", host=bound.host, port=bound.port)
        for i in self.config.interfaces:
            _log.info(
                "media relay: interface {name} on {address} (in SDP: {sdp}), ports {lo}-{hi}",
                name=i.name, address=i.address, sdp=i.sdp_address,
                lo=self.config.port_min, hi=self.config.port_max,
            )
        super().startService()
        if self.kernel is not None:
            self._kernel_start = self.kernel.start()
            self._kernel_start.addCallbacks(self._kernel_started, self._kernel_failed)

    def _kernel_started(self, _: Any) -> None:
        assert self.kernel is not None
        _log.info("media relay: kernel fast path on (nftables table netdev {table})",
                  table=self.kernel.table)
        if self.running:
            self.engine.use_kernel(self.kernel)

    def _kernel_failed(self, failure: Any) -> None:
        text = "media relay: no kernel fast path, userspace relay only: {reason}"
        if self.config.kernel == "on":
            _log.warn(text, reason=failure.getErrorMessage())
        else:
            _log.info(text, reason=failure.getErrorMessage())

    def stopService(self) -> defer.Deferred[Any]:
        waits: list[Any] = [defer.maybeDeferred(super().stopService)]
        # the calls end without the kernel: deleting the table takes all their rules at once
        # (one by one, thousands of nft runs would hold up the stop for a minute)
        self.engine.use_kernel(None)
        waits.extend(self.engine.stop())
        if self.kernel is not None and self._kernel_start is not None:
            # skips what is still queued (installs, removals of calls ended before)
            stopping = self.kernel.stop()
            stopping.addErrback(lambda f: _log.warn(
                "media relay: deleting the nftables table failed: {e}", e=f.getErrorMessage()))
            waits.append(stopping)
            self._kernel_start = None
        port, self.ng_port = self.ng_port, None
        if port is not None:
            waits.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults([w for w in waits if isinstance(w, defer.Deferred)])


def makeRelayService(config: RelaySettings, reactor: Any = None, clock: Any = None,
                     kernel_runner: NftRunner | None = None) -> RelayService:
    """Build the relay; ``clock`` (an IReactorTime) defaults to the reactor; ``kernel_runner``
    runs nft and ip for the kernel fast path (default: child processes)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service = RelayService(config, reactor, clock if clock is not None else reactor,
                           kernel_runner)
    service.setName("sipproxy-relay")
    return service
