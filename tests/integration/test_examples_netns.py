"""
Every example in examples/*.toml, as written, against real peers in network namespaces.

Each example file is loaded unchanged but for addresses, ports and file paths (text
substitution; the test checks that the substituted file has exactly the original's keys) and
run as the real proxy (C{python -m twisted sipproxy --config FILE}) in the standard topology
of netns.NatNet (phone | fw | provider), or, for the public proxy, on a second public address
of the provider's network with the phone behind fw's NAT. The peers are real:

- the provider is Debian's kamailio (kamailio.py): registrar with digest auth for its users, a
  service number 600 answered by sipp echoing RTP (C{-rtp_echo}), calls to its registered users,
  TLS on 5061 with a certificate of the test's CA (which the proxy trusts through the system
  trust store: C{SSL_CERT_FILE}, since the TLS example leaves C{ca} unset);
- the phone is Debian's baresip (baresip.py): it registers through the proxy (answering the
  provider's challenge itself), calls 600 and takes calls from the provider's side (sipp
  playing RTP from a pcap), audio from a WAV file. Where the example is about SRTP
  (firewall-tls.toml) the provider's side is a second baresip registered with kamailio, both
  with SRTP (SDES) only, and the a=crypto lines must arrive unchanged.

Where the proxy relays the media on fw, fw's forward chain drops UDP to 10000-60000, the
relay's ports included, as the seed's firewall does: the relay (kernel fast path on by default)
must not need a hole in it.

The public proxy's capture on the provider's side is its network interface and loopback: its
media relay is in the provider's namespace, so the relay-to-sipp leg goes over loopback.

What a user checks: registration succeeds, calls both ways complete with BYE from either side,
audio arrives both ways (at most 1 % of the packets lost, counted by SSRC and sequence number
in captures at both ends), and no inside address (192.168.77.x) is seen outside: not on fw's
outside interface (IP headers, cleartext payloads) and not in any SIP message the provider got.

Audio toward a phone behind its own NAT (public.toml: the relay is on the Internet, the phone
behind fw's masquerading) is counted from the moment that phone's first RTP packet reached the
relay: before it, the relay knows only the private address in the phone's SDP and the phone's
NAT has no mapping to let anything in (symmetric latching learns where to send from that first
packet), so the far side's first packet or two cannot arrive. That is inherent, not loss.

The no-config default (C{twistd -n sipproxy}, no argument) gets the softphone treatment too: a
baresip on each side of fw registers to the host's address there and they call each other by
user name, with audio (test_no_config.py has it with sipp).
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.baresip import Account, Baresip, baresip_unavailable
from tests.integration.support.harness import REPO_ROOT, HarnessError, SippProcess, SippResult
from tests.integration.support.kamailio import Kamailio, kamailio_unavailable
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    PHONE_IP,
    PROVIDER_IP,
    SEED_RTP_PORTS,
    Capture,
    Namespace,
    NatNet,
    NoConfigProxy,
    NsProxyProcess,
    NsSipp,
    Packet,
)
from tests.integration.support.rtp import is_rtp, loss, rtp_id, write_rtp_pcap
from tests.tls_certs import Certificates, make_certificates

pytestmark = [pytest.mark.netns]

EXAMPLES = REPO_ROOT / "examples"
DOMAIN = "provider.test"  # the provider's domain (kamailio's alias)
USER, PASSWORD = "alice", "secret"  # the phone's account at the provider
SERVICE = "600"  # the provider's echo service
SERVICE_PORT, SERVICE_RTP = 5090, 12000  # sipp UAS behind kamailio
CALLER_PORT, CALLER_RTP = 5080, 14000  # sipp UAC: a caller on the provider's side
PUBLIC_PROXY = "203.0.113.51"  # public.toml: the proxy's public address
FAR_USER, FAR_PASSWORD, FAR_PORT = "bob", "bobsecret", 5062  # a softphone at the provider
SRTP = "srtp-mand"  # baresip: RTP/SAVP with a=crypto (SDES), nothing else
TALK = 3.5  # seconds of conversation per call
MAX_LOSS = 0.01
INSIDE_TEXT = str(LAN.network_address).rsplit(".", 1)[0] + "."  # "192.168.77."
#: fw as the phone's home router (public.toml): masquerading, nothing new forwarded in
HOME_NAT = f"""
delete table ip sipnat
table ip homenat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {LAN} masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }}
}}
"""


# ------------------------------------------------------------------------------------------------
# the examples and how each is run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One example file and the set-up it is meant for."""

    file: str
    substitutions: dict[str, str]
    account: Account  # what the user types into the phone
    incoming: str  # the URI a caller on the provider's side dials to reach the phone
    proxy_ns: str = "fw"  # fw | provider (a public proxy)
    provider_tls: bool = False
    trusted: tuple[str, ...] = ()  # sources the provider does not challenge (trunks)
    peers: dict[str, tuple[str, int]] = field(default_factory=dict)  # provider's routes out
    registers_at_provider: bool = True  # the provider is the registrar (not the proxy)
    far_softphone: bool = False  # the provider's side is baresip too (SRTP end to end)
    phone_behind_nat: bool = False  # the relay reaches the phone only through the phone's NAT
    #: the proxy relays the media: fw's forward chain drops UDP to 10000-60000 as the seed's
    #: firewall does, the relay's own ports included (its kernel path must not mind)
    relays_media: bool = False


