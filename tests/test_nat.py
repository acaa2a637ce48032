"""The nat plugin inside a real Proxy, judged by the bytes each side receives.

Firewall mode: listeners 192.168.77.1:5060 (inside) and 203.0.113.1:5060 (outside),
[upstream] sip:203.0.113.50:5060 (the provider). The phone is 192.168.77.10; its packets come
from port 5062 although its Via and Contact say 5060 (what rport records). Public-proxy mode:
one outside listener, phones behind someone else's NAT register for lan.example.

Everything the proxy sends is recorded as bytes by ``RecordingWire`` (the in-memory transports
of sipproxy.testing) and re-parsed here, so an assertion about "what the provider sees" is
about what would be on the wire. Timers run on a ``task.Clock``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from sipproxy.config import ConfigError, Section
from sipproxy.context import Target
from sipproxy.message import Request, Response, Source
from sipproxy.plugins.nat import (
    TOKEN_PREFIX,
    ContactMap,
    ContactMapFull,
    ContactMapping,
    factory,
)
from sipproxy.testing import answer, sip_request
from tests.nat_site import (
    FIREWALL,
    INSIDE,
    OUTSIDE,
    PHONE,
    PHONE_CONTACT,
    PHONE_VIA,
    PROVIDER,
    PROVIDER_IP,
    PUBLIC,
    REG_HEADERS,
    RR_INSIDE,
    RR_OUTSIDE,
    Net,
    assert_no_inside_address,
    call_phone,
    head,
    make_net,
    phone_request,
    provider_request,
    register,
    token_in,
    vias,
)


@pytest.fixture
def net() -> Iterator[Net]:
    n = make_net()
    yield n
    if n.nat.running:
        n.nat.stopService()


# ------------------------------------------------------------------------------------------------
# 1. REGISTER through the firewall, with a challenge
# ------------------------------------------------------------------------------------------------
def test_register_crosses_with_a_challenge_and_the_token_lives_as_long_as_the_binding(
    net: Net,
) -> None:
    net.send(phone_request(
        "REGISTER", "sip:provider.example", "z9hG4bKreg1", call_id="reg-1",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        headers=REG_HEADERS,
    ), PHONE)
    [(data, first)] = net.received(PROVIDER_IP, 5060)
    assert_no_inside_address(data)
    assert len(vias(first)) == 1 and first.top_via.host == OUTSIDE
    token = token_in(first)
    [contact] = first.contacts
    assert contact.get_param("expires") == "3600"
    assert contact.get_param("+sip.instance") == '"<urn:uuid:0001>"'
    assert contact.get_param("reg-id") == "1"
    assert first.headers.get_all("path") == [] and first.headers.get_all("route") == []

    challenge = 'Digest realm="provider.example", nonce="abc", algorithm=MD5, qop="auth"'
    net.send(answer(first, 401, "p1", (f"WWW-Authenticate: {challenge}",)), PROVIDER)
    [(data, response)] = net.received(PHONE.host, PHONE.port)
    assert response.status == 401
    assert vias(response) == [PHONE_VIA + "z9hG4bKreg1"]  # the phone's own Via, restored
    assert response.headers.get("www-authenticate") == challenge

    authorization = (
        'Digest username="alice", realm="provider.example", nonce="abc", '
        'uri="sip:provider.example", response="0123456789abcdef0123456789abcdef", '
        'algorithm=MD5, cnonce="xyz", qop=auth, nc=00000001'
    )
    net.send(phone_request(
        "REGISTER", "sip:provider.example", "z9hG4bKreg2", call_id="reg-1", cseq=2,
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        headers=(*REG_HEADERS, f"Authorization: {authorization}"),
    ), PHONE)
    data, second = net.received(PROVIDER_IP, 5060)[1]
    assert_no_inside_address(data)
    assert f"\r\nAuthorization: {authorization}\r\n".encode() in data  # byte-identical
    assert len(vias(second)) == 1
    assert token_in(second) == token  # the same binding keeps its token

    # the provider grants 600 s (the phone asked for 3600)
    net.send(answer(second, 200, "p1", (f"Contact: <sip:{token}@{OUTSIDE}:5060>;expires=600",)),
             PROVIDER)
    data, ok = net.received(PHONE.host, PHONE.port)[1]
    assert ok.status == 200
    assert vias(ok) == [PHONE_VIA + "z9hG4bKreg2"]
    [contact] = ok.contacts
    assert str(contact.uri) == PHONE_CONTACT  # the phone finds its own binding in the answer
    assert contact.get_param("expires") == "600"

    mapping = net.nat.contacts.lookup(token)
    assert mapping is not None
    assert mapping.contact == PHONE_CONTACT
    assert mapping.target == Target("UDP", PHONE.host, PHONE.port, PHONE.host)
    assert mapping.expires_at == pytest.approx(net.clock.seconds() + 660)
    net.clock.advance(650)
    assert net.nat.contacts.lookup(token) is not None
    net.clock.advance(70)  # the purge loop runs every 60 s
    assert net.nat.contacts.lookup(token) is None
    assert len(net.nat.contacts) == 0
    net.run_out()


def test_unregister_with_star_passes_unchanged(net: Net) -> None:
    net.send(phone_request(
        "REGISTER", "sip:provider.example", "z9hG4bKreg9", call_id="reg-9",
        from_="<sip:alice@provider.example>;tag=r9", to="<sip:alice@provider.example>",
        headers=("Contact: *", "Expires: 0"),
    ), PHONE)
    [(data, out)] = net.received(PROVIDER_IP)
    assert_no_inside_address(data)
    assert out.headers.get("contact") == "*"
    net.run_out()


# ------------------------------------------------------------------------------------------------
# 2. incoming call
# ------------------------------------------------------------------------------------------------
def incoming_call(net: Net) -> tuple[str, Request]:
    """Provider calls the registered phone, which answers; returns (token, INVITE at phone)."""
    token = register(net)
    invite = call_phone(net, token)
    assert net.requests_to(PHONE.host, "INVITE", 5060) == []
    assert str(invite.uri) == PHONE_CONTACT
    assert invite.headers.get_all("record-route") == [RR_INSIDE, RR_OUTSIDE]

    net.new()
    net.send(answer(invite, 180, "ph1", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    net.send(answer(invite, 200, "ph1", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    sent = net.new()
    assert [m.status for _, m in sent] == [180, 200]
    for data, response in sent:
        assert_no_inside_address(data)
        assert token_in(response) == token  # same contact, same address: same token
        assert response.headers.get_all("record-route") == [RR_OUTSIDE]
        assert vias(response) == [f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch=z9hG4bKin1"]
    assert all(m.source is None for _, m in sent)
    assert {addr for _, addr in net.wire.datagrams[-2:]} == {(PROVIDER_IP, 5060)}

    net.send(provider_request(
        "ACK", f"sip:{token}@{OUTSIDE}:5060", "z9hG4bKin2", call_id="in-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>;tag=ph1",
        headers=(f"Route: {RR_OUTSIDE}",),
    ), PROVIDER)
    [ack] = net.requests_to(PHONE.host, "ACK", PHONE.port)
    assert str(ack.uri) == PHONE_CONTACT
    return token, invite


def test_incoming_call_then_the_provider_hangs_up(net: Net) -> None:
    token, _ = incoming_call(net)
    net.new()
    net.send(provider_request(
        "BYE", f"sip:{token}@{OUTSIDE}:5060", "z9hG4bKin3", call_id="in-1", cseq=2,
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>;tag=ph1",
        headers=(f"Route: {RR_OUTSIDE}",),
    ), PROVIDER)
    [(_, bye)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert isinstance(bye, Request) and bye.method == "BYE"
    assert str(bye.uri) == PHONE_CONTACT
    assert bye.headers.get_all("route") == []
    net.send(answer(bye, 200), PHONE)
    [(data, ok)] = net.new()
    assert ok.status == 200 and net.last_to == (PROVIDER_IP, 5060)
    assert_no_inside_address(data)
    net.run_out()


def test_incoming_call_then_the_phone_hangs_up(net: Net) -> None:
    incoming_call(net)
    net.new()
    # the phone's route set is the Record-Route of the INVITE it got, in that order
    net.send(phone_request(
        "BYE", f"sip:carol@{PROVIDER_IP}:5060", "z9hG4bKbye1", call_id="in-1", cseq=1,
        from_="<sip:alice@provider.example>;tag=ph1", to="<sip:carol@provider.example>;tag=c1",
        headers=(f"Route: {RR_INSIDE}", f"Route: {RR_OUTSIDE}"),
    ), PHONE)
    [(data, bye)] = net.new()
    assert net.last_to == (PROVIDER_IP, 5060)
    assert bye.method == "BYE" and str(bye.uri) == f"sip:carol@{PROVIDER_IP}:5060"
    assert_no_inside_address(data)
    assert len(vias(bye)) == 1 and bye.headers.get_all("route") == []
    net.send(answer(bye, 200), PROVIDER)
    [(_, ok)] = net.new()
    assert ok.status == 200 and net.last_to == (PHONE.host, PHONE.port)
    assert vias(ok) == [PHONE_VIA + "z9hG4bKbye1"]
    net.run_out()


def test_retransmitted_200_from_the_phone_is_rewritten_too(net: Net) -> None:
    token, invite = incoming_call(net)
    net.new()
    net.send(answer(invite, 200, "ph1", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    for data, response in net.new():
        assert_no_inside_address(data)
        assert token_in(response) == token
    net.run_out()


def test_incoming_call_over_our_own_outgoing_connection_hides_the_phone(net: Net) -> None:
    """The provider's INVITE comes over the TLS connection the proxy opened for the REGISTER
    (its local port is no listener's): the phone's answers still carry a token Contact."""
    token = register(net)
    net.new()
    over_ours = Source("TLS", PROVIDER_IP, 5061, OUTSIDE, 43603, "outside")
    net.send(sip_request(
        "INVITE", f"sip:{token}@{OUTSIDE}:5060",
        via=f"SIP/2.0/TLS {PROVIDER_IP}:5061;branch=z9hG4bKtls1", call_id="tls-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5061;transport=tls>",),
    ), over_ours)
    [invite] = net.requests_to(PHONE.host, "INVITE", PHONE.port)
    net.new()
    net.send(answer(invite, 200, "ph1", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    [(data, ok)] = net.new()
    assert ok.status == 200 and net.last_to == (PROVIDER_IP, 5061)
    assert_no_inside_address(data)
    assert token_in(ok) == token


# ------------------------------------------------------------------------------------------------
# 3. outgoing call
# ------------------------------------------------------------------------------------------------
PROVIDER_EDGE_RR = "<sip:203.0.113.51:5060;lr>"
BOB_CONTACT = "sip:bob@203.0.113.60:5060"


def test_outgoing_call_ack_and_reinvite(net: Net) -> None:
    net.send(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKout1", call_id="out-1",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
        # the phone's outbound proxy setting: a preloaded Route to our inside address
        headers=(f"Contact: <{PHONE_CONTACT}>", f"Route: <sip:{INSIDE};lr>"),
    ), PHONE)
    [(data, out)] = net.received(PROVIDER_IP, 5060)
    assert_no_inside_address(data)
    assert len(vias(out)) == 1 and out.top_via.host == OUTSIDE
    assert out.headers.get_all("record-route") == [RR_OUTSIDE]
    token = token_in(out)
    assert str(out.uri) == "sip:bob@provider.example"
    assert out.headers.get_all("route") == []

    # the provider's edge adds its own Record-Route on top of ours
    net.new()
    net.send(answer(out, 200, "b1", (f"Contact: <{BOB_CONTACT}>",
                                     f"Record-Route: {PROVIDER_EDGE_RR}, {RR_OUTSIDE}")),
             PROVIDER)
    [(_, ok)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert ok.status == 200
    assert vias(ok) == [PHONE_VIA + "z9hG4bKout1"]
    assert ok.headers.get_all("record-route") == [PROVIDER_EDGE_RR, RR_OUTSIDE, RR_INSIDE]
    assert [str(c.uri) for c in ok.contacts] == [BOB_CONTACT]  # the far end's, untouched

    route = (f"Route: {RR_INSIDE}", f"Route: {RR_OUTSIDE}", f"Route: {PROVIDER_EDGE_RR}")
    net.send(phone_request(
        "ACK", BOB_CONTACT, "z9hG4bKout2", call_id="out-1",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>;tag=b1",
        headers=route,
    ), PHONE)
    [(data, ack)] = net.new()
    assert net.last_to == ("203.0.113.51", 5060)  # the first Route left
    assert ack.method == "ACK" and str(ack.uri) == BOB_CONTACT
    assert_no_inside_address(data)
    assert len(vias(ack)) == 1 and ack.headers.get_all("route") == [PROVIDER_EDGE_RR]

    net.send(phone_request(
        "INVITE", BOB_CONTACT, "z9hG4bKout3", call_id="out-1", cseq=2,
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>;tag=b1",
        headers=(*route, f"Contact: <{PHONE_CONTACT}>"),
    ), PHONE)
    [(data, reinvite)] = net.new()
    assert net.last_to == ("203.0.113.51", 5060)
    assert_no_inside_address(data)
    assert reinvite.method == "INVITE" and len(vias(reinvite)) == 1
    assert token_in(reinvite) == token
    assert reinvite.headers.get_all("record-route") == []
    net.send(answer(reinvite, 200, None, (f"Contact: <{BOB_CONTACT}>",)),
             Source("UDP", "203.0.113.51", 5060, OUTSIDE, 5060, "outside"))
    [(_, ok2)] = net.new()
    assert ok2.status == 200 and vias(ok2) == [PHONE_VIA + "z9hG4bKout3"]

    # the far end hangs up: its BYE uses the phone's token as Request-URI
    net.send(sip_request(
        "BYE", f"sip:{token}@{OUTSIDE}:5060", via="SIP/2.0/UDP 203.0.113.51:5060;branch=z9hG4bKe1",
        call_id="out-1", cseq=7, from_="<sip:bob@provider.example>;tag=b1",
        to="<sip:alice@provider.example>;tag=a1", headers=(f"Route: {RR_OUTSIDE}",),
    ), Source("UDP", "203.0.113.51", 5060, OUTSIDE, 5060, "outside"))
    [(_, bye)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert bye.method == "BYE" and str(bye.uri) == PHONE_CONTACT
    net.run_out()


def test_the_phone_cancels_its_call(net: Net) -> None:
    net.send(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKout1", call_id="out-2",
        from_="<sip:alice@provider.example>;tag=a2", to="<sip:bob@provider.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>",),
    ), PHONE)
    [out] = net.requests_to(PROVIDER_IP, "INVITE")
    net.new()
    net.send(answer(out, 180, "b2", record_route=True), PROVIDER)
    [(_, ringing)] = net.new()
    assert ringing.status == 180 and net.last_to == (PHONE.host, PHONE.port)
    assert ringing.headers.get_all("record-route") == [RR_OUTSIDE, RR_INSIDE]
    net.send(phone_request(
        "CANCEL", "sip:bob@provider.example", "z9hG4bKout1", call_id="out-2",
        from_="<sip:alice@provider.example>;tag=a2", to="<sip:bob@provider.example>",
    ), PHONE)
    sent = net.new()
    [(data, cancel)] = [(d, m) for d, m in sent if isinstance(m, Request)]
    assert cancel.method == "CANCEL"
    assert_no_inside_address(data)
    assert vias(cancel) == vias(out)[:1]  # it matches the INVITE the provider got
    [ok] = [m for _, m in sent if isinstance(m, Response)]
    assert ok.status == 200 and vias(ok) == [PHONE_VIA + "z9hG4bKout1"]

    net.send(answer(cancel, 200), PROVIDER)
    net.send(answer(out, 487, "b2"), PROVIDER)
    sent = net.new()
    [(data, ack)] = [(d, m) for d, m in sent if isinstance(m, Request)]
    assert ack.method == "ACK" and len(net.requests_to(PROVIDER_IP, "ACK", 5060)) == 1
    assert vias(ack) == vias(out)[:1]
    assert_no_inside_address(data)
    [terminated] = [m for _, m in sent if isinstance(m, Response)]
    assert terminated.status == 487 and vias(terminated) == [PHONE_VIA + "z9hG4bKout1"]
    net.run_out()


TWO_PROVIDERS = FIREWALL.replace(f'uri = "sip:{PROVIDER_IP}:5060"',
                                 'uri = "sip:sip.provider.example"')


def test_failover_to_the_second_provider_address_hides_the_inside_too() -> None:
    net = make_net(TWO_PROVIDERS)
    net.resolver.names["sip.provider.example"] = [
        Target("UDP", "203.0.113.50", 5060, "sip.provider.example"),
        Target("UDP", "203.0.113.52", 5060, "sip.provider.example"),
    ]
    net.send(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKout1", call_id="out-3",
        from_="<sip:alice@provider.example>;tag=a3", to="<sip:bob@provider.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>",),
    ), PHONE)
    [first] = net.requests_to("203.0.113.50", "INVITE")
    for _ in range(100):  # Timer B: 64 * T1 = 32 s without an answer
        net.clock.advance(1)
        if net.requests_to("203.0.113.52", "INVITE"):
            break
    [(data, second)] = [x for x in net.received("203.0.113.52") if x[1].method == "INVITE"]
    assert_no_inside_address(data)
    assert len(vias(second)) == 1
    assert second.headers.get_all("record-route") == [RR_OUTSIDE]
    assert token_in(second) == token_in(first)

    net.new()
    net.send(answer(second, 200, "b3", (f"Contact: <{BOB_CONTACT}>",), record_route=True),
             Source("UDP", "203.0.113.52", 5060, OUTSIDE, 5060, "outside"))
    [(_, ok)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert vias(ok) == [PHONE_VIA + "z9hG4bKout1"]
    assert ok.headers.get_all("record-route") == [RR_OUTSIDE, RR_INSIDE]
    net.run_out()


# ------------------------------------------------------------------------------------------------
# 4. the outside cannot reach inside on its own
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "headers", "status"),
    [
        ("sip:x@192.168.77.10", (), 403),
        ("sip:x@provider.example;maddr=192.168.77.10", (), 403),
        (f"sip:{TOKEN_PREFIX}00112233445566ff@{OUTSIDE}:5060", (), 404),
        ("sip:bob@provider.example", ("Route: <sip:192.168.77.10;lr>",), 403),
        ("sip:bob@provider.example", (f"Route: {RR_OUTSIDE}, {RR_INSIDE}",), 403),
    ],
)
def test_the_outside_cannot_reach_inside(
    net: Net, uri: str, headers: tuple[str, ...], status: int
) -> None:
    register(net)  # a phone is there: refusing is not for lack of one
    net.new()
    net.send(provider_request(
        "INVITE", uri, "z9hG4bKevil", call_id="evil-1",
        from_="<sip:mallory@evil.example>;tag=m1", to="<sip:x@provider.example>",
        headers=(*headers, f"Contact: <sip:mallory@{PROVIDER_IP}:5060>"),
    ), PROVIDER)
    [(data, refusal)] = net.new()
    assert refusal.status == status
    assert net.last_to == (PROVIDER_IP, 5060)
    assert_no_inside_address(data)
    net.send(provider_request(
        "ACK", uri, "z9hG4bKevil", call_id="evil-1",
        from_="<sip:mallory@evil.example>;tag=m1", to=str(refusal.to), headers=headers,
    ), PROVIDER)
    assert net.new() == []
    assert not any(h == PHONE.host for _, (h, _p) in net.wire.datagrams[2:])
    net.run_out()


def test_a_name_that_resolves_inside_is_refused_from_the_outside(net: Net) -> None:
    net.resolver.names["printer.corp.example"] = [
        Target("UDP", "192.168.77.20", 5060, "printer.corp.example")
    ]
    # with a To-tag, [upstream] is not used: the Request-URI is resolved (RFC 3261 16.6)
    net.send(provider_request(
        "OPTIONS", "sip:x@printer.corp.example", "z9hG4bKevil2", call_id="evil-2",
        from_="<sip:mallory@evil.example>;tag=m1", to="<sip:x@printer.corp.example>;tag=x",
    ), PROVIDER)
    sent = net.new()
    assert net.nothing_inside(), sent
    assert [m.status for _, m in sent] == [403]
    net.run_out()


def test_a_stray_ack_to_an_unknown_token_is_dropped(net: Net) -> None:
    net.send(provider_request(
        "ACK", f"sip:{TOKEN_PREFIX}0011223344556677@{OUTSIDE}:5060", "z9hG4bKack",
        call_id="x-1", from_="<sip:m@evil.example>;tag=m", to="<sip:x@evil.example>;tag=x",
    ), PROVIDER)
    assert net.wire.datagrams == []
    net.run_out()


@pytest.mark.parametrize(
    "below",
    [
        f"SIP/2.0/UDP {PHONE.host}:5060;branch=z9hG4bKx",
        f"SIP/2.0/UDP {PROVIDER_IP}:5070;received={PHONE.host};branch=z9hG4bKx",
        "SIP/2.0/UDP 203.0.113.60:5060;branch=z9hG4bKx",
    ],
    ids=["inside-via", "inside-received", "outside-via"],
)
def test_a_stray_response_from_the_outside_goes_nowhere(net: Net, below: str) -> None:
    """A forged 2xx with our Via on top and another below (no transaction matches it) is
    dropped, whichever side the Via below names (RFC 6026 7.3)."""
    net.send(
        f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {OUTSIDE}:5060;branch=z9hG4bKnone, {below}\r\n"
        "From: <sip:m@evil.example>;tag=m\r\nTo: <sip:x@evil.example>;tag=x\r\n"
        "Call-ID: stray-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        PROVIDER,
    )
    assert net.wire.datagrams == []
    assert net.proxy.refusals.counters["stray_response"] == 1
    net.run_out()


# ------------------------------------------------------------------------------------------------
# 5. external address
# ------------------------------------------------------------------------------------------------
def test_external_address_is_what_the_outside_sees() -> None:
    external = "198.51.100.7"
    net = make_net(nat={"inside_networks": ["192.168.77.0/24"], "external_address": external})
    net.send(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKout1", call_id="out-1",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>",),
    ), PHONE)
    [(data, out)] = net.received(PROVIDER_IP)
    assert_no_inside_address(data)
    assert out.top_via.host == external and out.top_via.port == 5060
    assert out.headers.get_all("record-route") == [f"<sip:{external}:5060;lr>"]
    token = token_in(out, host=external)
    assert OUTSIDE.encode() not in head(data)

    # and what comes back to that address finds the phone
    net.send(provider_request(
        "INVITE", f"sip:{token}@{external}:5060", "z9hG4bKin1", call_id="in-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",),
    ), PROVIDER)
    [invite] = net.requests_to(PHONE.host, "INVITE", PHONE.port)
    assert str(invite.uri) == PHONE_CONTACT
    assert invite.headers.get_all("record-route") == [RR_INSIDE, f"<sip:{external}:5060;lr>"]
    net.run_out()


def test_a_wildcard_outside_listener_advertises_the_real_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = FIREWALL.replace(f'address = "{OUTSIDE}"\nport = 5060',
                            'address = "0.0.0.0"\nport = 5070')
    net = make_net(text)
    # what the kernel would pick toward the outside (the real one sends no packet either), as
    # the proxy's addresses read it (the transports' side rules read ``looked_up``)
    monkeypatch.setattr(net.proxy.addresses.sources, "source_for", lambda remote: OUTSIDE)
    provider = Source("UDP", PROVIDER_IP, 5060, "0.0.0.0", 5070, "outside")
    net.send(phone_request(
        "REGISTER", "sip:provider.example", "z9hG4bKreg1", call_id="reg-1",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        headers=REG_HEADERS,
    ), PHONE)
    [(data, reg)] = net.received(PROVIDER_IP)
    assert b"0.0.0.0" not in head(data)
    assert (reg.top_via.host, reg.top_via.port) == (OUTSIDE, 5070)
    contact = reg.contacts[0].uri
    assert (contact.host, contact.port) == (OUTSIDE, 5070)
    token = contact.user

    net.send(provider_request(
        "INVITE", f"sip:{token}@{OUTSIDE}:5070", "z9hG4bKin1", call_id="in-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",),
    ), provider)
    [invite] = net.requests_to(PHONE.host, "INVITE", PHONE.port)
    assert invite.headers.get_all("record-route") == [RR_INSIDE, f"<sip:{OUTSIDE}:5070;lr>"]
    net.new()
    net.send(answer(invite, 200, "ph1", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    [(data, ok)] = net.new()
    assert b"0.0.0.0" not in head(data)
    contact = ok.contacts[0].uri
    assert (contact.user, contact.host, contact.port) == (token, OUTSIDE, 5070)
    net.run_out()


# ------------------------------------------------------------------------------------------------
# 6. public-proxy mode
# ------------------------------------------------------------------------------------------------
NATTED = Source("UDP", "198.51.100.2", 40000, OUTSIDE, 5060, "outside")
CALLER = Source("UDP", "198.51.100.9", 5060, OUTSIDE, 5060, "outside")


def public_register(net: Net) -> None:
    net.send(sip_request(
        "REGISTER", "sip:lan.example", via="SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKr1",
        call_id="reg-a", from_="<sip:alice@lan.example>;tag=r", to="<sip:alice@lan.example>",
        headers=("Contact: <sip:alice@10.0.0.5:5060>", "Expires: 3600"),
    ), NATTED)
    [ok] = net.responses_to(NATTED.host, "REGISTER", NATTED.port)
    assert ok.status == 200
    assert len(net.location.lookup("sip:alice@lan.example")) == 1


def test_public_proxy_reaches_the_phone_where_its_register_came_from() -> None:
    net = make_net(PUBLIC)
    public_register(net)
    net.send(sip_request(
        "INVITE", "sip:alice@lan.example", via="SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKc1",
        call_id="c1", from_="<sip:dave@example.org>;tag=d", to="<sip:alice@lan.example>",
        headers=("Contact: <sip:dave@198.51.100.9:5060>",),
    ), CALLER)
    assert net.requests_to("10.0.0.5", "INVITE") == []
    [invite] = net.requests_to(NATTED.host, "INVITE", NATTED.port)
    assert str(invite.uri) == "sip:alice@10.0.0.5:5060"

    net.new()
    net.send(answer(invite, 200, "al", ("Contact: <sip:alice@10.0.0.5:5060>",),
                    record_route=True), NATTED)
    [(data, ok)] = net.new()
    assert net.last_to == (CALLER.host, CALLER.port)
    token = token_in(ok)
    assert b"10.0.0.5" not in head(data)

    # the caller's BYE to the token reaches the phone through its NAT
    net.send(sip_request(
        "BYE", f"sip:{token}@{OUTSIDE}:5060", via="SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKc2",
        call_id="c1", cseq=2, from_="<sip:dave@example.org>;tag=d",
        to="<sip:alice@lan.example>;tag=al", headers=(f"Route: {RR_OUTSIDE}",),
    ), CALLER)
    [(_, bye)] = net.new()
    assert net.last_to == (NATTED.host, NATTED.port)
    assert bye.method == "BYE" and str(bye.uri) == "sip:alice@10.0.0.5:5060"
    net.run_out()


def test_public_proxy_keepalives_keep_an_answering_binding() -> None:
    net = make_net(PUBLIC)
    public_register(net)
    for round_ in range(3):
        net.new()
        net.clock.advance(20)
        [(_, ping)] = net.new()
        assert net.last_to == (NATTED.host, NATTED.port)
        assert ping.method == "OPTIONS"
        net.send(answer(ping, 200, f"k{round_}"), NATTED)
    assert len(net.location.lookup("sip:alice@lan.example")) == 1
    assert len(net.nat.watched) == 1
    net.run_out()


def test_public_proxy_keepalives_remove_a_silent_binding() -> None:
    net = make_net(PUBLIC)
    public_register(net)
    pings: set[str] = set()
    for _ in range(200):  # bounded: 2 failures take about 2 * 32 s (Timer F) plus intervals
        net.clock.advance(1)
        pings |= {m.call_id for m in net.requests_to(NATTED.host, "OPTIONS")}
        if not net.location.lookup("sip:alice@lan.example"):
            break
    assert net.location.lookup("sip:alice@lan.example") == []
    assert net.nat.watched == {}
    assert len(pings) == 2  # keepalive_failures
    net.run_out()


def test_public_proxy_leaves_a_binding_that_is_not_natted_alone() -> None:
    net = make_net(PUBLIC)
    net.send(sip_request(
        "REGISTER", "sip:lan.example", via="SIP/2.0/UDP 198.51.100.3:5060;branch=z9hG4bKr2",
        call_id="reg-b", from_="<sip:bob@lan.example>;tag=r", to="<sip:bob@lan.example>",
        headers=("Contact: <sip:bob@198.51.100.3:5060>", "Expires: 3600"),
    ), Source("UDP", "198.51.100.3", 5060, OUTSIDE, 5060, "outside"))
    assert net.nat.watched == {}
    net.clock.advance(60)
    assert net.requests_to("198.51.100.3", "OPTIONS") == []
    net.run_out()


def test_public_proxy_reaches_a_contact_on_another_host_where_its_register_came_from() -> None:
    """Issue 11 (audit): a Contact naming a third host with the port the REGISTER came from
    (the attacker sends from 5060 and names the victim's 5060) was called there, not at the
    source: a registered user could point its calls (7 INVITEs each until Timer B, per
    binding) at anyone. Now it is reached, and kept alive, where it registered from."""
    net = make_net(PUBLIC)
    attacker = Source("UDP", "198.51.100.66", 5060, OUTSIDE, 5060, "outside")
    net.send(sip_request(
        "REGISTER", "sip:lan.example", via="SIP/2.0/UDP 198.51.100.66:5060;branch=z9hG4bKr3",
        call_id="reg-m", from_="<sip:alice@lan.example>;tag=r", to="<sip:alice@lan.example>",
        headers=("Contact: <sip:m@203.0.113.99:5060>, "
                 "<sip:m@198.51.100.66:5060;maddr=203.0.113.99>", "Expires: 3600"),
    ), attacker)
    net.send(sip_request(
        "INVITE", "sip:alice@lan.example", via="SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKc9",
        call_id="c9", from_="<sip:dave@example.org>;tag=d", to="<sip:alice@lan.example>",
        headers=("Contact: <sip:dave@198.51.100.9:5060>",),
    ), CALLER)
    assert net.requests_to("203.0.113.99", "INVITE") == []
    invites = net.requests_to(attacker.host, "INVITE", attacker.port)
    assert sorted(str(i.uri) for i in invites) == [
        "sip:m@198.51.100.66:5060;maddr=203.0.113.99", "sip:m@203.0.113.99:5060"]
    net.clock.advance(20)
    assert net.requests_to("203.0.113.99", "OPTIONS") == []
    assert len(net.requests_to(attacker.host, "OPTIONS", attacker.port)) == 2
    # an ACK to the user (no dialog: forwarded statelessly) goes there too
    net.send(sip_request(
        "ACK", "sip:alice@lan.example", via="SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKa9",
        call_id="a9", from_="<sip:dave@example.org>;tag=d", to="<sip:alice@lan.example>;tag=a",
    ), CALLER)
    assert net.requests_to("203.0.113.99", "ACK") == []
    assert len(net.requests_to(attacker.host, "ACK", attacker.port)) == 1


# without auth, a remote phone may register from the outside only from a trusted network
FIREWALL_WITH_DOMAIN = FIREWALL.replace("domains = []", 'domains = ["lan.example"]') + (
    '\n[acl]\ntrusted = ["198.51.100.2"]\n')


def test_firewall_with_a_remote_phone_behind_a_home_nat() -> None:
    """A local user registered from the outside with a private Contact (10.0.0.5): calls from
    the LAN reach it where its REGISTER came from, with nothing of the inside in them."""
    net = make_net(FIREWALL_WITH_DOMAIN)
    public_register(net)
    net.new()
    net.send(phone_request(
        "INVITE", "sip:alice@lan.example", "z9hG4bKrw1", call_id="rw-1",
        from_="<sip:bob@lan.example>;tag=b", to="<sip:alice@lan.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>",),
    ), PHONE)
    [(data, invite)] = net.new()
    assert net.last_to == (NATTED.host, NATTED.port)
    assert str(invite.uri) == "sip:alice@10.0.0.5:5060"
    assert_no_inside_address(data)
    assert len(vias(invite)) == 1 and invite.top_via.host == OUTSIDE
    assert invite.headers.get_all("record-route") == [RR_OUTSIDE]
    token = token_in(invite)

    net.send(answer(invite, 200, "al", ("Contact: <sip:alice@10.0.0.5:5060>",),
                    record_route=True), NATTED)
    [(_, ok)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert ok.headers.get_all("record-route") == [RR_OUTSIDE, RR_INSIDE]
    remote = ok.contacts[0].uri
    assert remote.user is not None and remote.user.startswith(TOKEN_PREFIX)
    assert remote.host == INSIDE  # the phone reaches the remote one through the proxy

    # an in-dialog request from the LAN phone, by its route set and the remote's token
    net.send(phone_request(
        "INFO", str(remote), "z9hG4bKrw3", call_id="rw-1", cseq=2,
        from_="<sip:bob@lan.example>;tag=b", to="<sip:alice@lan.example>;tag=al",
        headers=(f"Route: {RR_INSIDE}, {RR_OUTSIDE}",),
    ), PHONE)
    [(data, info)] = net.new()
    assert net.last_to == (NATTED.host, NATTED.port)
    assert info.method == "INFO" and str(info.uri) == "sip:alice@10.0.0.5:5060"
    assert_no_inside_address(data)
    net.send(answer(info, 200), NATTED)
    assert [m.status for _, m in net.new()] == [200]

    # the remote phone hangs up: its BYE goes to the LAN phone's token
    net.send(sip_request(
        "BYE", f"sip:{token}@{OUTSIDE}:5060",
        via="SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKrw2",
        call_id="rw-1", cseq=1, from_="<sip:alice@lan.example>;tag=al",
        to="<sip:bob@lan.example>;tag=b", headers=(f"Route: {RR_OUTSIDE}",),
    ), NATTED)
    [(_, bye)] = net.new()
    assert net.last_to == (PHONE.host, PHONE.port)
    assert bye.method == "BYE" and str(bye.uri) == PHONE_CONTACT
    net.run_out()


def test_firewall_with_a_domain_outside_caller_reaches_a_lan_phone() -> None:
    """A local user registered from the LAN: the binding, not the caller, leads inside."""
    net = make_net(FIREWALL_WITH_DOMAIN)
    net.send(phone_request(
        "REGISTER", "sip:lan.example", "z9hG4bKr5", call_id="reg-5",
        from_="<sip:alice@lan.example>;tag=r5", to="<sip:alice@lan.example>",
        headers=(f"Contact: <{PHONE_CONTACT}>", "Expires: 3600"),
    ), PHONE)
    assert [m.status for _, m in net.new()] == [200]
    assert net.nat.watched == {}  # on the LAN: no keepalives

    net.send(provider_request(
        "INVITE", "sip:alice@lan.example", "z9hG4bKc5", call_id="c5",
        from_="<sip:carol@provider.example>;tag=c5", to="<sip:alice@lan.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",),
    ), PROVIDER)
    [(_, invite)] = net.new()
    assert net.last_to == (PHONE.host, 5060)  # its Contact: on the LAN there is no NAT
    assert invite.headers.get_all("record-route") == [RR_INSIDE, RR_OUTSIDE]
    net.send(answer(invite, 200, "al5", (f"Contact: <{PHONE_CONTACT}>",), record_route=True),
             PHONE)
    [(data, ok)] = net.new()
    assert_no_inside_address(data)
    token = token_in(ok)
    net.send(provider_request(
        "BYE", f"sip:{token}@{OUTSIDE}:5060", "z9hG4bKc6", call_id="c5", cseq=2,
        from_="<sip:carol@provider.example>;tag=c5", to="<sip:alice@lan.example>;tag=al5",
        headers=(f"Route: {RR_OUTSIDE}",),
    ), PROVIDER)
    [(_, bye)] = net.new()
    assert bye.method == "BYE" and net.last_to == (PHONE.host, PHONE.port)
    net.run_out()


# ------------------------------------------------------------------------------------------------
# 7. configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"inside_networks": ["192.168.77.0/33"]}, "nat.inside_networks[0]: "),
        ({"inside_networks": ["10.0.0.0/8", "lan"]}, "nat.inside_networks[1]: "),
        ({"inside_networks": []}, "nat.inside_networks: "),
        ({"inside_networks": "192.168.0.0/16"}, "nat.inside_networks: "),
        ({"external_address": "fw.example"}, "nat.external_address: "),
        ({"external_address": "198.51.100.7/32"}, "nat.external_address: "),
        ({"keepalive": 30}, "nat.keepalive: unknown key"),
        ({"mapping_ttl": 1}, "nat.mapping_ttl: "),
        ({"keepalive_failures": 0}, "nat.keepalive_failures: "),
        ({"keepalive_method": "PING"}, "nat.keepalive_method: "),
        ({"max_mappings": 0}, "nat.max_mappings: must be an integer from 1 to 10000000, got 0"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(
    settings: dict[str, Any], expected: str
) -> None:
    net = make_net(nat={})
    with pytest.raises(ConfigError) as info:
        factory.build(net.proxy, Section("nat", settings))
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    net.nat.stopService()


def test_config_error_through_the_config_file() -> None:
    text = FIREWALL.replace('inside_networks = ["192.168.77.0/24"]',
                            'inside_networks = ["192.168.77.0/24"]\nexternal_address = "x"')
    with pytest.raises(ConfigError) as info:
        make_net(text)
    assert "nat.external_address: must be an IP address" in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# the token table is bounded
# ------------------------------------------------------------------------------------------------
def _target(n: int) -> Target:
    return Target("UDP", f"198.51.100.{n}", 5060, f"198.51.100.{n}")


def test_a_full_contact_map_forgets_the_least_recently_used_call_mapping() -> None:
    clock = Clock()
    evicted: list[ContactMapping] = []
    contacts = ContactMap(clock, max_mappings=3, on_evict=evicted.append)
    a, b, c = (contacts.token_for(f"sip:x@10.0.0.{n}", _target(n), 7200) for n in (1, 2, 3))
    assert contacts.lookup(a.token) is a  # used: now b is the least recently used
    d = contacts.token_for("sip:x@10.0.0.4", _target(4), 7200)
    assert evicted == [b] and len(contacts) == 3
    assert contacts.lookup(b.token) is None
    assert [contacts.lookup(m.token) for m in (a, c, d)] == [a, c, d]
    # the same Contact and address again: the same mapping, nothing evicted
    assert contacts.token_for("sip:x@10.0.0.4", _target(4), 7200) is d
    assert len(evicted) == 1


def test_registration_mappings_are_never_evicted() -> None:
    clock = Clock()
    contacts = ContactMap(clock, max_mappings=2)
    r1 = contacts.token_for("sip:a@10.0.0.1", _target(1), 3600, registration=True)
    call = contacts.token_for("sip:b@10.0.0.2", _target(2), 7200)
    # a call's mapping the same phone later registers with becomes a registration's
    assert contacts.token_for("sip:b@10.0.0.2", _target(2), 3600, registration=True) is call
    with pytest.raises(ContactMapFull):
        contacts.token_for("sip:c@10.0.0.3", _target(3), 7200)
    assert [contacts.lookup(m.token) for m in (r1, call)] == [r1, call]
    # expired ones are purged, and room comes back
    contacts.set_ttl(r1.token, 0)
    clock.advance(1)
    assert contacts.purge() == 1
    contacts.token_for("sip:c@10.0.0.3", _target(3), 7200)
    assert len(contacts) == 2


def test_calls_that_need_a_mapping_get_503_when_registrations_fill_the_table() -> None:
    net = make_net(nat={"inside_networks": ["192.168.77.0/24"], "max_mappings": 1})
    register(net)  # the phone's registration holds the only mapping
    net.new()
    net.send(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKfull1", call_id="full-1",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
        headers=("Contact: <sip:alice@192.168.77.10:5070>",),
    ), PHONE)
    assert net.requests_to(PROVIDER_IP, "INVITE") == []
    [(_, refused)] = net.new()
    # the branch's 503 reaches the caller as 500 (RFC 3261 16.7 step 6), reason and wait kept
    assert (refused.status, refused.reason) == (500, "Too Many NAT Mappings")
    assert refused.headers.get("Retry-After") == "30"
    assert net.nat.counters["nat.full"] == 1
    net.run_out()


def test_calls_from_the_outside_evict_old_call_mappings_not_the_registration() -> None:
    net = make_net(nat={"inside_networks": ["192.168.77.0/24"], "max_mappings": 2})
    token = register(net)
    for n in range(3):  # each call from the phone needs a mapping for its Contact
        net.send(phone_request(
            "INVITE", "sip:bob@provider.example", f"z9hG4bKev{n}", call_id=f"ev-{n}",
            from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
            headers=(f"Contact: <sip:alice@192.168.77.10:{5070 + n}>",),
        ), PHONE)
    assert len(net.requests_to(PROVIDER_IP, "INVITE")) == 3
    assert net.nat.counters["nat.evicted"] == 2 and len(net.nat.contacts) == 2
    assert net.nat.contacts.lookup(token) is not None
