"""The acl plugin inside a real Proxy: no open relay. Requests from the outside reach local
users with a binding, the proxy itself and dialogs it is part of; anything else from an
untrusted outside source is refused (403), logged once per source per interval, counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent

from sipproxy.config import ConfigError, Section
from sipproxy.message import Request, Response, Source, parse_message
from sipproxy.plugins.acl import AclPlugin, factory
from sipproxy.testing import answer
from sipproxy.uri import parse_uri
from tests.auth_net import (
    DOMAIN,
    INSIDE,
    OUTSIDE,
    PHONE,
    PROVIDER,
    Net,
    challenges,
    credentials,
    make_net,
)

ATTACKER = Source("UDP", "198.51.100.66", 5060, OUTSIDE, 5060, "outside")
ATTACKER2 = Source("UDP", "198.51.100.67", 5060, OUTSIDE, 5060, "outside")
REMOTE_UA = Source("UDP", "198.51.100.20", 5060, OUTSIDE, 5060, "outside")


def acl_of(net: Net) -> AclPlugin:
    return next(p for p in net.plugins if isinstance(p, AclPlugin))


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return make_net(tmp_path, plugins='["acl"]')


def statuses(sent: list[Any]) -> list[int]:
    return [m.status for m in sent if isinstance(m, Response)]


def forwarded(sent: list[Any]) -> list[Request]:
    return [m for m in sent if isinstance(m, Request)]


def register_alice(net: Net) -> None:
    [ok] = net.request("REGISTER", f"sip:{DOMAIN}", PHONE, to=f"<sip:alice@{DOMAIN}>",
                       call_id="reg", headers=("Expires: 600",))
    assert ok.status == 200


def test_outside_to_outside_domain_refused(net: Net) -> None:
    sent = net.request("INVITE", "sip:+19005551234@evil.example", ATTACKER,
                       from_user="scanner", from_domain="198.51.100.66", call_id="a1")
    assert statuses(sent) == [403]
    assert sent[0].reason == "Relaying denied"
    assert forwarded(sent) == []
    assert acl_of(net).counters["acl.relay_denied"] == 1
    assert len(net.logged) == 1
    assert "198.51.100.66" in formatEvent(net.logged[0])


def test_outside_to_unregistered_local_user_gets_404(net: Net) -> None:
    sent = net.request("INVITE", f"sip:alice@{DOMAIN}", ATTACKER, from_user="x",
                       from_domain="198.51.100.66", call_id="a2")
    assert statuses(sent) == [404]
    assert acl_of(net).counters["acl.relay_denied"] == 0


def test_outside_to_registered_local_user_gets_through(net: Net) -> None:
    register_alice(net)
    sent = net.request("INVITE", f"sip:alice@{DOMAIN}", ATTACKER, from_user="x",
                       from_domain="198.51.100.66", call_id="a3")
    [out] = forwarded(sent)
    assert str(out.uri) == f"sip:alice@{PHONE.host}:5060"
    invites = [to for data, to in net.wire.datagrams if data.startswith(b"INVITE ")]
    assert invites == [(PHONE.host, 5060)]


def test_outside_to_the_proxy_itself(net: Net) -> None:
    sent = net.request("OPTIONS", f"sip:{OUTSIDE}", ATTACKER, from_user="x",
                       from_domain="198.51.100.66", call_id="a4")
    assert statuses(sent) == [200]


@pytest.mark.parametrize(
    ("uri", "routes"),
    [
        (f"sip:alice@{DOMAIN}", (f"<sip:{OUTSIDE}:5060;lr>", "<sip:evil.example;lr>")),
        ("sip:+1900@evil.example", (f"<sip:{OUTSIDE}:5060;lr>",)),
        (f"sip:alice@{DOMAIN}", ("<sip:198.51.100.99;lr>",)),
        (f"sip:{OUTSIDE}:5060;lr", ("<sip:+1900@evil.example>",)),  # strict routing
        ("tel:+19005551234", ()),
        (f"sip:pbx@{OUTSIDE}:5080", ()),  # our address, another port: not us
    ],
    ids=["foreign-route-after-ours", "our-route-foreign-uri", "foreign-route", "strict",
         "tel", "own-host-other-port"],
)
def test_routes_and_uris_that_would_relay(net: Net, uri: str, routes: tuple[str, ...]) -> None:
    register_alice(net)
    sent = net.request("INVITE", uri, ATTACKER, from_user="x", from_domain="198.51.100.66",
                       call_id="r1", headers=tuple(f"Route: {r}" for r in routes))
    assert statuses(sent) == [403]
    assert forwarded(sent) == []


def test_strict_router_toward_a_local_user_allowed(net: Net) -> None:
    register_alice(net)
    sent = net.request("INVITE", f"sip:{OUTSIDE}:5060;lr", ATTACKER, from_user="x",
                       from_domain="198.51.100.66", call_id="s1",
                       headers=(f"Route: <sip:alice@{DOMAIN}>",))
    assert [str(m.uri) for m in forwarded(sent)] == [f"sip:alice@{PHONE.host}:5060"]


def test_spoofed_inside_address_on_the_outside_is_outside(net: Net) -> None:
    spoofed = Source("UDP", "192.168.77.10", 5060, OUTSIDE, 5060, "outside")
    sent = net.request("INVITE", "sip:+1900@evil.example", spoofed, from_user="x",
                       from_domain="evil.example", call_id="sp")
    assert statuses(sent) == [403]


def test_trusted_and_inside_sources_may_relay(net: Net) -> None:
    sent = net.request("INVITE", "sip:+15551234@provider.example", PROVIDER, from_user="x",
                       from_domain="provider.example", call_id="t1")
    assert [m.method for m in forwarded(sent)] == ["INVITE"]
    sent = net.request("INVITE", "sip:+15551234@provider.example", PHONE, call_id="t2")
    assert [m.method for m in forwarded(sent)] == ["INVITE"]
    # an inside address outside inside_networks (on the inside listener) is outside
    stranger = Source("UDP", "10.9.9.9", 5060, INSIDE, 5060, "inside")
    sent = net.request("INVITE", "sip:+15551234@provider.example", stranger, from_user="x",
                       from_domain="10.9.9.9", call_id="t3")
    assert statuses(sent) == [403]


def test_dialogs_the_proxy_is_part_of(net: Net) -> None:
    """A call from the phone to a UA on the outside: its BYE (to the phone's Contact, not a
    local URI) passes; a BYE for a dialog the proxy does not know is refused."""
    sent = net.request("INVITE", "sip:bob@198.51.100.20", PHONE, call_id="d1")
    [out] = forwarded(sent)
    net.send(answer(out, 200, "bobtag", ("Contact: <sip:bob@198.51.100.20>",),
                    record_route=True), REMOTE_UA)
    net.new()
    assert len(net.proxy.dialogs) == 1
    bye = net.request("BYE", f"sip:alice@{PHONE.host}:5060", REMOTE_UA, from_user="bob",
                      from_domain="198.51.100.20", call_id="d1", cseq=7, from_tag="bobtag",
                      to=f"<sip:alice@{DOMAIN}>;tag=fd1", headers=(
                          f"Route: <sip:{OUTSIDE}:5060;lr>",))
    assert [m.method for m in forwarded(bye)] == ["BYE"]
    fake = net.request("BYE", "sip:+1900@evil.example", ATTACKER, from_user="x",
                       from_domain="evil.example", call_id="nodialog", to_tag="t",
                       headers=(f"Route: <sip:{OUTSIDE}:5060;lr>",))
    assert statuses(fake) == [403]


VICTIM = "198.51.100.99"
ALICE_OUT = Source("UDP", "198.51.100.30", 5062, OUTSIDE, 5060, "outside")


def attacker_calls_alice(net: Net, call_id: str = "d2") -> dict[str, Any]:
    """A public-proxy call: alice registered from the outside, the attacker calls her with a
    Record-Route of its own naming the victim; the keywords of the attacker's in-dialog
    requests are returned."""
    register_alice_at(net, ALICE_OUT)
    sent = net.request("INVITE", f"sip:alice@{DOMAIN}", ATTACKER, from_user="m",
                       from_domain="evil.example", call_id=call_id,
                       headers=(f"Record-Route: <sip:{VICTIM};lr>",))
    [out] = forwarded(sent)
    assert out.uri.host == ALICE_OUT.host
    net.send(answer(out, 200, "alicetag", (f"Contact: <sip:alice@{ALICE_OUT.host}:5062>",),
                    record_route=True), ALICE_OUT)
    assert statuses(net.new()) == [200]
    return {"from_user": "m", "from_domain": "evil.example", "call_id": call_id,
            "to": f"<sip:alice@{DOMAIN}>", "to_tag": "alicetag", "from_tag": f"f{call_id}"}


def register_alice_at(net: Net, source: Source) -> None:
    # as on a public proxy (no inside listener), whose phones register from the outside
    acl_of(net).inside_registrations = False
    [ok] = net.request("REGISTER", f"sip:{DOMAIN}", source, to=f"<sip:alice@{DOMAIN}>",
                       call_id="reg-out", headers=("Expires: 600",))
    assert ok.status == 200


OWN_ROUTE = f"Route: <sip:{OUTSIDE}:5060;lr>"


@pytest.mark.parametrize("method, uri, routes", [
    ("MESSAGE", f"sip:x@{VICTIM}", (OWN_ROUTE,)),  # issue 11's probe
    ("INVITE", f"sip:x@{VICTIM}:5060", (OWN_ROUTE,)),
    ("BYE", f"sip:alice@{ALICE_OUT.host}:5062;maddr={VICTIM}", (OWN_ROUTE,)),
    # the route set on the attacker's own side of the proxy is not alice's
    ("MESSAGE", f"sip:alice@{ALICE_OUT.host}:5062", (OWN_ROUTE, f"Route: <sip:{VICTIM};lr>")),
])
def test_in_dialog_requests_only_reach_the_senders_peer(
    net: Net, method: str, uri: str, routes: tuple[str, ...]
) -> None:
    """Issue 11: the attacker's own dialog relayed anything to anyone."""
    dialog = attacker_calls_alice(net)
    sent = net.request(method, uri, ATTACKER, cseq=2, headers=routes, **dialog)
    assert statuses(sent) == [403] and forwarded(sent) == []
    assert acl_of(net).counters["acl.relay_denied"] == 1
    # the real peer is reached
    ok = net.request("MESSAGE", f"sip:alice@{ALICE_OUT.host}:5062", ATTACKER, cseq=3,
                     headers=(OWN_ROUTE,), **dialog)
    assert [m.uri.host for m in forwarded(ok)] == [ALICE_OUT.host]