EXAMPLE_LIST = [
    Example(
        "firewall.toml",
        {"sip.provider.example": PROVIDER_IP},
        Account(f"sip:{USER}@{DOMAIN}", PASSWORD, outbound=f"sip:{FW_INSIDE}:5060"),
        incoming=f"sip:{USER}@{DOMAIN}",
        relays_media=True,
    ),
    Example(
        "tls.toml",
        {"192.168.1.1": FW_INSIDE, "192.168.1.0/24": str(LAN), "203.0.113.10": FW_OUTSIDE,
         "sip.provider.example": PROVIDER_IP},
        Account(f"sip:{USER}@{DOMAIN}", PASSWORD, outbound=f"sip:{FW_INSIDE}:5060"),
        incoming=f"sip:{USER}@{DOMAIN}",
        provider_tls=True,
        relays_media=True,
    ),
    Example(
        "sipproxy.toml",
        {"192.168.1.1": FW_INSIDE, "192.168.1.0/24": str(LAN), "203.0.113.10": FW_OUTSIDE,
         "sip.provider.example": PROVIDER_IP},
        # the proxy is the registrar for lan.example; the provider routes lan.example to it
        Account(f"sip:{USER}@lan.example", None, outbound=f"sip:{FW_INSIDE}:5060"),
        incoming=f"sip:{USER}@lan.example",
        trusted=(FW_OUTSIDE,),
        peers={"lan.example": (FW_OUTSIDE, 5060)},
        registers_at_provider=False,
        relays_media=True,
    ),
    Example(
        "public.toml",
        {"203.0.113.1": PUBLIC_PROXY, "sip.provider.example": PROVIDER_IP,
         "198.51.100.0/28": f"{PROVIDER_IP}/32", '"users.txt"': f'"{EXAMPLES / "users.txt"}"'},
        # examples/users.txt: alice's password is "change-me-alice"
        Account("sip:alice@sip.example.com", "change-me-alice",
                outbound=f"sip:{PUBLIC_PROXY}:5060"),
        incoming="sip:alice@sip.example.com",
        proxy_ns="provider",
        trusted=(PUBLIC_PROXY,),
        peers={"sip.example.com": (PUBLIC_PROXY, 5060)},
        registers_at_provider=False,
        phone_behind_nat=True,
    ),
    Example(
        "firewall-tls.toml",
        {"sip.provider.example": PROVIDER_IP},
        Account(f"sip:{USER}@{DOMAIN}", PASSWORD, outbound=f"sip:{FW_INSIDE}:5060",
                media_encryption=SRTP),
        incoming=f"sip:{USER}@{DOMAIN}",
        provider_tls=True,
        far_softphone=True,
        relays_media=True,
    ),
]


