"""Forwarding and forking (RFC 3261 16.6-16.7, 16.10): one branch per target, Timer C,
failover to the next DNS target, the choice of the best final response, CANCEL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from sipproxy.context import Branch
from sipproxy.interfaces import DROP
from sipproxy.message import MAGIC_COOKIE, Response, new_branch, new_tag
from sipproxy.proxy.record_route import (
    hide_lower_vias,
    loop_hash,
    restore_vias,
    strip_own_record_route,
)
from sipproxy.proxy.responses import ensure_to_tag
from sipproxy.transaction import build_cancel
from sipproxy.uri import parse_uri

if TYPE_CHECKING:
    from sipproxy.context import RequestContext, Target
    from sipproxy.location import Binding
    from sipproxy.message import Request
    from sipproxy.proxy.core import Proxy
    from sipproxy.uri import URI

__all__ = ["DIALOG_CREATING", "TIMER_C", "Forker", "select_best"]

_log = Logger(namespace="sipproxy.proxy")

#: Methods whose initial request creates a dialog, so the proxy Record-Routes them.
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
#: seconds an INVITE branch may go without a provisional response before it is cancelled
TIMER_C = 180.0


def select_best(responses: list[Response]) -> Response | None:
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


class Forker:
    """Sends a request to its targets, one :class:`~sipproxy.context.Branch` each, and
    collects their responses into the one the caller gets.

    :param core: the proxy (pipeline, transactions, transports, config, collaborators).
    """

    def __init__(self, core: Proxy) -> None:
        self.core = core

    def record_routes(self, out: Request) -> bool:
        """Does the proxy Record-Route ``out`` (a dialog-creating initial request)?"""
        return (self.core.config.proxy.record_route and out.method in DIALOG_CREATING
                and not out.to.tag)

    # -- forwarding (16.6) -----------------------------------------------------------------------
    def forward(
        self,
        ctx: RequestContext,
        targets: list[URI],
        next_hop: URI | None,
        paths: list[tuple[str, ...]] | None = None,
        bindings: list[Binding] | None = None,
        destination: Target | None = None,
        breadth: int | None = None,
    ) -> None:
        """Send ``ctx.request`` to each of ``targets`` (their Max-Breadth ``breadth``, when
        given: RFC 5393 section 4.3)."""
        core = self.core
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
            binding = bindings[i] if bindings else None
            mf = out.max_forwards
            out.max_forwards = (mf - 1) if mf is not None else core.config.proxy.max_forwards
            if destination is not None:
                self._resolved_now([destination], ctx, out, binding, upstream=False)
                continue
            upstream = next_hop is not None and next_hop is core.upstream
            hop = next_hop or core.router.next_hop_uri(out)
            found = core.router.resolve_now(hop)
            if found is not None:  # no lookup needed (an IP literal): no Deferred either
                self._resolved_now(found, ctx, out, binding, upstream)
                continue
            d = core.router.resolve(hop)
            if upstream:
                d.addCallback(self._upstream_resolved)
            d.addCallback(self._resolved, ctx, out, binding)
            d.addErrback(self._resolve_failed, ctx)

    def _resolved_now(
        self, targets: list[Target], ctx: RequestContext, out: Request, binding: Binding | None,
        upstream: bool,
    ) -> None:
        """:meth:`_resolved` for targets known at once; what fails goes where the lookup's
        Deferred would send it."""
        try:
            self._resolved(self._upstream_resolved(targets) if upstream else targets, ctx, out,
                           binding)
        except Exception:
            self._resolve_failed(Failure(), ctx)

    def _resolved(
        self, targets: list[Target], ctx: RequestContext, out: Request, binding: Binding | None
    ) -> None:
        if not targets:
            self._branch_gone(ctx, out.make_response(503, "No Route To Destination"))
            return
        if ctx.cancelled or (ctx.final_sent and out.method != "INVITE"):
            self._branch_gone(ctx, out.make_response(487))
            return
        self._start_branch(ctx, out, targets, binding, {})

    def _upstream_resolved(self, targets: list[Target]) -> list[Target]:
        self.core.upstream_resolved([target.host for target in targets])
        return targets

    def _resolve_failed(self, failure: Failure, ctx: RequestContext) -> None:
        request = ctx.request
        _log.info("no route for {request!r}: {f}", request=request, f=failure.getErrorMessage(),
                  call_id=request.call_id, source=request.source)
        self._branch_gone(ctx, ctx.request.make_response(503, "DNS Lookup Failed"))

    def _branch_gone(self, ctx: RequestContext, response: Response) -> None:
        """A target that never became a branch still counts toward response selection."""
        branch = Branch(ctx.request, None, None, final=response)
        ctx.branches.append(branch)
        ctx.pending_targets -= 1
        self.check_complete(ctx)

    def _start_branch(
        self, ctx: RequestContext, out: Request, targets: list[Target],
        binding: Binding | None, data: dict[str, Any],
    ) -> None:
        core = self.core
        opening = (core.transports.open_flow(targets[0]) if core.addresses.opens_flows
                   else None)
        if opening is None:
            self._build_branch(ctx, out, targets, binding, data)
            return
        # our Via, Record-Route (and a nat Contact) are to name the connection: open it first
        opening.addCallbacks(
            lambda _: self._build_branch(ctx, out, targets, binding, data),
            lambda f: self._build_branch(ctx, out, targets, binding, data, failed=f),
        )
        opening.addErrback(core.responder.hook_failed, ctx)

    def _build_branch(
        self, ctx: RequestContext, out: Request, targets: list[Target],
        binding: Binding | None, data: dict[str, Any], failed: Failure | None = None,
    ) -> None:
        core = self.core
        target = targets[0]
        listener = core.transports.choose_listener(target)
        host, port = core.addresses.advertised(listener, target.host, target)
        if self.record_routes(out):
            core.recorder.record_route(ctx.request.source, out, listener, host, port, target)
        branch = Branch(out, target, listener, targets=targets[1:], binding=binding,
                        data=dict(data))
        if failed is not None and getattr(failed.value, "logged", False):
            # its connection could not be opened (and that is logged): do not try again
            branch.flow_failed = failed
        loop = loop_hash(ctx.request)
        n = len(ctx.branches)
        out.push_via(core.recorder.via(target, listener, f"{MAGIC_COOKIE}{loop}.{n}{new_tag()}"))
        ctx.branches.append(branch)
        ctx.pending_targets -= 1
        try:
            result = core.pipeline.run("request_forwarding", ctx, branch)
        except Exception:
            result = fail()
        if result is not None and isinstance(result, Deferred):
            result.addCallback(lambda r: self._send_branch(ctx, branch, r))
            result.addErrback(self._forwarding_failed, ctx, branch)
        else:
            self._send_branch(ctx, branch, result)

    def _forwarding_failed(self, failure: Failure, ctx: RequestContext, branch: Branch) -> None:
        """A request_forwarding hook failed: nothing went out, the branch ends with 500."""
        _log.failure("plugin hook for {req!r}", failure, req=branch.request,
                     call_id=branch.request.call_id)
        if branch.final is None and branch.transaction is None:
            branch.final = ctx.request.make_response(500)
            self.check_complete(ctx)

    def retarget(self, ctx: RequestContext, branch: Branch, target: Target) -> None:
        """Send ``branch`` to ``target`` instead: the proxy's Via and Record-Route then name
        the socket the request leaves from toward there, and ``branch.listener`` is that
        socket."""
        core = self.core
        branch.target = target
        listener = core.transports.choose_listener(target)
        out = branch.request
        host, port = core.addresses.advertised(listener, target.host, target)
        core.recorder.retarget_via(out, target, host, port)
        if self.record_routes(out):
            core.recorder.record_route(ctx.request.source,
                                       strip_own_record_route(out, ctx.request), listener,
                                       host, port, target)
        branch.listener = listener

    def _send_branch(self, ctx: RequestContext, branch: Branch, result: Any) -> None:
        if isinstance(result, Response):
            branch.final = result
            self.check_complete(ctx)
            return
        assert branch.target is not None
        if branch.hide_vias:
            hide_lower_vias(branch.request)
        if branch.flow_failed is not None:
            branch.flow_failed = None
            # as the transaction layer answers a send that failed: a 503 of our own
            self._branch_response(branch.request.make_response(503), ctx, branch)
            return
        self._choose_transport(branch.request, branch.target)
        try:
            branch.transaction = self.core.transactions.send_request(
                branch.request, branch.target, self._branch_response, ctx, branch)
        except Exception:
            _log.failure("sending {req!r}", req=branch.request, call_id=branch.request.call_id)
            branch.final = ctx.request.make_response(500)  # not branch.request: our Via
            self.check_complete(ctx)
            return
        if branch.request.method == "INVITE":
            branch.timer_c = self.core.clock.callLater(TIMER_C, self._timer_c, ctx, branch)

    def _choose_transport(self, out: Request, target: Target) -> None:
        """RFC 3261 18.1.1: a request too large for UDP goes over TCP, and its Via says so.
        Checked after the plugins ran (they may have grown the SDP); serialized only when the
        size could be near the limit."""
        if target.transport.upper() != "UDP":
            return
        size = out.wire_size + 400 if out.wire_size and not out.body_changed else 0
        if not size or size > 1300:
            size = len(out.to_bytes())
        actual = self.core.transports.transport_for(size, target)
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
    def _branch_response(self, response: Response, ctx: RequestContext, branch: Branch) -> None:
        try:
            self._on_branch_response(ctx, branch, response)
        except Exception:
            _log.failure("handling {response!r}", response=response, call_id=response.call_id)

    def _on_branch_response(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
        status = response.status
        if status in (408, 503) and response.source is None and not branch.provisional \
                and branch.targets and not (ctx.cancelled or branch.cancelled):
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
                restore_vias(response, ctx.request)
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
            result = self.core.pipeline.run("response_received", ctx, branch, response)
        except Exception:
            result = fail()
        if result is not None and isinstance(result, Deferred):
            result.addCallback(lambda r: self._after_response(ctx, branch, response, r))
            result.addErrback(self._response_hook_failed, ctx, branch, response)
        else:
            self._after_response(ctx, branch, response, result)

    def _response_hook_failed(
        self, failure: Failure, ctx: RequestContext, branch: Branch, response: Response
    ) -> None:
        """A response_received hook failed: the response goes no further, as with DROP."""
        _log.failure("plugin hook for {response!r}", failure, response=response,
                     call_id=response.call_id)
        self._after_response(ctx, branch, response, DROP)

    def _failover(self, ctx: RequestContext, branch: Branch) -> None:
        rest = branch.targets
        out = branch.request
        out.pop_via()
        if branch.timer_c is not None and branch.timer_c.active():
            branch.timer_c.cancel()
        ctx.branches.remove(branch)
        ctx.pending_targets += 1
        # the Record-Route entries named the failed target's socket; _start_branch adds anew
        self._start_branch(ctx, strip_own_record_route(out, ctx.request), rest, branch.binding,
                           branch.data)

    def _after_response(
        self, ctx: RequestContext, branch: Branch, response: Response, result: Any
    ) -> None:
        core = self.core
        if result is DROP:
            if response.status >= 200:
                # the branch still ended: it counts as failed in response selection
                branch.final = ctx.request.make_response(502, "Bad Gateway")
                self.check_complete(ctx)
            return
        status = response.status
        method = ctx.request.method
        if status < 200:
            if not ctx.final_sent:
                core.responder.forward_response(ctx, response)
            return
        if 200 <= status < 300:
            if method == "INVITE":
                if not core.dialog_glue.dialog_from_2xx(ctx, branch, response):
                    return
                core.responder.forward_response(ctx, response, final=True)
                self.cancel_branches(ctx, exclude=branch)
                ctx.best_2xx_sent = True
            elif not ctx.final_chosen:
                if method == "UPDATE":
                    core.dialog_glue.target_refreshed(ctx, branch, response)
                core.responder.forward_response(ctx, response, final=True)
                core.dialog_glue.end_dialog_on_bye(ctx)
            self.check_complete(ctx)
            return
        if status >= 600 and method == "INVITE":
            self.cancel_branches(ctx, exclude=branch)
        if method == "BYE":
            core.dialog_glue.end_dialog_on_bye(ctx)
        self.check_complete(ctx)

    def check_complete(self, ctx: RequestContext) -> None:
        """Every branch ended: send the best final response (16.7 step 6)."""
        if ctx.final_chosen or ctx.final_sent or ctx.pending_targets > 0:
            return
        if any(b.final is None for b in ctx.branches):
            return
        best = select_best([b.final for b in ctx.branches if b.final is not None])
        if best is None:
            best = ctx.request.make_response(408)
        if best.status == 503:
            # 16.7 step 6: a 503 is not passed upstream as such; one we made ourselves keeps
            # its reason ("No Route To Destination") so the caller learns why
            best.set_status(500, best.reason if best.source is None else None)
        ensure_to_tag(best)  # our own 408/500 need one (8.2.6.2); a callee's has it already
        self.core.responder.forward_response(ctx, best, final=True)

    # -- CANCEL (16.10) --------------------------------------------------------------------------
    def cancel_branches(self, ctx: RequestContext, exclude: Branch | None = None) -> None:
        """Cancel every pending INVITE branch of ``ctx`` but ``exclude``."""
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
            self.core.transactions.send_request(cancel, branch.target, lambda r: None)
        except Exception:
            _log.failure("sending CANCEL for {req!r}", req=branch.request,
                         call_id=branch.request.call_id)

    # -- ACK for 2xx ---------------------------------------------------------------------------
    def forward_ack(self, ctx: RequestContext) -> None:
        """Forward an ACK for a 2xx statelessly (end to end, RFC 3261 16.7 / 13.2.2.4)."""
        core = self.core
        request = ctx.request
        core.router.preprocess_routes(request)
        out = request.copy()
        mf = out.max_forwards
        out.max_forwards = (mf - 1) if mf is not None else core.config.proxy.max_forwards
        hop: URI | None = None
        binding: Binding | None = None
        if ctx.destination is not None:
            pass
        elif out.headers.get("route") is not None:
            hop = core.router.next_hop_uri(out)
        elif core.addresses.is_local_uri(out.uri):
            # as an INVITE to the user would go: its first binding that does not name this
            # proxy, which the plugins see (nat: reached where it registered from)
            binding = core.router.ack_binding(out.uri)
            if binding is None:
                return
            out.uri = parse_uri(binding.contact)
            hop = out.uri
        else:
            hop = out.uri  # an ACK for a 2xx is in-dialog: its remote target, never [upstream]
        found = [ctx.destination] if hop is None and ctx.destination else \
            core.router.resolve_now(hop or out.uri)
        if found is None:  # a DNS lookup
            d = core.router.resolve(hop or out.uri)
            d.addCallback(self._send_ack, ctx, out, binding)
            d.addErrback(self._ack_not_sent, request)
            return
        try:
            self._send_ack(found, ctx, out, binding)
        except Exception:
            self._ack_not_sent(Failure(), request)

    def _send_ack(self, targets: list[Target], ctx: RequestContext, out: Request,
                  binding: Binding | None) -> None:
        """Send the ACK ``out`` to the first of ``targets``, after the request_forwarding
        hooks."""
        if not targets:
            return
        core = self.core
        target = targets[0]
        listener = core.transports.choose_listener(target)
        out.push_via(core.recorder.via(target, listener, new_branch()))
        branch = Branch(out, target, listener, binding=binding)

        def forward(result: Any) -> None:
            if isinstance(result, Response) or branch.target is None:
                return
            if branch.hide_vias:
                hide_lower_vias(out)
            core.transactions.send_stateless_request(out, branch.target)

        result = core.pipeline.run("request_forwarding", ctx, branch)
        if result is not None and isinstance(result, Deferred):
            result.addCallback(forward)
        else:
            forward(result)

    @staticmethod
    def _ack_not_sent(failure: Failure, request: Request) -> None:
        _log.info("ACK not forwarded: {f}", f=failure.getErrorMessage(), call_id=request.call_id,
                  source=request.source)
