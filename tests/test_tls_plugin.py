"""The tls plugin inside a real Proxy over in-memory transports: its [tls] config, the
Record-Route / Via it leaves on each side, in-dialog requests across the transport change, and
the 503 a phone gets when the provider's certificate does not verify."""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from sipproxy.config import ConfigError, Section, parse_config
from sipproxy.context import Target
from sipproxy.message import Request, Response, Source, parse_message
from sipproxy.plugins.tls import TLSPlugin, factory
from sipproxy.proxy import Proxy
from sipproxy.testing import (
    FakeListener,
    ProxyHarness,
    RecordingWire,
    listen_toml,
    listeners_for,
)
from sipproxy.transport.tls import TLSClientPolicy, TLSConnectError
from tests.tls_certs import make_certificates

PROXY_IP = "192.168.1.1"
PROVIDER_IP = "203.0.113.50"
PHONE = Source("UDP", "192.168.1.10", 5060, PROXY_IP, 5060, "inside")
RR_TLS = f"<sip:{PROXY_IP}:5060;transport=tls;lr>"
RR_UDP = f"<sip:{PROXY_IP}:5060;lr>"

CONFIG = f"""
[proxy]
domains = ["lan.example"]

{listen_toml(inside=PROXY_IP)}
[upstream]
uri = "sips:provider.test:5061;maddr={PROVIDER_IP}"

[plugins]
enabled = ["tls"]
"""


class Wire(RecordingWire):
    """Fails TLS sends to ``refuse`` as the real transport does (on_failure, then errback)."""

    tls_client: TLSClientPolicy | None = None
    refuse: str | None = None

    def send_request(self, request: Request, target: Target) -> Any:
        if target.transport == "TLS" and self.refuse is not None:
            error = TLSConnectError(target.host, target.port, target.server_name, self.refuse,
                                    verification=True)
            assert self.tls_client is not None and self.tls_client.on_failure is not None
            self.tls_client.on_failure(error)
            return fail(error)
        return super().send_request(request, target)


def make(config_text: str = CONFIG) -> tuple[Proxy, Wire, TLSPlugin]:
    config = parse_config(config_text)
    harness = ProxyHarness.build(config, wire=Wire(listeners_for(config)))
    [plugin] = [p for p in harness.plugins if isinstance(p, TLSPlugin)]  # acl runs too
    assert harness.wire.tls_client is plugin.policy  # the plugin configured the transport
    return harness.proxy, cast(Wire, harness.wire), plugin


def send(proxy: Proxy, text: str, source: Source = PHONE) -> None:
    message = parse_message(text.replace("\n", "\r\n").encode())
    message.source = source
    proxy.receive(message)


INVITE = """INVITE sip:service@provider.test SIP/2.0
Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-inv1;rport
Max-Forwards: 70
From: <sip:alice@lan.example>;tag=a1
To: <sip:service@provider.test>
Call-ID: call-tls-1
CSeq: 1 INVITE
Contact: <sip:alice@192.168.1.10:5060>
Content-Length: 0

"""


def answer(request: Request, status: int = 200) -> Response:
    response = request.make_response(status)
    response.headers.set("To", str(request.to) + ";tag=p1")
    response.headers.add("Contact", f"<sip:uas@{PROVIDER_IP}:5061;transport=tls>")
    for value in request.headers.get_all("record-route"):
        response.headers.add("Record-Route", value)
    response.source = Source("TLS", PROVIDER_IP, 5061, PROXY_IP, 40000, "inside")
    return response


def test_invite_goes_over_tls_with_a_record_route_per_side() -> None:
    proxy, wire, _ = make()
    send(proxy, INVITE)
    [(out, target)] = wire.requests
    assert target == Target("TLS", PROVIDER_IP, 5061, "provider.test")  # maddr, name kept
    assert str(out.top_via).startswith(f"SIP/2.0/TLS {PROXY_IP}:5060;")
    assert out.headers.get_all("record-route") == [RR_TLS, RR_UDP]


