#!/usr/bin/env python3
"""CPU per call inside the proxy process, without sockets: the hot path alone, repeatable.

The whole proxy (``makeService``: transports, transaction layer, core, no plugins) runs on a
heap-ordered fake clock; its UDP listener's socket is replaced by one that records datagrams.
Each call is what ``bench/cps`` plays with sipp (INVITE with SDP, 180, 200, ACK, BYE, 200,
Record-Route), the far ends' messages made from what the proxy sent them. The clock moves on
1/rate per call, so transactions end on their timers as in a live proxy. Measured: process
CPU time spent inside the proxy (receiving, forwarding, timers), per call; not the
``sendto``/``recvfrom`` system calls, nor the reactor's poll, which ``bench/cps`` includes.

    PYTHONPATH=$PWD python3 bench/calls.py --calls 20000 --repeat 3
    PYTHONPATH=$PWD python3 bench/calls.py --profile    # cProfile, top functions
"""

from __future__ import annotations

import argparse
import gc
import heapq
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.base import DelayedCall

from sipproxy.config import parse_config
from sipproxy.service import makeService

PROXY = ("127.0.0.1", 5060)
UAC = ("127.0.0.1", 5061)
UAS = ("127.0.0.1", 5062)

CONFIG = f"""
[proxy]
domains = ["lan.example"]

[[listen]]
side = "inside"
transport = "udp"
address = "{PROXY[0]}"
port = {PROXY[1]}

[upstream]
uri = "sip:{UAS[0]}:{UAS[1]};transport=udp"

[plugins]
enabled = []
"""

