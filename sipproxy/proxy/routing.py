"""Routing (RFC 3261 16.4, 16.5, 16.6 step 6): Route preprocessing, the target set of a
request to a local user (location service, forking limits), the next hop and its DNS
resolution into :class:`~sipproxy.context.Target` s (RFC 3263)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sipproxy.errors import ParseError
from sipproxy.uri import URI, parse_name_addr, parse_uri, split_header_values

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from sipproxy.config import Config
    from sipproxy.context import Target
    from sipproxy.dns import SipResolver
    from sipproxy.location import Binding, LocationService
    from sipproxy.message import Request
    from sipproxy.proxy.addresses import OwnAddresses
    from sipproxy.refusals import RefusalLog
    from sipproxy.registrar import Registrar

__all__ = [
    "DEFAULT_MAX_BREADTH",
    "LocalRoute",
    "Router",
    "first_list_value",
    "max_breadth",
    "next_hop",
    "preprocess_routes",
]

#: RFC 5393 section 4.3: the breadth of a request without Max-Breadth
DEFAULT_MAX_BREADTH = 60


def max_breadth(request: Request) -> int:
    """The request's Max-Breadth (RFC 5393), the default when absent or malformed."""
    value = (request.headers.get("max-breadth") or "").strip()
    return int(value) if value.isdigit() and len(value) < 10 else DEFAULT_MAX_BREADTH


def first_list_value(value: str) -> str:
    """The first value of a comma-separated header value."""
    return split_header_values(value)[0]


