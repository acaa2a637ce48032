"""
TLS end to end on loopback, with certificates the tests make (tests/tls_certs.py).

- phone (sipp over UDP) -> proxy -> provider over TLS (tls_peers.TLSProvider, a Python ssl
  UAS), the call torn down from either side; the upstream URI is
  C{sips:provider.test:PORT;maddr=127.0.0.1}, so the certificate is checked for provider.test;
- a provider certificate for the wrong name, expired, or from an unknown CA: the phone gets 503
  with a Warning saying why, the log one line naming the provider and the error;
- a phone over TLS to the proxy's TLS listener, calling a sipp UAS over UDP;
- an SRTP call: RTP/SAVP, a=crypto and a=fingerprint lines arrive byte for byte.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.support.harness import LOOPBACK, ProxyProcess, Sipp, free_port
from tests.integration.support.tls_peers import (
    SipClient,
    TLSProvider,
    body,
    header,
    headers,
    method_of,
    status_of,
)
from tests.tls_certs import PROVIDER, Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def provider_factory() -> Iterator[Any]:
    started: list[TLSProvider] = []

    def start(pair: Any, **kw: Any) -> TLSProvider:
        provider = TLSProvider(pair.cert, pair.key, **kw)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.close()


def _config(port: int, provider_port: int, certs: Certificates, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "proxy": {"domains": ["lan.example"]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK, "port": port}],
        "upstream": {"uri": f"sips:{PROVIDER}:{provider_port};maddr={LOOPBACK}"},
        "plugins": {"enabled": ["tls"]},
        "tls": {"ca": str(certs.ca), "keepalive_interval": 5},
    }
    config.update(extra)
    return config


def _check_tls_side(invite: bytes, proxy_port: int, provider: TLSProvider) -> None:
    """The proxy's Via says TLS toward the provider, names the connection it came on and says
    alias (RFC 5923); its Record-Route says TLS on that side, naming that connection too (no
    TLS listener: nothing else of the proxy speaks TLS), and UDP on the phone's side."""
    [(host, port)] = provider.peers
    top_via = headers(invite, "via")[0]
    assert top_via.startswith(f"SIP/2.0/TLS {host}:{port};") and ";alias" in top_via, top_via
    rr = headers(invite, "record-route")
    assert rr[:2] == [f"<sip:{host}:{port};transport=tls;lr>",
                      f"<sip:{LOOPBACK}:{proxy_port};lr>"], rr


@pytest.mark.parametrize(("uac", "who"), [("uac_rr.xml", "phone"), ("uac_waitbye.xml",
                                                                      "provider")],
                         ids=["phone-hangs-up", "provider-hangs-up"])