def test_in_dialog_requests_cross_the_transport_change_both_ways() -> None:
    proxy, wire, _ = make()
    send(proxy, INVITE)
    [(out, _)] = wire.requests
    proxy.receive(answer(out))
    ok = next(r for r, _ in wire.responses if r.status == 200)
    assert ok.headers.get_all("record-route") == [RR_TLS, RR_UDP]
    # the phone's BYE: Route = the Record-Route reversed, to the provider's Contact
    # (an address: the name verified for the dialog is what is checked again)
    bye = f"""BYE sip:uas@{PROVIDER_IP}:5061 SIP/2.0
Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-bye1;rport
Route: {RR_UDP}, {RR_TLS}
Max-Forwards: 70
From: <sip:alice@lan.example>;tag=a1
To: <sip:service@provider.test>;tag=p1
Call-ID: call-tls-1
CSeq: 2 BYE
Content-Length: 0

"""
    send(proxy, bye)
    out_bye, target = wire.requests[-1]
    assert out_bye.method == "BYE"
    assert target == Target("TLS", PROVIDER_IP, 5061, "provider.test")
    assert str(out_bye.top_via).startswith("SIP/2.0/TLS ")
    # the provider's BYE (over its TLS connection): Route = Record-Route, to the phone, by UDP
    from_provider = f"""BYE sip:alice@192.168.1.10:5060 SIP/2.0
Via: SIP/2.0/TLS {PROVIDER_IP}:5061;branch=z9hG4bK-pbye
Route: {RR_TLS}, {RR_UDP}
Max-Forwards: 70
From: <sip:service@provider.test>;tag=p1
To: <sip:alice@lan.example>;tag=a1
Call-ID: call-tls-1
CSeq: 1 BYE
Content-Length: 0

"""
    send(proxy, from_provider, Source("TLS", PROVIDER_IP, 5061, PROXY_IP, 40000, "inside"))
    out_pbye, target = wire.requests[-1]
    assert out_pbye.method == "BYE" and out_pbye.from_.tag == "p1"
    assert target.transport == "UDP" and target.host == "192.168.1.10"
    assert str(out_pbye.top_via).startswith("SIP/2.0/UDP ")


def test_certificate_failure_gives_the_phone_503_with_a_warning() -> None:
    proxy, wire, _ = make()
    wire.refuse = "certificate verify failed: certificate has expired"
    send(proxy, INVITE)
    proxy.clock.advance(0)  # transport failures reach the transaction on the next turn
    finals = [r for r, _ in wire.responses if r.status >= 200]
    assert [r.status for r in finals] == [503]
    warning = finals[0].headers.get("warning")
    assert warning == (f'399 {PROXY_IP} "TLS to provider.test:5061 ({PROVIDER_IP}) failed: '
                       'certificate verify failed: certificate has expired"')


def test_a_plain_udp_call_is_left_alone() -> None:
    proxy, wire, _ = make(CONFIG.replace(f"sips:provider.test:5061;maddr={PROVIDER_IP}",
                                         f"sip:{PROVIDER_IP}"))
    send(proxy, INVITE)
    [(out, target)] = wire.requests
    assert target.transport == "UDP"
    assert out.headers.get_all("record-route") == [RR_UDP]


OUTSIDE_IP = "203.0.113.1"
OVER_OURS = Source("TLS", PROVIDER_IP, 5061, OUTSIDE_IP, 40000, "outside")  # our connection
EXTERNAL_IP = "198.51.100.7"


def two_sides(advertise: str | None) -> str:
    line = f'advertise = "{advertise}"\n' if advertise else ""
    return CONFIG.replace("""[upstream]""", f"""[[listen]]
side = "outside"
transport = "udp"
address = "{OUTSIDE_IP}"
port = 5060
{line}
[upstream]""")


LOCAL_REGISTER = """REGISTER sip:lan.example SIP/2.0
Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-reg2;rport
Max-Forwards: 70
From: <sip:alice@lan.example>;tag=r2
To: <sip:alice@lan.example>
Call-ID: reg-tls-2
CSeq: 1 REGISTER
Contact: <sip:alice@192.168.1.10:5060>
Content-Length: 0

"""  # (the nat plugin's token does this in the firewall set-up)
PROVIDER_INVITE = f"""INVITE sip:alice@lan.example SIP/2.0
Via: SIP/2.0/TLS {PROVIDER_IP}:5061;branch=z9hG4bK-in1
Max-Forwards: 70
From: <sip:carol@provider.test>;tag=c1
To: <sip:alice@provider.test>
Call-ID: in-tls-1
CSeq: 1 INVITE
Contact: <sip:uas@{PROVIDER_IP}:5061;transport=tls>
Content-Length: 0

"""


def provider_ack(route: str) -> str:
    return f"""ACK sip:alice@192.168.1.10:5060 SIP/2.0
Via: SIP/2.0/TLS {PROVIDER_IP}:5061;branch=z9hG4bK-in2
Route: {route}
Max-Forwards: 70
From: <sip:carol@provider.test>;tag=c1
To: <sip:alice@provider.test>;tag=ph1
Call-ID: in-tls-1
CSeq: 1 ACK
Content-Length: 0

"""


def phone_answers(proxy: Proxy, invite: Request) -> None:
    """The phone's 200 to the provider's INVITE (Record-Route copied)."""
    ok = invite.make_response(200)
    ok.headers.set("To", str(invite.to) + ";tag=ph1")
    ok.headers.add("Contact", "<sip:alice@192.168.1.10:5060>")
    for value in invite.headers.get_all("record-route"):
        ok.headers.add("Record-Route", value)
    ok.source = PHONE
    proxy.receive(ok)


