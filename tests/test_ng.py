"""sipproxy.media.ng: framing, cookie echo, the reply cache, every command (with a fake UDP
reactor: no sockets), and the client and backends against the server over real UDP."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from sipproxy.interfaces import IMediaRelay
from sipproxy.media import bencode
from sipproxy.media.backends import LocalRelay, NGRelay, RelayedSdp
from sipproxy.media.engine import RelayEngine
from sipproxy.media.ng import (
    NGClient,
    NGCommands,
    NGError,
    NGServerProtocol,
    NGTimeout,
    decode_message,
)
from sipproxy.media.ports import RelayInterface
from sipproxy.sdp import parse_sdp

reactor: Any = _reactor
LOCAL = "127.0.0.1"

OFFER = (
    b"v=0\r\no=alice 1 1 IN IP4 192.168.1.20\r\ns=-\r\nc=IN IP4 192.168.1.20\r\nt=0 0\r\n"
    b"a=ice-ufrag:abcd\r\n"
    b"m=audio 4000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=rtcp:4001\r\n"
    b"a=candidate:1 1 udp 2130706431 192.168.1.20 4000 typ host\r\n"
    b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
    b"m=video 0 RTP/AVP 96\r\n"
)
ANSWER = (
    b"v=0\r\no=bob 7 7 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0\r\n"
    b"m=video 0 RTP/AVP 96\r\n"
)


class FakePort:
    def __init__(self, reactor: FakeUDPReactor, port: int, protocol: Any) -> None:
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> None:
        self.reactor.open.discard(self.port)


class FakeUDPReactor:
    """listenUDP without sockets (MemoryReactor has none)."""

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.busy: set[int] = set()

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
        if port in self.open or port in self.busy:
            raise CannotListenError(interface, port, OSError("in use"))
        self.open.add(port)
        return FakePort(self, port, protocol)


def make_engine(clock: Any = None) -> tuple[RelayEngine, FakeUDPReactor]:
    fake = FakeUDPReactor()
    engine = RelayEngine(
        fake,
        clock or Clock(),
        [RelayInterface("inside", "192.168.1.1"),
         RelayInterface("outside", "10.0.0.1", "203.0.113.1")],
        30000,
        30099,
    )
    return engine, fake


def offer_request(**extra: Any) -> dict[str, Any]:
    return {"command": "offer", "call-id": "c1", "from-tag": "A", "sdp": OFFER.decode(),
            **extra}


def answer_request(**extra: Any) -> dict[str, Any]:
    return {"command": "answer", "call-id": "c1", "from-tag": "A", "to-tag": "B",
            "sdp": ANSWER.decode(), **extra}


class CommandTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.engine, self.fake = make_engine(self.clock)
        self.commands = NGCommands(self.engine)

    def handle(self, **request: Any) -> dict[str, Any]:
        return self.commands.handle(request)

    def test_ping(self) -> None:
        self.assertEqual(self.handle(command="ping"), {"result": "pong"})

    def test_unknown_and_missing_command(self) -> None:
        self.assertEqual(self.handle(command="dance"),
                         {"result": "error", "error-reason": "Unrecognized command"})
        self.assertEqual(self.handle(command="__init__")["result"], "error")
        self.assertEqual(self.handle()["result"], "error")
        self.assertEqual(self.handle(command=["ping"])["result"], "error")

    def test_offer_rewrites_the_sdp(self) -> None:
        reply = self.commands.handle(offer_request(
            direction=["internal", "external"],  # rtpengine's names for inside/outside
            flags=["trust-address", "symmetric"],
            replace=["origin", "session-connection"],
            ICE="remove",
        ))
        self.assertEqual(reply["result"], "ok", reply)
        self.assertNotIn("warning", reply)
        out = parse_sdp(reply["sdp"].encode())
        self.assertEqual(out.origin.address, "203.0.113.1")  # the advertised outside address
        self.assertEqual(out.connection.address, "203.0.113.1")
        audio, video = out.media
        self.assertEqual(audio.port % 2, 0)
        self.assertTrue(30000 <= audio.port <= 30098)
        self.assertEqual(audio.rtcp.port, audio.port + 1)
        self.assertEqual(audio.candidates, [])
        self.assertFalse(out.has_attribute("ice-ufrag"))
        self.assertEqual(len(audio.crypto), 1)  # SRTP keys pass untouched
        self.assertIn(b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNf", reply["sdp"].encode())
        self.assertEqual(video.port, 0)  # a disabled stream stays disabled, without ports
        self.assertEqual(self.fake.open, {audio.port, audio.port + 1, *self.a_ports()})
        streams = self.engine.query("c1")["tags"]["A"]["medias"][0]["streams"]
        self.assertEqual(streams[0]["advertised endpoint"],
                         {"family": "IPv4", "address": "192.168.1.20", "port": 4000})
        self.assertEqual(streams[1]["advertised endpoint"]["port"], 4001)

    def a_ports(self) -> set[int]:
        leg = self.engine.calls["c1"].monologues["A"].medias[0]
        return {leg.rtp.local_port, leg.rtcp.local_port}

    def test_offer_keeps_session_c_without_replace_and_adds_media_c(self) -> None:
        out = parse_sdp(self.commands.handle(offer_request())["sdp"].encode())
        self.assertEqual(out.connection.address, "192.168.1.20")
        self.assertEqual(out.origin.address, "192.168.1.20")
        self.assertEqual(out.media[0].connection.address, "192.168.1.1")  # default interface

    def test_answer(self) -> None:
        offer = self.commands.handle(offer_request(direction=["inside", "outside"]))
        reply = self.commands.handle(answer_request(replace=["origin"]))
        self.assertEqual(reply["result"], "ok", reply)
        out = parse_sdp(reply["sdp"].encode())
        self.assertEqual(out.origin.address, "192.168.1.1")  # toward A: the inside address
        self.assertEqual(out.media[0].connection.address, "192.168.1.1")
        self.assertEqual(out.media[0].port, min(self.a_ports()))
        self.assertNotEqual(out.media[0].port, parse_sdp(offer["sdp"].encode()).media[0].port)
        tags = self.engine.query("c1")["tags"]
        self.assertEqual(tags["A"]["in dialogue with"], "B")
        self.assertEqual(tags["B"]["medias"][0]["streams"][0]["advertised endpoint"]["port"],
                         6000)

    def test_sip_source_address_uses_received_from(self) -> None:
        self.commands.handle(offer_request(flags=["SIP-source-address"],
                                           **{"received-from": ["IP4", "203.0.113.77"]}))
        ep = self.engine.query("c1")["tags"]["A"]["medias"][0]["streams"][0]
        self.assertEqual(ep["advertised endpoint"]["address"], "203.0.113.77")

    def test_answer_errors(self) -> None:
        self.assertEqual(self.commands.handle(answer_request()),
                         {"result": "error", "error-reason": "Unknown call-id"})
        self.commands.handle(offer_request())
        self.assertEqual(self.commands.handle(answer_request(**{"from-tag": "X"}))
                         ["error-reason"], "Unknown from-tag")
        request = answer_request()
        del request["to-tag"]
        self.assertEqual(self.commands.handle(request)["error-reason"], "No to-tag in message")

    def test_offer_bad_input(self) -> None:
        for request, reason in [
            ({"sdp": OFFER.decode(), "from-tag": "A"}, "No call-id in message"),
            ({"sdp": OFFER.decode(), "call-id": "c"}, "No from-tag in message"),
            ({"call-id": "c", "from-tag": "A"}, "No SDP body in message"),
            (offer_request(sdp="not sdp"), "Failed to parse SDP"),
            (offer_request(direction=["inside"]), "Invalid value for 'direction'"),
            (offer_request(direction=["inside", "dmz"]), "Unknown interface 'dmz'"),
            (offer_request(**{"received-from": ["IP4", "x"]}),
             "Invalid value for 'received-from'"),
            (offer_request(ICE="sometimes"), "Invalid value for 'ICE'"),
            (offer_request(**{"rtcp-mux": ["maybe"]}), "Invalid value for 'rtcp-mux'"),
            (offer_request(**{"transport-protocol": "TCP/MSRP"}),
             "Invalid value for 'transport-protocol'"),
            (offer_request(flags="trust-address", **{"call-id": 5}), "Invalid value for 'call id'"),
        ]:
            request.setdefault("command", "offer")
            reply = self.commands.handle(request)
            self.assertEqual(reply, {"result": "error", "error-reason": reason}, request)
        self.assertEqual(self.engine.calls, {})
        self.assertEqual(self.fake.open, set())

    def test_transport_protocol(self) -> None:
        reply = self.commands.handle(offer_request(**{"transport protocol": "RTP/AVPF"}))
        self.assertEqual(parse_sdp(reply["sdp"].encode()).media[0].proto, "RTP/AVPF")
        answer = self.commands.handle(answer_request(
            sdp=ANSWER.decode().replace("RTP/AVP 0", "RTP/AVPF 0")))
        self.assertEqual(parse_sdp(answer["sdp"].encode()).media[0].proto, "RTP/AVP")
        reply = self.commands.handle(offer_request(**{"call-id": "c2",
                                                      "transport-protocol": "RTP/SAVP"}))
        self.assertEqual(reply["result"], "error")
        self.assertIn("SRTP", reply["error-reason"])
        self.assertNotIn("c2", self.engine.calls)

    def test_unsupported_ice_is_a_warning(self) -> None:
        reply = self.commands.handle(offer_request(ICE="force"))
        self.assertEqual(reply["result"], "ok")
        self.assertIn("ICE", reply["warning"])

    def test_rtcp_mux_flags(self) -> None:
        muxed = OFFER.decode().replace("a=rtcp:4001\r\n", "a=rtcp-mux\r\n")
        out = parse_sdp(self.commands.handle(offer_request(sdp=muxed))["sdp"].encode())
        self.assertTrue(out.media[0].rtcp_mux)  # default: go along with the client
        out = parse_sdp(self.commands.handle(
            offer_request(sdp=muxed, **{"call-id": "c2", "rtcp-mux": ["demux"]}))["sdp"].encode())
        self.assertFalse(out.media[0].rtcp_mux)
        out = parse_sdp(self.commands.handle(
            offer_request(**{"call-id": "c3", "flags": ["rtcp-mux-require"]}))["sdp"].encode())
        self.assertTrue(out.media[0].rtcp_mux)
        self.assertIsNone(out.media[0].rtcp)

    def test_flags_key_value_form(self) -> None:
        out = parse_sdp(self.commands.handle(
            offer_request(flags=["replace-origin", "ICE=remove"]))["sdp"].encode())
        self.assertEqual(out.origin.address, "192.168.1.1")

    def test_query(self) -> None:
        self.assertEqual(self.handle(command="query", **{"call-id": "nope"}),
                         {"result": "error", "error-reason": "Unknown call-id"})
        self.assertEqual(self.handle(command="query")["error-reason"], "No call-id in message")
        self.commands.handle(offer_request())
        self.clock.advance(5)
        self.commands.handle(answer_request())
        reply = self.handle(command="query", **{"call-id": "c1"})
        self.assertEqual(reply["result"], "ok")
        self.assertEqual(reply["created"], 1_700_000_000)
        self.assertEqual(reply["last signal"], 1_700_000_005)
        self.assertEqual(set(reply["tags"]), {"A", "B"})
        media = reply["tags"]["A"]["medias"][0]
        self.assertEqual((media["index"], media["type"], media["protocol"]),
                         (1, "audio", "RTP/AVP"))
        self.assertEqual([s["flags"][0] for s in media["streams"]], ["RTP", "RTCP"])
        zero = {"packets": 0, "bytes": 0, "errors": 0}
        self.assertEqual(reply["totals"], {"RTP": zero, "RTCP": zero})
        bencode.encode(reply)  # the whole reply goes on the wire

    def test_delete(self) -> None:
        self.assertEqual(self.handle(command="delete", **{"call-id": "nope", "from-tag": "A"}),
                         {"result": "ok", "warning": "Call-ID not found or tags didn't match"})
        self.assertEqual(
            self.handle(command="delete", flags=["fatal"], **{"call-id": "x", "from-tag": "A"}),
            {"result": "error", "error-reason": "Unknown call-id"},
        )
        self.commands.handle(offer_request())
        self.commands.handle(answer_request())
        self.assertEqual(len(self.fake.open), 4)
        reply = self.handle(command="delete", **{"call-id": "c1", "from-tag": "A"})
        self.assertEqual(reply["result"], "ok")
        self.assertEqual(set(reply["tags"]), {"A", "B"})
        self.assertIn("totals", reply)
        self.assertEqual(self.fake.open, set())
        self.assertEqual(self.handle(command="query", **{"call-id": "c1"})["result"], "error")

    def test_list(self) -> None:
        self.assertEqual(self.handle(command="list"), {"result": "ok", "calls": []})
        for n in range(3):
            self.commands.handle(offer_request(**{"call-id": f"c{n}"}))
        self.assertEqual(self.handle(command="list")["calls"], ["c0", "c1", "c2"])
        self.assertEqual(self.handle(command="list", limit=2)["calls"], ["c0", "c1"])
        self.assertEqual(self.handle(command="list", limit=0)["result"], "error")

    def test_reoffer_keeps_ports_and_swaps_roles(self) -> None:
        first = parse_sdp(self.commands.handle(offer_request())["sdp"].encode())
        self.commands.handle(answer_request())
        again = parse_sdp(self.commands.handle(offer_request(**{"to-tag": "B"}))["sdp"].encode())
        self.assertEqual(first.media[0].port, again.media[0].port)
        # B re-INVITEs: B is now the offerer, A answers; the same four ports.
        reply = self.commands.handle({"command": "offer", "call-id": "c1", "from-tag": "B",
                                      "to-tag": "A", "sdp": ANSWER.decode()})
        self.assertEqual(parse_sdp(reply["sdp"].encode()).media[0].port, min(self.a_ports()))
        self.assertEqual(len(self.fake.open), 4)


class ServerTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.engine, self.fake = make_engine(self.clock)
        self.server = NGServerProtocol(NGCommands(self.engine), self.clock, cache_ttl=30)
        self.source = ("127.0.0.1", 40000)

    def send(self, datagram: bytes, source: Any = None) -> bytes | None:
        return self.server.reply_for(datagram, source or self.source)

    def test_cookie_is_echoed(self) -> None:
        self.assertEqual(self.send(b"5323_1 d7:command4:pinge"), b"5323_1 d6:result4:ponge")

    def test_retransmission_gets_the_identical_reply_and_runs_once(self) -> None:
        request = b"c-1 " + bencode.encode(offer_request())
        first = self.send(request)
        self.assertEqual(len(self.fake.open), 4)
        self.clock.advance(5)
        self.assertEqual(self.send(request), first)
        self.assertEqual(len(self.fake.open), 4)  # not executed again
        # Another cookie is another command (a re-offer: same ports, same answer).
        self.assertNotEqual(self.send(b"c-2 " + bencode.encode({"command": "list"})), first)

    def test_cache_entries_expire(self) -> None:
        delete = b"d-1 " + bencode.encode({"command": "delete", "call-id": "c1", "from-tag": "A"})
        self.send(b"o-1 " + bencode.encode(offer_request()))
        self.assertIn(b"ok", self.send(delete))
        self.assertEqual(self.engine.calls, {})
        self.send(b"o-2 " + bencode.encode(offer_request()))
        self.assertIn(b"6:result2:ok", self.send(delete))  # cached: the old reply
        self.assertIn("c1", self.engine.calls)
        self.clock.advance(31)
        self.send(b"o-3 " + bencode.encode(offer_request()))
        self.assertNotIn(b"warning", self.send(delete))
        self.assertEqual(self.engine.calls, {})  # expired: executed afresh

    def test_same_cookie_from_another_source_is_another_request(self) -> None:
        self.send(b"x " + bencode.encode({"command": "ping"}))
        reply = self.send(b"x " + bencode.encode({"command": "list"}), ("127.0.0.1", 40001))
        self.assertIn(b"calls", reply)

    def test_cache_is_bounded(self) -> None:
        server = NGServerProtocol(NGCommands(self.engine), self.clock, cache_size=10)
        for n in range(50):
            server.reply_for(b"%d d7:command4:pinge" % n, self.source)
        self.assertLessEqual(len(server._cache), 11)

    def test_malformed(self) -> None:
        self.assertIsNone(self.send(b"no-space-at-all"))
        self.assertIsNone(self.send(b" d7:command4:pinge"))
        self.assertIsNone(self.send(b"\x01\x02 d7:command4:pinge"))
        for body in (b"d7:command4:ping", b"li1ee", b"", b"\xff\xfe"):
            reply = self.send(b"k " + body)
            self.assertIsNotNone(reply)
            cookie, message, _ = decode_message(reply)
            self.assertEqual(cookie, b"k")
            self.assertEqual(message["result"], "error")
            self.clock.advance(31)

    def test_json_is_answered_in_json(self) -> None:
        self.assertEqual(self.send(b'j1 {"command": "ping"}'), b'j1 {"result":"pong"}')


class UDPTestCase(unittest.TestCase):
    timeout = 10

    def start_server(self, clock: Any = None) -> tuple[RelayEngine, int]:
        engine, _ = make_engine(clock)
        server = NGServerProtocol(NGCommands(engine), clock or Clock())
        port = reactor.listenUDP(0, server, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return engine, port.getHost().port

    def client(self, port: int, clock: Any = None, **kw: Any) -> NGClient:
        client = NGClient(reactor, LOCAL, port, clock=clock, **kw)
        client.start(LOCAL)
        self.addCleanup(client.stop)
        return client


class ClientTests(UDPTestCase):
    @defer.inlineCallbacks
    def test_commands_over_udp(self):
        _, port = self.start_server()
        client = self.client(port)
        self.assertEqual((yield client.command({"command": "ping"})), {"result": "pong"})
        reply = yield client.command(offer_request())
        self.assertIn("sdp", reply)
        with self.assertRaises(NGError) as info:
            yield client.command({"command": "query", "call-id": "nope"})
        self.assertEqual(info.exception.reason, "Unknown call-id")

    @defer.inlineCallbacks
    def test_an_answer_larger_than_8_kib_arrives_whole(self):
        """An answer carries the whole SDP (video, many codecs): Twisted reads 8 KiB of a
        datagram unless told more."""
        sdp = "v=0\r\n" + "a=x-filler:" + "y" * 20000 + "\r\n"

        class BigAnswers(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                cookie = data.split(b" ", 1)[0]
                assert self.transport is not None
                self.transport.write(cookie + b" " + bencode.encode(
                    {"result": "ok", "sdp": sdp}), addr)

        port = reactor.listenUDP(0, BigAnswers(), interface=LOCAL)
        self.addCleanup(port.stopListening)
        reply = yield self.client(port.getHost().port).command(offer_request())
        self.assertEqual(reply["sdp"], sdp)

    @defer.inlineCallbacks
    def test_retransmits_until_answered_then_times_out(self):
        clock = Clock()
        # A server that is not there: the client's tries run out on its clock.
        dead = reactor.listenUDP(0, NGServerProtocol(NGCommands(make_engine()[0]), Clock()),
                                 interface=LOCAL)
        dead_port = dead.getHost().port
        yield dead.stopListening()
        client = self.client(dead_port, clock, interval=1.0, tries=3)
        d = client.command({"command": "ping"})
        failures: list[Any] = []
        d.addErrback(failures.append)
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(failures, [])
        clock.advance(1)
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(NGTimeout))
        self.assertEqual(clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_retransmission_reaches_a_late_server(self):
        clock = Clock()

        class Deaf(NGServerProtocol):
            dropped = 0

            def datagramReceived(self, datagram, addr):
                if self.dropped < 1:
                    self.dropped += 1
                    return
                super().datagramReceived(datagram, addr)

        engine, _ = make_engine()
        deaf = Deaf(NGCommands(engine), Clock())
        listening = reactor.listenUDP(0, deaf, interface=LOCAL)
        self.addCleanup(listening.stopListening)
        client = self.client(listening.getHost().port, clock, interval=0.5, tries=4)
        d = client.command(offer_request())
        for _ in range(100):  # until the first datagram has surely arrived and been dropped
            if deaf.dropped:
                break
            yield deferLater(0.01)
        clock.advance(0.5)  # the retransmission
        reply = yield d
        self.assertEqual(reply["result"], "ok")
        self.assertEqual(list(engine.calls), ["c1"])


def deferLater(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class BackendTests(UDPTestCase):
    def test_both_provide_the_interface(self) -> None:
        engine, _ = make_engine()
        self.assertTrue(IMediaRelay.providedBy(LocalRelay(engine)))
        self.assertTrue(IMediaRelay.providedBy(NGRelay(NGClient(reactor, LOCAL, 1))))

    def test_local_relay(self) -> None:
        clock = Clock()
        engine, fake = make_engine(clock)
        relay = LocalRelay(engine)
        ended: list[tuple[str, str]] = []
        relay.add_end_observer(lambda c, r: ended.append((c, r)))
        offered = self.successResultOf(relay.offer("c1", "A", OFFER,
                                                   options={"ICE": "remove"}))
        self.assertIsInstance(offered, RelayedSdp)
        self.assertIn(b"m=audio 300", offered.sdp)
        self.successResultOf(relay.answer("c1", "A", "B", ANSWER))
        stats = self.successResultOf(relay.query("c1"))
        self.assertEqual(set(stats["tags"]), {"A", "B"})
        self.assertNotIn("result", stats)
        self.failureResultOf(relay.answer("nope", "A", "B", ANSWER), NGError)
        self.successResultOf(relay.ping())
        clock.advance(61)
        self.assertEqual(ended, [("c1", "timeout")])
        self.assertEqual(fake.open, set())
        self.assertEqual(self.successResultOf(relay.delete("c1", "A")), {})

    @defer.inlineCallbacks
    def test_ng_relay_reports_calls_the_relay_lost(self):
        engine, port = self.start_server()
        clock = Clock()
        relay = NGRelay(self.client(port), clock=clock, poll_interval=10)
        ended: list[tuple[str, str]] = []
        relay.add_end_observer(lambda c, r: ended.append((c, r)))
        result = yield relay.offer("c1", "A", OFFER)
        self.assertIn(b"c=IN IP4 192.168.1.1", result.sdp)
        yield relay.answer("c1", "A", "B", ANSWER)
        yield relay.offer("c2", "A", OFFER)
        yield relay.poll()
        self.assertEqual(ended, [])
        engine.delete("c1")  # e.g. it timed out there, or the relay restarted
        relay.start()
        self.addCleanup(relay.stop)
        yield relay.poll()
        self.assertEqual(ended, [("c1", "gone")])
        yield relay.delete("c2", "A")
        self.assertEqual(relay.calls, set())
