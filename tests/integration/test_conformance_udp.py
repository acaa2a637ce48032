"""
RFC 4475 torture messages, each sent byte for byte in one UDP datagram to a running proxy.

The proxy serves the domain lan.example only, so every torture request (example.com, ...) is one
to forward to [upstream]: a UDP socket of ours that records what arrives and never answers.

Where the answers go: the proxy answers to the top Via (RFC 3261 18.2.2): the source address as
"received", the sent-by port (5060 when absent). So each message is sent from its own loopback
address 127.x.y.z bound to the port its top Via names (a UDP socket and, for Vias that say TCP or
TLS, a TCP listener too), and the answer comes back to us without changing a byte of the message.

Each file's accepted outcomes are in EXPECTED below, with the reason; tests/data/rfc4475/
EXPECTED.tsv paraphrases the RFC for every file. Every wait is bounded (2 s per message), and
after all of them a normal sipp call must still go through the same proxy.
"""

from __future__ import annotations

import random
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.support.harness import (
    LOOPBACK,
    REPO_ROOT,
    ProxyProcess,
    Sipp,
    free_port,
    sipp_available,
)

DATA = REPO_ROOT / "tests" / "data" / "rfc4475"
WAIT = 2.0  # seconds to wait for what each message causes; no retries

FORWARD = "forwarded"  # the recorder (upstream) got the request
QUIET = "quiet"  # nothing back to the sender and nothing forwarded


@dataclass(frozen=True)
class Expect:
    """Accepted outcomes: final statuses, and/or forwarding, and/or silence."""

    statuses: frozenset[int] = frozenset()
    forward: bool = False
    quiet: bool = False
    why: str = ""
    # Checks on the forwarded datagram, when forwarding is accepted and happens.
    check_forwarded: Callable[[bytes], str | None] | None = None
    # Checks on the final response, when one comes.
    check_response: Callable[[bytes], str | None] | None = None


def _status(*codes: int) -> frozenset[int]:
    return frozenset(codes)


def _status_line_has(response: bytes, text: bytes) -> str | None:
    line = response.split(b"\r\n", 1)[0]
    return None if text in line else f"status line {line!r} lacks {text!r}"


def _request_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def _single_spaced_line(data: bytes) -> str | None:
    line = _request_line(data)
    if line.count(b" ") != 2 or line.endswith(b" "):
        return f"forwarded with a malformed request line: {line!r}"
    return None


def _no_brackets_in_ruri(data: bytes) -> str | None:
    line = _request_line(data)
    if b"<" in line or b">" in line:
        return f"forwarded with <> in the Request-URI: {line!r}"
    return _single_spaced_line(data)


def _no_escaped_headers(data: bytes) -> str | None:
    line = _request_line(data)
    if b"?" in line:
        return f"forwarded with escaped headers in the Request-URI: {line!r}"
    if re.search(rb"(?im)^Route\s*:\s*<sip:example\.com>", data):
        return "turned the Request-URI's escaped Route into a real header"
    return None


def _no_trailing_request(data: bytes) -> str | None:
    if data.count(b"INVITE sip:") or data.count(b"REGISTER") != 2:  # request line and CSeq
        return "forwarded the octets after the REGISTER's Content-Length"
    return None


def _authorization_kept(data: bytes) -> str | None:
    if b"Authorization: NoOneKnowsThisScheme opaque-data=here" not in data:
        return "did not forward the Authorization header unchanged"
    return None


def _body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def _same_body(name: str) -> Callable[[bytes], str | None]:
    original = (DATA / name).read_bytes()
    length = re.search(rb"(?im)^Content-Length\s*:\s*(\d+)", original)
    declared = int(length.group(1)) if length else len(original)
    expected = _body(original)[:declared]

    def check(data: bytes) -> str | None:
        if _body(data) != expected:
            return "the forwarded body is not byte-identical to the original"
        return None

    return check


