"""SIP transports: UDP, TCP and TLS sockets, one pool of stream connections, and Via-based
response routing."""

from sipproxy.transport.manager import (
    RELIABLE_TRANSPORTS,
    UDP_SIZE_LIMIT,
    Listener,
    ListenSpec,
    ResponseRoute,
    TransportManager,
    route_response,
    stamp_via,
    stateless_error_response,
)

__all__ = [
    "RELIABLE_TRANSPORTS",
    "UDP_SIZE_LIMIT",
    "ListenSpec",
    "Listener",
    "ResponseRoute",
    "TransportManager",
    "route_response",
    "stamp_via",
    "stateless_error_response",
]
