"""Access control: the proxy is never an open relay (the ``acl`` plugin).

Every request's source is one of:

- *inside*: it arrived on a listener whose side is not ``outside`` and its address is in
  ``inside_networks`` (default: the RFC 1918, link-local, ULA and loopback ranges). A packet
  on an outside listener is never inside, whatever its (spoofable) source address says;
- *trusted*: its address is in ``trusted`` (e.g. the provider's addresses), on any listener;
- *outside*: everything else.

Inside and trusted sources may send anything (who may call out is the ``auth`` plugin's
business). A request from the outside may only reach:

- a target the proxy itself resolves: a Request-URI of our domains or own sockets (local
  users through the location service, which answers 404/480 when there is no binding; ``nat``
  tokens; the proxy itself, e.g. OPTIONS), with no Route left once the proxy's own Route
  entries are removed (a strict router's Request-URI is undone as the core does);
- in a dialog the proxy is part of (``ctx.dialog``: INVITE dialogs the proxy record-routed),
  the peer of the party that sent it. The sender is the party whose messages came from the
  request's source address (``Dialog.parties_from``: the INVITE's source for the caller; the
  2xx's source and the address the INVITE went to for the callee); its peer may be reached at
  what the core recorded for it (``Dialog.caller``/``callee``): its Contact (also after a
  target refresh), the address the proxy sent to or heard it from, or, when a foreign Route
  entry is left, a Record-Route entry on the peer's side of the proxy; when the peer is
  itself an untrusted outside party, only such an address on a host its own messages came
  from (``Party.hosts``): an outside party's Contact or Record-Route naming a third host is
  not followed (``vouched``). A Request-URI's ``maddr`` counts as its host. Anything else (a
  changed Request-URI, a route of the sender's own side, a source that is neither party) is
  ``403``: a caller cannot relay through its own call, nor through an accomplice's;
- anywhere, when an authentication plugin verified the sender (``ctx.data[AUTHENTICATED_USER]``,
  a local user of a public proxy calling out). A request whose From is one of our domains is
  therefore judged in ``request_forwarding``, after every ``request_received`` hook (``auth``
  challenges it there); any other request from the outside for an outside target is answered
  ``403 Relaying denied`` at once.

A REGISTER from the outside is refused too when the ``auth`` plugin is not enabled and the
proxy has inside listeners (its phones are inside: an unauthenticated outside host must not
take over a local user's calls); a public proxy without ``auth`` (every listener outside)
accepts it and warns at start-up.

An ACK that would be relayed is dropped. Limitation: only INVITE dialogs are tracked by the
core, so an in-dialog request of another dialog (SUBSCRIBE/NOTIFY, REFER) from an untrusted
outside source to an outside target is refused unless its sender authenticates; list such
peers in ``trusted``.

Every refusal is counted in ``plugin.counters`` (``acl.relay_denied``, ``acl.ack_dropped``)
and logged at most once per source address per ``log_interval`` seconds.

Config ``[acl]``: ``inside_networks``, ``trusted`` (CIDRs, default none), ``log_interval``
(seconds, default 60). Put ``acl`` first in ``[plugins] enabled`` (before ``nat``, which
rewrites the Request-URIs of its tokens).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.metrics_core import Metric
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.addressing import INTERNAL_NETWORKS, IPNetwork, in_networks
from sipproxy.config import Config
from sipproxy.context import Branch, RequestContext
from sipproxy.dialogs import Dialog, Party, uri_address
from sipproxy.errors import ParseError
from sipproxy.interfaces import (
    AUTHENTICATED_USER,
    IImpliedPluginFactory,
    IProxyCore,
    IStatusProvider,
)
from sipproxy.message import Request, Response
from sipproxy.pipeline import Plugin
from sipproxy.proxy.routing import next_hop
from sipproxy.refusals import RefusalLog, refusal_metrics
from sipproxy.settings import Section, network, read_section, setting
from sipproxy.uri import URI

__all__ = ["DEFAULT_INSIDE", "AclFactory", "AclPlugin", "AclSettings", "factory"]

_log = Logger(namespace="sipproxy.plugins.acl")

DEFAULT_INSIDE: Final = INTERNAL_NETWORKS
_NEEDS_AUTH: Final = "acl.needs_auth"

Networks = tuple[IPNetwork, ...]


def _ip(host: str) -> str:
    """``host`` in one spelling (an IPv6 literal compressed, without brackets)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


