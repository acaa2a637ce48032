"""The side of a destination comes from the network, not from its address class.

A SIP trunk over a VPN or a carrier's private network: the provider is at 10.97.0.150, a
private address, reached through the firewall's outside interface (10.97.0.1). Requests to it
leave from the outside listener, and everything that depends on the side (Via, Record-Route,
the nat plugin's Contacts and its idea of inside and outside, the media relay's interfaces)
follows. The kernel's routing table is stood in for by ``RecordingWire(routes=...)`` and, for the
real transports, by a ``SourceAddresses`` with a table lookup.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from sipproxy.config import Section, parse_config
from sipproxy.context import Target
from sipproxy.media.backends import RelayedSdp
from sipproxy.message import Request, Source
from sipproxy.plugins.media import MediaPlugin
from sipproxy.plugins.nat import TOKEN_PREFIX
from sipproxy.plugins.nat import factory as nat_factory
from sipproxy.testing import (
    FakeListener,
    ProxyHarness,
    RecordingWire,
    ResolverDouble,
    answer,
    listeners_for,
    sip_request,
)
from sipproxy.transport.manager import TransportManager
from sipproxy.transport.sides import (
    DestinationSides,
    SourceAddresses,
    kernel_source_address,
)
from tests.nat_site import FIREWALL, INSIDE, OUTSIDE, PHONE, PHONE_CONTACT, PHONE_VIA

TRUNK = "10.97.0.1"  # the firewall's address on the carrier's network (its outside)
PROVIDER_IP = "10.97.0.150"
PROVIDER = Source("UDP", PROVIDER_IP, 5060, TRUNK, 5060, "outside")
#: the firewall's routing table: the carrier's network through the outside, the LAN inside
ROUTES = {"10.97.0.0/16": TRUNK, "192.168.77.0/24": INSIDE}
LAN = re.compile(rb"192\.168\.77\.\d+")
SDP = (b"v=0\r\no=- 1 1 IN IP4 192.168.77.10\r\ns=-\r\nc=IN IP4 192.168.77.10\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 0\r\n")


def firewall(upstream: str = f"sip:{PROVIDER_IP}:5060", side: str | None = None,
             plugins: str = '"nat"') -> str:
    """The firewall set-up with the provider on the carrier's network; the nat plugin with its
    default inside networks (every private range: 10.97.0.150 is in one)."""
    text = FIREWALL.replace(OUTSIDE, TRUNK).split("[upstream]")[0]
    side_line = f'side = "{side}"' if side else ""
    return f'{text}[upstream]\nuri = "{upstream}"\n{side_line}\n[plugins]\nenabled = [{plugins}]\n'


def build(text: str, routes: dict[str, str] | None = None,
          resolver: ResolverDouble | None = None, plugins: list[Any] | None = None,
          ) -> ProxyHarness:
    config = parse_config(text)
    wire = RecordingWire(listeners_for(config), routes=ROUTES if routes is None else routes)
    return ProxyHarness.build(config, wire=wire, resolver=resolver, plugins=plugins)


def register(net: ProxyHarness, branch: str = "z9hG4bKreg1") -> tuple[bytes, Request]:
    net.receive(sip_request(
        "REGISTER", "sip:provider.example", via=PHONE_VIA + branch, call_id="reg-1",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>", "Expires: 3600")), PHONE)
    [(data, reg)] = net.wire.received(PROVIDER_IP)
    return data, reg


# ------------------------------------------------------------------------------------------------
# the route lookup
# ------------------------------------------------------------------------------------------------
def test_the_kernel_names_the_source_address_and_is_never_asked_about_a_name() -> None:
    assert kernel_source_address("127.0.0.1") == "127.0.0.1"
    assert kernel_source_address("sip.provider.example") is None  # no blocking DNS query


def test_route_lookups_are_cached_for_their_ttl_and_bounded() -> None:
    clock = Clock()
    asked: list[str] = []

    def lookup(host: str) -> str:
        asked.append(host)
        return TRUNK

    sources = SourceAddresses(clock, lookup, ttl=30.0, size=2)
    assert sources.source_for(PROVIDER_IP) == TRUNK
    clock.advance(29)
    assert sources.source_for(PROVIDER_IP) == TRUNK
    assert asked == [PROVIDER_IP]
    clock.advance(1)  # expired: the route may have changed (a VPN went down)
    sources.source_for(PROVIDER_IP)
    assert asked == [PROVIDER_IP] * 2
    sources.source_for("10.97.0.151")
    sources.source_for("10.97.0.152")  # a third destination: the least recently used goes
    sources.source_for("10.97.0.151")
    sources.source_for(PROVIDER_IP)
    assert asked == [PROVIDER_IP] * 2 + ["10.97.0.151", "10.97.0.152", PROVIDER_IP]


# ------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------
IN = FakeListener("inside", "UDP", INSIDE, 5060, INSIDE)
OUT = FakeListener("outside", "UDP", TRUNK, 5060, TRUNK)


def side_of(host: str, routes: dict[str, str], listeners: list[FakeListener] | None = None,
            ) -> str | None:
    wire = RecordingWire(listeners or [IN, OUT], routes=routes)
    listener = wire.choose_listener(Target("UDP", host, 5060, host))
    return listener.side if listener is not None else None


def test_a_private_destination_routed_through_the_outside_is_outside() -> None:
    assert side_of(PROVIDER_IP, ROUTES) == "outside"
    assert side_of("192.168.77.10", ROUTES) == "inside"
    # a public address routed through the inside (a DMZ behind the LAN interface) is inside
    assert side_of("198.51.100.7", {"198.51.100.0/24": INSIDE}) == "inside"


WILDCARDS = [FakeListener("inside", "UDP", "0.0.0.0", 5060, "0.0.0.0"),
             FakeListener("outside", "UDP", "0.0.0.0", 5070, "0.0.0.0")]
SHARED = [FakeListener("inside", "UDP", TRUNK, 5060, TRUNK),
          FakeListener("outside", "UDP", TRUNK, 5070, TRUNK)]


@pytest.mark.parametrize(("why", "host", "routes", "listeners"), [
    ("no route", PROVIDER_IP, {}, None),
    ("a source address no listener has", PROVIDER_IP, {"10.0.0.0/8": "10.200.0.1"}, None),
    ("loopback is routed through lo, no side's interface", "127.0.0.5", {"0.0.0.0/0": TRUNK},
     None),
    ("listeners on every address", PROVIDER_IP, {"10.0.0.0/8": TRUNK}, WILDCARDS),
    ("listeners of both sides on the source address", PROVIDER_IP, {"10.0.0.0/8": TRUNK},
     SHARED),
])
def test_where_the_routing_says_nothing_the_address_class_decides(
    why: str, host: str, routes: dict[str, str], listeners: list[FakeListener] | None,
) -> None:
    assert side_of(host, routes, listeners) == "inside", why


def test_by_address_class_a_public_destination_is_outside() -> None:
    assert side_of("198.51.100.7", {}) == "outside"
    assert side_of("198.51.100.7", {}, WILDCARDS) == "outside"


def test_a_pinned_side_wins_over_the_route() -> None:
    sides = DestinationSides([IN, OUT], SourceAddresses(Clock(), lambda host: TRUNK))
    assert sides.routed_side(PROVIDER_IP) == "outside"
    sides.pin(PROVIDER_IP, "inside")
    assert sides.routed_side(PROVIDER_IP) == "inside"
    assert sides.routed_side("sip.provider.example") is None


def test_a_side_follows_a_route_that_changed_once_its_lookup_expired() -> None:
    """A VPN to the carrier comes up: within a route lookup's lifetime the provider moves
    from the address class's side to the side its new route goes through."""
    clock = Clock()
    table: dict[str, str] = {}
    sides = DestinationSides([IN, OUT], SourceAddresses(clock, table.get, ttl=30.0))
    assert (sides.routed_side(PROVIDER_IP), sides.side_of(PROVIDER_IP)) == (None, "inside")
    table[PROVIDER_IP] = TRUNK
    clock.advance(29)
    assert sides.side_of(PROVIDER_IP) == "inside"
    clock.advance(1)
    assert (sides.routed_side(PROVIDER_IP), sides.side_of(PROVIDER_IP)) == ("outside", "outside")


