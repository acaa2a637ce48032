"""
The nat plugin end to end, across a real NAT: network namespaces, veth pairs, nftables
masquerading, the real proxy process and real sipp (tests/integration/support/netns.py).

Firewall mode: the proxy runs in ``fw`` (inside 192.168.77.1, outside 203.0.113.1), the phone
(sipp in ``phone``, 192.168.77.10) registers with the provider (sipp in ``provider``,
203.0.113.50) through it and calls both ways. Packet captures on both of fw's veths show what
each side really got.

Public-proxy mode: the proxy runs on the provider's public address, the phone behind fw's
masquerading registers with its private Contact; keepalives hold the NAT mapping open
(conntrack's UDP timeout is cut to a few seconds), and a phone that stops answering loses its
binding.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipproxy.message import Request, Response
from sipproxy.plugins.nat import TOKEN_PREFIX
from sipproxy.testing import sip_request
from tests.integration.support.harness import SippResult
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    NAT_PORTS,
    PHONE_IP,
    PROVIDER_IP,
    RTP_PORTS,
    NatNet,
    Packet,
    inside,
)
from tests.integration.support.sites import (
    PHONE_CONTACT,
    SIP,
    SIPP_TIMEOUT,
    USER,
    Site,
    describe_packets,
    firewall_config,
    incoming_call,
    inside_addresses,
    outgoing_call,
    pair,
    register_with_challenge,
    start_site,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]


def key_of(message: Request | Response) -> tuple[str, int, str]:
    """One transaction's messages on both sides: the From tag (the Call-ID of a call the
    phone made is another one outside: hide_topology)."""
    return (message.from_.tag or "", message.cseq.number, message.cseq.method)


# ------------------------------------------------------------------------------------------------
# the harness: what the topology promises (later tests rely on it)
# ------------------------------------------------------------------------------------------------


def test_the_topology_is_a_real_nat(nat_net: NatNet) -> None:
    """The phone reaches the outside masqueraded (fw's address, a mapped port) and gets the
    answer back; forwarded UDP to the RTP range is dropped; the provider has no way in."""
    phone = nat_net.phone.socket()
    provider = nat_net.provider.socket()
    rtp = nat_net.provider.socket()
    try:
        phone.bind((PHONE_IP, 5062))
        provider.bind((PROVIDER_IP, 5090))
        rtp.bind((PROVIDER_IP, RTP_PORTS[0]))
        for s in (phone, provider, rtp):
            s.settimeout(1.0)
        phone.sendto(b"hello", (PROVIDER_IP, 5090))
        data, (host, port) = provider.recvfrom(100)
        assert data == b"hello" and host == FW_OUTSIDE and NAT_PORTS[0] <= port <= NAT_PORTS[1]
        provider.sendto(b"back", (host, port))
        assert phone.recvfrom(100) == (b"back", (PROVIDER_IP, 5090))

        phone.sendto(b"rtp", (PROVIDER_IP, RTP_PORTS[0]))
        with pytest.raises(TimeoutError):
            rtp.recvfrom(100)
        with pytest.raises(OSError):  # ENETUNREACH: no route to the LAN
            provider.sendto(b"in?", (PHONE_IP, 5062))
    finally:
        for s in (phone, provider, rtp):
            s.close()


# ------------------------------------------------------------------------------------------------
# firewall mode: one registration and four calls, judged by the tests below
# ------------------------------------------------------------------------------------------------

CALLS = {
    # name: (direction, phone's scenario, provider's scenario)
    "incoming-provider-hangs-up": ("in", "uas_rr.xml", "uac_rr.xml"),
    "incoming-phone-hangs-up": ("in", "uas_bye.xml", "uac_waitbye.xml"),
    "outgoing-phone-hangs-up": ("out", "uac_rr.xml", "uas_rr.xml"),
    "outgoing-provider-hangs-up": ("out", "uac_waitbye.xml", "uas_bye.xml"),
}


@pytest.fixture(scope="module")
def firewall(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Registration with a challenge, then the four calls of CALLS, all captured on fw; the
    tests below judge the sipp results and the captures (everything is stopped by then)."""
    net = NatNet.build()
    try:
        site = start_site(net, tmp_path_factory.mktemp("firewall"), firewall_config())
        try:
            site.results["register"] = register_with_challenge(site)
            token = token_seen_by_provider(site)
            for name, (direction, phone, provider) in CALLS.items():
                if direction == "in":
                    site.results[name] = incoming_call(site, token, phone, provider)
                else:
                    site.results[name] = outgoing_call(site, phone, provider)
            site.capture.settle()
        finally:
            site.stop()
    finally:
        net.close()
    yield site


def test_register_through_the_firewall_with_a_challenge(firewall: Site) -> None:
    """The phone's REGISTER is challenged by the provider (401), registers with its digest,
    and finds its own Contact in the 200; the provider got the Authorization intact."""
    server, client = firewall.results["register"]
    assert client.ok(1), f"{client.describe()}\n{firewall.logs()}"
    assert server.ok(1), f"{server.describe()}\n{firewall.logs()}"
    outside = [m for p, m in firewall.outside()
               if isinstance(m, Request) and m.method == "REGISTER" and p.dst == PROVIDER_IP]
    assert ["authorization" in m.headers for m in outside] == [False, True]
    lan_answers = [m.status for p, m in firewall.lan()
                   if isinstance(m, Response) and m.cseq.method == "REGISTER"
                   and p.dst == PHONE_IP and m.status >= 200]
    assert lan_answers == [401, 200]


@pytest.mark.parametrize("name", list(CALLS))
def test_calls_through_the_firewall(firewall: Site, name: str) -> None:
    """Each call is set up and ended with an in-dialog BYE, on both sides."""
    server, client = firewall.results[name]
    assert client.ok(1), f"{client.describe()}\n{firewall.logs()}"
    assert server.ok(1), f"{server.describe()}\n{firewall.logs()}"


def test_no_inside_address_leaves_on_the_outside(firewall: Site) -> None:
    """On fw's outside veth: no SIP message names an inside host in Via, Contact,
    Record-Route, Route or Path, and no packet carries an inside IP address."""
    outside = firewall.outside()
    methods = {m.method for _, m in outside if isinstance(m, Request)}
    assert {"REGISTER", "INVITE", "ACK", "BYE"} <= methods, describe_packets(outside)
    assert sum(1 for _, m in outside if isinstance(m, Request) and m.method == "INVITE") >= 4
    leaks = [(p, m, inside_addresses(m)) for p, m in outside if inside_addresses(m)]
    assert not leaks, "\n\n".join(
        f"{p.src}:{p.sport} -> {p.dst}:{p.dport}: {found}\n{p.payload.decode(errors='replace')}"
        for p, _m, found in leaks[:3]
    )
    for packet in firewall.capture.on(firewall.net.wan_if):
        assert not inside(packet.src) and not inside(packet.dst), packet
    # what the provider got from the proxy stays in the dialog: our outside Record-Route
    invites = [m for p, m in outside if isinstance(m, Request) and m.method == "INVITE"
               and p.dst == PROVIDER_IP]
    assert invites
    for invite in invites:
        assert [str(a.uri) for a in invite.name_addrs("record-route")] == \
            [f"sip:{FW_OUTSIDE}:{SIP};lr"]
        assert len(invite.vias) == 1 and invite.vias[0].host == FW_OUTSIDE


def test_every_request_from_the_provider_reaches_the_phone(firewall: Site) -> None:
    """Every request the provider sent (incoming calls' INVITE, ACK, BYE; the BYE of a call
    the phone made) reached the phone, as did every response to the phone's requests."""
    outside, lan = firewall.outside(), firewall.lan()
    from_provider = [m for p, m in outside if p.src == PROVIDER_IP and p.dst == FW_OUTSIDE]
    to_phone = [m for p, m in lan if p.dst == PHONE_IP]
    requests_at_phone = {(key_of(m), m.method) for m in to_phone if isinstance(m, Request)}
    responses_at_phone = {(key_of(m), m.status) for m in to_phone if isinstance(m, Response)}

    requests = [m for m in from_provider if isinstance(m, Request)]
    assert {m.method for m in requests} >= {"INVITE", "ACK", "BYE"}
    # it hung up one incoming and one outgoing call
    assert sum(1 for m in requests if m.method == "BYE") >= 2
    assert sum(1 for m in requests if m.method == "INVITE") >= 2
    missing = [m for m in requests if (key_of(m), m.method) not in requests_at_phone]
    assert not missing, f"{[m.start_line() for m in missing]}\n{describe_packets(lan)}"

    # 100 Trying is hop by hop: the proxy sends its own
    responses = [m for m in from_provider if isinstance(m, Response) and m.status > 100]
    assert {m.status for m in responses} >= {180, 200, 401}
    missing_responses = [m for m in responses if (key_of(m), m.status) not in responses_at_phone]
    assert not missing_responses, [m.start_line() for m in missing_responses]


# ------------------------------------------------------------------------------------------------
# the outside cannot reach the inside
# ------------------------------------------------------------------------------------------------


def _probe(call_id: str, method: str, uri: str, *, headers: tuple[str, ...] = (),
           to_tag: str | None = None, port: int = 5099) -> bytes:
    return sip_request(
        method, uri, call_id=call_id,
        via=f"SIP/2.0/UDP {PROVIDER_IP}:{port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport",
        from_=f"<sip:mallory@{PROVIDER_IP}>;tag=m{call_id[:6]}",
        to=f"<sip:x@provider.example>{f';tag={to_tag}' if to_tag else ''}",
        headers=(f"Contact: <sip:mallory@{PROVIDER_IP}:{port}>", *headers))


def test_the_outside_cannot_reach_the_inside(nat_net: NatNet, tmp_path: Path) -> None:
    """Requests from the outside to inside hosts or unknown tokens, stray responses, junk and
    stray UDP to the firewall: the proxy refuses what it can answer, and not one packet goes to
    the phone; the phone's real token still reaches it afterwards."""
    site = start_site(nat_net, tmp_path, firewall_config())
    try:
        server, client = register_with_challenge(site)
        assert client.ok(1) and server.ok(1), f"{client.describe()}\n{site.logs()}"
        token = token_seen_by_provider(site)
        phone = site.phone.start_uas("uas_rr.xml", SIP, count=1, timeout=SIPP_TIMEOUT)
        site.capture.settle()
        attack_start = time.monotonic()

        unknown = f"{TOKEN_PREFIX}00112233445566ff"
        # what the proxy must refuse itself: (what, Call-ID, message, acceptable statuses)
        refused: list[tuple[str, str, bytes, set[int]]] = [
            ("to an inside host", "a1", _probe("a1", "INVITE", f"sip:x@{PHONE_IP}"), {403}),
            ("maddr inside", "a2",
             _probe("a2", "INVITE", f"sip:x@provider.example;maddr={PHONE_IP}"), {403}),
            ("unknown token", "a3",
             _probe("a3", "INVITE", f"sip:{unknown}@{FW_OUTSIDE}:{SIP}"), {404}),
            ("Route inside", "a4", _probe("a4", "INVITE", "sip:bob@provider.example",
                                          headers=(f"Route: <sip:{PHONE_IP};lr>",)), {403}),
            ("our Route, then inside", "a5", _probe(
                "a5", "INVITE", "sip:bob@provider.example",
                headers=(f"Route: <sip:{FW_OUTSIDE}:{SIP};lr>, <sip:{FW_INSIDE}:{SIP};lr>",)),
             {403}),
            ("in-dialog to an inside host", "a6",
             _probe("a6", "BYE", f"sip:x@{PHONE_IP}:{SIP}", to_tag="t6"), {403}),
            ("OPTIONS to the proxy's inside address", "a7",
             _probe("a7", "OPTIONS", f"sip:x@{FW_INSIDE}:{SIP}", to_tag="t7"), {403}),
            ("malformed Via", "a8", _probe("a8", "INVITE", "sip:bob@provider.example").replace(
                b"Via: SIP/2.0/UDP", b"Via: SIP/2.0/UDP ,;;", 1), {400}),
        ]
        silent: dict[str, bytes] = {
            "stray ACK to an unknown token": _probe("s1", "ACK", f"sip:{unknown}@{FW_OUTSIDE}"),
            "stray response via the phone": (
                f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {FW_OUTSIDE}:{SIP};branch=z9hG4bKnope,"
                f" SIP/2.0/UDP {PHONE_IP}:{SIP};branch=z9hG4bKx\r\n"
                "From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: s2\r\n"
                "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode(),
            "junk": b"\x00\x01\x02 not SIP at all \xff\r\n\r\n",
            "truncated": b"INVITE sip:x@" + PHONE_IP.encode() + b" SIP/2.0\r\nVia: SIP/2.0/UDP",
            "keepalive CRLF": b"\r\n\r\n",
        }
        sock = nat_net.provider.socket()
        try:
            sock.bind((PROVIDER_IP, 5099))
            sock.settimeout(0.2)
            for _name, _call_id, data, _statuses in refused:
                sock.sendto(data, (FW_OUTSIDE, SIP))
            for data in silent.values():
                sock.sendto(data, (FW_OUTSIDE, SIP))
            # stray UDP to the firewall's masqueraded ports and to the RTP range
            for port in (*range(NAT_PORTS[0], NAT_PORTS[0] + 20), RTP_PORTS[0], 16384):
                sock.sendto(b"v=0 stray", (FW_OUTSIDE, port))
            answers: dict[str, int] = {}
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(answers) < len(refused):
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    continue
                if data.startswith(b"SIP/2.0 "):
                    status = int(data.split(b" ", 2)[1])
                    call_id = next(line.split(b":", 1)[1].strip().decode() for line in
                                   data.split(b"\r\n") if line.lower().startswith(b"call-id:"))
                    if status >= 200:
                        answers[call_id] = status
        finally:
            sock.close()
        for name, call_id, _data, statuses in refused:
            assert answers.get(call_id) in statuses, (name, answers, site.logs())
        site.capture.settle()
        to_phone = [p for p in site.capture.on(nat_net.lan_if)
                    if p.dst == PHONE_IP and p.time >= attack_start]
        assert to_phone == [], to_phone

        # the path to the phone works: its own token still reaches it
        uac = site.provider.start_uac("uac_rr.xml", (FW_OUTSIDE, SIP), count=1,
                                      timeout=SIPP_TIMEOUT,
                                      keys={"ruri": f"sip:{token}@{FW_OUTSIDE}:{SIP}"})
        server, client = pair(phone, uac)
        assert client.ok(1) and server.ok(1), f"{server.describe()}\n{site.logs()}"
        site.capture.settle()
        assert any(p.dst == PHONE_IP and p.time >= attack_start
                   for p in site.capture.on(nat_net.lan_if))
        assert site.proxy.running(), site.logs()
    finally:
        site.stop()


# ------------------------------------------------------------------------------------------------
# public-proxy mode: the proxy on the provider's public address, the phone behind fw's NAT
# ------------------------------------------------------------------------------------------------

DOMAIN = "lan.example"
AOR_URI = f"sip:{USER}@{DOMAIN}"


def public_config(keepalive_interval: float, failures: int = 2) -> dict[str, Any]:
    return {
        "proxy": {"domains": [DOMAIN]},
        "listen": [{"side": "outside", "transport": "udp", "address": PROVIDER_IP, "port": SIP}],
        # Timer F = 64 * T1 = 3.2 s: a keepalive nobody answers fails within seconds
        "timers": {"t1": 0.05},
        "plugins": {"enabled": ["nat"]},
        "nat": {"keepalive_interval": keepalive_interval, "keepalive_failures": failures},
    }


def public_register(site: Site) -> None:
    """The phone registers its private Contact, from behind fw's masquerading; then answers."""
    result = site.phone.run_uac(
        "register.xml", (PROVIDER_IP, SIP), local_port=SIP, count=1, timeout=SIPP_TIMEOUT,
        keys={"user": USER, "domain": DOMAIN, "contact": PHONE_CONTACT, "expires": "3600"},
    )
    assert result.ok(1), f"{result.describe()}\n{site.logs()}"
    site.capture.settle(quiet=0.1)
    [(packet, register)] = [(p, m) for p, m in site.outside()
                            if isinstance(m, Request) and m.method == "REGISTER"]
    # the NAT is real: the proxy got it from fw's outside address, on a mapped port
    assert packet.src == FW_OUTSIDE and NAT_PORTS[0] <= packet.sport <= NAT_PORTS[1], packet
    assert [str(c.uri) for c in register.contacts] == [PHONE_CONTACT]


def call_alice(site: Site) -> SippResult:
    return site.provider.run_uac("uac_rr.xml", (PROVIDER_IP, SIP), count=1,
                                 timeout=SIPP_TIMEOUT, keys={"ruri": AOR_URI})


def invites_at_phone(site: Site) -> list[Packet]:
    return [p for p, m in site.lan() if isinstance(m, Request) and m.method == "INVITE"
            and p.dst == PHONE_IP]


def test_public_proxy_natted_phone_receives_calls(nat_net: NatNet, tmp_path: Path) -> None:
    """A phone behind a NAT registers sip:alice@192.168.77.10 (its private address) and still
    gets the call: the proxy sends it where the REGISTER came from, through the NAT."""
    site = start_site(nat_net, tmp_path, public_config(keepalive_interval=5), "provider")
    try:
        public_register(site)
        site.phone.start_uas("uas_phone.xml", SIP, timeout=SIPP_TIMEOUT)
        caller = call_alice(site)
        assert caller.ok(1), f"{caller.describe()}\n{site.logs()}"
        site.capture.settle()
        [at_nat] = [p for p, m in site.outside()
                    if isinstance(m, Request) and m.method == "INVITE"]
        assert at_nat.dst == FW_OUTSIDE and NAT_PORTS[0] <= at_nat.dport <= NAT_PORTS[1]
        [at_phone] = invites_at_phone(site)
        assert (at_phone.dst, at_phone.dport) == (PHONE_IP, SIP)
        # the caller's BYE, sent to the Contact it got from the 200, came through the NAT too
        byes = [p for p, m in site.lan() if isinstance(m, Request) and m.method == "BYE"]
        assert [(p.dst, p.dport) for p in byes] == [(PHONE_IP, SIP)]
    finally:
        site.stop()


@pytest.mark.parametrize("keepalives", [True, False], ids=["keepalives", "no-keepalives"])
def test_public_proxy_keepalives_hold_the_nat_mapping(
    nat_net: NatNet, tmp_path: Path, keepalives: bool
) -> None:
    """fw forgets an idle UDP mapping after 2 s. With keepalives every 0.5 s the phone still
    gets a call 5 s after it registered; without them (the control) the call cannot reach it."""
    nat_net.nat_timeout(2)
    site = start_site(nat_net, tmp_path, public_config(0.5 if keepalives else 0), "provider")
    try:
        public_register(site)
        site.phone.start_uas("uas_phone.xml", SIP, timeout=SIPP_TIMEOUT)
        time.sleep(5)
        caller = call_alice(site)
        site.capture.settle()
        pings = [m for p, m in site.lan() if isinstance(m, Request) and m.method == "OPTIONS"
                 and p.dst == PHONE_IP]
        # either way the proxy sent the INVITE to the phone's mapped address on fw
        assert any(isinstance(m, Request) and m.method == "INVITE" and p.dst == FW_OUTSIDE
                   and NAT_PORTS[0] <= p.dport <= NAT_PORTS[1] for p, m in site.outside())
        if keepalives:
            assert caller.ok(1), f"{caller.describe()}\n{site.logs()}"
            assert len(invites_at_phone(site)) >= 1
            assert len(pings) >= 5, len(pings)
        else:
            assert not caller.ok(1), caller.describe()
            assert invites_at_phone(site) == []
            assert pings == []
    finally:
        site.stop()


def _final_status(ns_socket: Any, uri: str, limit: float = 6.0) -> int | None:
    """Send OPTIONS C{uri} to the proxy from C{ns_socket}; the final status, if one comes."""
    call_id = uuid.uuid4().hex
    port = ns_socket.getsockname()[1]
    ns_socket.sendto(_probe(call_id, "OPTIONS", uri, port=port), (PROVIDER_IP, SIP))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = ns_socket.recv(65535)
        except TimeoutError:
            continue
        if data.startswith(b"SIP/2.0 ") and call_id.encode() in data:
            status = int(data.split(b" ", 2)[1])
            if status >= 200:
                return status
    return None


def test_public_proxy_removes_a_silent_phone(nat_net: NatNet, tmp_path: Path) -> None:
    """A phone that stops answering the keepalives (switched off) loses its binding: alice,
    reachable while it answers, is then refused by the proxy itself."""
    site = start_site(nat_net, tmp_path, public_config(0.5, failures=2), "provider")
    sock = nat_net.provider.socket()
    try:
        sock.bind((PROVIDER_IP, 0))
        sock.settimeout(0.2)
        public_register(site)
        phone = site.phone.start_uas("uas_phone.xml", SIP, timeout=SIPP_TIMEOUT)
        time.sleep(1.5)
        assert _final_status(sock, AOR_URI) == 200  # the phone itself answers
        phone.kill()
        switched_off = time.monotonic()
        statuses: list[int | None] = []
        while time.monotonic() - switched_off < 25 and statuses[-1:] not in ([404], [480]):
            statuses.append(_final_status(sock, AOR_URI))
            time.sleep(0.3)
        assert statuses[-1] in (404, 480), (statuses, site.logs())
        assert "stopped answering keepalives; removed" in site.proxy.log_text()
    finally:
        sock.close()
        site.stop()
