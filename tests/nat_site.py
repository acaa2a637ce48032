"""The firewall set-up of the nat plugin's tests (and the media plugin's, on top of it): the
proxy's inside and outside addresses, the phone, the provider, the config, the harness and
the message builders and checks those tests share."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sipproxy.config import Section
from sipproxy.message import Request, Response, Source
from sipproxy.plugins.nat import TOKEN_PREFIX, NatPlugin, factory
from sipproxy.testing import ProxyHarness, answer, listen_toml, sip_request

INSIDE = "192.168.77.1"
OUTSIDE = "203.0.113.1"
PROVIDER_IP = "203.0.113.50"
PHONE = Source("UDP", "192.168.77.10", 5062, INSIDE, 5060, "inside")
PROVIDER = Source("UDP", PROVIDER_IP, 5060, OUTSIDE, 5060, "outside")
PHONE_CONTACT = "sip:alice@192.168.77.10:5060"
PHONE_VIA = "SIP/2.0/UDP 192.168.77.10:5060;rport;branch="
FIREWALL = f"""
[proxy]
domains = []
user_agent = "sipproxy-test"

{listen_toml(inside=INSIDE, outside=OUTSIDE)}
[upstream]
uri = "sip:{PROVIDER_IP}:5060"

[plugins]
enabled = ["nat"]

[nat]
inside_networks = ["192.168.77.0/24"]
"""

RR_INSIDE = f"<sip:{INSIDE}:5060;lr>"
RR_OUTSIDE = f"<sip:{OUTSIDE}:5060;lr>"
LAN = re.compile(rb"192\.168\.\d+\.\d+")

PUBLIC = f"""
[proxy]
domains = ["lan.example"]

{listen_toml(outside=OUTSIDE)}
[plugins]
enabled = ["nat"]

[nat]
keepalive_interval = 20
keepalive_failures = 2
"""


# ------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------
@dataclass
class Net(ProxyHarness):
    """sipproxy.testing's proxy with the nat plugin, and what these tests read of the wire."""

    @property
    def nat(self) -> NatPlugin:
        return next(p for p in self.plugins if isinstance(p, NatPlugin))

    def send(self, data: bytes | str, source: Source) -> None:
        self.receive(data, source)

    def received(self, host: str, port: int | None = None) -> list[tuple[bytes, Any]]:
        """Every datagram (bytes, parsed) sent to ``host`` (and ``port``), oldest first."""
        return self.wire.received(host, port)

    def new(self) -> list[tuple[bytes, Any]]:
        """The datagrams sent since the last call, but the 100 Trying (hop by hop)."""
        return [(data, message) for data, message, _ in self.wire.new()]

    @property
    def last_to(self) -> tuple[str, int]:
        """Where the last datagram went, a 100 Trying aside (hop by hop: it leaves after the
        INVITE was forwarded)."""
        return next(to for data, to in reversed(self.wire.datagrams)
                    if not data.startswith(b"SIP/2.0 100 "))

    def requests_to(self, host: str, method: str, port: int | None = None) -> list[Request]:
        return self.wire.requests_to(host, method, port)

    def responses_to(self, host: str, method: str, port: int | None = None) -> list[Response]:
        return self.wire.responses_to(host, method, port)

    def nothing_inside(self) -> bool:
        return not any(LAN.match(h.encode()) for _, (h, _p) in self.wire.datagrams)

    def run_out(self) -> None:
        """Stop the plugin's loops, run every timer (bounded); nothing may be left."""
        self.nat.stopService()
        self.settle(500)
        assert self.clock.getDelayedCalls() == []
        self.assert_nothing_left()


def make_net(config_text: str = FIREWALL, nat: dict[str, Any] | None = None) -> Net:
    """A proxy with the nat plugin; from the config's [nat], or built from ``nat`` if given."""
    # from the config: with an outside socket the core puts acl first (never an open relay)
    net: Net = Net.build(config_text, plugins=None if nat is None else [])
    if nat is not None:
        net.plugins = [factory.build(net.proxy, Section("nat", nat))]
        net.proxy.set_plugins(net.plugins)
    net.nat.startService()
    return net


# ------------------------------------------------------------------------------------------------
# message builders and checks
# ------------------------------------------------------------------------------------------------
def phone_request(method: str, uri: str, branch: str, **kw: Any) -> bytes:
    return sip_request(method, uri, via=PHONE_VIA + branch, **kw)


def provider_request(method: str, uri: str, branch: str, **kw: Any) -> bytes:
    return sip_request(method, uri, via=f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch={branch}", **kw)


def head(data: bytes) -> bytes:
    """The start line and headers (SDP is the media plugin's business)."""
    return data.partition(b"\r\n\r\n")[0]


def assert_no_inside_address(data: bytes) -> None:
    found = LAN.findall(head(data))
    assert not found, head(data).decode()


def token_in(message: Request | Response, host: str = OUTSIDE) -> str:
    [contact] = message.contacts
    uri = contact.uri
    assert uri.user is not None and uri.user.startswith(TOKEN_PREFIX), str(uri)
    assert (uri.host, uri.port) == (host, 5060), str(uri)
    return uri.user


def vias(message: Request | Response) -> list[str]:
    return message.headers.get_all("via")


REG_HEADERS = (
    f'Contact: <{PHONE_CONTACT}>;expires=3600;+sip.instance="<urn:uuid:0001>";reg-id=1',
    "Supported: path, outbound",
    "Path: <sip:192.168.77.5;lr>",  # an element of the LAN
)


def register(net: Net) -> str:
    """The phone registers with the provider (no challenge); the token the provider saw."""
    net.send(phone_request(
        "REGISTER", "sip:provider.example", "z9hG4bKreg1", call_id="reg-1",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        headers=REG_HEADERS,
    ), PHONE)
    [out] = net.requests_to(PROVIDER_IP, "REGISTER")
    token = token_in(out)
    net.send(answer(out, 200, "p1", (f"Contact: <sip:{token}@{OUTSIDE}:5060>;expires=600",)),
             PROVIDER)
    assert [r.status for r in net.responses_to(PHONE.host, "REGISTER")] == [200]
    return token


def call_phone(net: Net, token: str) -> Request:
    """The provider's INVITE to the registered phone's ``token``, as the phone got it."""
    net.new()
    net.send(provider_request(
        "INVITE", f"sip:{token}@{OUTSIDE}:5060", "z9hG4bKin1", call_id="in-1",
        from_="<sip:carol@provider.example>;tag=c1", to="<sip:alice@provider.example>",
        headers=(f"Contact: <sip:carol@{PROVIDER_IP}:5060>",),
    ), PROVIDER)
    [invite] = net.requests_to(PHONE.host, "INVITE", PHONE.port)  # where its packets come from
    return invite