def alice_to_the_attacker(net: Net, uri: str, *routes: str, cseq: int = 1) -> list[Any]:
    return net.request("MESSAGE", uri, ALICE_OUT, from_user="alice", from_domain=DOMAIN,
                       call_id="d2", from_tag="alicetag", to="<sip:m@evil.example>",
                       to_tag="fd2", cseq=cseq, headers=(OWN_ROUTE, *routes))


def test_an_outside_party_is_reached_only_at_its_own_address(net: Net) -> None:
    """The attacker's Record-Route and Contact (also after a target refresh) may name the
    victim, but alice's requests go only to the attacker's own host."""
    dialog = attacker_calls_alice(net)
    victim_route = alice_to_the_attacker(net, f"sip:m@{ATTACKER.host}:5060",
                                         f"Route: <sip:{VICTIM};lr>")
    assert statuses(victim_route) == [403] and forwarded(victim_route) == []
    own = alice_to_the_attacker(net, f"sip:m@{ATTACKER.host}:5060", cseq=2)
    assert [m.uri.host for m in forwarded(own)] == [ATTACKER.host]
    # a target refresh to the victim: the attacker's new Contact is not used either
    sent = net.request("INVITE", f"sip:alice@{ALICE_OUT.host}:5062", ATTACKER, cseq=3,
                       headers=(OWN_ROUTE, f"Contact: <sip:m@{VICTIM}>"), **dialog)
    [reinvite] = forwarded(sent)
    net.send(answer(reinvite, 200, None, (f"Contact: <sip:alice@{ALICE_OUT.host}:5062>",)),
             ALICE_OUT)
    assert statuses(net.new()) == [200]
    refreshed = alice_to_the_attacker(net, f"sip:m@{VICTIM}", cseq=3)
    assert statuses(refreshed) == [403] and forwarded(refreshed) == []


