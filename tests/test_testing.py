"""sipproxy.testing's doubles behave as what they stand in for: the resolver as RFC 3263 has it
for IP literals, the wire as the transports pick listeners and route stateless responses, a
config dict reads as the TOML it stands for, and the harness tells a call still going from one
that left nothing behind."""

from __future__ import annotations

from typing import Any

import pytest

from sipproxy.config import parse_config
from sipproxy.context import Target
from sipproxy.message import Response, Source, parse_message
from sipproxy.testing import (
    FakeListener,
    ProxyHarness,
    RecordingWire,
    ResolverDouble,
    answer,
    listen_toml,
    sip_request,
    toml_text,
)

INSIDE = FakeListener("inside", "UDP", "192.168.1.1", 5060, "192.168.1.1")
OUTSIDE = FakeListener("outside", "UDP", "203.0.113.10", 5060, "203.0.113.10")
OUTSIDE_TCP = FakeListener("outside", "TCP", "203.0.113.10", 5060, "203.0.113.10")


def resolved(resolver: ResolverDouble, *args: Any) -> list[Target]:
    results: list[list[Target]] = []
    resolver.resolve(*args).addCallback(results.append)
    [targets] = results
    return targets


def test_resolver_names_come_from_the_table_and_literals_resolve_to_themselves() -> None:
    provider = Target("UDP", "198.51.100.7", 5070, "provider.example")
    resolver = ResolverDouble({"Provider.Example": [provider]})
    assert resolved(resolver, "provider.example", None, None, False) == [provider]
    assert resolved(resolver, "unknown.example", None, None, False) == []
    assert resolved(resolver, "192.0.2.1", None, None, False) == [
        Target("UDP", "192.0.2.1", 5060, "192.0.2.1")]
    assert resolved(resolver, "192.0.2.1", None, "tcp", False) == [
        Target("TCP", "192.0.2.1", 5060, "192.0.2.1")]
    assert resolved(resolver, "192.0.2.1", None, None, True, "provider.test") == [
        Target("TLS", "192.0.2.1", 5061, "provider.test")]
    assert [c[0] for c in resolver.calls] == ["provider.example", "unknown.example",
                                              "192.0.2.1", "192.0.2.1", "192.0.2.1"]


def test_resolver_holds_answers_until_released() -> None:
    resolver = ResolverDouble()
    resolver.hold = True
    results: list[list[Target]] = []
    resolver.resolve("192.0.2.1", 5062, None, False).addCallback(results.append)
    assert results == []
    resolver.release()
    assert results == [[Target("UDP", "192.0.2.1", 5062, "192.0.2.1")]]


def test_wire_picks_listeners_as_the_transports_do() -> None:
    wire = RecordingWire([INSIDE, OUTSIDE, OUTSIDE_TCP])
    assert wire.choose_listener(Target("UDP", "10.1.2.3", 5060, "")) is INSIDE
    assert wire.choose_listener(Target("UDP", "127.0.0.1", 5060, "")) is INSIDE
    assert wire.choose_listener(Target("UDP", "169.254.7.7", 5060, "")) is INSIDE
    assert wire.choose_listener(Target("UDP", "198.51.100.7", 5060, "")) is OUTSIDE
    assert wire.choose_listener(Target("TCP", "198.51.100.7", 5060, "")) is OUTSIDE_TCP
    # no TLS listener: outgoing TLS names the side's TCP listener
    assert wire.choose_listener(Target("TLS", "198.51.100.7", 5061, "")) is OUTSIDE_TCP
    # no TCP listener at all: TCP leaves from the side's UDP one
    assert RecordingWire([INSIDE, OUTSIDE]).choose_listener(
        Target("TCP", "192.168.1.20", 5060, "")) is INSIDE
    assert wire.choose_listener(Target("UDP", "198.51.100.7", 5060, ""), side="inside") is INSIDE
    assert wire.transport_for(1301, Target("UDP", "198.51.100.7", 5060, "")) == "TCP"
    assert wire.transport_for(1300, Target("UDP", "198.51.100.7", 5060, "")) == "UDP"


def test_a_stateless_response_goes_where_its_top_via_says() -> None:
    wire = RecordingWire([INSIDE])
    response = parse_message(
        b"SIP/2.0 400 Bad Request\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.5:5060;received=192.0.2.9;rport=40000;branch=z9hG4bKx\r\n"
        b"From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n")
    assert isinstance(response, Response)
    wire.send_response(response, None)
    assert [to for _, to in wire.datagrams] == [("192.0.2.9", 40000)]
    assert [r.status for r in wire.responses_to("192.0.2.9")] == [400]
    assert [m.status for _, m, _ in wire.new()] == [400]
    assert wire.new() == []


def test_a_config_dict_reads_as_its_toml() -> None:
    config = {
        "proxy": {"domains": ["lan.example"], "user_agent": 'say "hi"'},
        "listen": [{"side": "inside", "transport": "udp", "address": "192.168.1.1", "port": 5060},
                   {"side": "outside", "transport": "udp", "address": "203.0.113.10",
                    "port": 5060}],
        "upstream": {"uri": "sip:203.0.113.50:5060"},
    }
    parsed = parse_config(toml_text(config))
    assert parsed.proxy.domains == ("lan.example",)
    assert parsed.proxy.user_agent == 'say "hi"'
    assert [(lc.side, lc.address) for lc in parsed.listen] == [
        ("inside", "192.168.1.1"), ("outside", "203.0.113.10")]
    harness = ProxyHarness.build(config, plugins=[])
    assert [lst.address for lst in harness.wire.listeners] == ["192.168.1.1", "203.0.113.10"]
    assert harness.plugins == []


def test_a_call_waiting_for_its_answer_is_left_until_it_ends() -> None:
    harness = ProxyHarness.build({
        "proxy": {"domains": []},
        "listen": [{"side": "inside", "transport": "udp", "address": "192.168.1.1", "port": 5060}],
        "upstream": {"uri": "sip:192.168.1.50:5060"},
    }, plugins=[])
    phone = Source("UDP", "192.168.1.20", 5062, "192.168.1.1", 5060, "inside")
    harness.receive(sip_request("INVITE", "sip:bob@provider.example",
                                via="SIP/2.0/UDP 192.168.1.20:5062;branch=z9hG4bK1",
                                from_="<sip:a@lan.example>;tag=1",
                                to="<sip:bob@provider.example>", call_id="c1"), phone)
    assert [ctx.request.method for ctx in harness.proxy.requests_in_progress()] == ["INVITE"]
    with pytest.raises(AssertionError, match="left"):
        harness.assert_nothing_left()
    [out] = harness.wire.requests_to("192.168.1.50", "INVITE")
    harness.receive(answer(out, 486, "b1"), Source("UDP", "192.168.1.50", 5060, "192.168.1.1",
                                                   5060, "inside"))
    harness.settle()
    assert harness.proxy.requests_in_progress() == []
    harness.assert_nothing_left()


def test_listen_toml_reads_as_the_listeners_it_names() -> None:
    text = "[proxy]\ndomains = []\n" + listen_toml(inside="192.168.1.1", outside="203.0.113.10",
                                                    port=5070)
    assert [(lc.side, lc.transport, lc.address, lc.port) for lc in parse_config(text).listen] == [
        ("inside", "udp", "192.168.1.1", 5070), ("outside", "udp", "203.0.113.10", 5070)]
    assert "transport" not in listen_toml(outside="203.0.113.10", transport=None)
    tcp = parse_config(listen_toml(outside="203.0.113.10", transport="tcp"))
    assert [(lc.side, lc.transport) for lc in tcp.listen] == [("outside", "tcp")]
