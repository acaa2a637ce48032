"""Which TCP/TLS connections carry state the proxy must not lose: the flow tracker.

A phone that registered over a connection is reached over that same connection (its binding's
source), and a call set up over a connection has its in-dialog requests and responses on it.
When the connection table is full, the transports close an idle connection to make room for a
new one, and a CRLF keepalive keeps a connection open only while it carries such state: both
ask :obj:`FlowTracker.in_use`.

A flow is ``(transport, host, port)`` as in a message's :obj:`sipproxy.message.Source`; UDP sources
are not tracked (there is no connection to keep).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from sipproxy.location import ILocationListener

if TYPE_CHECKING:
    from sipproxy.message import Source

__all__ = ["Flow", "FlowTracker", "flow_of"]

Flow = tuple[str, str, int]

_RELIABLE = frozenset({"TCP", "TLS"})


def flow_of(source: Source | None) -> Flow | None:
    """The connection a message with this source came over, or None (UDP, no source)."""
    if source is None:
        return None
    transport = source.transport.upper()
    if transport not in _RELIABLE:
        return None
    return (transport, source.host, source.port)


@implementer(ILocationListener)
class FlowTracker:
    """Counts, per flow, the bindings registered over it and the dialogs set up over it.
    A location listener for the bindings; the proxy reports dialogs (:obj:`hold`/:obj:`release`)."""

    def __init__(self) -> None:
        self._uses: Counter[Flow] = Counter()

    def in_use(self, transport: str, host: str, port: int) -> bool:
        """Does the connection ``(transport, host, port)`` carry a binding or a dialog?"""
        return (transport.upper(), host, port) in self._uses

    def hold(self, flows: Iterable[Flow]) -> None:
        for flow in flows:
            self._uses[flow] += 1

    def release(self, flows: Iterable[Flow]) -> None:
        for flow in flows:
            count = self._uses.get(flow, 0)
            if count <= 1:
                self._uses.pop(flow, None)
            else:
                self._uses[flow] = count - 1

    # -- ILocationListener -------------------------------------------------------------------
    def binding_added(self, binding: Any, previous: Any) -> None:
        flow = flow_of(binding.source)
        if flow is not None:
            self.hold((flow,))
        if previous is not None:
            self.binding_removed(previous, "replaced")

    def binding_removed(self, binding: Any, reason: str) -> None:
        flow = flow_of(binding.source)
        if flow is not None:
            self.release((flow,))
