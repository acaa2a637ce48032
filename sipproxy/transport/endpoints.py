"""Every outgoing stream endpoint of the proxy is built here.

A TCP endpoint connects within the connect timeout and, when the side's listener is bound to
an address of the target's family, from that address (so the peer sees the address the Via
names). A TLS endpoint is that same TCP endpoint wrapped with
:func:`~twisted.internet.endpoints.wrapClientTLS` and the connection creator the ``tls``
plugin's :class:`~sipproxy.transport.tls.TLSClientPolicy` gives for the server name: the
certificate checks and SNI are the policy's, the socket is the TCP one.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint

from sipproxy.addressing import ip_of as ip_address

__all__ = ["ClientEndpoints", "address_family", "ip_address"]


def address_family(host: str) -> int | None:
    """``AF_INET`` or ``AF_INET6`` for an IP literal, ``None`` for a name."""
    ip = ip_address(host)
    if ip is None:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class ClientEndpoints:
    """Builds the client endpoints for outgoing TCP and TLS connections.

    :param reactor: the reactor every connection goes through (``IReactorTCP``, and
        ``IReactorTime`` for the connect timeout).
    :param connect_timeout: seconds a connection may take to establish, unless a caller asks
        for less.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def tcp(self, host: str, port: int, bind: str | None = None,
            timeout: float | None = None) -> IStreamClientEndpoint:
        """A TCP endpoint to ``host:port`` (an IP literal, or a name resolved when connecting),
        from ``bind`` when that address is of the same family."""
        timeout = timeout or self.connect_timeout
        family = address_family(host)
        bind_address = None
        if bind is not None and address_family(bind) == family:
            bind_address = (bind, 0)
        if family == socket.AF_INET:
            return TCP4ClientEndpoint(
                self.reactor, host, port, timeout=timeout, bindAddress=bind_address)
        if family == socket.AF_INET6:
            return TCP6ClientEndpoint(
                self.reactor, host, port, timeout=timeout, bindAddress=bind_address)
        return HostnameEndpoint(self.reactor, host, port, timeout=timeout)

    def tls(self, creator: IOpenSSLClientConnectionCreator, host: str, port: int,
            bind: str | None = None) -> IStreamClientEndpoint:
        """The :meth:`tcp` endpoint to ``host:port`` with TLS on top, set up by ``creator`` (the
        policy's creator for the server name: what it verifies and the SNI it sends)."""
        return wrapClientTLS(creator, self.tcp(host, port, bind))