def test_the_real_transports_follow_the_route() -> None:
    """TransportManager picks the listener by the kernel's route (a table here), and the
    address-class rule without one."""
    config = parse_config(firewall())
    table = {PROVIDER_IP: TRUNK}
    manager = TransportManager(Clock(), lambda m: None, config.listen,
                               sources=SourceAddresses(Clock(), table.get))
    provider = manager.choose_listener(Target("UDP", PROVIDER_IP, 5060, PROVIDER_IP))
    assert provider is not None and (provider.side, provider.address) == ("outside", TRUNK)
    unrouted = manager.choose_listener(Target("UDP", "10.1.1.1", 5060, "10.1.1.1"))
    assert unrouted is not None and unrouted.side == "inside"


# ------------------------------------------------------------------------------------------------
# the proxy: everything that depends on the side follows the listener chosen
# ------------------------------------------------------------------------------------------------
def test_a_register_to_a_private_provider_leaves_from_the_outside() -> None:
    net = build(firewall())
    data, reg = register(net)
    assert not LAN.search(data), data.decode()
    assert len(reg.vias) == 1 and (reg.top_via.host, reg.top_via.port) == (TRUNK, 5060)
    [contact] = reg.contacts
    assert contact.uri.host == TRUNK and contact.uri.user.startswith(TOKEN_PREFIX)


