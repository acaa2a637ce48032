"""The stream connections of the proxy, TCP and TLS, in one pool.

The connections the proxy opens are found by their :data:`PoolKey`: host, port and, for TLS,
the server name the certificate was verified for (``None`` for TCP), so a connection verified
for one name is never used for another. Data for a key without an open connection waits in one
queue while the connection is opened once, and is written in order when it is up (or fails, all
of it, with the error that stopped the connection). How a connection is opened (TCP, or TLS
kept open by a :class:`~twisted.application.internet.ClientService`) is the opener's business:
an :data:`Opener` returns a Deferred that fires with the protocol once it may carry SIP.

Every registered connection, accepted ones included, is also found by its kind and peer
address: a response goes back on the connection its request came on (RFC 3261 18.2.2), and a
request to a phone reuses the connection the phone opened.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python.failure import Failure

from sipproxy.transport.endpoints import ip_address
from sipproxy.transport.tcp import SIPStreamProtocol

__all__ = ["ConnectionPool", "Opener", "PoolKey", "canonical_host", "peer_key", "pool_key"]

PoolKey = tuple[str, int, str | None]
"""``(host, port, TLS server name or None)``, the host in :func:`canonical_host` spelling."""

Opener = Callable[[], defer.Deferred[SIPStreamProtocol]]
"""Opens one connection: a Deferred that fires with the protocol once it may carry SIP, or
fails with the error to give everything that waited for it. It may raise at once (nothing to
open with: the service is stopped, no TLS client is configured)."""


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """One spelling per host: an IP literal as :mod:`ipaddress` writes it, a name in lower
    case."""
    ip = ip_address(host)
    return str(ip) if ip is not None else host.lower()


def peer_key(host: str, port: int) -> tuple[str, int]:
    """The key of a peer address (connection tables, targets remembered per address)."""
    return canonical_host(host), port


def pool_key(host: str, port: int, server_name: str | None = None) -> PoolKey:
    """The key of an outgoing connection to ``host:port``, verified for ``server_name`` (TLS)."""
    return canonical_host(host), port, server_name.lower() if server_name is not None else None


@dataclass(slots=True)
class _Opening:
    """A connection being opened and what waits for it."""

    queue: list[tuple[bytes, defer.Deferred[None]]] = field(default_factory=list)
    waiters: list[defer.Deferred[SIPStreamProtocol]] = field(default_factory=list)
    deferred: defer.Deferred[SIPStreamProtocol] | None = None


class ConnectionPool:
    """Open stream connections by :data:`PoolKey` and by peer, and the ones being opened."""

    def __init__(self) -> None:
        self._open: dict[PoolKey, SIPStreamProtocol] = {}
        self._by_peer: dict[tuple[str, str, int], SIPStreamProtocol] = {}
        self._opening: dict[PoolKey, _Opening] = {}

    # -- lookups ------------------------------------------------------------------------------
    def get(self, key: PoolKey) -> SIPStreamProtocol | None:
        """The open (not closing) connection the proxy opened for ``key``, if any."""
        proto = self._open.get(key)
        return proto if proto is not None and not proto.closing else None

    def peer(self, kind: str, host: str, port: int) -> SIPStreamProtocol | None:
        """The open connection of ``kind`` (``"TCP"``, ``"TLS"``) with the peer ``host:port``,
        accepted or opened, if any."""
        proto = self._by_peer.get((kind, *peer_key(host, port)))
        return proto if proto is not None and not proto.closing else None

    @property
    def opening(self) -> int:
        """How many connections are being opened."""
        return len(self._opening)

    # -- bookkeeping --------------------------------------------------------------------------
    def add(self, key: PoolKey, proto: SIPStreamProtocol) -> None:
        """``proto`` is the proxy's connection for ``key`` from now on."""
        self._open[key] = proto

    def register_peer(self, proto: SIPStreamProtocol) -> None:
        """``proto`` is up: reuse it for its peer address."""
        self._by_peer[(proto.kind, *peer_key(*proto.peer))] = proto

    def forget(self, proto: SIPStreamProtocol) -> None:
        """``proto`` is gone: never hand it out again."""
        peer = (proto.kind, *peer_key(*proto.peer))
        if self._by_peer.get(peer) is proto:
            del self._by_peer[peer]
        if proto.outgoing:  # only the proxy's own are in the pool by key
            for key in [k for k, p in self._open.items() if p is proto]:
                del self._open[key]

    # -- sending ------------------------------------------------------------------------------
    def send(self, key: PoolKey, data: bytes, done: defer.Deferred[None],
             opener: Opener) -> None:
        """Write ``data`` on the connection for ``key``: now when it is open, else once
        ``opener`` has opened it (one opener call however much waits). ``done`` fires once the
        data is written and fails as the connection does. Raises what ``opener`` raises."""
        proto = self.get(key)
        if proto is not None:
            proto.write(data)
            done.callback(None)
            return
        opening = self._opening.get(key)
        if opening is not None:
            opening.queue.append((data, done))
            return
        self._open_with(key, opener, _Opening(queue=[(data, done)]))

    def wait(self, key: PoolKey, opener: Opener) -> defer.Deferred[SIPStreamProtocol]:
        """The connection for ``key``, opened by ``opener`` unless it is open or being opened;
        fails as sending on it would."""
        proto = self.get(key)
        if proto is not None:
            return defer.succeed(proto)
        waiter: defer.Deferred[SIPStreamProtocol] = defer.Deferred()
        opening = self._opening.get(key)
        if opening is not None:
            opening.waiters.append(waiter)
            return waiter
        try:
            self._open_with(key, opener, _Opening(waiters=[waiter]))
        except Exception:
            return defer.fail()
        return waiter

    def cancel(self) -> None:
        """Give up every connection being opened (the service stops)."""
        for opening in list(self._opening.values()):
            if opening.deferred is not None:
                opening.deferred.cancel()

    def _open_with(self, key: PoolKey, opener: Opener, opening: _Opening) -> None:
        self._opening[key] = opening
        try:
            deferred = opener()
        except BaseException:
            del self._opening[key]
            raise
        opening.deferred = deferred
        deferred.addCallbacks(self._opened, self._failed, callbackArgs=(key, opening),
                              errbackArgs=(key, opening))

    def _done_opening(self, key: PoolKey, opening: _Opening) -> None:
        if self._opening.get(key) is opening:
            del self._opening[key]

    def _opened(self, proto: SIPStreamProtocol, key: PoolKey, opening: _Opening) -> None:
        self._done_opening(key, opening)
        if proto.closing:
            self._failed(Failure(ConnectionError(
                f"connection to {key[0]}:{key[1]} closed at once")), key, opening)
            return
        self._open[key] = proto
        for data, done in opening.queue:
            try:
                proto.write(data)
            except Exception:
                done.errback()
            else:
                done.callback(None)
        for waiter in opening.waiters:
            waiter.callback(proto)

    def _failed(self, reason: Failure, key: PoolKey, opening: _Opening) -> None:
        self._done_opening(key, opening)
        for _, done in opening.queue:
            done.errback(reason)
        for waiter in opening.waiters:
            waiter.errback(reason)
