"""
A bounded garbage generator for the flood test: malformed and random UDP datagrams from one
loopback address to the proxy, at a bounded rate for a bounded time; it stops by itself.

    python3 tests/integration/support/flooder.py --source 127.0.0.2 --target 127.0.0.1:5060 \\
        --rate 10000 --duration 10 --report flood.json

The report (JSON) says what was really sent: datagrams, bytes, seconds, the rate achieved, and
send errors (a full socket buffer is counted, not retried). Only loopback targets are allowed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import sys
import time

MAX_RATE = 50_000
MAX_DURATION = 60.0

TEMPLATE = (
    "{method} sip:{user}@{host} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {src}:{sport};branch=z9hG4bK{branch};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:{user}@{src}>;tag={tag}\r\n"
    "To: <sip:{user}@{host}>\r\n"
    "Call-ID: {branch}@{src}\r\n"
    "CSeq: {cseq} {method}\r\n"
    "User-Agent: {agent}\r\n"
    "Content-Length: 0\r\n\r\n"
)


def payloads(rng: random.Random, source: str, sport: int, domain: str, count: int) -> list[bytes]:
    """A pool of hostile datagrams: random bytes, SIP-looking junk, truncated and mutated
    requests, requests with absurd headers, scanner OPTIONS."""
    out: list[bytes] = []
    for i in range(count):
        kind = i % 6
        valid = TEMPLATE.format(
            method=rng.choice(["INVITE", "OPTIONS", "REGISTER", "BYE", "ACK", "CANCEL"]),
            user=rng.randrange(100, 99999), host=domain, src=source, sport=sport,
            branch=f"{rng.getrandbits(48):012x}", tag=rng.getrandbits(32), cseq=rng.randrange(1, 9),
            agent=rng.choice(["friendly-scanner", "sipvicious", "Linphone", "x"]),
        ).encode()
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 1400))
        elif kind == 1:
            data = valid[: rng.randrange(1, len(valid))]
        elif kind == 2:
            buf = bytearray(valid)
            for _ in range(rng.randrange(1, 20)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        elif kind == 3:
            data = valid.replace(b"Content-Length: 0", b"Content-Length: " +
                                 str(rng.choice([-1, 10**12, 65536, 3])).encode())
        elif kind == 4:
            data = valid.replace(b"Max-Forwards: 70\r\n",
                                 b"X-Long: " + b"A" * rng.randrange(500, 1300) + b"\r\n")
        else:
            data = valid
        out.append(data or b"x")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--target", required=True, help="host:port (loopback only)")
    parser.add_argument("--rate", type=float, default=10_000.0, help="datagrams per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--domain", default="lan.example",
                        help="Request-URI host of the well-formed requests (the proxy's own "
                        "domain keeps them from reaching anyone behind it)")
    parser.add_argument("--report", help="write the JSON report here (else stdout)")
    args = parser.parse_args(argv)

    host, _, port_text = args.target.rpartition(":")
    for address in (host, args.source):
        if not ipaddress.ip_address(address).is_loopback:
            parser.error(f"{address} is not a loopback address")
    rate = min(max(args.rate, 1.0), MAX_RATE)
    duration = min(max(args.duration, 0.0), MAX_DURATION)
    total = int(rate * duration)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.source, 0))
    sock.setblocking(False)
    sport = sock.getsockname()[1]
    target = (host, int(port_text))
    rng = random.Random(args.seed)
    pool = payloads(rng, args.source, sport, args.domain, 3000)

    sent = errors = octets = 0
    batch = max(1, int(rate / 200))  # 200 batches a second
    start = time.monotonic()
    hard_stop = start + duration + 2.0
    while sent + errors < total:
        now = time.monotonic()
        if now > hard_stop:
            break
        due = start + (sent + errors) / rate
        if due > now:
            time.sleep(due - now)
        for _ in range(min(batch, total - sent - errors)):
            data = pool[(sent + errors) % len(pool)]
            try:
                sock.sendto(data, target)
            except (BlockingIOError, OSError):
                errors += 1
                continue
            sent += 1
            octets += len(data)
    elapsed = time.monotonic() - start
    sock.close()
    report = {
        "source": args.source,
        "target": args.target,
        "planned": total,
        "sent": sent,
        "errors": errors,
        "bytes": octets,
        "seconds": round(elapsed, 3),
        "rate": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
    }
    text = json.dumps(report)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
