"""
Test doubles for sipproxy and its plugins, in the manner of :mod:`twisted.internet.testing`.

A plugin's test builds a real :class:`~sipproxy.proxy.Proxy` on a
:class:`~twisted.internet.task.Clock` with :meth:`ProxyHarness.build`, feeds it requests as
bytes from a given :class:`~sipproxy.message.Source` and reads what the proxy sent, re-parsed
from the bytes it would have put on the wire, by destination::

    harness = ProxyHarness.build(config_text, plugins=[MyPlugin()])
    harness.receive(invite_bytes, PHONE)
    [forwarded] = harness.wire.requests_to("203.0.113.50", "INVITE")
    harness.clock.advance(32)

Nothing here opens a socket or asks DNS: :class:`RecordingWire` stands in for the transports
(:class:`FakeListener` for their listeners) and :class:`ResolverDouble` for the resolver.
:class:`LocationRecorder` records what the location service tells its listeners.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from sipproxy.addressing import in_networks, ip_of
from sipproxy.config import Config, parse_config
from sipproxy.context import Target
from sipproxy.location import Binding, ILocationListener, LocationService, RemovalReason
from sipproxy.message import Message, Request, Response, Source, parse_message
from sipproxy.pipeline import load_plugins
from sipproxy.proxy import Proxy
from sipproxy.registrar import Registrar
from sipproxy.transport.sides import DestinationSides, SourceAddresses, pick_listener

__all__ = [
    "FakeListener",
    "LocationRecorder",
    "ProxyHarness",
    "RecordingWire",
    "ResolverDouble",
    "answer",
    "listen_toml",
    "listeners_for",
    "sip_request",
    "toml_text",
]

#: a UDP request larger than this goes over TCP (RFC 3261 18.1.1), as the transports do it
_UDP_SIZE_LIMIT = 1300


@dataclass
class FakeListener:
    """The attributes of a transport listener the proxy and plugins read (its side, transport,
    address and port, and the host its Via and Record-Route name)."""

    side: str
    transport: str
    address: str
    port: int
    via_host: str


def listeners_for(config: Config) -> list[FakeListener]:
    """One :class:`FakeListener` per ``[[listen]]`` entry of ``config``, in its order."""
    return [FakeListener(lc.side, lc.transport.upper(), lc.address, lc.port, lc.advertised_host)
            for lc in config.listen]


def _destination(response: Response) -> tuple[str, int]:
    """Where a response with no request source goes: its top Via (``received``, ``rport``)."""
    via = response.top_via
    assert via is not None, "a response without a Via has nowhere to go"
    rport = via.rport
    port = rport if type(rport) is int else (via.port or 5060)
    return via.received or via.host, port


class RecordingWire:
    """
    Stands in for the transports: records every message the proxy sends instead of sending it,
    as the bytes it would put on the wire and where they would go, and picks listeners as the
    real transports do.

    :ivar datagrams: ``(bytes, (host, port))`` of everything sent, oldest first.
    :ivar requests: every request sent, re-parsed from its bytes, with its target.
    :ivar responses: every response sent, re-parsed, with the source of its request (``None``
        for a stateless response, which goes where its top Via says).
    :ivar tls_client: the TLS client policy a plugin installed (the ``tls`` plugin does).
    :ivar sides: the side of a destination, as the real transports tell it; ``routes`` (a
        network, e.g. ``"10.97.0.0/24"``, to the local address the kernel sends from toward it:
        the most specific one wins) stands for the kernel's routing table. Without a route, a
        destination's side is its address class, and the address that names a wildcard
        listener toward it is loopback.
    :ivar flood: set a :class:`~sipproxy.flood.FloodGuard` before the proxy is built to have
        ``[limits]`` applied as with the real transports; ``None``: no limits.
    """

    tls_client: Any = None
    flood: Any = None

    def __init__(self, listeners: Sequence[FakeListener],
                 routes: Mapping[str, str] | None = None) -> None:
        self.listeners = list(listeners)
        table = [(ipaddress.ip_network(net), source) for net, source in (routes or {}).items()]
        table.sort(key=lambda entry: entry[0].prefixlen, reverse=True)

        def lookup(host: str) -> str | None:
            return next((source for net, source in table if in_networks(host, (net,))), None)

        self.sides = DestinationSides(self.listeners, SourceAddresses(Clock(), lookup))
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self.requests: list[tuple[Request, Target]] = []
        self.responses: list[tuple[Response, Source | None]] = []
        self._seen = 0

    # -- what the proxy calls ----------------------------------------------------------------
    def send_request(self, request: Request, target: Target) -> Deferred[None]:
        """Record ``request`` as sent to ``target``."""
        data = request.to_bytes()
        self.datagrams.append((data, (target.host, target.port)))
        parsed = parse_message(data)
        assert isinstance(parsed, Request)
        self.requests.append((parsed, target))
        return succeed(None)

    def send_response(self, response: Response, source: Source | None) -> Deferred[None]:
        """Record ``response`` as sent back to ``source`` (or to its top Via, when ``None``)."""
        data = response.to_bytes()
        to = (source.host, source.port) if source is not None else _destination(response)
        self.datagrams.append((data, to))
        parsed = parse_message(data)
        assert isinstance(parsed, Response)
        self.responses.append((parsed, source))
        return succeed(None)

    def choose_listener(self, target: Target, side: str | None = None,
                        transport: str | None = None) -> FakeListener | None:
        """The listener a request to ``target`` leaves from, by the real transports' rules
        (:func:`~sipproxy.transport.sides.pick_listener`), with the routes the wire was given."""
        return pick_listener(self.listeners, self.sides, target, side, transport)

    def transport_for(self, size: int, target: Target) -> str:
        """TCP for a UDP request over 1300 bytes (RFC 3261 18.1.1), else the target's."""
        wanted = target.transport.upper()
        return "TCP" if wanted == "UDP" and size > _UDP_SIZE_LIMIT else wanted

    # -- what a test reads -------------------------------------------------------------------
    def received(self, host: str, port: int | None = None) -> list[tuple[bytes, Message]]:
        """Everything sent to ``host`` (and ``port``), oldest first: ``(bytes, parsed)``."""
        return [(data, parse_message(data)) for data, (h, p) in self.datagrams
                if h == host and (port is None or p == port)]

    def requests_to(self, host: str, method: str | None = None,
                    port: int | None = None) -> list[Request]:
        """The requests (of ``method``) sent to ``host`` (and ``port``)."""
        return [m for _, m in self.received(host, port)
                if isinstance(m, Request) and method in (None, m.method)]

    def responses_to(self, host: str, method: str | None = None,
                     port: int | None = None) -> list[Response]:
        """The responses (to ``method``) sent to ``host`` (and ``port``)."""
        return [m for _, m in self.received(host, port)
                if isinstance(m, Response) and method in (None, m.cseq.method)]

    def new(self) -> list[tuple[bytes, Message, tuple[str, int]]]:
        """What was sent since the last call, ``(bytes, parsed, (host, port))``, but 100 Trying
        (hop by hop: where it leaves depends on timing no test should depend on)."""
        fresh, self._seen = self.datagrams[self._seen:], len(self.datagrams)
        parsed = [(data, parse_message(data), to) for data, to in fresh]
        return [(d, m, to) for d, m, to in parsed
                if not (isinstance(m, Response) and m.status == 100)]


