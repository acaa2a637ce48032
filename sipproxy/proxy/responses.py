"""Answering the caller (RFC 3261 16.7 steps 7-9): the proxy's own responses and the ones it
forwards, through the ``response_forwarding`` hooks, on the server transaction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from sipproxy.interfaces import DROP
from sipproxy.message import new_tag
from sipproxy.transaction import State

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from sipproxy.context import RequestContext
    from sipproxy.message import Request, Response
    from sipproxy.proxy.core import Proxy
    from sipproxy.transaction import ServerTransaction

__all__ = ["Responder", "ensure_to_tag"]

_log = Logger(namespace="sipproxy.proxy")


def ensure_to_tag(response: Response) -> None:
    """Give a response above 100 a To tag if it has none (RFC 3261 8.2.6.2)."""
    to = response.to
    if not to.tag and response.status > 100:
        to = to.copy()
        to.tag = new_tag()
        response.set_name_addr("To", to)


class Responder:
    """Sends responses back toward the caller of a :class:`~sipproxy.context.RequestContext`.

    :param core: the proxy (its pipeline, transactions, config and request contexts).
    """

    def __init__(self, core: Proxy) -> None:
        self.core = core

    def forward_response(
        self, ctx: RequestContext, response: Response, final: bool = False
    ) -> None:
        """Run the ``response_forwarding`` hooks, then send ``response`` to the caller."""
        if final:
            ctx.final_chosen = True
        try:
            result = self.core.pipeline.run("response_forwarding", ctx, response)
        except Exception:
            result = fail()
        if result is not None and isinstance(result, Deferred):
            result.addCallback(lambda r: self.send_response(ctx, response, r, final))
            result.addErrback(self._forwarding_hook_failed, ctx, response, final)
        else:
            self.send_response(ctx, response, result, final)

    def _forwarding_hook_failed(
        self, failure: Failure, ctx: RequestContext, response: Response, final: bool
    ) -> None:
        """A response_forwarding hook failed: the response is dropped; if it was the final
        one, the caller gets a 500 instead, so the transaction still ends."""
        _log.failure("plugin hook for {response!r}", failure, response=response,
                     call_id=response.call_id)
        if final:
            error = self.as_received(ctx).make_response(500)
            ensure_to_tag(error)
            self.add_server(error)
            self.send_response(ctx, error, None, True)

    def send_response(
        self, ctx: RequestContext, response: Response, result: Any, final: bool
    ) -> None:
        """Send ``response`` on the server transaction (``result`` is what the hooks said)."""
        tx = ctx.server_transaction
        if result is DROP:
            if final and not ctx.final_sent and tx is not None:
                # the caller must still get a final answer, or its transaction hangs
                _log.info("a plugin dropped the final response to {req!r}; answering 500",
                          req=ctx.request, call_id=ctx.request.call_id)
                self.reply(ctx, 500, "Server Internal Error")
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
                self.core.transactions.send_stateless_response(response, ctx.request.source)
            return
        try:
            tx.respond(response)
        except Exception:
            _log.failure("responding to {req!r}", req=ctx.request, call_id=ctx.request.call_id)
        if final:
            self.release(ctx)

    def send_final(self, ctx: RequestContext, response: Response) -> None:
        """Send a final response of the proxy's own (or the registrar's) through the hooks."""
        ensure_to_tag(response)
        self.add_server(response)
        self.forward_response(ctx, response, final=True)

    def reply(
        self, ctx: RequestContext, status: int, reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the request at once (no hook runs): validation and routing errors. The
        answer copies Call-ID, From and To from the request as the caller sent it
        (:meth:`as_received`): no hook maps them back for the caller."""
        response = self.as_received(ctx).make_response(status, reason)
        ensure_to_tag(response)
        for name, value in (headers or {}).items():
            response.headers.add(name, value)
        self.add_server(response)
        ctx.final_sent = True
        if ctx.server_transaction is not None:
            ctx.server_transaction.respond(response)
            self.release(ctx)

    @staticmethod
    def as_received(ctx: RequestContext) -> Request:
        """The request as the caller sent it: its server transaction's. A plugin may have
        given the context a mapped copy (the ``nat`` plugin's topology hiding puts the inside
        Call-ID, From and To there); an answer made without the response hooks must not
        show the caller those."""
        tx = ctx.server_transaction
        return tx.request if tx is not None else ctx.request

    def release(self, ctx: RequestContext) -> None:
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
            self.core.drop_context(tx)

    def answer(
        self, tx: ServerTransaction, request: Request, status: int, reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer a request that has no context (refused before one was made)."""
        try:
            response = request.make_response(status, reason)
            ensure_to_tag(response)
            for name, value in (headers or {}).items():
                response.headers.add(name, value)
            self.add_server(response)
            tx.respond(response)
        except Exception:
            _log.failure("answering {request!r}", request=request, call_id=request.call_id)

    def add_server(self, response: Response) -> None:
        """Add ``Server: [proxy] user_agent`` to a response of the proxy's own."""
        agent = self.core.config.proxy.user_agent
        if agent and "server" not in response.headers:
            response.headers.add("Server", agent)

    def hook_failed(self, failure: Failure, ctx: RequestContext) -> None:
        """A request hook failed: the caller gets a 500 unless it was answered already."""
        _log.failure("plugin hook for {req!r}", failure, req=ctx.request,
                     call_id=ctx.request.call_id, source=ctx.request.source)
        if not ctx.final_sent and ctx.server_transaction is not None:
            self.reply(ctx, 500, "Server Internal Error")
