"""The proxy of the auth plugin's tests, shared with the acl plugin's: local users with
passwords in a users file, the config, and a harness (sipproxy.testing's) that sends requests
as the phones and reads what came back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger

from sipproxy.config import parse_config
from sipproxy.credentials import format_line
from sipproxy.digest import authorization, ha1, parse_challenge
from sipproxy.flood import FloodGuard
from sipproxy.message import Response, Source
from sipproxy.plugins.auth import AuthPlugin
from sipproxy.testing import ProxyHarness, RecordingWire, listen_toml, listeners_for
from tests.nat_site import INSIDE, OUTSIDE, PROVIDER_IP

DOMAIN = "lan.example"
PHONE = Source("UDP", "192.168.77.10", 5060, INSIDE, 5060, "inside")
PHONE2 = Source("UDP", "192.168.77.11", 5060, INSIDE, 5060, "inside")
PROVIDER = Source("UDP", PROVIDER_IP, 5060, OUTSIDE, 5060, "outside")
PASSWORDS = {"alice": "wonderland", "bob": "builder"}


def users_file(tmp_path: Path, realm: str = DOMAIN) -> Path:
    lines = ["# test users", ""]
    for user, password in PASSWORDS.items():
        lines.append(format_line(user, realm, {a: ha1(a, user, realm, password)
                                               for a in ("MD5", "SHA-256")}))
    # an htdigest line: MD5 only
    lines.append(f"carol:{realm}:{ha1('MD5', 'carol', realm, 'c4rol')}")
    path = tmp_path / "users.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def config_text(users: Path, auth: str = "", plugins: str = '["auth"]',
                domains: str = f'["{DOMAIN}"]') -> str:
    return f"""
[proxy]
domains = {domains}

{listen_toml(inside=INSIDE, outside=OUTSIDE, transport=None)}
[upstream]
uri = "sip:{PROVIDER_IP}:5060"

[plugins]
enabled = {plugins}

[auth]
users_file = "{users}"
{auth}
[acl]
inside_networks = ["192.168.77.0/24"]
trusted = ["{PROVIDER_IP}/32"]
"""


@dataclass
class Net(ProxyHarness):
    """sipproxy.testing's proxy with what the auth and acl tests ask of it."""

    logged: list[dict[str, Any]] = field(default_factory=list)
    _n: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def auth(self) -> AuthPlugin:
        return next(p for p in self.plugins if isinstance(p, AuthPlugin))

    def send(self, data: bytes, source: Source) -> None:
        self.receive(data, source)

    def new(self) -> list[Any]:
        return [message for _, message, _ in self.wire.new()]

    def branch(self) -> str:
        return f"z9hG4bKt{next(self._n)}"

    def request(self, method: str, uri: str, source: Source = PHONE, *, from_user: str = "alice",
                to: str | None = None, call_id: str = "c1", cseq: int = 1,
                headers: tuple[str, ...] = (), from_domain: str = DOMAIN,
                to_tag: str | None = None, from_tag: str | None = None) -> list[Any]:
        to = to or f"<{uri}>"
        if to_tag:
            to += f";tag={to_tag}"
        lines = [f"{method} {uri} SIP/2.0",
                 f"Via: SIP/2.0/UDP {source.host}:{source.port};branch={self.branch()}",
                 "Max-Forwards: 70",
                 f"From: <sip:{from_user}@{from_domain}>;tag={from_tag or 'f' + call_id}",
                 f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}",
                 f"Contact: <sip:{from_user}@{source.host}:{source.port}>", *headers,
                 "Content-Length: 0"]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode(), source)
        return self.new()

    def register(self, user: str = "alice", headers: tuple[str, ...] = (), cseq: int = 1,
                 source: Source = PHONE, to_user: str | None = None) -> Response:
        [r] = self.request("REGISTER", f"sip:{DOMAIN}", source, from_user=user,
                           to=f"<sip:{to_user or user}@{DOMAIN}>", call_id=f"reg-{user}",
                           cseq=cseq, headers=(*headers, "Expires: 600"))
        assert isinstance(r, Response)
        return r


def make_net(tmp_path: Path, auth: str = "", plugins: str = '["auth"]',
             flood: bool = False) -> Net:
    clock = Clock()
    clock.advance(1_000_000)
    config = parse_config(config_text(users_file(tmp_path), auth, plugins),
                          str(tmp_path / "sipproxy.toml"))
    wire = RecordingWire(listeners_for(config))
    if flood:  # as the transports have it: the flood guard of [limits]
        wire.flood = FloodGuard.from_config(clock, config.limits)
    net: Net = Net.build(config, clock=clock, wire=wire)
    for p in net.plugins:
        p.refusals.log = Logger(namespace="test", observer=net.logged.append)
    return net


def challenges(response: Response, header: str = "WWW-Authenticate") -> list[Any]:
    return [parse_challenge(v) for v in response.headers.get_all(header)]


def credentials(response: Response, user: str, password: str, method: str, uri: str,
                algorithm: str = "SHA-256", nc: int = 1, header: str = "WWW-Authenticate"
                ) -> str:
    [chal] = [c for c in challenges(response, header) if c.algorithm == algorithm]
    return authorization(chal, user, password, method, uri, nc=nc)
