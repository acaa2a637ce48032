"""NAT traversal: phones on a private network reach, and are reached from, the outside.

Firewall mode (the proxy has ``inside`` and ``outside`` listeners): nothing that tells the far
side where to send something leaves on the outside with an inside address.

- Contact: a phone's Contact is replaced, in requests and responses that leave toward the other
  side, by ``sip:nat-TOKEN@<proxy address facing that side>``; the token maps back to the
  phone's Contact and to the address its packets really came from (after NAT, rport). Requests
  to such a URI (incoming calls, in-dialog requests) are sent to the phone there. Tokens live as
  long as the registration (from the 2xx's expires) or, for dialogs, ``mapping_ttl`` since the
  last message that carried the phone's Contact. The registrar's 2xx shows the phone its own
  Contact again (the phone looks for it).
- Via: the phone's Vias are hidden on the outside (the proxy keeps them; ``Branch.hide_vias``).
- Record-Route, Route, Path: the proxy's inside-facing Record-Route is removed from what goes
  out and put back into what comes in; inside Route/Path values are removed.
- Inside and outside: a host is on the side the network puts it (the kernel's route to it, or
  ``[upstream] side``: :meth:`~sipproxy.interfaces.IProxyCore.routed_side`), so a provider on a
  private address behind the outside interface is outside (firewall mode; with outside
  listeners only, as where the network does not say, a host in ``inside_networks`` is inside).
  A request goes to the side of the listener it leaves from.
- Requests from the outside addressed to an inside host, or to an unknown token, are refused
  (403 / 404): nothing reaches the inside that a phone did not ask for (a token, or a binding
  of a local user); a name that resolves to an inside address is refused too. (A response
  that matches no transaction is never forwarded: the core drops it.)

Public-proxy mode (phones behind someone else's NAT; in firewall mode too, for a local user
registered from the outside): a binding whose Contact names a host other than the one its
REGISTER came from (a private address, or anyone else's: whatever its port) is reached
at the address the REGISTER came from (the registrar stores it with the binding; no alias
parameter is needed), its dialogs' Contacts are replaced by tokens as above, and NATed bindings
are kept alive with keepalive requests (OPTIONS by default) every ``keepalive_interval``
seconds; one that fails ``keepalive_failures`` times in a row is removed.

The token table holds at most ``max_mappings`` entries (an outside host that calls in again
and again must not grow it for ``mapping_ttl`` each time). When it is full, the least recently
used mapping made for a call is forgotten to make room (a call that old has most likely ended;
if not, requests to its token get 404); a mapping a registration stands behind is never
forgotten this way: if every mapping is one, the request that needs a new one is answered
``503 Too Many NAT Mappings`` with ``Retry-After`` (which the caller gets as a ``500`` with
that reason: RFC 3261 16.7 step 6), and a response that needs one is dropped. Both are counted
(``counters["nat.evicted"]``, ``counters["nat.full"]``) and logged at most once per source
per minute.

With a durable ``[registrar] store`` (``core.state``) a registration's token survives a
restart: it is saved when the registrar's 2xx grants it (and forgotten when it expires or the
REGISTER removed it), and taken back when the plugin starts, so the provider's calls to it
reach the phone without a new REGISTER. Tokens of calls are not kept.

Topology hiding (``hide_topology``, on by default in firewall mode): no inside address or
inside host name (``inside_domains``) in any other byte either: Call-ID, From, To, Refer-To,
Referred-By, Replaces, every other header and every non-SDP body part are mapped, or removed
when they cannot be (:mod:`sipproxy.plugins.topology` says which), and mapped back on the way
in.

SDP is not touched: that is the media plugin's job. Without it, media needs open ports.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.addressing import PRIVATE_NETWORKS, in_networks, is_private
from sipproxy.context import Branch, RequestContext, Target
from sipproxy.errors import ParseError
from sipproxy.headers import Headers
from sipproxy.interfaces import (
    DROP,
    IPluginFactory,
    IProxyCore,
    IStateStore,
    IStatusProvider,
    SavedToken,
)
from sipproxy.location import ILocationListener
from sipproxy.message import Message, Request, Response, new_branch, new_tag
from sipproxy.pipeline import Plugin
from sipproxy.plugins.topology import HiddenCallId, Hiding, TopologyHider
from sipproxy.proxy.record_route import insert_record_routes, remove_uri_values
from sipproxy.refusals import RefusalLog, refusal_metrics
from sipproxy.settings import Section, ip_address, network, read_section, setting
from sipproxy.uri import NameAddr, format_host, parse_name_addr, parse_uri

__all__ = ["ContactMap", "ContactMapFull", "NatPlugin", "NatSettings", "factory"]

_log = Logger(namespace="sipproxy.plugins.nat")

TOKEN_PREFIX = "nat-"
DEFAULT_INSIDE = PRIVATE_NETWORKS
DEFAULT_MAX_MAPPINGS = 20_000
#: seconds a request refused because the token table is full is told to wait
FULL_RETRY_AFTER = 30


@dataclass(slots=True)
class ContactMapping:
    token: str
    contact: str  # the phone's Contact URI, as it sent it
    target: Target  # where its packets come from
    expires_at: float
    registration: bool = False  # made for a REGISTER: never evicted to make room
    #: for a REGISTER: its address-of-record, the token URI the registrar got, and until when
    #: the registrar's last 2xx granted it (the admin status page shows these)
    aor: str = ""
    public_contact: str = ""
    registered_until: float = 0.0


def _registered_address(binding: Any) -> Target | None:
    """Where a binding is reached when its Contact names a host other than the one its
    REGISTER came from (a private address behind the phone's NAT, or anyone else's: a
    Contact or its ``maddr`` naming a victim must not make the proxy send the user's calls
    there): that source. None: at its Contact."""
    source = binding.source
    if source is None:
        return None
    try:
        contact = parse_uri(binding.contact)
    except ParseError:
        return None
    if not contact.is_sip or _same_host(contact.get_param("maddr") or contact.host, source.host):
        return None
    return Target(source.transport.upper(), source.host, source.port, source.host)


def _uri_target(uri: Any) -> Target:
    """Where a SIP URI itself leads (its host, port and transport)."""
    transport = (uri.get_param("transport") or "udp").upper()
    return Target(transport, uri.host, uri.port or 5060, uri.host)


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower() == b.lower()


class ContactMapFull(Exception):
    """No room for a new mapping: the table is full of registrations' mappings."""