def test_without_a_route_the_register_left_from_the_inside() -> None:
    """What the routing fixes: by address class the provider was inside."""
    net = build(firewall(), routes={})
    _data, reg = register(net)
    assert reg.top_via.host == INSIDE


def invite(net: ProxyHarness, branch: str = "z9hG4bKinv1") -> Request:
    net.receive(sip_request(
        "INVITE", "sip:bob@provider.example", via=PHONE_VIA + branch, call_id="call-1",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>", "Content-Type: application/sdp")
    ).replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: %d\r\n\r\n" % len(SDP)) + SDP,
        PHONE)
    [out] = net.wire.requests_to(PROVIDER_IP, "INVITE")
    return out


def test_a_call_to_a_private_provider_and_its_bye_from_there() -> None:
    """The INVITE names only the outside (one Record-Route: the nat plugin removed the inside
    entry, and kept the outside one although 10.97.0.1 is private); the provider's BYE,
    routed to 10.97.0.1, reaches the phone (not refused as "to an inside address")."""
    net = build(firewall())
    out = invite(net)
    assert out.headers.get_all("record-route") == [f"<sip:{TRUNK}:5060;lr>"]
    assert not LAN.search(out.to_bytes().split(b"\r\n\r\n")[0])
    net.receive(answer(out, 200, to_tag="b1", record_route=True,
                       headers=[f"Contact: <sip:bob@{PROVIDER_IP}:5060>"]), PROVIDER)
    [ok] = [r for r in net.wire.responses_to(PHONE.host, "INVITE") if r.status >= 200]
    assert ok.status == 200
    assert ok.headers.get_all("record-route") == [f"<sip:{TRUNK}:5060;lr>",
                                                  f"<sip:{INSIDE}:5060;lr>"]
    net.receive(sip_request(
        "BYE", str(out.contacts[0].uri),
        via=f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch=z9hG4bKbye1", call_id="call-1",
        from_="<sip:bob@provider.example>;tag=b1", to="<sip:alice@provider.example>;tag=a1",
        cseq=2, headers=(f"Route: <sip:{TRUNK}:5060;lr>",)), PROVIDER)
    assert [r.status for r in net.wire.responses_to(PROVIDER_IP, "BYE")] == []
    assert net.wire.requests_to(PHONE.host, "BYE"), net.wire.new()


