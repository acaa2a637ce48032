"""sipproxy.flood and the transports' part of it: rate limit and ban on a Clock, scanner
User-Agents, per-source connections and transactions, hostile TCP peers (endless header or
body, slow-loris), bounded memory; every refusal counted and logged once per interval."""

from __future__ import annotations

from dataclasses import fields
from inspect import signature
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial import unittest

from sipproxy.config import LimitsConfig, ListenConfig
from sipproxy.flood import FloodGuard
from sipproxy.flows import FlowTracker
from sipproxy.message import Limits, Message, Request
from sipproxy.transport import TransportManager
from sipproxy.transport.tcp import SIPStreamProtocol
from tests.proxy_harness import ALICE, BOB_1, INSIDE, invite, make_harness, only, request
from tests.tls_certs import certs

reactor: Any = _reactor
FLOODER = "203.0.113.9"
OTHER = "198.51.100.4"


def request_bytes(
    method: str = "OPTIONS", user_agent: str | None = None, call_id: str = "c1", branch: str = "1"
) -> bytes:
    ua = f"User-Agent: {user_agent}\r\n" if user_agent else ""
    return (
        f"{method} sip:bob@192.0.2.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bK-{branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{ua}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class LogCapture:
    def __init__(self, test: unittest.SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, namespace: str = "sipproxy.flood") -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events
                if str(e.get("log_namespace", "")).startswith(namespace)]


def guard(clock: Clock, **kw: Any) -> FloodGuard:
    kw.setdefault("messages_per_second", 10)
    kw.setdefault("burst", 20)
    kw.setdefault("ban_time", 60)
    kw.setdefault("exempt", ("10.0.0.0/8",))
    return FloodGuard(clock, **kw)


class RateAndBanTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.guard = guard(self.clock)

    def test_burst_then_ban_then_unban_after_ban_time(self) -> None:
        allowed = sum(self.guard.allow(FLOODER) for _ in range(100))
        self.assertEqual(allowed, 20)
        self.assertTrue(self.guard.is_banned(FLOODER))
        self.assertEqual(self.guard.counters["banned"], 1)
        self.clock.advance(59.9)
        self.assertFalse(self.guard.allow(FLOODER))
        self.clock.advance(0.2)
        self.assertFalse(self.guard.is_banned(FLOODER))
        self.assertTrue(self.guard.allow(FLOODER))
        self.assertEqual(self.guard.counters["unbanned"], 1)
        self.assertEqual(self.guard.counters["dropped_banned"], 80)
        texts = self.logs.texts()
        self.assertEqual(len(texts), 2, texts)
        self.assertIn(f"banned {FLOODER} for 60 s", texts[0])
        self.assertIn(f"unbanned {FLOODER} after 60", texts[1])
        self.assertIn("80 messages dropped", texts[1])

    def test_sustained_rate_is_allowed(self) -> None:
        for _ in range(600):  # 60 s at 9.5/s: under the rate, never banned
            self.assertTrue(self.guard.allow(FLOODER))
            self.clock.advance(1 / 9.5)
        self.assertFalse(self.guard.banned)

    def test_other_sources_and_exempt_are_unaffected(self) -> None:
        for _ in range(100):
            self.guard.allow(FLOODER)
        self.assertTrue(self.guard.allow(OTHER))
        self.assertTrue(all(self.guard.allow("10.1.2.3") for _ in range(10_000)))
        self.assertTrue(self.guard.allow("::ffff:10.1.2.3"))
        self.assertFalse(self.guard.is_banned("10.1.2.3"))

    def test_refusals_count_toward_a_ban(self) -> None:
        self.guard.allow(FLOODER)
        self.guard.penalize(FLOODER)  # refusal_weight 10 of 20 tokens
        self.assertFalse(self.guard.is_banned(FLOODER))
        self.guard.penalize(FLOODER)
        self.assertTrue(self.guard.is_banned(FLOODER))

    def test_memory_is_bounded_under_a_spoofed_source_flood(self) -> None:
        g = guard(self.clock, max_sources=1000)
        for i in range(5000):
            g.allow(f"198.18.{i // 256}.{i % 256}")
        self.assertLessEqual(len(g._buckets), 1000)
        self.assertEqual(g.counters["untracked"], 4000)
        # once they are idle they are pruned and new sources are tracked again
        self.clock.advance(10)
        self.assertTrue(g.allow("192.0.2.200"))
        self.assertIn("192.0.2.200", g._buckets)
        self.assertLessEqual(len(g._buckets), 1000)
        # and the ban table is capped too
        for i in range(3000):
            g.ban(f"198.19.{i // 256}.{i % 256}", "test")
        self.assertEqual(len(g.banned), 1000)
        g.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_sources_are_pruned(self) -> None:
        for i in range(100):
            self.guard.allow(f"192.0.2.{i}")
        self.clock.advance(61)
        self.guard.allow("192.0.2.200")
        self.assertEqual(list(self.guard._buckets), ["192.0.2.200"])

    def test_from_config(self) -> None:
        g = FloodGuard.from_config(self.clock, LimitsConfig(burst=3, exempt=(), max_dialogs=7))
        self.assertEqual([g.allow(FLOODER) for _ in range(4)], [True, True, True, False])
        self.assertEqual((g.ban_time, g.max_dialogs), (300.0, 7))
        g.stop()
        # the guard takes its keys by name: every key but these reaches it
        not_taken = {f.name for f in fields(LimitsConfig)} - set(signature(FloodGuard).parameters)
        self.assertEqual(not_taken, {"enabled", "idle_timeout", "message_timeout"})


class ScannerTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.guard = guard(self.clock, log_interval=60)

    def parse(self, data: bytes) -> Request:
        from sipproxy.message import parse_message

        message = parse_message(data)
        assert isinstance(message, Request)
        return message

    def test_blocked_user_agents_are_dropped_counted_and_logged_once(self) -> None:
        for agent in ("friendly-scanner", "SIPVicious 0.3", "sipcli/v1.8", "VaxSIPUserAgent"):
            self.guard.allow(OTHER)
            self.assertFalse(self.guard.screen(self.parse(request_bytes(user_agent=agent)), OTHER))
        self.assertTrue(self.guard.screen(self.parse(request_bytes(user_agent="Linphone")), OTHER))
        self.assertTrue(self.guard.screen(self.parse(request_bytes()), OTHER))
        self.assertEqual(self.guard.counters["scanner"], 4)
        texts = self.logs.texts()
        self.assertEqual(len(texts), 2, texts)  # one refusal line, then the ban after 2 refusals
        self.assertIn("scanner User-Agent 'friendly-scanner'", texts[0])
        self.assertIn(f"banned {OTHER}", texts[1])

    def test_exempt_sources_are_not_screened(self) -> None:
        msg = self.parse(request_bytes(user_agent="friendly-scanner"))
        self.assertTrue(self.guard.screen(msg, "10.9.9.9"))

    def test_configured_list(self) -> None:
        g = guard(self.clock, blocked_user_agents=("EvilBot",))
        self.assertTrue(g.blocked_user_agent("an evilbot/2"))
        self.assertFalse(g.blocked_user_agent("friendly-scanner"))
        self.assertFalse(guard(self.clock, blocked_user_agents=()).blocked_user_agent("x"))


class ConnectionAndTransactionLimitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)

    def test_connections_per_source_and_in_all(self) -> None:
        g = guard(self.clock, max_connections_per_source=2, max_connections=3,
                  refusal_weight=0)
        self.assertTrue(g.admit_connection(FLOODER))
        self.assertTrue(g.admit_connection(FLOODER))
        self.assertFalse(g.admit_connection(FLOODER))
        self.assertTrue(g.admit_connection(OTHER))
        self.assertFalse(g.admit_connection("10.0.0.1"))  # exempt, but 3 in all
        g.connection_closed(FLOODER)
        self.assertTrue(g.admit_connection("10.0.0.1"))
        g.connection_closed("10.0.0.1")
        self.assertTrue(g.admit_connection(FLOODER))
        self.assertEqual(g.counters["connections"], 2)
        g.ban(OTHER, "test")
        self.assertFalse(g.admit_connection(OTHER))

    def test_transactions_per_source(self) -> None:
        g = guard(self.clock, max_transactions_per_source=3, refusal_weight=0)
        self.assertEqual([g.transaction_started(FLOODER) for _ in range(4)],
                         [True, True, True, False])
        self.assertTrue(all(g.transaction_started("10.0.0.1") for _ in range(10)))
        g.transaction_ended(FLOODER)
        self.assertTrue(g.transaction_started(FLOODER))
        for _ in range(5):
            g.transaction_ended(FLOODER)
        self.assertEqual(g.transactions_from(FLOODER), 0)
        self.assertEqual(g._transactions, {})
        self.assertEqual(g.counters["transactions"], 1)


    def test_transactions_and_dialogs_in_all_count_only_outsiders(self) -> None:
        g = guard(self.clock, max_transactions=3, max_dialogs=2, refusal_weight=0)
        self.assertEqual([g.transaction_started(h) for h in (FLOODER, OTHER, "192.0.2.7",
                                                            "192.0.2.8")],
                         [True, True, True, False])
        self.assertEqual(g.counters["transactions_total"], 1)
        # the inside (exempt) is not held back by what outsiders opened
        self.assertTrue(all(g.transaction_started("10.0.0.1") for _ in range(10)))
        self.assertEqual(g.transaction_count, 3)
        g.transaction_ended("10.0.0.1")  # never counted: changes nothing
        g.transaction_ended(OTHER)
        self.assertTrue(g.transaction_started("192.0.2.8"))
        self.assertTrue(g.dialog_started(FLOODER) and g.dialog_started(OTHER))
        self.assertFalse(g.dialog_started("10.0.0.1"))  # exempt: not counted
        self.assertFalse(g.may_start_dialog("192.0.2.7"))
        self.assertTrue(g.may_start_dialog("10.0.0.1"))
        self.assertEqual(g.counters["dialogs_total"], 1)
        g.dialog_ended(FLOODER)
        self.assertTrue(g.may_start_dialog("192.0.2.7"))
        self.assertEqual(g.dialog_count, 1)
        unlimited = guard(self.clock, max_transactions=0, max_transactions_per_source=0)
        self.assertTrue(all(unlimited.transaction_started(FLOODER) for _ in range(1000)))

    def test_a_full_table_makes_room_before_it_refuses(self) -> None:
        g = guard(self.clock, max_connections=2, refusal_weight=0)
        self.assertTrue(g.admit_connection(FLOODER) and g.admit_connection(FLOODER))
        closed: list[str] = []

        def make_room() -> bool:
            g.connection_closed(FLOODER)
            closed.append(FLOODER)
            return True

        self.assertFalse(g.admit_connection(OTHER, lambda: False))
        self.assertTrue(g.admit_connection(OTHER, make_room))
        self.assertEqual(closed, [FLOODER])
        self.assertEqual((g.connection_count, g.connections_from(FLOODER)), (2, 1))
        # a source at its own limit does not make anyone else's connection go
        g2 = guard(self.clock, max_connections=1, max_connections_per_source=1)
        self.assertTrue(g2.admit_connection(FLOODER))
        self.assertFalse(g2.admit_connection(FLOODER, make_room))
        self.assertEqual(closed, [FLOODER])


