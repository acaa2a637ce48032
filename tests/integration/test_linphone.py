"""
A real softphone through the proxy, set up as the README's "Phones" table says: Debian's
``linphonec`` (linphone-cli) in network namespaces (the NAT topology of ``netns.py``).

- No config (``twistd -n sipproxy``) on fw: alice (LAN) registers to 192.168.77.1, bob (outside)
  to 203.0.113.1, "any name / none", over UDP and over TCP; they call each other by user
  name, each call hung up by the other side once (BYE both ways).
- ``examples/firewall.toml`` as written (the provider's name replaced by its address) on fw, and
  a provider that is a real registrar: ``twistd -n sipproxy`` with no config in the provider's
  namespace (every address of that host is its domain). alice types the provider's domain as
  registrar and 192.168.77.1 as outbound proxy; bob is the provider's other user. Calls both
  ways with BYE both ways, hold and resume in the first (the relay's ports stay), and the
  audio (a WAV file linphone plays) reaches each phone from the media relay on its own side.
- ``examples/public.toml`` as written, on the provider's address: alice (behind fw's NAT) and
  bob register as users of ``sip.example.com`` with the passwords of ``examples/users.txt``
  (Digest) and call each other.
- A TLS listener beside the default ones: alice speaks TLS to it, bob UDP; calls both ways.

linphone's INVITE is larger than 1300 bytes and a linphone set up for UDP listens on UDP only:
the proxy must fall back to UDP when RFC 3261 18.1.1 sends it over TCP (it answered 503 before).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.harness import REPO_ROOT, HarnessError
from tests.integration.support.linphone import Linphone, linphone_available
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    Capture,
    Namespace,
    NatNet,
    NoConfigProxy,
    NsProxyProcess,
)
from tests.integration.support.sites import firewall_example
from tests.tls_certs import make_certificates

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not linphone_available(), reason="linphonec (linphone-cli) not installed"),
]

TIMEOUT = 20.0
RTP = 7078


def _connected(caller: Linphone, callee: Linphone) -> None:
    caller.expect(r"Call \d+ with \S+ connected", TIMEOUT)
    callee.expect(r"Call \d+ with \S+ connected", TIMEOUT)


def _ended(hanging_up: Linphone, other: Linphone) -> None:
    hanging_up.hang_up()
    hanging_up.expect(r"Call \d+ with \S+ ended", TIMEOUT)
    other.expect(r"Call \d+ with \S+ ended", TIMEOUT)  # the BYE reached it through the proxy


def _calls_both_ways(alice: Linphone, alice_calls: str, bob: Linphone, bob_calls: str,
                     talk: float = 0.0, hold: bool = False) -> None:
    """alice calls bob and hangs up; bob calls alice and alice hangs up: BYE from the caller,
    then from the callee, each way through the proxy. C{hold}: in the first call alice puts
    bob on hold and takes him back (re-INVITEs with sendonly, then sendrecv)."""
    alice.call(alice_calls)
    _connected(alice, bob)
    alice.drain(talk)
    if hold:
        alice.command("pause")
        alice.expect(r"Call \d+ with \S+ is now paused", TIMEOUT)
        bob.expect(r"Call \d+ has been paused by", TIMEOUT)
        alice.command("resume")
        alice.expect(r"Media streams established", TIMEOUT)
        bob.expect(r"Media streams established", TIMEOUT)
        alice.drain(talk)
    _ended(alice, bob)
    bob.call(bob_calls)
    _connected(bob, alice)
    bob.drain(talk)
    _ended(alice, bob)


def _phones(net: NatNet, tmp_path: Path, alice_registrar: str, bob_registrar: str,
            outbound_proxy: str | None = None, bob_outbound_proxy: str | None = None,
            passwords: tuple[str | None, str | None] = (None, None), transport: str = "udp",
            bob_ns: Namespace | None = None) -> tuple[Linphone, Linphone]:
    """alice on the LAN (phone), bob outside (provider, unless C{bob_ns})."""
    alice = Linphone(net.phone, tmp_path / "alice", "alice", alice_registrar,
                     outbound_proxy=outbound_proxy, password=passwords[0], auto_answer=True,
                     rtp_port=RTP, transport=transport)
    try:
        bob = Linphone(bob_ns or net.provider, tmp_path / "bob", "bob", bob_registrar,
                       outbound_proxy=bob_outbound_proxy, password=passwords[1],
                       auto_answer=True, rtp_port=RTP, transport=transport)
    except BaseException:
        alice.close()
        raise
    return alice, bob


def _register_and_call(proxies: list[NsProxyProcess], alice: Linphone, alice_calls: str,
                       bob: Linphone, bob_calls: str, **options: Any) -> None:
    """Both phones register, then L{_calls_both_ways}; the phones are closed afterwards. A
    failure says what the phones printed and the proxies logged."""
    try:
        alice.wait_registered(TIMEOUT)
        bob.wait_registered(TIMEOUT)
        _calls_both_ways(alice, alice_calls, bob, bob_calls, **options)
    except HarnessError as e:
        logs = [f"--- {proxy.name} log ---\n{proxy.log_text()[-4000:]}" for proxy in proxies]
        consoles = [f"--- {p.user} console ---\n{p.output[-2000:]}" for p in (alice, bob)]
        raise AssertionError("\n".join([str(e), *logs, *consoles])) from None
    finally:
        alice.close()
        bob.close()


def _assert_clean_log(proxy: NsProxyProcess) -> None:
    log = proxy.log_text()
    assert "Traceback" not in log and "#error" not in log and "#warn" not in log, log


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_linphone_no_config(nat_net: NatNet, tmp_path: Path, transport: str) -> None:
    net = nat_net
    proxy = NoConfigProxy(net.fw, {}, tmp_path / "proxy")
    proxy.start()
    alice, bob = _phones(net, tmp_path, FW_INSIDE, FW_OUTSIDE, transport=transport)
    try:
        _register_and_call([proxy], alice, f"sip:bob@{FW_INSIDE}",
                           bob, f"sip:alice@{FW_OUTSIDE}")
    finally:
        proxy.stop()
    _assert_clean_log(proxy)


class ProviderProxy(NoConfigProxy):
    """The provider: a registrar and proxy for its own address (sipproxy with no config)."""

    def listeners(self) -> list[tuple[str, str, int]]:
        return [("udp", PROVIDER_IP, 5060)]


def test_linphone_firewall_example(nat_net: NatNet, tmp_path: Path) -> None:
    net = nat_net
    provider = ProviderProxy(net.provider, {}, tmp_path / "provider", name="provider")
    proxy = NsProxyProcess(net.fw, firewall_example(), tmp_path / "fw")
    provider.start()
    proxy.start()
    capture = Capture(net.fw, [net.lan_if, net.wan_if])
    alice, bob = _phones(net, tmp_path, PROVIDER_IP, PROVIDER_IP, outbound_proxy=FW_INSIDE)
    try:
        _register_and_call([proxy, provider], alice, f"sip:bob@{PROVIDER_IP}",
                           bob, f"sip:alice@{PROVIDER_IP}", talk=1.5, hold=True)
    finally:
        packets = capture.stop()
        proxy.stop()
        provider.stop()
    # the audio reached each phone, from the relay's address on that phone's side
    to_alice = [p for p in packets if p.proto == "udp" and p.dst == PHONE_IP and p.dport == RTP]
    to_bob = [p for p in packets if p.proto == "udp" and p.dst == PROVIDER_IP and p.dport == RTP]
    assert len(to_alice) >= 100 and {p.src for p in to_alice} == {FW_INSIDE}, len(to_alice)
    assert len(to_bob) >= 100 and {p.src for p in to_bob} == {FW_OUTSIDE}, len(to_bob)
    # hold and resume kept the relay's ports: per call, one port in what fw sends each side
    # (an INVITE over 1500 bytes is fragmented and not in the capture's count)
    relay_ports: dict[tuple[str, str], set[str]] = {}
    for packet in packets:
        message = packet.sip()
        if message is not None and message.body and packet.src in (FW_INSIDE, FW_OUTSIDE):
            ports = {line.split()[1] for line in message.body.decode().splitlines()
                     if line.startswith("m=audio ")}
            relay_ports.setdefault((message.call_id, packet.src), set()).update(ports)
    assert len(relay_ports) >= 3 and all(len(p) == 1 for p in relay_ports.values()), relay_ports
    # nothing of the LAN on the outside
    leaks = [p for p in packets if p.interface == net.wan_if and b"192.168.77." in p.payload]
    assert not leaks, leaks[0].payload.decode(errors="replace")
    _assert_clean_log(proxy)


def test_linphone_public_example(nat_net: NatNet, tmp_path: Path) -> None:
    """examples/public.toml as written (users.txt beside it), the proxy on the provider's
    address: alice behind her own NAT (fw masquerades the LAN) and bob outside (on fw's outside
    address) register as users of sip.example.com with their passwords (Digest) and call each
    other; both ways, BYE both ways."""
    net = nat_net
    text = (REPO_ROOT / "examples" / "public.toml").read_text()
    workdir = tmp_path / "proxy"
    workdir.mkdir()
    shutil.copy(REPO_ROOT / "examples" / "users.txt", workdir / "users.txt")
    proxy = NsProxyProcess(net.provider, tomllib.loads(text.replace(FW_OUTSIDE, PROVIDER_IP)),
                           workdir)
    proxy.start()
    domain = "sip.example.com"  # its DNS would name the proxy: the phones name it themselves
    alice, bob = _phones(net, tmp_path, domain, domain, outbound_proxy=PROVIDER_IP,
                         bob_outbound_proxy=PROVIDER_IP,
                         passwords=("change-me-alice", "change-me-bob"), bob_ns=net.fw)
    try:
        _register_and_call([proxy], alice, f"sip:bob@{domain}", bob, f"sip:alice@{domain}")
    finally:
        proxy.stop()
    _assert_clean_log(proxy)


def test_linphone_over_tls_to_the_proxys_listener(nat_net: NatNet, tmp_path: Path) -> None:
    """A phone speaking TLS to the proxy (a ``transport = "tls"`` listener beside the default
    UDP and TCP ones): it registers over its TLS connection, calls a UDP phone, and that phone's
    call comes back to it over the same connection; BYE both ways."""
    net = nat_net
    certs = make_certificates(tmp_path / "certs")
    proxy = NsProxyProcess(net.fw, {"listen": [
        {"transport": "udp", "address": "0.0.0.0", "port": 5060},
        {"transport": "tcp", "address": "0.0.0.0", "port": 5060},
        {"transport": "tls", "address": FW_INSIDE, "port": 5061,
         "certificate": str(certs.proxy.cert), "key": str(certs.proxy.key)},
    ]}, tmp_path / "proxy")
    proxy.start()
    alice = Linphone(net.phone, tmp_path / "alice", "alice", FW_INSIDE,
                     outbound_proxy=f"{FW_INSIDE}:5061", transport="tls", auto_answer=True)
    bob = Linphone(net.provider, tmp_path / "bob", "bob", FW_OUTSIDE, auto_answer=True)
    try:
        _register_and_call([proxy], alice, f"sip:bob@{FW_INSIDE}", bob, f"sip:alice@{FW_OUTSIDE}")
    finally:
        proxy.stop()
    _assert_clean_log(proxy)