def test_an_incoming_call_from_a_private_provider_reaches_the_phone() -> None:
    net = build(firewall())
    _data, reg = register(net)
    token_uri = str(reg.contacts[0].uri)
    net.receive(sip_request(
        "INVITE", token_uri, via=f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch=z9hG4bKin1",
        call_id="in-1", from_="<sip:carol@provider.example>;tag=c1",
        to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",)), PROVIDER)
    [at_phone] = net.wire.requests_to(PHONE.host, "INVITE")
    assert str(at_phone.uri) == PHONE_CONTACT
    net.receive(answer(at_phone, 200, to_tag="p1", record_route=True,
                       headers=[f"Contact: <{PHONE_CONTACT}>"]), PHONE)
    [ok] = [r for r in net.wire.responses_to(PROVIDER_IP, "INVITE") if r.status >= 200]
    # the outside Record-Route stays (10.97.0.1 is private but outside), the inside one goes
    assert ok.headers.get_all("record-route") == [f"<sip:{TRUNK}:5060;lr>"]
    assert ok.contacts[0].uri.host == TRUNK


@pytest.mark.parametrize(("side", "expected"), [("inside", INSIDE), ("outside", TRUNK)])
def test_upstream_side_wins_over_the_route_and_the_address_class(side: str, expected: str) -> None:
    """``[upstream] side`` decides for the upstream's addresses, also for a name and for the
    in-dialog requests that go there (here: with no route at all)."""
    resolver = ResolverDouble({"sip.provider.example": [
        Target("UDP", PROVIDER_IP, 5060, "sip.provider.example")]})
    net = build(firewall("sip:sip.provider.example", side=side), routes={}, resolver=resolver)
    _data, reg = register(net)
    assert reg.top_via.host == expected
    ack_target = Target("UDP", PROVIDER_IP, 5060, PROVIDER_IP)
    assert net.proxy.make_via(ack_target).host == expected


class DirectionRelay:
    """An IMediaRelay double: records the ``direction`` of each offer, returns the SDP."""

    def __init__(self) -> None:
        self.directions: list[list[str]] = []

    def offer(self, call_id: str, from_tag: str, sdp: bytes, to_tag: str | None = None,
              options: dict[str, Any] | None = None) -> defer.Deferred[RelayedSdp]:
        self.directions.append(list((options or {})["direction"]))
        return defer.succeed(RelayedSdp(sdp))

    def add_end_observer(self, observer: Any) -> None:
        pass


def test_the_media_relay_is_told_the_provider_is_outside() -> None:
    relay = DirectionRelay()
    net = build(firewall(plugins=""), plugins=[])
    net.proxy.set_plugins([MediaPlugin(net.proxy, relay)])
    invite(net)
    assert relay.directions == [["inside", "outside"]]


def nat_only(text: str, routes: dict[str, str] | None = None) -> ProxyHarness:
    """The nat plugin alone (no acl): what it refuses by itself."""
    net = build(text, routes, plugins=[])
    net.proxy.set_plugins([nat_factory.build(net.proxy, Section("nat", {}))])
    return net


def provider_invite(net: ProxyHarness, uri: str, headers: tuple[str, ...] = (),
                    source: Source = PROVIDER) -> int:
    """The status the proxy answers a new INVITE from the outside to ``uri`` with."""
    net.wire.new()
    net.receive(sip_request(
        "INVITE", uri, via=f"SIP/2.0/UDP {source.host}:5060;branch=z9hG4bKevil",
        call_id="evil-1", from_="<sip:mallory@evil.example>;tag=m1",
        to="<sip:x@provider.example>", headers=headers), source)
    return next(m.status for _, m, _to in net.wire.new() if hasattr(m, "status"))


@pytest.mark.parametrize(("uri", "headers"), [
    ("sip:x@192.168.77.10", ()),
    (f"sip:x@{PROVIDER_IP}", (f"Route: <sip:{INSIDE}:5060;lr>",)),
])
def test_the_outside_still_cannot_reach_the_routed_inside(
    uri: str, headers: tuple[str, ...],
) -> None:
    net = nat_only(firewall())
    assert provider_invite(net, uri, headers) == 403
    assert net.wire.requests_to("192.168.77.10") == []


def test_a_public_proxy_still_refuses_private_addresses_routed_outside() -> None:
    """Public-proxy mode is unchanged: with outside listeners only, everything routes out
    of the one interface, and the nat plugin's inside_networks alone say what is inside."""
    text = firewall().replace('side = "inside"', 'side = "outside"')
    net = nat_only(text, routes={"0.0.0.0/0": TRUNK})
    outsider = Source("UDP", "198.51.100.9", 5060, TRUNK, 5060, "outside")
    assert provider_invite(net, "sip:x@10.0.0.5", source=outsider) == 403