def _keys(table: Any, prefix: str = "") -> set[str]:
    """Every key path of a parsed TOML document (list items by index)."""
    found = set()
    items = table.items() if isinstance(table, dict) else enumerate(table)
    for key, value in items:
        path = f"{prefix}{key}"
        found.add(path)
        if isinstance(value, dict) or (isinstance(value, list) and value
                                        and isinstance(value[0], dict)):
            found |= _keys(value, path + ".")
    return found


def example_text(example: Example) -> str:
    """The example file with the test's addresses, ports and paths, and nothing else changed."""
    original = (EXAMPLES / example.file).read_text()
    text = original
    for old, new in example.substitutions.items():
        # whole addresses only: 203.0.113.1 must not change 203.0.113.10
        pattern = re.escape(old) + (r"(?![\d])" if old[-1].isdigit() else "")
        text, count = re.subn(pattern, new, text)
        assert count, f"examples/{example.file} no longer says {old!r}: update this test"
    assert _keys(tomllib.loads(text)) == _keys(tomllib.loads(original))
    return text


def test_every_example_file_is_tested() -> None:
    """A new examples/*.toml needs its entry in EXAMPLE_LIST (how a user would run it)."""
    files = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert files == sorted(e.file for e in EXAMPLE_LIST)


class ExampleProxy(NsProxyProcess):
    """The proxy running an example file as it is (the harness writes no config of its own)."""

    def __init__(self, ns: Namespace, text: str, workdir: Path, **kwargs: Any) -> None:
        super().__init__(ns, {}, workdir, **kwargs)
        self.text = text
        self.parsed = tomllib.loads(text)

    def listeners(self) -> list[tuple[str, str, int]]:
        return [(str(e.get("transport", "udp")), str(e.get("address", "0.0.0.0")),
                 int(e.get("port", 5060))) for e in self.parsed.get("listen", ())]

    def start(self) -> ExampleProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.text)
        super().start()
        return self


# ------------------------------------------------------------------------------------------------
# one example's run: registration, four calls, captures everywhere
# ------------------------------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    start: float = 0.0
    end: float = 0.0
    far: SippResult | None = None  # what sipp on the provider's side made of it
    error: str | None = None


@dataclass
class Run:
    example: Example
    net: NatNet
    kamailio: Kamailio
    proxy: ExampleProxy
    phone: Baresip
    far_phone: Baresip | None  # the provider's side, when it is a softphone
    provider_sipp: NsSipp
    captures: dict[str, Capture]
    registered: str | None = None  # an error, or None when it worked
    calls: dict[str, Call] = field(default_factory=dict)
    packets: dict[str, list[Packet]] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join([self.proxy.log_tail(40), self.kamailio.log_tail(30),
                          self.phone.log_tail(20)])


def _service(run: Run, hangs_up: bool) -> SippProcess:
    """The provider's echo service (sipp behind kamailio); it hangs up after TALK seconds or
    waits for the phone's BYE."""
    if hangs_up:
        scenario, extra = "uas_bye.xml", ["-d", str(int(TALK * 1000))]
    else:
        scenario, extra = "uas_rr.xml", []
    return run.provider_sipp.start_uas(
        scenario, SERVICE_PORT, count=1, timeout=20,
        extra_args=["-rtp_echo", "-mp", str(SERVICE_RTP), *extra])


def _caller(run: Run, hangs_up: bool) -> SippProcess:
    """A caller on the provider's side (sipp, through kamailio) playing RTP; it hangs up after
    TALK seconds or waits for the phone's BYE."""
    if hangs_up:
        scenario, duration = "uac_audio.xml", int(TALK * 1000)
    else:
        scenario, duration = "uac_audio_waitbye.xml", 0
    return run.provider_sipp.start_uac(
        scenario, (PROVIDER_IP, 5060), local_port=CALLER_PORT, count=1, timeout=20,
        keys={"ruri": run.example.incoming, "caller": "carol"}, call_duration_ms=duration,
        extra_args=["-mp", str(CALLER_RTP)])


