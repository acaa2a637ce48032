"""
Hostile input from a source that is not loopback (so the flood guard's exemption does not apply):
``twistd -n sipproxy`` with no config on fw, an attacker in the provider's namespace sending
malformed requests over UDP and TCP, a phone on the LAN that must keep being served.

Each probe gets the status RFC 3261 says (400 for a malformed or duplicated header, 413/513 for
what is over the size limits, 416 for an unknown URI scheme, 483 for Max-Forwards 0, 505 for
another SIP version) or, where there is nobody to answer (no Via, a garbled response, junk),
nothing; a TCP peer whose stream cannot be framed is answered if possible and cut off. The
probes are paced under the flood guard's rate (each refusal counts ten messages), so every one
of them is judged, not just banned. The proxy's log has no traceback.

Then ``examples/firewall.toml`` (nat + media): an outside host calls the phone's token with SDP
that does not parse or that would take the relay's ports (488), and the provider's next
call still reaches the phone with its media relayed.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    Namespace,
    NatNet,
    NoConfigProxy,
)
from tests.integration.support.sites import (
    firewall_example,
    incoming_call,
    register_with_challenge,
    start_site,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]

SIP = 5060
PACE = 0.12  # seconds between probes: ~8 refusals/s, 80 of the guard's 100 messages/s


def request(method: str = "OPTIONS", ruri: str = f"sip:carol@{FW_OUTSIDE}", *,
            host: str = PROVIDER_IP, port: int = 5099, transport: str = "UDP",
            extra: tuple[str, ...] = (), drop: tuple[str, ...] = (),
            body: bytes = b"", content_length: object = None,
            version: str = "SIP/2.0") -> bytes:
    """A well-formed request to change one thing in (C{extra} lines are appended)."""
    tag = uuid.uuid4().hex[:12]
    headers = {
        "Via": f"SIP/2.0/{transport} {host}:{port};branch=z9hG4bK{tag};rport",
        "Max-Forwards": "70",
        "From": f"<sip:mallory@{host}>;tag={tag}",
        "To": f"<sip:carol@{FW_OUTSIDE}>",
        "Call-ID": f"{tag}@{host}",
        "CSeq": f"1 {method}",
    }
    lines = [f"{method} {ruri} {version}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name not in drop]
    lines += list(extra)
    length = len(body) if content_length is None else content_length
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def swap(data: bytes, old: str, new: str) -> bytes:
    assert old.encode() in data, old
    return data.replace(old.encode(), new.encode(), 1)


def udp_exchange(ns: Namespace, data: bytes, target: tuple[str, int], wait: float) -> list[str]:
    """Send one datagram; the start lines of what comes back until a final response (or
    C{wait} seconds of silence)."""
    s = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind((ns.address, 0))
        s.settimeout(wait)
        s.sendto(data, target)
        got: list[str] = []
        try:
            while True:
                answer, _ = s.recvfrom(65535)
                got.append(answer.split(b"\r\n", 1)[0].decode(errors="replace"))
                if not answer.startswith(b"SIP/2.0 1"):
                    break
        except TimeoutError:
            pass
    return got


def tcp_exchange(ns: Namespace, data: bytes, target: tuple[str, int], wait: float) -> list[str]:
    """Connect, send, read until the proxy closes (C{"<closed>"}) or C{wait} s of silence."""
    s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(wait)
        s.connect(target)
        s.sendall(data)
        received = b""
        try:
            while chunk := s.recv(65535):
                received += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        lines = [line.decode() for line in received.split(b"\r\n") if line.startswith(b"SIP/2.0")]
    return lines + (["<closed>"] if closed else [])


UDP_PROBES: list[tuple[str, Callable[[], bytes], str | None]] = [
    # (what, message, the status line's start, or None: no answer at all)
    ("truncated header section", lambda: request()[:-10], "SIP/2.0 400"),
    ("Content-Length beyond the datagram", lambda: request(content_length=50), "SIP/2.0 400"),
    ("negative Content-Length", lambda: request(content_length=-5), "SIP/2.0 400"),
    ("overflowing Content-Length", lambda: request(content_length="9" * 25), "SIP/2.0 413"),
    ("Content-Length not a number", lambda: request(content_length="abc"), "SIP/2.0 400"),
    ("CSeq over 2**31", lambda: swap(request(), "CSeq: 1 ", "CSeq: 4294967296 "), "SIP/2.0 400"),
    ("negative CSeq", lambda: swap(request(), "CSeq: 1 ", "CSeq: -1 "), "SIP/2.0 400"),
    ("CSeq method not the request's", lambda: swap(request(), "1 OPTIONS", "1 INVITE"),
     "SIP/2.0 400"),
    ("Max-Forwards 0", lambda: swap(request(), "Max-Forwards: 70", "Max-Forwards: 0"),
     "SIP/2.0 483"),
    ("negative Max-Forwards", lambda: swap(request(), "Max-Forwards: 70", "Max-Forwards: -1"),
     "SIP/2.0 400"),
    ("overflowing Max-Forwards",
     lambda: swap(request(), "Max-Forwards: 70", "Max-Forwards: " + "9" * 25), "SIP/2.0 400"),
    ("unknown URI scheme", lambda: request(ruri="foo:carol@example.com"), "SIP/2.0 416"),
    ("http URI", lambda: request(ruri="http://example.com/"), "SIP/2.0 416"),
    ("two To", lambda: request(extra=(f"To: <sip:dave@{FW_OUTSIDE}>",)), "SIP/2.0 400"),
    ("two From", lambda: request(extra=("From: <sip:eve@example.com>;tag=x",)), "SIP/2.0 400"),
    ("two Call-ID", lambda: request(extra=("Call-ID: other@example.com",)), "SIP/2.0 400"),
    ("two CSeq", lambda: request(extra=("CSeq: 2 OPTIONS",)), "SIP/2.0 400"),
    ("two Content-Length", lambda: request(extra=("Content-Length: 5",)), "SIP/2.0 400"),
    ("no Call-ID", lambda: request(drop=("Call-ID",)), "SIP/2.0 400"),
    ("no CSeq", lambda: request(drop=("CSeq",)), "SIP/2.0 400"),
    ("no From", lambda: request(drop=("From",)), "SIP/2.0 400"),
    ("no To", lambda: request(drop=("To",)), "SIP/2.0 400"),
    ("no Via: nowhere to answer", lambda: request(drop=("Via",)), None),
    ("Via port out of range",
     lambda: swap(request(), f"{PROVIDER_IP}:5099;", f"{PROVIDER_IP}:99999;"), "SIP/2.0 400"),
    ("Via not a Via", lambda: swap(request(), "Via: SIP/2.0/UDP", "Via: garbage"),
     "SIP/2.0 400"),
    ("SIP/3.0", lambda: request(version="SIP/3.0"), "SIP/2.0 505"),
    ("From does not parse", lambda: swap(request(), "From: <sip:", "From: <<<sip:"),
     "SIP/2.0 400"),
    ("To does not parse", lambda: swap(request(), "To: <sip:carol", "To: sip:carol<>@@"),
     "SIP/2.0 400"),
    ("Request-URI does not parse", lambda: request(ruri="sip:[::1"), "SIP/2.0 400"),
    ("NUL in a header", lambda: request(extra=("Subject: a\x00b",)), "SIP/2.0 400"),
    ("ESC in a header", lambda: request(extra=("Subject: a\x1b[2Jb",)), "SIP/2.0 400"),
    ("DEL in a header", lambda: request(extra=("Subject: a\x7fb",)), "SIP/2.0 400"),
    ("a tab is whitespace", lambda: request(ruri=f"sip:{FW_OUTSIDE}", extra=("Subject:\ta\tb",)),
     "SIP/2.0 200"),
    ("a scanner's User-Agent", lambda: request(ruri=f"sip:{FW_OUTSIDE}",
                                               extra=("User-Agent: friendly-scanner",)), None),
    ("a 10 KiB header line", lambda: request(extra=("Subject: " + "a" * 10240,)),
     "SIP/2.0 513"),
    ("300 header lines", lambda: request(extra=tuple(f"X-H{i}: v" for i in range(300))),
     "SIP/2.0 513"),
    ("REGISTER Contact * with Expires 60",
     lambda: request("REGISTER", f"sip:{FW_OUTSIDE}", extra=("Contact: *", "Expires: 60")),
     "SIP/2.0 400"),
    ("garbled response", lambda: (b"SIP/2.0 abc OK\r\nVia: SIP/2.0/UDP "
                                  + FW_OUTSIDE.encode() + b":5060;branch=z9hG4bKx\r\n\r\n"), None),
    ("response with no headers", lambda: b"SIP/2.0 200 OK\r\n\r\n", None),
    ("binary junk", lambda: os.urandom(300), None),
]

def endless(head: bytes, total: int = 65536) -> bytes:
    return head + b"a" * (total - len(head))


TCP_PROBES: list[tuple[str, Callable[[], bytes], list[str]]] = [
    ("negative Content-Length",
     lambda: request(transport="TCP", content_length=-1), ["SIP/2.0 400", "<closed>"]),
    ("overflowing Content-Length",
     lambda: request(transport="TCP", content_length="9" * 25), ["SIP/2.0 413", "<closed>"]),
    ("no Content-Length on a stream",
     lambda: swap(request(transport="TCP"), "Content-Length: 0\r\n", ""),
     ["SIP/2.0 400", "<closed>"]),
    # one byte over the 64 KiB limit, all of it read by the proxy (unread bytes would make
    # its close a reset, which may discard the 513 before the test reads it)
    ("an endless header",
     lambda: endless(request(transport="TCP").split(b"Content-Length")[0] + b"Subject: "),
     ["SIP/2.0 513", "<closed>"]),
    ("junk", lambda: os.urandom(300) + b"\r\n\r\n", ["<closed>"]),
]


def phone_is_served(net: NatNet) -> None:
    """The LAN phone registers and the proxy answers its OPTIONS, as before the probes."""
    target = (FW_INSIDE, SIP)
    register = request("REGISTER", f"sip:{FW_INSIDE}", host=PHONE_IP, port=5062,
                       extra=(f"Contact: <sip:carol@{PHONE_IP}:5062>", "Expires: 600"))
    register = swap(swap(register, f"<sip:mallory@{PHONE_IP}>", f"<sip:carol@{FW_INSIDE}>"),
                    f"To: <sip:carol@{FW_OUTSIDE}>", f"To: <sip:carol@{FW_INSIDE}>")
    assert udp_exchange(net.phone, register, target, 3.0)[-1:] == ["SIP/2.0 200 OK"]
    options = request(ruri=f"sip:{FW_INSIDE}", host=PHONE_IP, port=5062)
    assert udp_exchange(net.phone, options, target, 3.0)[-1:] == ["SIP/2.0 200 OK"]


def test_hostile_requests_get_the_right_answer_and_the_phone_is_served(
        nat_net: NatNet, tmp_path: Path) -> None:
    proxy = NoConfigProxy(nat_net.fw, {}, tmp_path / "proxy")
    proxy.start()
    try:
        phone_is_served(nat_net)
        wrong = []
        for what, make, expected in UDP_PROBES:
            got = udp_exchange(nat_net.provider, make(), (FW_OUTSIDE, SIP),
                               1.5 if expected else 0.5)
            finals = [line for line in got if not line.startswith("SIP/2.0 1")]
            if (expected is None and got) or (
                    expected is not None and not (finals and finals[0].startswith(expected))):
                wrong.append(f"UDP {what}: expected {expected or 'no answer'}, got {got}")
            time.sleep(PACE)
        for what, make, want in TCP_PROBES:
            got = tcp_exchange(nat_net.provider, make(), (FW_OUTSIDE, SIP), 3.0)
            if [line[:11] if line.startswith("SIP/") else line for line in got] != want:
                wrong.append(f"TCP {what}: expected {want}, got {got}")
            time.sleep(PACE)
        phone_is_served(nat_net)
    finally:
        proxy.stop()
    log = proxy.log_text()
    assert not wrong, "\n".join(wrong) + "\n" + log[-3000:]
    assert "Traceback" not in log and "Unhandled" not in log, log
    assert "banned" not in log, log  # every probe was judged, none was just dropped


GOOD_SDP = (f"v=0\r\no=- 1 1 IN IP4 {PROVIDER_IP}\r\ns=-\r\nc=IN IP4 {PROVIDER_IP}\r\nt=0 0\r\n"
            "m=audio 7078 RTP/AVP 0\r\n")
BAD_OFFERS: list[tuple[str, str, str]] = [
    # (what, SDP, the status line's start)
    ("not SDP at all", "this is not sdp\r\n", "SIP/2.0 488"),
    ("a port that is not a number", GOOD_SDP.replace("7078", "abc"), "SIP/2.0 488"),
    ("a port out of range", GOOD_SDP.replace("7078", "99999999"), "SIP/2.0 488"),
    # each stream would take relay ports: a thousand would take the range from every call
    ("a thousand streams", GOOD_SDP + "".join(f"m=audio {20000 + 2 * i} RTP/AVP 0\r\n"
                                              for i in range(1000)), "SIP/2.0 488"),
]


def test_hostile_sdp_from_outside_to_a_phone_behind_the_firewall(
        nat_net: NatNet, tmp_path: Path) -> None:
    """examples/firewall.toml (nat + media): an outside host calls the phone's token with SDP
    that is no SDP, or that would take the relay's ports; it is refused, and the provider's
    next call with good SDP still reaches the phone through the relay."""
    site = start_site(nat_net, tmp_path, firewall_example())
    try:
        assert all(r.ok(1) for r in register_with_challenge(site)), site.logs()
        token = token_seen_by_provider(site)
        wrong = []
        for what, sdp, expected in BAD_OFFERS:
            invite = request("INVITE", f"sip:{token}@{FW_OUTSIDE}", body=sdp.encode(),
                             extra=("Content-Type: application/sdp",
                                    f"Contact: <sip:mallory@{PROVIDER_IP}:5099>"))
            got = udp_exchange(nat_net.provider, invite, (FW_OUTSIDE, SIP), 3.0)
            finals = [line for line in got if not line.startswith("SIP/2.0 1")]
            if not (finals and finals[0].startswith(expected)):
                wrong.append(f"{what}: expected {expected}, got {got}")
            time.sleep(PACE)
        call = incoming_call(site, token, "uas_media.xml", "uac_media.xml")
        assert all(r.ok(1) for r in call), [r.describe() for r in call]
    finally:
        site.proxy.stop()
        site.capture.stop()
    log = site.proxy.log_text()
    assert not wrong, "\n".join(wrong) + "\n" + log[-3000:]
    assert "Traceback" not in log and "Unhandled" not in log, log