def _unsupported_lists_proxy_tags(data: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    values = b" ".join(re.findall(rb"(?m)^unsupported\s*:(.*)$", head))
    missing = [
        t for t in (b"noproxiessupportthis", b"nordoanyproxiessupportthis") if t not in values
    ]
    if missing:
        return f"420 without Unsupported listing the Proxy-Require tags {missing}"
    return None


# RFC 4475 (see tests/data/rfc4475/EXPECTED.tsv), proxy role, R-URI not in our domains.
EXPECTED: dict[str, Expect] = {
    # 3.1.1: valid messages. A proxy parses them and forwards them.
    # In-dialog (To tag) with Route <sip:services.example.com;lr>: the proxy routes it there,
    # not to [upstream]. Tests never query DNS, so that name has no address here and the proxy
    # answers 500 "No Route To Destination"; that it parsed and tried to route is the point.
    # Byte-exact forwarding of its folded and compact headers is tests/test_conformance.py's.
    "wsinv.dat": Expect(
        statuses=_status(500), forward=True, why="3.1.1.1 valid; routed by its Route",
        check_response=lambda r: _status_line_has(r, b"No Route"),
    ),
    "intmeth.dat": Expect(forward=True, why="3.1.1.2 unknown method: proxies forward it"),
    "esc01.dat": Expect(forward=True, why="3.1.1.3 valid escapes"),
    "escnull.dat": Expect(forward=True, why="3.1.1.4 %00 in user parts; not our domain"),
    "esc02.dat": Expect(forward=True, why="3.1.1.5 unknown method RE%47IST%45R: forward"),
    "lwsdisp.dat": Expect(forward=True, why="3.1.1.6 accept as well formed"),
    "longreq.dat": Expect(forward=True, why="3.1.1.7 long values; forward"),
    "dblreq.dat": Expect(
        forward=True,
        why="3.1.1.8 handle the REGISTER, ignore the octets after its body",
        check_forwarded=_no_trailing_request,
    ),
    "semiuri.dat": Expect(forward=True, why="3.1.1.9 ; in the user part"),
    "transports.dat": Expect(forward=True, why="3.1.1.10 unknown transports in lower Vias"),
    # mpart01's pre-loaded Route names 127.0.0.1:5080 (a strict router, no ;lr), so the proxy
    # sends it there, not upstream; we record there too when we can bind that port, otherwise
    # all we can see is that the sender got no error.
    "mpart01.dat": Expect(
        forward=True,
        quiet=True,
        why="3.1.1.11 binary multipart body: forward byte-exact (to its Route, 127.0.0.1:5080)",
        check_forwarded=_same_body("mpart01.dat"),
    ),
    # Responses that match no transaction of ours: dropped. A stateless relay would send them
    # to the second Via, never back to the sender, and never upstream.
    "unreason.dat": Expect(quiet=True, why="3.1.1.12 response for no transaction of ours"),
    "noreason.dat": Expect(quiet=True, why="3.1.1.13 response for no transaction of ours"),
    # 3.1.2: invalid messages.
    "badinv01.dat": Expect(statuses=_status(400), why="3.1.2.1 empty Via/Contact params"),
    "clerr.dat": Expect(statuses=_status(400), why="3.1.2.2 UDP: Content-Length > body"),
    "ncl.dat": Expect(statuses=_status(400), why="3.1.2.3 negative Content-Length"),
    "scalar02.dat": Expect(statuses=_status(400), why="3.1.2.4 CSeq > 2**32-1"),
    "scalarlg.dat": Expect(quiet=True, why="3.1.2.5 bad response: discard silently"),
    # The RFC allows a careful parser to infer the missing quote and forward.
    "quotbal.dat": Expect(statuses=_status(400), forward=True, why="3.1.2.6 400 or infer"),
    "ltgtruri.dat": Expect(
        statuses=_status(400),
        forward=True,
        why="3.1.2.7 400; a liberal proxy strips the <> and never forwards them",
        check_forwarded=_no_brackets_in_ruri,
    ),
    "lwsruri.dat": Expect(
        statuses=_status(400),
        forward=True,
        why="3.1.2.8 400; a liberal proxy drops the LWS",
        check_forwarded=_single_spaced_line,
    ),
    "lwsstart.dat": Expect(
        statuses=_status(400),
        forward=True,
        why="3.1.2.9 400 or ignore the extra SP, never forward it",
        check_forwarded=_single_spaced_line,
    ),
    "trws.dat": Expect(
        statuses=_status(400),
        forward=True,
        why="3.1.2.10 400 or ignore the trailing SP, never forward it",
        check_forwarded=_single_spaced_line,
    ),
    "escruri.dat": Expect(
        statuses=_status(400),
        forward=True,
        why="3.1.2.11 400 may; a liberal proxy strips the ?headers and never makes them real",
        check_forwarded=_no_escaped_headers,
    ),
    # A proxy has no use for Date: it "may ignore Date and forward" (and may reject).
    "baddate.dat": Expect(statuses=_status(400), forward=True, why="3.1.2.12 Date not GMT"),
    # Not our domain, so the proxy need not look into Contact; a registrar would 400.
    "regbadct.dat": Expect(statuses=_status(400), forward=True, why="3.1.2.13 400 or infer <>"),
    "badaspec.dat": Expect(statuses=_status(400), forward=True, why="3.1.2.14 400 or ignore SP"),
    "baddn.dat": Expect(statuses=_status(400), forward=True, why="3.1.2.15 400 or liberal"),
    "badvers.dat": Expect(statuses=_status(505), why="3.1.2.16 SIP/7.0: 505"),
    "mismatch01.dat": Expect(statuses=_status(400), why="3.1.2.17 method vs CSeq"),
    "mismatch02.dat": Expect(statuses=_status(501, 400), why="3.1.2.18 501 preferred, or 400"),
    "bigcode.dat": Expect(quiet=True, why="3.1.2.19 status > 699: drop silently"),
    # 3.2
    "badbranch.dat": Expect(
        statuses=_status(400), forward=True, why="3.2.1 bare z9hG4bK: 400, or 2543 matching"
    ),
    # 3.3
    "insuf.dat": Expect(statuses=_status(400), why="3.3.1 no Call-ID/From/To"),
    "unkscm.dat": Expect(statuses=_status(416), why="3.3.2 unknown R-URI scheme: 416"),
    "novelsc.dat": Expect(statuses=_status(416, 404), why="3.3.3 soap.beep: 416 (or 404)"),
    "unksm2.dat": Expect(forward=True, why="3.3.4 non-SIP To/From/Contact: route on R-URI"),
    "bext01.dat": Expect(
        statuses=_status(420),
        why="3.3.5 unsupported Proxy-Require: 420 with Unsupported",
        check_response=_unsupported_lists_proxy_tags,
    ),
    "invut.dat": Expect(forward=True, why="3.3.6 unknown Content-Type: forward untouched"),
    "regaut01.dat": Expect(
        forward=True,
        why="3.3.7 unknown auth scheme: forward Authorization unmodified",
        check_forwarded=_authorization_kept,
    ),
    "multi01.dat": Expect(statuses=_status(400), why="3.3.8 multiple single-value headers"),
    "mcl01.dat": Expect(statuses=_status(400), why="3.3.9 conflicting Content-Lengths"),
    "bcast.dat": Expect(quiet=True, why="3.3.10 response to relay to broadcast: drop"),
    "zeromf.dat": Expect(statuses=_status(483), why="3.3.11 Max-Forwards 0: 483"),
    "cparam01.dat": Expect(forward=True, why="3.3.12 forward unchanged"),
    "cparam02.dat": Expect(forward=True, why="3.3.13 forward unchanged"),
    "regescrt.dat": Expect(forward=True, why="3.3.14 forward unchanged"),
    "sdp01.dat": Expect(forward=True, why="3.3.15 Accept without SDP is the UAS's business"),
    # 3.4.1: "accept for backward compatibility": forward (adding Max-Forwards). A proxy that
    # cannot match RFC 2543 transactions (no branch) may refuse it with 400 rather than misroute.
    "inv2543.dat": Expect(
        statuses=_status(400), forward=True, why="3.4.1 RFC 2543 INVITE: forward (or 400)"
    ),
}


# --- the message's own facts ---------------------------------------------------------------------


def _unfolded_head(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    text = re.sub(rb"\r\n[ \t]+", b" ", head).decode("utf-8", "replace")
    return text.split("\r\n")


def _header(lines: list[str], *names: str) -> str | None:
    pattern = re.compile(r"(?i)(" + "|".join(re.escape(n) for n in names) + r")\s*:\s*(.*)")
    for line in lines[1:]:
        m = pattern.match(line)
        if m:
            return m.group(2).strip()
    return None


def _call_id(data: bytes) -> str | None:
    return _header(_unfolded_head(data), "Call-ID", "i")


def _reply_port(data: bytes) -> tuple[int, bool]:
    """The top Via's sent-by port (its default by transport), and whether it says TCP/TLS."""
    via = _header(_unfolded_head(data), "Via", "v") or ""
    m = re.match(r"(?i)SIP\s*/\s*[\d.]+\s*/\s*(\w+)\s+([^;,\s]+)", via)
    if not m:
        return 5060, False
    transport, sent_by = m.group(1).upper(), m.group(2)
    port = re.search(r":(\d+)$", sent_by.split("]")[-1])
    default = 5061 if transport == "TLS" else 5060
    return (int(port.group(1)) if port else default), transport != "UDP"


# --- one exchange ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    responses: list[bytes] = field(default_factory=list)
    forwarded: list[bytes] = field(default_factory=list)

    def finals(self) -> list[bytes]:
        return [r for r in self.responses if _status_code(r) >= 200]


def _status_code(response: bytes) -> int:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1


class Bench:
    """The proxy under test, its upstream recorder, and a fresh sender address per message."""

    def __init__(
        self,
        proxy: ProxyProcess,
        recorders: list[socket.socket],
        stream_recorders: list[socket.socket],
    ) -> None:
        self.proxy = proxy
        self.recorders = recorders
        # Large requests go upstream over TCP (RFC 3261 18.1.1): the recorder listens there too.
        self.stream_recorders = stream_recorders
        self.stream_conns: dict[socket.socket, bytes] = {}
        self._prefix = f"127.{random.randint(64, 250)}.{random.randint(0, 255)}"
        self._next = 1

    def _sender_address(self) -> str:
        if self._next > 254:  # pragma: no cover - more messages than one /24 holds
            raise RuntimeError("out of sender addresses")
        address = f"{self._prefix}.{self._next}"
        self._next += 1
        return address

    def exchange(self, data: bytes) -> Outcome:
        port, stream = _reply_port(data)
        call_id = _call_id(data)
        outcome = Outcome()
        address = self._sender_address()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener: socket.socket | None = None
        conns: list[socket.socket] = []
        try:
            udp.bind((address, port))
            if stream:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, port))
                listener.listen(4)
            udp.sendto(data, self.proxy.address("udp"))
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and not (outcome.finals() or outcome.forwarded):
                watched = [
                    udp,
                    *self.recorders,
                    *self.stream_recorders,
                    *self.stream_conns,
                    *conns,
                    *([listener] if listener else []),
                ]
                ready, _, _ = select.select(watched, [], [], max(0.0, deadline - time.monotonic()))
                for sock in ready:
                    if sock is listener:
                        conn, _ = listener.accept()
                        conn.settimeout(0.5)
                        conns.append(conn)
                    elif sock is udp:
                        outcome.responses.append(udp.recv(65535))
                    elif sock in self.stream_recorders:
                        conn, _ = sock.accept()
                        self.stream_conns[conn] = b""
                    elif sock in self.stream_conns:
                        chunk = sock.recv(65535)
                        if not chunk:
                            del self.stream_conns[sock]
                            sock.close()
                            continue
                        messages, self.stream_conns[sock] = _frames(self.stream_conns[sock] + chunk)
                        outcome.forwarded.extend(
                            m for m in messages if call_id is not None and _call_id(m) == call_id
                        )
                    elif sock in conns:
                        chunk = sock.recv(65535)
                        if chunk:
                            outcome.responses.append(chunk)
                        else:
                            conns.remove(sock)
                    else:
                        datagram = sock.recv(65535)
                        # Retransmissions of earlier messages arrive here too: ours only.
                        if call_id is not None and _call_id(datagram) == call_id:
                            outcome.forwarded.append(datagram)
        finally:
            for s in [udp, *conns, *([listener] if listener else [])]:
                s.close()
        return outcome


