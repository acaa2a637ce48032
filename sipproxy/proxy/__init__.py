"""The stateful proxy core (RFC 3261 section 16), one job per module:

- :mod:`~sipproxy.proxy.core`: the :class:`Proxy` facade: receive, validation, IProxyCore;
- :mod:`~sipproxy.proxy.addresses`: the proxy's own addresses;
- :mod:`~sipproxy.proxy.routing`: Route preprocessing, local routing, next hop, DNS;
- :mod:`~sipproxy.proxy.forking`: branches, Timer C, failover, best response, CANCEL;
- :mod:`~sipproxy.proxy.responses`: answering the caller;
- :mod:`~sipproxy.proxy.record_route`: Via and Record-Route rules (public helpers);
- :mod:`~sipproxy.proxy.dialog_glue`: dialogs from the messages forwarded.

Plugins import their types from :mod:`sipproxy.context` or :mod:`sipproxy.interfaces`.
"""

from sipproxy.proxy.core import LIMIT_RETRY_AFTER, SUPPORTED_PROXY_REQUIRE, Proxy
from sipproxy.proxy.forking import DIALOG_CREATING, TIMER_C, select_best
from sipproxy.proxy.routing import DEFAULT_MAX_BREADTH

__all__ = [
    "DEFAULT_MAX_BREADTH",
    "DIALOG_CREATING",
    "LIMIT_RETRY_AFTER",
    "SUPPORTED_PROXY_REQUIRE",
    "TIMER_C",
    "Proxy",
    "select_best",
]