def test_udp_phone_to_tls_provider(proxy_factory: Any, sipp: Sipp, provider_factory: Any,
                                   certs: Certificates, uac: str, who: str) -> None:
    provider = provider_factory(certs.good)
    port = free_port()
    proxy: ProxyProcess = proxy_factory(_config(port, provider.port, certs))
    call = sipp.start_uac(uac, proxy.address("udp"), count=1, rate=1,
                          keys={"ruri": f"sip:service@{PROVIDER}"}, timeout=20)
    invite = provider.wait_for(lambda m: method_of(m) == "INVITE")
    _check_tls_side(invite, port, provider)
    provider.wait_for(lambda m: method_of(m) == "ACK")
    if who == "provider":
        provider.hang_up(provider.dialogs[0])
    else:
        bye = provider.wait_for(lambda m: method_of(m) == "BYE")
        assert headers(bye, "via")[0].startswith("SIP/2.0/TLS "), bye
    result = call.wait(20)
    assert result.ok(1), result.describe()
    if who == "provider":
        ok = provider.wait_for(lambda m: status_of(m) == 200 and b"BYE" in m)
        assert header(ok, "cseq") == "1 BYE"
    # one connection for the whole call, in both directions
    assert {c for c, _ in provider.received} == {0}, provider.received
    assert proxy.running()


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("wrong_name", "certificate verify failed: certificate is not for provider.test"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("unknown_ca", "certificate verify failed: self-signed certificate in certificate chain"),
    ],
)
def test_bad_provider_certificate(proxy_factory: Any, provider_factory: Any,
                                  certs: Certificates, which: str, expected: str) -> None:
    provider = provider_factory(getattr(certs, which))
    proxy: ProxyProcess = proxy_factory(_config(free_port(), provider.port, certs))
    phone = SipClient("udp", proxy.address("udp"))
    try:
        call_id = uuid.uuid4().hex
        phone.request("INVITE", f"sip:service@{PROVIDER}", call_id=call_id, cseq=1,
                      from_tag="p1", to=f"<sip:service@{PROVIDER}>", content=_sdp(b"RTP/AVP"))
        final, _ = phone.final()
    finally:
        phone.close()
    assert status_of(final) == 503, final
    warning = header(final, "warning") or ""
    line = f"TLS to {PROVIDER}:{provider.port} (127.0.0.1) failed: {expected}"
    assert warning.startswith("399 ") and line in warning, final
    assert not provider.messages("INVITE")  # nothing reached it, in clear or otherwise
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [entry for entry in proxy.log_path.read_text().splitlines() if line in entry]
        if lines:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # anything else the failure would log is written by now
    lines = [entry for entry in proxy.log_path.read_text().splitlines()
             if f"{PROVIDER}:{provider.port}" in entry or "failed" in entry]
    assert len(lines) == 1 and line in lines[0], proxy.log_tail()  # one line per failure


def test_tls_phone_to_udp_provider(proxy_factory: Any, sipp: Sipp, certs: Certificates
                                   ) -> None:
    """A phone on the proxy's TLS listener (sips: URIs) calls a sipp UAS over UDP; the UAS
    hangs up, and its BYE reaches the phone over the phone's own TLS connection."""
    port, tls_port, uas_port = free_port(), free_port(), free_port()
    config = {
        "proxy": {"domains": ["lan.example"]},
        "listen": [
            {"side": "inside", "transport": "udp", "address": LOOPBACK, "port": port},
            {"side": "inside", "transport": "tls", "address": LOOPBACK, "port": tls_port,
             "certificate": str(certs.proxy.cert), "key": str(certs.proxy.key)},
        ],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port}"},
        "plugins": {"enabled": ["tls"]},
        "tls": {"ca": str(certs.ca)},
    }
    proxy = proxy_factory(config)
    uas = sipp.start_uas("uas_bye.xml", uas_port, count=1, timeout=20)
    context = ssl.create_default_context(cafile=str(certs.ca))
    phone = SipClient("tls", (LOOPBACK, tls_port), context=context, server_name="proxy.test")
    try:
        # sips: URIs are accepted: a REGISTER for sips:lan.example
        phone.request("REGISTER", "sips:lan.example", call_id=uuid.uuid4().hex, cseq=1,
                      from_tag="r1", to="<sips:phone@lan.example>")
        registered, _ = phone.final()
        assert status_of(registered) == 200, registered
        call_id = uuid.uuid4().hex
        phone.request("INVITE", f"sip:service@{LOOPBACK}:{uas_port}", call_id=call_id,
                      cseq=1, from_tag="c1", to=f"<sip:service@{LOOPBACK}:{uas_port}>",
                      content=_sdp(b"RTP/AVP"))
        ok, _ = phone.final()
        assert status_of(ok) == 200, ok
        rr = _route_set(ok)
        # toward the phone (the last entry, as the caller reads them) the proxy says TLS
        assert rr[-1] == f"<sip:{LOOPBACK}:{tls_port};transport=tls;lr>", rr
        to = header(ok, "to") or ""
        remote = (header(ok, "contact") or "").strip("<>")
        phone.request("ACK", remote, call_id=call_id, cseq=1, from_tag="c1",
                      to=to, routes=list(reversed(rr)))
        bye = phone.recv(15)
        assert method_of(bye) == "BYE", bye
        assert len(headers(bye, "via")) >= 2  # through the proxy
        phone.send(_ok_for(bye))
        result = uas.wait(15)
        assert result.ok(1), result.describe()
    finally:
        phone.close()
    assert proxy.running()


