"""
examples/tls.toml and examples/firewall-tls.toml as written (only their addresses, the
provider's URI and the CA path substituted) take calls from the provider over the TLS connection
the proxy opened, with no TLS listener of its own: the phone (a plain SIP client over UDP,
192.168.77.10) behind the firewall, the proxy on fw, the provider stand-in (tls_peers: a Python
ssl server on 203.0.113.50:5061).

The stand-in routes as Kamailio does: a request goes to the host and port of its first Route (or
its Request-URI) with transport=tls, and is sent over a connection only if one with exactly that
peer address and port exists; otherwise it would have to open one, and the test fails (the proxy
listens for no TLS anyway). So every request the provider sends here (INVITE to the registered
Contact, ACK, re-INVITE, BYE) proves the proxy named its own connection; a BYE from the phone
goes out over the same connection. Then the provider drops the connection: the proxy reopens
it, the phone's REGISTER refresh names the new one, and the provider's next call uses that.
"""

from __future__ import annotations

import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipproxy.plugins.nat import TOKEN_PREFIX
from sipproxy.uri import parse_name_addr, parse_uri
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    PHONE_IP,
    PROVIDER_IP,
    NatNet,
    NsProxyProcess,
)
from tests.integration.support.tls_peers import (
    SipClient,
    header,
    headers,
    method_of,
    response_to,
    status_of,
)
from tests.integration.support.tls_provider import WAIT, OwnCall, ProviderUA
from tests.tls_certs import PROVIDER, Certificates, make_certificates

