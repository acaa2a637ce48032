"""
Topology hiding end to end (``[nat] hide_topology``, on in firewall mode): the proxy in ``fw``
with examples/firewall.toml's nat and media plugins, sipp as the phone (192.168.77.10) and as
the provider (203.0.113.50), every frame on fw's outside veth captured.

The phone registers (with a challenge), calls and is called, and sends a MESSAGE with a
multipart body and a NOTIFY with a ``message/sipfrag`` body, both naming its address in places
no one else rewrites (Call-ID, From, Warning, a text part, the fragment's Contact). Not one
byte of what leaves on the outside names an inside address; the phone gets its own Call-ID and
From back.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sipproxy.message import Request, Response, parse_message
from sipproxy.plugins.topology import HIDDEN_PREFIX
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    NatNet,
    inside,
)
from tests.integration.support.sites import (
    PASSWORD,
    REGISTER_KEYS,
    SIP,
    SIPP_TIMEOUT,
    USER,
    Site,
    describe_packets,
    firewall_example,
    incoming_call,
    outgoing_call,
    pair,
    start_site,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]

LAN_TEXT = re.compile(rb"192\.168\.77\.\d{1,3}")
PHONE_PORT = 5062
MULTIPART = (
    b"--b1\r\nContent-Type: text/plain\r\n\r\nsent from 192.168.77.10\r\n"
    b"--b1\r\nContent-Type: application/pidf+xml\r\n\r\n"
    b"<presence entity=\"sip:alice@provider.example\"/>\r\n--b1--\r\n"
)
SIPFRAG = b"SIP/2.0 200 OK\r\nContact: <sip:bob@192.168.77.11:5060>\r\n"


def register_with_challenge(site: Site) -> Any:
    """sites.register_with_challenge, but sipp's digest ``uri`` is the Request-URI (as phones
    make it; sipp's default is the address it sends to, the proxy's inside one)."""
    uas = site.provider.start_uas("uas_register_auth.xml", SIP, count=1, timeout=SIPP_TIMEOUT)
    uac = site.phone.start_uac(
        "register_auth.xml", (FW_INSIDE, SIP), local_port=SIP, count=1, timeout=SIPP_TIMEOUT,
        keys=REGISTER_KEYS, variables={"contact": REGISTER_KEYS["contact"]},
        extra_args=["-au", USER, "-ap", PASSWORD, "-auth_uri", "provider.example"],
    )
    return pair(uas, uac)


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


@dataclass
class Run:
    site: Site
    #: what the provider got and what the phone got back, by name
    exchanges: dict[str, tuple[bytes, bytes]]


@pytest.fixture(scope="module")
def run(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Registration, a call each way, a multipart MESSAGE and a sipfrag NOTIFY, captured."""
    net = NatNet.build()
    try:
        site = start_site(net, tmp_path_factory.mktemp("topology"), firewall_example())
        exchanges: dict[str, tuple[bytes, bytes]] = {}
        try:
            site.results["register"] = register_with_challenge(site)
            token = token_seen_by_provider(site)
            site.results["incoming"] = incoming_call(site, token, "uas_rr.xml", "uac_rr.xml")
            site.results["outgoing"] = outgoing_call(site, "uac_rr.xml", "uas_rr.xml")
            exchanges.update({
                "message": exchange(net, phone_request(
                    "MESSAGE", "sip:bob@provider.example", f"msg-1@{PHONE_IP}", None,
                    "multipart/mixed;boundary=b1", MULTIPART)),
                "notify": exchange(net, phone_request(
                    "NOTIFY", f"sip:bob@{PROVIDER_IP}:{SIP}", f"xfer-1@{PHONE_IP}", "b1",
                    "message/sipfrag;version=2.0", SIPFRAG,
                    ("Event: refer", "Subscription-State: terminated;reason=noresource"))),
            })
            site.capture.settle()
        finally:
            site.stop()
    finally:
        net.close()
    yield Run(site, exchanges)


@pytest.mark.parametrize("name", ["register", "incoming", "outgoing"])
def test_registration_and_calls_complete(run: Run, name: str) -> None:
    site = run.site
    server, client = site.results[name]
    assert client.ok(1), f"{client.describe()}\n{site.logs()}"
    assert server.ok(1), f"{server.describe()}\n{site.logs()}"


def test_no_byte_on_the_outside_names_an_inside_address(run: Run) -> None:
    """Every frame on fw's outside veth: its addresses, and its payload grepped for
    192.168.77.x as text (Call-ID, From, Warning, bodies...)."""
    site = run.site
    frames = site.capture.on(site.net.wan_if)
    messages = site.outside()
    methods = {m.method for _, m in messages if isinstance(m, Request)}
    assert {"REGISTER", "INVITE", "ACK", "BYE", "MESSAGE", "NOTIFY"} <= methods, \
        describe_packets(messages)
    for frame in frames:
        assert not inside(frame.src) and not inside(frame.dst), frame
        found = LAN_TEXT.findall(frame.payload)
        assert not found, (found, frame.payload.decode(errors="replace"))
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
