"""sipproxy.transport: routing decisions, framing, and real UDP/TCP sockets on 127.0.0.1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from sipproxy.config import ListenConfig
from sipproxy.message import (
    Message,
    ParseError,
    Request,
    Response,
    Source,
    Via,
    parse_message,
    parse_via,
)
from sipproxy.transport import (
    Listener,
    ResponseRoute,
    TransportManager,
    route_response,
    stamp_via,
    stateless_error_response,
)
from sipproxy.transport.manager import SIZE_SWITCH_CONNECT_TIMEOUT
from sipproxy.transport.pool import ConnectionPool, pool_key
from sipproxy.transport.tcp import SIPStreamProtocol

try:
    from sipproxy.context import Target
except ImportError:  # dns.py is written in parallel; the transports only read these fields

    @dataclass(frozen=True)
    class Target:  # type: ignore[no-redef]
        transport: str
        host: str
        port: int
        server_name: str | None = None


LOCAL = "127.0.0.1"
reactor: Any = _reactor


def request_bytes(
    *,
    method: str = "OPTIONS",
    via: str = "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-1;rport",
    call_id: str = "call-1",
    body: bytes = b"",
) -> bytes:
    head = (
        f"{method} sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def response_bytes(via: str, status: int = 200, call_id: str = "call-1") -> bytes:
    return (
        f"SIP/2.0 {status} OK\r\n"
        f"Via: {via}\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>;tag=b1\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def parse_request(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def via(text: str) -> Via:
    return parse_via(text)


def udp_source(host: str = "192.0.2.7", port: int = 40000) -> Source:
    return Source("UDP", host, port, "10.0.0.1", 5060, "inside")


# --------------------------------------------------------------------------------------------
# Response routing: the decision alone
# --------------------------------------------------------------------------------------------
class RouteResponseTests(unittest.SynchronousTestCase):
    def test_udp_rport_and_received(self) -> None:
        v = via("SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1;received=192.0.2.7;rport=40000")
        self.assertEqual(route_response(v, udp_source()), ResponseRoute("UDP", "192.0.2.7", 40000))

    def test_udp_received_without_rport_uses_sent_by_port(self) -> None:
        v = via("SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1;received=192.0.2.7")
        self.assertEqual(route_response(v, udp_source()), ResponseRoute("UDP", "192.0.2.7", 5062))

    def test_udp_sent_by_default_port(self) -> None:
        v = via("SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK1")
        self.assertEqual(route_response(v, None), ResponseRoute("UDP", "192.0.2.9", 5060))

    def test_udp_rport_without_value_uses_source(self) -> None:
        v = via("SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1;rport")
        self.assertEqual(
            route_response(v, udp_source("192.0.2.7", 41000)),
            ResponseRoute("UDP", "192.0.2.7", 41000),
        )

    def test_maddr_is_ignored(self) -> None:
        """Issue 11: a requester's maddr sent the response (a 401 twice the REGISTER's size)
        to a third party."""
        v = via("SIP/2.0/UDP 192.0.2.7:5070;branch=z9hG4bK1;maddr=198.51.100.66")
        self.assertEqual(route_response(v, udp_source()), ResponseRoute("UDP", "192.0.2.7", 5070))
        v = via("SIP/2.0/UDP 10.1.1.1:5070;branch=z9hG4bK1;maddr=239.1.1.1;received=192.0.2.7"
                ";rport=40000")
        self.assertEqual(route_response(v, udp_source()), ResponseRoute("UDP", "192.0.2.7", 40000))

    def test_the_source_wins_over_a_received_it_does_not_match(self) -> None:
        v = via("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1;received=198.51.100.66")
        self.assertEqual(route_response(v, udp_source()), ResponseRoute("UDP", "192.0.2.7", 5062))
        v = via("SIP/2.0/TCP 192.0.2.7:5062;branch=z9hG4bK1;received=198.51.100.66")
        source = Source("TCP", "192.0.2.7", 40000, "10.0.0.1", 5060, "inside")
        self.assertEqual(route_response(v, source).host, "192.0.2.7")

    def test_tcp_reuses_the_request_connection(self) -> None:
        v = via("SIP/2.0/TCP 10.1.1.1:5062;branch=z9hG4bK1;received=192.0.2.7;rport=40000")
        source = Source("TCP", "192.0.2.7", 40000, "10.0.0.1", 5060, "inside")
        self.assertEqual(
            route_response(v, source),
            ResponseRoute("TCP", "192.0.2.7", 5062, connection=("192.0.2.7", 40000)),
        )

    def test_tls_default_port_and_no_connection_without_source(self) -> None:
        v = via("SIP/2.0/TLS proxy.example.com;branch=z9hG4bK1")
        self.assertEqual(route_response(v, None), ResponseRoute("TLS", "proxy.example.com", 5061))


class StampViaTests(unittest.SynchronousTestCase):
    def parse(self, via_text: str) -> Request:
        msg = parse_message(request_bytes(via=via_text))
        assert isinstance(msg, Request)
        return msg

    def test_rport_filled_and_received_added(self) -> None:
        req = self.parse("SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1;rport")
        stamp_via(req, udp_source("192.0.2.7", 40000))
        top = req.top_via
        assert top is not None
        self.assertEqual((top.received, top.rport), ("192.0.2.7", 40000))
        self.assertIn(b"received=192.0.2.7", req.to_bytes())

    def test_rport_forces_received_even_when_equal(self) -> None:
        req = self.parse("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1;rport")
        stamp_via(req, udp_source("192.0.2.7", 5062))
        top = req.top_via
        assert top is not None
        self.assertEqual((top.received, top.rport), ("192.0.2.7", 5062))

    def test_a_received_the_client_wrote_is_replaced(self) -> None:
        """Issue 11: sent-by equal to the source and no rport kept a client's received=VICTIM."""
        req = self.parse("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1;received=198.51.100.66")
        stamp_via(req, udp_source("192.0.2.7", 5062))
        top = req.top_via
        assert top is not None
        self.assertEqual(top.received, "192.0.2.7")
        self.assertEqual(route_response(top, None), ResponseRoute("UDP", "192.0.2.7", 5062))

    def test_an_rport_value_the_client_wrote_is_replaced(self) -> None:
        req = self.parse("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1;rport=9")
        stamp_via(req, udp_source("192.0.2.7", 5062))
        top = req.top_via
        assert top is not None
        self.assertEqual((top.received, top.rport), ("192.0.2.7", 5062))

    def test_untouched_when_sent_by_is_the_source(self) -> None:
        data = request_bytes(via="SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1")
        req = parse_message(data)
        assert isinstance(req, Request)
        stamp_via(req, udp_source("192.0.2.7", 5062))
        self.assertEqual(req.to_bytes(), data)