def _same_host_as_any(host: str, hosts: Iterable[str]) -> bool:
    ip = _ip(host)
    return any(_ip(h) == ip for h in hosts)


@implementer(IStatusProvider)
class AclPlugin(Plugin):
    """The ``acl`` plugin (see the module docstring)."""

    name = "acl"

    def __init__(
        self,
        core: IProxyCore,
        inside_networks: Iterable[str] = DEFAULT_INSIDE,
        trusted: Iterable[str] = (),
        log_interval: float = 60.0,
        inside_registrations: bool = False,
    ) -> None:
        self.core = core
        #: REGISTERs to our domains from the outside are refused (no auth plugin vouches for
        #: them, and the phones of this set-up are inside)
        self.inside_registrations = inside_registrations
        self.inside: Networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in inside_networks)
        self.trusted: Networks = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self.refusals = RefusalLog(core.clock, _log, log_interval)
        #: refusals by reason: "acl.relay_denied", "acl.ack_dropped"
        self.counters = self.refusals.counters
        self._classify_host = functools.lru_cache(maxsize=4096)(self._classify_uncached)

    # -- IStatusProvider ---------------------------------------------------------------------------
    def metrics(self) -> Iterable[Metric]:
        """Refusals by reason."""
        return [refusal_metrics(self.name, self.counters)]

    def status(self) -> Mapping[str, Any]:
        """Refusals by reason, and the networks that count as inside and trusted."""
        return {"refusals": dict(self.counters), "inside": [str(n) for n in self.inside],
                "trusted": [str(n) for n in self.trusted]}

    # -- sources ----------------------------------------------------------------------------------
    def _classify_uncached(self, host: str, side: str) -> str:
        if in_networks(host, self.trusted):
            return "trusted"
        if side != "outside" and in_networks(host, self.inside):
            return "inside"
        return "outside"

    def classify(self, request: Request) -> str:
        """"inside", "trusted" or "outside" (see the module docstring)."""
        source = request.source
        if source is None:
            return "inside"  # made in this process
        return str(self._classify_host(source.host, source.side))

    # -- targets ----------------------------------------------------------------------------------
    def _ours(self, uri: URI) -> bool:
        return uri.is_sip and self.core.is_local_domain(uri.host)

    def next_hop(self, request: Request) -> tuple[URI, bool] | None:
        """Where the core sends this request, and whether that is a Route entry
        (:func:`sipproxy.proxy.routing.next_hop`); None for a Route that does not parse."""
        try:
            return next_hop(request, self.core.is_own_uri)
        except ParseError:
            return None

    def resolved_here(self, request: Request) -> bool:
        """Does the proxy itself decide where this request goes (local user, own address, nat
        token), with no foreign Route left? As the core routes it (RFC 3261 16.4)."""
        hop = self.next_hop(request)
        return hop is not None and not hop[1] and bool(self.core.is_local_uri(hop[0]))

    def reaches_peer(self, dialog: Dialog, request: Request) -> bool:
        """Does this in-dialog request go to the peer of the party that sent it: the remote
        target or address the proxy recorded for that peer (a foreign Route entry left: one
        of the Record-Route entries on the peer's side)? The sender is the party whose
        messages came from the request's source address; a source neither party used reaches
        nobody."""
        source = request.source
        hop = self.next_hop(request)
        if source is None or hop is None or not hop[0].is_sip:
            return False
        address = uri_address(hop[0])
        routed = hop[1]
        for party in dialog.parties_from(source.host):
            peer = dialog.peer_of(party)
            if address in (peer.routes if routed else peer.targets) and (
                    _same_host_as_any(address[0], peer.hosts) or self.vouched(dialog, peer)):
                return True
        return False

    def vouched(self, dialog: Dialog, party: Party) -> bool:
        """Is ``party`` inside or trusted (an address its messages came from is)? Only such a
        party's Contact and Record-Route may name a third host: an outside party that wrote
        the victim's address there must not make the proxy send its peer's requests there."""
        side = dialog.caller_side if party is dialog.caller else dialog.callee_side
        return any(self._classify_host(host, side) != "outside" for host in party.hosts)

    # -- hooks ------------------------------------------------------------------------------------
    def request_received(self, ctx: RequestContext) -> Any:
        request: Request = ctx.request
        if self.classify(request) != "outside":
            return None
        if self.resolved_here(request):
            if self.inside_registrations and request.method == "REGISTER":
                return self._deny(ctx, "registration from the outside without auth")
            return None
        if ctx.dialog is not None:
            if self.reaches_peer(ctx.dialog, request):
                return None
            return self._deny(ctx, "no party of the dialog")
        try:
            sender = request.from_.uri
        except ParseError:
            return self._deny(ctx)
        if self._ours(sender):
            ctx.data[_NEEDS_AUTH] = True  # judged in request_forwarding: auth may vouch for it
            return None
        return self._deny(ctx)

    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> Any:
        if ctx.data.get(_NEEDS_AUTH) and AUTHENTICATED_USER not in ctx.data:
            return self._deny(ctx)
        return None

    def _deny(self, ctx: Any, why: str = "no local target") -> Response:
        request: Request = ctx.request
        source = request.source
        host = source.host if source is not None else "?"
        ack = ctx.server_transaction is None
        self.refusals.refused(
            "acl.ack_dropped" if ack else "acl.relay_denied", host,
            "acl: relaying denied: {method} {uri} from {refused_source} ({why})",
            method=request.method, uri=str(request.uri), why=why, call_id=request.call_id,
            plugin="acl",
        )
        # for an ACK nothing is sent: a Response only means "drop it"
        return request.make_response(403, "Relaying denied")


