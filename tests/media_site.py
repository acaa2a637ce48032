"""The media plugin's test site, on top of the nat plugin's firewall (tests/nat_site.py): a
relay double, a clocked UDP world, the harness and the message builders the media plugin's tests
and the call-record tests share."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from sipproxy.message import Request, Response, Source
from sipproxy.plugins.media import MediaPlugin
from sipproxy.sdp import SessionDescription, parse_sdp
from sipproxy.testing import ProxyHarness
from tests.nat_site import FIREWALL, INSIDE, OUTSIDE, PHONE, PHONE_VIA, PROVIDER, PROVIDER_IP

LAN = re.compile(rb"192\.168\.\d+\.\d+")
MEDIA_FIREWALL = FIREWALL.replace('enabled = ["nat"]', 'enabled = ["nat", "media"]') + """
[media]
port_min = 30000
port_max = 30099
"""
PHONE_MEDIA = ("192.168.77.10", 10000)
PROVIDER_MEDIA = ("203.0.113.50", 20000)
RR_INSIDE = f"<sip:{INSIDE}:5060;lr>"
RR_OUTSIDE = f"<sip:{OUTSIDE}:5060;lr>"
BOB_CONTACT = "sip:bob@203.0.113.50:5060"
CALLER = "<sip:alice@provider.example>;tag=a1"
CALLEE = "<sip:bob@provider.example>"


# ------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------
class FakePort:
    def __init__(self, clock: UdpClock, port: int, interface: str, protocol: Any) -> None:
        self.clock, self.port, self.interface = clock, port, interface
        self.protocol = protocol

    def stopListening(self) -> None:
        self.clock.open.discard((self.interface, self.port))

    def write(self, data: bytes, addr: Any) -> None:
        self.clock.sent.append((self.interface, self.port, data, addr))

    def getHost(self) -> Any:
        return type("Host", (), {"host": self.interface, "port": self.port})()


class UdpClock(Clock):
    """A Clock that also opens (pretend) UDP ports, for the relay engine."""

    def __init__(self) -> None:
        super().__init__()
        self.open: set[tuple[str, int]] = set()
        self.sent: list[tuple[str, int, bytes, Any]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> FakePort:
        self.open.add((interface, port))
        fake = FakePort(self, port, interface, protocol)
        protocol.makeConnection(fake)
        return fake


class RecordingRelay:
    """An IMediaRelay that records every call and passes it on (or fails it, when told)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.hold = False
        self.held: list[defer.Deferred[Any]] = []

    def _do(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.log.append((name, args, kwargs))
        if self.fail is not None and name in ("offer", "answer"):
            return defer.fail(self.fail)
        result = getattr(self.inner, name)(*args, **kwargs)
        if self.hold and name in ("offer", "answer"):
            later: defer.Deferred[Any] = defer.Deferred()
            self.held.append(later)
            later.addCallback(lambda _: result)
            return later
        return result

    def release(self) -> None:
        """Let the held replies arrive (as an NG relay's come: after the hook returned)."""
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def offer(self, *args: Any, **kwargs: Any) -> Any:
        return self._do("offer", *args, **kwargs)

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        return self._do("answer", *args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        return self._do("delete", *args, **kwargs)

    def query(self, call_id: str) -> Any:
        return self.inner.query(call_id)

    def ping(self) -> Any:
        return self.inner.ping()

    def add_end_observer(self, observer: Any) -> None:
        self.inner.add_end_observer(observer)

    def commands(self) -> list[tuple[str, str | None, str | None]]:
        """(command, from-tag, to-tag) of every offer/answer/delete, in order."""
        out = []
        for name, args, kwargs in self.log:
            if name == "offer":
                out.append((name, args[1], kwargs.get("to_tag")))
            elif name == "answer":
                out.append((name, args[1], args[2]))
            else:
                out.append((name, None, None))
        return out


@dataclass
class Net(ProxyHarness):
    """sipproxy.testing's proxy with the nat and media plugins, the relay's calls recorded."""

    stopped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def media(self) -> MediaPlugin:
        return next(p for p in self.plugins if isinstance(p, MediaPlugin))

    @property
    def relay(self) -> RecordingRelay:
        relay = self.media.relay
        assert isinstance(relay, RecordingRelay)
        return relay

    @property
    def engine(self) -> Any:
        return self.relay.inner.engine

    def send(self, data: bytes, source: Source) -> None:
        self.receive(data, source)

    def new(self) -> list[tuple[bytes, Any, tuple[str, int]]]:
        return self.wire.new()

    def one(self, to_host: str) -> tuple[bytes, Any]:
        """The one message since the last look (100 Trying aside); it went to ``to_host``."""
        fresh = self.new()
        assert len(fresh) == 1, [m for _, m, _ in fresh]
        data, message, to = fresh[0]
        assert to[0] == to_host, (to, message)
        return data, message

    def to(self, host: str) -> list[Any]:
        """The messages sent to ``host`` since the last look (100 Trying aside)."""
        return [m for _, m, to in self.new() if to[0] == host]

    def run_out(self) -> None:
        """Stop everything, run every timer (bounded): no call, port or timer may be left."""
        self.proxy.stop()
        for plugin in self.proxy.pipeline.plugins:
            if getattr(plugin, "running", False):
                plugin.stopService()
        self.stopped = True
        self.settle(1000)
        assert self.clock.getDelayedCalls() == []
        assert self.engine.calls == {}
        assert self.clock.open == set()
        assert self.media.calls == {}


def make_net(config_text: str = MEDIA_FIREWALL) -> Net:
    net: Net = Net.build(config_text, clock=UdpClock())
    net.media.relay = RecordingRelay(net.media.relay)
    plugins = net.plugins
    for plugin in plugins:
        if hasattr(plugin, "startService"):
            plugin.startService()
    return net


def sdp(host: str, port: int, *, direction: str | None = None, ice: bool = False,
        version: int = 1) -> bytes:
    lines = ["v=0", f"o=- 42 {version} IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
             f"m=audio {port} RTP/AVP 0 8", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000"]
    if direction:
        lines.append(f"a={direction}")
    if ice:
        lines += ["a=ice-ufrag:F7gI", "a=ice-pwd:x9cml/YzichV2+XlhiMu8g",
                  f"a=candidate:1 1 UDP 2130706431 {host} {port} typ host",
                  "a=candidate:2 1 UDP 1694498815 198.51.100.7 41000 typ srflx"]
    return ("\r\n".join(lines) + "\r\n").encode()


def request(method: str, uri: str, *, source: Source, branch: str, call_id: str, from_: str,
            to: str, cseq: int = 1, headers: tuple[str, ...] = (), body: bytes = b"") -> bytes:
    via = PHONE_VIA + branch if source is PHONE else \
        f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch={branch}"
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70", f"From: {from_}",
             f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", *headers]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def respond(req: Request, status: int, to_tag: str | None = None, body: bytes = b"",
            headers: tuple[str, ...] = ()) -> bytes:
    response = req.make_response(status)
    if to_tag is not None and not response.to.tag:
        to = response.to.copy()
        to.tag = to_tag
        response.set_name_addr("To", to)
    for value in req.headers.get_all("record-route"):
        response.headers.add("Record-Route", value)
    for line in headers:
        name, _, value = line.partition(": ")
        response.headers.add(name, value)
    if body:
        response.headers.add("Content-Type", "application/sdp")
        response.body = body
    return response.to_bytes()


def session(message: Request | Response) -> SessionDescription:
    return parse_sdp(message.body)


def media_address(message: Request | Response) -> tuple[str, int]:
    s = session(message)
    conn = s.media[0].effective_connection
    assert conn is not None
    return conn.address, s.media[0].port


def assert_relayed(message: Request | Response, relay_host: str) -> int:
    """Its SDP names the relay on that side only (c=, o=, a port of the relay's range)."""
    s = session(message)
    assert s.origin is not None and s.origin.address == relay_host, message.body
    host, port = media_address(message)
    assert host == relay_host and 30000 <= port <= 30099, message.body
    assert not LAN.search(message.body) or relay_host == INSIDE, message.body
    assert PROVIDER_MEDIA[0].encode() not in message.body, message.body
    return port


# ------------------------------------------------------------------------------------------------
# a call from the phone to the provider
# ------------------------------------------------------------------------------------------------
def outgoing_invite(net: Net, body: bytes | None = None, call_id: str = "out-1") -> Request:
    net.send(request(
        "INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
        call_id=call_id, from_=CALLER, to=CALLEE,
        headers=("Contact: <sip:alice@192.168.77.10:5060>",),
        body=sdp(*PHONE_MEDIA) if body is None else body,
    ), PHONE)
    _, invite = net.one(PROVIDER_IP)
    assert isinstance(invite, Request) and invite.method == "INVITE"
    return invite


def answered_call(net: Net, call_id: str = "out-1") -> tuple[Request, Response]:
    invite = outgoing_invite(net, call_id=call_id)
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA),
                     (f"Contact: <{BOB_CONTACT}>",)), PROVIDER)
    _, ok = net.one(PHONE.host)
    assert ok.status == 200
    net.send(request("ACK", BOB_CONTACT, source=PHONE, branch="z9hG4bKack1", call_id=call_id,
                     from_=CALLER, to=CALLEE + ";tag=b1",
                     headers=(f"Route: {RR_INSIDE}", f"Route: {RR_OUTSIDE}")), PHONE)
    _, ack = net.one(PROVIDER_IP)
    assert ack.method == "ACK"
    return invite, ok


def phone_in_dialog(net: Net, method: str, cseq: int, branch: str, body: bytes = b"",
                    call_id: str = "out-1") -> bytes:
    return request(method, BOB_CONTACT, source=PHONE, branch=branch, call_id=call_id,
                   from_=CALLER, to=CALLEE + ";tag=b1", cseq=cseq, body=body,
                   headers=(f"Route: {RR_INSIDE}", f"Route: {RR_OUTSIDE}"))


def hang_up(net: Net, cseq: int = 2, call_id: str = "out-1") -> None:
    net.send(phone_in_dialog(net, "BYE", cseq, f"z9hG4bKbye{cseq}", call_id=call_id), PHONE)
    _, bye = net.one(PROVIDER_IP)
    net.send(respond(bye, 200), PROVIDER)
    _, ok = net.one(PHONE.host)
    assert ok.status == 200
