"""Hypothesis strategies for fuzzing: valid SIP messages (ours and the RFC 4475/5118 corpus),
and mutations of them that keep them close enough to SIP to get past the first checks."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import strategies as st

DATA = Path(__file__).parent / "data"
CORPUS = sorted(
    p.read_bytes()
    for d in ("rfc4475", "rfc5118")
    for p in (DATA / d).iterdir()
    if p.name not in ("EXPECTED.tsv", "SHA256SUMS", "SOURCE.txt") and not p.name.startswith(".")
)

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n"
)


def _request(method: str, uri: str, extra: str = "", body: bytes = b"",
             transport: str = "UDP") -> bytes:
    head = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5099;branch=z9hG4bK-fz{method.lower()};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: \"Fuzz\" <sip:fuzz@lan.example>;tag=fz1\r\n"
        "To: <sip:bob@lan.example>\r\n"
        f"Call-ID: fuzz-{method.lower()}@127.0.0.1\r\n"
        f"CSeq: 1 {method}\r\n"
        "Contact: <sip:fuzz@127.0.0.1:5099>\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


VALID: tuple[bytes, ...] = (
    _request("INVITE", "sip:bob@lan.example", "Content-Type: application/sdp\r\n", SDP),
    _request("OPTIONS", "sip:bob@lan.example"),
    _request("REGISTER", "sip:lan.example", "Expires: 60\r\n"),
    _request("BYE", "sip:bob@127.0.0.1:5098",
             "Route: <sip:127.0.0.1;lr>, <sip:127.0.0.1:5098;lr>\r\n"),
    _request("CANCEL", "sip:bob@lan.example"),
    _request("ACK", "sip:bob@lan.example"),
    _request("MESSAGE", "sips:bob@lan.example;transport=tcp", "Content-Type: text/plain\r\n",
             b"hello", transport="TCP"),
    (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-nope;rport=5060\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-fzinvite\r\n"
        b"Record-Route: <sip:127.0.0.1;lr>\r\n"
        b"From: <sip:fuzz@lan.example>;tag=fz1\r\nTo: <sip:bob@lan.example>;tag=b\r\n"
        b"Call-ID: fuzz-invite@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
        b"Contact: <sip:bob@127.0.0.1:5098>\r\nContent-Length: 0\r\n\r\n"
    ),
)

INTERESTING = (
    b",", b";", b":", b"<", b">", b'"', b"\\", b"\r\n", b"\r\n ", b"\n", b"\r", b" ", b"%",
    b"[", b"]", b"=", b"@", b"\x00", b"\xff", b"*", b"?", b"SIP/2.0", b";branch=", b";rport",
    b";received=", b";maddr=255.255.255.255", b";lr", b"sip:", b"sips:", b"tel:", b"[::1]",
    b"Content-Length: 99999\r\n", b"Content-Length: -1\r\n", b"Via: SIP/2.0/TCP x\r\n",
    b"Route: <sip:127.0.0.1;lr>\r\n", b"Max-Forwards: 0\r\n", b"CSeq: 99999999999 INVITE\r\n",
    b"User-Agent: friendly-scanner\r\n", b"i: x\r\n", b"v: SIP/2.0/UDP [::1\r\n",
    b"\r\n\r\n", b"\xc3\x28", b"%00", b"=" * 300,
)


def examples(default: int) -> int:
    """How many examples: C{SIPPROXY_FUZZ_EXAMPLES} when set, else C{default}."""
    try:
        return max(1, int(os.environ.get("SIPPROXY_FUZZ_EXAMPLES", "")))
    except ValueError:
        return default


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...] = VALID + tuple(CORPUS)) -> bytes:
    """A seed message with up to 6 mutations, most of them in the header section."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        head = data.find(b"\r\n\r\n")
        limit = len(data) if head < 0 or draw(st.integers(0, 9)) == 0 else head + 1
        i = draw(st.integers(0, max(0, limit - 1)))
        op = draw(st.integers(0, 8))
        if op == 0:  # replace one byte
            data[i] = draw(st.integers(0, 255))
        elif op == 1:  # insert something interesting
            data[i:i] = draw(st.sampled_from(INTERESTING))
        elif op == 2:  # delete a slice
            del data[i : i + draw(st.integers(1, 20))]
        elif op == 3:  # truncate
            del data[i:]
        elif op == 4:  # duplicate a slice (repeated headers, params)
            j = min(len(data), i + draw(st.integers(1, 80)))
            data[i:i] = data[i:j] * draw(st.integers(1, 4))
        elif op == 5:  # a big number
            data[i:i] = str(draw(st.integers(0, 2**64))).encode()
        elif op == 6:  # random bytes
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == 7:  # line endings: CRLF to LF or CR
            data[:] = data.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\r\r\n"])), 1)
        else:  # a very long token
            data[i:i] = draw(st.sampled_from([b"a", b"%41", b";x=y", b",<sip:a@b>"])) * \
                draw(st.integers(100, 3000))
    return bytes(data)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (for stream framing)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]
