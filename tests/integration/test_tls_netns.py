"""
The nat and tls plugins together across a real NAT: the phone (sipp over UDP, 192.168.77.10)
behind the firewall, the proxy on fw (``enabled = ["nat", "tls"]``), the provider stand-in
(tls_peers.TLSProvider: a Python ssl UAS, here listening on 203.0.113.50:5061 in the provider
namespace and challenging REGISTER with a digest 401) reached over TLS only, at
``sips:provider.test:5061;maddr=203.0.113.50`` (its certificate is checked for provider.test).

- The phone registers through the proxy (401, then 200 with its own Contact back), calls out
  twice (BYE from the phone, then from the provider) and is called twice by the provider on the
  token Contact it registered, over the proxy's own outgoing TLS connection (BYE from either
  side).
- fw's outside veth, captured all along: every TCP byte to or from port 5061 is a TLS record,
  nothing parses as SIP or says ``SIP/2.0``, no inside address in any IP header.
- A provider certificate for the wrong name, expired, or from an unknown CA: the phone gets 503
  with a Warning naming the error, the log one line, and not one cleartext SIP byte leaves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sipproxy.message import parse_message
from sipproxy.plugins.nat import TOKEN_PREFIX
from tests.integration.support.harness import HarnessError, SippResult
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    PHONE_IP,
    PROVIDER_IP,
    Capture,
    NatNet,
    NsProxyProcess,
    NsSipp,
    Packet,
    inside,
)
from tests.integration.support.sites import PASSWORD, USER, inside_addresses
from tests.integration.support.tls_peers import (
    SipClient,
    header,
    method_of,
    status_of,
)
from tests.integration.support.tls_provider import WAIT, ProviderUA
from tests.tls_certs import PROVIDER, Certificates, CertPair, make_certificates

pytestmark = [pytest.mark.netns]

SIP, SIPS = 5060, 5061
PHONE_CONTACT = f"sip:{USER}@{PHONE_IP}:{SIP}"
SIPP_TIMEOUT = 20.0


# ------------------------------------------------------------------------------------------------
# the site
# ------------------------------------------------------------------------------------------------


def tls_firewall_config(certs: Certificates) -> dict[str, Any]:
    return {
        "proxy": {"domains": []},
        "listen": [
            {"side": "inside", "transport": "udp", "address": FW_INSIDE, "port": SIP},
            # a cleartext outside listener too: nothing may ever leave through it
            {"side": "outside", "transport": "udp", "address": FW_OUTSIDE, "port": SIP},
        ],
        "upstream": {"uri": f"sips:{PROVIDER}:{SIPS};maddr={PROVIDER_IP}"},
        "plugins": {"enabled": ["nat", "tls"]},
        "nat": {"inside_networks": [str(LAN)]},
        "tls": {"ca": str(certs.ca), "keepalive_interval": 5},
    }


@dataclass
class TLSSite:
    net: NatNet
    proxy: NsProxyProcess
    capture: Capture
    phone: NsSipp
    provider: ProviderUA
    results: dict[str, Any] = field(default_factory=dict)
    packets: list[Packet] = field(default_factory=list)

    def logs(self) -> str:
        return self.proxy.log_tail(80)

    def stop(self) -> None:
        self.phone.cleanup()
        self.proxy.stop()
        self.provider.close()
        self.capture.settle()
        self.packets = self.capture.stop()

    def wan(self) -> list[Packet]:
        return [p for p in self.packets if p.interface == self.net.wan_if]

    def lan(self) -> list[Packet]:
        return [p for p in self.packets if p.interface == self.net.lan_if]


def start_tls_site(net: NatNet, workdir: Path, certs: Certificates,
                   pair: CertPair) -> TLSSite:
    with net.provider.entered():
        provider = ProviderUA(pair.cert, pair.key, host=PROVIDER_IP, port=SIPS)
    capture = Capture(net.fw, [net.lan_if, net.wan_if], max_seconds=120)
    proxy = NsProxyProcess(net.fw, tls_firewall_config(certs), workdir / "proxy", name="proxy")
    try:
        proxy.start()
    except BaseException:
        capture.stop()
        provider.close()
        raise
    return TLSSite(net, proxy, capture, NsSipp(net.phone, workdir / "phone"), provider)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("netns-certs"))


def _attempt(site: TLSSite, name: str, step: Any) -> None:
    """Run one scenario step; its outcome (or why it failed) is judged by the tests."""
    try:
        site.results[name] = step()
    except (AssertionError, HarnessError, OSError) as e:
        site.results[name] = e


def _call_id_of_ack(provider: ProviderUA, seen: set[str]) -> str:
    ack = provider.wait_for(lambda m: method_of(m) == "ACK" and header(m, "call-id") not in seen,
                            WAIT)
    return header(ack, "call-id") or ""


@pytest.fixture(scope="module")
def tls_firewall(netns_ready: None, certs: Certificates,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSite]:
    """Registration with a challenge, two outgoing and two incoming calls, all captured on
    fw; the tests below judge the results and the captures (everything is stopped by then)."""
    net = NatNet.build()
    try:
        site = start_tls_site(net, tmp_path_factory.mktemp("tls-firewall"), certs, certs.good)
        try:
            run_scenarios(site)
        finally:
            site.stop()
    finally:
        net.close()
    yield site


def run_scenarios(site: TLSSite) -> None:
    phone, provider = site.phone, site.provider

    def register() -> SippResult:
        return phone.run_uac(
            "register_auth.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
            timeout=SIPP_TIMEOUT, variables={"contact": PHONE_CONTACT},
            keys={"user": USER, "domain": PROVIDER, "contact": PHONE_CONTACT,
                  "expires": "3600"},
            extra_args=["-au", USER, "-ap", PASSWORD])

    _attempt(site, "register", register)
    acked: set[str] = set()

    def outgoing(phone_scenario: str, provider_hangs_up: bool) -> SippResult:
        uac = phone.start_uac(phone_scenario, (FW_INSIDE, SIP), local_port=SIP, count=1,
                              timeout=SIPP_TIMEOUT, keys={"ruri": f"sip:bob@{PROVIDER}"})
        try:
            call_id = _call_id_of_ack(provider, acked)
            acked.add(call_id)
            if provider_hangs_up:
                [dialog] = [d for d in provider.dialogs if header(d.invite, "call-id") == call_id]
                provider.hang_up(dialog)
                ok = provider.wait_for(lambda m: status_of(m) == 200 and
                                       header(m, "call-id") == call_id and
                                       header(m, "cseq") == "1 BYE", WAIT)
                assert ok
            else:
                provider.wait_for(lambda m: method_of(m) == "BYE" and
                                  header(m, "call-id") == call_id, WAIT)
        finally:
            result = uac.wait()
        return result

    _attempt(site, "outgoing-phone-hangs-up", lambda: outgoing("uac_rr.xml", False))
    _attempt(site, "outgoing-provider-hangs-up", lambda: outgoing("uac_waitbye.xml", True))

    def incoming(phone_scenario: str, provider_hangs_up: bool) -> SippResult:
        contact, connection = registered_contact(provider)
        uas = phone.start_uas(phone_scenario, SIP, count=1, timeout=SIPP_TIMEOUT)
        try:
            call = provider.call(contact, connection)
            if provider_hangs_up:
                bye_ok = provider.hang_up_own(call)
                assert status_of(bye_ok) == 200, bye_ok
            else:
                provider.wait_for(lambda m: method_of(m) == "BYE" and
                                  header(m, "call-id") == call.call_id, WAIT)
        finally:
            result = uas.wait(SIPP_TIMEOUT)
        return result

    _attempt(site, "incoming-provider-hangs-up", lambda: incoming("uas_rr.xml", True))
    _attempt(site, "incoming-phone-hangs-up", lambda: incoming("uas_bye.xml", False))


def registered_contact(provider: ProviderUA) -> tuple[str, int]:
    """The Contact (a nat token) of the authorized REGISTER, and its connection."""
    for connection, message in provider.messages("REGISTER"):
        if header(message, "authorization") is not None:
            contact = (header(message, "contact") or "").strip().strip("<>").split(">")[0]
            return contact, connection
    raise AssertionError("no authorized REGISTER reached the provider")


def _ok(site: TLSSite, name: str) -> SippResult:
    result = site.results.get(name)
    if isinstance(result, BaseException):
        raise AssertionError(f"{name}: {result}\n{site.logs()}")
    assert isinstance(result, SippResult), (name, result)
    assert result.ok(1), f"{result.describe()}\n{site.logs()}"
    return result


# ------------------------------------------------------------------------------------------------
# scenario 1: registration and calls
# ------------------------------------------------------------------------------------------------


def test_register_over_tls_with_a_challenge(tls_firewall: TLSSite) -> None:
    """401, then 200 with the phone's own Contact; the provider got a nat token Contact,
    both REGISTERs over one TLS connection."""
    _ok(tls_firewall, "register")
    registers = tls_firewall.provider.messages("REGISTER")
    assert [header(m, "authorization") is not None for _, m in registers] == [False, True]
    contact, _ = registered_contact(tls_firewall.provider)
    assert contact.startswith(f"sip:{TOKEN_PREFIX}"), contact
    assert PHONE_IP not in contact
    assert {c for c, _ in registers} == {0}


@pytest.mark.parametrize("name", ["outgoing-phone-hangs-up", "outgoing-provider-hangs-up",
                                  "incoming-provider-hangs-up", "incoming-phone-hangs-up"])
def test_calls_over_tls_through_the_firewall(tls_firewall: TLSSite, name: str) -> None:
    _ok(tls_firewall, name)


def test_one_tls_connection_carries_everything(tls_firewall: TLSSite) -> None:
    """Every message the provider got, both directions' requests, came over the connection
    the proxy opened for the REGISTER; no inside address in its Via, Contact, Record-Route,
    Route or Path."""
    received = tls_firewall.provider.received
    assert received
    assert {c for c, _ in received} == {0}, [(c, m.split(b"\r\n", 1)[0]) for c, m in received]
    for _, message in received:
        # (Call-ID and SDP keep the phone's address: neither routes anything; media is the
        # media plugin's job)
        assert not inside_addresses(parse_message(message)), message


# ------------------------------------------------------------------------------------------------
# scenario 2: what the outside veth saw
# ------------------------------------------------------------------------------------------------


def tls_stream_problems(packets: list[Packet]) -> list[str]:
    """Each TCP direction to or from port 5061, its payloads joined in order, must be a
    sequence of whole TLS records (type 0x14-0x17, version 3.x)."""
    streams: dict[tuple[str, int, str, int], bytearray] = {}
    problems = []
    for p in packets:
        if p.proto != "tcp" or not p.payload:
            continue
        if SIPS not in (p.sport, p.dport):
            problems.append(f"TCP payload not to/from {SIPS}: {p}")
            continue
        streams.setdefault((p.src, p.sport, p.dst, p.dport), bytearray()).extend(p.payload)
    for key, data in streams.items():
        offset, records = 0, 0
        while offset + 5 <= len(data):
            kind, major, minor = data[offset], data[offset + 1], data[offset + 2]
            if not (0x14 <= kind <= 0x17 and major == 3 and minor <= 4):
                problems.append(f"{key}: not a TLS record at byte {offset}: "
                                f"{bytes(data[offset:offset + 16])!r}")
                break
            offset += 5 + int.from_bytes(data[offset + 3:offset + 5], "big")
            records += 1
        else:
            if offset != len(data):
                problems.append(f"{key}: {len(data) - offset} bytes after the last whole record")
        if not records:
            problems.append(f"{key}: no TLS record")
    return problems


def cleartext_sip(packets: list[Packet]) -> list[Packet]:
    return [p for p in packets if p.sip() is not None or b"SIP/2.0" in p.payload]


def test_outside_is_tls_only(tls_firewall: TLSSite) -> None:
    wan, lan = tls_firewall.wan(), tls_firewall.lan()
    # the capture works: the LAN side has the SIP in clear, the outside carried TLS
    assert sum(1 for p in lan if p.sip() is not None) >= 20
    tls_bytes = sum(len(p.payload) for p in wan if p.proto == "tcp")
    assert tls_bytes > 2000, tls_bytes
    assert not tls_stream_problems(wan), tls_stream_problems(wan)[:5]
    assert not cleartext_sip(wan), cleartext_sip(wan)[:3]
    assert not [p for p in wan if p.proto == "udp"], "UDP left on the outside"
    for p in wan:
        assert not inside(p.src) and not inside(p.dst), p
        assert {p.src, p.dst} == {FW_OUTSIDE, PROVIDER_IP}, p


# ------------------------------------------------------------------------------------------------
# scenario 3: certificates that do not verify
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("wrong_name", "certificate verify failed: certificate is not for provider.test"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("unknown_ca", "certificate verify failed: self-signed certificate in certificate chain"),
    ],
)
def test_bad_provider_certificate_across_the_nat(nat_net: NatNet, tmp_path: Path,
                                                 certs: Certificates, which: str,
                                                 expected: str) -> None:
    site = start_tls_site(nat_net, tmp_path, certs, getattr(certs, which))
    try:
        with nat_net.phone.entered():
            phone = SipClient("udp", (FW_INSIDE, SIP), host=PHONE_IP)
        try:
            phone.request("INVITE", f"sip:bob@{PROVIDER}", call_id=uuid.uuid4().hex, cseq=1,
                          from_tag="b1", to=f"<sip:bob@{PROVIDER}>")
            final, _ = phone.final(WAIT)
        finally:
            phone.close()
        line = f"TLS to {PROVIDER}:{SIPS} ({PROVIDER_IP}) failed: {expected}"
        assert status_of(final) == 503, final
        warning = header(final, "warning") or ""
        assert warning.startswith("399 ") and line in warning, final
        deadline = time.monotonic() + 5
        lines: list[str] = []
        while time.monotonic() < deadline and not lines:
            lines = [entry for entry in site.proxy.log_text().splitlines() if line in entry]
            time.sleep(0.1)
        # one warning (the transaction layer notes the failed send at info level too)
        warnings = [entry for entry in lines if "#warn]" in entry]
        assert len(warnings) == 1 and warnings[0].endswith(line), site.logs()
        time.sleep(1.0)  # anything the proxy might try next (it must not) is seen too
    finally:
        site.stop()
    assert not site.provider.messages("INVITE")
    wan = site.wan()
    assert [p for p in wan if p.proto == "tcp" and p.payload], "no TLS attempt was seen"
    assert not cleartext_sip(wan), cleartext_sip(wan)[:3]
    assert not [p for p in wan if p.proto == "udp"], "UDP left on the outside"
    assert not tls_stream_problems(wan), tls_stream_problems(wan)[:5]
    for p in wan:
        assert not inside(p.src) and not inside(p.dst), p
