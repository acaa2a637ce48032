"""``/metrics``: the proxy's Prometheus metrics, read from its live state at scrape time.

Nothing here runs per message: the transports count messages with a plain ``+= 1``
(:mod:`sipproxy.message_counts`), the rest (transactions, dialogs, bindings, bans,
connections, refusals) is the length of a table or a ``Counter`` the proxy keeps anyway. Each
proxy has a ``CollectorRegistry`` of its own (:func:`proxy_registry`), so a test or an
embedding application can run several. Plugins add families through
:class:`~sipproxy.interfaces.IStatusProvider`; families of the same name (every plugin's
``sipproxy_refusals_total``) are merged into one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from sipproxy.admin.status import status_providers
from sipproxy.message_counts import MessageCounts
from sipproxy.refusals import refusal_metrics

if TYPE_CHECKING:
    from sipproxy.proxy import Proxy

__all__ = ["MetricsPage", "ProxyCollector", "merge_families", "process_registry",
           "proxy_registry"]

_log = Logger(namespace="sipproxy.admin")

#: what the flood guard counts that is an event, not a refusal (see FloodGuard.counters)
FLOOD_EVENTS = frozenset({"banned", "unbanned", "dropped_banned", "ban_table_full", "untracked"})


def _by_method(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["method"])
    for method, n in counts.items():
        family.add_metric([method], n)
    return family


def _by_code(name: str, doc: str, counts: list[int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["code"])
    for code, n in MessageCounts.by_code(counts).items():
        family.add_metric([str(code)], n)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def merge_families(families: Iterable[Metric]) -> list[Metric]:
    """``families`` with those of one name made one (their samples together), in order."""
    merged: dict[str, Metric] = {}
    for family in families:
        seen = merged.get(family.name)
        if seen is None:
            merged[family.name] = family
        elif seen.type == family.type:
            seen.samples.extend(family.samples)
        else:
            _log.warn("metric {name}: a {type} and a {seen}; the second is left out",
                      name=family.name, type=family.type, seen=seen.type)
    return list(merged.values())


class ProxyCollector:
    """The core's metrics and every status-providing plugin's, for one proxy."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        """The families, read now (plugins that raise are logged and left out)."""
        families = list(self.core_metrics())
        for name, plugin in status_providers(self.proxy):
            try:
                families.extend(plugin.metrics())
            except Exception:
                _log.failure("plugin {plugin}: metrics() failed", plugin=name)
        return iter(merge_families(families))

    def core_metrics(self) -> Iterator[Metric]:
        """The core's families (messages, transactions, dialogs, bindings, connections, DNS,
        the flood guard)."""
        proxy = self.proxy
        transports = proxy.transports
        counts: MessageCounts = transports.counts
        yield _by_method("sipproxy_sip_requests_received", "SIP requests received (parsed and"
                         " accepted), by method (OTHER: any other).", counts.requests_received)
        yield _by_method("sipproxy_sip_requests_sent", "SIP requests sent, by method (with"
                         " retransmissions).", counts.requests_sent)
        yield _by_code("sipproxy_sip_responses_received", "SIP responses received, by status"
                       " code.", counts.responses_received)
        yield _by_code("sipproxy_sip_responses_sent", "SIP responses sent (forwarded or the"
                       " proxy's own, with retransmissions), by status code.",
                       counts.responses_sent)
        transactions = GaugeMetricFamily("sipproxy_transactions_active", "SIP transactions"
                                         " live now, by kind.", labels=["kind"])
        transactions.add_metric(["server"], proxy.transactions.server_count)
        transactions.add_metric(["client"], proxy.transactions.client_count)
        yield transactions
        yield _gauge("sipproxy_dialogs_active", "Dialogs (calls) the proxy tracks now.",
                     len(proxy.dialogs))
        yield _gauge("sipproxy_registrar_bindings", "Contacts registered with the proxy's"
                     " registrar now.", proxy.location.count())
        connections = GaugeMetricFamily("sipproxy_connections_open", "TCP and TLS connections"
                                        " open now, by transport.", labels=["transport"])
        for transport, n in transports.open_connections().items():
            connections.add_metric([transport.lower()], n)
        yield connections
        tls = CounterMetricFamily("sipproxy_tls_handshake_failures", "TLS connections that"
                                  " failed before or in the handshake, by reason (certificate,"
                                  " connect, cancelled; accepted: a peer's connection).",
                                  labels=["reason"])
        for reason, n in sorted(transports.tls.failures.items()):
            tls.add_metric([reason], n)
        yield tls
        dns = CounterMetricFamily("sipproxy_dns_lookups_failed", "DNS lookups that gave no"
                                  " answer (no such name or record, server failure, timeout),"
                                  " by record type.", labels=["type"])
        for record_type, n in sorted(proxy.resolver.failures.items()):
            dns.add_metric([record_type], n)
        yield dns
        yield from self.flood_metrics()

    def flood_metrics(self) -> Iterator[Metric]:
        """Refusals counted by the core (the flood guard's, routing's), bans."""
        proxy = self.proxy
        counters = proxy.refusals.counters
        yield refusal_metrics("core", {k: n for k, n in counters.items()
                                       if k not in FLOOD_EVENTS})
        flood = proxy.flood
        yield _gauge("sipproxy_flood_bans_active", "Sources the flood guard bans now.",
                     len(flood.banned) if flood is not None else 0)
        events = CounterMetricFamily("sipproxy_flood_events", "Flood guard events: bans"
                                     " started and ended, packets dropped from banned"
                                     " sources (counted when the ban ends)...",
                                     labels=["event"])
        for event in sorted(FLOOD_EVENTS):
            events.add_metric([event], counters.get(event, 0))
        yield events


def proxy_registry(proxy: Proxy) -> CollectorRegistry:
    """A registry of its own for ``proxy``: its metrics and this process's."""
    return process_registry(ProxyCollector(proxy))


def process_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own with ``collector`` and this process's metrics (CPU, memory, open
    files, garbage collection, Python version)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """``/metrics`` for ``registry``, rendered on the reactor thread.

    ``prometheus_client.twisted.MetricsResource`` runs the collectors in the reactor's thread
    pool, where reading the proxy's live tables would race the reactor changing them; the
    collectors here only read lengths and counters, so rendering in place is quick. The text
    or OpenMetrics format is chosen by the ``Accept`` header, as ``prometheus_client`` does.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)
