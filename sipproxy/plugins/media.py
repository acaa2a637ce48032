"""The media relay for calls through the proxy: RTP flows through relay ports, never directly.

Every SDP body the proxy forwards in INVITE, UPDATE, PRACK and ACK requests and in their 18x
and 2xx responses goes through a media relay (:class:`~sipproxy.interfaces.IMediaRelay`), which
opens a port pair per party and stream and rewrites ``c=``, ``o=`` and the ``m=`` ports to its
own address on the side the SDP goes to. Each side of the call therefore sees only addresses it
can reach (the phones the relay's inside address, the provider its outside one), and a firewall
that forwards no RTP is no obstacle: the relay is the only path.

- Offer/answer (RFC 3264) per call: the first SDP of a party is an offer, the other party's
  next SDP the answer; so an offer in the INVITE is answered in the 18x/2xx, a late offer (an
  INVITE without SDP) in the 2xx is answered in the ACK, an offer in a reliable 18x in the
  PRACK. Re-INVITEs and UPDATEs from either party (hold with sendonly/inactive or
  ``c=0.0.0.0``, resume) are new offers on the same relay ports.
- The relay is told which side each party is on (``direction``: the listener side the SDP came
  from and the one it goes to; with every listener ``outside``, as on a public proxy, both are
  ``outside`` and the relay's symmetric latching reaches phones behind their own NAT). A party
  whose SDP names a private address other than where its SIP came from is reached where the
  SIP came from (``SIP-source-address``) until its first RTP packet is latched.
- ICE candidates are removed from SDP that goes through the relay (the relay does not do ICE;
  the endpoints fall back to the relayed addresses). SRTP passes through untouched.
- The relay's session ends (every port closed) on BYE (the dialog's end), on a failed or
  cancelled INVITE (a final response >= 300 to the initial INVITE), at shutdown, and when the
  dialog times out. When the relay ends a call itself (media silent too long, the relay lost
  it), the proxy forgets the dialog (no BYE is sent). The relay's final counters of a call
  whose dialog ended go to other plugins (``cdr``) in ``dialog.data``
  (:data:`~sipproxy.interfaces.MEDIA_STATS`).
- Errors: when the relay refuses or does not answer an offer, the request is not forwarded:
  the caller gets a 5xx with a ``Warning`` (a branch's own 503 becomes 500 "Media Relay
  Unavailable", RFC 3261 16.7 step 6); an ACK is then not forwarded. A response whose SDP the
  relay cannot take is not forwarded either (the caller of a 2xx gets a 500): no SDP ever
  passes with addresses the other side cannot reach. Unparseable SDP in a request, or one
  with more than 16 media streams (each takes relay ports): 488.
  Bodies that are not plain ``application/sdp`` (e.g. multipart) are passed unchanged.

Config (``[media]``)::

    relay = "builtin"            # the relay in this process (default), or "ng:HOST:PORT"
    port_min = 30000             # builtin: the RTP port range (RTP even, RTCP = RTP + 1)
    port_max = 40000
    inside_address = "..."       # builtin: the relay's address per side, default the first
    outside_address = "..."      #   listener of that side ("ADDR!ADVERTISED" for 1:1 NAT)
    timeout = 60                 # builtin: silent media ends the call after this many seconds
    silent_timeout = 3600        # builtin: ... on hold
    offer_timeout = 3600         # builtin: an offer never answered
    listen_ng = "127.0.0.1:2223" # builtin: also answer NG commands here (monitoring)
    kernel = "auto"              # builtin: the kernel fast path (nftables netdev ingress rules
                                 #   per latched stream; needs CAP_NET_ADMIN and nft): "auto" (on
                                 #   when it works), true, false
    kernel_table = "..."         # builtin: its nftables table (default sipproxy_relay_<pid>)
    inside_interface = "inside"  # the relay's interface names per side (an rtpengine may
    outside_interface = "outside"#   call them "internal"/"external")
    ng_timeout = 2.0             # NG relay: seconds until an unanswered command fails
    poll_interval = 10           # NG relay: how often to ask whether calls still exist
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sipproxy.addressing import WILDCARD_ADDRESSES, is_ip_literal, is_non_public
from sipproxy.context import Branch, RequestContext
from sipproxy.dialogs import Dialog
from sipproxy.interfaces import (
    DROP,
    MEDIA_STATS,
    IMediaRelay,
    IPluginFactory,
    IProxyCore,
    IStatusProvider,
)
from sipproxy.media.backends import LocalRelay, NGRelay, RelayedSdp
from sipproxy.media.metrics import relay_metrics
from sipproxy.media.ng import NGClient, NGError
from sipproxy.media.offer_answer import MAX_STREAMS
from sipproxy.media.ports import RelayInterface
from sipproxy.media.service import RelayService, makeRelayService
from sipproxy.media.settings import RelaySettings, check_port_range, parse_address_port
from sipproxy.message import Request, Response
from sipproxy.pipeline import Plugin
from sipproxy.sdp import SdpError, parse_sdp
from sipproxy.settings import Section, read_section, setting, settings_of, show

__all__ = ["MediaCall", "MediaFactory", "MediaPlugin", "MediaSettings", "factory"]

_log = Logger(namespace="sipproxy.plugins.media")

#: Requests whose SDP goes through the relay (and, but ACK, their responses').
SDP_REQUESTS = frozenset({"INVITE", "UPDATE", "PRACK", "ACK"})
SDP_RESPONSES = frozenset({"INVITE", "UPDATE", "PRACK"})
SIDES = ("inside", "outside")
_CACHE = 16


def has_sdp(message: Request | Response) -> bool:
    """A plain SDP body (Content-Type application/sdp, or none and the body looks like SDP)."""
    body = message.body
    if not body:
        return False
    ctype = message.headers.get("content-type")
    if ctype is None:
        return body.lstrip().startswith(b"v=")
    return ctype.split(";", 1)[0].strip().lower() == "application/sdp"


@dataclass(eq=False)
class MediaCall:
    """The media of one call (by Call-ID) as the plugin tracks it."""

    call_id: str
    #: the offer waiting for its answer: (offerer's tag, answerer's tag or None)
    pending: tuple[str, str | None] | None = None
    established: bool = False
    dialog: Any = None
    #: (party tag, CSeq number, original body) -> (was it an answer, relayed body): a
    #: retransmission or a fork gets the same SDP without asking the relay again
    relayed: OrderedDict[tuple[str, int, bytes], tuple[bool, bytes]] = field(
        default_factory=OrderedDict
    )

    def remember(self, key: tuple[str, int, bytes], answer: bool, body: bytes) -> None:
        self.relayed[key] = (answer, body)
        while len(self.relayed) > _CACHE:
            self.relayed.popitem(last=False)


@implementer(IStatusProvider)
class MediaPlugin(Plugin, MultiService):
    """The ``media`` plugin (see the module docstring). ``relay`` is any IMediaRelay;
    ``interface_names`` maps a listener side to the relay's interface name for it."""

    name = "media"

    def __init__(
        self,
        core: IProxyCore,
        relay: Any,
        interface_names: Mapping[str, str] | None = None,
        *,
        relay_service: RelayService | None = None,
        ng_client: NGClient | None = None,
    ) -> None:
        MultiService.__init__(self)
        self.core = core
        self.relay = relay
        self.interface_names = dict(interface_names or {s: s for s in SIDES})
        self.relay_service = relay_service
        self.ng_client = ng_client
        self.calls: dict[str, MediaCall] = {}
        #: deletes the relay has not confirmed yet (stopService waits for them)
        self._deleting: set[defer.Deferred[Any]] = set()
        if relay_service is not None:
            relay_service.setServiceParent(self)
        relay.add_end_observer(self.relay_ended)

    # -- service -------------------------------------------------------------------------------
    def startService(self) -> None:
        if self.ng_client is not None:
            self.ng_client.start()
        if isinstance(self.relay, NGRelay):
            self.relay.start()
        super().startService()

    def stopService(self) -> Any:
        # the proxy ended every dialog first: let their deletes reach the relay (an NG client
        # gives up by itself after its tries), then stop
        deleting = defer.DeferredList(list(self._deleting), consumeErrors=True)
        return deleting.addCallback(self._stop_relay)

    def _stop_relay(self, _: Any) -> Any:
        waits: list[Any] = [defer.maybeDeferred(MultiService.stopService, self)]
        if isinstance(self.relay, NGRelay):
            self.relay.stop()
        if self.ng_client is not None:
            waits.append(self.ng_client.stop())
        return defer.gatherResults(waits, consumeErrors=True)

    # -- IStatusProvider -----------------------------------------------------------------------
    def metrics(self) -> Iterable[Metric]:
        """Calls with relayed media; the built-in relay's own metrics."""
        calls = GaugeMetricFamily("sipproxy_media_calls", "Calls whose media goes through the"
                                  " relay.")
        calls.add_metric([], len(self.calls))
        yield calls
        if self.relay_service is not None:
            yield from relay_metrics(self.relay_service.engine)

    def status(self) -> Mapping[str, Any]:
        """The relay, and per call the media of each direction (built-in relay only: an NG
        relay is not asked on every page refresh)."""
        media: dict[str, list[dict[str, Any]]] = {}
        if self.relay_service is not None:
            engine = self.relay_service.engine
            now = engine.clock.seconds()
            for call_id, call in list(self.calls.items()):
                relayed = engine.calls.get(call_id)
                if relayed is not None:
                    caller = call.dialog.caller_tag if call.dialog is not None else None
                    media[call_id] = relayed.directions(caller, now)
        return {"relay": "builtin" if self.relay_service is not None else "ng",
                "calls": len(self.calls), "media": media}

    # -- state ---------------------------------------------------------------------------------
    def _call(self, call_id: str) -> MediaCall:
        call = self.calls.get(call_id)
        if call is None:
            call = self.calls[call_id] = MediaCall(call_id)
        return call

    def end(self, call_id: str, why: str) -> defer.Deferred[Any] | None:
        """Forget the call and ask the relay to close its ports."""
        call = self.calls.pop(call_id, None)
        if call is None:
            return None
        _log.debug("media: deleting {call_id} ({why})", call_id=call_id, why=why)
        d = self.relay.delete(call_id)
        d.addErrback(lambda f: _log.warn("media relay: delete {call_id} failed: {e}",
                                         call_id=call_id, e=f.getErrorMessage()))
        if not d.called:
            self._deleting.add(d)
            d.addBoth(self._deleted, d)
        return d

    def _deleted(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._deleting.discard(d)
        return result

    def relay_ended(self, call_id: str, reason: str) -> None:
        """The relay ended the call on its own: the SIP side forgets it too."""
        call = self.calls.pop(call_id, None)
        if call is None:
            return
        _log.info("media relay ended call {call_id} ({reason})", call_id=call_id, reason=reason)
        dialog = call.dialog
        if dialog is not None and not dialog.ended:
            self.core.dialogs.end(dialog, "timeout")

    # -- the relay -----------------------------------------------------------------------------
    def _side(self, side: str | None) -> str:
        name = side if side in SIDES else "outside"
        return self.interface_names.get(name, name)

    def _options(self, sdp_body: bytes, source_host: str | None) -> dict[str, Any]:
        options: dict[str, Any] = {"replace": ["origin", "session-connection"], "ICE": "remove"}
        if source_host and is_ip_literal(source_host.strip("[]")):
            host = source_host.strip("[]")
            options["received-from"] = ["IP6" if ":" in host else "IP4", host]
            if self._behind_nat(sdp_body, host):
                options["flags"] = ["SIP-source-address"]
        return options

    @staticmethod
    def _behind_nat(sdp_body: bytes, source_host: str) -> bool:
        """The SDP names a private address, not the one the SIP came from."""
        try:
            sdp = parse_sdp(sdp_body)
        except SdpError:
            return False
        addresses = {m.effective_connection.address for m in sdp.media
                     if m.effective_connection is not None and not m.effective_connection.is_hold}
        return any(a != source_host and is_non_public(a) for a in addresses)

    def relay_sdp(
        self,
        call: MediaCall,
        message: Request | Response,
        party: str,
        peer: str | None,
        party_side: str | None,
        peer_side: str | None,
        source_host: str | None,
        final: bool,
    ) -> defer.Deferred[bytes]:
        """Offer or answer ``message``'s SDP from ``party``; Deferred of the body to forward.
        ``final``: a 2xx, ACK or PRACK (an answer there completes the exchange)."""
        body = message.body
        key = (party, message.cseq.number, body)
        cached = call.relayed.get(key)
        if cached is not None:
            was_answer, out = cached
            if was_answer and final:
                call.pending = None
            return defer.succeed(out)
        options = self._options(body, source_host)
        pending = call.pending
        d: defer.Deferred[RelayedSdp]
        answer = pending is not None and pending[0] != party
        if answer:
            assert pending is not None
            d = self.relay.answer(call.call_id, pending[0], party, body, options)
        else:
            options["direction"] = [self._side(party_side), self._side(peer_side)]
            d = self.relay.offer(call.call_id, party, body, to_tag=peer or None,
                                 options=options)

        def relayed(result: RelayedSdp) -> bytes:
            if result.warning:
                _log.info("media relay: {warning}", warning=result.warning)
            if answer:
                if final:
                    call.pending = None
            else:
                call.pending = (party, peer)
            call.remember(key, answer, result.sdp)
            return result.sdp

        return d.addCallback(relayed)

    # -- requests ------------------------------------------------------------------------------
    def request_forwarding(self, ctx: RequestContext, branch: Branch) -> Any:
        out: Request = branch.request
        if out.method not in SDP_REQUESTS or not has_sdp(out):
            return None
        request: Request = ctx.request
        try:
            streams = len(parse_sdp(out.body).media)
            if streams > MAX_STREAMS:  # each takes relay ports: a flood of them takes them all
                raise SdpError(f"{streams} media streams, at most {MAX_STREAMS}")
        except SdpError as e:
            if out.method == "ACK":
                return request.make_response(488)  # an ACK: "do not forward"
            return self._refuse(request, 488, "Not Acceptable Here", f"bad SDP: {e}")
        source = request.source
        party_side = source.side if source is not None else None
        peer_side = branch.listener.side if branch.listener is not None else None
        party = request.from_.tag or ""
        peer = request.to.tag
        call = self._call(request.call_id)
        d = self.relay_sdp(call, out, party, peer, party_side, peer_side,
                           source.host if source is not None else None,
                           final=out.method in ("ACK", "PRACK"))

        def done(body: bytes) -> None:
            out.body = body
            return None

        def failed(failure: Failure) -> Response:
            reason = failure.getErrorMessage()
            _log.warn("media relay refused {method} of {call_id}: {reason}",
                      method=out.method, call_id=request.call_id, reason=reason)
            if not failure.check(NGError):
                _log.failure("media plugin", failure)
            if not call.established and out.method == "INVITE" and not request.to.tag:
                self.end(request.call_id, "relay error")
            return self._refuse(request, 503, "Media Relay Unavailable",
                                f"media relay: {reason}")

        return d.addCallbacks(done, failed)

    def _refuse(self, request: Request, status: int, reason: str, warning: str) -> Response:
        response = request.make_response(status, reason)
        text = warning.replace("\\", "").replace('"', "'")[:200]
        response.headers.add("Warning", f'399 sipproxy "{text}"')
        return response

    # -- responses -----------------------------------------------------------------------------
    def response_forwarding(self, ctx: RequestContext, response: Response) -> Any:
        method = response.cseq.method
        if method not in SDP_RESPONSES:
            return None
        request: Request = ctx.request
        status = response.status
        call_id = request.call_id  # the response's, unless the nat plugin mapped it already
        call = self.calls.get(call_id)
        if status >= 300:
            if call is not None:
                call.pending = None  # the offer was rejected
                if method == "INVITE" and not request.to.tag and not call.established:
                    self.end(call_id, f"INVITE failed with {status}")
            return None
        if response.source is None or not has_sdp(response):
            if call is not None and method == "INVITE" and 200 <= status < 300:
                self._established(call, ctx)
            return None
        if call is None:
            call = self._call(call_id)
        if method == "INVITE" and 200 <= status < 300:
            self._established(call, ctx)
        source = response.source
        party = response.to.tag or ""
        peer = request.from_.tag
        d = self.relay_sdp(call, response, party, peer, source.side,
                           request.source.side if request.source is not None else None,
                           source.host, final=200 <= status < 300)

        def done(body: bytes) -> None:
            response.body = body
            return None

        def failed(failure: Failure) -> Any:
            _log.warn("media relay refused the SDP of {status} to {method} of {call_id}: "
                      "{reason}; not forwarded", status=status, method=method,
                      call_id=call_id, reason=failure.getErrorMessage())
            if not failure.check(NGError):
                _log.failure("media plugin", failure)
            return DROP

        d.addCallbacks(done, failed)
        return d

    @staticmethod
    def _established(call: MediaCall, ctx: Any) -> None:
        call.established = True
        if call.dialog is None and ctx.dialog is not None:
            call.dialog = ctx.dialog
            ctx.dialog.data["media"] = call

    # -- dialogs -------------------------------------------------------------------------------
    def dialog_established(self, dialog: Dialog) -> None:
        call = self.calls.get(dialog.call_id)
        if call is not None:
            call.established = True
            call.dialog = dialog
            dialog.data["media"] = call

    def dialog_ended(self, dialog: Dialog, reason: str) -> None:
        deleted = self.end(dialog.call_id, f"dialog ended: {reason}")
        if deleted is not None:
            # the call's final counters, for other plugins (cdr): a Deferred of their own
            stats: defer.Deferred[dict[str, Any]] = defer.Deferred()
            deleted.addBoth(_hand_over, stats)
            dialog.data[MEDIA_STATS] = stats


def _hand_over(result: Any, stats: defer.Deferred[dict[str, Any]]) -> Any:
    """Fire ``stats`` with the relay's final statistics (``{}`` when it had none)."""
    stats.callback(result if isinstance(result, dict) else {})
    return result


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _relay(text: str) -> str:
    if text == "builtin":
        return text
    if not text.startswith("ng:"):
        raise ValueError(f'must be "builtin" or "ng:ADDRESS:PORT", got {show(text)}')
    address = parse_address_port(text[3:])
    if address is None or address[1] == 0:
        raise ValueError(f"must be ADDRESS:PORT with an IP address, got {show(text[3:])}")
    return text


def _relay_address(text: str) -> str:
    try:
        RelayInterface.parse(f"side/{text}")
    except ValueError as e:
        raise ValueError(f"must be ADDRESS or ADDRESS!ADVERTISED ({e})") from None
    return text


def _interface_name(text: str) -> str:
    if any(c in text for c in " /!"):
        raise ValueError(f"must be a relay interface name, got {show(text)}")
    return text


@dataclass(frozen=True, slots=True)
class MediaSettings(RelaySettings):
    """``[media]``: which relay; for the builtin one, its settings (the keys of
    :class:`~sipproxy.media.settings.RelaySettings`, ``twistd sipproxy-relay``'s options) and
    its address per side; for an NG relay, how it is spoken to."""

    relay: str = setting(
        "builtin", parse=_relay,
        doc='"builtin": the relay in this process; "ng:ADDRESS:PORT": a relay spoken to over'
            " rtpengine's NG protocol.")
    inside_address: str | None = setting(
        None, parse=_relay_address,
        doc="builtin: the relay's address on the inside, ADDRESS or ADDRESS!ADVERTISED"
            " (default: the first inside listener's).")
    outside_address: str | None = setting(
        None, parse=_relay_address,
        doc="builtin: the relay's address on the outside (default: the first outside"
            " listener's).")
    inside_interface: str = setting(
        "inside", parse=_interface_name, doc="The relay's name for the inside in NG offers.")
    outside_interface: str = setting(
        "outside", parse=_interface_name, doc="The relay's name for the outside in NG offers.")
    ng_timeout: float = setting(
        2.0, min=0.1, max=60.0, doc="NG relay: seconds until an unanswered command fails.")
    poll_interval: float = setting(
        10.0, min=1.0, doc="NG relay: seconds between asking whether its calls still exist.")


#: the keys only the builtin relay takes
_BUILTIN_KEYS: Final = (*settings_of(RelaySettings), "inside_address", "outside_address")


def _default_interface(core: IProxyCore, side: str) -> RelayInterface | None:
    for listener in core.listeners:
        if listener.side != side or listener.address in WILDCARD_ADDRESSES:
            continue
        advertised = listener.via_host
        if advertised == listener.address or not is_ip_literal(advertised.strip("[]")):
            return RelayInterface(side, listener.address)
        return RelayInterface(side, listener.address, advertised.strip("[]"))
    return None


@implementer(IPluginFactory)
class MediaFactory:
    """Builds the ``media`` plugin from ``[media]``."""

    name = "media"
    settings = MediaSettings

    def build(self, core: IProxyCore, section: Section) -> MediaPlugin:
        s = read_section(MediaSettings, section)
        names = {"inside": s.inside_interface, "outside": s.outside_interface}
        if s.relay == "builtin":
            return self._builtin(core, s, section, names)
        for key in _BUILTIN_KEYS:
            if key in section:
                raise section.error(key, "only for relay = \"builtin\" (an NG relay has "
                                         "its own settings)")
        address = parse_address_port(s.relay[3:])
        assert address is not None  # (checked by _relay)
        tries = 4
        client = NGClient(core.reactor, *address, clock=core.clock,
                          interval=s.ng_timeout / tries, tries=tries)
        relay = NGRelay(client, clock=core.clock, poll_interval=s.poll_interval)
        return MediaPlugin(core, relay, names, ng_client=client)

    def _builtin(self, core: IProxyCore, s: MediaSettings, section: Section,
                 names: dict[str, str]) -> MediaPlugin:
        for key in ("ng_timeout", "poll_interval"):
            if key in section:
                raise section.error(key, 'only for relay = "ng:ADDRESS:PORT"')
        sides = [side for side in SIDES if any(lst.side == side for lst in core.listeners)]
        interfaces: list[RelayInterface] = []
        for side in sides or ["outside"]:
            key = f"{side}_address"
            text = getattr(s, key)
            if text is not None:
                interfaces.append(RelayInterface.parse(f"{names[side]}/{text}"))
                continue
            found = _default_interface(core, side)
            if found is None:
                raise section.error(key, f"required: the {side} listeners listen on every "
                                         "address; give the relay's address on that side")
            interfaces.append(RelayInterface(names[side], found.address, found.advertised))
        for side in SIDES:
            if side not in sides and f"{side}_address" in section:
                raise section.error(f"{side}_address", f"no listener has side = \"{side}\"")
        check_port_range(s, section)
        config = replace(s, interfaces=tuple(interfaces))
        service = makeRelayService(config, reactor=core.reactor, clock=core.clock)
        relay: IMediaRelay = LocalRelay(service.engine)
        return MediaPlugin(core, relay, names, relay_service=service)


factory = MediaFactory()