def with_sipp(run: Run, call: Call, phone_calls: bool, phone_hangs_up: bool) -> None:
    """The phone calls the echo service, or a sipp caller calls the phone; one side hangs up
    after TALK seconds."""
    phone = run.phone
    seen = len(phone.events)
    far_hangs_up = not phone_hangs_up
    sipp = _service(run, far_hangs_up) if phone_calls else _caller(run, far_hangs_up)
    try:
        if phone_calls:
            response = phone.command("dial", f"sip:{SERVICE}@{DOMAIN}")
            assert response.get("ok"), response
        phone.wait_event("CALL_ESTABLISHED", 15, after=seen, fail_on=("CALL_CLOSED",))
        if phone_hangs_up:
            time.sleep(TALK)
            phone.command("hangup")
        phone.wait_event("CALL_CLOSED", TALK + 10, after=seen)
    finally:
        call.far = sipp.wait(15)


def with_softphone(run: Run, call: Call, phone_calls: bool, phone_hangs_up: bool) -> None:
    """The phone and the provider's softphone call each other; one hangs up after TALK s."""
    phone, far = run.phone, run.far_phone
    assert far is not None
    seen = {phone: len(phone.events), far: len(far.events)}
    caller = phone if phone_calls else far
    target = f"sip:{FAR_USER}@{DOMAIN}" if phone_calls else run.example.incoming
    response = caller.command("dial", target)
    assert response.get("ok"), response
    for end in (phone, far):
        end.wait_event("CALL_ESTABLISHED", 15, after=seen[end], fail_on=("CALL_CLOSED",))
    time.sleep(TALK)
    (phone if phone_hangs_up else far).command("hangup")
    for end in (phone, far):
        end.wait_event("CALL_CLOSED", 10, after=seen[end])


#: name: (the phone calls, the phone hangs up)
CALLS = {
    "outgoing, the phone hangs up": (True, True),
    "outgoing, the provider hangs up": (True, False),
    "incoming, the provider hangs up": (False, False),
    "incoming, the phone hangs up": (False, True),
}


def place_calls(run: Run) -> None:
    converse = with_softphone if run.example.far_softphone else with_sipp
    for name, (phone_calls, phone_hangs_up) in CALLS.items():
        call = Call(name, start=time.monotonic())
        try:
            converse(run, call, phone_calls, phone_hangs_up)
        except (HarnessError, AssertionError, OSError) as e:
            call.error = str(e)
        call.end = time.monotonic()
        run.calls[name] = call
        time.sleep(0.3)  # the next call's packets apart from this one's