def test_a_trusted_party_may_name_another_host(net: Net) -> None:
    """The provider (trusted) calls alice from one address with a Contact on another: alice's
    BYE goes there."""
    register_alice_at(net, ALICE_OUT)
    [out] = forwarded(net.request("INVITE", f"sip:alice@{DOMAIN}", PROVIDER, from_user="+1555",
                                  from_domain="provider.example", call_id="p1",
                                  headers=("Contact: <sip:gw@198.51.100.5>",)))
    net.send(answer(out, 200, "alicetag", (f"Contact: <sip:alice@{ALICE_OUT.host}:5062>",),
                    record_route=True), ALICE_OUT)
    net.new()
    bye = net.request("BYE", "sip:gw@198.51.100.5", ALICE_OUT, from_user="alice",
                      from_domain=DOMAIN, call_id="p1", from_tag="alicetag",
                      to="<sip:+1555@provider.example>", to_tag="fp1", headers=(OWN_ROUTE,))
    assert [m.uri.host for m in forwarded(bye)] == ["198.51.100.5"]


def test_a_source_that_is_no_party_reaches_nobody(net: Net) -> None:
    dialog = attacker_calls_alice(net)
    sent = net.request("BYE", f"sip:alice@{ALICE_OUT.host}:5062", ATTACKER2, cseq=2,
                       headers=(OWN_ROUTE,), **dialog)
    assert statuses(sent) == [403]
    ack = net.request("ACK", f"sip:x@{VICTIM}", ATTACKER, headers=(OWN_ROUTE,), **dialog)
    assert ack == [] and acl_of(net).counters["acl.ack_dropped"] == 1


