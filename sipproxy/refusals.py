"""Counting and rate-limited logging of refused requests (for the ``auth`` and ``acl`` plugins).

A scanner sends thousands of requests a minute; logging each refusal would flood the log. A
:class:`RefusalLog` counts every refusal (``counters``: a ``collections.Counter`` by reason,
exported by :func:`refusal_metrics` on the admin listener's ``/metrics``) and logs at most
one line per source address per ``interval`` seconds of the injected clock; that line says how
many refusals from the source were not logged since the previous one. Memory is bounded: at
most ``max_sources`` sources are remembered (expired ones are forgotten first; when all are
recent, a new source is still counted but logged only in the summary kept under the key
``"*"``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["RefusalLog", "refusal_metrics"]


def refusal_metrics(plugin: str, counters: Mapping[str, int]) -> CounterMetricFamily:
    """``sipproxy_refusals_total{plugin, reason}`` for one plugin's refusals (``counters``:
    reason -> count). Every plugin returns a family of this name from its
    :meth:`~sipproxy.interfaces.IStatusProvider.metrics`; the admin listener merges them."""
    family = CounterMetricFamily(
        "sipproxy_refusals", "Requests, connections or messages refused, by the plugin (core:"
        " the core and its flood guard) and the reason.", labels=["plugin", "reason"])
    for reason, n in sorted(counters.items()):
        family.add_metric([plugin, reason], n)
    return family


class RefusalLog:
    def __init__(
        self, clock: IReactorTime, log: Logger, interval: float = 60.0, max_sources: int = 10000
    ) -> None:
        self.clock = clock
        self.log = log
        self.interval = interval
        self.max_sources = max_sources
        self.counters: Counter[str] = Counter()
        # source -> (time last logged, refusals not logged since)
        self._sources: dict[str, tuple[float, int]] = {}

    def refused(self, reason: str, source: str, message: str, /, **fields: Any) -> bool:
        """Count one refusal for ``reason`` from ``source`` (an address) and log ``message``
        (a twisted.logger format using ``fields``) unless ``source`` was logged within the
        interval. Returns whether it was logged."""
        self.counters[reason] += 1
        now = self.clock.seconds()
        entry = self._sources.get(source)
        if entry is not None and now - entry[0] < self.interval:
            self._sources[source] = (entry[0], entry[1] + 1)
            return False
        if entry is None and len(self._sources) >= self.max_sources:
            self._purge(now)
            if len(self._sources) >= self.max_sources:
                source = "*"
                entry = self._sources.get(source)
                if entry is not None and now - entry[0] < self.interval:
                    self._sources[source] = (entry[0], entry[1] + 1)
                    return False
        suppressed = entry[1] if entry is not None else 0
        self._sources[source] = (now, 0)
        more = f" ({suppressed} more from this source not logged)" if suppressed else ""
        self.log.info(message + more, refused_reason=reason, refused_source=source, **fields)
        return True

    def _purge(self, now: float) -> None:
        for key in [k for k, (t, _) in self._sources.items() if now - t >= self.interval]:
            del self._sources[key]
