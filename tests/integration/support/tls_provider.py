"""
The provider stand-in for the TLS tests across the NAT: :class:`tls_peers.TLSProvider` that
challenges REGISTER with a digest 401 for alice/secret and places calls of its own to a
registered Contact, over a connection the proxy opened.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tests.integration.support.sites import PASSWORD, USER
from tests.integration.support.tls_peers import (
    TLSProvider,
    header,
    headers,
    method_of,
    response_to,
    status_of,
)
from tests.tls_certs import PROVIDER

REALM = PROVIDER
#: how long the provider waits for an answer (seconds)
WAIT = 10.0


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def _digest_ok(authorization: str, method: str) -> bool:
    """RFC 2617 MD5 digest (with or without qop=auth) for USER/PASSWORD."""
    if not authorization.lower().startswith("digest "):
        return False
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(authorization[7:])}

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = md5(f"{params.get('username')}:{params.get('realm')}:{PASSWORD}")
    ha2 = md5(f"{method}:{params.get('uri')}")
    if params.get("qop"):
        want = md5(f"{ha1}:{params.get('nonce')}:{params.get('nc')}:{params.get('cnonce')}:"
                   f"{params['qop']}:{ha2}")
    else:
        want = md5(f"{ha1}:{params.get('nonce')}:{ha2}")
    return params.get("username") == USER and params.get("response") == want


@dataclass
class OwnCall:
    """A call the provider placed (its side of the dialog)."""

    call_id: str
    from_tag: str
    to: str  # the phone's To, with its tag
    remote: str  # the phone's Contact (through the proxy)
    routes: list[str]  # the route set, in the order to send
    connection: int


class ProviderUA(TLSProvider):
    """The provider stand-in: REGISTER is challenged once (401) and answered with its
    Contact; :meth:`call` places a call to a registered Contact over a connection it has."""

    #: answer an unauthorized REGISTER with a digest challenge (401) first
    challenge = True

    def _handle(self, conn: Any, message: bytes) -> None:
        if method_of(message) != "REGISTER":
            super()._handle(conn, message)
            return
        with self._lock:
            self.received.append((self._connections.index(conn), message))
        authorization = header(message, "authorization")
        if authorization is None and self.challenge:
            nonce = uuid.uuid4().hex
            conn.sendall(response_to(message, 401, "Unauthorized", to_tag="reg", extra=[
                f'WWW-Authenticate: Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5']))
        elif not self.challenge or _digest_ok(authorization or "", "REGISTER"):
            contacts = [f"Contact: {c};expires=3600" for c in headers(message, "contact")]
            conn.sendall(response_to(message, 200, "OK", to_tag="reg", extra=contacts))
        else:
            conn.sendall(response_to(message, 403, "Bad digest", to_tag="reg"))

    def send_on(self, connection: int, data: bytes) -> None:
        with self._lock:
            conn = self._connections[connection]
        conn.sendall(data)

    def _request(self, method: str, uri: str, call: OwnCall, cseq: int, *,
                 routes: list[str] = (), sdp: bytes = b"") -> bytes:  # type: ignore[assignment]
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/TLS {self.host}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]}",
            *[f"Route: {r}" for r in routes],
            "Max-Forwards: 70",
            f"From: <sip:carol@{PROVIDER}>;tag={call.from_tag}",
            f"To: {call.to}",
            f"Call-ID: {call.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:uas@{self.host}:{self.port};transport=tls>",
        ]
        if sdp:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(sdp)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + sdp

    def _final(self, call_id: str, method: str) -> bytes:
        def final(m: bytes) -> bool:
            status = status_of(m)
            return status is not None and status >= 200 and \
                header(m, "call-id") == call_id and \
                (header(m, "cseq") or "").endswith(f" {method}")

        return self.wait_for(final, WAIT)

    def call(self, uri: str, connection: int) -> OwnCall:
        """INVITE ``uri``, wait for the 200, ACK it along the route set."""
        call = OwnCall(uuid.uuid4().hex, uuid.uuid4().hex[:8], f"<{uri}>", "", [], connection)
        sdp = (f"v=0\r\no=carol 1 1 IN IP4 {self.host}\r\ns=-\r\nc=IN IP4 {self.host}\r\n"
               "t=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()
        self.send_on(connection, self._request("INVITE", uri, call, 1, sdp=sdp))
        ok = self._final(call.call_id, "INVITE")
        assert status_of(ok) == 200, ok
        call.to = header(ok, "to") or ""
        call.remote = (header(ok, "contact") or "").strip().strip("<>").split(">")[0]
        call.routes = [part.strip() for value in headers(ok, "record-route")
                       for part in value.split(",")][::-1]
        self.send_on(connection, self._request("ACK", call.remote, call, 1, routes=call.routes))
        return call

    def hang_up_own(self, call: OwnCall) -> bytes:
        self.send_on(call.connection, self._request("BYE", call.remote, call, 2,
                                                    routes=call.routes))
        return self._final(call.call_id, "BYE")