class ResolverDouble:
    """
    Stands in for :class:`~sipproxy.dns.SipResolver`: a name resolves to the targets a table
    gives it (no NAPTR, SRV or A lookup), an IP literal to itself as RFC 3263 has it (TLS and
    5061 for ``sips:`` or ``transport=tls``, else the transport asked for, or UDP, and 5060).

    :ivar calls: ``(host, port, transport, secure)`` of every lookup, in order.
    :ivar hold: ``True``: answers wait for :meth:`release` (a lookup still on its way).
    """

    def __init__(self, names: Mapping[str, Sequence[Target]] | None = None) -> None:
        self.names = {name.lower(): list(targets) for name, targets in (names or {}).items()}
        self.calls: list[tuple[str, int | None, str | None, bool]] = []
        self.hold = False
        self.held: list[tuple[Deferred[list[Target]], list[Target]]] = []

    def resolve(self, host: str, port: int | None, transport: str | None, secure: bool,
                server_name: str | None = None) -> Deferred[list[Target]]:
        """The targets for ``host``; a name the table does not have gives none."""
        self.calls.append((host, port, transport, secure))
        if ip_of(host) is None:
            targets = list(self.names.get(host.lower(), []))
        else:
            kind = "TLS" if secure or (transport or "").upper() == "TLS" else \
                (transport or "UDP").upper()
            default = 5061 if kind == "TLS" else 5060
            targets = [Target(kind, host, port or default, server_name or host)]
        if self.hold:
            d: Deferred[list[Target]] = Deferred()
            self.held.append((d, targets))
            return d
        return succeed(targets)

    def release(self) -> None:
        """Answer every lookup held so far."""
        held, self.held = self.held, []
        for d, targets in held:
            d.callback(targets)


