"""The built-in relay's Prometheus metrics, read from the engine's live state at scrape time.

Used by the ``media`` plugin (on the proxy's ``/metrics``) and by ``twistd sipproxy-relay
--metrics-port`` (its own). Names follow rtpengine's where they match (sessions, packets by
``type``-like path, ports per interface), prefixed ``sipproxy_relay_``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from sipproxy.media.engine import RelayEngine

__all__ = ["RelayCollector", "relay_metrics"]

PATHS = ("userspace", "kernel")


def relay_metrics(engine: RelayEngine) -> Iterator[Metric]:
    """The metric families of ``engine`` (see the module docstring)."""
    calls = list(engine.calls.values())
    sessions = GaugeMetricFamily("sipproxy_relay_sessions", "Calls the relay holds ports for.")
    sessions.add_metric([], len(calls))
    yield sessions
    totals = engine.ended_totals.copy()
    streams = dict.fromkeys(PATHS, 0)
    for call in calls:
        totals.add(call)
        for leg in call.legs():
            for stream in leg.streams:
                if stream.learned is None:
                    continue  # no packet yet: not flowing on any path
                offload = stream.offload
                streams["kernel" if offload is not None and offload.active else "userspace"] += 1
    gauge = GaugeMetricFamily(
        "sipproxy_relay_streams", "Streams (one party's RTP or RTCP port) that got packets, by"
        " the path that forwards them now.", labels=["path"])
    for path, n in streams.items():
        gauge.add_metric([path], n)
    yield gauge
    packets = CounterMetricFamily(
        "sipproxy_relay_packets", "Packets relayed, by the interface of the party that sent"
        " them (the direction) and the path (userspace or the kernel fast path).",
        labels=["interface", "path"])
    octets = CounterMetricFamily(
        "sipproxy_relay_bytes", "UDP payload bytes relayed, by interface (the direction) and"
        " path.", labels=["interface", "path"])
    for interface in engine.interfaces:
        for path in PATHS:
            n, size = totals.counts.get((interface, path), (0, 0))
            packets.add_metric([interface, path], n)
            octets.add_metric([interface, path], size)
    yield packets
    yield octets
    used = GaugeMetricFamily("sipproxy_relay_ports_used", "UDP ports the relay holds open, by"
                             " interface.", labels=["interface"])
    free = GaugeMetricFamily("sipproxy_relay_ports_free", "Ports of the range still free, by"
                             " interface.", labels=["interface"])
    for name, (n_used, n_free) in engine.port_usage().items():
        used.add_metric([name], n_used)
        free.add_metric([name], n_free)
    yield used
    yield free


class RelayCollector:
    """A ``prometheus_client`` collector of :func:`relay_metrics` (for a registry of its own:
    ``CollectorRegistry().register(RelayCollector(engine))``)."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """The families, read now."""
        return relay_metrics(self.engine)