class StatelessErrorResponseTests(unittest.SynchronousTestCase):
    def test_copies_matching_headers_and_adds_to_tag(self) -> None:
        data = (
            b"INVITE sip:bob@example.com SIP/7.0\r\n"
            b"v: SIP/2.0/UDP 192.0.2.7:5062\r\n ;branch=z9hG4bK-x\r\n"
            b"Via: SIP/2.0/UDP 192.0.2.8;branch=z9hG4bK-y\r\n"
            b"f: <sip:a@example.com>;tag=1\r\nt: <sip:b@example.com>\r\n"
            b"i: abc\r\nCSeq: 8 INVITE\r\nX-Junk: ;;;\r\n\r\n"
        )
        answer = stateless_error_response(data, 505, "SIP version not supported")
        assert answer is not None
        resp = parse_message(answer)
        assert isinstance(resp, Response)
        self.assertEqual((resp.status, resp.reason), (505, "SIP version not supported"))
        self.assertEqual([v.branch for v in resp.vias], ["z9hG4bK-x", "z9hG4bK-y"])
        self.assertEqual((resp.call_id, resp.cseq.number, resp.cseq.method), ("abc", 8, "INVITE"))
        self.assertIsNotNone(resp.to.tag)
        self.assertNotIn(b"X-Junk", answer)

    def test_nothing_for_responses_acks_or_without_via(self) -> None:
        self.assertIsNone(stateless_error_response(response_bytes("SIP/2.0/UDP h"), 400, "x"))
        ack = request_bytes(method="ACK")
        self.assertIsNone(stateless_error_response(ack, 400, "x"))
        no_via = b"OPTIONS sip:a SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n"
        self.assertIsNone(stateless_error_response(no_via, 400, "x"))
        self.assertIsNone(stateless_error_response(b"\x00\x01garbage", 400, "x"))


class TortureDatagramTests(unittest.SynchronousTestCase):
    def test_rfc4475_datagrams_never_escape_and_answers_parse(self) -> None:
        """Every RFC 4475 message is delivered, answered with an error, or (responses) dropped."""
        corpus = Path(__file__).parent / "data" / "rfc4475"
        delivered: list[Message] = []
        manager = TransportManager(Clock(), delivered.append, [])
        files = sorted(corpus.glob("*.dat"))
        self.assertGreater(len(files), 40)
        for path in files:
            data = path.read_bytes()
            answers: list[bytes] = []
            before = len(delivered)
            manager._dispatch(data, udp_source(), answers.append)
            outcome = len(delivered) - before + len(answers)
            if data.startswith(b"SIP/"):
                self.assertEqual(answers, [], path.name)
            else:
                self.assertEqual(outcome, 1, path.name)
            for answer in answers:  # From/To are copied raw, so the answer may not parse itself
                self.assertRegex(answer, rb"\ASIP/2\.0 [45]\d\d [^\r\n]+\r\nVia: ", path.name)
                self.assertTrue(answer.endswith(b"\r\nContent-Length: 0\r\n\r\n"), path.name)


