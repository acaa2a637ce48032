"""Topology hiding (``[nat] hide_topology``): no inside address in any byte the provider gets,
and what comes back mapped to what the phone sent.

The mapping functions are checked with hypothesis (out and back to the same bytes, the outside
form free of inside addresses); the plugin inside a real Proxy (tests/test_nat.py's firewall
set-up: phone 192.168.77.10 inside, provider 203.0.113.50 outside) by the bytes on the wire.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from sipproxy.addressing import in_networks
from sipproxy.config import ConfigError, Section
from sipproxy.message import Request, Response, parse_message
from sipproxy.plugins.nat import TOKEN_PREFIX, factory
from sipproxy.plugins.topology import HIDDEN_PREFIX, Hiding, TopologyHider
from sipproxy.testing import answer
from tests.nat_site import (
    FIREWALL,
    INSIDE,
    OUTSIDE,
    PHONE,
    PHONE_VIA,
    PROVIDER,
    PROVIDER_IP,
    Net,
    call_phone,
    make_net,
    phone_request,
    provider_request,
    register,
)

NETWORKS = ("192.168.77.0/24", "fd00::/8")
LAN = re.compile(rb"192\.168\.77\.\d+|fd00:|office\.lan", re.IGNORECASE)
PHONE_CALL_ID = "1-12125@192.168.77.10"
PHONE_FROM = "sipp <sip:sipp@192.168.77.10:5064>;tag=12125SIPpTag001"
PHONE2 = "sip:bob@192.168.77.11:5060"


def hider(**kw: Any) -> TopologyHider:
    networks = [ipaddress.ip_network(n) for n in NETWORKS]
    return TopologyHider(Clock(), lambda address: in_networks(address, networks),
                         names=["office.lan"], **kw)


class Tokens:
    """A stand-in for the nat plugin's token table (the plugin's own is tested end to end)."""

    def __init__(self) -> None:
        self.by_token: dict[str, str] = {}

    def tokenize(self, uri: str) -> str:
        token = f"sip:{TOKEN_PREFIX}{len(self.by_token)}@{OUTSIDE}:5060"
        self.by_token[token] = uri
        return token

    def untokenize(self, uri: str) -> str | None:
        return self.by_token.get(uri)


def no_lan(text: str | bytes) -> bool:
    return LAN.search(text if isinstance(text, bytes) else text.encode()) is None


# ------------------------------------------------------------------------------------------------
# the mapping functions (hypothesis)
# ------------------------------------------------------------------------------------------------
inside_hosts = st.one_of(
    st.integers(0, 255).map(lambda n: f"192.168.77.{n}"),
    st.integers(1, 0xFFFF).map(lambda n: f"[fd00::{n:x}]"),
    st.sampled_from(["phone1.office.lan", "office.lan", "PBX.Office.LAN"]),
)
users = st.one_of(st.none(), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
                  st.integers(0, 255).map(lambda n: f"192.168.77.{n}"))
ports = st.one_of(st.none(), st.integers(1, 65535))
displays = st.one_of(st.none(), st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}", fullmatch=True),
                     st.from_regex(r'"[A-Za-z ]{0,10}"', fullmatch=True))
tags = st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True)


@st.composite
def inside_uris(draw: st.DrawFn) -> str:
    user, host, port = draw(users), draw(inside_hosts), draw(ports)
    params = draw(st.sampled_from(["", ";transport=tcp", ";user=phone"]))
    return (f"sip:{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
            f"{params}")


@st.composite
def party_values(draw: st.DrawFn) -> str:
    uri, display, tag = draw(inside_uris()), draw(displays), draw(st.none() | tags)
    value = f"{display} <{uri}>" if display else draw(st.sampled_from([f"<{uri}>", uri]))
    if not value.endswith(">") and ";" in uri:
        value = f"<{uri}>"  # an addr-spec's own parameters would be the header's
    return value + (f";tag={tag}" if tag else "")


call_ids = st.one_of(
    st.tuples(st.from_regex(r"[A-Za-z0-9.-]{1,16}", fullmatch=True), inside_hosts)
    .map(lambda t: f"{t[0]}@{t[1]}"),
    st.from_regex(r"[A-Za-z0-9.-]{1,24}", fullmatch=True),
)


@given(value=party_values(), call_id=call_ids)
def test_from_to_map_out_without_inside_addresses_and_back_to_the_same_bytes(
    value: str, call_id: str
) -> None:
    topology = hider()
    entry = topology.hide_call_id(call_id)
    hiding = Hiding(OUTSIDE, Tokens().tokenize, entry)
    outside = topology.hide_field("from", value, hiding)
    assert outside is not None and no_lan(outside), outside
    assert topology.reveal_field("from", outside, entry, lambda u: None) == value
    assert outside.endswith(value[value.rindex(";"):]) if ";tag=" in value else True


@given(call_id=call_ids, tag_a=tags, tag_b=tags)
def test_call_id_and_replaces_map_out_and_back(call_id: str, tag_a: str, tag_b: str) -> None:
    topology = hider()
    entry = topology.hide_call_id(call_id)
    outside = topology.outside_call_id(call_id)
    assert outside.startswith(HIDDEN_PREFIX) and no_lan(outside) and outside != call_id
    assert topology.outside_call_id(call_id) == outside  # stable: REGISTER refreshes, dialogs
    revealed = topology.reveal(outside)
    assert revealed is entry and revealed.inside == call_id
    replaces = f"{call_id};to-tag={tag_a};from-tag={tag_b}"
    hidden = topology.hide_field("replaces", replaces, Hiding(OUTSIDE, Tokens().tokenize))
    assert hidden == f"{outside};to-tag={tag_a};from-tag={tag_b}"
    assert topology.reveal_field("replaces", hidden, None, lambda u: None) == replaces


@given(uri=inside_uris(), call_id=call_ids, tag_a=tags, tag_b=tags,
       display=displays)
def test_refer_to_with_replaces_maps_out_and_back(
    uri: str, call_id: str, tag_a: str, tag_b: str, display: str | None
) -> None:
    topology = hider()
    topology.hide_call_id(call_id)  # the dialog an inside phone started
    tokens = Tokens()
    escaped = re.sub(r"[^A-Za-z0-9.-]", lambda m: f"%{ord(m.group()):02X}", call_id)
    value = (f"{display + ' ' if display else ''}"
             f"<{uri}?Replaces={escaped}%3Bto-tag%3D{tag_a}%3Bfrom-tag%3D{tag_b}>")
    outside = topology.hide_field("refer-to", value, Hiding(OUTSIDE, tokens.tokenize))
    assert outside is not None and no_lan(outside), outside
    assert topology.outside_call_id(call_id) in outside
    assert topology.reveal_field("refer-to", outside, None, tokens.untokenize) == value


@given(name=st.sampled_from(["Warning", "Call-Info", "Error-Info", "P-Asserted-Identity",
                             "Reply-To", "X-Phone-Address", "Alert-Info"]),
       uri=inside_uris())
def test_other_headers_naming_the_inside_are_removed(name: str, uri: str) -> None:
    topology = hider()
    hiding = Hiding(OUTSIDE, Tokens().tokenize)
    key = name.lower()
    assert topology.hide_field(key, f"<{uri}>", hiding) is None
    assert topology.hide_field(key, "<http://www.example.com/x>", hiding) == \
        "<http://www.example.com/x>"


def test_multipart_parts_naming_the_inside_are_removed_sdp_ones_too() -> None:
    topology = hider()
    hiding = Hiding(OUTSIDE, Tokens().tokenize)
    sdp = b"v=0\r\no=- 1 1 IN IP4 192.168.77.10\r\nc=IN IP4 192.168.77.10\r\n"
    body = (b"--xx\r\nContent-Type: application/sdp\r\n\r\n" + sdp + b"\r\n"
            b"--xx\r\nContent-Type: application/pidf+xml\r\n\r\n<presence/>\r\n--xx--\r\n")
    out = topology.hide_body('multipart/mixed; boundary="xx"', body, hiding)
    assert out == (b"--xx\r\nContent-Type: application/pidf+xml\r\n\r\n<presence/>\r\n"
                   b"--xx--\r\n")
    # a plain SDP body is the media plugin's
    assert topology.hide_body("application/sdp", sdp, hiding) == sdp
    assert topology.hide_body("multipart/mixed;boundary=xx", body.replace(
        b"<presence/>", b"<presence note='192.168.77.3'/>"), hiding) is None


def test_our_own_outside_address_on_a_private_network_is_not_hidden() -> None:
    """A trunk over a carrier's private network: the outside listener's 10.97.0.1 is in the
    inside networks by its class, but it is the address that stands for the inside."""
    networks = [ipaddress.ip_network("10.0.0.0/8")]
    topology = TopologyHider(Clock(), lambda a: in_networks(a, networks))
    request = parse_message(
        b"INVITE sip:bob@10.97.0.150 SIP/2.0\r\nVia: SIP/2.0/UDP 10.97.0.1:5060;branch=z9hG4bK1\r\n"
        b"From: <sip:alice@10.20.0.5>;tag=1\r\nTo: <sip:bob@10.97.0.150>\r\nCall-ID: c1\r\n"
        b"CSeq: 1 INVITE\r\nContact: <sip:nat-1@10.97.0.1:5060>\r\n"
        b"Record-Route: <sip:10.97.0.1;lr>\r\nContent-Length: 0\r\n\r\n")
    topology.hide_message(request, Hiding("10.97.0.1", Tokens().tokenize))
    assert request.headers.get("contact") == "<sip:nat-1@10.97.0.1:5060>"
    assert request.headers.get("record-route") == "<sip:10.97.0.1;lr>"
    assert request.headers.get("from") == "<sip:alice@10.97.0.1>;tag=1"


def test_a_list_header_loses_only_its_inside_values() -> None:
    topology = hider()
    value = '<http://192.168.77.5/photo.png>;purpose=icon, <http://example.com/a>;purpose=info'
    assert topology.hide_field("call-info", value, Hiding(OUTSIDE, Tokens().tokenize)) == \
        "<http://example.com/a>;purpose=info"


def test_user_agent_passes_unless_stripped_or_it_names_the_inside() -> None:
    hiding = Hiding(OUTSIDE, Tokens().tokenize)
    assert hider().hide_field("user-agent", "Yealink T46", hiding) == "Yealink T46"
    assert hider().hide_field("user-agent", "phone at 192.168.77.3", hiding) is None
    assert hider(strip_user_agent=True).hide_field("server", "Yealink T46", hiding) is None


def test_addresses_that_look_alike_are_not_inside() -> None:
    topology = hider()
    assert not topology.leaks("192.168.7.10 10.0.0.1 1192.168.77.1x 17:14:49 fe80::1")
    assert topology.leaks("x@[fd00::a]") and topology.leaks("sip:a@192.168.77.255:5060")
    assert topology.leaks("host PHONE7.office.lan.") and not topology.leaks("backoffice.land")


def test_the_table_is_bounded_and_forgets_ended_dialogs() -> None:
    topology = hider(max_mappings=3, ttl=100.0)
    for n in range(5):
        topology.hide_call_id(f"c{n}")
    assert len(topology) == 3 and topology.reveal(topology.outside_call_id("c0")) is None
    topology.dialog_ended("c4")
    clock = topology.clock
    assert isinstance(clock, Clock)
    clock.advance(40)
    assert topology.purge() == 1 and topology.reveal(topology.outside_call_id("c4")) is None
    assert topology.reveal(topology.outside_call_id("c3")) is not None
    clock.advance(61)
    assert topology.reveal(topology.outside_call_id("c3")) is None


# ------------------------------------------------------------------------------------------------
# through the proxy
# ------------------------------------------------------------------------------------------------
def with_body(request: bytes, content_type: str, body: bytes) -> bytes:
    head = request.removesuffix(b"Content-Length: 0\r\n\r\n")
    return (head + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


MULTIPART = (
    b"--b1\r\nContent-Type: application/pidf+xml\r\n\r\n<presence entity=\"sip:a@example.com\"/>"
    b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nfrom my desk at 192.168.77.10\r\n--b1--\r\n"
)
LEAKY = (
    f"Contact: <sip:sipp@{PHONE.host}:5064>",
    "User-Agent: sipp 3.6",
    "Warning: 399 192.168.77.10 \"rtp port busy\"",
    "Call-Info: <http://192.168.77.10/photo.jpg>;purpose=icon, <http://example.com/>;purpose=info",
    "P-Asserted-Identity: <sip:sipp@192.168.77.10>",
    "Reply-To: <sip:sipp@phone7.office.lan>",
    "X-Debug: box=192.168.77.10",
    "Subject: lunch",
)


def call_out(net: Net) -> tuple[bytes, Request]:
    net.send(with_body(phone_request(
        "INVITE", "sip:bob@provider.example", "z9hG4bKth1", call_id=PHONE_CALL_ID,
        from_=PHONE_FROM, to="<sip:bob@provider.example>", headers=LEAKY,
    ), "multipart/mixed;boundary=b1", MULTIPART), PHONE)
    [(data, out)] = [(d, m) for d, m in net.new() if isinstance(m, Request)]
    return data, out


def leaky_net(**nat: Any) -> Net:
    settings: dict[str, Any] = {"inside_networks": ["192.168.77.0/24"],
                                "inside_domains": ["office.lan"], **nat}
    return make_net(nat=settings)


def test_an_outgoing_call_leaves_no_inside_byte_and_comes_back_as_the_phone_sent_it() -> None:
    net = leaky_net()
    data, out = call_out(net)
    assert no_lan(data), data.decode()
    assert out.call_id.startswith(HIDDEN_PREFIX)
    assert str(out.from_) == f"sipp <sip:sipp@{OUTSIDE}>;tag=12125SIPpTag001"
    assert out.headers.get("user-agent") == "sipp 3.6"
    assert out.headers.get_all("call-info") == ["<http://example.com/>;purpose=info"]
    assert out.headers.get("subject") == "lunch"
    for gone in ("warning", "p-asserted-identity", "reply-to", "x-debug"):
        assert gone not in out.headers
    assert b"application/pidf+xml" in out.body and b"text/plain" not in out.body

    net.new()
    net.send(answer(out, 180, "b1"), PROVIDER)
    net.send(answer(out, 200, "b1", ("Contact: <sip:bob@203.0.113.60>",)), PROVIDER)
    responses = [m for _, m in net.new()]
    assert [r.status for r in responses] == [180, 200]
    for response in responses:
        assert response.call_id == PHONE_CALL_ID
        assert response.headers.get("from") == PHONE_FROM

    # the provider hangs up: its BYE names the outside Call-ID and the outside From
    net.send(provider_request(
        "BYE", str(out.contacts[0].uri), "z9hG4bKthbye", call_id=out.call_id, cseq=3,
        from_="<sip:bob@provider.example>;tag=b1", to=str(out.from_),
    ), PROVIDER)
    [(_, bye)] = net.new()
    assert isinstance(bye, Request) and bye.method == "BYE"
    assert bye.call_id == PHONE_CALL_ID and bye.headers.get("to") == PHONE_FROM
    net.send(answer(bye, 200), PHONE)
    [(data, ok)] = net.new()
    assert isinstance(ok, Response) and ok.status == 200 and no_lan(data), data.decode()
    assert ok.call_id == out.call_id and str(ok.to) == str(out.from_)
    net.run_out()


def test_a_reinvite_from_the_provider_is_answered_with_the_outside_call_id() -> None:
    """The proxy's own 100 Trying (and the phone's answers) to the provider's re-INVITE in a
    call the phone made carry the outside Call-ID; the phone gets the inside one."""
    net = leaky_net()
    _, out = call_out(net)
    net.send(answer(out, 200, "b1", ("Contact: <sip:bob@203.0.113.60>",)), PROVIDER)
    net.new()
    before = len(net.wire.datagrams)
    net.send(provider_request(
        "INVITE", str(out.contacts[0].uri), "z9hG4bKthre", call_id=out.call_id, cseq=5,
        from_="<sip:bob@provider.example>;tag=b1", to=str(out.from_),
        headers=("Contact: <sip:bob@203.0.113.60>",),
    ), PROVIDER)
    sent = net.new()
    trying = [parse_message(data) for data, _ in net.wire.datagrams[before:]
              if data.startswith(b"SIP/2.0 100 ")]
    assert [m.call_id for m in trying] == [out.call_id]
    [reinvite] = [m for _, m in sent if isinstance(m, Request)]
    assert reinvite.call_id == PHONE_CALL_ID and reinvite.headers.get("to") == PHONE_FROM
    net.send(answer(reinvite, 200, None, (f"Contact: <sip:sipp@{PHONE.host}:5064>",)), PHONE)
    [(data, ok)] = net.new()
    assert isinstance(ok, Response) and ok.status == 200 and ok.call_id == out.call_id
    assert no_lan(data), data.decode()
    net.run_out()


def test_an_in_dialog_request_from_the_provider_reaches_the_phone_at_its_contact() -> None:
    """The provider's request to the token of the phone's Contact, in a call whose Call-ID is
    hidden, goes to the phone with the phone's own Contact as its Request-URI (the token stays
    outside), as a request in a call with an outside Call-ID does."""
    net = leaky_net()
    _, out = call_out(net)
    net.send(answer(out, 200, "b1", ("Contact: <sip:bob@203.0.113.60>",)), PROVIDER)
    net.new()
    assert out.contacts[0].uri.user.startswith(TOKEN_PREFIX)
    net.send(provider_request(
        "NOTIFY", str(out.contacts[0].uri), "z9hG4bKthnot", call_id=out.call_id, cseq=7,
        from_="<sip:bob@provider.example>;tag=b1", to=str(out.from_),
        headers=("Event: refer", "Subscription-State: active;expires=60"),
    ), PROVIDER)
    [(data, notify)] = net.new()
    assert isinstance(notify, Request) and notify.method == "NOTIFY"
    assert str(notify.uri) == f"sip:sipp@{PHONE.host}:5064", data.decode()
    assert notify.call_id == PHONE_CALL_ID
    net.run_out()


def test_the_phone_cancels_and_acks_with_the_outside_call_id() -> None:
    net = leaky_net()
    _, out = call_out(net)
    net.send(answer(out, 180, "b1"), PROVIDER)
    net.new()
    net.send(phone_request("CANCEL", "sip:bob@provider.example", "z9hG4bKth1",
                           call_id=PHONE_CALL_ID, from_=PHONE_FROM,
                           to="<sip:bob@provider.example>"), PHONE)
    [cancel] = net.requests_to(PROVIDER_IP, "CANCEL")
    assert cancel.call_id == out.call_id
    net.send(answer(cancel, 200), PROVIDER)
    net.send(answer(out, 487, "b1"), PROVIDER)
    [ack] = net.requests_to(PROVIDER_IP, "ACK")
    assert ack.call_id == out.call_id
    [final] = [r for r in net.responses_to(PHONE.host, "INVITE") if r.status == 487]
    assert final.call_id == PHONE_CALL_ID
    net.run_out()


def test_register_refreshes_keep_one_outside_call_id() -> None:
    net = leaky_net()
    seen = []
    for n in (1, 2):
        net.send(phone_request(
            "REGISTER", "sip:provider.example", f"z9hG4bKthreg{n}", call_id=PHONE_CALL_ID,
            cseq=n, from_="<sip:sipp@192.168.77.10>;tag=r1", to="<sip:sipp@192.168.77.10>",
            headers=(f"Contact: <sip:sipp@{PHONE.host}:5060>",),
        ), PHONE)
        out = net.requests_to(PROVIDER_IP, "REGISTER")[-1]
        seen.append(out.call_id)
        net.send(answer(out, 200, "p1", (f"Contact: {out.contacts[0]};expires=60",)), PROVIDER)
        ok = net.responses_to(PHONE.host, "REGISTER")[-1]
        assert ok.call_id == PHONE_CALL_ID and ok.headers.get("to", "").startswith(
            "<sip:sipp@192.168.77.10>")
    assert seen[0] == seen[1] and seen[0].startswith(HIDDEN_PREFIX)
    assert all(no_lan(data) for data, _ in net.received(PROVIDER_IP))
    net.run_out()


def test_a_sipfrag_notify_from_the_phone_is_mapped() -> None:
    net = leaky_net()
    # a phone's NOTIFY with a sipfrag naming the inside, in a dialog the phone started
    _, out = call_out(net)
    net.new()
    frag = (b"SIP/2.0 200 OK\r\nContact: <sip:bob@192.168.77.11>\r\n"
            b"Call-ID: " + PHONE_CALL_ID.encode() + b"\r\nServer: sipp\r\n")
    net.send(with_body(phone_request(
        "NOTIFY", "sip:bob@203.0.113.60", "z9hG4bKthnot", call_id=PHONE_CALL_ID, cseq=2,
        from_=PHONE_FROM, to="<sip:bob@provider.example>;tag=b1",
        headers=("Event: refer", "Subscription-State: terminated"),
    ), "message/sipfrag;version=2.0", frag), PHONE)
    [(data, notify)] = net.new()
    assert no_lan(data), data.decode()
    assert notify.call_id == out.call_id
    assert notify.body == (b"SIP/2.0 200 OK\r\nCall-ID: " + out.call_id.encode()
                           + b"\r\nServer: sipp\r\n")
    net.run_out()


def test_a_blind_transfer_to_another_inside_phone_is_tokenized_and_reaches_it() -> None:
    net = leaky_net()
    _, out = call_out(net)
    net.send(answer(out, 200, "b1", ("Contact: <sip:bob@203.0.113.60>",)), PROVIDER)
    net.new()
    replaces = "other-9%40192.168.77.11%3Bto-tag%3Dx1%3Bfrom-tag%3Dx2"
    net.send(phone_request(
        "REFER", "sip:bob@203.0.113.60", "z9hG4bKthref", call_id=PHONE_CALL_ID, cseq=2,
        from_=PHONE_FROM, to="<sip:bob@provider.example>;tag=b1",
        headers=(f"Refer-To: <{PHONE2}?Replaces={replaces}>",
                 f"Referred-By: <sip:sipp@{PHONE.host}:5064>"),
    ), PHONE)
    [(data, refer)] = net.new()
    assert no_lan(data), data.decode()
    refer_to = refer.headers.get("refer-to") or ""
    token_uri = refer_to[1:refer_to.index("?")]
    assert token_uri.startswith(f"sip:{TOKEN_PREFIX}") and f"@{OUTSIDE}:5060" in token_uri
    # the transfer target: the provider's INVITE to the token reaches bob, Replaces mapped back
    hidden = re.search(r"Replaces=([^%]+)%3B", refer_to)
    assert hidden is not None and hidden.group(1).startswith(HIDDEN_PREFIX)
    net.send(provider_request(
        "INVITE", token_uri, "z9hG4bKthxfer", call_id="xfer-1",
        from_="<sip:bob@provider.example>;tag=t1", to=f"<{token_uri}>",
        headers=(f"Replaces: {hidden.group(1)};to-tag=x1;from-tag=x2",
                 f"Referred-By: {refer.headers.get('referred-by')}"),
    ), PROVIDER)
    [invite] = net.requests_to("192.168.77.11", "INVITE", 5060)
    assert str(invite.uri) == PHONE2
    assert invite.headers.get("replaces") == "other-9@192.168.77.11;to-tag=x1;from-tag=x2"
    assert invite.headers.get("referred-by") == f"<sip:sipp@{PHONE.host}:5064>"
    net.run_out()


def test_strip_user_agent_removes_user_agent() -> None:
    net = leaky_net(strip_user_agent=True)
    _, out = call_out(net)
    assert "user-agent" not in out.headers
    net.run_out()


def test_public_proxy_mode_and_hide_topology_off_leave_the_call_id_alone() -> None:
    net = leaky_net(hide_topology=False)
    _, out = call_out(net)
    assert out.call_id == PHONE_CALL_ID and "warning" in out.headers
    net.run_out()
    public = make_net(FIREWALL.replace('side = "inside"', 'side = "outside"')
                      .replace(f'address = "{INSIDE}"\nport = 5060',
                               f'address = "{INSIDE}"\nport = 5070'))
    assert public.nat.topology is None
    public.run_out()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"hide_topology": "yes"}, "nat.hide_topology: "),
        ({"strip_user_agent": 1}, "nat.strip_user_agent: "),
        ({"inside_domains": ["bad domain"]}, "nat.inside_domains[0]: must be a domain name"),
    ],
)
def test_config_errors_name_the_key(settings: dict[str, Any], expected: str) -> None:
    net = make_net(nat={})
    with pytest.raises(ConfigError) as info:
        factory.build(net.proxy, Section("nat", settings))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value), info.value
    net.nat.stopService()


def test_phone_via_is_not_what_the_provider_sees() -> None:
    net = leaky_net()
    data, _ = call_out(net)
    assert PHONE_VIA.encode() not in data
    net.run_out()


def test_the_proxys_own_reply_to_an_in_dialog_request_from_outside_has_the_outside_call_id(
) -> None:
    """Answered without the response hooks (``Responder.reply``: no such user here): the
    answer copies the request as the provider sent it, not the context's mapped copy."""
    net = leaky_net()
    _, out = call_out(net)
    net.send(answer(out, 200, "b1", ("Contact: <sip:bob@203.0.113.60>",)), PROVIDER)
    net.new()
    net.send(provider_request(
        "INFO", f"sip:nobody@{OUTSIDE}:5060", "z9hG4bKthinfo", call_id=out.call_id, cseq=6,
        from_="<sip:bob@provider.example>;tag=b1", to=str(out.from_),
    ), PROVIDER)
    [(data, reply)] = net.new()
    assert isinstance(reply, Response) and reply.status >= 400
    assert reply.call_id == out.call_id and str(reply.to).startswith(str(out.from_))
    assert no_lan(data), data.decode()
    net.run_out()


