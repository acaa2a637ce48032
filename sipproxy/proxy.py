"""The stateful proxy core (RFC 3261 section 16): validate, route, fork, select, forward.

It knows nothing of NAT, TLS or media: those are plugins, called through the pipeline at the
points :mod:`sipproxy.interfaces` documents.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sipproxy.dialogs import Address, Dialog, DialogTracker, uri_address
from sipproxy.errors import ParseError
from sipproxy.flows import FlowTracker, flow_of
from sipproxy.interfaces import DROP, IProxyCore
from sipproxy.message import (
    MAGIC_COOKIE,
    Message,
    Request,
    Response,
    Via,
    new_branch,
    new_tag,
)
from sipproxy.pipeline import Pipeline, then
from sipproxy.refusals import RefusalLog
from sipproxy.transaction import (
    ClientTransaction,
    ITransactionUser,
    ServerTransaction,
    State,
    TransactionLayer,
    build_cancel,
)
from sipproxy.uri import URI, parse_name_addr, parse_uri, split_header_values

if TYPE_CHECKING:
    from sipproxy.config import Config
    from sipproxy.dns import SipResolver, Target
    from sipproxy.location import LocationService
    from sipproxy.registrar import Registrar
    from sipproxy.transport.manager import Listener, TransportManager

__all__ = ["Branch", "Proxy", "RequestContext"]

_log = Logger(namespace="sipproxy.proxy")
#: Dialog.data key: the source IP the flood guard counts the dialog for
_FLOOD_SOURCE = "sipproxy.flood.source"
#: Branch.data key: the connection the branch needed could not be opened (the Failure)
_FLOW_FAILED = "sipproxy.flow_failed"
#: Dialog.data key: the TCP/TLS connections the dialog was set up over (sipproxy.flows)
_FLOWS = "sipproxy.flows"

#: Methods whose initial request creates a dialog, so the proxy Record-Routes them.
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
#: Option tags this proxy supports in Proxy-Require (none: RFC 3261 16.3 step 6).
SUPPORTED_PROXY_REQUIRE: frozenset[str] = frozenset()
TIMER_C = 180.0
#: seconds a source over its open-transaction or dialog limit is told to wait (Retry-After)
LIMIT_RETRY_AFTER = 5
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(eq=False)
class Branch:
    """One outgoing fork of a request."""

    request: Request
    target: Target | None  # None for a target that could not be resolved
    listener: Listener | None
    transaction: ClientTransaction | None = None
    provisional: bool = False
    final: Response | None = None
    cancel_pending: bool = False
    cancelled: bool = False
    timer_c: IDelayedCall | None = None
    #: set by a plugin in request_forwarding: send only the proxy's own Via (the ones below it
    #: name the caller's network); responses get the original Vias back from the proxy
    hide_vias: bool = False
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class RequestContext:
    """Everything about one request the proxy handles; ``data`` is for plugins."""

    request: Request
    server_transaction: ServerTransaction | None
    dialog: Dialog | None = None
    branches: list[Branch] = field(default_factory=list)
    pending_targets: int = 0
    final_sent: bool = False
    #: a final response is on its way (its response_forwarding hooks may still be waiting)
    final_chosen: bool = False
    cancelled: bool = False
    best_2xx_sent: bool = False
    #: dialogs the 2xx responses to this INVITE set up (at most [proxy] max_branches)
    dialogs_made: int = 0
    #: set by a plugin in request_received: send the request there (Request-URI as it is),
    #: skipping the location service, [upstream] and DNS (e.g. NAT: a phone's real address)
    destination: Target | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> Any:
        return self.request.source


@implementer(ITransactionUser, IProxyCore)
class Proxy:
    """The transaction user: every new request, 2xx ACK and stray response comes here."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        transports: TransportManager,
        location: LocationService,
        registrar: Registrar,
        resolver: SipResolver,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.transports = transports
        self.location = location
        self.registrar = registrar
        self.resolver = resolver
        self.pipeline = Pipeline()
        t = config.timers
        self.transactions = TransactionLayer(reactor, transports, self, t.t1, t.t2, t.t4)
        self.dialogs = DialogTracker(reactor, self._dialog_ended)
        self.domains = frozenset(d.lower() for d in config.proxy.domains)
        self.upstream: URI | None = parse_uri(config.upstream.uri) if config.upstream else None
        self._contexts: dict[ServerTransaction, RequestContext] = {}
        self._local_addr_cache: dict[str, str] = {}
        self._own_cache: dict[tuple[str, int], bool] = {}
        #: per-source limits (sipproxy.flood.FloodGuard) from the transports, if any
        self._flood: Any = getattr(transports, "flood", None)
        #: the transports know the connections the proxy opened (RFC 5923 reuse); doubles may not
        self._opens_flows = hasattr(transports, "flow_address")
        #: what the core refuses or leaves out itself (stray responses, surplus dialogs, forks
        #: capped at [proxy] max_branches), counted and logged with the flood guard's refusals
        #: when there is one
        self.refusals: RefusalLog = getattr(self._flood, "refusals", None) or RefusalLog(
            reactor, _log, config.limits.log_interval)
        #: the TCP/TLS connections that carry a binding or a dialog (kept when the
        #: connection table is full; their CRLF keepalives count as traffic)
        self.flows = FlowTracker()
        location.add_listener(self.flows)

    @property
    def flood(self) -> Any:
        """The flood guard (sipproxy.flood.FloodGuard), None when [limits] is off."""
        return self._flood

    # -- IProxyCore ------------------------------------------------------------------------------
    @property
    def listeners(self) -> list[Listener]:
        return self.transports.listeners

    def set_plugins(self, plugins: list[Any]) -> None:
        self.pipeline = Pipeline(plugins)

    def receive(self, message: Message) -> None:
        """Entry point for the transports."""
        assert isinstance(message, Request | Response)
        self.transactions.receive(message)

    def is_local_domain(self, host: str) -> bool:
        host = host.lower()
        if host in self.domains:
            return True
        return self._is_own_address(host, None)

    def is_local_uri(self, uri: URI) -> bool:
        """Does routing send ``uri`` (a Request-URI) to the location service: our domain, or
        one of our sockets (host and port)? (IProxyCore)"""
        return self._is_local_uri(uri)

    def is_own_uri(self, uri: URI) -> bool:
        """Does ``uri`` name one of our sockets (host and port), as a Route entry the proxy
        removes as its own? (IProxyCore)"""
        return self._is_own_uri(uri)

    def send_request(
        self, request: Request, target: Target, on_response: Callable[[Response], None]
    ) -> ClientTransaction:
        return self.transactions.send_request(request, target, on_response)

    def use_tls_client(self, policy: Any) -> None:
        """Outgoing TLS connections follow ``policy`` (a TLSClientPolicy, from the tls plugin)."""
        self.transports.tls_client = policy

    def make_via(self, target: Target) -> Via:
        listener = self.transports.choose_listener(target)
        return self._via(target, listener, new_branch())

    def _via(self, target: Target, listener: Listener | None, branch: str) -> Via:
        """Our Via toward ``target``. Over TLS it says ``;alias`` (RFC 5923): the peer may
        send its requests back over the connection it came on."""
        host, port = self._advertised(listener, target.host, target)
        via = Via.build(target.transport, host, port, branch, rport=True)
        if target.transport.upper() == "TLS":
            via.set_param("alias", None)
        return via

    # -- addresses ---------------------------------------------------------------------------------
    def _local_address_for(self, remote: str) -> str:
        """The local IP the kernel would use toward ``remote`` (no packet is sent)."""
        cached = self._local_addr_cache.get(remote)
        if cached is not None:
            return cached
        family = socket.AF_INET6 if ":" in remote else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((remote, 9))
                local = str(s.getsockname()[0])
        except OSError:
            local = "127.0.0.1" if family == socket.AF_INET else "::1"
        if len(self._local_addr_cache) < 10000:
            self._local_addr_cache[remote] = local
        return local

    def _advertised(
        self, listener: Listener | None, remote: str, target: Target | None = None
    ) -> tuple[str, int]:
        """The host and port that name us toward ``remote``: the listener's (a wildcard
        one's: the address the kernel sends from toward there), or, over a connection we
        opened from a side without a TLS listener, that connection's (RFC 5923)."""
        if target is not None and self._opens_flows:
            flow = self.transports.flow_address(target, listener)
            if flow is not None:
                return flow
        if listener is None:
            return self._local_address_for(remote), 5060
        host = listener.via_host
        if host in _WILDCARDS:
            host = self._local_address_for(remote)
        return host, listener.port

    def _is_own_address(self, host: str, port: int | None) -> bool:
        """Does host[:port] name one of our listeners (configured, advertised or, for wildcard
        listeners, an address of this machine)?"""
        if port is not None and self._opens_flows and self.transports.is_flow_port(port):
            # the local port of a connection we opened: ours when the host is (not cached:
            # such ports come and go)
            return self._is_own_address(host, None)
        key = (host, port or 0)
        cached = self._own_cache.get(key)
        if cached is not None:
            return cached
        own = False
        for lst in self.listeners:
            if port is not None and lst.port != port:
                continue
            if host in (lst.via_host.lower(), lst.address):
                own = True
                break
            if lst.address in _WILDCARDS and _is_ip(host) and self._local_address_for(host) == host:
                own = True
                break
        if len(self._own_cache) < 10000:
            self._own_cache[key] = own
        return own

    def _is_local_uri(self, uri: URI) -> bool:
        """A Request-URI we route with the location service: our domain, or our own socket."""
        return uri.is_sip and (uri.host.lower() in self.domains or self._is_own_uri(uri))

    def _is_own_uri(self, uri: URI) -> bool:
        if not uri.is_sip:
            return False
        port = uri.port if uri.port is not None else (5061 if uri.secure else 5060)
        return self._is_own_address(uri.host.lower(), port)

    # -- ITransactionUser ------------------------------------------------------------------------
    def request_received(self, tx: ServerTransaction, request: Request) -> None:
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
                    self._answer(tx, request, 503, "Service Unavailable",
                                 {"Retry-After": str(LIMIT_RETRY_AFTER)})
                    return
            ctx = RequestContext(request, tx)
            self._contexts[tx] = ctx
            tx.when_terminated().addBoth(self._forget_context, tx)
            error = self._validate(request)
            if error is not None:
                self._reply(ctx, error[0], error[1], error[2])
                return
            self._find_dialog(ctx)
            result = then(self.pipeline.run("request_received", ctx),
                          lambda r: self._after_received(ctx, r))
            if isinstance(result, Deferred):
                result.addErrback(self._hook_failed, ctx)
        except ParseError as e:
            self._answer(tx, request, e.status, e.reason)
        except Exception:
            _log.failure("handling {request!r}", request=request)
            self._answer(tx, request, 500, "Server Internal Error")

    def _forget_context(self, result: object, tx: ServerTransaction) -> object:
        self._drop_context(tx)
        return None

    def _drop_context(self, tx: ServerTransaction) -> None:
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
            then(result, lambda r: None if isinstance(r, Response) else self._route_ack(ctx))
        except ParseError as e:  # an ACK nobody can route (e.g. a non-SIP URI) is dropped
            _log.debug("dropped {request!r}: {e}", request=request, e=e)
        except Exception:
            _log.failure("forwarding {request!r}", request=request)

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
            "transaction", status=response.status, method=method,
        )

    def server_transaction_failed(self, tx: ServerTransaction, reason: Failure) -> None:
        ctx = self._contexts.get(tx)
        if ctx is not None and tx.request.method == "INVITE":
            self._cancel_branches(ctx)

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

    def _loop_hash(self, request: Request, top: Via | None = None) -> str:
        """Branch prefix for loop detection (RFC 3261 16.6 step 8): the same request coming
        back unchanged hashes to the same value; a spiral (new Request-URI) does not.
        ``top`` is the Via that was on top when we forwarded it (default: the top one now)."""
        if top is None:
            top = request.top_via
        parts = (
            request.start_line(),
            request.from_.tag or "",
            request.to.tag or "",
            request.call_id,
            str(request.cseq.number),
            str(top) if top is not None else "",
            ",".join(request.headers.get_all("proxy-require")),
        )
        return hashlib.blake2s("\x00".join(parts).encode("utf-8", "surrogateescape"),
                               digest_size=8).hexdigest()

    def _is_loop(self, request: Request) -> bool:
        vias = request.vias
        if len(vias) < 2:
            return False
        # each Via of ours was hashed with the Via just below it (the top one when we got it)
        for via, below in itertools.pairwise(vias):
            if via.branch and via.branch.startswith(MAGIC_COOKIE) and self._is_own_via(via):
                prefix = f"{MAGIC_COOKIE}{self._loop_hash(request, below)}."
                if via.branch.startswith(prefix):
                    return True
        return False

    def _is_own_via(self, via: Via) -> bool:
        port = via.port if via.port is not None else 5060
        return self._is_own_address(via.host.lower(), port)

    # -- routing (16.4, 16.5) ------------------------------------------------------------------
    def _find_dialog(self, ctx: RequestContext) -> None:
        request = ctx.request
        to_tag = request.to.tag
        if to_tag:
            ctx.dialog = self.dialogs.find(request.call_id, request.from_.tag, to_tag)

    def _after_received(self, ctx: RequestContext, result: Any) -> None:
        if isinstance(result, Response):
            self._send_final(ctx, result)
            return
        if ctx.final_sent:
            return
        request = ctx.request
        self._preprocess_routes(request)
        if ctx.destination is not None:
            self._forward(ctx, [request.uri], next_hop=None, destination=ctx.destination)
            return
        if request.headers.get("route") is not None:
            self._forward(ctx, [request.uri], next_hop=None)
            return
        uri = request.uri
        if self._is_local_uri(uri):
            self._route_local(ctx)
            return
        # [upstream] is for new requests to other domains; an in-dialog request with no Route
        # left goes to its remote target (RFC 3261 16.6 step 6), e.g. a phone's Contact
        self._forward(ctx, [uri], next_hop=None if request.to.tag else self.upstream)

    def _preprocess_routes(self, request: Request) -> None:
        """16.4: undo a strict router's rewrite, and remove the Route entries that name us."""
        if self._is_own_uri(request.uri) and request.headers.get("route") is not None and (
            request.uri.has_param("lr") or request.uri.has_param("sipproxy")
        ):
            routes = request.headers.get_all("route")
            last = parse_name_addr(routes[-1])
            request.uri = last.uri
            request.headers.remove("route")
            for route_value in routes[:-1]:
                request.headers.add("Route", route_value)
        while True:
            value = request.headers.get("route")
            if value is None:
                break
            try:
                first = parse_name_addr(_first_list_value(value))
            except ParseError:
                break
            if not self._is_own_uri(first.uri):
                break
            request.headers.remove_first_value("route")

    def _route_local(self, ctx: RequestContext) -> None:
        request = ctx.request
        method = request.method
        if method == "REGISTER":
            self._send_final(ctx, self.registrar.handle_register(request))
            return
        if method == "OPTIONS" and request.uri.user is None:
            response = request.make_response(200)
            response.headers.add("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, "
                                          "UPDATE, INFO, PRACK, SUBSCRIBE, NOTIFY, REFER, MESSAGE")
            self._send_final(ctx, response)
            return
        bindings = self.location.lookup(self.registrar_aor(request.uri))
        if not bindings:
            self._reply(ctx, 404, "Not Found")
            return
        limit = self.config.proxy.max_branches
        if len(bindings) > limit:
            self.refusals.refused(
                "branches", bindings[0].aor, "{refused_source} has {n} bindings: forking "
                "{request} to the {limit} with the highest q", n=len(bindings),
                request=repr(request), limit=limit)
            bindings = bindings[:limit]
        targets: list[URI] = []
        routes: list[tuple[str, ...]] = []
        kept = []
        for binding in bindings:
            try:
                target = parse_uri(binding.contact)
            except ParseError:
                continue
            if self._is_local_uri(target) and not binding.path:
                # it would come back here and fork into the bindings again, each of them
                # again (RFC 5393's amplification): a Contact that names this proxy is skipped
                self.refusals.refused(
                    "self_contact", binding.aor, "{refused_source}: skipped the binding "
                    "{contact}: it names this proxy", contact=binding.contact)
                continue
            targets.append(target)
            routes.append(binding.path)
            kept.append(binding)
        if not targets:
            self._reply(ctx, 480, "Temporarily Unavailable")
            return
        breadth = _max_breadth(request)
        if len(targets) > 1 or request.headers.get("max-breadth") is not None:
            # RFC 5393: the parallel branches share the request's breadth, so a fork that
            # comes back here (a Contact naming this proxy) cannot grow exponentially
            if breadth < 1:
                self._reply(ctx, 440, "Max-Breadth Exceeded")
                return
            del targets[breadth:], routes[breadth:], kept[breadth:]
            share: int | None = breadth // len(targets)
        else:
            share = None
        self._forward(ctx, targets, next_hop=None, paths=routes, bindings=kept, breadth=share)

    def registrar_aor(self, uri: URI) -> str:
        """The location service key of a Request-URI the proxy routes itself."""
        return self.registrar.aor(uri)

    # -- forwarding (16.6) -----------------------------------------------------------------------
    def _forward(
        self,
        ctx: RequestContext,
        targets: list[URI],
        next_hop: URI | None,
        paths: list[tuple[str, ...]] | None = None,
        bindings: list[Any] | None = None,
        destination: Target | None = None,
        breadth: int | None = None,
    ) -> None:
        """Send ``ctx.request`` to each of ``targets`` (their Max-Breadth ``breadth``, when
        given: RFC 5393 section 4.3)."""
        ctx.pending_targets = len(targets)
        for i, target_uri in enumerate(targets):
            out = ctx.request.copy()
            if target_uri is not ctx.request.uri:
                out.uri = target_uri.copy()
            if breadth is not None:
                out.headers.set("Max-Breadth", str(breadth))
            if paths and paths[i]:
                for value in reversed(paths[i]):
                    out.headers.add("Route", value, first=True)
            if bindings:
                out_data = {"binding": bindings[i]}
            else:
                out_data = {}
            mf = out.max_forwards
            out.max_forwards = (mf - 1) if mf is not None else self.config.proxy.max_forwards
            if destination is not None:
                d: Deferred[list[Target]] = succeed([destination])
            else:
                d = self._resolve(next_hop or self._next_hop_uri(out))
            d.addCallback(self._resolved, ctx, out, out_data)
            d.addErrback(self._resolve_failed, ctx)

    def _next_hop_uri(self, request: Request) -> URI:
        route = request.headers.get("route")
        if route is not None:
            first = parse_name_addr(_first_list_value(route))
            if first.uri.loose_route:
                return first.uri
            # strict router (RFC 3261 16.6 step 6): it gets the Request-URI slot
            request.headers.remove_first_value("route")
            request.headers.add("Route", f"<{request.uri}>")
            request.uri = first.uri
            return first.uri
        return request.uri

    def _resolve(self, uri: URI) -> Deferred[list[Target]]:
        if not uri.is_sip:
            raise ParseError("cannot route a non-SIP URI", 416)
        maddr = uri.get_param("maddr")
        if maddr:
            # a TLS server must prove the URI's host, not the maddr (RFC 5922 section 4)
            return self.resolver.resolve(maddr, uri.port, uri.transport, uri.secure,
                                         server_name=uri.host)
        return self.resolver.resolve(uri.host, uri.port, uri.transport, uri.secure)

    def _resolved(
        self, targets: list[Target], ctx: RequestContext, out: Request, data: dict[str, Any]
    ) -> None:
        if not targets:
            self._branch_gone(ctx, out.make_response(503, "No Route To Destination"))
            return
        if ctx.cancelled or (ctx.final_sent and out.method != "INVITE"):
            self._branch_gone(ctx, out.make_response(487))
            return
        self._start_branch(ctx, out, targets, data)

    def _resolve_failed(self, failure: Failure, ctx: RequestContext) -> None:
        _log.info("no route for {ctx.request!r}: {f}", ctx=ctx, f=failure.getErrorMessage())
        self._branch_gone(ctx, ctx.request.make_response(503, "DNS Lookup Failed"))

    def _branch_gone(self, ctx: RequestContext, response: Response) -> None:
        """A target that never became a branch still counts toward response selection."""
        branch = Branch(ctx.request, None, None, final=response)
        ctx.branches.append(branch)
        ctx.pending_targets -= 1
        self._check_complete(ctx)

    def _start_branch(
        self, ctx: RequestContext, out: Request, targets: list[Target], data: dict[str, Any]
    ) -> None:
        opening = self.transports.open_flow(targets[0]) if self._opens_flows else None
        if opening is None:
            self._build_branch(ctx, out, targets, data)
            return
        # our Via, Record-Route (and a nat Contact) are to name the connection: open it first
        opening.addCallbacks(
            lambda _: self._build_branch(ctx, out, targets, data),
            lambda f: self._build_branch(ctx, out, targets, data, failed=f),
        )
        opening.addErrback(self._hook_failed, ctx)

    def _build_branch(
        self, ctx: RequestContext, out: Request, targets: list[Target], data: dict[str, Any],
        failed: Failure | None = None,
    ) -> None:
        target = targets[0]
        listener = self.transports.choose_listener(target)
        host, port = self._advertised(listener, target.host, target)
        if (
            self.config.proxy.record_route
            and out.method in DIALOG_CREATING
            and not out.to.tag
        ):
            self._record_route(ctx, out, listener, host, port, target)
        branch = Branch(out, target, listener, data=dict(data))
        branch.data["targets"] = targets[1:]
        if failed is not None and getattr(failed.value, "logged", False):
            # its connection could not be opened (and that is logged): do not try again
            branch.data[_FLOW_FAILED] = failed
        loop = self._loop_hash(ctx.request)
        n = len(ctx.branches)
        out.push_via(self._via(target, listener, f"{MAGIC_COOKIE}{loop}.{n}{new_tag()}"))
        ctx.branches.append(branch)
        ctx.pending_targets -= 1
        try:
            result = self.pipeline.run("request_forwarding", ctx, branch)
        except Exception:
            result = fail()
        sent = then(result, lambda r: self._send_branch(ctx, branch, r))
        if isinstance(sent, Deferred):
            sent.addErrback(self._forwarding_failed, ctx, branch)

    def _forwarding_failed(self, failure: Failure, ctx: RequestContext, branch: Branch) -> None:
        """A request_forwarding hook failed: nothing went out, the branch ends with 500."""
        _log.failure("plugin hook for {req!r}", failure, req=branch.request)
        if branch.final is None and branch.transaction is None:
            branch.final = ctx.request.make_response(500)
            self._check_complete(ctx)

    def retarget(self, ctx: RequestContext, branch: Branch, target: Target) -> None:
        """Send ``branch`` to ``target`` instead (a plugin, in request_forwarding, e.g. NAT: a
        phone's real address): the proxy's Via and Record-Route then name the socket the request
        leaves from toward there, and ``branch.listener`` is that socket."""
        branch.target = target
        listener = self.transports.choose_listener(target)
        out = branch.request
        host, port = self._advertised(listener, target.host, target)
        via = out.top_via
        if via is not None:
            via = via.copy()
            via.transport = target.transport.upper()
            via.host = host
            via.port = port
            if via.transport == "TLS":
                via.set_param("alias", None)
            elif "alias" in via.params:
                via.remove_param("alias")
            out.update_top_via(via)
        if self.config.proxy.record_route and out.method in DIALOG_CREATING and not out.to.tag:
            self._record_route(ctx, _strip_own_rr(out, ctx.request), listener, host, port,
                               target)
        branch.listener = listener

    def _record_route(
        self, ctx: RequestContext, out: Request, listener: Listener | None, host: str, port: int,
        target: Target,
    ) -> None:
        transport = listener.transport if listener is not None else "UDP"
        if self._opens_flows and self.transports.flow_address(target, listener) is not None:
            transport = "TLS"  # the entry names our connection to there
        rr_out = _rr_value(host, port, transport)
        source = ctx.request.source
        rr_in = rr_out
        if source is not None:
            in_listener = self._listener_of(source)
            in_host, in_port = self._advertised(in_listener, source.host)
            in_transport = in_listener.transport if in_listener else source.transport.upper()
            if source.transport.upper() == "TLS" and in_transport != "TLS" and self._opens_flows \
                    and self.transports.is_flow_port(source.local_port):
                # it came over a connection we opened, from a side without a TLS listener:
                # the peer reaches us over that connection only, found by its address/port
                if in_listener is None or in_listener.via_host in _WILDCARDS:
                    in_host = source.local_host
                in_port, in_transport = source.local_port, "TLS"
            rr_in = _rr_value(in_host, in_port, in_transport)
        if rr_in != rr_out:
            out.headers.add("Record-Route", rr_in, first=True)
        out.headers.add("Record-Route", rr_out, first=True)

    def _listener_of(self, source: Any) -> Listener | None:
        transport = source.transport.upper()
        for lst in self.listeners:
            if lst.transport == transport and lst.port == source.local_port and (
                lst.address == source.local_host or lst.address in _WILDCARDS
            ):
                return lst
        # a connection the proxy opened itself (its local port is no listener's): what names
        # us on that side is that side's listener, of the same transport if there is one
        side = [lst for lst in self.listeners if source.side and lst.side == source.side]
        return next((lst for lst in side if lst.transport == transport), side[0] if side else None)

    def _send_branch(self, ctx: RequestContext, branch: Branch, result: Any) -> None:
        if isinstance(result, Response):
            branch.final = result
            self._check_complete(ctx)
            return
        assert branch.target is not None
        if branch.hide_vias:
            _hide_lower_vias(branch.request)
        if branch.data.pop(_FLOW_FAILED, None) is not None:
            # as the transaction layer answers a send that failed: a 503 of our own
            self._branch_response(ctx, branch, branch.request.make_response(503))
            return
        self._choose_transport(branch.request, branch.target)
        try:
            branch.transaction = self.transactions.send_request(
                branch.request, branch.target, lambda r: self._branch_response(ctx, branch, r)
            )
        except Exception:
            _log.failure("sending {req!r}", req=branch.request)
            branch.final = ctx.request.make_response(500)  # not branch.request: our Via
            self._check_complete(ctx)
            return
        if branch.request.method == "INVITE":
            branch.timer_c = self.clock.callLater(TIMER_C, self._timer_c, ctx, branch)

    def _choose_transport(self, out: Request, target: Target) -> None:
        """RFC 3261 18.1.1: a request too large for UDP goes over TCP, and its Via says so.
        Checked after the plugins ran (they may have grown the SDP); serialized only when the
        size could be near the limit."""
        if target.transport.upper() != "UDP":
            return
        size = out.wire_size + 400 if out.wire_size and not out.body_changed else 0
        if not size or size > 1300:
            size = len(out.to_bytes())
        actual = self.transports.transport_for(size, target)
        via = out.top_via
        if via is not None and actual != via.transport:
            via = via.copy()
            via.transport = actual
            via.touch()
            out.update_top_via(via)

    def _timer_c(self, ctx: RequestContext, branch: Branch) -> None:
        branch.timer_c = None
        if branch.final is None:
            self._cancel_branch(branch)

    # -- responses (16.7) ------------------------------------------------------------------------
    def _branch_response(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
        try:
            self._on_branch_response(ctx, branch, response)
        except Exception:
            _log.failure("handling {response!r}", response=response)

    def _on_branch_response(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
        status = response.status
        if status in (408, 503) and response.source is None and not branch.provisional \
                and branch.data.get("targets") and not (ctx.cancelled or branch.cancelled):
            # made by our transaction layer: the target was unreachable or silent (RFC 3263
            # section 4.3): try the next one
            self._failover(ctx, branch)
            return
        # remove our Via; a response the transaction layer made itself (408, 503) has it too
        top = response.top_via
        if top is None:
            return
        ours = branch.request.top_via
        relay = True
        if ours is not None and top.branch == ours.branch:
            response.pop_via()
            if branch.hide_vias:
                _restore_vias(response, ctx.request)
            if not response.vias:
                # 16.7 step 3: not to be forwarded. The branch still moves on, or the caller
                # would wait forever: a provisional allows the CANCEL (Timer C), a final ends it
                if branch.final is not None:
                    return
                relay = status >= 200
                if relay:
                    response = ctx.request.make_response(502, "Bad Gateway")
                    status = 502
        if status < 200:
            branch.provisional = True
            # 16.7 step 2: 101-199 restart Timer C; a hop-by-hop 100 says nothing of the callee
            if status > 100 and branch.timer_c is not None and branch.timer_c.active():
                branch.timer_c.reset(TIMER_C)
            if branch.cancel_pending:
                branch.cancel_pending = False
                self._send_cancel(branch)
            if status == 100 or not relay:
                return
        else:
            branch.final = response
            if branch.timer_c is not None and branch.timer_c.active():
                branch.timer_c.cancel()
            branch.timer_c = None
        try:
            result = self.pipeline.run("response_received", ctx, branch, response)
        except Exception:
            result = fail()
        done = then(result, lambda r: self._after_response(ctx, branch, response, r))
        if isinstance(done, Deferred):
            done.addErrback(self._response_hook_failed, ctx, branch, response)

    def _response_hook_failed(
        self, failure: Failure, ctx: RequestContext, branch: Branch, response: Response
    ) -> None:
        """A response_received hook failed: the response goes no further, as with DROP."""
        _log.failure("plugin hook for {response!r}", failure, response=response)
        self._after_response(ctx, branch, response, DROP)

    def _failover(self, ctx: RequestContext, branch: Branch) -> None:
        rest: list[Target] = branch.data["targets"]
        out = branch.request
        out.pop_via()
        if branch.timer_c is not None and branch.timer_c.active():
            branch.timer_c.cancel()
        ctx.branches.remove(branch)
        ctx.pending_targets += 1
        data = {k: v for k, v in branch.data.items() if k != "targets"}
        # the Record-Route entries named the failed target's socket; _start_branch adds anew
        self._start_branch(ctx, _strip_own_rr(out, ctx.request), rest, data)

    def _after_response(
        self, ctx: RequestContext, branch: Branch, response: Response, result: Any
    ) -> None:
        if result is DROP:
            if response.status >= 200:
                # the branch still ended: it counts as failed in response selection
                branch.final = ctx.request.make_response(502, "Bad Gateway")
                self._check_complete(ctx)
            return
        status = response.status
        method = ctx.request.method
        if status < 200:
            if not ctx.final_sent:
                self._forward_response(ctx, response)
            return
        if 200 <= status < 300:
            if method == "INVITE":
                if not self._dialog_from_2xx(ctx, branch, response):
                    return
                self._forward_response(ctx, response, final=True)
                self._cancel_branches(ctx, exclude=branch)
                ctx.best_2xx_sent = True
            elif not ctx.final_chosen:
                if method == "UPDATE":
                    self._target_refreshed(ctx, branch, response)
                self._forward_response(ctx, response, final=True)
                self._end_dialog_on_bye(ctx)
            self._check_complete(ctx)
            return
        if status >= 600 and method == "INVITE":
            self._cancel_branches(ctx, exclude=branch)
        if method == "BYE":
            self._end_dialog_on_bye(ctx)
        self._check_complete(ctx)

    def _check_complete(self, ctx: RequestContext) -> None:
        if ctx.final_chosen or ctx.final_sent or ctx.pending_targets > 0:
            return
        if any(b.final is None for b in ctx.branches):
            return
        best = _select_best([b.final for b in ctx.branches if b.final is not None])
        if best is None:
            best = ctx.request.make_response(408)
        if best.status == 503:
            # 16.7 step 6: a 503 is not passed upstream as such; one we made ourselves keeps
            # its reason ("No Route To Destination") so the caller learns why
            best.set_status(500, best.reason if best.source is None else None)
        _ensure_to_tag(best)  # our own 408/500 need one (8.2.6.2); a callee's has it already
        self._forward_response(ctx, best, final=True)

    def _forward_response(
        self, ctx: RequestContext, response: Response, final: bool = False
    ) -> None:
        if final:
            ctx.final_chosen = True
        try:
            result = self.pipeline.run("response_forwarding", ctx, response)
        except Exception:
            result = fail()
        done = then(result, lambda r: self._send_response(ctx, response, r, final))
        if isinstance(done, Deferred):
            done.addErrback(self._forwarding_hook_failed, ctx, response, final)

    def _forwarding_hook_failed(
        self, failure: Failure, ctx: RequestContext, response: Response, final: bool
    ) -> None:
        """A response_forwarding hook failed: the response is dropped; if it was the final
        one, the caller gets a 500 instead, so the transaction still ends."""
        _log.failure("plugin hook for {response!r}", failure, response=response)
        if final:
            error = ctx.request.make_response(500)
            _ensure_to_tag(error)
            self._add_server(error)
            self._send_response(ctx, error, None, True)

    def _send_response(
        self, ctx: RequestContext, response: Response, result: Any, final: bool
    ) -> None:
        tx = ctx.server_transaction
        if result is DROP:
            if final and not ctx.final_sent and tx is not None:
                # the caller must still get a final answer, or its transaction hangs
                _log.info("a plugin dropped the final response to {req!r}; answering 500",
                          req=ctx.request)
                self._reply(ctx, 500, "Server Internal Error")
            return
        if tx is None:
            return
        if final:
            if ctx.final_sent and not (response.status // 100 == 2
                                       and ctx.request.method == "INVITE"):
                return
            ctx.final_sent = True
        elif ctx.final_sent:
            return
        if tx.state is State.TERMINATED:
            # a 2xx after the INVITE transaction ended is sent statelessly, back where the
            # request came from
            if response.status // 100 == 2:
                self.transactions.send_stateless_response(response, ctx.request.source)
            return
        try:
            tx.respond(response)
        except Exception:
            _log.failure("responding to {req!r}", req=ctx.request)
        if final:
            self._release(ctx)

    def _send_final(self, ctx: RequestContext, response: Response) -> None:
        _ensure_to_tag(response)
        self._add_server(response)
        self._forward_response(ctx, response, final=True)

    def _reply(
        self, ctx: RequestContext, status: int, reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = ctx.request.make_response(status, reason)
        _ensure_to_tag(response)
        for name, value in (headers or {}).items():
            response.headers.add(name, value)
        self._add_server(response)
        ctx.final_sent = True
        if ctx.server_transaction is not None:
            ctx.server_transaction.respond(response)
            self._release(ctx)

    def _release(self, ctx: RequestContext) -> None:
        """Forget a non-INVITE request once it is answered and no branch is left: its
        transaction may wait 64*T1 for retransmissions, but nothing will need the context
        (an INVITE's is kept for CANCEL and Timer H until its transaction ends)."""
        tx = ctx.server_transaction
        if (
            tx is not None
            and not tx.is_invite
            and ctx.pending_targets <= 0
            and all(b.final is not None for b in ctx.branches)
        ):
            self._drop_context(tx)

    def _answer(
        self, tx: ServerTransaction, request: Request, status: int, reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            response = request.make_response(status, reason)
            _ensure_to_tag(response)
            for name, value in (headers or {}).items():
                response.headers.add(name, value)
            self._add_server(response)
            tx.respond(response)
        except Exception:
            _log.failure("answering {request!r}", request=request)

    def _add_server(self, response: Response) -> None:
        agent = self.config.proxy.user_agent
        if agent and "server" not in response.headers:
            response.headers.add("Server", agent)

    def _hook_failed(self, failure: Failure, ctx: RequestContext) -> None:
        _log.failure("plugin hook for {req!r}", failure, req=ctx.request)
        if not ctx.final_sent and ctx.server_transaction is not None:
            self._reply(ctx, 500, "Server Internal Error")

    # -- CANCEL (16.10) --------------------------------------------------------------------------
    def _handle_cancel(self, tx: ServerTransaction, cancel: Request) -> None:
        invite_tx = self.transactions.find_server_transaction_for_cancel(cancel)
        if invite_tx is None:
            self._answer(tx, cancel, 481, "Call/Transaction Does Not Exist")
            return
        response = cancel.make_response(200)
        if invite_tx.last_response is not None and invite_tx.last_response.to.tag:
            response.headers.set("To", str(invite_tx.last_response.to))
        else:
            _ensure_to_tag(response)
        tx.respond(response)
        ctx = self._contexts.get(invite_tx)
        if ctx is not None and not ctx.final_sent:
            ctx.cancelled = True
            self._cancel_branches(ctx)

    def _cancel_branches(self, ctx: RequestContext, exclude: Branch | None = None) -> None:
        for branch in ctx.branches:
            if branch is not exclude and branch.final is None:
                self._cancel_branch(branch)

    def _cancel_branch(self, branch: Branch) -> None:
        if branch.cancelled or branch.transaction is None:
            return
        if branch.request.method != "INVITE":
            return
        if branch.provisional:
            self._send_cancel(branch)
        else:
            branch.cancel_pending = True

    def _send_cancel(self, branch: Branch) -> None:
        if branch.cancelled or branch.final is not None or branch.target is None:
            return
        branch.cancelled = True
        cancel = build_cancel(branch.request)
        try:
            self.transactions.send_request(cancel, branch.target, lambda r: None)
        except Exception:
            _log.failure("sending CANCEL for {req!r}", req=branch.request)

    # -- ACK for 2xx ---------------------------------------------------------------------------
    def _route_ack(self, ctx: RequestContext) -> None:
        request = ctx.request
        self._preprocess_routes(request)
        out = request.copy()
        mf = out.max_forwards
        out.max_forwards = (mf - 1) if mf is not None else self.config.proxy.max_forwards
        hop: URI | None = None
        data: dict[str, Any] = {}
        if ctx.destination is not None:
            pass
        elif out.headers.get("route") is not None:
            hop = self._next_hop_uri(out)
        elif self._is_local_uri(out.uri):
            # as an INVITE to the user would go: its first binding that does not name this
            # proxy, which the plugins see (nat: reached where it registered from)
            for binding in self.location.lookup(self.registrar_aor(out.uri)):
                contact = parse_uri(binding.contact)
                if binding.path or not self._is_local_uri(contact):
                    break
            else:
                return
            out.uri = contact
            hop = out.uri
            data["binding"] = binding
        else:
            hop = out.uri  # an ACK for a 2xx is in-dialog: its remote target, never [upstream]
        d = succeed([ctx.destination]) if hop is None and ctx.destination else self._resolve(
            hop or out.uri
        )

        def send(targets: list[Target]) -> None:
            if not targets:
                return
            target = targets[0]
            listener = self.transports.choose_listener(target)
            out.push_via(self._via(target, listener, new_branch()))
            branch = Branch(out, target, listener, data=data)
            def forward(result: Any) -> None:
                if isinstance(result, Response) or branch.target is None:
                    return
                if branch.hide_vias:
                    _hide_lower_vias(out)
                self.transactions.send_stateless_request(out, branch.target)

            then(self.pipeline.run("request_forwarding", ctx, branch), forward)

        d.addCallback(send)
        d.addErrback(lambda f: _log.info("ACK not forwarded: {f}", f=f.getErrorMessage()))

    # -- dialogs ---------------------------------------------------------------------------------
    def _dialog_from_2xx(self, ctx: RequestContext, branch: Branch, response: Response) -> bool:
        """Track the dialog a 2xx to an INVITE sets up; False: the 2xx is not to be forwarded
        (it would be dialog number ``max_branches + 1`` of one INVITE: a callee answering again
        and again with new To tags must not grow the dialog table, 12 hours each)."""
        request = ctx.request
        if request.to.tag:
            self._target_refreshed(ctx, branch, response)  # a re-INVITE: the dialog exists
            return True
        from_tag = request.from_.tag
        to_tag = response.to.tag
        if not from_tag or not to_tag:
            return True
        limit = self.config.proxy.max_branches
        if ctx.dialogs_made >= limit and self.dialogs.find(request.call_id, from_tag,
                                                            to_tag) is None:
            answered = response.source
            self.refusals.refused(
                "dialogs_per_request", answered.host if answered is not None else "?",
                "dropped a 2xx from {refused_source} to {request}: one INVITE sets up at most "
                "{limit} dialogs ([proxy] max_branches)", request=repr(request), limit=limit)
            return False
        source = request.source
        dialog, new = self.dialogs.establish(
            request.call_id, from_tag, to_tag, source.side if source is not None else "",
            response.source.side if response.source is not None else "",
        )
        if new:
            ctx.dialogs_made += 1
            ctx.dialog = dialog
            caller_routes = self._foreign_routes(request)
            dialog.caller.learn(
                [source.host] if source is not None else [],
                [*_contact_addresses(request), *_source_address(request)], caller_routes)
            dialog.callee.learn(
                [a[0] for a in (*_source_address(response), *_target_address(branch))],
                [*_contact_addresses(response), *_target_address(branch)],
                [a for a in self._foreign_routes(response) if a not in caller_routes])
            flows = [f for f in (flow_of(source), flow_of(response.source)) if f is not None]
            if flows:
                dialog.data[_FLOWS] = flows
                self.flows.hold(flows)
            flood = self._flood
            if flood is not None and source is not None and flood.dialog_started(source.host):
                dialog.data[_FLOOD_SOURCE] = source.host  # counted until _dialog_ended
            self.pipeline.notify("dialog_established", dialog)
        return True

    def _target_refreshed(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
        """A 2xx to a re-INVITE or UPDATE: the Contacts in it and in the request are the
        parties' remote targets from now on (RFC 3261 12.2), and the responder answered from
        where the request went. The sender is the party whose messages came from where the
        request did (the From tag decides only when that says nothing)."""
        dialog = ctx.dialog
        if dialog is None:
            return
        request = ctx.request
        senders = dialog.parties_from(request.source.host) if request.source is not None else []
        if len(senders) == 1:
            sender = senders[0]
        else:
            sender = dialog.caller if request.from_.tag == dialog.caller_tag else dialog.callee
        sender.learn(targets=_contact_addresses(request))
        dialog.peer_of(sender).learn(
            [a[0] for a in _source_address(response)],
            [*_contact_addresses(response), *_target_address(branch)])

    def _foreign_routes(self, message: Message) -> list[Address]:
        """The Record-Route entries of ``message`` that are not the proxy's own."""
        try:
            entries = message.name_addrs("record-route")
        except ParseError:
            return []
        return [uri_address(e.uri) for e in entries if e.uri.is_sip and not self._is_own_uri(e.uri)]

    def _end_dialog_on_bye(self, ctx: RequestContext) -> None:
        if ctx.request.method == "BYE" and ctx.dialog is not None:
            self.dialogs.end(ctx.dialog, "bye")

    def _dialog_ended(self, dialog: Dialog, reason: str) -> None:
        self.flows.release(dialog.data.pop(_FLOWS, ()))
        host = dialog.data.pop(_FLOOD_SOURCE, None)
        if host is not None and self._flood is not None:
            self._flood.dialog_ended(host)
        self.pipeline.notify("dialog_ended", dialog, reason)

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


# -- helpers -------------------------------------------------------------------------------------
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _contact_addresses(message: Message) -> list[Address]:
    try:
        return [uri_address(c.uri) for c in message.contacts if c.uri.is_sip]
    except ParseError:
        return []


def _source_address(message: Message) -> list[Address]:
    source = message.source
    return [] if source is None else [(source.host.lower(), source.port)]


def _target_address(branch: Branch) -> list[Address]:
    target = branch.target
    return [] if target is None else [(target.host.lower(), target.port)]


#: RFC 5393 section 4.3: the breadth of a request without Max-Breadth
DEFAULT_MAX_BREADTH = 60


def _max_breadth(request: Request) -> int:
    """The request's Max-Breadth (RFC 5393), the default when absent or malformed."""
    value = (request.headers.get("max-breadth") or "").strip()
    return int(value) if value.isdigit() and len(value) < 10 else DEFAULT_MAX_BREADTH


def _first_list_value(value: str) -> str:
    return split_header_values(value)[0]


def _hide_lower_vias(request: Request) -> None:
    top = request.top_via
    if top is not None:
        request.headers.set("Via", str(top))


def _restore_vias(response: Response, request: Request) -> None:
    """Give a response the Vias its request arrived with (the ones ``hide_vias`` removed)."""
    response.headers.remove("via")
    for value in request.headers.get_all("via"):
        response.headers.add("Via", value)


def _rr_value(host: str, port: int, transport: str) -> str:
    host = f"[{host}]" if ":" in host else host
    tp = "" if transport.upper() == "UDP" else f";transport={transport.lower()}"
    return f"<sip:{host}:{port}{tp};lr>"


def _strip_own_rr(out: Request, original: Request) -> Request:
    """Rebuild a branch request's Record-Route as the original had it (before our entries)."""
    ours = len(out.headers.get_all("record-route")) - len(original.headers.get_all("record-route"))
    for _ in range(max(ours, 0)):
        out.headers.remove_first_value("record-route")
    return out


def _ensure_to_tag(response: Response) -> None:
    to = response.to
    if not to.tag and response.status > 100:
        to = to.copy()
        to.tag = new_tag()
        response.set_name_addr("To", to)


def _select_best(responses: list[Response]) -> Response | None:
    """RFC 3261 16.7 step 6: a 6xx wins, else the lowest class, with challenges merged."""
    if not responses:
        return None
    six = [r for r in responses if r.status >= 600]
    if six:
        return six[0]
    best = min(responses, key=lambda r: (r.status // 100, _preference(r.status)))
    if best.status in (401, 407):
        for other in responses:
            if other is best or other.status not in (401, 407):
                continue
            for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                for value in other.headers.get_all(name):
                    best.headers.add(name, value)
    return best


def _preference(status: int) -> int:
    # among 4xx, prefer the ones that tell the caller what to do (16.7 step 6)
    return {401: 0, 407: 0, 415: 1, 420: 1, 484: 1, 487: 2}.get(status, 5)

