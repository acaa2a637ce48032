"""The extension points of sipproxy: what a plugin is, what it is given, and when it is called.

A plugin is an object providing :class:`IProxyPlugin`, built by an :class:`IPluginFactory` that
validates the plugin's own config section. The proxy calls the hooks of the enabled plugins in
the order of ``[plugins] enabled``. The built-in plugins (NAT, TLS, media, ...) use nothing but
what is documented here.

Every request hook may:

- return ``None`` to let the request go on to the next plugin (it may have changed it);
- return a :class:`~sipproxy.message.Response` (built with ``ctx.request.make_response``) to
  answer the request there and then: no later plugin runs and nothing is forwarded;
- return a ``Deferred`` that fires with either of the above, to wait for something (a database,
  a relay) without blocking the reactor.

Response hooks may return ``None`` (go on) or :data:`DROP` (the response goes no further), or a
``Deferred`` of either. An exception raised by a hook is logged; the request is answered with
500, a response is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from zope.interface import Attribute, Interface

from sipproxy.context import Branch, RequestContext, Target

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from twisted.internet.defer import Deferred

    from sipproxy.config import Config, Section
    from sipproxy.dialogs import Dialog
    from sipproxy.location import Binding
    from sipproxy.media.backends import RelayedSdp
    from sipproxy.message import Request, Response, Via
    from sipproxy.transaction import ClientTransaction
    from sipproxy.transport.tls import TLSClientPolicy
    from sipproxy.uri import URI

    #: What a request hook returns: go on (None), answer (a Response), or wait (a Deferred).
    RequestHookResult: TypeAlias = "Response | Deferred[Response | None] | None"
    #: What a response hook returns: go on (None), stop (DROP), or wait (a Deferred).
    ResponseHookResult: TypeAlias = "DropType | Deferred[DropType | None] | None"

__all__ = [
    "AUTHENTICATED_USER",
    "DROP",
    "MEDIA_STATS",
    "Branch",
    "DropType",
    "ICredentialStore",
    "IImpliedPluginFactory",
    "IMediaRelay",
    "IPluginFactory",
    "IProxyCore",
    "IProxyPlugin",
    "IStateStore",
    "IStatusProvider",
    "RequestContext",
    "SavedBan",
    "SavedToken",
    "Target",
]


class DropType:
    """The type of :data:`DROP` (one instance; compare with ``is``)."""

    def __repr__(self) -> str:
        return "DROP"


#: Returned by a response hook: forward this response no further.
DROP: Final = DropType()

#: Key in ``RequestContext.data``: the user name an authentication plugin (``auth``) verified
#: for this request, e.g. ``"alice"``; absent when nobody authenticated it. Other plugins
#: (``acl``) read it in ``request_forwarding``, after every ``request_received`` hook ran.
AUTHENTICATED_USER: Final = "authenticated_user"

#: Key in ``Dialog.data``: set by the ``media`` plugin when the dialog ends and it closes the
#: call's relay session, a ``Deferred`` of the relay's final statistics (the ``delete`` reply,
#: in the form :meth:`IMediaRelay.query` describes; ``{}`` when the relay had none). Absent
#: when the call's media was not relayed. Read it in ``dialog_ended`` or later (``cdr``).
MEDIA_STATS: Final = "media_stats"


class IProxyPlugin(Interface):
    """One stage of the pipeline. Subclass :class:`sipproxy.pipeline.Plugin` to get no-op hooks
    and override only the ones you need."""

    name = Attribute("The plugin's name, as written in [plugins] enabled.")

    def request_received(ctx: RequestContext) -> RequestHookResult:
        """A new request (``ctx.request``; ``ctx`` is a
        :class:`~sipproxy.context.RequestContext`) passed validation; routing has not happened
        yet. Also called for an ACK to a 2xx (then ``ctx.server_transaction`` is None; ACKs are
        never answered, so a returned Response only means "drop this ACK") and for in-dialog
        requests (``ctx.dialog`` is set). Setting ``ctx.destination`` (a
        :class:`~sipproxy.context.Target`) sends the request there, skipping routing."""

    def request_forwarding(ctx: RequestContext, branch: Branch) -> RequestHookResult:
        """``branch.request`` (a copy, with the new Request-URI, Record-Route and the proxy's
        Via) is about to go to ``branch.target``. Change it here (NAT rewriting, SDP for the
        media relay); each fork of a request has its own branch. ``branch.target`` may be
        changed; ``branch.hide_vias = True`` sends only the proxy's own Via (the others are put
        back into the responses by the proxy)."""

    def response_received(
        ctx: RequestContext, branch: Branch, response: Response
    ) -> ResponseHookResult:
        """``response`` to ``branch`` arrived (the proxy's Via already removed). 100 Trying is
        not passed on. Return DROP to stop it here."""

    def response_forwarding(ctx: RequestContext, response: Response) -> ResponseHookResult:
        """``response`` is about to be sent back toward the caller (for a forked request, the
        one the proxy chose). Return DROP to stop it here."""

    def dialog_established(dialog: Dialog) -> None:
        """A 2xx to an INVITE created ``dialog`` (a :class:`~sipproxy.dialogs.Dialog`): per-call
        state can hang off ``dialog.data``."""

    def dialog_ended(dialog: Dialog, reason: str) -> None:
        """``dialog`` ended: ``reason`` is "bye", "timeout" (no BYE within the maximum dialog
        lifetime) or "shutdown". Free what the call held here."""


class IPluginFactory(Interface):
    """Builds a plugin from its config section. Found by name: an entry point in the
    ``sipproxy.plugins`` group, or a ``"package.module:attribute"`` path in the config."""

    name = Attribute("The default plugin name (its config section is [name]).")

    def build(core: IProxyCore, section: Section) -> IProxyPlugin:
        """Validate ``section`` and return the plugin. Declare the section's keys once, as a
        frozen dataclass of :func:`sipproxy.settings.setting` fields, read it with
        :func:`sipproxy.settings.read_section` (a one-line ``ConfigError`` naming the key for a
        mistake; ``section.error(key, problem)`` for checks across keys) and keep the dataclass
        in the factory's ``settings`` attribute, where tools find its keys, defaults and docs.
        If the plugin also provides ``twisted.application.service.IService`` it is started and
        stopped with the proxy."""


class IImpliedPluginFactory(IPluginFactory):
    """A plugin factory whose plugin may run although ``[plugins] enabled`` does not name it
    (``acl``: a proxy with a listener facing the outside is never an open relay). Implied
    plugins run first, before the enabled ones; ``[plugins] open_relay = true`` turns them off.
    Only installed plugins (entry points) are asked."""

    def implied_by(config: Config) -> bool:
        """True when ``config`` (a :class:`sipproxy.config.Config` whose ``plugins`` are the
        enabled ones) needs this plugin."""


class IProxyCore(Interface):
    """What the proxy offers its plugins."""

    reactor = Attribute("The reactor (IReactorTime, IReactorUDP, IReactorTCP).")
    clock = Attribute("The IReactorTime every plugin timer must use.")
    config = Attribute("The whole sipproxy.config.Config.")
    location = Attribute("The sipproxy.location.LocationService (bindings of local users).")
    listeners = Attribute(
        "The sockets, each with side ('inside'/'outside'), transport, address, port, via_host."
    )
    dialogs = Attribute("The sipproxy.dialogs.DialogTracker.")
    state = Attribute(
        "The IStateStore ([registrar] store) where state that must survive a restart is kept; "
        "its ``durable`` is False for the default, in memory: then there is nothing to save."
    )
    flood = Attribute(
        "The sipproxy.flood.FloodGuard ([limits]: rate limits and the ban list; failed() is a "
        "failure budget such as wrong passwords), or None when [limits] enabled = false."
    )

    def is_local_domain(host: str) -> bool:
        """True when the proxy is registrar for ``host`` (a configured domain or own address)."""

    def is_local_uri(uri: URI) -> bool:
        """True when routing would send the Request-URI ``uri`` (a ``sipproxy.uri.URI``) to the
        location service: a URI of our domains or of one of our sockets (host *and* port;
        ``is_local_domain`` ignores the port)."""

    def is_own_uri(uri: URI) -> bool:
        """True when ``uri`` names one of our sockets (host and port): a Route entry the proxy
        removes as its own (RFC 3261 16.4)."""

    def routed_side(host: str) -> str | None:
        """The side (``"inside"``/``"outside"``) the network puts ``host`` (an IP address) on:
        the side ``[upstream] side`` names for the upstream's addresses, else the side of the
        listeners bound to the address the kernel sends from toward ``host``, i.e. the side
        whose interface routes it. ``None`` when the network does not say (a name, a loopback
        address, only wildcard listeners, a source address no listener has): then the
        caller's own rule applies (the transports': the address class). A request to ``host``
        leaves from a listener of this side (``branch.listener``)."""

    def send_request(
        request: Request, target: Target, on_response: Callable[[Response], None]
    ) -> ClientTransaction:
        """Send a request the plugin made itself (e.g. a keepalive OPTIONS) in a client
        transaction; ``request`` needs a top Via (``core.make_via(target)``)."""

    def retarget(ctx: RequestContext, branch: Branch, target: Target) -> None:
        """In request_forwarding: send ``branch`` to ``target`` instead; the proxy's Via and
        Record-Route are rebuilt for the socket facing ``target``."""

    def make_via(target: Target) -> Via:
        """A Via for a request of the proxy's own to ``target``, with a fresh branch."""

    def use_tls_client(policy: TLSClientPolicy) -> None:
        """Make outgoing TLS connections (targets whose transport is "TLS") as ``policy`` says:
        a :class:`sipproxy.transport.tls.TLSClientPolicy` (certificate checks, client
        certificate, keepalives, a callback for failures). Until a plugin calls this, a TLS
        target fails at once: the core has no TLS policy of its own (the ``tls`` plugin)."""


