"""``makeService(config)``: the whole proxy as one Twisted service, for twistd or embedding."""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from sipproxy.config import Config, ConfigError
from sipproxy.dns import make_resolver
from sipproxy.flood import FloodGuard
from sipproxy.interfaces import IStateStore
from sipproxy.location import LocationService
from sipproxy.pipeline import load_plugins
from sipproxy.proxy import Proxy
from sipproxy.registrar import Registrar
from sipproxy.state import open_store, restore_bindings
from sipproxy.transport import TransportManager

__all__ = ["SipProxyService", "makeService", "tune_garbage_collector"]

_log = Logger(namespace="sipproxy.service")


class _ProxyLifecycle(Service):
    """Ends every dialog (so plugins free media and NAT state) when the proxy stops."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def startService(self) -> None:
        super().startService()
        for lst in self.proxy.listeners:
            # a wildcard listener names, toward each peer, the address the kernel sends
            # from toward that peer (reachable from there by construction)
            advertised = "the local address toward each peer" \
                if lst.via_host in ("0.0.0.0", "::", "") else lst.via_host
            _log.info(
                "sipproxy listening on {transport} {address}:{port} ({side}, advertised as "
                "{advertised})", transport=lst.transport, address=lst.address, port=lst.port,
                side=lst.side, advertised=advertised,
            )

    def stopService(self) -> None:
        super().stopService()
        self.proxy.stop()


class _RestoreBindings(Service):
    """Puts the saved bindings back once the plugins listen to the location service (the
    ``nat`` plugin keeps NATed ones alive) and before the transports open; at the first start
    only (what was saved is older than what the location service holds after that)."""

    def __init__(self, location: LocationService, state: IStateStore) -> None:
        self.location = location
        self.state: IStateStore | None = state

    def startService(self) -> None:
        super().startService()
        if self.state is None:
            return
        restored = restore_bindings(self.location, self.state)
        self.state = None
        if restored:
            _log.info("{count} bindings restored", count=restored)


class SipProxyService(MultiService):
    """The proxy's services; ``.proxy`` is the core (plugins, location, transports).
    ``.proxy.state`` (``[registrar] store``) is closed once they have all stopped: every
    write made until then reaches it."""

    proxy: Proxy

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        stopped.addBoth(lambda result: self.proxy.state.close().addCallback(lambda _: result))
        return stopped


def makeService(config: Config, reactor: Any = None) -> SipProxyService:
    """Build the proxy from a config: attach the result to your own ``MultiService`` to embed
    sipproxy in an existing Twisted application, or let ``twistd sipproxy`` run it."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        return _build(config, reactor)
    except ConfigError as e:
        e.source = e.source or config.source  # plugins and listeners name the key, not the file
        raise


def _build(config: Config, reactor: Any) -> SipProxyService:
    top = SipProxyService()
    top.setName("sipproxy")
    # read once, blocking: we run before the reactor does, and nothing listens yet
    state = open_store(config.registrar.store, reactor)
    location = LocationService(reactor)
    receiver: list[Proxy] = []
    registrar = Registrar(
        location,
        reactor,
        list(config.proxy.domains),
        min_expires=config.registrar.min_expires,
        max_expires=config.registrar.max_expires,
        default_expires=config.registrar.default_expires,
        # no domains named: every address of this host is ours (the proxy knows them)
        own_host=(lambda host: receiver[0].is_local_domain(host))
        if config.proxy.host_addresses else None,
        max_contacts=config.registrar.max_contacts,
    )
    limits = config.limits
    flood = FloodGuard.from_config(reactor, limits) if limits.enabled else None
    if flood is not None:
        restored = flood.keep_bans_in(state)
        if restored:
            _log.info("{count} bans restored", count=restored)
    transports = TransportManager(
        reactor, lambda message: receiver[0].receive(message), config.listen,
        idle_timeout=limits.idle_timeout, flood=flood,
        message_timeout=limits.message_timeout or None,
    )
    resolver = make_resolver(config.dns.servers, config.dns.timeout, reactor)
    proxy = Proxy(config, reactor, transports, location, registrar, resolver, state)
    receiver.append(proxy)
    transports.flows = proxy.flows
    plugins = load_plugins(config, proxy)
    proxy.set_plugins(plugins)
    if proxy.upstream is not None and transports.tls_client is None and (
            proxy.upstream.secure or (proxy.upstream.transport or "").lower() == "tls"):
        raise ConfigError.for_key(
            "upstream.uri", 'a TLS upstream needs the tls plugin (add "tls" to plugins.enabled)')
    top.proxy = proxy
    location.setServiceParent(top)
    for plugin in plugins:
        if IService.providedBy(plugin):
            plugin.setServiceParent(top)
    _RestoreBindings(location, state).setServiceParent(top)
    transports.setServiceParent(top)
    _ProxyLifecycle(proxy).setServiceParent(top)
    if config.admin.enabled:
        from sipproxy.admin.service import AdminService  # twisted.web, prometheus_client

        AdminService(proxy, config.admin, reactor).setServiceParent(top)
    return top


def tune_garbage_collector() -> None:
    """For a process that is mostly the proxy (``twistd sipproxy``): move what is loaded at
    start-up out of the collector's way and collect young objects less often. Embedders may
    call it too; it only changes thresholds.

    Why: a call's objects are freed by reference counting when its transactions end (no
    cycles on the call path), so the collector finds next to nothing; what it costs is
    scanning the live transactions (kept up to 32 s) over and over. Measured with
    ``bench/calls.py`` (20,000 calls at 400/s), collector time per call: 56-67 us with
    thresholds (20,000, 20, 10), 36-38 with (50,000, 50, 100), 26-29 with (100,000, 50, 10).
    A young collection then scans at most 100,000 objects (a few ms); full collections stay
    as rare as before or rarer (every 10 middle ones, and CPython's own rule: only once the
    objects promoted since the last one reach a quarter of the old generation), so cyclic
    garbage from elsewhere (failures, plugins) is still bounded.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 10)