def start_run(example: Example, net: NatNet, workdir: Path, certs: Certificates) -> Run:
    text = example_text(example)
    if example.proxy_ns == "provider":
        # a public proxy: its own address beside the provider's; fw is now the phone's home
        # router, a plain NAT (it does not drop RTP as the seed's firewall does)
        net.provider.run("ip", "addr", "add", f"{PUBLIC_PROXY}/24", "dev", "eth0")
        net.fw.nft(HOME_NAT)
    # a public proxy's relay talks to the provider's side over loopback
    provider_ifs = ["eth0"] if example.proxy_ns == "fw" else ["eth0", "lo"]
    captures = {
        "phone": Capture(net.phone, ["eth0"], max_seconds=120),
        "fw": Capture(net.fw, [net.lan_if, net.wan_if], max_seconds=120),
        "provider": Capture(net.provider, provider_ifs, max_seconds=120),
    }
    kamailio = Kamailio(
        net.provider, workdir / "kamailio", PROVIDER_IP, domain=DOMAIN,
        users={USER: PASSWORD, FAR_USER: FAR_PASSWORD},
        service=(SERVICE, PROVIDER_IP, SERVICE_PORT),
        peers=example.peers, trusted=(PROVIDER_IP, *example.trusted),
        tls=(certs.good.cert, certs.good.key) if example.provider_tls else None)
    proxy_ns = net.fw if example.proxy_ns == "fw" else net.provider
    proxy = ExampleProxy(proxy_ns, text, workdir / "proxy", name="proxy",
                         env={"SSL_CERT_FILE": str(certs.ca)})
    phone = Baresip(net.phone, workdir / "phone", example.account, host=PHONE_IP)
    far_phone = None
    if example.far_softphone:
        far_phone = Baresip(net.provider, workdir / "far-phone", Account(
            f"sip:{FAR_USER}@{DOMAIN}", FAR_PASSWORD, outbound=f"sip:{PROVIDER_IP}:5060",
            media_encryption=example.account.media_encryption), host=PROVIDER_IP,
            port=FAR_PORT)
    provider_sipp = NsSipp(net.provider, workdir / "sipp")
    write_rtp_pcap(provider_sipp.workdir / "audio.pcap", TALK - 0.5)
    run = Run(example, net, kamailio, proxy, phone, far_phone, provider_sipp, captures)
    try:
        kamailio.start()
        proxy.start()
        phone.start()
        if far_phone is not None:
            far_phone.start().wait_event("REGISTER_OK", 15, fail_on=("REGISTER_FAIL",))
    except BaseException:
        stop_run(run)
        raise
    return run


def stop_run(run: Run) -> None:
    run.phone.stop()
    if run.far_phone is not None:
        run.far_phone.stop()
    run.provider_sipp.cleanup()
    run.proxy.stop()
    run.kamailio.stop()
    for name, capture in run.captures.items():
        capture.settle()
        run.packets[name] = capture.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    # the provider's certificate names its address: the examples' upstream URI does
    return make_certificates(tmp_path_factory.mktemp("example-certs"),
                             provider_names=(DOMAIN, PROVIDER_IP))


@pytest.fixture(scope="module", params=EXAMPLE_LIST, ids=lambda e: e.file)
def example_run(request: pytest.FixtureRequest, netns_ready: None, certs: Certificates,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The example run once: registration and the four calls, then everything stopped; the
    tests below judge what happened."""
    example: Example = request.param
    for reason in (kamailio_unavailable(tls=example.provider_tls), baresip_unavailable()):
        if reason:
            pytest.skip(reason)
    net = NatNet.build(rtp_ports=SEED_RTP_PORTS) if example.relays_media else NatNet.build()
    try:
        run = start_run(example, net, tmp_path_factory.mktemp(example.file), certs)
        try:
            try:
                run.phone.wait_event("REGISTER_OK", 15, fail_on=("REGISTER_FAIL",))
            except HarnessError as e:
                run.registered = str(e)
            else:
                place_calls(run)
        finally:
            stop_run(run)
        yield run
    finally:
        net.close()


# ------------------------------------------------------------------------------------------------
# what a user checks
# ------------------------------------------------------------------------------------------------


def test_the_phone_registers(example_run: Run) -> None:
    """baresip gets its 200 for the REGISTER; where the provider is the registrar, the REGISTER
    reached kamailio and the phone answered kamailio's challenge (only the phone knows the
    password: the proxy holds none)."""
    run = example_run
    assert run.registered is None, f"{run.registered}\n{run.logs()}"
    if run.example.registers_at_provider:
        seen = run.kamailio.log_text()
        registers = re.findall(r"^REGISTER sip:\S+ SIP/2\.0$", seen, re.M)
        assert len(registers) >= 2, run.kamailio.log_tail()
        assert re.search(rf'^Authorization: Digest .*username="{USER}"', seen, re.M | re.I), \
            run.kamailio.log_tail()


def test_the_example_runs_without_warnings(example_run: Run) -> None:
    """A set-up the README tells people to run logs no warning or error, from start-up to
    the end of the calls (a warning there would mean the example leaves something open)."""
    log = example_run.proxy.log_path.read_text(errors="replace")
    assert not re.findall(r"^.*#(?:warn|error|critical)\].*$", log, re.M), \
        example_run.proxy.log_tail(40)
    assert "Traceback" not in log, example_run.proxy.log_tail(40)


@pytest.mark.parametrize("name", list(CALLS))
def test_calls_both_ways(example_run: Run, name: str) -> None:
    """The call is set up (baresip: established), and ends by the BYE of the side that hangs
    up: both ends see the end of the call."""
    run = example_run
    assert run.registered is None, "the phone did not register"
    call = run.calls[name]
    assert call.error is None, f"{name}: {call.error}\n{run.logs()}"
    if not run.example.far_softphone:
        assert call.far is not None and call.far.ok(1), \
            f"{call.far.describe() if call.far else ''}\n{run.logs()}"


def _bye_time(packets: list[Packet], call: Call) -> float:
    """When the first BYE was seen at the phone (sent or received) during the call, else the
    call's end: audio sent after it may die with the call."""
    for packet in packets:
        if call.start <= packet.time <= call.end and packet.payload.startswith(b"BYE "):
            return packet.time
    return call.end


