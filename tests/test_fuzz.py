"""
Fuzzing the receive path in process, on a Clock: mutated valid messages (and the RFC 4475/5118
corpus) go into the parser, the stream framer, the stateless error answer and the whole
transport -> flood guard -> transaction -> proxy path. Nothing may raise anything but
ParseError, nothing may be logged as an unhandled failure, and once the timers have run no
transaction, context or per-source counter is left behind.

The default example counts keep the normal suite quick; the opt-in CI step of scripts/test runs
them with C{SIPPROXY_FUZZ_EXAMPLES} (thousands) as a separate, bounded step (C{-m fuzz}).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from sipproxy.config import parse_config
from sipproxy.errors import ParseError
from sipproxy.flood import FloodGuard
from sipproxy.location import LocationService
from sipproxy.message import Limits, Request, StreamFramer, parse_message
from sipproxy.proxy import Proxy
from sipproxy.registrar import Registrar
from sipproxy.testing import ResolverDouble
from sipproxy.transport import TransportManager, stateless_error_response
from sipproxy.transport.udp import SIPDatagramProtocol
from tests.fuzzing import chunked, examples, mutated
from tests.proxy_harness import CONFIG, PROVIDER

pytestmark = pytest.mark.fuzz

SETTINGS = settings(max_examples=examples(150), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

SOURCES = ("192.168.1.20", "192.168.1.21", "198.51.100.7", "203.0.113.99")


def exercise(message: Any) -> None:
    """Touch what the proxy reads of a message; only ParseError may come out."""
    for name in ("top_via", "vias", "cseq", "call_id", "from_", "to", "max_forwards"):
        getattr(message, name, None)
    message.to_bytes()
    if isinstance(message, Request):
        getattr(message, "uri", None)
        response = message.make_response(400)
        parse_message(response.to_bytes())


class FakeUDP:
    def __init__(self) -> None:
        self.sent = 0

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent += 1


class Stack:
    """A real TransportManager (fake UDP sockets), FloodGuard and Proxy on a Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        config = parse_config(CONFIG)
        receiver: list[Proxy] = []
        self.guard = FloodGuard(self.clock, exempt=(), messages_per_second=1e6, burst=10**6,
                                max_transactions_per_source=20)
        self.manager = TransportManager(self.clock, lambda m: receiver[0].receive(m),
                                        config.listen, flood=self.guard,
                                        limits=Limits(max_message=8192, max_body=4096))
        for listener in self.manager.listeners:
            proto = SIPDatagramProtocol(
                lambda data, addr, lst=listener: self.manager._datagram_received(lst, data, addr))
            proto.transport = FakeUDP()  # type: ignore[assignment]
            listener.udp = proto
        location = LocationService(self.clock)
        registrar = Registrar(location, self.clock, list(config.proxy.domains))
        resolver = ResolverDouble({"provider.example": [PROVIDER]})
        self.proxy = Proxy(config, self.clock, self.manager, location, registrar,
                           resolver)  # type: ignore[arg-type]
        receiver.append(self.proxy)

    def datagram(self, data: bytes, source: str, listener: int = 0) -> None:
        udp = self.manager.listeners[listener].udp
        assert udp is not None
        udp.datagramReceived(data, (source, 5060))

    def settle(self) -> None:
        for _ in range(100):
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))
        raise AssertionError("timers never stopped")


def describe(events: list[LogEvent]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) + "\n" + e["log_failure"].getTraceback() for e in events)


@SETTINGS
@given(mutated())
def test_parser_only_raises_parse_error(data: bytes) -> None:
    try:
        message = parse_message(data)
        exercise(message)
    except ParseError:
        pass
    answer = stateless_error_response(data, 400, "Bad Request")
    if answer is not None:
        # the raw Via/From/To/Call-ID/CSeq lines are copied, so it parses only as well as they
        # did; it is a bounded 400 with no CR or LF of its own inside a line
        assert answer.startswith(b"SIP/2.0 400 Bad Request\r\n")
        assert answer.endswith(b"\r\nContent-Length: 0\r\n\r\n")
        assert len(answer) <= len(data) + 200


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=6))
def test_framer_only_raises_parse_error_and_stays_bounded(
    messages: list[bytes], cuts: list[int]
) -> None:
    limits = Limits(max_message=8192, max_body=4096)
    framer = StreamFramer(limits)
    try:
        for chunk in chunked(b"".join(messages), cuts):
            for item in framer.feed(chunk):
                if isinstance(item, bytes):
                    try:
                        exercise(parse_message(item, limits))
                    except ParseError:
                        pass
            assert framer.buffered <= limits.max_message + limits.max_body + 4 + len(chunk)
    except ParseError:
        pass


def test_whole_receive_path(failures: list[LogEvent]) -> None:
    @SETTINGS
    @given(st.lists(st.tuples(mutated(), st.sampled_from(SOURCES), st.integers(0, 1)),
                    min_size=1, max_size=5))
    def run(datagrams: list[tuple[bytes, str, int]]) -> None:
        stack = Stack()
        for data, source, listener in datagrams:
            stack.datagram(data, source, listener)
        stack.settle()
        assert not failures, describe(failures)
        assert len(stack.proxy.transactions) == 0
        assert stack.proxy.requests_in_progress() == []
        assert stack.guard._transactions == {}, stack.guard._transactions
        assert stack.guard._dialogs == {}, stack.guard._dialogs

    run()


FOUND = [
    # a To without a host: the proxy could not build its answer, the transaction stayed open
    # for ever (one leaked transaction and one traceback per request)
    b"OPTIONS sip:user@example.com SIP/2.0\r\nTo: sip:;tag=user@example.com\r\n"
    b"From: sip:caller@example.org;tag=33242\r\nMax-Forwards: 3\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKabc\r\nCall-ID: x1\r\nCSeq: 8 OPTIONS\r\n"
    b"l: 0\r\n\r\n",
    # an ACK with a Request-URI nobody can route: a logged traceback per ACK
    b"ACK si3:bob@lan.example SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-a\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:fuzz@lan.example>;tag=fz1\r\nTo: <sip:bob@lan.example>\r\n"
    b"Call-ID: fuzz-ack@127.0.0.1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("data", FOUND, ids=["to-without-host", "ack-non-sip-uri"])
def test_what_the_fuzzer_found(data: bytes, failures: list[LogEvent]) -> None:
    stack = Stack()
    udp = stack.manager.listeners[0].udp
    assert udp is not None
    stack.datagram(data, SOURCES[0])
    stack.settle()
    assert not failures, describe(failures)
    assert len(stack.proxy.transactions) == 0
    assert stack.guard._transactions == {}
    sent = udp.transport.sent  # type: ignore[union-attr]
    assert sent == (1 if data.startswith(b"OPTIONS") else 0)  # the 400; nothing for the ACK