class IMediaRelay(Interface):
    """A media relay as the ``media`` plugin drives it: the built-in relay in this process
    (``sipproxy.media.backends.LocalRelay``) or any NG server over UDP, i.e. the built-in relay
    run by ``twistd sipproxy-relay`` or a real rtpengine (``sipproxy.media.backends.NGRelay``).

    ``options`` are further keys of rtpengine's NG protocol, as rtpengine documents them:
    ``flags`` (``trust-address``, ``SIP-source-address``, ``symmetric``, ``strict-source``...),
    ``replace`` (``origin``, ``session-connection``), ``direction`` (two interface names, e.g.
    ``["inside", "outside"]``), ``received-from`` (``["IP4", address]``), ``ICE``
    (``remove``), ``rtcp-mux`` (``["demux"]``...), ``transport-protocol``, ``via-branch``.
    Every method returns a Deferred; a refusal fails it with ``sipproxy.media.ng.NGError``
    (``.reason`` is rtpengine's ``error-reason``), no answer at all with ``NGTimeout``.
    """

    def ping() -> Deferred[None]:
        """Deferred firing with None when the relay answers."""

    def offer(
        call_id: str, from_tag: str, sdp: bytes, to_tag: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Deferred[RelayedSdp]:
        """Relay the SDP offer of the party ``from_tag``: Deferred of a ``RelayedSdp`` (the SDP
        to forward, with the relay's addresses and ports, and a warning or None)."""

    def answer(
        call_id: str, from_tag: str, to_tag: str, sdp: bytes,
        options: Mapping[str, Any] | None = None,
    ) -> Deferred[RelayedSdp]:
        """Relay the SDP answer of ``to_tag`` to the offer of ``from_tag``: Deferred of a
        ``RelayedSdp``."""

    def delete(
        call_id: str, from_tag: str | None = None, options: Mapping[str, Any] | None = None
    ) -> Deferred[dict[str, Any]]:
        """End the call's media (every port closed): Deferred of the final statistics (the
        ``query`` dict; empty when the relay no longer knew the call)."""

    def query(call_id: str) -> Deferred[dict[str, Any]]:
        """Deferred of the call's statistics, rtpengine's ``query`` reply: ``created``,
        ``last signal``, ``tags`` (per party: ``medias`` with ``streams``, each with
        ``local port``, ``endpoint`` and ``stats`` {packets, bytes, errors}) and ``totals``."""

    def add_end_observer(observer: Callable[[str, str], None]) -> None:
        """Call ``observer(call_id, reason)`` when the relay ends a call on its own: media
        silent too long ("timeout"), the relay stopped ("shutdown") or lost it ("gone")."""


class ICredentialStore(Interface):
    """Where the ``auth`` plugin finds users' Digest secrets. The built-in one reads a file
    (``sipproxy.credentials.FileCredentialStore``); a database or directory store provides this
    interface and is passed to ``sipproxy.plugins.auth.AuthPlugin``."""

    def ha1(username: str, realm: str, algorithm: str) -> str | Deferred[str | None] | None:
        """HA1 = H(username:realm:password) in hex for ``algorithm`` ("MD5" or "SHA-256"),
        or None when the user (or that algorithm's secret) is unknown; or a Deferred firing
        with either. Must not block the reactor."""


class IStatusProvider(Interface):
    """What a plugin shows on the admin listener (``[admin]``): its metrics on ``/metrics``
    and a section of its own in ``/api/status`` (and on the status page). Both are called at
    scrape or request time, on the reactor thread: read the plugin's live state there (a
    dict's length, a ``Counter``), rather than counting on the hot path, and return quickly.

    The proxy asks every enabled plugin that provides this interface; a plugin that raises is
    logged and left out of that answer (the rest of the page and metrics still work).
    """

    def metrics() -> Iterable[Metric]:
        """The plugin's metric families, built fresh on each call (``prometheus_client``'s
        ``CounterMetricFamily``, ``GaugeMetricFamily`` ...), named ``sipproxy_<plugin>_...``
        in Prometheus conventions (``_total`` for counters, units in the name)."""

    def status() -> Mapping[str, Any] | None:
        """The plugin's section of ``/api/status``: a JSON-able mapping (``None``: nothing to
        show), shown under the plugin's entry in ``plugins``. Two keys are taken out of it and
        merged into the core's lists (see :mod:`sipproxy.admin.status` for their shape):
        ``"registrations"``, a list of registrations the plugin knows of (e.g. the ``nat``
        plugin's phones registered at the provider through the proxy), and ``"media"``, a
        mapping of Call-ID to the list of per-direction media entries of that call (the
        ``media`` plugin)."""


@dataclass(frozen=True, slots=True)
class SavedToken:
    """A ``nat`` plugin registration token: ``sip:TOKEN@<proxy>`` is what the provider has on
    file as the Contact of the phone whose Contact is ``contact``, reached at ``target``."""

    token: str
    contact: str
    target: Target
    expires_at: float  # absolute, in the proxy clock's seconds (wall-clock time)


@dataclass(frozen=True, slots=True)
class SavedBan:
    """A flood guard ban: ``host`` is ignored until ``until`` (the clock's seconds)."""

    host: str
    reason: str
    until: float


class IStateStore(Interface):
    """Where the state that must survive a restart is kept (``[registrar] store``): the
    registrar's bindings, the ``nat`` plugin's registration tokens (what the provider has on
    file as a phone's Contact) and the flood guard's bans.

    Reading happens once, at start-up, before any listener opens: the store reads what it
    holds when it is opened (it may block then: the proxy opens it while it builds its
    service, before the reactor runs), and the ``saved_*`` methods return what of it is still
    valid at ``now``: expired state is never brought back. Writing happens while the proxy
    runs and never blocks the reactor: every write returns a ``Deferred`` and writes are
    applied in the order they were made. A write that fails is logged by the store and its
    ``Deferred`` fires all the same: while the proxy runs, what it holds in memory is the
    truth. The built-in stores are ``sipproxy.state.MemoryStateStore`` (the default: nothing
    survives) and ``sipproxy.sqlite_state.SqliteStateStore``; another (e.g. Redis) provides
    this interface and nothing else changes. Proxies sharing one store see each other's changes
    only at their next start: live sharing would need a way for the store to report them.
    """

    durable = Attribute(
        "False when nothing outlives the process (the memory store): callers then save "
        "nothing at all, so the default adds no work to REGISTER handling."
    )

    def saved_bindings(now: float) -> list[Binding]:
        """The bindings saved before the start whose ``expires_at`` is after ``now``."""

    def saved_tokens(now: float) -> list[SavedToken]:
        """The registration tokens saved before the start that expire after ``now``."""

    def saved_bans(now: float) -> list[SavedBan]:
        """The bans saved before the start that end after ``now``."""

    def save_binding(binding: Binding) -> Deferred[None]:
        """Keep ``binding`` (a new one, or a refresh of the one with its aor and contact)."""

    def delete_binding(aor: str, contact: str) -> Deferred[None]:
        """Forget the binding of ``aor`` with ``contact`` (none: nothing happens)."""

    def save_token(token: SavedToken) -> Deferred[None]:
        """Keep ``token`` (a new one, or a new expiry of the one with its name)."""

    def delete_token(token: str) -> Deferred[None]:
        """Forget the token named ``token``."""

    def save_ban(ban: SavedBan) -> Deferred[None]:
        """Keep ``ban`` (replacing a ban of the same host)."""

    def delete_ban(host: str) -> Deferred[None]:
        """Forget the ban of ``host``."""

    def close() -> Deferred[None]:
        """Fires once every write made before it is done; later writes are ignored."""
