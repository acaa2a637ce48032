"""Message-layer throughput: what the proxy does to every request it forwards.

Parse a typical sipp INVITE with SDP, read Via/CSeq/Call-ID/From/To, replace the top Via,
serialize: what the proxy does to every request it forwards (its transport layer reads From and
To of every message it receives).
Run: python3 bench/parse.py [--seconds N] [--calls N]

The message layer remembers the From, To, Contact and URI texts it parsed (every message of a
call repeats them), so one INVITE parsed over and over measures those hits alone; ``--calls N``
cycles through the INVITEs of N calls instead (each its own branch, From tag and Call-ID; more
than the 4,096 texts remembered, so each From is parsed anew), as a proxy receives them.

When the sippy package (the SIP stack of the Sippy B2BUA) is importable, the same steps run
through its parser too, side by side, with the ratio; else that comparison is skipped with a
note. Install it outside site-packages (see bench/README.md: it ships a top-level ``tests``
package that would hide this repository's).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

from sipproxy.message import Via, parse_message

INVITE = (
    b"INVITE sip:service@127.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4711-1-0\r\n"
    b"From: sipp <sip:sipp@127.0.0.1:5061>;tag=4711SIPpTag001\r\n"
    b"To: service <sip:service@127.0.0.1:5070>\r\n"
    b"Call-ID: 1-4711@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: sip:sipp@127.0.0.1:5061\r\n"
    b"Max-Forwards: 70\r\n"
    b"Subject: Performance Test\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length:   129\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)


def one(data: bytes = INVITE) -> bytes:
    msg = parse_message(data)
    top = msg.top_via
    assert top is not None and top.branch
    _ = (msg.cseq.method, msg.call_id, msg.from_.tag, msg.to.tag)
    msg.pop_via()
    msg.push_via(Via.build("UDP", "127.0.0.1", 5060, "z9hG4bKbench", rport=True))
    return msg.to_bytes()


def one_of_calls(calls: int) -> Callable[[], bytes]:
    """:func:`one` on the INVITEs of ``calls`` calls in turn."""
    invites = itertools.cycle([INVITE.replace(b"4711", b"%d" % (4711 + n)) for n in range(calls)])
    return lambda: one(next(invites))


def one_sippy() -> Callable[[], bytes] | None:
    """The same steps through sippy's parser, or None when sippy is not installed."""
    try:
        from sippy.SipHeader import SipHeader
        from sippy.SipRequest import SipRequest
    except ImportError:
        return None

    def one() -> bytes:
        msg = SipRequest(buf=INVITE.decode("utf-8"))
        assert msg.getHFBody("via").getBranch()
        _ = (msg.getHFBody("cseq").getCSeqMethod(), msg.getHFBody("call-id"),
             msg.getHFBody("from").getTag(), msg.getHFBody("to").getTag())
        msg.removeHeader(msg.getHFs("via")[0])
        new_via = SipHeader("Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKbench;rport")
        msg.insertHeaderBefore(msg.headers[0], new_via)
        msg.init_body()
        return str(msg).encode("utf-8")

    return one


def measure(fn: Callable[[], bytes], seconds: float) -> tuple[float, int]:
    """Messages per second of CPU time (one core), and how many ran."""
    fn()
    n = 0
    start = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        now = time.process_time()
        if now >= deadline:
            break
    return n / (now - start), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--calls", type=int, default=0,
                    help="cycle through the INVITEs of this many calls (0: one INVITE)")
    args = ap.parse_args()
    rate, n = measure(one_of_calls(args.calls) if args.calls else one, args.seconds)
    print(f"sipproxy: parse+inspect+replace Via+serialize: {rate:,.0f} messages/s on one core "
          f"({1e6 / rate:.1f} us each, {n} messages"
          f"{f', INVITEs of {args.calls} calls' if args.calls else ''})")
    other = one_sippy()
    if other is None:
        print("sippy: not installed, comparison skipped (see bench/README.md to install it)")
        return
    sippy_rate, n = measure(other, args.seconds)
    print(f"sippy:    parse+inspect+replace Via+serialize: {sippy_rate:,.0f} messages/s on one "
          f"core ({1e6 / sippy_rate:.1f} us each, {n} messages)")
    print(f"ratio sipproxy/sippy: {rate / sippy_rate:.2f}x the messages/s")


if __name__ == "__main__":
    main()