class ContactMap:
    """Tokens for Contacts: reused for the same Contact and address, forgotten once expired.

    At most ``max_mappings`` are kept: when full, the least recently used mapping that is not
    a registration's is evicted (``on_evict`` is told) to make room; if there is none,
    :obj:`token_for` raises :obj:`ContactMapFull`."""

    def __init__(
        self, clock: IReactorTime, max_mappings: int = DEFAULT_MAX_MAPPINGS,
        on_evict: Callable[[ContactMapping], None] | None = None,
        on_expire: Callable[[ContactMapping], None] | None = None,
    ) -> None:
        self.clock = clock
        self.max_mappings = max_mappings
        self.on_evict = on_evict
        self.on_expire = on_expire
        self._by_token: dict[str, ContactMapping] = {}
        self._by_contact: dict[tuple[str, Target], str] = {}
        # tokens that may be evicted (not a registration's), least recently used first
        self._evictable: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_token)

    def token_for(
        self, contact: str, target: Target, ttl: float, registration: bool = False
    ) -> ContactMapping:
        now = self.clock.seconds()
        token = self._by_contact.get((contact, target))
        mapping = self._by_token.get(token) if token else None
        if mapping is None:
            if len(self._by_token) >= self.max_mappings:
                self._make_room()
            token = TOKEN_PREFIX + os.urandom(8).hex()
            mapping = ContactMapping(token, contact, target, now + ttl, registration)
            self._by_token[token] = mapping
            self._by_contact[(contact, target)] = token
        else:
            mapping.expires_at = max(mapping.expires_at, now + ttl)
            mapping.registration = mapping.registration or registration
        if mapping.registration:
            self._evictable.pop(mapping.token, None)
        else:
            self._used(mapping.token)
        return mapping

    def _used(self, token: str) -> None:
        self._evictable[token] = None
        self._evictable.move_to_end(token)

    def _make_room(self) -> None:
        if not self._evictable:
            raise ContactMapFull(f"{len(self._by_token)} contact mappings, all registrations'")
        token, _ = self._evictable.popitem(last=False)
        mapping = self._forget(token)
        if mapping is not None and self.on_evict is not None:
            self.on_evict(mapping)

    def _forget(self, token: str) -> ContactMapping | None:
        mapping = self._by_token.pop(token, None)
        if mapping is not None:
            self._by_contact.pop((mapping.contact, mapping.target), None)
        self._evictable.pop(token, None)
        return mapping

    def mappings(self) -> list[ContactMapping]:
        """Every mapping held now (expired ones until the next purge)."""
        return list(self._by_token.values())

    def restore(self, token: str, contact: str, target: Target, expires_at: float) -> bool:
        """Put back a registration's mapping from before a restart; False (nothing changed)
        when the table is full or knows the token or the Contact and address already."""
        if len(self._by_token) >= self.max_mappings or token in self._by_token or \
                (contact, target) in self._by_contact:
            return False
        self._by_token[token] = ContactMapping(token, contact, target, expires_at, True)
        self._by_contact[(contact, target)] = token
        return True

    def get(self, token: str) -> ContactMapping | None:
        """The mapping of ``token``, expired or not, without counting it as used."""
        return self._by_token.get(token)

    def lookup(self, token: str) -> ContactMapping | None:
        mapping = self._by_token.get(token)
        if mapping is None or mapping.expires_at < self.clock.seconds():
            return None
        if not mapping.registration:
            self._used(token)
        return mapping

    def set_ttl(self, token: str, ttl: float) -> None:
        mapping = self._by_token.get(token)
        if mapping is not None:
            mapping.expires_at = self.clock.seconds() + ttl

    def purge(self) -> int:
        now = self.clock.seconds()
        gone = [m for m in self._by_token.values() if m.expires_at < now]
        for mapping in gone:
            self._forget(mapping.token)
            if self.on_expire is not None:
                self.on_expire(mapping)
        return len(gone)