def test_target_refresh_in_both_directions(net: Net) -> None:
    """A re-INVITE and its 2xx change both remote targets; the old tricks still fail."""
    dialog = attacker_calls_alice(net)
    moved = Source("UDP", ALICE_OUT.host, 5064, OUTSIDE, 5060, "outside")
    sent = net.request("INVITE", f"sip:m@{ATTACKER.host}:5060", moved, from_user="alice",
                       from_domain=DOMAIN, call_id="d2", from_tag="alicetag", cseq=5,
                       to="<sip:m@evil.example>", to_tag="fd2", headers=(OWN_ROUTE,))
    [reinvite] = forwarded(sent)
    net.send(answer(reinvite, 200, None, (f"Contact: <sip:m@{VICTIM}>",)), ATTACKER)
    assert statuses(net.new()) == [200]
    bye = net.request("BYE", f"sip:alice@{ALICE_OUT.host}:5064", ATTACKER, cseq=6,
                      headers=(OWN_ROUTE,), **dialog)
    assert [m.uri.port for m in forwarded(bye)] == [5064]
    # its own new target is alice's to use, not the attacker's
    own = net.request("MESSAGE", f"sip:m@{VICTIM}", ATTACKER, cseq=7, headers=(OWN_ROUTE,),
                      **dialog)
    assert statuses(own) == [403]


def test_ack_that_would_relay_is_dropped(net: Net) -> None:
    sent = net.request("ACK", "sip:+1900@evil.example", ATTACKER, from_user="x",
                       from_domain="evil.example", call_id="ack", to_tag="t")
    assert sent == []
    assert acl_of(net).counters["acl.ack_dropped"] == 1


def test_refusals_logged_once_per_source_per_interval(net: Net) -> None:
    for i in range(50):
        net.request("INVITE", "sip:+1900@evil.example", ATTACKER, from_user="x",
                    from_domain="evil.example", call_id=f"flood{i}")
    assert acl_of(net).counters["acl.relay_denied"] == 50
    assert len(net.logged) == 1
    net.request("INVITE", "sip:+1900@evil.example", ATTACKER2, from_user="x",
                from_domain="evil.example", call_id="other")
    assert len(net.logged) == 2
    net.clock.advance(60)
    net.request("INVITE", "sip:+1900@evil.example", ATTACKER, from_user="x",
                from_domain="evil.example", call_id="later")
    assert len(net.logged) == 3
    assert "49 more from this source not logged" in formatEvent(net.logged[-1])


def test_local_user_on_the_outside_must_authenticate(tmp_path: Path) -> None:
    """Public proxy: a local user calling out from the outside is challenged by auth and
    relayed once authenticated; without auth it would be refused."""
    net = make_net(tmp_path, plugins='["acl", "auth"]')
    home = Source("UDP", "198.51.100.30", 5060, OUTSIDE, 5060, "outside")
    [r] = net.request("INVITE", "sip:+15551234@provider.example", home, call_id="p1")
    assert r.status == 407
    value = credentials(r, "alice", "wonderland", "INVITE", "sip:+15551234@provider.example",
                        header="Proxy-Authenticate")
    sent = net.request("INVITE", "sip:+15551234@provider.example", home, call_id="p1", cseq=2,
                       headers=(f"Proxy-Authorization: {value}",))
    assert [m.method for m in forwarded(sent)] == ["INVITE"]
    # a non-local From from the same place is refused at once
    sent = net.request("INVITE", "sip:+15551234@provider.example", home, from_user="x",
                       from_domain="other.example", call_id="p2")
    assert statuses(sent) == [403]
    assert challenges(r, "Proxy-Authenticate")


def test_local_from_without_auth_plugin_refused(net: Net) -> None:
    home = Source("UDP", "198.51.100.30", 5060, OUTSIDE, 5060, "outside")
    sent = net.request("INVITE", "sip:+15551234@provider.example", home, call_id="n1")
    assert statuses(sent) == [403]
    assert forwarded(sent) == []


