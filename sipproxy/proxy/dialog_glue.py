"""What the proxy learns about dialogs from the messages it forwards: a 2xx to an INVITE sets
one up (:class:`~sipproxy.dialogs.DialogTracker`), a target refresh updates the parties, a
BYE ends it; the flows and flood budget a dialog holds are released when it ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from sipproxy.dialogs import Address, Dialog, uri_address
from sipproxy.errors import ParseError
from sipproxy.flows import flow_of

# at run time: _Heard names Source, a compiled class that must be loaded before this module
from sipproxy.message import Message, Response, Source
from sipproxy.uri import parse_name_addr

if TYPE_CHECKING:
    from sipproxy.context import Branch, RequestContext, Target
    from sipproxy.proxy.core import Proxy

__all__ = ["DialogGlue"]


def _contact_addresses(values: Sequence[str]) -> list[Address]:
    """Where the Contact header values ``values`` send requests (none if one does not
    parse)."""
    try:
        contacts = [parse_name_addr(v, allow_star=True) for v in values]
        return [uri_address(c.uri) for c in contacts if c.uri.is_sip]
    except ParseError:
        return []


def _source_address(source: Source | None) -> list[Address]:
    return [] if source is None else [(source.host.lower(), source.port)]


def _target_address(target: Target | None) -> list[Address]:
    return [] if target is None else [(target.host.lower(), target.port)]


class _Heard(NamedTuple):
    """What a message that set up a dialog says of its sender, kept for
    :meth:`DialogGlue._learn_parties`: its Contact values as text, its Record-Route entries
    that are not the proxy's own (decided at once: the proxy's connections come and go).
    Tuples of strings, which the garbage collector stops tracking."""

    contacts: tuple[str, ...]
    routes: tuple[Address, ...]
    source: Source | None


class DialogGlue:
    """Keeps :attr:`Proxy.dialogs <sipproxy.proxy.Proxy.dialogs>` in step with the calls.

    :param core: the proxy (dialogs, flows, flood guard, pipeline, config).
    """

    def __init__(self, core: Proxy) -> None:
        self.core = core

    def dialog_from_2xx(self, ctx: RequestContext, branch: Branch, response: Response) -> bool:
        """Track the dialog a 2xx to an INVITE sets up; False: the 2xx is not to be forwarded
        (it would be dialog number ``max_branches + 1`` of one INVITE: a callee answering again
        and again with new To tags must not grow the dialog table, 12 hours each)."""
        core = self.core
        request = ctx.request
        if request.to.tag:
            self.target_refreshed(ctx, branch, response)  # a re-INVITE: the dialog exists
            return True
        from_tag = request.from_.tag
        to_tag = response.to.tag
        if not from_tag or not to_tag:
            return True
        limit = core.config.proxy.max_branches
        if ctx.dialogs_made >= limit and core.dialogs.find(request.call_id, from_tag,
                                                            to_tag) is None:
            answered = response.source
            core.refusals.refused(
                "dialogs_per_request", answered.host if answered is not None else "?",
                "dropped a 2xx from {refused_source} to {request}: one INVITE sets up at most "
                "{limit} dialogs ([proxy] max_branches)", request=repr(request), limit=limit,
                call_id=request.call_id)
            return False
        source = request.source
        dialog, new = core.dialogs.establish(
            request.call_id, from_tag, to_tag, source.side if source is not None else "",
            response.source.side if response.source is not None else "",
        )
        if new:
            ctx.dialogs_made += 1
            ctx.dialog = dialog
            dialog.from_uri, dialog.to_uri = str(request.from_.uri), str(request.to.uri)
            dialog.learn_later(self._learn_parties, self._heard(request), self._heard(response),
                               branch.target)
            flows = [f for f in (flow_of(source), flow_of(response.source)) if f is not None]
            if flows:
                dialog.flows = flows
                core.flows.hold(flows)
            flood = core.flood
            if flood is not None and source is not None and flood.dialog_started(source.host):
                dialog.flood_source = source.host  # counted until dialog_ended
            core.pipeline.notify("dialog_established", dialog)
        return True

    def _heard(self, message: Message) -> _Heard:
        return _Heard(tuple(message.headers.get_all("contact")),
                      tuple(self._foreign_routes(message)), message.source)

    @staticmethod
    def _learn_parties(dialog: Dialog, caller: _Heard, callee: _Heard,
                       target: Target | None) -> None:
        """Teach the parties of a new dialog what the INVITE (``caller``) and its 2xx
        (``callee``, answering from where the branch went: ``target``) said of them."""
        source = caller.source
        dialog.caller.learn(
            [source.host] if source is not None else [],
            [*_contact_addresses(caller.contacts), *_source_address(source)], caller.routes)
        dialog.callee.learn(
            [a[0] for a in (*_source_address(callee.source), *_target_address(target))],
            [*_contact_addresses(callee.contacts), *_target_address(target)],
            [a for a in callee.routes if a not in caller.routes])

    def target_refreshed(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
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
        sender.learn(targets=_contact_addresses(request.headers.get_all("contact")))
        dialog.peer_of(sender).learn(
            [a[0] for a in _source_address(response.source)],
            [*_contact_addresses(response.headers.get_all("contact")),
             *_target_address(branch.target)])

    def _foreign_routes(self, message: Message) -> list[Address]:
        """The Record-Route entries of ``message`` that are not the proxy's own."""
        try:
            entries = message.name_addrs("record-route")
        except ParseError:
            return []
        is_own_uri = self.core.addresses.is_own_uri
        return [uri_address(e.uri) for e in entries if e.uri.is_sip and not is_own_uri(e.uri)]

    def end_dialog_on_bye(self, ctx: RequestContext) -> None:
        """A BYE was answered 2xx (or finally): its dialog ends."""
        if ctx.request.method == "BYE" and ctx.dialog is not None:
            self.core.dialogs.end(ctx.dialog, "bye")

    def dialog_ended(self, dialog: Dialog, reason: str) -> None:
        """The tracker ended ``dialog``: release what it held, tell the plugins."""
        core = self.core
        core.flows.release(dialog.flows)
        dialog.flows = []
        host, dialog.flood_source = dialog.flood_source, None
        flood = core.flood
        if host is not None and flood is not None:
            flood.dialog_ended(host)
        core.pipeline.notify("dialog_ended", dialog, reason)