@pytest.mark.parametrize("advertise", [None, EXTERNAL_IP])
def test_a_call_from_the_provider_over_our_connection_keeps_the_dialog_right(
    advertise: str | None,
) -> None:
    """The provider calls over the connection we opened for the REGISTER (firewall set-up,
    as with the nat plugin, which leaves the provider only our outside Record-Route entry):
    its ACK goes to the phone by UDP, the phone's BYE to the provider's address over TLS
    checked for the name that connection was verified for."""
    proxy, wire, _ = make(two_sides(advertise))
    send(proxy, """REGISTER sip:provider.test SIP/2.0
Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-reg1;rport
Max-Forwards: 70
From: <sip:alice@provider.test>;tag=r1
To: <sip:alice@provider.test>
Call-ID: reg-tls-1
CSeq: 1 REGISTER
Contact: <sip:alice@192.168.1.10:5060>
Content-Length: 0

""")
    [(register, target)] = wire.requests
    assert target == Target("TLS", PROVIDER_IP, 5061, "provider.test")
    ok = register.make_response(200)
    ok.source = OVER_OURS
    proxy.receive(ok)
    send(proxy, LOCAL_REGISTER)
    send(proxy, PROVIDER_INVITE, OVER_OURS)
    invite, target = wire.requests[-1]
    assert target.transport == "UDP" and target.host == "192.168.1.10"
    # toward the provider: our outside listener's (advertised) address, not the kernel's
    rr_out = f"<sip:{advertise or OUTSIDE_IP}:5060;transport=tls;lr>"
    assert invite.headers.get_all("record-route") == [RR_UDP, rr_out]
    phone_answers(proxy, invite)
    assert [r.status for r, _ in wire.responses if r.status >= 200] == [200, 200, 200]
    # the provider's ACK: only our outside entry in its Route (it faces the provider)
    send(proxy, provider_ack(rr_out), OVER_OURS)
    ack, target = wire.requests[-1]
    assert ack.method == "ACK"
    assert (target.transport, target.host, target.port) == ("UDP", "192.168.1.10", 5060)
    send(proxy, f"""BYE sip:uas@{PROVIDER_IP}:5061;transport=tls SIP/2.0
Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-bye9;rport
Route: {RR_UDP}, {rr_out}
Max-Forwards: 70
From: <sip:alice@provider.test>;tag=ph1
To: <sip:carol@provider.test>;tag=c1
Call-ID: in-tls-1
CSeq: 1 BYE
Content-Length: 0

""")
    bye, target = wire.requests[-1]
    assert bye.method == "BYE"
    assert target == Target("TLS", PROVIDER_IP, 5061, "provider.test")