@implementer(ILocationListener)
class LocationRecorder:
    """
    An :class:`~sipproxy.location.ILocationListener` that records what it is told.

    :ivar added: ``(binding, previous)`` of every ``binding_added``, in order.
    :ivar removed: ``(binding, reason)`` of every ``binding_removed``, in order.
    """

    def __init__(self) -> None:
        self.added: list[tuple[Binding, Binding | None]] = []
        self.removed: list[tuple[Binding, RemovalReason]] = []

    def binding_added(self, binding: Binding, previous: Binding | None) -> None:
        """Record it in :attr:`added`."""
        self.added.append((binding, previous))

    def binding_removed(self, binding: Binding, reason: RemovalReason) -> None:
        """Record it in :attr:`removed`."""
        self.removed.append((binding, reason))

    def removed_contacts(self) -> list[tuple[str, str]]:
        """``(contact, reason)`` of every binding removed, in order."""
        return [(binding.contact, reason) for binding, reason in self.removed]


@dataclass
class ProxyHarness:
    """
    A real :class:`~sipproxy.proxy.Proxy` with its registrar and location service on a
    :class:`~twisted.internet.task.Clock`, a :class:`RecordingWire` for transports and a
    :class:`ResolverDouble`; build one with :meth:`build`.
    """

    clock: Clock
    config: Config
    wire: RecordingWire
    resolver: ResolverDouble
    location: LocationService
    registrar: Registrar
    proxy: Proxy
    plugins: list[Any] = field(default_factory=list)

    @classmethod
    def build(cls, config: str | Mapping[str, Any] | Config, *,
              plugins: Sequence[Any] | None = None, clock: Clock | None = None,
              wire: RecordingWire | None = None, resolver: ResolverDouble | None = None,
              source: str = "<string>") -> Self:
        """
        Build the proxy.

        :param config: TOML text, a dict of the same tables (see :func:`toml_text`), or a parsed
            :class:`~sipproxy.config.Config`.
        :param plugins: the plugin objects to run, in order; ``None``: the plugins the config
            enables, loaded as the service loads them (``acl`` first with an outside listener).
        :param clock: the reactor's time (default: a new :class:`~twisted.internet.task.Clock`).
        :param wire: the transports (default: a :class:`RecordingWire` with the config's
            listeners).
        :param resolver: the resolver (default: a :class:`ResolverDouble` knowing no names).
        :param source: the config's name in error messages.
        :returns: an instance of ``cls`` (a subclass's own fields keep their defaults).
        """
        if isinstance(config, Mapping):
            config = toml_text(config)
        if isinstance(config, str):
            config = parse_config(config, source)
        clock = clock if clock is not None else Clock()
        wire = wire if wire is not None else RecordingWire(listeners_for(config))
        resolver = resolver if resolver is not None else ResolverDouble()
        location = LocationService(clock)
        registrar = Registrar(location, clock, list(config.proxy.domains))
        proxy = Proxy(config, clock, wire, location, registrar, resolver)  # type: ignore[arg-type]
        loaded = list(plugins) if plugins is not None else load_plugins(config, proxy)
        proxy.set_plugins(loaded)
        return cls(clock, config, wire, resolver, location, registrar, proxy, loaded)

    def receive(self, data: bytes | str, source: Source) -> Message:
        """Hand ``data`` to the proxy as the transports do: parsed, ``source`` attached."""
        message = parse_message(data.encode() if isinstance(data, str) else data)
        message.source = source
        self.proxy.receive(message)
        return message

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: the timers due by then run."""
        self.clock.advance(seconds)

    def settle(self, limit: int = 500) -> None:
        """Run every pending timer, the next one first, until none is left.

        :raises AssertionError: timers were still pending after ``limit`` rounds.
        """
        for _ in range(limit):
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))
        if self.clock.getDelayedCalls():
            raise AssertionError("timers never stopped")

    def assert_nothing_left(self) -> None:
        """Check that the proxy keeps no transaction and no request any more (after
        :meth:`settle`, what has ended must have left nothing behind).

        :raises AssertionError: naming what is left.
        """
        transactions = len(self.proxy.transactions)
        if transactions:
            raise AssertionError(f"{transactions} transactions left")
        left = self.proxy.requests_in_progress()
        if left:
            raise AssertionError(f"requests left: {[ctx.request for ctx in left]}")


def sip_request(method: str, uri: str, *, via: str, from_: str, to: str, call_id: str,
                cseq: int = 1, headers: Sequence[str] = ()) -> bytes:
    """
    A request without a body as a user agent sends it: the bytes to hand to
    :meth:`ProxyHarness.receive`.

    :param via: the top Via's value, e.g.
        ``"SIP/2.0/UDP 192.168.1.20:5060;rport;branch=z9hG4bK1"``.
    :param from_: the From value, with its tag.
    :param to: the To value (a tag only inside a dialog).
    :param headers: further ``"Name: value"`` lines (Contact, Route, ...), in order.
    """
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70", f"From: {from_}",
             f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", *headers,
             "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(request: Request, status: int, to_tag: str | None = None,
           headers: Sequence[str] = (), record_route: bool = False) -> bytes:
    """
    The response a user agent sends to ``request`` (as the proxy forwarded it).

    :param to_tag: added to the To header unless it has a tag already.
    :param headers: ``"Name: value"`` lines to add.
    :param record_route: copy the request's Record-Route (as a UA does in a 2xx to an INVITE).
    """
    response = request.make_response(status)
    if to_tag is not None and not response.to.tag:
        to = response.to.copy()
        to.tag = to_tag
        response.set_name_addr("To", to)
    if record_route:
        for value in request.headers.get_all("record-route"):
            response.headers.add("Record-Route", value)
    for line in headers:
        name, _, value = line.partition(": ")
        response.headers.add(name, value)
    return response.to_bytes()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def toml_text(config: Mapping[str, Any]) -> str:
    """
    A config dict as the TOML the proxy reads: each key a table (``[name]``), or a list of
    tables (``[[listen]]``); their values scalars, arrays and inline tables.
    """
    out: list[str] = []
    for name, body in config.items():
        tables: Sequence[Mapping[str, Any]]
        if isinstance(body, Mapping):
            tables, header = [body], f"[{name}]"
        else:
            tables, header = body, f"[[{name}]]"
        for table in tables:
            out.append(header)
            out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
            out.append("")
    return "\n".join(out)


def listen_toml(*, inside: str | None = None, outside: str | None = None, port: int = 5060,
                transport: str | None = "udp") -> str:
    """
    The ``[[listen]]`` tables of a config written as TOML text (see :func:`toml_text`): a
    socket on the ``inside`` address, then one on the ``outside`` address, each if given.

    :param port: both sockets' port.
    :param transport: both sockets' transport; ``None`` leaves the key out (its default).
    """
    tables: list[dict[str, Any]] = []
    for side, address in (("inside", inside), ("outside", outside)):
        if address is not None:
            table: dict[str, Any] = {"side": side}
            if transport is not None:
                table["transport"] = transport
            tables.append({**table, "address": address, "port": port})
    return toml_text({"listen": tables})