@pytest.mark.parametrize("name", list(CALLS))
def test_audio_both_ways(example_run: Run, name: str) -> None:
    """RTP from the phone reaches the provider's side and back, at most 1 % lost each way
    (packets sent until shortly before the BYE, identified by SSRC and sequence number)."""
    run = example_run
    call = run.calls.get(name)
    assert call is not None, "the call was not placed (the phone did not register)"
    assert_audio(run.packets, call, run.logs(), run.example.phone_behind_nat)


def assert_audio(packets: dict[str, list[Packet]], call: Call, logs: str,
                 phone_behind_nat: bool = False) -> None:
    """Both directions of C{call}'s audio between the phone (C{PHONE_IP}, capture C{phone})
    and the provider's side (C{PROVIDER_IP}, capture C{provider}): RTP sent from the call's
    start (toward a phone behind NAT: from its first packet at the relay) until shortly before
    the BYE."""
    window = [p for p in packets["phone"] if call.start <= p.time <= call.end and is_rtp(p)]
    far = [p for p in packets["provider"] if call.start <= p.time <= call.end and is_rtp(p)]
    cutoff = _bye_time(packets["phone"], call) - 0.3
    phone_sent = [p for p in window if p.src == PHONE_IP and p.time < cutoff]
    far_sent = [p for p in far if p.src == PROVIDER_IP and p.time < cutoff]
    if phone_behind_nat:
        # the first of the phone's packets seen in the relay's namespace: its arrival there
        ours = {rtp_id(p) for p in phone_sent}
        latched = min((p.time for p in far if rtp_id(p) in ours), default=cutoff)
        far_sent = [p for p in far_sent if p.time >= latched]
    flows = [loss(phone_sent, [p for p in far if p.dst == PROVIDER_IP],
                  name="phone -> provider side"),
             loss(far_sent, [p for p in window if p.dst == PHONE_IP],
                  name="provider side -> phone")]
    report = "\n".join(map(repr, flows))
    for flow in flows:
        assert len(flow.sent) >= 50, f"too little audio sent\n{report}\n{logs}"
        assert flow.ratio <= MAX_LOSS, f"{report}\n{logs}"


def test_nothing_inside_is_seen_outside(example_run: Run) -> None:
    """Where the proxy is the firewall: no inside address in any SIP message the provider
    received, none in an IP header or a cleartext payload on fw's outside interface. (A public
    proxy has no inside: its phones' own private addresses are theirs to send.)"""
    run = example_run
    if run.example.proxy_ns != "fw":
        pytest.skip("a public proxy has no inside")
    seen = run.kamailio.log_text()
    leaks = [line for line in seen.splitlines() if INSIDE_TEXT in line]
    assert not leaks, "the provider saw inside addresses:\n" + "\n".join(leaks[:20])
    wan = [p for p in run.packets["fw"] if p.interface == run.net.wan_if]
    assert wan, "nothing was captured on fw's outside"
    bad = [p for p in wan if p.src.startswith(INSIDE_TEXT) or p.dst.startswith(INSIDE_TEXT)
           or (not is_rtp(p) and INSIDE_TEXT.encode() in p.payload)]
    assert not bad, "\n".join(f"{p.proto} {p.src}:{p.sport} -> {p.dst}:{p.dport} "
                              f"{p.payload[:200]!r}" for p in bad[:10])


