"""``makeService(config)``: the whole proxy as one Twisted service, for twistd or embedding."""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
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

__all__ = ["ScheduledCollections", "SipProxyService", "makeService", "tune_garbage_collector"]

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


#: seconds between the young collections of :class:`ScheduledCollections`
YOUNG_COLLECTION_INTERVAL = 0.25
#: seconds between its full collections
FULL_COLLECTION_INTERVAL = 600.0


def tune_garbage_collector() -> None:
    """For a process that is mostly the proxy (``twistd sipproxy``): move what is loaded at
    start-up out of the collector's way and collect young objects less often (and, while
    :class:`ScheduledCollections` runs, on its schedule). Embedders may call it too; it only
    changes thresholds.

    Why: a call's objects are freed by reference counting when its transactions end (no
    cycles on the call path), so the collector finds next to nothing; what it costs is
    scanning the live transactions (kept up to 32 s) over and over. Measured with
    ``bench/calls.py`` (20,000 calls at 400/s), collector time per call: 56-67 us with
    thresholds (20,000, 20, 10), 36-38 with (50,000, 50, 100), 26-29 with (100,000, 50, 10).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 10)


class ScheduledCollections(Service):
    """
    While running: every :data:`YOUNG_COLLECTION_INTERVAL` seconds of ``clock``, collect the
    objects made since the last time and freeze (:func:`gc.freeze`) the survivors; every
    :data:`FULL_COLLECTION_INTERVAL` seconds, unfreeze and collect everything instead. It
    changes what the collector scans and when, not what is freed. ``twistd sipproxy`` runs it
    beside the proxy; embedders may too.

    Why: a young collection's count is allocations minus deallocations, so at a steady call
    rate the automatic one comes late and then scans every object made since, the whole live
    set of transactions (0.1-0.4 s pauses at 400 calls/s), which the next middle and full
    collections scan again. On this schedule each object is scanned once, while young, and
    the pauses stay at a few ms. Cyclic garbage is still found: young within the interval,
    older at the next full collection (before: at a middle or full one, every 50 or 500
    young ones).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.full_due = 0.0
        self.loop = LoopingCall(self.collect)
        self.loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self.full_due = self.clock.seconds() + FULL_COLLECTION_INTERVAL
        self.loop.start(YOUNG_COLLECTION_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def collect(self) -> None:
        """One step of the schedule (the loop calls it)."""
        if self.clock.seconds() >= self.full_due:
            self.full_due = self.clock.seconds() + FULL_COLLECTION_INTERVAL
            gc.unfreeze()
            gc.collect()
        else:
            gc.collect(0)
        gc.freeze()
