"""The nat plugin inside a real Proxy with in-memory transports (see tests/test_proxy.py).

Firewall mode: inside listener 192.168.1.1, outside 203.0.113.10, [upstream] provider.example;
the phone is 192.168.1.20 and its packets arrive from port 5062 (what rport records) although
its Via and Contact say 5060.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from sipproxy.config import ConfigError, Section
from sipproxy.dns import Target
from sipproxy.headers import canonical
from sipproxy.message import Request, Response, Source
from sipproxy.plugins.nat import TOKEN_PREFIX, NatPlugin, factory
from tests.test_proxy import (
    INSIDE,
    OUTSIDE,
    PROVIDER,
    PROVIDER_SOURCE,
    Harness,
    make_harness,
    request,
)

PHONE = Source("UDP", "192.168.1.20", 5062, INSIDE, 5060, "inside")
PHONE_CONTACT = "sip:alice@192.168.1.20:5060"
LAN_ADDRESS = re.compile(rb"192\.168\.\d+\.\d+")
ADDRESS_HEADERS = ("via", "contact", "record-route", "route", "path")


def nat_harness(**settings: Any) -> tuple[Harness, NatPlugin]:
    h = make_harness()
    section = {"inside_networks": ["192.168.0.0/16"], **settings}
    plugin = factory.build(h.proxy, Section("nat", section))
    h.proxy.set_plugins([plugin])
    plugin.startService()
    return h, plugin


def leaks_inside(message: Request | Response) -> list[str]:
    """Header lines that tell the far side an inside address."""
    return [
        f"{name}: {value}" for name, value in message.headers
        if canonical(name) in ADDRESS_HEADERS and LAN_ADDRESS.search(value.encode())
    ]


def phone_request(method: str, uri: str, **kw: Any) -> str:
    branch = kw.pop("branch", "z9hG4bKph1")
    kw.setdefault("via", f"Via: SIP/2.0/UDP 192.168.1.20:5060;branch={branch};rport")
    kw.setdefault("to", "<sip:bob@provider.example>")
    kw.setdefault("from_", "<sip:alice@provider.example>;tag=ph")
    return request(method, uri, **kw)


def outside(h: Harness, method: str) -> list[Request]:
    return [r for r, t in h.transports.requests if r.method == method and t.host == PROVIDER.host]


def token_of(message: Request | Response) -> str:
    uri = message.contacts[0].uri
    assert uri.user is not None and uri.user.startswith(TOKEN_PREFIX), str(uri)
    assert (uri.host, uri.port) == (OUTSIDE, 5060)
    return uri.user


# ------------------------------------------------------------------------------------------------
def test_register_goes_out_with_no_inside_address_and_comes_back_whole() -> None:
    h, plugin = nat_harness()
    h.receive(phone_request(
        "REGISTER", "sip:provider.example", to="<sip:alice@provider.example>",
        from_="<sip:alice@provider.example>;tag=r1",
        extra=f"Contact: <{PHONE_CONTACT}>;expires=600;+sip.instance=\"<urn:uuid:1>\"",
    ), PHONE)
    [out] = outside(h, "REGISTER")
    assert leaks_inside(out) == []
    assert len(out.vias) == 1 and out.vias[0].host == OUTSIDE
    token = token_of(out)
    assert out.contacts[0].get_param("expires") == "600"
    assert out.contacts[0].get_param("+sip.instance") == '"<urn:uuid:1>"'

    h.respond(out, 401, source=PROVIDER_SOURCE,
              extra='WWW-Authenticate: Digest realm="provider.example", nonce="n1"')
    [challenge] = h.replies(401)
    assert [v.host for v in challenge.vias] == ["192.168.1.20"]  # the phone's Via is back
    challenge_value = 'Digest realm="provider.example", nonce="n1"'
    assert challenge.headers.get("www-authenticate") == challenge_value

    authorization = 'Digest username="alice", realm="provider.example", nonce="n1", response="x"'
    h.receive(phone_request(
        "REGISTER", "sip:provider.example", to="<sip:alice@provider.example>",
        from_="<sip:alice@provider.example>;tag=r1", cseq=2, branch="z9hG4bKph2",
        extra=f"Contact: <{PHONE_CONTACT}>;expires=600\r\nAuthorization: {authorization}",
    ), PHONE)
    second = outside(h, "REGISTER")[1]
    assert second.headers.get("authorization") == authorization  # credentials go out unchanged
    assert token_of(second) == token  # the same binding keeps its token
    ok = second.make_response(200)
    ok.headers.set("Contact", f"<sip:{token}@{OUTSIDE}:5060>;expires=600")
    ok_bytes = ok.to_bytes().replace(b"To: <sip:alice@provider.example>",
                                     b"To: <sip:alice@provider.example>;tag=p", 1)
    h.receive(ok_bytes, PROVIDER_SOURCE)
    assert h.replies(200)[-1].vias[0].host == "192.168.1.20"
    mapping = plugin.contacts.lookup(token)
    assert mapping is not None and mapping.target == Target("UDP", "192.168.1.20", 5062,
                                                            "192.168.1.20")
    h.clock.advance(700)
    plugin.contacts.purge()
    assert plugin.contacts.lookup(token) is None  # gone with the registration
    plugin.stopService()
    h.assert_no_leaks()


def _registered(h: Harness) -> str:
    h.receive(phone_request(
        "REGISTER", "sip:provider.example", to="<sip:alice@provider.example>",
        from_="<sip:alice@provider.example>;tag=r1", extra=f"Contact: <{PHONE_CONTACT}>",
    ), PHONE)
    [out] = outside(h, "REGISTER")
    return token_of(out)


def test_incoming_call_reaches_the_phone_and_in_dialog_requests_cross_both_ways() -> None:
    h, plugin = nat_harness()
    token = _registered(h)
    h.receive(request(
        "INVITE", f"sip:{token}@{OUTSIDE}:5060", call_id="in-1", branch="z9hG4bKprov1",
        via=f"Via: SIP/2.0/UDP {PROVIDER.host}:{PROVIDER.port};branch=z9hG4bKprov1",
        to="<sip:alice@provider.example>", from_="<sip:carol@provider.example>;tag=c1",
        extra=f"Contact: <sip:carol@{PROVIDER.host}:{PROVIDER.port}>",
    ), PROVIDER_SOURCE)
    [invite] = h.sent("INVITE")
    assert h.target_of(invite) == Target("UDP", "192.168.1.20", 5062, "192.168.1.20")
    assert str(invite.uri) == PHONE_CONTACT
    record_route = invite.headers.get_all("record-route")
    assert len(record_route) == 2  # inside-facing on top for the phone, outside below

    ringing = h.respond(invite, 180, to_tag="ph2", source=PHONE)
    ok = invite.make_response(200)
    ok.headers.add("Contact", f"<{PHONE_CONTACT}>")
    for value in record_route:
        ok.headers.add("Record-Route", value)
    data = ok.to_bytes().replace(b"To: <sip:alice@provider.example>",
                                 b"To: <sip:alice@provider.example>;tag=ph2", 1)
    h.receive(data, PHONE)
    assert ringing is not None
    finals = [r for r in h.replies(200) if r.cseq.method == "INVITE"]
    assert finals, h.statuses()
    answer = finals[-1]
    assert leaks_inside(answer) == []
    callee_token = token_of(answer)

    # the provider's BYE: Route = the proxy's outside entry, R-URI = the phone's token
    outside_rr = [v for v in answer.headers.get_all("record-route") if OUTSIDE in v]
    assert outside_rr
    h.receive(request(
        "BYE", f"sip:{callee_token}@{OUTSIDE}:5060", call_id="in-1", cseq=2,
        branch="z9hG4bKprov2",
        via=f"Via: SIP/2.0/UDP {PROVIDER.host}:{PROVIDER.port};branch=z9hG4bKprov2",
        to="<sip:alice@provider.example>;tag=ph2",
        from_="<sip:carol@provider.example>;tag=c1", extra=f"Route: {outside_rr[0]}",
    ), PROVIDER_SOURCE)
    [bye] = h.sent("BYE")
    assert h.target_of(bye).host == "192.168.1.20" and h.target_of(bye).port == 5062
    plugin.stopService()


def test_outgoing_call_hides_the_inside_and_restores_record_route_for_the_phone() -> None:
    h, plugin = nat_harness()
    h.receive(phone_request(
        "INVITE", "sip:bob@provider.example", call_id="out-1",
        extra=f"Contact: <{PHONE_CONTACT}>",
    ), PHONE)
    [out] = outside(h, "INVITE")
    assert leaks_inside(out) == []
    assert len(out.vias) == 1
    rr = out.headers.get_all("record-route")
    assert len(rr) == 1 and OUTSIDE in rr[0]
    token = token_of(out)

    ok = out.make_response(200)
    ok.headers.add("Contact", f"<sip:bob@{PROVIDER.host}:{PROVIDER.port}>")
    ok.headers.add("Record-Route", f"<sip:{PROVIDER.host}:{PROVIDER.port};lr>")
    ok.headers.add("Record-Route", rr[0])
    data = ok.to_bytes().replace(b"To: <sip:bob@provider.example>",
                                 b"To: <sip:bob@provider.example>;tag=b1", 1)
    h.receive(data, PROVIDER_SOURCE)
    answer = [r for r in h.replies(200) if r.cseq.method == "INVITE"][-1]
    assert [v.host for v in answer.vias] == ["192.168.1.20"]
    got = answer.headers.get_all("record-route")
    assert len(got) == 3 and OUTSIDE in got[1] and INSIDE in got[2]  # ours, in order

    h.receive(phone_request(
        "ACK", f"sip:bob@{PROVIDER.host}:{PROVIDER.port}", call_id="out-1",
        branch="z9hG4bKph3", to="<sip:bob@provider.example>;tag=b1",
        extra=f"Route: {got[2]}, {got[1]}, {got[0]}",
    ), PHONE)
    [ack] = outside(h, "ACK")
    assert leaks_inside(ack) == [] and len(ack.vias) == 1

    h.receive(phone_request(
        "INVITE", f"sip:bob@{PROVIDER.host}:{PROVIDER.port}", call_id="out-1", cseq=2,
        branch="z9hG4bKph4", to="<sip:bob@provider.example>;tag=b1",
        extra=f"Contact: <{PHONE_CONTACT}>\r\nRoute: {got[2]}, {got[1]}, {got[0]}",
    ), PHONE)
    reinvite = outside(h, "INVITE")[-1]
    assert token_of(reinvite) == token  # same contact, same address: same token
    plugin.stopService()


@pytest.mark.parametrize(
    ("uri", "extra", "status"),
    [
        ("sip:x@192.168.1.20:5060", "", 403),
        (f"sip:{TOKEN_PREFIX}0000000000000000@{OUTSIDE}:5060", "", 404),
        ("sip:x@provider.example", "Route: <sip:192.168.1.99;lr>", 403),
    ],
)
def test_the_outside_cannot_reach_inside_on_its_own(uri: str, extra: str, status: int) -> None:
    h, plugin = nat_harness()
    h.receive(request(
        "INVITE", uri, branch="z9hG4bKevil",
        via=f"Via: SIP/2.0/UDP {PROVIDER.host}:{PROVIDER.port};branch=z9hG4bKevil",
        extra=extra,
    ), PROVIDER_SOURCE)
    assert h.sent("INVITE") == []
    assert h.finals() == [status]
    plugin.stopService()


def test_external_address_is_what_the_outside_sees() -> None:
    h, plugin = nat_harness(external_address="198.51.100.77")
    h.receive(phone_request("INVITE", "sip:bob@provider.example",
                            extra=f"Contact: <{PHONE_CONTACT}>"), PHONE)
    [out] = outside(h, "INVITE")
    assert out.vias[0].host == "198.51.100.77"
    assert "198.51.100.77" in out.headers.get_all("record-route")[0]
    assert out.contacts[0].uri.host == "198.51.100.77"
    plugin.stopService()


PUBLIC = """
[proxy]
domains = ["lan.example"]