pytestmark = [pytest.mark.netns]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SDP = (f"v=0\r\no=phone 1 1 IN IP4 {PHONE_IP}\r\ns=-\r\nc=IN IP4 {PHONE_IP}\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


#: per example: its addresses -> this topology's (firewall-tls.toml uses them already)
ADDRESSES = {
    "tls.toml": [('"192.168.1.0/24"', f'"{LAN}"'), ('"192.168.1.1"', f'"{FW_INSIDE}"'),
                 ('"203.0.113.10"', f'"{FW_OUTSIDE}"')],
    "firewall-tls.toml": [(f'"{LAN}"', f'"{LAN}"'), (f'"{FW_INSIDE}"', f'"{FW_INSIDE}"'),
                          (f'"{FW_OUTSIDE}"', f'"{FW_OUTSIDE}"')],
}


def example_config(name: str, certs: Certificates) -> dict[str, Any]:
    """examples/NAME with this topology's addresses, the provider and the test CA."""
    text = (EXAMPLES / name).read_text()
    for old, new in [
        *ADDRESSES[name],
        ('uri = "sips:sip.provider.example"', f'uri = "sips:{PROVIDER};maddr={PROVIDER_IP}"'),
        ('# ca = "/etc/sipproxy/provider-ca.pem"', f'ca = "{certs.ca}"'),
    ]:
        assert text.count(old) >= 1, f"examples/{name} no longer has {old}"
        text = text.replace(old, new)
    return tomllib.loads(text)


class RoutingProvider(ProviderUA):
    """ProviderUA that answers REGISTER with 200 at once and finds connections as Kamailio."""

    challenge = False

    def connection_for(self, uri: str) -> int:
        """The open connection whose peer is the URI's host and port (transport=tls)."""
        parsed = parse_uri(uri.strip().strip("<>"))
        assert (parsed.transport or "").lower() == "tls" or parsed.secure, uri
        peer = (parsed.host, parsed.port or 5061)
        with self._lock:
            found = [i for i, p in enumerate(self.peers) if p == peer and
                     self._connections[i].fileno() >= 0]
        assert found, f"{uri} names no open connection ({self.peers}): would connect to it"
        return found[-1]

    def drop(self, connection: int) -> None:
        with self._lock:
            conn = self._connections[connection]
        conn.shutdown(2)

    def final(self, call_id: str, cseq: str) -> bytes:
        return self.wait_for(lambda m: (status_of(m) or 0) >= 200 and
                             header(m, "call-id") == call_id and header(m, "cseq") == cseq, WAIT)

    def send_in_dialog(self, method: str, call: OwnCall, cseq: int, sdp: bytes = b"") -> None:
        first_hop = call.routes[0] if call.routes else call.remote
        self.send_on(self.connection_for(first_hop),
                     self._request(method, call.remote, call, cseq, routes=call.routes, sdp=sdp))


class Phone:
    """A UDP phone behind the firewall: registers, answers, hangs up."""

    def __init__(self, net: NatNet) -> None:
        with net.phone.entered():
            self.client = SipClient("udp", (FW_INSIDE, 5060), host=PHONE_IP)

    def register(self, cseq: int) -> bytes:
        self.client.request("REGISTER", f"sip:{PROVIDER}", call_id="reg-alice", cseq=cseq,
                            from_tag="reg", to=f"<sip:alice@{PROVIDER}>")
        final, _ = self.client.final()
        return final

    def expect(self, method: str, cseq: str) -> bytes:
        for _ in range(20):
            message = self.client.recv(WAIT)
            if method_of(message) == method and header(message, "cseq") == cseq:
                return message
        raise AssertionError(f"the phone got no {cseq}")

    def answer(self, request: bytes, to_tag: str) -> None:
        extra = [f"Contact: {self.client.contact}"]
        payload = b""
        if method_of(request) == "INVITE":
            extra.append("Content-Type: application/sdp")
            payload = SDP
        self.client.send(response_to(request, 200, "OK", to_tag=to_tag, extra=extra,
                                     payload=payload))

    def hang_up(self, invite: bytes, to_tag: str) -> bytes:
        """BYE as the callee: Route = the INVITE's Record-Route, to the caller's Contact."""
        routes = [part.strip() for value in headers(invite, "record-route")
                  for part in value.split(",")]
        target = parse_name_addr(header(invite, "contact") or "").uri
        lines = [
            f"BYE {target} SIP/2.0",
            f"Via: SIP/2.0/UDP {PHONE_IP}:{self.client.port};branch=z9hG4bK"
            f"{uuid.uuid4().hex[:12]};rport",
            *[f"Route: {r}" for r in routes],
            "Max-Forwards: 70",
            f"From: {header(invite, 'to')};tag={to_tag}",
            f"To: {header(invite, 'from')}",
            f"Call-ID: {header(invite, 'call-id')}",
            "CSeq: 1 BYE",
            "Content-Length: 0",
        ]
        self.client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        final, _ = self.client.final()
        return final

    def close(self) -> None:
        self.client.close()


def latest_contact(provider: RoutingProvider) -> str:
    _, register = provider.messages("REGISTER")[-1]
    return str(parse_name_addr(header(register, "contact") or "").uri)


def provider_calls(provider: RoutingProvider, phone: Phone) -> tuple[OwnCall, bytes, str]:
    """INVITE to the registered Contact, the phone answers, the provider ACKs along the route
    set: returns the call, the INVITE as the phone got it and the phone's tag."""
    contact = latest_contact(provider)
    connection = provider.connection_for(contact)
    call = OwnCall(uuid.uuid4().hex, uuid.uuid4().hex[:8], f"<sip:alice@{PROVIDER}>", "", [],
                   connection)
    sdp = (f"v=0\r\no=carol 1 1 IN IP4 {PROVIDER_IP}\r\ns=-\r\nc=IN IP4 {PROVIDER_IP}\r\n"
           "t=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()
    provider.send_on(connection, provider._request("INVITE", contact, call, 1, sdp=sdp))
    invite = phone.expect("INVITE", "1 INVITE")
    tag = uuid.uuid4().hex[:8]
    phone.answer(invite, tag)
    ok = provider.final(call.call_id, "1 INVITE")
    assert status_of(ok) == 200, ok
    call.to = header(ok, "to") or ""
    call.remote = str(parse_name_addr(header(ok, "contact") or "").uri)
    call.routes = [part.strip() for value in headers(ok, "record-route")
                   for part in value.split(",")][::-1]
    provider.send_in_dialog("ACK", call, 1)
    phone.expect("ACK", "1 ACK")
    return call, invite, tag


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("example-certs"))


@pytest.fixture(params=sorted(ADDRESSES))
def site(request: pytest.FixtureRequest, netns_ready: None, certs: Certificates,
         tmp_path: Path) -> Iterator[tuple[NsProxyProcess, RoutingProvider, Phone]]:
    net = NatNet.build()
    try:
        with net.provider.entered():
            provider = RoutingProvider(certs.good.cert, certs.good.key, host=PROVIDER_IP,
                                       port=5061)
        proxy = NsProxyProcess(net.fw, example_config(request.param, certs),
                               tmp_path / "proxy")
        try:
            proxy.start()
            phone = Phone(net)
            try:
                yield proxy, provider, phone
            finally:
                phone.close()
        finally:
            proxy.stop()
            provider.close()
    finally:
        net.close()


def test_provider_calls_over_the_proxys_own_connection(
        site: tuple[NsProxyProcess, RoutingProvider, Phone]) -> None:
    proxy, provider, phone = site
    assert status_of(phone.register(1)) == 200, proxy.log_tail()
    contact = latest_contact(provider)
    assert contact.startswith(f"sip:{TOKEN_PREFIX}") and PHONE_IP not in contact, contact
    [(_, port)] = provider.peers
    assert contact.endswith(f"@{FW_OUTSIDE}:{port};transport=tls"), contact
    # INVITE, ACK, re-INVITE + ACK and BYE from the provider
    call, _, _ = provider_calls(provider, phone)
    provider.send_in_dialog("INVITE", call, 2, sdp=b"")
    reinvite = phone.expect("INVITE", "2 INVITE")
    phone.answer(reinvite, "unused")
    assert status_of(provider.final(call.call_id, "2 INVITE")) == 200
    provider.send_in_dialog("ACK", call, 2)
    phone.expect("ACK", "2 ACK")
    provider.send_in_dialog("BYE", call, 3)
    phone.answer(phone.expect("BYE", "3 BYE"), "unused")
    assert status_of(provider.final(call.call_id, "3 BYE")) == 200
    # the provider calls, the phone hangs up: its BYE leaves over the same connection
    _, invite, tag = provider_calls(provider, phone)
    assert status_of(phone.hang_up(invite, tag)) == 200
    assert provider.messages("BYE")[-1][0] == 0
    assert len(provider.peers) == 1, provider.peers  # one connection for all of it

    # the connection drops: the proxy opens it again, the REGISTER refresh names the new one
    provider.drop(0)
    deadline = time.monotonic() + WAIT
    while len(provider.peers) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(provider.peers) == 2, proxy.log_tail()
    assert status_of(phone.register(2)) == 200, proxy.log_tail()
    assert provider.messages("REGISTER")[-1][0] == 1
    assert latest_contact(provider).endswith(f":{provider.peers[1][1]};transport=tls")
    call, _, _ = provider_calls(provider, phone)
    provider.send_in_dialog("BYE", call, 2)
    phone.answer(phone.expect("BYE", "2 BYE"), "unused")
    assert status_of(provider.final(call.call_id, "2 BYE")) == 200
    assert proxy.running()
