"""
Topology hiding end to end (``[nat] hide_topology``, on in firewall mode): the proxy in ``fw``
with examples/firewall.toml's nat and media plugins, sipp as the phone (192.168.77.10) and as
the provider (203.0.113.50), every frame on fw's outside veth captured.

The phone registers (with a challenge), calls and is called, and sends a MESSAGE with a
multipart body and a NOTIFY with a ``message/sipfrag`` body, both naming its address in places
no one else rewrites (Call-ID, From, Warning, a text part, the fragment's Contact). Two calls
with audio through the relay (sipp playing G.711 from a pcap, the far end echoing it) where
first the phone, then the provider holds (re-INVITE a=sendonly) and resumes. Two redirections:
the provider answers the phone's INVITE 302 naming another provider address, and the phone
answers the provider's INVITE 302 naming another inside phone (192.168.77.10:5070); each
caller follows the Contact it got. Not one byte of what leaves on the outside names an inside
address; the phone gets its own Call-ID and From back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sipproxy.message import Request, Response, parse_message
from sipproxy.plugins.nat import TOKEN_PREFIX
from sipproxy.plugins.topology import HIDDEN_PREFIX
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    NatNet,
)
from tests.integration.support.relays import MIN_AFTER_RESUME, PCAP, start_media_call
from tests.integration.support.rtp import is_rtp
from tests.integration.support.sites import (
    SIP,
    SIPP_TIMEOUT,
    Site,
    describe_packets,
    firewall_site,
    incoming_call,
    inside_on_the_outside,
    outgoing_call,
    pair,
    register_with_challenge,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]

PHONE_PORT = 5062
#: the other inside phone the phone's 302 names (same host, another port)
OTHER_PHONE = f"sip:bob@{PHONE_IP}:5070"
#: the other provider address the provider's 302 names
MOVED_TO = f"sip:carol@{PROVIDER_IP}:{SIP}"
MULTIPART = (
    b"--b1\r\nContent-Type: text/plain\r\n\r\nsent from 192.168.77.10\r\n"
    b"--b1\r\nContent-Type: application/pidf+xml\r\n\r\n"
    b"<presence entity=\"sip:alice@provider.example\"/>\r\n--b1--\r\n"
)
SIPFRAG = b"SIP/2.0 200 OK\r\nContact: <sip:bob@192.168.77.11:5060>\r\n"


def phone_request(method: str, uri: str, call_id: str, to_tag: str | None,
                  content_type: str, body: bytes, extra: tuple[str, ...] = ()) -> bytes:
    via = f"SIP/2.0/UDP {PHONE_IP}:{PHONE_PORT};rport;branch=z9hG4bK{uuid.uuid4().hex[:12]}"
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70",
             f"From: <sip:alice@{PHONE_IP}:{PHONE_PORT}>;tag=ph{method[:3]}",
             f"To: <sip:bob@provider.example>{f';tag={to_tag}' if to_tag else ''}",
             f"Call-ID: {call_id}", f"CSeq: 1 {method}",
             f"Contact: <sip:alice@{PHONE_IP}:{PHONE_PORT}>",
             f"Warning: 399 {PHONE_IP} \"from the phone\"", *extra,
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ok_for(data: bytes) -> bytes:
    """The provider's 200 to a request it got (Vias, From, To, Call-ID, CSeq copied)."""
    request = parse_message(data)
    assert isinstance(request, Request)
    response = request.make_response(200)
    if not response.to.tag:
        response.headers.set("To", f"{response.headers.get('to')};tag=prov1")
    return response.to_bytes()


def exchange(net: NatNet, request: bytes) -> tuple[bytes, bytes]:
    """The phone sends ``request`` through the firewall; the provider answers it 200. What
    the provider got and what the phone got back (bounded waits)."""
    phone, provider = net.phone.socket(), net.provider.socket()
    try:
        phone.bind((PHONE_IP, PHONE_PORT))
        provider.bind((PROVIDER_IP, SIP))
        phone.settimeout(5.0)
        provider.settimeout(5.0)
        phone.sendto(request, (FW_INSIDE, SIP))
        got = provider.recv(65535)
        provider.sendto(ok_for(got), (FW_OUTSIDE, SIP))
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            back = phone.recv(65535)
            if not back.startswith(b"SIP/2.0 100 "):
                return got, back
        raise AssertionError("no final response reached the phone")
    finally:
        phone.close()
        provider.close()