# -- config ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def build(section: dict[str, Any]) -> TLSPlugin:
    proxy, _, _ = make()
    return factory.build(proxy, Section("tls", section, "sipproxy.toml"))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"verfy": True}, "sipproxy.toml: tls.verfy: unknown key"),
        ({"ca": "/nonexistent/ca.pem"}, "sipproxy.toml: tls.ca: cannot read CA file"),
        ({"verify": "yes"}, 'sipproxy.toml: tls.verify: must be true or false, got "yes"'),
        ({"minimum_version": "1.1"}, "sipproxy.toml: tls.minimum_version: must be"),
        ({"keepalive_interval": -1}, "sipproxy.toml: tls.keepalive_interval: must be"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(section: dict[str, Any], message: str
                                                   ) -> None:
    with pytest.raises(ConfigError) as caught:
        build(section)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text, text


def test_certificate_needs_its_key(certs: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        build({"certificate": str(certs.client.cert)})
    assert str(caught.value) == "sipproxy.toml: tls.key: is required when certificate is set"
    with pytest.raises(ConfigError) as caught:
        build({"certificate": str(certs.client.cert), "key": str(certs.good.key)})
    assert str(caught.value).startswith("sipproxy.toml: tls.certificate: key file")


def test_good_config_and_verify_false_warns_at_start(certs: Any) -> None:
    plugin = build({"ca": str(certs.ca), "certificate": str(certs.client.cert),
                    "key": str(certs.client.key), "minimum_version": "1.3",
                    "keepalive_interval": 0})
    assert plugin.policy.keepalive_interval is None
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        plugin.startService()
        unverified = build({"verify": False})
        unverified.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_namespace") == "sipproxy.plugins.tls"]
    assert len(warnings) == 1
    assert "verify = false" in warnings[0]["log_format"]


def test_example_config_builds() -> None:
    """examples/tls.toml is a config the proxy accepts, with the tls plugin configured."""
    from pathlib import Path

    from sipproxy.config import load_config
    from sipproxy.service import makeService

    path = Path(__file__).resolve().parents[1] / "examples" / "tls.toml"
    service = makeService(load_config(str(path)), reactor=Clock())
    policy = service.proxy.transports.tls_client
    assert policy is not None and policy.keepalive_interval == 30.0


# -- our own connection (RFC 5923): what names us on it -------------------------------------
FLOW_PORT = 40000


class FlowWire(Wire):
    """Wire with the TransportManager's connection bookkeeping: ``open_flow`` is answered by
    the test (``opening``), an open one's local address is OUTSIDE_IP:FLOW_PORT."""

    def __init__(self, listeners: list[FakeListener]) -> None:
        super().__init__(listeners)
        self.flows: dict[tuple[str, int], tuple[str, int]] = {}
        self.opening: list[tuple[Target, Deferred[None]]] = []

    def flow_address(self, target: Target, listener: Any) -> tuple[str, int] | None:
        if target.transport != "TLS" or (listener is not None and listener.transport == "TLS"):
            return None
        local = self.flows.get((target.host, target.port))
        if local is None:
            return None
        return (listener.via_host if listener is not None else local[0]), local[1]

    def open_flow(self, target: Target) -> Deferred[None] | None:
        if target.transport != "TLS" or (target.host, target.port) in self.flows:
            return None
        d: Deferred[None] = Deferred()
        self.opening.append((target, d))
        return d

    def is_flow_port(self, port: int) -> bool:
        return port in {local[1] for local in self.flows.values()}


def make_flow(advertise: str | None = None) -> tuple[Proxy, FlowWire]:
    config = parse_config(two_sides(advertise))
    harness = ProxyHarness.build(config, wire=FlowWire(listeners_for(config)))
    return harness.proxy, cast(FlowWire, harness.wire)


@pytest.mark.parametrize("advertise", [None, EXTERNAL_IP])
def test_over_our_own_connection_everything_names_that_connection(
        advertise: str | None) -> None:
    """No TLS listener: the first request to the provider waits for the connection, then its
    Via (with ;alias) names the connection's address (the advertised one behind 1:1 NAT) and
    port; a call the provider places over it is Record-Routed there too, and the provider's
    ACK with that Route reaches the phone by UDP (the entry faces the provider)."""
    proxy, wire = make_flow(advertise)
    send(proxy, INVITE)
    assert wire.requests == []  # waiting for the connection
    [(target, opening)] = wire.opening
    assert target == Target("TLS", PROVIDER_IP, 5061, "provider.test")
    wire.flows[(PROVIDER_IP, 5061)] = (OUTSIDE_IP, FLOW_PORT)
    opening.callback(None)
    [(out, _)] = wire.requests
    us = f"{advertise or OUTSIDE_IP}:{FLOW_PORT}"
    assert str(out.top_via).startswith(f"SIP/2.0/TLS {us};") and "alias" in out.top_via.params
    assert out.headers.get_all("record-route") == [f"<sip:{us};transport=tls;lr>", RR_UDP]
    over_ours = Source("TLS", PROVIDER_IP, 5061, OUTSIDE_IP, FLOW_PORT, "outside")
    send(proxy, LOCAL_REGISTER)
    send(proxy, PROVIDER_INVITE, over_ours)
    invite, target = wire.requests[-1]
    assert target.transport == "UDP" and target.host == "192.168.1.10"
    rr_out = f"<sip:{us};transport=tls;lr>"
    assert invite.headers.get_all("record-route") == [RR_UDP, rr_out]
    phone_answers(proxy, invite)
    send(proxy, provider_ack(rr_out), over_ours)
    ack, target = wire.requests[-1]
    assert ack.method == "ACK" and "route" not in ack.headers  # our entry: removed
    assert (target.transport, target.host, target.port) == ("UDP", "192.168.1.10", 5060)


def test_a_connection_that_cannot_be_opened_is_tried_once() -> None:
    """The connection the request waited for failed (and the TLS layer logged it): the phone
    gets the 503 with the Warning, and nothing tries to connect a second time."""
    proxy, wire = make_flow()
    plugin = next(p for p in proxy.pipeline.plugins if isinstance(p, TLSPlugin))
    send(proxy, INVITE)
    [(target, opening)] = wire.opening
    error = TLSConnectError(target.host, target.port, "provider.test",
                            "certificate verify failed: certificate has expired",
                            verification=True)
    assert plugin.policy.on_failure is not None
    plugin.policy.on_failure(error)
    error.logged = True
    opening.errback(error)
    assert wire.requests == []
    finals = [r for r, _ in wire.responses if r.status >= 200]
    assert [r.status for r in finals] == [503]
    assert "certificate has expired" in (finals[0].headers.get("warning") or "")
