"""The proxy facade (RFC 3261 section 16): the transaction user every request comes to. It
validates, hands the request to the plugins, then to routing and forking.

It knows nothing of NAT, TLS or media: those are plugins, called through the pipeline at the
points :mod:`sipproxy.interfaces` documents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import classImplements

from sipproxy.context import RequestContext
from sipproxy.dialogs import DialogTracker
from sipproxy.errors import ParseError
from sipproxy.flows import FlowTracker
from sipproxy.interfaces import IProxyCore, IStateStore
from sipproxy.message import MAGIC_COOKIE, Message, Request, Response, Via, new_branch
from sipproxy.pipeline import Pipeline
from sipproxy.proxy.addresses import OwnAddresses
from sipproxy.proxy.dialog_glue import DialogGlue
from sipproxy.proxy.forking import Forker
from sipproxy.proxy.record_route import RouteRecorder, loop_hash
from sipproxy.proxy.responses import Responder, ensure_to_tag
from sipproxy.proxy.routing import Router
from sipproxy.refusals import RefusalLog
from sipproxy.state import MemoryStateStore
from sipproxy.transaction import ITransactionUser, TransactionLayer
from sipproxy.uri import URI, parse_uri

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from sipproxy.config import Config
    from sipproxy.context import Branch, Target
    from sipproxy.dns import SipResolver
    from sipproxy.flood import FloodGuard
    from sipproxy.location import LocationService
    from sipproxy.registrar import Registrar
    from sipproxy.transaction import ClientTransaction, ServerTransaction
    from sipproxy.transport.manager import Listener, TransportManager
    from sipproxy.transport.tls import TLSClientPolicy

__all__ = ["LIMIT_RETRY_AFTER", "SUPPORTED_PROXY_REQUIRE", "Proxy"]

_log = Logger(namespace="sipproxy.proxy")

#: Option tags this proxy supports in Proxy-Require (none: RFC 3261 16.3 step 6).
SUPPORTED_PROXY_REQUIRE: frozenset[str] = frozenset()
#: seconds a source over its open-transaction or dialog limit is told to wait (Retry-After)
LIMIT_RETRY_AFTER = 5


class Proxy:
    """The transaction user: every new request, 2xx ACK and stray response comes here.

    It owns its collaborators: :attr:`addresses` (what names the proxy), :attr:`recorder`
    (Via and Record-Route), :attr:`router` (where a request goes), :attr:`forker` (branches
    and response selection), :attr:`responder` (answers to the caller) and
    :attr:`dialog_glue` (dialogs from the messages).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        transports: TransportManager,
        location: LocationService,
        registrar: Registrar,
        resolver: SipResolver,
        state: IStateStore | None = None,
    ) -> None:
        self.config = config
        #: where state that survives a restart is kept (IProxyCore.state)
        self.state: IStateStore = state if state is not None else MemoryStateStore()
        self.reactor = reactor
        self.clock = reactor
        self.transports = transports
        self.location = location
        self.registrar = registrar
        self.resolver = resolver
        self.pipeline = Pipeline()
        t = config.timers
        # the manager's send path without a Deferred per datagram (test doubles have none)
        sender = getattr(transports, "sender", transports)
        # the cast: mypy-zope learns of classImplements below only after this class
        self.transactions = TransactionLayer(reactor, sender, cast(ITransactionUser, self),
                                             t.t1, t.t2, t.t4)
        self.dialog_glue = DialogGlue(self)
        self.dialogs = DialogTracker(reactor, self.dialog_glue.dialog_ended)
        self.domains = frozenset(d.lower() for d in config.proxy.domains)
        self.upstream: URI | None = parse_uri(config.upstream.uri) if config.upstream else None
        #: ``[upstream] side``: requests to the upstream's addresses leave from this side
        self.upstream_side = config.upstream.side if config.upstream else None
        self._contexts: dict[ServerTransaction, RequestContext] = {}
        #: per-source limits (sipproxy.flood.FloodGuard) from the transports, if any
        self._flood: FloodGuard | None = getattr(transports, "flood", None)
        #: what the core refuses or leaves out itself (stray responses, surplus dialogs, forks
        #: capped at [proxy] max_branches), counted and logged with the flood guard's refusals
        #: when there is one
        self.refusals: RefusalLog = getattr(self._flood, "refusals", None) or RefusalLog(
            reactor, _log, config.limits.log_interval)
        #: the TCP/TLS connections that carry a binding or a dialog (kept when the
        #: connection table is full; their CRLF keepalives count as traffic)
        self.flows = FlowTracker()
        location.add_listener(self.flows)
        self.addresses = OwnAddresses(transports, self.domains)
        self.recorder = RouteRecorder(self.addresses)
        self.router = Router(config, self.addresses, location, registrar, resolver,
                             self.refusals)
        self.responder = Responder(self)
        self.forker = Forker(self)
        if self.upstream is not None:
            self.upstream_resolved([self.upstream.get_param("maddr") or self.upstream.host])

    @property
    def flood(self) -> FloodGuard | None:
        """The flood guard (sipproxy.flood.FloodGuard), None when [limits] is off."""
        return self._flood

    # -- IProxyCore ------------------------------------------------------------------------------
    @property
    def listeners(self) -> list[Listener]:
        """The transports' sockets."""
        return self.transports.listeners

    def set_plugins(self, plugins: list[Any]) -> None:
        """Run ``plugins`` (in this order) at every hook."""
        self.pipeline = Pipeline(plugins)

    def receive(self, message: Message) -> None:
        """Entry point for the transports."""
        assert isinstance(message, Request | Response)
        self.transactions.receive(message)

    def is_local_domain(self, host: str) -> bool:
        """Is the proxy registrar for ``host``? (IProxyCore)"""
        return self.addresses.is_local_domain(host)

    def is_local_uri(self, uri: URI) -> bool:
        """Does routing send ``uri`` (a Request-URI) to the location service: our domain, or
        one of our sockets (host and port)? (IProxyCore)"""
        return self.addresses.is_local_uri(uri)

    def is_own_uri(self, uri: URI) -> bool:
        """Does ``uri`` name one of our sockets (host and port), as a Route entry the proxy
        removes as its own? (IProxyCore)"""
        return self.addresses.is_own_uri(uri)

    def send_request(
        self, request: Request, target: Target, on_response: Callable[[Response], None]
    ) -> ClientTransaction:
        """Send a request of a plugin's own in a client transaction. (IProxyCore)"""
        return self.transactions.send_request(request, target, on_response)

    def use_tls_client(self, policy: TLSClientPolicy) -> None:
        """Outgoing TLS connections follow ``policy`` (a TLSClientPolicy, from the tls plugin)."""
        self.transports.tls_client = policy

    def routed_side(self, host: str) -> str | None:
        """The side the network puts ``host`` on (``[upstream] side`` for the upstream's
        addresses, else the kernel's route), None when it does not say. (IProxyCore)"""
        return self.transports.sides.routed_side(host)

    def upstream_resolved(self, hosts: list[str]) -> None:
        """``hosts`` are the upstream's addresses: with ``[upstream] side``, requests to them
        (in-dialog ones, ACKs and CANCELs included) leave from that side."""
        if self.upstream_side is not None:
            for host in hosts:
                self.transports.sides.pin(host, self.upstream_side)

    def make_via(self, target: Target) -> Via:
        """A Via for a request of the proxy's own to ``target``. (IProxyCore)"""
        listener = self.transports.choose_listener(target)
        return self.recorder.via(target, listener, new_branch())

    def retarget(self, ctx: RequestContext, branch: Branch, target: Target) -> None:
        """Send ``branch`` to ``target`` instead (a plugin, in request_forwarding, e.g. NAT: a
        phone's real address): the proxy's Via and Record-Route then name the socket the request
        leaves from toward there, and ``branch.listener`` is that socket. (IProxyCore)"""
        self.forker.retarget(ctx, branch, target)

    def registrar_aor(self, uri: URI) -> str:
        """The location service key of a Request-URI the proxy routes itself."""
        return self.router.registrar_aor(uri)

    # -- ITransactionUser ------------------------------------------------------------------------
    def request_received(self, tx: ServerTransaction, request: Request) -> None:
        """A new request in server transaction ``tx``. (ITransactionUser)"""
        responder = self.responder
        try:
            if request.method == "CANCEL":
                self._handle_cancel(tx, request)
                return
            flood = self._flood
            if flood is not None and request.source is not None:
                host = request.source.host
                if (request.method == "INVITE" and not request.to.tag
                        and not flood.may_start_dialog(host)) \
                        or not flood.transaction_started(host):
                    # too many open: the sender is to wait for some of them to end
                    responder.answer(tx, request, 503, "Service Unavailable",
                                     {"Retry-After": str(LIMIT_RETRY_AFTER)})
                    return
            ctx = RequestContext(request, tx)
            if request.method == "INVITE" and not request.to.tag:
                ctx.arrived = self.clock.seconds()
            self._contexts[tx] = ctx
            tx.call_when_terminated(self.drop_context, tx)
            error = self._validate(request)
            if error is not None:
                responder.reply(ctx, error[0], error[1], error[2])
                return
            self._find_dialog(ctx)
            result = self.pipeline.run("request_received", ctx)
            # None first: Deferred is an ABC (Awaitable), so isinstance on it runs Python code
            if result is not None and isinstance(result, Deferred):
                result.addCallback(lambda r: self._after_received(ctx, r))
                result.addErrback(responder.hook_failed, ctx)
            else:
                self._after_received(ctx, result)
        except ParseError as e:
            responder.answer(tx, request, e.status, e.reason)
        except Exception:
            _log.failure("handling {request!r}", request=request, call_id=request.call_id,
                         source=request.source)
            responder.answer(tx, request, 500, "Server Internal Error")

    def calls_in_progress(self) -> list[RequestContext]:
        """The initial INVITEs still waiting for their answer (no final response sent, not
        cancelled, no dialog yet), the oldest first: a new list, to read (the status page's
        calls not answered yet), not to change."""
        waiting = [ctx for ctx in self._contexts.values()
                   if ctx.arrived is not None and not ctx.final_sent and not ctx.cancelled
                   and ctx.dialog is None]
        return sorted(waiting, key=lambda ctx: ctx.arrived or 0.0)

    def requests_in_progress(self) -> list[RequestContext]:
        """Every request whose context the proxy still keeps (its server transaction has not
        ended), in arrival order: a new list, to read (tests check that nothing is left
        behind), not to change."""
        return list(self._contexts.values())

    def drop_context(self, tx: ServerTransaction) -> None:
        """Forget the request of ``tx`` (its transaction ended, or nothing will need it)."""
        ctx = self._contexts.pop(tx, None)
        flood = self._flood
        if flood is not None and ctx is not None and ctx.request.source is not None:
            flood.transaction_ended(ctx.request.source.host)  # counted in request_received

    def ack_received(self, request: Request) -> None:
        """An ACK for a 2xx (end to end, RFC 3261 16.7 / 13.2.2.4): forward it statelessly."""
        try:
            mf = request.max_forwards
            if mf is not None and mf <= 0:
                return
            ctx = RequestContext(request, None)
            self._find_dialog(ctx)
            result = self.pipeline.run("request_received", ctx)
            # an ACK is never answered: a plugin's Response means "do not forward it"
            if result is not None and isinstance(result, Deferred):
                result.addCallback(
                    lambda r: None if isinstance(r, Response) else self.forker.forward_ack(ctx))
            elif not isinstance(result, Response):
                self.forker.forward_ack(ctx)
        except ParseError as e:  # an ACK nobody can route (e.g. a non-SIP URI) is dropped
            _log.debug("dropped {request!r}: {e}", request=request, e=e,
                       call_id=request.call_id, source=request.source)
        except Exception:
            _log.failure("forwarding {request!r}", request=request, call_id=request.call_id,
                         source=request.source)

    def stray_response(self, response: Response) -> None:
        """A response no client transaction matches is never forwarded (RFC 6026 section 7.3):
        a 2xx retransmission reaches the caller through its INVITE client transaction, which
        stays in the Accepted state for 64*T1; anything else here is late or forged."""
        source = response.source
        try:
            method = response.cseq.method
        except ParseError:
            method = "?"
        self.refusals.refused(
            "stray_response", source.host if source is not None else "?",
            "dropped a {status} response to {method} from {refused_source}: it matches no "
            "transaction", status=response.status, method=method, call_id=response.call_id,
        )

    def server_transaction_failed(self, tx: ServerTransaction, reason: Failure) -> None:
        """The caller is unreachable: an INVITE's branches are cancelled. (ITransactionUser)"""
        ctx = self._contexts.get(tx)
        if ctx is not None and tx.request.method == "INVITE":
            self.forker.cancel_branches(ctx)

    # -- validation (16.3) -------------------------------------------------------------------------
    def _validate(self, request: Request) -> tuple[int, str, dict[str, str]] | None:
        uri = request.uri
        if not uri.is_sip and not (uri.scheme.lower() == "tel" and self.upstream is not None):
            return 416, "Unsupported URI Scheme", {}
        mf = request.max_forwards
        if mf is not None and mf <= 0:
            return 483, "Too Many Hops", {}
        if self._is_loop(request):
            return 482, "Loop Detected", {}
        required = [
            tag for value in request.headers.get_all("proxy-require")
            for tag in (t.strip() for t in value.split(",")) if tag
        ]
        unsupported = [t for t in required if t.lower() not in SUPPORTED_PROXY_REQUIRE]
        if unsupported:
            return 420, "Bad Extension", {"Unsupported": ", ".join(unsupported)}
        return None

    def _is_loop(self, request: Request) -> bool:
        vias = request.vias
        if len(vias) < 2:
            return False
        # each Via of ours was hashed with the Via just below it (the top one when we got it)
        for via, below in itertools.pairwise(vias):
            if via.branch and via.branch.startswith(MAGIC_COOKIE) and self._is_own_via(via):
                prefix = f"{MAGIC_COOKIE}{loop_hash(request, below)}."
                if via.branch.startswith(prefix):
                    return True
        return False

    def _is_own_via(self, via: Via) -> bool:
        return self.addresses.is_own_via(via)

    # -- routing (16.4, 16.5) ------------------------------------------------------------------
    def _find_dialog(self, ctx: RequestContext) -> None:
        request = ctx.request
        to_tag = request.to.tag
        if to_tag:
            ctx.dialog = self.dialogs.find(request.call_id, request.from_.tag, to_tag)

    def _after_received(self, ctx: RequestContext, result: Any) -> None:
        if isinstance(result, Response):
            self.responder.send_final(ctx, result)
            return
        if ctx.final_sent:
            return
        request = ctx.request
        forker = self.forker
        self.router.preprocess_routes(request)
        if ctx.destination is not None:
            forker.forward(ctx, [request.uri], next_hop=None, destination=ctx.destination)
            return
        if request.headers.get("route") is not None:
            forker.forward(ctx, [request.uri], next_hop=None)
            return
        uri = request.uri
        if self.addresses.is_local_uri(uri):
            self._route_local(ctx)
            return
        # [upstream] is for new requests to other domains; an in-dialog request with no Route
        # left goes to its remote target (RFC 3261 16.6 step 6), e.g. a phone's Contact
        forker.forward(ctx, [uri], next_hop=None if request.to.tag else self.upstream)

    def _route_local(self, ctx: RequestContext) -> None:
        request = ctx.request
        method = request.method
        if method == "REGISTER":
            self.responder.send_final(ctx, self.registrar.handle_register(request))
            return
        if method == "OPTIONS" and request.uri.user is None:
            response = request.make_response(200)
            response.headers.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, "
                                          "UPDATE, INFO, PRACK, SUBSCRIBE, NOTIFY, REFER, MESSAGE")
            self.responder.send_final(ctx, response)
            return
        route = self.router.local_route(request)
        if isinstance(route, tuple):
            self.responder.reply(ctx, *route)
            return
        self.forker.forward(ctx, route.targets, next_hop=None, paths=route.paths,
                            bindings=route.bindings, breadth=route.breadth)

    # -- CANCEL (16.10) --------------------------------------------------------------------------
    def _handle_cancel(self, tx: ServerTransaction, cancel: Request) -> None:
        invite_tx = self.transactions.find_server_transaction_for_cancel(cancel)
        if invite_tx is None:
            self.responder.answer(tx, cancel, 481, "Call/Transaction Does Not Exist")
            return
        response = cancel.make_response(200)
        if invite_tx.last_response is not None and invite_tx.last_response.to.tag:
            response.headers.set("To", str(invite_tx.last_response.to))
        else:
            ensure_to_tag(response)
        tx.respond(response)
        ctx = self._contexts.get(invite_tx)
        if ctx is not None and not ctx.final_sent:
            ctx.cancelled = True
            self.forker.cancel_branches(ctx)

    def stop(self) -> None:
        """Leave no call state and no timer behind (dialog plugins free their resources)."""
        self.dialogs.end_all("shutdown")
        for ctx in list(self._contexts.values()):
            for branch in ctx.branches:
                if branch.timer_c is not None and branch.timer_c.active():
                    branch.timer_c.cancel()
                branch.timer_c = None
        self.transactions.stop()
        self._contexts.clear()


# not @implementer: a class decorator would make the compiled class a plain Python one (mypyc)
classImplements(Proxy, ITransactionUser, IProxyCore)