def test_a_request_uri_naming_the_inside_leaves_as_a_token() -> None:
    topology, tokens = hider(), Tokens()
    hiding = Hiding(OUTSIDE, tokens.tokenize)
    request = parse_message(
        f"BYE {PHONE2} SIP/2.0\r\nVia: SIP/2.0/UDP {OUTSIDE};branch=z9hG4bKru\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        "Call-ID: ru-1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n".encode())
    assert isinstance(request, Request)
    topology.hide_message(request, hiding)
    assert no_lan(request.to_bytes())
    assert tokens.untokenize(str(request.uri)) == PHONE2
    # an outside one is left alone
    assert topology.hide_request_uri("sip:bob@203.0.113.60", hiding) == "sip:bob@203.0.113.60"


def test_a_sipfrag_from_the_outside_maps_back() -> None:
    """A NOTIFY for a REFER the provider got: its fragment names our outside Call-ID and
    a token; the inside phone gets its own Call-ID and the URI the token stands for."""
    topology, tokens = hider(), Tokens()
    hidden = topology.outside_call_id(PHONE_CALL_ID)
    topology.hide_call_id(PHONE_CALL_ID)
    token = tokens.tokenize(PHONE2)
    frag = (f"INVITE {token} SIP/2.0\r\nCall-ID: {hidden}\r\n"
            f"Replaces: {hidden};to-tag=a;from-tag=b\r\n").encode()
    notify = parse_message(
        f"NOTIFY sip:x@{OUTSIDE} SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.50;branch=z9hG4bKsf\r\n"
        f"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        f"Call-ID: {hidden}\r\nCSeq: 1 NOTIFY\r\nContent-Type: message/sipfrag\r\n"
        f"Content-Length: {len(frag)}\r\n\r\n".encode() + frag)
    entry = topology.reveal_message(notify, tokens.untokenize)
    assert entry is not None and notify.call_id == PHONE_CALL_ID
    assert notify.body == (f"INVITE {PHONE2} SIP/2.0\r\nCall-ID: {PHONE_CALL_ID}\r\n"
                           f"Replaces: {PHONE_CALL_ID};to-tag=a;from-tag=b\r\n").encode()


def test_a_multipart_boundary_naming_the_inside_is_replaced() -> None:
    topology = hider()
    boundary = "192.168.77.10-7f3a"
    body = (f"--{boundary}\r\nContent-Type: application/pidf+xml\r\n\r\n<presence/>\r\n"
            f"--{boundary}--\r\n").encode()
    message = parse_message(with_body(phone_request(
        "MESSAGE", "sip:bob@provider.example", "z9hG4bKmp", call_id="mp-1", from_=PHONE_FROM,
        to="<sip:bob@provider.example>"),
        f'multipart/mixed;boundary="{boundary}"', body))
    topology.hide_message(message, Hiding(OUTSIDE, Tokens().tokenize))
    content_type = message.headers.get("content-type") or ""
    assert no_lan(content_type) and no_lan(message.body), content_type
    new = content_type.split("boundary=")[1].strip('"')
    assert message.body == body.replace(boundary.encode(), new.encode())
    assert b"<presence/>" in message.body


def test_a_302_from_the_phone_names_a_token_for_the_other_phone_that_reaches_it() -> None:
    """A 3xx's Contact names whom to try next: its token leads to that Contact's own address
    (not to where the 302 came from); an outside Contact in a 3xx passes as it is."""
    net = leaky_net()
    invite = call_phone(net, register(net))
    net.new()
    net.send(answer(invite, 302, "ph1", (f"Contact: <{PHONE2}>, <sip:bob@203.0.113.60>",)),
             PHONE)
    [(data, moved)] = [(d, m) for d, m in net.new() if isinstance(m, Response)]
    assert moved.status == 302 and no_lan(data), data.decode()
    token_uri, outside = (str(c.uri) for c in moved.contacts)
    assert token_uri.startswith(f"sip:{TOKEN_PREFIX}") and f"@{OUTSIDE}:5060" in token_uri
    assert outside == "sip:bob@203.0.113.60"
    net.send(provider_request(
        "INVITE", token_uri, "z9hG4bKmv2", call_id=invite.call_id, cseq=2,
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
    ), PROVIDER)
    [followed] = net.requests_to("192.168.77.11", "INVITE", 5060)
    assert str(followed.uri) == PHONE2
    net.run_out()