[[listen]]
side = "outside"
transport = "udp"
address = "203.0.113.10"
port = 5060
"""


def test_public_proxy_reaches_natted_phone_and_keeps_it_alive() -> None:
    h = make_harness(PUBLIC)
    plugin = factory.build(h.proxy, Section("nat", {"keepalive_interval": 20,
                                                    "keepalive_failures": 2}))
    h.proxy.set_plugins([plugin])
    plugin.startService()
    natted = Source("UDP", "198.51.100.2", 40000, OUTSIDE, 5060, "outside")
    h.receive(request(
        "REGISTER", "sip:lan.example", call_id="reg-a", to="<sip:alice@lan.example>",
        from_="<sip:alice@lan.example>;tag=r", branch="z9hG4bKrega",
        via="Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKrega;rport",
        extra="Contact: <sip:alice@10.0.0.5:5060>\r\nExpires: 3600",
    ), natted)
    assert h.replies(200)

    caller = Source("UDP", "198.51.100.9", 5060, OUTSIDE, 5060, "outside")
    h.receive(request(
        "INVITE", "sip:alice@lan.example", call_id="c1", branch="z9hG4bKcaller",
        via="Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKcaller",
        to="<sip:alice@lan.example>", from_="<sip:dave@example.org>;tag=d",
    ), caller)
    [invite] = h.sent("INVITE")
    assert (h.target_of(invite).host, h.target_of(invite).port) == ("198.51.100.2", 40000)

    h.clock.advance(20)  # keepalive
    [ping] = h.sent("OPTIONS")
    assert (h.target_of(ping).host, h.target_of(ping).port) == ("198.51.100.2", 40000)
    h.respond(ping, 200, source=natted)
    assert len(plugin.watched) == 1
    # then the phone goes silent: two unanswered keepalives remove the binding
    for _ in range(2):
        h.clock.advance(20)
        h.clock.pump([1.0] * 40)
    assert h.location.lookup("sip:alice@lan.example") == []
    plugin.stopService()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"inside_networks": ["lan"]}, "nat.inside_networks[0]: must be a network"),
        ({"external_address": "fw.example"}, "nat.external_address: must be an IP address"),
        ({"keepalive": 5}, "nat.keepalive: unknown key"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, Any], message: str) -> None:
    h = make_harness()
    with pytest.raises(ConfigError) as info:
        factory.build(h.proxy, Section("nat", settings))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
