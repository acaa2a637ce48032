"""
SIP peers over TLS for the loopback TLS tests (sipp in Debian has no TLS): a provider stand-in
(a small UAS behind a Python C{ssl} server socket, in a thread) and plain SIP clients over UDP
or TLS for the phone side. Every wait is bounded; L{TLSProvider.close} stops the thread.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"

_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.I | re.M)


def split_messages(buffer: bytearray) -> list[bytes]:
    """Whole SIP messages framed by Content-Length off the front of C{buffer}; CRLF pings
    are dropped (and left for the caller to answer: see L{TLSProvider})."""
    out = []
    while True:
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return out
        head = bytes(buffer[:end])
        match = _CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        total = end + 4 + length
        if len(buffer) < total:
            return out
        out.append(bytes(buffer[:total]))
        del buffer[:total]


def header(message: bytes, name: str) -> str | None:
    for value in headers(message, name):
        return value
    return None


def headers(message: bytes, name: str) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    found = []
    for line in head.split("\r\n")[1:]:
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == name.lower():
            found.append(value.strip())
    return found


def body(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def status_of(message: bytes) -> int | None:
    if not message.startswith(b"SIP/2.0 "):
        return None
    return int(message.split(b" ", 2)[1])


def method_of(message: bytes) -> str | None:
    if message.startswith(b"SIP/2.0 "):
        return None
    return message.split(b" ", 1)[0].decode()


def response_to(request: bytes, status: int, reason: str, *, to_tag: str | None = None,
                extra: list[str] = (), payload: bytes = b"") -> bytes:  # type: ignore[assignment]
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in headers(request, "via")]
    lines += [f"Record-Route: {v}" for v in headers(request, "record-route")]
    lines.append(f"From: {header(request, 'from')}")
    to = header(request, "to") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {header(request, 'call-id')}")
    lines.append(f"CSeq: {header(request, 'cseq')}")
    lines += list(extra)
    lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@dataclass
class Dialog:
    """What the UAS remembers of a call, to hang up itself."""

    invite: bytes
    to_tag: str
    connection: ssl.SSLSocket


@dataclass
class TLSProvider:
    """
    A provider that speaks SIP over TLS only: answers INVITE with 180 + 200 (Record-Route
    copied, Contact C{sip:uas@127.0.0.1:PORT;transport=tls}, an SDP answer), ACK silently, BYE,
    REGISTER and OPTIONS with 200, CRLF pings with a pong. C{received} is every message in
    order, with the connection it came on.
    """

    cert: Path
    key: Path
    answer_sdp: bytes = b""
    port: int = 0
    host: str = LOOPBACK  # the address it listens on (its socket opens in the caller's netns)
    received: list[tuple[int, bytes]] = field(default_factory=list)
    dialogs: list[Dialog] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)  # per connection, in order

    def __post_init__(self) -> None:
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(self.cert), str(self.key))
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind((self.host, self.port))
        self._listen.listen(8)
        self.port = self._listen.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[ssl.SSLSocket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- the loop (one thread, select with a short timeout: stops within 0.1 s) ---------------
    def _run(self) -> None:
        buffers: dict[ssl.SSLSocket, bytearray] = {}
        while not self._stop.is_set():
            readable, _, _ = select.select([self._listen, *buffers], [], [], 0.1)
            for sock in readable:
                if sock is self._listen:
                    raw, _ = self._listen.accept()
                    raw.settimeout(5)
                    try:
                        conn = self._context.wrap_socket(raw, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        self.handshake_errors.append(str(e))
                        raw.close()
                        continue
                    with self._lock:
                        self._connections.append(conn)
                        self.peers.append(conn.getpeername()[:2])
                    buffers[conn] = bytearray()
                    continue
                assert isinstance(sock, ssl.SSLSocket)
                try:
                    data = sock.recv(65535)
                except (ssl.SSLError, OSError):
                    data = b""
                if not data:
                    buffers.pop(sock, None)
                    sock.close()
                    continue
                buffer = buffers[sock]
                buffer += data
                if buffer.startswith(b"\r\n\r\n"):
                    sock.sendall(b"\r\n")  # RFC 5626 pong
                for message in split_messages(buffer):
                    self._handle(sock, message)
        for sock in list(buffers):
            sock.close()

    def _handle(self, conn: ssl.SSLSocket, message: bytes) -> None:
        with self._lock:
            self.received.append((self._connections.index(conn), message))
        method = method_of(message)
        if method is None:
            return
        if method == "INVITE":
            tag = uuid.uuid4().hex[:8]
            contact = f"Contact: <sip:uas@{self.host}:{self.port};transport=tls>"
            conn.sendall(response_to(message, 180, "Ringing", to_tag=tag, extra=[contact]))
            sdp = self.answer_sdp or body(message)
            conn.sendall(response_to(message, 200, "OK", to_tag=tag,
                                     extra=[contact, "Content-Type: application/sdp"],
                                     payload=sdp))
            with self._lock:
                self.dialogs.append(Dialog(message, tag, conn))
        elif method in ("BYE", "REGISTER", "OPTIONS"):
            conn.sendall(response_to(message, 200, "OK", to_tag=uuid.uuid4().hex[:8]))

    # -- the test's side ----------------------------------------------------------------------
    def wait_for(self, predicate, timeout: float = 10.0) -> bytes:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for _, message in self.received:
                    if predicate(message):
                        return message
            time.sleep(0.02)
        raise AssertionError(f"the provider did not get the message within {timeout} s; "
                             f"got {[m.split(b' ', 2)[:2] for _, m in self.received]}")

    def messages(self, method: str) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(c, m) for c, m in self.received if method_of(m) == method]

    def hang_up(self, dialog: Dialog) -> None:
        """BYE from the callee: Route = the INVITE's Record-Route, to the caller's Contact."""
        invite = dialog.invite
        contact = header(invite, "contact") or ""
        target = contact.strip("<>").split(">")[0]
        lines = [
            f"BYE {target} SIP/2.0",
            f"Via: SIP/2.0/TLS {self.host}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]}",
            *[f"Route: {v}" for v in headers(invite, "record-route")],
            "Max-Forwards: 70",
            f"From: {header(invite, 'to')};tag={dialog.to_tag}",
            f"To: {header(invite, 'from')}",
            f"Call-ID: {header(invite, 'call-id')}",
            "CSeq: 1 BYE",
            "Content-Length: 0",
        ]
        dialog.connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listen.close()


class SipClient:
    """A phone: sends requests, reads messages (UDP datagrams or a TLS stream), bounded."""

    def __init__(self, transport: str, proxy: tuple[str, int], *,
                 context: ssl.SSLContext | None = None, server_name: str | None = None,
                 host: str = LOOPBACK) -> None:
        self.transport = transport
        self.host = host
        self.proxy = proxy
        self.buffer = bytearray()
        self.pending: list[bytes] = []
        if transport == "udp":
            self.sock: socket.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((host, 0))
        else:
            raw = socket.create_connection(proxy, timeout=5)
            assert context is not None
            self.sock = context.wrap_socket(raw, server_hostname=server_name)
        self.port = self.sock.getsockname()[1]
        self.via_transport = "UDP" if transport == "udp" else "TLS"
        tp = "" if transport == "udp" else ";transport=tls"
        self.contact = f"<sip:phone@{host}:{self.port}{tp}>"

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, self.proxy)
        else:
            self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no SIP message within {timeout} s")
            self.sock.settimeout(left)
            if self.transport == "udp":
                data, _ = self.sock.recvfrom(65535)
                self.pending.append(data)
            else:
                data = self.sock.recv(65535)
                if not data:
                    raise AssertionError("the proxy closed the TLS connection")
                self.buffer += data
                self.pending += split_messages(self.buffer)
        return self.pending.pop(0)

    def final(self, timeout: float = 15.0) -> tuple[bytes, list[bytes]]:
        """The final response (and the provisionals before it)."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.1, deadline - time.monotonic()))
            status = status_of(message)
            if status is None:
                continue
            if status >= 200:
                return message, seen
            seen.append(message)

    def request(self, method: str, uri: str, *, call_id: str, cseq: int, from_tag: str,
                to: str, routes: list[str] = (), to_tag: str | None = None,  # type: ignore
                content: bytes = b"", branch: str | None = None) -> bytes:
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/{self.via_transport} {self.host}:{self.port};"
            f"branch={branch or 'z9hG4bK' + uuid.uuid4().hex[:12]};rport",
            *[f"Route: {r}" for r in routes],
            "Max-Forwards: 70",
            f"From: <sip:phone@lan.example>;tag={from_tag}",
            f"To: {to}" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method if method != 'ACK' else 'ACK'}",
            f"Contact: {self.contact}",
        ]
        if content:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(content)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + content
        self.send(data)
        return data

    def close(self) -> None:
        self.sock.close()