@dataclass(frozen=True, slots=True)
class AclSettings:
    """``[acl]``: who is inside, who is trusted, and how often refusals are logged."""

    inside_networks: tuple[str, ...] = setting(
        DEFAULT_INSIDE, parse=network,
        doc="Sources on an inside listener from these networks are inside (may send anything).")
    trusted: tuple[str, ...] = setting(
        (), parse=network, doc="Sources that may send anything, on any listener (the provider).")
    log_interval: float = setting(
        60.0, min=0.0, doc="One log line per refused source per this many seconds.")


@implementer(IImpliedPluginFactory)
class AclFactory:
    """Builds the ``acl`` plugin, and runs it by itself when a listener faces the outside."""

    name = "acl"
    settings = AclSettings

    def implied_by(self, config: Config) -> bool:
        """A proxy with a socket on the outside is never an open relay."""
        return any(lc.side == "outside" for lc in config.listen)

    def build(self, core: IProxyCore, section: Section) -> AclPlugin:
        settings = read_section(AclSettings, section)
        plugins = getattr(core.config, "plugins", ())
        proxy = core.config.proxy  # local users only if it is a registrar (none on a
        has_users = bool(proxy.domains or proxy.host_addresses)  # firewall: domains = [])
        sides = {getattr(lst, "side", "") for lst in core.listeners}
        unauthenticated = "auth" not in plugins and has_users and "outside" in sides
        # An edge proxy whose phones are inside: registering from the outside needs auth.
        # A public proxy without auth (every listener outside) registers anyone: say so.
        inside_only = unauthenticated and sides != {"outside"}
        if unauthenticated and not inside_only:
            _log.warn("acl: the auth plugin is not enabled: anyone on the outside can register "
                      "as a local user")
        return AclPlugin(core, settings.inside_networks, settings.trusted, settings.log_interval,
                         inside_registrations=inside_only)


factory: Final = AclFactory()