def _crypto_lines(packets: list[Packet], outgoing: bool) -> set[str]:
    return {line for p in packets if p.outgoing == outgoing and not is_rtp(p)
            for line in p.payload.decode("utf-8", "replace").split("\r\n")
            if line.startswith("a=crypto:")}


def test_srtp_passes_untouched(example_run: Run) -> None:
    """Where the phones speak SRTP (SDES): every a=crypto line the phone sent reaches the
    provider as it was, every one the phone got is one the provider sent, the media lines say
    RTP/SAVP, and the calls had audio (test_audio_both_ways: SRTP relayed byte for byte)."""
    run = example_run
    if run.example.account.media_encryption is None:
        pytest.skip("the phones of this example speak plain RTP")
    sent = _crypto_lines(run.packets["phone"], outgoing=True)
    got = _crypto_lines(run.packets["phone"], outgoing=False)
    provider = set(run.kamailio.log_text().splitlines())
    assert sent and got, (sent, got)
    assert sent <= provider, sent - provider
    assert got <= provider, got - provider
    assert re.search(r"^m=audio \d+ RTP/SAVP ", run.kamailio.log_text(), re.M)


# ------------------------------------------------------------------------------------------------
# no config at all: `twistd -n sipproxy` (test_no_config.py has the sipp version)
# ------------------------------------------------------------------------------------------------


def test_no_config_default_with_softphones(netns_ready: None, tmp_path: Path) -> None:
    """C{twistd -n sipproxy} with no argument on fw, here a plain router (no NAT, no filter):
    baresip on each side registers as user@<the host's address on its side> with no password,
    alice calls bob by user name, they talk, bob hangs up; audio both ways (media direct)."""
    reason = baresip_unavailable()
    if reason:
        pytest.skip(reason)
    net = NatNet.build()
    try:
        net.fw.run("nft", "flush", "ruleset")
        net.provider.run("ip", "route", "add", str(LAN), "via", FW_OUTSIDE)
        captures = {"phone": Capture(net.phone, ["eth0"], max_seconds=60),
                    "provider": Capture(net.provider, ["eth0"], max_seconds=60)}
        proxy = NoConfigProxy(net.fw, {}, tmp_path / "proxy")
        alice = Baresip(net.phone, tmp_path / "alice", Account(f"sip:alice@{FW_INSIDE}"),
                        host=PHONE_IP)
        bob = Baresip(net.provider, tmp_path / "bob", Account(f"sip:bob@{FW_OUTSIDE}"),
                      host=PROVIDER_IP)
        call = Call("alice calls bob")
        try:
            proxy.start()
            for phone in (alice, bob):
                phone.start().wait_event("REGISTER_OK", 15, fail_on=("REGISTER_FAIL",))
            call.start = time.monotonic()
            assert alice.command("dial", f"sip:bob@{FW_INSIDE}").get("ok")
            for phone in (alice, bob):
                phone.wait_event("CALL_ESTABLISHED", 15, fail_on=("CALL_CLOSED",))
            time.sleep(TALK)
            bob.command("hangup")
            for phone in (alice, bob):
                phone.wait_event("CALL_CLOSED", 10)
            call.end = time.monotonic()
        except (HarnessError, AssertionError) as e:
            raise AssertionError(f"{e}\n{proxy.log_tail()}") from e
        finally:
            alice.stop()
            bob.stop()
            proxy.stop()
            packets = {name: capture.stop() for name, capture in captures.items()}
        assert_audio(packets, call, proxy.log_tail())
    finally:
        net.close()
