"""The TLS connections of the transport: which one a message goes on, opening, reconnecting.

- Outgoing connections live in the :class:`~sipproxy.transport.pool.ConnectionPool` under
  ``(address, port, server name)``. Each is kept by a :class:`ClientService` (one per key):
  the first attempt is the one the first request waits for; it fails that request with a
  :class:`~sipproxy.transport.tls.TLSConnectError` that says why, logged once, and is not
  retried. A connection that was up and is lost without the proxy closing it is opened again
  by the service, with a :func:`backoffPolicy` delay (1, 2, 4 ... seconds up to the policy's
  ``max_backoff``), while it carried SIP within the idle timeout; a certificate that does not
  verify stops the retries (the name or the CA is wrong: waiting does not help).
- A connection counts once its handshake is complete; before that, requests wait.
- Accepted connections (phones) are found by their peer address: responses and requests to
  the phone go back on them.
- The local ports of our outgoing connections are remembered: a Route or Via naming one names
  us (RFC 5923: the provider sends its requests back over the connection).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from sipproxy.message import DEFAULT_LIMITS, Limits
from sipproxy.transport.endpoints import ClientEndpoints
from sipproxy.transport.pool import ConnectionPool, PoolKey, pool_key
from sipproxy.transport.tcp import SIPStreamProtocol, StreamOwner
from sipproxy.transport.tls import SIPTLSStreamProtocol, TLSClientPolicy, TLSConnectError

__all__ = ["TLSConnections"]

_log = Logger(namespace="sipproxy.transport.tls")

OWN_PORTS_KEPT = 1024
"""Local ports of closed outgoing connections still recognized as ours."""


class _ReconnectingService(ClientService):
    """A :class:`ClientService` that leaves the logging to :class:`TLSConnections`: every
    failed attempt is logged there once, with its reason (ClientService would add a line
    naming its endpoint object for each retry). Its class logger is replaced by one that
    publishes to no observer."""

    _log = Logger(observer=LogPublisher())


@dataclass(eq=False)
class _Flow:
    """One outgoing TLS connection the proxy keeps: its service and its state.

    :ivar retries: attempts in a row that ended without a handshake (the backoff's count:
        ClientService counts a TCP connection as success, a handshake failure after it as
        a new start).
    :ivar established: a handshake completed once: a lost connection is opened again.
    :ivar attempting: an attempt is under way (TCP connect or handshake).
    :ivar quiet: the attempt under way was started by the reconnect timer, not by a request
        (its failure is logged at info level, "(reconnecting)").
    :ivar on_demand: the next attempt is started for a request (not quiet).
    :ivar stopping: the service is stopped or stopping: no more attempts.
    :ivar waiters: fired with the protocol, or failed, when the attempt under way ends.
    """

    key: PoolKey
    side: str
    bind: str | None
    last_used: float
    service: ClientService | None = None
    retries: int = 0
    established: bool = False
    attempting: bool = False
    quiet: bool = False
    on_demand: bool = False
    stopping: bool = False
    waiters: list[defer.Deferred[SIPTLSStreamProtocol]] = field(default_factory=list)

    @property
    def server_name(self) -> str:
        return self.key[2] or self.key[0]


@implementer(IStreamClientEndpoint)
class _AttemptEndpoint:
    """The flow's TLS endpoint as its ClientService sees it: every connect is an attempt the
    :class:`TLSConnections` hears of (a TCP failure here, a handshake failure from the
    protocol)."""

    def __init__(self, owner: TLSConnections, flow: _Flow, endpoint: IStreamClientEndpoint
                 ) -> None:
        self.owner = owner
        self.flow = flow
        self.endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        self.flow.attempting = True
        self.flow.quiet = not self.flow.on_demand
        self.flow.on_demand = False
        connecting: defer.Deferred[Any] = self.endpoint.connect(protocolFactory)
        connecting.addErrback(self._failed)
        return connecting

    def _failed(self, reason: Failure) -> Failure:
        self.owner.attempt_failed(reason, self.flow, None)
        return reason  # ClientService counts it too


class _FlowFactory(Factory):
    """Builds the protocol of each attempt of a flow."""

    def __init__(self, owner: TLSConnections, flow: _Flow) -> None:
        self.owner = owner
        self.flow = flow

    def buildProtocol(self, addr: IAddress | None) -> SIPTLSStreamProtocol:
        host, port, _ = self.flow.key
        proto = self.owner.new_protocol(self.flow.side, outgoing=True,
                                        server_name=self.flow.server_name, target=(host, port))
        proto.handshake.addCallbacks(self.owner.handshake_done, self.owner.attempt_failed,
                                     callbackArgs=(self.flow,), errbackArgs=(self.flow, proto))
        return proto


class TLSConnections:
    """The TLS connections of a transport: reuse, setup, failures and reconnects.

    :param owner: what the connections report to (the transport manager).
    :param reactor: every connection and timer goes through it.
    :param pool: the stream connection pool (shared with TCP).
    :param endpoints: builds the TLS endpoints.
    :param idle_timeout: seconds without traffic after which a connection is closed; a lost
        connection that carried no SIP for that long is not opened again.

    :ivar policy: how outgoing TLS connections are made (set by the ``tls`` plugin); ``None``:
        TLS targets fail with "no TLS client configured".
    """

    def __init__(
        self,
        owner: StreamOwner,
        reactor: Any,
        pool: ConnectionPool,
        endpoints: ClientEndpoints,
        *,
        idle_timeout: float | None,
        limits: Limits = DEFAULT_LIMITS,
        message_timeout: float | None = None,
    ) -> None:
        self.owner = owner
        self.reactor = reactor
        self.pool = pool
        self.endpoints = endpoints
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.message_timeout = message_timeout
        self.policy: TLSClientPolicy | None = None
        self.running = False
        self._flows: dict[PoolKey, _Flow] = {}
        # local ports of our outgoing connections, oldest first: a Route or Via naming one
        # names us (requests the provider sends back over the connection, RFC 5923)
        self._own_ports: dict[int, None] = {}
        #: failed handshakes by reason ("certificate", "connect", "cancelled" for ours;
        #: "accepted" for a peer's), for the admin metrics
        self.failures: Counter[str] = Counter()

    # -- protocols ----------------------------------------------------------------------------
    def new_protocol(
        self, side: str, *, outgoing: bool, server_name: str = "",
        target: tuple[str, int] = ("", 0),
    ) -> SIPTLSStreamProtocol:
        """A TLS connection's protocol, with the policy's keepalive when it is ours."""
        policy = self.policy
        proto = SIPTLSStreamProtocol(
            self.owner, self.reactor, side, outgoing=outgoing, idle_timeout=self.idle_timeout,
            limits=self.limits, server_name=server_name, target=target,
            keepalive_interval=policy.keepalive_interval if policy and outgoing else None,
            pong_timeout=policy.pong_timeout if policy else 10.0,
            message_timeout=self.message_timeout,
        )
        if not outgoing:
            # nobody waits for an accepted connection's handshake: a peer that hangs up or
            # speaks no TLS is only logged, not an unhandled error
            proto.handshake.addErrback(self._accept_failed, proto)
        return proto

    def _accept_failed(self, reason: Failure, proto: SIPTLSStreamProtocol) -> None:
        self.failures["accepted"] += 1
        _log.debug("TLS handshake with {peer} failed: {error}", peer=proto.peer,
                   error=reason.getErrorMessage())

    # -- registration (the owner calls these) -------------------------------------------------
    def connected(self, proto: SIPTLSStreamProtocol) -> None:
        """A handshake completed: the connection may be reused from now on."""
        self.pool.register_peer(proto)
        if proto.outgoing:
            self._own_ports.pop(proto.local[1], None)
            self._own_ports[proto.local[1]] = None
            if len(self._own_ports) > OWN_PORTS_KEPT:
                del self._own_ports[next(iter(self._own_ports))]
            self.pool.add(pool_key(*proto.target, proto.server_name), proto)

    def lost(self, proto: SIPTLSStreamProtocol, reason: Failure) -> None:
        """A TLS connection is gone (the pool has forgotten it): reconnect it when it is ours,
        was up, and is still wanted."""
        if not proto.outgoing or not proto.established:
            return  # a failed handshake is handled where the connection was asked for
        flow = self._flows.get(pool_key(*proto.target, proto.server_name))
        if flow is None or flow.waiters:
            return  # none kept, or requests wait for the attempt the service has begun
        policy = self.policy
        if proto.closed_by_us or not self.running or policy is None or not policy.reconnect \
                or self._unused(flow):
            self._end(flow)
            return
        host, port, _ = flow.key
        _log.info("TLS connection to {name}:{port} ({host}) lost ({why}); reconnecting",
                  name=proto.server_name, port=port, host=host,
                  why="no keepalive answer" if proto.keepalive_failed
                  else reason.getErrorMessage())
        # the service schedules the next attempt (_retry_delay) once it hears of the loss

    # -- lookups --------------------------------------------------------------------------------
    def connection_to(self, peer: tuple[str, int]) -> SIPStreamProtocol | None:
        """The open TLS connection with this peer (the one a request came on), if any."""
        return self.pool.peer("TLS", *peer)

    def outgoing_local(self, host: str, port: int, server_name: str) -> tuple[str, int] | None:
        """The local address and port of our open connection to ``host:port`` (verified for
        ``server_name``, else any we opened to that peer): what names us on that connection."""
        proto = self.pool.get(pool_key(host, port, server_name or host))
        if proto is None:
            proto = self.pool.peer("TLS", host, port)
        if proto is None or not proto.outgoing:
            return None
        return proto.local

    def is_own_port(self, port: int) -> bool:
        """Is ``port`` the local port of a connection we opened (now or recently)?"""
        return port in self._own_ports

    # -- sending --------------------------------------------------------------------------------
    def open(
        self, side: str, bind: str | None, host: str, port: int, server_name: str,
    ) -> defer.Deferred[SIPStreamProtocol]:
        """Our connection to ``host:port`` verified for ``server_name``, opened if needed. Fails
        as a send would (a :class:`TLSConnectError`, logged once, ``logged`` set)."""
        key = pool_key(host, port, server_name or host)
        return self.pool.wait(key, lambda: self._connect(key, side, bind))

    def send(
        self, side: str, bind: str | None, data: bytes, host: str, port: int,
        server_name: str, done: defer.Deferred[None],
    ) -> None:
        """Write ``data`` to ``host:port`` over TLS verified for ``server_name``: on our
        connection, else on the peer's own (a phone's), else on a new one once it is up."""
        key = pool_key(host, port, server_name or host)
        flow = self._flows.get(key)
        if flow is not None:
            flow.last_used = self.reactor.seconds()
        if self.pool.get(key) is None:
            accepted = self.pool.peer("TLS", host, port)
            if accepted is not None and not accepted.outgoing:
                accepted.write(data)  # a phone's own connection: requests to it go back on it
                done.callback(None)
                return
        self.pool.send(key, data, done, lambda: self._connect(key, side, bind))

    # -- flows ----------------------------------------------------------------------------------
    def _connect(self, key: PoolKey, side: str, bind: str | None
                 ) -> defer.Deferred[SIPStreamProtocol]:
        """The pool's opener: the next handshake of the flow for ``key``, started now."""
        host, port, name = key
        if not self.running:
            raise ConnectionError("the transport service is stopped")
        policy = self.policy
        if policy is None:
            raise TLSConnectError(host, port, name or host,
                                  "no TLS client configured (enable the tls plugin)")
        flow = self._flows.get(key)
        if flow is None:
            flow = _Flow(key, side, bind, self.reactor.seconds())
            self._flows[key] = flow
        flow.last_used = self.reactor.seconds()
        waiter: defer.Deferred[SIPTLSStreamProtocol] = defer.Deferred()
        flow.waiters.append(waiter)
        if not flow.attempting:
            self._start(flow, policy)
        return waiter.addCallback(self._up, flow)

    def _start(self, flow: _Flow, policy: TLSClientPolicy) -> None:
        """Attempt now: a new flow's first attempt, or a waiting flow's next one (a request
        does not wait out the backoff)."""
        flow.on_demand = True
        if flow.service is not None:
            flow.service.stopService()  # cancels the scheduled retry (or drops a closing one)
        else:
            host, port, _ = flow.key
            endpoint = self.endpoints.tls(policy.creator(flow.server_name), host, port,
                                          flow.bind)
            backoff = backoffPolicy(initialDelay=0.5, factor=2.0, maxDelay=policy.max_backoff,
                                    jitter=lambda: 0.0)

            def retry_delay(_failed_in_a_row: int) -> float:
                flow.retries += 1
                return backoff(flow.retries)

            flow.service = _ReconnectingService(
                _AttemptEndpoint(self, flow, endpoint), _FlowFactory(self, flow),
                retryPolicy=retry_delay, clock=self.reactor)
        flow.service.startService()

    @staticmethod
    def _up(proto: SIPTLSStreamProtocol, flow: _Flow) -> SIPTLSStreamProtocol:
        if proto.closing:
            host, port, _ = flow.key
            raise TLSConnectError(host, port, flow.server_name, "connection closed at once")
        return proto

    def _unused(self, flow: _Flow) -> bool:
        """Has the flow carried no SIP for longer than the idle timeout?"""
        idle = self.idle_timeout
        return idle is not None and self.reactor.seconds() - flow.last_used > idle

    def handshake_done(self, proto: SIPTLSStreamProtocol, flow: _Flow) -> None:
        """An attempt of ``flow`` succeeded (the owner has registered the connection)."""
        flow.attempting = False
        flow.retries = 0
        flow.established = True
        waiters, flow.waiters = flow.waiters, []
        for waiter in waiters:
            waiter.callback(proto)

    def attempt_failed(self, reason: Failure, flow: _Flow,
                       proto: SIPTLSStreamProtocol | None) -> None:
        """An attempt of ``flow`` failed: one log line, the policy's ``on_failure``, the
        waiters failed; retried later only when the connection was up before and is still
        wanted."""
        flow.attempting = False
        host, port, _ = flow.key
        error = reason.value
        if not isinstance(error, TLSConnectError):
            if isinstance(error, defer.CancelledError) or flow.stopping:
                detail = "cancelled (the proxy is stopping)"
            else:
                detail = f"cannot connect: {reason.getErrorMessage()}"
            error = TLSConnectError(host, port, flow.server_name, detail)
        self.failures["cancelled" if flow.stopping else
                      "certificate" if error.verification else "connect"] += 1
        if flow.quiet:
            _log.info("{error} (reconnecting)", error=str(error))
        else:
            _log.warn("{error}", error=str(error))
        error.logged = True
        policy = self.policy
        if policy is not None and policy.on_failure is not None:
            try:
                policy.on_failure(error)
            except Exception:
                _log.failure("TLS failure callback raised")
        waiters, flow.waiters = flow.waiters, []
        if not (flow.established and not error.verification and self.running
                and policy is not None and policy.reconnect and not self._unused(flow)):
            self._end(flow)  # never retried: the certificate, no longer wanted, or never up
        failure = Failure(error)
        for waiter in waiters:
            waiter.errback(failure)

    def _end(self, flow: _Flow) -> None:
        """Stop keeping ``flow`` open (its service stops: no retry is left scheduled)."""
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
        if flow.stopping:
            return
        flow.stopping = True
        if flow.service is not None:
            flow.service.stopService()
        waiters, flow.waiters = flow.waiters, []  # asked for while the service restarted
        for waiter in waiters:
            host, port, _ = flow.key
            waiter.errback(Failure(TLSConnectError(
                host, port, flow.server_name, "cancelled (the proxy is stopping)")))

    # -- service --------------------------------------------------------------------------------
    def start(self) -> None:
        """Connections may be opened from now on."""
        self.running = True

    def stop(self) -> None:
        """No more connections: attempts are cancelled, scheduled reconnects dropped."""
        self.running = False
        for flow in list(self._flows.values()):
            self._end(flow)