class FailureBudgetTests(unittest.SynchronousTestCase):
    """failed(): limit failures within window seconds ban, through the same ban list."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.guard = guard(self.clock)

    def test_limit_within_window_bans_and_is_logged_once(self) -> None:
        g = self.guard
        self.assertEqual([g.failed(FLOODER, "auth", 3, 10) for _ in range(3)],
                         [False, False, True])
        self.assertTrue(g.is_banned(FLOODER))
        self.assertFalse(g.allow(FLOODER))
        self.assertFalse(g.admit_connection(FLOODER))
        self.assertTrue(g.failed(FLOODER, "auth", 3, 10))  # banned already: nothing new
        bans = [t for t in self.logs.texts() if t.startswith("banned")]
        self.assertEqual(bans, [f"banned {FLOODER} for 60 s: 3 failed auth attempts within "
                                "10 s"])
        self.clock.advance(61)
        self.assertFalse(g.is_banned(FLOODER))
        self.assertFalse(g.failed(FLOODER, "auth", 3, 10))  # a new start

    def test_failures_spread_wider_than_the_window_and_exempt_sources(self) -> None:
        g = self.guard
        for _ in range(10):
            self.assertFalse(g.failed(OTHER, "auth", 3, 10))
            self.clock.advance(6)
        for _ in range(10):
            self.assertFalse(g.failed("10.0.0.1", "auth", 3, 10))
            self.assertFalse(g.failed(FLOODER, "auth", 0, 10))
        self.assertEqual(g.banned, {})
        # budgets are apart from the message rate, and from each other
        self.assertFalse(g.failed(FLOODER, "auth", 2, 10))
        self.assertFalse(g.failed(FLOODER, "other", 2, 10))
        self.assertTrue(g.failed(FLOODER, "auth", 2, 10))

    def test_memory_is_bounded(self) -> None:
        g = guard(self.clock, max_sources=100)
        for i in range(1000):
            g.failed(f"198.51.{i // 250}.{i % 250}", "auth", 5, 10)
        self.assertLessEqual(len(g._failures), 100)
        self.clock.advance(11)
        g.failed(FLOODER, "auth", 5, 10)  # the full table forgets the expired ones
        self.assertEqual(len(g._failures), 1)


# --------------------------------------------------------------------------------------------
# The transports with a guard
# --------------------------------------------------------------------------------------------
class FakeUDP:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def manager_with_guard(clock: Clock, **kw: Any) -> tuple[TransportManager, list[Message]]:
    inbox: list[Message] = []
    specs = [ListenConfig(side="outside", transport="udp", address="192.0.2.1", port=5060),
             ListenConfig(side="outside", transport="tcp", address="192.0.2.1", port=5060)]
    manager = TransportManager(clock, inbox.append, specs, flood=guard(clock, **kw),
                               idle_timeout=60, message_timeout=5,
                               limits=Limits(max_message=4096, max_body=1024))
    from sipproxy.transport.udp import SIPDatagramProtocol

    udp = manager.listeners[0]
    proto = SIPDatagramProtocol(lambda data, addr: manager._datagram_received(udp, data, addr))
    proto.transport = FakeUDP()  # type: ignore[assignment]
    udp.udp = proto
    return manager, inbox


class ManagerTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.manager, self.inbox = manager_with_guard(self.clock)
        self.udp = self.manager.listeners[0].udp
        assert self.udp is not None

    def sent(self) -> list[tuple[bytes, tuple[str, int]]]:
        return self.udp.transport.sent  # type: ignore[union-attr]

    def test_banned_source_is_not_parsed_or_answered(self) -> None:
        import sipproxy.transport.manager as manager_module

        for i in range(20):
            self.udp.datagramReceived(request_bytes(call_id=f"c{i}"), (FLOODER, 5060))
        self.assertEqual(len(self.inbox), 20)
        parsed: list[bytes] = []
        real = manager_module.parse_message
        manager_module.parse_message = lambda data, limits: parsed.append(data) or real(
            data, limits)  # type: ignore[assignment]
        self.addCleanup(setattr, manager_module, "parse_message", real)
        for i in range(1000):
            self.udp.datagramReceived(b"garbage %d" % i, (FLOODER, 5060))
            self.udp.datagramReceived(request_bytes(call_id=f"d{i}"), (FLOODER, 5060))
        self.assertEqual(parsed, [])
        self.assertEqual(len(self.inbox), 20)
        self.assertEqual(self.sent(), [])
        # another source goes on as before
        self.udp.datagramReceived(request_bytes(call_id="other"), (OTHER, 5060))
        self.assertEqual(len(self.inbox), 21)
        self.clock.advance(61)
        self.udp.datagramReceived(request_bytes(call_id="after"), (FLOODER, 5060))
        self.assertEqual(len(self.inbox), 22)

    def test_garbage_bans_faster_and_scanner_is_dropped_silently(self) -> None:
        self.udp.datagramReceived(request_bytes(user_agent="friendly-scanner"), (OTHER, 5060))
        self.assertEqual(self.inbox, [])
        self.assertEqual(self.sent(), [])
        self.udp.datagramReceived(b"\x00\x01garbage", (FLOODER, 5060))
        self.udp.datagramReceived(b"\x00\x01garbage", (FLOODER, 5060))
        assert self.manager.flood is not None
        self.assertTrue(self.manager.flood.is_banned(FLOODER))
        self.assertEqual(self.manager.flood.counters["unparsable"], 2)
        self.assertEqual(self.manager.flood.counters["scanner"], 1)

    def test_connections_refused_at_accept_from_banned_and_over_limit(self) -> None:
        factory = self.manager.server_factory(self.manager.listeners[1])
        guard = self.manager.flood
        assert guard is not None
        guard.ban(FLOODER, "test")
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", FLOODER, 4000)))
        protos = []
        for port in range(32):
            proto = factory.buildProtocol(IPv4Address("TCP", OTHER, 4000 + port))
            assert proto is not None
            proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", OTHER, port)))
            protos.append(proto)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", OTHER, 5000)))
        self.assertEqual(guard.connections_from(OTHER), 32)
        protos[0].connectionLost()
        self.assertEqual(guard.connections_from(OTHER), 31)
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", OTHER, 5001)))

    def test_stream_from_a_source_that_gets_banned_is_cut(self) -> None:
        factory = self.manager.server_factory(self.manager.listeners[1])
        proto = factory.buildProtocol(IPv4Address("TCP", FLOODER, 4000))
        assert proto is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", FLOODER, 4000))
        proto.makeConnection(transport)
        proto.dataReceived(b"".join(request_bytes(call_id=f"c{i}") for i in range(30)))
        self.assertEqual(len(self.inbox), 20)
        self.assertTrue(transport.disconnecting)
        assert self.manager.flood is not None
        self.assertTrue(self.manager.flood.is_banned(FLOODER))
        proto.connectionLost()
        self.assertEqual(self.manager.flood.connections_from(FLOODER), 0)


class ConnectionTableTests(unittest.SynchronousTestCase):
    """A full table closes the oldest idle connection that carries no registration or dialog
    (sipproxy.flows); CRLF keepalives keep only such connections open."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.manager, self.inbox = manager_with_guard(self.clock, max_connections=3,
                                                      refusal_weight=0)
        self.manager.flows = FlowTracker()
        self.factory = self.manager.server_factory(self.manager.listeners[1])

    def connect(self, host: str, port: int) -> tuple[SIPStreamProtocol | None, StringTransport]:
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        if proto is not None:
            proto.makeConnection(transport)
        return proto, transport

    def test_full_table_closes_the_oldest_idle_connection_without_state(self) -> None:
        registered, t_registered = self.connect(OTHER, 4000)
        _, t_idle = self.connect(FLOODER, 4001)
        busy, t_busy = self.connect(FLOODER, 4002)
        assert registered is not None and busy is not None
        self.manager.flows.hold([("TCP", OTHER, 4000)])  # a binding's flow
        self.clock.advance(10)
        busy.dataReceived(request_bytes())  # a SIP message: the most recently active
        phone, t_phone = self.connect("192.0.2.50", 5000)
        self.assertIsNotNone(phone)
        self.assertTrue(t_idle.disconnected)
        self.assertFalse(t_registered.disconnecting or t_busy.disconnecting)
        flood = self.manager.flood
        assert flood is not None
        self.assertEqual((flood.connection_count, flood.connections_from(FLOODER)), (3, 1))
        self.assertEqual(flood.counters["connections_evicted"], 1)
        idle_proto = next(p for p in self.manager._streams if p.peer == (FLOODER, 4001))
        idle_proto.connectionLost()  # the abort completes: counted once only
        self.assertEqual(flood.connection_count, 3)
        # next the busy one, then the phone's: the registered one stays to the end
        self.connect("192.0.2.51", 5001)
        self.assertTrue(t_busy.disconnected)
        self.connect("192.0.2.52", 5002)
        self.assertTrue(t_phone.disconnected)
        self.manager.flows.hold([("TCP", "192.0.2.52", 5002)])  # a dialog's flow
        self.manager.flows.hold([("TCP", "192.0.2.51", 5001)])
        refused, _ = self.connect("192.0.2.53", 5003)
        self.assertIsNone(refused)
        self.assertFalse(t_registered.disconnecting)
        self.assertEqual(flood.counters["connections"], 1)
        texts = self.logs.texts()
        self.assertTrue(any(f"closed an idle connection from {FLOODER}:4001" in t
                            for t in texts), texts)

    def test_crlf_pings_keep_only_a_connection_with_state_open(self) -> None:
        bare, t_bare = self.connect(FLOODER, 4001)
        registered, t_registered = self.connect(OTHER, 4000)
        assert bare is not None and registered is not None
        self.manager.flows.hold([("TCP", OTHER, 4000)])
        for _ in range(10):  # idle_timeout is 60 s: a ping every 30 s
            bare.dataReceived(b"\r\n\r\n")
            registered.dataReceived(b"\r\n\r\n")
            self.clock.advance(30)
        self.assertTrue(t_bare.disconnecting)
        self.assertEqual(t_bare.value(), b"\r\n\r\n")  # its pings were answered until then
        self.assertFalse(t_registered.disconnecting)
        # a SIP message is traffic on any connection
        other, t_other = self.connect("192.0.2.60", 4002)
        assert other is not None
        for i in range(4):
            other.dataReceived(request_bytes(call_id=f"k{i}"))
            self.clock.advance(30)
        self.assertFalse(t_other.disconnecting)