SDP = (
    "v=0\r\no=caller 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


class HeapClock:
    """``IReactorTime`` on a heap, as the real reactor keeps its timed calls (a cancelled call
    stays in the heap until its time comes)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._n = 0

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, fn: Any, *args: Any, **kw: Any) -> DelayedCall:
        call = DelayedCall(self.now + delay, fn, args, kw, lambda c: None, self._reset,
                           self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        self._n += 1
        heapq.heappush(self._heap, (call.time, self._n, call))

    def _reset(self, call: DelayedCall) -> None:
        self._push(call)

    def getDelayedCalls(self) -> list[DelayedCall]:
        return [c for _, _, c in self._heap if c.active()]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        heap = self._heap
        while heap and heap[0][0] <= self.now:
            when, _, call = heapq.heappop(heap)
            if call.cancelled or call.called or call.time != when:
                continue
            call.called = 1
            call.func(*call.args, **call.kw)


class Wire:
    """The UDP port's stand-in: records what the proxy writes."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


_HEADER = re.compile(rb"^(Via|Record-Route|From|To|Call-ID|CSeq): .*$", re.M | re.I)


def _copied(request: bytes) -> list[bytes]:
    """The lines a UAS copies from a request into its response (sipp's ``[last_*:]``)."""
    return [m.group(0).rstrip(b"\r") for m in _HEADER.finditer(request.split(b"\r\n\r\n")[0])]


def _response(request: bytes, status: str, to_tag: str, rr: bool, body: str = "") -> bytes:
    lines = [f"SIP/2.0 {status}".encode()]
    for line in _copied(request):
        low = line.lower()
        if low.startswith(b"record-route") and not rr:
            continue
        if low.startswith(b"to:") and to_tag and b";tag=" not in line:
            line += f";tag={to_tag}".encode()
        lines.append(line)
    lines.append(f"Contact: <sip:callee@{UAS[0]}:{UAS[1]};transport=UDP>".encode())
    if body:
        lines.append(b"Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body.encode()


def _uac_request(method: str, n: int, cseq: int, ruri: str, routes: list[bytes],
                 to_tag: str) -> bytes:
    body = SDP if method == "INVITE" else ""
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {UAC[0]}:{UAC[1]};branch=z9hG4bK-{n}-{cseq}-{method};rport",
    ]
    lines += [r.decode() for r in routes]
    to = f"<sip:service@{UAS[0]}:{UAS[1]}>" + (f";tag={to_tag}" if to_tag else "")
    lines += [
        f"From: sipp <sip:caller@{UAC[0]}:{UAC[1]}>;tag=1234SIPpTag00{n}",
        f"To: {to}",
        f"Call-ID: {n}-1234@{UAC[0]}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:caller@{UAC[0]}:{UAC[1]};transport=UDP>",
        "Max-Forwards: 70",
    ]
    if method == "INVITE":
        lines += ["Subject: sipproxy integration test", "Content-Type: application/sdp"]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _routes(response: bytes) -> list[bytes]:
    """The UAC's route set from a 2xx: its Record-Route values, reversed."""
    rr = [line.split(b":", 1)[1].strip() for line in _copied(response)
          if line.lower().startswith(b"record-route")]
    values = [v.strip() for line in rr for v in line.split(b",")]
    return [b"Route: " + v for v in reversed(values)]


class Calls:
    def __init__(self, rate: float) -> None:
        self.clock = HeapClock()
        service = makeService(parse_config(CONFIG), reactor=self.clock)
        proxy = service.proxy
        manager = proxy.transports
        listener = manager.listeners[0]
        self.wire = Wire()
        from sipproxy.transport.udp import SIPDatagramProtocol

        proto = SIPDatagramProtocol(
            lambda data, addr: manager._datagram_received(listener, data, addr))
        proto.transport = self.wire  # type: ignore[assignment]
        listener.udp = proto
        self.proto = proto
        self.proxy = proxy
        self.step = 1.0 / rate
        self.cpu = 0.0

    def feed(self, data: bytes, addr: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
        sent = self.wire.sent
        del sent[:]
        start = time.process_time()
        self.proto.datagramReceived(data, addr)
        self.cpu += time.process_time() - start
        return list(sent)

    def _one(self, out: list[tuple[bytes, tuple[str, int]]], to: tuple[str, int],
             start: bytes) -> bytes:
        found = [d for d, a in out if a == to and d.startswith(start)]
        if len(found) != 1:
            raise SystemExit(f"expected one {start!r} to {to}, got {[d[:40] for d, _ in out]}")
        return found[0]

    def call(self, n: int) -> None:
        ruri = f"sip:service@{UAS[0]}:{UAS[1]}"
        invite = _uac_request("INVITE", n, 1, ruri, [], "")
        out = self.feed(invite, UAC)
        fwd = self._one(out, UAS, b"INVITE ")
        tag = f"uas{n}"
        self._one(self.feed(_response(fwd, "180 Ringing", tag, True), UAS), UAC, b"SIP/2.0 180")
        ok = self._one(self.feed(_response(fwd, "200 OK", tag, True, SDP), UAS), UAC,
                       b"SIP/2.0 200")
        routes = _routes(ok)
        contact = f"sip:callee@{UAS[0]}:{UAS[1]};transport=UDP"
        self._one(self.feed(_uac_request("ACK", n, 1, contact, routes, tag), UAC), UAS,
                  b"ACK ")
        bye = self._one(self.feed(_uac_request("BYE", n, 2, contact, routes, tag), UAC), UAS,
                        b"BYE ")
        self._one(self.feed(_response(bye, "200 OK", "", False), UAS), UAC, b"SIP/2.0 200")
        start = time.process_time()
        self.clock.advance(self.step)
        self.cpu += time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gc-threshold", metavar="G0,G1,G2",
                        help="collector thresholds instead of the service's (experiments)")
    args = parser.parse_args(argv)
    from sipproxy.service import tune_garbage_collector

    tune_garbage_collector()
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    gc_time = [0.0, 0.0]  # time inside the collector, start of the running collection

    def _gc_timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_time[1] = time.process_time()
        else:
            gc_time[0] += time.process_time() - gc_time[1]

    gc.callbacks.append(_gc_timer)
    for _ in range(args.repeat):
        calls = Calls(args.rate)
        for n in range(200):  # warm-up: caches, first-time paths
            calls.call(n)
        calls.cpu = 0.0
        gc_time[0] = 0.0
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        for n in range(200, 200 + args.calls):
            calls.call(n)
        if profiler is not None:
            profiler.disable()
            import pstats

            pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
        print(f"{args.calls} calls: {calls.cpu * 1e6 / args.calls:.1f} us CPU per call "
              f"(proxy only; {gc_time[0] * 1e6 / args.calls:.1f} us in the garbage "
              f"collector), {len(calls.proxy.transactions)} transactions live", flush=True)
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