def test_register_from_outside_for_other_domain_refused(net: Net) -> None:
    sent = net.request("REGISTER", "sip:provider.example", ATTACKER, from_user="x",
                       from_domain="provider.example", to="<sip:x@provider.example>",
                       call_id="rg")
    assert statuses(sent) == [403]


@pytest.mark.parametrize(
    ("acl", "message"),
    [
        ({"inside_networks": ["nope"]}, "acl.inside_networks[0]: must be a network"),
        ({"trusted": ["1.2.3.4/40"]}, "acl.trusted[0]: must be a network"),
        ({"log_interval": -1}, "acl.log_interval: must be a number >= 0.0"),
        ({"x": 1}, "acl.x: unknown key"),
    ],
)
def test_config_errors(net: Net, acl: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        factory.build(net.proxy, Section("acl", acl, "c.toml"))
    assert str(e.value).startswith(f"c.toml: {message}")


def test_defaults(net: Net) -> None:
    plugin = factory.build(net.proxy, Section("acl", {}))
    assert plugin.classify(parse_request(PHONE)) == "inside"
    assert plugin.classify(parse_request(PROVIDER)) == "outside"  # not trusted by default
    loop = Source("UDP", "127.0.0.1", 5060, "127.0.0.1", 5060, "inside")
    assert plugin.classify(parse_request(loop)) == "inside"


def parse_request(source: Source) -> Request:
    request = parse_message(
        b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1"
        b"\r\nTo: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(request, Request)
    request.source = source
    return request


def test_warns_without_auth_only_on_a_public_proxy(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:  # a public proxy: every listener outside
        public = SimpleNamespace(config=net.proxy.config, clock=net.clock,
                                 listeners=[SimpleNamespace(side="outside")])
        acl = factory.build(public, Section("acl", {}))  # type: ignore[arg-type]
        assert not acl.inside_registrations
        factory.build(net.proxy, Section("acl", {}))  # inside and outside: no warning
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len([e for e in events if "auth plugin is not enabled" in formatEvent(e)]) == 1


def test_outside_registrations_refused_without_auth_when_phones_are_inside(net: Net) -> None:
    """An edge proxy (inside and outside listeners) without auth: an outside host may not
    register as a local user (it would take that user's calls), an inside phone may; no
    start-up warning is needed, since nothing is left open."""
    acl = acl_of(net)
    assert acl.inside_registrations
    sent = net.request("REGISTER", f"sip:{DOMAIN}", ATTACKER, to=f"<sip:alice@{DOMAIN}>",
                       call_id="hijack", headers=("Expires: 600",))
    assert statuses(sent) == [403]
    assert acl.counters["acl.relay_denied"] == 1
    register_alice(net)  # from the inside


def test_no_auth_warning_when_the_proxy_has_no_users() -> None:
    """domains = [] (a firewall; the provider is the registrar): nobody can register as a
    local user, so a firewall set-up starts without that warning."""
    from types import SimpleNamespace

    from twisted.logger import globalLogPublisher

    from sipproxy.config import parse_config

    config = parse_config('[proxy]\ndomains = []\n[[listen]]\nside = "outside"\n'
                          '[plugins]\nenabled = ["acl"]\n')
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        factory.build(SimpleNamespace(config=config, clock=None, listeners=[SimpleNamespace(  # type: ignore
            side="outside")]), Section("acl", {}))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not any("auth plugin is not enabled" in formatEvent(e) for e in events)


def test_default_wildcard_inside_listener_still_protects(net: Net) -> None:
    """The default config has one "inside" listener on 0.0.0.0: a public source arriving
    there is still outside (not in inside_networks)."""
    plugin = acl_of(net)
    public_on_inside = Source("UDP", "198.51.100.66", 5060, "0.0.0.0", 5060, "inside")
    assert plugin.classify(parse_request(public_on_inside)) == "outside"
    sent = net.request("INVITE", "sip:+1900@evil.example", public_on_inside, from_user="x",
                       from_domain="evil.example", call_id="wild")
    assert statuses(sent) == [403]


def test_nat_tokens_are_resolved_here(net: Net) -> None:
    """A nat token URI names our own socket: the nat plugin decides (404 for unknown ones)."""
    plugin = acl_of(net)
    request = parse_request(ATTACKER)
    request.uri = parse_uri(f"sip:nat-0123456789abcdef@{OUTSIDE}:5060")
    assert plugin.resolved_here(request)
    request.uri = parse_uri("sip:alice@192.168.77.10:5060")  # an inside address: not ours
    assert not plugin.resolved_here(request)
