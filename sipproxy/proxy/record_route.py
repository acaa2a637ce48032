"""Record-Route and Via rules (RFC 3261 16.6 steps 4 and 8, RFC 5923): the proxy's own Via
and Record-Route entries on a branch, and the public helpers plugins use to change them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from sipproxy.addressing import WILDCARD_ADDRESSES as WILDCARDS
from sipproxy.errors import ParseError
from sipproxy.message import Via
from sipproxy.uri import format_host, parse_name_addr

if TYPE_CHECKING:
    from sipproxy.context import Target
    from sipproxy.message import Message, Request, Response, Source
    from sipproxy.proxy.addresses import OwnAddresses
    from sipproxy.transport.manager import Listener
    from sipproxy.uri import URI

__all__ = [
    "RouteRecorder",
    "hide_lower_vias",
    "insert_record_routes",
    "loop_hash",
    "own_record_routes",
    "record_route_value",
    "remove_uri_values",
    "replace_own_record_routes",
    "restore_vias",
    "strip_own_record_route",
]


def record_route_value(host: str, port: int, transport: str) -> str:
    """The Record-Route header value naming ``host:port`` over ``transport``, e.g.
    ``<sip:192.0.2.1:5060;lr>`` (``;transport=`` only when not UDP)."""
    host = format_host(host)
    tp = "" if transport.upper() == "UDP" else f";transport={transport.lower()}"
    return f"<sip:{host}:{port}{tp};lr>"


def own_record_routes(out: Request, original: Request) -> int:
    """How many Record-Route values the proxy put on top of branch request ``out`` (the ones
    it has beyond what ``original``, the request as received, had)."""
    return max(len(out.headers.get_all("record-route"))
               - len(original.headers.get_all("record-route")), 0)


def strip_own_record_route(out: Request, original: Request) -> Request:
    """Rebuild a branch request's Record-Route as the original had it (before our entries);
    returns ``out``."""
    for _ in range(own_record_routes(out, original)):
        out.headers.remove_first_value("record-route")
    return out


def loop_hash(request: Request, top: Via | None = None) -> str:
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


def replace_own_record_routes(out: Request, original: Request, values: list[str]) -> None:
    """Replace the Record-Route values the proxy put on branch request ``out`` (see
    :func:`own_record_routes`) with ``values``, e.g. entries that say ``transport=tls``."""
    added = own_record_routes(out, original)
    rest = out.headers.get_all("record-route")[added:]
    out.headers.remove("record-route")
    for value in [*values, *rest]:
        out.headers.add("Record-Route", value)


def insert_record_routes(response: Response, values: list[str], theirs: int) -> None:
    """Put ``values`` back into a response's Record-Route just above the ``theirs`` entries
    its request arrived with (below the ones added on the way, i.e. where entries of ours
    that a plugin removed from the request stood). Nothing happens when the response has
    fewer entries than ``theirs`` or none at all."""
    current = response.headers.get_all("record-route")
    if not current:
        return
    position = len(current) - theirs
    if position < 0:
        return
    current[position:position] = values
    response.headers.remove("record-route")
    for value in current:
        response.headers.add("Record-Route", value)


def remove_uri_values(message: Message, name: str, where: Callable[[URI], bool]) -> list[str]:
    """Remove from header ``name`` (Record-Route, Route, Path: name-addr lists) the values
    whose URI satisfies ``where`` (a SIP URI only) and the ones that cannot be parsed;
    returns the removed values, in order."""
    values = message.headers.get_all(name)
    if not values:
        return []
    kept: list[str] = []
    removed: list[str] = []
    for value in values:
        try:
            uri = parse_name_addr(value).uri
        except ParseError:
            removed.append(value)
            continue
        (removed if uri.is_sip and where(uri) else kept).append(value)
    if removed:
        message.headers.remove(name)
        for value in kept:
            message.headers.add(name.title(), value)
    return removed


def hide_lower_vias(request: Request) -> None:
    """Keep only the top Via (the proxy's own) on ``request``."""
    top = request.top_via
    if top is not None:
        request.headers.set("Via", str(top))


def restore_vias(response: Response, request: Request) -> None:
    """Give a response the Vias its request arrived with (the ones ``hide_vias`` removed)."""
    response.headers.remove("via")
    for value in request.headers.get_all("via"):
        response.headers.add("Via", value)


class RouteRecorder:
    """Builds the proxy's Via and Record-Route entries for the socket a branch leaves from.

    :param addresses: what names the proxy toward a peer.
    """

    def __init__(self, addresses: OwnAddresses) -> None:
        self.addresses = addresses

    def via(self, target: Target, listener: Listener | None, branch: str) -> Via:
        """Our Via toward ``target``. Over TLS it says ``;alias`` (RFC 5923): the peer may
        send its requests back over the connection it came on."""
        host, port = self.addresses.advertised(listener, target.host, target)
        via = Via.build(target.transport, host, port, branch, rport=True)
        if target.transport.upper() == "TLS":
            via.set_param("alias", None)
        return via

    def retarget_via(self, out: Request, target: Target, host: str, port: int) -> None:
        """Make the top Via of ``out`` (ours) name ``host:port`` over ``target``'s transport."""
        via = out.top_via
        if via is None:
            return
        via = via.copy()
        via.transport = target.transport.upper()
        via.host = host
        via.port = port
        if via.transport == "TLS":
            via.set_param("alias", None)
        elif "alias" in via.params:
            via.remove_param("alias")
        out.update_top_via(via)

    def record_route(
        self, source: Source | None, out: Request, listener: Listener | None, host: str,
        port: int, target: Target,
    ) -> None:
        """Put our Record-Route on ``out``: the entry facing ``target`` (``host:port`` on
        ``listener``) and, when it differs, the one facing ``source``, where the request
        came from (double Record-Route, RFC 5658)."""
        addresses = self.addresses
        transports = addresses.transports
        transport = listener.transport if listener is not None else "UDP"
        if addresses.opens_flows and transports.flow_address(target, listener) is not None:
            transport = "TLS"  # the entry names our connection to there
        rr_out = record_route_value(host, port, transport)
        rr_in = rr_out
        if source is not None:
            in_listener = addresses.listener_of(source)
            in_host, in_port = addresses.advertised(in_listener, source.host)
            in_transport = in_listener.transport if in_listener else source.transport.upper()
            if source.transport.upper() == "TLS" and in_transport != "TLS" \
                    and addresses.opens_flows and transports.is_flow_port(source.local_port):
                # it came over a connection we opened, from a side without a TLS listener:
                # the peer reaches us over that connection only, found by its address/port
                if in_listener is None or in_listener.via_host in WILDCARDS:
                    in_host = source.local_host
                in_port, in_transport = source.local_port, "TLS"
            rr_in = record_route_value(in_host, in_port, in_transport)
        if rr_in != rr_out:
            out.headers.add("Record-Route", rr_in, first=True)
        out.headers.add("Record-Route", rr_out, first=True)