@dataclass(eq=False)
class _Watched:
    binding: Any
    target: Target
    failures: int = 0
    pending: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@implementer(ILocationListener, IStatusProvider)
class NatPlugin(Plugin, Service):
    """The ``nat`` plugin (see the module docstring)."""

    name = "nat"

    def __init__(
        self,
        core: IProxyCore,
        inside_networks: Iterable[str] = DEFAULT_INSIDE,
        external_address: str | None = None,
        mapping_ttl: float = 7200.0,
        keepalive_interval: float = 30.0,
        keepalive_failures: int = 3,
        keepalive_method: str = "OPTIONS",
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        hide_topology: bool | None = None,
        inside_domains: Iterable[str] = (),
        strip_user_agent: bool = False,
    ) -> None:
        self.core = core
        self.clock: IReactorTime = core.clock
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in inside_networks)
        self.external_address = external_address
        self.mapping_ttl = mapping_ttl
        self.keepalive_interval = keepalive_interval
        self.keepalive_failures = keepalive_failures
        self.keepalive_method = keepalive_method
        self.refusals = RefusalLog(self.clock, _log)
        #: evictions and refusals because the token table is full ("nat.evicted", "nat.full")
        self.counters = self.refusals.counters
        self.contacts = ContactMap(self.clock, max_mappings, self._evicted, self._expired)
        #: where registration tokens are saved to survive a restart (a durable core.state)
        self.state: IStateStore | None = None
        self._requester = "?"  # the source whose message needs a mapping now (for the log)
        self.watched: dict[tuple[str, str], _Watched] = {}
        self._purge: LoopingCall | None = None
        self._keepalive: LoopingCall | None = None
        self._is_inside = functools.lru_cache(maxsize=4096)(self._inside_uncached)
        #: firewall mode (listeners of both sides): the network tells inside from outside;
        #: on a public proxy everything is routed outside, and inside_networks alone decides
        self._two_sided = {lst.side for lst in core.listeners} >= {"inside", "outside"}
        if hide_topology is None:
            hide_topology = self._two_sided
        #: firewall mode's topology hiding (None: off)
        self.topology = TopologyHider(
            self.clock, self._inside_address, inside_domains, mapping_ttl, max_mappings,
            strip_user_agent) if hide_topology else None
        if external_address:
            for listener in core.listeners:
                if listener.side == "outside":
                    listener.via_host = external_address

    # -- service -------------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._restore_tokens()
        self._purge = LoopingCall(self.purge)
        self._purge.clock = self.clock
        self._purge.start(60.0, now=False)
        self.core.location.add_listener(self)
        if self.keepalive_interval > 0:
            self._keepalive = LoopingCall(self.send_keepalives)
            self._keepalive.clock = self.clock
            self._keepalive.start(self.keepalive_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        for loop in (self._purge, self._keepalive):
            if loop is not None and loop.running:
                loop.stop()
        self.core.location.remove_listener(self)

    def purge(self) -> None:
        """Forget the expired mappings."""
        self.contacts.purge()
        if self.topology is not None:
            self.topology.purge()

    # -- registration tokens that survive a restart ([registrar] store) ------------------------
    def _restore_tokens(self) -> None:
        """Take back the registrations' tokens the provider still has on file (the phones are
        reached by them without a new REGISTER), and save them from now on."""
        state = self.core.state
        if not state.durable:
            return
        restored = sum(
            self.contacts.restore(saved.token, saved.contact, saved.target, saved.expires_at)
            for saved in state.saved_tokens(self.clock.seconds()))
        if restored:
            _log.info("nat: {count} registration tokens restored", count=restored)
        self.state = state

    def _save_token(self, token: str) -> None:
        """Save (or, once expired, forget) a registration's token after the registrar's 2xx."""
        state = self.state
        mapping = self.contacts.get(token)
        if state is None or mapping is None or not mapping.registration:
            return
        if mapping.expires_at > self.clock.seconds():
            state.save_token(
                SavedToken(mapping.token, mapping.contact, mapping.target, mapping.expires_at))
        else:
            state.delete_token(mapping.token)

    def _expired(self, mapping: ContactMapping) -> None:
        if self.state is not None and mapping.registration:
            self.state.delete_token(mapping.token)

    # -- addresses -----------------------------------------------------------------------------
    def _inside_uncached(self, host: str) -> bool:
        return in_networks(host, self.networks)

    def is_inside(self, host: str) -> bool:
        """Is ``host`` an address of the private network(s) (``inside_networks``)?"""
        return bool(self._is_inside(host))

    def faces_inside(self, host: str) -> bool:
        """Is ``host`` on the inside? In firewall mode, on the side the network puts it (the
        kernel's route, ``[upstream] side``: a provider on a private address behind the
        outside interface is outside); where it does not say, in ``inside_networks``."""
        side = self.core.routed_side(host) if self._two_sided else None
        return side == "inside" if side is not None else self.is_inside(host)

    def _inside_address(self, address: str) -> bool:
        """For topology hiding: an address found in a message is an inside one when it faces
        the inside (our own outside address on a private network does not)."""
        return self.faces_inside(address) and self.is_inside(address)

    def is_private(self, host: str) -> bool:
        """NAT detection: an inside address, or any private one (a phone behind someone
        else's NAT, e.g. a home office, when ``inside_networks`` names only our LAN)."""
        return bool(self._is_inside(host)) or is_private(host)

    def _side_of_source(self, message: Request | Response) -> str:
        source = message.source
        return source.side if source is not None else ""

    def _natted(self, message: Request | Response) -> bool:
        """Public-proxy NAT detection: a private Contact or Via, unlike the packet's source.
        A response's Vias name the requesters, not the responder: only its Contact counts."""
        source = message.source
        if source is None:
            return False
        via = message.top_via if isinstance(message, Request) else None
        if via is not None and via.host != source.host and self.is_private(via.host):
            return True
        try:
            contacts = message.contacts
        except ParseError:
            return False
        return any(
            c.uri.is_sip and c.uri.host != source.host and self.is_private(c.uri.host)
            for c in contacts
        )

    @staticmethod
    def _target_of(message: Request | Response) -> Target | None:
        source = message.source
        if source is None:
            return None
        return Target(source.transport.upper(), source.host, source.port, source.host)

    # -- requests ------------------------------------------------------------------------------
    def request_received(self, ctx: RequestContext) -> Any:
        if self.topology is not None and self._side_of_source(ctx.request) == "outside":
            self._reveal_request(ctx)  # may give the context a copy: read it after this
        request: Request = ctx.request
        uri = request.uri
        if uri.is_sip and uri.user and uri.user.startswith(TOKEN_PREFIX) and \
                self.core.is_local_domain(uri.host):
            mapping = self.contacts.lookup(uri.user)
            if mapping is None:
                return self._refuse(request, 404, "Not Found")
            request.uri = parse_uri(mapping.contact)
            ctx.destination = mapping.target
            ctx.data["nat_token"] = mapping.token
            self.contacts.set_ttl(mapping.token, max(self.mapping_ttl,
                                                     mapping.expires_at - self.clock.seconds()))
            return None
        if self._side_of_source(request) == "outside" and self._leads_inside(request):
            return self._refuse(request, 403, "Forbidden")
        return None

    def _leads_inside(self, request: Request) -> bool:
        """Would this request from the outside be sent to an inside address by itself?"""
        uri = request.uri
        if uri.is_sip and self.faces_inside(uri.get_param("maddr") or uri.host):
            return True
        for value in request.headers.get_all("route"):
            try:
                route = parse_name_addr(value)
            except ParseError:
                return True
            if route.uri.is_sip and self.faces_inside(route.uri.host):
                return True
        return False

    def _refuse(self, request: Request, status: int, reason: str) -> Response:
        # for an ACK the core sends nothing back: a Response only means "drop it"
        _log.info("refused {method} from {source} to {uri}: {status}", method=request.method,
                  source=request.source, uri=str(request.uri), status=status,
                  call_id=request.call_id)
        return request.make_response(status, reason)

    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> Any:
        request: Request = ctx.request
        out: Request = branch.request
        binding = branch.binding
        if binding is not None and binding.source is not None:
            self._route_to_registered_address(ctx, branch, binding)
        out_side = branch.listener.side if branch.listener is not None else ""
        from_inside = self._side_of_source(request) == "inside"
        if self._side_of_source(request) == "outside" and binding is None and \
                "nat_token" not in ctx.data and self._goes_inside(branch, out_side):
            # e.g. a name that resolves to an inside address: nobody inside asked for this
            return self._refuse(request, 403, "Forbidden")
        natted = not from_inside and self._natted(request)
        if out_side == "outside" and from_inside:
            branch.hide_vias = True
            removed = self._remove_inside_values(out, "record-route")
            if removed:
                branch.data["nat_rr"] = removed
            self._remove_inside_values(out, "route")
            self._remove_inside_values(out, "path")
        if (from_inside and out_side == "outside") or natted:
            target = self._target_of(request)
            via = out.top_via  # ours: the host and port the core advertises toward there
            if target is not None and branch.listener is not None and via is not None:
                try:
                    self._tokenize_contacts(out, target, via.host,
                                            via.port or branch.listener.port,
                                            via.transport, self._ttl_of(out),
                                            registration=out.method == "REGISTER")
                except ContactMapFull:
                    self._full(request)
                    response = request.make_response(503, "Too Many NAT Mappings")
                    response.headers.add("Retry-After", str(FULL_RETRY_AFTER))
                    return response
        if self.topology is not None and out_side == "outside":
            self._hide_request(ctx, branch, from_inside)
        return None

    def _evicted(self, mapping: ContactMapping) -> None:
        self.refusals.refused(
            "nat.evicted", self._requester, "nat: {count} contact mappings (the most): forgot "
            "the least recently used, {token} for {contact}, to make room for one for "
            "{refused_source}", count=self.contacts.max_mappings, token=mapping.token,
            contact=mapping.contact)

    def _full(self, message: Request | Response) -> None:
        self.refusals.refused(
            "nat.full", self._requester, "nat: {count} contact mappings (the most), all of "
            "registrations: refused a {what} from {refused_source} that needs a new one",
            count=self.contacts.max_mappings, what=message.start_line())

    def _goes_inside(self, branch: Any, out_side: str) -> bool:
        """Does the branch go inside: leave from an inside listener (the side the request goes
        to), or, with no listener, to an inside host?"""
        if out_side:
            return out_side == "inside"
        target = branch.target
        return target is not None and self.faces_inside(target.host)

    def _route_to_registered_address(self, ctx: Any, branch: Any, binding: Any) -> None:
        """Public-proxy mode: a NATed phone is reached where its REGISTER came from (and the
        request leaves from the socket facing there: its Via and Record-Route say so)."""
        target = _registered_address(binding)
        if target is not None:
            # Proxy.retarget is not declared on IProxyCore (yet): hence the cast
            self.core.retarget(ctx, branch, target)

    def _ttl_of(self, message: Request | Response) -> float:
        if isinstance(message, Request) and message.method == "REGISTER":
            expires = message.headers.get("expires")
            if expires is not None and expires.strip().isdigit():
                return float(expires.strip()) + 60.0
            return 3600.0 + 60.0
        return self.mapping_ttl

    def _tokenize_contacts(
        self, message: Request | Response, target: Target | None, host: str, port: int,
        transport: str, ttl: float, registration: bool = False,
    ) -> None:
        """Replace the Contacts by tokens at ``host:port`` (our socket facing the far side:
        never a wildcard listener's 0.0.0.0), each standing for ``target`` (where the message
        came from), or with ``target`` None (a 3xx: its Contacts name other parties) for the
        Contact's own address, and then only a Contact that faces inside. Raises
        ContactMapFull (nothing changed then)."""
        try:
            contacts = message.contacts
        except ParseError:
            return
        if not contacts or any(not c.uri.is_sip for c in contacts):
            return
        changed = []
        source = message.source
        self._requester = target.host if target is not None else \
            source.host if source is not None else ""
        for contact in contacts:
            uri = contact.uri
            if uri.user and uri.user.startswith(TOKEN_PREFIX):
                changed.append(contact)
                continue
            if target is None and not self.faces_inside(uri.host):
                changed.append(contact)
                continue
            own_ttl = ttl
            expires = contact.get_param("expires")
            if expires is not None and expires.isdigit():
                own_ttl = float(expires) + 60.0
            mapping = self.contacts.token_for(str(uri), target or _uri_target(uri), own_ttl,
                                              registration)
            tp = "" if transport.upper() == "UDP" else f";transport={transport.lower()}"
            new_uri = parse_uri(f"sip:{mapping.token}@{format_host(host)}:{port}{tp}")
            if registration:
                mapping.aor = message.to.uri.aor()
                mapping.public_contact = str(new_uri)
            changed.append(NameAddr(new_uri, contact.display, contact.params.copy(), angle=True))
        message.set_contacts(changed)

    def _remove_inside_values(self, message: Request | Response, name: str) -> list[str]:
        return remove_uri_values(message, name, lambda uri: self.faces_inside(uri.host))

    # -- responses -----------------------------------------------------------------------------
    def response_received(self, ctx: RequestContext, branch: Branch, response: Response) -> Any:
        request: Request = ctx.request
        to_side = self._side_of_source(request)
        from_side = branch.listener.side if branch.listener is not None else ""
        if self.topology is not None and from_side == "outside":
            self._reveal(response)
            if "nat_call_id" in branch.data:  # also when its mapping was forgotten meanwhile
                self._set_call_id(response, request.call_id)
        removed = branch.data.get("nat_rr")
        if removed:
            # our inside-facing entry goes back below our outside one
            insert_record_routes(response, removed, len(request.headers.get_all("record-route")))
        if request.method == "REGISTER":
            # a REGISTER response's Contacts are bindings, not the responder's address
            if 200 <= response.status < 300:
                self._refresh_register_tokens(response)
                if self.state is not None:
                    self._refresh_register_tokens(branch.request, removed_only=True)
                self._restore_register_contacts(response)
            return None
        if "contact" not in response.headers:
            return None
        if (from_side == "inside" and to_side == "outside") or self._natted(response):
            # a 3xx's Contacts name whom to try next (another phone): each is reached at its
            # own address, not where the 3xx came from
            target = None if 300 <= response.status < 400 else \
                self._target_of(response) or branch.target
            listener = self._listener_of(request)
            requester = self._target_of(request)
            if listener is not None and requester is not None and (
                    target is not None or response.status // 100 == 3):
                # the address the core advertises toward the requester (as in Record-Route)
                via = self.core.make_via(requester)
                try:
                    self._tokenize_contacts(response, target, via.host,
                                            via.port or listener.port, via.transport,
                                            self.mapping_ttl)
                except ContactMapFull:
                    self._full(response)
                    return DROP
        return None

    def _listener_of(self, request: Request) -> Any:
        """The listener a request arrived on: its response leaves from there."""
        source = request.source
        if source is None:
            return None
        side = [lst for lst in self.core.listeners if lst.side == source.side]
        for listener in side:
            if listener.port == source.local_port and listener.transport == source.transport:
                return listener
        # over a connection the proxy opened itself (TLS to the provider: a local port no
        # listener has) the response still leaves on that side: a listener of it names us
        for listener in side:
            if listener.transport == source.transport:
                return listener
        return side[0] if side else None

    def _refresh_register_tokens(self, message: Request | Response,
                                 removed_only: bool = False) -> None:
        """After a REGISTER's 2xx: each token's mapping lives as long as the registrar keeps
        its binding (the 2xx's expires). With a durable store also: one the REGISTER removed
        goes now (``message`` is then the REGISTER we forwarded, ``removed_only``: a registrar
        lists only the bindings that remain), and each is saved or forgotten there."""
        try:
            contacts = message.contacts
        except ParseError:
            return
        default = message.headers.get("expires")
        for contact in contacts:
            user = contact.uri.user if contact.uri.is_sip else None
            if not user or not user.startswith(TOKEN_PREFIX):
                continue
            expires = contact.get_param("expires") or default
            if expires is None or not expires.strip().isdigit():
                seconds = None
            else:
                seconds = int(expires.strip())
            if removed_only and seconds != 0:
                continue
            if seconds is not None:
                self.contacts.set_ttl(user, seconds + 60.0 if seconds else 0.0)
                mapping = self.contacts.get(user)
                if mapping is not None:
                    mapping.registered_until = self.clock.seconds() + seconds
            if self.state is not None:
                self._save_token(user)

    def _restore_register_contacts(self, response: Response) -> None:
        """The phone looks for its own Contact in the registrar's answer (RFC 3261 10.2.4):
        give it back the Contacts our tokens stand for."""
        try:
            contacts = response.contacts
        except ParseError:
            return
        restored = []
        changed = False
        for contact in contacts:
            mapping = self._own_mapping(contact.uri)
            if mapping is None:
                restored.append(contact)
                continue
            try:
                uri = parse_uri(mapping.contact)
            except ParseError:
                restored.append(contact)
                continue
            restored.append(NameAddr(uri, contact.display, contact.params.copy(), angle=True))
            changed = True
        if changed:
            response.set_contacts(restored)

    def _own_mapping(self, uri: Any) -> ContactMapping | None:
        """The mapping behind one of our token URIs (a ``nat-`` user at one of our addresses)."""
        user = uri.user if uri.is_sip else None
        if not user or not user.startswith(TOKEN_PREFIX) or \
                not self.core.is_local_domain(uri.host):
            return None
        return self.contacts.lookup(user)

    def response_forwarding(self, ctx: RequestContext, response: Response) -> Any:
        if self._side_of_source(ctx.request) == "outside":
            self._remove_inside_values(response, "record-route")
            self._remove_inside_values(response, "path")
            requester = self._target_of(ctx.request)
            if self.topology is not None and requester is not None:
                outside = ctx.data.get("nat_call_id")
                entry = None
                if outside is not None:
                    self._set_call_id(response, outside)
                    entry = self.topology.reveal(outside)
                via = self.core.make_via(requester)
                listener = self._listener_of(ctx.request)
                port = via.port or (listener.port if listener is not None else 5060)
                self.topology.hide_message(
                    response, Hiding(via.host, self._tokenizer(via.host, port), entry))
        return None

    def dialog_ended(self, dialog: Any, reason: str) -> None:
        if self.topology is not None:
            self.topology.dialog_ended(dialog.call_id)

    # -- topology hiding -----------------------------------------------------------------------
    def _reveal_request(self, ctx: RequestContext) -> None:
        """A request from the outside: an outside Call-ID of ours (an in-dialog request, a
        NOTIFY...) becomes the inside one again (the dialog is the inside one's), and the
        other mapped fields their inside values. The context gets a copy: the transaction
        keeps the request as it came, so what it answers itself (100 Trying, retransmissions)
        carries the outside Call-ID."""
        assert self.topology is not None
        request: Request = ctx.request
        outside = request.call_id
        if self.topology.reveal(outside.strip()) is not None:
            ctx.request = request = request.copy()
        entry = self._reveal(request)
        if entry is None:
            return
        ctx.data["nat_call_id"] = outside
        to_tag = request.to.tag
        if to_tag:
            ctx.dialog = self.core.dialogs.find(entry.inside, request.from_.tag, to_tag)

    def _reveal(self, message: Message) -> HiddenCallId | None:
        """Map what comes from the outside back; the Call-ID's entry (None: not ours)."""
        assert self.topology is not None
        return self.topology.reveal_message(message, self._untokenize)

    def _hide_request(self, ctx: RequestContext, branch: Branch, from_inside: bool) -> None:
        """A request leaving on the outside: its Call-ID hidden when an inside phone made
        it (a new request from the inside, or a dialog an inside phone started), the rest
        as :meth:`TopologyHider.hide_message` does."""
        assert self.topology is not None
        out: Request = branch.request
        request: Request = ctx.request
        outside = ctx.data.get("nat_call_id")
        entry = None
        if outside is not None:
            self._set_call_id(out, outside)
            entry = self.topology.reveal(outside)
        elif from_inside:
            call_id = request.call_id
            dialog = ctx.dialog
            if not request.to.tag or self.topology.should_hide(call_id) or (
                    dialog is not None and dialog.caller_side == "inside"):
                entry = self.topology.hide_call_id(call_id, self._ttl_of(out))
                self._set_call_id(out, self.topology.outside_call_id(call_id))
                branch.data["nat_call_id"] = True
        via = out.top_via
        if via is not None and branch.listener is not None:
            self.topology.hide_message(out, Hiding(via.host, self._tokenizer(
                via.host, via.port or branch.listener.port), entry))

    @staticmethod
    def _set_call_id(message: Message, call_id: str) -> None:
        if message.call_id != call_id:
            message.headers.set("Call-ID", call_id)

    def _tokenizer(self, host: str, port: int) -> Callable[[str], str | None]:
        """For Refer-To/Referred-By: a token URI at our ``host:port`` for an inside URI (an
        INVITE to it reaches that URI's host, as one to a Contact's token does)."""

        def tokenize(uri_text: str) -> str | None:
            try:
                uri = parse_uri(uri_text)
            except ParseError:
                return None
            if not uri.is_sip:
                return None
            try:
                mapping = self.contacts.token_for(uri_text, _uri_target(uri), self.mapping_ttl)
            except ContactMapFull:
                return None
            return f"sip:{mapping.token}@{format_host(host)}:{port}"

        return tokenize

    def _untokenize(self, uri_text: str) -> str | None:
        try:
            mapping = self._own_mapping(parse_uri(uri_text))
        except ParseError:
            return None
        return mapping.contact if mapping is not None else None

    # -- IStatusProvider -----------------------------------------------------------------------
    def metrics(self) -> Iterable[Metric]:
        """Mappings held (registrations' and calls'), phones kept alive, refusals."""
        mappings = GaugeMetricFamily("sipproxy_nat_mappings", "Contact tokens held, by what"
                                     " they were made for.", labels=["kind"])
        held = self.contacts.mappings()
        registrations = sum(1 for m in held if m.registration)
        mappings.add_metric(["registration"], registrations)
        mappings.add_metric(["call"], len(held) - registrations)
        watched = GaugeMetricFamily("sipproxy_nat_keepalive_bindings", "NATed bindings kept"
                                    " alive with keepalive requests.")
        watched.add_metric([], len(self.watched))
        return [mappings, watched, refusal_metrics(self.name, self.counters)]

    def status(self) -> Mapping[str, Any]:
        """Counts, and the phones registered at the provider through us (firewall mode: those
        the provider's last 2xx to their REGISTER still covers)."""
        now = self.clock.seconds()
        held = self.contacts.mappings()
        registrations = [{
            "aor": m.aor,
            "contact": m.public_contact,
            "source": f"{format_host(m.target.host)}:{m.target.port}",
            "transport": m.target.transport.lower(),
            "expires_in": int(m.registered_until - now),
            "user_agent": None,
        } for m in held if m.registration and m.aor and m.registered_until > now]
        return {"mappings": len(held), "keepalive_bindings": len(self.watched),
                "refusals": dict(self.counters), "registrations": registrations}

    # -- keepalives (public-proxy mode) --------------------------------------------------------
    def binding_added(self, binding: Any, previous: Any) -> None:
        target = _registered_address(binding)
        key = (binding.aor, binding.contact)
        if target is not None:
            self.watched[key] = _Watched(binding, target)
        else:
            self.watched.pop(key, None)

    def binding_removed(self, binding: Any, reason: str) -> None:
        self.watched.pop((binding.aor, binding.contact), None)

    def send_keepalives(self) -> None:
        for key, watched in list(self.watched.items()):
            if watched.pending:
                continue
            watched.pending = True
            try:
                request = self._keepalive_request(watched)
                self.core.send_request(request, watched.target,
                                       functools.partial(self._keepalive_answer, key, watched))
            except Exception:
                watched.pending = False
                _log.failure("keepalive to {target}", target=watched.target)

    def _keepalive_request(self, watched: _Watched) -> Request:
        target = watched.target
        via = self.core.make_via(target)
        headers = Headers()
        headers.add("Via", str(via))
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<sip:keepalive@{format_host(via.host)}>;tag={new_tag()}")
        headers.add("To", f"<{watched.binding.contact}>")
        headers.add("Call-ID", new_branch()[7:] + "@sipproxy")
        headers.add("CSeq", f"1 {self.keepalive_method}")
        headers.add("Content-Length", "0")
        return Request(self.keepalive_method, watched.binding.contact, headers)

    def _keepalive_answer(
        self, key: tuple[str, str], watched: _Watched, response: Response
    ) -> None:
        watched.pending = False
        if response.status < 200:
            return
        if response.source is not None:  # any answer from the phone: the NAT mapping lives
            watched.failures = 0
            return
        watched.failures += 1  # our own 408/503: no answer
        if watched.failures >= self.keepalive_failures and self.watched.get(key) is watched:
            _log.info("binding {contact} of {aor} stopped answering keepalives; removed",
                      contact=watched.binding.contact, aor=watched.binding.aor)
            del self.watched[key]
            self.core.location.remove(watched.binding.aor, watched.binding.contact,
                                      reason="expired")


def _domain_name(text: str) -> str:
    name = text.strip().strip(".").lower()
    if not name or not all(label and len(label) <= 63 and label.replace("-", "").isalnum()
                            for label in name.split(".")):
        raise ValueError(f"must be a domain name, got {text!r}")
    return name


@dataclass(frozen=True, slots=True)
class NatSettings:
    """``[nat]``: which addresses are private, and how NATed phones are kept reachable."""

    inside_networks: tuple[str, ...] = setting(
        DEFAULT_INSIDE, parse=network, allow_empty=False,
        doc="Networks whose addresses are private: Contacts in them are hidden or NATed.")
    external_address: str | None = setting(
        None, parse=ip_address,
        doc="The address the outside listeners' traffic appears from when this host is"
            " itself behind a NAT.")
    mapping_ttl: float = setting(
        7200.0, min=60.0, doc="Seconds a call's Contact mapping lives after its last use.")
    keepalive_interval: float = setting(
        30.0, min=0.0, doc="Seconds between keepalives to NATed phones (0: none).")
    keepalive_failures: int = setting(
        3, min=1, max=100, doc="Keepalives missed in a row that remove a phone's binding.")
    keepalive_method: str = setting(
        "OPTIONS", choices=("OPTIONS", "NOTIFY"), doc="The keepalive request's method.")
    max_mappings: int = setting(
        DEFAULT_MAX_MAPPINGS, min=1, max=10_000_000,
        doc="Contact mappings (and hidden Call-IDs) kept at most.")
    hide_topology: bool | None = setting(
        None, doc="No inside address or name in any header or body that leaves on the outside"
                  " (default: on in firewall mode, with inside and outside listeners).")
    inside_domains: tuple[str, ...] = setting(
        (), parse=_domain_name,
        doc="Host names at or under these domains are inside ones: hide_topology hides them"
            " too.")
    strip_user_agent: bool = setting(
        False, doc="hide_topology also removes User-Agent and Server from what leaves.")


@implementer(IPluginFactory)
class NatFactory:
    """Builds the ``nat`` plugin from ``[nat]``."""

    name = "nat"
    settings = NatSettings

    def build(self, core: IProxyCore, section: Section) -> NatPlugin:
        s = read_section(NatSettings, section)
        return NatPlugin(
            core,
            s.inside_networks,
            s.external_address,
            mapping_ttl=s.mapping_ttl,
            keepalive_interval=s.keepalive_interval,
            keepalive_failures=s.keepalive_failures,
            keepalive_method=s.keepalive_method,
            max_mappings=s.max_mappings,
            hide_topology=s.hide_topology,
            inside_domains=s.inside_domains,
            strip_user_agent=s.strip_user_agent,
        )


factory = NatFactory()
