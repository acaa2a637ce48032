"""
Issue 11, part A, against running proxies: outside probes that tried to make the proxy send
traffic to a third party, each with an assertion that nothing reached the victim.

One topology for the module (tests/integration/support/netns.py's NatNet, grown by two hosts that
``provider`` routes to), so every source is a real, non-loopback address the flood guard does
not exempt::

    phone          fw                             provider          +- attacker 192.0.2.66
    192.168.77.10 -- 192.168.77.1 | 203.0.113.1 -- 203.0.113.50 -----+
                                                                     +- victim 198.51.100.99

The firewall-mode proxy runs in ``fw`` (examples/firewall.toml without the media relay), the
public one in ``provider`` (examples/public.toml: acl, auth, nat). The attacker is a Python
socket in its own namespace; a capture in the victim's namespace sees every packet that
arrives there. While the probes run, the legitimate phone (sipp, behind fw's NAT) keeps calling
(and, where the proxy is its registrar, registering) through the same proxy.

The probes: a forged 200 OK with our Via on top and the victim's below it (RFC 6026 7.3);
relaying through the attacker's own call (MESSAGE / re-INVITE / BYE / ACK to the victim, and a
Route of the attacker's own side; the peer's Contact is a nat token here, so a Request-URI
``maddr`` is the unit tests' business); responses steered by a Via ``maddr`` or a ``received`` the
client wrote; a NUL in a header value. The attacker's own call also checks that 2xx
retransmissions still reach the caller (the INVITE client transaction's Accepted state).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sipproxy import testing
from sipproxy.credentials import format_line
from sipproxy.digest import ha1
from sipproxy.errors import ParseError
from sipproxy.message import Request, Response, parse_message
from tests.integration.support.harness import SippProcess
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    Capture,
    Namespace,
    NatNet,
)
from tests.integration.support.sites import (
    SIPP_TIMEOUT,
    Site,
    firewall_config,
    register_with_challenge,
    start_site,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]

SIP = 5060
ATTACKER_IP = "192.0.2.66"
ATTACKER_PORT = 5099
VICTIM_IP = "198.51.100.99"
DOMAIN = "lan.example"
USERS = {"alice": "wonderland", "bob": "builder"}
#: legitimate calls the phone places while the probes run
CALLS = 3


@dataclass
class Lab:
    net: NatNet
    attacker: Namespace
    victim: Namespace


@pytest.fixture(scope="module")
def lab(netns_ready: None) -> Iterator[Lab]:
    net = NatNet.build()
    try:
        topology = net.topology
        attacker = topology.namespace("attacker")
        victim = topology.namespace("victim")
        topology.veth(net.provider, "att0", "192.0.2.1/24", attacker, "eth0",
                      f"{ATTACKER_IP}/24")
        topology.veth(net.provider, "vic0", "198.51.100.1/24", victim, "eth0",
                      f"{VICTIM_IP}/24")
        attacker.run("ip", "route", "add", "default", "via", "192.0.2.1")
        victim.run("ip", "route", "add", "default", "via", "198.51.100.1")
        net.provider.sysctl("net.ipv4.ip_forward", 1)
        for prefix in ("192.0.2.0/24", "198.51.100.0/24"):
            net.fw.run("ip", "route", "add", prefix, "via", PROVIDER_IP)
        yield Lab(net, attacker, victim)
    finally:
        net.close()


# ------------------------------------------------------------------------------------------------
# the attacker: a hand-made UA on one socket
# ------------------------------------------------------------------------------------------------


def sip_request(method: str, uri: str, call_id: str, *, cseq: int = 1, to_tag: str | None = None,
                via_params: str = ";rport", headers: tuple[str, ...] = ()) -> bytes:
    return testing.sip_request(
        method, uri, call_id=call_id, cseq=cseq,
        via=f"SIP/2.0/UDP {ATTACKER_IP}:{ATTACKER_PORT};branch=z9hG4bK{uuid.uuid4().hex[:16]}"
            f"{via_params}",
        from_="<sip:mallory@evil.example>;tag=mallory1",
        to=f"<sip:x@{DOMAIN}>{f';tag={to_tag}' if to_tag else ''}",
        headers=(f"Contact: <sip:mallory@{ATTACKER_IP}:{ATTACKER_PORT}>", *headers))


@dataclass
class Attacker:
    """UDP on the attacker's address; every message that comes back is kept, waits bounded."""

    ns: Namespace
    proxy: tuple[str, int]
    got: list[Request | Response] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = self.ns.socket()
        self.sock.bind((ATTACKER_IP, ATTACKER_PORT))
        self.sock.settimeout(0.1)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.proxy)

    def listen(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            try:
                self.got.append(parse_message(data))
            except ParseError:
                continue

    def finals(self, call_id: str, method: str, cseq: int = 1) -> list[Response]:
        return [m for m in self.got if isinstance(m, Response) and m.call_id == call_id
                and (m.cseq.method, m.cseq.number) == (method, cseq) and m.status >= 200]

    def final(self, call_id: str, method: str, cseq: int = 1,
              limit: float = 5.0) -> Response | None:
        deadline = time.monotonic() + limit
        while not self.finals(call_id, method, cseq) and time.monotonic() < deadline:
            self.listen(0.1)
        found = self.finals(call_id, method, cseq)
        return found[0] if found else None

    def ask(self, method: str, uri: str, call_id: str, cseq: int = 1,
            **kw: Any) -> int | None:
        """Send a request (see L{sip_request}); the status of its final response, if any."""
        self.send(sip_request(method, uri, call_id, cseq=cseq, **kw))
        answer = self.final(call_id, method, cseq)
        return answer.status if answer is not None else None


# ------------------------------------------------------------------------------------------------
# the probes (the same against both proxies)
# ------------------------------------------------------------------------------------------------


@dataclass
class Probes:
    """What each probe got back (final statuses by name) and what it learned on the way."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    ok_copies: int = 0
    call_ids: list[str] = field(default_factory=list)


def stray_200(attacker: Attacker) -> None:
    """RFC 6026 7.3: a 200 no transaction matches, our Via on top and the victim's below."""
    proxy_host, proxy_port = attacker.proxy
    attacker.send((
        f"SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP {proxy_host}:{proxy_port};branch=z9hG4bKforged{uuid.uuid4().hex[:8]}\r\n"
        f"Via: SIP/2.0/UDP {VICTIM_IP}:{SIP};branch=z9hG4bKvictim1\r\n"
        f"From: <sip:victim@{VICTIM_IP}>;tag=v1\r\nTo: <sip:x@{DOMAIN}>;tag=x1\r\n"
        f"Call-ID: stray-{uuid.uuid4().hex}\r\nCSeq: 1 INVITE\r\n"
        "Contact: <sip:x@203.0.113.77>\r\nContent-Length: 0\r\n\r\n").encode())


def relay_through_own_call(attacker: Attacker, callee: str, probes: Probes) -> None:
    """The attacker calls a local user (answered by the phone), then tries to send in-dialog
    requests to the victim; the call is ended with a proper BYE."""
    proxy_host, proxy_port = attacker.proxy
    own_route = f"Route: <sip:{proxy_host}:{proxy_port};lr>"
    call_id = f"relay-{uuid.uuid4().hex}"
    probes.call_ids.append(call_id)
    # a Record-Route of "its own side" naming the victim: later offered as a Route
    attacker.send(sip_request("INVITE", callee, call_id,
                              headers=(f"Record-Route: <sip:{VICTIM_IP};lr>",)))
    ok = attacker.final(call_id, "INVITE", limit=8)
    assert ok is not None and ok.status == 200, [m.start_line() for m in attacker.got]
    attacker.listen(1.7)  # no ACK yet: the phone retransmits its 200 (T1 = 0.5 s)
    probes.ok_copies = len(attacker.finals(call_id, "INVITE"))
    to_tag = ok.to.tag
    [contact] = [str(c.uri) for c in ok.contacts]
    attacker.send(sip_request("ACK", contact, call_id, to_tag=to_tag, headers=(own_route,)))
    attempts = {
        "MESSAGE to the victim": ("MESSAGE", f"sip:x@{VICTIM_IP}", (own_route,)),
        "re-INVITE to the victim": ("INVITE", f"sip:x@{VICTIM_IP}:{SIP}", (own_route,)),
        "BYE to the victim": ("BYE", f"sip:x@{VICTIM_IP}:{SIP}", (own_route,)),
        "through its own side's route": (
            "MESSAGE", contact, (f"Route: <sip:{proxy_host}:{proxy_port};lr>, "
                                 f"<sip:{VICTIM_IP};lr>",)),
    }
    for cseq, (name, (method, uri, routes)) in enumerate(attempts.items(), start=2):
        probes.statuses[name] = attacker.ask(method, uri, call_id, cseq=cseq, to_tag=to_tag,
                                             headers=routes)
    attacker.send(sip_request("ACK", f"sip:x@{VICTIM_IP}", call_id, to_tag=to_tag,
                              headers=(own_route,)))
    probes.statuses["BYE to the peer"] = attacker.ask("BYE", contact, call_id, cseq=10,
                                                      to_tag=to_tag, headers=(own_route,))


def steered_responses(attacker: Attacker, uri: str, method: str, probes: Probes) -> None:
    """Via maddr and a client-written received name the victim: the answer comes back here."""
    for name, params in (("maddr=victim", f";maddr={VICTIM_IP}"),
                         ("received=victim", f";received={VICTIM_IP}")):
        call_id = f"steer-{uuid.uuid4().hex}"
        probes.call_ids.append(call_id)
        probes.statuses[name] = attacker.ask(method, uri, call_id, via_params=params)


def nul_in_a_header(attacker: Attacker, callee: str, probes: Probes) -> None:
    call_id = f"nul-{uuid.uuid4().hex}"
    probes.call_ids.append(call_id)
    probes.statuses["NUL in Subject"] = attacker.ask(
        "INVITE", callee, call_id, headers=("Subject: hello\x00world",))


def run_probes(lab: Lab, proxy: tuple[str, int], callee: str, own_uri: str,
               own_method: str) -> Probes:
    """Every probe, from the attacker's socket, in turn (a stray 200 first and last)."""
    probes = Probes()
    attacker = Attacker(lab.attacker, proxy)
    try:
        stray_200(attacker)
        relay_through_own_call(attacker, callee, probes)
        steered_responses(attacker, own_uri, own_method, probes)
        nul_in_a_header(attacker, callee, probes)
        stray_200(attacker)
        attacker.listen(0.5)
    finally:
        attacker.close()
    return probes


def judge(probes: Probes, victim: Capture, site: Site, answer_to_own: int) -> None:
    """What every run must show: the refusals, the retransmitted 2xx, a quiet victim."""
    assert probes.statuses == {
        "MESSAGE to the victim": 403,
        "re-INVITE to the victim": 403,
        "BYE to the victim": 403,
        "through its own side's route": 403,
        "BYE to the peer": 200,
        "maddr=victim": answer_to_own,
        "received=victim": answer_to_own,
        "NUL in Subject": 400,
    }, site.logs()
    assert probes.ok_copies >= 2, probes.ok_copies  # 2xx retransmissions still get through
    victim.settle()
    reached = [p for p in victim.stop() if p.dst == VICTIM_IP]
    assert reached == [], reached
    # the phone saw the attacker's call, but nothing of the refused or unparsable requests
    at_phone = [m for p, m in site.lan() if p.dst == PHONE_IP and isinstance(m, Request)
                and m.call_id in probes.call_ids]
    assert sorted(m.method for m in at_phone if m.cseq.number > 1) == ["BYE"], \
        [m.start_line() for m in at_phone]
    assert not any(m.call_id.startswith("nul-") for m in at_phone)
    log = site.proxy.log_text()
    assert "it matches no transaction" in log and "acl: relaying denied" in log, site.logs()
    assert site.proxy.running(), site.logs()


def probe_during(lab: Lab, site: Site, legit: list[SippProcess], proxy: tuple[str, int],
                 callee: str, own: tuple[str, str], answer_to_own: int) -> None:
    """Run the probes while ``legit`` sipp runs; judge them; then every legitimate call and
    registration must have succeeded."""
    victim = Capture(lab.victim, ["eth0"])
    try:
        probes = run_probes(lab, proxy, callee, *own)
        site.capture.settle()
        judge(probes, victim, site, answer_to_own)
    finally:
        victim.stop()
    for process in legit:
        result = process.wait()
        assert result.ok(), f"{result.describe()}\n{site.logs()}"


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------


def test_firewall_mode_probes(lab: Lab, tmp_path: Path) -> None:
    """examples/firewall.toml: the attacker calls the phone's token (as the provider would)
    while the phone registers with the provider and then places calls through the proxy."""
    site = start_site(lab.net, tmp_path, firewall_config())
    try:
        server, client = register_with_challenge(site)
        assert client.ok(1) and server.ok(1), f"{client.describe()}\n{site.logs()}"
        token = token_seen_by_provider(site)
        phone = site.phone.start_uas("uas_rr.xml", SIP, count=1, timeout=SIPP_TIMEOUT)
        provider = site.provider.start_uas("uas_rr.xml", SIP, count=CALLS, timeout=SIPP_TIMEOUT,
                                           variables={"direct": "1"})
        calls = site.phone.start_uac("uac_rr.xml", (FW_INSIDE, SIP), local_port=5062,
                                     count=CALLS, rate=1, timeout=SIPP_TIMEOUT,
                                     keys={"ruri": "sip:bob@provider.example"})
        probe_during(lab, site, [calls, provider, phone], (FW_OUTSIDE, SIP),
                     f"sip:{token}@{FW_OUTSIDE}:{SIP}", (f"sip:{FW_OUTSIDE}:{SIP}", "OPTIONS"),
                     answer_to_own=200)
    finally:
        site.stop()


def public_config(tmp_path: Path) -> dict[str, Any]:
    """examples/public.toml on the provider's address (sipp does MD5 only; no keepalives, so
    the phone's UAS counts only calls)."""
    users = tmp_path / "users.txt"
    users.write_text("".join(
        format_line(user, DOMAIN, {"MD5": ha1("MD5", user, DOMAIN, pw)}) + "\n"
        for user, pw in USERS.items()))
    return {
        "proxy": {"domains": [DOMAIN]},
        "listen": [{"side": "outside", "transport": "udp", "address": PROVIDER_IP, "port": SIP}],
        "plugins": {"enabled": ["acl", "auth", "nat"]},
        "auth": {"users_file": str(users), "algorithms": ["MD5"]},
        "nat": {"keepalive_interval": 0},
    }


def register(site: Site, user: str, port: int, count: int = 1) -> SippProcess:
    contact = f"sip:{user}@{PHONE_IP}:{port}"
    return site.phone.start_uac(
        "register_auth.xml", (PROVIDER_IP, SIP), local_port=port, count=count, rate=1,
        timeout=SIPP_TIMEOUT, keys={"user": user, "domain": DOMAIN, "contact": contact,
                                    "expires": "600"},
        variables={"contact": contact}, extra_args=["-au", user, "-ap", USERS[user]])


def test_public_proxy_probes(lab: Lab, tmp_path: Path) -> None:
    """examples/public.toml: alice (the phone, behind fw's NAT) registers with the proxy and
    answers calls; bob, on the same phone, keeps registering and calls alice, while the
    attacker calls alice and probes."""
    site = start_site(lab.net, tmp_path, public_config(tmp_path), "provider")
    try:
        first = register(site, "alice", SIP).wait()
        assert first.ok(1), f"{first.describe()}\n{site.logs()}"
        alice = site.phone.start_uas("uas_phone.xml", SIP, count=CALLS + 1,
                                     timeout=SIPP_TIMEOUT)
        bob_registers = register(site, "bob", 5064, count=CALLS)
        calls = site.phone.start_uac(
            "uac_auth.xml", (PROVIDER_IP, SIP), local_port=5066, count=CALLS, rate=1,
            timeout=SIPP_TIMEOUT, keys={"ruri": f"sip:alice@{DOMAIN}", "user": "bob",
                                        "domain": DOMAIN},
            extra_args=["-au", "bob", "-ap", USERS["bob"]])
        probe_during(lab, site, [bob_registers, calls, alice], (PROVIDER_IP, SIP),
                     f"sip:alice@{DOMAIN}", (f"sip:{DOMAIN}", "REGISTER"), answer_to_own=401)
    finally:
        site.stop()
