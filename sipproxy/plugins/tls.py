"""TLS to the provider (and from phones): which requests go over TLS, and how it is verified.

The transport layer knows how to speak TLS (``sipproxy.transport.tls``); this plugin owns the
policy, through nothing but the plugin API:

- Certificates: ``[tls]`` gives the CA bundle (``ca``; default: the system's trust store), an
  optional client certificate and key, ``verify`` (default true; false is logged as a warning at
  start-up) and ``minimum_version`` ("1.2" or "1.3"). The name checked (service_identity, also
  sent as SNI) is the host of the URI the request is routed by: the Request-URI, the Route, or
  ``[upstream] uri`` (RFC 5922 section 4), also when its ``maddr`` says where to connect
  (``sips:provider.example;maddr=192.0.2.10`` checks ``provider.example``).
- Which requests go over TLS: a ``sips:`` target, ``;transport=tls``, an ``[upstream]`` URI
  that says either, or an RFC 3263 answer choosing ``SIPS+D2T`` / ``_sips._tcp`` (the resolver
  makes these TLS targets); and every in-dialog request whose next hop is on the TLS side of the
  proxy's Record-Route (the proxy's own Record-Route entry facing it says ``transport=tls``),
  checked for the name verified when the dialog was set up (also for a call the provider
  places over the proxy's own connection to it: the name that connection was verified for).
  An own Route entry saying ``transport=tls`` counts only toward the side of the listener it
  names (the nat plugin leaves the outside just the entry facing it).
- Record-Route and Via: the proxy's Via says TLS on the TLS side; its Record-Route entry facing
  the TLS side says ``transport=tls`` and the one facing the other side UDP/TCP (two entries,
  RFC 5658), so in-dialog requests cross the transport change in both directions.
- Failure: a connection whose certificate does not verify fails, never falls back to clear text;
  the log has one line (``TLS to provider.test:5061 (192.0.2.10) failed: certificate verify
  failed: certificate has expired``) and the caller gets ``503`` with that text in a
  ``Warning: 399`` header (RFC 3261 16.7 lets a proxy pass on a 503 when every later request
  would fail the same way, as it will with a certificate that does not verify).
- Keepalive: outgoing TLS connections are pinged with CRLFCRLF after ``keepalive_interval``
  seconds of silence (RFC 5626), and opened again (backoff up to 60 s) when lost.

SDP is never touched: SRTP (RTP/SAVP, RTP/SAVPF), ``a=crypto`` and DTLS ``a=fingerprint`` lines
pass through byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.addressing import WILDCARD_ADDRESSES
from sipproxy.context import Branch, RequestContext, Target
from sipproxy.errors import ParseError
from sipproxy.interfaces import IPluginFactory, IProxyCore
from sipproxy.message import Request, Response
from sipproxy.pipeline import Plugin
from sipproxy.proxy.record_route import (
    own_record_routes,
    record_route_value,
    replace_own_record_routes,
)
from sipproxy.proxy.routing import next_hop
from sipproxy.settings import Section, read_section, setting
from sipproxy.transport.certificates import load_certificate_pair
from sipproxy.transport.tls import (
    TLS_VERSIONS,
    ServerCertificate,
    TLSClientPolicy,
    TLSConnectError,
    client_creator_factory,
    load_certificates,
)
from sipproxy.uri import URI, format_host, parse_name_addr, split_header_values

__all__ = ["TLSPlugin", "TLSSettings", "factory"]

_log = Logger(namespace="sipproxy.plugins.tls")

_FAILURE_MEMORY = 60.0  # seconds a connection failure explains a 503 of ours
_DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})


def _says_tls(uri: URI) -> bool:
    return uri.secure or (uri.transport or "").lower() == "tls"


class TLSPlugin(Plugin, Service):
    """The ``tls`` plugin (see the module docstring)."""

    name = "tls"

    def __init__(self, core: IProxyCore, policy: TLSClientPolicy, *, verify: bool = True
                 ) -> None:
        self.core = core
        self.verify = verify
        self.policy = TLSClientPolicy(
            policy.creator, policy.keepalive_interval, policy.pong_timeout, policy.reconnect,
            policy.max_backoff, policy.server_minimum, self._connection_failed,
        )
        self._failures: dict[tuple[str, int, str], tuple[str, float]] = {}
        # the name each provider address was verified for (answers came over that connection)
        self._verified: dict[tuple[str, int], str] = {}
        core.use_tls_client(self.policy)

    def startService(self) -> None:
        super().startService()
        if not self.verify:
            _log.warn("[tls] verify = false: provider certificates are NOT checked; anyone on "
                      "the path can pose as the provider")

    # -- failures --------------------------------------------------------------------------------
    def _connection_failed(self, error: TLSConnectError) -> None:
        now = self.core.clock.seconds()
        if len(self._failures) >= 1000:
            self._failures = {k: v for k, v in self._failures.items()
                              if now - v[1] < _FAILURE_MEMORY}
        key = (error.host, error.port, error.server_name.lower())
        self._failures[key] = (str(error), now)

    def _failure_for(self, target: Target) -> str | None:
        found = self._failures.get((target.host, target.port,
                                    (target.server_name or target.host).lower()))
        if found is None or self.core.clock.seconds() - found[1] > _FAILURE_MEMORY:
            return None
        return found[0]

    # -- requests --------------------------------------------------------------------------------
    def request_received(self, ctx: RequestContext) -> Any:
        """Note whether the proxy's own Route entry facing the next hop says TLS (the core
        removes those entries after this hook)."""
        last_own: URI | None = None
        for value in ctx.request.headers.get_all("route"):
            for part in split_header_values(value):
                try:
                    uri = parse_name_addr(part).uri
                except ParseError:
                    break
                if not self._is_own(uri):
                    break
                last_own = uri
            else:
                continue
            break
        request: Request = ctx.request
        source = request.source
        if source is not None and source.transport.upper() == "TLS" and \
                request.method in _DIALOG_CREATING and not request.to.tag:
            # a provider's call over our own connection to it: in-dialog requests toward it
            # are checked for the name that connection was verified for, not its address
            name = self._verified.get((source.host, source.port))
            if name is not None:
                ctx.data["tls_peer"] = (source.host, source.port, name)
        if last_own is not None and _says_tls(last_own):
            # the side of the listener it names: it speaks for the next hop only if that is
            # on this side (the nat plugin leaves the outside just the entry facing it)
            listener = self._own_listener(last_own)
            if listener is not None:
                ctx.data["tls_next_hop"] = listener.side
            elif source is None or source.transport.upper() != "TLS" or \
                    source.local_port != last_own.port:
                # it names a connection we opened, and the request did not come over it:
                # the next hop is that connection's peer
                ctx.data["tls_next_hop"] = ""
        return None

    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> Any:
        target: Target | None = branch.target
        if target is None:
            return None
        out: Request = branch.request
        new = target
        facing = ctx.data.get("tls_next_hop")
        out_side = branch.listener.side if branch.listener is not None else ""
        if facing is not None and (not facing or not out_side or facing == out_side) and \
                new.transport.upper() != "TLS":
            port = self._next_hop_port(out)
            new = Target("TLS", new.host, port, new.server_name or new.host)
        dialog = ctx.dialog
        peer = dialog.data.get("tls_peer") if dialog is not None else None
        if peer is not None and new.transport.upper() == "TLS" and \
                (new.host, new.port) == (peer[0], peer[1]) and new.server_name != peer[2]:
            # the dialog's provider was verified by name; its Contact often is an address
            new = Target("TLS", new.host, new.port, peer[2])
        if new != target:
            self.core.retarget(ctx, branch, new)
        self._fix_record_route(ctx, branch)
        return None

    def _next_hop_port(self, out: Request) -> int:
        """Where the hop ``out`` is sent toward listens for TLS: the port of its first Route,
        else of its Request-URI (:func:`~sipproxy.proxy.routing.next_hop`, as the ``acl``
        plugin finds it), 5061 when that URI names none or the Route does not parse."""
        try:
            hop, _routed = next_hop(out, self.core.is_own_uri)
        except ParseError:
            return 5061
        return hop.port if hop.port is not None else 5061

    def _fix_record_route(self, ctx: Any, branch: Any) -> None:
        """Our Record-Route entry facing a TLS hop says transport=tls, the other one not."""
        out: Request = branch.request
        request: Request = ctx.request
        if out.method not in _DIALOG_CREATING or out.to.tag:
            return
        added = own_record_routes(out, request)
        if added <= 0:
            return
        target: Target = branch.target
        source = request.source
        out_tls = target.transport.upper() == "TLS"
        in_tls = source is not None and source.transport.upper() == "TLS"
        if not out_tls and not in_tls:
            return
        ours = out.headers.get_all("record-route")[:added]
        new_out = self._tls_entry(ours[0], None) if out_tls else ours[0]
        new_in = self._tls_entry(ours[-1], source) if in_tls else ours[-1]
        if not out_tls and len(ours) == 1:
            new_out = ours[0]
        if not in_tls and len(ours) == 1:
            new_in = ours[0]
        new = [new_out] if new_out == new_in else [new_out, new_in]
        if new != ours:
            replace_own_record_routes(out, request, new)

    def _tls_entry(self, value: str, source: Any) -> str:
        """A Record-Route entry of ours as it must read on a TLS side: ``transport=tls``;
        for the side a request came from, the port of one of our sockets on that side (a
        request over our own outgoing connection arrives on no listener's port)."""
        try:
            uri = parse_name_addr(value).uri
        except ParseError:
            return value
        host = uri.host
        port = uri.port or 5060
        if source is not None and port != source.local_port and \
                not any(lst.port == source.local_port and
                        lst.transport == source.transport.upper()
                        for lst in self.core.listeners):
            # (the core named the kernel's address toward the peer there, and port 5060)
            listener = self._side_listener(source.side)
            if listener is not None:
                port = listener.port
                if listener.via_host not in WILDCARD_ADDRESSES:
                    host = listener.via_host
        return record_route_value(host, port, "TLS")

    def _side_listener(self, side: str) -> Any:
        for transport in ("TLS", "TCP", "UDP"):
            for lst in self.core.listeners:
                if lst.side == side and lst.transport == transport:
                    return lst
        return None

    def _is_own(self, uri: URI) -> bool:
        # (also an entry naming a connection we opened: no listener has its port)
        return self._own_listener(uri) is not None or self.core.is_own_uri(uri)

    def _own_listener(self, uri: URI) -> Any:
        """The listener an own Route/Record-Route URI names, None if it is not ours."""
        if not uri.is_sip:
            return None
        port = uri.port if uri.port is not None else (5061 if _says_tls(uri) else 5060)
        host = uri.host.lower()
        for lst in self.core.listeners:
            if lst.port != port:
                continue
            if host in (lst.via_host.lower(), lst.address):
                return lst
            if lst.address in WILDCARD_ADDRESSES and self.core.is_local_domain(host):
                return lst
        return None

    # -- responses -------------------------------------------------------------------------------
    def response_received(self, ctx: RequestContext, branch: Branch, response: Response) -> Any:
        target: Target | None = branch.target
        if target is None or target.transport.upper() != "TLS":
            return None
        status = response.status
        if response.source is not None and target.server_name:
            if len(self._verified) >= 1000:
                self._verified.clear()
            self._verified[(target.host, target.port)] = target.server_name
        if 200 <= status < 300 and ctx.request.method == "INVITE" and not ctx.request.to.tag:
            ctx.data["tls_peer"] = (target.host, target.port, target.server_name)
        elif status == 503 and response.source is None:
            failure = self._failure_for(target)
            if failure is not None:
                ctx.data["tls_failure"] = failure
        return None

    def response_forwarding(self, ctx: RequestContext, response: Response) -> Any:
        peer = ctx.data.get("tls_peer")
        if peer is not None and ctx.dialog is not None and 200 <= response.status < 300:
            ctx.dialog.data.setdefault("tls_peer", peer)
        failure = ctx.data.get("tls_failure")
        if failure is not None and response.source is None and response.status >= 500:
            # the core turns our own 503 into a 500 (RFC 3261 16.7 step 6); a certificate that
            # does not verify fails every request alike, so the caller gets the 503 and why
            response.set_status(503, "Service Unavailable")
            text = failure.replace("\\", "\\\\").replace('"', '\\"')
            response.headers.add("Warning", f'399 {self._agent(ctx)} "{text}"')
        return None

    def _agent(self, ctx: Any) -> str:
        source = ctx.request.source
        for lst in self.core.listeners:
            if source is not None and lst.side == source.side and \
                    lst.via_host not in WILDCARD_ADDRESSES:
                return format_host(lst.via_host)
        return "sipproxy"


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """``[tls]``: how the provider's certificate is checked, and the client side of TLS."""

    ca: str | None = setting(
        None, doc="CA bundle (PEM) that signs the provider's certificate; default: the"
                  " system's trust store.")
    certificate: str | None = setting(
        None, doc="A client certificate (PEM), for providers that require one (with key).")
    key: str | None = setting(None, doc="The client certificate's private key (PEM).")
    verify: bool = setting(
        True, doc="Check the provider's certificate (name, expiry, CA); false is for tests.")
    minimum_version: str = setting(
        "1.2", choices=tuple(TLS_VERSIONS), doc="Lowest TLS version, also for listeners.")
    keepalive_interval: float = setting(
        30.0, min=0.0, doc="Seconds of silence before a CRLF keepalive ping (0: none).")
    keepalive_timeout: float = setting(
        10.0, min=0.0, min_exclusive=True,
        doc="Seconds an unanswered ping may take before the connection is closed.")
    reconnect: bool = setting(True, doc="Open a lost connection to the provider again.")


@implementer(IPluginFactory)
class TLSFactory:
    """Builds the ``tls`` plugin from ``[tls]``: the certificates are loaded here, so a bad
    file is a config error naming its key."""

    name = "tls"
    settings = TLSSettings

    def build(self, core: IProxyCore, section: Section) -> TLSPlugin:
        s = read_section(TLSSettings, section)
        ca = None
        if s.ca is not None:
            try:
                ca = load_certificates(s.ca, "CA file")
            except ValueError as e:
                raise section.error("ca", str(e)) from None
        client: ServerCertificate | None = None
        if (s.certificate is None) != (s.key is None):
            missing = "key" if s.key is None else "certificate"
            raise section.error(missing, "is required when "
                                f"{'certificate' if missing == 'key' else 'key'} is set")
        if s.certificate is not None and s.key is not None:
            client = load_certificate_pair(section, s.certificate, s.key)
        minimum = TLS_VERSIONS[s.minimum_version]
        creator = client_creator_factory(ca_certificates=ca, client_certificate=client,
                                         minimum=minimum, verify=s.verify)
        policy = TLSClientPolicy(creator, keepalive_interval=s.keepalive_interval or None,
                                 pong_timeout=s.keepalive_timeout, reconnect=s.reconnect,
                                 server_minimum=minimum)
        return TLSPlugin(core, policy, verify=s.verify)


factory = TLSFactory()
