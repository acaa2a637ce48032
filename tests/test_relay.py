"""The relay engine (sipproxy.media.engine): real UDP on 127.0.0.1 crossing the relay,
latching, strict source, rtcp-mux, counters, timeouts (task.Clock), and every port closed on
every end path."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from sipproxy.media.engine import RelayEngine
from sipproxy.media.errors import OutOfPorts, RelayError
from sipproxy.media.offer_answer import MAX_STREAMS, SignalOptions
from sipproxy.media.ports import RelayInterface
from sipproxy.sdp import parse_sdp
from tests.relay_phones import LOCAL, Phone, rtp, sdp

reactor: Any = _reactor
# A range of its own per test process, away from the ephemeral ports the tests' clients get.
PORT_MIN = 42000 + (os.getpid() % 50) * 100
PORT_MAX = PORT_MIN + 99


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((LOCAL, port))
        except OSError:
            return False
    return True


class RelayTestCase(unittest.TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = RelayEngine(
            reactor,
            self.clock,
            [RelayInterface("inside", LOCAL), RelayInterface("outside", LOCAL)],
            PORT_MIN,
            PORT_MAX,
            timeout=60,
            silent_timeout=600,
            offer_timeout=300,
        )
        self.ended: list[tuple[str, str]] = []
        self.engine.timeout_observers.append(lambda c, r: self.ended.append((c, r)))
        self.addCleanup(self.stop_engine)

    def stop_engine(self) -> defer.Deferred[Any]:
        return defer.gatherResults(self.engine.stop())

    def phone(self) -> tuple[Phone, int]:
        p = Phone()
        port = reactor.listenUDP(0, p, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return p, port.getHost().port

    def call(
        self, a_port: int, b_port: int, options: SignalOptions | None = None, **kw: str
    ) -> tuple[int, int]:
        """Offer from A, answer from B; returns (port A sends to, port B sends to)."""
        opts = options or SignalOptions(direction=("inside", "outside"))
        offer = self.engine.offer("c1", "A", parse_sdp(sdp(a_port, **kw)), opts)
        answer = self.engine.answer("c1", "A", "B", parse_sdp(sdp(b_port)), opts)
        return answer.media[0].port, offer.media[0].port

    @defer.inlineCallbacks
    def wait_closed(self, ports: list[int]):
        for _ in range(50):  # the sockets close on the next reactor turns
            if all(port_is_free(p) for p in ports):
                return
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d
        self.fail(f"ports still open: {[p for p in ports if not port_is_free(p)]}")


class CrossingTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_media_crosses_both_ways_latching_to_the_real_source(self):
        a, a_real = self.phone()
        b, b_port = self.phone()
        # A's SDP names port 9: it sends from another (it is behind NAT).
        to_a_side, to_b_side = self.call(9, b_port)
        self.assertEqual(to_a_side % 2, 0)
        self.assertEqual(to_b_side % 2, 0)
        a.send(rtp(1), to_a_side)
        data, source = yield b.received.get()
        self.assertEqual(data, rtp(1))
        self.assertEqual(source, (LOCAL, to_b_side))  # B hears the relay from where it sends
        b.send(rtp(2, b"reply"), to_b_side)
        data, source = yield a.received.get()
        self.assertEqual(data, rtp(2, b"reply"))
        self.assertEqual(source, (LOCAL, to_a_side))
        stats = self.engine.query("c1")
        a_stream = stats["tags"]["A"]["medias"][0]["streams"][0]
        self.assertEqual(a_stream["endpoint"]["port"], a_real)
        self.assertEqual(a_stream["advertised endpoint"]["port"], 9)
        self.assertEqual(a_stream["stats"], {"packets": 1, "bytes": len(rtp(1)), "errors": 0,
                                              "packets lost": 0})
        self.assertIn("confirmed", a_stream["flags"])
        self.assertEqual(stats["totals"]["RTP"]["packets"], 2)
        self.assertEqual(a_stream["last packet"], 0)  # the Clock's time

    @defer.inlineCallbacks
    def test_packets_pass_byte_for_byte_srtp_and_all(self):
        a, a_port = self.phone()
        b, b_port = self.phone()
        crypto = (
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
        )
        offer = self.engine.offer(
            "c1", "A", parse_sdp(sdp(a_port, extra=crypto).replace(b"RTP/AVP", b"RTP/SAVP")),
            SignalOptions(),
        )
        self.assertIn(crypto.encode(), offer.to_bytes())
        answer = self.engine.answer(
            "c1", "A", "B", parse_sdp(sdp(b_port).replace(b"RTP/AVP", b"RTP/SAVP")),
            SignalOptions(),
        )
        packet = bytes(range(256)) * 4  # what SRTP looks like to a relay: opaque bytes
        a.send(packet, answer.media[0].port)
        data, _ = yield b.received.get()
        self.assertEqual(data, packet)

    @defer.inlineCallbacks
    def test_strict_source_drops_other_sources_after_latching(self):
        a, a_port = self.phone()
        intruder, _ = self.phone()
        b, b_port = self.phone()
        opts = SignalOptions(strict_source=True)
        to_a_side, _ = self.call(a_port, b_port, opts)
        a.send(rtp(1), to_a_side)
        yield b.received.get()
        intruder.send(rtp(66, b"evil"), to_a_side)
        a.send(rtp(2), to_a_side)
        data, _ = yield b.received.get()
        self.assertEqual(data, rtp(2))
        stream = self.engine.query("c1")["tags"]["A"]["medias"][0]["streams"][0]
        self.assertEqual(stream["stats"]["packets"], 2)
        self.assertEqual(stream["stats"]["errors"], 1)
        self.assertEqual(len(b.received.pending), 0)

    @defer.inlineCallbacks
    def test_without_strict_source_the_latch_stays(self):
        a, a_port = self.phone()
        other, _ = self.phone()
        b, b_port = self.phone()
        to_a_side, to_b_side = self.call(a_port, b_port)
        a.send(rtp(1), to_a_side)
        yield b.received.get()
        other.send(rtp(2), to_a_side)  # forwarded, but B's answers still go to A
        yield b.received.get()
        b.send(rtp(3), to_b_side)
        data, _ = yield a.received.get()
        self.assertEqual(data, rtp(3))

    @defer.inlineCallbacks
    def test_rtcp_on_its_own_port_and_demuxed(self):
        a, a_port = self.phone()
        b, b_port = self.phone()
        b_rtcp, b_rtcp_port = self.phone()
        opts = SignalOptions(rtcp_mux=frozenset({"demux"}))
        offer = self.engine.offer(
            "c1", "A", parse_sdp(sdp(a_port, extra="a=rtcp-mux\r\n")), opts
        )
        self.assertFalse(offer.media[0].rtcp_mux)  # B is offered plain RTCP
        self.assertEqual(offer.media[0].rtcp.port, offer.media[0].port + 1)
        answer = self.engine.answer(
            "c1", "A", "B", parse_sdp(sdp(b_port, extra=f"a=rtcp:{b_rtcp_port}\r\n")), opts
        )
        self.assertTrue(answer.media[0].rtcp_mux)  # A keeps its mux
        self.assertIsNone(answer.media[0].rtcp)
        sender_report = bytes([0x80, 200, 0, 6]) + b"\0" * 24
        a.send(sender_report, answer.media[0].port)  # muxed on A's RTP port
        data, source = yield b_rtcp.received.get()
        self.assertEqual(data, sender_report)
        self.assertEqual(source, (LOCAL, offer.media[0].port + 1))
        b_rtcp.send(sender_report, offer.media[0].port + 1)
        data, source = yield a.received.get()  # back to A on its one port
        self.assertEqual((data, source), (sender_report, (LOCAL, answer.media[0].port)))
        self.assertEqual(len(b.received.pending), 0)
        totals = self.engine.query("c1")["totals"]
        self.assertEqual(totals["RTCP"]["packets"], 1)

    @defer.inlineCallbacks
    def test_audio_and_video_streams(self):
        a, a_port = self.phone()
        b, b_port = self.phone()
        video = f"m=video {a_port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
        offer = self.engine.offer("c1", "A", parse_sdp(sdp(9, media=video)), SignalOptions())
        b_video = f"m=video {b_port} RTP/AVP 96\r\n"
        answer = self.engine.answer(
            "c1", "A", "B", parse_sdp(sdp(b_port + 2, media=b_video)), SignalOptions()
        )
        ports = {m.port for m in offer.media} | {m.port for m in answer.media}
        self.assertEqual(len(ports), 4)
        a.send(b"video-frame", answer.media[1].port)
        data, source = yield b.received.get()
        self.assertEqual((data, source), (b"video-frame", (LOCAL, offer.media[1].port)))
        medias = self.engine.query("c1")["tags"]["A"]["medias"]
        self.assertEqual([m["type"] for m in medias], ["audio", "video"])
        self.assertEqual([m["index"] for m in medias], [1, 2])


class HostileOfferTests(RelayTestCase):
    def test_too_many_streams_are_refused_before_any_port_is_taken(self):
        """One offer with a thousand m= lines would take the port range from everyone."""
        opts = SignalOptions(direction=("inside", "outside"))
        many = "".join(f"m=audio {20000 + 2 * i} RTP/AVP 0\r\n" for i in range(MAX_STREAMS))
        with self.assertRaises(RelayError) as caught:
            self.engine.offer("c1", "A", parse_sdp(sdp(4000, media=many)), opts)
        self.assertIn("Too many media streams", str(caught.exception))
        self.assertEqual((self.engine.open_ports(), self.engine.calls), (0, {}))
        # a call answered with too many streams keeps only what it had
        self.engine.offer("c2", "A", parse_sdp(sdp(4000)), opts)
        with self.assertRaises(RelayError):
            self.engine.answer("c2", "A", "B", parse_sdp(sdp(4002, media=many)), opts)
        self.assertEqual(self.engine.open_ports(), 4)


class EndTests(RelayTestCase):
    def all_ports(self) -> list[int]:
        return sorted(s.local_port for c in self.engine.calls.values() for leg in c.legs()
                      for s in leg.streams)

    @defer.inlineCallbacks
    def test_delete_closes_every_port(self):
        _, a_port = self.phone()
        _, b_port = self.phone()
        self.call(a_port, b_port)
        ports = self.all_ports()
        self.assertEqual(len(ports), 4)
        self.assertFalse(any(port_is_free(p) for p in ports))
        stats = self.engine.delete("c1", "A")
        self.assertEqual(set(stats["tags"]), {"A", "B"})
        self.assertEqual(self.engine.calls, {})
        self.assertEqual(self.engine.open_ports(), 0)
        yield self.wait_closed(ports)
        self.assertEqual(self.ended, [])  # a delete is not reported: the proxy asked for it

    @defer.inlineCallbacks
    def test_stop_ends_every_call_and_reports_shutdown(self):
        for n in range(3):
            self.engine.offer(f"c{n}", "A", parse_sdp(sdp(4000)), SignalOptions())
        ports = self.all_ports()
        self.assertEqual(len(ports), 12)
        yield defer.gatherResults(self.engine.stop())
        yield self.wait_closed(ports)
        self.assertEqual(sorted(self.ended), [(f"c{n}", "shutdown") for n in range(3)])

    @defer.inlineCallbacks
    def test_silence_times_out_reports_and_frees(self):
        a, a_port = self.phone()
        b, b_port = self.phone()
        to_a_side, to_b_side = self.call(a_port, b_port)
        for _ in range(3):  # media keeps the call alive
            self.clock.advance(50)
            a.send(rtp(1), to_a_side)
            yield b.received.get()
            b.send(rtp(2), to_b_side)
            yield a.received.get()
        self.assertEqual(self.ended, [])
        ports = self.all_ports()
        self.clock.advance(59)
        self.assertEqual(self.ended, [])
        self.clock.advance(2)
        self.assertEqual(self.ended, [("c1", "timeout")])
        self.assertEqual(self.engine.calls, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        yield self.wait_closed(ports)

    def test_one_silent_direction_is_enough(self):
        _, a_port = self.phone()
        _, b_port = self.phone()
        self.call(a_port, b_port)
        self.clock.advance(61)
        self.assertEqual(self.ended, [("c1", "timeout")])

    def test_held_stream_gets_the_silent_timeout(self):
        self.engine.offer("c1", "A", parse_sdp(sdp(4000, extra="a=sendonly\r\n")),
                          SignalOptions())
        self.engine.answer("c1", "A", "B", parse_sdp(sdp(5000, extra="a=recvonly\r\n")),
                           SignalOptions())
        # B does not send by its SDP; A does: A's silence still counts after 60 s.
        self.clock.advance(61)
        self.assertEqual(self.ended, [("c1", "timeout")])

    def test_both_on_hold_wait_for_the_silent_timeout(self):
        self.engine.offer("c1", "A", parse_sdp(sdp(4000, extra="a=inactive\r\n")),
                          SignalOptions())
        self.engine.answer("c1", "A", "B", parse_sdp(sdp(5000, extra="a=inactive\r\n")),
                           SignalOptions())
        self.clock.advance(599)
        self.assertEqual(self.ended, [])
        self.clock.advance(2)
        self.assertEqual(self.ended, [("c1", "timeout")])

    def test_unanswered_offer_times_out(self):
        self.engine.offer("c1", "A", parse_sdp(sdp(4000)), SignalOptions())
        self.clock.advance(299)
        self.assertEqual(self.ended, [])
        self.clock.advance(2)
        self.assertEqual(self.ended, [("c1", "timeout")])
        self.assertEqual(self.engine.open_ports(), 0)

    def test_reinvite_resets_the_silence(self):
        self.call(4000, 5000)
        self.clock.advance(50)
        self.call(4000, 5000)  # same tags: the same call, re-negotiated
        self.clock.advance(50)
        self.assertEqual(self.ended, [])
        self.assertEqual(self.engine.open_ports(), 4)

    def test_out_of_ports_leaves_nothing_behind(self):
        small = RelayEngine(reactor, self.clock, [RelayInterface("x", LOCAL)], PORT_MIN + 90,
                            PORT_MIN + 93)
        self.addCleanup(lambda: defer.gatherResults(small.stop()))
        small.offer("c1", "A", parse_sdp(sdp(4000)), SignalOptions())
        with self.assertRaises(OutOfPorts):
            small.offer("c2", "A", parse_sdp(sdp(4000)), SignalOptions())
        self.assertEqual(list(small.calls), ["c1"])
        self.assertEqual(small.open_ports(), 4)

    def test_busy_ports_are_skipped(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind((LOCAL, PORT_MIN + 1))  # the RTCP half of the first pair
            offer = self.engine.offer("c1", "A", parse_sdp(sdp(4000)), SignalOptions())
        self.assertNotEqual(offer.media[0].port, PORT_MIN)
        self.assertEqual(offer.media[0].port % 2, 0)

    def test_unknown_interface_makes_no_call(self):
        with self.assertRaises(RelayError):
            self.engine.offer("c1", "A", parse_sdp(sdp(4000)),
                              SignalOptions(direction=("inside", "dmz")))
        self.assertEqual(self.engine.calls, {})


class InterfaceTests(unittest.SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(RelayInterface.parse("outside/192.0.2.1!203.0.113.5"),
                         RelayInterface("outside", "192.0.2.1", "203.0.113.5"))
        self.assertEqual(RelayInterface.parse("::1"), RelayInterface("default", "::1"))
        for bad in ("inside/", "inside/nothost", "/1.2.3.4", "a/1.2.3.4!x"):
            with self.assertRaises(ValueError):
                RelayInterface.parse(bad)