def test_srtp_call_passes_crypto_lines_unchanged(proxy_factory: Any, provider_factory: Any,
                                                 certs: Certificates) -> None:
    answer = _sdp(b"RTP/SAVPF", crypto=False, fingerprint=True)
    provider = provider_factory(certs.good, answer_sdp=answer)
    proxy = proxy_factory(_config(free_port(), provider.port, certs))
    phone = SipClient("udp", proxy.address("udp"))
    offer = _sdp(b"RTP/SAVP")
    try:
        call_id = uuid.uuid4().hex
        phone.request("INVITE", f"sip:service@{PROVIDER}", call_id=call_id, cseq=1,
                      from_tag="s1", to=f"<sip:service@{PROVIDER}>", content=offer)
        ok, _ = phone.final()
        assert status_of(ok) == 200, ok
        invite = provider.wait_for(lambda m: method_of(m) == "INVITE")
        assert body(invite) == offer  # byte for byte: m=audio ... RTP/SAVP and a=crypto
        assert _lines(body(invite), b"a=crypto:") == _lines(offer, b"a=crypto:")
        assert body(ok) == answer  # RTP/SAVPF with a DTLS fingerprint, untouched
        rr = _route_set(ok)
        remote = (header(ok, "contact") or "").strip("<>")
        to = header(ok, "to") or ""
        phone.request("ACK", remote, call_id=call_id, cseq=1, from_tag="s1", to=to,
                      routes=list(reversed(rr)))
        phone.request("BYE", remote, call_id=call_id, cseq=2, from_tag="s1", to=to,
                      routes=list(reversed(rr)))
        bye_ok, _ = phone.final()
        assert status_of(bye_ok) == 200, bye_ok
    finally:
        phone.close()


def _route_set(message: bytes) -> list[str]:
    """Record-Route entries, one per URI (sipp joins them into one header with commas)."""
    return [part.strip() for value in headers(message, "record-route")
            for part in value.split(",")]


def _lines(sdp: bytes, prefix: bytes) -> list[bytes]:
    return [line for line in sdp.split(b"\r\n") if line.startswith(prefix)]


def _sdp(profile: bytes, *, crypto: bool = True, fingerprint: bool = False) -> bytes:
    lines = [
        b"v=0",
        b"o=phone 2890844526 2890844526 IN IP4 127.0.0.1",
        b"s=-",
        b"c=IN IP4 127.0.0.1",
        b"t=0 0",
        b"m=audio 49170 " + profile + b" 0 8 101",
        b"a=rtpmap:0 PCMU/8000",
        b"a=rtpmap:101 telephone-event/8000",
    ]
    if crypto:
        lines += [
            b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
            b"inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
            b"a=crypto:2 AES_CM_128_HMAC_SHA1_32 "
            b"inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32 KDR=1 UNENCRYPTED_SRTCP",
        ]
    if fingerprint:
        lines += [
            b"a=setup:actpass",
            b"a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B:19:E5:7C:"
            b"AB:4B:87:5D:DA:6B:64:7E:8F:B0:2C:1F:31",
        ]
    return b"\r\n".join(lines) + b"\r\n"


def _ok_for(request: bytes) -> bytes:
    lines = ["SIP/2.0 200 OK"]
    lines += [f"Via: {v}" for v in headers(request, "via")]
    for name in ("from", "to", "call-id", "cseq"):
        lines.append(f"{name.title()}: {header(request, name)}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()