def preprocess_routes(request: Request, is_own_uri: Callable[[URI], bool]) -> None:
    """
    RFC 3261 16.4 on ``request``: undo a strict router's rewrite (our Record-Route in the
    Request-URI: the last Route entry is the real one), and remove the Route entries at the
    top that name us (``is_own_uri``).
    """
    if is_own_uri(request.uri) and request.headers.get("route") is not None and (
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
            first = parse_name_addr(first_list_value(value))
        except ParseError:
            break
        if not is_own_uri(first.uri):
            break
        request.headers.remove_first_value("route")


def next_hop(request: Request, is_own_uri: Callable[[URI], bool]) -> tuple[URI, bool]:
    """
    Where the core will send ``request``, worked out without changing it: for a plugin that
    judges a request in ``request_received``, before the core routes it (the ``acl`` plugin).

    :param is_own_uri: the core's :meth:`~sipproxy.interfaces.IProxyCore.is_own_uri`.
    :returns: the first Route entry once the proxy's own are removed and a strict router's
        rewrite is undone (:func:`preprocess_routes`), and ``True``; or, with no Route left,
        the Request-URI and ``False``.
    :raises ParseError: the Route entry the request would go to does not parse.
    """
    routed = request.copy()
    preprocess_routes(routed, is_own_uri)
    route = routed.headers.get("route")
    if route is None:
        return routed.uri, False
    return parse_name_addr(first_list_value(route)).uri, True


@dataclass
class LocalRoute:
    """Where a request to a local user forks to: one entry per binding kept."""

    targets: list[URI]
    #: each binding's Path (RFC 3327), put in front as Route
    paths: list[tuple[str, ...]]
    bindings: list[Binding]
    #: the Max-Breadth each branch gets (RFC 5393 section 4.3), None to leave it alone
    breadth: int | None


class Router:
    """Decides where a request goes; answers nothing and sends nothing itself."""

    def __init__(
        self, config: Config, addresses: OwnAddresses, location: LocationService,
        registrar: Registrar, resolver: SipResolver, refusals: RefusalLog,
    ) -> None:
        self.config = config
        self.addresses = addresses
        self.location = location
        self.registrar = registrar
        self.resolver = resolver
        self.refusals = refusals

    def preprocess_routes(self, request: Request) -> None:
        """16.4: undo a strict router's rewrite, and remove the Route entries that name us."""
        preprocess_routes(request, self.addresses.is_own_uri)

    def registrar_aor(self, uri: URI) -> str:
        """The location service key of a Request-URI the proxy routes itself."""
        return self.registrar.aor(uri)

    def local_route(self, request: Request) -> LocalRoute | tuple[int, str]:
        """The bindings a request to a local user forks to, or the status and reason to
        answer with (404: none, 480: none usable, 440: Max-Breadth exhausted)."""
        bindings = self.location.lookup(self.registrar_aor(request.uri))
        if not bindings:
            return 404, "Not Found"
        limit = self.config.proxy.max_branches
        if len(bindings) > limit:
            self.refusals.refused(
                "branches", bindings[0].aor, "{refused_source} has {n} bindings: forking "
                "{request} to the {limit} with the highest q", n=len(bindings),
                request=repr(request), limit=limit, call_id=request.call_id,
                source=request.source)
            bindings = bindings[:limit]
        targets: list[URI] = []
        routes: list[tuple[str, ...]] = []
        kept = []
        for binding in bindings:
            try:
                target = parse_uri(binding.contact)
            except ParseError:
                continue
            if self.addresses.is_local_uri(target) and not binding.path:
                # it would come back here and fork into the bindings again, each of them
                # again (RFC 5393's amplification): a Contact that names this proxy is skipped
                self.refusals.refused(
                    "self_contact", binding.aor, "{refused_source}: skipped the binding "
                    "{contact}: it names this proxy", contact=binding.contact,
                    call_id=request.call_id, source=request.source)
                continue
            targets.append(target)
            routes.append(binding.path)
            kept.append(binding)
        if not targets:
            return 480, "Temporarily Unavailable"
        breadth = max_breadth(request)
        if len(targets) > 1 or request.headers.get("max-breadth") is not None:
            # RFC 5393: the parallel branches share the request's breadth, so a fork that
            # comes back here (a Contact naming this proxy) cannot grow exponentially
            if breadth < 1:
                return 440, "Max-Breadth Exceeded"
            del targets[breadth:], routes[breadth:], kept[breadth:]
            share: int | None = breadth // len(targets)
        else:
            share = None
        return LocalRoute(targets, routes, kept, share)

    def ack_binding(self, uri: URI) -> Binding | None:
        """The binding an ACK for a 2xx to local user ``uri`` goes to, as an INVITE would:
        the first that does not name this proxy (None: no such binding)."""
        for binding in self.location.lookup(self.registrar_aor(uri)):
            contact = parse_uri(binding.contact)
            if binding.path or not self.addresses.is_local_uri(contact):
                return binding
        return None

    def next_hop_uri(self, request: Request) -> URI:
        """The URI the request is sent toward: its first Route, else its Request-URI. A
        strict router's Route is swapped into the Request-URI (RFC 3261 16.6 step 6)."""
        route = request.headers.get("route")
        if route is not None:
            first = parse_name_addr(first_list_value(route))
            if first.uri.loose_route:
                return first.uri
            # strict router (RFC 3261 16.6 step 6): it gets the Request-URI slot
            request.headers.remove_first_value("route")
            request.headers.add("Route", f"<{request.uri}>")
            request.uri = first.uri
            return first.uri
        return request.uri

    def resolve(self, uri: URI) -> Deferred[list[Target]]:
        """The targets for ``uri`` in the order to try them (RFC 3263); a non-SIP URI raises
        :class:`~sipproxy.errors.ParseError` (416)."""
        host, server_name = self._lookup_names(uri)
        return self.resolver.resolve(host, uri.port, uri.transport, uri.secure,
                                     server_name=server_name)

    def resolve_now(self, uri: URI) -> list[Target] | None:
        """What :meth:`resolve` fires with, when that needs no DNS lookup (an IP literal);
        ``None`` when it does."""
        host, server_name = self._lookup_names(uri)
        return self.resolver.resolve_now(host, uri.port, uri.transport, uri.secure,
                                         server_name=server_name)

    @staticmethod
    def _lookup_names(uri: URI) -> tuple[str, str | None]:
        """The host to look up for ``uri`` and the name a TLS server must prove (None: that
        host); raises :class:`~sipproxy.errors.ParseError` (416) for a non-SIP URI."""
        if not uri.is_sip:
            raise ParseError("cannot route a non-SIP URI", 416)
        maddr = uri.get_param("maddr")
        if maddr:
            # a TLS server must prove the URI's host, not the maddr (RFC 5922 section 4)
            return maddr, uri.host
        return uri.host, None