class HostileStreamTests(unittest.SynchronousTestCase):
    """A TCP peer that sends an endless header or body, or trickles bytes, is cut off."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture(self)
        self.manager, self.inbox = manager_with_guard(self.clock)
        factory = self.manager.server_factory(self.manager.listeners[1])
        proto = factory.buildProtocol(IPv4Address("TCP", OTHER, 4000))
        assert isinstance(proto, SIPStreamProtocol)
        self.proto = proto
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", OTHER, 4000))
        self.proto.makeConnection(self.transport)

    def test_endless_header_is_cut_off_at_the_limit(self) -> None:
        self.proto.dataReceived(b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n")
        for _ in range(100):
            if self.transport.disconnecting:
                break
            self.proto.dataReceived(b"X-Junk: " + b"a" * 100 + b"\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(self.proto.framer.buffered, 4096 + 200)
        self.assertTrue(self.transport.value().startswith(b"SIP/2.0 513"), self.transport.value())
        self.assertEqual(self.inbox, [])

    def test_endless_body_is_refused_by_content_length(self) -> None:
        head = request_bytes().replace(b"Content-Length: 0", b"Content-Length: 99999999")
        self.proto.dataReceived(head + b"x" * 100)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.value().startswith(b"SIP/2.0 413"), self.transport.value())

    def test_slow_loris_is_cut_off_by_the_message_timeout(self) -> None:
        data = request_bytes()
        for i in range(len(data) - 1):  # one byte a second: the idle timer never fires
            self.proto.dataReceived(data[i : i + 1])
            if self.transport.disconnecting:
                break
            self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(self.clock.seconds(), 6)
        self.assertEqual(self.inbox, [])
        assert self.manager.flood is not None
        self.assertEqual(self.manager.flood.counters["slow"], 1)
        self.proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_whole_messages_in_time_keep_the_connection(self) -> None:
        data = request_bytes()
        for i in range(10):
            self.proto.dataReceived(data[:50])
            self.clock.advance(4)
            self.proto.dataReceived(data[50:].replace(b"c1", b"c%d" % i))
            self.clock.advance(4)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.inbox), 10)
        self.proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RealSocketTests(unittest.TestCase):
    """A banned source's TCP and TLS connections are closed at accept on real sockets."""

    timeout = 10

    @defer.inlineCallbacks
    def test_banned_source_is_refused_at_accept_over_tcp_and_tls(self):
        pair = certs().proxy
        specs = [
            ListenConfig(side="inside", transport="tcp", address="127.0.0.1", port=0),
            ListenConfig(side="inside", transport="tls", address="127.0.0.1", port=0,
                         certificate=str(pair.cert), key=str(pair.key)),
        ]
        flood = guard(reactor, exempt=())
        manager = TransportManager(reactor, lambda m: None, specs, flood=flood)
        manager.startService()
        self.addCleanup(manager.stopService)
        for listener in manager.listeners:
            client = Closed()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port)
            yield connectProtocol(endpoint, client)
            yield deferLater(reactor, 0.05, lambda: None)
            self.assertFalse(client.lost.called, listener)  # not banned: stays open
            client.transport.loseConnection()  # type: ignore[union-attr]
            yield client.lost
        flood.ban("127.0.0.1", "test")
        for listener in manager.listeners:
            client = Closed()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port)
            yield connectProtocol(endpoint, client)
            yield client.lost  # closed by the proxy at once, nothing sent
            self.assertEqual(client.data, b"")
        self.assertEqual(flood.connection_count, 0)