class _SentDatagrams:
    """A listener's UDP protocol stand-in: records what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class DatagramPeerTests(unittest.SynchronousTestCase):
    """A listener remembers its UDP peers' sources: every message still names its own peer,
    an unparsable request is answered to the peer that sent it, the table stays bounded."""

    def setUp(self) -> None:
        self.delivered: list[Message] = []
        self.manager = TransportManager(Clock(), self.delivered.append,
                                        [listen("inside", "udp", "10.0.0.1", 5060)])
        self.listener = self.manager.listeners[0]
        self.udp = _SentDatagrams()
        self.listener.udp = self.udp  # type: ignore[assignment]

    def test_each_message_names_its_peer_and_errors_go_back_to_it(self) -> None:
        peers = [("192.0.2.7", 40000), ("192.0.2.8", 40000), ("192.0.2.7", 40002)]
        bad = request_bytes().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        for _ in range(2):
            for host, port in peers:
                self.manager._datagram_received(self.listener, request_bytes(), (host, port))
                self.manager._datagram_received(self.listener, bad, (host, port))
        self.assertEqual([m.source for m in self.delivered],
                         [Source("UDP", h, p, "10.0.0.1", 5060, "inside") for h, p in peers] * 2)
        self.assertEqual([addr for _, addr in self.udp.sent], peers * 2)
        self.assertTrue(all(data.startswith(b"SIP/2.0 400 ") for data, _ in self.udp.sent))

    def test_a_flood_of_source_ports_does_not_grow_the_table(self) -> None:
        from sipproxy.transport.manager import PEERS_REMEMBERED

        for port in range(1024, 1024 + PEERS_REMEMBERED + 10):
            self.manager._datagram_received(self.listener, b"\x00junk", ("192.0.2.7", port))
        self.assertLessEqual(len(self.listener.peers), PEERS_REMEMBERED)
        self.manager._datagram_received(self.listener, request_bytes(), ("192.0.2.7", 1024))
        self.assertEqual(self.delivered[-1].source.port, 1024)


# --------------------------------------------------------------------------------------------
# Listener choice and the RFC 3261 18.1.1 size rule
# --------------------------------------------------------------------------------------------
def listen(side: str, transport: str, address: str = LOCAL, port: int = 0, advertise=None):
    return ListenConfig(
        side=side,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        address=address,
        port=port,
        advertise=advertise,
    )


class ChooseListenerTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.manager = TransportManager(
            Clock(),
            lambda m: None,
            [
                listen("inside", "udp", "10.0.0.1", 5060),
                listen("inside", "tcp", "10.0.0.1", 5060),
                listen("outside", "udp", "0.0.0.0", 5060, advertise="203.0.113.5"),
            ],
        )

    def test_side_and_transport(self) -> None:
        inside_tcp = self.manager.choose_listener(Target("TCP", "10.0.0.9", 5060, "10.0.0.9"))
        assert inside_tcp is not None
        self.assertEqual((inside_tcp.side, inside_tcp.transport), ("inside", "TCP"))
        out = self.manager.choose_listener(Target("UDP", "198.51.100.1", 5060, "198.51.100.1"))
        assert out is not None
        self.assertEqual((out.side, out.via_host, out.port), ("outside", "203.0.113.5", 5060))
        forced = self.manager.choose_listener(
            Target("UDP", "198.51.100.1", 5060, "198.51.100.1"), side="inside"
        )
        assert forced is not None
        self.assertEqual(forced.side, "inside")
        # no TLS listener: outgoing TLS leaves from (and names) a TCP, else UDP, socket of the
        # side facing the target
        tls = self.manager.choose_listener(Target("TLS", "198.51.100.1", 5061, "198.51.100.1"))
        assert tls is not None
        self.assertEqual((tls.side, tls.transport), ("outside", "UDP"))
        tls_in = self.manager.choose_listener(Target("TLS", "10.0.0.9", 5061, "10.0.0.9"))
        assert tls_in is not None
        self.assertEqual((tls_in.side, tls_in.transport), ("inside", "TCP"))

    def test_large_udp_requests_go_over_tcp(self) -> None:
        target = Target("UDP", "198.51.100.1", 5060, "198.51.100.1")
        self.assertEqual(self.manager.transport_for(1300, target), "UDP")
        self.assertEqual(self.manager.transport_for(1301, target), "TCP")
        self.assertEqual(self.manager.transport_for(5000, Target("TCP", "h", 1, "h")), "TCP")

    def test_a_size_switched_connection_gives_up_after_two_seconds(self) -> None:
        """A phone behind its own NAT drops the SYN: its call must not wait the full connect
        timeout (10 s) before the request goes over UDP."""
        reactor = MemoryReactorClock()
        manager = TransportManager(reactor, lambda m: None, [listen("outside", "udp"),
                                                             listen("outside", "tcp")])
        manager.running = True  # no sockets: the memory reactor records the connection attempt
        request = parse_request(request_bytes(via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-s",
                                              body=b"x" * 1400))
        manager.send_request(request, Target("UDP", "198.51.100.1", 5060, "198.51.100.1"))
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout),
                         ("198.51.100.1", 5060, SIZE_SWITCH_CONNECT_TIMEOUT))
        self.assertLess(SIZE_SWITCH_CONNECT_TIMEOUT, manager.connect_timeout)

    def test_unknown_transport_is_refused(self) -> None:
        self.assertRaises(ValueError, Listener, listen("outside", "sctp"))

    def test_a_response_without_its_request_source_is_not_sent(self) -> None:
        """Issue 11: a stray response left from the first UDP listener (the inside one)."""
        response = parse_message(response_bytes("SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bK1"))
        assert isinstance(response, Response)
        failure = self.failureResultOf(self.manager.send_response(response, None), ValueError)
        self.assertIn("where its request came from", str(failure.value))


# --------------------------------------------------------------------------------------------
# TCP framing on a fake transport
# --------------------------------------------------------------------------------------------
class RecordingOwner:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.framing_errors: list[tuple[ParseError, bytes]] = []
        self.lost = 0

    def stream_connected(self, proto: SIPStreamProtocol) -> None:
        pass

    def stream_message(self, proto: SIPStreamProtocol, data: bytes) -> None:
        self.messages.append(data)

    def stream_framing_error(
        self, proto: SIPStreamProtocol, error: ParseError, data: bytes
    ) -> None:
        self.framing_errors.append((error, data))
        proto.write(b"SIP/2.0 400 Bad Request\r\n\r\n")

    def stream_lost(self, proto: SIPStreamProtocol, reason: object) -> None:
        self.lost += 1


class StreamProtocolTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.owner = RecordingOwner()
        self.proto = SIPStreamProtocol(
            self.owner, self.clock, "inside", outgoing=False, idle_timeout=30.0
        )
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_two_messages_in_one_write(self) -> None:
        one = request_bytes(call_id="one", body=b"v=0\r\n")
        two = request_bytes(call_id="two")
        self.proto.dataReceived(one + two)
        self.assertEqual(self.owner.messages, [one, two])

    def test_one_message_in_three_writes(self) -> None:
        msg = request_bytes(body=b"hello body")
        self.proto.dataReceived(msg[:10])
        self.proto.dataReceived(msg[10:-4])
        self.assertEqual(self.owner.messages, [])
        self.proto.dataReceived(msg[-4:])
        self.assertEqual(self.owner.messages, [msg])

    def test_ping_gets_pong_and_pong_gets_nothing(self) -> None:
        self.proto.dataReceived(b"\r\n\r\n")
        self.assertEqual(self.transport.value(), b"\r\n")
        self.transport.clear()
        self.proto.dataReceived(b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.owner.messages, [])

    def test_framing_error_answers_then_closes(self) -> None:
        bad = request_bytes().replace(b"Content-Length: 0", b"Content-Length: -1")
        self.proto.dataReceived(bad)
        self.assertEqual(len(self.owner.framing_errors), 1)
        self.assertTrue(self.owner.framing_errors[0][1].startswith(b"OPTIONS "))
        self.assertTrue(self.transport.value().startswith(b"SIP/2.0 400"))
        self.assertTrue(self.transport.disconnecting)
        self.proto.dataReceived(request_bytes())  # ignored once closing
        self.assertEqual(self.owner.messages, [])

    def test_idle_timeout_closes_and_traffic_resets_it(self) -> None:
        self.clock.advance(20)
        self.proto.dataReceived(b"\r\n")
        self.clock.advance(20)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(10.5)
        self.assertTrue(self.transport.disconnecting)


class ConnectionPoolTests(unittest.SynchronousTestCase):
    """The queue-until-connected logic TCP and TLS share."""

    def setUp(self) -> None:
        self.pool = ConnectionPool()
        self.opened: list[defer.Deferred[SIPStreamProtocol]] = []
        self.key = pool_key("[2001:DB8::1]", 5061, "Provider.Test")

    def opener(self) -> defer.Deferred[SIPStreamProtocol]:
        self.opened.append(defer.Deferred())
        return self.opened[-1]

    def connection(self) -> tuple[SIPStreamProtocol, StringTransport]:
        proto = SIPStreamProtocol(RecordingOwner(), Clock(), "outside", outgoing=True,
                                  idle_timeout=None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_keys_spell_a_host_one_way(self) -> None:
        self.assertEqual(self.key, ("2001:db8::1", 5061, "provider.test"))
        self.assertEqual(pool_key("Example.COM", 5060), ("example.com", 5060, None))

    def test_requests_wait_for_one_connection_and_go_in_order(self) -> None:
        sent = [defer.Deferred() for _ in range(3)]
        for n, done in enumerate(sent):
            self.pool.send(self.key, b"m%d" % n, done, self.opener)
        waited = self.pool.wait(self.key, self.opener)
        self.assertEqual((len(self.opened), self.pool.opening), (1, 1))
        self.assertNoResult(sent[0])
        proto, transport = self.connection()
        self.opened[0].callback(proto)
        self.assertEqual(transport.value(), b"m0m1m2")
        self.assertEqual([self.successResultOf(d) for d in sent], [None] * 3)
        self.assertIs(self.successResultOf(waited), proto)
        self.assertEqual(self.pool.opening, 0)
        # reused, not opened again; forgotten once lost
        self.pool.send(self.key, b"m3", defer.Deferred(), self.opener)
        self.assertEqual((len(self.opened), transport.value()[-2:]), (1, b"m3"))
        self.pool.forget(proto)
        self.assertIsNone(self.pool.get(self.key))

    def test_a_failed_connection_fails_everything_that_waited(self) -> None:
        sent = [defer.Deferred() for _ in range(2)]
        for done in sent:
            self.pool.send(self.key, b"m", done, self.opener)
        waited = self.pool.wait(self.key, self.opener)
        self.opened[0].errback(error.ConnectionRefusedError())
        for d in [*sent, waited]:
            self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.pool.opening, 0)
        self.pool.send(self.key, b"m", defer.Deferred(), self.opener)
        self.assertEqual(len(self.opened), 2)  # the next request tries again

    def test_a_connection_closed_at_once_fails_them(self) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        self.pool.send(self.key, b"m", done, self.opener)
        proto, _ = self.connection()
        proto.close()
        self.opened[0].callback(proto)
        self.assertIn("closed at once", str(self.failureResultOf(done, ConnectionError).value))
        self.assertIsNone(self.pool.get(self.key))

    def test_an_opener_that_raises(self) -> None:
        def refuse() -> defer.Deferred[SIPStreamProtocol]:
            raise ConnectionError("the transport service is stopped")

        with self.assertRaises(ConnectionError):
            self.pool.send(self.key, b"m", defer.Deferred(), refuse)
        self.failureResultOf(self.pool.wait(self.key, refuse), ConnectionError)
        self.assertEqual(self.pool.opening, 0)

    def test_peers_are_found_per_kind(self) -> None:
        proto, _ = self.connection()
        proto.peer = ("192.0.2.1", 5060)
        self.pool.register_peer(proto)
        self.assertIs(self.pool.peer("TCP", "192.0.2.1", 5060), proto)
        self.assertIsNone(self.pool.peer("TLS", "192.0.2.1", 5060))
        proto.close()
        self.assertIsNone(self.pool.peer("TCP", "192.0.2.1", 5060))


class ImportTests(unittest.SynchronousTestCase):
    def test_no_import_cycle_between_transport_modules(self) -> None:
        """Each transport module may import the ones below it, never one that imports it back
        (imports for type checking included)."""
        import ast

        package = Path(__file__).parent.parent / "sipproxy" / "transport"
        graph: dict[str, set[str]] = {}
        for path in package.glob("*.py"):
            if path.stem == "__init__":
                continue
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    name = node.module
                    if name.startswith("sipproxy.transport."):
                        found.add(name.rsplit(".", 1)[1])
            graph[path.stem] = found
        self.assertIn("pool", graph)

        def reaches(start: str, goal: str, seen: set[str]) -> bool:
            for nxt in graph.get(start, set()):
                if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                    return True
            return False

        cycles = [m for m in graph if reaches(m, m, {m})]
        self.assertEqual(cycles, [])


# --------------------------------------------------------------------------------------------
# Real sockets on 127.0.0.1
# --------------------------------------------------------------------------------------------
class UDPClient(DatagramProtocol):
    def __init__(self) -> None:
        self.received: defer.DeferredQueue[tuple[bytes, tuple[str, int]]] = defer.DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.received.put((datagram, addr))

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.write(data, (LOCAL, port))


class TCPClient(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.changed: defer.DeferredQueue[bytes] = defer.DeferredQueue()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.changed.put(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class SocketTestCase(unittest.TestCase):
    timeout = 10

    def start_manager(self, *specs: ListenConfig) -> tuple[TransportManager, defer.DeferredQueue]:
        inbox: defer.DeferredQueue[Message] = defer.DeferredQueue()
        manager = TransportManager(reactor, inbox.put, list(specs), idle_timeout=30)
        manager.startService()
        self.addCleanup(manager.stopService)
        return manager, inbox

    def udp_client(self) -> tuple[UDPClient, int]:
        client = UDPClient()
        port = reactor.listenUDP(0, client, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return client, port.getHost().port

    @defer.inlineCallbacks
    def tcp_client(self, port: int):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = TCPClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port), client)
        self.addCleanup(client.close)
        return client


class UDPSocketTests(SocketTestCase):
    @defer.inlineCallbacks
    def test_receive_sets_source_and_response_goes_to_rport(self):
        manager, inbox = self.start_manager(listen("inside", "udp"))
        listener = manager.listeners[0]
        self.assertNotEqual(listener.port, 0)
        client, client_port = self.udp_client()
        # The sent-by port is wrong on purpose: rport must bring the answer to the real port.
        data = request_bytes(via="SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-u1;rport")
        client.send(data, listener.port)
        request = yield inbox.get()
        self.assertIsInstance(request, Request)
        self.assertEqual(
            request.source, Source("UDP", LOCAL, client_port, LOCAL, listener.port, "inside")
        )
        self.assertEqual(request.top_via.rport, client_port)

        response = request.make_response(200)
        yield manager.send_response(response, request.source)
        answer, addr = yield client.received.get()
        self.assertEqual(addr, (LOCAL, listener.port))
        self.assertTrue(answer.startswith(b"SIP/2.0 200 "))
        self.assertIn(f"rport={client_port}".encode(), answer)

    @defer.inlineCallbacks
    def test_malformed_request_gets_400_garbage_is_dropped_listener_survives(self):
        manager, inbox = self.start_manager(listen("inside", "udp"))
        port = manager.listeners[0].port
        client, _ = self.udp_client()
        for garbage in (
            b"SIP/2.0 999999 Nope\r\nVia: SIP/2.0/UDP 127.0.0.1\r\n\r\n",
            b"\x00\x01\x00\x00STUN-ish binding request",
            b"\r\n\r\n",
            b"",
        ):
            client.send(garbage, port)
        bad = request_bytes(call_id="bad").replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        client.send(bad, port)
        answer, _ = yield client.received.get()
        self.assertTrue(answer.startswith(b"SIP/2.0 400 "), answer)
        self.assertIn(b"Call-ID: bad", answer)
        self.assertIn(b"branch=z9hG4bK-1", answer)

        client.send(request_bytes(call_id="good"), port)
        request = yield inbox.get()
        self.assertEqual(request.call_id, "good")  # nothing else was delivered before it
        self.assertEqual(len(inbox.pending), 0)
        self.assertEqual(len(client.received.pending), 0)  # the garbage got no answer

    @defer.inlineCallbacks
    def test_datagram_larger_than_8_kib_arrives_whole(self):
        """Twisted reads 8 KiB of a datagram unless told: a 20 KB INVITE (a big SDP) is whole."""
        manager, inbox = self.start_manager(listen("inside", "udp"))
        client, _ = self.udp_client()
        body = b"a=x-filler:" + b"y" * 20000 + b"\r\n"
        client.send(request_bytes(method="INVITE", call_id="big", body=body),
                    manager.listeners[0].port)
        request = yield inbox.get()
        self.assertEqual((request.call_id, request.body), ("big", body))

    @defer.inlineCallbacks
    def test_send_request_over_udp(self):
        manager, _ = self.start_manager(listen("outside", "udp"))
        listener = manager.listeners[0]
        client, client_port = self.udp_client()
        req = parse_request(
            request_bytes(via=f"SIP/2.0/UDP {listener.via_host}:{listener.port};branch=z9hG4bK-s")
        )
        yield manager.send_request(req, Target("UDP", LOCAL, client_port, LOCAL))
        data, addr = yield client.received.get()
        self.assertEqual((data, addr), (req.to_bytes(), (LOCAL, listener.port)))

    @defer.inlineCallbacks
    def test_the_transaction_layers_sender_sends_datagrams_without_a_deferred(self):
        """``manager.sender`` (what the transaction layer sends through): a datagram to an IP
        address is sent before the call returns (``None``); a host name waits for its address
        (a Deferred); what cannot be sent raises at once instead of failing a Deferred."""
        manager, _ = self.start_manager(listen("outside", "udp"))
        listener = manager.listeners[0]
        client, client_port = self.udp_client()
        req = parse_request(
            request_bytes(via=f"SIP/2.0/UDP {listener.via_host}:{listener.port};branch=z9hG4bK-s")
        )
        self.assertIsNone(manager.sender.send_request(req, Target("UDP", LOCAL, client_port,
                                                                  LOCAL)))
        data, _ = yield client.received.get()
        self.assertEqual(data, req.to_bytes())
        named = manager.sender.send_request(req, Target("UDP", "localhost", client_port,
                                                        "localhost"))
        self.assertIsInstance(named, defer.Deferred)
        yield named
        data, _ = yield client.received.get()
        self.assertEqual(data, req.to_bytes())
        via = f"SIP/2.0/UDP {LOCAL}:{client_port};branch=z9hG4bK1"
        response = parse_message(response_bytes(via))
        assert isinstance(response, Response)
        self.assertRaises(ValueError, manager.sender.send_response, response, None)
        self.assertIsNone(manager.sender.send_response(
            response, Source("UDP", LOCAL, client_port, LOCAL, listener.port, "outside")))
        answer, _ = yield client.received.get()
        self.assertTrue(answer.startswith(b"SIP/2.0 200 "), answer)


class DualStackSocketTests(SocketTestCase):
    """A listener on C{::} serves IPv4 peers too (README): they appear as IPv4 addresses, not
    C{::ffff:a.b.c.d}, so inside networks, trusted peers and bans match them."""

    @defer.inlineCallbacks
    def test_ipv4_peers_of_a_dual_stack_listener_are_ipv4(self):
        manager, inbox = self.start_manager(listen("inside", "udp", address="::"),
                                            listen("inside", "tcp", address="::"))
        udp, tcp = manager.listeners
        client, client_port = self.udp_client()
        client.send(request_bytes(via="SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-d1;rport"),
                    udp.port)
        request = yield inbox.get()
        self.assertEqual((request.source.host, request.source.port), (LOCAL, client_port))
        yield manager.send_response(request.make_response(200), request.source)
        answer, _ = yield client.received.get()
        self.assertTrue(answer.startswith(b"SIP/2.0 200 "), answer)

        stream = yield self.tcp_client(tcp.port)
        stream.write(request_bytes(via="SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK-d2",
                                   call_id="d2"))
        request = yield inbox.get()
        self.assertEqual(request.source.host, LOCAL)
        yield manager.send_response(request.make_response(200), request.source)
        yield stream.changed.get()
        self.assertTrue(stream.data.startswith(b"SIP/2.0 200 "), stream.data)


class TCPSocketTests(SocketTestCase):
    @defer.inlineCallbacks
    def test_connection_reuse_both_ways(self):
        """Two requests share one connection; the answer returns on the accepted connection."""
        a, a_inbox = self.start_manager(listen("outside", "udp"), listen("outside", "tcp"))
        b, b_inbox = self.start_manager(listen("inside", "tcp"))
        b_port = b.listeners[0].port
        a_tcp = a.listeners[1]
        target = Target("TCP", LOCAL, b_port, LOCAL)
        first = parse_request(
            request_bytes(via=f"SIP/2.0/TCP {LOCAL}:{a_tcp.port};branch=z9hG4bK-t1", call_id="t1")
        )
        second = parse_request(
            request_bytes(via=f"SIP/2.0/TCP {LOCAL}:{a_tcp.port};branch=z9hG4bK-t2", call_id="t2")
        )
        sent = [a.send_request(first, target), a.send_request(second, target)]
        yield defer.gatherResults(sent)
        got1 = yield b_inbox.get()
        got2 = yield b_inbox.get()
        self.assertEqual((got1.call_id, got2.call_id), ("t1", "t2"))
        self.assertEqual(got1.source, got2.source)
        self.assertEqual(got1.source.side, "inside")
        self.assertEqual(len(b._streams), 1)
        self.assertEqual(len(a._streams), 1)

        # Via says port a_tcp.port, but the answer must come back over the same connection.
        yield b.send_response(got1.make_response(200), got1.source)
        answer = yield a_inbox.get()
        self.assertIsInstance(answer, Response)
        self.assertEqual(answer.call_id, "t1")
        self.assertEqual(answer.source.port, b_port)
        self.assertEqual(answer.source.side, "outside")
        self.assertEqual((len(a._streams), len(b._streams)), (1, 1))

        # And a request from b to a's peer address reuses the connection b accepted.
        back = parse_request(request_bytes(via=f"SIP/2.0/TCP {LOCAL}:{b_port};branch=z9hG4bK-b"))
        peer = got1.source.host
        yield b.send_request(back, Target("TCP", peer, got1.source.port, peer))
        got_back = yield a_inbox.get()
        self.assertEqual(got_back.source.port, b_port)
        self.assertEqual((len(a._streams), len(b._streams)), (1, 1))

    @defer.inlineCallbacks
    def test_large_request_to_udp_target_goes_over_tcp(self):
        a, _ = self.start_manager(listen("outside", "udp"), listen("outside", "tcp"))
        b, b_inbox = self.start_manager(listen("inside", "udp"), listen("inside", "tcp"))
        b_tcp = b.listeners[1]
        # The same port number for UDP and TCP is what 18.1.1 assumes; test it with b's TCP port.
        target = Target("UDP", LOCAL, b_tcp.port, LOCAL)
        body = b"x" * 1400
        transport = a.transport_for(len(request_bytes(body=body)), target)
        self.assertEqual(transport, "TCP")
        req = parse_request(
            request_bytes(
                via=f"SIP/2.0/{transport} {LOCAL}:{a.listeners[1].port};branch=z9hG4bK-L",
                body=body,
            )
        )
        yield a.send_request(req, target)
        got = yield b_inbox.get()
        self.assertEqual((got.source.transport, got.body), ("TCP", body))

    @defer.inlineCallbacks
    def test_large_request_to_a_udp_only_target_falls_back_to_udp(self):
        """A phone registered over UDP often has no TCP listener (linphone, desk phones): the
        request goes over UDP after all, its Via saying UDP, and the next one goes there at once."""
        a, _ = self.start_manager(listen("outside", "udp"), listen("outside", "tcp"))
        b, b_inbox = self.start_manager(listen("inside", "udp"))
        target = Target("UDP", LOCAL, b.listeners[0].port, LOCAL)
        body = b"x" * 1400
        for n in (1, 2):
            size = len(request_bytes(body=body))
            transport = a.transport_for(size, target)
            self.assertEqual(transport, "TCP" if n == 1 else "UDP")
            req = parse_request(request_bytes(
                via=f"SIP/2.0/{transport} {LOCAL}:{a.listeners[0].port};branch=z9hG4bK-U{n}",
                body=body, call_id=f"u{n}"))
            yield a.send_request(req, target)
            got = yield b_inbox.get()
            self.assertEqual((got.call_id, got.source.transport, got.body), (f"u{n}", "UDP", body))
            self.assertEqual(got.top_via.transport, "UDP")
            self.assertEqual(got.source.port, a.listeners[0].port)
        self.assertEqual(a.pool.opening, 0)

    @defer.inlineCallbacks
    def test_connect_failure_fails_the_deferred(self):
        a, _ = self.start_manager(listen("outside", "tcp"))
        # A port that was just free: bind, note it, close.
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface=LOCAL)
        dead = probe.getHost().port
        yield probe.stopListening()
        req = parse_request(request_bytes(via="SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK-f"))
        d = a.send_request(req, Target("TCP", LOCAL, dead, LOCAL))
        yield self.assertFailure(d, error.ConnectError)
        self.assertEqual(a.pool.opening, 0)

    @defer.inlineCallbacks
    def test_keepalive_framing_error_and_split_messages_on_a_real_socket(self):
        b, b_inbox = self.start_manager(listen("inside", "tcp"))
        client = yield self.tcp_client(b.listeners[0].port)
        msg = request_bytes(call_id="split")
        client.write(b"\r\n\r\n" + msg[:7])
        pong = yield client.changed.get()
        self.assertEqual(pong, b"\r\n")
        client.write(msg[7:])
        got = yield b_inbox.get()
        self.assertEqual((got.call_id, got.source.transport), ("split", "TCP"))

        bad = request_bytes(call_id="bad").replace(b"Content-Length: 0", b"Content-Length: x")
        client.write(bad)
        answer = yield client.changed.get()
        self.assertTrue(answer.startswith(b"SIP/2.0 400 "), answer)
        self.assertIn(b"Call-ID: bad", answer)
        yield client.lost  # the server closes right after answering


def test_a_listener_logs_the_address_it_advertises_only_when_it_has_one() -> None:
    # on every address without ``advertise`` it names the route's address toward each peer
    assert repr(Listener(listen("inside", "udp", "0.0.0.0", 5060))) == \
        "<Listener inside UDP 0.0.0.0:5060>"
    assert repr(Listener(listen("outside", "udp", "0.0.0.0", 5060, "203.0.113.5"))) == \
        "<Listener outside UDP 0.0.0.0:5060 via 203.0.113.5>"
    assert repr(Listener(listen("inside", "tcp", "192.0.2.1", 5060))) == \
        "<Listener inside TCP 192.0.2.1:5060 via 192.0.2.1>"