def provider_redirects(site: Site) -> Any:
    """The provider answers the phone's INVITE 302 (Contact: another provider address); the
    phone's next INVITE goes there and is answered."""
    uas = site.provider.start_uas("uas_redirect.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                  keys={"contact": MOVED_TO}, variables={"answer": "1"})
    uac = site.phone.start_uac("uac_redirected.xml", (FW_INSIDE, SIP), local_port=SIP,
                               count=1, timeout=SIPP_TIMEOUT,
                               keys={"ruri": "sip:bob@provider.example"})
    return pair(uas, uac)


def phone_redirects(site: Site, token: str) -> Any:
    """The phone answers the provider's INVITE 302 naming another inside phone; the provider
    follows the Contact it got (a token) and reaches that phone."""
    other = site.phone.start_uas("uas_rr.xml", 5070, count=1, timeout=SIPP_TIMEOUT)
    uas = site.phone.start_uas("uas_redirect.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                               keys={"contact": OTHER_PHONE})
    uac = site.provider.start_uac("uac_redirected.xml", (FW_OUTSIDE, SIP), count=1,
                                  timeout=SIPP_TIMEOUT,
                                  keys={"ruri": f"sip:{token}@{FW_OUTSIDE}:{SIP}"})
    server, client = pair(uas, uac)
    site.results["other phone"] = (other.wait(10), client)
    return server, client


@dataclass
class Run:
    site: Site
    #: what the provider got and what the phone got back, by name
    exchanges: dict[str, tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def run(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Registration, a call each way, a multipart MESSAGE and a sipfrag NOTIFY, captured."""
    exchanges: dict[str, tuple[bytes, bytes]] = {}
    with firewall_site(tmp_path_factory.mktemp("topology")) as site:
        site.results["register"] = register_with_challenge(site, "provider.example")
        token = token_seen_by_provider(site)
        site.results["incoming"] = incoming_call(site, token, "uas_rr.xml", "uac_rr.xml")
        site.results["outgoing"] = outgoing_call(site, "uac_rr.xml", "uas_rr.xml")
        if PCAP.exists():
            site.results["phone holds"] = pair(*start_media_call(site))
            site.results["provider holds"] = pair(*start_media_call(site, token))
        site.results["provider redirects"] = provider_redirects(site)
        site.results["phone redirects"] = phone_redirects(site, token)
        exchanges.update({
            "message": exchange(site.net, phone_request(
                "MESSAGE", "sip:bob@provider.example", f"msg-1@{PHONE_IP}", None,
                "multipart/mixed;boundary=b1", MULTIPART)),
            "notify": exchange(site.net, phone_request(
                "NOTIFY", f"sip:bob@{PROVIDER_IP}:{SIP}", f"xfer-1@{PHONE_IP}", "b1",
                "message/sipfrag;version=2.0", SIPFRAG,
                ("Event: refer", "Subscription-State: terminated;reason=noresource"))),
        })
        site.capture.settle()
    yield Run(site, exchanges)


@pytest.mark.parametrize("name", [
    "register", "incoming", "outgoing", "phone holds", "provider holds", "provider redirects",
    "phone redirects", "other phone"])
def test_registration_and_calls_complete(run: Run, name: str) -> None:
    site = run.site
    if name not in site.results:
        pytest.skip(f"{PCAP} is missing (Debian package sip-tester)")
    server, client = site.results[name]
    assert client.ok(1), f"{client.describe()}\n{site.logs()}"
    assert server.ok(1), f"{server.describe()}\n{site.logs()}"


def test_no_byte_on_the_outside_names_an_inside_address(run: Run) -> None:
    """Every frame on fw's outside veth: its addresses, and its payload grepped for
    192.168.77.x as text (Call-ID, From, Warning, bodies...)."""
    site = run.site
    messages = site.outside()
    methods = {m.method for _, m in messages if isinstance(m, Request)}
    assert {"REGISTER", "INVITE", "ACK", "BYE", "MESSAGE", "NOTIFY"} <= methods, \
        describe_packets(messages)
    assert [m for _, m in messages if isinstance(m, Response) and m.status == 302]
    assert not inside_on_the_outside(site), "\n\n".join(inside_on_the_outside(site)[:5])
    # the Call-IDs the phone (sipp: "N-PID@192.168.77.10") made were replaced, not cut
    phone_made = [m for p, m in messages if p.dst == PROVIDER_IP and isinstance(m, Request)
                  and m.method in ("REGISTER", "MESSAGE")]
    assert phone_made and all(m.call_id.startswith(HIDDEN_PREFIX) for m in phone_made)


def test_the_multipart_message_keeps_its_clean_part_and_maps_back(run: Run) -> None:
    got, back = run.exchanges["message"]
    request = parse_message(got)
    assert isinstance(request, Request) and request.method == "MESSAGE"
    assert b"application/pidf+xml" in request.body and b"text/plain" not in request.body
    assert "warning" not in request.headers
    response = parse_message(back)
    assert isinstance(response, Response) and response.status == 200
    assert response.call_id == f"msg-1@{PHONE_IP}"
    assert response.headers.get("from") == f"<sip:alice@{PHONE_IP}:{PHONE_PORT}>;tag=phMES"


def test_the_sipfrag_notify_is_mapped(run: Run) -> None:
    got, back = run.exchanges["notify"]
    request = parse_message(got)
    assert isinstance(request, Request) and request.method == "NOTIFY"
    assert request.call_id.startswith(HIDDEN_PREFIX)
    assert request.body == b"SIP/2.0 200 OK\r\n"
    response = parse_message(back)
    assert isinstance(response, Response) and response.status == 200
    assert response.call_id == f"xfer-1@{PHONE_IP}"


def resume_to_bye(messages: list[tuple[Any, Request | Response]], provider_calls: bool
                  ) -> tuple[float, float]:
    """When the resume's ACK (CSeq 3) and then the BYE of a media call crossed the outside."""
    acks = [p.time for p, m in messages if isinstance(m, Request) and m.method == "ACK"
            and m.cseq.number == 3 and (p.src == PROVIDER_IP) == provider_calls]
    assert acks, describe_packets(messages)
    byes = [p.time for p, m in messages if isinstance(m, Request) and m.method == "BYE"
            and p.time > acks[0]]
    assert byes, describe_packets(messages)
    return acks[0], byes[0]


@pytest.mark.parametrize("provider_calls", [False, True], ids=["phone holds", "provider holds"])
def test_hold_and_resume_cross_hidden_and_audio_flows_through_the_relay(
        run: Run, provider_calls: bool) -> None:
    """The hold re-INVITE (a=sendonly) of each side crossed the outside link; after the
    resume, RTP flows both ways there between the relay (fw's outside address) and the
    provider."""
    site = run.site
    if "phone holds" not in site.results:
        pytest.skip(f"{PCAP} is missing (Debian package sip-tester)")
    messages = site.outside()
    holds = [p for p, m in messages if isinstance(m, Request) and m.method == "INVITE"
             and b"a=sendonly" in m.body and (p.src == PROVIDER_IP) == provider_calls]
    assert holds, describe_packets(messages)
    start, end = resume_to_bye(messages, provider_calls)
    rtp = [p for p in site.capture.on(site.net.wan_if)
           if is_rtp(p) and start < p.time < end]
    to_provider = [p for p in rtp if p.dst == PROVIDER_IP and p.src == FW_OUTSIDE]
    from_provider = [p for p in rtp if p.src == PROVIDER_IP and p.dst == FW_OUTSIDE]
    counts = (len(to_provider), len(from_provider))
    assert min(counts) >= MIN_AFTER_RESUME, (counts, site.logs())


def test_a_302_from_the_phone_names_a_token_that_reaches_the_other_phone(run: Run) -> None:
    """The Contact of the phone's 302 is a nat- token at fw's outside address on the outside;
    the provider's INVITE to it reached 192.168.77.10:5070 (its sipp answered: see
    test_registration_and_calls_complete[other phone])."""
    site = run.site
    redirects = [m for p, m in site.outside() if isinstance(m, Response) and m.status == 302
                 and p.dst == PROVIDER_IP]
    assert redirects, describe_packets(site.outside())
    for response in redirects:
        [contact] = response.contacts
        assert contact.uri.user and contact.uri.user.startswith(TOKEN_PREFIX), str(contact)
        assert contact.uri.host == FW_OUTSIDE, str(contact)
    followed = [m for p, m in site.lan() if isinstance(m, Request) and m.method == "INVITE"
                and p.dst == PHONE_IP and p.dport == 5070]
    assert followed and str(followed[0].uri) == OTHER_PHONE, describe_packets(site.lan())


def test_a_302_from_the_provider_reaches_the_phone_as_it_was_sent(run: Run) -> None:
    """An outside Contact in the provider's 302 is no inside address: the phone gets it as
    it is and its next INVITE, to it, reaches the provider."""
    site = run.site
    redirects = [m for p, m in site.lan() if isinstance(m, Response) and m.status == 302
                 and p.dst == PHONE_IP]
    assert redirects and str(redirects[0].contacts[0].uri) == MOVED_TO, \
        describe_packets(site.lan())
    followed = [m for p, m in site.outside() if isinstance(m, Request) and m.method == "INVITE"
                and p.dst == PROVIDER_IP and m.uri.user == "carol"]
    assert followed, describe_packets(site.outside())