def _frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole messages framed by Content-Length off a stream, and what is left over."""
    messages = []
    for _ in range(1000):  # bounded
        buffer = buffer.lstrip(b"\r\n")
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            break
        length = re.search(rb"(?im)^(?:Content-Length|l)\s*:\s*(\d+)", buffer[:end])
        size = end + 4 + (int(length.group(1)) if length else 0)
        if len(buffer) < size:
            break
        messages.append(buffer[:size])
        buffer = buffer[size:]
    return messages, buffer


def _bind_recorder(port: int, kind: int = socket.SOCK_DGRAM) -> socket.socket | None:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((LOOPBACK, port))
        if kind == socket.SOCK_STREAM:
            s.listen(8)
    except OSError:
        s.close()
        return None
    return s


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    if not sipp_available():
        pytest.skip("sipp is not installed")
    upstream_port = free_port()
    recorders: list[socket.socket] = []
    stream_recorders: list[socket.socket] = []
    # Upstream, and mpart01's pre-loaded Route (best effort: 5080 may be someone else's).
    for port, required in ((upstream_port, True), (5080, False)):
        for kind, found in (
            (socket.SOCK_DGRAM, recorders),
            (socket.SOCK_STREAM, stream_recorders),
        ):
            recorder = _bind_recorder(port, kind)
            assert recorder is not None or not required, f"cannot bind the recorder {port}"
            if recorder is not None:
                found.append(recorder)
    config = {
        "proxy": {"domains": ["lan.example"]},
        "listen": [
            {"side": "inside", "transport": "udp", "address": LOOPBACK, "port": free_port()}
        ],
        "upstream": {"uri": f"sip:{LOOPBACK}:{upstream_port};transport=udp"},
        "plugins": {"enabled": []},
    }
    proxy = ProxyProcess(config, tmp_path_factory.mktemp("torture"), name="proxy")
    bench = Bench(proxy, recorders, stream_recorders)
    try:
        proxy.start()
        yield bench
    finally:
        proxy.stop()
        for s in [*recorders, *stream_recorders, *bench.stream_conns]:
            s.close()


def test_every_file_has_an_expectation() -> None:
    files = {p.name for p in DATA.glob("*.dat")}
    assert files == set(EXPECTED), files ^ set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torture_message(bench: Bench, name: str) -> None:
    expect = EXPECTED[name]
    outcome = bench.exchange((DATA / name).read_bytes())
    assert bench.proxy.running(), f"the proxy died on {name}\n{bench.proxy.log_tail()}"

    finals = outcome.finals()
    summary = (
        f"{name} ({expect.why}): responses {[_request_line(r) for r in outcome.responses]}, "
        f"{len(outcome.forwarded)} forwarded"
    )
    if finals:
        status = _status_code(finals[0])
        assert status in expect.statuses, summary
        if expect.check_response is not None:
            problem = expect.check_response(finals[0])
            assert problem is None, f"{summary}: {problem}"
    elif outcome.forwarded:
        assert expect.forward, summary
        if expect.check_forwarded is not None:
            problem = expect.check_forwarded(outcome.forwarded[0])
            assert problem is None, f"{summary}: {problem}"
    else:
        # Nothing final came back and nothing reached the recorders within the wait.
        assert expect.quiet, summary
        assert not outcome.responses, summary


def test_proxy_still_serves_calls_after_torture(bench: Bench, tmp_path: Path) -> None:
    """After every torture message, a normal call through the same proxy still succeeds."""
    uas_port = free_port()
    # Upstream is the recorder, which never answers: reach the UAS through a registration.
    with Sipp(tmp_path) as sipp:
        register = sipp.run_uac(
            "register.xml",
            bench.proxy.address("udp"),
            count=1,
            keys={
                "user": "after-torture",
                "domain": "lan.example",
                "contact": f"sip:after-torture@{LOOPBACK}:{uas_port}",
                "expires": "600",
            },
            timeout=15,
        )
        assert register.ok(1), register.describe()
        uas = sipp.start_uas("uas_rr.xml", uas_port, count=3, timeout=30)
        uac = sipp.run_uac(
            "uac_rr.xml",
            bench.proxy.address("udp"),
            count=3,
            rate=5,
            keys={"ruri": "sip:after-torture@lan.example"},
            timeout=30,
        )
        server = uas.wait(15)
    assert bench.proxy.running(), bench.proxy.log_tail()
    assert uac.ok(3), uac.describe()
    assert server.ok(3), server.describe()