class Closed(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class ProxyLimitTests(unittest.SynchronousTestCase):
    """The proxy asks the guard: open transactions and dialogs per source (503 over them)."""

    def harness(self, **kw: Any) -> Any:
        h = make_harness()
        self.guard = guard(h.clock, exempt=(), refusal_weight=0, **kw)
        h.proxy._flood = self.guard
        return h

    def test_dialogs_per_source(self) -> None:
        h = self.harness(max_dialogs_per_source=1)
        h.register("bob", BOB_1)
        h.receive(invite())
        out = only(h.sent("INVITE"))
        h.respond(out, 200)
        self.assertEqual(self.guard.dialogs_from(ALICE.host), 1)
        h.receive(invite(call_id="call-2", branch="z9hG4bKalice2", from_="<sip:a@x>;tag=a2"))
        self.assertEqual(h.finals("INVITE")[-1], 503)
        self.assertEqual(len(h.sent("INVITE")), 1)  # not forwarded
        self.assertEqual(self.guard.counters["dialogs"], 1)
        # the BYE (in the dialog) goes through, and ends the dialog: calls are possible again
        h.receive(request("BYE", BOB_1, cseq=2, branch="z9hG4bKbye1",
                          to="<sip:bob@lan.example>;tag=callee",
                          extra=f"Route: <sip:{INSIDE}:5060;lr>"))
        h.respond(only(h.sent("BYE")), 200)
        self.assertEqual(self.guard.dialogs_from(ALICE.host), 0)
        h.receive(invite(call_id="call-3", branch="z9hG4bKalice3", from_="<sip:a@x>;tag=a3"))
        self.assertEqual(len(h.sent("INVITE")), 2)
        h.respond(h.sent("INVITE")[-1], 486)
        h.assert_no_leaks()
        self.assertEqual(self.guard._transactions, {})

    def test_transactions_per_source(self) -> None:
        h = self.harness(max_transactions_per_source=3)
        for i in range(5):  # to the provider, which never answers: they stay open
            h.receive(request("OPTIONS", "sip:carol@example.com", call_id=f"c{i}",
                              branch=f"z9hG4bKo{i}"))
        self.assertEqual(len(h.sent("OPTIONS")), 3)
        self.assertEqual(h.finals(), [503, 503])
        refused = [r for r, _ in h.wire.responses if r.status == 503]
        self.assertEqual({r.headers.get("Retry-After") for r in refused}, {"5"})
        h.settle()  # they time out (408) and end: the counts come back to zero
        self.assertEqual(self.guard._transactions, {})
        h.assert_no_leaks()
